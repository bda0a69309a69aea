"""LoRA adapters merged at load time (step1x_batch.models.lora), for both families.

diffusers' own ``load_lora_weights`` + ``fuse_lora`` (with peft) is the oracle for the
Qwen-Image-Edit transformer: final latents of a full edit, and the fused weights for every key
spelling diffusers reads. Step1X-Edit's own format is checked against its formula
``W + multiplier * alpha / rank * up @ down`` on the tiny native DiT.
"""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torchvision_cpu import TORCHVISION  # noqa: F401  (before diffusers imports transformers' image processors)

import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus
from step1x_batch.models.loading import WeightsError
from step1x_batch.models.base import AdapterSpec
from step1x_batch.models.lora import merge_adapters
from step1x_batch.models.qwen_image_edit.tiny import make_tiny_weights
from step1x_batch.models.step1x.dit import Step1XDiT
from step1x_batch.models.step1x.layers import Fp8Linear, keep_fp8_storage
from step1x_batch.models.step1x.tiny import TINY_DIT, tiny_dit_state_dict
from test_qwen_image_edit import REF_AREA, VL_AREA, Oracle, picture, rel_err, request
from test_qwen_image_edit import family as qwen_family

# PixelSmile's targets (configs/example.yaml), per transformer block.
PIXELSMILE_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
    "attn.to_out.0", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
)
QWEN_TARGETS = [f"transformer_blocks.{i}.{t}" for i in range(2) for t in PIXELSMILE_TARGETS]
STEP1X_TARGETS = (
    [f"double_blocks.{i}.{s}_{m}" for i in range(TINY_DIT.depth) for s in ("img", "txt")
     for m in ("mod.lin", "attn.qkv", "attn.proj", "mlp.0", "mlp.2")]
    + [f"single_blocks.{i}.{m}" for i in range(TINY_DIT.depth_single_blocks)
       for m in ("linear1", "linear2", "modulation.lin")]
)


# --- adapters made in code -------------------------------------------------------------------------


