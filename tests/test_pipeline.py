"""EditPipeline on the tiny release: loading, determinism, batching, versions, errors as rows."""

import numpy as np
import pytest
import torch

from step1x_batch.editor import EditParams, EditRow
from step1x_batch.models.step1x.pipeline import (
    EditPipeline, Step1XEditor, image_ids, model_size, pack, unpack,
)
from step1x_batch.models.step1x.tiny import TINY_DIT, make_tiny_weights

STEPS, SIZE = 3, 64  # a 64x64 model size keeps every edit well under a second


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return make_tiny_weights(tmp_path_factory.mktemp("tiny-v11"), seed=0)


@pytest.fixture(scope="module")
def release_v10(tmp_path_factory):
    return make_tiny_weights(tmp_path_factory.mktemp("tiny-v10"), seed=0, version="v1.0")


@pytest.fixture(scope="module")
def pipe(release):
    return EditPipeline.from_pretrained(release, dtype="float32")


def picture(seed: int, h: int = 72, w: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], -1)
    return (base + rng.integers(0, 40, (h, w, 3))).clip(0, 255).astype(np.uint8)


def edit(pipe, images, instructions, **kw):
    kw.setdefault("num_steps", STEPS)
    kw.setdefault("size_level", SIZE)
    return pipe.edit(images, instructions, **kw)


def test_model_size_rule():
    assert model_size(1024, 1024, 1024) == (1024, 1024)
    assert model_size(1920, 1080, 1024) == (1360, 768)  # ceil(sqrt(1024^2 * 16/9)) = 1366 -> 1360
    assert model_size(1080, 1920, 512) == (384, 672)
    w, h = model_size(640, 480, 512)
    assert w % 16 == 0 and h % 16 == 0 and abs(w * h - 512**2) / 512**2 < 0.1


def test_pack_unpack_roundtrip_and_ids():
    x = torch.randn(2, 16, 12, 8)
    tokens = pack(x)
    assert tokens.shape == (2, 6 * 4, 64)
    # token (row 1, col 2) holds the 2x2 patch at latent rows 2-3, cols 4-5, channel-major
    torch.testing.assert_close(tokens[0, 1 * 4 + 2].view(16, 2, 2), x[0, :, 2:4, 4:6])
    torch.testing.assert_close(unpack(tokens, 96, 64), x)
    ids = image_ids(1, 96, 64, 1, torch.device("cpu"))
    assert ids.shape == (1, 24, 3) and ids[0, 1 * 4 + 2].tolist() == [1, 1, 2]


def test_loads_release_and_detects_version(release, release_v10, pipe):
    assert pipe.version.name == "v1.1" and pipe.version.ref_axis0 == 1
    assert pipe.dit.params == TINY_DIT
    assert pipe.model_id.startswith("step1x-edit-v1.1/step1x-edit-v1p1-official.safetensors@")
    v10 = EditPipeline.from_pretrained(release_v10, dtype="float32")
    assert v10.version.name == "v1.0" and v10.version.cfg_truncation_t == 1.0
    assert hasattr(v10.connector, "scale_factor")
    forced = EditPipeline.from_pretrained(release, dtype="float32", version="v1.0")
    assert forced.version.name == "v1.0"


def test_output_at_input_size_with_metadata(pipe):
    img = picture(0, 50, 70)
    (r,) = edit(pipe, [img], ["add a hat"], seeds=[5])
    assert r.error_type is None
    assert r.image.shape == (50, 70, 3) and r.image.dtype == np.uint8
    assert (r.width, r.height) == model_size(70, 50, SIZE) and r.seed == 5 and r.batch_size == 1
    assert set(r.timings_ms) == {"encode_text_ms", "encode_image_ms", "denoise_ms", "decode_ms"}
    assert r.image.std() > 1  # not a constant image


def test_same_row_same_bytes(pipe):
    a = edit(pipe, [picture(1)], ["make it snowy"], seeds=[3])[0].image
    b = edit(pipe, [picture(1)], ["make it snowy"], seeds=[3])[0].image
    assert a.tobytes() == b.tobytes()


