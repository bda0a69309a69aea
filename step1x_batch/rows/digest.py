"""A 64-bit digest of each raw manifest row, computed for a whole batch at once.

Why: deciding that a row is done needs its fingerprint, and the fingerprint needs the row
normalised, which is Python work per row (~50 us). At catalog scale almost every row is done, so
the skip compares this digest instead: a hash of the row's raw cells (every column, its name
and type, nulls told apart from any value) and of everything else normalisation reads (the
job's defaults, model id, output format, the manifest's folder for relative paths). Equal
digests mean the same raw row under the same settings, hence the same normalised row and the
same fingerprint; a different digest proves nothing, and the row is normalised and its
fingerprint compared. So a digest can only let a done row be skipped sooner, never a changed one
(up to a 64-bit hash collision between two versions of one row).

The hash is pandas' ``hash_array`` (SipHash with a fixed key: the same value on every machine
and version), combined across columns with a multiply-xor mix.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from step1x_batch.rows.manifest import (
    FINGERPRINT_VERSION,
    MANIFEST_COLUMNS,
    MANIFEST_PROBLEM,
    NormalizeSettings,
    manifest_base,
)

DIGEST_VERSION = 1
_MULT = np.uint64(0x9E3779B97F4A7C15)
_NULL = np.uint64(0x5BD1E9955BD1E995)


def settings_key(*parts: Any) -> int:
    """A 64-bit key of the settings a row is normalised under (any reprs, in a fixed order)."""
    text = repr((DIGEST_VERSION, *parts)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def _mix(h: np.ndarray, v: np.ndarray) -> np.ndarray:
    h = (h ^ v) * _MULT
    return h ^ (h >> np.uint64(29))


def _text_key(text: str) -> np.uint64:
    return np.uint64(int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little"))


def _kind(t: pa.DataType) -> str:
    """A column's type as normalisation sees it (Python values): readers that give ``string`` or
    ``large_string``, ``int32`` or ``int64`` give the same digest."""
    if pa.types.is_dictionary(t):
        return _kind(t.value_type)
    for name, test in (("text", lambda x: pa.types.is_string(x) or pa.types.is_large_string(x)),
                       ("bytes", lambda x: pa.types.is_binary(x) or pa.types.is_large_binary(x)),
                       ("bool", pa.types.is_boolean), ("int", pa.types.is_integer),
                       ("float", pa.types.is_floating)):
        if test(t):
            return name
    return str(t)


def _values(col: pa.Array) -> np.ndarray:
    """A numpy array pandas can hash: strings as objects, numbers as themselves, anything else
    (lists, structs, decimals) as canonical JSON text."""
    import pandas as pd

    t = col.type
    if pa.types.is_dictionary(t):
        col, t = col.cast(t.value_type), t.value_type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t):
        values = col.to_numpy(zero_copy_only=False)
    elif pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        values = pc.fill_null(col, pa.scalar(0, t) if not pa.types.is_boolean(t) else False).to_numpy(zero_copy_only=False)
    elif pa.types.is_temporal(t):
        values = pc.fill_null(col.cast(pa.int64()), 0).to_numpy(zero_copy_only=False)
    else:
        values = np.array([json.dumps(v, sort_keys=True, default=str) for v in col.to_pylist()], dtype=object)
    return pd.util.hash_array(values, categorize=False)


def row_digests(batch: pa.Table, key: int) -> np.ndarray:
    """The uint64 digest of each row of ``batch`` (raw manifest columns) under settings ``key``."""
    n = batch.num_rows
    h = np.full(n, np.uint64(key), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for name in sorted(batch.column_names):
            col = batch.column(name)
            col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
            v = _values(col) ^ _text_key(f"{name}:{_kind(col.type)}")
            if col.null_count:
                v = np.where(col.is_null().to_numpy(zero_copy_only=False), _NULL ^ v, v)
            h = _mix(h, v)
    return h


def settings_digest_key(settings: NormalizeSettings) -> int:
    """The settings part of every row's digest: what normalisation reads besides the row (the
    manifest's folder, not its name)."""
    return settings_key(FINGERPRINT_VERSION, manifest_base(settings.manifest_uri), settings.defaults,
                        settings.seed_base, settings.model_id, settings.image_format,
                        settings.max_instruction_chars, settings.image_quality, settings.max_images,
                        settings.set_model_ids)


def manifest_row_digests(raw: pa.Table, settings: NormalizeSettings) -> pa.Array:
    """Each raw manifest row's digest over the contract columns (uint64): the extra columns only
    travel into the log's ``extra``, they change no fingerprint."""
    contract = [c for c in raw.column_names if c in MANIFEST_COLUMNS or c == MANIFEST_PROBLEM]
    return pa.array(row_digests(raw.select(contract), settings_digest_key(settings)), pa.uint64())
