"""The one training loop every training stage runs, on any launcher.

A stage supplies a *task* (:class:`Task`): it builds its models and DeepSpeed engines on the
context's device, turns a batch into one micro-step and its scalars, makes periodic images, and
exports + evaluates at the end. The loop owns everything the trainers would otherwise repeat:

- context (rank, world, device: :mod:`pipeline.train.context`), device settings, seeding;
- restore from the newest checkpoint (:mod:`pipeline.train.checkpoint`), and per-rank seeding
  of a fresh run;
- the step loop: learning rate, gradient accumulation, moving each batch to the device (the
  only place that does), ``TrainState.advance``, the fault hook (:mod:`pipeline.faults`),
  logging cadence (tracker, ``history.jsonl``, ``progress.json``), images, checkpoints;
- the final export, then the tracker's end.

It does not need Ray: :func:`pipeline.train.launch.fit` runs it on Ray Train workers,
:func:`pipeline.train.launch.fit_local` in this process (or under ``torchrun``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from pipeline.config import ConfigError
from pipeline.data.loader import stream_count
from pipeline.faults import Fault, die_if_due
from pipeline.progress import progress_uri, record
from pipeline.seeds import derive
from pipeline.storage import Storage, join
from pipeline.tracking import NullTracker, Tracker, TrackerSpec
from pipeline.train.checkpoint import Checkpoints
from pipeline.train.config import TrainConfig
from pipeline.train.context import TrainContext, prepare_device, to_device
from pipeline.train.engine import set_lr
from pipeline.train.history import MetricsLog
from pipeline.train.schedule import lr_at
from pipeline.train.state import TrainState

log = logging.getLogger("pipeline")

Batch = tuple[torch.Tensor, ...]


@dataclass
class LoopSpec:
    """Everything a training process needs; picklable (Ray ships it to every worker).

    ``task`` is the stage's task class (module level, so it pickles by reference); it is built
    as ``task(ctx, spec)``. ``args`` holds the stage's own inputs (shard URIs, data spec).
    """

    task: type
    cfg: TrainConfig
    storage: Storage
    uri: str  # the stage folder
    seed: int
    args: dict[str, Any] = field(default_factory=dict)
    tracker: TrackerSpec | None = None
    stage: str = "train"
    log_uri: str | None = None  # where workers' output goes (pipeline.logs); None: stays put
    fault: Fault | None = None  # test-only (pipeline.faults): a rank dies after this step
    # Set by the loop before the task is built: a checkpoint is about to be restored, so the
    # task must not load starting weights from elsewhere (train_vqgan.init_from).
    resuming: bool = False


class Task(Protocol):
    """What a training stage supplies to the loop.

    Attributes: ``engines`` (name → DeepSpeed engine, saved in every checkpoint), ``base_lr``
    (the schedule's peak), ``unit`` ("images" or "tokens") and ``units_per_sample`` (for
    throughput), ``progress_keys`` (scalars shown on the progress line).
    """

    engines: dict[str, Any]
    base_lr: float
    unit: str
    units_per_sample: int
    progress_keys: tuple[str, ...]

    def batches(self, position: Any) -> Iterator[tuple[Batch, Any]]:
        """Endless host-side ``(batch, data position after it)`` pairs from ``position``."""

    def step(self, batch: Batch, step: int, micro: int) -> dict[str, torch.Tensor]:
        """One micro-batch (already on the device) through forward, backward and the engines'
        ``step()``; returns detached scalar tensors (read only at logging cadence, so a GPU
        never waits on them)."""

    def images(self, step: int, tracker: Tracker) -> None:
        """Periodic images; called on every rank (a task may need a collective)."""

    # Optional: ``window_logs() -> dict[str, float]``, scalars about the steps since the last
    # logging point (e.g. codebook usage over them), called on every rank at logging cadence.

    def finish(self, state: TrainState, tracker: Tracker) -> None:
        """Export and evaluate; called on every rank after the last step."""


@dataclass
class LoopResult:
    state: TrainState  # at the end
    resumed: TrainState | None  # as restored from the checkpoint (None: a fresh start)
    checkpoint: str | None  # the newest checkpoint written or found


class Meter:
    """Throughput between two logging points."""

    def __init__(self, samples: int) -> None:
        self.t0, self.samples0 = time.perf_counter(), samples

    def rate(self, samples: int) -> float:
        """Samples per second since the last call (and restarts the clock)."""
        now = time.perf_counter()
        rate = (samples - self.samples0) / max(now - self.t0, 1e-9)
        self.t0, self.samples0 = now, samples
        return rate


def _accumulate(total: dict[str, torch.Tensor], scalars: dict[str, Any], scale: float) -> None:
    for k, v in scalars.items():
        v = v.detach().float() if torch.is_tensor(v) else torch.tensor(float(v))
        total[k] = total[k] + v * scale if k in total else v * scale


def resolve(cfg: TrainConfig, ctx: TrainContext, saved: TrainState | None) -> TrainConfig:
    """``cfg`` as this process runs it: ``num_workers`` the actual world size, ``grad_accum``
    such that the global batch is the run's, and ``data_streams`` resolved (0: the least common
    multiple of 12 and every worker count the run may take, so any of them splits it).

    The run's global batch is the checkpoint's when resuming (kept on any worker count), else
    ``micro_batch × grad_accum × num_workers`` under Ray (whose worker group may be smaller than
    ``num_workers`` after a node is lost) and ``micro_batch × grad_accum × world`` for other
    launchers (their world is what they were started with).
    """
    if saved is not None and saved.global_batch:
        target = saved.global_batch
    else:
        target = cfg.micro_batch * cfg.grad_accum * (
            cfg.num_workers if ctx.launcher == "ray" else ctx.world)
    per_pass = cfg.micro_batch * ctx.world
    if target % per_pass:
        raise ConfigError(
            "micro_batch", f"this run's global batch of {target} samples per step cannot be "
            f"split into micro-batches of {cfg.micro_batch} over {ctx.world} workers; choose a "
            f"micro_batch and worker count whose product divides {target}")
    accum = target // per_pass
    if accum != cfg.grad_accum and ctx.is_main:
        log.info("global batch %d on %d workers: grad_accum %d (config %d)", target, ctx.world,
                 accum, cfg.grad_accum)
    streams = stream_count(cfg.data_streams, ctx.world, *cfg.worker_counts())
    return dataclasses.replace(cfg, num_workers=ctx.world, grad_accum=accum,
                               data_streams=streams)


def run(spec: LoopSpec, ctx: TrainContext, checkpoints: Checkpoints) -> LoopResult:
    """Train ``spec.task`` to ``spec.cfg.steps`` optimizer steps on this process, resuming from
    the newest checkpoint (written on any worker count)."""
    storage = spec.storage
    prepare_device(ctx, spec.cfg.cpus_per_worker)
    saved = checkpoints.peek()
    spec = dataclasses.replace(spec, cfg=resolve(spec.cfg, ctx, saved), resuming=saved is not None)
    cfg = spec.cfg
    torch.manual_seed(spec.seed)  # identical initial weights on every rank
    task = spec.task(ctx, spec)
    if ctx.is_main:
        log.info("peak learning rate %.3g (%s)", task.base_lr, cfg.lr_rule())
    # Per-rank randomness (dropout, restarts); a restored checkpoint replaces it with the RNG
    # state this rank saved, where it existed then.
    torch.manual_seed(derive(spec.seed, "rank", ctx.rank))
    resumed = checkpoints.restore(task.engines)
    if resumed is None:
        state = TrainState()
    else:
        state = TrainState.from_json(resumed.to_json())
        log.info("rank %d resumed at step %d", ctx.rank, state.step)
    tracker = spec.tracker.create() if ctx.is_main and spec.tracker else NullTracker()
    history = MetricsLog(storage, join(spec.uri, "history.jsonl"), state.step)
    batches = task.batches(state.data.get("position"))
    started, meter = time.perf_counter(), Meter(state.samples_seen)
    while state.step < cfg.steps:
        lr = lr_at(state.step, task.base_lr, warmup=cfg.warmup_steps, total=cfg.steps,
                   schedule=cfg.schedule, min_ratio=cfg.min_lr_ratio)
        for engine in task.engines.values():
            set_lr(engine, lr)
        sums: dict[str, torch.Tensor] = {}
        for micro in range(cfg.grad_accum):
            batch, position = next(batches)
            scalars = task.step(to_device(batch, ctx.device), state.step, micro)
            _accumulate(sums, scalars, 1.0 / cfg.grad_accum)
        state.advance(cfg.global_batch, position)
        die_if_due(spec.fault, state.step, ctx.rank, ctx.world)
        logs: dict[str, float] | None = None
        if cfg.due(state.step, cfg.log_every):
            logs = {k: float(v) for k, v in sums.items()}
            if hasattr(task, "window_logs"):
                logs.update(task.window_logs())
            samples_per_s = meter.rate(state.samples_seen)
            rate = samples_per_s * task.units_per_sample
            logs.update({"lr": lr, f"{task.unit}_per_s": rate})
            tracker.log(logs, step=state.step)
            if ctx.is_main:
                history.append({"step": state.step, **logs})
                history.flush()
                shown = {k: logs[k] for k in task.progress_keys if k in logs}
                rec = record(state.step, cfg.steps, rate, task.unit, shown,
                             time.perf_counter() - started, samples_per_s / cfg.global_batch)
                # What this run restored: checks (bench/gpu_stages.py) compare it with the
                # checkpoint's own state.json.
                rec["resumed_from"] = json.loads(resumed.to_json()) if resumed else None
                storage.write_json(progress_uri(spec.uri), rec)
        if cfg.due(state.step, cfg.image_every):
            task.images(state.step, tracker)
        if cfg.due(state.step, cfg.checkpoint_every):
            metrics = logs if logs is not None else {k: float(v) for k, v in sums.items()}
            checkpoints.save(task.engines, state, metrics)
    task.finish(state, tracker)
    tracker.finish()
    return LoopResult(state, resumed, checkpoints.latest())
