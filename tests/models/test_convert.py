"""Import of official taming-transformers checkpoints.

The expected reference keys are generated here from the reference's module structure
(``taming/modules/diffusionmodules/model.py`` Encoder/Decoder/ResnetBlock/AttnBlock,
``taming/models/vqgan.py`` VQModel, ``taming/modules/discriminator/model.py``, LPIPS), written
independently of our modules, so the test fails if our layout drifts from the reference's.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.models import (
    VQGAN,
    DiscriminatorConfig,
    NLayerDiscriminator,
    VQGANConfig,
    config_from_taming,
    convert_taming_state_dict,
    loss_configs_from_taming,
    lpips_state_dict_from_taming,
)
from pipeline.models.convert import REFERENCE_QUANTIZER
from pipeline.models.lpips import LPIPS

from .conftest import F16_DDCONFIG
from .test_lpips import reference_lpips_state_dict

pytestmark = pytest.mark.usefixtures("single_thread")

Shapes = dict[str, tuple[int, ...]]


def _resnet(prefix: str, cin: int, cout: int) -> Shapes:
    """taming ResnetBlock(in_channels=cin, out_channels=cout, temb_channels=0)."""
    keys = {
        f"{prefix}.norm1.weight": (cin,), f"{prefix}.norm1.bias": (cin,),
        f"{prefix}.conv1.weight": (cout, cin, 3, 3), f"{prefix}.conv1.bias": (cout,),
        f"{prefix}.norm2.weight": (cout,), f"{prefix}.norm2.bias": (cout,),
        f"{prefix}.conv2.weight": (cout, cout, 3, 3), f"{prefix}.conv2.bias": (cout,),
    }
    if cin != cout:  # use_conv_shortcut=False -> 1x1 nin_shortcut
        keys[f"{prefix}.nin_shortcut.weight"] = (cout, cin, 1, 1)
        keys[f"{prefix}.nin_shortcut.bias"] = (cout,)
    return keys


def _attn(prefix: str, c: int) -> Shapes:
    """taming AttnBlock: GroupNorm + 1x1 convs q, k, v, proj_out."""
    keys = {f"{prefix}.norm.weight": (c,), f"{prefix}.norm.bias": (c,)}
    for name in ("q", "k", "v", "proj_out"):
        keys[f"{prefix}.{name}.weight"] = (c, c, 1, 1)
        keys[f"{prefix}.{name}.bias"] = (c,)
    return keys


def _conv(prefix: str, cin: int, cout: int, k: int, bias: bool = True) -> Shapes:
    keys = {f"{prefix}.weight": (cout, cin, k, k)}
    if bias:
        keys[f"{prefix}.bias"] = (cout,)
    return keys


def reference_vqgan_keys(dd: dict, n_embed: int, embed_dim: int) -> Shapes:
    """Keys and shapes of taming's VQModel (without ``loss.*``), following its constructors."""
    ch, mult, nrb = dd["ch"], dd["ch_mult"], dd["num_res_blocks"]
    attn_res, res = dd["attn_resolutions"], dd["resolution"]
    z, n_levels = dd["z_channels"], len(dd["ch_mult"])
    keys: Shapes = {}
    # Encoder
    keys |= _conv("encoder.conv_in", dd["in_channels"], ch, 3)
    in_mult = (1, *mult)
    curr = res
    for i in range(n_levels):
        block_in, block_out = ch * in_mult[i], ch * mult[i]
        for j in range(nrb):
            keys |= _resnet(f"encoder.down.{i}.block.{j}", block_in, block_out)
            block_in = block_out
            if curr in attn_res:
                keys |= _attn(f"encoder.down.{i}.attn.{j}", block_in)
        if i != n_levels - 1:
            keys |= _conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
            curr //= 2
    keys |= _resnet("encoder.mid.block_1", block_in, block_in)
    keys |= _attn("encoder.mid.attn_1", block_in)
    keys |= _resnet("encoder.mid.block_2", block_in, block_in)
    keys |= {"encoder.norm_out.weight": (block_in,), "encoder.norm_out.bias": (block_in,)}
    keys |= _conv("encoder.conv_out", block_in, 2 * z if dd["double_z"] else z, 3)
    # Decoder
    block_in = ch * mult[-1]
    curr = res // 2 ** (n_levels - 1)
    keys |= _conv("decoder.conv_in", z, block_in, 3)
    keys |= _resnet("decoder.mid.block_1", block_in, block_in)
    keys |= _attn("decoder.mid.attn_1", block_in)
    keys |= _resnet("decoder.mid.block_2", block_in, block_in)
    for i in reversed(range(n_levels)):
        block_out = ch * mult[i]
        for j in range(nrb + 1):
            keys |= _resnet(f"decoder.up.{i}.block.{j}", block_in, block_out)
            block_in = block_out
            if curr in attn_res:
                keys |= _attn(f"decoder.up.{i}.attn.{j}", block_in)
        if i != 0:
            keys |= _conv(f"decoder.up.{i}.upsample.conv", block_in, block_in, 3)
            curr *= 2
    keys |= {"decoder.norm_out.weight": (block_in,), "decoder.norm_out.bias": (block_in,)}
    keys |= _conv("decoder.conv_out", block_in, dd["out_ch"], 3)
    # VQModel
    keys["quantize.embedding.weight"] = (n_embed, embed_dim)
    keys |= _conv("quant_conv", z, embed_dim, 1)
    keys |= _conv("post_quant_conv", embed_dim, z, 1)
    return keys


