"""train_vqgan: the VQGAN (generator + patch discriminator) trained by DeepSpeed under Ray Train;
and train_cond_vqgan, the same stage over the condition maps (``COND_STAGE``, at the end).

Reads the shard stage's train/val shards; writes Ray Train checkpoints (``train/checkpoint-*``),
``export/vqgan.pt`` + ``export/vqgan.json``, input|reconstruction grids (``images/``) and
``eval.json`` (PSNR, SSIM, LPIPS, rFID, codebook usage and perplexity on the val shards, for the
trained and for the untrained model).

Per worker: two DeepSpeed engines (G = VQGAN, D = NLayerDiscriminator). The generator step computes
the adaptive weight from gradients at the decoder output (one backward, see
pipeline.models.loss); the discriminator step reuses that step's reconstruction, and before
``disc_start`` no discriminator work is done at all. D's parameters are frozen during G's backward
(otherwise DeepSpeed's gradient hooks see D's gradients too: ZeRO-1 is silently wrong and
ZeRO-2/3 assert).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pipeline.config import ConfigError, no_fingerprint
from pipeline.dag import Stage, StageContext
from pipeline.data.conditions import ConditionInput, no_encoder_reason
from pipeline.fid import FIDConfig
from pipeline.manifests import CondVQGANOutputs, Export, ShardOutputs, VQGANOutputs
from pipeline.models.discriminator import DiscriminatorConfig
from pipeline.models.loss import VQGANLossConfig
from pipeline.models.vqgan import CONFIG_NAME, WEIGHTS_NAME, VQGANConfig
from pipeline.storage import Storage, join
from pipeline.train.config import TrainConfig
from pipeline.train.history import read_history

log = logging.getLogger("pipeline")


@dataclass
class PerceptualConfig:
    """LPIPS weights (pipeline.lpips_weights). Either part may be given as a URI:

    ``vgg_weights``: a torchvision ``vgg16`` state dict (``features.N.*``); unset: torchvision's
    ImageNet VGG16 from the torch hub cache, downloaded into it once when missing (offline
    without a cached copy: an error naming this key);
    ``lin_weights``: the LPIPS linear heads (the reference's ``vgg.pth``, keys
    ``linI.model.1.*``); unset: that file from the installed ``lpips`` wheel.
    ``backbone: random`` (random VGG, unit heads) is for offline demos and tests only.
    """

    backbone: str = "vgg16"
    vgg_weights: str | None = None
    lin_weights: str | None = None

    def validate(self) -> None:
        if self.backbone not in ("vgg16", "random"):
            raise ConfigError("backbone", f"must be vgg16 or random, got {self.backbone!r}")


REFERENCE_LR_PER_SAMPLE = 4.5e-6  # taming's base_learning_rate for every published VQGAN


@dataclass
class TrainVQGANConfig(TrainConfig):
    """TrainConfig (steps, batch, optimizer, ZeRO, workers...) plus the model and its losses."""

    # None: the reference's rule, 4.5e-6 per sample x the global batch (with either
    # lr_scale_by_batch). Given: the step's rate, or with lr_scale_by_batch the per-sample one.
    lr: float | None = None
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])  # the reference's Adam betas
    model: VQGANConfig = field(default_factory=VQGANConfig)
    loss: VQGANLossConfig = field(default_factory=VQGANLossConfig)
    disc: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    # rFID of the val reconstructions (pipeline.fid); measurement only, so outside the
    # fingerprint: changing it does not retrain a finished stage.
    fid: FIDConfig = no_fingerprint(default_factory=FIDConfig)
    # Starting weights (pipeline.pretrained): a taming last.ckpt, our export's vqgan.pt or its
    # folder. Loaded at a fresh start only (a resume takes its own checkpoint); with steps: 0
    # the imported VQGAN is exported and evaluated as is, without training. The URI, not the
    # file's content, is part of the fingerprint.
    init_from: str | None = None
    RENAMED: ClassVar[dict[str, str]] = {"flip": "random_flip and random_crop"}

    # Augmentation of the training images (val and eval are center crops, unflipped).
    random_flip: bool = True  # mirror each image left-right with probability 1/2
    random_crop: bool = True  # a random crop of model.resolution px (False: the center crop)
    shuffle_buffer: int = 256
    eval_images: int = 512
    grid_images: int = no_fingerprint(16)
    # fp32 on CPU: the VQGAN's and the LPIPS VGG's 3x3 convolutions by Winograd F(4x4, 3x3),
    # ~1.45x faster steps (pipeline.kernels.winograd); results differ from oneDNN's direct
    # convolution by ~1e-6 relative. Ignored on GPU and in bf16.
    winograd: bool = no_fingerprint(True)

    @property
    def base_lr(self) -> float:
        if self.lr is None:
            return REFERENCE_LR_PER_SAMPLE * self.global_batch
        return super().base_lr

    def lr_rule(self) -> str:
        if self.lr is None:
            return (f"the reference's {REFERENCE_LR_PER_SAMPLE:g} per sample x global batch "
                    f"{self.global_batch}")
        return super().lr_rule()

    def validate(self) -> None:
        if self.steps == 0:
            if not self.init_from:
                raise ConfigError("steps", "must be >= 1, or 0 together with init_from (use a "
                                  "pretrained VQGAN as it is, without training)")
            # Pretrained mode: every other setting must still be what a training run accepts.
            dataclasses.replace(self, steps=1).validate()
            return
        super().validate()
        if self.zero_stage > 2:
            raise ConfigError("zero_stage", "the VQGAN trains with ZeRO 0-2 (two engines share "
                              "one process; ZeRO-3 partitions D's weights under G's loss)")
        if self.image_every < 1 or self.eval_images < 1 or self.shuffle_buffer < 1:
            raise ConfigError("image_every", "image_every, eval_images and shuffle_buffer must "
                              "be >= 1")


def is_complete(outputs: VQGANOutputs, cfg: TrainVQGANConfig) -> bool:
    """Raising ``steps`` makes a finished stage continue from its newest checkpoint."""
    return outputs.steps >= cfg.steps


# -- worker side ----------------------------------------------------------------------------------


def build_lpips(cfg: PerceptualConfig, storage: Storage) -> Any:
    """The frozen LPIPS; each weight part from its URI or its standard source (logged)."""
    from pipeline import lpips_weights

    return lpips_weights.build_lpips(cfg.backbone, cfg.vgg_weights, cfg.lin_weights, storage)


def micro_step(g: Any, d: Any, loss_fn: Any, x: Any, step: int) -> dict[str, Any]:
    """One micro-batch: generator backward, then (from disc_start) the discriminator's.
    Returns detached scalar tensors (no host sync here)."""
    from pipeline.models.discriminator import set_requires_grad

    disc = d.module
    set_requires_grad(disc, False)
    out = g(x, return_last_input=True)
    use_disc = loss_fn.disc_factor(step) > 0
    gl = loss_fn.generator_loss(x, out.recon, out.last_input, g.module.last_layer, out.quant.loss,
                                disc if use_disc else None, step)
    g.backward(gl.backward_loss)
    g.step()
    set_requires_grad(disc, True)
    logs = {"loss/total": gl.total, "loss/rec": gl.rec_loss, "loss/l1": gl.l1_loss,
            "loss/perceptual": gl.p_loss, "loss/g": gl.g_loss, "loss/quant": gl.quant_loss,
            "lambda": gl.d_weight, "codebook/perplexity": out.quant.perplexity,
            "codebook/usage": out.quant.usage}
    if use_disc:  # reuses this step's reconstruction: no second autoencoder or LPIPS pass
        dl = loss_fn.discriminator_loss(x, out.recon, d, step)
        d.backward(dl.loss)
        d.step()
        logs.update({"loss/d": dl.loss, "logits/real": dl.logits_real,
                     "logits/fake": dl.logits_fake})
    return {k: v.detach() for k, v in logs.items()}


def recon_scores(x: Any, recon: Any, segmentation: bool = False) -> dict[str, Any]:
    """Per-image reconstruction scores, ``[B]`` each: PSNR and SSIM of images or one-channel
    maps in [-1, 1]; for one-hot label maps and per-class logits (``segmentation``) the pixel
    accuracy and the mean IoU over the classes present in the truth or the prediction."""
    import torch

    from pipeline.metrics import psnr, ssim

    if not segmentation:
        return {"psnr": psnr(x, recon), "ssim": ssim(x, recon)}
    k = x.shape[1]
    truth, pred = x.argmax(1), recon.argmax(1)  # [B, H, W]
    accuracy = (truth == pred).flatten(1).double().mean(1)
    t = torch.nn.functional.one_hot(truth, k).flatten(1, 2).bool()  # [B, HW, K]
    p = torch.nn.functional.one_hot(pred, k).flatten(1, 2).bool()
    inter, union = (t & p).sum(1).double(), (t | p).sum(1).double()  # [B, K]
    present = union > 0
    iou = torch.where(present, inter / union.clamp_min(1), torch.zeros_like(inter))
    return {"pixel_accuracy": accuracy, "miou": iou.sum(1) / present.sum(1)}


def evaluate(model: Any, lpips: Any, storage: Storage, shards: list[str], size: int,
             limit: int, batch: int = 16, rfid: Any = None, reader: Any = None
             ) -> dict[str, float]:
    """Reconstruction metrics over (at most ``limit`` images of) ``shards``; fp32, no grad, on
    the model's device. With ``rfid`` (a :class:`pipeline.fid.PairedFID`) also ``rfid``: the
    reconstructions' FID against the inputs (left out when too few images). ``reader``: what
    the model encodes (:func:`pipeline.data.loader.image_batches`; default the images), scored
    by :func:`recon_scores`."""
    import torch

    from pipeline.data.loader import IMAGES, eval_batches

    reader = reader or IMAGES
    segmentation = getattr(reader, "kind", None) == "segmentation"
    model.eval()
    device = next(model.parameters()).device
    n = 0
    sums: dict[str, Any] = {}
    hist = torch.zeros(model.config.n_embed, dtype=torch.float64, device=device)
    if rfid is not None:
        rfid.begin()
    with torch.no_grad():
        for x, _ in eval_batches(storage, shards, batch, size, limit=limit, reader=reader):
            x = x.to(device, non_blocking=True)
            recon, quant = model(x)
            if rfid is not None:
                rfid.add(x, recon)
            scores = recon_scores(x, recon, segmentation)
            if lpips is not None:
                scores["lpips"] = lpips(x, recon)
            for k, v in scores.items():
                sums[k] = sums.get(k, 0.0) + v.double().sum()
            hist += torch.bincount(quant.indices.flatten(), minlength=len(hist)).double()
            n += len(x)
    if n == 0:
        raise ValueError("no validation images to evaluate")
    hist = hist.cpu()
    p = hist / hist.sum()
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    out = {k: float(v) / n for k, v in sums.items()}
    out.update({"images": n, "codebook_usage": float((hist > 0).double().mean()),
                "perplexity": math.exp(entropy), "dead_codes": int((hist == 0).sum())})
    if rfid is not None and (value := rfid.end()) is not None:
        out["rfid"] = value
    return out


def save_grid(model: Any, x: Any, storage: Storage, uri: str, step: int, tracker: Any,
              reader: Any = None) -> str:
    """Input | reconstruction pairs of ``x`` (on the model's device) as a PNG and to the
    tracker; a condition ``reader`` renders its maps as RGB first (``preview``)."""
    import torch

    from pipeline.metrics import pairs_grid, png_bytes, upscale

    was_training = model.training
    model.eval()
    with torch.no_grad():
        recon = model(x).recon.float()
    model.train(was_training)
    x, recon = x.cpu(), recon.cpu()
    if reader is not None and hasattr(reader, "preview"):
        x, recon = reader.preview(x), reader.preview(recon)
    image = pairs_grid(x, recon, cols=4)
    image = upscale(image, max(1, 64 // x.shape[-1]))  # cells of >= 64 px to look at
    out = join(uri, "images", f"recon-{step:08d}.png")
    storage.write_bytes(out, png_bytes(image))
    tracker.log_images({"recon": image}, step=step)
    return out


class VQGANTask:
    """train_vqgan's part of the training loop (pipeline.train.loop): two engines (G, D),
    LPIPS, the loss, image batches, grids, export + eval.

    Mixed precision (``precision=bf16``): weights, optimizer and codebook stay fp32 and the
    step runs under bf16 autocast; the quantizer's distances, argmin and codebook lookups run
    in fp32 (``VQGAN.encode`` leaves autocast for them: bf16 distances tie between near codes).
    """

    unit = "images"
    units_per_sample = 1
    progress_keys = ("loss/total", "loss/rec")

    def __init__(self, ctx: Any, spec: Any) -> None:
        import torch

        from pipeline.data.loader import eval_batches
        from pipeline.models.discriminator import NLayerDiscriminator
        from pipeline.models.loss import VQGANLoss
        from pipeline.models.vqgan import VQGAN
        from pipeline.pretrained import describe, init_vqgan
        from pipeline.train.engine import make_engine

        cfg: TrainVQGANConfig = spec.cfg
        self.cfg, self.ctx, self.spec = cfg, ctx, spec
        # What the VQGAN encodes: the images, or the shards' condition maps (train_cond_vqgan).
        self.reader = spec.args.get("reader")
        device = ctx.device
        model, disc = VQGAN(cfg.model), NLayerDiscriminator(cfg.disc)
        if cfg.init_from and not spec.resuming:  # a resume restores its own checkpoint instead
            # Into the torch modules before DeepSpeed copies them (ZeRO's fp32 partitions), on
            # every rank: all ranks start from the same weights.
            got = init_vqgan(spec.storage, cfg.init_from, model, disc)
            if ctx.is_main:
                log.info("[%s] %s", spec.stage, describe(got, with_disc=True))
        model, disc = model.to(device), disc.to(device)
        self.lpips = None
        if cfg.loss.perceptual_weight > 0:
            self.lpips = build_lpips(cfg.perceptual, spec.storage).to(device)
        if cfg.winograd and device.type == "cpu" and cfg.precision == "fp32":
            self._winograd(model)
        self.loss_fn = VQGANLoss(cfg.loss, self.lpips)
        fp32 = {"bf16": {"enabled": False}}  # bf16 is autocast here, not bf16 weights
        self.g = make_engine(model, cfg, ctx.world, extra=fp32)
        self.d = make_engine(disc, cfg, ctx.world, extra=fp32)
        self.engines = {"G": self.g, "D": self.d}
        self.base_lr = cfg.base_lr
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                                       enabled=cfg.precision == "bf16")
        vis_shards = spec.args["val"] or spec.args["train"]
        self.vis = next(eval_batches(spec.storage, vis_shards, cfg.grid_images,
                                     cfg.model.resolution,
                                     **self._read()))[0].to(device)

    def _read(self) -> dict[str, Any]:
        return {"reader": self.reader} if self.reader is not None else {}

    def _winograd(self, model: Any) -> None:
        from pipeline.kernels.winograd import enable_winograd

        convs = enable_winograd(model) + (enable_winograd(self.lpips) if self.lpips else 0)
        if self.ctx.is_main:
            log.info("Winograd 3x3 convolutions: %d modules%s", convs,
                     "" if convs else " (kernels unavailable here: direct convolutions)")

    def batches(self, position: Any) -> Any:
        from pipeline.data.loader import image_batches, stream_spec

        cfg, spec = self.cfg, self.spec
        stream = stream_spec(spec.args["train"], self.ctx.rank, self.ctx.world, spec.seed,
                             cfg.shuffle_buffer, cfg.data_streams, position)
        for x, labels, pos in image_batches(spec.storage, stream, cfg.micro_batch,
                                            cfg.model.resolution, position=position,
                                            random_flip=cfg.random_flip,
                                            random_crop=cfg.random_crop, **self._read()):
            yield (x, labels), pos

    def step(self, batch: Any, step: int, micro: int) -> dict[str, Any]:
        from pipeline.train.params import apply_codebook_restarts

        with self.autocast:
            logs = micro_step(self.g, self.d, self.loss_fn, batch[0], step)
        # A dead-code restart wrote the codebook in place; make it survive the optimizer's
        # master weights (ZeRO, mixed precision). Every rank: the helpers may be collective.
        apply_codebook_restarts(self.g)
        return logs

    def window_logs(self) -> dict[str, float]:
        """Codebook usage, dead codes and perplexity over the steps since the last log."""
        return self.g.module.quantize.take_window_stats()

    def images(self, step: int, tracker: Any) -> None:
        if self.ctx.is_main:
            save_grid(self.g.module, self.vis, self.spec.storage, self.spec.uri, step, tracker,
                      self.reader)

    def finish(self, state: Any, tracker: Any) -> None:
        if self.ctx.is_main:
            spec = self.spec
            export(self.g.module, self.cfg, self.lpips, spec.storage, spec.uri, spec.seed,
                   spec.args["val"] or spec.args["train"], tracker, state, self.ctx.device,
                   self.reader)


def export(module: Any, cfg: TrainVQGANConfig, lpips: Any, storage: Storage, uri: str, seed: int,
           val: list[str], tracker: Any, state: Any, device: Any = "cpu",
           reader: Any = None) -> None:
    """Write export/vqgan.{pt,json} (fp32), then eval.json (trained vs untrained, evaluated on
    ``device``; ``rfid``: what the rFID figures are, or why they are absent), rank 0."""
    import torch

    from pipeline.fid import PairedFID, open_inception
    from pipeline.models.vqgan import VQGAN

    model = VQGAN(cfg.model)
    model.load_state_dict(module.export_state_dict())
    storage.write_bytes(join(uri, "export", WEIGHTS_NAME), model.state_bytes())
    storage.write_text(join(uri, "export", CONFIG_NAME), model.config_json())
    inception, absent = open_inception(cfg.fid, storage, device, "[train_vqgan] rFID")
    # One PairedFID for both models: the val inputs' features are computed once.
    rfid = PairedFID(inception, cfg.fid.images, "val inputs") if inception is not None else None
    trained = evaluate(model.to(device), lpips, storage, val, cfg.model.resolution,
                       cfg.eval_images, rfid=rfid, reader=reader)
    torch.manual_seed(seed)
    untrained = evaluate(VQGAN(cfg.model).to(device), lpips, storage, val, cfg.model.resolution,
                         cfg.eval_images, rfid=rfid, reader=reader)
    result = {"step": state.step, "samples_seen": state.samples_seen, "trained": trained,
              "untrained": untrained, "rfid": rfid.record() if rfid is not None else absent}
    storage.write_json(join(uri, "eval.json"), result)
    tracker.summary({f"eval/{k}": v for k, v in trained.items()})


# -- driver side ----------------------------------------------------------------------------------


def export_pretrained(cfg: TrainVQGANConfig, storage: Storage, uri: str, seed: int,
                      shards: list[str], reader: Any = None, stage: str = "train_vqgan") -> str:
    """Pretrained mode (``steps: 0``): the ``init_from`` VQGAN, not trained further, exported
    and evaluated on ``shards`` (val, else train) as a training run's end would (``export/``,
    ``eval.json`` at step 0), plus one input | reconstruction grid, whose URI it returns. One
    process, on a GPU with ``use_gpu``."""
    import torch

    from pipeline.data.loader import eval_batches
    from pipeline.models.vqgan import VQGAN
    from pipeline.pretrained import describe, init_vqgan
    from pipeline.tracking import NullTracker
    from pipeline.train.state import TrainState

    if cfg.use_gpu and not torch.cuda.is_available():
        raise RuntimeError("train_vqgan.use_gpu=true but this process sees no CUDA device")
    device = torch.device("cuda" if cfg.use_gpu else "cpu")
    model = VQGAN(cfg.model)
    got = init_vqgan(storage, cfg.init_from, model, None)
    log.info("[%s] steps 0, no training: %s", stage, describe(got, with_disc=False))
    model = model.to(device)
    lpips = None
    if cfg.loss.perceptual_weight > 0:  # as in training: LPIPS is evaluated when it is a loss
        lpips = build_lpips(cfg.perceptual, storage).to(device)
    read = {"reader": reader} if reader is not None else {}
    vis = next(eval_batches(storage, shards, cfg.grid_images, cfg.model.resolution, **read))[0]
    grid = save_grid(model, vis.to(device), storage, uri, 0, NullTracker(), reader)
    export(model, cfg, lpips, storage, uri, seed, shards, NullTracker(), TrainState(), device,
           reader)
    return grid


def run_pretrained(ctx: StageContext, shards: list[str], reader: Any = None,
                   cfg: TrainVQGANConfig | None = None) -> None:
    """:func:`export_pretrained` as one Ray task (with a GPU for ``use_gpu``), or in this
    process for a run without Ray; then the stage's tracker gets the eval summary and the grid,
    as from a trained run's rank 0."""
    import numpy as np
    from PIL import Image

    cfg = cfg or ctx.cfg
    call = (cfg, ctx.storage, ctx.uri, int(ctx.root_cfg.seed), shards, reader, ctx.name)
    if ctx.local:
        from pipeline.ray_tasks import require_one_process

        require_one_process("train_vqgan with steps 0",
                            "python -m pipeline run CONFIG --only train_vqgan --no-ray")
        grid = export_pretrained(*call)
    else:
        import ray

        from pipeline.ray_tasks import cluster_resources, require

        if cfg.use_gpu:
            require("train_vqgan (steps 0, use_gpu)", "GPU", 1,
                    cluster_resources().get("GPU", 0), "add a GPU node or set use_gpu=false")
        task = ray.remote(export_pretrained).options(num_cpus=cfg.cpus_per_worker,
                                                     num_gpus=1 if cfg.use_gpu else 0)
        grid = ray.get(task.remote(*call))
    trained = ctx.storage.read_json(join(ctx.uri, "eval.json"))["trained"]
    ctx.tracker.summary({f"eval/{k}": v for k, v in trained.items()})
    image = Image.open(io.BytesIO(ctx.storage.read_bytes(grid))).convert("RGB")
    ctx.tracker.log_images({"recon": np.asarray(image)}, step=0)


