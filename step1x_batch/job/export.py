"""The edit job's results as a dataset: sharded Parquet with the edited image embedded as a
``datasets`` Image feature (``output.dataset``) and WebDataset tar shards (``output.webdataset``).

Layout under the output root::

    dataset/data/shard-00003-of-00016.parquet     Parquet shards (the hub's layout: loadable with
                                                  datasets.load_dataset("parquet", data_files=...))
    dataset/webdataset/shard-00003-of-00016.tar   WebDataset shards (<key>.png/.json/.txt per row)
    dataset/_index/shard-00003.parquet            the records shard 3 holds now (and, in its schema
                                                  metadata, the shard count, column types, content
                                                  digest and which kinds were written)
    dataset/_index/schema.json                    the extra columns' types, from every ok record seen
    dataset/_covered.parquet                      the log parts folded into the index

What it holds: for every id its latest ``ok`` record (the order :func:`rows.state.latest_per_id`
uses) whose output object can be read, once, in shard ``bucket_of(id, shards)``, sorted by id.

Incremental like the state's compaction (:mod:`step1x_batch.rows.state`): map tasks read only the
log parts ``_covered`` does not list and split their ok records by shard; one task per shard folds
its index with them and rewrites the shard only when its content changed (a digest of the sorted
(id, fingerprint, output_uri); a new ``finished_at`` alone is no change), the column types or the
shard count changed, or a shard file of an enabled kind is missing. A shard's bytes depend only on
its rows, so a rewrite after a crash writes the same object.

Crash safety: a shard's files (each one whole-object put of a local temporary file), then its
index, then ``_covered`` last; a killed export leaves every previous shard readable and the next
one finishes the work. Files of another shard count, or of a kind that is switched off, are removed
at the end. While a re-shard is under way the folders hold both counts' files.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import re
import tarfile
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from step1x_batch.errors import TRANSIENT_CODES, WRITE_FAILED, RowError, redact_uri
from step1x_batch.io.storage import (
    StorageOptions,
    exists,
    filesystem,
    is_local,
    join_uri,
    read_bytes,
    write_bytes,
)
from step1x_batch.job.config import JobConfig
from step1x_batch.job.lease import LeaseLost
from step1x_batch.rows.log import log_part_keys, read_part
from step1x_batch.rows.state import LocalTasks, RayTasks, latest_per_id, split_by_bucket

logger = logging.getLogger(__name__)

DATASET_DIR = "dataset"
COVERED_KEY = "dataset/_covered.parquet"
SCHEMA_KEY = "dataset/_index/schema.json"
FORMAT = 1
ROW_GROUP_ROWS = 64  # images held at once while a Parquet shard is written
_META_KEY = b"step1x_export"
_TS = pa.timestamp("us", tz="UTC")
INDEX_SCHEMA = pa.schema([
    ("id", pa.string()), ("fingerprint", pa.string()), ("output_uri", pa.string()),
    ("instruction", pa.string()), ("seed", pa.int64()), ("model_id", pa.string()),
    ("run_id", pa.string()), ("finished_at", _TS), ("extra", pa.string()),
])
FIXED_COLUMNS = ("id", "image", "instruction", "seed", "fingerprint", "model_id", "run_id")
_ARROW_TYPES = {"string": pa.string(), "json": pa.string(), "bool": pa.bool_(), "int64": pa.int64(),
                "float64": pa.float64(), None: pa.string()}
_HF_DTYPES = {"string": "string", "json": "string", "bool": "bool", "int64": "int64",
              "float64": "float64", None: "string"}
_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_SHARD_FILE = re.compile(r"^shard-\d+-of-\d+\.(parquet|tar)$")


class Confirms(Protocol):
    """What the export needs of the output root's lease (``job.lease.Lease``)."""

    def confirm(self) -> bool: ...


# ---------------------------------------------------------------------------------------------
# Where things are.


def data_key(shard: int, shards: int) -> str:
    return f"{DATASET_DIR}/data/shard-{shard:05d}-of-{shards:05d}.parquet"


def tar_key(shard: int, shards: int) -> str:
    return f"{DATASET_DIR}/webdataset/shard-{shard:05d}-of-{shards:05d}.tar"


def index_key(shard: int) -> str:
    return f"{DATASET_DIR}/_index/shard-{shard:05d}.parquet"


# ---------------------------------------------------------------------------------------------
# Column types of the extra columns: one type per column for every shard (load_dataset
# concatenates the shards), decided from every ok record seen; the join below only widens.


