"""Pure data functions: decode/convert/resize/encode, rejection reasons, keys, sources, assignment,
builtin datasets and the reproducible tar writer. No Ray here."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from pipeline.data import builtin, wds
from pipeline.data.images import (
    ImageRejected,
    ImageSpec,
    decode,
    encode,
    looks_like_text,
    process_image,
    resize_center_crop,
    to_rgb,
)
from pipeline.data.sources import Item, class_ids, list_source, make_key, source_kind
from pipeline.storage import Storage
from stages.shard import ShardConfig, assign, items_digest, val_count
from tests.image_fixtures import (
    bad_files,
    encoded,
    gradient,
    jpeg_with_orientation,
    palette_with_transparency,
    rgba_png,
    sixteen_bit_png,
)

SPEC = ImageSpec(resolution=32, ext="png", min_size=16)


def rgb_of(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    assert img.mode == "RGB"
    return np.asarray(img).astype(int)


# -- conversions ------------------------------------------------------------------------------


def test_rgba_is_composited_on_white():
    out = rgb_of(process_image(rgba_png(48, 32), SPEC).data)
    assert out.shape == (32, 32, 3)
    assert (out[:, :8] >= 250).all()  # transparent left part → white
    assert out[:, 24:].mean() < 200  # opaque part keeps its colours


def test_palette_with_transparency_is_composited_on_white():
    data = palette_with_transparency(32, 40)
    src = Image.open(io.BytesIO(data))
    assert src.mode == "P" and src.info.get("transparency") == 0
    transparent = np.asarray(src) == 0
    assert transparent.any()
    out = np.asarray(to_rgb(src.copy()))
    assert (out[transparent] == 255).all()
    assert not (out[~transparent] == 255).all()


def test_sixteen_bit_gray_is_scaled_not_clipped():
    src = Image.open(io.BytesIO(sixteen_bit_png(40, 24)))
    assert src.mode.startswith("I")
    out = np.asarray(to_rgb(src)).astype(int)
    ref = np.asarray(src).astype(np.int64) * 255 / 65535
    assert out.shape == (24, 40, 3)
    assert np.abs(out[..., 0] - ref).max() <= 1  # Pillow's own L conversion would clip at 255
    assert out.min() == 0 and out.max() == 255 and 100 < out.mean() < 155


@pytest.mark.parametrize("mode", ["CMYK", "L", "1", "YCbCr", "LA"])
def test_other_modes_convert_to_rgb(mode):
    img = gradient(20, 20).convert(mode)
    out = to_rgb(img)
    assert out.mode == "RGB" and out.size == (20, 20)


def test_cmyk_jpeg_colours_survive():
    src = gradient(40, 40, 2)
    out = rgb_of(process_image(encoded(src.convert("CMYK"), "JPEG", quality=95),
                               ImageSpec(resolution=40, ext="png", min_size=1)).data)
    assert np.abs(out - np.asarray(src).astype(int)).mean() < 12


def test_exif_orientation_is_applied():
    # Left half red, right half blue, stored 60×30 with orientation 6 (rotate 90° clockwise to
    # display): displayed 30×60 with red on top.
    arr = np.zeros((30, 60, 3), np.uint8)
    arr[:, :30] = (255, 0, 0)
    arr[:, 30:] = (0, 0, 255)
    data = jpeg_with_orientation(Image.fromarray(arr), 6)
    img, size = decode(data, ImageSpec(resolution=16, jpeg_draft=False))
    assert size == (30, 60)
    assert img.size == (30, 60)
    px = np.asarray(img.convert("RGB")).astype(int)
    assert px[5, 15, 0] > 200 and px[5, 15, 2] < 60  # top: red
    assert px[55, 15, 2] > 200 and px[55, 15, 0] < 60  # bottom: blue
    assert process_image(data, ImageSpec(resolution=16)).width == 30


def test_resize_center_crop_keeps_the_center():
    arr = np.zeros((32, 96, 3), np.uint8)
    arr[:, 32:64] = 255  # white center third
    out = np.asarray(resize_center_crop(Image.fromarray(arr), 16))
    assert out.shape == (16, 16, 3)
    assert out[:, 2:14].min() > 240
    up = resize_center_crop(gradient(10, 20), 32)
    assert up.size == (32, 32)


@pytest.mark.parametrize("ext", ["jpg", "png", "webp"])
def test_encode_formats_are_deterministic(ext):
    img = gradient(32, 32)
    a, b = encode(img.copy(), ext, 90), encode(img.copy(), ext, 90)
    assert a == b
    back = Image.open(io.BytesIO(a))
    assert back.format == {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext]
    assert back.size == (32, 32) and back.convert("RGB").mode == "RGB"


def test_unknown_ext_is_an_error_not_a_skip():
    with pytest.raises(ValueError):
        encode(gradient(8, 8), "gif")


def test_jpeg_draft_is_close_to_full_decode():
    data = encoded(gradient(512, 384, 3), "JPEG", quality=95)
    fast = rgb_of(process_image(data, ImageSpec(resolution=64, ext="png")).data)
    full = rgb_of(process_image(data, ImageSpec(resolution=64, ext="png",
                                                jpeg_draft=False)).data)
    assert fast.shape == full.shape == (64, 64, 3)
    assert np.abs(fast - full).mean() < 4


# -- rejections -------------------------------------------------------------------------------


@pytest.mark.parametrize("rel", sorted(bad_files()))
def test_bad_inputs_are_rejected_with_their_reason(rel):
    data, reason = bad_files()[rel]
    with pytest.raises(ImageRejected) as e:
        process_image(data, SPEC)
    assert e.value.reason == reason
    assert "0x" not in e.value.detail  # no object addresses: skip records are reproducible
    with pytest.raises(ImageRejected) as again:
        process_image(data, SPEC)
    assert again.value.detail == e.value.detail


def test_max_pixels_is_our_own_limit():
    data = encoded(gradient(100, 100), "PNG")
    with pytest.raises(ImageRejected, match="max_pixels") as e:
        process_image(data, ImageSpec(resolution=32, max_pixels=9_999))
    assert e.value.reason == "decompression_bomb"
    assert process_image(data, ImageSpec(resolution=32, max_pixels=10_000)).width == 100


def test_min_size_boundary():
    data = encoded(gradient(16, 40), "PNG")
    assert process_image(data, ImageSpec(resolution=32, min_size=16)).height == 40
    with pytest.raises(ImageRejected) as e:
        process_image(data, ImageSpec(resolution=32, min_size=17))
    assert e.value.reason == "too_small"


def test_text_detection():
    assert looks_like_text(b"hello\nworld\n")
    assert not looks_like_text(b"")
    assert not looks_like_text(np.random.default_rng(1).bytes(500))


def test_non_image_signatures():
    with pytest.raises(ImageRejected) as e:
        process_image(b"%PDF-1.4\x00\x01binary", SPEC)
    assert e.value.reason == "not_image"


# -- keys, sources, assignment ----------------------------------------------------------------


def test_keys_are_stable_unique_and_webdataset_safe():
    paths = ["a/b.jpg", "a_b.jpg", "a/b.png", "x/name.with.dots.jpeg", "ünï cødé/ëx.JPG",
             "..weird/..", "z" * 300 + ".jpg"]
    keys = [make_key(p) for p in paths]
    assert len(set(keys)) == len(keys)
    assert keys == [make_key(p) for p in paths]
    for k in keys:
        assert "." not in k and "/" not in k and 0 < len(k) <= 60
    assert make_key("cats/img001.jpg").startswith("cats_img001_")


def test_source_kinds():
    assert source_kind("builtin:digits") == "builtin"
    assert source_kind("s3://b/list.parquet") == "file_list"
    assert source_kind("/data/files.CSV") == "file_list"
    assert source_kind("s3://b/images/") == "folder"


def test_class_ids():
    assert class_ids([2, 0, None, 2]) == ({0: 0, 2: 2}, ["0", "1", "2"])
    mapping, names = class_ids(["dog", "cat", None, "dog"])
    assert names == ["cat", "dog"] and mapping == {"cat": 0, "dog": 1}


def test_file_list_rows(tmp_path):
    (tmp_path / "imgs").mkdir()
    lines = [{"path": "imgs/a.png", "label": "dog"}, {"path": "imgs/b.png", "label": "cat"},
             {"path": "imgs/a.png", "label": "dog"}, {"path": "imgs/c.png"},
             {"path": str(tmp_path / "abs.png"), "label": "cat"}]
    src = tmp_path / "list.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in lines))
    listing = list_source(str(src), Storage())
    assert listing.classes == ["cat", "dog"]
    by_uri = {it.uri: it.label for it in listing.items}
    assert by_uri == {str(tmp_path / "imgs/a.png"): 1, str(tmp_path / "imgs/b.png"): 0,
                      str(tmp_path / "abs.png"): 0}
    assert sorted(r["reason"] for r in listing.rejected) == ["duplicate_entry", "no_label"]
    assert [it.key for it in listing.items] == sorted(it.key for it in listing.items)


def _items(n: int) -> list[Item]:
    return [Item(make_key(f"img{i}.jpg"), f"/src/img{i}.jpg") for i in range(n)]


def test_assignment_is_a_deterministic_partition():
    items = _items(103)
    a = assign(items, seed=0, val_fraction=0.1, samples_per_shard=20)
    b = assign(list(reversed(items)), seed=0, val_fraction=0.1, samples_per_shard=20)
    assert a == b  # independent of listing order
    assert [len(s) for s in a["train"]] == [20, 20, 20, 20, 13]
    assert [len(s) for s in a["val"]] == [10]
    keys = [it.key for split in a.values() for shard in split for it in shard]
    assert sorted(keys) == sorted(it.key for it in items)
    c = assign(items, seed=1, val_fraction=0.1, samples_per_shard=20)
    assert c != a
    # Adding an input moves few others between splits (hash ranks, not a reshuffle).
    d = assign(items + _items(104)[-1:], seed=0, val_fraction=0.1, samples_per_shard=20)
    val_a = {it.key for it in a["val"][0]}
    val_d = {it.key for shard in d["val"] for it in shard}
    assert len(val_a & val_d) >= 9


def test_val_count():
    assert val_count(100, 0.05) == 5
    assert val_count(10, 0.01) == 1
    assert val_count(1, 0.5) == 0
    assert val_count(3, 0.0) == 0
    assert val_count(4, 0.99) == 3


def test_items_digest_changes_with_content():
    items = _items(5)
    assert items_digest(items) == items_digest(list(items))
    assert items_digest(items) != items_digest(items[:4])


def test_shard_config_validation():
    from pipeline.config import ConfigError

    for bad in [dict(labels="folders"), dict(ext="gif"), dict(val_fraction=1.0),
                dict(samples_per_shard=0), dict(source="builtin:cifar"), dict(source=""),
                dict(resolution=4), dict(min_size=0), dict(labels="x")]:
        with pytest.raises(ConfigError):
            ShardConfig(**bad).validate()
    ShardConfig(source="s3://bucket/images", labels="folders").validate()
    assert ShardConfig(resolution=64).image_spec().min_size == 32


# -- builtin data -----------------------------------------------------------------------------


def test_builtin_digits():
    from sklearn.datasets import load_digits

    entries = builtin.digit_entries()
    assert len(entries) == 1797
    targets = load_digits().target
    assert [label for _, _, label in entries[:50]] == list(targets[:50])
    img = builtin.render(entries[7][1])
    assert img.size == (8, 8) and img.mode == "L"
    assert builtin.parse_builtin("builtin:digits:30") == ("digits", 30)
    with pytest.raises(ValueError):
        builtin.parse_builtin("builtin:digits:x")


def test_builtin_photo_crops_are_seeded_and_extendable():
    a = builtin.photo_entries(20, seed=0)
    assert a == builtin.photo_entries(20, seed=0)
    assert a != builtin.photo_entries(20, seed=1)
    assert builtin.photo_entries(30, seed=0)[:20] == a
    assert {label for _, _, label in a} == set(range(len(builtin.PHOTOS)))
    img = builtin.render(a[3][1])
    side = int(a[3][1].rsplit("-", 1)[1])
    assert img.size == (side, side) and img.mode == "RGB"


# -- tar writer -------------------------------------------------------------------------------


def test_shard_writer_is_reproducible_and_readable(tmp_path):
    samples = [{"__key__": f"k{i}", "png": encode(gradient(8, 8, i), "png"),
                "cls": str(i).encode(), "json": b"{}"} for i in range(3)]
    outs = []
    for name in ("a.tar", "b.tar"):
        with open(tmp_path / name, "wb") as fh, wds.shard_writer(fh) as (tar, sink):
            for s in samples:
                tar.write(s)
        outs.append((tmp_path / name).read_bytes())
        assert sink.bytes == len(outs[-1])
    assert outs[0] == outs[1]
    storage = Storage()
    got = list(wds.iter_samples(storage, str(tmp_path / "a.tar")))
    assert [g["__key__"] for g in got] == ["k0", "k1", "k2"]
    assert got[1]["cls"] == b"1" and got[2]["png"] == samples[2]["png"]
    size, sha, keys = wds.digest(storage, str(tmp_path / "a.tar"))
    import hashlib

    assert size == len(outs[0]) and sha == hashlib.sha256(outs[0]).hexdigest()
    assert keys == ["k0", "k1", "k2"]