def run(ctx: StageContext) -> VQGANOutputs:
    cfg: TrainVQGANConfig = ctx.cfg
    shard: ShardOutputs = ctx.input("shard")
    train, val = shard.uris("train"), shard.uris("val")
    if not train:
        raise ValueError("the shard stage produced no training samples")
    if shard.resolution < cfg.model.resolution:
        raise ValueError(f"train_vqgan.model.resolution={cfg.model.resolution} is larger than the "
                         f"shards' images ({shard.resolution} px)")
    if cfg.perceptual.backbone == "random" and cfg.loss.perceptual_weight > 0:
        log.warning("[train_vqgan] perceptual.backbone=random: the perceptual loss uses a RANDOM "
                    "VGG; this is not the paper's LPIPS (offline demo/test setting)")
    if cfg.perceptual.backbone == "vgg16" and cfg.loss.perceptual_weight > 0:
        check_lpips(cfg.perceptual, ctx.storage)
    return train_and_record(ctx, cfg, train, val, VQGANOutputs,
                            perceptual_backbone=cfg.perceptual.backbone)


def train_and_record(ctx: StageContext, cfg: TrainVQGANConfig, train: list[str], val: list[str],
                     record: type, reader: Any = None, **extra: Any) -> Any:
    """Train (or, with ``steps: 0``, export the ``init_from`` VQGAN as it is) on what ``reader``
    reads, then the stage's outputs ``record`` from the folder's eval.json, images and history,
    plus ``extra`` fields. Shared by train_vqgan and train_cond_vqgan."""
    from pipeline.train.launch import launch

    if cfg.steps == 0:  # pretrained mode: init_from as it is (validated: set)
        run_pretrained(ctx, val or train, reader, cfg)
        checkpoint = None
    else:
        args = {"train": train, "val": val, **({"reader": reader} if reader else {})}
        checkpoint = launch(ctx, VQGANTask, args, cfg)
    ev = ctx.storage.read_json(join(ctx.uri, "eval.json"))
    images = [u for u in ctx.storage.walk_files(join(ctx.uri, "images")) if u.endswith(".png")]
    return record(
        steps=ev["step"],
        samples_seen=ev["samples_seen"],
        export=Export(weights=join(ctx.uri, "export", WEIGHTS_NAME),
                      config=join(ctx.uri, "export", CONFIG_NAME)),
        model=cfg.model.to_dict(),
        latent_size=cfg.model.latent_size(),
        eval=ev["trained"],
        eval_untrained=ev["untrained"],
        images=images,
        checkpoint=checkpoint,
        train_codebook=last_window(read_history(ctx.storage, join(ctx.uri, "history.jsonl"))),
        rfid=ev.get("rfid", {}),
        **extra,
    )