def value_type(value: Any) -> str | None:
    """A JSON value's column type: None (null), bool, int64, float64, string or json (the rest)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int64" if -(2 ** 63) <= value < 2 ** 63 else "json"
    if isinstance(value, float):
        return "float64"
    if isinstance(value, str):
        return "string"
    return "json"


def join_type(a: str | None, b: str | None) -> str | None:
    """The narrowest type holding both: ints and floats make float64, any other mix is JSON text."""
    if a is None or a == b:
        return b
    if b is None:
        return a
    if {a, b} == {"int64", "float64"}:
        return "float64"
    return "json"


def merge_types(*docs: dict[str, str | None]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for doc in docs:
        for name, t in doc.items():
            out[name] = join_type(out.get(name), t) if name in out else t
    return dict(sorted(out.items()))


def _extras(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        doc = json.loads(text)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def extra_types(extra: Iterable[str | None]) -> dict[str, str | None]:
    """The types of the extra columns in some records' ``extra`` JSON texts."""
    out: dict[str, str | None] = {}
    for text in extra:
        for name, value in _extras(text).items():
            t = value_type(value)
            out[name] = join_type(out[name], t) if name in out else t
    return dict(sorted(out.items()))


def column_name(name: str) -> str:
    """An extra column's name in the dataset: its own, unless a fixed column has it."""
    while name in FIXED_COLUMNS:
        name = f"extra_{name}"
    return name


def schema_digest(types: dict[str, str | None]) -> str:
    return hashlib.sha256(json.dumps(types, sort_keys=True).encode()).hexdigest()[:16]


def parquet_schema(types: dict[str, str | None]) -> pa.Schema:
    """The Parquet shards' schema, with the ``datasets`` features (``image`` an Image feature)."""
    fields = [("id", pa.string()), ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
              ("instruction", pa.string()), ("seed", pa.int64()), ("fingerprint", pa.string()),
              ("model_id", pa.string()), ("run_id", pa.string())]
    features: dict[str, Any] = {name: {"dtype": "int64" if name == "seed" else "string", "_type": "Value"}
                                for name, _ in fields}
    features["image"] = {"_type": "Image"}
    for name, t in types.items():
        fields.append((column_name(name), _ARROW_TYPES[t]))
        features[column_name(name)] = {"dtype": _HF_DTYPES[t], "_type": "Value"}
    hf = json.dumps({"info": {"features": features}})
    return pa.schema(fields, metadata={b"huggingface": hf.encode()})


def typed_value(value: Any, t: str | None) -> Any:
    """An extra value as its column's type stores it (JSON text for ``json`` columns)."""
    if value is None:
        return None
    if t == "json":
        return json.dumps(value, sort_keys=True, ensure_ascii=False, default=str)
    if t == "float64":
        return float(value)
    return value


# ---------------------------------------------------------------------------------------------
# One shard's bytes: deterministic (same rows, same bytes).


def webdataset_key(row_id: str) -> str:
    """A row's WebDataset key: the id when it is plain, else a safe form plus a short hash of the
    id (webdataset splits a member name at its first '.'; the real id is in ``<key>.json``)."""
    if _PLAIN_KEY.match(row_id):
        return row_id
    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", row_id)[:80].strip("_") or "row"
    return f"{safe}_{hashlib.sha256(row_id.encode()).hexdigest()[:12]}"


def _relative_key(output_uri: str, root: str) -> str:
    prefix = root.rstrip("/") + "/"
    return output_uri[len(prefix):] if output_uri.startswith(prefix) else posixpath.basename(output_uri)


def _image_ext(key: str, image_format: str) -> str:
    ext = posixpath.splitext(key)[1].lstrip(".").lower()
    if ext and re.match(r"^[a-z0-9]+$", ext):
        return ext
    return "jpg" if image_format == "jpeg" else image_format


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


@dataclass(frozen=True)
class _ShardJob:
    """What every shard task needs (small, picklable)."""

    output_uri: str
    options: StorageOptions | None
    shards: int
    parquet: bool
    webdataset: bool
    image_format: str
    types: dict[str, str | None]
    schema: str  # digest of types
    full: bool  # fold only the records given (a rebuild), not the shard's previous index


