"""The command line: every job subcommand turns a bad config into exit status 2 and one line."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from step1x_batch.cli import main


@pytest.mark.parametrize("command", ["run", "synthesize", "rerender"])
def test_bad_config_is_exit_2_with_the_key_path(command, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: {manifest: m.jsonl}\noutput: {uri: out}\nmodel: {family: 'null'}\nsampling: {num_steps: 0}\n")
    assert main([command, str(bad)]) == 2
    err = capsys.readouterr().err
    assert "sampling.num_steps" in err and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("error: invalid config: sampling.num_steps: "), err


@pytest.mark.parametrize("command", ["run", "synthesize", "rerender"])
def test_a_config_with_several_bad_keys_is_one_line(command, tmp_path, capsys):
    """The README promises one line, ``error: ...``, whatever the number of bad keys."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("input: {manifest: m.jsonl}\noutput: {uri: out}\nmodel: {family: 'null'}\n"
                   "sampling: {num_steps: 0}\nruntime: {bogus: 1}\n")
    assert main([command, str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("error: invalid config: ") and "sampling.num_steps: " in err
    assert "; runtime.bogus: Extra inputs are not permitted" in err


@pytest.mark.parametrize("command", ["run", "synthesize", "rerender"])
def test_missing_config_is_exit_2(command, tmp_path, capsys):
    assert main([command, str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml" in capsys.readouterr().err


def test_invalid_bucket_name_is_exit_2_without_traceback(tmp_path, capsys, s3_server):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"input: {{manifest: 's3://bad!bucket/m.jsonl'}}\noutput: {{uri: '{tmp_path}/out'}}\n"
                   "model: {family: 'null'}\n")
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


# --- `step1x-batch edit`: every family, through the shared in-process pipeline --------------------


def _picture(seed: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(tmp_path: Path, name: str, pixels: np.ndarray) -> Path:
    path = tmp_path / name
    Image.fromarray(pixels).save(path)
    return path


def test_edit_step1x_by_default_is_the_pipelines_edit(tmp_path, capsys):
    from step1x_batch.models.step1x.pipeline import Step1XEditPipeline
    from step1x_batch.models.step1x.tiny import make_tiny_weights

    weights = make_tiny_weights(tmp_path / "step1x", seed=0)
    image = _picture(1, 40, 56)
    out = tmp_path / "out.png"
    argv = ["edit", "--weights", str(weights), "--image", str(_save(tmp_path, "in.png", image)),
            "--instruction", "make it red", "--out", str(out), "--seed", "3", "--steps", "2",
            "--size-level", "64", "--dtype", "float32", "--option", "posterior_mean=true"]
    assert main(argv) == 0, capsys.readouterr().err
    assert "wrote" in capsys.readouterr().out
    pipe = Step1XEditPipeline.from_pretrained(weights, dtype="float32")
    (expected,) = pipe.edit([image], ["make it red"], seeds=[3], num_steps=2, size_level=64, posterior_mean=True)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), expected.image)
    assert expected.image.shape == image.shape  # resized back to the input, as the family finishes


def test_edit_qwen_image_edit_with_two_images_and_options(tmp_path, capsys):
    from step1x_batch.models.qwen_image_edit.pipeline import QwenImageEditPipeline
    from step1x_batch.models.qwen_image_edit.tiny import make_tiny_weights

    weights = make_tiny_weights(tmp_path / "qwen", seed=0)
    images = [_picture(1, 48, 32), _picture(2, 32, 48)]
    paths = [str(_save(tmp_path, f"in{i}.png", im)) for i, im in enumerate(images)]
    options = {"vl_area": 64 * 64, "reference_area": 96 * 96, "image_processor": "pil"}
    out = tmp_path / "out.png"
    argv = ["edit", "--family", "qwen-image-edit", "--weights", str(weights), "--image", paths[0],
            "--image", paths[1], "--instruction", "put picture 1 into picture 2", "--out", str(out),
            "--seed", "5", "--steps", "2", "--size-level", "96", "--dtype", "float32"]
    argv += [arg for k, v in options.items() for arg in ("--option", f"{k}={v}")]
    assert main(argv) == 0, capsys.readouterr().err
    pipe = QwenImageEditPipeline.from_pretrained(weights, dtype="float32", **options)
    (expected,) = pipe.edit([images], ["put picture 1 into picture 2"], seeds=[5], num_steps=2, size_level=96)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), expected.image)


def test_edit_null_needs_no_weights(tmp_path, capsys):
    image = _picture(4, 20, 30)
    out = tmp_path / "out.png"
    argv = ["edit", "--family", "null", "--image", str(_save(tmp_path, "in.png", image)),
            "--instruction", "anything", "--out", str(out)]
    assert main(argv) == 0, capsys.readouterr().err
    np.testing.assert_array_equal(np.asarray(Image.open(out)), image)


@pytest.mark.parametrize(("extra", "says"), [
    (["--family", "nope"], "unknown model family 'nope'"),
    (["--family", "null", "--option", "bogus=1"], "bogus"),
    (["--family", "null", "--option", "no-equals"], "expected key=value"),
    ([], "the step1x family needs its weights folder"),
])
def test_edit_bad_family_or_option_is_exit_2_and_one_line(tmp_path, capsys, extra, says):
    image = _save(tmp_path, "in.png", _picture(4, 20, 30))
    argv = ["edit", "--image", str(image), "--instruction", "x", "--out", str(tmp_path / "o.png"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and err.count("\n") == 1 and "Traceback" not in err
