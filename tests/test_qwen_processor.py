"""The Qwen2-VL image processors of ``qwen_vl/processor.py`` against transformers' own (the ones
diffusers' QwenImageEditPlusPipeline runs), and processor folders as transformers 5 saves them.

- ``torchvision``: transformers' torchvision backend, reproduced in plain torch; the oracle is
  transformers' ``Qwen2VLImageProcessor`` running torchvision (needs torchvision installed; see
  ``torchvision_cpu``).
- ``pil``: transformers' ``Qwen2VLImageProcessorPil``.
- Folders: ``save_pretrained`` of the installed transformers writes ``processor_config.json``
  with the image processor nested, and no ``preprocessor_config.json``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision_cpu import TORCHVISION  # before transformers' image processors are imported

from step1x_batch.job import preflight
from step1x_batch.models.base import EditParams, EditRequest, ModelSpec
from step1x_batch.models.qwen_image_edit.family import QwenImageEditFamily
from step1x_batch.models.qwen_image_edit.prepare import calculate_dimensions, resize
from step1x_batch.models.qwen_vl.processor import (
    ImageProcessorSettings,
    build_image_processor,
    image_processor_config,
    smart_resize,
)

needs_torchvision = pytest.mark.skipif(
    TORCHVISION is None, reason="needs torchvision for the oracle (pip install torchvision, matching torch)")


def picture(seed: int, h: int, w: int) -> np.ndarray:
    """Smooth gradients plus noise: resizes of it round differently across kernels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x * 7 + y * 3) % 256], -1)
    return (base + rng.integers(-40, 40, (h, w, 3))).clip(0, 255).astype(np.uint8)


def transformers_processor(folder: Path, backend: str, **kwargs):
    if backend == "torchvision":
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

        processor = Qwen2VLImageProcessor.from_pretrained(folder, **kwargs)
    else:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        processor = Qwen2VLImageProcessorPil.from_pretrained(folder, **kwargs)
    assert processor.backend == backend
    return processor


