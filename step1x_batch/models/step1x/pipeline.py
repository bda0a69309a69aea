"""EditPipeline: the official Step1X-Edit release, loaded natively, editing batches of rows.

The reference edits one image per call. Here B rows of one model size run as one forward of 2B
sequences (cond + uncond) per step; rows of different sizes are grouped. Each row's noise comes
from a generator seeded with the row's seed, drawn exactly as the reference draws it, so a row's
pixels do not depend on what it was batched with (beyond floating-point reordering).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from step1x_batch.editor import EditOutput, EditRow
from step1x_batch.sampling import denoise, get_schedule

from .connector import Connector, ConnectorParams
from .dit import DiTParams, Step1XDiT
from .layers import keep_fp8_storage
from .loading import DIT_FILES, QWEN_DIR, VAE_FILE, WeightsError, header_shapes, load_into, read_header
from .vae import AutoEncoder, AutoEncoderParams

if TYPE_CHECKING:
    from .conditioner import QwenConditioner

NON_FINITE_OUTPUT = "non_finite_output"
INVALID_INSTRUCTION = "invalid_instruction"
UNSUPPORTED_SIZE = "unsupported_size"


@dataclass(frozen=True)
class Version:
    """What differs between releases beyond the weights' structure."""

    name: str
    ref_axis0: int  # rope axis-0 id of the reference image's tokens
    cfg_truncation_t: float  # guidance-norm truncation above this t (1.0: never)


VERSIONS = {"v1.0": Version("v1.0", 0, 1.0), "v1.1": Version("v1.1", 1, 0.93)}


@dataclass
class EditResult:
    """One edited row: ``image`` (H, W, 3) uint8 at the input's size, or None with an error."""

    image: np.ndarray | None
    width: int  # model size used
    height: int
    seed: int
    batch_size: int
    timings_ms: dict[str, float] = field(default_factory=dict)
    error_type: str | None = None
    error_message: str | None = None

    def to_pil(self) -> Image.Image:
        if self.image is None:
            raise ValueError(f"no image: {self.error_type}: {self.error_message}")
        return Image.fromarray(self.image)


def model_size(width: int, height: int, size_level: int) -> tuple[int, int]:
    """Keep the aspect ratio at an area of about ``size_level**2``, both sides floored to x16."""
    r = width / height
    if width > height:
        w = math.ceil(math.sqrt(size_level**2 * r))
        h = math.ceil(w / r)
    else:
        h = math.ceil(math.sqrt(size_level**2 / r))
        w = math.ceil(h * r)
    w, h = w // 16 * 16, h // 16 * 16
    if w < 16 or h < 16:
        raise ValueError(
            f"image {width}x{height} is too thin for size level {size_level} (a side would be under 16 "
            "pixels); crop it or raise size_level"
        )
    return w, h


def as_rgb_array(image: np.ndarray | Image.Image) -> np.ndarray:
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 array (H, W, 3), got {image.dtype} {image.shape}")
    return image


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if (image.shape[1], image.shape[0]) == size:
        return image
    return np.asarray(Image.fromarray(image).resize(size, Image.LANCZOS))


