"""Endless, resumable training streams over WebDataset shards, independent of the worker count.

The data is split into ``streams`` fixed partitions (``P``), not into ranks, so a run can resume
on another number of workers and read exactly what an unchanged run would:

- **Partitions.** Every partition epoch reorders the shards with a seeded permutation;
  partition ``p`` reads shards ``p, p+P, p+2P, …`` of that order. With fewer shards than
  partitions, the partitions sharing a shard split its samples by index. Each partition has its
  own seeded shuffle buffer (``ceil(shuffle_buffer / P)`` samples) and its own epoch counter.
- **The global sequence.** Global sample ``n`` is partition ``n mod P``'s next sample.
- **Ranks.** Rank ``r`` of ``W`` takes the global samples ``n ≡ r (mod W)``, so it reads only
  the partitions ``p ≡ r (mod W)``, in turn (hence ``P`` must be a multiple of ``W``). The
  samples of one global step are the same set at any ``W`` that divides ``P``.

Samples stay undecoded until they leave the buffer, so resuming re-reads and skips cheaply. A
rank's position (:class:`Stream.position`) holds ``streams``, ``next`` (global samples consumed
by all ranks, in lockstep) and its partitions' ``{"epoch", "index"}``;
:func:`merge_positions` joins every rank's into one that any world size resumes from.
Per-sample randomness (crops, flips) is seeded by the sample's partition place, never the rank.
"""

from __future__ import annotations

import io
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.data import NO_LABEL
from pipeline.data.wds import iter_samples
from pipeline.seeds import derive
from pipeline.storage import Storage

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
DEFAULT_STREAMS = 12  # divisible by 1, 2, 3, 4, 6 and 12 workers

Position = dict[str, Any]  # see the module docstring
SampleKey = tuple[int, int, int]  # (partition, its epoch, index in that epoch): seeds per-sample


def stream_count(requested: int, *worker_counts: int) -> int:
    """The number of partitions for a fresh run that may take any of ``worker_counts``:
    ``requested``, or with 0 the least common multiple of 12 and those counts (so the run can
    later also move to any count that divides 12)."""
    if requested < 0:
        raise ValueError(f"data_streams must be >= 0 (0: automatic), got {requested}")
    return requested or math.lcm(DEFAULT_STREAMS, *worker_counts)


@dataclass(frozen=True)
class StreamSpec:
    """One rank's view of the training data: ``shards`` split into ``streams`` partitions, of
    which rank ``rank`` of ``world`` reads every world-th."""

    shards: tuple[str, ...]
    rank: int = 0
    world: int = 1
    seed: int = 0
    shuffle_buffer: int = 256
    streams: int = 1

    def __post_init__(self) -> None:
        if self.streams % self.world:
            raise ValueError(
                f"{self.world} workers cannot split {self.streams} data streams evenly: this "
                f"run's data is cut into {self.streams} partitions (train.data_streams, fixed "
                f"at its first step); use a worker count that divides {self.streams}")

    @property
    def mine(self) -> range:
        """The partitions this rank reads, in the order it takes samples from them."""
        return range(self.rank, self.streams, self.world)


def partition_shards(spec: StreamSpec, part: int, epoch: int) -> tuple[list[str], int, int]:
    """``(shards, share, slot)`` of partition ``part`` in its ``epoch``: it reads ``shards`` and
    keeps the samples whose index ``i`` has ``i % share == slot`` (share 1: all of them)."""
    order = list(spec.shards)
    random.Random(derive(spec.seed, "shard-order", epoch)).shuffle(order)
    if len(order) >= spec.streams:
        return order[part::spec.streams], 1, 0
    sharing = list(range(part % len(order), spec.streams, len(order)))
    return [order[part % len(order)]], len(sharing), sharing.index(part)


