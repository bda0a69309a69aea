"""The dataset job end to end on real parts: a local Ray, a moto S3 server, real files.

Covers the issue's done-when (1,000 rows on S3 with 100 bad rows of every kind -> exactly 1,000
records, then a second run processes nothing), the convertible inputs, resume and parameter-change
redo, a driver SIGKILLed mid-run and re-run, the error budget, the edit stage's handling of engine
failures, and the tiny Step1X model from an S3 manifest to S3 outputs.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import expire_local_lease
from step1x_batch import errors
from step1x_batch.job.config import parse_config
from step1x_batch.models.base import EditOutput, EditRequest, ModelFamily, Prepared
from step1x_batch.io.images import decode_image
from step1x_batch.rows.log import LOG_SCHEMA, read_logs
from step1x_batch.io.storage import filesystem, read_bytes, write_bytes

ROOT = Path(__file__).resolve().parents[1]



def _config(manifest: str, output: str, **sections) -> dict:
    raw = {
        "input": {"manifest": manifest},
        "output": {"uri": output},
        "model": {"family": "null"},
        "resources": {"edit_batch_size": 16, "io_batch_size": 50},
        "runtime": {"progress_bars": False, "log_part_rows": 200, "max_error_fraction": 0.2},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def _run(raw: dict):
    from step1x_batch.job.runner import run_job

    return run_job(parse_config(raw))


def _put(uri: str, data: bytes) -> None:
    write_bytes(uri, data)


def _png(image: np.ndarray | Image.Image, **kw) -> bytes:
    im = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    buf = io.BytesIO()
    im.save(buf, format=kw.pop("format", "PNG"), **kw)
    return buf.getvalue()


def _write_manifest(uri: str, rows: list[dict]) -> None:
    if uri.endswith(".parquet"):
        table = pa.Table.from_pylist(rows)
        buf = io.BytesIO()
        pq.write_table(table, buf)
        _put(uri, buf.getvalue())
    elif uri.endswith(".jsonl"):
        _put(uri, "".join(json.dumps(r) + "\n" for r in rows).encode())
    else:
        import csv

        cols = sorted({k for r in rows for k in r})
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
        _put(uri, buf.getvalue().encode())


def _upright_corners_ok(image: np.ndarray, tol: int = 40) -> bool:
    """draw_rgb's corners: top-left red, top-right green, bottom-left blue, bottom-right white."""
    want = {(0, 0): (255, 0, 0), (0, -1): (0, 255, 0), (-1, 0): (0, 0, 255), (-1, -1): (255, 255, 255)}
    h, w = image.shape[:2]
    for (y, x), rgb in want.items():
        px = image[(2 if y == 0 else h - 3), (2 if x == 0 else w - 3)].astype(int)
        if np.abs(px - np.array(rgb)).max() > tol:
            return False
    return True


# --------------------------------------------------------------------------------------------
# The done-when: 1,000 rows on S3, 100 bad ones, then a second run that processes nothing.

BAD_KINDS = {
    errors.MISSING_OBJECT: 10,
    errors.EMPTY_OBJECT: 10,
    errors.CORRUPT_IMAGE: 10,
    errors.TRUNCATED_IMAGE: 10,
    errors.UNSUPPORTED_FORMAT: 10,
    errors.TOO_MANY_PIXELS: 10,
    errors.EMPTY_INSTRUCTION: 10,
    errors.INSTRUCTION_TOO_LONG: 10,
    errors.UNSAFE_OUTPUT_KEY: 10,
    errors.NON_FINITE_OUTPUT: 10,  # the model stand-in overflows on these rows
}
assert sum(BAD_KINDS.values()) == 100


