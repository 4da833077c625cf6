"""Starting weights for train_vqgan (``train_vqgan.init_from``): a published taming-transformers
checkpoint or one of our own exports, read through :class:`~pipeline.storage.Storage` (local
paths, ``s3://``, ...).

What ``init_from`` may name:

- ``<...>.ckpt``: a taming Lightning checkpoint (``last.ckpt``). Of a ``VQModel``: the generator
  (``encoder.*``, ``decoder.*``, ``quant_conv.*``, ``post_quant_conv.*``,
  ``quantize.embedding.weight``) and the discriminator (``loss.discriminator.*``); its LPIPS
  weights (``loss.perceptual_loss.*``) are not used (``train_vqgan.perceptual`` says which LPIPS
  to use). Of a ``Net2NetTransformer``: its first stage (``first_stage_model.*``), no
  discriminator.
- ``<...>.pt``: our export's weights file (``export/vqgan.pt``); the ``vqgan.json`` beside it is
  read when present, to check the codebook's lookup rule.
- anything else: a folder holding ``vqgan.pt`` + ``vqgan.json`` (an ``export/`` folder), or a
  ``train_vqgan-<fp>`` stage folder (its ``export/``).

Weights load strictly into the configured model: a missing, unexpected or differently shaped key
is an error naming ``init_from`` and the first such key.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.models.convert import REFERENCE_QUANTIZER, convert_taming_state_dict
from pipeline.models.vqgan import CONFIG_NAME, WEIGHTS_NAME
from pipeline.storage import Storage, join

log = logging.getLogger("pipeline")

KEY = "train_vqgan.init_from"
_FIRST_STAGE = "first_stage_model."  # a Net2NetTransformer checkpoint's VQGAN
# Quantizer options that decide what a code means (how the codebook is looked up), and the
# reference's values of them; the other options only change training.
LOOKUP = ("l2_normalize", "codebook_dim")
REFERENCE_LOOKUP = {k: REFERENCE_QUANTIZER[k] for k in LOOKUP}
COUNTERS = ("quantize.unused_vectors",)  # training-state buffers a checkpoint may lack


@dataclass(frozen=True)
class InitWeights:
    """What an ``init_from`` URI holds, in our key format.

    ``vqgan`` loads into :class:`~pipeline.models.vqgan.VQGAN`, ``disc`` (empty: the checkpoint
    has none) into :class:`~pipeline.models.discriminator.NLayerDiscriminator`; ``lookup``: the
    quantizer options that give the codes their meaning, as the weights were trained
    (:data:`LOOKUP`; empty: unknown, an export without its vqgan.json); ``step``: the
    checkpoint's ``global_step`` when it records one.
    """

    uri: str
    kind: str  # "taming" | "export"
    vqgan: dict[str, Tensor]
    disc: dict[str, Tensor] = field(default_factory=dict)
    lookup: dict[str, Any] = field(default_factory=dict)
    step: int | None = None


def locate(storage: Storage, uri: str) -> tuple[str, str]:
    """``(kind, weights URI)`` for an ``init_from`` URI (see the module docstring).

    FileNotFoundError naming :data:`KEY` when a folder holds no export.
    """
    if uri.endswith(".ckpt"):
        return "taming", uri
    if uri.endswith(".pt"):
        return "export", uri
    for candidate in (join(uri, WEIGHTS_NAME), join(uri, "export", WEIGHTS_NAME)):
        if storage.exists(candidate):
            return "export", candidate
    raise FileNotFoundError(f"{KEY}={uri}: neither a .ckpt/.pt file nor a folder holding "
                            f"{WEIGHTS_NAME} or export/{WEIGHTS_NAME}")


class _Opaque:
    """Stands in for a class a checkpoint pickled but loading does not need (Lightning
    callbacks, hyper-parameter containers): accepts any construction and state."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _opaque(full_name: str) -> tuple[type, str]:
    module, _, name = full_name.rpartition(".")
    return type(name, (_Opaque,), {"__module__": module, "__qualname__": name}), full_name


