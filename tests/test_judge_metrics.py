"""judge/metrics.py: SSIM and PSNR against scikit-image, the unchanged / size checks on images with
known answers, and ClipScorer against a tiny random CLIP scored by hand."""

from __future__ import annotations

import io
import math
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from tokenizers import pre_tokenizers
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from step1x_batch.judge import metrics
from step1x_batch.judge.metrics import METRICS_TYPE, ClipScorer, MetricSettings, image_metrics

DEFAULT = MetricSettings()


def _sk_ssim(a: np.ndarray, b: np.ndarray) -> float:
    return structural_similarity(
        a, b, channel_axis=2, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255
    )


def _rng_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _jpeg(image: np.ndarray, quality: int = 95, subsampling: int = 2) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality, subsampling=subsampling)
    return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))


def _photo() -> np.ndarray:
    """A real photograph (scikit-image's bundled cat), cropped small to keep the tests quick."""
    return np.ascontiguousarray(skdata.chelsea()[40:200, 100:340])


def _pairs() -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(7)
    noise = _rng_image(rng, 37, 53)
    noisy = np.clip(noise.astype(int) + rng.integers(-40, 41, noise.shape), 0, 255).astype(np.uint8)
    photo = _photo()
    blurred = np.asarray(Image.fromarray(photo).resize((60, 40)).resize(photo.shape[1::-1], Image.BICUBIC))
    shifted = np.roll(photo, (3, -5), axis=(0, 1))
    ramp = np.broadcast_to(np.linspace(0, 255, 64, dtype=np.float64)[None, :, None], (24, 64, 3)).astype(np.uint8)
    return [
        (noise, noisy),
        (noise, _rng_image(rng, 37, 53)),  # unrelated: SSIM near 0
        (photo, _jpeg(photo, quality=30)),
        (photo, blurred),
        (photo, shifted),
        (ramp, ramp[:, ::-1].copy()),
        (_rng_image(rng, 11, 11), _rng_image(rng, 11, 11)),  # the smallest size with a window position
    ]


@pytest.mark.parametrize("index", range(7))
def test_ssim_matches_scikit_image(index: int):
    a, b = _pairs()[index]
    assert metrics.ssim(a, b) == pytest.approx(_sk_ssim(a, b), abs=1e-6)
    assert metrics.ssim(b, a) == pytest.approx(_sk_ssim(a, b), abs=1e-6)


def test_ssim_of_identical_images_is_one_and_none_below_the_window():
    photo = _photo()
    assert metrics.ssim(photo, photo) == pytest.approx(1.0, abs=1e-12)
    tiny = _rng_image(np.random.default_rng(1), 10, 40)
    assert metrics.ssim(tiny, tiny) is None
    assert image_metrics(tiny, tiny, DEFAULT)["ssim"] is None


@pytest.mark.parametrize("index", range(7))
def test_psnr_matches_scikit_image(index: int):
    a, b = _pairs()[index]
    assert metrics.psnr(a, b) == pytest.approx(peak_signal_noise_ratio(a, b, data_range=255), abs=1e-9)


def test_identical_output_is_unchanged_with_capped_psnr():
    photo = _photo()
    found = image_metrics(photo, photo.copy(), DEFAULT)
    assert found["changed_fraction"] == 0.0
    assert found["unchanged"] is True
    assert found["psnr"] == metrics.PSNR_CAP
    assert found["ssim"] == pytest.approx(1.0)
    assert (found["width"], found["height"]) == (photo.shape[1], photo.shape[0])
    assert found["aspect_change"] == 0.0 and found["size_ok"] is True


def test_a_jpeg_round_trip_is_unchanged_at_the_default_tolerance():
    # quality 95 without chroma subsampling: about 0.1% of the cat's pixels move by more than 8;
    # with 4:2:0 subsampling (Pillow's default) 1% do, which the defaults count as an edit
    photo = skdata.chelsea()
    again = _jpeg(photo, quality=95, subsampling=0)
    strict = image_metrics(photo, again, MetricSettings(unchanged_tolerance=0))
    assert strict["changed_fraction"] > 0.5 and strict["unchanged"] is False  # the noise is there
    found = image_metrics(photo, again, DEFAULT)
    assert found["changed_fraction"] < DEFAULT.unchanged_fraction
    assert found["unchanged"] is True
    assert found["psnr"] < metrics.PSNR_CAP


