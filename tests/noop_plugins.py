"""A model family for the no-op rerun test: every model load appends a line to a file, so a test
can tell whether a run started an edit actor (imported by name by Ray workers from tests/)."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from job_plugins import Seeded, SeededEngine


class LoadLogOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    load_log: str


class CountsLoads(Seeded):
    Options = LoadLogOptions

    def load(self, folder: Path | None, device: str):
        with open(self.options.load_log, "a") as f:
            f.write(f"{os.getpid()}\n")
        return SeededEngine()
