"""The edit job's results as a dataset (issue 21, item 3): Parquet shards with the edited image as
a ``datasets`` Image feature, WebDataset tar shards, written incrementally from the row log.

Real parts: the edit job (``null`` family) on a local Ray builds the output root; the shards are
read back with ``datasets.load_dataset`` and the ``webdataset`` package."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from step1x_batch.job.config import parse_config
from step1x_batch.job.export import ExportResult, export_dataset, export_for, webdataset_key
from step1x_batch.job.runner import run_job
from step1x_batch.rows.state import LocalTasks, bucket_of

OK_IDS = [f"r{i}" for i in range(9)] + ["odd id.9"]  # the last one is no plain WebDataset key
BAD_ID = "gone"


def _rows() -> list[dict]:
    rows = [{"id": row_id, "image_uri": f"in{i}.png", "instruction": f"edit {i}", "cat": f"c{i % 3}", "n": i,
             "flag": i % 2 == 0, "score": i if i % 2 else i + 0.5, "tags": [f"t{i}", "x"]}
            for i, row_id in enumerate(OK_IDS)]
    rows.append({"id": BAD_ID, "image_uri": "missing.png", "instruction": "edit", "cat": "c", "n": 1,
                 "flag": True, "score": 1.0, "tags": []})
    return rows


def _write_manifest(folder: Path, rows: list[dict]) -> Path:
    path = folder / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _raw_config(folder: Path, run_id: str, **output) -> dict:
    return {
        "input": {"manifest": str(folder / "manifest.parquet")},
        "output": {"uri": str(folder / "out"), **output},
        "model": {"family": "null"},
        "resources": {"edit_batch_size": 4, "io_batch_size": 4},
        "runtime": {"progress_bars": False, "max_error_fraction": 0.5, "run_id": run_id},
    }


class Root:
    """The output root the tests share (one edit job, on a loaded 2-core machine, costs seconds):
    each test starts without ``dataset/``; the manifest's rows as the job last edited them."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.out, self.rows = folder, folder / "out", _rows()

    def by_id(self) -> dict[str, dict]:
        return {r["id"]: r for r in self.rows}


@pytest.fixture(scope="module")
def root(ray_local, tmp_path_factory) -> Root:
    """An output root made by the real edit job: 10 ok rows (distinct pixels), one error row."""
    shared = Root(tmp_path_factory.mktemp("dataset_root"))
    rng = np.random.default_rng(7)
    for i in range(len(OK_IDS)):
        Image.fromarray(rng.integers(0, 256, (10 + i, 14, 3), dtype=np.uint8)).save(shared.folder / f"in{i}.png")
    _write_manifest(shared.folder, shared.rows)
    summary = run_job(parse_config(_raw_config(shared.folder, "first")))
    assert summary.by_status == {"ok": len(OK_IDS), "error": 1}
    return shared


def _fresh(out: Path | Root) -> Path:
    out = out.out if isinstance(out, Root) else out
    shutil.rmtree(out / "dataset", ignore_errors=True)
    return out


def _export(out: Path, shards: int = 4, parquet: bool = True, webdataset: bool = True, **kw) -> ExportResult:
    return export_dataset(str(out), None, parquet=parquet, webdataset=webdataset, shards=shards,
                          image_format="png", **{"tasks": LocalTasks(), **kw})


def _snapshot(out: Path, sub: str = "dataset") -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(out)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted((out / sub).rglob("*")) if p.is_file()}


def _shard_ids(out: Path) -> dict[str, list[str]]:
    return {p.name: pq.read_table(p, columns=["id"]).column("id").to_pylist()
            for p in sorted((out / "dataset" / "data").glob("*.parquet"))}


def _tar_keys(out: Path) -> dict[str, list[str]]:
    found = {}
    for p in sorted((out / "dataset" / "webdataset").glob("*.tar")):
        with tarfile.open(p) as tar:
            found[p.name] = [json.loads(tar.extractfile(m).read())["id"] for m in tar.getmembers()
                             if m.name.endswith(".json")]
    return found