def test_a_painted_square_moves_exactly_its_area():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 100, (120, 160, 3), dtype=np.uint8)
    painted = image.copy()
    painted[30:50, 70:100] = 255  # 20 x 30 pixels, each at least 156 away in every channel
    found = image_metrics(image, painted, DEFAULT)
    assert found["changed_fraction"] == 600 / (120 * 160)
    assert found["unchanged"] is False
    assert found["ssim"] < 1.0 and found["psnr"] < metrics.PSNR_CAP


def test_the_tolerance_is_a_strict_bound_on_one_channel():
    image = np.full((100, 100, 3), 50, dtype=np.uint8)
    out = image.copy()
    out[:10, :10, 1] = 50 + DEFAULT.unchanged_tolerance  # at the tolerance: not moved
    out[50:52, 50:55, 2] = 50 - DEFAULT.unchanged_tolerance - 1  # one more in one channel: moved
    assert image_metrics(image, out, DEFAULT)["changed_fraction"] == 10 / 10_000
    # 10 moved pixels of 10,000 is 0.001 < 0.005: unchanged; 70 are not
    assert image_metrics(image, out, DEFAULT)["unchanged"] is True
    out[60:66, 60:70, 0] = 0
    assert image_metrics(image, out, DEFAULT)["unchanged"] is False


def test_an_output_of_another_size_is_resized_for_comparison():
    photo = _photo()  # 160 x 240
    h, w = photo.shape[:2]
    bigger = np.asarray(Image.fromarray(photo).resize((2 * w, 2 * h), Image.BICUBIC))
    found = image_metrics(photo, bigger, DEFAULT)
    back = np.asarray(Image.fromarray(bigger).resize((w, h), Image.BICUBIC))
    assert (found["width"], found["height"]) == (2 * w, 2 * h)
    assert found["aspect_change"] == pytest.approx(0.0, abs=1e-12) and found["size_ok"] is True
    assert found["psnr"] == pytest.approx(peak_signal_noise_ratio(photo, back, data_range=255), abs=1e-9)
    assert found["ssim"] == pytest.approx(_sk_ssim(photo, back), abs=1e-6)
    assert found["changed_fraction"] == metrics.changed_fraction(photo, back, DEFAULT.unchanged_tolerance)


def test_size_ok_follows_aspect_change_and_min_side():
    photo = _photo()  # 160 x 240, aspect 1.5
    wider = np.asarray(Image.fromarray(photo).resize((250, 160)))
    found = image_metrics(photo, wider, DEFAULT)
    assert found["aspect_change"] == pytest.approx(math.log(250 / 160 / 1.5), abs=1e-12)
    assert found["aspect_change"] > DEFAULT.max_aspect_change and found["size_ok"] is False
    assert image_metrics(photo, wider, MetricSettings(max_aspect_change=0.05))["size_ok"] is True
    nearly = np.asarray(Image.fromarray(photo).resize((242, 160)))  # log(242/240) ~ 0.0083
    assert image_metrics(photo, nearly, DEFAULT)["size_ok"] is True
    small = np.asarray(Image.fromarray(photo).resize((90, 60)))  # same aspect, a side under 64
    found = image_metrics(photo, small, DEFAULT)
    assert found["aspect_change"] == pytest.approx(0.0, abs=1e-12) and found["size_ok"] is False
    assert image_metrics(photo, small, MetricSettings(min_side=60))["size_ok"] is True


def test_a_row_fits_the_arrow_type():
    photo = _photo()
    row = image_metrics(photo, _jpeg(photo), DEFAULT)
    assert list(row) == [f.name for f in METRICS_TYPE]
    column = pa.array([row, image_metrics(photo[:5, :5], photo[:5, :5], DEFAULT)], type=METRICS_TYPE)
    assert column.to_pylist()[0] == row
    assert column.to_pylist()[1]["ssim"] is None and row["clip_text"] is None


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((8, 8, 3), np.float32),
        np.zeros((8, 8), np.uint8),
        np.zeros((8, 8, 4), np.uint8),
        np.zeros((0, 8, 3), np.uint8),
    ],
)
def test_rejects_what_is_not_an_rgb_uint8_array(bad: np.ndarray):
    good = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError):
        image_metrics(good, bad, DEFAULT)
    with pytest.raises(ValueError):
        image_metrics(bad, good, DEFAULT)


def test_imports_without_ray():
    code = "import sys; sys.modules['ray'] = None; import step1x_batch.judge.metrics"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---- ClipScorer against a tiny random CLIP ----


def _tiny_clip(folder: str, seed: int = 0) -> None:
    """A transformers-loadable CLIP folder made offline: byte-level vocabulary without merges, the
    end token last (as in OpenAI's vocabulary), 32-pixel crops."""
    vocab: dict[str, int] = {}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = CLIPConfig(
        text_config={**sizes, **ids, "vocab_size": len(vocab), "max_position_embeddings": 40},
        vision_config={**sizes, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    crop = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=crop, tokenizer=tokenizer).save_pretrained(folder)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("tiny-clip"))
    _tiny_clip(folder)
    return folder


