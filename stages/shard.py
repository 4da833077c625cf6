"""Stage ``shard``: source images → WebDataset tars, one Ray task per output shard.

Layout of the stage folder::

    train/shard-000000.tar …   samples {key}.{jpg|png|webp}, {key}.cls (labelled data), {key}.json,
                               {key}.cond.png (with shard.condition; pipeline.data.conditions)
    val/shard-000000.tar …
    skipped.jsonl              one record per input that did not become a sample, sorted by key
    _parts/train/shard-000000.json …  per-shard stats + skip records (written after the tar)
    _parts/hashes.json         content hashes (dedup only), reused when the stage resumes

Determinism: inputs are listed and keyed on the driver (keys come from source paths), then
assigned to splits and shards by hashes of (seed, key) — independent of listing order and of
the number of workers. Tar headers are fixed (:mod:`pipeline.data.wds`) and encoders are
deterministic, so a run killed half-way and rerun ends with the same bytes as one clean run.

Resume: a task whose tar already exists reuses it (and its sidecar, or rebuilds the sidecar by
reading the tar back and re-checking the inputs missing from it); tars and sidecars are written
with ``Storage.open_atomic``, so a killed task leaves no half shard.

Test hook: ``PIPELINE_FAULT=shard:N`` in the driver's environment makes the stage raise once N
shards are finalized (an interrupted run, for the kill-and-resume tests; :mod:`pipeline.faults`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.config import ConfigError, fingerprint_unless_default, no_fingerprint
from pipeline.dag import Stage, StageContext
from pipeline.data import builtin, wds
from pipeline.data.conditions import (
    COLUMN_PREFIX,
    COND,
    CONDITION_MISSING,
    CONDITION_REASONS,
    CONDITION_UNREADABLE,
    GIVEN,
    MAX_CLASSES,
    NONE,
    ConditionRejected,
    ConditionSpec,
    condition_index,
    derived_condition,
    given_condition,
    pair_folder,
    parse_kind,
    split_unpaired,
)
from pipeline.data.images import (
    EXTS,
    MISSING,
    UNREADABLE,
    ImageRejected,
    ImageSpec,
    decode_square,
    encode,
    square,
)
from pipeline.data.sources import (
    IMAGE_EXTS,
    LABEL_MODES,
    NO_LABEL,
    Item,
    Listing,
    content_hash,
    list_source,
    load_item,
    source_kind,
)
from pipeline.faults import planned
from pipeline.manifests import ShardCondition, ShardFile, ShardOutputs, ShardTotals
from pipeline.ray_tasks import ShardProgress, images_per_s, run_calls, split_counts, worker_count
from pipeline.storage import (
    Storage,
    is_local,
    join,
    normalize_root,
    remove_strays,
)

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger("pipeline")

SPLITS = ("train", "val")
PARTS = "_parts"
SKIPPED = "skipped.jsonl"
# What a torchrun launch without Ray is told: shard runs in one process (ray_tasks.run_calls).
_ONE_PROCESS = {"stage": "shard",
                "command": "python -m pipeline run CONFIG --no-ray --until shard"}
_HASH_CHUNK = 256  # inputs per dedup hashing task


@dataclass
class ConditionConfig:
    """Config section ``shard.condition`` (README, "Paired conditions"): a condition map stored
    with every image as ``{key}.cond.png``; inputs without a usable one are skipped."""

    # none | segmentation | depth (given: read from `source`) | canny | grayscale |
    # downsample:N (derived from the image; N divides the resolution)
    kind: str = NONE
    # Given kinds: a folder mirroring a folder source (<source>/a/b.jpg ↔ <this>/a/b.png, any
    # image extension), or column:NAME — a file-list source's column of condition paths.
    source: str = ""
    classes: int = 0  # segmentation: the class count; ids 0..classes-1 (at most 256)
    sigma: float = 1.0  # canny: the Gaussian smoothing before edge detection

    def validate(self) -> None:
        try:
            base, _ = parse_kind(self.kind)
        except ValueError as e:
            raise ConfigError("kind", str(e)) from None
        if base in GIVEN and not self.source:
            raise ConfigError("source", f"{base} conditions are read from files: set a folder "
                                        f"URI or {COLUMN_PREFIX}NAME (a file list's column)")
        if base not in GIVEN and self.source:
            raise ConfigError("source", f"only segmentation and depth conditions are read from "
                                        f"files; kind {self.kind!r} takes no source")
        if self.source.startswith(COLUMN_PREFIX) and not self.column:
            raise ConfigError("source", f"{COLUMN_PREFIX}NAME needs a column name")
        if base == "segmentation" and not 2 <= self.classes <= MAX_CLASSES:
            raise ConfigError("classes", f"segmentation needs the class count, 2..{MAX_CLASSES} "
                                         f"(label maps are 8-bit), got {self.classes}")
        if base != "segmentation" and self.classes:
            raise ConfigError("classes", f"only segmentation conditions have classes (kind "
                                         f"{self.kind!r})")
        if self.sigma <= 0:
            raise ConfigError("sigma", f"must be > 0, got {self.sigma}")

    @property
    def column(self) -> str | None:
        """The file-list column of ``source = column:NAME``, else None."""
        if not self.source.startswith(COLUMN_PREFIX):
            return None
        return self.source[len(COLUMN_PREFIX):].strip() or None


@dataclass
class ShardConfig:
    """Config section ``shard`` (see README, "The shard stage")."""

    # A folder URI (local or s3://, recursive), a .csv/.jsonl/.parquet file list with a `path`
    # and optional `label` column, or builtin:digits[:N] / builtin:photos[:N].
    source: str = "builtin:digits"
    # auto: builtin labels / a file list's label column / none for folders;
    # folders: first-level subfolder names are the classes; none: unlabelled.
    labels: str = "auto"
    resolution: int = 256
    ext: str = "jpg"  # jpg | png | webp
    quality: int = 95  # jpg / webp
    samples_per_shard: int = 1000  # inputs per shard (shards with skipped inputs hold fewer)
    val_fraction: float = 0.05
    # Inputs whose shorter side is below this are skipped (too_small); unset: resolution // 2.
    min_size: int | None = None
    # Inputs with more pixels are skipped before decoding (decompression_bomb).
    max_pixels: int = 100_000_000
    dedup: bool = False  # drop exact duplicates (same bytes); the smallest key is kept
    jpeg_draft: bool = True  # decode JPEGs at a reduced scale still >= resolution (faster)
    num_workers: int = no_fingerprint(0)  # max concurrent tasks; 0: the cluster's CPUs
    progress: bool = no_fingerprint(True)
    # Added after the stage shipped: in the fingerprint only when set (kind none keeps the
    # fingerprints, hence the finished shards, of every earlier config).
    condition: ConditionConfig = fingerprint_unless_default(default_factory=ConditionConfig)

    def validate(self) -> None:
        if not self.source:
            raise ConfigError("source", "must be set: a folder URI, a .csv/.jsonl/.parquet file "
                                        "list, or builtin:digits / builtin:photos")
        kind = source_kind(self.source)
        if kind == "builtin":
            try:
                builtin.parse_builtin(self.source)
            except ValueError as e:
                raise ConfigError("source", str(e)) from None
        if self.labels not in LABEL_MODES:
            raise ConfigError("labels", f"must be one of {', '.join(LABEL_MODES)}, got "
                                        f"{self.labels!r}")
        if self.labels == "folders" and kind != "folder":
            raise ConfigError("labels", f"'folders' needs a folder source, not a {kind} "
                                        f"({self.source!r})")
        if not 8 <= self.resolution <= 8192:
            raise ConfigError("resolution", f"must be in [8, 8192], got {self.resolution}")
        if self.ext not in EXTS:
            raise ConfigError("ext", f"must be one of {', '.join(EXTS)}, got {self.ext!r}")
        if not 1 <= self.quality <= 100:
            raise ConfigError("quality", f"must be in [1, 100], got {self.quality}")
        if self.samples_per_shard < 1:
            raise ConfigError("samples_per_shard", f"must be >= 1, got {self.samples_per_shard}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError("val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        if self.min_size is not None and self.min_size < 1:
            raise ConfigError("min_size", f"must be >= 1 (or unset), got {self.min_size}")
        if self.max_pixels < 1:
            raise ConfigError("max_pixels", f"must be >= 1, got {self.max_pixels}")
        if self.num_workers < 0:
            raise ConfigError("num_workers", f"must be >= 0 (0: all CPUs), got {self.num_workers}")
        self._validate_condition(kind)

    def _validate_condition(self, source_kind: str) -> None:
        """What ``condition`` needs from the rest of the section (its own checks ran first)."""
        base, factor = parse_kind(self.condition.kind)
        if base == "downsample" and self.resolution % factor:
            raise ConfigError("condition.kind", f"downsample:{factor} needs a factor that "
                                                f"divides resolution {self.resolution}")
        if base not in GIVEN:
            return
        if source_kind == "builtin":
            raise ConfigError("condition.source", f"builtin sources have no {base} files; use a "
                                                  f"derived kind (canny, grayscale, "
                                                  f"downsample:N)")
        if self.condition.column and source_kind != "file_list":
            raise ConfigError("condition.source", f"{self.condition.source!r} names a column: "
                                                  f"shard.source must be a file list")
        if not self.condition.column and source_kind != "folder":
            raise ConfigError("condition.source", "a condition folder pairs with a folder "
                                                  "source by relative path; with a file list "
                                                  f"use {COLUMN_PREFIX}NAME")

    def condition_spec(self) -> ConditionSpec | None:
        """What the stored conditions are; None without a condition (kind none)."""
        base, factor = parse_kind(self.condition.kind)
        if base == NONE:
            return None
        return ConditionSpec(kind=base, resolution=self.resolution, factor=factor,
                             classes=self.condition.classes, sigma=self.condition.sigma,
                             max_pixels=self.max_pixels)

    def image_spec(self) -> ImageSpec:
        min_size = self.min_size if self.min_size is not None else max(1, self.resolution // 2)
        return ImageSpec(resolution=self.resolution, ext=self.ext, quality=self.quality,
                         min_size=min_size, max_pixels=self.max_pixels,
                         jpeg_draft=self.jpeg_draft)


# -- assignment (driver, pure) ----------------------------------------------------------------


@dataclass(frozen=True)
class ShardSpec:
    """One output shard: where it goes and which inputs it holds, in order."""

    split: str
    index: int
    uri: str
    part_uri: str
    items: tuple[Item, ...]

    @property
    def name(self) -> str:
        return f"{self.split}/shard-{self.index:06d}.tar"


def _rank(seed: int, salt: str, key: str) -> int:
    """A seeded pseudo-random rank for ``key``: stable, and independent of the other keys."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{salt}\0{key}".encode()).digest()[:8], "big")


