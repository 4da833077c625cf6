"""Launching the training loop: on Ray Train workers (``fit``) or in this process
(``fit_local``, also one rank of ``torchrun``), checkpointing into the stage folder."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from pipeline.ray_tasks import cluster_resources, require
from pipeline.storage import Storage, is_local, join, local_path, protocol_of
from pipeline.train.config import TrainConfig
from pipeline.train.loop import LoopSpec

log = logging.getLogger("pipeline")

CHECKPOINTS = "train"  # checkpoint folder inside the stage folder


def ray_storage(uri: str, storage: Storage) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for Ray Train's RunConfig.

    Local: the path and no filesystem. Object storage: our fsspec filesystem (same endpoint and
    environment credentials) wrapped for pyarrow, with a scheme-less ``bucket/prefix`` path
    (Ray rejects ``s3://`` together with a filesystem object).
    """
    if is_local(uri):
        return local_path(uri), None
    import pyarrow.fs

    fs, path = storage.fs(uri)
    log.debug("Ray Train storage on %s via fsspec", protocol_of(uri))
    return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


# How long a training stage waits for CPUs/GPUs it lacks when the cluster has lost a node (its
# replacement, or the node itself, may be rejoining) before it fails with ResourceError.
LOST_NODE_WAIT_S = 120.0


def lost_nodes() -> int:
    """Nodes the Ray cluster knows as dead (lost since it started)."""
    import ray

    return sum(1 for n in ray.nodes() if not n.get("Alive", False))


def wait_for_capacity(tc: TrainConfig, timeout_s: float | None = None,
                      poll_s: float = 2.0) -> dict[str, float]:
    """The cluster's resources, once they can host the fewest workers ``tc`` may run on; after a
    lost node, waits up to ``timeout_s`` for them (a node just restarted, or the autoscaler's
    replacement, joins seconds to minutes later; default :data:`LOST_NODE_WAIT_S`). Without a
    lost node, returns at once: an embedded or static cluster will not grow, so check_resources
    fails fast."""
    timeout_s = LOST_NODE_WAIT_S if timeout_s is None else timeout_s
    fewest = tc.worker_counts()[0]
    need = {"CPU": fewest * tc.cpus_per_worker, "GPU": float(fewest) if tc.use_gpu else 0.0}

    def short(total: dict[str, float]) -> bool:
        return any(total.get(k, 0.0) + 1e-9 < v for k, v in need.items())

    total = cluster_resources()
    if not short(total) or not lost_nodes():
        return total
    log.warning("training needs %s but the Ray cluster has %s after losing a node: waiting up "
                "to %.0f s for nodes to join", need, {k: total.get(k, 0.0) for k in need},
                timeout_s)
    deadline = time.monotonic() + timeout_s
    while short(total) and time.monotonic() < deadline:
        time.sleep(poll_s)
        total = cluster_resources()
    return total


def check_resources(tc: TrainConfig) -> None:
    """ResourceError with the knob to turn when the workers cannot all be scheduled (after
    :func:`wait_for_capacity`)."""
    total = wait_for_capacity(tc)
    fewest = tc.worker_counts()[0]  # elastic: the run can start on its minimum
    require(f"training ({fewest} workers × {tc.cpus_per_worker:g} CPUs)", "CPU",
            fewest * tc.cpus_per_worker, total.get("CPU", 0),
            "lower num_workers (or min_workers) or cpus_per_worker")
    if tc.use_gpu:
        require(f"training with use_gpu ({fewest} workers)", "GPU", fewest,
                total.get("GPU", 0), "lower num_workers (or min_workers), or add GPU nodes")


def prepare_elastic_start() -> list[str]:
    """Before an elastic run: cancel reservations of dead runs and refresh the cluster view of
    Ray's AutoscalingCoordinator; returns the reservations released.

    An elastic run (``ScalingConfig(num_workers=(min, max))``) sizes its worker group from that
    cluster-wide actor's view of the free resources, which it refreshes every 20 s: a run that
    starts just after a node joined would otherwise start without it (and grow only at the next
    resize check). The run also reserves its workers' resources there under ``train-<run id>``,
    renewed every 20 s and held for 180 s; a run whose driver was killed never cancels it, so a
    resubmitted run would see room for no worker for up to 3 minutes. When no Train controller
    is alive on the cluster, every ``train-*`` reservation left is a dead run's. Uses Ray
    internals (2.60): any failure is logged and ignored (the run then starts on the stale
    view, and a dead reservation simply expires).
    """
    try:
        import ray
        from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
            get_or_create_autoscaling_coordinator,
        )
        from ray.util.state import list_actors

        coordinator = get_or_create_autoscaling_coordinator()
        alive = list_actors(filters=[("class_name", "=", "TrainController"),
                                     ("state", "=", "ALIVE")])
        stale = [] if alive else ray.get(coordinator.__ray_call__.remote(
            lambda self: [r for r in self._ongoing_reqs if str(r).startswith("train-")]),
            timeout=30)
        for requester in stale:
            ray.get(coordinator.cancel_request.remote(requester_id=requester), timeout=30)
        if stale:
            log.info("released %d elastic training reservation(s) of dead runs", len(stale))
        ray.get(coordinator.__ray_call__.remote(lambda self: self._tick()), timeout=30)
        return list(stale)
    except Exception as err:  # noqa: BLE001 - best effort over private APIs
        log.debug("could not prepare the elastic start: %r", err)
        return []