def random_lora(model: nn.Module, targets, seed: int, alphas=(None, 8.0, 1.5, 3.0), ranks=(4, 3)) -> dict:
    """module name -> (down (r, in), up (out, r), alpha or None): random A and B (B is not zero, as
    it is before training), ranks and alphas cycling so that alpha != rank somewhere."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, name in enumerate(targets):
        layer = model.get_submodule(name)
        r = ranks[i % len(ranks)]
        down = torch.randn(r, layer.in_features, generator=g) / layer.in_features**0.5
        up = 0.3 * torch.randn(layer.out_features, r, generator=g) / r**0.5
        out[name] = (down, up, alphas[i % len(alphas)])
    return out


def ratio(down: torch.Tensor, alpha) -> float:
    return 1.0 if alpha in (None, 0) else alpha / down.shape[0]


def kohya_name(name: str) -> str:
    return "lora_unet_" + name.replace(".", "_")


def write(path, tensors: dict, metadata=None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def lora_tensors(lora: dict, spelling: str, prefix: str = "transformer.") -> dict:
    """The same adapter in one file layout."""
    sd = {}
    for name, (down, up, alpha) in lora.items():
        a = None if alpha is None else torch.tensor(float(alpha))
        if spelling == "peft":
            sd[f"{prefix}{name}.lora_A.weight"], sd[f"{prefix}{name}.lora_B.weight"] = down, up
            if a is not None:
                sd[f"{prefix}{name}.alpha"] = a
        elif spelling == "old":  # diffusers' save_lora_weights after convert_state_dict_to_diffusers
            assert a is None
            sd[f"{prefix}{name}.lora.down.weight"], sd[f"{prefix}{name}.lora.up.weight"] = down, up
        elif spelling == "comfy":
            sd[f"diffusion_model.{name}.lora_down.weight"], sd[f"diffusion_model.{name}.lora_up.weight"] = down, up
            if a is not None:
                sd[f"diffusion_model.{name}.alpha"] = a
        elif spelling == "kohya":
            k = kohya_name(name)
            sd[f"{k}.lora_down.weight"], sd[f"{k}.lora_up.weight"] = down, up
            if a is not None:
                sd[f"{k}.alpha"] = a
        elif spelling == "diffsynth":  # no alpha in DiffSynth files: fold alpha / rank into B
            sd[f"{name}.lora_A.default.weight"] = down
            sd[f"{name}.lora_B.default.weight"] = up * ratio(down, alpha)
        else:
            raise ValueError(spelling)
    return sd


def expected_weights(model: nn.Module, lora: dict, scale: float) -> dict[str, torch.Tensor]:
    return {f"{name}.weight": model.get_submodule(name).weight.detach().float()
            + scale * ratio(down, alpha) * (up @ down) for name, (down, up, alpha) in lora.items()}


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


# --- models ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_weights(tmp_path_factory.mktemp("qwen-lora") / "tiny", seed=0)


@pytest.fixture(scope="module")
def qwen_base(tiny):
    """The tiny Qwen-Image-Edit transformer as our engine loads it (copy it before merging)."""
    return qwen_family().load(tiny, "cpu").transformer


@pytest.fixture()
def qwen(qwen_base):
    return copy.deepcopy(qwen_base)


@pytest.fixture()
def dit():
    model = Step1XDiT(TINY_DIT)
    sd = {k: v.float() for k, v in tiny_dit_state_dict(seed=0).items() if not k.startswith("connector.")}
    model.load_state_dict(sd)
    return model


@pytest.fixture()
def diffusers_transformer(tiny):
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel.from_pretrained(tiny / "transformer")  # float32


def diffusers_fused(transformer, path, scale: float) -> dict[str, torch.Tensor]:
    """diffusers' load_lora_weights path on the transformer alone, then fuse_lora + unload."""
    from diffusers import QwenImageEditPlusPipeline

    sd, metadata = QwenImageEditPlusPipeline.lora_state_dict(str(path), return_lora_metadata=True)
    QwenImageEditPlusPipeline.load_lora_into_transformer(sd, transformer=transformer, adapter_name="a",
                                                         metadata=metadata)
    transformer.fuse_lora(lora_scale=scale)
    transformer.unload_lora()
    return state(transformer)


# --- Qwen-Image-Edit: parity with diffusers ---------------------------------------------------------


def test_peft_lora_edit_equals_diffusers_load_lora_weights_and_fuse_lora(tiny, tmp_path):
    """A full edit (4 steps, true CFG, one reference) with a PEFT LoRA: final latents of our engine
    with the adapter merged by merge_adapters == diffusers' pipeline after load_lora_weights +
    fuse_lora, float32, same scale."""
    engine = qwen_family().load(tiny, "cpu")
    lora = random_lora(engine.transformer, QWEN_TARGETS, seed=1)
    # No prefix: with ``.alpha`` tensors diffusers' Qwen converter runs and prepends ``transformer.``
    # itself (a ``transformer.``-prefixed file with alphas fails to load there: doubled prefix).
    path = write(tmp_path / "peft.safetensors", lora_tensors(lora, "peft", prefix=""))
    scale = 0.8
    images, text, seed, neg = [picture(7, 32, 48)], "make it a cat", 14, " "
    row = qwen_family().preparer(tiny)(request(images, text, seed, neg))
    base = engine.generate([row]).latents

    changed_names = merge_adapters(engine.transformer, [AdapterSpec(path, scale)], family="qwen-image-edit")
    assert sorted(changed_names) == sorted(QWEN_TARGETS)
    ours = engine.generate([row]).latents

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plus, "CONDITION_IMAGE_SIZE", VL_AREA)
        mp.setattr(plus, "VAE_IMAGE_SIZE", REF_AREA)
        oracle = Oracle(tiny, torch.float32)
        oracle.pipe.load_lora_weights(str(path), adapter_name="pixelsmile")
        oracle.pipe.fuse_lora(lora_scale=scale)
        theirs = oracle(row, images, text, seed, neg)
    err = rel_err(ours, theirs)
    print(f"PEFT LoRA, scale {scale}: float32 relative error vs diffusers load_lora_weights + fuse_lora {err:.2e}")
    assert err <= 1e-5
    assert rel_err(base, theirs) > 1e-2  # the adapter really changes the edit


