"""Qwen-Image-Edit's CPU work for one row: sizes, resizes, VLM inputs, token ids, rope positions.

Runs in the job's prepare stage (and in :class:`~.pipeline.QwenImageEditPipeline`), so the GPU
gets ready arrays. Every number follows diffusers' ``QwenImageEditPlusPipeline`` (the pipeline
Qwen's README uses): LANCZOS resizes to ``calculate_dimensions`` sizes, the Qwen2-VL image
processor it gets (torchvision's by default, as on a standard install), the chat template with
``Picture i:`` blocks, the leading system block dropped from the hidden states. No torch import
here (the torchvision image processor imports it when built).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from step1x_batch.models.base import (
    INVALID_INSTRUCTION,
    TOO_MANY_IMAGES,
    UNSUPPORTED_SIZE,
    EditRequest,
    Prepared,
    RowFailure,
)
from step1x_batch.models.qwen_vl.processor import (
    TextInput,
    VisionConfig,
    build_image_processor,
    image_token_count,
    load_tokenizer,
    vision_inputs,
)
from step1x_batch.models.qwen_vl.rope import mrope_positions

from .options import QwenImageEditOptions

SYSTEM_PROMPT = (
    "Describe the key features of the input image (color, shape, size, texture, objects, background), "
    "then explain how the user's text instruction should alter or modify the image. Generate a new image "
    "that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate."
)
PROMPT_PREFIX = f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"
PROMPT_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
IMAGE_PAD = "<|image_pad|>"
# MACRO's per-reference VAE area by reference count (1..10; more: the last value).
MACRO_AREAS = (1048576, 1048576, 589824, 589824, 589824, 262144, 262144, 262144, 262144, 262144)


def image_block(index: int, num_tokens: int) -> str:
    """The user-turn text of image ``index`` (from 1), its pad expanded as the processor does."""
    return f"Picture {index}: <|vision_start|>" + IMAGE_PAD * num_tokens + "<|vision_end|>"


def calculate_dimensions(area: int, ratio: float) -> tuple[int, int]:
    """diffusers' rule: (width, height) of aspect ``ratio`` at about ``area`` pixels, each side
    rounded (half to even) to a multiple of 32."""
    width = math.sqrt(area * ratio)
    height = width / ratio
    return round(width / 32) * 32, round(height / 32) * 32


def reference_areas(mode: str, count: int, fixed: int) -> list[int]:
    """Each reference's VAE area: ``fixed`` for all, or MACRO's area for ``count`` references."""
    if mode == "macro":
        return [MACRO_AREAS[min(count, len(MACRO_AREAS)) - 1]] * count
    return [fixed] * count


def square_crop(image: np.ndarray, side: int) -> np.ndarray:
    """PixelSmile's input rule: scaled (LANCZOS) so the shorter side is ``side``, then the centre
    ``side`` x ``side`` square (left floored to a pixel, top halfway, as its ``resize_with_crop``)."""
    h, w = image.shape[:2]
    scale = max(side / w, side / h)
    nw, nh = int(w * scale), int(h * scale)
    pil = Image.fromarray(image).resize((nw, nh), Image.Resampling.LANCZOS)
    left = max(0, min((nw - side) // 2, nw - side))
    top = max(0.0, min((nh - side) * 0.5, nh - side))
    return np.asarray(pil.crop((int(left), int(top), int(left + side), int(top + side))))


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``image`` at ``size`` (width, height) with PIL's LANCZOS, as diffusers' VaeImageProcessor
    resizes (it resizes even when the size already matches; PIL returns the same pixels then)."""
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS))


