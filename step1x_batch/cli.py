"""The ``step1x-batch`` command: demo, run / synthesize / rerender / benchmark a job config, make tiny
weights or a tiny benchmark, edit one image."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import yaml

from step1x_batch.job.entrypoint import add_config_arguments, config_overrides
from step1x_batch.job.inspection import add_inspection_commands, storage_arguments, storage_options


def _make_tiny_weights(args: argparse.Namespace) -> int:
    if args.family == "qwen-image-edit":
        from step1x_batch.models.qwen_image_edit.tiny import make_tiny_weights

        folder = make_tiny_weights(args.dir, seed=args.seed)
        print(f"tiny Qwen-Image-Edit-2511 weights (diffusers layout, seed {args.seed}) written to {folder}")
        return 0
    from step1x_batch.models.step1x.tiny import make_tiny_weights

    folder = make_tiny_weights(args.dir, seed=args.seed, version=args.version, layout=args.layout)
    what = "RealRestorer bundle" if args.layout == "realrestorer" else "release"
    print(f"tiny Step1X-Edit {args.version} {what} (seed {args.seed}) written to {folder}")
    return 0


def _model_options(pairs: Sequence[str], version: str | None) -> dict[str, Any]:
    """``--option key=value`` pairs as ``model.options`` (each value read as YAML: 512, true, pil)."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--option {pair!r}: expected key=value")
        options[key.strip()] = yaml.safe_load(value)
    if version is not None:
        options["version"] = version
    return options


def _edit(args: argparse.Namespace) -> int:
    """Edit one row in this process with any family: its prepare, engine and finish in one call."""
    from PIL import Image

    from step1x_batch.models import load_family
    from step1x_batch.models.base import ModelSpec
    from step1x_batch.models.engine import family_pipeline

    try:
        options = _model_options(args.option, args.version)
        spec = ModelSpec(args.family, options=options, weights=args.weights, dtype=args.dtype, device=args.device)
        pipe = family_pipeline(load_family(spec), Path(args.weights) if args.weights else None)
    except (ValueError, yaml.YAMLError) as e:  # pydantic's ValidationError and WeightsError are ValueErrors
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    negatives = None if args.negative_prompt is None else [args.negative_prompt]
    result = pipe.edit(
        [[Image.open(path) for path in args.image]], [args.instruction], seeds=[args.seed],
        negative_prompts=negatives, num_steps=args.steps, guidance_scale=args.guidance, size_level=args.size_level,
    )[0]
    if result.error_type:
        print(f"error: {result.error_type}: {result.error_message}", file=sys.stderr)
        return 1
    result.to_pil().save(args.out)
    timing = ", ".join(f"{k} {v:.0f}" for k, v in result.timings_ms.items())
    print(f"wrote {args.out} (model size {result.width}x{result.height}, seed {result.seed}; ms: {timing})")
    return 0


def _run(args: argparse.Namespace) -> int:
    from step1x_batch.recipes.score import run_edit_config

    return run_edit_config(args.config, config_overrides(args))


def _synthesize(args: argparse.Namespace) -> int:
    from step1x_batch.recipes.synthesize import run_config

    return run_config(args.config, config_overrides(args))


def _rerender(args: argparse.Namespace) -> int:
    from step1x_batch.recipes.catalog import run_config

    return run_config(args.config, config_overrides(args))


def _benchmark(args: argparse.Namespace) -> int:
    from step1x_batch.recipes.benchmark import run_config

    return run_config(args.config, config_overrides(args))


def _make_tiny_benchmark(args: argparse.Namespace) -> int:
    from step1x_batch.recipes.tiny_benchmark import make_tiny_benchmark

    path = make_tiny_benchmark(args.dir, seed=args.seed)
    print(f"tiny GEdit-Bench-shaped dataset (12 rows, seed {args.seed}) written to {path}; "
          f"use input.manifest: {path.parent}/ with input.columns: "
          "{id: key, image: input_image_raw, instruction: instruction}")
    return 0


def _score(args: argparse.Namespace) -> int:
    from step1x_batch.recipes.score import run_config

    return run_config(args.output_uri, args.config, config_overrides(args))


def _compact(args: argparse.Namespace) -> int:
    """Fold the log parts no state covers yet into a new state version (or rebuild it after
    ``state/`` was deleted), holding the root's lease like a run."""
    import datetime as dt

    from step1x_batch.job import lease as leases
    from step1x_batch.rows import state as rowstate
    from step1x_batch.errors import JobRefused, redact, redact_uri
    from step1x_batch.rows.log import log_part_keys

    options = storage_options(args.endpoint_url, args.region)
    run_id = f"compact-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}"
    try:
        if not log_part_keys(args.output_uri, options):
            print(f"error: no log parts under {redact_uri(args.output_uri)}/logs/: nothing to compact",
                  file=sys.stderr)
            return 2
        with leases.held(args.output_uri, options, run_id, ttl_s=120.0, job="compact",
                         say=lambda m: print(m, file=sys.stderr)):
            if args.local:
                result = rowstate.compact(args.output_uri, options, run_id=run_id, buckets=args.buckets)
            else:
                import ray

                from step1x_batch.job import ray_guard

                # $RAY_ADDRESS (a submitted job) joins its cluster; otherwise a private local Ray,
                # never a cluster that happens to run on the host (issue 18.7).
                address = os.environ.get("RAY_ADDRESS") or "local"
                guard = ray_guard.start() if address == "local" else None
                try:
                    ray.init(address=address, include_dashboard=False, log_to_driver=False)
                    result = rowstate.compact(args.output_uri, options, tasks=rowstate.RayTasks(),
                                              run_id=run_id, buckets=args.buckets)
                finally:
                    ray.shutdown()
                    if guard is not None:
                        guard.stop()
    except JobRefused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - a sentence, never a traceback
        print(f"error: {redact(f'{type(e).__name__}: {e}')}", file=sys.stderr)
        return 2
    print(result.line())
    return 0


