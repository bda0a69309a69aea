"""``hf://datasets/<repo>/<path>`` manifests (issue 21, item 2) through huggingface_hub's fsspec
filesystem, against a local stand-in for the Hub (tests/hub_server.py): listing a folder or a
glob, reading Parquet shards (fsspec and the pyarrow filesystem Ray's readers get), a WebDataset
shard, the token sent from the environment and never shown, a config that names a token refused."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import huggingface_hub.constants
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from step1x_batch.io.storage import arrow_filesystem
from step1x_batch.job.config import ConfigError, parse_config
from step1x_batch.rows import manifest
from step1x_batch.rows.webdataset import read_shard

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_server import FakeHub  # noqa: E402

TOKEN = "hf_fakeTokenForTheLocalHub0123456789"
REPO = "hf://datasets/org/bench"


def _parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


SHARDS = {
    "data/train-00000-of-00002.parquet": pa.table({"key": ["a", "b"], "instruction": ["red", "blue"],
                                                   "input_image_raw": [b"\x89PNG-a", b"\x89PNG-b"]}),
    "data/more/train-00001-of-00002.parquet": pa.table({"key": ["c"], "instruction": ["green"],
                                                        "input_image_raw": [b"\x89PNG-c"]}),
}


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _start(monkeypatch, tmp_path: Path, token: str | None, env_token: str | None) -> FakeHub:
    files = {path: _parquet(t) for path, t in SHARDS.items()}
    files["README.md"] = b"---\nlicense: apache-2.0\n---\n"
    files["data/_notes.parquet"] = b"hidden: not a manifest file"
    files["wds/shard-000.tar"] = _tar([("s1.jpg", b"jpeg-bytes"), ("s1.txt", b"add a hat"),
                                       ("s1.json", json.dumps({"task_type": "add"}).encode())])
    hub = FakeHub({"org/bench": files}, token=token)
    endpoint = hub.start()
    # huggingface_hub reads HF_ENDPOINT when imported (already done by now) and HfApi takes
    # constants.ENDPOINT when a filesystem is made: patch both (Ray workers inherit the variable).
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    # no token saved by `hf auth login` on this machine takes part
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    if env_token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", env_token)
    return hub


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A private dataset repo org/bench that answers only requests with Bearer TOKEN."""
    server = _start(monkeypatch, tmp_path, token=TOKEN, env_token=TOKEN)
    yield server
    server.stop()


def _repo_requests(hub: FakeHub) -> list[tuple[str, str | None]]:
    return [(p, a) for p, a in zip(hub.paths, hub.auth) if "/org/bench" in p]


def test_lists_a_folder_and_reads_its_parquet_shards(hub):
    files = manifest.manifest_files(f"{REPO}/data/")
    assert files == [f"{REPO}/data/more/train-00001-of-00002.parquet",
                     f"{REPO}/data/train-00000-of-00002.parquet"]  # _notes.parquet is hidden
    for uri in files:
        path_in_repo = uri[len(REPO) + 1:]
        table, expected = manifest._read_file(uri, None), SHARDS[path_in_repo]
        for name in ("key", "instruction"):  # (how image bytes are carried is the readers' business)
            assert table.column(name).to_pylist() == expected.column(name).to_pylist()
    whole = manifest.read_manifest_table(f"{REPO}/data/", edit_rows=True)
    assert sorted(whole.column("key").to_pylist()) == ["a", "b", "c"]

    seen = _repo_requests(hub)
    assert any("/tree/main/data" in p for p, _ in seen)  # listed through the Hub's tree API
    assert any("/resolve/main/data/train-00000-of-00002.parquet" in p for p, _ in seen)
    assert seen and all(auth == f"Bearer {TOKEN}" for _, auth in seen)  # the token from HF_TOKEN


def test_a_glob_and_the_pyarrow_filesystem(hub):
    assert manifest.manifest_files(f"{REPO}/data/*.parquet") == [f"{REPO}/data/train-00000-of-00002.parquet"]
    fs, path = arrow_filesystem(f"{REPO}/data/more/train-00001-of-00002.parquet")
    assert isinstance(fs, pa.fs.FileSystem)
    assert pq.read_table(path, filesystem=fs).equals(SHARDS["data/more/train-00001-of-00002.parquet"])


def test_a_webdataset_shard_on_the_hub(hub):
    table = read_shard(f"{REPO}/wds/shard-000.tar", None)
    assert table.to_pylist() == [{"__key__": "s1", "__url__": f"{REPO}/wds/shard-000.tar",
                                  "jpg": b"jpeg-bytes", "txt": "add a hat", "task_type": "add",
                                  "__manifest_problem": None}]


def test_a_missing_file_is_a_clear_error_without_the_token(hub):
    with pytest.raises(FileNotFoundError) as missing:
        manifest.manifest_files(f"{REPO}/data/nothing-here.parquet")
    assert "hf://datasets/org/bench/data/nothing-here.parquet" in str(missing.value)
    with pytest.raises(FileNotFoundError) as unread:
        manifest._read_file(f"{REPO}/data/nothing-here.parquet", None)
    assert "datasets/org/bench/data/nothing-here.parquet" in str(unread.value)
    with pytest.raises(FileNotFoundError) as no_repo:
        manifest.manifest_files("hf://datasets/org/absent/data/")
    assert "hf://datasets/org/absent/data/" in str(no_repo.value)
    for err in (missing, unread, no_repo):
        assert TOKEN not in str(err.value) and TOKEN not in repr(err.value)


def test_a_wrong_token_is_refused_and_not_shown(monkeypatch, tmp_path):
    wrong = "hf_wrongTokenWrongToken0123456789"
    server = _start(monkeypatch, tmp_path, token=TOKEN, env_token=wrong)
    try:
        with pytest.raises(FileNotFoundError) as refused:
            manifest.manifest_files(f"{REPO}/data/")
        assert wrong not in str(refused.value) and TOKEN not in str(refused.value)
        assert f"Bearer {wrong}" in server.auth  # it was sent, and the Hub said no
    finally:
        server.stop()


def test_a_public_repo_without_a_token(monkeypatch, tmp_path):
    server = _start(monkeypatch, tmp_path, token=None, env_token=None)
    try:
        assert len(manifest.manifest_files(f"{REPO}/data/")) == 2
        assert all(auth is None for _, auth in _repo_requests(server))
    finally:
        server.stop()


def test_a_token_in_the_config_is_refused(tmp_path):
    raw = {"input": {"manifest": f"{REPO}/data/", "hf_token": TOKEN}, "output": {"uri": str(tmp_path)}}
    with pytest.raises(ConfigError) as refused:
        parse_config(raw)
    assert "input.hf_token" in str(refused.value) and TOKEN not in str(refused.value)
    raw = {"input": {"manifest": f"hf://user:{TOKEN}@datasets/org/bench/data/"}, "output": {"uri": str(tmp_path)}}
    with pytest.raises(ConfigError) as in_uri:
        parse_config(raw)
    assert "input.manifest" in str(in_uri.value) and TOKEN not in str(in_uri.value)