class _ShardFiles:
    """The shard's temporary files, written one row at a time (Parquet in row groups)."""

    def __init__(self, job: _ShardJob, folder: str) -> None:
        self.job, self.types = job, job.types
        self.schema = parquet_schema(job.types)
        self.pq_path = os.path.join(folder, "shard.parquet") if job.parquet else None
        self.tar_path = os.path.join(folder, "shard.tar") if job.webdataset else None
        self.writer = pq.ParquetWriter(self.pq_path, self.schema, compression="zstd") if self.pq_path else None
        self.tar = tarfile.open(self.tar_path, "w", format=tarfile.PAX_FORMAT) if self.tar_path else None
        self.pending: list[dict[str, Any]] = []
        self.rows = 0

    def add(self, record: dict[str, Any], image: bytes) -> None:
        key = _relative_key(record["output_uri"], self.job.output_uri)
        extras = _extras(record["extra"])
        fixed = {"id": record["id"], "instruction": record["instruction"], "seed": record["seed"],
                 "fingerprint": record["fingerprint"], "model_id": record["model_id"], "run_id": record["run_id"]}
        named = {column_name(name): value for name, value in extras.items()}
        if self.writer is not None:
            row = {**fixed, "image": {"bytes": image, "path": key}}
            row.update({column_name(n): typed_value(extras.get(n), t) for n, t in self.types.items()})
            self.pending.append(row)
            if len(self.pending) >= ROW_GROUP_ROWS:
                self._flush()
        if self.tar is not None:
            wkey = webdataset_key(record["id"])
            doc = json.dumps({**named, **fixed}, sort_keys=True, ensure_ascii=False, default=str)
            _add_member(self.tar, f"{wkey}.{_image_ext(key, self.job.image_format)}", image)
            _add_member(self.tar, f"{wkey}.json", doc.encode())
            _add_member(self.tar, f"{wkey}.txt", (record["instruction"] or "").encode())
        self.rows += 1

    def _flush(self) -> None:
        if self.pending:
            self.writer.write_table(pa.Table.from_pylist(self.pending, schema=self.schema),
                                    row_group_size=ROW_GROUP_ROWS)
            self.pending = []

    def close(self) -> None:
        if self.writer is not None:
            self._flush()
            self.writer.close()
        if self.tar is not None:
            self.tar.close()


