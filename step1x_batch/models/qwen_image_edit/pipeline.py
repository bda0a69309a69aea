"""Qwen-Image-Edit on the GPU: the engine an actor holds, and :class:`QwenImageEditPipeline`.

diffusers' ``QwenImageEditPlusPipeline`` refuses batches. Here B prepared rows of one batch key
(output size, every reference's VAE size, steps, guidance) run together: the text model reads
the B instructions and B negative prompts in one right-padded batch (each row's images through
the vision tower once, for both prompts), and each step is ONE transformer forward over 2B
sequences, cond then uncond. Each row's noise comes from a generator seeded with the row's seed,
drawn as diffusers draws it for one image, so a row's pixels do not depend on its companions
(beyond floating-point reordering). Numerics (dtypes, rounding order, schedule) follow diffusers.

The transformer, VAE and text encoder are diffusers' and transformers' own classes, built on
meta from each ``config.json`` and loaded strictly from safetensors. Only the transformer's
top-level forward is ours (:func:`velocity`): it takes the per-step constants (rope, the
zero_cond_t modulation index, the projected text) computed once, so nothing in the step loop
copies from the host or waits for the device.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from step1x_batch.models.base import AdapterSpec, EditParams, EditRequest, Prepared
from step1x_batch.models.engine import BatchEngine, Laps, Pipeline, check_one_key
from step1x_batch.models.kernels import choose_attention, compile_blocks, using_attention
from step1x_batch.models.loading import WeightsError, component_files, load_files_into, torch_dtype
from step1x_batch.models.lora import as_spec, merge_adapters
from step1x_batch.models.qwen_vl.encoder import QwenVLEncoder

from .options import QwenImageEditOptions
from .prepare import QwenEditPrompts, RowInputs, prepare_row, row_inputs

COMPONENTS = {
    "transformer": "QwenImageTransformer2DModel",
    "vae": "AutoencoderKLQwenImage",
    "text_encoder": "Qwen2_5_VLForConditionalGeneration",
    "scheduler": "FlowMatchEulerDiscreteScheduler",
}
PIPELINE = "QwenImageEditPlusPipeline"


# --- schedule ------------------------------------------------------------------------------------


def calculate_shift(seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float, max_shift: float) -> float:
    """The dynamic-shift ``mu``: linear in the output's token count."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return seq_len * m + (base_shift - m * base_seq_len)


_UNSUPPORTED_SCHEDULER = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                          "stochastic_sampling")


def check_scheduler_config(config: Mapping[str, Any], where: str = "scheduler_config.json") -> None:
    name = config.get("_class_name", COMPONENTS["scheduler"])
    if name != COMPONENTS["scheduler"]:
        raise WeightsError(f"{where}: scheduler {name!r}; this engine runs {COMPONENTS['scheduler']} only")
    on = [k for k in _UNSUPPORTED_SCHEDULER if config.get(k)]
    if on:
        raise WeightsError(f"{where}: sets {', '.join(on)}, which this engine does not implement")
    if config.get("time_shift_type", "exponential") not in ("exponential", "linear"):
        raise WeightsError(f"{where}: unknown time_shift_type {config['time_shift_type']!r}")


def flow_match_sigmas(config: Mapping[str, Any], num_steps: int, image_seq_len: int) -> np.ndarray:
    """(num_steps + 1,) float32 sigmas ending in 0, exactly as FlowMatchEulerDiscreteScheduler's
    ``set_timesteps(sigmas=linspace(1, 1/N, N), mu=...)`` computes them (same float32 operations
    in the same order); the transformer sees ``sigma * 1000 / 1000``. One exception: with
    ``shift_terminal`` and one step diffusers' stretch is 0/0 (NaN sigmas, a NaN image); here the
    single step stays unstretched, 1 -> 0."""
    get = config.get
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32)
    if get("use_dynamic_shifting", False):
        mu = calculate_shift(image_seq_len, get("base_image_seq_len", 256), get("max_image_seq_len", 4096),
                             get("base_shift", 0.5), get("max_shift", 1.15))
        if get("time_shift_type", "exponential") == "exponential":
            sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
        else:
            sigmas = mu / (mu + (1 / sigmas - 1) ** 1.0)
    else:
        shift = get("shift", 1.0)
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    if get("shift_terminal") and sigmas[-1] != 1:  # one step: diffusers divides 0 by 0 here (NaN)
        one_minus = 1 - sigmas
        scale = one_minus[-1] / (1 - get("shift_terminal"))
        sigmas = 1 - (one_minus / scale)
    return np.concatenate([sigmas.astype(np.float32), np.zeros(1, np.float32)])


