"""Import official taming-transformers VQGAN checkpoints (``last.ckpt`` of ``VQModel``).

Our module names equal the reference's, so converting is mostly routing keys by prefix:

- ``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``, ``quantize.embedding.*``
  -> the :class:`~pipeline.models.vqgan.VQGAN` state dict, unchanged;
- ``loss.discriminator.*`` -> the :class:`~pipeline.models.discriminator.NLayerDiscriminator`
  state dict, prefix stripped;
- ``loss.perceptual_loss.*`` (the LPIPS weights the checkpoint carries) -> dropped here;
  :func:`lpips_state_dict_from_taming` maps them onto our LPIPS keys.

Official checkpoints were trained with the reference quantizer's swapped β
(:func:`config_from_taming` sets ``legacy_beta=True``); that only matters when training resumes.
Gumbel and index-remapping checkpoints are refused with a clear error.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from .discriminator import DiscriminatorConfig
from .loss import VQGANLossConfig
from .lpips import convert_reference_lpips_state_dict
from .vqgan import VQGANConfig

# The reference's VectorQuantizer2(legacy=True) in our VQGANConfig keys.
REFERENCE_QUANTIZER = {"legacy_beta": True, "l2_normalize": False, "codebook_dim": None,
                       "use_ema": False, "restart_dead_codes": 0}
_VQGAN_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.")
_DISC_PREFIX = "loss.discriminator."
_LPIPS_PREFIX = "loss.perceptual_loss."


def _unwrap(sd: Mapping[str, Any]) -> Mapping[str, Any]:
    """A Lightning checkpoint holds the weights under "state_dict"."""
    inner = sd.get("state_dict")
    return inner if isinstance(inner, Mapping) else sd


def convert_taming_state_dict(
    sd: Mapping[str, Any],
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(vqgan_sd, disc_sd) from a taming ``VQModel`` state dict or Lightning checkpoint.

    ``vqgan_sd`` loads strictly into ``VQGAN(config_from_taming(...))`` (default quantizer
    options: no EMA buffers); ``disc_sd`` into ``NLayerDiscriminator``. Unknown keys raise.
    """
    sd = _unwrap(sd)
    if any(k.startswith(("quantize.proj.", "quantize.embed.")) for k in sd):
        raise ValueError("GumbelQuantize checkpoints are not supported (only VQModel)")
    if "quantize.used" in sd:
        raise ValueError("checkpoints with index remapping (quantize.used) are not supported")
    vqgan: dict[str, Tensor] = {}
    disc: dict[str, Tensor] = {}
    unknown = []
    for key, value in sd.items():
        if key.startswith(_DISC_PREFIX):
            disc[key.removeprefix(_DISC_PREFIX)] = value
        elif key.startswith("loss."):
            continue  # LPIPS weights (see lpips_state_dict_from_taming) and loss constants
        elif key.startswith(_VQGAN_PREFIXES):
            vqgan[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"unexpected keys in taming checkpoint: {sorted(unknown)[:10]}")
    if "quantize.embedding.weight" not in vqgan:
        raise ValueError("not a taming VQModel state dict: no quantize.embedding.weight")
    return vqgan, disc


def lpips_state_dict_from_taming(sd: Mapping[str, Any]) -> dict[str, Tensor]:
    """The LPIPS weights stored in a taming checkpoint, in our LPIPS key format (may be empty)."""
    sd = _unwrap(sd)
    return convert_reference_lpips_state_dict(
        {k: v for k, v in sd.items() if k.startswith(_LPIPS_PREFIX)}
    )


def config_from_taming(params: Mapping[str, Any]) -> VQGANConfig:
    """:class:`VQGANConfig` from a taming config's ``model.params`` (``ddconfig``, ``n_embed``,
    ``embed_dim``), with the reference's quantizer: its β placement (``legacy_beta=True``), and
    none of our codebook-health options (full-dimension, unnormalised codes, no restarts), which
    change the state dict or the codes' meaning."""
    dd = dict(params["ddconfig"])
    known = {"ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "resolution",
             "in_channels", "out_ch", "dropout", "double_z"}
    extra = set(dd) - known
    if extra:
        raise ValueError(f"unsupported ddconfig keys: {sorted(extra)}")
    return VQGANConfig.from_dict(
        {**dd, "n_embed": int(params["n_embed"]), "embed_dim": int(params["embed_dim"]),
         **REFERENCE_QUANTIZER}
    )


def loss_configs_from_taming(
    params: Mapping[str, Any],
) -> tuple[VQGANLossConfig, DiscriminatorConfig]:
    """Loss and discriminator configs from ``model.params.lossconfig.params``."""
    p = dict(params)
    if p.get("use_actnorm") or p.get("disc_conditional"):
        raise ValueError("use_actnorm / disc_conditional discriminators are not supported")
    loss = VQGANLossConfig(
        disc_start=int(p["disc_start"]),
        codebook_weight=float(p.get("codebook_weight", 1.0)),
        perceptual_weight=float(p.get("perceptual_weight", 1.0)),
        disc_weight=float(p.get("disc_weight", 1.0)),
        disc_factor=float(p.get("disc_factor", 1.0)),
        disc_loss=str(p.get("disc_loss", "hinge")),
    )
    disc = DiscriminatorConfig(
        input_nc=int(p.get("disc_in_channels", 3)),
        ndf=int(p.get("disc_ndf", 64)),
        n_layers=int(p.get("disc_num_layers", 3)),
    )
    return loss, disc
