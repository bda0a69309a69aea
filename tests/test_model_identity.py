"""The model id: folded into every row's fingerprint, so users' logs depend on its exact bytes.

The ids pinned here were recorded from the code before the model id was derived from the options'
pixel marks (issue 19): the derivation may change, these strings may not.
"""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from step1x_batch.models import load_family
from step1x_batch.models.base import AdapterRef, ModelFamily, ModelSpec

WEIGHTS = "s3://models/weights/"
ADAPTERS = (
    AdapterRef("s3://b/a.safetensors", 0.75, "kohya", "ab" * 32),
    AdapterRef("/x/b.safetensors", 1.0, "diffusers", "cd" * 32),
)
LORA = "+lora[ababababababababx0.75:kohya,cdcdcdcdcdcdcdcdx1.0:peft]"
QWEN = "qwen-image-edit:bfloat16:refs=fixed1048576:vl=147456:vl_processor=torchvision:cfg_norm=on:text_pos=mrope:"

PINNED = [
    ("step1x", {}, "step1x-edit[auto]:auto:bfloat16:sample:s3://models/weights"),
    ("step1x", {"options": {"version": "v1.0"}}, "step1x-edit[auto]:v1.0:bfloat16:sample:s3://models/weights"),
    ("step1x", {"options": {"posterior_mean": True}}, "step1x-edit[auto]:auto:bfloat16:mean:s3://models/weights"),
    ("step1x", {"options": {"model_guidance": 4.0}},
     "step1x-edit[auto]:auto:bfloat16:sample:guidance=4.0:s3://models/weights"),
    ("step1x", {"options": {"variant": "realrestorer"}},
     "step1x-edit[realrestorer]:auto:bfloat16:sample:s3://models/weights"),
    ("step1x", {"options": {"variant": "step1x", "version": "v1.1"}},
     "step1x-edit[step1x]:v1.1:bfloat16:sample:s3://models/weights"),
    ("step1x", {"batch_invariant": False, "dtype": "float32"},
     "step1x-edit[auto]:auto:float32:sample:batch-variant:s3://models/weights"),
    ("step1x", {"adapters": ADAPTERS}, "step1x-edit[auto]:auto:bfloat16:sample:s3://models/weights" + LORA),
    ("step1x", {"model_id": "mine"}, "mine"),
    ("qwen-image-edit", {}, QWEN + "s3://models/weights"),
    ("qwen-image-edit", {"options": {"reference_areas": "macro"}},
     "qwen-image-edit:bfloat16:refs=macro:vl=147456:vl_processor=torchvision:cfg_norm=on:text_pos=mrope:"
     "s3://models/weights"),
    ("qwen-image-edit", {"options": {"reference_area": 512 * 512}},
     "qwen-image-edit:bfloat16:refs=fixed262144:vl=147456:vl_processor=torchvision:cfg_norm=on:text_pos=mrope:"
     "s3://models/weights"),
    ("qwen-image-edit", {"options": {"vl_area": 256 * 256, "image_processor": "pil"}},
     "qwen-image-edit:bfloat16:refs=fixed1048576:vl=65536:vl_processor=pil:cfg_norm=on:text_pos=mrope:"
     "s3://models/weights"),
    ("qwen-image-edit", {"options": {"cfg_norm_rescale": False, "text_positions": "1d"}},
     "qwen-image-edit:bfloat16:refs=fixed1048576:vl=147456:vl_processor=torchvision:cfg_norm=off:text_pos=1d:"
     "s3://models/weights"),
    ("qwen-image-edit", {"options": {"square_input": 512}}, QWEN + "square=512:s3://models/weights"),
    ("qwen-image-edit", {"options": {"scheduler": {"shift_terminal": None, "base_shift": 1.0986}}},
     QWEN + 'scheduler={"base_shift":1.0986,"shift_terminal":null}:s3://models/weights'),
    ("qwen-image-edit", {"batch_invariant": False, "dtype": "float16"},
     "qwen-image-edit:float16:refs=fixed1048576:vl=147456:vl_processor=torchvision:cfg_norm=on:text_pos=mrope:"
     "batch-variant:s3://models/weights"),
    ("qwen-image-edit", {"adapters": ADAPTERS}, QWEN + "s3://models/weights" + LORA),
    ("qwen-image-edit", {"options": {"max_images": 3}}, QWEN + "s3://models/weights"),
    ("qwen-image-edit", {"model_id": "mine"}, "mine"),
    ("null", {}, "null"),
    ("null", {"options": {"max_images": 3}}, "null"),
    ("null", {"batch_invariant": False, "dtype": "float32"}, "null"),
    ("null", {"model_id": "mine"}, "mine"),
]


@pytest.mark.parametrize(("family", "spec", "expected"), PINNED)
def test_model_ids_are_the_recorded_strings(family, spec, expected):
    weights = "" if family == "null" else WEIGHTS
    assert load_family(ModelSpec(family, weights=weights, **spec)).model_id() == expected


class _PluginOptions(BaseModel):
    """Options of a family outside this package that marks nothing (every field counts as pixels)."""

    strength: float = 1.0
    label: str = "x"


class _Plugin(ModelFamily):
    name = "plugin"
    Options = _PluginOptions

    def preparer(self, folder):
        raise NotImplementedError

    def load(self, folder, device, adapters=()):
        raise NotImplementedError


def test_a_plugin_family_keeps_the_generic_id():
    assert _Plugin(ModelSpec("x", weights="/w/", options={"strength": 2})).model_id() == (
        'plugin:bfloat16:{"label":"x","strength":2.0}:/w')
    assert _Plugin(ModelSpec("x", weights="/w/", batch_invariant=False)).model_id() == (
        'plugin:bfloat16:{"label":"x","strength":1.0}:batch-variant:/w')
