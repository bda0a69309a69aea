"""One writer per output root: the lease on a real S3-protocol server (moto) and a local folder.

Racing takers, stale leases taken over (by the store's clock), renewals that discover a
takeover, release, and a store that ignores conditional headers (refused unless allowed)."""

from __future__ import annotations

import json
import os
import threading
import time

import boto3
import pytest

from step1x_batch.job import lease as leases
from step1x_batch.errors import JobRefused
from step1x_batch.io.storage import StorageOptions, read_bytes


@pytest.fixture(params=["s3", "local"])
def root(request, tmp_path):
    if request.param == "s3":
        bucket = request.getfixturevalue("s3_bucket")
        return f"{bucket}/out", request.getfixturevalue("storage_options")
    return str(tmp_path / "out"), None


def test_second_run_refused_naming_the_holder(root):
    uri, opts = root
    first = leases.acquire(uri, opts, "run-a", ttl_s=60)
    with pytest.raises(leases.LeaseHeld) as err:
        leases.acquire(uri, opts, "run-b", ttl_s=60)
    message = str(err.value)
    assert "run run-a on host" in message and "started" in message and "60 s" in message
    doc = json.loads(read_bytes(leases.lease_uri(uri), opts))
    assert doc["run_id"] == "run-a" and doc["token"] == first.token
    first.release()
    second = leases.acquire(uri, opts, "run-b", ttl_s=60)  # released: free again
    assert json.loads(read_bytes(leases.lease_uri(uri), opts))["run_id"] == "run-b"
    second.release()


def _wait_until_stale(uri: str, opts, timeout_s: float = 30.0) -> None:
    """Wait (no fixed sleep) until the store itself says the lease was not renewed for its ttl:
    on S3 by the server's clock (``Last-Modified`` against ``Date``, 1 s resolution)."""
    store = leases._store(uri, opts)  # one client for every look
    deadline = time.monotonic() + timeout_s
    while not store.read().stale():
        assert time.monotonic() < deadline, f"the lease on {uri} never went stale"
        time.sleep(0.05)


def _race(uri: str, opts, n: int, prefix: str) -> tuple[list, list]:
    """``n`` threads try to take the lease at the same instant: (the leases won, the refused)."""
    won, refused = [], []
    barrier = threading.Barrier(n)

    def take(i: int) -> None:
        barrier.wait()
        try:
            won.append(leases.acquire(uri, opts, f"{prefix}-{i}", ttl_s=60))
        except leases.LeaseHeld:
            refused.append(i)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won, refused


def test_racing_takers_exactly_one_wins(root):
    uri, opts = root
    won, refused = _race(uri, opts, 6, "run")
    assert len(won) == 1 and len(refused) == 5
    assert json.loads(read_bytes(leases.lease_uri(uri), opts))["token"] == won[0].token


def test_stale_lease_taken_over_and_the_old_holder_learns_it(root):
    uri, opts = root
    # 5 s: never stale at the next call, however loaded the machine (S3 ages in whole seconds)
    old = leases.acquire(uri, opts, "old", ttl_s=5)
    with pytest.raises(leases.LeaseHeld):
        leases.acquire(uri, opts, "early", ttl_s=5)
    _wait_until_stale(uri, opts)  # not renewed for longer than its ttl (S3: by the server's clock)
    new = leases.acquire(uri, opts, "new", ttl_s=60)
    assert new.took_over and "run old" in new.took_over
    assert old.renew() is False and old.lost.is_set()
    with pytest.raises(leases.LeaseLost):
        old.check()
    old.release()  # must not delete the new holder's lease
    assert json.loads(read_bytes(leases.lease_uri(uri), opts))["token"] == new.token
    assert new.renew() is True
    new.release()


def test_racing_takers_of_a_stale_lease_exactly_one_wins(root):
    uri, opts = root
    leases.acquire(uri, opts, "old", ttl_s=1)
    _wait_until_stale(uri, opts)
    takers, refused = _race(uri, opts, 3, "new")
    assert len(takers) == 1 and len(refused) == 2
    assert json.loads(read_bytes(leases.lease_uri(uri), opts))["token"] == takers[0].token
    # (S3 replaces the stale lease conditionally, so the winner always knows it took over; a
    # local taker may win in the instant another moved the stale file away, unaware of it.)
    if uri.startswith("s3://"):
        assert takers[0].took_over and "run old" in takers[0].took_over