def _put_file(path: str, uri: str, options: StorageOptions | None) -> None:
    """One whole-object put of a local file: a local target is renamed into place from a
    temporary name beside it; a remote one is one upload (complete or absent)."""
    try:
        fs, target = filesystem(uri, options)
        if is_local(uri):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = os.path.join(os.path.dirname(target), f".tmp-{uuid.uuid4().hex}-{os.path.basename(target)}")
            with open(path, "rb") as src, open(tmp, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            os.replace(tmp, target)
        else:
            fs.put_file(path, target)
    except Exception as exc:  # noqa: BLE001 - any storage failure stops the export, named
        raise RowError(WRITE_FAILED, f"Could not write the dataset shard {redact_uri(uri)} "
                                     f"({type(exc).__name__}: {exc})") from None


# ---------------------------------------------------------------------------------------------
# Tasks.


def _ok_records(output_uri: str, options: StorageOptions | None, key: str) -> pa.Table | None:
    part = read_part(join_uri(output_uri, key), options, [*INDEX_SCHEMA.names, "status"])
    if part is None:
        return None
    keep = pc.and_(pc.fill_null(pc.equal(part.column("status"), "ok"), False), pc.is_valid(part.column("output_uri")))
    return part.filter(keep).select(INDEX_SCHEMA.names).cast(INDEX_SCHEMA)


def _split_records(output_uri: str, options: StorageOptions | None, parts: list[str], shards: int) -> list[Any]:
    """Map task: the ok records of some log parts split by shard; the last value says which parts
    could not be read (left for the next export) and the extra columns' types."""
    tables, unreadable = [], []
    for key in parts:
        records = _ok_records(output_uri, options, key)
        if records is None:
            unreadable.append(key)
        else:
            tables.append(records)
    table = pa.concat_tables(tables) if tables else INDEX_SCHEMA.empty_table()
    types = extra_types(table.column("extra").to_pylist())
    return [*split_by_bucket(table, shards), {"unreadable": unreadable, "types": types}]


def _read_index(job: _ShardJob, shard: int) -> tuple[pa.Table | None, dict[str, Any] | None]:
    uri = join_uri(job.output_uri, index_key(shard))
    try:
        if not exists(uri, job.options):
            return None, None
        table = pq.read_table(io.BytesIO(read_bytes(uri, job.options)))
        meta = json.loads((table.schema.metadata or {})[_META_KEY])
        return table.replace_schema_metadata(None).select(INDEX_SCHEMA.names).cast(INDEX_SCHEMA), meta
    except Exception as exc:  # noqa: BLE001 - a damaged index: the shard is rebuilt from the logs
        logger.warning("dataset index %s is unreadable (%s); rebuilding from the logs", redact_uri(uri), exc)
        return None, None


def content_digest(records: pa.Table) -> str:
    """A digest of the sorted (id, fingerprint, output_uri): what a shard's rows are."""
    h = hashlib.sha256()
    for i, fp, uri in zip(*(records.column(c).to_pylist() for c in ("id", "fingerprint", "output_uri"))):
        h.update(json.dumps([i, fp, uri]).encode() + b"\n")
    return h.hexdigest()[:32]


def _fold(tables: list[pa.Table]) -> pa.Table:
    """Each id's latest ok record (rows.state's order: by finished_at, ties to the later one), by id."""
    tables = [t for t in tables if t is not None and t.num_rows]
    if not tables:
        return INDEX_SCHEMA.empty_table()
    latest = latest_per_id(pa.concat_tables(tables).combine_chunks())
    return latest.take(pc.sort_indices(latest, sort_keys=[("id", "ascending")]))


def _unchanged(job: _ShardJob, shard: int, meta: dict[str, Any] | None, new: dict[str, Any]) -> bool:
    if meta is None or any(meta.get(k) != new[k] for k in ("format", "shards", "schema", "content")):
        return False
    if meta.get("missing"):  # a row left out last time (its output unreadable): look again
        return False
    for on, kind, key in ((job.parquet, "parquet", data_key), (job.webdataset, "webdataset", tar_key)):
        if on and not (meta.get(kind) and exists(join_uri(job.output_uri, key(shard, job.shards)), job.options)):
            return False
    return True


def _failpoint(name: str) -> None:
    """Tests stop an export at a named point (``STEP1X_BATCH_FAILPOINT=name``): it raises there,
    as a killed process would stop."""
    if os.environ.get("STEP1X_BATCH_FAILPOINT") == name:
        raise RuntimeError(f"failpoint {name}")


def _write_shard(job: _ShardJob, shard: int, records: pa.Table) -> tuple[int, list[tuple[str, str, str]]]:
    """Write the shard's enabled files; returns (rows written, unreadable outputs (id, uri, code))."""
    missing: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="step1x-export-") as folder:
        files = _ShardFiles(job, folder)
        try:
            for record in records.to_pylist():
                try:
                    image = read_bytes(record["output_uri"], job.options)
                except RowError as e:
                    if e.code in TRANSIENT_CODES:
                        raise
                    missing.append((record["id"], record["output_uri"], e.code))
                    continue
                files.add(record, image)
        finally:
            files.close()
        if files.pq_path:
            _put_file(files.pq_path, join_uri(job.output_uri, data_key(shard, job.shards)), job.options)
        if files.tar_path:
            _put_file(files.tar_path, join_uri(job.output_uri, tar_key(shard, job.shards)), job.options)
    return files.rows, missing


def _export_shard(job: _ShardJob, shard: int, *tables: pa.Table) -> dict[str, Any]:
    """Shard task: fold the shard's index with its new records; when what it holds changed,
    write its files, then its index. Returns what it did."""
    old, meta = _read_index(job, shard)
    if old is None and not job.full:
        return {"shard": shard, "status": "need_rebuild"}  # the index is gone: fold every log part
    records = _fold(([] if job.full else [old]) + list(tables))
    new = {"format": FORMAT, "shards": job.shards, "schema": job.schema, "content": content_digest(records),
           "parquet": job.parquet, "webdataset": job.webdataset}
    if _unchanged(job, shard, meta, new):
        return {"shard": shard, "status": "unchanged", "rows": int(meta.get("rows", 0)), "missing": []}
    rows, missing = _write_shard(job, shard, records)
    _failpoint(f"export-shard-{shard}-before-index")
    new.update(rows=rows, missing=len(missing))
    index = records.replace_schema_metadata({_META_KEY: json.dumps(new, sort_keys=True).encode()})
    buf = io.BytesIO()
    pq.write_table(index, buf, compression="zstd")
    write_bytes(join_uri(job.output_uri, index_key(shard)), buf.getvalue(), job.options)
    return {"shard": shard, "status": "written", "rows": rows, "missing": missing}


