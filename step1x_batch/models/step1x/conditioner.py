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
  positions get 0 instead of 1: we rebuild the token types for the final (re-tokenized) ids, call
  ``get_rope_index`` ourselves, set masked positions to 1 and pass ``position_ids`` explicitly.
- the reference ran the text model with ``attn_implementation="flash_attention_2"``: with a 2-D mask
  containing zeros, flash-attention unpads the sequence, so a masked (id 0) token's attention output
  is exactly zero (and no token attends to it). Its hidden state still reaches the DiT. With SDPA or
  eager that token would instead attend to the tokens before it. By default we zero the attention
  output at masked query positions (a forward hook on each text attention module; ``o_proj`` has no
  bias, so this equals flash-attention's zeros); ``zero_masked_queries=False`` gives the SDPA/eager
  behaviour of 4.5x instead (masked queries attend, with rope position 1).

Never imports torchvision (its wheel would replace the CPU torch): the processor is built from the
tokenizer and transformers' PIL-backend Qwen2-VL image processor.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from pathlib import Path

import numpy as np
import torch
from PIL import Image

MAX_LENGTH = 640
# Qwen2-VL image processor bounds the reference builds its processor with.
MIN_PIXELS = 256 * 28 * 28
MAX_PIXELS = 324 * 28 * 28
# qwen_vl_utils.fetch_image defaults (the reference's message carries no min/max pixels of its own).
QWEN_VL_UTILS_FACTOR = 28
QWEN_VL_UTILS_MIN_PIXELS = 4 * 28 * 28
QWEN_VL_UTILS_MAX_PIXELS = 16384 * 28 * 28
QWEN_VL_UTILS_MAX_RATIO = 200
# A `"` at a character index above this toggles the quoted state (keeps the PREFIX's own quotes inert).
QUOTE_INDEX_THRESHOLD = 155

SYSTEM_BLOCK = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
USER_HEADER = "<|im_start|>user\n"
VISION_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"
TURN_END = "<|im_end|>\n"
ASSISTANT_HEADER = "<|im_start|>assistant\n"
IMAGE_PAD = "<|image_pad|>"


@cache
def load_prefix() -> str:
    """The Step1X "Enhanced prompt" PREFIX, shipped byte for byte as package data."""
    return files("step1x_batch.models.step1x").joinpath("prefix.txt").read_bytes().decode("utf-8")


def render_prompt(instruction: str, prefix: str | None = None) -> str:
    """The templated text the reference tokenizes (one ``<|image_pad|>``, before expansion)."""
    prefix = load_prefix() if prefix is None else prefix
    return SYSTEM_BLOCK + USER_HEADER + prefix + VISION_BLOCK + instruction + TURN_END + ASSISTANT_HEADER


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

    def __init__(self, tokenizer, prefix: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.prefix = load_prefix() if prefix is None else prefix
        self.vision_start_id = _single_id(tokenizer, "<|vision_start|>")
        self.vision_end_id = _single_id(tokenizer, "<|vision_end|>")
        self.image_pad_id = _single_id(tokenizer, IMAGE_PAD)
        self.video_pad_id = _single_id(tokenizer, "<|video_pad|>")
        # The wrapper tokens the reference strips (hard-coded 2073 / 854 for Qwen's vocabulary).
        self.quote_open_id = _single_id(tokenizer, "“")
        self.quote_close_id = _single_id(tokenizer, "”")
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else _single_id(tokenizer, "<|endoftext|>")
        # System block + "user\n" + PREFIX, minus its last token (":" stays, followed by vision_start).
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
        text = render_prompt(instruction, self.prefix)
        expanded = text.replace(IMAGE_PAD, IMAGE_PAD * num_image_tokens, 1)
        old = self.encode(expanded)
        new = self.retokenize(text)
        ids = old[: old.index(self.vision_end_id)] + new[new.index(self.vision_end_id):]
        if ids.count(self.image_pad_id) != num_image_tokens or self.video_pad_id in ids:
            raise ValueError("instruction contains Qwen image/video placeholder text")
        return ids


def build_input_ids(tokenizer, instruction: str, num_image_tokens: int) -> tuple[list[int], list[int]]:
    """(input ids, attention mask) of one row; the mask is the reference's ``input_ids > 0``."""
    ids = PromptTokenizer(tokenizer).input_ids(instruction, num_image_tokens)
    return ids, [int(i > 0) for i in ids]


def mm_token_type_ids(input_ids: torch.Tensor, image_token_id: int, video_token_id: int) -> torch.Tensor:
    """transformers 5's per-token modality (0 text, 1 image, 2 video), rebuilt for the final ids."""
    types = torch.zeros_like(input_ids, dtype=torch.int32)
    types[input_ids == image_token_id] = 1
    types[input_ids == video_token_id] = 2
    return types


def reference_position_ids(
    qwen_model, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_grid_thw: torch.Tensor
) -> torch.Tensor:
    """3-D mrope positions (3, B, L) as transformers 4.5x computed them: kept tokens numbered as if
    masked ones were absent, masked positions set to 1 (5.x's get_rope_index leaves 0 there).

    ``qwen_model`` is the inner ``Qwen2_5_VLModel`` (``ForConditionalGeneration.model``).
    """
    config = qwen_model.config
    types = mm_token_type_ids(input_ids, config.image_token_id, config.video_token_id)
    positions, _ = qwen_model.get_rope_index(
        input_ids, types, image_grid_thw=image_grid_thw, attention_mask=attention_mask
    )
    return positions.masked_fill(attention_mask[None].to(positions.device) == 0, 1)


def float_roundtrip_uint8(image: np.ndarray) -> np.ndarray:
    """``to_tensor`` (x / 255 in float32) then ``ToPILImage`` (``mul(255).byte()``: truncation)."""
    x = image.astype(np.float32) / np.float32(255.0)
    return (x * np.float32(255.0)).astype(np.uint8)


def qwen_vl_utils_size(height: int, width: int) -> tuple[int, int]:
    """qwen_vl_utils ``smart_resize`` with its own defaults (factor 28, 4..16384 patches of 28^2)."""
    factor = QWEN_VL_UTILS_FACTOR
    if max(height, width) / min(height, width) > QWEN_VL_UTILS_MAX_RATIO:
        raise ValueError(f"aspect ratio above {QWEN_VL_UTILS_MAX_RATIO}: {height}x{width}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > QWEN_VL_UTILS_MAX_PIXELS:
        beta = math.sqrt((height * width) / QWEN_VL_UTILS_MAX_PIXELS)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < QWEN_VL_UTILS_MIN_PIXELS:
        beta = math.sqrt(QWEN_VL_UTILS_MIN_PIXELS / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def reference_pil_image(image: np.ndarray) -> Image.Image:
    """The PIL image the reference hands to the Qwen processor, from the RGB uint8 DiT-size image."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    pil = Image.fromarray(float_roundtrip_uint8(image), mode="RGB")
    height, width = qwen_vl_utils_size(pil.height, pil.width)
    # qwen_vl_utils calls image.resize((w, h)) with Pillow's default filter: bicubic for RGB.
    return pil.resize((width, height), resample=Image.Resampling.BICUBIC)


def build_image_processor(folder: str | os.PathLike):
    """transformers' PIL-backend Qwen2-VL image processor with the reference's pixel bounds."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = Path(folder) / "preprocessor_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    kwargs = {k: cfg[k] for k in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")
              if k in cfg}
    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}, resample=Image.Resampling.BICUBIC, **kwargs
    )


@dataclass
class QwenBatch:
    """Model inputs for B rows, right padded (the text model is causal: real tokens are unaffected)."""

    input_ids: torch.Tensor  # (B, L) long
    attention_mask: torch.Tensor  # (B, L) long; 0 at id 0 and at padding
    mm_token_type_ids: torch.Tensor  # (B, L) int
    position_ids: torch.Tensor  # (3, B, L) long
    pixel_values: torch.Tensor  # (sum patches, C*T*P*P) float32
    image_grid_thw: torch.Tensor  # (B, 3) long
    lengths: list[int]  # real tokens per row


class QwenConditioner:
    """Encodes (reference image, instruction) rows into Step1X-Edit's conditioning embeddings."""

    def __init__(self, model, tokenizer, image_processor, *, zero_masked_queries: bool = True) -> None:
        self.model = model
        self.prompts = PromptTokenizer(tokenizer)
        self.image_processor = image_processor
        self.zero_masked_queries = zero_masked_queries
        self.hidden_size: int = model.config.text_config.hidden_size
        self.prefix_drop: int = self.prompts.prefix_drop
        vision = model.config.vision_config
        self.merge_size: int = vision.spatial_merge_size
        if (image_processor.patch_size, image_processor.merge_size, image_processor.temporal_patch_size) != (
            vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
        ):
            raise ValueError("preprocessor_config.json disagrees with the model's vision_config")
        if model.config.image_token_id != self.prompts.image_pad_id:
            raise ValueError("config.json image_token_id disagrees with the tokenizer")
        self._query_keep: torch.Tensor | None = None
        for layer in model.model.language_model.layers:
            layer.self_attn.register_forward_hook(self._mask_attention_output)

    @classmethod
    def from_pretrained(
        cls,
        folder: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.bfloat16,
        *,
        attn_implementation: str = "sdpa",
        zero_masked_queries: bool = True,
    ) -> "QwenConditioner":
        """Load a local Qwen2.5-VL folder: safetensors only, no remote code, no network."""
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        from .loading import WeightsError, read_header

        folder = Path(folder)
        if not folder.is_dir():
            raise WeightsError(f"{folder}: no Qwen2.5-VL folder here (expected config.json, tokenizer, safetensors)")
        for shard in sorted(folder.glob("*.safetensors")):
            read_header(shard)  # a truncated or corrupt shard is named here, not deep in transformers
        device = torch.device(device)
        extra = {}
        if device.type != "cpu" and importlib.util.find_spec("accelerate") is not None:
            extra["device_map"] = {"": device}  # straight to the device, no full host copy
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            str(folder),
            dtype=dtype,
            local_files_only=True,
            use_safetensors=True,
            attn_implementation=attn_implementation,
            **extra,
        ).to(device)
        model.lm_head = torch.nn.Identity()  # never used: hidden states only (saves ~1 GB for 7B)
        model.eval().requires_grad_(False)
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        return cls(model, tokenizer, build_image_processor(folder), zero_masked_queries=zero_masked_queries)

    @property
    def device(self) -> torch.device:
        return self.model.model.language_model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.model.language_model.embed_tokens.weight.dtype

    def check_text(self, text: str) -> None:
        """Raise ValueError for an instruction the template cannot carry (Qwen placeholder text)."""
        self.prompts.input_ids(text, 1)

    def _mask_attention_output(self, module, args, output):
        keep = self._query_keep
        if keep is None:
            return output
        attn_output, *rest = output
        return (attn_output * keep.to(attn_output.dtype), *rest)

    @contextmanager
    def _zeroing(self, attention_mask: torch.Tensor):
        self._query_keep = attention_mask[..., None] if self.zero_masked_queries else None
        try:
            yield
        finally:
            self._query_keep = None

    def prepare(
        self, images: Sequence[np.ndarray], instructions: Sequence[str], max_length: int = MAX_LENGTH
    ) -> QwenBatch:
        """Processor work for B rows (CPU): pixels, final ids, masks, token types, mrope positions.

        Rows are cut after ``prefix_drop + max_length`` tokens (never inside the image block): later
        tokens cannot change earlier hidden states in a causal model and are dropped anyway.
        """
        if len(images) != len(instructions) or not images:
            raise ValueError(f"need as many images as instructions (>0), got {len(images)} and {len(instructions)}")
        pils = [reference_pil_image(np.asarray(im)) for im in images]
        pixels = self.image_processor(images=pils, return_tensors="pt")
        grid = pixels["image_grid_thw"].long()
        limit = self.prefix_drop + max_length
        rows = []
        for instruction, thw in zip(instructions, grid.tolist()):
            n_image = thw[0] * thw[1] * thw[2] // self.merge_size**2
            ids = self.prompts.input_ids(instruction, n_image)
            # Never cut into the image block: its features must all find their placeholders.
            rows.append(ids[: max(limit, ids.index(self.prompts.vision_end_id) + 1)])
        lengths = [len(r) for r in rows]
        width = max(lengths)
        input_ids = torch.full((len(rows), width), self.prompts.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, ids in enumerate(rows):
            row = torch.tensor(ids, dtype=torch.long)
            input_ids[i, : len(ids)] = row
            attention_mask[i, : len(ids)] = (row > 0).long()
        config = self.model.config
        return QwenBatch(
            input_ids=input_ids,
            attention_mask=attention_mask,
            mm_token_type_ids=mm_token_type_ids(input_ids, config.image_token_id, config.video_token_id),
            position_ids=reference_position_ids(self.model.model, input_ids, attention_mask, grid),
            pixel_values=pixels["pixel_values"],
            image_grid_thw=grid,
            lengths=lengths,
        )

    @torch.inference_mode()
    def hidden_states(self, batch: QwenBatch) -> torch.Tensor:
        """Last hidden layer (after the final norm) for the whole padded batch: (B, L, hidden)."""
        device = self.device
        attention_mask = batch.attention_mask.to(device)
        with self._zeroing(attention_mask):
            out = self.model.model(
                input_ids=batch.input_ids.to(device),
                attention_mask=attention_mask,
                position_ids=batch.position_ids.to(device),
                pixel_values=batch.pixel_values.to(device),
                image_grid_thw=batch.image_grid_thw.to(device),
                mm_token_type_ids=batch.mm_token_type_ids.to(device),
                use_cache=False,
            )
        return out.last_hidden_state

    def encode(
        self, images: Sequence[np.ndarray], instructions: Sequence[str], max_length: int = MAX_LENGTH
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeds (B, max_length, hidden) in the model dtype, mask (B, max_length) long 0/1).

        ``images`` are RGB uint8 (H, W, 3): the reference image exactly as the VAE sees it. The mask
        is 1 on every kept position (masked ``!`` tokens included, as in the reference), 0 on padding.
        """
        batch = self.prepare(images, instructions, max_length)
        hidden = self.hidden_states(batch)
        embeds = torch.zeros(len(batch.lengths), max_length, self.hidden_size, dtype=hidden.dtype, device=hidden.device)
        mask = torch.zeros(len(batch.lengths), max_length, dtype=torch.long, device=hidden.device)
        for i, length in enumerate(batch.lengths):
            kept = min(max_length, length - self.prefix_drop)
            embeds[i, :kept] = hidden[i, self.prefix_drop : self.prefix_drop + kept]
            mask[i, :kept] = 1
        return embeds, mask
