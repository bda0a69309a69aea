"""Datasets as they are published: a column map onto the row contract, and images carried inside
the manifest (``datasets`` Image structs, binary cells, lists of either) instead of behind URIs.

Every reader of a manifest (the job's Ray readers, the skip join, pre-flight, the recipes) hands
its raw table to :func:`adapt_table` before anything else looks at it, so the rest of the row
contract never learns where an image came from:

* ``input.columns`` renames the dataset's columns to the contract's names (``{id: key, image:
  input_image_raw, instruction: instruction}``); ``image`` may name several columns, one image
  each, in order.
* An image column of URIs becomes ``image_uri`` / ``image_uris`` as before. An image column of
  bytes (a ``binary`` cell, or a ``{bytes, path}`` struct as ``datasets`` writes its Image
  feature; a struct with only ``path`` is a URI) becomes ``image_uri(s)`` of the form
  ``embedded://sha256/<hex>``: the image's identity in ids and fingerprints is the hash of its
  bytes, so the same picture under another name is the same work, and a changed picture is new
  work. The bytes ride in :data:`IMAGE_BYTES` (one entry per image, aligned with the URIs) through
  the object store to the prepare stage, which decodes them as it decodes a fetched file (broken
  bytes are a ``corrupt_image`` row); the row log never holds them.
* A null image, or an empty list, is one error row naming the column; it never fails the batch.
* Other columns holding image bytes travel into the log's ``extra`` as a reference
  (``{"path": ..., "sha256": ...}``), never as bytes.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping

import pyarrow as pa
import pyarrow.compute as pc

__all__ = [
    "CONTRACT_NAMES",
    "EMBEDDED_PREFIX",
    "IMAGE_BYTES",
    "MANIFEST_PROBLEM",
    "adapt_table",
    "check_column_map",
    "embedded_uri",
    "holds_images",
    "is_embedded",
    "mapped_names",
    "stored_input_uri",
]

# The row contract's names a column map may target (``image``: one column or a list of them).
CONTRACT_NAMES = ("id", "image", "instruction", "seed", "negative_prompt", "num_steps", "guidance_scale",
                  "size_level", "output_key", "blend_instruction", "blend_scale", "image_etag", "adapters")
EMBEDDED_PREFIX = "embedded://sha256/"
IMAGE_BYTES = "__image_bytes"  # list<large_binary>: a row's embedded images, aligned with its URIs


def check_column_map(columns: Mapping[str, Any]) -> None:
    """Refuse a column map naming no contract field or mapping one column twice (ValueError)."""
    seen: dict[str, str] = {}
    for target, source in columns.items():
        if target not in CONTRACT_NAMES:
            raise ValueError(f"{target!r} is not a row field; map one of {', '.join(CONTRACT_NAMES)} "
                             "to a column of the dataset (e.g. image: input_image_raw)")
        sources = source if isinstance(source, list) else [source]
        if target != "image" and isinstance(source, list):
            raise ValueError(f"{target}: give one column name (only image takes a list of columns)")
        if not sources or any(not isinstance(s, str) or not s.strip() for s in sources):
            raise ValueError(f"{target}: give the name of a column of the dataset")
        for s in sources:
            if s in seen and seen[s] != target:
                raise ValueError(f"column {s!r} is mapped to both {seen[s]} and {target}")
            seen[s] = target


def mapped_names(columns: Mapping[str, Any]) -> dict[str, list[str]]:
    """``{contract name: [dataset columns]}`` of a column map (every value as a list)."""
    return {k: (list(v) if isinstance(v, list) else [v]) for k, v in columns.items()}


def embedded_uri(data: bytes) -> str:
    """The identity of an image given by its bytes."""
    return EMBEDDED_PREFIX + hashlib.sha256(data).hexdigest()


def is_embedded(uri: str | None) -> bool:
    return isinstance(uri, str) and uri.startswith(EMBEDDED_PREFIX)


def stored_input_uri(uri: str, output_uri: str) -> str:
    """Where the job keeps its copy of an embedded input (``<output>/inputs/sha256/<hex>``), so
    the log, the judge and the report read it like any input; other URIs are returned as given."""
    if not is_embedded(uri):
        return uri
    return output_uri.rstrip("/") + "/inputs/sha256/" + uri[len(EMBEDDED_PREFIX):]


_DEFAULT_IMAGE_COLUMNS = ("image", "images")  # a hub dataset's usual names, when nothing else is given
# Why a raw row cannot be a row (a line that is not JSON, a null image, a truncated tar member):
# set by the readers, turned into the row's INVALID_ROW error by normalisation.
MANIFEST_PROBLEM = "__manifest_problem"


def _is_bytes(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)


def _is_image_struct(t: pa.DataType) -> bool:
    """``datasets``' Image feature as stored: a struct of ``bytes`` (and ``path``), nothing else."""
    if not pa.types.is_struct(t):
        return False
    names = {t.field(i).name for i in range(t.num_fields)}
    return "bytes" in names and names <= {"bytes", "path"}


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t)


