"""Step1X-Edit on the tiny release: loading, determinism, batching, versions, errors as rows, and
the family's split into CPU prepare, GPU engine and finish."""

import numpy as np
import pytest
import torch

from step1x_batch.models.base import EditParams, EditRequest, ModelSpec, Prepared, edit_prepared
from step1x_batch.models.determinism import deterministic_edit
from step1x_batch.models.step1x.family import Step1XFamily
from step1x_batch.models.step1x.pipeline import Step1XEditPipeline, image_ids, pack, unpack
from step1x_batch.models.step1x.prepare import model_size
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
    return Step1XEditPipeline.from_pretrained(release, dtype="float32")


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
    assert pipe.engine.version.name == "v1.1" and pipe.engine.version.ref_axis0 == 1
    assert pipe.engine.dit.params == TINY_DIT
    assert pipe.engine.model_id.startswith("step1x-edit-v1.1/step1x-edit-v1p1-official.safetensors@")
    v10 = Step1XEditPipeline.from_pretrained(release_v10, dtype="float32")
    assert v10.engine.version.name == "v1.0" and v10.engine.version.cfg_truncation_t == 1.0
    assert hasattr(v10.engine.connector, "scale_factor")
    forced = Step1XEditPipeline.from_pretrained(release, dtype="float32", version="v1.0")
    assert forced.engine.version.name == "v1.0"


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
    bf16 = Step1XEditPipeline.from_pretrained(release, dtype="bfloat16")
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
    with torch.inference_mode(), deterministic_edit("cpu"):  # the thread count the pipeline decodes with
        expected = pipe.engine.vae.decode(noise).clamp(-1, 1).mul(0.5).add(0.5).mul(255).to(torch.uint8)
    assert np.array_equal(r.image, expected[0].permute(1, 2, 0).numpy())


def test_v10_and_v11_differ_on_same_weights(release, pipe):
    v10 = Step1XEditPipeline.from_pretrained(release, dtype="float32", version="v1.0")
    a = edit(pipe, [picture(4)], ["add a hat"], seeds=[1])[0].image.astype(int)
    b = edit(v10, [picture(4)], ["add a hat"], seeds=[1])[0].image.astype(int)
    assert np.abs(a - b).mean() > 0.05


def test_non_finite_output_is_a_row_error(release):
    broken = Step1XEditPipeline.from_pretrained(release, dtype="float32")
    with torch.no_grad():
        broken.engine.dit.final_layer.linear.bias.fill_(float("nan"))
    results = edit(broken, [picture(5), picture(6)], ["a", "b"], seeds=[1, 2])
    assert [r.error_type for r in results] == ["non_finite_output"] * 2
    assert all(r.image is None and "seed" in r.error_message for r in results)


def family(release, **options) -> Step1XFamily:
    return Step1XFamily(ModelSpec("step1x", options, str(release), dtype="float32"))


