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


def test_edge_f1_of_real_photos_their_shifts_and_noise():
    """A photo against its own Canny map scores 1; shifted by 1 px (inside the tolerance) it
    still matches; shifted by 4 px, another photo, noise and a flat image do not."""
    from pipeline.data.conditions import canny_edges
    from pipeline.data.loader import to_tensor
    from pipeline.metrics import edge_f1
    from tests.condition_fixtures import photo

    names = ("astronaut", "chelsea", "coffee")
    x = torch.stack([to_tensor(np.asarray(photo(n, 96, 96))) for n in names])
    maps = torch.stack([torch.from_numpy(canny_edges(np.asarray(photo(n, 96, 96).convert("L")),
                                                     2.0)).float()[None] / 127.5 - 1
                        for n in names])
    own = edge_f1(maps, x, 2.0)
    assert own["f1"] > 0.95 and own["images"] == 3  # 1.0: the luma matches PIL's
    assert edge_f1(maps, x.roll(1, 3), 2.0)["f1"] > 0.9  # 0.96
    assert edge_f1(maps, x.roll(4, 3), 2.0)["f1"] < 0.6  # 0.40
    assert edge_f1(maps, x.roll(1, 0), 2.0)["f1"] < 0.6  # another photo's map: 0.39
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert edge_f1(maps, noise, 2.0)["f1"] < 0.5  # 0.26
    assert edge_f1(maps, torch.zeros_like(x), 2.0)["f1"] == 0.0  # a flat image has no edges