def test_renewal_keeps_a_live_lease(root):
    uri, opts = root
    ttl = 1.5  # renewed every 0.5 s: by S3's whole-second clock, at most 1 s old
    store = leases._store(uri, opts)
    with leases.held(uri, opts, "live", ttl_s=ttl) as lease:
        until = time.monotonic() + 2 * ttl + 0.2  # more than twice the ttl: only the renewals keep it
        while time.monotonic() < until:
            assert not store.read().stale(), "a renewed lease went stale"
            time.sleep(0.25)
        with pytest.raises(leases.LeaseHeld):
            leases.acquire(uri, opts, "intruder", ttl_s=1.5)
        assert not lease.lost.is_set()
        assert leases.read_holder(uri, opts).doc["token"] == lease.token  # the store holds this one
    assert leases.read_holder(uri, opts) is None  # released at the end


def test_store_that_ignores_conditions_is_refused_unless_allowed(s3_bucket, storage_options, monkeypatch):
    uri = f"{s3_bucket}/out"

    real_put = leases._S3Store._put

    def ignoring_put(self, body, **condition):  # what a store without conditional writes does
        return real_put(self, body)

    monkeypatch.setattr(leases._S3Store, "_put", ignoring_put)
    with pytest.raises(JobRefused, match="does not support conditional writes.*allow_unlocked"):
        leases.acquire(uri, storage_options, "r", ttl_s=60)
    bucket = s3_bucket.removeprefix("s3://")
    client = boto3.client("s3", endpoint_url=storage_options.endpoint_url, region_name="us-east-1")
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0  # no lease left behind
    unlocked = leases.acquire(uri, storage_options, "r", ttl_s=60, allow_unlocked=True)
    assert not unlocked.locked and "without a lease" in unlocked.note
    unlocked.release()


def test_other_schemes_need_allow_unlocked():
    with pytest.raises(JobRefused, match="does not support conditional writes"):
        leases.acquire("memory://bucket/out", StorageOptions(), "r", ttl_s=60)
    assert not leases.acquire("memory://bucket/out", StorageOptions(), "r", ttl_s=60,
                              allow_unlocked=True).locked


def test_local_stale_lease_renewed_in_between_is_put_back(tmp_path):
    uri = str(tmp_path / "out")
    old = leases.acquire(uri, None, "old", ttl_s=1)
    path = leases.lease_uri(uri)
    renewed = time.time() - 2  # not renewed for longer than its ttl, as if 2 s had passed
    os.utime(path, (renewed, renewed))
    stale = leases._LocalStore(path).read()
    assert stale.stale()  # what a taker read
    assert old.renew()  # the holder came back before the taker's rename
    assert leases._LocalStore(path).replace(stale, b"{}") is None
    assert json.loads(open(path, "rb").read())["token"] == old.token
    assert not any(name.startswith("_lease.json.") for name in os.listdir(tmp_path / "out"))


def test_the_store_clock_is_read_from_any_date_header_a_proxy_passes_on():
    import datetime as dt

    from step1x_batch.job.lease import _store_now

    utc = dt.timezone.utc
    assert _store_now("Tue, 01 Dec 2026 22:00:00 GMT") == dt.datetime(2026, 12, 1, 22, tzinfo=utc)
    assert _store_now("Tue, 01 Dec 2026 22:00:00 -0000") == dt.datetime(2026, 12, 1, 22, tzinfo=utc)
    joined = "Tue, 01 Dec 2026 22:00:00 GMT, Tue, 01 Dec 2026 22:00:05 GMT"  # two Date headers
    assert _store_now(joined) == dt.datetime(2026, 12, 1, 22, 0, 5, tzinfo=utc)
    before = dt.datetime.now(utc)
    assert before <= _store_now(None) <= dt.datetime.now(utc)  # none: this machine's clock
