"""Safe weight loading: safetensors only, modules built on meta, weights assigned in place.

Peak host memory stays near one copy of the weights: tensors are read one at a time from the
file, converted to the compute dtype on the target device, and assigned to a module that never
allocated its own random parameters.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Iterable, Mapping

import torch
from safetensors import safe_open
from torch import nn

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
FP8_DTYPES = tuple(
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
)


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` / ``"bf16"`` / ``"float32"`` / ... (or a torch dtype) as a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use bfloat16, float16 or float32")
    return names[dtype]


class WeightsError(ValueError):
    """A weights file that cannot be used: says which file and which keys."""


def read_header(path: str | os.PathLike) -> dict:
    """Validate a safetensors file's framing and return its header (tensor name -> dtype/shape/offsets).

    Refuses pickle checkpoints outright and reports a truncated or corrupt file by name instead of
    failing later inside the deserializer.
    """
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise WeightsError(f"{path}: refusing to load a pickle checkpoint; only .safetensors files are loaded")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(9)
            (n,) = struct.unpack("<Q", head[:8]) if len(head) >= 8 else (0,)
            if len(head) < 9 or n > size - 8 or head[8:9] != b"{":
                if head[:2] == b"PK" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
                    raise WeightsError(f"{path}: this is a pickle/zip checkpoint, not safetensors; refusing to load it")
                if len(head) < 9:
                    raise WeightsError(f"{path}: file is {size} bytes, too short to be safetensors (truncated?)")
                raise WeightsError(f"{path}: not a safetensors file, or its header is truncated")
            f.seek(8)
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such weights file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WeightsError(f"{path}: corrupt safetensors header ({e})") from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = max((v["data_offsets"][1] for v in tensors.values()), default=0)
    if 8 + n + end != size:
        raise WeightsError(
            f"{path}: expected {8 + n + end} bytes from its header, found {size}; the file is truncated or corrupt"
        )
    return tensors


DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"  # diffusers' name; sharded: -0000K-of-0000N


def component_files(folder: Path, *, any_safetensors: bool = False) -> list[Path]:
    """The safetensors of one diffusers component folder: the shards its index names, else the
    single ``diffusion_pytorch_model.safetensors`` (else, with ``any_safetensors``, every
    ``*.safetensors`` there). Pickle checkpoints are refused by name, before anything reads them."""
    index = folder / f"{DIFFUSERS_WEIGHTS}.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise WeightsError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
        bad = [n for n in names if not isinstance(n, str) or Path(n).name != n or not n.endswith(".safetensors")]
        if not names or bad:
            raise WeightsError(f"{index}: expected shard file names in this folder, found {names}")
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise WeightsError(f"{folder}: shards named by {index.name} are missing: {', '.join(missing)}")
        return [folder / n for n in names]
    if (folder / DIFFUSERS_WEIGHTS).is_file():
        return [folder / DIFFUSERS_WEIGHTS]
    others = sorted(folder.glob("*.safetensors"))
    if any_safetensors and others:
        return others
    if not folder.is_dir():
        raise WeightsError(f"{folder}: no such folder")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise WeightsError(f"{folder}: only pickle checkpoints ({', '.join(pickles)}); refusing to load "
                           "them, convert them to safetensors")
    found = ", ".join(p.name for p in others) or "none"
    raise WeightsError(f"{folder}: no .safetensors weights ({DIFFUSERS_WEIGHTS} or its shards), found {found}")


def count_indexed(keys: Iterable[str], prefix: str) -> int:
    """How many numbered children (``prefix{i}.``) a state dict holds, e.g. blocks of a ModuleList."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(indices) + 1 if indices else 0


class ShapeOnly:
    """A stand-in tensor with only ``.shape`` and ``.dtype``, so sizes can be inferred from a header."""

    def __init__(self, shape: Iterable[int], dtype: str):
        self.shape = torch.Size(shape)
        self.dtype = dtype


def header_shapes(header: Mapping[str, dict]) -> dict[str, ShapeOnly]:
    return {k: ShapeOnly(v["shape"], v["dtype"]) for k, v in header.items()}


