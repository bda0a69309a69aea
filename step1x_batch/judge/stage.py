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

import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from step1x_batch.errors import CORRUPT_IMAGE, JUDGE_FAILED, READ_FAILED, SCORE_CODES, RowError, redact
from step1x_batch.io.images import decode_image, encode_image
from step1x_batch.io.storage import StorageOptions, read_bytes
from step1x_batch.judge.answers import AnswerError, bounded, overall, parse_preference, parse_scores
from step1x_batch.judge.config import JudgeConfig, score_key
from step1x_batch.judge.http import JudgeCallError, TolerantSession, answer_text, chat_payload, image_mime, wrapped_payload
from step1x_batch.judge.metrics import ClipScorer, MetricSettings, image_metrics
from step1x_batch.judge.prompts import JudgeRequest, PromptSet
from step1x_batch.judge.scores import METRICS_STRUCT, SUB_SCORES_STRUCT, conform_scores
from step1x_batch.rows.log import LOG_SCHEMA, conform

__all__ = ["score_dataset", "measure_batch", "parse_batch", "requests_for"]

_ANSWERS = ("answer_sc", "answer_pq", "answer_pair")


def _settings(judge: JudgeConfig) -> MetricSettings:
    m = judge.metrics
    return MetricSettings(unchanged_tolerance=m.unchanged_tolerance, unchanged_fraction=m.unchanged_fraction,
                          max_aspect_change=m.max_aspect_change, min_side=m.min_side)


def _read(uri: str, storage: StorageOptions, what: str) -> bytes:
    try:
        return read_bytes(uri, storage)
    except RowError as e:  # a final read error (a deleted object) stays final; others are retried
        raise RowError(e.code if e.code in SCORE_CODES else READ_FAILED, f"{what}: {e.message}") from None


def _for_judge(data: bytes, pixels: np.ndarray) -> bytes:
    """The bytes a VLM judge sees: the file as it is when it is PNG, JPEG or WebP and upright,
    else the decoded, upright pixels as PNG (a GIF, BMP or TIFF input, an EXIF-rotated photo: the
    judge must see what the edit job saw)."""
    try:
        image_mime(data)
        with Image.open(io.BytesIO(data)) as im:
            upright = im.getexif().get(0x0112, 1) in (0, 1)
    except (RowError, OSError, ValueError):
        upright = False
    return data if upright else encode_image(pixels, "png")


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
            out["input_bytes"] = [_for_judge(data, first if i == 0 else _decode(data, max_pixels, f"input {uris[i]}"))
                                  for i, data in enumerate(inputs)]
            out["output_bytes"] = _for_judge(edited, result)
            out["against_bytes"] = None if against is None else _for_judge(
                against, _decode(against, max_pixels, f"other edit {row['against_uri']}"))
    except RowError as e:
        out["error_type"], out["error_message"] = e.code, f"row {row['id']!r}: {e.message}"
    return out


_CLIP: dict[str, Any] = {}  # one CLIP per worker process and folder, loaded on first use


def _add_clip(folder: str, rows: list[dict[str, Any]], measured: list[dict[str, Any]]) -> None:
    """CLIP text and directional similarity of the measured rows, in one model call per batch."""
    done = [(r, m) for r, m in zip(rows, measured) if m.get("_pixels") is not None]
    if not done:
        return
    try:
        if folder not in _CLIP:
            _CLIP[folder] = ClipScorer(folder)
        found = _CLIP[folder].scores([r["instruction"] or "" for r, _ in done],
                                     [m["_pixels"][0] for _, m in done], [m["_pixels"][1] for _, m in done])
    except Exception as e:  # noqa: BLE001 - a CLIP failure is these rows' score error, not the job's
        for r, m in done:
            m["error_type"] = JUDGE_FAILED
            m["error_message"] = redact(f"row {r['id']!r}: CLIP similarity failed ({type(e).__name__}: {e})")[:2000]
        return
    for (_, m), (text, direction) in zip(done, found):
        m["metrics"] = {**m["metrics"], "clip_text": text, "clip_direction": direction}


