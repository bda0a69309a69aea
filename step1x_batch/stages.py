"""The Ray Data graph: manifest -> normalise + skip done -> prepare (CPU) -> edit (actors) -> write.

Each stage takes and returns a ``pyarrow.Table`` with a fixed schema (:data:`ROW_SCHEMA`, then
:data:`rowlog.LOG_SCHEMA` after the write stage), so blocks from different tasks always concatenate
and no column's type depends on which rows a batch happened to hold. Images cross stages as raw
RGB bytes plus their shape, never as PIL objects (Ray cannot size those). A row that fails anywhere
keeps flowing with ``error_type`` set; later stages pass it through untouched, and the driver
turns every row that reaches it into exactly one log record.

The driver (``runner.py``) streams the last stage's output and writes the row log itself, part by
part; a row counts as done only once the part holding its record has landed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import pyarrow as pa

from step1x_batch import errors
from step1x_batch.config import JobConfig
from step1x_batch.editor import EditOutput, EditParams, EditRow, Editor, EditorSpec, load_editor
from step1x_batch.errors import RowError
from step1x_batch.images import decode_image, encode_image
from step1x_batch.manifest import MANIFEST_OPTIONAL, MANIFEST_REQUIRED, normalize_batch
from step1x_batch.rowlog import LOG_SCHEMA
from step1x_batch.storage import StorageOptions, join_uri, read_bytes, safe_output_key, write_bytes

_TS = pa.timestamp("us", tz="UTC")

# The working schema between stages. ``pixels`` holds raw RGB uint8 bytes of shape (pix_h, pix_w, 3):
# the decoded input after `prepare`, the edited output after `edit`, nothing after `write`.
ROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("fingerprint", pa.string()),
        ("image_uri", pa.string()),
        ("instruction", pa.string()),
        ("seed", pa.int64()),
        ("num_steps", pa.int64()),
        ("guidance_scale", pa.float64()),
        ("size_level", pa.int64()),
        ("negative_prompt", pa.string()),
        ("output_key", pa.string()),
        ("error_type", pa.string()),
        ("error_message", pa.string()),
        ("extra", pa.string()),
        ("attempt", pa.int64()),
        ("worker", pa.string()),
        ("started_at", _TS),
        ("input_width", pa.int64()),
        ("input_height", pa.int64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("preprocess_ms", pa.float64()),
        ("edit_ms", pa.float64()),
        ("pixels", pa.large_binary()),
        ("pix_h", pa.int64()),
        ("pix_w", pa.int64()),
    ]
)

_NORMALISED = {
    "id", "fingerprint", "image_uri", "instruction", "seed", "num_steps", "guidance_scale",
    "size_level", "negative_prompt", "output_key", "error_type", "error_message",
}
# Columns that are never "manifest extras" (ours, or ones normalize_batch may add).
_NOT_EXTRA = _NORMALISED | set(MANIFEST_REQUIRED) | set(MANIFEST_OPTIONAL) | set(LOG_SCHEMA.names)


def _now() -> float:
    return time.time()


def _ts(seconds: float) -> int:
    return int(seconds * 1e6)


def worker_label() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema) if rows else schema.empty_table()


def _message(exc: BaseException) -> str:
    return errors.redact(f"{type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------------------------
# The done index: which (id, fingerprint) pairs earlier runs already settled.


def row_key(row_id: str | None, fingerprint: str | None) -> bytes:
    """A 16-byte key for (id, fingerprint): the done index stays ~16 bytes per row at any scale."""
    text = f"{row_id or ''}\x00{fingerprint or ''}".encode()
    return hashlib.blake2b(text, digest_size=16).digest()


def id_key(row_id: str | None) -> bytes:
    return hashlib.blake2b(f"{row_id or ''}".encode(), digest_size=16).digest()


@dataclass
class DoneIndex:
    """Sorted key arrays broadcast to every normalise task (one object-store copy per node).

    ``done``: rows that must not run again: an ``ok`` record, or an ``error`` record whose type is
    final (not in ``runtime.retry_error_types``), with the same id and fingerprint.
    ``seen_ids`` / ``seen_counts``: how many records each id already has (for ``attempt``).
    """

    done: np.ndarray  # dtype S16, sorted, unique
    seen_ids: np.ndarray  # dtype S16, sorted, unique
    seen_counts: np.ndarray  # int64, aligned with seen_ids

    @classmethod
    def empty(cls) -> "DoneIndex":
        e = np.array([], dtype="S16")
        return cls(e, e.copy(), np.array([], dtype=np.int64))

    def __len__(self) -> int:
        return int(self.done.size)

    @staticmethod
    def _member(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
        if sorted_keys.size == 0 or keys.size == 0:
            return np.zeros(keys.shape, dtype=bool)
        pos = np.searchsorted(sorted_keys, keys)
        pos[pos >= sorted_keys.size] = 0
        return sorted_keys[pos] == keys

    def is_done(self, keys: np.ndarray) -> np.ndarray:
        return self._member(self.done, keys)

    def attempts_before(self, ids: np.ndarray) -> np.ndarray:
        if self.seen_ids.size == 0 or ids.size == 0:
            return np.zeros(ids.shape, dtype=np.int64)
        pos = np.searchsorted(self.seen_ids, ids)
        pos[pos >= self.seen_ids.size] = 0
        hit = self.seen_ids[pos] == ids
        return np.where(hit, self.seen_counts[pos], 0)


def build_done_index(records: Iterable[pa.Table], retry_error_types: Sequence[str]) -> DoneIndex:
    """Fold log records (tables with id, fingerprint, status, error_type) into a DoneIndex."""
    retry = set(retry_error_types)
    retry_all = "*" in retry
    done: list[bytes] = []
    ids: list[bytes] = []
    for table in records:
        cols = table.to_pydict()
        for rid, fp, status, etype in zip(cols["id"], cols["fingerprint"], cols["status"], cols["error_type"]):
            ids.append(id_key(rid))
            if status == "ok" or (status == "error" and not retry_all and etype not in retry):
                done.append(row_key(rid, fp))
    done_arr = np.unique(np.array(done, dtype="S16")) if done else np.array([], dtype="S16")
    if ids:
        seen, counts = np.unique(np.array(ids, dtype="S16"), return_counts=True)
    else:
        seen, counts = np.array([], dtype="S16"), np.array([], dtype=np.int64)
    return DoneIndex(done_arr, seen, counts.astype(np.int64))


def read_log_records(output_uri: str, options: StorageOptions | None) -> Iterable[pa.Table]:
    """Yield (id, fingerprint, status, error_type) of every landed log part under ``logs/``.

    Only whole parts exist (each part is written as one object), so a part a killed driver was
    writing is either fully here or absent.
    """
    from step1x_batch.storage import filesystem

    logs = join_uri(output_uri, "logs")
    fs, root = filesystem(logs, options)
    try:
        paths = sorted(p for p in fs.find(root) if p.endswith(".parquet"))
    except FileNotFoundError:
        return
    import pyarrow.parquet as pq

    columns = ["id", "fingerprint", "status", "error_type"]
    for path in paths:
        with fs.open(path, "rb") as f:
            yield pq.read_table(f, columns=columns)


# ---------------------------------------------------------------------------------------------
# Counters shared by all tasks (rows skipped, time spent normalising, storage retries).


def make_counters():
    """A tiny zero-CPU actor that tasks add to; the driver reads it at the end."""
    import ray

    @ray.remote(num_cpus=0)
    class Counters:
        def __init__(self) -> None:
            self.values: dict[str, float] = {}

        def add(self, deltas: dict[str, float]) -> None:
            for k, v in deltas.items():
                self.values[k] = self.values.get(k, 0) + v

        def snapshot(self) -> dict[str, float]:
            return dict(self.values)

    return Counters.remote()


def _add_counters(counters, deltas: dict[str, float]) -> None:
    if counters is None or not deltas:
        return
    import ray

    ray.get(counters.add.remote(deltas))


def _storage_retries() -> dict[str, float]:
    """This process's storage retry counter (storage.retry_count is per process, monotonic)."""
    from step1x_batch import storage

    return {"storage_retries": float(storage.retry_count())}


