"""Parity of our FLUX autoencoder against an independent implementation: diffusers' AutoencoderKL in the
FLUX configuration, loaded from our original-format state dict through diffusers' own LDM converter."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from step1x_batch.models.step1x.vae import AutoEncoder, AutoEncoderParams

PARAMS = AutoEncoderParams(ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=2, z_channels=16)
H, W = 64, 96  # non-square on purpose
TOL = 1e-4


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere (norm affines too) at a scale that keeps activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)


def diffusers_vae(p: AutoEncoderParams) -> AutoencoderKL:
    n = len(p.ch_mult)
    return AutoencoderKL(
        in_channels=p.in_channels,
        out_channels=p.out_ch,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(p.ch * m for m in p.ch_mult),
        layers_per_block=p.num_res_blocks,
        act_fn="silu",
        latent_channels=p.z_channels,
        norm_num_groups=32,
        sample_size=p.resolution,
        scaling_factor=p.scale_factor,
        shift_factor=p.shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


@pytest.fixture(scope="module")
def pair() -> tuple[AutoEncoder, AutoencoderKL]:
    ours = AutoEncoder(PARAMS).eval()
    randomize(ours, seed=0)
    sd = ours.state_dict()
    ref = diffusers_vae(PARAMS).eval()
    converted = convert_ldm_vae_checkpoint(sd, dict(ref.config))
    # the converter drops keys it does not know: make sure every one of ours was carried over
    assert len(converted) == len(sd)
    assert sum(t.numel() for t in converted.values()) == sum(t.numel() for t in sd.values())
    ref.load_state_dict(converted, strict=True)
    return ours, ref


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(2, 3, H, W, generator=g) * 2 - 1


def test_encode_moments_match_diffusers(pair, image):
    ours, ref = pair
    with torch.no_grad():
        mean, logvar = ours.encode_moments(image)
        dist = ref.encode(image).latent_dist
    assert mean.shape == (2, 16, H // 8, W // 8)
    # diffusers clamps logvar to [-30, 20], FLUX does not: stay where both agree so the test is fair
    assert -30 < logvar.min() and logvar.max() < 20
    assert mean.std() > 0.1 and logvar.std() > 0.1  # non-trivial activations
    assert rel(mean, dist.mean) <= TOL
    assert rel(logvar, dist.logvar) <= TOL


def test_scaled_latent_matches_diffusers(pair, image):
    ours, ref = pair
    with torch.no_grad():
        z = ours.encode(image)
        m = ref.encode(image).latent_dist.mean
    expected = ref.config.scaling_factor * (m - ref.config.shift_factor)
    assert rel(z, expected) <= TOL


def test_decode_matches_diffusers(pair):
    ours, ref = pair
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2, 16, H // 8, W // 8, generator=g)
    with torch.no_grad():
        x = ours.decode(z)
        expected = ref.decode(z / ref.config.scaling_factor + ref.config.shift_factor).sample
    assert x.shape == (2, 3, H, W)
    assert x.std() > 0.1
    assert rel(x, expected) <= TOL


def test_group_norms_match_diffusers(pair):
    # eps 1e-6 vs 1e-5 is below the parity tolerance at O(1) activations, so compare the settings directly
    ours, ref = pair

    def norms(m: torch.nn.Module) -> list[tuple[int, int, float]]:
        return sorted((n.num_groups, n.num_channels, n.eps) for n in m.modules() if isinstance(n, torch.nn.GroupNorm))

    assert norms(ours) == norms(ref)
    assert {eps for _, _, eps in norms(ours)} == {1e-6}


def test_latent_with_seeded_noise(pair, image):
    ours, _ = pair
    with torch.no_grad():
        mean, logvar = ours.encode_moments(image)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    z = ours.latent(mean, logvar, noise)
    expected = PARAMS.scale_factor * (mean + torch.exp(0.5 * logvar) * noise - PARAMS.shift_factor)
    torch.testing.assert_close(z, expected)
    assert not torch.allclose(z, ours.latent(mean, logvar, None))
    torch.testing.assert_close(ours.latent(mean, logvar, None), PARAMS.scale_factor * (mean - PARAMS.shift_factor))
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(image, noise), z)
    with pytest.raises(ValueError):
        ours.latent(mean, logvar, noise[:1])


@pytest.mark.parametrize(
    "params",
    [
        PARAMS,
        AutoEncoderParams(),  # the real FLUX.1 shape, built on meta only
        AutoEncoderParams(in_channels=4, ch=64, out_ch=5, ch_mult=(2, 1, 3), num_res_blocks=1, z_channels=8),
    ],
)
def test_from_state_dict_recovers_params(params):
    with torch.device("meta"):
        model = AutoEncoder(params)
    assert AutoEncoderParams.from_state_dict(model.state_dict()) == params


def test_real_flux_key_names():
    with torch.device("meta"):
        sd = AutoEncoder(AutoEncoderParams()).state_dict()
    expected = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.2.downsample.conv.weight": (512, 512, 3, 3),
        "encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        "encoder.conv_out.weight": (32, 512, 3, 3),
        "decoder.conv_in.weight": (512, 16, 3, 3),
        "decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
        "decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.up.1.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.norm_out.weight": (128,),
    }
    for k, shape in expected.items():
        assert tuple(sd[k].shape) == shape, k
    assert "decoder.up.0.upsample.conv.weight" not in sd and "encoder.down.3.downsample.conv.weight" not in sd
    assert not any("quant" in k for k in sd)
    assert len(sd) == 244  # tensor count of the official FLUX.1 ae.safetensors
    assert sum(t.numel() for t in sd.values()) == 83_819_683  # x4 bytes = the 335 MB fp32 file
    # and diffusers' FLUX-config AutoencoderKL accepts every tensor at full size (built on meta: no memory)
    with torch.device("meta"):
        ref = diffusers_vae(AutoEncoderParams())
    converted = convert_ldm_vae_checkpoint(sd, dict(ref.config))
    assert len(converted) == len(sd)
    ref.load_state_dict(converted, strict=True, assign=True)


def test_builds_on_meta_and_loads_with_assign(pair, image):
    ours, _ = pair
    with torch.device("meta"):
        model = AutoEncoder(PARAMS)
    assert all(p.is_meta for p in model.parameters())
    sd = {k: v.clone() for k, v in ours.state_dict().items()}
    model.load_state_dict(sd, strict=True, assign=True)
    assert not any(p.is_meta for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model.encode(image), ours.encode(image), rtol=0, atol=0)
