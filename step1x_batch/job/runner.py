"""Run one dataset-editing job: plan, stream the Ray graph, write the row log part by part, summarise.

Resume rules (the same for a re-run after a crash and for a nightly incremental run):

* A row is *done* when its id's latest ``ok`` record has the row's ``fingerprint``, or when the
  id's deciding (latest) record is an ``error`` with that fingerprint and a final error type
  (anything not in ``runtime.retry_error_types``; by default only ``read_failed``,
  ``write_failed`` and ``edit_failed`` are retried). Done rows are not processed and get no new
  record: their one record is the earlier run's, so the union of all runs' logs holds exactly one
  deciding record per row. ``summary.json`` counts them as ``skipped``. The decision runs on the
  cluster against the root's compacted row state (:mod:`step1x_batch.rows.state`,
  :mod:`step1x_batch.job.skip`): parts no state covers (a killed run's) are folded in when a run
  starts, this run's parts when it ends.
* The driver writes the log itself, streaming the graph's output: a part lands every
  ``runtime.log_part_rows`` rows or ``runtime.log_part_seconds`` seconds, as one whole object under
  a name no other run or restart can reuse. A driver killed mid-run loses only the records still
  in its buffer; those rows (and rows in flight) have no record, so the next run redoes them and
  overwrites their output objects with the same bytes. A row with a landed ``ok`` record is never
  redone, and its output object was fully written before the record existed.

The driver runs in named steps (docs/architecture.md): :func:`prepare` (adapters pinned, config
snapshot, log writer), :func:`start` (Ray, actor plan, compaction, skip), :func:`stream` (the
graph into the log, progress, stop conditions, compaction of this run's parts), :func:`finish`
(summary) and :func:`publish` (report, console). The lease is an argument, never looked up.
"""

from __future__ import annotations

import collections
import datetime as _dt
import json
import math
import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import pyarrow as pa

import step1x_batch
from step1x_batch import errors
from step1x_batch.errors import JobRefused
from step1x_batch.io import storage
from step1x_batch.io.storage import StorageOptions, is_local, join_uri, write_bytes
from step1x_batch.io import weights
from step1x_batch.job import console, export, ray_guard, report, stages
from step1x_batch.job import lease as leases
from step1x_batch.judge.config import unmet_resources
from step1x_batch.judge.scores import ScoreWriter
from step1x_batch.judge.stage import InlineJudge, split_judged
from step1x_batch.job.config import JobConfig, config_to_yaml, load_config
from step1x_batch.job.console import format_rate, plural
from step1x_batch.job.counters import make_counters
from step1x_batch.job.entrypoint import check_lease_and_run, exit_status, job_main
from step1x_batch.job.preflight import Preflight
from step1x_batch.rows import state as rowstate
from step1x_batch.rows.log import PartWriter, log_dir, log_part_bytes


@dataclass
class RunSummary:
    """What a run did. ``ok`` is False when the error budget was exceeded (exit status 1)."""

    run_id: str
    ok: bool
    rows_read: int
    rows_processed: int
    rows_skipped: int
    by_status: dict[str, int]
    by_error_type: dict[str, int]
    error_fraction: float
    max_error_fraction: float
    wall_s: float
    rows_per_s: float
    stage_ms: dict[str, float]
    storage_retries: int
    log_parts: int
    output_uri: str
    paths: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    rows_skipped_error: int = 0  # rows skipped as done whose deciding record is an error
    rows_retried: int = 0  # rows processed that had a record before this run (attempt > 1)
    retried_still_failing: dict[str, int] = field(default_factory=dict)  # of those, errors by type

    def line(self) -> str:
        errs = ", ".join(f"{k} {v}" for k, v in sorted(self.by_error_type.items()))
        text = (
            f"run {self.run_id}: {plural(self.rows_processed, 'row')} processed "
            f"({self.by_status.get('ok', 0)} ok, {self.by_status.get('error', 0)} error"
            f"{' [' + errs + ']' if errs else ''}), {self.rows_skipped} skipped as already done, "
            f"in {self.wall_s:.1f} s ({format_rate(self.rows_per_s)} rows/s)"
        )
        if not self.ok:
            text += f" -- FAILED: error fraction {self.error_fraction:.3f} > max {self.max_error_fraction:.3f}"
        return text

    def retried_line(self) -> str | None:
        """``2 retried rows still fail: missing_object 2 (1 now ok)``: what became of the rows
        that had a record before this run (``--retry-errors``, transient errors, changed
        parameters), or None when there were none."""
        if not self.rows_retried:
            return None
        failing = sum(self.retried_still_failing.values())
        now_ok = self.rows_retried - failing
        if not failing:
            return f"{plural(self.rows_retried, 'retried row')} now ok"
        types = ", ".join(f"{k} {v}" for k, v in sorted(self.retried_still_failing.items()))
        verb = "fails" if failing == 1 else "fail"
        return f"{plural(failing, 'retried row')} still {verb}: {types} ({now_ok} now ok)"


