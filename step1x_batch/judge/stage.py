"""The scoring stage: a Ray Data graph from rows to score records.

Three named stages, each owning its resources as ``ray.data.llm``'s processors do:

1. **measure** (CPU tasks): read the inputs and the edit, decode, the model-free metrics
   (``judge/metrics.py``); the image bytes travel on for the judge.
2. **judge**: ``engine: http`` and ``engine: vllm`` are ``ray.data.llm`` processors (HTTP requests
   to an OpenAI-compatible server; vLLM engine actors on GPUs), ``engine: transformers`` an actor
   pool running ``generate`` in process (``judge/local.py``), ``engine: none`` nothing. Single
   mode asks two questions per row (VIEScore: semantic consistency, perceptual quality), pairwise
   one (which of two edits is better on an axis).
3. **parse** (CPU tasks): answers to scores (``judge/answers.py``); an answer that cannot be read
   is a score error with the raw answer kept, never a failed job.

A row that failed earlier (an image that cannot be read, no answer) flows on with ``error_type``
set and later stages pass it through untouched.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from step1x_batch.errors import CORRUPT_IMAGE, JUDGE_FAILED, READ_FAILED, RowError, redact
from step1x_batch.io.images import decode_image
from step1x_batch.io.storage import StorageOptions, read_bytes
from step1x_batch.judge.answers import AnswerError, bounded, overall, parse_preference, parse_scores
from step1x_batch.judge.config import JudgeConfig
from step1x_batch.judge.http import JudgeCallError, TolerantSession, answer_text, chat_payload
from step1x_batch.judge.metrics import ClipScorer, MetricSettings, image_metrics
from step1x_batch.judge.prompts import JudgeRequest, PromptSet
from step1x_batch.judge.scores import METRICS_STRUCT, SUB_SCORES_STRUCT, conform_scores

__all__ = ["score_dataset", "measure_batch", "parse_batch", "requests_for"]

_ANSWERS = ("answer_sc", "answer_pq", "answer_pair")


def _settings(judge: JudgeConfig) -> MetricSettings:
    m = judge.metrics
    return MetricSettings(unchanged_tolerance=m.unchanged_tolerance, unchanged_fraction=m.unchanged_fraction,
                          max_aspect_change=m.max_aspect_change, min_side=m.min_side)


def _read(uri: str, storage: StorageOptions, what: str) -> bytes:
    try:
        return read_bytes(uri, storage)
    except RowError as e:
        raise RowError(READ_FAILED, f"{what}: {e.message}") from None


def _decode(data: bytes, max_pixels: int, what: str) -> np.ndarray:
    try:
        return decode_image(data, max_pixels)
    except RowError as e:
        raise RowError(CORRUPT_IMAGE, f"{what}: {e.message}") from None


def _measure_row(row: dict[str, Any], judge: JudgeConfig, storage: StorageOptions,
                 max_pixels: int, keep_bytes: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"metrics": None, "input_bytes": None, "output_bytes": None,
                           "against_bytes": None, "error_type": None, "error_message": None}
    try:
        uris = list(row.get("image_uris") or [])
        if not uris or not row.get("output_uri"):
            raise RowError(READ_FAILED, f"row {row['id']!r} has no input or no output in the row log")
        inputs = [_read(u, storage, f"input {u}") for u in uris]
        edited = _read(row["output_uri"], storage, f"output {row['output_uri']}")
        against = _read(row["against_uri"], storage, f"other edit {row['against_uri']}") \
            if row.get("against_uri") else None
        first = _decode(inputs[0], max_pixels, f"input {uris[0]}")
        result = _decode(edited, max_pixels, f"output {row['output_uri']}")
        out["metrics"] = image_metrics(first, result, _settings(judge))
        if judge.metrics.clip:
            out["_pixels"] = (first, result)
        if keep_bytes:
            out["input_bytes"], out["output_bytes"], out["against_bytes"] = inputs, edited, against
    except RowError as e:
        out["error_type"], out["error_message"] = e.code, f"row {row['id']!r}: {e.message}"
    return out


_CLIP: dict[str, Any] = {}  # one CLIP per worker process and folder, loaded on first use


def _add_clip(folder: str, rows: list[dict[str, Any]], measured: list[dict[str, Any]]) -> None:
    """CLIP text and directional similarity of the measured rows, in one model call per batch."""
    if folder not in _CLIP:
        _CLIP[folder] = ClipScorer(folder)
    done = [(r, m) for r, m in zip(rows, measured) if m.get("_pixels") is not None]
    if not done:
        return
    found = _CLIP[folder].scores([r["instruction"] or "" for r, _ in done],
                                 [m["_pixels"][0] for _, m in done], [m["_pixels"][1] for _, m in done])
    for (_, m), (text, direction) in zip(done, found):
        m["metrics"] = {**m["metrics"], "clip_text": text, "clip_direction": direction}


def measure_batch(batch: pa.Table, judge: JudgeConfig, storage: StorageOptions, max_pixels: int,
                  threads: int = 8) -> pa.Table:
    """Stage 1: read and measure every row of ``batch`` (I/O in threads, CPU in numpy)."""
    rows = batch.to_pylist()
    keep = judge.engine != "none"
    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(rows)))) as pool:
        measured = list(pool.map(lambda r: _measure_row(r, judge, storage, max_pixels, keep), rows))
    if judge.metrics.clip:
        _add_clip(judge.metrics.clip, rows, measured)
    table = batch
    types = {"metrics": METRICS_STRUCT, "input_bytes": pa.list_(pa.binary()), "output_bytes": pa.binary(),
             "against_bytes": pa.binary(), "error_type": pa.string(), "error_message": pa.string()}
    for name, type_ in types.items():
        values = [m[name] for m in measured]
        table = table.append_column(name, pa.array(values, type_))
    return table


def requests_for(row: dict[str, Any], judge: JudgeConfig, prompts: PromptSet) -> dict[str, JudgeRequest]:
    """The questions a row asks the judge, by answer column."""
    inputs, edited = list(row["input_bytes"] or []), row["output_bytes"]
    if judge.mode == "pairwise":
        return {"answer_pair": prompts.pairwise_request(row["instruction"], judge.axis, inputs, edited,
                                                        row["against_bytes"])}
    return {"answer_sc": prompts.sc_request(row["instruction"], inputs, edited),
            "answer_pq": prompts.pq_request(edited)}


class TransformersJudgeStage:
    """``engine: transformers``: one in-process judge per actor, loaded once."""

    def __init__(self, judge: JudgeConfig, prompts: PromptSet) -> None:
        from step1x_batch.judge.local import TransformersJudge

        device = judge.device
        if device == "auto":
            device = "cuda" if judge.resources.num_gpus > 0 else "cpu"
        self.judge = judge
        self.prompts = prompts
        self.engine = TransformersJudge(judge.model, device=device, dtype=judge.dtype,
                                        max_new_tokens=judge.max_tokens, seed=judge.seed)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        answers: dict[str, list[Any]] = {name: [None] * len(rows) for name in _ANSWERS}
        failures: list[str | None] = [None] * len(rows)
        took: list[float | None] = [None] * len(rows)
        for i, row in enumerate(rows):
            if row["error_type"]:
                continue
            asked = requests_for(row, self.judge, self.prompts)
            start = time.perf_counter()
            try:
                texts = self.engine.answer(list(asked.values()))
            except Exception as e:  # noqa: BLE001 - one row's failure is its score error
                failures[i] = redact(f"the judge failed on row {row['id']!r}: {type(e).__name__}: {e}")[:2000]
                continue
            took[i] = (time.perf_counter() - start) * 1000.0
            for name, text in zip(asked, texts):
                answers[name][i] = text
        for name in _ANSWERS:
            batch = batch.append_column(name, pa.array(answers[name], pa.string()))
        batch = batch.append_column("judge_error", pa.array(failures, pa.string()))
        return batch.append_column("judge_ms", pa.array(took, pa.float64()))


class _Ask:
    """A processor's preprocess: one question of a row as the engine's request."""

    def __init__(self, judge: JudgeConfig, prompts: PromptSet, name: str, engine: str) -> None:
        self.judge, self.prompts, self.name, self.engine = judge, prompts, name, engine

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        request = requests_for(row, self.judge, self.prompts)[self.name]
        payload = chat_payload(request, self.judge.model_name(), self.judge.max_tokens, self.judge.seed)
        if self.engine == "http":
            return {"payload": payload, "asked_at": time.time()}
        return {"messages": payload["messages"], "asked_at": time.time(),
                "sampling_params": {"temperature": 0.0, "max_tokens": self.judge.max_tokens,
                                    "seed": self.judge.seed}}


class _Take:
    """A processor's postprocess: the answer text into its column, the engine's columns dropped."""

    _ENGINE_KEYS = ("payload", "http_response", "messages", "sampling_params", "generated_text",
                    "generated_tokens", "prompt", "prompt_token_ids", "num_generated_tokens",
                    "num_input_tokens", "asked_at", "image", "multimodal_data", "mm_processor_kwargs",
                    "request_id", "batch_uuid", "time_taken_llm", "params", "embeddings", "metrics",
                    "__inference_error__", "tokenized_prompt", "generated_logprobs")

    def __init__(self, name: str, engine: str) -> None:
        self.name, self.engine = name, engine

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        answer, failure = None, data.get("judge_error")
        try:
            answer = answer_text(data["http_response"]) if self.engine == "http" else data.get("generated_text")
        except JudgeCallError as e:
            failure = failure or f"row {data.get('id')!r}: {e}"
        took = (time.time() - data["asked_at"]) * 1000.0 if data.get("asked_at") else None
        out = {k: v for k, v in data.items() if k not in self._ENGINE_KEYS}
        out[self.name] = answer
        out["judge_error"] = failure
        out["judge_ms"] = (data.get("judge_ms") or 0.0) + (took or 0.0)
        return out


def _processor_stage(ds: Any, judge: JudgeConfig, prompts: PromptSet, name: str) -> Any:
    """One question for every row through a ``ray.data.llm`` processor."""
    from ray.data.llm import HttpRequestProcessorConfig, build_processor

    res = judge.resources
    if judge.engine == "http":
        config = HttpRequestProcessorConfig(
            url=judge.chat_url(), batch_size=res.batch_size, concurrency=res.concurrency,
            max_retries=0,  # the session retries and always answers, so Ray's retry never fires
            session_factory=TolerantSession(judge.timeout_s, judge.api_key_env, retries=judge.max_retries + 1),
            http_request_stage={"enabled": True, "num_cpus": res.http_cpus})
    else:
        config = vllm_config(judge)
    processor = build_processor(config, preprocess=_Ask(judge, prompts, name, judge.engine),
                                postprocess=_Take(name, judge.engine))
    return processor(ds)


def vllm_config(judge: JudgeConfig) -> Any:
    """``engine: vllm``: vLLM engine replicas as Ray actors (tensor parallel through
    ``engine_kwargs``), greedy, a failing row an error column instead of a failed job."""
    from ray.data.llm import vLLMEngineProcessorConfig

    res = judge.resources
    engine_kwargs = {"max_model_len": 16384, "limit_mm_per_prompt": {"image": 4}, **judge.engine_kwargs}
    return vLLMEngineProcessorConfig(
        model_source=judge.model, engine_kwargs=engine_kwargs, concurrency=res.concurrency,
        batch_size=res.batch_size, accelerator_type=res.accelerator_type, should_continue_on_error=True,
        prepare_multimodal_stage={"enabled": True, "chat_template_content_format": "openai",
                                  "model_config_kwargs": {"model": judge.model}},
        chat_template_stage={"enabled": False}, tokenize_stage={"enabled": False},
        detokenize_stage={"enabled": True},
    )


def _parse_row(row: dict[str, Any], judge: JudgeConfig, prompts: PromptSet | None) -> dict[str, Any]:
    out: dict[str, Any] = {"status": "ok", "score_sc": None, "score_pq": None, "score_o": None,
                           "sub_scores": None, "judge_reason": None, "judge_raw": None, "preference": None}
    if row.get("error_type"):
        return {**out, "status": "error"}
    if row.get("judge_error") or row.get("__inference_error__"):
        message = row.get("judge_error") or f"row {row['id']!r}: {row['__inference_error__']}"
        return {**out, "status": "error", "error_type": JUDGE_FAILED, "error_message": bounded(message, 2000)}
    if judge.engine == "none":
        return out
    try:
        if judge.mode == "pairwise":
            verdict = parse_preference(row.get("answer_pair"))
            label = {1.0: "A", 0.0: "B"}.get(verdict.scores[0], "tie")
            return {**out, "preference": label, "judge_reason": bounded(verdict.reasoning, 4000)}
        assert prompts is not None
        sc = parse_scores(row.get("answer_sc"), prompts.sc_scores)
        pq = parse_scores(row.get("answer_pq"), prompts.pq_scores)
    except AnswerError as e:
        return {**out, "status": "error", "error_type": e.code, "judge_raw": e.raw,
                "error_message": bounded(f"row {row['id']!r}: {e}", 2000)}
    score_sc, score_pq, score_o = overall(sc, pq)
    reason = "\n".join(r for r in (f"SC: {sc.reasoning}" if sc.reasoning else "",
                                   f"PQ: {pq.reasoning}" if pq.reasoning else "") if r)
    return {**out, "score_sc": score_sc, "score_pq": score_pq, "score_o": score_o,
            "sub_scores": {"sc": list(sc.scores), "pq": list(pq.scores)}, "judge_reason": bounded(reason, 4000)}


def parse_batch(batch: pa.Table, judge: JudgeConfig, prompts: PromptSet | None, run_id: str) -> pa.Table:
    """Stage 3: answers to score records (:data:`~step1x_batch.judge.scores.SCORE_SCHEMA`)."""
    prompt_hash = prompts.digest() if prompts is not None else "-"
    rows = batch.to_pylist()
    parsed = [{**row, **_parse_row(row, judge, prompts)} for row in rows]
    now = pa.scalar(time.time_ns() // 1000, pa.timestamp("us", tz="UTC"))
    n = len(parsed)
    table = pa.Table.from_pylist([{k: v for k, v in p.items() if k not in ("input_bytes", "output_bytes",
                                                                            "against_bytes", "metrics",
                                                                            "sub_scores")} for p in parsed])
    table = table.append_column("metrics_", pa.array([p.get("metrics") for p in parsed], METRICS_STRUCT))
    table = table.append_column("sub_scores_", pa.array([p.get("sub_scores") for p in parsed], SUB_SCORES_STRUCT))
    table = table.rename_columns([c.rstrip("_") if c in ("metrics_", "sub_scores_") else c for c in table.column_names])
    extra = {"judge_id": judge.judge_id(), "prompt_hash": prompt_hash, "run_id": run_id,
             "axis": judge.axis if judge.mode == "pairwise" else None}
    for name, value in extra.items():
        table = table.drop_columns([name]) if name in table.column_names else table
        table = table.append_column(name, pa.array([value] * n, pa.string()))
    table = table.append_column("finished_at", pa.array([now.value] * n, pa.timestamp("us", tz="UTC"))) \
        if "finished_at" not in table.column_names else table
    return conform_scores(table)


def _unasked(batch: pa.Table) -> pa.Table:
    """The answer columns, empty, for rows that failed before the judge (so a union's blocks share
    a schema)."""
    for name in (*_ANSWERS, "judge_error"):
        batch = batch.append_column(name, pa.nulls(batch.num_rows, pa.string()))
    return batch.append_column("judge_ms", pa.nulls(batch.num_rows, pa.float64()))


def score_dataset(ds: Any, judge: JudgeConfig, prompts: PromptSet | None, run_id: str,
                  storage: StorageOptions, max_pixels: int) -> Any:
    """The whole graph over a dataset of candidate rows (``prompts`` resolved by the driver, None
    for the metrics-only judge) (``id``, ``fingerprint``, ``score_key``,
    ``image_uris``, ``output_uri``, ``instruction``, ``category``; pairwise ``against_uri``,
    ``against_fingerprint``): measure, judge, parse."""
    import ray.data

    res = judge.resources
    ds = ds.map_batches(measure_batch, batch_format="pyarrow", batch_size=res.batch_size,
                        fn_kwargs={"judge": judge, "storage": storage, "max_pixels": max_pixels},
                        num_cpus=res.io_cpus_per_task)
    if judge.engine == "transformers":
        ds = ds.map_batches(TransformersJudgeStage, fn_constructor_kwargs={"judge": judge, "prompts": prompts},
                            batch_format="pyarrow", batch_size=res.batch_size,
                            compute=ray.data.ActorPoolStrategy(size=res.concurrency),
                            num_gpus=res.num_gpus, num_cpus=res.num_cpus, resources=res.custom or None,
                            accelerator_type=res.accelerator_type)
    elif judge.engine in ("http", "vllm"):
        failed = ds.filter(lambda r: r["error_type"] is not None).map_batches(
            _unasked, batch_format="pyarrow", num_cpus=res.io_cpus_per_task)
        asking = ds.filter(lambda r: r["error_type"] is None)
        for name in (("answer_pair",) if judge.mode == "pairwise" else ("answer_sc", "answer_pq")):
            asking = _processor_stage(asking, judge, prompts, name)
        ds = asking.union(failed)
    return ds.map_batches(parse_batch, batch_format="pyarrow", batch_size=res.batch_size,
                          fn_kwargs={"judge": judge, "prompts": prompts, "run_id": run_id},
                          num_cpus=res.io_cpus_per_task)
