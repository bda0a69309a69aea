"""The Step1X-Edit DiT: a Flux-style MMDiT (original key names).

The Step1X-Edit releases have no guidance embedding; fine-tunes such as RealRestorer may carry
FLUX's ``guidance_in`` (an MLP on the sinusoidal embedding of the guidance value, added to ``vec``
between the timestep and the pooled-text terms). It is built when the weights have it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor, nn

from step1x_batch.models.loading import count_indexed
from .layers import DoubleStreamBlock, EmbedND, LastLayer, MLPEmbedder, SingleStreamBlock, timestep_embedding


@dataclass(frozen=True)
class DiTParams:
    in_channels: int = 64
    out_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = False  # a FLUX-style guidance embedder ``guidance_in`` (RealRestorer may have one)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor], prefix: str = "") -> "DiTParams":
        """Read every size from tensor shapes (the head dim from the qk-norm scale).

        The rope axes keep the release's proportions (16:56:56 of a 128-wide head).
        """

        def shape(key: str) -> torch.Size:
            return sd[prefix + key].shape

        hidden, in_channels = shape("img_in.weight")
        mlp_hidden = shape("double_blocks.0.img_mlp.0.weight")[0]
        head_dim = shape("double_blocks.0.img_attn.norm.query_norm.scale")[0]
        axis0 = head_dim // 8
        axes = (axis0, (head_dim - axis0) // 2, (head_dim - axis0) // 2)
        return cls(
            in_channels=in_channels,
            out_channels=shape("final_layer.linear.weight")[0],
            vec_in_dim=shape("vector_in.in_layer.weight")[1],
            context_in_dim=shape("txt_in.weight")[1],
            hidden_size=hidden,
            mlp_ratio=mlp_hidden / hidden,
            num_heads=hidden // head_dim,
            depth=count_indexed(sd, prefix + "double_blocks."),
            depth_single_blocks=count_indexed(sd, prefix + "single_blocks."),
            axes_dim=axes,
            qkv_bias=(prefix + "double_blocks.0.img_attn.qkv.bias") in sd,
            guidance_embed=(prefix + "guidance_in.in_layer.weight") in sd,
        )


class Step1XDiT(nn.Module):
    """Joint text-image transformer; ``forward`` predicts the flow velocity for image tokens."""

    def __init__(self, params: DiTParams):
        super().__init__()
        if params.hidden_size % params.num_heads:
            raise ValueError(f"hidden size {params.hidden_size} not divisible by {params.num_heads} heads")
        pe_dim = params.hidden_size // params.num_heads
        if sum(params.axes_dim) != pe_dim:
            raise ValueError(f"rope axes {params.axes_dim} must sum to the head dim {pe_dim}")
        self.params = params
        self.pe_embedder = EmbedND(theta=params.theta, axes_dim=list(params.axes_dim))
        self.img_in = nn.Linear(params.in_channels, params.hidden_size, bias=True)
        self.time_in = MLPEmbedder(256, params.hidden_size)
        self.vector_in = MLPEmbedder(params.vec_in_dim, params.hidden_size)
        self.guidance_in = MLPEmbedder(256, params.hidden_size) if params.guidance_embed else None
        self.txt_in = nn.Linear(params.context_in_dim, params.hidden_size)
        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(params.hidden_size, params.num_heads, params.mlp_ratio, params.qkv_bias)
            for _ in range(params.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(params.hidden_size, params.num_heads, params.mlp_ratio)
            for _ in range(params.depth_single_blocks)
        )
        self.final_layer = LastLayer(params.hidden_size, params.out_channels)

    def forward(
        self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor, timesteps: Tensor, y: Tensor,
        guidance: float | Tensor | None = None,
    ) -> Tensor:
        """img (B, L, C_in), img_ids (B, L, 3), txt (B, T, context), txt_ids (B, T, 3), timesteps (B,), y (B, vec).

        ``guidance``: the value fed to ``guidance_in`` (a number, or (B,)), required when the
        weights have one and ignored otherwise. Like upstream it is a vector in the timesteps'
        dtype, embedded as the timesteps are (``1000 * g``, cos/sin).
        """
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256))
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("these weights have a guidance embedder (guidance_in): pass guidance=")
            g = guidance.to(timesteps) if isinstance(guidance, Tensor) else torch.full_like(timesteps, guidance)
            vec = vec + self.guidance_in(timestep_embedding(g, 256))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        for block in self.double_blocks:
            img, txt = block(img, txt, vec, pe)
        x = torch.cat((txt, img), dim=1)
        for block in self.single_blocks:
            x = block(x, vec, pe)
        return self.final_layer(x[:, txt.shape[1] :], vec)