def _s3_dataset(bucket: str, image_factory) -> tuple[str, dict[str, str]]:
    """Upload the inputs and a 1,000-row Parquet manifest; returns (manifest uri, special ids)."""
    f = image_factory
    good = {
        "rgb.png": f.bytes("RGB", "PNG"),
        "rgb_big.png": f.bytes("RGB", "PNG", 64, 40),
        "photo.jpg": f.bytes("RGB", "JPEG", quality=95),
        "cmyk.jpg": f.bytes("CMYK", "JPEG", quality=95),
        "i16.png": f.bytes("I;16", "PNG"),
        "palette.png": f.bytes("P", "PNG"),
        "grey.png": f.bytes("L", "PNG"),
        "grey_alpha.png": f.bytes("LA", "PNG"),
        "alpha.png": f.bytes("RGBA", "PNG"),
        "exif6.jpg": f.exif_rotated(6),
        "exif3.jpg": f.exif_rotated(3),
        "anim.gif": f.animated_gif(),
        "pic.webp": f.bytes("RGB", "WEBP", lossless=True),
        "pic.bmp": f.bytes("RGB", "BMP"),
    }
    png = f.bytes("RGB", "PNG")
    bad = {
        "empty.png": b"",
        "corrupt.png": png[:16] + b"\xff" * 8 + png[24:],
        "truncated.png": png[: len(png) // 2],
        "doc.pdf": b"%PDF-1.4\n" + bytes(200),
        "bomb.png": f.bomb_png(),
    }
    for name, data in {**good, **bad}.items():
        _put(f"{bucket}/in/{name}", data)
    rows: list[dict] = []
    names = sorted(good)
    special = {}
    for i in range(900):
        name = names[i % len(names)]
        row = {"id": f"ok-{i:04d}", "image_uri": name, "instruction": f"edit number {i}", "shard": i % 7}
        if i < len(names):
            special[name] = row["id"]
        rows.append(row)
    kinds = []
    for code, n in BAD_KINDS.items():
        kinds += [code] * n
    for j, code in enumerate(kinds):
        row = {"id": f"bad-{j:03d}", "image_uri": "rgb.png", "instruction": "make it blue", "shard": -1}
        if code == errors.MISSING_OBJECT:
            row["image_uri"] = f"nope/missing-{j}.png"
        elif code == errors.EMPTY_OBJECT:
            row["image_uri"] = "empty.png"
        elif code == errors.CORRUPT_IMAGE:
            row["image_uri"] = "corrupt.png"
        elif code == errors.TRUNCATED_IMAGE:
            row["image_uri"] = "truncated.png"
        elif code == errors.UNSUPPORTED_FORMAT:
            row["image_uri"] = "doc.pdf"
        elif code == errors.TOO_MANY_PIXELS:
            row["image_uri"] = "bomb.png"
        elif code == errors.EMPTY_INSTRUCTION:
            row["instruction"] = " \t " if j % 2 else ""
        elif code == errors.INSTRUCTION_TOO_LONG:
            row["instruction"] = "make it bluer " * 30  # 420 chars > 200
        elif code == errors.UNSAFE_OUTPUT_KEY:
            row["output_key"] = ["../escape.png", "/abs/x.png", "s3://other/x.png", "a/../../x.png"][j % 4]
        elif code == errors.NON_FINITE_OUTPUT:
            row["instruction"] = "nan: make it glow"
        row["expect"] = code
        rows.append(row)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(rows))  # interleave bad rows with good ones
    rows = [rows[k] for k in order]
    for r in rows:
        r.setdefault("output_key", None)
        r.setdefault("expect", None)
    manifest = f"{bucket}/in/edits.parquet"  # image paths are relative to its folder
    _write_manifest(manifest, rows)
    return manifest, special


