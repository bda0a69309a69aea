"""Hostile input and a vanished lease (issue 18, items 1-6 and 9), without Ray.

* the classification table of row error types (final vs transient), and the faults behind it:
  a folder, a symlink loop, a FIFO, ``/dev/zero``, a 1 GB sparse file, an unknown protocol, a NUL
  byte, a bad bucket name are final and typed; a refused connection is transient;
* bounded reads (``input.max_image_bytes``): by size before reading, and while reading;
* output keys that name the job's own objects are refused;
* JSON Lines and CSV with mixed types, nested lists and broken lines: one row each;
* per-row parameters past the config's bounds are error rows;
* duplicates: in a batch, in the skip join (across batches and resumed runs), at preflight;
* the lease deleted or changed under a run, and a lease document that is not one.

The whole-job versions (a real local Ray) are in ``test_hostile_jobs.py``.
"""

from __future__ import annotations

import json
import os
import threading
import time

import boto3
import pyarrow as pa
import pytest

from step1x_batch import errors
from step1x_batch.job import lease as leases
from step1x_batch.job.config import DEFAULT_RETRY_ERROR_TYPES, SamplingConfig
from step1x_batch.errors import RowError
from step1x_batch.rows.manifest import (
    GUIDANCE_SCALE_RANGE,
    NUM_STEPS_RANGE,
    SIZE_LEVEL_RANGE,
    NormalizeSettings,
    normalize_batch,
    read_manifest_table,
)
from step1x_batch.models.base import EditParams
from step1x_batch.io.storage import StorageOptions, read_bytes, safe_output_key, write_bytes

DEAD_ENDPOINT = "http://127.0.0.1:9"  # discard port: connections are refused


# --------------------------------------------------------------------------------------------
# The classification table (item 6)

# Every row error type, final or transient. A new code must be added here (the test below fails
# otherwise), so that someone decides whether a later run retries it.
CLASSIFICATION = {
    errors.MISSING_OBJECT: "final",
    errors.EMPTY_OBJECT: "final",
    errors.CORRUPT_IMAGE: "final",
    errors.TRUNCATED_IMAGE: "final",
    errors.UNSUPPORTED_FORMAT: "final",
    errors.TOO_MANY_PIXELS: "final",
    errors.EMPTY_INSTRUCTION: "final",
    errors.INSTRUCTION_TOO_LONG: "final",
    errors.UNSAFE_OUTPUT_KEY: "final",
    errors.INVALID_ROW: "final",
    errors.PREPARE_FAILED: "final",
    errors.NOT_A_FILE: "final",
    errors.INVALID_URI: "final",
    errors.IMAGE_TOO_LARGE: "final",
    errors.DUPLICATE_ROW: "final",
    errors.NON_FINITE_OUTPUT: "final",
    errors.INVALID_INSTRUCTION: "final",
    errors.UNSUPPORTED_SIZE: "final",
    errors.TOO_MANY_IMAGES: "final",
    errors.READ_FAILED: "transient",
    errors.WRITE_FAILED: "transient",
    errors.EDIT_FAILED: "transient",
}


def test_every_error_type_is_classified_and_the_defaults_retry_only_the_transient():
    assert set(CLASSIFICATION) == set(errors.CODES)
    for code, kind in CLASSIFICATION.items():
        assert errors.is_transient(code) == (kind == "transient"), code
    assert errors.FINAL_CODES | errors.TRANSIENT_CODES == errors.CODES
    assert not errors.FINAL_CODES & errors.TRANSIENT_CODES
    assert set(DEFAULT_RETRY_ERROR_TYPES) == errors.TRANSIENT_CODES
    with pytest.raises(ValueError):
        errors.is_transient("no_such_code")


def _code_of(uri: str, **kw) -> RowError:
    with pytest.raises(RowError) as info:
        read_bytes(uri, **kw)
    return info.value


@pytest.fixture
def faults(tmp_path):
    """Local paths that can never be read as an image file."""
    folder = tmp_path / "a-folder.png"
    folder.mkdir()
    loop = tmp_path / "loop.png"
    os.symlink(loop, loop)
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    sparse = tmp_path / "sparse.png"
    with open(sparse, "wb") as f:
        f.truncate(1 << 30)  # 1 GB, no block on disk
    return {"folder": str(folder), "loop": str(loop), "fifo": str(fifo), "sparse": str(sparse)}


