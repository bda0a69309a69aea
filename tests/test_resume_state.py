"""Resume and incremental runs through the compacted state, end to end on a local Ray: a changed
fingerprint redoes only that row, retried error types are retried (with attempt counts), exactly
one deciding record per row across runs and compactions, a killed compaction, and the catalog's
publication and the pairs export read the state, not the log parts."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from step1x_batch.rows import state as rowstate
from step1x_batch.job.config import parse_config
from step1x_batch.rows.log import read_logs
from step1x_batch.rows.state import iter_state, read_pointer

ROOT = Path(__file__).resolve().parents[1]


def _config(manifest: Path, out: Path, run_id: str, **runtime) -> dict:
    return {
        "input": {"manifest": str(manifest)},
        "output": {"uri": str(out)},
        "model": {"family": "null"},
        "resources": {"io_batch_size": 8, "edit_batch_size": 4},
        "runtime": {"run_id": run_id, "progress_bars": False, "log_part_rows": 5, "max_error_fraction": 1.0,
                    **runtime},
    }


def _run(manifest: Path, out: Path, run_id: str, **runtime):
    from step1x_batch.job.runner import run_job

    return run_job(parse_config(_config(manifest, out, run_id, **runtime)))


def _manifest(path: Path, rows: list[dict]) -> Path:
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _state(out: Path) -> dict[str, dict]:
    return {r["id"]: r for t in iter_state(str(out)) for r in t.to_pylist()}


def _deciding_records(out: Path) -> dict[str, dict]:
    """Each id's latest record by finished_at, from the logs alone (not the code under test)."""
    best: dict[str, dict] = {}
    for r in read_logs(str(out)).to_pylist():
        if r["id"] not in best or r["finished_at"] >= best[r["id"]]["finished_at"]:
            best[r["id"]] = r
    return best


@pytest.fixture
def images(tmp_path, image_factory) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(3):
        (folder / f"p{k}.png").write_bytes(image_factory.bytes("RGB", "PNG", 24 + 8 * k, 16))
    return folder


def _rows(images: Path, n: int) -> list[dict]:
    return [{"id": f"item-{i:03d}", "image_uri": str(images / f"p{i % 3}.png"), "instruction": f"edit {i}",
             "note": "catalog"} for i in range(n)]


def test_changed_rows_only_then_nothing(ray_local, tmp_path, images):
    out = tmp_path / "out"
    rows = _rows(images, 24)
    first = _run(_manifest(tmp_path / "m1.parquet", rows), out, "r1")
    assert first.by_status == {"ok": 24} and first.rows_skipped == 0
    p1 = read_pointer(str(out))
    assert p1 is not None and p1.ids == 24 and p1.records == 24 and p1.run_id == "r1"

    rows[3]["instruction"] = "a new edit"  # a changed fingerprint
    rows[7]["note"] = "a changed extra column"  # in neither the digest nor the fingerprint: done
    rows.append({"id": "item-new", "image_uri": str(images / "p0.png"), "instruction": "new row"})
    second = _run(_manifest(tmp_path / "m2.parquet", rows), out, "r2")
    redone = {r["id"] for r in read_logs(str(out), run_id="r2").to_pylist()}
    assert redone == {"item-003", "item-new"}
    assert second.rows_processed == 2 and second.rows_skipped == 23 and second.rows_read == 25
    state = _state(out)
    assert state["item-003"]["attempts"] == 2 and state["item-003"]["run_id"] == "r2"
    assert state["item-007"]["attempts"] == 1
    logs = _deciding_records(out)
    assert {i: (s["fingerprint"], s["status"]) for i, s in state.items()} == {
        i: (r["fingerprint"], r["status"]) for i, r in logs.items()}
    attempts = Counter(r["id"] for r in read_logs(str(out)).to_pylist())
    assert {i: s["attempts"] for i, s in state.items()} == dict(attempts)

    third = _run(tmp_path / "m2.parquet", out, "r3")
    assert third.rows_processed == 0 and third.rows_skipped == 25
    assert read_logs(str(out)).num_rows == 26  # one deciding record per row, no new one
    assert read_pointer(str(out)).version == read_pointer(str(out)).version  # nothing to compact
    assert json.loads((out / "runs" / "r3" / "summary.json").read_text())["state_compaction_s"] is None