def measure_batch(batch: pa.Table, judge: JudgeConfig, storage: StorageOptions, max_pixels: int,
                  threads: int = 8) -> pa.Table:
    """Stage 1: read and measure every row of ``batch`` (I/O in threads, CPU in numpy); a row
    that arrives with ``error_type`` set (not to be scored) is passed on unread."""
    rows = batch.to_pylist()
    keep = judge.engine != "none"

    def one(row: dict[str, Any]) -> dict[str, Any]:
        if row.get("error_type"):
            return {"metrics": None, "input_bytes": None, "output_bytes": None, "against_bytes": None,
                    "error_type": row["error_type"], "error_message": row.get("error_message")}
        return _measure_row(row, judge, storage, max_pixels, keep)

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(rows)))) as pool:
        measured = list(pool.map(one, rows))
    if judge.metrics.clip:
        _add_clip(judge.metrics.clip, rows, measured)
    columns = {name: batch.column(name) for name in batch.column_names}
    for name in ("metrics", "input_bytes", "output_bytes", "against_bytes", "error_type", "error_message"):
        columns[name] = [m[name] for m in measured]
    return _stage_table(columns, batch.num_rows)


# Every column a row carries between the stages, typed once: blocks from the two branches of the
# http / vllm path (asked, failed before asking) are united, and the ones built from Python dicts
# by ray.data.llm would otherwise infer their own types (a column all null, a struct).
STAGE_SCHEMA = pa.schema([
    ("id", pa.string()), ("fingerprint", pa.string()), ("score_key", pa.string()),
    ("image_uris", pa.list_(pa.string())), ("output_uri", pa.string()), ("instruction", pa.string()),
    ("category", pa.string()), ("against_uri", pa.string()), ("against_fingerprint", pa.string()),
    ("metrics", METRICS_STRUCT), ("input_bytes", pa.list_(pa.binary())), ("output_bytes", pa.binary()),
    ("against_bytes", pa.binary()), ("error_type", pa.string()), ("error_message", pa.string()),
    ("answer_sc", pa.string()), ("answer_pq", pa.string()), ("answer_pair", pa.string()),
    ("judge_error", pa.string()), ("judge_ms", pa.float64()), ("inference_error", pa.string()),
    ("log_record", pa.string()),  # the edit job's log record (JSON) when judging inside the edit graph
])


def _stage_table(columns: dict[str, Any], n: int) -> pa.Table:
    arrays = []
    for field in STAGE_SCHEMA:
        value = columns.get(field.name)
        if value is None:
            arrays.append(pa.nulls(n, field.type))
            continue
        if isinstance(value, (pa.Array, pa.ChunkedArray)):
            value = value.to_pylist() if pa.types.is_null(value.type) or value.type != field.type else value
        array = value if isinstance(value, (pa.Array, pa.ChunkedArray)) else pa.array(value, field.type)
        arrays.append(array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array)
    return pa.Table.from_arrays(arrays, schema=STAGE_SCHEMA)


def conform_stage(batch: pa.Table) -> pa.Table:
    """``batch`` as exactly :data:`STAGE_SCHEMA` (``__inference_error__`` of ray.data.llm kept as
    ``inference_error``)."""
    columns = {name: batch.column(name) for name in batch.column_names}
    if "__inference_error__" in columns:
        columns["inference_error"] = columns.pop("__inference_error__")
    return _stage_table(columns, batch.num_rows)


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
        columns = {name: batch.column(name) for name in batch.column_names}
        columns.update(answers)
        columns["judge_error"], columns["judge_ms"] = failures, took
        return _stage_table(columns, batch.num_rows)