# ---------------------------------------------------------------------------------------------
# The driver.


@dataclass
class ExportResult:
    shards_written: int
    shards_unchanged: int
    shards_removed: int  # files of another shard count or of a kind switched off
    rows: int  # ok rows in the dataset
    seconds: float
    missing: int = 0  # rows left out of the shards written now: their output cannot be read
    unreadable_parts: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # one line per missing row (20 at most)

    def line(self) -> str:
        return (f"dataset: {self.rows} rows; {self.shards_written} shards written, {self.shards_unchanged} "
                f"unchanged, {self.shards_removed} stale files removed in {self.seconds:.1f} s"
                + (f"; {self.missing} rows left out (their output cannot be read)" if self.missing else ""))


def default_tasks() -> Any:
    """Ray tasks when Ray is up (a job's driver), else in this process."""
    import ray

    return RayTasks() if ray.is_initialized() else LocalTasks()


def _read_covered(output_uri: str, options: StorageOptions | None) -> tuple[list[str] | None, dict[str, Any]]:
    uri = join_uri(output_uri, COVERED_KEY)
    try:
        if not exists(uri, options):
            return None, {}
        table = pq.read_table(io.BytesIO(read_bytes(uri, options)))
        meta = json.loads((table.schema.metadata or {}).get(_META_KEY, b"{}"))
        return table.column("part").to_pylist(), meta
    except Exception as exc:  # noqa: BLE001 - derived data: rebuilt from the logs
        logger.warning("%s is unreadable (%s); rebuilding the dataset index from the logs", redact_uri(uri), exc)
        return None, {}


def _read_types(output_uri: str, options: StorageOptions | None) -> dict[str, str | None] | None:
    uri = join_uri(output_uri, SCHEMA_KEY)
    try:
        return json.loads(read_bytes(uri, options))["columns"] if exists(uri, options) else None
    except Exception:  # noqa: BLE001 - rebuilt from the logs
        return None


def _confirm(lease: Confirms | None, output_uri: str, what: str) -> None:
    if lease is not None and not lease.confirm():
        raise LeaseLost(f"the lease on {redact_uri(output_uri)} is no longer this run's; the dataset "
                        f"export stopped before writing {what} (the next export finishes it)")


def _shard_calls(job: _ShardJob, splits: list[list[Any]], lease: Confirms | None) -> Iterator[tuple]:
    """The shard tasks' arguments, the lease confirmed before each (a task runs, or is submitted,
    as it is drawn)."""
    for b in range(job.shards):
        _confirm(lease, job.output_uri, data_key(b, job.shards))
        yield (job, b, *[s[b] for s in splits])


def _remove_stale(output_uri: str, options: StorageOptions | None, shards: int, parquet: bool,
                  webdataset: bool) -> int:
    """Remove shard files of another count or of a kind switched off, index files past the count
    and temporary files a killed export left. Returns how many shard files were removed."""
    fs, root = filesystem(output_uri, options)
    keep = {posixpath.basename(data_key(b, shards)) for b in range(shards) if parquet}
    keep |= {posixpath.basename(tar_key(b, shards)) for b in range(shards) if webdataset}
    keep |= {posixpath.basename(index_key(b)) for b in range(shards)} | {posixpath.basename(SCHEMA_KEY)}
    removed = 0
    for sub in ("data", "webdataset", "_index"):
        folder = posixpath.join(root.rstrip("/"), DATASET_DIR, sub)
        try:
            names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(folder, detail=False)]
        except FileNotFoundError:
            continue
        for name in sorted(set(names) - keep):
            if not (name.startswith(".tmp-") or _SHARD_FILE.match(name) or (sub == "_index" and name.startswith("shard-"))):
                continue  # not ours
            fs.rm(posixpath.join(folder, name))
            if sub != "_index" and not name.startswith(".tmp-"):
                removed += 1
    return removed


def _missing_lines(results: list[dict[str, Any]]) -> list[str]:
    missing = [m for r in results for m in r.get("missing", [])]
    lines = [f"warning: dataset export left out row {row_id!r}: its output {redact_uri(uri)} cannot be read "
             f"({code})" for row_id, uri, code in missing[:20]]
    if len(missing) > 20:
        lines.append(f"warning: dataset export left out {len(missing) - 20} more rows whose output cannot be read")
    return lines


