"""Checks before side effects: everything a run needs, checked before Ray starts and before
anything is written under the output root.

Why: a missing manifest, a refused endpoint or a truncated weights file found only after the run
wrote its config, started Ray and let every GPU actor die in its constructor costs minutes and
hundreds of lines of tracebacks, and the one useful sentence is buried. Here each problem is one
:class:`PreflightError` sentence that says what to fix (exit status 2):

* storage: every bucket the run touches (input, output, weights, adapters) answers a
  ``HeadBucket``: the endpoint refused the connection / the bucket does not exist / the
  credentials are missing, rejected or not allowed;
* the manifest: it exists, its first file has the required columns, it has at least one row
  (and, for Parquet, how many: the progress line's total);
* the output root is writable: a probe object, deleted right after (locally: the nearest
  existing folder is writable; nothing is created);
* the weights: the folder or prefix exists, the family's expected files are there, every
  ``*.safetensors`` header parses and the file's size is what its header describes (a truncated
  upload is named with both sizes), every shard a ``*.index.json`` names is present; adapters and
  the checksums file likewise.

Nothing here imports Ray; the reads are small (listings, file footers, safetensors headers).
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import struct
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

from step1x_batch.errors import JobRefused, RowError, redact, redact_uri
from step1x_batch.io.storage import (
    StorageOptions,
    filesystem,
    is_local,
    is_s3,
    join_uri,
    resolved_endpoint,
    s3_client,
    safe_output_key,
    split_s3_uri,
)

if TYPE_CHECKING:
    from step1x_batch.job.config import JobConfig

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit on the JSON header
_MANIFEST_SAMPLE_BYTES = 1 << 20
_ROW_COUNT_MAX_FILES = 4096  # Parquet footers read for the total; more files: total unknown
_COUNT_MAX_BYTES = 16 * 1024 * 1024  # CSV / JSON Lines read whole for the total up to this size


class PreflightError(JobRefused):
    """A problem found before the run started; the message is the one sentence to print."""


@dataclass
class Preflight:
    """What the checks learned that the run can use."""

    manifest_files: list[str] = field(default_factory=list)
    manifest_columns: list[str] = field(default_factory=list)
    manifest_rows: int | None = None  # None: not known up front (CSV / JSON Lines, many files)
    weights_files: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Storage reachability.


def _code(exc: BaseException) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def check_bucket(uri: str, options: StorageOptions | None, where: str) -> None:
    """One ``HeadBucket`` for an ``s3://`` URI; its failure as the sentence that says what to fix."""
    if not is_s3(uri):
        return
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        NoCredentialsError,
        ReadTimeoutError,
    )

    bucket, _ = split_s3_uri(uri)
    shown = redact_uri(uri)
    endpoint = resolved_endpoint(options) or "AWS S3"
    try:
        s3_client(options).head_bucket(Bucket=bucket)
    except (EndpointConnectionError, ConnectTimeoutError, ConnectionClosedError, ReadTimeoutError):
        raise PreflightError(
            f"{where} {shown}: the object store at {redact_uri(endpoint)} refused the connection "
            "or did not answer; check the storage endpoint_url (or $AWS_ENDPOINT_URL) and that "
            "the server is running and reachable from here") from None
    except NoCredentialsError:
        raise PreflightError(
            f"{where} {shown}: no credentials found; set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or an instance / pod role), or storage.anon: "
            "true for a public bucket") from None
    except ClientError as e:
        code = _code(e)
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise PreflightError(f"{where} {shown}: the bucket {bucket!r} does not exist at "
                                 f"{redact_uri(endpoint)}; create it or fix the URI") from None
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken",
                    "AuthorizationHeaderMalformed"):
            raise PreflightError(f"{where} {shown}: the object store at {redact_uri(endpoint)} "
                                 f"rejected the credentials ({code}); check the AWS_* variables "
                                 "this job runs with") from None
        if code in ("403", "AccessDenied", "Forbidden"):
            raise PreflightError(f"{where} {shown}: access to the bucket {bucket!r} is denied for "
                                 "these credentials; grant them list/read (and write for the "
                                 "output) or use other credentials") from None
        raise PreflightError(f"{where} {shown}: the object store answered {code or e}") from None