def test_pipeline_from_pretrained_takes_adapters_like_the_family(tiny, tmp_path):
    """``QwenImageEditPipeline.from_pretrained(adapters=...)`` (a mapping, as the config spells one)
    merges what the family's load merges: the same transformer weights, the same edit."""
    import numpy as np

    from step1x_batch.models.base import ModelSpec
    from step1x_batch.models.qwen_image_edit.family import QwenImageEditFamily
    from step1x_batch.models.qwen_image_edit.pipeline import QwenImageEditPipeline
    from test_qwen_image_edit import OPTIONS, SIZE_LEVEL, STEPS

    family = QwenImageEditFamily(ModelSpec("qwen-image-edit", OPTIONS, "tiny", "float32", max_batch_size=1))
    base = family.load(tiny, "cpu")
    path = write(tmp_path / "peft.safetensors", lora_tensors(random_lora(base.transformer, QWEN_TARGETS, seed=4),
                                                             "peft", prefix=""))
    merged = family.load(tiny, "cpu", adapters=[AdapterSpec(path, 0.7)])
    pipe = QwenImageEditPipeline.from_pretrained(tiny, dtype="float32", max_batch_size=1,
                                                 adapters=[{"path": str(path), "scale": 0.7}], **OPTIONS)
    ours, theirs, plain = state(pipe.engine.transformer), state(merged.transformer), state(base.transformer)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert sorted(k for k in ours if not torch.equal(ours[k], plain[k])) == sorted(f"{t}.weight" for t in QWEN_TARGETS)
    images, text, seed = [picture(7, 32, 48)], "make it a cat", 14
    row = family.preparer(tiny)(request(images, text, seed))
    expected = merged.edit([row])[0].image
    got = pipe.edit([images], [text], [seed], num_steps=STEPS, size_level=SIZE_LEVEL)[0].image
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("spelling", ["old", "comfy", "kohya", "diffsynth", "metadata"])
def test_every_spelling_fuses_the_weights_diffusers_fuses(qwen, diffusers_transformer, tmp_path, spelling):
    """Every weight after our merge == diffusers' fused weights for the same file and scale:
    PixelSmile's spelling (``transformer.*.lora.down/up``, no alpha: scale 1), ComfyUI's
    (``diffusion_model.*.lora_down/up`` + alpha), kohya's (``lora_unet_*``), DiffSynth's
    (``lora_A.default``) and diffusers' ``lora_adapter_metadata`` (alpha in the header)."""
    from diffusers import QwenImageEditPlusPipeline

    alphas = (None,) if spelling in ("old", "metadata") else (None, 8.0, 1.5, 3.0)
    ranks = (4,) if spelling == "metadata" else (4, 3)
    lora = random_lora(qwen, QWEN_TARGETS, seed=2, alphas=alphas, ranks=ranks)
    path = tmp_path / f"{spelling}.safetensors"
    if spelling == "metadata":  # written by diffusers itself, alpha 8 and 2 by pattern for rank 4
        layers = {f"{n}.lora_A.weight": d for n, (d, u, _) in lora.items()}
        layers.update({f"{n}.lora_B.weight": u for n, (d, u, _) in lora.items()})
        config = {"r": 4, "lora_alpha": 8, "alpha_pattern": {"transformer_blocks.1.attn.to_q": 2},
                  "target_modules": list(PIXELSMILE_TARGETS)}
        QwenImageEditPlusPipeline.save_lora_weights(tmp_path, transformer_lora_layers=layers,
                                                    transformer_lora_adapter_metadata=config,
                                                    weight_name=path.name)
        with safe_open(str(path), framework="pt") as f:
            assert json.loads(f.metadata()["lora_adapter_metadata"])["transformer.lora_alpha"] == 8
    else:
        write(path, lora_tensors(lora, spelling))
    scale = 0.7
    before = state(qwen)
    names = merge_adapters(qwen, [AdapterSpec(path, scale)], family="qwen-image-edit")
    ours = state(qwen)
    theirs = diffusers_fused(diffusers_transformer, path, scale)
    assert set(theirs) == set(ours)
    assert changed(before, theirs) == changed(before, ours) == {f"{n}.weight" for n in QWEN_TARGETS}
    assert sorted(names) == sorted(QWEN_TARGETS)
    worst = max(rel_err(ours[k], theirs[k]) for k in ours)
    print(f"{spelling}: worst relative error of a fused weight vs diffusers {worst:.1e}")
    assert worst < 1e-6
    if spelling == "metadata":  # the pattern's alpha is in effect (2 / 4, not 8 / 4)
        down, up, _ = lora["transformer_blocks.1.attn.to_q"]
        key = "transformer_blocks.1.attn.to_q.weight"
        assert torch.allclose(ours[key], before[key] + scale * 0.5 * up @ down, atol=1e-6)


