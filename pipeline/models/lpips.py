"""LPIPS perceptual distance with a VGG16 backbone (Zhang et al. 2018; reference
``taming/modules/losses/lpips.py``).

    d(x, y) = sum_l mean_hw( w_l · (n(f_l(x)) - n(f_l(y)))² )

f_l: VGG16 activations relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of the scaled input; n: unit
norm over channels; w_l: learned non-negative 1x1 "linear heads" (64, 128, 256, 512, 512 channels).

Nothing is downloaded here. Weights come from the caller as state dicts (the train_vqgan stage
finds them with ``pipeline.lpips_weights``: URIs, the lpips wheel's heads, the torch hub cache):

- ``backbone="vgg16"``: call :meth:`LPIPS.load_weights` (a torchvision ``vgg16`` state dict and
  the LPIPS heads) or :meth:`LPIPS.load_state_dict` / :meth:`LPIPS.from_state_dict` with a combined
  dict, in our key format or the reference's ``vgg.pth`` format (``net.slice1.0.weight``,
  ``lin0.model.1.weight``). ``forward`` refuses to run before both parts are loaded.
- ``backbone="random"``: random VGG weights and heads of ones (the LPIPS paper's unlearned
  "baseline" weighting), for offline demos and tests. It logs a loud warning: the perceptual loss
  is then NOT the paper's.

The module is always frozen and in eval mode (the reference's VQModel.train() switches LPIPS's
dropout on during training; here ``train()`` is a no-op).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

# torchvision's vgg16().features up to relu5_3: ints are 3x3 conv widths (each followed by a
# ReLU), "M" a 2x2 max-pool. Module indices match torchvision's, so its keys load unchanged.
VGG16_LAYOUT: list[int | str] = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                 512, 512, 512, "M", 512, 512, 512]
VGG16_TAPS = (3, 8, 15, 22, 29)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
# The reference's ScalingLayer: maps [-1, 1] images onto ImageNet-normalised statistics.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
BACKBONES = ("vgg16", "random")


@dataclass
class LPIPSConfig:
    backbone: str = "vgg16"

    def validate(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone: must be one of {BACKBONES}, got {self.backbone!r}")


class VGG16Features(nn.Module):
    """VGG16 conv stack; [B, 3, H, W] -> the five LPIPS taps, [B, C_l, H/2^l, W/2^l]."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for item in VGG16_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(c_in, int(item), kernel_size=3, padding=1),
                           nn.ReLU(inplace=True)]
                c_in = int(item)
        self.features = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> list[Tensor]:
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in VGG16_TAPS:
                taps.append(x)
        return taps


def normalize_tensor(x: Tensor, eps: float = 1e-10) -> Tensor:
    """Unit-normalise over the channel dimension (dim 1)."""
    return x / (torch.sqrt(torch.sum(x * x, dim=1, keepdim=True)) + eps)


def spatial_average(x: Tensor, keepdim: bool = True) -> Tensor:
    return x.mean(dim=(2, 3), keepdim=keepdim)


_REF_SLICE = re.compile(r"^net\.slice\d\.(\d+)\.(weight|bias)$")
_REF_LIN = re.compile(r"^lin(\d)\.model\.\d+\.weight$")


