"""RealRestorer follows its own released pipeline, not Step1X-Edit's (issue 23), on a tiny bundle
in the released layout. Each oracle is written here from RealRestorer's released code
(github.com/yfyang007/RealRestorer: ``pipeline_realrestorer.py``, ``autoencoder_kl_realrestorer.py``,
``scheduling_realrestorer_flow_match.py``, ``inference.py``) and checked against the variant;
the ``step1x`` variant on the same weights shows each difference is real.

``benchmarks/realrestorer_parity.py`` runs the released pipeline itself beside this one.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from step1x_batch.models.base import UNSUPPORTED_SIZE, EditParams, EditRequest, edit_prepared
from step1x_batch.models.step1x.conditioner import IMAGE_PAD, load_prefix
from step1x_batch.models.step1x.pipeline import Step1XEditPipeline
from step1x_batch.models.step1x.prepare import prepare_row
from step1x_batch.models.step1x.conditioner import load_prompts
from step1x_batch.models.step1x.sampling import denoise, get_schedule, released_step
from step1x_batch.models.step1x.tiny import make_tiny_weights

STEPS, SIZE = 2, 64


def picture(seed: int, h: int = 72, w: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], -1)
    return (base + rng.integers(0, 40, (h, w, 3))).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_tiny_weights(tmp_path_factory.mktemp("rr"), seed=0, layout="realrestorer")


@pytest.fixture(scope="module")
def rr(bundle):
    return Step1XEditPipeline.from_pretrained(bundle, dtype="float32", max_batch_size=1)


@pytest.fixture(scope="module")
def s1x(bundle):
    return Step1XEditPipeline.from_pretrained(bundle, dtype="float32", max_batch_size=1, variant="step1x")


# --- the released code's text side, written from pipeline_realrestorer.py -------------------------

def released_split_string(s: str) -> list[str]:
    """``RealRestorerPipeline._split_string``."""
    s = s.replace("'", '"').replace("“", '"').replace("”", '"')
    result, in_quotes, temp = [], False, ""
    for idx, char in enumerate(s):
        if char == '"' and idx > 155:
            temp += char
            if not in_quotes:
                result.append(temp)
                temp = ""
            in_quotes = not in_quotes
            continue
        if in_quotes:
            result.append("“" + char + "”")
        else:
            temp += char
    if temp:
        result.append(temp)
    return result


def released_token_ids(tok, instruction: str, num_image_tokens: int) -> list[int]:
    """``_get_qwenvl_embeds`` for an edit: the chat template with ``add_vision_id=True``, the
    quote-split re-tokenization, the processor's (image-expanded) ids up to ``<|vision_end|>``."""
    messages = [{"role": "user", "content": [
        {"type": "text", "text": load_prefix()}, {"type": "image", "image": "ref"}, {"type": "text", "text": instruction},
    ]}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, add_vision_id=True)
    quote_open, quote_close = tok.convert_tokens_to_ids(tok.tokenize("“")), tok.convert_tokens_to_ids(tok.tokenize("”"))
    new = []
    for piece in released_split_string(text):
        ids = tok(piece, add_special_tokens=False)["input_ids"]
        if ids[0] == quote_open[0] and ids[-1] == quote_close[0]:
            ids = ids[1:-1]
        new += ids
    old = tok(text.replace(IMAGE_PAD, IMAGE_PAD * num_image_tokens), add_special_tokens=False)["input_ids"]
    vision_end = tok.convert_tokens_to_ids("<|vision_end|>")
    return old[: old.index(vision_end)] + new[new.index(vision_end):]


def test_token_ids_equal_the_released_pipelines_with_the_vision_id(bundle):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bundle / "processor"), local_files_only=True)
    rr, s1x = load_prompts(bundle), load_prompts(bundle, "step1x")
    assert rr.variant.name == "realrestorer" and s1x.variant.name == "step1x"
    vision_id = tok("Picture 1: ", add_special_tokens=False)["input_ids"]
    for instruction in ("Please remove noise from the image.", 'Replace the sign\'s text with "OPEN" please', ""):
        want = released_token_ids(tok, instruction, 16)
        assert rr.prompts.input_ids(instruction, 16) == want
        assert "Picture 1: " in tok.decode(want)
        # Step1X-Edit's ids lack it (its pinned transformers dropped add_vision_id)
        assert "Picture 1: " not in tok.decode(s1x.prompts.input_ids(instruction, 16))
        assert len(want) - len(s1x.prompts.input_ids(instruction, 16)) >= len(vision_id) - 1
    # both drop the same prefix (the released code hard-codes 217 for Qwen's tokenizer either way)
    assert rr.prefix_drop == s1x.prefix_drop


