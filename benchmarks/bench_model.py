"""Model benchmark: one DiT forward and one full edit, with FLOPs and achieved TFLOP/s.

    # tiny release (made from a seed) on the CPU, real Qwen conditioner
    python benchmarks/bench_model.py --tiny --sizes 256 --batches 1 4
    # full-size DiT/VAE with random weights (meta init, random fill on the device; no weights needed)
    python benchmarks/bench_model.py --device cuda --sizes 1024 512 --batches 1 max
    # Qwen-Image-Edit-2511, tiny folder on the CPU: seconds per edit at batch 1 vs batch 4
    python benchmarks/bench_model.py --family qwen-image-edit --tiny --sizes 128 --batches 1 4
    # the cost of batch invariance, switch on vs off in one run (both families, tiny, CPU)
    python benchmarks/bench_model.py --invariance --rows 16 6
    # adapter switching on a resident model vs a full reload (tiny, measured) and at full size
    # (computed from parameter counts; measured too with --device cuda, full-width Step1X-Edit DiT)
    python benchmarks/bench_model.py --adapter-switch --rank 32

Full size leaves out the Qwen2.5-VL forward (one ~700-token pass of a 7B model per row and branch,
about 1e13 FLOPs, ~0.1 % of an edit): text embeddings are random tensors of the real shape. Everything
else (connector, DiT, CFG loop, VAE encode/decode) is the production engine. The CPU prepare stage
(resize, tokenizer, processor) runs before the timer, as it runs in CPU tasks in the job.
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
from step1x_batch.models.base import EditParams, EditRequest, Prepared, edit_prepared
from step1x_batch.models.determinism import CPU_EDIT_THREADS, cpu_threads
from step1x_batch.models.step1x.pipeline import VERSIONS, Step1XEditPipeline, Step1XEngine
from step1x_batch.models.step1x.prepare import model_size, prepare_row
from step1x_batch.models.step1x.vae import AutoEncoder, AutoEncoderParams

TEXT_TOKENS = 640


def dit_flops(p: DiTParams, seq: int) -> float:
    """Matmul + attention FLOPs of one DiT forward over ``seq`` tokens (one sequence)."""
    d, m = p.hidden_size, int(p.hidden_size * p.mlp_ratio)
    per_token_weights = 4 * d * d + 2 * d * m  # qkv + proj + mlp (double: per stream; single: linear1+2)
    blocks = p.depth + p.depth_single_blocks
    return blocks * (2 * per_token_weights * seq + 4 * seq * seq * d)


class RandomTextEngine(Step1XEngine):
    """Benchmark-only: the production engine with random hidden states of the real shape in
    place of the Qwen2.5-VL forward."""

    def encode_text(self, rows):
        g = torch.Generator(self.device).manual_seed(0)
        b = 2 * len(rows)
        emb = torch.randn(b, TEXT_TOKENS, 3584, generator=g, device=self.device, dtype=self.dtype)
        mask = torch.zeros(b, TEXT_TOKENS, dtype=torch.long, device=self.device)
        mask[:, :120] = 1
        return emb, mask


def random_fill(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    module = module.to_empty(device=device).to(dtype)
    g = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02, generator=g)
        for b in module.buffers():  # to_empty left them uninitialised
            if b.is_floating_point():
                b.normal_(0, 0.02, generator=g)
    return module.eval().requires_grad_(False)


def full_size_engine(device: torch.device, dtype: torch.dtype, depth: int, single: int) -> Step1XEngine:
    params = DiTParams(depth=depth, depth_single_blocks=single)
    with torch.device("meta"):
        dit, connector, vae = Step1XDiT(params), Connector(ConnectorParams()), AutoEncoder(AutoEncoderParams())
    dit, connector = random_fill(dit, device, dtype), random_fill(connector, device, dtype)
    vae = random_fill(vae, device, torch.float32)
    return RandomTextEngine(dit, connector, vae, None, VERSIONS["v1.1"], device, dtype, "random-full-size")


def rows_for(size: int, batch: int, steps: int, prompts=None) -> list[Prepared]:
    """Prepared rows of one batch key: through the real prepare with a tokenizer, else only the
    reference image (the random-text engine needs no token ids)."""
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(batch)]
    params = EditParams(num_steps=steps, size_level=size)
    if prompts is not None:
        return [prepare_row(prompts, EditRequest([im], "add a red hat", i, params)) for i, im in enumerate(images)]
    w, h = model_size(size, size, size)
    meta = {"num_steps": steps, "guidance_scale": params.guidance_scale, "posterior_mean": False, "prefix_drop": 0}
    return [Prepared("bench", w, h, {"ref": im[:h, :w]}, {**meta, "seed": i}) for i, im in enumerate(images)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn, device: torch.device, repeat: int = 1) -> float:
    fn()  # warm-up
    sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def largest_batch(engine: Step1XEngine, size: int, steps: int, device: torch.device, prompts=None) -> int:
    if device.type != "cuda":
        return 4
    b = 1
    while b < 64:
        try:
            edit_prepared(engine, rows_for(size, 2 * b, 1, prompts), 2 * b)
            b *= 2
        except torch.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    return b


def bench_qwen_tiny(args, device: torch.device) -> None:
    """The tiny Qwen-Image-Edit folder through the production prepare + engine: s/row by batch."""
    from step1x_batch.models.qwen_image_edit.pipeline import QwenImageEditPipeline
    from step1x_batch.models.qwen_image_edit.tiny import make_tiny_weights

    folder = make_tiny_weights(tempfile.mkdtemp(prefix="qwen-tiny-"))
    print(f"device CPU, dtype {args.dtype}, tiny Qwen-Image-Edit weights, {args.steps} steps with true CFG, "
          f"torch {torch.__version__}")
    print("| size | refs | batch | edit s/row (engine) | rows/s | rows/s ratio to batch 1 |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        pipe = QwenImageEditPipeline.from_pretrained(folder, device=device, dtype=args.dtype,
                                                     reference_area=size * size, vl_area=min(size, 256) ** 2)
        for refs in (1, 2):
            base = None
            for batch in (int(b) for b in args.batches):
                rng = np.random.default_rng(0)
                params = EditParams(num_steps=args.steps, guidance_scale=4.0, size_level=size, negative_prompt=" ")
                rows = [pipe.preparer(EditRequest([rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                                                   for _ in range(refs)], f"edit number {i}", i, params))
                        for i in range(batch)]
                seconds = time_it(lambda: edit_prepared(pipe.engine, rows, batch), device, args.repeat)
                rate = batch / seconds
                base = base or rate
                print(f"| {size}x{size} | {refs} | {batch} | {seconds / batch:.3f} | {rate:.2f} | {rate / base:.2f} |")


def bench_invariance(args, device: torch.device) -> None:
    """rows/s with ``batch_invariant`` on vs off, the same rows in one run (tiny weights): the
    price of one-prompt-at-a-time encoding and of padding short batches to the fixed shape."""
    from step1x_batch.models.qwen_image_edit.family import QwenImageEditFamily
    from step1x_batch.models.qwen_image_edit.tiny import make_tiny_weights as tiny_qwen
    from step1x_batch.models.base import ModelSpec
    from step1x_batch.models.step1x.family import Step1XFamily
    from step1x_batch.models.step1x.tiny import make_tiny_weights as tiny_step1x

    size, steps = args.sizes[0], args.steps
    families = {
        "step1x": (Step1XFamily, tiny_step1x(tempfile.mkdtemp(prefix="step1x-tiny-")), {}),
        "qwen-image-edit": (QwenImageEditFamily, tiny_qwen(tempfile.mkdtemp(prefix="qwen-tiny-")),
                            {"reference_area": size * size, "vl_area": min(size, 256) ** 2}),
    }
    texts = ["add a hat", "make it night and add a big yellow moon over the hills", "snow",
             "turn the sky red and add a small house with a tree next to the river"]
    print(f"device CPU, dtype {args.dtype}, tiny weights, {size}x{size}, {steps} steps with CFG, max_batch_size 4, "
          f"torch {torch.__version__}")
    print("| family | rows | rows/s invariant | rows/s variant | ratio (invariant / variant) |")
    print("|---|---|---|---|---|")
    for name, (cls, folder, options) in families.items():
        for n in args.rows:
            rates = {}
            for invariant in (True, False):
                fam = cls(ModelSpec(name, options, str(folder), args.dtype, max_batch_size=4, batch_invariant=invariant))
                prepare, engine = fam.preparer(folder), fam.load(folder, device.type)
                rng = np.random.default_rng(0)
                params = EditParams(num_steps=steps, guidance_scale=4.0, size_level=size, negative_prompt=" ")
                rows = [prepare(EditRequest([rng.integers(0, 256, (size, size, 3), dtype=np.uint8)],
                                            texts[i % len(texts)], i, params)) for i in range(n)]
                groups = {r.key for r in rows}
                seconds = time_it(lambda: edit_prepared(engine, rows, 4), device, args.repeat)
                rates[invariant] = (n / seconds, len(groups))
            (on, keys_on), (off, keys_off) = rates[True], rates[False]
            print(f"| {name} | {n} ({keys_on} / {keys_off} batch keys) | {on:.2f} | {off:.2f} | {on / off:.2f} |")


# --- adapter switching (issue 22) ------------------------------------------------------------------

# PixelSmile's targets per Qwen-Image transformer block (configs/example.yaml); for Step1X-Edit every
# Linear of every double / single block (the release's own LoRA format targets these).
QWEN_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                     "attn.to_out.0", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
                     "txt_mlp.net.2")
HBM_BYTES_S, FP32_FLOP_S, PCIE_BYTES_S, NVME_BYTES_S = 3.0e12, 50e12, 25e9, 3e9  # H100 (assumed), NVMe
# Bytes per target parameter read + written by one switch, as the code does it (bf16 weights, one
# adapter per set): factor path zeros(4) + up@down (4) + add_ (12) + base.float() (6) + add (12) +
# .to(bf16) (6) + copy_ (4); full-delta path: the last four only (the fp32 delta is read, not made).
FACTOR_BYTES_PER_PARAM, DELTA_BYTES_PER_PARAM = 48, 28


def lora_targets(family: str, module: torch.nn.Module) -> list[str]:
    blocks = ("double_blocks.", "single_blocks.") if family == "step1x" else ("transformer_blocks.",)
    return [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(blocks)
            and (family == "step1x" or n.split(".", 2)[-1] in QWEN_LORA_TARGETS)]


def write_lora(module: torch.nn.Module, targets: list[str], rank: int, seed: int, path: str) -> str:
    """A random kohya-format LoRA (bf16 factors) over ``targets``, with an alpha."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name in targets:
        layer, key = module.get_submodule(name), "lora_unet_" + name.replace(".", "_")
        r = min(rank, layer.in_features, layer.out_features)
        tensors[f"{key}.lora_down.weight"] = (torch.randn(r, layer.in_features, generator=g) / layer.in_features**0.5).bfloat16()
        tensors[f"{key}.lora_up.weight"] = (0.1 * torch.randn(layer.out_features, r, generator=g) / r**0.5).bfloat16()
        tensors[f"{key}.alpha"] = torch.tensor(float(r) / 2)
    save_file(tensors, path)
    return path