@pytest.mark.slow
def test_thousand_rows_on_s3_then_nothing_left(ray_local, s3_bucket, image_factory):
    manifest, special = _s3_dataset(s3_bucket, image_factory)
    out = f"{s3_bucket}/out"
    # The model stand-in (a plug-in family, prepared in CPU tasks and loaded in each actor like the
    # real ones) returns 255 - input, and reports non_finite_output for "nan" rows as Step1X does.
    raw = _config(manifest, out, model={"family": "test_job_e2e:NonFiniteEditor", "model_id": "fake"},
                  runtime={"max_instruction_chars": 200, "run_id": "first", "log_part_rows": 300})
    summary = _run(raw)
    assert summary.ok
    assert summary.rows_processed == 1000 and summary.rows_skipped == 0
    logs = read_logs(out)
    assert logs.num_rows == 1000
    assert logs.schema.equals(LOG_SCHEMA)
    recs = logs.to_pylist()
    assert len({r["id"] for r in recs}) == 1000
    by_status = Counter(r["status"] for r in recs)
    assert by_status == {"ok": 900, "error": 100}
    assert Counter(r["error_type"] for r in recs if r["status"] == "error") == BAD_KINDS
    # every bad row has the code it was built for, and a message a person can act on
    expected = {row["id"]: row["expect"] for row in pq.read_table(io.BytesIO(read_bytes(manifest))).to_pylist()}
    for r in recs:
        assert r["error_type"] == expected[r["id"]], r
        if r["status"] == "error":
            assert r["output_uri"] is None and len(r["error_message"]) > 20
        else:
            assert r["output_uri"] == f"{out}/images/{r['id']}.png"
            assert r["run_id"] == "first" and r["attempt"] == 1 and r["model_id"] == "fake"
            assert json.loads(r["extra"])["shard"] in range(7)
    fs, root = filesystem(f"{out}/images")
    assert len(fs.find(root)) == 900
    # the convertible inputs all succeeded; the stand-in returns 255 - the decoded input, so the
    # outputs show the conversion: upright (EXIF), first GIF frame, alpha on white
    ok_ids = {r["id"] for r in recs if r["status"] == "ok"}
    assert set(special.values()) <= ok_ids
    for name in ("exif6.jpg", "exif3.jpg", "anim.gif", "rgb.png", "cmyk.jpg"):
        img = 255 - decode_image(read_bytes(f"{out}/images/{special[name]}.png"), 10**6)
        assert img.shape == (32, 48, 3), name
        assert _upright_corners_ok(img), name
    alpha = 255 - decode_image(read_bytes(f"{out}/images/{special['alpha.png']}.png"), 10**6)
    assert (alpha[:, :20] == 255).all()  # transparent left half composited on white
    assert decode_image(read_bytes(f"{out}/images/{special['i16.png']}.png"), 10**6).shape == (32, 48, 3)
    summary_json = json.loads(read_bytes(summary.paths["summary"]))
    assert summary_json["by_status"] == {"ok": 900, "error": 100}
    assert summary_json["by_error_type"] == dict(sorted(BAD_KINDS.items()))
    assert summary_json["status"] == "succeeded" and summary_json["rows_per_s"] > 0
    assert set(summary_json["stage_ms"]) == {"normalise", "preprocess", "edit", "write"}
    page = read_bytes(summary.paths["report"]).decode()
    assert page.count("<tr class=\"error\"") == 60  # capped, errors first
    assert "config.yaml" in summary.paths["config"] and b"run_id: first" in read_bytes(summary.paths["config"])

    again = _run({**raw, "runtime": {**raw["runtime"], "run_id": "second"}})
    assert again.ok and again.rows_processed == 0 and again.rows_skipped == 1000
    assert read_logs(out).num_rows == 1000  # no new record
    assert again.log_parts == 0


# --------------------------------------------------------------------------------------------
# Resume rules, parameter-change redo, retries, escaping in the report.


def _local_dataset(folder: Path, image_factory, n_good: int = 10) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.png").write_bytes(image_factory.bytes("RGB", "PNG"))
    png = image_factory.bytes("RGB", "PNG")
    (folder / "corrupt.png").write_bytes(png[:16] + b"\xff" * 8 + png[24:])
    rows = [{"id": f"row{i}", "image_uri": "a.png", "instruction": f"make it number {i}", "seed": i}
            for i in range(n_good)]
    if n_good > 3:
        rows[3]["instruction"] = "<script>alert('x')</script> add a hat"
    rows.append({"id": "blank", "image_uri": "a.png", "instruction": "   ", "seed": 1})
    rows.append({"id": "broken", "image_uri": "corrupt.png", "instruction": "fix it", "seed": 1})
    _write_manifest(str(folder / "m.csv"), rows)
    return folder / "m.csv"


