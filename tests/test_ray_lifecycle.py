"""Which Ray a run uses and that it leaves none behind (issue 18, items 7 and 8).

* A run with ``resources.ray_address`` unset starts a private local Ray even when a cluster
  runs on the host (a ``ray start --head`` it would otherwise join, then fail on ``num_cpus``);
  ``ray_address: auto`` joins that cluster on purpose.
* A driver SIGKILLed mid-run leaves no process of its local Ray (GCS, raylet, DashboardAgent,
  RuntimeEnvAgent, workers) running, and the next run starts cleanly and finishes the rows.

The drivers are subprocesses with their own ``RAY_TMPDIR`` (their Ray's files, and the head's
address file, live there and nowhere another test looks); the head runs in its own session on
free ports (:class:`conftest.RayHead`). What counts as "the driver's Ray" is read by the test
itself from /proc (every process under the driver just before the kill, with its start time).
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
from pathlib import Path

import pytest
import yaml
from conftest import RayHead, descendants, expire_local_lease, kill_processes, still_running

from step1x_batch.rows.log import read_logs

ROOT = Path(__file__).resolve().parents[1]


def _env(ray_tmp: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), RAY_TMPDIR=ray_tmp,
               RAY_USAGE_STATS_ENABLED="0")
    return env


def _job(tmp_path: Path, image_factory, rows: int, **runtime) -> tuple[Path, Path]:
    folder = tmp_path / "in"
    folder.mkdir(exist_ok=True)
    (folder / "a.png").write_bytes(image_factory.bytes(width=16, height=12))
    (folder / "m.jsonl").write_text("".join(
        json.dumps({"id": f"r{i:03d}", "image_uri": "a.png", "instruction": f"edit {i}"}) + "\n" for i in range(rows)))
    out = tmp_path / "out"
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump({
        "input": {"manifest": str(folder / "m.jsonl")}, "output": {"uri": str(out)},
        "model": {"family": "job_plugins:Slow", "options": {"row_s": 0.2}},
        "resources": {"edit_batch_size": 2, "io_batch_size": 2, "local_num_cpus": 2},
        "runtime": {"progress_bars": False, "log_part_rows": 2, "log_part_seconds": 0.5, "lease_ttl_s": 3,
                    **runtime},
    }))
    return cfg, out


def _driver(cfg: Path, env: dict[str, str], *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "jobs/edit_dataset.py"), "--config", str(cfg), *extra]


def _wait(condition, timeout_s: float, what: str, poll_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(poll_s)


def _titles(processes: dict[int, int]) -> list[str]:
    names = []
    for pid in processes:
        try:
            names.append(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace"))
        except OSError:
            pass
    return names


@pytest.mark.slow
def test_a_killed_driver_leaves_no_ray_behind_and_the_next_run_starts_cleanly(tmp_path, image_factory):
    ray_tmp = tempfile.mkdtemp(prefix="rayk-", dir="/tmp")  # short: Ray's socket paths must fit
    env = _env(ray_tmp)
    n = 40
    cfg, out = _job(tmp_path, image_factory, n, run_id="killed")
    proc = subprocess.Popen(_driver(cfg, env), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ray_procs: dict[int, int] = {}
    try:
        def running_with_agents() -> bool:
            assert proc.poll() is None, f"the driver ended early: {proc.stderr.read()[-2000:]!r}"
            ray_procs.update(descendants(proc.pid))
            titles = _titles(ray_procs)
            parts = list((out / "logs" / "killed").glob("part-*.parquet")) if (out / "logs").exists() else []
            return bool(parts) and "ray::DashboardAgent" in titles and "ray::RuntimeEnvAgent" in titles

        _wait(running_with_agents, 180, "the run to log rows with its Ray's agents up")
        ray_procs.update(descendants(proc.pid))
        os.kill(proc.pid, signal.SIGKILL)  # the driver, mid-run
        proc.wait(timeout=30)
        _wait(lambda: not still_running(ray_procs), 60,
              f"the killed driver's Ray to go: {_titles(still_running(ray_procs))}")
    finally:
        kill_processes(ray_procs)
        if proc.poll() is None:
            proc.kill()
    try:
        _rerun_after_the_kill(cfg, out, env, n)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _rerun_after_the_kill(cfg: Path, out: Path, env: dict[str, str], n: int) -> None:
    killed = read_logs(str(out), run_id="killed").to_pylist()
    assert 0 < len(killed) < n, "the kill landed mid-run"

    # The next run starts cleanly (its own local Ray), takes the expired lease over and finishes.
    cfg_text = cfg.read_text().replace("run_id: killed", "run_id: resumed")
    cfg.write_text(cfg_text)
    if (out / "_lease.json").exists():
        expire_local_lease(out)  # the killed driver renews it no more: aged past its ttl, not waited for
    done = subprocess.run(_driver(cfg, env), env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    everything = read_logs(str(out)).to_pylist()
    ok_ids = [r["id"] for r in everything if r["status"] == "ok"]
    assert len(ok_ids) == len(set(ok_ids)) == n
    assert len([r for r in everything if r["run_id"] == "resumed"]) == n - len(killed)


@pytest.mark.slow
def test_unset_ray_address_never_joins_a_cluster_on_the_host(tmp_path, image_factory):
    ray_tmp = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")
    env = _env(ray_tmp)
    head = RayHead(env, os.path.join(ray_tmp, "ray"), dashboard=False)  # where ray.init() looks first
    try:
        address = Path(ray_tmp, "ray", "ray_current_cluster").read_text().strip()
        assert address.endswith(f":{head.gcs_port}")  # Ray's default ray.init() would join it
        cfg, out = _job(tmp_path, image_factory, 4, run_id="private")
        text = cfg.read_text().replace("row_s: 0.2", "row_s: 0.0")
        cfg.write_text(text)
        done = subprocess.run(_driver(cfg, env), env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        log = (out / "runs" / "private" / "ray.log").read_text()
        assert "Started a local Ray instance" in log and address not in log

        # `step1x-batch compact` on Ray likewise.
        compacted = subprocess.run([sys.executable, "-m", "step1x_batch.cli", "compact", str(out)], env=env,
                                   capture_output=True, text=True, timeout=300)
        assert compacted.returncode == 0, (compacted.stdout + compacted.stderr)[-3000:]
        assert "Started a local Ray instance" in compacted.stderr and address not in compacted.stderr

        # Joining it is explicit: `auto` (an address, or $RAY_ADDRESS as `ray job submit` sets it).
        joined = subprocess.run(_driver(cfg, env, "--set", "resources.ray_address=auto",
                                        "--set", "runtime.run_id=joined", "--set", "sampling.num_steps=3"),
                                env=env, capture_output=True, text=True, timeout=300)
        assert joined.returncode == 0, (joined.stdout + joined.stderr)[-3000:]
        log = (out / "runs" / "joined" / "ray.log").read_text()
        assert "Connecting to existing Ray cluster" in log and "Started a local Ray instance" not in log
    finally:
        head.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)