def holds_images(t: pa.DataType) -> bool:
    """A column of image bytes: binary, a ``{bytes, path}`` struct, or a list of either."""
    if _is_list(t):
        t = t.value_type
    return _is_bytes(t) or _is_image_struct(t)


def _image_cell(value: Any) -> tuple[str | None, bytes | None]:
    """(URI, bytes) of one image cell: bytes win over a struct's path, a path alone is a URI."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data is not None:
            return embedded_uri(bytes(data)), bytes(data)
        return (path if isinstance(path, str) and path.strip() else None), None
    if isinstance(value, (bytes, bytearray, memoryview)):
        return embedded_uri(bytes(value)), bytes(value)
    if isinstance(value, str):
        return (value if value.strip() else None), None
    return None, None


def _row_images(cells: list[Any], names: list[str], listed: list[bool]) -> tuple[list[str] | None, list[bytes | None], str | None]:
    """One row's images from its image columns, in order: (URIs, bytes aligned, problem)."""
    uris: list[str] = []
    blobs: list[bytes | None] = []
    for cell, name, is_list in zip(cells, names, listed):
        items = cell if is_list else [cell]
        if cell is None or (is_list and not items):
            return None, [], f"image column {name!r} is {'null' if cell is None else 'an empty list'}"
        for i, item in enumerate(items):
            uri, data = _image_cell(item)
            if uri is None:
                where = f"{name!r}[{i}]" if is_list else repr(name)
                return None, [], f"image column {where} holds no image (no bytes and no path)"
            uris.append(uri)
            blobs.append(data)
    return uris, blobs, None


def _reference(value: Any) -> Any:
    """An image cell of a column that is not the row's image, as the log keeps it: its path and
    the hash of its bytes (never the bytes)."""
    if isinstance(value, list):
        return [_reference(v) for v in value]
    if isinstance(value, dict):
        data = value.get("bytes")
        return {"path": value.get("path"), "sha256": hashlib.sha256(bytes(data)).hexdigest() if data is not None else None}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"path": None, "sha256": hashlib.sha256(bytes(value)).hexdigest()}
    return value


_REFERENCE = pa.struct([("path", pa.string()), ("sha256", pa.string())])


def _as_references(col: pa.ChunkedArray) -> pa.Array:
    t = pa.list_(_REFERENCE) if _is_list(col.type) else _REFERENCE
    return pa.array([_reference(v) for v in col.to_pylist()], t)


def _image_sources(table: pa.Table, names: Mapping[str, list[str]]) -> list[str]:
    """The columns that hold the row's images: the map's ``image``, else the contract's own
    ``image_uri`` / ``image_uris`` when they hold bytes, else a lone ``image`` / ``images``."""
    if "image" in names:
        return names["image"]
    for name in ("image_uri", "image_uris"):
        if name in table.column_names:
            return [name] if holds_images(table.schema.field(name).type) else []
    return [n for n in _DEFAULT_IMAGE_COLUMNS if n in table.column_names][:1]


