"""``python -m pipeline import-taming REF.yaml``: a taming-transformers config as one of ours.

Reads a reference config (the YAML ``main.py --base`` takes): a first stage
(``model.target: taming.models.vqgan.VQModel`` with ``VQLPIPSWithDiscriminator``) or a
``taming.models.cond_transformer.Net2NetTransformer`` (class-conditional through ``Labelator``,
or unconditional), its ``data`` section and optionally a ``lightning`` section. Writes the
pipeline config of the same setup, shaped like ``configs/imagenet_vqgan_f16_1024.yaml``: every
value with a comment saying which reference key it came from (or that it is the reference's
default, or ours), placeholders for the storage root, the image source and the LPIPS weights.

Every reference key is mapped, or listed in the header as ignored because it does not change
training (dataloader processes, logging callbacks, the validation split), or refused: an
unsupported key or value raises :class:`~pipeline.config.ConfigError` naming the reference's
dotted key (``model.params.lossconfig.params.disc_conditional: not supported ...``). Nothing
that changes training is dropped silently.

Only plain data in, text out: validating the result against the stage schema is the caller's
part (:func:`validate_text`, which ``python -m pipeline import-taming`` runs before writing).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from pipeline.config import ConfigError, load_config
from pipeline.models.convert import REFERENCE_QUANTIZER

VQMODEL = "taming.models.vqgan.VQModel"
NET2NET = "taming.models.cond_transformer.Net2NetTransformer"
VQ_LOSS = ("taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
           "taming.modules.losses.VQLPIPSWithDiscriminator")
DUMMY_LOSS = ("taming.modules.losses.DummyLoss", "taming.modules.losses.vqperceptual.DummyLoss")
MINGPT = "taming.modules.transformer.mingpt.GPT"
LABELATOR = "taming.modules.util.Labelator"
SOS = "taming.modules.util.SOSProvider"
IDENTITY_PERMUTER = "taming.modules.transformer.permuter.Identity"
DATAMODULE = "main.DataModuleFromConfig"
REF_LR = "model.base_learning_rate"
DEFAULT_WORKERS = 8  # our default GPU count when the reference names none (lightning.trainer.gpus)
# Callbacks of the reference's main.py that log or set up folders only.
LOGGING_CALLBACKS = ("main.ImageLogger", "main.SetupCallback", "main.CUDACallback",
                     "main.LearningRateMonitor",
                     "pytorch_lightning.callbacks.LearningRateMonitor")

Tree = dict[str, tuple[Any, str]]  # key -> (value or nested Tree, comment)


@dataclass
class Imported:
    """The converted config: ``tree`` (our keys, each with a comment), ``ignored`` (reference
    keys without effect on training, with why), ``notes`` (header lines)."""

    tree: Tree
    source: str
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_yaml(self) -> str:
        """The config file's text: a header, then the sections with their comments."""
        paragraphs = [
            f"Imported from {self.source} by `python -m pipeline import-taming` "
            "(pipeline/importer.py). Each comment names the reference key a value came from "
            "(\"default\": the reference's default for an unset key; \"ours\": no reference "
            "equivalent).", *self.notes,
            "Placeholders (s3://my-bucket/...) must be overridden, e.g. "
            "`storage.root=s3://real/runs shard.source=s3://real/images`."]
        head = [f"# {line}" for text in paragraphs for line in textwrap.wrap(text, 97)]
        if self.ignored:
            head.append("# Reference keys ignored (no effect on training):")
            head += [f"#   {line}" for text in self.ignored
                     for line in textwrap.wrap(text, 95, subsequent_indent="  ")]
        return "\n".join(head + _render(self.tree, 0)) + "\n"


# -- rendering ------------------------------------------------------------------------------------


