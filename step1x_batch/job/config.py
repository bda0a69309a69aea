"""Job configuration: one YAML file validated into typed objects, overridable from the command line.

Why a strict schema: a typo in a 10-hour GPU job's config (``sampling.num_step: 20``) must fail in
the first second with the key's path, not run silently with the default. Every section forbids
unknown keys; every error names the dotted path of the bad key. Credentials are refused outright:
they come from the environment or the cloud's own chain, never from a file that gets copied into
``runs/<run_id>/config.yaml``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import re
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from step1x_batch.errors import CODES, redact
from step1x_batch.rows.manifest import GUIDANCE_SCALE_RANGE, NUM_STEPS_RANGE, SIZE_LEVEL_RANGE
from step1x_batch.rows.sources import check_column_map
from step1x_batch.models import family_class, load_family
from step1x_batch.models.base import AdapterRef, EditParams, ModelFamily, ModelSpec
from step1x_batch.io.storage import StorageOptions, is_local
from step1x_batch.io.weights import WeightsSource

__all__ = [
    "ConfigError",
    "InputConfig",
    "OutputConfig",
    "ModelConfig",
    "SamplingConfig",
    "ResourcesConfig",
    "RuntimeConfig",
    "JobConfig",
    "load_config",
    "parse_config",
    "apply_overrides",
    "config_to_yaml",
    "default_run_id",
]

# Error types that a later run retries by default (transient: the same row may well succeed).
# Everything else (corrupt image, empty instruction, ...) is final for the same fingerprint.
# The transient ones of errors.TRANSIENT_CODES (a test holds the two equal).
DEFAULT_RETRY_ERROR_TYPES = ("read_failed", "write_failed", "edit_failed")

_CREDENTIAL_KEY = re.compile(
    r"(secret|password|passwd|token|credential|access_key|private_key|api_key|session_key)", re.I
)
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key path."""


