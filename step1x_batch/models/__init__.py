"""Model families and their registry.

A family is one folder (or module) here with one :class:`~step1x_batch.models.base.ModelFamily`
subclass; ``model.family`` in a job config names it by its registry name, or as
``package.module:Class`` for a family that lives outside this package. Families are imported only
when named, so reading a config never imports torch.
"""

from __future__ import annotations

import importlib
import re

from step1x_batch.models import determinism
from typing import Any

from step1x_batch.models.base import Engine, ModelFamily, ModelSpec

determinism.set_cpu_env()  # before MKL's first call: strict CNR, same bytes across processes (issue 24)

FAMILIES: dict[str, str] = {
    "step1x": "step1x_batch.models.step1x.family:Step1XFamily",
    "qwen-image-edit": "step1x_batch.models.qwen_image_edit.family:QwenImageEditFamily",
    "null": "step1x_batch.models.null:NullFamily",
}

_PLUGIN = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


def family_class(name: str) -> type[ModelFamily]:
    """The family class ``name`` refers to (a registry name or ``package.module:Class``)."""
    target = FAMILIES.get(name)
    if target is None:
        if not _PLUGIN.match(name):
            raise ValueError(f"unknown model family {name!r}; use one of {sorted(FAMILIES)} or 'package.module:Class'")
        target = name
    module, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import model family {name!r} ({type(e).__name__}: {e})") from None
    if not (isinstance(cls, type) and issubclass(cls, ModelFamily)):
        raise ValueError(f"{name!r} is not a ModelFamily subclass")
    return cls


def load_family(spec: ModelSpec) -> ModelFamily:
    """The family a spec names, with its options validated (cheap: no weights are read)."""
    return family_class(spec.family)(spec)


__all__ = ["FAMILIES", "ModelFamily", "ModelSpec", "adapter_switcher", "family_class", "load_family"]


def adapter_switcher(family: ModelFamily, engine: Engine) -> Any:
    """An :class:`~step1x_batch.models.adapter_sets.AdapterSwitcher` on ``engine``'s denoiser
    (``family.adapter_target``): the engine as loaded is the base; named LoRA sets are added and
    switched in exactly; the base copies on the model's device or, with ``spec.adapter_base_copies``
    ``host``, in host memory. The job's one way to the switcher (it imports no model internals)."""
    from step1x_batch.models.adapter_sets import AdapterSwitcher

    host = family.spec.adapter_base_copies == "host"
    return AdapterSwitcher(family.adapter_target(engine), family=family.name, base_device="cpu" if host else None)
