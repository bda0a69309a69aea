"""Checks before side effects: each pre-flight failure is exit status 2 and one sentence that says
what to fix, found before Ray starts and before anything is written under the output root.

Real parts: a moto S3 server, real tiny Step1X-Edit / Qwen-Image-Edit weight folders (the
official layouts), a refused endpoint (a port nobody listens on)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import boto3
import pytest
import yaml

from step1x_batch.job import runner
from step1x_batch.io.storage import write_bytes

from conftest import free_port, make_bucket


@pytest.fixture(scope="module")
def tiny_step1x(tmp_path_factory) -> Path:
    from step1x_batch.models.step1x.tiny import make_tiny_weights

    return Path(make_tiny_weights(tmp_path_factory.mktemp("w") / "step1x", seed=0))


@pytest.fixture(autouse=True)
def ray_never_starts(monkeypatch):
    import ray

    def started(*args, **kwargs):
        raise AssertionError("Ray was started although a pre-flight check failed")

    if ray.is_initialized():  # another module's Ray: this module needs none
        ray.shutdown()
    monkeypatch.setattr(runner, "init_ray", started)
    monkeypatch.setattr(ray, "init", started)


def _manifest(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _job(tmp_path: Path, manifest: str, output: str, **sections) -> str:
    raw = {"input": {"manifest": manifest}, "output": {"uri": output}, "model": {"family": "null"}}
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _refused(config: str, capsys) -> str:
    """Run the job's real entry point; it must exit 2 with one line and no traceback."""
    rc = runner.run_config(config)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert rc == 2, captured
    assert "Traceback" not in captured.err + captured.out
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def _objects(endpoint: str, bucket_uri: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    out = client.list_objects_v2(Bucket=bucket_uri.removeprefix("s3://"))
    return [o["Key"] for o in out.get("Contents", [])]


ROW = {"id": "r1", "image_uri": "a.png", "instruction": "make it blue"}


def test_missing_local_manifest(tmp_path, capsys):
    out = tmp_path / "out"
    err = _refused(_job(tmp_path, str(tmp_path / "nope.jsonl"), str(out)), capsys)
    assert "input.manifest" in err and "No manifest at" in err and "nope.jsonl" in err
    assert not out.exists()


def test_refused_endpoint_is_named_as_such(tmp_path, capsys, s3_server):
    port = free_port()
    cfg = _job(tmp_path, "s3://inputs/manifest.jsonl", str(tmp_path / "out"),
               input={"storage": {"endpoint_url": f"http://127.0.0.1:{port}", "max_attempts": 1,
                                  "connect_timeout": 2}})
    err = _refused(cfg, capsys)
    assert f"127.0.0.1:{port}" in err and "refused the connection" in err
    assert "permission" not in err.lower() and "output" not in err
    assert not (tmp_path / "out").exists()


def test_missing_input_bucket_says_the_bucket_is_missing(tmp_path, capsys, s3_server):
    out_bucket = make_bucket(s3_server)
    err = _refused(_job(tmp_path, "s3://no-such-bucket-here/m.jsonl", f"{out_bucket}/run"), capsys)
    assert "the bucket 'no-such-bucket-here' does not exist" in err and "input.manifest" in err
    assert _objects(s3_server, out_bucket) == []


@pytest.mark.parametrize("rows, expected", [
    ([{"id": "r1", "image_uri": "a.png", "prompt": "x"}], "has no `instruction` column"),
    ([{"id": "r1", "picture": "a.png", "instruction": "x"}], "has no `image_uri` or `image_uris` column"),
    ([], "has no rows"),
])
def test_manifest_schema(tmp_path, capsys, s3_server, rows, expected):
    bucket = make_bucket(s3_server)
    write_bytes(f"{bucket}/m.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    err = _refused(_job(tmp_path, f"{bucket}/m.jsonl", f"{bucket}/out"), capsys)
    assert expected in err
    assert _objects(s3_server, bucket) == ["m.jsonl"]  # nothing else written


def test_missing_output_bucket(tmp_path, capsys, s3_server):
    manifest = _manifest(tmp_path / "in" / "m.jsonl", [ROW])
    err = _refused(_job(tmp_path, manifest, "s3://no-output-bucket/run"), capsys)
    assert "output.uri" in err and "the bucket 'no-output-bucket' does not exist" in err


def test_output_probe_is_removed_when_a_later_check_fails(tmp_path, capsys, s3_server):
    bucket = make_bucket(s3_server)
    manifest = _manifest(tmp_path / "in" / "m.jsonl", [ROW])
    cfg = _job(tmp_path, manifest, f"{bucket}/out",
               model={"family": "step1x", "weights": str(tmp_path / "no-weights")})
    err = _refused(cfg, capsys)
    assert "model.weights" in err and "does not exist" in err
    assert _objects(s3_server, bucket) == []  # the writability probe was deleted


def test_weights_folder_without_the_expected_files(tmp_path, capsys, tiny_step1x):
    weights = tmp_path / "weights"
    shutil.copytree(tiny_step1x, weights)
    (weights / "vae.safetensors").unlink()
    manifest = _manifest(tmp_path / "in" / "m.jsonl", [ROW])
    cfg = _job(tmp_path, manifest, str(tmp_path / "out"), model={"family": "step1x", "weights": str(weights)})
    err = _refused(cfg, capsys)
    assert "(family step1x) has no file matching vae.safetensors" in err
    assert not (tmp_path / "out").exists()


def test_qwen_folder_without_its_tokenizer(tmp_path, capsys):
    from step1x_batch.models.qwen_image_edit.tiny import make_tiny_weights

    weights = Path(make_tiny_weights(tmp_path / "qwen", seed=0))
    for folder in ("processor", "tokenizer"):
        for name in ("tokenizer.json", "vocab.json"):
            (weights / folder / name).unlink(missing_ok=True)
    manifest = _manifest(tmp_path / "in" / "m.jsonl", [ROW])
    cfg = _job(tmp_path, manifest, str(tmp_path / "out"),
               model={"family": "qwen-image-edit", "weights": str(weights)})
    assert "(family qwen-image-edit) has no tokenizer" in _refused(cfg, capsys)


def test_truncated_weights_file_in_object_storage(tmp_path, capsys, s3_server, tiny_step1x):
    bucket = make_bucket(s3_server)
    for path in tiny_step1x.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if path.name == "vae.safetensors":
                full = len(data)
                data = data[: full // 2]  # an upload cut off half way
            write_bytes(f"{bucket}/weights/{path.relative_to(tiny_step1x).as_posix()}", data)
    manifest = _manifest(tmp_path / "in" / "m.jsonl", [ROW])
    cfg = _job(tmp_path, manifest, f"{bucket}/out", model={"family": "step1x", "weights": f"{bucket}/weights"})
    err = _refused(cfg, capsys)
    assert f"the weights file {bucket}/weights/vae.safetensors is truncated" in err
    assert f"{full // 2:,} bytes, its header describes {full:,}" in err
    assert not [k for k in _objects(s3_server, bucket) if k.startswith("out")]


def test_safetensors_header_checks(tmp_path):
    from step1x_batch.job.preflight import safetensors_problem
    from safetensors.numpy import save_file
    import numpy as np

    good = tmp_path / "good.safetensors"
    save_file({"w": np.zeros((4, 4), np.float32)}, str(good))
    data = good.read_bytes()
    assert safetensors_problem(str(good), len(data), None) is None
    padded = tmp_path / "padded.safetensors"
    padded.write_bytes(data + b"\0" * 16)
    assert "corrupt or concatenated" in safetensors_problem(str(padded), len(data) + 16, None)
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    assert "not a readable safetensors file" in safetensors_problem(str(bogus), 10, None)


def test_missing_adapter(tmp_path, capsys, tiny_step1x):
    manifest = _manifest(tmp_path / "in" / "m.jsonl", [ROW])
    cfg = _job(tmp_path, manifest, str(tmp_path / "out"),
               model={"family": "step1x", "weights": str(tiny_step1x),
                      "adapters": [{"uri": str(tmp_path / "lora.safetensors")}]})
    err = _refused(cfg, capsys)
    assert "model.adapters[0].uri" in err and "lora.safetensors does not exist" in err


def test_checks_pass_and_report_the_row_count(tmp_path, s3_server):
    from step1x_batch.job.config import load_config
    from step1x_batch.job.preflight import check_job

    manifest = _manifest(tmp_path / "in" / "m.jsonl", [ROW, {**ROW, "id": "r2"}, {**ROW, "id": "r3"}])
    bucket = make_bucket(s3_server)
    facts = check_job(load_config(_job(tmp_path, manifest, f"{bucket}/out")))
    assert facts.manifest_rows == 3 and facts.manifest_columns == ["id", "image_uri", "instruction"]
    assert _objects(s3_server, bucket) == []
