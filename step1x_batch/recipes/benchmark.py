"""``step1x-batch benchmark CONFIG``: several models edit the same rows with the same seeds, one judge
scores every edit, and a table per category compares them.

The config is the edit job's (``input``, ``output``, ``sampling``, ``resources``, ``runtime``: shared
by every model) without ``model``, plus ``benchmark.models`` (name -> the edit job's ``model:``
section: family, weights, options, dtype, adapters) and an optional ``judge:`` section (default:
the metrics-only judge). Each model runs the ordinary edit job under ``<root>/models/<name>/`` (an
ordinary output root: ``status``, ``errors`` and ``score`` work on it; seeds come from the row ids
and ``sampling.seed_base``, so every model gets the same noise), then its edits are scored
(pointwise SC / PQ / O, or, with ``judge.mode: pairwise``, each model against the baseline's root).
Resuming is the edit job's and the scores log's: a rerun redoes no finished row and asks the judge
nothing it has answered.

Before anything runs, every model's config is validated and pre-flighted (family options, weights
layout, adapters present and pinned) and so is the judge; a broken one refuses the whole benchmark
in one sentence naming the model (exit status 2), with nothing written. The benchmark root holds a
lease of its own for the whole run; each model root is leased while its model edits and is scored.

The results: ``<root>/benchmark/table.md``, ``table.json`` (the same numbers) and ``report.html``
(the tables, and each row's input beside every model's output with the scores), and the table on
the console. Per group (each combination of ``benchmark.group_by`` values, and ``all``) and
model: n, the means with percentile-bootstrap 95 % intervals, and for each model other than the
baseline the paired difference to it over the rows both scored (the mean of per-row differences,
bootstrap interval), and with a pairwise judge the win / tie / loss rates.
"""

from __future__ import annotations

import copy
import html
import json
import math
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from step1x_batch.errors import JobRefused, redact_uri
from step1x_batch.io.storage import join_uri, read_bytes, write_bytes
from step1x_batch.io.weights import pin_adapters
from step1x_batch.job import preflight, runner
from step1x_batch.job.config import ConfigError, JobConfig, default_run_id, parse_config, read_raw_config
from step1x_batch.job.entrypoint import exit_status, job_main
from step1x_batch.job.lease import Lease, held
from step1x_batch.job.report import thumbnail_data_uri
from step1x_batch.judge.config import JudgeConfig
from step1x_batch.judge.scores import current_edits, current_scores, mean_interval
from step1x_batch.judge.stage import InlineJudge
from step1x_batch.recipes.score import (
    JUDGE_SECTION, ScoreRuntime, candidates, check_judge, judge_prompts, prompt_hash, score_output,
)
from step1x_batch.recipes.section import RecipeSection, local_path, require_one_storage

__all__ = ["BENCHMARK_SECTION", "Benchmark", "BenchmarkSection", "benchmark_tables", "check_benchmark",
           "load_benchmark_config", "parse_benchmark_config", "render_text", "run_benchmark", "run_config"]

DEFAULT_GROUP_BY = ("task_type", "instruction_language")
FAILPOINT_ENV = "STEP1X_BATCH_FAILPOINT"  # the name rows/state's failpoints use
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_LOG_COLUMNS = ["id", "fingerprint", "status", "image_uris", "instruction", "output_uri", "finished_at", "extra",
                "model_id"]
# (column, label, digits): what the table shows of a pointwise VLM judge, and of the metrics-only judge
SCORE_MEASURES = (("score_sc", "SC", 2), ("score_pq", "PQ", 2), ("score_o", "O", 2))
METRIC_MEASURES = (("changed_fraction", "moved px", 3), ("ssim", "SSIM", 3), ("psnr", "PSNR", 2))
_DIGITS = {name: digits for name, _, digits in SCORE_MEASURES + METRIC_MEASURES}
_LABELS = {name: label for name, label, _ in SCORE_MEASURES + METRIC_MEASURES}