def check_lpips(cfg: PerceptualConfig, storage: Storage) -> None:
    """Driver side, before any worker starts: every LPIPS weight part can be had (else the
    error names the key to set); a VGG16 download happens here once, not in every worker."""
    from pipeline.lpips_weights import check_sources

    for key, source in check_sources(cfg.vgg_weights, cfg.lin_weights, storage).items():
        log.info("[train_vqgan] LPIPS %s: %s", key, source)


def rfid_label(ev: dict[str, Any], ev0: dict[str, Any], record: dict[str, Any]) -> str | None:
    """The report's rFID entry: trained (untrained) and the image count, or why it is absent;
    None for manifests written before rFID existed."""
    if "rfid" in ev:
        untrained = f"untrained {ev0['rfid']:.4g}; " if "rfid" in ev0 else ""
        return f"{ev['rfid']:.4g} ({untrained}{record.get('images', '?')} images)"
    if record.get("status") == "absent":
        return f"absent: {record.get('reason', '?')}"
    return None


def last_window(history: list[dict[str, Any]]) -> dict[str, float]:
    """The newest history row's training-window codebook figures (empty if none logged)."""
    keys = ("codebook/window_usage", "codebook/dead_codes", "codebook/window_perplexity")
    for row in reversed(history):
        if keys[0] in row:
            return {"step": row["step"], **{k.removeprefix("codebook/"): row[k] for k in keys}}
    return {}