def test_family_prepares_on_cpu_and_the_engine_only_runs_the_model(release, pipe, monkeypatch):
    """The split the job runs: prepare (resize, processor, tokens, positions) -> Prepared bytes ->
    engine -> finish (resize back). The engine call resizes nothing, tokenizes nothing, and runs
    the vision tower once per row (not once per prompt)."""
    from PIL import Image

    fam = family(release)
    prepare = fam.preparer(release)
    p1 = EditParams(num_steps=STEPS, size_level=SIZE)
    p2 = EditParams(num_steps=STEPS, size_level=SIZE, guidance_scale=3.0)
    requests = [EditRequest([picture(7)], "a", 1, p1), EditRequest([picture(8)], "b", 2, p2),
                EditRequest([picture(9)], "c", 3, p1)]
    rows = [Prepared.from_bytes(prepare(r).to_bytes()) for r in requests]  # as they cross stages
    assert rows[0].key == rows[2].key != rows[1].key  # guidance splits the batch
    assert (rows[0].width, rows[0].height) == model_size(96, 72, SIZE)
    assert rows[0].arrays["ref"].shape == (rows[0].height, rows[0].width, 3)

    calls = {"resize": 0, "tokenize": 0, "vision_images": 0}
    real_resize = Image.Image.resize
    monkeypatch.setattr(Image.Image, "resize", lambda *a, **k: (calls.__setitem__("resize", calls["resize"] + 1), real_resize(*a, **k))[1])
    tok_cls = type(pipe.prompts.prompts.tokenizer)
    real_call = tok_cls.__call__
    monkeypatch.setattr(tok_cls, "__call__", lambda *a, **k: (calls.__setitem__("tokenize", calls["tokenize"] + 1), real_call(*a, **k))[1])
    visual = pipe.engine.encoder.model.model.visual
    hook = visual.register_forward_pre_hook(
        lambda m, args, kwargs: calls.__setitem__("vision_images", calls["vision_images"] + len(kwargs.get("grid_thw", args[1] if len(args) > 1 else []))),
        with_kwargs=True,
    )
    try:
        outs = edit_prepared(pipe.engine, rows, max_batch_size=4)
    finally:
        hook.remove()
    assert calls == {"resize": 0, "tokenize": 0, "vision_images": 3}, calls
    assert [o.batch_size for o in outs] == [2, 1, 2] and all(o.error_type is None for o in outs)
    monkeypatch.undo()
    finished = fam.finish(outs[1].image, [(96, 72)])
    direct = edit(pipe, [picture(8)], ["b"], seeds=[2], guidance_scale=3.0)[0]
    assert finished.shape == (72, 96, 3)
    assert np.abs(finished.astype(int) - direct.image.astype(int)).max() <= 1


def test_family_options_and_model_id(release):
    base = family(release)
    assert base.max_images == 1 and base.defaults == EditParams(28, 6.0, 1024, "")
    assert base.model_id() == f"step1x-edit[auto]:auto:float32:sample:{release}"
    assert (family(release, version="v1.0", posterior_mean=True).model_id()
            == f"step1x-edit[auto]:v1.0:float32:mean:{release}")
    # the released pipeline followed changes pixels: switching it redoes rows
    ids = {family(release, variant=v).model_id() for v in (None, "step1x", "realrestorer")}
    assert len(ids) == 3 and f"step1x-edit[realrestorer]:auto:float32:sample:{release}" in ids
    with pytest.raises(Exception, match="version"):
        family(release, version="v2")
    with pytest.raises(Exception, match="variant"):
        family(release, variant="flux")


def test_output_is_resized_back_with_the_released_codes_filter(release, pipe):
    """Both releases return ``Image.resize(input size)`` with Pillow's default filter (bicubic),
    not the LANCZOS of the way in (Step1X-Edit inference.py output_process_image; RealRestorer
    pipeline_realrestorer.py)."""
    from PIL import Image

    fam = family(release)
    request = EditRequest([picture(8)], "b", 2, EditParams(num_steps=STEPS, size_level=SIZE))
    row = fam.preparer(release)(request)
    assert (row.width, row.height) != (96, 72)
    (out,) = edit_prepared(pipe.engine, [row], max_batch_size=1)
    released = np.asarray(Image.fromarray(out.image).resize((96, 72)))
    assert np.array_equal(fam.finish(out.image, [(96, 72)]), released)
    assert np.array_equal(edit(pipe, [picture(8)], ["b"], seeds=[2])[0].image, released)
    lanczos = np.asarray(Image.fromarray(out.image).resize((96, 72), Image.Resampling.LANCZOS))
    assert np.abs(released.astype(int) - lanczos.astype(int)).max() > 1


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


