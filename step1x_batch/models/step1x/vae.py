"""FLUX.1 autoencoder (the Step1X-Edit VAE) in plain PyTorch.

Parameter names match the official FLUX ``ae.safetensors`` exactly, so the released file loads with
``load_state_dict(sd, assign=True)`` and no renaming. Nothing here allocates or initialises beyond
``nn.Module`` constructors, so the model can be built on the meta device.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class AutoEncoderParams:
    resolution: int = 256
    in_channels: int = 3
    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    scale_factor: float = 0.3611
    shift_factor: float = 0.1159

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor]) -> "AutoEncoderParams":
        """Infer the architecture from tensor shapes of an original-format (FLUX) state dict.

        scale/shift are not stored in the checkpoint; they keep the FLUX.1 defaults.
        """
        if "encoder.conv_in.weight" not in sd or "decoder.conv_out.weight" not in sd:
            raise ValueError("not a FLUX autoencoder state dict (no encoder.conv_in / decoder.conv_out)")
        ch, in_channels = sd["encoder.conv_in.weight"].shape[:2]
        levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
        if levels != list(range(len(levels))) or not levels:
            raise ValueError(f"unexpected encoder levels {levels}")
        blocks = {int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))}
        ch_mult = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels)
        return cls(
            in_channels=int(in_channels),
            ch=int(ch),
            out_ch=int(sd["decoder.conv_out.weight"].shape[0]),
            ch_mult=ch_mult,
            num_res_blocks=len(blocks),
            z_channels=int(sd["decoder.conv_in.weight"].shape[1]),
        )


def swish(x: Tensor) -> Tensor:
    return x * torch.sigmoid(x)


def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions (1x1 convs for q, k, v, out)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.norm = norm(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def attention(self, x: Tensor) -> Tensor:
        x = self.norm(x)
        b, c, h, w = x.shape
        # contiguous (b, 1, hw, c), as the FLUX / RealRestorer code makes them: a strided view
        # takes another SDPA path on CPU, which rounds differently in bf16
        q, k, v = (p(x).reshape(b, 1, c, h * w).transpose(2, 3).contiguous() for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # (b, 1, hw, c)
        return out.transpose(2, 3).reshape(b, c, h, w)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.proj_out(self.attention(x))


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        # asymmetric padding (right/bottom only) is what the checkpoint was trained with
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def mid_block(channels: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels)
    return mid


class Encoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, kernel_size=3, stride=1, padding=1)
        self.down = nn.ModuleList()
        block_in = p.ch
        for i, mult in enumerate(p.ch_mult):
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()  # empty; kept so the module tree mirrors the original
            for _ in range(p.num_res_blocks):
                level.block.append(ResnetBlock(block_in, p.ch * mult))
                block_in = p.ch * mult
            if i != len(p.ch_mult) - 1:
                level.downsample = Downsample(block_in)
            self.down.append(level)
        self.mid = mid_block(block_in)
        self.norm_out = norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * p.z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for block in level.block:
                h = block(h)
            if i != len(self.down) - 1:
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        block_in = p.ch * p.ch_mult[-1]
        self.conv_in = nn.Conv2d(p.z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = mid_block(block_in)
        levels: list[nn.Module] = []
        for i in reversed(range(len(p.ch_mult))):  # built coarse to fine, indexed fine to coarse (LDM)
            level = nn.Module()
            level.block = nn.ModuleList()
            level.attn = nn.ModuleList()
            for _ in range(p.num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, p.ch * p.ch_mult[i]))
                block_in = p.ch * p.ch_mult[i]
            if i != 0:
                level.upsample = Upsample(block_in)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = norm(block_in)
        self.conv_out = nn.Conv2d(block_in, p.out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i in reversed(range(len(self.up))):
            for block in self.up[i].block:
                h = block(h)
            if i != 0:
                h = self.up[i].upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class AutoEncoder(nn.Module):
    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)
        self.scale_factor = params.scale_factor
        self.shift_factor = params.shift_factor

    def encode_moments(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Image in [-1, 1] (B, C, H, W) -> posterior (mean, logvar), each (B, z, H/8, W/8); logvar unclamped."""
        mean, logvar = torch.chunk(self.encoder(x), 2, dim=1)
        return mean, logvar

    def latent(self, mean: Tensor, logvar: Tensor, noise: Tensor | None) -> Tensor:
        """Scaled latent from the posterior; the caller owns the (seeded) noise so results are reproducible."""
        if noise is None:
            z = mean
        else:
            if noise.shape != mean.shape:
                raise ValueError(f"noise shape {tuple(noise.shape)} != latent shape {tuple(mean.shape)}")
            z = mean + torch.exp(0.5 * logvar) * noise
        return self.scale_factor * (z - self.shift_factor)

    def encode(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        return self.latent(*self.encode_moments(x), noise)

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latent -> image in about [-1, 1] (not clamped)."""
        return self.decoder(z / self.scale_factor + self.shift_factor)
