"""Rows with several input images through the whole job, on a real local Ray and the moto S3
server: a plug-in family from tests/ (up to 3 images) and the Qwen-Image-Edit family (tiny
weights staged from the bucket). Every row ends as exactly one record, a bad reference is named by
position and URI, and a rerun processes nothing.
"""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from step1x_batch import errors
from step1x_batch.job.config import parse_config
from step1x_batch.io.images import decode_image
from step1x_batch.rows.log import read_logs
from step1x_batch.io.storage import read_bytes, write_bytes


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _picture(seed: int, w: int = 48, h: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _upload_inputs(bucket: str) -> dict[str, np.ndarray]:
    pictures = {f"p{i}.png": _picture(i) for i in range(4)}
    for name, image in pictures.items():
        write_bytes(f"{bucket}/in/{name}", _png(image))
    good = _png(_picture(9))
    write_bytes(f"{bucket}/in/corrupt.png", good[:16] + b"\xff" * 8 + good[24:])
    return pictures


def _write_jsonl(uri: str, rows: list[dict]) -> None:
    write_bytes(uri, "".join(json.dumps(r) + "\n" for r in rows).encode())


def _job(manifest: str, out: str, model: dict, run_id: str, **sections) -> dict:
    raw = {
        "input": {"manifest": manifest},
        "output": {"uri": out},
        "model": model,
        "resources": {"edit_batch_size": 8, "io_batch_size": 4},
        "runtime": {"progress_bars": False, "max_error_fraction": 0.5, "run_id": run_id},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def _run(raw: dict):
    from step1x_batch.job.runner import run_job

    return run_job(parse_config(raw))


def _records(out: str) -> dict[str, dict]:
    recs = read_logs(out).to_pylist()
    ids = [r["id"] for r in recs]
    assert len(ids) == len(set(ids)), "one record per row"
    return {r["id"]: r for r in recs}


def test_plugin_family_with_up_to_three_images(ray_local, s3_bucket):
    pictures = _upload_inputs(s3_bucket)
    rows = [
        {"id": "one", "image_uris": ["p0.png"], "instruction": "x"},
        {"id": "single", "image_uri": "p1.png", "instruction": "x"},
        {"id": "three", "image_uris": ["p0.png", "p1.png", "p2.png"], "instruction": "x"},
        {"id": "three-again", "image_uris": ["p3.png", "p2.png", "p1.png"], "instruction": "y"},
        {"id": "four", "image_uris": ["p0.png", "p1.png", "p2.png", "p3.png"], "instruction": "x"},
        {"id": "missing-second", "image_uris": ["p0.png", "gone.png", "p2.png"], "instruction": "x"},
        {"id": "corrupt-third", "image_uris": ["p0.png", "p1.png", "corrupt.png"], "instruction": "x"},
    ]
    manifest = f"{s3_bucket}/in/rows.jsonl"
    _write_jsonl(manifest, rows)
    out = f"{s3_bucket}/out"
    model = {"family": "job_plugins:MeanOfInputs", "options": {"max_images": 3}}
    summary = _run(_job(manifest, out, model, "first"))
    assert summary.rows_processed == 7 and summary.by_status == {"ok": 4, "error": 3}
    recs = _records(out)
    assert set(recs) == {r["id"] for r in rows}
    assert {k: r["error_type"] for k, r in recs.items() if r["status"] == "error"} == {
        "four": errors.TOO_MANY_IMAGES, "missing-second": errors.MISSING_OBJECT,
        "corrupt-third": errors.CORRUPT_IMAGE}
    assert "4 input images" in recs["four"]["error_message"] and "at most 3" in recs["four"]["error_message"]
    missing = recs["missing-second"]["error_message"]
    assert missing.startswith(f"image 2 of 3 ({s3_bucket}/in/gone.png): "), missing
    assert recs["corrupt-third"]["error_message"].startswith(f"image 3 of 3 ({s3_bucket}/in/corrupt.png): ")
    # every input reached the model, in order: the plug-in returns the pixel mean of its inputs
    expected = np.stack([pictures[n] for n in ("p0.png", "p1.png", "p2.png")]).mean(0).round().astype(np.uint8)
    assert np.array_equal(decode_image(read_bytes(recs["three"]["output_uri"]), 10**6), expected)
    assert np.array_equal(decode_image(read_bytes(recs["one"]["output_uri"]), 10**6), pictures["p0.png"])
    assert recs["three"]["image_uris"] == [f"{s3_bucket}/in/p{i}.png" for i in range(3)]
    assert recs["three"]["image_uri"] == f"{s3_bucket}/in/p0.png"
    assert recs["three"]["input_width"] == 48 and recs["three"]["width"] == 48
    # the report shows every input of a row
    page = read_bytes(summary.paths["report"]).decode()
    (three,) = [tr for tr in page.split("<tr ") if "id three &middot;" in tr]
    assert three.count("<img ") == 3 + 1  # three inputs, then the output
    (one,) = [tr for tr in page.split("<tr ") if "id one &middot;" in tr]
    assert one.count("<img ") == 1 + 1
    # a rerun processes nothing: every row has its deciding record
    again = _run(_job(manifest, out, model, "second"))
    assert again.rows_processed == 0 and again.rows_skipped == 7
    assert len(read_logs(out).to_pylist()) == 7


@pytest.mark.slow
def test_qwen_image_edit_job_with_multi_reference_rows(ray_local, s3_bucket, tmp_path):
    from step1x_batch.models.qwen_image_edit.tiny import make_tiny_weights

    weights = make_tiny_weights(tmp_path / "qwen", seed=0)
    for path in weights.rglob("*"):
        if path.is_file():
            write_bytes(f"{s3_bucket}/weights/{path.relative_to(weights).as_posix()}", path.read_bytes())
    _upload_inputs(s3_bucket)
    rows = [
        {"id": "one", "image_uri": "p0.png", "instruction": "make it red", "seed": 1},
        {"id": "one-b", "image_uri": "p1.png", "instruction": "make it blue", "seed": 2},
        {"id": "three", "image_uris": ["p0.png", "p1.png", "p2.png"], "instruction": "put them together", "seed": 3},
        {"id": "three-b", "image_uris": ["p3.png", "p2.png", "p1.png"], "instruction": "a cat", "seed": 4,
         "negative_prompt": "blurry"},
        {"id": "eleven", "image_uris": [f"p{i % 4}.png" for i in range(11)], "instruction": "x", "seed": 5},
        {"id": "missing-second", "image_uris": ["p0.png", "gone.png"], "instruction": "x", "seed": 6},
    ]
    manifest = f"{s3_bucket}/in/rows.jsonl"
    _write_jsonl(manifest, rows)
    out = f"{s3_bucket}/out"
    model = {
        "family": "qwen-image-edit", "weights": f"{s3_bucket}/weights", "dtype": "float32", "device": "cpu",
        "max_batch_size": 2, "cache_dir": str(tmp_path / "cache"),
        "options": {"reference_area": 48 * 48, "vl_area": 56 * 56},
    }
    raw = _job(manifest, out, model, "qwen", sampling={"num_steps": 2, "size_level": 96})
    summary = _run(raw)
    assert summary.rows_processed == 6 and summary.by_status == {"ok": 4, "error": 2}
    recs = _records(out)
    assert {k: r["error_type"] for k, r in recs.items() if r["status"] == "error"} == {
        "eleven": errors.TOO_MANY_IMAGES, "missing-second": errors.MISSING_OBJECT}
    assert "11 input images" in recs["eleven"]["error_message"] and "at most 10" in recs["eleven"]["error_message"]
    assert recs["missing-second"]["error_message"].startswith(f"image 2 of 2 ({s3_bucket}/in/gone.png): ")
    for rid in ("one", "one-b", "three", "three-b"):
        image = decode_image(read_bytes(recs[rid]["output_uri"]), 10**6)
        # the output keeps the last input's landscape aspect (3:2: 128x64 at size level 96, x32 rounding)
        assert image.shape == (recs[rid]["height"], recs[rid]["width"], 3) and image.std() > 1
        assert recs[rid]["width"] > recs[rid]["height"]
        assert recs[rid]["model_id"].startswith("qwen-image-edit:float32:")
    again = _run({**raw, "runtime": {**raw["runtime"], "run_id": "qwen-again"}})
    assert again.rows_processed == 0 and again.rows_skipped == 6
    assert Counter(r["status"] for r in read_logs(out).to_pylist()) == {"ok": 4, "error": 2}
