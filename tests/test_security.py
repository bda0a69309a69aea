"""Security (issue 4, item 6): planted secrets never leave the process, output keys stay inside the
output root, only safetensors are loaded, no remote code, the report escapes row text, and
credentials in a config are refused.

Already covered elsewhere and not repeated: ``redact`` on planted text and RowError messages
(test_storage.py), ``safe_output_key`` over its whole refuse list (test_storage.py), a pickle
renamed ``.safetensors`` refused by ``read_header`` (test_loading.py), a Qwen folder of
``pytorch_model.bin`` refused by ``QwenConditioner`` (test_conditioner.py), a credential-named config
key refused without echoing its value (test_config.py), weights staging keeping the secret out of its
logs (test_weights_cache.py). Here: the same properties through a whole job and through the whole
release loader.
"""

from __future__ import annotations

import ast
import html.parser
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import kill_marked, make_bucket
from step1x_batch import errors
from step1x_batch.job.config import ConfigError, load_config
from step1x_batch.rows.log import read_logs
from step1x_batch.io.storage import write_bytes

ROOT = Path(__file__).resolve().parents[1]

# Planted credentials: distinctive values, each long enough for redact()'s environment rule.
KEY_ID = "AKIAPLANTEDKEY7QX2Z9"  # AKIA + 16: the shape of a real access key id
SECRET = "planted/SECRET+value-Zq8vR3nT0wYxKp"
TOKEN = "plantedSESSIONtoken-Fh29Lm0QxZ81vBnT"
URL_PASSWORD = "planted-url-pa55w0rd-X7"
SIGNATURE = "5ee4c0ffee0dd5ea1ed5191a7e2b4c0ffee0dd5ea1ed5191a7e2b4c0ffee0dd5"
PLANTED = {"access key id": KEY_ID, "secret key": SECRET, "session token": TOKEN,
           "URI password": URL_PASSWORD, "presigned signature": SIGNATURE}

XSS_SCRIPT = "<script>alert('xss')</script> add a hat"
XSS_IMG = '<img src=x onerror="alert(1)"> make it blue'

UNSAFE_KEYS = [
    "../escape-dotdot.png",
    "images/../../escape-inner.png",
    "{abs}/escape-absolute.png",
    "file://{abs}/escape-file-url.png",
    "s3://another-bucket/escape.png",
    "images\\..\\..\\escape-backslash.png",
    "%2e%2e/escape-encoded.png",
    "images/%2E%2E/%2e%2e/escape-encoded-upper.png",
    ".%2e/escape-half-encoded.png",
    "..%2fescape-encoded-slash.png",
    "~/escape-home.png",
]


def _manifest_rows(bucket: str, endpoint: str, abs_dir: Path) -> list[dict]:
    host = endpoint.split("://", 1)[1]
    presigned = (
        f"http://{host}/{bucket[5:]}/in/a.png?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        f"&X-Amz-Credential={KEY_ID}%2F20260101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20260101T000000Z"
        f"&X-Amz-Expires=600&X-Amz-SignedHeaders=host&X-Amz-Security-Token={TOKEN}&X-Amz-Signature={SIGNATURE}"
    )
    rows = [
        {"id": "xss-script", "image_uri": "a.png", "instruction": XSS_SCRIPT},
        {"id": "xss-img", "image_uri": "a.png", "instruction": XSS_IMG},
        {"id": "xss-missing", "image_uri": "<script>alert(3)</script>.png", "instruction": "edit"},
        {"id": "userinfo-s3", "image_uri": f"s3://{KEY_ID}:{URL_PASSWORD}@{bucket[5:]}/in/a.png",
         "instruction": "edit"},
        {"id": "userinfo-http", "image_uri": f"http://alice:{URL_PASSWORD}@{host}/{bucket[5:]}/in/a.png",
         "instruction": "edit"},
        {"id": "presigned", "image_uri": presigned, "instruction": "edit"},
        {"id": "refused", "image_uri": f"http://bob:{URL_PASSWORD}@127.0.0.1:9/x.png?sig={SIGNATURE}",
         "instruction": "edit"},
        {"id": "leaky-model", "image_uri": "a.png", "instruction": "leak please"},
    ]
    for i, key in enumerate(UNSAFE_KEYS):
        rows.append({"id": f"unsafe-{i:02d}", "image_uri": "a.png", "instruction": "edit",
                     "output_key": key.format(abs=abs_dir)})
    return rows


