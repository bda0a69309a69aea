"""Exact adapter switching on a resident denoiser (step1x_batch.models.adapter_sets), both families.

The oracle is the one-adapter job: a fresh copy of the base denoiser after ``merge_adapters`` with
the set's adapters (and, for the forward, an engine the family loaded with ``adapters=``). After
every switch the switched module's state_dict must be bit-identical to it, in bf16 and float32.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from step1x_batch.models.adapter_sets import AdapterSwitcher
from step1x_batch.models.base import AdapterSpec, ModelSpec
from step1x_batch.models.loading import WeightsError
from step1x_batch.models.lora import merge_adapters
from step1x_batch.models.qwen_image_edit.family import QwenImageEditFamily
from step1x_batch.models.qwen_image_edit.tiny import make_tiny_weights as tiny_qwen
from step1x_batch.models.step1x.dit import Step1XDiT
from step1x_batch.models.step1x.family import Step1XFamily
from step1x_batch.models.step1x.layers import keep_fp8_storage
from step1x_batch.models.step1x.tiny import TINY_DIT, tiny_dit_state_dict
from step1x_batch.models.step1x.tiny import make_tiny_weights as tiny_step1x
from test_lora import QWEN_TARGETS, STEP1X_TARGETS, changed, lora_tensors, random_lora, state, write
from test_qwen_image_edit import OPTIONS, picture, request

FAMILIES = {"step1x": (Step1XFamily, {}, STEP1X_TARGETS, ("peft", "kohya")),
            "qwen-image-edit": (QwenImageEditFamily, OPTIONS, QWEN_TARGETS, ("diffusers", "diffsynth"))}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("switch")
    return {"step1x": tiny_step1x(root / "step1x", seed=0), "qwen-image-edit": tiny_qwen(root / "qwen", seed=0)}


def load(family: str, folder, dtype: str, adapters=()):
    cls, options, _, _ = FAMILIES[family]
    return cls(ModelSpec(family, options, str(folder), dtype)).load(folder, "cpu", adapters)


def denoiser(engine) -> nn.Module:
    return engine.dit if hasattr(engine, "dit") else engine.transformer


def make_sets(model: nn.Module, family: str, folder) -> dict[str, list[AdapterSpec]]:
    """A (first format) and B (second format) overlap on some targets and each has targets of its
    own; C is A at another scale; AB and ABX: several adapters at once, X reaching targets neither
    A nor B changes (three terms on some targets: the summation order matters)."""
    _, _, targets, (fmt_a, fmt_b) = FAMILIES[family]
    n = len(targets)
    a = random_lora(model, targets[: n // 2], seed=21)
    b = random_lora(model, targets[n // 3: 5 * n // 6], seed=22, alphas=(4.0, None, 0.5))
    x = random_lora(model, targets[n // 4:], seed=24, ranks=(2, 5))
    spelling = {"peft": "peft", "diffusers": "peft", "kohya": "kohya", "diffsynth": "diffsynth"}
    pa = write(folder / f"a-{family}.safetensors", lora_tensors(a, spelling[fmt_a], prefix=""))
    pb = write(folder / f"b-{family}.safetensors", lora_tensors(b, spelling[fmt_b]))
    px = write(folder / f"x-{family}.safetensors", lora_tensors(x, "kohya"))
    return {"A": [AdapterSpec(pa, 0.8, fmt_a)], "B": [AdapterSpec(pb, 1.3, fmt_b)],
            "C": [AdapterSpec(pa, -0.45, fmt_a)], "AB": [AdapterSpec(pa, 0.8, fmt_a), AdapterSpec(pb, 0.6, fmt_b)],
            "ABX": [AdapterSpec(pa, 0.8, fmt_a), AdapterSpec(pb, 0.6, fmt_b), AdapterSpec(px, -0.3, "kohya")]}


def assert_same(got: dict, want: dict, where: str) -> None:
    assert got.keys() == want.keys(), where
    bad = [k for k in want if got[k].dtype != want[k].dtype or not torch.equal(got[k], want[k])]
    assert not bad, (where, bad[:5])


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("family", ["step1x", "qwen-image-edit"])
def test_every_switch_equals_a_fresh_merge_and_nothing_drifts(folders, tmp_path, family, dtype):
    module = denoiser(load(family, folders[family], dtype))
    pristine = copy.deepcopy(module)
    base = state(module)
    sets = make_sets(module, family, tmp_path)
    refs = {None: base}
    for name, specs in sets.items():
        fresh = copy.deepcopy(pristine)
        names = merge_adapters(fresh, specs, family=family)
        refs[name] = state(fresh)
        assert changed(base, refs[name]) == {f"{t}.weight" for t in names}  # the set really changes them
    assert len({tuple(float(v.float().sum()) for v in r.values()) for r in refs.values()}) == len(refs)

    switcher = AdapterSwitcher(module, family=family)
    for name, specs in sets.items():
        switcher.add_set(name, specs)
    assert switcher.sets == list(sets) and switcher.active is None
    assert_same(state(module), base, "staging changes no weight")
    a_or_b = {f"{t}.weight" for t in switcher.targets("A") + switcher.targets("B")}
    assert set(switcher.targets("A")) != set(switcher.targets("B"))
    assert set(switcher.targets("ABX")) - set(switcher.targets("A")) - set(switcher.targets("B"))

    order = ["A", "B", "A", None, "A", "C", "AB", "ABX", "B", None, "ABX", "A", "B"]
    for i, name in enumerate(order):
        versions = {k: p._version for k, p in module.named_parameters()}
        switcher.activate(name)
        assert switcher.active == name and switcher.switches == i + 1
        assert_same(state(module), refs[name], f"after switch {i} to {name}")
        if (order[i - 1] if i else None, name) == ("A", "B"):  # only A's and B's targets were written
            assert {k for k, p in module.named_parameters() if p._version != versions[k]} == a_or_b
    versions = {k: p._version for k, p in module.named_parameters()}
    switcher.activate(order[-1])  # the active set: a no-op
    assert switcher.switches == len(order)
    assert versions == {k: p._version for k, p in module.named_parameters()}
    mem = switcher.memory()
    kept = {t for s in sets for t in switcher.targets(s)}
    assert mem["base_bytes"] == sum(module.get_submodule(t).weight.nbytes for t in kept)
    assert 0 < mem["factor_bytes"] < 4 * sum(module.get_submodule(t).weight.numel() for t in kept)


def test_a_refused_set_stages_nothing_and_the_switcher_goes_on(folders, tmp_path):
    family = "qwen-image-edit"
    module = denoiser(load(family, folders[family], "bfloat16"))
    pristine = copy.deepcopy(module)
    sets = make_sets(module, family, tmp_path)
    switcher = AdapterSwitcher(module, family=family)
    switcher.add_set("A", sets["A"])
    switcher.activate("A")
    before, mem = state(module), switcher.memory()

    bad = lora_tensors(random_lora(module, QWEN_TARGETS[-3:], seed=23), "peft")
    key = "transformer.transformer_blocks.1.txt_mlp.net.2.lora_A.weight"
    bad[key] = torch.randn(bad[key].shape[0], bad[key].shape[1] + 1)
    bad["some.stray.tensor"] = torch.zeros(1)
    path = write(tmp_path / "bad.safetensors", bad)
    with pytest.raises(WeightsError) as e:
        switcher.add_set("bad", [*sets["B"], AdapterSpec(path, 1.0)])
    msg = str(e.value)
    assert key in msg and "some.stray.tensor" in msg and "(2 problems)" in msg and "nothing merged" in msg
    assert switcher.sets == ["A"] and switcher.active == "A" and switcher.memory() == mem
    assert_same(state(module), before, "a refused add_set writes nothing")
    with pytest.raises(KeyError, match=r"unknown adapter set 'bad'; known sets: 'A'"):
        switcher.activate("bad")
    with pytest.raises(ValueError, match="already staged"):
        switcher.add_set("A", sets["B"])

    switcher.add_set("B", sets["B"])
    switcher.activate("B")
    fresh = copy.deepcopy(pristine)
    merge_adapters(fresh, sets["B"], family=family)
    assert_same(state(module), state(fresh), "B after the refused set")
    with pytest.raises(ValueError, match="is active"):
        switcher.remove_set("B")
    switcher.remove_set("A")  # only B's targets' base weights stay
    assert set(switcher.targets("B")) == set(switcher._base) and switcher.sets == ["B"]
    switcher.activate(None)
    assert_same(state(module), state(pristine), "base after removing A")


def dit_forward(engine) -> torch.Tensor:
    """The DiT on a fixed input (the same tensors for every engine)."""
    g = torch.Generator().manual_seed(5)
    p, n, seq, txt_len = engine.dit.params, 2, 24, 7
    args = (torch.randn(n, seq, p.in_channels, generator=g), torch.randint(0, 4, (n, seq, 3), generator=g).float(),
            torch.randn(n, txt_len, p.context_in_dim, generator=g), torch.zeros(n, txt_len, 3),
            torch.tensor([0.3, 0.7]), torch.randn(n, p.vec_in_dim, generator=g))
    with torch.inference_mode(), engine._autocast():
        return engine.dit(*(a.to(engine.dtype) if i in (0, 2, 4, 5) else a for i, a in enumerate(args)))


def qwen_latents(engine, folder) -> torch.Tensor:
    row = QwenImageEditFamily(ModelSpec("qwen-image-edit", OPTIONS, str(folder), "float32")).preparer(folder)(
        request([picture(7, 32, 48)], "make it a cat", 14, steps=2))
    return engine.generate([row]).latents


@pytest.mark.parametrize("family,dtype", [("step1x", "bfloat16"), ("qwen-image-edit", "float32")])
def test_the_switched_engine_computes_what_the_one_adapter_engine_computes(folders, tmp_path, family, dtype):
    folder = folders[family]
    engine = load(family, folder, dtype)
    sets = make_sets(denoiser(engine), family, tmp_path)
    run = dit_forward if family == "step1x" else (lambda e: qwen_latents(e, folder))
    base_out = run(engine)
    switcher = AdapterSwitcher(denoiser(engine), family=family)
    for name, specs in sets.items():
        switcher.add_set(name, specs)
    for name in ("B", "AB", "A"):
        switcher.activate(name)
    ours = run(engine)
    theirs = run(load(family, folder, dtype, sets["A"]))
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, base_out)  # the adapter changes the output
    switcher.activate(None)
    assert torch.equal(run(engine), base_out)


def test_fp8_targets_switch_exactly_or_the_set_is_refused(tmp_path):
    """An Fp8Linear target is rounded back to fp8 from its kept base, as merge_adapters does; a
    set whose change fp8 cannot hold is refused by add_set as merge_adapters refuses it."""
    dit = Step1XDiT(TINY_DIT)
    dit.load_state_dict({k: v.float() for k, v in tiny_dit_state_dict(seed=0).items() if not k.startswith("connector.")})
    qkv = "double_blocks.0.img_attn.qkv"
    keep_fp8_storage(dit, {f"{qkv}.weight"}, torch.float8_e4m3fn)
    pristine = copy.deepcopy(dit)
    lora = random_lora(dit, [qkv, "double_blocks.0.img_attn.proj"], seed=7, alphas=(None,))
    path = write(tmp_path / "fp8.safetensors", lora_tensors(lora, "kohya"))
    switcher = AdapterSwitcher(dit, family="step1x")
    with pytest.raises(WeightsError, match=rf"nothing staged .*{qkv}: its torch.float8_e4m3fn weight cannot hold"):
        switcher.add_set("faint", [AdapterSpec(path, 0.01)])
    assert switcher.sets == [] and switcher.memory()["base_bytes"] == 0
    switcher.add_set("strong", [AdapterSpec(path, 20.0)])
    switcher.add_set("other", [AdapterSpec(path, -15.0)])
    refs = {}
    for name, scale in (("strong", 20.0), ("other", -15.0)):
        fresh = copy.deepcopy(pristine)
        merge_adapters(fresh, [AdapterSpec(path, scale)], family="step1x")
        refs[name] = state(fresh)
    for name in ("strong", "other", "strong", None, "other"):
        switcher.activate(name)
        assert dit.get_submodule(qkv).weight.dtype == torch.float8_e4m3fn
        assert_same(state(dit), refs[name] if name else state(pristine), f"fp8 after {name}")
