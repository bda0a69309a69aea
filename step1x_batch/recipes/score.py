"""``step1x-batch score OUTPUT_URI --config judge.yaml``: score the edits an output root holds,
touching no image.

The candidates are each id's latest ``ok`` record in the row log (the bytes its output object holds
now); its score key is (fingerprint, judge id, prompt hash), so a rerun scores only the rows
without a deciding score for that key, another judge or prompt set scores every row again, and a
re-edited row (new fingerprint) is scored anew. The scores go to ``scores/<run_id>/`` under the
root's lease, like the row log. The edit job (``run`` with a ``judge:`` section), ``synthesize``
(``pairs.filter``) and ``rerender`` (``catalog.gate``) call :func:`score_output` after editing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from step1x_batch.errors import SCORE_CODES, JobRefused, redact, redact_uri
from step1x_batch.io.storage import StorageOptions, is_local, join_uri, write_bytes
from step1x_batch.job import runner
from step1x_batch.job.config import ConfigError, JobConfig, default_run_id, parse_config, read_raw_config
from step1x_batch.job.entrypoint import add_config_arguments, check_lease_and_run, config_overrides, exit_status, job_main
from step1x_batch.job.lease import Lease, held
from step1x_batch.job import console, report
from step1x_batch.judge import http as judge_http
from step1x_batch.judge import local as judge_local
from step1x_batch.judge import scores as score_log
from step1x_batch.judge.config import JudgeConfig, score_key, unmet_resources
from step1x_batch.judge.prompts import PromptSet, load_prompts
from step1x_batch.judge.stage import InlineJudge, category_of, score_dataset
from step1x_batch.recipes.section import RecipeSection

__all__ = ["JUDGE_SECTION", "ScoreJob", "ScoreRuntime", "ScoreSummary", "check_judge", "run_config",
           "score_output", "candidates"]

# The ``judge:`` section of an edit / synthesize / rerender config.
JUDGE_SECTION = RecipeSection("judge", JudgeConfig)
_LOG_COLUMNS = ["id", "fingerprint", "status", "image_uris", "instruction", "output_uri", "finished_at", "extra"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ScoreRuntime(_Section):
    """Run identity and policy of a scoring run (the edit job's ``runtime`` keys it shares)."""

    run_id: str = Field(default_factory=default_run_id)
    ray_address: str | None = None  # as resources.ray_address: None = $RAY_ADDRESS or a local Ray
    local_num_cpus: int | None = Field(None, ge=1)
    lease_ttl_s: float = Field(120.0, ge=1.0)
    allow_unlocked: bool = False
    max_pixels: int = Field(40_000_000, ge=1)
    retry_error_types_this_run: list[str] = Field(default_factory=list)  # final score errors asked again
    verbose: bool = False

    @field_validator("retry_error_types_this_run")
    @classmethod
    def _score_codes(cls, value: list[str]) -> list[str]:
        unknown = [v for v in value if v not in SCORE_CODES]
        if unknown:
            raise ValueError(f"unknown score error type(s) {unknown}; they are {sorted(SCORE_CODES)}")
        return value

    @classmethod
    def of_job(cls, cfg: JobConfig) -> "ScoreRuntime":
        """The edit job's own settings, for the scoring that follows its edits."""
        return cls(run_id=cfg.runtime.run_id, ray_address=cfg.resources.ray_address,
                   local_num_cpus=cfg.resources.local_num_cpus, lease_ttl_s=cfg.runtime.lease_ttl_s,
                   allow_unlocked=cfg.runtime.allow_unlocked, max_pixels=cfg.runtime.max_pixels)


class ScoreJob(_Section):
    """A ``score`` config: the judge, the output root's storage, the run's settings."""

    judge: JudgeConfig
    storage: StorageOptions = Field(default_factory=StorageOptions)
    runtime: ScoreRuntime = Field(default_factory=ScoreRuntime)


def load_score_config(path: str, overrides: Sequence[str] = ()) -> ScoreJob:
    """A ``score`` config from YAML (with ``--set`` overrides); every problem on one line."""
    raw = read_raw_config(path, overrides)
    try:
        return ScoreJob.model_validate(raw)
    except ValidationError as e:
        lines = [f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None


@dataclass
class ScoreSummary:
    """What a scoring run did (``scores/<run_id>/summary.json``)."""

    run_id: str
    judge_id: str
    prompt_hash: str
    candidates: int  # ids with an edit to score
    already_scored: int  # of those, scored before under the same key
    scored: int  # records this run wrote
    errors: dict[str, int] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)  # means with bootstrap intervals, over every current score
    parts: list[str] = field(default_factory=list)
    stopped: str | None = None
    report: str | None = None
    judge: dict[str, Any] = field(default_factory=dict)  # the judge's config as run (it holds no secret)
    ray_log: str | None = None  # where Ray's own output went

    def line(self) -> str:
        o = self.stats.get("score_o")
        mean = f"; O {o['mean']:.2f} [{o['low']:.2f}, {o['high']:.2f}] over {o['n']}" if o else ""
        errs = f"; errors {self.errors}" if self.errors else ""
        return (f"scored {self.scored} of {self.candidates} rows ({self.already_scored} already scored "
                f"by {self.judge_id}){errs}{mean}")


def judge_prompts(judge: JudgeConfig) -> PromptSet | None:
    """The prompt set the judge asks with, resolved once on the driver (None: the metrics-only
    judge asks nothing)."""
    return None if judge.engine == "none" else load_prompts(judge.prompts)


def prompt_hash(judge: JudgeConfig) -> str:
    """The prompt set's digest, in every score key (``-`` for the metrics-only judge)."""
    prompts = judge_prompts(judge)
    return "-" if prompts is None else prompts.digest()


def candidates(output_uri: str, judge: JudgeConfig, storage: StorageOptions, hash_: str,
               only: Mapping[str, str] | None = None) -> pa.Table:
    """Every id's current edit (its latest ``ok`` record; with ``only``, those (id, fingerprint)
    edits) with its score key; pairwise, only the ids both roots edited, with the other root's
    output and fingerprint."""
    edits = score_log.current_edits(output_uri, storage, _LOG_COLUMNS, only)
    against: dict[str, tuple[str, str]] = {}
    if judge.mode == "pairwise":
        other = score_log.current_edits(judge.against, storage, _LOG_COLUMNS)
        against = {r: (u, f) for r, u, f in zip(*(other.column(c).to_pylist() for c in ("id", "output_uri", "fingerprint")))}
    rows = []
    judge_id = judge.judge_id()
    for rec in edits.to_pylist():
        b_uri, b_fp = against.get(rec["id"], (None, None))
        if judge.mode == "pairwise" and b_uri is None:
            continue
        rows.append({"id": rec["id"], "fingerprint": rec["fingerprint"], "image_uris": rec["image_uris"],
                     "output_uri": rec["output_uri"], "instruction": rec["instruction"],
                     "category": category_of(rec["extra"], judge.category_column),
                     "against_uri": b_uri, "against_fingerprint": b_fp,
                     "score_key": score_key(rec["fingerprint"], judge_id, hash_, b_fp)})
    schema = pa.schema([("id", pa.string()), ("fingerprint", pa.string()), ("image_uris", pa.list_(pa.string())),
                        ("output_uri", pa.string()), ("instruction", pa.string()), ("category", pa.string()),
                        ("against_uri", pa.string()), ("against_fingerprint", pa.string()),
                        ("score_key", pa.string())])
    return pa.Table.from_pylist(rows, schema=schema)


def check_judge(judge: JudgeConfig, storage: StorageOptions | None = None) -> None:
    """The pre-flight of a judge: its prompts load, its folder or endpoint answers. A missing or
    unreachable judge is one sentence and exit status 2, before anything is written."""
    if judge.engine != "none":
        load_prompts(judge.prompts)
    if judge.engine == "transformers":
        judge_local.check_folder(judge.model)
    elif judge.engine == "http":
        judge_http.check_endpoint(judge.chat_url(), judge.model_name(), min(judge.timeout_s, 30.0), judge.api_key_env)
    elif judge.engine == "vllm" and "://" not in judge.model and not os.path.isdir(judge.model):
        raise JobRefused(f"judge.model: {judge.model} is not a folder; engine vllm loads the judge "
                         "from a local folder on every judge node")
    if judge.metrics.clip and not os.path.isdir(judge.metrics.clip):
        raise JobRefused(f"judge.metrics.clip: {judge.metrics.clip} is not a folder")


def score_output(output_uri: str, judge: JudgeConfig, storage: StorageOptions, runtime: ScoreRuntime,
                 lease: Lease | None, say: Callable[[str], None] | None = None,
                 only: Mapping[str, str] | None = None) -> ScoreSummary:
    """Score every current edit under ``output_uri`` (``only``: these id -> fingerprint edits, as
    the catalog gate asks for its fresh renders) not yet scored under its key, under the caller's
    ``lease`` on the root; write the summary. Ray is started (or joined) when needed."""
    say = say or (lambda m: None)
    prompts = judge_prompts(judge)
    hash_ = "-" if prompts is None else prompts.digest()
    table = candidates(output_uri, judge, storage, hash_, only)
    done = score_log.scored_keys(output_uri, storage, retry=runtime.retry_error_types_this_run)
    todo = table.filter(pa.array([(i, k) not in done for i, k in zip(table.column("id").to_pylist(),
                                                                     table.column("score_key").to_pylist())],
                                 pa.bool_())) if table.num_rows else table
    summary = ScoreSummary(run_id=runtime.run_id, judge_id=judge.judge_id(), prompt_hash=hash_,
                           candidates=table.num_rows, already_scored=table.num_rows - todo.num_rows, scored=0,
                           judge=judge.model_dump(mode="json"))
    if todo.num_rows:
        say(f"scoring {todo.num_rows} of {table.num_rows} rows with {summary.judge_id} (prompts {hash_})")
        summary.stopped = _score_rows(todo, output_uri, judge, prompts, storage, runtime, lease, summary)
    current = score_log.current_scores(output_uri, storage, set(table.column("score_key").to_pylist()))
    summary.stats = score_log.summarize(current)
    _write_summary(output_uri, storage, summary, lease)
    if lease is None or lease.confirm():
        try:
            summary.report = report.write_score_report(
                output_uri, storage, runtime.run_id, current, summary.stats, input_storage=storage,
                max_pixels=runtime.max_pixels, against=judge.against if judge.mode == "pairwise" else None)
            say(f"  report:   {redact_uri(summary.report)}")
        except Exception as e:  # noqa: BLE001 - the page is for people; the scores are written
            say(f"warning: could not write the scores report: {type(e).__name__}: {redact(str(e))}")
    return summary


def _score_rows(todo: pa.Table, output_uri: str, judge: JudgeConfig, prompts: PromptSet | None,
                storage: StorageOptions, runtime: ScoreRuntime, lease: Lease | None,
                summary: ScoreSummary) -> str | None:
    """Run the scoring graph on ``todo`` and land its records; Ray's own output goes to
    ``scores/<run_id>/ray.log`` (a local root; else a temporary file, named in the summary) unless
    ``runtime.verbose``, as the edit job's does. Returns why it stopped early, or None."""
    log_path = _ray_log_path(output_uri, runtime.run_id)
    summary.ray_log = None if runtime.verbose else log_path
    with console.ray_output(log_path, verbose=runtime.verbose):
        return _score_on_ray(todo, output_uri, judge, prompts, storage, runtime, lease, summary)


def _ray_log_path(output_uri: str, run_id: str) -> str:
    uri = join_uri(score_log.score_dir(output_uri, run_id), "ray.log")
    if is_local(uri):
        return uri.removeprefix("file://")
    fd, path = tempfile.mkstemp(prefix="step1x-score-ray-", suffix=".log")
    os.close(fd)
    return path


def _score_on_ray(todo: pa.Table, output_uri: str, judge: JudgeConfig, prompts: PromptSet | None,
                  storage: StorageOptions, runtime: ScoreRuntime, lease: Lease | None,
                  summary: ScoreSummary) -> str | None:
    import ray.data
    from ray.data import DataContext

    started = runner.start_ray(runtime.ray_address or os.environ.get("RAY_ADDRESS") or "local",
                               runtime.local_num_cpus)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = ctx.print_on_execution_start = runtime.verbose
    unmet = unmet_resources(judge, ray.cluster_resources())
    if unmet:
        if started:
            runner.stop_ray()
        raise JobRefused(unmet)
    writer = score_log.ScoreWriter(output_uri, runtime.run_id, storage, judge.score_part_rows,
                                   judge.score_part_seconds, confirm=lease.confirm if lease else None)
    stopped = None
    try:
        blocks = max(1, min(todo.num_rows // judge.resources.batch_size, 256))
        ds = ray.data.from_arrow(todo).repartition(blocks)
        ds = score_dataset(ds, judge, prompts, runtime.run_id, storage, runtime.max_pixels)
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            writer.add(batch)
            for status, err in zip(batch.column("status").to_pylist(), batch.column("error_type").to_pylist()):
                if status == "error":
                    summary.errors[err] = summary.errors.get(err, 0) + 1
            if lease is not None and lease.lost.is_set():
                stopped = "lease"
                break
        writer.flush()
    finally:
        if started:
            runner.stop_ray()
    summary.scored, summary.parts = writer.records, [redact_uri(p) for p in writer.parts]
    if writer.dropped:
        stopped = stopped or "lease"
    return stopped


def _write_summary(output_uri: str, storage: StorageOptions, summary: ScoreSummary, lease: Lease | None) -> None:
    if lease is not None and not lease.confirm():
        return
    body = json.dumps(summary.__dict__, indent=2, sort_keys=True, default=str).encode()
    write_bytes(join_uri(output_uri, f"scores/{summary.run_id}/summary.json"), body, storage)


def score_main(output_uri: str, job: ScoreJob) -> ScoreSummary:
    """The ``score`` command: pre-flight, the root's lease, the scoring run."""
    check_judge(job.judge, job.storage)
    rt = job.runtime
    with held(output_uri, job.storage, rt.run_id, ttl_s=rt.lease_ttl_s, allow_unlocked=rt.allow_unlocked,
              job="score", say=lambda m: print(m, file=sys.stderr, flush=True)) as lease:
        return score_output(output_uri, job.judge, job.storage, rt, lease, say=print)


def run_config(output_uri: str, path: str, overrides: Sequence[str] = ()) -> int:
    """Exit status of ``step1x-batch score``: 0 done, 1 stopped early (the lease was lost),
    2 refused (a config, a judge or a store problem), nothing written."""

    def run() -> bool:
        summary = score_main(output_uri, load_score_config(path, overrides))
        print(summary.line())
        return summary.stopped is None

    return exit_status(run)


def run_edit_config(path: str, overrides: Sequence[str] = ()) -> int:
    """``step1x-batch run CONFIG``: the edit job and, when the config has a ``judge:`` section,
    the scoring of its output root after it, under the same lease and run id."""

    def run() -> bool:
        rest, section = JUDGE_SECTION.split(read_raw_config(path, overrides))
        judge = JUDGE_SECTION.validate(section) if section else None
        if judge is not None and judge.mode == "pairwise":
            raise ConfigError("judge.mode: pairwise compares two finished output roots; run "
                              "`step1x-batch score` once both are edited")
        cfg = parse_config(rest)

        def edit_then_score(facts: Any, lease: Lease) -> bool:
            inline = None if judge is None else InlineJudge(judge, judge_prompts(judge))
            edited = runner.run_job(cfg, facts, lease, judge=inline)
            if judge is None:  # (a run that stopped early raised JobStopped)
                return edited.ok
            # the edits this run made were scored in its graph; rows done before it are scored now
            scored = score_output(cfg.output.uri, judge, cfg.output_storage(), ScoreRuntime.of_job(cfg),
                                  lease, say=print)
            print(scored.line())
            return edited.ok and scored.stopped is None

        checks = (lambda: check_judge(judge)) if judge is not None else None
        return check_lease_and_run(cfg, edit_then_score, job="edit", extra_checks=checks)

    return exit_status(run)


def edit_main(argv: Sequence[str] | None = None) -> int:
    """``python jobs/edit_dataset.py --config X``: the edit job, scored when X has ``judge:``."""
    return job_main("Edit every row of a manifest on Ray (and score the edits when the config has a "
                    "judge section).", run_edit_config, argv)


def main(argv: Sequence[str] | None = None) -> int:
    """``python jobs/score_edits.py OUTPUT_URI --config judge.yaml``."""
    parser = argparse.ArgumentParser(description="Score the edits of an output root with a judge; no image is written.")
    parser.add_argument("output_uri", help="an edit job's output root (output.uri)")
    add_config_arguments(parser, flag=True)
    args = parser.parse_args(argv)
    return run_config(args.output_uri, args.config, config_overrides(args))
