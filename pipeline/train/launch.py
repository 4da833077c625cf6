"""Running a training loop on Ray Train workers, checkpointing into the stage folder."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pipeline.storage import Storage, is_local, local_path, protocol_of
from pipeline.train.config import TrainConfig

log = logging.getLogger("pipeline")


class ResourceError(RuntimeError):
    """The cluster cannot host the requested workers (fail now instead of hanging)."""


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


def check_resources(tc: TrainConfig) -> None:
    """Fail with a clear message when the workers cannot all be scheduled."""
    import ray

    total = ray.cluster_resources()
    need_cpu = tc.num_workers * tc.cpus_per_worker
    if total.get("CPU", 0) < need_cpu:
        raise ResourceError(
            f"training needs {need_cpu:g} CPUs ({tc.num_workers} workers × "
            f"{tc.cpus_per_worker:g}) but the cluster has {total.get('CPU', 0):g}: lower "
            f"num_workers or cpus_per_worker")
    if tc.use_gpu and total.get("GPU", 0) < tc.num_workers:
        raise ResourceError(f"use_gpu with {tc.num_workers} workers needs {tc.num_workers} GPUs; "
                            f"the cluster has {total.get('GPU', 0):g}")


def fit(loop: Callable[[dict[str, Any]], None], loop_config: dict[str, Any], *, uri: str,
        storage: Storage, tc: TrainConfig, name: str = "train") -> Any:
    """Run ``loop`` on ``tc.num_workers`` Ray Train workers; returns Ray's Result.

    Checkpoints go to ``<uri>/<name>/checkpoint-*``; a rerun with the same ``uri`` and ``name``
    resumes from the newest one (Ray Train V2 finds its snapshot there); crashed workers are
    restarted from it up to ``tc.max_failures`` times.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    check_resources(tc)
    storage_path, filesystem = ray_storage(uri, storage)
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker={"CPU": tc.cpus_per_worker}),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=tc.keep_checkpoints),
            failure_config=FailureConfig(max_failures=tc.max_failures),
        ),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return result