@pytest.fixture(scope="module")
def planted_job(s3_server, tmp_path_factory, image_factory):
    """Run the edit job once as its own process (``jobs/edit_dataset.py``, its own local Ray) with
    planted credentials in its environment and in the manifest. Returns where everything is."""
    base = tmp_path_factory.mktemp("planted")
    home, abs_dir, inputs, out = base / "home", base / "outside", base / "in", base / "deep" / "out"
    for d in (home, abs_dir, inputs):
        d.mkdir(parents=True)
    bucket = make_bucket(s3_server)
    png = image_factory.bytes("RGB", "PNG")
    (inputs / "a.png").write_bytes(png)
    write_bytes(f"{bucket}/in/a.png", png)
    rows = _manifest_rows(bucket, s3_server, abs_dir)
    (inputs / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = base / "job.yaml"
    cfg.write_text(yaml.safe_dump({
        "input": {"manifest": str(inputs / "m.jsonl"), "storage": {"max_attempts": 2}},
        "output": {"uri": str(out)},
        "model": {"family": "job_plugins:Leaky"},
        "resources": {"edit_batch_size": 8, "io_batch_size": 8},
        "runtime": {"run_id": "planted", "progress_bars": False, "max_error_fraction": 1.0},
    }))
    marker = f"step1x-sec-{uuid.uuid4().hex[:12]}"
    env = {
        **{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},  # its own Ray, not a cluster's
        "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_SESSION_TOKEN": TOKEN,
        "STEP1X_TEST_URL_PASSWORD": URL_PASSWORD,  # the leaky plug-in puts it in its error text
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        "HOME": str(home), "RAY_TMPDIR": f"/tmp/{marker}", "RAY_AUTH_MODE": "disabled",
        "STEP1X_TEST_MARKER": marker,
    }
    try:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "jobs/edit_dataset.py"), "--config", str(cfg)],
            env=env, cwd=str(base), capture_output=True, timeout=240, start_new_session=True,
        )
    finally:
        kill_marked(marker)
    ray_dir = Path(f"/tmp/{marker}")  # everything this job's Ray wrote: its own and its workers' logs
    ray_files = [p for p in ray_dir.rglob("*") if p.is_file() and not p.is_symlink()]
    ray_text = {str(p.relative_to(ray_dir)): p.read_bytes().decode("latin-1") for p in ray_files}
    shutil.rmtree(ray_dir, ignore_errors=True)
    printed = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, printed[-3000:]
    return {"base": base, "out": out, "home": home, "abs": abs_dir, "printed": printed,
            "ray_files": ray_text, "records": {r["id"]: r for r in read_logs(str(out)).to_pylist()}}


def _text_of(path: Path) -> str:
    """What a file says: Parquet decoded to its values (compressed bytes hide nothing from us)."""
    if path.suffix == ".parquet":
        return json.dumps(pq.read_table(path).to_pylist(), default=str)
    return path.read_bytes().decode("utf-8", errors="replace")


def _leaks(places: dict[str, str]) -> list[str]:
    return [f"{what} in {where}" for where, text in places.items() for what, value in PLANTED.items()
            if value in text]