class FullDeltaSwitch:
    """The alternative to the factor path, for the benchmark only: every set's full float32 delta
    per target kept on the device, a switch = ``(base.float() + delta).to(dtype)`` and a copy."""

    def __init__(self, switcher, names: list[str]):
        from step1x_batch.models.lora import full_float32_matmuls, lora_delta

        self.switcher, self.deltas = switcher, {}
        with full_float32_matmuls():
            for name in names:
                terms = switcher._sets[name].terms
                self.deltas[name] = {t: lora_delta(switcher._weight(t).shape, switcher._weight(t).device, ts)
                                     for t, ts in terms.items()}

    def nbytes(self) -> int:
        return sum(d.nbytes for deltas in self.deltas.values() for d in deltas.values())

    def activate(self, old: str, new: str) -> None:
        sw = self.switcher
        with torch.no_grad():
            for t in self.deltas[old]:
                if t not in self.deltas[new]:
                    sw._weight(t).copy_(sw._base[t])
            for t, delta in self.deltas[new].items():
                w = sw._weight(t)
                w.copy_((sw._base[t].to(w.device).float() + delta).to(w.dtype))


def switch_times(switcher, device: torch.device, repeat: int, full_delta: FullDeltaSwitch | None) -> tuple:
    """Median seconds of an A -> B switch: the factor path, the full-delta path (None: not run)."""
    factor, delta = [], []
    for _ in range(repeat):
        switcher.activate("A")
        switcher.activate("B")
        factor.append(switcher.last_switch_s)
    if full_delta is not None:
        switcher.activate("A")
        for _ in range(repeat):
            full_delta.activate("B", "A")
            sync(device)
            start = time.perf_counter()
            full_delta.activate("A", "B")
            sync(device)
            delta.append(time.perf_counter() - start)
        switcher.activate(None)
    return statistics.median(factor), (statistics.median(delta) if delta else None)


