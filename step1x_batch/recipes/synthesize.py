"""Synthetic training pairs: images x instructions x K seeds -> the edit job -> a training dataset.

Flow (``jobs/synthesize_pairs.py --config configs/synthesize-pairs.yaml``):

1. **Expand.** Every image of the images manifest (``input.manifest``) gets its instructions --
   from a manifest column (text, or a list of texts) or from a templates file (the same list for
   every image) -- optionally sampled down to ``pairs.instructions_per_image`` with a generator
   seeded from ``pairs.sample_seed`` and the image, and each (image, instruction) gets
   ``pairs.variants`` seeds derived from ``sampling.seed_base``, the image, the instruction and
   the variant number (distinct within the pair, stable across runs). Row id =
   hash(source image URI, instruction, variant); identical rows collapse to one.
2. **Edit.** The expansion is written as an ordinary edit manifest,
   ``pairs/manifests/<content hash>.parquet`` under ``output.uri``, with output keys
   ``pairs/images/<id>.<ext>``, and run by the dataset job (:func:`step1x_batch.job.runner.run_job`)
   with the same resume rules: a second run edits nothing; changing a pixel-changing parameter
   redoes the rows in place.
3. **Export** (only when the edit run stayed within its error budget). The row log is joined to the
   expansion by (id, fingerprint): a row is exported when an ``ok`` record holds its *current*
   fingerprint, so stale renders never leak in; rows without one are counted by error type in the
   card. ``dataset/data/{train,validation}-NNNNN-of-MMMMM.parquet`` shards, then the stale shards
   of an earlier export are removed, then ``dataset/dataset_info.json`` and ``dataset/README.md``
   (a Hugging Face dataset card) last. An export whose content did not change is not rewritten
   (the folder stays byte-identical, ``created_at`` included).

   **Quality filter** (``pairs.filter``: ``min_sc``, ``min_pq``, ``min_o``, ``drop_unchanged``,
   ``require_size_ok``; judged by the config's ``judge:`` section, or without one by the
   metrics-only judge, which is enough for ``drop_unchanged`` / ``require_size_ok`` -- a bar on
   SC / PQ / O without a VLM judge is a config error): after the edit run the output root is
   scored (``recipes/score.py``: every pair once per score key, a rerun asks nothing), and a pair
   is exported only when its current score -- the record under score_key(its fingerprint, the
   judge id, the prompt hash) -- passes. ``dataset_info.json`` (``quality``) and the card give
   the judge id, the prompt hash, the filter and the kept / dropped counts per reason;
   ``dataset/dropped.jsonl`` lists every dropped pair (id, reason, scores, image URIs). With a
   judge the shards also carry ``score_sc``, ``score_pq``, ``score_o`` and ``changed_fraction``.
   Same edits, same scores, same filter: the same dataset bytes.

Columns of the exported dataset (``EXPORT_VERSION`` 2). ``source_image`` and ``edited_image`` are
Hugging Face ``datasets`` ``Image`` features: ``{bytes: binary, path: string}`` struct columns, with
the features declared in each shard's Parquet schema metadata under ``huggingface`` (the JSON
``{"info": {"features": ...}}`` that ``datasets`` itself writes; written here with pyarrow, so the job
does not import ``datasets``). ``load_dataset("parquet", ...)``, ``Dataset.from_parquet`` and
loading the dataset folder therefore give ``PIL.Image.Image`` values; pyarrow / pandas readers see
the structs. ``path`` is the image's URI, and the same URIs are plain string columns too,
``source_image_uri`` and ``edited_image_uri`` (the form exports before version 2 stored in
``source_image`` / ``edited_image``); ``source_images`` stays the list of every input URI.

``pairs.embed_bytes`` (default true): ``bytes`` holds the image file as stored (the source in its
own format, the edit as the job wrote it), so the dataset is self-contained and decodes anywhere.
False: ``bytes`` is null and ``datasets`` decodes by opening ``path`` itself -- fine for local
paths (and public http(s) URLs), but an object-storage URI is opened through fsspec without the
job's storage options (endpoint, credentials), so it decodes only where those come from the
environment; the shards are small and the images stay where the job wrote them. The columns and
their types are the same either way. The images are read (once per shard, 100 rows per Parquet
row group, bounded memory) only when an export is actually written; the export fingerprint is
computed from the rows (URIs, parameters, each row's ``ok`` fingerprint) before that, so an
unchanged export reads no image.

Split: ``validation`` when sha256 of the source image URI, read as a fraction of 2**64, is below
``pairs.validation_fraction``; so the split is a function of the source alone and every pair made
from one image lands in the same split (no train/validation leakage).

The expansion and the export run on the driver (pandas / pyarrow): fine for millions of pairs;
the editing itself is the Ray job. The ``pairs`` section is parsed by the recipes' shared parser
(``recipes/section.py``), the expansion normalised and the edit run started through
``recipes/work.py``: docs/architecture.md.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import io
import json
import math
import os
import posixpath
import random
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from step1x_batch.errors import RowError, redact_uri
from step1x_batch.io.images import image_extension
from step1x_batch.io.storage import (
    StorageOptions,
    exists,
    filesystem,
    join_uri,
    read_bytes,
    write_bytes,
)
from step1x_batch.job.config import ConfigError, JobConfig, read_raw_config
from step1x_batch.job.entrypoint import check_lease_and_run, exit_status, job_main
from step1x_batch.job.lease import Lease, held
from step1x_batch.job.preflight import check_file
from step1x_batch.judge.config import GateConfig, JudgeConfig, score_key
from step1x_batch.judge.scores import current_scores
from step1x_batch.recipes.score import JUDGE_SECTION, ScoreRuntime, check_judge, prompt_hash, score_output
from step1x_batch.recipes.section import RecipeSection, one_instruction_source, local_path
from step1x_batch.recipes.work import job_family, normalise_like_the_job, run_edit_job
from step1x_batch.rows.manifest import (
    SEED_LIMIT,
    image_columns,
    image_sources,
    manifest_base,
    read_manifest_table,
    write_manifest,
)
from step1x_batch.rows.state import latest_records

__all__ = [
    "PairsConfig",
    "SynthesizeJob",
    "SynthesizeSummary",
    "InputError",
    "parse_synthesize_config",
    "load_synthesize_config",
    "read_templates",
    "pair_id",
    "variant_seeds",
    "split_of",
    "expand_pairs",
    "prepare_work",
    "export_dataset",
    "filter_rows",
    "gate_judge",
    "gate_records",
    "run_synthesize",
    "weights_license",
    "run_config",
    "main",
]

DATASET_DIR = "dataset"
DATA_DIR = "dataset/data"
DROPPED_KEY = "dataset/dropped.jsonl"  # the pairs pairs.filter left out, one JSON object a line
SPLITS = ("train", "validation")
EXPORT_VERSION = 2  # 2: source_image / edited_image as Image features, *_uri string columns
ROW_GROUP_ROWS = 100  # rows per Parquet row group of a shard (images are read a row group at a time)
# Per-row parameter columns of the images manifest passed on to the edit manifest as they are.
_PASSTHROUGH = ("num_steps", "guidance_scale", "size_level", "negative_prompt", "image_etag", "image_etags")


class PairsConfig(BaseModel):
    """The ``pairs`` section: where instructions come from, how many pairs, what the dataset says."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # column of the images manifest holding the source image URI, or a list of them (a
    # multi-reference source: every pair made from it reads all of them, in order)
    image_column: str = "image_uri"
    # Instruction source, exactly one of: a column (text, or a list of texts per image) ...
    instruction_column: str | None = None  # default "instruction" when no templates file is given
    # ... or a templates file, any fsspec URI: YAML / JSON list (or {"instructions": [...]}) or
    # plain text, one instruction per line ('#' comments and blank lines skipped).
    templates: str | None = None
    templates_storage: StorageOptions | None = None  # None: input.storage
    instructions_per_image: int | None = Field(None, ge=1)  # N: sample N per image (None: all)
    sample_seed: int = Field(0, ge=0)  # which N an image gets (with the image URI)
    variants: int = Field(1, ge=1, le=1000)  # K: seeds per (image, instruction)
    validation_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    # the Image columns' bytes in the shards (self-contained); false: path only (see the module doc)
    embed_bytes: bool = True
    max_shard_rows: int = Field(1000, ge=1)
    # The dataset card.
    name: str = "step1x-edit-synthetic-pairs"
    description: str = ""
    license: str = "other"  # the dataset's licence (Hugging Face identifier)
    # The editing model's weights; None: the family's (ModelFamily.weights_license: Step1X-Edit
    # and Qwen-Image-Edit apache-2.0, RealRestorer's non-commercial weights "other").
    weights_license: str | None = None
    source_images_license: str = "unspecified"  # say what the source images allow
    # The quality filter: only pairs whose current score passes are exported (judged by the
    # ``judge:`` section; without one, the metrics-only judge, enough for drop_unchanged).
    filter: GateConfig | None = None

    @model_validator(mode="before")
    @classmethod
    def _one_source(cls, data: Any) -> Any:
        return one_instruction_source(data, "templates")