def _retry_delta(before: dict[str, float]) -> dict[str, float]:
    after = _storage_retries()
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


_INDEX_CACHE: dict[str, DoneIndex] = {}


def _resolve_index(index: Any) -> DoneIndex:
    """The broadcast index: an ObjectRef fetched once per worker process, or a DoneIndex."""
    if index is None:
        return DoneIndex.empty()
    if isinstance(index, DoneIndex):
        return index
    key = index.hex()
    if key not in _INDEX_CACHE:
        import ray

        _INDEX_CACHE.clear()
        _INDEX_CACHE[key] = ray.get(index)
    return _INDEX_CACHE[key]


# ---------------------------------------------------------------------------------------------
# Stage 1: normalise + skip done (Ray tasks, fused with the read).


@dataclass(frozen=True)
class NormaliseSettings:
    manifest_uri: str
    defaults: EditParams
    seed_base: int
    model_id: str
    image_format: str
    max_instruction_chars: int


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.generic,)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bytes):
        return value.hex()
    return value


def _extras_json(record: dict[str, Any], extra_cols: list[str]) -> str | None:
    if not extra_cols:
        return None
    extras = {c: _jsonable(record.get(c)) for c in extra_cols}
    return json.dumps(extras, default=str, ensure_ascii=False, sort_keys=True)