def test_weights_staged_from_object_storage(release, pipe, s3_bucket, storage_options, tmp_path):
    """What the job's stages do on a node: only the prepare files for CPU prepare, the whole
    release for the engine; the edit equals the local release's."""
    from step1x_batch.io.storage import filesystem
    from step1x_batch.io.weights import WeightsSource

    fs, root = filesystem(s3_bucket, storage_options)
    fs.put(str(release) + "/", f"{root}/releases/tiny/", recursive=True)
    source = WeightsSource(f"{s3_bucket}/releases/tiny/", storage_options, str(tmp_path / "cache"))
    fam = family(f"{s3_bucket}/releases/tiny/")
    small = source.local_folder(fam.prepare_files)
    assert not list(small.rglob("*.safetensors")) and (small / "Qwen2.5-VL-7B-Instruct" / "tokenizer.json").is_file()
    full = source.local_folder()
    assert full != small and (full / "vae.safetensors").read_bytes() == (release / "vae.safetensors").read_bytes()
    request = EditRequest([picture(1)], "add a hat", 3, EditParams(num_steps=STEPS, size_level=SIZE))
    (out,) = edit_prepared(fam.load(full, "cpu"), [fam.preparer(small)(request)], 4)
    local = edit(pipe, [picture(1)], ["add a hat"], seeds=[3])[0]
    assert fam.finish(out.image, [(96, 72)]).tobytes() == local.image.tobytes()


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
    kept = Step1XEditPipeline.from_pretrained(fp8_dir, dtype="bfloat16")
    upcast = Step1XEditPipeline.from_pretrained(fp8_dir, dtype="bfloat16", fp8_storage=False)
    w = kept.engine.dit.double_blocks[0].img_attn.qkv.weight
    assert w.dtype == torch.float8_e4m3fn
    assert upcast.engine.dit.double_blocks[0].img_attn.qkv.weight.dtype == torch.bfloat16
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())
    assert size(kept.engine.dit) < 0.6 * size(upcast.engine.dit)
    a = edit(kept, [picture(1)], ["add a hat"], seeds=[3])[0].image
    b = edit(upcast, [picture(1)], ["add a hat"], seeds=[3])[0].image
    assert a.tobytes() == b.tobytes()


def test_too_thin_image_is_a_row_error(pipe):
    results = edit(pipe, [picture(1, 4, 400), picture(2)], ["a", "b"], seeds=[1, 2])
    assert results[0].error_type == "unsupported_size" and "too thin" in results[0].error_message
    assert results[1].error_type is None


BF16_ROWS = [  # different prompt lengths, one with a negative prompt
    ("add a hat", ""),
    ("make it night and add a big yellow moon over the hills", ""),
    ("it's raining \"hard\"", "blurry, low quality"),
    ("变成冬天", ""),
]


@pytest.mark.parametrize("invariant", [True, False])
def test_bf16_row_alone_equals_row_in_a_batch_of_four(release, invariant):
    """Batch invariance in the production dtype: each of 4 rows edited alone and inside a batch of
    4 gives the same bytes (switch on). Off, the batch is one padded text batch and the DiT runs
    the rows given: recorded, not asserted, to show what the switch buys."""
    pipe = Step1XEditPipeline.from_pretrained(release, dtype="bfloat16", batch_invariant=invariant, max_batch_size=4)
    images = [picture(30 + i) for i in range(4)]
    texts, negatives = [t for t, _ in BF16_ROWS], [n for _, n in BF16_ROWS]
    seeds = [21, 22, 23, 24]
    batched = edit(pipe, images, texts, seeds=seeds, negative_prompts=negatives)
    assert all(r.batch_size == 4 for r in batched)
    diffs = []
    for i in range(4):
        alone = edit(pipe, [images[i]], [texts[i]], seeds=[seeds[i]], negative_prompts=[negatives[i]])[0]
        assert alone.batch_size == 1
        diffs.append(int(np.abs(alone.image.astype(int) - batched[i].image.astype(int)).max()))
        if invariant:
            assert alone.image.tobytes() == batched[i].image.tobytes(), f"row {i}"
    print(f"bf16, batch_invariant={invariant}: max |alone - in batch of 4| per row {diffs}")


