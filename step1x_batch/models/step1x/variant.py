"""Which released pipeline the step1x family follows: Step1X-Edit's or RealRestorer's.

RealRestorer is a Step1X-Edit fine-tune with the same networks, but its released diffusers
pipeline (``pipeline_realrestorer.py``, ``autoencoder_kl_realrestorer.py``,
``scheduling_realrestorer_flow_match.py``, loaded by ``inference.py`` from its bundle) differs from
Step1X-Edit's ``inference.py`` in ways that change pixels. Each difference is one field here, so
the shared code reads "what does the released code of this variant do" and nothing else.

The variant comes from ``options.variant`` or, when that is unset, from the weights' layout: a
RealRestorer bundle runs as RealRestorer, a release folder as Step1X-Edit. No torch here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .release import REALRESTORER as BUNDLE, detect_layout

STEP1X = "step1x"
REALRESTORER = "realrestorer"


@dataclass(frozen=True)
class Variant:
    """What a released pipeline does at each point where the two differ."""

    name: str
    # "Picture 1: " before the image in the chat template (RealRestorer's pinned transformers
    # 4.57 honours add_vision_id=True; Step1X-Edit's 4.51 dropped it).
    vision_id: bool
    # float [0, 1] -> uint8 by rounding (RealRestorer's _tensor_to_pil) instead of truncation
    # (torchvision's to_pil_image / mul(255).byte()), for the VLM's image and the output.
    round_to_uint8: bool
    # The VAE in the run's dtype, outside autocast (the bundle loader casts every component to
    # torch_dtype; the pipeline disables autocast around the VAE) instead of float32.
    vae_in_run_dtype: bool
    # The Euler step of RealRestorer's scheduler: t and the schedule in the latent dtype, the next
    # t found by argmin over the rounded schedule (bf16 can repeat a value: that step is then 0).
    released_step: bool
    # bf16 autocast around the DiT on CUDA only (whatever the dtype); none on other devices.
    # Step1X-Edit: autocast in the run's dtype everywhere but float32.
    autocast_cuda_only: bool
    # A model-size side under 16 px is clamped to 16 (RealRestorer's _resize_image); Step1X-Edit
    # would floor it to 0, which this project reports as a row error.
    clamp_small_side: bool
    # Qwen image-processor pixel limits from the weights' processor folder (the bundle's
    # AutoProcessor.from_pretrained takes none); Step1X-Edit passes 256*28*28 / 324*28*28.
    processor_limits_from_folder: bool
    # The text encoder as flash-attention runs it (masked query rows zero; Step1X-Edit's
    # flash_attention_2) or as SDPA does (RealRestorer's default attention).
    zero_masked_queries: bool
    # The DiT's QK RMSNorm weight multiply in float32 (Step1X-Edit's fused liger kernel) or after
    # the cast back, in the run's dtype (RealRestorer's plain-PyTorch path: its requirements do
    # not install liger_kernel).
    qk_norm_weight_in_fp32: bool
    # transformers' Qwen2-VL image processor backend: "pil" (Step1X-Edit's) or "torchvision"
    # (RealRestorer pins transformers 4.57 with torchvision, whose AutoProcessor loads
    # Qwen2VLImageProcessor as the fast, torchvision processor).
    image_processor: str


VARIANTS = {
    STEP1X: Variant(STEP1X, vision_id=False, round_to_uint8=False, vae_in_run_dtype=False, released_step=False,
                    autocast_cuda_only=False, clamp_small_side=False, processor_limits_from_folder=False,
                    zero_masked_queries=True, qk_norm_weight_in_fp32=True, image_processor="pil"),
    REALRESTORER: Variant(REALRESTORER, vision_id=True, round_to_uint8=True, vae_in_run_dtype=True,
                          released_step=True, autocast_cuda_only=True, clamp_small_side=True,
                          processor_limits_from_folder=True, zero_masked_queries=False,
                          qk_norm_weight_in_fp32=False, image_processor="torchvision"),
}


def resolve_variant(name: str | None, folder: str | os.PathLike | None = None) -> Variant:
    """``name`` when given; otherwise RealRestorer for a RealRestorer bundle, Step1X-Edit else."""
    if name is None:
        name = REALRESTORER if folder is not None and detect_layout(folder) == BUNDLE else STEP1X
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; expected one of {sorted(VARIANTS)}")
    return VARIANTS[name]
