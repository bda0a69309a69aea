"""A complete Step1X-Edit release folder at toy size, made from a seed.

Same files, same key names, same formats as the official release, so every loading and editing
code path runs on a CPU in seconds: the DiT + connector file, ``vae.safetensors`` and a
Qwen2.5-VL transformers folder.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .connector import Connector, ConnectorParams
from .dit import DiTParams, Step1XDiT
from .release import QWEN_DIR, VAE_FILE
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


def tiny_dit_state_dict(seed: int = 0, version: str = "v1.1") -> dict[str, torch.Tensor]:
    """DiT + connector tensors in the release's key names and dtype (bf16)."""
    with torch.device("meta"):
        dit, connector = Step1XDiT(TINY_DIT), Connector(tiny_connector_params(version))
    state = seeded_state_dict(dit, seed)
    state.update({f"connector.{k}": v for k, v in seeded_state_dict(connector, seed + 1).items()})
    return {k: v.to(torch.bfloat16) for k, v in state.items()}


def tiny_vae_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        vae = AutoEncoder(TINY_VAE)
    return seeded_state_dict(vae, seed + 2)  # fp32, as released


def make_tiny_weights(folder: str | os.PathLike, seed: int = 0, version: str = "v1.1") -> Path:
    """Write the release layout into ``folder`` (created if needed) and return it."""
    if version not in DIT_FILE_BY_VERSION:
        raise ValueError(f"unknown version {version!r}; expected one of {sorted(DIT_FILE_BY_VERSION)}")
    from step1x_batch.models.qwen_vl.tiny import write_tiny_qwen

    from .conditioner import load_prefix

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tiny_dit_state_dict(seed, version), str(folder / DIT_FILE_BY_VERSION[version]))
    save_file(tiny_vae_state_dict(seed), str(folder / VAE_FILE))
    write_tiny_qwen(folder / QWEN_DIR, seed=seed + 3, hidden_size=TINY_QWEN_HIDDEN, corpus=[load_prefix()])
    return folder
