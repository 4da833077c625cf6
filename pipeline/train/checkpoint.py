"""Checkpoints: DeepSpeed engines + TrainState + per-rank RNG in one folder, two stores.

Layout of one checkpoint (the same for both stores, so either can resume the other's)::

    checkpoint-<step:08d>/
      <engine name>/ckpt/...        DeepSpeed files (model states, per-rank optimizer shards)
      rng/rank-<r>.pt               RNG states of each rank
      data/rank-<r>.json            each rank's data position (its partitions of the stream)
      state.json                    TrainState (rank 0)
      complete.json                 written last, once every rank's files are in place

A checkpoint resumes on the worker count that wrote it or on another: the ranks' data positions
merge into one (:func:`pipeline.data.loader.merge_positions`) and the engines' states are
re-partitioned for the new count (:mod:`pipeline.train.reshard`).

- :class:`RayCheckpoints` (under Ray Train): every rank writes into its own temporary folder
  and calls ``ray.train.report`` with the same ``checkpoint_dir_name`` (a barrier: all ranks,
  same count); Ray merges the rank folders under the stage folder and keeps ``num_to_keep``.
- :class:`FolderCheckpoints` (any other launcher): every rank uploads its files into
  ``<folder>/checkpoint-<step>/`` through :class:`~pipeline.storage.Storage` (local or object
  storage), all ranks meet, then rank 0 writes ``state.json`` LAST: a checkpoint is complete iff
  its ``state.json`` exists. Rank 0 then removes the oldest complete ones beyond ``keep``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from typing import Any, Protocol

import torch

from pipeline.storage import Storage, basename, join
from pipeline.train.context import barrier
from pipeline.train.state import TrainState, capture_rng, restore_rng

log = logging.getLogger("pipeline")

TAG = "ckpt"
STATE = "state.json"
COMPLETE = "complete.json"  # {"step", "world"}: the checkpoint is whole
_NAME = re.compile(r"checkpoint-(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}"


def step_of(uri: str) -> int:
    """The step of a ``checkpoint-<step>`` folder's URI or path."""
    match = _NAME.match(basename(uri.rstrip("/")))
    if match is None:
        raise ValueError(f"not a checkpoint folder: {uri}")
    return int(match.group(1))


def mark_complete(storage: Storage, uri: str, step: int, world: int) -> None:
    """Declare checkpoint ``uri`` whole (call once every rank's files are in place)."""
    storage.write_json(join(uri, COMPLETE), {"step": step, "world": world})


class Checkpoints(Protocol):
    """Where a training loop saves and finds its checkpoints."""

    def save(self, engines: dict[str, Any], state: TrainState, metrics: dict[str, Any]) -> None:
        """Collective: every rank calls it at the same step."""

    def restore(self, engines: dict[str, Any]) -> TrainState | None:
        """Load the newest complete checkpoint into ``engines``; None when there is none."""

    def peek(self) -> TrainState | None:
        """The newest complete checkpoint's ``state.json`` (nothing loaded); None if none."""

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
    os.makedirs(os.path.join(folder, "data"), exist_ok=True)
    with open(os.path.join(folder, "data", f"rank-{rank}.json"), "w") as fh:
        json.dump(state.data.get("position"), fh)
    if with_state:
        with open(os.path.join(folder, STATE), "w") as fh:
            fh.write(state.to_json())


def saved_world(folder: str) -> int:
    """How many workers wrote the local checkpoint ``folder``."""
    return len([f for f in os.listdir(os.path.join(folder, "rng")) if f.endswith(".pt")])


def saved_positions(folder: str, world: int) -> list[Any] | None:
    """Every rank's data position, rank order; None for a checkpoint without them."""
    files = [os.path.join(folder, "data", f"rank-{r}.json") for r in range(world)]
    if not all(os.path.exists(f) for f in files):
        return None
    positions = []
    for f in files:
        with open(f) as fh:
            positions.append(json.load(fh))
    return positions


def load_folder(folder: str, engines: dict[str, Any], rank: int, world: int,
                where: str) -> TrainState:
    """Load a complete local checkpoint ``folder`` (``where`` names it in errors) on rank
    ``rank`` of ``world``, which may differ from the count that wrote it.

    The returned state's data position is every rank's merged. On another count the engines
    are re-partitioned (:func:`pipeline.train.reshard.load_resharded`), ranks that did not exist
    keep their fresh RNG seeds, and the caller must keep the global batch
    (:func:`pipeline.train.loop.resolve`).
    """
    from pipeline.data.loader import merge_positions

    with open(os.path.join(folder, STATE)) as fh:
        state = TrainState.from_json(fh.read())
    written_by = saved_world(folder)
    positions = saved_positions(folder, written_by)
    if written_by != world:
        if positions is None:
            raise RuntimeError(
                f"checkpoint {where} was written by {written_by} workers, before data "
                f"positions were saved per rank; resume it with num_workers={written_by}")
        from pipeline.train.reshard import load_resharded

        if rank == 0:
            log.info("checkpoint %s was written by %d workers; resuming on %d", where,
                     written_by, world)
        load_resharded(folder, engines, TAG, written_by, where)
    else:
        for name, engine in engines.items():
            path, _ = engine.load_checkpoint(os.path.join(folder, name), tag=TAG)
            if path is None:
                raise RuntimeError(f"no DeepSpeed checkpoint for engine {name!r} in {where}")
    if positions is not None:
        state.data = {"position": merge_positions(positions)}
    rng = os.path.join(folder, "rng", f"rank-{rank}.pt")
    if os.path.exists(rng):
        restore_rng(torch.load(rng, weights_only=False))
    return state


