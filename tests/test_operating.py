"""Operating a run as a person or a cron does: the real command line in its own process, a real
local Ray, a real S3-protocol server (moto).

* a clean run's console: the progress line and the summary, no Ray INFO lines, no warnings
  (Ray's own output is in ``runs/<run_id>/ray.log``); ``-v`` shows Ray's lines;
* two runs started at once on one output prefix: exactly one runs, the other exits 2 naming the
  holder; the holder's driver SIGKILLed; a run started while its lease is fresh is refused, one
  started after it expired takes over, and the union of the log has exactly one deciding record
  per row;
* a model that fails to load inside the actor (after the pre-flight checks passed) stops the job
  with one sentence naming the file and cause, exit 2, no traceback.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from step1x_batch.io.storage import read_bytes, write_bytes
from step1x_batch.job import lease
from step1x_batch.rows.log import read_logs

from conftest import kill_marked, make_bucket

ROOT = Path(__file__).resolve().parents[1]


def _env(marker: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
            "RAY_TMPDIR": f"/tmp/{marker}", "STEP1X_TEST_MARKER": marker,
            "RAY_USAGE_STATS_ENABLED": "0"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "step1x_batch.cli", *args]


def _png(image_factory, w: int = 24, h: int = 16) -> bytes:
    return image_factory.bytes("RGB", "PNG", w, h)


def _job(path: Path, manifest: str, output: str, **sections) -> str:
    raw = {"input": {"manifest": manifest}, "output": {"uri": output}, "model": {"family": "null"},
           "resources": {"local_num_cpus": 2}, "runtime": {"progress_seconds": 2, "max_error_fraction": 0.5}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    path.write_text(yaml.safe_dump(raw))
    return str(path)


RAY_NOISE = re.compile(r" INFO | WARNING |WARN|core_worker|raylet|Traceback|DeprecationWarning|FutureWarning|"
                       r"Token authentication|\(MapWorker|\(pid=")


def _start(cmd: list[str], env: dict[str, str], console: Path) -> subprocess.Popen:
    """``cmd`` in the background, its stdout and stderr in files (a pipe nobody reads could fill)."""
    with open(f"{console}.out", "w") as out, open(f"{console}.err", "w") as err:
        return subprocess.Popen(cmd, env=env, text=True, stdout=out, stderr=err)


def _console(console: Path) -> tuple[str, str]:
    return Path(f"{console}.out").read_text(), Path(f"{console}.err").read_text()


def test_clean_console_and_verbose(tmp_path, image_factory):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png(image_factory))
    rows = [{"id": f"r{i}", "image_uri": "a.png", "instruction": f"edit {i}"} for i in range(5)]
    rows.append({"id": "bad", "image_uri": "missing.png", "instruction": "edit"})
    (folder / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    markers = {name: f"ray{name[0]}-{os.getpid()}-{time.monotonic_ns()}" for name in ("quiet", "loud")}
    quiet_cfg = _job(tmp_path / "job.yaml", str(folder / "m.jsonl"), str(tmp_path / "out"),
                     runtime={"run_id": "quiet", "progress_seconds": 2})
    loud_cfg = _job(tmp_path / "job-v.yaml", str(folder / "m.jsonl"), str(tmp_path / "out-v"),
                    runtime={"run_id": "loud", "progress_bars": False})
    # One run after the other (each its own local Ray and output root): one Ray starting at a
    # time, since the suite's other worker starts its own and Ray gives a node 30 s to come up.
    procs = {}
    try:
        procs["quiet"] = _start(_cli("run", quiet_cfg), _env(markers["quiet"]), tmp_path / "quiet")
        procs["quiet"].wait(timeout=600)
        procs["loud"] = _start(_cli("run", loud_cfg, "-v"), _env(markers["loud"]), tmp_path / "loud")
        procs["loud"].wait(timeout=600)
    finally:
        for name, proc in procs.items():
            if proc.poll() is None:
                proc.kill()
            kill_marked(markers[name])
    (out, err), (loud_out, loud_err) = (_console(tmp_path / name) for name in ("quiet", "loud"))
    console = out + err
    assert procs["quiet"].returncode == 0, console
    noise = [line for line in console.splitlines() if RAY_NOISE.search(line)]
    assert not noise, noise
    assert re.search(r"^run quiet: 6/6 rows \(ok 5, error 1\), [\d.]+ rows/s, actors \d/\d busy", out, re.M), out
    assert re.search(r"^run quiet: 6 rows processed \(5 ok, 1 error \[missing_object 1\]\)", out, re.M)
    assert "report:" in out
    ray_log = (tmp_path / "out" / "runs" / "quiet" / "ray.log").read_text()
    assert "Started a local Ray instance" in ray_log  # Ray's own lines went here instead

    assert procs["loud"].returncode == 0, loud_err
    assert "Started a local Ray instance" in loud_out + loud_err
    assert "run loud: 6 rows processed" in loud_out


def _records_per_id(output: str) -> dict[str, list[str]]:
    records: dict[str, list[str]] = {}
    for r in read_logs(output).to_pylist():
        records.setdefault(r["id"], []).append(f"{r['run_id']}:{r['status']}")
    return records


def _wait_until_stale(output: str, deadline: float) -> None:
    """Until the lease on ``output`` is older than its ttl by the store's clock (no fixed sleep)."""
    while not lease.read_holder(output, None).stale():
        assert time.time() < deadline, "the killed run's lease never went stale"
        time.sleep(0.25)


