"""Job configuration: one YAML file validated into typed objects, overridable from the command line.

Why a strict schema: a typo in a 10-hour GPU job's config (``sampling.num_step: 20``) must fail in
the first second with the key's path, not run silently with the default. Every section forbids
unknown keys; every error names the dotted path of the bad key. Credentials are refused outright:
they come from the environment or the cloud's own chain, never from a file that gets copied into
``runs/<run_id>/config.yaml``.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from pathlib import Path
from typing import Any, Literal, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from step1x_batch.editor import EditParams, EditorSpec
from step1x_batch.errors import redact
from step1x_batch.storage import StorageOptions

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
DEFAULT_RETRY_ERROR_TYPES = ("read_failed", "write_failed", "edit_failed")

_CREDENTIAL_KEY = re.compile(
    r"(secret|password|passwd|token|credential|access_key|private_key|api_key|session_key)", re.I
)
_PLUGIN = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


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


class OutputConfig(_Section):
    """Where edited images, logs and run files go (``images/``, ``logs/<run_id>/``, ``runs/<run_id>/``)."""

    uri: str
    storage: StorageOptions | None = None  # None: the input's storage options
    format: Literal["png", "webp", "jpeg"] = "png"
    quality: int = Field(95, ge=1, le=100)  # webp / jpeg only


class ModelConfig(_Section):
    """Which editor the actors load. ``model_id`` enters every row's fingerprint."""

    kind: str = "step1x"  # "step1x" | "null" | "package.module:Factory" (a plug-in editor, called with the spec)
    weights: str = ""  # local folder or object-storage URI in the official release layout
    version: Literal["v1.0", "v1.1"] | None = None  # None: detected from the weights
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    device: str = "auto"  # "auto": cuda when resources.num_gpus_per_actor > 0, else cpu
    posterior_mean: bool = False
    max_batch_size: int = Field(4, ge=1, le=256)  # rows of one size per model forward
    model_id: str | None = None  # None: derived from kind, weights, version, dtype, posterior_mean
    storage: StorageOptions | None = None  # for object-storage weights; None: the input's
    cache_dir: str | None = None  # per-node staging folder (None: $STEP1X_WEIGHTS_CACHE or ~/.cache)
    checksums: str | None = None  # a sha256sum file (path or URI) the staged weights must match

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, value: str) -> str:
        if value in ("step1x", "null") or _PLUGIN.match(value):
            return value
        raise ValueError("use 'step1x', 'null' or 'package.module:Factory'")

    @model_validator(mode="after")
    def _weights_required(self) -> "ModelConfig":
        if self.kind == "step1x" and not self.weights:
            raise ValueError("weights: required when kind is 'step1x' (a folder or object-storage URI)")
        return self

    def resolved_model_id(self) -> str:
        """The model identity written into fingerprints: every model setting that changes pixels."""
        if self.model_id:
            return self.model_id
        if self.kind == "null":
            return "null"
        if self.kind != "step1x":
            return f"{self.kind}:{self.weights.rstrip('/')}" if self.weights else self.kind
        mode = "mean" if self.posterior_mean else "sample"
        return f"step1x-edit:{self.version or 'auto'}:{self.dtype}:{mode}:{self.weights.rstrip('/')}"


class SamplingConfig(_Section):
    """Per-row defaults; a manifest column of the same name overrides them row by row."""

    num_steps: int = Field(28, gt=0, le=1000)
    guidance_scale: float = Field(6.0, ge=0.0, le=100.0)
    size_level: int = Field(1024, ge=64, le=4096)
    negative_prompt: str = ""
    # Seed policy: a row's `seed` column wins; otherwise seed = hash(id, seed_base). Changing
    # seed_base draws new noise for every seedless row (and so redoes them).
    seed_base: int = Field(0, ge=0, lt=2**31)

    def edit_params(self) -> EditParams:
        return EditParams(
            num_steps=self.num_steps,
            guidance_scale=self.guidance_scale,
            size_level=self.size_level,
            negative_prompt=self.negative_prompt,
        )


class ResourcesConfig(_Section):
    """How the job is laid out on Ray. Defaults suit one CPU laptop; cluster configs set GPUs."""

    ray_address: str | None = None  # None: $RAY_ADDRESS (set by `ray job submit`) or a new local Ray
    local_num_cpus: int | None = Field(None, ge=1)  # CPUs of a new local Ray (None: all)
    num_actors: int | None = Field(None, ge=1)  # fixed pool size; overrides min/max
    min_actors: int = Field(1, ge=1)
    max_actors: int | None = Field(None, ge=1)  # None: one per GPU (a model on CPU: 1; null: CPUs allow)
    num_gpus_per_actor: float = Field(0.0, ge=0.0)
    # A scheduling token, not a thread count (torch sizes its own thread pool). Fractional on a
    # small CPU machine: Ray Data backpressures the task stages when the actor holds whole CPUs.
    cpus_per_actor: float = Field(0.5, gt=0.0)
    reserved_cpus: float = Field(1.0, ge=0.0)  # CPU slots the actors never take (reads, writes)
    # Per read / prepare / write task. Keep it different from cpus_per_actor on a CPU-only
    # cluster: Ray fuses a task stage into the next actor stage when their resources match,
    # which would move image fetching and decoding into the edit actors.
    io_cpus_per_task: float = Field(0.25, gt=0.0)
    edit_batch_size: int = Field(16, ge=1)  # rows per actor call (the editor splits by size / max_batch_size)
    io_batch_size: int = Field(64, ge=1)  # rows per block and per prepare / write task call
    io_threads_per_task: int = Field(8, ge=1)  # concurrent object reads / writes inside one task
    max_tasks_in_flight_per_actor: int = Field(2, ge=1)  # prefetch depth: the GPU never waits

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
    progress_bars: bool = True
    report_max_rows: int = Field(60, ge=0)

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

    def editor_spec(self) -> EditorSpec:
        """The spec each actor builds its editor from (load_editor stages object-storage weights
        once per node into ``model.cache_dir``)."""
        return EditorSpec(
            kind=self.model.kind,
            weights=self.model.weights,
            weights_cache_dir=self.model.cache_dir,
            weights_storage=self.model_storage(),
            weights_checksums=self.model.checksums,
            device=self.device(),
            dtype=self.model.dtype,
            version=self.model.version,
            max_batch_size=self.model.max_batch_size,
            posterior_mean=self.model.posterior_mean,
            model_id=self.model.resolved_model_id(),
        )


# ---------------------------------------------------------------------------------------------
# Loading


def _is_local(uri: str) -> bool:
    return "://" not in uri or uri.startswith("file://")


def _absolute(uri: str, base: Path) -> str:
    """Local paths become absolute (Ray workers do not share the driver's working directory)."""
    if not uri or not _is_local(uri):
        return uri
    if uri.startswith("file://"):
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


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        lines.append(f"{loc}: {e['msg']}")
    return "invalid config:\n  " + "\n  ".join(lines)


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
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    cfg.input.manifest = _absolute(cfg.input.manifest, base)
    cfg.output.uri = _absolute(cfg.output.uri, base)
    cfg.model.weights = _absolute(cfg.model.weights, base)
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