def test_prepared_rows_carry_the_released_pixels_and_ids(bundle):
    """The VLM image: rounding back to PIL (the uint8 image itself), ``_prepare_qwen_image``'s
    bicubic resize to multiples of 28, then the torchvision processor with the bundle's limits."""
    from step1x_batch.models.qwen_vl.processor import build_image_processor, image_processor_config

    prompts = load_prompts(bundle)
    img = picture(4)
    row = prepare_row(prompts, EditRequest([img], "Please dehaze the image", 1, EditParams(STEPS, 3.0, SIZE, "")))
    ref = row.arrays["ref"]  # LANCZOS to the model size, as _resize_image
    assert np.array_equal(ref, np.asarray(Image.fromarray(img).resize((row.width, row.height), Image.LANCZOS)))
    as_pil = Image.fromarray((torch.from_numpy(np.array(ref)).float().div(255).clamp(0, 1).numpy() * 255.0).round().astype(np.uint8))
    w, h = as_pil.size
    qwen = as_pil.resize((max(28, round(w / 28) * 28), max(28, round(h / 28) * 28)), Image.BICUBIC)
    cfg = image_processor_config(bundle / "processor")
    fast = build_image_processor(bundle / "processor", backend="torchvision")
    assert (fast.min_pixels, fast.max_pixels) == (cfg["min_pixels"], cfg["max_pixels"])
    want = fast(images=[qwen])
    assert np.array_equal(row.arrays["pixel_values"], want["pixel_values"])
    assert row.arrays["grid"].tolist() == want["image_grid_thw"][0].tolist()
    n = int(np.prod(row.arrays["grid"])) // 4
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bundle / "processor"), local_files_only=True)
    ids = row.arrays["cond_ids"].tolist()
    assert ids == released_token_ids(tok, "Please dehaze the image", n)[: len(ids)]


def test_the_vlm_images_float_roundtrip_gives_the_uint8_image_back_either_way():
    """RealRestorer rounds, Step1X-Edit truncates, on the way back to PIL: for x / 255 * 255 in
    float32 both give every level back, so only the output's conversion differs."""
    from step1x_batch.models.step1x.conditioner import float_roundtrip_uint8

    levels = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, axis=2)
    x = torch.from_numpy(levels).float().div(255)
    assert np.array_equal((x.numpy() * 255.0).round().astype(np.uint8), levels)
    assert np.array_equal(float_roundtrip_uint8(levels), levels)


def capture_decoded(engine, monkeypatch) -> list:
    seen = []
    decode = engine.vae.decode

    def spy(z):
        out = decode(z)
        seen.append(out.detach().clone())
        return out

    monkeypatch.setattr(engine.vae, "decode", spy)
    return seen


def test_output_pixels_round_as_the_released_code(rr, s1x, monkeypatch):
    """``_tensor_to_pil``: clamp, * 255, round; Step1X-Edit's ``to_pil_image`` truncates."""
    request = EditRequest([picture(2)], "Please remove noise from the image.", 5, EditParams(STEPS, 3.0, SIZE, ""))
    for pipe, convert in ((rr, torch.round), (s1x, torch.trunc)):
        seen = capture_decoded(pipe.engine, monkeypatch)
        (out,) = edit_prepared(pipe.engine, [prepare_row(pipe.prompts, request)], 1)
        unit = seen[0].clamp(-1, 1).mul(0.5).add(0.5)[0].permute(1, 2, 0)
        want = convert(unit.clamp(0, 1) * 255.0).to(torch.uint8).numpy()
        assert np.array_equal(out.image, want)
        other = (torch.trunc if convert is torch.round else torch.round)(unit.clamp(0, 1) * 255.0).to(torch.uint8)
        assert not np.array_equal(out.image, other.numpy())  # the choice shows on these pixels
        monkeypatch.undo()


def test_vae_runs_in_the_released_dtype(bundle):
    """bf16 run: RealRestorer's bundle loader casts the VAE to bf16 and runs it outside autocast;
    Step1X-Edit keeps it float32 and encodes under bf16 autocast."""
    request = EditRequest([picture(3)], "Please dehaze the image", 1, EditParams(STEPS, 3.0, SIZE, ""))
    for variant, dtype, autocast in (("realrestorer", torch.bfloat16, False), ("step1x", torch.float32, True)):
        pipe = Step1XEditPipeline.from_pretrained(bundle, dtype="bfloat16", max_batch_size=1, variant=variant)
        vae = pipe.engine.vae
        assert {p.dtype for p in vae.parameters()} == {dtype}
        calls = []
        hooks = [m.register_forward_pre_hook(
            lambda m, args, name=name: calls.append((name, args[0].dtype, torch.is_autocast_enabled("cpu"))))
            for name, m in (("encoder", vae.encoder), ("decoder", vae.decoder))]
        try:
            (out,) = edit_prepared(pipe.engine, [prepare_row(pipe.prompts, request)], 1)
        finally:
            for h in hooks:
                h.remove()
        assert out.error_type is None
        assert calls == [("encoder", dtype, autocast), ("decoder", dtype, False)], (variant, calls)


