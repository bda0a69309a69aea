"""The Ray Data graph: manifest -> skip done -> normalise -> prepare (CPU) -> edit (actors) -> write.

Each stage owns its resources, as in ``ray.data.llm``'s processors: reading, decoding and the model
family's CPU ``prepare`` (resizing, the VLM image processor, tokenisation, rope positions) run in
CPU tasks; the GPU actors receive ready arrays and only run the model; the family's ``finish``
(resize back), encoding and writing run in CPU tasks again. The job knows a model only through
:mod:`step1x_batch.models.base` and the family registry.

Each stage takes and returns a ``pyarrow.Table`` with a fixed schema (:data:`ROW_SCHEMA`, then
:data:`rowlog.LOG_SCHEMA` after the write stage), so blocks from different tasks always concatenate
and no column's type depends on which rows a batch happened to hold. Prepared rows cross stages as
safetensors bytes, edited images as raw RGB bytes plus their shape, never as PIL objects. A row
that fails anywhere keeps flowing with ``error_type`` set; later stages pass it through untouched,
and the driver turns every row that reaches it into exactly one log record.

The driver (``runner.py``) streams the last stage's output and writes the row log itself, part by
part; a row counts as done only once the part holding its record has landed.
"""

from __future__ import annotations

import math
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from step1x_batch import errors
from step1x_batch.job import skip
from step1x_batch.job.config import JobConfig
from step1x_batch.errors import RowError
from step1x_batch.io.images import decode_image, encode_image
from step1x_batch.rows.manifest import (
    NORMALIZED_SCHEMA,
    NormalizeSettings,
    manifest_files,
    manifest_format,
    normalize_batch,
    read_manifest_file,
)
from step1x_batch.models import adapter_switcher, load_family
from step1x_batch.models.base import (
    AdapterRef,
    AdapterSpec,
    EditOutput,
    EditParams,
    EditRequest,
    Engine,
    ModelFamily,
    ModelSpec,
    Prepared,
    Preparer,
    RowFailure,
    edit_prepared,
)
from step1x_batch.job.counters import add_counters
from step1x_batch.judge.stage import InlineJudge, judge_log_rows
from step1x_batch.rows.digest import manifest_row_digests
from step1x_batch.rows.log import LOG_SCHEMA
from step1x_batch.rows.sources import IMAGE_BYTES, adapt_table, is_embedded, stored_input_uri
from step1x_batch.rows.state import StatePointer, decide
from step1x_batch.io import storage
from step1x_batch.io.storage import (
    StorageOptions,
    arrow_filesystem,
    exists,
    join_uri,
    read_bytes,
    safe_output_key,
    write_bytes,
)
from step1x_batch.io.weights import WeightsSource, format_bytes, sha256_file

_TS = pa.timestamp("us", tz="UTC")

# The working schema between stages. ``prepared`` holds the family's prepared row (safetensors
# bytes, see models.base.Prepared) from `prepare` to `edit`; ``pixels`` raw RGB uint8 bytes of shape
# (pix_h, pix_w, 3) from `edit` to `write`.
ROW_SCHEMA = pa.schema(
    list(NORMALIZED_SCHEMA)  # what normalise passes on (``extra`` is the JSON of extra columns)
    + [
        ("attempt", pa.int64()),
        ("worker", pa.string()),
        ("started_at", _TS),
        ("input_width", pa.int64()),  # of the first input image
        ("input_height", pa.int64()),
        ("input_widths", pa.list_(pa.int64())),  # of every input image, in order
        ("input_heights", pa.list_(pa.int64())),
        ("width", pa.int64()),  # the size the model runs at
        ("height", pa.int64()),
        ("preprocess_ms", pa.float64()),
        ("edit_ms", pa.float64()),
        ("batch_key", pa.string()),
        ("prepared", pa.large_binary()),
        ("pixels", pa.large_binary()),
        ("pix_h", pa.int64()),
        ("pix_w", pa.int64()),
        ("source_digest", pa.uint64()),  # of the raw manifest row: a later skip compares it first
        # a row's embedded images (rows.sources), normalise -> prepare only: dropped once decoded
        (IMAGE_BYTES, pa.list_(pa.large_binary())),
    ]
)
_NORMALISED_COLUMNS = tuple(NORMALIZED_SCHEMA.names)


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
# Counters shared by all tasks (rows skipped, time spent normalising, storage retries).


