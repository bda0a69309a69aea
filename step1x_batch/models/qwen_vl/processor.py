"""The CPU half of Qwen2.5-VL conditioning: tokenizer, image processor, vision inputs.

Runs in the job's prepare stage, so the GPU actor receives token ids and pixel values, never
images to resize or text to tokenize. Never imports torchvision (its wheel would replace a CPU
torch): images go through transformers' PIL-backend Qwen2-VL image processor, which is the
successor of the processor the released weights were trained with.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image


@dataclass
class TextInput:
    """One prompt as the CPU stage prepares it for the text model."""

    ids: np.ndarray  # (L,) int64, image pads expanded
    positions: np.ndarray  # (3, L) int64 mrope positions
    mask: np.ndarray  # (L,) 0/1 attention mask (0: not attended)


@dataclass(frozen=True)
class VisionConfig:
    """The token ids and patch geometry prepare needs from a Qwen2.5-VL ``config.json``."""

    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "VisionConfig":
        cfg = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
        vision = cfg.get("vision_config", {})
        text = cfg.get("text_config", {})  # transformers 5 nests some ids under text_config

        def pick(name: str) -> Any:
            value = cfg.get(name, text.get(name))
            if value is None:
                raise ValueError(f"{folder}/config.json has no {name}")
            return value

        return cls(
            image_token_id=int(pick("image_token_id")),
            video_token_id=int(pick("video_token_id")),
            vision_start_token_id=int(pick("vision_start_token_id")),
            vision_end_token_id=int(pick("vision_end_token_id")),
            patch_size=int(vision.get("patch_size", 14)),
            temporal_patch_size=int(vision.get("temporal_patch_size", 2)),
            spatial_merge_size=int(vision.get("spatial_merge_size", 2)),
        )


def load_tokenizer(folder: str | os.PathLike):
    """A local tokenizer folder: no network, no remote code."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)


def build_image_processor(
    config_folder: str | os.PathLike,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    resample: int = Image.Resampling.BICUBIC,
):
    """transformers' PIL-backend Qwen2-VL image processor from ``preprocessor_config.json``
    (patch geometry, mean/std, pixel bounds); ``min_pixels`` / ``max_pixels`` override the bounds."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = Path(config_folder) / "preprocessor_config.json"
    cfg = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    kwargs = {k: cfg[k] for k in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")
              if k in cfg}
    size = dict(cfg.get("size") or {})
    lo = min_pixels if min_pixels is not None else cfg.get("min_pixels", size.get("shortest_edge"))
    hi = max_pixels if max_pixels is not None else cfg.get("max_pixels", size.get("longest_edge"))
    if lo is not None and hi is not None:
        kwargs["size"] = {"shortest_edge": int(lo), "longest_edge": int(hi)}
    return Qwen2VLImageProcessorPil(resample=resample, **kwargs)


def vision_inputs(processor, image: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """(pixel_values float32 (patches, C*T*P*P), grid_thw int64 (3,)) of one image."""
    out = processor(images=[image], return_tensors="np")
    grid = np.asarray(out["image_grid_thw"], dtype=np.int64).reshape(-1, 3)
    if grid.shape[0] != 1:
        raise ValueError(f"expected one image grid, got {grid.shape[0]}")
    return np.ascontiguousarray(out["pixel_values"], dtype=np.float32), grid[0]


def image_token_count(grid: np.ndarray, spatial_merge_size: int) -> int:
    """How many ``<|image_pad|>`` tokens one image with patch grid ``grid`` (t, h, w) takes."""
    t, h, w = (int(v) for v in grid)
    return t * h * w // spatial_merge_size**2
