"""VQGAN autoencoder: parity by parameter count, shapes, straight-through, export round trip."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from pipeline.models import VQGAN, NLayerDiscriminator, VQGANConfig
from pipeline.models.convert import REFERENCE_QUANTIZER
from pipeline.models.vqgan import CONFIG_NAME, WEIGHTS_NAME

from .conftest import F16_DDCONFIG, tiny_config

pytestmark = pytest.mark.usefixtures("single_thread")


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("n_embed, expected", [(1024, 72_141_699), (16384, 76_073_859)])
def test_f16_parameter_count_matches_reference(n_embed, expected):
    with torch.device("meta"):
        model = VQGAN(VQGANConfig(**F16_DDCONFIG, embed_dim=256, n_embed=n_embed,
                                  **REFERENCE_QUANTIZER))
        ours = VQGAN(VQGANConfig(**F16_DDCONFIG, embed_dim=256, n_embed=n_embed))
    assert n_params(model) == expected
    # Our default quantizer: 8-dim codes, and the 256 <-> 8 projections around the lookup.
    projections = (256 * 8 + 8) + (8 * 256 + 256)
    assert n_params(ours) == expected - n_embed * 256 + n_embed * 8 + projections


def test_discriminator_parameter_count_matches_reference():
    with torch.device("meta"):
        assert n_params(NLayerDiscriminator()) == 2_765_633


def test_f16_shapes_on_meta():
    with torch.device("meta"):
        model = VQGAN(VQGANConfig(**F16_DDCONFIG, embed_dim=256, n_embed=1024))
        x = torch.empty(2, 3, 256, 256)
        h = model.quant_conv(model.encoder(x))
        assert h.shape == (2, 256, 16, 16)
        assert model.decode(h).shape == (2, 3, 256, 256)
    assert model.config.latent_size() == 16


def test_encode_decode_shapes(images):
    model = VQGAN(tiny_config()).eval()
    enc = model.encode(images)
    assert enc.z_q.shape == (2, 16, 8, 8)
    assert enc.indices.shape == (2, 8, 8) and enc.indices.dtype == torch.int64
    assert enc.loss.dim() == 0 and enc.perplexity.dim() == 0 and enc.usage.dim() == 0
    assert model.decode(enc.z_q).shape == (2, 3, 32, 32)
    recon, quant = model(images)
    assert recon.shape == images.shape
    assert torch.equal(quant.indices, enc.indices)
    # Convolutional: a different input size gives a proportional grid.
    assert model.encode(torch.zeros(1, 3, 48, 64)).indices.shape == (1, 12, 16)


def test_double_z_and_channels():
    model = VQGAN(tiny_config(double_z=True, in_channels=1, out_ch=2))
    assert model.encoder.conv_out.out_channels == 64
    recon, _ = model(torch.zeros(1, 1, 32, 32))
    assert recon.shape == (1, 2, 32, 32)


def test_straight_through_gradient_reaches_encoder(images):
    model = VQGAN(tiny_config())
    recon, _ = model(images)
    recon.square().mean().backward()  # the quantizer loss is not used: only the ST path
    grad = model.encoder.conv_in.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert model.quant_conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("grad", [False, True])
def test_decode_indices_is_exactly_the_reconstruction(images, grad):
    """Decoding the codes gives model(x)'s reconstruction bit for bit, with and without autograd
    (whose in-place paths leave different activation layouts in the encoder)."""
    model = VQGAN(tiny_config()).eval()
    with torch.set_grad_enabled(grad):
        recon, quant = model(images)
        assert torch.equal(model.decode_indices(quant.indices), recon)


def test_last_layer_and_last_input(images):
    model = VQGAN(tiny_config())
    assert model.last_layer is model.decoder.conv_out.weight
    out = model(images, return_last_input=True)
    conv = model.decoder.conv_out
    torch.testing.assert_close(F.conv2d(out.last_input, conv.weight, conv.bias, padding=1),
                               out.recon)
    assert len(model(images)) == 2


def test_eval_is_deterministic_and_leaves_codebook(images):
    model = VQGAN(tiny_config(use_ema=True, restart_dead_codes=1)).eval()
    before = model.quantize.embedding.weight.clone()
    a, b = model.encode(images), model.encode(images)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.z_q, b.z_q)
    assert torch.equal(model.quantize.embedding.weight, before)


@pytest.mark.parametrize("overrides", [{}, {"use_ema": True, "restart_dead_codes": 3,
                                            "l2_normalize": True, "codebook_dim": 8}])
def test_save_load_roundtrip(tmp_path, images, overrides):
    model = VQGAN(tiny_config(**overrides))
    model.train()
    model(images)  # move EMA buffers / counters away from their initial values
    model.eval()
    model.save_pretrained(tmp_path)
    state = torch.load(tmp_path / WEIGHTS_NAME, weights_only=True)
    assert all(v.dtype in (torch.float32, torch.int64) for v in state.values())
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["n_embed"] == 64

    loaded = VQGAN.from_pretrained(tmp_path)
    assert not loaded.training
    assert loaded.config == model.config
    with torch.no_grad():
        for m in (loaded, VQGAN.from_bytes(model.config_json(), model.state_bytes())):
            r1, q1 = model(images)
            r2, q2 = m(images)
            assert torch.equal(r1, r2) and torch.equal(q1.indices, q2.indices)


def test_config_dict_roundtrip_and_validation():
    cfg = tiny_config(codebook_dim=4)
    assert VQGANConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown"):
        VQGANConfig.from_dict({"chmult": [1, 2]})
    with pytest.raises(ValueError, match="GroupNorm"):
        VQGAN(tiny_config(ch=48))
    with pytest.raises(ValueError, match="resolution"):
        VQGAN(tiny_config(resolution=30))
    with pytest.raises(ValueError, match="ema_decay"):
        VQGAN(tiny_config(ema_decay=1.5))
