"""The skip as a partition-wise join on the cluster: which manifest rows still need work.

The compacted state (:mod:`step1x_batch.rows.state`) is partitioned by a hash of the id. A map
task per piece of the manifest (a file, or a run of a Parquet file's row groups) reads it,
computes each row's join key (its id) and its raw-row digest (:mod:`step1x_batch.rows.digest`) -- vectorised, no per-row Python for rows
that carry a plain id -- and splits the block by the same hash. One probe task per bucket reads
that bucket's state file, looks every row up (Arrow's hash lookup), drops the rows whose digest
proves them done, and returns the rest with their id's state columns attached. Those candidate
rows enter the Ray Data graph; the normalise stage computes their fingerprints and drops the
ones done after all (:func:`step1x_batch.rows.state.decide`), so attempt numbers and
``runtime.retry_error_types`` mean what they always meant.

No process holds more than one bucket of the state, and the driver holds only object refs: its
memory does not grow with the manifest or the log. The join is blocking (a bucket's rows may
come from any block), so the first edit waits for the whole manifest to be matched; a root with
no state (a first run) skips the join and streams.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from step1x_batch.job.counters import add_counters
from step1x_batch.errors import redact_uri
from step1x_batch.rows.digest import manifest_row_digests
from step1x_batch.rows.manifest import (
    MAX_ID_CHARS,
    NormalizeSettings,
    manifest_files,
    manifest_format,
    normalize_batch,
    read_manifest_table,
)
from step1x_batch.rows.sources import adapt_table
from step1x_batch.rows.state import RayTasks, StatePointer, decide, read_bucket, split_by_bucket, take_state
from step1x_batch.io.storage import StorageOptions, filesystem, retry_count

KEY = "__skip_key"
DIGEST = "__skip_digest"
DUPLICATE_OF = "__skip_duplicate_of"  # a later row with an earlier row's given id: that row, described
STATE_PREFIX = "__state_"
STATE_COLUMNS = ["id", "fingerprint", "status", "error_type", "source_digest", "attempts",
                 "ok_fingerprint", "ok_source_digest"]
_PLAIN_ID = r"^[!-~]([ -~]*[!-~])?$"  # printable ASCII, no surrounding space: kept as it is


def internal_columns(table: pa.Table) -> list[str]:
    return [c for c in table.column_names if c.startswith("__skip_") or c.startswith(STATE_PREFIX)]


def row_keys(batch: pa.Table, settings: NormalizeSettings) -> pa.Array:
    """Each row's id as normalisation will give it: a plain text or integer ``id`` as it is,
    vectorised; any other row is normalised (Python) to learn its id."""
    n = batch.num_rows
    keys = pa.nulls(n, pa.string())
    if "id" in batch.column_names:
        col = batch.column("id").combine_chunks()
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            col = col.cast(pa.string())
            plain = pc.and_(pc.match_substring_regex(col, _PLAIN_ID),
                            pc.less_equal(pc.utf8_length(col), MAX_ID_CHARS))
            keys = pc.if_else(pc.fill_null(plain, False), col, keys)
        elif pa.types.is_integer(col.type):
            keys = col.cast(pa.string())
    missing = pc.is_null(keys)
    if pc.any(missing).as_py():
        slow = np.flatnonzero(np.asarray(missing.to_numpy(zero_copy_only=False), dtype=bool))
        ids = normalize_batch(batch.take(pa.array(slow)), settings).column("id").combine_chunks()
        keys = pc.replace_with_mask(keys, missing, ids)
    return keys


def manifest_pieces(uri: str, options: StorageOptions | None, rows_per_piece: int = 250_000,
                    max_footers: int = 64) -> list[tuple[str, list[int] | None]]:
    """The manifest as pieces for the map tasks: (file, Parquet row groups or None for the whole
    file). A few Parquet files are cut by row groups (their footers are read here); many files
    give one piece each."""
    files = manifest_files(uri, options)
    if len(files) > max_footers or manifest_format(files[0]) != "parquet":
        return [(f, None) for f in files]
    pieces: list[tuple[str, list[int] | None]] = []
    for f in files:
        fs, path = filesystem(f, options)
        with fs.open(path, "rb") as fh:
            meta = pq.ParquetFile(fh).metadata
        group: list[int] = []
        rows = 0
        for g in range(meta.num_row_groups):
            group.append(g)
            rows += meta.row_group(g).num_rows
            if rows >= rows_per_piece:
                pieces.append((f, group))
                group, rows = [], 0
        if group or not pieces or pieces[-1][0] != f:
            pieces.append((f, group or None))
    return pieces


def read_piece(uri: str, options: StorageOptions | None, row_groups: list[int] | None,
               columns: Mapping[str, Any] | None = None) -> pa.Table:
    """One piece of the manifest, read as the job's reader reads it (Parquet as stored, CSV and
    JSON Lines with a fixed schema of text columns; the column map and embedded images applied)."""
    if row_groups is None:
        return read_manifest_table(uri, options, edit_rows=True, columns=columns)
    fs, path = filesystem(uri, options)
    with fs.open(path, "rb") as fh:
        return adapt_table(pq.ParquetFile(fh).read_row_groups(row_groups), columns)


def split_piece(uri: str, row_groups: list[int] | None, options: StorageOptions | None,
                settings: NormalizeSettings, buckets: int, counters: Any = None,
                columns: Mapping[str, Any] | None = None) -> list[Any]:
    """Map task: read a piece of the manifest, key and digest every row, split it by bucket (the
    last return value is a placeholder, so that there are always several)."""
    start, retries = time.perf_counter(), retry_count()
    block = read_piece(uri, options, row_groups, columns)
    keys = row_keys(block, settings)
    digests = manifest_row_digests(block, settings)
    block = block.append_column(KEY, keys).append_column(DIGEST, digests)
    out = split_by_bucket(block, buckets, key=KEY)
    add_counters(counters, {"rows_read": float(len(keys)), "normalise_ms": (time.perf_counter() - start) * 1e3,
                            "storage_retries": float(retry_count() - retries)})
    return [*out, None]


def probe_bucket(output_uri: str, options: StorageOptions | None, pointer: StatePointer, bucket: int,
                 retried: Sequence[str], counters: Any, *tables: pa.Table) -> pa.Table:
    """Reduce task: the rows of one bucket that are not proven done by their digest, with their
    id's state columns (``__state_*``) attached."""
    start, retries = time.perf_counter(), retry_count()
    tables = [t for t in tables if t is not None and t.num_rows]
    if not tables:
        return pa.table({KEY: pa.array([], pa.string())})
    rows = pa.concat_tables(tables, promote_options="permissive").combine_chunks()
    duplicates = duplicate_ids(rows)
    state = read_bucket(output_uri, options, pointer, bucket, columns=STATE_COLUMNS)
    found = take_state(state, rows.column(KEY))
    done = decide(None, rows.column(DIGEST), found, retried)
    done_errors = skipped_errors(done, found)
    keep = pa.array(~done)
    rows, found = rows.append_column(DUPLICATE_OF, duplicates).filter(keep), found.filter(keep)
    for name in STATE_COLUMNS[1:]:
        rows = rows.append_column(STATE_PREFIX + name, found.column(name))
    add_counters(counters, {"rows_skipped_done": float(int(done.sum())),
                            "rows_skipped_error": float(done_errors),
                            "normalise_ms": (time.perf_counter() - start) * 1e3,
                            "storage_retries": float(retry_count() - retries)})
    return rows