def test_resume_and_parameter_change_redo(ray_local, tmp_path, image_factory):
    manifest = _local_dataset(tmp_path / "in", image_factory)
    out = str(tmp_path / "out")
    raw = _config(str(manifest), out, runtime={"run_id": "r1", "log_part_rows": 5},
                  resources={"io_batch_size": 4, "edit_batch_size": 4})
    s1 = _run(raw)
    assert (s1.rows_processed, s1.by_status) == (12, {"ok": 10, "error": 2})
    assert s1.log_parts >= 2  # parts land as rows stream
    page = Path(s1.paths["report"]).read_text()
    assert "<script>alert" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    first = {r["id"]: r for r in read_logs(out, run_id="r1").to_pylist()}

    # same config again: nothing to do (final errors are not retried either)
    s2 = _run({**raw, "runtime": {**raw["runtime"], "run_id": "r2"}})
    assert (s2.rows_processed, s2.rows_skipped) == (0, 12)

    # a default that changes pixels: every row with a fingerprint is redone, in place
    raw3 = {**raw, "sampling": {"num_steps": 7}, "runtime": {**raw["runtime"], "run_id": "r3"}}
    s3 = _run(raw3)
    assert s3.rows_processed == 11 and s3.rows_skipped == 1  # the blank instruction stays settled
    third = {r["id"]: r for r in read_logs(out, run_id="r3").to_pylist()}
    assert set(third) == {i for i, r in first.items() if r["fingerprint"] is not None}
    for rid, rec in third.items():
        assert rec["num_steps"] == 7 and rec["attempt"] == 2
        assert rec["fingerprint"] != first[rid]["fingerprint"]
        if rec["status"] == "ok":
            assert rec["output_uri"] == first[rid]["output_uri"]  # same key: overwritten

    # one row's own parameter changes: only that row is redone
    rows = [dict(r) for r in __import__("csv").DictReader(open(manifest))]
    rows[5]["guidance_scale"] = "3.5"
    _write_manifest(str(manifest), rows)
    s4 = _run({**raw3, "runtime": {**raw3["runtime"], "run_id": "r4"}})
    assert s4.rows_processed == 1 and s4.rows_skipped == 11
    (rec,) = read_logs(out, run_id="r4").to_pylist()
    assert (rec["id"], rec["guidance_scale"], rec["status"], rec["attempt"]) == ("row5", 3.5, "ok", 3)

    # back to the old default: the good rows are redone (their objects hold the newer bytes), and
    # so is the corrupt row: a final error settles the fingerprint of the id's latest record only
    # (r3's), not every version that ever failed; the blank row's invalid record settles it.
    s5 = _run({**raw, "runtime": {**raw["runtime"], "run_id": "r5"}})
    assert (s5.rows_processed, s5.rows_skipped) == (11, 1)
    fifth = {r["id"]: r for r in read_logs(out, run_id="r5").to_pylist()}
    assert Counter(r["status"] for r in fifth.values()) == {"ok": 10, "error": 1}
    s6 = _run({**raw, "runtime": {**raw["runtime"], "run_id": "r6"}})  # and now it is settled
    assert (s6.rows_processed, s6.rows_skipped) == (0, 12)


def test_storage_retries_are_counted(ray_local, s3_bucket, flaky_s3, image_factory):
    _put(f"{s3_bucket}/in/a.png", image_factory.bytes("RGB", "PNG"))
    rows = [{"id": f"s{i}", "image_uri": "a.png", "instruction": "edit"} for i in range(6)]
    _write_manifest(f"{s3_bucket}/in/m.jsonl", rows)
    out = f"{s3_bucket}/out"
    raw = _config(f"{s3_bucket}/in/m.jsonl", out, runtime={"run_id": "flaky"})
    raw["output"]["storage"] = {"endpoint_url": flaky_s3.endpoint, "max_attempts": 5}
    # the config snapshot, then image writes: each retried once (the pre-flight probe and the lease
    # come before the run and are not its I/O)
    flaky_s3.fail(1, "503", method="PUT", path="/out/runs/flaky/config.yaml")
    flaky_s3.fail(2, "503", method="PUT", path="/out/images/")
    summary = _run(raw)
    assert summary.by_status == {"ok": 6}
    assert flaky_s3.injected == 3 and summary.storage_retries == 3
    assert json.loads(read_bytes(summary.paths["summary"]))["storage_retries"] == 3


