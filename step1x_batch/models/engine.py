"""What every family's engine and in-process pipeline share, so a family writes only its own model.

:class:`BatchEngine` is the batch-invariance scaffolding (docs/architecture.md, the family
interface): a batch larger than ``max_batch_size`` is split, the text encoder and the VAE see one
row at a time (:meth:`BatchEngine.each`), the denoiser always runs ``max_batch_size`` rows (a short
batch padded with copies of its first row, :meth:`BatchEngine.pad`), so every kernel sees the same
shapes whatever a row's companions and a row's bytes depend on the row alone. It also times each
phase and turns non-finite latents into a row error. A family's engine writes :meth:`sample` (rows
-> final latents) and :meth:`decode` (latents -> uint8 pixels).

:class:`Pipeline` is in-process editing from Python: a family's ``prepare``, its engine and its
``finish`` run one after the other (the job's three stages, in one process).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, ClassVar, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from step1x_batch.models.base import (
    NON_FINITE_OUTPUT,
    AdapterSpec,
    EditOutput,
    EditParams,
    EditRequest,
    EditResult,
    Engine,
    ModelFamily,
    Prepared,
    Preparer,
    RowFailure,
    as_rgb_array,
    edit_prepared,
)

Finish = Callable[[np.ndarray, Sequence[tuple[int, int]]], np.ndarray]


class Laps:
    """One batch's phase timings in ms; on CUDA the device is synchronised first, so a phase's
    time is its work, not its launch."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.timings: dict[str, float] = {}
        self._clock = time.perf_counter()

    def __call__(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[name] = (now - self._clock) * 1e3
        self._clock = now


def pad_rows(x: Tensor, n: int) -> Tensor:
    """``x`` with copies of its first row appended up to ``n`` rows."""
    return torch.cat([x, x[:1].expand(n - x.shape[0], *x.shape[1:])]) if x.shape[0] < n else x


def check_one_key(rows: Sequence[Prepared]) -> None:
    """Rows of one engine call share one batch key (``edit_prepared`` groups them so)."""
    if any(r.key != rows[0].key for r in rows):
        raise ValueError("rows of one engine call must share a batch key")


def finite_rows(latents: Tensor) -> Tensor:
    """(B,) bool: which rows' latents are all finite (on the device: no wait until read)."""
    return torch.isfinite(latents).flatten(1).all(dim=1)


class BatchEngine:
    """The shared part of a family's engine: split, pad, per-row loop, timings, non-finite check.

    Subclasses set ``device``, ``batch_invariant`` and ``max_batch_size`` and write :meth:`sample`
    and :meth:`decode`; ``non_finite_advice`` ends the error message of a non-finite row.
    """

    device: torch.device
    batch_invariant: bool
    max_batch_size: int
    non_finite_advice: ClassVar[str] = "try another seed, or bfloat16/float32 instead of float16"

    def sample(self, rows: Sequence[Prepared], laps: Laps) -> Tensor:
        """B rows of one batch key -> their (B, ...) final latents; ``laps`` the phases."""
        raise NotImplementedError

    def decode(self, latents: Tensor, width: int, height: int) -> Tensor:
        """(B, ...) latents -> (B, height, width, 3) uint8 pixels (on any device)."""
        raise NotImplementedError

    def chunks(self, rows: Sequence[Prepared]) -> list[list[Prepared]]:
        """The batches ``rows`` run in: all at once, or ``max_batch_size`` at a time when batch invariant."""
        rows = list(rows)
        if not self.batch_invariant or len(rows) <= self.max_batch_size:
            return [rows]
        n = self.max_batch_size
        return [rows[i : i + n] for i in range(0, len(rows), n)]

    def each(self, fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        """``fn`` over the rows of ``x``: one row at a time when batch invariant."""
        if not self.batch_invariant or x.shape[0] == 1:
            return fn(x)
        return torch.cat([fn(x[i : i + 1]) for i in range(x.shape[0])])

    def pad(self, x: Tensor, halves: int = 1) -> Tensor:
        """The fixed forward shape when batch invariant: each of ``x``'s ``halves`` (cond, uncond)
        padded to ``max_batch_size`` rows with copies of its first row; else ``x``."""
        n = self.max_batch_size
        if not self.batch_invariant or x.shape[0] // halves >= n:
            return x
        if halves == 1:
            return pad_rows(x, n)
        return torch.cat([pad_rows(half, n) for half in x.chunk(halves)])

    @torch.inference_mode()
    def edit(self, rows: Sequence[Prepared]) -> list[EditOutput]:
        """Edit prepared rows of one batch key; pixels at the model size, one output per row."""
        check_one_key(rows)
        batches = self.chunks(rows)
        if len(batches) > 1:
            return [out for batch in batches for out in self.edit(batch)]
        rows = batches[0]
        laps = Laps(self.device)
        latents = self.sample(rows, laps)
        finite = finite_rows(latents)
        pixels = self.decode(latents, rows[0].width, rows[0].height).cpu().numpy()
        laps("decode_ms")
        return self.outputs(rows, pixels, finite.tolist(), laps.timings)

    def outputs(self, rows: Sequence[Prepared], pixels: np.ndarray, finite: Sequence[bool],
                timings: dict[str, float]) -> list[EditOutput]:
        """One output per row: its pixels, or a ``non_finite_output`` error."""
        outputs = []
        for row, ok, image in zip(rows, finite, pixels):
            if ok:
                outputs.append(EditOutput(image, timings_ms=dict(timings)))
                continue
            message = (f"the model produced non-finite latents for seed {int(row.meta['seed'])} at "
                       f"{row.width}x{row.height}; {self.non_finite_advice}")
            outputs.append(EditOutput(None, error_type=NON_FINITE_OUTPUT, error_message=message,
                                      timings_ms=dict(timings)))
        return outputs


# --- in-process use ------------------------------------------------------------------------------


def keep_pixels(image: np.ndarray, input_sizes: Sequence[tuple[int, int]]) -> np.ndarray:
    """The model-size pixels as they are (a family whose reference returns them so)."""
    return image


class Pipeline:
    """In-process editing from Python: prepare, edit in batches of one key, finish, one call.

    The same pieces the Ray job runs in three stages (prepare on CPU tasks, the engine in a GPU
    actor, ``finish`` in the write stage), run here one after the other. Built for any family by
    :func:`family_pipeline`.
    """

    def __init__(self, engine: Engine, prepare: Preparer, *, finish: Finish = keep_pixels,
                 defaults: EditParams = EditParams(), max_batch_size: int | None = None) -> None:
        self.engine, self.prepare, self.finish, self.defaults = engine, prepare, finish, defaults
        self.max_batch_size = max_batch_size or getattr(engine, "max_batch_size", 4)

    def edit(
        self,
        images: Sequence[Sequence[np.ndarray | Image.Image] | np.ndarray | Image.Image],
        instructions: Sequence[str],
        seeds: Sequence[int] | None = None,
        negative_prompts: Sequence[str] | None = None,
        num_steps: int | None = None,
        guidance_scale: float | None = None,
        size_level: int | None = None,
        *,
        max_batch_size: int | None = None,
    ) -> list[EditResult]:
        """Edit each row (one image or a list of images) by its instruction; results in order.
        A parameter left None takes the family's default."""
        d = self.defaults
        params = EditParams(d.num_steps if num_steps is None else num_steps,
                            d.guidance_scale if guidance_scale is None else guidance_scale,
                            d.size_level if size_level is None else size_level, d.negative_prompt)
        rows = [list(r) if isinstance(r, (list, tuple)) else [r] for r in images]
        return self.run(self.prepare, rows, instructions, seeds, negative_prompts, params, max_batch_size)

    def run(
        self,
        prepare: Preparer,
        rows: Sequence[Sequence[np.ndarray | Image.Image]],
        instructions: Sequence[str],
        seeds: Sequence[int] | None,
        negative_prompts: Sequence[str] | None,
        params: EditParams,
        max_batch_size: int | None = None,
    ) -> list[EditResult]:
        """Prepare every row (a :class:`RowFailure` becomes that row's error result), edit the
        prepared rows in batches of one key, finish each image; one result per row, in order."""
        arrays = [[as_rgb_array(im) for im in row] for row in rows]
        n = len(arrays)
        seeds = list(seeds) if seeds is not None else [0] * n
        negatives = list(negative_prompts) if negative_prompts is not None else [params.negative_prompt] * n
        if not (len(instructions) == len(seeds) == len(negatives) == n):
            raise ValueError("images, instructions, seeds and negative_prompts must have the same length")
        results: list[EditResult | None] = [None] * n
        prepared: list[Prepared] = []
        where: list[int] = []
        for i in range(n):
            request = EditRequest(arrays[i], instructions[i], seeds[i], replace(params, negative_prompt=negatives[i]))
            try:
                prepared.append(prepare(request))
                where.append(i)
            except RowFailure as e:
                results[i] = EditResult(None, 0, 0, seeds[i], 0, {}, e.code, e.message)
        outputs = edit_prepared(self.engine, prepared, max_batch_size or self.max_batch_size)
        for i, row, out in zip(where, prepared, outputs):
            image = None if out.image is None else self.finish(out.image, [(a.shape[1], a.shape[0]) for a in arrays[i]])
            results[i] = EditResult(image, row.width, row.height, seeds[i], out.batch_size, out.timings_ms,
                                    out.error_type, out.error_message)
        return results  # type: ignore[return-value]


def family_pipeline(family: ModelFamily, folder: Path | None, adapters: Sequence[AdapterSpec] = ()) -> Pipeline:
    """Any family in-process (``step1x-batch edit``): its ``prepare``, its engine loaded onto
    ``spec.device`` (with ``adapters`` merged) and its ``finish``, from the family interface alone."""
    prepare = family.preparer(folder)  # first: the cheap half fails first
    device = family.spec.device
    engine = family.load(folder, device, adapters) if adapters else family.load(folder, device)
    return Pipeline(engine, prepare, finish=family.finish, defaults=family.defaults,
                    max_batch_size=family.spec.max_batch_size)
