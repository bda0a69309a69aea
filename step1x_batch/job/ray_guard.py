"""Tie a driver's private local Ray to the driver's life (Linux).

Why: after a driver is SIGKILLed, the local Ray it started partly outlives it. The GCS and the
raylet follow the driver (Ray starts them with a parent-death signal), but the raylet's own
children, ``ray::DashboardAgent`` and ``ray::RuntimeEnvAgent``, are re-parented to init and keep
running: they ignore SIGTERM, hold ports and memory, and pile up with every killed run. Their
command lines and environments are rewritten by ``setproctitle``, so nothing can find them by a
marker after the fact.

So the driver starts a small guard before ``ray.init`` (:func:`start`), in its own session (a
signal to the driver's process group does not reach it), holding the read end of a pipe whose
write end only the driver holds (not inherited: PEP 446, and Ray closes fds when it spawns). The
guard records the driver's Ray descendants (Ray's binaries, Python processes running Ray's files,
``ray::`` processes) every :data:`POLL_S` seconds with their start times. When the pipe reaches
end of file -- the driver closed it after ``ray.shutdown()``, or the driver died, however -- it
SIGKILLs every recorded process that still runs (same pid and start time: never a reused pid)
and any Ray descendant of them, then exits. This file is run as a script (standard library only):
``python ray_guard.py DRIVER_PID READ_FD RAY_DIR``.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time

POLL_S = 0.25


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks since boot) of a live process, or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()  # after "pid (comm) ": state, ppid, ... (field 3 on)
    try:
        return int(fields[1]), int(fields[19])
    except (IndexError, ValueError):
        return None


def _processes() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, start time) of every process."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(int(name))
            if st is not None:
                table[int(name)] = st
    return table


def _is_ray(pid: int, ray_dir: str) -> bool:
    """A process of Ray's: a binary or Python file from Ray's package, or a ``ray::`` worker."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read().decode("utf-8", "replace")
    except OSError:
        return False
    if cmd.startswith("ray::") or ray_dir in cmd:
        return True
    try:
        return os.readlink(f"/proc/{pid}/exe").startswith(ray_dir)
    except OSError:
        return False


def _descendants(roots: set[int], table: dict[int, tuple[int, int]]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), list(roots)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _record(known: dict[int, int], roots: set[int], ray_dir: str) -> None:
    """Add the Ray processes under ``roots`` (and under the ones known) to ``known`` (pid -> start)."""
    table = _processes()
    alive = {pid for pid, start in known.items() if table.get(pid, (0, -1))[1] == start}
    for pid in _descendants(roots | alive, table):
        if pid not in known and pid != os.getpid() and _is_ray(pid, ray_dir):
            known[pid] = table[pid][1]


def _kill_all(known: dict[int, int], ray_dir: str) -> int:
    """SIGKILL every known process still running (and Ray processes under them) until none is
    left; returns how many were killed."""
    killed = 0
    for _ in range(20):
        _record(known, set(), ray_dir)
        live = [pid for pid, start in known.items() if (_stat(pid) or (0, -1))[1] == start]
        if not live:
            break
        for pid in live:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.05)
    return killed


def guard(driver_pid: int, read_fd: int, ray_dir: str) -> None:
    """Record the driver's Ray processes until ``read_fd`` reaches end of file, then kill them."""
    known: dict[int, int] = {}
    while True:
        _record(known, {driver_pid}, ray_dir)
        ready, _, _ = select.select([read_fd], [], [], POLL_S)
        if ready and not os.read(read_fd, 4096):
            break
    _kill_all(known, ray_dir)


class Guard:
    """The driver's side: the guard process and the pipe's write end."""

    def __init__(self, proc: subprocess.Popen, write_fd: int) -> None:
        self.proc, self.write_fd = proc, write_fd

    def stop(self, timeout_s: float = 10.0) -> None:
        """After ``ray.shutdown()``: the guard kills whatever of this Ray is left, and exits."""
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass


def start(ray_dir: str | None = None) -> Guard | None:
    """Start the guard for this process's local Ray (before ``ray.init``); None where there is
    no ``/proc`` (not Linux)."""
    if not os.path.isdir("/proc/self"):
        return None
    if ray_dir is None:
        import ray

        ray_dir = os.path.dirname(os.path.abspath(ray.__file__))
    read_fd, write_fd = os.pipe()  # both non-inheritable
    try:
        proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), str(os.getpid()), str(read_fd), ray_dir],
            pass_fds=(read_fd,), start_new_session=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    except OSError:
        os.close(write_fd)
        return None
    finally:
        os.close(read_fd)
    return Guard(proc, write_fd)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the driver
    guard(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