class BenchmarkSection(BaseModel):
    """The ``benchmark:`` section: the models (each an edit job ``model:`` section), the baseline,
    the grouping columns."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    models: dict[str, dict[str, Any]]  # name -> the edit job's model section, in order
    baseline: str | None = None  # None: the first model
    # manifest columns (carried in each log record's extra) whose value combinations are the
    # table's groups; None: task_type and instruction_language where the manifest has them
    group_by: list[str] | None = None
    report_rows: int = Field(120, ge=0)  # rows shown side by side in report.html
    resamples: int = Field(1000, ge=100, le=100_000)  # bootstrap resamples per interval

    @field_validator("models")
    @classmethod
    def _names(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if not value:
            raise ValueError("name at least one model (name -> the edit job's model section)")
        for name, section in value.items():
            if not _NAME.match(name):
                raise ValueError(f"{name!r}: a model's name names its folder; use letters, digits, '.', '_', '-'")
            if not isinstance(section, dict):
                raise ValueError(f"{name}: must be a mapping (the edit job's model section)")
        return value

    @field_validator("baseline")
    @classmethod
    def _baseline_known(cls, value: str | None, info: ValidationInfo) -> str | None:
        models = info.data.get("models") or {}
        if value is not None and value not in models:
            raise ValueError(f"{value!r} is not one of the models ({', '.join(models)})")
        return value

    def baseline_name(self) -> str:
        return self.baseline or next(iter(self.models))


BENCHMARK_SECTION = RecipeSection("benchmark", BenchmarkSection)


@dataclass
class Benchmark:
    """A parsed benchmark config: one edit job per model (the same sections but ``model`` and
    ``output.uri``), the benchmark section and the judge."""

    root: str
    section: BenchmarkSection
    jobs: dict[str, JobConfig]
    judge: JudgeConfig

    @property
    def baseline(self) -> str:
        return self.section.baseline_name()

    @property
    def pairwise(self) -> bool:
        return self.judge.mode == "pairwise"

    def order(self) -> list[str]:
        """The baseline first (a pairwise judge compares the others with its finished root)."""
        return [self.baseline] + [n for n in self.jobs if n != self.baseline]

    def first(self) -> JobConfig:
        return self.jobs[self.baseline]

    def judge_for(self, name: str) -> JudgeConfig | None:
        """The judge of one model's edits; pairwise: against the baseline's root (the baseline
        itself is judged by nobody)."""
        if not self.pairwise:
            return self.judge
        if name == self.baseline:
            return None
        return self.judge.model_copy(update={"against": self.jobs[self.baseline].output.uri})


# ---------------------------------------------------------------------------------------------
# Config


def _model_error(name: str, err: ConfigError) -> ConfigError:
    """A model's config error with its keys named where they are in the benchmark's file (an
    error in a shared section is the same for every model: as it is)."""
    text, count = re.subn(r"(?m)^(\s*)model\.", rf"\1benchmark.models.{name}.", str(err))
    return ConfigError(text) if count else err


def parse_benchmark_config(raw: Any, base_dir: str | os.PathLike | None = None) -> Benchmark:
    """Validate a raw mapping: ``judge`` and ``benchmark`` split off, then one edit job config per
    model (the shared sections plus that model, under ``<root>/models/<name>``)."""
    rest, judge_raw = JUDGE_SECTION.split(raw)
    rest, section_raw = BENCHMARK_SECTION.split(rest)
    section = BENCHMARK_SECTION.validate(section_raw)
    if "model" in rest:
        raise ConfigError("model: a benchmark names its models under benchmark.models (name -> model section)")
    output = rest.get("output")
    if not isinstance(output, dict) or not isinstance(output.get("uri"), str) or not output["uri"]:
        raise ConfigError("invalid config:\n  output.uri: required (the benchmark's root)")
    root = local_path(output["uri"], base_dir).rstrip("/")
    runtime = dict(rest.get("runtime") or {})
    runtime.setdefault("run_id", default_run_id())  # one run id for every model's run
    jobs = {}
    for name, model in section.models.items():
        one = copy.deepcopy({**rest, "runtime": runtime})
        one["model"] = copy.deepcopy(model)
        one["output"] = {**output, "uri": join_uri(root, f"models/{name}")}
        try:
            jobs[name] = parse_config(one, base_dir)
        except ConfigError as e:
            raise _model_error(name, e) from None
        require_one_storage(jobs[name])
    judge_raw = dict(judge_raw)
    if judge_raw.get("mode") == "pairwise":
        if judge_raw.get("against"):
            raise ConfigError("judge.against: a benchmark judges every model against its baseline's root "
                              "(benchmark.baseline); leave against unset")
        judge_raw["against"] = jobs[section.baseline_name()].output.uri
    judge = JUDGE_SECTION.validate(judge_raw) if raw.get("judge") is not None else JudgeConfig()
    return Benchmark(root=root, section=section, jobs=jobs, judge=judge)


def load_benchmark_config(path: str, overrides: Sequence[str] = ()) -> Benchmark:
    """Read a YAML config, apply ``--set`` overrides (``benchmark.models.lora.dtype=float32`` too)."""
    return parse_benchmark_config(read_raw_config(path, overrides))


# ---------------------------------------------------------------------------------------------
# Pre-flight


def _check_model(name: str, cfg: JobConfig) -> None:
    """One model's own checks (its output root, weights, adapters, checksums; the adapters pinned
    and the model id derived), each problem one sentence naming the model."""
    try:
        preflight.check_output(cfg.output.uri, cfg.output_storage())
        model = cfg.model
        family = model.family_class()(model.spec())
        if model.weights and family.needs_weights:
            preflight.check_weights(model.weights, cfg.model_storage(), family)
        for i, adapter in enumerate(model.adapters):
            preflight.check_file(adapter.uri, cfg.model_storage(), f"model.adapters[{i}].uri", safetensors=True)
        for set_name, adapters in model.adapter_sets.items():
            for i, adapter in enumerate(adapters):
                preflight.check_file(adapter.uri, cfg.model_storage(), f"model.adapter_sets.{set_name}[{i}].uri",
                                     safetensors=True)
        if model.checksums:
            preflight.check_file(model.checksums, cfg.model_storage(), "model.checksums", safetensors=False)
        for adapters in (cfg.model.adapters, *cfg.model.adapter_sets.values()):
            pin_adapters(adapters, cfg.weights_source())
        cfg.family().model_id()  # the id every fingerprint of this model will hold
    except (JobRefused, OSError, ValueError) as e:
        raise JobRefused(f"benchmark.models.{name}: {e}") from None


def check_benchmark(bench: Benchmark) -> preflight.Preflight:
    """Every model's config, the shared input and output and the judge checked, nothing written:
    the manifest's facts."""
    for name in bench.order():
        _check_model(name, bench.jobs[name])
    first = bench.first()
    facts = preflight.check_job(first)  # the manifest (the same for every model), as the edit job checks it
    preflight.check_output(bench.root, first.output_storage())
    columns = set(facts.manifest_columns)
    missing = [c for c in bench.section.group_by or [] if columns and c not in columns]
    if missing:
        raise JobRefused(f"benchmark.group_by: {', '.join(missing)} is not a column of the manifest "
                         f"{redact_uri(first.input.manifest)}")
    check_judge(bench.judge, first.output_storage())
    return facts


