"""The layouts ``model.weights`` may point at for the step1x family.

``release``: the official Step1X-Edit release folder: one DiT + connector safetensors file,
``vae.safetensors`` and ``Qwen2.5-VL-7B-Instruct/`` (a full transformers folder: config,
tokenizer, preprocessor config, weights).

``realrestorer``: a diffusers bundle as the RealRestorer pipeline saves it (HF
``RealRestorer/RealRestorer``; ``RealRestorerPipeline.save_pretrained``)::

    model_index.json
    scheduler/scheduler_config.json
    transformer/config.json
    transformer/diffusion_pytorch_model-0000K-of-0000N.safetensors   (+ .safetensors.index.json;
                                        or one diffusion_pytorch_model.safetensors when small)
    vae/config.json, vae/diffusion_pytorch_model.safetensors          (fp32)
    text_encoder/config.json, model-0000K-of-0000N.safetensors, model.safetensors.index.json
    processor/  tokenizer.json, tokenizer_config.json, vocab.json, merges.txt,
                preprocessor_config.json (the tokenizer and the image processor; a folder saved
                by transformers 5 has processor_config.json instead: both are read)

Every transformer and VAE key is prefixed ``inner_model.`` (the diffusers wrappers hold the
original module as ``self.inner_model``); under it the DiT and the connector (``connector.``) are
one state dict with the release's key names, plus an optional ``guidance_in`` embedder and an
optional ``mask_token`` the model never uses. The text encoder folder has no tokenizer: that is
in ``processor/``; the vision token ids come from ``text_encoder/config.json``.

Nothing here imports torch (nor another module of the family): the CPU prepare uses
:func:`prompt_folders` (through :func:`.conditioner.load_prompts`) and :data:`PREPARE_FILES`.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Mapping

DIT_FILES = (
    "step1x-edit-v1p1-official.safetensors",
    "step1x-edit-i1258.safetensors",
    "step1x-edit-i1258-FP8.safetensors",
)
VAE_FILE = "vae.safetensors"
QWEN_DIR = "Qwen2.5-VL-7B-Instruct"

RELEASE = "release"
REALRESTORER = "realrestorer"
LAYOUTS = (RELEASE, REALRESTORER)

# The RealRestorer (diffusers) bundle.
TRANSFORMER_DIR = "transformer"
BUNDLE_VAE_DIR = "vae"
TEXT_ENCODER_DIR = "text_encoder"
PROCESSOR_DIR = "processor"
MODEL_INDEX = "model_index.json"
BUNDLE_WEIGHTS = "diffusion_pytorch_model.safetensors"  # diffusers' name; sharded: -0000K-of-0000N
BUNDLE_INDEX = "diffusion_pytorch_model.safetensors.index.json"
BUNDLE_PREFIX = "inner_model."
# Keys of the bundle's transformer that the model never reads (upstream registers ``mask_token``
# when the checkpoint has one and never uses it in forward): tolerated, checked for shape, dropped.
IGNORED_BUNDLE_KEYS = ("mask_token",)

# The Qwen image processor's settings: flat as released, or nested under "image_processor" in the
# processor_config.json transformers 5's save_pretrained writes (both read by qwen_vl.processor).
IMAGE_PROCESSOR_CONFIGS = ("preprocessor_config.json", "processor_config.json")

_RELEASE_MARKERS = (*DIT_FILES, VAE_FILE, QWEN_DIR)
_BUNDLE_MARKERS = (TRANSFORMER_DIR, TEXT_ENCODER_DIR, PROCESSOR_DIR, MODEL_INDEX)

# What the CPU prepare needs from either layout (globs relative to the weights folder): the
# tokenizer, the image processor's config and the model config with the vision token ids.
PREPARE_FILES = (
    f"{QWEN_DIR}/*.json", f"{QWEN_DIR}/*.txt", f"{QWEN_DIR}/*.jinja",
    f"{PROCESSOR_DIR}/*.json", f"{PROCESSOR_DIR}/*.txt", f"{PROCESSOR_DIR}/*.jinja",
    f"{TEXT_ENCODER_DIR}/*.json", f"{TEXT_ENCODER_DIR}/*.txt", f"{TEXT_ENCODER_DIR}/*.jinja",
)


def detect_layout(folder: str | os.PathLike) -> str:
    """``release`` or ``realrestorer``, from which files the folder holds (a folder staged with
    only :data:`PREPARE_FILES` is recognised too). Neither: ``release`` (whose loader then names
    what is missing). Both: refused."""
    from step1x_batch.models.loading import WeightsError

    folder = Path(folder)
    release = [n for n in _RELEASE_MARKERS if (folder / n).exists()]
    bundle = [n for n in _BUNDLE_MARKERS if (folder / n).exists()]
    if release and bundle:
        raise WeightsError(
            f"{folder}: holds both a Step1X-Edit release ({', '.join(release)}) and a RealRestorer "
            f"bundle ({', '.join(bundle)}); point model.weights at a folder with one of them"
        )
    return REALRESTORER if bundle else RELEASE


def layout_problem(files: Mapping[str, int]) -> str | None:
    """What a listing of a weights folder (``{relative path: size}``) lacks for either layout, as
    the end of a sentence; None when a release or a bundle is complete enough to load."""
    def has(pattern: str) -> bool:
        return any(fnmatch.fnmatchcase(f, pattern) for f in files)

    release = [n for n in _RELEASE_MARKERS if n in files or has(f"{n}/*")]
    bundle = [n for n in _BUNDLE_MARKERS if n in files or has(f"{n}/*")]
    if release and bundle:
        return (f"holds both a Step1X-Edit release ({', '.join(release)}) and a RealRestorer bundle "
                f"({', '.join(bundle)})")
    if bundle:
        need = [f"{TRANSFORMER_DIR}/*.safetensors", f"{BUNDLE_VAE_DIR}/*.safetensors",
                f"{TEXT_ENCODER_DIR}/config.json", f"{TEXT_ENCODER_DIR}/*.safetensors"]
    else:
        if not any(n in files for n in DIT_FILES):
            return f"has no Step1X-Edit DiT file ({' or '.join(DIT_FILES)})"
        need = [VAE_FILE, f"{QWEN_DIR}/config.json", f"{QWEN_DIR}/*.safetensors"]
    missing = [p for p in need if not has(p)]
    if missing:
        return f"has no file matching {', '.join(missing)}"
    if bundle:  # the image processor's config, as released or as transformers 5 saves it
        folder = PROCESSOR_DIR if has(f"{PROCESSOR_DIR}/*") else TEXT_ENCODER_DIR
        configs = [f"{folder}/{name}" for name in IMAGE_PROCESSOR_CONFIGS]
        if not any(c in files for c in configs):
            return f"has no image processor config ({' or '.join(configs)})"
    return None


def text_encoder_folder(folder: str | os.PathLike) -> Path:
    """The Qwen2.5-VL transformers folder (config.json + safetensors) of either layout."""
    folder = Path(folder)
    return folder / (TEXT_ENCODER_DIR if detect_layout(folder) == REALRESTORER else QWEN_DIR)


def prompt_folders(folder: str | os.PathLike) -> tuple[Path, Path]:
    """(tokenizer + ``preprocessor_config.json`` folder, ``config.json`` folder) of either layout.

    Release: both ``Qwen2.5-VL-7B-Instruct/``. Bundle: ``processor/`` (``text_encoder/`` when a
    bundle has no processor folder, as upstream falls back) and ``text_encoder/``.
    """
    folder = Path(folder)
    if detect_layout(folder) == RELEASE:
        return folder / QWEN_DIR, folder / QWEN_DIR
    tokenizer = folder / PROCESSOR_DIR
    if not tokenizer.is_dir():
        tokenizer = folder / TEXT_ENCODER_DIR
    config = folder / TEXT_ENCODER_DIR
    if not (config / "config.json").is_file():
        config = tokenizer
    return tokenizer, config