def _write_covered(output_uri: str, options: StorageOptions | None, parts: list[str], shards: int) -> None:
    meta = json.dumps({"format": FORMAT, "shards": shards}, sort_keys=True).encode()
    table = pa.table({"part": pa.array(parts, pa.string())}).replace_schema_metadata({_META_KEY: meta})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_bytes(join_uri(output_uri, COVERED_KEY), buf.getvalue(), options)


def _types_for(output_uri: str, options: StorageOptions | None, full: bool, found: list[dict],
               lease: Confirms | None) -> dict[str, str | None]:
    """The extra columns' types: the stored ones (unless rebuilding) widened by the new records';
    ``schema.json`` is written before any shard that uses them."""
    previous = None if full else _read_types(output_uri, options)
    types = merge_types(previous or {}, *found)
    if types != previous:
        _confirm(lease, output_uri, SCHEMA_KEY)
        doc = json.dumps({"format": FORMAT, "columns": types}, indent=1, sort_keys=True) + "\n"
        write_bytes(join_uri(output_uri, SCHEMA_KEY), doc.encode(), options)
    return types


def export_dataset(output_uri: str, options: StorageOptions | None, *, parquet: bool, webdataset: bool,
                   shards: int, image_format: str, tasks: Any = None, lease: Confirms | None = None,
                   rebuild: bool = False, parts_per_task: int = 64) -> ExportResult:
    """Bring ``dataset/`` under ``output_uri`` up to date with the row log (see the module doc).

    The caller holds the root's lease; pass it as ``lease`` and it is confirmed before each shard
    and before ``_covered``. ``tasks``: :class:`RayTasks` / :class:`LocalTasks` (default: Ray's when
    Ray is up). ``rebuild``: ignore ``_covered`` and fold every log part."""
    start = time.monotonic()
    tasks = tasks or default_tasks()
    covered, meta = (None, {}) if rebuild else _read_covered(output_uri, options)
    full = covered is None or meta.get("shards") != shards or meta.get("format") != FORMAT
    covered_set = set() if full else set(covered)
    new = [p for p in log_part_keys(output_uri, options) if p not in covered_set]
    chunks = [new[i:i + parts_per_task] for i in range(0, len(new), parts_per_task)]
    splits = tasks.map(_split_records, [(output_uri, options, c, shards) for c in chunks], num_returns=shards + 1)
    reports = tasks.get([s[-1] for s in splits])
    types = _types_for(output_uri, options, full, [r["types"] for r in reports], lease)
    job = _ShardJob(output_uri, options, shards, parquet, webdataset, image_format, types,
                    schema_digest(types), full)
    results = tasks.get(tasks.map(_export_shard, _shard_calls(job, splits, lease)))
    if any(r["status"] == "need_rebuild" for r in results):
        logger.warning("a dataset index under %s is missing; rebuilding from every log part", redact_uri(output_uri))
        return export_dataset(output_uri, options, parquet=parquet, webdataset=webdataset, shards=shards,
                              image_format=image_format, tasks=tasks, lease=lease, rebuild=True,
                              parts_per_task=parts_per_task)
    unreadable = sorted({p for r in reports for p in r["unreadable"]})
    done = sorted(covered_set | (set(new) - set(unreadable)))
    if full or done != sorted(covered_set):
        _confirm(lease, output_uri, COVERED_KEY)
        _write_covered(output_uri, options, done, shards)
    removed = _remove_stale(output_uri, options, shards, parquet, webdataset)
    written = [r for r in results if r["status"] == "written"]
    lines = _missing_lines(results)
    for line in lines:
        logger.warning(line)
    return ExportResult(
        shards_written=len(written), shards_unchanged=len(results) - len(written), shards_removed=removed,
        rows=sum(int(r["rows"]) for r in results), seconds=time.monotonic() - start,
        missing=sum(len(r["missing"]) for r in written), unreadable_parts=unreadable, warnings=lines)


def export_for(cfg: JobConfig, tasks: Any = None, lease: Confirms | None = None) -> ExportResult | None:
    """The export a job config asks for (``output.dataset`` / ``output.webdataset``), or None."""
    out = cfg.output
    if not (out.dataset or out.webdataset):
        return None
    return export_dataset(out.uri, cfg.output_storage(), parquet=out.dataset, webdataset=out.webdataset,
                          shards=out.dataset_shards, image_format=out.format, tasks=tasks, lease=lease)