def test_one_writer_per_prefix_then_takeover_after_sigkill(tmp_path, s3_server, image_factory):
    bucket = make_bucket(s3_server)
    n = 24
    write_bytes(f"{bucket}/in/a.png", _png(image_factory))
    rows = [{"id": f"row-{i:02d}", "image_uri": "a.png", "instruction": f"edit {i}", "seed": i} for i in range(n)]
    write_bytes(f"{bucket}/in/m.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    output = f"{bucket}/out"
    ttl = 8.0
    common = dict(model={"family": "job_plugins:Slow", "options": {"row_s": 0.4}},
                  resources={"local_num_cpus": 2, "edit_batch_size": 2, "io_batch_size": 4},
                  runtime={"log_part_rows": 2, "log_part_seconds": 0.5, "lease_ttl_s": ttl,
                           "progress_seconds": 2})

    def config(run_id: str) -> str:
        c = {**common, "runtime": {**common["runtime"], "run_id": run_id}}
        return _job(tmp_path / f"{run_id}.yaml", f"{bucket}/in/m.jsonl", output, **c)

    marker = f"rayl-{os.getpid()}-{time.monotonic_ns()}"
    env = _env(marker)
    a, b = config("run-a"), config("run-b")
    procs = {name: subprocess.Popen(_cli("run", cfg), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True, start_new_session=True)
             for name, cfg in (("run-a", a), ("run-b", b))}
    try:
        deadline = time.time() + 120
        while time.time() < deadline and all(p.poll() is None for p in procs.values()):
            time.sleep(0.1)
        refused = [name for name, p in procs.items() if p.poll() is not None]
        assert len(refused) == 1, "exactly one of two simultaneous runs must be refused"
        loser = refused[0]
        holder = "run-b" if loser == "run-a" else "run-a"
        out, err = procs[loser].communicate()
        assert procs[loser].returncode == 2
        assert err.strip().count("\n") == 0 and "Traceback" not in err
        assert f"is in use by run {holder} on host" in err and "started" in err

        # Let the holder land some records, then SIGKILL its driver mid-run.
        fs_logs = f"{output}/logs/{holder}"
        while time.time() < deadline + 120 and procs[holder].poll() is None:
            try:
                landed = read_logs(output, run_id=holder).num_rows
            except Exception:
                landed = 0
            if landed >= 4:
                break
            time.sleep(0.2)
        assert procs[holder].poll() is None, procs[holder].communicate()
        os.kill(procs[holder].pid, signal.SIGKILL)
        killed_at = time.time()
        procs[holder].wait(timeout=30)
        kill_marked(marker)  # its Ray
        landed = read_logs(output, run_id=holder).num_rows
        assert 0 < landed < n, f"the kill landed mid-run ({fs_logs})"

        # Its lease is still fresh: a new run is refused, naming the dead holder.
        early = subprocess.run(_cli("run", config("run-c")), env=env, capture_output=True, text=True, timeout=120)
        assert early.returncode == 2 and f"is in use by run {holder}" in early.stderr, early.stderr

        _wait_until_stale(output, deadline=killed_at + ttl + 60)  # by the store's clock, as the taker judges
        late = subprocess.run(_cli("run", config("run-d")), env=env, capture_output=True, text=True, timeout=600)
        assert late.returncode == 0, late.stdout + late.stderr
        assert f"took over the lease on {output} from run {holder}" in late.stderr
        summary = json.loads(read_bytes(f"{output}/runs/run-d/summary.json"))
        assert any(f"took over the lease from run {holder}" in note for note in summary["notes"])
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        kill_marked(marker)

    per_id = _records_per_id(output)
    assert sorted(per_id) == [r["id"] for r in rows]
    assert all(len(v) == 1 and v[0].endswith(":ok") for v in per_id.values()), per_id
    by_run = {v[0].split(":")[0] for v in per_id.values()}
    assert by_run == {holder, "run-d"}  # the killed run's rows kept, the rest done by the taker
    assert lease.read_holder(output, None) is None  # released at the end


def test_model_that_fails_to_load_in_the_actor_stops_with_one_sentence(tmp_path, image_factory):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(_png(image_factory))
    (folder / "m.jsonl").write_text(json.dumps({"id": "r", "image_uri": "a.png", "instruction": "x"}) + "\n")
    marker = f"rayf-{os.getpid()}-{time.monotonic_ns()}"
    cfg = _job(tmp_path / "job.yaml", str(folder / "m.jsonl"), str(tmp_path / "out"),
               model={"family": "job_plugins:FailsToLoad"}, runtime={"run_id": "noload"})
    try:
        done = subprocess.run(_cli("run", cfg), env=_env(marker), capture_output=True, text=True, timeout=600)
    finally:
        kill_marked(marker)
    assert done.returncode == 2, done.stdout + done.stderr
    err = done.stderr.strip().splitlines()
    assert "Traceback" not in done.stdout + done.stderr and "ray.exceptions" not in done.stdout + done.stderr
    assert len(err) == 1 and err[0].startswith("error: the model failed to load on "), err
    assert "/models/tiny/vae.safetensors: safetensors header is corrupt (HeaderTooLarge)" in err[0]
    summary = json.loads((tmp_path / "out" / "runs" / "noload" / "summary.json").read_text())
    assert summary["status"] == "stopped"
    from step1x_batch.job.inspection import root_status

    assert [r.state for r in root_status(str(tmp_path / "out")).runs] == ["stopped"]
    assert "HeaderTooLarge" in (tmp_path / "out" / "runs" / "noload" / "ray.log").read_text()  # the details
