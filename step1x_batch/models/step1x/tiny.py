"""A complete Step1X-Edit release folder (or RealRestorer bundle) at toy size, made from a seed.

Same files, same key names, same formats as the official release, so every loading and editing
code path runs on a CPU in seconds: the DiT + connector file, ``vae.safetensors`` and a
Qwen2.5-VL transformers folder. ``layout="realrestorer"`` writes the same tensors in the
RealRestorer bundle's diffusers layout (:mod:`.release`): sharded ``transformer/`` and
``vae/`` with ``inner_model.`` keys, ``text_encoder/`` without a tokenizer, ``processor/``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .connector import Connector, ConnectorParams
from .dit import DiTParams, Step1XDiT
from .layers import MLPEmbedder
from .release import (
    BUNDLE_INDEX,
    BUNDLE_PREFIX,
    BUNDLE_VAE_DIR,
    BUNDLE_WEIGHTS,
    LAYOUTS,
    MODEL_INDEX,
    PROCESSOR_DIR,
    QWEN_DIR,
    REALRESTORER,
    TEXT_ENCODER_DIR,
    TRANSFORMER_DIR,
    VAE_FILE,
)
from .vae import AutoEncoder, AutoEncoderParams

TINY_QWEN_HIDDEN = 64
TINY_DIT = DiTParams(
    vec_in_dim=32, context_in_dim=64, hidden_size=64, num_heads=2, depth=2, depth_single_blocks=2, axes_dim=(4, 14, 14)
)
TINY_VAE = AutoEncoderParams(ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1)
DIT_FILE_BY_VERSION = {"v1.0": "step1x-edit-i1258.safetensors", "v1.1": "step1x-edit-v1p1-official.safetensors"}


def tiny_connector_params(version: str) -> ConnectorParams:
    return ConnectorParams(
        in_channels=TINY_QWEN_HIDDEN, hidden_size=TINY_DIT.context_in_dim, vec_dim=TINY_DIT.vec_in_dim,
        num_heads=8, depth=2, scale_factor_shape=(1,) if version == "v1.0" else None,
    )


def seeded_state_dict(module: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Fill every tensor from one generator, in key order: independent of torch's init code."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in sorted(module.state_dict().items()):
        if name.endswith("scale_factor"):
            t = torch.full(p.shape, -0.91)
        elif p.ndim == 1 and (name.endswith(".scale") or "norm" in name) and name.endswith(("scale", "weight")):
            t = 1 + 0.1 * torch.randn(p.shape, generator=g)
        elif p.ndim == 1:
            t = 0.02 * torch.randn(p.shape, generator=g)
        else:
            fan_in = math.prod(p.shape[1:])
            t = torch.randn(p.shape, generator=g) / math.sqrt(fan_in)
        out[name] = t.contiguous()
    return out


def tiny_dit_state_dict(seed: int = 0, version: str = "v1.1", guidance: bool = False) -> dict[str, torch.Tensor]:
    """DiT + connector tensors in the release's key names and dtype (bf16); ``guidance`` adds a
    FLUX-style ``guidance_in`` from its own generator (every other tensor stays the same)."""
    with torch.device("meta"):
        dit, connector = Step1XDiT(TINY_DIT), Connector(tiny_connector_params(version))
        embedder = MLPEmbedder(256, TINY_DIT.hidden_size)
    state = seeded_state_dict(dit, seed)
    state.update({f"connector.{k}": v for k, v in seeded_state_dict(connector, seed + 1).items()})
    if guidance:
        state.update({f"guidance_in.{k}": v for k, v in seeded_state_dict(embedder, seed + 4).items()})
    return {k: v.to(torch.bfloat16) for k, v in state.items()}


def tiny_vae_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        vae = AutoEncoder(TINY_VAE)
    return seeded_state_dict(vae, seed + 2)  # fp32, as released


def make_tiny_weights(
    folder: str | os.PathLike,
    seed: int = 0,
    version: str = "v1.1",
    layout: str = "release",
    guidance: bool = False,
    *,
    mask_token: bool = False,
) -> Path:
    """Write the ``release`` layout or the ``realrestorer`` bundle into ``folder`` (created if
    needed) and return it. Both layouts hold the same tensors for the same seed and version, so
    their edits can be compared byte for byte. ``guidance``: the DiT gets a ``guidance_in``
    embedder; ``mask_token`` (bundle only): the unused ``inner_model.mask_token`` upstream may save.
    """
    if version not in DIT_FILE_BY_VERSION:
        raise ValueError(f"unknown version {version!r}; expected one of {sorted(DIT_FILE_BY_VERSION)}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {list(LAYOUTS)}")
    if mask_token and layout != REALRESTORER:
        raise ValueError("mask_token= is a RealRestorer bundle key; the release has none")
    from step1x_batch.models.qwen_vl.tiny import write_tiny_qwen

    from .conditioner import load_prefix

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dit = tiny_dit_state_dict(seed, version, guidance)
    if layout == REALRESTORER:
        _write_bundle(folder, dit, tiny_vae_state_dict(seed), version, seed, mask_token)
        return folder
    save_file(dit, str(folder / DIT_FILE_BY_VERSION[version]))
    save_file(tiny_vae_state_dict(seed), str(folder / VAE_FILE))
    write_tiny_qwen(folder / QWEN_DIR, seed=seed + 3, hidden_size=TINY_QWEN_HIDDEN, corpus=[load_prefix()])
    return folder


# What RealRestorerPipeline.save_pretrained writes besides the weights (vendored diffusers 0.37.0.dev0).
_DIFFUSERS_VERSION = "0.37.0.dev0"
_MODEL_INDEX = {
    "_class_name": "RealRestorerPipeline",
    "_diffusers_version": _DIFFUSERS_VERSION,
    "processor": ["transformers", "Qwen2_5_VLProcessor"],
    "scheduler": ["diffusers", "RealRestorerFlowMatchScheduler"],
    "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
    "transformer": ["diffusers", "RealRestorerTransformer2DModel"],
    "vae": ["diffusers", "RealRestorerAutoencoderKL"],
}
_SCHEDULER_CONFIG = {
    "_class_name": "RealRestorerFlowMatchScheduler", "_diffusers_version": _DIFFUSERS_VERSION,
    "base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15, "shift": True,
}
# The Qwen files transformers' processor.save_pretrained puts in processor/ (no model config there).
_PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "preprocessor_config.json")


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_sharded(folder: Path, state: dict[str, torch.Tensor], stem: str, index_name: str, shards: int) -> None:
    """``state`` as ``{stem}-0000K-of-0000N.safetensors`` + the index, as save_pretrained shards."""
    keys = sorted(state)
    per = math.ceil(len(keys) / shards)
    weight_map, total = {}, 0
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k].contiguous() for k in keys[i * per : (i + 1) * per]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
        total += sum(t.numel() * t.element_size() for t in part.values())
    _write_json(folder / index_name, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_bundle(
    folder: Path, dit: dict[str, torch.Tensor], vae: dict[str, torch.Tensor], version: str, seed: int, mask_token: bool
) -> None:
    from step1x_batch.models.qwen_vl.tiny import write_tiny_qwen

    from .conditioner import load_prefix

    transformer = {BUNDLE_PREFIX + k: v for k, v in dit.items()}
    if mask_token:
        g = torch.Generator().manual_seed(seed + 5)
        token = torch.randn(1, 1, TINY_DIT.hidden_size, generator=g)
        transformer[BUNDLE_PREFIX + "mask_token"] = token.to(torch.bfloat16)
    tdir = folder / TRANSFORMER_DIR
    tdir.mkdir(parents=True, exist_ok=True)
    _write_sharded(tdir, transformer, BUNDLE_WEIGHTS.removesuffix(".safetensors"), BUNDLE_INDEX, shards=2)
    p = TINY_DIT
    _write_json(tdir / "config.json", {
        "_class_name": "RealRestorerTransformer2DModel", "_diffusers_version": _DIFFUSERS_VERSION,
        "in_channels": p.in_channels, "out_channels": p.out_channels, "vec_in_dim": p.vec_in_dim,
        "context_in_dim": p.context_in_dim, "hidden_size": p.hidden_size, "mlp_ratio": p.mlp_ratio,
        "num_heads": p.num_heads, "depth": p.depth, "depth_single_blocks": p.depth_single_blocks,
        "axes_dims_rope": list(p.axes_dim), "theta": p.theta, "qkv_bias": p.qkv_bias, "mode": "flash",
        "version": version, "guidance_embeds": "guidance_in.in_layer.weight" in dit, "use_mask_token": mask_token,
    })

    vdir = folder / BUNDLE_VAE_DIR
    vdir.mkdir(parents=True, exist_ok=True)
    save_file({BUNDLE_PREFIX + k: v for k, v in vae.items()}, str(vdir / BUNDLE_WEIGHTS), metadata={"format": "pt"})
    v = TINY_VAE
    _write_json(vdir / "config.json", {
        "_class_name": "RealRestorerAutoencoderKL", "_diffusers_version": _DIFFUSERS_VERSION,
        "resolution": v.resolution, "in_channels": v.in_channels, "ch": v.ch, "out_ch": v.out_ch,
        "ch_mult": list(v.ch_mult), "num_res_blocks": v.num_res_blocks, "z_channels": v.z_channels,
        "scale_factor": v.scale_factor, "shift_factor": v.shift_factor,
    })

    # The same tiny Qwen as the release's, split as the bundle splits it.
    te, proc = folder / TEXT_ENCODER_DIR, folder / PROCESSOR_DIR
    write_tiny_qwen(te, seed=seed + 3, hidden_size=TINY_QWEN_HIDDEN, corpus=[load_prefix()])
    proc.mkdir(parents=True, exist_ok=True)
    for name in _PROCESSOR_FILES:
        shutil.move(str(te / name), str(proc / name))
    qwen = load_file(str(te / "model.safetensors"))
    (te / "model.safetensors").unlink()
    _write_sharded(te, qwen, "model", "model.safetensors.index.json", shards=2)

    _write_json(folder / MODEL_INDEX, _MODEL_INDEX)
    _write_json(folder / "scheduler" / "scheduler_config.json", _SCHEDULER_CONFIG)
