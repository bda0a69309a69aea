"""The compacted row state: the deciding record of every id, so a start reads one state instead
of folding every log part an output root has ever had.

Layout under the output root::

    state/CURRENT.json                      the pointer: the current version and its sizes
    state/v-<version>/bucket-<b>.parquet    the ids whose hash falls in bucket b (of ``buckets``)
    state/v-<version>/covered.parquet       the log parts (keys under the root) folded into it

Publication: every bucket file, then the covered list, then the pointer, each one whole-object
put. A compaction killed at any point leaves the previous pointer, which names a complete
version; the half-written version is garbage and the next compaction removes it. The state is
derived from the logs only (the logs stay the source of truth): a part not in ``covered`` is
folded in by the next compaction, and deleting ``state/`` loses nothing (``step1x-batch compact``
rebuilds it).

Per id the state holds its *deciding record* (the latest record: by ``finished_at``, a record
without one counting as oldest, ties to the record folded later), its latest ``ok`` record
(``ok_*``, null when it never succeeded) and ``attempts`` (how many records it has). Folding is
associative -- the state of (logs A + logs B) is the fold of (state of A) then B -- so a
compaction reads only the previous state and the parts written since. The skip rule built on
it (:func:`decide`): a row is done when its fingerprint (or raw-row digest, see
:mod:`step1x_batch.rows.digest`) equals the latest ``ok`` record's, or equals the deciding
record's when that is an error of a final type (one this run does not retry).

Compaction runs as tasks (:class:`RayTasks` on a cluster, :class:`LocalTasks` in one process):
map tasks read new log parts and split their records by bucket; one reduce task per bucket folds
the previous bucket file with them and writes the new one. No process holds more than one
bucket's records, and the driver holds only part names.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import logging
import os
import posixpath
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from step1x_batch.errors import redact_uri
from step1x_batch.rows.log import log_part_keys, read_part
from step1x_batch.io.storage import (
    StorageOptions,
    exists,
    filesystem,
    join_uri,
    read_bytes,
    retry_count,
    write_bytes,
)

logger = logging.getLogger(__name__)

POINTER_KEY = "state/CURRENT.json"
FORMAT = 1
_TS = pa.timestamp("us", tz="UTC")
_DECIDING = [("fingerprint", pa.string()), ("status", pa.string()), ("error_type", pa.string()),
             ("output_uri", pa.string()), ("model_id", pa.string()), ("run_id", pa.string()),
             ("finished_at", _TS), ("source_digest", pa.uint64())]
_OK = [("fingerprint", pa.string()), ("output_uri", pa.string()), ("model_id", pa.string()),
       ("run_id", pa.string()), ("finished_at", _TS), ("source_digest", pa.uint64())]
STATE_SCHEMA = pa.schema(
    [("id", pa.string()), *_DECIDING, ("attempts", pa.int64())]
    + [(f"ok_{name}", t) for name, t in _OK]
)
RECORD_COLUMNS = ["id"] + [name for name, _ in _DECIDING]  # what a fold reads of a log part
_MIN_TIME = np.iinfo(np.int64).min


# ---------------------------------------------------------------------------------------------
# Pure functions: buckets, records -> state rows, the fold, the skip rule.


def bucket_of(ids: pa.Array | pa.ChunkedArray, buckets: int) -> np.ndarray:
    """The bucket (0 <= b < buckets) of each id: a stable 64-bit hash, the same on every worker."""
    import pandas as pd

    if buckets <= 1:
        return np.zeros(len(ids), dtype=np.int64)
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    values = ids.cast(pa.string()).to_numpy(zero_copy_only=False)
    return (pd.util.hash_array(values, categorize=False) % np.uint64(buckets)).astype(np.int64)


def records_as_state(records: pa.Table) -> pa.Table:
    """Log records as state rows (one per record, ``attempts`` 1); missing columns are null."""
    n = records.num_rows
    cols: dict[str, Any] = {}
    for name in ["id"] + [nm for nm, _ in _DECIDING]:
        t = STATE_SCHEMA.field(name).type
        cols[name] = records.column(name).cast(t) if name in records.column_names else pa.nulls(n, t)
    ok = pc.fill_null(pc.equal(cols["status"], "ok"), False)
    out = {name: cols[name] for name in cols}
    out["attempts"] = pa.array(np.ones(n, dtype=np.int64))
    for name, t in _OK:
        out[f"ok_{name}"] = pc.if_else(ok, cols[name], pa.nulls(n, t))
    return pa.table(out).select(STATE_SCHEMA.names).cast(STATE_SCHEMA)


def _last_per_group(codes: np.ndarray, times: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows (already in fold order) grouped by ``codes``: the last row of each group by
    (time, fold order). Returns (group codes, row indices)."""
    order = np.lexsort((rows, times, codes))
    c = codes[order]
    last = np.ones(c.size, dtype=bool)
    last[:-1] = c[:-1] != c[1:]
    return c[last], rows[order][last]


