"""Checkpoints through Ray Train: DeepSpeed engines + TrainState + per-rank RNG in one folder.

Every rank writes into its own temporary folder and calls ``ray.train.report`` with the same
``checkpoint_dir_name`` (a barrier: all ranks, same count); Ray merges the rank folders into one
checkpoint under the stage folder. Layout::

    checkpoint-<step:08d>/
      <engine name>/ckpt/...        DeepSpeed files (model states, per-rank optimizer shards)
      state.json                    TrainState (rank 0)
      rng/rank-<r>.pt               RNG states of each rank
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

from pipeline.train.state import TrainState, capture_rng, restore_rng

TAG = "ckpt"


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}"


def save(engines: dict[str, Any], state: TrainState, metrics: dict[str, Any]) -> None:
    """Collective: every rank must call it at the same step."""
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
        for name, engine in engines.items():
            engine.save_checkpoint(os.path.join(tmp, name), tag=TAG, save_latest=False)
        os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
        torch.save(capture_rng(), os.path.join(tmp, "rng", f"rank-{rank}.pt"))
        if rank == 0:
            with open(os.path.join(tmp, "state.json"), "w") as fh:
                fh.write(state.to_json())
        ray.train.report({**metrics, "step": state.step},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=checkpoint_name(state.step))


def restore(engines: dict[str, Any]) -> TrainState | None:
    """Load the newest checkpoint Ray Train knows of into ``engines``; None if there is none.

    A checkpoint written by a different number of workers is refused with a clear message
    for ZeRO-partitioned optimizer states (DeepSpeed cannot re-partition them on load).
    """
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    with ckpt.as_directory() as folder:
        saved_ranks = len(os.listdir(os.path.join(folder, "rng")))
        if saved_ranks != ctx.get_world_size():
            raise RuntimeError(
                f"checkpoint {ckpt.path} was written by {saved_ranks} workers but this run has "
                f"{ctx.get_world_size()}: resume with num_workers={saved_ranks}, or export the "
                f"weights (DeepSpeed's zero_to_fp32.py) and start a new run from them")
        for name, engine in engines.items():
            path, _ = engine.load_checkpoint(os.path.join(folder, name), tag=TAG)
            if path is None:
                raise RuntimeError(f"no DeepSpeed checkpoint for engine {name!r} in {ckpt.path}")
        with open(os.path.join(folder, "state.json")) as fh:
            state = TrainState.from_json(fh.read())
        rng = os.path.join(folder, "rng", f"rank-{rank}.pt")
        restore_rng(torch.load(rng, weights_only=False))
    return state