def val_count(n: int, val_fraction: float) -> int:
    """How many of ``n`` inputs go to val: the rounded fraction, at least 1 when asked for any
    (and n > 1), never all of them."""
    if n < 2 or val_fraction <= 0:
        return 0
    return min(max(1, round(n * val_fraction)), n - 1)


def assign(items: list[Item], seed: int, val_fraction: float,
           samples_per_shard: int) -> dict[str, list[list[Item]]]:
    """Split ``items`` into train/val and chunk each split into shards, deterministically.

    Val gets the ``val_count`` inputs of lowest split-rank; each split is ordered by a second
    rank (a seeded shuffle that does not depend on how the source was listed), then cut into
    chunks of ``samples_per_shard``. Adding one input moves few others between splits.
    """
    by_split_rank = sorted(items, key=lambda it: (_rank(seed, "split", it.key), it.key))
    val_keys = {it.key for it in by_split_rank[:val_count(len(items), val_fraction)]}
    out: dict[str, list[list[Item]]] = {}
    for split in SPLITS:
        members = sorted((it for it in items if (it.key in val_keys) == (split == "val")),
                         key=lambda it: (_rank(seed, "order", it.key), it.key))
        out[split] = [members[i:i + samples_per_shard]
                      for i in range(0, len(members), samples_per_shard)]
    return out