# ---------------------------------------------------------------------------------------------
# The run


def _print(msg: str, *, err: bool = False) -> None:
    print(msg, file=sys.stderr if err else sys.stdout, flush=True)


def _failpoint(name: str) -> None:
    """Tests stop a benchmark at a named point (``STEP1X_BATCH_FAILPOINT=name``) to kill it there."""
    if os.environ.get(FAILPOINT_ENV) == name:
        _print(f"failpoint {name}: waiting to be killed")
        while True:
            time.sleep(1.0)


@dataclass
class BenchmarkSummary:
    """What a benchmark run did: per model, the edit run's and the scoring's outcome."""

    run_id: str
    ok: bool = True
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    table: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)


def _run_model(bench: Benchmark, name: str, facts: preflight.Preflight, lease: Lease) -> dict[str, Any]:
    """Edit with one model (a pointwise judge scores inside the edit graph), then score what is
    left unscored; returns the outcome."""
    cfg = bench.jobs[name]
    judge = bench.judge_for(name)
    inline = InlineJudge(judge, judge_prompts(judge)) if judge is not None and not bench.pairwise else None
    edited = runner.run_job(cfg, facts, lease, judge=inline)
    outcome: dict[str, Any] = {"root": cfg.output.uri, "ok": edited.ok, "rows_processed": edited.rows_processed,
                               "rows_skipped": edited.rows_skipped, "by_status": edited.by_status}
    if judge is not None:
        scored = score_output(cfg.output.uri, judge, cfg.output_storage(), ScoreRuntime.of_job(cfg), lease,
                              say=_print)
        _print(scored.line())
        outcome.update(scored=scored.scored, already_scored=scored.already_scored, score_stopped=scored.stopped)
        outcome["ok"] = outcome["ok"] and scored.stopped is None
    return outcome


