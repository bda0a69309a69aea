"""The manifest: finding its files, reading them, and turning raw rows into validated work.

A manifest is Parquet, JSON Lines or CSV (one file, a folder of them, or a glob; any fsspec URI)
with the columns of the row contract (docs/architecture.md). :func:`normalize_batch` is a pure
function of one batch of rows and one :class:`NormalizeSettings`, so it gives the same answer
however the manifest is split into batches, on any worker.

Row identity (``id``)
    A given ``id`` is kept (as text). Otherwise the id is a content hash: the first 20 hex digits
    of sha256 over a canonical JSON of the row's own contract fields -- the resolved ``image_uri``,
    the stripped ``instruction``, and whichever of ``seed``, ``negative_prompt``, ``num_steps``,
    ``guidance_scale``, ``size_level``, ``output_key`` the row itself sets (parsed, so ``"7"`` in a
    CSV and ``7`` in Parquet agree; a null cell counts as not set). Config defaults and extra
    columns are not part of it, so changing a default keeps every id (and output key) and only
    changes fingerprints: the rows are redone in place. A row that sets its own value for a
    parameter is a different piece of work from one that does not, so a sweep (same image and
    instruction, several seeds) gives distinct ids and outputs.

Duplicates
    Two identical rows (same fields, no id) get the same id: they are the same work. Both are
    processed and both are logged (one record per input row); they write the same bytes to the same
    key, and on a re-run both are skipped. Two *different* rows that give the same ``id``, or that
    would write the same output object (the same ``output_key``, or the ``images/<id>.<ext>`` of a
    given id), are not allowed: the later one is a DUPLICATE_ROW error naming the earlier one
    (:func:`mark_duplicates`, within a batch; the skip join compares every row of an id across
    batches and resumed runs), and a manifest small enough to read whole is refused before the run
    (:func:`step1x_batch.job.preflight.check_duplicates`).

Reading JSON Lines and CSV
    With a fixed schema: every value is read as text as it is written (JSON numbers, lists and
    objects as their JSON text), and this module types each row's values (so ``{"seed": 7}`` and
    ``{"seed": "7"}`` in one file are both seed 7). A line that is not a JSON object, has a list
    where one value goes, or (CSV) has more or fewer fields than the header is one INVALID_ROW
    error row naming the file and line (:data:`MANIFEST_PROBLEM`); no value can fail the others.

Per-row parameters
    ``num_steps``, ``size_level`` and ``guidance_scale`` have the config's bounds
    (:data:`NUM_STEPS_RANGE`, ...): a row may not ask for more work or memory than a config may.

Instruction policy
    Surrounding whitespace is stripped. Empty or whitespace-only -> EMPTY_INSTRUCTION. Longer
    than ``max_instruction_chars`` characters -> INSTRUCTION_TOO_LONG: the row is *rejected, not
    truncated*, because a silently shortened instruction is a different edit than the one asked
    for. ``max_instruction_chars <= 0`` disables the length check.

Seeds
    A given seed (an integer 0 <= seed < 2**63) is used as is. Otherwise the seed is derived from
    the id and ``default_seed_base``: sha256 -> an integer 0 <= seed < 2**31; stable across runs
    and batchings, and changed for every row by changing ``default_seed_base``.

Fingerprint
    sha256 over a canonical JSON of everything that changes the output bytes: the input identity
    (resolved URI, and its ETag when known), the instruction, every pixel-changing parameter
    (:class:`EditParams`), the seed, the model id, the output format (and quality for lossy
    formats). Extra columns, the id and the output key are not in it.

Several input images (``image_uris``)
    A row gives ``image_uri`` (one image) or ``image_uris`` (an ordered list; in CSV and JSON
    Lines a JSON list such as ``["a.png", "b.png"]``), and optionally ``image_etag`` or
    ``image_etags`` (a list aligned with the URIs). How many a row may have is the model family's
    (``max_images``): more is a TOO_MANY_IMAGES row. The id and the fingerprint cover the ordered
    list; a one-image row hashes exactly as an ``image_uri`` row, so both spellings are the same
    work.

Change marker (``image_etag``)
    An optional manifest column naming the *content version* of the image: an ETag, a content
    hash, an ``updated_at`` time -- anything that changes when the picture at ``image_uri``
    changes. It is folded into the fingerprint (not the id), so a row whose image was replaced
    under the same URI is redone in place on the next run, while an unchanged one is skipped.
    Values are compared as text (stripped; numbers and times in their canonical text form, so
    ``7`` and ``"7"`` agree); empty or null means "unknown" and leaves the fingerprint as if the
    column were absent. Without this column a changed image at an unchanged URI is *not* noticed.

Instruction templates
    :func:`fill_template` fills ``str.format`` fields (``{column}``) from a row; a field whose
    column is missing or null makes that row an error (INVALID_ROW), never a crash.
"""

from __future__ import annotations

import base64
import csv
import datetime as _dt
import decimal
import hashlib
import io
import json
import math
import os
import posixpath
import re
import string
from dataclasses import dataclass, fields
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from step1x_batch.errors import (
    DUPLICATE_ROW,
    EMPTY_INSTRUCTION,
    INSTRUCTION_TOO_LONG,
    INVALID_ROW,
    TOO_MANY_IMAGES,
    RowError,
    redact,
    redact_uri,
)
from step1x_batch.models.base import EditParams
from step1x_batch.io.images import image_extension, image_format as canonical_format
from step1x_batch.io.storage import StorageOptions, filesystem, parent_uri, safe_output_key, write_bytes
from step1x_batch.rows.log import LOG_SCHEMA
from step1x_batch.rows import webdataset
from step1x_batch.rows.sources import IMAGE_BYTES, MANIFEST_PROBLEM, adapt_table

