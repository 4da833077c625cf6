"""train_vqgan: the VQGAN (generator + patch discriminator) trained by DeepSpeed under Ray Train.

Reads the shard stage's train/val shards; writes Ray Train checkpoints (``train/checkpoint-*``),
``export/vqgan.pt`` + ``export/vqgan.json``, input|reconstruction grids (``images/``) and
``eval.json`` (PSNR, SSIM, LPIPS, codebook usage and perplexity on the val shards, for the trained
and for the untrained model).

Per worker: two DeepSpeed engines (G = VQGAN, D = NLayerDiscriminator). The generator step computes
the adaptive weight from gradients at the decoder output (one backward, see
pipeline.models.loss); the discriminator step reuses that step's reconstruction, and before
``disc_start`` no discriminator work is done at all. D's parameters are frozen during G's backward
(otherwise DeepSpeed's gradient hooks see D's gradients too: ZeRO-1 is silently wrong and
ZeRO-2/3 assert).
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pipeline.config import ConfigError, no_fingerprint
from pipeline.dag import Stage, StageContext
from pipeline.manifests import Export, ShardOutputs, VQGANOutputs
from pipeline.models.discriminator import DiscriminatorConfig
from pipeline.models.loss import VQGANLossConfig
from pipeline.models.vqgan import CONFIG_NAME, WEIGHTS_NAME, VQGANConfig
from pipeline.storage import Storage, join
from pipeline.train.config import TrainConfig

log = logging.getLogger("pipeline")


@dataclass
class PerceptualConfig:
    """LPIPS weights. Nothing is downloaded at run time: give URIs, or say ``random``.

    ``vgg_weights``: a torchvision ``vgg16`` state dict (``features.N.*``);
    ``lin_weights``: the LPIPS linear heads (the reference's ``vgg.pth``, keys ``linI.model.1.*``).
    ``backbone: random`` (random VGG, unit heads) is for offline demos and tests only.
    """

    backbone: str = "vgg16"
    vgg_weights: str | None = None
    lin_weights: str | None = None

    def validate(self) -> None:
        if self.backbone not in ("vgg16", "random"):
            raise ConfigError("backbone", f"must be vgg16 or random, got {self.backbone!r}")
        if self.backbone == "vgg16" and not (self.vgg_weights and self.lin_weights):
            raise ConfigError("vgg_weights", "backbone vgg16 needs vgg_weights and lin_weights "
                              "URIs (no download at run time); set perceptual.backbone=random "
                              "explicitly for an offline demo")


@dataclass
class TrainVQGANConfig(TrainConfig):
    """TrainConfig (steps, batch, optimizer, ZeRO, workers...) plus the model and its losses."""

    lr: float = 4.5e-6 * 8  # the reference: 4.5e-6 per sample of the global batch
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])  # the reference's Adam betas
    lr_scale_by_batch: bool = False  # lr := lr × global batch (the reference's rule)
    model: VQGANConfig = field(default_factory=VQGANConfig)
    loss: VQGANLossConfig = field(default_factory=VQGANLossConfig)
    disc: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
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

    def validate(self) -> None:
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
    import torch

    from pipeline.models.lpips import LPIPS

    lpips = LPIPS(cfg.backbone)
    if cfg.backbone == "vgg16":
        def load(uri: str) -> dict[str, Any]:
            return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu",
                              weights_only=True)

        lpips.load_weights(load(cfg.vgg_weights), load(cfg.lin_weights))
    return lpips


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


def evaluate(model: Any, lpips: Any, storage: Storage, shards: list[str], size: int,
             limit: int, batch: int = 16) -> dict[str, float]:
    """Reconstruction metrics over (at most ``limit`` images of) ``shards``; fp32, no grad, on
    the model's device."""
    import torch

    from pipeline.data.loader import eval_batches
    from pipeline.metrics import psnr, ssim

    model.eval()
    device = next(model.parameters()).device
    n = 0
    sums = {k: torch.zeros((), dtype=torch.float64, device=device)
            for k in ("psnr", "ssim", "lpips")}
    hist = torch.zeros(model.config.n_embed, dtype=torch.float64, device=device)
    with torch.no_grad():
        for x, _ in eval_batches(storage, shards, batch, size, limit=limit):
            x = x.to(device, non_blocking=True)
            recon, quant = model(x)
            sums["psnr"] += psnr(x, recon).double().sum()
            sums["ssim"] += ssim(x, recon).double().sum()
            if lpips is not None:
                sums["lpips"] += lpips(x, recon).double().sum()
            hist += torch.bincount(quant.indices.flatten(), minlength=len(hist)).double()
            n += len(x)
    if n == 0:
        raise ValueError("no validation images to evaluate")
    hist = hist.cpu()
    p = hist / hist.sum()
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    out = {k: float(v) / n for k, v in sums.items()}
    if lpips is None:
        out.pop("lpips")
    out.update({"images": n, "codebook_usage": float((hist > 0).double().mean()),
                "perplexity": math.exp(entropy)})
    return out


def save_grid(model: Any, x: Any, storage: Storage, uri: str, step: int, tracker: Any) -> str:
    """Input | reconstruction pairs of ``x`` (on the model's device) as a PNG and to the
    tracker."""
    import torch

    from pipeline.metrics import pairs_grid, png_bytes, upscale

    was_training = model.training
    model.eval()
    with torch.no_grad():
        recon = model(x).recon.float()
    model.train(was_training)
    image = pairs_grid(x.cpu(), recon.cpu(), cols=4)
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
        from pipeline.train.engine import make_engine
        from pipeline.train.schedule import scaled_lr

        cfg: TrainVQGANConfig = spec.cfg
        self.cfg, self.ctx, self.spec = cfg, ctx, spec
        device = ctx.device
        model, disc = VQGAN(cfg.model).to(device), NLayerDiscriminator(cfg.disc).to(device)
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
        self.base_lr = scaled_lr(cfg.lr, cfg.global_batch) if cfg.lr_scale_by_batch else cfg.lr
        self.autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                                       enabled=cfg.precision == "bf16")
        vis_shards = spec.args["val"] or spec.args["train"]
        self.vis = next(eval_batches(spec.storage, vis_shards, cfg.grid_images,
                                     cfg.model.resolution))[0].to(device)

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
                                            random_crop=cfg.random_crop):
            yield (x, labels), pos

    def step(self, batch: Any, step: int, micro: int) -> dict[str, Any]:
        from pipeline.train.params import apply_codebook_restarts

        with self.autocast:
            logs = micro_step(self.g, self.d, self.loss_fn, batch[0], step)
        # A dead-code restart wrote the codebook in place; make it survive the optimizer's
        # master weights (ZeRO, mixed precision). Every rank: the helpers may be collective.
        apply_codebook_restarts(self.g)
        return logs

    def images(self, step: int, tracker: Any) -> None:
        if self.ctx.is_main:
            save_grid(self.g.module, self.vis, self.spec.storage, self.spec.uri, step, tracker)

    def finish(self, state: Any, tracker: Any) -> None:
        if self.ctx.is_main:
            spec = self.spec
            export(self.g.module, self.cfg, self.lpips, spec.storage, spec.uri, spec.seed,
                   spec.args["val"] or spec.args["train"], tracker, state, self.ctx.device)