def convert_reference_lpips_state_dict(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map an LPIPS state dict onto our keys; accepts the reference's ``vgg.pth`` format, a
    taming checkpoint's ``loss.perceptual_loss.*`` subset, or ours (returned as is).

    ``net.sliceS.N.weight`` -> ``net.features.N.weight`` (the reference keeps torchvision's
    global index N inside each slice); ``linI.model.1.weight`` -> ``linI.weight`` (index 0 is the
    dropout); ``scaling_layer.*`` is dropped (constants, :data:`SHIFT`/:data:`SCALE`).
    """
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        key = key.removeprefix("loss.perceptual_loss.").removeprefix("perceptual_loss.")
        if key.startswith("scaling_layer."):
            continue
        if m := _REF_SLICE.match(key):
            key = f"net.features.{m.group(1)}.{m.group(2)}"
        elif m := _REF_LIN.match(key):
            key = f"lin{m.group(1)}.weight"
        out[key] = value
    return out


class LPIPS(nn.Module):
    """Frozen perceptual distance. ``forward(x, y)`` -> [B, 1, 1, 1], inputs in [-1, 1]."""

    def __init__(self, backbone: str = "vgg16") -> None:
        super().__init__()
        LPIPSConfig(backbone).validate()
        self.backbone = backbone
        self.net = VGG16Features()
        for i, c in enumerate(LPIPS_CHANNELS):
            setattr(self, f"lin{i}", nn.Conv2d(c, 1, kernel_size=1, bias=False))
        # Constants, not state: kept out of the state dict.
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self._vgg_loaded = self._lin_loaded = False
        if backbone == "random":
            logger.warning(
                "LPIPS backbone is 'random': VGG16 weights are random and the linear heads are "
                "all ones. The perceptual loss is NOT the paper's LPIPS; use this only for "
                "offline demos and tests, and give pretrained VGG16/LPIPS weights for real runs."
            )
            for lin in self.lins:
                nn.init.ones_(lin.weight)
            self._vgg_loaded = self._lin_loaded = True
        self.requires_grad_(False)
        super().train(False)

    @classmethod
    def from_config(cls, config: LPIPSConfig) -> LPIPS:
        return cls(config.backbone)

    @property
    def lins(self) -> list[nn.Conv2d]:
        return [getattr(self, f"lin{i}") for i in range(len(LPIPS_CHANNELS))]

    @property
    def weights_loaded(self) -> bool:
        return self._vgg_loaded and self._lin_loaded

    def train(self, mode: bool = True) -> LPIPS:
        """Always eval: no dropout, and nothing in LPIPS should ever change during training."""
        return super().train(False)

    # -- loading ---------------------------------------------------------------------------

    def load_weights(
        self,
        vgg_sd: Mapping[str, Tensor] | None = None,
        lin_sd: Mapping[str, Tensor] | None = None,
    ) -> LPIPS:
        """Load a torchvision ``vgg16`` state dict (``features.N.*``; ``classifier.*`` ignored)
        and/or the LPIPS heads (``linI.weight`` or the reference's ``linI.model.1.weight``)."""
        if vgg_sd is not None:
            feats = {k: v for k, v in vgg_sd.items() if k.startswith("features.")}
            self.net.load_state_dict(feats, strict=True)
            self._vgg_loaded = True
        if lin_sd is not None:
            lins = {k: v for k, v in convert_reference_lpips_state_dict(lin_sd).items()
                    if k.startswith("lin")}
            expected = {f"lin{i}.weight" for i in range(len(LPIPS_CHANNELS))}
            if set(lins) != expected:
                raise ValueError(f"LPIPS heads: expected keys {sorted(expected)}, got "
                                 f"{sorted(lins)}")
            for k, v in lins.items():
                getattr(self, k.split(".")[0]).weight.copy_(v)
            self._lin_loaded = True
        return self

    def load_state_dict(  # type: ignore[override]
        self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False
    ) -> Any:
        """Like ``nn.Module.load_state_dict``, also accepting the reference's key format."""
        result = super().load_state_dict(
            convert_reference_lpips_state_dict(state_dict), strict=strict, assign=assign
        )
        keys = set(convert_reference_lpips_state_dict(state_dict))
        self._vgg_loaded |= any(k.startswith("net.") for k in keys)
        self._lin_loaded |= any(k.startswith("lin") for k in keys)
        self.requires_grad_(False)
        return result

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Tensor]) -> LPIPS:
        """A ``vgg16`` LPIPS with all weights from one combined state dict (ours or reference)."""
        model = cls("vgg16")
        model.load_state_dict(sd, strict=True)
        return model

    # -- forward ---------------------------------------------------------------------------

    def _features(self, x: Tensor) -> list[Tensor]:
        taps = self.net((x - self.shift) / self.scale)
        return [normalize_tensor(t) for t in taps]

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """LPIPS distance per image, [B, 1, 1, 1]; differentiable w.r.t. whichever input needs
        it (features of an input that does not require grad are computed without a graph)."""
        if not self.weights_loaded:
            raise RuntimeError(
                "LPIPS(backbone='vgg16') has no weights: call load_weights(vgg_sd, lin_sd) or "
                "load_state_dict(...) first, or choose backbone='random' for offline demos"
            )
        feats = []
        for t in (x, y):
            with torch.set_grad_enabled(torch.is_grad_enabled() and t.requires_grad):
                feats.append(self._features(t))
        total = x.new_zeros(())
        for fx, fy, lin in zip(feats[0], feats[1], self.lins):
            # The 1x1 head is linear, so averaging over space first is exact and skips a conv
            # over the full-resolution map: mean_hw(w · d) = w · mean_hw(d).
            d = spatial_average((fx - fy) ** 2, keepdim=False)  # [B, C]
            total = total + d @ lin.weight.view(-1, 1)  # [B, 1]
        return total.view(-1, 1, 1, 1)
