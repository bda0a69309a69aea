"""Plug-in model families for the job tests (``model.family: job_plugins:<Class>``).

Ray workers import this module by name: the tests put ``tests/`` on the workers' ``PYTHONPATH``.
Nothing here is registered in the package: a family outside it runs through the job exactly as the
built-in ones do (prepare in CPU tasks, the engine in the actors, finish in the write tasks).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict

from step1x_batch.models.base import EditOutput, EditRequest, ModelFamily, Prepared

KILL_MARKER = "killed.txt"


def _pattern(seed: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


class SeededEngine:
    """Deterministic model stand-in: output = input XOR a pattern drawn from the row's seed.

    Distinct per row (so a row written with another row's pixels would show), identical across
    processes and runs (so a redone row rewrites the same bytes).
    """

    def __init__(self, kill_dir: str | None = None, kill_on_call: int = 2) -> None:
        self.kill_dir = kill_dir
        self.kill_on_call = kill_on_call
        self.calls = 0

    def _maybe_die(self, rows: Sequence[Prepared]) -> None:
        """SIGKILL this process on its ``kill_on_call``-th call, once per marker folder: the
        O_EXCL marker makes sure only the first incarnation of the first actor dies."""
        if not self.kill_dir or self.calls != self.kill_on_call:
            return
        try:
            fd = os.open(os.path.join(self.kill_dir, KILL_MARKER), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, f"{os.getpid()} {','.join(str(r.meta['seed']) for r in rows)}\n".encode())
        os.fsync(fd)
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)  # while holding this batch
        time.sleep(60)  # never reached

    def edit(self, rows: Sequence[Prepared]) -> list[EditOutput]:
        self.calls += 1
        self._maybe_die(rows)
        return [EditOutput(np.bitwise_xor(r.arrays["image"], _pattern(r.meta["seed"], r.arrays["image"].shape)))
                for r in rows]


def _prepare_first(request: EditRequest) -> Prepared:
    image = request.images[0]
    h, w = image.shape[:2]
    meta = {"seed": request.seed, "instruction": request.instruction}
    return Prepared(f"{w}x{h}", w, h, {"image": image}, meta)


class Seeded(ModelFamily):
    """Never dies."""

    name = "seeded"
    needs_weights = False
    lightweight = True

    def preparer(self, folder: Path | None):
        return _prepare_first

    def load(self, folder: Path | None, device: str):
        return SeededEngine()


class KillOnce(Seeded):
    """Dies (SIGKILL) on its second batch, the first time any actor gets there (marker in model.weights)."""

    def load(self, folder: Path | None, device: str):
        return SeededEngine(kill_dir=self.spec.weights)


class LeakyEngine:
    """Raises errors whose text carries the process's AWS secret and a credentialed URL, the way a
    careless library might, for rows whose instruction contains ``leak``; others pass through."""

    def edit(self, rows: Sequence[Prepared]) -> list[EditOutput]:
        for row in rows:
            if "leak" in row.meta["instruction"]:
                raise RuntimeError(
                    f"auth failed: secret={os.environ.get('AWS_SECRET_ACCESS_KEY')} "
                    f"token {os.environ.get('AWS_SESSION_TOKEN')} key {os.environ.get('AWS_ACCESS_KEY_ID')} "
                    f"url https://mallory:{os.environ.get('STEP1X_TEST_URL_PASSWORD')}@example.invalid/x"
                )
        return [EditOutput(r.arrays["image"]) for r in rows]


class Leaky(Seeded):
    def load(self, folder: Path | None, device: str):
        return LeakyEngine()


class MeanOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_images: int = 3


class MeanEngine:
    def edit(self, rows: Sequence[Prepared]) -> list[EditOutput]:
        return [EditOutput(r.arrays["stack"].mean(axis=0).round().astype(np.uint8)) for r in rows]


def _prepare_mean(request: EditRequest) -> Prepared:
    """Every input resized to the first one's size (CPU work, in the prepare stage)."""
    first = request.images[0]
    h, w = first.shape[:2]
    stack = np.stack([first] + [np.asarray(Image.fromarray(im).resize((w, h), Image.BILINEAR))
                                for im in request.images[1:]])
    return Prepared(f"{w}x{h}x{len(request.images)}", w, h, {"stack": stack}, {"seed": request.seed})


class MeanOfInputs(ModelFamily):
    """A multi-image family: the output is the pixel mean of a row's inputs (all at the first
    input's size), so a test can check that every reference of a row reached the model in order."""

    name = "mean-of-inputs"
    Options = MeanOptions
    needs_weights = False
    lightweight = True

    @property
    def max_images(self) -> int:
        return self.options.max_images

    def preparer(self, folder: Path | None):
        return _prepare_mean

    def load(self, folder: Path | None, device: str):
        return MeanEngine()


class SlowEngine(SeededEngine):
    """The Seeded model at a pace a driver can be killed during (``model.options.row_s`` each row)."""

    def __init__(self, row_s: float) -> None:
        super().__init__()
        self.row_s = row_s

    def edit(self, rows: Sequence[Prepared]) -> list[EditOutput]:
        time.sleep(self.row_s * len(rows))
        return super().edit(rows)


class SlowOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    row_s: float = 0.5


class Slow(Seeded):
    Options = SlowOptions
    lightweight = False  # one actor: the pace is the job's pace

    def load(self, folder: Path | None, device: str):
        return SlowEngine(self.options.row_s)


class FailsToLoad(Seeded):
    """A model whose weights turn out unreadable only inside the actor (after the pre-flight
    checks passed), the way a file corrupted on one node's disk would."""

    def load(self, folder: Path | None, device: str):
        raise OSError("/models/tiny/vae.safetensors: safetensors header is corrupt (HeaderTooLarge)")
