"""Same row, same bytes across processes: the settings that make float kernels reproducible.

**CPU** (measured, issue 24): torch's float32 matmuls go to MKL sgemm, whose default code path
gives results that vary between fresh processes on the same machine (the tiny Step1X-Edit model in
float32: 3 outputs in 8 processes; with ``MKL_CBWR=AUTO,STRICT``: one output in 8). MKL's
Conditional Numerical Reproducibility (CNR) in strict mode fixes the code path and the reduction
order, whatever the memory alignment and thread count. MKL reads the mode once, at its first
computational call, so it must be chosen before that: :data:`MKL_CBWR` is put in the environment
when ``step1x_batch.models`` is imported (which imports no torch), and :func:`cpu_mode` tells
whether it took (a process that ran a matmul before importing this package keeps MKL's default).
bfloat16 matmuls go to oneDNN, which gave one output in 8 processes without this.

**CUDA**: :func:`cuda_deterministic` sets what cross-process determinism needs on a GPU: cuBLAS
with a fixed workspace (``CUBLAS_WORKSPACE_CONFIG=:4096:8``, read when cuBLAS first initialises),
cuDNN without autotuning races (``benchmark=False``, ``deterministic=True``), and
``torch.use_deterministic_algorithms(True, warn_only=True)`` (ops with no deterministic
implementation warn rather than fail a job). The attention kernel is fixed by
:func:`step1x_batch.models.kernels.choose_attention`.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    import torch

MKL_CBWR = "AUTO,STRICT"
_AUTO, _STRICT, _ALL = 2, 0x10000, -1  # mkl.h: MKL_CBWR_AUTO, MKL_CBWR_STRICT, MKL_CBWR_ALL
CUBLAS_WORKSPACE = ":4096:8"
CPU_EDIT_THREADS = 1  # intra-op threads of an edit on the CPU (see cpu_threads)


def set_cpu_env() -> None:
    """Ask MKL for strict CNR and cuBLAS for a fixed workspace (unless the user chose): effective
    if neither has run yet, which is why ``step1x_batch.models`` calls this when imported."""
    os.environ.setdefault("MKL_CBWR", MKL_CBWR)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)


def _mkl():
    """torch's bundled MKL service functions (``mkl_serv_cbwr_get/set``), or None where absent."""
    import torch

    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        get, put = lib.mkl_serv_cbwr_get, lib.mkl_serv_cbwr_set
    except (OSError, AttributeError):
        return None
    get.argtypes, get.restype, put.argtypes, put.restype = [ctypes.c_int], ctypes.c_int, [ctypes.c_int], ctypes.c_int
    return get, put


def cpu_mode() -> str:
    """MKL's CNR mode in this process, after trying strict mode if nothing chose one yet:
    ``"strict"`` (reproducible across processes), ``"default"`` (MKL ran before it could be
    set: float32 CPU results may differ between processes), or ``"no-mkl"``."""
    fns = _mkl()
    if fns is None:
        return "no-mkl"
    get, put = fns
    mode = get(_ALL)
    ours = os.environ.get("MKL_CBWR", MKL_CBWR) == MKL_CBWR  # a user's own MKL_CBWR is left alone
    if ours and not mode & _STRICT and put(_AUTO | _STRICT) == 0:  # fails once MKL has run
        mode = get(_ALL)
    return "strict" if mode & _STRICT else "default"


def cuda_deterministic(warn_only: bool = True) -> dict[str, object]:
    """Set the CUDA determinism switches (call before the first cuBLAS call; safe on a CPU-only
    machine, where it sets the same flags). Returns what it set, for the run's summary."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    return {"CUBLAS_WORKSPACE_CONFIG": os.environ["CUBLAS_WORKSPACE_CONFIG"],
            "deterministic_algorithms": True, "warn_only": warn_only,
            "cudnn_deterministic": True, "cudnn_benchmark": False}


def cuda_default() -> None:
    """Undo :func:`cuda_deterministic`'s torch flags (for an A/B in one process)."""
    import torch

    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = False


@contextlib.contextmanager
def cpu_threads(device: "torch.device | str | None", threads: int = CPU_EDIT_THREADS) -> Iterator[None]:
    """Run an edit on the CPU with a fixed intra-op thread count (restored after). Measured: the
    tiny Step1X-Edit row in float32 gave 2 or 3 outputs in 8 fresh processes with 2 threads, and
    still 2 in 8 with MKL in strict mode; with 1 thread, one output in 8 of 8. Other devices (and
    an engine with no device, such as the null family's): nothing changes, no torch import."""
    if device is None or str(device).split(":")[0] != "cpu":
        yield
        return
    import torch

    before = torch.get_num_threads()
    if before == threads:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def deterministic_edit(device: "torch.device | str | None") -> Iterator[None]:
    """Around every engine call (:func:`step1x_batch.models.base.edit_prepared`, which the job's
    actors and the in-process pipelines share): on the CPU one intra-op thread
    (:func:`cpu_threads`), on CUDA the switches of :func:`cuda_deterministic` (set once per
    process, before the first edit; loading runs no cuBLAS call). Other devices: nothing."""
    if device is not None and str(device).split(":")[0] == "cuda":
        _cuda_once()
    with cpu_threads(device):
        yield


@functools.cache
def _cuda_once() -> None:
    cuda_deterministic()
