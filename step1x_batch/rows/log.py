"""The row log: one Parquet record per input row, the job's source of truth.

Layout: ``<output_uri>/logs/<run_id>/part-*.parquet``. A part is written whole or not at all
(:func:`write_log_part`), so a killed job leaves only complete parts (plus, at worst, a part some
other writer left half-written, which :func:`read_logs` skips with a warning).

Resume rule (docs/architecture.md, "The row contract and the resume rule"): a row is done when
its id's latest ``ok`` record has the same ``fingerprint`` (its bytes are the ones in the output
object now). The fold of every record into the deciding record of each id is
:mod:`step1x_batch.rows.state`, compacted so that a start never re-reads every part.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import logging
import posixpath
import re
import time
import uuid
import warnings
from typing import Any, Callable, Mapping

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from step1x_batch.errors import redact_uri
from step1x_batch.io.storage import StorageOptions, filesystem, join_uri, read_bytes, write_bytes

logger = logging.getLogger(__name__)

_TS = pa.timestamp("us", tz="UTC")
LOG_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("fingerprint", pa.string()),
        ("status", pa.string()),  # ok | error
        ("error_type", pa.string()),  # a stable code from step1x_batch.errors, null when ok
        ("error_message", pa.string()),
        ("image_uri", pa.string()),  # the first input
        ("image_uris", pa.list_(pa.string())),  # every input, in order
        ("instruction", pa.string()),
        ("output_uri", pa.string()),  # set only when the object was fully written
        ("input_width", pa.int64()),
        ("input_height", pa.int64()),
        ("width", pa.int64()),  # the size the model ran at
        ("height", pa.int64()),
        ("seed", pa.int64()),
        ("num_steps", pa.int64()),
        ("guidance_scale", pa.float64()),
        ("size_level", pa.int64()),
        ("blend_instruction", pa.string()),  # null unless the row blends two conditionings
        ("blend_scale", pa.float64()),
        ("adapters", pa.string()),  # the row's adapter set (model.adapter_sets), null: the base model
        ("model_id", pa.string()),
        ("run_id", pa.string()),
        ("attempt", pa.int64()),
        ("worker", pa.string()),
        ("started_at", _TS),
        ("finished_at", _TS),
        ("preprocess_ms", pa.float64()),
        ("edit_ms", pa.float64()),
        ("write_ms", pa.float64()),
        ("source_digest", pa.uint64()),  # of the raw manifest row (step1x_batch.rows.digest)
        ("extra", pa.string()),  # JSON object of the manifest's extra columns
    ]
)
LOG_COLUMNS = tuple(LOG_SCHEMA.names)

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")


def log_dir(output_uri: str, run_id: str) -> str:
    """``<output_uri>/logs/<run_id>``; ``run_id`` must be a plain name (letters, digits, ``._-``)."""
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id) or run_id in (".", ".."):
        raise ValueError(
            f"run_id {run_id!r} is not a plain name; use letters, digits, '.', '_' and '-'"
        )
    return join_uri(output_uri, f"logs/{run_id}")


def part_uri(output_uri: str, run_id: str, index: int | str) -> str:
    """The URI of log part ``index`` of ``run_id`` (``part-<index>.parquet``; an int is zero
    padded to 6 digits so parts sort in order)."""
    name = f"{index:06d}" if isinstance(index, int) else str(index)
    if not re.match(r"^[A-Za-z0-9._\-]+$", name):
        raise ValueError(f"log part index {index!r} is not a plain name")
    return join_uri(log_dir(output_uri, run_id), f"part-{name}.parquet")


def _timestamps(values: Any) -> pa.Array:
    """Timestamps (datetime, pandas Timestamp, ISO text or epoch seconds) as timestamp[us, UTC]."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        if pa.types.is_timestamp(values.type):
            if values.type.tz is None:
                values = pc.assume_timezone(values, "UTC")
            return values.cast(_TS)
        if pa.types.is_integer(values.type) or pa.types.is_floating(values.type):
            values = values.to_pylist()
        elif pa.types.is_null(values.type):
            return pa.nulls(len(values), _TS)
        else:
            values = values.to_pylist()
    out = []
    for v in list(values):
        if v is None or (isinstance(v, float) and v != v) or v is pd.NaT:
            out.append(None)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(_dt.datetime.fromtimestamp(float(v), tz=_dt.timezone.utc))
        else:
            ts = pd.Timestamp(v)
            ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
            out.append(ts.to_pydatetime())
    return pa.array(out, type=_TS)


def _extra_json(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and value != value):
        return None
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)


def conform(table: pa.Table | pd.DataFrame | Mapping[str, Any]) -> pa.Table:
    """``table`` as exactly :data:`LOG_SCHEMA`: columns in order, cast to their types, missing
    ones null; other columns dropped. ``extra`` may be given as a JSON string or a dict."""
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    elif isinstance(table, Mapping):
        table = pa.table(dict(table))
    elif isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    n = table.num_rows
    arrays = []
    for field in LOG_SCHEMA:
        if field.name not in table.column_names:
            arrays.append(pa.nulls(n, field.type))
            continue
        col = table.column(field.name)
        if field.name == "extra" and not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
            arrays.append(pa.array([_extra_json(v) for v in col.to_pylist()], pa.string()))
        elif field.type == _TS:
            arrays.append(_timestamps(col))
        elif pa.types.is_null(col.type):
            arrays.append(pa.nulls(n, field.type))
        else:
            try:
                arrays.append(col.cast(field.type))
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise ValueError(
                    f"log column {field.name!r} of type {col.type} cannot be stored as "
                    f"{field.type}: {exc}"
                ) from None
    return pa.Table.from_arrays(
        [a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a for a in arrays],
        schema=LOG_SCHEMA,
    )


