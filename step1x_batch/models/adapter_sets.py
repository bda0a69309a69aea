"""Several named LoRA sets on one resident denoiser, switched exactly (issue 22, the model part).

A GPU actor that serves rows of several adapter sets keeps the denoiser loaded and switches its
weights between sets instead of reloading 40-60 GB per set. A switch must give the same bytes as a
job that loaded the base weights and merged that one set with
:func:`~step1x_batch.models.lora.merge_adapters`, every time, however many switches came before.

How it stays exact: applying ``W + delta`` and later subtracting ``delta`` again does not give
``W`` back once the sum was rounded to bf16 (or fp8), so nothing is ever subtracted. The switcher
keeps the base weight of every target any staged set changes, and on each switch writes
``(base.float() + delta).to(dtype)`` with ``delta`` computed by the same function, in the same
order and at the same float32 matmul precision as ``merge_adapters`` (:func:`lora.lora_delta`);
targets the new set does not change get their base weight back by a plain copy.

What it keeps per set: the LoRA factors (``up`` and ``down`` in float32 on the module's device,
plus ``scale * alpha / rank``), ``r * (in + out)`` numbers per target, and recomputes ``up @ down``
on every switch (``2 * r * in * out`` FLOPs per target: milliseconds on a GPU). Keeping each set's
full float32 delta instead would make a switch a plain add-and-copy, but costs ``4 * in * out``
bytes per target per set: 48 GB per set for the 12B Step1X-Edit DiT, 80 GB for Qwen-Image's 20B,
more than the GPU has beside the model (``benchmarks/bench_model.py --adapter-switch`` measures
both paths at the tiny size and computes them at full size).

The base weights are kept on ``base_device``: by default the module's device (fastest switch; the
targeted weights take twice their memory), or ``"cpu"`` (host memory, pinned when CUDA is available:
each switch then copies the base weights of the touched targets over PCIe).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from safetensors import safe_open
from torch import nn

from step1x_batch.models.base import AdapterSpec
from step1x_batch.models.loading import FP8_DTYPES, WeightsError
from step1x_batch.models.lora import (
    FAMILIES, _ModelIndex, as_spec, fp8_merged, full_float32_matmuls, lora_delta, plan_contributions,
)

# One adapter pair's term of a target's change: (up (out, r) fp32, down (r, in) fp32, scale * ratio).
Term = tuple[torch.Tensor, torch.Tensor, float]


@dataclass
class _StagedSet:
    """A validated set: its specs and, per target in the model's order, its terms in merge order."""

    specs: tuple[AdapterSpec, ...]
    terms: dict[str, list[Term]] = field(default_factory=dict)

    def factor_bytes(self) -> int:
        return sum(up.nbytes + down.nbytes for terms in self.terms.values() for up, down, _ in terms)