def report(outputs: VQGANOutputs) -> dict[str, Any]:
    """The report's section: val reconstruction metrics (vs the untrained model), the last
    input | reconstruction grid."""
    ev, ev0 = outputs.eval, outputs.eval_untrained
    metrics: dict[str, Any] = {"steps": outputs.steps}
    for key, label in (("psnr", "val PSNR (dB)"), ("ssim", "val SSIM"), ("lpips", "val LPIPS")):
        if key in ev:
            metrics[label] = f"{ev[key]:.4g}" + (f" (untrained {ev0[key]:.4g})" if key in ev0
                                                 else "")
    if (rfid := rfid_label(ev, ev0, outputs.rfid)) is not None:
        metrics["val rFID"] = rfid
    k = outputs.model.get("n_embed", 0)
    used = round(ev["codebook_usage"] * k)
    metrics["val codebook usage"] = f"{ev['codebook_usage']:.1%} ({used} of {k} codes)"
    metrics["val code perplexity"] = ev["perplexity"]
    window = outputs.train_codebook
    if window:
        metrics["train codebook usage"] = (
            f"{window['window_usage']:.1%} ({int(window['dead_codes'])} dead, perplexity "
            f"{window['window_perplexity']:.1f}, log window ending at step {window['step']})")
    metrics["perceptual backbone"] = outputs.perceptual_backbone
    recon = sorted(u for u in outputs.images if "/recon-" in u)
    images = [(f"Input | reconstruction ({recon[-1].rsplit('/', 1)[-1]})", recon[-1])] \
        if recon else []
    return {"metrics": metrics, "images": images}