def default_run_id() -> str:
    """A sortable UTC timestamp, unique to the second plus a short random tail."""
    now = _dt.datetime.now(_dt.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + os.urandom(2).hex()


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class InputConfig(_Section):
    """Where the manifest is: a Parquet / JSONL / CSV file, a folder of them, or a glob."""

    manifest: str
    storage: StorageOptions = Field(default_factory=StorageOptions)
    # An input image with more bytes is an error row (image_too_large), refused by its size
    # before reading where the size is known and while reading otherwise: no endless or huge
    # object (a device, a runaway upload) is ever held in a worker's memory.
    max_image_bytes: int = Field(256 * 1024 * 1024, ge=1)
    # Which manifest column is which part of a row, for a dataset used as published (GEdit-Bench:
    # ``{id: key, image: input_image_raw, instruction: instruction}``): the keys are the row
    # contract's names (``image`` takes one column or a list of columns, each holding URIs, image
    # bytes or ``datasets`` Image structs); unset, the manifest's own column names are the contract.
    columns: dict[str, str | list[str]] = Field(default_factory=dict)

    @field_validator("columns")
    @classmethod
    def _known_contract_names(cls, value: dict[str, Any]) -> dict[str, Any]:
        check_column_map(value)
        return value


class OutputConfig(_Section):
    """Where edited images, logs and run files go (``images/``, ``logs/<run_id>/``, ``runs/<run_id>/``)."""

    uri: str
    storage: StorageOptions | None = None  # None: the input's storage options
    format: Literal["png", "webp", "jpeg"] = "png"
    quality: int = Field(95, ge=1, le=100)  # webp / jpeg only
    # The results as a dataset besides the image files (``dataset/`` under the root): Parquet
    # shards with the edited image as a ``datasets`` Image feature and every manifest column, and
    # WebDataset tar shards. Rows go to shards by a hash of their id; a shard whose rows did not
    # change is not rewritten.
    dataset: bool = False
    webdataset: bool = False
    dataset_shards: int = Field(16, ge=1, le=65536)


class AdapterConfig(_Section):
    """One LoRA adapter merged into the denoiser at load (``model.adapters``, in order)."""

    uri: str  # a .safetensors file: local path or object-storage URI (staged per node like the weights)
    # W <- W + scale * (alpha / rank) * up @ down; without alpha in the file, alpha / rank = 1
    # (what diffusers and PEFT do): so scale 1.0 is the adapter as its authors' inference loads it.
    scale: float = Field(1.0, allow_inf_nan=False)
    format: Literal["auto", "peft", "diffusers", "kohya", "diffsynth", "step1x"] = "auto"
    _sha256: str | None = PrivateAttr(None)  # the file's content digest: pinned by the driver, not parsed

    @property
    def sha256(self) -> str | None:
        """The sha256 of the file's bytes once pinned (:func:`step1x_batch.io.weights.pin_adapters`)."""
        return self._sha256

    def pin(self, sha256: str) -> None:
        """Record the file's content digest, which names the adapter in the model id."""
        self._sha256 = sha256


# Keys an older config may still carry, and where they live now.
_MOVED_MODEL_KEYS = {
    "kind": "model.family",
    "version": "model.options.version",
    "posterior_mean": "model.options.posterior_mean",
}


class ModelConfig(_Section):
    """Which model family the actors load, from which weights. ``model_id`` enters every row's
    fingerprint; the family's ``options`` are validated by the family's own typed schema."""

    family: str = "step1x"  # a registry name (step1x, qwen-image-edit, null) or "package.module:Class"
    weights: str = ""  # local folder or object-storage URI in the family's published layout
    options: dict[str, Any] = Field(default_factory=dict)  # the family's own settings (model.options.*)
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    device: str = "auto"  # "auto": cuda when resources.num_gpus_per_actor > 0, else cpu
    max_batch_size: int = Field(4, ge=1, le=256)  # rows of one batch key per model forward
    # Same row, same weights, same hardware: same bytes, whatever shares its batch (the text
    # encoder and VAE take one row at a time, the denoiser a fixed batch shape). Off: faster on
    # short batches, but a row's last bits may move with its batch companions.
    batch_invariant: bool = True
    # GPU throughput: regional torch.compile of the denoiser's blocks (the first batch of each
    # shape pays the compile), and the attention kernel (auto: the fastest that runs on the
    # device, by a fixed rule so every actor on the same hardware picks the same one).
    compile: bool = False
    attention: Literal["auto", "cudnn", "flash", "efficient", "math"] = "auto"
    model_id: str | None = None  # None: derived by the family from everything that changes pixels
    storage: StorageOptions | None = None  # for object-storage weights; None: the input's
    cache_dir: str | None = None  # per-node staging folder (None: $STEP1X_WEIGHTS_CACHE or ~/.cache)
    checksums: str | None = None  # a sha256sum file (path or URI) the staged weights must match
    # LoRA adapters (PEFT / diffusers, kohya, DiffSynth, Step1X-Edit formats): merged into the
    # weights at load, their content hash and scale part of the model id.
    adapters: list[AdapterConfig] = Field(default_factory=list)
    # Named LoRA sets a row picks with its ``adapters`` column (null: the base model): each GPU
    # actor keeps the base weights and switches sets exactly (models/adapter_sets.py); a row of
    # set S gives the bytes a job with ``model.adapters: S`` gives.
    adapter_sets: dict[str, list[AdapterConfig]] = Field(default_factory=dict)

    @field_validator("adapter_sets")
    @classmethod
    def _set_names(cls, value: dict[str, list[AdapterConfig]]) -> dict[str, list[AdapterConfig]]:
        for name, adapters in value.items():
            if not _SET_NAME.match(name):
                raise ValueError(f"set name {name!r}: use letters, digits, '.', '_' and '-' (at most 64)")
            if not adapters:
                raise ValueError(f"set {name!r} names no adapter (a row without a set gets the base model)")
        return value

    # Where the switcher keeps the base value of every weight a set changes: on the model's device
    # (fastest switch; the changed weights' memory twice) or in host memory (pinned; a switch then
    # copies them over PCIe: about 1 s at full size, but no second copy on the GPU).
    adapter_base_copies: Literal["device", "host"] = "device"

    @model_validator(mode="after")
    def _sets_or_adapters(self) -> "ModelConfig":
        if self.adapter_sets and self.adapters:
            raise ValueError("give model.adapters (merged at load for every row) or model.adapter_sets "
                             "(a set per row), not both: put the shared adapters into every set")
        if self.adapter_sets and self.model_id:
            raise ValueError("model.model_id names one model, but each adapter set is a model of its own "
                             "(its rows carry its id): leave model.model_id unset with model.adapter_sets")
        return self

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for old, new in _MOVED_MODEL_KEYS.items():
                if old in data:
                    raise ValueError(f"model.{old} is now {new}")
        return data

    def family_class(self) -> type[ModelFamily]:
        return family_class(self.family)

    def spec(self, device: str = "cpu", adapters: tuple[AdapterRef, ...] = (),
             adapter_sets: tuple[tuple[str, tuple[AdapterRef, ...]], ...] = ()) -> ModelSpec:
        """The plain-data spec each task and actor builds its family from."""
        return ModelSpec(
            family=self.family, options=dict(self.options), weights=self.weights, dtype=self.dtype,
            device=device, max_batch_size=self.max_batch_size, model_id=self.model_id,
            batch_invariant=self.batch_invariant, compile=self.compile, attention=self.attention,
            adapters=adapters, adapter_sets=adapter_sets, adapter_base_copies=self.adapter_base_copies,
        )


class SamplingConfig(_Section):
    """Per-row defaults; a manifest column of the same name overrides them row by row. Unset
    values are the model family's own recipe (Step1X-Edit: 28 steps, guidance 6; Qwen-Image-Edit:
    40 steps, true CFG 4, negative prompt " ")."""

    # The same bounds apply to a manifest row's own num_steps / guidance_scale / size_level.
    num_steps: int | None = Field(None, ge=NUM_STEPS_RANGE[0], le=NUM_STEPS_RANGE[1])
    guidance_scale: float | None = Field(None, ge=GUIDANCE_SCALE_RANGE[0], le=GUIDANCE_SCALE_RANGE[1])
    size_level: int | None = Field(None, ge=SIZE_LEVEL_RANGE[0], le=SIZE_LEVEL_RANGE[1])
    negative_prompt: str | None = None
    # Seed policy: a row's `seed` column wins; otherwise seed = hash(id, seed_base). Changing
    # seed_base draws new noise for every seedless row (and so redoes them).
    seed_base: int = Field(0, ge=0, lt=2**31)

    def edit_params(self, family_defaults: EditParams) -> EditParams:
        """The per-row defaults: these settings where given, else the family's."""
        given = {k: v for k, v in self.model_dump(exclude={"seed_base"}).items() if v is not None}
        return dataclasses.replace(family_defaults, **given)


class ResourcesConfig(_Section):
    """How the job is laid out on Ray. Defaults suit one CPU laptop; cluster configs set GPUs."""

    ray_address: str | None = None  # None: $RAY_ADDRESS (set by `ray job submit`) or a new local Ray
    local_num_cpus: int | None = Field(None, ge=1)  # CPUs of a new local Ray (None: all)
    num_actors: int | None = Field(None, ge=1)  # fixed pool size; overrides min/max
    min_actors: int = Field(1, ge=1)
    max_actors: int | None = Field(None, ge=1)  # None: one per GPU (a model on CPU: 1; null: CPUs allow)
    num_gpus_per_actor: float = Field(0.0, ge=0.0)
    # Ray custom resources per edit actor, e.g. {edit_gpu: 1}: keeps the edit actors on the edit
    # worker group when a judge's group shares the cluster (cluster/kuberay/raycluster.yaml)
    custom_per_actor: dict[str, float] = Field(default_factory=dict)
    # A scheduling token, not a thread count (torch sizes its own thread pool). Fractional on a
    # small CPU machine: Ray Data backpressures the task stages when the actor holds whole CPUs.
    cpus_per_actor: float = Field(0.5, gt=0.0)
    reserved_cpus: float = Field(1.0, ge=0.0)  # CPU slots the actors never take (reads, writes)
    # Per read / prepare / write task. Keep it different from cpus_per_actor on a CPU-only
    # cluster: Ray fuses a task stage into the next actor stage when their resources match,
    # which would move image fetching and decoding into the edit actors.
    io_cpus_per_task: float = Field(0.25, gt=0.0)
    edit_batch_size: int = Field(16, ge=1)  # rows per actor call (split by batch key / model.max_batch_size)
    io_batch_size: int = Field(64, ge=1)  # rows per block and per prepare / write task call
    io_threads_per_task: int = Field(8, ge=1)  # concurrent object reads / writes inside one task
    max_tasks_in_flight_per_actor: int = Field(2, ge=1)  # prefetch depth: the GPU never waits
    # How often Ray re-runs a CPU task (normalise, prepare, write) whose worker died (killed for
    # memory, a crash in native code). Ray Data's own default is without end, which turns one
    # poisoned input into a job that never finishes; past this bound the job stops with the cause.
    task_max_retries: int = Field(3, ge=0)

    @model_validator(mode="after")
    def _pool_bounds(self) -> "ResourcesConfig":
        if self.max_actors is not None and self.max_actors < self.min_actors:
            raise ValueError(f"max_actors ({self.max_actors}) is below min_actors ({self.min_actors})")
        return self


class RuntimeConfig(_Section):
    """Run identity and policy."""

    run_id: str = Field(default_factory=default_run_id)
    max_error_fraction: float = Field(0.1, ge=0.0, le=1.0)  # of rows processed in this run
    max_pixels: int = Field(40_000_000, ge=1)  # larger inputs are error rows (decompression bombs)
    # Policy: an instruction longer than this is an error row, never silently truncated.
    max_instruction_chars: int = Field(1000, ge=1)
    log_part_rows: int = Field(1000, ge=1)  # a log part lands at least every this many rows ...
    log_part_seconds: float = Field(30.0, gt=0.0)  # ... or this often, whichever comes first
    retry_error_types: list[str] = Field(default_factory=lambda: list(DEFAULT_RETRY_ERROR_TYPES))
    # Error rows of these types are retried by this run as well (`run CONFIG --retry-errors T1,T2`,
    # e.g. after re-uploading missing images); final types stay final for every other run.
    # Formerly redo_error_types (still accepted).
    retry_error_types_this_run: list[str] = Field(default_factory=list)
    # Console: one progress line and the summary; Ray's own output goes to runs/<run_id>/ray.log.
    # True (`-v`): Ray's logs (and, with progress_bars, Ray Data's bars) on the console as well.
    verbose: bool = False
    progress_bars: bool = True  # Ray Data's own progress bars, shown only when verbose
    progress_seconds: float = Field(30.0, gt=0.0)  # progress line interval when not on a terminal
    # One writer per output root: a lease object renewed while the run lives; a lease not
    # renewed for lease_ttl_s (a killed driver) is taken over. allow_unlocked: run on a store
    # without conditional writes (nothing then stops two runs writing the same root).
    lease_ttl_s: float = Field(120.0, ge=1.0)
    allow_unlocked: bool = False
    report_max_rows: int = Field(60, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        """``redo_error_types``, the old name of ``retry_error_types_this_run``, is still accepted."""
        if isinstance(data, dict) and "redo_error_types" in data:
            if "retry_error_types_this_run" in data:
                raise ValueError("runtime.redo_error_types is the old name of runtime.retry_error_types_this_run; "
                                 "set only one of them")
            data = {("retry_error_types_this_run" if k == "redo_error_types" else k): v for k, v in data.items()}
        return data

    @field_validator("retry_error_types_this_run")
    @classmethod
    def _known_error_types(cls, value: list[str]) -> list[str]:
        unknown = [v for v in value if v not in CODES]
        if unknown:
            raise ValueError(f"unknown error type(s) {unknown}; error types are {sorted(CODES)}")
        return value

    def retried_error_types(self) -> list[str]:
        """The error types this run redoes: the transient ones and those asked for this run."""
        return sorted(set(self.retry_error_types) | set(self.retry_error_types_this_run))

    @field_validator("run_id")
    @classmethod
    def _safe_run_id(cls, value: str) -> str:
        if not _RUN_ID.match(value):
            raise ValueError("use letters, digits, '.', '_' and '-' only (it names folders)")
        return value


class JobConfig(_Section):
    """A whole dataset-editing job."""

    input: InputConfig
    output: OutputConfig
    model: ModelConfig
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    # Convenience views used by the runner.
    def output_storage(self) -> StorageOptions:
        return self.output.storage or self.input.storage

    def model_storage(self) -> StorageOptions:
        return self.model.storage or self.input.storage

    def device(self) -> str:
        if self.model.device != "auto":
            return self.model.device
        return "cuda" if self.resources.num_gpus_per_actor > 0 else "cpu"

    def model_spec(self) -> ModelSpec:
        return self.model.spec(self.device(), self.adapter_refs(), tuple(self.adapter_set_refs().items()))

    def family(self) -> ModelFamily:
        """The model family this job edits with; ``family().model_id()`` is the one route to the
        model id written into fingerprints (docs/architecture.md). Cheap: no weights are read."""
        return load_family(self.model_spec())

    def adapter_refs(self) -> tuple[AdapterRef, ...]:
        """``model.adapters`` with the sha256 of each file's bytes, so the model id changes when an
        adapter's content changes. The driver pins the digests first (parsing stages nothing)."""
        unpinned = [i for i, a in enumerate(self.model.adapters) if a.sha256 is None]
        if unpinned:
            raise RuntimeError(f"model.adapters[{unpinned[0]}] has no content digest yet: pin the adapters "
                               "(step1x_batch.io.weights.pin_adapters) before deriving the model id")
        return tuple(AdapterRef(a.uri, a.scale, a.format, a.sha256) for a in self.model.adapters)

    def adapter_set_refs(self) -> dict[str, tuple[AdapterRef, ...]]:
        """``model.adapter_sets`` with each file's pinned content digest, by set name."""
        out = {}
        for name, adapters in self.model.adapter_sets.items():
            unpinned = [i for i, a in enumerate(adapters) if a.sha256 is None]
            if unpinned:
                raise RuntimeError(f"model.adapter_sets.{name}[{unpinned[0]}] has no content digest yet: pin "
                                   "the adapters (step1x_batch.io.weights.pin_adapters) before deriving model ids")
            out[name] = tuple(AdapterRef(a.uri, a.scale, a.format, a.sha256) for a in adapters)
        return out

    def set_model_ids(self) -> dict[str, str]:
        """The model id each adapter set's rows are edited with (the id a job with ``model.adapters``
        set to that set has), by set name: in those rows' fingerprints."""
        base = self.model.spec(self.device())
        return {name: load_family(dataclasses.replace(base, adapters=refs)).model_id()
                for name, refs in self.adapter_set_refs().items()}

    def edit_defaults(self) -> EditParams:
        """Per-row defaults: ``sampling.*`` where set, else the model family's recipe."""
        return self.sampling.edit_params(self.model.family_class().defaults)

    def weights_source(self) -> WeightsSource:
        """Where the weights are and how to stage them on a node (object storage -> local cache)."""
        return WeightsSource(
            uri=self.model.weights, storage=self.model_storage(), cache_dir=self.model.cache_dir,
            checksums=self.model.checksums,
        )


# ---------------------------------------------------------------------------------------------
# Loading


def _absolute(uri: str, base: Path) -> str:
    """Plain local paths become absolute against ``base`` (Ray workers do not share the driver's
    working directory); a URI with a scheme (``file://``, ``s3://``) is kept as written."""
    if not uri or not is_local(uri) or "://" in uri:
        return uri
    path = Path(os.path.expanduser(uri))
    return str(path if path.is_absolute() else (base / path).resolve())


def _find_credentials(raw: Any, path: str = "") -> tuple[str, str] | None:
    """(key path, what) of the first credential in a raw config: a credential-named key, or a URI
    carrying one (``user:password@``, a signed query)."""
    if isinstance(raw, dict):
        items = [(f"{path}.{k}" if path else str(k), k, v) for k, v in raw.items()]
    elif isinstance(raw, list):
        items = [(f"{path}[{i}]", None, v) for i, v in enumerate(raw)]
    else:
        if isinstance(raw, str) and "://" in raw and redact(raw) != raw:
            return path, "a URI carrying credentials (user:password@ or a signed query) is"
        return None
    for here, key, value in items:
        if key is not None and _CREDENTIAL_KEY.search(str(key)):
            return here, "credentials are"
        found = _find_credentials(value, here)
        if found:
            return found
    return None


def _format_errors(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        loc = ".".join([prefix] * bool(prefix) + [str(p) for p in e["loc"]]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(msg if msg.startswith(loc) else f"{loc}: {msg}")
    return "invalid config:\n  " + "\n  ".join(lines)


def _validate_family(model: ModelConfig) -> None:
    """``model.family`` names an importable family; ``model.options`` fit its schema (stored back
    with defaults filled, so the run's config snapshot shows every option)."""
    try:
        cls = model.family_class()
    except ValueError as e:
        raise ConfigError(f"invalid config:\n  model.family: {e}") from None
    try:
        options = cls.Options.model_validate(model.options)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, "model.options")) from None
    model.options = options.model_dump(mode="json")
    if model.adapters and not cls.supports_adapters:
        raise ConfigError(f"invalid config:\n  model.adapters: family {model.family!r} does not take LoRA adapters")
    if model.adapter_sets and not cls.supports_adapters:
        raise ConfigError(f"invalid config:\n  model.adapter_sets: family {model.family!r} does not take LoRA adapters")
    if cls.needs_weights and not model.weights:
        raise ConfigError(
            f"invalid config:\n  model.weights: required for family {model.family!r} (a folder or object-storage URI)"
        )


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides; values are YAML scalars (``20``, ``true``, ``null``, ``[a]``)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected KEY.PATH=VALUE, e.g. sampling.num_steps=20")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}: cannot parse override value {text!r}: {e}") from None
        node = raw
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(parts[: i + 1])}: is a value, cannot set {key}")
            node = child
        node[parts[-1]] = value
    return raw


