"""Nightly catalog re-rendering: render what changed, keep what did not, publish atomically.

A catalog manifest (``input.manifest``) has one row per item: an item id, an image URI, an
instruction (a column, or ``catalog.instruction_template`` filled from the row's columns) and a
change marker (an ETag, a content hash, an ``updated_at``: anything that changes when the picture
changes). Each run (``jobs/rerender_catalog.py --config configs/rerender-catalog.yaml``):

1. **Plan.** Every row is normalised exactly as the edit job does it, with the marker as the
   row's ``image_etag``, so its fingerprint changes with the image content, the instruction, the
   model and every pixel-changing parameter. An item whose fingerprint equals the one in the
   published ``catalog/latest.parquet`` is *unchanged* and not sent anywhere. Rows that cannot be
   work (no item id, an id used twice, a template column missing or null, an empty marker) are
   error records in this run's row log, never a crash.
2. **Render.** The other rows go to the dataset job as ``catalog/manifests/<run_id>.parquet``
   with output keys ``renders/<item_id>/<fingerprint[:16]>.<ext>``: a new render never
   overwrites the object the published ``latest`` points at. The job's resume rules apply, so an
   item rendered by an earlier run that was not published (error budget, crash) is not rendered
   again.
3. **Publish** -- only after the job returned, so after every row of the run is logged, and only
   when the run's error share is within ``runtime.max_error_fraction``: ``latest`` maps every item
   to its current render (new and changed items to this fingerprint's ``ok`` record; unchanged
   and failed items keep their previous entry; items gone from the catalog are dropped). Written as
   whole objects: ``catalog/history/<run_id>.parquet`` (for roll-back), then
   ``catalog/latest.parquet``, then ``catalog/runs/<run_id>.json`` with the counts. A failed or
   crashed run writes only its run json; ``latest`` is untouched.

   **Gate** (``catalog.gate`` with a ``judge:`` section; without one the metrics-only judge, enough
   for ``drop_unchanged``): before publishing, the output root's new renders are scored
   (``recipes/score.py``, each once per score key), and an item whose new render's current score
   fails the gate is *held back*: it keeps its previous ``latest`` entry (a new item is not
   published). The run json lists the held-back items with their reason (``held_back``) and the
   gate with its judge id and prompt hash (``gate``); ``held`` counts them (they are not
   ``new`` / ``changed``, and they are no errors: the error budget does not see them). A held-back
   render keeps its score (it is not asked again), so the item stays held back until its catalog
   row changes (a new render) or the gate or the judge does.

Counts per run: ``new``, ``changed``, ``unchanged``, ``failed`` (items whose current version has no
render: they keep the previous one), ``held`` (rendered, but held back by the gate), ``removed``;
plus ``rendered`` (edited in this run) and ``reused`` (rendered by an earlier, unpublished run).
Error budget: error records written by this run over rows attempted by this run (a row that failed
for good earlier and has not changed is not attempted again: it stays ``failed`` without counting
against each night's budget).

Runs of one catalog must not overlap (one nightly schedule): two runs publishing at once would
race on ``latest``. Superseded renders stay in storage; a lifecycle rule may delete objects under
``renders/`` that no ``latest`` or history snapshot references.

The ``catalog`` section is parsed by the recipes' shared parser (``recipes/section.py``), the plan
normalised and the edit run started through ``recipes/work.py``: docs/architecture.md.
"""

from __future__ import annotations

import collections
import datetime as _dt
import hashlib
import io
import json
import os
import sys
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from step1x_batch.errors import INVALID_ROW, RowError, redact, redact_uri
from step1x_batch.io.images import image_extension
from step1x_batch.io.storage import StorageOptions, join_uri, read_bytes, write_bytes
from step1x_batch.job.config import JobConfig, read_raw_config
from step1x_batch.job.entrypoint import check_lease_and_run, exit_status, job_main
from step1x_batch.job.lease import Lease, held
from step1x_batch.job.runner import RunSummary
from step1x_batch.judge.config import GateConfig, JudgeConfig, score_key
from step1x_batch.recipes.score import JUDGE_SECTION, ScoreRuntime, check_judge, prompt_hash, score_output
from step1x_batch.recipes.section import RecipeSection, one_instruction_source
from step1x_batch.recipes.synthesize import gate_judge, gate_records
from step1x_batch.recipes.work import job_family, normalise_like_the_job, run_edit_job
from step1x_batch.rows.log import part_uri, write_log_part
from step1x_batch.rows.manifest import (
    fill_template,
    image_columns,
    image_sources,
    manifest_base,
    marker_text,
    read_manifest_table,
    template_fields,
    write_manifest,
)
from step1x_batch.rows.state import LatestRecords, latest_records