class InputError(ValueError):
    """The images manifest or templates cannot be used (exit status 2, nothing edited)."""


@dataclass
class SynthesizeJob:
    """A parsed synthesize config: the edit job's sections plus ``pairs`` (and ``judge``: who
    scores the pairs after editing; None: nobody)."""

    job: JobConfig
    pairs: PairsConfig
    judge: JudgeConfig | None = None


# ---------------------------------------------------------------------------------------------
# Config


PAIRS_SECTION = RecipeSection("pairs", PairsConfig)


def parse_synthesize_config(raw: Any, base_dir: str | os.PathLike | None = None) -> SynthesizeJob:
    """Validate a raw mapping: ``judge`` split off first, ``pairs`` here, every other section by
    the edit job's parser; a local templates file is taken relative to ``base_dir``."""
    rest, judge = JUDGE_SECTION.split(raw)
    job, pairs = PAIRS_SECTION.parse(rest, base_dir)
    if pairs.templates:
        pairs.templates = local_path(pairs.templates, base_dir)
    given = JUDGE_SECTION.validate(judge) if raw.get("judge") is not None else None
    return SynthesizeJob(job, pairs, gate_judge(pairs.filter, given, "pairs.filter"))


def load_synthesize_config(path: str, overrides: Sequence[str] = ()) -> SynthesizeJob:
    """Read a YAML config, apply ``--set`` overrides (``pairs.variants=4`` too), validate."""
    return parse_synthesize_config(read_raw_config(path, overrides))


def gate_judge(gate: GateConfig | None, judge: JudgeConfig | None, where: str) -> JudgeConfig | None:
    """The judge a recipe scores its edits with: the ``judge:`` section, or, for a gate set
    without one, the metrics-only judge. Bars on SC / PQ / O need a VLM to answer, and a pairwise
    judge scores no single edit: both a :class:`ConfigError` of one line."""
    if gate is None:
        return judge
    judge = judge or JudgeConfig()
    if judge.mode == "pairwise":
        raise ConfigError(f"invalid config: {where}: a quality bar needs judge.mode single "
                          "(a pairwise judge compares two output roots, it scores no single edit)")
    bars = [f"min_{n}" for n in ("sc", "pq", "o") if getattr(gate, f"min_{n}") is not None]
    if bars and judge.engine == "none":
        raise ConfigError(f"invalid config: {where}: {', '.join(bars)} need(s) a VLM judge (a judge: "
                          "section with engine transformers, http or vllm); drop_unchanged and "
                          "require_size_ok need none")
    return judge