def _scalar(value: Any) -> str:
    """``value`` as YAML that reads back as the same value and type (floats keep a dot, so
    PyYAML does not read ``1e-06`` as a string)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        text = repr(value)
        mantissa, e, exp = text.partition("e")
        return f"{mantissa}.0e{exp}" if e and "." not in mantissa else text
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    text = str(value)
    plain = text and "#" not in text and ": " not in text and yaml.safe_load(text) == text
    return text if plain else json.dumps(text)


def _render(tree: Tree, depth: int) -> list[str]:
    lines = []
    for key, (value, comment) in tree.items():
        note = f"  # {comment}" if comment else ""
        if isinstance(value, dict):
            lines.append(f"{'  ' * depth}{key}:{note}")
            lines += _render(value, depth + 1)
        else:
            lines.append(f"{'  ' * depth}{key}: {_scalar(value)}{note}")
    return lines


# -- reading the reference ------------------------------------------------------------------------


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(where, f"must be a mapping, got {type(value).__name__}")
    return value


def _known(section: Mapping[str, Any], where: str, keys: Iterable[str]) -> None:
    """ConfigError naming the first key of ``section`` that is not in ``keys``."""
    allowed = set(keys)
    for key in section:
        if key not in allowed:
            raise ConfigError(_join(where, str(key)), "not supported (no equivalent in this "
                              "pipeline; remove it or train with the reference)")


def _get(section: Mapping[str, Any], where: str, key: str, kind: type, default: Any = ...) -> Any:
    """``section[key]`` as ``kind`` (int, float, str, bool, list); ``default`` when unset, or
    a ConfigError naming the key when there is none (the reference requires it)."""
    if key not in section or section[key] is None and default is not ...:
        if default is ...:
            raise ConfigError(_join(where, key), "missing (the reference requires it)")
        return default
    value = section[key]
    try:
        if kind is float:  # OmegaConf, which the reference uses, reads 1e-4 as a float
            out = float(value)
            if not math.isfinite(out):
                raise ValueError(value)
            return out
        if kind is int and not isinstance(value, bool) and float(value) == int(float(value)):
            return int(float(value))
        if kind is list and isinstance(value, list | tuple):
            return list(value)
        if kind in (str, bool) and isinstance(value, kind):
            return value
    except (TypeError, ValueError):
        pass
    raise ConfigError(_join(where, key), f"expected {kind.__name__}, got {value!r}")


def _only(section: Mapping[str, Any], where: str, key: str, allowed: Iterable[Any],
          default: Any) -> None:
    """ConfigError unless ``section[key]`` (``default`` when unset) is one of ``allowed``."""
    value = section.get(key, default)
    choices = list(allowed)
    if value not in choices:
        raise ConfigError(_join(where, key), f"not supported: {value!r} (only "
                          f"{' / '.join(repr(c) for c in choices)})")


def _target(section: Mapping[str, Any], where: str, allowed: Iterable[str]) -> str:
    target = section.get("target")
    choices = list(allowed)
    if target not in choices:
        raise ConfigError(_join(where, "target"), f"{target} is not supported (supported: "
                          f"{', '.join(choices)})")
    return str(target)


def _src(where: str, key: str, section: Mapping[str, Any]) -> str:
    """Comment for a value read from ``where.key``: the key, or "default" when unset."""
    return _join(where, key) if key in section else f"default ({_join(where, key)} unset)"


# -- the first stage ------------------------------------------------------------------------------

_DDCONFIG = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "resolution",
             "in_channels", "out_ch", "dropout", "double_z", "resamp_with_conv", "give_pre_end")
_VQMODEL_PARAMS = ("embed_dim", "n_embed", "ddconfig", "lossconfig", "ckpt_path", "ignore_keys",
                   "image_key", "monitor", "colorize_nlabels", "remap", "sane_index_shape")
_LOSS_PARAMS = ("disc_start", "codebook_weight", "pixelloss_weight", "disc_num_layers",
                "disc_in_channels", "disc_factor", "disc_weight", "perceptual_weight",
                "use_actnorm", "disc_conditional", "disc_ndf", "disc_loss")


@dataclass
class FirstStage:
    """A VQModel's params as our sections: ``model``, ``disc`` and ``loss`` (None for a
    DummyLoss first stage), ``init_from`` (its ckpt_path) and the code-grid side."""

    model: Tree
    disc: Tree | None
    loss: Tree | None
    init_from: str | None
    n_embed: int
    grid: int


def _model_tree(p: Mapping[str, Any], where: str) -> tuple[Tree, int, int]:
    """``train_vqgan.model`` from ``ddconfig`` + ``n_embed``/``embed_dim``; also n_embed and
    the code grid's side."""
    dw = _join(where, "ddconfig")
    dd = _mapping(p.get("ddconfig"), dw)
    _known(dd, dw, _DDCONFIG)
    if dd.get("double_z", True) is not False:  # the reference's Encoder defaults to True
        raise ConfigError(_join(dw, "double_z"), "not supported: a VQModel needs double_z: "
                          "false (its quant_conv takes z_channels)")
    _only(dd, dw, "resamp_with_conv", [True], True)
    _only(dd, dw, "give_pre_end", [False], False)
    ch_mult = _get(dd, dw, "ch_mult", list, [1, 2, 4, 8])
    resolution = _get(dd, dw, "resolution", int)
    n_embed = _get(p, where, "n_embed", int)
    tree: Tree = {
        "resolution": (resolution, _join(dw, "resolution")),
        "in_channels": (_get(dd, dw, "in_channels", int), _join(dw, "in_channels")),
        "out_ch": (_get(dd, dw, "out_ch", int), _join(dw, "out_ch")),
        "ch": (_get(dd, dw, "ch", int), _join(dw, "ch")),
        "ch_mult": (ch_mult, _src(dw, "ch_mult", dd)),
        "num_res_blocks": (_get(dd, dw, "num_res_blocks", int), _join(dw, "num_res_blocks")),
        "attn_resolutions": (_get(dd, dw, "attn_resolutions", list),
                             _join(dw, "attn_resolutions")),
        "z_channels": (_get(dd, dw, "z_channels", int), _join(dw, "z_channels")),
        "double_z": (False, _join(dw, "double_z")),
        "dropout": (_get(dd, dw, "dropout", float, 0.0), _src(dw, "dropout", dd)),
        "embed_dim": (_get(p, where, "embed_dim", int), _join(where, "embed_dim")),
        "n_embed": (n_embed, _join(where, "n_embed")),
        "beta": (0.25, "VQModel's VectorQuantizer(beta=0.25)"),
    }
    # The reference's quantizer, written out: our defaults are another (codebook-health) one.
    notes = {"legacy_beta": "the reference quantizer's legacy=True commitment placement"}
    plain = "the reference's VectorQuantizer2"
    tree.update({k: (v, notes.get(k, plain)) for k, v in REFERENCE_QUANTIZER.items()})
    return tree, n_embed, resolution // 2 ** (len(ch_mult) - 1)