def test_skip_rules_on_the_folded_state():
    from step1x_batch.rows.state import decide, fold, records_as_state, take_state

    def recs(*rows):
        cols = list(zip(*rows))
        return pa.table(
            {
                "id": list(cols[0]),
                "fingerprint": list(cols[1]),
                "status": list(cols[2]),
                "error_type": list(cols[3]),
                "finished_at": pa.array(list(cols[4]), pa.timestamp("us", tz="UTC")),
            }
        )

    part1 = recs(
        ("a", "fa1", "ok", None, 10),
        ("b", "fb", "error", "read_failed", 10),
        ("c", "fc", "error", "corrupt_image", 10),
        ("d", "fd1", "ok", None, 10),
    )
    part2 = recs(("d", "fd2", "ok", None, 20), ("a", "fa2", "error", "edit_failed", 30))
    state = fold([records_as_state(part2), records_as_state(part1)])  # read order does not matter here

    def done(pairs, retried=("read_failed", "write_failed", "edit_failed")):
        ids = pa.array([i for i, _ in pairs])
        fps = pa.array([f for _, f in pairs])
        return decide(fps, pa.nulls(len(pairs), pa.uint64()), take_state(state, ids), list(retried)).tolist()

    assert done([("a", "fa1"), ("b", "fb"), ("c", "fc"), ("d", "fd1"), ("d", "fd2")]) == [
        True,  # latest ok of a (a later transient failure with another fingerprint wrote nothing)
        False,  # transient error: retried
        True,  # final error, same fingerprint: not retried
        False,  # an older ok: the object now holds fd2's bytes
        True,
    ]
    assert done([("c", "fc-new"), ("e", "fe")]) == [False, False]
    attempts = take_state(state, pa.array(["a", "e"])).column("attempts").to_pylist()
    assert attempts == [2, None]  # e has no record: its first attempt is 1
    assert done([("c", "fc"), ("a", "fa1")], retried=["*"]) == [False, True]


def test_error_budget_fails_loudly_after_logging(ray_local, tmp_path, image_factory, capsys):
    from step1x_batch.job.runner import main

    manifest = _local_dataset(tmp_path / "in", image_factory, n_good=2)  # 2 ok, 2 error
    cfg = tmp_path / "job.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(_config(str(manifest), str(tmp_path / "out"))))
    code = main(["--config", str(cfg), "--set", "runtime.max_error_fraction=0.25", "--set", "runtime.run_id=budget"])
    assert code == 1
    err = capsys.readouterr().err
    assert "FAILED: 2 of 4 rows are errors" in err
    assert read_logs(str(tmp_path / "out")).num_rows == 4  # every record landed first
    summary = json.loads((tmp_path / "out/runs/budget/summary.json").read_text())
    assert summary["status"] == "failed" and summary["error_fraction"] == 0.5
    assert main(["--config", str(cfg), "--set", "sampling.num_steps=0"]) == 2
    assert "sampling.num_steps: Input should be greater than" in capsys.readouterr().err
    assert main(["--config", str(cfg), "--set", f"input.manifest={tmp_path}/nowhere.jsonl"]) == 2
    assert "error: input.manifest: No manifest at" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# The edit stage: engine failures become rows, never a dead job (no Ray needed).


class FakeEngine:
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.calls: list[int] = []

    def edit(self, rows):
        self.calls.append(len(rows))
        outs = []
        for row in rows:
            text = row.meta["instruction"]
            if self.mode == "batch-raises" and len(rows) > 1:
                raise RuntimeError("CUDA out of memory (pretend)")
            if "boom" in text:
                raise ValueError("this row always fails")
            if "nan" in text:
                outs.append(EditOutput(None, 1.0, errors.NON_FINITE_OUTPUT,
                                       "The model produced NaN or Inf values for this row."))
                continue
            if "shape" in text:
                outs.append(EditOutput(np.zeros((4, 4), np.float32), 1.0))
                continue
            outs.append(EditOutput(255 - row.arrays["image"], 2.0))
        return outs


def _prepare_fake(request: EditRequest) -> Prepared:
    image = request.images[0]
    return Prepared("one", 16, 16, {"image": image}, {"instruction": request.instruction})


class NonFiniteEditor(ModelFamily):
    """A plug-in family ("test_job_e2e:NonFiniteEditor") whose engine overflows for some rows and
    raises for others."""

    name = "non-finite"
    needs_weights = False
    lightweight = True

    def preparer(self, folder):
        return _prepare_fake

    def load(self, folder, device):
        return FakeEngine("per-row")


def _stage_batch(instructions: list[str], error_first: bool = True) -> pa.Table:
    from step1x_batch.job.stages import ROW_SCHEMA

    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    rows = []
    for i, text in enumerate(instructions):
        prepared = _prepare_fake(EditRequest([img], text, i))
        rows.append({
            "id": f"r{i}", "fingerprint": f"f{i}", "image_uri": "x.png", "instruction": text, "seed": i,
            "num_steps": 2, "guidance_scale": 1.0, "size_level": 64, "negative_prompt": "",
            "output_key": f"images/r{i}.png", "prepared": prepared.to_bytes(), "batch_key": prepared.key,
            "width": 16, "height": 16,
        })
    if error_first:
        rows[0].update(error_type="corrupt_image", error_message="bad", prepared=None)
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


