"""``step1x-batch score``: every current edit scored once per score key, on a real local Ray.

A rerun scores nothing, another judge (or prompt set) scores every row again, a re-edited row is
scored anew; scoring writes no image; an answer that cannot be read is a score error with the raw
answer kept, a judge that does not answer in time a transient one the next run asks again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.compute as pc
import pytest
import yaml

from step1x_batch.cli import main
from step1x_batch.judge.scores import current_scores, read_scores
from step1x_batch.rows.log import read_logs


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _edit(tmp_path: Path, image_factory, family: str = "null", n: int = 4, name: str = "out") -> Path:
    """An output root edited by ``family`` (null: every output is its input)."""
    for i in range(n):
        (tmp_path / f"in{i}.png").write_bytes(image_factory.bytes(width=72 + 8 * i, height=64))
    rows = [{"id": f"r{i}", "image_uri": f"in{i}.png", "instruction": f"make it red {i}",
             "task_type": "color_alter" if i % 2 else "style_change"} for i in range(n)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({
        "input": {"manifest": str(tmp_path / "m.jsonl")}, "output": {"uri": str(tmp_path / name)},
        "model": {"family": family},
        "resources": {"edit_batch_size": 4, "io_batch_size": 4},
        "runtime": {"progress_bars": False, "run_id": "edit"},
    }))
    assert main(["run", str(cfg)]) == 0
    return tmp_path / name


def _judge_file(tmp_path: Path, judge: dict, name: str = "judge.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"judge": judge, "runtime": {"run_id": name.split(".")[0]}}))
    return path


def test_metrics_only_scores_every_row_once_and_writes_no_image(ray_local, tmp_path, image_factory, capsys):
    out = _edit(tmp_path, image_factory, "null")
    before = _files(out)
    judge = _judge_file(tmp_path, {"engine": "none", "category_column": "task_type"})
    assert main(["score", str(out), "--config", str(judge)]) == 0
    assert "scored 4 of 4 rows" in capsys.readouterr().out
    added = _files(out) - before
    assert added and all(p.startswith("scores/") or p.startswith("_lease") for p in added), added
    assert {p for p in before if p.startswith("images/")} == {p for p in _files(out) if p.startswith("images/")}

    scores = read_scores(str(out))
    assert sorted(scores.column("id").to_pylist()) == ["r0", "r1", "r2", "r3"]
    assert set(scores.column("status").to_pylist()) == {"ok"}
    metrics = scores.column("metrics").to_pylist()
    assert all(m["unchanged"] and m["changed_fraction"] == 0.0 for m in metrics)  # null returns its input
    assert set(scores.column("category").to_pylist()) == {"color_alter", "style_change"}
    fps = dict(zip(*(read_logs(str(out)).column(c).to_pylist() for c in ("id", "fingerprint"))))
    assert dict(zip(scores.column("id").to_pylist(), scores.column("fingerprint").to_pylist())) == fps

    again = _judge_file(tmp_path, {"engine": "none", "category_column": "task_type"}, "again.yaml")
    assert main(["score", str(out), "--config", str(again)]) == 0
    assert "scored 0 of 4 rows (4 already scored" in capsys.readouterr().out
    assert read_scores(str(out)).num_rows == 4

    # another judge (a metric setting is part of its id): every row again, the old scores kept
    other = _judge_file(tmp_path, {"engine": "none", "metrics": {"unchanged_tolerance": 0}}, "other.yaml")
    assert main(["score", str(out), "--config", str(other)]) == 0
    records = read_scores(str(out))
    assert records.num_rows == 8 and len(set(records.column("score_key").to_pylist())) == 8
    summary = json.loads((out / "scores" / "other" / "summary.json").read_text())
    assert summary["scored"] == 4 and summary["candidates"] == 4


def test_a_re_edited_row_is_scored_anew(ray_local, tmp_path, image_factory, capsys):
    out = _edit(tmp_path, image_factory, "null")
    judge = _judge_file(tmp_path, {"engine": "none"})
    assert main(["score", str(out), "--config", str(judge)]) == 0
    # the same ids edited again by another model: new fingerprints, the seeded edits change pixels
    cfg = yaml.safe_load((tmp_path / "out.yaml").read_text())
    cfg["model"] = {"family": "job_plugins:Seeded"}
    cfg["runtime"]["run_id"] = "edit2"
    (tmp_path / "out.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "out.yaml")]) == 0
    again = _judge_file(tmp_path, {"engine": "none"}, "again.yaml")
    capsys.readouterr()
    assert main(["score", str(out), "--config", str(again)]) == 0
    assert "scored 4 of 4 rows (0 already scored" in capsys.readouterr().out
    latest = read_logs(str(out)).filter(pc.equal(read_logs(str(out)).column("run_id"), "edit2"))
    keys = set(read_scores(str(out)).filter(pc.equal(read_scores(str(out)).column("run_id"), "again"))
               .column("fingerprint").to_pylist())
    assert keys == set(latest.column("fingerprint").to_pylist())
    current = read_scores(str(out)).filter(pc.equal(read_scores(str(out)).column("run_id"), "again"))
    assert not any(m["unchanged"] for m in current.column("metrics").to_pylist())


def test_an_unreachable_judge_is_refused_before_anything_is_written(tmp_path, image_factory, capsys):
    (tmp_path / "out").mkdir()
    judge = _judge_file(tmp_path, {"engine": "http", "url": "http://127.0.0.1:9/v1", "model": "judge"})
    assert main(["score", str(tmp_path / "out"), "--config", str(judge)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert _files(tmp_path / "out") == set()

    missing = _judge_file(tmp_path, {"engine": "transformers", "model": str(tmp_path / "nowhere")}, "t.yaml")
    assert main(["score", str(tmp_path / "out"), "--config", str(missing)]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert _files(tmp_path / "out") == set()


def test_a_key_in_the_judge_config_is_refused(tmp_path, capsys):
    judge = _judge_file(tmp_path, {"engine": "http", "url": "http://127.0.0.1:9/v1", "model": "j",
                                   "api_key": "sk-abcdefghijklmnopqrstuvwxyz"})
    assert main(["score", str(tmp_path), "--config", str(judge)]) == 2
    err = capsys.readouterr().err
    assert "api_key_env" in err and "sk-abc" not in err


def _edit_marked(tmp_path: Path, image_factory, markers: list[str]) -> Path:
    """An output root (seeded edits) whose instructions carry the judge server's markers."""
    for i, _ in enumerate(markers):
        (tmp_path / f"in{i}.png").write_bytes(image_factory.bytes(width=72 + 8 * i, height=64))
    rows = [{"id": f"r{i}", "image_uri": f"in{i}.png", "instruction": f"make it red {m}"}
            for i, m in enumerate(markers)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "edit.yaml"
    cfg.write_text(yaml.safe_dump({
        "input": {"manifest": str(tmp_path / "m.jsonl")}, "output": {"uri": str(tmp_path / "out")},
        "model": {"family": "job_plugins:Seeded"},
        "resources": {"edit_batch_size": 8, "io_batch_size": 8},
        "runtime": {"progress_bars": False, "run_id": "edit"},
    }))
    assert main(["run", str(cfg)]) == 0
    return tmp_path / "out"


def test_http_judge_answers_become_scores_or_score_errors_with_the_raw_answer(ray_local, tmp_path, image_factory,
                                                                              capsys):
    from judge_server import JudgeServer, answer, by_marker, scores, slow

    markers = ["[ok]", "[junk]", "[range]", "[cut]", "[empty]", "[slow]"]
    out = _edit_marked(tmp_path, image_factory, markers)
    rule = by_marker({"[ok]": answer(scores(6, 9, reasoning="red as asked")),
                      "[junk]": answer("I think it is fine"),
                      "[range]": answer(scores(7, 12)),
                      "[cut]": answer('{"score": [7, 8], "reason'),
                      "[empty]": answer(""),
                      "[slow]": slow()},
                     default=answer(scores(5, 8)))  # every PQ question (its text has no instruction)
    judge = {"engine": "http", "model": "qwen-judge", "timeout_s": 5, "max_retries": 0,
             "resources": {"batch_size": 8}}
    with JudgeServer(rule) as server:
        cfg = _judge_file(tmp_path, {**judge, "url": server.base_url})
        assert main(["score", str(out), "--config", str(cfg)]) == 0
        sent = [r for r in server.requests if r.images]
    assert all(r.body["temperature"] == 0 and r.body["seed"] == 0 for r in sent)
    assert len(sent) == 12  # SC and PQ for each of the six rows
    records = {r["id"]: r for r in read_scores(str(out)).to_pylist()}
    assert len(records) == 6
    ok = records["r0"]
    assert (ok["status"], ok["score_sc"], ok["score_pq"]) == ("ok", 6.0, 5.0)
    assert ok["score_o"] == pytest.approx((6.0 * 5.0) ** 0.5)
    assert ok["sub_scores"] == {"sc": [6.0, 9.0], "pq": [5.0, 8.0]} and "red as asked" in ok["judge_reason"]
    assert all(r["metrics"]["changed_fraction"] > 0.5 for r in records.values())  # measured, kept through the judge
    expected = {"r1": "judge_unparsable", "r2": "judge_out_of_range", "r3": "judge_unparsable",
                "r4": "judge_unparsable", "r5": "judge_failed"}
    assert {k: records[k]["error_type"] for k in expected} == expected
    assert records["r1"]["judge_raw"] == "I think it is fine"
    assert '"score": [7, 12]' in records["r2"]["judge_raw"]
    assert all("r" + k[1] in records[k]["error_message"] for k in expected)  # says which row

    # the rerun asks again only the row whose judge did not answer (a transient error)
    with JudgeServer(by_marker({}, default=answer(scores(8, 8)))) as server:
        cfg = _judge_file(tmp_path, {**judge, "url": server.base_url}, "again.yaml")
        assert main(["score", str(out), "--config", str(cfg)]) == 0
        asked = [r for r in server.requests if r.images]
    assert len(asked) == 2 and all("[slow]" in r.text for r in asked if "make it red" in r.text)
    current = {r["id"]: r for r in current_scores(str(out)).to_pylist()}
    assert current["r5"]["status"] == "ok" and current["r1"]["error_type"] == "judge_unparsable"


def test_a_transformers_judge_scores_every_row_or_keeps_its_raw_answer(ray_local, tmp_path, image_factory, capsys):
    """The in-process engine end to end on a tiny Qwen2.5-VL made from a seed: its answers are
    noise, so each row ends as scores or as a score error holding the raw answer; never lost."""
    from step1x_batch.models.qwen_vl.tiny import write_tiny_qwen

    out = _edit(tmp_path, image_factory, "job_plugins:Seeded", n=3)
    write_tiny_qwen(tmp_path / "judge", seed=1)
    cfg = _judge_file(tmp_path, {"engine": "transformers", "model": str(tmp_path / "judge"), "dtype": "float32",
                                 "max_tokens": 24, "resources": {"batch_size": 2, "num_cpus": 0.5}})
    assert main(["score", str(out), "--config", str(cfg)]) == 0
    records = read_scores(str(out)).to_pylist()
    assert sorted(r["id"] for r in records) == ["r0", "r1", "r2"]
    for r in records:
        assert r["judge_id"].startswith("transformers:judge#")
        if r["status"] == "ok":
            assert r["score_o"] == pytest.approx((r["score_sc"] * r["score_pq"]) ** 0.5)
        else:
            assert r["error_type"] in ("judge_unparsable", "judge_out_of_range") and r["judge_raw"] is not None
            assert len(r["judge_raw"]) <= 2000
    capsys.readouterr()
    again = _judge_file(tmp_path, {"engine": "transformers", "model": str(tmp_path / "judge"), "dtype": "float32",
                                   "max_tokens": 24, "resources": {"batch_size": 2, "num_cpus": 0.5}}, "again.yaml")
    assert main(["score", str(out), "--config", str(again)]) == 0  # greedy: final answers, nothing asked again
    assert "scored 0 of 3 rows (3 already scored" in capsys.readouterr().out


def test_a_changed_prompt_set_scores_every_row_again(ray_local, tmp_path, image_factory, capsys):
    from judge_server import JudgeServer, answer, by_marker, scores

    out = _edit(tmp_path, image_factory, "job_plugins:Seeded", n=3)
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text(yaml.safe_dump({"name": "catalog", "version": "1", "sc": "Done: {instruction}?", "pq": "Clean?"}))
    with JudgeServer(by_marker({}, default=answer(scores(7, 7)))) as server:
        judge = {"engine": "http", "model": "j", "url": server.base_url, "prompts": str(prompts)}
        assert main(["score", str(out), "--config", str(_judge_file(tmp_path, judge, "v1.yaml"))]) == 0
        assert main(["score", str(out), "--config", str(_judge_file(tmp_path, judge, "v1b.yaml"))]) == 0
        prompts.write_text(yaml.safe_dump({"name": "catalog", "version": "2", "sc": "Done: {instruction}?",
                                           "pq": "Clean?"}))
        assert main(["score", str(out), "--config", str(_judge_file(tmp_path, judge, "v2.yaml"))]) == 0
        texts = [r.text for r in server.requests if r.images]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("scored")]
    assert [line.split(" rows")[0] for line in lines] == ["scored 3 of 3", "scored 0 of 3", "scored 3 of 3"]
    assert len(texts) == 12 and sum(t.startswith("Done: make it red") for t in texts) == 6
    assert len(set(read_scores(str(out)).column("prompt_hash").to_pylist())) == 2


