"""The command line: every job subcommand turns a bad config into exit status 2 and one line."""

import pytest

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
