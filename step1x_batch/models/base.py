"""The model-family interface: everything the Ray job knows about a model.

A family is one folder under ``step1x_batch/models/`` holding one :class:`ModelFamily` subclass,
plus one entry in the registry (``step1x_batch.models.FAMILIES``). The job reaches a family only
through this module, split by where the work runs:

* ``prepare`` (CPU tasks, beside the image reads): one row's decoded images -> :class:`Prepared`,
  the ready arrays (images at the model size, VLM pixel values, token ids, rope positions) and a
  batch key. All resizing and tokenisation happens here, so the GPU never waits for it.
* ``load`` (once per GPU actor): the weights -> an :class:`Engine`, whose ``edit`` takes rows that
  share one batch key and returns model-size pixels.
* ``finish`` (CPU write tasks): model-size pixels -> the pixels to encode (resized back to the
  input's size for families whose reference does that).

Nothing here imports Ray, torch or any job module (only the foundation, :mod:`step1x_batch.errors`):
model packages run on GPU machines that have only torch and transformers.
"""

from __future__ import annotations

import abc
import fnmatch
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Protocol, Sequence

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import PydanticUndefined

from step1x_batch.errors import (  # noqa: F401 - the codes a family reports, named here for families
    INVALID_INSTRUCTION,
    MODEL_ERROR_CODES,
    NON_FINITE_OUTPUT,
    TOO_MANY_IMAGES,
    UNSUPPORTED_SIZE,
)
from step1x_batch.models.determinism import deterministic_edit


@dataclass(frozen=True)
class EditParams:
    """Every per-row parameter that changes pixels (so each one is in the row fingerprint)."""

    num_steps: int = 28
    guidance_scale: float = 6.0
    size_level: int = 1024
    negative_prompt: str = ""
    # Conditioning interpolation (expression intensity, say): the row's conditioning is
    # lerp(e(blend_instruction), e(instruction), blend_scale) over the instruction's tokens, so
    # 0 is exactly the blend_instruction's edit, 1 exactly the instruction's, > 1 exaggerates.
    blend_instruction: str | None = None
    blend_scale: float = 1.0


@dataclass
class EditRequest:
    """One row as the family's ``prepare`` sees it: decoded RGB uint8 (H, W, 3) images, in order."""

    images: list[np.ndarray]
    instruction: str
    seed: int
    params: EditParams = field(default_factory=EditParams)


class RowFailure(Exception):
    """A failure of one row (never of its batch), the model side's one exception name.

    A ``RowFailure(code, message)`` raised by a family's ``prepare`` or reported by its ``edit``
    becomes, on the job side, a :class:`step1x_batch.errors.RowError` and an ``error`` row with
    ``error_type=code`` and ``error_message=message`` (docs/architecture.md, the family interface).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def __reduce__(self):
        return (type(self), (self.code, self.message))


_META_KEY = "step1x_batch.prepared"


@dataclass
class Prepared:
    """One row ready for the GPU: arrays plus small JSON values, and the batch key.

    Rows with equal ``key`` can run in one forward pass. ``width`` x ``height`` is the size the
    engine returns pixels at. Serialised as safetensors (arrays only, no pickle) to cross stages.
    """

    key: str
    width: int
    height: int
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        from safetensors.numpy import save

        head = json.dumps({"key": self.key, "width": self.width, "height": self.height, "meta": self.meta})
        arrays = {k: np.ascontiguousarray(v) for k, v in self.arrays.items()}
        return save(arrays, metadata={_META_KEY: head})

    @classmethod
    def from_bytes(cls, data: bytes) -> "Prepared":
        from safetensors.numpy import load

        n = int.from_bytes(data[:8], "little")  # safetensors framing: header length, JSON header
        head = json.loads(json.loads(data[8 : 8 + n])["__metadata__"][_META_KEY])
        return cls(head["key"], int(head["width"]), int(head["height"]), dict(load(data)), head["meta"])


@dataclass
class EditOutput:
    """One row's result: RGB uint8 (height, width, 3) at the model size, or an error."""

    image: np.ndarray | None
    edit_ms: float = 0.0  # this row's share of its batch's time
    error_type: str | None = None
    error_message: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)  # the batch's phases, if the engine says
    batch_size: int = 0  # rows in the forward pass that made it


