"""Faults lose nothing: each proven on a real local Ray (issue 4, item 5).

(a) an edit actor SIGKILLed while it holds a batch -> Ray Data restarts the actor and retries the
    batch (its defaults for actor pools: ``max_restarts=-1``, ``max_task_retries=-1``); every row
    logged once, outputs byte-identical to an undisturbed run.
(b) transient storage errors (503 SlowDown / 500 InternalError from a proxy in front of the S3
    server) on every kind of request -- manifest and image reads, listings, output, log-part,
    snapshot and summary writes -> retried, nothing lost, bytes identical, retries in summary.json.
(c) the driver SIGKILLed mid-run, then re-run: ``test_job_e2e.py::test_driver_sigkill_then_rerun``
    (complete, no duplicate ok records, and no id with an ok record after the kill is processed
    again: the re-run's records and the killed run's records share no id). Not repeated here.
(d) the output not writable (403 AccessDenied, 507 storage full, a local path that cannot be a
    folder) -> a clear error naming the object and the cause, and no row marked ok whose object
    was not written; the rows are retried by the next run.
"""

from __future__ import annotations

import io
import json
import os
import threading
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pytest
import yaml

from conftest import FlakyProxy, make_bucket
from step1x_batch import errors
from step1x_batch.job.config import parse_config
from step1x_batch.io.images import decode_image
from step1x_batch.rows.log import read_logs
from step1x_batch.io.storage import StorageOptions, filesystem, read_bytes, write_bytes

ROOT = Path(__file__).resolve().parents[1]
N_ROWS = 36



def _config(manifest: str, output: str, **sections) -> dict:
    raw = {
        "input": {"manifest": manifest},
        "output": {"uri": output},
        "model": {"family": "job_plugins:Seeded", "model_id": "seeded"},
        "resources": {"edit_batch_size": 6, "io_batch_size": 6},
        "runtime": {"progress_bars": False, "log_part_rows": 12, "max_error_fraction": 0.0},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def _run(raw: dict):
    from step1x_batch.job.runner import run_job

    return run_job(parse_config(raw))


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, image_factory) -> dict[str, bytes]:
    """Relative name -> bytes: four small pictures and a JSONL manifest of N_ROWS rows."""
    files = {f"p{k}.png": _png(image_factory.rgb(16 + 4 * k, 16 + 2 * k)) for k in range(4)}
    rows = [{"id": f"row-{i:03d}", "image_uri": f"p{i % 4}.png", "instruction": f"edit {i}", "seed": 1000 + i}
            for i in range(N_ROWS)]
    files["m.jsonl"] = "".join(json.dumps(r) + "\n" for r in rows).encode()
    return files


def _local_copy(folder: Path, dataset: dict[str, bytes]) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in dataset.items():
        (folder / name).write_bytes(data)
    return str(folder / "m.jsonl")


def _outputs(output_uri: str, options: StorageOptions | None = None) -> dict[str, bytes]:
    """id -> bytes of every object under ``images/``."""
    fs, root = filesystem(output_uri.rstrip("/") + "/images", options)
    return {Path(p).stem: fs.cat_file(p) for p in fs.find(root)}


def _assert_each_row_logged_once_ok(output_uri: str, options: StorageOptions | None = None) -> list[dict]:
    recs = read_logs(output_uri, options).to_pylist()
    counts = Counter(r["id"] for r in recs)
    assert counts == {f"row-{i:03d}": 1 for i in range(N_ROWS)}, "every row exactly one record"
    assert {r["status"] for r in recs} == {"ok"}
    return recs


@pytest.fixture(scope="module")
def undisturbed(ray_local, dataset, tmp_path_factory) -> dict[str, bytes]:
    """The reference: the same rows through the same model stand-in with nothing going wrong."""
    base = tmp_path_factory.mktemp("undisturbed")
    summary = _run(_config(_local_copy(base / "in", dataset), str(base / "out"), runtime={"run_id": "ref"}))
    assert summary.ok and summary.by_status == {"ok": N_ROWS}
    out = _outputs(str(base / "out"))
    assert len(out) == N_ROWS and len(set(out.values())) == N_ROWS  # every row's bytes differ
    return out


