"""VQGAN training losses (paper §3.1 eq. 5-7; reference ``VQLPIPSWithDiscriminator``), in the form
the two-optimizer training step needs, with the adaptive weight computed without extra passes.

Generator objective (reference semantics, ``disc_factor`` 0 before ``disc_start``):

    L_G = mean|x - x̂| + perceptual_weight * mean LPIPS(x, x̂)          (= L_rec, "nll")
          + λ * disc_factor * L_GAN(x̂)  +  codebook_weight * L_vq
    λ   = clamp(||∇_W L_rec|| / (||∇_W L_GAN|| + 1e-4), 0, 1e4) * disc_weight,  W = conv_out.weight

The reference obtains the two norms with ``autograd.grad`` through LPIPS's VGG and through D, then
its full backward traverses both again. Here (DESIGN §6b) W is the conv producing x̂ = conv(h, W),
so ∇_W L = conv2d_weight(h, g) with g = ∂L/∂x̂: ``VQGANLoss.generator_loss`` backpropagates L_rec
and L_GAN to x̂ only (one pass through LPIPS, one through D), forms λ from ``h`` and those two
gradients, and returns a surrogate scalar whose gradient w.r.t. x̂ is g_rec + λ·disc_factor·g_gan.
One ``backward`` of the surrogate (plain or ``deepspeed_engine.backward``) then runs the
generator's backward once, exactly as the straightforward ``L_G.backward()`` would.

Discriminator objective: ``disc_factor * hinge(D(x), D(sg(x̂)))`` on the generator step's
reconstruction (no second autoencoder or LPIPS forward); skipped entirely before ``disc_start``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .discriminator import d_loss_fn, generator_adversarial_loss
from .lpips import LPIPS


@dataclass
class VQGANLossConfig:
    """Weights of the generator and discriminator objectives (reference names in comments)."""

    # Defaults of the reference's custom_vqgan.yaml: the GAN terms from step 10,000, λ × 0.8.
    disc_start: int = 10000  # discriminator_iter_start: first step with the GAN terms on
    codebook_weight: float = 1.0
    perceptual_weight: float = 1.0
    disc_weight: float = 0.8  # discriminator_weight, multiplies λ
    disc_factor: float = 1.0
    disc_loss: str = "hinge"  # "hinge" | "vanilla"
    # The reconstruction term: "l1" (|x - x̂|, images and one-channel maps) or "bce" (binary
    # cross-entropy of x̂ as per-class logits against a one-hot x: the reference's segmentation
    # VQGAN, BCELossWithQuant; no LPIPS, no GAN there).
    # In stage fingerprints only when not l1 (pipeline.config.fingerprint_unless_default, spelt
    # out here: the models import nothing of the pipeline), so existing runs keep theirs.
    rec_loss: str = field(default="l1", metadata={"fingerprint": "unless_default"})

    def validate(self) -> None:
        d_loss_fn(self.disc_loss)
        if self.rec_loss not in ("l1", "bce"):
            raise ValueError(f"rec_loss: must be l1 or bce, got {self.rec_loss!r}")
        if self.rec_loss == "bce" and self.perceptual_weight > 0:
            raise ValueError("perceptual_weight: must be 0 with rec_loss bce (LPIPS compares "
                             "RGB images, not class logits)")
        if self.disc_start < 0:
            raise ValueError(f"disc_start: must be >= 0, got {self.disc_start}")
        for name in ("codebook_weight", "perceptual_weight", "disc_weight", "disc_factor"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """``value`` before ``threshold`` steps, ``weight`` from then on (the GAN warm-up switch)."""
    return value if global_step < threshold else weight


def reconstruction_loss(
    x: Tensor, recon: Tensor, lpips: LPIPS | None, perceptual_weight: float,
    kind: str = "l1",
) -> tuple[Tensor, Tensor, Tensor]:
    """(L_rec, mean L1, mean LPIPS): L_rec = mean|x - x̂| + perceptual_weight * mean LPIPS(x, x̂).

    Equal to the reference's ``mean(|x - x̂| + w * p)`` with p broadcast per image. The reference
    has a ``pixelloss_weight`` that it never applies; so neither do we. ``kind="bce"``: L_rec
    is the mean binary cross-entropy of the logits x̂ against the one-hot x (in the L1 slot
    too; no LPIPS).
    """
    if kind == "bce":
        bce = nn.functional.binary_cross_entropy_with_logits(recon, x.to(recon.dtype))
        return bce, bce, bce.new_zeros(())
    l1 = (x - recon).abs().mean()
    if lpips is not None and perceptual_weight > 0:
        p = lpips(x, recon).mean()
        return l1 + perceptual_weight * p, l1, p
    return l1, l1, l1.new_zeros(())


def _clamped_ratio(rec_norm: Tensor, gan_norm: Tensor, disc_weight: float) -> Tensor:
    return (rec_norm / (gan_norm + 1e-4)).clamp(0.0, 1e4).detach() * disc_weight


def adaptive_weight_autograd(
    rec_loss: Tensor, gan_loss: Tensor, last_layer: Tensor, disc_weight: float = 1.0
) -> Tensor:
    """λ the reference's way: two ``autograd.grad`` calls to ``last_layer`` (graph retained).
    Kept as the specification the fast path is tested against."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan_loss, last_layer, retain_graph=True)[0]
    return _clamped_ratio(g_rec.norm(), g_gan.norm(), disc_weight)


