"""PatchGAN discriminator and GAN losses (reference ``taming/modules/discriminator/model.py`` and
``taming/modules/losses/vqperceptual.py``; pix2pix's NLayerDiscriminator).

For the defaults (3 input channels, ndf 64, 3 layers) the discriminator maps [B, 3, 256, 256] to a
[B, 1, 30, 30] map of patch logits (receptive field 70x70) and has 2,765,633 parameters, the
reference's count. Keys are ``main.N.*`` like the reference's ``loss.discriminator.main.N.*``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class DiscriminatorConfig:
    """``input_nc`` image channels, ``ndf`` filters in the first layer, ``n_layers`` stride-2 convs
    (the first one included; the width doubles per layer up to 8 * ndf)."""

    input_nc: int = 3
    ndf: int = 64
    n_layers: int = 3

    def validate(self) -> None:
        for name in ("input_nc", "ndf", "n_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")


def _init_weights(m: nn.Module) -> None:
    """The reference's DCGAN-style init: conv N(0, 0.02); BatchNorm scale N(1, 0.02), shift 0."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


class NLayerDiscriminator(nn.Module):
    """[B, input_nc, H, W] -> [B, 1, H', W'] patch logits (H' = H/2^n_layers - 2).

    4x4 convs, LeakyReLU(0.2), BatchNorm after every conv but the first and the last (those convs
    have no bias since BatchNorm shifts anyway); the last two convs have stride 1.
    """

    def __init__(self, config: DiscriminatorConfig | None = None) -> None:
        super().__init__()
        config = config or DiscriminatorConfig()
        config.validate()
        self.config = config
        ndf = config.ndf
        layers: list[nn.Module] = [
            nn.Conv2d(config.input_nc, ndf, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        mult = 1
        for n in range(1, config.n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < config.n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, kernel_size=4, stride=stride, padding=1,
                          bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


# --- losses -------------------------------------------------------------------------------------


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x̂))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """0.5 * (E[softplus(-D(x))] + E[softplus(D(x̂))]): binary cross-entropy on logits."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def generator_adversarial_loss(logits_fake: Tensor) -> Tensor:
    """-E[D(x̂)]: the reference's generator loss, used with both hinge and vanilla D losses."""
    return -logits_fake.mean()


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def d_loss_fn(name: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The discriminator loss called ``name`` ("hinge" or "vanilla")."""
    try:
        return D_LOSSES[name]
    except KeyError:
        raise ValueError(f"disc_loss: unknown GAN loss {name!r}, expected one of "
                         f"{sorted(D_LOSSES)}") from None


def set_requires_grad(module: nn.Module, flag: bool) -> None:
    """Freeze / unfreeze a module. Freeze D during the generator's backward: its parameter
    gradients are not needed there, and two DeepSpeed engines in one process need it (NOTES)."""
    for p in module.parameters():
        p.requires_grad_(flag)

