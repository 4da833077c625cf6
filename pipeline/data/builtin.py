"""Builtin image sources shipped inside installed packages (nothing is downloaded).

- ``builtin:digits[:N]``: scikit-learn's 1,797 labelled 8×8 handwritten digits (classes "0"-"9"),
  the first N when given. The 8×8 image is the source; the shard stage upscales it.
- ``builtin:photos[:N]``: N (default 1,000) square crops of scikit-image's colour sample photos,
  labelled by photo. Crop ``i`` depends only on the seed and ``i``, so a larger N extends the
  same sequence.

Each item is addressed by a self-describing URI (``builtin:digits/17``,
``builtin:photos/coffee/40-12-230``) that :func:`render` turns back into a Pillow image on any
worker. scikit-learn / scikit-image are imported on first use only.
"""

from __future__ import annotations

import functools
import re

import numpy as np
from PIL import Image

BUILTINS = ("digits", "photos")
PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "retina",
          "rocket")
DEFAULT_PHOTO_CROPS = 1000
_SOURCE = re.compile(r"^builtin:(?P<name>[a-z_]+)(?::(?P<count>\d+))?$")


def parse_builtin(source: str) -> tuple[str, int | None]:
    """``builtin:NAME[:COUNT]`` → (NAME, COUNT or None). Raises ValueError when malformed."""
    m = _SOURCE.match(source)
    if not m or m["name"] not in BUILTINS:
        raise ValueError(f"unknown builtin source {source!r}: use "
                         f"{' or '.join(f'builtin:{b}[:COUNT]' for b in BUILTINS)}")
    count = int(m["count"]) if m["count"] is not None else None
    if count is not None and count < 1:
        raise ValueError(f"{source!r}: COUNT must be >= 1")
    return m["name"], count


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    # Values are 0..16 ink levels; spread them over 0..255 (white ink on black).
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)
    return images, d.target.astype(np.int64)


@functools.lru_cache(maxsize=len(PHOTOS))
def load_photo(name: str) -> np.ndarray:
    """One of :data:`PHOTOS` as an HxWx3 uint8 array."""
    if name not in PHOTOS:
        raise ValueError(f"unknown builtin photo {name!r}")
    import skimage.data

    return np.ascontiguousarray(getattr(skimage.data, name)()[..., :3])


def digit_entries(count: int | None = None) -> list[tuple[str, str, int]]:
    """(key, uri, label) of the first ``count`` (default all 1,797) digits."""
    _, targets = _digits()
    n = len(targets) if count is None else min(count, len(targets))
    return [(f"digits_{i:05d}", f"builtin:digits/{i}", int(targets[i])) for i in range(n)]


def photo_crops(count: int, seed: int) -> list[tuple[str, int, int, int]]:
    """(photo name, x, y, side) of ``count`` square crops; crop i depends on (seed, i) only.

    Photos are taken in turn (balanced classes); sides are uniform between a quarter of the
    photo's shorter side and all of it.
    """
    out = []
    for i in range(count):
        name = PHOTOS[i % len(PHOTOS)]
        h, w = load_photo(name).shape[:2]
        rng = np.random.default_rng([seed, i])
        short = min(h, w)
        side = int(rng.integers(short // 4, short + 1))
        x = int(rng.integers(0, w - side + 1))
        y = int(rng.integers(0, h - side + 1))
        out.append((name, x, y, side))
    return out


def photo_entries(count: int | None, seed: int) -> list[tuple[str, str, int]]:
    """(key, uri, label) of ``count`` photo crops (label = index of the photo in PHOTOS)."""
    crops = photo_crops(DEFAULT_PHOTO_CROPS if count is None else count, seed)
    return [(f"photos_{name}_{i:05d}", f"builtin:photos/{name}/{x}-{y}-{side}",
             PHOTOS.index(name)) for i, (name, x, y, side) in enumerate(crops)]


def entries(source: str, seed: int) -> tuple[list[tuple[str, str, int]], list[str]]:
    """All (key, uri, label) of a builtin source, and its class names."""
    name, count = parse_builtin(source)
    if name == "digits":
        return digit_entries(count), [str(d) for d in range(10)]
    return photo_entries(count, seed), list(PHOTOS)


def preload(source: str) -> None:
    """Load a builtin source's data into this process's cache (worker warm-up)."""
    name, _ = parse_builtin(source)
    if name == "digits":
        _digits()
    else:
        for photo in PHOTOS:
            load_photo(photo)


def render(uri: str) -> Image.Image:
    """The source image behind a builtin item URI (before resize/crop)."""
    parts = uri.split("/")
    try:
        if parts[0] == "builtin:digits" and len(parts) == 2:
            images, _ = _digits()
            return Image.fromarray(images[int(parts[1])], "L")
        if parts[0] == "builtin:photos" and len(parts) == 3:
            x, y, side = (int(v) for v in parts[2].split("-"))
            crop = load_photo(parts[1])[y:y + side, x:x + side]
            return Image.fromarray(np.ascontiguousarray(crop), "RGB")
    except (ValueError, IndexError):
        pass
    raise ValueError(f"not a builtin item URI: {uri!r}")