def _storage_retries() -> dict[str, float]:
    """This process's storage retry counter (storage.retry_count is per process, monotonic)."""
    return {"storage_retries": float(storage.retry_count())}


def _retry_delta(before: dict[str, float]) -> dict[str, float]:
    after = _storage_retries()
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v - before.get(k, 0.0)}


# ---------------------------------------------------------------------------------------------
# One family (and one preparer) per worker process, built on first use.

_FAMILIES: dict[str, ModelFamily] = {}
_PREPARERS: dict[str, Preparer] = {}


def family_for(spec: ModelSpec) -> ModelFamily:
    key = repr(spec)
    if key not in _FAMILIES:
        _FAMILIES[key] = load_family(spec)
    return _FAMILIES[key]


def preparer_for(spec: ModelSpec, weights: WeightsSource) -> Preparer:
    """The family's CPU prepare, with only its ``prepare_files`` staged on this node."""
    key = repr((spec, weights))
    if key not in _PREPARERS:
        family = family_for(spec)
        folder = weights.local_folder(family.prepare_files) if family.prepare_files else None
        _PREPARERS[key] = family.preparer(folder)
    return _PREPARERS[key]


# ---------------------------------------------------------------------------------------------
# Stage 1: normalise + skip done (Ray tasks, fused with the read).


def normalize_settings(cfg: JobConfig, manifest_uri: str | None = None) -> NormalizeSettings:
    """The job's normalisation settings, the only builder from a config: the jobs built on this
    one (pairs, catalog) use it to predict the fingerprints the row log will hold."""
    family = cfg.family()  # the one route to the model id
    return NormalizeSettings(
        manifest_uri=manifest_uri or cfg.input.manifest,
        defaults=cfg.edit_defaults(),
        seed_base=cfg.sampling.seed_base,
        model_id=family.model_id(),
        image_format=cfg.output.format,
        max_instruction_chars=cfg.runtime.max_instruction_chars,
        image_quality=cfg.output.quality,
        max_images=family.max_images,
        set_model_ids=tuple(sorted(cfg.set_model_ids().items())),
    )