# ---------------------------------------------------------------------------------------------
# The row log writer (driver side).


class LogWriter(PartWriter):
    """The row log's writer: whole Parquet parts under ``logs/<run_id>/``
    (:class:`~step1x_batch.rows.log.PartWriter`'s rules: a token in part names, the lease asked
    before each part)."""

    def __init__(self, output_uri: str, run_id: str, options: StorageOptions | None,
                 part_rows: int, part_seconds: float, confirm: Callable[[], bool] | None = None) -> None:
        super().__init__(log_dir(output_uri, run_id), options, part_rows, part_seconds, log_part_bytes,
                         confirm=confirm)
        self.output_uri, self.run_id = output_uri, run_id


class Tally:
    """Streaming counts, rows finished per second of the run (the report's throughput chart),
    plus a bounded sample of records for the report (errors first)."""

    def __init__(self, sample_rows: int, started: _dt.datetime | None = None) -> None:
        self.by_status: collections.Counter[str] = collections.Counter()
        self.by_error_type: collections.Counter[str] = collections.Counter()
        self.stage_ms: collections.Counter[str] = collections.Counter()
        self.sample_rows = sample_rows
        self.errors: list[dict[str, Any]] = []
        self.oks: list[dict[str, Any]] = []
        self.started = started or _dt.datetime.now(_dt.timezone.utc)
        self.finished_per_s: dict[str, collections.Counter[int]] = {
            "ok": collections.Counter(), "error": collections.Counter()}
        self.retried = 0  # rows with an earlier record (attempt > 1)
        self.retried_errors: collections.Counter[str] = collections.Counter()
        self.set_rows: collections.Counter[str] = collections.Counter()  # by adapter set ("" the base)
        self.set_edit_ms: collections.Counter[str] = collections.Counter()

    def add(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        names = ["status", "error_type", "preprocess_ms", "edit_ms", "write_ms", "finished_at"]
        cols = table.select(names + [c for c in ("attempt",) if c in table.column_names]).to_pydict()
        self.by_status.update(cols["status"])
        self.by_error_type.update(e for e in cols["error_type"] if e)
        attempts = cols.get("attempt") or [None] * table.num_rows
        for status, error_type, attempt in zip(cols["status"], cols["error_type"], attempts):
            if attempt is not None and attempt > 1:
                self.retried += 1
                if status == "error":
                    self.retried_errors[error_type or "unknown"] += 1
        for stage in ("preprocess_ms", "edit_ms", "write_ms"):
            self.stage_ms[stage.removesuffix("_ms")] += sum(v for v in cols[stage] if v is not None)
        if "adapters" in table.column_names:  # rows edited per set (an unknown set's row is no set's)
            for name, ms, status in zip(table.column("adapters").to_pylist(), cols["edit_ms"], cols["status"]):
                if status == "ok":
                    self.set_rows[name or ""] += 1
                    self.set_edit_ms[name or ""] += ms or 0.0
        for status, finished in zip(cols["status"], cols["finished_at"]):
            if status in self.finished_per_s and finished is not None:
                second = int(max((finished - self.started).total_seconds(), 0.0))
                self.finished_per_s[status][second] += 1
        want_err = self.sample_rows - len(self.errors)
        want_ok = self.sample_rows - len(self.oks)
        if want_err > 0 or want_ok > 0:
            for rec in table.to_pylist():
                if rec["status"] == "error" and len(self.errors) < self.sample_rows:
                    self.errors.append(rec)
                elif rec["status"] == "ok" and len(self.oks) < self.sample_rows:
                    self.oks.append(rec)

    @property
    def processed(self) -> int:
        return sum(self.by_status.values())

    def sample(self) -> list[dict[str, Any]]:
        return (self.errors + self.oks)[: self.sample_rows]

    def timeline(self, wall_s: float, max_buckets: int = 60) -> dict[str, Any]:
        """Rows finished per bucket of the run (at most ``max_buckets`` buckets of whole seconds)."""
        last = max([wall_s, *(float(k) + 1 for c in self.finished_per_s.values() for k in c)])
        bucket = max(1, math.ceil(last / max_buckets))
        n = max(1, math.ceil(last / bucket))
        series = {}
        for status, counts in self.finished_per_s.items():
            values = [0] * n
            for second, count in counts.items():
                values[min(second // bucket, n - 1)] += count
            series[status] = values
        return {"bucket_s": float(bucket), **series}


# ---------------------------------------------------------------------------------------------
# Ray set-up.


def _package_root() -> str | None:
    """The folder holding ``step1x_batch`` when it runs from a source tree (not pip-installed)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(step1x_batch.__file__)))
    return None if "site-packages" in root or "dist-packages" in root else root


def ray_address(cfg: JobConfig) -> str:
    """Which Ray the job runs on: ``resources.ray_address`` when set (``auto``, an address, or
    ``local``), else ``$RAY_ADDRESS`` (what ``ray job submit`` and KubeRay set for a driver:
    joining that cluster is the point of submitting there), else ``local``: a private local Ray
    of this process. Never a cluster found on the host by chance (Ray's own default joins the
    last ``ray start`` on the machine, then refuses ``num_cpus``)."""
    return cfg.resources.ray_address or os.environ.get("RAY_ADDRESS") or "local"


_guard: ray_guard.Guard | None = None  # the watchdog of the local Ray this process started


def init_ray(cfg: JobConfig) -> bool:
    """Connect to a cluster (:func:`ray_address`) or start a private local Ray, which a watchdog
    ties to this process's life (:mod:`step1x_batch.job.ray_guard`: a killed driver leaves no Ray
    process behind).

    Returns True when this call started or connected Ray (and so should shut it down).
    """
    return start_ray(ray_address(cfg), cfg.resources.local_num_cpus)


def start_ray(address: str, local_num_cpus: int | None = None) -> bool:
    """:func:`init_ray` for a job without an edit config (``score``): ``address`` as
    :func:`ray_address` resolves it."""
    import ray

    global _guard
    if ray.is_initialized():
        return False
    if address != "local":
        ray.init(address=address, log_to_driver=True)
        return True
    env: dict[str, Any] = {}
    root = _package_root()
    if root:  # workers must import step1x_batch from the same source tree
        path = os.environ.get("PYTHONPATH", "")
        env["env_vars"] = {"PYTHONPATH": root + (os.pathsep + path if path else "")}
    _guard = ray_guard.start()
    try:
        ray.init(
            address="local",
            # At least 2 CPU slots (logical, not cores): one for the edit actor, one for I/O tasks.
            num_cpus=local_num_cpus or max(2, os.cpu_count() or 1),
            include_dashboard=False,
            runtime_env=env or None,
            log_to_driver=True,
        )
    except BaseException:
        _stop_guard()
        raise
    return True


def _stop_guard() -> None:
    global _guard
    if _guard is not None:
        _guard.stop()
        _guard = None


# ---------------------------------------------------------------------------------------------
# The job.


def run_paths(cfg: JobConfig) -> dict[str, str]:
    out, run_id = cfg.output.uri, cfg.runtime.run_id
    run_dir = join_uri(out, f"runs/{run_id}")
    return {
        "outputs": join_uri(out, "images") + "/",
        "log": join_uri(out, f"logs/{run_id}") + "/",
        "config": join_uri(run_dir, "config.yaml"),
        "summary": join_uri(run_dir, "summary.json"),
        "report": join_uri(run_dir, "report.html"),
        "ray_stats": join_uri(run_dir, "ray_stats.txt"),
        "ray_log": join_uri(run_dir, "ray.log"),
    }


def _print(msg: str, *, err: bool = False) -> None:
    print(msg, file=sys.stderr if err else sys.stdout, flush=True)


class JobStopped(JobRefused):
    """The run stopped before its rows were done, for one stated reason (the model failed to
    load in an edit actor, the lease was lost); the rows it finished are logged."""


_MAX_RAY_LOG_BYTES = 64 * 1024 * 1024  # the tail of a longer ray.log is kept


def _local_ray_log(paths: dict[str, str]) -> tuple[str, bool]:
    """Where Ray's output goes during the run: the run folder itself when it is local, else a
    temporary file uploaded at the end. Returns (path, uploaded at the end)."""
    if is_local(paths["ray_log"]):
        return paths["ray_log"].removeprefix("file://"), False
    fd, path = tempfile.mkstemp(prefix="step1x-ray-", suffix=".log")
    os.close(fd)
    return path, True


def _upload_ray_log(local: str, uri: str, options: StorageOptions | None) -> None:
    try:
        size = os.path.getsize(local)
        with open(local, "rb") as f:
            f.seek(max(0, size - _MAX_RAY_LOG_BYTES))
            write_bytes(uri, f.read(), options)
    except OSError:
        pass  # diagnostics only
    finally:
        try:
            os.unlink(local)
        except OSError:
            pass


class _Consumer(threading.Thread):
    """Streams the graph's output into the log writer and the tally (the main thread keeps the
    progress line, the lease and the actors' health); with a judge in the graph, the scores into
    the scores writer."""

    def __init__(self, ds: Any, writer: "LogWriter", tally: Tally, lease: leases.Lease | None,
                 scores: ScoreWriter | None = None) -> None:
        super().__init__(name="log-consumer", daemon=True)
        self.ds, self.writer, self.tally, self.lease, self.scores = ds, writer, tally, lease, scores
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for batch in self.ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=1):
                if self.lease is not None and self.lease.lost.is_set():
                    return  # another run owns the root now: its records, not ours
                if self.scores is not None:
                    batch, scored = split_judged(batch)
                    self.scores.add(scored)
                self.writer.add(batch)
                self.tally.add(batch)
                if self.stop.is_set():
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            self.error = e
        finally:
            if self.lease is None or not self.lease.lost.is_set():
                try:
                    self.writer.flush()  # records of finished rows are good records, even if the graph failed
                    if self.scores is not None:
                        self.scores.flush()
                except BaseException as e:  # noqa: BLE001
                    self.error = self.error or e


def _shutdown_ray() -> None:
    """Stop the Ray this driver started, and keep it stopped: a Ray call left in another thread
    (an iterator's cleanup) must not start a second local Ray, with its console noise."""
    import ray
    from ray._private import auto_init_hook

    auto_init_hook.enable_auto_connect = False
    ray.shutdown()
    _stop_guard()  # whatever of the local Ray outlived the shutdown goes now


def stop_ray() -> None:
    """Stop the Ray :func:`start_ray` started (for a job that is not an edit run: ``score``)."""
    _shutdown_ray()


def _num_rows(table: Any) -> int:
    return 0 if table is None else table.num_rows


def _rows_in(refs: list[Any]) -> int:
    """How many rows the candidate tables hold, counted where they are (small ints come back)."""
    import ray

    if not refs:
        return 0
    count = ray.remote(num_cpus=0)(_num_rows)
    return sum(ray.get([count.remote(ref) for ref in refs]))


def _poll(counters: Any, timeout_s: float = 5.0) -> dict[str, Any]:
    import ray

    try:
        return ray.get(counters.status.remote(), timeout=timeout_s)
    except Exception:  # a slow poll skips one progress update
        return {}


@dataclass
class _Run:
    """One run's state, handed from step to step: :func:`prepare`, :func:`start`, :func:`stream`,
    :func:`finish`, :func:`publish` (docs/architecture.md)."""

    cfg: JobConfig
    lease: leases.Lease
    paths: dict[str, str]
    writer: LogWriter
    tally: Tally
    notes: list[str]
    manifest_rows: int | None
    clock_start: float  # time.monotonic() when the run began
    started_at: _dt.datetime
    driver_retries: int  # storage retries of this process before the run
    ray_log: str
    upload_log: bool  # ray_log is a temporary file, uploaded at the end
    plan: stages.ActorPlan | None = None
    counters: Any = None  # the run's counters actor (a Ray actor handle)
    state: rowstate.CompactResult | None = None  # the row state as the run starts
    candidates: list[Any] | None = None  # the skip join's result (None: no state, every row is work)
    consumer: "_Consumer | None" = None
    judge: InlineJudge | None = None  # scoring inside the graph (``run`` with a ``judge:`` section)
    scores: ScoreWriter | None = None
    stopped: str | None = None  # why the run stopped early (an actor's fatal error, "lease")
    counters_snapshot: dict[str, float] = field(default_factory=dict)
    ray_stats: str = ""
    compaction_s: float | None = None
    compaction_retries: int = 0


def run_job(cfg: JobConfig, facts: Preflight | None = None, lease: leases.Lease | None = None,
            judge: InlineJudge | None = None) -> RunSummary:
    """Run the job a config describes; show one progress line, print the summary and where
    everything is. ``facts`` are the pre-flight checks' findings (the manifest's row count).

    Holds the output root's lease for the run, unless the caller passes the one it holds
    (:func:`~step1x_batch.job.entrypoint.check_lease_and_run` and the recipes do).
    Returns the summary; ``summary.ok`` is False (and a loud message is printed) when the share of
    error rows exceeded ``runtime.max_error_fraction``. Raises :class:`JobStopped` (exit status 2)
    when the model fails to load in an edit actor or another run took the lease over. ``judge``:
    each edit is scored as it lands, in the same graph on the judge's own actors.
    """
    if lease is not None:
        return _run_leased(cfg, facts, lease, judge)
    with leases.held(cfg.output.uri, cfg.output_storage(), cfg.runtime.run_id,
                     ttl_s=cfg.runtime.lease_ttl_s, allow_unlocked=cfg.runtime.allow_unlocked,
                     say=lambda m: _print(m, err=True)) as held:
        return _run_leased(cfg, facts, held, judge)


def _run_leased(cfg: JobConfig, facts: Preflight | None, lease: leases.Lease,
                judge: InlineJudge | None = None) -> RunSummary:
    run = prepare(cfg, facts, lease)
    if judge is not None:
        run.judge = judge
        run.scores = ScoreWriter(cfg.output.uri, cfg.runtime.run_id, cfg.output_storage(),
                                 judge.config.score_part_rows, judge.config.score_part_seconds,
                                 confirm=lease.confirm)
    rt = cfg.runtime
    with console.ray_output(run.ray_log, verbose=rt.verbose, interval_s=rt.progress_seconds) as con:
        started = init_ray(cfg)
        try:
            if start(run, con):
                stream(run, con)
            if not run.stopped:
                _export_dataset(run, con)
        finally:
            _end_ray(run, started)
    summary, payload = finish(run)
    publish(run, summary, payload)
    return summary


def pin_adapters(cfg: JobConfig) -> JobConfig:
    """``cfg`` with its adapters' content digests pinned (:func:`step1x_batch.io.weights.pin_adapters`):
    the driver's first step, and the recipes' before they derive the model id."""
    weights.pin_adapters(cfg.model.adapters, cfg.weights_source())
    for adapters in cfg.model.adapter_sets.values():
        weights.pin_adapters(adapters, cfg.weights_source())
    return cfg


def prepare(cfg: JobConfig, facts: Preflight | None, lease: leases.Lease) -> _Run:
    """Before Ray: the adapters pinned, the config snapshot written, the log writer (which asks
    the lease before each part) and the tally made."""
    clock_start = time.monotonic()
    started_at = _dt.datetime.now(_dt.timezone.utc)
    driver_retries = storage.retry_count()  # the driver's own reads and writes (logs, snapshot)
    paths = run_paths(cfg)
    out_opts, rt = cfg.output_storage(), cfg.runtime
    pin_adapters(cfg)
    write_bytes(paths["config"], config_to_yaml(cfg).encode(), out_opts)
    notes = [note for note in (lease.took_over and f"took over the lease from {lease.took_over}", lease.note)
             if note]
    writer = LogWriter(cfg.output.uri, rt.run_id, out_opts, rt.log_part_rows, rt.log_part_seconds,
                       confirm=lease.confirm)
    ray_log, upload_log = _local_ray_log(paths)
    return _Run(cfg=cfg, lease=lease, paths=paths, writer=writer, tally=Tally(rt.report_max_rows, started_at),
                notes=notes, manifest_rows=getattr(facts, "manifest_rows", None), clock_start=clock_start,
                started_at=started_at, driver_retries=driver_retries, ray_log=ray_log, upload_log=upload_log)


def start(run: _Run, con: console.Console) -> bool:
    """On Ray: plan the actors, fold earlier runs' records into the state, run the skip. False
    when no row is left to do: such a run starts no edit actor and loads no model (issue 17.6)."""
    import ray
    from ray.data import DataContext

    cfg, rt = run.cfg, run.cfg.runtime
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = rt.progress_bars and rt.verbose
    ctx.print_on_execution_start = rt.verbose
    run.plan = stages.plan_actors(cfg, ray.cluster_resources())
    if run.plan.note:
        run.notes.append(run.plan.note)
        con.say(f"note: {run.plan.note}", err=True)
    if run.judge is not None:  # its actors must fit beside the edit actors, or Ray waits forever
        unmet = unmet_resources(run.judge.config, ray.cluster_resources(),
                                edit_gpus=run.plan.min_size * run.plan.num_gpus,
                                edit_cpus=run.plan.min_size * run.plan.num_cpus)
        if unmet:
            raise JobRefused(unmet)
    run.counters = make_counters()
    run.state = _compact_before(run, con)
    # None without a state: a first run streams the manifest straight into the graph.
    pointer = run.state.pointer
    run.candidates = None if pointer is None else stages.skip_candidates(cfg, pointer, run.counters)
    if run.candidates is not None and _rows_in(run.candidates) == 0:
        _show_nothing_left(run, con)
        return False
    return True


def _compact_before(run: _Run, con: console.Console) -> rowstate.CompactResult:
    """Records no state holds yet (a killed run's) are folded in first, on the cluster."""
    cfg = run.cfg
    uri, opts, run_id = cfg.output.uri, cfg.output_storage(), cfg.runtime.run_id
    try:
        state = rowstate.compact(uri, opts, tasks=rowstate.RayTasks(), run_id=run_id)
    except rowstate.StateError as e:  # derived data: rebuilt from the logs
        run.notes.append(f"{e}; rebuilt it from the logs")
        con.say(f"warning: {e}; rebuilding it from the logs", err=True)
        state = rowstate.compact(uri, opts, tasks=rowstate.RayTasks(), run_id=run_id, rebuild=True)
    run.compaction_retries = state.storage_retries
    if state.compacted:
        con.say(state.line(), err=True)
    return state


def _show_nothing_left(run: _Run, con: console.Console) -> None:
    run.counters_snapshot = (_poll(run.counters).get("values") or {})
    progress = console.RunProgress(
        run_id=run.cfg.runtime.run_id, elapsed_s=time.monotonic() - run.clock_start,
        skipped=int(run.counters_snapshot.get("rows_skipped_done", 0)), manifest_rows=run.manifest_rows)
    con.progress(console.progress_line(progress, 0.0), final=True)


def stream(run: _Run, con: console.Console) -> None:
    """Stream the graph's output into the log (a consumer thread) while this thread keeps the
    progress line, the lease and the actors' health; then fold this run's parts into the state."""
    cfg = run.cfg
    ds = stages.build_dataset(cfg, state=run.state.pointer, counters=run.counters, plan=run.plan,
                              candidates=run.candidates, judge=run.judge)
    run.consumer = consumer = _Consumer(ds, run.writer, run.tally, run.lease, run.scores)
    consumer.start()
    run.stopped = _follow(run, con, consumer)
    if run.stopped:
        con.end_progress()
        # Ray Data ends the graph itself once its actors have died (or, for a lost lease, at the
        # next batch the consumer refuses); shutting Ray down under a live iterator races its
        # cleanup (a second local Ray, or a crash in Ray's core worker).
        consumer.join(timeout=60)
        return
    if consumer.error is not None:
        status = _poll(run.counters)
        if not status.get("fatal"):
            raise consumer.error
        run.stopped = status["fatal"]  # the actors died of it before the poll saw it
    run.counters_snapshot = (_poll(run.counters).get("values") or {})
    try:
        run.ray_stats = ds.stats()
    except Exception:  # stats are diagnostics only
        run.ray_stats = ""
    if run.writer.parts:  # this run's records join the state while the cluster is up
        _compact_after(run)


def _follow(run: _Run, con: console.Console, consumer: _Consumer) -> str | None:
    """The progress line, once a second, until the graph ends; why the run must stop early (an
    actor's fatal error, ``"lease"`` when the lease was lost), or None."""
    rate = console.RateMeter()
    while consumer.is_alive():
        consumer.join(timeout=1.0)
        status = _poll(run.counters)
        progress = _progress(run, status)
        con.progress(console.progress_line(progress, rate.add(time.monotonic(), progress.done)),
                     final=not consumer.is_alive())
        stopped = status.get("fatal") or ("lease" if run.lease.lost.is_set() else None)
        if stopped:
            consumer.stop.set()
            return stopped
    return None


def _progress(run: _Run, status: dict[str, Any]) -> console.RunProgress:
    now = time.time()
    states = tuple((st, now - since) for st, since in (status.get("states") or {}).values())
    return console.RunProgress(
        run_id=run.cfg.runtime.run_id, elapsed_s=time.monotonic() - run.clock_start,
        ok=run.tally.by_status.get("ok", 0), error=run.tally.by_status.get("error", 0),
        skipped=int((status.get("values") or {}).get("rows_skipped_done", 0)),
        manifest_rows=run.manifest_rows, actor_states=states, actors_planned=run.plan.min_size)


def _compact_after(run: _Run) -> None:
    cfg = run.cfg
    try:
        compacted = rowstate.compact(cfg.output.uri, cfg.output_storage(), run_id=cfg.runtime.run_id,
                                     tasks=rowstate.RayTasks())
        run.compaction_s = compacted.seconds
        run.compaction_retries += compacted.storage_retries
    except Exception as e:  # the logs are complete; the next start folds them in
        run.notes.append(errors.redact(f"the row state was not compacted ({type(e).__name__}: "
                                       f"{e}); the next run folds this run's log parts in"))


def _export_dataset(run: _Run, con: console.Console) -> None:
    """The results as a dataset (``output.dataset`` / ``output.webdataset``), while the cluster
    is up; a no-op rerun exports too (a flag just turned on, a shard a killed export left)."""
    try:
        result = export.export_for(run.cfg, tasks=rowstate.RayTasks(), lease=run.lease)
    except leases.LeaseLost:
        raise
    except Exception as e:  # the logs are complete; the next run's export finishes it
        run.notes.append(errors.redact(f"the dataset export failed ({type(e).__name__}: {e}); "
                                       "the next run finishes it"))
        con.say(f"warning: {run.notes[-1]}", err=True)
        return
    if result is not None:
        for line in result.warnings:
            con.say(line, err=True)
        con.say(result.line(), err=True)


def _end_ray(run: _Run, started: bool) -> None:
    """Stop the Ray this run started; a stopped run's consumer is joined while Ray's output still
    goes to ray.log (whatever the graph prints as it ends)."""
    if started:
        _shutdown_ray()
    if run.stopped:
        run.consumer.join(timeout=30 if started else 180)


def finish(run: _Run) -> tuple[RunSummary, dict[str, Any]]:
    """After Ray: ray.log uploaded, the summary counted and written (``summary.json``,
    ``ray_stats.txt``). Raises LeaseLost or :class:`JobStopped` for a run that stopped early."""
    paths, out_opts = run.paths, run.cfg.output_storage()
    if run.upload_log:
        _upload_ray_log(run.ray_log, paths["ray_log"], out_opts)
    if run.stopped == "lease":
        run.lease.check()  # raises LeaseLost with the sentence
    if run.stopped:
        run.notes.append(run.stopped)
    wall = time.monotonic() - run.clock_start
    summary = _summary(run, wall)
    if run.ray_stats:
        write_bytes(paths["ray_stats"], run.ray_stats.encode(), out_opts)
    payload = _summary_document(run, summary, wall)
    write_bytes(paths["summary"], (json.dumps(payload, indent=2) + "\n").encode(), out_opts)
    if run.stopped:
        raise JobStopped(f"{run.stopped}; the run stopped (its finished rows are logged, see {paths['ray_log']})")
    return summary, payload


def _summary(run: _Run, wall: float) -> RunSummary:
    tally, snapshot, rt = run.tally, run.counters_snapshot, run.cfg.runtime
    processed = tally.processed
    skipped = int(snapshot.get("rows_skipped_done", 0))
    skipped_errors = int(snapshot.get("rows_skipped_error", 0))
    fraction = error_fraction(tally.by_status.get("error", 0), processed, skipped, skipped_errors)
    stage_ms = {"normalise": round(snapshot.get("normalise_ms", 0.0), 1)}
    stage_ms.update({k: round(v, 1) for k, v in tally.stage_ms.items()})
    return RunSummary(
        run_id=rt.run_id,
        ok=fraction <= rt.max_error_fraction and not run.stopped,
        rows_read=int(snapshot.get("rows_read", 0)),
        rows_processed=processed,
        rows_skipped=skipped,
        by_status=dict(tally.by_status),
        by_error_type=dict(sorted(tally.by_error_type.items())),
        error_fraction=round(fraction, 6),
        max_error_fraction=rt.max_error_fraction,
        wall_s=round(wall, 3),
        rows_per_s=round(processed / wall, 3) if wall > 0 else 0.0,
        stage_ms=stage_ms,
        storage_retries=(int(snapshot.get("storage_retries", 0)) + run.compaction_retries
                         + storage.retry_count() - run.driver_retries),
        log_parts=len(run.writer.parts),
        output_uri=run.cfg.output.uri,
        paths=run.paths,
        notes=run.notes,
        rows_skipped_error=skipped_errors,
        rows_retried=tally.retried,
        retried_still_failing=dict(sorted(tally.retried_errors.items())),
    )


def _summary_document(run: _Run, summary: RunSummary, wall: float) -> dict[str, Any]:
    """``summary.json``: the summary, the run's status and times, and the report's series."""
    processed = summary.rows_processed
    payload = asdict(summary)
    payload["status"] = "stopped" if run.stopped else "succeeded" if summary.ok else "failed"
    payload["started_at"] = run.started_at.isoformat(timespec="seconds")
    payload["finished_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    payload["model_id"] = run.cfg.family().model_id()
    payload["manifest"] = run.cfg.input.manifest
    payload["manifest_rows"] = run.manifest_rows
    payload["stage_ms_per_row"] = {
        k: round(v / processed, 3) if processed else 0.0 for k, v in summary.stage_ms.items()
    }
    payload["timeline"] = run.tally.timeline(wall)
    payload["state_compaction_s"] = None if run.compaction_s is None else round(run.compaction_s, 3)
    if run.cfg.model.adapter_sets:  # rows and GPU time per set ("" the base model), switches made
        payload["adapter_sets"] = {name: {"rows": n, "edit_s": round(run.tally.set_edit_ms[name] / 1e3, 3)}
                                   for name, n in sorted(run.tally.set_rows.items())}
        payload["adapter_switches"] = int(run.counters_snapshot.get("adapter_switches", 0))
        payload["adapter_switch_s"] = round(run.counters_snapshot.get("adapter_switch_ms", 0.0) / 1e3, 3)
    return payload


def publish(run: _Run, summary: RunSummary, payload: dict[str, Any]) -> None:
    """The report (``report.html``) and the console's summary, paths and verdict."""
    cfg, rt = run.cfg, run.cfg.runtime
    try:
        report.write_report(
            payload, run.tally.sample()[: rt.report_max_rows], run.paths["report"],
            input_storage=cfg.input.storage, output_storage=cfg.output_storage(), max_pixels=rt.max_pixels,
            scores_root=cfg.output.uri,
        )
    except Exception as e:  # the report is for people; a failure there must not hide the result
        _print(f"warning: could not write the report: {type(e).__name__}: {e}", err=True)
    _print_summary(summary, rt.max_error_fraction)


def _print_summary(summary: RunSummary, max_error_fraction: float) -> None:
    _print(summary.line())
    retried = summary.retried_line()
    if retried:
        _print(retried)
    for name in ("outputs", "log", "summary", "report"):
        _print(f"  {name + ':':9} {summary.paths[name]}")
    if summary.ok:
        return
    skipped, skipped_errors = summary.rows_skipped, summary.rows_skipped_error
    rows, errs = summary.rows_processed + skipped, summary.by_status.get("error", 0) + skipped_errors
    fraction = error_fraction(summary.by_status.get("error", 0), summary.rows_processed, skipped, skipped_errors)
    earlier = f" ({skipped_errors} of them from earlier runs)" if skipped_errors else ""
    _print(
        f"FAILED: {errs} of {plural(rows, 'row')} are errors{earlier} ({fraction:.1%}), more than "
        f"runtime.max_error_fraction={max_error_fraction:g}; see {summary.paths['report']}",
        err=True,
    )


def error_fraction(errors_now: int, processed: int, skipped: int, skipped_errors: int) -> float:
    """The share of error rows among the rows of the manifest after this run: the rows this run
    processed with their new outcome, and the rows skipped as done with their earlier one. So the
    same manifest and root give the same verdict however they were reached (one run, a resumed
    run, ``--retry-errors`` whose rows still fail, a no-op rerun)."""
    rows = processed + skipped
    return (errors_now + skipped_errors) / rows if rows else 0.0


def run_config(path: str, overrides: Sequence[str] = ()) -> int:
    """Load a config, run the job, and return its exit status (see :mod:`step1x_batch.job.entrypoint`)."""

    def run() -> bool:
        cfg = load_config(path, overrides)
        return check_lease_and_run(cfg, lambda facts, lease: run_job(cfg, facts, lease).ok, job="edit")

    return exit_status(run)


def main(argv: Sequence[str] | None = None) -> int:
    """``python jobs/edit_dataset.py --config X [--set k=v ...]``."""
    return job_main("Edit every row of a manifest on Ray.", run_config, argv)