class Engine(Protocol):
    """What a GPU actor holds: loaded once, called with rows that share one batch key."""

    def edit(self, rows: Sequence[Prepared]) -> list[EditOutput]:
        """One output per row, in order; a per-row problem is an output with ``error_type``."""
        ...


_PIXELS = "changes_pixels"  # the json_schema_extra key of an option's mark


def option(default: Any = PydanticUndefined, *, pixels: bool, **kwargs: Any) -> Any:
    """A field of a family's ``Options``, marked as changing pixels or not.

    The model id (hence every row's fingerprint) holds exactly the fields marked ``pixels=True``,
    so a new option must say which it is (tests/test_model_identity.py fails on an unmarked one
    in a registered family). ``kwargs`` are pydantic ``Field``'s.
    """
    extra = {**(kwargs.pop("json_schema_extra", None) or {}), _PIXELS: bool(pixels)}
    return Field(default, json_schema_extra=extra, **kwargs)


def pixel_marks(options: type[BaseModel]) -> dict[str, bool | None]:
    """Each field of an options class -> its mark: True (changes pixels), False, None (unmarked)."""
    marks: dict[str, bool | None] = {}
    for name, info in options.model_fields.items():
        extra = info.json_schema_extra
        marks[name] = extra.get(_PIXELS) if isinstance(extra, dict) else None
    return marks


def unmarked_options(options: type[BaseModel]) -> list[str]:
    """The fields of an options class that do not say whether they change pixels."""
    return [name for name, mark in pixel_marks(options).items() if mark is None]


class NoOptions(BaseModel):
    """A family without options of its own."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class AdapterRef:
    """One LoRA adapter as the job names it: where it is, how strongly, in which key format, and
    the sha256 of its bytes (so the model id changes when the file or the scale changes)."""

    uri: str
    scale: float = 1.0
    format: str = "auto"  # auto | peft | diffusers | kohya | diffsynth | step1x
    sha256: str = ""


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter as a family's ``load`` merges it: a local safetensors file, its multiplier and
    its key format (see :mod:`step1x_batch.models.lora`)."""

    path: Path
    scale: float = 1.0
    format: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        object.__setattr__(self, "scale", float(self.scale))
        object.__setattr__(self, "format", normalized_format(self.format))


# Adapter key formats (``auto`` tells them apart key by key); ``diffusers`` names the PEFT layout.
ADAPTER_FORMATS = ("auto", "peft", "kohya", "diffsynth", "step1x")
ADAPTER_FORMAT_ALIASES = {"diffusers": "peft"}


def normalized_format(fmt: str) -> str:
    fmt = str(fmt).strip().lower()
    return ADAPTER_FORMAT_ALIASES.get(fmt, fmt)


@dataclass(frozen=True)
class ModelSpec:
    """How to build a family: plain data, so it can travel to Ray tasks and actors."""

    family: str  # a registry name or "package.module:Class"
    options: Mapping[str, Any] = field(default_factory=dict)  # validated by the family's Options
    weights: str = ""  # the weights' URI as configured (it names the model; the job stages it)
    dtype: str = "bfloat16"
    device: str = "cpu"
    max_batch_size: int = 4  # rows per forward (the fixed forward batch when batch invariant)
    model_id: str | None = None  # an explicit identity; None: the family derives one
    # A row's pixels do not depend on which rows share its batch (at some cost in padding); off,
    # outputs may differ in the last bits with the batching, so it is part of the model id.
    batch_invariant: bool = True
    compile: bool = False  # regional torch.compile of the denoiser's blocks
    attention: str = "auto"  # the SDPA kernel: auto | cudnn | flash | efficient | math
    adapters: tuple[AdapterRef, ...] = ()  # LoRA adapters merged into the denoiser at load, in order
    # Named LoRA sets the actors switch between per row (not part of the base model id: each set's
    # rows carry the id of the base with that set's adapters)
    adapter_sets: tuple[tuple[str, tuple[AdapterRef, ...]], ...] = ()
    adapter_base_copies: str = "device"  # device | host: where the switcher keeps the base weights


