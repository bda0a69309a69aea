"""The CPU half of Qwen2.5-VL conditioning: tokenizer, image processor, vision inputs.

Runs in the job's prepare stage, so the GPU actor receives token ids and pixel values, never
images to resize or text to tokenize. Two image processors, both transformers' Qwen2-VL one:

- ``torchvision``: its torchvision backend (``Qwen2VLImageProcessor``), which transformers and
  diffusers use whenever torchvision is installed, i.e. on a standard GPU install. Reproduced
  here in plain torch (:class:`TorchImageProcessor`), so no torchvision is needed (its wheel
  would replace a CPU torch).
- ``pil``: its PIL backend (``Qwen2VLImageProcessorPil``), which they use without torchvision.

The two differ by 1-2 levels on a fraction of a percent of the resized pixels (the uint8
bicubic kernels of PIL and torch round differently).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch


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


IMAGE_PROCESSORS = ("torchvision", "pil")
# transformers' Qwen2-VL defaults, for keys a folder leaves out.
DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS = 56 * 56, 28 * 28 * 1280
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def image_processor_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The image processor's saved settings in a processor folder, from either layout: the
    ``image_processor`` entry of ``processor_config.json`` (transformers 5's ``save_pretrained``)
    or ``preprocessor_config.json`` (the released weights); transformers reads them in that order.
    ``{}`` when the folder has neither (transformers' defaults then apply)."""
    folder = Path(folder)
    nested = folder / "processor_config.json"
    if nested.is_file():
        cfg = json.loads(nested.read_text(encoding="utf-8"))
        if isinstance(cfg.get("image_processor"), dict):
            return dict(cfg["image_processor"])
    flat = folder / "preprocessor_config.json"
    return json.loads(flat.read_text(encoding="utf-8")) if flat.is_file() else {}


