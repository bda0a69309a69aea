"""The row log: schema, conform, atomic parts (the deciding records: test_rowstate.py)."""

from __future__ import annotations

import datetime as dt
import json
import os

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from step1x_batch.rows.log import (
    LOG_SCHEMA,
    conform,
    log_dir,
    log_part_uris,
    part_uri,
    read_logs,
    write_log_part,
)

CONTRACT_COLUMNS = (
    "id, fingerprint, status, error_type, error_message, image_uri, image_uris, instruction, output_uri, "
    "input_width, input_height, width, height, seed, num_steps, guidance_scale, size_level, "
    "blend_instruction, blend_scale, adapters, "
    "model_id, run_id, attempt, worker, started_at, finished_at, preprocess_ms, edit_ms, write_ms"
).split(", ")

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def rec(id_, fp, status="ok", minutes=0, **kw):
    out = {"id": id_, "fingerprint": fp, "status": status,
           "finished_at": None if minutes is None else T0 + dt.timedelta(minutes=minutes)}
    if status == "ok":
        out["output_uri"] = f"out/images/{id_}.png"
    out.update(kw)
    return out


def test_schema_matches_design():
    # source_digest: the raw-row digest the skip compares first (step1x_batch.rows.digest)
    assert LOG_SCHEMA.names == CONTRACT_COLUMNS + ["source_digest", "extra"]
    ts = pa.timestamp("us", tz="UTC")
    assert LOG_SCHEMA.field("started_at").type == ts == LOG_SCHEMA.field("finished_at").type
    for name in ("input_width", "input_height", "width", "height", "seed", "num_steps",
                 "size_level", "attempt"):
        assert LOG_SCHEMA.field(name).type == pa.int64(), name
    for name in ("guidance_scale", "preprocess_ms", "edit_ms", "write_ms"):
        assert LOG_SCHEMA.field(name).type == pa.float64(), name


def test_conform_fills_casts_and_orders():
    df = pd.DataFrame({
        "write_ms": [1, 2],  # ints -> float64
        "id": ["a", "b"],
        "status": ["ok", "error"],
        "seed": pd.array([3, None], dtype="Int64"),
        "started_at": [1767225600.0, None],  # epoch seconds
        "finished_at": [pd.Timestamp("2026-01-01T00:00:01"), pd.Timestamp("2026-01-01T01:00:00", tz="Europe/Paris")],
        "extra": [{"tag": "x"}, None],
        "not_a_log_column": [1, 2],
    })
    t = conform(df)
    assert t.schema == LOG_SCHEMA
    assert t.column("write_ms").to_pylist() == [1.0, 2.0]
    assert t.column("seed").to_pylist() == [3, None]
    assert t.column("started_at").to_pylist()[0] == T0
    assert t.column("finished_at").to_pylist() == [T0 + dt.timedelta(seconds=1), T0]
    assert json.loads(t.column("extra").to_pylist()[0]) == {"tag": "x"}
    assert t.column("extra").to_pylist()[1] is None
    assert t.column("model_id").null_count == 2
    # an arrow table with naive timestamps and a null-typed column conforms too
    arrow = pa.table({"id": ["a"], "finished_at": pa.array([dt.datetime(2026, 1, 1)]),
                      "error_type": pa.nulls(1)})
    t = conform(arrow)
    assert t.column("finished_at").to_pylist() == [T0] and t.column("error_type").null_count == 1
    with pytest.raises(ValueError, match="seed"):
        conform(pa.table({"seed": ["not a number"]}))


def test_log_dir_and_part_uri():
    assert log_dir("s3://b/out", "run-1") == "s3://b/out/logs/run-1"
    assert part_uri("s3://b/out/", "run-1", 7) == "s3://b/out/logs/run-1/part-000007.parquet"
    assert part_uri("/o", "r", "abc-1") == "/o/logs/r/part-abc-1.parquet"
    for bad in ("", "..", "a/b", "../x", "a b", "x\x00"):
        with pytest.raises(ValueError):
            log_dir("s3://b", bad)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_write_read_round_trip(where, tmp_path, s3_bucket, storage_options):
    root = str(tmp_path / "out") if where == "local" else f"{s3_bucket}/out"
    opts = None if where == "local" else storage_options
    rows = [rec("a", "f1", extra='{"k": 1}', seed=5, guidance_scale=6.0), rec("b", None, "error",
            error_type="corrupt_image", error_message="damaged")]
    n = write_log_part(pd.DataFrame(rows), part_uri(root, "r1", 0), opts)
    assert n == 2
    assert log_part_uris(root, opts) == [part_uri(root, "r1", 0)]
    t = read_logs(root, opts)
    assert t.schema == LOG_SCHEMA
    assert t.column("id").to_pylist() == ["a", "b"]
    assert t.column("error_type").to_pylist() == [None, "corrupt_image"]
    assert t.column("finished_at").to_pylist()[0] == T0
    if where == "local":
        assert os.listdir(tmp_path / "out" / "logs" / "r1") == ["part-000000.parquet"]
        assert pq.read_schema(part_uri(root, "r1", 0)) == LOG_SCHEMA


def test_read_logs_of_one_run(tmp_path):
    root = str(tmp_path)
    write_log_part(pd.DataFrame([rec("a", "fa")]), part_uri(root, "r1", 0))
    write_log_part(pd.DataFrame([rec("b", "fb")]), part_uri(root, "r2", 0))
    assert read_logs(root, run_id="r2").column("id").to_pylist() == ["b"]
    assert read_logs(root).num_rows == 2
    assert read_logs(str(tmp_path / "nothing")).schema == LOG_SCHEMA
