"""The device script (benchmarks/gpu_check.py), smoke-run on the CPU as the GPU machine runs it:
without Ray (the GPU image has none), one block of each kind, narrow, small images."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_runs_without_ray():
    code = ("import sys, runpy; sys.modules['ray'] = None; "
            f"sys.argv = ['gpu_check.py', '--smoke', '--device', 'cpu', '--no-compile']; "
            f"runpy.run_path({str(ROOT / 'benchmarks' / 'gpu_check.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    for family in ("Step1X-Edit", "Qwen-Image-Edit"):
        table = [line for line in out.splitlines() if line.startswith("| ") and "|---" not in line]
        assert any(line.startswith(f"| {family} | compile |") for line in table), out
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| | no |")]
    assert len(rows) == 4, out  # batches 1 and 2, both families
    for cells in rows:
        s_edit = float(cells[7])
        assert s_edit > 0  # a measured time, extended from 1 and 3 steps
    assert "auto picks flash" in out and "gpu_check: done" in out
    ab = [line for line in out.splitlines() if "determinism switches" in line]
    assert len(ab) == 2 and all("give the same bytes: True" in line for line in ab), out
    assert "CUBLAS_WORKSPACE_CONFIG=:4096:8" in out
