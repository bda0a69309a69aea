"""Weights staging against a real S3-protocol server (moto over HTTP), with a counting proxy in
front of it so "downloaded once" is measured in requests, not assumed."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing
import os
import pathlib

import boto3
import numpy as np
import pytest
from safetensors.numpy import load_file, save

from step1x_batch.io import weights as weights_cache
from step1x_batch.io.storage import StorageOptions
from step1x_batch.io.weights import (
    MARKER_NAME,
    ChecksumMismatchError,
    StagingError,
    cache_key,
    default_cache_dir,
    parse_sha256sum,
    stage_weights,
)

CHUNK = 64 * 1024  # small ranged GETs so every big file takes several
PREFIX = "releases/step1x-edit-v1p1"


def _release_files() -> dict[str, bytes]:
    """A release-like folder: a real (tiny) safetensors DiT, a VAE-sized blob, the Qwen folder
    with a nested file and an empty one. Sizes are deliberately not multiples of CHUNK."""
    rng = np.random.default_rng(0)
    dit = save({
        "img_in.weight": rng.standard_normal((8, 4), dtype=np.float32),
        "final_layer.linear.bias": np.arange(8, dtype=np.float32),
    })
    return {
        "step1x-edit-v1p1-official.safetensors": dit,
        "vae.safetensors": rng.integers(0, 256, 300_001, dtype=np.uint8).tobytes(),
        "Qwen2.5-VL-7B-Instruct/config.json": b'{"model_type": "qwen2_5_vl"}',
        "Qwen2.5-VL-7B-Instruct/model-00001-of-00001.safetensors": rng.integers(
            0, 256, 7 * CHUNK + 123, dtype=np.uint8
        ).tobytes(),
        "Qwen2.5-VL-7B-Instruct/added_tokens.json": b"",
        "Qwen2.5-VL-7B-Instruct/nested/extra/tokenizer.json": b'{"version": "1.0"}' * 50,
    }


RELEASE = _release_files()
SHA256 = {rel: hashlib.sha256(data).hexdigest() for rel, data in RELEASE.items()}
EXPECTED_GETS = sum(math.ceil(len(d) / CHUNK) for d in RELEASE.values())


def _upload(endpoint: str, bucket_uri: str, files: dict[str, bytes], prefix: str = PREFIX) -> str:
    bucket = bucket_uri[len("s3://") :]
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for rel, data in files.items():
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=data)
    return f"{bucket_uri}/{prefix}/"


@pytest.fixture
def release_uri(s3_server, s3_bucket) -> str:
    return _upload(s3_server, s3_bucket, RELEASE)


def _object_gets(proxy, uri: str) -> int:
    """GETs of objects under ``uri`` (listings are ``GET /bucket?list-type=2...``)."""
    path = "/" + uri[len("s3://") :].rstrip("/") + "/"
    return sum(1 for m, p in proxy.requests if m == "GET" and p.split("?")[0].startswith(path))


def _assert_identical(folder: pathlib.Path) -> None:
    for rel, data in RELEASE.items():
        assert (folder / rel).read_bytes() == data, rel
    staged = sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MARKER_NAME
    )
    assert staged == sorted(RELEASE), "extra or missing files (a .partial left behind?)"


def _stage(uri, cache, endpoint, **kw) -> pathlib.Path:
    options = StorageOptions(endpoint_url=endpoint, max_attempts=4)
    return stage_weights(uri, cache, options, chunk_bytes=CHUNK, max_concurrency=4, **kw)


# --- basic staging -------------------------------------------------------------------------------


def test_staged_copy_is_byte_identical_and_marked(release_uri, flaky_s3, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="step1x_batch.io.weights")
    folder = _stage(release_uri, tmp_path / "cache", flaky_s3.endpoint)

    assert folder == tmp_path / "cache" / cache_key(release_uri)
    assert len(folder.name) == 16
    assert (tmp_path / "cache" / f"{folder.name}.lock").exists()  # the sibling lock file
    _assert_identical(folder)
    tensors = load_file(folder / "step1x-edit-v1p1-official.safetensors")
    np.testing.assert_array_equal(tensors["final_layer.linear.bias"], np.arange(8, dtype=np.float32))

    marker = json.loads((folder / MARKER_NAME).read_text())
    assert marker["uri"] == release_uri.rstrip("/")
    assert {f["path"]: f["size"] for f in marker["files"]} == {r: len(d) for r, d in RELEASE.items()}
    assert marker["bytes"] == sum(len(d) for d in RELEASE.values())
    # One ranged GET per chunk, no more: the big files really were fetched in pieces.
    assert _object_gets(flaky_s3, release_uri) == EXPECTED_GETS
    assert "/s)" in caplog.text and "staged" in caplog.text  # bytes/s reported


def test_second_call_does_not_download_again(release_uri, s3_server, flaky_s3, tmp_path):
    cache = tmp_path / "cache"
    first = _stage(release_uri, cache, flaky_s3.endpoint)
    inodes = {rel: (first / rel).stat().st_ino for rel in RELEASE}
    before = len(flaky_s3.requests)

    again = _stage(release_uri, cache, flaky_s3.endpoint)
    assert again == first
    assert len(flaky_s3.requests) == before  # not even a listing
    assert {rel: (again / rel).stat().st_ino for rel in RELEASE} == inodes

    # And with the objects gone from the bucket, the node still has its copy.
    bucket, _, prefix = release_uri[len("s3://") :].partition("/")
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    for rel in RELEASE:
        s3.delete_object(Bucket=bucket, Key=prefix + rel)
    assert _stage(release_uri.rstrip("/"), cache, s3_server) == first  # trailing "/" ignored
    _assert_identical(first)


def test_transient_errors_are_retried(release_uri, flaky_s3, tmp_path):
    flaky_s3.fail(2, "503", method="GET")
    flaky_s3.fail(1, "truncate", method="GET")
    folder = _stage(release_uri, tmp_path / "cache", flaky_s3.endpoint)
    _assert_identical(folder)
    assert flaky_s3.injected == 3


# --- several processes on one node ---------------------------------------------------------------


def _stage_in_child(uri, cache, endpoint, barrier, results) -> None:
    barrier.wait()  # all start together: they really contend for the lock
    folder = _stage(uri, cache, endpoint, lock_timeout_s=60)
    results.put(str(folder))


def test_concurrent_stagers_download_once(release_uri, flaky_s3, tmp_path):
    ctx = multiprocessing.get_context("spawn")
    n = 4
    barrier, results = ctx.Barrier(n), ctx.Queue()
    cache = str(tmp_path / "cache")
    procs = [
        ctx.Process(target=_stage_in_child, args=(release_uri, cache, flaky_s3.endpoint, barrier, results))
        for _ in range(n)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    folders = {results.get(timeout=5) for _ in range(n)}
    assert folders == {str(tmp_path / "cache" / cache_key(release_uri))}
    _assert_identical(pathlib.Path(folders.pop()))
    assert _object_gets(flaky_s3, release_uri) == EXPECTED_GETS  # one download, not four


# --- crashes and damaged caches ------------------------------------------------------------------


def _crash_after_chunks(uri, cache, endpoint, chunks) -> None:
    """Stage, but die like a killed process (no cleanup, no finally) after ``chunks`` GETs."""
    real = weights_cache._with_retries
    count = [0]

    def dying(fn, *args):
        count[0] += 1
        if count[0] > chunks:
            os._exit(17)
        return real(fn, *args)

    weights_cache._with_retries = dying
    _stage(uri, cache, endpoint)


def test_crash_mid_download_is_detected_and_redone(release_uri, flaky_s3, tmp_path, caplog):
    cache = tmp_path / "cache"
    ctx = multiprocessing.get_context("spawn")
    p = ctx.Process(target=_crash_after_chunks, args=(release_uri, str(cache), flaky_s3.endpoint, 3))
    p.start()
    p.join(60)
    assert p.exitcode == 17
    dest = cache / cache_key(release_uri)
    assert not (dest / MARKER_NAME).exists()
    assert list(dest.rglob("*.partial")), "the crash should have left a partial file"

    caplog.set_level(logging.INFO, logger="step1x_batch.io.weights")
    gets_before = _object_gets(flaky_s3, release_uri)
    folder = _stage(release_uri, cache, flaky_s3.endpoint, lock_timeout_s=10)  # lock was freed
    assert folder == dest
    _assert_identical(folder)
    assert "unusable" in caplog.text and "downloading again" in caplog.text
    assert _object_gets(flaky_s3, release_uri) - gets_before == EXPECTED_GETS


@pytest.mark.parametrize("damage", ["marker_size", "truncated_file", "missing_file", "bad_marker"])
def test_damaged_cache_is_redone(release_uri, flaky_s3, tmp_path, damage, caplog):
    cache = tmp_path / "cache"
    folder = _stage(release_uri, cache, flaky_s3.endpoint)
    victim = folder / "vae.safetensors"
    marker_path = folder / MARKER_NAME
    if damage == "marker_size":
        marker = json.loads(marker_path.read_text())
        for entry in marker["files"]:
            if entry["path"] == "vae.safetensors":
                entry["size"] += 1
        marker_path.write_text(json.dumps(marker))
    elif damage == "truncated_file":
        victim.write_bytes(RELEASE["vae.safetensors"][:1000])
    elif damage == "missing_file":
        victim.unlink()
    else:
        marker_path.write_text("{not json")
    caplog.set_level(logging.WARNING, logger="step1x_batch.io.weights")
    before = _object_gets(flaky_s3, release_uri)

    assert _stage(release_uri, cache, flaky_s3.endpoint) == folder
    _assert_identical(folder)
    assert _object_gets(flaky_s3, release_uri) - before == EXPECTED_GETS
    assert "downloading again" in caplog.text


# --- checksums -----------------------------------------------------------------------------------


def test_checksum_mapping_and_sha256sum_file(release_uri, s3_server, s3_bucket, flaky_s3, tmp_path):
    folder = _stage(release_uri, tmp_path / "a", flaky_s3.endpoint, checksums=SHA256)
    _assert_identical(folder)
    marker = json.loads((folder / MARKER_NAME).read_text())
    assert {f["path"]: f["sha256"] for f in marker["files"]} == SHA256

    # sha256sum format, as an object in the bucket (binary-mode '*' and './' forms included)
    lines = [f"{d}  ./{r}" if i % 2 else f"{d} *{r}" for i, (r, d) in enumerate(SHA256.items())]
    text = "# sha256sum of the release\n" + "\n".join(lines) + "\n"
    assert parse_sha256sum(text) == SHA256
    sums_uri = _upload(s3_server, s3_bucket, {"SHA256SUMS": text.encode()}, prefix="sums")
    folder_b = _stage(release_uri, tmp_path / "b", flaky_s3.endpoint, checksums=sums_uri + "SHA256SUMS")
    _assert_identical(folder_b)
    assert len(json.loads((folder_b / MARKER_NAME).read_text())["files"]) == len(RELEASE)

    local_sums = tmp_path / "SHA256SUMS"
    local_sums.write_text(text)
    folder_c = _stage(release_uri, tmp_path / "c", flaky_s3.endpoint, checksums=str(local_sums))
    marker_c = json.loads((folder_c / MARKER_NAME).read_text())
    assert {f["path"]: f.get("sha256") for f in marker_c["files"]} == SHA256


def test_checksum_mismatch_is_a_clear_error_and_leaves_nothing(release_uri, flaky_s3, tmp_path):
    bad = dict(SHA256)
    bad["Qwen2.5-VL-7B-Instruct/nested/extra/tokenizer.json"] = "0" * 64
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumMismatchError) as info:
        _stage(release_uri, cache, flaky_s3.endpoint, checksums=bad)
    message = str(info.value)
    assert "Qwen2.5-VL-7B-Instruct/nested/extra/tokenizer.json" in message
    assert SHA256["Qwen2.5-VL-7B-Instruct/nested/extra/tokenizer.json"] in message
    dest = cache / cache_key(release_uri)
    assert not dest.exists()  # no partial copy, no half-staged folder
    assert not list(cache.rglob("*.partial"))
    # The right list then works (and a staged copy is never marked complete after a mismatch).
    _assert_identical(_stage(release_uri, cache, flaky_s3.endpoint, checksums=SHA256))


def test_checksum_list_naming_absent_file_fails(release_uri, flaky_s3, tmp_path):
    with pytest.raises(StagingError, match="not-there.bin"):
        _stage(release_uri, tmp_path / "c", flaky_s3.endpoint,
               checksums={**SHA256, "not-there.bin": "a" * 64})


def test_checksums_checked_against_an_existing_copy_without_download(release_uri, flaky_s3, tmp_path):
    cache = tmp_path / "cache"
    folder = _stage(release_uri, cache, flaky_s3.endpoint)  # no checksums the first time
    before = len(flaky_s3.requests)
    assert _stage(release_uri, cache, flaky_s3.endpoint, checksums=SHA256) == folder
    assert len(flaky_s3.requests) == before  # verified from the local copy

    bad = {"vae.safetensors": "f" * 64}
    with pytest.raises(ChecksumMismatchError, match="vae.safetensors"):
        _stage(release_uri, cache, flaky_s3.endpoint, checksums=bad)


# --- local paths and errors ----------------------------------------------------------------------


def test_local_path_passthrough(tmp_path):
    weights = tmp_path / "Step1X-Edit"
    weights.mkdir()
    cache = tmp_path / "cache"
    assert stage_weights(str(weights), cache) == weights
    assert stage_weights(f"file://{weights}", cache) == weights
    assert not cache.exists()  # nothing copied, nothing created
    with pytest.raises(FileNotFoundError, match="does not exist"):
        stage_weights(str(tmp_path / "nope"), cache)


def test_missing_prefix_is_a_clear_error(s3_bucket, storage_options, tmp_path):
    uri = f"{s3_bucket}/no/such/release/"
    with pytest.raises(FileNotFoundError) as info:
        stage_weights(uri, tmp_path / "cache", storage_options)
    assert f"no weights under {uri.rstrip('/')}" in str(info.value)
    assert not (tmp_path / "cache" / cache_key(uri)).exists()


def test_single_object_is_refused(s3_server, s3_bucket, storage_options, tmp_path):
    uri = _upload(s3_server, s3_bucket, {"vae.safetensors": b"x" * 10}, prefix="one")
    with pytest.raises(StagingError, match="single object"):
        stage_weights(uri + "vae.safetensors", tmp_path / "cache", storage_options)


def test_other_fsspec_schemes_stage_too(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    for rel, data in RELEASE.items():
        fs.pipe_file(f"/weights-test/{rel}", data)
    try:
        folder = stage_weights("memory://weights-test", tmp_path / "cache", chunk_bytes=CHUNK)
        _assert_identical(folder)
    finally:
        fs.rm("/weights-test", recursive=True)


def test_credentials_stay_out_of_logs_and_marker(release_uri, s3_server, tmp_path, monkeypatch, caplog):
    secret = "FAKEsecretVALUE0123456789abcdefXYZ"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)  # moto accepts any credentials
    caplog.set_level(logging.DEBUG, logger="step1x_batch.io.weights")
    folder = stage_weights(release_uri, tmp_path / "cache", StorageOptions(endpoint_url=s3_server))
    assert secret not in caplog.text
    assert secret not in (folder / MARKER_NAME).read_text()
    with pytest.raises(FileNotFoundError) as info:
        stage_weights(release_uri + "missing/", tmp_path / "cache", StorageOptions(endpoint_url=s3_server))
    assert secret not in str(info.value)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("STEP1X_WEIGHTS_CACHE", str(tmp_path / "nvme"))
    assert default_cache_dir() == tmp_path / "nvme"
    assert default_cache_dir(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv("STEP1X_WEIGHTS_CACHE")
    assert default_cache_dir() == pathlib.Path.home() / ".cache" / "step1x-batch" / "weights"


# --- subsets and single files ----------------------------------------------------------------------


def test_include_stages_only_the_matching_files_in_a_folder_of_their_own(release_uri, s3_server, tmp_path):
    """A CPU node's prepare stage needs the tokenizer and configs, not the weights."""
    small = _stage(release_uri, tmp_path / "cache", s3_server, include=["Qwen2.5-VL-7B-Instruct/*.json"])
    got = sorted(str(p.relative_to(small)) for p in small.rglob("*") if p.is_file() and p.name != MARKER_NAME)
    assert got == ["Qwen2.5-VL-7B-Instruct/added_tokens.json", "Qwen2.5-VL-7B-Instruct/config.json",
                   "Qwen2.5-VL-7B-Instruct/nested/extra/tokenizer.json"]  # fnmatch's * crosses folders
    full = _stage(release_uri, tmp_path / "cache", s3_server)
    assert full != small and cache_key(release_uri) != cache_key(release_uri, ["Qwen2.5-VL-7B-Instruct/*.json"])
    _assert_identical(full)


def test_local_file_stages_one_object(release_uri, s3_server, tmp_path):
    """An adapter file in object storage: staged once per node into the cache, bytes intact."""
    source = weights_cache.WeightsSource(storage=StorageOptions(endpoint_url=s3_server),
                                         cache_dir=str(tmp_path / "cache"))
    path = source.local_file(release_uri + "vae.safetensors")
    assert path.read_bytes() == RELEASE["vae.safetensors"] and path.name == "vae.safetensors"
    assert source.local_file(release_uri + "vae.safetensors") == path  # the staged copy, reused
    assert source.local_file(str(path)) == path  # a local file is used where it is
    with pytest.raises(FileNotFoundError):
        source.local_file(str(tmp_path / "absent.safetensors"))
