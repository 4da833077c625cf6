"""Stage ``tokenize``: image shards → code shards with the trained VQGAN's encoder (Ray Data).

Inputs (upstream manifests only): the shard stage's ``shards`` list and the train_vqgan stage's
``export`` (``vqgan.pt`` + ``vqgan.json``); in runs with conditions (issue #16) also the
train_cond_vqgan stage's export, which encodes each sample's condition map (``{key}.cond.png``,
center-cropped like its image; with ``store_flipped`` its mirror too) into ``{key}.cond.npy``
beside the image's codes. Layout of the stage folder::

    train/shard-000000.tar …   one code shard per image shard, same split and name
    val/shard-000000.tar …     (format: pipeline.data.codes)
    _parts/train/shard-000000.json …  sidecar per code shard: counts, sha256, code histogram and
                                      what it was made from (written after the tar)

Engine: a Ray Dataset of *shard descriptors* (``ray.data.from_items``), ``map_batches`` with the
callable class :class:`ShardTokenizer` in an actor pool (``ActorPoolStrategy(size=actors)``,
``cpus_per_actor`` CPUs each, one GPU each when the cluster has GPUs). Each actor loads the
encoder once; each call takes one whole image shard: it streams the tar, decodes and
center-crops the images (in a thread, overlapping the encoder), encodes them in minibatches,
writes the code shard atomically as it goes and returns the shard's stats. Why whole shards and
not a stream of images: outputs are grouped and named per input shard and must be written
atomically, which a per-image stream could only do by regrouping on the driver (every image
through the object store, order bookkeeping); and the dataset has no read tasks, so an actor
pool that takes every CPU cannot starve them (with read tasks, such a pool hangs a 2-CPU
cluster: the reads wait for CPUs the actors hold). Before the pool
starts, a placement group of its bundles checks that the cluster can host it (a clear
ResourceError after ``actor_start_timeout_s`` instead of a silent wait); one shard in flight per
actor balances shards over actors as they free up.

Exactness: the codes are ``VQGAN.encode(x).indices`` in fp32 for ``x`` the image's center crop
as :func:`pipeline.data.loader.eval_batches` makes it, in minibatches of ``batch_size`` in shard
order (with ``flip``, the flipped minibatch separately). ``decode_indices`` of them equals the
VQGAN's reconstruction ``model(x).recon`` of those images bit for bit (the quantizer's forward
value is exactly the code vectors, see pipeline.models.quantize).

Resume: a code shard whose sidecar matches (same input sha256, same VQGAN weights, same options,
and the tar's size) is reused, anything else is written again; tars are byte-deterministic, so a
killed and resumed run ends with the same bytes as a clean one. Test hook:
``PIPELINE_FAULT=tokenize:N`` makes the driver raise once N shards were written
(:mod:`pipeline.faults`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from pipeline.config import ConfigError, no_fingerprint
from pipeline.dag import Stage, StageContext
from pipeline.data import codes, wds
from pipeline.data.hashing import HashingReader, sha256_of
from pipeline.faults import planned
from pipeline.manifests import (
    CondCodes,
    CondVQGANOutputs,
    Export,
    ExportRef,
    ShardFile,
    ShardOutputs,
    TokenizeOutputs,
    VQGANOutputs,
)
from pipeline.ray_tasks import (
    ResourceError,
    ShardProgress,
    cluster_resources,
    images_per_s,
    require,
    require_one_process,
    split_counts,
    wait_for_room,
)
from pipeline.storage import Storage, join, remove_strays

log = logging.getLogger("pipeline")

PARTS = "_parts"
FORMAT = 1  # sidecar/output format; also the stage version


@dataclass
class TokenizeConfig:
    """Config section ``tokenize`` (see README, "tokenize")."""

    RENAMED: ClassVar[dict[str, str]] = {"flip": "store_flipped"}

    # Also store the codes of the mirrored image ({key}.flip.npy): train_transformer's
    # use_flipped can then train on them as augmentation.
    store_flipped: bool = False
    # Side of the center crop that is encoded; unset: the VQGAN's training resolution. Larger
    # (up to the shards' resolution) gives larger code grids, e.g. for sliding-window sampling.
    resolution: int | None = None
    # Images per encoder call. Results do not depend on it (eval mode, GroupNorm per sample).
    batch_size: int = no_fingerprint(64)
    actors: int = no_fingerprint(0)  # encoder actors; 0: one per GPU, else CPUs // cpus_per_actor
    cpus_per_actor: float = no_fingerprint(1.0)  # also the actor's torch threads (at least 1)
    use_gpu: bool | None = no_fingerprint(None)  # None: when the cluster has GPUs
    # Fail (instead of waiting forever) when the actors cannot all start in this time, e.g.
    # because other work holds the cluster's CPUs.
    actor_start_timeout_s: float = no_fingerprint(600.0)
    progress: bool = no_fingerprint(True)

    def validate(self) -> None:
        if self.resolution is not None and self.resolution < 1:
            raise ConfigError("resolution", f"must be >= 1 (or unset), got {self.resolution}")
        if self.batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {self.batch_size}")
        if self.actors < 0:
            raise ConfigError("actors", f"must be >= 0 (0: automatic), got {self.actors}")
        if self.cpus_per_actor <= 0:
            raise ConfigError("cpus_per_actor", f"must be > 0, got {self.cpus_per_actor}")
        if self.actor_start_timeout_s <= 0:
            raise ConfigError("actor_start_timeout_s", f"must be > 0, got "
                                                       f"{self.actor_start_timeout_s}")


# -- the export --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportInfo:
    """The VQGAN export a run tokenizes with, identified by its bytes."""

    weights: str  # URI of vqgan.pt
    config: str  # URI of vqgan.json
    weights_sha256: str
    config_sha256: str
    model: dict[str, Any]  # vqgan.json content
    train_vqgan_fingerprint: str


def read_export(storage: Storage, export: Export, fingerprint: str) -> ExportInfo:
    """The VQGAN ``export`` of the train_vqgan stage with this ``fingerprint``, hashed."""
    text = storage.read_text(export.config)
    return ExportInfo(weights=export.weights, config=export.config,
                      weights_sha256=sha256_of(storage, export.weights),
                      config_sha256=hashlib.sha256(text.encode()).hexdigest(),
                      model=json.loads(text), train_vqgan_fingerprint=fingerprint)


def load_encoder(storage: Storage, export: ExportInfo, device: str = "cpu") -> Any:
    """The VQGAN (eval mode, decoder dropped: tokenizing never decodes) from the export; raises
    when the weights are not the bytes the driver fingerprinted."""
    from pipeline.models.vqgan import VQGAN

    data = storage.read_bytes(export.weights)
    if hashlib.sha256(data).hexdigest() != export.weights_sha256:
        raise RuntimeError(f"{export.weights} changed while tokenizing (sha256 differs from the "
                           f"one recorded at the start); rerun the stage")
    model = VQGAN.from_bytes(export.model, data, map_location=device)
    model.decoder = None
    return model


# -- one shard (inside an actor) ---------------------------------------------------------------


@dataclass(frozen=True)
class CondOptions:
    """How the condition maps are encoded (runs with conditions): what the condition VQGAN
    reads (``kind``, ``classes``: :class:`pipeline.data.conditions.ConditionInput`), its code
    grid, codebook and weights."""

    kind: str  # a base kind, or downsample:N
    classes: int
    grid: tuple[int, int]
    n_embed: int
    dtype: str
    vqgan_sha256: str

    def reader(self) -> Any:
        from pipeline.data.conditions import condition_input

        return condition_input(self.kind, self.classes)

    def view(self) -> dict[str, Any]:
        return {"kind": self.kind, "classes": self.classes, "grid": list(self.grid),
                "n_embed": self.n_embed, "dtype": self.dtype, "vqgan_sha256": self.vqgan_sha256}


@dataclass(frozen=True)
class Options:
    """What every shard is tokenized with (identical for all actors)."""

    resolution: int
    grid: tuple[int, int]
    n_embed: int
    dtype: str
    flip: bool
    batch_size: int
    vqgan_sha256: str
    cond: CondOptions | None = None  # runs with conditions: encode the maps too

    def sidecar_view(self) -> dict[str, Any]:
        """The options a reused code shard must have been made with (``cond`` only in runs
        with conditions: the sidecars of other runs are unchanged)."""
        view = {"format": FORMAT, "resolution": self.resolution, "grid": list(self.grid),
                "n_embed": self.n_embed, "dtype": self.dtype, "flip": self.flip,
                "vqgan_sha256": self.vqgan_sha256}
        if self.cond is not None:
            view["cond"] = self.cond.view()
        return view


@dataclass
class SourceRead:
    """Filled in by :func:`decoded_batches` once the image shard was read to its end."""

    samples: int = 0
    sha256: str = ""


Batch = tuple[list[str], list[bytes | None], Any, Any]


def decoded_batches(storage: Storage, uri: str, resolution: int, batch_size: int,
                    read: SourceRead | None = None, cond_reader: Any = None,
                    ) -> Iterator[Batch]:
    """``(keys, raw .cls bytes or None, images [B,3,r,r] in [-1,1], conds)`` minibatches of an
    image shard, in order; each image center-cropped exactly as ``loader.eval_batches`` does.
    ``conds``: with a ``cond_reader`` (:class:`~pipeline.data.conditions.ConditionInput`), the
    samples' condition maps as its model input [B,C,r,r], cropped like their images; else None.
    At the end, ``read`` holds the sample count and the sha256 of the shard's bytes."""
    import torch

    from pipeline.data.loader import IMAGES, augment, crop_size

    read = read if read is not None else SourceRead()
    readers = [IMAGES] + ([cond_reader] if cond_reader is not None else [])
    keys: list[str] = []
    labels: list[bytes | None] = []
    tensors: list[list[Any]] = [[] for _ in readers]

    def batch() -> Batch:
        stacked = [torch.stack(t) for t in tensors]
        return keys, labels, stacked[0], stacked[1] if cond_reader is not None else None

    with storage.open(uri, "rb") as fh:
        stream = HashingReader(fh)
        for key, group in wds.iter_tar_groups(stream, uri):
            group["__key__"], group["__url__"] = key, uri  # named in a reader's errors
            for reader, out in zip(readers, tensors):
                arr = augment(reader.array(group), crop_size(reader, resolution),
                              np.random.default_rng(0), flip=False,
                              random_crop=False)  # a center crop draws nothing
                out.append(reader.tensor(arr))
            keys.append(key)
            labels.append(group.get(codes.LABEL))
            read.samples += 1
            if len(keys) == batch_size:
                yield batch()
                keys, labels, tensors = [], [], [[] for _ in readers]
        stream.drain()
        read.sha256 = stream.sha256
    if keys:
        yield batch()