@pytest.fixture(scope="module")
def scorer(clip_folder: str) -> ClipScorer:
    return ClipScorer(clip_folder)


def _by_hand(folder: str, instructions, inputs, outputs) -> list[tuple[float, float]]:
    """The scores one row at a time through the model's own feature functions."""
    model = CLIPModel.from_pretrained(folder).eval()
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    crop = CLIPImageProcessorPil.from_pretrained(folder)
    found = []
    with torch.no_grad():
        for text, before, after in zip(instructions, inputs, outputs):
            pixels = crop(images=[Image.fromarray(before), Image.fromarray(after)], return_tensors="pt")["pixel_values"]
            images = model.get_image_features(pixel_values=pixels).pooler_output
            words = model.get_text_features(**tokenizer([text], return_tensors="pt")).pooler_output[0]
            img_in, img_out = images[0] / images[0].norm(), images[1] / images[1].norm()
            clip_text = torch.dot(img_out, words) / words.norm()
            direction = torch.dot(img_out - img_in, words) / ((img_out - img_in).norm() * words.norm())
            found.append((float(clip_text), float(direction)))
    return found


def _rows(n: int, seed: int = 5):
    rng = np.random.default_rng(seed)
    words = ["make the sky red", "remove the dog", "add a hat to the man in the photo, please", "x"]
    instructions = [words[i % len(words)] for i in range(n)]
    inputs = [_rng_image(rng, 40 + 3 * i, 50) for i in range(n)]
    outputs = [_rng_image(rng, 48, 36 + 5 * i) for i in range(n)]
    return instructions, inputs, outputs


def test_clip_scores_match_the_model_scored_by_hand(scorer: ClipScorer, clip_folder: str):
    rows = _rows(4)
    found = scorer.scores(*rows)
    expected = _by_hand(clip_folder, *rows)
    assert len(found) == 4
    for got, want in zip(found, expected):
        assert got == pytest.approx(want, abs=1e-5)
    # random weights still tell texts and pictures apart: the test would see a swapped pair
    assert len({round(t, 4) for t, _ in found}) == 4 and len({round(d, 4) for _, d in found}) == 4


def test_clip_scores_do_not_depend_on_the_batch_or_its_chunks(scorer: ClipScorer, monkeypatch):
    instructions, inputs, outputs = _rows(5)
    together = scorer.scores(instructions, inputs, outputs)
    alone = [scorer.scores([t], [i], [o])[0] for t, i, o in zip(instructions, inputs, outputs)]
    monkeypatch.setattr(metrics, "_CLIP_CHUNK", 2)
    chunked = scorer.scores(instructions, inputs, outputs)
    for a, b, c in zip(together, alone, chunked):
        assert a == pytest.approx(b, abs=1e-5) and a == pytest.approx(c, abs=1e-5)


def test_clip_direction_is_zero_for_an_unchanged_output(scorer: ClipScorer):
    instructions, inputs, _ = _rows(2)
    found = scorer.scores(instructions, inputs, [im.copy() for im in inputs])
    assert [d for _, d in found] == [0.0, 0.0]
    assert all(-1.0 <= t <= 1.0 and t != 0.0 for t, _ in found)


def test_clip_scores_refuse_rows_of_unequal_length(scorer: ClipScorer):
    instructions, inputs, outputs = _rows(2)
    with pytest.raises(ValueError):
        scorer.scores(instructions, inputs[:1], outputs)
    with pytest.raises(ValueError):
        scorer.scores(instructions, inputs, [outputs[0], outputs[1].astype(np.float32)])


def test_clip_scores_are_float32_with_pil_resizing_whatever_the_folder_and_install(clip_folder: str, tmp_path):
    """A release saved in float16 still scores in float32, and the resize is PIL's even where
    torchvision is importable (conftest puts the oracles' one on the path): the same numbers on
    every install."""
    CLIPModel.from_pretrained(clip_folder).half().save_pretrained(tmp_path)
    CLIPProcessor.from_pretrained(clip_folder, backend="pil").save_pretrained(tmp_path)
    half = ClipScorer(str(tmp_path))
    assert next(half.model.parameters()).dtype == torch.float32
    assert isinstance(half.processor.image_processor, CLIPImageProcessorPil)
    assert all(math.isfinite(t) and math.isfinite(d) for t, d in half.scores(*_rows(2)))
