"""Image decoding, validation, RGB conversion, resize + center crop and encoding (pure functions).

The shard stage and its benchmark baseline both go through :func:`process_image`, so a speed-up
here (e.g. JPEG draft decoding) benefits both sides equally.

Contract of :func:`process_image`: bytes in, encoded ``resolution``×``resolution`` RGB image out,
or :class:`ImageRejected` with one of :data:`REASONS`. Rejections never depend on anything but
the bytes and the :class:`ImageSpec`, so a rerun rejects the same inputs for the same reasons.
"""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

EXTS = ("jpg", "png", "webp")

# Why an input was skipped. "missing"/"unreadable" come from reading the source, the rest from
# the bytes. Kept as plain strings: they are written to skipped.jsonl and counted in manifests.
EMPTY = "empty"
NOT_IMAGE = "not_image"
UNDECODABLE = "undecodable"
TRUNCATED = "truncated"
TOO_SMALL = "too_small"
DECOMPRESSION_BOMB = "decompression_bomb"
MISSING = "missing"
UNREADABLE = "unreadable"
REASONS = (EMPTY, NOT_IMAGE, UNDECODABLE, TRUNCATED, TOO_SMALL, DECOMPRESSION_BOMB, MISSING,
           UNREADABLE)

# EXIF orientations 5..8 are transposes: the displayed image has width and height swapped.
_EXIF_ORIENTATION = 0x0112
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
# Signatures of common non-image files, to tell "this is some other kind of file" from garbage.
_NON_IMAGE_MAGIC = (b"%PDF", b"PK\x03\x04", b"\x1f\x8b", b"ID3", b"\x7fELF", b"{", b"<")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


class ImageRejected(Exception):
    """An input that cannot become a sample; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True)
class ImageSpec:
    """What every output image looks like and what inputs are acceptable.

    ``min_size``: inputs whose shorter side is smaller are rejected (upscaling them more than a
    little makes blurry training data). ``max_pixels``: inputs with more pixels are rejected before
    decoding (decompression bombs); Pillow itself refuses anything above ~179 MP regardless.
    ``jpeg_draft``: let libjpeg decode JPEGs at a reduced scale (1/2, 1/4, 1/8) that is still
    at least ``resolution`` on both sides: several times faster on large photos, near-identical
    output after the final resize.
    """

    resolution: int
    ext: str = "jpg"
    quality: int = 95
    min_size: int = 1
    max_pixels: int = 100_000_000
    jpeg_draft: bool = True


@dataclass(frozen=True)
class Processed:
    """An encoded sample and the size of its source as displayed (after EXIF orientation)."""

    data: bytes
    width: int
    height: int


def _clean(message: str, limit: int = 200) -> str:
    """An exception message without object addresses (skip records must be reproducible)."""
    return _ADDRESS.sub("", message)[:limit]


def looks_like_text(data: bytes) -> bool:
    """True when the first 4 KiB look like text (no NUL, ≥ 95 % printable or whitespace)."""
    head = data[:4096]
    if not head or b"\x00" in head:
        return False
    printable = sum(1 for b in head if 32 <= b < 127 or b in (9, 10, 13) or b >= 128)
    return printable >= 0.95 * len(head)


def _unidentified_reason(data: bytes) -> str:
    if looks_like_text(data) or data.startswith(_NON_IMAGE_MAGIC):
        return NOT_IMAGE
    return UNDECODABLE


def displayed_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as displayed: the stored size with EXIF transposes applied."""
    w, h = img.size
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # a broken EXIF block must not reject an otherwise fine image
        orientation = None
    return (h, w) if orientation in _SWAPPING_ORIENTATIONS else (w, h)


def open_checked(data: bytes, spec: ImageSpec) -> Image.Image:
    """Identify ``data`` (header only) and check its size, before any pixel is decoded.

    Raises ImageRejected: ``empty``, ``not_image``, ``undecodable``, ``decompression_bomb``,
    ``too_small``.
    """
    if not data:
        raise ImageRejected(EMPTY, "0 bytes")
    try:
        with warnings.catch_warnings():
            # We enforce our own limit below; Pillow's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageRejected(DECOMPRESSION_BOMB, _clean(str(e))) from None
    except Image.UnidentifiedImageError:
        reason = _unidentified_reason(data)
        raise ImageRejected(reason, f"no image format recognised in {len(data)} bytes") from None
    except Exception as e:  # a recognised header that Pillow cannot parse
        raise ImageRejected(UNDECODABLE, f"{type(e).__name__}: {_clean(str(e))}") from None
    w, h = img.size
    if w * h > spec.max_pixels:
        raise ImageRejected(DECOMPRESSION_BOMB,
                            f"{w}x{h} = {w * h} pixels > max_pixels {spec.max_pixels}")
    if min(w, h) < spec.min_size:
        raise ImageRejected(TOO_SMALL, f"{w}x{h}: shorter side < min_size {spec.min_size}")
    return img


