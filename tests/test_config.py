"""Job config: YAML -> typed objects, overrides, errors that name the key path, no credentials."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from step1x_batch.job.config import (
    ConfigError,
    JobConfig,
    apply_overrides,
    config_to_yaml,
    load_config,
    parse_config,
)
from step1x_batch.io.weights import pin_adapters
from step1x_batch.models.base import EditParams

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

MINIMAL = {
    "input": {"manifest": "s3://b/manifest.parquet"},
    "output": {"uri": "s3://b/out"},
    "model": {"family": "null"},
}


def _write(tmp_path: Path, raw: dict) -> str:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_variant_configs_validate_with_their_recipes(tmp_path, monkeypatch):
    """PixelSmile and Lightning: their adapters and options parse (the adapters are not fetched
    until the model id is needed)."""
    import math

    pixelsmile = load_config(str(CONFIGS / "pixelsmile.yaml"))
    assert pixelsmile.model.family == "qwen-image-edit" and len(pixelsmile.model.adapters) == 1
    assert pixelsmile.model.adapters[0].scale == 1.0
    assert pixelsmile.model.options["square_input"] == 512 and pixelsmile.model.options["vl_area"] == 512 * 512
    assert pixelsmile.edit_defaults() == EditParams(50, 0.0, 1024, " ")
    lightning = load_config(str(CONFIGS / "qwen-image-edit-2511-lightning.yaml"))
    assert lightning.edit_defaults().num_steps == 4 and lightning.edit_defaults().guidance_scale == 1.0
    shift = lightning.model.options["scheduler"]
    assert shift["base_shift"] == shift["max_shift"] == pytest.approx(math.log(3)) and shift["shift_terminal"] is None


def test_adapters_enter_the_model_id_by_content_and_scale(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"adapter one")
    b.write_bytes(b"adapter one")  # the same bytes under another name
    base = {**MINIMAL, "model": {"family": "qwen-image-edit", "weights": "/w"}}
    def model_id(*adapters):
        cfg = parse_config({**base, "model": {**base["model"], "adapters": list(adapters)}})
        pin_adapters(cfg.model.adapters, cfg.weights_source())
        return cfg.family().model_id()
    plain = model_id()
    one = model_id({"uri": str(a)})
    assert one != plain and "+lora[" in one
    assert model_id({"uri": str(b)}) == one  # the content names the adapter, not the path
    assert model_id({"uri": str(a), "scale": 0.5}) != one
    b.write_bytes(b"adapter two")
    assert model_id({"uri": str(b)}) != one
    with pytest.raises(ConfigError, match="model.adapters: family 'null' does not take LoRA adapters"):
        parse_config({**MINIMAL, "model": {"family": "null", "adapters": [{"uri": str(a)}]}})
    with pytest.raises(ConfigError, match=r"model\.adapters\.0\.format"):
        parse_config({**base, "model": {**base["model"], "adapters": [{"uri": str(a), "format": "ckpt"}]}})
    relative = parse_config({**base, "model": {**base["model"], "adapters": [{"uri": "a.safetensors"}]}}, tmp_path)
    assert relative.model.adapters[0].uri == str(a)


def test_parsing_stages_no_adapter_and_the_digest_is_pinned_once(tmp_path):
    """A config is parsing and validation: the adapter's file is hashed by pin_adapters (the
    driver's prepare step), once, and every later spec carries that digest."""
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"adapter one")
    cfg = parse_config({**MINIMAL, "model": {"family": "qwen-image-edit", "weights": "/w",
                                             "adapters": [{"uri": str(path)}]}})
    assert cfg.model.adapters[0].sha256 is None
    with pytest.raises(RuntimeError, match=r"model.adapters\[0\] has no content digest yet"):
        cfg.model_spec()
    pin_adapters(cfg.model.adapters, cfg.weights_source())
    pinned = cfg.model_spec().adapters[0].sha256
    assert len(pinned) == 64
    path.write_bytes(b"adapter two")  # the run keeps the digest it pinned
    pin_adapters(cfg.model.adapters, cfg.weights_source())
    assert cfg.model_spec().adapters[0].sha256 == pinned
    assert cfg.model_copy(deep=True).model_spec().adapters[0].sha256 == pinned  # a job built on it