def run_benchmark(bench: Benchmark, facts: preflight.Preflight, lease: Lease) -> BenchmarkSummary:
    """Every model in turn (baseline first), each under its own root's lease, then the tables,
    under the benchmark root's ``lease``."""
    summary = BenchmarkSummary(run_id=bench.first().runtime.run_id)
    names = bench.order()
    for k, name in enumerate(names, 1):
        cfg = bench.jobs[name]
        _print(f"benchmark: model {name} ({k} of {len(names)}) -> {redact_uri(cfg.output.uri)}")
        rt = cfg.runtime
        with held(cfg.output.uri, cfg.output_storage(), rt.run_id, ttl_s=rt.lease_ttl_s,
                  allow_unlocked=rt.allow_unlocked, job="benchmark", say=lambda m: _print(m, err=True)) as own:
            summary.models[name] = _run_model(bench, name, facts, own)
        summary.ok = summary.ok and summary.models[name]["ok"]
        if lease.lost.is_set():
            raise JobRefused(f"the lease on {redact_uri(bench.root)} was lost; the benchmark stopped")
        _failpoint("benchmark.after_model")
    models = read_models(bench)
    summary.table = benchmark_tables(bench, models)
    if lease.confirm():
        summary.files = write_results(bench, summary.table, models)
    _print(render_text(summary.table))
    for what, uri in summary.files.items():
        _print(f"  {what}: {redact_uri(uri)}")
    return summary


def run_config(path: str, overrides: Sequence[str] = ()) -> int:
    """Exit status of ``step1x-batch benchmark``: 0 every model finished, 1 a model's edit run went
    over its error budget (or its scoring stopped early), 2 refused before anything was written."""

    def run() -> bool:
        bench = load_benchmark_config(path, overrides)
        facts = check_benchmark(bench)
        cfg = bench.first()
        rt = cfg.runtime
        with held(bench.root, cfg.output_storage(), rt.run_id, ttl_s=rt.lease_ttl_s,
                  allow_unlocked=rt.allow_unlocked, job="benchmark", say=lambda m: _print(m, err=True)) as lease:
            return run_benchmark(bench, facts, lease).ok

    return exit_status(run)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m step1x_batch.recipes.benchmark --config X``."""
    return job_main("Edit the same rows with several models and compare them per category.", run_config, argv)


# ---------------------------------------------------------------------------------------------
# The tables


@dataclass
class ModelRows:
    """One model's current edits and their current scores, by row id."""

    name: str
    root: str
    edits: dict[str, dict[str, Any]]
    scores: dict[str, dict[str, Any]]

    def value(self, rid: str, measure: str) -> float | None:
        """A finite score or metric of the row's current edit (None: not scored, or an error)."""
        rec = self.scores.get(rid)
        if rec is None or rec.get("status") != "ok":
            return None
        value = rec.get(measure) if measure.startswith("score_") else (rec.get("metrics") or {}).get(measure)
        return float(value) if value is not None and math.isfinite(value) else None

    def scored(self, rid: str) -> bool:
        rec = self.scores.get(rid)
        return rec is not None and rec.get("status") == "ok"


