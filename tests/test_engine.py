"""The scaffolding both engines share (step1x_batch.models.engine): split, pad, per-row loop,
timings, the non-finite check, and the in-process pipeline any family gets."""

import numpy as np
import pytest
import torch

from step1x_batch.models.base import NON_FINITE_OUTPUT, ModelSpec, Prepared
from step1x_batch.models.engine import BatchEngine, Laps, Pipeline, family_pipeline, pad_rows
from step1x_batch.models.null import NullFamily
from step1x_batch.models.qwen_image_edit.pipeline import QwenImageEditEngine
from step1x_batch.models.step1x.pipeline import Step1XEngine


class ToyEngine(BatchEngine):
    """Latents = the seed everywhere (NaN for seed -1); pixels = the latents as uint8."""

    def __init__(self, batch_invariant: bool = True, max_batch_size: int = 2) -> None:
        self.device, self.batch_invariant, self.max_batch_size = torch.device("cpu"), batch_invariant, max_batch_size
        self.forwards: list[int] = []

    def sample(self, rows, laps):
        seeds = torch.tensor([float(r.meta["seed"]) for r in rows])
        x = self.pad(seeds[:, None].expand(-1, 4).clone())
        self.forwards.append(x.shape[0])
        laps("denoise_ms")
        return torch.where(x < 0, torch.nan, x)[: len(rows)]

    def decode(self, latents, width, height):
        value = latents.nan_to_num(0)[:, :1, None, None].to(torch.uint8)
        return value.expand(-1, height, width, 3)


def row(seed: int, key: str = "k") -> Prepared:
    return Prepared(key, 3, 2, {}, {"seed": seed})


def test_both_engines_are_batch_engines():
    assert issubclass(Step1XEngine, BatchEngine) and issubclass(QwenImageEditEngine, BatchEngine)


def test_pad_rows_repeats_the_first_row():
    x = torch.arange(6.0).view(2, 3)
    assert torch.equal(pad_rows(x, 4), torch.stack([x[0], x[1], x[0], x[0]]))
    assert pad_rows(x, 2) is x


def test_pad_halves_pads_cond_and_uncond_apart():
    engine = ToyEngine(max_batch_size=3)
    cond_uncond = torch.tensor([[1.0], [2.0], [10.0], [20.0]])
    assert engine.pad(cond_uncond, halves=2).flatten().tolist() == [1, 2, 1, 10, 20, 10]
    assert ToyEngine(batch_invariant=False).pad(cond_uncond, halves=2) is cond_uncond


def test_batch_invariant_edit_splits_and_pads_to_the_fixed_shape():
    engine = ToyEngine(max_batch_size=2)
    outs = engine.edit([row(s) for s in (1, 2, 3)])
    assert engine.forwards == [2, 2]  # 2 + 1 rows, the second batch padded
    assert [int(o.image[0, 0, 0]) for o in outs] == [1, 2, 3]
    assert set(outs[0].timings_ms) == {"denoise_ms", "decode_ms"}
    variant = ToyEngine(batch_invariant=False, max_batch_size=2)
    variant.edit([row(s) for s in (1, 2, 3)])
    assert variant.forwards == [3]


def test_non_finite_rows_are_row_errors():
    outs = ToyEngine().edit([row(4), row(-1)])
    assert outs[0].error_type is None and outs[1].image is None
    assert outs[1].error_type == NON_FINITE_OUTPUT
    assert outs[1].error_message.startswith("the model produced non-finite latents for seed -1 at 3x2; ")


def test_rows_of_one_call_share_a_key():
    with pytest.raises(ValueError, match="share a batch key"):
        ToyEngine().edit([row(1, "a"), row(2, "b")])


def test_laps_time_each_phase():
    laps = Laps(torch.device("cpu"))
    laps("a")
    laps("b")
    assert list(laps.timings) == ["a", "b"] and all(v >= 0 for v in laps.timings.values())


def test_any_family_gets_the_in_process_pipeline():
    pipe = family_pipeline(NullFamily(ModelSpec("null", {"max_images": 2})), None)
    assert isinstance(pipe, Pipeline)
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    (result,) = pipe.edit([[image, image]], ["keep it"], seeds=[7])
    np.testing.assert_array_equal(result.image, image)
    assert (result.width, result.height, result.seed, result.batch_size) == (3, 2, 7, 1)
    with pytest.raises(ValueError, match="same length"):
        pipe.edit([image], ["a", "b"])
