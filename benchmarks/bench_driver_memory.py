"""Driver memory with images inside the manifest: 100,000 rows against 1,000, side by side.

    python benchmarks/bench_driver_memory.py [--rows 1000 100000] [--workdir /tmp/bench-driver-memory]

Each size is a Parquet manifest as the hub ships one (a ``datasets`` Image struct column holding
every row's own small PNG, an id, an instruction and a category column; row groups of 10,000
rows), run from scratch by the edit job with the null family on a local Ray (``input.columns``
maps it, ``output.dataset: true`` writes the result as Parquet shards too), each in a fresh
driver process that reports its own peak RSS (``VmHWM``; Ray's raylet, object store and workers
are other processes). The images must stay in Ray's blocks: the driver holds log records and
counters, not pixels. The issue's bound: the larger run's peak at most 200 MiB over the smaller's.

The last line is ``driver_memory: rows=A peak=X MiB rows=B peak=Y MiB growth=Y-X MiB``.
"""

from __future__ import annotations

import argparse
import io
import json
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

_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_CHUNK = 10_000


def _pngs(start: int, stop: int) -> list[bytes]:
    """Every row its own 8x8 picture (so no two inputs share a kept copy)."""
    from PIL import Image

    out = []
    for k in range(start, stop):
        pixels = np.random.default_rng(k).integers(0, 256, (8, 8, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def build_manifest(path: Path, rows: int) -> None:
    schema = pa.schema([("key", pa.string()), ("instruction", pa.string()), ("task_type", pa.string()),
                        ("input_image", _IMAGE)])
    with pq.ParquetWriter(str(path), schema) as writer:
        for start in range(0, rows, _CHUNK):
            stop = min(rows, start + _CHUNK)
            images = _pngs(start, stop)
            writer.write_table(pa.table({
                "key": [f"row-{k:07d}" for k in range(start, stop)],
                "instruction": [f"make item {k} blue" for k in range(start, stop)],
                "task_type": [f"t{k % 11}" for k in range(start, stop)],
                "input_image": pa.array([{"bytes": b, "path": f"{k}.png"} for k, b in zip(range(start, stop), images)],
                                        _IMAGE),
            }, schema=schema))


def job_config(manifest: Path, out: Path) -> dict:
    return {
        "input": {"manifest": str(manifest), "columns": {"id": "key", "image": "input_image"}},
        "output": {"uri": str(out), "dataset": True},
        "model": {"family": "null"},
        "resources": {"io_batch_size": 256, "edit_batch_size": 256},
        "runtime": {"run_id": "bench", "progress_bars": False, "log_part_rows": 10_000,
                    "log_part_seconds": 10.0, "report_max_rows": 12},
    }


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM: reset by exec, unlike ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def driver(config_path: str, result_path: str) -> int:
    """The job's driver process: pre-flight, run, then report this process's own peak RSS."""
    from step1x_batch.job.config import load_config
    from step1x_batch.job.preflight import check_job
    from step1x_batch.job.runner import run_job

    cfg = load_config(config_path)
    summary = run_job(cfg, check_job(cfg))
    Path(result_path).write_text(json.dumps({"peak_rss_mib": peak_rss_mib(), "processed": summary.rows_processed,
                                             "by_status": summary.by_status, "wall_s": summary.wall_s}))
    return 0


def measure(work: Path, rows: int) -> dict:
    import yaml

    folder = work / f"n{rows}"
    manifest = folder / "manifest.parquet"
    if not manifest.exists():
        folder.mkdir(parents=True, exist_ok=True)
        build_manifest(manifest, rows)
    out = folder / "out"
    shutil.rmtree(out, ignore_errors=True)
    config = folder / "job.yaml"
    config.write_text(yaml.safe_dump(job_config(manifest, out)))
    result = folder / "driver.json"
    started = time.time()
    proc = subprocess.run([sys.executable, __file__, "--driver", str(config), str(result)],
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the {rows}-row job failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rep = json.loads(result.read_text())
    assert rep["processed"] == rows and rep["by_status"] == {"ok": rows}, rep
    rep.update(rows=rows, launch_wall_s=time.time() - started, manifest_mib=manifest.stat().st_size / 2**20)
    return rep


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, nargs=2, default=[1_000, 100_000])
    p.add_argument("--workdir", default="/tmp/bench-driver-memory")
    p.add_argument("--driver", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.driver:
        return driver(*args.driver)
    work = Path(args.workdir)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    small, large = (measure(work, n) for n in args.rows)
    for rep in (small, large):
        print(f"rows {rep['rows']:>7,}: manifest {rep['manifest_mib']:.1f} MiB, job {rep['wall_s']:.0f} s, "
              f"driver peak RSS {rep['peak_rss_mib']:.0f} MiB")
    growth = large["peak_rss_mib"] - small["peak_rss_mib"]
    print(f"driver_memory: rows={small['rows']} peak={small['peak_rss_mib']:.0f} MiB rows={large['rows']} "
          f"peak={large['peak_rss_mib']:.0f} MiB growth={growth:.0f} MiB (bound 200 MiB: "
          f"{'within' if growth <= 200 else 'OVER'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
