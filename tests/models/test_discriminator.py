"""PatchGAN discriminator: layout, init, and the GAN loss values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.models import (
    DiscriminatorConfig,
    NLayerDiscriminator,
    generator_adversarial_loss,
    hinge_d_loss,
    set_requires_grad,
    vanilla_d_loss,
)
from pipeline.models.discriminator import d_loss_fn

pytestmark = pytest.mark.usefixtures("single_thread")


def test_layout_and_output_shape():
    d = NLayerDiscriminator()
    kinds = [type(m).__name__ for m in d.main]
    assert kinds == ["Conv2d", "LeakyReLU", "Conv2d", "BatchNorm2d", "LeakyReLU", "Conv2d",
                     "BatchNorm2d", "LeakyReLU", "Conv2d", "BatchNorm2d", "LeakyReLU", "Conv2d"]
    assert [m.stride[0] for m in d.main if isinstance(m, torch.nn.Conv2d)] == [2, 2, 2, 1, 1]
    assert d.main[0].bias is not None and d.main[2].bias is None and d.main[11].bias is not None
    with torch.device("meta"):
        assert NLayerDiscriminator()(torch.empty(2, 3, 256, 256)).shape == (2, 1, 30, 30)
    small = NLayerDiscriminator(DiscriminatorConfig(ndf=8, n_layers=2))
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 1, 6, 6)


def test_init_statistics():
    d = NLayerDiscriminator()
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in d.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    w = torch.cat([c.weight.detach().flatten() for c in convs])
    assert abs(w.mean()) < 1e-3 and w.std() == pytest.approx(0.02, rel=0.05)
    g = torch.cat([b.weight.detach() for b in bns])
    assert g.mean() == pytest.approx(1.0, abs=0.01) and g.std() == pytest.approx(0.02, rel=0.2)
    assert all(torch.equal(b.bias, torch.zeros_like(b.bias)) for b in bns)


def test_loss_values():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # hinge: relu(1 - real) = (0, .5, 2), mean 5/6; relu(1 + fake) = (0, 1, 2), mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1.0))
    expected = 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected.item())
    # perfect, confident discriminator: hinge 0
    assert hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)).item() == 0.0
    assert generator_adversarial_loss(fake).item() == pytest.approx(1 / 3)
    assert d_loss_fn("hinge") is hinge_d_loss
    with pytest.raises(ValueError, match="unknown GAN loss"):
        d_loss_fn("wgan")


def test_set_requires_grad():
    d = NLayerDiscriminator(DiscriminatorConfig(ndf=8))
    set_requires_grad(d, False)
    assert not any(p.requires_grad for p in d.parameters())
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    d(x).mean().backward()
    assert x.grad is not None and all(p.grad is None for p in d.parameters())
    set_requires_grad(d, True)
    assert all(p.requires_grad for p in d.parameters())
