"""Same row, same bytes across processes (issue 24): one row of each family in each dtype, edited
in 6 fresh processes (each edits both families' rows, half of them in the other order), gives one
output per (family, dtype). Before the fix, float32 on the CPU gave 2 or 3 different outputs in 8
processes for Step1X-Edit, 2 in 5 for Qwen-Image-Edit."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import step1x_batch

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_ROOT = Path(step1x_batch.__file__).resolve().parents[1]  # the code under test, wherever it is
PROCESSES = 6

# One fresh process: load each tiny family in the order given, edit its row in both dtypes, print
# one hash per (family, dtype). Each process edits both families (half of them Qwen-Image-Edit
# first), so 6 fresh processes serve both families: 6 interpreter start-ups instead of 12.
SCRIPT = r"""
import hashlib, sys
import numpy as np
for spec in sys.argv[1:]:
    family, folder, height, width, level = spec.split("|")
    height, width, level = int(height), int(width), int(level)
    if family == "step1x":
        from step1x_batch.models.step1x.pipeline import EditPipeline as Pipeline
    else:
        from step1x_batch.models.qwen_image_edit.pipeline import QwenImageEditPipeline as Pipeline
    image = np.random.default_rng(3).integers(0, 256, (height, width, 3), dtype=np.uint8)
    # Qwen-Image-Edit: small reference areas (its defaults, 1024^2 and 384^2, make a CPU edit minutes long).
    options = {} if family == "step1x" else {"reference_area": 64 * 64, "vl_area": 56 * 56}
    for dtype in ("float32", "bfloat16"):
        pipe = Pipeline.from_pretrained(folder, device="cpu", dtype=dtype, **options)
        r = pipe.edit([image], ["add a red hat"], seeds=[7], num_steps=3, size_level=level)[0]
        assert r.error_type is None, r.error_message
        print(family, dtype, hashlib.sha256(np.asarray(r.image).tobytes()).hexdigest(), flush=True)
from step1x_batch.models.determinism import cpu_mode
print("mkl", cpu_mode())
"""
# The row for Step1X-Edit; a smaller one for Qwen-Image-Edit.
ROWS = {"step1x": (192, 256, 128), "qwen-image-edit": (48, 64, 64)}
FAMILIES = list(ROWS)


def tiny_folder(family: str, root: Path) -> Path:
    if family == "step1x":
        from step1x_batch.models.step1x.tiny import make_tiny_weights
    else:
        from step1x_batch.models.qwen_image_edit.tiny import make_tiny_weights
    make_tiny_weights(root / family, seed=0)
    return root / family


def run_once(families: list[str], folders: dict[str, Path]) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(PACKAGE_ROOT)
    specs = ["|".join([family, str(folders[family]), *map(str, ROWS[family])]) for family in families]
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *specs],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [line for line in proc.stdout.split("\n") if line]


@pytest.fixture(scope="module")
def fresh_process_lines(tmp_path_factory) -> list[list[str]]:
    """The output lines of ``PROCESSES`` fresh processes, each editing both families' rows."""
    root = tmp_path_factory.mktemp("determinism")
    folders = {family: tiny_folder(family, root) for family in FAMILIES}
    orders = [FAMILIES if i % 2 == 0 else FAMILIES[::-1] for i in range(PROCESSES)]
    with ThreadPoolExecutor(2) as pool:  # two processes at a time (the machine has 2 cores)
        return list(pool.map(lambda order: run_once(order, folders), orders))


@pytest.mark.parametrize("family", FAMILIES)
def test_one_row_gives_the_same_bytes_in_fresh_processes(family, fresh_process_lines):
    for out in fresh_process_lines:
        assert len(out) == 2 * len(FAMILIES) + 1 and out[-1] == "mkl strict", out
    by_case: dict[str, set[str]] = {}
    for out in fresh_process_lines:
        for line in out[:-1]:
            name, dtype, digest = line.split()
            if name == family:
                by_case.setdefault(f"{name} {dtype}", set()).add(digest)
    assert sorted(by_case) == [f"{family} bfloat16", f"{family} float32"]
    for case, digests in by_case.items():
        assert len(digests) == 1, f"{case}: {len(digests)} different outputs in {PROCESSES} processes"


def test_cuda_switches_are_set(monkeypatch):
    import torch

    from step1x_batch.models import determinism

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        got = determinism.cuda_deterministic()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert got["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and got["deterministic_algorithms"] is True
    finally:
        determinism.cuda_default()
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic
