"""The entry point every job runs through: pre-flight checks, then the output root's lease, then
the run, which gets the checks' findings and the lease itself (no Ray: a local root)."""

from __future__ import annotations

import json

import pytest

from step1x_batch.job import lease as leases
from step1x_batch.job.config import parse_config
from step1x_batch.job.entrypoint import check_lease_and_run
from step1x_batch.job.preflight import Preflight, PreflightError


def _config(tmp_path, manifest_rows: int = 2, **runtime):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"r{i}", "image_uri": "a.png", "instruction": "x"}) + "\n"
                                for i in range(manifest_rows)))
    return parse_config({"input": {"manifest": str(manifest)}, "output": {"uri": str(tmp_path / "out")},
                         "model": {"family": "null"}, "runtime": {"run_id": "r1", **runtime}})


def test_the_run_gets_the_findings_and_the_held_lease(tmp_path):
    cfg = _config(tmp_path)
    seen = {}

    def run(facts: Preflight, lease: leases.Lease) -> bool:
        seen.update(facts=facts, lease=lease, holder=leases.read_holder(cfg.output.uri, None))
        return True

    assert check_lease_and_run(cfg, run, job="edit")
    assert isinstance(seen["facts"], Preflight) and seen["facts"].manifest_rows == 2
    assert seen["lease"].run_id == "r1" and seen["holder"].doc["token"] == seen["lease"].token
    assert leases.read_holder(cfg.output.uri, None) is None  # released at the end


def test_a_failed_check_takes_no_lease(tmp_path):
    cfg = _config(tmp_path, manifest_rows=0)
    with pytest.raises(PreflightError):
        check_lease_and_run(cfg, lambda facts, lease: True, job="edit")
    assert leases.read_holder(cfg.output.uri, None) is None