def test_run_with_a_judge_section_edits_then_scores_under_one_lease(ray_local, tmp_path, image_factory, capsys):
    out = _edit(tmp_path, image_factory, "null", n=3)
    cfg = yaml.safe_load((tmp_path / "out.yaml").read_text())
    cfg["judge"] = {"engine": "none"}
    cfg["runtime"]["run_id"] = "judged"
    (tmp_path / "judged.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["run", str(tmp_path / "judged.yaml")]) == 0
    printed = capsys.readouterr().out
    assert "3 skipped as already done" in printed and "scored 3 of 3 rows" in printed
    assert (out / "scores" / "judged" / "summary.json").exists() and (out / "scores" / "judged" / "report.html").exists()
    assert not (out / "_lease.json").exists()  # released at the end
    assert "unchanged" in (out / "scores" / "judged" / "report.html").read_text()


def test_a_pairwise_judge_compares_two_roots_row_by_row(ray_local, tmp_path, image_factory, capsys):
    from judge_server import JudgeServer, answer, by_marker

    a_root = _edit(tmp_path, image_factory, "null", n=4, name="a")
    b_root = _edit(tmp_path, image_factory, "job_plugins:Seeded", n=4, name="b")
    winner = lambda w: answer(json.dumps({"winner": w, "reasoning": f"{w} follows it"}))  # noqa: E731
    rule = by_marker({"red 1": winner("B"), "red 2": winner("tie"), "red 3": answer("both are nice")},
                     default=winner("A"))
    with JudgeServer(rule) as server:
        judge = {"engine": "http", "model": "pvc-judge", "url": server.base_url, "mode": "pairwise",
                 "against": str(b_root), "axis": "visual_consistency"}
        assert main(["score", str(a_root), "--config", str(_judge_file(tmp_path, judge))]) == 0
        asked = [r for r in server.requests if r.images]
    assert len(asked) == 4 and all(len(r.images) == 3 for r in asked)  # the input, edit A, edit B
    records = {r["id"]: r for r in read_scores(str(a_root)).to_pylist()}
    assert {k: records[k]["preference"] for k in ("r0", "r1", "r2")} == {"r0": "A", "r1": "B", "r2": "tie"}
    assert records["r3"]["error_type"] == "judge_unparsable" and records["r3"]["judge_raw"] == "both are nice"
    assert {r["axis"] for r in records.values()} == {"visual_consistency"}
    b_fps = dict(zip(*(read_logs(str(b_root)).column(c).to_pylist() for c in ("id", "fingerprint"))))
    assert all(records[k]["against_fingerprint"] == b_fps[k] for k in records)
    assert not (b_root / "scores").exists()  # the other root is only read
    summary = json.loads((a_root / "scores" / "judge" / "summary.json").read_text())
    assert summary["stats"]["preference"] == {"A": 1, "B": 1, "tie": 1}


@pytest.mark.parametrize("name", ["judge-http.yaml", "judge-vllm.yaml"])
def test_the_shipped_judge_configs_validate(name):
    from step1x_batch.recipes.score import load_score_config

    job = load_score_config(str(Path(__file__).resolve().parents[1] / "configs" / name))
    assert job.judge.engine in ("http", "vllm") and "#" in job.judge.judge_id()


def test_clip_similarity_joins_the_metrics_when_a_folder_is_named(ray_local, tmp_path, image_factory):
    from test_judge_metrics import _tiny_clip

    from step1x_batch.io.images import decode_image
    from step1x_batch.judge.metrics import ClipScorer

    out = _edit(tmp_path, image_factory, "job_plugins:Seeded", n=3)
    _tiny_clip(str(tmp_path / "clip"), seed=2)
    cfg = _judge_file(tmp_path, {"engine": "none", "metrics": {"clip": str(tmp_path / "clip")}})
    assert main(["score", str(out), "--config", str(cfg)]) == 0
    records = read_scores(str(out)).to_pylist()
    logs = {r["id"]: r for r in read_logs(str(out)).to_pylist()}
    rows = [logs[r["id"]] for r in records]
    pixels = lambda uri: decode_image(Path(uri).read_bytes(), 10**8)  # noqa: E731
    expected = ClipScorer(str(tmp_path / "clip")).scores([r["instruction"] for r in rows],
                                                         [pixels(r["image_uris"][0]) for r in rows],
                                                         [pixels(r["output_uri"]) for r in rows])
    for record, (text, direction) in zip(records, expected):
        assert record["metrics"]["clip_text"] == pytest.approx(text, abs=1e-6)
        assert record["metrics"]["clip_direction"] == pytest.approx(direction, abs=1e-6)


def test_run_with_a_judge_scores_each_edit_inside_the_edit_graph(ray_local, tmp_path, image_factory, capsys):
    from judge_server import JudgeServer, answer, by_marker, scores

    for i in range(3):
        (tmp_path / f"in{i}.png").write_bytes(image_factory.bytes(width=64 + 8 * i, height=64))
    rows = [{"id": f"r{i}", "image_uri": f"in{i}.png", "instruction": f"make it red {i}", "task_type": "t"}
            for i in range(3)]
    rows.append({"id": "gone", "image_uri": "missing.png", "instruction": "make it red"})  # an edit error
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with JudgeServer(by_marker({}, default=answer(scores(8, 9)))) as server:
        (tmp_path / "job.yaml").write_text(yaml.safe_dump({
            "input": {"manifest": str(tmp_path / "m.jsonl")}, "output": {"uri": str(tmp_path / "out")},
            "model": {"family": "job_plugins:Seeded"},
            "resources": {"edit_batch_size": 4, "io_batch_size": 2},
            "runtime": {"progress_bars": False, "run_id": "judged", "max_error_fraction": 0.5},
            "judge": {"engine": "http", "url": server.base_url, "model": "j", "category_column": "task_type"},
        }))
        assert main(["run", str(tmp_path / "job.yaml")]) == 0
        asked = [r for r in server.requests if r.images]
    printed = capsys.readouterr().out
    assert "scored 0 of 3 rows (3 already scored" in printed  # the graph scored them; the pass after finds none
    assert len(asked) == 6
    logs = read_logs(str(tmp_path / "out"))
    assert sorted(logs.column("id").to_pylist()) == ["gone", "r0", "r1", "r2"]  # one record per row
    assert logs.filter(pc.equal(logs.column("id"), "gone")).column("error_type").to_pylist() == ["missing_object"]
    records = read_scores(str(tmp_path / "out"))
    assert sorted(records.column("id").to_pylist()) == ["r0", "r1", "r2"]  # the failed edit has no score
    assert set(records.column("run_id").to_pylist()) == {"judged"}
    assert records.column("score_o").to_pylist() == [pytest.approx(8.0)] * 3  # sqrt(min(8, 9) * min(8, 9))
    fps = dict(zip(logs.column("id").to_pylist(), logs.column("fingerprint").to_pylist()))
    assert all(fps[r["id"]] == r["fingerprint"] and r["category"] == "t" for r in records.to_pylist())
    summary = json.loads((tmp_path / "out" / "runs" / "judged" / "summary.json").read_text())
    assert summary["rows_processed"] == 4 and summary["by_status"] == {"ok": 3, "error": 1}


def test_a_bmp_or_rotated_input_reaches_the_judge_upright_as_png(ray_local, tmp_path, image_factory):
    """The edit job reads GIF / BMP / TIFF and EXIF-rotated photos; the judge's API takes PNG, JPEG
    or WebP and never rotates: such an input is sent as its decoded, upright pixels."""
    import base64
    import io

    from PIL import Image

    from judge_server import JudgeServer, answer, by_marker, scores

    (tmp_path / "a.bmp").write_bytes(image_factory.bytes(fmt="BMP", width=64, height=48))
    (tmp_path / "b.jpg").write_bytes(image_factory.exif_rotated(6, width=64, height=48))
    rows = [{"id": "bmp", "image_uri": "a.bmp", "instruction": "make it red"},
            {"id": "rot", "image_uri": "b.jpg", "instruction": "make it blue"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "edit.yaml").write_text(yaml.safe_dump({
        "input": {"manifest": str(tmp_path / "m.jsonl")}, "output": {"uri": str(tmp_path / "out")},
        "model": {"family": "null"}, "runtime": {"progress_bars": False, "run_id": "edit"}}))
    assert main(["run", str(tmp_path / "edit.yaml")]) == 0
    with JudgeServer(by_marker({}, default=answer(scores(7, 7)))) as server:
        cfg = _judge_file(tmp_path, {"engine": "http", "model": "j", "url": server.base_url})
        assert main(["score", str(tmp_path / "out"), "--config", str(cfg)]) == 0
        sc = [r for r in server.requests if "make it" in r.text]
    assert {r["status"] for r in read_scores(str(tmp_path / "out")).to_pylist()} == {"ok"}
    for request in sc:
        first = request.images[0]
        assert first.startswith("data:image/png;base64,") or first.startswith("data:image/jpeg;base64,")
        with Image.open(io.BytesIO(base64.b64decode(first.split(",", 1)[1]))) as im:
            assert im.size == (64, 48) and im.getexif().get(0x0112, 1) in (0, 1)  # upright as stored


def test_a_judge_the_cluster_cannot_place_is_refused_not_waited_for(ray_local, tmp_path, image_factory, capsys):
    out = _edit(tmp_path, image_factory, "null", n=2)
    before = _files(out)
    capsys.readouterr()
    cfg = _judge_file(tmp_path, {"engine": "none", "resources": {"custom": {"judge_gpu": 1}}})
    assert main(["score", str(out), "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "judge_gpu" in err and len(err.strip().splitlines()) == 1
    # no score part, summary or report; only Ray's own log of the start it refused after
    assert {p for p in _files(out) - before if not p.startswith("_lease")} <= {"scores/judge/ray.log"}
