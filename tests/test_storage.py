"""Storage against a real S3-protocol server (moto over HTTP) and the local filesystem."""

from __future__ import annotations

import os
import pickle

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from step1x_batch import errors
from step1x_batch.io import storage
from step1x_batch.errors import RowError, redact, redact_uri
from step1x_batch.io.storage import (
    StorageOptions,
    arrow_filesystem,
    filesystem,
    join_uri,
    read_bytes,
    safe_output_key,
    write_bytes,
)

DEAD_ENDPOINT = "http://127.0.0.1:9"  # discard port: nothing listens, connections are refused


def _client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def _split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.split("://", 1)[1].partition("/")
    return bucket, key


# --- endpoints and round trips -------------------------------------------------------------------


def test_s3_round_trip_with_explicit_endpoint(s3_bucket, storage_options, s3_server):
    uri = f"{s3_bucket}/a/b/obj.bin"
    write_bytes(uri, b"hello world", storage_options)
    assert read_bytes(uri, storage_options) == b"hello world"
    # it really is on the server, under the key we named
    bucket, key = _split(uri)
    assert _client(s3_server).get_object(Bucket=bucket, Key=key)["Body"].read() == b"hello world"


def test_endpoint_from_environment(s3_bucket, monkeypatch, s3_server):
    uri = f"{s3_bucket}/env.bin"
    write_bytes(uri, b"via AWS_ENDPOINT_URL")  # no options: the fixture's AWS_ENDPOINT_URL
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("S3_ENDPOINT_URL", s3_server)
    assert storage.resolved_endpoint() == s3_server
    assert read_bytes(uri) == b"via AWS_ENDPOINT_URL"


def test_options_endpoint_wins_over_environment(s3_bucket, s3_server, monkeypatch):
    uri = f"{s3_bucket}/x.bin"
    write_bytes(uri, b"x")
    monkeypatch.setenv("AWS_ENDPOINT_URL", DEAD_ENDPOINT)
    assert read_bytes(uri, StorageOptions(endpoint_url=s3_server)) == b"x"
    with pytest.raises(RowError) as info:
        read_bytes(uri, StorageOptions(max_attempts=1))  # falls back to the dead env endpoint
    assert info.value.code == errors.READ_FAILED


def test_filesystem_paths(tmp_path, storage_options):
    fs, path = filesystem("s3://bucket/some/key.png", storage_options)
    assert path == "bucket/some/key.png"
    assert fs.client_kwargs["endpoint_url"] == storage_options.endpoint_url
    fs, path = filesystem(str(tmp_path / "a.png"))
    assert path == str(tmp_path / "a.png")
    fs, path = filesystem(f"file://{tmp_path}/a.png")
    assert path == str(tmp_path / "a.png")


def test_s3_filesystem_pickles_for_ray_workers(s3_bucket, storage_options):
    write_bytes(f"{s3_bucket}/p.bin", b"pickled", storage_options)
    fs, path = filesystem(f"{s3_bucket}/p.bin", storage_options)
    clone = pickle.loads(pickle.dumps(fs))
    assert clone.cat_file(path) == b"pickled"
    opts = pickle.loads(pickle.dumps(storage_options))
    assert opts == storage_options


def test_listings_are_never_stale(s3_bucket, storage_options, s3_server):
    fs, root = filesystem(s3_bucket, storage_options)
    write_bytes(f"{s3_bucket}/logs/r1/part-000000.parquet", b"1", storage_options)
    assert len(fs.glob(f"{root}/logs/*/part-*.parquet")) == 1
    bucket, _ = _split(s3_bucket)  # another writer (a Ray worker, another run) adds a part
    _client(s3_server).put_object(Bucket=bucket, Key="logs/r2/part-000000.parquet", Body=b"2")
    assert len(fs.glob(f"{root}/logs/*/part-*.parquet")) == 2


# --- errors --------------------------------------------------------------------------------------


def test_missing_object_and_bucket(s3_bucket, storage_options):
    for uri in (f"{s3_bucket}/nope.png", "s3://no-such-bucket-xyz/nope.png"):
        with pytest.raises(RowError) as info:
            read_bytes(uri, storage_options)
        assert info.value.code == errors.MISSING_OBJECT
        assert uri in info.value.message


def test_local_read_errors(tmp_path):
    with pytest.raises(RowError) as info:
        read_bytes(str(tmp_path / "missing.png"))
    assert info.value.code == errors.MISSING_OBJECT
    assert str(tmp_path / "missing.png") in info.value.message
    with pytest.raises(RowError) as info:
        read_bytes(str(tmp_path))
    assert info.value.code == errors.NOT_A_FILE  # a folder fails the same way every time: final


