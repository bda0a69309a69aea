"""Adapters and blended conditioning through the whole job on a real local Ray: an adapter's content
and scale decide which rows are redone, and the blend columns reach the row log."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from step1x_batch.job.config import parse_config
from step1x_batch.rows.log import read_logs


def _run(raw: dict):
    from step1x_batch.job.runner import run_job

    return run_job(parse_config(raw))


def _inputs(folder, rows: list[dict]) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(2):
        Image.fromarray(np.random.default_rng(k).integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(folder / f"p{k}.png")
    (folder / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(folder / "m.jsonl")


def _peft_lora(path, seed: int = 0) -> None:
    """A small PEFT-format LoRA for the tiny Qwen-Image-Edit transformer (two attention inputs)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out_f, in_f) in {"transformer_blocks.0.attn.to_q": (48, 48), "transformer_blocks.1.attn.to_k": (48, 48)}.items():
        tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(4, in_f, generator=g) * 0.5
        tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(out_f, 4, generator=g) * 0.5
    save_file(tensors, str(path))


@pytest.mark.slow
def test_changing_an_adapters_scale_redoes_every_row_and_nothing_else(ray_local, tmp_path):
    from step1x_batch.models.qwen_image_edit.tiny import make_tiny_weights

    weights = make_tiny_weights(tmp_path / "qwen", seed=0)
    lora = tmp_path / "lora.safetensors"
    _peft_lora(lora)
    manifest = _inputs(tmp_path / "in", [
        {"id": f"r{i}", "image_uri": f"p{i % 2}.png", "instruction": "make it red", "seed": i} for i in range(3)
    ])
    out = tmp_path / "out"

    def job(run_id: str, scale: float) -> dict:
        return {
            "input": {"manifest": manifest}, "output": {"uri": str(out)},
            "model": {"family": "qwen-image-edit", "weights": str(weights), "dtype": "float32", "device": "cpu",
                      "options": {"reference_area": 48 * 48, "vl_area": 56 * 56},
                      "adapters": [{"uri": str(lora), "scale": scale}]},
            "sampling": {"num_steps": 2, "size_level": 64},
            "runtime": {"progress_bars": False, "run_id": run_id},
        }

    first = _run(job("first", 1.0))
    assert first.by_status == {"ok": 3}
    before = {p.name: p.read_bytes() for p in (out / "images").iterdir()}
    again = _run(job("again", 1.0))
    assert again.rows_processed == 0 and again.rows_skipped == 3  # unchanged: nothing redone
    rescaled = _run(job("rescaled", 0.5))
    assert rescaled.rows_processed == 3 and rescaled.rows_skipped == 0  # every row it affects
    after = {p.name: p.read_bytes() for p in (out / "images").iterdir()}
    assert set(after) == set(before) and all(after[k] != before[k] for k in before)  # redone in place
    ids = {r["run_id"]: r["model_id"] for r in read_logs(str(out)).to_pylist()}
    assert ids["first"] != ids["rescaled"] and "+lora[" in ids["first"]


def test_blend_columns_are_carried_into_the_row_log(ray_local, tmp_path):
    manifest = _inputs(tmp_path / "in", [
        {"id": "plain", "image_uri": "p0.png", "instruction": "happy"},
        {"id": "half", "image_uri": "p0.png", "instruction": "happy", "blend_instruction": "neutral",
         "blend_scale": 0.5},
    ])
    raw = {"input": {"manifest": manifest}, "output": {"uri": str(tmp_path / "out")}, "model": {"family": "null"},
           "runtime": {"progress_bars": False}}
    assert _run(raw).by_status == {"ok": 2}
    recs = {r["id"]: r for r in read_logs(str(tmp_path / "out")).to_pylist()}
    assert (recs["half"]["blend_instruction"], recs["half"]["blend_scale"]) == ("neutral", 0.5)
    assert (recs["plain"]["blend_instruction"], recs["plain"]["blend_scale"]) == (None, 1.0)
