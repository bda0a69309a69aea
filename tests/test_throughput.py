"""The GPU throughput switches, checked for their numbers on the CPU: the attention kernel choice,
regional compilation, and no host sync inside the step loop (both families, tiny weights)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from step1x_batch.models import kernels
from step1x_batch.models.base import EditParams, EditRequest, ModelSpec, edit_prepared
from step1x_batch.models.qwen_image_edit.family import QwenImageEditFamily
from step1x_batch.models.qwen_image_edit.tiny import make_tiny_weights as make_tiny_qwen
from step1x_batch.models.step1x.family import Step1XFamily
from step1x_batch.models.step1x.tiny import make_tiny_weights as make_tiny_step1x

QWEN_OPTIONS = {"vl_area": 64 * 64, "reference_area": 64 * 64}


@pytest.fixture(scope="module")
def step1x_weights(tmp_path_factory):
    return make_tiny_step1x(tmp_path_factory.mktemp("s1x"), seed=0)


@pytest.fixture(scope="module")
def qwen_weights(tmp_path_factory):
    return make_tiny_qwen(tmp_path_factory.mktemp("qie") / "w", seed=0)


def picture(seed: int, h: int = 48, w: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def run(family, folder, requests):
    prepare, engine = family.preparer(folder), family.load(folder, "cpu")
    return engine, edit_prepared(engine, [prepare(r) for r in requests], family.spec.max_batch_size)


def step1x(folder, **spec):
    return Step1XFamily(ModelSpec("step1x", {}, str(folder), "float32", **spec))


def qwen(folder, **spec):
    return QwenImageEditFamily(ModelSpec("qwen-image-edit", QWEN_OPTIONS, str(folder), "float32", **spec))


REQUESTS = [EditRequest([picture(i)], f"edit number {i}", i, EditParams(2, 4.0, 64, " ")) for i in range(2)]


# --- the attention kernel -------------------------------------------------------------------------


def test_preference_puts_cudnn_first_on_hopper_only(monkeypatch):
    assert kernels.preference(torch.device("cpu"))[0] == "flash"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert kernels.preference(torch.device("cuda"))[:2] == ["cudnn", "flash"]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert kernels.preference(torch.device("cuda"))[:2] == ["flash", "efficient"]


def test_choose_picks_the_first_kernel_that_runs_and_refuses_ones_that_do_not():
    cpu = torch.device("cpu")
    # torch's CPU build has the flash kernel (unmasked) and math; not cuDNN or memory-efficient
    assert kernels.runs("flash", cpu, torch.float32, 16, masked=False)
    assert not kernels.runs("cudnn", cpu, torch.float32, 16, masked=False)
    assert kernels.choose_attention("auto", cpu, torch.float32, 16, masked=False) == "flash"
    masked = kernels.choose_attention("auto", cpu, torch.float32, 16, masked=True)
    assert masked == next(n for n in kernels.preference(cpu) if kernels.runs(n, cpu, torch.float32, 16, True))
    assert kernels.choose_attention("math", cpu, torch.float32, 16, masked=True) == "math"
    with pytest.raises(ValueError, match="does not run on cpu"):
        kernels.choose_attention("cudnn", cpu, torch.float32, 16, masked=False)
    with pytest.raises(ValueError, match="unknown attention kernel"):
        kernels.choose_attention("fastest", cpu, torch.float32, 16, masked=False)


@pytest.mark.parametrize("make", [step1x, qwen], ids=["step1x", "qwen-image-edit"])
def test_the_kernel_choice_keeps_the_numbers(make, step1x_weights, qwen_weights):
    folder = step1x_weights if make is step1x else qwen_weights
    auto_engine, auto = run(make(folder), folder, REQUESTS)
    math_engine, math = run(make(folder, attention="math"), folder, REQUESTS)
    assert math_engine.attention == "math" and auto_engine.attention in kernels.BACKENDS
    for a, b in zip(auto, math):
        assert np.abs(a.image.astype(int) - b.image.astype(int)).max() <= 1


# --- regional compilation --------------------------------------------------------------------------


def test_regional_compile_keeps_keys_and_numbers(step1x_weights):
    eager_engine, eager = run(step1x(step1x_weights), step1x_weights, REQUESTS[:1])
    engine, compiled = run(step1x(step1x_weights, compile=True), step1x_weights, REQUESTS[:1])
    assert list(engine.dit.state_dict()) == list(eager_engine.dit.state_dict())  # compiled in place
    assert all(hasattr(b, "_compiled_call_impl") and b._compiled_call_impl is not None
               for b in list(engine.dit.double_blocks) + list(engine.dit.single_blocks))
    assert np.abs(eager[0].image.astype(int) - compiled[0].image.astype(int)).max() <= 1


# --- no host sync inside the step loop ----------------------------------------------------------


SYNCS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__")


@pytest.mark.parametrize("make", [step1x, qwen], ids=["step1x", "qwen-image-edit"])
def test_no_host_sync_inside_the_step_loop(make, step1x_weights, qwen_weights, monkeypatch):
    """Every way a tensor becomes a Python value (a device->host sync on a GPU) raises while the
    denoise loop runs; the edit still completes, so the loop never waits for the device."""
    folder = step1x_weights if make is step1x else qwen_weights
    module = __import__(
        "step1x_batch.models.step1x.pipeline" if make is step1x else "step1x_batch.models.qwen_image_edit.pipeline",
        fromlist=["denoise"],
    )
    real = module.denoise
    calls = []

    def guarded(*args, **kwargs):
        with pytest.MonkeyPatch.context() as mp:
            for name in SYNCS:
                def refuse(self, *a, _name=name, **k):
                    raise AssertionError(f"Tensor.{_name} inside the step loop (a host sync on a GPU)")
                mp.setattr(torch.Tensor, name, refuse)
            with pytest.raises(AssertionError, match="host sync"):  # the guard does catch a sync
                torch.ones(1).item()
            out = real(*args, **kwargs)
        calls.append(out.shape)
        return out

    monkeypatch.setattr(module, "denoise", guarded)
    _, outs = run(make(folder), folder, REQUESTS)
    assert calls and all(o.error_type is None for o in outs)