def test_kohya_diffsynth_and_prefixed_copies_merge_like_the_peft_one(qwen_base, tmp_path):
    """The same adapter in every layout gives the same merged weights (every changed tensor),
    and these are W + scale * alpha / rank * B @ A (alpha / rank = 1 without an alpha)."""
    lora = random_lora(qwen_base, QWEN_TARGETS, seed=3)
    scale = 1.3
    expected = expected_weights(qwen_base, lora, scale)
    layouts = {
        "peft": (lora_tensors(lora, "peft"), "peft"),
        "peft-no-prefix": (lora_tensors(lora, "peft", prefix=""), "diffusers"),
        "peft-base-model": (lora_tensors(lora, "peft", prefix="base_model.model."), "auto"),
        "comfy": (lora_tensors(lora, "comfy"), "peft"),
        "kohya": (lora_tensors(lora, "kohya"), "kohya"),
        "kohya-auto": (lora_tensors(lora, "kohya"), "auto"),
        "diffsynth": (lora_tensors(lora, "diffsynth"), "diffsynth"),
    }
    merged = {}
    for name, (tensors, fmt) in layouts.items():
        model = copy.deepcopy(qwen_base)
        before = state(model)
        names = merge_adapters(model, [AdapterSpec(write(tmp_path / f"{name}.safetensors", tensors), scale, fmt)],
                               family="qwen-image-edit")
        after = state(model)
        assert sorted(names) == sorted(QWEN_TARGETS), name
        assert changed(before, after) == set(expected), name
        merged[name] = {k: after[k] for k in expected}
    for k, want in expected.items():
        assert rel_err(merged["peft"][k], want) < 1e-6, k
        for name in ("peft-no-prefix", "peft-base-model", "comfy", "kohya", "kohya-auto"):
            assert torch.equal(merged[name][k], merged["peft"][k]), (name, k)  # same arithmetic: bitwise
        assert rel_err(merged["diffsynth"][k], merged["peft"][k]) < 1e-6, k  # alpha folded into B