def test_bf16_prompt_embeddings_are_those_of_the_prompt_alone(pipe_bf16):
    """Each prompt's embeddings inside a batch are bit-identical to encoding that prompt alone
    (batch 1), as the released code encodes (cond and uncond separately)."""
    from step1x_batch.models.step1x.conditioner import encode_prompts

    prompts = pipe_bf16.prompts
    rows = [prompts.prepare(picture(40 + i, 64, 64), text, neg) for i, (text, neg) in enumerate(BF16_ROWS)]
    embeds, mask = encode_prompts(pipe_bf16.engine.encoder, rows, prompts.prefix_drop)
    for i, row in enumerate(rows):
        one, one_mask = encode_prompts(pipe_bf16.engine.encoder, [row], prompts.prefix_drop)
        assert torch.equal(one[0], embeds[i]) and torch.equal(one[1], embeds[len(rows) + i]), i
        assert torch.equal(one_mask[0], mask[i])
    # and a padded batch (the switch off) is not: the reason for the switch
    pipe_bf16.engine.encoder.batch_invariant = False
    try:
        padded, _ = encode_prompts(pipe_bf16.engine.encoder, rows, prompts.prefix_drop)
    finally:
        pipe_bf16.engine.encoder.batch_invariant = True
    moved = max(float((padded[i] - embeds[i]).abs().max()) for i in range(len(rows)))
    print(f"bf16 prompt embeddings in a padded batch move by up to {moved:.3g}")


@pytest.fixture(scope="module")
def pipe_bf16(release):
    return Step1XEditPipeline.from_pretrained(release, dtype="bfloat16")


def test_blend_scale_interpolates_between_two_instructions(release):
    """blend_scale 0 is exactly the blend_instruction's edit, 1 exactly the instruction's (bf16:
    the production dtype, where a sloppy interpolation would show)."""
    fam = Step1XFamily(ModelSpec("step1x", {}, str(release), "bfloat16"))
    prepare, engine = fam.preparer(release), fam.load(release, "cpu")

    def edited(instruction, blend=None, scale=1.0):
        params = EditParams(num_steps=STEPS, size_level=SIZE, blend_instruction=blend, blend_scale=scale)
        (out,) = edit_prepared(engine, [prepare(EditRequest([picture(5)], instruction, 3, params))], 4)
        return out.image

    red, blue = edited("make it red"), edited("make it blue")
    assert red.tobytes() != blue.tobytes()
    assert edited("make it red", "make it blue", 0.0).tobytes() == blue.tobytes()
    assert edited("make it red", "make it blue", 1.0).tobytes() == red.tobytes()
    assert len({edited("make it red", "make it blue", s).tobytes() for s in (0.25, 0.5, 1.5)} | {red.tobytes()}) == 4


def test_family_load_merges_a_step1x_format_lora(release, tmp_path):
    """The family's load merges model.adapters into the DiT: W + scale * alpha / rank * up @ down."""
    from safetensors.torch import save_file

    from step1x_batch.models.base import AdapterSpec

    base = family(release).load(release, "cpu")
    w = base.dit.double_blocks[0].img_attn.qkv.weight
    rank, alpha, scale = 2, 1.0, 0.5
    down = torch.randn(rank, w.shape[1], generator=torch.Generator().manual_seed(0))
    up = torch.randn(w.shape[0], rank, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down,
               "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up,
               "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(alpha)}, str(path))
    merged = family(release).load(release, "cpu", [AdapterSpec(path, scale, "step1x")])
    expected = w.float() + scale * alpha / rank * (up @ down)
    torch.testing.assert_close(merged.dit.double_blocks[0].img_attn.qkv.weight, expected.to(w.dtype))
    assert torch.equal(merged.dit.double_blocks[1].img_attn.qkv.weight, base.dit.double_blocks[1].img_attn.qkv.weight)


def test_the_old_pipeline_name_is_an_alias():
    from step1x_batch.models.step1x.pipeline import EditPipeline

    assert EditPipeline is Step1XEditPipeline  # kept for one release
