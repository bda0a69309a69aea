"""Qwen2.5-VL conditioner: the (embeddings, mask) Step1X-Edit's connector reads, quirks included.

The released weights were trained on the reference's exact inputs, so this module reproduces them
rather than "fixing" them (see the shared reference sheet, "Qwen2.5-VL conditioning"):

- text: the chat-template rendering with the default system line, the Step1X PREFIX, one image and the
  instruction, *without* ``Picture 1: `` (the reference's transformers dropped ``add_vision_id``);
- quotes: ``'`` and curly double quotes become ``"``; past character 155 each ``"`` toggles a quoted
  state in which every character is tokenized alone (wrapped in curly quotes, wrapper ids stripped);
  the ids after ``<|vision_end|>`` come from that re-tokenization;
- ``attention_mask = input_ids > 0`` (id 0 is ``!``: masked);
- image: uint8 -> float [0, 1] -> ``mul(255).byte()`` (truncation), qwen_vl_utils resize, then the
  Qwen2-VL image processor with min/max pixels 256*28*28 / 324*28*28;
- output: last hidden layer, first ``prefix_drop`` (217) positions dropped, 640 kept, zero padded,
  mask 1 on every kept position (``!`` included).

Two things transformers 5 does differently from the reference's pinned 4.5x, handled here:

- mrope positions are only computed when ``mm_token_type_ids`` reaches the model, and masked
  positions get 0 instead of 1: the prepare stage computes them for the final (re-tokenized) ids
  (:mod:`step1x_batch.models.qwen_vl.rope`), masked positions 1, and they are passed explicitly.
- the reference ran the text model with ``attn_implementation="flash_attention_2"``: with a 2-D mask
  containing zeros, flash-attention unpads the sequence, so a masked (id 0) token's attention output
  is exactly zero (and no token attends to it). Its hidden state still reaches the DiT. With SDPA or
  eager that token would instead attend to the tokens before it. By default we zero the attention
  output at masked query positions (a forward hook on each text attention module; ``o_proj`` has no
  bias, so this equals flash-attention's zeros); ``zero_masked_queries=False`` gives the SDPA/eager
  behaviour of 4.5x instead (masked queries attend, with rope position 1).

RealRestorer's released pipeline (the ``realrestorer`` variant, :mod:`.variant`) differs in three
of these: its template carries ``Picture 1: `` (its transformers honours ``add_vision_id``), its
image goes back to PIL by rounding (so the uint8 image unchanged), and its processor is the
torchvision one (its transformers 4.57 loads that when torchvision is installed, as its requirements
do) with the pixel limits of the weights' processor folder; its text model runs with SDPA
(``zero_masked_queries=False``).

Split by where it runs: :class:`Step1XPrompts` is the CPU half (prepare stage: tokenizer, image
processor, rope positions), :func:`encode_prompts` the GPU half (the Qwen forward). Never imports
torchvision (its wheel would replace the CPU torch).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from step1x_batch.models.qwen_vl.processor import (
    TextInput,
    VisionConfig,
    build_image_processor,
    image_token_count,
    load_tokenizer,
    vision_inputs,
)
from step1x_batch.models.qwen_vl.rope import mrope_positions

from .release import prompt_folders
from .variant import STEP1X, VARIANTS, Variant, resolve_variant

if TYPE_CHECKING:
    import torch

    from step1x_batch.models.qwen_vl.encoder import QwenVLEncoder

MAX_LENGTH = 640
# Qwen2-VL image processor bounds the reference builds its processor with.
MIN_PIXELS = 256 * 28 * 28
MAX_PIXELS = 324 * 28 * 28
# qwen_vl_utils.fetch_image defaults (the reference's message carries no min/max pixels of its own).
QWEN_VL_UTILS_FACTOR = 28
QWEN_VL_UTILS_MIN_PIXELS = 4 * 28 * 28
QWEN_VL_UTILS_MAX_PIXELS = 16384 * 28 * 28
# A `"` at a character index above this toggles the quoted state (keeps the PREFIX's own quotes inert).
QUOTE_INDEX_THRESHOLD = 155

SYSTEM_BLOCK = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
USER_HEADER = "<|im_start|>user\n"
VISION_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"
TURN_END = "<|im_end|>\n"
ASSISTANT_HEADER = "<|im_start|>assistant\n"
IMAGE_PAD = "<|image_pad|>"
VISION_ID = "Picture 1: "  # the chat template's add_vision_id text for the first (only) image


@cache
def load_prefix() -> str:
    """The Step1X "Enhanced prompt" PREFIX, shipped byte for byte as package data."""
    return files("step1x_batch.models.step1x").joinpath("prefix.txt").read_bytes().decode("utf-8")


def render_prompt(instruction: str, prefix: str | None = None, vision_id: bool = False) -> str:
    """The templated text the reference tokenizes (one ``<|image_pad|>``, before expansion);
    ``vision_id``: the chat template's ``add_vision_id`` text before the image (RealRestorer)."""
    prefix = load_prefix() if prefix is None else prefix
    vision = (VISION_ID if vision_id else "") + VISION_BLOCK
    return SYSTEM_BLOCK + USER_HEADER + prefix + vision + instruction + TURN_END + ASSISTANT_HEADER


