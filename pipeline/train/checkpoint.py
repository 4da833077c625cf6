"""Checkpoints: DeepSpeed engines + TrainState + per-rank RNG in one folder, two stores.

Layout of one checkpoint (the same for both stores, so either can resume the other's)::

    checkpoint-<step:08d>/
      <engine name>/ckpt/...        DeepSpeed files (model states, per-rank optimizer shards)
      rng/rank-<r>.pt               RNG states of each rank
      state.json                    TrainState (rank 0)

- :class:`RayCheckpoints` (under Ray Train): every rank writes into its own temporary folder
  and calls ``ray.train.report`` with the same ``checkpoint_dir_name`` (a barrier: all ranks,
  same count); Ray merges the rank folders under the stage folder and keeps ``num_to_keep``.
- :class:`FolderCheckpoints` (any other launcher): every rank uploads its files into
  ``<folder>/checkpoint-<step>/`` through :class:`~pipeline.storage.Storage` (local or object
  storage), all ranks meet, then rank 0 writes ``state.json`` LAST: a checkpoint is complete iff
  its ``state.json`` exists. Rank 0 then removes the oldest complete ones beyond ``keep``.
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Any, Protocol

import torch

from pipeline.storage import Storage, basename, join
from pipeline.train.context import barrier
from pipeline.train.state import TrainState, capture_rng, restore_rng

TAG = "ckpt"
STATE = "state.json"
_NAME = re.compile(r"checkpoint-(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}"


class Checkpoints(Protocol):
    """Where a training loop saves and finds its checkpoints."""

    def save(self, engines: dict[str, Any], state: TrainState, metrics: dict[str, Any]) -> None:
        """Collective: every rank calls it at the same step."""

    def restore(self, engines: dict[str, Any]) -> TrainState | None:
        """Load the newest complete checkpoint into ``engines``; None when there is none."""

    def latest(self) -> str | None:
        """URI of the newest complete checkpoint (after a save), or None."""


# -- one checkpoint folder on local disk ------------------------------------------------------


def write_folder(folder: str, engines: dict[str, Any], state: TrainState, rank: int,
                 with_state: bool) -> None:
    """This rank's part of a checkpoint into local ``folder`` (``state.json`` if asked)."""
    for name, engine in engines.items():
        engine.save_checkpoint(os.path.join(folder, name), tag=TAG, save_latest=False)
    os.makedirs(os.path.join(folder, "rng"), exist_ok=True)
    torch.save(capture_rng(), os.path.join(folder, "rng", f"rank-{rank}.pt"))
    if with_state:
        with open(os.path.join(folder, STATE), "w") as fh:
            fh.write(state.to_json())


def load_folder(folder: str, engines: dict[str, Any], rank: int, world: int,
                where: str) -> TrainState:
    """Load a complete local checkpoint ``folder`` (``where`` names it in errors).

    A checkpoint written by another number of workers is refused with a clear message: DeepSpeed
    cannot re-partition ZeRO optimizer states on load.
    """
    saved_ranks = len(os.listdir(os.path.join(folder, "rng")))
    if saved_ranks != world:
        raise RuntimeError(
            f"checkpoint {where} was written by {saved_ranks} workers but this run has {world}: "
            f"resume with num_workers={saved_ranks}, or export the weights (DeepSpeed's "
            f"zero_to_fp32.py) and start a new run from them")
    for name, engine in engines.items():
        path, _ = engine.load_checkpoint(os.path.join(folder, name), tag=TAG)
        if path is None:
            raise RuntimeError(f"no DeepSpeed checkpoint for engine {name!r} in {where}")
    with open(os.path.join(folder, STATE)) as fh:
        state = TrainState.from_json(fh.read())
    restore_rng(torch.load(os.path.join(folder, "rng", f"rank-{rank}.pt"), weights_only=False))
    return state


# -- the two stores -----------------------------------------------------------------------------


class RayCheckpoints:
    """Checkpoints through Ray Train (its storage path is the stage's ``train/`` folder)."""

    def __init__(self) -> None:
        self._latest: str | None = None

    def save(self, engines: dict[str, Any], state: TrainState, metrics: dict[str, Any]) -> None:
        import ray.train

        ctx = ray.train.get_context()
        rank = ctx.get_world_rank()
        with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
            write_folder(tmp, engines, state, rank, with_state=rank == 0)
            ray.train.report({**metrics, "step": state.step},
                             checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=checkpoint_name(state.step))
        self._latest = checkpoint_name(state.step)

    def restore(self, engines: dict[str, Any]) -> TrainState | None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        ctx = ray.train.get_context()
        with ckpt.as_directory() as folder:
            return load_folder(folder, engines, ctx.get_world_rank(), ctx.get_world_size(),
                               ckpt.path)

    def latest(self) -> str | None:
        return self._latest


class FolderCheckpoints:
    """Checkpoints under ``folder`` (a local path or an object-storage URI), no Ray needed."""

    def __init__(self, storage: Storage, folder: str, rank: int, world: int, keep: int) -> None:
        self.storage, self.folder = storage, folder
        self.rank, self.world, self.keep = rank, world, keep

    def complete(self) -> list[str]:
        """Complete checkpoints' URIs, oldest first."""
        found = sorted(u for u in self.storage.listdir(self.folder)
                       if _NAME.match(basename(u)))
        return [u for u in found if self.storage.exists(join(u, STATE))]

    def latest(self) -> str | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, engines: dict[str, Any], state: TrainState, metrics: dict[str, Any]) -> None:
        uri = join(self.folder, checkpoint_name(state.step))
        with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
            write_folder(tmp, engines, state, self.rank, with_state=False)
            self._upload(tmp, uri)
        barrier()  # every rank's files are in place before the checkpoint is declared complete
        if self.rank == 0:
            self.storage.write_text(join(uri, STATE), state.to_json())
            for old in self.complete()[:-self.keep]:
                self.storage.rm(old, recursive=True)
        barrier()

    def _upload(self, local: str, uri: str) -> None:
        for root, _, files in os.walk(local):
            for f in files:
                path = os.path.join(root, f)
                rel = os.path.relpath(path, local).replace(os.sep, "/")
                self.storage.put_file(path, join(uri, rel))

    def restore(self, engines: dict[str, Any]) -> TrainState | None:
        uri = self.latest()
        if uri is None:
            return None
        with tempfile.TemporaryDirectory(prefix="restore-") as tmp:
            for f in self.storage.walk_files(uri):
                # Every rank's files: DeepSpeed's ZeRO load reads all ranks' optimizer shards.
                rel = f[len(uri) + 1:]
                dest = os.path.join(tmp, *rel.split("/"))
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                with open(dest, "wb") as fh:
                    fh.write(self.storage.read_bytes(f))
            return load_folder(tmp, engines, self.rank, self.world, uri)

