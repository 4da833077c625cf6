"""Endless, resumable training streams over WebDataset shards, split by rank.

Every epoch reorders the shards with a seeded permutation. With at least as many shards as ranks,
rank r reads every world-th shard of that order; with fewer, every rank reads all of them and
keeps every world-th sample, so no rank ever starves. A seeded shuffle buffer then mixes samples.
Samples stay undecoded until they leave the buffer, so resuming at ``position`` re-reads and
skips cheaply: the stream is a pure function of (shards, seed, rank, world), and a position
``{"epoch": e, "index": i}`` names exactly where the next sample comes from.
"""

from __future__ import annotations

import io
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


@dataclass(frozen=True)
class StreamSpec:
    shards: tuple[str, ...]
    rank: int = 0
    world: int = 1
    seed: int = 0
    shuffle_buffer: int = 256


def epoch_shards(spec: StreamSpec, epoch: int) -> tuple[list[str], bool]:
    """(this rank's shards for ``epoch``, whether samples must still be split by index)."""
    order = list(spec.shards)
    random.Random(derive(spec.seed, "shard-order", epoch)).shuffle(order)
    if len(order) >= spec.world:
        return order[spec.rank::spec.world], False
    return order, True


def raw_epoch(storage: Storage, spec: StreamSpec, epoch: int) -> Iterator[dict[str, Any]]:
    """One epoch of this rank's undecoded samples, shuffled."""
    shards, split = epoch_shards(spec, epoch)
    rng = random.Random(derive(spec.seed, "shuffle-buffer", spec.rank, epoch))
    buffer: list[dict[str, Any]] = []
    index = 0
    for uri in shards:
        for sample in iter_samples(storage, uri):
            index += 1
            if split and (index - 1) % spec.world != spec.rank:
                continue
            buffer.append(sample)
            if len(buffer) >= spec.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
    while buffer:
        yield buffer.pop(rng.randrange(len(buffer)))


Position = dict[str, int]


def stream(storage: Storage, spec: StreamSpec,
           position: Position | None = None) -> Iterator[tuple[dict[str, Any], Position]]:
    """Endless ``(raw sample, position after it)`` pairs, starting at ``position``."""
    if not spec.shards:
        raise ValueError("no shards to read")
    epoch = (position or {}).get("epoch", 0)
    skip = (position or {}).get("index", 0)
    while True:
        index = 0
        produced = False
        for sample in raw_epoch(storage, spec, epoch):
            produced = True
            index += 1
            if index <= skip:
                continue
            yield sample, {"epoch": epoch, "index": index}
        if not produced:
            raise ValueError(f"rank {spec.rank} got no samples from {len(spec.shards)} shards")
        epoch, skip = epoch + 1, 0


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


def image_batches(storage: Storage, spec: StreamSpec, batch_size: int, size: int,
                  position: dict[str, int] | None = None, random_flip: bool = True,
                  random_crop: bool = True,
                  transform: Callable[[np.ndarray], np.ndarray] | None = None,
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor, dict[str, int]]]:
    """Endless ``(images [B,3,size,size] in [-1,1], labels [B], position)`` batches:
    ``size``-px crops (random, else centered) of the shards' images, mirrored at random with
    ``random_flip``.

    Augmentation randomness is seeded by the sample's place in the stream, so a resumed stream
    yields the same crops and flips as an uninterrupted one.
    """
    images, labels = [], []
    for sample, pos in stream(storage, spec, position):
        rng = np.random.default_rng(derive(spec.seed, "augment", spec.rank, pos["epoch"],
                                           pos["index"]))
        img = decode_image(image_bytes(sample))
        img = augment(img, size, rng, flip=random_flip, random_crop=random_crop)
        if transform is not None:
            img = transform(img)
        images.append(to_tensor(img))
        labels.append(label_of(sample))
        if len(images) == batch_size:
            yield torch.stack(images), torch.tensor(labels, dtype=torch.long), pos
            images, labels = [], []


def eval_batches(storage: Storage, shards: list[str], batch_size: int, size: int,
                 limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One ordered pass (center crops, no flips) over ``shards``, at most ``limit`` images."""
    images, labels, seen = [], [], 0
    for uri in shards:
        for sample in iter_samples(storage, uri):
            if limit is not None and seen >= limit:
                break
            img = augment(decode_image(image_bytes(sample)), size, np.random.default_rng(0),
                          flip=False, random_crop=False)
            images.append(to_tensor(img))
            labels.append(label_of(sample))
            seen += 1
            if len(images) == batch_size:
                yield torch.stack(images), torch.tensor(labels, dtype=torch.long)
                images, labels = [], []
    if images:
        yield torch.stack(images), torch.tensor(labels, dtype=torch.long)


def code_batches(storage: Storage, spec: StreamSpec, batch_size: int, length: int,
                 position: Position | None = None, flip: bool = True,
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor, Position]]:
    """Endless ``(codes [B, length] long, labels [B] (NO_LABEL: unlabelled), position)`` batches
    from tokenize's code shards (``{key}.codes.npy``, optional ``{key}.flip.npy``, ``{key}.cls``).

    With ``flip`` and a stored flipped grid, each sample uses one of the two grids at random
    (seeded by its place in the stream, so a resumed stream is identical).
    """
    from pipeline.data.codes import CODES, FLIP, parse_npy

    codes, labels = [], []
    for sample, pos in stream(storage, spec, position):
        grid = parse_npy(sample[CODES])
        if flip and FLIP in sample:
            rng = np.random.default_rng(derive(spec.seed, "flipped-codes", spec.rank,
                                               pos["epoch"], pos["index"]))
            if rng.random() < 0.5:
                grid = parse_npy(sample[FLIP])
        flat = torch.from_numpy(grid.astype(np.int64).reshape(-1))
        if flat.numel() != length:
            raise ValueError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has "
                             f"{flat.numel()} codes, expected {length}")
        codes.append(flat)
        labels.append(label_of(sample))
        if len(codes) == batch_size:
            yield torch.stack(codes), torch.tensor(labels, dtype=torch.long), pos
            codes, labels = [], []