def _loss_trees(lp: Mapping[str, Any], where: str, ignored: list[str]) -> tuple[Tree, Tree]:
    """``train_vqgan.disc`` and ``.loss`` from VQLPIPSWithDiscriminator's params. Unset keys
    take the reference's defaults (its disc_weight default is 1.0, ours 0.8: written out)."""
    _known(lp, where, _LOSS_PARAMS)
    _only(lp, where, "use_actnorm", [False], False)
    _only(lp, where, "disc_conditional", [False], False)
    _only(lp, where, "disc_loss", ["hinge", "vanilla"], "hinge")
    if "pixelloss_weight" in lp:
        ignored.append(f"{_join(where, 'pixelloss_weight')}: stored but never applied by the "
                       f"reference's loss")

    def get(key: str, kind: type, default: Any = ...) -> tuple[Any, str]:
        return _get(lp, where, key, kind, default), _src(where, key, lp)

    disc: Tree = {"input_nc": get("disc_in_channels", int, 3), "ndf": get("disc_ndf", int, 64),
                  "n_layers": get("disc_num_layers", int, 3)}
    loss: Tree = {"disc_start": get("disc_start", int),
                  "disc_weight": get("disc_weight", float, 1.0),
                  "codebook_weight": get("codebook_weight", float, 1.0),
                  "perceptual_weight": get("perceptual_weight", float, 1.0),
                  "disc_factor": get("disc_factor", float, 1.0),
                  "disc_loss": get("disc_loss", str, "hinge")}
    return disc, loss