@pytest.mark.parametrize("mode", ["per-row", "batch-raises"])
def test_edit_stage_turns_engine_failures_into_rows(mode):
    from step1x_batch.models.base import ModelSpec
    from step1x_batch.job.stages import EditStage
    from step1x_batch.io.weights import WeightsSource

    fake = FakeEngine(mode)
    stage = EditStage(ModelSpec("null", max_batch_size=8), WeightsSource(), engine=fake)
    batch = _stage_batch(["already bad", "fine", "nan please", "boom", "shape", "fine too"])
    out = stage(batch).to_pylist()
    assert [r["id"] for r in out] == [f"r{i}" for i in range(6)]
    assert out[0]["error_type"] == "corrupt_image" and out[0]["error_message"] == "bad"  # untouched
    assert [r["error_type"] for r in out[1:]] == [
        None, errors.NON_FINITE_OUTPUT, errors.EDIT_FAILED, errors.EDIT_FAILED, None]
    assert "this row always fails" in out[3]["error_message"]
    assert "not an RGB uint8 image" in out[4]["error_message"]
    edited = np.frombuffer(out[1]["pixels"], np.uint8).reshape(2, 3, 3)
    assert (edited == 255 - np.arange(18, dtype=np.uint8).reshape(2, 3, 3)).all()
    assert out[1]["width"] == 16 and out[1]["edit_ms"] == 2.0
    assert all(r["pixels"] is None for r in out if r["error_type"])
    assert all(r["prepared"] is None for r in out[1:])  # consumed: it does not travel on to the write stage
    # the batch went in whole once; a raising batch fell back to one row at a time
    assert fake.calls[0] == 5
    assert fake.calls[1:] == [1, 1, 1, 1, 1]


def test_model_failures_end_as_rows_through_the_job(ray_local, tmp_path, image_factory):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(image_factory.bytes("RGB", "PNG"))
    texts = ["fine 1", "nan: overflow", "fine 2", "boom: the model raises", "fine 3", "nan again"]
    rows = [{"id": f"m{i}", "image_uri": "a.png", "instruction": t} for i, t in enumerate(texts)]
    _write_manifest(str(folder / "m.jsonl"), rows)
    raw = _config(str(folder / "m.jsonl"), str(tmp_path / "out"),
                  model={"family": "test_job_e2e:NonFiniteEditor", "model_id": "fake"},
                  resources={"edit_batch_size": 6}, runtime={"max_error_fraction": 0.5, "run_id": "nan"})
    summary = _run(raw)
    assert summary.ok and summary.by_error_type == {"non_finite_output": 2, "edit_failed": 1}
    recs = {r["id"]: r for r in read_logs(str(tmp_path / "out")).to_pylist()}
    assert recs["m1"]["error_message"] == "The model produced NaN or Inf values for this row."
    assert recs["m1"]["output_uri"] is None and recs["m0"]["output_uri"].endswith("images/m0.png")
    assert "this row always fails" in recs["m3"]["error_message"]
    out = decode_image(read_bytes(recs["m0"]["output_uri"]), 10**6)
    assert np.array_equal(out, 255 - decode_image(image_factory.bytes("RGB", "PNG"), 10**6))
    assert recs["m0"]["model_id"] == "fake"


# --------------------------------------------------------------------------------------------
# A driver killed with SIGKILL mid-run, then run again.