def _opt_int(value: Any) -> int | None:
    if value is None:
        return None
    try:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return int(value)
    except (TypeError, ValueError):
        return None


def _opt_float(value: Any) -> float | None:
    if value is None:
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _opt_str(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def normalise_and_skip(
    batch: pa.Table, *, settings: NormaliseSettings, index: Any = None, counters: Any = None
) -> pa.Table:
    """Manifest rows -> ROW_SCHEMA rows that still need work (done rows are counted and dropped)."""
    start = time.perf_counter()
    retries_before = _storage_retries()
    n_in = batch.num_rows
    if n_in == 0:
        return ROW_SCHEMA.empty_table()
    df = normalize_batch(
        batch,
        manifest_uri=settings.manifest_uri,
        defaults=settings.defaults,
        default_seed_base=settings.seed_base,
        model_id=settings.model_id,
        image_format=settings.image_format,
        max_instruction_chars=settings.max_instruction_chars,
    )
    done_index = _resolve_index(index)
    records = df.to_dict("records")
    keys = np.array([row_key(_opt_str(r.get("id")), _opt_str(r.get("fingerprint"))) for r in records], dtype="S16")
    done = done_index.is_done(keys)
    id_keys = np.array([id_key(_opt_str(r.get("id"))) for r in records], dtype="S16")
    before = done_index.attempts_before(id_keys)
    extra_cols = [c for c in df.columns if c not in _NOT_EXTRA and not str(c).startswith("_")]
    now = _ts(_now())
    out = []
    for rec, is_done, prev in zip(records, done, before):
        if is_done:
            continue
        etype = _opt_str(rec.get("error_type"))
        out.append(
            {
                "id": _opt_str(rec.get("id")),
                "fingerprint": _opt_str(rec.get("fingerprint")),
                "image_uri": _opt_str(rec.get("image_uri")),
                "instruction": _opt_str(rec.get("instruction")),
                "seed": _opt_int(rec.get("seed")),
                "num_steps": _opt_int(rec.get("num_steps")),
                "guidance_scale": _opt_float(rec.get("guidance_scale")),
                "size_level": _opt_int(rec.get("size_level")),
                "negative_prompt": _opt_str(rec.get("negative_prompt")),
                "output_key": _opt_str(rec.get("output_key")),
                "error_type": etype,
                "error_message": _opt_str(rec.get("error_message")) if etype else None,
                "extra": _extras_json(rec, extra_cols),
                "attempt": int(prev) + 1,
                "started_at": now,
            }
        )
    deltas = {
        "rows_read": float(n_in),
        "rows_skipped_done": float(n_in - len(out)),
        "normalise_ms": (time.perf_counter() - start) * 1e3,
    }
    deltas.update(_retry_delta(retries_before))
    _add_counters(counters, deltas)
    return _table(out, ROW_SCHEMA)


# ---------------------------------------------------------------------------------------------
# Stage 2: load + prepare on CPU tasks (fetch bytes, decode to RGB).


def _prepare_one(row: dict[str, Any], storage: StorageOptions | None, max_pixels: int) -> dict[str, Any]:
    if row["error_type"]:
        return row
    start = time.perf_counter()
    row["started_at"] = _ts(_now())
    try:
        if not row["image_uri"]:
            raise RowError(errors.INVALID_ROW, "the row has no image_uri")
        data = read_bytes(row["image_uri"], storage)
        image = decode_image(data, max_pixels)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise RowError(errors.CORRUPT_IMAGE, f"decoded to an unexpected array {image.dtype} {image.shape}")
        h, w = image.shape[:2]
        row.update(
            input_width=w, input_height=h, pix_h=h, pix_w=w,
            pixels=np.ascontiguousarray(image).tobytes(),
        )
    except RowError as e:
        row.update(error_type=e.code, error_message=e.message)
    except Exception as e:  # an unexpected failure is still one row, never a crashed job
        row.update(
            error_type=errors.READ_FAILED,
            error_message=f"could not load {errors.redact_uri(row['image_uri'] or '')}: {_message(e)}",
        )
    row["preprocess_ms"] = (time.perf_counter() - start) * 1e3
    return row


def prepare(
    batch: pa.Table, *, storage: StorageOptions | None, max_pixels: int, threads: int = 8, counters: Any = None
) -> pa.Table:
    """Fetch and decode each row's image (I/O-bound, so a few threads per task)."""
    rows = batch.to_pylist()
    if not rows:
        return ROW_SCHEMA.empty_table()
    retries_before = _storage_retries()
    worker = worker_label()
    for row in rows:
        row["worker"] = worker
    if len(rows) == 1 or threads <= 1:
        out = [_prepare_one(r, storage, max_pixels) for r in rows]
    else:
        with ThreadPoolExecutor(min(threads, len(rows))) as pool:
            out = list(pool.map(lambda r: _prepare_one(r, storage, max_pixels), rows))
    _add_counters(counters, _retry_delta(retries_before))
    return _table(out, ROW_SCHEMA)


# ---------------------------------------------------------------------------------------------
# Stage 3: edit on an actor pool (one editor per actor, loaded once).


def stage_weights(uri: str, options: StorageOptions | None, cache_dir: str | None = None) -> str:
    """Make object-storage weights a local folder, once per node (file lock + completion marker).

    Local folders are returned as they are. Every actor on a node calls this; the first downloads
    into a temporary folder and renames it into place, the others wait on the lock and reuse it.
    """
    if not uri or "://" not in uri or uri.startswith("file://"):
        return uri[len("file://"):] if uri.startswith("file://") else uri
    from filelock import FileLock

    from step1x_batch.storage import filesystem

    root = Path(cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "step1x-batch", "weights"))
    root.mkdir(parents=True, exist_ok=True)
    name = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    dest = root / name
    marker = dest / ".staged-complete"
    if marker.exists():
        return str(dest)
    with FileLock(str(root / f"{name}.lock")):
        if marker.exists():
            return str(dest)
        fs, base = filesystem(uri, options)
        base = base.rstrip("/")
        tmp = root / f"{name}.partial-{uuid.uuid4().hex[:8]}"
        for remote in fs.find(base):
            rel = remote[len(base):].lstrip("/")
            if not rel:
                continue
            local = tmp / rel
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(local))
        if dest.exists():
            import shutil

            shutil.rmtree(dest)
        os.replace(tmp, dest)
        marker.write_text(uri)
    return str(dest)


