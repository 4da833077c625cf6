"""``python -m pipeline import-taming``: reference configs in, our configs out.

The reference configs are written here as dicts with the structure of taming-transformers'
configs/imagenet_vqgan.yaml, custom_vqgan.yaml, faceshq_vqgan.yaml, the f16-16384 model.yaml and
the cIN transformer config published with the checkpoints. Each import must validate as
``python -m pipeline run`` loads configs and equal our shipped version (configs/) in the mapped
fields, but for the quantizer: the shipped configs train with our codebook-health quantizer,
an import has the reference's (its checkpoints need it). Unsupported keys are refused with the
reference key named.
"""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.cli import default_pipeline
from pipeline.config import ConfigError, load_config
from pipeline.importer import import_taming, validate_text
from pipeline.models.convert import REFERENCE_QUANTIZER
from tests.conftest import REPO

CONFIGS = REPO / "configs"
SCHEMA = default_pipeline().schema

F16 = {"double_z": False, "z_channels": 256, "resolution": 256, "in_channels": 3, "out_ch": 3,
       "ch": 128, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [16],
       "dropout": 0.0}
VQ_LOSS = "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"


def vqmodel(n_embed: int, loss: dict, batch: int, train: dict, lr: str = "4.5e-6") -> dict:
    """A reference VQGAN config (model + data), numbers as the reference writes them."""
    return {
        "model": {"base_learning_rate": lr, "target": "taming.models.vqgan.VQModel",
                  "params": {"embed_dim": 256, "n_embed": n_embed, "ddconfig": dict(F16),
                             "lossconfig": {"target": VQ_LOSS, "params": loss}}},
        "data": {"target": "main.DataModuleFromConfig",
                 "params": {"batch_size": batch, "num_workers": 8, "train": train,
                            "validation": {"target": train["target"].replace("Train", "Test"),
                                           "params": train["params"]}}},
    }


IMAGENET = {"target": "taming.data.imagenet.ImageNetTrain", "params": {"config": {"size": 256}}}
CUSTOM = {"target": "taming.data.custom.CustomTrain",
          "params": {"training_images_list_file": "some/training.txt", "size": 256}}
FACES = {"target": "taming.data.faceshq.FacesHQTrain", "params": {"size": 256, "crop_size": 256}}
LOSS = {"disc_conditional": False, "disc_in_channels": 3, "codebook_weight": 1.0}

REFERENCES = {
    "imagenet_vqgan_f16_1024.yaml": vqmodel(1024, {**LOSS, "disc_start": 250001,
                                                   "disc_weight": 0.8}, 3, IMAGENET),
    "imagenet_vqgan_f16_16384.yaml": vqmodel(16384, {**LOSS, "disc_start": 0, "disc_weight": 0.75,
                                                     "disc_num_layers": 2}, 3, IMAGENET),
    "custom_vqgan.yaml": vqmodel(1024, {**LOSS, "disc_start": 10000, "disc_weight": 0.8}, 5,
                                 CUSTOM),
    "faceshq_vqgan_f16_1024.yaml": vqmodel(1024, {**LOSS, "disc_start": 30001,
                                                  "disc_weight": 0.8}, 3, FACES),
}


def cin_transformer() -> dict:
    """The cIN config published with the checkpoint: Labelator classes, the f16-16384 VQGAN as
    its frozen first stage (DummyLoss), mingpt 48 x 24 x 1536."""
    first = vqmodel(16384, {}, 8, IMAGENET)["model"]
    first.pop("base_learning_rate")
    first["params"]["lossconfig"] = {"target": "taming.modules.losses.DummyLoss"}
    first["params"]["ckpt_path"] = "logs/vqgan_imagenet_f16_16384/checkpoints/last.ckpt"
    return {
        "model": {
            "base_learning_rate": 4.5e-06,
            "target": "taming.models.cond_transformer.Net2NetTransformer",
            "params": {
                "first_stage_key": "image", "cond_stage_key": "class_label",
                "transformer_config": {"target": "taming.modules.transformer.mingpt.GPT",
                                       "params": {"vocab_size": 16384, "block_size": 256,
                                                  "n_layer": 48, "n_head": 24, "n_embd": 1536}},
                "first_stage_config": first,
                "cond_stage_config": {"target": "taming.modules.util.Labelator",
                                      "params": {"n_classes": 1000}},
            }},
        "data": vqmodel(16384, {}, 8, IMAGENET)["data"],
    }


def shipped(name: str):
    return load_config(str(CONFIGS / name), [], SCHEMA)


def with_reference_quantizer(model):
    return dataclasses.replace(model, **REFERENCE_QUANTIZER)


