"""``engine: vllm``: the judge's config, the ``ray.data.llm`` processor it builds, and the questions and
answers that pass through it, on a CPU without vLLM.

The config and the processor are the real ones (Ray 2.60's ``vLLMEngineProcessorConfig`` and
``build_processor``, which need no vLLM until a stage's actor starts). The end-to-end test runs
that processor on the local Ray with the stages' insides replaced by stand-ins that behave as the
upstream ones do (ray/llm/_internal/batch/stages/: PrepareMultimodalUDF parses the messages into
placeholders and PIL images, ChatTemplateUDF renders the prompt, vLLMEngineStageUDF needs a prompt
and answers, or with should_continue_on_error gives an error row that skips the postprocess);
the Detokenize stage is the real one.
"""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path
from typing import Any, AsyncIterator

import pyarrow as pa
import pytest
from PIL import Image
from ray.llm._internal.batch.stages.base import StatefulStageUDF
from ray.llm._internal.batch.stages.vllm_engine_stage import vLLMOutputData

from step1x_batch.io.storage import StorageOptions
from step1x_batch.judge.config import JudgeConfig
from step1x_batch.judge.prompts import load_prompts
from step1x_batch.judge.stage import _Ask, _Take, score_dataset, vllm_config

PROMPTS = load_prompts("step1x-batch")
IMAGE_PAD = "<|image_pad|>"


@pytest.fixture(scope="module")
def judge_folder(tmp_path_factory) -> Path:
    """A tiny Qwen2.5-VL release folder made from a seed (config, tokenizer, chat template)."""
    from step1x_batch.models.qwen_vl.tiny import write_tiny_qwen

    folder = tmp_path_factory.mktemp("judge") / "Qwen2.5-VL-tiny"
    write_tiny_qwen(folder, seed=0, corpus=[PROMPTS.system, PROMPTS.sc, PROMPTS.pq, '{"score": [7, 9]}'])
    return folder


def _judge(folder: Path, **custom: float) -> JudgeConfig:
    resources: dict[str, Any] = {"concurrency": 2, "accelerator_type": "H100", "batch_size": 16}
    if custom:
        resources["custom"] = custom
    return JudgeConfig.model_validate({"engine": "vllm", "model": str(folder), "max_tokens": 96, "seed": 5,
                                       "engine_kwargs": {"tensor_parallel_size": 2}, "resources": resources})