def first_stage(model: Mapping[str, Any], where: str, ignored: list[str],
                allow_dummy_loss: bool) -> FirstStage:
    """A ``VQModel`` section (``model`` or a transformer's ``first_stage_config``) as ours.
    ``allow_dummy_loss``: a transformer's frozen first stage may have no training loss."""
    _target(model, where, [VQMODEL])
    pw = _join(where, "params")
    p = _mapping(model.get("params"), pw)
    _known(p, pw, _VQMODEL_PARAMS)
    if p.get("ignore_keys"):
        raise ConfigError(_join(pw, "ignore_keys"), "not supported: init_from loads every key "
                          "of the checkpoint strictly")
    _only(p, pw, "image_key", ["image"], "image")
    _only(p, pw, "colorize_nlabels", [None], None)
    _only(p, pw, "remap", [None], None)
    for key, why in (("monitor", "which checkpoint Lightning keeps as best"),
                     ("sane_index_shape", "the shape the reference returns indices in")):
        if key in p:
            ignored.append(f"{_join(pw, key)}: {why}")
    tree, n_embed, grid = _model_tree(p, pw)
    lw = _join(pw, "lossconfig")
    lossconfig = _mapping(p.get("lossconfig"), lw)
    targets = [*VQ_LOSS, *DUMMY_LOSS] if allow_dummy_loss else list(VQ_LOSS)
    if _target(lossconfig, lw, targets) in DUMMY_LOSS:
        disc = loss = None
    else:
        lpw = _join(lw, "params")
        disc, loss = _loss_trees(_mapping(lossconfig.get("params"), lpw), lpw, ignored)
    ckpt = _get(p, pw, "ckpt_path", str, None)
    return FirstStage(tree, disc, loss, ckpt, n_embed, grid)


# -- data and lightning ---------------------------------------------------------------------------

# train dataset target -> (placeholder source, our labels mode, params it may take)
_DATASETS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "taming.data.imagenet.ImageNetTrain": ("s3://my-bucket/imagenet/train", "folders",
                                           ("config",)),
    "taming.data.custom.CustomTrain": ("s3://my-bucket/custom/train.csv", "none",
                                       ("size", "training_images_list_file")),
    "taming.data.faceshq.FacesHQTrain": ("s3://my-bucket/faceshq/images.csv", "none",
                                         ("size", "crop_size", "keys", "coord")),
    "taming.data.faceshq.CelebAHQTrain": ("s3://my-bucket/celebahq/images.csv", "none",
                                          ("size", "keys")),
    "taming.data.faceshq.FFHQTrain": ("s3://my-bucket/ffhq/images.csv", "none",
                                      ("size", "keys")),
}


@dataclass
class Data:
    """What the reference's ``data`` section sets: the shard section, the per-GPU batch, the
    training crop, whether images carry class labels."""

    shard: Tree
    batch_size: int
    random_crop: tuple[bool, str]
    labelled: bool
    target: str


def data_section(data: Mapping[str, Any], ignored: list[str]) -> Data:
    """``data`` (``main.DataModuleFromConfig``) as our shard section and batch settings."""
    _known(data, "data", ("target", "params"))
    _target(data, "data", [DATAMODULE])
    p = _mapping(data.get("params"), "data.params")
    _known(p, "data.params", ("batch_size", "num_workers", "train", "validation", "test", "wrap"))
    for key, why in (("num_workers", "dataloader processes"),
                     ("validation", "ours: shard.val_fraction of the images is the val split"),
                     ("test", "not used in training"),
                     ("wrap", "a dataset wrapper without effect on the samples")):
        if key in p:
            ignored.append(f"data.params.{key}: {why}")
    train = _mapping(p.get("train"), "data.params.train")
    target = _target(train, "data.params.train", _DATASETS)
    source, labels, params_known = _DATASETS[target]
    tw = "data.params.train.params"
    tp = _mapping(train.get("params"), tw)
    _known(tp, tw, params_known)
    crop: tuple[bool, str]
    if target.endswith("ImageNetTrain"):
        cw = f"{tw}.config"
        cfg = _mapping(tp.get("config"), cw)
        _known(cfg, cw, ("size", "ImageNetTrain"))
        inner = _mapping(cfg.get("ImageNetTrain"), f"{cw}.ImageNetTrain")
        _known(inner, f"{cw}.ImageNetTrain", ("random_crop",))
        size, size_key = _get(cfg, cw, "size", int), f"{cw}.size"
        crop = (_get(inner, f"{cw}.ImageNetTrain", "random_crop", bool, True),
                f"{cw}.ImageNetTrain.random_crop" if "random_crop" in inner
                else "ImageNetTrain's default: a random crop (its random_crop unset)")
    else:
        size, size_key = _get(tp, tw, "size", int), f"{tw}.size"
        if "training_images_list_file" in tp:
            source_note = tp["training_images_list_file"]
            ignored.append(f"{tw}.training_images_list_file ({source_note}): ours is "
                           f"shard.source, a folder or a .csv/.jsonl/.parquet list with a "
                           f"`path` column")
        _only(tp, tw, "coord", [False], False)
        if "keys" in tp:
            ignored.append(f"{tw}.keys: which fields a sample dict returns")
        has_crop = tp.get("crop_size") is not None
        crop = (has_crop, (f"{tw}.crop_size set: RandomCrop" if has_crop
                           else f"{target.rsplit('.', 1)[1]}: resize, center crop"))
    shard: Tree = {
        "source": (source, "placeholder: the training images (a folder, or a list file)"),
        "labels": (labels, "class ids from the subfolders" if labels == "folders"
                   else "unlabelled"),
        "resolution": (size, f"{size_key} (shorter side resized, then cropped)"),
        "ext": ("jpg", "ours"),
        "samples_per_shard": (1000, "ours"),
        "val_fraction": (0.01, "ours"),
    }
    return Data(shard, _get(p, "data.params", "batch_size", int), crop, labels == "folders",
                target)