MANIFEST_REQUIRED = ("instruction",)  # and one of IMAGE_COLUMNS
IMAGE_COLUMNS = ("image_uri", "image_uris")
MANIFEST_OPTIONAL = (
    "image_uri",
    "image_uris",
    "id",
    "seed",
    "negative_prompt",
    "num_steps",
    "guidance_scale",
    "size_level",
    "output_key",
    "image_etag",
    "image_etags",
    "blend_instruction",
    "blend_scale",
    "adapters",  # the name of one of model.adapter_sets (null: the base model)
)
MANIFEST_COLUMNS = MANIFEST_REQUIRED + MANIFEST_OPTIONAL

# What normalize_batch returns, in this order, followed by the extra columns.
NORMALIZED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image_uri", pa.string()),  # the first input (the only one for most rows)
        ("image_uris", pa.list_(pa.string())),  # every input, in order
        ("instruction", pa.string()),
        ("seed", pa.int64()),
        ("num_steps", pa.int64()),
        ("guidance_scale", pa.float64()),
        ("size_level", pa.int64()),
        ("negative_prompt", pa.string()),
        ("blend_instruction", pa.string()),
        ("blend_scale", pa.float64()),
        ("adapters", pa.string()),  # the row's adapter set (model.adapter_sets), null: the base model
        ("output_key", pa.string()),
        ("fingerprint", pa.string()),
        ("error_type", pa.string()),
        ("error_message", pa.string()),
        ("extra", pa.string()),  # JSON object of the extra columns (original names), or null
    ]
)
NORMALIZED_COLUMNS = tuple(NORMALIZED_SCHEMA.names)

FINGERPRINT_VERSION = 1
SEED_LIMIT = 2**31  # derived seeds are in [0, SEED_LIMIT)
_MAX_GIVEN_SEED = 2**63
_MAX_ID_CHARS = 512
MAX_ID_CHARS = _MAX_ID_CHARS  # a longer given id is an invalid row
_PARAM_FIELDS = tuple(f.name for f in fields(EditParams))
# The bounds of a per-row parameter, the same as the config's (``sampling.*`` validates against
# these very numbers): a row may not ask for more work or memory than a config may.
NUM_STEPS_RANGE = (1, 1000)
SIZE_LEVEL_RANGE = (64, 4096)
GUIDANCE_SCALE_RANGE = (0.0, 100.0)
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")

_FORMAT_SUFFIXES = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".jsonl": "json",
    ".ndjson": "json",
    ".json": "json",
    ".csv": "csv",
    ".tar": "webdataset",
    ".tgz": "webdataset",
}
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".zst", ".xz", ".lz4")
_GLOB_CHARS = "*?["


# --- finding and reading manifest files ----------------------------------------------------------


def _strip_compression(name: str) -> str:
    lower = name.lower()
    for suffix in _COMPRESSION_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _suffix_format(path: str) -> str | None:
    name = _strip_compression(posixpath.basename(path.rstrip("/")))
    return _FORMAT_SUFFIXES.get(os.path.splitext(name)[1].lower())


def manifest_format(path: str) -> str:
    """``"parquet"``, ``"json"`` (JSON Lines), ``"csv"`` or ``"webdataset"`` (``.tar`` shards)
    from a manifest file's name (a compression suffix such as ``.gz`` is looked through)."""
    fmt = _suffix_format(path)
    if fmt is None:
        raise ValueError(
            f"cannot tell the manifest format of {redact_uri(path)}; name it *.parquet, "
            "*.jsonl, *.csv (optionally compressed, e.g. *.jsonl.gz) or *.tar (WebDataset shards)"
        )
    return fmt


def _hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.split("/") if part)


def manifest_files(uri: str, options: StorageOptions | None = None) -> list[str]:
    """The manifest files ``uri`` names, sorted: the file itself, every Parquet / JSONL / CSV file
    under a folder (recursively; names starting with ``.`` or ``_`` such as ``_SUCCESS`` are
    skipped), or the matches of a glob. URIs keep their scheme (``s3://...``); local ones are
    absolute. Raises FileNotFoundError when nothing matches and ValueError for mixed formats."""
    fs, path = filesystem(uri, options)
    scheme = uri.split("://", 1)[0] + "://" if "://" in uri and not uri.startswith("file://") else ""

    def full(p: str) -> str:
        return f"{scheme}{p}" if scheme else p

    shown = redact_uri(uri)
    if any(c in path for c in _GLOB_CHARS):
        found = fs.glob(path, detail=True)
        files = [p for p, info in found.items() if info.get("type") != "directory"]
        files = [p for p in files if _suffix_format(p) and not _hidden(posixpath.basename(p))]
    elif fs.isdir(path):
        root = path.rstrip("/")
        files = [
            p
            for p in fs.find(root, detail=False)
            if _suffix_format(p) and not _hidden(p[len(root):])
        ]
    elif fs.isfile(path):
        manifest_format(path)  # refuse an unknown suffix up front
        files = [path]
    else:
        raise FileNotFoundError(f"No manifest at {shown}: no such file, folder or glob match.")
    if not files:
        raise FileNotFoundError(
            f"No manifest files (*.parquet, *.jsonl, *.csv, *.tar) found at {shown}."
        )
    formats = {manifest_format(p) for p in files}
    if len(formats) > 1:
        raise ValueError(
            f"The manifest at {shown} mixes formats ({', '.join(sorted(formats))}); "
            "point it at files of one format (e.g. with a glob such as '*.parquet')."
        )
    return sorted(full(p) for p in files)


def _csv_header(fs, path: str) -> list[str]:
    with fs.open(path, "rb", compression="infer") as f:
        first = io.TextIOWrapper(f, encoding="utf-8-sig", newline="").readline()
    return next(csv.reader([first]), [])


def csv_convert_options(uri: str, options: StorageOptions | None = None) -> pacsv.ConvertOptions:
    """pyarrow CSV options that read every column of the CSV at ``uri`` as text (so an id such as
    ``0007`` is not turned into the number 7) with only empty cells as nulls. Pass them to
    ``ray.data.read_csv(..., convert_options=...)`` too; :func:`normalize_batch` parses numbers."""
    fs, path = filesystem(uri, options)
    names = _csv_header(fs, path)
    return pacsv.ConvertOptions(
        column_types={n: pa.string() for n in names},
        strings_can_be_null=True,
        null_values=[""],
        quoted_strings_can_be_null=False,
    )


