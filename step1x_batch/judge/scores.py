"""The scores log: one record per (row, score key) and run, beside the row log.

Layout: ``<output_uri>/scores/<run_id>/part-*.parquet``, each part one whole object (the row log's
rules: a killed run leaves only complete parts; an unreadable part is skipped with a warning and
its rows are scored again). The deciding record of a (row id, score key) is its latest; the pair is
*scored* when that record is ``ok`` or an error of a final type (an answer that cannot be read is
the same answer next time); transient errors (the judge did not answer, an image could not be
read) are asked again by the next run.
"""

from __future__ import annotations

import io
import logging
import posixpath
import time
import warnings
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from step1x_batch.errors import TRANSIENT_SCORE_CODES, redact_uri
from step1x_batch.io.storage import StorageOptions, filesystem, join_uri, read_bytes
from step1x_batch.rows.log import PartWriter, log_dir, read_logs
from step1x_batch.rows.state import latest_per_id

logger = logging.getLogger(__name__)

_TS = pa.timestamp("us", tz="UTC")
METRICS_STRUCT = pa.struct([
    ("changed_fraction", pa.float64()), ("unchanged", pa.bool_()), ("psnr", pa.float64()),
    ("ssim", pa.float64()), ("width", pa.int64()), ("height", pa.int64()),
    ("aspect_change", pa.float64()), ("size_ok", pa.bool_()),
    ("clip_text", pa.float64()), ("clip_direction", pa.float64()),
])
SUB_SCORES_STRUCT = pa.struct([("sc", pa.list_(pa.float64())), ("pq", pa.list_(pa.float64()))])
SCORE_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("fingerprint", pa.string()),  # the edit's (the row log's) fingerprint
    ("score_key", pa.string()),  # judge.config.score_key(fingerprint, judge_id, prompt_hash, against)
    ("judge_id", pa.string()),
    ("prompt_hash", pa.string()),
    ("status", pa.string()),  # ok | error
    ("error_type", pa.string()),  # a score code from step1x_batch.errors
    ("error_message", pa.string()),
    ("judge_raw", pa.string()),  # the judge's answer when it could not be read (redacted, bounded)
    ("score_sc", pa.float64()),  # semantic consistency 0-10 (VIEScore: the minimum of its sub-scores)
    ("score_pq", pa.float64()),  # perceptual quality 0-10
    ("score_o", pa.float64()),  # overall sqrt(SC * PQ)
    ("sub_scores", SUB_SCORES_STRUCT),
    ("metrics", METRICS_STRUCT),
    ("judge_reason", pa.string()),
    ("preference", pa.string()),  # pairwise: A (this root) | B (against) | tie
    ("axis", pa.string()),
    ("against_fingerprint", pa.string()),
    ("category", pa.string()),
    ("instruction", pa.string()),
    ("output_uri", pa.string()),
    ("run_id", pa.string()),
    ("finished_at", _TS),
    ("judge_ms", pa.float64()),
])
SCORE_COLUMNS = tuple(SCORE_SCHEMA.names)
_DECIDING = ["id", "score_key", "status", "error_type", "finished_at"]


def score_dir(output_uri: str, run_id: str) -> str:
    """``<output_uri>/scores/<run_id>`` (``run_id`` a plain name, as for the row log)."""
    log_dir(output_uri, run_id)  # validates the run id
    return join_uri(output_uri, f"scores/{run_id}")


def conform_scores(table: pa.Table) -> pa.Table:
    """``table`` as exactly :data:`SCORE_SCHEMA` (missing columns null, others dropped)."""
    n = table.num_rows
    cols = []
    for field in SCORE_SCHEMA:
        if field.name in table.column_names:
            col = table.column(field.name)
            cols.append(pa.nulls(n, field.type) if pa.types.is_null(col.type) else col.cast(field.type))
        else:
            cols.append(pa.nulls(n, field.type))
    return pa.Table.from_arrays([c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c for c in cols],
                                schema=SCORE_SCHEMA)


