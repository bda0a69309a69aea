"""The progress line's arithmetic, the console's two modes, Ray's output kept off the terminal,
and the report's throughput timeline (no Ray: the job-level console is tested end to end in
test_operating.py)."""

from __future__ import annotations

import datetime as _dt
import io
import os
import subprocess
import sys
import textwrap

import pyarrow as pa

from step1x_batch.job.console import Console, RateMeter, RunProgress, progress_line
from step1x_batch.job.runner import Tally


def test_progress_line_counts_eta_and_actors():
    p = RunProgress(run_id="r", elapsed_s=75, ok=400, error=12, skipped=100, manifest_rows=1100,
                    actor_states=(("busy", 3.0), ("ready", 1.0)), actors_planned=2)
    line = progress_line(p, rows_per_s=20.0)
    # 1100 rows, 100 already done: 1000 to do, 412 done, 588 left at 20 rows/s = 29 s
    assert line == ("run r: 412/1000 rows (ok 400, error 12), 100 skipped as done, 20.0 rows/s, "
                    "ETA 0:29, actors 1/2 busy, 1:15")


def test_progress_line_while_the_model_loads_and_without_a_total():
    p = RunProgress(run_id="r", elapsed_s=3700, actor_states=(("staging weights 1.2 GB of 40.0 GB", 65.0),),
                    actors_planned=2)
    line = progress_line(p, rows_per_s=0.0)
    assert line == ("run r: 0 rows (ok 0, error 0), 0.0 rows/s, actors 0/2 busy "
                    "(1 staging weights 1.2 GB of 40.0 GB, 1:05), 1:01:40")


def test_rate_follows_the_last_minute():
    meter = RateMeter(window_s=60)
    assert meter.add(0.0, 0) == 0.0
    meter.add(100.0, 0)  # a slow start (model load) ...
    rate = 0.0
    for t in range(101, 200):
        rate = meter.add(float(t), (t - 100) * 10)  # ... then 10 rows/s
    assert abs(rate - 10.0) < 0.2


class FakeClock:
    """A monotonic clock the test moves by hand (no wall clock, no uptime)."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_console_prints_lines_at_an_interval_when_not_a_terminal():
    clock = FakeClock(5.0)  # a machine booted 5 s ago: monotonic() is the uptime on Linux
    out = io.StringIO()
    con = Console(out, out, interval_s=3600, clock=clock)
    con.progress("first")  # printed: the first one, whatever the clock reads
    clock.now += 3599
    con.progress("second")  # within the interval: not printed
    con.say("note")
    clock.now += 1
    con.progress("third")  # the interval has passed: printed
    clock.now += 10
    con.progress("fourth")  # not printed
    con.progress("last", final=True)  # the final line always is
    con.end_progress()  # a stopped run leaves its last line on the screen, which is there already
    assert out.getvalue().splitlines() == ["first", "note", "third", "last"]


def test_console_first_line_at_clock_zero():
    """A clock reading less than the interval (a freshly booted machine, or a clock that starts
    at 0) must not swallow the first line."""
    out = io.StringIO()
    con = Console(out, out, interval_s=30, clock=FakeClock(0.0))
    con.progress("first")
    assert out.getvalue() == "first\n"


def test_console_rewrites_one_line_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Tty()
    con = Console(out, out)
    con.progress("rows 1 of 10")
    con.progress("rows 2")
    con.say("a note")
    assert out.getvalue() == "\rrows 1 of 10\rrows 2      \na note\n"


def test_ray_output_keeps_everything_a_process_prints_off_the_terminal(tmp_path):
    """C-level writes to fds 1 and 2, Python warnings and logging all land in the log file; the
    Console still reaches the real stdout."""
    script = textwrap.dedent(f"""
        import logging, os, sys, warnings
        from step1x_batch.job.console import ray_output
        logging.basicConfig()
        with ray_output({str(tmp_path / "ray.log")!r}) as con:
            os.write(1, b"C-level stdout\\n")
            os.write(2, b"C-level stderr\\n")
            print("python print")
            warnings.warn("a warning")
            logging.getLogger("ray").warning("a ray warning")
            con.progress("progress 1/1", final=True)
            con.say("summary line")
        print("after")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["progress 1/1", "summary line", "after"]
    assert done.stderr == ""
    log = (tmp_path / "ray.log").read_text()
    for text in ("C-level stdout", "C-level stderr", "python print", "a warning", "a ray warning"):
        assert text in log