def last_layer_grad(last_input: Tensor, weight: Tensor, grad_output: Tensor,
                    padding: int = 1) -> Tensor:
    """∂L/∂W of a stride-1 conv y = conv2d(h, W, padding), given h and ∂L/∂y."""
    return torch.nn.grad.conv2d_weight(
        last_input, weight.shape, grad_output.to(last_input.dtype), padding=padding
    )


def adaptive_weight_from_output_grads(
    last_input: Tensor, weight: Tensor, g_rec: Tensor, g_gan: Tensor,
    disc_weight: float = 1.0, padding: int = 1,
) -> Tensor:
    """λ from the gradients at the decoder output: ∇_W L = conv2d_weight(h, ∂L/∂x̂).

    last_input h: [B, C, H, W] input of conv_out; weight: conv_out.weight [3, C, 3, 3];
    g_rec, g_gan: [B, 3, H, W] gradients of L_rec and L_GAN at x̂. Returns a detached scalar.
    """
    with torch.no_grad():
        h = last_input.detach()
        dtype = torch.promote_types(h.dtype, torch.float32)  # norms in >= fp32 (bf16 runs)
        rec = last_layer_grad(h, weight, g_rec, padding).to(dtype).norm()
        gan = last_layer_grad(h, weight, g_gan, padding).to(dtype).norm()
        return _clamped_ratio(rec, gan, disc_weight)


class GeneratorLoss(NamedTuple):
    """``backward_loss``: call ``.backward()`` (or ``engine.backward``) on it, nothing else; its
    value is not meaningful, its gradient is that of ``total``. Other fields are detached logs."""

    backward_loss: Tensor
    total: Tensor
    rec_loss: Tensor  # L_rec ("nll_loss")
    l1_loss: Tensor
    p_loss: Tensor
    g_loss: Tensor
    quant_loss: Tensor
    d_weight: Tensor  # λ
    disc_factor: float


class DiscriminatorLoss(NamedTuple):
    loss: Tensor  # differentiable w.r.t. D's parameters
    logits_real: Tensor  # detached means, for logging
    logits_fake: Tensor