def test_retry_error_types_this_run_and_its_old_name():
    """``--retry-errors`` sets runtime.retry_error_types_this_run; a config with the old name
    redo_error_types still works."""
    new = parse_config({**MINIMAL, "runtime": {"retry_error_types_this_run": ["missing_object"]}})
    old = parse_config({**MINIMAL, "runtime": {"redo_error_types": ["missing_object"]}})
    assert new.runtime.retry_error_types_this_run == old.runtime.retry_error_types_this_run == ["missing_object"]
    assert "missing_object" in old.runtime.retried_error_types() and "read_failed" in old.runtime.retried_error_types()
    assert "redo_error_types" not in config_to_yaml(old)
    with pytest.raises(ConfigError, match="set only one of them"):
        parse_config({**MINIMAL, "runtime": {"redo_error_types": [], "retry_error_types_this_run": []}})
    with pytest.raises(ConfigError, match="unknown error type"):
        parse_config({**MINIMAL, "runtime": {"redo_error_types": ["no_such_type"]}})


def test_qwen_image_edit_config_is_the_official_recipe():
    cfg = load_config(str(CONFIGS / "qwen-image-edit-2511.yaml"))
    assert cfg.model.family == "qwen-image-edit" and cfg.device() == "cuda" and cfg.model.dtype == "bfloat16"
    assert cfg.edit_defaults() == EditParams(num_steps=40, guidance_scale=4.0, size_level=1024, negative_prompt=" ")
    assert cfg.model.options["max_images"] == 10 and cfg.model.options["reference_areas"] == "fixed"
    from step1x_batch.demo import demo_config

    demo = parse_config(demo_config("/tmp/demo", "qwen-image-edit"))
    assert demo.model.family == "qwen-image-edit" and demo.device() == "cpu"


@pytest.mark.parametrize("name", ["demo.yaml", "step1x-edit-v1p1.yaml", "step1x-edit-v1p0.yaml"])
def test_shipped_configs_validate(name):
    cfg = load_config(str(CONFIGS / name))
    assert cfg.model.family == "step1x"
    if name != "demo.yaml":
        assert cfg.resources.num_gpus_per_actor == 1
        assert cfg.model.dtype == "bfloat16"
        assert cfg.model.weights.startswith("s3://")
        assert cfg.device() == "cuda"
        assert cfg.model.options["version"] == ("v1.1" if "v1p1" in name else "v1.0")
    else:
        assert cfg.resources.num_gpus_per_actor == 0 and cfg.device() == "cpu"


def test_demo_yaml_is_the_demo_config():
    from step1x_batch.demo import demo_config

    shipped = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    assert shipped == demo_config("step1x-demo")


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(
        _write(tmp_path, MINIMAL),
        [
            "sampling.num_steps=20",
            "sampling.guidance_scale=4.5",
            "runtime.progress_bars=false",
            "model.family=step1x",
            "model.weights=/w",
            "model.options.version=null",
            "output.format=webp",
            "runtime.retry_error_types=[read_failed]",
            "input.storage.endpoint_url=http://127.0.0.1:9000",
        ],
    )
    assert cfg.sampling.num_steps == 20 and isinstance(cfg.sampling.num_steps, int)
    assert cfg.sampling.guidance_scale == 4.5
    assert cfg.runtime.progress_bars is False
    assert cfg.model.options["version"] is None
    assert cfg.output.format == "webp"
    assert cfg.runtime.retry_error_types == ["read_failed"]
    assert cfg.input.storage.endpoint_url == "http://127.0.0.1:9000"
    # untouched defaults
    assert cfg.sampling.size_level is None and cfg.output.quality == 95  # the family's default
    assert cfg.edit_defaults() == EditParams(20, 4.5, 1024, "")