def log_part_bytes(table: pa.Table | pd.DataFrame) -> bytes:
    """A conformed table as Parquet bytes (zstd)."""
    buf = io.BytesIO()
    pq.write_table(conform(table), buf, compression="zstd")
    return buf.getvalue()


def write_log_part(
    table: pa.Table | pd.DataFrame, uri: str, options: StorageOptions | None = None
) -> int:
    """Write ``table`` (conformed to :data:`LOG_SCHEMA`) as one Parquet part at ``uri``, whole or
    not at all. Returns the number of records. Raises RowError(WRITE_FAILED)."""
    data = log_part_bytes(table)
    write_bytes(uri, data, options)
    return table.num_rows if isinstance(table, pa.Table) else len(table)


def log_part_keys(output_uri: str, options: StorageOptions | None = None,
                  run_id: str | None = None) -> list[str]:
    """Every log part's key under the root (``logs/<run_id>/part-*.parquet``; one run's when
    given), sorted."""
    fs, root = filesystem(output_uri, options)
    root = root.rstrip("/")
    try:
        found = fs.glob(posixpath.join(root, "logs", run_id or "*", "part-*.parquet"))
    except FileNotFoundError:
        return []
    return sorted(p[len(root) + 1:] for p in found if p.startswith(root + "/"))


def log_part_uris(output_uri: str, options: StorageOptions | None = None,
                  run_id: str | None = None) -> list[str]:
    """Every ``logs/*/part-*.parquet`` under ``output_uri`` (or of one run), sorted."""
    return [join_uri(output_uri, key) for key in log_part_keys(output_uri, options, run_id)]


def read_part(uri: str, options: StorageOptions | None = None,
              columns: list[str] | None = None) -> pa.Table | None:
    """One log part (conformed to :data:`LOG_SCHEMA`, or just ``columns``: those an older part
    lacks come back null), or None with a warning when it cannot be read."""
    try:
        part = pq.ParquetFile(io.BytesIO(read_bytes(uri, options)))
        table = part.read(columns=None if columns is None else
                          [c for c in columns if c in part.schema_arrow.names])
    except Exception as exc:  # noqa: BLE001 - a damaged part must not stop a resume
        msg = (
            f"skipping unreadable log part {redact_uri(uri)} ({type(exc).__name__}: {exc}); "
            "its rows count as not done and will be redone"
        )
        warnings.warn(msg, RuntimeWarning, stacklevel=3)
        logger.warning(msg)
        return None
    if columns is None:
        return conform(table)
    n = table.num_rows
    return pa.table({c: table.column(c) if c in table.column_names else pa.nulls(n, LOG_SCHEMA.field(c).type)
                     for c in columns})


def read_logs(output_uri: str, options: StorageOptions | None = None,
              run_id: str | None = None, columns: list[str] | None = None) -> pa.Table:
    """Every readable log record under ``output_uri`` (or of one run) as one table
    (unreadable parts skipped with a warning)."""
    parts = [read_part(u, options, columns) for u in log_part_uris(output_uri, options, run_id)]
    parts = [p for p in parts if p is not None]
    if not parts:
        schema = LOG_SCHEMA if columns is None else pa.schema([LOG_SCHEMA.field(c) for c in columns])
        return schema.empty_table()
    return pa.concat_tables(parts, promote_options="permissive")


class PartWriter:
    """Buffers records and lands them as whole Parquet objects ``<folder>/part-<n>-<token>.parquet``:
    the row log's and the scores log's writer. The per-writer token keeps a restarted driver that
    reuses a run id from overwriting an earlier process's part; ``confirm`` (the lease's) is asked
    before each part, so a run whose lease is gone lands no more records (the buffered ones are
    dropped: those rows have no record and are done again)."""

    def __init__(self, folder: str, options: StorageOptions | None, part_rows: int, part_seconds: float,
                 encode: Callable[[pa.Table], bytes], confirm: Callable[[], bool] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.folder, self.options, self.encode = folder, options, encode
        self.part_rows, self.part_seconds = part_rows, part_seconds
        self.confirm, self.clock = confirm, clock
        self.token = uuid.uuid4().hex[:8]
        self.parts: list[str] = []
        self.records = 0
        self.dropped = 0  # records not landed because the lease was no longer this run's
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self._last_flush = clock()

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self._buffer.append(table)
            self._buffered += table.num_rows
        if self._buffered >= self.part_rows or (
            self._buffered and self.clock() - self._last_flush >= self.part_seconds
        ):
            self.flush()

    def flush(self) -> None:
        self._last_flush = self.clock()
        if not self._buffered:
            return
        if self.confirm is not None and not self.confirm():
            self.dropped += self._buffered
            self._buffer, self._buffered = [], 0
            return
        table = pa.concat_tables(self._buffer, promote_options="permissive")
        uri = join_uri(self.folder, f"part-{len(self.parts):06d}-{self.token}.parquet")
        write_bytes(uri, self.encode(table), self.options)  # one whole object: landed or absent
        self.parts.append(uri)
        self.records += table.num_rows
        self._buffer, self._buffered = [], 0