def imported(ref: dict, name: str = "ref.yaml", **kwargs):
    text = import_taming(ref, source=name, **kwargs).to_yaml()
    return text, validate_text(text, SCHEMA)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_vqgan_imports_equal_the_shipped_configs(name):
    text, cfg = imported(REFERENCES[name], name)
    ours, want = cfg.train_vqgan, shipped(name).train_vqgan
    assert ours.model == with_reference_quantizer(want.model)
    assert ours.disc == want.disc
    assert ours.loss == want.loss
    assert (ours.lr, ours.lr_scale_by_batch, ours.betas, ours.micro_batch) == \
        (want.lr, want.lr_scale_by_batch, want.betas, want.micro_batch)
    assert (ours.num_workers, ours.init_from, cfg.shard.labels) == \
        (want.num_workers, None, shipped(name).shard.labels)
    # Comments say where values came from.
    assert "disc_start: " in text and "# model.params.lossconfig.params.disc_start" in text
    assert "disc_weight: 0.8  # model.params.lossconfig.params.disc_weight" in text \
        or name == "imagenet_vqgan_f16_16384.yaml"
    assert "data.params.num_workers: dataloader processes" in text  # listed as ignored


def test_unset_loss_keys_take_the_reference_defaults():
    """The reference's disc_weight default is 1.0 (ours 0.8): an unset key must be written
    out, not left to our default."""
    ref = vqmodel(1024, {"disc_start": 5}, 4, IMAGENET)
    _, cfg = imported(ref)
    loss, disc = cfg.train_vqgan.loss, cfg.train_vqgan.disc
    assert (loss.disc_weight, loss.disc_factor, loss.perceptual_weight, loss.disc_loss) == \
        (1.0, 1.0, 1.0, "hinge")
    assert (disc.input_nc, disc.ndf, disc.n_layers) == (3, 64, 3)
    assert cfg.train_vqgan.random_crop is True  # ImageNetTrain's random_crop default


def test_lightning_and_ckpt_path_are_mapped():
    ref = vqmodel(1024, {**LOSS, "disc_start": 1, "pixelloss_weight": 2.0}, 4, FACES, lr="1e-5")
    ref["model"]["params"]["ckpt_path"] = "s3://bucket/vqgan/last.ckpt"
    ref["lightning"] = {"trainer": {"accumulate_grad_batches": 2, "gpus": "0,1,", "max_steps": 77,
                                    "benchmark": True},
                        "callbacks": {"image_logger": {"target": "main.ImageLogger",
                                                       "params": {"batch_frequency": 750}}}}
    text, cfg = imported(ref, name="my finetune.yaml")
    vq = cfg.train_vqgan
    assert (vq.grad_accum, vq.num_workers, vq.steps, vq.lr) == (2, 2, 77, 1e-5)
    assert vq.init_from == "s3://bucket/vqgan/last.ckpt" and cfg.run == "my-finetune"
    assert vq.random_crop is True  # FacesHQTrain with crop_size: RandomCrop
    assert "pixelloss_weight: stored but never applied" in text
    assert "lightning.callbacks.image_logger: logging" in text
    _, cfg = imported(ref, num_workers=16)
    assert cfg.train_vqgan.num_workers == 16


def test_cin_transformer_imports_equal_the_shipped_config():
    text, cfg = imported(cin_transformer(), "cin_transformer.yaml")
    want = shipped("imagenet_transformer.yaml")
    assert cfg.train_vqgan.model == with_reference_quantizer(want.train_vqgan.model)
    assert (cfg.train_vqgan.steps, cfg.train_vqgan.init_from) == \
        (0, "logs/vqgan_imagenet_f16_16384/checkpoints/last.ckpt")
    ours, ref = cfg.train_transformer, want.train_transformer
    for key in ("n_layer", "n_head", "n_embd", "dropout", "bias", "pkeep", "conditional",
                "betas", "weight_decay", "micro_batch", "num_workers", "cond_drop",
                "use_flipped", "schedule", "warmup_steps", "grad_clip"):
        assert getattr(ours, key) == getattr(ref, key), key
    assert ours.base_lr == pytest.approx(ref.base_lr) == pytest.approx(4.5e-6 * 64)
    assert cfg.shard.labels == "folders" and cfg.tokenize.store_flipped is False
    assert "train_vqgan.steps: 0 exports the first stage as published" in text


def _set(ref: dict, dotted: str, value) -> dict:
    ref = copy.deepcopy(ref)
    *parents, last = dotted.split(".")
    node = ref
    for part in parents:
        node = node.setdefault(part, {})
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return ref


_DELETE = object()
LOSS_KEY = "model.params.lossconfig.params"