class QwenEditPrompts:
    """The CPU half of the text encoder: the processor folder's tokenizer and image processor."""

    def __init__(self, tokenizer, image_processor, vision: VisionConfig, vae_scale_factor: int) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.vision = vision
        self.vae_scale_factor = vae_scale_factor
        self.multiple = vae_scale_factor * 2  # latents are packed in 2x2 patches
        pad = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        if pad != vision.image_token_id:
            raise ValueError(f"the tokenizer's {IMAGE_PAD} id {pad} is not the text encoder's image_token_id "
                             f"{vision.image_token_id}")
        self.prefix_ids = self.encode(PROMPT_PREFIX)
        # diffusers drops a fixed 64 positions, which is this prefix with Qwen's tokenizer.
        self.drop = len(self.prefix_ids)
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        self.control_tokens = sorted(t.content for t in decoder.values() if getattr(t, "special", False))

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, image_processor: str = "torchvision") -> "QwenEditPrompts":
        """A diffusers Qwen-Image-Edit folder: ``processor/`` (tokenizer + image processor config,
        ``preprocessor_config.json`` or transformers 5's ``processor_config.json``; ``tokenizer/``
        if the processor has no tokenizer files), ``text_encoder/config.json``, ``vae/config.json``.
        ``image_processor``: ``"torchvision"`` or ``"pil"`` (the option of that name)."""
        folder = Path(folder)
        processor = folder / "processor"
        has_tokenizer = any((processor / f).is_file() for f in ("tokenizer.json", "vocab.json"))
        tokenizer = load_tokenizer(processor if has_tokenizer else folder / "tokenizer")
        pixels = build_image_processor(processor, backend=image_processor)
        vision = VisionConfig.from_folder(folder / "text_encoder")
        vae = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
        scale = 2 ** len(vae.get("temperal_downsample", [False, True, True]))
        return cls(tokenizer, pixels, vision, scale)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def check_text(self, text: str, what: str) -> None:
        """Refuse text holding Qwen control tokens: the template (and the processor's image-pad
        expansion) would read them as structure."""
        if not isinstance(text, str):
            raise RowFailure(INVALID_INSTRUCTION, f"the {what} is {type(text).__name__}, not text")
        found = [t for t in self.control_tokens if t in text]
        if found:
            raise RowFailure(
                INVALID_INSTRUCTION,
                f"the {what} contains Qwen control token text {', '.join(found)}; remove it",
            )

    def text(self, prompt: str, grids: Sequence[np.ndarray], positions: str) -> TextInput:
        """Ids of the templated prompt (image pads expanded), its mask and rope positions."""
        merge = self.vision.spatial_merge_size
        counts = [image_token_count(g, merge) for g in grids]
        images = "".join(image_block(i + 1, n) for i, n in enumerate(counts))
        ids = np.asarray(self.encode(PROMPT_PREFIX + images + prompt + PROMPT_SUFFIX), dtype=np.int64)
        if list(ids[: self.drop]) != self.prefix_ids:
            raise RowFailure(INVALID_INSTRUCTION, "the prompt does not tokenize with the template's system block "
                             "intact")
        if int((ids == self.vision.image_token_id).sum()) != sum(counts):
            raise RowFailure(INVALID_INSTRUCTION, "the prompt's image tokens do not match its images")
        if positions == "mrope":
            pos = mrope_positions(ids, grids, image_token_id=self.vision.image_token_id, spatial_merge_size=merge)
        else:  # what transformers 5 falls back to without mm_token_type_ids
            pos = np.broadcast_to(np.arange(ids.size, dtype=np.int64), (3, ids.size)).copy()
        return TextInput(ids, pos, np.ones(ids.size, dtype=np.int64))


def _size_failure(where: str, image: np.ndarray, detail: str) -> RowFailure:
    h, w = image.shape[:2]
    return RowFailure(UNSUPPORTED_SIZE, f"{where} ({w}x{h}) {detail}")


def output_size(image: np.ndarray, size_level: int, multiple: int) -> tuple[int, int]:
    """(width, height) of the edit: the last image's aspect at ``size_level**2`` area, floored to
    ``multiple`` (diffusers: ``calculate_dimensions(1024*1024, w/h)``, then ``// 16 * 16``)."""
    h, w = image.shape[:2]
    cw, ch = calculate_dimensions(size_level * size_level, w / h)
    return cw // multiple * multiple, ch // multiple * multiple


# Batch invariant: a row's prompts are padded to its own length rounded up to this, and the batch
# key carries it, so a row's transformer sees the same text shape whatever its companions.
TEXT_BUCKET = 64