def decode(data: bytes, spec: ImageSpec) -> tuple[Image.Image, tuple[int, int]]:
    """Decode ``data`` fully, oriented upright; returns (image, displayed size of the source).

    Truncated files are rejected, not padded: Pillow's ``LOAD_TRUNCATED_IMAGES`` is left off
    and ``load()`` is called here. JPEGs may be decoded at a reduced scale (``jpeg_draft``).
    """
    img = open_checked(data, spec)
    size = displayed_size(img)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if spec.jpeg_draft and img.format == "JPEG":
                # Square request: both sides stay >= resolution whatever the orientation.
                img.draft(None, (spec.resolution, spec.resolution))
            img.load()
    except Image.DecompressionBombError as e:
        raise ImageRejected(DECOMPRESSION_BOMB, _clean(str(e))) from None
    except (EOFError, OSError) as e:
        msg = _clean(str(e))
        if isinstance(e, EOFError) or "truncated" in msg.lower():
            raise ImageRejected(TRUNCATED, msg or type(e).__name__) from None
        raise ImageRejected(UNDECODABLE, f"{type(e).__name__}: {msg}") from None
    except Exception as e:
        raise ImageRejected(UNDECODABLE, f"{type(e).__name__}: {_clean(str(e))}") from None
    # Broken EXIF: keep the stored orientation rather than lose the image.
    with contextlib.suppress(Exception):
        ImageOps.exif_transpose(img, in_place=True)
    return img, size


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    """16-bit (or 32-bit integer) grayscale → 8-bit L, scaling the full range (not clipping)."""
    arr = np.asarray(img).astype(np.int64)
    if img.mode == "I":  # 32-bit container; PNG/TIFF data in it is 16-bit
        arr = np.clip(arr, 0, 65535)
    return Image.fromarray(((arr * 255 + 32767) // 65535).astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode → RGB. Transparent pixels are composited on white.

    16-bit grayscale is scaled to 8 bits (Pillow's own conversion clips at 255); CMYK, YCbCr,
    1-bit, L and palette images go through Pillow's conversions.
    """
    if img.mode == "RGB" and not img.has_transparency_data:
        return img
    if img.mode in _SIXTEEN_BIT_MODES:
        img = _sixteen_bit_to_l(img)
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).round().astype(np.uint8), "L")
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def center_box(width: int, height: int) -> tuple[float, float, float, float]:
    """The center square of a ``width``×``height`` image as a (left, top, right, bottom) box in
    its own coordinates (fractional for odd differences)."""
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def resize_center_crop(img: Image.Image, resolution: int,
                       resample: Image.Resampling = Image.Resampling.BICUBIC) -> Image.Image:
    """Scale the shorter side to ``resolution`` and crop the center square, in one resample.

    The crop box is given in source coordinates (``resize(box=...)``), so only the kept square
    is filtered: same result as resize-then-crop up to sub-pixel placement, less work. Images of
    the same aspect ratio get the same relative box, so a paired condition map (resampled with
    ``NEAREST`` for class ids) stays aligned with its image.
    """
    w, h = img.size
    if (w, h) == (resolution, resolution):
        return img
    return img.resize((resolution, resolution), resample, box=center_box(w, h))


def encode(img: Image.Image, ext: str, quality: int = 95) -> bytes:
    """Encode an RGB image as ``jpg``/``png``/``webp``; deterministic for a given Pillow build.

    Metadata (EXIF, ICC profile, text chunks) is not carried over: the image data is the sample.
    """
    img.info = {}
    buf = io.BytesIO()
    if ext == "jpg":
        img.save(buf, "JPEG", quality=quality)
    elif ext == "png":
        img.save(buf, "PNG")
    elif ext == "webp":
        img.save(buf, "WEBP", quality=quality, method=4)
    else:
        raise ValueError(f"unknown image extension {ext!r} (use one of {', '.join(EXTS)})")
    return buf.getvalue()


def square(img: Image.Image, spec: ImageSpec) -> Image.Image:
    """A decoded image of any mode → the ``spec.resolution`` square RGB image, not encoded."""
    return resize_center_crop(to_rgb(img), spec.resolution)


def finish(img: Image.Image, spec: ImageSpec) -> bytes:
    """A decoded image of any mode → encoded ``spec.resolution`` square RGB sample."""
    return encode(square(img, spec), spec.ext, spec.quality)


def decode_square(data: bytes, spec: ImageSpec) -> tuple[Image.Image, tuple[int, int]]:
    """Bytes of an image file → (the square RGB image before encoding, displayed size of the
    source); raises ImageRejected for unusable input. Derived conditions start from the image."""
    img, size = decode(data, spec)
    try:
        return square(img, spec), size
    except (OSError, ValueError) as e:  # a mode Pillow cannot convert
        raise ImageRejected(UNDECODABLE, f"{type(e).__name__}: {_clean(str(e))}") from None


def process_image(data: bytes, spec: ImageSpec) -> Processed:
    """Bytes of an image file → encoded sample; raises ImageRejected for unusable input."""
    img, (w, h) = decode_square(data, spec)
    return Processed(encode(img, spec.ext, spec.quality), w, h)
