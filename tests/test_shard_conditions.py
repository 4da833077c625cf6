"""The shard stage with paired conditions: given label maps on real Ray (every skip reason), depth
maps, a file list's condition column and derived kinds in-process (``local``), resume, and the
image readers of training and tokenize ignoring the new ``{key}.cond.png`` member."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import load_config
from pipeline.dag import Pipeline
from pipeline.data import loader, wds
from pipeline.data.conditions import (
    COND,
    CONDITION_KIND_MISMATCH,
    CONDITION_MISSING,
    CONDITION_SIZE_MISMATCH,
    CONDITION_UNREADABLE,
    canny_edges,
    condition_array,
)
from pipeline.data.sources import make_key
from pipeline.manifests import ShardOutputs
from pipeline.storage import Storage, join
from stages.shard import PARTS, STAGE
from tests.condition_fixtures import CLASSES, blocks, depth_gradient, label_ids, photo, png_of
from tests.image_fixtures import encoded, gradient, write_tree
from tests.test_shard import read_back, skipped_records

RES = 32


def shard(root: Path, source: str, *overrides: str, local: bool = True, run: str = "t") -> dict:
    """Run the one-stage pipeline (in this process unless ``local`` is false); its manifest."""
    pipe = Pipeline([STAGE])
    cfg = load_config(None, [f"run={run}", f"storage.root={root}", "tracking.mode=disabled",
                             f"shard.source={source}", f"shard.resolution={RES}",
                             "shard.progress=false", *overrides], pipe.schema)
    return pipe.run(cfg, local=local)["shard"]


def by_source(samples: dict[str, dict], source: str) -> dict[str, dict]:
    return {json.loads(s["json"])["source"][len(source) + 1:]: s for s in samples.values()}


def reasons_by_rel(records: list[dict], source: str) -> dict[str, str]:
    return {r["source"][len(source) + 1:]: r["reason"] for r in records}


# -- given: segmentation from a sibling folder (real Ray) -------------------------------------


def test_segmentation_from_a_sibling_folder(ray_session, tmp_path):
    coffee, astronaut = photo("coffee", 96, 64), photo("astronaut", 64, 64)
    chelsea = photo("chelsea", 96, 64)
    photos = {
        "a/coffee.jpg": encoded(coffee, "JPEG"),
        "a/astronaut.png": encoded(astronaut, "PNG"),
        "b/chelsea.jpg": encoded(chelsea, "JPEG"),
        "b/nolabel.jpg": encoded(coffee, "JPEG"),
        "b/garbage.jpg": encoded(chelsea, "JPEG"),
        "a/wrongsize.jpg": encoded(coffee, "JPEG"),
        "a/rgb.jpg": encoded(coffee, "JPEG"),
        "b/outofrange.jpg": encoded(chelsea, "JPEG"),
        "b/lossy.jpg": encoded(chelsea, "JPEG"),
        "b/tiny.jpg": encoded(photo("coffee", 12, 8), "JPEG"),  # the image itself is bad
    }
    coffee_ids, chelsea_ids = label_ids(photo("coffee", 48, 32)), label_ids(photo("chelsea",
                                                                                  48, 32))
    astronaut_ids = label_ids(photo("astronaut", 32, 32))
    labels = {
        "a/coffee.png": png_of(blocks(coffee_ids, 2)),
        "a/coffee.jpg": encoded(coffee, "JPEG"),  # a second file for the stem: png wins
        "a/astronaut.png": png_of(astronaut_ids),  # half resolution: a scaled copy
        "b/chelsea.png": encoded(Image.fromarray(blocks(chelsea_ids, 2)).convert("P"), "PNG"),
        "b/garbage.png": np.random.default_rng(0).bytes(500),
        "a/wrongsize.png": png_of(np.zeros((64, 64), np.uint8)),
        "a/rgb.png": encoded(coffee, "PNG"),
        "b/outofrange.png": png_of(np.full((64, 96), CLASSES, np.uint8)),
        "b/lossy.jpg": encoded(Image.fromarray(blocks(chelsea_ids, 2)), "JPEG"),
        "b/tiny.png": png_of(np.zeros((8, 12), np.uint8)),
    }
    write_tree(tmp_path / "photos", photos)
    write_tree(tmp_path / "labels", labels)
    source = str(tmp_path / "photos")
    m = shard(tmp_path / "runs", source, "shard.labels=folders", "shard.samples_per_shard=2",
              "shard.condition.kind=segmentation", f"shard.condition.source={tmp_path}/labels",
              f"shard.condition.classes={CLASSES}", local=False)
    out = m["outputs"]

    expect_skips = {"b/nolabel.jpg": CONDITION_MISSING, "b/garbage.jpg": CONDITION_UNREADABLE,
                    "a/wrongsize.jpg": CONDITION_SIZE_MISMATCH,
                    "a/rgb.jpg": CONDITION_KIND_MISMATCH,
                    "b/outofrange.jpg": CONDITION_KIND_MISMATCH,
                    "b/lossy.jpg": CONDITION_KIND_MISMATCH, "b/tiny.jpg": "too_small"}
    records = skipped_records(Storage(), out)
    assert reasons_by_rel(records, source) == expect_skips
    assert all(r["detail"] for r in records)
    assert out["skipped"] == dict(sorted(Counter(expect_skips.values()).items()))
    cond_counts = Counter(r for r in expect_skips.values() if r.startswith("condition_"))
    assert out["condition"] == {
        "kind": "segmentation", "member": COND, "given": True,
        "source": f"{tmp_path}/labels", "classes": CLASSES, "factor": None, "sigma": None,
        "channels": 1, "size": [RES, RES], "bit_depth": 8, "resample": "nearest",
        "paired": 3, "skipped": dict(sorted(cond_counts.items()))}
    assert ShardOutputs.from_dict(out).condition.classes == CLASSES

    got = by_source(read_back(Storage(), out), source)
    assert set(got) == {"a/coffee.jpg", "a/astronaut.png", "b/chelsea.jpg"}
    want = {"a/coffee.jpg": coffee_ids[:, 8:40], "a/astronaut.png": astronaut_ids,
            "b/chelsea.jpg": chelsea_ids[:, 8:40]}
    for rel, sample in got.items():
        np.testing.assert_array_equal(condition_array(sample[COND], "segmentation"), want[rel])
        meta = json.loads(sample["json"])
        assert meta["condition"] == f"{tmp_path}/labels/{rel.rsplit('.', 1)[0]}.png"
    meta = json.loads(got["a/astronaut.png"]["json"])
    assert (meta["condition_width"], meta["condition_height"]) == (32, 32)
    assert int(got["b/chelsea.jpg"]["cls"]) == 1 and got["a/coffee.jpg"]["__key__"] == make_key(
        "a/coffee.jpg")


# -- given: depth, resume ---------------------------------------------------------------------


def test_depth_from_a_sibling_folder_and_resume(tmp_path):
    exact = np.random.default_rng(3).integers(0, 65536, (RES, RES)).astype(np.uint16)
    eight = np.random.default_rng(4).integers(0, 256, (RES, RES)).astype(np.uint8)
    write_tree(tmp_path / "photos", {
        "d16.png": encoded(photo("astronaut", RES, RES), "PNG"),
        "d8.png": encoded(photo("coffee", RES, RES), "PNG"),
        "ramp.png": encoded(photo("chelsea", 64, 64), "PNG"),
        "rgb.png": encoded(photo("coffee", RES, RES), "PNG"),
        "none.png": encoded(photo("chelsea", RES, RES), "PNG"),
    })
    write_tree(tmp_path / "depth", {"d16.png": png_of(exact), "d8.png": png_of(eight),
                                    "ramp.png": png_of(depth_gradient(64, 64)),
                                    "rgb.png": encoded(gradient(RES, RES), "PNG")})
    source = str(tmp_path / "photos")
    opts = ("shard.condition.kind=depth", f"shard.condition.source={tmp_path}/depth",
            "shard.samples_per_shard=1", "shard.val_fraction=0")
    m = shard(tmp_path / "runs", source, *opts)
    out = m["outputs"]
    assert reasons_by_rel(skipped_records(Storage(), out), source) == {
        "rgb.png": CONDITION_KIND_MISMATCH, "none.png": CONDITION_MISSING}
    assert (out["condition"]["bit_depth"], out["condition"]["resample"]) == (16, "bilinear")
    got = by_source(read_back(Storage(), out), source)
    np.testing.assert_allclose(condition_array(got["d16.png"][COND], "depth")[0], exact / 65535,
                               rtol=1e-6)
    np.testing.assert_allclose(condition_array(got["d8.png"][COND], "depth")[0], eight / 255,
                               rtol=1e-6)
    ramp = condition_array(got["ramp.png"][COND], "depth")[0, RES // 2] * 65535
    np.testing.assert_allclose(ramp[1:-1], (1000.0 * (2 * np.arange(RES) + 0.5))[1:-1], atol=1)

    # A killed run: the manifest and every sidecar gone; the tars are reused, the skip records
    # rebuilt by checking the missing inputs (and their conditions) again.
    storage = Storage()
    for part in storage.walk_files(join(m["uri"], PARTS)):
        storage.rm(part)
    storage.rm(join(m["uri"], "_manifest.json"))
    resumed = shard(tmp_path / "runs", source, *opts)
    # 4 shards of one input each: none.png was dropped at listing (no depth file).
    assert resumed["resumed"] is True and resumed["outputs"]["shards_reused"] == 4
    assert resumed["outputs"]["skipped"] == out["skipped"]
    assert resumed["outputs"]["condition"] == out["condition"]


# -- given: a file list's condition column ----------------------------------------------------


def test_segmentation_from_a_file_list_column(tmp_path):
    ids = label_ids(photo("astronaut", RES, RES))
    write_tree(tmp_path / "src", {
        "imgs/0.png": encoded(photo("astronaut", RES, RES), "PNG"),
        "imgs/1.png": encoded(photo("coffee", RES, RES), "PNG"),
        "imgs/2.png": encoded(photo("chelsea", RES, RES), "PNG"),
        "segs/0.png": png_of(ids),
    })
    (tmp_path / "src" / "list.csv").write_text(
        "path,seg\nimgs/0.png,segs/0.png\nimgs/1.png,\nimgs/2.png,segs/gone.png\n")
    out = shard(tmp_path / "runs", f"{tmp_path}/src/list.csv", "shard.val_fraction=0",
                "shard.condition.kind=segmentation", "shard.condition.source=column:seg",
                f"shard.condition.classes={CLASSES}")["outputs"]
    assert out["skipped"] == {CONDITION_MISSING: 2}
    assert out["condition"]["source"] == "column:seg"
    (sample,) = read_back(Storage(), out).values()
    np.testing.assert_array_equal(condition_array(sample[COND], "segmentation"), ids)


# -- derived kinds; readers ignore the member -------------------------------------------------


def image_members(samples: dict[str, dict]) -> dict[str, dict[str, bytes]]:
    return {k: {m: v for m, v in s.items() if m != COND and not m.startswith("__")}
            for k, s in samples.items()}


@pytest.mark.parametrize("source, kind", [("builtin:digits:24", "grayscale"),
                                          ("builtin:digits:24", "downsample:4"),
                                          ("builtin:photos:7", "canny")])
def test_derived_conditions_leave_the_images_as_they_were(tmp_path, source, kind):
    opts = ("shard.ext=png", "shard.samples_per_shard=8", "shard.val_fraction=0.2")
    plain = shard(tmp_path / "runs", source, *opts)["outputs"]
    cond = shard(tmp_path / "runs", source, *opts, f"shard.condition.kind={kind}")["outputs"]
    assert "condition" not in plain and cond["condition"]["kind"] == kind.split(":")[0]
    plain_samples, cond_samples = read_back(Storage(), plain), read_back(Storage(), cond)
    # The image, label and json members are byte for byte those of the unconditioned run.
    assert image_members(cond_samples) == image_members(plain_samples)

    for s in cond_samples.values():
        rgb = Image.open(io.BytesIO(s["png"])).convert("RGB")
        got = condition_array(s[COND], kind)
        if kind == "grayscale":
            np.testing.assert_allclose(got[0], np.asarray(rgb.convert("L")) / 255, rtol=1e-6)
        elif kind == "canny":
            np.testing.assert_array_equal(got[0] * 255, canny_edges(np.asarray(rgb.convert("L")),
                                                                    1.0))
        else:
            assert got.shape == (3, RES // 4, RES // 4)
            small = np.asarray(rgb.resize((8, 8), Image.Resampling.BICUBIC))
            np.testing.assert_allclose(got, small.transpose(2, 0, 1) / 127.5 - 1, atol=1e-6)
    if kind == "canny":
        assert sum(condition_array(s[COND], kind).sum() for s in cond_samples.values()) > 0

    # Training and tokenize read the same images and labels from both runs.
    storage = Storage()
    uris = {name: [s["uri"] for s in o["shards"]] for name, o in (("plain", plain),
                                                                   ("cond", cond))}
    evals = {name: list(loader.eval_batches(storage, u, 8, RES)) for name, u in uris.items()}
    for (xa, ya), (xb, yb) in zip(evals["plain"], evals["cond"], strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    for sample in wds.iter_shards(storage, uris["cond"]):
        assert loader.image_bytes(sample) == sample["png"]
    import webdataset

    rows = list(webdataset.WebDataset(uris["cond"], shardshuffle=False).decode("pil").to_tuple(
        "png", "cls"))
    assert len(rows) == len(cond_samples) and all(img.size == (RES, RES) for img, _ in rows)