def prepare_row(
    prompts: QwenEditPrompts, options: QwenImageEditOptions, request: EditRequest, *, batch_invariant: bool = True
) -> Prepared:
    """One row -> every reference at its VL and VAE sizes, the VL inputs, the instruction's and
    the negative prompt's ids and positions, and a batch key."""
    images = list(request.images)
    if options.square_input:
        images = [square_crop(np.asarray(im), options.square_input) for im in images]
    p = request.params
    n = len(images)
    cfg = _check_request(prompts, options, request, n)
    m = prompts.multiple
    arrays, vae_sizes, vl_sizes, grids = _reference_arrays(prompts, options, images)

    w, h = output_size(images[-1], p.size_level, m)
    if w < m or h < m:
        raise _size_failure(f"image {n} of {n}", images[-1], f"is too thin for size level {p.size_level}: "
                            f"the output would be {w}x{h}; crop it or raise size_level")

    texts = {"cond": prompts.text(request.instruction, grids, options.text_positions)}
    if cfg:
        texts["uncond"] = prompts.text(p.negative_prompt, grids, options.text_positions)
    if p.blend_instruction is not None:
        texts["blend"] = prompts.text(p.blend_instruction, grids, options.text_positions)
    for name, t in texts.items():
        arrays[f"{name}_ids"], arrays[f"{name}_pos"], arrays[f"{name}_mask"] = t.ids, t.positions, t.mask

    meta = {
        "seed": int(request.seed),
        "num_steps": int(p.num_steps),
        "guidance_scale": float(p.guidance_scale),
        "cfg": cfg,
        "cfg_norm_rescale": bool(options.cfg_norm_rescale),
        "num_images": n,
        "drop": prompts.drop,
        "vae_sizes": [list(s) for s in vae_sizes],
        "vl_sizes": [list(s) for s in vl_sizes],
        "text_positions": options.text_positions,
        "blend_scale": float(p.blend_scale) if p.blend_instruction is not None else None,
    }
    refs = ",".join(f"{a}x{b}" for a, b in vae_sizes)
    guidance = f"{float(p.guidance_scale)!r}|norm={bool(options.cfg_norm_rescale)}" if cfg else "off"
    key = f"qwen-image-edit|{w}x{h}|refs={refs}|steps={p.num_steps}|cfg={guidance}"
    if batch_invariant:
        longest = max(t.ids.size for t in texts.values()) - prompts.drop
        meta["text_length"] = -(-longest // TEXT_BUCKET) * TEXT_BUCKET
        key += f"|text={meta['text_length']}"
    return Prepared(key, w, h, arrays, meta)


def _check_request(prompts: QwenEditPrompts, options: QwenImageEditOptions, request: EditRequest, n: int) -> bool:
    """Refuse a row the model cannot take (image count, steps, texts); returns whether it runs CFG."""
    p = request.params
    if n == 0:
        raise RowFailure(UNSUPPORTED_SIZE, "the row has no input image; Qwen-Image-Edit needs at least one")
    if n > options.max_images:
        raise RowFailure(TOO_MANY_IMAGES, f"the row has {n} input images; this model takes at most "
                         f"{options.max_images} (model.options.max_images)")
    if p.num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {p.num_steps}")
    prompts.check_text(request.instruction, "instruction")
    if p.blend_instruction is not None:
        prompts.check_text(p.blend_instruction, "blend instruction")
    cfg = float(p.guidance_scale) > 1.0  # diffusers: true CFG iff true_cfg_scale > 1 and a negative prompt
    if cfg:
        prompts.check_text(p.negative_prompt, "negative prompt")
    return cfg


def _reference_arrays(prompts: QwenEditPrompts, options: QwenImageEditOptions, images: list
                      ) -> tuple[dict[str, np.ndarray], list, list, list]:
    """Every reference at its VL size (the vision encoder's pixels and grid) and its VAE size:
    (arrays, VAE sizes, VL sizes, grids)."""
    n, m = len(images), prompts.multiple
    arrays: dict[str, np.ndarray] = {}
    vae_sizes, vl_sizes, grids = [], [], []
    areas = reference_areas(options.reference_areas, n, options.reference_area)
    for i, (image, area) in enumerate(zip(images, areas)):
        where = f"image {i + 1} of {n}"
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
            raise RowFailure(UNSUPPORTED_SIZE, f"{where} is not an RGB uint8 (H, W, 3) image: "
                             f"{image.dtype} {image.shape}")
        ratio = image.shape[1] / image.shape[0]
        vl = calculate_dimensions(options.vl_area, ratio)
        vw, vh = calculate_dimensions(area, ratio)
        vae = (vw - vw % m, vh - vh % m)  # VaeImageProcessor.preprocess floors to its scale factor
        if 0 in vl or 0 in vae:
            raise _size_failure(where, image, f"is too thin: a side rounds to 0 pixels at "
                                f"{'the VL' if 0 in vl else 'the reference'} area; crop it")
        try:
            pixels, grid = vision_inputs(prompts.image_processor, Image.fromarray(resize(image, vl)))
        except ValueError as e:
            raise _size_failure(where, image, f"cannot go to the vision encoder: {e}") from None
        arrays[f"image{i}_pixels"] = pixels
        arrays[f"image{i}_grid"] = grid
        arrays[f"image{i}_vae"] = resize(image, vae)
        vae_sizes.append(vae)
        vl_sizes.append(vl)
        grids.append(grid)
    return arrays, vae_sizes, vl_sizes, grids


@dataclass
class RowInputs:
    """A prepared row's arrays, by role (inverse of :func:`prepare_row`)."""

    pixels: list[np.ndarray]
    grids: list[np.ndarray]
    vae_images: list[np.ndarray]
    cond: TextInput
    uncond: TextInput | None
    blend: TextInput | None = None  # the blend_instruction, when the row blends
    blend_scale: float | None = None


def row_inputs(row: Prepared) -> RowInputs:
    a = row.arrays
    n = int(row.meta["num_images"])

    def text(name: str) -> TextInput | None:
        if f"{name}_ids" not in a:
            return None
        return TextInput(a[f"{name}_ids"], a[f"{name}_pos"], a[f"{name}_mask"])

    return RowInputs(
        [a[f"image{i}_pixels"] for i in range(n)],
        [a[f"image{i}_grid"] for i in range(n)],
        [a[f"image{i}_vae"] for i in range(n)],
        text("cond"),  # type: ignore[arg-type]
        text("uncond"),
        text("blend"),
        row.meta.get("blend_scale"),
    )