def run(processor, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out = processor(images=[Image.fromarray(image)], return_tensors="np")
    return np.asarray(out["pixel_values"]), np.asarray(out["image_grid_thw"])


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """The tiny Qwen-Image-Edit folder, its processor/ in the released layout."""
    from step1x_batch.models.qwen_image_edit.tiny import make_tiny_weights

    return make_tiny_weights(tmp_path_factory.mktemp("qwen-edit") / "tiny", seed=0)


@pytest.fixture(scope="module")
def qwen(weights) -> Path:
    """Its processor folder: tokenizer files and the released preprocessor_config.json."""
    assert (weights / "processor" / "preprocessor_config.json").is_file()
    return weights / "processor"


# (h, w) inputs: diffusers' VL sizes at 384^2 (upscaled to multiples of 28), sizes already
# multiples of 28 (no resize), odd sizes, and downscales (the antialiasing matters there).
SIZES = [(384, 384), (320, 448), (448, 448), (33, 97), (500, 300), (1000, 700)]
LIMITS = {"max_pixels": 28 * 28 * 64}  # (500, 300), (1000, 700) shrink under it


@pytest.mark.parametrize("backend", ["pil", pytest.param("torchvision", marks=needs_torchvision)])
@pytest.mark.parametrize("limits", [{}, LIMITS], ids=["folder", "max_pixels"])
def test_each_backend_equals_transformers_bit_for_bit(qwen, backend, limits):
    ours = build_image_processor(qwen, backend=backend, **limits)
    theirs = transformers_processor(qwen, backend, **limits)
    for i, (h, w) in enumerate(SIZES):
        image = picture(i, h, w)
        (a, ga), (b, gb) = run(ours, image), run(theirs, image)
        np.testing.assert_array_equal(ga, gb, err_msg=f"{h}x{w}")
        assert a.dtype == b.dtype == np.float32
        np.testing.assert_array_equal(a, b, err_msg=f"{h}x{w}")


def test_the_two_backends_differ_by_a_level_or_two_on_few_values(qwen):
    """What the option chooses between: same grids, the resize's rounding differs."""
    tv, pil = build_image_processor(qwen, backend="torchvision"), build_image_processor(qwen, backend="pil")
    std = np.asarray(tv.settings.image_std, dtype=np.float32)
    w, h = calculate_dimensions(384 * 384, 4 / 3)
    a, ga = run(tv, picture(5, h, w))
    b, gb = run(pil, picture(5, h, w))
    np.testing.assert_array_equal(ga, gb)
    levels = np.abs(a - b).reshape(-1, 3, a.shape[1] // 3) * std[None, :, None] * 255  # channel-major patches
    changed = float((levels > 0.5).mean())
    assert 0 < changed < 0.02 and levels.max() < 2.5, (changed, levels.max())


def test_smart_resize_equals_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as theirs

    for h in (1, 27, 28, 55, 384, 1000, 4000):
        for w in (1, 30, 97, 384, 2000):
            if max(h, w) / min(h, w) > 200:
                with pytest.raises(ValueError):
                    smart_resize(h, w, 28, 3136, 1003520)
                continue
            for lo, hi in ((3136, 1003520), (3136, 12544), (200704, 12845056)):
                assert smart_resize(h, w, 28, lo, hi) == theirs(h, w, 28, lo, hi), (h, w, lo, hi)


def test_torchvision_backend_runs_without_torchvision_or_transformers(qwen):
    """Plain torch: the job's CPU workers need neither package for it."""
    code = textwrap.dedent(f"""
        import sys
        sys.modules["torchvision"] = None
        sys.modules["transformers"] = None
        import numpy as np
        from step1x_batch.models.qwen_vl.processor import build_image_processor
        out = build_image_processor({str(qwen)!r}, backend="torchvision")(images=[np.zeros((40, 60, 3), np.uint8)])
        print(out["image_grid_thw"].tolist(), out["pixel_values"].shape)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[0] == "[[1, 4, 6]] (24, 1176)"  # 40x60 raised to min_pixels: 56x84


def test_unknown_backend_is_refused(qwen):
    with pytest.raises(ValueError, match="unknown image processor 'lanczos'"):
        build_image_processor(qwen, backend="lanczos")


# --- processor folders saved by transformers 5 ---------------------------------------------------

SAVED = {"shortest_edge": 28 * 28 * 8, "longest_edge": 28 * 28 * 16}  # not the folder's 3136 / 12845056
SAVED_MEAN, SAVED_STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def save_with_transformers(qwen: Path, out: Path) -> Path:
    """``save_pretrained`` of a Qwen2-VL processor (tokenizer + image processor) made from the
    tiny files, with limits and statistics other than the files': the layout transformers 5 writes."""
    from transformers import AutoTokenizer, Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyProcessor(Qwen2VLProcessor):
        """Qwen2VLProcessor without its video processor (that one needs torchvision)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    image_processor = transformers_processor(qwen, "pil", min_pixels=SAVED["shortest_edge"],
                                             max_pixels=SAVED["longest_edge"], image_mean=SAVED_MEAN,
                                             image_std=SAVED_STD)
    tokenizer = AutoTokenizer.from_pretrained(qwen, local_files_only=True)
    ImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def saved(qwen, tmp_path_factory) -> Path:
    out = save_with_transformers(qwen, tmp_path_factory.mktemp("saved") / "processor")
    assert (out / "processor_config.json").is_file() and not (out / "preprocessor_config.json").exists()
    assert "image_processor" in json.loads((out / "processor_config.json").read_text())
    return out


def test_the_saved_folders_values_are_read(saved):
    s = ImageProcessorSettings.from_config(image_processor_config(saved))
    assert (s.min_pixels, s.max_pixels) == (SAVED["shortest_edge"], SAVED["longest_edge"])
    assert list(s.image_mean) == SAVED_MEAN and list(s.image_std) == SAVED_STD
    assert (s.patch_size, s.merge_size, s.temporal_patch_size) == (14, 2, 2)


@pytest.mark.parametrize("backend", ["pil", pytest.param("torchvision", marks=needs_torchvision)])
def test_a_saved_folder_processes_as_transformers_loads_it(qwen, saved, backend):
    image = picture(3, 384, 384)
    ours, theirs = build_image_processor(saved, backend=backend), transformers_processor(saved, backend)
    (a, ga), (b, gb) = run(ours, image), run(theirs, image)
    np.testing.assert_array_equal(ga, gb)
    np.testing.assert_array_equal(a, b)
    assert ga.tolist() != run(build_image_processor(qwen, backend=backend), image)[1].tolist()  # the limits matter
    # Arguments still override the folder's limits (the step1x family passes its own).
    ours = build_image_processor(saved, backend=backend, min_pixels=3136, max_pixels=28 * 28 * 4)
    theirs = transformers_processor(saved, backend, min_pixels=3136, max_pixels=28 * 28 * 4)
    (a2, ga2), (b2, gb2) = run(ours, image), run(theirs, image)
    assert ga2.tolist() == gb2.tolist() and ga2.tolist() != ga.tolist()
    np.testing.assert_array_equal(a2, b2)


def test_the_nested_config_wins_as_in_transformers(qwen, saved, tmp_path):
    both = tmp_path / "both"
    shutil.copytree(saved, both)
    shutil.copy(qwen / "preprocessor_config.json", both / "preprocessor_config.json")
    image = picture(4, 384, 384)
    np.testing.assert_array_equal(run(build_image_processor(both), image)[0],
                                  run(transformers_processor(both, "pil"), image)[0])
    assert image_processor_config(both)["size"] == SAVED


@pytest.fixture(scope="module")
def resaved_weights(weights, saved, tmp_path_factory) -> Path:
    """The tiny Qwen-Image-Edit folder with its processor/ as transformers 5 saves it."""
    out = tmp_path_factory.mktemp("resaved") / "tiny"
    shutil.copytree(weights, out, ignore=shutil.ignore_patterns("processor"))
    shutil.copytree(saved, out / "processor")
    return out


def test_preflight_accepts_either_processor_layout(resaved_weights, tmp_path):
    family = QwenImageEditFamily(ModelSpec("qwen-image-edit", {}, str(resaved_weights), "float32"))
    assert "processor/processor_config.json" in preflight.check_weights(str(resaved_weights), None, family)
    bare = tmp_path / "bare"
    shutil.copytree(resaved_weights, bare)
    (bare / "processor" / "processor_config.json").unlink()
    with pytest.raises(preflight.PreflightError, match="has no image processor config"):
        preflight.check_weights(str(bare), None, family)


@pytest.mark.parametrize("backend", ["pil", pytest.param("torchvision", marks=needs_torchvision)])
def test_the_family_prepares_with_the_saved_folders_values(resaved_weights, saved, backend):
    family = QwenImageEditFamily(ModelSpec("qwen-image-edit", {"image_processor": backend}, "w", "float32"))
    image = picture(6, 60, 80)
    row = family.preparer(resaved_weights)(EditRequest([image], "make it a cat", 0, EditParams(2, 4.0, 64, " ")))
    vl = resize(image, calculate_dimensions(family.options.vl_area, 80 / 60))
    pixels, grid = run(transformers_processor(saved, backend), vl)
    np.testing.assert_array_equal(row.arrays["image0_grid"], grid[0])
    np.testing.assert_array_equal(row.arrays["image0_pixels"], pixels)
    assert int(np.prod(grid[0])) * 14 * 14 <= SAVED["longest_edge"]  # the folder's limit, not the default