__all__ = [
    "CatalogConfig",
    "CatalogJob",
    "CatalogSummary",
    "InputError",
    "LATEST_SCHEMA",
    "parse_catalog_config",
    "load_catalog_config",
    "render_key",
    "read_latest",
    "plan_catalog",
    "run_catalog",
    "run_config",
    "main",
]

LATEST_KEY = "catalog/latest.parquet"
_TS = pa.timestamp("us", tz="UTC")
LATEST_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("output_uri", pa.string()),  # the render; an object that exists (an ok record wrote it)
        ("fingerprint", pa.string()),  # of the row that made it
        ("rendered_at", _TS),
        ("run_id", pa.string()),  # the run that rendered it (maybe earlier than the publishing one)
        ("image_uri", pa.string()),  # the first input
        ("image_uris", pa.list_(pa.string())),  # every input, in order
        ("instruction", pa.string()),
        ("change_marker", pa.string()),
    ]
)
# Per-row parameter columns of the catalog passed on to the edit manifest as they are.
_PASSTHROUGH = ("seed", "num_steps", "guidance_scale", "size_level", "negative_prompt")


class CatalogConfig(BaseModel):
    """The ``catalog`` section: which catalog columns mean what."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    item_id_column: str = "item_id"
    image_column: str = "image_uri"
    instruction_column: str | None = None  # default "instruction" when no template is given
    # str.format fields name catalog columns: "Show the {product} on a {background} background".
    instruction_template: str | None = None
    # Changes when the image changes (etag, content hash, updated_at). null: none -- then an image
    # replaced under the same URI is NOT re-rendered.
    change_marker_column: str | None = "etag"
    # A quality bar for new renders (judged by the ``judge:`` section; without one, the metrics-only
    # judge, enough for drop_unchanged): a render that fails it is not published, its item keeps
    # its previous version (a new item stays unpublished).
    gate: GateConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_source(cls, data: Any) -> Any:
        return one_instruction_source(data, "instruction_template")

    @field_validator("instruction_template")
    @classmethod
    def _template_names_columns(cls, value: str | None) -> str | None:
        if value is not None:
            template_fields(value)  # ValueError: positional / attribute fields, bad braces
        return value


@dataclass
class CatalogJob:
    job: JobConfig
    catalog: CatalogConfig
    judge: JudgeConfig | None = None  # who scores the new renders (None: nobody)


class InputError(ValueError):
    """The catalog manifest cannot be used (exit status 2, nothing rendered or published)."""


# ---------------------------------------------------------------------------------------------
# Config


CATALOG_SECTION = RecipeSection("catalog", CatalogConfig)


def parse_catalog_config(raw: Any, base_dir: str | os.PathLike | None = None) -> CatalogJob:
    """Validate a raw mapping: ``judge`` split off first, ``catalog`` here, every other section by
    the edit job's parser."""
    rest, judge = JUDGE_SECTION.split(raw)
    job, catalog = CATALOG_SECTION.parse(rest, base_dir)
    given = JUDGE_SECTION.validate(judge) if raw.get("judge") is not None else None
    return CatalogJob(job, catalog, gate_judge(catalog.gate, given, "catalog.gate"))


def load_catalog_config(path: str, overrides: Sequence[str] = ()) -> CatalogJob:
    """Read a YAML config, apply ``--set`` overrides, validate."""
    return parse_catalog_config(read_raw_config(path, overrides))


# ---------------------------------------------------------------------------------------------
# latest


def render_key(item_id: str, fingerprint: str, ext: str) -> str:
    """Where an item's render for one fingerprint goes: never the object of another fingerprint."""
    return f"renders/{item_id}/{fingerprint[:16]}.{ext}"


def read_latest(output_uri: str, options: StorageOptions | None = None) -> dict[str, dict[str, Any]]:
    """The published ``latest`` as item_id -> entry ({} before the first publication)."""
    try:
        data = read_bytes(join_uri(output_uri, LATEST_KEY), options)
    except RowError:
        return {}
    table = pq.read_table(io.BytesIO(data))
    return {r["item_id"]: r for r in table.to_pylist()}