def model_rows(bench: Benchmark, name: str) -> ModelRows:
    """Read one model's root: each id's latest ok edit, and its deciding score under the key the
    benchmark's judge scores it with."""
    cfg = bench.jobs[name]
    storage = cfg.output_storage()
    edits = {r["id"]: r for r in current_edits(cfg.output.uri, storage, _LOG_COLUMNS).to_pylist()}
    judge = bench.judge_for(name)
    scores: dict[str, dict[str, Any]] = {}
    if judge is not None and edits:
        table = candidates(cfg.output.uri, judge, storage, prompt_hash(judge))
        keys = dict(zip(table.column("id").to_pylist(), table.column("score_key").to_pylist()))
        for rec in current_scores(cfg.output.uri, storage, set(keys.values())).to_pylist():
            if keys.get(rec["id"]) == rec["score_key"]:
                scores[rec["id"]] = rec
    return ModelRows(name, cfg.output.uri, edits, scores)


def _extra(rec: dict[str, Any]) -> dict[str, Any]:
    try:
        doc = json.loads(rec.get("extra") or "{}")
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _groups(models: list[ModelRows], wanted: list[str] | None) -> tuple[list[str], dict[str, tuple[str, ...]]]:
    """The grouping columns (the default ones the rows carry) and each id's values of them."""
    extras: dict[str, dict[str, Any]] = {}
    for m in models:
        for rid, rec in m.edits.items():
            extras.setdefault(rid, _extra(rec))
    if wanted is None:
        wanted = [c for c in DEFAULT_GROUP_BY if any(c in e for e in extras.values())]
    values = {rid: tuple("(none)" if e.get(c) is None else str(e.get(c)) for c in wanted)
              for rid, e in extras.items()}
    return wanted, values


def _measures(bench: Benchmark, models: list[ModelRows]) -> list[str]:
    """What the table shows: SC / PQ / O of a pointwise VLM judge, else the image metrics that
    exist; a pairwise judge's table is its preferences."""
    if bench.pairwise:
        return []
    wanted = SCORE_MEASURES if bench.judge.engine != "none" else METRIC_MEASURES
    return [name for name, _, _ in wanted
            if any(m.value(rid, name) is not None for m in models for rid in m.scores)]


def _interval(values: list[float], resamples: int) -> dict[str, Any] | None:
    """Mean and bootstrap 95 % interval; a fixed seed per cell, so a rerun prints the same table."""
    return mean_interval(np.asarray(values, dtype=np.float64), np.random.default_rng(0), resamples)


def _cell(m: ModelRows, base: ModelRows | None, ids: list[str], measures: list[str], pairwise: bool,
          resamples: int) -> dict[str, Any]:
    """One model's numbers over one group's ids."""
    edited = sum(rid in m.edits for rid in ids)
    # n: the rows scored; a pairwise judge scores no baseline edit: its rows edited
    n = edited if pairwise and base is None else sum(m.scored(rid) for rid in ids)
    cell: dict[str, Any] = {"edited": edited, "n": n, "means": {}, "paired": {}}
    for name in measures:
        cell["means"][name] = _interval([v for rid in ids if (v := m.value(rid, name)) is not None], resamples)
        if base is not None:
            pairs = [(m.value(rid, name), base.value(rid, name)) for rid in ids]
            cell["paired"][name] = _interval([a - b for a, b in pairs if a is not None and b is not None], resamples)
    if pairwise and base is not None:
        prefs = [m.scores[rid].get("preference") for rid in ids if m.scored(rid)]
        n = len(prefs)
        cell["pairwise"] = {"n": n, **{k: (prefs.count(p) / n if n else None)
                                       for k, p in (("win", "A"), ("tie", "tie"), ("loss", "B"))}}
    return cell


