"""``ray job submit`` of jobs/edit_dataset.py to a Ray head this test starts and stops itself.

The head gets its own temp dir and free ports, and every process it starts carries a marker in
its environment; teardown kills that process group and then anything still carrying the marker,
so no other Ray on the machine (another test's, a developer's) is touched. ``RAY_AUTH_MODE`` is
set the same way for ``ray start`` and ``ray job submit``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import free_port, marked_pids

from step1x_batch.rowlog import read_logs

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def _stop(head: subprocess.Popen, marker: str) -> None:
    """Stop only what this test started: the head's process group, then marked stragglers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(head.pid, sig)
        except ProcessLookupError:
            break
        try:
            head.wait(timeout=5)
            break
        except subprocess.TimeoutExpired:
            continue
    deadline = time.time() + 20
    while time.time() < deadline:
        left = marked_pids(marker)
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


@pytest.fixture
def ray_head():
    """A Ray head with the dashboard (job server) on free ports; yields its dashboard URL."""
    temp = tempfile.mkdtemp(prefix="rayt-", dir="/tmp")  # short: Ray's socket paths must fit
    marker = f"STEP1X_RAY_HEAD_{os.path.basename(temp)}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", marker: "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    dash = free_port()
    ports = {
        "--port": free_port(),
        "--dashboard-port": dash,
        "--ray-client-server-port": free_port(),
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
        "--metrics-export-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--runtime-env-agent-port": free_port(),
    }
    cmd = [RAY, "start", "--head", "--block", f"--temp-dir={temp}", "--num-cpus=2", "--num-gpus=0",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", "--disable-usage-stats"]
    cmd += [f"{k}={v}" for k, v in ports.items()]
    log = open(os.path.join(temp, "head.log"), "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if head.poll() is not None or time.time() > deadline:
                log.flush()
                pytest.fail(f"ray head did not come up:\n{Path(temp, 'head.log').read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, env
    finally:
        _stop(head, marker)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_ray_job_submit_edits_a_manifest(ray_head, tmp_path, image_factory):
    url, env = ray_head
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(image_factory.bytes("RGB", "PNG"))
    (folder / "b.jpg").write_bytes(image_factory.exif_rotated(6))
    rows = [{"id": f"r{i}", "image_uri": "a.png" if i % 2 else "b.jpg", "instruction": f"edit {i}"} for i in range(8)]
    rows.append({"id": "gone", "image_uri": "missing.png", "instruction": "edit"})
    (folder / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump({
        "input": {"manifest": str(folder / "m.jsonl")},
        "output": {"uri": str(out)},
        "model": {"family": "null"},
        "resources": {"io_batch_size": 4, "edit_batch_size": 4},
        "runtime": {"run_id": "submitted", "progress_bars": False, "max_error_fraction": 0.2},
    }))
    job_env = {k: v for k, v in env.items() if not k.startswith("STEP1X_RAY_HEAD_")}
    proc = subprocess.run(
        [RAY, "job", "submit", "--address", url, "--working-dir", str(ROOT), "--",
         "python", "jobs/edit_dataset.py", "--config", str(cfg), "--set", "sampling.num_steps=9"],
        env=job_env, cwd=str(ROOT), capture_output=True, text=True, timeout=240,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    assert "succeeded" in text and "run submitted: 9 rows processed (8 ok, 1 error" in text
    logs = read_logs(str(out)).to_pylist()
    assert len(logs) == 9
    assert {r["id"]: r["status"] for r in logs} == {**{f"r{i}": "ok" for i in range(8)}, "gone": "error"}
    assert all(r["num_steps"] == 9 and r["run_id"] == "submitted" for r in logs)
    assert len(list((out / "images").glob("*.png"))) == 8
    assert (out / "runs" / "submitted" / "report.html").exists()