class EditStage:
    """Ray Data callable class: each actor builds one editor in ``__init__`` and keeps it.

    An exception from the editor for a whole batch does not kill the job: the batch is retried row
    by row and a row that still raises becomes an ``edit_failed`` error row.
    """

    def __init__(
        self,
        spec: EditorSpec,
        weights_storage: StorageOptions | None = None,
        weights_cache_dir: str | None = None,
        editor: Editor | None = None,
    ) -> None:
        if editor is None:
            if spec.kind != "null":
                from dataclasses import replace

                spec = replace(spec, weights=stage_weights(spec.weights, weights_storage, weights_cache_dir))
            editor = load_editor(spec)
        self.editor = editor
        self.worker = worker_label()

    def _edit(self, rows: list[EditRow]) -> list[EditOutput | BaseException]:
        try:
            outputs = list(self.editor.edit_rows(rows))
            if len(outputs) != len(rows):
                raise RuntimeError(f"editor returned {len(outputs)} outputs for {len(rows)} rows")
            return outputs
        except Exception as batch_error:
            if len(rows) == 1:
                return [batch_error]
        results: list[EditOutput | BaseException] = []
        for row in rows:  # fall back to one row at a time: only the rows that fail, fail
            try:
                out = list(self.editor.edit_rows([row]))
                results.append(out[0] if len(out) == 1 else RuntimeError(f"editor returned {len(out)} outputs for 1 row"))
            except Exception as e:
                results.append(e)
        return results

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        todo = [r for r in rows if not r["error_type"]]
        edit_rows = []
        for r in todo:
            image = np.frombuffer(r["pixels"], dtype=np.uint8).reshape(r["pix_h"], r["pix_w"], 3)
            params = EditParams(
                num_steps=int(r["num_steps"]),
                guidance_scale=float(r["guidance_scale"]),
                size_level=int(r["size_level"]),
                negative_prompt=r["negative_prompt"] or "",
            )
            edit_rows.append(EditRow(image=image, instruction=r["instruction"], seed=int(r["seed"]), params=params))
        results = self._edit(edit_rows) if edit_rows else []
        for r, result in zip(todo, results):
            r["worker"] = self.worker
            r["pixels"] = None
            if isinstance(result, BaseException):
                r.update(error_type=errors.EDIT_FAILED, error_message=f"the editor raised {_message(result)}")
                continue
            r.update(edit_ms=float(result.edit_ms), width=int(result.width), height=int(result.height))
            if result.error_type:
                r.update(error_type=result.error_type, error_message=result.error_message or result.error_type)
                continue
            img = result.image
            if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                desc = f"{getattr(img, 'dtype', type(img).__name__)} {getattr(img, 'shape', '')}"
                r.update(error_type=errors.EDIT_FAILED, error_message=f"the editor returned {desc}, not an RGB uint8 image")
                continue
            r.update(pixels=np.ascontiguousarray(img).tobytes(), pix_h=img.shape[0], pix_w=img.shape[1])
        return _table(rows, ROW_SCHEMA)


