"""Synthetic training pairs: expansion, seeds, ids, splits, and the whole job on a real local Ray
(null family on local folders; one small run of the tiny Step1X model on the moto S3 server),
with the exported dataset loaded by pyarrow, pandas and Hugging Face ``datasets``."""

from __future__ import annotations

import io
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from step1x_batch.job.config import ConfigError
from step1x_batch.io.images import decode_image
from step1x_batch.rows.manifest import SEED_LIMIT
from step1x_batch.io.storage import arrow_filesystem, read_bytes, write_bytes
from step1x_batch.recipes.synthesize import (
    expand_pairs,
    export_dataset,
    pair_id,
    parse_synthesize_config,
    prepare_work,
    read_templates,
    run_synthesize,
    split_of,
    variant_seeds,
    weights_license,
)

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["source_image", "source_images", "edited_image", "source_image_uri", "edited_image_uri",
           "instruction", "seed", "variant", "num_steps", "guidance_scale", "size_level", "negative_prompt",
           "model_id", "id", "split"]
TEMPLATES = ["make it red", "add snow", "turn day into night", "add a hat"]



def _png(seed: int, w: int = 32, h: int = 24) -> bytes:
    img = (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _raw(manifest: str, out: str, **pairs) -> dict:
    return {
        "input": {"manifest": manifest},
        "output": {"uri": out},
        "model": {"family": "null"},
        "resources": {"edit_batch_size": 16, "io_batch_size": 16},
        "runtime": {"progress_bars": False, "max_error_fraction": 0.5},
        "pairs": pairs,
    }


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _pixels(image) -> np.ndarray:
    """A value ``datasets`` decoded: a PIL image (RGB, as the job writes and the tests make)."""
    assert isinstance(image, Image.Image), type(image)
    assert image.mode == "RGB"
    return np.asarray(image)


def _assert_decoded(rows, read) -> None:
    """Every decoded ``source_image`` / ``edited_image`` has the pixels of the file its URI column
    names (``read``: URI -> bytes)."""
    n = 0
    for row in rows:
        for col in ("source_image", "edited_image"):
            want = decode_image(read(row[f"{col}_uri"]), 10**6)
            assert np.array_equal(_pixels(row[col]), want), (col, row["id"])
        n += 1
    assert n


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


# --------------------------------------------------------------------------------------------
# Config, templates, expansion, splits (no Ray).


def test_config_sections_and_errors(tmp_path):
    raw = _raw(str(tmp_path / "m.jsonl"), str(tmp_path / "out"), templates="t.txt", variants=2)
    sj = parse_synthesize_config(raw, base_dir=tmp_path)
    assert sj.pairs.templates == str(tmp_path / "t.txt") and sj.pairs.instruction_column is None
    assert parse_synthesize_config({**raw, "pairs": {}}).pairs.instruction_column == "instruction"
    for pairs, where in (
        ({"variants": 0}, r"pairs\.variants"),
        ({"validation_fraction": 1.0}, r"pairs\.validation_fraction"),
        ({"bogus": 1}, r"pairs\.bogus"),
        ({"templates": "t.txt", "instruction_column": "i"}, "pairs: "),
    ):
        with pytest.raises(ConfigError, match=where):
            parse_synthesize_config({**raw, "pairs": pairs})
    with pytest.raises(ConfigError, match=r"sampling\.num_step"):
        parse_synthesize_config({**raw, "sampling": {"num_step": 3}})
    shipped = parse_synthesize_config(yaml.safe_load((ROOT / "configs/synthesize-pairs.yaml").read_text()))
    assert shipped.pairs.weights_license is None and shipped.job.resources.num_gpus_per_actor == 1


def test_weights_license_follows_the_family(tmp_path):
    """The card's weights licence is the family's (RealRestorer's non-commercial weights: "other",
    Step1X-Edit's and Qwen-Image-Edit's: apache-2.0) unless ``pairs.weights_license`` says."""
    manifest = _jsonl(tmp_path / "images.jsonl", [{"image_uri": "a.png", "instruction": "make it red"}])
    raw = _raw(manifest, str(tmp_path / "out"))
    step1x = {"family": "step1x", "weights": str(tmp_path / "weights")}
    models = {
        "apache-2.0": [step1x, {**step1x, "options": {"variant": "step1x"}},
                       {"family": "qwen-image-edit", "weights": str(tmp_path / "weights")}],
        "other": [{**step1x, "options": {"variant": "realrestorer"}}, {"family": "null"}],
    }
    for expected, configs in models.items():
        for model in configs:
            assert weights_license(parse_synthesize_config({**raw, "model": model})) == expected, model
    realrestorer = models["other"][0]
    chosen = parse_synthesize_config({**raw, "model": realrestorer, "pairs": {"weights_license": "cc-by-nc-4.0"}})
    assert weights_license(chosen) == "cc-by-nc-4.0"  # a value in the config wins

    # the card and dataset_info of a RealRestorer-variant job (no Ray: nothing edited, nothing exported)
    sj = parse_synthesize_config({**raw, "model": realrestorer})
    result = export_dataset(sj, prepare_work(sj))
    assert result.rows == 0 and result.by_error_type == {"not_done": 1}
    info = json.loads((tmp_path / "out/dataset/dataset_info.json").read_text())
    assert info["model"]["weights_license"] == "other"
    assert info["model"]["model_id"].startswith("step1x-edit[realrestorer]")
    card = (tmp_path / "out/dataset/README.md").read_text()
    assert "weights licence: other" in card and "- model weights: other" in card and "apache-2.0" not in card


def test_templates_files(tmp_path, s3_bucket):
    (tmp_path / "t.txt").write_text("# comment\nmake it red\n\n  add snow \nmake it red\n")
    assert read_templates(str(tmp_path / "t.txt")) == ["make it red", "add snow"]
    (tmp_path / "t.yaml").write_text("- make it red\n- add snow\n")
    assert read_templates(str(tmp_path / "t.yaml")) == ["make it red", "add snow"]
    write_bytes(f"{s3_bucket}/t.json", json.dumps({"instructions": ["a", "b", "a"]}).encode())
    assert read_templates(f"{s3_bucket}/t.json") == ["a", "b"]
    for name, text in (("bad.yaml", "a: [1, 2]\n"), ("empty.txt", "# nothing\n\n"), ("n.json", "[1]")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError):
            read_templates(str(tmp_path / name))


def test_expansion_counts_seeds_and_ids(tmp_path):
    images = pa.table({"image_uri": [f"img/{i}.png" for i in range(5)] + ["./img/0.png"]})
    manifest = "s3://bkt/sets/images.jsonl"  # fixed sources: the sampling below is reproducible
    sj = parse_synthesize_config(_raw(manifest, str(tmp_path / "out"), templates="t.txt",
                                      instructions_per_image=2, variants=3))
    e = expand_pairs(images, sj, TEMPLATES)
    assert len(e.rows) == 5 * 2 * 3 and e.duplicates_dropped == 2 * 3  # ./img/0.png is img/0.png
    assert len({r["id"] for r in e.rows}) == len(e.rows)
    by_pair = defaultdict(list)
    for r in e.rows:
        assert r["image_uri"] == f"s3://bkt/sets/img/{Path(r['image_uri']).name}"
        assert r["id"] == pair_id(r["image_uri"], r["instruction"], r["variant"])
        assert r["output_key"] == f"pairs/images/{r['id']}.png"
        assert 0 <= r["seed"] < SEED_LIMIT
        by_pair[(r["image_uri"], r["instruction"])].append(r)
    assert len(by_pair) == 10
    for (src, text), rows in by_pair.items():
        assert sorted(r["variant"] for r in rows) == [0, 1, 2]
        assert len({r["seed"] for r in rows}) == 3  # distinct seeds per (image, instruction)
        assert [r["seed"] for r in sorted(rows, key=lambda r: r["variant"])] == variant_seeds(0, src, text, 3)

    def subsets(rows) -> dict:
        out = defaultdict(set)
        for r in rows:
            out[r["image_uri"]].add(r["instruction"])
        return dict(out)

    chosen = subsets(e.rows)
    assert all(len(c) == 2 and c <= set(TEMPLATES) for c in chosen.values())
    assert len({frozenset(c) for c in chosen.values()}) > 1  # sampled per image, not one subset
    assert expand_pairs(images, sj, TEMPLATES).rows == e.rows  # deterministic
    other = parse_synthesize_config(_raw(manifest, str(tmp_path / "out"), templates="t.txt",
                                         instructions_per_image=2, variants=3, sample_seed=7))
    assert subsets(expand_pairs(images, other, TEMPLATES).rows) != chosen
    # more variants keep the earlier seeds; another seed base draws new ones
    assert variant_seeds(0, "s", "t", 5)[:3] == variant_seeds(0, "s", "t", 3)
    assert set(variant_seeds(1, "s", "t", 3)).isdisjoint(variant_seeds(0, "s", "t", 3))
    # all templates when no N; an instruction column may hold text or a list of texts
    sj_all = parse_synthesize_config(_raw(manifest, str(tmp_path / "out"), templates="t.txt", variants=2))
    assert len(expand_pairs(images.slice(0, 2), sj_all, TEMPLATES).rows) == 2 * 4 * 2
    col = pa.table({"image_uri": ["a.png", "b.png", "c.png"],
                    "instruction": [["x", "y", "x"], ["z"], None]})
    rows = expand_pairs(col, parse_synthesize_config(_raw(manifest, str(tmp_path / "out"), variants=2)), None).rows
    assert [(Path(r["image_uri"]).name, r["instruction"], r["variant"]) for r in rows] == [
        ("a.png", "x", 0), ("a.png", "x", 1), ("a.png", "y", 0), ("a.png", "y", 1),
        ("b.png", "z", 0), ("b.png", "z", 1),
        ("c.png", None, 0)]  # no instruction: one row that the job logs as an error


def test_multi_reference_sources_expand_and_export(ray_local, tmp_path):
    """A source of several images (a list, or a JSON list in text): every pair made from it reads
    all of them in order, through the job and into the exported dataset's ``source_images``."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        (folder / f"p{i}.png").write_bytes(_png(i))
    manifest = _jsonl(folder / "images.jsonl", [
        {"image_uris": '["p0.png", "p1.png"]', "instruction": "combine them"},
        {"image_uris": '["p2.png"]', "instruction": "make it red"},
    ])
    raw = _raw(manifest, str(tmp_path / "out"), image_column="image_uris", variants=2)
    raw["model"] = {"family": "job_plugins:MeanOfInputs", "options": {"max_images": 2}}
    sj = parse_synthesize_config(raw)
    rows = expand_pairs(pa.table({"image_uris": ['["p0.png", "p1.png"]', '["p2.png"]']}), sj, ["x"])
    assert rows.rows[0]["image_uris"] == [str(folder / "p0.png"), str(folder / "p1.png")]
    assert rows.rows[2]["image_uri"] == str(folder / "p2.png") and rows.rows[2]["image_uris"] is None
    summary = run_synthesize(sj)
    assert summary.ok and summary.edit["by_status"] == {"ok": 4}
    table = pq.read_table(str(tmp_path / "out" / "dataset" / "data"))
    got = {(tuple(r["source_images"]), r["variant"]) for r in table.to_pylist()}
    assert got == {((str(folder / "p0.png"), str(folder / "p1.png")), 0), ((str(folder / "p0.png"), str(folder / "p1.png")), 1),
                   ((str(folder / "p2.png"),), 0), ((str(folder / "p2.png"),), 1)}
    pair = next(r for r in table.to_pylist() if len(r["source_images"]) == 2)
    assert pair["source_image_uri"] == pair["source_image"]["path"] == str(folder / "p0.png")
    assert pair["source_image"]["bytes"] == _png(0)
    edited = decode_image(read_bytes(pair["edited_image_uri"]), 10**6)
    assert pair["edited_image"]["bytes"] == read_bytes(pair["edited_image_uri"])
    mean = np.stack([decode_image(_png(0), 10**6), decode_image(_png(1), 10**6)]).mean(0).round().astype(np.uint8)
    assert np.array_equal(edited, mean)  # both references reached the model, in order


def test_split_is_a_function_of_the_source():
    sources = [f"s3://b/images/{i:05d}.jpg" for i in range(4000)]
    splits = [split_of(s, 0.2) for s in sources]
    assert splits == [split_of(s, 0.2) for s in sources]
    share = splits.count("validation") / len(splits)
    assert 0.17 < share < 0.23, share
    assert {split_of(s, 0.0) for s in sources[:200]} == {"train"}
    # a larger fraction only moves sources from train to validation
    assert all(split_of(s, 0.5) == "validation" for s, sp in zip(sources, splits) if sp == "validation")


# --------------------------------------------------------------------------------------------
# The job, end to end.


def _pick_images(folder: Path, per_split: int) -> list[str]:
    """Image names with ``per_split`` sources in each split at fraction 0.5 (the split hashes the
    absolute path, which changes with the temporary folder)."""
    want = {"train": per_split, "validation": per_split}
    names = []
    for i in range(200):
        name = f"photo-{i}.png"
        s = split_of(str(folder / name), 0.5)
        if want[s]:
            want[s] -= 1
            names.append(name)
        if not any(want.values()):
            return names
    raise AssertionError("could not find sources for both splits")


def test_pairs_end_to_end_rerun_and_export_modes(ray_local, tmp_path):
    import datasets

    from step1x_batch.recipes.synthesize import main

    folder = tmp_path / "in"
    folder.mkdir()
    names = _pick_images(folder, 2)
    for i, name in enumerate(names):
        (folder / name).write_bytes(_png(i))
    rows = [{"image_uri": n, "tag": "x"} for n in names] + [{"image_uri": "missing.png"},
                                                           {"image_uri": "./" + names[0]}]  # a duplicate
    manifest = _jsonl(folder / "images.jsonl", rows)
    (folder / "templates.txt").write_text("\n".join(TEMPLATES[:3]) + "\n")
    out = tmp_path / "out"
    raw = _raw(manifest, str(out), templates=str(folder / "templates.txt"),
               instructions_per_image=2, variants=2, validation_fraction=0.5)
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert main(["--config", str(cfg), "--set", "runtime.run_id=p1", "--set", "pairs.name=unit-pairs"]) == 0

    # the dataset: 4 sources x 2 instructions x 2 variants ok; the missing source's 4 rows counted
    info = json.loads((out / "dataset/dataset_info.json").read_text())
    assert info["counts"]["rows"] == 16 and info["counts"]["planned"] == 20
    assert info["counts"]["failed"] == 4 and info["counts"]["by_error_type"] == {"missing_object": 4}
    assert info["counts"]["by_split"] == {"train": 8, "validation": 8}
    assert info["counts"]["duplicates_dropped"] == 4  # the duplicate image's 2 x 2 rows
    assert info["model"]["weights_license"] == "other" and info["name"] == "unit-pairs"  # the null family's
    assert info["source_manifest"] == manifest and info["created_at"]
    card = (out / "dataset/README.md").read_text()
    front = _front_matter(card)
    assert front["license"] == "other" and front["task_categories"] == ["image-to-image"]
    assert front["configs"][0]["data_files"] == [{"split": "train", "path": "data/train-*.parquet"},
                                                 {"split": "validation", "path": "data/validation-*.parquet"}]
    assert "missing_object 4" in card and "- model weights: other" in card
    loading = card.split("## Loading", 1)[1]
    assert 'pair["edited_image"]      # a PIL.Image.Image' in loading and "edited_image_uri" in loading
    assert "self-contained" in card and "not embedded" not in card
    shards = sorted((out / "dataset/data").iterdir())
    assert [p.name for p in shards] == ["train-00000-of-00001.parquet", "validation-00000-of-00001.parquet"]

    table = pa.concat_tables(pq.read_table(p) for p in shards)
    assert table.column_names == COLUMNS and table.num_rows == 16
    embedded_schema = pq.read_schema(shards[0])
    recs = table.to_pylist()
    keys = [(r["source_image_uri"], r["instruction"], r["seed"], r["num_steps"], r["guidance_scale"],
             r["size_level"], r["negative_prompt"], r["model_id"]) for r in recs]
    assert len(set(keys)) == len(keys)  # deduplicated
    split_by_source = defaultdict(set)
    for r in recs:
        split_by_source[r["source_image_uri"]].add(r["split"])
        assert r["split"] == split_of(r["source_image_uri"], 0.5)
        assert r["model_id"] == "null" and r["num_steps"] == 28
        # the path form: URI columns and the Image structs' path; the bytes: the files as stored
        assert r["edited_image_uri"] == str(out / "pairs/images" / f"{r['id']}.png")
        assert r["source_image_uri"] == r["source_images"][0] and Path(r["source_image_uri"]).parent == folder
        assert r["edited_image"] == {"bytes": Path(r["edited_image_uri"]).read_bytes(), "path": r["edited_image_uri"]}
        assert r["source_image"] == {"bytes": Path(r["source_image_uri"]).read_bytes(), "path": r["source_image_uri"]}
        edited = decode_image(Path(r["edited_image_uri"]).read_bytes(), 10**6)
        assert np.array_equal(edited, decode_image(Path(r["source_image_uri"]).read_bytes(), 10**6))
    assert all(len(s) == 1 for s in split_by_source.values()) and len(split_by_source) == 4
    seeds = defaultdict(set)
    for r in recs:
        seeds[(r["source_image_uri"], r["instruction"])].add(r["seed"])
    assert all(len(s) == 2 for s in seeds.values()) and len(seeds) == 8
    df = pd.read_parquet(out / "dataset/data")
    assert len(df) == 16 and list(df.columns) == COLUMNS
    data_files = {s: str(out / f"dataset/data/{s}-*.parquet") for s in ("train", "validation")}
    ds = datasets.load_dataset("parquet", data_files=data_files, cache_dir=str(tmp_path / "hf"))
    assert {k: v.num_rows for k, v in ds.items()} == {"train": 8, "validation": 8}
    for split in ds.values():
        assert split.features["edited_image"] == split.features["source_image"] == datasets.Image()
        assert split.features["edited_image_uri"] == datasets.Value("string")
        _assert_decoded(split, lambda u: Path(u).read_bytes())
    assert sorted(ds["validation"]["id"]) == sorted(r["id"] for r in recs if r["split"] == "validation")
    assert datasets.Features.from_dict(info["features"]) == ds["train"].features

    # a second run edits nothing and leaves the dataset byte-identical
    before = _folder_bytes(out / "dataset")
    sj = parse_synthesize_config({**raw, "runtime": {**raw["runtime"], "run_id": "p2"},
                                  "pairs": {**raw["pairs"], "name": "unit-pairs"}})
    s2 = run_synthesize(sj)
    assert s2.ok and s2.edit["rows_processed"] == 0 and s2.edit["rows_skipped"] == 20
    assert s2.dataset["unchanged"] and _folder_bytes(out / "dataset") == before
    assert json.loads((out / "pairs/runs/p2.json").read_text())["edit"]["rows_processed"] == 0

    # the same pairs exported without the bytes, 3 rows a shard: the old shards are gone; still
    # Image features, which datasets decodes by opening the (local) paths
    sj.pairs.embed_bytes, sj.pairs.max_shard_rows = False, 3
    result = export_dataset(sj, prepare_work(sj))
    assert not result.unchanged
    names_now = sorted(p.name for p in (out / "dataset/data").iterdir())
    assert names_now == [f"train-{i:05d}-of-00003.parquet" for i in range(3)] + [
        f"validation-{i:05d}-of-00003.parquet" for i in range(3)]
    table = pa.concat_tables(pq.read_table(out / "dataset/data" / n) for n in names_now)
    assert table.column_names == COLUMNS and table.num_rows == 16
    schema = pq.read_schema(out / "dataset/data" / names_now[0])
    assert schema.equals(embedded_schema, check_metadata=True)  # one schema in both modes
    for r in table.to_pylist():
        assert r["edited_image"] == {"bytes": None, "path": r["edited_image_uri"]}
        assert r["source_image"] == {"bytes": None, "path": r["source_image_uri"]}
    ds = datasets.load_dataset("parquet", data_files=data_files, cache_dir=str(tmp_path / "hf2"))
    assert {k: v.num_rows for k, v in ds.items()} == {"train": 8, "validation": 8}
    assert ds["train"].features["edited_image"] == datasets.Image()
    _assert_decoded(ds["validation"], lambda u: Path(u).read_bytes())
    assert json.loads((out / "dataset/dataset_info.json").read_text())["parameters"]["embed_bytes"] is False
    card = (out / "dataset/README.md").read_text()
    assert "**the bytes are not embedded**" in card and "self-contained" not in card


def test_dataset_images_decode_to_the_written_pictures(ray_local, s3_bucket, tmp_path):
    """On object storage (moto S3), with a model whose every output differs from its input and
    from every other row's (input XOR a pattern of the row's seed): the exported dataset, loaded by
    ``load_dataset("parquet")``, ``Dataset.from_parquet`` and ``load_dataset(folder)``, decodes each
    row's ``edited_image`` to exactly that row's output object and ``source_image`` to its source."""
    import datasets
    from job_plugins import _pattern

    sources = {"a.png": _png(3, 32, 24), "b.png": _png(4, 20, 28)}
    for name, data in sources.items():
        write_bytes(f"{s3_bucket}/in/{name}", data)
    write_bytes(f"{s3_bucket}/in/images.jsonl", "".join(
        json.dumps({"image_uri": n, "instruction": ["make it red", "add snow"]}) + "\n" for n in sources).encode())
    out = f"{s3_bucket}/out"
    raw = _raw(f"{s3_bucket}/in/images.jsonl", out, variants=2, validation_fraction=0.0, max_shard_rows=5)
    raw["model"] = {"family": "job_plugins:Seeded"}
    raw["runtime"]["run_id"] = "seeded"
    s = run_synthesize(parse_synthesize_config(raw))
    assert s.ok and s.edit["by_status"] == {"ok": 8} and s.dataset["rows"] == 8

    local = tmp_path / "dataset"  # the folder as a user would download it
    for key in ["README.md", "dataset_info.json", "data/train-00000-of-00002.parquet",
                "data/train-00001-of-00002.parquet"]:
        (local / key).parent.mkdir(parents=True, exist_ok=True)
        (local / key).write_bytes(read_bytes(f"{out}/dataset/{key}"))
    files = sorted(str(p) for p in (local / "data").iterdir())
    loaded = {
        "load_dataset parquet": datasets.load_dataset("parquet", data_files={"train": files},
                                                      cache_dir=str(tmp_path / "hf1"))["train"],
        "from_parquet": datasets.Dataset.from_parquet(files, cache_dir=str(tmp_path / "hf2")),
        "load_dataset folder": datasets.load_dataset(str(local), cache_dir=str(tmp_path / "hf3"))["train"],
    }
    expected = None
    for how, ds in loaded.items():
        assert ds.num_rows == 8, how
        assert ds.features["source_image"] == ds.features["edited_image"] == datasets.Image(), how
        rows = list(ds)
        _assert_decoded(rows, read_bytes)
        got = {}
        for r in rows:
            name = r["source_image_uri"].rsplit("/", 1)[1]
            assert r["source_image_uri"] == f"{s3_bucket}/in/{name}" == r["source_images"][0]
            assert r["edited_image_uri"] == f"{out}/pairs/images/{r['id']}.png"
            source = _pixels(r["source_image"])
            assert np.array_equal(source, decode_image(sources[name], 10**6))
            edited = _pixels(r["edited_image"])
            assert np.array_equal(edited, np.bitwise_xor(source, _pattern(r["seed"], source.shape)))
            got[r["id"]] = edited.tobytes()
        assert len(set(got.values())) == 8  # every row its own picture
        assert expected in (None, got), how
        expected = got
    raw_rows = pq.read_table(files[0]).to_pylist()
    assert raw_rows[0]["edited_image"]["bytes"] == read_bytes(raw_rows[0]["edited_image_uri"])


def test_tiny_step1x_pairs_on_s3(ray_local, s3_bucket, tmp_path):
    from step1x_batch.models.step1x import tiny
    weights = tmp_path / "weights"
    tiny.make_tiny_weights(str(weights), seed=0)
    write_bytes(f"{s3_bucket}/in/a.png", _png(0, 64, 48))
    write_bytes(f"{s3_bucket}/in/images.jsonl",
                (json.dumps({"image_uri": "a.png", "instruction": "make it blue"}) + "\n").encode())
    out = f"{s3_bucket}/out"
    raw = _raw(f"{s3_bucket}/in/images.jsonl", out, variants=2, validation_fraction=0.0)
    raw["model"] = {"family": "step1x", "weights": str(weights), "dtype": "float32", "device": "cpu",
                    "max_batch_size": 2}
    raw["sampling"] = {"num_steps": 2, "size_level": 64}
    raw["runtime"]["run_id"] = "tiny"
    s = run_synthesize(parse_synthesize_config(raw))
    assert s.ok and s.edit["by_status"] == {"ok": 2} and s.dataset["rows"] == 2
    fs, path = arrow_filesystem(f"{out}/dataset/data/train-00000-of-00001.parquet")
    recs = pq.read_table(path, filesystem=fs).to_pylist()
    assert [r["variant"] for r in recs] == [0, 1] and recs[0]["seed"] != recs[1]["seed"]
    assert recs[0]["model_id"].startswith("step1x-edit") and recs[0]["num_steps"] == 2
    assert recs[0]["edited_image"]["bytes"] == read_bytes(recs[0]["edited_image_uri"])
    edits = [decode_image(read_bytes(r["edited_image_uri"]), 10**6) for r in recs]
    source = decode_image(read_bytes(recs[0]["source_image_uri"]), 10**6)
    assert edits[0].shape == source.shape == (48, 64, 3)
    assert not np.array_equal(edits[0], source)  # the model changed the picture
    assert not np.array_equal(edits[0], edits[1])  # another seed, other noise
    card = read_bytes(f"{out}/dataset/README.md").decode()
    assert _front_matter(card)["configs"][0]["data_files"] == [{"split": "train", "path": "data/train-*.parquet"}]
    assert "- model weights: apache-2.0" in card  # Step1X-Edit's licence, from the family


def test_job_entry_point_refuses_bad_inputs(tmp_path):
    import subprocess
    import sys

    manifest = _jsonl(tmp_path / "images.jsonl", [{"picture": "a.png"}])
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(_raw(manifest, str(tmp_path / "out"), variants=2)))
    proc = subprocess.run([sys.executable, str(ROOT / "jobs/synthesize_pairs.py"), "--config", str(cfg),
                           "--set", "pairs.variants=0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "pairs.variants: Input should be greater than or equal to 1" in proc.stderr
    proc = subprocess.run([sys.executable, str(ROOT / "jobs/synthesize_pairs.py"), "--config", str(cfg)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "has no `image_uri` column (named by pairs.image_column)" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
    assert not (tmp_path / "out" / "dataset").exists()
