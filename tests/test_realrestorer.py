"""RealRestorer (a Step1X-Edit fine-tune) in the step1x family: the diffusers bundle layout
(sharded ``transformer/`` with ``inner_model.`` keys, ``vae/``, ``text_encoder/``, ``processor/``),
the optional ``guidance_in`` embedder and ``mask_token``, the CPU prepare from ``processor/``, and
the shipped job config and task prompts."""

import dataclasses
import fnmatch
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from step1x_batch.models.base import EditParams, EditRequest, ModelSpec
from step1x_batch.models.loading import WeightsError
from step1x_batch.models.step1x.dit import Step1XDiT
from step1x_batch.models.step1x.family import Step1XFamily
from step1x_batch.models.step1x.pipeline import EditPipeline
from step1x_batch.models.step1x.release import detect_layout
from step1x_batch.models.step1x.tiny import TINY_DIT, make_tiny_weights, tiny_dit_state_dict

ROOT = Path(__file__).resolve().parents[1]
STEPS, SIZE = 3, 64
SHARDS = ("diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors")


def picture(seed: int, h: int = 72, w: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], -1)
    return (base + rng.integers(0, 40, (h, w, 3))).clip(0, 255).astype(np.uint8)


def load(folder, **kwargs) -> EditPipeline:
    return EditPipeline.from_pretrained(folder, dtype="float32", max_batch_size=1, **kwargs)


def edit_bytes(pipe: EditPipeline, seeds=(3,)) -> list[bytes]:
    images = [picture(s) for s in seeds]
    results = pipe.edit(images, ["Please remove noise from the image."] * len(seeds), seeds=list(seeds),
                        num_steps=STEPS, guidance_scale=3.0, size_level=SIZE)
    assert all(r.error_type is None for r in results)
    return [r.image.tobytes() for r in results]


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return make_tiny_weights(tmp_path_factory.mktemp("rel"), seed=0)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_tiny_weights(tmp_path_factory.mktemp("rr"), seed=0, layout="realrestorer")


@pytest.fixture(scope="module")
def bundle_g(tmp_path_factory):
    return make_tiny_weights(tmp_path_factory.mktemp("rr-g"), seed=0, layout="realrestorer", guidance=True)


@pytest.fixture(scope="module")
def release_bytes(release):
    return edit_bytes(load(release))


@pytest.fixture(scope="module")
def bundle_pipe(bundle):
    return load(bundle)  # a bundle runs as RealRestorer's released pipeline


@pytest.fixture(scope="module")
def bundle_bytes(bundle_pipe):
    return edit_bytes(bundle_pipe)


@pytest.fixture(scope="module")
def bundle_g_pipe(bundle_g):
    return load(bundle_g)


