"""A toy-size Qwen-Image-Edit-2511 folder in the official diffusers layout, made from a seed.

Tests (and anyone without the 58 GB release) need a folder that loads through exactly the code
paths of the real one: ``model_index.json`` naming the real component classes, a sharded
``transformer/`` with ``zero_cond_t`` on, a Wan-style ``vae/`` with non-trivial latent statistics,
a Qwen2.5-VL ``text_encoder/``, ``tokenizer/``, ``processor/`` and the Qwen family's
``scheduler/``. diffusers' own ``QwenImageEditPlusPipeline.from_pretrained`` loads it too.

Weights are drawn here from a seeded generator (not by the libraries' initialisers), so a seed
gives the same folder whatever the diffusers or transformers version.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from step1x_batch.models.qwen_vl.tiny import write_tiny_qwen

from .prepare import SYSTEM_PROMPT

TEXT_HIDDEN = 64

TRANSFORMER_CONFIG = {
    "_class_name": "QwenImageTransformer2DModel",
    "_diffusers_version": "0.37.0",
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 4,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 3,
    "joint_attention_dim": TEXT_HIDDEN,
    "guidance_embeds": False,
    "axes_dims_rope": [8, 4, 4],
    "zero_cond_t": True,
    "use_additional_t_cond": False,
    "use_layer3d_rope": False,
}

VAE_CONFIG = {
    "_class_name": "AutoencoderKLQwenImage",
    "_diffusers_version": "0.37.0",
    "base_dim": 24,
    "z_dim": 4,
    "dim_mult": [1, 2, 4],
    "num_res_blocks": 1,
    "attn_scales": [],
    "temperal_downsample": [False, True],
    "dropout": 0.0,
    "input_channels": 3,
    # Not 0 / 1: a wrong (de)normalisation must show in the tests.
    "latents_mean": [0.35, -0.6, 0.15, 1.1],
    "latents_std": [1.7, 0.8, 2.4, 1.3],
}

# The Qwen-Image family's scheduler (base 0.5 at 256 tokens -> 0.9 at 8192, stretched to 0.02).
SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "_diffusers_version": "0.37.0",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}

MODEL_INDEX = {
    "_class_name": "QwenImageEditPlusPipeline",
    "_diffusers_version": "0.37.0",
    "processor": ["transformers", "Qwen2VLProcessor"],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "transformer": ["diffusers", "QwenImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLQwenImage"],
}

# Texts the tiny tokenizer learns as whole words, so the template's system block + "user\n" is
# 64 tokens, as with Qwen's real tokenizer (the pipeline drops exactly those).
CORPUS = (SYSTEM_PROMPT, "\nuser\nassistant\n", "Picture 1: Picture 2: Picture 10: ")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


def random_weights(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Seeded float32 weights for a (meta) module's state dict, scaled to keep activations O(1):
    norm gains near 1, small biases, other weights ~ N(0, 1/fan_in)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in sorted(module.state_dict().items()):
        shape = tuple(p.shape)
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "gamma" or (len(shape) == 1 and "norm" in name):
            t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif leaf == "bias":
            t = 0.05 * torch.randn(shape, generator=gen)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
            t = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
        out[name] = t.contiguous()
    return out


def _save_sharded(weights: dict[str, torch.Tensor], folder: Path, shards: int) -> None:
    """diffusers' sharded layout: ``diffusion_pytorch_model-0000i-of-0000n.safetensors`` + index."""
    names = sorted(weights)
    if shards <= 1:
        save_file(weights, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
        return
    per = math.ceil(len(names) / shards)
    weight_map = {}
    for i in range(shards):
        fname = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: weights[k] for k in names[i * per : (i + 1) * per]}
        save_file(part, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    size = sum(t.numel() * t.element_size() for t in weights.values())
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def make_tiny_weights(folder: str | os.PathLike, seed: int = 0, *, transformer_shards: int = 2) -> Path:
    """Write a complete toy Qwen-Image-Edit-2511 diffusers folder; returns its path."""
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    _write_json(root / "model_index.json", MODEL_INDEX)

    cfg = {k: v for k, v in TRANSFORMER_CONFIG.items() if not k.startswith("_")}
    with torch.device("meta"):
        transformer = QwenImageTransformer2DModel(**cfg)
    _write_json(root / "transformer" / "config.json", TRANSFORMER_CONFIG)
    _save_sharded(random_weights(transformer, seed), root / "transformer", transformer_shards)

    cfg = {k: v for k, v in VAE_CONFIG.items() if not k.startswith("_")}
    with torch.device("meta"):
        vae = AutoencoderKLQwenImage(**cfg)
    _write_json(root / "vae" / "config.json", VAE_CONFIG)
    _save_sharded(random_weights(vae, seed + 1), root / "vae", 1)

    _write_json(root / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)

    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_qwen(tmp, seed=seed + 2, hidden_size=TEXT_HIDDEN, corpus=CORPUS)
        src = Path(tmp)
        for sub in ("text_encoder", "tokenizer", "processor"):
            (root / sub).mkdir(exist_ok=True)
        shutil.copy(src / "config.json", root / "text_encoder" / "config.json")
        shutil.copy(src / "model.safetensors", root / "text_encoder" / "model.safetensors")
        for name in _TOKENIZER_FILES:
            shutil.copy(src / name, root / "tokenizer" / name)
            shutil.copy(src / name, root / "processor" / name)
        shutil.copy(src / "preprocessor_config.json", root / "processor" / "preprocessor_config.json")
    return root
