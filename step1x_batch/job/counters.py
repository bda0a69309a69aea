"""The counters actor every stage reports to: rows read and skipped, time spent normalising,
storage retries, and each edit actor's state (staging weights, loading, ready, busy, or the one
sentence why its model failed to load). The driver polls it for the progress line."""

from __future__ import annotations

import time
from typing import Any


def make_counters():
    """A tiny zero-CPU actor that tasks add to and edit actors report their state to (staging
    weights, loading, ready, busy; or the one sentence why the model failed to load); the driver
    polls it for the progress line and reads it at the end."""
    import ray

    @ray.remote(num_cpus=0)
    class Counters:
        def __init__(self) -> None:
            self.values: dict[str, float] = {}
            self.states: dict[str, tuple[str, float]] = {}  # actor -> (state, since: time.time())
            self.fatal: str | None = None

        def add(self, deltas: dict[str, float]) -> None:
            for k, v in deltas.items():
                self.values[k] = self.values.get(k, 0) + v

        def set_state(self, actor: str, state: str) -> None:
            since = self.states[actor][1] if actor in self.states and self.states[actor][0] == state else time.time()
            self.states[actor] = (state, since)

        def set_fatal(self, message: str) -> None:
            self.fatal = self.fatal or message

        def snapshot(self) -> dict[str, float]:
            return dict(self.values)

        def status(self) -> dict[str, Any]:
            return {"values": dict(self.values), "states": dict(self.states), "fatal": self.fatal}

    return Counters.remote()


def add_counters(counters, deltas: dict[str, float]) -> None:
    if counters is None or not deltas:
        return
    import ray

    ray.get(counters.add.remote(deltas))
