"""Same row, same bytes across processes (issue 24): one row of each family in each dtype, edited
in 6 fresh processes, gives one output per (family, dtype). Before the fix, float32 on the CPU gave
2 or 3 different outputs in 8 processes (MKL sgemm's default code path)."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROCESSES = 6

# One process: load both tiny families, edit the row in both dtypes, print one hash per case.
SCRIPT = r"""
import hashlib, sys
import numpy as np
from step1x_batch.models.step1x.pipeline import EditPipeline
from step1x_batch.models.qwen_image_edit.pipeline import QwenImageEditPipeline
image = np.random.default_rng(3).integers(0, 256, (192, 256, 3), dtype=np.uint8)
for name, cls, folder in (("step1x", EditPipeline, sys.argv[1]), ("qwen-image-edit", QwenImageEditPipeline, sys.argv[2])):
    for dtype in ("float32", "bfloat16"):
        pipe = cls.from_pretrained(folder, device="cpu", dtype=dtype)
        r = pipe.edit([image], ["add a red hat"], seeds=[7], num_steps=3, size_level=128)[0]
        assert r.error_type is None, r.error_message
        print(name, dtype, hashlib.sha256(np.asarray(r.image).tobytes()).hexdigest(), flush=True)
from step1x_batch.models.determinism import cpu_mode
print("mkl", cpu_mode())
"""


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory) -> tuple[Path, Path]:
    from step1x_batch.models.qwen_image_edit.tiny import make_tiny_weights as qwen_tiny
    from step1x_batch.models.step1x.tiny import make_tiny_weights as step1x_tiny

    root = tmp_path_factory.mktemp("determinism")
    step1x_tiny(root / "step1x", seed=0)
    qwen_tiny(root / "qwen", seed=0)
    return root / "step1x", root / "qwen"


def run_once(folders: tuple[Path, Path]) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, *map(str, folders)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split("\n")


def test_one_row_gives_the_same_bytes_in_fresh_processes(tiny_folders):
    with ThreadPoolExecutor(2) as pool:  # two processes at a time (the machine has 2 cores)
        outputs = list(pool.map(lambda _: run_once(tiny_folders), range(PROCESSES)))
    lines = [[line for line in out if line] for out in outputs]
    for out in lines:
        assert len(out) == 5 and out[-1] == "mkl strict", out
    by_case: dict[str, set[str]] = {}
    for out in lines:
        for line in out[:4]:
            family, dtype, digest = line.split()
            by_case.setdefault(f"{family} {dtype}", set()).add(digest)
    assert sorted(by_case) == ["qwen-image-edit bfloat16", "qwen-image-edit float32", "step1x bfloat16",
                               "step1x float32"]
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
