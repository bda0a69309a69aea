"""RealRestorer: this project's step1x family against RealRestorer's own released pipeline.

Runs upstream's ``RealRestorerPipeline`` (github.com/yfyang007/RealRestorer, its patched diffusers
under ``diffusers/src``) and this project's :class:`Step1XEditPipeline` on the same tiny bundle
(``make_tiny_weights(layout="realrestorer")``), same seeds, prompts and settings, and prints the
PSNR of the final images (after the resize back to the input size), float32 and bfloat16.

    python benchmarks/realrestorer_parity.py /path/to/RealRestorer-checkout [--steps 4] [--size 128]

The upstream checkout is read, never changed: its ``diffusers/src/diffusers`` is copied to a scratch
folder and only these adaptations are made there, none of which changes what upstream computes:

- the tiny model's sizes: upstream hard-codes the 7B Qwen hidden sizes in its connector
  (``Qwen2Connector()``, ``nn.Linear(in_channels, 768)``): the transformer's connector is
  rebuilt with upstream's own class at the tiny sizes;
- the tiny tokenizer's constants: upstream hard-codes Qwen's prefix length (217), curly-quote
  ids (2073, 854) and ``<|vision_end|>`` id (151653); the scratch copy gets the tiny tokenizer's;
- transformers 5: the Qwen2.5-VL forward derives mrope positions from the ids only when
  ``mm_token_type_ids`` is passed (upstream's pinned 4.57 did it from ``input_ids`` alone): the
  text encoder's forward gets them added; the prompts carry no ``!`` (id 0), so the mask is all ones;
  and its config's ``hidden_size`` (under ``text_config`` in 5) is copied to the top level;
- no torchvision here: upstream's ``AutoProcessor.from_pretrained(processor/)`` gives, with its
  pinned transformers 4.57 and torchvision, ``Qwen2_5_VLProcessor`` over the fast (torchvision)
  Qwen2-VL image processor with the folder's settings; here the processor class is the same, its
  image processor this project's plain-torch copy of the torchvision one (tested against
  transformers' own elsewhere), without a video processor; its text-only
  calls tokenize as 4.57 did (5 refuses an ``<|image_pad|>`` without an image);
- the VAE posterior sample: upstream draws it with ``torch.randn_like`` from the unseeded global
  generator; here it is given this project's seeded sample (``posterior_seed(seed)``), the one
  deliberate difference, so the two runs are comparable at all.

Needs ``einops`` and ``httpx`` importable (upstream's diffusers imports them); pass
``--extra-path`` to a ``pip install --target`` folder if they are not installed.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from step1x_batch.models.qwen_vl.processor import build_image_processor  # noqa: E402
from step1x_batch.models.step1x.conditioner import PromptTokenizer  # noqa: E402
from step1x_batch.models.step1x.pipeline import Step1XEditPipeline, posterior_seed  # noqa: E402
from step1x_batch.models.step1x.tiny import TINY_DIT, TINY_QWEN_HIDDEN, TINY_VAE, make_tiny_weights, tiny_connector_params  # noqa: E402

PROMPTS = (
    "Please remove noise from the image.",
    "Please dehaze the image",
    "Restore the details and keep the original composition.",
)


def picture(seed: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], -1)
    return (base + rng.integers(0, 40, (h, w, 3))).clip(0, 255).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def scratch_diffusers(checkout: Path, scratch: Path, prefix_drop: int, quote_ids: tuple[int, int],
                      vision_end_id: int) -> Path:
    """A copy of upstream's diffusers package with the tiny tokenizer's constants."""
    src = checkout / "diffusers" / "src"
    shutil.copytree(src / "diffusers", scratch / "diffusers")
    path = scratch / "diffusers" / "pipelines" / "realrestorer" / "pipeline_realrestorer.py"
    text = path.read_text(encoding="utf-8")
    for old, new in (
        ("emb.shape[1] - 217", f"emb.shape[1] - {prefix_drop}"),
        ("emb[0, 217 : 217 + valid_length]", f"emb[0, {prefix_drop} : {prefix_drop} + valid_length]"),
        ("token_each[0][0] == 2073 and token_each[0][-1] == 854", f"token_each[0][0] == {quote_ids[0]} and token_each[0][-1] == {quote_ids[1]}"),
        ("(old_inputs_ids == 151653)", f"(old_inputs_ids == {vision_end_id})"),
        ("(new_txt_ids == 151653)", f"(new_txt_ids == {vision_end_id})"),
    ):
        if text.count(old) != 1:
            raise SystemExit(f"upstream pipeline_realrestorer.py changed: {old!r} not found once")
        text = text.replace(old, new)
    path.write_text(text, encoding="utf-8")
    return scratch


class FastImageProcessor:
    """transformers' torchvision Qwen2-VL image processor (what upstream's AutoProcessor loads with
    its pinned transformers 4.57 and torchvision installed), as this project's plain-torch copy
    of it, behind the call the processor makes (torchvision cannot be installed beside a CPU torch)."""

    def __init__(self, processor) -> None:
        self.processor = processor
        self.merge_size = processor.merge_size

    @staticmethod
    def fetch_images(images):
        return images

    def __call__(self, images=None, **kwargs):
        from transformers import BatchFeature

        return BatchFeature(self.processor(images=images), tensor_type=kwargs.get("return_tensors"))


def upstream_pipeline(bundle: Path, dtype: torch.dtype, image_processor_backend: str):
    """Upstream's RealRestorerPipeline over the tiny bundle, every component in ``dtype`` as its
    ``from_pretrained(torch_dtype=...)`` casts them."""
    import json

    from diffusers.models.autoencoders.autoencoder_kl_realrestorer import RealRestorerAutoencoderKL
    from diffusers.models.realrestorer.connector import Qwen2Connector
    from diffusers.models.transformers.transformer_realrestorer import RealRestorerTransformer2DModel
    from diffusers.pipelines.realrestorer.pipeline_realrestorer import RealRestorerPipeline
    from diffusers.schedulers.scheduling_realrestorer_flow_match import RealRestorerFlowMatchScheduler
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    def state(folder: Path) -> dict:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out

    p = TINY_DIT
    transformer = RealRestorerTransformer2DModel(
        in_channels=p.in_channels, out_channels=p.out_channels, vec_in_dim=p.vec_in_dim,
        context_in_dim=p.context_in_dim, hidden_size=p.hidden_size, mlp_ratio=p.mlp_ratio, num_heads=p.num_heads,
        depth=p.depth, depth_single_blocks=p.depth_single_blocks, axes_dims_rope=tuple(p.axes_dim), theta=p.theta,
        qkv_bias=p.qkv_bias, mode="torch", version="v1.1",
    )
    c = tiny_connector_params("v1.1")
    connector = Qwen2Connector(in_channels=c.in_channels, hidden_size=c.hidden_size, heads_num=c.num_heads,
                               depth=c.depth, version="v1.1", dtype=torch.float32)
    connector.global_proj_out = torch.nn.Linear(c.in_channels, c.vec_dim)
    transformer.inner_model.connector = connector
    transformer.load_state_dict(state(bundle / "transformer"), strict=True)

    v = TINY_VAE
    vae = RealRestorerAutoencoderKL(ch=v.ch, ch_mult=tuple(v.ch_mult), num_res_blocks=v.num_res_blocks,
                                    z_channels=v.z_channels)
    vae.load_state_dict(state(bundle / "vae"), strict=True)

    text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(bundle / "text_encoder"), dtype=dtype, attn_implementation="sdpa", local_files_only=True)
    image_token_id = text_encoder.config.image_token_id
    forward = text_encoder.forward

    def forward_with_token_types(*args, input_ids=None, pixel_values=None, **kwargs):
        if pixel_values is not None:  # transformers 4.57 derived the image positions from the ids alone
            kwargs["mm_token_type_ids"] = (input_ids == image_token_id).int()
        return forward(*args, input_ids=input_ids, pixel_values=pixel_values, **kwargs)

    text_encoder.forward = forward_with_token_types
    if not hasattr(text_encoder.config, "hidden_size"):  # transformers 5 keeps it in text_config only
        text_encoder.config.hidden_size = text_encoder.config.text_config.hidden_size
    tokenizer = AutoTokenizer.from_pretrained(str(bundle / "processor"), local_files_only=True)
    cfg = json.loads((bundle / "processor" / "preprocessor_config.json").read_text())
    if image_processor_backend == "pil":
        image_processor = Qwen2VLImageProcessorPil(
            size={"shortest_edge": cfg["min_pixels"], "longest_edge": cfg["max_pixels"]},
            **{k: cfg[k] for k in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")})
    else:
        image_processor = FastImageProcessor(build_image_processor(bundle / "processor", backend="torchvision"))
    # transformers' processor class checks its video processor's class, which needs torchvision;
    # images only here, so that check is skipped while it is built (the processor itself is stock).
    from transformers.processing_utils import ProcessorMixin

    check = ProcessorMixin.check_argument_for_proper_class
    ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: None
    class Processor(Qwen2_5_VLProcessor):
        """transformers 4.57's text-only call: the tokenizer on the text as given (5 refuses text
        with an ``<|image_pad|>`` and no image, which upstream's per-piece tokenization sends)."""

        def __call__(self, images=None, text=None, videos=None, **kwargs):
            if images is None and videos is None:
                return self.tokenizer(text, padding=kwargs.get("padding", False),
                                      return_tensors=kwargs.get("return_tensors"))
            return super().__call__(images=images, text=text, videos=videos, **kwargs)

    try:
        processor = Processor(image_processor=image_processor, tokenizer=tokenizer,
                              chat_template=tokenizer.chat_template)
    finally:
        ProcessorMixin.check_argument_for_proper_class = check
    pipe = RealRestorerPipeline(
        transformer=transformer.to(dtype), vae=vae.to(dtype), text_encoder=text_encoder, processor=processor,
        scheduler=RealRestorerFlowMatchScheduler(), version="v1.1", model_guidance=3.5, max_length=640,
    )
    return pipe.to("cpu")