def split_quoted(text: str) -> list[str]:
    """Split the templated text into tokenization pieces the way the reference does.

    Outside quotes, text accumulates into one piece; an opening ``"`` ends that piece (the quote is
    its last character); inside quotes each character becomes its own piece wrapped in curly quotes;
    a closing ``"`` starts the next unquoted piece.
    """
    text = text.replace("“", '"').replace("”", '"').replace("'", '"')
    pieces: list[str] = []
    quoted = False
    current = ""
    for index, char in enumerate(text):
        if char == '"' and index > QUOTE_INDEX_THRESHOLD:
            current += char
            if not quoted:
                pieces.append(current)
                current = ""
            quoted = not quoted
            continue
        if quoted:
            pieces.append("“" + char + "”")
        else:
            current += char
    if current:
        pieces.append(current)
    return pieces


def _single_id(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"tokenizer must encode {text!r} as one token, got {ids}")
    return ids[0]


class PromptTokenizer:
    """The token-level half of the conditioner; needs only a tokenizer (testable without a model)."""

    def __init__(self, tokenizer, prefix: str | None = None, vision_id: bool = False) -> None:
        self.tokenizer = tokenizer
        self.prefix = load_prefix() if prefix is None else prefix
        self.vision_id = vision_id
        self.vision_start_id = _single_id(tokenizer, "<|vision_start|>")
        self.vision_end_id = _single_id(tokenizer, "<|vision_end|>")
        self.image_pad_id = _single_id(tokenizer, IMAGE_PAD)
        self.video_pad_id = _single_id(tokenizer, "<|video_pad|>")
        # The wrapper tokens the reference strips (hard-coded 2073 / 854 for Qwen's vocabulary).
        self.quote_open_id = _single_id(tokenizer, "“")
        self.quote_close_id = _single_id(tokenizer, "”")
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else _single_id(tokenizer, "<|endoftext|>")
        # System block + "user\n" + PREFIX, minus its last token (":" stays, followed by vision_start;
        # with the vision id the pre-tokenizer joins ":" to "Picture", so the drop is the same: both
        # releases hard-code 217 for Qwen's tokenizer).
        self.prefix_drop = len(self.encode(SYSTEM_BLOCK + USER_HEADER + self.prefix)) - 1

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def retokenize(self, text: str) -> list[int]:
        """Ids of the quote-split text: one tokenizer call per piece, wrapper ids stripped where the
        piece's ids start with the opening and end with the closing curly-quote id."""
        pieces = split_quoted(text)
        encoded = self.tokenizer(pieces, add_special_tokens=False)["input_ids"]
        out: list[int] = []
        for ids in encoded:
            if ids and ids[0] == self.quote_open_id and ids[-1] == self.quote_close_id:
                ids = ids[1:-1]
            out.extend(ids)
        return out

    def input_ids(self, instruction: str, num_image_tokens: int) -> list[int]:
        """Final ids: processor ids (image pad expanded) up to ``<|vision_end|>``, re-tokenized ids
        from ``<|vision_end|>`` on."""
        text = render_prompt(instruction, self.prefix, self.vision_id)
        expanded = text.replace(IMAGE_PAD, IMAGE_PAD * num_image_tokens, 1)
        old = self.encode(expanded)
        new = self.retokenize(text)
        ids = old[: old.index(self.vision_end_id)] + new[new.index(self.vision_end_id):]
        if ids.count(self.image_pad_id) != num_image_tokens or self.video_pad_id in ids:
            raise ValueError("instruction contains Qwen image/video placeholder text")
        return ids