# --- packing -------------------------------------------------------------------------------------


def pack(x: Tensor) -> Tensor:
    """(B, C, h, w) latents -> (B, h/2 * w/2, C*4) tokens of 2x2 patches."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(x: Tensor, h: int, w: int) -> Tensor:
    """(B, tokens, C*4) -> (B, C, 1, h, w) latents (``h``, ``w`` in latent pixels)."""
    b, _, d = x.shape
    x = x.view(b, h // 2, w // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, 1, h, w)


# --- the transformer's forward, per-step constants hoisted ----------------------------------------


@dataclass
class Conditioning:
    """What every step of one batch reuses: projected text, reference tokens, rope, mask."""

    text: Tensor  # (n, L, inner) after txt_norm + txt_in
    text_mask: Tensor | None  # (n, L) bool; None: no padding (diffusers passes None then too)
    refs: Tensor  # (n, N_ref, C*4) packed reference latents
    rope: tuple[Tensor, Tensor]
    modulate_index: Tensor | None  # (n, N_out + N_ref) 0 output / 1 reference, for zero_cond_t


def conditioning(model, embeds: Tensor, mask: Tensor | None, refs: Tensor, img_shapes: list) -> Conditioning:
    """Step-independent parts of ``QwenImageTransformer2DModel.forward`` for ``embeds`` (n, L, D)."""
    n, length = embeds.shape[:2]
    text = model.txt_in(model.txt_norm(embeds))
    rope = model.pos_embed([img_shapes], max_txt_seq_len=length, device=embeds.device)
    index = None
    if model.zero_cond_t:
        n_out = math.prod(img_shapes[0])
        index = torch.ones((n, n_out + refs.shape[1]), dtype=torch.int, device=embeds.device)
        index[:, :n_out] = 0
    return Conditioning(text, mask, refs, rope, index)


def velocity(model, x: Tensor, cond: Conditioning, timestep: Tensor) -> Tensor:
    """The transformer's prediction for the output tokens ``x`` (n, N_out, C*4) at ``timestep``
    (n,) = sigma: diffusers' forward with the constants of :func:`conditioning`."""
    hidden = model.img_in(torch.cat([x, cond.refs], dim=1))
    timestep = timestep.to(hidden.dtype)
    if model.zero_cond_t:  # reference tokens are modulated as if clean (t = 0)
        timestep = torch.cat([timestep, timestep * 0], dim=0)
    temb = model.time_text_embed(timestep, hidden)
    text = cond.text
    for block in model.transformer_blocks:
        text, hidden = block(
            hidden_states=hidden,
            encoder_hidden_states=text,
            encoder_hidden_states_mask=cond.text_mask,
            temb=temb,
            image_rotary_emb=cond.rope,
            modulate_index=cond.modulate_index,
        )
    if model.zero_cond_t:
        temb = temb.chunk(2, dim=0)[0]
    out = model.proj_out(model.norm_out(hidden, temb))
    return out[:, : x.shape[1]]


