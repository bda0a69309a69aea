"""The log writer asks the lease before each part lands (issue 18.1's "before more records are
written"): once the lease object is gone, no further part lands (no Ray: a local root)."""

from __future__ import annotations

import os

import pyarrow as pa

from step1x_batch.job import lease as leases
from step1x_batch.rows.log import read_logs
from step1x_batch.job.runner import LogWriter


def _records(ids: list[str]) -> pa.Table:
    n = len(ids)
    return pa.table({"id": ids, "fingerprint": ["f"] * n, "status": ["ok"] * n, "output_uri": ["x"] * n})


def test_no_part_lands_once_the_lease_is_deleted(tmp_path):
    root = str(tmp_path / "out")
    lease = leases.acquire(root, None, "r", ttl_s=60)
    try:
        writer = LogWriter(root, "r", None, part_rows=2, part_seconds=3600, confirm=lease.confirm)
        writer.add(_records(["a", "b"]))  # a whole part: lands
        assert len(writer.parts) == 1
        os.unlink(leases.lease_uri(root).removeprefix("file://"))  # an operator, a lifecycle rule
        writer.add(_records(["c", "d"]))
        writer.flush()
        assert len(writer.parts) == 1 and writer.dropped == 2
        assert lease.lost.is_set() and "deleted" in (lease.lost_why or "")
        assert sorted(read_logs(root).column("id").to_pylist()) == ["a", "b"]
    finally:
        lease.release()
