"""Every read and write of the job goes through here: fsspec for Python, an explicit pyarrow
filesystem for pyarrow and Ray readers.

Why an explicit pyarrow filesystem: pyarrow's own S3 client ignores ``AWS_ENDPOINT_URL``, so a
bare ``s3://`` path handed to pyarrow or Ray silently goes to AWS instead of MinIO / Ceph / R2 /
moto. :func:`arrow_filesystem` wraps the same configured fsspec filesystem.

Retries: S3 requests go through botocore's "standard" retry mode (5xx, 503 SlowDown and other
throttling, connection reset, timeouts; exponential backoff with jitter), at most
``StorageOptions.max_attempts`` attempts per request. s3fs's own retry layer is switched off so
attempts do not multiply. A response body that breaks off mid-read (which botocore cannot retry)
is retried by :func:`read_bytes` itself. Every retry, of either kind, is counted in this process:
see :func:`retry_count`.

Credentials never appear here or in :class:`StorageOptions`: they come from the environment or
the cloud's credential chain.
"""

from __future__ import annotations

import asyncio
import errno
import http.client
import os
import posixpath
import random
import re
import stat
import threading
import time
import uuid
from typing import Callable, TypeVar
from urllib.parse import unquote, urlsplit

import fsspec
import pyarrow.fs as pafs
import pydantic
import s3fs
from fsspec.implementations.local import LocalFileSystem

from step1x_batch.errors import (
    IMAGE_TOO_LARGE,
    INVALID_URI,
    MISSING_OBJECT,
    NOT_A_FILE,
    READ_FAILED,
    UNSAFE_OUTPUT_KEY,
    WRITE_FAILED,
    RowError,
    redact,
    redact_uri,
)

T = TypeVar("T")

ENDPOINT_ENV_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "S3_ENDPOINT_URL")
_S3_SCHEMES = ("s3", "s3a", "s3n")


class StorageOptions(pydantic.BaseModel):
    """Where object storage is and how hard to try. No credentials here, ever."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    endpoint_url: str | None = None  # else $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL / $S3_ENDPOINT_URL
    region: str | None = None  # else $AWS_REGION / $AWS_DEFAULT_REGION / us-east-1
    anon: bool = False
    max_attempts: int = pydantic.Field(5, ge=1, le=50)  # attempts per request, retries included
    connect_timeout: float = pydantic.Field(10.0, gt=0)
    read_timeout: float = pydantic.Field(60.0, gt=0)


# --- retry accounting ----------------------------------------------------------------------------

_retries_seen = 0
_retries_lock = threading.Lock()


def _count_retry() -> None:
    global _retries_seen
    with _retries_lock:
        _retries_seen += 1


def retry_count() -> int:
    """Retries of transient storage errors made by this process so far (monotonic). Diff two
    readings around a piece of work to attribute retries to it; each Ray worker has its own."""
    return _retries_seen


def _on_request_created(request=None, **_kwargs) -> None:
    """botocore ``request-created`` hook: an attempt number above 1 is a retry."""
    context = getattr(request, "context", None) or {}
    attempt = (context.get("retries") or {}).get("attempt", 1)
    if attempt and attempt > 1:
        _count_retry()


class _S3FileSystem(s3fs.S3FileSystem):
    """s3fs with botocore doing all request retries (counted), s3fs's own retry layer off."""

    retries = 1

    async def set_session(self, refresh=False, kwargs={}):  # noqa: B006 (s3fs's signature)
        client = await super().set_session(refresh=refresh, kwargs=kwargs)
        client.meta.events.register(
            "request-created.s3", _on_request_created, unique_id="step1x-batch-retry-counter"
        )
        return client


# --- filesystems ---------------------------------------------------------------------------------


def resolved_endpoint(options: StorageOptions | None = None) -> str | None:
    """The S3 endpoint in force: the options' one, else the first endpoint variable set."""
    if options is not None and options.endpoint_url:
        return options.endpoint_url
    for name in ENDPOINT_ENV_VARS:
        if os.environ.get(name):
            return os.environ[name]
    return None


def _region(options: StorageOptions) -> str:
    return (
        options.region
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or "us-east-1"
    )


