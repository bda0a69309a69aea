"""What every recipe does with the edit job: predict its fingerprints, run it on a work manifest.

A recipe turns its input into an ordinary edit manifest (its *work*), normalises it exactly as the
edit job will (so the fingerprints it plans with are the ones the row log will hold), and runs the
edit job on it with the same config but that manifest, under the lease the recipe holds. The
adapters are pinned before anything here derives the model id (idempotent: the entry point has
usually pinned them already). See docs/architecture.md.
"""

from __future__ import annotations

import pyarrow as pa

from step1x_batch.job import runner
from step1x_batch.job.config import JobConfig
from step1x_batch.job.lease import Lease
from step1x_batch.job.preflight import Preflight
from step1x_batch.job.stages import normalize_settings
from step1x_batch.models.base import ModelFamily
from step1x_batch.rows.manifest import normalize_batch

__all__ = ["job_family", "normalise_like_the_job", "run_edit_job"]


def normalise_like_the_job(table: pa.Table, job: JobConfig, manifest_uri: str) -> pa.Table:
    """The edit job's own normalisation of ``table`` (same arguments as the job's normalise
    stage), so the fingerprints here are the ones the row log will hold."""
    return normalize_batch(table, normalize_settings(runner.pin_adapters(job), manifest_uri))


def job_family(job: JobConfig) -> ModelFamily:
    """The family the edit job will run (``.model_id()``: the id its fingerprints hold)."""
    return runner.pin_adapters(job).family()


def run_edit_job(job: JobConfig, manifest_uri: str, rows: int, lease: Lease | None = None) -> runner.RunSummary:
    """The edit job with ``job``'s settings on the work manifest at ``manifest_uri`` (``rows``
    rows, already checked: the pre-flight that ran was the recipe's own), under the recipe's
    ``lease`` on the output root (None: the edit job takes it itself)."""
    inner = job.model_copy(deep=True)
    inner.input.manifest = manifest_uri
    inner.input.columns = {}  # a work manifest is in the row contract's own shape
    return runner.run_job(inner, Preflight(manifest_rows=rows), lease=lease)
