"""Resume at catalog scale: how long a start takes, and how much driver memory, with N rows done.

    python benchmarks/bench_resume.py --rows 1000000 [--changed 0.01] [--workdir /tmp/bench-resume]

Builds, with the project's own code, an output root whose log says N rows are done: the
manifest's rows normalised by the job's own normaliser (ids, fingerprints, raw-row digests),
written as log parts by ``rowlog.write_log_part`` (plus an earlier transient error record for 1 %
of the ids, so there are more records than rows), then compacted into the row state as the
previous run's end would have. A second manifest of N rows has ``--changed`` of them new or
changed (half new ids, half a changed instruction). The job then runs on it with the null
editor on a local Ray, in a fresh process: ``start_s`` is from launching that process to the
first row edited (the earliest ``finished_at`` in its log), ``driver_peak_rss_mib`` is that
process's own peak RSS (``VmHWM``; Ray's raylet and workers are other processes). The build
is cached in ``--workdir``; each run works on a hard-linked copy of the built root.

The last line is ``resume: rows=N records=R todo=T start_s=S driver_peak_rss_mib=M``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

N_IMAGES = 16
CHUNK = 100_000


def job_config(manifest: Path, out: Path, images: Path, run_id: str) -> dict:
    return {
        "input": {"manifest": str(manifest)},
        "output": {"uri": str(out)},
        "model": {"family": "null"},
        "runtime": {"run_id": run_id, "progress_bars": False, "log_part_rows": 10_000,
                    "log_part_seconds": 5.0, "report_max_rows": 12},
    }


def manifest_rows(start: int, stop: int, images: Path, changed_from: int | None = None) -> pa.Table:
    """Rows ``start..stop``: ids ``item-<i>``, one of 16 images, an instruction per row."""
    i = np.arange(start, stop)
    instr = [f"render item {k} on a white background" for k in i]
    if changed_from is not None:
        instr = [f"render item {k} on a grey background" for k in i]
    return pa.table({
        "id": pa.array([f"item-{k:09d}" for k in i]),
        "image_uri": pa.array([str(images / f"p{k % N_IMAGES:02d}.png") for k in i]),
        "instruction": pa.array(instr),
        "category": pa.array([f"cat-{k % 97}" for k in i]),
    })


def _log_chunk(args: tuple) -> int:
    """Normalise one chunk of the first manifest as the job does and write its records."""
    from step1x_batch.job.config import parse_config
    from step1x_batch.rows.log import part_uri, write_log_part
    from step1x_batch.job.stages import normalize_settings
    from step1x_batch.rows.digest import manifest_row_digests
    from step1x_batch.rows.manifest import normalize_batch

    manifest, out, images, start, stop, part_rows, errors_every = args
    cfg = parse_config(job_config(manifest, out, images, "built"))
    settings = normalize_settings(cfg)
    raw = pq.ParquetFile(manifest).read_row_group(start // CHUNK)  # the same columns as the job reads
    norm = normalize_batch(raw, settings)
    n = norm.num_rows
    t0 = np.datetime64("2026-11-30T02:00:00", "us")
    finished = pa.array(t0 + np.arange(start, stop).astype("timedelta64[ms]"), pa.timestamp("us", tz="UTC"))
    ok = pa.table({
        "id": norm.column("id"), "fingerprint": norm.column("fingerprint"), "status": pa.array(["ok"] * n),
        "image_uri": norm.column("image_uri"), "instruction": norm.column("instruction"),
        "output_uri": pa.array([f"{out}/images/{i}.png" for i in norm.column("id").to_pylist()]),
        "seed": norm.column("seed"), "num_steps": norm.column("num_steps"),
        "model_id": pa.array(["null"] * n), "run_id": pa.array(["built"] * n), "attempt": pa.array([1] * n),
        "finished_at": finished, "source_digest": manifest_row_digests(raw, settings),
        "extra": norm.column("extra"),
    })
    sel = np.arange(0, n, errors_every)  # an earlier transient failure of some rows, then their ok
    earlier = ok.take(pa.array(sel)).drop_columns(["status", "output_uri", "finished_at"])
    earlier = earlier.append_column("status", pa.array(["error"] * len(sel))).append_column(
        "error_type", pa.array(["read_failed"] * len(sel))).append_column(
        "finished_at", pa.array(t0 - np.timedelta64(1, "h") + np.zeros(len(sel), "timedelta64[us]"),
                                pa.timestamp("us", tz="UTC")))
    write_log_part(earlier, part_uri(str(out), "built-earlier", f"{start:010d}"))
    for k in range(0, n, part_rows):
        write_log_part(ok.slice(k, part_rows), part_uri(str(out), "built", f"{start + k:010d}"))
    return n + len(sel)


def build(work: Path, rows: int, changed: float) -> dict:
    """The built root (cached): images, both manifests, the log, the compacted state."""
    from PIL import Image

    from step1x_batch.rows import state as rowstate

    marker = work / "built.json"
    if marker.exists():
        return json.loads(marker.read_text())
    shutil.rmtree(work, ignore_errors=True)
    images, out = work / "images", work / "root"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(N_IMAGES):
        Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8)).save(images / f"p{k:02d}.png")
    first = work / "manifest-done.parquet"
    with pq.ParquetWriter(first, manifest_rows(0, 1, images).schema) as w:
        for s in range(0, rows, CHUNK):
            w.write_table(manifest_rows(s, min(rows, s + CHUNK), images), row_group_size=CHUNK)
    t = time.perf_counter()
    calls = [(first, out, images, s, min(rows, s + CHUNK), 10_000, 100) for s in range(0, rows, CHUNK)]
    with multiprocessing.get_context("spawn").Pool(os.cpu_count() or 1) as pool:
        records = sum(pool.map(_log_chunk, calls))
    log_s = time.perf_counter() - t
    result = rowstate.compact(str(out), run_id="built")
    print(f"built the log: {records} records of {rows} rows in {log_s:.1f} s; {result.line()}", flush=True)
    # The second manifest: the same N rows, but `changed` of them new (ids past N) or changed.
    n_todo = int(round(rows * changed))
    n_new, n_changed = n_todo // 2, n_todo - n_todo // 2
    second = work / "manifest-tonight.parquet"
    with pq.ParquetWriter(second, manifest_rows(0, 1, images).schema) as w:
        for s in range(0, rows - n_new, CHUNK):
            stop = min(rows - n_new, s + CHUNK)
            part = manifest_rows(s, stop, images)
            lo, hi = max(s, rows - n_new - n_changed), stop  # the last n_changed old rows change
            if lo < hi:
                part = pa.concat_tables([part.slice(0, lo - s), manifest_rows(lo, hi, images, changed_from=lo)])
            w.write_table(part, row_group_size=CHUNK)
        if n_new:
            w.write_table(manifest_rows(rows, rows + n_new, images), row_group_size=CHUNK)
    info = {"rows": rows, "records": records, "todo": n_todo, "state_build_s": round(result.seconds, 1),
            "log_build_s": round(log_s, 1)}
    marker.write_text(json.dumps(info))
    return info


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM: reset by exec, unlike ru_maxrss, which keeps the forked
    parent's pages)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def driver(config_path: str, result_path: str) -> int:
    """The job's driver process: run the job, then report this process's own peak RSS."""
    from step1x_batch.job.config import load_config
    from step1x_batch.job.runner import run_job

    summary = run_job(load_config(config_path))
    Path(result_path).write_text(json.dumps({"peak_rss_mib": peak_rss_mib(), "processed": summary.rows_processed,
                                             "skipped": summary.rows_skipped, "by_status": summary.by_status}))
    return 0


def driver_fold(root: str, result_path: str) -> int:
    """The baseline, in a fresh process: what a start did before the state existed -- read every
    log part into the driver and fold it there (here with the vectorised fold, not a Python loop)."""
    from step1x_batch.rows import log as rowlog
    from step1x_batch.rows import state as rowstate

    t = time.perf_counter()
    tables = [rowstate.records_as_state(rowlog.read_part(uri, None, rowstate.RECORD_COLUMNS))
              for uri in rowlog.log_part_uris(root)]
    state = rowstate.fold(tables)
    seconds = time.perf_counter() - t
    Path(result_path).write_text(json.dumps({"seconds": seconds, "ids": state.num_rows, "peak_rss_mib": peak_rss_mib()}))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--changed", type=float, default=0.01)
    p.add_argument("--workdir", default="/tmp/bench-resume")
    p.add_argument("--baseline", action="store_true",
                   help="also time a driver-side fold of every log part (what a start did before the state)")
    p.add_argument("--driver", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--driver-fold", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.driver:
        return driver(*args.driver)
    if args.driver_fold:
        return driver_fold(*args.driver_fold)

    import yaml

    from step1x_batch.rows.log import read_logs

    work = Path(args.workdir) / f"n{args.rows}"
    info = build(work, args.rows, args.changed)
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    subprocess.run(["cp", "-al", str(work / "root"), str(run)], check=True)  # the built root stays as built
    config = work / "tonight.yaml"
    config.write_text(yaml.safe_dump(job_config(work / "manifest-tonight.parquet", run, work / "images", "tonight")))
    result = work / "driver.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    launched = time.time()
    proc = subprocess.run([sys.executable, __file__, "--driver", str(config), str(result)], env=env,
                          capture_output=True, text=True)
    wall = time.time() - launched
    if proc.returncode != 0:
        print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n")
        return proc.returncode
    rep = json.loads(result.read_text())
    mine = read_logs(str(run), run_id="tonight", columns=["finished_at"]).column("finished_at")
    first = min(mine.to_pylist()).timestamp() if len(mine) else float("nan")
    summary = json.loads((run / "runs" / "tonight" / "summary.json").read_text())
    assert rep["processed"] == info["todo"], (rep, info)  # exactly the new and changed rows
    assert rep["skipped"] == args.rows - info["todo"], (rep, info)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    print(f"build (cached): log {info['log_build_s']} s, state {info['state_build_s']} s")
    print(f"run: wall {wall:.1f} s (job {summary['wall_s']:.1f} s, of which compacting the state at the "
          f"end {summary.get('state_compaction_s')} s); {rep['processed']} edited, {rep['skipped']} skipped")
    start_s = first - launched
    rss = rep["peak_rss_mib"]
    if args.baseline:
        subprocess.run([sys.executable, __file__, "--driver-fold", str(work / "root"), str(work / "fold.json")],
                       env=env, check=True)
        base = json.loads((work / "fold.json").read_text())
        print(f"baseline, every log part folded in one driver process: {base['seconds']:.1f} s, peak RSS "
              f"{base['peak_rss_mib']:.0f} MiB ({base['ids']} ids) -- the state's driver: "
              f"{rss / base['peak_rss_mib']:.2f}x that memory")
    print(f"per row: start {start_s / args.rows * 1e6:.2f} us, end-of-run compaction "
          f"{(summary.get('state_compaction_s') or 0) / args.rows * 1e6:.2f} us")
    print(f"resume: rows={args.rows} records={info['records']} todo={info['todo']} start_s={start_s:.1f} "
          f"driver_peak_rss_mib={rss:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