def _images_columns(table: pa.Table, sources: list[str]) -> dict[str, pa.Array]:
    """``image_uri`` or ``image_uris``, :data:`IMAGE_BYTES` and the problems, from ``sources``."""
    types = [table.schema.field(n).type for n in sources]
    listed = [_is_list(t) for t in types]
    many = len(sources) > 1 or listed[0]
    cells = [table.column(n).to_pylist() for n in sources]
    uris, blobs, problems = [], [], []
    for row in zip(*cells):
        u, b, problem = _row_images(list(row), sources, listed)
        uris.append(u if many or u is None else u[0])
        blobs.append(b if u and any(x is not None for x in b) else None)
        problems.append(problem)
    # the problem column always (all null in a clean batch): every block has one schema
    return {"image_uris" if many else "image_uri": pa.array(uris, pa.list_(pa.string()) if many else pa.string()),
            IMAGE_BYTES: pa.array(blobs, pa.list_(pa.large_binary())), MANIFEST_PROBLEM: pa.array(problems, pa.string())}


def _merge_problem(table: pa.Table, problems: pa.Array, first: bool = False) -> pa.Table:
    if MANIFEST_PROBLEM not in table.column_names:
        return table.append_column(MANIFEST_PROBLEM, problems)
    i = table.schema.get_field_index(MANIFEST_PROBLEM)
    old = table.column(i).cast(pa.string())
    return table.set_column(i, MANIFEST_PROBLEM, pc.coalesce(problems, old) if first else pc.coalesce(old, problems))


def _renamed(table: pa.Table, names: Mapping[str, list[str]]) -> pa.Table:
    """The map's scalar fields under their contract names; a column of the dataset that already
    has a mapped field's name (and is not its source) moves aside as ``source_<name>``."""
    out = table
    for target, (source, *_) in ((t, s) for t, s in names.items() if t != "image"):
        if target == source:
            continue
        if target in out.column_names:
            out = out.rename_columns([f"source_{c}" if c == target else c for c in out.column_names])
        i = out.schema.get_field_index(source)
        out = out.rename_columns([target if j == i else c for j, c in enumerate(out.column_names)])
    return out


def _missing(table: pa.Table, names: Mapping[str, list[str]], strict: bool) -> tuple[pa.Table, str | None]:
    """``table`` with a null column for each mapped column it lacks, and the problem every row of
    it then has (``strict``: a ValueError instead, as pre-flight wants it)."""
    missing = [s for ss in names.values() for s in ss if s not in table.column_names]
    if not missing:
        return table, None
    why = f"input.columns names column(s) {missing} that the manifest does not have (it has {table.column_names})"
    if strict:
        raise ValueError(why)
    for name in missing:
        table = table.append_column(name, pa.nulls(table.num_rows, pa.string()))
    return table, why


def adapt_table(table: pa.Table, columns: Mapping[str, Any] | None = None, *, strict: bool = False) -> pa.Table:
    """``table`` (raw rows as read) with the column map applied and embedded images split into
    URIs and :data:`IMAGE_BYTES`; a table already in the contract's shape comes back unchanged.
    A column the map names that the table lacks makes every row of it a problem row naming the
    column (``strict``: a ValueError, for pre-flight)."""
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    names = mapped_names(columns or {})
    table, why = _missing(table, names, strict)
    sources = _image_sources(table, names)
    table = _renamed(table, names)
    if sources and (names.get("image") or any(holds_images(table.schema.field(n).type) for n in sources)):
        images = _images_columns(table, sources)
        table = table.drop_columns([n for n in sources if n in table.column_names])
        for name in ("image_uri", "image_uris"):
            if name in table.column_names:  # the map chose other columns: these are the dataset's own
                table = table.rename_columns([f"source_{c}" if c == name else c for c in table.column_names])
        problems = images.pop(MANIFEST_PROBLEM)
        for name, values in images.items():
            table = table.append_column(name, values)
        table = _merge_problem(table, problems)
    for name in [n for n in table.column_names if n != IMAGE_BYTES and holds_images(table.schema.field(n).type)]:
        table = table.set_column(table.schema.get_field_index(name), name, _as_references(table.column(name)))
    if why is not None:  # this problem first: it is why the mapped fields are null
        table = _merge_problem(table, pa.array([why] * table.num_rows, pa.string()), first=True)
    return table