def load_checkpoint_bytes(data: bytes) -> Any:
    """``torch.load`` of a checkpoint file's bytes, tensors on the CPU, never running pickled
    code: ``weights_only`` loading, with inert stand-ins for the non-torch classes the file
    names. Lightning checkpoints pickle e.g. their callbacks' classes, and loading them for
    real would need pytorch_lightning installed and trust in the file."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(data))
    except Exception:  # noqa: BLE001 - not a zip checkpoint: plain weights_only loading decides
        names = []
    with torch.serialization.safe_globals([_opaque(n) for n in names]):
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def from_taming(uri: str, ckpt: Any) -> InitWeights:
    """:class:`InitWeights` of a loaded taming checkpoint (a VQModel's or a Net2NetTransformer's).
    ValueError naming :data:`KEY` for what :func:`convert_taming_state_dict` refuses."""
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, Mapping) else None
    if not isinstance(sd, Mapping):
        raise ValueError(f"{KEY}={uri}: not a checkpoint (no state_dict mapping)")
    if any(k.startswith(_FIRST_STAGE) for k in sd):
        sd = {k.removeprefix(_FIRST_STAGE): v for k, v in sd.items() if k.startswith(_FIRST_STAGE)}
    try:
        vqgan, disc = convert_taming_state_dict(sd)
    except ValueError as e:
        raise ValueError(f"{KEY}={uri}: {e}") from None
    step = ckpt.get("global_step") if isinstance(ckpt, Mapping) else None
    return InitWeights(uri, "taming", vqgan, disc, lookup=dict(REFERENCE_LOOKUP),
                       step=int(step) if isinstance(step, int) else None)


def read_init_weights(storage: Storage, uri: str) -> InitWeights:
    """Read what ``uri`` names (see the module docstring)."""
    kind, weights = locate(storage, uri)
    data = storage.read_bytes(weights)
    if kind == "taming":
        return from_taming(uri, load_checkpoint_bytes(data))
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    folder, _, _ = weights.rpartition("/")
    config_uri = f"{folder}/{CONFIG_NAME}" if folder else CONFIG_NAME
    config = json.loads(storage.read_text(config_uri)) if storage.exists(config_uri) else {}
    lookup = {k: config[k] for k in LOOKUP if k in config}
    return InitWeights(uri, "export", dict(state), lookup=lookup)


def _hint(key: str, have: tuple[int, ...], want: tuple[int, ...]) -> str:
    """The config field a shape difference comes from, where it is one field."""
    if key.endswith("quantize.embedding.weight") and len(have) == len(want) == 2:
        if have[0] != want[0]:
            return f" (n_embed {have[0]} in the checkpoint vs {want[0]} configured)"
        return f" (embed_dim {have[1]} in the checkpoint vs {want[1]} configured)"
    return ""


def first_mismatch(expected: Mapping[str, Tensor], given: Mapping[str, Tensor],
                   prefix: str = "") -> str | None:
    """Why ``given`` does not load strictly where ``expected`` (a module's state dict) is: the
    first key, in the module's order, that is missing or shaped differently, else the first
    unexpected one; None when every key matches. ``prefix`` is prepended to key names (the
    checkpoint's own names, e.g. ``loss.discriminator.``)."""
    for key, value in expected.items():
        if key not in given:
            return f"{prefix}{key} is configured but not in the checkpoint"
        have, want = tuple(given[key].shape), tuple(value.shape)
        if have != want:
            return (f"{prefix}{key} has shape {list(have)} in the checkpoint, {list(want)} "
                    f"configured{_hint(key, have, want)}")
    extra = [k for k in given if k not in expected]
    if extra:
        return f"{prefix}{extra[0]} is in the checkpoint but not in the configured model"
    return None


def _lookup_mismatch(trained: Mapping[str, Any], configured: Any) -> str | None:
    """What to set when the configured quantizer would read the codebook differently from how
    it was trained (None when it agrees, or ``trained`` is unknown)."""
    differ = {k: v for k, v in trained.items() if getattr(configured, k) != v}
    if not differ:
        return None
    was = ", ".join(f"{k}={v}" for k, v in differ.items())
    fix = " ".join(f"train_vqgan.model.{k}={'null' if v is None else str(v).lower()}"
                   for k, v in differ.items())
    return f"its codebook was trained with {was}; set {fix}"


def apply_init_weights(weights: InitWeights, model: nn.Module, disc: nn.Module | None) -> None:
    """Load ``weights`` into the generator ``model`` (a VQGAN: its ``config`` is checked) and,
    when both have one, the discriminator ``disc`` (call before DeepSpeed wraps them, on every
    rank).

    ValueError naming :data:`KEY`, the URI and the first mismatching key when the configured
    model (``train_vqgan.model``, ``train_vqgan.disc``) differs from the checkpoint's. The
    quantizer's dead-code counters are training state, not weights: a checkpoint without them
    (the reference's) starts them at zero.
    """
    where = f"{KEY}={weights.uri}"
    why = _lookup_mismatch(weights.lookup, model.config)
    if why:
        raise ValueError(f"{where}: {why}")
    state = dict(weights.vqgan)
    own = model.state_dict()
    for key in COUNTERS:
        if key in own and key not in state:
            state[key] = own[key]
    why = first_mismatch(own, state)
    if why:
        raise ValueError(f"{where} does not match train_vqgan.model: {why}")
    if disc is not None and weights.disc:
        why = first_mismatch(disc.state_dict(), weights.disc, "loss.discriminator.")
        if why:
            raise ValueError(f"{where} does not match train_vqgan.disc: {why}")
        disc.load_state_dict(weights.disc, strict=True)
    model.load_state_dict(state, strict=True)


def init_vqgan(storage: Storage, uri: str, model: nn.Module,
               disc: nn.Module | None) -> InitWeights:
    """Read ``uri`` and load it into ``model`` (and ``disc``): :func:`read_init_weights` then
    :func:`apply_init_weights`. Returns what was read (for :func:`describe`)."""
    weights = read_init_weights(storage, uri)
    apply_init_weights(weights, model, disc)
    return weights


def describe(weights: InitWeights, with_disc: bool) -> str:
    """One log line: what was loaded from where."""
    source = "taming checkpoint" if weights.kind == "taming" else "export"
    step = f", its step {weights.step}" if weights.step is not None else ""
    parts = "generator and discriminator" if with_disc and weights.disc else (
        "generator (discriminator: fresh init, none in the checkpoint)" if with_disc
        else "generator")
    return f"{parts} initialised from {source} {weights.uri}{step}"