@dataclass
class Trainer:
    """What the reference's ``lightning`` section sets that changes training."""

    grad_accum: int = 1
    steps: int | None = None
    grad_clip: float = 0.0
    gpus: int | None = None


def _count_gpus(value: Any, where: str) -> int:
    """Lightning's ``gpus``: ``"0,1,"`` (ids) or an int count."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    ids = [s for s in str(value).split(",") if s.strip()]
    if not ids:
        raise ConfigError(where, f"not supported: {value!r} (ours trains on GPUs or CPU workers: "
                          f"give a GPU list)")
    return len(ids)


def lightning_section(lt: Mapping[str, Any], ignored: list[str]) -> Trainer:
    """``lightning.trainer`` / ``.callbacks`` / ``.logger`` / ``.modelcheckpoint``."""
    _known(lt, "lightning", ("trainer", "callbacks", "logger", "modelcheckpoint"))
    for key in ("logger", "modelcheckpoint"):
        if key in lt:
            ignored.append(f"lightning.{key}: logging and checkpoint cadence")
    callbacks = _mapping(lt.get("callbacks"), "lightning.callbacks")
    for name, cb in callbacks.items():
        _target(_mapping(cb, f"lightning.callbacks.{name}"), f"lightning.callbacks.{name}",
                LOGGING_CALLBACKS)
        ignored.append(f"lightning.callbacks.{name}: logging")
    tw = "lightning.trainer"
    tr = _mapping(lt.get("trainer"), tw)
    passive = ("benchmark", "num_nodes", "accelerator", "distributed_backend", "strategy",
               "log_every_n_steps", "val_check_interval", "check_val_every_n_epoch",
               "num_sanity_val_steps", "limit_val_batches", "progress_bar_refresh_rate")
    _known(tr, tw, ("accumulate_grad_batches", "max_steps", "gradient_clip_val", "gpus",
                    "precision", *passive))
    _only(tr, tw, "precision", [32, "32"], 32)
    for key in passive:
        if key in tr:
            ignored.append(f"{tw}.{key}: speed, validation or logging")
    out = Trainer(grad_accum=_get(tr, tw, "accumulate_grad_batches", int, 1),
                  steps=_get(tr, tw, "max_steps", int, None),
                  grad_clip=_get(tr, tw, "gradient_clip_val", float, 0.0))
    if tr.get("gpus") is not None:
        out.gpus = _count_gpus(tr["gpus"], f"{tw}.gpus")
    return out


# -- assembling -----------------------------------------------------------------------------------

_PERCEPTUAL: Tree = {
    "backbone": ("vgg16", "LPIPS(vgg16): VGG16 from the torch hub cache (downloaded when "
                 "online), heads from the lpips wheel; offline: set vgg_weights / lin_weights "
                 "URIs"),
}


def _base(name: str) -> Tree:
    return {
        "run": (name, "ours: from the reference file's name"),
        "seed": (0, "ours"),
        "storage": ({"root": ("s3://my-bucket/runs", "placeholder: where every stage writes")},
                    ""),
        "tracking": ({"mode": ("auto", "")}, ""),
    }


def _workers(trainer: Trainer, num_workers: int | None) -> tuple[int, str]:
    if num_workers is not None:
        return num_workers, "ours: --num-workers (GPUs)"
    if trainer.gpus is not None:
        return trainer.gpus, "lightning.trainer.gpus"
    return DEFAULT_WORKERS, f"ours: {DEFAULT_WORKERS} GPUs (the reference config names none)"


def _steps(trainer: Trainer, default: int) -> tuple[int, str]:
    if trainer.steps is not None:
        return trainer.steps, "lightning.trainer.max_steps"
    return default, "ours: the reference trains by epochs without a step limit"


def _vqgan_section(fs: FirstStage, data: Data, trainer: Trainer, workers: tuple[int, str],
                   lr: tuple[float, str], steps: tuple[int, str],
                   init_from: tuple[str | None, str]) -> Tree:
    """``train_vqgan``: the shipped configs' training settings around the mapped model."""
    tree: Tree = {
        "steps": steps,
        "micro_batch": (data.batch_size, "data.params.batch_size (per GPU)"),
        "grad_accum": (trainer.grad_accum, "lightning.trainer.accumulate_grad_batches"
                       if trainer.grad_accum != 1 else "default (no accumulation)"),
        "num_workers": workers,
        "use_gpu": (True, "ours"),
        "lr": lr,
        "lr_scale_by_batch": (True, "main.py: lr = base_learning_rate x global batch"),
        "betas": ([0.5, 0.9], "VQModel.configure_optimizers: Adam betas"),
        "weight_decay": (0.0, "Adam without weight decay"),
        "schedule": ("constant", "a constant rate"),
        "warmup_steps": (0, "no warmup"),
        "grad_clip": (trainer.grad_clip, "lightning.trainer.gradient_clip_val"
                      if trainer.grad_clip else "no clipping"),
        "precision": ("fp32", "the reference trains in fp32"),
        "zero_stage": (2, "ours"),
        "random_crop": data.random_crop,
        "random_flip": (False, "the reference's data pipeline does not mirror"),
        "checkpoint_every": (5000, "ours"),
        "log_every": (100, "ours"),
        "image_every": (5000, "ours"),
    }
    if init_from[0] is not None:
        tree = {"init_from": init_from, **tree}
    tree["model"] = (fs.model, "ddconfig + embed_dim / n_embed")
    if fs.disc is not None and fs.loss is not None:
        tree["disc"] = (fs.disc, "NLayerDiscriminator of the lossconfig")
        tree["loss"] = (fs.loss, "VQLPIPSWithDiscriminator params")
    tree["perceptual"] = (dict(_PERCEPTUAL), "")
    return tree


