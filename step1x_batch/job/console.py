"""What a person sees while a run runs: one live progress line and the summary.

Why: a one-machine run used to print dozens of Ray INFO lines, a token-authentication warning and
an error-level line about actor constructor arguments, even when nothing was wrong (conditions
the project itself sets up). Inside :func:`ray_output`, this process's file descriptors 1 and 2
point at the run's ``ray.log`` instead: Ray's Python logging, its C++ core worker's lines, the
worker output Ray forwards to the driver and Python warnings all land there, whatever prints
them. The :class:`Console` writes to the real terminal (a duplicate of the original
descriptors). ``runtime.verbose`` (``-v``) leaves the descriptors alone.

On a terminal the progress line is rewritten in place; otherwise (``ray job submit`` logs, CI)
it is printed as a new line every ``runtime.progress_seconds`` and once at the end.
"""

from __future__ import annotations

import collections
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, TextIO


class Console:
    """The run's own output: notes, the progress line, the summary.

    ``clock`` is injectable (tests): the first line is printed whatever it reads, so the line
    never waits on the clock's origin (``time.monotonic`` is the uptime on Linux: a first line
    compared with 0.0 was swallowed on a machine up for less than the interval)."""

    def __init__(self, out: TextIO, err: TextIO, *, interval_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.out, self.err = out, err
        self.live = bool(getattr(out, "isatty", lambda: False)())
        self.interval_s = interval_s
        self.clock = clock
        self._last_print: float | None = None  # None: nothing printed yet
        self._live_width = 0
        self._last_text = ""
        self._printed = ""  # the last line printed (not live): a final line is not printed twice

    def _end_live(self) -> None:
        if self._live_width:
            self.out.write("\n")
            self.out.flush()
            self._live_width = 0

    def say(self, message: str, *, err: bool = False) -> None:
        """A line of its own (a note, the summary), after the progress line if one is live."""
        self._end_live()
        stream = self.err if err else self.out
        stream.write(message + "\n")
        stream.flush()

    def end_progress(self) -> None:
        """Leave the last progress line on the screen (when the run stops early)."""
        if self._last_text:
            self.progress(self._last_text, final=True)

    def progress(self, text: str, *, final: bool = False) -> None:
        """The progress line: rewritten in place on a terminal, else printed every interval."""
        self._last_text = text
        if self.live:
            pad = max(0, self._live_width - len(text))
            self.out.write("\r" + text + " " * pad)
            self.out.flush()
            self._live_width = len(text)
            if final:
                self._end_live()
            return
        now = self.clock()
        due = self._last_print is None or now - self._last_print >= self.interval_s
        if (final and text != self._printed) or due:
            self._last_print, self._printed = now, text
            self.out.write(text + "\n")
            self.out.flush()


def _stream_on(fd: int, current: TextIO) -> TextIO:
    """A text stream on a duplicate of ``fd`` when ``current`` writes to that descriptor (a real
    terminal or pipe); ``current`` itself otherwise (a test's captured stream)."""
    try:
        if current.fileno() == fd:
            return os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace")
    except (AttributeError, OSError, ValueError):
        pass
    return current


@contextmanager
def ray_output(log_path: str | None, *, verbose: bool = False, interval_s: float = 30.0) -> Iterator[Console]:
    """Inside: fds 1 and 2 go to ``log_path`` (appended) unless ``verbose``; yields the
    :class:`Console` that still reaches the person running the job."""
    if verbose or log_path is None:
        yield Console(sys.stdout, sys.stderr, interval_s=interval_s)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    out, err = _stream_on(1, sys.stdout), _stream_on(2, sys.stderr)
    saved = [os.dup(1), os.dup(2)]
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    console = Console(out, err, interval_s=interval_s)
    try:
        yield console
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, log_fd):
            os.close(fd)
        for stream in (out, err):
            if stream not in (sys.stdout, sys.stderr):
                stream.flush()
                stream.close()


# ---------------------------------------------------------------------------------------------
# The progress line.


@dataclass
class RunProgress:
    """A run's state as the driver sees it: rows logged by this driver, rows the reader skipped
    as done, the edit actors' states."""

    run_id: str
    elapsed_s: float
    ok: int = 0
    error: int = 0
    skipped: int = 0
    manifest_rows: int | None = None  # None: not known up front
    actor_states: tuple[tuple[str, float], ...] = ()  # (state, seconds in it) per actor
    actors_planned: int = 0

    @property
    def done(self) -> int:
        return self.ok + self.error


class RateMeter:
    """Rows per second over the last minute (the ETA follows the current pace, not the model
    load at the start)."""

    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self.samples: collections.deque[tuple[float, int]] = collections.deque()

    def add(self, t: float, done: int) -> float:
        self.samples.append((t, done))
        while len(self.samples) > 2 and t - self.samples[1][0] >= self.window_s:
            self.samples.popleft()
        t0, d0 = self.samples[0]
        return (done - d0) / (t - t0) if t > t0 else 0.0


def plural(n: int, noun: str) -> str:
    """``1 row``, ``2 rows``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def format_rate(per_s: float) -> str:
    """Rows per second that never reads 0.0 for a slow run: two significant digits below 1."""
    if per_s <= 0:
        return "0.0"
    if per_s < 1:
        return f"{per_s:.2g}"
    return f"{per_s:.1f}"


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress_line(p: RunProgress, rows_per_s: float) -> str:
    """``run X: 412/1000 rows (ok 400, error 12), 35.2 rows/s, ETA 0:17, actors 1/1 busy``."""
    todo = None if p.manifest_rows is None else max(p.manifest_rows - p.skipped, p.done)
    rows = f"{p.done}/{todo}" if todo is not None else f"{p.done}"
    parts = [f"run {p.run_id}: {rows} rows (ok {p.ok}, error {p.error})"]
    if p.skipped:
        parts.append(f"{p.skipped} skipped as done")
    parts.append(f"{format_rate(rows_per_s)} rows/s")
    if todo is not None and rows_per_s > 0 and todo > p.done:
        parts.append(f"ETA {_duration((todo - p.done) / rows_per_s)}")
    states = [s for s, _ in p.actor_states]
    total = max(p.actors_planned, len(states))
    if total:
        busy = sum(s == "busy" for s in states)
        loading = [(s, t) for s, t in p.actor_states if s not in ("busy", "ready")]
        text = f"actors {busy}/{total} busy"
        if loading and not p.done:
            state, since = max(loading, key=lambda st: st[1])
            text += f" ({len(loading)} {state}, {_duration(since)})"
        elif len(states) < total and not p.done:
            text += " (starting)"
        parts.append(text)
    parts.append(_duration(p.elapsed_s))
    return ", ".join(parts)
