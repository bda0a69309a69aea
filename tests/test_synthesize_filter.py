"""``pairs.filter``: the synthetic-pairs dataset holds only the pairs whose current score passes.

On a real local Ray: a family whose output is the mean of its inputs (a one-image source comes
back unchanged, a two-image source changes) and a local OpenAI-compatible judge whose answers are
fixed by a marker in the instruction (``[bad]``: a low SC, ``[junk]``: an answer that cannot be
read). The dataset's rows, the card's and ``dataset_info.json``'s counts and ``dropped.jsonl`` are
checked against the scores log; a rerun writes the same bytes; the metrics-only judge alone drops
the unchanged pairs.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from judge_server import JudgeServer, answer, by_marker, scores
from step1x_batch.job.config import ConfigError
from step1x_batch.judge.config import score_key
from step1x_batch.judge.scores import read_scores
from step1x_batch.recipes.score import prompt_hash
from step1x_batch.recipes.synthesize import parse_synthesize_config, run_config, run_synthesize
from step1x_batch.rows.log import read_logs

INSTRUCTIONS = ["make it red", "add snow [bad]", "draw a cat [junk]"]
SOURCES = {"a": ["a.png"], "bc": ["b.png", "c.png"], "de": ["d.png", "e.png"]}
BASE_COLUMNS = ["source_image", "source_images", "edited_image", "source_image_uri", "edited_image_uri",
                "instruction", "seed", "variant", "num_steps", "guidance_scale", "size_level",
                "negative_prompt", "model_id", "id", "split"]
SCORE_COLUMNS = ["score_sc", "score_pq", "score_o", "changed_fraction"]


def _png(seed: int) -> bytes:
    img = (np.random.default_rng(seed).random((24, 32, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def _raw(tmp_path: Path, run_id: str, judge: dict | None, **pairs) -> dict:
    raw = {
        "input": {"manifest": str(tmp_path / "images.jsonl")},
        "output": {"uri": str(tmp_path / "out")},
        "model": {"family": "job_plugins:MeanOfInputs", "options": {"max_images": 2}},
        "resources": {"edit_batch_size": 16, "io_batch_size": 16},
        "runtime": {"progress_bars": False, "max_error_fraction": 0.5, "run_id": run_id},
        "pairs": {"validation_fraction": 0.3, **pairs},
    }
    if judge is not None:
        raw["judge"] = judge
    return raw


def _inputs(tmp_path: Path) -> None:
    for i, name in enumerate("abcde"):
        (tmp_path / f"{name}.png").write_bytes(_png(i))
    rows = [{"image_uri": uris, "instruction": INSTRUCTIONS}  # a list each (one JSON type)
            for uris in SOURCES.values()]
    (tmp_path / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _dataset(out: Path) -> pa.Table:
    files = sorted((out / "dataset/data").glob("*.parquet"))
    return pa.concat_tables(pq.read_table(f) for f in files)


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _source_name(uri: str) -> str:
    """The SOURCES key of a pair, from its first input's URI."""
    return {files[0]: name for name, files in SOURCES.items()}[Path(uri).name]


def _expected_reason(source: str, instruction: str) -> str | None:
    """The test's own verdict, from what the family and the judge do (not from GateConfig)."""
    if "[junk]" in instruction:
        return "score_judge_unparsable"  # an error record fails first (drop_unscored)
    if len(SOURCES[source]) == 1:
        return "unchanged"  # the mean of one image is that image
    if "[bad]" in instruction:
        return "low_sc"
    return None


def _log_verdicts(out: Path, judge_id: str, hash_: str, min_sc: float | None) -> dict[str, str | None]:
    """id -> reason, computed from the row log and the scores log directly: each pair's ok edit,
    its score record under (fingerprint, judge, prompts), the bars applied by hand."""
    logs = read_logs(str(out)).to_pylist()
    fps = {r["id"]: r["fingerprint"] for r in logs if r["status"] == "ok"}
    recs = {(r["id"], r["score_key"]): r for r in read_scores(str(out)).to_pylist()}
    verdict = {}
    for rid, fp in fps.items():
        rec = recs[(rid, score_key(fp, judge_id, hash_))]
        if rec["status"] != "ok":
            verdict[rid] = f"score_{rec['error_type']}"
        elif rec["metrics"]["unchanged"]:
            verdict[rid] = "unchanged"
        elif min_sc is not None and rec["score_sc"] < min_sc:
            verdict[rid] = "low_sc"
        else:
            verdict[rid] = None
    return verdict