def _png(color: tuple[int, int, int], size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


# --- the config ---------------------------------------------------------------------------------


def test_a_vllm_judge_config_validates_and_carries_its_settings_into_the_engine_config(judge_folder):
    judge = _judge(judge_folder)
    assert judge.judge_id().startswith("vllm:Qwen2.5-VL-tiny#")
    config = vllm_config(judge)
    assert config.model_source == str(judge_folder)
    assert config.engine_kwargs["tensor_parallel_size"] == 2  # the judge's own kwargs win ...
    assert config.engine_kwargs["limit_mm_per_prompt"] == {"image": 4}  # ... over the defaults they leave
    assert config.engine_kwargs["max_model_len"] == 16384
    assert (config.concurrency, config.batch_size, config.accelerator_type) == (2, 16, "H100")
    assert config.should_continue_on_error is True  # one failed request is a row's score error
    prepare = config.prepare_multimodal_stage
    assert prepare["enabled"] is True and prepare["chat_template_content_format"] == "openai"
    longer = vllm_config(JudgeConfig.model_validate({**judge.model_dump(), "engine_kwargs": {"max_model_len": 32768}}))
    assert longer.engine_kwargs["max_model_len"] == 32768


def test_a_credential_or_an_http_field_is_refused_for_a_vllm_judge(judge_folder):
    with pytest.raises(ValueError, match="credential"):
        JudgeConfig.model_validate({"engine": "vllm", "model": str(judge_folder), "api_key": "sk-x"})
    with pytest.raises(ValueError, match="engine http"):
        JudgeConfig.model_validate({"engine": "vllm", "model": str(judge_folder), "url": "http://judge:8000/v1"})
    with pytest.raises(ValueError, match="needs model"):
        JudgeConfig.model_validate({"engine": "vllm"})


def test_custom_resources_land_the_vllm_replicas_on_the_judge_group(judge_folder, ray_local):
    """``judge.resources.custom: {judge_gpu: 1}`` puts every engine worker (one per GPU of a
    tensor-parallel replica) on nodes that advertise ``judge_gpu`` (cluster/kuberay's judge group)."""
    from ray.data.llm import build_processor

    config = vllm_config(_judge(judge_folder, judge_gpu=1))
    processor = build_processor(config, preprocess=_Ask(_judge(judge_folder), PROMPTS, "answer_sc", "vllm"),
                                postprocess=_Take("answer_sc", "vllm"))
    engine = processor.get_stage_by_name("vLLMEngineStage")
    strategy = engine.map_batches_kwargs["ray_remote_args_fn"]  # TP 2: Ray's executor, a placement group
    placement = strategy.args[2]
    assert placement is not None, "no placement group config: the replicas go to any GPU"
    bundles = placement["bundles"]
    assert len(bundles) == 2 and all(b["judge_gpu"] == 1 and b["GPU"] == 1 for b in bundles)


# --- the processor --------------------------------------------------------------------------------


def test_the_processor_builds_with_multimodal_preparation_and_tensor_parallel_engines(judge_folder, ray_local):
    from ray.data.llm import build_processor

    judge = _judge(judge_folder)
    processor = build_processor(vllm_config(judge), preprocess=_Ask(judge, PROMPTS, "answer_sc", "vllm"),
                                postprocess=_Take("answer_sc", "vllm"))
    names = processor.list_stage_names()
    assert names[0] == "PrepareMultimodalStage" and "vLLMEngineStage" in names
    assert "TokenizeStage" not in names  # vLLM tokenizes itself, expanding each image's placeholder
    assert processor.get_stage_by_name("PrepareMultimodalStage").get_required_input_keys().keys() == {"messages"}
    engine = processor.get_stage_by_name("vLLMEngineStage")
    assert engine.get_required_input_keys().keys() == {"sampling_params"}
    kwargs = engine.map_batches_kwargs
    assert kwargs["accelerator_type"] == "H100"
    # tensor parallel 2: Ray's executor with a placement group of 2 GPU bundles per replica, so
    # Ray Data itself reserves no GPU for the actor
    assert kwargs["num_gpus"] == 0 and kwargs["ray_remote_args_fn"].args[:2] == (2, "H100")
    assert engine.fn_constructor_kwargs["should_continue_on_error"] is True
    assert engine.fn_constructor_kwargs["engine_kwargs"]["tensor_parallel_size"] == 2


def test_a_stage_before_the_engine_renders_the_prompt(judge_folder, ray_local):
    """vLLM's engine stage takes ``prompt`` or ``tokenized_prompt``, never ``messages``: the chat
    template stage (or the tokenizer) must run between the multimodal preparation and the engine."""
    from ray.data.llm import build_processor

    judge = _judge(judge_folder)
    names = build_processor(vllm_config(judge), preprocess=_Ask(judge, PROMPTS, "answer_sc", "vllm"),
                            postprocess=_Take("answer_sc", "vllm")).list_stage_names()
    before = names[:names.index("vLLMEngineStage")]
    assert "ChatTemplateStage" in before or "TokenizeStage" in before, names


# --- the questions and the answers ----------------------------------------------------------------


def _data_url_bytes(part: dict[str, Any]) -> bytes:
    url = part["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    return base64.b64decode(url.split(",", 1)[1])


def test_the_preprocess_asks_each_question_as_openai_messages_with_greedy_seeded_sampling(judge_folder):
    judge = _judge(judge_folder)
    inputs, edited = [_png((200, 10, 10)), _png((10, 200, 10))], _png((10, 10, 200))
    row = {"id": "r1", "instruction": "make the sky red", "input_bytes": inputs, "output_bytes": edited,
           "against_bytes": None}

    sc = _Ask(judge, PROMPTS, "answer_sc", "vllm")(row)
    assert set(sc) == {"messages", "sampling_params", "asked_at"}  # the row's own columns ride along untouched
    assert sc["sampling_params"] == {"temperature": 0.0, "max_tokens": 96, "seed": 5}
    system, user = sc["messages"]
    assert system == {"role": "system", "content": PROMPTS.system}
    assert user["role"] == "user"
    *images, text = user["content"]
    assert [p["type"] for p in images] == ["image_url"] * 3 and text["type"] == "text"
    assert [_data_url_bytes(p) for p in images] == [*inputs, edited]  # every input, then the edit
    assert "make the sky red" in text["text"] and text["text"] == PROMPTS.sc_request("make the sky red", inputs,
                                                                                      edited).text

    pq = _Ask(judge, PROMPTS, "answer_pq", "vllm")(row)
    *images, text = pq["messages"][-1]["content"]
    assert [_data_url_bytes(p) for p in images] == [edited] and text["text"] == PROMPTS.pq


def test_the_postprocess_keeps_the_answer_and_the_row_and_drops_the_engines_columns():
    engine_out = vLLMOutputData(prompt="<|im_start|>...", prompt_token_ids=[1, 2], num_input_tokens=2,
                                generated_tokens=[5, 6], generated_text='{"score": [7, 9]}',
                                num_generated_tokens=2).model_dump()
    data = {"id": "r1", "instruction": "make the sky red", "output_bytes": b"png", "judge_ms": 3.0,
            "messages": [{"role": "user", "content": "..."}], "multimodal_data": {"image": ["<PIL>"]},
            "sampling_params": {"temperature": 0.0}, "asked_at": 1.0, "request_id": 3, "batch_uuid": "u",
            "time_taken_llm": 0.5, "params": "SamplingParams(...)", **engine_out}
    out = _Take("answer_sc", "vllm")(data)
    assert out["answer_sc"] == '{"score": [7, 9]}' and out["judge_error"] is None
    assert out["id"] == "r1" and out["output_bytes"] == b"png" and out["instruction"] == "make the sky red"
    assert out["judge_ms"] > 3.0  # this question's time added to the row's earlier ones
    for key in ("messages", "multimodal_data", "sampling_params", "prompt", "generated_text", "generated_tokens",
                "prompt_token_ids", "request_id", "params", "time_taken_llm"):
        assert key not in out, key


# --- end to end on the local Ray, with stand-ins inside the stages --------------------------------


def _answer_for(prompt: str) -> str | None:
    """The fixed answer for a rendered prompt: by the marker in its instruction; None: the engine fails."""
    if "[fail]" in prompt:
        return None
    if "[junk]" in prompt:
        return "the sky is red now"
    if "Editing instruction" in prompt:  # SC
        return '{"score": [7, 9], "reasoning": "red as asked"}'
    return '{"score": [6, 8], "reasoning": "natural"}'  # PQ


class FakePrepareMultimodalUDF(StatefulStageUDF):
    """PrepareMultimodalUDF with content format "openai": each image part becomes an ``image``
    placeholder part and its data: URL a PIL image in ``multimodal_data``; text stays text."""

    def __init__(self, data_column: str, expected_input_keys: list[str], **_: Any) -> None:
        super().__init__(data_column, expected_input_keys)

    async def udf(self, batch: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
        for row in batch:
            images, conversation = [], []
            for message in row["messages"]:
                content = message["content"]
                parts = [{"type": "text", "text": content}] if isinstance(content, str) else []
                for part in [] if isinstance(content, str) else content:
                    if part["type"] == "image_url":
                        data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
                        images.append(Image.open(io.BytesIO(data)).convert("RGB"))
                        parts.append({"type": "image"})
                    else:
                        parts.append({"type": "text", "text": part["text"]})
                conversation.append({"role": message["role"], "content": parts})
            yield {self.IDX_IN_BATCH_COLUMN: row[self.IDX_IN_BATCH_COLUMN], "messages": conversation,
                   "multimodal_data": {"image": images}, "multimodal_uuids": None}


class FakeChatTemplateUDF(StatefulStageUDF):
    """ChatTemplateUDF: the model folder's chat template over the parsed conversation."""

    def __init__(self, data_column: str, expected_input_keys: list[str], model: str, **_: Any) -> None:
        from transformers import AutoTokenizer

        super().__init__(data_column, expected_input_keys)
        self.tokenizer = AutoTokenizer.from_pretrained(model)

    async def udf(self, batch: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
        for row in batch:
            messages = row["messages"].tolist() if hasattr(row["messages"], "tolist") else row["messages"]
            prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            yield {self.IDX_IN_BATCH_COLUMN: row[self.IDX_IN_BATCH_COLUMN], "prompt": prompt}


class FakeVLLMEngineUDF(StatefulStageUDF):
    """vLLMEngineStageUDF without vLLM: the request is checked as vLLM checks it (a prompt or token
    ids; one image per placeholder; greedy), answered with the fixed answer of its marker, and a
    failure is an error row shaped as should_continue_on_error shapes it."""

    def __init__(self, data_column: str, expected_input_keys: list[str], model: str,
                 should_continue_on_error: bool, **_: Any) -> None:
        from transformers import AutoTokenizer

        super().__init__(data_column, expected_input_keys)
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.continue_on_error = should_continue_on_error

    def _request(self, row: dict[str, Any]) -> dict[str, Any]:
        prompt = row.get("prompt")
        if not prompt and row.get("tokenized_prompt") is None:
            raise ValueError("Either 'prompt' or 'prompt_token_ids' must be provided.")
        params = dict(row["sampling_params"])
        if params.get("temperature") != 0.0 or "seed" not in params or "max_tokens" not in params:
            raise ValueError(f"harness: not greedy and seeded: {params}")
        images = (row.get("multimodal_data") or {}).get("image") or []
        if prompt.count(IMAGE_PAD) != len(images) or not images:
            raise ValueError(f"harness: {prompt.count(IMAGE_PAD)} placeholders for {len(images)} images")
        answer = _answer_for(prompt)
        if answer is None:
            raise RuntimeError("the engine could not answer this request")
        tokens = self.tokenizer.encode(answer, add_special_tokens=False)
        return vLLMOutputData(prompt=prompt, prompt_token_ids=[0], num_input_tokens=1, generated_tokens=tokens,
                              generated_text=answer, num_generated_tokens=len(tokens)).model_dump()

    async def udf(self, batch: list[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
        for row in batch:
            idx = row[self.IDX_IN_BATCH_COLUMN]
            try:
                out, error = self._request(row), ""
            except Exception as e:  # noqa: BLE001 - as the real stage: the row carries the error
                if not self.continue_on_error:
                    raise
                out = vLLMOutputData(prompt=str(row.get("prompt") or ""), num_input_tokens=0).model_dump()
                error = f"{type(e).__name__}: {e}"
            yield {**out, "request_id": idx, self.IDX_IN_BATCH_COLUMN: idx, "batch_uuid": "b",
                   "time_taken_llm": 0.0, "params": "", "__inference_error__": error}


_FAKES = {"PrepareMultimodalStage": FakePrepareMultimodalUDF, "ChatTemplateStage": FakeChatTemplateUDF,
          "vLLMEngineStage": FakeVLLMEngineUDF}


def _on_the_cpu(config: Any, **kwargs: Any) -> Any:
    """The real processor, each stage's inside swapped for its stand-in and its actor on a tenth
    of a CPU (no GPU, no placement group), so both questions' stages fit a 2-CPU Ray."""
    from ray.data import ActorPoolStrategy
    from ray.llm._internal.batch.processor.base import ProcessorBuilder

    processor = ProcessorBuilder.build(config, **kwargs)
    for name, stage in list(processor.stages.items()):
        cpu = {"zero_copy_batch": True, "compute": ActorPoolStrategy(size=1), "num_cpus": 0.1,
               "max_concurrency": stage.map_batches_kwargs.get("max_concurrency", 1)}
        fake = _FAKES.get(re.sub(r"_\d+$", "", name), stage.fn)
        processor.stages[name] = stage.model_copy(update={"fn": fake, "map_batches_kwargs": cpu})
    return processor


def test_a_vllm_judge_scores_every_row_or_gives_it_a_score_error(judge_folder, ray_local, tmp_path, monkeypatch):
    """Both questions through two processors on the local Ray: answered rows get scores, an
    unparsable answer keeps its raw text, a request the engine fails is a transient judge_failed
    error, a row whose image cannot be read never reaches the engine."""
    import ray.data
    import ray.data.llm

    monkeypatch.setattr(ray.data.llm, "build_processor", _on_the_cpu)
    rows = []
    for i, marker in enumerate(["[ok]", "[junk]", "[fail]", "[ok]"]):
        (tmp_path / f"in{i}.png").write_bytes(_png((40 * i, 90, 200)))
        (tmp_path / f"out{i}.png").write_bytes(_png((200, 90, 40 * i)))
        rows.append({"id": f"r{i}", "fingerprint": f"f{i}", "score_key": f"k{i}",
                     "image_uris": [str(tmp_path / f"in{i}.png")], "output_uri": str(tmp_path / f"out{i}.png"),
                     "instruction": f"make it red {marker}", "category": None})
    rows[3]["output_uri"] = str(tmp_path / "missing.png")
    judge = JudgeConfig.model_validate({**_judge(judge_folder).model_dump(), "resources": {"batch_size": 2}})
    ds = score_dataset(ray.data.from_arrow(pa.Table.from_pylist(rows)), judge, PROMPTS, "run1", StorageOptions(),
                       max_pixels=4096 * 4096)
    records = {r["id"]: r for r in ds.take_all()}

    assert sorted(records) == ["r0", "r1", "r2", "r3"]
    ok = records["r0"]
    assert (ok["status"], ok["score_sc"], ok["score_pq"]) == ("ok", 7.0, 6.0), ok
    assert ok["sub_scores"] == {"sc": [7.0, 9.0], "pq": [6.0, 8.0]} and "red as asked" in ok["judge_reason"]
    assert ok["judge_id"] == judge.judge_id() and ok["prompt_hash"] == PROMPTS.digest()
    assert (records["r1"]["error_type"], records["r1"]["judge_raw"]) == ("judge_unparsable", "the sky is red now")
    failed = records["r2"]
    assert failed["error_type"] == "judge_failed" and "could not answer" in failed["error_message"], failed
    assert "'r2'" in failed["error_message"]  # says which row
    assert records["r3"]["error_type"] == "missing_object"  # a deleted output stays final, like an edit's
    assert not any("harness" in (r["error_message"] or "") for r in records.values())
