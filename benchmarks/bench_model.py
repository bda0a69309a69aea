"""Model benchmark: one DiT forward and one full edit, with FLOPs and achieved TFLOP/s.

    # tiny release (made from a seed) on the CPU, real Qwen conditioner
    python benchmarks/bench_model.py --tiny --sizes 256 --batches 1 4
    # full-size DiT/VAE with random weights (meta init, random fill on the device; no weights needed)
    python benchmarks/bench_model.py --device cuda --sizes 1024 512 --batches 1 max

Full size leaves out the Qwen2.5-VL forward (one ~700-token pass of a 7B model per row and branch,
about 1e13 FLOPs, ~0.1 % of an edit): text embeddings are random tensors of the real shape. Everything
else (connector, DiT, CFG loop, VAE encode/decode) is the production code path.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch

from step1x_batch.models.step1x.connector import Connector, ConnectorParams
from step1x_batch.models.step1x.dit import DiTParams, Step1XDiT
from step1x_batch.models.step1x.pipeline import VERSIONS, EditPipeline, model_size
from step1x_batch.models.step1x.vae import AutoEncoder, AutoEncoderParams

TEXT_TOKENS = 640


def dit_flops(p: DiTParams, seq: int) -> float:
    """Matmul + attention FLOPs of one DiT forward over ``seq`` tokens (one sequence)."""
    d, m = p.hidden_size, int(p.hidden_size * p.mlp_ratio)
    per_token_weights = 4 * d * d + 2 * d * m  # qkv + proj + mlp (double: per stream; single: linear1+2)
    blocks = p.depth + p.depth_single_blocks
    return blocks * (2 * per_token_weights * seq + 4 * seq * seq * d)


class RandomText:
    """Benchmark-only stand-in for the Qwen conditioner: random hidden states of the real shape."""

    def __init__(self, hidden: int, device: torch.device, dtype: torch.dtype):
        self.hidden, self.device, self.dtype = hidden, device, dtype

    def encode(self, images, instructions, max_length: int = TEXT_TOKENS):
        g = torch.Generator(self.device).manual_seed(0)
        b = len(instructions)
        emb = torch.randn(b, max_length, self.hidden, generator=g, device=self.device, dtype=self.dtype)
        mask = torch.zeros(b, max_length, dtype=torch.long, device=self.device)
        mask[:, :120] = 1
        return emb, mask


def random_fill(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    module = module.to_empty(device=device).to(dtype)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02, generator=g)
    return module.eval().requires_grad_(False)


def full_size_pipeline(device: torch.device, dtype: torch.dtype, depth: int, single: int) -> EditPipeline:
    params = DiTParams(depth=depth, depth_single_blocks=single)
    with torch.device("meta"):
        dit, connector, vae = Step1XDiT(params), Connector(ConnectorParams()), AutoEncoder(AutoEncoderParams())
    dit, connector = random_fill(dit, device, dtype), random_fill(connector, device, dtype)
    vae = random_fill(vae, device, torch.float32)
    return EditPipeline(dit, connector, vae, RandomText(3584, device, dtype), VERSIONS["v1.1"], device, dtype,
                        "random-full-size")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn, device: torch.device, repeat: int) -> float:
    fn()  # warm-up
    sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def largest_batch(pipe: EditPipeline, size: int, steps: int, device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    b = 1
    while b < 64:
        try:
            bench_edit(pipe, size, 2 * b, 1, device)
            b *= 2
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    return b


def bench_edit(pipe: EditPipeline, size: int, batch: int, steps: int, device: torch.device):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(batch)]
    return pipe.edit(images, ["add a red hat"] * batch, seeds=list(range(batch)), num_steps=steps,
                     size_level=size, max_batch_size=batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny release folder made from a seed (CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 512])
    ap.add_argument("--batches", nargs="+", default=["1", "max"])
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--depth", type=int, default=19, help="double blocks (fewer: a smoke run of the script)")
    ap.add_argument("--single", type=int, default=38, help="single blocks")
    args = ap.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    if args.tiny:
        from step1x_batch.models.step1x.tiny import make_tiny_weights

        folder = make_tiny_weights(tempfile.mkdtemp(prefix="step1x-tiny-"))
        pipe = EditPipeline.from_pretrained(folder, device=device, dtype=dtype)
    else:
        pipe = full_size_pipeline(device, dtype, args.depth, args.single)
    p = pipe.dit.params
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}, dtype {args.dtype}, {'tiny' if args.tiny else f'full-width random ({p.depth}+{p.depth_single_blocks} blocks)'} weights, "
          f"{args.steps} steps with CFG, torch {torch.__version__}")
    print("| size | batch | seq tokens | DiT fwd (2B seqs) s | DiT TFLOP/s | edit s/row | FLOPs/edit | edit TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        w, h = model_size(size, size, size)
        n_img = (w // 16) * (h // 16)
        seq = TEXT_TOKENS + 2 * n_img
        for batch_arg in args.batches:
            batch = largest_batch(pipe, size, args.steps, device) if batch_arg == "max" else int(batch_arg)
            x = torch.randn(2 * batch, 2 * n_img, p.in_channels, device=device, dtype=dtype)
            ids = torch.zeros(2 * batch, 2 * n_img, 3, device=device)
            txt = torch.randn(2 * batch, TEXT_TOKENS, p.context_in_dim, device=device, dtype=dtype)
            txt_ids = torch.zeros(2 * batch, TEXT_TOKENS, 3, device=device)
            t = torch.full((2 * batch,), 0.5, device=device, dtype=dtype)
            y = torch.randn(2 * batch, p.vec_in_dim, device=device, dtype=dtype)

            def forward():
                with torch.inference_mode(), pipe._autocast():
                    pipe.dit(x, ids, txt, txt_ids, t, y)

            fwd_s = time_it(forward, device, args.repeat)
            fwd_flops = 2 * batch * dit_flops(p, seq)
            edit_s = time_it(lambda: bench_edit(pipe, size, batch, args.steps, device), device, 1)
            edit_flops = args.steps * 2 * dit_flops(p, seq)  # per row: steps x (cond + uncond)
            print(f"| {w}x{h} | {batch} | {seq} | {fwd_s:.4f} | {fwd_flops / fwd_s / 1e12:.2f} | "
                  f"{edit_s / batch:.3f} | {edit_flops:.3g} | {edit_flops * batch / edit_s / 1e12:.2f} |")


if __name__ == "__main__":
    main()
