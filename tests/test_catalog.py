"""Nightly catalog re-rendering on real parts: a local Ray, local folders, the null family.

One catalog lives through a sequence of nights (first render, a no-op night, a night of changes,
a failing item, a run over its error budget, a crash), checking the counts, what was rendered,
and that ``latest`` only ever points at objects that exist.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from step1x_batch import errors
from step1x_batch.recipes.catalog import (
    LATEST_KEY,
    CatalogJob,
    parse_catalog_config,
    plan_catalog,
    read_latest,
    render_key,
    run_catalog,
)
from step1x_batch.job.config import ConfigError
from step1x_batch.io.images import decode_image
from step1x_batch.rows.log import read_logs

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = "put the {product} on a {background} background"



def _png(seed: int) -> bytes:
    img = (np.random.default_rng(seed).random((24, 32, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _catalog(folder: Path, items: list[dict]) -> str:
    path = folder / "catalog.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return str(path)


def _item(i: int, **kw) -> dict:
    row = {"item_id": f"sku-{i}", "image_uri": f"img/{i}.png", "product": f"mug {i}",
           "background": "white", "etag": f"v1-{i}"}
    row.update(kw)
    return row


def _raw(manifest: str, out: str, run_id: str, **runtime) -> dict:
    return {
        "input": {"manifest": manifest},
        "output": {"uri": out},
        "model": {"family": "null"},
        "resources": {"edit_batch_size": 16, "io_batch_size": 16},
        "runtime": {"progress_bars": False, "run_id": run_id, "max_error_fraction": 0.5, **runtime},
        "catalog": {"instruction_template": TEMPLATE, "change_marker_column": "etag"},
    }


def _latest_table(out: str):
    return pq.read_table(os.path.join(out, LATEST_KEY))


def _check_latest_objects_exist(out: str) -> dict:
    latest = read_latest(out)
    for item, e in latest.items():
        assert os.path.isfile(e["output_uri"]), f"latest points at a missing object for {item}"
        assert e["output_uri"].endswith(render_key(item, e["fingerprint"], "png"))
    return latest


# --------------------------------------------------------------------------------------------
# Config and planning (no Ray).


def test_config_sections_and_errors(tmp_path):
    raw = _raw(str(tmp_path / "c.jsonl"), str(tmp_path / "out"), "x")
    cj = parse_catalog_config(raw)
    assert cj.catalog.instruction_column is None and cj.catalog.instruction_template == TEMPLATE
    assert parse_catalog_config({**raw, "catalog": {}}).catalog.instruction_column == "instruction"
    for catalog, where in (
        ({"instruction_template": "{0} things"}, "catalog.instruction_template"),
        ({"instruction_template": "{a.__class__}"}, "catalog.instruction_template"),
        ({"instruction_column": "i", "instruction_template": "{a}"}, "catalog: "),
        ({"bogus": 1}, "catalog.bogus"),
    ):
        with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
            parse_catalog_config({**raw, "catalog": catalog})
    with pytest.raises(ConfigError, match=r"runtime\.max_error_fraction"):
        parse_catalog_config({**raw, "runtime": {"max_error_fraction": 2}})
    shipped = yaml.safe_load((ROOT / "configs/rerender-catalog.yaml").read_text())
    cj = parse_catalog_config(shipped)
    assert cj.catalog.change_marker_column == "etag" and cj.job.resources.num_gpus_per_actor == 1


def test_plan_decides_per_item(tmp_path):
    (tmp_path / "img").mkdir()
    items = [_item(0), _item(1), _item(2, background=None), _item(3), _item(3, etag="other"),
             _item(4, etag=""), {**_item(5), "item_id": None}, _item(6)]
    del items[7]["product"]  # a template column missing from this row only
    manifest = _catalog(tmp_path, items)
    cj = parse_catalog_config(_raw(manifest, str(tmp_path / "out"), "p1"))
    work_uri = str(tmp_path / "out/catalog/manifests/p1.parquet")
    plan = plan_catalog(cj, {}, work_uri)
    assert sorted(plan.items) == ["sku-0", "sku-1"] and plan.unchanged == []
    assert plan.work.column("id").to_pylist() == ["sku-0", "sku-1"]
    assert plan.work.column("instruction").to_pylist() == ["put the mug 0 on a white background",
                                                           "put the mug 1 on a white background"]
    why = {(r["id"], r["error_type"]): r["error_message"] for r in plan.invalid}
    assert len(plan.invalid) == 6 and all(code == errors.INVALID_ROW for _, code in why)
    assert "'background'" in why[("sku-2", errors.INVALID_ROW)]  # null template value
    assert "appears 2 times" in why[("sku-3", errors.INVALID_ROW)]
    assert "change marker" in why[("sku-4", errors.INVALID_ROW)]
    assert "no item id" in why[(None, errors.INVALID_ROW)]
    assert "'product'" in why[("sku-6", errors.INVALID_ROW)]  # missing column: a row error
    assert plan.catalog_ids == {f"sku-{i}" for i in (0, 1, 2, 3, 4, 6)}
    # a template column the whole catalog lacks: every row is an error row, not a crash
    raw = _raw(manifest, str(tmp_path / "out"), "p1")
    raw["catalog"]["instruction_template"] = "make it {colour}"
    none = plan_catalog(parse_catalog_config(raw), {}, work_uri)
    assert none.work.num_rows == 0 and len(none.invalid) == len(items)
    assert "has no column 'colour'" in none.invalid[0]["error_message"]
    # against a latest holding sku-0's current fingerprint: sku-0 is unchanged, sku-1 is work
    fp0 = plan.items["sku-0"]["fingerprint"]
    assert plan.work.column("output_key").to_pylist()[0] == render_key("sku-0", fp0, "png")
    plan2 = plan_catalog(cj, {"sku-0": {"fingerprint": fp0}}, work_uri)
    assert plan2.unchanged == ["sku-0"] and plan2.work.column("id").to_pylist() == ["sku-1"]

    # the fingerprint follows the marker, the instruction, the model and pixel-changing parameters
    def fp(items_, **over) -> str:
        raw = _raw(_catalog(tmp_path, items_), str(tmp_path / "out"), "p2")
        for section, values in over.items():
            raw[section] = {**raw.get(section, {}), **values}
        return plan_catalog(parse_catalog_config(raw), {}, work_uri).items["sku-0"]["fingerprint"]

    base = fp([_item(0)])
    assert fp([_item(0)]) == base
    assert fp([_item(0, etag="v2")]) != base
    assert fp([_item(0, background="black")]) != base
    assert fp([_item(0, image_uri="img/other.png")]) != base
    assert fp([_item(0, product="mug 0", extra_column="ignored")]) == base
    assert fp([_item(0)], model={"model_id": "another-model"}) != base
    assert fp([_item(0)], sampling={"num_steps": 27}) != base
    assert fp([_item(0)], output={"format": "webp"}) != base


def test_plan_pins_adapters_before_the_fingerprints(tmp_path):
    """Called without the entry point (which pins them), planning stages and hashes the adapters
    itself: the fingerprints follow an adapter's content."""
    manifest = _catalog(tmp_path, [_item(0)])
    adapter = tmp_path / "style.safetensors"
    work_uri = str(tmp_path / "out/catalog/manifests/a.parquet")

    def fingerprint(content: bytes) -> str:
        adapter.write_bytes(content)
        raw = _raw(manifest, str(tmp_path / "out"), "a")
        raw["model"] = {"family": "step1x", "weights": str(tmp_path / "weights"), "adapters": [{"uri": str(adapter)}]}
        cj = parse_catalog_config(raw)
        assert cj.job.model.adapters[0].sha256 is None  # parsing stages nothing
        return plan_catalog(cj, {}, work_uri).items["sku-0"]["fingerprint"]

    assert fingerprint(b"one") == fingerprint(b"one") != fingerprint(b"two")


