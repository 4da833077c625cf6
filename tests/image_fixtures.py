"""Generated image fixtures: every conversion the shard stage handles and every kind of bad input.

Images are made in memory (PIL + numpy), small, and the same on every call, so tests can compare
bytes between runs.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
from PIL import Image

TEXT = b"this is a text file, not a picture\n" * 20


def gradient(w: int, h: int, seed: int = 0) -> Image.Image:
    """A colourful RGB test image (smooth gradients plus a little seeded noise)."""
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    arr = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1),
                    (x + y) * 255 // max(w + h - 2, 1)], -1).astype(np.int64)
    arr = np.clip(arr + rng.integers(-20, 21, arr.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def jpeg_with_orientation(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(img, "JPEG", quality=95, exif=exif.tobytes())


def sixteen_bit_png(w: int, h: int) -> bytes:
    arr = (np.linspace(0, 65535, w * h).reshape(h, w)).astype(np.uint16)
    return encoded(Image.fromarray(arr), "PNG")


def palette_with_transparency(w: int, h: int) -> bytes:
    img = gradient(w, h, 3).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encoded(img, "PNG", transparency=0)


def rgba_png(w: int, h: int) -> bytes:
    img = gradient(w, h, 4).convert("RGBA")
    alpha = np.zeros((h, w), np.uint8)
    alpha[:, w // 2:] = 255  # left half transparent → white after compositing
    img.putalpha(Image.fromarray(alpha, "L"))
    return encoded(img, "PNG")


@functools.lru_cache(maxsize=1)
def bomb_png() -> bytes:
    """A 20000×20000 1-bit PNG of ~50 KB: 400 MP once decoded."""
    return encoded(Image.new("1", (20000, 20000)), "PNG")


def good_files() -> dict[str, bytes]:
    """Valid inputs (relative path → bytes), at least 16 px on the shorter side, in class folders
    ``a/`` and ``b/``; every colour mode the stage converts."""
    return {
        "a/rgb.jpg": encoded(gradient(64, 48, 1), "JPEG", quality=90),
        "a/cmyk.jpg": encoded(gradient(40, 40, 2).convert("CMYK"), "JPEG"),
        "a/gray.png": encoded(gradient(36, 30, 5).convert("L"), "PNG"),
        "a/palette.png": palette_with_transparency(32, 40),
        "a/name.with.dots.jpg": encoded(gradient(50, 50, 6), "JPEG"),
        "b/gray16.png": sixteen_bit_png(40, 24),
        "b/rgba.png": rgba_png(48, 32),
        "b/rotated.jpg": jpeg_with_orientation(gradient(60, 30, 7), 6),
        "b/photo.webp": encoded(gradient(45, 45, 8), "WEBP"),
        "b/mono.png": encoded(gradient(33, 33, 9).convert("1"), "PNG"),
        "b/sub/deep.png": encoded(gradient(20, 40, 10), "PNG"),
    }


def bad_files() -> dict[str, tuple[bytes, str]]:
    """Invalid inputs: relative path → (bytes, expected skip reason)."""
    jpg = encoded(gradient(64, 64, 11), "JPEG")
    png = encoded(gradient(64, 64, 12), "PNG")
    return {
        "a/empty.jpg": (b"", "empty"),
        "a/random.png": (np.random.default_rng(0).bytes(3000), "undecodable"),
        "b/text.jpg": (TEXT, "not_image"),
        "b/cut.jpg": (jpg[:len(jpg) // 2], "truncated"),
        "a/cut.png": (png[:len(png) // 2], "truncated"),
        "b/tiny.png": (encoded(gradient(8, 8, 13), "PNG"), "too_small"),
        "a/bomb.png": (bomb_png(), "decompression_bomb"),
    }


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def fixture_folder(root: Path) -> dict[str, object]:
    """Write the full fixture set below ``root``; returns what the shard stage should make of it
    with ``labels: folders`` at resolution 32 (min_size 16).

    Keys: ``good`` (rel → class name), ``bad`` (rel → reason), ``rejected`` (rel → listing-time
    reason), ``ignored`` (count of files that are not image files or are hidden).
    """
    good = good_files()
    bad = bad_files()
    write_tree(root, good)
    write_tree(root, {rel: data for rel, (data, _) in bad.items()})
    write_tree(root, {
        "root.jpg": encoded(gradient(40, 40, 14), "JPEG"),  # not in a class folder
        "notes.txt": TEXT,  # not an image extension: ignored
        ".hidden/x.jpg": encoded(gradient(40, 40, 15), "JPEG"),  # hidden: ignored
    })
    return {
        "good": {rel: rel.split("/", 1)[0] for rel in good},
        "bad": {rel: reason for rel, (_, reason) in bad.items()},
        "rejected": {"root.jpg": "no_class_folder"},
        "ignored": 2,
    }
