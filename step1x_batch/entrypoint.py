"""How every job is started and ends: ``--config`` / ``--set`` arguments and the exit status.

One place for the three jobs (dataset edit, synthetic pairs, catalog) and their two front ends
(``python jobs/<job>.py`` under ``ray job submit``, and ``step1x-batch run|synthesize|rerender``):
0 done, 1 error budget exceeded (every row was logged), 2 a config, input or cluster problem
found before any row ran, printed as one line without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

RunConfig = Callable[[str, Sequence[str]], int]


def exit_status(run: Callable[[], bool]) -> int:
    """Run a job; its outcome as an exit status (``run`` returns whether the job succeeded)."""
    from botocore.exceptions import BotoCoreError

    from step1x_batch.errors import RowError, redact

    try:
        return 0 if run() else 1
    except (RowError, OSError, ValueError, BotoCoreError) as e:  # ConfigError is a ValueError
        print(f"error: {redact(str(e))}", file=sys.stderr, flush=True)
        return 2


def add_config_arguments(parser: argparse.ArgumentParser, flag: bool = False) -> None:
    """``CONFIG`` (``--config CONFIG`` for the job scripts) and repeatable ``--set KEY=VALUE``."""
    if flag:
        parser.add_argument("--config", required=True, help="YAML job config")
    else:
        parser.add_argument("config", help="YAML job config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. sampling.num_steps=20 (repeatable)")


def job_main(description: str, run_config: RunConfig, argv: Sequence[str] | None = None) -> int:
    """``python jobs/<job>.py --config X [--set k=v ...]`` -> exit status."""
    parser = argparse.ArgumentParser(description=description)
    add_config_arguments(parser, flag=True)
    args = parser.parse_args(argv)
    return run_config(args.config, args.set)
