"""Step1X-Edit (v1.0, v1.1) as a model family of the job: one image per row.

``model.weights`` is the official release folder or a RealRestorer bundle (a Step1X-Edit
fine-tune for image restoration, in diffusers' layout); :mod:`.release` tells them apart. Which
released pipeline a run follows (:mod:`.variant`) comes from ``options.variant``, else the layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict

from step1x_batch.models.base import AdapterSpec, EditParams, Engine, IdParts, ModelFamily, Preparer, option

from .release import PREPARE_FILES
from .variant import REALRESTORER, resolve_variant


class Step1XOptions(BaseModel):
    """``model.options`` for ``family: step1x``."""

    model_config = ConfigDict(extra="forbid")

    version: Literal["v1.0", "v1.1"] | None = option(None, pixels=True)  # None: detected from the weights' keys
    posterior_mean: bool = option(False, pixels=True)  # VAE encode: the posterior mean instead of a seeded sample
    # The value a guidance embedder (``guidance_in``, as RealRestorer may have) is fed every step;
    # used only when the weights have one. 3.5: RealRestorer's ``model_guidance`` default.
    model_guidance: float = option(3.5, pixels=True, allow_inf_nan=False)
    # Whose released pipeline to follow: Step1X-Edit's or RealRestorer's (vision ids, rounding,
    # VAE dtype, Euler step, autocast, small sides, processor limits). None: RealRestorer's for a
    # RealRestorer bundle, Step1X-Edit's for a release folder.
    variant: Literal["step1x", "realrestorer"] | None = option(None, pixels=True)


class Step1XFamily(ModelFamily):
    name = "step1x"
    Options = Step1XOptions
    defaults = EditParams(num_steps=28, guidance_scale=6.0, size_level=1024, negative_prompt="")
    prepare_files = PREPARE_FILES  # the tokenizer / processor / model config of either layout
    supports_adapters = True

    def weights_problem(self, files) -> str | None:
        from .release import layout_problem

        return layout_problem(files)

    def format_model_id(self, pixels: Mapping[str, Any], parts: IdParts) -> str:
        mode = "mean" if pixels["posterior_mean"] else "sample"
        variant = ":batch-variant" if parts.batch_variant else ""
        # A non-default guidance-embedder value changes outputs of weights that have one.
        guidance = "" if pixels["model_guidance"] == 3.5 else f":guidance={pixels['model_guidance']!r}"
        # The variant changes pixels; None is resolved from the layout on the workers ("auto").
        return (f"step1x-edit[{pixels['variant'] or 'auto'}]:{pixels['version'] or 'auto'}:{parts.dtype}:{mode}"
                f"{variant}{guidance}:{parts.weights}{parts.adapters}")

    def weights_license(self) -> str:
        """Step1X-Edit's weights are Apache-2.0; RealRestorer's are for non-commercial academic
        research only, which no Hugging Face identifier names ("other"). With ``variant`` unset the
        layout decides, as on the workers: a local folder is looked at; weights in object storage
        cannot be, so they get "other" (never a licence this process cannot vouch for)."""
        variant = self.options.variant
        if variant is None:
            weights = self.spec.weights
            if "://" in weights:
                return "other"
            variant = resolve_variant(None, weights if Path(weights).is_dir() else None).name
        return "other" if variant == REALRESTORER else "apache-2.0"

    def preparer(self, folder: Path | None) -> Preparer:
        from functools import partial

        from .prepare import prepare_row
        from .conditioner import load_prompts

        if folder is None:
            raise ValueError("the step1x family needs its weights folder (the Qwen tokenizer and processor)")
        # Qwen2.5-VL-7B-Instruct/, or the bundle's processor/ + text_encoder/
        prompts = load_prompts(Path(folder), self.options.variant)
        return partial(prepare_row, prompts, posterior_mean=self.options.posterior_mean)

    def adapter_target(self, engine: Engine) -> Any:
        return engine.dit

    def load(self, folder: Path | None, device: str, adapters: Sequence[AdapterSpec] = ()) -> Engine:
        from .pipeline import Step1XEngine

        if folder is None:
            raise ValueError("the step1x family needs a weights folder")
        return Step1XEngine.from_pretrained(
            folder, device=device, dtype=self.spec.dtype, version=self.options.version,
            batch_invariant=self.spec.batch_invariant, max_batch_size=self.spec.max_batch_size,
            compile=self.spec.compile, attention=self.spec.attention, model_guidance=self.options.model_guidance,
            adapters=adapters, variant=self.options.variant,
        )

    def finish(self, image: np.ndarray, input_sizes: Sequence[tuple[int, int]]) -> np.ndarray:
        """Back to the input's size as both releases return it: Pillow's default filter (bicubic)."""
        from .prepare import resize_back

        return resize_back(image, tuple(input_sizes[0]))