def _describe_row(row: dict[str, Any]) -> str:
    image = row.get("image_uri") if row.get("image_uri") is not None else row.get("image_uris")
    return f"the row with image {redact_uri(str(image))[:200]}" if image is not None else "another row"


def duplicate_ids(rows: pa.Table) -> pa.Array:
    """For each row (in manifest order: a bucket's pieces arrive in order) that gives an ``id``
    an earlier row of the manifest already gave, with a different raw row (digest): the earlier
    row, described; else null. The skip join sees every row of an id in one bucket, done or
    not, so a resumed run finds the same first row however the manifest was batched."""
    n = rows.num_rows
    out: list[str | None] = [None] * n
    if "id" not in rows.column_names or n == 0:
        return pa.array(out, pa.string())
    counts = pc.value_counts(rows.column(KEY))
    repeated = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")
    if len(repeated) == 0:
        return pa.array(out, pa.string())
    given = pc.and_(pc.is_valid(rows.column("id")), pc.is_in(rows.column(KEY), value_set=repeated))
    first: dict[str, tuple[int, int]] = {}  # id -> (row, digest)
    for i in np.flatnonzero(np.asarray(pc.fill_null(given, False).to_numpy(zero_copy_only=False), dtype=bool)):
        key, digest = rows.column(KEY)[i].as_py(), rows.column(DIGEST)[i].as_py()
        if key not in first:
            first[key] = (int(i), digest)
        elif first[key][1] != digest:
            out[i] = _describe_row(rows.slice(first[key][0], 1).to_pylist()[0])
    return pa.array(out, pa.string())


def skipped_errors(done: Any, state: pa.Table) -> int:
    """How many of the rows skipped as done are done by an error record: the error budget
    counts them (``runtime.max_error_fraction`` is over the manifest's rows after the run)."""
    is_error = np.asarray(pc.fill_null(pc.equal(state.column("status"), "error"), False), dtype=bool)
    return int((np.asarray(done, dtype=bool) & is_error).sum())


def state_rows(batch: pa.Table) -> pa.Table:
    """The ``__state_*`` columns of candidate rows as state rows (for :func:`rowstate.decide`)."""
    return pa.table({name: batch.column(STATE_PREFIX + name) for name in STATE_COLUMNS[1:]})


def skip_join(manifest_uri: str, input_options: StorageOptions | None, *, settings: NormalizeSettings,
              pointer: StatePointer, output_uri: str, options: StorageOptions | None,
              retried: Sequence[str], counters: Any, cpus_per_task: float = 1.0,
              columns: Mapping[str, Any] | None = None) -> list[Any]:
    """Run the join over the manifest; returns object refs of the candidate tables, one per
    bucket (nothing is fetched to the driver)."""
    tasks = RayTasks(cpus_per_task)
    buckets = pointer.buckets
    pieces = manifest_pieces(manifest_uri, input_options)
    splits = tasks.map(split_piece, [(f, groups, input_options, settings, buckets, counters, columns)
                                     for f, groups in pieces],
                       num_returns=buckets + 1)
    calls = [(output_uri, options, pointer, b, list(retried), counters, *[s[b] for s in splits])
             for b in range(buckets)]
    return tasks.map(probe_bucket, calls)