@pytest.mark.parametrize("name, uri, code", [
    ("folder", None, errors.NOT_A_FILE),
    ("loop", None, errors.NOT_A_FILE),
    ("fifo", None, errors.NOT_A_FILE),  # refused without opening for a blocking read
    ("dev_zero", "/dev/zero", errors.NOT_A_FILE),  # a device: endless, never read
    ("sparse", None, errors.IMAGE_TOO_LARGE),  # refused by its size, before a byte is read
    ("unknown_protocol", "nosuchproto://bucket/x.png", errors.INVALID_URI),
    ("nul_byte", "/tmp/a\x00b.png", errors.INVALID_URI),
    ("nul_byte_file_uri", "file:///tmp/a\x00b.png", errors.INVALID_URI),
    ("bad_bucket", "s3://bad_bucket!/x.png", errors.INVALID_URI),
    ("no_key", "s3://some-bucket/", errors.INVALID_URI),
    ("missing", "/nonexistent/dir/x.png", errors.MISSING_OBJECT),
])
def test_deterministic_read_failures_are_final_and_say_what_failed(name, uri, code, faults, s3_server):
    uri = uri or faults[name]
    err = _code_of(uri, options=StorageOptions(max_attempts=1), max_bytes=10 << 20)
    assert err.code == code, err.message
    assert not errors.is_transient(err.code)
    assert "attempt" not in err.message  # no retries were made, and none are claimed
    assert uri in err.message  # names what it could not read


def test_a_refused_connection_is_transient(tmp_path):
    err = _code_of("s3://some-bucket/x.png", options=StorageOptions(endpoint_url=DEAD_ENDPOINT, max_attempts=1,
                                                                   connect_timeout=2))
    assert err.code == errors.READ_FAILED and errors.is_transient(err.code)
    assert "next run tries this row again" in err.message


def test_reads_are_bounded_by_size_and_while_reading(tmp_path, s3_bucket, storage_options):
    data = os.urandom(5000)
    local = tmp_path / "x.bin"
    local.write_bytes(data)
    assert read_bytes(str(local), max_bytes=5000) == data
    assert _code_of(str(local), max_bytes=4999).code == errors.IMAGE_TOO_LARGE
    uri = f"{s3_bucket}/x.bin"
    write_bytes(uri, data, storage_options)
    assert read_bytes(uri, storage_options, max_bytes=5000) == data
    err = _code_of(uri, options=storage_options, max_bytes=4999)  # a ranged GET of 5000 bytes
    assert err.code == errors.IMAGE_TOO_LARGE and "max_image_bytes" in err.message
    write_bytes(f"{s3_bucket}/empty.png", b"", storage_options)
    assert read_bytes(f"{s3_bucket}/empty.png", storage_options, max_bytes=100) == b""  # 416 -> empty


def test_a_fifo_is_refused_at_once_even_with_a_writer_waiting(faults):
    """Opening a FIFO for a blocking read waits for a writer forever; the read must not."""
    result: list[RowError] = []
    t = threading.Thread(target=lambda: result.append(_code_of(faults["fifo"], max_bytes=100)), daemon=True)
    t.start()
    t.join(timeout=60)  # a bound for a broken build only: the refusal needs no writer
    assert result and result[0].code == errors.NOT_A_FILE


def test_the_input_byte_limit_is_a_config_key():
    from step1x_batch.job.config import InputConfig

    assert InputConfig(manifest="m.jsonl").max_image_bytes == 256 * 1024 * 1024
    with pytest.raises(Exception):
        InputConfig(manifest="m.jsonl", max_image_bytes=0)


# --------------------------------------------------------------------------------------------
# The job's own objects (item 2)


@pytest.mark.parametrize("key", [
    "_lease.json", "_lease.json.tmp", "state/CURRENT.json", "state", "logs/run/part-000000.parquet",
    "runs/r/summary.json", "./runs/x.png", "Logs/x.png", "catalog/latest.parquet", "pairs/manifests/a.parquet",
    "dataset/data/train-00000.parquet", ".hidden.png", "_probe-1",
])
def test_output_keys_naming_the_jobs_own_objects_are_refused(key):
    with pytest.raises(RowError) as info:
        safe_output_key(key)
    assert info.value.code == errors.UNSAFE_OUTPUT_KEY and "the job's own" in info.value.message