def plan_shards(stage_uri: str, assignment: dict[str, list[list[Item]]]) -> list[ShardSpec]:
    specs = []
    for split in SPLITS:
        for index, chunk in enumerate(assignment[split]):
            name = f"shard-{index:06d}"
            specs.append(ShardSpec(split, index, join(stage_uri, split, f"{name}.tar"),
                                   join(stage_uri, PARTS, split, f"{name}.json"), tuple(chunk)))
    return specs


def items_digest(items: tuple[Item, ...] | list[Item]) -> str:
    """sha256 of what a shard (or a hash cache) was made from: keys, URIs, labels and paired
    condition files in order (items without a condition file hash as before conditions)."""
    h = hashlib.sha256()
    for it in items:
        cond = "" if it.cond is None else f"\0{it.cond}"
        h.update(f"{it.key}\0{it.uri}\0{it.label}{cond}\n".encode())
    return h.hexdigest()


# -- dedup ------------------------------------------------------------------------------------
#
# Which copy of a duplicate survives changes what each shard holds, so duplicates must be known
# before assignment: one content hash per input, before any shard task starts. Hashing on the
# driver would read the whole source through one process; instead Ray tasks hash chunks of the
# sorted input list in parallel. Every input is then read twice (hash pass, shard pass), but a
# sha256 runs at ~1 GB/s, cheap next to decode + resize + encode, and the pass only exists with
# dedup on. The hashes are cached in the stage folder, so a resumed run does not repeat it.