def pack(x: Tensor) -> Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, C*4) tokens (2x2 patches)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`pack` for an image of ``height`` x ``width`` pixels."""
    b, _, d = x.shape
    h, w = height // 16, width // 16
    return x.view(b, h, w, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, h * 2, w * 2)


def image_ids(batch: int, height: int, width: int, axis0: int, device: torch.device) -> Tensor:
    """Rope ids (axis0, row, col) for the packed tokens of a ``height`` x ``width`` image."""
    h, w = height // 16, width // 16
    ids = torch.zeros(h, w, 3, device=device)
    ids[..., 0] = axis0
    ids[..., 1] = torch.arange(h, device=device)[:, None]
    ids[..., 2] = torch.arange(w, device=device)[None, :]
    return ids.reshape(1, h * w, 3).expand(batch, -1, -1)


def posterior_seed(seed: int) -> int:
    """A second per-row seed for the VAE posterior sample, independent of the noise seed."""
    digest = hashlib.sha256(f"step1x-batch/vae-posterior/{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def find_dit_file(folder: Path) -> Path:
    known = [folder / name for name in DIT_FILES if (folder / name).is_file()]
    others = sorted(
        p for p in folder.glob("*.safetensors") if p.name != VAE_FILE and p not in known
    )
    candidates = known or others
    if len(candidates) != 1:
        found = ", ".join(p.name for p in candidates) or "none"
        raise WeightsError(
            f"{folder}: expected one DiT safetensors file ({', '.join(DIT_FILES)}), found {found}; "
            "pass dit_file= to choose"
        )
    return candidates[0]


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
                "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use bfloat16, float16 or float32") from None


class EditPipeline:
    def __init__(
        self,
        dit: Step1XDiT,
        connector: Connector,
        vae: AutoEncoder,
        conditioner: "QwenConditioner",
        version: Version,
        device: torch.device,
        dtype: torch.dtype,
        model_id: str,
    ):
        self.dit, self.connector, self.vae, self.conditioner = dit, connector, vae, conditioner
        self.version, self.device, self.dtype, self.model_id = version, device, dtype, model_id

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype = "bfloat16",
        version: str | None = None,
        *,
        dit_file: str | None = None,
        qwen_dir: str | os.PathLike | None = None,
        strict: bool = True,
        compile: bool = False,
        fp8_storage: bool | None = None,
    ) -> "EditPipeline":
        """Load a release folder: the DiT + connector file, ``vae.safetensors`` and the Qwen folder.

        Sizes come from tensor shapes; the version from the keys (``connector.scale_factor``: v1.0)
        unless ``version`` overrides it. ``fp8_storage`` keeps an FP8 file's linear weights in fp8 and
        upcasts them per call (same numbers, half the DiT memory); None: whenever the file is FP8.
        """
        folder = Path(path)
        if not folder.is_dir():
            raise WeightsError(f"{folder}: not a folder; expected a Step1X-Edit release folder")
        device, dtype = torch.device(device), _dtype(dtype)
        dit_path = folder / dit_file if dit_file else find_dit_file(folder)
        header = read_header(dit_path)
        shapes = header_shapes(header)
        detected = "v1.0" if "connector.scale_factor" in shapes else "v1.1"
        if version is not None and version not in VERSIONS:
            raise ValueError(f"unknown version {version!r}; expected one of {sorted(VERSIONS)}")
        spec = VERSIONS[version or detected]
        try:
            dit_params = DiTParams.from_state_dict(shapes)
            connector_params = ConnectorParams.from_state_dict(shapes)
        except KeyError as e:
            raise WeightsError(f"{dit_path}: missing key {e.args[0]!r}; not a Step1X-Edit DiT file") from None
        with torch.device("meta"):
            dit = Step1XDiT(dit_params)
            connector = Connector(connector_params)
        stored_fp8 = {k for k, v in header.items() if v["dtype"] == "F8_E4M3"}
        if stored_fp8 and fp8_storage is not False:
            keep_fp8_storage(dit, stored_fp8, torch.float8_e4m3fn)
        load_into(dit, dit_path, others=("connector.",), device=device, dtype=dtype, strict=strict, header=header)
        load_into(connector, dit_path, prefix="connector.", device=device, dtype=dtype, strict=strict, header=header)

        vae_path = folder / VAE_FILE
        vae_header = read_header(vae_path)
        with torch.device("meta"):
            vae = AutoEncoder(AutoEncoderParams.from_state_dict(header_shapes(vae_header)))
        load_into(vae, vae_path, device=device, dtype=torch.float32, strict=strict, header=vae_header)

        from .conditioner import QwenConditioner  # imports transformers: only when loading a release

        conditioner = QwenConditioner.from_pretrained(qwen_dir or folder / QWEN_DIR, device=device, dtype=dtype)
        for module in (dit, connector, vae):
            module.eval().requires_grad_(False)
        if compile:
            dit = torch.compile(dit)
        fingerprint = hashlib.sha256(repr(sorted((k, v["dtype"], v["shape"]) for k, v in header.items())).encode())
        model_id = f"step1x-edit-{spec.name}/{dit_path.name}@{fingerprint.hexdigest()[:12]}"
        return cls(dit, connector, vae, conditioner, spec, device, dtype, model_id)

    def _autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @torch.inference_mode()
    def edit(
        self,
        images: Sequence[np.ndarray | Image.Image],
        instructions: Sequence[str],
        seeds: Sequence[int] | None = None,
        negative_prompts: Sequence[str] | None = None,
        num_steps: int = 28,
        guidance_scale: float = 6.0,
        size_level: int = 1024,
        *,
        posterior_mean: bool = False,
        max_batch_size: int = 8,
    ) -> list[EditResult]:
        """Edit each image by its instruction; one result per row, in order."""
        arrays = [as_rgb_array(im) for im in images]
        n = len(arrays)
        seeds = list(seeds) if seeds is not None else [0] * n
        negatives = list(negative_prompts) if negative_prompts is not None else [""] * n
        if not (len(instructions) == len(seeds) == len(negatives) == n):
            raise ValueError("images, instructions, seeds and negative_prompts must have the same length")
        results: list[EditResult | None] = [None] * n
        groups: dict[tuple[int, int], list[int]] = {}
        for i, a in enumerate(arrays):
            try:
                size = model_size(a.shape[1], a.shape[0], size_level)
            except ValueError as e:
                results[i] = EditResult(None, 0, 0, seeds[i], 0, {}, UNSUPPORTED_SIZE, str(e))
                continue
            problem = self._text_problem(instructions[i]) or self._text_problem(negatives[i])
            if problem:
                results[i] = EditResult(None, *size, seeds[i], 0, {}, INVALID_INSTRUCTION, problem)
                continue
            groups.setdefault(size, []).append(i)
        for size, rows in groups.items():
            for start in range(0, len(rows), max_batch_size):
                chunk = rows[start : start + max_batch_size]
                out = self._edit_batch(
                    [arrays[i] for i in chunk], [instructions[i] for i in chunk],
                    [negatives[i] for i in chunk], [seeds[i] for i in chunk],
                    size, num_steps, guidance_scale, posterior_mean,
                )
                for i, r in zip(chunk, out):
                    results[i] = r
        return results  # type: ignore[return-value]

    def _text_problem(self, text: str) -> str | None:
        check = getattr(self.conditioner, "check_text", None)
        if check is None:
            return None
        try:
            check(text)
        except ValueError as e:
            return f"the instruction or negative prompt cannot be used: {e}"
        return None

    def _edit_batch(
        self,
        originals: list[np.ndarray],
        instructions: list[str],
        negatives: list[str],
        seeds: list[int],
        size: tuple[int, int],
        num_steps: int,
        guidance_scale: float,
        posterior_mean: bool,
    ) -> list[EditResult]:
        (w, h), b, dev = size, len(originals), self.device
        timings: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal clock
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            now = time.perf_counter()
            timings[name] = (now - clock) * 1e3
            clock = now

        refs = [resize(a, size) for a in originals]
        embeds, mask = self.conditioner.encode(refs + refs, list(instructions) + list(negatives))
        lap("encode_text_ms")

        ref = torch.from_numpy(np.stack(refs)).to(dev).permute(0, 3, 1, 2).float().div(255).mul(2).sub(1)
        with self._autocast():
            mean, logvar = self.vae.encode_moments(ref)
        noise = None
        if not posterior_mean:
            noise = torch.cat([
                torch.randn((1, *mean.shape[1:]), generator=torch.Generator(dev).manual_seed(posterior_seed(s)),
                            device=dev, dtype=torch.float32)
                for s in seeds
            ])
        ref_tokens = pack(self.vae.latent(mean.float(), logvar.float(), noise)).to(self.dtype)
        lap("encode_image_ms")

        x = torch.cat([
            torch.randn((1, 16, h // 8, w // 8), generator=torch.Generator(dev).manual_seed(s), device=dev,
                        dtype=self.dtype)
            for s in seeds
        ])
        x = pack(x)
        n_img = x.shape[1]
        ids = torch.cat(
            (image_ids(2 * b, h, w, 0, dev), image_ids(2 * b, h, w, self.version.ref_axis0, dev)), dim=1
        )
        txt_ids = torch.zeros(2 * b, embeds.shape[1], 3, device=dev)
        ref2 = torch.cat((ref_tokens, ref_tokens))
        llm = embeds.to(self.dtype)

        def velocity(x2: Tensor, t: Tensor) -> Tensor:
            txt, y = self.connector(llm, t, mask)
            pred = self.dit(img=torch.cat((x2, ref2), dim=1), img_ids=ids, txt=txt, txt_ids=txt_ids, timesteps=t, y=y)
            return pred[:, :n_img]

        timesteps = get_schedule(num_steps, n_img, shift=True)
        with self._autocast():
            x = denoise(velocity, x, timesteps, guidance_scale, self.version.cfg_truncation_t)
        lap("denoise_ms")

        finite = torch.isfinite(x.float()).flatten(1).all(dim=1).tolist()
        decoded = self.vae.decode(unpack(x.float(), h, w))
        pixels = decoded.clamp(-1, 1).mul(0.5).add(0.5).mul(255).to(torch.uint8)  # truncation, as to_pil_image
        pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()
        lap("decode_ms")

        results = []
        for i in range(b):
            if not finite[i]:
                results.append(EditResult(
                    None, w, h, seeds[i], b, dict(timings), NON_FINITE_OUTPUT,
                    f"the model produced non-finite latents for seed {seeds[i]} at {w}x{h}; "
                    "try another seed or float32/bfloat16 instead of float16",
                ))
                continue
            oh, ow = originals[i].shape[:2]
            results.append(EditResult(resize(pixels[i], (ow, oh)), w, h, seeds[i], b, dict(timings)))
        return results


class Step1XEditor:
    """The :class:`~step1x_batch.editor.Editor` a Ray actor holds: groups rows by parameters."""

    def __init__(
        self, pipe: EditPipeline, max_batch_size: int = 4, posterior_mean: bool = False, model_id: str | None = None
    ):
        self.pipe = pipe
        self.max_batch_size = max_batch_size
        self.posterior_mean = posterior_mean
        self.model_id = model_id or pipe.model_id

    def edit_rows(self, rows: Sequence[EditRow]) -> list[EditOutput]:
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(rows):
            p = row.params
            groups.setdefault((p.num_steps, p.guidance_scale, p.size_level), []).append(i)
        outputs: list[EditOutput | None] = [None] * len(rows)
        for (steps, guidance, size_level), idx in groups.items():
            start = time.perf_counter()
            results = self.pipe.edit(
                [rows[i].image for i in idx], [rows[i].instruction for i in idx],
                seeds=[rows[i].seed for i in idx], negative_prompts=[rows[i].params.negative_prompt for i in idx],
                num_steps=steps, guidance_scale=guidance, size_level=size_level,
                posterior_mean=self.posterior_mean, max_batch_size=self.max_batch_size,
            )
            per_row_ms = (time.perf_counter() - start) * 1e3 / len(idx)
            for i, r in zip(idx, results):
                outputs[i] = EditOutput(r.image, r.width, r.height, r.seed, per_row_ms, r.error_type, r.error_message)
        return outputs  # type: ignore[return-value]
