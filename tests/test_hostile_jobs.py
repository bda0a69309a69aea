"""Hostile input and a vanished lease through whole jobs on a real local Ray (issue 18).

* a manifest of every kind of bad row (mixed JSON types, nested lists, a broken line, /dev/zero,
  a FIFO, a 1 GB sparse file, a folder, a symlink loop, an unknown protocol, a NUL byte, a bad
  bucket name, parameters past the caps, output keys naming the job's own objects, a repeated
  id) beside good rows: one record per row, good rows ok, each bad row its typed error, the
  job's own objects intact, and a re-run redoes nothing (the errors are final);
* the lease deleted mid-run on the S3 server: the run stops saying so, a second run then holds
  the only lease, one record per id;
* a row added under an id that is already done: the re-run's skip join calls it a duplicate and
  the first row's output is untouched;
* a worker killed by one row in every attempt: the job ends (bounded retries), never loops.
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from step1x_batch import errors
from step1x_batch.job import lease as leases
from step1x_batch.job.config import parse_config
from step1x_batch.rows.log import read_logs
from step1x_batch.io.storage import filesystem, read_bytes


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _config(manifest_uri: str, output_uri: str, **sections) -> dict:
    raw = {
        "input": {"manifest": manifest_uri},
        "output": {"uri": output_uri},
        "model": {"family": "job_plugins:Seeded", "model_id": "seeded"},
        "resources": {"edit_batch_size": 4, "io_batch_size": 4},
        "runtime": {"progress_bars": False, "log_part_rows": 4, "max_error_fraction": 1.0},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def _run(raw: dict):
    from step1x_batch.job.runner import run_job

    return run_job(parse_config(raw))


def _write_manifest(path: Path, rows: list, tail: str = "") -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows) + tail)
    return str(path)


@pytest.fixture
def pictures(tmp_path, image_factory) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for k in range(4):
        (folder / f"p{k}.png").write_bytes(_png(image_factory.rgb(16 + 4 * k, 16 + 2 * k)))
    return folder


def test_every_kind_of_bad_row_is_one_typed_error_row_beside_good_rows(ray_local, pictures, tmp_path):
    folder = pictures
    (folder / "a-folder.png").mkdir()
    os.symlink(folder / "loop.png", folder / "loop.png")
    os.mkfifo(folder / "pipe.png")
    with open(folder / "sparse.png", "wb") as f:
        f.truncate(1 << 30)  # 1 GB: over the limit below by its size, nothing read
    good = [{"id": f"g{i}", "image_uri": f"p{i % 4}.png", "instruction": f"edit {i}",
             "seed": 7 if i % 2 else "7"} for i in range(6)]
    good.append({"id": 100, "image_uri": "p1.png", "instruction": "numeric id", "num_steps": 3.0})
    bad = {
        "b-devzero": ({"image_uri": "/dev/zero"}, errors.NOT_A_FILE),
        "b-fifo": ({"image_uri": "pipe.png"}, errors.NOT_A_FILE),
        "b-sparse": ({"image_uri": "sparse.png"}, errors.IMAGE_TOO_LARGE),
        "b-folder": ({"image_uri": "a-folder.png"}, errors.NOT_A_FILE),
        "b-loop": ({"image_uri": "loop.png"}, errors.NOT_A_FILE),
        "b-proto": ({"image_uri": "nosuchproto://bucket/x.png"}, errors.INVALID_URI),
        "b-nul": ({"image_uri": "p\u00000.png"}, errors.INVALID_URI),
        "b-bucket": ({"image_uri": "s3://bad_bucket!/x.png"}, errors.INVALID_URI),
        "b-size": ({"image_uri": "p0.png", "size_level": 1_048_575}, errors.INVALID_ROW),
        "b-steps": ({"image_uri": "p0.png", "num_steps": "10000"}, errors.INVALID_ROW),
        "b-nested": ({"image_uris": [["p0.png"]]}, errors.INVALID_ROW),
        "b-lease": ({"image_uri": "p0.png", "output_key": "_lease.json"}, errors.UNSAFE_OUTPUT_KEY),
        "b-state": ({"image_uri": "p0.png", "output_key": "state/CURRENT.json"}, errors.UNSAFE_OUTPUT_KEY),
        "g0": ({"image_uri": "p3.png", "instruction": "another row, the same id"}, errors.DUPLICATE_ROW),
    }
    rows = good + [{"id": i, "instruction": "x", **fields} for i, (fields, _) in bad.items()]
    manifest = _write_manifest(folder / "m.jsonl", rows, tail='not json at all\n')
    out = str(tmp_path / "out")
    raw = _config(manifest, out, input={"max_image_bytes": 10 << 20}, runtime={"run_id": "first"})
    summary = _run(raw)
    records = read_logs(out).to_pylist()
    assert len(records) == len(rows) + 1  # every line one record, the broken line too
    per_id = Counter(r["id"] for r in records)
    assert per_id["g0"] == 2 and all(n == 1 for i, n in per_id.items() if i != "g0")
    ok = {r["id"] for r in records if r["status"] == "ok"}
    assert ok == {f"g{i}" for i in range(6)} | {"100"}
    types = {r["id"]: r["error_type"] for r in records if r["status"] == "error"}
    for row_id, (_, code) in bad.items():
        assert types[row_id] == code, (row_id, [r["error_message"] for r in records if r["id"] == row_id])
    broken = [r for r in records if r["error_type"] == errors.INVALID_ROW and "not valid JSON" in r["error_message"]]
    assert len(broken) == 1 and f"line {len(rows) + 1} of" in broken[0]["error_message"]
    assert summary.by_status == {"ok": 7, "error": len(bad) + 1}
    # the job's own objects are the job's: the state pointer is JSON, no lease is left behind
    json.loads(read_bytes(os.path.join(out, "state/CURRENT.json")))
    assert not os.path.exists(os.path.join(out, "_lease.json"))
    # a re-run redoes nothing: every error above is final (the repeated id may be reported again)
    again = _run({**raw, "runtime": {**raw["runtime"], "run_id": "second"}})
    assert again.by_status.get("ok", 0) == 0
    assert set(again.by_error_type) <= {errors.DUPLICATE_ROW}


def test_a_lease_deleted_mid_run_stops_the_run_and_a_second_run_holds_the_only_lease(
        ray_local, pictures, tmp_path, s3_bucket, storage_options, monkeypatch):
    n = 16
    rows = [{"id": f"r{i:02d}", "image_uri": f"p{i % 4}.png", "instruction": f"edit {i}"} for i in range(n)]
    manifest = _write_manifest(pictures / "m.jsonl", rows)
    out = f"{s3_bucket}/out"
    release = tmp_path / "release"
    raw = _config(manifest, out, output={"storage": storage_options.model_dump()},
                  model={"family": "hostile_plugins:LeaseDeleter", "model_id": "seeded",
                         "options": {"lease_uri": leases.lease_uri(out), "release_file": str(release)}},
                  runtime={"run_id": "first", "lease_ttl_s": 3, "max_error_fraction": 0.0})
    failure: list[BaseException] = []
    taken: list[leases.Lease] = []  # the leases runs take, seen as the driver holds them
    take = leases.acquire

    def acquire_and_keep(*args, **kwargs):
        taken.append(take(*args, **kwargs))
        return taken[-1]

    monkeypatch.setattr(leases, "acquire", acquire_and_keep)

    def first_run() -> None:
        try:
            _run(raw)
        except BaseException as e:  # noqa: BLE001
            failure.append(e)

    runner = threading.Thread(target=first_run)
    runner.start()
    while not taken and runner.is_alive():
        time.sleep(0.05)
    assert taken
    held = taken[0]
    assert held.lost.wait(timeout=120)  # the renewal after the deletion (every ttl / 3)
    release.write_text("")  # the held batch may go on now: its records must not be written
    runner.join(timeout=300)
    assert not runner.is_alive()
    assert failure and isinstance(failure[0], leases.LeaseLost), failure
    message = str(failure[0])
    assert "deleted while this run held it" in message and "took the output root over" not in message
    first = read_logs(out, storage_options).to_pylist()
    assert len(first) < n and len({r["id"] for r in first}) == len(first)
    assert leases.read_holder(out, storage_options) is None  # nobody holds it now

    summary = _run({**raw, "model": {"family": "job_plugins:Seeded", "model_id": "seeded"},
                    "runtime": {**raw["runtime"], "run_id": "second"}})
    assert summary.ok and not any("took over" in note for note in summary.notes)
    records = read_logs(out, storage_options).to_pylist()
    assert Counter(r["id"] for r in records) == {f"r{i:02d}": 1 for i in range(n)}  # one record per id
    assert {r["status"] for r in records} == {"ok"}


def test_a_row_added_under_a_done_id_is_a_duplicate_in_the_rerun(ray_local, pictures, tmp_path):
    first = [{"id": f"k{i}", "image_uri": f"p{i}.png", "instruction": "edit"} for i in range(3)]
    manifest = pictures / "m.jsonl"
    out = str(tmp_path / "out")
    raw = _config(_write_manifest(manifest, first), out, runtime={"run_id": "one"})
    assert _run(raw).by_status == {"ok": 3}
    fs, root = filesystem(out)
    before = {p: fs.cat_file(p) for p in fs.find(root + "/images")}
    # the same id for another picture, in a later batch of a resumed run: the skip join sees it
    _write_manifest(manifest, first + [{"id": "k1", "image_uri": "p3.png", "instruction": "edit"}])
    again = _run({**raw, "runtime": {**raw["runtime"], "run_id": "two"}})
    assert again.by_status == {"error": 1} and again.by_error_type == {errors.DUPLICATE_ROW: 1}
    records = [r for r in read_logs(out).to_pylist() if r["run_id"] == "two"]
    assert "p1.png" in records[0]["error_message"]  # names the first row
    assert {p: fs.cat_file(p) for p in fs.find(root + "/images")} == before  # k1's output untouched


def test_a_row_that_kills_its_worker_every_time_ends_the_job_instead_of_looping(ray_local, pictures, tmp_path):
    attempts = tmp_path / "attempts.txt"
    rows = [{"id": "ok", "image_uri": "p0.png", "instruction": "fine"},
            {"id": "bad", "image_uri": "p1.png", "instruction": "poison"}]
    raw = _config(_write_manifest(pictures / "m.jsonl", rows), str(tmp_path / "out"),
                  model={"family": "hostile_plugins:PoisonedPrepare", "model_id": "seeded",
                         "options": {"attempts_file": str(attempts)}},
                  resources={"task_max_retries": 1, "io_batch_size": 1},
                  runtime={"run_id": "poisoned"})
    failure: list[BaseException] = []

    def run() -> None:
        try:
            _run(raw)
        except BaseException as e:  # noqa: BLE001
            failure.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    # Without a bound Ray re-runs the task without end: wait for the job to end, or for more
    # attempts than the bound allows (then fail at once), whichever comes first.
    while t.is_alive() and (len(attempts.read_text().splitlines()) if attempts.exists() else 0) <= 2:
        t.join(timeout=0.2)
    assert not t.is_alive() or (attempts.exists() and len(attempts.read_text().splitlines()) <= 2), \
        "the poisoned row was attempted more often than resources.task_max_retries allows"
    t.join(timeout=300)
    assert failure, "the job must stop (a worker died on every attempt)"
    assert len(attempts.read_text().splitlines()) == 2  # the first try and one retry