@pytest.mark.parametrize("key", ["images/a.png", "edits/state/a.png", "out/logs.png", "a/_b.png", "statements/x.png",
                                 "pairs/images/p.png", "renders/item/abc.png"])
def test_other_keys_keep_their_names(key):
    assert safe_output_key(key) == key  # existing outputs keep their keys: nothing is moved


# --------------------------------------------------------------------------------------------
# Manifests: one row per line, whatever is in it (item 3), parameters within bounds (item 5)

DEFAULTS = EditParams(num_steps=28, guidance_scale=6.0, size_level=512)


def _normalise(table: pa.Table, manifest: str) -> list[dict]:
    settings = NormalizeSettings(manifest_uri=manifest, defaults=DEFAULTS, seed_base=0, model_id="m",
                                 image_format="png", max_instruction_chars=200, max_images=2)
    out = normalize_batch(table, settings)
    return out.to_pylist()


def test_json_lines_with_mixed_types_nested_lists_and_broken_lines(tmp_path):
    lines = [
        {"id": "a", "image_uri": "x.png", "instruction": "i", "seed": 7},
        {"id": "b", "image_uri": "x.png", "instruction": "i", "seed": "7"},  # the same seed, as text
        {"id": "c", "image_uris": ["x.png", "y.png"], "instruction": "i", "meta": {"k": [1, 2]}},
        {"id": "d", "image_uris": [["x.png"]], "instruction": "i"},  # a nested list
        {"id": "e", "image_uri": ["x.png"], "instruction": "i"},  # a list where one URI goes
        {"id": "f", "image_uri": "x.png", "instruction": "i", "seed": True},
        {"id": 7, "image_uri": "x.png", "instruction": "i", "num_steps": 10.0},
    ]
    text = "".join(json.dumps(r) + "\n" for r in lines) + "not json\n\n[1, 2]\n" + '{"id": "g", "instr'
    path = tmp_path / "m.jsonl"
    path.write_text(text)
    table = read_manifest_table(str(path), edit_rows=True)
    assert set(table.schema.types) == {pa.string()}  # a fixed schema: values as written, as text
    rows = _normalise(table, str(path))
    assert len(rows) == 10  # one row per non-blank line, read or not
    by_id = {r["id"]: r for r in rows}
    assert by_id["a"]["seed"] == by_id["b"]["seed"] == 7 and not by_id["a"]["error_type"]
    assert by_id["c"]["image_uris"] == [str(tmp_path / "x.png"), str(tmp_path / "y.png")]
    assert json.loads(by_id["c"]["extra"]) == {"meta": '{"k":[1,2]}'}
    assert by_id["7"]["num_steps"] == 10 and not by_id["7"]["error_type"]
    for bad in ("d", "e", "f"):
        assert by_id[bad]["error_type"] == errors.INVALID_ROW, by_id[bad]
    broken = [r for r in rows if r["error_message"] and "line" in r["error_message"] and r["id"] not in ("e", "f")]
    assert [r["error_message"].split(": ", 1)[1].split(" ")[:2] for r in broken] == [
        ["line", "8"], ["line", "10"], ["line", "11"]]
    assert all(r["error_type"] == errors.INVALID_ROW and str(path) in r["error_message"] for r in broken)
    assert len({r["id"] for r in broken}) == 3  # each broken line its own id