def float_roundtrip_uint8(image: np.ndarray) -> np.ndarray:
    """``to_tensor`` (x / 255 in float32) then ``ToPILImage`` (``mul(255).byte()``: truncation)."""
    x = image.astype(np.float32) / np.float32(255.0)
    return (x * np.float32(255.0)).astype(np.uint8)


def qwen_vl_utils_size(height: int, width: int) -> tuple[int, int]:
    """The size qwen_vl_utils resizes to with its own defaults (factor 28, 4..16384 patches)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    return smart_resize(height, width, QWEN_VL_UTILS_FACTOR, QWEN_VL_UTILS_MIN_PIXELS, QWEN_VL_UTILS_MAX_PIXELS)


def reference_pil_image(image: np.ndarray, round_to_uint8: bool = False) -> Image.Image:
    """The PIL image the reference hands to the Qwen processor, from the RGB uint8 DiT-size image.

    Both releases turn the VAE's float copy back into PIL: Step1X-Edit truncates (which can lose a
    level), RealRestorer rounds (``round_to_uint8``), which gives the uint8 image back exactly.
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    pil = Image.fromarray(image if round_to_uint8 else float_roundtrip_uint8(image), mode="RGB")
    height, width = qwen_vl_utils_size(pil.height, pil.width)
    # qwen_vl_utils calls image.resize((w, h)) with Pillow's default filter: bicubic for RGB.
    return pil.resize((width, height), resample=Image.Resampling.BICUBIC)


@dataclass
class PromptInputs:
    """One row's conditioning inputs, ready for the GPU: vision inputs of the reference image
    and the instruction and negative prompts that both read it."""

    pixel_values: np.ndarray  # (patches, C*T*P*P) float32
    grid: np.ndarray  # (3,) int64
    cond: TextInput
    uncond: TextInput
    blend: TextInput | None = None  # the blend_instruction, when the row blends two conditionings
    blend_scale: float | None = None


