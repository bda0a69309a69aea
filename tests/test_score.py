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
