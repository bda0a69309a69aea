"""The compacted row state: the fold against an independent one, compaction across versions and
bucket counts, crash safety (SIGKILL during compaction), the skip rule, the raw-row digest and
the join keys. End-to-end resume through the state: test_resume_state.py."""

from __future__ import annotations

import datetime as dt
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from step1x_batch.rows import log as rowlog
from step1x_batch.rows import state as rowstate
from step1x_batch.job.config import parse_config
from step1x_batch.rows.digest import row_digests, settings_digest_key, settings_key
from step1x_batch.rows.log import part_uri, write_log_part
from step1x_batch.rows.manifest import normalize_batch
from step1x_batch.rows.state import STATE_SCHEMA, compact, decide, iter_state, latest_records, read_pointer
from step1x_batch.job.skip import row_keys
from step1x_batch.job.stages import normalize_settings
from step1x_batch.io.storage import write_bytes

ROOT = Path(__file__).resolve().parents[1]
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def rec(id_, fp, status="ok", minutes=0, **kw):
    out = {"id": id_, "fingerprint": fp, "status": status,
           "finished_at": None if minutes is None else T0 + dt.timedelta(minutes=minutes)}
    if status == "ok":
        out["output_uri"] = f"out/images/{id_}-{fp}.png"
    out.update(kw)
    return out


def oracle(records: list[dict]) -> dict[str, dict]:
    """The deciding state of each id, folded record by record in read order (plain Python)."""
    never = dt.datetime.min.replace(tzinfo=dt.timezone.utc)
    out: dict[str, dict] = {}
    for r in records:
        s = out.setdefault(r["id"], {"attempts": 0, "last": None, "ok": None})
        s["attempts"] += 1
        if s["last"] is None or (r["finished_at"] or never) >= (s["last"]["finished_at"] or never):
            s["last"] = r
        if r["status"] == "ok" and (s["ok"] is None or (r["finished_at"] or never) >= (s["ok"]["finished_at"] or never)):
            s["ok"] = r
    return {i: {"fingerprint": s["last"]["fingerprint"], "status": s["last"]["status"],
                "error_type": s["last"].get("error_type"), "attempts": s["attempts"],
                "ok_fingerprint": s["ok"]["fingerprint"] if s["ok"] else None,
                "ok_output_uri": s["ok"]["output_uri"] if s["ok"] else None} for i, s in out.items()}


def state_dict(root, opts=None) -> dict[str, dict]:
    keys = ["fingerprint", "status", "error_type", "attempts", "ok_fingerprint", "ok_output_uri"]
    out = {}
    for table in iter_state(root, opts):
        for row in table.to_pylist():
            assert row["id"] not in out  # one row per id, in exactly one bucket
            out[row["id"]] = {k: row[k] for k in keys}
    return out


def random_runs(seed: int, runs: int = 3, parts: int = 3, rows: int = 40, ids: int = 25) -> list[list[list[dict]]]:
    """Runs of parts of records: ids recur, times collide or are missing, ok and error mix."""
    rng = random.Random(seed)
    out = []
    for r in range(runs):
        run = []
        for _ in range(parts):
            part = []
            for _ in range(rows):
                i = f"id-{rng.randrange(ids)}"
                status = rng.choice(["ok", "ok", "error", "skipped"])
                minutes = None if rng.random() < 0.1 else rng.randrange(r * 50, r * 50 + 60)
                kw = {"error_type": rng.choice(["read_failed", "corrupt_image"])} if status == "error" else {}
                part.append(rec(i, f"fp{rng.randrange(3)}", status, minutes, run_id=f"run-{r}", **kw))
            run.append(part)
        out.append(run)
    return out


@pytest.mark.parametrize("where", ["local", "s3"])
def test_incremental_compaction_matches_an_independent_fold(where, tmp_path, s3_bucket, storage_options):
    root = str(tmp_path / "out") if where == "local" else f"{s3_bucket}/out"
    opts = None if where == "local" else storage_options
    assert compact(root, opts).pointer is None  # no logs: nothing to do, no state
    seen: list[dict] = []
    for r, (run, buckets) in enumerate(zip(random_runs(7), [None, 4, 1])):  # re-partitions twice
        for k, part in enumerate(run):
            write_log_part(pd.DataFrame(part), part_uri(root, f"run-{r}", k), opts)
            seen.extend(part)
        result = compact(root, opts, buckets=buckets, run_id=f"run-{r}")
        assert result.compacted and result.folded_parts == len(run) and result.folded_records == sum(map(len, run))
        assert result.pointer.buckets == (buckets or 1) and result.pointer.records == len(seen)
        assert state_dict(root, opts) == oracle(seen)
        assert result.pointer.ids == len(oracle(seen))
    again = compact(root, opts)  # nothing new: the same version stays current
    assert not again.compacted and again.pointer == result.pointer
    # The state is derived: delete it and rebuild from the logs alone.
    rowstate_dir = (tmp_path / "out" / "state") if where == "local" else None
    if rowstate_dir is not None:
        import shutil

        shutil.rmtree(rowstate_dir)
        rebuilt = compact(root, opts, buckets=2)
        assert rebuilt.compacted and rebuilt.pointer.records == len(seen)
        assert state_dict(root, opts) == oracle(seen)