def align_posterior_sample() -> dict:
    """Give upstream's VAE posterior this project's seeded sample instead of the global RNG's."""
    from diffusers.models.realrestorer import autoencoder as upstream_ae

    current = {"seed": None}

    def forward(self, z):
        mean, logvar = torch.chunk(z, 2, dim=self.chunk_dim)
        if not self.sample:
            return mean
        g = torch.Generator(mean.device).manual_seed(posterior_seed(current["seed"]))
        noise = torch.randn(mean.shape, generator=g, device=mean.device, dtype=torch.float32).to(mean.dtype)
        std = torch.exp(0.5 * logvar)
        return mean + std * noise

    upstream_ae.DiagonalGaussian.forward = forward
    return current


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkout", type=Path, help="a RealRestorer checkout (github.com/yfyang007/RealRestorer)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--size", type=int, default=128, help="size_level")
    ap.add_argument("--width", type=int, default=160)
    ap.add_argument("--height", type=int, default=120)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--upstream-image-processor", choices=("torchvision", "pil"), default="torchvision",
                    help="upstream's image processor: torchvision (its pinned environment) or pil (to see "
                         "what the choice changes; ours always follows the variant)")
    ap.add_argument("--extra-path", action="append", default=[], help="a folder put on sys.path (einops, httpx)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="rr-parity-") as tmp:
        tmp = Path(tmp)
        bundle = make_tiny_weights(tmp / "bundle", seed=0, layout="realrestorer")
        from transformers import AutoTokenizer

        tok = PromptTokenizer(AutoTokenizer.from_pretrained(str(bundle / "processor"), local_files_only=True))
        scratch = scratch_diffusers(args.checkout, tmp / "upstream", tok.prefix_drop,
                                    (tok.quote_open_id, tok.quote_close_id), tok.vision_end_id)
        sys.path[:0] = [str(scratch), *args.extra_path]
        for name in [m for m in sys.modules if m == "diffusers" or m.startswith("diffusers.")]:
            del sys.modules[name]  # the scratch copy, not the installed diffusers
        current = align_posterior_sample()
        import diffusers

        print(f"upstream diffusers from {Path(diffusers.__file__).parent}; prefix drop {tok.prefix_drop}; "
              f"{args.steps} steps, CFG {args.guidance}, size_level {args.size}, input {args.width}x{args.height}")
        images = [picture(i, args.height, args.width) for i in range(len(PROMPTS))]
        seeds = [11 * (i + 1) for i in range(len(PROMPTS))]
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            theirs_pipe = upstream_pipeline(bundle, dtype, args.upstream_image_processor)
            ours_pipe = Step1XEditPipeline.from_pretrained(bundle, dtype=dtype_name, max_batch_size=1)
            assert ours_pipe.engine.variant.name == "realrestorer"
            t0 = time.perf_counter()
            ours = ours_pipe.edit(images, list(PROMPTS), seeds=seeds, num_steps=args.steps,
                                  guidance_scale=args.guidance, size_level=args.size)
            t1 = time.perf_counter()
            values = []
            for img, prompt, seed, mine in zip(images, PROMPTS, seeds, ours):
                current["seed"] = seed
                out = theirs_pipe(image=Image.fromarray(img), prompt=prompt, negative_prompt="",
                                  num_inference_steps=args.steps, guidance_scale=args.guidance, seed=seed,
                                  size_level=args.size).images[0]
                theirs = np.asarray(out)
                assert theirs.shape == mine.image.shape, (theirs.shape, mine.image.shape)
                value = psnr(theirs, mine.image)
                values.append(value)
                diff = np.abs(theirs.astype(int) - mine.image.astype(int))
                print(f"  {dtype_name:8s} seed {seed:3d} {prompt[:40]!r:44s} PSNR {value:7.2f} dB  "
                      f"max |diff| {diff.max()}  differing values {np.mean(diff > 0):.4%}")
            print(f"{dtype_name}: min PSNR {min(values):.2f} dB over {len(values)} rows "
                  f"(ours {t1 - t0:.1f} s, upstream {time.perf_counter() - t1:.1f} s)")


if __name__ == "__main__":
    main()
