"""VQGAN autoencoder (paper §3.1; reference ``taming/models/vqgan.py`` + ``diffusionmodules``).

Bottom-up: normalisation and resampling layers, the ResNet and attention blocks, the encoder and
decoder built from them, and :class:`VQGAN` tying encoder, quantizer and decoder together.

Module and parameter names equal the reference's (``encoder.down.0.block.0.norm1.weight``,
``decoder.up.3.attn.0.q.weight``, ``quantize.embedding.weight``, ...), so the published configs
have the same parameter counts and official checkpoints load after dropping the loss's keys
(:mod:`pipeline.models.convert`).

Shapes for the f16 ImageNet config (ch 128, ch_mult (1,1,2,2,4), resolution 256): x [B,3,256,256]
-> encoder [B,256,16,16] -> quant_conv [B,embed_dim,16,16] -> codes [B,16,16] -> post_quant_conv
[B,256,16,16] -> decoder [B,3,256,256].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .export import Exportable, check_keys
from .quantize import QuantizerConfig, QuantizerOutput, VectorQuantizer

WEIGHTS_NAME = "vqgan.pt"
CONFIG_NAME = "vqgan.json"


@dataclass
class VQGANConfig:
    """Autoencoder + quantizer config; the first block of fields maps 1:1 onto the reference's
    ``ddconfig`` + ``n_embed``/``embed_dim``. Defaults: the paper's f16 ImageNet model."""

    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 2
    attn_resolutions: list[int] = field(default_factory=lambda: [16])
    z_channels: int = 256
    embed_dim: int = 256
    n_embed: int = 1024
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    dropout: float = 0.0
    double_z: bool = False
    # quantizer options, see pipeline.models.quantize. The defaults are our codebook-health
    # recipe, not the reference's (l2_normalize False, codebook_dim None, restart_dead_codes 0:
    # pipeline.models.convert.REFERENCE_QUANTIZER): unit-norm 8-dimensional codes (LlamaGen's
    # lookup) plus dead-code restarts. On the demo the reference's quantizer keeps ~12% of its
    # codes in use, this recipe ~90% at +3 dB PSNR (bench/codebook.py, README "Codebook health").
    beta: float = 0.25
    legacy_beta: bool = False
    use_ema: bool = False
    ema_decay: float = 0.99
    l2_normalize: bool = True
    codebook_dim: int | None = 8
    restart_dead_codes: int = 40

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def latent_size(self, image_size: int | None = None) -> int:
        """Side of the code grid for a square image (default: ``resolution``)."""
        return (image_size or self.resolution) // self.downsample_factor

    def quantizer_config(self) -> QuantizerConfig:
        return QuantizerConfig(
            n_embed=self.n_embed,
            embed_dim=self.embed_dim,
            beta=self.beta,
            legacy_beta=self.legacy_beta,
            use_ema=self.use_ema,
            ema_decay=self.ema_decay,
            l2_normalize=self.l2_normalize,
            codebook_dim=self.codebook_dim,
            restart_dead_codes=self.restart_dead_codes,
        )

    def validate(self) -> None:
        """Raise ``ValueError("field: why")`` for an inconsistent config."""
        for name in ("ch", "num_res_blocks", "z_channels", "resolution", "in_channels", "out_ch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not self.ch_mult or any(m < 1 for m in self.ch_mult):
            raise ValueError(f"ch_mult: must be a non-empty list of positive ints, got "
                             f"{self.ch_mult}")
        widths = [self.ch] + [self.ch * m for m in self.ch_mult]
        if any(w % 32 for w in widths):
            raise ValueError(f"ch, ch_mult: every width ch*m must be divisible by 32 "
                             f"(GroupNorm(32)), got {widths}")
        if self.resolution % self.downsample_factor:
            raise ValueError(f"resolution: must be divisible by {self.downsample_factor}, got "
                             f"{self.resolution}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")
        self.quantizer_config().validate()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VQGANConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise (a typo must not pass silently)."""
        check_keys(cls, data)
        data = dict(data)
        for key in ("ch_mult", "attn_resolutions"):
            if key in data:
                data[key] = list(data[key])
        return cls(**data)


# --- layers -------------------------------------------------------------------------------------


def group_norm(channels: int) -> nn.GroupNorm:
    """The reference's normalisation: GroupNorm(32 groups, eps 1e-6, affine)."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class Downsample(nn.Module):
    """Stride-2 3x3 conv, [B,C,H,W] -> [B,C,H/2,W/2].

    Padding is (0,1,0,1), right/bottom only, as in the reference: a symmetric padding=1 would
    shift every output by half a pixel relative to the pretrained weights.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest 2x upsampling then a 3x3 conv, [B,C,H,W] -> [B,C,2H,2W]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# A faster implementation of ResnetBlock.forward for some calls: ``fast(block, x)`` returns
# ``block(x)`` (the same function, up to float rounding), or None where it does not apply.
BlockForward = Callable[["ResnetBlock", Tensor], "Tensor | None"]


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (GN, swish, conv3x3) x 2 plus a 1x1 shortcut if C changes.

    [B, c_in, H, W] -> [B, c_out, H, W]. No timestep embedding (the reference's temb_ch is 0 in
    the autoencoder), so there is no ``temb_proj``.

    ``fast_forward``: a slot for a faster implementation (:data:`BlockForward`), None by default;
    set on an instance by an accelerator (e.g. :func:`pipeline.kernels.winograd.enable_winograd`).
    :meth:`forward` tries it first and runs its own code where it returns None. It takes the
    block as an argument (not a bound method), so copies and pickles of the block keep working.
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.fast_forward: BlockForward | None = None
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        if self.fast_forward is not None:
            y = self.fast_forward(self, x)
            if y is not None:
                return y
        # Without autograd nothing needs the intermediates: overwrite them in place instead of
        # allocating (CPU inference, e.g. tokenizing, is allocation-bound at high resolution).
        inplace = not torch.is_grad_enabled()
        h = self.conv1(F.silu(self.norm1(x), inplace=inplace))
        h = self.conv2(self.dropout(F.silu(self.norm2(h), inplace=inplace)))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return h.add_(x) if inplace else x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection.

    q, k, v, proj_out are 1x1 convs (the reference's parameter layout, [C, C, 1, 1]); the
    attention itself is ``scaled_dot_product_attention`` (flash / memory-efficient kernels on
    GPU, one fused kernel on CPU) instead of an explicit [HW, HW] softmax.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        # One matmul for q, k and v: the three 1x1 convs are a single linear map over channels.
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        weight = torch.cat([self.q.weight, self.k.weight, self.v.weight]).view(3 * c, c)
        bias = torch.cat([self.q.bias, self.k.bias, self.v.bias])
        q, k, v = F.linear(tokens, weight, bias).unsqueeze(1).chunk(3, dim=-1)  # [B, 1, HW, C]
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # [B, HW, C]
        out = F.linear(out, self.proj_out.weight.view(c, c), self.proj_out.bias)
        out = out.transpose(1, 2).reshape(b, c, h, w)
        return out.add_(x) if not torch.is_grad_enabled() else x + out


class MidBlock(nn.Module):
    """res - attn - res at the lowest resolution."""

    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: ResNet blocks, each followed by attention when ``attn`` is set, and an
    optional resampling layer (``downsample`` in the encoder, ``upsample`` in the decoder)."""

    def __init__(self, widths: list[tuple[int, int]], attn: bool, dropout: float) -> None:
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(i, o, dropout) for i, o in widths)
        self.attn = nn.ModuleList(AttnBlock(o) for _, o in widths) if attn else nn.ModuleList()

    def forward(self, h: Tensor) -> Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


