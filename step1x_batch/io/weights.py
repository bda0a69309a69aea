"""Object-storage weights staged once per node to a local disk, then loaded from there.

Why: every GPU actor loads about 40 GB (DiT, VAE, Qwen2.5-VL). Eight actors on a node each pulling
that from S3 would cost 8x the transfer and minutes of idle GPUs, so the first actor on a node
downloads into ``cache_dir`` (a local NVMe disk) while the others wait on a file lock, then all of
them load the same files from disk.

Crash safety: each file is written as ``<name>.partial``, checked (size against the listing,
sha256 when a checksum list is given), fsynced and renamed into place; ``.complete.json`` is
written last. A cache folder without a valid marker, or whose files no longer match the sizes the
marker records, is a download cut off by a crash: it is removed and downloaded again. The lock is
an ``flock`` on a sibling ``.lock`` file, which the kernel releases when its holder dies, so a
crashed stager never blocks the node.

The cached copy is trusted by its marker: a later call does not contact the object store at all.
Publish a changed release under a new prefix (the cache folder is named by the URI's hash).

``include`` stages only the files matching some glob patterns (a CPU node's prepare stage needs
the tokenizer and processor files, not 40 GB of weights); such a subset has a cache folder of its
own.

No Ray here: this runs in a Ray actor, a plain script, or a test process alike.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import hashlib
import json
import logging
import os
import pathlib
import posixpath
import shutil
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence

from filelock import FileLock, Timeout

from step1x_batch.errors import redact, redact_uri
from step1x_batch.io.storage import (
    _STREAM_ERRORS,
    StorageOptions,
    _with_retries,
    filesystem,
    is_local,
)

__all__ = [
    "WeightsSource",
    "CACHE_ENV_VAR",
    "MARKER_NAME",
    "ChecksumMismatchError",
    "StagingError",
    "cache_key",
    "default_cache_dir",
    "read_checksums",
    "stage_weights",
]

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (bytes staged so far, bytes in all)

CACHE_ENV_VAR = "STEP1X_WEIGHTS_CACHE"
MARKER_NAME = ".complete.json"
PARTIAL_SUFFIX = ".partial"
MARKER_VERSION = 1
DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024  # one ranged GET; memory in flight = chunk x concurrency
DEFAULT_CONCURRENCY = 8  # ranged GETs in flight per file: one S3 stream tops out far below NVMe
_HASH_BLOCK = 8 * 1024 * 1024
_PROGRESS_EVERY_S = 30.0


class StagingError(RuntimeError):
    """Weights could not be staged (listing, download, verification or local disk)."""


class ChecksumMismatchError(StagingError):
    """A downloaded file's sha256 differs from the checksum list."""


class _ShortRead(IOError):
    """A ranged GET returned fewer bytes than asked: a transient failure, retried."""


# --- small helpers -------------------------------------------------------------------------------


def default_cache_dir(explicit: str | os.PathLike | None = None) -> pathlib.Path:
    """Where staged weights live: ``explicit``, else ``$STEP1X_WEIGHTS_CACHE``, else
    ``~/.cache/step1x-batch/weights``. On a cluster point it at a node-local SSD."""
    if explicit:
        return pathlib.Path(os.path.expanduser(os.fspath(explicit)))
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return pathlib.Path(os.path.expanduser(env))
    return pathlib.Path.home() / ".cache" / "step1x-batch" / "weights"


def _normalized(uri: str) -> str:
    return uri.strip().rstrip("/")


def cache_key(uri: str, include: Sequence[str] | None = None) -> str:
    """The cache folder name for ``uri``: the first 16 hex digits of sha256 of the URI (trailing
    ``/`` ignored, so ``s3://b/p`` and ``s3://b/p/`` share one copy), and of ``include``."""
    text = _normalized(uri) if include is None else _normalized(uri) + "\x00" + "\x00".join(sorted(include))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _local_path(uri: str) -> pathlib.Path:
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    elif uri.startswith("local://"):
        uri = uri[len("local://") :]
    return pathlib.Path(os.path.expanduser(uri))