class Step1XPrompts:
    """The CPU half of the conditioner: tokenizer and image processor of the Qwen folder."""

    def __init__(self, tokenizer, image_processor, vision: VisionConfig, variant: Variant = VARIANTS[STEP1X]) -> None:
        self.variant = variant
        self.prompts = PromptTokenizer(tokenizer, vision_id=variant.vision_id)
        self.image_processor = image_processor
        self.vision = vision
        if (image_processor.patch_size, image_processor.merge_size, image_processor.temporal_patch_size) != (
            vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
        ):
            raise ValueError("preprocessor_config.json disagrees with the model's vision_config")
        if vision.image_token_id != self.prompts.image_pad_id:
            raise ValueError("config.json image_token_id disagrees with the tokenizer")
        self.prefix_drop: int = self.prompts.prefix_drop

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, config_folder: str | os.PathLike | None = None,
                    variant: Variant = VARIANTS[STEP1X]) -> "Step1XPrompts":
        """The tokenizer and image-processor config of ``folder`` and the ``config.json`` of
        ``config_folder`` (the same Qwen2.5-VL folder in the release; a RealRestorer bundle keeps
        them in ``processor/`` and ``text_encoder/``). Pixel limits: Step1X-Edit's fixed ones, or
        the folder's own for a variant that reads them (RealRestorer)."""
        limits = {} if variant.processor_limits_from_folder else {"min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS}
        processor = build_image_processor(folder, backend=variant.image_processor, **limits)
        return cls(load_tokenizer(folder), processor, VisionConfig.from_folder(config_folder or folder), variant)

    def check_text(self, text: str) -> None:
        """Raise ValueError for an instruction the template cannot carry (Qwen placeholder text)."""
        self.prompts.input_ids(text, 1)

    def text(self, instruction: str, grid: np.ndarray, max_length: int = MAX_LENGTH) -> TextInput:
        """Final ids, the reference's mask (``ids > 0``) and mrope positions of one prompt.

        Cut after ``prefix_drop + max_length`` tokens (never inside the image block): later tokens
        cannot change earlier hidden states in a causal model and are dropped anyway.
        """
        ids = self.prompts.input_ids(instruction, image_token_count(grid, self.vision.spatial_merge_size))
        ids = ids[: max(self.prefix_drop + max_length, ids.index(self.prompts.vision_end_id) + 1)]
        ids_np = np.asarray(ids, dtype=np.int64)
        mask = (ids_np > 0).astype(np.int64)
        # transformers 4.5x numbered kept tokens as if masked ones were absent and gave those 1.
        positions = mrope_positions(
            ids_np, [grid], image_token_id=self.vision.image_token_id,
            spatial_merge_size=self.vision.spatial_merge_size, keep=mask.astype(bool), fill=1,
        )
        return TextInput(ids_np, positions, mask)

    def prepare(self, image: np.ndarray, instruction: str, negative: str, blend: str | None = None,
                blend_scale: float | None = None) -> PromptInputs:
        """``image`` is the RGB uint8 reference exactly as the VAE sees it (the DiT size)."""
        pil = reference_pil_image(np.asarray(image), self.variant.round_to_uint8)
        pixel_values, grid = vision_inputs(self.image_processor, pil)
        return PromptInputs(pixel_values, grid, self.text(instruction, grid), self.text(negative, grid),
                            self.text(blend, grid) if blend is not None else None,
                            blend_scale if blend is not None else None)


def load_prompts(folder: str | os.PathLike, variant: str | None = None) -> Step1XPrompts:
    """The CPU prepare's :class:`Step1XPrompts` from a weights folder of either layout (the whole
    folder, or only its ``PREPARE_FILES``); ``variant`` (:mod:`.variant`) None: the one the layout
    implies."""
    tokenizer, config = prompt_folders(folder)
    return Step1XPrompts.from_folder(tokenizer, config, resolve_variant(variant, folder))


def encode_prompts(
    encoder: QwenVLEncoder, rows: Sequence[PromptInputs], prefix_drop: int, max_length: int = MAX_LENGTH
) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeds (2B, max_length, hidden), mask (2B, max_length)): the B instructions, then the B
    negative prompts, as the connector reads them. Each reference image goes through the vision
    tower once for all of its prompts. A row with a ``blend`` prompt gets the conditioning
    ``lerp(e(blend), e(instruction), blend_scale)`` in place of its instruction's (the mask stays
    the instruction's).

    The mask is 1 on every kept position (masked ``!`` tokens included, as in the reference), 0 on
    padding; embeds are zero on padding.
    """
    import torch

    features = encoder.image_features([r.pixel_values for r in rows], [r.grid for r in rows])
    blends = [i for i, r in enumerate(rows) if r.blend is not None]
    prompts = [r.cond for r in rows] + [r.uncond for r in rows] + [rows[i].blend for i in blends]
    hidden = encoder.hidden_states(prompts, [[f] for f in features] * 2 + [[features[i]] for i in blends])
    n = len(prompts)
    embeds = torch.zeros(n, max_length, encoder.hidden_size, dtype=hidden[0].dtype, device=hidden[0].device)
    mask = torch.zeros(n, max_length, dtype=torch.long, device=hidden[0].device)
    for i, h in enumerate(hidden):
        kept = min(max_length, h.shape[0] - prefix_drop)
        embeds[i, :kept] = h[prefix_drop : prefix_drop + kept]
        mask[i, :kept] = 1
    b = len(rows)
    for j, i in enumerate(blends):  # lerp is exact at both ends: 0 is the blend's, 1 the instruction's
        embeds[i] = torch.lerp(embeds[2 * b + j], embeds[i], float(rows[i].blend_scale))
    return embeds[: 2 * b], mask[: 2 * b]
