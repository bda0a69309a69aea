"""The one config-section parser of the jobs built on the edit job (recipes/section.py), on a
made-up ``judge`` section: what a new recipe gets by declaring its section and nothing more."""

from __future__ import annotations

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field

from step1x_batch.job.config import ConfigError
from step1x_batch.recipes.section import RecipeSection, local_path


class JudgeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    score_column: str = "score"
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    reference_column: str | None = None


JUDGE = RecipeSection("judge", JudgeConfig)


def _raw(tmp_path, **judge) -> dict:
    raw = {"input": {"manifest": "m.jsonl"}, "output": {"uri": str(tmp_path / "out")}, "model": {"family": "null"}}
    return {**raw, "judge": judge} if judge else raw


def test_parse_splits_validates_and_resolves(tmp_path):
    job, judge = JUDGE.parse(_raw(tmp_path, threshold=0.25), base_dir=tmp_path)
    assert judge == JudgeConfig(threshold=0.25)
    assert job.input.manifest == str(tmp_path / "m.jsonl")  # the edit job's own path resolution
    assert JUDGE.parse(_raw(tmp_path))[1] == JudgeConfig()  # a missing section: the defaults
    assert JUDGE.parse({**_raw(tmp_path), "judge": None})[1] == JudgeConfig()


def test_errors_name_the_section_first(tmp_path):
    with pytest.raises(ConfigError, match=r"judge\.threshold: .*\n  judge\.bogus: Extra inputs"):
        JUDGE.parse(_raw(tmp_path, threshold=2, bogus=1))
    # the section's errors are shown before the edit job's
    bad = {**_raw(tmp_path, threshold=2), "sampling": {"num_step": 3}}
    with pytest.raises(ConfigError, match=r"judge\.threshold") as e:
        JUDGE.parse(bad)
    assert "sampling" not in str(e.value)
    with pytest.raises(ConfigError, match=r"sampling\.num_step"):
        JUDGE.parse({**bad, "judge": {}})
    with pytest.raises(ConfigError, match="judge: must be a mapping"):
        JUDGE.parse({**_raw(tmp_path), "judge": [1]})
    with pytest.raises(ConfigError, match="the top level must be a mapping"):
        JUDGE.parse([1])
    other_storage = {**_raw(tmp_path), "output": {"uri": "s3://b/out", "storage": {"endpoint_url": "http://x"}}}
    with pytest.raises(ConfigError, match="output.storage: the work manifest"):
        JUDGE.parse(other_storage)


def test_load_applies_overrides_to_the_section(tmp_path):
    path = tmp_path / "judge.yaml"
    path.write_text(yaml.safe_dump(_raw(tmp_path, threshold=0.25)))
    job, judge = JUDGE.load(str(path), ["judge.threshold=0.75", "runtime.run_id=j1"])
    assert judge.threshold == 0.75 and job.runtime.run_id == "j1"
    with pytest.raises(ConfigError, match=r"judge\.threshold"):
        JUDGE.load(str(path), ["judge.threshold=7"])


def test_required_columns_and_local_paths(tmp_path):
    judge = JudgeConfig()
    required = JUDGE.required_columns({"score_column": judge.score_column,
                                       "reference_column": judge.reference_column})
    assert required == {"judge.score_column": ("score",)}  # a null setting names no column
    assert local_path("rubric.txt", tmp_path) == str(tmp_path / "rubric.txt")
    assert local_path("s3://bucket/rubric.txt", tmp_path) == "s3://bucket/rubric.txt"