def _run_uri(stage_uri: str) -> str:
    return stage_uri.rsplit("/", 1)[0]


def worker_log_uri(spec: LoopSpec, rank: int) -> str:
    """``<run>/logs/<stage>.log`` (rank 0) or ``<stage>.rank-<r>.log``."""
    from pipeline.logs import stage_log_uri

    return stage_log_uri(_run_uri(spec.uri), spec.stage, rank)


def ray_worker(spec: LoopSpec) -> None:
    """The Ray Train worker function: the loop with Ray's context and checkpoints; the worker's
    whole output (stdout, stderr, C-level too) goes to the stage's log file."""
    from pipeline.logs import capture_output
    from pipeline.train import loop
    from pipeline.train.checkpoint import FolderCheckpoints, RayCheckpoints
    from pipeline.train.context import from_ray

    ctx = from_ray(spec.cfg.use_gpu)
    # Without a Ray checkpoint, resume from one another launcher wrote in the same folder.
    written_elsewhere = FolderCheckpoints(spec.storage, join(spec.uri, CHECKPOINTS), ctx.rank,
                                          ctx.world, spec.cfg.keep_checkpoints)
    with capture_output(spec.storage, worker_log_uri(spec, ctx.rank)):
        loop.run(spec, ctx, RayCheckpoints(written_elsewhere))


def fit(spec: LoopSpec) -> str | None:
    """Run the loop on ``tc.num_workers`` Ray Train workers (or elastically on
    ``min_workers``..``num_workers``); returns the newest checkpoint's URI.

    Checkpoints go to ``<uri>/train/checkpoint-*``; a rerun with the same ``uri`` resumes from
    the newest one (Ray Train V2 finds its snapshot there); crashed workers are restarted from it
    up to ``tc.max_failures`` times. The driver shows one progress line meanwhile.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipeline.progress import watch

    tc = spec.cfg
    check_resources(tc)
    storage_path, filesystem = ray_storage(spec.uri, spec.storage)
    counts = tc.worker_counts()
    # Elastic: Ray Train starts on as many as it can place and, after a lost node, restarts
    # from the newest checkpoint on fewer (pipeline.train.loop.resolve keeps the global batch).
    workers: int | tuple[int, int] = counts[0] if len(counts) == 1 else (counts[0], counts[-1])
    if len(counts) > 1:
        prepare_elastic_start()
    trainer = TorchTrainer(
        ray_worker,
        train_loop_config=spec,
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=tc.use_gpu,
                                     resources_per_worker={"CPU": tc.cpus_per_worker}),
        run_config=RunConfig(
            name=CHECKPOINTS,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=tc.keep_checkpoints),
            failure_config=FailureConfig(max_failures=tc.max_failures),
        ),
    )
    with watch(spec.storage, spec.uri, spec.stage):
        result = trainer.fit()
    if result.error is not None:
        log.error("[%s] training failed; the workers' full output: %s", spec.stage,
                  worker_log_uri(spec, 0))
        raise result.error
    return result.checkpoint.path if result.checkpoint else None


def fit_local(spec: LoopSpec) -> str | None:
    """Run the loop in this process, without Ray: one process, or one rank of a ``torchrun``
    launch (torch.distributed env:// variables). Checkpoints go to the same
    ``<uri>/train/checkpoint-*`` folders as under Ray (either launcher resumes the other's).
    Returns the newest checkpoint's URI."""
    from pipeline.progress import watch
    from pipeline.train import loop
    from pipeline.train.checkpoint import FolderCheckpoints
    from pipeline.train.context import barrier, from_env

    tc = spec.cfg
    ctx = from_env(tc.use_gpu)
    if ctx.world != tc.num_workers:
        log.info("[%s] %d process(es) here; train.num_workers=%d is for Ray launches",
                 spec.stage, ctx.world, tc.num_workers)
    checkpoints = FolderCheckpoints(spec.storage, join(spec.uri, CHECKPOINTS), ctx.rank,
                                    ctx.world, tc.keep_checkpoints)
    with watch(spec.storage, spec.uri, spec.stage, every_s=1.0) if ctx.is_main \
            else contextlib.nullcontext():
        result = loop.run(spec, ctx, checkpoints)
    barrier()  # rank 0's export is written before any rank reads it
    return result.checkpoint


def launch(ctx: Any, task: type, args: dict[str, Any], cfg: Any = None) -> str | None:
    """Train a stage's ``task`` from its StageContext: on Ray Train, or in this process when the
    pipeline runs without Ray (``ctx.local``). ``cfg``: the training config when the stage
    resolved it from its section (default ``ctx.cfg``). Returns the newest checkpoint's URI."""
    from pipeline.faults import planned

    spec = LoopSpec(task=task, cfg=cfg or ctx.cfg, storage=ctx.storage, uri=ctx.uri,
                    seed=int(ctx.root_cfg.seed), args=args, tracker=ctx.tracker_spec,
                    stage=ctx.name, fault=planned(ctx.name))
    return fit_local(spec) if ctx.local else fit(spec)
