"""The judge's config (the ``judge:`` section) and the identity of its scores.

A score is keyed by (the row's fingerprint, the judge id, the prompt set's hash): the judge id
names everything that changes an answer besides the prompts (engine, model, decoding, the pairwise
axis, the metric settings), and never a credential. A rerun with the same key scores nothing
again; another judge, another prompt set or a re-edited row (new fingerprint) scores again.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["GateConfig", "JudgeConfig", "JudgeResources", "MetricsConfig", "score_key"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class JudgeResources(_Section):
    """The judge stage's own actors: editing and judging share a cluster, never a GPU."""

    concurrency: int = Field(1, ge=1)  # judge engine replicas (actors; http: concurrent request tasks)
    num_gpus: float = Field(0.0, ge=0.0)  # per replica (transformers); vllm: its engine's placement
    num_cpus: float = Field(1.0, gt=0.0)  # per replica (transformers)
    # per HTTP request actor (engine http: two pools, SC and PQ); it waits on the network, so a
    # small share, or the pools starve the stages that read images on a small machine
    http_cpus: float = Field(0.1, gt=0.0)
    accelerator_type: str | None = None  # e.g. "H100" (vllm)
    # Ray custom resources per replica (transformers), e.g. {judge_gpu: 1}: lands the judge's actors
    # on the judge's own worker group (cluster/kuberay/raycluster.yaml), away from the edit GPUs
    custom: dict[str, float] = Field(default_factory=dict)
    batch_size: int = Field(8, ge=1)  # rows per judge call
    io_cpus_per_task: float = Field(0.25, gt=0.0)  # reading and measuring images


class MetricsConfig(_Section):
    """The model-free metrics every score carries (``judge/metrics.py``)."""

    # An output that is its input after a lossy round trip (a VAE, a JPEG at quality 90-95 moves
    # the 99.8th percentile pixel by 11-29 levels on scikit-image's sample photos) still counts as
    # unchanged; a real edit moves far more than 0.5 % of the pixels by more than 24 levels.
    unchanged_tolerance: int = Field(24, ge=0, le=255)
    unchanged_fraction: float = Field(0.005, ge=0.0, le=1.0)
    max_aspect_change: float = Field(0.02, ge=0.0)
    min_side: int = Field(64, ge=1)
    clip: str | None = None  # a local CLIP / SigLIP folder: text and directional similarity


class GateConfig(_Section):
    """A quality bar (``pairs.filter``, ``catalog.gate``): a row passes when every bar set holds."""

    min_sc: float | None = Field(None, ge=0.0, le=10.0)
    min_pq: float | None = Field(None, ge=0.0, le=10.0)
    min_o: float | None = Field(None, ge=0.0, le=10.0)
    drop_unchanged: bool = False  # an output that is (nearly) its input fails
    require_size_ok: bool = False  # an output whose size or aspect is off fails
    drop_unscored: bool = True  # a row whose score is an error (unparsable answer, ...) fails

    def needs_judge(self) -> bool:
        """Whether a VLM must answer (the bars on SC / PQ / O), or the metrics suffice."""
        return any(v is not None for v in (self.min_sc, self.min_pq, self.min_o))

    def failure(self, score: dict[str, Any] | None) -> str | None:
        """Why ``score`` (a scores-log record) fails the bar, as a short reason code; None: it passes."""
        if score is None:
            return "unscored"
        scored = score.get("status") == "ok"
        if not scored and self.drop_unscored:
            return f"score_{score.get('error_type') or 'error'}"
        metrics = score.get("metrics") or {}  # measured even when the judge's answer was not read
        if self.drop_unchanged and metrics.get("unchanged"):
            return "unchanged"
        if self.require_size_ok and metrics.get("size_ok") is False:
            return "size"
        if not scored:  # drop_unscored false: no answer to hold to the score bars
            return None
        for name in ("sc", "pq", "o"):
            bar = getattr(self, f"min_{name}")
            value = score.get(f"score_{name}")
            if bar is not None and (value is None or value < bar):
                return f"low_{name}"
        return None