# A column the text readers add: why a line could not be read as a row (null when it could). The
# normaliser turns it into that row's INVALID_ROW error, so a bad line is one error row.
# Contract columns that hold one value: a JSON list, object or boolean there is the row's error.
_SCALAR_COLUMNS = tuple(c for c in MANIFEST_COLUMNS if c not in ("image_uris", "image_etags"))


def _json_cell(value: Any) -> str | None:
    """A JSON Lines value as text, as it is written: strings as they are, numbers, booleans,
    lists and objects as their JSON text (so ``7`` and ``"7"`` are both ``"7"``)."""
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _line_problem(where: str, text: str, why: str) -> str:
    snippet = redact(text.strip())[:80]
    return f"{where} {why}: {snippet!r}"


def _read_json_lines(f, shown: str) -> pa.Table:
    """JSON Lines with a fixed schema: every column text (see :func:`_json_cell`), one row per
    non-blank line, a line that is not a JSON object a row with :data:`MANIFEST_PROBLEM` set.
    Mixed types in a column (``{"seed": 7}`` then ``{"seed": "7"}``) are fine: the normaliser
    types each row's values itself."""
    rows: list[dict[str, str | None]] = []
    problems: list[str | None] = []
    names: dict[str, None] = {}
    for number, raw in enumerate(f, 1):
        where = f"line {number} of {shown}"
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            rows.append({})
            problems.append(f"{where} is not valid UTF-8 ({exc.reason} at byte {exc.start})")
            continue
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError as exc:
            rows.append({})
            problems.append(_line_problem(where, line, f"is not valid JSON ({exc})"))
            continue
        if not isinstance(doc, dict):
            rows.append({})
            problems.append(_line_problem(where, line, f"is a JSON {type(doc).__name__}, not an object"))
            continue
        row = {str(k): _json_cell(v) for k, v in doc.items()}
        bad = [k for k in _SCALAR_COLUMNS if isinstance(doc.get(k), (list, dict, bool))]
        problems.append(f"{where}: {bad[0]} is a JSON {type(doc[bad[0]]).__name__}, not a single value"
                        if bad else None)
        names.update(dict.fromkeys(row))
        rows.append(row)
    columns = {n: pa.array([r.get(n) for r in rows], pa.string()) for n in names if n != MANIFEST_PROBLEM}
    if any(problems):
        columns[MANIFEST_PROBLEM] = pa.array(problems, pa.string())
    return pa.table(columns) if columns else pa.table({MANIFEST_PROBLEM: pa.array(problems, pa.string())})


def _read_csv(f, convert: pacsv.ConvertOptions, shown: str) -> pa.Table:
    """CSV as text (see :func:`csv_convert_options`); a line with more or fewer fields than the
    header is kept as a row with :data:`MANIFEST_PROBLEM` set (at the end), not a failed read."""
    bad: list[str] = []

    def invalid(row) -> str:
        where = f"line {row.number} of {shown}" if row.number else f"a line of {shown}"
        bad.append(_line_problem(where, row.text or "", f"has {row.actual_columns} fields, the header "
                                 f"{row.expected_columns}"))
        return "skip"

    table = pacsv.read_csv(f, convert_options=convert,
                           parse_options=pacsv.ParseOptions(invalid_row_handler=invalid),
                           read_options=pacsv.ReadOptions(use_threads=False))
    if not bad:
        return table
    problems = pa.array([None] * table.num_rows + bad, pa.string())
    table = pa.concat_tables([table, pa.table({n: pa.nulls(len(bad), t) for n, t in zip(table.column_names, table.schema.types)},
                                              schema=table.schema)])
    return table.append_column(MANIFEST_PROBLEM, problems)


def _read_raw(uri: str, options: StorageOptions | None, fixed_schema: bool) -> pa.Table:
    fmt = manifest_format(uri)
    if fmt == "webdataset":
        return webdataset.read_shard(uri, options)
    fs, path = filesystem(uri, options)
    if fmt == "parquet":
        with fs.open(path, "rb") as f:
            return pq.read_table(f)
    shown = redact_uri(uri)
    convert = csv_convert_options(uri, options) if fmt == "csv" else None
    with fs.open(path, "rb", compression="infer") as f:
        if fmt == "json":
            return _read_json_lines(f, shown) if fixed_schema else pajson.read_json(f)
        return _read_csv(f, convert, shown) if fixed_schema else pacsv.read_csv(f, convert_options=convert)


def _read_file(uri: str, options: StorageOptions | None, fixed_schema: bool = True,
               columns: Mapping[str, Any] | None = None) -> pa.Table:
    """One manifest file in the row contract's shape (:func:`~step1x_batch.rows.sources.adapt_table`
    applies ``columns``, the ``input.columns`` map, and splits embedded images): Parquet as
    stored; JSON Lines and CSV with a fixed schema (every column text, typed per row by the
    normaliser; a line that cannot be read is one row with :data:`MANIFEST_PROBLEM` set), so no
    value in one row can fail the read of the others; a WebDataset shard one row per sample.

    ``fixed_schema=False``: JSON Lines typed by pyarrow and CSV without the problem rows, for
    the jobs whose own manifests are not edit rows (a pairs job's images manifest gives a JSON
    list of instructions)."""
    table = _read_raw(uri, options, fixed_schema)
    if manifest_format(uri) == "webdataset":
        return _adapt_shard_piece(table, columns)
    return adapt_table(table, columns)


def _adapt_shard_piece(table: pa.Table, columns: Mapping[str, Any] | None) -> pa.Table:
    """A WebDataset piece in the contract's shape: the configured map, else sample by sample
    (:func:`~step1x_batch.rows.webdataset.default_view`)."""
    if columns:
        return adapt_table(table, columns)
    return adapt_table(webdataset.default_view(table), webdataset.DEFAULT_COLUMNS)