def bench_adapter_switch_tiny(args, device: torch.device) -> None:
    """Measured: A -> B on the tiny models (factor path, full-delta path) vs a full reload
    (the tiny weights from disk + merging B, as a job with one adapter loads)."""
    from step1x_batch.models.adapter_sets import AdapterSwitcher
    from step1x_batch.models.base import AdapterSpec, ModelSpec
    from step1x_batch.models.qwen_image_edit.family import QwenImageEditFamily
    from step1x_batch.models.qwen_image_edit.tiny import make_tiny_weights as tiny_qwen
    from step1x_batch.models.step1x.family import Step1XFamily
    from step1x_batch.models.step1x.tiny import make_tiny_weights as tiny_step1x

    tmp = tempfile.mkdtemp(prefix="switch-")
    families = {"step1x": (Step1XFamily, tiny_step1x(f"{tmp}/step1x"), {}),
                "qwen-image-edit": (QwenImageEditFamily, tiny_qwen(f"{tmp}/qwen"), {})}
    print(f"MEASURED, tiny weights, device {device} ({CPU_EDIT_THREADS} thread), dtype {args.dtype}, LoRA rank "
          f"{args.rank} on every target, median of {max(args.repeat, 20)} switches / {args.repeat} reloads, "
          f"torch {torch.__version__}")
    print("| family | targets | target params | switch A->B, factors (ms) | switch, full fp32 deltas (ms) "
          "| full reload + merge (ms) | reload / factor switch | held: base copy, factors, deltas (kB) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (cls, folder, options) in families.items():
        fam = cls(ModelSpec(name, options, str(folder), args.dtype))
        engine = fam.load(folder, device.type)
        module = engine.dit if name == "step1x" else engine.transformer
        targets = lora_targets(name, module)
        sets = {s: [AdapterSpec(write_lora(module, targets, args.rank, seed, f"{tmp}/{name}-{s}.safetensors"))]
                for seed, s in enumerate("AB")}
        switcher = AdapterSwitcher(module, family=name)
        for s, specs in sets.items():
            switcher.add_set(s, specs)
        full = FullDeltaSwitch(switcher, list(sets))
        with cpu_threads(device):  # one intra-op thread, as an edit runs on the CPU (steadier timings too)
            factor_s, delta_s = switch_times(switcher, device, max(args.repeat, 20), full)
            reload_s = time_it(lambda: fam.load(folder, device.type, sets["B"]), device, args.repeat)
        mem = switcher.memory()
        n = sum(module.get_submodule(t).weight.numel() for t in targets)
        print(f"| {name} | {len(targets)} | {n:,} | {factor_s * 1e3:.2f} | {delta_s * 1e3:.2f} | {reload_s * 1e3:.0f} | "
              f"{reload_s / factor_s:.0f}x | {mem['base_bytes'] / 1e3:.0f}, {mem['factor_bytes'] / 1e3:.0f}, "
              f"{full.nbytes() / 1e3:.0f} |")


def full_size_denoisers() -> dict[str, torch.nn.Module]:
    """Both families' denoisers at release size on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        models = {"step1x": Step1XDiT(DiTParams())}
        try:
            from diffusers import QwenImageTransformer2DModel

            models["qwen-image-edit"] = QwenImageTransformer2DModel(
                num_layers=60, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=3584,
                zero_cond_t=True)
        except ImportError as e:
            print(f"(Qwen-Image transformer not built: diffusers is not importable here: {e})")
    return models


def bench_adapter_switch_full_size(args) -> None:
    """Computed, not measured: bytes and time of one switch at full size from the targets'
    parameter counts, vs reading the release's weights from local NVMe."""
    print(f"\nCOMPUTED from parameter counts (meta-device models), bf16 weights, LoRA rank {args.rank}, one adapter per "
          f"set, A and B on the same targets; H100 assumed: HBM {HBM_BYTES_S / 1e12:.0f} TB/s, true-fp32 matmuls "
          f"{FP32_FLOP_S / 1e12:.0f} TFLOP/s, pinned host -> GPU {PCIE_BYTES_S / 1e9:.0f} GB/s; NVMe "
          f"{NVME_BYTES_S / 1e9:.0f} GB/s. Release = the denoiser in bf16 + Qwen2.5-VL-7B (16.6 GB).")
    print("| family | denoiser params | target params | factors per set | base copy | fp32 deltas per set "
          "| factor switch: bytes moved, est. | + base kept on host (PCIe) | full-delta switch, est. "
          "| reload: release from NVMe, est. | reload / factor switch |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, module in full_size_denoisers().items():
        targets = [module.get_submodule(t) for t in lora_targets(name, module)]
        n = sum(t.weight.numel() for t in targets)
        total = sum(p.numel() for p in module.parameters())
        factors = sum(4 * min(args.rank, t.in_features, t.out_features) * (t.in_features + t.out_features)
                      for t in targets)
        flops = sum(2 * min(args.rank, t.in_features, t.out_features) * t.weight.numel() for t in targets)
        factor_s = FACTOR_BYTES_PER_PARAM * n / HBM_BYTES_S + flops / FP32_FLOP_S
        host_s = factor_s + 2 * n / PCIE_BYTES_S
        delta_s = DELTA_BYTES_PER_PARAM * n / HBM_BYTES_S
        release = 2 * total + 16.6e9
        reload_s = release / NVME_BYTES_S
        print(f"| {name} | {total / 1e9:.2f} B | {n / 1e9:.2f} B | {factors / 1e6:.0f} MB | {2 * n / 1e9:.1f} GB "
              f"| {4 * n / 1e9:.1f} GB | {FACTOR_BYTES_PER_PARAM * n / 1e9:.0f} GB, {factor_s * 1e3:.0f} ms "
              f"| {host_s * 1e3:.0f} ms | {delta_s * 1e3:.0f} ms (needs {4 * n / 1e9:.0f} GB more per set) "
              f"| {release / 1e9:.0f} GB, {reload_s:.0f} s | {reload_s / factor_s:.0f}x |")


def bench_adapter_switch_gpu(args, device: torch.device, dtype: torch.dtype) -> None:
    """Measured on the GPU: A -> B on the full-width Step1X-Edit DiT (random weights, --depth /
    --single blocks), base weights kept on the GPU and on the host; the full-delta path where it fits."""
    from step1x_batch.models.adapter_sets import AdapterSwitcher
    from step1x_batch.models.base import AdapterSpec

    with torch.device("meta"):
        dit = Step1XDiT(DiTParams(depth=args.depth, depth_single_blocks=args.single))
    dit = random_fill(dit, device, dtype)
    targets = lora_targets("step1x", dit)
    n = sum(dit.get_submodule(t).weight.numel() for t in targets)
    tmp = tempfile.mkdtemp(prefix="switch-gpu-")
    files = {s: write_lora(dit, targets, args.rank, seed, f"{tmp}/{s}.safetensors") for seed, s in enumerate("AB")}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    print(f"\nMEASURED on {name}: Step1X-Edit DiT full width, {args.depth}+{args.single} "
          f"blocks, {n / 1e9:.2f} B target params, {args.dtype}, rank {args.rank}, median of {max(args.repeat, 5)}")
    print("| base weights kept on | switch A->B, factors (ms) | switch, full fp32 deltas (ms) | GPU memory after staging (GB) |")
    print("|---|---|---|---|")
    for base_device in (None, "cpu"):
        switcher = AdapterSwitcher(dit, family="step1x", base_device=base_device)
        for s, path in files.items():
            switcher.add_set(s, [AdapterSpec(path)])
        try:
            full = FullDeltaSwitch(switcher, list(files)) if base_device is None else None
        except torch.OutOfMemoryError:
            full = None
        factor_s, delta_s = switch_times(switcher, device, max(args.repeat, 5), full)
        delta = f"{delta_s * 1e3:.1f}" if delta_s is not None else ("does not fit" if base_device is None else "-")
        used = torch.cuda.memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")
        where = base_device or f"{device.type} (the module's device)"
        print(f"| {where} | {factor_s * 1e3:.1f} | {delta} | {used:.1f} |")
        switcher.activate(None)
        del switcher, full
        if device.type == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny release folder made from a seed (CPU)")
    ap.add_argument("--family", choices=["step1x", "qwen-image-edit"], default="step1x")
    ap.add_argument("--invariance", action="store_true", help="batch invariance on vs off (tiny, CPU)")
    ap.add_argument("--rows", type=int, nargs="+", default=[16, 6], help="rows per --invariance run")
    ap.add_argument("--adapter-switch", action="store_true",
                    help="adapter set switching vs a full reload (tiny measured; full size computed, measured on CUDA)")
    ap.add_argument("--rank", type=int, default=32, help="LoRA rank for --adapter-switch")
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
    if args.invariance:
        bench_invariance(args, device)
        return
    if args.adapter_switch:
        bench_adapter_switch_tiny(args, torch.device("cpu"))
        bench_adapter_switch_full_size(args)
        if device.type == "cuda":
            bench_adapter_switch_gpu(args, device, dtype)
        return
    if args.family == "qwen-image-edit":
        if not args.tiny:
            raise SystemExit("--family qwen-image-edit: only --tiny for now (full size: the GPU script)")
        bench_qwen_tiny(args, device)
        return

    if args.tiny:
        from step1x_batch.models.step1x.tiny import make_tiny_weights

        folder = make_tiny_weights(tempfile.mkdtemp(prefix="step1x-tiny-"))
        pipe = Step1XEditPipeline.from_pretrained(folder, device=device, dtype=dtype)
        engine, prompts = pipe.engine, pipe.prompts
    else:
        engine, prompts = full_size_engine(device, dtype, args.depth, args.single), None
    p = engine.dit.params
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
            batch = largest_batch(engine, size, args.steps, device, prompts) if batch_arg == "max" else int(batch_arg)
            x = torch.randn(2 * batch, 2 * n_img, p.in_channels, device=device, dtype=dtype)
            ids = torch.zeros(2 * batch, 2 * n_img, 3, device=device)
            txt = torch.randn(2 * batch, TEXT_TOKENS, p.context_in_dim, device=device, dtype=dtype)
            txt_ids = torch.zeros(2 * batch, TEXT_TOKENS, 3, device=device)
            t = torch.full((2 * batch,), 0.5, device=device, dtype=dtype)
            y = torch.randn(2 * batch, p.vec_in_dim, device=device, dtype=dtype)

            def forward():
                with torch.inference_mode(), engine._autocast():
                    engine.dit(x, ids, txt, txt_ids, t, y)

            fwd_s = time_it(forward, device, args.repeat)
            fwd_flops = 2 * batch * dit_flops(p, seq)
            rows = rows_for(size, batch, args.steps, prompts)  # CPU prepare: not timed (a CPU stage in the job)
            edit_s = time_it(lambda: edit_prepared(engine, rows, batch), device, 1)
            edit_flops = args.steps * 2 * dit_flops(p, seq)  # per row: steps x (cond + uncond)
            print(f"| {w}x{h} | {batch} | {seq} | {fwd_s:.4f} | {fwd_flops / fwd_s / 1e12:.2f} | "
                  f"{edit_s / batch:.3f} | {edit_flops:.3g} | {edit_flops * batch / edit_s / 1e12:.2f} |")


if __name__ == "__main__":
    main()