class VQGANLoss(nn.Module):
    """Holds the loss config and the frozen LPIPS; the discriminator is passed in per call
    because it is trained by its own optimizer / DeepSpeed engine."""

    def __init__(self, config: VQGANLossConfig, lpips: LPIPS | None) -> None:
        super().__init__()
        config.validate()
        if lpips is None and config.perceptual_weight > 0:
            raise ValueError("perceptual_weight > 0 needs an LPIPS module")
        self.config = config
        self.lpips = lpips

    def disc_factor(self, global_step: int) -> float:
        return adopt_weight(self.config.disc_factor, global_step, self.config.disc_start)

    def generator_loss(
        self,
        x: Tensor,
        recon: Tensor,
        last_input: Tensor,
        last_layer: Tensor,
        quant_loss: Tensor,
        discriminator: nn.Module | None,
        global_step: int,
    ) -> GeneratorLoss:
        """The generator objective with the one-backward adaptive weight (module docstring).

        recon = conv2d(last_input, last_layer, padding=1) + bias must hold (``VQGAN.forward(x,
        return_last_input=True)`` gives both). ``discriminator`` may be None before
        ``disc_start``; its parameters should be frozen (see ``set_requires_grad``): only the
        gradient w.r.t. its input is computed here. The returned ``backward_loss`` carries the
        whole generator gradient, including the codebook term.
        """
        cfg = self.config
        r = recon.detach().requires_grad_(True)
        rec, l1, p = reconstruction_loss(x, r, self.lpips, cfg.perceptual_weight, cfg.rec_loss)
        (g_rec,) = torch.autograd.grad(rec, r)
        factor = self.disc_factor(global_step)
        zero = rec.new_zeros(())
        g_loss, d_weight, grad = zero, zero, g_rec
        if factor > 0.0:
            if discriminator is None:
                raise ValueError(f"step {global_step} >= disc_start needs the discriminator")
            g_loss = generator_adversarial_loss(discriminator(r))
            (g_gan,) = torch.autograd.grad(g_loss, r)
            d_weight = adaptive_weight_from_output_grads(
                last_input, last_layer, g_rec, g_gan, cfg.disc_weight
            )
            grad = g_rec + (d_weight * factor) * g_gan
        # d(surrogate)/d(recon) = grad: one backward through the generator does everything.
        backward_loss = (recon * grad.detach().to(recon.dtype)).sum() \
            + cfg.codebook_weight * quant_loss
        total = rec + d_weight * factor * g_loss + cfg.codebook_weight * quant_loss
        return GeneratorLoss(
            backward_loss=backward_loss,
            total=total.detach(),
            rec_loss=rec.detach(),
            l1_loss=l1.detach(),
            p_loss=p.detach(),
            g_loss=g_loss.detach(),
            quant_loss=quant_loss.detach(),
            d_weight=d_weight.detach(),
            disc_factor=factor,
        )

    def generator_loss_reference(
        self,
        x: Tensor,
        recon: Tensor,
        last_layer: Tensor,
        quant_loss: Tensor,
        discriminator: nn.Module | None,
        global_step: int,
    ) -> tuple[Tensor, Tensor]:
        """(L_G, λ) computed the reference's way: a differentiable total for ``.backward()``.
        Slower (LPIPS and D backpropagated twice); kept for tests and as a fallback."""
        cfg = self.config
        rec, _, _ = reconstruction_loss(x, recon, self.lpips, cfg.perceptual_weight, cfg.rec_loss)
        factor = self.disc_factor(global_step)
        if factor > 0.0 and discriminator is not None:
            g_loss = generator_adversarial_loss(discriminator(recon))
            d_weight = adaptive_weight_autograd(rec, g_loss, last_layer, cfg.disc_weight)
        else:
            g_loss = d_weight = rec.new_zeros(())
        return rec + d_weight * factor * g_loss + cfg.codebook_weight * quant_loss, d_weight

    def discriminator_loss(
        self, x: Tensor, recon: Tensor, discriminator: nn.Module, global_step: int
    ) -> DiscriminatorLoss | None:
        """disc_factor * D-loss(D(x), D(sg(x̂))); None before ``disc_start`` (skip the D step).

        Real and fake go through D separately, as in the reference: D's BatchNorm normalises
        each with its own batch statistics.
        """
        factor = self.disc_factor(global_step)
        if factor <= 0.0:
            return None
        logits_real = discriminator(x.detach())
        logits_fake = discriminator(recon.detach())
        loss = factor * d_loss_fn(self.config.disc_loss)(logits_real, logits_fake)
        return DiscriminatorLoss(loss, logits_real.detach().mean(), logits_fake.detach().mean())