# --------------------------------------------------------------------------------------------
# The nights, end to end.


def test_catalog_nights(ray_local, tmp_path, monkeypatch):
    imgs = tmp_path / "img"
    imgs.mkdir()
    for i in range(6):
        (imgs / f"{i}.png").write_bytes(_png(i))
    out = str(tmp_path / "out")
    items = [_item(i) for i in range(5)]

    def night(run_id: str, items_: list[dict], **runtime):
        return run_catalog(parse_catalog_config(_raw(_catalog(tmp_path, items_), out, run_id, **runtime)))

    # Night 1: everything is new.
    s1 = night("n1", items)
    assert s1.published and s1.status == "published"
    assert {k: s1.counts[k] for k in ("new", "changed", "unchanged", "failed", "removed", "rendered")} == {
        "new": 5, "changed": 0, "unchanged": 0, "failed": 0, "removed": 0, "rendered": 5}
    latest1 = _check_latest_objects_exist(out)
    assert sorted(latest1) == [f"sku-{i}" for i in range(5)]
    recs = {r["id"]: r for r in read_logs(out).to_pylist()}
    for item, e in latest1.items():  # our fingerprints are the job's
        assert (recs[item]["fingerprint"], recs[item]["output_uri"], recs[item]["run_id"]) == (
            e["fingerprint"], e["output_uri"], "n1")
        assert e["instruction"] == f"put the mug {item[-1]} on a white background"
    run1 = json.loads(Path(out, "catalog/runs/n1.json").read_text())
    assert run1["counts"]["new"] == 5 and run1["status"] == "published"

    # Night 2: nothing changed -> nothing rendered, latest identical.
    before = _latest_table(out)
    s2 = night("n2", items)
    assert s2.published and s2.counts["unchanged"] == 5 and s2.counts["processed"] == 0
    assert s2.counts["rendered"] == s2.counts["new"] == s2.counts["changed"] == 0
    assert s2.edit is None  # no edit run at all
    assert _latest_table(out).equals(before)
    assert not read_logs(out, run_id="n2").num_rows

    # Night 3: sku-1's image replaced (new marker), sku-2's instruction changed, sku-5 added,
    # sku-4 removed, sku-6 added without a template value (an error row, not a crash), and sku-3
    # now points at a missing image: it fails and keeps its previous render.
    old1 = Path(latest1["sku-1"]["output_uri"]).read_bytes()
    (imgs / "1.png").write_bytes(_png(101))
    items3 = [_item(0), _item(1, etag="v2-1"), _item(2, background="black"),
              _item(3, image_uri="img/missing.png", etag="v2-3"), _item(5), _item(6, product=None)]
    s3 = night("n3", items3)
    assert {k: s3.counts[k] for k in ("new", "changed", "unchanged", "failed", "removed", "rendered", "processed")} == {
        "new": 1, "changed": 2, "unchanged": 1, "failed": 2, "removed": 1, "rendered": 3, "processed": 4}
    assert s3.failed_by_error_type == {errors.INVALID_ROW: 1, errors.MISSING_OBJECT: 1}
    assert s3.published and s3.error_fraction == 0.4  # 2 errors of 5 rows attempted
    latest3 = _check_latest_objects_exist(out)
    assert sorted(latest3) == ["sku-0", "sku-1", "sku-2", "sku-3", "sku-5"]
    n3 = read_logs(out, run_id="n3").to_pylist()
    assert {r["id"] for r in n3} == {"sku-1", "sku-2", "sku-3", "sku-5", "sku-6"}
    assert {r["id"] for r in n3 if r["status"] == "ok"} == {"sku-1", "sku-2", "sku-5"}  # re-rendered
    for same in ("sku-0", "sku-3"):  # unchanged; failed: keeps its previous render
        assert latest3[same] == latest1[same]
    for changed in ("sku-1", "sku-2"):
        assert latest3[changed]["output_uri"] != latest1[changed]["output_uri"]
        assert latest3[changed]["run_id"] == "n3"
    assert Path(latest1["sku-1"]["output_uri"]).read_bytes() == old1  # the old render untouched
    new1 = decode_image(Path(latest3["sku-1"]["output_uri"]).read_bytes(), 10**6)
    assert np.array_equal(new1, decode_image(_png(101), 10**6))  # null family: the new picture
    assert latest3["sku-2"]["instruction"].endswith("black background")
    # Night 4: over the error budget (sku-0 broken too) -> not published; sku-2's new instruction
    # was rendered in that run, though.
    latest_bytes = Path(out, LATEST_KEY).read_bytes()
    items4 = [_item(0, image_uri="img/missing.png", etag="v3-0"), _item(1, etag="v2-1"),
              _item(2, background="green"), items3[3], _item(5), _item(6, product=None)]
    raw4 = _raw(_catalog(tmp_path, items4), out, "n4", max_error_fraction=0.4)
    cfg_path = tmp_path / "n4.yaml"
    cfg_path.write_text(yaml.safe_dump(raw4))
    from step1x_batch.recipes.catalog import main

    assert main(["--config", str(cfg_path)]) == 1
    assert Path(out, LATEST_KEY).read_bytes() == latest_bytes
    run4 = json.loads(Path(out, "catalog/runs/n4.json").read_text())
    assert run4["status"] == "failed" and not run4["published"] and run4["error_fraction"] == 0.5
    assert not Path(out, "catalog/history/n4.parquet").exists()

    # Night 5: the same catalog within budget: sku-2's render from night 4 is reused, not redone;
    # the failures of earlier nights (final errors, the same rows) are not attempted again.
    s5 = night("n5", items4, max_error_fraction=0.0)
    assert s5.published and s5.counts["processed"] == 0 and s5.counts["skipped_done"] == 3
    assert (s5.counts["changed"], s5.counts["reused"], s5.counts["rendered"], s5.counts["failed"]) == (1, 1, 0, 3)
    latest5 = _check_latest_objects_exist(out)
    assert latest5["sku-2"]["run_id"] == "n4" and latest5["sku-0"] == latest1["sku-0"]
    sku6 = [r for r in read_logs(out).to_pylist() if r["id"] == "sku-6"]
    assert len(sku6) == 1 and sku6[0]["status"] == "error" and sku6[0]["run_id"] == "n3"

    # A crash inside the edit run: latest untouched, the run json says so, the error propagates.
    import step1x_batch.job.runner as runner

    def boom(cfg, facts=None, lease=None):
        raise RuntimeError("the cluster went away")

    monkeypatch.setattr(runner, "run_job", boom)
    latest_bytes = Path(out, LATEST_KEY).read_bytes()
    with pytest.raises(RuntimeError, match="went away"):
        night("n6", [_item(0, etag="v4-0")] + items4[1:])
    assert Path(out, LATEST_KEY).read_bytes() == latest_bytes
    assert json.loads(Path(out, "catalog/runs/n6.json").read_text())["status"] == "crashed"