def prefetch(items: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Iterate ``items`` in a background thread, up to ``depth`` ahead (decoding overlaps the
    encoder: torch and Pillow release the GIL). Exceptions surface at the same place; a consumer
    that stops early stops the thread too."""
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(kind: str, value: Any) -> bool:
        while not stop.is_set():
            try:
                q.put((kind, value), timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put("item", item):
                    return
            put("end", None)
        except BaseException as e:  # handed to the consumer
            put("error", e)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, daemon=True, name="tokenize-prefetch")
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join()


def encode_indices(model: Any, x: Any, dtype: str) -> np.ndarray:
    """``model.encode(x).indices`` as a [B, h, w] numpy array of ``dtype`` (fp32, no grad)."""
    import torch

    device = next(model.parameters()).device
    with torch.inference_mode():
        idx = model.encode(x.to(device, non_blocking=True)).indices
    return idx.cpu().numpy().astype(dtype, copy=False)


def tokenize_shard(model: Any, task: dict[str, Any], storage: Storage,
                   opts: Options, cond_model: Any = None) -> dict[str, Any]:
    """Read one image shard, encode it, write its code shard and sidecar; returns the stats.

    ``cond_model`` (runs with conditions, ``opts.cond`` set): the condition VQGAN, which
    encodes each sample's map (and its mirror with ``opts.flip``) into ``{key}.cond.npy``.
    Checks the image shard against the shard stage's manifest (sample count, sha256) and raises
    when it differs: tokenizing something else than what the manifest lists would be silent
    corruption. Stats: the sidecar (see :meth:`Options.sidecar_view` + split, name, uri, source,
    source_sha256, samples, bytes, sha256, histogram, and cond_histogram with conditions) plus
    ``seconds``.
    """
    t0 = time.perf_counter()
    hist = np.zeros(opts.n_embed, dtype=np.int64)
    cond = opts.cond
    if (cond is None) != (cond_model is None):
        raise ValueError("tokenize_shard: give the condition VQGAN exactly when opts.cond is set")
    cond_hist = np.zeros(cond.n_embed if cond else 0, dtype=np.int64)
    samples = 0
    read = SourceRead()
    batches = prefetch(decoded_batches(storage, task["source"], opts.resolution,
                                       opts.batch_size, read, cond.reader() if cond else None))
    with contextlib.closing(batches), storage.open_atomic(task["uri"]) as fh, \
            wds.shard_writer(fh) as (tar, sink):
        for keys, labels, x, c in batches:
            grids = encode_indices(model, x, opts.dtype)
            flips = encode_indices(model, x.flip(3), opts.dtype) if opts.flip else None
            members: dict[str, np.ndarray] = {codes.CODES: grids}
            if flips is not None:
                members[codes.FLIP] = flips
            if cond is not None:
                members[codes.COND] = encode_indices(cond_model, c, cond.dtype)
                if opts.flip:  # the mirrored image's map is the mirrored map
                    members[codes.COND_FLIP] = encode_indices(cond_model, c.flip(3), cond.dtype)
                cond_hist += np.bincount(members[codes.COND].reshape(-1),
                                         minlength=cond.n_embed)
            for i, key in enumerate(keys):
                sample = {"__key__": key,
                          **{name: codes.npy_bytes(g[i]) for name, g in members.items()}}
                if labels[i] is not None:
                    sample[codes.LABEL] = labels[i]
                tar.write(sample)
            hist += np.bincount(grids.reshape(-1), minlength=opts.n_embed)
            samples += len(keys)
        # Still inside open_atomic: a mismatch publishes nothing.
        source_sha = read.sha256
        if read.samples != task["source_samples"] or source_sha != task["source_sha256"]:
            raise codes.CorruptShardError(
                task["source"], f"read {read.samples} samples with sha256 {source_sha[:16]}…, the "
                f"shard manifest lists {task['source_samples']} with "
                f"{task['source_sha256'][:16]}…")
    side = {**opts.sidecar_view(), "split": task["split"], "name": task["name"],
            "uri": task["uri"], "source": task["source"], "source_sha256": source_sha,
            "samples": samples, "bytes": sink.bytes, "sha256": sink.sha256,
            "histogram": hist.tolist(), **({"cond_histogram": cond_hist.tolist()} if cond else {})}
    # The sidecar is written after the tar is final: a tar without one is redone on resume.
    storage.write_json(task["part_uri"], side)
    return {**side, "cached": False, "seconds": time.perf_counter() - t0}


class ShardTokenizer:
    """Ray Data callable class: loads the encoder once per actor; each batch row is one shard
    task, the output row its stats (JSON text, which keeps Arrow out of the histogram)."""

    def __init__(self, storage: Storage, export: ExportInfo, opts: Options, use_gpu: bool,
                 threads: int, cond_export: ExportInfo | None = None) -> None:
        import torch

        if use_gpu:
            # Exact fp32 codes: TF32 would change the encoder's float results.
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        else:
            torch.set_num_threads(threads)
        self.storage, self.opts = storage, opts
        device = "cuda" if use_gpu else "cpu"
        self.model = load_encoder(storage, export, device)
        self.cond_model = None
        if cond_export is not None:  # downsample:N maps: the image VQGAN encodes them too
            self.cond_model = (self.model if cond_export.weights_sha256 == export.weights_sha256
                               else load_encoder(storage, cond_export, device))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        fields = ("index", "split", "name", "uri", "part_uri", "source", "source_samples",
                  "source_sha256")
        out = []
        for j in range(len(batch["index"])):
            task = {k: _plain(batch[k][j]) for k in fields}
            out.append(json.dumps(tokenize_shard(self.model, task, self.storage, self.opts,
                                                 self.cond_model)))
        return {"index": batch["index"], "stats": np.array(out, dtype=object)}


def _plain(value: Any) -> Any:
    """numpy scalars from a Ray Data batch → Python values."""
    return value.item() if isinstance(value, np.generic) else value


# -- driver ------------------------------------------------------------------------------------


def plan_tasks(stage_uri: str, shards: list[ShardFile]) -> list[dict[str, Any]]:
    """One task per image shard: the code shard gets the same split folder and file name."""
    tasks = []
    for i, s in enumerate(shards):
        name = s.name  # e.g. "train/shard-000003.tar"
        stem = name[:-len(".tar")] if name.endswith(".tar") else name
        tasks.append({"index": i, "split": s.split, "name": name,
                      "uri": join(stage_uri, name), "part_uri": join(stage_uri, PARTS,
                                                                     f"{stem}.json"),
                      "source": s.uri, "source_samples": s.samples,
                      "source_sha256": s.sha256})
    return tasks


def reusable(storage: Storage, task: dict[str, Any], opts: Options) -> dict[str, Any] | None:
    """The sidecar of a finalized code shard made from this input with these options, or None
    (missing, stale, or its tar is missing or has another size) when it must be written."""
    try:
        side = storage.read_json(task["part_uri"])
        size = storage.size(task["uri"])
    except (FileNotFoundError, ValueError):
        return None
    # "cond" explicitly: a shard with condition codes is not reused by a run without them.
    want = {**opts.sidecar_view(), "cond": opts.cond.view() if opts.cond else None,
            "uri": task["uri"], "source": task["source"],
            "source_sha256": task["source_sha256"], "samples": task["source_samples"]}
    if not isinstance(side, dict) or any(side.get(k) != v for k, v in want.items()):
        return None
    if side.get("bytes") != size or len(side.get("histogram", ())) != opts.n_embed:
        return None
    if opts.cond is not None and len(side.get("cond_histogram", ())) != opts.cond.n_embed:
        return None
    return {**side, "cached": True, "seconds": 0.0}


def plan_actors(cfg: TokenizeConfig, todo: int) -> tuple[int, bool]:
    """(actors, use_gpu) for ``todo`` shards; raises ResourceError when the cluster cannot host
    them (an actor pool that cannot start waits forever instead of failing)."""
    res = cluster_resources()
    cpus, gpus = res.get("CPU", 0), int(res.get("GPU", 0))
    use_gpu = gpus > 0 if cfg.use_gpu is None else cfg.use_gpu
    if use_gpu and gpus < 1:
        raise ResourceError("tokenize.use_gpu=true but the Ray cluster has no GPU")
    if cfg.actors:
        actors = cfg.actors
    elif use_gpu:
        actors = gpus
    else:
        actors = max(1, int(cpus // cfg.cpus_per_actor + 1e-9))
    actors = max(1, min(actors, todo))
    require(f"tokenize ({actors} actors × tokenize.cpus_per_actor={cfg.cpus_per_actor:g})",
            "CPU", actors * cfg.cpus_per_actor, cpus,
            "lower tokenize.actors or tokenize.cpus_per_actor")
    if use_gpu:
        require("tokenize (one GPU per actor)", "GPU", actors, gpus, "lower tokenize.actors")
    return actors, use_gpu


def run_actors(ctx: StageContext, tasks: list[dict[str, Any]], export: ExportInfo,
               opts: Options, actors: int, use_gpu: bool,
               cond_export: ExportInfo | None = None) -> list[dict[str, Any]]:
    """Tokenize ``tasks`` with the actor pool; stats in task order, with a progress bar."""
    import ray

    cfg: TokenizeConfig = ctx.cfg
    gpu = " + 1 GPU" if use_gpu else ""
    wait_for_room({"CPU": cfg.cpus_per_actor, **({"GPU": 1} if use_gpu else {})}, actors,
                  cfg.actor_start_timeout_s,
                  f"the {actors} tokenize actors ({cfg.cpus_per_actor:g} CPUs{gpu} each; "
                  f"tokenize.actor_start_timeout_s)",
                  "lower tokenize.actors or tokenize.cpus_per_actor")
    # One block per shard: each actor call gets exactly one shard descriptor.
    ds = ray.data.from_items(tasks, override_num_blocks=len(tasks))
    ds.context.enable_progress_bars = False  # ours counts shards; Ray Data's would double it
    # Backstop for a race with other work after wait_for_room: fail instead of waiting forever.
    ds.context.wait_for_min_actors_s = math.ceil(cfg.actor_start_timeout_s)
    # One call is one whole shard: a long shard is not a stalled pipeline (Ray Data's default
    # gives up after 30 min without an output).
    ds.context.execution_no_progress_timeout_s = -1
    ds = ds.map_batches(
        ShardTokenizer,
        fn_constructor_kwargs={"storage": ctx.storage, "export": export, "opts": opts,
                               "use_gpu": use_gpu,
                               "threads": max(1, int(cfg.cpus_per_actor)),
                               "cond_export": cond_export},
        batch_size=1,
        # One shard in flight per actor: a call lasts seconds to minutes and its input is a
        # few hundred bytes, so queueing would only pin shards to busy actors (no balancing).
        compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=1 if use_gpu else 0,
    )
    done: dict[int, dict[str, Any]] = {}
    with _progress(ctx, len(tasks)) as progress:
        for row in _rows(ds, actors, cfg):
            stats = json.loads(row["stats"])
            done[int(row["index"])] = stats
            progress.done(stats["samples"])
    missing = [t["name"] for t in tasks if t["index"] not in done]
    if missing:
        raise RuntimeError(f"tokenize: no result for {len(missing)} shards ({missing[:3]}…)")
    return [done[t["index"]] for t in tasks]


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def run_local(ctx: StageContext, tasks: list[dict[str, Any]], export: ExportInfo,
              opts: Options, use_gpu: bool,
              cond_export: ExportInfo | None = None) -> list[dict[str, Any]]:
    """Tokenize ``tasks`` one after another in this process (a run without Ray): the same
    encoder set-up and per-shard function as the actors."""
    cfg: TokenizeConfig = ctx.cfg
    require_one_process("tokenize", "python -m pipeline run CONFIG --no-ray --only tokenize")
    encoder = ShardTokenizer(ctx.storage, export, opts, use_gpu,
                             threads=max(1, int(cfg.cpus_per_actor)), cond_export=cond_export)
    out = []
    with _progress(ctx, len(tasks)) as progress:
        for task in tasks:
            out.append(tokenize_shard(encoder.model, task, ctx.storage, opts, encoder.cond_model))
            progress.done(out[-1]["samples"])
    return out


def _progress(ctx: StageContext, total: int) -> ShardProgress:
    return ShardProgress("tokenize", total, ctx.tracker, ctx.cfg.progress, planned("tokenize"))


def _rows(ds: Any, actors: int, cfg: TokenizeConfig) -> Iterator[dict[str, Any]]:
    """``ds.iter_rows()``, with an actor pool that cannot start turned into a clear error."""
    import ray

    timed_out = False
    try:
        yield from ds.iter_rows()
    except ray.exceptions.GetTimeoutError as e:
        if "starting actors" not in str(e):
            raise
        timed_out = True
    if timed_out:  # raised outside the except block: the timeout's traceback can go
        raise ResourceError(
            f"the {actors} tokenize actors ({cfg.cpus_per_actor:g} CPUs each) did not all start "
            f"within tokenize.actor_start_timeout_s={cfg.actor_start_timeout_s:g}s: the cluster "
            f"is busy or too small; lower tokenize.actors or tokenize.cpus_per_actor")


def code_usage(hist: np.ndarray) -> dict[str, Any]:
    """Codes used, fraction of the codebook used, perplexity (exp entropy) of a histogram."""
    total = int(hist.sum())
    p = hist[hist > 0] / max(total, 1)
    return {"tokens": total, "used": int((hist > 0).sum()),
            "fraction": float((hist > 0).mean()),
            "perplexity": float(math.exp(-(p * np.log(p)).sum())) if total else 0.0}


def downsampling(model: dict[str, Any]) -> int:
    """A VQGAN config's downsampling factor (image side / code grid side)."""
    return 2 ** (len(model["ch_mult"]) - 1)


def check_inputs(cfg: TokenizeConfig, shard_resolution: int, model: dict[str, Any]
                 ) -> tuple[int, tuple[int, int]]:
    """(crop resolution, code grid) for shards of ``shard_resolution`` px encoded by a VQGAN of
    config ``model``; ValueError naming the key when they do not fit together."""
    factor = downsampling(model)
    resolution = cfg.resolution or int(model["resolution"])
    if resolution % factor:
        raise ConfigError("tokenize.resolution", f"must be a multiple of the VQGAN's "
                                                 f"downsampling factor {factor}, got {resolution}")
    if shard_resolution < resolution:
        raise ConfigError("tokenize.resolution", f"{resolution} is larger than the shards' "
                                                 f"images ({shard_resolution} px)")
    return resolution, (resolution // factor, resolution // factor)


def run(ctx: StageContext) -> TokenizeOutputs:
    cfg: TokenizeConfig = ctx.cfg
    storage = ctx.storage
    shard: ShardOutputs = ctx.input("shard")
    if not shard.shards:
        raise ValueError("the shard stage listed no shards to tokenize")
    vqgan: VQGANOutputs = ctx.input("train_vqgan")
    export = read_export(storage, vqgan.export, ctx.inputs["train_vqgan"]["fingerprint"])
    resolution, grid = check_inputs(cfg, shard.resolution, export.model)
    n_embed = int(export.model["n_embed"])
    cond_export = cond_options = None
    if ctx.has_input("train_cond_vqgan"):
        cond_export, cond_options = condition_encoder(ctx, resolution)
    elif shard.condition is not None and shard.condition.kind == "downsample":
        cond_export, cond_options = lowres_encoder(export, shard.condition.factor, grid)
    opts = Options(resolution=resolution, grid=grid, n_embed=n_embed,
                   dtype=codes.code_dtype(n_embed).name, flip=cfg.store_flipped,
                   batch_size=cfg.batch_size, vqgan_sha256=export.weights_sha256,
                   cond=cond_options)

    tasks = plan_tasks(ctx.uri, shard.shards)
    with ThreadPoolExecutor(16) as pool:  # sidecar checks are small I/O-bound reads
        cached = list(pool.map(lambda t: reusable(storage, t, opts), tasks))
    todo = [t for t, c in zip(tasks, cached) if c is None]
    log.info("[tokenize] %d shards (%d already finalized), grid %s, n_embed %d, flip %s%s",
             len(tasks), len(tasks) - len(todo), list(grid), n_embed, cfg.store_flipped,
             f"; {cond_options.kind} maps: grid {list(cond_options.grid)}, n_embed "
             f"{cond_options.n_embed}" if cond_options else "")

    t0 = time.perf_counter()
    fresh: list[dict[str, Any]] = []
    actors, use_gpu = 0, False
    if todo and ctx.local:
        actors, use_gpu = 1, cfg.use_gpu is not False and _cuda_available()
        fresh = run_local(ctx, todo, export, opts, use_gpu, cond_export)
    elif todo:
        actors, use_gpu = plan_actors(cfg, len(todo))
        log.info("[tokenize] %d shards to encode with %d actors (%g CPUs%s each)", len(todo),
                 actors, cfg.cpus_per_actor, ", 1 GPU" if use_gpu else "")
        fresh = run_actors(ctx, todo, export, opts, actors, use_gpu, cond_export)
    seconds = time.perf_counter() - t0
    by_index = {t["index"]: s for t, s in zip(todo, fresh)}
    results = [c if c is not None else by_index[t["index"]] for t, c in zip(tasks, cached)]
    keep = {r["uri"] for r in results} | {t["part_uri"] for t in tasks}
    subs = {u[len(ctx.uri) + 1:].split("/")[0] for u in keep} | {PARTS}
    remove_strays(storage, ctx.uri, sorted(subs), keep)
    return outputs_of(ctx, shard, export, opts, results, fresh, seconds, actors, use_gpu,
                      cond_export)


def condition_encoder(ctx: StageContext, resolution: int) -> tuple[ExportInfo, CondOptions]:
    """The train_cond_vqgan export that encodes the condition maps, and how it encodes
    ``resolution``-px crops of them; ConfigError when its downsampling does not divide them."""
    cond: CondVQGANOutputs = ctx.input("train_cond_vqgan")
    export = read_export(ctx.storage, cond.export, ctx.inputs["train_cond_vqgan"]["fingerprint"])
    factor = downsampling(export.model)
    if resolution % factor:
        raise ConfigError("tokenize.resolution", f"{resolution} must be a multiple of the "
                                                 f"condition VQGAN's downsampling factor {factor}")
    side = resolution // factor
    return export, cond_options(export, cond.condition["kind"],
                                int(cond.condition.get("classes") or 0), (side, side))


def lowres_encoder(export: ExportInfo, factor: int | None, grid: tuple[int, int]
                   ) -> tuple[ExportInfo, CondOptions]:
    """The image VQGAN as the encoder of ``downsample:N`` maps (super-resolution): they are
    enlarged back to the crop's size and encoded on the image's grid, in its codebook."""
    if not factor:
        raise ValueError("the shard manifest's downsample condition records no factor")
    return export, cond_options(export, f"downsample:{factor}", 0, grid)


def cond_options(export: ExportInfo, kind: str, classes: int, grid: tuple[int, int]
                 ) -> CondOptions:
    """How maps of ``kind`` are encoded by ``export`` onto a ``grid`` of its codes."""
    n_embed = int(export.model["n_embed"])
    return CondOptions(kind=kind, classes=classes, grid=grid, n_embed=n_embed,
                       dtype=codes.code_dtype(n_embed).name, vqgan_sha256=export.weights_sha256)


def export_ref(export: ExportInfo) -> ExportRef:
    return ExportRef(train_vqgan_fingerprint=export.train_vqgan_fingerprint,
                     weights=export.weights, weights_sha256=export.weights_sha256,
                     config=export.config, config_sha256=export.config_sha256)


def split_usage(results: list[dict[str, Any]], splits: Any, field: str
                ) -> tuple[dict[str, list[int]], dict[str, Any]]:
    """(histogram, usage) per split of the code counts ``field`` of the shards' stats."""
    histogram: dict[str, list[int]] = {}
    usage: dict[str, Any] = {}
    for split in splits:
        hist = np.sum([np.asarray(r[field], dtype=np.int64) for r in results
                       if r["split"] == split], axis=0)
        histogram[split] = hist.tolist()
        usage[split] = code_usage(hist)
    return histogram, usage


def outputs_of(ctx: StageContext, shard: ShardOutputs, export: ExportInfo, opts: Options,
               results: list[dict[str, Any]], fresh: list[dict[str, Any]], seconds: float,
               actors: int, use_gpu: bool, cond_export: ExportInfo | None = None
               ) -> TokenizeOutputs:
    """The manifest's outputs."""
    tokens_per_image = opts.grid[0] * opts.grid[1]
    splits = split_counts(results, sorted({r["split"] for r in results}), tokens_per_image)
    histogram, usage = split_usage(results, splits, "histogram")
    condition = None
    if opts.cond is not None and cond_export is not None:
        c = opts.cond
        cond_hist, cond_usage = split_usage(results, splits, "cond_histogram")
        condition = CondCodes(kind=c.kind, classes=c.classes, vqgan=export_ref(cond_export),
                              grid=c.grid, n_embed=c.n_embed, dtype=c.dtype,
                              histogram=cond_hist, usage=cond_usage)
    speed = images_per_s(fresh, seconds)
    samples = sum(s.samples for s in splits.values())
    out = TokenizeOutputs(
        vqgan=export_ref(export),
        resolution=opts.resolution,
        grid=opts.grid,
        n_embed=opts.n_embed,
        dtype=opts.dtype,
        flip=opts.flip,
        format={"codes": codes.CODES, "flip": codes.FLIP if opts.flip else None,
                "label": codes.LABEL,
                **({"cond": codes.COND, "cond_flip": codes.COND_FLIP if opts.flip else None}
                   if condition else {})},
        classes=shard.classes,
        num_classes=shard.num_classes,
        shards=[ShardFile(**{k: r[k] for k in ("split", "name", "uri", "source", "samples",
                                               "bytes", "sha256")}) for r in results],
        splits=splits,
        samples=samples,
        tokens=samples * tokens_per_image,
        histogram=histogram,
        usage=usage,
        shards_reused=len(results) - len(fresh),
        actors=actors,
        device="cuda" if use_gpu else "cpu",
        images_per_s=speed,
        seconds=round(seconds, 3),
        condition=condition,
    )
    ctx.tracker.summary({"tokenize/samples": samples, "tokenize/tokens": out.tokens,
                         "tokenize/images_per_s": speed,
                         **{f"tokenize/{s}_usage": u["fraction"] for s, u in usage.items()},
                         **{f"tokenize/{s}_perplexity": u["perplexity"]
                            for s, u in usage.items()},
                         **{f"tokenize/cond_{s}_usage": u["fraction"]
                            for s, u in (condition.usage if condition else {}).items()}})
    log.info("[tokenize] %d samples → %d tokens (grid %s), usage %s, %s images/s", samples,
             out.tokens, list(opts.grid),
             {s: round(u["fraction"], 3) for s, u in usage.items()}, speed)
    return out


def report(outputs: TokenizeOutputs) -> dict[str, Any]:
    """The report's section: how much was encoded, how the codebook is used."""
    usage = outputs.usage.get("train", {})
    h, w = outputs.grid
    return {"metrics": {
        "images": outputs.samples, "code grid": f"{h}x{w}", "tokens": outputs.tokens,
        "codebook size": outputs.n_embed,
        "codes used (train)": f"{usage.get('used', 0)} ({usage.get('fraction', 0.0):.1%})",
        "code perplexity (train)": usage.get("perplexity", 0.0),
        "images/s": outputs.images_per_s or "-", **_cond_metrics(outputs.condition)},
        "images": []}


def _cond_metrics(cond: CondCodes | None) -> dict[str, Any]:
    if cond is None:
        return {}
    usage = cond.usage.get("train", {})
    h, w = cond.grid
    return {"condition": f"{cond.kind} maps, {h}x{w} codes of {cond.n_embed}",
            "condition codes used (train)": f"{usage.get('used', 0)} "
                                            f"({usage.get('fraction', 0.0):.1%})"}


STAGE = Stage(
    name="tokenize",
    config=TokenizeConfig,
    run=run,
    report=report,
    outputs=TokenizeOutputs,
    upstream=("shard", "train_vqgan", "train_cond_vqgan"),
    optional_upstream=("train_cond_vqgan",),
    version=FORMAT,
    help="image shards → code shards with the VQGAN encoder (Ray Data actor pool)",
)