def _base_lr(model: Mapping[str, Any]) -> tuple[float, str]:
    return (_get(model, "model", "base_learning_rate", float),
            f"{REF_LR} (per sample of the global batch)")


def import_vqgan(ref: Mapping[str, Any], name: str, num_workers: int | None,
                 ignored: list[str]) -> Tree:
    """A VQModel config as ``run/storage/shard/train_vqgan``."""
    model = _mapping(ref.get("model"), "model")
    _known(model, "model", ("target", "base_learning_rate", "params"))
    fs = first_stage(model, "model", ignored, allow_dummy_loss=False)
    data = data_section(_mapping(ref.get("data"), "data"), ignored)
    trainer = lightning_section(_mapping(ref.get("lightning"), "lightning"), ignored)
    section = _vqgan_section(
        fs, data, trainer, _workers(trainer, num_workers), _base_lr(model),
        _steps(trainer, 500000),
        (fs.init_from, "model.params.ckpt_path: fine-tune from it (loaded strictly)"))
    tree = _base(name)
    tree["shard"] = (data.shard, "")
    tree["train_vqgan"] = (section, "")
    return tree


def _gpt_params(tc: Mapping[str, Any], where: str, fs: FirstStage) -> Tree:
    """train_transformer's architecture from ``transformer_config`` (mingpt.GPT)."""
    _target(tc, where, [MINGPT])
    pw = _join(where, "params")
    p = _mapping(tc.get("params"), pw)
    _known(p, pw, ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "embd_pdrop",
                   "resid_pdrop", "attn_pdrop", "n_unmasked"))
    if _get(p, pw, "vocab_size", int) != fs.n_embed:
        raise ConfigError(_join(pw, "vocab_size"), f"not supported: {p['vocab_size']} != the "
                          f"first stage's n_embed {fs.n_embed} (ours: the codebook plus "
                          f"condition tokens)")
    if _get(p, pw, "block_size", int) < fs.grid ** 2:
        raise ConfigError(_join(pw, "block_size"), f"{p['block_size']} is shorter than the "
                          f"{fs.grid}x{fs.grid} code grid")
    _only(p, pw, "n_unmasked", [0], 0)
    drops = {k: _get(p, pw, k, float, 0.0) for k in ("embd_pdrop", "resid_pdrop", "attn_pdrop")}
    for key, value in drops.items():
        if value != drops["embd_pdrop"]:
            raise ConfigError(_join(pw, key), f"not supported: {value} (ours has one dropout "
                              f"rate; embd_pdrop is {drops['embd_pdrop']})")

    def get(key: str, default: int) -> tuple[int, str]:
        return _get(p, pw, key, int, default), _src(pw, key, p)

    return {"n_layer": get("n_layer", 12), "n_head": get("n_head", 8),
            "n_embd": get("n_embd", 256),
            "dropout": (drops["embd_pdrop"], f"{pw}.embd/resid/attn_pdrop"),
            "bias": (True, "mingpt's Linear layers have biases")}


