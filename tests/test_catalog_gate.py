"""``catalog.gate``: a new render that fails the quality bar is not published; its item keeps the
version ``latest`` held before (a new item stays unpublished), and the run lists it.

On a real local Ray with the seeded family (every render differs from its input) and a local
OpenAI-compatible judge whose answers are fixed by a marker in the instruction (``[bad]``: a low
semantic-consistency score); plus the metrics-only judge with the null family (every render is
its input, so ``drop_unchanged`` holds back everything).
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import yaml
from PIL import Image

from judge_server import JudgeServer, answer, by_marker, scores
from step1x_batch.job.config import ConfigError
from step1x_batch.judge.scores import read_scores
from step1x_batch.recipes.catalog import LATEST_KEY, main, parse_catalog_config, read_latest, run_catalog

TEMPLATE = "put the {product} on a {background} background"
GATE = {"min_o": 5, "drop_unchanged": True}


def _png(seed: int) -> bytes:
    img = (np.random.default_rng(seed).random((24, 32, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _item(i: int, **kw) -> dict:
    row = {"item_id": f"sku-{i}", "image_uri": f"img/{i}.png", "product": f"mug {i}",
           "background": "white", "etag": f"v1-{i}"}
    row.update(kw)
    return row


def _raw(tmp_path: Path, run_id: str, items: list[dict], judge: dict | None, gate: dict | None,
         family: str = "job_plugins:Seeded") -> dict:
    manifest = tmp_path / f"catalog-{run_id}.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in items))
    raw = {
        "input": {"manifest": str(manifest)},
        "output": {"uri": str(tmp_path / "out")},
        "model": {"family": family},
        "resources": {"edit_batch_size": 16, "io_batch_size": 16},
        "runtime": {"progress_bars": False, "run_id": run_id, "max_error_fraction": 0.5},
        "catalog": {"instruction_template": TEMPLATE, "change_marker_column": "etag"},
    }
    if gate is not None:
        raw["catalog"]["gate"] = gate
    if judge is not None:
        raw["judge"] = judge
    return raw


def _images(tmp_path: Path, n: int) -> None:
    (tmp_path / "img").mkdir(exist_ok=True)
    for i in range(n):
        (tmp_path / "img" / f"{i}.png").write_bytes(_png(i))


def _render_bytes(latest: dict) -> dict[str, bytes]:
    return {item: Path(e["output_uri"]).read_bytes() for item, e in latest.items()}


def test_a_vlm_bar_without_a_vlm_judge_is_refused_in_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError) as caught:
        parse_catalog_config(_raw(tmp_path, "c", [_item(0)], None, {"min_sc": 6}))
    assert "\n" not in str(caught.value) and "catalog.gate" in str(caught.value) and "min_sc" in str(caught.value)
    with pytest.raises(ConfigError, match="min_pq"):
        parse_catalog_config(_raw(tmp_path, "c", [_item(0)], {"engine": "none"}, {"min_pq": 6}))
    cj = parse_catalog_config(_raw(tmp_path, "c", [_item(0)], None, {"drop_unchanged": True}))
    assert cj.judge is not None and cj.judge.engine == "none"
    assert parse_catalog_config(_raw(tmp_path, "c", [_item(0)], None, None)).judge is None
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_raw(tmp_path, "c", [_item(0)], None, {"min_o": 6})))
    assert main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "catalog.gate" in err[0], err
    assert not (tmp_path / "out").exists()


def test_failing_renders_keep_the_previous_version(ray_local, tmp_path, capsys):
    _images(tmp_path, 6)
    out = tmp_path / "out"
    rule = by_marker({"[bad]": answer(scores(1, 2, reasoning="the mug is missing"))})
    with JudgeServer(rule) as server:
        judge = {"engine": "http", "url": server.base_url, "model": "judge", "timeout_s": 30,
                 "max_retries": 0, "resources": {"batch_size": 4}}
        # Night 1, through the job's entry point (the judge's pre-flight included): sku-3 is new and
        # fails the gate, so it is not published.
        night1 = [_item(0), _item(1), _item(2), _item(3, product="mug 3 [bad]")]
        cfg = tmp_path / "n1.yaml"
        cfg.write_text(yaml.safe_dump(_raw(tmp_path, "n1", night1, judge, GATE)))
        assert main(["--config", str(cfg)]) == 0
        printed = capsys.readouterr().out
        assert "1 held back by catalog.gate" in printed and "held back: sku-3 (low_o): not published" in printed
        latest1 = read_latest(str(out))
        assert sorted(latest1) == ["sku-0", "sku-1", "sku-2"]
        bytes1 = _render_bytes(latest1)
        run1 = json.loads((out / "catalog/runs/n1.json").read_text())
        assert run1["published"] and run1["counts"]["new"] == 3 and run1["counts"]["held"] == 1
        assert [(h["item_id"], h["reason"], h["kept"]) for h in run1["held_back"]] == [("sku-3", "low_o", None)]
        assert run1["held_back"][0]["score_sc"] == 1.0 and os.path.isfile(run1["held_back"][0]["render"])
        assert run1["gate"]["bars"]["min_o"] == 5 and run1["gate"]["held_by_reason"] == {"low_o": 1}
        asked = len(server.requests)

        # Night 2: sku-0's picture changes (a good render: updated), sku-1's instruction turns bad
        # (its new render fails: the night-1 version stays), sku-2 is unchanged, sku-3 is still
        # bad (its render is reused and judged by the score it has), sku-4 is new and good.
        (tmp_path / "img" / "0.png").write_bytes(_png(100))
        night2 = [_item(0, etag="v2-0"), _item(1, product="mug 1 [bad]"), _item(2),
                  _item(3, product="mug 3 [bad]"), _item(4)]
        s2 = run_catalog(parse_catalog_config(_raw(tmp_path, "n2", night2, judge, GATE)))
        assert s2.published
        c = s2.counts
        assert (c["new"], c["changed"], c["unchanged"], c["held"], c["failed"]) == (1, 1, 1, 2, 0)
        assert (c["rendered"], c["reused"]) == (3, 1)
        assert len(server.requests) == asked + 2 * 3  # SC and PQ of the three renders made tonight
        held = {h["item_id"]: h for h in s2.held_back}
        assert sorted(held) == ["sku-1", "sku-3"] and {h["reason"] for h in held.values()} == {"low_o"}
        assert held["sku-1"]["kept"] == latest1["sku-1"]["output_uri"] and held["sku-3"]["kept"] is None

        latest2 = read_latest(str(out))
        assert sorted(latest2) == ["sku-0", "sku-1", "sku-2", "sku-4"]
        assert latest2["sku-1"] == latest1["sku-1"] and latest2["sku-2"] == latest1["sku-2"]
        assert Path(latest2["sku-1"]["output_uri"]).read_bytes() == bytes1["sku-1"]  # the previous bytes
        assert held["sku-1"]["render"] != latest2["sku-1"]["output_uri"]
        assert latest2["sku-0"]["run_id"] == "n2" and latest2["sku-0"]["output_uri"] != latest1["sku-0"]["output_uri"]
        assert Path(latest2["sku-0"]["output_uri"]).read_bytes() != bytes1["sku-0"]
        assert latest2["sku-4"]["run_id"] == "n2"
        run2 = json.loads((out / "catalog/runs/n2.json").read_text())
        assert sorted(h["item_id"] for h in run2["held_back"]) == ["sku-1", "sku-3"]
        history = (out / "catalog/history/n2.parquet").read_bytes()
        assert history == (out / LATEST_KEY).read_bytes()

    # every render was scored once under the judge's key, the published ones passing
    records = read_scores(str(out))
    ok = records.filter(pc.equal(records.column("status"), "ok")).to_pylist()
    by_output = {r["output_uri"]: r for r in ok}
    assert len(ok) == len(by_output) == 7  # night 1: four renders; night 2: three more
    for item, entry in latest2.items():
        assert by_output[entry["output_uri"]]["score_o"] >= 5, item


def test_the_metrics_only_gate_holds_back_unchanged_renders(ray_local, tmp_path):
    """The null family returns every input as it is: with drop_unchanged every render is held
    back, the items that had a version keep it, the new ones stay unpublished."""
    _images(tmp_path, 3)
    out = tmp_path / "out"
    s1 = run_catalog(parse_catalog_config(_raw(tmp_path, "m1", [_item(0), _item(1)], None, None, "null")))
    assert s1.published and s1.scores is None and s1.gate is None  # no gate, no judge: nothing scored
    latest1 = read_latest(str(out))
    items = [_item(0, etag="v2-0"), _item(1), _item(2)]
    s2 = run_catalog(parse_catalog_config(_raw(tmp_path, "m2", items, None, {"drop_unchanged": True}, "null")))
    assert s2.published and s2.scores["judge_id"].startswith("none:metrics#")
    assert (s2.counts["held"], s2.counts["new"], s2.counts["changed"], s2.counts["unchanged"]) == (2, 0, 0, 1)
    assert {(h["item_id"], h["reason"]) for h in s2.held_back} == {("sku-0", "unchanged"), ("sku-2", "unchanged")}
    assert read_latest(str(out)) == latest1  # sku-0 keeps its version, sku-2 is not published
    assert s2.gate["held_by_reason"] == {"unchanged": 2}
