"""Image metrics and picture helpers (torch + PIL only).

Images are float tensors in [-1, 1], shape [B, 3, H, W], unless stated otherwise.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] → [0, 1], clamped."""
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB on the [0, 1] scale; [B]."""
    mse = (to_unit(x) - to_unit(y)).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Wang et al. 2004, Gaussian window, per channel then averaged); [B].

    The window shrinks (odd, >= 3) for images smaller than ``window``.
    """
    a, b = to_unit(x), to_unit(y)
    size = min(window, a.shape[-1], a.shape[-2])
    size = max(3, size - (1 - size % 2))
    channels = a.shape[1]
    w = _gaussian_window(size, sigma).to(a).expand(channels, 1, size, size)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, w, groups=channels)

    c1, c2 = 0.01**2, 0.03**2
    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return (num / den).flatten(1).mean(1)


def edge_f1(true_edges: torch.Tensor, images: torch.Tensor, sigma: float,
            tolerance: int = 1) -> dict[str, float]:
    """How well ``images`` [B, 3, H, W] follow the edge maps ``true_edges`` [B, 1, H, W] (in
    [-1, 1]: edge > 0, as the condition VQGAN reads stored Canny maps): the images' own Canny
    edges (:func:`pipeline.data.conditions.canny_edges`, the shard stage's detector at its
    ``sigma``, on their luma) against the maps, an edge pixel matching when the other map has
    one within ``tolerance`` px (Chebyshev). Counts are pooled over the batch: precision =
    matched image edges / image edges, recall = matched map edges / map edges, F1 their harmonic
    mean (0 when either has no edges)."""
    from pipeline.data.conditions import canny_edges

    if true_edges.shape[0] != images.shape[0] or true_edges.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"edge_f1: maps {list(true_edges.shape)} and images "
                         f"{list(images.shape)} differ in count or size")
    gray = to_unit(images).mul(torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1)
    gray8 = (gray * 255.0).round().to(torch.uint8).numpy()
    found = torch.from_numpy(np.stack([canny_edges(g, sigma) > 0 for g in gray8])).float()
    truth = (true_edges[:, 0] > 0).float().cpu()
    k = 2 * tolerance + 1

    def near(edges: torch.Tensor) -> torch.Tensor:  # within `tolerance` px of an edge
        return F.max_pool2d(edges[:, None], k, stride=1, padding=tolerance)[:, 0]

    hits_found = float((found * near(truth)).sum())
    hits_truth = float((truth * near(found)).sum())
    precision = hits_found / max(float(found.sum()), 1.0)
    recall = hits_truth / max(float(truth.sum()), 1.0)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"f1": f1, "precision": precision, "recall": recall, "images": int(images.shape[0])}


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] → [B, H, W, 3] uint8."""
    return (to_unit(x) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def grid(images: np.ndarray, cols: int, pad: int = 2, fill: int = 255) -> np.ndarray:
    """Tile [N, H, W, 3] uint8 images into one [rows·(H+pad)+pad, cols·(W+pad)+pad, 3] image."""
    n, h, w, c = images.shape
    rows = max(1, -(-n // cols))
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), fill, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + q * (w + pad)
        out[top:top + h, left:left + w] = images[i]
    return out


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement so tiny images stay visible in a PNG viewer."""
    return image.repeat(factor, axis=0).repeat(factor, axis=1) if factor > 1 else image


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def pairs_grid(inputs: torch.Tensor, recons: torch.Tensor, cols: int = 8) -> np.ndarray:
    """Input | reconstruction pairs side by side: rows of ``cols`` pairs."""
    a, b = to_uint8(inputs), to_uint8(recons)
    pairs = np.concatenate([a, b], axis=2)  # [N, H, 2W, 3]
    return grid(pairs, cols)
