"""Step1X-Edit on the GPU: the engine an actor holds, and :class:`Step1XEditPipeline` for in-process use.

The reference edits one image per call. Here B prepared rows of one batch key (model size, steps,
guidance) run as one forward of 2B sequences (cond + uncond) per step. Each row's noise comes from
a generator seeded with the row's seed, drawn exactly as the reference draws it, so a row's pixels
do not depend on what it was batched with (beyond floating-point reordering).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from step1x_batch.models.base import AdapterSpec, EditParams, EditResult, Prepared
from step1x_batch.models.engine import BatchEngine, Laps, Pipeline
from step1x_batch.models.kernels import choose_attention, compile_blocks, using_attention
from step1x_batch.models.loading import (
    WeightsError,
    component_files,
    header_shapes,
    load_files_into,
    load_into,
    read_header,
    torch_dtype,
)
from step1x_batch.models.lora import merge_adapters
from step1x_batch.models.qwen_vl.encoder import QwenVLEncoder

from .conditioner import Step1XPrompts, encode_prompts, load_prompts
from .connector import Connector, ConnectorParams
from .dit import DiTParams, Step1XDiT
from .layers import RMSNorm, keep_fp8_storage
from .prepare import prepare_row, prompt_inputs, resize_back
from .release import (
    BUNDLE_PREFIX,
    BUNDLE_VAE_DIR,
    DIT_FILES,
    IGNORED_BUNDLE_KEYS,
    QWEN_DIR,
    REALRESTORER,
    TEXT_ENCODER_DIR,
    TRANSFORMER_DIR,
    VAE_FILE,
    detect_layout,
)
from .sampling import denoise, get_schedule
from .vae import AutoEncoder, AutoEncoderParams
from .variant import Variant, resolve_variant


@dataclass(frozen=True)
class Version:
    """What differs between releases beyond the weights' structure."""

    name: str
    ref_axis0: int  # rope axis-0 id of the reference image's tokens
    cfg_truncation_t: float  # guidance-norm truncation above this t (1.0: never)


VERSIONS = {"v1.0": Version("v1.0", 0, 1.0), "v1.1": Version("v1.1", 1, 0.93)}


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


def _headers(files: Sequence[Path]) -> dict[str, dict]:
    """The union of the files' headers (every file validated; a duplicated key is left to the loader)."""
    merged: dict[str, dict] = {}
    for p in files:
        for k, v in read_header(p).items():
            merged.setdefault(k, v)
    return merged


def _strip(shapes: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}


def _bundle_view(dit: Step1XDiT, connector: Connector, ignored: dict[str, torch.Size]) -> torch.nn.Module:
    """A module whose state-dict keys are the bundle transformer's: ``inner_model.`` + the DiT's,
    the connector under ``inner_model.connector.``, and the ignored keys present in the file as
    meta placeholders (so they are checked for shape, loaded into this view and dropped with it).

    It shares the DiT's and the connector's submodules: loading it (``assign=True``) loads them.
    """
    if any(True for _ in dit.named_parameters(recurse=False)) or any(True for _ in dit.named_buffers(recurse=False)):
        raise RuntimeError("Step1XDiT holds tensors outside its submodules; the bundle view cannot share them")
    inner = torch.nn.Module()
    for name, child in dit.named_children():
        inner.add_module(name, child)
    inner.add_module("connector", connector)
    for name, shape in ignored.items():
        inner.register_parameter(name, torch.nn.Parameter(torch.empty(shape, device="meta"), requires_grad=False))
    view = torch.nn.Module()
    view.add_module(BUNDLE_PREFIX.rstrip("."), inner)
    return view


def _load_vae(path: Path, device: torch.device, strict: bool, dtype: torch.dtype) -> AutoEncoder:
    """The release's ``vae.safetensors`` (FLUX AE keys), stored fp32, loaded in ``dtype``."""
    header = read_header(path)
    with torch.device("meta"):
        vae = AutoEncoder(AutoEncoderParams.from_state_dict(header_shapes(header)))
    return load_into(vae, path, device=device, dtype=dtype, strict=strict, header=header)