def test_csv_with_ragged_lines_is_one_row_per_line(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("image_uri,instruction,seed\nx.png,i,7\nx.png,i\nx.png,i,1,2\ny.png,j,\n")
    rows = _normalise(read_manifest_table(str(path), edit_rows=True), str(path))
    assert len(rows) == 4
    assert [r["error_type"] for r in rows] == [None, None, errors.INVALID_ROW, errors.INVALID_ROW]
    assert "line 3 of" in rows[2]["error_message"] and "has 2 fields" in rows[2]["error_message"]
    assert "line 4 of" in rows[3]["error_message"]


@pytest.mark.parametrize("column, bounds", [
    ("num_steps", NUM_STEPS_RANGE), ("size_level", SIZE_LEVEL_RANGE), ("guidance_scale", GUIDANCE_SCALE_RANGE),
])
def test_per_row_parameters_have_the_configs_bounds(column, bounds, tmp_path):
    lo, hi = bounds
    field = SamplingConfig.model_fields[column]
    assert [m for m in field.metadata if hasattr(m, "ge")][0].ge == lo
    assert [m for m in field.metadata if hasattr(m, "le")][0].le == hi
    values = [lo, hi, hi + 1, lo - 1, 1_048_575, "10000"]
    table = pa.table({"image_uri": ["x.png"] * len(values), "instruction": [f"i{k}" for k in range(len(values))],
                      column: pa.array([str(v) for v in values])})
    rows = _normalise(table, str(tmp_path / "m.jsonl"))
    assert [r["error_type"] for r in rows] == [None, None] + [errors.INVALID_ROW] * 4
    assert all("out of range" in r["error_message"] for r in rows[2:])


# --------------------------------------------------------------------------------------------
# Duplicates (item 9)


def test_a_second_row_with_an_earlier_rows_id_or_output_key_is_an_error_naming_it(tmp_path):
    table = pa.table({
        "id": ["a", "a", "a", None, None, None],
        "image_uri": ["x.png", "y.png", "x.png", "x.png", "z.png", "q.png"],
        "instruction": ["i"] * 6,
        "output_key": [None, None, None, "o/k.png", "o/k.png", "images/a.png"],
    })
    rows = _normalise(table, str(tmp_path / "m.jsonl"))
    assert [r["error_type"] for r in rows] == [None, errors.DUPLICATE_ROW, None, None,
                                                errors.DUPLICATE_ROW, errors.DUPLICATE_ROW]
    assert "id 'a'" in rows[1]["error_message"] and "x.png" in rows[1]["error_message"]
    assert f"row {rows[3]['id']}" in rows[4]["error_message"]
    assert rows[1]["fingerprint"] is None  # an error row; the repeated identical row 3 is the same work


def test_the_skip_join_finds_a_given_id_repeated_in_any_batch():
    from step1x_batch.job import skip

    rows = pa.table({"id": ["a", "b", "a", "a", None, None],
                     "image_uri": ["x.png", "x.png", "y.png", "x.png", "n.png", "n.png"],
                     skip.KEY: ["a", "b", "a", "a", "h1", "h1"],
                     skip.DIGEST: pa.array([1, 2, 3, 1, 4, 5], pa.uint64())})
    dup = skip.duplicate_ids(rows).to_pylist()
    # the third row repeats id a with other content; the fourth is the first row again (same
    # work); rows without a given id share a content id only when they are the same work
    assert [d is not None for d in dup] == [False, False, True, False, False, False]
    assert "x.png" in dup[2]


def test_preflight_refuses_a_small_manifest_with_duplicates_naming_both_rows(tmp_path):
    from step1x_batch.job.preflight import PreflightError, check_duplicates, check_manifest

    path = tmp_path / "m.jsonl"
    rows = [{"id": "a", "image_uri": "x.png", "instruction": "i"},
            {"id": "a", "image_uri": "x.png", "instruction": "i"},  # the same work: allowed
            {"id": "b", "image_uri": "y.png", "instruction": "i", "output_key": "images/a.png"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    facts = check_manifest(str(path), None, (("instruction",),))
    with pytest.raises(PreflightError, match=r"row 3 of .*m.jsonl has the output key 'images/a.png', as row 1"):
        check_duplicates(facts, None, "png")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    check_duplicates(check_manifest(str(path), None, (("instruction",),)), None, "png")


# --------------------------------------------------------------------------------------------
# The lease (items 1 and 2)


from test_lease import root  # noqa: E402,F401  (the lease tests' root: S3 and local)


def _delete(uri: str, opts) -> None:
    if uri.startswith("s3://"):
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        boto3.client("s3", endpoint_url=opts.endpoint_url, region_name="us-east-1").delete_object(Bucket=bucket, Key=key)
    else:
        os.unlink(uri)


def test_a_deleted_lease_is_lost_at_the_next_renewal_saying_so_and_a_second_run_holds_the_only_lease(root):
    uri, opts = root
    first = leases.acquire(uri, opts, "first", ttl_s=60)
    assert first.renew()
    _delete(leases.lease_uri(uri), opts)
    assert first.renew() is False and first.lost.is_set()  # not a warning: lost
    with pytest.raises(leases.LeaseLost, match="was deleted while this run held it") as err:
        first.check()
    assert "took the output root over" not in str(err.value)
    second = leases.acquire(uri, opts, "second", ttl_s=60)
    first.release()  # must not remove the second run's lease
    holder = leases.read_holder(uri, opts)
    assert holder is not None and holder.doc["token"] == second.token
    assert second.renew()
    second.release()


def test_a_changed_lease_is_lost_saying_what_is_there_now(root):
    uri, opts = root
    first = leases.acquire(uri, opts, "first", ttl_s=60)
    write_bytes(leases.lease_uri(uri), b"\x89PNG not a lease", opts)  # e.g. a row's output once
    assert first.renew() is False
    with pytest.raises(leases.LeaseLost, match="not a lease document"):
        first.check()


def test_the_renewal_loop_stops_the_run_when_the_lease_is_deleted(root):
    uri, opts = root
    warnings: list[BaseException] = []
    with leases.held(uri, opts, "looping", ttl_s=1.5, say=lambda m: warnings.append(m)) as lease:
        _delete(leases.lease_uri(uri), opts)
        assert lease.lost.wait(timeout=60)  # the next renewal (ttl / 3) finds it gone
        assert "deleted" in (lease.lost_why or "")
    assert not any("renewal failed" in str(w) for w in warnings)


def test_renewals_failing_for_a_whole_ttl_lose_the_lease():
    now = [0.0]
    lease = leases.Lease(uri="x", run_id="r", ttl_s=30, clock=lambda: now[0])
    lease._renewed = 0.0
    now[0] = 29.0
    assert not lease.overdue()
    now[0] = 30.0
    assert lease.overdue() and "could not be renewed for 30 s" in lease.lost_why


def _age_local_lease(uri: str, seconds: float) -> None:
    path = leases.lease_uri(uri)
    st = os.stat(path)
    os.utime(path, (st.st_atime - seconds, st.st_mtime - seconds))


def test_a_corrupt_local_lease_is_reported_then_taken_over_after_its_ttl(tmp_path):
    uri = str(tmp_path / "out")
    os.makedirs(uri)
    with open(leases.lease_uri(uri), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n not a lease")
    with pytest.raises(leases.LeaseHeld) as err:
        leases.acquire(uri, None, "r", ttl_s=60)
    message = str(err.value)
    assert "not a lease document" in message and "taken over once it is 60 s old" in message
    assert "once it is 0 s old" not in message and "being claimed" not in message
    _age_local_lease(uri, 61)  # its mtime says it was written 61 s ago: stale for a 60 s ttl
    taken = leases.acquire(uri, None, "r", ttl_s=60)
    assert taken.took_over and "not a lease document" in taken.took_over
    assert json.loads(open(leases.lease_uri(uri), "rb").read())["token"] == taken.token
    taken.release()


def test_a_corrupt_s3_lease_is_taken_over_after_its_ttl(s3_bucket, storage_options):
    uri = f"{s3_bucket}/out"
    write_bytes(leases.lease_uri(uri), b"garbage", storage_options)
    with pytest.raises(leases.LeaseHeld, match="not a lease document"):
        leases.acquire(uri, storage_options, "r", ttl_s=60)  # (the store's clock has whole seconds)
    # wait on the store's own clock (its Date against the object's Last-Modified), not ours
    deadline = time.monotonic() + 120
    while leases.read_holder(uri, storage_options).age_s < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    taken = leases.acquire(uri, storage_options, "r", ttl_s=2)
    assert taken.took_over and "not a lease document" in taken.took_over
    taken.release()


def test_confirm_before_a_part_lands(root):
    """What a log writer asks before each part: still ours? (a store hiccup is not a loss until
    the ttl has passed without a renewal)."""
    uri, opts = root
    now = [0.0]
    lease = leases.acquire(uri, opts, "r", ttl_s=60)
    lease.clock = lambda: now[0]
    lease._renewed = 0.0
    assert lease.confirm()
    real = lease._store

    class Down:
        def renew(self, *args):
            raise ConnectionError("the store did not answer")

    lease._store = Down()
    now[0] = 59.0
    assert lease.confirm() and not lease.lost.is_set()
    now[0] = 60.0
    assert not lease.confirm() and "could not be renewed" in lease.lost_why
    lease._store = real
    lease.release()  # lost: leaves the object for its ttl (a later run takes it over)


def test_confirm_after_the_lease_was_deleted(root):
    uri, opts = root
    lease = leases.acquire(uri, opts, "r", ttl_s=60)
    _delete(leases.lease_uri(uri), opts)
    assert not lease.confirm() and "deleted" in lease.lost_why