def parse_config(raw: Any, base_dir: str | os.PathLike | None = None) -> JobConfig:
    """Validate a raw mapping (from YAML) into a JobConfig; local paths resolved against base_dir."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid config: the top level must be a mapping, got {type(raw).__name__}")
    cred = _find_credentials(raw)
    if cred:
        raise ConfigError(
            f"{cred[0]}: {cred[1]} not accepted in a config file; provide them through the "
            "environment (AWS_ACCESS_KEY_ID, ...) or the cloud's credential chain"
        )
    try:
        cfg = JobConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e)) from None
    _validate_family(cfg.model)
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    cfg.input.manifest = _absolute(cfg.input.manifest, base)
    cfg.output.uri = _absolute(cfg.output.uri, base)
    cfg.model.weights = _absolute(cfg.model.weights, base)
    for adapter in cfg.model.adapters:
        adapter.uri = _absolute(adapter.uri, base)
    if cfg.model.cache_dir:
        cfg.model.cache_dir = _absolute(cfg.model.cache_dir, base)
    return cfg


def read_raw_config(path: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """A YAML config file as a mapping, ``--set`` overrides applied (not validated yet)."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return apply_overrides(raw, overrides)


def load_config(path: str, overrides: Sequence[str] = ()) -> JobConfig:
    """Read a YAML config, apply ``--set`` overrides, validate.

    Relative local paths in the file are taken relative to the current working directory (the
    repository root for ``ray job submit --working-dir .``), then made absolute.
    """
    return parse_config(read_raw_config(path, overrides))


def config_to_yaml(cfg: JobConfig) -> str:
    """The snapshot written to ``runs/<run_id>/config.yaml`` (resolved run_id and paths)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
