"""The family's options (``model.options``): plain pydantic, so the job reads them without torch."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from step1x_batch.models.base import option

VL_AREA = 384 * 384
REFERENCE_AREA = 1024 * 1024


class QwenImageEditOptions(BaseModel):
    """``model.options`` for ``family: qwen-image-edit``."""

    model_config = ConfigDict(extra="forbid")

    max_images: int = option(10, pixels=False, ge=1)  # more in a row: a too_many_images row error
    # Each reference's VAE area: "fixed" = reference_area for every reference (diffusers);
    # "macro" = by reference count, 1..10: 1024², 1024², 768² x3, 512² x5 (MACRO's training).
    reference_areas: Literal["fixed", "macro"] = option("fixed", pixels=True)
    reference_area: int = option(REFERENCE_AREA, pixels=True, ge=32 * 32)
    vl_area: int = option(VL_AREA, pixels=True, ge=32 * 32)  # each image's area for the Qwen2.5-VL encoder
    # The Qwen2-VL image processor for the encoder's pixels: "torchvision" = transformers'
    # torchvision backend, which diffusers runs on a standard (GPU) install; "pil" = its PIL
    # backend, which diffusers runs where torchvision is absent. Both are computed without torchvision.
    image_processor: Literal["torchvision", "pil"] = option("torchvision", pixels=True)
    cfg_norm_rescale: bool = option(True, pixels=True)  # False: plain CFG, as DiffSynth-Studio runs it
    # Text-encoder rope: "mrope" = 3-D positions, as the weights were trained (transformers 4.5x);
    # "1d" = what stock diffusers 0.42 gets on transformers 5 (no mm_token_type_ids reach the model).
    text_positions: Literal["mrope", "1d"] = option("mrope", pixels=True)
    # Every input first resized (LANCZOS, shorter side) and centre-cropped to this square, as
    # PixelSmile's inference does (512); None: the inputs as they are.
    square_input: int | None = option(None, pixels=True, ge=32)
    # Keys overriding the folder's scheduler/scheduler_config.json, e.g. the Lightning 4-step
    # LoRA's {base_shift: 1.0986, max_shift: 1.0986, shift_terminal: null}.
    scheduler: dict[str, Any] = option(default_factory=dict, pixels=True)
