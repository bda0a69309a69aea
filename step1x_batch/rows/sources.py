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

__all__ = [
    "CONTRACT_NAMES",
    "EMBEDDED_PREFIX",
    "IMAGE_BYTES",
    "adapt_table",
    "check_column_map",
    "embedded_uri",
    "is_embedded",
    "mapped_names",
]

# The row contract's names a column map may target (``image``: one column or a list of them).
CONTRACT_NAMES = ("id", "image", "instruction", "seed", "negative_prompt", "num_steps", "guidance_scale",
                  "size_level", "output_key", "blend_instruction", "blend_scale", "image_etag")
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


def adapt_table(table: pa.Table, columns: Mapping[str, Any] | None = None) -> pa.Table:
    """``table`` (raw rows as read) with the column map applied and embedded images split into
    URIs and :data:`IMAGE_BYTES`; a table already in the contract's shape comes back unchanged."""
    raise NotImplementedError
