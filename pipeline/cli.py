"""Command line: ``python -m pipeline {run,status} CONFIG [key=value ...]``.

One entry function per command. Exit codes: 0 success, 1 a stage failed, 2 bad usage or config
(nothing written).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.config import ConfigError, dump_yaml, load_config
from pipeline.dag import Pipeline, SelectionError, StageFailed
from pipeline.storage import Storage

log = logging.getLogger("pipeline")


def default_pipeline() -> Pipeline:
    """The real stages, in DAG order (the one place ``pipeline`` imports ``stages``)."""
    from stages import STAGES

    return Pipeline(STAGES)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname).1s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("botocore", "s3fs", "fsspec", "urllib3", "aiobotocore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load(pipe: Pipeline, args: argparse.Namespace) -> Any:
    return load_config(args.config, args.overrides, pipe.schema)


def cmd_run(args: argparse.Namespace, pipe: Pipeline) -> int:
    """Run the DAG (or the selected part of it); cached stages are skipped."""
    from pipeline.runtime import ensure_ray

    cfg = _load(pipe, args)
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    pipe.select(args.only or (), args.from_, args.until)  # bad flags fail before any write
    manifests = pipe.run(cfg, only=args.only or (), from_=args.from_, until=args.until,
                         force=args.force or (), on_ray=ensure_ray)
    log.info("run %r complete: %s", cfg.run, ", ".join(manifests) or "nothing selected")
    print(pipe.run_uri(cfg))
    return 0


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 120:
        return f"{s:.1f}s"
    return f"{s / 60:.1f}m" if s < 7200 else f"{s / 3600:.1f}h"


def cmd_status(args: argparse.Namespace, pipe: Pipeline) -> int:
    """Print each stage's state (done / partial / pending), output URI, fingerprint, timing."""
    cfg = _load(pipe, args)
    rows = pipe.status(cfg, Storage.from_config(cfg.storage))
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], indent=2))
        return 0
    table = [("STAGE", "STATE", "FINISHED", "TOOK", "FINGERPRINT", "OUTPUT")]
    table += [(r.name, r.state, r.finished_at or "-", _fmt_seconds(r.seconds), r.fingerprint[:12],
               r.uri) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    return 0


def build_parser(stage_names: Sequence[str]) -> argparse.ArgumentParser:
    stages_help = ", ".join(stage_names)
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Taming Transformers as one resumable Ray pipeline: "
                    f"stages {stages_help}.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", metavar="CONFIG", help="YAML config file (e.g. configs/tiny.yaml)")
        p.add_argument("overrides", nargs="*", metavar="key=value",
                       help="dotted overrides, e.g. run=exp1 storage.root=s3://bucket/runs")

    run = sub.add_parser(
        "run", help="run the DAG; complete stages are skipped, interrupted ones resume",
        description="Run the pipeline. Each stage writes to <root>/<run>/<stage>-<fp12>/ and "
                    "is skipped when its _manifest.json exists. Exit 1 if a stage fails (rerun "
                    "to resume it), 2 on a bad config or flag (nothing written).")
    common(run)
    run.add_argument("--only", action="append", metavar="STAGE",
                     help=f"run only this stage (repeatable); its upstream must be complete. "
                          f"Stages: {stages_help}")
    run.add_argument("--from", dest="from_", metavar="STAGE",
                     help="run this stage and everything downstream of it")
    run.add_argument("--until", metavar="STAGE",
                     help="run this stage and everything upstream of it")
    run.add_argument("--force", action="append", metavar="STAGE",
                     help="delete this stage's outputs and run it again (repeatable)")
    run.add_argument("--print-config", action="store_true",
                     help="print the resolved config and exit")
    run.set_defaults(func=cmd_run)

    status = sub.add_parser("status", help="show each stage: done / partial / pending",
                            description="Show each stage's state, output URI, fingerprint, "
                                        "when it finished and how long it took. Starts nothing.")
    common(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)
    return parser


def main(argv: Sequence[str] | None = None,
         pipeline_factory: Callable[[], Pipeline] = default_pipeline) -> int:
    pipe = pipeline_factory()
    parser = build_parser(pipe.order)
    # Overrides may stand before, between or after flags: collect the leftovers that look like
    # key=value (argparse alone stops at the first flag after a positional list).
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = list(args.overrides) + [a for a in extra if a not in unknown]
    _setup_logging(args.verbose)
    try:
        return args.func(args, pipe)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except SelectionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except StageFailed as e:
        print(f"error: {e}\nRerun the same command to resume it.", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
