"""The one interface between the data pipeline and a model.

The Ray stages know rows, bytes and arrays; a model knows tensors. This module is where they meet:
an :class:`Editor` turns decoded RGB arrays plus per-row parameters into edited RGB arrays, and
reports a per-row failure (non-finite output, ...) as data instead of raising. Nothing here imports
Ray or model internals; model code is imported lazily by :func:`load_editor`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np


@dataclass(frozen=True)
class EditParams:
    """Every per-row parameter that changes pixels (so it belongs in the row fingerprint)."""

    num_steps: int = 28
    guidance_scale: float = 6.0
    size_level: int = 1024
    negative_prompt: str = ""


@dataclass
class EditRow:
    """One row to edit: an RGB uint8 array of shape (H, W, 3) at its original size."""

    image: np.ndarray
    instruction: str
    seed: int
    params: EditParams = field(default_factory=EditParams)


@dataclass
class EditOutput:
    """The result for one row. ``image`` is None exactly when ``error_type`` is set."""

    image: np.ndarray | None
    width: int  # the size the model ran at
    height: int
    seed: int
    edit_ms: float
    error_type: str | None = None
    error_message: str | None = None


class Editor(Protocol):
    """What a GPU actor holds: loaded once, called with batches of rows."""

    model_id: str

    def edit_rows(self, rows: Sequence[EditRow]) -> list[EditOutput]:
        """Edit ``rows``; returns one output per row, in order. Batching is the editor's business."""
        ...


@dataclass(frozen=True)
class EditorSpec:
    """How to build an editor: plain data, so it can travel to a Ray actor."""

    kind: str = "step1x"  # "step1x" | "null" | "package.module:Factory" (called with the spec)
    weights: str = ""  # local folder or object-storage URI (staged once per node by load_editor)
    weights_cache_dir: str | None = None  # None: $STEP1X_WEIGHTS_CACHE, else ~/.cache/step1x-batch/weights
    weights_storage: Any = None  # storage.StorageOptions for the weights' URI; None: environment defaults
    weights_checksums: str | None = None  # a sha256sum-format file (path or URI) to verify staged weights
    device: str = "cpu"
    dtype: str = "bfloat16"
    version: str | None = None  # "v1.0" | "v1.1"; None: detected from the weights
    max_batch_size: int = 4
    posterior_mean: bool = False  # VAE encode: use the posterior mean instead of a seeded sample
    model_id: str | None = None


class NullEditor:
    """Returns its input: measures the pipeline's own overhead and tests it without a model."""

    def __init__(self, model_id: str = "null") -> None:
        self.model_id = model_id

    def edit_rows(self, rows: Sequence[EditRow]) -> list[EditOutput]:
        outputs = []
        for row in rows:
            start = time.perf_counter()
            h, w = row.image.shape[:2]
            outputs.append(
                EditOutput(row.image, w, h, row.seed, (time.perf_counter() - start) * 1e3)
            )
        return outputs


def resolve_weights(spec: EditorSpec) -> str:
    """A local folder holding the release: object-storage weights are staged to the node's cache."""
    from step1x_batch.weights_cache import default_cache_dir, stage_weights

    folder = stage_weights(
        spec.weights, default_cache_dir(spec.weights_cache_dir), spec.weights_storage,
        checksums=spec.weights_checksums,
    )
    return str(folder)


def load_editor(spec: EditorSpec) -> Editor:
    """Build the editor a spec names; model code is imported only here."""
    if spec.kind == "null":
        return NullEditor(spec.model_id or "null")
    if spec.kind == "step1x":
        from step1x_batch.models.step1x.pipeline import EditPipeline, Step1XEditor

        pipe = EditPipeline.from_pretrained(
            resolve_weights(spec), device=spec.device, dtype=spec.dtype, version=spec.version
        )
        return Step1XEditor(
            pipe,
            max_batch_size=spec.max_batch_size,
            posterior_mean=spec.posterior_mean,
            model_id=spec.model_id,
        )
    if ":" in spec.kind:
        import importlib

        module, _, name = spec.kind.partition(":")
        return getattr(importlib.import_module(module), name)(spec)
    raise ValueError(f"unknown editor kind {spec.kind!r}; expected 'step1x', 'null' or 'module:Factory'")