STAGE = Stage("train_vqgan", TrainVQGANConfig, run, upstream=("shard",), version=1,
              is_complete=is_complete, report=report, outputs=VQGANOutputs,
              help="VQGAN + discriminator, DeepSpeed under Ray Train")


# -- train_cond_vqgan: the same training over the condition maps -------------------------------
#
# A VQGAN over the shards' condition maps (paper §4): the first half of the reference's Net2Net
# setups (its ``cond_stage_config``), train_vqgan instantiated a second time in the DAG.
#
# The same training as train_vqgan (pipeline.train.loop, DeepSpeed under Ray Train, the same
# config keys, checkpoints and export) with the condition map of each sample as the input
# (``{key}.cond.png``, pipeline.data.conditions.ConditionInput) instead of its image, cropped and
# flipped exactly as its image would be. By the shard manifest's ``condition.kind``:
#
# - ``segmentation``: one-hot input of ``classes`` channels, per-class logits out, binary
#   cross-entropy reconstruction plus the codebook loss: the reference's ``VQSegmentationModel``
#   with ``BCELossWithQuant``, so no discriminator. Scored by pixel accuracy and mean IoU.
# - ``depth``, ``canny``, ``grayscale``: one channel in [-1, 1]: L1 (+ the patch GAN from
#   ``loss.disc_start``, on one-channel maps). Scored by PSNR and SSIM.
# - ``downsample:N`` and ``none``: no stage (a low-resolution image is an image: the image VQGAN
#   encodes it), so the run skips this one.
#
# ``model.in_channels``, ``model.out_ch`` and ``disc.input_nc`` come from the condition; LPIPS and
# rFID compare RGB images, so ``loss.perceptual_weight`` must stay 0 and ``fid`` off.