def test_two_adapters_add_up(qwen_base, tmp_path):
    a = random_lora(qwen_base, QWEN_TARGETS[:6], seed=4)
    b = random_lora(qwen_base, QWEN_TARGETS[3:], seed=5)
    pa = write(tmp_path / "a.safetensors", lora_tensors(a, "peft"))
    pb = write(tmp_path / "b.safetensors", lora_tensors(b, "kohya"))
    model = copy.deepcopy(qwen_base)
    job_spec = SimpleNamespace(path=pb, scale=-1.0, format="auto")  # the job's own spec class works too
    names = merge_adapters(model, [AdapterSpec(pa, 0.5), job_spec], family="qwen-image-edit")
    assert sorted(names) == sorted(QWEN_TARGETS)
    for name in QWEN_TARGETS:
        w = qwen_base.get_submodule(name).weight.detach().clone()
        if name in a:
            d, u, al = a[name]
            w = w + 0.5 * ratio(d, al) * u @ d
        if name in b:
            d, u, al = b[name]
            w = w - ratio(d, al) * u @ d
        assert rel_err(model.get_submodule(name).weight, w) < 1e-6, name


# --- Step1X-Edit: the release's own format on the native DiT ---------------------------------------


def test_step1x_lora_merges_by_the_release_formula(dit, tmp_path):
    """Every Linear of every Double/SingleStreamBlock (qkv fused): W + multiplier * alpha / rank *
    up @ down (alpha 0 or none: rank); every other tensor bit-identical."""
    lora = random_lora(dit, STEP1X_TARGETS, seed=6, alphas=(16.0, 0.0, None, 2.0), ranks=(8, 4))
    path = write(tmp_path / "step1x.safetensors", lora_tensors(lora, "kohya"))
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in lora_tensors(lora, "kohya")
    scale = 0.9
    expected = expected_weights(dit, lora, scale)
    before = state(dit)
    names = merge_adapters(dit, [AdapterSpec(path, scale, "step1x")], family="step1x")
    after = state(dit)
    assert sorted(names) == sorted(STEP1X_TARGETS)
    assert changed(before, after) == set(expected)
    for k, want in expected.items():
        assert torch.equal(after[k], want), k  # the same float32 arithmetic
        assert rel_err(after[k], before[k]) > 1e-3, k  # really changed
    untouched = set(before) - set(expected)
    assert "img_in.weight" in untouched and "double_blocks.0.img_attn.qkv.bias" in untouched
    assert all(torch.equal(before[k], after[k]) for k in untouched)
    # bf16 weights (the release's dtype): merged in float32, rounded once.
    dit16 = copy.deepcopy(dit).to(torch.bfloat16)
    w16 = state(dit16)
    merge_adapters(dit16, [AdapterSpec(path, scale, "auto")], family="step1x")
    qkv = "double_blocks.0.img_attn.qkv"
    d, u, al = lora[qkv]
    want = (w16[f"{qkv}.weight"].float() + scale * ratio(d, al) * (u @ d)).to(torch.bfloat16)
    assert dit16.get_submodule(qkv).weight.dtype == torch.bfloat16
    assert torch.equal(dit16.get_submodule(qkv).weight, want)


def test_fp8_weights_keep_fp8_storage_or_refuse(dit, tmp_path):
    """An Fp8Linear target keeps float8 storage when the merge survives rounding to fp8, and the
    adapters are refused (nothing merged) when rounding to fp8 would drop the change."""
    fp8 = torch.float8_e4m3fn
    qkv = "double_blocks.0.img_attn.qkv"
    keep_fp8_storage(dit, {f"{qkv}.weight"}, fp8)
    layer = dit.get_submodule(qkv)
    assert isinstance(layer, Fp8Linear) and layer.weight.dtype == fp8
    lora = random_lora(dit, [qkv, "double_blocks.0.img_attn.proj"], seed=7, alphas=(None,))
    path = write(tmp_path / "fp8.safetensors", lora_tensors(lora, "kohya"))
    before = state(dit)
    with pytest.raises(WeightsError, match=rf"{qkv}: its torch.float8_e4m3fn weight cannot hold"):
        merge_adapters(dit, [AdapterSpec(path, 0.01)], family="step1x")  # tiny change: rounded away
    assert changed(before, state(dit)) == set()  # the bf16 / fp32 target is not merged either
    names = merge_adapters(dit, [AdapterSpec(path, 20.0)], family="step1x")  # a change fp8 can hold
    assert names == [qkv, "double_blocks.0.img_attn.proj"]
    d, u, _ = lora[qkv]
    assert layer.weight.dtype == fp8
    assert torch.equal(layer.weight, (before[f"{qkv}.weight"].float() + 20.0 * (u @ d)).to(fp8))
    assert rel_err(layer.weight.float() - before[f"{qkv}.weight"].float(), 20.0 * (u @ d)) < 0.1


