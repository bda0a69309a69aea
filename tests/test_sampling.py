"""The sampler against diffusers' FlowMatchEulerDiscreteScheduler (an independent implementation)."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from step1x_batch.models.step1x.sampling import cfg_combine, denoise, get_schedule


def diffusers_sigmas(num_steps: int, seq_len: int) -> np.ndarray:
    sched = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096, time_shift_type="exponential",
    )
    mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    sched.set_timesteps(sigmas=np.linspace(1.0, 0.0, num_steps + 1)[:-1], mu=mu)
    return sched.sigmas.numpy(), sched


@pytest.mark.parametrize("num_steps", [1, 10, 28, 50])
@pytest.mark.parametrize("seq_len", [256, 1024, 4096, 8192])  # 8192: mu past max_shift, unclamped
def test_schedule_matches_diffusers(num_steps, seq_len):
    ours = np.array(get_schedule(num_steps, seq_len))
    theirs, _ = diffusers_sigmas(num_steps, seq_len)
    assert ours.shape == (num_steps + 1,)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    assert ours[0] == 1.0 and ours[-1] == 0.0


def test_shift_grows_with_image_size():
    small, large = get_schedule(28, 256), get_schedule(28, 4096)
    assert all(b > a for a, b in zip(small[1:-1], large[1:-1]))


def test_euler_loop_matches_scheduler_steps():
    torch.manual_seed(0)
    x0 = torch.randn(2, 12, 8, dtype=torch.float64)
    w = torch.randn(8, 8, dtype=torch.float64)

    def velocity(x2, t):  # a nonlinear field, same for cond and uncond: guidance has no effect
        return torch.tanh(x2 @ w) * (1 + t[:, None, None].to(x2.dtype))

    steps = 6
    ours = denoise(velocity, x0.clone(), get_schedule(steps, 48), guidance_scale=4.0)
    _, sched = diffusers_sigmas(steps, 48)
    x = x0.clone()
    for i, t in enumerate(sched.timesteps):
        sigma = sched.sigmas[i].item()
        t_vec = torch.full((4,), sigma, dtype=x.dtype)
        v = velocity(torch.cat((x, x)), t_vec)[:2]
        x = sched.step(v, t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-6)


def test_timestep_is_rounded_to_latent_dtype():
    seen = []

    def velocity(x2, t):
        seen.append(t)
        return torch.zeros_like(x2)

    schedule = get_schedule(4, 4096)
    denoise(velocity, torch.zeros(1, 4, 4, dtype=torch.bfloat16), schedule, 6.0)
    assert all(t.dtype == torch.bfloat16 and t.shape == (2,) for t in seen)
    assert seen[1][0].item() == torch.tensor(schedule[1]).to(torch.bfloat16).item()
    assert seen[1][0].item() != schedule[1]  # the rounding is real at this t


def reference_cfg(cond, uncond, scale, truncate):
    """Per-token loop in float64, written from the reference's formula."""
    out = np.empty_like(cond)
    for b in range(cond.shape[0]):
        for i in range(cond.shape[1]):
            d = cond[b, i] - uncond[b, i]
            n = np.sqrt((d**2).sum())
            f = n**0.4 if (truncate and n > 1) else 1.0
            out[b, i] = uncond[b, i] + scale * d / f
    return out


@pytest.mark.parametrize("truncate", [False, True])
def test_cfg_combine_matches_reference_formula(truncate):
    g = torch.Generator().manual_seed(1)
    cond = torch.randn(2, 5, 16, generator=g, dtype=torch.float64)
    uncond = cond + torch.randn(2, 5, 16, generator=g, dtype=torch.float64) * torch.tensor([0.05, 2.0]).view(2, 1, 1).double()
    ours = cfg_combine(cond, uncond, 6.0, truncate).numpy()
    np.testing.assert_allclose(ours, reference_cfg(cond.numpy(), uncond.numpy(), 6.0, truncate), rtol=1e-12)


def test_cfg_truncation_only_above_threshold():
    ts = []

    def velocity(x2, t):
        ts.append(t[0].item())
        b = x2.shape[0] // 2
        return torch.cat((torch.full_like(x2[:b], 10.0), torch.zeros_like(x2[:b])))

    x = torch.zeros(1, 1, 4, dtype=torch.float64)
    schedule = [1.0, 0.95, 0.5, 0.0]
    out = denoise(velocity, x, schedule, guidance_scale=2.0, cfg_truncation_t=0.93)
    # diff norm = 20 > 1: steps at t=1.0 and 0.95 are truncated by 20**0.4, the step at 0.5 is not
    per_channel = 2.0 * 10.0
    expected = (-0.05) * per_channel / 20**0.4 + (-0.45) * per_channel / 20**0.4 + (-0.5) * per_channel
    torch.testing.assert_close(out, torch.full_like(out, expected))
    never = denoise(velocity, x, schedule, guidance_scale=2.0, cfg_truncation_t=1.0)
    torch.testing.assert_close(never, torch.full_like(out, -1.0 * per_channel))