@pytest.mark.parametrize(
    "override, expected",
    [
        ("sampling.num_steps=0", "sampling.num_steps: Input should be greater than or equal to 1"),
        ("sampling.num_steps=many", "sampling.num_steps: Input should be a valid integer"),
        ("sampling.nums_steps=20", "sampling.nums_steps: Extra inputs are not permitted"),
        ("output.format=gif", "output.format: Input should be 'png', 'webp' or 'jpeg'"),
        ("runtime.max_error_fraction=1.5", "runtime.max_error_fraction: Input should be less than or equal to 1"),
        ("resources.num_gpus_per_actor=-1", "resources.num_gpus_per_actor: Input should be greater than or equal to 0"),
        ("input.storage.max_attempts=0", "input.storage.max_attempts: Input should be greater than or equal to 1"),
        ("runtime.run_id=../../etc", "runtime.run_id: use letters"),
        ("bogus.key=1", "bogus: Extra inputs are not permitted"),
        ("model.family=step2x", "model.family: unknown model family 'step2x'"),
        ("model.family=no_such_pkg.mod:Cls", "model.family: cannot import model family"),
        ("model.kind=step1x", "model.kind is now model.family"),
        ("model.version=v1.0", "model.version is now model.options.version"),
    ],
)
def test_bad_values_name_the_key_path(tmp_path, override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, MINIMAL), [override])
    assert expected in str(e.value)


def test_unknown_key_in_file_is_refused(tmp_path):
    raw = {**MINIMAL, "sampling": {"num_step": 20}}
    with pytest.raises(ConfigError, match=r"sampling\.num_step: Extra inputs are not permitted"):
        load_config(_write(tmp_path, raw))


def test_missing_sections_are_named(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, {"model": {"family": "null"}}))
    assert "input: Field required" in str(e.value)
    assert "output: Field required" in str(e.value)


def test_step1x_needs_weights(tmp_path):
    raw = {**MINIMAL, "model": {"family": "step1x"}}
    with pytest.raises(ConfigError, match="model.weights: required for family 'step1x'"):
        load_config(_write(tmp_path, raw))


def test_family_options_are_validated_by_the_family(tmp_path):
    base = {**MINIMAL, "model": {"family": "step1x", "weights": "/w"}}
    with pytest.raises(ConfigError, match=r"model\.options\.version: Input should be 'v1.0' or 'v1.1'"):
        load_config(_write(tmp_path, base), ["model.options.version=v3"])
    with pytest.raises(ConfigError, match=r"model\.options\.posterior_men: Extra inputs are not permitted"):
        load_config(_write(tmp_path, base), ["model.options.posterior_men=true"])
    cfg = load_config(_write(tmp_path, base), ["model.options.version=v1.0"])
    assert cfg.model.options == {"version": "v1.0", "posterior_mean": False, "model_guidance": 3.5,
                                 "variant": None}  # defaults filled in
    # a plug-in family brings its own options schema
    plugin = load_config(_write(tmp_path, MINIMAL), ["model.family=job_plugins:MeanOfInputs", "model.options.max_images=5"])
    assert plugin.model.options == {"max_images": 5}
    with pytest.raises(ConfigError, match=r"model\.options\.max_images: Input should be a valid integer"):
        load_config(_write(tmp_path, MINIMAL), ["model.family=job_plugins:MeanOfInputs", "model.options.max_images=x"])


def test_sampling_defaults_come_from_the_family(tmp_path):
    step1x = load_config(_write(tmp_path, {**MINIMAL, "model": {"family": "step1x", "weights": "/w"}}))
    assert step1x.edit_defaults() == EditParams(28, 6.0, 1024, "")
    tuned = load_config(_write(tmp_path, {**MINIMAL, "model": {"family": "step1x", "weights": "/w"}}),
                        ["sampling.num_steps=20", "sampling.negative_prompt=blurry"])
    assert tuned.edit_defaults() == EditParams(20, 6.0, 1024, "blurry")


