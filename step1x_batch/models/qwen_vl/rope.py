"""Qwen2.5-VL's 3-D rope positions (mrope), computed on the CPU from token ids and image grids.

Both families' released weights were trained with transformers 4.5x, which derived these positions
inside the model from ``input_ids`` and ``image_grid_thw``. transformers 5 computes them only when
``mm_token_type_ids`` reaches the model (pipelines that do not pass it silently get 1-D text
positions), so the positions are built here, in the CPU prepare stage, and passed explicitly.

Rule (per prompt): kept tokens are numbered in order, text tokens advance all three axes by one;
an image block of ``t x h x w`` merged patches gets ``(start + t_i, start + h_i, start + w_i)`` and
the text after it resumes at ``start + max(h, w)``. Tokens that are not kept (masked) are skipped
by the numbering and get ``fill``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def mrope_positions(
    ids: np.ndarray,
    grids: Sequence[Sequence[int]],
    *,
    image_token_id: int,
    spatial_merge_size: int,
    keep: np.ndarray | None = None,
    fill: int = 1,
) -> np.ndarray:
    """(3, L) int64 positions for one prompt of token ``ids`` holding one image block per grid."""
    ids = np.asarray(ids, dtype=np.int64)
    keep = np.ones(ids.shape, dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
    kept = ids[keep]
    out = np.empty((3, kept.size), dtype=np.int64)
    is_image = kept == image_token_id
    grid_iter = iter(grids)
    pos, current = 0, 0
    while pos < kept.size:
        end = pos
        while end < kept.size and is_image[end] == is_image[pos]:
            end += 1
        if not is_image[pos]:
            out[:, pos:end] = current + np.arange(end - pos)
            current += end - pos
        else:
            try:
                t, h, w = (int(v) for v in next(grid_iter))
            except StopIteration:
                raise ValueError("more image blocks in the prompt than image grids") from None
            h, w = h // spatial_merge_size, w // spatial_merge_size
            if t * h * w != end - pos:
                raise ValueError(f"an image block of {end - pos} tokens does not match its grid {t}x{h}x{w}")
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
            out[:, pos:end] = current + np.stack([tt.ravel(), hh.ravel(), ww.ravel()])
            current += max(h, w)
        pos = end
    full = np.full((3, ids.size), fill, dtype=np.int64)
    full[:, keep] = out
    return full
