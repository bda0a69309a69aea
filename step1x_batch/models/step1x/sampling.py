"""Flow-matching sampling: the shifted timestep schedule and the Euler loop with batched CFG."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor


def time_shift(mu: float, sigma: float, t: Tensor) -> Tensor:
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def shift_mu(image_seq_len: int, x1: float = 256, y1: float = 0.5, x2: float = 4096, y2: float = 1.15) -> float:
    """mu linear in the number of target tokens (not clamped, as the reference)."""
    slope = (y2 - y1) / (x2 - x1)
    return slope * image_seq_len + (y1 - slope * x1)


def get_schedule(
    num_steps: int, image_seq_len: int, base_shift: float = 0.5, max_shift: float = 1.15, shift: bool = True
) -> list[float]:
    """``num_steps + 1`` times from 1 to 0, shifted toward 1 for larger images."""
    timesteps = torch.linspace(1, 0, num_steps + 1)
    if shift:
        mu = shift_mu(image_seq_len, y1=base_shift, y2=max_shift)
        timesteps = time_shift(mu, 1.0, timesteps)
    return timesteps.tolist()


def cfg_combine(cond: Tensor, uncond: Tensor, scale: float, truncate_norm: bool) -> Tensor:
    """``u + s (c - u)``; with ``truncate_norm`` the guidance term is divided by ``max(n, 1) ** 0.4``,
    n the per-token L2 norm of ``c - u`` over channels (v1.1, early steps). Operations in the
    releases' order, ``u + (s (c - u)) / f``, so bf16 rounds where theirs does."""
    diff = cond - uncond
    if truncate_norm:
        norm = torch.linalg.vector_norm(diff, dim=-1, keepdim=True)
        return uncond + scale * diff / torch.where(norm > 1, norm.pow(0.4), torch.ones_like(norm))
    return uncond + scale * diff


def released_step(x: Tensor, v: Tensor, t_cur: float, schedule: Tensor) -> Tensor:
    """One Euler step as RealRestorer's scheduler takes it: ``t_cur`` and the ``schedule`` in
    ``x``'s dtype, the next time the one after the first schedule entry nearest ``t_cur`` (in
    bf16 two early times can round to one value: the second of them then steps by 0), the
    difference taken in that dtype."""
    schedule = schedule.to(device=x.device, dtype=x.dtype)
    t = torch.tensor(float(t_cur), device=x.device, dtype=x.dtype)
    index = int(torch.argmin(torch.abs(schedule - t)).item())
    t_next = schedule[min(index + 1, schedule.numel() - 1)]
    return x + (t_next - t) * v


VelocityFn = Callable[[Tensor, Tensor], Tensor]


def denoise(
    velocity: VelocityFn,
    x: Tensor,
    timesteps: list[float],
    guidance_scale: float,
    cfg_truncation_t: float = 1.0,
    *,
    step_as_released: bool = False,
) -> Tensor:
    """Euler-integrate ``x`` (B, L, C) from ``timesteps[0]`` to ``timesteps[-1]``.

    ``velocity(x2, t)`` gets the rows twice, ``[x; x]`` (cond then uncond), and ``t`` of shape (2B,)
    in ``x``'s dtype (the reference rounds t to the latent dtype; DiT and connector see that value).
    ``x`` stays in its own dtype throughout, as in the reference. ``step_as_released``: each step
    as :func:`released_step` (RealRestorer); otherwise ``x + (t_next - t_cur) v`` (Step1X-Edit).
    """
    b = x.shape[0]
    schedule = torch.tensor(timesteps, dtype=torch.float32)
    for t_cur, t_next in zip(timesteps[:-1], timesteps[1:]):
        t_vec = torch.full((2 * b,), t_cur, dtype=x.dtype, device=x.device)
        pred = velocity(torch.cat((x, x)), t_vec)
        v = cfg_combine(pred[:b], pred[b:], guidance_scale, truncate_norm=t_cur > cfg_truncation_t)
        x = released_step(x, v, t_cur, schedule) if step_as_released else x + (t_next - t_cur) * v
    return x