def test_credentials_are_refused_without_echoing_them(tmp_path):
    raw = {**MINIMAL, "input": {"manifest": "s3://b/m", "storage": {"aws_secret_access_key": "hunter2-very-secret"}}}
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, raw))
    assert "input.storage.aws_secret_access_key: credentials are not accepted" in str(e.value)
    assert "hunter2" not in str(e.value)
    with pytest.raises(ConfigError, match="output.storage.session_token"):
        load_config(_write(tmp_path, MINIMAL), ["output.storage.session_token=abc"])


@pytest.mark.parametrize("bad", ["sampling", "=3", "sampling..x=1", "a.b"])
def test_malformed_overrides(tmp_path, bad):
    with pytest.raises(ConfigError):
        load_config(_write(tmp_path, MINIMAL), [bad])


def test_override_through_a_value_is_refused():
    with pytest.raises(ConfigError, match="sampling.num_steps: is a value"):
        apply_overrides({"sampling": {"num_steps": 3}}, ["sampling.num_steps.x=1"])


def test_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = {
        "input": {"manifest": "data/m.jsonl"},
        "output": {"uri": "out"},
        "model": {"family": "step1x", "weights": "~/w"},
    }
    cfg = load_config(_write(tmp_path, raw))
    assert cfg.input.manifest == str(tmp_path / "data" / "m.jsonl")
    assert cfg.output.uri == str(tmp_path / "out")
    assert cfg.model.weights == os.path.expanduser("~/w")
    cfg = load_config(_write(tmp_path, MINIMAL))
    assert cfg.input.manifest == "s3://b/manifest.parquet"


def test_run_id_default_is_a_unique_timestamp(tmp_path):
    a = load_config(_write(tmp_path, MINIMAL)).runtime.run_id
    b = load_config(_write(tmp_path, MINIMAL)).runtime.run_id
    assert a != b and a[:8].isdigit() and "T" in a


def test_snapshot_round_trips(tmp_path):
    cfg = load_config(_write(tmp_path, MINIMAL), ["runtime.run_id=r1", "sampling.seed_base=7"])
    text = config_to_yaml(cfg)
    again = parse_config(yaml.safe_load(text))
    assert again == cfg
    assert "run_id: r1" in text


def test_model_id_model_spec_and_weights_source(tmp_path):
    cfg = load_config(str(CONFIGS / "step1x-edit-v1p1.yaml"))
    spec, weights = cfg.model_spec(), cfg.weights_source()
    assert spec.weights == "s3://my-models/step1x-edit-v1p1/" and spec.device == "cuda" and spec.dtype == "bfloat16"
    assert spec.family == "step1x" and spec.options == {"version": "v1.1", "posterior_mean": False, "model_guidance": 3.5,
                                                      "variant": None}
    assert weights.cache_dir is None and weights.storage == cfg.input.storage  # $STEP1X_WEIGHTS_CACHE
    pinned = load_config(str(CONFIGS / "step1x-edit-v1p1.yaml"), ["model.cache_dir=/mnt/nvme/cache"])
    assert pinned.weights_source().cache_dir == "/mnt/nvme/cache"
    assert cfg.family().model_id() == "step1x-edit[auto]:v1.1:bfloat16:sample:s3://my-models/step1x-edit-v1p1"
    for override in ("model.dtype=float16", "model.options.posterior_mean=true", "model.options.version=v1.0",
                     "model.batch_invariant=false"):
        other = load_config(str(CONFIGS / "step1x-edit-v1p1.yaml"), [override])
        assert other.family().model_id() != cfg.family().model_id(), override  # changes pixels
    for override in ("model.compile=true", "model.attention=math"):  # rounding only, like the GPU model
        same = load_config(str(CONFIGS / "step1x-edit-v1p1.yaml"), [override])
        assert same.family().model_id() == cfg.family().model_id(), override
        assert (same.model_spec().compile, same.model_spec().attention) != (False, "auto")
    with pytest.raises(ConfigError, match="model.attention"):
        load_config(str(CONFIGS / "step1x-edit-v1p1.yaml"), ["model.attention=fastest"])
    named = load_config(str(CONFIGS / "step1x-edit-v1p1.yaml"), ["model.model_id=mine"])
    assert named.model_spec().model_id == "mine" and named.family().model_id() == "mine"
    assert load_config(_write(tmp_path, MINIMAL)).family().model_id() == "null"
    plugin = load_config(_write(tmp_path, MINIMAL), ["model.family=job_plugins:MeanOfInputs"])
    assert plugin.family().model_id().startswith("mean-of-inputs:")