def _scheme(uri: str) -> str:
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.\-]*)://", uri)
    return m.group(1).lower() if m else ""


def is_local(uri: str) -> bool:
    """True for plain paths and ``file://`` URIs."""
    return _scheme(uri) in ("", "file", "local")


def absolute_uri(uri: str) -> str:
    """``uri`` with a local relative path made absolute (Ray workers may not share the driver's
    working directory); URLs are returned unchanged."""
    if _scheme(uri):
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def _s3(options: StorageOptions) -> s3fs.S3FileSystem:
    endpoint = resolved_endpoint(options)
    client_kwargs: dict = {"region_name": _region(options)}
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    return _S3FileSystem(
        anon=options.anon,
        client_kwargs=client_kwargs,
        config_kwargs={
            "retries": {"total_max_attempts": options.max_attempts, "mode": "standard"},
            "connect_timeout": options.connect_timeout,
            "read_timeout": options.read_timeout,
        },
        # Listings must be fresh: another process (a Ray worker, a previous run) may have just
        # written the log part or output a listing is looking for.
        use_listings_cache=False,
    )


def is_s3(uri: str) -> bool:
    return _scheme(uri) in _S3_SCHEMES


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    bucket, _, key = uri.split("://", 1)[1].partition("/")
    return bucket, key


def s3_client(options: StorageOptions | None = None):
    """A plain botocore S3 client with the same endpoint, region, retries and timeouts as the
    file systems, for requests fsspec does not express (conditional puts, bucket checks)."""
    import botocore.session
    from botocore import UNSIGNED
    from botocore.config import Config

    options = options or StorageOptions()
    config = Config(
        retries={"total_max_attempts": options.max_attempts, "mode": "standard"},
        connect_timeout=options.connect_timeout, read_timeout=options.read_timeout,
        signature_version=UNSIGNED if options.anon else None,
    )
    session = botocore.session.get_session()
    client = session.create_client("s3", region_name=_region(options),
                                   endpoint_url=resolved_endpoint(options), config=config)
    client.meta.events.register("request-created.s3", _on_request_created,
                                unique_id="step1x-batch-retry-counter")
    return client


def filesystem(
    uri: str, options: StorageOptions | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it (``bucket/key`` for S3, an
    absolute path for local files)."""
    options = options or StorageOptions()
    scheme = _scheme(uri)
    if scheme in _S3_SCHEMES:
        fs = _s3(options)
        return fs, fs._strip_protocol(uri.split("://", 1)[1]).rstrip("/")
    if scheme in ("", "file", "local"):
        fs = LocalFileSystem()
        return fs, fs._strip_protocol(uri)
    return fsspec.core.url_to_fs(uri)


def arrow_filesystem(
    uri: str, options: StorageOptions | None = None, *, native: bool = False
) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem for ``uri`` that honours the configured endpoint, and the path in it.

    By default the fsspec filesystem of :func:`filesystem` wrapped for pyarrow (same endpoint,
    retries and retry counting). ``native=True`` returns pyarrow's own S3 client with
    ``endpoint_override`` for S3 URIs (faster for large Parquet scans; retries not counted)."""
    options = options or StorageOptions()
    fs, path = filesystem(uri, options)
    if isinstance(fs, LocalFileSystem):
        return pafs.LocalFileSystem(), path
    if native and _scheme(uri) in _S3_SCHEMES:
        kwargs: dict = {
            "region": _region(options),
            "anonymous": options.anon,
            "connect_timeout": options.connect_timeout,
            "request_timeout": options.read_timeout,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=options.max_attempts),
        }
        endpoint = resolved_endpoint(options)
        if endpoint:
            parts = urlsplit(endpoint)
            kwargs["endpoint_override"] = parts.netloc or parts.path
            kwargs["scheme"] = parts.scheme or "https"
        return pafs.S3FileSystem(**kwargs), path
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


# --- reads and writes ----------------------------------------------------------------------------

try:  # errors raised while a response body streams in: botocore has not retried these
    import aiohttp

    _AIOHTTP_STREAM_ERRORS: tuple[type[BaseException], ...] = (
        aiohttp.ClientPayloadError,
        aiohttp.ServerDisconnectedError,
    )