# --- refusals ----------------------------------------------------------------------------------------


def _bad_adapter(case: str, model: nn.Module, family: str, tmp_path):
    """(spec, substrings the error must name) for one kind of bad adapter."""
    if family == "qwen-image-edit":
        good = lora_tensors(random_lora(model, QWEN_TARGETS, seed=8), "peft")
        first_a = "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"
    else:
        good = lora_tensors(random_lora(model, STEP1X_TARGETS, seed=8), "kohya")
        first_a = "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"
    fmt = "auto"
    if case == "foreign key":
        key = "transformer.transformer_blocks.0.attn.to_q.weight"
        good[key] = torch.zeros(3)
        names = [key]
    elif case == "wrong shape":
        good[first_a] = torch.randn(good[first_a].shape[0], good[first_a].shape[1] + 1)
        names = [f"{first_a} {tuple(good[first_a].shape)}"]
    elif case == "missing half":
        del good[first_a.replace("lora_A", "lora_B").replace("lora_down", "lora_up")]
        names = [first_a, "no up"]
    elif case == "text encoder":
        key = "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"
        good[key] = torch.zeros(4, 8)
        names = [key, "text-encoder"]
    elif case == "other family":
        other = Step1XDiT(TINY_DIT) if family == "qwen-image-edit" else None
        if other is not None:
            good = lora_tensors(random_lora(other, STEP1X_TARGETS, seed=9), "kohya")
            names = ["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", "step1x"]
        else:
            good = lora_tensors({n: (torch.zeros(2, 16), torch.zeros(16, 2), None) for n in QWEN_TARGETS}, "peft")
            names = ["transformer.transformer_blocks.0.attn.to_q.lora_A.weight", "qwen-image-edit"]
    elif case == "unknown format":
        fmt, names = "lycoris", ["unknown adapter format 'lycoris'"]
    elif case == "wrong format":
        fmt = "diffsynth"
        names = [first_a, "not in the 'diffsynth' format"]
    else:
        raise ValueError(case)
    return AdapterSpec(write(tmp_path / f"{case}.safetensors", good), 1.0, fmt), names


