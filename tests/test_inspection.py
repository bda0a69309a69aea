"""``step1x-batch status`` / ``errors`` (run inspection without Ray) and ``run --retry-errors``.

One real job (local Ray, moto S3, the ``null`` family) with ok rows and error rows of three types
(missing_object, empty_instruction, corrupt_image) is shared by the module. The ``--retry-errors``
run works on a copy of its output root, so every other test sees the first run's root as it was.
Expected numbers come from the row log itself (``rowlog.read_logs``), not from the code under test.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from conftest import free_port, make_bucket
from step1x_batch.cli import main
from step1x_batch.job.inspection import (
    INTERRUPTED,
    RUNNING,
    SUCCEEDED,
    error_rows,
    format_status,
    read_lease,
    root_status,
)
from step1x_batch.rows.log import part_uri, read_logs, write_log_part
from step1x_batch.rows.state import latest_per_id
from step1x_batch.io.storage import StorageOptions, filesystem, write_bytes

OK_ROWS = [
    {"image_uri": "a.png", "instruction": "make it red"},
    {"image_uri": "b.png", "instruction": "make it blue"},
    {"image_uri": "c.png", "instruction": "make it green"},
    {"image_uri": "a.png", "instruction": "add a hat"},
]
MISSING_ROWS = [
    {"image_uri": "gone-1.png", "instruction": "brighten"},
    {"image_uri": "gone-2.png", "instruction": "darken"},
]
EMPTY_ROWS = [{"image_uri": "b.png", "instruction": "   "}]
CORRUPT_ROWS = [{"image_uri": "bad.png", "instruction": "fix it"}]
ROWS = OK_ROWS + MISSING_ROWS + EMPTY_ROWS + CORRUPT_ROWS
EXPECTED_ERRORS = {"missing_object": 2, "empty_instruction": 1, "corrupt_image": 1}
RUN1, RUN2 = "20250101T000000Z-r1", "20250102T000000Z-r2"


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _config(manifest: str, output: str, run_id: str) -> dict:
    return {
        "input": {"manifest": manifest},
        "output": {"uri": output},
        "model": {"family": "null"},
        "resources": {"edit_batch_size": 4, "io_batch_size": 4},
        "runtime": {"progress_bars": False, "log_part_rows": 100, "max_error_fraction": 1.0,
                    "run_id": run_id},
    }


def _records(output: str, options: StorageOptions) -> list[dict]:
    return read_logs(output, options).to_pylist()


def _latest(recs: list[dict]) -> dict[str, dict]:
    """id -> its latest record, computed here independently of the code under test."""
    out: dict[str, dict] = {}
    for r in sorted(recs, key=lambda r: r["finished_at"]):
        out[r["id"]] = r
    return out


@pytest.fixture(scope="module")
def job(ray_local, s3_server, tmp_path_factory, image_factory) -> dict:
    """One finished run on S3: 4 ok rows and 4 error rows of three types."""
    from step1x_batch.job.runner import run_job
    from step1x_batch.job.config import parse_config

    options = StorageOptions(endpoint_url=s3_server, max_attempts=3)
    bucket = make_bucket(s3_server)
    inputs, output = f"{bucket}/in", f"{bucket}/out"
    for name, (w, h) in {"a.png": (24, 16), "b.png": (20, 20), "c.png": (16, 28)}.items():
        write_bytes(f"{inputs}/{name}", image_factory.bytes(width=w, height=h), options)
    png = image_factory.bytes(width=24, height=16)
    write_bytes(f"{inputs}/bad.png", png[:16] + b"\xff" * 8 + png[24:], options)  # IHDR size broken
    manifest = f"{inputs}/m.jsonl"
    write_bytes(manifest, _jsonl(ROWS), options)
    raw = _config(manifest, output, RUN1)
    summary = run_job(parse_config(raw))
    assert summary.rows_processed == len(ROWS)
    assert summary.by_error_type == EXPECTED_ERRORS, summary.by_error_type
    recs = _records(output, options)
    assert len(recs) == len(ROWS)
    return {"bucket": bucket, "inputs": inputs, "output": output, "manifest": manifest,
            "options": options, "raw": raw, "records": recs, "endpoint": s3_server,
            "tmp": tmp_path_factory.mktemp("inspection")}


def _ids_of(recs: list[dict], error_type: str | None = None, status: str | None = None) -> set[str]:
    return {r["id"] for r in recs
            if (error_type is None or r["error_type"] == error_type) and (status is None or r["status"] == status)}


# --------------------------------------------------------------------------------------------
# status


def test_status_counts_of_a_finished_run(job, capsys):
    st = root_status(job["output"], job["options"])
    recs = job["records"]
    assert [r.run_id for r in st.runs] == [RUN1]
    run = st.runs[0]
    assert run.state == SUCCEEDED and st.last_run is run
    assert (run.records, run.ok, run.error) == (8, 4, 4)
    assert run.by_error_type == EXPECTED_ERRORS
    assert run.has_config and run.has_summary
    assert run.started_at is not None and run.ended_at is not None and run.started_at <= run.ended_at
    assert st.done == len(_ids_of(recs, status="ok")) == 4
    assert st.error_rows_by_type == EXPECTED_ERRORS and st.error_rows == 4
    assert st.rows == len({r["id"] for r in recs}) and st.records == 8
    assert st.lease is None and st.manifest is None

    assert main(["status", job["output"], "--endpoint-url", job["endpoint"]]) == 0
    out = capsys.readouterr().out
    assert f"last run     {RUN1}: succeeded" in out
    assert "done    4" in out
    assert "errors  4  (missing_object 2, corrupt_image 1, empty_instruction 1" in out
    assert "lease        none" in out
    run_line = next(line for line in out.splitlines() if line.strip().startswith(RUN1))
    assert run_line.split()[1:4] == ["succeeded", "4", "4"], run_line


def test_status_with_a_manifest_counts_never_attempted_and_changed_rows(job, capsys):
    from step1x_batch.io.storage import write_bytes

    recs = job["records"]
    # The manifest grew two rows after the run, and one done row's image got a new version marker.
    changed_row = dict(OK_ROWS[2], image_etag="v2")
    new_rows = [{"image_uri": "c.png", "instruction": "new edit one"},
                {"image_uri": "a.png", "instruction": "new edit two"}]
    grown = OK_ROWS[:2] + [changed_row] + OK_ROWS[3:] + MISSING_ROWS + EMPTY_ROWS + CORRUPT_ROWS + new_rows
    manifest2 = f"{job['inputs']}/m2.jsonl"
    write_bytes(manifest2, _jsonl(grown), job["options"])

    # The unchanged manifest: nothing to do, nothing changed.
    same = root_status(job["output"], job["options"], manifest_uri=job["manifest"]).manifest
    assert same is not None and same.config_run_id == RUN1
    assert (same.rows, same.ids, same.done, same.error) == (8, 8, 4, 4)
    assert same.never_attempted == [] and same.changed == []

    m = root_status(job["output"], job["options"], manifest_uri=manifest2).manifest
    assert m.rows == 10 and m.ids == 10
    assert len(m.never_attempted) == 2 and not set(m.never_attempted) & {r["id"] for r in recs}
    changed_id = next(r["id"] for r in recs if r["instruction"] == "make it green")
    assert m.changed == [changed_id]
    assert m.done == 3 and m.error == 4  # error rows (some with no fingerprint) are not "changed"

    assert main(["status", job["output"], "--manifest", manifest2]) == 0
    out = capsys.readouterr().out
    assert "never attempted  2" in out and f"changed since    1  ({changed_id})" in out
    assert all(i in out for i in m.never_attempted)


def _interrupted_root(root: Path, summary_status: str | None) -> str:
    """A root with a finished first run and a second run that has a config.yaml and a log part,
    and a summary.json only when ``summary_status`` is given."""
    out = str(root)
    write_bytes(f"{out}/runs/r1/config.yaml", b"runtime: {run_id: r1}\n")
    write_bytes(f"{out}/runs/r1/summary.json", json.dumps({"status": "succeeded", "ok": True}).encode())
    t = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
    write_log_part({"id": ["x1", "x2"], "fingerprint": ["f1", "f2"], "status": ["ok", "error"],
                    "error_type": [None, "missing_object"], "run_id": ["r1", "r1"],
                    "finished_at": [t, t]}, part_uri(out, "r1", 0))
    write_bytes(f"{out}/runs/r2/config.yaml", b"runtime: {run_id: r2}\n")
    write_log_part({"id": ["x2", "x3"], "fingerprint": ["f2", "f3"], "status": ["ok", "error"],
                    "error_type": [None, "corrupt_image"], "run_id": ["r2", "r2"],
                    "finished_at": [t + dt.timedelta(hours=1)] * 2}, part_uri(out, "r2", 0))
    if summary_status:
        write_bytes(f"{out}/runs/r2/summary.json", json.dumps({"status": summary_status}).encode())
    return out


def _lease(out: str, run_id: str, renewed_ago_s: float, ttl_s: float = 300.0) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    doc = {"run_id": run_id, "host": "node-7", "pid": 4242, "job": "edit",
           "started_at": (now - dt.timedelta(hours=1)).isoformat(timespec="seconds"),
           "renewed_at": (now - dt.timedelta(seconds=renewed_ago_s)).isoformat(timespec="seconds"),
           "ttl_s": ttl_s, "token": "abc"}
    write_bytes(f"{out}/_lease.json", json.dumps(doc).encode())


@pytest.mark.parametrize("case, expected", [
    ("no lease", INTERRUPTED),
    ("stale lease", INTERRUPTED),
    ("fresh lease of another run", INTERRUPTED),
    ("fresh lease", RUNNING),
    ("summary failed", "failed"),
])
def test_last_run_state(case, expected, tmp_path, capsys):
    out = _interrupted_root(tmp_path / "out", "failed" if case == "summary failed" else None)
    if case == "stale lease":
        _lease(out, "r2", renewed_ago_s=1000)
    elif case == "fresh lease":
        _lease(out, "r2", renewed_ago_s=20)
    elif case == "fresh lease of another run":
        _lease(out, "r0-other", renewed_ago_s=20)
    st = root_status(out)
    states = {r.run_id: r.state for r in st.runs}
    assert states.get("r1") == SUCCEEDED and st.last_run.run_id == "r2"
    if case == "fresh lease of another run":  # a run that holds the lease before its config.yaml
        assert states["r0-other"] == RUNNING
    assert states["r2"] == expected
    r2 = next(r for r in st.runs if r.run_id == "r2")
    assert (r2.ok, r2.error, r2.by_error_type) == (1, 1, {"corrupt_image": 1})
    # x2 was an error in r1 and ok in r2 (later): done. x3's latest is an error.
    assert st.done == 2 and st.error_rows_by_type == {"corrupt_image": 1}

    assert main(["status", out]) == 0
    text = capsys.readouterr().out
    assert f"r2: {expected}" in text
    if case == "fresh lease":
        assert st.lease.fresh and st.lease.run_id == "r2" and 15 <= st.lease.age_s < 60
        assert "held by run r2 on host node-7 (pid 4242), renewed" in text
    elif case == "stale lease":
        assert not st.lease.fresh and st.lease.age_s >= 1000
        assert "stale: run r2 on host node-7" in text
    elif case == "no lease":
        assert st.lease is None and "lease        none" in text
        assert "re-run the config" in text


def test_lease_freshness_is_now_minus_renewed_at(tmp_path):
    out = str(tmp_path)
    _lease(out, "r9", renewed_ago_s=100, ttl_s=120)
    assert read_lease(out).fresh
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=30)
    assert not read_lease(out, now=later).fresh
    write_bytes(f"{out}/_lease.json", b"{torn")
    lease = read_lease(out)
    assert lease is not None and not lease.fresh and lease.run_id is None


# --------------------------------------------------------------------------------------------
# errors


def test_errors_csv_matches_the_row_log(job, capsys):
    recs = job["records"]
    assert main(["errors", job["output"], "--format", "csv", "--endpoint-url", job["endpoint"]]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    got = {r["id"]: r["error_type"] for r in rows}
    assert got == {r["id"]: r["error_type"] for r in recs if r["status"] == "error"}
    by_id = {r["id"]: r for r in recs}
    for row in rows:  # untruncated, every useful column
        rec = by_id[row["id"]]
        assert row["error_message"] == rec["error_message"] and len(row["error_message"]) > 20
        assert row["run_id"] == RUN1 and row["instruction"] == rec["instruction"]
        assert json.loads(row["image_uris"]) == rec["image_uris"] and row["image_uri"] == rec["image_uri"]
        assert row["fingerprint"] == (rec["fingerprint"] or "")
        assert dt.datetime.fromisoformat(row["finished_at"]) == rec["finished_at"]


def test_errors_table(job, capsys):
    recs = job["records"]
    assert main(["errors", job["output"]]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["id", "error_type", "error_message", "image", "run_id"]
    errors = [r for r in recs if r["status"] == "error"]
    for rec in errors:
        line = next(line for line in lines if line.startswith(rec["id"]))
        assert rec["error_type"] in line and line.rstrip().endswith(RUN1)
        if rec["error_type"] == "missing_object":
            assert len(rec["error_message"]) > 70 and rec["error_message"] not in line
            assert rec["error_message"][:40] in line and "..." in line  # shortened, start kept
            assert Path(rec["image_uri"]).name in line  # the image's name survives shortening
    assert not any(r["id"] in out for r in recs if r["status"] == "ok")
    assert "4 error rows (missing_object 2, corrupt_image 1, empty_instruction 1)" in out
    # aligned: the error_type column starts at the same place on every line
    starts = {line.index(t) for line in lines[1:5] for t in EXPECTED_ERRORS if f" {t} " in line}
    assert len(starts) == 1


@pytest.mark.parametrize("args, types", [
    (["--type", "missing_object"], {"missing_object"}),
    (["--type", "missing_object,corrupt_image"], {"missing_object", "corrupt_image"}),
    (["--type", "empty_instruction", "--type", "corrupt_image"], {"empty_instruction", "corrupt_image"}),
    (["--type", "too_many_pixels"], set()),
])
def test_errors_type_filter(job, args, types, capsys):
    recs = job["records"]
    want = {r["id"] for r in recs if r["status"] == "error" and r["error_type"] in types}
    assert main(["errors", job["output"], "--format", "csv", *args]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {r["id"] for r in rows} == want and len(rows) == len(want)
    asked = [t for value in args[1::2] for t in value.split(",")]
    table = error_rows(job["output"], job["options"], asked)
    assert set(table.column("id").to_pylist()) == want


def test_errors_unknown_type_is_exit_2(job, capsys):
    assert main(["errors", job["output"], "--type", "no_such_type"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown error type(s) no_such_type") and "Traceback" not in err


# --------------------------------------------------------------------------------------------
# --retry-errors, end to end


def test_retry_errors_redoes_only_the_named_type(job, image_factory, capsys):
    options = job["options"]
    output = f"{job['bucket']}/out-retry"
    fs, src = filesystem(job["output"], options)
    fs.copy(src, filesystem(output, options)[1], recursive=True)  # the first run's root, untouched
    for row in MISSING_ROWS:  # the missing images are uploaded after all
        write_bytes(f"{job['inputs']}/{row['image_uri']}", image_factory.bytes(width=18, height=14), options)
    raw = _config(job["manifest"], output, RUN2)
    cfg_path = job["tmp"] / "retry.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))

    assert main(["run", str(cfg_path), "--retry-errors", "missing_object"]) == 0
    capsys.readouterr()

    before = job["records"]
    missing_ids = _ids_of(before, "missing_object")
    other_error_ids = _ids_of(before, "empty_instruction") | _ids_of(before, "corrupt_image")
    after = _records(output, options)
    new = [r for r in after if r["run_id"] == RUN2]
    assert {r["id"] for r in new} == missing_ids  # only the missing rows were redone
    assert all(r["status"] == "ok" and r["attempt"] == 2 for r in new)
    latest = _latest(after)
    assert all(latest[i]["status"] == "ok" for i in missing_ids)
    assert Counter(r["id"] for r in after if r["id"] in other_error_ids) == {i: 1 for i in other_error_ids}
    # the code under test agrees
    assert {r["id"]: r["status"] for r in latest_per_id(read_logs(output, options)).to_pylist()} == {
        i: r["status"] for i, r in latest.items()}

    st = root_status(output, options)
    assert [(r.run_id, r.state, r.ok, r.error) for r in st.runs] == [(RUN1, SUCCEEDED, 4, 4), (RUN2, SUCCEEDED, 2, 0)]
    assert st.done == 6 and st.error_rows_by_type == {"corrupt_image": 1, "empty_instruction": 1}
    text = format_status(st)
    assert f"last run     {RUN2}: succeeded" in text and f"  {RUN1}  succeeded" in text
    assert main(["errors", output, "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {r["id"] for r in rows} == other_error_ids
    assert main(["errors", output, "--type", "missing_object"]) == 0
    assert capsys.readouterr().out == "no error rows\n"


# --------------------------------------------------------------------------------------------
# one-sentence failures


def _fails(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert captured.out == "" and err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def test_failures_are_one_sentence_and_exit_2(s3_server, tmp_path, capsys, monkeypatch):
    err = _fails(["status", str(tmp_path / "nowhere")], capsys)
    assert "no output root at" in err and "nowhere" in err
    err = _fails(["errors", str(tmp_path / "nowhere")], capsys)
    assert "no output root at" in err

    (tmp_path / "empty").mkdir()
    err = _fails(["status", str(tmp_path / "empty")], capsys)
    assert "no runs under" in err and "empty" in err

    bucket = make_bucket(s3_server)
    write_bytes(f"{bucket}/other/readme.txt", b"not a job")
    err = _fails(["status", f"{bucket}/other"], capsys)
    assert "no runs under" in err
    err = _fails(["status", f"{bucket}/missing-prefix"], capsys)
    assert "no output root at" in err
    err = _fails(["status", "s3://no-such-bucket-1f2e3d/out"], capsys)
    assert "no output root at" in err

    port = free_port()  # nothing listens there: the endpoint refuses
    err = _fails(["status", f"{bucket}/other", "--endpoint-url", f"http://127.0.0.1:{port}"], capsys)
    assert "could not list" in err and f"127.0.0.1:{port}" in err and "--endpoint-url" in err

    # credentials never printed: neither from a URI nor from the environment
    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    err = _fails(["status", f"{tmp_path}/user:{secret}@host/out"], capsys)
    assert secret not in err
    err = _fails(["status", f"s3://AKIAIOSFODNN7EXAMPLE:{secret}@bucket/out"], capsys)
    assert secret not in err and "AKIAIOSFODNN7EXAMPLE" not in err


def test_manifest_problems_are_exit_2(job, tmp_path, capsys):
    err = _fails(["status", job["output"], "--manifest", f"{job['inputs']}/none.jsonl"], capsys)
    assert "none.jsonl" in err
    # a root whose runs left no config snapshot cannot give the defaults for fingerprints
    out = str(tmp_path / "out")
    write_log_part({"id": ["x"], "status": ["ok"], "run_id": ["r1"]}, part_uri(out, "r1", 0))
    err = _fails(["status", out, "--manifest", job["manifest"]], capsys)
    assert "config.yaml" in err