except ImportError:  # pragma: no cover
    _AIOHTTP_STREAM_ERRORS = ()
try:
    from botocore.exceptions import IncompleteReadError, ResponseStreamingError

    _BOTO_STREAM_ERRORS: tuple[type[BaseException], ...] = (
        IncompleteReadError,
        ResponseStreamingError,
    )
except ImportError:  # pragma: no cover
    _BOTO_STREAM_ERRORS = ()

_STREAM_ERRORS = (
    _AIOHTTP_STREAM_ERRORS
    + _BOTO_STREAM_ERRORS
    + (
        ConnectionResetError,
        http.client.IncompleteRead,
        TimeoutError,
        asyncio.TimeoutError,
        fsspec.exceptions.FSTimeoutError,
    )
)


def _with_retries(fn: Callable[[], T], max_attempts: int, is_transient) -> T:
    for attempt in range(1, max_attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            if attempt >= max_attempts or not is_transient(exc):
                raise
            _count_retry()
            time.sleep(min(5.0, 0.1 * 2 ** (attempt - 1)) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or "no details"
    return redact(f"{type(exc).__name__}: {text}")


class _Refused(Exception):
    """A read refused before or while reading: (row error code, why)."""

    def __init__(self, code: str, why: str) -> None:
        super().__init__(why)
        self.code, self.why = code, why


_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
_CHUNK = 1 << 20


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _too_large(size: int | str, max_bytes: int) -> _Refused:
    return _Refused(IMAGE_TOO_LARGE, f"is {size} bytes, over input.max_image_bytes ({max_bytes}); "
                    "downscale or recompress the image, or raise the limit")


def _read_local(path: str, max_bytes: int | None) -> bytes:
    """A regular file's bytes, at most ``max_bytes``. Opened without blocking (a FIFO would
    wait for a writer forever) and checked with ``fstat`` on the open descriptor, so what is
    read is what was checked: folders, FIFOs, devices (``/dev/zero``) and sockets are refused
    before a byte is read, and a file over the limit by its size, or while reading if it grows."""
    fd = os.open(path, _OPEN_FLAGS)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Refused(NOT_A_FILE, f"is {_kind(st.st_mode)}, not an image file")
        if max_bytes is not None and st.st_size > max_bytes:
            raise _too_large(st.st_size, max_bytes)
        chunks, total = [], 0
        while True:
            want = _CHUNK if max_bytes is None else min(_CHUNK, max_bytes + 1 - total)
            chunk = os.read(fd, want)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            total += len(chunk)
            if max_bytes is not None and total > max_bytes:
                raise _too_large(f"more than {max_bytes}", max_bytes)
    finally:
        os.close(fd)


def _unsatisfiable_range(exc: BaseException) -> bool:
    """A ranged read from byte 0 refused with 416: the object is empty."""
    text = str(exc).lower()
    return "range is not satisfiable" in text or "invalidrange" in text or "416" in text.split()


def _read_remote(fs: fsspec.AbstractFileSystem, path: str, max_bytes: int | None) -> bytes:
    """The object's bytes; with ``max_bytes``, one ranged GET of at most ``max_bytes + 1`` bytes
    (so an endless or huge object never streams in whole) and a refusal when it is longer."""
    if max_bytes is None:
        return fs.cat_file(path)
    try:
        data = fs.cat_file(path, start=0, end=max_bytes + 1)
    except OSError as exc:
        if not _unsatisfiable_range(exc) or isinstance(exc, FileNotFoundError):
            raise
        return b""
    if len(data) > max_bytes:
        raise _too_large(f"more than {max_bytes}", max_bytes)
    return data


# Exceptions that say the URI itself cannot name an object: the same on every attempt.
_INVALID_URI_ERRORS: tuple[type[BaseException], ...] = (ValueError, ImportError)
try:
    from botocore.exceptions import ParamValidationError

    _INVALID_URI_ERRORS += (ParamValidationError,)
except ImportError:  # pragma: no cover
    pass


def read_bytes(uri: str, options: StorageOptions | None = None, max_bytes: int | None = None) -> bytes:
    """The whole object at ``uri`` (at most ``max_bytes`` bytes when given), or a RowError whose
    code says whether trying again could help (:data:`errors.TRANSIENT_CODES`):

    * final: MISSING_OBJECT (no such file or object), NOT_A_FILE (a folder, FIFO, device, socket,
      symlink loop), INVALID_URI (unknown protocol, a NUL byte, a bucket name the client refuses,
      a name too long), IMAGE_TOO_LARGE (over ``max_bytes``);
    * transient: READ_FAILED (network, the store's 5xx, access denied), after retrying the
      failures that break off a response body (botocore retries the rest itself)."""
    options = options or StorageOptions()
    shown = redact_uri(uri)
    try:
        if "\x00" in uri:
            raise _Refused(INVALID_URI, "contains a NUL byte")
        fs, path = filesystem(uri, options)
        if isinstance(fs, LocalFileSystem):
            return _read_local(path, max_bytes)
        return _with_retries(lambda: _read_remote(fs, path, max_bytes), options.max_attempts,
                             lambda exc: isinstance(exc, _STREAM_ERRORS))
    except _Refused as exc:
        raise RowError(exc.code, f"{shown} {exc.why}; image_uri must name one image file.") from None
    except FileNotFoundError:
        raise RowError(
            MISSING_OBJECT,
            f"No object at {shown}; check that image_uri names an existing file or object "
            "(relative paths are resolved against the manifest's folder).",
        ) from None
    except IsADirectoryError:
        raise RowError(NOT_A_FILE, f"{shown} is a folder, not a file; image_uri must name one image file.") from None
    except NotADirectoryError:
        raise RowError(MISSING_OBJECT, f"No object at {shown}: a part of the path is a file, not a folder.") from None
    except PermissionError as exc:
        raise RowError(
            READ_FAILED,
            f"Access denied reading {shown} ({_describe(exc)}); check the credentials and "
            "permissions available to the job's workers (the next run tries this row again).",
        ) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RowError(NOT_A_FILE, f"{shown} is a symbolic link loop, not an image file.") from None
        if exc.errno == errno.ENAMETOOLONG:
            raise RowError(INVALID_URI, f"{shown}: the path is too long for the file system.") from None
        raise RowError(READ_FAILED, _read_failed(shown, exc, options.max_attempts)) from None
    except _INVALID_URI_ERRORS as exc:
        raise RowError(
            INVALID_URI,
            f"{shown} cannot name an object ({_describe(exc)[:300]}); fix the URI (scheme, bucket "
            "name, path).",
        ) from None
    except Exception as exc:  # noqa: BLE001 - any other storage failure is a (transient) row error
        raise RowError(READ_FAILED, _read_failed(shown, exc, options.max_attempts)) from None


def _read_failed(shown: str, exc: BaseException, max_attempts: int) -> str:
    """Only failures of the transient kind get here (a network fault, the store's 5xx), which
    the store client retries itself: "up to" because it stops early on a non-retryable answer."""
    return (f"Could not read {shown} ({_describe(exc)}; up to {max_attempts} attempts); check the "
            "storage endpoint, network and URI (the next run tries this row again).")


def _write_local(path: str, data: bytes) -> None:
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_bytes(uri: str, data: bytes, options: StorageOptions | None = None) -> None:
    """Write the whole object or nothing: a local file is written to a temporary name in the same
    folder and renamed; an S3 object is one PUT (or a multipart upload, which also appears only
    when complete). Raises RowError(WRITE_FAILED)."""
    options = options or StorageOptions()
    try:
        fs, path = filesystem(uri, options)
        if isinstance(fs, LocalFileSystem):
            _write_local(path, bytes(data))
        else:
            _with_retries(
                lambda: fs.pipe_file(path, bytes(data)),
                options.max_attempts,
                lambda exc: isinstance(exc, _STREAM_ERRORS),
            )
    except Exception as exc:  # noqa: BLE001 - any storage failure is a row error
        raise RowError(
            WRITE_FAILED,
            f"Could not write {redact_uri(uri)} ({_describe(exc)}); check that the output "
            "location exists and the job's workers may write to it.",
        ) from None


def exists(uri: str, options: StorageOptions | None = None) -> bool:
    """Whether a file or object (or folder / prefix) exists at ``uri``."""
    fs, path = filesystem(uri, options)
    return bool(fs.exists(path))


def join_uri(root: str, key: str) -> str:
    """``root`` + ``/`` + ``key``. ``key`` must already be safe (see :func:`safe_output_key`)."""
    if not key:
        return root
    return root.rstrip("/") + "/" + key.lstrip("/")


_SCHEME_PREFIX = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")
_MAX_KEY_BYTES = 1024  # S3's limit


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# The job's own objects under an output root (the lease, the row state, the logs, the run files,
# the pairs / catalog / dataset jobs' files): a row's output_key may not name them. Names that
# start with "_" or "." are the job's too (the lease, its temporary files, preflight probes).
# (The pairs job's edited images go to pairs/images/, a row's own output; its manifests and run
# records are the job's.)
RESERVED_OUTPUT_PREFIXES = ("state", "logs", "runs", "pairs/manifests", "pairs/runs", "catalog", "dataset")


def reserved_output_key(key: str) -> str | None:
    """What a normalised output key would overwrite among the job's own objects, or None."""
    first = key.split("/", 1)[0]
    if first.startswith(("_", ".")):
        return f"'{first}' (names starting with '_' or '.' are the job's own, e.g. _lease.json)"
    folded = key.casefold()
    for prefix in RESERVED_OUTPUT_PREFIXES:
        if folded == prefix or folded.startswith(prefix + "/"):
            return f"the job's own '{key[:len(prefix)]}/' area"
    return None


def safe_output_key(key: str) -> str:
    """``key`` normalised (``./`` and ``//`` removed), or RowError(UNSAFE_OUTPUT_KEY) when it could
    leave the output root or is not a plain relative key: ``..`` segments (also percent-encoded),
    absolute paths, ``~``, URLs and ``scheme:`` / drive prefixes, backslashes, control characters,
    empty keys, keys naming a folder, keys over 1024 bytes, and keys naming the job's own objects
    (:func:`reserved_output_key`: ``_lease.json``, ``state/``, ``logs/``, ``runs/``, ...)."""

    def unsafe(why: str) -> RowError:
        return RowError(
            UNSAFE_OUTPUT_KEY,
            f"output_key {redact(repr(key))[:200]} {why}; give a relative key such as "
            "'images/name.png' that stays inside the output root.",
        )

    if not isinstance(key, str):
        raise unsafe("is not text")
    stripped = key.strip()
    if not stripped:
        raise unsafe("is empty")
    decoded = unquote(stripped)
    for text in (stripped, decoded):
        if _CONTROL.search(text):
            raise unsafe("contains control characters")
        if "\\" in text:
            raise unsafe("contains a backslash")
        if text.startswith(("/", "~")):
            raise unsafe("is an absolute path")
        if _SCHEME_PREFIX.match(text) or "://" in text:
            raise unsafe("is a URL or has a scheme/drive prefix")
        if ".." in text.split("/"):
            raise unsafe("contains a '..' segment")
    if stripped.endswith("/"):
        raise unsafe("names a folder, not an object")
    parts = [p for p in stripped.split("/") if p not in ("", ".")]
    if not parts:
        raise unsafe("is empty after normalisation")
    normalised = "/".join(parts)
    if len(normalised.encode("utf-8")) > _MAX_KEY_BYTES:
        raise unsafe(f"is longer than {_MAX_KEY_BYTES} bytes")
    reserved = reserved_output_key(normalised)
    if reserved:
        raise unsafe(f"would overwrite {reserved}")
    return normalised


def parent_uri(uri: str) -> str:
    """The folder containing ``uri`` (``s3://b/a/x.png`` -> ``s3://b/a``)."""
    scheme = _scheme(uri)
    if scheme:
        head, rest = uri.split("://", 1)
        return f"{head}://{posixpath.dirname(rest.rstrip('/'))}"
    return os.path.dirname(uri.rstrip("/")) or "."
