"""``ray job submit`` of jobs/edit_dataset.py to a Ray head started the way the README says.

Ray 2.60 turns token authentication on for ``ray start --head`` whenever a token already exists
(``~/.ray/auth_token``, which any local ``ray.init()`` writes -- the demo, a test run); a client
without ``RAY_AUTH_MODE=token`` then sends no token and the submit fails with "401 Unauthorized:
Missing authentication token". The README's set-up (below, tested as written) makes the token
and exports ``RAY_AUTH_MODE=token`` for the head and for the client.

Hermetic: ``HOME`` is a temporary folder (the token is this test's, never the user's), the head
runs in its own session with its own temp dir and free ports (:class:`conftest.RayHead`), and
teardown ends only the processes it started.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import RayHead

from step1x_batch.rows.log import read_logs

ROOT = Path(__file__).resolve().parents[1]
BIN = str(Path(sys.executable).parent)

# The README's commands (section "Jobs on Ray"), as written; the test only fills in HEAD, the
# config and its own ports / temp dir for `ray start` (so that it cannot collide with anyone's).
README_TOKEN = "ray get-auth-token --generate > /dev/null"
README_MODE = "export RAY_AUTH_MODE=token"
README_HEAD = "ray start --head"
README_SUBMIT = ("ray job submit --address http://HEAD:8265 --working-dir . -- \\\n"
                 "    python jobs/edit_dataset.py --config configs/step1x-edit-v1p1.yaml")


def _bash(script: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], env=env, cwd=str(ROOT), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def user_env(tmp_path):
    """A user's shell on a fresh machine: PATH with the venv, a HOME of its own, no Ray settings."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), PATH=BIN + os.pathsep + env.get("PATH", ""), RAY_USAGE_STATS_ENABLED="0")
    return env


@pytest.fixture
def token_head(user_env):
    """The head as the README starts it: the token made, RAY_AUTH_MODE=token exported."""
    made = _bash(README_TOKEN, user_env)
    assert made.returncode == 0 and made.stdout == "", made.stderr  # the token is never printed
    assert (Path(user_env["HOME"]) / ".ray" / "auth_token").exists()
    env = {**user_env, "RAY_AUTH_MODE": "token"}
    temp = tempfile.mkdtemp(prefix="rayt-", dir="/tmp")  # short: Ray's socket paths must fit
    head = RayHead(env, temp)
    try:
        yield head, env
    finally:
        head.stop()
        shutil.rmtree(temp, ignore_errors=True)


def _job(tmp_path, image_factory) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(image_factory.bytes("RGB", "PNG"))
    (folder / "b.jpg").write_bytes(image_factory.exif_rotated(6))
    rows = [{"id": f"r{i}", "image_uri": "a.png" if i % 2 else "b.jpg", "instruction": f"edit {i}"} for i in range(8)]
    rows.append({"id": "gone", "image_uri": "missing.png", "instruction": "edit"})
    (folder / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump({
        "input": {"manifest": str(folder / "m.jsonl")},
        "output": {"uri": str(tmp_path / "out")},
        "model": {"family": "null"},
        "resources": {"io_batch_size": 4, "edit_batch_size": 4},
        "runtime": {"run_id": "submitted", "progress_bars": False, "max_error_fraction": 0.2},
    }))
    return cfg


def _submit_command(url: str, cfg: Path) -> str:
    command = README_SUBMIT.replace("http://HEAD:8265", url).replace("configs/step1x-edit-v1p1.yaml", str(cfg))
    return command + " --set sampling.num_steps=9"


@pytest.mark.slow
def test_ray_job_submit_as_the_readme_says(token_head, tmp_path, image_factory):
    head, env = token_head
    cfg = _job(tmp_path, image_factory)
    out = tmp_path / "out"

    # What the issue saw: a client without RAY_AUTH_MODE=token sends no token.
    plain = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
    refused = _bash(_submit_command(head.url, cfg), plain)
    assert refused.returncode != 0
    assert "Missing authentication token" in refused.stdout + refused.stderr
    assert not out.exists()

    # The README's commands, as written.
    done = _bash(f"{README_MODE}\n{_submit_command(head.url, cfg)}", plain)
    text = done.stdout + done.stderr
    assert done.returncode == 0, text[-4000:]
    assert "succeeded" in text and "run submitted: 9 rows processed (8 ok, 1 error" in text
    logs = read_logs(str(out)).to_pylist()
    assert len(logs) == 9
    assert {r["id"]: r["status"] for r in logs} == {**{f"r{i}": "ok" for i in range(8)}, "gone": "error"}
    assert all(r["num_steps"] == 9 and r["run_id"] == "submitted" for r in logs)
    assert len(list((out / "images").glob("*.png"))) == 8
    assert (out / "runs" / "submitted" / "report.html").exists()


def test_the_readme_shows_the_tested_set_up():
    """The commands this file runs are the README's (the lead pastes them with this test)."""
    readme = (ROOT / "README.md").read_text()
    for line in (README_TOKEN, README_MODE, README_HEAD, *README_SUBMIT.splitlines()):
        assert line in readme, line