def _kill_tree(proc: subprocess.Popen, marker: str) -> None:
    """SIGKILL the job's process group, then anything else still running from its Ray temp dir."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    deadline = time.time() + 15
    while time.time() < deadline:
        left = []
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                env = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            if marker.encode() in cmd or marker.encode() in env:
                left.append(int(pid))
        if not left:
            return
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


@pytest.mark.slow
def test_driver_sigkill_then_rerun(ray_local, tmp_path, image_factory):
    import yaml

    folder = tmp_path / "in"
    folder.mkdir()
    n = 2000
    for k in range(8):
        (folder / f"p{k}.png").write_bytes(_png(image_factory.rgb(16 + k, 16)))
    rows = [{"id": f"row-{i:05d}", "image_uri": f"p{i % 8}.png", "instruction": f"edit {i}"} for i in range(n)]
    (folder / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    raw = _config(str(folder / "m.jsonl"), str(out),
                  resources={"edit_batch_size": 20, "io_batch_size": 20, "local_num_cpus": 2},
                  runtime={"log_part_rows": 100, "log_part_seconds": 1.0, "run_id": "killed",
                           "lease_ttl_s": 3})
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    marker = f"rayk-{os.getpid()}-{time.monotonic_ns()}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": f"/tmp/{marker}", "RAY_AUTH_MODE": "disabled",
           "STEP1X_TEST_MARKER": marker}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "jobs/edit_dataset.py"), "--config", str(cfg)],
        env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    logs = out / "logs" / "killed"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if logs.exists() and len(list(logs.glob("part-*.parquet"))) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the job ended before it could be killed: {proc.stderr.read()[-2000:]!r}"
        os.kill(proc.pid, signal.SIGKILL)  # the driver, mid-run
    finally:
        _kill_tree(proc, marker)
    killed = read_logs(str(out), run_id="killed").to_pylist()
    assert 0 < len(killed) < n, "the kill landed mid-run"
    assert not (out / "runs" / "killed" / "summary.json").exists()
    assert all(r["status"] == "ok" for r in killed)

    expire_local_lease(out)  # the killed driver renews its lease no more: it expires, the re-run takes over
    summary = _run({**raw, "runtime": {**raw["runtime"], "run_id": "resumed", "log_part_seconds": 30.0},
                    "resources": {"edit_batch_size": 100, "io_batch_size": 100}})
    assert summary.ok and summary.rows_skipped == len(killed)
    assert any("took over the lease from run killed" in note for note in summary.notes)
    resumed = read_logs(str(out), run_id="resumed").to_pylist()
    everything = read_logs(str(out)).to_pylist()
    ok_ids = [r["id"] for r in everything if r["status"] == "ok"]
    assert len(ok_ids) == len(set(ok_ids)) == n  # complete, no duplicate ok records
    assert not {r["id"] for r in killed} & {r["id"] for r in resumed}  # no ok row processed twice
    for r in resumed[:20]:
        assert decode_image(read_bytes(r["output_uri"]), 10**6).shape[0] == 16


@pytest.mark.slow
def test_bf16_outputs_do_not_depend_on_batching_across_a_killed_run(ray_local, tmp_path, image_factory):
    """Same row, same weights, same hardware: same bytes. A clean bf16 run of the tiny Step1X
    model, and a run whose driver is SIGKILLed mid-way then re-run with other batch sizes (so
    rows meet other companions), write byte-identical outputs."""
    import yaml

    from step1x_batch.models.step1x import tiny

    weights = tiny.make_tiny_weights(tmp_path / "weights", seed=0)
    folder = tmp_path / "in"
    folder.mkdir()
    for k, (w, h) in enumerate([(48, 32), (32, 48), (48, 32)]):
        (folder / f"p{k}.png").write_bytes(_png(image_factory.rgb(w, h)))
    texts = ["add a hat", "make it night and add a big yellow moon over the hills", "snow", "it's \"red\""]
    rows = [{"id": f"b{i:02d}", "image_uri": f"p{i % 3}.png", "instruction": texts[i % 4], "seed": i,
             **({"negative_prompt": "blurry, low quality"} if i % 5 == 0 else {})} for i in range(12)]
    (folder / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def job(out: Path, run_id: str, edit_batch: int, io_batch: int) -> dict:
        return _config(str(folder / "m.jsonl"), str(out),
                       model={"family": "step1x", "weights": str(weights), "dtype": "bfloat16", "device": "cpu",
                              "max_batch_size": 4},
                       sampling={"num_steps": 2, "size_level": 64},
                       resources={"edit_batch_size": edit_batch, "io_batch_size": io_batch, "local_num_cpus": 2},
                       runtime={"log_part_rows": 4, "log_part_seconds": 0.2, "run_id": run_id,
                                "lease_ttl_s": 3})

    out = tmp_path / "out"
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(job(out, "killed", 2, 2)))  # small calls: parts land one by one
    marker = f"rayk-{os.getpid()}-{time.monotonic_ns()}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": f"/tmp/{marker}", "RAY_AUTH_MODE": "disabled",
           "STEP1X_TEST_MARKER": marker}
    # The clean reference first, then the driver to kill: one Ray starting at a time (the suite's
    # other worker starts its own; Ray gives a node 30 s to come up).
    clean = tmp_path / "clean"
    assert _run(job(clean, "clean", 8, 8)).by_status == {"ok": 12}
    proc = subprocess.Popen([sys.executable, str(ROOT / "jobs/edit_dataset.py"), "--config", str(cfg)],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    logs = out / "logs" / "killed"
    try:
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if logs.exists() and list(logs.glob("part-*.parquet")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"the job ended before it could be killed: {proc.stderr.read()[-2000:]!r}"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        _kill_tree(proc, marker)
    killed = read_logs(str(out), run_id="killed").num_rows
    assert 0 < killed < 12, "the kill landed mid-run"
    expire_local_lease(out)  # the killed driver's lease expires
    resumed = _run(job(out, "resumed", 3, 5))
    assert resumed.ok and resumed.rows_skipped == killed and resumed.rows_processed == 12 - killed
    for r in rows:
        key = f"images/{r['id']}.png"
        assert (out / key).read_bytes() == (clean / key).read_bytes(), r["id"]


# --------------------------------------------------------------------------------------------
# The tiny Step1X model: S3 manifest -> S3 outputs, weights staged from S3.


@pytest.mark.slow
def test_tiny_step1x_s3_to_s3(ray_local, s3_bucket, image_factory, tmp_path):
    from step1x_batch.models.step1x import tiny
    weights = tmp_path / "weights"
    tiny.make_tiny_weights(str(weights), seed=0)
    for path in weights.rglob("*"):
        if path.is_file():
            _put(f"{s3_bucket}/weights/{path.relative_to(weights).as_posix()}", path.read_bytes())
    f = image_factory
    _put(f"{s3_bucket}/in/a.png", f.bytes("RGB", "PNG", 64, 48))
    _put(f"{s3_bucket}/in/b.jpg", f.exif_rotated(6, 48, 64))
    rows = [
        {"id": "a1", "image_uri": "a.png", "instruction": "make it blue", "seed": 1},
        {"id": "a1-again", "image_uri": "a.png", "instruction": "make it blue", "seed": 1},
        {"id": "a2", "image_uri": "a.png", "instruction": "make it blue", "seed": 2},
        {"id": "b1", "image_uri": "b.jpg", "instruction": "add a red hat", "seed": 3},
        {"id": "b2", "image_uri": "b.jpg", "instruction": "add snow", "seed": 4, "num_steps": 3},
        {"id": "gone", "image_uri": "missing.png", "instruction": "add snow", "seed": 5},
    ]
    _write_manifest(f"{s3_bucket}/in/rows.jsonl", rows)
    out = f"{s3_bucket}/out"
    raw = _config(
        f"{s3_bucket}/in/rows.jsonl", out,
        model={"family": "step1x", "weights": f"{s3_bucket}/weights", "dtype": "float32", "device": "cpu",
               "max_batch_size": 2, "cache_dir": str(tmp_path / "cache")},
        sampling={"num_steps": 2, "size_level": 64},
        resources={"edit_batch_size": 4, "io_batch_size": 6},
        runtime={"run_id": "tiny", "max_error_fraction": 0.5},
    )
    summary = _run(raw)
    assert summary.by_status == {"ok": 5, "error": 1} and summary.by_error_type == {"missing_object": 1}
    recs = {r["id"]: r for r in read_logs(out).to_pylist()}
    imgs = {}
    for rid, rec in recs.items():
        if rec["status"] != "ok":
            continue
        imgs[rid] = decode_image(read_bytes(rec["output_uri"]), 10**6)
        assert imgs[rid].shape == (rec["input_height"], rec["input_width"], 3)
        assert rec["width"] % 16 == 0 and rec["height"] % 16 == 0 and rec["edit_ms"] > 0
        assert rec["model_id"] == parse_config(raw).family().model_id()
    assert imgs["b1"].shape == (64, 48, 3)  # EXIF-rotated input edited upright
    source = decode_image(read_bytes(f"{s3_bucket}/in/a.png"), 10**6)
    assert not np.array_equal(imgs["a1"], source)  # the model changed the picture
    assert np.array_equal(imgs["a1"], imgs["a1-again"])  # same row, same bytes
    assert not np.array_equal(imgs["a1"], imgs["a2"])  # another seed, other noise
    assert (tmp_path / "cache").exists()  # weights were staged from S3 to the node cache