def test_bf16_same_row_same_bytes(release):
    bf16 = EditPipeline.from_pretrained(release, dtype="bfloat16")
    a = edit(bf16, [picture(1)], ["make it snowy"], seeds=[3])[0].image
    b = edit(bf16, [picture(1)], ["make it snowy"], seeds=[3])[0].image
    assert a.tobytes() == b.tobytes()


def test_seed_instruction_and_posterior_change_pixels(pipe):
    base = edit(pipe, [picture(2)], ["add a hat"], seeds=[1])[0].image.astype(int)
    other_seed = edit(pipe, [picture(2)], ["add a hat"], seeds=[2])[0].image.astype(int)
    other_text = edit(pipe, [picture(2)], ["remove the sky"], seeds=[1])[0].image.astype(int)
    mean = edit(pipe, [picture(2)], ["add a hat"], seeds=[1], posterior_mean=True)[0].image.astype(int)
    for other in (other_seed, other_text, mean):
        assert np.abs(base - other).mean() > 0.05


def test_batch_of_four_equals_four_singles(pipe):
    images = [picture(10 + i) for i in range(4)]
    texts = ["add a hat", "make it night", "it's raining \"hard\"", "变成冬天"]
    seeds = [11, 12, 13, 14]
    negatives = ["", "blurry", "", "low quality"]
    batched = edit(pipe, images, texts, seeds=seeds, negative_prompts=negatives, max_batch_size=4)
    assert all(r.batch_size == 4 for r in batched)
    for i in range(4):
        single = edit(pipe, [images[i]], [texts[i]], seeds=[seeds[i]], negative_prompts=[negatives[i]])[0]
        diff = np.abs(batched[i].image.astype(int) - single.image.astype(int))
        assert diff.max() <= 1, i  # floating-point reordering only


def test_mixed_sizes_grouped(pipe):
    images = [picture(20, 64, 64), picture(21, 48, 96), picture(22, 64, 64)]
    results = edit(pipe, images, ["a", "b", "c"], seeds=[1, 2, 3])
    assert [r.image.shape[:2] for r in results] == [(64, 64), (48, 96), (64, 64)]
    assert [r.batch_size for r in results] == [2, 1, 2]
    alone = edit(pipe, [images[1]], ["b"], seeds=[2])[0]
    assert np.abs(alone.image.astype(int) - results[1].image.astype(int)).max() <= 1


def test_noise_is_drawn_as_the_reference(pipe):
    """With zero steps the output is the decoded initial noise: randn(1,16,H/8,W/8) from the row seed."""
    img = picture(3, 64, 64)
    (r,) = edit(pipe, [img], ["x"], seeds=[42], num_steps=0)
    noise = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(42), dtype=torch.float32)
    with torch.inference_mode():
        expected = pipe.vae.decode(noise).clamp(-1, 1).mul(0.5).add(0.5).mul(255).to(torch.uint8)
    assert np.array_equal(r.image, expected[0].permute(1, 2, 0).numpy())


def test_v10_and_v11_differ_on_same_weights(release, pipe):
    v10 = EditPipeline.from_pretrained(release, dtype="float32", version="v1.0")
    a = edit(pipe, [picture(4)], ["add a hat"], seeds=[1])[0].image.astype(int)
    b = edit(v10, [picture(4)], ["add a hat"], seeds=[1])[0].image.astype(int)
    assert np.abs(a - b).mean() > 0.05


def test_non_finite_output_is_a_row_error(release):
    broken = EditPipeline.from_pretrained(release, dtype="float32")
    with torch.no_grad():
        broken.dit.final_layer.linear.bias.fill_(float("nan"))
    results = edit(broken, [picture(5), picture(6)], ["a", "b"], seeds=[1, 2])
    assert [r.error_type for r in results] == ["non_finite_output"] * 2
    assert all(r.image is None and "seed" in r.error_message for r in results)


def test_editor_groups_rows_by_parameters(pipe):
    editor = Step1XEditor(pipe, max_batch_size=4)
    p1 = EditParams(num_steps=STEPS, size_level=SIZE)
    p2 = EditParams(num_steps=STEPS, size_level=SIZE, guidance_scale=3.0)
    rows = [EditRow(picture(7), "a", 1, p1), EditRow(picture(8), "b", 2, p2), EditRow(picture(9), "c", 3, p1)]
    outs = editor.edit_rows(rows)
    assert [o.seed for o in outs] == [1, 2, 3] and all(o.error_type is None for o in outs)
    direct = edit(pipe, [picture(8)], ["b"], seeds=[2], guidance_scale=3.0)[0]
    assert np.abs(outs[1].image.astype(int) - direct.image.astype(int)).max() <= 1
    assert editor.model_id == pipe.model_id