def gate_records(output_uri: str, storage: StorageOptions | None, keys: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The current score record of each id under its own score key (``keys``: id -> key); an id
    with no record for its key (never scored, or scored for another edit) is absent."""
    if not keys:
        return {}
    current = current_scores(output_uri, storage, set(keys.values()))
    return {r["id"]: r for r in current.to_pylist() if keys.get(r["id"]) == r["score_key"]}


def weights_license(sj: SynthesizeJob) -> str:
    """The licence the dataset card gives the model's weights: ``pairs.weights_license`` when
    set, else the family's own."""
    if sj.pairs.weights_license is not None:
        return sj.pairs.weights_license
    return job_family(sj.job).weights_license()


# ---------------------------------------------------------------------------------------------
# Expansion


def _digest(*parts: Any) -> bytes:
    text = "\x00".join("" if p is None else str(p) for p in parts)
    return hashlib.sha256(text.encode("utf-8")).digest()


def read_templates(uri: str, options: StorageOptions | None = None) -> list[str]:
    """The instructions of a templates file: stripped, blanks dropped, duplicates once, in order.

    ``*.yaml`` / ``*.yml`` / ``*.json``: a list of texts or ``{"instructions": [...]}``; anything
    else: one instruction per line, ``#`` comment lines skipped. Raises ValueError when the file
    holds no usable instruction or something other than texts."""
    data = read_bytes(uri, options).decode("utf-8-sig")
    name = posixpath.basename(uri.split("?", 1)[0]).lower()
    if name.endswith((".yaml", ".yml", ".json")):
        try:
            doc = json.loads(data) if name.endswith(".json") else yaml.safe_load(data)
        except (ValueError, yaml.YAMLError) as e:
            raise ValueError(f"templates file {redact_uri(uri)} is not valid: {e}") from None
        if isinstance(doc, dict) and "instructions" in doc:
            doc = doc["instructions"]
        if not isinstance(doc, list) or not all(isinstance(t, str) for t in doc):
            raise ValueError(
                f"templates file {redact_uri(uri)} must hold a list of texts "
                "(or a mapping with an 'instructions' list)"
            )
        items = doc
    else:
        items = [line for line in data.splitlines() if not line.lstrip().startswith("#")]
    out = list(dict.fromkeys(t.strip() for t in items if t.strip()))
    if not out:
        raise ValueError(f"templates file {redact_uri(uri)} holds no instructions")
    return out


def pair_id(source_uri: str | None, instruction: str | None, variant: int) -> str:
    """The row id of one pair: 20 hex digits of sha256(source URI, instruction, variant)."""
    return hashlib.sha256(
        json.dumps([source_uri, instruction, int(variant)], ensure_ascii=False).encode("utf-8")
    ).hexdigest()[:20]


def variant_seeds(seed_base: int, source_uri: str | None, instruction: str | None, k: int) -> list[int]:
    """K distinct seeds in [0, 2**31) for one (image, instruction): hash-derived, stable, and a
    prefix of the K+1 list (adding variants keeps the earlier ones)."""
    seeds: list[int] = []
    for v in range(k):
        salt = 0
        while True:
            digest = _digest("variant", seed_base, source_uri, instruction, v, salt)
            seed = int.from_bytes(digest[:8], "big") % SEED_LIMIT
            if seed not in seeds:
                break
            salt += 1  # a collision within the pair (odds ~K^2 / 2**32): draw again
        seeds.append(seed)
    return seeds


def split_of(source_uri: Any, validation_fraction: float) -> str:
    """``"validation"`` or ``"train"``, a function of the source (its image URI, or the list of
    them for a multi-reference source) alone."""
    u = int.from_bytes(_digest("split", source_uri)[:8], "big") / 2.0**64
    return "validation" if u < validation_fraction else "train"


def _instructions(value: Any) -> list[str | None]:
    """A manifest cell as a list of instructions: text -> [text], list -> its texts, null -> []."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [v.strip() if isinstance(v, str) else v for v in value if v is not None]
    if isinstance(value, float) and math.isnan(value):
        return []
    return [value.strip() if isinstance(value, str) else value]


def _sample(instructions: list, n: int | None, sample_seed: int, source: str | None) -> list:
    if n is None or len(instructions) <= n:
        return instructions
    rng = random.Random(int.from_bytes(_digest("sample", sample_seed, source)[:8], "big"))
    keep = sorted(rng.sample(range(len(instructions)), n))
    return [instructions[i] for i in keep]


@dataclass
class Expansion:
    rows: list[dict[str, Any]]
    images: int
    duplicates_dropped: int
    instructions: int  # distinct instruction texts


def expand_pairs(images: pa.Table, sj: SynthesizeJob, templates: list[str] | None = None) -> Expansion:
    """Images manifest rows -> edit manifest rows (id, image_uri, instruction, seed, output_key,
    variant, and any per-row parameter columns the images manifest has)."""
    p, job = sj.pairs, sj.job
    if p.image_column not in images.column_names:
        raise ValueError(f"the images manifest has no column {p.image_column!r} (pairs.image_column)")
    if templates is None and p.instruction_column not in images.column_names:
        raise ValueError(
            f"the images manifest has no column {p.instruction_column!r} (pairs.instruction_column)"
        )
    base = manifest_base(job.input.manifest)
    ext = image_extension(job.output.format)
    passthrough = [c for c in _PASSTHROUGH if c in images.column_names]
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    dropped = 0
    texts: set[str] = set()
    for raw in images.to_pylist():
        source = image_sources(raw.get(p.image_column), base)
        found = list(templates) if templates is not None else _instructions(raw.get(p.instruction_column))
        found = list(dict.fromkeys(found))
        chosen = _sample(found, p.instructions_per_image, p.sample_seed, source) or [None]
        for instruction in chosen:  # [None]: no instruction -> one row the job logs as an error
            seeds = variant_seeds(job.sampling.seed_base, source, instruction, p.variants)
            for k, seed in enumerate(seeds if instruction is not None else seeds[:1]):
                rid = pair_id(source, instruction, k)
                if rid in seen:
                    dropped += 1
                    continue
                seen.add(rid)
                if isinstance(instruction, str):
                    texts.add(instruction)
                row = {"id": rid, **image_columns(source), "instruction": instruction, "seed": seed,
                       "output_key": f"pairs/images/{rid}.{ext}", "variant": k}
                row.update({c: raw.get(c) for c in passthrough})
                rows.append(row)
    return Expansion(rows, images.num_rows, dropped, len(texts))


def _work_table(rows: list[dict[str, Any]]) -> pa.Table:
    columns = ["id", "image_uri", "image_uris", "instruction", "seed", "output_key", "variant"]
    columns += [c for c in _PASSTHROUGH if rows and c in rows[0]]
    types = {"id": pa.string(), "image_uri": pa.string(), "image_uris": pa.list_(pa.string()),
             "instruction": pa.string(), "seed": pa.int64(), "output_key": pa.string(), "variant": pa.int64()}
    data = {c: [r.get(c) for r in rows] for c in columns}
    return pa.table({c: pa.array(data[c], types.get(c)) for c in columns})


@dataclass
class Work:
    uri: str  # the edit manifest
    table: pa.Table  # its normalised rows (fingerprints as the job computes them)
    expansion: Expansion


def prepare_work(sj: SynthesizeJob) -> Work:
    """Read the images (and templates), expand, and write the edit manifest (content-addressed:
    the same expansion is the same object, written once)."""
    job = sj.job
    templates = None
    if sj.pairs.templates:
        templates = read_templates(sj.pairs.templates, sj.pairs.templates_storage or job.input.storage)
    images = read_manifest_table(job.input.manifest, job.input.storage)
    expansion = expand_pairs(images, sj, templates)
    if not expansion.rows:
        raise ValueError(f"the images manifest {redact_uri(job.input.manifest)} has no rows")
    work = _work_table(expansion.rows)
    canonical = json.dumps(work.to_pylist(), sort_keys=True, ensure_ascii=False, default=str)
    name = hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]
    uri = join_uri(job.output.uri, f"pairs/manifests/{name}.parquet")
    if not exists(uri, job.output_storage()):
        write_manifest(work, uri, job.output_storage())
    return Work(uri, normalise_like_the_job(work, job, uri), expansion)


# ---------------------------------------------------------------------------------------------
# Export


IMAGE_STRUCT = pa.struct([("bytes", pa.binary()), ("path", pa.string())])  # datasets.Image's storage


SCORE_COLUMNS = ("score_sc", "score_pq", "score_o", "changed_fraction")  # with a judge only


def _features(scored: bool = False) -> dict[str, Any]:
    """Hugging Face ``datasets`` feature metadata (``Features.to_dict()`` form): with it, the
    parquet loader types the columns -- the two images as ``Image`` -- with no custom code."""
    value = lambda dtype: {"dtype": dtype, "_type": "Value"}  # noqa: E731
    image = {"_type": "Image"}
    features = {
        "source_image": image, "source_images": {"feature": value("string"), "_type": "List"},
        "edited_image": image, "source_image_uri": value("string"), "edited_image_uri": value("string"),
        "instruction": value("string"),
        "seed": value("int64"), "variant": value("int64"), "num_steps": value("int64"),
        "guidance_scale": value("float64"), "size_level": value("int64"),
        "negative_prompt": value("string"), "model_id": value("string"), "id": value("string"),
        "split": value("string"),
    }
    return features | ({c: value("float64") for c in SCORE_COLUMNS} if scored else {})


def _schema(scored: bool = False) -> pa.Schema:
    """The shards' schema; ``scored``: the judge's scores of each pair after the base columns."""
    schema = pa.schema([
        ("source_image", IMAGE_STRUCT), ("source_images", pa.list_(pa.string())),
        ("edited_image", IMAGE_STRUCT), ("source_image_uri", pa.string()), ("edited_image_uri", pa.string()),
        ("instruction", pa.string()),
        ("seed", pa.int64()), ("variant", pa.int64()), ("num_steps", pa.int64()),
        ("guidance_scale", pa.float64()), ("size_level", pa.int64()),
        ("negative_prompt", pa.string()), ("model_id", pa.string()), ("id", pa.string()),
        ("split", pa.string()),
    ] + ([(c, pa.float64()) for c in SCORE_COLUMNS] if scored else []))
    meta = {"info": {"features": _features(scored)}}
    return schema.with_metadata({b"huggingface": json.dumps(meta).encode()})


def dataset_rows(sj: SynthesizeJob, work: Work) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The exportable rows (sorted, deduplicated, with ``split``; image URIs, no bytes) and failed
    rows by error type."""
    latest = latest_records(sj.job.output.uri, sj.job.output_storage(), work.table.column("id").to_pylist())
    ok, err = latest.ok, latest.error
    rows: list[dict[str, Any]] = []
    failed: dict[str, int] = {}
    seen: set[tuple] = set()
    for r in work.table.select(
        ["id", "fingerprint", "image_uri", "image_uris", "instruction", "seed", "num_steps", "guidance_scale",
         "size_level", "negative_prompt", "error_type", "variant"]
    ).to_pylist():
        rec = ok.get((r["id"], r["fingerprint"])) if r["fingerprint"] else None
        if rec is None:
            last = err.get(r["id"])
            kind = r["error_type"] or (
                last["error_type"] if last and last["fingerprint"] == r["fingerprint"] else "not_done"
            )
            failed[kind] = failed.get(kind, 0) + 1
            continue
        uris = r["image_uris"] or [r["image_uri"]]
        source = uris[0] if len(uris) == 1 else uris  # as expand_pairs named it
        key = (tuple(uris), r["instruction"], r["seed"], r["num_steps"], r["guidance_scale"],
               r["size_level"], r["negative_prompt"], rec["model_id"])
        if key in seen:  # identical work once, whatever ids it came under
            continue
        seen.add(key)
        rows.append({
            "source_image_uri": uris[0], "source_images": uris, "edited_image_uri": rec["output_uri"],
            "instruction": r["instruction"], "seed": r["seed"], "variant": r["variant"],
            "num_steps": r["num_steps"], "guidance_scale": r["guidance_scale"],
            "size_level": r["size_level"], "negative_prompt": r["negative_prompt"],
            "model_id": rec["model_id"], "id": r["id"],
            "split": split_of(source, sj.pairs.validation_fraction),
            "fingerprint": r["fingerprint"],  # in the export fingerprint only: a redone edit rewrites
        })
    rows.sort(key=lambda r: (r["split"], r["source_image_uri"], r["instruction"], r["variant"], r["id"]))
    return rows, dict(sorted(failed.items()))


def filter_rows(sj: SynthesizeJob, rows: list[dict[str, Any]]
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, Any] | None]:
    """(the kept rows, the dropped ones with their reason, what the card says of the judging).

    Without a judge every row is kept as it is. With one, each row gets its current score (the
    record under score_key(its fingerprint, the judge id, the prompt hash)) as columns, and with
    ``pairs.filter`` a row is kept only when that score passes (``GateConfig.failure``)."""
    gate = sj.pairs.filter
    judge = gate_judge(gate, sj.judge, "pairs.filter")
    if judge is None:
        return rows, [], None
    judge_id, hash_ = judge.judge_id(), prompt_hash(judge)
    records = gate_records(sj.job.output.uri, sj.job.output_storage(),
                           {r["id"]: score_key(r["fingerprint"], judge_id, hash_) for r in rows})
    kept: list[dict[str, Any]] = []
    dropped: list[dict[str, Any]] = []
    for r in rows:
        rec = records.get(r["id"])
        metrics = (rec or {}).get("metrics") or {}
        r = {**r, **{c: (rec or {}).get(c) for c in SCORE_COLUMNS[:3]},
             "changed_fraction": metrics.get("changed_fraction")}
        reason = gate.failure(rec) if gate is not None else None
        if reason is None:
            kept.append(r)
        else:
            dropped.append({"id": r["id"], "reason": reason, "split": r["split"],
                            **{k: r[k] for k in ("source_image_uri", "edited_image_uri", "instruction",
                                                 "variant", *SCORE_COLUMNS)}})
    by_reason: dict[str, int] = {}
    for d in dropped:
        by_reason[d["reason"]] = by_reason.get(d["reason"], 0) + 1
    quality = {
        "judge_id": judge_id, "prompt_hash": hash_, "engine": judge.engine, "model": judge.model_name(),
        "prompts": judge.prompts if judge.engine != "none" else None,
        "scored": sum(1 for r in rows if (records.get(r["id"]) or {}).get("status") == "ok"),
        "filter": gate.model_dump() if gate is not None else None,
        "kept": len(kept), "dropped": len(dropped), "dropped_by_reason": dict(sorted(by_reason.items())),
        "dropped_list": DROPPED_KEY.rsplit("/", 1)[1] if gate is not None else None,
    }
    return kept, dropped, quality


