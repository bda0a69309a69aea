"""Step1X-Edit (v1.0, v1.1) as a model family of the job: one image per row."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict

from step1x_batch.models.base import EditParams, Engine, ModelFamily, Preparer

from .release import QWEN_DIR


class Step1XOptions(BaseModel):
    """``model.options`` for ``family: step1x``."""

    model_config = ConfigDict(extra="forbid")

    version: Literal["v1.0", "v1.1"] | None = None  # None: detected from the weights' keys
    posterior_mean: bool = False  # VAE encode: the posterior mean instead of a seeded sample


class Step1XFamily(ModelFamily):
    name = "step1x"
    Options = Step1XOptions
    defaults = EditParams(num_steps=28, guidance_scale=6.0, size_level=1024, negative_prompt="")
    prepare_files = (f"{QWEN_DIR}/*.json", f"{QWEN_DIR}/*.txt", f"{QWEN_DIR}/*.jinja")

    def model_id(self) -> str:
        if self.spec.model_id:
            return self.spec.model_id
        o = self.options
        mode = "mean" if o.posterior_mean else "sample"
        variant = "" if self.spec.batch_invariant else ":batch-variant"
        return f"step1x-edit:{o.version or 'auto'}:{self.spec.dtype}:{mode}{variant}:{self.spec.weights.rstrip('/')}"

    def preparer(self, folder: Path | None) -> Preparer:
        from functools import partial

        from .conditioner import Step1XPrompts
        from .prepare import prepare_row

        if folder is None:
            raise ValueError("the step1x family needs its weights folder (the Qwen tokenizer and processor)")
        prompts = Step1XPrompts.from_folder(Path(folder) / QWEN_DIR)
        return partial(prepare_row, prompts, posterior_mean=self.options.posterior_mean)

    def load(self, folder: Path | None, device: str) -> Engine:
        from .pipeline import Step1XEngine

        if folder is None:
            raise ValueError("the step1x family needs a weights folder")
        return Step1XEngine.from_pretrained(
            folder, device=device, dtype=self.spec.dtype, version=self.options.version,
            batch_invariant=self.spec.batch_invariant, max_batch_size=self.spec.max_batch_size,
            compile=self.spec.compile, attention=self.spec.attention,
        )

    def finish(self, image: np.ndarray, input_sizes: Sequence[tuple[int, int]]) -> np.ndarray:
        """Back to the input's size, as the reference returns it."""
        from .prepare import resize

        return resize(image, tuple(input_sizes[0]))