def _latest_bytes(entries: dict[str, dict[str, Any]]) -> bytes:
    rows = [entries[k] for k in sorted(entries)]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=LATEST_SCHEMA), buf, compression="zstd")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Plan


def _item_id(value: Any) -> str | None:
    if value is None or isinstance(value, (bool, bytes, list, dict)):
        return None
    if isinstance(value, float):
        if value != value:
            return None
        return str(int(value)) if value.is_integer() else str(value)
    text = str(value).strip()
    return text or None


@dataclass
class Plan:
    work: pa.Table  # normalised rows to send to the edit job (the job's own fingerprints)
    items: dict[str, dict[str, Any]]  # item_id -> fingerprint, image_uri, instruction, marker (valid rows)
    unchanged: list[str]
    invalid: list[dict[str, Any]]  # pre-job error records (id, fingerprint, error_type, ...)
    catalog_ids: set[str]  # every item id the catalog names, valid or not
    rows: int


def _invalid(item: str | None, raw: dict[str, Any], code: str, message: str, image_uri: Any,
             instruction: Any) -> dict[str, Any]:
    # A stand-in fingerprint of what the row asks for (``raw``: its relevant columns only): the
    # same bad row is logged once, not every night.
    text = json.dumps([item, code, message, raw], sort_keys=True, default=str)
    return {
        "id": item,
        "fingerprint": "catalog-invalid:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:32],
        "status": "error",
        "error_type": code,
        "error_message": redact(f"Catalog item {item!r}: {message}") if item else redact(message),
        "image_uri": image_uri if isinstance(image_uri, str) else None,
        "instruction": instruction if isinstance(instruction, str) else None,
    }


def plan_catalog(cj: CatalogJob, latest: dict[str, dict[str, Any]], work_uri: str) -> Plan:
    """Read the catalog and decide, item by item, what must be rendered."""
    job, c = cj.job, cj.catalog
    table = _read_catalog(job, c)
    rows = table.to_pylist()
    counts = collections.Counter(_item_id(r[c.item_id_column]) for r in rows)
    passthrough = [p for p in _PASSTHROUGH if p in table.column_names]
    relevant = _relevant_columns(c, passthrough)
    base = manifest_base(job.input.manifest)
    work_rows: list[dict[str, Any]] = []
    invalid: list[dict[str, Any]] = []
    for raw in rows:
        item = _item_id(raw[c.item_id_column])
        source = image_sources(raw[c.image_column], base)  # one URI, or a list of them
        try:
            work_rows.append(_work_row(raw, item, source, counts, c, passthrough))
        except RowError as e:
            text = raw.get(c.instruction_column) if c.instruction_column else None
            asked = {k: raw.get(k) for k in relevant}
            first = source[0] if isinstance(source, list) else source
            invalid.append(_invalid(item, asked, e.code, e.message, first, text))
    catalog_ids = {i for i in counts if i is not None}
    if not work_rows:
        return Plan(pa.table({}), {}, [], invalid, catalog_ids, len(rows))
    work, normalised = _with_render_keys(work_rows, job, work_uri)
    items, unchanged, send = _decide(work_rows, normalised, latest)
    return Plan(work.take(pa.array(send, pa.int64())), items, unchanged, invalid, catalog_ids, len(rows))


def _read_catalog(job: JobConfig, c: CatalogConfig) -> pa.Table:
    """The catalog manifest, refused whole (:class:`InputError`) when a named column is missing."""
    try:
        table = read_manifest_table(job.input.manifest, job.input.storage)
    except (ValueError, FileNotFoundError) as e:
        raise InputError(str(e)) from None
    required = [c.item_id_column, c.image_column, c.instruction_column, c.change_marker_column]
    missing = [name for name in required if name and name not in table.column_names]
    if missing:
        raise InputError(
            f"the catalog {redact_uri(job.input.manifest)} has no column(s) {missing}; it has "
            f"{table.column_names} (set the catalog.*_column options)"
        )
    return table


def _relevant_columns(c: CatalogConfig, passthrough: list[str]) -> list[str]:
    """The columns a row's request is made of (what an invalid row's stand-in fingerprint hashes)."""
    relevant = [c.item_id_column, c.image_column, c.instruction_column, c.change_marker_column]
    relevant += template_fields(c.instruction_template or "") + passthrough
    return [k for k in dict.fromkeys(relevant) if k]


