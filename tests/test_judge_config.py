"""The judge's config: what its id covers, the quality bar, the resources a cluster must have."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from step1x_batch.judge.config import GateConfig, JudgeConfig, score_key, unmet_resources


def test_the_judge_id_covers_what_changes_an_answer_and_never_the_url_or_key():
    base = JudgeConfig(engine="transformers", model="/models/Qwen2.5-VL-7B-Instruct")
    assert base.judge_id().startswith("transformers:Qwen2.5-VL-7B-Instruct#")
    for change in ({"dtype": "float32"}, {"max_tokens": 128}, {"seed": 1}, {"metrics": {"unchanged_tolerance": 9}}):
        assert JudgeConfig(**{**base.model_dump(), **change}).judge_id() != base.judge_id(), change
    vllm = JudgeConfig(engine="vllm", model="/m/j")
    assert JudgeConfig(engine="vllm", model="/m/j", engine_kwargs={"quantization": "fp8"}).judge_id() != vllm.judge_id()
    http = JudgeConfig(engine="http", model="judge", url="http://a:8000/v1", api_key_env="K")
    moved = JudgeConfig(engine="http", model="judge", url="http://b:9000/v1", api_key_env="OTHER")
    assert http.judge_id() == moved.judge_id()  # the same model behind another endpoint
    assert score_key("fp", http.judge_id(), "p") != score_key("fp", http.judge_id(), "q")
    assert score_key("fp", http.judge_id(), "p", "b") != score_key("fp", http.judge_id(), "p")


def test_a_config_refuses_a_key_credentials_in_the_url_and_missing_pieces():
    with pytest.raises(ValidationError, match="api_key_env"):
        JudgeConfig(engine="http", model="j", url="http://h/v1", api_key="sk-abcdefghijklmnopqrstuvwx")
    with pytest.raises(ValidationError, match="no credentials in the URL"):
        JudgeConfig(engine="http", model="j", url="http://user:pw@h/v1")
    with pytest.raises(ValidationError, match="needs url"):
        JudgeConfig(engine="http", model="j")
    with pytest.raises(ValidationError, match="pairwise needs"):
        JudgeConfig(engine="http", model="j", url="http://h/v1", mode="pairwise")


def _score(status="ok", sc=7.0, pq=7.0, unchanged=False, size_ok=True, error_type=None):
    return {"status": status, "error_type": error_type, "score_sc": sc, "score_pq": pq,
            "score_o": None if sc is None else (sc * pq) ** 0.5,
            "metrics": {"unchanged": unchanged, "size_ok": size_ok}}


def test_the_gate_names_the_first_reason_a_score_fails():
    gate = GateConfig(min_sc=6, min_o=6.5, drop_unchanged=True, require_size_ok=True)
    assert gate.failure(_score()) is None
    assert gate.failure(None) == "unscored"
    assert gate.failure(_score(unchanged=True)) == "unchanged"
    assert gate.failure(_score(size_ok=False)) == "size"
    assert gate.failure(_score(sc=5)) == "low_sc"
    assert gate.failure(_score(sc=6, pq=6)) == "low_o"
    unread = _score(status="error", sc=None, pq=None, error_type="judge_unparsable")
    assert gate.failure(unread) == "score_judge_unparsable"
    lenient = GateConfig(min_sc=6, drop_unchanged=True, require_size_ok=True, drop_unscored=False)
    assert lenient.failure(unread) is None  # no answer to hold to the bars ...
    assert lenient.failure({**unread, "metrics": {"unchanged": True, "size_ok": True}}) == "unchanged"  # ... the metrics still
    assert lenient.failure({**unread, "metrics": {"unchanged": False, "size_ok": False}}) == "size"
    assert GateConfig(drop_unchanged=True).needs_judge() is False and gate.needs_judge() is True


def test_a_judge_whose_actors_could_never_start_is_named_before_the_graph_waits_forever():
    cpu_only = {"CPU": 2.0}
    assert unmet_resources(JudgeConfig(), cpu_only) is None
    gpu = JudgeConfig(engine="transformers", model="/m", resources={"num_gpus": 1})
    assert "num_gpus" in unmet_resources(gpu, cpu_only)
    assert unmet_resources(gpu, {"CPU": 16.0, "GPU": 1.0}) is None
    assert "left for the judge" in unmet_resources(gpu, {"CPU": 16.0, "GPU": 1.0}, edit_gpus=1.0)  # the editor has it
    own = JudgeConfig(engine="transformers", model="/m", resources={"num_gpus": 1, "custom": {"judge_gpu": 1}})
    assert "judge_gpu" in unmet_resources(own, {"CPU": 16.0, "GPU": 2.0})
    assert unmet_resources(own, {"CPU": 16.0, "GPU": 2.0, "judge_gpu": 1.0}, edit_gpus=1.0) is None
    tp = JudgeConfig(engine="vllm", model="/m", engine_kwargs={"tensor_parallel_size": 2})
    assert "2 GPU(s) per replica" in unmet_resources(tp, {"CPU": 16.0, "GPU": 1.0})
    assert "CPU" in unmet_resources(JudgeConfig(engine="transformers", model="/m"), {"CPU": 1.0})
    assert "CPU" in unmet_resources(JudgeConfig(), {"CPU": 2.0}, edit_cpus=2.0)