class JudgeConfig(_Section):
    """Who judges the edits and how (``judge:``). ``engine: none`` computes only the metrics."""

    engine: Literal["none", "transformers", "http", "vllm"] = "none"
    # transformers / vllm: a local folder (Qwen2.5-VL-7B-Instruct/); http: the served model's name
    model: str | None = None
    url: str | None = None  # http: the OpenAI-compatible base URL, e.g. http://judge:8000/v1
    api_key_env: str | None = None  # http: the environment variable holding the key (never the key)
    prompts: str = "step1x-batch"  # our versioned prompt set, or "gedit" (GEdit-Bench's VIEScore prompts)
    mode: Literal["single", "pairwise"] = "single"
    against: str | None = None  # pairwise: the other output root (B), rows matched by id
    axis: Literal["instruction_following", "visual_consistency", "quality"] = "instruction_following"
    max_tokens: int = Field(512, ge=16)
    seed: int = 0
    timeout_s: float = Field(120.0, gt=0.0)  # per request (http)
    max_retries: int = Field(2, ge=0)  # per request, on 429 / 5xx / timeout (http)
    device: str = "auto"  # transformers: auto = cuda when resources.num_gpus > 0
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)  # vllm: tensor_parallel_size, max_model_len, ...
    category_column: str | None = None  # a manifest column: scores by category in the report
    resources: JudgeResources = Field(default_factory=JudgeResources)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    score_part_rows: int = Field(1000, ge=1)  # a scores-log part lands at least every this many rows ...
    score_part_seconds: float = Field(30.0, gt=0.0)  # ... or this often

    @model_validator(mode="before")
    @classmethod
    def _no_key_in_config(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key in ("api_key", "key", "token", "authorization"):
                if key in data:
                    raise ValueError(f"{key}: a credential never goes in a config; put it in an "
                                     "environment variable and name it in api_key_env")
        return data

    @model_validator(mode="after")
    def _engine_needs(self) -> "JudgeConfig":
        if self.engine in ("transformers", "vllm", "http") and not self.model:
            raise ValueError(f"engine {self.engine} needs model (a folder, or the served model's name for http)")
        if self.engine == "http" and not self.url:
            raise ValueError("engine http needs url (an OpenAI-compatible base URL, e.g. http://host:8000/v1)")
        if self.engine != "http" and (self.url or self.api_key_env):
            raise ValueError("url and api_key_env are for engine http")
        if self.mode == "pairwise" and (self.engine == "none" or not self.against):
            raise ValueError("mode pairwise needs a VLM engine and against (the other output root)")
        if self.url and "@" in self.url.split("://", 1)[-1].split("/", 1)[0]:
            raise ValueError("url: no credentials in the URL; use api_key_env")
        return self

    def chat_url(self) -> str:
        """The chat-completions endpoint under :attr:`url`."""
        assert self.url is not None
        base = self.url.rstrip("/")
        return base if base.endswith("/chat/completions") else base + "/chat/completions"

    def model_name(self) -> str:
        """A short name of the judge model: the folder's name or the served name."""
        if not self.model:
            return "metrics"
        return posixpath.basename(self.model.rstrip("/")) or self.model

    def judge_id(self) -> str:
        """``engine:model#digest``: readable, and the digest covers everything else that changes
        an answer (decoding, precision, vLLM's engine settings, mode, axis, metric settings). The URL and the key are not in it: the
        same model behind another endpoint is the same judge."""
        identity = {
            "engine": self.engine, "model": self.model_name() if self.engine == "http" else self.model,
            "mode": self.mode, "axis": self.axis if self.mode == "pairwise" else None,
            "max_tokens": self.max_tokens if self.engine != "none" else None,
            "dtype": self.dtype if self.engine == "transformers" else None,
            "engine_kwargs": self.engine_kwargs if self.engine == "vllm" else None,  # quantization, dtype
            "seed": self.seed if self.engine != "none" else None,
            "metrics": self.metrics.model_dump(),
        }
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
        return f"{self.engine}:{self.model_name()}#{digest}"


def score_key(fingerprint: str, judge_id: str, prompt_hash: str, against: str | None = None) -> str:
    """The key a score is stored and resumed under: the row's fingerprint, the judge, the prompts
    (and, pairwise, the other edit's fingerprint)."""
    text = "\x1f".join([fingerprint, judge_id, prompt_hash, against or ""])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def unmet_resources(judge: JudgeConfig, cluster: dict[str, float], edit_gpus: float = 0.0,
                    edit_cpus: float = 0.0) -> str | None:
    """Why the judge's actors could never start on a cluster with these resources (Ray would wait
    for them forever), or None. ``edit_gpus`` / ``edit_cpus``: what the edit actors beside it
    (judging inside the edit graph) take of the same pool."""
    res = judge.resources
    for name, amount in res.custom.items():
        if amount > 0 and float(cluster.get(name, 0.0)) < amount:
            return (f"judge.resources.custom asks {amount:g} {name} per replica but the Ray cluster has "
                    f"{float(cluster.get(name, 0.0)):g} (which nodes advertise it?)")
    gpus = float(cluster.get("GPU", 0.0)) - (0.0 if res.custom else edit_gpus)
    if judge.engine == "transformers" and res.num_gpus > 0 and gpus < res.num_gpus:
        return (f"judge.resources.num_gpus is {res.num_gpus:g} per replica but {max(gpus, 0):g} GPU(s) of the "
                "Ray cluster are left for the judge")
    if judge.engine == "vllm":
        per_replica = float(judge.engine_kwargs.get("tensor_parallel_size", 1)) * float(
            judge.engine_kwargs.get("pipeline_parallel_size", 1))
        if gpus < per_replica:
            return (f"engine vllm needs {per_replica:g} GPU(s) per replica (engine_kwargs) but {max(gpus, 0):g} "
                    "of the Ray cluster are left for the judge")
    cpus = float(cluster.get("CPU", 0.0)) - edit_cpus
    need = (res.num_cpus if judge.engine == "transformers" else 0.0) + res.io_cpus_per_task
    if cpus < need:
        return (f"the judge needs {need:g} CPU(s) (judge.resources.num_cpus and io_cpus_per_task) but "
                f"{max(cpus, 0):g} of the Ray cluster are left for it; lower them or add CPUs")
    return None
