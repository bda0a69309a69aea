"""torchvision for the tests' oracles, or None: transformers' torchvision image processor and
diffusers with it are what a standard GPU install runs (the Qwen family's default processor).

A torchvision wheel built for CUDA (PyPI's) cannot load its native operators on a CPU-only
torch, and its import then fails at ``register_fake("torchvision::nms")``. The oracles need only
torchvision's pure-Python transforms, so when the native library does not load, the two operator
schemas that the import registers fake kernels for (``nms``, ``qnms``) are defined first; no
kernel is defined, so nothing can call them. In-process only: Ray workers of a job test do not
run this. So the tests take torchvision from a side folder, ``.oracles/`` at the repository root
(``pip install --no-deps --target .oracles torchvision==0.28.0``, the README's test command),
appended to this process's ``sys.path`` only: the package and the Ray workers never see it
(Ray hands its workers the driver's script folder and working directory, not its ``sys.path``),
so a job test still runs what a CPU install without torchvision runs.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

ORACLES = Path(__file__).resolve().parents[1] / ".oracles"
_LIB: torch.library.Library | None = None  # kept alive: dropping it would unregister the schemas


def _define_schemas() -> None:
    global _LIB
    if _LIB is None:
        _LIB = torch.library.Library("torchvision", "DEF")
        for name in ("nms", "qnms"):
            _LIB.define(f"{name}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


def import_torchvision() -> ModuleType | None:
    """The installed torchvision (or the one in ``.oracles/``), made importable on a CPU torch;
    None when there is none."""
    if importlib.util.find_spec("torchvision") is None:
        if not (ORACLES / "torchvision").is_dir():
            return None
        sys.path.append(str(ORACLES))  # last: it shadows nothing installed
        importlib.invalidate_caches()
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