def test_retried_error_types_are_retried_with_attempt_counts(ray_local, tmp_path, images):
    out = tmp_path / "out"
    rows = _rows(images, 6)
    rows[1]["image_uri"] = str(images / "later.png")  # missing now: a final error type
    rows[2]["instruction"] = "   "  # an invalid row: final, and never redone unchanged
    manifest = _manifest(tmp_path / "m.parquet", rows)
    first = _run(manifest, out, "r1")
    assert first.by_error_type == {"empty_instruction": 1, "missing_object": 1}
    assert _run(manifest, out, "r2").rows_processed == 0  # final errors stay final
    shutil.copy(images / "p0.png", images / "later.png")
    third = _run(manifest, out, "r3", redo_error_types=["missing_object"])  # `--retry-errors missing_object`
    (rec,) = read_logs(str(out), run_id="r3").to_pylist()
    assert rec["id"] == "item-001" and rec["status"] == "ok" and rec["attempt"] == 2
    assert third.rows_skipped == 5
    assert _state(out)["item-001"]["ok_fingerprint"] == rec["fingerprint"]
    # A retried type from the config is retried on every run, and counts attempts on.
    (images / "later.png").unlink()
    rows[1]["instruction"] = "another edit"  # a new fingerprint, whose image is missing again
    manifest = _manifest(tmp_path / "m2.parquet", rows)
    for k, run in enumerate(["r4", "r5"]):
        _run(manifest, out, run, retry_error_types=["missing_object"])
        (rec,) = read_logs(str(out), run_id=run).to_pylist()
        assert rec["error_type"] == "missing_object" and rec["attempt"] == 3 + k


def test_a_killed_run_is_folded_in_at_the_next_start(ray_local, tmp_path, images):
    """Parts no state covers (a run killed before its end compaction) count at the next start."""
    out = tmp_path / "out"
    manifest = _manifest(tmp_path / "m.parquet", _rows(images, 10))
    _run(manifest, out, "r1")
    shutil.rmtree(out / "state")  # as if r1 had been killed before compacting
    second = _run(manifest, out, "r2")
    assert second.rows_processed == 0 and second.rows_skipped == 10
    assert read_pointer(str(out)).records == 10