def _storage_failure(where: str, uri: str, exc: BaseException) -> PreflightError:
    return PreflightError(f"{where} {redact_uri(uri)}: could not be read "
                          f"({type(exc).__name__}: {redact(str(exc))[:300]})")


# ---------------------------------------------------------------------------------------------
# The manifest.


def _columns_and_rows(uri: str, options: StorageOptions | None) -> tuple[list[str], int | None, bool]:
    """(column names, row count if cheaply known, whether it has at least one row) of one file."""
    import pyarrow.parquet as pq

    from step1x_batch.rows.manifest import manifest_format

    fs, path = filesystem(uri, options)
    fmt = manifest_format(path)
    if fmt == "parquet":
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f)
            return list(meta.schema_arrow.names), meta.metadata.num_rows, meta.metadata.num_rows > 0
    if fmt == "webdataset":  # its members are its columns: a sample that lacks one is its own error row
        return [], None, bool(fs.size(path))
    with fs.open(path, "rb", compression="infer") as f:
        text = io.TextIOWrapper(io.BytesIO(f.read(_MANIFEST_SAMPLE_BYTES)), encoding="utf-8-sig",
                                errors="replace", newline="")
        lines = text.read().splitlines()
    if fmt == "csv":
        import csv

        rows = list(csv.reader(lines[:2]))
        columns = [c.strip() for c in rows[0]] if rows else []
        return columns, None, len(rows) > 1 and any(cell.strip() for cell in rows[1])
    columns: list[str] = []
    records = 0
    for line in lines[:200]:
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError:
            break  # a line cut by the sample size, or bad JSON: that row's own error later
        records += 1
        if isinstance(doc, dict):
            columns.extend(k for k in doc if k not in columns)
    return columns, None, records > 0


def _count_text_rows(files: list[str], options: StorageOptions | None) -> int | None:
    """Rows of small CSV / JSON Lines manifests (read whole, at most a few MB); None for big
    ones, whose total the progress line then does without."""
    import csv

    from step1x_batch.rows.manifest import manifest_format

    if len(files) > 64 or any(manifest_format(f) == "webdataset" for f in files):
        return None
    sizes = []
    for uri in files:
        fs, path = filesystem(uri, options)
        sizes.append(int(fs.size(path) or 0))
    if sum(sizes) > _COUNT_MAX_BYTES or any(f.endswith((".gz", ".bz2", ".zst", ".xz")) for f in files):
        return None
    rows = 0
    for uri in files:
        fs, path = filesystem(uri, options)
        with fs.open(path, "rb") as f:
            text = f.read().decode("utf-8-sig", errors="replace")
        if manifest_format(path) == "csv":
            rows += max(0, sum(1 for r in csv.reader(io.StringIO(text, newline="")) if any(c.strip() for c in r)) - 1)
        else:
            rows += sum(1 for line in text.splitlines() if line.strip())
    return rows


RequiredColumns = Sequence[Sequence[str]] | Mapping[str, Sequence[str]]


