"""One writer per output root: a lease object that a run creates atomically, renews, and releases.

Why: two runs on one output root (a double-clicked cron, a retried CI job) would otherwise both
run every row, and every id would end with two records. The lease is ``<output>/_lease.json``:

* **take**: an atomic create-if-absent. On S3 a conditional put (``If-None-Match: *``), which
  the store refuses with 412 when the object exists; on a local (or shared) file system a hard
  link of a fully written file, which fails when the lease exists. Exactly one of two racing runs gets it; the other refuses
  with one sentence naming the holder (run id, host, start time) and exit status 2.
* **renew**: every ``ttl / 3`` seconds, a put conditional on the lease's current ETag
  (``If-Match``), so a run whose lease was taken over finds out at its next renewal and stops.
* **take over**: a lease not renewed for ``runtime.lease_ttl_s`` (its driver was killed) is
  replaced by a put conditional on the stale lease's ETag (of two racing takers one wins); the
  takeover is printed and recorded in the run's notes. Age is measured with the store's own
  clock (the object's ``Last-Modified`` against the response's ``Date``), so a driver with a
  skewed clock neither steals a live lease nor waits forever. Locally, the file's mtime.
* **release**: at the end of the run, if the lease is still ours.

A store that ignores conditional headers would let two runs both "create" the lease. The first
take therefore checks the store: a second create-if-absent of the lease just written must be
refused. A store that accepts it (or answers ``NotImplemented``) does not support conditional
writes, and the run refuses to start unless ``runtime.allow_unlocked: true``.
"""

from __future__ import annotations

import datetime as _dt
import email.utils
import json
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from step1x_batch.errors import JobRefused, redact, redact_uri
from step1x_batch.io.storage import StorageOptions, is_local, join_uri, s3_client, split_s3_uri

LEASE_KEY = "_lease.json"


class LeaseHeld(JobRefused):
    """Another run holds the output root's lease."""


class LeaseLost(JobRefused):
    """This run's lease was taken over (it was not renewed in time): it must stop writing."""


def lease_uri(output_uri: str) -> str:
    return join_uri(output_uri, LEASE_KEY)


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Holder:
    """What a lease object says, and how long ago it was last renewed (by the store's clock)."""

    doc: dict[str, Any]
    age_s: float
    etag: str | None = None  # S3: the object's ETag (for conditional replace)
    size: int | None = None  # bytes of the object

    @property
    def corrupt(self) -> bool:
        """The object is not a lease document (not JSON, or no token): something else wrote it."""
        return not self.doc.get("token")

    def ttl(self, default_ttl_s: float = 300.0) -> float:
        """Its own ttl; ``default_ttl_s`` (the reading run's) for one whose content cannot be read."""
        try:
            ttl = float(self.doc["ttl_s"])
        except (KeyError, TypeError, ValueError):
            return default_ttl_s
        return ttl if ttl > 0 else default_ttl_s

    def stale(self, default_ttl_s: float = 300.0) -> bool:
        """Not renewed for its ttl (a lease whose content cannot be read gets ``default_ttl_s``)."""
        return self.age_s >= self.ttl(default_ttl_s)

    def describe(self) -> str:
        if self.corrupt:
            return (f"an object that is not a lease document ({self.size if self.size is not None else '?'} "
                    f"bytes, last written {self.age_s:.0f} s ago; not JSON or not written by this job)")
        d = self.doc
        return (f"run {d.get('run_id', '?')} on host {d.get('host', '?')} (pid {d.get('pid', '?')}, "
                f"started {d.get('started_at', '?')}, lease renewed {self.age_s:.0f} s ago)")


# ---------------------------------------------------------------------------------------------
# Stores: the three atomic operations a lease needs.


class _Unsupported(Exception):
    """The store cannot do conditional writes."""


_MAX_READ = 1 << 20  # a lease document is a few hundred bytes; never hold more of whatever is there


@dataclass(frozen=True)
class Lost:
    """Why a renewal found the lease no longer this run's (a sentence part for the message)."""

    why: str

    @classmethod
    def of(cls, now: Holder | None, token: str | None = None) -> "Lost":
        """From what the lease object is now: gone, another run's, or something else."""
        if now is not None and token is not None and now.doc.get("token") == token:
            return cls("the lease object was rewritten by someone other than this run (its ETag changed)")
        if now is None:
            return cls("the lease object was deleted while this run held it (by a person, a "
                       "lifecycle rule or a clean-up job); another run could start beside this one")
        if now.corrupt:
            return cls(f"the lease object was overwritten by {now.describe()}")
        return cls(f"another run took the output root over: {now.describe()} (a lease is taken "
                   "over when it is not renewed for its runtime.lease_ttl_s)")


