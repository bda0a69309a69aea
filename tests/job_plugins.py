"""Plug-in editors for the fault-tolerance and security tests (``model.kind: job_plugins:<Factory>``).

Ray workers import this module by name: the tests put ``tests/`` on the workers' ``PYTHONPATH``.
Each factory is called with the job's ``EditorSpec``; ``spec.weights`` carries a folder the test
chose (for the kill marker), since a plug-in editor may give ``weights`` any meaning it likes.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Sequence

import numpy as np

from step1x_batch.editor import EditOutput, EditRow

KILL_MARKER = "killed.txt"


class SeededEditor:
    """Deterministic model stand-in: output = input XOR a pattern drawn from the row's seed.

    Distinct per row (so a row written with another row's pixels would show), identical across
    processes and runs (so a redone row rewrites the same bytes).
    """

    def __init__(self, model_id: str, kill_dir: str | None = None, kill_on_call: int = 2) -> None:
        self.model_id = model_id
        self.kill_dir = kill_dir
        self.kill_on_call = kill_on_call
        self.calls = 0

    def _maybe_die(self, rows: Sequence[EditRow]) -> None:
        """SIGKILL this process on its ``kill_on_call``-th call, once per marker folder: the
        O_EXCL marker makes sure only the first incarnation of the first actor dies."""
        if not self.kill_dir or self.calls != self.kill_on_call:
            return
        try:
            fd = os.open(os.path.join(self.kill_dir, KILL_MARKER), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(fd, f"{os.getpid()} {','.join(str(r.seed) for r in rows)}\n".encode())
        os.fsync(fd)
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)  # while holding this batch
        time.sleep(60)  # never reached

    def edit_rows(self, rows: Sequence[EditRow]) -> list[EditOutput]:
        self.calls += 1
        self._maybe_die(rows)
        outs = []
        for row in rows:
            h, w = row.image.shape[:2]
            pattern = np.random.default_rng(row.seed).integers(0, 256, size=row.image.shape, dtype=np.uint8)
            outs.append(EditOutput(np.bitwise_xor(row.image, pattern), w, h, row.seed, 0.1))
        return outs


def Seeded(spec):  # noqa: N802 - plug-in factory
    """Never dies."""
    return SeededEditor(spec.model_id or "seeded")


def KillOnce(spec):  # noqa: N802 - plug-in factory
    """Dies (SIGKILL) on its second batch, the first time any actor gets there (marker in spec.weights)."""
    return SeededEditor(spec.model_id or "seeded", kill_dir=spec.weights)


class LeakyEditor:
    """Raises errors whose text carries the process's AWS secret and a credentialed URL, the way a
    careless library might, for rows whose instruction contains ``leak``; others pass through."""

    model_id = "leaky"

    def edit_rows(self, rows: Sequence[EditRow]) -> list[EditOutput]:
        for row in rows:
            if "leak" in row.instruction:
                raise RuntimeError(
                    f"auth failed: secret={os.environ.get('AWS_SECRET_ACCESS_KEY')} "
                    f"token {os.environ.get('AWS_SESSION_TOKEN')} key {os.environ.get('AWS_ACCESS_KEY_ID')} "
                    f"url https://mallory:{os.environ.get('STEP1X_TEST_URL_PASSWORD')}@example.invalid/x"
                )
        return [EditOutput(r.image, r.image.shape[1], r.image.shape[0], r.seed, 0.1) for r in rows]


def Leaky(spec):  # noqa: N802 - plug-in factory
    return LeakyEditor()