@pytest.mark.parametrize("dotted, value, key, message", [
    ("model.target", "taming.models.vqgan.GumbelVQ", "model.target",
     "taming.models.vqgan.GumbelVQ is not supported"),
    (f"{LOSS_KEY}.disc_conditional", True, f"{LOSS_KEY}.disc_conditional", "not supported"),
    (f"{LOSS_KEY}.use_actnorm", True, f"{LOSS_KEY}.use_actnorm", "not supported"),
    (f"{LOSS_KEY}.disc_start", _DELETE, f"{LOSS_KEY}.disc_start", "missing"),
    (f"{LOSS_KEY}.disc_loss", "wasserstein", f"{LOSS_KEY}.disc_loss", "not supported"),
    ("model.params.lossconfig.target", "taming.modules.losses.DummyLoss",
     "model.params.lossconfig.target", "is not supported"),
    ("model.params.ddconfig.tanh_out", True, "model.params.ddconfig.tanh_out", "not supported"),
    ("model.params.ddconfig.double_z", True, "model.params.ddconfig.double_z", "not supported"),
    ("model.params.remap", "data/remap.npy", "model.params.remap", "not supported"),
    ("model.params.ignore_keys", ["loss"], "model.params.ignore_keys", "not supported"),
    ("model.project", "8k_8f_celebA-hq", "model.project", "not supported"),
    ("data.params.train.target", "taming.data.sflckr.Examples", "data.params.train.target",
     "is not supported"),
    ("data.params.train.params.config.sub_indices", "0-10",
     "data.params.train.params.config.sub_indices", "not supported"),
    ("lightning.trainer.max_epochs", 10, "lightning.trainer.max_epochs", "not supported"),
    ("lightning.trainer.precision", 16, "lightning.trainer.precision", "not supported"),
    ("model.base_learning_rate", "fast", "model.base_learning_rate", "expected float"),
])
def test_vqgan_refusals_name_the_reference_key(dotted, value, key, message):
    ref = _set(REFERENCES["imagenet_vqgan_f16_1024.yaml"], dotted, value)
    with pytest.raises(ConfigError) as e:
        import_taming(ref)
    assert e.value.key == key and message in e.value.message, str(e.value)


T = "model.params"


@pytest.mark.parametrize("dotted, value, key, message", [
    (f"{T}.cond_stage_config.target", "taming.modules.misc.coord.CoordStage",
     f"{T}.cond_stage_config.target", "is not supported"),
    (f"{T}.cond_stage_config", "__is_first_stage__", f"{T}.cond_stage_config",
     "is not supported"),
    (f"{T}.ckpt_path", "logs/cin/last.ckpt", f"{T}.ckpt_path", "GPT weights cannot be imported"),
    (f"{T}.transformer_config.params.vocab_size", 1024,
     f"{T}.transformer_config.params.vocab_size", "first stage's n_embed 16384"),
    (f"{T}.transformer_config.params.attn_pdrop", 0.1,
     f"{T}.transformer_config.params.attn_pdrop", "one dropout rate"),
    (f"{T}.cond_stage_key", "depth", f"{T}.cond_stage_key", "not supported"),
    (f"{T}.permuter_config", {"target": "taming.modules.transformer.permuter.Spiral"},
     f"{T}.permuter_config.target", "is not supported"),
])
def test_transformer_refusals_name_the_reference_key(dotted, value, key, message):
    with pytest.raises(ConfigError) as e:
        import_taming(_set(cin_transformer(), dotted, value))
    assert e.value.key == key and message in e.value.message, str(e.value)


def test_unconditional_transformer_without_first_stage_checkpoint():
    ref = _set(cin_transformer(), f"{T}.cond_stage_config", "__is_unconditional__")
    ref = _set(ref, f"{T}.first_stage_config.params.ckpt_path", _DELETE)
    text, cfg = imported(ref)
    assert cfg.train_transformer.conditional is False
    assert cfg.train_vqgan.init_from.startswith("s3://my-bucket/") and "placeholder" in text


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", "import-taming", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_cli_end_to_end(tmp_path: Path):
    ref = tmp_path / "imagenet_vqgan.yaml"
    ref.write_text(yaml.safe_dump(REFERENCES["imagenet_vqgan_f16_1024.yaml"]))
    out = tmp_path / "configs" / "imported.yaml"
    res = _cli(str(ref), "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(out)
    printed = _cli(str(ref))
    assert printed.returncode == 0 and printed.stdout == out.read_text()
    # What `run` loads, it loads: the same validation, through the real command.
    run = subprocess.run([sys.executable, "-m", "pipeline", "run", str(out), "--print-config"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert yaml.safe_load(run.stdout)["train_vqgan"]["model"]["n_embed"] == 1024

    bad = tmp_path / "gumbel.yaml"
    bad.write_text(yaml.safe_dump(_set(REFERENCES["imagenet_vqgan_f16_1024.yaml"],
                                       "model.target", "taming.models.vqgan.GumbelVQ")))
    res = _cli(str(bad), "--out", str(tmp_path / "never.yaml"))
    assert res.returncode == 2
    assert "model.target: taming.models.vqgan.GumbelVQ is not supported" in res.stderr
    assert not (tmp_path / "never.yaml").exists()
