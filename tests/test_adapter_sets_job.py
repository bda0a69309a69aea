"""Many adapters in one job (issue 22), through the whole job on a real local Ray: rows name their
LoRA set in an ``adapters`` column, the edit actors keep the base weights and switch sets exactly.
Each row's pixels equal the family's own in-process engine loaded with that set merged at load (the
one-adapter path), in bf16 and fp32, for both families' tiny models; a set change of one row redoes
exactly that row; and a row of set B is byte for byte the row a job with ``model.adapters: B`` writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from step1x_batch import errors
from step1x_batch.io.images import decode_image
from step1x_batch.job.config import parse_config
from step1x_batch.job.preflight import check_job
from step1x_batch.job.runner import run_job
from step1x_batch.models import load_family
from step1x_batch.models.base import AdapterSpec, ModelSpec
from step1x_batch.models.engine import family_pipeline
from step1x_batch.rows.log import read_logs
from test_adapter_switch import FAMILIES, denoiser
from test_lora import lora_tensors, random_lora, write

SETS = (None, "A", "B", "C")


def _pictures(folder: Path) -> list[np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k in range(2):
        pixels = np.random.default_rng(k).integers(0, 256, (32, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"p{k}.png")
        out.append(pixels)
    return out


def _manifest(folder: Path, sets: dict[str, str | None], name: str = "m.jsonl", blend: bool = False) -> str:
    rows = [{"id": rid, "image_uri": f"p{rid[-1]}.png", "instruction": "make it red", "seed": 7 + int(rid[-1]),
             "adapters": s} for rid, s in sets.items()]
    rows.append({"id": "unknown-0", "image_uri": "p0.png", "instruction": "x", "adapters": "nope"})
    if blend:
        rows.append({"id": "A-blend-0", "image_uri": "p0.png", "instruction": "make it red", "seed": 7,
                     "adapters": "A", "blend_instruction": "neutral", "blend_scale": 0.5})
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _adapter_files(family: str, folder: Path, tmp: Path) -> dict[str, list[dict]]:
    """Set A (the family's first format), B (its second), C (A at another scale)."""
    _, options, targets, (fmt_a, fmt_b) = FAMILIES[family]
    cls = FAMILIES[family][0]
    model = denoiser(cls(ModelSpec(family, options, str(folder), "float32")).load(folder, "cpu"))
    n = len(targets)
    spelling = {"peft": "peft", "diffusers": "peft", "kohya": "kohya", "diffsynth": "diffsynth"}
    a = write(tmp / "a.safetensors", lora_tensors(random_lora(model, targets[: n // 2], seed=31), spelling[fmt_a], prefix=""))
    b = write(tmp / "b.safetensors", lora_tensors(random_lora(model, targets[n // 3:], seed=32), spelling[fmt_b]))
    return {"A": [{"uri": str(a), "scale": 0.8, "format": fmt_a}], "B": [{"uri": str(b), "scale": 1.3, "format": fmt_b}],
            "C": [{"uri": str(a), "scale": -0.45, "format": fmt_a}]}


def _model(family: str, folder: Path, dtype: str, **extra) -> dict:
    return {"family": family, "weights": str(folder), "dtype": dtype, "device": "cpu", "max_batch_size": 2,
            "options": FAMILIES[family][1], **extra}


def _config(manifest: str, out: Path, model: dict, run_id: str) -> dict:
    return {"input": {"manifest": manifest}, "output": {"uri": str(out)}, "model": model,
            "sampling": {"num_steps": 2, "size_level": 64},
            "resources": {"edit_batch_size": 16, "io_batch_size": 4},
            "runtime": {"progress_bars": False, "max_error_fraction": 0.5, "run_id": run_id}}


def _run(raw: dict):
    cfg = parse_config(raw)
    return run_job(cfg, check_job(cfg))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from step1x_batch.models.qwen_image_edit.tiny import make_tiny_weights as tiny_qwen
    from step1x_batch.models.step1x.tiny import make_tiny_weights as tiny_step1x

    root = tmp_path_factory.mktemp("sets")
    return {"step1x": tiny_step1x(root / "step1x", seed=0), "qwen-image-edit": tiny_qwen(root / "qwen", seed=0)}


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("family", ["step1x", "qwen-image-edit"])
def test_each_row_is_edited_with_its_set(ray_local, weights, tmp_path, family, dtype):
    folder = Path(weights[family])
    pictures = _pictures(tmp_path / "in")
    sets = _adapter_files(family, folder, tmp_path)
    rows = {f"{s or 'base'}-{k}": s for s in SETS for k in range(2)}
    manifest = _manifest(tmp_path / "in", rows, blend=True)
    out = tmp_path / "out"
    summary = _run(_config(manifest, out, _model(family, folder, dtype, adapter_sets=sets), "sets"))
    assert summary.by_status == {"ok": 9, "error": 1}
    recs = {r["id"]: r for r in read_logs(str(out)).to_pylist()}
    assert recs["unknown-0"]["error_type"] == errors.INVALID_ROW and "'nope'" in recs["unknown-0"]["error_message"]
    for s in SETS:  # each set's rows: the pixels of the engine loaded with that set merged at load
        one = _model(family, folder, dtype, adapters=sets[s]) if s else _model(family, folder, dtype)
        cfg = parse_config(_config(manifest, out, one, "reference"))
        from step1x_batch.job.runner import pin_adapters

        pin_adapters(cfg)
        family_obj = load_family(cfg.model_spec())
        specs = [AdapterSpec(a["uri"], a["scale"], a["format"]) for a in (sets[s] or [])] if s else []
        results = family_pipeline(family_obj, folder, specs).edit(pictures, ["make it red"] * 2, seeds=[7, 8],
                                                                  num_steps=2, size_level=64)
        for k in range(2):
            rec = recs[f"{s or 'base'}-{k}"]
            assert rec["adapters"] == s and rec["model_id"] == family_obj.model_id(), (s, k)
            got = decode_image(Path(rec["output_uri"]).read_bytes(), 10**6)
            assert np.array_equal(got, results[k].image), (family, dtype, s, k)
    blend = recs["A-blend-0"]  # the blend columns ride with a set like any other row's
    assert blend["status"] == "ok" and blend["adapters"] == "A" and blend["blend_instruction"] == "neutral"
    a0 = decode_image(Path(recs["A-0"]["output_uri"]).read_bytes(), 10**6)
    assert not np.array_equal(a0, decode_image(Path(blend["output_uri"]).read_bytes(), 10**6))
    base = decode_image(Path(recs["base-0"]["output_uri"]).read_bytes(), 10**6)
    assert all(not np.array_equal(base, decode_image(Path(recs[f"{s}-0"]["output_uri"]).read_bytes(), 10**6))
               for s in ("A", "B", "C"))  # every set changed the pixels


def test_a_set_change_redoes_that_row_and_bytes_equal_a_one_adapter_job(ray_local, weights, tmp_path):
    family, dtype = "step1x", "bfloat16"
    folder = Path(weights[family])
    _pictures(tmp_path / "in")
    sets = _adapter_files(family, folder, tmp_path)
    rows = {"base-0": None, "A-0": "A", "A-1": "A", "B-1": "B"}
    out = tmp_path / "out"
    model = _model(family, folder, dtype, adapter_sets=sets)
    first = _run(_config(_manifest(tmp_path / "in", rows), out, model, "first"))
    assert first.by_status == {"ok": 4, "error": 1}
    summary = json.loads(Path(first.paths["summary"]).read_text())
    assert {k: v["rows"] for k, v in summary["adapter_sets"].items()} == {"": 1, "A": 2, "B": 1}  # rows edited
    assert summary["adapter_sets"]["A"]["edit_s"] > 0
    assert 2 <= summary["adapter_switches"] <= 4  # A and B at least once each, never once per row
    assert "Adapter sets: " in Path(first.paths["report"]).read_text()
    # one row moves from set A to set B: exactly that row is redone (and the unknown row is final)
    second = _run(_config(_manifest(tmp_path / "in", {**rows, "A-1": "B"}), out, model, "second"))
    assert second.rows_processed == 1 and second.by_status == {"ok": 1}
    moved = {r["id"]: r for r in read_logs(str(out), run_id="second").to_pylist()}["A-1"]
    assert moved["adapters"] == "B"
    # the same row in a job whose model.adapters is set B: the same bytes
    # a row that gives no id and no seed: its set is in its id (its own output) but not in its seed
    free = {"image_uri": "p0.png", "instruction": "make it blue"}
    with open(tmp_path / "in" / "m.jsonl", "a") as f:
        f.write(json.dumps({**free, "adapters": "B"}) + "\n")
    third = _run(_config(str(tmp_path / "in" / "m.jsonl"), out, model, "third"))
    assert third.rows_processed == 1
    one_manifest = _manifest(tmp_path / "in", {"B-1": None}, "one.jsonl")  # (plus the unknown-set row)
    with open(one_manifest, "a") as f:
        f.write(json.dumps(free) + "\n")
    _run(_config(one_manifest, tmp_path / "one-out", _model(family, folder, dtype, adapters=sets["B"]), "one"))
    single = {r["id"]: r for r in read_logs(str(tmp_path / "one-out")).to_pylist()}["B-1"]
    multi = {r["id"]: r for r in read_logs(str(out), run_id="first").to_pylist()}["B-1"]
    assert Path(single["output_uri"]).read_bytes() == Path(multi["output_uri"]).read_bytes()
    # the same work by the resume rule too: same model id, same fingerprint
    assert single["model_id"] == multi["model_id"] and single["fingerprint"] == multi["fingerprint"]
    (free_multi,) = [r for r in read_logs(str(out), run_id="third").to_pylist()]
    (free_single,) = [r for r in read_logs(str(tmp_path / "one-out")).to_pylist() if r["instruction"] == "make it blue"]
    assert free_multi["id"] != free_single["id"] and free_multi["seed"] == free_single["seed"]
    assert Path(free_multi["output_uri"]).read_bytes() == Path(free_single["output_uri"]).read_bytes()


def test_config_and_preflight_refusals(tmp_path):
    from step1x_batch.job.config import ConfigError
    from step1x_batch.job.preflight import PreflightError

    (tmp_path / "m.jsonl").write_text('{"image_uri": "p.png", "instruction": "x"}\n')
    base = {"input": {"manifest": str(tmp_path / "m.jsonl")}, "output": {"uri": str(tmp_path / "out")}}
    lora = {"uri": str(tmp_path / "a.safetensors")}
    with pytest.raises(ConfigError, match="not both"):
        parse_config({**base, "model": {"family": "step1x", "weights": "w", "adapters": [lora],
                                        "adapter_sets": {"A": [lora]}}})
    with pytest.raises(ConfigError, match="set name"):
        parse_config({**base, "model": {"family": "step1x", "weights": "w", "adapter_sets": {"a b": [lora]}}})
    with pytest.raises(ConfigError, match="does not take LoRA adapters"):
        parse_config({**base, "model": {"family": "null", "adapter_sets": {"A": [lora]}}})
    from step1x_batch.models.step1x.tiny import make_tiny_weights

    weights = make_tiny_weights(str(tmp_path / "w"), seed=0)
    cfg = parse_config({**base, "model": {"family": "step1x", "weights": str(weights), "adapter_sets": {"A": [lora]}}})
    with pytest.raises(PreflightError, match=r"model.adapter_sets.A\[0\].uri"):
        check_job(cfg)


def test_a_set_an_actor_cannot_stage_fails_its_rows_only(weights, tmp_path):
    """A set whose file does not fit the model (or cannot be staged on that node) gives its rows
    edit_failed; the other sets and the base go on. Host copies: the base kept in host memory."""
    import torch

    from step1x_batch.io.weights import WeightsSource, sha256_file
    from step1x_batch.job.stages import EditStage
    from step1x_batch.models.base import AdapterRef, EditParams, EditRequest
    from step1x_batch.models.step1x.family import Step1XFamily

    folder = Path(weights["step1x"])
    sets = _adapter_files("step1x", folder, tmp_path)
    good = sets["A"][0]
    bad = write(tmp_path / "bad.safetensors", {"nowhere.lora_A.weight": torch.zeros(2, 3),
                                               "nowhere.lora_B.weight": torch.zeros(3, 2)})
    refs = (("good", (AdapterRef(good["uri"], good["scale"], good["format"], sha256_file(Path(good["uri"]))),)),
            ("bad", (AdapterRef(str(bad), 1.0, "peft", sha256_file(bad)),)))
    spec = ModelSpec("step1x", {}, str(folder), "float32", adapter_sets=refs, adapter_base_copies="host")
    family = Step1XFamily(spec)
    stage = EditStage(spec, WeightsSource(str(folder)), engine=family.load(folder, "cpu"))
    assert set(stage.unusable) == {"bad"} and "'bad' cannot be used" in stage.unusable["bad"]
    assert stage.switcher.sets == ["good"] and stage.switcher.base_device == torch.device("cpu")
    picture = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    ready = family.preparer(folder)(EditRequest([picture], "make it red", 1, EditParams(num_steps=2, size_level=64)))
    rows = [{"adapters": s, "prepared": ready.to_bytes()} for s in ("bad", "good", None)]
    results = stage._edit_by_set(rows)
    assert isinstance(results[0], RuntimeError) and "'bad' cannot be used" in str(results[0])
    assert results[1].image is not None and results[2].image is not None
    assert not np.array_equal(results[1].image, results[2].image)  # the good set was switched in


def test_one_model_id_for_many_sets_is_refused(tmp_path):
    from step1x_batch.job.config import ConfigError

    lora = {"uri": str(tmp_path / "a.safetensors")}
    with pytest.raises(ConfigError, match="model.model_id"):
        parse_config({"input": {"manifest": str(tmp_path / "m.jsonl")}, "output": {"uri": str(tmp_path / "o")},
                      "model": {"family": "step1x", "weights": "w", "model_id": "mine", "adapter_sets": {"A": [lora]}}})