class _Ask:
    """A processor's preprocess: one question of a row as the engine's request."""

    def __init__(self, judge: JudgeConfig, prompts: PromptSet, name: str, engine: str) -> None:
        self.judge, self.prompts, self.name, self.engine = judge, prompts, name, engine

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        if row.get("error_type"):  # failed before the judge: asked nothing (http) or one token (vllm)
            if self.engine == "http":
                return {"payload": wrapped_payload(None), "asked_at": None}
            return {"messages": [{"role": "user", "content": "."}], "asked_at": None,
                    "sampling_params": {"temperature": 0.0, "max_tokens": 1, "seed": self.judge.seed}}
        try:
            request = requests_for(row, self.judge, self.prompts)[self.name]
            payload = chat_payload(request, self.judge.model_name(), self.judge.max_tokens, self.judge.seed)
        except Exception as e:  # noqa: BLE001 - a row that cannot be asked is its own score error
            skipped = self.__call__({**row, "error_type": JUDGE_FAILED})
            return {**skipped, "judge_error": redact(f"row {row['id']!r}: the question could not be built "
                                                     f"({type(e).__name__}: {e})")[:2000]}
        if self.engine == "http":
            return {"payload": wrapped_payload(payload), "asked_at": time.time()}
        return {"messages": payload["messages"], "asked_at": time.time(),
                "sampling_params": {"temperature": 0.0, "max_tokens": self.judge.max_tokens,
                                    "seed": self.judge.seed}}


class _Take:
    """A processor's postprocess: the answer text into its column, the engine's columns dropped."""

    _ENGINE_KEYS = ("payload", "http_response", "messages", "sampling_params", "generated_text",
                    "generated_tokens", "prompt", "prompt_token_ids", "num_generated_tokens",
                    "num_input_tokens", "asked_at", "image", "multimodal_data", "mm_processor_kwargs",
                    "request_id", "batch_uuid", "time_taken_llm", "params", "embeddings",
                    "__inference_error__", "tokenized_prompt", "generated_logprobs")

    def __init__(self, name: str, engine: str) -> None:
        self.name, self.engine = name, engine

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        answer, failure = None, data.get("judge_error")
        if not data.get("error_type"):
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
    # one bundle per engine worker (Ray repeats it for each GPU of a tensor-parallel replica): the
    # judge's custom resource lands every worker on the judge's own group
    placement = {"bundle_per_worker": {"CPU": 1, "GPU": 1, **res.custom}} if res.custom else None
    return vLLMEngineProcessorConfig(
        model_source=judge.model, engine_kwargs=engine_kwargs, concurrency=res.concurrency,
        batch_size=res.batch_size, accelerator_type=res.accelerator_type, should_continue_on_error=True,
        placement_group_config=placement,
        # the engine takes a rendered prompt: images prepared, then the chat template; vLLM expands
        # the image placeholders itself (no tokenize stage) and returns the text (no detokenize)
        prepare_multimodal_stage={"enabled": True, "chat_template_content_format": "openai"},
        chat_template_stage={"enabled": True}, tokenize_stage={"enabled": False},
        detokenize_stage={"enabled": False},
    )


def _parse_row(row: dict[str, Any], judge: JudgeConfig, prompts: PromptSet | None) -> dict[str, Any]:
    out: dict[str, Any] = {"status": "ok", "score_sc": None, "score_pq": None, "score_o": None,
                           "sub_scores": None, "judge_reason": None, "judge_raw": None, "preference": None}
    if row.get("error_type"):
        return {**out, "status": "error"}
    if row.get("judge_error") or row.get("inference_error"):
        message = row.get("judge_error") or f"row {row['id']!r}: {row['inference_error']}"
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
    scores = conform_scores(table)
    if "log_record" in batch.column_names:  # judging inside the edit graph: the log record rides along
        scores = scores.append_column("log_record", batch.column("log_record"))
    return scores


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
        for name in (("answer_pair",) if judge.mode == "pairwise" else ("answer_sc", "answer_pq")):
            ds = _processor_stage(ds, judge, prompts, name)
        ds = ds.map_batches(conform_stage, batch_format="pyarrow", num_cpus=res.io_cpus_per_task)
    return ds.map_batches(parse_batch, batch_format="pyarrow", batch_size=res.batch_size,
                          fn_kwargs={"judge": judge, "prompts": prompts, "run_id": run_id},
                          num_cpus=res.io_cpus_per_task)


