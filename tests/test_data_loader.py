"""Training streams: rank split, endless epochs, exact resume from a position."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.loader import (
    Stream,
    StreamSpec,
    decode_image,
    eval_batches,
    image_batches,
    merge_positions,
    stream_count,
    stream_spec,
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
    """The first ``n`` sample keys of ``spec``'s stream and its position after them."""
    samples = Stream(storage, spec, position)
    out = []
    for sample, _ in samples:
        out.append(sample["__key__"])
        if len(out) == n:
            return out, samples.position()
    raise AssertionError("stream ended")


def _steps(storage, uris, world, streams, steps, per_rank, position=None, seed=3, buffer=4):
    """Global steps of a ``world``-rank run: per step, the set of keys all ranks took, and the
    merged position after the last."""
    ranks = [Stream(storage, StreamSpec(tuple(uris), r, world, seed, buffer, streams), position)
             for r in range(world)]
    iters = [iter(s) for s in ranks]
    out = []
    for _ in range(steps):
        keys = set()
        for it in iters:
            for _ in range(per_rank):
                keys.add(next(it)[0]["__key__"])
        out.append(keys)
    return out, merge_positions([s.position() for s in ranks])


@pytest.mark.parametrize("n_shards", [4, 1])
def test_ranks_split_one_epoch_disjointly(tmp_path, n_shards):
    storage = Storage()
    uris = _write_shards(str(tmp_path), storage, n_shards, 20 // n_shards)
    per_rank = []
    for rank in range(2):
        spec = StreamSpec(tuple(uris), rank=rank, world=2, seed=3, shuffle_buffer=4, streams=2)
        per_rank.append(set(_keys(storage, spec, 10)[0]))
    assert not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == {f"k{v:04d}" for v in range(20)}


@pytest.mark.parametrize("n_shards", [6, 2])
def test_each_step_takes_the_same_samples_on_any_worker_count(tmp_path, n_shards):
    """The data of global step s does not depend on how many ranks read it, so a run can
    change its worker count at a checkpoint and continue exactly (6 partitions: 1, 2, 3, 6)."""
    storage = Storage()
    uris = _write_shards(str(tmp_path), storage, n_shards, 24 // n_shards)
    runs = {w: _steps(storage, uris, w, 6, steps=10, per_rank=6 // w)[0] for w in (1, 2, 3, 6)}
    assert runs[1] == runs[2] == runs[3] == runs[6]
    first_epoch = set().union(*runs[1][:4])
    assert first_epoch == {f"k{v:04d}" for v in range(24)}, "4 steps of 6: each sample once"


def test_resume_on_another_worker_count_continues_exactly(tmp_path):
    storage = Storage()
    uris = _write_shards(str(tmp_path), storage, 3, 9)
    whole, _ = _steps(storage, uris, 2, 6, steps=12, per_rank=3)  # 6 samples per step
    head, pos = _steps(storage, uris, 2, 6, steps=5, per_rank=3)
    assert pos["next"] == 30 and sorted(pos["partitions"]) == [str(p) for p in range(6)]
    tail1, pos1 = _steps(storage, uris, 1, 6, steps=4, per_rank=6, position=pos)
    tail3, _ = _steps(storage, uris, 3, 6, steps=3, per_rank=2, position=pos1)  # then 1 → 3
    assert head + tail1 + tail3 == whole


def test_endless_and_reshuffled(shards):
    storage, uris = shards
    spec = StreamSpec(tuple(uris), seed=1, shuffle_buffer=8, streams=1)
    got, pos = _keys(storage, spec, 45)
    first, second = got[:20], got[20:40]
    assert sorted(first) == sorted(second) == [f"k{v:04d}" for v in range(20)]
    assert first != second, "each epoch has its own order"
    assert pos == {"streams": 1, "next": 45, "partitions": {"0": {"epoch": 2, "index": 5}}}


def test_resume_from_position_is_exact(shards):
    storage, uris = shards
    spec = StreamSpec(tuple(uris), rank=1, world=2, seed=5, shuffle_buffer=3, streams=4)
    full = list(zip(range(7), image_batches(storage, spec, 4, 8)))
    _, (_, _, pos) = full[2]
    other = StreamSpec(tuple(uris), rank=0, world=2, seed=5, shuffle_buffer=3, streams=4)
    _, (_, _, pos0) = list(zip(range(3), image_batches(storage, other, 4, 8)))[2]
    merged = merge_positions([pos0, pos])
    resumed = image_batches(storage, spec, 4, 8, position=merged)
    for (_, (x, y, p)), (x2, y2, p2) in zip(full[3:], resumed):
        assert torch.equal(x, x2) and torch.equal(y, y2) and p == p2


def test_crops_and_flips_follow_the_sample_not_the_rank(shards):
    storage, uris = shards
    one = next(image_batches(storage, StreamSpec(tuple(uris), 0, 1, 2, 4, 2), 4, 8))[0]
    r0 = next(image_batches(storage, StreamSpec(tuple(uris), 0, 2, 2, 4, 2), 2, 8))[0]
    r1 = next(image_batches(storage, StreamSpec(tuple(uris), 1, 2, 2, 4, 2), 2, 8))[0]
    # one rank takes global samples 0, 1, 2, 3; of two ranks, rank 0 takes 0, 2 and rank 1 1, 3
    assert torch.equal(one, torch.stack([r0[0], r1[0], r0[1], r1[1]]))


def test_clear_errors(shards, tmp_path):
    storage, uris = shards
    with pytest.raises(ValueError, match="cannot split 6 data streams evenly"):
        StreamSpec(tuple(uris), 0, 4, streams=6)
    with pytest.raises(ValueError, match="partition 3 of 4 got no samples"):
        tiny = _write_shards(str(tmp_path / "tiny"), storage, 1, 3)
        _keys(storage, StreamSpec(tuple(tiny), 1, 2, streams=4), 5)
    with pytest.raises(ValueError, match="older version"):
        stream_spec(uris, 0, 1, 0, 4, 0, {"epoch": 0, "index": 3})
    with pytest.raises(ValueError, match="partitions \\[1\\] are missing"):
        merge_positions([{"streams": 2, "next": 4, "partitions": {"0": {"epoch": 0, "index": 2}}}])
    assert stream_count(0, 1) == 12 and stream_count(0, 8) == 24 and stream_count(5, 1) == 5


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