def _work_row(raw: dict[str, Any], item: str | None, source: Any, counts: collections.Counter,
              c: CatalogConfig, passthrough: list[str]) -> dict[str, Any]:
    """One catalog row as an edit manifest row; :class:`RowError` when it cannot be work."""
    if item is None:
        raise RowError(INVALID_ROW, f"the row has no item id (column {c.item_id_column!r})")
    if counts[item] > 1:
        raise RowError(INVALID_ROW, f"item id {item!r} appears {counts[item]} times in the "
                       "catalog; each item must appear once")
    instruction = (fill_template(c.instruction_template, raw) if c.instruction_template
                   else raw[c.instruction_column])
    marker = None
    if c.change_marker_column:
        marker = marker_text(raw[c.change_marker_column])
        if marker is None:
            raise RowError(INVALID_ROW, f"the change marker (column {c.change_marker_column!r}) "
                           "is empty; without it a changed image cannot be noticed")
    row = {"id": item, **image_columns(source), "instruction": instruction, "image_etag": marker,
           "image_etags": [marker] * len(source) if isinstance(source, list) else None}
    row.update({p: raw[p] for p in passthrough})
    return row


def _with_render_keys(work_rows: list[dict[str, Any]], job: JobConfig,
                      work_uri: str) -> tuple[pa.Table, pa.Table]:
    """(the work with each row's render key, its normalisation): the key names the fingerprint,
    so the rows are normalised once for the fingerprints (output keys are not part of them) and
    again with the keys (an id unsafe in a key becomes an error row there)."""
    work = pa.Table.from_pylist(work_rows)
    first = normalise_like_the_job(work, job, work_uri)
    ext = image_extension(job.output.format)
    fps = first.column("fingerprint").to_pylist()
    keys = [render_key(r["id"], fp, ext) if fp else None for r, fp in zip(work_rows, fps)]
    work = work.append_column("output_key", pa.array(keys, pa.string()))
    return work, normalise_like_the_job(work, job, work_uri)


def _decide(work_rows: list[dict[str, Any]], normalised: pa.Table, latest: dict[str, dict[str, Any]]
            ) -> tuple[dict[str, dict[str, Any]], list[str], list[int]]:
    """(items, the unchanged ones, the indices of the rows to send): an item whose fingerprint is
    the published one is unchanged."""
    items: dict[str, dict[str, Any]] = {}
    unchanged: list[str] = []
    send = []
    for i, (r, n) in enumerate(zip(work_rows, normalised.select(["fingerprint", "error_type"]).to_pylist())):
        fp = n["fingerprint"] if not n["error_type"] else None
        uris = r["image_uris"] or [r["image_uri"]]
        items[r["id"]] = {"fingerprint": fp, "image_uri": uris[0], "image_uris": uris,
                          "instruction": r["instruction"], "change_marker": r["image_etag"]}
        prev = latest.get(r["id"])
        if fp and prev and prev["fingerprint"] == fp:
            unchanged.append(r["id"])
        else:
            send.append(i)
    return items, unchanged, send


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class CatalogSummary:
    run_id: str
    status: str  # "published" | "failed" (not published: error budget)
    published: bool
    counts: dict[str, int]  # items, new, changed, unchanged, failed, removed, rendered, reused, ...
    failed_by_error_type: dict[str, int]
    error_fraction: float  # errors written by this run / rows attempted by this run
    max_error_fraction: float
    latest_uri: str
    run_json: str
    model_id: str
    catalog: str
    started_at: str
    finished_at: str = ""
    edit: dict[str, Any] | None = None  # the edit run's summary (None: nothing to render)
    notes: list[str] = field(default_factory=list)
    # catalog.gate and its judge (judge_id, prompt_hash, the bars, held_by_reason); None: no gate
    gate: dict[str, Any] | None = None
    # the new renders the gate held back: item_id, reason, the held render, the version kept (or None)
    held_back: list[dict[str, Any]] = field(default_factory=list)
    scores: dict[str, Any] | None = None  # the scoring run's summary (None: no judge, or nothing new)

    def line(self) -> str:
        c = self.counts
        text = (f"catalog run {self.run_id}: {c['new']} new, {c['changed']} changed, "
                f"{c['unchanged']} unchanged, {c['failed']} failed, {c['removed']} removed "
                f"({c['rendered']} rendered now, {c['reused']} from an earlier run)")
        if self.gate is not None:
            text += f", {c.get('held', 0)} held back by catalog.gate"
        if self.published:
            return text + f"; published {self.latest_uri}"
        return text + (f" -- NOT PUBLISHED: error fraction {self.error_fraction:.3f} > max "
                       f"{self.max_error_fraction:.3f}; {self.latest_uri} is unchanged")


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _print(msg: str, *, err: bool = False) -> None:
    print(msg, file=sys.stderr if err else sys.stdout, flush=True)