def export(module: Any, cfg: TrainVQGANConfig, lpips: Any, storage: Storage, uri: str, seed: int,
           val: list[str], tracker: Any, state: Any, device: Any = "cpu") -> None:
    """Write export/vqgan.{pt,json} (fp32), then eval.json (trained vs untrained, evaluated on
    ``device``), rank 0."""
    import torch

    from pipeline.models.vqgan import VQGAN

    model = VQGAN(cfg.model)
    model.load_state_dict(module.export_state_dict())
    storage.write_bytes(join(uri, "export", WEIGHTS_NAME), model.state_bytes())
    storage.write_text(join(uri, "export", CONFIG_NAME), model.config_json())
    trained = evaluate(model.to(device), lpips, storage, val, cfg.model.resolution,
                       cfg.eval_images)
    torch.manual_seed(seed)
    untrained = evaluate(VQGAN(cfg.model).to(device), lpips, storage, val, cfg.model.resolution,
                         cfg.eval_images)
    result = {"step": state.step, "samples_seen": state.samples_seen, "trained": trained,
              "untrained": untrained}
    storage.write_json(join(uri, "eval.json"), result)
    tracker.summary({f"eval/{k}": v for k, v in trained.items()})


# -- driver side ----------------------------------------------------------------------------------


def run(ctx: StageContext) -> VQGANOutputs:
    from pipeline.train.launch import launch

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
    checkpoint = launch(ctx, VQGANTask, {"train": train, "val": val})
    ev = ctx.storage.read_json(join(ctx.uri, "eval.json"))
    images = [u for u in ctx.storage.walk_files(join(ctx.uri, "images")) if u.endswith(".png")]
    return VQGANOutputs(
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
        perceptual_backbone=cfg.perceptual.backbone,
    )


def report(outputs: VQGANOutputs) -> dict[str, Any]:
    """The report's section: val reconstruction metrics (vs the untrained model), the last
    input | reconstruction grid."""
    ev, ev0 = outputs.eval, outputs.eval_untrained
    metrics: dict[str, Any] = {"steps": outputs.steps}
    for key, label in (("psnr", "val PSNR (dB)"), ("ssim", "val SSIM"), ("lpips", "val LPIPS")):
        if key in ev:
            metrics[label] = f"{ev[key]:.4g}" + (f" (untrained {ev0[key]:.4g})" if key in ev0
                                                 else "")
    metrics["codebook usage"] = f"{ev['codebook_usage']:.1%}"
    metrics["code perplexity"] = ev["perplexity"]
    metrics["perceptual backbone"] = outputs.perceptual_backbone
    recon = sorted(u for u in outputs.images if "/recon-" in u)
    images = [(f"Input | reconstruction ({recon[-1].rsplit('/', 1)[-1]})", recon[-1])] \
        if recon else []
    return {"metrics": metrics, "images": images}


STAGE = Stage("train_vqgan", TrainVQGANConfig, run, upstream=("shard",), version=1,
              is_complete=is_complete, report=report, outputs=VQGANOutputs,
              help="VQGAN + discriminator, DeepSpeed under Ray Train")