def _demo(args: argparse.Namespace) -> int:
    from step1x_batch.demo import main as demo_main

    return demo_main(args.dir, args.family)


def _add_benchmark_commands(sub: Any) -> None:
    """``benchmark CONFIG`` and ``make-tiny-benchmark DIR``."""
    p = sub.add_parser("benchmark", help="edit the same rows with several models (same seeds), score every "
                                         "edit and compare the models per category in one table",
                       description="Run every model of benchmark.models on the manifest under "
                                   "<output.uri>/models/<name>/, score the edits with the judge, and write "
                                   "<output.uri>/benchmark/table.md, table.json and report.html.")
    add_config_arguments(p)
    p.set_defaults(func=_benchmark)

    p = sub.add_parser("make-tiny-benchmark", help="write a tiny GEdit-Bench-shaped dataset (Parquet, images "
                                                   "inside) made from a seed")
    p.add_argument("dir")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_make_tiny_benchmark)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="step1x-batch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run the whole job on local Ray with a tiny model and sample images")
    p.add_argument("--dir", default=None, help="working folder (default: ./step1x-demo)")
    p.add_argument("--family", choices=["step1x", "qwen-image-edit"], default="step1x")
    p.set_defaults(func=_demo)

    p = sub.add_parser("run", help="run a dataset editing job from a YAML config")
    add_config_arguments(p)
    p.set_defaults(func=_run)

    for name, func, text in (
        ("synthesize", _synthesize, "make synthetic training pairs (images x instructions x seeds) from a YAML config"),
        ("rerender", _rerender, "re-render the changed items of a catalog and publish `latest` from a YAML config"),
    ):
        p = sub.add_parser(name, help=text)
        add_config_arguments(p)
        p.set_defaults(func=func)

    _add_benchmark_commands(sub)

    p = sub.add_parser("score", help="score the edits of an output root with a judge (VLM and image metrics); "
                                     "no image is written",
                       description="Score every edit under OUTPUT_URI not yet scored by this judge and "
                                   "prompt set; a rerun scores only what is missing.")
    p.add_argument("output_uri", help="an edit job's output root (output.uri)")
    add_config_arguments(p, flag=True)
    p.set_defaults(func=_score)

    p = sub.add_parser("make-tiny-weights", help="write a toy-size release folder made from a seed")
    p.add_argument("dir")
    p.add_argument("--family", choices=["step1x", "qwen-image-edit"], default="step1x")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--version", choices=["v1.0", "v1.1"], default="v1.1", help="step1x only")
    p.add_argument("--layout", choices=["release", "realrestorer"], default="release",
                   help="step1x only: the official release folder or a RealRestorer bundle")
    p.set_defaults(func=_make_tiny_weights)

    p = sub.add_parser("edit", help="edit one image (or one row of images) in this process (no Ray), any family")
    p.add_argument("--family", default="step1x",
                   help="a registered family (see `model.family`) or package.module:Class (default: step1x)")
    p.add_argument("--weights", default="", help="the weights folder (a family that needs none: omit)")
    p.add_argument("--image", required=True, action="append",
                   help="an input image; repeat it for a family that takes several per row")
    p.add_argument("--instruction", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="one of the family's model.options (the value read as YAML); repeat for more")
    p.add_argument("--negative-prompt", default=None, help="default: the family's")
    p.add_argument("--steps", type=int, default=None, help="default: the family's (step1x: 28)")
    p.add_argument("--guidance", type=float, default=None, help="default: the family's (step1x: 6.0)")
    p.add_argument("--size-level", type=int, default=None, help="default: the family's (1024)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--version", choices=["v1.0", "v1.1"], default=None,
                   help="the same as --option version=V (a family with a version option)")
    p.set_defaults(func=_edit)

    add_inspection_commands(sub)

    p = sub.add_parser("compact", help="fold new log records into the row state (or rebuild it from the logs)",
                       description="Fold the log parts the row state does not cover yet into a new "
                                   "state version; after `state/` was deleted, rebuild it from the logs.")
    storage_arguments(p)
    p.add_argument("--buckets", type=int, default=None, help="partition count (default: from the number of ids)")
    p.add_argument("--local", action="store_true",
                   help="in this process instead of Ray tasks (a small root, or no cluster at hand)")
    p.set_defaults(func=_compact)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