def test_timeline_buckets_rows_by_when_they_finished():
    start = _dt.datetime(2026, 1, 1, tzinfo=_dt.timezone.utc)
    tally = Tally(0, start)
    ts = pa.timestamp("us", tz="UTC")

    def records(seconds: list[float], status: str) -> pa.Table:
        n = len(seconds)
        return pa.table({"status": [status] * n, "error_type": [None if status == "ok" else "x"] * n,
                         "preprocess_ms": [1.0] * n, "edit_ms": [2.0] * n, "write_ms": [3.0] * n,
                         "finished_at": pa.array([start + _dt.timedelta(seconds=s) for s in seconds], ts)})

    tally.add(records([0.5, 1.2, 1.9, 130.0], "ok"))
    tally.add(records([61.0], "error"))
    line = tally.timeline(wall_s=150.0, max_buckets=60)
    assert line["bucket_s"] == 3.0  # 150 s in at most 60 buckets of whole seconds
    assert len(line["ok"]) == len(line["error"]) == 50
    assert line["ok"][0] == 3 and line["ok"][130 // 3] == 1 and sum(line["ok"]) == 4
    assert line["error"][61 // 3] == 1 and sum(line["error"]) == 1


def _summary(**kw):
    from step1x_batch.job.runner import RunSummary

    base = dict(run_id="r", ok=True, rows_read=1, rows_processed=1, rows_skipped=0, by_status={"ok": 1},
                by_error_type={}, error_fraction=0.0, max_error_fraction=0.1, wall_s=30.0,
                rows_per_s=1 / 30, stage_ms={}, storage_retries=0, log_parts=1, output_uri="/o")
    base.update(kw)
    return RunSummary(**base)


def test_summary_line_says_1_row_and_a_slow_rate_is_not_zero():
    assert _summary().line() == ("run r: 1 row processed (1 ok, 0 error), 0 skipped as already done, "
                                 "in 30.0 s (0.033 rows/s)")
    two = _summary(rows_processed=2, by_status={"ok": 2}, rows_per_s=12.345).line()
    assert "2 rows processed" in two and "(12.3 rows/s)" in two
    assert "(0.0 rows/s)" in _summary(rows_processed=0, by_status={}, rows_per_s=0.0).line()
    p = RunProgress(run_id="r", elapsed_s=60, ok=1, manifest_rows=10)
    assert "0.017 rows/s" in progress_line(p, rows_per_s=1 / 60)


def test_what_became_of_retried_rows_is_said():
    assert _summary().retried_line() is None
    line = _summary(rows_retried=3, retried_still_failing={"missing_object": 2}).retried_line()
    assert line == "2 retried rows still fail: missing_object 2 (1 now ok)"
    assert _summary(rows_retried=1, retried_still_failing={"corrupt_image": 1}).retried_line() == (
        "1 retried row still fails: corrupt_image 1 (0 now ok)")
    assert _summary(rows_retried=2).retried_line() == "2 retried rows now ok"


def test_error_fraction_counts_the_manifests_rows_after_the_run():
    from step1x_batch.job.runner import error_fraction

    # a first run: 2 of 8 rows fail
    assert error_fraction(2, 8, 0, 0) == 0.25
    # --retry-errors of those 2 rows, which still fail: 2 retried + 6 skipped (0 of them errors)
    assert error_fraction(2, 2, 6, 0) == 0.25
    # a no-op rerun: every row skipped, the 2 errors among them
    assert error_fraction(0, 0, 8, 2) == 0.25
    assert error_fraction(0, 0, 0, 0) == 0.0