COND_NAME = "train_cond_vqgan"


@dataclass
class TrainCondVQGANConfig(TrainVQGANConfig):
    """train_vqgan's settings (README, "Conditional synthesis"); defaults differ in that no
    RGB-only part is on: no perceptual loss (LPIPS), no rFID."""

    loss: VQGANLossConfig = field(
        default_factory=lambda: VQGANLossConfig(perceptual_weight=0.0))
    # Unused (no perceptual loss); kept so the section has train_vqgan's keys.
    perceptual: PerceptualConfig = field(
        default_factory=lambda: PerceptualConfig(backbone="random"))
    fid: FIDConfig = no_fingerprint(default_factory=lambda: FIDConfig(enabled=False))

    def validate(self) -> None:
        super().validate()
        if self.loss.perceptual_weight > 0:
            raise ConfigError("loss.perceptual_weight", "must be 0 for condition maps (LPIPS "
                              "compares RGB images; the maps have 1 or `classes` channels)")
        if self.fid.enabled:
            raise ConfigError("fid.enabled", "must be false for condition maps (FID's "
                              "InceptionV3 reads RGB images)")


def cond_skip_reason(root_cfg: Any) -> str | None:
    """Why a run with this config has no condition VQGAN (None: it has one)."""
    return no_encoder_reason(root_cfg.shard.condition.kind)


