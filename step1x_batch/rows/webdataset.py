"""WebDataset tar shards as manifest input: one row per sample, read as a stream.

A shard is a ``.tar`` (or ``.tar.gz`` / ``.tgz``) whose members are grouped into samples by key,
WebDataset's convention: the key is the member's path up to the first ``.`` of its base name
(``a/b/000123.jpg`` -> key ``a/b/000123``, extension ``jpg``; ``x.0.png`` -> key ``x``, extension
``0.png``), and consecutive members with one key are one sample. Members with no extension (a
``README``), folders, and names starting with ``.`` are skipped, as the ``webdataset`` package
skips them. Extensions are lower-cased.

Columns of a sample's row (types fixed by name, so the tables of any two shards concatenate):

* ``__key__``, ``__url__`` (the shard URI, credentials redacted): string;
* an image extension (:data:`IMAGE_EXTENSIONS`, or ``<anything>.<one of them>`` such as
  ``0.png``): ``large_binary``, the bytes as stored;
* a text extension (``txt``, ``text``, ``caption``, or ``<anything>.<one of them>``): string,
  UTF-8 (undecodable text is the row's problem);
* ``json``: the object's top-level keys become columns, all string (strings as they are, numbers,
  booleans, lists and objects as their JSON text); a key named like an extension column of the
  same table, like an image extension (``jpg``, ``0.png``: always binary) or like a reserved
  column (``__key__``, ...) is dropped: the member wins. (A JSON key in one shard named like a
  non-image, non-text member extension of another, e.g. ``cls``, gives the two shards different
  types for that column; rename one.);
* any other extension: ``large_binary``;
* ``__manifest_problem`` (:data:`MANIFEST_PROBLEM`): null, or why the sample is broken. The
  normaliser turns it into that row's INVALID_ROW error, so a broken sample is one error row.

Broken content never raises: a member the tar ends inside (the shard ends after that sample's
row), a member that is a link or device, a member over ``max_member_bytes`` (skipped without
holding its bytes), a JSON member that is not a JSON object, a key that repeats after other
samples, a tar that ends without its end-of-archive marker or with a damaged header, and a file
that is not a tar at all (one row holding only the problem). Only a shard that cannot be opened
raises (the caller refuses the job), as does a storage failure while streaming it (OSError).
"""

from __future__ import annotations

import json
import posixpath
import tarfile
import zlib
from typing import IO, Any, Iterator, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from step1x_batch.errors import redact, redact_uri
from step1x_batch.io.storage import StorageOptions, filesystem
from step1x_batch.rows.sources import MANIFEST_PROBLEM

__all__ = [
    "IMAGE_EXTENSIONS",
    "MANIFEST_PROBLEM",
    "TEXT_EXTENSIONS",
    "DEFAULT_COLUMNS",
    "default_view",
    "is_image_extension",
    "iter_shard",
    "read_shard",
    "split_name",
]

KEY, URL = "__key__", "__url__"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
TEXT_EXTENSIONS = ("txt", "text", "caption")
_PREFERRED_IMAGES = ("jpg", "jpeg", "png", "webp")
_RESERVED = (KEY, URL, MANIFEST_PROBLEM)
DEFAULT_MAX_MEMBER_BYTES = 256 << 20
DEFAULT_BATCH_BYTES = 64 << 20
_CHUNK = 1 << 20