def test_tiny_bundle_is_the_upstream_layout(bundle_g):
    assert detect_layout(bundle_g) == "realrestorer"
    t = bundle_g / "transformer"
    index = json.loads((t / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == list(SHARDS)
    keys = [k for name in SHARDS for k in load_file(t / name)]
    assert keys and all(k.startswith("inner_model.") for k in keys)
    assert sorted(keys) == sorted(index["weight_map"])
    # DiT and connector are one state dict, split across the shards by key, not by module
    assert "inner_model.connector.global_proj_out.weight" in keys and "inner_model.img_in.weight" in keys
    assert "inner_model.guidance_in.in_layer.weight" in keys and "inner_model.mask_token" not in keys
    assert json.loads((t / "config.json").read_text())["guidance_embeds"] is True
    vae = load_file(bundle_g / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(k.startswith("inner_model.") for k in vae)
    assert vae["inner_model.encoder.conv_in.weight"].dtype == torch.float32
    te, proc = bundle_g / "text_encoder", bundle_g / "processor"
    assert (te / "config.json").is_file() and (te / "model.safetensors.index.json").is_file()
    assert not (te / "tokenizer.json").exists() and not (proc / "config.json").exists()
    assert (proc / "tokenizer.json").is_file() and (proc / "preprocessor_config.json").is_file()


def test_bundle_loads_inner_model_keys_and_guidance_in(bundle_g, bundle_g_pipe):
    engine = bundle_g_pipe.engine
    file = tiny_dit_state_dict(seed=0, guidance=True)
    assert engine.dit.params.guidance_embed and engine.guidance == 3.5
    assert engine.version.name == "v1.1" and engine.version.ref_axis0 == 1
    assert engine.model_id.startswith("step1x-edit-v1.1/transformer@") and engine.model_id.endswith("+guidance=3.5")
    loaded = {**engine.dit.state_dict(), **{f"connector.{k}": v for k, v in engine.connector.state_dict().items()}}
    assert sorted(loaded) == sorted(file)
    for k, v in file.items():
        assert torch.equal(loaded[k], v.float()), k


def test_bundle_and_release_from_the_same_tensors_edit_the_same_bytes(bundle, release, bundle_pipe, bundle_bytes,
                                                                    release_bytes):
    """Same tensors, same released pipeline followed: same bytes, whichever layout holds them
    (edits are deterministic: bytes differ only if the model or the pipeline does)."""
    assert bundle_pipe.engine.guidance is None and bundle_pipe.engine.dit.guidance_in is None
    assert bundle_pipe.engine.variant.name == "realrestorer" and load(release).engine.variant.name == "step1x"
    assert edit_bytes(load(bundle, variant="step1x")) == release_bytes
    assert edit_bytes(load(release, variant="realrestorer")) == bundle_bytes
    assert bundle_bytes != release_bytes  # the two released pipelines differ on the same weights


def test_mask_token_is_tolerated_and_dropped(tmp_path, bundle_bytes):
    folder = make_tiny_weights(tmp_path / "rr-mask", seed=0, layout="realrestorer", mask_token=True)
    index = json.loads((folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert "inner_model.mask_token" in index["weight_map"]
    pipe = load(folder)
    modules = (pipe.engine.dit, pipe.engine.connector)
    assert not any("mask_token" in k for m in modules for k in m.state_dict())
    assert edit_bytes(pipe) == bundle_bytes


def test_guidance_in_changes_the_output_and_its_value_matters(tmp_path, bundle_g, bundle_g_pipe, bundle_bytes):
    at_35 = edit_bytes(bundle_g_pipe)
    assert at_35 != bundle_bytes  # the same other tensors without guidance_in
    at_1 = load(bundle_g, model_guidance=1.0)
    assert at_1.engine.guidance == 1.0 and at_1.engine.model_id.endswith("+guidance=1.0")
    assert edit_bytes(at_1) != at_35
    # the same guidance_in in the release layout is the same model
    release_g = make_tiny_weights(tmp_path / "rel-g", seed=0, guidance=True)
    assert edit_bytes(load(release_g, variant="realrestorer")) == at_35


def test_guidance_embedding_is_added_to_vec():
    """guidance_in(emb(g)) joins vec beside the timestep and pooled-text terms, nowhere else: with its
    last layer reduced to a bias b it equals the DiT without guidance_in whose vector_in adds b."""
    sd = {k: v.float() for k, v in tiny_dit_state_dict(seed=0, guidance=True).items() if not k.startswith("connector.")}
    with_g = Step1XDiT(dataclasses.replace(TINY_DIT, guidance_embed=True))
    with_g.load_state_dict(sd)
    plain = Step1XDiT(TINY_DIT)
    plain.load_state_dict({k: v for k, v in sd.items() if not k.startswith("guidance_in.")})
    g = torch.Generator().manual_seed(0)
    img, txt = torch.randn(2, 8, 64, generator=g), torch.randn(2, 5, 64, generator=g)
    img_ids, txt_ids = torch.randint(0, 4, (2, 8, 3)).float(), torch.zeros(2, 5, 3)
    t, y = torch.tensor([0.9, 0.3]), torch.randn(2, 32, generator=g)
    args = dict(img=img, img_ids=img_ids, txt=txt, txt_ids=txt_ids, timesteps=t, y=y)
    with torch.no_grad():
        with pytest.raises(ValueError, match="guidance_in"):
            with_g(**args)
        assert not torch.allclose(with_g(**args, guidance=3.5), plain(**args), atol=1e-4)
        assert not torch.allclose(with_g(**args, guidance=3.5), with_g(**args, guidance=4.0), atol=1e-4)
        torch.testing.assert_close(with_g(**args, guidance=3.5), with_g(**args, guidance=torch.full((2,), 3.5)))
        bias = with_g.guidance_in.out_layer.bias.clone()
        with_g.guidance_in.out_layer.weight.zero_()
        plain.vector_in.out_layer.bias += bias
        torch.testing.assert_close(with_g(**args, guidance=3.5), plain(**args), rtol=1e-5, atol=1e-5)
        assert torch.equal(plain(**args), plain(**args, guidance=3.5))  # no guidance_in: the value is unused


def _rewrite_transformer(folder: Path, edit) -> None:
    """Apply ``edit`` to the union of the transformer's shards; keys stay in their shard (new ones
    go to the last), the index follows."""
    t = folder / "transformer"
    index_path = t / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    state = {k: v for name in SHARDS for k, v in load_file(t / name).items()}
    edit(state)
    weight_map = {k: index["weight_map"].get(k, SHARDS[-1]) for k in state}
    for name in SHARDS:
        save_file({k: v for k, v in state.items() if weight_map[k] == name}, str(t / name))
    index["weight_map"] = weight_map
    index_path.write_text(json.dumps(index))


def test_bad_bundle_keys_are_all_named_in_one_error(bundle, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(bundle, folder)

    def break_keys(sd):
        del sd["inner_model.connector.global_proj_out.bias"]
        del sd["inner_model.single_blocks.1.linear2.bias"]
        sd["img_in.weight"] = torch.zeros(64, 64)  # no inner_model. prefix
        sd["inner_model.double_blocks.0.img_attn.bogus"] = torch.zeros(3)
        sd["inner_model.mask_token"] = torch.zeros(3)  # tolerated, but only in its own shape
        sd["inner_model.img_in.bias"] = torch.zeros(65)

    _rewrite_transformer(folder, break_keys)
    with pytest.raises(WeightsError) as e:
        EditPipeline.from_pretrained(folder, dtype="float32")
    msg = str(e.value)
    assert str(folder / "transformer") in msg
    assert "missing (2): inner_model.connector.global_proj_out.bias, inner_model.single_blocks.1.linear2.bias" in msg
    assert "unexpected (2): img_in.weight, inner_model.double_blocks.0.img_attn.bogus" in msg
    assert ("wrong shape (2): inner_model.img_in.bias: file (65,) vs model (64,), "
            "inner_model.mask_token: file (3,) vs model (1, 1, 64)") in msg

    (folder / "transformer" / SHARDS[1]).unlink()
    with pytest.raises(WeightsError, match=f"missing: {SHARDS[1]}"):
        EditPipeline.from_pretrained(folder, dtype="float32")

    vae_folder = tmp_path / "bad-vae"
    shutil.copytree(bundle, vae_folder)
    vae_file = vae_folder / "vae" / "diffusion_pytorch_model.safetensors"
    vae = {k.removeprefix("inner_model."): v for k, v in load_file(vae_file).items()}  # unprefixed keys
    save_file(vae, str(vae_file))
    with pytest.raises(WeightsError, match="not a FLUX autoencoder under 'inner_model.'"):
        EditPipeline.from_pretrained(vae_folder, dtype="float32")


@pytest.mark.parametrize("variant", ["realrestorer", "step1x"])
def test_preparer_reads_the_bundle_processor_folder(bundle, release, tmp_path, variant):
    """The CPU prepare gets only the family's prepare_files: from a bundle, processor/ (tokenizer,
    image processor) and text_encoder/config.json; its rows equal the release's in the same variant."""
    small = tmp_path / "staged"
    for path in bundle.rglob("*"):
        rel = path.relative_to(bundle).as_posix()
        if path.is_file() and any(fnmatch.fnmatchcase(rel, p) for p in Step1XFamily.prepare_files):
            (small / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, small / rel)
    assert not list(small.rglob("*.safetensors")) and not (small / "transformer").exists()
    assert (small / "processor" / "tokenizer.json").is_file() and (small / "text_encoder" / "config.json").is_file()
    assert not (small / "Qwen2.5-VL-7B-Instruct").exists()

    def prepared(folder, variant):
        family = Step1XFamily(ModelSpec("step1x", {"variant": variant}, str(folder), dtype="float32"))
        request = EditRequest([picture(1)], "Please dehaze the image", 3, EditParams(num_steps=STEPS, size_level=SIZE))
        return family.preparer(folder)(request)

    want = prepared(release, variant)
    for folder, option in ((small, variant), (bundle, variant), (small, None) if variant == "realrestorer" else (release, None)):
        got = prepared(folder, option)
        assert got.key == want.key and got.meta == want.meta and sorted(got.arrays) == sorted(want.arrays)
        for name, array in want.arrays.items():
            assert np.array_equal(got.arrays[name], array), name


def test_family_passes_model_guidance_and_names_it(bundle_g):
    def family(**options):
        return Step1XFamily(ModelSpec("step1x", options, str(bundle_g), dtype="float32"))

    assert ":guidance" not in family().model_id()
    assert ":guidance=2.0:" in family(model_guidance=2.0).model_id()
    assert family(model_guidance=2.0).load(bundle_g, "cpu").guidance == 2.0
    with pytest.raises(ValueError):
        family(model_guidance=float("nan"))


def test_realrestorer_config_validates_and_its_task_prompts_read():
    from step1x_batch.job.config import load_config
    from step1x_batch.recipes.synthesize import read_templates

    cfg = load_config(str(ROOT / "configs" / "realrestorer.yaml"))
    assert cfg.model.family == "step1x" and cfg.model.weights.rstrip("/").endswith("/RealRestorer")
    assert cfg.model.dtype == "bfloat16" and cfg.device() == "cuda" and cfg.resources.num_gpus_per_actor == 1
    assert cfg.edit_defaults() == EditParams(num_steps=28, guidance_scale=3.0, size_level=1024, negative_prompt="")
    assert cfg.model.options["version"] == "v1.1" and cfg.model.options["model_guidance"] == 3.5
    assert cfg.model.options["variant"] == "realrestorer" and "[realrestorer]" in cfg.family().model_id()
    head = (ROOT / "configs" / "realrestorer.yaml").read_text().lower()
    assert "non-commercial" in head and "apache-2.0" in head
    prompts = read_templates(str(ROOT / "configs" / "realrestorer-task-prompts.txt"))
    assert prompts == [
        "Please deblur the image and make it sharper",
        "Please restore the image clarity and artifacts.",
        "Please remove the lens flare and glare from the image.",
        "Please remove the moiré patterns from the image",
        "Please dehaze the image",
        "Please restore this low-quality image, recovering its normal brightness and clarity.",
        "Please remove noise from the image.",
        "Please remove the rain from the image and restore its clarity.",
        "Please remove the reflection from the image.",
        "Restore the details and keep the original composition.",
    ]
