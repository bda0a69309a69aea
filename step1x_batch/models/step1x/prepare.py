"""Step1X-Edit's CPU work for one row: model size, resize, VLM inputs, token ids, rope positions.

Runs in the job's prepare stage (and in :class:`~.pipeline.Step1XEditPipeline` for in-process use), so
the GPU actor gets ready arrays. No torch here.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from step1x_batch.models.base import (
    INVALID_INSTRUCTION,
    UNSUPPORTED_SIZE,
    EditRequest,
    Prepared,
    RowFailure,
)

from .conditioner import PromptInputs, Step1XPrompts
from step1x_batch.models.qwen_vl.processor import TextInput


def model_size(width: int, height: int, size_level: int, clamp_small_side: bool = False) -> tuple[int, int]:
    """Keep the aspect ratio at an area of about ``size_level**2``, both sides floored to x16.

    A side that floors under 16: a row error (Step1X-Edit's code would make it 0), or 16 with
    ``clamp_small_side`` (RealRestorer's ``_resize_image``).
    """
    r = width / height
    if width > height:
        w = math.ceil(math.sqrt(size_level**2 * r))
        h = math.ceil(w / r)
    else:
        h = math.ceil(math.sqrt(size_level**2 / r))
        w = math.ceil(h * r)
    w, h = w // 16 * 16, h // 16 * 16
    if clamp_small_side:
        w, h = max(16, w), max(16, h)
    if w < 16 or h < 16:
        raise RowFailure(
            UNSUPPORTED_SIZE,
            f"image {width}x{height} is too thin for size level {size_level} (a side would be under 16 "
            "pixels); crop it or raise size_level",
        )
    return w, h


def resize(image: np.ndarray, size: tuple[int, int], resample: int = Image.Resampling.LANCZOS) -> np.ndarray:
    """``image`` at ``size`` (width, height); unchanged if equal. LANCZOS: both releases' resize to
    the model size (Step1X-Edit v1.1, RealRestorer)."""
    if (image.shape[1], image.shape[0]) == size:
        return image
    return np.asarray(Image.fromarray(image).resize(size, resample))


def resize_back(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The output back at the input's ``size``, as both releases do it: ``Image.resize(size)`` with
    Pillow's default filter, bicubic for RGB (not the LANCZOS of the way in)."""
    return resize(image, size, Image.Resampling.BICUBIC)


def _text(inputs: TextInput, prefix: str) -> dict[str, np.ndarray]:
    return {f"{prefix}_ids": inputs.ids, f"{prefix}_pos": inputs.positions, f"{prefix}_mask": inputs.mask}


def prepare_row(prompts: Step1XPrompts, request: EditRequest, *, posterior_mean: bool = False) -> Prepared:
    """One row -> the reference image at the model size, its Qwen vision inputs, and the token
    ids, masks and positions of the instruction and negative prompts."""
    (image,) = request.images
    p = request.params
    w, h = model_size(image.shape[1], image.shape[0], p.size_level, prompts.variant.clamp_small_side)
    for text in (request.instruction, p.negative_prompt) + ((p.blend_instruction,) if p.blend_instruction else ()):
        try:
            prompts.check_text(text)
        except ValueError as e:
            raise RowFailure(INVALID_INSTRUCTION, f"the instruction or negative prompt cannot be used: {e}") from None
    ref = resize(image, (w, h))
    inputs = prompts.prepare(ref, request.instruction, p.negative_prompt, p.blend_instruction, p.blend_scale)
    arrays = {"ref": ref, "pixel_values": inputs.pixel_values, "grid": inputs.grid}
    arrays.update(_text(inputs.cond, "cond"))
    arrays.update(_text(inputs.uncond, "uncond"))
    if inputs.blend is not None:
        arrays.update(_text(inputs.blend, "blend"))
    meta = {
        "seed": int(request.seed),
        "num_steps": int(p.num_steps),
        "guidance_scale": float(p.guidance_scale),
        "posterior_mean": bool(posterior_mean),
        "prefix_drop": int(prompts.prefix_drop),
        "blend_scale": inputs.blend_scale,
    }
    key = f"step1x|{w}x{h}|steps={p.num_steps}|cfg={float(p.guidance_scale)!r}|mean={bool(posterior_mean)}"
    return Prepared(key, w, h, arrays, meta)


def prompt_inputs(row: Prepared) -> PromptInputs:
    """The conditioning inputs of a prepared row (inverse of :func:`prepare_row`'s arrays)."""
    a = row.arrays

    def text(prefix: str) -> TextInput:
        return TextInput(a[f"{prefix}_ids"], a[f"{prefix}_pos"], a[f"{prefix}_mask"])

    blend = text("blend") if "blend_ids" in a else None
    return PromptInputs(a["pixel_values"], a["grid"], text("cond"), text("uncond"), blend, row.meta.get("blend_scale"))