def split_name(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a member name, or None for a name WebDataset skips (no ``.`` in
    the base name, or a base name starting with ``.``)."""
    folder, base = posixpath.split(name)
    if not base or base.startswith(".") or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    if not ext:
        return None
    return (posixpath.join(folder, stem) if folder else stem), ext.lower()


def _last(ext: str) -> str:
    return ext.rsplit(".", 1)[-1]


def is_image_extension(ext: str) -> bool:
    """``jpg``, ``png``, ... or ``<anything>.png``: a column of image bytes."""
    return _last(ext) in IMAGE_EXTENSIONS


def _is_text(ext: str) -> bool:
    return _last(ext) in TEXT_EXTENSIONS


SAMPLE, IMAGE, INSTRUCTION = "__sample__", "__image__", "__instruction__"
DEFAULT_COLUMNS = {"id": SAMPLE, "image": IMAGE, "instruction": INSTRUCTION}


def _image_order(names: Sequence[str]) -> list[str]:
    """The image columns a sample's image is taken from, in preference order."""
    preferred = [n for n in _PREFERRED_IMAGES if n in names]
    return preferred + [n for n in names if n not in _RESERVED and n not in preferred and is_image_extension(n)]


def _shard_stem(url: str | None) -> str | None:
    if not url:
        return None
    base = posixpath.basename(url.rstrip("/"))
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return base


def default_view(table: pa.Table) -> pa.Table:
    """A WebDataset input without ``input.columns``, sample by sample (so the choice never depends
    on which samples share a piece of a shard): ``__sample__`` = ``<shard name>/<key>`` (keys are
    unique within a shard, often not across shards), ``__image__`` = the sample's first present
    member of jpg, jpeg, png, webp (else another image extension), ``__instruction__`` = its JSON's
    ``instruction``, else its ``txt`` (``text``, ``caption``). The members taken are dropped;
    :data:`DEFAULT_COLUMNS` maps the three onto the row contract."""
    names = table.column_names
    n = table.num_rows
    stems = [_shard_stem(u) for u in (table.column(URL).to_pylist() if URL in names else [None] * n)]
    keys = table.column(KEY).to_pylist() if KEY in names else [None] * n
    sample = pa.array([f"{s}/{k}" if s and k else k for s, k in zip(stems, keys)], pa.string())
    images = _image_order(names)
    texts = [c for c in ("instruction",) + TEXT_EXTENSIONS if c in names]
    image = pc.coalesce(*[table.column(c).cast(pa.large_binary()) for c in images]) if images \
        else pa.nulls(n, pa.large_binary())
    text = pc.coalesce(*[table.column(c).cast(pa.string()) for c in texts]) if texts else pa.nulls(n, pa.string())
    out = table.drop_columns(images + texts)
    return out.append_column(SAMPLE, sample).append_column(IMAGE, image).append_column(INSTRUCTION, text)


# --- one sample ----------------------------------------------------------------------------------


class _Sample:
    """The members of one key read so far, and the first problem found."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.binary: dict[str, bytes] = {}
        self.text: dict[str, str | None] = {}
        self.fields: dict[str, str | None] = {}
        self.problem: str | None = None
        self.size = 0

    def fail(self, why: str) -> None:
        if self.problem is None:
            self.problem = why

    def add(self, ext: str, data: bytes, where: str) -> None:
        self.size += len(data)
        if ext == "json":
            self._add_json(data, where)
        elif _is_text(ext):
            try:
                self.text[ext] = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                self.text[ext] = None
                self.fail(f"{where} is not valid UTF-8 text ({exc.reason} at byte {exc.start})")
        else:
            self.binary[ext] = data

    def _add_json(self, data: bytes, where: str) -> None:
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            self.fail(f"{where} is not valid JSON ({redact(str(exc))[:200]})")
            return
        if not isinstance(doc, dict):
            self.fail(f"{where} is a JSON {type(doc).__name__}, not an object")
            return
        for name, value in doc.items():
            text = value if value is None or isinstance(value, str) else json.dumps(
                value, ensure_ascii=False, separators=(",", ":"))
            self.fields[str(name)] = text

    def row(self, url: str) -> tuple[dict[str, Any], dict[str, str | None]]:
        """(the member columns, the JSON fields): kept apart so a member's column wins."""
        out: dict[str, Any] = {KEY: self.key, URL: url, MANIFEST_PROBLEM: self.problem}
        out.update(self.binary)
        out.update(self.text)
        return out, self.fields


# --- the table -----------------------------------------------------------------------------------


def _member_type(name: str) -> pa.DataType:
    return pa.string() if name in _RESERVED or _is_text(name) else pa.large_binary()


def _table(rows: list[tuple[dict[str, Any], dict[str, str | None]]]) -> pa.Table:
    """Rows -> a table: ``__key__``, ``__url__``, the member columns in first-seen order, the
    JSON columns (string; a name that is also a member column, a reserved name or an image
    extension is left out: the member's column wins), then ``__manifest_problem``; a column a row lacks is null there."""
    members: dict[str, None] = {KEY: None, URL: None}
    fields: dict[str, None] = {}
    for row, doc in rows:
        members.update(dict.fromkeys(row))
        fields.update(dict.fromkeys(doc))
    members.pop(MANIFEST_PROBLEM, None)
    columns = {n: pa.array([r.get(n) for r, _ in rows], _member_type(n)) for n in members}
    for name in fields:
        if name not in members and name not in _RESERVED and not is_image_extension(name):
            columns[name] = pa.array([d.get(name) for _, d in rows], pa.string())
    columns[MANIFEST_PROBLEM] = pa.array([r.get(MANIFEST_PROBLEM) for r, _ in rows], pa.string())
    return pa.table(columns)


# --- reading a shard -----------------------------------------------------------------------------


class _EndProbe(tarfile.TarInfo):
    """Remembers why tarfile's member loop stopped: a zero block is the archive's proper end, any
    other header failure after the first member is a damaged or cut-short tar that tarfile would
    otherwise end silently."""

    @classmethod
    def fromtarfile(cls, tf):  # noqa: ANN001 - tarfile's signature
        try:
            return super().fromtarfile(tf)
        except tarfile.HeaderError as exc:
            tf.step1x_end = exc
            raise


def _end_problem(tf: tarfile.TarFile, shown: str, last_member: str | None) -> str | None:
    end = getattr(tf, "step1x_end", None)
    after = f"after member {last_member}" if last_member else "at its start"
    if end is None or isinstance(end, tarfile.EOFHeaderError):
        return None
    if isinstance(end, tarfile.EmptyHeaderError):
        return (f"shard {shown}: the tar ends {after} without its end-of-archive marker; it may "
                "have been cut short (samples after that member, if any, are lost)")
    if isinstance(end, tarfile.TruncatedHeaderError):
        return f"shard {shown}: the tar ends inside a member header {after} (it was cut short)"
    return f"shard {shown}: a damaged member header {after} ({end}); the rest of the shard is unreadable"


def _read_member(tf: tarfile.TarFile, member: tarfile.TarInfo, keep: bool) -> bytes | None:
    """The member's bytes (``keep``) or None after reading past them in chunks (an oversized
    member never sits in memory). Raises tarfile.ReadError when the tar ends inside it."""
    f = tf.extractfile(member)
    if f is None:
        raise tarfile.StreamError("not a regular file")
    with f:
        if keep:
            data = f.read()
            if len(data) != member.size:
                raise tarfile.ReadError("unexpected end of data")
            return data
        while f.read(_CHUNK):
            pass
    return None


def _open_tar(stream: IO[bytes]) -> tarfile.TarFile:
    return tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndProbe)


