"""``step1x-batch benchmark``: several models edit the same rows with the same seeds, one judge
scores every edit, one table compares them per category (task type x language), on a real local
Ray with the tiny Step1X model with and without a LoRA in the release's own format, and a local
OpenAI-compatible judge giving SC / PQ / O.

The table's numbers are checked against a computation of their own from the row logs and the scores
logs; a broken model config refuses the whole benchmark before anything is written; a benchmark
killed after its first model resumes without redoing that model's rows or asking its scores again.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from step1x_batch.cli import main
from step1x_batch.judge.metrics import PSNR_CAP
from step1x_batch.judge.scores import mean_interval, read_scores
from step1x_batch.rows.log import read_logs
from step1x_batch.rows.state import latest_per_id

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = {"id": "key", "image": "input_image_raw", "instruction": "instruction"}


# --- inputs ------------------------------------------------------------------------------------


def _input(folder: Path) -> dict:
    """The tiny benchmark as the ``input`` section: its Parquet folder as published (images inside)
    with the column map."""
    from step1x_batch.recipes.tiny_benchmark import make_tiny_benchmark

    path = make_tiny_benchmark(folder / "tiny-benchmark", seed=0)
    return {"manifest": str(path.parent) + "/", "columns": COLUMNS}


def _step1x_lora(path: Path) -> None:
    """A LoRA in the Step1X-Edit release's own (kohya-style) names on the tiny DiT's attention."""
    import torch
    from safetensors.torch import save_file

    from step1x_batch.models.step1x.tiny import tiny_dit_state_dict

    shapes = {k: v.shape for k, v in tiny_dit_state_dict(0).items()}
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for name in ("double_blocks.0.img_attn.qkv", "double_blocks.1.img_attn.qkv", "single_blocks.0.linear1"):
        out_f, in_f = shapes[f"{name}.weight"]
        key = "lora_unet_" + name.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = torch.randn(4, in_f, generator=g) / in_f**0.5
        tensors[f"{key}.lora_up.weight"] = 2.0 * torch.randn(out_f, 4, generator=g)
    save_file(tensors, str(path))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    from step1x_batch.models.step1x.tiny import make_tiny_weights

    folder = tmp_path_factory.mktemp("bench-inputs")
    weights = make_tiny_weights(folder / "weights", seed=0)
    _step1x_lora(folder / "lora.safetensors")
    return {"folder": folder, "weights": str(weights), "lora": str(folder / "lora.safetensors"),
            "input": _input(folder)}


def _step1x(tiny: dict, lora: bool = False, **extra) -> dict:
    model = {"family": "step1x", "weights": tiny["weights"], "dtype": "float32", "device": "cpu",
             "max_batch_size": 4, **extra}
    if lora:
        model["adapters"] = [{"uri": tiny["lora"], "format": "step1x"}]
    return model


def _config(tiny: dict, root: Path, models: dict, judge: dict | None = None, run_id: str = "first") -> dict:
    raw = {"input": tiny["input"], "output": {"uri": str(root)},
           "sampling": {"num_steps": 2, "size_level": 64},
           "resources": {"edit_batch_size": 4, "io_batch_size": 4, "local_num_cpus": 2},
           "runtime": {"progress_bars": False, "run_id": run_id, "lease_ttl_s": 5, "log_part_rows": 4,
                       "log_part_seconds": 0.5},
           "benchmark": {"models": models}}
    if judge is not None:
        raw["judge"] = judge
    return raw


def _write(path: Path, raw: dict) -> str:
    path.write_text(yaml.safe_dump(raw, allow_unicode=True, sort_keys=False))  # models in order
    return str(path)


# --- refusals ----------------------------------------------------------------------------------


REFUSALS = {  # case -> what the one line names
    "missing adapter": "benchmark.models.broken: model.adapters[0].uri",
    "bad option": "benchmark.models.broken.options.no_such_option",
    "weights not a release": "benchmark.models.broken: model.weights",
    "bad baseline": "benchmark.baseline",
    "bad group_by": "benchmark.group_by: no_such_column is not a column of the manifest",
    "bad sampling": "sampling.num_steps",
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_broken_config_refuses_the_whole_benchmark_before_anything_is_written(tiny, tmp_path, capsys, case):
    root = tmp_path / "bench"
    broken = {
        "missing adapter": {**_step1x(tiny), "adapters": [{"uri": str(tmp_path / "nope.safetensors")}]},
        "bad option": _step1x(tiny, options={"no_such_option": 1}),
        "weights not a release": {**_step1x(tiny), "weights": str(tiny["folder"])},
    }.get(case, _step1x(tiny, lora=True))
    raw = _config(tiny, root, {"base": _step1x(tiny), "broken": broken})
    if case == "bad baseline":
        raw["benchmark"]["baseline"] = "nobody"
    if case == "bad group_by":
        raw["benchmark"]["group_by"] = ["task_type", "no_such_column"]
    if case == "bad sampling":
        raw["sampling"]["num_steps"] = 0
    assert main(["benchmark", _write(tmp_path / "b.yaml", raw)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert REFUSALS[case] in err[0], err[0]
    if case == "bad sampling":  # a shared section's problem is nobody's model's
        assert "benchmark.models" not in err[0]
    assert not root.exists()  # no lease, no model root, no table


def test_a_model_section_outside_benchmark_models_is_refused(tiny, tmp_path, capsys):
    raw = _config(tiny, tmp_path / "bench", {"base": _step1x(tiny)})
    raw["model"] = _step1x(tiny)
    assert main(["benchmark", _write(tmp_path / "b.yaml", raw)]) == 2
    assert "benchmark.models" in capsys.readouterr().err


def test_the_shipped_tiny_config_parses_into_one_edit_job_per_model(monkeypatch, tmp_path):
    from step1x_batch.recipes.benchmark import load_benchmark_config

    monkeypatch.chdir(tmp_path)
    bench = load_benchmark_config(str(ROOT / "configs" / "benchmark-tiny.yaml"),
                                  ["benchmark.models.tuned.dtype=bfloat16"])
    assert list(bench.jobs) == ["base", "tuned"] and bench.baseline == "base" and bench.judge.engine == "none"
    assert bench.root == str(tmp_path / "step1x-bench" / "out")
    base, tuned = bench.jobs["base"], bench.jobs["tuned"]
    assert base.output.uri == bench.root + "/models/base" and tuned.output.uri == bench.root + "/models/tuned"
    assert base.input == tuned.input and base.sampling == tuned.sampling and base.input.columns["image"] == "input_image_raw"
    assert base.runtime.run_id == tuned.runtime.run_id  # one run id for every model's run
    assert (base.model.dtype, tuned.model.dtype) == ("float32", "bfloat16")  # --set reaches a model


# --- the independent computation ------------------------------------------------------------------


def _scored_rows(root: Path) -> dict[str, dict]:
    """id -> the ok score of its current edit (the latest ok row record), with the row's extra."""
    logs = read_logs(str(root))
    ok = latest_per_id(logs.filter(np.array([s == "ok" for s in logs.column("status").to_pylist()])))
    edits = {r["id"]: r for r in ok.to_pylist()}
    out = {}
    for rec in read_scores(str(root)).to_pylist():
        edit = edits.get(rec["id"])
        if edit is not None and rec["fingerprint"] == edit["fingerprint"] and rec["status"] == "ok":
            out[rec["id"]] = {**rec, "extra": json.loads(edit["extra"])}
    return out