def contract_columns(uri: str, options: StorageOptions | None, names: list[str],
                     columns: Mapping[str, Any] | None) -> list[str]:
    """A manifest file's columns as the job sees them once ``input.columns`` is applied (its types
    from a Parquet schema, so an image column of bytes counts as the image); ValueError when the
    map names a column the file lacks."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from step1x_batch.rows.manifest import manifest_format
    from step1x_batch.rows.sources import IMAGE_BYTES, adapt_table

    if manifest_format(uri) == "parquet":
        fs, path = filesystem(uri, options)
        with fs.open(path, "rb") as f:
            empty = pq.ParquetFile(f).schema_arrow.empty_table()
    else:
        empty = pa.table({n: pa.array([], pa.string()) for n in names})
    return [c for c in adapt_table(empty, columns, strict=True).column_names if c != IMAGE_BYTES]


def _check_mapped_columns(files: list[str], names: list[list[str]], column_map: Mapping[str, Any] | None) -> None:
    """Every Parquet file has the columns ``input.columns`` maps (a hub folder can mix schemas)."""
    from step1x_batch.rows.sources import mapped_names

    wanted = [c for cs in mapped_names(column_map or {}).values() for c in cs]
    for f, have in zip(files, names):
        lacking = [c for c in wanted if c not in have]
        if lacking:
            raise PreflightError(f"input.columns: the manifest file {redact_uri(f)} has no column(s) {lacking} "
                                 f"(it has {', '.join(have)}); point input.manifest at files of one schema")


def check_manifest(uri: str, options: StorageOptions | None,
                   required: RequiredColumns = (), columns: Mapping[str, Any] | None = None) -> Preflight:
    """The manifest exists, has the ``required`` columns (each a group of alternatives, e.g.
    ``("image_uri", "image_uris")``; as a mapping, keyed by the setting that names the column, so
    the message says what to change; ``columns``: after the ``input.columns`` map) and at least
    one row."""
    from step1x_batch.rows.manifest import manifest_files, manifest_format

    check_bucket(uri, options, "input.manifest")
    shown = redact_uri(uri)
    try:
        files = manifest_files(uri, options)
    except FileNotFoundError as e:
        raise PreflightError(f"input.manifest: {str(e).rstrip('.')}") from None
    except ValueError as e:
        raise PreflightError(f"input.manifest: {e}") from None
    except OSError as e:
        raise _storage_failure("input.manifest", uri, e) from None
    column_map = columns
    try:
        names, rows, non_empty = _columns_and_rows(files[0], options)
    except Exception as e:  # noqa: BLE001 - unreadable first file: one sentence
        raise PreflightError(f"input.manifest: the file {redact_uri(files[0])} cannot be read as "
                             f"a manifest ({type(e).__name__}: {redact(str(e))[:200]})") from None
    if not names and not non_empty and len(files) == 1:
        raise PreflightError(f"input.manifest: the manifest {shown} has no rows")
    webdataset = manifest_format(files[0]) == "webdataset"
    try:
        # a WebDataset sample's members are its columns: one that lacks a mapped member is its own error row
        columns = names if webdataset else contract_columns(files[0], options, names, column_map)
    except ValueError as e:
        raise PreflightError(f"input.columns: {e}") from None
    groups = [] if webdataset else required.items() if isinstance(required, Mapping) else [(None, g) for g in required]
    for setting, group in groups:
        if not any(c in columns for c in group):
            wanted = " or ".join(f"`{c}`" for c in group)
            named_by = f" (named by {setting})" if setting else ""
            raise PreflightError(
                f"input.manifest: the manifest {shown} has no {wanted} column{named_by}; its first "
                f"file {redact_uri(files[0])} has {', '.join(columns) or 'no columns'}")
    facts = Preflight(manifest_files=files, manifest_columns=columns)
    if files[0].endswith(".parquet") and len(files) <= _ROW_COUNT_MAX_FILES:
        with ThreadPoolExecutor(16) as pool:
            footers = list(pool.map(lambda f: _columns_and_rows(f, options), files[1:]))
        _check_mapped_columns(files[1:], [names for names, _, _ in footers], column_map)
        facts.manifest_rows = int(rows or 0) + sum(int(c or 0) for _, c, _ in footers)
        non_empty = facts.manifest_rows > 0
    else:
        facts.manifest_rows = _count_text_rows(files, options)
        if facts.manifest_rows is not None:
            non_empty = facts.manifest_rows > 0
        for f in files[1:20]:
            if non_empty:
                break
            non_empty = _columns_and_rows(f, options)[2]
    if not non_empty:
        raise PreflightError(f"input.manifest: the manifest {shown} has no rows")
    return facts


_DUPLICATE_CHECK_MAX_ROWS = 2_000_000  # Parquet manifests up to this many rows are checked whole


def _id_text(value: Any) -> str | None:
    """A given id as the normaliser keeps it (text, stripped; an integral float as an integer)."""
    if value is None or isinstance(value, (bytes, bytearray, list, dict, bool)):
        return None
    if isinstance(value, float):
        text = str(int(value)) if value.is_integer() else str(value)
    else:
        text = str(value).strip()
    return text or None


def _duplicate_columns(uri: str, options: StorageOptions | None, full: bool,
                       columns: Mapping[str, Any] | None = None) -> Any:
    """A manifest file's ``id`` and ``output_key`` (``full``: every contract column, an embedded
    image as its hash), after the ``input.columns`` map."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from step1x_batch.rows.manifest import MANIFEST_COLUMNS, _read_file, manifest_format
    from step1x_batch.rows.sources import IMAGE_BYTES, adapt_table, mapped_names

    if manifest_format(uri) != "parquet":
        table = _read_file(uri, options, columns=columns)
        return table.drop_columns([IMAGE_BYTES]) if IMAGE_BYTES in table.column_names else table
    renamed = {s: t for t, ss in mapped_names(columns or {}).items() for s in ss}
    wanted = MANIFEST_COLUMNS if full else ("id", "output_key")
    fs, path = filesystem(uri, options)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        if full:  # the image columns too: an embedded image counts by its hash (a batch at a time)
            read = [c for c in names if renamed.get(c, c) in wanted or renamed.get(c) == "image"
                    or c in ("image", "images")]
        else:
            read = [c for c in names if renamed.get(c, c) in wanted]
        mapping = {t: s for t, s in (columns or {}).items() if all(x in read for x in mapped_names({t: s})[t])}
        parts = []
        for batch in pf.iter_batches(batch_size=1024, columns=read):
            part = adapt_table(pa.Table.from_batches([batch]), mapping)
            parts.append(part.drop_columns([IMAGE_BYTES]) if IMAGE_BYTES in part.column_names else part)
    return pa.concat_tables(parts) if parts else adapt_table(pf.schema_arrow.empty_table().select(read), mapping)


