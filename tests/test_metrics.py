"""Image metrics against closed forms and invariants."""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.metrics import grid, pairs_grid, psnr, ssim


def test_psnr_closed_form():
    x = torch.zeros(2, 3, 8, 8)
    y = x + 0.2  # 0.1 on the [0, 1] scale → MSE 0.01 → 20 dB
    assert torch.allclose(psnr(x, y), torch.full((2,), 20.0), atol=1e-4)
    assert psnr(x, x).min() > 90


def test_ssim_bounds_and_order():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-5)
    small = ssim(x, (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(-1, 1))
    large = ssim(x, (x + 0.5 * torch.randn(x.shape, generator=g)).clamp(-1, 1))
    assert (small > large).all() and (large > -1).all() and (small < 1).all()
    assert ssim(x[:, :, :5, :5], x[:, :, :5, :5]).shape == (2,)  # tiny images: window shrinks


def test_grids():
    imgs = np.zeros((5, 4, 4, 3), dtype=np.uint8)
    out = grid(imgs, cols=2, pad=1)
    assert out.shape == (3 * 5 + 1, 2 * 5 + 1, 3)
    pg = pairs_grid(torch.zeros(3, 3, 4, 4), torch.ones(3, 3, 4, 4), cols=3)
    assert pg.shape == (4 + 4, 3 * (8 + 2) + 2, 3)
    assert math.isclose(pg[2:6, 2:6].mean(), 128, abs_tol=1) and pg[2:6, 6:10].min() == 255