def read_manifest_file(batch: dict[str, Any], options: StorageOptions | None = None,
                       columns: Mapping[str, Any] | None = None) -> Iterator[pa.Table]:
    """Ray ``map_batches`` form of :func:`_read_file` (a generator): a batch of ``{"path":
    [file]}`` -> the file's rows, one block per file as Ray's own readers give, a WebDataset
    shard in pieces of about 64 MB so that a multi-GB shard is never held whole."""
    paths = batch["path"]
    for path in (paths.to_pylist() if hasattr(paths, "to_pylist") else paths):
        if manifest_format(path) != "webdataset":
            yield _read_file(path, options, columns=columns)
            continue
        for piece in webdataset.iter_shard(path, options):
            yield _adapt_shard_piece(piece, columns)


def read_manifest_table(uri: str, options: StorageOptions | None = None, *,
                        edit_rows: bool = False, columns: Mapping[str, Any] | None = None) -> pa.Table:
    """The whole manifest as one Arrow table (for small manifests and tests; a job reads large
    ones with Ray's readers and :func:`step1x_batch.io.storage.arrow_filesystem`). ``edit_rows``:
    read as the edit job reads its manifest (a fixed schema, see :func:`_read_file`); without it,
    JSON Lines values keep their JSON types (the pairs and catalog jobs' input manifests)."""
    tables = [_read_file(f, options, fixed_schema=edit_rows, columns=columns) for f in manifest_files(uri, options)]
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ValueError(
            f"The manifest files at {redact_uri(uri)} have incompatible column types ({exc}); "
            "give each column one type in every file."
        ) from None


# --- URIs ----------------------------------------------------------------------------------------


def _has_scheme(uri: str) -> bool:
    return re.match(r"^[A-Za-z][A-Za-z0-9+.\-]*://", uri) is not None


def manifest_base(manifest_uri: str) -> str:
    """The folder relative ``image_uri`` values are resolved against, from the manifest URI alone
    (no I/O): a file's folder; a folder itself; for a glob, the folder before the first wildcard.
    A URI whose last part has no manifest suffix (``.parquet``, ``.jsonl``, ``.csv``, ...) is
    taken to be a folder."""
    uri = manifest_uri
    cut = min((uri.find(c) for c in _GLOB_CHARS if c in uri), default=-1)
    if cut >= 0:
        return uri[: uri.rfind("/", 0, cut)] if "/" in uri[:cut] else "."
    if uri.endswith("/"):
        return uri.rstrip("/") or "/"
    if _suffix_format(uri):
        return parent_uri(uri)
    return uri


def resolve_image_uri(image_uri: str, base: str) -> str:
    """``image_uri`` as is when it is a URL (``s3://``, ``file://``, ``https://``) or an absolute
    path; otherwise joined to ``base`` (a URI or path) and normalised (``./``, ``../``)."""
    uri = image_uri.strip()
    if _has_scheme(uri) or uri.startswith("/"):
        return uri
    if _has_scheme(base):
        head, rest = base.split("://", 1)
        return f"{head}://{posixpath.normpath(posixpath.join(rest, uri))}"
    return os.path.normpath(os.path.join(base, uri))


def image_sources(value: Any, base: str) -> Any:
    """A row's input image(s) for the jobs built on this one (pairs, catalog): one URI, a list of
    URIs or a JSON list in text, each resolved against ``base``; one image as its URI (so it hashes
    as the ``image_uri`` spelling), several as a list. Anything else is returned as it is: the
    job's normalisation turns it into an error row."""
    items = value
    if isinstance(value, str) and value.strip().startswith("["):
        items, problem = _as_list(value)
        if problem:
            return value
    if isinstance(items, str):
        return resolve_image_uri(items, base) if items.strip() else items
    if isinstance(items, (list, tuple)) and items and all(isinstance(u, str) and u.strip() for u in items):
        resolved = [resolve_image_uri(u, base) for u in items]
        return resolved[0] if len(resolved) == 1 else resolved
    return value


def image_columns(source: Any) -> dict[str, Any]:
    """``{"image_uri": ..., "image_uris": ...}`` for a work row: the spelling of ``source``."""
    if isinstance(source, list):
        return {"image_uri": None, "image_uris": source}
    return {"image_uri": source, "image_uris": None}


# --- values --------------------------------------------------------------------------------------


def _py(value: Any) -> Any:
    """A plain Python value with every kind of missing (None, NaN) as None."""
    if value is None:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _jsonable(value: Any) -> Any:
    value = _py(value)
    if isinstance(value, float) and math.isinf(value):
        return str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, _dt.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        # pyarrow gives map columns as lists of (key, value) pairs; keep them as lists
        return [_jsonable(v) for v in value]
    return value