def _row_keys(table: Any, image_ext: str) -> tuple[Any, Any]:
    """Each row's given id and output object key (as the normaliser makes them; None where the
    row gives neither or its key is unsafe: those are the row's own errors). Vectorised for text
    and integer ids; Python only for the rows that give an ``output_key``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from step1x_batch.rows.manifest import MANIFEST_PROBLEM

    n = table.num_rows
    ok_row = pc.is_null(table.column(MANIFEST_PROBLEM)) if MANIFEST_PROBLEM in table.column_names \
        else pa.array([True] * n)
    if "id" not in table.column_names:
        ids = pa.nulls(n, pa.string())
    else:
        col = table.column("id")
        if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            ids = pc.utf8_trim_whitespace(col.cast(pa.string()))
            ids = pc.if_else(pc.equal(ids, ""), pa.nulls(n, pa.string()), ids)
        elif pa.types.is_integer(col.type):
            ids = col.cast(pa.string())
        else:
            ids = pa.array([_id_text(v) for v in col.to_pylist()], pa.string())
    ids = pc.if_else(ok_row, ids, pa.nulls(n, pa.string()))
    keys = pc.binary_join_element_wise("images/", ids, f".{image_ext}", "")
    if "output_key" in table.column_names:
        raw = table.column("output_key")
        if not (pa.types.is_string(raw.type) or pa.types.is_large_string(raw.type)):
            raw = pa.nulls(n, pa.string())  # not text: the row's own error
        given = pc.and_(ok_row, pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(raw)), 0), False))
        key_list = keys.to_pylist() if hasattr(keys, "to_pylist") else list(keys)
        for i, text in zip(pc.indices_nonzero(given).to_pylist(), pc.filter(raw, given).to_pylist()):
            try:
                key_list[i] = safe_output_key(text)
            except RowError:
                key_list[i] = None
        return ids, pa.array(key_list, pa.string())
    return ids, keys


def check_duplicates(facts: Preflight, options: StorageOptions | None, image_ext: str,
                     columns: Mapping[str, Any] | None = None) -> None:
    """Refuse a manifest in which two different rows give the same ``id`` or would write the same
    output object (an ``output_key``, or the ``images/<id>.<ext>`` of a given id), naming both
    rows. Rows that are the same work (equal in every contract column) may repeat. Checked when
    the manifest's size is known and small enough to read (Parquet up to
    ``_DUPLICATE_CHECK_MAX_ROWS`` rows, two columns; CSV / JSON Lines up to the counting limit);
    larger ones are checked per batch and by the skip join
    (:func:`step1x_batch.rows.manifest.mark_duplicates`, :func:`step1x_batch.job.skip.duplicate_ids`)."""
    from step1x_batch.rows.manifest import MANIFEST_COLUMNS

    if facts.manifest_rows is None or facts.manifest_rows > _DUPLICATE_CHECK_MAX_ROWS:
        return
    import pyarrow as pa
    import pyarrow.compute as pc

    sizes: list[tuple[str, int]] = []
    id_parts, key_parts = [], []
    for uri in facts.manifest_files:
        table = _duplicate_columns(uri, options, full=False, columns=columns)
        file_ids, file_keys = _row_keys(table, image_ext)
        id_parts.append(file_ids)
        key_parts.append(file_keys)
        sizes.append((uri, table.num_rows))
    repeated: set[str] = set()
    for parts in (id_parts, key_parts):  # sorted, a value equal to its neighbour repeats (faster than hashing)
        values = pa.chunked_array(parts, pa.string()).drop_null().combine_chunks()
        if len(values) > 1:
            values = values.take(pc.array_sort_indices(values))
            same = pc.equal(values.slice(1), values.slice(0, len(values) - 1))
            repeated |= set(pc.filter(values.slice(1), same).to_pylist())
    if not repeated:
        return
    ids = pa.chunked_array(id_parts, pa.string()).to_pylist()
    keys = pa.chunked_array(key_parts, pa.string()).to_pylist()
    located = [(uri, i) for uri, n in sizes for i in range(n)]
    # Some value repeats: are the rows the same work? Only now read every contract column.
    contents: list[tuple] = []
    for uri in facts.manifest_files:
        table = _duplicate_columns(uri, options, full=True, columns=columns)
        contract = [c for c in table.column_names if c in MANIFEST_COLUMNS]
        cols = [table.column(c).to_pylist() for c in contract]
        contents += [tuple(repr(col[i]) for col in cols) for i in range(table.num_rows)]
    found: list[str] = []
    count = 0
    first_by: dict[tuple[str, str], int] = {}
    for i, (row_id, key) in enumerate(zip(ids, keys)):
        for value, what in ((row_id, "the id"), (key, "the output key")):
            if value is None or value not in repeated:
                continue
            j = first_by.setdefault((what, value), i)
            if contents[j] != contents[i]:
                count += 1
                if len(found) < 3:
                    (fi, ri), (fj, rj) = located[i], located[j]
                    found.append(f"row {ri + 1} of {redact_uri(fi)} has {what} {redact(repr(value))[:120]}, "
                                 f"as row {rj + 1} of {redact_uri(fj)} does")
                break
    if found:
        more = f" (and {count - len(found)} more)" if count > len(found) else ""
        raise PreflightError(
            f"input.manifest: two different rows may not share an id or an output object: "
            f"{'; '.join(found)}{more}; they would write one object, or give one id two results. "
            "Give each row its own id and output_key, or drop the repeated rows")


# ---------------------------------------------------------------------------------------------
# The output root.


def check_output(uri: str, options: StorageOptions | None) -> None:
    """The output root can be written: a probe object put and deleted (S3), or the nearest
    existing folder writable (local; nothing is created)."""
    shown = redact_uri(uri)
    if is_local(uri):
        path = os.path.abspath(uri.removeprefix("file://"))
        probe = path
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        if not os.path.isdir(probe):
            raise PreflightError(f"output.uri {shown}: {probe} is a file, not a folder")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise PreflightError(f"output.uri {shown}: {probe} is not writable by this user")
        return
    check_bucket(uri, options, "output.uri")
    if not is_s3(uri):
        return
    from botocore.exceptions import ClientError

    bucket, key = split_s3_uri(join_uri(uri, f"_probe-{uuid.uuid4().hex}"))
    client = s3_client(options)
    try:
        client.put_object(Bucket=bucket, Key=key, Body=b"")
    except ClientError as e:
        raise PreflightError(f"output.uri {shown}: these credentials cannot write there "
                             f"({_code(e) or e}); grant s3:PutObject on it or use another "
                             "output location") from None
    try:
        client.delete_object(Bucket=bucket, Key=key)
    except ClientError as e:
        raise PreflightError(f"output.uri {shown}: these credentials can write but not delete "
                             f"there ({_code(e) or e}); the job needs both (it replaces its lease "
                             "and removes stale dataset shards)") from None


# ---------------------------------------------------------------------------------------------
# Weights.


def _listing(uri: str, options: StorageOptions | None, where: str) -> dict[str, int]:
    """``{relative path: size}`` of every file under a weights folder or prefix."""
    shown = redact_uri(uri)
    if is_local(uri):
        root = os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))
        if not os.path.isdir(root):
            what = "is a file, not a folder" if os.path.exists(root) else "does not exist"
            raise PreflightError(f"{where} {shown} {what}; it must name the weights folder")
        files: dict[str, int] = {}
        for dirpath, _, names in os.walk(root, followlinks=True):
            for name in names:
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, root).replace(os.sep, "/")
                if not any(part.startswith(".") for part in rel.split("/")):
                    files[rel] = os.path.getsize(full)
        if not files:
            raise PreflightError(f"{where} {shown} is an empty folder")
        return files
    check_bucket(uri, options, where)
    fs, base = filesystem(uri, options)
    try:
        found = fs.find(base, detail=True)
    except Exception as e:  # noqa: BLE001
        raise _storage_failure(where, uri, e) from None
    files = {}
    for path, info in found.items():
        if info.get("type") == "directory" or not path.startswith(base.rstrip("/") + "/"):
            continue
        rel = path[len(base.rstrip("/")) + 1:]
        if rel and not rel.endswith("/"):
            files[rel] = int(info.get("size") or 0)
    if not files:
        raise PreflightError(f"{where} {shown}: nothing there (no objects under that prefix); it "
                             "must name the folder holding the weights")
    return files


def _read_range(uri: str, options: StorageOptions | None, start: int, end: int) -> bytes:
    if is_local(uri):
        with open(uri.removeprefix("file://"), "rb") as f:
            f.seek(start)
            return f.read(end - start)
    fs, path = filesystem(uri, options)
    return fs.cat_file(path, start=start, end=end)


def safetensors_problem(uri: str, size: int, options: StorageOptions | None) -> str | None:
    """Why a ``.safetensors`` file of ``size`` bytes cannot be loaded, from its header alone
    (truncated, padded, not safetensors); None when the header and the size agree."""
    if size < 8:
        return f"is {size} bytes, too short for a safetensors file"
    (n,) = struct.unpack("<Q", _read_range(uri, options, 0, 8))
    if n > MAX_HEADER_BYTES or 8 + n > size:
        return (f"is not a readable safetensors file (its header claims {n:,} bytes of metadata "
                f"in a {size:,}-byte file): truncated or not safetensors")
    try:
        header = json.loads(_read_range(uri, options, 8, 8 + n))
    except ValueError:
        return "has a safetensors header that is not valid JSON: truncated or not safetensors"
    ends = [int(v["data_offsets"][1]) for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v]
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        return (f"is truncated: {size:,} bytes, its header describes {expected:,} "
                f"({expected - size:,} missing); upload it again")
    if size > expected:
        return (f"is {size:,} bytes but its header describes {expected:,}: a corrupt or "
                "concatenated upload; upload it again")
    return None


def check_weights(uri: str, options: StorageOptions | None, family: Any,
                  where: str = "model.weights") -> dict[str, int]:
    """The weights folder exists, holds what the family loads, and every safetensors file in it
    (and every shard an index names) is sound. Returns the listing."""
    files = _listing(uri, options, where)
    shown = redact_uri(uri)
    problem = family.weights_problem(files)
    if problem:
        raise PreflightError(f"{where} {shown} (family {family.name}) {problem}")
    for rel in sorted(f for f in files if f.endswith(".safetensors.index.json")):
        try:
            index = json.loads(_read_range(join_uri(uri, rel), options, 0, files[rel]))
            names = sorted(set((index.get("weight_map") or {}).values()))
        except (ValueError, AttributeError):
            raise PreflightError(f"{where} {shown}: {rel} is not a valid shard index") from None
        folder = posixpath.dirname(rel)
        missing = [n for n in names if posixpath.join(folder, n) not in files]
        if missing:
            raise PreflightError(f"{where} {shown}: {rel} names shards that are not there: "
                                 f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    tensors = sorted(f for f in files if f.endswith(".safetensors"))
    _check_files(uri, options, tensors, files, where)
    return files


def _check_files(root: str, options: StorageOptions | None, names: Iterable[str],
                 sizes: dict[str, int], where: str) -> None:
    names = list(names)

    def one(rel: str) -> str | None:
        try:
            return safetensors_problem(join_uri(root, rel), sizes[rel], options)
        except Exception as e:  # noqa: BLE001
            return f"could not be read ({type(e).__name__}: {redact(str(e))[:200]})"

    with ThreadPoolExecutor(8) as pool:
        for rel, problem in zip(names, pool.map(one, names)):
            if problem:
                raise PreflightError(f"{where}: the weights file {redact_uri(join_uri(root, rel))} {problem}")


def check_file(uri: str, options: StorageOptions | None, where: str, *, safetensors: bool) -> None:
    """One file (an adapter, a checksums list) exists and, for safetensors, is sound."""
    shown = redact_uri(uri)
    if is_local(uri):
        path = os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))
        if not os.path.isfile(path):
            raise PreflightError(f"{where} {shown} does not exist")
        size = os.path.getsize(path)
    else:
        check_bucket(uri, options, where)
        fs, path = filesystem(uri, options)
        try:
            info = fs.info(path)
        except FileNotFoundError:
            raise PreflightError(f"{where} {shown} does not exist") from None
        except Exception as e:  # noqa: BLE001
            raise _storage_failure(where, uri, e) from None
        size = int(info.get("size") or 0)
    if safetensors:
        problem = safetensors_problem(uri, size, options)
        if problem:
            raise PreflightError(f"{where}: the file {shown} {problem}")


# ---------------------------------------------------------------------------------------------
# The whole job.

DATASET_COLUMNS: tuple[tuple[str, ...], ...] = (("instruction",), ("image_uri", "image_uris"))


def check_job(cfg: "JobConfig", *, manifest: str | None = None,
              required_columns: RequiredColumns = DATASET_COLUMNS,
              extra: Callable[[], None] | None = None) -> Preflight:
    """Every check for a job config, in the order a person would fix things: the input, the
    output, the weights."""
    column_map = cfg.input.columns if required_columns is DATASET_COLUMNS else None
    if cfg.input.columns and column_map is None:
        raise PreflightError("input.columns maps an edit manifest's columns; this job reads its own "
                             "manifest with the columns its section names: remove input.columns")
    facts = check_manifest(manifest or cfg.input.manifest, cfg.input.storage, required_columns, column_map)
    if required_columns is DATASET_COLUMNS:  # an edit manifest: one row per output object and id
        from step1x_batch.io.images import image_extension

        check_duplicates(facts, cfg.input.storage, image_extension(cfg.output.format), column_map)
    if extra is not None:
        extra()
    check_output(cfg.output.uri, cfg.output_storage())
    model = cfg.model
    family = model.family_class()(model.spec())  # no adapter hashes yet: nothing is staged here
    if model.weights and family.needs_weights:
        facts.weights_files = check_weights(model.weights, cfg.model_storage(), family)
    for i, adapter in enumerate(model.adapters):
        check_file(adapter.uri, cfg.model_storage(), f"model.adapters[{i}].uri", safetensors=True)
    for name, adapters in model.adapter_sets.items():
        for i, adapter in enumerate(adapters):
            check_file(adapter.uri, cfg.model_storage(), f"model.adapter_sets.{name}[{i}].uri", safetensors=True)
    if model.checksums:
        check_file(model.checksums, cfg.model_storage(), "model.checksums", safetensors=False)
    return facts
