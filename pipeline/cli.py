"""Command line: ``python -m pipeline {run,status,report} CONFIG [key=value ...]``,
``python -m pipeline sample RUN_URI [options] --out DIR`` and
``python -m pipeline import-taming REF.yaml [--out FILE]``.

One entry function per command. Exit codes: 0 success, 1 a stage failed, 2 bad usage or config
(nothing written).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pipeline.config import ConfigError, dump_yaml, load_config
from pipeline.dag import Pipeline, SelectionError, StageFailed
from pipeline.storage import Storage, join

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
    storage = Storage.from_config(cfg.storage)
    main_rank = not args.no_ray or os.environ.get("RANK", "0") == "0"  # torchrun: rank 0 reports
    try:
        manifests = pipe.run(cfg, storage, only=args.only or (), from_=args.from_,
                             until=args.until, force=args.force or (), on_ray=ensure_ray,
                             local=args.no_ray)
    finally:  # also after a failed stage: the report shows what is done so far
        if main_rank:
            _report(pipe, cfg, storage)
    log.info("run %r complete: %s", cfg.run, ", ".join(manifests) or "nothing selected")
    print(pipe.run_uri(cfg))
    return 0


def _report(pipe: Pipeline, cfg: Any, storage: Storage) -> str | None:
    from pipeline.report import write_report

    try:
        uri = write_report(pipe, cfg, storage)
    except Exception as e:  # the report must never hide the run's own outcome
        log.warning("report.html not written: %s: %s", type(e).__name__, e)
        return None
    log.info("report: %s", uri)
    return uri


def cmd_report(args: argparse.Namespace, pipe: Pipeline) -> int:
    """(Re)write <root>/<run>/report.html from the finished stages; starts nothing."""
    cfg = _load(pipe, args)
    uri = _report(pipe, cfg, Storage.from_config(cfg.storage))
    if uri is None:
        return 1
    print(uri)
    return 0


def _size(text: str) -> tuple[int, int]:
    """'HxW' or 'S' (pixels) -> (H, W)."""
    parts = text.lower().split("x")
    try:
        h, w = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (0, 0)
    except ValueError:
        h = w = 0
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"expected HxW in pixels (e.g. 32x64), got {text!r}")
    return h, w


def cmd_sample(args: argparse.Namespace, pipe: Pipeline) -> int:
    """Sample images from a finished run into --out: N PNGs (per class) plus grid.png."""
    import torch

    from pipeline import generate as g

    storage = Storage(endpoint_url=args.endpoint_url, region=args.region)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        models = g.find_models(storage, args.run_uri)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = "cuda" if args.device == "cuda" or (args.device == "auto"
                                                 and torch.cuda.is_available()) else "cpu"
    gpt, vqgan = g.load_models(storage, models, device)
    factor = vqgan.config.downsample_factor
    h, w = models.grid
    try:
        options = g.SampleOptions(args.temperature, args.top_k or None, args.top_p, args.cfg)
        options.check()
        if args.n < 1:
            raise ValueError(f"--n: must be >= 1, got {args.n}")
        grid = g.code_grid(args.size, factor, models.grid) if args.size else models.grid
        cond = _condition(args, storage, models, device)
        if cond is not None:
            grid = tuple(cond[0].shape[-2:])
        if args.classes and not models.classes:
            raise ValueError("--class: this run's GPT is unconditional")
        bad = [k for k in args.classes or [] if not 0 <= k < len(models.classes)]
        if bad:
            raise ValueError(f"--class: {bad} not in [0, {len(models.classes)}) "
                             f"(classes: {', '.join(models.classes)})")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    classes = args.classes or list(range(len(models.classes)))
    labels = g.class_labels(args.n, classes) if models.classes else None
    n = len(labels) if labels is not None else args.n
    log.info("sampling %d images of %dx%d px (code grid %dx%d%s) from %s", n, grid[0] * factor,
             grid[1] * factor, *grid,
             f", sliding {h}x{w} window" if grid != models.grid else "", models.transformer_uri)
    out = g.generate(gpt, vqgan, n, labels, models.grid, grid, options=options, seed=args.seed,
                     batch_size=args.batch_size, progress=True,
                     cond_grids=cond[0] if cond is not None else None)
    names = g.sample_names(labels, n, models.classes)
    _, grid_uri = g.write_pngs(storage, args.out, out.images, names,
                               cols=args.n if labels is not None else min(n, 10))
    condition = None
    if cond is not None:  # the map as the model read it (cropped), to look at beside the samples
        from pipeline.metrics import png_bytes, to_uint8

        preview = g.condition_input(models).preview(cond[1])
        storage.write_bytes(join(args.out, "condition.png"), png_bytes(to_uint8(preview)[0]))
        condition = {"map": args.cond, "kind": models.condition["kind"], "file": "condition.png",
                     "size": list(cond[1].shape[-2:])}
    storage.write_json(join(args.out, "samples.json"), {
        "run": args.run_uri, "transformer": models.transformer_uri, "seed": args.seed,
        "options": options.to_dict(), "code_grid": list(grid), "condition": condition,
        "image_size": list(out.images.shape[-2:]), "seconds": round(out.seconds, 3),
        "files": [{"file": f, "class": None if labels is None else int(k)}
                  for f, k in zip(names, labels.tolist() if labels is not None else [None] * n,
                                  strict=True)]})
    log.info("%d samples in %.1fs (%.0f codes/s) -> %s", n, out.seconds, out.tokens_per_s,
             args.out)
    print(grid_uri)
    return 0


def _condition(args: argparse.Namespace, storage: Storage, models: Any, device: str
               ) -> tuple[Any, Any] | None:
    """(condition codes [1, H, W], the cropped map [1, C, H·f, W·f]) of ``--cond``, or None
    for a GPT without condition maps; ValueError for a missing, unreadable or mismatched
    --cond."""
    from pipeline import generate as g

    if models.condition is None:
        if args.cond:
            raise ValueError("--cond: this run's GPT reads no condition maps")
        return None
    if not args.cond:
        raise ValueError(f"--cond: this run's GPT generates images from "
                         f"{models.condition['kind']} maps; give one (--cond MAP.png)")
    if args.size:
        raise ValueError("--size: the --cond map sets the size")
    try:
        data = storage.read_bytes(args.cond)
    except FileNotFoundError as e:
        raise ValueError(f"--cond: {args.cond} not found") from e
    cond_vqgan = g.load_cond_vqgan(storage, models, device)
    return g.encode_condition(cond_vqgan, g.condition_input(models), data, f"--cond {args.cond}",
                              models.grid)


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 120:
        return f"{s:.1f}s"
    return f"{s / 60:.1f}m" if s < 7200 else f"{s / 3600:.1f}h"


def cmd_status(args: argparse.Namespace, pipe: Pipeline) -> int:
    """Print each stage's state (done / partial / pending / skipped: not part of this run, the
    reason in place of the finish time), output URI, fingerprint, timing."""
    cfg = _load(pipe, args)
    rows = pipe.status(cfg, Storage.from_config(cfg.storage))
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], indent=2))
        return 0
    table = [("STAGE", "STATE", "FINISHED", "TOOK", "FINGERPRINT", "OUTPUT")]
    table += [(r.name, r.state, r.finished_at or r.reason or "-", _fmt_seconds(r.seconds),
               r.fingerprint[:12], "-" if r.state == "skipped" else r.uri) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    return 0


def cmd_import_taming(args: argparse.Namespace, pipe: Pipeline) -> int:
    """Convert a taming-transformers config into ours (pipeline.importer); the result is
    validated as `run` would load it, then written to --out or printed."""
    from pipeline.importer import import_taming, read_reference, validate_text

    imported = import_taming(read_reference(args.reference), source=args.reference,
                             name=args.run, num_workers=args.num_workers)
    text = imported.to_yaml()
    validate_text(text, pipe.schema)
    if args.out is None:
        print(text, end="")
        return 0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        fh.write(text)
    log.info("wrote %s (from %s)", args.out, args.reference)
    print(args.out)
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
    run.add_argument("--no-ray", action="store_true",
                     help="run without Ray, in this process: training stages on the same loop "
                          "(one process, or each rank of a torchrun launch), shard and tokenize "
                          "one shard after another. For machines without Ray (a GPU box)")
    run.add_argument("--print-config", action="store_true",
                     help="print the resolved config and exit")
    run.set_defaults(func=cmd_run)

    status = sub.add_parser("status", help="show each stage: done / partial / pending",
                            description="Show each stage's state, output URI, fingerprint, "
                                        "when it finished and how long it took. Starts nothing.")
    common(status)
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=cmd_status)

    report = sub.add_parser("report", help="(re)write <root>/<run>/report.html",
                            description="Render report.html in the run folder from the finished "
                                        "stages (run writes it too). Starts nothing.")
    common(report)
    report.set_defaults(func=cmd_report)

    sample = sub.add_parser(
        "sample", help="sample PNGs from a finished run",
        description="Sample images from a finished run on any storage root: N per class (or N "
                    "unconditional) individual PNGs plus grid.png and samples.json in --out. "
                    "--size larger than the trained size samples with a sliding window.")
    sample.add_argument("run_uri", metavar="RUN_URI",
                        help="<root>/<run> (e.g. runs/tiny or s3://bucket/runs/exp1), or a "
                             "train_transformer-<fp> folder")
    sample.add_argument("--out", required=True, metavar="DIR", help="output folder or URI")
    sample.add_argument("--class", dest="classes", type=int, action="append", metavar="K",
                        help="class id to sample (repeatable; default: every class)")
    sample.add_argument("--n", type=int, default=8, help="samples per class (default 8)")
    sample.add_argument("--size", type=_size, metavar="HxW",
                        help="image size in pixels (default: the trained size); larger sizes "
                             "use sliding-window sampling")
    sample.add_argument("--cond", metavar="MAP.png",
                        help="condition map (runs with shard.condition: a label map, 16-bit "
                             "depth, edge or gray PNG as the shard stage stores that kind); the "
                             "samples take its size (center-cropped to a multiple of the "
                             "VQGAN's factor), with a sliding window when larger than the "
                             "trained size")
    sample.add_argument("--temperature", type=float, default=1.0)
    sample.add_argument("--top-k", type=int, default=100, metavar="K",
                        help="sample among the K likeliest codes (default 100, as the "
                             "reference's scripts; 0: off)")
    sample.add_argument("--top-p", type=float, default=None, metavar="P")
    sample.add_argument("--cfg", type=float, default=1.0, metavar="S",
                        help="classifier-free guidance scale (1: off)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--batch-size", type=int, default=64)
    sample.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    sample.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    sample.add_argument("--endpoint-url", default=None,
                        help="S3-compatible endpoint (else AWS_ENDPOINT_URL / AWS defaults)")
    sample.add_argument("--region", default=None)
    sample.set_defaults(func=cmd_sample)

    imp = sub.add_parser(
        "import-taming", help="convert a taming-transformers config yaml into ours",
        description="Read a taming-transformers config (a VQModel first stage, or a "
                    "Net2NetTransformer with its first stage) and write the pipeline config of "
                    "the same setup, each value commented with the reference key it came from. "
                    "Keys it cannot map are refused (exit 2, the key named); the result is "
                    "validated as `run` loads configs. Without --out it is printed.")
    imp.add_argument("reference", metavar="REF.yaml", help="the reference's config file")
    imp.add_argument("--out", metavar="FILE", help="write the config here (default: stdout)")
    imp.add_argument("--run", metavar="NAME", help="the run name (default: from REF's name)")
    imp.add_argument("--num-workers", type=int, metavar="N",
                     help="GPUs to train on (default: lightning.trainer.gpus, else 8)")
    imp.set_defaults(func=cmd_import_taming)
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
    if not hasattr(args, "overrides"):  # commands without a CONFIG take no key=value
        unknown = extra
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    else:
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