def hash_items(items: list[Item], storage: Storage) -> list[str | None]:
    """Ray task body: content hash of each input (None: unreadable; the shard pass says why)."""
    return [content_hash(it, storage) for it in items]


def find_duplicates(items: list[Item], hashes: dict[str, str | None]
                    ) -> tuple[list[Item], list[dict[str, str]]]:
    """Keep the smallest key of each group of identical inputs; returns (kept, duplicates)."""
    first: dict[str, Item] = {}
    kept, dups = [], []
    for it in sorted(items, key=lambda i: i.key):
        h = hashes.get(it.key)
        if h is not None and h in first:
            dups.append({"key": it.key, "source": it.uri, "duplicate_of": first[h].key,
                         "sha256": h})
            continue
        if h is not None:
            first[h] = it
        kept.append(it)
    return kept, dups


def _content_hashes(ctx: StageContext, items: list[Item], workers: int) -> dict[str, str | None]:
    cache_uri = join(ctx.uri, PARTS, "hashes.json")
    digest = items_digest(items)
    try:
        cached = ctx.storage.read_json(cache_uri)
        if cached.get("items_digest") == digest:
            return cached["hashes"]
    except (FileNotFoundError, ValueError, KeyError, AttributeError):
        pass
    chunks = [items[i:i + _HASH_CHUNK] for i in range(0, len(items), _HASH_CHUNK)]
    results = run_calls(hash_items, [(chunk, ctx.storage) for chunk in chunks], workers,
                        local=ctx.local, **_ONE_PROCESS)
    hashes = {it.key: h for i, chunk in enumerate(chunks) for it, h in zip(chunk, results[i])}
    ctx.storage.write_json(cache_uri, {"items_digest": digest, "hashes": hashes})
    return hashes


# -- one shard (Ray task) ---------------------------------------------------------------------


def make_condition(item: Item, storage: Storage, cond: ConditionSpec, img: Image.Image,
                   size: tuple[int, int]) -> tuple[bytes, dict[str, Any]]:
    """The stored condition of an input whose image became ``img`` (the square, not encoded)
    from a source of displayed ``size``: (PNG bytes, fields for the sample's json).

    Raises ConditionRejected (a given condition file missing, unreadable or mismatched).
    """
    if not cond.given:
        return derived_condition(img, cond), {}
    if not item.cond:
        raise ConditionRejected(CONDITION_MISSING, "no condition file is paired with the input")
    try:
        raw = storage.read_bytes(item.cond)
    except FileNotFoundError:
        raise ConditionRejected(CONDITION_MISSING, f"{item.cond} does not exist") from None
    except (IsADirectoryError, PermissionError) as e:
        raise ConditionRejected(CONDITION_UNREADABLE, f"{item.cond}: {type(e).__name__}") from None
    data, (width, height) = given_condition(raw, size, cond)
    return data, {"condition": item.cond, "condition_width": width, "condition_height": height}