def read_models(bench: Benchmark) -> list[ModelRows]:
    """Every model's rows, the baseline first."""
    return [model_rows(bench, name) for name in bench.order()]


def benchmark_tables(bench: Benchmark, models: list[ModelRows] | None = None) -> dict[str, Any]:
    """The benchmark's numbers, read back from every model's row log and scores log."""
    models = read_models(bench) if models is None else models
    base = models[0]
    group_by, values = _groups(models, bench.section.group_by)
    measures = _measures(bench, models)
    by_group: dict[tuple[str, ...], list[str]] = {}
    for rid in sorted(values):
        by_group.setdefault(values[rid], []).append(rid)
    keys = sorted(by_group) + [None]
    groups = []
    for key in keys:
        ids = sorted(values) if key is None else by_group[key]
        groups.append({
            "label": "all" if key is None else " / ".join(key),
            "values": None if key is None else dict(zip(group_by, key)), "rows": len(ids),
            "models": {m.name: _cell(m, None if m is base else base, ids, measures, bench.pairwise,
                                     bench.section.resamples) for m in models},
        })
    judge = bench.judge
    return {
        "baseline": bench.baseline, "models": [m.name for m in models], "group_by": group_by,
        "roots": {m.name: m.root for m in models},
        "judge": {"engine": judge.engine, "mode": judge.mode, "judge_id": judge.judge_id(),
                  "prompt_hash": prompt_hash(judge)},
        "measures": measures, "labels": {name: _LABELS[name] for name in measures},
        "note": _note(bench, measures), "groups": groups,
    }


def _note(bench: Benchmark, measures: list[str]) -> str:
    if bench.pairwise:
        return (f"pairwise judge: each model against the baseline {bench.baseline} "
                f"(axis {bench.judge.axis}); win = this model preferred")
    if bench.judge.engine == "none":
        shown = ", ".join(_LABELS[m] for m in measures) or "none (no edit was scored)"
        return f"metrics-only judge (engine none): it gives no SC / PQ / O; shown: the image metrics' means ({shown})"
    return "pointwise judge: SC (semantic consistency), PQ (perceptual quality), O (overall), 0-10"


# ---------------------------------------------------------------------------------------------
# Rendering


def _num(value: float, digits: int, sign: bool = False) -> str:
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _mean_text(stat: dict[str, Any] | None, digits: int, sign: bool = False) -> str:
    if not stat:
        return "-"
    return (f"{_num(stat['mean'], digits, sign)} [{_num(stat['low'], digits, sign)}, "
            f"{_num(stat['high'], digits, sign)}]")