def test_planted_secrets_not_printed_nor_in_run_files(planted_job):
    """Printed output, everything the job's Ray wrote, the config snapshot, summary, Ray stats and
    the output objects hold none of the planted values."""
    out = planted_job["out"]
    assert len(planted_job["ray_files"]) > 10 and any("python-core-worker" in p for p in planted_job["ray_files"])
    run_files = sorted(p for p in (out / "runs" / "planted").iterdir() if p.name != "report.html")
    assert {p.name for p in run_files} >= {"config.yaml", "summary.json", "ray_stats.txt"}
    places = {f"runs/planted/{p.name}": _text_of(p) for p in run_files}
    places.update({f"images/{p.name}": _text_of(p) for p in (out / "images").iterdir()})
    places["stdout+stderr"] = planted_job["printed"]
    places.update({f"ray:{k}": v for k, v in planted_job["ray_files"].items()})
    assert not _leaks(places), _leaks(places)
    # the rows that carried them still say what went wrong, and where
    recs = planted_job["records"]
    assert len(recs) == 8 + len(UNSAFE_KEYS)
    assert recs["leaky-model"]["error_type"] == errors.EDIT_FAILED
    assert "auth failed: secret=***" in recs["leaky-model"]["error_message"]
    assert recs["refused"]["error_type"] == errors.READ_FAILED
    assert "127.0.0.1:9/x.png" in recs["refused"]["error_message"]
    assert recs["userinfo-http"]["status"] == recs["presigned"]["status"] == "ok"  # they were usable


def test_planted_secrets_not_in_error_messages(planted_job):
    messages = {rid: r["error_message"] or "" for rid, r in planted_job["records"].items()}
    assert not _leaks(messages), _leaks(messages)


def test_planted_secrets_not_in_row_log_or_report(planted_job):
    out = planted_job["out"]
    places = {str(p.relative_to(out)): _text_of(p) for p in (out / "logs").rglob("*.parquet")}
    places["runs/planted/report.html"] = _text_of(out / "runs" / "planted" / "report.html")
    assert len(places) >= 2
    assert not _leaks(places), _leaks(places)


def test_unsafe_output_keys_write_nothing_outside(planted_job):
    recs = planted_job["records"]
    for i, key in enumerate(UNSAFE_KEYS):
        rec = recs[f"unsafe-{i:02d}"]
        assert (rec["status"], rec["error_type"], rec["output_uri"]) == ("error", errors.UNSAFE_OUTPUT_KEY, None), key
    base, out = planted_job["base"], planted_job["out"]
    written = [p for p in base.rglob("*") if p.is_file()]
    outside = [p for p in written if out not in p.parents and p.parent != base / "in" and p != base / "job.yaml"]
    assert not outside, outside
    assert not list(planted_job["abs"].iterdir()) and not list(planted_job["home"].glob("escape*"))
    assert not [p for p in out.rglob("*escape*")]  # not even inside, under a mangled name
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        f"{rid}.png" for rid, r in recs.items() if r["status"] == "ok")