def _times(col: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(pc.fill_null(col.cast(pa.int64()), _MIN_TIME).to_numpy(), dtype=np.int64)


def _id_codes(ids: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, int]:
    """Each row's id as a group number (in order of first appearance), and how many ids."""
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    encoded = pc.dictionary_encode(ids, null_encoding="encode")
    return np.asarray(encoded.indices.to_numpy(zero_copy_only=False), dtype=np.int64), len(encoded.dictionary)


def _deciding_rows(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The resume rule's order (docs/architecture.md): each id's deciding record is its latest by
    ``finished_at`` (a missing time counts as oldest), ties going to the row read later.
    Returns (each row's id code, the codes, their deciding rows, how many ids)."""
    codes, ids = _id_codes(table.column("id"))
    rows = np.arange(table.num_rows, dtype=np.int64)
    groups, deciding = _last_per_group(codes, _times(table.column("finished_at")), rows)
    return codes, groups, deciding, ids


def latest_per_id(records: pa.Table) -> pa.Table:
    """One record per ``id`` (any columns, ``id`` and ``finished_at`` among them): its deciding
    one, as :func:`fold` picks it; in the order the records came."""
    if records.num_rows == 0:
        return records
    _, _, deciding, _ = _deciding_rows(records)
    return records.take(pa.array(np.sort(deciding)))


def fold(tables: Sequence[pa.Table]) -> pa.Table:
    """Fold state rows (any number per id; later tables and rows fold later) into one row per id."""
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return STATE_SCHEMA.empty_table()
    t = pa.concat_tables([x.select(STATE_SCHEMA.names).cast(STATE_SCHEMA) for x in tables]).combine_chunks()
    codes, groups, deciding, ids = _deciding_rows(t)
    has_ok = np.asarray(pc.is_valid(t.column("ok_fingerprint")).to_numpy(), dtype=bool)
    ok_row = np.full(ids, -1, dtype=np.int64)
    if has_ok.any():
        sel = np.flatnonzero(has_ok)
        g_ok, r_ok = _last_per_group(codes[sel], _times(t.column("ok_finished_at"))[sel], sel)
        ok_row[g_ok] = r_ok
    attempts = np.bincount(codes, weights=t.column("attempts").to_numpy(), minlength=ids)
    out = t.take(pa.array(deciding)).select(["id"] + [nm for nm, _ in _DECIDING])
    ok_take = pa.array(ok_row[groups], mask=ok_row[groups] < 0)
    cols = {name: out.column(name) for name in out.column_names}
    cols["attempts"] = pa.array(np.rint(attempts[groups]).astype(np.int64))
    for name, _ in _OK:
        cols[f"ok_{name}"] = t.column(f"ok_{name}").take(ok_take)
    return pa.table(cols).select(STATE_SCHEMA.names).cast(STATE_SCHEMA)


def final_error(state: pa.Table, retried: Sequence[str]) -> pa.ChunkedArray:
    """True where the deciding record is an error this run does not redo."""
    err = pc.fill_null(pc.equal(state.column("status"), "error"), False)
    if "*" in retried:
        return pc.and_(err, False)
    redo = pc.fill_null(pc.is_in(state.column("error_type"), value_set=pa.array(sorted(retried), pa.string())), False)
    return pc.and_(err, pc.invert(redo))


def _equal(a: Any, b: Any) -> Any:
    return pc.fill_null(pc.equal(a, b), False)


def decide(fingerprints: Any, digests: Any, state_rows: pa.Table, retried: Sequence[str]) -> np.ndarray:
    """Which rows are done, given each row's fingerprint (None: not computed yet; a null entry:
    the row is invalid), its raw-row digest and its id's state row (all null when the id has
    none), aligned. An invalid row is done when its id's deciding record is the final error of
    an invalid row too (a null fingerprint), or of the very same raw row (its digest)."""
    final = final_error(state_rows, retried)
    by_ok = _equal(digests, state_rows.column("ok_source_digest"))
    by_err = _equal(digests, state_rows.column("source_digest"))
    if fingerprints is not None:
        by_ok = pc.or_(by_ok, _equal(fingerprints, state_rows.column("ok_fingerprint")))
        by_err = pc.or_(by_err, pc.or_(
            _equal(fingerprints, state_rows.column("fingerprint")),
            pc.and_(pc.is_null(fingerprints), pc.is_null(state_rows.column("fingerprint")))))
    done = pc.or_(by_ok, pc.and_(final, by_err))
    return np.asarray(done.to_numpy(zero_copy_only=False), dtype=bool)


def take_state(state: pa.Table, ids: pa.Array | pa.ChunkedArray) -> pa.Table:
    """The state row of each of ``ids`` (all null where an id has none), aligned with ``ids``."""
    idx = pc.index_in(ids, value_set=state.column("id").combine_chunks() if state.num_rows else pa.array([], pa.string()))
    return state.take(idx) if state.num_rows else pa.table(
        {f.name: pa.nulls(len(ids), f.type) for f in STATE_SCHEMA}, schema=STATE_SCHEMA)


def _thin(state: pa.Table) -> pa.Table:
    """The state as stored: where the deciding record is the latest ok record (most ids), the
    ``ok_*`` copies are left null (about half a bucket file's bytes)."""
    ok = pc.fill_null(pc.equal(state.column("status"), "ok"), False)
    for name, t in _OK:
        i = state.schema.get_field_index(f"ok_{name}")
        state = state.set_column(i, f"ok_{name}", pc.if_else(ok, pa.nulls(state.num_rows, t), state.column(i)))
    return state


def _full(table: pa.Table) -> pa.Table:
    """A stored bucket (or some of its columns) with the ``ok_*`` copies filled back in."""
    if "status" not in table.column_names:
        return table
    ok = pc.fill_null(pc.equal(table.column("status"), "ok"), False)
    for name, _ in _OK:
        col = f"ok_{name}"
        if col in table.column_names and name in table.column_names:
            i = table.schema.get_field_index(col)
            table = table.set_column(i, col, pc.if_else(ok, table.column(name), table.column(i)))
    return table


def _load_bucket(uri: str, options: StorageOptions | None, columns: list[str] | None = None) -> pa.Table:
    if columns is None:
        return _full(pq.read_table(io.BytesIO(read_bytes(uri, options))))
    needed = set(columns) | {"status"} | {c[3:] for c in columns if c.startswith("ok_")}
    read = [c for c in STATE_SCHEMA.names if c in needed]
    return _full(pq.read_table(io.BytesIO(read_bytes(uri, options)), columns=read)).select(columns)


# ---------------------------------------------------------------------------------------------
# Where things are.


@dataclass(frozen=True)
class StatePointer:
    """What ``state/CURRENT.json`` says: the version, how it is partitioned and what it holds."""

    version: str
    buckets: int
    ids: int
    records: int  # log records folded in
    parts: int  # log parts folded in
    created_at: str
    run_id: str | None = None
    format: int = FORMAT

    def folder(self, output_uri: str) -> str:
        return join_uri(output_uri, f"state/v-{self.version}")

    def bucket_uri(self, output_uri: str, bucket: int) -> str:
        return bucket_uri(output_uri, self.version, bucket)

    def covered_uri(self, output_uri: str) -> str:
        return join_uri(self.folder(output_uri), "covered.parquet")


def bucket_uri(output_uri: str, version: str, bucket: int) -> str:
    return join_uri(output_uri, f"state/v-{version}/bucket-{bucket:05d}.parquet")


class StateError(Exception):
    """The state cannot be read (a damaged pointer or version); it names the object."""


def read_pointer(output_uri: str, options: StorageOptions | None = None) -> StatePointer | None:
    """The current version, or None when the root has no state yet."""
    uri = join_uri(output_uri, POINTER_KEY)
    if not exists(uri, options):
        return None
    try:
        doc = json.loads(read_bytes(uri, options))
        return StatePointer(**{k: doc[k] for k in StatePointer.__dataclass_fields__ if k in doc})
    except Exception as exc:  # noqa: BLE001
        raise StateError(f"the state pointer {redact_uri(uri)} is unreadable ({type(exc).__name__}: "
                         f"{exc}); delete it and run `step1x-batch compact` to rebuild the state") from None


def _records(output_uri: str, options: StorageOptions | None, key: str) -> pa.Table | None:
    """One log part's records as state rows (None, with a warning, when it cannot be read)."""
    records = read_part(join_uri(output_uri, key), options, RECORD_COLUMNS)
    return None if records is None else records_as_state(records)


def read_covered(output_uri: str, options: StorageOptions | None, pointer: StatePointer) -> list[str]:
    try:
        data = read_bytes(pointer.covered_uri(output_uri), options)
        return pq.read_table(io.BytesIO(data)).column("part").to_pylist()
    except Exception as exc:  # noqa: BLE001
        raise StateError(f"the state version {pointer.version} is damaged: "
                         f"{redact_uri(pointer.covered_uri(output_uri))} is unreadable ({exc}); delete "
                         f"{POINTER_KEY} and run `step1x-batch compact` to rebuild the state") from None


def read_bucket(output_uri: str, options: StorageOptions | None, pointer: StatePointer, bucket: int,
                columns: list[str] | None = None) -> pa.Table:
    uri = pointer.bucket_uri(output_uri, bucket)
    try:
        table = _load_bucket(uri, options, columns)
    except Exception as exc:  # noqa: BLE001
        raise StateError(f"the state version {pointer.version} is damaged: {redact_uri(uri)} is "
                         f"unreadable ({exc}); delete {POINTER_KEY} and run `step1x-batch compact`") from None
    return table


def pending_parts(output_uri: str, options: StorageOptions | None = None,
                  pointer: StatePointer | None = None) -> list[str]:
    """The log parts the current state has not folded in yet (written after it), in order."""
    covered = set(read_covered(output_uri, options, pointer)) if pointer else set()
    return [p for p in log_part_keys(output_uri, options) if p not in covered]


# ---------------------------------------------------------------------------------------------
# Tasks: the same compaction in one process or as Ray tasks.


class LocalTasks:
    """Runs each task at once, in this process (tests, small roots, no cluster)."""

    def map(self, fn: Callable[..., Any], calls: Iterable[tuple], num_returns: int = 1) -> list[Any]:
        return [fn(*args) for args in calls]

    def get(self, values: list[Any]) -> list[Any]:
        return values


class RayTasks:
    """Runs each task as a Ray task (one CPU), results staying in the object store until a
    reduce task or :meth:`get` needs them."""

    def __init__(self, num_cpus: float = 1.0) -> None:
        self.num_cpus = num_cpus
        self._remote: dict[Any, Any] = {}

    def map(self, fn: Callable[..., Any], calls: Iterable[tuple], num_returns: int = 1) -> list[Any]:
        import ray

        key = (fn, num_returns)
        if key not in self._remote:
            self._remote[key] = ray.remote(fn).options(num_returns=num_returns, num_cpus=self.num_cpus)
        remote = self._remote[key]
        out = []
        for args in calls:
            ref = remote.remote(*args)
            out.append(list(ref) if num_returns > 1 else ref)
        return out

    def get(self, values: list[Any]) -> list[Any]:
        import ray

        return ray.get(values)


# ---------------------------------------------------------------------------------------------
# Compaction.


def split_by_bucket(table: pa.Table, buckets: int, key: str = "id") -> list[pa.Table]:
    """``table``'s rows by the bucket of their ``key`` column, one (maybe empty) table per bucket."""
    b = bucket_of(table.column(key), buckets)
    order = np.argsort(b, kind="stable")
    counts = np.bincount(b, minlength=buckets)
    sorted_table = table.take(pa.array(order))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return [sorted_table.slice(int(s), int(c)) for s, c in zip(starts, counts)]


def _split_parts(output_uri: str, options: StorageOptions | None, parts: list[str], buckets: int) -> list[Any]:
    """Map task: read log parts (in order), their records as state rows split by bucket; the last
    return value says which parts could not be read (left for the next compaction) and how many
    storage retries the reads took."""
    retries = retry_count()
    tables, unreadable = [], []
    for key in parts:
        records = _records(output_uri, options, key)
        if records is None:  # a damaged part must not stop a compaction
            unreadable.append(key)
        else:
            tables.append(records)
    table = pa.concat_tables(tables) if tables else STATE_SCHEMA.empty_table()
    return [*split_by_bucket(table, buckets), {"unreadable": unreadable, "retries": retry_count() - retries}]


def _split_bucket(output_uri: str, options: StorageOptions | None, version: str, bucket: int,
                  buckets: int) -> list[Any]:
    """Map task (re-partitioning): one bucket file of the previous version split by the new count
    (plus an empty last value, so that the task always has several return values)."""
    retries = retry_count()
    table = _load_bucket(bucket_uri(output_uri, version, bucket), options)
    return [*split_by_bucket(table, buckets), {"unreadable": [], "retries": retry_count() - retries}]


def _fold_bucket(output_uri: str, options: StorageOptions | None, version: str, bucket: int,
                 previous_uri: str | None, n_previous: int, *tables: pa.Table) -> tuple[int, int, int]:
    """Reduce task: fold the previous state of this bucket (its file when the bucket count is
    unchanged, else the first ``n_previous`` tables) and the new records that hash to it, write
    the new bucket file; return (ids, new records folded, storage retries)."""
    retries = retry_count()
    inputs = []
    if previous_uri is not None:
        inputs.append(_load_bucket(previous_uri, options))
    inputs.extend(tables)
    state = fold(inputs)
    if state.num_rows:
        state = state.take(pc.sort_indices(state, sort_keys=[("id", "ascending")]))
    buf = io.BytesIO()
    pq.write_table(_thin(state), buf, compression="zstd")
    write_bytes(bucket_uri(output_uri, version, bucket), buf.getvalue(), options)
    return state.num_rows, sum(t.num_rows for t in tables[n_previous:]), retry_count() - retries


def _failpoint(name: str) -> None:
    """Tests stop a compaction at a named point (``STEP1X_BATCH_FAILPOINT=name``) to kill it there."""
    if os.environ.get("STEP1X_BATCH_FAILPOINT") == name:
        print(f"failpoint {name}: waiting to be killed", flush=True)
        while True:
            time.sleep(1.0)


def bucket_count(ids: float, target_rows: int = 250_000) -> int:
    """Buckets for about ``ids`` ids: a power of two, ~``target_rows`` ids each (1 to 4096)."""
    want = max(1, int(np.ceil(ids / max(1, target_rows))))
    return int(min(4096, 1 << (want - 1).bit_length()))


@dataclass
class CompactResult:
    pointer: StatePointer | None  # the current state after the call (None: the root has no logs)
    compacted: bool  # a new version was published
    folded_parts: int = 0
    folded_records: int = 0
    unreadable_parts: list[str] | None = None
    seconds: float = 0.0
    storage_retries: int = 0  # in the tasks (the caller's own reads and writes count in its process)

    def line(self) -> str:
        p = self.pointer
        if p is None:
            return "state: no log records yet"
        what = (f"folded {self.folded_records} records from {self.folded_parts} new log parts"
                if self.compacted else "already current")
        return (f"state v-{p.version}: {p.ids} ids, {p.records} records, {p.buckets} buckets; "
                f"{what} in {self.seconds:.1f} s")


def _rows_in(output_uri: str, options: StorageOptions | None, key: str) -> float:
    """Records in one log part (its footer), to size the first version's buckets."""
    try:
        fs, path = filesystem(join_uri(output_uri, key), options)
        with fs.open(path, "rb") as f:
            return float(pq.ParquetFile(f).metadata.num_rows)
    except Exception:  # noqa: BLE001 - only an estimate
        return 1000.0


def _new_version() -> str:
    return f"{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%S%f}-{uuid.uuid4().hex[:8]}"


def compact(output_uri: str, options: StorageOptions | None = None, *, tasks: Any = None,
            run_id: str | None = None, buckets: int | None = None, parts_per_task: int = 64,
            target_bucket_rows: int = 250_000, rebuild: bool = False) -> CompactResult:
    """Fold the log parts the current state has not covered into a new version and publish it.

    The caller holds the output root's lease (one writer per root). ``buckets`` fixes the
    partition count (default: from the number of ids, re-partitioning as the root grows).
    ``rebuild``: ignore the current state and fold every log part (a damaged state)."""
    start = time.monotonic()
    tasks = tasks or LocalTasks()
    previous = None if rebuild else read_pointer(output_uri, options)
    covered = read_covered(output_uri, options, previous) if previous else []
    covered_set = set(covered)
    new = [p for p in log_part_keys(output_uri, options) if p not in covered_set]
    if not new:
        return CompactResult(previous, False, seconds=time.monotonic() - start)
    per_part = previous.records / previous.parts if previous and previous.parts else _rows_in(output_uri, options, new[-1])
    n_buckets = buckets or bucket_count((previous.ids if previous else 0) + len(new) * per_part,
                                        target_bucket_rows)
    version = _new_version()
    chunks = [new[i:i + parts_per_task] for i in range(0, len(new), parts_per_task)]
    splits = tasks.map(_split_parts, [(output_uri, options, c, n_buckets) for c in chunks],
                       num_returns=n_buckets + 1)
    prev_splits: list[list[Any]] = []
    if previous is not None and previous.buckets != n_buckets:
        prev_splits = tasks.map(_split_bucket, [(output_uri, options, previous.version, b, n_buckets)
                                                for b in range(previous.buckets)],
                                num_returns=n_buckets + 1)
    calls = []
    for b in range(n_buckets):
        prev_uri = previous.bucket_uri(output_uri, b) if previous is not None and not prev_splits else None
        calls.append((output_uri, options, version, b, prev_uri, len(prev_splits),
                      *[s[b] for s in prev_splits], *[s[b] for s in splits]))
    folded = tasks.get(tasks.map(_fold_bucket, calls, num_returns=1))
    reports = tasks.get([s[-1] for s in splits + prev_splits])
    unreadable = sorted({p for r in reports for p in r["unreadable"]})
    retries = sum(r["retries"] for r in reports) + sum(f[2] for f in folded)
    _failpoint("compact-before-publish")
    done_parts = sorted(covered_set | (set(new) - set(unreadable)))
    buf = io.BytesIO()
    pq.write_table(pa.table({"part": pa.array(done_parts, pa.string())}), buf, compression="zstd")
    write_bytes(join_uri(output_uri, f"state/v-{version}/covered.parquet"), buf.getvalue(), options)
    new_records = sum(f[1] for f in folded)
    pointer = StatePointer(
        version=version, buckets=n_buckets, ids=sum(f[0] for f in folded),
        records=(previous.records if previous else 0) + new_records, parts=len(done_parts),
        created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), run_id=run_id)
    write_bytes(join_uri(output_uri, POINTER_KEY), (json.dumps(asdict(pointer), indent=1) + "\n").encode(), options)
    _remove_old_versions(output_uri, options, keep={version, previous.version if previous else version})
    return CompactResult(pointer, True, len(new) - len(unreadable), new_records, unreadable,
                         time.monotonic() - start, retries)


def _remove_old_versions(output_uri: str, options: StorageOptions | None, keep: set[str]) -> None:
    """Delete versions other than the current and the previous one (half-written ones included);
    the previous one stays for a reader that read the old pointer a moment ago."""
    fs, root = filesystem(output_uri, options)
    folder = posixpath.join(root.rstrip("/"), "state")
    try:
        names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(folder, detail=False)]
    except FileNotFoundError:
        return
    for name in names:
        if name.startswith("v-") and name[2:] not in keep:
            try:
                fs.rm(posixpath.join(folder, name), recursive=True)
            except Exception as exc:  # noqa: BLE001 - garbage left for the next compaction
                logger.warning("could not remove old state version %s: %s", name, exc)


# ---------------------------------------------------------------------------------------------
# Reading the current state of some ids (the catalog's publication, the pairs export).


def lookup(output_uri: str, options: StorageOptions | None, ids: Iterable[str | None]) -> pa.Table:
    """The state rows of ``ids`` right now: the current state plus the parts written after it.
    Reads only the buckets those ids fall in; holds only their rows and the pending records."""
    wanted = pa.array(sorted({i for i in ids if i is not None}), pa.string())
    pointer = read_pointer(output_uri, options)
    tables: list[pa.Table] = []
    if pointer is not None and len(wanted):
        buckets = bucket_of(wanted, pointer.buckets)
        for b in np.unique(buckets):
            table = read_bucket(output_uri, options, pointer, int(b))
            tables.append(table.filter(pc.is_in(table.column("id"), value_set=wanted)))
    for key in pending_parts(output_uri, options, pointer):
        records = _records(output_uri, options, key)
        if records is not None:
            tables.append(records.filter(pc.is_in(records.column("id"), value_set=wanted)))
    return fold(tables)


def iter_state(output_uri: str, options: StorageOptions | None = None,
               columns: list[str] | None = None) -> Iterable[pa.Table]:
    """The whole current state, one bucket at a time, with the pending parts folded in (they are
    folded bucket by bucket, so memory stays one bucket plus the pending records)."""
    pointer = read_pointer(output_uri, options)
    pending = [r for r in (_records(output_uri, options, key) for key in pending_parts(output_uri, options, pointer))
               if r is not None]
    n = pointer.buckets if pointer else 1
    pending_split = split_by_bucket(pa.concat_tables(pending), n) if pending else [None] * n
    for b in range(n):
        tables = [read_bucket(output_uri, options, pointer, b)] if pointer else []
        if pending_split[b] is not None:
            tables.append(pending_split[b])
        state = fold(tables)
        yield state.select(columns) if columns else state


@dataclass
class LatestRecords:
    """The deciding records of some ids as dicts: ``ok`` maps (id, fingerprint of its latest ok
    record) to that record; ``error`` maps an id whose deciding record is an error to it;
    ``errored`` holds those (id, fingerprint) pairs."""

    ok: dict[tuple[str, str], dict[str, Any]]
    error: dict[str, dict[str, Any]]
    errored: set[tuple[str, str | None]]


def latest_records(output_uri: str, options: StorageOptions | None, ids: Iterable[str | None]) -> LatestRecords:
    """:class:`LatestRecords` of ``ids``, from the state and the parts written after it."""
    out = LatestRecords({}, {}, set())
    for row in lookup(output_uri, options, ids).to_pylist():
        if row["ok_fingerprint"] is not None and row["ok_output_uri"]:
            out.ok[(row["id"], row["ok_fingerprint"])] = {
                "id": row["id"], "fingerprint": row["ok_fingerprint"], "status": "ok", "error_type": None,
                **{name: row[f"ok_{name}"] for name, _ in _OK if name != "fingerprint"}}
        if row["status"] == "error":
            out.error[row["id"]] = {name: row[name] for name in RECORD_COLUMNS}
            out.errored.add((row["id"], row["fingerprint"]))
    return out