@dataclass(frozen=True)
class ImageProcessorSettings:
    """What the Qwen2-VL image processor does to an image, as a folder's config sets it."""

    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    image_std: tuple[float, ...] = OPENAI_CLIP_STD
    rescale_factor: float = 1 / 255
    do_rescale: bool = True
    do_normalize: bool = True

    @classmethod
    def from_config(cls, cfg: dict[str, Any], *, min_pixels: int | None = None,
                    max_pixels: int | None = None) -> "ImageProcessorSettings":
        """As transformers' ``__init__`` reads it: ``min_pixels`` / ``max_pixels`` keys over
        ``size``'s ``shortest_edge`` / ``longest_edge``; the arguments over both."""
        size = dict(cfg.get("size") or {})
        lo = min_pixels if min_pixels is not None else cfg.get("min_pixels", size.get("shortest_edge"))
        hi = max_pixels if max_pixels is not None else cfg.get("max_pixels", size.get("longest_edge"))
        if cfg.get("do_resize") is False:
            raise ValueError("the image processor config sets do_resize false; Qwen2-VL needs its resize")
        d = cls()
        return cls(
            min_pixels=int(lo if lo is not None else d.min_pixels),
            max_pixels=int(hi if hi is not None else d.max_pixels),
            patch_size=int(cfg.get("patch_size", d.patch_size)),
            temporal_patch_size=int(cfg.get("temporal_patch_size", d.temporal_patch_size)),
            merge_size=int(cfg.get("merge_size", d.merge_size)),
            image_mean=tuple(float(v) for v in cfg.get("image_mean", d.image_mean)),
            image_std=tuple(float(v) for v in cfg.get("image_std", d.image_std)),
            rescale_factor=float(cfg.get("rescale_factor", d.rescale_factor)),
            do_rescale=bool(cfg.get("do_rescale", True)),
            do_normalize=bool(cfg.get("do_normalize", True)),
        )


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """transformers' Qwen2-VL target size: sides multiples of ``factor``, area within
    [``min_pixels``, ``max_pixels``], aspect kept as nearly as that allows."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


class TorchImageProcessor:
    """transformers' torchvision-backend Qwen2-VL image processor in plain torch, on the CPU
    (where diffusers runs it: the processor's tensors go to the GPU afterwards).

    Per image, as ``Qwen2VLImageProcessor`` with torchvision 0.2x: RGB uint8 (1, 3, H, W) ->
    ``smart_resize`` size -> torch's antialiased bicubic on the uint8 tensor itself (torchvision
    keeps uint8 for CPU bicubic; skipped when the size is unchanged) -> float32, minus
    ``mean / rescale_factor``, divided by ``std / rescale_factor`` (rescale fused into the
    normalisation) -> the same patch layout.
    """

    def __init__(self, settings: ImageProcessorSettings) -> None:
        import torch

        self.settings = settings
        s = settings
        self.patch_size, self.temporal_patch_size, self.merge_size = s.patch_size, s.temporal_patch_size, s.merge_size
        self.min_pixels, self.max_pixels = s.min_pixels, s.max_pixels
        mean = torch.tensor(s.image_mean, dtype=torch.float32)
        std = torch.tensor(s.image_std, dtype=torch.float32)
        if s.do_rescale and s.do_normalize:
            mean, std = mean * (1.0 / s.rescale_factor), std * (1.0 / s.rescale_factor)
        self._mean, self._std = mean.view(-1, 1, 1), std.view(-1, 1, 1)

    def resize(self, image: "torch.Tensor") -> "torch.Tensor":
        """(1, 3, H, W) uint8 -> (1, 3, h, w) uint8 at the :func:`smart_resize` size."""
        import torch.nn.functional as F

        s = self.settings
        height, width = image.shape[-2:]
        h, w = smart_resize(height, width, factor=s.patch_size * s.merge_size, min_pixels=s.min_pixels,
                            max_pixels=s.max_pixels)
        if (h, w) == (height, width):
            return image
        return F.interpolate(image, size=[h, w], mode="bicubic", align_corners=False, antialias=True)

    def normalize(self, image: "torch.Tensor") -> "torch.Tensor":
        """uint8 -> float32 (x - mean) / std, in torchvision's order of operations."""
        import torch

        s = self.settings
        x = image.to(torch.float32)
        if s.do_normalize:
            return x.sub_(self._mean).div_(self._std)
        return x * s.rescale_factor if s.do_rescale else x

    def patchify(self, x: "torch.Tensor") -> tuple["torch.Tensor", int, int]:
        """(1, C, h, w) -> (grid_h * grid_w, C * T * P * P), the frame repeated T times."""
        s = self.settings
        b, c, h, w = x.shape
        p, m, t = s.patch_size, s.merge_size, s.temporal_patch_size
        gh, gw = h // p, w // p
        x = x.reshape(b, c, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
        x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, t, -1, -1)
        return x.reshape(b * gh * gw, c * t * p * p), gh, gw

    def __call__(self, images, return_tensors: str = "np") -> dict[str, np.ndarray]:
        """The processor's call for a list of RGB images: ``pixel_values`` (all patches, float32)
        and ``image_grid_thw`` (one (1, gh, gw) row per image), always numpy (``return_tensors``
        is taken for transformers' call signature)."""
        import torch

        pixels, grids = [], []
        for image in images:
            array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
            if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
                raise ValueError(f"expected an RGB uint8 (H, W, 3) image, got {array.dtype} {array.shape}")
            x = torch.from_numpy(np.array(array.transpose(2, 0, 1), order="C")).unsqueeze(0)  # a copy
            patches, gh, gw = self.patchify(self.normalize(self.resize(x)))
            pixels.append(patches)
            grids.append((1, gh, gw))
        return {"pixel_values": torch.cat(pixels).numpy(), "image_grid_thw": np.asarray(grids, dtype=np.int64)}


def build_image_processor(
    config_folder: str | os.PathLike,
    *,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    resample: int = Image.Resampling.BICUBIC,
    backend: str = "pil",
):
    """The Qwen2-VL image processor of a processor folder (either layout, see
    :func:`image_processor_config`): patch geometry, mean/std and pixel bounds from the folder,
    ``min_pixels`` / ``max_pixels`` overriding the bounds. ``backend``: ``"pil"`` (transformers'
    PIL backend, ``resample`` its filter; the default, which the step1x family uses) or
    ``"torchvision"`` (:class:`TorchImageProcessor`, bicubic only; the qwen-image-edit default)."""
    settings = ImageProcessorSettings.from_config(image_processor_config(config_folder), min_pixels=min_pixels,
                                                  max_pixels=max_pixels)
    if backend == "torchvision":
        if resample != Image.Resampling.BICUBIC:
            raise ValueError("the torchvision image processor here resizes with bicubic only")
        return TorchImageProcessor(settings)
    if backend != "pil":
        raise ValueError(f"unknown image processor {backend!r}; one of {', '.join(IMAGE_PROCESSORS)}")
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    s = settings
    return Qwen2VLImageProcessorPil(
        resample=resample, size={"shortest_edge": s.min_pixels, "longest_edge": s.max_pixels},
        patch_size=s.patch_size, temporal_patch_size=s.temporal_patch_size, merge_size=s.merge_size,
        image_mean=list(s.image_mean), image_std=list(s.image_std), rescale_factor=s.rescale_factor,
        do_rescale=s.do_rescale, do_normalize=s.do_normalize,
    )


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
