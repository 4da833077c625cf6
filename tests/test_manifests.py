"""The typed stage outputs (pipeline/manifests.py): JSON round trips, strict reading with a
message that names the field and the fix, defaults for fields added later."""

from __future__ import annotations

import pytest

from pipeline.manifests import (
    Export,
    GPTOutputs,
    ManifestError,
    ShardFile,
    ShardOutputs,
    SplitCounts,
)


def _shard_outputs() -> dict:
    files = [{"split": "train", "name": "train/shard-000000.tar", "uri": "s3://b/r/a.tar",
              "samples": 5, "bytes": 100, "sha256": "ab"},
             {"split": "train", "name": "train/shard-000001.tar", "uri": "s3://b/r/b.tar",
              "samples": 0, "bytes": 10, "sha256": "cd"},
             {"split": "val", "name": "val/shard-000000.tar", "uri": "s3://b/r/c.tar",
              "samples": 2, "bytes": 40, "sha256": "ef"}]
    return {"source": "builtin:digits", "resolution": 16, "ext": "png", "seed": 0,
            "classes": ["0", "1"], "num_classes": 2, "shards": files,
            "splits": {"train": {"shards": 2, "samples": 5, "bytes": 110},
                       "val": {"shards": 1, "samples": 2, "bytes": 40}},
            "totals": {"inputs": 7, "samples": 7, "skipped": 0, "duplicates": 0,
                       "ignored_files": 0, "bytes": 150},
            "skipped": {}, "skipped_uri": "s3://b/r/skipped.jsonl", "duplicates": [],
            "shards_reused": 0, "images_per_s": None, "seconds": 1.5}


def test_round_trip_is_exact_and_typed():
    raw = _shard_outputs()
    out = ShardOutputs.from_dict(raw)
    assert isinstance(out.shards[0], ShardFile) and isinstance(out.splits["val"], SplitCounts)
    assert out.to_dict() == raw  # optional fields left unset are not written
    assert out.uris("train") == ["s3://b/r/a.tar"]  # the empty shard is not read
    assert out.uris("val") == ["s3://b/r/c.tar"]


def test_missing_field_names_it_and_the_fix():
    raw = _shard_outputs()
    del raw["totals"]["bytes"]
    with pytest.raises(ManifestError, match=r"shard outputs\.totals\.bytes is missing.*"
                                            r"--force shard"):
        ShardOutputs.from_dict(raw)
    raw = _shard_outputs()
    raw["shards"][1] = "not a shard"
    with pytest.raises(ManifestError, match=r"shards\[1\]: expected an object"):
        ShardOutputs.from_dict(raw)


def test_unknown_keys_are_ignored_and_later_fields_default():
    raw = {"steps": 3, "samples_seen": 48, "export": {"weights": "w", "config": "c"},
           "val_loss": 4.0, "bits_per_token": 5.8, "unigram_entropy": 4.1, "grid": [8, 8],
           "n_classes": 0, "classes": [], "written_by_a_newer_version": 1}
    out = GPTOutputs.from_dict(raw)
    assert out.grid == (8, 8) and out.vqgan is None and out.images == []
    assert out.export == Export("w", "c")
    raw["vqgan"] = {"weights": "vw", "config": "vc"}
    assert GPTOutputs.from_dict(raw).vqgan == Export("vw", "vc")