def run_catalog(cj: CatalogJob, lease: Lease | None = None) -> CatalogSummary:
    """Plan, render what changed, score and gate the new renders (``catalog.gate``), publish when
    the run is within its error budget. ``lease``: the one the caller holds on the output root
    (None: held here for the run)."""
    job = cj.job
    out, opts, run_id = job.output.uri, job.output_storage(), job.runtime.run_id
    if lease is None:
        with held(out, opts, run_id, ttl_s=job.runtime.lease_ttl_s, allow_unlocked=job.runtime.allow_unlocked,
                  job="rerender", say=lambda m: _print(m, err=True)) as lease:
            return run_catalog(cj, lease)
    started = _now()
    work_uri = join_uri(out, f"catalog/manifests/{run_id}.parquet")
    latest = read_latest(out, opts)
    plan = plan_catalog(cj, latest, work_uri)
    summary = _new_summary(job, started)
    _print(f"catalog: {plan.rows} rows, {len(plan.unchanged)} unchanged, {plan.work.num_rows} to "
           f"render or check, {len(plan.invalid)} invalid")
    ids = set(plan.items) | {r["id"] for r in plan.invalid}
    new_invalid = _log_invalid(plan, ids, job, summary.model_id)
    edit = _render(plan, work_uri, job, summary, lease)
    verdict = _classify(plan, latest, latest_records(out, opts, ids), run_id)
    judged = _judge(cj, verdict, latest, summary, lease)
    _count_run(summary, verdict, plan, edit, new_invalid)
    if judged and _within_budget(summary, edit):
        _publish(verdict.entries, summary, job)
    _finish(summary, opts)
    _print(summary.line(), err=not summary.published)
    for h in summary.held_back[:20]:
        kept = f"keeps {h['kept']}" if h["kept"] else "not published"
        _print(f"  held back: {h['item_id']} ({h['reason']}): {kept}")
    if len(summary.held_back) > 20:
        _print(f"  ... and {len(summary.held_back) - 20} more (see {summary.run_json})")
    return summary


def _new_summary(job: JobConfig, started: _dt.datetime) -> CatalogSummary:
    """The run's summary before anything is known: ``failed`` until it publishes."""
    out = job.output.uri
    return CatalogSummary(
        run_id=job.runtime.run_id, status="failed", published=False, counts={}, failed_by_error_type={},
        error_fraction=0.0, max_error_fraction=job.runtime.max_error_fraction,
        latest_uri=join_uri(out, LATEST_KEY), run_json=join_uri(out, f"catalog/runs/{job.runtime.run_id}.json"),
        model_id=job_family(job).model_id(), catalog=redact_uri(job.input.manifest),
        started_at=started.isoformat(timespec="seconds"),
    )


def _log_invalid(plan: Plan, ids: set[str], job: JobConfig, model_id: str) -> list[dict[str, Any]]:
    """Rows that cannot be work become error records of this run, once per distinct bad row
    (one already in the log from an earlier night is not written again); returns the new ones."""
    out, opts, run_id = job.output.uri, job.output_storage(), job.runtime.run_id
    errored_before = latest_records(out, opts, ids).errored if plan.invalid else set()
    new_invalid = [r for r in plan.invalid if (r["id"], r["fingerprint"]) not in errored_before]
    if new_invalid:
        now = _now()
        recs = [{**r, "run_id": run_id, "attempt": 1, "started_at": now, "finished_at": now,
                 "model_id": model_id} for r in new_invalid]
        write_log_part(pa.Table.from_pylist(recs), part_uri(out, run_id, f"catalog-{uuid.uuid4().hex[:8]}"), opts)
    return new_invalid


