"""The reference taming-transformers setups shipped as configs/: each loads through the schema and
builds models with the reference's parameter counts (on the meta device: nothing is allocated).

Counts are of the autoencoder as the reference's ``VQModel`` minus its loss: encoder, decoder,
quantizer (codebook ``n_embed x embed_dim`` included), quant_conv, post_quant_conv. The LPIPS net
and the discriminator live in the reference's ``loss`` module and are counted apart (LPIPS not at
all: it is frozen and not trained). The configs train that architecture with our quantizer recipe
(unit-norm 8-dimensional codes, dead-code restarts: the VQGANConfig defaults), so the counts are
checked with the reference's quantizer swapped in, and ours differ by the codebook alone.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from pipeline.cli import default_pipeline
from pipeline.config import load_config
from pipeline.models.convert import REFERENCE_QUANTIZER
from pipeline.models.discriminator import NLayerDiscriminator
from pipeline.models.gpt import GPT
from pipeline.models.vqgan import VQGAN
from stages.train_transformer import gpt_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
F16_1024, F16_16384 = 72_141_699, 76_073_859
D3_NDF64 = 2_765_633  # NLayerDiscriminator(3, ndf=64, n_layers=3)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def load(name: str):
    return load_config(str(CONFIGS / name), [], default_pipeline().schema)


def patchgan_count(ndf: int, n_layers: int, input_nc: int = 3) -> int:
    """The reference NLayerDiscriminator: 4x4 convs; the first and last with bias, the others
    without bias but with BatchNorm (2 per channel)."""
    total, prev = input_nc * ndf * 16 + ndf, ndf
    for n in range(1, n_layers + 1):
        width = ndf * min(2**n, 8)
        total += prev * width * 16 + 2 * width
        prev = width
    return total + prev * 16 + 1


def mingpt_count(vocab: int, block: int, n_layer: int, c: int) -> int:
    """The reference mingpt GPT: tok_emb + pos_emb + blocks + ln_f + head (no bias)."""
    per_block = 4 * c + 4 * (c * c + c) + (4 * c * c + 4 * c) + (4 * c * c + c)
    return 2 * vocab * c + block * c + n_layer * per_block + 2 * c


@pytest.mark.parametrize("name, n_embed, vq_count, d_layers, d_count", [
    ("imagenet_vqgan_f16_1024.yaml", 1024, F16_1024, 3, D3_NDF64),
    ("imagenet_vqgan_f16_16384.yaml", 16384, F16_16384, 2, 663_361),  # published: 2 layers
    ("faceshq_vqgan_f16_1024.yaml", 1024, F16_1024, 3, D3_NDF64),
    ("custom_vqgan.yaml", 1024, F16_1024, 3, D3_NDF64),
    ("imagenet_transformer.yaml", 16384, F16_16384, 2, 663_361),  # its first stage: f16 16384
])
def test_vqgan_configs_match_reference_counts(name, n_embed, vq_count, d_layers, d_count):
    cfg = load(name).train_vqgan
    assert (cfg.model.n_embed, cfg.model.embed_dim, cfg.model.latent_size()) == (n_embed, 256, 16)
    assert cfg.lr == 4.5e-6 and cfg.lr_scale_by_batch and cfg.betas == [0.5, 0.9]
    assert cfg.base_lr == pytest.approx(4.5e-6 * cfg.global_batch)
    assert cfg.model.legacy_beta and cfg.loss.codebook_weight == 1.0
    with torch.device("meta"):
        # The reference's architecture; the configs train it with our quantizer recipe.
        vqgan = VQGAN(dataclasses.replace(cfg.model, **REFERENCE_QUANTIZER))
        ours = VQGAN(cfg.model)
        disc = NLayerDiscriminator(cfg.disc)
    assert n_params(vqgan) == vq_count
    assert n_params(vqgan.quantize) == n_embed * 256  # the codebook is part of the count
    # Ours: unit-norm 8-dim codes behind 256 <-> 8 projections, the rest identical.
    assert (cfg.model.l2_normalize, cfg.model.codebook_dim) == (True, 8)
    assert cfg.model.restart_dead_codes > 0
    assert n_params(ours) - n_params(ours.quantize) == vq_count - n_embed * 256
    assert F16_16384 - F16_1024 == (16384 - 1024) * 256
    assert (cfg.disc.ndf, cfg.disc.n_layers) == (64, d_layers)
    assert n_params(disc) == patchgan_count(64, d_layers) == d_count
    assert patchgan_count(64, 3) == D3_NDF64


def test_imagenet_vqgan_loss_settings():
    f1024, f16384 = load("imagenet_vqgan_f16_1024.yaml"), load("imagenet_vqgan_f16_16384.yaml")
    assert (f1024.train_vqgan.loss.disc_start, f1024.train_vqgan.loss.disc_weight) == (250001, 0.8)
    assert (f16384.train_vqgan.loss.disc_start, f16384.train_vqgan.loss.disc_weight) == (0, 0.75)
    faces, custom = load("faceshq_vqgan_f16_1024.yaml"), load("custom_vqgan.yaml")
    assert (faces.train_vqgan.loss.disc_start, faces.train_vqgan.loss.disc_weight) == (30001, 0.8)
    assert (custom.train_vqgan.loss.disc_start, custom.train_vqgan.micro_batch) == (10000, 5)


# Reference cIN transformer_config: vocab_size 16384, block_size 256, n_layer 48, n_head 24,
# n_embd 1536; Labelator(n_classes=1000) class ids share the 16384-row table with codes.
CIN = dict(vocab=16384, block=256, n_layer=48, n_head=24, n_embd=1536, n_classes=1000)
CIN_REFERENCE_COUNT = 1_410_640_896


def cin_model() -> GPT:
    cfg = load("imagenet_transformer.yaml")
    grid = cfg.train_vqgan.model.latent_size()
    data = {"n_embed": cfg.train_vqgan.model.n_embed, "n_classes": CIN["n_classes"],
            "length": grid * grid}
    gcfg = gpt_config(cfg.train_transformer, data)
    assert (gcfg.vocab_size, gcfg.block_size, gcfg.n_layer, gcfg.n_head, gcfg.n_embd) == \
        (CIN["vocab"], CIN["block"], CIN["n_layer"], CIN["n_head"], CIN["n_embd"])
    assert (gcfg.embd_pdrop, gcfg.resid_pdrop, gcfg.attn_pdrop, gcfg.bias) == (0, 0, 0, True)
    with torch.device("meta"):
        return GPT(gcfg)


def test_imagenet_transformer_matches_reference_but_the_class_rows():
    model = cin_model()
    assert mingpt_count(CIN["vocab"], CIN["block"], CIN["n_layer"], CIN["n_embd"]) == \
        CIN_REFERENCE_COUNT
    # ours: a start token and 1000 class tokens after the 16384 codes (1 + 1000 extra table rows)
    extra = (1 + CIN["n_classes"]) * CIN["n_embd"]
    assert model.num_params() == CIN_REFERENCE_COUNT + extra == 1_412_178_432
    tc = load("imagenet_transformer.yaml").train_transformer
    assert tc.lr_scale_by_batch and tc.base_lr == pytest.approx(4.5e-6 * 64)  # 2.88e-4
    assert model.num_params(non_embedding=True) == \
        CIN_REFERENCE_COUNT - (CIN["vocab"] + CIN["block"]) * CIN["n_embd"]


def test_defaults_are_the_papers():
    """Unset keys take the reference's values: the GAN terms from step 10,000 at λ × 0.8
    (custom_vqgan.yaml), top-k 100 when sampling (its sampling scripts)."""
    from pipeline.cli import build_parser
    from stages.sample import SampleConfig
    from stages.train_transformer import TrainTransformerConfig
    from stages.train_vqgan import TrainVQGANConfig

    loss = TrainVQGANConfig().loss
    assert (loss.disc_start, loss.disc_weight) == (10000, 0.8)
    assert SampleConfig().top_k == TrainTransformerConfig().top_k == 100
    args = build_parser(["sample"]).parse_args(["sample", "runs/x", "--out", "o"])
    assert args.top_k == 100
