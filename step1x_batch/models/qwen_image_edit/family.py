"""Qwen-Image-Edit-2511 (and fine-tunes in its layout: MACRO, ...) as a model family of the job:
1 to ``max_images`` images per row, the output at the last image's aspect."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from step1x_batch.models.base import AdapterSpec, EditParams, Engine, IdParts, ModelFamily, Preparer

from .options import QwenImageEditOptions


class QwenImageEditFamily(ModelFamily):
    name = "qwen-image-edit"
    Options = QwenImageEditOptions
    defaults = EditParams(num_steps=40, guidance_scale=4.0, size_level=1024, negative_prompt=" ")
    prepare_files = (
        "model_index.json",
        "processor/*",
        "tokenizer/*",
        "text_encoder/config.json",
        "vae/config.json",
    )
    supports_adapters = True
    required_files = (
        "model_index.json", "scheduler/scheduler_config.json",
        "transformer/config.json", "transformer/*.safetensors",
        "vae/config.json", "vae/*.safetensors",
        "text_encoder/config.json", "text_encoder/*.safetensors",
    )
    # The image processor's config: the released layout, or transformers 5's save_pretrained one.
    image_processor_files = ("processor/preprocessor_config.json", "processor/processor_config.json")

    def weights_problem(self, files) -> str | None:
        tokenizer = [f"{d}/{n}" for d in ("processor", "tokenizer") for n in ("tokenizer.json", "vocab.json")]
        if not any(t in files for t in tokenizer):
            return "has no tokenizer (processor/tokenizer.json or tokenizer/tokenizer.json)"
        if not any(f in files for f in self.image_processor_files):
            return f"has no image processor config ({' or '.join(self.image_processor_files)})"
        return super().weights_problem(files)

    @property
    def max_images(self) -> int:
        return self.options.max_images

    def format_model_id(self, pixels: Mapping[str, Any], parts: IdParts) -> str:
        refs = "macro" if pixels["reference_areas"] == "macro" else f"fixed{pixels['reference_area']}"
        extra = ""
        if pixels["square_input"]:
            extra += f"square={pixels['square_input']}:"
        if pixels["scheduler"]:
            extra += f"scheduler={json.dumps(pixels['scheduler'], sort_keys=True, separators=(',', ':'))}:"
        return (
            f"qwen-image-edit:{parts.dtype}:refs={refs}:vl={pixels['vl_area']}:"
            f"vl_processor={pixels['image_processor']}:cfg_norm={'on' if pixels['cfg_norm_rescale'] else 'off'}:"
            f"text_pos={pixels['text_positions']}:{extra}{'batch-variant:' if parts.batch_variant else ''}"
            f"{parts.weights}{parts.adapters}"
        )

    def weights_license(self) -> str:
        """Qwen-Image-Edit-2511's weights are Apache-2.0."""
        return "apache-2.0"

    def preparer(self, folder: Path | None) -> Preparer:
        from functools import partial

        from .prepare import QwenEditPrompts, prepare_row

        if folder is None:
            raise ValueError("the qwen-image-edit family needs its weights folder (processor, tokenizer, configs)")
        return partial(prepare_row, QwenEditPrompts.from_folder(folder, self.options.image_processor), self.options,
                       batch_invariant=self.spec.batch_invariant)

    def adapter_target(self, engine: Engine) -> Any:
        return engine.transformer

    def load(self, folder: Path | None, device: str, adapters: Sequence[AdapterSpec] = ()) -> Engine:
        from .pipeline import QwenImageEditEngine

        if folder is None:
            raise ValueError("the qwen-image-edit family needs a weights folder")
        return QwenImageEditEngine.from_pretrained(
            folder, device=device, dtype=self.spec.dtype, batch_invariant=self.spec.batch_invariant,
            max_batch_size=self.spec.max_batch_size, compile=self.spec.compile, attention=self.spec.attention,
            adapters=adapters, scheduler=self.options.scheduler,
        )