def denoise(
    predict: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    sigmas: Tensor,
    guidance: float | None,
    norm_rescale: bool = True,
) -> Tensor:
    """Euler steps from noise ``x`` (B, N, C) over ``sigmas`` (N+1,) float32 on the device.

    ``guidance``: None runs ``predict`` on the B rows; otherwise on 2B (cond rows, then the same
    latents for uncond) and combines ``neg + s (cond - neg)``, rescaled per token to the cond
    prediction's norm when ``norm_rescale``. Same dtypes as diffusers: latents and predictions in
    the model dtype, the Euler update in float32.
    """
    b = x.shape[0]
    timesteps = sigmas[:-1] * 1000
    dts = sigmas[1:] - sigmas[:-1]
    for i in range(timesteps.shape[0]):
        n = b if guidance is None else 2 * b
        t = timesteps[i].expand(n).to(x.dtype) / 1000
        v = predict(x if guidance is None else torch.cat([x, x]), t)
        if guidance is not None:
            cond, neg = v[:b], v[b:]
            v = neg + guidance * (cond - neg)
            if norm_rescale:
                v = v * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(v, dim=-1, keepdim=True))
        x = (x.to(torch.float32) + dts[i] * v).to(v.dtype)
    return x


# --- loading -------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsError(f"{path}: missing") from None
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None


def load_component(cls, folder: Path, device: torch.device, dtype: torch.dtype, strict: bool = True):
    """A diffusers model built on meta from ``folder/config.json`` and loaded by our loader."""
    config = _read_json(folder / "config.json")
    name = config.get("_class_name", cls.__name__)
    if name != cls.__name__:
        raise WeightsError(f"{folder}/config.json: class {name!r}, expected {cls.__name__}")
    files = component_files(folder)
    with torch.device("meta"):
        model = cls.from_config(config)
    load_files_into(model, files, name=folder, device=device, dtype=dtype, strict=strict)
    return model.eval().requires_grad_(False)


# --- engine --------------------------------------------------------------------------------------


@dataclass
class Generation:
    """One batch's sampling result (what :meth:`QwenImageEditEngine.edit` decodes)."""

    latents: Tensor  # (B, N_out, C*4) final packed latents, model dtype
    noise: Tensor  # (B, N_out, C*4) the initial noise
    timings_ms: dict[str, float] = field(default_factory=dict)