def table_rows(table: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The table as text cells: a header and one row per (group, model)."""
    measures, labels, base = table["measures"], table["labels"], table["baseline"]
    several = len(table["models"]) > 1
    header = ["group", "model", "n"] + [labels[m] for m in measures]
    if several:
        header += [f"Δ{labels[m]} vs {base}" for m in measures]
    pairwise = table["judge"]["mode"] == "pairwise"
    if pairwise:
        header += [f"win / tie / loss vs {base}"]
    rows = []
    for group in table["groups"]:
        for name in table["models"]:
            cell = group["models"][name]
            row = [group["label"], name, str(cell["n"])] + [_mean_text(cell["means"].get(m), _DIGITS[m]) for m in measures]
            if several:
                row += [("(baseline)" if name == base else _mean_text(cell["paired"].get(m), _DIGITS[m], sign=True))
                        for m in measures]
            if pairwise:
                p = cell.get("pairwise")
                row.append("(baseline)" if name == base else
                           (f"{p['win']:.0%} / {p['tie']:.0%} / {p['loss']:.0%}" if p and p["n"] else "-"))
            rows.append(row)
    return header, rows


def _heading(table: dict[str, Any]) -> list[str]:
    j = table["judge"]
    by = ", ".join(table["group_by"]) or "(no grouping column)"
    return [f"benchmark: {', '.join(table['models'])} (baseline {table['baseline']}); judge {j['judge_id']}; "
            f"groups by {by}", table["note"]]


def render_text(table: dict[str, Any]) -> str:
    """The table as aligned plain text (the console)."""
    header, rows = table_rows(table)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    out = _heading(table) + ["", line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    return "\n".join(out)


def render_markdown(table: dict[str, Any]) -> str:
    """``table.md``: the heading and the table in Markdown."""
    header, rows = table_rows(table)
    md = lambda cells: "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"  # noqa: E731
    head = _heading(table)
    return "\n".join([f"# Benchmark\n\n{head[0]}\n\n{head[1]}\n", md(header), md(["---"] * len(header))]
                     + [md(r) for r in rows]) + "\n"


def write_results(bench: Benchmark, table: dict[str, Any], models: list[ModelRows]) -> dict[str, str]:
    """``<root>/benchmark/table.md``, ``table.json`` and ``report.html``; returns where they went."""
    storage = bench.first().output_storage()
    files = {"table": join_uri(bench.root, "benchmark/table.md"), "json": join_uri(bench.root, "benchmark/table.json"),
             "report": join_uri(bench.root, "benchmark/report.html")}
    write_bytes(files["table"], render_markdown(table).encode(), storage)
    write_bytes(files["json"], (json.dumps(table, indent=2, sort_keys=True) + "\n").encode(), storage)
    write_bytes(files["report"], render_report(bench, table, models).encode(), storage)
    return files


# ---------------------------------------------------------------------------------------------
# The report page

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em;color:#222;background:#fafbfc}
h1{font-size:1.3em} h2{font-size:1.1em;margin-top:1.6em} .meta{color:#555;font-size:.9em;margin:.2em 0}
table{border-collapse:collapse;background:#fff;margin:.5em 0} td,th{border-bottom:1px solid #ddd;padding:5px 8px;
text-align:left;vertical-align:top} th{background:#f2f4f7;font-weight:600}
table.nums td{font-variant-numeric:tabular-nums;white-space:nowrap} tr.all td{font-weight:600;background:#f7f9fb}
tr.first td{border-top:2px solid #c9ced6}
img{width:160px;height:120px;object-fit:contain;display:block;background:#f3f3f3}
.wide{overflow-x:auto} .ph{width:160px;height:90px;background:#eee;color:#888;
display:flex;align-items:center;justify-content:center;font-size:.8em}
.instr{white-space:pre-wrap;word-break:break-word;max-width:22em} .score{font-size:.85em;color:#333;margin-top:3px}
.id{font-family:monospace;font-size:.85em;color:#555}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _img(src: str | None, alt: str) -> str:
    return f'<img src="{src}" alt="{_e(alt)}">' if src else f'<div class="ph">{_e(alt)}</div>'


def _html_table(table: dict[str, Any]) -> str:
    header, rows = table_rows(table)
    per_group = len(table["models"])
    out = ['<div class="wide"><table class="nums"><tr>' + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"]
    for k, row in enumerate(rows):
        classes = " ".join(c for c in ("all" if row[0] == "all" else "", "first" if k % per_group == 0 else "") if c)
        out.append(f'<tr class="{classes}">' + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>")
    return "\n".join(out + ["</table></div>"])


def _score_text(bench: Benchmark, m: ModelRows, rid: str) -> str:
    rec = m.scores.get(rid)
    if rid not in m.edits:
        return "no edit"
    if rec is None:
        return "not scored" if not (bench.pairwise and m.name == bench.baseline) else "baseline"
    if rec.get("status") != "ok":
        return f"score error: {rec.get('error_type')}"
    if bench.pairwise:
        return {"A": "win", "B": "loss", "tie": "tie"}.get(rec.get("preference") or "", "-") + f" vs {bench.baseline}"
    measures = SCORE_MEASURES if bench.judge.engine != "none" else METRIC_MEASURES
    parts = [f"{label} {_num(v, digits)}" for name, label, digits in measures if (v := m.value(rid, name)) is not None]
    return " · ".join(parts) or "-"


def _thumbs(bench: Benchmark, inputs: list[str | None], outputs: list[str | None]) -> tuple[list[str | None], list[str | None]]:
    """Thumbnails of the rows' first inputs (an embedded image: the copy the job kept under the
    model's root, which the log names) and of every output, fetched in parallel."""
    cfg = bench.first()

    def one(item: tuple[str | None, Any]) -> str | None:
        uri, storage = item
        try:
            return thumbnail_data_uri(read_bytes(uri, storage), cfg.runtime.max_pixels) if uri else None
        except Exception:  # noqa: BLE001 - the page is for people; a missing thumbnail is shown as such
            return None

    with ThreadPoolExecutor(8) as pool:
        ins = list(pool.map(one, [(u, cfg.output_storage() if (u or "").startswith(bench.root + "/") else
                                   cfg.input.storage) for u in inputs]))
        outs = list(pool.map(one, [(u, cfg.output_storage()) for u in outputs]))
    return ins, outs


def render_report(bench: Benchmark, table: dict[str, Any], models: list[ModelRows]) -> str:
    """``report.html``: the table, then each row's input and every model's output side by side."""
    ids = sorted({rid for m in models for rid in m.edits})
    _, values = _groups(models, table["group_by"] or [])
    ids = sorted(ids, key=lambda r: (values.get(r, ()), r))[: bench.section.report_rows]
    first = {rid: next(m.edits[rid] for m in models if rid in m.edits) for rid in ids}
    inputs = [(first[rid].get("image_uris") or [None])[0] for rid in ids]
    outputs = [m.edits[rid]["output_uri"] if rid in m.edits else None for rid in ids for m in models]
    in_thumbs, out_thumbs = _thumbs(bench, inputs, outputs)
    head = _heading(table)
    body = [f"<h1>Benchmark: {_e(', '.join(table['models']))}</h1>", f'<p class="meta">{_e(head[0])}</p>',
            f'<p class="meta">{_e(head[1])}</p>', "<ul class=\"meta\">"]
    body += [f"<li>{_e(m.name)}: <code>{_e(redact_uri(m.root))}</code></li>" for m in models] + ["</ul>"]
    body += ["<h2>By group</h2>", _html_table(table)]
    shown = f"{len(ids)} rows" + (f" (of {len({r for m in models for r in m.edits})})"
                                  if len(ids) < len({r for m in models for r in m.edits}) else "")
    body += [f"<h2>Side by side: {_e(shown)}</h2>", "<table><tr><th>row</th><th>input</th>"
             + "".join(f"<th>{_e(m.name)}</th>" for m in models) + "</tr>"]
    for k, rid in enumerate(ids):
        group = " / ".join(values.get(rid, ()))
        cells = [f'<td><div class="id">{_e(rid)}</div><div class="meta">{_e(group)}</div>'
                 f'<div class="instr">{_e(first[rid].get("instruction"))}</div></td>',
                 f'<td>{_img(in_thumbs[k], "no input")}</td>']
        for j, m in enumerate(models):
            thumb = out_thumbs[k * len(models) + j]
            cells.append(f'<td>{_img(thumb, "no edit")}<div class="score">{_e(_score_text(bench, m, rid))}</div></td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    body.append("</table>")
    return ("<!doctype html><html><head><meta charset=\"utf-8\"><title>benchmark</title>"
            f"<style>{_CSS}</style></head><body>" + "\n".join(body) + "</body></html>\n")
