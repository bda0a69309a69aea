"""The null family: returns each row's input. Measures the pipeline's own overhead and runs the
whole job without a model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

from pydantic import BaseModel, ConfigDict

from step1x_batch.models.base import (
    AdapterSpec,
    EditOutput,
    EditRequest,
    Engine,
    IdParts,
    ModelFamily,
    Prepared,
    Preparer,
    option,
)


class NullOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_images: int = option(1, pixels=False, ge=1, le=64)  # the first image is returned


class NullEngine:
    def edit(self, rows: Sequence[Prepared]) -> list[EditOutput]:
        return [EditOutput(r.arrays["image"]) for r in rows]


def _prepare(request: EditRequest) -> Prepared:
    image = request.images[0]
    h, w = image.shape[:2]
    return Prepared(f"null|{w}x{h}", w, h, {"image": image})


class NullFamily(ModelFamily):
    name = "null"
    Options = NullOptions
    needs_weights = False
    lightweight = True

    @property
    def max_images(self) -> int:
        return self.options.max_images

    def format_model_id(self, pixels: Mapping[str, Any], parts: IdParts) -> str:
        return "null"  # the input, whatever the dtype, weights or batching

    def preparer(self, folder: Path | None) -> Preparer:
        return _prepare

    def load(self, folder: Path | None, device: str, adapters: Sequence[AdapterSpec] = ()) -> Engine:
        return NullEngine()