CASES = ["foreign key", "wrong shape", "missing half", "text encoder", "other family", "unknown format",
         "wrong format"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("family", ["qwen-image-edit", "step1x"])
def test_bad_adapter_is_refused_by_name_and_nothing_is_merged(qwen_base, dit, tmp_path, family, case):
    model = copy.deepcopy(qwen_base) if family == "qwen-image-edit" else dit
    targets = QWEN_TARGETS if family == "qwen-image-edit" else STEP1X_TARGETS
    fine = tmp_path / "fine.safetensors"
    write(fine, lora_tensors(random_lora(model, targets, seed=10), "kohya"))
    bad, names = _bad_adapter(case, model, family, tmp_path)
    before = state(model)
    with pytest.raises(WeightsError) as e:  # the good adapter comes first: still nothing merged
        merge_adapters(model, [AdapterSpec(fine), bad], family=family)
    msg = str(e.value)
    for name in names:
        assert name in msg, (name, msg)
    assert "nothing merged" in msg and str(fine) not in msg  # the good adapter is fine
    assert changed(before, state(model)) == set()


def test_every_problem_is_named_at_once(qwen, tmp_path):
    lora = lora_tensors(random_lora(qwen, QWEN_TARGETS, seed=11), "peft")
    a0 = "transformer.transformer_blocks.0.attn.to_k.lora_A.weight"
    lora[a0] = torch.randn(4, 7)
    del lora["transformer.transformer_blocks.1.attn.to_v.lora_B.weight"]
    lora["transformer.not_a_module.lora_A.weight"] = torch.randn(2, 48)
    lora["transformer.not_a_module.lora_B.weight"] = torch.randn(48, 2)
    lora["some.stray.tensor"] = torch.zeros(1)
    lora["transformer.transformer_blocks.0.attn.to_q.lora_B.bias"] = torch.zeros(48)
    path = write(tmp_path / "many.safetensors", lora)
    before = state(qwen)
    with pytest.raises(WeightsError) as e:
        merge_adapters(qwen, [AdapterSpec(path), AdapterSpec(tmp_path / "absent.safetensors", 1.0, "kohya")],
                       family="qwen-image-edit")
    msg = str(e.value)
    for part in (f"{a0} (4, 7)", "transformer.transformer_blocks.1.attn.to_v.lora_A.weight",
                 "transformer.not_a_module.lora_A.weight", "some.stray.tensor", "lora_B.bias",
                 "absent.safetensors: no such weights file"):
        assert part in msg, (part, msg)
    assert "(6 problems)" in msg
    assert changed(before, state(qwen)) == set()


def test_kohya_names_resolve_against_the_models_own_module_names(tmp_path):
    """Underscores are ambiguous: ``lora_unet_x_y_z`` is the model's ``x_y.z`` (not ``x.y.z``); a
    flat name two modules share is refused, naming both."""
    model = nn.Module()
    model.x_y = nn.Module()
    model.x_y.z = nn.Linear(4, 3)
    model.a_b = nn.Module()
    model.a_b.c = nn.Linear(4, 3)
    model.a = nn.Module()
    model.a.b_c = nn.Linear(4, 3)
    d, u = torch.randn(2, 4), torch.randn(3, 2)
    path = write(tmp_path / "k.safetensors", {"lora_unet_x_y_z.lora_down.weight": d,
                                              "lora_unet_x_y_z.lora_up.weight": u,
                                              "lora_unet_x_y_z.alpha": torch.tensor(1.0)})
    w = model.x_y.z.weight.detach().clone()
    before_ab, before_a_bc = model.a_b.c.weight.detach().clone(), model.a.b_c.weight.detach().clone()
    assert merge_adapters(model, [AdapterSpec(path, 2.0, "kohya")], family="step1x") == ["x_y.z"]
    assert torch.equal(model.x_y.z.weight.detach(), w + 2.0 * 0.5 * (u @ d))
    path = write(tmp_path / "amb.safetensors",
                 {"lora_unet_a_b_c.lora_down.weight": d, "lora_unet_a_b_c.lora_up.weight": u})
    ambiguous = r"lora_unet_a_b_c matches several modules \((a_b\.c, a\.b_c|a\.b_c, a_b\.c)\)"
    with pytest.raises(WeightsError, match=ambiguous):
        merge_adapters(model, [AdapterSpec(path)], family="step1x")
    assert torch.equal(model.a_b.c.weight, before_ab) and torch.equal(model.a.b_c.weight, before_a_bc)


def test_step1x_format_is_for_the_step1x_family_only(qwen, tmp_path):
    path = write(tmp_path / "k.safetensors", lora_tensors(random_lora(qwen, QWEN_TARGETS[:1], seed=12), "kohya"))
    with pytest.raises(WeightsError, match="Step1X-Edit's own LoRA format"):
        merge_adapters(qwen, [AdapterSpec(path, 1.0, "step1x")], family="qwen-image-edit")
    assert merge_adapters(qwen, [AdapterSpec(path, 1.0, "kohya")], family="qwen-image-edit") == QWEN_TARGETS[:1]


# --- identity --------------------------------------------------------------------------------------