class _LocalStore:
    def __init__(self, path: str) -> None:
        self.path = path

    def create(self, body: bytes) -> str | None:
        """Write the whole lease aside, then hard-link it into place: the link fails when the
        lease exists, so no reader ever sees a half-written lease (safe on NFS, unlike O_EXCL
        on old servers)."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        tmp = f"{self.path}.{uuid.uuid4().hex[:12]}.tmp"
        with open(tmp, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return None
        finally:
            os.unlink(tmp)
        return "local"

    def read(self) -> Holder | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read(_MAX_READ)
            age = time.time() - os.stat(self.path).st_mtime
        except FileNotFoundError:
            return None
        return Holder(parse_document(data), max(age, 0.0), "local", len(data))

    def replace(self, holder: Holder, body: bytes, ttl_s: float | None = None) -> str | None:
        """Swap a stale lease for ours: renaming it away succeeds for exactly one taker. What was
        moved away must still be the stale lease that was read (same token, still not renewed
        for its ttl; ``ttl_s``: the taker's, for an object that is not a lease document)."""
        aside = f"{self.path}.stale-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return None
        with open(aside, "rb") as f:
            taken = Holder(parse_document(f.read(_MAX_READ)), max(time.time() - os.stat(aside).st_mtime, 0.0))
        default = ttl_s if ttl_s is not None else holder.age_s + 1
        if taken.doc.get("token") != holder.doc.get("token") or not taken.stale(default):
            # Renewed or replaced between our read and the rename: put it back, it is not ours.
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            os.unlink(aside)
            return None
        os.unlink(aside)
        return self.create(body)

    def renew(self, token: str, etag: str | None, body: bytes) -> str | Lost:
        held = self.read()
        if held is None or held.doc.get("token") != token:
            return Lost.of(held)
        tmp = f"{self.path}.{token}.tmp"
        with open(tmp, "wb") as f:
            f.write(body)
        os.replace(tmp, self.path)
        return "local"

    def delete(self, token: str, etag: str | None) -> None:
        held = self.read()
        if held is not None and held.doc.get("token") == token:
            os.unlink(self.path)


class _S3Store:
    def __init__(self, uri: str, options: StorageOptions | None) -> None:
        self.bucket, self.key = split_s3_uri(uri)
        self.client = s3_client(options)

    @staticmethod
    def _code(e: Exception) -> str:
        return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))

    def _put(self, body: bytes, **condition: str) -> str | None:
        from botocore.exceptions import ClientError

        try:
            out = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=body,
                                         ContentType="application/json", **condition)
        except ClientError as e:
            code = self._code(e)
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                return None
            if code in ("NotImplemented", "501", "InvalidArgument", "InvalidRequest"):
                raise _Unsupported(code) from None
            raise
        return out.get("ETag")

    def create(self, body: bytes) -> str | None:
        return self._put(body, IfNoneMatch="*")

    def read(self) -> Holder | None:
        from botocore.exceptions import ClientError

        try:
            out = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as e:
            if self._code(e) in ("NoSuchKey", "404"):
                return None
            raise
        data = out["Body"].read(_MAX_READ)
        age = (_store_now(out["ResponseMetadata"]["HTTPHeaders"].get("date"))
               - _utc(out["LastModified"])).total_seconds()
        return Holder(parse_document(data), max(age, 0.0), out.get("ETag"), out.get("ContentLength"))

    def replace(self, holder: Holder, body: bytes, ttl_s: float | None = None) -> str | None:
        return self._put(body, IfMatch=holder.etag or "")

    def renew(self, token: str, etag: str | None, body: bytes) -> str | Lost:
        """A put conditional on our ETag. The lease deleted (``NoSuchKey``: S3 answers a
        conditional put of a missing key so) or changed (``PreconditionFailed``) is lost, and
        what happened to it is read back for the message."""
        from botocore.exceptions import ClientError

        try:
            etag = self._put(body, IfMatch=etag or "")
        except ClientError as e:
            if self._code(e) not in ("NoSuchKey", "404"):
                raise
            return Lost.of(None)
        if etag is not None:
            return etag
        try:
            now = self.read()
        except Exception:  # noqa: BLE001 - the lease is lost either way; only the detail is missing
            return Lost("it was changed by someone other than this run (the store refused the "
                        "renewal's If-Match)")
        return Lost.of(now, token)

    def delete(self, token: str, etag: str | None) -> None:
        held = self.read()
        if held is not None and held.doc.get("token") == token:
            self.client.delete_object(Bucket=self.bucket, Key=self.key)


def _utc(t: _dt.datetime) -> _dt.datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=_dt.timezone.utc)