def released_size(width: int, height: int, img_size: int) -> tuple[int, int]:
    """``RealRestorerPipeline._resize_image``'s size."""
    ratio = width / height
    if width > height:
        w = math.ceil(math.sqrt(img_size * img_size * ratio))
        h = math.ceil(w / ratio)
    else:
        h = math.ceil(math.sqrt(img_size * img_size / ratio))
        w = math.ceil(h * ratio)
    return max(16, w // 16 * 16), max(16, h // 16 * 16)


def test_a_14_px_side_is_clamped_to_16(rr, s1x):
    thin = picture(5, h=14, w=300)
    assert released_size(300, 14, SIZE) == (288, 16)
    (result,) = rr.edit([thin], ["Please remove the rain from the image and restore its clarity."],
                        seeds=[1], num_steps=STEPS, guidance_scale=3.0, size_level=SIZE)
    assert result.error_type is None and (result.width, result.height) == (288, 16)
    assert result.image.shape == (14, 300, 3)
    (refused,) = s1x.edit([thin], ["Please remove the rain"], seeds=[1], num_steps=STEPS, size_level=SIZE)
    assert refused.error_type == UNSUPPORTED_SIZE and refused.image is None


def test_processor_limits_come_from_the_bundle(bundle, tmp_path):
    """``AutoProcessor.from_pretrained(processor/)`` with no min/max: the folder's limits, in either
    layout (``preprocessor_config.json``, or transformers 5's ``processor_config.json``);
    Step1X-Edit builds its processor with 256*28*28 / 324*28*28."""
    from step1x_batch.models.step1x.conditioner import MAX_PIXELS, MIN_PIXELS

    folder = tmp_path / "rr"
    shutil.copytree(bundle / "processor", folder / "processor")
    shutil.copytree(bundle / "text_encoder", folder / "text_encoder", ignore=shutil.ignore_patterns("*.safetensors"))
    (folder / "model_index.json").write_text("{}")
    flat = folder / "processor" / "preprocessor_config.json"
    cfg = json.loads(flat.read_text())
    cfg.update(min_pixels=8 * 28 * 28, max_pixels=12 * 28 * 28)
    flat.write_text(json.dumps(cfg))
    img = picture(6, h=96, w=128)

    def grid(folder, variant=None):
        prompts = load_prompts(folder, variant)
        p = prompts.image_processor  # the torchvision copy has min/max_pixels, transformers' PIL one a size
        limits = (p.min_pixels, p.max_pixels) if variant is None else (p.size["shortest_edge"], p.size["longest_edge"])
        row = prepare_row(prompts, EditRequest([img], "x", 1, EditParams(STEPS, 3.0, 128, "")))
        return limits, row.arrays["grid"].tolist()

    # model size 144x96 -> qwen_vl_utils 140x84 (11,760 px) -> capped at 9,408 px: 112x56, 8x4 patches
    assert grid(folder) == ((8 * 28 * 28, 12 * 28 * 28), [1, 4, 8])
    limits, step1x_grid = grid(folder, "step1x")  # raised to at least 256 merged tokens
    assert limits == (MIN_PIXELS, MAX_PIXELS) and step1x_grid[1] * step1x_grid[2] >= 256 * 4
    # transformers 5 writes processor_config.json with the image processor nested
    flat.unlink()
    nested = {"image_processor": cfg, "processor_class": "Qwen2_5_VLProcessor"}
    (folder / "processor" / "processor_config.json").write_text(json.dumps(nested))
    assert grid(folder) == ((8 * 28 * 28, 12 * 28 * 28), [1, 4, 8])


def released_scheduler_step(model_output, timestep, sample, timesteps):
    """``RealRestorerFlowMatchScheduler.step``."""
    timestep = torch.tensor(float(timestep), dtype=sample.dtype)
    values = torch.tensor(timesteps, dtype=torch.float32).to(sample.dtype)
    index = int(torch.argmin(torch.abs(values - timestep.reshape(()))).item())
    return sample + (values[min(index + 1, values.numel() - 1)] - timestep) * model_output


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_euler_step_as_the_released_scheduler(dtype):
    schedule = get_schedule(50, 8192)  # 50 steps at 1448^2: two times share a bf16 value
    rounded = torch.tensor(schedule).to(torch.bfloat16)
    assert rounded[3] == rounded[4] and len(set(rounded.tolist())) == len(schedule) - 1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 6, 8, generator=g).to(dtype)
    v = torch.randn(1, 6, 8, generator=g).to(dtype)
    for t in schedule[:-1]:
        assert torch.equal(released_step(x, v, t, torch.tensor(schedule)), released_scheduler_step(v, t, x, schedule))
    if dtype == torch.bfloat16:  # both steps from the shared value go nowhere; the one after moves
        assert torch.equal(released_step(x, v, schedule[3], torch.tensor(schedule)), x)
        assert torch.equal(released_step(x, v, schedule[4], torch.tensor(schedule)), x)
        assert not torch.equal(released_step(x, v, schedule[5], torch.tensor(schedule)), x)
        assert not torch.equal(x + (schedule[5] - schedule[4]) * v, x)  # Step1X-Edit's step moves
    else:  # in float32 the two steps are the same numbers
        for t, t_next in zip(schedule[:-1], schedule[1:]):
            assert torch.equal(released_step(x, v, t, torch.tensor(schedule)), x + (t_next - t) * v)

    def velocity(x2, t):
        return torch.tanh(x2 * 3) * (1 + t[:, None, None])

    loop = denoise(velocity, x, schedule[:6] + [0.0], 3.0, 0.93, step_as_released=True)
    want = x
    for t in (schedule[:6] + [0.0])[:-1]:
        pred = velocity(torch.cat((want, want)), torch.full((2,), t, dtype=dtype))
        c, u = pred.chunk(2)
        d = c - u
        if t > 0.93:
            n = torch.norm(d, dim=2, keepdim=True)
            comb = u + 3.0 * d / torch.where(n > 1.0, torch.pow(n, 0.4), torch.where(n < 1.0, torch.ones_like(n), n))
        else:
            comb = u + 3.0 * d
        want = released_scheduler_step(comb, t, want, schedule[:6] + [0.0])
    assert torch.equal(loop, want)