# ---------------------------------------------------------------------------------------------
# Stage 4: encode + write (CPU tasks) -> log records.


@dataclass(frozen=True)
class WriteSettings:
    output_uri: str
    storage: StorageOptions | None
    image_format: str
    quality: int
    model_id: str
    run_id: str


def _write_one(row: dict[str, Any], s: WriteSettings) -> dict[str, Any]:
    if row["error_type"]:
        return row
    start = time.perf_counter()
    try:
        image = np.frombuffer(row["pixels"], dtype=np.uint8).reshape(row["pix_h"], row["pix_w"], 3)
        data = encode_image(image, s.image_format, s.quality)
        uri = join_uri(s.output_uri, safe_output_key(row["output_key"] or ""))
        write_bytes(uri, data, s.storage)
        row["output_uri"] = uri  # referenced only now that the whole object is written
    except RowError as e:
        row.update(error_type=e.code, error_message=e.message)
    except Exception as e:
        row.update(
            error_type=errors.WRITE_FAILED,
            error_message=f"could not write the output {row['output_key']!r}: {_message(e)}",
        )
    row["write_ms"] = (time.perf_counter() - start) * 1e3
    return row


def to_log_records(rows: list[dict[str, Any]], s: WriteSettings) -> pa.Table:
    now = _ts(_now())
    records = []
    for r in rows:
        ok = not r["error_type"]
        rec = {name: r.get(name) for name in LOG_SCHEMA.names}
        rec.update(
            status="ok" if ok else "error",
            output_uri=r.get("output_uri") if ok else None,
            error_type=None if ok else r["error_type"],
            error_message=None if ok else (r.get("error_message") or r["error_type"]),
            model_id=s.model_id,
            run_id=s.run_id,
            finished_at=now,
        )
        records.append(rec)
    return _table(records, LOG_SCHEMA)