def _store_now(date_header: str | None) -> _dt.datetime:
    """The store's clock from a response's ``Date`` (a proxy may send none, two joined by a comma,
    or a ``-0000`` zone, which parses naive); this machine's clock when it cannot be read."""
    parts = (date_header or "").split(", ")
    try:
        return _utc(email.utils.parsedate_to_datetime(", ".join(parts[-2:])))
    except (TypeError, ValueError, IndexError):
        return _dt.datetime.now(_dt.timezone.utc)


def parse_document(data: bytes) -> dict[str, Any]:
    """A lease object's fields; ``{}`` for a torn or foreign object (a holder with unknown details)."""
    try:
        doc = json.loads(data)
        return doc if isinstance(doc, dict) else {}
    except ValueError:
        return {}  # a torn or foreign object: treated as a holder with unknown details


def _store(output_uri: str, options: StorageOptions | None):
    uri = lease_uri(output_uri)
    if is_local(uri):
        return _LocalStore(uri.removeprefix("file://"))
    if uri.split("://", 1)[0] in ("s3", "s3a", "s3n"):
        return _S3Store(uri, options)
    raise _Unsupported(uri.split("://", 1)[0])


# ---------------------------------------------------------------------------------------------
# The lease a run holds.


@dataclass
class Lease:
    """A held lease (or, with ``locked=False``, a run allowed without one). ``lost`` is set when
    a renewal found the lease taken over: the run must stop."""

    uri: str
    run_id: str
    ttl_s: float
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    locked: bool = True
    took_over: str | None = None  # the previous holder, when this run took a stale lease over
    note: str | None = None  # why the run is unlocked
    lost: threading.Event = field(default_factory=threading.Event)
    lost_why: str | None = None  # what a renewal found (set with ``lost``)
    clock: Callable[[], float] = time.monotonic
    _doc: dict[str, Any] = field(default_factory=dict)
    _etag: str | None = None
    _store: Any = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _renewed: float | None = None  # clock() at the last successful take or renewal

    def _body(self) -> bytes:
        self._doc["renewed_at"] = _now_iso()
        return (json.dumps(self._doc, indent=2) + "\n").encode()

    def renew(self) -> bool:
        """Renew now; False (and ``lost`` set, with ``lost_why``) when the lease is no longer
        ours: taken over, deleted, or overwritten. Raises on a store error (retried later)."""
        if not self.locked or self.lost.is_set():
            return not self.lost.is_set()
        with self._lock:  # the renewal loop and confirm() must not race on one ETag
            if self.lost.is_set():
                return False
            result = self._store.renew(self.token, self._etag, self._body())
            if isinstance(result, Lost) or result is None:
                self._lose(result.why if isinstance(result, Lost) else Lost.of(None).why)
                return False
            self._etag = result
            self._renewed = self.clock()
            return True

    def confirm(self) -> bool:
        """Renew now, before something only the lease holder may write (a log part): True when
        the lease is still this run's. A store error counts as not confirmed only once the lease
        has gone unrenewed for its ttl (see :meth:`overdue`)."""
        try:
            return self.renew()
        except Exception:  # noqa: BLE001 - a store hiccup: the lease is ours until its ttl runs out
            return not self.overdue()

    def overdue(self) -> bool:
        """True (and the lease lost) once no renewal succeeded for ``ttl_s``: another run may have
        taken the root over by now, so this one must stop writing."""
        if self.locked and not self.lost.is_set() and self._renewed is not None \
                and self.clock() - self._renewed >= self.ttl_s:
            self._lose(f"the lease could not be renewed for {self.ttl_s:g} s (runtime.lease_ttl_s; the store "
                       "did not answer), so another run may have taken the output root over")
        return self.lost.is_set()

    def _lose(self, why: str) -> None:
        self.lost_why = why
        self.lost.set()

    def check(self) -> None:
        """Raise :class:`LeaseLost` once a renewal found the lease no longer this run's, saying
        what happened to it."""
        if self.lost.is_set():
            raise LeaseLost(
                f"this run lost the lease on {redact_uri(self.uri)}: {self.lost_why or 'another run took it over'}; "
                "this run stopped writing (its rows logged so far are kept; rows without a record "
                "are done by the next run, or by the run that holds the lease now)")

    def start_renewing(self, on_error: Callable[[BaseException], None] | None = None) -> None:
        if not self.locked:
            return

        def loop() -> None:
            while not self._stop.wait(self.ttl_s / 3):
                try:
                    if not self.renew():
                        return
                except Exception as e:  # a failed renewal is retried next period, up to the ttl
                    if on_error:
                        on_error(e)
                    if self.overdue():
                        return

        self._thread = threading.Thread(target=loop, name="lease-renew", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.locked and not self.lost.is_set():
            try:
                self._store.delete(self.token, self._etag)
            except Exception:  # an unreleased lease expires after ttl_s: nothing is lost
                pass


def acquire(output_uri: str, options: StorageOptions | None, run_id: str, *, ttl_s: float,
            allow_unlocked: bool = False, job: str = "edit") -> Lease:
    """Take the output root's lease (or take over a stale one); raise :class:`LeaseHeld` when a
    live run holds it. On a store without conditional writes: refuse (exit 2) unless
    ``allow_unlocked``, which returns an unlocked lease and a note."""
    uri = lease_uri(output_uri)
    lease = Lease(uri=uri, run_id=run_id, ttl_s=ttl_s)
    lease._doc = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(), "job": job,
                  "started_at": _now_iso(), "renewed_at": _now_iso(), "ttl_s": ttl_s,
                  "token": lease.token}
    try:
        lease._store = store = _store(output_uri, options)
        stale: Holder | None = None
        for _ in range(3):  # create, or take a stale lease over; a lost race is looked at again
            etag = store.create(lease._body())
            if etag is not None:
                _check_conditional(store, lease._body())
                lease._etag = etag
                lease._renewed = lease.clock()
                lease.took_over = stale.describe() if stale else None  # moved away by a racing taker
                return lease
            holder = store.read()
            if holder is None:
                continue  # released between our create and read
            if not holder.stale(ttl_s):
                if holder.corrupt:
                    raise LeaseHeld(
                        f"the output root {redact_uri(output_uri)} has {holder.describe()} at "
                        f"{LEASE_KEY}; it is taken over once it is {holder.ttl(ttl_s):g} s old "
                        "(runtime.lease_ttl_s), or delete it now if no run is using this root")
                raise LeaseHeld(
                    f"the output root {redact_uri(output_uri)} is in use by {holder.describe()}; "
                    f"wait for it to finish, or if it died, its lease is taken over once it is "
                    f"{holder.ttl(ttl_s):g} s old (runtime.lease_ttl_s)")
            stale = holder
            etag = store.replace(holder, lease._body(), ttl_s)
            if etag is not None:
                lease._etag = etag
                lease._renewed = lease.clock()
                lease.took_over = holder.describe()
                return lease
        raise LeaseHeld(f"the output root {redact_uri(output_uri)} is being claimed by other runs "
                        "at this moment; try again")
    except _Unsupported as e:
        what = f"the store at {redact_uri(output_uri)} does not support conditional writes ({e})"
        _forget(lease)
        if not allow_unlocked:
            raise JobRefused(
                f"{what}, so this run cannot make sure it is the only one writing there; use a "
                "store that does (AWS S3, MinIO, Cloudflare R2, a local or shared file system) or "
                "set runtime.allow_unlocked: true to run without that protection") from None
        return Lease(uri=uri, run_id=run_id, ttl_s=ttl_s, locked=False,
                     note=f"{what}: running without a lease (runtime.allow_unlocked)")