def _conditional(p: Mapping[str, Any], where: str, data: Data) -> tuple[bool, str]:
    """Class-conditional (Labelator) or unconditional (SOSProvider / __is_unconditional__)."""
    cw = _join(where, "cond_stage_config")
    cond = p.get("cond_stage_config")
    if p.get("unconditional") is True or cond == "__is_unconditional__":
        return False, f"{where}.unconditional / {cw}: __is_unconditional__"
    if isinstance(cond, str):
        raise ConfigError(cw, f"{cond} is not supported (supported: {LABELATOR}, {SOS}, "
                          f"__is_unconditional__)")
    target = _target(_mapping(cond, cw), cw, [LABELATOR, SOS])
    if target == SOS:
        return False, f"{cw}.target: SOSProvider"
    _only(p, where, "cond_stage_key", ["class_label"], "depth")
    if not data.labelled:
        raise ConfigError(_join(cw, "target"), f"{LABELATOR} needs class labels, which "
                          f"{data.target} has not")
    params = _mapping(_mapping(cond, cw).get("params"), _join(cw, "params"))
    _known(params, _join(cw, "params"), ("n_classes",))
    return True, f"{cw}.target: Labelator (classes: the shard stage's labels)"


def import_transformer(ref: Mapping[str, Any], name: str, num_workers: int | None,
                       ignored: list[str], notes: list[str]) -> Tree:
    """A Net2NetTransformer config: its first stage as train_vqgan (pretrained mode when it
    names a checkpoint), the GPT as train_transformer."""
    model = _mapping(ref.get("model"), "model")
    _known(model, "model", ("target", "base_learning_rate", "params"))
    pw = "model.params"
    p = _mapping(model.get("params"), pw)
    _known(p, pw, ("transformer_config", "first_stage_config", "cond_stage_config",
                   "permuter_config", "ckpt_path", "ignore_keys", "first_stage_key",
                   "cond_stage_key", "downsample_cond_size", "pkeep", "sos_token",
                   "unconditional"))
    if p.get("ckpt_path"):
        raise ConfigError(f"{pw}.ckpt_path", "not supported: GPT weights cannot be imported "
                          "(train_transformer trains from scratch)")
    _only(p, pw, "ignore_keys", [None, []], None)
    _only(p, pw, "first_stage_key", ["image"], "image")
    _only(p, pw, "downsample_cond_size", [-1], -1)
    if p.get("permuter_config") is not None:
        _target(_mapping(p["permuter_config"], f"{pw}.permuter_config"),
                f"{pw}.permuter_config", [IDENTITY_PERMUTER])
    if "sos_token" in p:
        ignored.append(f"{pw}.sos_token: ours has its own start token after the codes")
    fw = f"{pw}.first_stage_config"
    fs = first_stage(_mapping(p.get("first_stage_config"), fw), fw, ignored,
                     allow_dummy_loss=True)
    data = data_section(_mapping(ref.get("data"), "data"), ignored)
    trainer = lightning_section(_mapping(ref.get("lightning"), "lightning"), ignored)
    workers = _workers(trainer, num_workers)
    conditional = _conditional(p, pw, data)
    gpt = _gpt_params(_mapping(p.get("transformer_config"), f"{pw}.transformer_config"),
                      f"{pw}.transformer_config", fs)
    notes.append(f"{pw}.transformer_config.params vocab_size and block_size, and a Labelator's "
                 f"n_classes: ours come from the upstream manifests (the codebook, the code "
                 f"grid, the shard labels), checked here against the first stage.")
    init = (fs.init_from, f"{fw}.params.ckpt_path") if fs.init_from else (
        "s3://my-bucket/weights/first_stage.ckpt",
        "placeholder: the VQGAN's last.ckpt, or the transformer's (its first_stage_model.*)")
    notes.append("train_vqgan.steps: 0 exports the first stage as published (pretrained mode); "
                 "raise it to fine-tune" + ("" if fs.loss else " (with our loss defaults: the "
                                            "first stage's lossconfig is a DummyLoss)") + ".")
    vq_lr = (4.5e-6, "ours: the reference VQGANs' base_learning_rate (not in this config)")
    vqgan = _vqgan_section(fs, data, Trainer(), workers, vq_lr,
                           (0, "pretrained mode: the first stage is frozen in the reference"),
                           init)
    section: Tree = {
        "steps": _steps(trainer, 1000000),
        "micro_batch": (data.batch_size, "data.params.batch_size (per GPU)"),
        "grad_accum": (trainer.grad_accum, "lightning.trainer.accumulate_grad_batches"
                       if trainer.grad_accum != 1 else "default (no accumulation)"),
        "num_workers": workers,
        "use_gpu": (True, "ours"),
        "lr": _base_lr(model),
        "lr_scale_by_batch": (True, "main.py: lr = base_learning_rate x global batch"),
        "betas": ([0.9, 0.95], "Net2NetTransformer.configure_optimizers: AdamW betas"),
        "weight_decay": (0.01, "AdamW weight decay on matrices only"),
        "schedule": ("constant", "a constant rate"),
        "warmup_steps": (0, "no warmup"),
        "grad_clip": (trainer.grad_clip, "lightning.trainer.gradient_clip_val"
                      if trainer.grad_clip else "no clipping"),
        "precision": ("fp32", "the reference trains in fp32"),
        "zero_stage": (3, "ours"),
        **gpt,
        "pkeep": (_get(p, pw, "pkeep", float, 1.0), _src(pw, "pkeep", p)),
        "conditional": conditional,
        "cond_drop": (0.0, "the reference has no class dropout"),
        "use_flipped": (False, "the reference trains on unmirrored images"),
        "checkpoint_every": (5000, "ours"),
        "log_every": (100, "ours"),
        "image_every": (5000, "ours"),
    }
    tree = _base(name)
    tree["shard"] = (data.shard, "")
    tree["train_vqgan"] = (vqgan, "the first stage (first_stage_config)")
    tree["tokenize"] = ({"store_flipped": (False, "the reference trains on unmirrored crops")},
                        "")
    tree["train_transformer"] = (section, "the transformer (transformer_config)")
    return tree


