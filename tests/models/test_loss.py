"""VQGAN losses; the one-backward adaptive weight equals the reference's two-autograd.grad one."""

from __future__ import annotations

import copy

import pytest
import torch

from pipeline.models import (
    LPIPS,
    VQGAN,
    DiscriminatorConfig,
    NLayerDiscriminator,
    VQGANLoss,
    VQGANLossConfig,
    adaptive_weight_autograd,
    adaptive_weight_from_output_grads,
    adopt_weight,
    hinge_d_loss,
    set_requires_grad,
)

from .conftest import tiny_config

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def lpips():
    return LPIPS("random")


def setup(lpips, **loss_overrides):
    model = VQGAN(tiny_config())
    disc = NLayerDiscriminator(DiscriminatorConfig(ndf=16, n_layers=2))
    loss = VQGANLoss(VQGANLossConfig(**{"disc_start": 0, **loss_overrides}), lpips)
    return model, disc, loss


def test_adopt_weight():
    assert adopt_weight(1.0, 99, threshold=100) == 0.0
    assert adopt_weight(1.0, 100, threshold=100) == 1.0
    assert adopt_weight(0.5, 3, threshold=10, value=0.1) == 0.1


def test_adaptive_weight_from_output_grads_on_a_conv():
    """||∇_W L|| from (h, ∂L/∂y) equals autograd's, for an arbitrary 3x3 conv and losses."""
    conv = torch.nn.Conv2d(8, 3, 3, padding=1)
    h = torch.randn(2, 8, 6, 6)
    y = conv(h)
    l_a, l_b = (y**2).mean(), (y.sin() * 3).mean()
    expected = adaptive_weight_autograd(l_a, l_b, conv.weight, disc_weight=0.7)
    g_a, g_b = torch.autograd.grad(l_a, y, retain_graph=True)[0], torch.autograd.grad(l_b, y)[0]
    got = adaptive_weight_from_output_grads(h, conv.weight, g_a, g_b, disc_weight=0.7)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


def generator_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(fast, ref, rel):
    """Per-parameter comparison with a tolerance scaled to the largest gradient: several biases
    feed straight into GroupNorm, so their exact gradient is 0 and only rounding noise remains."""
    assert set(fast) == set(ref)
    scale = max(g.abs().max().item() for g in ref.values())
    for name in ref:
        torch.testing.assert_close(fast[name], ref[name], rtol=rel, atol=rel * scale, msg=name)


@pytest.mark.parametrize("dtype, rel, disc_weight", [(torch.float32, 1e-5, 1.0),
                                                     (torch.float64, 1e-10, 0.3)])
def test_fast_generator_loss_equals_reference(images, dtype, rel, disc_weight):
    """λ and every generator gradient of the one-backward path equal the reference's
    (λ from autograd.grad to the last layer, then L_G.backward())."""
    lpips = LPIPS("random").to(dtype)
    model, disc, loss = setup(lpips, disc_weight=disc_weight, codebook_weight=1.5)
    model, disc, images = model.to(dtype), disc.to(dtype), images.to(dtype)
    model_ref, disc_ref = copy.deepcopy(model), copy.deepcopy(disc)

    recon, quant = model_ref(images)
    total_ref, lam_ref = loss.generator_loss_reference(
        images, recon, model_ref.last_layer, quant.loss, disc_ref, global_step=5)
    total_ref.backward()

    set_requires_grad(disc, False)
    out = model(images, return_last_input=True)
    g = loss.generator_loss(images, out.recon, out.last_input, model.last_layer, out.quant.loss,
                            disc, global_step=5)
    g.backward_loss.backward()

    assert lam_ref > 0
    torch.testing.assert_close(g.d_weight, lam_ref, rtol=rel, atol=0)
    torch.testing.assert_close(g.total, total_ref.detach(), rtol=rel, atol=0)
    ref, fast = generator_grads(model_ref), generator_grads(model)
    assert set(ref) == {n for n, _ in model.named_parameters()}
    assert_grads_close(fast, ref, rel)
    assert all(p.grad is None for p in disc.parameters())  # D stayed out of the G backward


def test_before_disc_start_no_discriminator_work(lpips, images):
    model, disc, loss = setup(lpips, disc_start=10)
    model_ref = copy.deepcopy(model)
    out = model(images, return_last_input=True)
    g = loss.generator_loss(images, out.recon, out.last_input, model.last_layer, out.quant.loss,
                            discriminator=None, global_step=9)
    assert g.disc_factor == 0.0 and g.d_weight.item() == 0.0 and g.g_loss.item() == 0.0
    g.backward_loss.backward()
    recon, quant = model_ref(images)
    total_ref, _ = loss.generator_loss_reference(images, recon, model_ref.last_layer, quant.loss,
                                                 None, global_step=9)
    total_ref.backward()
    torch.testing.assert_close(g.total, total_ref.detach())
    assert_grads_close(generator_grads(model), generator_grads(model_ref), 1e-5)
    assert loss.discriminator_loss(images, out.recon, disc, global_step=9) is None
    with pytest.raises(ValueError, match="needs the discriminator"):
        loss.generator_loss(images, out.recon.detach(), out.last_input, model.last_layer,
                            out.quant.loss, None, global_step=10)


def test_discriminator_loss_reuses_reconstruction(lpips, images):
    model, disc, loss = setup(lpips, disc_factor=0.5)
    recon, _ = model(images)
    d = loss.discriminator_loss(images, recon, disc, global_step=0)
    expected = 0.5 * hinge_d_loss(disc(images), disc(recon.detach()))
    torch.testing.assert_close(d.loss, expected)
    d.loss.backward()
    assert all(p.grad is None for p in model.parameters())  # x̂ is detached
    assert all(p.grad is not None for p in disc.parameters())


def test_reconstruction_terms(lpips, images):
    model, _, loss = setup(lpips, perceptual_weight=0.0)
    recon, quant = model(images)
    out = model(images, return_last_input=True)
    g = VQGANLoss(VQGANLossConfig(perceptual_weight=0.0, disc_start=100), None).generator_loss(
        images, out.recon, out.last_input, model.last_layer, out.quant.loss, None, 0)
    torch.testing.assert_close(g.rec_loss, (images - out.recon).abs().mean())
    assert g.p_loss.item() == 0.0
    with pytest.raises(ValueError, match="LPIPS"):
        VQGANLoss(VQGANLossConfig(perceptual_weight=1.0), None)
    with pytest.raises(ValueError, match="disc_loss"):
        VQGANLoss(VQGANLossConfig(disc_loss="wgan"), lpips)


def test_generator_loss_under_bf16_autocast(lpips, images):
    """The one-backward path works in CPU bf16 autocast (a real speed lever on these CPUs)."""
    model, disc, loss = setup(lpips)
    set_requires_grad(disc, False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images, return_last_input=True)
        g = loss.generator_loss(images, out.recon, out.last_input, model.last_layer,
                                out.quant.loss, disc, global_step=0)
    g.backward_loss.backward()
    assert out.recon.dtype == torch.bfloat16 and torch.isfinite(g.total)
    assert 0 < g.d_weight.item() < 1e4
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