def format_bytes(n: float) -> str:
    """``1.2 GB``: sizes as people read them (decimal units)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


def _rate(n: int, seconds: float) -> str:
    return f"{format_bytes(n / max(seconds, 1e-6))}/s"


def _safe_relpath(rel: str, shown_uri: str) -> str:
    """``rel`` as a relative POSIX path that stays inside the cache folder."""
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if not parts or ".." in parts or "\\" in rel or rel.startswith("/"):
        raise StagingError(f"refusing object {rel!r} under {shown_uri}: its key leaves the folder")
    if parts[-1] == MARKER_NAME or parts[-1].endswith(PARTIAL_SUFFIX):
        raise StagingError(
            f"refusing object {rel!r} under {shown_uri}: the names {MARKER_NAME!r} and "
            f"'*{PARTIAL_SUFFIX}' are reserved by the weights cache"
        )
    return "/".join(parts)


def sha256_file(path: pathlib.Path) -> str:
    """The hex sha256 of a local file's bytes (read in blocks)."""
    return _sha256_file(path)


def _sha256_file(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: pathlib.Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- checksum lists ------------------------------------------------------------------------------


def parse_sha256sum(text: str) -> dict[str, str]:
    """``sha256sum`` output (``<hex>  <path>`` or ``<hex> *<path>``) as ``{relpath: hex}``;
    blank lines and ``#`` comments are ignored, ``./`` prefixes dropped."""
    out: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        digest, _, name = line.partition(" ")
        name = name.lstrip(" ").removeprefix("*").removeprefix("./")
        if len(digest) != 64 or not name or any(c not in "0123456789abcdefABCDEF" for c in digest):
            raise StagingError(
                f"checksum list line {number} is not '<sha256 hex>  <path>': {redact(line)[:120]!r}"
            )
        out[name] = digest
    return out


def _normalize_checksums(checksums: Mapping[str, str]) -> dict[str, str]:
    out = {}
    for rel, digest in checksums.items():
        rel = posixpath.normpath(str(rel).replace("\\", "/")).lstrip("/")
        if rel.startswith("./"):
            rel = rel[2:]
        digest = str(digest).strip().lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise StagingError(f"checksum for {rel!r} is not a sha256 hex digest")
        out[rel] = digest
    return out


def read_checksums(
    checksums: Mapping[str, str] | str | os.PathLike | None, options: StorageOptions | None = None
) -> dict[str, str] | None:
    """A checksum list as ``{relpath: sha256 hex}``: a mapping as given, or the ``sha256sum``
    file at a local path / any fsspec URI."""
    if checksums is None:
        return None
    if isinstance(checksums, Mapping):
        return _normalize_checksums(checksums)
    source = os.fspath(checksums)
    try:
        if is_local(source):
            text = _local_path(source).read_text()
        else:
            fs, path = filesystem(source, options)
            text = fs.cat_file(path).decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise StagingError(
            f"cannot read the checksum list {redact_uri(source)} "
            f"({type(exc).__name__}: {redact(str(exc))[:200]})"
        ) from None
    return _normalize_checksums(parse_sha256sum(text))


# --- the marker ----------------------------------------------------------------------------------


def _read_marker(dest: pathlib.Path) -> dict | None:
    try:
        marker = json.loads((dest / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), list):
        return None
    return marker


def _cache_problem(dest: pathlib.Path, uri: str, checksums: dict[str, str] | None) -> str | None:
    """Why the cache folder cannot be used as it is (None: it can)."""
    marker = _read_marker(dest)
    if marker is None:
        return f"no valid {MARKER_NAME} (a download was cut off)"
    if marker.get("uri") != redact_uri(_normalized(uri)):
        return "its marker names another URI"
    recorded = {}
    for entry in marker["files"]:
        try:
            rel, size = entry["path"], int(entry["size"])
        except (KeyError, TypeError, ValueError):
            return "its marker is malformed"
        try:
            actual = (dest / rel).stat().st_size
        except OSError:
            return f"{rel} is missing"
        if actual != size:
            return f"{rel} has {actual} bytes, the marker says {size}"
        recorded[rel] = entry.get("sha256")
    if checksums:
        for rel, digest in checksums.items():
            if rel not in recorded:
                return f"the checksum list names {rel}, which the cached copy lacks"
            if recorded[rel] is None:
                # Staged without this checksum: verify the local copy once (no download).
                if _sha256_file(dest / rel) != digest:
                    return f"{rel} does not match the checksum list"
            elif recorded[rel] != digest:
                return f"{rel} was verified against a different checksum"
    return None


def _write_marker(dest: pathlib.Path, uri: str, files: list[dict], seconds: float) -> None:
    marker = {
        "version": MARKER_VERSION,
        "uri": redact_uri(_normalized(uri)),
        "staged_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
        "bytes": sum(f["size"] for f in files),
        "files": files,
    }
    tmp = dest / (MARKER_NAME + PARTIAL_SUFFIX)
    with open(tmp, "w") as f:
        json.dump(marker, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, dest / MARKER_NAME)
    _fsync_dir(dest)


# --- download ------------------------------------------------------------------------------------


def _included(rel: str, include: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(rel, pattern) for pattern in include)


def _list_objects(fs, base: str, shown: str, include: Sequence[str] | None = None) -> dict[str, int]:
    """``{relpath: size}`` of every object under ``base`` (recursively; only those matching one of
    the ``include`` globs when given)."""
    try:
        found = fs.find(base, detail=True)
    except FileNotFoundError:
        found = {}
    except Exception as exc:  # noqa: BLE001 - any listing failure becomes one clear error
        raise StagingError(
            f"cannot list {shown} ({type(exc).__name__}: {redact(str(exc))[:300]}); check the "
            "endpoint, the bucket name and the credentials available to this node"
        ) from None
    objects: dict[str, int] = {}
    for path, info in found.items():
        if info.get("type") == "directory":
            continue
        path = path.rstrip("/")
        if path == base:
            raise StagingError(
                f"{shown} is a single object; model.weights must name the release folder "
                "(DiT safetensors, vae.safetensors, Qwen2.5-VL-7B-Instruct/)"
            )
        if not path.startswith(base + "/"):
            continue
        rel = path[len(base) + 1 :]
        if rel.endswith("/") or not rel:  # folder placeholder objects
            continue
        if include is not None and not _included(rel, include):
            continue
        objects[_safe_relpath(rel, shown)] = int(info.get("size") or 0)
    if not objects:
        raise FileNotFoundError(
            f"no weights under {shown}: the prefix is empty or does not exist; model.weights must "
            "name a folder holding the release files"
        )
    return objects


def _download_file(
    fs,
    remote: str,
    size: int,
    partial: pathlib.Path,
    pool: ThreadPoolExecutor,
    options: StorageOptions,
    chunk_bytes: int,
    rel: str,
) -> None:
    """Fetch ``remote`` into ``partial`` with concurrent ranged GETs, each streamed straight to
    its offset (memory in flight: one chunk per worker)."""
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    done = 0
    done_lock = threading.Lock()
    start = time.perf_counter()
    last_log = [start]

    def fetch(offset: int) -> None:
        nonlocal done
        end = min(size, offset + chunk_bytes)

        def get() -> bytes:
            data = fs.cat_file(remote, start=offset, end=end)
            if len(data) != end - offset:
                raise _ShortRead(f"got {len(data)} of {end - offset} bytes at offset {offset}")
            return data

        data = _with_retries(
            get, options.max_attempts, lambda e: isinstance(e, _STREAM_ERRORS + (_ShortRead,))
        )
        view = memoryview(data)
        while view:  # pwrite may write less than asked
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written
        with done_lock:
            done += len(data)
            now = time.perf_counter()
            if now - last_log[0] >= _PROGRESS_EVERY_S:
                last_log[0] = now
                log.info(
                    "weights: %s %s of %s (%s)",
                    rel, format_bytes(done), format_bytes(size), _rate(done, now - start),
                )

    futures = [pool.submit(fetch, offset) for offset in range(0, size, chunk_bytes)]
    try:
        wait(futures, return_when=FIRST_EXCEPTION)
        for future in futures:  # after a failure, chunks not yet started are dropped
            future.cancel()
        wait(futures)  # no chunk may still write to ``fd`` once it is closed
        for future in futures:
            if not future.cancelled() and future.exception() is not None:
                raise future.exception()
        os.fsync(fd)
    finally:
        for future in futures:
            future.cancel()
        wait(futures)
        os.close(fd)


def _stage(
    fs,
    base: str,
    uri: str,
    dest: pathlib.Path,
    options: StorageOptions,
    checksums: dict[str, str] | None,
    chunk_bytes: int,
    concurrency: int,
    include: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> None:
    shown = redact_uri(uri)
    objects = _list_objects(fs, base, shown, include)
    total = _check_room(objects, checksums, dest, shown)
    log.info(
        "weights: staging %d files (%s) from %s to %s", len(objects), format_bytes(total), shown, dest
    )
    start = time.perf_counter()
    files = []
    with ThreadPoolExecutor(max(1, concurrency), thread_name_prefix="weights") as pool:
        for rel in sorted(objects):
            size = objects[rel]
            t0 = time.perf_counter()
            entry = _stage_file(fs, base, rel, size, dest, pool, options, checksums, chunk_bytes, shown)
            seconds = time.perf_counter() - t0
            files.append(entry)
            if progress is not None:
                progress(sum(f["size"] for f in files), total)
            log.info(
                "weights: %s %s in %.1f s (%s)%s",
                rel, format_bytes(size), seconds, _rate(size, seconds),
                ", sha256 ok" if "sha256" in entry else "",
            )
    for folder in {(dest / f["path"]).parent for f in files}:
        _fsync_dir(folder)
    seconds = time.perf_counter() - start
    _write_marker(dest, uri, files, seconds)  # last: only now is the copy complete
    unchecked = len(files) - sum("sha256" in f for f in files)
    log.info(
        "weights: staged %s in %.1f s (%s) to %s%s",
        format_bytes(total), seconds, _rate(total, seconds), dest,
        f"; {unchecked} file(s) checked by size only" if checksums and unchecked else "",
    )


def _check_room(objects: Mapping[str, int], checksums: Mapping[str, str] | None, dest: pathlib.Path,
                shown: str) -> int:
    """Before any byte moves: every checksummed file is listed and the disk holds the total
    (returned)."""
    if checksums:
        missing = sorted(set(checksums) - set(objects))
        if missing:
            raise StagingError(
                f"the checksum list names {len(missing)} file(s) not found under {shown}: "
                f"{', '.join(missing[:5])}"
            )
    total = sum(objects.values())
    dest.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(dest).free
    if total > free:
        raise StagingError(
            f"not enough space in {dest.parent} for {shown}: needs {format_bytes(total)}, "
            f"{format_bytes(free)} free; point the weights cache at a larger local disk"
        )
    return total


def _stage_file(fs, base: str, rel: str, size: int, dest: pathlib.Path, pool: ThreadPoolExecutor,
                options: StorageOptions, checksums: Mapping[str, str] | None, chunk_bytes: int,
                shown: str) -> dict[str, Any]:
    """One object downloaded beside its final name, its size and checksum checked, then renamed
    into place; its marker entry."""
    final = dest / rel
    partial = final.with_name(final.name + PARTIAL_SUFFIX)
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        _download_file(fs, f"{base}/{rel}", size, partial, pool, options, chunk_bytes, rel)
        got = partial.stat().st_size
        if got != size:
            raise StagingError(
                f"{rel} from {shown}: downloaded {got} bytes, the listing says {size}"
            )
        entry: dict[str, Any] = {"path": rel, "size": size}
        if checksums and rel in checksums:
            digest = _sha256_file(partial)
            if digest != checksums[rel]:
                raise ChecksumMismatchError(
                    f"checksum mismatch for {rel} from {shown}: sha256 {digest}, the "
                    f"checksum list says {checksums[rel]}; the object is corrupt or the "
                    "list belongs to another release"
                )
            entry["sha256"] = digest
        os.replace(partial, final)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return entry


# --- the entry point -----------------------------------------------------------------------------


def stage_weights(
    uri: str,
    cache_dir: str | os.PathLike,
    options: StorageOptions | None = None,
    *,
    checksums: Mapping[str, str] | str | None = None,
    lock_timeout_s: float = 3600,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    max_concurrency: int = DEFAULT_CONCURRENCY,
    include: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> pathlib.Path:
    """A local folder holding the weights at ``uri``.

    A local path (or ``file://`` URI) is returned as it is, once it is known to exist (checksums
    are not computed for it: that would re-hash 40 GB at every actor start). Any other URI is
    copied once per node into ``cache_dir/<cache_key(uri)>/``: the first caller downloads under a
    file lock, every other process on the node waits for the lock (at most ``lock_timeout_s``),
    then finds the completed copy. ``checksums`` is ``{relpath: sha256 hex}`` or the path / URI
    of a ``sha256sum`` file; listed files are verified, every file is checked against the
    listing's size. ``include``: only the objects matching one of these globs (relative paths).
    ``progress(bytes_done, bytes_total)`` is called after each file when this call downloads.

    Raises FileNotFoundError (no such folder / empty prefix), ChecksumMismatchError,
    StagingError (listing, download, disk space), TimeoutError (lock wait).
    """
    if not uri or not str(uri).strip():
        raise ValueError("weights URI is empty")
    uri = os.fspath(uri)
    if is_local(uri):
        path = _local_path(uri)
        if not path.exists():
            raise FileNotFoundError(f"weights folder {redact_uri(uri)} does not exist")
        if checksums is not None:
            log.info("weights: %s is local; checksums are not verified for local folders", path)
        return path

    if chunk_bytes < 1:
        raise ValueError("chunk_bytes must be positive")
    options = options or StorageOptions()
    shown = redact_uri(uri)
    wanted = read_checksums(checksums, options)
    if wanted and include is not None:
        wanted = {k: v for k, v in wanted.items() if _included(k, include)}
    root = pathlib.Path(os.path.expanduser(os.fspath(cache_dir)))
    root.mkdir(parents=True, exist_ok=True)
    key = cache_key(uri, include)
    dest = root / key
    lock = FileLock(str(root / f"{key}.lock"), timeout=lock_timeout_s)
    waited = time.perf_counter()
    try:
        lock.acquire()
    except Timeout:
        raise TimeoutError(
            f"waited {lock_timeout_s:.0f} s for another process on this node staging {shown} "
            f"into {dest}; raise lock_timeout_s or check that process"
        ) from None
    try:
        if _reusable(dest, uri, wanted, time.perf_counter() - waited):
            return dest
        fs, base = filesystem(uri, options)
        try:
            _stage(fs, base.rstrip("/"), uri, dest, options, wanted, chunk_bytes, max_concurrency, include,
                   progress)
        except BaseException:
            # Free the disk now; a copy without a marker would be redone on the next call anyway.
            shutil.rmtree(dest, ignore_errors=True)
            raise
        return dest
    finally:
        lock.release()


def _reusable(dest: pathlib.Path, uri: str, wanted: dict[str, str] | None, waited: float) -> bool:
    """True when ``dest`` holds a complete copy of ``uri`` (checked against ``wanted``); an
    unusable copy is removed, to be downloaded again. Called under the node's lock."""
    if not dest.exists():
        return False
    shown = redact_uri(uri)
    problem = _cache_problem(dest, uri, wanted)
    if problem is None:
        log.info(
            "weights: using the staged copy of %s at %s%s",
            shown, dest, f" (waited {waited:.1f} s for the lock)" if waited > 1 else "",
        )
        return True
    log.warning(
        "weights: the cached copy of %s at %s is unusable (%s); removing it and "
        "downloading again", shown, dest, problem,
    )
    shutil.rmtree(dest)
    return False


class PinnableAdapter(Protocol):
    """A configured adapter file (``model.adapters[i]``) whose content digest is pinned once."""

    uri: str

    @property
    def sha256(self) -> str | None: ...

    def pin(self, sha256: str) -> None: ...


def pin_adapters(adapters: Sequence[PinnableAdapter], source: "WeightsSource") -> None:
    """Stage each adapter file on this node and pin the sha256 of its bytes, once, before anything
    derives the model id: the content, not the path, names an adapter (docs/architecture.md).
    The driver calls it; parsing a config stages nothing."""
    for adapter in adapters:
        if adapter.sha256 is None:
            adapter.pin(source.file_sha256(adapter.uri))


@dataclass(frozen=True)
class WeightsSource:
    """Where a model's weights are and how to stage them on a node (plain data, for Ray)."""

    uri: str = ""
    storage: Any = None  # storage.StorageOptions for the URI; None: environment defaults
    cache_dir: str | None = None  # None: $STEP1X_WEIGHTS_CACHE, else ~/.cache/step1x-batch/weights
    checksums: str | None = None  # a sha256sum-format file (path or URI) the staged files must match

    def local_file(self, uri: str) -> pathlib.Path:
        """One file (a LoRA adapter, say) as a local path: object storage staged once per node,
        with this source's storage options and cache, like the weights."""
        if is_local(uri):
            path = _local_path(uri)
            if not path.is_file():
                raise FileNotFoundError(f"no file at {redact_uri(uri)}")
            return path
        parent, _, name = uri.rstrip("/").rpartition("/")
        if not name:
            raise ValueError(f"{redact_uri(uri)} does not name a file")
        folder = stage_weights(parent, default_cache_dir(self.cache_dir), self.storage, include=[name])
        return folder / name

    def file_sha256(self, uri: str) -> str:
        """The sha256 of one file's bytes (an adapter's), staged first like :meth:`local_file`: the
        content, not the path, names an adapter in the model id (docs/architecture.md)."""
        return _sha256_file(self.local_file(uri))

    def local_folder(self, include: Sequence[str] | None = None,
                     progress: Progress | None = None) -> pathlib.Path | None:
        """The weights as a local folder (staged once per node when in object storage; only the
        ``include`` globs when given); None when there are no weights."""
        if not self.uri:
            return None
        return stage_weights(self.uri, default_cache_dir(self.cache_dir), self.storage,
                             checksums=self.checksums, include=include, progress=progress)