class _Shard:
    """The state of one pass over a shard: the sample being read, the keys seen, the rows made."""

    def __init__(self, shown: str, max_member_bytes: int) -> None:
        self.shown, self.max = shown, max_member_bytes
        self.sample: _Sample | None = None
        self.seen: dict[str, str] = {}  # key -> its first sample's first member
        self.rows: list[tuple[dict[str, Any], dict[str, str | None]]] = []
        self.batch_size = 0

    def close_sample(self) -> None:
        if self.sample is not None:
            self.rows.append(self.sample.row(self.shown))
            self.batch_size += self.sample.size
            self.sample = None

    def problem_row(self, why: str) -> None:
        """A row holding only a problem of the shard itself (no sample to blame)."""
        self.close_sample()
        self.rows.append(({KEY: None, URL: self.shown, MANIFEST_PROBLEM: why}, {}))

    def start(self, key: str, name: str) -> _Sample:
        if self.sample is not None and self.sample.key == key:
            return self.sample
        self.close_sample()
        self.sample = _Sample(key)
        first = self.seen.get(key)
        if first is not None:
            self.sample.fail(
                f"shard {self.shown}: key {key!r} repeats at member {name} after other samples (its "
                f"first sample starts at member {first}); WebDataset groups only consecutive members, "
                "so this is a second sample with the same key")
        else:
            self.seen[key] = name
        return self.sample

    def member(self, tf: tarfile.TarFile, member: tarfile.TarInfo) -> bool:
        """Read one member into its sample; False when the tar ends inside it."""
        parts = None if member.isdir() else split_name(member.name)
        if parts is None:
            return True
        key, ext = parts
        sample = self.start(key, member.name)
        where = f"shard {self.shown}: member {member.name}"
        if not member.isfile():
            sample.fail(f"{where} cannot be read (a {_member_kind(member)}, not a file)")
            return True
        too_big = member.size > self.max
        try:
            data = _read_member(tf, member, keep=not too_big)
        except tarfile.ReadError:
            sample.fail(f"{where} is truncated (the tar ends inside it)")
            return False
        if data is None:
            sample.fail(f"{where} is {member.size} bytes, over the {self.max}-byte member limit; skipped")
        else:
            sample.add(ext, data, where)
        return True

    def take(self) -> pa.Table:
        table = _table(self.rows)
        self.rows, self.batch_size = [], 0
        return table


