"""Paired conditions (paper §4): one condition map per image, stored in its shard sample.

A conditioned shard sample holds, next to its image, ``{key}.cond.png``: a square PNG aligned
with the stored image. What it holds depends on the kind (``shard.condition.kind``):

=================  ======  ====================  =========  ==============================
kind               given   stored PNG            side       read by :func:`condition_array`
=================  ======  ====================  =========  ==============================
``segmentation``   yes     8-bit L, class ids    resolution int64 ``[H, W]`` (0..classes-1)
``depth``          yes     16-bit I;16           resolution float32 ``[1, H, W]`` in [0, 1]
``canny``          no      8-bit L, 0 / 255      resolution float32 ``[1, H, W]`` in {0, 1}
``grayscale``      no      8-bit L               resolution float32 ``[1, H, W]`` in [0, 1]
``downsample:N``   no      8-bit RGB             res / N    float32 ``[3, h, w]`` in [-1, 1]
=================  ======  ====================  =========  ==============================

Given conditions are files paired with each image (:func:`pair_folder`, or a file list's
column); they get the image's geometry — shorter side scaled to ``resolution``, center square
kept (:func:`pipeline.data.images.resize_center_crop`) — with ``NEAREST`` resampling for label
maps (class ids are never blended) and ``BILINEAR`` for depth (antialiased when shrinking).
Derived conditions are computed from the image's square before it is encoded (no JPEG
artifacts in the edges). Everything here is deterministic for a given Pillow / scikit-image.

A pair that cannot be used raises :class:`ConditionRejected` with one of
:data:`CONDITION_REASONS`; the shard stage skips the input with that reason, as it skips bad
images.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from pipeline.data.images import ImageRejected, ImageSpec, decode, encode, resize_center_crop

if TYPE_CHECKING:
    import torch

    from pipeline.data.sources import Item

COND = "cond.png"  # the WebDataset member suffix: ``{key}.cond.png``

GIVEN = ("segmentation", "depth")  # read from files paired with the images
DERIVED = ("canny", "grayscale", "downsample")  # computed from the image itself
NONE = "none"
KIND_HELP = "none, segmentation, depth, canny, grayscale or downsample:N"

# Why an input with an unusable condition was skipped (written to skipped.jsonl, counted).
CONDITION_MISSING = "condition_missing"
CONDITION_UNREADABLE = "condition_unreadable"
CONDITION_SIZE_MISMATCH = "condition_size_mismatch"
CONDITION_KIND_MISMATCH = "condition_kind_mismatch"
CONDITION_REASONS = (CONDITION_MISSING, CONDITION_UNREADABLE, CONDITION_SIZE_MISMATCH,
                     CONDITION_KIND_MISMATCH)

COLUMN_PREFIX = "column:"  # condition.source = column:NAME: a file list's column of paths
MAX_CLASSES = 256  # label maps are stored as 8-bit PNGs
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}
_SEGMENTATION_MODES = {"1", "L", "P", "I", *_SIXTEEN_BIT}  # integer, one channel
_DEPTH_MODES = {"L", "I", *_SIXTEEN_BIT}
_LOSSY_FORMATS = {"JPEG", "MPO"}  # class ids / depth values would carry compression noise
# When a condition folder holds several files for one image (a/b.png, a/b.jpg): png wins, then
# the alphabetically first extension, so the pairing never depends on the listing order.
_PREFERRED_EXT = "png"


class ConditionRejected(Exception):
    """A pair that cannot become a sample; ``reason`` is one of :data:`CONDITION_REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


ENCODED = ("segmentation", "depth", "canny", "grayscale")  # kinds with a condition VQGAN


def no_encoder_reason(kind: str) -> str | None:
    """Why a run whose ``shard.condition.kind`` is ``kind`` has no condition VQGAN (None: it
    has one): no condition, or a low-resolution image that the image VQGAN itself encodes."""
    base, _ = parse_kind(kind)
    if base == NONE:
        return "shard.condition.kind is none"
    if base not in ENCODED:
        return f"shard.condition.kind {kind}: the image VQGAN encodes those maps"
    return None


def parse_kind(kind: str) -> tuple[str, int]:
    """``shard.condition.kind`` → (base kind, downsample factor; 1 for other kinds).

    Raises ValueError for an unknown kind or a malformed / < 2 factor.
    """
    base, sep, arg = kind.partition(":")
    if base == "downsample":
        if not sep or not arg.isdigit() or int(arg) < 2:
            raise ValueError(f"downsample needs an integer factor >= 2 (downsample:4), got "
                             f"{kind!r}")
        return base, int(arg)
    if sep or base not in (NONE, *GIVEN, *DERIVED):
        raise ValueError(f"must be one of {KIND_HELP}, got {kind!r}")
    return base, 1


@dataclass(frozen=True)
class ConditionSpec:
    """What every stored condition of a run is (built from ``shard.condition``).

    ``kind``: a base kind of :data:`GIVEN` or :data:`DERIVED`; ``factor``: downsample's N
    (dividing ``resolution``); ``classes``: segmentation's class count; ``sigma``: canny's
    Gaussian; ``max_pixels``: larger condition files are unreadable (decompression bombs).
    """

    kind: str
    resolution: int
    factor: int = 1
    classes: int = 0
    sigma: float = 1.0
    max_pixels: int = 100_000_000

    @property
    def given(self) -> bool:
        return self.kind in GIVEN

    @property
    def side(self) -> int:
        """Side of the stored square, in pixels."""
        return self.resolution // self.factor

    @property
    def channels(self) -> int:
        return 3 if self.kind == "downsample" else 1

    @property
    def bit_depth(self) -> int:
        return 16 if self.kind == "depth" else 8

    @property
    def resample(self) -> str:
        """How the stored map reached its size (none: computed at the image's size)."""
        return {"segmentation": "nearest", "depth": "bilinear",
                "downsample": "bicubic"}.get(self.kind, "none")


# -- pairing (driver) -------------------------------------------------------------------------


def _stem(rel: str) -> str:
    """A relative path without its extension (``a/b.jpg`` → ``a/b``)."""
    folder, _, base = rel.rpartition("/")
    stem = base.rsplit(".", 1)[0] if "." in base else base
    return f"{folder}/{stem}" if folder else stem


def _ext_rank(rel: str) -> tuple[bool, str]:
    ext = rel.rsplit(".", 1)[-1].lower()
    return ext != _PREFERRED_EXT, ext


def condition_index(cond_root: str, files: Iterable[str], image_exts: Iterable[str]
                    ) -> dict[str, str]:
    """Relative stem → URI of the condition files below ``cond_root`` (image extensions only,
    hidden entries ignored; several extensions for one stem: png first, then alphabetical)."""
    root = cond_root.rstrip("/")
    exts = {e.lower() for e in image_exts}
    best: dict[str, tuple[tuple[bool, str], str]] = {}
    for uri in files:
        rel = uri[len(root):].lstrip("/")
        parts = rel.split("/")
        if any(p.startswith(".") for p in parts) or "." not in parts[-1]:
            continue
        if parts[-1].rsplit(".", 1)[1].lower() not in exts:
            continue
        rank = _ext_rank(rel)
        stem = _stem(rel)
        if stem not in best or rank < best[stem][0]:
            best[stem] = (rank, uri)
    return {stem: uri for stem, (_, uri) in best.items()}


def missing_record(item: Item, detail: str) -> dict[str, Any]:
    """A listing-time skip record (the format of ``Listing.rejected``) for an unpaired input."""
    return {"key": item.key, "source": item.uri, "reason": CONDITION_MISSING, "detail": detail}


def pair_folder(items: list[Item], image_root: str, cond_root: str, index: dict[str, str]
                ) -> tuple[list[Item], list[dict[str, Any]]]:
    """Each item under ``image_root`` paired with the file of the same relative path (any image
    extension) under ``cond_root``: (paired items with ``cond`` set, skip records of the rest).
    """
    root = image_root.rstrip("/")
    paired, missing = [], []
    for it in items:
        stem = _stem(it.uri[len(root):].lstrip("/"))
        uri = index.get(stem)
        if uri is None:
            missing.append(missing_record(it, f"no {stem}.<image ext> in {cond_root}"))
        else:
            paired.append(dataclasses.replace(it, cond=uri))
    return paired, missing


def split_unpaired(items: list[Item], column: str) -> tuple[list[Item], list[dict[str, Any]]]:
    """File-list items whose condition column is empty become skip records."""
    paired = [it for it in items if it.cond]
    missing = [missing_record(it, f"the row's {column!r} column is empty")
               for it in items if not it.cond]
    return paired, missing


# -- making the stored condition (shard task) -------------------------------------------------


def sizes_match(cond: tuple[int, int], image: tuple[int, int]) -> bool:
    """True when a condition of (width, height) ``cond`` covers the image's ``image``: the same
    size, or a scaled copy (e.g. a half-resolution depth map) — the same aspect ratio up to one
    pixel of rounding, so the center crop selects the same content from both."""
    (wc, hc), (wi, hi) = cond, image
    return abs(hc * wi - wc * hi) <= max(wi, hi)


def png(img: Image.Image) -> bytes:
    """Lossless, deterministic PNG of any mode PNG stores (L, RGB, I;16)."""
    return encode(img, "png")


def _decode_given(data: bytes, spec: ConditionSpec) -> tuple[Image.Image, tuple[int, int]]:
    """Decode a condition file fully (EXIF orientation applied, as for images); any failure is
    ``condition_unreadable`` with the image reason in the detail."""
    # No minimum size (a scaled-down map is fine) and no JPEG draft decoding (exact pixels).
    ispec = ImageSpec(resolution=spec.resolution, min_size=1, max_pixels=spec.max_pixels,
                      jpeg_draft=False)
    try:
        return decode(data, ispec)
    except ImageRejected as r:
        raise ConditionRejected(CONDITION_UNREADABLE, f"{r.reason}: {r.detail}") from None


def _check_kind(img: Image.Image, spec: ConditionSpec) -> None:
    modes = _SEGMENTATION_MODES if spec.kind == "segmentation" else _DEPTH_MODES
    what = "a label map" if spec.kind == "segmentation" else "a depth map"
    if img.mode not in modes:
        raise ConditionRejected(CONDITION_KIND_MISMATCH,
                                f"{what} must have one channel of integers; got mode "
                                f"{img.mode} ({', '.join(sorted(modes))} accepted)")
    if img.format in _LOSSY_FORMATS:
        raise ConditionRejected(CONDITION_KIND_MISMATCH,
                                f"{what} must be lossless (PNG); got {img.format}")


def label_map(img: Image.Image, spec: ConditionSpec) -> Image.Image:
    """A decoded label map → resized 8-bit L map of class ids (NEAREST: ids are never blended).

    Palette images give their palette indices. Ids outside 0..classes-1:
    ``condition_kind_mismatch``.
    """
    ids = np.asarray(img).astype(np.int64)
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= spec.classes:
        bad = low if low < 0 else high
        raise ConditionRejected(CONDITION_KIND_MISMATCH,
                                f"class id {bad} outside 0..{spec.classes - 1} "
                                f"(condition.classes = {spec.classes})")
    small = Image.fromarray(ids.astype(np.uint8), "L")
    return resize_center_crop(small, spec.resolution, Image.Resampling.NEAREST)


def depth_map(img: Image.Image, spec: ConditionSpec) -> Image.Image:
    """A decoded depth map → resized 16-bit map. 8-bit input is scaled by 257 (255 → 65535), so
    every stored depth reads back in [0, 1] the same way."""
    values = np.asarray(img).astype(np.float64)
    if img.mode == "L":
        values = values * 257.0
    elif values.min() < 0 or values.max() > 65535:  # mode I: a 32-bit container
        raise ConditionRejected(CONDITION_KIND_MISMATCH,
                                f"depth values {values.min():.0f}..{values.max():.0f} are "
                                f"outside the 16-bit range 0..65535")
    # Resampled as float32 (Pillow's "F" mode), then rounded: no 16-bit clipping artifacts.
    as_float = Image.fromarray(values.astype(np.float32), "F")
    resized = np.asarray(resize_center_crop(as_float, spec.resolution,
                                            Image.Resampling.BILINEAR))
    # uint16 arrays become mode I;16 (Pillow refuses the mode named explicitly).
    return Image.fromarray(np.clip(np.rint(resized), 0, 65535).astype(np.uint16))


def given_condition(data: bytes, image_size: tuple[int, int], spec: ConditionSpec
                    ) -> tuple[bytes, tuple[int, int]]:
    """Bytes of a condition file paired with an image of displayed (width, height)
    ``image_size`` → (stored PNG, the condition's displayed size).

    Raises ConditionRejected: ``condition_unreadable`` (not a decodable image),
    ``condition_kind_mismatch`` (wrong mode, lossy format, values out of range),
    ``condition_size_mismatch`` (see :func:`sizes_match`).
    """
    img, size = _decode_given(data, spec)
    _check_kind(img, spec)
    if not sizes_match(size, image_size):
        raise ConditionRejected(CONDITION_SIZE_MISMATCH,
                                f"condition {size[0]}x{size[1]} does not match the image "
                                f"{image_size[0]}x{image_size[1]} (same size or aspect ratio "
                                f"needed)")
    out = label_map(img, spec) if spec.kind == "segmentation" else depth_map(img, spec)
    return png(out), size


def canny_edges(gray: np.ndarray, sigma: float) -> np.ndarray:
    """Canny edges (scikit-image, default thresholds) of a uint8 [H, W] image: uint8 0 / 255."""
    from skimage.feature import canny

    return canny(gray.astype(np.float64) / 255.0, sigma=sigma).astype(np.uint8) * 255


def derived_condition(square_rgb: Image.Image, spec: ConditionSpec) -> bytes:
    """The stored PNG of a derived condition, from the image's square RGB before encoding."""
    if spec.kind == "grayscale":
        return png(square_rgb.convert("L"))
    if spec.kind == "canny":
        gray = np.asarray(square_rgb.convert("L"))
        return png(Image.fromarray(canny_edges(gray, spec.sigma), "L"))
    if spec.kind == "downsample":
        # Pillow's bicubic shrinks with an antialiasing support: the usual "bicubic ×N" input.
        return png(square_rgb.resize((spec.side, spec.side), Image.Resampling.BICUBIC))
    raise ValueError(f"not a derived condition kind: {spec.kind!r}")


# -- reading (training, tokenize, sampling) ---------------------------------------------------


def _expect_mode(img: Image.Image, modes: set[str], kind: str) -> None:
    if img.mode not in modes:
        raise ValueError(f"a stored {kind} condition is {'/'.join(sorted(modes))}, got mode "
                         f"{img.mode}")


def condition_array(data: bytes, kind: str) -> np.ndarray:
    """A stored ``{key}.cond.png`` → array (``kind``: the manifest's ``condition.kind``, or the
    config string such as ``downsample:4``).

    segmentation: int64 ``[H, W]`` class ids; depth: float32 ``[1, H, W]`` in [0, 1];
    canny / grayscale: float32 ``[1, H, W]`` in [0, 1]; downsample: float32 ``[3, h, w]`` in
    [-1, 1] (the image range of :func:`pipeline.data.loader.to_tensor`). Raises ValueError when
    the PNG is not what ``kind`` stores.
    """
    base, _ = parse_kind(kind)
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        if base == "segmentation":
            _expect_mode(img, {"L"}, base)
            return np.asarray(img).astype(np.int64)
        if base == "depth":
            _expect_mode(img, {"I", *_SIXTEEN_BIT}, base)
            return (np.asarray(img).astype(np.float32) / 65535.0)[None]
        if base in ("canny", "grayscale"):
            _expect_mode(img, {"L"}, base)
            return (np.asarray(img).astype(np.float32) / 255.0)[None]
        if base == "downsample":
            _expect_mode(img, {"RGB"}, base)
            return np.asarray(img).astype(np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    raise ValueError(f"kind {kind!r} stores no condition")


def condition_tensor(data: bytes, kind: str) -> torch.Tensor:
    """:func:`condition_array` as a torch tensor (int64 for label maps, float32 otherwise)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(condition_array(data, kind)))


# -- the condition VQGAN's input (train_cond_vqgan, tokenize) ---------------------------------


def stored_condition(sample: dict[str, Any]) -> bytes:
    """A shard sample's ``{key}.cond.png`` bytes; KeyError naming the sample without one."""
    if COND not in sample:
        raise KeyError(f"sample {sample.get('__key__')} in {sample.get('__url__')} has no "
                       f"condition ({COND}); was it sharded with shard.condition?")
    return sample[COND]


@dataclass(frozen=True)
class ConditionInput:
    """How the condition VQGAN reads a stored condition: ``array`` gives the HWC map that
    :func:`pipeline.data.loader.augment` crops (with the image's crop rule, so a sample's
    condition and image crops line up), ``tensor`` the model input.

    segmentation: one-hot ``[classes, H, W]`` in {0, 1} (the reference's segmentation VQGAN
    input; its output is per-class logits); depth / canny / grayscale: ``[1, H, W]`` in
    [-1, 1]. ``downsample`` has no condition VQGAN: the image VQGAN encodes those maps.
    """

    kind: str  # a base kind (parse_kind), not downsample
    classes: int = 0  # segmentation: the class count (the shard manifest's condition.classes)

    def __post_init__(self) -> None:
        if self.kind not in ("segmentation", "depth", "canny", "grayscale"):
            raise ValueError(f"no condition VQGAN reads {self.kind!r} conditions")
        if self.kind == "segmentation" and not 2 <= self.classes <= MAX_CLASSES:
            raise ValueError(f"segmentation needs 2..{MAX_CLASSES} classes, got {self.classes}")

    @property
    def channels(self) -> int:
        return self.classes if self.kind == "segmentation" else 1

    def array(self, sample: dict[str, Any]) -> np.ndarray:
        """A shard sample's condition as HWC (int64 ids ``[H, W, 1]`` or float32 ``[H, W, 1]``
        in [0, 1]); KeyError naming the sample when it holds none."""
        arr = condition_array(stored_condition(sample), self.kind)
        return arr[..., None] if arr.ndim == 2 else arr.transpose(1, 2, 0)

    def tensor(self, hwc: np.ndarray) -> torch.Tensor:
        """A (cropped, flipped) :meth:`array` → the model input, CHW float32."""
        import torch

        if self.kind == "segmentation":
            ids = torch.from_numpy(np.ascontiguousarray(hwc[..., 0]))
            if int(ids.max()) >= self.classes:
                raise ValueError(f"label map holds class {int(ids.max())}, but the shard "
                                 f"manifest says {self.classes} classes")
            return torch.nn.functional.one_hot(ids, self.classes).permute(2, 0, 1).float()
        x = torch.from_numpy(np.ascontiguousarray(hwc, dtype=np.float32))
        return x.permute(2, 0, 1).mul(2.0).sub(1.0)

    def preview(self, x: torch.Tensor) -> torch.Tensor:
        """Inputs or outputs ``[B, C, H, W]`` as RGB ``[B, 3, H, W]`` in [-1, 1] to look at:
        label maps (one-hot or logits) in :func:`palette` colours of their argmax, one-channel
        maps as gray."""
        if self.kind == "segmentation":
            colours = palette(self.classes).to(x.device)
            return colours[x.argmax(1)].permute(0, 3, 1, 2)
        return x.float().clamp(-1.0, 1.0).expand(-1, 3, -1, -1)


@dataclass(frozen=True)
class LowResInput:
    """How a ``downsample:N`` condition (super-resolution) is encoded: by the image VQGAN
    itself, from the low-resolution image enlarged back to the image's size (bicubic), so its
    codes share the image's grid and codebook. ``array`` gives the stored HWC map in [-1, 1] at
    1/N of the image's size: crop it at ``size // scale`` (``scale`` = N) where the image is
    cropped at ``size``; ``tensor`` enlarges a crop to the model input [3, N·h, N·w]."""

    factor: int

    kind: str = "downsample"
    channels: int = 3

    @property
    def scale(self) -> int:
        return self.factor

    def array(self, sample: dict[str, Any]) -> np.ndarray:
        data = stored_condition(sample)
        return condition_array(data, f"{self.kind}:{self.factor}").transpose(1, 2, 0)

    def tensor(self, hwc: np.ndarray) -> torch.Tensor:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(hwc, dtype=np.float32)).permute(2, 0, 1)
        big = torch.nn.functional.interpolate(x[None], scale_factor=self.factor, mode="bicubic",
                                              align_corners=False)
        return big[0].clamp(-1.0, 1.0)

    def preview(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().clamp(-1.0, 1.0)


def condition_input(kind: str, classes: int = 0) -> ConditionInput | LowResInput:
    """The reader of a condition of ``kind`` (a base kind, or ``downsample:N``)."""
    base, factor = parse_kind(kind)
    return LowResInput(factor) if base == "downsample" else ConditionInput(base, classes)


def palette(classes: int) -> torch.Tensor:
    """``[classes, 3]`` RGB in [-1, 1]: well-separated hues (golden-ratio steps), the same for
    every run, so a class has one colour in every grid and report."""
    import colorsys

    import torch

    rgb = [colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.65, 0.95) for i in range(classes)]
    return torch.tensor(rgb, dtype=torch.float32) * 2.0 - 1.0


__all__ = ["COND", "CONDITION_KIND_MISMATCH", "CONDITION_MISSING", "CONDITION_REASONS",
           "CONDITION_SIZE_MISMATCH", "CONDITION_UNREADABLE", "ENCODED", "ConditionInput",
           "ConditionRejected", "ConditionSpec", "LowResInput", "condition_array",
           "condition_index", "condition_input", "condition_tensor",
           "derived_condition", "given_condition", "no_encoder_reason", "pair_folder", "palette",
           "parse_kind", "sizes_match", "split_unpaired"]