# --------------------------------------------------------------------------------------------
# (a) an edit actor killed mid-batch


def test_edit_actor_killed_mid_batch(ray_local, dataset, undisturbed, tmp_path):
    kill_dir = tmp_path / "kill"
    kill_dir.mkdir()
    raw = _config(_local_copy(tmp_path / "in", dataset), str(tmp_path / "out"),
                  model={"family": "job_plugins:KillOnce", "weights": str(kill_dir), "model_id": "seeded"},
                  runtime={"run_id": "killed-actor"})
    summary = _run(raw)

    marker = kill_dir / "killed.txt"
    assert marker.exists(), "the actor never reached its second batch: nothing was killed"
    pid, seeds = marker.read_text().split()
    held = {f"row-{int(seed) - 1000:03d}" for seed in seeds.split(",")}
    assert held  # it died holding a batch of rows
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid), 0)  # and it is gone
    assert summary.ok and summary.by_status == {"ok": N_ROWS} and summary.rows_processed == N_ROWS
    recs = {r["id"]: r for r in _assert_each_row_logged_once_ok(str(tmp_path / "out"))}
    for rid in held:  # the batch it held was edited again, by a restarted actor
        assert not recs[rid]["worker"].endswith(f":{pid}"), recs[rid]
    assert _outputs(str(tmp_path / "out")) == undisturbed  # byte-identical, nothing missing or extra


# --------------------------------------------------------------------------------------------
# A proxy that answers by rule (method, path) -> (status, S3 error code) or None (forward).