def _canonical(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _parse_int(value: Any, lo: int, hi: int) -> int:
    """An integer in [lo, hi) from an int, an integral float or a numeric string; else ValueError."""
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    if isinstance(value, int):
        out = value
    elif isinstance(value, float):
        if not value.is_integer():
            raise ValueError("not a whole number")
        out = int(value)
    elif isinstance(value, str) and value.strip():
        text = value.strip()
        try:
            out = int(text)
        except ValueError:
            f = float(text)
            if not f.is_integer():
                raise ValueError("not a whole number") from None
            out = int(f)
    else:
        raise ValueError("not a number")
    if not lo <= out < hi:
        raise ValueError(f"out of range [{lo}, {hi})")
    return out


def _in_range(value: Any, bounds: tuple[Any, Any]) -> Any:
    lo, hi = bounds
    if not lo <= value <= hi:
        raise ValueError(f"out of range: rows, like the config's sampling settings, take {lo:g} to {hi:g}")
    return value


def _parse_float(value: Any, lo: float) -> float:
    if isinstance(value, bool):
        raise ValueError("a boolean is not a number")
    if isinstance(value, (int, float)):
        out = float(value)
    elif isinstance(value, str) and value.strip():
        out = float(value.strip())
    else:
        raise ValueError("not a number")
    if not math.isfinite(out) or out < lo:
        raise ValueError(f"must be a finite number >= {lo}")
    return out


def extra_columns(table_columns: Iterable[str]) -> list[str]:
    """The manifest columns that are not part of the contract, in their order: carried untouched
    into the log (``extra`` JSON)."""
    known = set(MANIFEST_COLUMNS) | {MANIFEST_PROBLEM, IMAGE_BYTES}
    return [str(c) for c in table_columns if str(c) not in known]


def marker_text(value: Any) -> str | None:
    """A change-marker value (``image_etag``) as the text the fingerprint folds in: stripped text
    as is, other values in canonical JSON form (``7`` -> ``"7"``, times in ISO form); None for
    null, NaN and empty text."""
    value = _py(value)
    if value is None:
        return None
    if isinstance(value, str):
        return value.strip() or None
    value = _jsonable(value)
    return value if isinstance(value, str) else _canonical(value)


def template_fields(template: str) -> list[str]:
    """The column names an instruction template reads (``"make the {object} {colour}"`` ->
    ``["object", "colour"]``). Raises ValueError for malformed braces and for positional
    (``{}``, ``{0}``), attribute (``{a.b}``) or index (``{a[0]}``) fields: a template may only
    name columns."""
    fields: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"malformed template {template!r}: {exc}") from None
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if not name or name.isdigit() or any(c in name for c in ".[]"):
            raise ValueError(
                f"template field {{{name}}} in {template!r} is not a column name; use "
                "{column} fields only (double the braces, {{ }}, for literal ones)"
            )
        if name not in fields:
            fields.append(name)
    return fields


def fill_template(template: str, row: Mapping[str, Any]) -> str:
    """``template`` with every ``{column}`` replaced by the row's value (``str.format_map``).
    Raises RowError(INVALID_ROW) naming the column when one is missing or null."""
    values: dict[str, Any] = {}
    for name in template_fields(template):
        value = _py(row.get(name)) if isinstance(row, Mapping) else None
        if value is None:
            what = "has no column" if name not in row else "has an empty (null) value in column"
            raise RowError(
                INVALID_ROW,
                f"the instruction template needs {{{name}}} but the row {what} {name!r}; add "
                "the value or change the template.",
            )
        values[name] = value
    return template.format_map(values)


def write_manifest(table: pa.Table, uri: str, options: StorageOptions | None = None) -> None:
    """Write ``table`` as one Parquet manifest object at ``uri`` (whole or not at all)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_bytes(uri, buf.getvalue(), options)


def derive_seed(row_id: str, default_seed_base: int) -> int:
    """The seed of a row that gives none: stable, 0 <= seed < 2**31."""
    digest = hashlib.sha256(f"{int(default_seed_base)}\x00{row_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % SEED_LIMIT


def _images_doc(image_uris: list[str], image_etags: list[str | None]) -> dict[str, Any]:
    """How the inputs enter ids and fingerprints; one image hashes as the ``image_uri`` spelling."""
    if len(image_uris) == 1:
        return {"image_uri": image_uris[0], "image_etag": image_etags[0]}
    return {"image_uris": list(image_uris), "image_etags": list(image_etags)}


def fingerprint(
    *,
    image_uris: list[str],
    image_etags: list[str | None],
    instruction: str,
    params: EditParams,
    seed: int,
    model_id: str,
    image_format: str,
    image_quality: int | None = None,
) -> str:
    """sha256 (hex) of everything that changes a row's output bytes: the ordered inputs and their
    change markers, the instruction, every parameter, the model id and the output encoding
    (``image_quality`` counts only for lossy formats: jpeg, webp)."""
    fmt = canonical_format(image_format)
    doc: dict[str, Any] = {
        "v": FINGERPRINT_VERSION,
        **_images_doc(image_uris, image_etags),
        "instruction": instruction,
        "num_steps": int(params.num_steps),
        "guidance_scale": float(params.guidance_scale),
        "size_level": int(params.size_level),
        "negative_prompt": params.negative_prompt or "",
        **({"blend_instruction": params.blend_instruction, "blend_scale": float(params.blend_scale)}
           if params.blend_instruction is not None else {}),
        "seed": int(seed),
        "model_id": model_id,
        "image_format": fmt,
    }
    if image_quality is not None and fmt in ("jpeg", "webp"):
        doc["image_quality"] = int(image_quality)
    return _sha256(_canonical(doc))


# --- normalisation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class NormalizeSettings:
    """Everything normalisation reads besides the rows: the one settings object of the row
    contract (docs/architecture.md). Build it from a job config with
    :func:`step1x_batch.job.stages.normalize_settings`; the digest of a raw row covers these
    fields too (:func:`step1x_batch.rows.digest.settings_digest_key`)."""

    manifest_uri: str  # absolute (storage.absolute_uri): relative image paths resolve against its folder
    defaults: EditParams  # the job's parameters for a row that sets none
    seed_base: int  # derived seeds change with it (derive_seed)
    model_id: str
    image_format: str  # the output format, as configured (``jpg`` or ``jpeg``)
    max_instruction_chars: int  # <= 0: no limit
    image_quality: int | None = None  # folded into the fingerprint for lossy formats
    max_images: int = 1  # the model family's limit of input images per row
    # (set name, model id) of each of model.adapter_sets: a row naming a set is fingerprinted
    # with that set's model id
    set_model_ids: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_id_of_set", dict(self.set_model_ids))
        # Derived once per settings object, not per row; an unknown format fails here.
        output_format = canonical_format(self.image_format)
        object.__setattr__(self, "output_format", output_format)
        object.__setattr__(self, "output_extension", image_extension(output_format))
        object.__setattr__(self, "base", manifest_base(self.manifest_uri))
        object.__setattr__(self, "instruction_limit", int(self.max_instruction_chars or 0))


class _FirstError:
    """A row's error: the first problem found wins (later checks still run, to fill the id)."""

    __slots__ = ("code", "message")

    def __init__(self) -> None:
        self.code: str | None = None
        self.message: str | None = None

    def __call__(self, code: str, message: str) -> None:
        if self.code is None:
            self.code, self.message = code, message


