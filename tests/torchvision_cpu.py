"""torchvision for the tests' oracles, or None: transformers' torchvision image processor and
diffusers with it are what a standard GPU install runs (the Qwen family's default processor).

A torchvision wheel built for CUDA (PyPI's) cannot load its native operators on a CPU-only
torch, and its import then fails at ``register_fake("torchvision::nms")``. The oracles need only
torchvision's pure-Python transforms, so when the native library does not load, the two operator
schemas that the import registers fake kernels for (``nms``, ``qnms``) are defined first; no
kernel is defined, so nothing can call them. In-process only: Ray workers of a job test do not
run this, which is why CI should install a torchvision that loads (the CPU build beside the CPU
torch), or none.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import torch

_LIB: torch.library.Library | None = None  # kept alive: dropping it would unregister the schemas


def _define_schemas() -> None:
    global _LIB
    if _LIB is None:
        _LIB = torch.library.Library("torchvision", "DEF")
        for name in ("nms", "qnms"):
            _LIB.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def import_torchvision() -> ModuleType | None:
    """The installed torchvision, made importable on a CPU torch; None when none is installed."""
    if importlib.util.find_spec("torchvision") is None:
        return None
    try:
        import torchvision

        return torchvision
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    _define_schemas()
    import torchvision

    return torchvision


TORCHVISION = import_torchvision()
