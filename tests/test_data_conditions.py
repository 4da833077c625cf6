"""Paired conditions without Ray: kinds, pairing, checks with their skip reasons, the stored PNGs
and their reader, the config section and its fingerprint rule."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ConfigError, fingerprint_view, load_config
from pipeline.dag import Pipeline, fingerprint
from pipeline.data.conditions import (
    CONDITION_KIND_MISMATCH,
    CONDITION_MISSING,
    CONDITION_SIZE_MISMATCH,
    CONDITION_UNREADABLE,
    ConditionRejected,
    ConditionSpec,
    canny_edges,
    condition_array,
    condition_index,
    condition_tensor,
    derived_condition,
    given_condition,
    pair_folder,
    parse_kind,
    sizes_match,
    split_unpaired,
)
from pipeline.data.sources import IMAGE_EXTS, Item, list_source
from pipeline.manifests import ShardOutputs
from pipeline.storage import Storage
from stages.shard import STAGE, ShardConfig, items_digest
from tests.condition_fixtures import CLASSES, blocks, depth_gradient, label_ids, photo, png_of
from tests.image_fixtures import encoded, gradient

RES = 32
SEG = ConditionSpec("segmentation", RES, classes=CLASSES)
DEPTH = ConditionSpec("depth", RES)
# The default shard section's fingerprint before shard.condition existed (seed 0, no upstream):
# a new default-off option must not re-shard what existing configs already produced.
DEFAULT_SHARD_FINGERPRINT = "e773b6f904eea3a091b694f011e70405794d0512f861f67b27cc932172be1293"


def stored(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def test_kinds_parse():
    assert parse_kind("none") == ("none", 1)
    assert parse_kind("segmentation") == ("segmentation", 1)
    assert parse_kind("downsample:4") == ("downsample", 4)
    for bad in ("downsample", "downsample:1", "downsample:x", "canny:2", "edges", ""):
        with pytest.raises(ValueError):
            parse_kind(bad)


def test_sizes_match_same_size_or_scaled_copy():
    assert sizes_match((96, 64), (96, 64))
    assert sizes_match((48, 32), (96, 64))  # half resolution
    assert sizes_match((50, 37), (101, 75)) and sizes_match((51, 38), (101, 75))  # rounding
    assert not sizes_match((64, 64), (96, 64))
    assert not sizes_match((64, 96), (96, 64))  # transposed


def test_pairing_by_relative_path_any_extension():
    root, cond_root = "/src/photos", "/src/labels"
    files = [f"{cond_root}/a/x.jpg", f"{cond_root}/a/x.png", f"{cond_root}/b/y.bmp",
             f"{cond_root}/notes.txt", f"{cond_root}/.hidden/z.png", f"{cond_root}/c/z.PNG"]
    index = condition_index(cond_root, files, IMAGE_EXTS)
    assert index == {"a/x": f"{cond_root}/a/x.png", "b/y": f"{cond_root}/b/y.bmp",
                     "c/z": f"{cond_root}/c/z.PNG"}  # png preferred; hidden / text ignored
    items = [Item("k1", f"{root}/a/x.jpg"), Item("k2", f"{root}/b/y.webp"),
             Item("k3", f"{root}/b/gone.jpg", 1)]
    paired, missing = pair_folder(items, root, cond_root, index)
    assert [(it.key, it.cond) for it in paired] == [("k1", index["a/x"]), ("k2", index["b/y"])]
    assert [(r["key"], r["reason"]) for r in missing] == [("k3", CONDITION_MISSING)]
    assert "b/gone" in missing[0]["detail"]

    paired, missing = split_unpaired([Item("k1", "/a.jpg", cond="/a.png"),
                                      Item("k2", "/b.jpg", cond="")], "seg")
    assert [it.key for it in paired] == ["k1"] and missing[0]["reason"] == CONDITION_MISSING


def test_file_list_condition_column(tmp_path):
    (tmp_path / "list.csv").write_text("path,seg\nimgs/a.png,segs/a.png\nimgs/b.png,\n"
                                       "imgs/c.png,/abs/c.png\n")
    listing = list_source(str(tmp_path / "list.csv"), Storage(), "none", cond_column="seg")
    assert {it.uri.rsplit("/", 1)[1]: it.cond for it in listing.items} == {
        "a.png": f"{tmp_path}/segs/a.png", "b.png": "", "c.png": "/abs/c.png"}
    assert all(it.cond is None for it in list_source(str(tmp_path / "list.csv"), Storage(),
                                                     "none").items)
    with pytest.raises(ValueError, match="no condition column 'depth'"):
        list_source(str(tmp_path / "list.csv"), Storage(), "none", cond_column="depth")


def test_label_ids_survive_nearest_resize():
    """A 2x label map of a 3:2 photo: the stored map is exactly the center of the small one."""
    img = photo("coffee", 96, 64)
    small = label_ids(photo("coffee", 48, 32))
    data, size = given_condition(png_of(blocks(small, 2)), img.size, SEG)
    out = stored(data)
    assert (out.mode, out.size, size) == ("L", (RES, RES), (96, 64))
    np.testing.assert_array_equal(np.asarray(out), small[:, 8:40])
    ids = condition_array(data, "segmentation")
    assert ids.dtype == np.int64 and ids.shape == (RES, RES)
    np.testing.assert_array_equal(ids, small[:, 8:40])

    # A half-resolution map of a square photo is a scaled copy: accepted, and at 32 px kept as is.
    half = label_ids(photo("astronaut", 32, 32))
    data, _ = given_condition(png_of(half), (64, 64), SEG)
    np.testing.assert_array_equal(condition_array(data, "segmentation"), half)

    # Palette label maps give their indices; at an uneven scale only known ids appear.
    pal = Image.fromarray(blocks(label_ids(photo("chelsea", 45, 30)), 2), "L").convert("P")
    data, _ = given_condition(encoded(pal, "PNG"), (90, 60), SEG)
    assert set(np.unique(condition_array(data, "segmentation"))) <= {0, 1, 2}


@pytest.mark.parametrize("make, reason", [
    (lambda: b"", CONDITION_UNREADABLE),
    (lambda: np.random.default_rng(0).bytes(2000), CONDITION_UNREADABLE),
    (lambda: png_of(label_ids(photo("coffee", 96, 64)))[:300], CONDITION_UNREADABLE),
    (lambda: encoded(photo("coffee", 96, 64), "PNG"), CONDITION_KIND_MISMATCH),  # RGB
    (lambda: encoded(Image.fromarray(label_ids(photo("coffee", 96, 64))), "JPEG"),
     CONDITION_KIND_MISMATCH),  # lossy
    (lambda: png_of(np.full((64, 96), 3, np.uint8)), CONDITION_KIND_MISMATCH),  # id >= classes
    (lambda: png_of(label_ids(photo("coffee", 64, 64))), CONDITION_SIZE_MISMATCH),
])
def test_bad_label_maps_are_rejected_with_their_reason(make, reason):
    with pytest.raises(ConditionRejected) as e:
        given_condition(make(), (96, 64), SEG)
    assert e.value.reason == reason and e.value.detail


def test_depth_maps_are_stored_as_16_bit():
    exact = np.random.default_rng(1).integers(0, 65536, (RES, RES)).astype(np.uint16)
    data, _ = given_condition(png_of(exact), (RES, RES), DEPTH)
    assert stored(data).mode == "I;16"
    np.testing.assert_array_equal(np.asarray(stored(data)), exact)
    depth = condition_array(data, "depth")
    assert depth.dtype == np.float32 and depth.shape == (1, RES, RES)
    np.testing.assert_allclose(depth[0], exact / 65535.0, rtol=1e-6)

    eight = np.random.default_rng(2).integers(0, 256, (RES, RES)).astype(np.uint8)
    data, _ = given_condition(png_of(eight), (RES, RES), DEPTH)
    np.testing.assert_allclose(condition_array(data, "depth")[0], eight / 255.0, rtol=1e-6)

    # A linear gradient shrunk 2x (bilinear, antialiased) stays linear away from the borders.
    data, _ = given_condition(png_of(depth_gradient(64, 64)), (64, 64), DEPTH)
    row = np.asarray(stored(data)).astype(np.float64)[RES // 2]
    expect = 1000.0 * (2 * np.arange(RES) + 0.5)
    np.testing.assert_allclose(row[1:-1], expect[1:-1], atol=1.0)

    with pytest.raises(ConditionRejected) as e:
        given_condition(encoded(gradient(RES, RES), "PNG"), (RES, RES), DEPTH)
    assert e.value.reason == CONDITION_KIND_MISMATCH


def test_derived_conditions_round_trip():
    img = photo("astronaut", RES, RES)
    gray = np.asarray(img.convert("L"))

    data = derived_condition(img, ConditionSpec("grayscale", RES))
    np.testing.assert_allclose(condition_array(data, "grayscale")[0], gray / 255.0, rtol=1e-6)

    data = derived_condition(img, ConditionSpec("canny", RES, sigma=1.0))
    edges = condition_array(data, "canny")
    assert edges.shape == (1, RES, RES) and set(np.unique(edges)) == {0.0, 1.0}
    np.testing.assert_array_equal(edges[0] * 255, canny_edges(gray, 1.0))

    data = derived_condition(img, ConditionSpec("downsample", RES, factor=4))
    small = condition_array(data, "downsample:4")
    assert small.shape == (3, 8, 8) and small.min() >= -1.0 and small.max() <= 1.0
    want = np.asarray(img.resize((8, 8), Image.Resampling.BICUBIC)).transpose(2, 0, 1)
    np.testing.assert_allclose(small, want / 127.5 - 1.0, atol=1e-6)

    tensor = condition_tensor(derived_condition(img, ConditionSpec("grayscale", RES)), "grayscale")
    assert tuple(tensor.shape) == (1, RES, RES) and str(tensor.dtype) == "torch.float32"
    with pytest.raises(ValueError, match="stored segmentation condition"):
        condition_array(data, "segmentation")  # an RGB PNG is not a label map


# -- config and fingerprint -------------------------------------------------------------------


def _cfg(*overrides: str):
    pipe = Pipeline([STAGE])
    return load_config(None, ["tracking.mode=disabled", *overrides], pipe.schema)


def _fp(*overrides: str) -> str:
    return fingerprint("shard", _cfg(*overrides).shard, {}, STAGE.version, 0)


def test_condition_fingerprint_only_when_set():
    assert "condition" not in fingerprint_view(ShardConfig())
    assert _fp() == _fp("shard.condition.kind=none") == DEFAULT_SHARD_FINGERPRINT
    fps = {_fp(), _fp("shard.condition.kind=canny"), _fp("shard.condition.kind=grayscale"),
           _fp("shard.condition.kind=canny", "shard.condition.sigma=2.0"),
           _fp("shard.condition.kind=downsample:4"), _fp("shard.condition.kind=downsample:8")}
    assert len(fps) == 6
    plain = (Item("k", "/a.jpg"),)
    assert items_digest(plain) != items_digest((Item("k", "/a.jpg", cond="/a.png"),))
    assert items_digest(plain) != items_digest((Item("k", "/a.jpg", cond="/b.png"),)) != \
        items_digest((Item("k", "/a.jpg", cond="/a.png"),))


@pytest.mark.parametrize("overrides, key", [
    (["shard.condition.kind=edges"], "shard.condition.kind"),
    (["shard.condition.kind=downsample:3"], "shard.condition.kind"),  # 256 % 3
    (["shard.condition.kind=segmentation", "shard.source=/x"], "shard.condition.source"),
    (["shard.condition.kind=segmentation", "shard.condition.source=/l", "shard.source=/x"],
     "shard.condition.classes"),
    (["shard.condition.kind=depth", "shard.condition.source=/l"], "shard.condition.source"),
    (["shard.condition.kind=depth", "shard.condition.source=column:d", "shard.source=/x"],
     "shard.condition.source"),
    (["shard.condition.kind=depth", "shard.condition.source=/l", "shard.source=/x.csv"],
     "shard.condition.source"),
    (["shard.condition.kind=canny", "shard.condition.source=/l"], "shard.condition.source"),
    (["shard.condition.kind=canny", "shard.condition.classes=3"], "shard.condition.classes"),
    (["shard.condition.kind=canny", "shard.condition.sigma=0"], "shard.condition.sigma"),
])
def test_condition_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        _cfg(*overrides)
    assert e.value.key == key


def test_condition_configs_that_load():
    cfg = _cfg("shard.condition.kind=segmentation", "shard.condition.source=/labels",
               "shard.condition.classes=3", "shard.source=/photos").shard
    assert cfg.condition_spec() == ConditionSpec("segmentation", 256, classes=3)
    cfg = _cfg("shard.condition.kind=depth", "shard.condition.source=column:depth",
               "shard.source=/l.parquet").shard
    assert cfg.condition.column == "depth" and cfg.condition_spec().bit_depth == 16
    assert _cfg("shard.condition.kind=downsample:4").shard.condition_spec().side == 64
    assert _cfg().shard.condition_spec() is None


def test_manifests_with_and_without_a_condition():
    base = {"source": "s", "resolution": 32, "ext": "jpg", "seed": 0, "classes": [],
            "num_classes": 0, "shards": [], "splits": {},
            "totals": {"inputs": 1, "samples": 1, "skipped": 0, "duplicates": 0,
                       "ignored_files": 0, "bytes": 1}, "skipped": {}, "skipped_uri": "u"}
    old = ShardOutputs.from_dict(base)
    assert old.condition is None and "condition" not in old.to_dict()
    cond = {"kind": "downsample", "member": "cond.png", "given": False, "source": None,
            "classes": None, "factor": 4, "sigma": None, "channels": 3, "size": [8, 8],
            "bit_depth": 8, "resample": "bicubic", "paired": 1, "skipped": {}}
    new = ShardOutputs.from_dict({**base, "condition": cond})
    assert new.condition.factor == 4 and new.condition.size == (8, 8)
    assert new.to_dict()["condition"] == cond