def resolve_cond(cfg: TrainCondVQGANConfig, reader: ConditionInput) -> TrainCondVQGANConfig:
    """The config the condition's maps are trained with: channels from the condition; for label
    maps the reference's segmentation loss (binary cross-entropy, no GAN)."""
    c = reader.channels
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, in_channels=c, out_ch=c),
                              disc=dataclasses.replace(cfg.disc, input_nc=c))
    if reader.kind == "segmentation":
        cfg = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, rec_loss="bce",
                                                                disc_factor=0.0))
    cfg.validate()
    return cfg


def run_cond(ctx: StageContext) -> CondVQGANOutputs:
    shard: ShardOutputs = ctx.input("shard")
    if shard.condition is None:  # skip_reason keeps such runs away; a stale manifest may not
        raise ValueError("the shard stage stored no condition maps (shard.condition.kind none)")
    cond = shard.condition
    reader = ConditionInput(cond.kind, cond.classes or 0)
    cfg = resolve_cond(ctx.cfg, reader)
    train, val = shard.uris("train"), shard.uris("val")
    if not train:
        raise ValueError("the shard stage produced no training samples")
    if shard.resolution < cfg.model.resolution:
        raise ValueError(f"{COND_NAME}.model.resolution={cfg.model.resolution} is larger than the "
                         f"shards' maps ({shard.resolution} px)")
    log.info("[%s] %s maps: %d channel(s), %s reconstruction%s", COND_NAME, cond.kind,
             reader.channels, "binary cross-entropy" if cfg.loss.rec_loss == "bce" else "L1",
             ", no GAN" if cfg.loss.disc_factor == 0 else
             f", GAN from step {cfg.loss.disc_start}")
    return train_and_record(
        ctx, cfg, train, val, CondVQGANOutputs, reader, perceptual_backbone="none",
        condition={"kind": cond.kind, "classes": cond.classes, "channels": reader.channels})


