"""WebDataset shards in, a dataset out, through the whole job on a real local Ray: three input
shards (one cut inside a member), the results as Parquet shards and WebDataset shards, read back
with ``datasets`` and the ``webdataset`` package. Every ok row is in exactly one shard of each;
a rerun edits nothing and rewrites no shard."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import webdataset as wds
from PIL import Image

from step1x_batch import errors
from step1x_batch.io.images import decode_image
from step1x_batch.job.config import parse_config
from step1x_batch.job.preflight import check_job
from step1x_batch.job.runner import run_job
from step1x_batch.rows.log import read_logs


def _png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _shards(folder: Path) -> dict[str, bytes]:
    """Three shards of 4 samples (png + txt + json); the third is cut inside its third sample's
    image, so its last two samples never arrive. Returns the input image of each whole sample."""
    folder.mkdir()
    pictures: dict[str, bytes] = {}
    for s in range(3):
        path = folder / f"shard-{s:03d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(4):
                key = f"s{s}-{i}"
                pictures[key] = _png(10 * s + i)
                sink.write({"__key__": key, "png": pictures[key], "txt": f"make {key} blue",
                            "json": {"task_type": f"t{i % 2}", "source": "synthetic"}})
        if s == 2:
            data = path.read_bytes()
            cut = data.index(pictures["s2-2"]) + 40  # inside the third sample's image
            path.write_bytes(data[:cut])
            for key in ("s2-2", "s2-3"):
                pictures.pop(key)
    return pictures


def _config(tmp_path: Path, run_id: str) -> dict:
    return {
        "input": {"manifest": str(tmp_path / "shards")},
        "output": {"uri": str(tmp_path / "out"), "dataset": True, "webdataset": True, "dataset_shards": 3},
        "model": {"family": "null"},
        "resources": {"edit_batch_size": 4, "io_batch_size": 4},
        "runtime": {"progress_bars": False, "max_error_fraction": 0.5, "run_id": run_id},
    }


def _run(raw: dict):
    cfg = parse_config(raw)
    return run_job(cfg, check_job(cfg))


def test_webdataset_in_parquet_and_webdataset_out(ray_local, tmp_path):
    pictures = _shards(tmp_path / "shards")
    summary = _run(_config(tmp_path, "first"))
    # a row's id is <shard>/<key>: keys are unique within a shard, often not across shards
    recs = {r["id"].split("/", 1)[1]: r for r in read_logs(str(tmp_path / "out")).to_pylist()}
    assert {r["id"] for r in recs.values()} == {f"shard-00{k[1]}/{k}" for k in recs}
    assert summary.by_status == {"ok": 10, "error": 1}
    problem = recs.pop("s2-2")  # the sample cut by the shard's end keeps its key in its id
    assert problem["error_type"] == errors.INVALID_ROW
    assert "shard-002.tar: member s2-2.png is truncated" in problem["error_message"]
    assert set(recs) == set(pictures)  # the rows before the cut, nothing after it
    assert json.loads(recs["s0-1"]["extra"])["task_type"] == "t1" and recs["s0-1"]["instruction"] == "make s0-1 blue"
    assert "png" not in json.loads(recs["s0-1"]["extra"])  # the member taken as the image is not carried again

    parquet = sorted(str(p) for p in (tmp_path / "out" / "dataset" / "data").glob("*.parquet"))
    tars = sorted(str(p) for p in (tmp_path / "out" / "dataset" / "webdataset").glob("*.tar"))
    assert len(parquet) == 3 and len(tars) == 3
    loaded = datasets.load_dataset("parquet", data_files=parquet, split="train")
    assert isinstance(loaded.features["image"], datasets.Image)
    ids = Counter(i.split("/", 1)[1] for i in loaded["id"])
    assert ids == Counter(set(pictures))  # every ok row exactly once, no error row
    for row in loaded:  # the null model returns its input: the pixels are the shard's picture
        picture = pictures[row["id"].split("/", 1)[1]]
        assert np.array_equal(np.asarray(row["image"].convert("RGB")), decode_image(picture, 10**6))
        assert row["task_type"] in ("t0", "t1")
    in_tars = Counter(json.loads(s["json"])["id"].split("/", 1)[1] for s in wds.WebDataset(tars, shardshuffle=False))
    assert in_tars == Counter(set(pictures))

    before = {p: Path(p).stat().st_mtime_ns for p in parquet + tars}
    again = _run(_config(tmp_path, "second"))
    assert again.rows_processed == 0 and again.rows_skipped == 11
    assert {p: Path(p).stat().st_mtime_ns for p in parquet + tars} == before  # nothing rewritten