def score_part_uris(output_uri: str, options: StorageOptions | None = None) -> list[str]:
    """Every ``scores/*/part-*.parquet`` under the root, sorted."""
    fs, root = filesystem(output_uri, options)
    root = root.rstrip("/")
    try:
        found = fs.glob(posixpath.join(root, "scores", "*", "part-*.parquet"))
    except FileNotFoundError:
        return []
    return [join_uri(output_uri, p[len(root) + 1:]) for p in sorted(found) if p.startswith(root + "/")]


def _read_part(uri: str, options: StorageOptions | None, columns: Sequence[str] | None) -> pa.Table | None:
    try:
        part = pq.ParquetFile(io.BytesIO(read_bytes(uri, options)))
        table = part.read(columns=None if columns is None else
                          [c for c in columns if c in part.schema_arrow.names])
    except Exception as exc:  # noqa: BLE001 - a damaged part must not stop a resume
        msg = (f"skipping unreadable scores part {redact_uri(uri)} ({type(exc).__name__}: {exc}); "
               "its rows will be scored again")
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        logger.warning(msg)
        return None
    table = conform_scores(table)
    return table if columns is None else table.select(list(columns))


def read_scores(output_uri: str, options: StorageOptions | None = None,
                columns: Sequence[str] | None = None) -> pa.Table:
    """Every readable score record under the root (all runs), unreadable parts skipped."""
    parts = [_read_part(u, options, columns) for u in score_part_uris(output_uri, options)]
    parts = [p for p in parts if p is not None]
    if not parts:
        schema = SCORE_SCHEMA if columns is None else pa.schema([SCORE_SCHEMA.field(c) for c in columns])
        return schema.empty_table()
    return pa.concat_tables(parts)


def deciding_scores(records: pa.Table) -> pa.Table:
    """The latest record per (id, score key): by ``finished_at`` (a record without one counts as
    oldest), ties to the record read later (parts are read in name order)."""
    if records.num_rows == 0:
        return records
    keys = pc.binary_join_element_wise(records.column("id").cast(pa.string()),
                                       records.column("score_key").cast(pa.string()), "\x1f")
    codes = pc.dictionary_encode(keys).combine_chunks().indices.to_numpy(zero_copy_only=False)
    times = records.column("finished_at").cast(pa.int64()).fill_null(np.iinfo(np.int64).min)
    times = times.to_numpy(zero_copy_only=False) if isinstance(times, pa.Array) else times.combine_chunks().to_numpy(zero_copy_only=False)
    rows = np.arange(records.num_rows)
    order = np.lexsort((rows, times, codes))
    c = codes[order]
    last = np.ones(c.size, dtype=bool)
    last[:-1] = c[:-1] != c[1:]
    return records.take(pa.array(np.sort(order[last])))


def scored_keys(output_uri: str, options: StorageOptions | None = None,
                retry: Sequence[str] = ()) -> set[tuple[str, str]]:
    """The (id, score key) pairs that need no new score: their deciding record is ok, or an error
    of a final type not in ``retry``."""
    decided = deciding_scores(read_scores(output_uri, options, _DECIDING))
    again = set(TRANSIENT_SCORE_CODES) | set(retry)
    out = set()
    for rid, key, status, err in zip(*(decided.column(c).to_pylist()
                                       for c in ("id", "score_key", "status", "error_type"))):
        if status == "ok" or (status == "error" and err not in again):
            out.add((rid, key))
    return out


def current_scores(output_uri: str, options: StorageOptions | None = None,
                   score_keys: set[str] | None = None) -> pa.Table:
    """The deciding score record of each (id, score key), only those keys when given: what the
    report, ``status``, the pairs filter and the catalog gate read."""
    records = read_scores(output_uri, options)
    if score_keys is not None and records.num_rows:
        records = records.filter(pc.is_in(records.column("score_key"), pa.array(sorted(score_keys), pa.string())))
    return deciding_scores(records)