class _Tags(html.parser.HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def _assert_inert(page: str) -> _Tags:
    """No script element, no event-handler attribute, images only from data: URIs."""
    parser = _Tags()
    parser.feed(page)
    assert "script" not in {t for t, _ in parser.tags}
    assert not [(t, a) for t, a in parser.tags for k in a if k.lower().startswith("on")]
    for tag, attrs in parser.tags:
        if tag == "img":
            assert attrs["src"].startswith("data:image/jpeg;base64,"), attrs
    return parser


def test_report_escapes_row_text(planted_job):
    page = (planted_job["out"] / "runs" / "planted" / "report.html").read_text()
    parser = _assert_inert(page)
    shown = "".join(parser.text)
    assert XSS_SCRIPT in shown and XSS_IMG in shown  # shown as text, exactly
    assert "<script>alert(3)</script>.png" in shown  # from an error message and an image_uri too


def test_report_escapes_every_field():
    """render_report on hostile values in every field it shows (no Ray)."""
    from step1x_batch.job.report import render_report

    evil = '"><script>alert(1)</script><img src=x onerror=alert(2)>'
    summary = {"run_id": evil, "ok": False, "rows_processed": 1, "by_status": {"error": 1},
               "by_error_type": {evil: 1}, "output_uri": evil}
    row = {name: evil for name in ("id", "instruction", "error_type", "error_message", "image_uri",
                                   "seed", "num_steps", "guidance_scale", "size_level", "input_width",
                                   "input_height")}
    row["status"] = "error"
    multi = {**row, "status": "ok", "image_uris": [evil, evil + "2"]}
    page = render_report(summary, [row, {**row, "status": "ok"}, multi], [([None], None), ([None], None), ([None, None], None)])
    parser = _assert_inert(page)
    assert "".join(parser.text).count(evil) >= 12 + 2


# --------------------------------------------------------------------------------------------
# Credentials in a config file.


@pytest.mark.parametrize("path", [
    "input.storage.aws_secret_access_key",
    "output.storage.password",
    "model.storage.session_token",
    "model.api_key",
    "runtime.github_token",
    "credentials",
])
def test_config_with_a_credential_key_is_refused(tmp_path, path):
    raw: dict = {"input": {"manifest": "m.jsonl"}, "output": {"uri": "out"}, "model": {"family": "null"}}
    node = raw
    *parents, leaf = path.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = SECRET
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as info:
        load_config(str(cfg))
    assert f"{path}: credentials are not accepted" in str(info.value)
    assert SECRET not in str(info.value)


@pytest.mark.parametrize("uri", [
    f"s3://{KEY_ID}:{URL_PASSWORD}@bucket/m.jsonl",
    f"https://alice:{URL_PASSWORD}@host.example/m.jsonl",
    f"https://host.example/m.jsonl?X-Amz-Credential={KEY_ID}&X-Amz-Signature={SIGNATURE}",
])
def test_config_with_credentials_in_a_uri_is_refused(tmp_path, uri):
    raw = {"input": {"manifest": uri}, "output": {"uri": "out"}, "model": {"family": "null"}}
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as info:
        load_config(str(cfg))
    assert "input.manifest" in str(info.value)
    assert URL_PASSWORD not in str(info.value) and SIGNATURE not in str(info.value)


# --------------------------------------------------------------------------------------------
# Safetensors only, no remote code.


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory) -> Path:
    from step1x_batch.models.step1x import tiny
    return tiny.make_tiny_weights(tmp_path_factory.mktemp("release") / "rel", seed=0)


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any attempt to unpickle (torch.load, pickle.load/loads) fails the test loudly."""
    import torch

    calls: list[str] = []

    def refuse(name):
        def fn(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called: something tried to unpickle weights")
        return fn

    monkeypatch.setattr(torch, "load", refuse("torch.load"))
    monkeypatch.setattr(pickle, "load", refuse("pickle.load"))
    monkeypatch.setattr(pickle, "loads", refuse("pickle.loads"))
    return calls


def _copy_release(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _pickle_bytes(state: dict) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def test_release_loader_refuses_every_pickle(tiny_release, tmp_path, no_unpickling):
    import torch
    from safetensors.torch import load_file

    from step1x_batch.models.loading import WeightsError
    from step1x_batch.models.step1x.release import DIT_FILES, QWEN_DIR, VAE_FILE
    from step1x_batch.models.step1x.pipeline import EditPipeline

    dit_name = next(n for n in DIT_FILES if (tiny_release / n).exists())

    # the DiT file holding a torch pickle under its .safetensors name
    rel = _copy_release(tiny_release, tmp_path / "dit-pickled")
    (rel / dit_name).write_bytes(_pickle_bytes(load_file(tiny_release / dit_name)))
    with pytest.raises(WeightsError, match="pickle"):
        EditPipeline.from_pretrained(rel, dtype=torch.float32)

    # the DiT only as a .pt checkpoint: no safetensors DiT, and the .pt is not a candidate
    rel = _copy_release(tiny_release, tmp_path / "dit-pt")
    (rel / dit_name).rename(rel / "step1x-edit.pt")
    with pytest.raises(WeightsError, match="expected one DiT safetensors file"):
        EditPipeline.from_pretrained(rel, dtype=torch.float32)

    # the VAE as a pickle
    rel = _copy_release(tiny_release, tmp_path / "vae-pickled")
    (rel / VAE_FILE).write_bytes(_pickle_bytes(load_file(tiny_release / VAE_FILE)))
    with pytest.raises(WeightsError, match="pickle"):
        EditPipeline.from_pretrained(rel, dtype=torch.float32)

    # the Qwen folder holding only pytorch_model.bin (transformers would torch.load it)
    rel = _copy_release(tiny_release, tmp_path / "qwen-bin")
    qwen = rel / QWEN_DIR
    (qwen / "pytorch_model.bin").write_bytes(_pickle_bytes(load_file(qwen / "model.safetensors")))
    (qwen / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="no .safetensors weights.*refusing"):
        EditPipeline.from_pretrained(rel, dtype=torch.float32)

    assert no_unpickling == []  # refused before anything was unpickled


def test_qwen_is_loaded_with_safetensors_local_files_and_no_remote_code(tiny_release, monkeypatch, no_unpickling):
    """Spy on the transformers entry points while the real tiny release loads."""
    import torch
    import transformers

    from step1x_batch.models.qwen_vl.encoder import QwenVLEncoder
    from step1x_batch.models.qwen_vl.processor import load_tokenizer
    from step1x_batch.models.step1x.release import QWEN_DIR

    seen: dict[str, dict] = {}

    def spy(cls, name):
        original = getattr(cls, "from_pretrained").__func__

        def wrapped(klass, *args, **kwargs):
            seen[name] = kwargs
            return original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(wrapped))

    spy(transformers.Qwen2_5_VLForConditionalGeneration, "model")
    spy(transformers.AutoTokenizer, "tokenizer")
    encoder = QwenVLEncoder.from_pretrained(tiny_release / QWEN_DIR, dtype=torch.float32)
    load_tokenizer(tiny_release / QWEN_DIR)  # the prepare stage's half
    assert encoder.hidden_size > 0
    assert seen["model"].get("use_safetensors") is True
    for name in ("model", "tokenizer"):
        assert seen[name].get("local_files_only") is True, name
        assert not seen[name].get("trust_remote_code"), name
    assert no_unpickling == []


def test_package_source_never_enables_remote_code_or_unpickles():
    """No call in step1x_batch/ passes trust_remote_code other than a literal False, calls
    torch.load / pickle.load(s), or calls a transformers from_pretrained without local_files_only."""
    bad = []
    for path in sorted((ROOT / "step1x_batch").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            name = ast.unparse(node.func)
            for kw in node.keywords:
                literal_false = isinstance(kw.value, ast.Constant) and kw.value.value is False
                if kw.arg == "trust_remote_code" and not literal_false:
                    bad.append(f"{where}: trust_remote_code={ast.unparse(kw.value)}")
                if kw.arg is None and "trust_remote_code" in ast.unparse(kw.value):
                    bad.append(f"{where}: trust_remote_code through **kwargs")
            if name in ("torch.load", "pickle.load", "pickle.loads", "pickle.Unpickler"):
                bad.append(f"{where}: {name}(...)")
            if name.endswith(".from_pretrained") and name.split(".")[0] in (
                    "AutoTokenizer", "AutoProcessor", "AutoImageProcessor", "AutoModel", "AutoConfig",
                    "Qwen2_5_VLForConditionalGeneration", "transformers"):
                if not any(kw.arg == "local_files_only" and isinstance(kw.value, ast.Constant)
                           and kw.value.value is True for kw in node.keywords):
                    bad.append(f"{where}: {name} without local_files_only=True")
    assert not bad, bad
    assert "trust_remote_code=True" not in "".join(
        p.read_text() for p in (ROOT / "step1x_batch").rglob("*.py"))