def test_a_vlm_bar_without_a_vlm_judge_is_refused_in_one_line(tmp_path, capsys):
    _inputs(tmp_path)
    raw = _raw(tmp_path, "cfg", None, filter={"min_sc": 5, "drop_unchanged": True})
    with pytest.raises(ConfigError) as caught:
        parse_synthesize_config(raw)
    message = str(caught.value)
    assert "\n" not in message and "pairs.filter" in message and "min_sc" in message and "judge" in message
    with pytest.raises(ConfigError, match="min_o"):  # a judge that only measures is no VLM either
        parse_synthesize_config({**_raw(tmp_path, "cfg", {"engine": "none"}, filter={"min_o": 4})})
    with pytest.raises(ConfigError, match="mode single"):
        parse_synthesize_config(_raw(tmp_path, "cfg", {"engine": "http", "url": "http://127.0.0.1:9/v1",
                                                       "model": "j", "mode": "pairwise",
                                                       "against": str(tmp_path / "other")},
                                     filter={"drop_unchanged": True}))
    # drop_unchanged alone: the metrics-only judge, no judge section needed
    sj = parse_synthesize_config(_raw(tmp_path, "cfg", None, filter={"drop_unchanged": True}))
    assert sj.judge is not None and sj.judge.engine == "none"
    assert parse_synthesize_config(_raw(tmp_path, "cfg", None)).judge is None  # no filter, no judge: no scoring
    with pytest.raises(ConfigError, match=r"pairs\.filter\.min_sc"):
        parse_synthesize_config(_raw(tmp_path, "cfg", None, filter={"min_sc": 11}))
    # the job's entry point: exit status 2, one line, nothing written
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    assert run_config(str(cfg)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "pairs.filter" in err[0], err
    assert not (tmp_path / "out").exists()


def test_filtered_pairs_match_the_scores_log(ray_local, tmp_path):
    _inputs(tmp_path)
    out = tmp_path / "out"
    rule = by_marker({"[bad]": answer(scores(1, 2, reasoning="wrong edit")), "[junk]": answer("no json here")})
    with JudgeServer(rule) as server:
        judge = {"engine": "http", "url": server.base_url, "model": "judge", "timeout_s": 30,
                 "max_retries": 0, "resources": {"batch_size": 4}}
        sj = parse_synthesize_config(_raw(tmp_path, "p1", judge, filter={"min_sc": 5, "drop_unchanged": True}))
        s1 = run_synthesize(sj)
        assert s1.ok and s1.edit["by_status"] == {"ok": 9}
        assert s1.scores["scored"] == 9 and s1.scores["errors"] == {"judge_unparsable": 3}
        asked = len(server.requests)
        assert asked == 18  # SC and PQ for every pair

        # what the dataset holds is what the scores log says passes
        judge_id, hash_ = sj.judge.judge_id(), prompt_hash(sj.judge)
        verdicts = _log_verdicts(out, judge_id, hash_, 5.0)
        table = _dataset(out)
        assert table.column_names == BASE_COLUMNS + SCORE_COLUMNS
        rows = table.to_pylist()
        assert sorted(r["id"] for r in rows) == sorted(i for i, v in verdicts.items() if v is None)
        dropped_by = Counter(v for v in verdicts.values() if v is not None)
        assert dropped_by == {"unchanged": 2, "low_sc": 2, "score_judge_unparsable": 3}
        # ... and what the test expects from the family and the judge
        for r in rows:
            assert _expected_reason(_source_name(r["source_image_uri"]), r["instruction"]) is None
            assert (r["score_sc"], r["score_pq"], r["score_o"]) == (7.0, 7.0, 7.0)  # min(7, 8) each
            assert r["changed_fraction"] > 0.5
        assert len(rows) == 2

        info = json.loads((out / "dataset/dataset_info.json").read_text())
        q = info["quality"]
        assert (q["judge_id"], q["prompt_hash"]) == (judge_id, hash_)
        assert q["kept"] == info["counts"]["rows"] == len(rows) and q["dropped"] == 7
        assert q["dropped_by_reason"] == dict(sorted(dropped_by.items()))
        assert q["filter"]["min_sc"] == 5 and q["filter"]["drop_unchanged"] is True
        assert info["counts"]["duplicates_dropped"] == 0 and info["counts"]["failed"] == 0
        assert sum(info["counts"]["by_split"].values()) == len(rows)
        listed = [json.loads(line) for line in (out / "dataset/dropped.jsonl").read_text().splitlines()]
        assert {d["id"]: d["reason"] for d in listed} == {i: v for i, v in verdicts.items() if v is not None}
        for d in listed:
            assert d["reason"] == _expected_reason(_source_name(d["source_image_uri"]), d["instruction"])
        card = (out / "dataset/README.md").read_text()
        assert "## Quality filter" in card and judge_id in card and hash_ in card
        assert "- kept: 2" in card and "- dropped: 7" in card
        for reason, n in dropped_by.items():
            assert f"`{reason}` {n}" in card
        assert "semantic consistency (SC) at least 5" in card and "dropped.jsonl" in card

        # a rerun: nothing edited, nothing asked, the same dataset bytes
        before = _folder_bytes(out / "dataset")
        s2 = run_synthesize(parse_synthesize_config(_raw(tmp_path, "p2", judge,
                                                         filter={"min_sc": 5, "drop_unchanged": True})))
        assert s2.edit["rows_processed"] == 0 and s2.scores["scored"] == 0 and len(server.requests) == asked
        assert s2.dataset["unchanged"] and _folder_bytes(out / "dataset") == before

    # the metrics-only judge (no judge section): drop_unchanged alone, every pair measured once
    s3 = run_synthesize(parse_synthesize_config(_raw(tmp_path, "p3", None, filter={"drop_unchanged": True})))
    assert s3.ok and s3.scores["scored"] == 9 and s3.dataset["dropped_by_reason"] == {"unchanged": 3}
    rows = _dataset(out).to_pylist()
    assert len(rows) == 6 and all(len(r["source_images"]) == 2 for r in rows)
    assert all(r["score_sc"] is None and r["changed_fraction"] > 0.5 for r in rows)
    info = json.loads((out / "dataset/dataset_info.json").read_text())
    assert info["quality"]["judge_id"].startswith("none:metrics#") and info["quality"]["kept"] == 6
    assert "the image metrics only" in (out / "dataset/README.md").read_text()

    # no filter, no judge: every pair, the base columns only, the dropped list gone
    s4 = run_synthesize(parse_synthesize_config(_raw(tmp_path, "p4", None)))
    assert s4.scores is None and s4.dataset["rows"] == 9
    assert _dataset(out).column_names == BASE_COLUMNS
    assert not (out / "dataset/dropped.jsonl").exists()
    assert "quality" not in json.loads((out / "dataset/dataset_info.json").read_text())
