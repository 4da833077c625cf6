"""Paired-condition fixtures from shipped data: scikit-image's sample photos, with label maps made
by thresholding their luma into 3 classes and depth maps made as gradients (all in memory)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from pipeline.data import builtin
from tests.image_fixtures import encoded

CLASSES = 3


def photo(name: str, w: int, h: int) -> Image.Image:
    """scikit-image's photo ``name`` resized to ``w``×``h`` RGB."""
    return Image.fromarray(builtin.load_photo(name), "RGB").resize((w, h),
                                                                   Image.Resampling.BICUBIC)


def label_ids(img: Image.Image) -> np.ndarray:
    """Class ids 0..2 of an image: its luma cut at 85 and 170 (uint8 [H, W])."""
    return np.digitize(np.asarray(img.convert("L")), [85, 170]).astype(np.uint8)


def blocks(ids: np.ndarray, factor: int) -> np.ndarray:
    """Each id repeated over a ``factor``×``factor`` block (an upscaled label map)."""
    return np.kron(ids, np.ones((factor, factor), ids.dtype))


def png_of(arr: np.ndarray, mode: str | None = None) -> bytes:
    return encoded(Image.fromarray(arr, mode) if mode else Image.fromarray(arr), "PNG")


def depth_gradient(w: int, h: int, step: int = 1000) -> np.ndarray:
    """A 16-bit depth map growing by ``step`` per column: uint16 [H, W]."""
    return np.broadcast_to(np.arange(w, dtype=np.uint16) * step, (h, w)).copy()