def test_only_two_versions_are_kept(tmp_path):
    root = str(tmp_path)
    versions = []
    for k in range(4):
        write_log_part(pd.DataFrame([rec(f"x{k}", "f")]), part_uri(root, "r", k))
        versions.append(compact(root).pointer.version)
    kept = sorted(p.name for p in (tmp_path / "state").iterdir() if p.name.startswith("v-"))
    assert kept == sorted(f"v-{v}" for v in versions[-2:])


def test_pending_parts_are_read_before_they_are_compacted(tmp_path):
    root = str(tmp_path)
    write_log_part(pd.DataFrame([rec("a", "fa1", minutes=1), rec("b", "fb1", minutes=1)]), part_uri(root, "r1", 0))
    compact(root)
    write_log_part(pd.DataFrame([rec("a", "fa2", minutes=5), rec("c", "fc", "error", 5, error_type="corrupt_image")]),
                   part_uri(root, "r2", 0))  # not compacted yet (a killed run)
    assert rowstate.pending_parts(root, None, read_pointer(root)) == ["logs/r2/part-000000.parquet"]
    everything = {r["id"]: r for r in pa.concat_tables(list(iter_state(root))).to_pylist()}
    assert everything["a"]["ok_fingerprint"] == "fa2" and everything["a"]["attempts"] == 2
    assert everything["c"]["status"] == "error"
    assert set(everything) == {"a", "b", "c"}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_latest_records(where, tmp_path, s3_bucket, storage_options):
    root = str(tmp_path / "out") if where == "local" else f"{s3_bucket}/out"
    opts = None if where == "local" else storage_options
    empty = latest_records(root, opts, ["a"])  # nothing written yet
    assert (empty.ok, empty.error, empty.errored) == ({}, {}, set())
    write_log_part(pd.DataFrame([
        rec("a", "fa1", minutes=1),
        rec("b", "fb1", minutes=1),
        rec("c", "fc1", "error", minutes=1, error_type="corrupt_image"),
        rec("d", "fd1", "skipped", minutes=1),
        rec("e", "fe-old", minutes=None),  # no finish time: oldest
    ]), part_uri(root, "run-1", 0), opts)
    compact(root, opts)  # some records come from the state, the rest from a pending part
    write_log_part(pd.DataFrame([
        rec("a", "fa2", minutes=5),  # a later ok with new parameters wins
        rec("b", "fb2", "error", minutes=5, error_type="write_failed"),  # the ok stays b's latest ok
        rec("e", "fe-new", minutes=2),
        rec("f", "ff1", minutes=3),
    ]), part_uri(root, "run-2", 0), opts)
    write_log_part(pd.DataFrame([rec("a", "fa0", minutes=0)]), part_uri(root, "run-2", 1), opts)
    latest = latest_records(root, opts, list("abcdefz"))
    assert set(latest.ok) == {("a", "fa2"), ("b", "fb1"), ("e", "fe-new"), ("f", "ff1")}
    assert latest.ok[("a", "fa2")]["output_uri"] == "out/images/a-fa2.png"
    assert {k: v["error_type"] for k, v in latest.error.items()} == {"b": "write_failed", "c": "corrupt_image"}
    assert latest.errored == {("b", "fb2"), ("c", "fc1")}
    assert set(latest_records(root, opts, ["a"]).ok) == {("a", "fa2")}