def raw_partition_epoch(storage: Storage, spec: StreamSpec, part: int,
                        epoch: int) -> Iterator[dict[str, Any]]:
    """One epoch of partition ``part``'s undecoded samples, shuffled."""
    shards, share, slot = partition_shards(spec, part, epoch)
    rng = random.Random(derive(spec.seed, "shuffle-buffer", part, epoch))
    size = max(1, -(-spec.shuffle_buffer // spec.streams))
    buffer: list[dict[str, Any]] = []
    index = 0
    for uri in shards:
        for sample in iter_samples(storage, uri):
            index += 1
            if (index - 1) % share != slot:
                continue
            buffer.append(sample)
            if len(buffer) >= size:
                yield buffer.pop(rng.randrange(len(buffer)))
    while buffer:
        yield buffer.pop(rng.randrange(len(buffer)))


def partition_stream(storage: Storage, spec: StreamSpec, part: int, epoch: int = 0,
                     skip: int = 0) -> Iterator[tuple[dict[str, Any], int, int]]:
    """Endless ``(raw sample, epoch, index in that epoch)`` of partition ``part``, starting
    after sample ``skip`` of ``epoch``."""
    while True:
        index = 0
        for sample in raw_partition_epoch(storage, spec, part, epoch):
            index += 1
            if index > skip:
                yield sample, epoch, index
        if index == 0:
            raise ValueError(
                f"data partition {part} of {spec.streams} got no samples from "
                f"{len(spec.shards)} shard(s): too little data for that many partitions "
                f"(lower train.data_streams at a fresh start)")
        epoch, skip = epoch + 1, 0


class Stream:
    """A rank's endless ``(raw sample, sample key)`` pairs from ``position`` (None: the start;
    else a merged position, :func:`merge_positions`). :meth:`position` says where it stands."""

    def __init__(self, storage: Storage, spec: StreamSpec,
                 position: Position | None = None) -> None:
        if not spec.shards:
            raise ValueError("no shards to read")
        position = position or {}
        saved = position.get("streams", spec.streams)
        if saved != spec.streams:
            raise ValueError(f"position is for {saved} data streams, the spec has {spec.streams}")
        self.spec = spec
        self.next = int(position.get("next", 0))  # global samples consumed, by all ranks
        if self.next % spec.world:
            raise ValueError(f"position at global sample {self.next} cannot be split evenly "
                             f"over {spec.world} workers")
        parts = position.get("partitions", {})
        self.where = {p: dict(parts.get(str(p), {"epoch": 0, "index": 0})) for p in spec.mine}
        self._iters = {p: partition_stream(storage, spec, p, w["epoch"], w["index"])
                       for p, w in self.where.items()}

    def __iter__(self) -> Iterator[tuple[dict[str, Any], SampleKey]]:
        spec = self.spec
        while True:
            # This rank's next global sample is next + rank; it comes from partition n mod P.
            part = (self.next + spec.rank) % spec.streams
            sample, epoch, index = next(self._iters[part])
            self.where[part] = {"epoch": epoch, "index": index}
            self.next += spec.world  # every rank takes one sample per round, in lockstep
            yield sample, (part, epoch, index)

    def position(self) -> Position:
        """Where this rank stands (a fresh dict): resuming from it, merged with the other ranks'
        (:func:`merge_positions`), continues exactly after the last sample yielded."""
        return {"streams": self.spec.streams, "next": self.next,
                "partitions": {str(p): dict(w) for p, w in self.where.items()}}


def merge_positions(positions: list[Any]) -> Any:
    """One position from every rank's (all taken at the same step): the union of their
    partitions. Positions without partitions (a task's own format) are opaque: rank 0's."""
    if not positions or not all(isinstance(p, dict) and "partitions" in p for p in positions):
        return positions[0] if positions else None
    streams = {p["streams"] for p in positions}
    nexts = {p["next"] for p in positions}
    if len(streams) != 1 or len(nexts) != 1:
        raise ValueError(f"ranks' data positions disagree (streams {sorted(streams)}, "
                         f"next {sorted(nexts)}): they were not taken at the same step")
    parts: dict[str, Any] = {}
    for p in positions:
        parts.update(p["partitions"])
    (count,) = streams
    missing = sorted(set(range(count)) - {int(k) for k in parts})
    if missing:
        raise ValueError(f"data positions of partitions {missing} are missing: a rank's "
                         f"position file is not in the checkpoint")
    return {"streams": count, "next": nexts.pop(), "partitions": parts}


def stream_spec(shards: list[str] | tuple[str, ...], rank: int, world: int, seed: int,
                shuffle_buffer: int, requested_streams: int,
                position: Position | None) -> StreamSpec:
    """The spec of a training stream: the partition count of ``position`` when resuming (it is
    fixed for the run), else :func:`stream_count` of ``requested_streams``."""
    if position and "partitions" not in position:
        raise ValueError(f"data position {position} is in the format of an older version "
                         f"(one stream per rank); this version cannot continue it exactly")
    streams = (position or {}).get("streams") or stream_count(requested_streams, world)
    return StreamSpec(tuple(shards), rank, world, seed, shuffle_buffer, int(streams))


def image_bytes(sample: dict[str, Any]) -> bytes:
    for ext in IMAGE_EXTS:
        if ext in sample:
            return sample[ext]
    raise KeyError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no image "
                   f"({', '.join(k for k in sample if not k.startswith('__'))})")


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image → HWC uint8 RGB."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def label_of(sample: dict[str, Any]) -> int:
    """A sample's class id from its ``.cls`` member; ``NO_LABEL`` without one."""
    raw = sample.get("cls")
    return int(raw.decode() if isinstance(raw, bytes) else raw) if raw is not None else NO_LABEL


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """HWC uint8 → CHW float32 in [-1, 1] (the VQGAN's input range); ``img`` may be any view
    (read-only, cropped, flipped) and is not modified."""
    # The float conversion copies anyway: doing it in NumPy gives a fresh, writable, C-ordered
    # array for torch.from_numpy. Arrays decoded by PIL are read-only views of its buffer, which
    # from_numpy warns about ("The given NumPy array is not writable"); copying the uint8 image
    # first only to silence that would cost a second copy.
    x = torch.from_numpy(img.astype(np.float32, order="C"))
    return x.permute(2, 0, 1).div_(127.5).sub_(1.0)


def augment(img: np.ndarray, size: int, rng: np.random.Generator, flip: bool = True,
            random_crop: bool = True) -> np.ndarray:
    """Crop to ``size`` (random or center) and maybe flip horizontally."""
    h, w = img.shape[:2]
    if h < size or w < size:
        raise ValueError(f"image {h}x{w} is smaller than the crop size {size}")
    if random_crop:
        top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    else:
        top, left = (h - size) // 2, (w - size) // 2
    img = img[top:top + size, left:left + size]
    if flip and rng.random() < 0.5:
        img = img[:, ::-1]
    return img


class ImageInput:
    """What a VQGAN reads from a shard sample: its image (HWC uint8 → CHW in [-1, 1]). The
    condition VQGAN reads :class:`pipeline.data.conditions.ConditionInput` instead."""

    channels = 3

    @staticmethod
    def array(sample: dict[str, Any]) -> np.ndarray:
        return decode_image(image_bytes(sample))

    @staticmethod
    def tensor(hwc: np.ndarray) -> torch.Tensor:
        return to_tensor(hwc)


IMAGES = ImageInput()


def crop_size(reader: Any, size: int) -> int:
    """The side at which ``reader``'s arrays are cropped when the images are cropped at
    ``size``: smaller for low-resolution maps (a reader's ``scale``, e.g. ``downsample:4``)."""
    scale = getattr(reader, "scale", 1)
    if size % scale:
        raise ValueError(f"a {size} px crop is not a multiple of the condition's factor {scale}")
    return size // scale


def image_batches(storage: Storage, spec: StreamSpec, batch_size: int, size: int,
                  position: Position | None = None, random_flip: bool = True,
                  random_crop: bool = True,
                  transform: Callable[[np.ndarray], np.ndarray] | None = None,
                  reader: Any = IMAGES,
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor, Position]]:
    """Endless ``(images [B,3,size,size] in [-1,1], labels [B], position)`` batches:
    ``size``-px crops (random, else centered) of the shards' images, mirrored at random with
    ``random_flip``. ``reader`` (``array``: sample → HWC, ``tensor``: HWC → CHW) picks what is
    read: the image, or the sample's condition map (then ``[B, reader.channels, size, size]``).

    Augmentation randomness is seeded by the sample's place in its partition, so a resumed
    stream, at any worker count, yields the same crops and flips as an uninterrupted one (and
    a sample's condition gets its image's crop and flip).
    """
    images, labels = [], []
    samples = Stream(storage, spec, position)
    for sample, key in samples:
        rng = np.random.default_rng(derive(spec.seed, "augment", *key))
        img = reader.array(sample)
        img = augment(img, crop_size(reader, size), rng, flip=random_flip,
                      random_crop=random_crop)
        if transform is not None:
            img = transform(img)
        images.append(reader.tensor(img))
        labels.append(label_of(sample))
        if len(images) == batch_size:
            yield torch.stack(images), torch.tensor(labels, dtype=torch.long), samples.position()
            images, labels = [], []