def _as_list(value: Any) -> tuple[list[Any] | None, str | None]:
    """A list cell (or a JSON list in text, as CSV and JSON Lines carry it) -> (items, problem)."""
    if isinstance(value, str):
        text = value.strip()
        if not text.startswith("["):
            return None, "is not a list (in CSV or JSON Lines write a JSON list: [\"a.png\", \"b.png\"])"
        try:
            value = json.loads(text)
        except ValueError as exc:
            return None, f"is not a valid JSON list ({exc})"
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        return None, f"is not a list ({type(value).__name__})"
    return list(value), None


def _image_inputs(raw: Mapping[str, Any], settings: NormalizeSettings,
                  fail: _FirstError) -> tuple[list[str] | None, list[str | None], Any]:
    """(resolved URIs or None, change markers aligned with them, the identity value)."""
    single, many = raw.get("image_uri"), raw.get("image_uris")
    if many is not None and single is not None:
        fail(INVALID_ROW, "the row gives both image_uri and image_uris; give one of them.")
        return None, [], [repr(single), repr(many)]
    if many is None:
        if isinstance(single, str) and single.strip():
            uris: list[Any] = [single]
        else:
            fail(INVALID_ROW, "image_uri is {}; give the image's URI or a path relative to the "
                 "manifest.".format("missing" if single is None or single == "" else
                                    f"not a usable text value ({redact(repr(single))[:80]})"))
            return None, [], None if single is None else repr(single)
        etags = [marker_text(raw.get("image_etag"))]
    else:
        uris, problem = _as_list(many)
        if problem or not uris:
            fail(INVALID_ROW, f"image_uris {problem or 'is an empty list'}; give the input images' URIs in order.")
            return None, [], repr(many)
        raw_etags = raw.get("image_etags")
        etags = [None] * len(uris)
        if raw_etags is not None:
            items, problem = _as_list(raw_etags)
            if problem or len(items) != len(uris):
                fail(INVALID_ROW, f"image_etags {problem or f'has {len(items)} entries for {len(uris)} images'}; "
                     "give one change marker per image (null for unknown).")
            else:
                etags = [marker_text(v) for v in items]
    resolved: list[str] = []
    for i, uri in enumerate(uris, 1):
        if not isinstance(uri, str) or not uri.strip():
            fail(INVALID_ROW, f"image {i} of {len(uris)} in image_uris is not a usable URI "
                 f"({redact(repr(uri))[:80]}).")
            return None, [], repr(uris)
        resolved.append(resolve_image_uri(uri, settings.base))
    if len(resolved) > int(settings.max_images):
        fail(TOO_MANY_IMAGES, f"the row has {len(resolved)} input images; this model takes at most "
             f"{int(settings.max_images)} per row.")
    return resolved, etags, (resolved[0] if len(resolved) == 1 else resolved)


def _blank(value: Any) -> bool:
    """Null or whitespace-only text: a cell the row leaves to the default."""
    return value is None or (isinstance(value, str) and not value.strip())


def _instruction(raw: Mapping[str, Any], max_chars: int, fail: _FirstError,
                 identity: dict[str, Any]) -> str | None:
    """The stripped instruction, or None when it is missing or not text (the row's error)."""
    raw_instruction = raw.get("instruction")
    if raw_instruction is None:
        fail(EMPTY_INSTRUCTION, "instruction is missing; give the edit to apply in the "
             "'instruction' column.")
        return None
    if not isinstance(raw_instruction, str):
        fail(INVALID_ROW, f"instruction is not text ({type(raw_instruction).__name__}); give the "
             "edit to apply as text.")
        identity["instruction"] = repr(raw_instruction)
        return None
    instruction = raw_instruction.strip()
    identity["instruction"] = instruction
    if not instruction:
        fail(EMPTY_INSTRUCTION, "instruction is empty or only whitespace; give the edit to "
             "apply in the 'instruction' column.")
    elif max_chars > 0 and len(instruction) > max_chars:
        fail(INSTRUCTION_TOO_LONG, f"instruction is {len(instruction)} characters, over the "
             f"limit of {max_chars}; shorten it (long instructions are rejected, not "
             "truncated).")
    return instruction


_NUMBER_PARSERS: dict[str, Callable[[Any], Any]] = {
    "seed": lambda v: _parse_int(v, 0, _MAX_GIVEN_SEED),
    "num_steps": lambda v: _in_range(_parse_int(v, -_MAX_GIVEN_SEED, _MAX_GIVEN_SEED), NUM_STEPS_RANGE),
    "size_level": lambda v: _in_range(_parse_int(v, -_MAX_GIVEN_SEED, _MAX_GIVEN_SEED), SIZE_LEVEL_RANGE),
    "guidance_scale": lambda v: _in_range(_parse_float(v, -math.inf), GUIDANCE_SCALE_RANGE),
}


def _given_numbers(raw: Mapping[str, Any], fail: _FirstError, identity: dict[str, Any],
                   given: dict[str, Any]) -> None:
    """The seed and numeric parameters the row sets (parsed, within the config's bounds)."""
    for name, parse in _NUMBER_PARSERS.items():
        value = raw.get(name)
        if _blank(value):
            continue
        try:
            given[name] = parse(value)
        except (ValueError, OverflowError) as exc:
            identity[name] = repr(value)
            fail(INVALID_ROW, f"{name} {redact(repr(value))[:80]} is invalid ({exc}); fix or "
                 "remove it to use the default.")