def write_outputs(batch: pa.Table, *, settings: WriteSettings, threads: int = 8, counters: Any = None) -> pa.Table:
    """Encode and write each edited image to its deterministic key; return LOG_SCHEMA records."""
    rows = batch.to_pylist()
    if not rows:
        return LOG_SCHEMA.empty_table()
    retries_before = _storage_retries()
    if len(rows) == 1 or threads <= 1:
        out = [_write_one(r, settings) for r in rows]
    else:
        with ThreadPoolExecutor(min(threads, len(rows))) as pool:
            out = list(pool.map(lambda r: _write_one(r, settings), rows))
    _add_counters(counters, _retry_delta(retries_before))
    return to_log_records(out, settings)


# ---------------------------------------------------------------------------------------------
# Resource plan (issue 44687: an actor pool that takes every CPU slot starves the read tasks).


@dataclass(frozen=True)
class ActorPlan:
    min_size: int
    max_size: int
    num_cpus: float
    num_gpus: float
    note: str = ""


def plan_actors(cfg: JobConfig, cluster: dict[str, float]) -> ActorPlan:
    """Size the edit pool so that ``resources.reserved_cpus`` CPU slots always stay free for tasks."""
    r = cfg.resources
    total_cpus = float(cluster.get("CPU", 0.0))
    total_gpus = float(cluster.get("GPU", 0.0))
    free_cpus = total_cpus - r.reserved_cpus
    if free_cpus <= 0:
        raise ValueError(
            f"resources.reserved_cpus ({r.reserved_cpus}) leaves no CPU for the edit actors "
            f"(the Ray cluster has {total_cpus:g} CPUs)"
        )
    num_cpus = min(r.cpus_per_actor, free_cpus)
    note = ""
    if num_cpus < r.cpus_per_actor:
        note = f"cpus_per_actor lowered to {num_cpus:g} to keep {r.reserved_cpus:g} CPU(s) free for I/O tasks"
    by_cpu = int(math.floor(free_cpus / num_cpus + 1e-9))
    if r.num_gpus_per_actor > 0:
        if total_gpus < r.num_gpus_per_actor:
            raise ValueError(
                f"resources.num_gpus_per_actor is {r.num_gpus_per_actor:g} but the Ray cluster has "
                f"{total_gpus:g} GPUs (set it to 0 to run on CPU)"
            )
        fit = min(by_cpu, int(math.floor(total_gpus / r.num_gpus_per_actor + 1e-9)))
    else:
        fit = by_cpu
    fit = max(fit, 1)
    if r.num_actors is not None:
        lo = hi = min(r.num_actors, fit)
    else:
        hi = min(r.max_actors or fit, fit)
        lo = min(r.min_actors, hi)
    return ActorPlan(lo, hi, num_cpus, r.num_gpus_per_actor, note)