def _check_conditional(store: Any, body: bytes) -> None:
    """A second create-if-absent of the object just written must be refused."""
    if isinstance(store, _LocalStore):
        return
    if store.create(body) is not None:
        raise _Unsupported("it accepted a second If-None-Match: * put of an existing object")


def _forget(lease: Lease) -> None:
    store = lease._store
    if store is not None:
        try:
            store.delete(lease.token, None)
        except Exception:
            pass


def read_holder(output_uri: str, options: StorageOptions | None) -> Holder | None:
    """The lease on an output root now, if any: its document (:attr:`Holder.doc`, ``{}`` when
    torn or foreign) and its age by the store's clock. The one public reader of the lease object
    (``status`` and ``inspect`` read it here; a run's take and renewals through the same store);
    None as well on a store without the conditional writes a lease needs."""
    try:
        return _store(output_uri, options).read()
    except _Unsupported:
        return None


@contextmanager
def held(output_uri: str, options: StorageOptions | None, run_id: str, *, ttl_s: float,
         allow_unlocked: bool = False, job: str = "edit",
         say: Callable[[str], None] | None = None) -> Iterator[Lease]:
    """Hold the output root's lease for the duration of a run (renewed in the background). The
    holder passes the lease on as an argument (``run_job(cfg, facts, lease)``): no module keeps it."""
    lease = acquire(output_uri, options, run_id, ttl_s=ttl_s, allow_unlocked=allow_unlocked, job=job)
    if say and lease.took_over:
        say(f"note: took over the lease on {redact_uri(output_uri)} from {lease.took_over}")
    if say and lease.note:
        say(f"warning: {lease.note}")
    lease.start_renewing(on_error=(lambda e: say(f"warning: lease renewal failed: {redact(str(e))}"))
                         if say else None)
    try:
        yield lease
    finally:
        lease.release()
