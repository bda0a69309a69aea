"""The denoisers' GPU throughput switches: the attention kernel, and regional compilation.

**Attention kernel**, chosen once per engine, by rule. Attention is a third of a 1024^2 edit's FLOPs, and torch's own dispatcher may fall back to a slower
kernel than the device has (or, with a mask, to the math kernel). The choice here is deterministic
(a preference order by device, never a timing race), because which kernel runs changes the last
bits of the pixels: the same hardware and software always pick the same kernel.

Preference: cuDNN attention on Hopper and newer (compute capability >= 9.0), then flash, then
memory-efficient, then math; flash first on older GPUs and on the CPU. A kernel is *available* when
it runs a probe with the engine's call pattern (dtype, head size, with or without a mask).
``benchmarks/gpu_check.py`` times every available kernel on the real shapes, to check the order.

**Regional compilation**: ``torch.compile`` of each denoiser block in place rather than of the
whole model, so the compile time is one block's (blocks of one kind share their code) and the
state dict keys stay as they are. With batch invariance the shapes are fixed, so nothing recompiles.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
NAMES = {v: k for k, v in BACKENDS.items()}


def compile_blocks(*block_lists: torch.nn.ModuleList) -> None:
    """``torch.compile`` every block of the lists in place (regional compilation)."""
    for blocks in block_lists:
        for block in blocks:
            block.compile(dynamic=False)


def preference(device: torch.device) -> list[str]:
    """Fastest first, for this device."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0):
        return ["cudnn", "flash", "efficient", "math"]
    return ["flash", "efficient", "cudnn", "math"]


def runs(name: str, device: torch.device, dtype: torch.dtype, head_dim: int, masked: bool) -> bool:
    """Whether kernel ``name`` runs an attention of this shape family on ``device``."""
    q = torch.randn(1, 2, 64, head_dim, device=device, dtype=dtype)
    mask = torch.ones(1, 1, 64, 64, device=device, dtype=torch.bool).tril() if masked else None
    try:
        with sdpa_kernel([BACKENDS[name]]):
            F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
        return True
    except RuntimeError:
        return False


def choose_attention(requested: str, device: torch.device, dtype: torch.dtype, head_dim: int, masked: bool) -> str:
    """The kernel to run: ``requested`` if it runs here, else the first available by preference
    (``"auto"``). Raises ValueError for a requested kernel that cannot run on this device."""
    if requested != "auto":
        if requested not in BACKENDS:
            raise ValueError(f"unknown attention kernel {requested!r}; use auto, {', '.join(BACKENDS)}")
        if not runs(requested, device, dtype, head_dim, masked):
            raise ValueError(f"attention kernel {requested!r} does not run on {device} for {dtype}, "
                             f"head size {head_dim}{' with a mask' if masked else ''}; use auto")
        return requested
    return next(name for name in preference(device) if runs(name, device, dtype, head_dim, masked))


@contextlib.contextmanager
def using_attention(name: str) -> Iterator[None]:
    """Run attention with kernel ``name`` first (math stays allowed for calls it cannot take)."""
    backends = [BACKENDS[name]] + ([SDPBackend.MATH] if name != "math" else [])
    with sdpa_kernel(backends, set_priority=True):
        yield