class RuleProxy(FlakyProxy):
    """conftest's FlakyProxy, answering chosen requests with an S3 error by a rule over
    (method, path); every request is recorded with the error it got (or None)."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.rule = lambda method, path: None
        self.log: list[tuple[str, str, int | None]] = []
        proxy = self
        base = self._server.RequestHandlerClass

        class Handler(base):
            def _handle(self) -> None:
                verdict = proxy.rule(self.command, self.path)
                with proxy._lock:
                    proxy.log.append((self.command, self.path, verdict[0] if verdict else None))
                if verdict is None:
                    return base._handle(self)
                self._body()  # consume the request, keep the connection usable
                status, code = verdict
                payload = (f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
                           f"<Message>injected {code}</Message></Error>").encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server.RequestHandlerClass = Handler

    def hits(self, method: str | None = None, part: str = "") -> int:
        return sum(1 for m, p, v in self.log if v and (method is None or m == method) and part in p)


@pytest.fixture
def rule_proxy(s3_server):
    proxy = RuleProxy(s3_server)
    try:
        yield proxy
    finally:
        proxy.close()


def _upload(bucket: str, dataset: dict[str, bytes]) -> str:
    for name, data in dataset.items():
        write_bytes(f"{bucket}/in/{name}", data)
    return f"{bucket}/in/m.jsonl"


def _first_try_fails() -> Callable[[str, str], tuple[int, str] | None]:
    """The first request for each distinct (method, path + query) fails; its retry goes through.
    Alternates 503 SlowDown and 500 InternalError."""
    seen: set[tuple[str, str]] = set()
    lock = threading.Lock()

    def rule(method: str, path: str):
        with lock:
            if (method, path) in seen:
                return None
            seen.add((method, path))
            return (503, "SlowDown") if len(seen) % 2 else (500, "InternalError")

    return rule


# --------------------------------------------------------------------------------------------
# (b) transient storage errors on reads and writes


def test_transient_storage_errors_are_retried(ray_local, s3_server, rule_proxy, dataset, undisturbed):
    bucket = make_bucket(s3_server)
    manifest = _upload(bucket, dataset)
    out = f"{bucket}/out"
    via_proxy = {"endpoint_url": rule_proxy.endpoint, "max_attempts": 4}
    raw = _config(manifest, out, runtime={"run_id": "flaky"})
    raw["input"]["storage"] = dict(via_proxy)
    raw["output"]["storage"] = dict(via_proxy)
    rule_proxy.rule = _first_try_fails()
    summary = _run(raw)
    rule_proxy.rule = lambda method, path: None

    # every kind of request was hit: manifest read, image reads, listings, every write
    assert rule_proxy.hits("GET", "/in/m.jsonl") >= 1
    assert rule_proxy.hits("GET", "/in/p") == 4  # each input image's first read
    assert rule_proxy.hits("GET", "list-type") >= 1  # listings (log parts, manifest folder)
    assert rule_proxy.hits("PUT", "/out/images/") == N_ROWS  # each output's first write
    assert rule_proxy.hits("PUT", "/out/logs/flaky/part-") == summary.log_parts >= 2
    assert rule_proxy.hits("PUT", "/out/runs/flaky/config.yaml") == 1
    assert rule_proxy.hits("PUT", "/out/runs/flaky/summary.json") == 1

    # nothing lost: every row once, ok, bytes identical to the undisturbed run
    assert summary.ok and summary.by_status == {"ok": N_ROWS}
    opts = StorageOptions()
    _assert_each_row_logged_once_ok(out, opts)
    assert _outputs(out, opts) == undisturbed
    # the retries are counted in summary.json: every injected failure from the config snapshot until
    # the summary was written, except the manifest read inside Ray's read task (retries made there
    # are reported by no stage) and the lease's renewals (the lease is not the run's I/O); none
    # counted twice. The pre-flight checks and the lease's creation came first, were failed and
    # retried too (the run went through), and belong to no run yet.
    log = rule_proxy.log
    snapshot = next(i for i, (m, p, v) in enumerate(log) if m == "PUT" and "runs/flaky/config.yaml" in p)
    summary_put = next(i for i, (m, p, v) in enumerate(log) if m == "PUT" and "summary.json" in p)
    assert any(v for m, p, v in log[:snapshot] if "_lease.json" in p)
    before = sum(1 for m, p, v in log[snapshot:summary_put] if v and "_lease.json" not in p)
    on_disk = json.loads(read_bytes(f"{out}/runs/flaky/summary.json"))
    assert on_disk["storage_retries"] == summary.storage_retries
    assert before - rule_proxy.hits(None, "/in/m.jsonl") <= summary.storage_retries <= before
    assert summary.storage_retries >= N_ROWS + 4  # the image writes and reads at least


# --------------------------------------------------------------------------------------------
# (d) the output not writable


def test_output_not_writable_is_a_clear_error_and_nothing_false_is_ok(
        ray_local, s3_server, rule_proxy, dataset, undisturbed, tmp_path, capsys):
    from step1x_batch.job.runner import run_config

    bucket = make_bucket(s3_server)
    manifest = _upload(bucket, dataset)
    out = f"{bucket}/out"
    raw = _config(manifest, out, runtime={"run_id": "denied", "max_error_fraction": 1.0})
    raw["output"]["storage"] = {"endpoint_url": rule_proxy.endpoint, "max_attempts": 3}

    # 1. nothing under the output root may be written: the pre-flight probe finds it before Ray
    #    or any row runs, and the one sentence names the location, the cause and the fix
    rule_proxy.rule = lambda m, p: (403, "AccessDenied") if m in ("PUT", "POST") and "/out/" in p else None
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump({**raw, "runtime": {**raw["runtime"], "run_id": "nowrite"}}))
    assert run_config(str(cfg)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: output.uri {out}: ") and "cannot write there (AccessDenied)" in err, err
    assert "s3:PutObject" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert read_logs(out).num_rows == 0 and _outputs(out, StorageOptions()) == {}

    # 2. some objects refused (permission denied; storage full, as MinIO answers it), logs fine
    def deny(method: str, path: str):
        if method in ("PUT", "POST") and "/out/images/row-00" in path:
            return 403, "AccessDenied"
        if method in ("PUT", "POST") and "/out/images/row-01" in path:
            return 507, "XMinioStorageFull"
        return None

    rule_proxy.rule = deny
    summary = _run(raw)
    opts = StorageOptions()
    recs = read_logs(out, opts, run_id="denied").to_pylist()
    assert Counter(r["id"] for r in recs) == {f"row-{i:03d}": 1 for i in range(N_ROWS)}
    denied = {f"row-{i:03d}" for i in range(20)}
    written = _outputs(out, opts)
    assert not denied & set(written)
    for r in recs:
        if r["id"] in denied:
            assert (r["status"], r["error_type"], r["output_uri"]) == ("error", errors.WRITE_FAILED, None)
            assert f"{out}/images/{r['id']}.png" in r["error_message"]  # names the object ...
            cause = "PermissionError" if r["id"] < "row-010" else "XMinioStorageFull"  # ... and the cause
            assert cause in r["error_message"], r["error_message"]
        else:  # ... and every ok record's object exists, decodes, and holds the right bytes
            assert r["status"] == "ok" and r["output_uri"] == f"{out}/images/{r['id']}.png"
            assert written[r["id"]] == undisturbed[r["id"]]
            assert decode_image(written[r["id"]], 10**6).ndim == 3
    assert summary.by_status == {"ok": N_ROWS - 20, "error": 20}
    assert summary.by_error_type == {errors.WRITE_FAILED: 20}

    # 3. once the output is writable again, the next run redoes exactly the failed rows
    rule_proxy.rule = lambda m, p: None
    again = _run({**raw, "runtime": {**raw["runtime"], "run_id": "after"}})
    assert (again.rows_processed, again.rows_skipped, again.by_status) == (20, N_ROWS - 20, {"ok": 20})
    assert _outputs(out, opts) == undisturbed
    oks = [r["id"] for r in read_logs(out, opts).to_pylist() if r["status"] == "ok"]
    assert sorted(oks) == sorted(undisturbed)  # one ok record per row over both runs


def test_local_output_that_cannot_be_written(tmp_path):
    """A local output root whose ``images`` is a regular file (root ignores chmod, so this is the
    portable 'cannot write here'): write_failed rows that name the object and the cause, no ok."""
    from step1x_batch.models.base import ModelSpec
    from step1x_batch.job.stages import ROW_SCHEMA, WriteSettings, write_outputs

    out = tmp_path / "out"
    out.mkdir()
    (out / "images").write_text("not a folder")
    img = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    rows = [{"id": f"w{i}", "fingerprint": f"f{i}", "image_uri": "x.png", "instruction": "edit", "seed": i,
             "num_steps": 1, "guidance_scale": 1.0, "size_level": 64, "negative_prompt": "",
             "output_key": f"images/w{i}.png", "pixels": img.tobytes(), "pix_h": 4, "pix_w": 5, "attempt": 1,
             "input_widths": [5], "input_heights": [4]}
            for i in range(3)]
    rows.append({**rows[0], "id": "elsewhere", "output_key": "fine/elsewhere.png"})
    settings = WriteSettings(str(out), None, "png", 95, "seeded", "local", ModelSpec("null"))
    recs = write_outputs(pa.Table.from_pylist(rows, schema=ROW_SCHEMA), settings=settings).to_pylist()
    for r in recs[:3]:
        assert (r["status"], r["error_type"], r["output_uri"]) == ("error", errors.WRITE_FAILED, None)
        assert f"{out}/images/{r['id']}.png" in r["error_message"]
        assert "File exists" in r["error_message"] or "Not a directory" in r["error_message"], r["error_message"]
    assert recs[3]["status"] == "ok" and Path(recs[3]["output_uri"]).read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in out.rglob("*")) == ["elsewhere.png", "fine", "images"]  # no temp files left