def _by_hand(base: dict[str, dict], other: dict[str, dict], measure: str) -> dict:
    """Per (task_type, language) and "all": both models' means and the paired differences."""
    groups: dict = {}
    for rid, rec in base.items():
        key = f"{rec['extra']['task_type']} / {rec['extra']['instruction_language']}"
        for label in (key, "all"):
            groups.setdefault(label, []).append(rid)
    out = {}
    for label, ids in groups.items():
        a = [base[i][measure] for i in ids]
        b = [other[i][measure] for i in ids if i in other]
        d = [other[i][measure] - base[i][measure] for i in ids if i in other]
        out[label] = (float(np.mean(a)), float(np.mean(b)), float(np.mean(d)), len(d), d)
    return out


# --- the benchmark end to end ----------------------------------------------------------------------


def _judge_rule():
    """Answers drawn from the images the judge is shown: each edit its own SC and PQ (pairwise:
    its own winner)."""
    from judge_server import answer, scores

    def rule(request):
        h = int(hashlib.sha256("".join(request.images).encode()).hexdigest(), 16)
        if "winner" in request.text or "winner" in (request.system or ""):  # a pairwise question
            return answer(json.dumps({"winner": ["A", "B", "tie"][h % 3], "reasoning": "test judge"}))
        return answer(scores(2 + h % 9, 2 + (h // 9) % 9))

    return rule


def _run_killed_after_first_model(cfg: str, root: Path) -> None:
    """The benchmark in a subprocess, SIGKILLed at its failpoint after the first model."""
    from conftest import expire_local_lease, kill_marked

    marker = f"benchkill-{os.getpid()}-{time.monotonic_ns()}"
    out = root.parent / "killed.out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": f"/tmp/{marker}", "RAY_AUTH_MODE": "disabled",
           "STEP1X_TEST_MARKER": marker, "STEP1X_BATCH_FAILPOINT": "benchmark.after_model"}
    env.pop("RAY_ADDRESS", None)
    with out.open("wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "step1x_batch.cli", "benchmark", cfg], env=env,
                                start_new_session=True, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if b"failpoint benchmark.after_model" in out.read_bytes():
                break
            time.sleep(0.2)
        assert proc.poll() is None, f"the benchmark ended before its failpoint: {out.read_bytes()[-3000:]!r}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        kill_marked(marker)
    assert not (root / "models" / "lora").exists()  # killed before the second model started
    expire_local_lease(root)  # the killed driver's lease on the benchmark root expires


@pytest.mark.slow
def test_two_models_one_table_per_category_killed_and_resumed(ray_local, tiny, tmp_path, capsys):
    from judge_server import JudgeServer

    root = tmp_path / "bench"
    models = {"base": _step1x(tiny), "lora": _step1x(tiny, lora=True)}
    with JudgeServer(_judge_rule()) as server:
        judge = {"engine": "http", "url": server.base_url, "model": "test-judge", "max_retries": 0}
        cfg = _write(tmp_path / "bench.yaml", _config(tiny, root, models, judge))
        _run_killed_after_first_model(cfg, root)
        first_scores = read_scores(str(root / "models" / "base")).num_rows
        assert first_scores == 12
        capsys.readouterr()
        assert main(["benchmark", cfg, "--set", "runtime.run_id=second"]) == 0
    printed = capsys.readouterr().out
    base, lora = root / "models" / "base", root / "models" / "lora"
    again = json.loads((base / "runs" / "second" / "summary.json").read_text())
    assert again["rows_processed"] == 0 and again["rows_skipped"] == 12  # nothing of base redone
    assert read_scores(str(base)).num_rows == first_scores  # and nothing asked of the judge again
    second = json.loads((lora / "runs" / "second" / "summary.json").read_text())
    assert second["rows_processed"] == 12 and second["by_status"] == {"ok": 12}
    # the same rows, the same seeds: only the adapter differs
    seeds = lambda r: {x["id"]: x["seed"] for x in read_logs(str(r)).to_pylist()}  # noqa: E731
    assert seeds(base) == seeds(lora)
    base_ids = {x["id"]: x["model_id"] for x in read_logs(str(base)).to_pylist()}
    lora_ids = {x["id"]: x["model_id"] for x in read_logs(str(lora)).to_pylist()}
    assert all("+lora[" in lora_ids[i] and "+lora[" not in base_ids[i] for i in base_ids)

    table = json.loads((root / "benchmark" / "table.json").read_text())
    assert table["models"] == ["base", "lora"] and table["baseline"] == "base"
    assert table["group_by"] == ["task_type", "instruction_language"]
    assert table["measures"] == ["score_sc", "score_pq", "score_o"]
    groups = {g["label"]: g for g in table["groups"]}
    assert len(groups) == 7 and "all" in groups  # 3 task types x 2 languages, and all
    b_rows, l_rows = _scored_rows(base), _scored_rows(lora)
    assert len(b_rows) == len(l_rows) == 12
    for measure in table["measures"]:
        for label, (mean_b, mean_l, mean_d, n_d, diffs) in _by_hand(b_rows, l_rows, measure).items():
            g = groups[label]["models"]
            assert g["base"]["n"] == g["lora"]["n"] == (12 if label == "all" else 2)
            assert g["base"]["means"][measure]["mean"] == pytest.approx(mean_b)
            assert g["lora"]["means"][measure]["mean"] == pytest.approx(mean_l)
            paired = g["lora"]["paired"][measure]
            assert paired["mean"] == pytest.approx(mean_d) and paired["n"] == n_d
            want = mean_interval(np.array(diffs), np.random.default_rng(0), 1000)
            assert (paired["low"], paired["high"]) == (pytest.approx(want["low"]), pytest.approx(want["high"]))
            assert g["base"]["paired"] == {}
    o = groups["all"]["models"]["lora"]["paired"]["score_o"]
    assert o["low"] <= o["mean"] <= o["high"]
    # the console and table.md show the same numbers
    md = (root / "benchmark" / "table.md").read_text()
    all_lora = groups["all"]["models"]["lora"]["means"]["score_o"]
    shown = f"{all_lora['mean']:.2f} [{all_lora['low']:.2f}, {all_lora['high']:.2f}]"
    assert shown in md and shown in printed
    assert "Δ" in md and "background_change / cn" in md and "style_change / en" in printed
    page = (root / "benchmark" / "report.html").read_text()
    assert page.count("<img ") == 12 * 3  # every row: its input and both outputs
    assert "<script" not in page


def test_the_metrics_only_judge_then_a_pairwise_one(ray_local, tiny, tmp_path, capsys):
    """Two quick models (the null family returns its input; a seeded one draws noise), no judge
    section: the metrics-only judge, whose table says it gives no SC / PQ / O. Then the same root
    with a pairwise judge: nothing edited again, the noise judged against the baseline, win / tie /
    loss per group."""
    root = tmp_path / "bench"
    raw = _config(tiny, root, {"same": {"family": "null"}, "noise": {"family": "job_plugins:Seeded"}})
    raw["benchmark"]["group_by"] = ["task_type"]
    assert main(["benchmark", _write(tmp_path / "b.yaml", raw)]) == 0
    printed = capsys.readouterr().out
    table = json.loads((root / "benchmark" / "table.json").read_text())
    assert table["judge"]["engine"] == "none" and "no SC / PQ / O" in table["note"] and "no SC / PQ / O" in printed
    assert table["measures"] == ["changed_fraction", "ssim", "psnr"]
    groups = {g["label"]: g for g in table["groups"]}
    assert set(groups) == {"background_change", "color_alter", "style_change", "all"}
    same, noise = _scored_rows(root / "models" / "same"), _scored_rows(root / "models" / "noise")
    assert len(same) == len(noise) == 12
    for label, group in groups.items():
        ids = sorted(i for i in same if label in ("all", same[i]["extra"]["task_type"]))
        cell = group["models"]
        assert cell["same"]["n"] == cell["noise"]["n"] == len(ids) == (12 if label == "all" else 4)
        assert cell["same"]["means"]["changed_fraction"]["mean"] == 0.0  # its edits are its inputs
        assert cell["same"]["means"]["psnr"]["mean"] == PSNR_CAP
        for m in ("changed_fraction", "ssim", "psnr"):
            mean = np.mean([noise[i]["metrics"][m] for i in ids])
            diff = np.mean([noise[i]["metrics"][m] - same[i]["metrics"][m] for i in ids])
            assert cell["noise"]["means"][m]["mean"] == pytest.approx(mean)
            assert cell["noise"]["paired"][m]["mean"] == pytest.approx(diff)
    md = (root / "benchmark" / "table.md").read_text()
    assert "moved px" in md and "SSIM" in md and "PSNR" in md and "ΔSSIM vs same" in md
    assert "| all | noise | 12 |" in md
    # the same benchmark with a pairwise judge: win / tie / loss against the baseline
    from judge_server import JudgeServer

    with JudgeServer(_judge_rule()) as server:
        raw["judge"] = {"engine": "http", "url": server.base_url, "model": "test-judge", "max_retries": 0,
                        "mode": "pairwise"}
        raw["runtime"]["run_id"] = "pairwise"
        assert main(["benchmark", _write(tmp_path / "p.yaml", raw)]) == 0
    capsys.readouterr()
    assert json.loads((root / "models" / "noise" / "runs" / "pairwise" / "summary.json").read_text())["rows_processed"] == 0
    table = json.loads((root / "benchmark" / "table.json").read_text())
    assert table["judge"]["mode"] == "pairwise" and table["measures"] == []
    prefs = {r["id"]: r["preference"] for r in read_scores(str(root / "models" / "noise")).to_pylist()
             if r["run_id"] == "pairwise"}
    assert len(prefs) == 12 and not (root / "models" / "same" / "scores" / "pairwise").exists()
    for group in table["groups"]:
        ids = [i for i in same if group["label"] in ("all", same[i]["extra"]["task_type"])]
        got = group["models"]["noise"]["pairwise"]
        want = {k: sum(prefs[i] == p for i in ids) / len(ids) for k, p in (("win", "A"), ("tie", "tie"), ("loss", "B"))}
        assert got == {"n": len(ids), **want}
        assert group["models"]["same"]["n"] == len(ids) and "pairwise" not in group["models"]["same"]
    assert len(set(prefs.values())) > 1  # the judge's answers differ: the rates are not all one
    assert "win / tie / loss vs same" in (root / "benchmark" / "table.md").read_text()
