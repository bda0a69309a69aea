"""Run inspection without Ray: ``step1x-batch status`` and ``step1x-batch errors``.

Why a separate, Ray-free module: the questions people ask about an output root ("did last
night's run finish?", "which rows failed, and why?", "what of this manifest is still to do?")
must be answered in a second from a laptop, from the files a job leaves behind (docs/architecture.md,
output layout): the row log ``logs/<run_id>/part-*.parquet``, the scores log
``scores/<run_id>/part-*.parquet`` (one line per judge in ``status``), the run files
``runs/<run_id>/config.yaml`` (written when a run starts) and ``runs/<run_id>/summary.json``
(written at its end), and the lease ``_lease.json`` (present while a run writes).

The data functions (:func:`root_status`, :func:`error_rows`, :func:`manifest_check`, ...) return
dataclasses and Arrow tables so tests and scripts can check numbers; the ``format_*`` functions
turn them into text for people; :func:`add_inspection_commands` wires both into the CLI.

Counting rules
    A *row* of the output root is an ``id``; its deciding record is its latest record (by
    ``finished_at``; a record without one counts as oldest; ties go to the later log part): the
    state's own rule, :func:`step1x_batch.rows.state.latest_per_id`. *Done*: that record is ``ok``.
    *Error row*: it is an ``error``. Per run, counts are of records (one per input row the run
    processed, as in its ``summary.json``).

Run states
    ``succeeded`` / ``failed``: the run's ``summary.json`` says so (key ``status``). Without a
    summary, ``running`` when the lease names the run and is fresh (``now - renewed_at <
    ttl_s``), else ``interrupted`` (the driver was killed; re-running the config finishes its
    rows).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import sys
import warnings
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:  # heavy imports stay out of the CLI's start-up
    import pyarrow as pa

    from step1x_batch.io.storage import StorageOptions

__all__ = [
    "InspectionError",
    "LeaseInfo",
    "RunInfo",
    "ManifestCheck",
    "RootStatus",
    "JudgeScores",
    "ERROR_COLUMNS",
    "storage_options",
    "read_lease",
    "read_records",
    "list_runs",
    "manifest_check",
    "root_status",
    "judge_scores",
    "scores_of_edits",
    "scores_by_judge",
    "error_rows",
    "format_status",
    "format_errors_table",
    "write_errors_csv",
    "add_inspection_commands",
]

# Inspection is interactive: a few attempts per request, not a batch job's patience.
_MAX_ATTEMPTS = 3
_CONNECT_TIMEOUT_S = 5.0

SUCCEEDED, FAILED, STOPPED, RUNNING, INTERRUPTED, UNKNOWN = (
    "succeeded", "failed", "stopped", "running", "interrupted", "unknown")

# Log columns the inspection reads (the rest -- timings, sizes -- are not needed here).
_STATUS_COLUMNS = ["id", "fingerprint", "status", "error_type", "run_id", "started_at", "finished_at"]
# Columns of an error row, in CSV order.
ERROR_COLUMNS = (
    "id", "error_type", "error_message", "image_uri", "image_uris", "instruction", "fingerprint",
    "run_id", "attempt", "worker", "model_id", "started_at", "finished_at", "extra",
)


class InspectionError(Exception):
    """Something the user must fix before an output root can be inspected (one sentence; the
    CLI prints it and exits with status 2). The message is redacted."""

    def __init__(self, message: str) -> None:
        from step1x_batch.errors import redact

        super().__init__(redact(message))


# ---------------------------------------------------------------------------------------------
# Data


@dataclass
class LeaseInfo:
    """The lease object on an output root: who writes there now (or did, when stale)."""

    run_id: str | None
    host: str | None
    pid: int | None
    job: str | None
    started_at: _dt.datetime | None
    renewed_at: _dt.datetime | None
    ttl_s: float | None
    age_s: float | None  # seconds since renewed_at (None when the lease does not say)
    fresh: bool  # age_s < ttl_s: its run is alive


@dataclass
class RunInfo:
    """One run under an output root, from its run files and its log records."""

    run_id: str
    state: str  # succeeded | failed | stopped | running | interrupted | unknown (unreadable summary)
    records: int = 0  # log records the run wrote (input rows it processed)
    ok: int = 0
    error: int = 0
    by_error_type: dict[str, int] = field(default_factory=dict)
    started_at: _dt.datetime | None = None  # config.yaml written (else its first record)
    ended_at: _dt.datetime | None = None  # summary.json written; None while none
    last_record_at: _dt.datetime | None = None  # the latest finished_at among its records
    has_config: bool = False
    has_summary: bool = False


@dataclass
class ManifestCheck:
    """A manifest against the row log: which of its rows still need work."""

    manifest_uri: str
    config_run_id: str  # whose config.yaml gave the defaults the fingerprints are computed with
    rows: int  # manifest rows
    ids: int  # distinct ids among them
    done: int  # ids whose latest record is ok with the same fingerprint as now
    error: int  # ids whose latest record is an error (same fingerprint)
    never_attempted: list[str] = field(default_factory=list)  # ids with no record at all
    changed: list[str] = field(default_factory=list)  # ids whose latest record's fingerprint differs


@dataclass
class JudgeScores:
    """One judge's current scores on a root: the deciding score record of each current edit
    (an id's latest ``ok`` record) under that judge id and prompt hash."""

    judge_id: str
    prompt_hash: str
    rows: int  # current edits with a deciding score record by this judge
    ok: int
    errors: dict[str, int]  # error records by type (transient ones included: the next run asks again)
    stats: dict[str, Any]  # judge.scores.summarize: means with bootstrap 95 % intervals, unchanged share


@dataclass
class RootStatus:
    """Everything ``status`` reports about one output root."""

    output_uri: str
    runs: list[RunInfo]  # sorted by run id (time-sortable)
    lease: LeaseInfo | None
    rows: int  # ids with at least one record
    done: int  # ids whose latest record is ok
    error_rows_by_type: dict[str, int]  # ids whose latest record is an error, by error_type
    records: int  # log records in all runs
    manifest: ManifestCheck | None = None
    notes: list[str] = field(default_factory=list)  # unreadable files and the like
    edited: int = 0  # ids with an ok record (a current edit); counted only when the root holds scores
    scores: list[JudgeScores] = field(default_factory=list)  # one per (judge id, prompt hash), by judge id

    @property
    def error_rows(self) -> int:
        return sum(self.error_rows_by_type.values())

    @property
    def last_run(self) -> RunInfo | None:
        return self.runs[-1] if self.runs else None


def storage_options(endpoint_url: str | None = None, region: str | None = None) -> "StorageOptions":
    """Options for inspecting a root: the given endpoint / region (credentials only from the
    environment), and few attempts per request so an unreachable store fails in seconds."""
    from step1x_batch.io.storage import StorageOptions

    return StorageOptions(endpoint_url=endpoint_url or None, region=region or None,
                          max_attempts=_MAX_ATTEMPTS, connect_timeout=_CONNECT_TIMEOUT_S)


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _parse_time(value: Any) -> _dt.datetime | None:
    """An ISO-8601 text, epoch seconds or datetime as an aware UTC datetime (None if unusable)."""
    if value is None or value == "":
        return None
    try:
        if isinstance(value, _dt.datetime):
            t = value
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            t = _dt.datetime.fromtimestamp(float(value), tz=_dt.timezone.utc)
        else:
            text = str(value).strip()
            t = _dt.datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    except (ValueError, OverflowError, OSError):
        return None
    return t.replace(tzinfo=_dt.timezone.utc) if t.tzinfo is None else t.astimezone(_dt.timezone.utc)


def _modified(info: dict[str, Any]) -> _dt.datetime | None:
    """When a listed file / object was last written (fsspec infos differ per store)."""
    for key in ("LastModified", "mtime", "last_modified", "updated", "created"):
        if info.get(key) is not None:
            return _parse_time(info[key])
    return None


def _describe(exc: BaseException, limit: int = 240) -> str:
    """``Type: text`` of an exception on one line, shortened and redacted (fits a sentence)."""
    from step1x_batch.errors import redact

    text = " ".join(str(exc).split()) or "no details"
    return _shorten(redact(f"{type(exc).__name__}: {text}"), limit)


def _check_root(output_uri: str, options: "StorageOptions | None") -> tuple[Any, str]:
    """The root's filesystem and path, or InspectionError when it is absent or unreachable."""
    from step1x_batch.errors import redact_uri
    from step1x_batch.io.storage import filesystem, resolved_endpoint

    shown = redact_uri(output_uri)
    try:
        fs, root = filesystem(output_uri, options)
        fs.ls(root, detail=False)
    except FileNotFoundError:
        raise InspectionError(
            f"no output root at {shown}: nothing is stored there; give the job's output.uri"
        ) from None
    except NotADirectoryError:
        raise InspectionError(f"{shown} is a file, not an output root; give the job's output.uri") from None
    except Exception as exc:  # noqa: BLE001 - any failure to reach the store is one sentence
        if type(exc).__name__ == "ParamValidationError" or isinstance(exc, ValueError):
            raise InspectionError(f"{shown} is not a usable output URI ({_describe(exc)})") from None
        endpoint = resolved_endpoint(options)
        where = f" at {redact_uri(endpoint)}" if endpoint else ""
        raise InspectionError(
            f"could not list {shown} on the store{where} ({_describe(exc)}); check --endpoint-url "
            "(or $AWS_ENDPOINT_URL), the network and the credentials in the environment"
        ) from None
    return fs, root.rstrip("/")


def read_lease(output_uri: str, options: "StorageOptions | None" = None,
               now: _dt.datetime | None = None) -> LeaseInfo | None:
    """The lease object ``<output_uri>/_lease.json`` (None when there is none), with its age by
    its own ``renewed_at``; it tells a live run from a killed one."""
    from step1x_batch.errors import redact
    from step1x_batch.job.lease import read_holder

    try:
        holder = read_holder(output_uri, options)  # the lease module's one reader
    except Exception as e:  # noqa: BLE001 - a store's refusal: one sentence, not a traceback
        raise InspectionError(f"could not read the lease: {redact(str(e))}") from None
    if holder is None:
        return None
    doc = holder.doc  # {} when torn or foreign: a holder with unknown details, not fresh
    now = now or _utcnow()
    renewed = _parse_time(doc.get("renewed_at"))
    try:
        ttl = float(doc["ttl_s"]) if doc.get("ttl_s") is not None else None
    except (TypeError, ValueError):
        ttl = None
    try:
        pid = int(doc["pid"]) if doc.get("pid") is not None else None
    except (TypeError, ValueError):
        pid = None
    age = (now - renewed).total_seconds() if renewed is not None else None
    fresh = age is not None and ttl is not None and age < ttl
    text = lambda key: None if doc.get(key) is None else str(doc[key])  # noqa: E731
    return LeaseInfo(run_id=text("run_id"), host=text("host"), pid=pid, job=text("job"),
                     started_at=_parse_time(doc.get("started_at")), renewed_at=renewed,
                     ttl_s=ttl, age_s=age, fresh=fresh)


def read_records(output_uri: str, options: "StorageOptions | None" = None,
                 columns: Sequence[str] | None = None, notes: list[str] | None = None) -> "pa.Table":
    """Every readable log record under the root (``columns`` only); a damaged part is skipped
    and named in ``notes`` instead of a Python warning."""
    from step1x_batch.rows.log import read_logs

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = read_logs(output_uri, options, columns=list(columns) if columns else None)
    if notes is not None:
        notes.extend(str(w.message) for w in caught if issubclass(w.category, RuntimeWarning))
    return table


def _count(values: Sequence[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        key = v if v else "(none)"
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def list_runs(output_uri: str, options: "StorageOptions | None" = None, *,
              records: "pa.Table | None" = None, lease: LeaseInfo | None = None,
              notes: list[str] | None = None) -> list[RunInfo]:
    """Every run under the root (a ``runs/<run_id>/`` folder, log records naming it, or the
    lease's run), sorted by run id, with its state, counts and times."""
    from step1x_batch.errors import redact_uri
    from step1x_batch.io.storage import filesystem, join_uri, read_bytes

    notes = notes if notes is not None else []
    fs, root = filesystem(output_uri, options)
    root = root.rstrip("/")
    files: dict[str, dict[str, dict[str, Any]]] = {}
    runs_root = f"{root}/runs"
    try:
        found = fs.find(runs_root, detail=True)
    except FileNotFoundError:
        found = {}
    for path, info in found.items():
        rel = path[len(runs_root):].strip("/").split("/")
        if len(rel) == 2:
            files.setdefault(rel[0], {})[rel[1]] = info
        elif len(rel) == 1 and info.get("type") == "directory":
            files.setdefault(rel[0], {})

    if records is None:
        records = read_records(output_uri, options, _STATUS_COLUMNS, notes)
    per_run: dict[str, dict[str, Any]] = {}
    if records.num_rows:
        cols = records.select(["run_id", "status", "error_type", "started_at", "finished_at"]).to_pydict()
        for rid, status, etype, start, end in zip(cols["run_id"], cols["status"], cols["error_type"],
                                                  cols["started_at"], cols["finished_at"]):
            rid = rid or "(no run id)"
            acc = per_run.setdefault(rid, {"records": 0, "ok": 0, "error": 0, "types": [],
                                           "first": None, "last": None})
            acc["records"] += 1
            if status == "ok":
                acc["ok"] += 1
            elif status == "error":
                acc["error"] += 1
                acc["types"].append(etype)
            start, end = _parse_time(start), _parse_time(end)
            if start is not None and (acc["first"] is None or start < acc["first"]):
                acc["first"] = start
            if end is not None and (acc["last"] is None or end > acc["last"]):
                acc["last"] = end

    run_ids = set(files) | set(per_run)
    if lease is not None and lease.fresh and lease.run_id:
        run_ids.add(lease.run_id)
    out = []
    for run_id in sorted(run_ids):
        its = files.get(run_id, {})
        acc = per_run.get(run_id, {})
        info = RunInfo(run_id=run_id, state=INTERRUPTED, records=acc.get("records", 0),
                       ok=acc.get("ok", 0), error=acc.get("error", 0),
                       by_error_type=_count(acc.get("types", [])),
                       last_record_at=acc.get("last"), has_config="config.yaml" in its,
                       has_summary="summary.json" in its)
        info.started_at = _modified(its["config.yaml"]) if info.has_config else None
        info.started_at = info.started_at or acc.get("first")
        if info.has_summary:
            info.ended_at = _modified(its["summary.json"])
            summary_uri = join_uri(output_uri, f"runs/{run_id}/summary.json")
            try:
                summary = json.loads(read_bytes(summary_uri, options))
                status = summary.get("status") or (SUCCEEDED if summary.get("ok") else FAILED)
                info.state = status if status in (SUCCEEDED, FAILED, STOPPED) else UNKNOWN
            except Exception as e:  # noqa: BLE001 - one bad file must not hide the others
                info.state = UNKNOWN
                notes.append(f"unreadable {redact_uri(summary_uri)} ({_describe(e)})")
        elif lease is not None and lease.fresh and lease.run_id == run_id:
            info.state = RUNNING
            info.started_at = info.started_at or lease.started_at
        out.append(info)
    return out


def _config_of(output_uri: str, options: "StorageOptions | None", runs: Sequence[RunInfo]) -> tuple[str, dict]:
    """(run id, raw config) of the newest run with a readable ``config.yaml``."""
    import yaml

    from step1x_batch.io.storage import join_uri, read_bytes

    problems = []
    for run in reversed(runs):
        if not run.has_config:
            continue
        try:
            raw = yaml.safe_load(read_bytes(join_uri(output_uri, f"runs/{run.run_id}/config.yaml"), options))
        except Exception as e:  # noqa: BLE001 - try the run before
            problems.append(f"run {run.run_id}: {_describe(e)}")
            continue
        if isinstance(raw, dict):
            return run.run_id, raw
    why = f" ({'; '.join(problems[:2])})" if problems else ""
    raise InspectionError(
        f"cannot check the manifest: no run under the output root has a readable "
        f"runs/<run_id>/config.yaml{why}, and its defaults are needed to compute fingerprints"
    )


def manifest_check(manifest_uri: str, latest: "pa.Table", raw_config: dict[str, Any], *,
                   config_run_id: str, options: "StorageOptions | None" = None,
                   batch_rows: int = 10_000) -> ManifestCheck:
    """Compare a manifest with the latest record of each id: ids and fingerprints are computed
    exactly as a run with ``raw_config`` (a run's config snapshot) reading ``manifest_uri`` would."""
    import copy

    from step1x_batch.job.config import parse_config
    from step1x_batch.job.stages import normalize_settings
    from step1x_batch.rows.manifest import normalize_batch, read_manifest_table

    raw = copy.deepcopy(raw_config)
    raw.setdefault("input", {})
    if not isinstance(raw["input"], dict):
        raw["input"] = {}
    raw["input"]["manifest"] = manifest_uri
    try:
        cfg = parse_config(raw)  # resolves a local manifest path as the job does
        settings = normalize_settings(cfg)
    except Exception as e:  # noqa: BLE001 - e.g. a family plug-in not importable here
        raise InspectionError(
            f"cannot compute the manifest's fingerprints with the config of run {config_run_id} "
            f"(runs/{config_run_id}/config.yaml): {_describe(e)}"
        ) from None
    table = read_manifest_table(cfg.input.manifest, options, edit_rows=True)
    ids: list[str] = []
    fps: list[str | None] = []
    for start in range(0, table.num_rows, batch_rows):
        norm = normalize_batch(table.slice(start, batch_rows), settings)
        ids.extend(norm.column("id").to_pylist())
        fps.extend(norm.column("fingerprint").to_pylist())

    cols = latest.select(["id", "fingerprint", "status"]).to_pydict() if latest.num_rows else {
        "id": [], "fingerprint": [], "status": []}
    last = {i: (fp, st) for i, fp, st in zip(cols["id"], cols["fingerprint"], cols["status"])}
    seen: set[str] = set()
    check = ManifestCheck(manifest_uri=cfg.input.manifest, config_run_id=config_run_id,
                          rows=table.num_rows, ids=0, done=0, error=0)
    for rid, fp in zip(ids, fps):
        if rid in seen:
            continue  # duplicate rows are the same work
        seen.add(rid)
        if rid not in last:
            check.never_attempted.append(rid)
            continue
        fp_then, status = last[rid]
        if fp_then != fp:
            check.changed.append(rid)
        elif status == "ok":
            check.done += 1
        elif status == "error":
            check.error += 1
    check.ids = len(seen)
    return check


def root_status(output_uri: str, options: "StorageOptions | None" = None, *,
                manifest_uri: str | None = None, now: _dt.datetime | None = None) -> RootStatus:
    """Summarise an output root: every run, the lease, rows done and in error (and, with a
    manifest, what of it was never attempted or changed since). Raises InspectionError when
    the root is absent, unreachable or holds no runs."""
    from step1x_batch.errors import redact_uri

    _check_root(output_uri, options)
    notes: list[str] = []
    lease = read_lease(output_uri, options, now=now)
    records = read_records(output_uri, options, _STATUS_COLUMNS, notes)
    runs = list_runs(output_uri, options, records=records, lease=lease, notes=notes)
    if not runs:
        raise InspectionError(
            f"no runs under {redact_uri(output_uri)}: it has no runs/<run_id>/ or "
            "logs/<run_id>/ folders; give the output.uri of a job that has run"
        )
    # Rows: the compacted state (one bucket at a time) with the parts written after it folded in.
    import pyarrow as pa
    import pyarrow.compute as pc

    from step1x_batch.judge.scores import score_part_uris
    from step1x_batch.rows.state import iter_state

    has_scores = bool(score_part_uris(output_uri, options))
    columns = ["id", "fingerprint", "status", "error_type"] + (["ok_fingerprint"] if has_scores else [])
    rows = done = 0
    error_types: dict[str, int] = {}
    latest_parts, edit_parts = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a damaged part is already among the notes (read_records)
        for table in iter_state(output_uri, options, columns=columns):
            if has_scores:  # each id's current edit: its latest ok record's fingerprint
                edits = table.filter(pc.is_valid(table.column("ok_fingerprint")))
                edit_parts.append(edits.select(["id", "ok_fingerprint"]).rename_columns(["id", "fingerprint"]))
                table = table.select(columns[:4])
            rows += table.num_rows
            status_col = table.column("status")
            done += int(pc.sum(pc.fill_null(pc.equal(status_col, "ok"), False).cast(pa.int64())).as_py() or 0)
            errs = table.filter(pc.fill_null(pc.equal(status_col, "error"), False)).column("error_type")
            for item in pc.value_counts(pc.fill_null(errs, "(none)")).to_pylist():
                error_types[item["values"]] = error_types.get(item["values"], 0) + item["counts"]
            if manifest_uri:
                latest_parts.append(table)
    status = RootStatus(
        output_uri=output_uri, runs=runs, lease=lease, rows=rows, done=done,
        error_rows_by_type=dict(sorted(error_types.items())), records=records.num_rows, notes=notes,
    )
    if has_scores:
        edits = pa.concat_tables(edit_parts) if edit_parts else pa.table({"id": pa.array([], pa.string()),
                                                                          "fingerprint": pa.array([], pa.string())})
        status.edited = edits.num_rows
        status.scores = judge_scores(output_uri, options, edits, notes)
    if manifest_uri:
        run_id, raw = _config_of(output_uri, options, runs)
        from step1x_batch.rows.state import STATE_SCHEMA

        latest = pa.concat_tables(latest_parts) if latest_parts else STATE_SCHEMA.empty_table().select(
            ["id", "fingerprint", "status", "error_type"])
        status.manifest = manifest_check(manifest_uri, latest, raw, config_run_id=run_id, options=options)
    return status


_SCORE_COLUMNS = ["id", "fingerprint", "score_key", "judge_id", "prompt_hash", "status", "error_type",
                  "score_sc", "score_pq", "score_o", "metrics", "preference", "finished_at"]


def scores_of_edits(scores: "pa.Table", ids: Any, fingerprints: Any) -> "pa.Table":
    """The score records of the given edits only (``ids[i]`` edited with ``fingerprints[i]``): the
    scores of an id's older edit are history, not the row's score."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if scores.num_rows == 0:
        return scores

    def keys(i: Any, f: Any) -> Any:
        return pc.binary_join_element_wise(pc.cast(i, pa.string()), pc.cast(f, pa.string()), "\x1f")

    wanted = keys(ids, fingerprints)
    wanted = wanted.combine_chunks() if isinstance(wanted, pa.ChunkedArray) else wanted
    mask = pc.is_in(keys(scores.column("id"), scores.column("fingerprint")), value_set=wanted, skip_nulls=True)
    return scores.filter(pc.fill_null(mask, False))


def scores_by_judge(scores: "pa.Table") -> list[tuple[str, str, "pa.Table"]]:
    """(judge id, prompt hash, its records) for each judge in ``scores``, by judge id then hash:
    means over two judges' scores would mean nothing."""
    import pyarrow.compute as pc

    if scores.num_rows == 0:
        return []
    judges = pc.fill_null(scores.column("judge_id"), "")
    hashes = pc.fill_null(scores.column("prompt_hash"), "")
    out = []
    for judge, hash_ in sorted(set(zip(judges.to_pylist(), hashes.to_pylist()))):
        mask = pc.and_(pc.equal(judges, judge), pc.equal(hashes, hash_))
        out.append((judge, hash_, scores.filter(mask)))
    return out


def judge_scores(output_uri: str, options: "StorageOptions | None", edits: "pa.Table",
                 notes: list[str] | None = None) -> list[JudgeScores]:
    """Per judge, the deciding score records of the current ``edits`` (columns id, fingerprint)
    with their counts and means (bootstrap 95 % intervals); [] when the root holds no scores.
    A damaged scores part is skipped and named in ``notes``."""
    from step1x_batch.judge.scores import deciding_scores, read_scores, summarize

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scores = deciding_scores(read_scores(output_uri, options, _SCORE_COLUMNS))
    if notes is not None:
        notes.extend(str(w.message) for w in caught if issubclass(w.category, RuntimeWarning))
    scores = scores_of_edits(scores, edits.column("id"), edits.column("fingerprint"))
    out = []
    for judge, hash_, table in scores_by_judge(scores):
        stats = summarize(table)
        out.append(JudgeScores(judge_id=judge, prompt_hash=hash_, rows=table.num_rows, ok=stats["ok"],
                               errors=dict(sorted(stats["errors"].items())), stats=stats))
    return out


def error_rows(output_uri: str, options: "StorageOptions | None" = None,
               types: Sequence[str] | None = None, notes: list[str] | None = None) -> "pa.Table":
    """The error rows of a root (ids whose latest record is an error), only ``types`` when
    given, as a table of :data:`ERROR_COLUMNS` sorted by error type then id. Raises
    InspectionError when the root is absent, unreachable or holds no runs."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from step1x_batch.errors import redact_uri
    from step1x_batch.rows.state import latest_per_id

    _check_root(output_uri, options)
    cols = sorted(set(ERROR_COLUMNS) | {"status"})
    records = read_records(output_uri, options, cols, notes)
    if records.num_rows == 0 and not list_runs(output_uri, options, records=records):
        raise InspectionError(
            f"no runs under {redact_uri(output_uri)}: it has no runs/<run_id>/ or "
            "logs/<run_id>/ folders; give the output.uri of a job that has run"
        )
    latest = latest_per_id(records)
    mask = pc.equal(latest.column("status"), "error")
    if types:
        mask = pc.and_(mask, pc.is_in(latest.column("error_type"), value_set=pa.array(list(types), pa.string())))
    rows = latest.filter(pc.fill_null(mask, False)).select(list(ERROR_COLUMNS))
    if rows.num_rows:
        rows = rows.take(pc.sort_indices(rows, sort_keys=[("error_type", "ascending"), ("id", "ascending")]))
    return rows


# ---------------------------------------------------------------------------------------------
# Formatting (for people)


def _when(t: _dt.datetime | None) -> str:
    return t.astimezone(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ") if t else "-"


def _types_text(by_type: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(by_type.items(), key=lambda kv: (-kv[1], kv[0])))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int] = frozenset(),
           indent: str = "") -> list[str]:
    """Aligned columns (``right``: indexes of right-aligned ones); no trailing blanks."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        parts = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return (indent + "  ".join(parts)).rstrip()

    return [line(header)] + [line(r) for r in rows]


def _shorten(text: str, width: int, keep: str = "end") -> str:
    """``text`` on one line, at most ``width`` characters: ``keep="end"`` cuts the tail (a
    message's start says what failed), ``keep="tail"`` keeps the tail (a URI's end names the file)."""
    text = " ".join(str(text).split())
    if len(text) <= width:
        return text
    if keep == "tail":
        return "..." + text[-(width - 3):]
    return text[: width - 3].rstrip() + "..."


def _lease_text(lease: LeaseInfo | None) -> str:
    if lease is None:
        return "none (no run is writing)"
    who = f"run {lease.run_id or '?'} on host {lease.host or '?'}"
    if lease.pid is not None:
        who += f" (pid {lease.pid})"
    age = f"renewed {lease.age_s:.0f} s ago" if lease.age_s is not None else "renewal time unknown"
    ttl = f"ttl {lease.ttl_s:g} s" if lease.ttl_s is not None else "ttl unknown"
    if lease.fresh:
        return f"held by {who}, {age} ({ttl})"
    return f"stale: {who}, {age} ({ttl}); the next run takes it over"


_STATE_HINT = {
    SUCCEEDED: "",
    FAILED: " (more error rows than runtime.max_error_fraction; every row was logged)",
    STOPPED: " (stopped before its rows were done: the model failed to load or the lease was lost; see its summary.json notes)",
    RUNNING: " (its lease is fresh)",
    INTERRUPTED: " (no summary.json and no fresh lease: its driver stopped; re-run the config to finish its rows)",
    UNKNOWN: " (its summary.json is unreadable)",
}


_SCORE_LABELS = (("score_sc", "SC"), ("score_pq", "PQ"), ("score_o", "O"))


def _scores_line(js: JudgeScores) -> str:
    """``judge (prompts hash): rows, ok, errors by type; SC / PQ / O means [95 % interval]``."""
    errors = sum(js.errors.values())
    counts = f"{js.rows} row{'s' if js.rows != 1 else ''} scored: {js.ok} ok"
    if errors:
        counts += f", {errors} error{'s' if errors != 1 else ''} ({_types_text(js.errors)})"
    parts = [counts]
    means = [f"{label} {m['mean']:.2f} [{m['low']:.2f}, {m['high']:.2f}]"
             for name, label in _SCORE_LABELS if (m := js.stats.get(name))]
    if means:
        parts.append(" · ".join(means))
    pref = js.stats.get("preference")
    if pref:
        parts.append(f"preferred A {pref.get('A', 0)} · B {pref.get('B', 0)} · tie {pref.get('tie', 0)}")
    share = js.stats.get("unchanged_share")
    if share is not None:
        parts.append(f"unchanged {100 * share:.0f}%")
    return f"  {js.judge_id} (prompts {js.prompt_hash}): " + "; ".join(parts)


def format_status(status: RootStatus, *, max_ids: int = 5) -> str:
    """The ``status`` report: a short block for people (runs table, rows, manifest, lease)."""
    from step1x_batch.errors import redact_uri

    lines = [f"output root  {redact_uri(status.output_uri)}"]
    last = status.last_run
    if last is not None:
        lines.append(f"last run     {last.run_id}: {last.state}{_STATE_HINT.get(last.state, '')}")
    lines.append(f"lease        {_lease_text(status.lease)}")
    lines.append("")
    lines.append(f"runs ({len(status.runs)}):")
    rows = []
    for r in status.runs:
        ended = _when(r.ended_at) if r.has_summary else (
            f"last record {_when(r.last_record_at)}" if r.last_record_at else "-")
        rows.append([r.run_id, r.state, str(r.ok), str(r.error), _types_text(r.by_error_type) or "-",
                     _when(r.started_at), ended])
    lines += _table(["run id", "state", "ok", "error", "errors by type", "started", "ended"], rows,
                    right={2, 3}, indent="  ")
    lines.append("")
    lines.append(f"rows (by the latest record of each id; {status.rows} ids, {status.records} records):")
    lines.append(f"  done    {status.done}")
    errs = _types_text(status.error_rows_by_type)
    lines.append(f"  errors  {status.error_rows}" + (f"  ({errs}; list them: step1x-batch errors "
                                                        f"{redact_uri(status.output_uri)})" if errs else ""))
    if status.scores:
        lines.append("")
        lines.append(f"scores (one line per judge and prompt set: the deciding score of each of the "
                     f"{status.edited} current edits; means with bootstrap 95 % intervals):")
        lines += [_scores_line(js) for js in status.scores]
    m = status.manifest
    if m is not None:
        lines.append("")
        lines.append(f"manifest {redact_uri(m.manifest_uri)} ({m.rows} rows, {m.ids} ids; "
                     f"fingerprints as run {m.config_run_id}'s config computes them):")

        def ids(values: list[str]) -> str:
            if not values:
                return ""
            shown = ", ".join(values[:max_ids])
            return f"  ({shown}{', ...' if len(values) > max_ids else ''})"

        lines.append(f"  done             {m.done}")
        lines.append(f"  errors           {m.error}")
        lines.append(f"  never attempted  {len(m.never_attempted)}{ids(m.never_attempted)}")
        lines.append(f"  changed since    {len(m.changed)}{ids(m.changed)}")
        if m.never_attempted or m.changed:
            lines.append("  (the next run of the config does them)")
    for note in status.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines) + "\n"


def _uris_text(row: dict[str, Any]) -> str:
    from step1x_batch.errors import redact_uri

    uris = row.get("image_uris") or ([row["image_uri"]] if row.get("image_uri") else [])
    return ", ".join(redact_uri(u) for u in uris if u) or "-"


def format_errors_table(rows: "pa.Table", *, message_width: int = 70, uri_width: int = 48) -> str:
    """Error rows as an aligned text table (id, type, message, image, run), long messages and
    URIs shortened to fit; a count line at the end."""
    from step1x_batch.errors import redact

    if rows.num_rows == 0:
        return "no error rows\n"
    body = []
    for r in rows.to_pylist():
        body.append([r["id"] or "-", r["error_type"] or "-",
                     _shorten(redact(r["error_message"] or ""), message_width) or "-",
                     _shorten(_uris_text(r), uri_width, keep="tail"), r["run_id"] or "-"])
    lines = _table(["id", "error_type", "error_message", "image", "run_id"], body)
    by_type = _count(rows.column("error_type").to_pylist())
    lines.append("")
    lines.append(f"{rows.num_rows} error row{'s' if rows.num_rows != 1 else ''} ({_types_text(by_type)}); "
                 "full messages: --format csv")
    return "\n".join(lines) + "\n"


def write_errors_csv(rows: "pa.Table", out: IO[str]) -> None:
    """Error rows as CSV (every column of :data:`ERROR_COLUMNS`, untruncated; lists as JSON,
    times as ISO-8601; messages and URIs redacted)."""
    from step1x_batch.errors import redact, redact_uri

    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(ERROR_COLUMNS)
    for r in rows.to_pylist():
        cells = []
        for name in ERROR_COLUMNS:
            v = r.get(name)
            if v is None:
                cells.append("")
            elif name == "image_uris":
                cells.append(json.dumps([redact_uri(u) for u in v]))
            elif name == "image_uri":
                cells.append(redact_uri(v))
            elif name == "error_message":
                cells.append(redact(v))
            elif isinstance(v, _dt.datetime):
                cells.append(_parse_time(v).isoformat())
            else:
                cells.append(str(v))
        writer.writerow(cells)


# ---------------------------------------------------------------------------------------------
# The commands


def _split_types(values: Sequence[str] | None) -> list[str]:
    return sorted({t.strip() for v in values or () for t in v.split(",") if t.strip()})


def _guarded(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run a command; any failure is one redacted ``error:`` line and exit status 2."""

    def run(args: argparse.Namespace) -> int:
        from step1x_batch.errors import RowError, redact

        try:
            return fn(args)
        except InspectionError as e:
            msg = str(e)
        except RowError as e:
            msg = e.message
        except (OSError, ValueError) as e:
            msg = redact(str(e)) or _describe(e)
        except Exception as e:  # noqa: BLE001 - a person gets a sentence, never a traceback
            msg = _describe(e)
        print(f"error: {msg}", file=sys.stderr, flush=True)
        return 2

    return run


def _status_command(args: argparse.Namespace) -> int:
    options = storage_options(args.endpoint_url, args.region)
    status = root_status(args.output_uri, options, manifest_uri=args.manifest)
    sys.stdout.write(format_status(status))
    return 0


def _errors_command(args: argparse.Namespace) -> int:
    from step1x_batch.errors import CODES

    options = storage_options(args.endpoint_url, args.region)
    types = _split_types(args.type)
    notes: list[str] = []
    rows = error_rows(args.output_uri, options, types or None, notes)
    unknown = [t for t in types if t not in CODES]
    if unknown and rows.num_rows == 0:
        raise InspectionError(f"unknown error type(s) {', '.join(unknown)}; error types are "
                              f"{', '.join(sorted(CODES))}")
    if args.format == "csv":
        write_errors_csv(rows, sys.stdout)
    else:
        sys.stdout.write(format_errors_table(rows))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


def storage_arguments(p: argparse.ArgumentParser) -> None:
    """OUTPUT_URI, --endpoint-url and --region (for every command that reads an output root)."""
    p.add_argument("output_uri", metavar="OUTPUT_URI", help="the job's output.uri (a folder or s3://bucket/prefix)")
    p.add_argument("--endpoint-url", default=None, metavar="URL",
                   help="S3 endpoint (MinIO, Ceph, R2, ...); default $AWS_ENDPOINT_URL. Credentials "
                        "come from the environment only")
    p.add_argument("--region", default=None, metavar="R", help="S3 region; default $AWS_REGION or us-east-1")


def add_inspection_commands(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add ``status`` and ``errors`` to the ``step1x-batch`` subcommands (no Ray is started)."""
    p = sub.add_parser("status", help="summarise the runs and rows under an output root (no Ray)",
                       description="Summarise every run under an output root: state, rows ok / "
                                   "in error, errors by type, times; rows done and in error "
                                   "overall; with --manifest, its rows never attempted or changed since.")
    storage_arguments(p)
    p.add_argument("--manifest", default=None, metavar="MANIFEST_URI",
                   help="also count this manifest's rows never attempted and changed since "
                        "(fingerprints use the last run's config)")
    p.set_defaults(func=_guarded(_status_command))

    p = sub.add_parser("errors", help="list the error rows under an output root (no Ray)",
                       description="List the rows whose latest record is an error.")
    storage_arguments(p)
    p.add_argument("--type", action="append", default=[], metavar="T",
                   help="only these error types (repeatable, or a comma list: missing_object,corrupt_image)")
    p.add_argument("--format", choices=["table", "csv"], default="table",
                   help="table (aligned, shortened; default) or csv (every column, untruncated)")
    p.set_defaults(func=_guarded(_errors_command))