# -- the two stores -----------------------------------------------------------------------------


class FolderCheckpoints:
    """Checkpoints under ``folder`` (a local path or an object-storage URI), no Ray needed."""

    def __init__(self, storage: Storage, folder: str, rank: int, world: int, keep: int) -> None:
        self.storage, self.folder = storage, folder
        self.rank, self.world, self.keep = rank, world, keep

    def complete(self) -> list[str]:
        """Complete checkpoints' URIs (with :data:`COMPLETE`; by either store), oldest first."""
        found = sorted(u for u in self.storage.listdir(self.folder)
                       if _NAME.match(basename(u)))
        return [u for u in found if self.storage.exists(join(u, COMPLETE))]

    def latest(self) -> str | None:
        done = self.complete()
        return done[-1] if done else None

    def peek(self, uri: str | None = None) -> TrainState | None:
        """The ``state.json`` of ``uri`` (default: the newest complete checkpoint)."""
        uri = uri or self.latest()
        return TrainState.from_json(self.storage.read_text(join(uri, STATE))) if uri else None

    def save(self, engines: dict[str, Any], state: TrainState, metrics: dict[str, Any]) -> None:
        uri = join(self.folder, checkpoint_name(state.step))
        with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
            write_folder(tmp, engines, state, self.rank, with_state=False)
            self._upload(tmp, uri)
        barrier()  # every rank's files are in place before the checkpoint is declared complete
        if self.rank == 0:
            self.storage.write_text(join(uri, STATE), state.to_json())
            mark_complete(self.storage, uri, state.step, self.world)
            for old in self.complete()[:-self.keep]:
                self.storage.rm(old, recursive=True)
        barrier()

    def _upload(self, local: str, uri: str) -> None:
        for root, _, files in os.walk(local):
            for f in files:
                path = os.path.join(root, f)
                rel = os.path.relpath(path, local).replace(os.sep, "/")
                self.storage.put_file(path, join(uri, rel))

    def restore(self, engines: dict[str, Any], uri: str | None = None) -> TrainState | None:
        """Load ``uri`` (default: the newest complete checkpoint) into ``engines``."""
        uri = uri or self.latest()
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


class RayCheckpoints:
    """Checkpoints through Ray Train (its storage path is the stage's ``train/`` folder).

    ``bucket`` reads the same folder as :class:`FolderCheckpoints`. Ray registers a reported
    checkpoint a moment after every rank has uploaded it, so a run whose driver or workers die
    in between leaves whole checkpoints Ray does not list; rank 0 marks each one complete
    (:data:`COMPLETE`) once all ranks' uploads are done, and a restore takes the newest complete
    one in the bucket when it is newer than Ray's (or Ray has none: checkpoints written by
    ``fit_local`` / ``torchrun``).
    """

    def __init__(self, bucket: FolderCheckpoints | None = None) -> None:
        self._latest: str | None = None
        self.bucket = bucket
        # Complete checkpoints Ray never registered (newer than its newest when this run
        # resumed): Ray will not delete them, so rank 0 does once they fall out of the newest
        # ``keep``.
        self._unregistered: list[str] = []
        self._source: tuple[str, Any] | tuple[()] | None = None  # _resume_from, once decided

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
        if self.bucket is not None:
            barrier()  # every rank's report (its upload) has returned
            if rank == 0:
                mark_complete(self.bucket.storage, join(self.bucket.folder, self._latest),
                              state.step, ctx.get_world_size())
                self._prune_unregistered()

    def _prune_unregistered(self) -> None:
        kept = set(self.bucket.complete()[-self.bucket.keep:])
        for uri in [u for u in self._unregistered if u not in kept]:
            self.bucket.storage.rm(uri, recursive=True)
            self._unregistered.remove(uri)

    def _resume_from(self) -> tuple[str, Any] | None:
        """Where this run resumes from, decided once: ``("bucket", uri)`` when the bucket holds
        a complete checkpoint newer than Ray's newest registered one (or Ray has none),
        ``("ray", checkpoint)``, or None for a fresh start."""
        if self._source is not None:
            return self._source or None
        import ray.train

        ckpt = ray.train.get_checkpoint()
        registered = step_of(ckpt.path) if ckpt is not None else -1
        done = self.bucket.complete() if self.bucket is not None else []
        if done and step_of(done[-1]) > registered:
            log.info("resuming from %s (Ray Train's newest registered: %s)", done[-1],
                     ckpt.path if ckpt else None)
            if ckpt is not None:
                self._unregistered = [u for u in done if step_of(u) > registered]
            self._source = ("bucket", done[-1])
        else:
            self._source = ("ray", ckpt) if ckpt is not None else ()
        return self._source or None

    def restore(self, engines: dict[str, Any]) -> TrainState | None:
        import ray.train

        source = self._resume_from()
        if source is None:
            return None
        kind, where = source
        if kind == "bucket":
            return self.bucket.restore(engines, where)
        ctx = ray.train.get_context()
        with where.as_directory() as folder:
            return load_folder(folder, engines, ctx.get_world_rank(), ctx.get_world_size(),
                               where.path)

    def peek(self) -> TrainState | None:
        source = self._resume_from()
        if source is None:
            return None
        kind, where = source
        if kind == "bucket":
            return self.bucket.peek(where)
        with where.filesystem.open_input_stream(f"{where.path}/{STATE}") as fh:
            return TrainState.from_json(fh.read().decode())

    def latest(self) -> str | None:
        return self._latest