def test_autocast_only_on_cuda(rr):
    engine = rr.engine
    assert not torch.is_autocast_enabled("cpu")
    with engine._autocast():
        assert not torch.is_autocast_enabled("cpu")
    cuda_engine = type("E", (), {"variant": engine.variant, "device": torch.device("cuda"), "dtype": torch.float32})
    ctx = type(engine)._autocast(cuda_engine)
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16 and ctx.device == "cuda"


def test_qk_norm_and_text_attention_as_the_released_code(rr, s1x):
    """QK RMSNorm: RealRestorer's plain-PyTorch ``rms_norm`` multiplies the weight after casting
    back (liger_kernel, Step1X-Edit's fused float32 path, is not in its requirements); its text
    encoder runs SDPA, so masked (``!``) queries attend instead of being zeroed."""
    from step1x_batch.models.step1x.layers import RMSNorm

    norms = [m for m in rr.engine.dit.modules() if isinstance(m, RMSNorm)]
    assert norms and not any(m.weight_in_fp32 for m in norms)
    assert all(m.weight_in_fp32 for m in s1x.engine.dit.modules() if isinstance(m, RMSNorm))
    norm = RMSNorm(16)
    with torch.no_grad():
        norm.scale.copy_(1 + 0.3 * torch.randn(16, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    x32 = x.float()
    released = (x32 * torch.rsqrt(torch.mean(x32**2, dim=-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    released = released * norm.scale.to(torch.bfloat16)
    fused = norm(x)
    norm.weight_in_fp32 = False
    assert torch.equal(norm(x), released) and not torch.equal(fused, released)
    assert rr.engine.encoder.zero_masked_queries is False and s1x.engine.encoder.zero_masked_queries is True


def test_bundle_layout_check_accepts_either_processor_layout():
    from step1x_batch.models.step1x.release import layout_problem

    base = {"model_index.json": 1, "transformer/diffusion_pytorch_model.safetensors": 1,
            "vae/diffusion_pytorch_model.safetensors": 1, "text_encoder/config.json": 1,
            "text_encoder/model.safetensors": 1, "processor/tokenizer.json": 1}
    assert layout_problem({**base, "processor/preprocessor_config.json": 1}) is None
    assert layout_problem({**base, "processor/processor_config.json": 1}) is None  # transformers 5
    assert layout_problem(base) == ("has no image processor config (processor/preprocessor_config.json or "
                                    "processor/processor_config.json)")