def _pixels(data_or_path) -> np.ndarray:
    im = data_or_path if isinstance(data_or_path, Image.Image) else Image.open(data_or_path)
    return np.asarray(im.convert("RGB"))


def test_the_dataset_loads_with_datasets_and_webdataset_and_a_rerun_rewrites_nothing(root, tmp_path):
    out = _fresh(root)
    cfg = parse_config(_raw_config(root.folder, "x", dataset=True, webdataset=True, dataset_shards=4))
    result = export_for(cfg)  # Ray is up: the shard work runs as Ray tasks
    assert (result.shards_written, result.shards_unchanged, result.rows, result.missing) == (4, 0, len(OK_IDS), 0)
    assert export_for(parse_config(_raw_config(root.folder, "x"))) is None  # neither flag: no export

    ds = datasets.load_dataset("parquet", data_files=str(out / "dataset/data/*.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert isinstance(ds.features["image"], datasets.Image)
    types = {name: ds.features[name].dtype for name in ("cat", "n", "flag", "score", "tags", "seed")}
    assert types == {"cat": "string", "n": "int64", "flag": "bool", "score": "float64", "tags": "string",
                     "seed": "int64"}
    assert sorted(ds["id"]) == sorted(OK_IDS)  # one row per ok id; the error row in none
    by_id = root.by_id()
    for row in ds:
        src = by_id[row["id"]]
        key = f"images/{row['id']}.png"
        assert np.array_equal(_pixels(row["image"]), _pixels(out / key)), row["id"]
        assert (row["cat"], row["n"], row["flag"], row["score"]) == (src["cat"], src["n"], src["flag"], src["score"])
        assert json.loads(row["tags"]) == src["tags"] and row["instruction"] == src["instruction"]
    raw = pq.read_table(out / "dataset/data/shard-00000-of-00004.parquet")
    assert raw.schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])

    # Every ok id in exactly one Parquet shard and one tar shard: the shard its id hashes to.
    for found, name in ((_shard_ids(out), "shard-{:05d}-of-00004.parquet"), (_tar_keys(out), "shard-{:05d}-of-00004.tar")):
        assert sorted(i for ids in found.values() for i in ids) == sorted(OK_IDS)
        for row_id in OK_IDS:
            assert row_id in found[name.format(int(bucket_of(pa.array([row_id]), 4)[0]))]
        assert all(ids == sorted(ids) for ids in found.values())

    urls = [str(p) for p in sorted((out / "dataset/webdataset").glob("*.tar"))]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil"))
    assert sorted(s["json"]["id"] for s in samples) == sorted(OK_IDS)
    for s in samples:
        src = by_id[s["json"]["id"]]
        assert s["__key__"] == webdataset_key(src["id"]) and "." not in s["__key__"]
        assert np.array_equal(_pixels(s["png"]), _pixels(out / f"images/{src['id']}.png"))
        assert s["txt"] == src["instruction"] and s["json"]["n"] == src["n"] and s["json"]["flag"] is src["flag"]

    before = _snapshot(out)
    again = _export(out)
    assert (again.shards_written, again.shards_unchanged, again.rows) == (0, 4, len(OK_IDS))
    assert _snapshot(out) == before  # bytes and mtimes: nothing rewritten


def test_a_changed_row_rewrites_only_its_shard(root):
    out = _fresh(root)
    _export(out)
    old_ids = _shard_ids(out)
    before = _snapshot(out)
    changed = "r3"
    next(r for r in root.rows if r["id"] == changed)["instruction"] = f"edit {changed}, again"
    _write_manifest(root.folder, root.rows)
    summary = run_job(parse_config(_raw_config(root.folder, f"change-{changed}")))
    assert summary.by_status == {"ok": 1}  # only the changed row was edited again

    result = _export(out)
    assert (result.shards_written, result.shards_unchanged, result.rows) == (1, 3, len(OK_IDS))
    shard = int(bucket_of(pa.array([changed]), 4)[0])
    rewritten = {f"dataset/data/shard-{shard:05d}-of-00004.parquet", f"dataset/webdataset/shard-{shard:05d}-of-00004.tar"}
    after = _snapshot(out)
    for name in ("data", "webdataset"):
        for path in (p for p in before if p.startswith(f"dataset/{name}/")):
            assert (after[path] != before[path]) == (path in rewritten), path
    mine = [r for r in pq.read_table(out / sorted(rewritten)[0]).to_pylist() if r["id"] == changed]
    assert len(mine) == 1 and mine[0]["instruction"] == f"edit {changed}, again"
    assert mine[0]["run_id"] == f"change-{changed}"
    assert _shard_ids(out) == old_ids
    with tarfile.open(out / sorted(rewritten)[1]) as tar:
        docs = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    assert [d["instruction"] for d in docs if d["id"] == changed] == [f"edit {changed}, again"]


