"""The model id: folded into every row's fingerprint, so users' logs depend on its exact bytes.

The ids pinned here were recorded from the code before the model id was derived from the options'
pixel marks (issue 19): the derivation may change, these strings may not.
"""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict

from step1x_batch.models import FAMILIES, family_class, load_family
from step1x_batch.models.base import AdapterRef, ModelFamily, ModelSpec, option, pixel_marks, unmarked_options

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


# --- the id is derived from the options' marks ---------------------------------------------------

# A value other than the default for every option of every registered family: a new option
# without an entry here fails test_every_option_has_a_changed_value.
CHANGED = {
    "step1x": {"version": "v1.0", "posterior_mean": True, "model_guidance": 4.0, "variant": "realrestorer"},
    "qwen-image-edit": {
        "max_images": 3, "reference_areas": "macro", "reference_area": 512 * 512, "vl_area": 256 * 256,
        "image_processor": "pil", "cfg_norm_rescale": False, "text_positions": "1d", "square_input": 512,
        "scheduler": {"base_shift": 1.0986},
    },
    "null": {"max_images": 3},
}


def _family(name: str, **options):
    return load_family(ModelSpec(name, weights="" if name == "null" else WEIGHTS, options=options))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_option_of_a_registered_family_is_marked(name):
    assert unmarked_options(family_class(name).Options) == [], "mark it: option(..., pixels=True/False)"


def test_an_unmarked_option_is_found():
    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")

        marked: int = option(1, pixels=True)
        forgotten: int = 2

    assert unmarked_options(Options) == ["forgotten"]
    assert pixel_marks(Options) == {"marked": True, "forgotten": None}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_option_has_a_changed_value(name):
    assert set(CHANGED[name]) == set(family_class(name).Options.model_fields)


def _cases(pixels: bool):
    for name in sorted(FAMILIES):
        marks = pixel_marks(family_class(name).Options)
        for field, value in CHANGED[name].items():
            if marks[field] is pixels:
                yield pytest.param(name, field, value, id=f"{name}-{field}")


@pytest.mark.parametrize(("name", "field", "value"), list(_cases(pixels=True)))
def test_changing_a_pixel_option_changes_the_id(name, field, value):
    assert getattr(_family(name).options, field) != value
    assert _family(name, **{field: value}).model_id() != _family(name).model_id()


@pytest.mark.parametrize(("name", "field", "value"), list(_cases(pixels=False)))
def test_changing_another_option_keeps_the_id(name, field, value):
    assert _family(name, **{field: value}).model_id() == _family(name).model_id()


def test_max_images_is_not_a_pixel_option():
    assert pixel_marks(family_class("qwen-image-edit").Options)["max_images"] is False
    assert pixel_marks(family_class("null").Options)["max_images"] is False


# --- the weights' licence (the pairs dataset card) -----------------------------------------------


def test_weights_license_per_family():
    assert _family("step1x").weights_license() == "other"  # s3 weights, variant unset: not looked at
    assert _family("step1x", variant="step1x").weights_license() == "apache-2.0"
    assert _family("step1x", variant="realrestorer").weights_license() == "other"  # non-commercial research
    assert _family("qwen-image-edit").weights_license() == "apache-2.0"
    assert _family("null").weights_license() == "other"
    assert _Plugin(ModelSpec("x")).weights_license() == "other"


def test_weights_license_of_an_unnamed_variant_follows_the_layout(tmp_path):
    bundle = tmp_path / "realrestorer"
    for folder in ("transformer", "text_encoder", "processor"):
        (bundle / folder).mkdir(parents=True)
    (bundle / "model_index.json").write_text("{}")
    release = tmp_path / "release"
    (release / "Qwen2.5-VL-7B-Instruct").mkdir(parents=True)
    (release / "vae.safetensors").write_bytes(b"")

    def license_of(weights: str, **options) -> str:
        return family_class("step1x")(ModelSpec("step1x", options=options, weights=weights)).weights_license()

    assert license_of(str(bundle)) == "other"  # a RealRestorer bundle, variant unset
    assert license_of(str(release)) == "apache-2.0"
    assert license_of(str(tmp_path / "not-there")) == "apache-2.0"  # as the workers resolve it
    assert license_of("s3://bucket/weights") == "other"  # cannot be looked at from here
    assert license_of("s3://bucket/weights", variant="step1x") == "apache-2.0"
    assert license_of(str(bundle), variant="step1x") == "apache-2.0"  # a named variant wins