def _with_schema(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table``'s columns of ``schema`` (missing ones null), in its order and types."""
    n = table.num_rows
    return pa.table({f.name: table.column(f.name).cast(f.type) if f.name in table.column_names
                     else pa.nulls(n, f.type) for f in schema}, schema=schema)


def _mark_duplicates(table: pa.Table, duplicate_of: pa.ChunkedArray) -> pa.Table:
    """Rows the skip join found giving an earlier row's id: DUPLICATE_ROW errors naming it."""
    dup = pc.and_(pc.is_valid(duplicate_of), pc.is_null(table.column("error_type")))
    if not pc.any(dup).as_py():
        return table
    message = pc.binary_join_element_wise(
        "Row ", table.column("id"), ": its id is already taken by ", duplicate_of,
        " earlier in the manifest; two rows would give one id two results. Give each row its own "
        "id (or drop the repeated row).", "")
    for name, value in (("error_type", pa.scalar(errors.DUPLICATE_ROW)), ("error_message", message),
                        ("fingerprint", pa.scalar(None, pa.string()))):
        i = table.schema.get_field_index(name)
        table = table.set_column(i, name, pc.if_else(dup, value, table.column(name)))
    return table


def normalise_rows(batch: pa.Table, *, settings: NormalizeSettings, retried: Sequence[str] = (),
                   counters: Any = None) -> pa.Table:
    """Raw manifest rows -> ROW_SCHEMA rows that still need work. Rows from the skip join carry
    their id's state (``__state_*``): those done by fingerprint are counted and dropped; rows
    without it (a root with no state) are all work."""
    start = time.perf_counter()
    retries_before = _storage_retries()
    if batch.num_rows == 0:
        return ROW_SCHEMA.empty_table()
    joined = skip.STATE_PREFIX + "attempts" in batch.column_names
    raw = batch.drop_columns(skip.internal_columns(batch))
    table = normalize_batch(raw, settings)
    if skip.DUPLICATE_OF in batch.column_names:
        table = _mark_duplicates(table, batch.column(skip.DUPLICATE_OF))
    digests = (batch.column(skip.DIGEST) if skip.DIGEST in batch.column_names
               else manifest_row_digests(raw, settings))
    if joined:
        state = skip.state_rows(batch)
        done = decide(table.column("fingerprint"), digests, state, retried)
        skipped_errors = skip.skipped_errors(done, state)
        attempts = pc.fill_null(state.column("attempts"), 0)
    else:
        done = np.zeros(batch.num_rows, dtype=bool)
        skipped_errors = 0
        attempts = pa.array(np.zeros(batch.num_rows, dtype=np.int64))
    keep = pa.array(~done)
    carried = [IMAGE_BYTES] if IMAGE_BYTES in table.column_names else []
    table = table.select(list(_NORMALISED_COLUMNS) + carried).filter(keep)
    no_error = pc.fill_null(pc.equal(pc.fill_null(table.column("error_type"), ""), ""), True)
    table = table.set_column(table.schema.get_field_index("error_message"), "error_message",
                             pc.if_else(no_error, pa.nulls(table.num_rows, pa.string()), table.column("error_message")))
    table = table.append_column("attempt", pc.add(pc.filter(attempts, keep), 1).cast(pa.int64()))
    table = table.append_column("started_at", pa.array([_ts(_now())] * table.num_rows, _TS))
    table = table.append_column("source_digest", pc.filter(digests, keep))
    deltas = {"rows_skipped_done": float(int(done.sum())), "rows_skipped_error": float(skipped_errors),
              "normalise_ms": (time.perf_counter() - start) * 1e3}
    if not joined:
        deltas["rows_read"] = float(batch.num_rows)  # joined rows were counted by the join
    deltas.update(_retry_delta(retries_before))
    add_counters(counters, deltas)
    return _with_schema(table, ROW_SCHEMA)


# ---------------------------------------------------------------------------------------------
# Stage 2: load + prepare on CPU tasks (fetch bytes, decode to RGB, the family's CPU prepare).


@dataclass(frozen=True)
class PrepareSettings:
    storage: StorageOptions | None
    max_pixels: int
    model: ModelSpec
    weights: WeightsSource
    threads: int = 8
    max_image_bytes: int | None = None  # input.max_image_bytes
    output_uri: str | None = None  # where embedded inputs are kept (rows.sources.stored_input_uri)
    output_storage: StorageOptions | None = None


def _embedded_bytes(row: dict[str, Any], i: int, uri: str, s: PrepareSettings) -> bytes:
    """Input ``i`` (1-based) of a row whose image came inside the manifest: its bytes, kept once
    under the output root (content-addressed) so the log, the judge and the report can read it."""
    blobs = row.get(IMAGE_BYTES) or []
    data = blobs[i - 1] if i <= len(blobs) else None
    if data is None:
        raise RowError(errors.READ_FAILED, f"the embedded image {uri} did not reach the prepare stage")
    if s.max_image_bytes is not None and len(data) > s.max_image_bytes:
        raise RowError(errors.IMAGE_TOO_LARGE, f"the embedded image is {len(data):,} bytes, over "
                       f"input.max_image_bytes ({s.max_image_bytes:,})")
    if s.output_uri:
        copy = stored_input_uri(uri, s.output_uri)
        try:
            if not exists(copy, s.output_storage):
                write_bytes(copy, data, s.output_storage)
        except Exception as e:  # the edit needs no copy, the log's readers do: retried next run
            raise RowError(errors.WRITE_FAILED, f"could not keep the input at {errors.redact_uri(copy)}: "
                           f"{_message(e)}") from None
    return data


def _load_images(row: dict[str, Any], s: PrepareSettings) -> list[np.ndarray]:
    """Fetch and decode every input of a row; a failure names the input (position and URI)."""
    uris = row["image_uris"] or ([row["image_uri"]] if row["image_uri"] else [])
    if not uris:
        raise RowError(errors.INVALID_ROW, "the row has no input image")
    images = []
    for i, uri in enumerate(uris, 1):
        where = f"image {i} of {len(uris)} ({errors.redact_uri(uri)}): " if len(uris) > 1 else ""
        try:
            data = _embedded_bytes(row, i, uri, s) if is_embedded(uri) else read_bytes(uri, s.storage, s.max_image_bytes)
            image = decode_image(data, s.max_pixels)
        except RowError as e:
            raise RowError(e.code, where + e.message) from None
        except Exception as e:  # an unexpected failure is still one row, never a crashed job
            raise RowError(errors.READ_FAILED, f"{where}could not load {errors.redact_uri(uri)}: {_message(e)}") from None
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise RowError(errors.CORRUPT_IMAGE, f"{where}decoded to an unexpected array {image.dtype} {image.shape}")
        images.append(np.ascontiguousarray(image))
    return images


def _request(row: dict[str, Any], images: list[np.ndarray]) -> EditRequest:
    params = EditParams(
        num_steps=int(row["num_steps"]),
        guidance_scale=float(row["guidance_scale"]),
        size_level=int(row["size_level"]),
        negative_prompt=row["negative_prompt"] or "",
        blend_instruction=row["blend_instruction"],
        blend_scale=float(row["blend_scale"]),
    )
    return EditRequest(images=images, instruction=row["instruction"], seed=int(row["seed"]), params=params)


def prepare(batch: pa.Table, *, settings: PrepareSettings, counters: Any = None) -> pa.Table:
    """Fetch and decode each row's images (I/O-bound: a few threads per task), then run the
    model family's CPU prepare on each (CPU-bound: in this task's own thread, one row at a time)."""
    rows = batch.to_pylist()
    if not rows:
        return ROW_SCHEMA.empty_table()
    retries_before = _storage_retries()
    worker = worker_label()
    for row in rows:
        row["worker"] = worker
    todo = [r for r in rows if not r["error_type"]]

    def load(row: dict[str, Any]) -> list[np.ndarray] | RowError:
        t0 = time.perf_counter()
        row["started_at"] = _ts(_now())
        try:
            return _load_images(row, settings)
        except RowError as e:
            return e
        finally:
            row["preprocess_ms"] = (time.perf_counter() - t0) * 1e3

    if len(todo) <= 1 or settings.threads <= 1:
        loaded = [load(r) for r in todo]
    else:
        with ThreadPoolExecutor(min(settings.threads, len(todo))) as pool:
            loaded = list(pool.map(load, todo))
    preparer = preparer_for(settings.model, settings.weights) if todo else None
    for row, images in zip(todo, loaded):
        if isinstance(images, RowError):
            row.update(error_type=images.code, error_message=images.message)
            continue
        row.update(
            input_width=images[0].shape[1], input_height=images[0].shape[0],
            input_widths=[im.shape[1] for im in images], input_heights=[im.shape[0] for im in images],
        )
        t0 = time.perf_counter()
        try:
            ready = preparer(_request(row, images))
            row.update(prepared=ready.to_bytes(), batch_key=ready.key, width=ready.width, height=ready.height)
        except RowFailure as e:
            row.update(error_type=e.code, error_message=errors.redact(e.message))
        except Exception as e:  # a bug or an input the family cannot handle: one row, not the job
            row.update(error_type=errors.PREPARE_FAILED, error_message=f"the model's prepare raised {_message(e)}")
        row["preprocess_ms"] = (row["preprocess_ms"] or 0.0) + (time.perf_counter() - t0) * 1e3
    for row in rows:
        row[IMAGE_BYTES] = None  # decoded: the pixels travel in ``prepared``
    add_counters(counters, _retry_delta(retries_before))
    return _table(rows, ROW_SCHEMA)


# ---------------------------------------------------------------------------------------------
# Stage 3: edit on an actor pool (one engine per actor, loaded once).


def staged_adapter(weights: WeightsSource, adapter: AdapterRef):
    """The adapter as a local file, refused if its bytes are not the ones the job's model id was
    made from (a file replaced while the job runs would give rows of two different models)."""
    path = weights.local_file(adapter.uri)
    digest = sha256_file(path)
    if digest != adapter.sha256:
        raise RuntimeError(
            f"the adapter {errors.redact_uri(adapter.uri)} changed since the job started (sha256 {digest[:16]}, "
            f"expected {adapter.sha256[:16]}); re-run the job to use the new file"
        )
    return path


class EditStage:
    """Ray Data callable class: each actor loads the family's engine in ``__init__`` and keeps it.

    The actor only runs the model on prepared arrays. An exception from the engine for a whole
    batch does not kill the job: the batch is retried row by row and a row that still raises
    becomes an ``edit_failed`` error row.
    """

    def __init__(self, spec: ModelSpec, weights: WeightsSource, engine: Engine | None = None,
                 counters: Any = None) -> None:
        self.family = family_for(spec)
        self.max_batch_size = spec.max_batch_size
        self.worker = worker_label()
        self.counters = counters
        if engine is None:
            try:
                engine = self._load(spec, weights)
            except Exception as e:
                # The job stops on this one sentence (file and cause), not on Ray's tracebacks.
                message = f"the model failed to load on {self.worker}: {_message(e)}"
                if counters is not None:
                    import ray

                    ray.get(counters.set_fatal.remote(message))
                raise
        self.engine = engine
        self.unusable: dict[str, str] = {}  # adapter sets this actor could not stage: why
        self.switcher = self._switcher(spec, weights) if spec.adapter_sets else None
        self._state("ready")

    def _switcher(self, spec: ModelSpec, weights: WeightsSource) -> Any:
        """The adapter sets staged on this node and ready to switch (the engine holds the base). A
        set that cannot be staged or does not fit the model fails its own rows, not the actor."""
        switcher = adapter_switcher(self.family, self.engine)
        for name, refs in spec.adapter_sets:
            try:
                switcher.add_set(name, [AdapterSpec(staged_adapter(weights, a), a.scale, a.format) for a in refs])
            except Exception as e:
                self.unusable[name] = f"the adapter set {name!r} cannot be used on {self.worker}: {_message(e)}"
        return switcher

    def _state(self, state: str) -> None:
        if self.counters is not None:
            self.counters.set_state.remote(self.worker, state)  # fire and forget

    def _load(self, spec: ModelSpec, weights: WeightsSource) -> Engine:
        # local_folder / local_file stage object-storage files once per node (file lock).
        self._state("staging weights")
        adapters = [AdapterSpec(staged_adapter(weights, a), a.scale, a.format) for a in spec.adapters]
        folder = weights.local_folder(
            progress=lambda done, total: self._state(f"staging weights {format_bytes(done)} of {format_bytes(total)}"))
        self._state("loading the model")
        return self.family.load(folder, spec.device, adapters) if adapters else self.family.load(folder, spec.device)

    def _edit_by_set(self, rows: list[dict[str, Any]]) -> list[EditOutput | BaseException]:
        """Rows grouped by adapter set, the set already active first (fewer switches); each group
        edited with its set active. A set that cannot be activated fails its rows, not the job."""
        if self.switcher is None:
            return self._edit([Prepared.from_bytes(r["prepared"]) for r in rows])
        groups: dict[str | None, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(r.get("adapters") or None, []).append(i)
        order = sorted(groups, key=lambda name: (name != self.switcher.active, name or ""))
        results: list[EditOutput | BaseException] = [RuntimeError("not edited")] * len(rows)
        for name in order:
            idx = groups[name]
            if name in self.unusable:
                for i in idx:
                    results[i] = RuntimeError(self.unusable[name])
                continue
            before = self.switcher.switches
            try:
                self.switcher.activate(name)
            except Exception as e:
                for i in idx:
                    results[i] = RuntimeError(f"the adapter set {name!r} could not be switched in: {_message(e)}")
                continue
            if self.switcher.switches != before:
                add_counters(self.counters, {"adapter_switches": 1.0,
                                             "adapter_switch_ms": self.switcher.last_switch_s * 1e3})
            for i, out in zip(idx, self._edit([Prepared.from_bytes(rows[i]["prepared"]) for i in idx])):
                results[i] = out
        return results

    def _edit(self, rows: list[Prepared]) -> list[EditOutput | BaseException]:
        try:
            return list(edit_prepared(self.engine, rows, self.max_batch_size))
        except Exception as batch_error:
            if len(rows) == 1:
                return [batch_error]
        results: list[EditOutput | BaseException] = []
        for row in rows:  # fall back to one row at a time: only the rows that fail, fail
            try:
                results.append(edit_prepared(self.engine, [row], 1)[0])
            except Exception as e:
                results.append(e)
        return results

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        todo = [r for r in rows if not r["error_type"]]
        self._state("busy")
        try:
            results = self._edit_by_set(todo) if todo else []
        finally:
            self._state("ready")
        for r, result in zip(todo, results):
            r["worker"] = self.worker
            r["prepared"] = None
            if isinstance(result, BaseException):
                r.update(error_type=errors.EDIT_FAILED, error_message=f"the model raised {_message(result)}")
                continue
            r["edit_ms"] = float(result.edit_ms)
            if result.error_type:
                r.update(error_type=result.error_type, error_message=errors.redact(result.error_message or result.error_type))
                continue
            img = result.image
            if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                desc = f"{getattr(img, 'dtype', type(img).__name__)} {getattr(img, 'shape', '')}"
                r.update(error_type=errors.EDIT_FAILED, error_message=f"the model returned {desc}, not an RGB uint8 image")
                continue
            r.update(pixels=np.ascontiguousarray(img).tobytes(), pix_h=img.shape[0], pix_w=img.shape[1])
        return _table(rows, ROW_SCHEMA)


# ---------------------------------------------------------------------------------------------
# Stage 4: finish + encode + write (CPU tasks) -> log records.


@dataclass(frozen=True)
class WriteSettings:
    output_uri: str
    storage: StorageOptions | None
    image_format: str
    quality: int
    model_id: str
    run_id: str
    model: ModelSpec
    set_model_ids: tuple[tuple[str, str], ...] = ()  # a row of an adapter set is logged with its id


def _write_one(row: dict[str, Any], s: WriteSettings, family: ModelFamily) -> dict[str, Any]:
    if row["error_type"]:
        return row
    start = time.perf_counter()
    try:
        image = np.frombuffer(row["pixels"], dtype=np.uint8).reshape(row["pix_h"], row["pix_w"], 3)
        image = family.finish(image, list(zip(row["input_widths"], row["input_heights"])))
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


def _shown_input(uri: str, s: WriteSettings) -> str:
    """An input as the log names it: credentials redacted, an embedded image by its kept copy."""
    return errors.redact_uri(stored_input_uri(uri, s.output_uri))


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
            # the log and the report are read by people: no user:password@ or signed query in them
            image_uri=_shown_input(r["image_uri"], s) if r.get("image_uri") else r.get("image_uri"),
            image_uris=[_shown_input(u, s) for u in r["image_uris"]] if r.get("image_uris") else None,
            model_id=dict(s.set_model_ids).get(r.get("adapters") or "", s.model_id),
            run_id=s.run_id,
            finished_at=now,
        )
        records.append(rec)
    return _table(records, LOG_SCHEMA)


def write_outputs(batch: pa.Table, *, settings: WriteSettings, threads: int = 8, counters: Any = None) -> pa.Table:
    """Finish (the family's resize back), encode and write each edited image to its
    deterministic key; return LOG_SCHEMA records."""
    rows = batch.to_pylist()
    if not rows:
        return LOG_SCHEMA.empty_table()
    retries_before = _storage_retries()
    family = family_for(settings.model)
    if len(rows) == 1 or threads <= 1:
        out = [_write_one(r, settings, family) for r in rows]
    else:
        with ThreadPoolExecutor(min(threads, len(rows))) as pool:
            out = list(pool.map(lambda r: _write_one(r, settings, family), rows))
    add_counters(counters, _retry_delta(retries_before))
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
    reserved = max(r.reserved_cpus, r.io_cpus_per_task)  # at least one I/O task can always run
    free_cpus = total_cpus - reserved
    if free_cpus <= 0:
        raise ValueError(
            f"resources.reserved_cpus ({reserved:g}) leaves no CPU for the edit actors "
            f"(the Ray cluster has {total_cpus:g} CPUs)"
        )
    num_cpus = min(r.cpus_per_actor, free_cpus)
    notes = []
    if num_cpus < r.cpus_per_actor:
        notes.append(f"cpus_per_actor lowered to {num_cpus:g} to keep {reserved:g} CPU(s) free for I/O tasks")
    if r.num_gpus_per_actor == 0 and num_cpus == r.io_cpus_per_task:
        notes.append("io_cpus_per_task equals the actors' CPUs: Ray fuses prepare into the edit actors")
    note = "; ".join(notes)
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
    for name, amount in r.custom_per_actor.items():  # the edit group's own resource bounds the pool
        if amount > 0 and float(cluster.get(name, 0.0)) < amount:
            raise ValueError(f"resources.custom_per_actor asks {amount:g} {name} per edit actor but the Ray "
                             f"cluster has {float(cluster.get(name, 0.0)):g} (which nodes advertise it?)")
        if amount > 0:
            fit = min(fit, int(math.floor(float(cluster.get(name, 0.0)) / amount + 1e-9)))
    fit = max(fit, 1)
    if r.num_actors is not None:
        lo = hi = min(r.num_actors, fit)
    else:
        cap = r.max_actors
        if cap is None and r.num_gpus_per_actor == 0 and not cfg.model.family_class().lightweight:
            cap = 1  # a model on CPU: one copy (torch uses every core), unless max_actors says more
        hi = min(cap or fit, fit)
        lo = min(r.min_actors, hi)
    return ActorPlan(lo, hi, num_cpus, r.num_gpus_per_actor, note)


# ---------------------------------------------------------------------------------------------
# The graph.


def read_manifest(uri: str, options: StorageOptions | None, num_cpus: float | None = None,
                  columns: dict[str, Any] | None = None):
    """A Ray dataset over the manifest file(s), read with an explicit pyarrow filesystem.

    (pyarrow's own S3 client ignores ``AWS_ENDPOINT_URL``; a bare ``s3://`` path would go to AWS.)
    Streaming: Ray reads file by file (Parquet by row group), so the driver never holds the table.
    """
    import ray

    files = manifest_files(uri, options)  # FileNotFoundError / ValueError (mixed formats)
    fmt = manifest_format(files[0])
    if fmt == "parquet":
        fs, _ = arrow_filesystem(files[0], options)
        paths = [arrow_filesystem(f, options)[1] for f in files]
        ds = ray.data.read_parquet(paths, filesystem=fs, partitioning=None, file_extensions=None,
                                   num_cpus=num_cpus)
        # the column map and embedded images, fused into the read tasks (rows.sources)
        return ds.map_batches(adapt_table, batch_format="pyarrow", batch_size=None,
                              fn_kwargs={"columns": columns}, num_cpus=num_cpus)
    # JSON Lines, CSV and WebDataset shards: the manifest module's own reader (a fixed schema,
    # every value text, a line or member that cannot be read one row with its problem), one task
    # and one block per file.
    files_ds = ray.data.from_items([{"path": f} for f in files], override_num_blocks=len(files))
    return files_ds.map_batches(read_manifest_file, batch_size=1, batch_format="pyarrow",
                                fn_kwargs={"options": options, "columns": columns}, num_cpus=num_cpus)


def skip_candidates(cfg: JobConfig, state: StatePointer, counters: Any) -> list[Any]:
    """The skip join over the manifest: object refs of the rows not proven done (nothing is
    fetched). The driver runs it before the graph, so that a run with no row left starts no edit
    actor and loads no model."""
    return skip.skip_join(cfg.input.manifest, cfg.input.storage, settings=normalize_settings(cfg),
                          columns=cfg.input.columns,
                          pointer=state, output_uri=cfg.output.uri, options=cfg.output_storage(),
                          retried=cfg.runtime.retried_error_types(), counters=counters)


def write_settings(cfg: JobConfig, settings: NormalizeSettings, spec: ModelSpec) -> WriteSettings:
    return WriteSettings(output_uri=cfg.output.uri, storage=cfg.output_storage(), image_format=cfg.output.format,
                         quality=cfg.output.quality, model_id=settings.model_id, run_id=cfg.runtime.run_id,
                         model=spec, set_model_ids=settings.set_model_ids)


def build_dataset(cfg: JobConfig, *, state: StatePointer | None, counters: Any, plan: ActorPlan,
                  candidates: list[Any] | None = None, judge: InlineJudge | None = None):
    """manifest -> skip done (a join with the root's state) -> normalise -> prepare -> edit
    (actor pool) -> write; yields LOG_SCHEMA blocks (with ``judge``: -> measure -> judge -> parse,
    blocks of scores carrying each row's log record, see :func:`~step1x_batch.judge.stage.split_judged`). Without a state (nothing logged yet) every
    row is work and the manifest streams straight into normalise. ``candidates``: the join's
    result when the driver ran it already (:func:`skip_candidates`)."""
    import ray

    r = cfg.resources
    settings = normalize_settings(cfg)
    spec, weights = cfg.model_spec(), cfg.weights_source()
    retried = cfg.runtime.retried_error_types()
    if state is None:
        ds = read_manifest(cfg.input.manifest, cfg.input.storage, num_cpus=r.io_cpus_per_task,
                           columns=cfg.input.columns)
    else:
        if candidates is None:
            candidates = skip_candidates(cfg, state, counters)
        ds = ray.data.from_arrow_refs(candidates)
    ds = ds.map_batches(
        normalise_rows,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs={"settings": settings, "retried": retried, "counters": counters},
        num_cpus=r.io_cpus_per_task,
        max_retries=r.task_max_retries,
    )
    # A manifest file arrives as one block (a JSONL / CSV file, a Parquet row group): cut it into
    # small blocks so that image fetching fans out over many tasks, pixels stream through the
    # object store in small pieces and log records reach the driver as rows finish.
    ds = ds.repartition(target_num_rows_per_block=r.io_batch_size)
    prepare_settings = PrepareSettings(
        storage=cfg.input.storage, max_pixels=cfg.runtime.max_pixels, model=spec, weights=weights,
        threads=r.io_threads_per_task, max_image_bytes=cfg.input.max_image_bytes,
        output_uri=cfg.output.uri, output_storage=cfg.output_storage(),
    )
    ds = ds.map_batches(
        prepare,
        batch_format="pyarrow",
        batch_size=r.io_batch_size,
        fn_kwargs={"settings": prepare_settings, "counters": counters},
        num_cpus=r.io_cpus_per_task,
        max_retries=r.task_max_retries,
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
        fn_constructor_kwargs={"spec": spec, "weights": weights, "counters": counters},
        num_cpus=plan.num_cpus,
        num_gpus=plan.num_gpus,
        resources=r.custom_per_actor or None,
    )
    ds = ds.map_batches(
        write_outputs,
        batch_format="pyarrow",
        batch_size=r.io_batch_size,
        fn_kwargs={"settings": write_settings(cfg, settings, spec), "counters": counters,
                   "threads": r.io_threads_per_task},
        num_cpus=r.io_cpus_per_task,
        max_retries=r.task_max_retries,
    )
    if judge is not None:  # score each edit as it lands, on the judge's own actors
        ds = judge_log_rows(ds, judge.config, judge.prompts, cfg.runtime.run_id, cfg.output_storage(),
                            cfg.runtime.max_pixels)
    return ds