def test_a_killed_export_is_finished_by_the_next_and_equals_a_fresh_one(root, monkeypatch):
    out = _fresh(root)
    assert _export(out, webdataset=False).shards_written == 4
    parquet_before = _snapshot(out, "dataset/data")
    # Turning webdataset on rewrites every shard; the export dies in shard 2, before its index.
    monkeypatch.setenv("STEP1X_BATCH_FAILPOINT", "export-shard-2-before-index")
    with pytest.raises(RuntimeError, match="failpoint"):
        _export(out)
    monkeypatch.delenv("STEP1X_BATCH_FAILPOINT")
    tars = sorted(p.name for p in (out / "dataset/webdataset").glob("*.tar"))
    assert tars == [f"shard-{b:05d}-of-00004.tar" for b in range(3)]  # shards 0-2 written, 3 not yet
    # The previous dataset is still readable and whole (same rows, same bytes: deterministic).
    assert {k: v[0] for k, v in _snapshot(out, "dataset/data").items()} == {k: v[0] for k, v in parquet_before.items()}

    resumed = _export(out)
    assert (resumed.shards_written, resumed.shards_unchanged) == (2, 2)  # shard 2 (no index yet) and 3
    finished = {k: v[0] for k, v in _snapshot(out).items() if not k.startswith("dataset/_")}
    fresh = _export(_fresh(out))
    assert fresh.shards_written == 4
    assert {k: v[0] for k, v in _snapshot(out).items() if not k.startswith("dataset/_")} == finished
    assert len(finished) == 8


def test_changing_the_shard_count_rebuilds_and_a_missing_output_is_left_out(root, tmp_path):
    out = _fresh(root)
    _export(out, shards=4)
    result = _export(out, shards=3)
    assert (result.shards_written, result.shards_removed, result.rows) == (3, 8, len(OK_IDS))
    names = sorted(p.name for p in (out / "dataset").rglob("shard-*"))
    assert names == sorted([f"shard-{b:05d}-of-00003.parquet" for b in range(3)]
                           + [f"shard-{b:05d}-of-00003.tar" for b in range(3)]
                           + [f"shard-{b:05d}.parquet" for b in range(3)])
    assert sorted(i for ids in _shard_ids(out).values() for i in ids) == sorted(OK_IDS)

    image = out / "images" / "r5.png"
    shutil.move(image, tmp_path / "r5.png")  # deleted by hand (put back at the end)
    try:
        result = _export(out, shards=2, webdataset=False)  # a rebuild reads every output again
    finally:
        shutil.move(tmp_path / "r5.png", image)
    assert (result.rows, result.missing, result.shards_removed) == (len(OK_IDS) - 1, 1, 3 + 3)
    assert len(result.warnings) == 1 and "'r5'" in result.warnings[0] and "images/r5.png" in result.warnings[0]
    assert sorted(i for ids in _shard_ids(out).values() for i in ids) == sorted(set(OK_IDS) - {"r5"})
    assert not list((out / "dataset/webdataset").glob("*.tar"))  # the switched-off kind is removed
    # the output is back: the next export looks again and the row returns (the others stay put)
    again = _export(out, shards=2, webdataset=False)
    assert (again.shards_written, again.rows, again.missing) == (1, len(OK_IDS), 0)
    assert sorted(i for ids in _shard_ids(out).values() for i in ids) == sorted(OK_IDS)