def test_missing_columns_refused_up_front(tmp_path):
    from step1x_batch.recipes.catalog import InputError

    manifest = _catalog(tmp_path, [{"item_id": "a", "image_uri": "a.png", "product": "x", "background": "y"}])
    cj: CatalogJob = parse_catalog_config(_raw(manifest, str(tmp_path / "out"), "m"))
    with pytest.raises(InputError, match="etag"):
        run_catalog(cj)
    assert not (tmp_path / "out" / LATEST_KEY).exists()


def test_job_entry_point_refuses_a_bad_config(tmp_path):
    import subprocess
    import sys

    raw = _raw(str(tmp_path / "c.jsonl"), str(tmp_path / "out"), "bad")
    raw["catalog"]["change_marker"] = "etag"  # a typo of change_marker_column
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, str(ROOT / "jobs/rerender_catalog.py"), "--config", str(cfg)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "catalog.change_marker: Extra inputs are not permitted" in proc.stderr


def test_catalog_items_with_several_images(ray_local, tmp_path):
    """An item shown by several pictures (the catalog's image column holds a list): rendered from
    all of them, published with every input; a change of its marker re-renders it."""
    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.png").write_bytes(_png(i))
    items = [_item(0, image_uri=["img/0.png", "img/1.png"]), _item(1, image_uri=["img/2.png"])]
    out = str(tmp_path / "out")
    raw = _raw(_catalog(tmp_path, items), out, "multi-1")
    raw["model"] = {"family": "job_plugins:MeanOfInputs", "options": {"max_images": 2}}
    summary = run_catalog(parse_catalog_config(raw))
    assert summary.published and summary.counts["new"] == 2 and summary.counts["failed"] == 0
    latest = _check_latest_objects_exist(out)
    assert latest["sku-0"]["image_uris"] == [str(tmp_path / "img/0.png"), str(tmp_path / "img/1.png")]
    assert latest["sku-1"]["image_uris"] == [str(tmp_path / "img/2.png")]
    render = decode_image(open(latest["sku-0"]["output_uri"], "rb").read(), 10**6)
    mean = np.stack([decode_image(_png(0), 10**6), decode_image(_png(1), 10**6)]).mean(0).round().astype(np.uint8)
    assert np.array_equal(render, mean)
    items[0]["etag"] = "v2-0"
    again = run_catalog(parse_catalog_config({**_raw(_catalog(tmp_path, items), out, "multi-2"), "model": raw["model"]}))
    assert again.published and again.counts["changed"] == 1 and again.counts["unchanged"] == 1