def report_cond(outputs: CondVQGANOutputs) -> dict[str, Any]:
    """The report's section: what is encoded, val scores (vs the untrained model), codebook
    health, the last map | reconstruction grid."""
    ev, ev0 = outputs.eval, outputs.eval_untrained
    cond = outputs.condition
    what = cond.get("kind", "?") + (f", {cond['classes']} classes" if cond.get("classes") else "")
    metrics: dict[str, Any] = {"condition": what, "steps": outputs.steps}
    for key, label in (("pixel_accuracy", "val pixel accuracy"), ("miou", "val mean IoU"),
                       ("psnr", "val PSNR (dB)"), ("ssim", "val SSIM")):
        if key in ev:
            metrics[label] = f"{ev[key]:.4g}" + (f" (untrained {ev0[key]:.4g})" if key in ev0
                                                 else "")
    k = outputs.model.get("n_embed", 0)
    used = round(ev["codebook_usage"] * k)
    metrics["val codebook usage"] = f"{ev['codebook_usage']:.1%} ({used} of {k} codes)"
    metrics["val code perplexity"] = ev["perplexity"]
    recon = sorted(u for u in outputs.images if "/recon-" in u)
    images = [(f"Condition map | reconstruction ({recon[-1].rsplit('/', 1)[-1]})", recon[-1])] \
        if recon else []
    return {"metrics": metrics, "images": images}


COND_STAGE = Stage(COND_NAME, TrainCondVQGANConfig, run_cond, upstream=("shard",), version=1,
                   is_complete=is_complete, report=report_cond, outputs=CondVQGANOutputs,
                   skip_reason=cond_skip_reason,
                   help="VQGAN over the condition maps (segmentation, depth, edges), as "
                        "train_vqgan")