# --- judging inside the edit job's graph ---------------------------------------------------------

NOT_SCORED = "not_scored"  # an edit that failed: its log record rides through, no score is written
# The log schema as a record reads back from JSON: timestamps as ISO text (conform parses them).
_LOG_AS_JSON = pa.schema([pa.field(f.name, pa.string()) if pa.types.is_timestamp(f.type) else f for f in LOG_SCHEMA])


def log_rows_as_candidates(batch: pa.Table, judge: JudgeConfig, judge_id: str, prompt_hash: str) -> pa.Table:
    """The edit job's log records (after its write stage) as scoring candidates: ``ok`` rows are
    scored, the others only carry their log record through."""
    rows = batch.to_pylist()
    columns: dict[str, list[Any]] = {name: [] for name in ("id", "fingerprint", "score_key", "image_uris",
                                                           "output_uri", "instruction", "category",
                                                           "error_type", "log_record")}
    for row in rows:
        ok = row.get("status") == "ok"
        columns["id"].append(row["id"])
        columns["fingerprint"].append(row.get("fingerprint"))
        columns["score_key"].append(score_key(row["fingerprint"], judge_id, prompt_hash) if ok else None)
        columns["image_uris"].append(row.get("image_uris"))
        columns["output_uri"].append(row.get("output_uri"))
        columns["instruction"].append(row.get("instruction"))
        columns["category"].append(category_of(row.get("extra"), judge.category_column))
        columns["error_type"].append(None if ok else NOT_SCORED)
        columns["log_record"].append(json.dumps(row, default=_json_default))
    return _stage_table(columns, len(rows))


def _json_default(value: Any) -> Any:
    return value.isoformat() if hasattr(value, "isoformat") else str(value)


def category_of(extra: str | None, column: str | None) -> str | None:
    """A manifest column's value (carried in the log's ``extra`` JSON) as the row's category."""
    if not column or not extra:
        return None
    try:
        value = json.loads(extra).get(column)
    except (ValueError, AttributeError):
        return None
    return None if value is None else str(value)


@dataclass(frozen=True)
class InlineJudge:
    """A judge for the edit job's own graph (``run`` with a ``judge:`` section): its config and the
    prompt set the driver resolved."""

    config: JudgeConfig
    prompts: PromptSet | None


def judge_log_rows(ds: Any, judge: JudgeConfig, prompts: PromptSet | None, run_id: str,
                   storage: StorageOptions, max_pixels: int) -> Any:
    """The scoring stage chained after the edit job's write stage: editing and judging stream in
    one graph, each on its own actors and GPUs; the driver splits each batch into log records and
    scores (:func:`split_judged`)."""
    prompt_hash = prompts.digest() if prompts is not None else "-"
    ds = ds.map_batches(log_rows_as_candidates, batch_format="pyarrow", batch_size=None,
                        fn_kwargs={"judge": judge, "judge_id": judge.judge_id(), "prompt_hash": prompt_hash},
                        num_cpus=judge.resources.io_cpus_per_task)
    return score_dataset(ds, judge, prompts, run_id, storage, max_pixels)


def split_judged(batch: pa.Table) -> tuple[pa.Table, pa.Table]:
    """A batch of :func:`judge_log_rows` as (the edit's log records, the score records to write)."""
    rows = [json.loads(text) for text in batch.column("log_record").to_pylist()]
    records = conform(pa.Table.from_pylist(rows, schema=_LOG_AS_JSON))
    scored = pc.invert(pc.fill_null(pc.equal(batch.column("error_type"), NOT_SCORED), False))
    return records, conform_scores(batch.filter(scored))