def _given_blend(raw: Mapping[str, Any], max_chars: int, fail: _FirstError,
                 identity: dict[str, Any], given: dict[str, Any]) -> None:
    """The blend instruction and scale the row sets; a scale needs an instruction to blend with."""
    blend = raw.get("blend_instruction")
    if not _blank(blend):
        if not isinstance(blend, str):
            identity["blend_instruction"] = repr(blend)
            fail(INVALID_ROW, f"blend_instruction is not text ({type(blend).__name__}).")
        elif max_chars > 0 and len(blend.strip()) > max_chars:
            fail(INSTRUCTION_TOO_LONG, f"blend_instruction is {len(blend.strip())} characters, over the "
                 f"limit of {max_chars}; shorten it.")
        else:
            given["blend_instruction"] = blend.strip()
    scale = raw.get("blend_scale")
    if _blank(scale):
        return
    try:
        given["blend_scale"] = _parse_float(scale, -math.inf)
    except (ValueError, OverflowError) as exc:
        identity["blend_scale"] = repr(scale)
        fail(INVALID_ROW, f"blend_scale {redact(repr(scale))[:80]} is invalid ({exc}).")
        return
    if "blend_instruction" not in given and "blend_instruction" not in identity:
        fail(INVALID_ROW, "blend_scale is given without a blend_instruction to blend with; add "
             "the blend_instruction (e.g. the neutral version of the instruction) or drop the scale.")


def _given_negative_prompt(raw: Mapping[str, Any], fail: _FirstError, identity: dict[str, Any],
                           given: dict[str, Any]) -> None:
    """The negative prompt the row sets (any text, kept as written)."""
    negative = raw.get("negative_prompt")
    if negative is None:
        return
    if isinstance(negative, str):
        given["negative_prompt"] = negative
    else:
        identity["negative_prompt"] = repr(negative)
        fail(INVALID_ROW, f"negative_prompt is not text ({type(negative).__name__}).")


def _given_output_key(raw: Mapping[str, Any], fail: _FirstError, identity: dict[str, Any]) -> str | None:
    """The row's own output key, made safe; None when it gives none (or an unsafe one)."""
    raw_key = raw.get("output_key")
    if _blank(raw_key):
        return None
    identity["output_key"] = raw_key if isinstance(raw_key, str) else repr(raw_key)
    try:
        output_key = safe_output_key(raw_key)
    except RowError as exc:
        fail(exc.code, exc.message)
        return None
    identity["output_key"] = output_key
    return output_key


def _given_adapters(raw: Mapping[str, Any], settings: NormalizeSettings, fail: _FirstError,
                    identity: dict[str, Any]) -> str | None:
    """The adapter set the row names (one of ``model.adapter_sets``); None for the base model."""
    name = raw.get("adapters")
    if _blank(name):
        return None
    if not isinstance(name, str):
        identity["adapters"] = repr(name)
        fail(INVALID_ROW, f"adapters is not text ({type(name).__name__}); give the name of an adapter set.")
        return None
    name = name.strip()
    identity["adapters"] = name
    known = settings.model_id_of_set
    if name not in known:
        fail(INVALID_ROW, f"adapters names the set {redact(repr(name))[:80]}, which model.adapter_sets does not "
             f"have ({', '.join(sorted(known)) or 'it names no set'}).")
        return None
    return name


def _given_id(raw: Mapping[str, Any], fail: _FirstError) -> str | None:
    """The row's own id as text (an integral float without its ``.0``); None when it gives none
    or an unusable one."""
    raw_id = raw.get("id")
    if raw_id is None:
        return None
    text = str(raw_id).strip() if not isinstance(raw_id, float) else (
        str(int(raw_id)) if raw_id.is_integer() else str(raw_id))
    if isinstance(raw_id, (bytes, bytearray, list, dict, bool)):
        fail(INVALID_ROW, f"id has an unusable type ({type(raw_id).__name__}); give text.")
    elif _CONTROL_CHARS.search(text) or len(text) > _MAX_ID_CHARS:
        fail(INVALID_ROW, f"id {redact(repr(text))[:80]} contains control characters or is "
             f"longer than {_MAX_ID_CHARS} characters.")
    elif text:
        return text
    return None


def _edit_params(given: Mapping[str, Any], defaults: EditParams) -> EditParams:
    """The row's parameters: what it sets, else the job's defaults."""
    return EditParams(
        num_steps=given.get("num_steps", defaults.num_steps),
        guidance_scale=given.get("guidance_scale", defaults.guidance_scale),
        size_level=given.get("size_level", defaults.size_level),
        negative_prompt=given.get("negative_prompt", defaults.negative_prompt or ""),
        blend_instruction=given.get("blend_instruction"),
        blend_scale=given.get("blend_scale", 1.0),
    )


def _default_output_key(row_id: str, extension: str, fail: _FirstError) -> str | None:
    """``images/<id>.<ext>`` for a row that names no output key (an id that makes it unsafe is
    the row's error)."""
    try:
        return safe_output_key(f"images/{row_id}.{extension}")
    except RowError as exc:
        fail(exc.code, f"the default output key from id {redact(repr(row_id))[:80]} is "
             f"unsafe ({exc.message}); give a plain id or an output_key.")
        return None


def _error_message(row_id: str, image_uris: list[str] | None, image_uri: str | None, message: str) -> str:
    """A row error as people read it: the row, its input(s) (credentials redacted), the problem."""
    where = ""
    if image_uris and len(image_uris) > 1:
        where = f" (image_uris {', '.join(redact_uri(u) for u in image_uris)})"
    elif image_uri:
        where = f" (image_uri {redact_uri(image_uri)})"
    return redact(f"Row {row_id}{where}: {message}")


