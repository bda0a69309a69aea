"""A rerun with nothing left to do (the skip leaves no row) starts no edit actor and loads no
model (issue 17.6): it only compacts, joins and writes its summary."""

from __future__ import annotations

import json

import yaml

from step1x_batch.cli import main
from step1x_batch.rows.log import read_logs


def test_a_noop_rerun_loads_no_model(ray_local, tmp_path, image_factory, capsys):
    (tmp_path / "a.png").write_bytes(image_factory.bytes(width=16, height=12))
    rows = [{"id": f"r{i}", "image_uri": "a.png", "instruction": f"edit {i}"} for i in range(5)]
    rows.append({"id": "gone", "image_uri": "missing.png", "instruction": "edit"})  # a final error
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    loads = tmp_path / "loads.txt"
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump({
        "input": {"manifest": str(tmp_path / "m.jsonl")}, "output": {"uri": str(tmp_path / "out")},
        "model": {"family": "noop_plugins:CountsLoads", "options": {"load_log": str(loads)}},
        "resources": {"edit_batch_size": 4, "io_batch_size": 4},
        "runtime": {"progress_bars": False, "max_error_fraction": 0.5, "run_id": "first"},
    }))
    assert main(["run", str(cfg)]) == 0
    assert len(loads.read_text().splitlines()) >= 1
    loads.write_text("")
    capsys.readouterr()

    assert main(["run", str(cfg), "--set", "runtime.run_id=again"]) == 0
    out = capsys.readouterr().out
    assert loads.read_text() == "", "the no-op rerun loaded the model"
    assert "run again: 0 rows processed (0 ok, 0 error), 6 skipped as already done" in out
    summary = json.loads((tmp_path / "out" / "runs" / "again" / "summary.json").read_text())
    assert summary["status"] == "succeeded" and summary["rows_skipped"] == 6 and summary["rows_processed"] == 0
    assert read_logs(str(tmp_path / "out")).num_rows == 6  # no new record