def make_sample(item: Item, storage: Storage, spec: ImageSpec, cond: ConditionSpec | None = None
                ) -> tuple[dict[str, Any] | None, tuple[str, str] | None]:
    """One input → (WebDataset sample, None) or (None, (reason, detail)) when it is skipped.

    With ``cond`` the sample also holds ``{key}.cond.png``; the image is checked first, so an
    input with a bad image is skipped for the image's reason.
    """
    try:
        raw = load_item(item, storage)
    except FileNotFoundError:
        return None, (MISSING, "the source file does not exist")
    except (IsADirectoryError, PermissionError) as e:
        return None, (UNREADABLE, type(e).__name__)
    try:
        if isinstance(raw, bytes):
            img, (width, height) = decode_square(raw, spec)
        else:  # builtin items are trusted images, not files: no size checks
            img, (width, height) = square(raw, spec), raw.size
    except ImageRejected as r:
        return None, (r.reason, r.detail)
    meta: dict[str, Any] = {"source": item.uri, "width": width, "height": height}
    sample: dict[str, Any] = {"__key__": item.key, spec.ext: encode(img, spec.ext, spec.quality)}
    if cond is not None:
        try:
            sample[COND], extra = make_condition(item, storage, cond, img, (width, height))
        except ConditionRejected as r:
            return None, (r.reason, r.detail)
        meta.update(extra)
    sample["json"] = json.dumps(meta, sort_keys=True).encode()
    if item.label != NO_LABEL:
        sample["cls"] = str(item.label).encode()
    return sample, None


def _skip_record(shard: ShardSpec, item: Item, reason: str, detail: str) -> dict[str, Any]:
    return {"key": item.key, "source": item.uri, "reason": reason, "detail": detail,
            "split": shard.split, "shard": shard.name}


def _reuse_finalized(shard: ShardSpec, spec: ImageSpec, storage: Storage,
                     cond: ConditionSpec | None = None) -> dict[str, Any] | None:
    """Stats of an already finalized shard, or None when it must be written again.

    The sidecar is trusted when it describes these inputs and the tar's size. Without one (the
    task died between the tar and its sidecar) the tar is read back; the inputs it lacks are
    checked again — each must still be rejected, for the same deterministic reason — and the
    sidecar is rebuilt. A tar from other inputs (the source changed) is rewritten.
    """
    digest = items_digest(shard.items)
    try:
        side = storage.read_json(shard.part_uri)
        if side.get("items_digest") == digest and side.get("bytes") == storage.size(shard.uri):
            return side
    except (FileNotFoundError, ValueError, AttributeError):
        pass
    try:
        size, sha, keys = wds.digest(storage, shard.uri)
    except Exception as e:  # unreadable tar: write it again
        log.warning("shard %s: cannot read back %s (%s); rewriting", shard.name, shard.uri, e)
        return None
    present = set(keys)
    if keys != [it.key for it in shard.items if it.key in present]:
        return None
    skipped = []
    for it in shard.items:
        if it.key in present:
            continue
        sample, why = make_sample(it, storage, spec, cond)
        if why is None:
            return None
        skipped.append(_skip_record(shard, it, *why))
    stats = _stats(shard, digest, len(keys), size, sha, skipped)
    storage.write_json(shard.part_uri, stats)
    return stats


def _stats(shard: ShardSpec, digest: str, samples: int, size: int, sha: str,
           skipped: list[dict[str, Any]]) -> dict[str, Any]:
    return {"split": shard.split, "index": shard.index, "name": shard.name, "uri": shard.uri,
            "samples": samples, "bytes": size, "sha256": sha, "items_digest": digest,
            "skipped": skipped}


def write_shard(shard: ShardSpec, spec: ImageSpec, storage: Storage,
                cond: ConditionSpec | None = None) -> dict[str, Any]:
    """Ray task body: write one shard (or reuse it if finalized); returns its stats.

    Stats: split, index, name, uri, samples, bytes, sha256, items_digest, skipped (records),
    plus ``cached`` (reused) and ``seconds`` (time spent here).
    """
    t0 = time.perf_counter()
    if storage.exists(shard.uri):
        stats = _reuse_finalized(shard, spec, storage, cond)
        if stats is not None:
            return {**stats, "cached": True, "seconds": time.perf_counter() - t0}
    skipped: list[dict[str, Any]] = []
    samples = 0
    with storage.open_atomic(shard.uri) as fh, wds.shard_writer(fh) as (tar, sink):
        for item in shard.items:
            sample, why = make_sample(item, storage, spec, cond)
            if why is not None:
                skipped.append(_skip_record(shard, item, *why))
                continue
            tar.write(sample)
            samples += 1
    # The sidecar is written after the tar is final: a tar without one is handled on resume.
    stats = _stats(shard, items_digest(shard.items), samples, sink.bytes, sink.sha256, skipped)
    storage.write_json(shard.part_uri, stats)
    return {**stats, "cached": False, "seconds": time.perf_counter() - t0}


