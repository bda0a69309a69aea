"""Plug-in model families for the hostile-input job tests (``model.family: hostile_plugins:<Class>``).

Ray workers import this module by name (the tests put ``tests/`` on their ``PYTHONPATH``)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Sequence

from pydantic import BaseModel, ConfigDict

from job_plugins import Seeded, SeededEngine
from step1x_batch.models.base import EditOutput, EditRequest, Prepared


class DeleterOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lease_uri: str = ""  # deleted on the engine's ``on_call``-th call
    release_file: str = ""  # ... which then waits until this file exists
    on_call: int = 2


class LeaseDeleterEngine(SeededEngine):
    """The Seeded model that, on one call, deletes the output root's lease (an operator, a
    lifecycle rule) and holds that batch until the test says the driver has noticed."""

    def __init__(self, options: DeleterOptions) -> None:
        super().__init__()
        self.options = options
        self.n = 0

    def edit(self, rows: Sequence[Prepared]) -> list[EditOutput]:
        self.n += 1
        if self.n == self.options.on_call:
            from step1x_batch.io.storage import filesystem

            fs, path = filesystem(self.options.lease_uri)
            fs.rm(path)
            deadline = time.monotonic() + 120  # a bound for a broken build only
            while not os.path.exists(self.options.release_file) and time.monotonic() < deadline:
                time.sleep(0.05)
        return super().edit(rows)


class LeaseDeleter(Seeded):
    Options = DeleterOptions
    lightweight = False  # one actor: batches one after another

    def load(self, folder: Path | None, device: str):
        return LeaseDeleterEngine(self.options)


class PoisonOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    attempts_file: str = ""  # one line per attempt at the poisoned row


def _prepare_or_die(attempts_file: str):
    def prepare(request: EditRequest) -> Prepared:
        if "poison" in request.instruction:  # a native crash, an OOM kill: the worker dies
            with open(attempts_file, "a") as f:
                f.write(f"{os.getpid()}\n")
            os.kill(os.getpid(), signal.SIGKILL)
        image = request.images[0]
        h, w = image.shape[:2]
        return Prepared(f"{w}x{h}", w, h, {"image": image}, {"seed": request.seed, "instruction": request.instruction})

    return prepare


class PoisonedPrepare(Seeded):
    """Its CPU prepare kills the worker process for a row whose instruction says ``poison``."""

    Options = PoisonOptions

    def preparer(self, folder: Path | None):
        return _prepare_or_die(self.options.attempts_file)
