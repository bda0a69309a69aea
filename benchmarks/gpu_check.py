"""One device check for both families at full size, with no weights and no Ray.

    python benchmarks/gpu_check.py                  # on a GPU machine: full size, ~5 minutes
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
    ap.add_argument("--families", nargs="+", default=["step1x", "qwen-image-edit"])
    ap.add_argument("--pythonpath", default=None, help="a folder holding diffusers (for the Qwen family)")
    ap.add_argument("--smoke", action="store_true",
                    help="a CPU check of the script: 1 block, narrow, narrow VAEs, 32^2")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled runs")
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
    if args.pythonpath:
        sys.path.insert(1, args.pythonpath)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    start = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"gpu_check: {name}, torch {torch.__version__}, {args.dtype}, batch invariant (fixed batch shapes), "
          f"CUBLAS_WORKSPACE_CONFIG={os.environ.get('CUBLAS_WORKSPACE_CONFIG', 'unset')}")
    for family in args.families:
        for line in (step1x if family == "step1x" else qwen)(args, device, dtype):
            print(line, flush=True)
    print(f"gpu_check: done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