# -- driver -----------------------------------------------------------------------------------


def _run_shard_tasks(ctx: StageContext, specs: list[ShardSpec], spec: ImageSpec,
                     cond: ConditionSpec | None, workers: int) -> list[dict[str, Any]]:
    """One task per shard, at most ``workers`` at a time, with a progress bar; results in spec
    order."""
    with ShardProgress("shard", len(specs), ctx.tracker, ctx.cfg.progress,
                       planned("shard")) as progress:
        return run_calls(write_shard, [(s, spec, ctx.storage, cond) for s in specs], workers,
                         lambda i, result: progress.done(result["samples"]), local=ctx.local,
                         **_ONE_PROCESS)


def _warm_up(source: str, canny: bool = False) -> None:
    """Ray task: import and load what shard tasks need while the driver lists the source.

    A fresh worker spends seconds importing webdataset (which imports torch) and, for builtin
    sources or canny conditions, scikit-learn / scikit-image; doing it now overlaps that with
    the listing.
    """
    import webdataset  # noqa: F401

    if source_kind(source) == "builtin":
        builtin.preload(source)
    if canny:
        import skimage.feature  # noqa: F401


def _absolute(source: str) -> str:
    """Local sources as absolute paths: Ray workers run in other folders."""
    if source.startswith("builtin:") or not is_local(source):
        return source
    return normalize_root(source)


def pair_conditions(cfg: ShardConfig, source: str, storage: Storage, listing: Listing
                    ) -> Listing:
    """The listing with every input paired with its given condition file; inputs without one
    move to ``rejected`` (``condition_missing``). Derived kinds and kind none: unchanged.

    Raises ValueError when no input has a condition file (a wrong ``condition.source``).
    """
    c = cfg.condition
    if parse_kind(c.kind)[0] not in GIVEN:
        return listing
    if c.column:
        items, missing = split_unpaired(listing.items, c.column)
    else:
        cond_root = _absolute(c.source)
        index = condition_index(cond_root, storage.walk_files(cond_root), IMAGE_EXTS)
        items, missing = pair_folder(listing.items, source, cond_root, index)
    if not items:
        raise ValueError(f"shard.condition.source {c.source!r}: none of {len(listing.items)} "
                         f"inputs has a condition file")
    rejected = sorted(listing.rejected + missing, key=lambda r: (r["key"], r["source"]))
    return dataclasses.replace(listing, items=items, rejected=rejected)


def condition_record(cfg: ShardConfig, cond: ConditionSpec | None, samples: int,
                     skipped: list[dict[str, Any]]) -> ShardCondition | None:
    """The manifest's ``condition``: what every sample's ``{key}.cond.png`` is."""
    if cond is None:
        return None
    counts = Counter(r["reason"] for r in skipped if r["reason"] in CONDITION_REASONS)
    return ShardCondition(
        kind=cond.kind, member=COND, given=cond.given, source=cfg.condition.source or None,
        classes=cond.classes if cond.kind == "segmentation" else None,
        factor=cond.factor if cond.kind == "downsample" else None,
        sigma=cond.sigma if cond.kind == "canny" else None,
        channels=cond.channels, size=(cond.side, cond.side), bit_depth=cond.bit_depth,
        resample=cond.resample, paired=samples, skipped=dict(sorted(counts.items())))


def _no_input_error(source: str, listing: Listing) -> ValueError:
    extra = f" ({listing.ignored_files} non-image files ignored)" if listing.ignored_files else ""
    extra += f" ({len(listing.rejected)} entries rejected)" if listing.rejected else ""
    return ValueError(f"shard.source {source!r} holds no image to shard{extra}")