def _render(plan: Plan, work_uri: str, job: JobConfig, summary: CatalogSummary,
            lease: Lease | None) -> RunSummary | None:
    """The edit run on the rows to render (None when there are none); a crash is written to the
    run json (``crashed``, ``latest`` untouched) and raised."""
    if not plan.work.num_rows:
        return None
    write_manifest(plan.work, work_uri, job.output_storage())
    try:
        edit = run_edit_job(job, work_uri, plan.work.num_rows, lease)
    except BaseException as e:
        summary.status = "crashed"
        summary.notes.append(redact(f"edit run crashed: {type(e).__name__}: {e}"))
        _finish(summary, job.output_storage())
        raise
    summary.edit = asdict(edit)
    return edit


@dataclass
class Verdict:
    """Every item of the catalog against ``latest`` and the row state."""

    counts: collections.Counter[str]  # new, changed, unchanged, failed, removed, rendered, reused, held
    failed_by: collections.Counter[str]  # error type -> items
    entries: dict[str, dict[str, Any]]  # the ``latest`` to publish: item_id -> entry
    fresh: list[str] = field(default_factory=list)  # items whose entry is a new render (new, changed)


def _classify(plan: Plan, latest: dict[str, dict[str, Any]], state: LatestRecords, run_id: str) -> Verdict:
    """Each item's count and the entry it gets in ``latest``: its new render, or its previous one
    (unchanged, failed); an item gone from the catalog gets none. ``state``: the row state's
    latest records of the catalog's items."""
    ok, err = state.ok, state.error
    v = Verdict(collections.Counter({k: 0 for k in ("new", "changed", "unchanged", "failed", "removed",
                                                    "rendered", "reused", "held")}), collections.Counter(), {})
    for item, info in plan.items.items():
        prev = latest.get(item)
        if item in plan.unchanged:
            v.counts["unchanged"] += 1
            v.entries[item] = prev
            continue
        rec = ok.get((item, info["fingerprint"])) if info["fingerprint"] else None
        if rec is None:
            v.counts["failed"] += 1
            last = err.get(item)
            v.failed_by[last["error_type"] if last else "not_done"] += 1
            if prev:
                v.entries[item] = prev  # keeps its previous render
            continue
        v.counts["changed" if prev else "new"] += 1
        v.counts["rendered" if rec["run_id"] == run_id else "reused"] += 1
        v.entries[item] = _latest_entry(item, info, rec)
        v.fresh.append(item)
    for r in plan.invalid:
        v.counts["failed"] += 1
        v.failed_by[r["error_type"]] += 1
        if r["id"] in latest and r["id"] not in v.entries:
            v.entries[r["id"]] = latest[r["id"]]
    v.counts["removed"] = sum(1 for item in latest if item not in plan.catalog_ids)
    return v


def _judge(cj: CatalogJob, verdict: Verdict, latest: dict[str, dict[str, Any]], summary: CatalogSummary,
           lease: Lease) -> bool:
    """Score the output root's new renders (each once per score key), then hold back the fresh
    items whose render fails ``catalog.gate``: such an item keeps its previous ``latest`` entry, a
    new one gets none. False when the scoring stopped early (the lease was lost): publish nothing."""
    gate = cj.catalog.gate
    judge = gate_judge(gate, cj.judge, "catalog.gate")
    if gate is not None and judge is not None:
        summary.gate = {"judge_id": judge.judge_id(), "prompt_hash": prompt_hash(judge),
                        "bars": gate.model_dump(), "held_by_reason": {}}
    if judge is None or not verdict.fresh:
        return True
    job = cj.job
    fresh = {item: verdict.entries[item]["fingerprint"] for item in verdict.fresh}
    scored = score_output(job.output.uri, judge, job.output_storage(), ScoreRuntime.of_job(job), lease,
                          say=_print, only=fresh)  # tonight's renders, not the whole catalog
    summary.scores = asdict(scored)
    _print(scored.line())
    if scored.stopped:
        summary.notes.append(f"scoring stopped ({scored.stopped}): not published")
        return False
    if gate is None or summary.gate is None:
        return True
    keys = {item: score_key(verdict.entries[item]["fingerprint"], scored.judge_id, scored.prompt_hash)
            for item in verdict.fresh}
    records = gate_records(job.output.uri, job.output_storage(), keys)
    held_by: collections.Counter[str] = collections.Counter()
    for item in sorted(verdict.fresh):
        rec = records.get(item)
        reason = gate.failure(rec)
        if reason is None:
            continue
        prev, render = latest.get(item), verdict.entries.pop(item)
        verdict.counts["changed" if prev else "new"] -= 1
        verdict.counts["held"] += 1
        held_by[reason] += 1
        summary.held_back.append({
            "item_id": item, "reason": reason, "render": render["output_uri"], "fingerprint": render["fingerprint"],
            "kept": prev["output_uri"] if prev else None,
            **{k: (rec or {}).get(k) for k in ("score_sc", "score_pq", "score_o", "error_type")}})
        if prev:
            verdict.entries[item] = prev
    summary.gate["held_by_reason"] = dict(sorted(held_by.items()))
    return True