def _member_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "symbolic link"
    if member.islnk():
        return "hard link"
    if member.isfifo():
        return "FIFO"
    if member.ischr() or member.isblk():
        return "device"
    return "special member"


def _problem_table(shown: str, why: str) -> pa.Table:
    return _table([({KEY: None, URL: shown, MANIFEST_PROBLEM: why}, {})])


_CONTENT_ERRORS = (tarfile.TarError, zlib.error, EOFError)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {redact(str(exc))[:200]}"


def iter_shard(uri: str, options: StorageOptions | None = None, *,
               max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
               batch_bytes: int = DEFAULT_BATCH_BYTES) -> Iterator[pa.Table]:
    """The shard's rows as tables of about ``batch_bytes`` of member data each (a Ray
    ``map_batches`` generator can yield them one block at a time, so a multi-GB shard is never
    held whole; at least one table, empty for an empty tar). Column types are fixed by name (see
    the module docstring). Raises only when the shard cannot be opened (FileNotFoundError, ...)
    or the store fails while streaming it."""
    shown = redact_uri(uri)
    fs, path = filesystem(uri, options)
    with fs.open(path, "rb") as stream:
        try:
            tf = _open_tar(stream)
        except _CONTENT_ERRORS as exc:
            yield _problem_table(shown, f"shard {shown} is not a tar file ({_describe(exc)}); "
                                 "give WebDataset .tar shards")
            return
        state, last, complete, yielded = _Shard(shown, max_member_bytes), None, True, False
        try:
            for member in tf:
                last = member.name
                if not state.member(tf, member):
                    complete = False
                    break
                if state.batch_size >= batch_bytes:
                    yield state.take()
                    yielded = True
        except _CONTENT_ERRORS as exc:
            complete = False
            state.problem_row(f"shard {shown}: the tar cannot be read after member {last} "
                              f"({_describe(exc)}); the rest of the shard is lost")
        state.close_sample()
        ending = _end_problem(tf, shown, last) if complete else None
        if ending:
            state.problem_row(ending)
        if state.rows or not yielded:
            yield state.take()


def read_shard(uri: str, options: StorageOptions | None = None, *,
               max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> pa.Table:
    """One WebDataset shard (any fsspec URI) as one table, one row per sample (see
    :func:`iter_shard` to take it in pieces)."""
    tables = list(iter_shard(uri, options, max_member_bytes=max_member_bytes))
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="default")