def _normalize_row(raw: Mapping[str, Any], extras: list[str], settings: NormalizeSettings) -> dict[str, Any]:
    """One raw row -> one :data:`NORMALIZED_SCHEMA` row (plus ``_given_id``). Every check runs,
    so the id covers every field the row sets; the first problem found is the row's error."""
    fail = _FirstError()
    identity: dict[str, Any] = {}  # what the content-hash id covers
    given: dict[str, Any] = {}  # the parameters the row itself sets
    problem = raw.get(MANIFEST_PROBLEM)
    if problem:  # the line could not be read as a row (JSON Lines / CSV): its place names it
        fail(INVALID_ROW, str(problem))
        identity["manifest_problem"] = str(problem)
    image_uris, image_etags, shown = _image_inputs(raw, settings, fail)
    identity["image_uri" if not isinstance(shown, list) else "image_uris"] = shown
    max_chars = settings.instruction_limit
    instruction = _instruction(raw, max_chars, fail, identity)
    _given_numbers(raw, fail, identity, given)
    _given_blend(raw, max_chars, fail, identity, given)
    _given_negative_prompt(raw, fail, identity, given)
    output_key = _given_output_key(raw, fail, identity)
    adapters = _given_adapters(raw, settings, fail, identity)
    identity.update(given)
    row_id = _given_id(raw, fail)
    given_id = row_id is not None
    if row_id is None:
        row_id = _sha256(_canonical(identity))[:20]
    params = _edit_params(given, settings.defaults)
    seed = given.get("seed")
    if seed is None:  # the set is in the id (its own output) but not in the noise: a set's row gets
        # the seed the same row gets without a set, so sets compare on the same noise
        seed_key = row_id if given_id or "adapters" not in identity else \
            _sha256(_canonical({k: v for k, v in identity.items() if k != "adapters"}))[:20]
        seed = derive_seed(seed_key, settings.seed_base)
    if output_key is None and "output_key" not in identity:
        output_key = _default_output_key(row_id, settings.output_extension, fail)
    raw_uri = raw.get("image_uri")
    image_uri = image_uris[0] if image_uris else (raw_uri if isinstance(raw_uri, str) else None)
    out: dict[str, Any] = {
        "id": row_id,
        "image_uri": image_uri,
        "image_uris": image_uris,
        "instruction": instruction,
        "seed": seed,
        **{name: getattr(params, name) for name in _PARAM_FIELDS},  # asdict() deep-copies: slow per row
        "adapters": adapters,
        "output_key": output_key,
        "fingerprint": None,
        "error_type": None,
        "error_message": None,
        "_given_id": given_id,  # for the duplicate check; not a column
    }
    if fail.code is not None:
        out["error_type"] = fail.code
        out["error_message"] = _error_message(row_id, image_uris, image_uri, fail.message)
    else:
        out["fingerprint"] = fingerprint(
            image_uris=image_uris,
            image_etags=image_etags,
            instruction=instruction,
            params=params,
            seed=seed,
            model_id=settings.model_id_of_set[adapters] if adapters else settings.model_id,
            image_format=settings.output_format,
            image_quality=settings.image_quality,
        )
    out["extra"] = (
        _canonical({name: _jsonable(raw.get(name)) for name in extras}) if extras else None
    )
    return out


def _where(row: Mapping[str, Any]) -> str:
    uris = row.get("image_uris") or ([row["image_uri"]] if row.get("image_uri") else [])
    return f"row {row['id']} ({', '.join(redact_uri(u) for u in uris) or 'no image'})"


def mark_duplicates(rows: list[dict[str, Any]]) -> None:
    """Make the second of two rows that would share an output object, or an id given in the
    manifest, a DUPLICATE_ROW error naming the first (in order). Rows that are the same work
    (same id, output key and fingerprint: a repeated line) are left alone: they write the same
    bytes. Only ``rows`` are compared (one batch); :func:`step1x_batch.job.preflight.check_duplicates`
    checks a whole manifest small enough to read, and the skip join every id across batches."""
    by_key: dict[str, dict[str, Any]] = {}
    by_id: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row["error_type"]:
            continue
        first = by_id.get(row["id"]) if row.get("_given_id") else None
        what = f"its id {row['id']!r}"
        if first is None:
            first, what = by_key.get(row["output_key"]), f"its output_key {row['output_key']!r}"
        if first is not None and (first["id"], first["output_key"], first["fingerprint"]) != (
                row["id"], row["output_key"], row["fingerprint"]):
            row.update(error_type=DUPLICATE_ROW, fingerprint=None, error_message=redact(
                f"Row {row['id']}: {what} is already taken by an earlier {_where(first)}; two rows "
                "would write one object or give one id two results. Give each row its own id and "
                "output_key (or drop the repeated row)."))
            continue
        by_key.setdefault(row["output_key"], row)
        if row.get("_given_id"):
            by_id.setdefault(row["id"], row)


# Extra columns whose name is a normalised or log column travel only in ``extra``.
_RESERVED_NAMES = frozenset(NORMALIZED_COLUMNS) | frozenset(LOG_SCHEMA.names)


def normalize_batch(batch: pa.Table, settings: NormalizeSettings) -> pa.Table:
    """Validate one batch of raw manifest rows and turn it into work (see the module docstring
    for the id, seed, duplicate, image and instruction policies).

    Returns one row per input row, in order: the :data:`NORMALIZED_SCHEMA` columns (``id``,
    resolved ``image_uri`` and ``image_uris``, stripped ``instruction``, ``seed``, every
    :class:`EditParams` field filled, safe ``output_key``, ``fingerprint``, ``error_type`` /
    ``error_message`` and ``extra`` (JSON of the extra columns)), then the extra columns as they
    came, except any whose name clashes with a normalised or log column (those are only in
    ``extra``). A row that is invalid here keeps every column, has ``error_type`` /
    ``error_message`` set and ``fingerprint`` null.
    """
    if isinstance(batch, pa.RecordBatch):
        batch = pa.Table.from_batches([batch])
    names = list(batch.schema.names)
    cols = {n: batch.column(n).to_pylist() for n in names}
    extras = extra_columns(names)
    rows = [_normalize_row({name: cols[name][i] for name in names}, extras, settings)
            for i in range(batch.num_rows)]
    mark_duplicates(rows)
    table = pa.Table.from_pydict({name: [r[name] for r in rows] for name in NORMALIZED_COLUMNS},
                                 schema=NORMALIZED_SCHEMA)
    for name in extras:
        if name not in _RESERVED_NAMES:
            table = table.append_column(name, batch.column(name))
    if IMAGE_BYTES in names:  # embedded images ride to the prepare stage, never into the log
        table = table.append_column(IMAGE_BYTES, batch.column(IMAGE_BYTES))
    return table