def test_an_unreadable_part_is_left_for_the_next_compaction(tmp_path, s3_bucket, storage_options):
    root = f"{s3_bucket}/out"
    write_log_part(pd.DataFrame([rec("a", "fa")]), part_uri(root, "r1", 0), storage_options)
    good = rowlog.log_part_bytes(pd.DataFrame([rec("b", "fb")]))
    write_bytes(part_uri(root, "r1", 1), good[: len(good) // 2], storage_options)  # half a part
    with pytest.warns(RuntimeWarning, match="unreadable log part"):
        result = compact(root, storage_options)
    assert result.unreadable_parts == ["logs/r1/part-000001.parquet"]
    assert set(state_dict(root, storage_options)) == {"a"}
    write_bytes(part_uri(root, "r1", 1), good, storage_options)  # the object is readable again
    assert compact(root, storage_options).folded_parts == 1
    assert set(state_dict(root, storage_options)) == {"a", "b"}


_COMPACT = """
import sys
from step1x_batch.rows import state as rowstate
print(rowstate.compact(sys.argv[1], buckets=int(sys.argv[2])).line(), flush=True)
"""


def test_a_compaction_killed_before_publishing_leaves_the_previous_state(tmp_path):
    root = str(tmp_path / "out")
    runs = random_runs(11, runs=2, parts=4)
    for k, part in enumerate(runs[0]):
        write_log_part(pd.DataFrame(part), part_uri(root, "run-0", k))
    first = compact(root, buckets=2).pointer
    for k, part in enumerate(runs[1]):
        write_log_part(pd.DataFrame(part), part_uri(root, "run-1", k))
    env = dict(os.environ, STEP1X_BATCH_FAILPOINT="compact-before-publish", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", _COMPACT, root, "4"], env=env,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert "failpoint compact-before-publish" in proc.stdout.readline()
        half = [p for p in (tmp_path / "out" / "state").iterdir() if p.name != f"v-{first.version}" and p.is_dir()]
        assert len(half) == 1 and len(list(half[0].glob("bucket-*.parquet"))) == 4  # written, not published
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert read_pointer(root) == first  # the pointer still names the complete previous version
    old = oracle([r for part in runs[0] for r in part])
    tables = [rowstate.read_bucket(root, None, first, b) for b in range(first.buckets)]
    assert {r["id"]: r["ok_fingerprint"] for t in tables for r in t.to_pylist()} == {
        i: s["ok_fingerprint"] for i, s in old.items()}
    # Readers see the previous version plus the pending parts: exactly the logs.
    everything = [r for run in runs for part in run for r in part]
    assert state_dict(root) == oracle(everything)
    result = compact(root, buckets=4)
    assert result.compacted and result.folded_parts == 4
    assert state_dict(root) == oracle(everything)
    versions = sorted(p.name for p in (tmp_path / "out" / "state").iterdir() if p.is_dir())
    assert versions == sorted([f"v-{first.version}", f"v-{result.pointer.version}"])  # the garbage is gone


# Imports the row state once, then forks one compaction per cue: a compaction starts at once, so
# the kill's random moment is a moment of the compaction, not of Python's start-up (most of a
# fresh interpreter's life). It kills its own child when told (an unreaped pid is never reused).
_COMPACTION_SERVER = """
import os, signal, sys
from step1x_batch.rows import state as rowstate
for cue in sys.stdin:
    pid = os.fork()
    if pid == 0:
        rowstate.compact(sys.argv[1], buckets=int(sys.argv[2]))
        os._exit(0)
    print("compacting", flush=True)
    sys.stdin.readline()
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    print("killed", flush=True)
"""


def test_a_compaction_killed_at_any_moment_leaves_a_valid_state(tmp_path):
    """SIGKILL at random moments of real compactions (no failpoint): every time, readers see
    exactly the logs, and the next compaction is correct."""
    root = str(tmp_path / "out")
    everything: list[dict] = []
    rng = random.Random(3)
    server = subprocess.Popen([sys.executable, "-c", _COMPACTION_SERVER, root, "8"],
                              env=dict(os.environ, PYTHONPATH=str(ROOT)),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        for attempt in range(4):
            run = random_runs(20 + attempt, runs=1, parts=6, rows=300, ids=400)[0]
            for k, part in enumerate(run):
                write_log_part(pd.DataFrame(part), part_uri(root, f"run-{attempt}", k))
                everything.extend(part)
            server.stdin.write("compact\n")
            server.stdin.flush()
            assert server.stdout.readline() == "compacting\n"
            time.sleep(rng.uniform(0.0, 0.4))  # such a compaction takes ~0.1-0.3 s: during it, or after
            server.stdin.write("kill\n")
            server.stdin.flush()
            assert server.stdout.readline() == "killed\n"
            assert state_dict(root) == oracle(everything)
    finally:
        server.kill()
        server.wait(timeout=30)
    compact(root, buckets=8)
    assert state_dict(root) == oracle(everything)


def test_decide():
    state = pa.Table.from_pylist([
        {"id": "ok", "fingerprint": "f1", "status": "ok", "source_digest": 11, "attempts": 1,
         "ok_fingerprint": "f1", "ok_source_digest": 11},
        {"id": "ok-then-error", "fingerprint": "f2", "status": "error", "error_type": "corrupt_image",
         "source_digest": 22, "attempts": 2, "ok_fingerprint": "f1", "ok_source_digest": 11},
        {"id": "transient", "fingerprint": "f1", "status": "error", "error_type": "read_failed",
         "source_digest": 11, "attempts": 1},
        {"id": "invalid", "fingerprint": None, "status": "error", "error_type": "empty_instruction",
         "source_digest": 33, "attempts": 1},
        {"id": "new"},
    ], schema=STATE_SCHEMA)
    retried = ["read_failed"]
    cases = [  # (state row, fingerprint, digest, done)
        (0, "f1", 99, True), (0, None, 11, True), (0, "f9", 98, False),
        (1, "f1", 98, True),  # back to the version whose bytes the output still holds
        (1, "f2", 98, True), (1, "f3", 98, False),  # the final error decides its own fingerprint only
        (2, "f1", 11, False),  # a retried type is never done
        (3, None, 97, True), (3, "f4", 97, False), (3, None, 33, True),
        (4, "f1", 11, False),
    ]
    rows = state.take(pa.array([c[0] for c in cases]))
    fps = pa.array([c[1] for c in cases], pa.string())
    digests = pa.array([c[2] for c in cases], pa.uint64())
    assert decide(fps, digests, rows, retried).tolist() == [c[3] for c in cases]
    assert not decide(fps, digests, rows, ["*"])[[4, 7]].any()  # "*": every error is redone
    # Before normalisation only digests count: an invalid id's digest must match too.
    assert decide(None, digests, rows, retried).tolist() == [False, True, False, False, False, False, False,
                                                             False, False, True, False]


# --- the raw-row digest -------------------------------------------------------------------------


def test_digest_tells_rows_apart_and_ignores_batching():
    t = pa.table({"id": ["a", "b", None, "None", "c"], "n": [1, 2, 3, None, 5]})
    d = row_digests(t, 1)
    assert len(set(d.tolist())) == 5  # null and the text "None" differ
    assert row_digests(t.slice(2, 2), 1).tolist() == d[2:4].tolist()  # a row's digest is its own
    assert row_digests(t, 2).tolist() != d.tolist()  # other settings, other digests
    renamed = t.rename_columns(["id", "m"])
    assert (row_digests(renamed, 1) != d).all()  # the column's name counts
    large = pa.table({"id": t.column("id").cast(pa.large_string()), "n": t.column("n").cast(pa.int32())})
    assert row_digests(large, 1).tolist() == d.tolist()  # not how a reader typed it
    floats = pa.table({"id": t.column("id"), "n": t.column("n").cast(pa.float64())})
    assert (row_digests(floats, 1) != d).all()  # 1 and 1.0 may normalise differently
    nested = pa.table({"u": [["a", "b"], ["a"], None, []]})
    assert len(set(row_digests(nested, 1).tolist())) == 4


def test_settings_key_sees_every_setting():
    cfg = parse_config({"input": {"manifest": "/m/manifest.parquet"}, "output": {"uri": "/o"},
                        "model": {"family": "null"}})
    key = settings_digest_key(normalize_settings(cfg))
    assert settings_digest_key(normalize_settings(cfg, "/m/other.parquet")) == key  # same folder
    assert settings_digest_key(normalize_settings(cfg, "/elsewhere/manifest.parquet")) != key
    cfg.sampling.seed_base = 5
    assert settings_digest_key(normalize_settings(cfg)) != key
    assert settings_key(1) != settings_key(2)


def test_join_keys_are_the_normalised_ids():
    cfg = parse_config({"input": {"manifest": "/m/manifest.parquet"}, "output": {"uri": "/o"},
                        "model": {"family": "null"}})
    settings = normalize_settings(cfg)
    texts = pa.table({"id": ["sku-1", " padded ", "tab\tinside", "", None, "ünïcode", "x" * 600],
                      "image_uri": ["a.png"] * 7, "instruction": ["go"] * 7})
    ints = pa.table({"id": pa.array([7, None, -3], pa.int64()), "image_uri": ["a.png"] * 3,
                     "instruction": ["go"] * 3})
    no_ids = pa.table({"image_uri": ["a.png", "b.png"], "instruction": ["go", "go"]})
    for t in (texts, ints, no_ids):
        assert row_keys(t, settings).to_pylist() == normalize_batch(t, settings).column("id").to_pylist()


def test_bucket_of_is_stable_and_spread():
    ids = pa.array([f"item-{i}" for i in range(4000)])
    b = rowstate.bucket_of(ids, 8)
    assert rowstate.bucket_of(ids.slice(100, 5), 8).tolist() == b[100:105].tolist()
    assert np.bincount(b, minlength=8).min() > 350
    assert rowstate.bucket_count(10) == 1 and rowstate.bucket_count(1_000_000) == 4
    assert rowstate.bucket_count(10_000_000) == 64