def test_row_error_pickles_and_validates_codes():
    err = RowError(errors.CORRUPT_IMAGE, "bad bytes in s3://b/k.png")
    clone = pickle.loads(pickle.dumps(err))
    assert (clone.code, clone.message) == (err.code, err.message)
    assert str(clone) == "corrupt_image: bad bytes in s3://b/k.png"
    with pytest.raises(ValueError):
        RowError("no_such_code", "x")


# --- atomic writes -------------------------------------------------------------------------------


def test_local_write_creates_folders_and_leaves_no_temp_files(tmp_path):
    uri = str(tmp_path / "out" / "images" / "a.png")
    write_bytes(uri, b"one")
    write_bytes(uri, b"two")
    assert open(uri, "rb").read() == b"two"
    assert os.listdir(tmp_path / "out" / "images") == ["a.png"]


def test_local_write_is_all_or_nothing(tmp_path, monkeypatch):
    uri = str(tmp_path / "a.png")
    write_bytes(uri, b"old complete object")

    def boom(src, dst):
        raise OSError("disk went away")

    monkeypatch.setattr(storage.os, "replace", boom)
    with pytest.raises(RowError) as info:
        write_bytes(uri, b"new object that never lands")
    assert info.value.code == errors.WRITE_FAILED
    assert uri in info.value.message
    assert open(uri, "rb").read() == b"old complete object"
    assert os.listdir(tmp_path) == ["a.png"]  # the temporary file was removed


def test_s3_write_failure_leaves_no_object(s3_bucket, flaky_s3):
    opts = StorageOptions(endpoint_url=flaky_s3.endpoint, max_attempts=2)
    flaky_s3.fail(2, "503", method="PUT")
    uri = f"{s3_bucket}/never.bin"
    with pytest.raises(RowError) as info:
        write_bytes(uri, b"data", opts)
    assert info.value.code == errors.WRITE_FAILED
    assert flaky_s3.injected == 2
    assert not storage.exists(uri)


# --- retries -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["503", "500", "reset", "truncate"])
def test_transient_read_errors_are_retried_and_counted(kind, s3_bucket, flaky_s3):
    opts = StorageOptions(endpoint_url=flaky_s3.endpoint, max_attempts=4)
    payload = bytes(range(256)) * 40
    write_bytes(f"{s3_bucket}/obj.bin", payload, opts)
    flaky_s3.fail(2, kind, method="GET")
    before = storage.retry_count()
    assert read_bytes(f"{s3_bucket}/obj.bin", opts) == payload
    assert flaky_s3.injected >= 1
    # a reset on a pooled keep-alive connection may be absorbed by the HTTP client once
    assert storage.retry_count() - before >= (2 if kind != "reset" else 1)


def test_transient_write_errors_are_retried(s3_bucket, flaky_s3):
    opts = StorageOptions(endpoint_url=flaky_s3.endpoint, max_attempts=4)
    flaky_s3.fail(2, "503", method="PUT")
    before = storage.retry_count()
    write_bytes(f"{s3_bucket}/w.bin", b"survived", opts)
    assert storage.retry_count() - before == 2
    assert read_bytes(f"{s3_bucket}/w.bin", opts) == b"survived"


def test_persistent_errors_stop_after_max_attempts(s3_bucket, flaky_s3):
    opts = StorageOptions(endpoint_url=flaky_s3.endpoint, max_attempts=3)
    write_bytes(f"{s3_bucket}/obj.bin", b"x", opts)
    flaky_s3.fail(20, "503", method="GET")
    with pytest.raises(RowError) as info:
        read_bytes(f"{s3_bucket}/obj.bin", opts)
    assert info.value.code == errors.READ_FAILED
    assert "up to 3 attempts" in info.value.message
    assert flaky_s3.injected == 3


# --- pyarrow -------------------------------------------------------------------------------------


@pytest.mark.parametrize("native", [False, True])
def test_arrow_filesystem_reaches_the_configured_endpoint(native, s3_bucket, storage_options,
                                                          monkeypatch):
    table = pa.table({"id": ["a", "b"], "n": [1, 2]})
    uri = f"{s3_bucket}/t/part.parquet"
    # only the options name the endpoint: pyarrow must not fall back to AWS
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    afs, path = arrow_filesystem(uri, storage_options, native=native)
    pq.write_table(table, path, filesystem=afs)
    assert read_bytes(uri, storage_options)[:4] == b"PAR1"
    assert pq.read_table(path, filesystem=afs).equals(table)
    fs_native, _ = arrow_filesystem(uri, storage_options, native=True)
    assert pq.read_table(path, filesystem=fs_native).equals(table)


def test_arrow_filesystem_local(tmp_path):
    afs, path = arrow_filesystem(str(tmp_path / "x.parquet"))
    pq.write_table(pa.table({"a": [1]}), path, filesystem=afs)
    assert pq.read_table(str(tmp_path / "x.parquet")).num_rows == 1