def _load_bundle_vae(folder: Path, device: torch.device, strict: bool, dtype: torch.dtype) -> AutoEncoder:
    """The bundle's ``vae/``: FLUX AE keys under ``inner_model.``, stored fp32, loaded in ``dtype``;
    scale and shift from its ``config.json`` when given (upstream's are FLUX's 0.3611 / 0.1159)."""
    files = component_files(folder, any_safetensors=True)
    shapes = _strip(header_shapes(_headers(files)), BUNDLE_PREFIX)
    try:
        params = AutoEncoderParams.from_state_dict(shapes)
    except (ValueError, KeyError) as e:
        raise WeightsError(f"{folder}: not a FLUX autoencoder under {BUNDLE_PREFIX!r} ({e})") from None
    config = folder / "config.json"
    if config.is_file():
        cfg = json.loads(config.read_text(encoding="utf-8"))
        params = replace(params, **{k: float(cfg[k]) for k in ("scale_factor", "shift_factor") if k in cfg})
    with torch.device("meta"):
        vae = AutoEncoder(params)
    view = torch.nn.Module()
    view.add_module(BUNDLE_PREFIX.rstrip("."), vae)
    load_files_into(view, files, name=folder, device=device, dtype=dtype, strict=strict)
    return vae


@dataclass
class _DiTFiles:
    """Where the DiT (and the connector) of a folder are: its files, their key prefix, its name."""

    files: list[Path]
    prefix: str  # "inner_model." in a bundle, "" in a release file
    name: str  # the model id's name for them: the release file's, or "transformer"
    shown: Path  # the path error messages name


def _dit_files(folder: Path, bundle: bool, dit_file: str | None) -> _DiTFiles:
    if not bundle:
        dit_path = folder / dit_file if dit_file else find_dit_file(folder)
        return _DiTFiles([dit_path], "", dit_path.name, dit_path)
    if dit_file:
        raise ValueError(
            "dit_file= chooses among a release folder's DiT files; a RealRestorer bundle has one transformer/"
        )
    files = component_files(folder / TRANSFORMER_DIR, any_safetensors=True)
    return _DiTFiles(files, BUNDLE_PREFIX, TRANSFORMER_DIR, folder / TRANSFORMER_DIR)


def _load_dit(where: _DiTFiles, header: dict, shapes: dict, bundle: bool, device: torch.device, dtype: torch.dtype,
              strict: bool, fp8_storage: bool | None) -> tuple[Step1XDiT, Connector]:
    """The DiT and the connector built on meta from the tensors' shapes, then loaded (FP8 linears
    kept in fp8 unless ``fp8_storage`` is False)."""
    try:
        dit_params = DiTParams.from_state_dict(shapes)
        connector_params = ConnectorParams.from_state_dict(shapes)
    except KeyError as e:
        missing = where.prefix + e.args[0]
        raise WeightsError(f"{where.shown}: missing key {missing!r}; not a Step1X-Edit DiT file") from None
    with torch.device("meta"):
        dit = Step1XDiT(dit_params)
        connector = Connector(connector_params)
    prefix = where.prefix
    stored_fp8 = {k[len(prefix):] for k, v in header.items() if v["dtype"] == "F8_E4M3" and k.startswith(prefix)}
    if stored_fp8 and fp8_storage is not False:
        keep_fp8_storage(dit, stored_fp8, torch.float8_e4m3fn)
    if bundle:
        ignored = {k: torch.Size((1, 1, dit_params.hidden_size)) for k in IGNORED_BUNDLE_KEYS if k in shapes}
        load_files_into(_bundle_view(dit, connector, ignored), where.files, name=where.shown, device=device,
                        dtype=dtype, strict=strict)
    else:
        (path,) = where.files
        load_into(dit, path, others=("connector.",), device=device, dtype=dtype, strict=strict, header=header)
        load_into(connector, path, prefix="connector.", device=device, dtype=dtype, strict=strict, header=header)
    return dit, connector


def _engine_model_id(version: Version, where: _DiTFiles, header: dict, variant: Variant, guidance: float | None) -> str:
    """The loaded weights' identity: version, DiT file and a hash of its tensors' names, dtypes and
    shapes, plus the variant and guidance value when they are not the plain release's."""
    fingerprint = hashlib.sha256(repr(sorted((k, v["dtype"], v["shape"]) for k, v in header.items())).encode())
    model_id = f"step1x-edit-{version.name}/{where.name}@{fingerprint.hexdigest()[:12]}"
    if variant.name != "step1x":
        model_id += f"+{variant.name}"
    if guidance is not None:
        model_id += f"+guidance={guidance!r}"
    return model_id