def reference_discriminator_keys(input_nc: int = 3, ndf: int = 64, n_layers: int = 3) -> Shapes:
    """taming NLayerDiscriminator (BatchNorm): Sequential indices of convs and norms."""
    keys: Shapes = _conv("main.0", input_nc, ndf, 4)
    idx, mult = 2, 1
    for n in range(1, n_layers + 1):
        prev, mult = mult, min(2**n, 8)
        keys |= _conv(f"main.{idx}", ndf * prev, ndf * mult, 4, bias=False)
        c = ndf * mult
        keys |= {f"main.{idx + 1}.weight": (c,), f"main.{idx + 1}.bias": (c,),
                 f"main.{idx + 1}.running_mean": (c,), f"main.{idx + 1}.running_var": (c,),
                 f"main.{idx + 1}.num_batches_tracked": ()}
        idx += 3
    keys |= _conv(f"main.{idx}", ndf * mult, 1, 4)
    return keys


def random_state(shapes: Shapes, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {k: (torch.tensor(7) if k.endswith("num_batches_tracked")
                else torch.randn(s, generator=gen)) for k, s in shapes.items()}


TINY_DD = dict(double_z=False, z_channels=32, resolution=32, in_channels=3, out_ch=3, ch=32,
               ch_mult=[1, 2, 2], num_res_blocks=1, attn_resolutions=[8, 16], dropout=0.0)


@pytest.mark.parametrize("n_embed", [1024, 16384])
def test_f16_reference_keys_equal_ours(n_embed):
    expected = reference_vqgan_keys(F16_DDCONFIG, n_embed, 256)
    with torch.device("meta"):
        ours = VQGAN(VQGANConfig(**F16_DDCONFIG, n_embed=n_embed, embed_dim=256,
                                 **REFERENCE_QUANTIZER)).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == expected
    assert sum(torch.Size(s).numel() for s in expected.values()) == (
        72_141_699 if n_embed == 1024 else 76_073_859)
    with torch.device("meta"):
        disc = NLayerDiscriminator().state_dict()
    assert {k: tuple(v.shape) for k, v in disc.items()} == reference_discriminator_keys()


def test_convert_full_reference_checkpoint():
    gen = torch.Generator().manual_seed(0)
    vq_ref = random_state(reference_vqgan_keys(TINY_DD, 64, 16), gen)
    d_ref = random_state(reference_discriminator_keys(ndf=16, n_layers=2), gen)
    lp_ref = reference_lpips_state_dict(gen)
    ckpt = {
        "state_dict": {**vq_ref,
                       **{f"loss.discriminator.{k}": v for k, v in d_ref.items()},
                       **{f"loss.perceptual_loss.{k}": v for k, v in lp_ref.items()}},
        "global_step": 123,
    }
    vq_sd, d_sd = convert_taming_state_dict(ckpt)
    params = {"ddconfig": TINY_DD, "n_embed": 64, "embed_dim": 16, "lossconfig": {}}
    config = config_from_taming(params)
    assert config.legacy_beta and config.attn_resolutions == [8, 16]

    model = VQGAN(config)
    model.load_state_dict(vq_sd, strict=True)
    for k, v in vq_ref.items():
        assert torch.equal(model.state_dict()[k], v), k
    disc = NLayerDiscriminator(DiscriminatorConfig(ndf=16, n_layers=2))
    disc.load_state_dict(d_sd, strict=True)
    assert torch.equal(disc.main[3].running_var, d_ref["main.3.running_var"])

    lpips = LPIPS.from_state_dict(lpips_state_dict_from_taming(ckpt))
    assert torch.equal(lpips.lin4.weight, lp_ref["lin4.model.1.weight"])
    # The converted model runs: decoding codes through the imported codebook.
    with torch.no_grad():
        assert model.eval().decode_indices(torch.zeros(1, 8, 8, dtype=torch.long)).shape == (
            1, 3, 32, 32)


def test_convert_rejects_unsupported_checkpoints():
    with pytest.raises(ValueError, match="Gumbel"):
        convert_taming_state_dict({"quantize.embed.weight": torch.zeros(1), "quantize.proj.weight":
                                   torch.zeros(1)})
    with pytest.raises(ValueError, match="remapping"):
        convert_taming_state_dict({"quantize.embedding.weight": torch.zeros(1),
                                   "quantize.used": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected keys"):
        convert_taming_state_dict({"quantize.embedding.weight": torch.zeros(1),
                                   "cond_stage_model.x": torch.zeros(1)})
    with pytest.raises(ValueError, match="no quantize.embedding.weight"):
        convert_taming_state_dict({"encoder.conv_in.weight": torch.zeros(1)})


def test_loss_configs_from_taming():
    # configs/imagenet_vqgan.yaml: lossconfig.params
    loss, disc = loss_configs_from_taming(dict(
        disc_conditional=False, disc_in_channels=3, disc_start=250001, disc_weight=0.8,
        codebook_weight=1.0))
    assert (loss.disc_start, loss.disc_weight, loss.disc_loss) == (250001, 0.8, "hinge")
    assert disc == DiscriminatorConfig(input_nc=3, ndf=64, n_layers=3)
    with pytest.raises(ValueError, match="actnorm"):
        loss_configs_from_taming({"disc_start": 0, "use_actnorm": True})