def eval_batches(storage: Storage, shards: list[str], batch_size: int, size: int,
                 limit: int | None = None, reader: Any = IMAGES,
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One ordered pass (center crops, no flips) over ``shards``, at most ``limit`` images
    (or what ``reader`` reads, as in :func:`image_batches`)."""
    images, labels, seen = [], [], 0
    for uri in shards:
        for sample in iter_samples(storage, uri):
            if limit is not None and seen >= limit:
                break
            img = augment(reader.array(sample), crop_size(reader, size),
                          np.random.default_rng(0), flip=False, random_crop=False)
            images.append(reader.tensor(img))
            labels.append(label_of(sample))
            seen += 1
            if len(images) == batch_size:
                yield torch.stack(images), torch.tensor(labels, dtype=torch.long)
                images, labels = [], []
    if images:
        yield torch.stack(images), torch.tensor(labels, dtype=torch.long)


def code_batches(storage: Storage, spec: StreamSpec, batch_size: int, length: int,
                 position: Position | None = None, flip: bool = True, with_cond: bool = True,
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, Position]]:
    """Endless ``(codes [B, length] long, labels [B] (NO_LABEL: unlabelled), cond, position)``
    batches from tokenize's code shards (``{key}.codes.npy``, optional ``{key}.flip.npy``,
    ``{key}.cls``). ``cond``: the condition maps' codes [B, hc*wc] long (``{key}.cond.npy``) in
    runs with conditions and ``with_cond``, else None (not parsed).

    With ``flip`` and a stored flipped grid, each sample uses one of the two grids at random
    (seeded by its place in the stream, so a resumed stream is identical); its condition codes
    are then those of the mirrored map.
    """
    from pipeline.data.codes import CODES, COND, COND_FLIP, FLIP, parse_npy

    codes, labels, conds = [], [], []
    samples = Stream(storage, spec, position)
    for sample, key in samples:
        flipped = False
        if flip and FLIP in sample:
            rng = np.random.default_rng(derive(spec.seed, "flipped-codes", *key))
            flipped = rng.random() < 0.5
        flat = torch.from_numpy(parse_npy(sample[FLIP if flipped else CODES])
                                .astype(np.int64).reshape(-1))
        if flat.numel() != length:
            raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has "
                             f"{flat.numel()} codes, expected {length}")
        codes.append(flat)
        labels.append(label_of(sample))
        if with_cond and COND in sample:
            member = COND_FLIP if flipped else COND
            if member not in sample:
                raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')} "
                                 f"has a flipped image grid but no .{COND_FLIP}")
            conds.append(torch.from_numpy(parse_npy(sample[member]).astype(np.int64)
                                          .reshape(-1)))
        if len(codes) == batch_size:
            if conds and len(conds) != len(codes):
                raise ValueError(f"code shards in {sample.get('__url__')}: some samples lack "
                                 f"condition codes (.{COND})")
            yield (torch.stack(codes), torch.tensor(labels, dtype=torch.long),
                   torch.stack(conds) if conds else None, samples.position())
            codes, labels, conds = [], [], []
