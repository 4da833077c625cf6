"""Training streams: rank split, endless epochs, exact resume from a position."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.loader import (
    StreamSpec,
    decode_image,
    eval_batches,
    image_batches,
    stream,
    to_tensor,
)
from pipeline.data.wds import shard_writer
from pipeline.storage import Storage, join


def _png(value: int, size: int = 12) -> bytes:
    arr = np.full((size, size, 3), value, dtype=np.uint8)
    arr[0, 0] = (value * 7) % 256  # asymmetric, so flips are visible
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _write_shards(root: str, storage: Storage, n_shards: int, per_shard: int) -> list[str]:
    uris = []
    for s in range(n_shards):
        uri = join(root, f"shard-{s:06d}.tar")
        with storage.open_atomic(uri) as fh, shard_writer(fh) as (tar, _):
            for i in range(per_shard):
                v = s * per_shard + i
                tar.write({"__key__": f"k{v:04d}", "png": _png(v), "cls": str(v % 3).encode()})
        uris.append(uri)
    return uris


@pytest.fixture
def shards(tmp_path):
    storage = Storage()
    return storage, _write_shards(str(tmp_path), storage, 4, 5)


def _keys(storage, spec, n, position=None):
    out = []
    for sample, pos in stream(storage, spec, position):
        out.append((sample["__key__"], pos))
        if len(out) == n:
            return out
    raise AssertionError("stream ended")


@pytest.mark.parametrize("n_shards", [4, 1])
def test_ranks_split_one_epoch_disjointly(tmp_path, n_shards):
    storage = Storage()
    uris = _write_shards(str(tmp_path), storage, n_shards, 20 // n_shards)
    per_rank = []
    for rank in range(2):
        spec = StreamSpec(tuple(uris), rank=rank, world=2, seed=3, shuffle_buffer=4)
        per_rank.append({k for k, _ in _keys(storage, spec, 10)})
    assert not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == {f"k{v:04d}" for v in range(20)}


def test_endless_and_reshuffled(shards):
    storage, uris = shards
    spec = StreamSpec(tuple(uris), seed=1, shuffle_buffer=8)
    got = _keys(storage, spec, 45)
    first, second = [k for k, _ in got[:20]], [k for k, _ in got[20:40]]
    assert sorted(first) == sorted(second) == [f"k{v:04d}" for v in range(20)]
    assert first != second, "each epoch has its own order"
    assert got[19][1] == {"epoch": 0, "index": 20} and got[20][1] == {"epoch": 1, "index": 1}


def test_resume_from_position_is_exact(shards):
    storage, uris = shards
    spec = StreamSpec(tuple(uris), rank=1, world=2, seed=5, shuffle_buffer=3)
    full = list(zip(range(7), image_batches(storage, spec, 4, 8)))
    _, (_, _, pos) = full[2]
    resumed = image_batches(storage, spec, 4, 8, position=pos)
    for (_, (x, y, p)), (x2, y2, p2) in zip(full[3:], resumed):
        assert torch.equal(x, x2) and torch.equal(y, y2) and p == p2


def test_batches_shape_range_and_labels(shards):
    storage, uris = shards
    x, y, _ = next(image_batches(storage, StreamSpec(tuple(uris)), 6, 8))
    assert x.shape == (6, 3, 8, 8) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert set(y.tolist()) <= {0, 1, 2}
    evals = list(eval_batches(storage, uris, 8, 12))
    assert [len(b[0]) for b in evals] == [8, 8, 4]
    assert evals[0][1].tolist()[:4] == [0, 1, 2, 0], "ordered, labels from .cls"
    assert sum(len(b[0]) for b in eval_batches(storage, uris, 8, 12, limit=5)) == 5


def test_to_tensor_of_read_only_views(recwarn):
    """PIL-decoded arrays are read-only: converting them (whole, cropped, flipped) gives the
    exact [-1, 1] values without torch's "not writable" warning."""
    img = decode_image(_png(200))
    assert not img.flags.writeable
    for view in (img, img[2:10, 1:9], img[:, ::-1]):
        x = to_tensor(view)
        expected = torch.tensor(view.transpose(2, 0, 1).astype(np.float32)) / 127.5 - 1.0
        assert torch.equal(x, expected)
    assert not [w for w in recwarn if "not writable" in str(w.message)]