def check_keys(
    module: nn.Module,
    shapes: Mapping[str, torch.Size],
    path: str | os.PathLike,
    prefix: str = "",
    others: tuple[str, ...] = (),
) -> None:
    """Raise one error naming every missing, unexpected and wrong-shape key.

    Keys under ``prefix`` belong to ``module``, except those under ``others`` (other modules
    stored in the same file).
    """
    expected = {prefix + k: v.shape for k, v in module.state_dict().items()}
    got = {k: s for k, s in shapes.items() if k.startswith(prefix) and not k.startswith(others)}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(
        f"{k}: file {tuple(got[k])} vs model {tuple(expected[k])}"
        for k in set(got) & set(expected)
        if tuple(got[k]) != tuple(expected[k])
    )
    if missing or unexpected or wrong:
        parts = [f"{path}: weights do not match the model"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if items:
                parts.append(f"{title} ({len(items)}): " + ", ".join(items))
        raise WeightsError("; ".join(parts))


def load_into(
    module: nn.Module,
    path: str | os.PathLike,
    *,
    prefix: str = "",
    others: tuple[str, ...] = (),
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    strict: bool = True,
    header: Mapping[str, dict] | None = None,
) -> nn.Module:
    """Assign the tensors under ``prefix`` in ``path`` to a (meta-built) ``module``.

    Floating-point tensors are cast to ``dtype`` (fp8 storage is upcast to it: computing in fp8 is not
    what the release does), except parameters the module itself declares in fp8 (kept in fp8 to
    halve their memory); ``strict`` refuses any key mismatch.
    """
    header = read_header(path) if header is None else header
    shapes = {k: torch.Size(v["shape"]) for k, v in header.items()}
    if strict:
        check_keys(module, shapes, path, prefix, others)
    state = {}
    expected = module.state_dict()
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        for key, target in expected.items():
            if prefix + key not in shapes:
                continue
            state[key] = _as_stored(f.get_tensor(prefix + key), target, dtype)
    return _assign(module, state, strict, path)


def _as_stored(t: torch.Tensor, target: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A file tensor in the dtype its parameter keeps: fp8 where the module declares fp8 storage
    (see layers.Fp8Linear), else floating point in ``dtype`` (fp8 files upcast through float32)."""
    if target.dtype in FP8_DTYPES:
        return t.to(target.dtype)
    if dtype is not None and t.is_floating_point():
        return t.to(dtype) if t.dtype not in FP8_DTYPES else t.to(torch.float32).to(dtype)
    return t


def _assign(module: nn.Module, state: dict[str, torch.Tensor], strict: bool, name) -> nn.Module:
    module.load_state_dict(state, strict=strict, assign=True)
    left = [n for n, p in list(module.named_parameters()) + list(module.named_buffers()) if p.is_meta]
    if left:
        raise WeightsError(f"{name}: no weights for {', '.join(left)}")
    return module


def load_files_into(
    module: nn.Module,
    paths: Iterable[str | os.PathLike],
    *,
    name: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    strict: bool = True,
) -> nn.Module:
    """:func:`load_into` over several safetensors files (the shards of one sharded checkpoint).

    Every file's header is validated first and the union of their keys is checked at once, so a
    bad checkpoint is refused with one message (under ``name``, the folder, say) before any
    tensor is read. A key stored in two shards is refused too.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise WeightsError(f"{name or 'weights'}: no safetensors files to load")
    name = name if name is not None else (paths[0] if len(paths) == 1 else paths[0].parent)
    headers = {p: read_header(p) for p in paths}
    owner: dict[str, Path] = {}
    duplicated = []
    for p, header in headers.items():
        for k in header:
            if k in owner:
                duplicated.append(f"{k} ({owner[k].name}, {p.name})")
            owner.setdefault(k, p)
    if duplicated:
        raise WeightsError(f"{name}: keys stored in more than one shard: {', '.join(sorted(duplicated))}")
    shapes = {k: torch.Size(h[k]["shape"]) for p, h in headers.items() for k in h}
    if strict:
        check_keys(module, shapes, name)
    expected = module.state_dict()
    state = {}
    for p in paths:
        wanted = [k for k in expected if owner.get(k) == p]
        if not wanted:
            continue
        with safe_open(str(p), framework="pt", device=str(device)) as f:
            for key in wanted:
                state[key] = _as_stored(f.get_tensor(key), expected[key], dtype)
    return _assign(module, state, strict, name)
