"""How every job is started and ends: ``--config`` / ``--set`` arguments and the exit status.

One place for the three jobs (dataset edit, synthetic pairs, catalog) and their two front ends
(``python jobs/<job>.py`` under ``ray job submit``, and ``step1x-batch run|synthesize|rerender``):
0 done, 1 error budget exceeded (every row was logged), 2 a config, input, weights or cluster
problem found before any row ran (or the output root in use by another run, or a model that
failed to load), printed as one line without a traceback. Every job runs through
:func:`check_lease_and_run`: the pre-flight checks, then the output root's lease, then the run
(docs/architecture.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    from step1x_batch.job.config import JobConfig
    from step1x_batch.job.lease import Lease
    from step1x_batch.job.preflight import Preflight, RequiredColumns

RunConfig = Callable[[str, Sequence[str]], int]


def exit_status(run: Callable[[], bool]) -> int:
    """Run a job; its outcome as an exit status (``run`` returns whether the job succeeded)."""
    from botocore.exceptions import BotoCoreError

    from step1x_batch.errors import JobRefused, RowError, redact

    try:
        return 0 if run() else 1
    except (JobRefused, RowError, OSError, ValueError, BotoCoreError) as e:  # ConfigError is a ValueError
        print(f"error: {one_line(redact(str(e)))}", file=sys.stderr, flush=True)
        return 2


def one_line(message: str) -> str:
    """A message of several lines (a config with several bad keys) as the one line the README
    promises: ``invalid config: a.b: ...; c: ...``."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else message.strip()
    head, rest = lines[0], lines[1:]
    if head.endswith(":"):
        return f"{head} {'; '.join(rest)}"
    return "; ".join(lines)


def check_lease_and_run(cfg: "JobConfig", run: Callable[["Preflight", "Lease"], bool], *, job: str,
                        required_columns: "RequiredColumns | None" = None,
                        extra_checks: Callable[[], None] | None = None) -> bool:
    """Check everything before any side effect, then hold the output root's lease while ``run``
    runs, with the adapters pinned (``run`` gets the checks' findings and the lease). A failed
    check or a held lease raises :class:`~step1x_batch.errors.JobRefused` (exit status 2) with
    nothing written."""
    from step1x_batch.io.weights import pin_adapters
    from step1x_batch.job import lease, preflight

    columns = preflight.DATASET_COLUMNS if required_columns is None else required_columns
    facts = preflight.check_job(cfg, required_columns=columns, extra=extra_checks)
    with lease.held(cfg.output.uri, cfg.output_storage(), cfg.runtime.run_id,
                    ttl_s=cfg.runtime.lease_ttl_s, allow_unlocked=cfg.runtime.allow_unlocked, job=job,
                    say=lambda message: print(message, file=sys.stderr, flush=True)) as held:
        for adapters in (cfg.model.adapters, *cfg.model.adapter_sets.values()):  # before any model id
            pin_adapters(adapters, cfg.weights_source())
        return run(facts, held)


def add_config_arguments(parser: argparse.ArgumentParser, flag: bool = False) -> None:
    """``CONFIG`` (``--config CONFIG`` for the job scripts) and repeatable ``--set KEY=VALUE``."""
    if flag:
        parser.add_argument("--config", required=True, help="YAML job config")
    else:
        parser.add_argument("config", help="YAML job config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. sampling.num_steps=20 (repeatable)")
    parser.add_argument("--retry-errors", default=None, metavar="T1,T2",
                        help="also redo the error rows of these types (e.g. missing_object after "
                             "re-uploading the images); sets runtime.retry_error_types_this_run")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show Ray's own logs on the console (they always go to runs/<run_id>/ray.log)")


def config_overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` items plus the ones the shorthand flags stand for."""
    overrides = list(args.set)
    if args.retry_errors:
        types = [t.strip() for t in args.retry_errors.split(",") if t.strip()]
        overrides.append(f"runtime.retry_error_types_this_run={json.dumps(types)}")
    if args.verbose:
        overrides.append("runtime.verbose=true")
    return overrides


def job_main(description: str, run_config: RunConfig, argv: Sequence[str] | None = None) -> int:
    """``python jobs/<job>.py --config X [--set k=v ...]`` -> exit status."""
    parser = argparse.ArgumentParser(description=description)
    add_config_arguments(parser, flag=True)
    args = parser.parse_args(argv)
    return run_config(args.config, config_overrides(args))
