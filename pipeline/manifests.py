"""Typed stage outputs: the contracts between stages.

Each stage's ``run(ctx)`` returns one of these records; the DAG stores ``to_dict()`` as the
manifest's ``outputs`` (plain JSON, the same shape as before the records existed) and a downstream
stage reads it back with ``ctx.input(name)`` (``from_dict``), so no stage indexes into another
stage's dict. Reading is strict where it matters: a missing field without a default raises
:class:`ManifestError` naming the field and saying how to redo the stage; unknown keys are ignored
(a newer writer may add fields). Fields added after a stage first shipped have defaults, so the
manifests of earlier runs still load.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

R = TypeVar("R", bound="Record")


class ManifestError(ValueError):
    """A manifest's ``outputs`` lack a field or hold a value of the wrong kind."""


def _plain(value: Any) -> Any:
    """JSON-able copy: records become dicts, tuples become lists."""
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _parse(hint: Any, value: Any, where: str, stage: str) -> Any:
    """``value`` read as type ``hint``: records (also inside list/dict/Optional) are built,
    tuples restored, everything else passes through unchanged."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        return _parse(next(a for a in args if a is not type(None)), value, where, stage)
    if isinstance(hint, type) and issubclass(hint, Record):
        if not isinstance(value, dict):
            raise ManifestError(f"{where}: expected an object, got {type(value).__name__}")
        return hint.from_dict(value, where, stage)
    if origin is list and args:
        return [_parse(args[0], v, f"{where}[{i}]", stage) for i, v in enumerate(value)]
    if origin is tuple:
        return tuple(value)
    if origin is dict and len(args) == 2:
        return {k: _parse(args[1], v, f"{where}.{k}", stage) for k, v in value.items()}
    return value


class Record:
    """Base of the output records: dataclasses with a JSON form."""

    STAGE: ClassVar[str] = ""  # the stage that writes it (for error messages)
    # Optional fields left out of the JSON while None (kinds of record that lack them).
    OMIT_IF_NONE: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                if not (f.name in self.OMIT_IF_NONE and getattr(self, f.name) is None)}

    @classmethod
    def from_dict(cls: type[R], data: dict[str, Any], where: str = "", stage: str = "") -> R:
        """The record from its JSON form. ``where`` names it in errors (default: "<stage>
        outputs"); ``stage`` is the stage to redo (default: the record's ``STAGE``)."""
        stage = stage or cls.STAGE
        where = where or f"{stage or cls.__name__} outputs"
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                kwargs[f.name] = _parse(hints[f.name], data[f.name], f"{where}.{f.name}", stage)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ManifestError(
                    f"{where}.{f.name} is missing: the manifest was written by another version "
                    f"of the pipeline; redo the stage with `--force {stage or 'STAGE'}`")
        return cls(**kwargs)


# -- shared parts ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Export(Record):
    """A model written for use outside training: fp32 weights and the config to rebuild it."""

    weights: str  # URI of the .pt state dict
    config: str  # URI of the .json model config


@dataclass(frozen=True)
class SplitCounts(Record):
    """What one split (train / val) holds."""

    OMIT_IF_NONE: ClassVar[tuple[str, ...]] = ("tokens",)

    shards: int
    samples: int
    bytes: int
    tokens: int | None = None  # code shards only


@dataclass(frozen=True)
class ShardFile(Record):
    """One finalized tar shard."""

    OMIT_IF_NONE: ClassVar[tuple[str, ...]] = ("source",)

    split: str
    name: str
    uri: str
    samples: int
    bytes: int
    sha256: str
    source: str | None = None  # code shards: the image shard it was encoded from


def _uris(shards: list[ShardFile], split: str) -> list[str]:
    return [s.uri for s in shards if s.split == split and s.samples > 0]


# -- the stages' outputs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardTotals(Record):
    inputs: int
    samples: int
    skipped: int
    duplicates: int
    ignored_files: int
    bytes: int


@dataclass(frozen=True)
class ShardCondition(Record):
    """shard: the condition map every sample carries as ``{key}.<member>`` (README, "Paired
    conditions"); read one with :func:`pipeline.data.conditions.condition_array`."""

    kind: str  # segmentation | depth (given) | canny | grayscale | downsample (derived)
    member: str  # the WebDataset member suffix: "cond.png"
    given: bool  # read from `source`, else computed from the image
    source: str | None  # given kinds: the condition folder URI, or "column:NAME" of a file list
    classes: int | None  # segmentation: class ids are 0..classes-1
    factor: int | None  # downsample: the image shrunk by this factor
    sigma: float | None  # canny: Gaussian sigma
    channels: int  # 1 (L / I;16) or 3 (RGB)
    size: tuple[int, int]  # stored (height, width)
    bit_depth: int  # bits per channel: 16 for depth, else 8
    resample: str  # how the map reached its size: nearest | bilinear | bicubic | none
    paired: int  # samples holding a condition (every sample of the run)
    skipped: dict[str, int]  # condition_* reason -> inputs skipped (also in ShardOutputs.skipped)


@dataclass(frozen=True)
class ShardOutputs(Record):
    """shard: WebDataset image shards per split, the class list, what was skipped and why."""

    STAGE: ClassVar[str] = "shard"
    OMIT_IF_NONE: ClassVar[tuple[str, ...]] = ("condition",)

    source: str
    resolution: int
    ext: str
    seed: int
    classes: list[str]
    num_classes: int
    shards: list[ShardFile]
    splits: dict[str, SplitCounts]
    totals: ShardTotals
    skipped: dict[str, int]  # reason -> count
    skipped_uri: str  # JSON lines, one per skipped input
    duplicates: list[dict[str, Any]] = field(default_factory=list)
    shards_reused: int = 0
    images_per_s: float | None = None
    seconds: float = 0.0
    # The paired condition of every sample; None (left out) when shard.condition.kind is none.
    condition: ShardCondition | None = None

    def uris(self, split: str) -> list[str]:
        """The split's shards that hold samples, in manifest order (what readers iterate)."""
        return _uris(self.shards, split)


@dataclass(frozen=True)
class VQGANOutputs(Record):
    """train_vqgan: the exported VQGAN, its val metrics (trained and untrained), images."""

    STAGE: ClassVar[str] = "train_vqgan"

    steps: int
    samples_seen: int
    export: Export
    model: dict[str, Any]  # VQGANConfig.to_dict()
    latent_size: int
    eval: dict[str, Any]
    eval_untrained: dict[str, Any] = field(default_factory=dict)
    images: list[str] = field(default_factory=list)
    checkpoint: str | None = None
    perceptual_backbone: str = "-"
    # Codebook health of the last logged training window (codebook/window_usage, dead_codes,
    # window_perplexity over the steps since the log before it, summed over ranks).
    train_codebook: dict[str, float] = field(default_factory=dict)
    # What eval's "rfid" figures are (tool, weights sha256, image counts), or why they are absent
    # ({"status": "absent", "reason": ...}); empty in manifests from before rFID.
    rfid: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CondVQGANOutputs(VQGANOutputs):
    """train_cond_vqgan: train_vqgan's outputs for the condition VQGAN, plus what it encodes."""

    STAGE: ClassVar[str] = "train_cond_vqgan"

    condition: dict[str, Any] = field(default_factory=dict)  # kind, classes, channels


@dataclass(frozen=True)
class ExportRef(Record):
    """The VQGAN export a tokenize stage encoded with, identified by its bytes."""

    train_vqgan_fingerprint: str
    weights: str
    weights_sha256: str
    config: str
    config_sha256: str


@dataclass(frozen=True)
class CondCodes(Record):
    """tokenize, in runs with conditions: the condition maps' codes stored beside the image's
    (``{key}.cond.npy``), their encoder (train_cond_vqgan's export), grid and usage."""

    STAGE: ClassVar[str] = "tokenize"

    kind: str  # the shard condition's base kind (segmentation, depth, canny, grayscale)
    classes: int  # segmentation: label classes; 0 otherwise
    vqgan: ExportRef  # train_vqgan_fingerprint: the train_cond_vqgan stage's
    grid: tuple[int, int]
    n_embed: int
    dtype: str
    histogram: dict[str, list[int]]  # split -> code counts
    usage: dict[str, dict[str, Any]]  # split -> {tokens, used, fraction, perplexity}


@dataclass(frozen=True)
class TokenizeOutputs(Record):
    """tokenize: code shards per split, their grid / dtype / codebook, usage per split."""

    STAGE: ClassVar[str] = "tokenize"
    OMIT_IF_NONE: ClassVar[tuple[str, ...]] = ("condition",)

    vqgan: ExportRef
    resolution: int
    grid: tuple[int, int]
    n_embed: int
    dtype: str
    flip: bool  # every sample also carries the codes of its mirrored image
    format: dict[str, Any]
    classes: list[str]
    num_classes: int
    shards: list[ShardFile]
    splits: dict[str, SplitCounts]
    samples: int
    tokens: int
    histogram: dict[str, list[int]]  # split -> code counts
    usage: dict[str, dict[str, Any]]  # split -> {tokens, used, fraction, perplexity}
    shards_reused: int = 0
    actors: int = 0
    device: str = "cpu"
    images_per_s: float | None = None
    seconds: float = 0.0
    condition: CondCodes | None = None  # runs with conditions (issue #16)

    def uris(self, split: str) -> list[str]:
        """The split's code shards that hold samples, in manifest order."""
        return _uris(self.shards, split)


@dataclass(frozen=True)
class GPTOutputs(Record):
    """train_transformer: the exported GPT, the VQGAN that decodes its codes, val loss."""

    STAGE: ClassVar[str] = "train_transformer"
    OMIT_IF_NONE: ClassVar[tuple[str, ...]] = ("condition",)

    steps: int
    samples_seen: int
    export: Export
    val_loss: float
    bits_per_token: float
    unigram_entropy: float
    grid: tuple[int, int]  # the trained code grid (h, w): the sampling window
    n_classes: int
    classes: list[str]
    images: list[str] = field(default_factory=list)
    checkpoint: str | None = None
    # The VQGAN export whose codes the GPT models. None in manifests written before it was
    # recorded; readers then find it through the run's DAG (pipeline.generate.find_models).
    vqgan: Export | None = None
    # Runs with conditions: the condition map the GPT reads before the image codes (kind,
    # classes, n_embed, grid, length, vqgan {weights, config}); None for other models.
    condition: dict[str, Any] | None = None


@dataclass(frozen=True)
class HighRes(Record):
    png: str  # the stacked PNG
    files: list[str]
    code_grid: tuple[int, int]
    image_size: tuple[int, int]
    classes: list[int] | None
    seconds: float
    tokens_per_s: float


@dataclass(frozen=True)
class SampleOutputs(Record):
    """sample: generated PNGs and their grid, the options, the high-resolution samples, the
    classifier check."""

    STAGE: ClassVar[str] = "sample"
    OMIT_IF_NONE: ClassVar[tuple[str, ...]] = ("condition",)

    grid_png: str
    samples_dir: str
    n: int
    n_per_class: int | None
    classes: list[str]
    code_grid: tuple[int, int]
    image_size: tuple[int, int]
    sampling_seconds: float
    tokens_per_s: float
    options: dict[str, Any]
    highres: HighRes | None = None
    classifier: dict[str, Any] | None = None
    # FID of the samples against the training images: value, tool, weights sha256, image counts;
    # or {"status": "absent", "reason": ...}. None in manifests from before FID.
    fid: dict[str, Any] | None = None
    # GPTs that read condition maps: kind, triplets_png (condition | sample | truth rows), maps
    # (which samples' maps), highres_absent (why there is no high-resolution sample).
    condition: dict[str, Any] | None = None


__all__ = ["Export", "ExportRef", "GPTOutputs", "HighRes", "ManifestError", "Record",
           "SampleOutputs", "ShardCondition", "ShardFile", "ShardOutputs", "ShardTotals",
           "SplitCounts", "TokenizeOutputs", "VQGANOutputs"]