class AdapterSwitcher:
    """One resident denoiser, several named LoRA sets; switching is exact.

    After :meth:`activate` ``(name)`` every parameter and buffer of ``module`` is bit-identical to
    a fresh copy of the base module after ``merge_adapters(copy, specs, family=family)``; after
    ``activate(None)``, to the base module. "Base" is the module as it was handed over (a module
    already merged with the job's ``model.adapters`` is the base of its sets).
    """

    def __init__(self, module: nn.Module, *, family: str, base_device: str | torch.device | None = None):
        if family not in FAMILIES:
            raise WeightsError(f"adapter sets: unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
        self.module, self.family = module, family
        self.base_device = None if base_device is None else torch.device(base_device)
        self.active: str | None = None
        self.switches = 0  # activations that changed the weights (not the no-op ones)
        self.last_switch_s = 0.0
        self._index = _ModelIndex(module)
        self._sets: dict[str, _StagedSet] = {}
        self._base: dict[str, torch.Tensor] = {}  # target -> its base weight, for every staged target

    @property
    def sets(self) -> list[str]:
        """The staged sets' names, in the order they were added."""
        return list(self._sets)

    def specs(self, name: str) -> tuple[AdapterSpec, ...]:
        return self._staged(name).specs

    def targets(self, name: str | None) -> list[str]:
        """The modules a set changes, in the model's order (none for the base model)."""
        return [] if name is None else list(self._staged(name).terms)

    def memory(self) -> dict[str, int]:
        """Bytes held: the kept base weights, and every set's low-rank factors."""
        return {"base_bytes": sum(t.nbytes for t in self._base.values()),
                "factor_bytes": sum(s.factor_bytes() for s in self._sets.values())}

    # --- staging ----------------------------------------------------------------------------------

    def add_set(self, name: str, adapters: Sequence[AdapterSpec | Any]) -> None:
        """Validate a set against the model as ``merge_adapters`` does and stage it: read its
        factors to the module's device and keep the base weight of each new target. A
        :class:`WeightsError` naming every problem stages nothing and leaves the switcher as it was."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"adapter sets: a set's name must be a non-empty string, got {name!r}")
        if name in self._sets:
            raise ValueError(f"adapter sets: {name!r} is already staged (remove_set it first)")
        specs = tuple(as_spec(a) for a in adapters)
        staged = _StagedSet(specs)
        if specs:
            plans, contributions = plan_contributions(self._index, specs, self.family)
            with contextlib.ExitStack() as stack:
                files = {id(p): stack.enter_context(safe_open(str(p.spec.path), framework="pt", device="cpu"))
                         for p in plans}
                for target, pairs in contributions.items():
                    device = self._weight(target).device
                    staged.terms[target] = [
                        (files[id(plan)].get_tensor(pair.up).to(device, torch.float32),
                         files[id(plan)].get_tensor(pair.down).to(device, torch.float32),
                         plan.spec.scale * pair.ratio)
                        for plan, pair in pairs]
            self._check_fp8(staged)
        for target in staged.terms:
            if target not in self._base:  # not yet kept: no set touches it, so the weight is the base
                self._base[target] = self._keep(self._weight(target))
        self._sets[name] = staged

    def remove_set(self, name: str) -> None:
        """Drop a staged set (not the active one) and the base weights no other set needs."""
        if name == self.active:
            raise ValueError(f"adapter sets: {name!r} is active; activate another set (or None) first")
        self._staged(name)
        del self._sets[name]
        needed = {t for s in self._sets.values() for t in s.terms}
        for target in [t for t in self._base if t not in needed]:
            del self._base[target]

    def _check_fp8(self, staged: _StagedSet) -> None:
        """fp8 targets: the set is refused, as ``merge_adapters`` refuses it, when rounding the
        merged weight back to fp8 overflows or loses the change."""
        problems = []
        with full_float32_matmuls():
            for target, terms in staged.terms.items():
                weight = self._weight(target)
                if weight.dtype in FP8_DTYPES:
                    base = self._base.get(target, weight.detach()).to(weight.device)
                    _, problem = fp8_merged(target, base, lora_delta(weight.shape, weight.device, terms))
                    if problem:
                        problems.append(problem)
        if problems:
            files = ", ".join(str(s.path) for s in staged.specs)
            raise WeightsError(f"adapters refused, nothing staged ({len(problems)} problem"
                               f"{'s' if len(problems) != 1 else ''}) [{files}]: " + "; ".join(problems))

    # --- switching --------------------------------------------------------------------------------

    def activate(self, name: str | None) -> None:
        """Make ``name``'s set (None: the base model) the module's weights. Touches only the
        targets of the active and the new set; activating the active set does nothing."""
        if name == self.active:
            return
        new = self._staged(name).terms if name is not None else {}
        old = self._sets[self.active].terms if self.active is not None else {}
        start = time.perf_counter()
        try:
            with full_float32_matmuls():
                for target in old:
                    if target not in new:
                        self._write(target, self._base[target])
                for target, terms in new.items():
                    self._write(target, self._merged(target, terms))
        except BaseException:
            self._restore(list(old) + list(new))  # a half-switched module is no set: back to the base
            self.active = None
            raise
        self.active = name
        self.switches += 1
        if self._on_cuda():
            torch.cuda.synchronize()  # the time of the switch, not of its launch
        self.last_switch_s = time.perf_counter() - start

    def _merged(self, target: str, terms: list[Term]) -> torch.Tensor:
        """``(base.float() + delta).to(dtype)``: what ``merge_adapters`` writes into a base weight."""
        weight = self._weight(target)
        base = self._base[target].to(weight.device)
        delta = lora_delta(weight.shape, weight.device, terms)
        if weight.dtype in FP8_DTYPES:
            return fp8_merged(target, base, delta)[0]
        return (base.float() + delta).to(weight.dtype)

    def _restore(self, targets: list[str]) -> None:
        for target in targets:
            self._write(target, self._base[target])

    # --- helpers ----------------------------------------------------------------------------------

    def _staged(self, name: str) -> _StagedSet:
        if name not in self._sets:
            known = ", ".join(repr(n) for n in self._sets) or "none staged"
            raise KeyError(f"unknown adapter set {name!r}; known sets: {known}")
        return self._sets[name]

    def _weight(self, target: str) -> torch.Tensor:
        return self._index.modules[target].weight

    def _keep(self, weight: torch.Tensor) -> torch.Tensor:
        """A copy of a base weight on ``base_device`` (pinned host memory when that is the CPU and
        CUDA is available: faster copies back to the GPU)."""
        device = self.base_device or weight.device
        kept = weight.detach().to(device, copy=True)
        if device.type == "cpu" and torch.cuda.is_available():
            kept = kept.pin_memory()
        return kept

    def _write(self, target: str, value: torch.Tensor) -> None:
        weight = self._weight(target)
        with torch.inference_mode(weight.is_inference()), torch.no_grad():
            weight.copy_(value)

    def _on_cuda(self) -> bool:
        return any(self._weight(t).device.type == "cuda" for t in self._base)