def run_name(path: str) -> str:
    """A run name (``[A-Za-z0-9][A-Za-z0-9._-]*``) from the reference file's name."""
    stem = os.path.splitext(os.path.basename(path))[0]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-._")[:128]
    return name or "taming"


def import_taming(ref: Mapping[str, Any], source: str = "REF.yaml", name: str | None = None,
                  num_workers: int | None = None) -> Imported:
    """Our config for the reference config ``ref`` (the parsed YAML; ``source`` names it in the
    header and, without ``name``, gives the run name). ``num_workers``: GPUs to train on
    (default: ``lightning.trainer.gpus``, else 8). ConfigError naming the reference key for
    anything it cannot map."""
    if not isinstance(ref, Mapping):
        raise ConfigError("", f"{source} must hold a mapping at the top level")
    _known(ref, "", ("model", "data", "lightning"))
    model = _mapping(ref.get("model"), "model")
    target = _target(model, "model", [VQMODEL, NET2NET])
    ignored: list[str] = []
    notes: list[str] = []
    name = name or run_name(source)
    if target == VQMODEL:
        tree = import_vqgan(ref, name, num_workers, ignored)
    else:
        tree = import_transformer(ref, name, num_workers, ignored, notes)
    return Imported(tree, source, ignored, notes)


def read_reference(path: str) -> Any:
    """The parsed YAML of a reference config file; ConfigError when unreadable."""
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError("", f"reference config not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError("", f"{path} is not valid YAML: {e}") from None


def validate_text(text: str, schema: type) -> Any:
    """Load ``text`` as ``python -m pipeline run`` loads a config file (schema, types,
    validation); returns the config, or raises ConfigError naming our key."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False, encoding="utf-8") as fh:
        fh.write(text)
    try:
        return load_config(fh.name, [], schema)
    finally:
        os.unlink(fh.name)