def test_a_run_killed_while_compacting_then_a_correct_run(ray_local, tmp_path, images):
    """SIGKILL the driver inside its end-of-run compaction (every bucket of the new version
    written, the pointer not yet): the next run starts from the previous version plus the
    killed run's parts, redoes nothing and leaves one deciding record per row."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import expire_local_lease, kill_marked

    out = tmp_path / "out"
    rows = _rows(images, 12)
    _run(_manifest(tmp_path / "m1.parquet", rows), out, "r1")
    before = read_pointer(str(out))
    rows[0]["instruction"], rows[5]["instruction"] = "changed", "changed too"
    manifest = _manifest(tmp_path / "m2.parquet", rows)
    cfg = tmp_path / "r2.yaml"
    cfg.write_text(yaml.safe_dump(_config(manifest, out, "r2", lease_ttl_s=3)))
    marker = f"compactkill-{os.getpid()}-{time.monotonic_ns()}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": f"/tmp/{marker}", "RAY_AUTH_MODE": "disabled",
           "STEP1X_TEST_MARKER": marker, "STEP1X_BATCH_FAILPOINT": "compact-before-publish"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs/edit_dataset.py"), "--config", str(cfg)], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ray_log = out / "runs" / "r2" / "ray.log"
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if ray_log.exists() and "failpoint compact-before-publish" in ray_log.read_text(errors="replace"):
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before its compaction could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        kill_marked(marker)
    assert read_pointer(str(out)) == before  # the half-written version was never published
    assert len(read_logs(str(out), run_id="r2").to_pylist()) == 2  # its records landed before
    expire_local_lease(out)  # the killed driver's lease expires
    third = _run(manifest, out, "r3", lease_ttl_s=3)
    assert third.rows_processed == 0 and third.rows_skipped == 12
    after = read_pointer(str(out))
    assert after.version != before.version and after.records == 14 and after.ids == 12
    versions = sorted(p.name for p in (out / "state").iterdir() if p.is_dir())
    assert versions == sorted([f"v-{before.version}", f"v-{after.version}"])  # the garbage is gone
    state, logs = _state(out), _deciding_records(out)
    assert {i: s["fingerprint"] for i, s in state.items()} == {i: r["fingerprint"] for i, r in logs.items()}


def test_a_damaged_state_is_rebuilt_from_the_logs(ray_local, tmp_path, images):
    out = tmp_path / "out"
    manifest = _manifest(tmp_path / "m.parquet", _rows(images, 6))
    _run(manifest, out, "r1")
    (out / "state" / "CURRENT.json").write_text("{not json")
    second = _run(manifest, out, "r2")
    assert second.rows_processed == 0 and second.rows_skipped == 6
    assert any("state pointer" in n and "rebuilt it from the logs" in n for n in second.notes)
    assert read_pointer(str(out)).records == 6


def test_the_compact_command_rebuilds_the_state(tmp_path, capsys):
    from step1x_batch.cli import main
    from step1x_batch.rows.log import part_uri, write_log_part

    out = tmp_path / "out"
    write_log_part(pa.table({"id": ["a", "b"], "fingerprint": ["fa", "fb"], "status": ["ok", "ok"],
                             "output_uri": ["x", "y"]}), part_uri(str(out), "r1", 0))
    assert main(["compact", str(out), "--local"]) == 0
    assert "2 ids, 2 records" in capsys.readouterr().out
    assert main(["compact", str(out), "--local"]) == 0
    assert "already current" in capsys.readouterr().out
    assert main(["compact", str(tmp_path / "nothing"), "--local"]) == 2
    assert "no log parts" in capsys.readouterr().err


def _catalog(tmp_path: Path, images: Path, items: list[dict], run_id: str) -> dict:
    return {
        "input": {"manifest": str(tmp_path / "catalog.parquet")},
        "output": {"uri": str(tmp_path / "cat")},
        "model": {"family": "null"},
        "catalog": {"item_id_column": "sku", "image_column": "photo", "instruction_template": "Show {name}",
                    "change_marker_column": "etag"},
        "resources": {"io_batch_size": 8, "edit_batch_size": 4},
        "runtime": {"run_id": run_id, "progress_bars": False, "log_part_rows": 5},
    }


def test_catalog_publishes_from_the_state(ray_local, tmp_path, images, monkeypatch):
    from step1x_batch.recipes.catalog import load_catalog_config, read_latest, run_catalog

    items = [{"sku": f"sku-{i}", "photo": str(images / f"p{i % 3}.png"), "name": f"item {i}", "etag": "v1"}
             for i in range(8)]
    _manifest(tmp_path / "catalog.parquet", items)
    cfg = tmp_path / "catalog.yaml"
    cfg.write_text(yaml.safe_dump(_catalog(tmp_path, images, items, "n1")))
    assert run_catalog(load_catalog_config(str(cfg))).published
    items[2]["etag"] = "v2"
    _manifest(tmp_path / "catalog.parquet", items)
    cfg.write_text(yaml.safe_dump(_catalog(tmp_path, images, items, "n2")))

    read = []  # every log part the driver reads (Ray's workers are other processes)
    real = rowstate.read_part
    monkeypatch.setattr(rowstate, "read_part", lambda uri, *a, **k: (read.append(uri), real(uri, *a, **k))[1])
    summary = run_catalog(load_catalog_config(str(cfg)))
    assert summary.published and summary.counts["changed"] == 1 and summary.counts["unchanged"] == 7
    assert not [u for u in read if "/logs/n1/" in u]  # night 1's records came from the state
    latest = read_latest(str(tmp_path / "cat"), None)
    assert latest["sku-2"]["run_id"] == "n2" and latest["sku-0"]["run_id"] == "n1"
    assert os.path.exists(latest["sku-2"]["output_uri"])