class QwenImageEditEngine(BatchEngine):
    """The loaded folder (transformer, VAE, Qwen2.5-VL): edits prepared rows of one batch key."""

    non_finite_advice = "try another seed, or bfloat16/float32 instead of float16"

    def __init__(self, transformer, vae, encoder: QwenVLEncoder, scheduler_config: Mapping[str, Any],
                 device: torch.device, dtype: torch.dtype, *, batch_invariant: bool = True,
                 max_batch_size: int = 4, attention: str = "auto") -> None:
        self.transformer, self.vae, self.encoder = transformer, vae, encoder
        self.batch_invariant, self.max_batch_size = batch_invariant, max_batch_size
        head_dim = transformer.config.attention_head_dim
        self.attention = choose_attention(attention, device, dtype, head_dim, masked=True)  # text padding
        self.scheduler_config = dict(scheduler_config)
        self.device, self.dtype = device, dtype
        self.vae_scale_factor = 2 ** len(vae.config.temperal_downsample)
        self.latent_channels = transformer.config.in_channels // 4
        z = vae.config.z_dim
        self._latents_mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(device, dtype)
        self._latents_std = torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(device, dtype)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, device: str | torch.device = "cpu", dtype: str | torch.dtype = "bfloat16",
        *, strict: bool = True, batch_invariant: bool = True, max_batch_size: int = 4, compile: bool = False,
        attention: str = "auto", adapters: Sequence[AdapterSpec] = (), scheduler: Mapping[str, Any] | None = None,
    ) -> "QwenImageEditEngine":
        """Load a local diffusers Qwen-Image-Edit(-Plus) folder: safetensors only, no remote code.
        ``batch_invariant``: a row's pixels do not depend on its companions (see :meth:`generate`);
        ``max_batch_size`` rows per forward (the fixed batch shape when batch invariant);
        ``compile``: regional ``torch.compile`` of every transformer block; ``attention``: the SDPA
        kernel (:mod:`step1x_batch.models.kernels`); ``adapters``: LoRA files merged into the
        transformer (:func:`step1x_batch.models.lora.merge_adapters`); ``scheduler``: keys overriding
        the folder's scheduler config (the Lightning LoRA's shift, say)."""
        from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
        from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope

        folder = Path(path)
        if not folder.is_dir():
            raise WeightsError(f"{folder}: not a folder; expected a diffusers Qwen-Image-Edit folder")
        device, dtype = torch.device(device), torch_dtype(dtype)
        index = _read_json(folder / "model_index.json")
        wrong = [f"{k}: {index.get(k, [None, None])[-1]!r} (expected {v})" for k, v in COMPONENTS.items()
                 if (index.get(k) or [None, None])[-1] != v]
        if index.get("_class_name", PIPELINE) != PIPELINE:  # the older Edit pipeline has another template
            wrong.insert(0, f"pipeline {index['_class_name']!r} (expected {PIPELINE})")
        if wrong:
            raise WeightsError(f"{folder}/model_index.json: not a Qwen-Image-Edit-Plus folder; " + "; ".join(wrong))
        config = _read_json(folder / "transformer" / "config.json")
        unsupported = [k for k in ("guidance_embeds", "use_additional_t_cond", "use_layer3d_rope") if config.get(k)]
        if unsupported:
            raise WeightsError(f"{folder}/transformer/config.json: sets {', '.join(unsupported)}; not a "
                               "Qwen-Image-Edit transformer this engine runs")
        overrides = dict(scheduler or {})
        scheduler = {**_read_json(folder / "scheduler" / "scheduler_config.json"), **overrides}
        check_scheduler_config(scheduler, f"{folder}/scheduler/scheduler_config.json"
                               + (" with model.options.scheduler" if overrides else ""))

        transformer = load_component(QwenImageTransformer2DModel, folder / "transformer", device, dtype, strict)
        cfg = transformer.config
        # Its rope tables are plain tensors made in __init__ (not buffers): on meta they are empty.
        transformer.pos_embed = QwenEmbedRope(theta=10000, axes_dim=list(cfg.axes_dims_rope), scale_rope=True)
        if adapters:
            merge_adapters(transformer, adapters, family="qwen-image-edit")
        vae = load_component(AutoencoderKLQwenImage, folder / "vae", device, dtype, strict)
        encoder = QwenVLEncoder.from_pretrained(
            folder / "text_encoder", device=device, dtype=dtype, batch_invariant=batch_invariant
        )
        if compile:
            compile_blocks(transformer.transformer_blocks)
        return cls(transformer, vae, encoder, scheduler, device, dtype, batch_invariant=batch_invariant,
                   max_batch_size=max_batch_size, attention=attention)

    # -- pieces ---------------------------------------------------------------------------------

    def sigmas(self, num_steps: int, width: int, height: int) -> np.ndarray:
        seq_len = (height // self.vae_scale_factor // 2) * (width // self.vae_scale_factor // 2)
        return flow_match_sigmas(self.scheduler_config, num_steps, seq_len)

    def noise(self, rows: Sequence[Prepared]) -> Tensor:
        """(B, N_out, C*4): each row's noise as diffusers draws it for one image with
        ``generator=torch.Generator(device).manual_seed(seed)``."""
        first = rows[0]
        h = 2 * (first.height // (self.vae_scale_factor * 2))
        w = 2 * (first.width // (self.vae_scale_factor * 2))
        shape = (1, 1, self.latent_channels, h, w)
        draws = [
            torch.randn(shape, generator=torch.Generator(self.device).manual_seed(int(r.meta["seed"])),
                        device=self.device, dtype=self.dtype)
            for r in rows
        ]
        return pack(torch.cat(draws).flatten(1, 2))  # (B, 1, C, h, w) -> (B, C, h, w)

    def encode_prompts(self, inputs: Sequence[RowInputs], drop: int, length: int | None = None
                       ) -> tuple[Tensor, Tensor | None]:
        """(embeds (n, L, D), mask (n, L) bool or None): the B instructions, then (with CFG) the
        B negative prompts, their first ``drop`` positions removed, right padded to ``length``
        (the batch key's text length when batch invariant; else the longest, and no mask when
        nothing is padded, as diffusers passes it)."""
        pixels = [p for r in inputs for p in r.pixels]
        grids = [g for r in inputs for g in r.grids]
        flat = self.encoder.image_features(pixels, grids)
        features, start = [], 0
        for r in inputs:
            features.append(flat[start : start + len(r.pixels)])
            start += len(r.pixels)
        prompts = [r.cond for r in inputs]
        if inputs[0].uncond is not None:
            prompts += [r.uncond for r in inputs]
        blends = [i for i, r in enumerate(inputs) if r.blend is not None]
        prompts += [inputs[i].blend for i in blends]
        features = [features[i % len(inputs)] for i in range(len(prompts) - len(blends))] + [features[i] for i in blends]
        hidden = [h[drop:] for h in self.encoder.hidden_states(prompts, features)]
        for j, i in enumerate(blends):  # the blended conditioning replaces the instruction's
            hidden[i] = blend_conditioning(hidden[len(hidden) - len(blends) + j], hidden[i], inputs[i].blend_scale)
        hidden = hidden[: len(hidden) - len(blends)]
        longest = max(h.shape[0] for h in hidden)
        if length is None or length < longest:
            length = longest
        embeds = hidden[0].new_zeros((len(hidden), length, hidden[0].shape[-1]))
        mask = torch.zeros((len(hidden), length), dtype=torch.bool, device=embeds.device)
        for i, h in enumerate(hidden):
            embeds[i, : h.shape[0]] = h
            mask[i, : h.shape[0]] = True
        unpadded = not self.batch_invariant and all(h.shape[0] == length for h in hidden)
        return embeds.to(self.dtype), None if unpadded else mask

    def encode_references(self, inputs: Sequence[RowInputs]) -> Tensor:
        """(B, N_ref, C*4): every reference's VAE latents, normalised and packed, in order."""
        tokens = []
        for j in range(len(inputs[0].vae_images)):
            images = torch.from_numpy(np.stack([r.vae_images[j] for r in inputs])).to(self.device)
            x = images_to_model_input(images).unsqueeze(2).to(self.dtype)
            z = self.each(lambda v: self.vae.encode(v).latent_dist.mode(), x)
            tokens.append(pack(((z - self._latents_mean) / self._latents_std)[:, :, 0]))
        return torch.cat(tokens, dim=1)

    def decode(self, latents: Tensor, width: int, height: int) -> Tensor:
        """(B, H, W, 3) uint8 pixels on the device, converted as diffusers' postprocess does."""
        h, w = 2 * (height // (self.vae_scale_factor * 2)), 2 * (width // (self.vae_scale_factor * 2))
        z = unpack(latents, h, w).to(self.vae.dtype)
        z = z / (1.0 / self._latents_std.to(z.dtype)) + self._latents_mean.to(z.dtype)
        image = self.each(lambda v: self.vae.decode(v, return_dict=False)[0], z)[:, :, 0]
        image = (image * 0.5 + 0.5).clamp(0, 1)
        return (image.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1)

    # -- batch ----------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, rows: Sequence[Prepared]) -> Generation:
        """Sample B rows of one batch key to their final latents, ``max_batch_size`` at a time
        when batch invariant (:class:`~step1x_batch.models.engine.BatchEngine`: the text encoder and
        the VAE see one prompt / row at a time, prompts are padded to the text length the batch
        key names, the transformer always runs ``max_batch_size`` rows), so a row's bytes depend on
        the row alone. Off: one batch of exactly the rows given, text padded to its longest prompt.
        """
        check_one_key(rows)
        parts = [self.generate_batch(batch, Laps(self.device)) for batch in self.chunks(rows)]
        if len(parts) == 1:
            return parts[0]
        return Generation(torch.cat([p.latents for p in parts]), torch.cat([p.noise for p in parts]),
                          parts[0].timings_ms)

    def generate_batch(self, rows: Sequence[Prepared], laps: Laps) -> Generation:
        """One forward batch (at most ``max_batch_size`` rows when batch invariant) to its latents."""
        rows = list(rows)
        first = rows[0]
        meta = first.meta
        inputs = [row_inputs(r) for r in rows]
        embeds, mask = self.encode_prompts(inputs, int(meta["drop"]), meta.get("text_length"))
        laps("encode_text_ms")
        refs = self.encode_references(inputs)
        laps("encode_image_ms")
        noise = self.noise(rows)
        cfg = bool(meta["cfg"])
        halves = 2 if cfg else 1
        embeds, mask, refs, padded = self.pad(embeds, halves), self.pad(mask, halves), self.pad(refs), self.pad(noise)
        ds = self.vae_scale_factor * 2
        img_shapes = [(1, first.height // ds, first.width // ds)]
        img_shapes += [(1, h // ds, w // ds) for w, h in meta["vae_sizes"]]
        cond = conditioning(self.transformer, embeds, mask, torch.cat([refs, refs]) if cfg else refs, img_shapes)
        sigmas = torch.from_numpy(self.sigmas(int(meta["num_steps"]), first.width, first.height)).to(self.device)
        with using_attention(self.attention):
            latents = denoise(
                lambda x, t: velocity(self.transformer, x, cond, t),
                padded,
                sigmas,
                float(meta["guidance_scale"]) if cfg else None,
                bool(meta.get("cfg_norm_rescale", True)),
            )
        laps("denoise_ms")
        return Generation(latents[: len(rows)], noise, laps.timings)

    def sample(self, rows: Sequence[Prepared], laps: Laps) -> Tensor:
        return self.generate_batch(rows, laps).latents


def blend_conditioning(blend: Tensor, instruction: Tensor, scale: float) -> Tensor:
    """``lerp(blend, instruction, scale)`` over the instruction's tokens (the blend's states cut or
    zero-padded to its length): torch's lerp is exact at both ends, so scale 0 is the blend
    instruction's conditioning and 1 the instruction's, bit for bit (when the two tokenize to the
    same length, as PixelSmile's templates do)."""
    n = instruction.shape[0]
    blend = blend[:n] if blend.shape[0] >= n else torch.cat([blend, blend.new_zeros(n - blend.shape[0], blend.shape[1])])
    return torch.lerp(blend, instruction, float(scale))


def images_to_model_input(images: Tensor) -> Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [-1, 1], bit for bit as diffusers'
    VaeImageProcessor.preprocess (``x / 255`` then ``2x - 1`` in float32)."""
    x = images.permute(0, 3, 1, 2).to(torch.float32) / 255.0
    return 2.0 * x - 1.0


# --- in-process pipeline -------------------------------------------------------------------------


class QwenImageEditPipeline(Pipeline):
    """In-process editing from Python: the job's prepare + engine, one call, batched by key
    (:class:`~step1x_batch.models.engine.Pipeline`)."""

    def __init__(self, engine: QwenImageEditEngine, preparer: Callable[[EditRequest], Prepared]) -> None:
        super().__init__(engine, preparer, defaults=EditParams(40, 4.0, 1024, " "))

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, device: str | torch.device = "cpu", dtype: str | torch.dtype = "bfloat16",
        *, batch_invariant: bool = True, max_batch_size: int = 4, compile: bool = False, attention: str = "auto",
        adapters: Sequence[AdapterSpec | Mapping[str, Any]] = (), **options: Any,
    ) -> "QwenImageEditPipeline":
        """Load a folder, as the job's family does. ``options`` are the family's
        (``reference_areas="macro"``, ``image_processor="pil"``, ``scheduler={...}``, ...);
        ``adapters``: LoRA files merged into the transformer, each an :class:`AdapterSpec` or a
        mapping ``{"path": ..., "scale": 1.0, "format": "auto"}`` (the job's ``model.adapters``
        with a local path for ``uri``)."""
        opts = QwenImageEditOptions(**options)
        preparer = partial(prepare_row, QwenEditPrompts.from_folder(path, opts.image_processor), opts,
                           batch_invariant=batch_invariant)
        engine = QwenImageEditEngine.from_pretrained(
            path, device=device, dtype=dtype, batch_invariant=batch_invariant, max_batch_size=max_batch_size,
            compile=compile, attention=attention, adapters=[as_spec(a) for a in adapters], scheduler=opts.scheduler,
        )
        return cls(engine, preparer)