def test_cli_make_tiny_weights_and_edit(tmp_path):
    from PIL import Image

    from step1x_batch.cli import main

    assert main(["make-tiny-weights", str(tmp_path / "w"), "--seed", "1"]) == 0
    Image.fromarray(picture(0)).save(tmp_path / "in.png")
    out = tmp_path / "out.png"
    assert main(["edit", "--weights", str(tmp_path / "w"), "--image", str(tmp_path / "in.png"), "--instruction",
                 "add a hat", "--out", str(out), "--steps", "2", "--size-level", "64"]) == 0
    assert Image.open(out).size == (96, 72)


def test_placeholder_text_in_instruction_is_a_row_error(pipe):
    results = edit(pipe, [picture(1), picture(2)], ["add <|image_pad|> here", "add a hat"], seeds=[1, 2])
    assert results[0].error_type == "invalid_instruction" and results[0].image is None
    assert "placeholder" in results[0].error_message
    assert results[1].error_type is None and results[1].image.shape == (72, 96, 3)


def test_load_editor_stages_weights_from_object_storage(release, s3_bucket, storage_options, tmp_path):
    from step1x_batch.editor import EditorSpec, load_editor
    from step1x_batch.storage import filesystem

    fs, root = filesystem(s3_bucket, storage_options)
    fs.put(str(release) + "/", f"{root}/releases/tiny/", recursive=True)
    spec = EditorSpec(
        weights=f"{s3_bucket}/releases/tiny/", weights_cache_dir=str(tmp_path / "cache"),
        weights_storage=storage_options, dtype="float32",
    )
    editor = load_editor(spec)
    staged = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert len(staged) == 1 and (staged[0] / "vae.safetensors").read_bytes() == (release / "vae.safetensors").read_bytes()
    row = EditRow(picture(1), "add a hat", 3, EditParams(num_steps=STEPS, size_level=SIZE))
    (out,) = editor.edit_rows([row])
    local_editor = Step1XEditor(EditPipeline.from_pretrained(release, dtype="float32"))
    assert out.image.tobytes() == local_editor.edit_rows([row])[0].image.tobytes()
    assert editor.model_id == local_editor.model_id  # identity of the weights, not of the cache path


def test_fp8_file_keeps_fp8_storage_with_identical_pixels(release, tmp_path):
    """The community FP8 file: weights stay fp8 (half the memory), pixels equal upcasting at load."""
    import shutil

    from safetensors.torch import load_file, save_file

    fp8_dir = tmp_path / "fp8"
    shutil.copytree(release, fp8_dir)
    dit_file = fp8_dir / "step1x-edit-v1p1-official.safetensors"
    sd = load_file(dit_file)
    save_file({k: (v.to(torch.float8_e4m3fn) if v.ndim == 2 else v) for k, v in sd.items()},
              str(fp8_dir / "step1x-edit-i1258-FP8.safetensors"))
    dit_file.unlink()
    kept = EditPipeline.from_pretrained(fp8_dir, dtype="bfloat16")
    upcast = EditPipeline.from_pretrained(fp8_dir, dtype="bfloat16", fp8_storage=False)
    w = kept.dit.double_blocks[0].img_attn.qkv.weight
    assert w.dtype == torch.float8_e4m3fn
    assert upcast.dit.double_blocks[0].img_attn.qkv.weight.dtype == torch.bfloat16
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())
    assert size(kept.dit) < 0.6 * size(upcast.dit)
    a = edit(kept, [picture(1)], ["add a hat"], seeds=[3])[0].image
    b = edit(upcast, [picture(1)], ["add a hat"], seeds=[3])[0].image
    assert a.tobytes() == b.tobytes()


def test_too_thin_image_is_a_row_error(pipe):
    results = edit(pipe, [picture(1, 4, 400), picture(2)], ["a", "b"], seeds=[1, 2])
    assert results[0].error_type == "unsupported_size" and "too thin" in results[0].error_message
    assert results[1].error_type is None
