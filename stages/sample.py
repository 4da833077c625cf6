"""sample: images from the trained GPT + VQGAN, and a check that they are recognisable.

Writes into the stage folder: ``samples/`` (one PNG per sample at native resolution, N per class
or N unconditional, plus ``samples/grid.png``: one row per class, enlarged for viewing),
``highres/`` (sliding-window samples on a code grid larger than the trained one, decoded to
high-resolution PNGs, and ``highres/highres.png`` stacking them), ``samples.json`` (which file
holds which class, the options) and, for class-conditional runs, the classifier check: a simple
classifier fitted on the real training images (:mod:`pipeline.classifier`) labels the generated
images; the share it assigns to the class they were generated for is ``classifier.accuracy``.
``fid`` is the samples' FID against the real training images (:mod:`pipeline.fid`; absent, with
the reason, when turned off or without Inception weights).

A GPT that reads condition maps (runs with ``shard.condition``, issue #16) samples for the maps
of the first ``n`` val images instead (``samples/`` one PNG each, ``samples/triplets.png``: rows of
condition | sample | truth), and its high-resolution samples come from those images' whole maps
when the shards are larger than the trained size (sliding window, the condition cropped under
it): ``highres/highres.png`` rows of condition | sample.

The work runs in one Ray task (a GPU when ``use_gpu``), so on a cluster it lands on a worker
node, not the driver. Outputs are a function of the config and the run's seed: a rerun after a
crash simply writes them again.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import ConfigError, no_fingerprint
from pipeline.dag import Stage, StageContext
from pipeline.fid import FIDConfig
from pipeline.manifests import HighRes, SampleOutputs, ShardOutputs
from pipeline.seeds import derive
from pipeline.storage import Storage, join

log = logging.getLogger("pipeline")


@dataclass
class SampleConfig:
    """Sampling options of the sample stage."""

    n: int = 10  # samples per class (class-conditional) or in total (unconditional)
    temperature: float = 1.0
    top_k: int = 100  # 0: off; 100 as the reference's sampling scripts
    top_p: float = 1.0  # 1: off
    cfg_scale: float = 1.0  # classifier-free guidance scale; 1: off
    highres: list[int] = field(default_factory=lambda: [16, 32])  # code grid H, W; []: none
    highres_n: int = 2  # high-resolution samples (classes taken in turn)
    classifier: bool = True  # fit a classifier on the real images, score the generated ones
    classifier_images: int = 5000  # real training images it sees at most
    # FID of the samples vs the training images (at most fid.images of each); measurement
    # only, outside the fingerprint.
    fid: FIDConfig = no_fingerprint(default_factory=FIDConfig)
    batch_size: int = no_fingerprint(64)
    use_gpu: bool = no_fingerprint(False)
    num_cpus: float = no_fingerprint(2.0)
    progress: bool = no_fingerprint(True)

    def validate(self) -> None:
        for name in ("n", "batch_size", "classifier_images"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        self.options().check()  # the sampling options' one check ("key: message" errors)
        if self.highres and (len(self.highres) != 2 or min(self.highres) < 1):
            raise ConfigError("highres", f"must be [H, W] (code grid) or [], got {self.highres}")
        if self.highres_n < 0:
            raise ConfigError("highres_n", f"must be >= 0, got {self.highres_n}")
        if self.num_cpus <= 0:
            raise ConfigError("num_cpus", f"must be > 0, got {self.num_cpus}")

    def options(self) -> Any:
        from pipeline.generate import SampleOptions

        # 0 / 1 mean "off" in the config; any other value is checked by SampleOptions.check.
        return SampleOptions(temperature=self.temperature,
                             top_k=None if self.top_k == 0 else self.top_k,
                             top_p=None if self.top_p == 1 else self.top_p,
                             cfg_scale=self.cfg_scale)


# -- the task --------------------------------------------------------------------------------------


def real_batches(storage: Storage, shards: list[str], size: int, limit: int) -> Any:
    from pipeline.data.loader import eval_batches

    return eval_batches(storage, shards, 256, size, limit=limit)


def check_with_classifier(storage: Storage, train: list[str], val: list[str], size: int,
                          limit: int, n_classes: int, images: Any, labels: Any,
                          seed: int) -> dict[str, Any]:
    """Fit the classifier on real training images; its accuracy on real val images (how good
    the yardstick is) and on the generated ``images`` (the figure)."""
    from pipeline import classifier

    clf = classifier.fit(real_batches(storage, train, size, limit), n_classes, seed)
    result: dict[str, Any] = {"train_images": clf.train_images,
                              "features": f"gray {classifier.FEATURE_SIDE}x"
                                          f"{classifier.FEATURE_SIDE}, standardised per image, "
                                          "logistic regression"}
    if val:
        import torch

        real = list(real_batches(storage, val, size, limit))
        x = torch.cat([b[0] for b in real])
        y = torch.cat([b[1] for b in real])
        result["real_val"] = clf.accuracy(x, y)
    result.update(clf.accuracy(images, labels))
    return result


def sample_fid(cfg: FIDConfig, storage: Storage, images: Any, train: list[str],
               device: Any) -> dict[str, Any]:
    """FID of the generated ``images`` ([N, 3, H, W] in [-1, 1]) against real training images
    center-cropped to their size, at most ``cfg.images`` of each; or the absent record."""
    import torch

    from pipeline.fid import fid, open_inception

    inception, absent = open_inception(cfg, storage, device, "[sample] FID")
    if inception is None:
        return absent
    # Evenly spaced, not the first ones: samples are class-major, a prefix would miss classes.
    images = images[torch.linspace(0, len(images) - 1, min(len(images), cfg.images)).round()
                    .long()]
    real = (x for x, _ in real_batches(storage, train, int(images.shape[-1]), cfg.images))
    return fid(inception, images.split(cfg.batch_size), real, cfg.images, "training images")


def sample_task(cfg: SampleConfig, storage: Storage, uri: str, models: Any, data: dict[str, Any],
                seed: int, baseline: Any = None) -> SampleOutputs:
    """Everything the stage computes; runs in a Ray task (or inline)."""
    import torch

    from pipeline import generate as g
    from pipeline.metrics import png_bytes

    torch.set_num_threads(max(1, int(cfg.num_cpus)))
    device = "cuda" if cfg.use_gpu and torch.cuda.is_available() else "cpu"
    gpt, vqgan = g.load_models(storage, models, device)
    if models.condition is not None:
        return conditional_sample_task(cfg, storage, uri, models, data, seed, gpt, vqgan, device,
                                       baseline)
    n_classes = len(models.classes)
    labels = g.class_labels(cfg.n, range(n_classes)) if n_classes else None
    n = len(labels) if labels is not None else cfg.n
    out = g.generate(gpt, vqgan, n, labels, models.grid, options=cfg.options(), seed=seed,
                     batch_size=cfg.batch_size, progress=cfg.progress)
    names = g.sample_names(labels, n, models.classes)
    files, grid_uri = g.write_pngs(storage, join(uri, "samples"), out.images, names,
                                   cols=cfg.n if n_classes else min(cfg.n, 10))
    index = [{"file": name, "class": int(k) if labels is not None else None}
             for name, k in zip(names, labels.tolist() if labels is not None else [None] * n,
                                strict=True)]
    highres = classifier = None

    if cfg.highres and cfg.highres_n:
        grid = (int(cfg.highres[0]), int(cfg.highres[1]))
        if grid[0] < models.grid[0] or grid[1] < models.grid[1]:
            raise ConfigError("highres", f"{list(grid)} is smaller than the trained code grid "
                                         f"{list(models.grid)}")
        hl = (torch.arange(cfg.highres_n) % n_classes) if n_classes else None
        big = g.generate(gpt, vqgan, cfg.highres_n, hl, models.grid, grid,
                         options=cfg.options(), seed=derive(seed, "highres"),
                         batch_size=cfg.batch_size)
        hnames = [f"highres-{i:02d}.png" for i in range(cfg.highres_n)]
        g.write_pngs(storage, join(uri, "highres"), big.images, hnames, cols=1)
        stacked = join(uri, "highres", "highres.png")
        storage.write_bytes(stacked, png_bytes(g.highres_png(big.images)))
        highres = HighRes(
            png=stacked, files=[join(uri, "highres", h) for h in hnames], code_grid=grid,
            image_size=tuple(big.images.shape[-2:]),
            classes=hl.tolist() if hl is not None else None,
            seconds=round(big.seconds, 3), tokens_per_s=round(big.tokens_per_s, 1))

    if cfg.classifier and n_classes >= 2:
        classifier = check_with_classifier(
            storage, data["train"], data["val"], int(out.images.shape[-1]),
            cfg.classifier_images, n_classes, out.images, labels, seed)
    fid = sample_fid(cfg.fid, storage, out.images, data["train"], device)
    result = SampleOutputs(
        grid_png=grid_uri, samples_dir=join(uri, "samples"), n=n,
        n_per_class=cfg.n if n_classes else None, classes=models.classes,
        code_grid=models.grid, image_size=tuple(out.images.shape[-2:]),
        sampling_seconds=round(out.seconds, 3), tokens_per_s=round(out.tokens_per_s, 1),
        options=cfg.options().to_dict(), highres=highres, classifier=classifier, fid=fid)
    storage.write_json(join(uri, "samples.json"), {**result.to_dict(), "files": index})
    return result


def condition_examples(storage: Storage, shards: list[str], n: int, size: int, reader: Any
                       ) -> tuple[Any, Any, Any]:
    """The first ``n`` samples of ``shards``, center-cropped to ``size`` px: (images [n,3,s,s],
    their condition maps as the condition VQGAN reads them [n,C,s,s], labels [n])."""
    import torch

    from pipeline.data.loader import eval_batches

    images = list(eval_batches(storage, shards, n, size, limit=n))
    maps = list(eval_batches(storage, shards, n, size, limit=n, reader=reader))
    return (torch.cat([x for x, _ in images]), torch.cat([m for m, _ in maps]),
            torch.cat([y for _, y in images]))


def follows_condition(kind: str, shard_condition: dict[str, Any] | None, maps: Any,
                      samples: Any, truth: Any) -> dict[str, Any] | None:
    """How well ``samples`` follow their edge ``maps`` (``canny`` runs; None otherwise): edge
    F1 (:func:`pipeline.metrics.edge_f1`) of the samples, and beside it of the real images
    (``truth``, the ceiling: their edges are the maps, up to the crop's border) and of the same
    samples against another sample's map (``other_maps``, chance: images that ignore this map
    but are otherwise alike)."""
    from pipeline.metrics import edge_f1

    if kind != "canny" or not shard_condition or len(maps) < 2:
        return None
    sigma = float(shard_condition["sigma"])
    return {"samples": edge_f1(maps, samples, sigma), "real_images": edge_f1(maps, truth, sigma),
            "other_maps": edge_f1(maps.roll(1, 0), samples, sigma), "sigma": sigma,
            "tolerance_px": 1}


def mosaics(maps: Any) -> Any:
    """[4k, C, s, s] maps -> [k, C, 2s, 2s]: each four in turn tiled 2 x 2 (row-major)."""
    k, c, h, w = maps.shape[0] // 4, *maps.shape[1:]
    tiles = maps[:4 * k].reshape(k, 2, 2, c, h, w)  # [k, row, col, C, h, w]
    return tiles.permute(0, 3, 1, 4, 2, 5).reshape(k, c, 2 * h, 2 * w)


def conditional_sample_task(cfg: SampleConfig, storage: Storage, uri: str, models: Any,
                            data: dict[str, Any], seed: int, gpt: Any, vqgan: Any,
                            device: str, baseline: Any = None) -> SampleOutputs:
    """The sample stage of a GPT that reads condition maps (module docstring); ``baseline``:
    the models of train_baseline_transformer (the same data without maps), whose samples are
    scored against the same maps."""
    import torch

    from pipeline import generate as g
    from pipeline.metrics import edge_f1, grid, png_bytes, to_uint8, upscale

    reader = g.condition_input(models)
    cond_vqgan = g.load_cond_vqgan(storage, models, device)
    factor = vqgan.config.downsample_factor
    size = models.grid[0] * factor
    split = "val" if data["val"] else "train"
    n_classes = len(models.classes)

    def encode(maps: Any) -> Any:
        with torch.inference_mode():
            return cond_vqgan.encode(maps.to(device)).indices.cpu()

    def rows(*columns: Any) -> bytes:  # [n,3,H,W] each -> one PNG, a row per sample
        pixels = to_uint8(torch.stack(columns, 1).flatten(0, 1))
        return png_bytes(upscale(grid(pixels, cols=len(columns)),
                                 g.display_factor(pixels.shape[1])))

    images, maps, labels = condition_examples(storage, data[split], cfg.n, size, reader)
    n = len(images)
    lab = labels.clamp(min=0) if n_classes else None
    out = g.generate(gpt, vqgan, n, lab, models.grid, options=cfg.options(), seed=seed,
                     batch_size=cfg.batch_size, progress=cfg.progress, cond_grids=encode(maps))
    names = [f"sample-{i:03d}.png" for i in range(n)]
    _, grid_uri = g.write_pngs(storage, join(uri, "samples"), out.images, names,
                               cols=min(n, 10))
    triplets = join(uri, "samples", "triplets.png")
    storage.write_bytes(triplets, rows(reader.preview(maps), out.images, images))
    index = [{"file": name, "class": int(k) if lab is not None else None, "condition_of":
              f"{split} sample {i}"} for i, (name, k) in enumerate(zip(names, labels.tolist()))]

    highres, why, source = None, None, None
    big = data["resolution"] // factor * factor
    k = min(cfg.highres_n, n if big > size else n // 4)
    if not cfg.highres_n:
        why = "sample.highres_n is 0"
    elif k == 0:
        why = f"2x2 mosaics of the maps need sample.n >= 4, got {n}"
    else:
        if big > size:  # the shards are larger than the trained crops: their whole maps
            _, full, _ = condition_examples(storage, data[split], k, big, reader)
            source = f"the whole {big} px maps of the first {k} {split} samples"
        else:  # as large as the crops: 2x2 mosaics of the maps (4x the trained area)
            full, big = mosaics(maps[:4 * k]), 2 * size
            source = f"2x2 mosaics of the first {4 * k} {split} maps"
        hgrid = (big // factor, big // factor)
        hr = g.generate(gpt, vqgan, k, lab[:k] if lab is not None else None, models.grid, hgrid,
                        options=cfg.options(), seed=derive(seed, "highres"),
                        batch_size=cfg.batch_size, cond_grids=encode(full))
        hnames = [f"highres-{i:02d}.png" for i in range(k)]
        g.write_pngs(storage, join(uri, "highres"), hr.images, hnames, cols=1)
        stacked = join(uri, "highres", "highres.png")
        storage.write_bytes(stacked, rows(reader.preview(full), hr.images))
        highres = HighRes(
            png=stacked, files=[join(uri, "highres", h) for h in hnames], code_grid=hgrid,
            image_size=tuple(hr.images.shape[-2:]),
            classes=lab[:k].tolist() if lab is not None else None,
            seconds=round(hr.seconds, 3), tokens_per_s=round(hr.tokens_per_s, 1))
    if why:
        log.info("[sample] no high-resolution samples: %s", why)
    follows = follows_condition(reader.kind, data.get("condition"), maps, out.images, images)
    unconditional = None
    if baseline is not None:
        base_gpt, base_vqgan = g.load_models(storage, baseline, device)
        base = g.generate(base_gpt, base_vqgan, n, lab, baseline.grid, options=cfg.options(),
                          seed=derive(seed, "baseline"), batch_size=cfg.batch_size)
        unconditional = join(uri, "samples", "unconditional.png")
        storage.write_bytes(unconditional, rows(reader.preview(maps), base.images))
        if follows is not None:
            follows["unconditional_model"] = edge_f1(maps, base.images, follows["sigma"])

    classifier = None
    if cfg.classifier and n_classes >= 2:
        classifier = check_with_classifier(
            storage, data["train"], data["val"], size, cfg.classifier_images, n_classes,
            out.images, lab, seed)
    fid = sample_fid(cfg.fid, storage, out.images, data["train"], device)
    result = SampleOutputs(
        grid_png=grid_uri, samples_dir=join(uri, "samples"), n=n, n_per_class=None,
        classes=models.classes, code_grid=models.grid, image_size=tuple(out.images.shape[-2:]),
        sampling_seconds=round(out.seconds, 3), tokens_per_s=round(out.tokens_per_s, 1),
        options=cfg.options().to_dict(), highres=highres, classifier=classifier, fid=fid,
        condition={"kind": models.condition["kind"], "triplets_png": triplets,
                   "maps": f"the first {n} {split} samples",
                   **({"highres_absent": why} if why else {}),
                   **({"highres_maps": source} if source else {}),
                   **({"edge_f1": follows} if follows else {}),
                   **({"unconditional_png": unconditional,
                       "baseline": baseline.transformer_uri} if baseline else {})})
    storage.write_json(join(uri, "samples.json"), {**result.to_dict(), "files": index})
    return result


# -- driver side -----------------------------------------------------------------------------------


def run(ctx: StageContext) -> SampleOutputs:
    from pipeline.generate import run_models

    cfg: SampleConfig = ctx.cfg
    gpt = ctx.inputs["train_transformer"]
    models = run_models(ctx.storage, gpt, gpt["uri"])
    shard: ShardOutputs = ctx.input("shard")
    data: dict[str, Any] = {split: shard.uris(split) for split in ("train", "val")}
    data["resolution"] = shard.resolution
    data["condition"] = shard.condition.to_dict() if shard.condition else None
    t0 = time.perf_counter()
    baseline = None
    if ctx.has_input(BASELINE):  # the same data without maps: scored against the same maps
        m = ctx.inputs[BASELINE]
        baseline = run_models(ctx.storage, m, m["uri"])
    args = (cfg, ctx.storage, ctx.uri, models, data, ctx.root_cfg.seed, baseline)
    if ctx.local:  # a run without Ray: in this process
        result = sample_task(*args)
    else:
        import ray

        task = ray.remote(sample_task).options(num_cpus=cfg.num_cpus,
                                               num_gpus=1 if cfg.use_gpu else 0)
        result = ray.get(task.remote(*args))
    log.info("[sample] %d samples in %.1fs (%.0f codes/s)%s", result.n,
             time.perf_counter() - t0, result.tokens_per_s,
             f"; classifier accuracy {result.classifier['accuracy']:.1%}"
             if result.classifier else "")
    images = {"samples": result.condition["triplets_png"] if result.condition
              else result.grid_png}
    if result.highres:
        images["highres"] = result.highres.png
    ctx.tracker.log_images({k: _local_copy(ctx.storage, v) for k, v in images.items()})
    if result.classifier:
        ctx.tracker.summary({"sample/classifier_accuracy": result.classifier["accuracy"]})
    if result.fid and result.fid.get("status") == "ok":
        ctx.tracker.summary({"sample/fid": result.fid["value"]})
    return result


def _local_copy(storage: Storage, uri: str) -> Any:
    """W&B takes a local path or an array: decode PNGs from any storage root."""
    import io

    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(storage.read_bytes(uri))).convert("RGB"))


def report(outputs: SampleOutputs) -> dict[str, Any]:
    """The report's section: the sample grid, the high-resolution sample, the classifier."""
    cond = outputs.condition
    images = [("Samples per class" if outputs.classes else "Samples", outputs.grid_png)]
    if cond:
        images = [(f"Condition | sample | truth ({cond['kind']} maps of {cond['maps']})",
                   cond["triplets_png"])]
    metrics: dict[str, Any] = {"samples": outputs.n,
                               "codes/s (sampling + decoding)": outputs.tokens_per_s}
    hr = outputs.highres
    if hr:
        h, w = hr.image_size
        images.append((f"High resolution: {h}x{w} px from a {hr.code_grid[0]}x"
                       f"{hr.code_grid[1]} code grid (sliding window)"
                       + (f", condition | sample, from {cond['highres_maps']}"
                          if cond and cond.get("highres_maps") else ""), hr.png))
    elif cond and cond.get("highres_absent"):
        metrics["high resolution"] = f"absent: {cond['highres_absent']}"
    f1 = (cond or {}).get("edge_f1")
    if f1:
        metrics["edge F1: samples vs their maps"] = f"{f1['samples']['f1']:.3f}"
        metrics["edge F1: real images vs their maps"] = f"{f1['real_images']['f1']:.3f}"
        metrics["edge F1: samples vs other maps (chance)"] = f"{f1['other_maps']['f1']:.3f}"
        if "unconditional_model" in f1:
            metrics["edge F1: unconditional model's samples vs the maps"] = \
                f"{f1['unconditional_model']['f1']:.3f}"
    if cond and cond.get("unconditional_png"):
        images.append(("The unconditional baseline's samples beside the maps (condition | "
                       "sample)", cond["unconditional_png"]))
    clf = outputs.classifier
    if clf:
        metrics["classifier accuracy on samples"] = f"{clf['accuracy']:.1%}"
        if "real_val" in clf:
            metrics["classifier accuracy on real val images"] = f"{clf['real_val']['accuracy']:.1%}"
    if outputs.fid and outputs.fid.get("status") == "ok":
        f = outputs.fid
        metrics["FID vs training images"] = (f"{f['value']:.4g} ({f['images']} samples vs "
                                             f"{f['reference_images']} training images)")
    elif outputs.fid:
        metrics["FID vs training images"] = f"absent: {outputs.fid.get('reason', '?')}"
    return {"images": images, "metrics": metrics}


BASELINE = "train_baseline_transformer"
STAGE = Stage("sample", SampleConfig, run, upstream=("shard", "train_transformer", BASELINE),
              optional_upstream=(BASELINE,), version=1, report=report, outputs=SampleOutputs,
              help="samples per class, high-resolution sliding-window samples, classifier check")