def _cfg(**resources) -> JobConfig:
    return parse_config({**MINIMAL, "resources": resources})


def test_actor_plan_keeps_cpus_for_io_tasks():
    from step1x_batch.job.stages import plan_actors

    p = plan_actors(_cfg(), {"CPU": 2.0})  # 1 CPU kept for tasks, 2 actors of 0.5 at most
    assert (p.min_size, p.max_size, p.num_cpus, p.num_gpus) == (1, 2, 0.5, 0.0) and not p.note
    p = plan_actors(_cfg(cpus_per_actor=1, io_cpus_per_task=1), {"CPU": 2.0})
    assert (p.max_size, p.num_cpus) == (1, 1.0) and "fuses prepare" in p.note
    p = plan_actors(_cfg(reserved_cpus=0, io_cpus_per_task=0.5), {"CPU": 2.0})  # one I/O task always fits
    assert p.max_size * p.num_cpus <= 1.5
    model_on_cpu = parse_config({**MINIMAL, "model": {"family": "step1x", "weights": "/w"}})
    assert plan_actors(model_on_cpu, {"CPU": 64.0}).max_size == 1  # one model copy unless asked
    many = parse_config({**MINIMAL, "model": {"family": "step1x", "weights": "/w"}, "resources": {"max_actors": 3}})
    assert plan_actors(many, {"CPU": 64.0}).max_size == 3
    p = plan_actors(_cfg(cpus_per_actor=4), {"CPU": 2.0})  # would take every slot: lowered
    assert p.num_cpus == 1.0 and p.max_size == 1 and "lowered" in p.note
    p = plan_actors(_cfg(cpus_per_actor=0.5, max_actors=8), {"CPU": 4.0})
    assert p.max_size == 6 and p.num_cpus * p.max_size <= 4.0 - 1.0
    p = plan_actors(_cfg(num_gpus_per_actor=1, cpus_per_actor=2, reserved_cpus=8), {"CPU": 64.0, "GPU": 8.0})
    assert (p.min_size, p.max_size, p.num_gpus) == (1, 8, 1.0)
    p = plan_actors(_cfg(num_gpus_per_actor=1, num_actors=3), {"CPU": 64.0, "GPU": 8.0})
    assert p.min_size == p.max_size == 3
    with pytest.raises(ValueError, match="reserved_cpus"):
        plan_actors(_cfg(reserved_cpus=2), {"CPU": 2.0})
    with pytest.raises(ValueError, match="num_gpus_per_actor is 1 but the Ray cluster has 0 GPUs"):
        plan_actors(_cfg(num_gpus_per_actor=1), {"CPU": 8.0})
    with pytest.raises(ConfigError, match="max_actors"):
        _cfg(min_actors=3, max_actors=2)


def test_edit_actors_keep_to_their_own_group_when_a_judge_shares_the_cluster():
    """``resources.custom_per_actor: {edit_gpu: 1}``: the pool is sized by the edit group's own
    resource, not by every GPU (the judge's included), and the actors ask for it."""
    from step1x_batch.job.stages import plan_actors

    cluster = {"CPU": 64.0, "GPU": 8.0, "edit_gpu": 6.0, "judge_gpu": 2.0}
    shared = _cfg(num_gpus_per_actor=1, max_actors=16)
    assert plan_actors(shared, cluster).max_size == 8  # without it: the judge's 2 GPUs too
    own = _cfg(num_gpus_per_actor=1, max_actors=16, custom_per_actor={"edit_gpu": 1})
    assert plan_actors(own, cluster).max_size == 6
    with pytest.raises(ValueError, match="edit_gpu"):
        plan_actors(own, {"CPU": 64.0, "GPU": 8.0})