def test_arrow_reads_retry_through_fsspec(s3_bucket, flaky_s3):
    opts = StorageOptions(endpoint_url=flaky_s3.endpoint, max_attempts=4)
    afs, path = arrow_filesystem(f"{s3_bucket}/r.parquet", opts)
    pq.write_table(pa.table({"a": list(range(10))}), path, filesystem=afs)
    flaky_s3.fail(2, "503", method="GET")
    before = storage.retry_count()
    assert pq.read_table(path, filesystem=afs).num_rows == 10
    assert storage.retry_count() - before == 2


# --- keys and URIs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key,expected",
    [
        ("images/a.png", "images/a.png"),
        ("./images/./a.png", "images/a.png"),
        ("images//a.png", "images/a.png"),
        ("a.png", "a.png"),
        ("  images/a b.png ", "images/a b.png"),
        ("images/...png", "images/...png"),
        ("deep/er/..x/a.png", "deep/er/..x/a.png"),
    ],
)
def test_safe_output_key_accepts_and_normalises(key, expected):
    assert safe_output_key(key) == expected


@pytest.mark.parametrize(
    "key",
    [
        "",
        "   ",
        ".",
        "./",
        "images/",
        "../a.png",
        "images/../../a.png",
        "images/..",
        "%2e%2e/a.png",
        "images%2f..%2fa.png",
        "/etc/passwd",
        "//host/share/a.png",
        "~/a.png",
        "s3://other-bucket/a.png",
        "file:///tmp/a.png",
        "http://example.com/a.png",
        "C:/Windows/a.png",
        "c:a.png",
        "images\\..\\a.png",
        "images\\a.png",
        "a\x00.png",
        "a\n.png",
        "a" * 1100,
        None,
        5,
    ],
)
def test_safe_output_key_refuses(key):
    with pytest.raises(RowError) as info:
        safe_output_key(key)
    assert info.value.code == errors.UNSAFE_OUTPUT_KEY
    assert "output_key" in info.value.message


def test_join_uri_and_parent():
    assert join_uri("s3://b", "images/a.png") == "s3://b/images/a.png"
    assert join_uri("s3://b/out/", "images/a.png") == "s3://b/out/images/a.png"
    assert join_uri("/tmp/out", "logs/r") == "/tmp/out/logs/r"
    assert storage.parent_uri("s3://b/a/x.png") == "s3://b/a"
    assert storage.parent_uri("/tmp/a/x.png") == "/tmp/a"
    assert storage.absolute_uri("rel/x") == os.path.join(os.getcwd(), "rel/x")
    assert storage.absolute_uri("s3://b/rel/x") == "s3://b/rel/x"


# --- redaction -----------------------------------------------------------------------------------

FAKE_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYFAKESECRETKEY"
FAKE_KEY_ID = "AKIAIOSFODNN7FAKEKEY"


def test_redact_removes_planted_credentials(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    text = (
        f"failed https://alice:pa55w0rd-planted@host.example/img.png?X-Amz-Algorithm=AWS4"
        f"&X-Amz-Credential={FAKE_KEY_ID}%2F20260101&X-Amz-Signature=cafe0123deadbeef "
        f"secret={FAKE_SECRET} token: tok-planted-123 key {FAKE_KEY_ID}"
    )
    out = redact(text)
    for planted in ("pa55w0rd-planted", "alice", "cafe0123deadbeef", FAKE_SECRET, FAKE_KEY_ID,
                    "tok-planted-123"):
        assert planted not in out, planted
    assert "host.example/img.png" in out  # still says where
    assert redact_uri("s3://b/k.png?versionId=3&sig=abc") == "s3://b/k.png?***"
    assert redact("plain message about s3://bucket/key.png") == (
        "plain message about s3://bucket/key.png"
    )


def test_row_errors_never_carry_credentials(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    uri = (f"http://bob:hunter2-planted@127.0.0.1:9/img.png"
           f"?X-Amz-Signature=f00dfacef00dface&X-Amz-Credential={FAKE_KEY_ID}")
    with pytest.raises(RowError) as info:
        read_bytes(uri, StorageOptions(max_attempts=1))
    message = str(info.value)
    assert info.value.code in (errors.READ_FAILED, errors.MISSING_OBJECT)
    for planted in ("hunter2-planted", "f00dfacef00dface", FAKE_KEY_ID):
        assert planted not in message, planted
    assert "127.0.0.1:9/img.png" in message
    err = RowError(errors.READ_FAILED, f"could not read with {FAKE_SECRET} in the text")
    assert FAKE_SECRET not in err.message and FAKE_SECRET not in str(err)