# --- encoder / decoder --------------------------------------------------------------------------


class Encoder(nn.Module):
    """[B, in_channels, R, R] -> [B, z_channels (x2 if double_z), R/f, R/f], f = 2^(levels-1)."""

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        c = config
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, kernel_size=3, padding=1)
        res, block_in = c.resolution, c.ch
        self.down = nn.ModuleList()
        for i, mult in enumerate(c.ch_mult):
            block_out = c.ch * mult
            widths = [(block_in if j == 0 else block_out, block_out)
                      for j in range(c.num_res_blocks)]
            level = Level(widths, attn=res in c.attn_resolutions, dropout=c.dropout)
            if i != len(c.ch_mult) - 1:
                level.downsample = Downsample(block_out)
                res //= 2
            self.down.append(level)
            block_in = block_out
        self.mid = MidBlock(block_in, c.dropout)
        self.norm_out = group_norm(block_in)
        z_out = 2 * c.z_channels if c.double_z else c.z_channels
        self.conv_out = nn.Conv2d(block_in, z_out, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h), inplace=not torch.is_grad_enabled()))


class Decoder(nn.Module):
    """[B, z_channels, R/f, R/f] -> [B, out_ch, R, R]; the mirror of :class:`Encoder` with
    ``num_res_blocks + 1`` blocks per level. ``up[i]`` is level ``i`` (run from last to first)."""

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        c = config
        levels = len(c.ch_mult)
        block_in = c.ch * c.ch_mult[-1]
        res = c.resolution // 2 ** (levels - 1)
        self.conv_in = nn.Conv2d(c.z_channels, block_in, kernel_size=3, padding=1)
        self.mid = MidBlock(block_in, c.dropout)
        up: list[Level] = []
        for i in reversed(range(levels)):
            block_out = c.ch * c.ch_mult[i]
            widths = [(block_in if j == 0 else block_out, block_out)
                      for j in range(c.num_res_blocks + 1)]
            level = Level(widths, attn=res in c.attn_resolutions, dropout=c.dropout)
            if i != 0:
                level.upsample = Upsample(block_out)
                res *= 2
            up.insert(0, level)
            block_in = block_out
        self.up = nn.ModuleList(up)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, c.out_ch, kernel_size=3, padding=1)

    def forward_with_last_input(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """(x̂ [B, out_ch, R, R], h [B, ch*ch_mult[0], R, R]) where x̂ = conv_out(h).

        ``h`` is what the adaptive GAN weight needs: the gradient of a loss w.r.t. conv_out's
        weight is a function of h and of the loss's gradient at x̂ (see ``loss.py``).
        """
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        h = F.silu(self.norm_out(h), inplace=not torch.is_grad_enabled())
        return self.conv_out(h), h

    def forward(self, z: Tensor) -> Tensor:
        return self.forward_with_last_input(z)[0]


# --- the autoencoder ----------------------------------------------------------------------------

EncodeOutput = QuantizerOutput  # z_q, indices [B,h,w], loss, perplexity, usage


class VQGANOutput(NamedTuple):
    """``VQGAN.forward(x)``: ``recon, quant = model(x)``."""

    recon: Tensor
    quant: QuantizerOutput


class VQGANTrainOutput(NamedTuple):
    """``VQGAN.forward(x, return_last_input=True)``: also the decoder's conv_out input."""

    recon: Tensor
    quant: QuantizerOutput
    last_input: Tensor


class VQGAN(Exportable, nn.Module):
    """Encoder -> quant_conv -> VectorQuantizer -> post_quant_conv -> Decoder.

    Images are float tensors in [-1, 1], [B, in_channels, H, W] with H, W multiples of the
    downsampling factor (the network is convolutional; ``resolution`` only places attention).

    For CPU inference (tokenizing, sampling) use ``model.eval().to(memory_format=
    torch.channels_last)``: oneDNN then skips the layout reorders around every convolution
    (~12% faster encoding measured here); training gained nothing from it. Without autograd the
    blocks also update their activations in place.
    """

    weights_name = WEIGHTS_NAME
    config_name = CONFIG_NAME
    config_class = VQGANConfig

    def __init__(self, config: VQGANConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config.quantizer_config())
        z_enc = 2 * config.z_channels if config.double_z else config.z_channels
        self.quant_conv = nn.Conv2d(z_enc, config.embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, kernel_size=1)

    @property
    def last_layer(self) -> Tensor:
        """The decoder's final conv weight, against which the adaptive GAN weight is measured."""
        return self.decoder.conv_out.weight

    def encode(self, x: Tensor) -> EncodeOutput:
        """[B, C, H, W] image -> quantized latents, code indices [B, H/f, W/f] and statistics."""
        h = self.quant_conv(self.encoder(x))
        if torch.is_autocast_enabled(h.device.type):
            # Mixed precision: the codebook lookup leaves autocast and runs in fp32 (bf16
            # distances tie between near codes; a bf16 codebook update loses small steps).
            with torch.autocast(h.device.type, enabled=False):
                return self.quantize(h.float())
        return self.quantize(h)

    def decode(self, z_q: Tensor) -> Tensor:
        """[B, embed_dim, h, w] quantized latents -> [B, out_ch, h*f, w*f] image."""
        return self.decoder(self.post_quant_conv(z_q))

    def decode_indices(self, indices: Tensor) -> Tensor:
        """[B, h, w] code indices -> image; any grid size (the decoder is convolutional)."""
        return self.decode(self.quantize.embed_indices(indices))

    def forward(
        self, x: Tensor, return_last_input: bool = False
    ) -> VQGANOutput | VQGANTrainOutput:
        """Reconstruct ``x``: ``recon, quant = model(x)``.

        With ``return_last_input=True`` it returns :class:`VQGANTrainOutput`, which also carries
        the decoder's conv_out input for ``VQGANLoss.generator_loss``'s one-backward adaptive
        weight (``last_input``).
        """
        quant = self.encode(x)
        recon, last_input = self.decoder.forward_with_last_input(self.post_quant_conv(quant.z_q))
        if return_last_input:
            return VQGANTrainOutput(recon, quant, last_input)
        return VQGANOutput(recon, quant)