class Step1XEngine(BatchEngine):
    """The loaded release (DiT, connector, VAE, Qwen2.5-VL): edits prepared rows of one batch key.

    Batch invariant (the default): the text encoder and the VAE see one row (one prompt) at a
    time, and the DiT always runs ``max_batch_size`` rows (:class:`~step1x_batch.models.engine.BatchEngine`),
    so a row's bytes depend on the row alone. Off: one batch of exactly the rows given.
    """

    non_finite_advice = "try another seed or float32/bfloat16 instead of float16"

    def __init__(
        self,
        dit: Step1XDiT,
        connector: Connector,
        vae: AutoEncoder,
        encoder: QwenVLEncoder,
        version: Version,
        device: torch.device,
        dtype: torch.dtype,
        model_id: str,
        *,
        batch_invariant: bool = True,
        max_batch_size: int = 4,
        attention: str = "auto",
        guidance: float | None = None,
        variant: Variant | None = None,
    ):
        self.dit, self.connector, self.vae, self.encoder = dit, connector, vae, encoder
        self.variant = variant or resolve_variant("step1x")
        self.version, self.device, self.dtype, self.model_id = version, device, dtype, model_id
        self.batch_invariant, self.max_batch_size = batch_invariant, max_batch_size
        if (guidance is None) != (dit.guidance_in is None):
            raise ValueError("guidance= is required exactly when the DiT has a guidance embedder (guidance_in)")
        self.guidance = guidance  # the DiT's guidance_in input (RealRestorer's model_guidance); None: none
        head_dim = dit.params.hidden_size // dit.params.num_heads
        self.attention = choose_attention(attention, device, dtype, head_dim, masked=False)

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
        batch_invariant: bool = True,
        max_batch_size: int = 4,
        attention: str = "auto",
        model_guidance: float = 3.5,
        adapters: Sequence[AdapterSpec] = (),
        variant: str | None = None,
    ) -> "Step1XEngine":
        """Load a release folder or a RealRestorer bundle (:mod:`.release` describes both layouts).

        Release: the DiT + connector file, ``vae.safetensors`` and the Qwen folder. Bundle:
        ``transformer/`` (one file or shards; keys ``inner_model.``-prefixed, the unused
        ``mask_token`` tolerated and dropped), ``vae/`` and ``text_encoder/``. Sizes come from
        tensor shapes; the version from the keys (``connector.scale_factor``: v1.0) unless
        ``version`` overrides it; a ``guidance_in`` embedder from the keys too, then fed
        ``model_guidance`` every step (RealRestorer's default 3.5; unused without one).
        ``fp8_storage`` keeps an FP8 file's linear weights in fp8 and
        upcasts them per call (same numbers, half the DiT memory); None: whenever the file is FP8.
        ``batch_invariant``: a row's pixels do not depend on its batch companions (see :meth:`edit`);
        ``max_batch_size`` rows per forward (the fixed batch shape when batch invariant).
        ``compile``: regional ``torch.compile`` of every DiT block (one graph per block kind; the
        fixed shapes of batch invariance mean no recompiles); ``attention``: the SDPA kernel
        (:mod:`step1x_batch.models.kernels`; ``auto``: the fastest that runs here); ``adapters``:
        LoRA files merged into the DiT (:func:`step1x_batch.models.lora.merge_adapters`);
        ``variant``: whose released pipeline to follow (:mod:`.variant`: ``step1x`` or
        ``realrestorer``); None: RealRestorer's for a bundle, Step1X-Edit's for a release folder.
        """
        folder = Path(path)
        if not folder.is_dir():
            raise WeightsError(
                f"{folder}: not a folder; expected a Step1X-Edit release folder or a RealRestorer bundle"
            )
        device, dtype = torch.device(device), torch_dtype(dtype)
        if version is not None and version not in VERSIONS:
            raise ValueError(f"unknown version {version!r}; expected one of {sorted(VERSIONS)}")
        bundle = detect_layout(folder) == REALRESTORER
        variant_spec = resolve_variant(variant, folder)
        where = _dit_files(folder, bundle, dit_file)
        header = _headers(where.files)
        shapes = _strip(header_shapes(header), where.prefix)
        spec = VERSIONS[version or ("v1.0" if "connector.scale_factor" in shapes else "v1.1")]
        dit, connector = _load_dit(where, header, shapes, bundle, device, dtype, strict, fp8_storage)
        # Step1X-Edit runs its VAE in float32; RealRestorer's bundle loader casts it to the run's dtype.
        vae_dtype = dtype if variant_spec.vae_in_run_dtype else torch.float32
        if bundle:
            vae = _load_bundle_vae(folder / BUNDLE_VAE_DIR, device, strict, vae_dtype)
        else:
            vae = _load_vae(folder / VAE_FILE, device, strict, vae_dtype)
        encoder = QwenVLEncoder.from_pretrained(
            qwen_dir or folder / (TEXT_ENCODER_DIR if bundle else QWEN_DIR), device=device, dtype=dtype,
            zero_masked_queries=variant_spec.zero_masked_queries, batch_invariant=batch_invariant,
        )
        _finish_dit(dit, connector, vae, variant_spec, adapters, compile)
        guidance = None if dit.guidance_in is None else float(model_guidance)
        model_id = _engine_model_id(spec, where, header, variant_spec, guidance)
        return cls(dit, connector, vae, encoder, spec, device, dtype, model_id,
                   batch_invariant=batch_invariant, max_batch_size=max_batch_size, attention=attention,
                   guidance=guidance, variant=variant_spec)

    def _autocast(self):
        """Around the DiT (and Step1X-Edit's VAE encode): Step1X-Edit autocasts to the run's dtype
        unless float32; RealRestorer to bf16 on CUDA whatever the dtype, and never elsewhere."""
        if self.variant.autocast_cuda_only:
            if self.device.type == "cuda":
                return torch.autocast("cuda", dtype=torch.bfloat16)
            return contextlib.nullcontext()
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def encode_text(self, rows: Sequence[Prepared]) -> tuple[Tensor, Tensor]:
        """(embeds (2B, 640, hidden), mask): the B instructions, then the B negative prompts."""
        return encode_prompts(self.encoder, [prompt_inputs(r) for r in rows], int(rows[0].meta["prefix_drop"]))

    def encode_references(self, rows: Sequence[Prepared]) -> Tensor:
        """(B, tokens, C*4): each row's reference image through the VAE encoder, the posterior's
        mean or a sample seeded from the row's seed, packed, in the run's dtype."""
        dev = self.device
        refs = np.stack([r.arrays["ref"] for r in rows])
        # NCHW contiguous, as both releases hand it to the VAE (a channels-last view would pick
        # other conv kernels: other roundings)
        ref01 = torch.from_numpy(refs).to(dev).permute(0, 3, 1, 2).contiguous().float().div(255)
        if self.variant.vae_in_run_dtype:  # in the VAE's dtype, no autocast (RealRestorer)
            mean, logvar = self.each(self.vae.encoder, ref01.to(self.vae_dtype).mul(2).sub(1)).chunk(2, dim=1)
        else:  # float32 weights under autocast, the posterior in float32 (Step1X-Edit)
            with self._autocast():
                mean, logvar = self.each(self.vae.encoder, ref01.mul(2).sub(1)).chunk(2, dim=1)
            mean, logvar = mean.float(), logvar.float()
        noise = None
        if not rows[0].meta["posterior_mean"]:
            generators = [torch.Generator(dev).manual_seed(posterior_seed(int(r.meta["seed"]))) for r in rows]
            noise = torch.cat([
                torch.randn((1, *mean.shape[1:]), generator=g, device=dev, dtype=torch.float32) for g in generators
            ]).to(mean.dtype)
        return pack(self.vae.latent(mean, logvar, noise)).to(self.dtype)

    def noise(self, rows: Sequence[Prepared]) -> Tensor:
        """(B, tokens, 64): each row's initial noise, drawn as the reference draws it for one image."""
        w, h, dev = rows[0].width, rows[0].height, self.device
        return pack(torch.cat([
            torch.randn((1, 16, h // 8, w // 8), generator=torch.Generator(dev).manual_seed(int(r.meta["seed"])),
                        device=dev, dtype=self.dtype)
            for r in rows
        ]))

    def denoise(self, x: Tensor, refs: Tensor, embeds: Tensor, mask: Tensor, first: Prepared) -> Tensor:
        """The sampling loop over the (padded) batch: cond + uncond in one DiT forward per step."""
        w, h, dev = first.width, first.height, self.device
        n_img = x.shape[1]
        x, refs = self.pad(x), self.pad(refs)
        llm, mask = self.pad(embeds.to(self.dtype), halves=2), self.pad(mask, halves=2)
        n = x.shape[0]
        ids = torch.cat((image_ids(2 * n, h, w, 0, dev), image_ids(2 * n, h, w, self.version.ref_axis0, dev)), dim=1)
        txt_ids = torch.zeros(2 * n, llm.shape[1], 3, device=dev)
        ref2 = torch.cat((refs, refs))

        def velocity(x2: Tensor, t: Tensor) -> Tensor:
            txt, y = self.connector(llm, t, mask)
            pred = self.dit(img=torch.cat((x2, ref2), dim=1), img_ids=ids, txt=txt, txt_ids=txt_ids, timesteps=t, y=y,
                            guidance=self.guidance)
            return pred[:, :n_img]

        timesteps = get_schedule(int(first.meta["num_steps"]), n_img, shift=True)
        with self._autocast(), using_attention(self.attention):
            return denoise(velocity, x, timesteps, float(first.meta["guidance_scale"]), self.version.cfg_truncation_t,
                           step_as_released=self.variant.released_step)

    def sample(self, rows: Sequence[Prepared], laps: Laps) -> Tensor:
        embeds, mask = self.encode_text(rows)
        laps("encode_text_ms")
        refs = self.encode_references(rows)
        laps("encode_image_ms")
        x = self.denoise(self.noise(rows), refs, embeds, mask, rows[0])[: len(rows)]
        laps("denoise_ms")
        return x

    def decode(self, latents: Tensor, width: int, height: int) -> Tensor:
        decoded = self.each(self.vae.decode, unpack(latents.float(), height, width).to(self.vae_dtype))
        unit = decoded.clamp(-1, 1).mul(0.5).add(0.5)  # in the VAE's dtype, as both releases
        if self.variant.round_to_uint8:  # RealRestorer's _tensor_to_pil
            pixels = unit.float().clamp(0, 1).mul(255).round().to(torch.uint8)
        else:  # truncation, as to_pil_image
            pixels = unit.float().mul(255).to(torch.uint8)
        return pixels.permute(0, 2, 3, 1)


def _finish_dit(dit: Step1XDiT, connector: Connector, vae: AutoEncoder, variant: Variant,
                adapters: Sequence[AdapterSpec], compile: bool) -> None:
    """After loading: eval mode, the variant's QK-norm arithmetic, the adapters merged, compiled."""
    for module in (dit, connector, vae):
        module.eval().requires_grad_(False)
    for norm in dit.modules():
        if isinstance(norm, RMSNorm):
            norm.weight_in_fp32 = variant.qk_norm_weight_in_fp32
    if adapters:
        merge_adapters(dit, adapters, family="step1x")
    if compile:
        compile_blocks(dit.double_blocks, dit.single_blocks)


def _step1x_finish(image: np.ndarray, input_sizes: Sequence[tuple[int, int]]) -> np.ndarray:
    return resize_back(image, tuple(input_sizes[0]))


class Step1XEditPipeline(Pipeline):
    """In-process Step1X-Edit from Python: prepare, edit in batches, resize back, one call
    (:class:`~step1x_batch.models.engine.Pipeline`)."""

    def __init__(self, engine: Step1XEngine, prompts: Step1XPrompts) -> None:
        super().__init__(engine, partial(prepare_row, prompts), finish=_step1x_finish,
                         defaults=EditParams(28, 6.0, 1024, ""))
        self.prompts = prompts

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, device: str | torch.device = "cpu", dtype: str | torch.dtype = "bfloat16",
        version: str | None = None, **kwargs,
    ) -> "Step1XEditPipeline":
        """Load a release folder or a RealRestorer bundle (see :meth:`Step1XEngine.from_pretrained`)."""
        engine = Step1XEngine.from_pretrained(path, device, dtype, version, **kwargs)
        qwen_dir = kwargs.get("qwen_dir")
        if qwen_dir:
            return cls(engine, Step1XPrompts.from_folder(qwen_dir, variant=engine.variant))
        return cls(engine, load_prompts(path, engine.variant.name))

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
        max_batch_size: int | None = None,
    ) -> list[EditResult]:
        """Edit each image by its instruction; one result per row, in order."""
        prepare = partial(prepare_row, self.prompts, posterior_mean=posterior_mean)
        params = EditParams(num_steps, guidance_scale, size_level, "")
        return self.run(prepare, [[image] for image in images], instructions, seeds, negative_prompts, params,
                        max_batch_size)


EditPipeline = Step1XEditPipeline  # kept for one release: the name from the single-family days