# ---------------------------------------------------------------------------------------------
# The graph.


def read_manifest(uri: str, options: StorageOptions | None):
    """A Ray dataset over the manifest file(s), read with an explicit pyarrow filesystem."""
    import ray

    from step1x_batch.manifest import manifest_files
    from step1x_batch.storage import arrow_filesystem

    files = manifest_files(uri, options)
    if not files:
        raise FileNotFoundError(f"no manifest files found at {errors.redact_uri(uri)}")
    groups: dict[str, list[str]] = {}
    fs = None
    for f in files:
        fs, path = arrow_filesystem(f, options)
        lower = f.lower().split("?")[0]
        if lower.endswith(".parquet") or lower.endswith(".pq"):
            kind = "parquet"
        elif lower.endswith(".csv") or lower.endswith(".tsv"):
            kind = "csv"
        else:
            kind = "json"
        groups.setdefault(kind, []).append(path)
    parts = []
    for kind, paths in groups.items():
        if kind == "parquet":
            parts.append(ray.data.read_parquet(paths, filesystem=fs, partitioning=None, file_extensions=None))
        elif kind == "csv":
            parts.append(ray.data.read_csv(paths, filesystem=fs, partitioning=None))
        else:
            parts.append(ray.data.read_json(paths, filesystem=fs, lines=True, partitioning=None, file_extensions=None))
    ds = parts[0]
    for other in parts[1:]:
        ds = ds.union(other)
    return ds


def build_dataset(cfg: JobConfig, *, index_ref: Any, counters: Any, plan: ActorPlan, weights_cache_dir: str | None = None):
    """manifest -> normalise + skip -> prepare -> edit (actor pool) -> write; yields LOG_SCHEMA blocks."""
    import ray

    r = cfg.resources
    model_id = cfg.model.resolved_model_id()
    settings = NormaliseSettings(
        manifest_uri=cfg.input.manifest,
        defaults=cfg.sampling.edit_params(),
        seed_base=cfg.sampling.seed_base,
        model_id=model_id,
        image_format=cfg.output.format,
        max_instruction_chars=cfg.runtime.max_instruction_chars,
    )
    ds = read_manifest(cfg.input.manifest, cfg.input.storage)
    ds = ds.map_batches(
        normalise_and_skip,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs={"settings": settings, "index": index_ref, "counters": counters},
        num_cpus=r.io_cpus_per_task,
    )
    ds = ds.map_batches(
        prepare,
        batch_format="pyarrow",
        batch_size=r.io_batch_size,
        fn_kwargs={"storage": cfg.input.storage, "max_pixels": cfg.runtime.max_pixels, "counters": counters},
        num_cpus=r.io_cpus_per_task,
    )
    ds = ds.map_batches(
        EditStage,
        batch_format="pyarrow",
        batch_size=r.edit_batch_size,
        compute=ray.data.ActorPoolStrategy(
            min_size=plan.min_size,
            max_size=plan.max_size,
            max_tasks_in_flight_per_actor=r.max_tasks_in_flight_per_actor,
        ),
        fn_constructor_kwargs={
            "spec": cfg.editor_spec(),
            "weights_storage": cfg.model_storage(),
            "weights_cache_dir": weights_cache_dir or cfg.model.cache_dir,
        },
        num_cpus=plan.num_cpus,
        num_gpus=plan.num_gpus,
    )
    write_settings = WriteSettings(
        output_uri=cfg.output.uri,
        storage=cfg.output_storage(),
        image_format=cfg.output.format,
        quality=cfg.output.quality,
        model_id=model_id,
        run_id=cfg.runtime.run_id,
    )
    ds = ds.map_batches(
        write_outputs,
        batch_format="pyarrow",
        batch_size=r.io_batch_size,
        fn_kwargs={"settings": write_settings, "counters": counters},
        num_cpus=r.io_cpus_per_task,
    )
    return ds