Preparer = Callable[[EditRequest], Prepared]


@dataclass(frozen=True)
class IdParts:
    """The parts of a model id every family has besides its options (derived once, in
    :meth:`ModelFamily.model_id`; a family only arranges them around its pixel options)."""

    dtype: str
    batch_variant: bool  # ``batch_invariant`` off: outputs may differ in the last bits with the batching
    weights: str  # the weights' URI, without a trailing slash
    adapters: str  # :func:`adapters_id`: "" without adapters


class ModelFamily(abc.ABC):
    """One model family. Instances are cheap (no weights): the job makes one in every process."""

    name: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = NoOptions
    defaults: ClassVar[EditParams] = EditParams()
    # Files the CPU ``prepare`` needs from the weights (glob patterns relative to the weights
    # folder: tokenizer, processor config); the job stages only these on CPU nodes.
    prepare_files: ClassVar[tuple[str, ...]] = ()
    needs_weights: ClassVar[bool] = True  # False: ``model.weights`` may be empty
    # Glob patterns (relative to the weights folder) each of which some file must match: checked
    # on the driver before anything starts, so a wrong folder fails in seconds, not in every actor.
    required_files: ClassVar[tuple[str, ...]] = ()
    supports_adapters: ClassVar[bool] = False  # True: ``load`` merges LoRA adapters
    # True: the engine is cheap to hold many times (on CPU-only clusters the job then runs a copy
    # per free CPU slot instead of one copy that uses every core).
    lightweight: ClassVar[bool] = False

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self.options = self.Options.model_validate(dict(spec.options))

    @property
    def max_images(self) -> int:
        """How many input images a row may have."""
        return 1

    def model_id(self) -> str:
        """The model identity folded into every row's fingerprint: every setting that changes
        pixels (weights, dtype, the options marked ``pixels=True``, adapters), so changing one
        redoes the rows it affects; ``spec.model_id`` overrides it."""
        if self.spec.model_id:
            return self.spec.model_id
        parts = IdParts(self.spec.dtype, not self.spec.batch_invariant, self.spec.weights.rstrip("/"),
                        adapters_id(self.spec.adapters))
        return self.format_model_id(self.pixel_options(), parts)

    def pixel_options(self) -> dict[str, Any]:
        """The options that change pixels, by name (an unmarked field counts as one: a plugin
        family that marks nothing keeps every option in its id)."""
        marks = pixel_marks(self.Options)
        return {name: getattr(self.options, name) for name, mark in marks.items() if mark is not False}

    def format_model_id(self, pixels: Mapping[str, Any], parts: IdParts) -> str:
        """Arrange a model id from the pixel options and the common parts. This default (a
        family's name, dtype, its pixel options as JSON, weights, adapters) is overridden by
        families whose id format predates it: ids must stay byte-identical across releases."""
        options = json.dumps(self.options.model_dump(mode="json", include=set(pixels)), sort_keys=True,
                             separators=(",", ":"))
        variant = ":batch-variant" if parts.batch_variant else ""
        return f"{self.name}:{parts.dtype}:{options}{variant}:{parts.weights}{parts.adapters}"

    def weights_license(self) -> str:
        """The weights' licence as a Hugging Face licence identifier (the pairs dataset card's
        ``license``); "other" unless the family knows its weights' terms."""
        return "other"

    def weights_problem(self, files: Mapping[str, int]) -> str | None:
        """What a weights listing (``{relative path: size}``) lacks for ``load``, as the end of a
        sentence ("has no file matching ..."); None when the files ``load`` needs are there."""
        missing = [p for p in self.required_files if not any(fnmatch.fnmatchcase(f, p) for f in files)]
        return f"has no file matching {', '.join(missing)}" if missing else None

    @abc.abstractmethod
    def preparer(self, folder: Path | None) -> Preparer:
        """Build the CPU ``prepare`` (once per worker process); ``folder`` holds ``prepare_files``."""

    @abc.abstractmethod
    def load(self, folder: Path | None, device: str, adapters: Sequence[AdapterSpec] = ()) -> Engine:
        """Load the weights from a local ``folder`` onto ``device`` (once per actor), with the
        ``adapters`` merged into them (families with ``supports_adapters``)."""

    def finish(self, image: np.ndarray, input_sizes: Sequence[tuple[int, int]]) -> np.ndarray:
        """Model-size pixels -> the pixels to write; ``input_sizes`` are the inputs' (width, height)."""
        return image

    def adapter_target(self, engine: Engine) -> Any:
        """The module LoRA adapters merge into (the denoiser), for switching adapter sets on a
        loaded engine (:mod:`step1x_batch.models.adapter_sets`); families with ``supports_adapters``."""
        raise NotImplementedError(f"the {self.name} family takes no LoRA adapters")