def run(ctx: StageContext) -> ShardOutputs:
    cfg: ShardConfig = ctx.cfg
    storage = ctx.storage
    seed = int(ctx.root_cfg.seed)
    source = _absolute(cfg.source)
    spec = cfg.image_spec()
    cond = cfg.condition_spec()

    workers = worker_count(cfg.num_workers, "shard", ctx.local)
    warming = []
    if not ctx.local:
        import ray

        canny = cond is not None and cond.kind == "canny"
        warming = [ray.remote(num_cpus=1)(_warm_up).remote(source, canny)
                   for _ in range(workers)]
    listing = list_source(source, storage, cfg.labels, seed, cfg.condition.column)
    if not listing.items:
        raise _no_input_error(cfg.source, listing)
    listing = pair_conditions(cfg, source, storage, listing)
    items, duplicates = listing.items, []
    if cfg.dedup:
        items, duplicates = find_duplicates(items, _content_hashes(ctx, items, workers))
    specs = plan_shards(ctx.uri, assign(items, seed, cfg.val_fraction, cfg.samples_per_shard))
    log.info("[shard] %d inputs (%d duplicates dropped, %d rejected at listing) → %d shards, "
             "%d workers", len(items), len(duplicates), len(listing.rejected), len(specs),
             workers)

    t0 = time.perf_counter()
    results = _run_shard_tasks(ctx, specs, spec, cond, workers)
    seconds = time.perf_counter() - t0
    if warming:
        import ray

        ray.get(warming)  # long done; surfaces an import error a shard task would also have hit

    skipped = list(listing.rejected) + [r for res in results for r in res["skipped"]]
    skipped.sort(key=lambda r: (r["key"], r["source"], r["reason"]))
    storage.write_text(join(ctx.uri, SKIPPED),
                       "".join(json.dumps(r, sort_keys=True) + "\n" for r in skipped))
    total = sum(r["samples"] for r in results)
    if total == 0:
        raise ValueError(f"shard.source {cfg.source!r}: none of {len(items)} inputs is a valid "
                         f"image; reasons in {join(ctx.uri, SKIPPED)}")
    keep = {r["uri"] for r in results} | {s.part_uri for s in specs}
    remove_strays(storage, ctx.uri, (*SPLITS, *(f"{PARTS}/{s}" for s in SPLITS)), keep)

    fresh = [r for r in results if not r["cached"]]
    speed = images_per_s(fresh, seconds)
    splits = split_counts(results, SPLITS)
    outputs = ShardOutputs(
        source=cfg.source,
        resolution=cfg.resolution,
        ext=cfg.ext,
        seed=seed,
        classes=listing.classes,
        num_classes=len(listing.classes),
        shards=[ShardFile(**{k: r[k] for k in ("split", "name", "uri", "samples", "bytes",
                                               "sha256")}) for r in results],
        splits=splits,
        totals=ShardTotals(inputs=len(listing.items) + len(listing.rejected), samples=total,
                           skipped=len(skipped), duplicates=len(duplicates),
                           ignored_files=listing.ignored_files,
                           bytes=sum(r["bytes"] for r in results)),
        skipped=dict(sorted(Counter(r["reason"] for r in skipped).items())),
        skipped_uri=join(ctx.uri, SKIPPED),
        duplicates=duplicates,
        shards_reused=len(results) - len(fresh),
        images_per_s=speed,
        seconds=round(seconds, 3),
        condition=condition_record(cfg, cond, total, skipped),
    )
    ctx.tracker.summary({"shard/samples": total, "shard/train_samples": splits["train"].samples,
                         "shard/val_samples": splits["val"].samples,
                         "shard/skipped": len(skipped), "shard/duplicates": len(duplicates),
                         "shard/images_per_s": speed})
    log.info("[shard] %d samples (train %d, val %d), %d skipped %s, %s images/s", total,
             splits["train"].samples, splits["val"].samples, len(skipped),
             outputs.skipped, speed)
    return outputs


def report(outputs: ShardOutputs) -> dict[str, Any]:
    """The report's section: counts and speed."""
    splits, totals = outputs.splits, outputs.totals
    metrics: dict[str, Any] = {
        "source": outputs.source, "resolution (px)": outputs.resolution,
        "classes": outputs.num_classes, "train samples": splits["train"].samples,
        "val samples": splits["val"].samples, "skipped inputs": totals.skipped,
        "duplicates": totals.duplicates, "images/s": outputs.images_per_s or "-"}
    if outputs.condition is not None:
        metrics["condition"] = outputs.condition.kind
    return {"metrics": metrics, "images": []}


STAGE = Stage(
    name="shard",
    config=ShardConfig,
    run=run,
    version=1,
    report=report,
    outputs=ShardOutputs,
    help="source images → WebDataset train/val tar shards (Ray tasks)",
)