def _read_images(rows: list[dict[str, Any]], sj: SynthesizeJob) -> dict[tuple, bytes]:
    """The stored bytes of every source and edited image of ``rows``, keyed (uri, storage)."""
    job = sj.job
    wanted = [(r["source_image_uri"], job.input.storage) for r in rows]
    wanted += [(r["edited_image_uri"], job.output_storage()) for r in rows]
    unique = list(dict.fromkeys(wanted))

    def read(item: tuple) -> bytes:
        try:
            return read_bytes(item[0], item[1])
        except RowError as exc:
            raise RowError(exc.code, f"exporting the dataset (pairs.embed_bytes): {exc.message}") from None

    with ThreadPoolExecutor(16) as pool:
        return dict(zip(unique, pool.map(read, unique)))


def _shard(rows: list[dict[str, Any]], sj: SynthesizeJob) -> bytes:
    """One Parquet shard of ``rows``: the Image structs ``{bytes, path}`` (bytes null unless
    ``pairs.embed_bytes``), written a row group at a time so that only one row group's images
    are held besides the shard being built."""
    job, schema = sj.job, _schema(sj.judge is not None)
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, schema, compression="zstd") as writer:
        for start in range(0, len(rows), ROW_GROUP_ROWS):
            group = rows[start:start + ROW_GROUP_ROWS]
            blobs = _read_images(group, sj) if sj.pairs.embed_bytes else {}
            out = []
            for r in group:
                src, edit = r["source_image_uri"], r["edited_image_uri"]
                out.append({
                    **{k: r[k] for k in schema.names if k in r},
                    "source_image": {"bytes": blobs.get((src, job.input.storage)), "path": src},
                    "edited_image": {"bytes": blobs.get((edit, job.output_storage())), "path": edit},
                })
            writer.write_table(pa.Table.from_pylist(out, schema=schema))
    return buf.getvalue()


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                        (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if n < limit:
            return name
    return "n>10M"


@dataclass
class ExportResult:
    rows: int
    by_split: dict[str, int]
    failed: int
    by_error_type: dict[str, int]
    files: list[str]
    unchanged: bool
    info_uri: str
    card_uri: str
    dropped: int = 0  # pairs the quality filter left out
    dropped_by_reason: dict[str, int] = field(default_factory=dict)


def _card(info: dict[str, Any]) -> str:
    """The dataset card: Hugging Face YAML front matter, then what a person needs to know."""
    splits = [s for s in SPLITS if info["counts"]["by_split"].get(s)]
    lines = ["---", yaml.safe_dump(_front_matter(info, splits), sort_keys=False).rstrip(), "---", "",
             f"# {info['name']}", ""]
    if info["description"]:
        lines += [info["description"], ""]
    lines += _card_contents(info, splits) + _card_quality(info) + _card_columns(info) + _card_provenance(info)
    lines += _card_loading(info, splits)
    return "\n".join(lines)


def _front_matter(info: dict[str, Any], splits: list[str]) -> dict[str, Any]:
    """The card's metadata: what the Hub shows and how it finds the splits."""
    return {
        "pretty_name": info["name"],
        "license": info["license"],
        "task_categories": ["image-to-image"],
        "tags": ["image-editing", "synthetic", "step1x-edit"],
        "size_categories": [_size_category(info["counts"]["rows"])],
        "configs": [{
            "config_name": "default",
            "data_files": [{"split": s, "path": f"data/{s}-*.parquet"} for s in splits],
        }],
    }


def _card_contents(info: dict[str, Any], splits: list[str]) -> list[str]:
    """What the pairs are and how many, per split, with the planned pairs left out and why."""
    c, p, m = info["counts"], info["parameters"], info["model"]
    errs = ", ".join(f"{k} {v}" for k, v in c["by_error_type"].items()) or "none"
    lines = [
        "Synthetic instruction-based image-editing pairs: each source image edited with "
        f"{'a sample of ' + str(p['instructions_per_image']) if p['instructions_per_image'] else 'every one of its'} "
        f"instruction(s), {p['variants']} seed(s) per instruction, by {m['model_id']}.", "",
        "## Contents", "",
        "| split | pairs | source images | files |", "|---|---|---|---|",
    ]
    for s in splits:
        lines.append(f"| {s} | {c['by_split'][s]} | {c['sources_by_split'][s]} | "
                     f"{len(info['files'][s])} |")
    q = info.get("quality") or {}
    filtered = (f" {q['dropped']} edited pairs were left out by the quality filter (see below)."
                if q.get("filter") is not None else "")
    return lines + [
        "",
        f"{c['rows']} pairs from {c['sources']} source images and {c['instructions']} distinct "
        f"instructions. {c['failed']} planned pairs are not included because their edit failed "
        f"(by error type: {errs}); {c['duplicates_dropped']} duplicate rows were dropped.{filtered}", "",
    ]


_BARS = (("min_sc", "semantic consistency (SC) at least {}"), ("min_pq", "perceptual quality (PQ) at least {}"),
         ("min_o", "overall score (O) at least {}"))


def _card_quality(info: dict[str, Any]) -> list[str]:
    """Who judged the pairs, the filter's bars, and how many pairs each reason left out."""
    q = info.get("quality")
    if not q:
        return []
    judge = (f"the judge `{q['judge_id']}` (prompt set `{q['prompts']}`, prompt hash `{q['prompt_hash']}`)"
             if q["engine"] != "none" else f"the image metrics only (`{q['judge_id']}`, no VLM)")
    lines = ["## Quality filter", "", f"Every pair was scored by {judge} before the export."]
    f = q["filter"]
    if f is None:
        return lines + ["No filter was applied: every edited pair is included, with its scores.", ""]
    bars = [text.format(f[key]) for key, text in _BARS if f[key] is not None]
    bars += ["the output differs from its input"] * bool(f["drop_unchanged"])
    bars += ["the output's size and aspect are sane"] * bool(f["require_size_ok"])
    bars += ["the pair has a score (not a judge error)"] * bool(f["drop_unscored"])
    reasons = ", ".join(f"`{k}` {v}" for k, v in q["dropped_by_reason"].items()) or "none"
    return lines + [
        "A pair is included only when " + "; ".join(bars) + ".", "",
        f"- kept: {q['kept']}", f"- dropped: {q['dropped']} (by reason: {reasons})",
        f"- the dropped pairs (id, reason, scores, image URIs) are listed in `{q['dropped_list']}`", "",
    ]


def _card_columns(info: dict[str, Any]) -> list[str]:
    """The columns, and whether the image bytes are in the files (``pairs.embed_bytes``)."""
    return [
        "## Columns", "",
        "- `source_image`, `edited_image`: the source image and the edited image, `datasets` `Image` "
        "features (`{bytes, path}` structs in the Parquet files, `path` the image's URI); " + (
            "the bytes are the image files as stored, so the dataset is self-contained"
            if info["parameters"]["embed_bytes"] else
            "**the bytes are not embedded** (`pairs.embed_bytes: false`): `datasets` opens `path` "
            "to decode, which works for local paths and public URLs, not for private object storage"),
        "- `source_image_uri`, `edited_image_uri`: the same images' URIs as text",
        "- `source_images`: the URIs of every input image the edit read, in order (one for a "
        "single-image source; `source_image` is the first)",
        "- `instruction`: the edit instruction given to the model",
        "- `seed`, `variant`: the noise seed and which of the K variants of this (image, instruction) it is",
        "- `num_steps`, `guidance_scale`, `size_level`, `negative_prompt`: the sampling parameters",
        "- `model_id`: the model that made the edit; `id`: a stable hash of (source, instruction, variant)",
        "- `split`: `train` or `validation`, by a hash of the source image (all pairs of one source share a split)",
    ] + ([
        "- `score_sc`, `score_pq`, `score_o`: the judge's semantic consistency, perceptual quality and "
        "overall score of the edit, 0 to 10 (VIEScore; null for the metrics-only judge or a judge error)",
        "- `changed_fraction`: the share of pixels the edit changed (beyond the judge's tolerance)",
    ] if info.get("quality") else []) + [
        "",
    ]


def _card_provenance(info: dict[str, Any]) -> list[str]:
    """How the pairs were made (model, sampling, instructions) and the three licences."""
    p, m = info["parameters"], info["model"]
    return [
        "## How it was made", "",
        f"- model: `{m['model_id']}` (family {m['family']}); weights licence: {m['weights_license']}",
        f"- sampling: {p['num_steps']} steps, guidance {p['guidance_scale']}, size level "
        f"{p['size_level']}, negative prompt {json.dumps(p['negative_prompt'])}, seed base {p['seed_base']}",
        f"- instructions: {p['instruction_source']}; per image: {p['instructions_per_image'] or 'all'}"
        f" (sample seed {p['sample_seed']}); variants per instruction: {p['variants']}",
        f"- validation fraction: {p['validation_fraction']}; output format: {p['image_format']}",
        f"- source manifest: `{info['source_manifest']}`; made by step1x-batch (`jobs/synthesize_pairs.py`)",
        "",
        "## Licence", "",
        f"- this dataset: {info['license']}",
        f"- model weights: {m['weights_license']}",
        f"- source images: {info['source_images_license']}",
        "",
    ]


def _card_loading(info: dict[str, Any], splits: list[str]) -> list[str]:
    """How to load the dataset, with ``datasets`` and without."""
    embedded = info["parameters"]["embed_bytes"]
    return [
        "## Loading", "",
        "```python",
        "from datasets import load_dataset",
        "ds = load_dataset(\"parquet\", data_files={"
        + ", ".join(f"\"{s}\": \"data/{s}-*.parquet\"" for s in splits) + "})",
        f"pair = ds[\"{splits[0] if splits else 'train'}\"][0]",
        "pair[\"edited_image\"]      # a PIL.Image.Image (so is pair[\"source_image\"])",
        "pair[\"edited_image_uri\"]  # where the job wrote it",
        "```",
        "",
        "`load_dataset(\"path/to/this/folder\")` and `datasets.Dataset.from_parquet(...)` decode the "
        "images too (the features are in the Parquet schema metadata). Without `datasets` (pyarrow, "
        "pandas) the image columns read as `{bytes, path}` structs: "
        + ("`PIL.Image.open(io.BytesIO(row[\"edited_image\"][\"bytes\"]))`."
           if embedded else "open `row[\"edited_image_uri\"]`."),
        "",
    ]


def export_dataset(sj: SynthesizeJob, work: Work, run_id: str | None = None) -> ExportResult:
    """Write the dataset folder from the row log (and, with a judge, the scores log: only the
    pairs ``pairs.filter`` keeps; see the module docstring for the order)."""
    job, p = sj.job, sj.pairs
    opts = job.output_storage()
    done, failed = dataset_rows(sj, work)
    rows, dropped, quality = filter_rows(sj, done)
    by_split = {s: [r for r in rows if r["split"] == s] for s in SPLITS}
    files: dict[str, list[str]] = {}
    for s, part in by_split.items():
        n = math.ceil(len(part) / p.max_shard_rows)
        files[s] = [f"data/{s}-{i:05d}-of-{n:05d}.parquet" for i in range(n)]
    info: dict[str, Any] = {
        "name": p.name,
        "description": p.description,
        "license": p.license,
        "source_images_license": p.source_images_license,
        "counts": _export_counts(rows, failed, by_split, work, len(dropped)),
        "parameters": _export_parameters(sj),
        "model": _export_model(sj),
        "source_manifest": redact_uri(job.input.manifest),
        "work_manifest": redact_uri(work.uri),
        "files": files,
        "features": _features(quality is not None),
    }
    payload: dict[str, Any] = {"v": EXPORT_VERSION, "info": info, "rows": rows}
    if quality is not None:  # (an export without a judge keeps the fingerprint it always had)
        info["quality"], payload["dropped"] = quality, dropped
    content = json.dumps(payload, sort_keys=True, default=str)
    info["export_fingerprint"] = hashlib.sha256(content.encode("utf-8")).hexdigest()
    info_uri = join_uri(job.output.uri, f"{DATASET_DIR}/dataset_info.json")
    card_uri = join_uri(job.output.uri, f"{DATASET_DIR}/README.md")
    dropped_uri = join_uri(job.output.uri, DROPPED_KEY)
    all_files = [join_uri(job.output.uri, f"{DATASET_DIR}/{f}") for s in SPLITS for f in files[s]]
    result = ExportResult(len(rows), info["counts"]["by_split"], info["counts"]["failed"], failed,
                          all_files, True, info_uri, card_uri, len(dropped),
                          quality["dropped_by_reason"] if quality else {})
    listed = [dropped_uri] if p.filter is not None else []
    if _export_unchanged(info_uri, info["export_fingerprint"], all_files + listed + [card_uri], opts):
        return result
    info["created_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    info["run_id"] = run_id
    _write_export(sj, info, by_split, dropped if listed else None, opts)
    result.unchanged = False
    return result


def _write_export(sj: SynthesizeJob, info: dict[str, Any], by_split: dict[str, list[dict[str, Any]]],
                  dropped: list[dict[str, Any]] | None, opts: StorageOptions) -> None:
    """The shards, the stale shards' removal, the dropped-pairs list (removed when no filter),
    ``dataset_info.json``, then the card: each one whole object."""
    out, files, size = sj.job.output.uri, info["files"], sj.pairs.max_shard_rows
    for s in SPLITS:
        part = by_split[s]
        for i, name in enumerate(files[s]):
            chunk = part[i * size:(i + 1) * size]
            write_bytes(join_uri(out, f"{DATASET_DIR}/{name}"), _shard(chunk, sj), opts)
    all_files = {join_uri(out, f"{DATASET_DIR}/{f}") for s in SPLITS for f in files[s]}
    _remove_stale_shards(out, all_files, opts)
    dropped_uri = join_uri(out, DROPPED_KEY)
    if dropped is not None:
        lines = "".join(json.dumps(d, sort_keys=True, ensure_ascii=False) + "\n" for d in dropped)
        write_bytes(dropped_uri, lines.encode("utf-8"), opts)
    elif exists(dropped_uri, opts):
        fs, path = filesystem(dropped_uri, opts)
        fs.rm(path)
    write_bytes(join_uri(out, f"{DATASET_DIR}/dataset_info.json"),
                (json.dumps(info, indent=2, sort_keys=False) + "\n").encode(), opts)
    write_bytes(join_uri(out, f"{DATASET_DIR}/README.md"), _card(info).encode("utf-8"), opts)  # last


def _export_counts(rows: list[dict[str, Any]], failed: dict[str, int], by_split: dict[str, list],
                   work: Work, filtered: int = 0) -> dict[str, Any]:
    """The pairs exported (per split, sources, instructions), planned, failed and dropped
    (``filtered``: the edited pairs the quality filter left out, not duplicates)."""
    return {
        "rows": len(rows),
        "by_split": {s: len(v) for s, v in by_split.items()},
        "sources": len({r["source_image_uri"] for r in rows}),
        "sources_by_split": {s: len({r["source_image_uri"] for r in v}) for s, v in by_split.items()},
        "instructions": len({r["instruction"] for r in rows}),
        "planned": work.table.num_rows,
        "failed": sum(failed.values()),
        "by_error_type": failed,
        "duplicates_dropped": work.expansion.duplicates_dropped + work.table.num_rows
        - len(rows) - filtered - sum(failed.values()),
    }


def _export_parameters(sj: SynthesizeJob) -> dict[str, Any]:
    """The sampling and expansion settings the pairs were made with."""
    job, p = sj.job, sj.pairs
    params = job.edit_defaults()
    return {
        "num_steps": params.num_steps, "guidance_scale": params.guidance_scale,
        "size_level": params.size_level, "negative_prompt": params.negative_prompt,
        "seed_base": job.sampling.seed_base, "variants": p.variants,
        "instructions_per_image": p.instructions_per_image, "sample_seed": p.sample_seed,
        "instruction_source": (f"templates file {redact_uri(p.templates)}" if p.templates
                               else f"manifest column {p.instruction_column!r}"),
        "validation_fraction": p.validation_fraction, "embed_bytes": p.embed_bytes,
        "image_format": job.output.format, "max_shard_rows": p.max_shard_rows,
    }


def _export_model(sj: SynthesizeJob) -> dict[str, Any]:
    """The model that made the edits: its id (the row log's), family, options, weights' licence."""
    model = sj.job.model
    return {
        "model_id": job_family(sj.job).model_id(), "family": model.family,
        "options": model.options, "weights": redact_uri(model.weights) if model.weights else None,
        "weights_license": weights_license(sj),
    }


def _export_unchanged(info_uri: str, fp: str, uris: list[str], opts: StorageOptions) -> bool:
    try:
        old = json.loads(read_bytes(info_uri, opts))
    except Exception:  # noqa: BLE001 - no (readable) earlier export: write one
        return False
    return old.get("export_fingerprint") == fp and all(exists(u, opts) for u in uris)


def _remove_stale_shards(output_uri: str, keep: set[str], opts: StorageOptions) -> None:
    fs, root = filesystem(join_uri(output_uri, DATA_DIR), opts)
    try:
        found = fs.find(root)
    except FileNotFoundError:
        return
    prefix_len = len(root.rstrip("/")) + 1
    data_uri = join_uri(output_uri, DATA_DIR)
    for path in found:
        uri = join_uri(data_uri, path[prefix_len:])
        if path.endswith(".parquet") and uri not in keep:
            fs.rm(path)


# ---------------------------------------------------------------------------------------------
# The job


@dataclass
class SynthesizeSummary:
    run_id: str
    ok: bool
    planned: int  # rows of the edit manifest
    images: int
    duplicates_dropped: int
    work_manifest: str
    edit: dict[str, Any]  # the edit run's summary (RunSummary as a dict)
    dataset: dict[str, Any] | None = None  # ExportResult as a dict; None when not exported
    notes: list[str] = field(default_factory=list)
    scores: dict[str, Any] | None = None  # the scoring run's summary (ScoreSummary as a dict); None: no judge


def _print(msg: str, *, err: bool = False) -> None:
    print(msg, file=sys.stderr if err else sys.stdout, flush=True)


def run_synthesize(sj: SynthesizeJob, lease: Lease | None = None) -> SynthesizeSummary:
    """Expand, edit (resumable), score (with a judge), export; print what happened and where the
    dataset is. ``lease``: the one the caller holds on the output root (None: held here for the run)."""
    job = sj.job
    if lease is None:
        with held(job.output.uri, job.output_storage(), job.runtime.run_id, ttl_s=job.runtime.lease_ttl_s,
                  allow_unlocked=job.runtime.allow_unlocked, job="synthesize",
                  say=lambda m: _print(m, err=True)) as lease:
            return run_synthesize(sj, lease)
    try:
        work = prepare_work(sj)
    except (ValueError, FileNotFoundError, RowError) as exc:
        raise InputError(str(exc.message if isinstance(exc, RowError) else exc)) from exc
    e = work.expansion
    _print(f"pairs: {e.images} images x instructions x {sj.pairs.variants} variants -> "
           f"{work.table.num_rows} edit rows ({e.duplicates_dropped} duplicates dropped); "
           f"manifest {work.uri}")
    edit = run_edit_job(job, work.uri, work.table.num_rows, lease)
    summary = SynthesizeSummary(job.runtime.run_id, edit.ok, work.table.num_rows, e.images,
                                e.duplicates_dropped, work.uri, asdict(edit))
    if not edit.ok:
        summary.notes.append("edit run over its error budget: dataset not exported")
        _print("FAILED: the edit run exceeded runtime.max_error_fraction; the dataset was not "
               "exported (the previous export, if any, is untouched)", err=True)
    elif _score(sj, summary, lease):
        result = export_dataset(sj, work, job.runtime.run_id)
        summary.dataset = asdict(result)
        state = "unchanged" if result.unchanged else "written"
        kept = ""
        if sj.pairs.filter is not None:
            reasons = ", ".join(f"{k} {v}" for k, v in result.dropped_by_reason.items()) or "none"
            kept = f", {result.dropped} left out by pairs.filter ({reasons})"
        _print(f"dataset {state}: {result.rows} pairs ({', '.join(f'{k} {v}' for k, v in result.by_split.items())}), "
               f"{result.failed} failed{kept} -> {result.card_uri}")
    write_bytes(join_uri(job.output.uri, f"pairs/runs/{job.runtime.run_id}.json"),
                (json.dumps(asdict(summary), indent=2, default=str) + "\n").encode(), job.output_storage())
    return summary


def _score(sj: SynthesizeJob, summary: SynthesizeSummary, lease: Lease) -> bool:
    """Score the edited pairs with the judge (every pair once per score key), under the run's
    lease; False when the scoring stopped early (the lease was lost): nothing is exported."""
    if sj.judge is None:
        return True
    job = sj.job
    scored = score_output(job.output.uri, sj.judge, job.output_storage(), ScoreRuntime.of_job(job), lease,
                          say=_print)
    summary.scores = asdict(scored)
    _print(scored.line())
    if scored.stopped:
        summary.ok = False
        summary.notes.append(f"scoring stopped ({scored.stopped}): dataset not exported")
        _print("FAILED: the scoring stopped early; the dataset was not exported", err=True)
        return False
    return True


def run_config(path: str, overrides: Sequence[str] = ()) -> int:
    """Load, run, and return the exit status (0 done, 1 error budget exceeded: nothing exported,
    2 a config, input, judge or cluster problem); for ``step1x-batch synthesize CONFIG``."""

    def run() -> bool:
        sj = load_synthesize_config(path, overrides)
        p = sj.pairs
        required = PAIRS_SECTION.required_columns({
            "image_column": p.image_column, "instruction_column": None if p.templates else p.instruction_column})

        def checks() -> None:
            if p.templates:
                check_file(p.templates, p.templates_storage or sj.job.input.storage, "pairs.templates",
                           safetensors=False)
            if sj.judge is not None:
                check_judge(sj.judge, sj.job.output_storage())

        return check_lease_and_run(sj.job, lambda facts, lease: run_synthesize(sj, lease).ok,
                                   job="synthesize", required_columns=required, extra_checks=checks)

    return exit_status(run)


def main(argv: Sequence[str] | None = None) -> int:
    """``python jobs/synthesize_pairs.py --config X [--set k=v ...]``."""
    return job_main("Make synthetic image-editing training pairs on Ray.", run_config, argv)