class ScoreWriter(PartWriter):
    """The scores log's writer: whole Parquet parts under ``scores/<run_id>/``, the row log
    writer's rules (:class:`~step1x_batch.rows.log.PartWriter`)."""

    def __init__(self, output_uri: str, run_id: str, options: StorageOptions | None,
                 part_rows: int, part_seconds: float, confirm: Callable[[], bool] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(score_dir(output_uri, run_id), options, part_rows, part_seconds, score_part_bytes,
                         confirm=confirm, clock=clock)


def score_part_bytes(table: pa.Table) -> bytes:
    """A table conformed to :data:`SCORE_SCHEMA` as Parquet bytes (zstd)."""
    buf = io.BytesIO()
    pq.write_table(conform_scores(table), buf, compression="zstd")
    return buf.getvalue()


def current_edits(output_uri: str, options: StorageOptions | None, columns: Sequence[str],
                  only: Mapping[str, str] | None = None) -> pa.Table:
    """Each id's current edit, its latest ``ok`` row record (``columns`` of it; ``id``, ``status``,
    ``fingerprint`` and ``finished_at`` among them): the bytes its output object holds now, what
    scoring, the report and ``status`` score and show. ``only`` (id -> fingerprint): those edits
    exactly, whether or not they are still the latest."""
    logs = read_logs(output_uri, options, columns=list(columns))
    ok = logs.filter(pc.equal(logs.column("status"), "ok")) if logs.num_rows else logs
    if only is not None and ok.num_rows:
        wanted = [only.get(i) == f for i, f in zip(ok.column("id").to_pylist(), ok.column("fingerprint").to_pylist())]
        ok = ok.filter(pa.array(wanted, pa.bool_()))
    return latest_per_id(ok)


def summarize(scores: pa.Table, resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Means with bootstrap 95 % intervals of SC, PQ and O over the ok records, the metrics'
    shares, and counts by status and error type (what the summary and the report print)."""
    ok = scores.filter(pc.equal(scores.column("status"), "ok")) if scores.num_rows else scores
    out: dict[str, Any] = {"rows": scores.num_rows, "ok": ok.num_rows, "errors": {}}
    if scores.num_rows:
        errs = scores.filter(pc.equal(scores.column("status"), "error")).column("error_type").to_pylist()
        for e in errs:
            out["errors"][e] = out["errors"].get(e, 0) + 1
    rng = np.random.default_rng(seed)
    for name in ("score_sc", "score_pq", "score_o"):
        values = np.array([v for v in ok.column(name).to_pylist() if v is not None], dtype=np.float64) \
            if ok.num_rows else np.zeros(0)
        out[name] = mean_interval(values, rng, resamples)
    if ok.num_rows:
        metrics = ok.column("metrics").to_pylist()
        unchanged = [m["unchanged"] for m in metrics if m and m.get("unchanged") is not None]
        out["unchanged_share"] = float(np.mean(unchanged)) if unchanged else None
        prefs = [p for p in ok.column("preference").to_pylist() if p]
        if prefs:
            out["preference"] = {k: prefs.count(k) for k in ("A", "B", "tie")}
    return out


def mean_interval(values: np.ndarray, rng: np.random.Generator, resamples: int = 1000) -> dict[str, Any] | None:
    """The mean and its percentile-bootstrap 95 % interval (None without values).

    A resample is drawn as counts per distinct value (a multinomial), so memory grows with the
    number of distinct scores (a judge answers whole numbers), not with rows x resamples: a
    million rows cost what a hundred do."""
    if values.size == 0:
        return None
    levels, counts = np.unique(values, return_counts=True)
    n = int(values.size)
    chunk = max(1, 2_000_000 // max(1, levels.size))
    means = np.concatenate([rng.multinomial(n, counts / n, size=min(chunk, resamples - i)) @ levels / n
                            for i in range(0, resamples, chunk)])
    low, high = np.percentile(means, [2.5, 97.5])
    return {"mean": float(values.mean()), "low": float(low), "high": float(high), "n": n}