def adapters_id(adapters: Sequence[AdapterRef]) -> str:
    """The adapters' part of a model id: content hash, scale and format of each, in order."""
    if not adapters:
        return ""
    parts = (f"{a.sha256[:16]}x{float(a.scale)!r}:{normalized_format(a.format)}" for a in adapters)
    return "+lora[" + ",".join(parts) + "]"


def edit_prepared(engine: Engine, rows: Sequence[Prepared], max_batch_size: int) -> list[EditOutput]:
    """Run rows through an engine in batches of one key and at most ``max_batch_size`` rows.

    Rows keep their order in the result. Grouping is by key only (a stable partition), so the same
    rows give the same batches whatever order they came in within a key.
    """
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row.key, []).append(i)
    out: list[EditOutput | None] = [None] * len(rows)
    for idx in groups.values():
        for start in range(0, len(idx), max_batch_size):
            chunk = idx[start : start + max_batch_size]
            t0 = time.perf_counter()
            with deterministic_edit(getattr(engine, "device", None)):  # same bytes across processes
                results = list(engine.edit([rows[i] for i in chunk]))
            if len(results) != len(chunk):
                raise RuntimeError(f"engine returned {len(results)} outputs for {len(chunk)} rows")
            per_row = (time.perf_counter() - t0) * 1e3 / len(chunk)
            for i, r in zip(chunk, results):
                r.edit_ms = r.edit_ms or per_row
                r.batch_size = len(chunk)
                out[i] = r
    return out  # type: ignore[return-value]




# --- in-process use (the families' Python pipelines) ---------------------------------------------


@dataclass
class EditResult:
    """One row edited in-process: ``image`` (H, W, 3) uint8 (the family's finished pixels), or
    None with an error; ``width`` x ``height`` is the size the model ran at."""

    image: np.ndarray | None
    width: int
    height: int
    seed: int
    batch_size: int
    timings_ms: dict[str, float] = field(default_factory=dict)
    error_type: str | None = None
    error_message: str | None = None

    def to_pil(self) -> Image.Image:
        if self.image is None:
            raise ValueError(f"no image: {self.error_type}: {self.error_message}")
        return Image.fromarray(self.image)


def as_rgb_array(image: np.ndarray | Image.Image) -> np.ndarray:
    """A PIL image or an RGB uint8 array as an (H, W, 3) uint8 array."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 array (H, W, 3), got {image.dtype} {image.shape}")
    return image
