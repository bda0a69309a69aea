"""The connector: Qwen2.5-VL hidden states -> DiT text tokens and pooled vector.

A HunyuanVideo-style "single token refiner" (timestep-conditioned, gated, two blocks) plus a
global projection of the masked mean. v1.0 scales that mean by a learned ``1 + scale_factor``;
v1.1 has no such parameter, which is how the two versions are told apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import timestep_embedding
from step1x_batch.models.loading import count_indexed


@dataclass(frozen=True)
class ConnectorParams:
    in_channels: int = 3584
    hidden_size: int = 4096
    vec_dim: int = 768
    num_heads: int = 32
    depth: int = 2
    mlp_ratio: float = 4.0
    scale_factor_shape: tuple[int, ...] | None = None  # v1.0 only; None means v1.1

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor], prefix: str = "connector.") -> "ConnectorParams":
        hidden, in_channels = sd[prefix + "S.input_embedder.weight"].shape
        blocks = prefix + "S.individual_token_refiner.blocks."
        return cls(
            in_channels=in_channels,
            hidden_size=hidden,
            vec_dim=sd[prefix + "global_proj_out.weight"].shape[0],
            # The release has 32 heads of 128; smaller files keep 128-wide heads where possible.
            num_heads=max(hidden // 128, 1) if hidden % 128 == 0 else _small_heads(hidden),
            depth=count_indexed(sd, blocks),
            mlp_ratio=sd[blocks + "0.mlp.fc1.weight"].shape[0] / hidden,
            scale_factor_shape=tuple(sd[prefix + "scale_factor"].shape) if prefix + "scale_factor" in sd else None,
        )


def _small_heads(hidden: int) -> int:
    for heads in (8, 4, 2, 1):
        if hidden % heads == 0:
            return heads
    return 1


class RefinerBlock(nn.Module):
    """Pre-norm self-attention + MLP, each scaled by a gate from the conditioning vector."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads = num_heads
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=True, eps=1e-6)
        self.self_attn_qkv = nn.Linear(hidden_size, hidden_size * 3, bias=True)
        self.self_attn_proj = nn.Linear(hidden_size, hidden_size, bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=True, eps=1e-6)
        self.mlp = nn.ModuleDict(
            {"fc1": nn.Linear(hidden_size, mlp_hidden), "fc2": nn.Linear(mlp_hidden, hidden_size)}
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, c: Tensor, attn_mask: Tensor) -> Tensor:
        gate_msa, gate_mlp = self.adaLN_modulation(c).chunk(2, dim=1)
        b, l, _ = x.shape
        q, k, v = self.self_attn_qkv(self.norm1(x)).view(b, l, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        x = x + gate_msa[:, None] * self.self_attn_proj(attn.transpose(1, 2).flatten(2))
        mlp = self.mlp["fc2"](F.silu(self.mlp["fc1"](self.norm2(x))))
        return x + gate_mlp[:, None] * mlp


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_dim).to(self.mlp[0].weight.dtype))


class TextProjection(nn.Module):
    def __init__(self, in_channels: int, hidden_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, hidden_size)
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class IndividualTokenRefiner(nn.Module):
    def __init__(self, params: ConnectorParams):
        super().__init__()
        self.blocks = nn.ModuleList(
            RefinerBlock(params.hidden_size, params.num_heads, params.mlp_ratio) for _ in range(params.depth)
        )

    def forward(self, x: Tensor, c: Tensor, mask: Tensor) -> Tensor:
        valid = mask.bool()
        attn_mask = valid[:, None, None, :] & valid[:, None, :, None]
        attn_mask[:, :, :, 0] = True  # padded query rows see key 0, so they stay finite
        for block in self.blocks:
            x = block(x, c, attn_mask)
        return x


class SingleTokenRefiner(nn.Module):
    def __init__(self, params: ConnectorParams):
        super().__init__()
        self.input_embedder = nn.Linear(params.in_channels, params.hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(params.hidden_size)
        self.c_embedder = TextProjection(params.in_channels, params.hidden_size)
        self.individual_token_refiner = IndividualTokenRefiner(params)

    def forward(self, x: Tensor, t: Tensor, mask: Tensor) -> Tensor:
        c = self.t_embedder(t) + self.c_embedder(masked_mean(x, mask))
        return self.individual_token_refiner(self.input_embedder(x), c, mask)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(dim=1) / m.sum(dim=1)


class Connector(nn.Module):
    """``forward(hidden, t, mask) -> (txt tokens (B, L, hidden_size), pooled vector y (B, vec_dim))``."""

    def __init__(self, params: ConnectorParams):
        super().__init__()
        self.params = params
        self.S = SingleTokenRefiner(params)
        self.global_proj_out = nn.Linear(params.in_channels, params.vec_dim)
        if params.scale_factor_shape is not None:
            self.scale_factor = nn.Parameter(torch.full(params.scale_factor_shape, -0.91))

    def forward(self, x: Tensor, t: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        mean = masked_mean(x, mask)
        if self.params.scale_factor_shape is not None:
            mean = mean * (1 + self.scale_factor)
        return self.S(x, t, mask), self.global_proj_out(mean)