def _latest_entry(item: str, info: dict[str, Any], rec: dict[str, Any]) -> dict[str, Any]:
    """An item's ``latest`` entry for its ``ok`` record ``rec`` (of this run or an earlier one)."""
    return {"item_id": item, "output_uri": rec["output_uri"], "fingerprint": info["fingerprint"],
            "rendered_at": rec["finished_at"], "run_id": rec["run_id"], "image_uri": info["image_uri"],
            "image_uris": info["image_uris"], "instruction": info["instruction"],
            "change_marker": info["change_marker"]}


def _count_run(summary: CatalogSummary, verdict: Verdict, plan: Plan, edit: RunSummary | None,
               new_invalid: list[dict[str, Any]]) -> None:
    """The summary's counts and this night's error fraction: errors written by this run over rows
    attempted by this run."""
    counts = verdict.counts
    counts["items"] = plan.rows
    counts["processed"] = edit.rows_processed if edit else 0
    counts["skipped_done"] = edit.rows_skipped if edit else 0
    attempted = counts["processed"] + len(new_invalid)
    errors_now = (edit.by_status.get("error", 0) if edit else 0) + len(new_invalid)
    summary.counts = dict(counts)
    summary.failed_by_error_type = dict(sorted(verdict.failed_by.items()))
    summary.error_fraction = round(errors_now / attempted, 6) if attempted else 0.0


def _within_budget(summary: CatalogSummary, edit: RunSummary | None) -> bool:
    """The catalog's own budget (this night's attempts) decides; the edit run's verdict counts only
    when it stopped for another reason than its budget (which also counts earlier nights' errors)."""
    edit_stopped = edit is not None and not edit.ok and edit.error_fraction <= edit.max_error_fraction
    return summary.error_fraction <= summary.max_error_fraction and not edit_stopped


def _publish(entries: dict[str, dict[str, Any]], summary: CatalogSummary, job: JobConfig) -> None:
    """The history snapshot, then ``latest`` itself: one whole-object put each."""
    opts = job.output_storage()
    data = _latest_bytes(entries)
    write_bytes(join_uri(job.output.uri, f"catalog/history/{summary.run_id}.parquet"), data, opts)
    write_bytes(summary.latest_uri, data, opts)  # the publication
    summary.status, summary.published = "published", True


def _finish(summary: CatalogSummary, opts: StorageOptions | None) -> None:
    summary.finished_at = _now().isoformat(timespec="seconds")
    write_bytes(summary.run_json, (json.dumps(asdict(summary), indent=2, default=str) + "\n").encode(), opts)


def run_config(path: str, overrides: Sequence[str] = ()) -> int:
    """Load, run, and return the exit status (0 done, 1 error budget exceeded: nothing published,
    2 a config, input or cluster problem); for ``step1x-batch rerender CONFIG``."""

    def run() -> bool:
        cj = load_catalog_config(path, overrides)
        checks = (lambda: check_judge(cj.judge, cj.job.output_storage())) if cj.judge is not None else None
        return check_lease_and_run(cj.job, lambda facts, lease: run_catalog(cj, lease).published,
                                   job="rerender", required_columns=_required_columns(cj.catalog),
                                   extra_checks=checks)

    return exit_status(run)


def _required_columns(c: CatalogConfig) -> dict[str, tuple[str, ...]]:
    """The catalog columns the pre-flight checks for, keyed by the setting that names each."""
    required = CATALOG_SECTION.required_columns({
        "item_id_column": c.item_id_column, "image_column": c.image_column,
        "instruction_column": c.instruction_column, "change_marker_column": c.change_marker_column})
    if c.instruction_template:
        required |= {f"catalog.instruction_template ({{{f}}})": (f,) for f in template_fields(c.instruction_template)}
    return required


def main(argv: Sequence[str] | None = None) -> int:
    """``python jobs/rerender_catalog.py --config X [--set k=v ...]``."""
    return job_main("Re-render the catalog items that changed and publish latest.", run_config, argv)
