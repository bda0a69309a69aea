"""``make-tiny-benchmark``: a GEdit-Bench-shaped dataset from a seed, read back by ``datasets`` with
the published columns and types, the same bytes for the same seed, and edited by the job through
``input.columns`` with the images inside the Parquet file."""

from __future__ import annotations

import hashlib
import io
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from step1x_batch.cli import main
from step1x_batch.recipes.tiny_benchmark import DATA_FILE, INPUT_SIZE, LANGUAGES, RAW_SIZE, TASK_TYPES


def test_the_dataset_loads_with_datasets_as_gedit_bench_is_typed(tmp_path, capsys):
    import datasets

    assert main(["make-tiny-benchmark", str(tmp_path / "tb"), "--seed", "3"]) == 0
    path = tmp_path / "tb" / DATA_FILE
    assert str(path) in capsys.readouterr().out
    assert (tmp_path / "tb" / "README.md").read_text().startswith("# A tiny GEdit-Bench-shaped dataset (seed 3)")
    ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    f = ds.features
    assert list(f) == ["key", "task_type", "instruction", "instruction_language", "input_image", "input_image_raw",
                       "Intersection_exist"]
    assert isinstance(f["input_image"], datasets.Image) and isinstance(f["input_image_raw"], datasets.Image)
    assert [f[c].dtype for c in ("key", "task_type", "instruction", "instruction_language")] == ["string"] * 4
    assert f["Intersection_exist"].dtype == "bool"
    assert ds.num_rows == 12 and len(set(ds["key"])) == 12
    cells = Counter(zip(ds["task_type"], ds["instruction_language"]))
    assert set(ds["task_type"]) == set(TASK_TYPES) and len(TASK_TYPES) == 3
    assert set(ds["instruction_language"]) == {"en", "cn"} == set(LANGUAGES)
    assert cells == {(t, lang): 2 for t in TASK_TYPES for lang in LANGUAGES}
    for row in ds:
        raw, small = row["input_image_raw"], row["input_image"]
        assert isinstance(raw, Image.Image) and raw.size == RAW_SIZE and small.size == INPUT_SIZE
        expected = raw.convert("RGB").resize(INPUT_SIZE, Image.Resampling.BICUBIC)
        assert np.array_equal(np.asarray(small.convert("RGB")), np.asarray(expected))  # a resized copy of the raw one
        assert row["instruction"].strip()


def test_the_same_seed_writes_the_same_bytes(tmp_path):
    from step1x_batch.recipes.tiny_benchmark import make_tiny_benchmark

    a = make_tiny_benchmark(tmp_path / "a", seed=5).read_bytes()
    b = make_tiny_benchmark(tmp_path / "b", seed=5).read_bytes()
    c = make_tiny_benchmark(tmp_path / "c", seed=6).read_bytes()
    assert a == b
    assert a != c
    raw = lambda data: [r["bytes"] for r in pq.read_table(io.BytesIO(data)).column("input_image_raw").to_pylist()]  # noqa: E731
    assert raw(a) != raw(c)  # other pictures, not only other metadata
    assert len({hashlib.sha256(x).hexdigest() for x in raw(a)}) == 12  # every row its own picture


def test_the_edit_job_reads_it_through_the_column_map(ray_local, tmp_path):
    """The published layout, used as is: ``input.columns`` picks the id, image and instruction
    columns; the images come out of the Parquet file, the other columns travel in ``extra``."""
    import json

    from step1x_batch.job.config import parse_config
    from step1x_batch.job.runner import run_job
    from step1x_batch.recipes.tiny_benchmark import make_tiny_benchmark
    from step1x_batch.rows.log import read_logs

    path = make_tiny_benchmark(tmp_path / "tb", seed=0)
    raw = {"input": {"manifest": str(path.parent) + "/",
                     "columns": {"id": "key", "image": "input_image_raw", "instruction": "instruction"}},
           "output": {"uri": str(tmp_path / "out")}, "model": {"family": "null"},
           "resources": {"io_batch_size": 4, "edit_batch_size": 4},
           "runtime": {"progress_bars": False, "run_id": "first"}}
    first = run_job(parse_config(raw))
    assert first.by_status == {"ok": 12}
    logs = {r["id"]: r for r in read_logs(str(tmp_path / "out")).to_pylist()}
    table = pq.read_table(path).to_pylist()
    assert set(logs) == {r["key"] for r in table}
    for row in table:
        rec = logs[row["key"]]
        [uri] = rec["image_uris"]  # the image's identity is the hash of its bytes
        assert uri.endswith("sha256/" + hashlib.sha256(row["input_image_raw"]["bytes"]).hexdigest())
        extra = json.loads(rec["extra"])
        assert (extra["task_type"], extra["instruction_language"]) == (row["task_type"], row["instruction_language"])
        # the null family returns its input: the output is the raw picture's pixels
        out = Image.open(tmp_path / "out" / rec["output_uri"].split("/out/", 1)[1]).convert("RGB")
        assert np.array_equal(np.asarray(out), np.asarray(Image.open(io.BytesIO(row["input_image_raw"]["bytes"])).convert("RGB")))
    again = run_job(parse_config({**raw, "runtime": {"progress_bars": False, "run_id": "again"}}))
    assert again.rows_processed == 0 and again.rows_skipped == 12

