"""train_vqgan: the VQGAN (generator + patch discriminator) trained by DeepSpeed under Ray Train.

Reads the shard stage's train/val shards; writes Ray Train checkpoints (``train/checkpoint-*``),
``export/vqgan.pt`` + ``export/vqgan.json``, input|reconstruction grids (``images/``) and
``eval.json`` (PSNR, SSIM, LPIPS, codebook usage and perplexity on the val shards, for the trained
and for the untrained model).

Per worker: two DeepSpeed engines (G = VQGAN, D = NLayerDiscriminator). The generator step computes
the adaptive weight from gradients at the decoder output (one backward, see
pipeline.models.loss); the discriminator step reuses that step's reconstruction, and before
``disc_start`` no discriminator work is done at all. D's parameters are frozen during G's backward
(NOTES.md: otherwise ZeRO-1 is silently wrong and ZeRO-2/3 assert).
"""

from __future__ import annotations

import io
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import ConfigError, no_fingerprint
from pipeline.dag import Stage, StageContext
from pipeline.models.discriminator import DiscriminatorConfig
from pipeline.models.loss import VQGANLossConfig
from pipeline.models.vqgan import CONFIG_NAME, WEIGHTS_NAME, VQGANConfig
from pipeline.storage import Storage, join
from pipeline.train.config import TrainConfig, crash_if_asked

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
    flip: bool = True
    shuffle_buffer: int = 256
    eval_images: int = 512
    image_every: int = no_fingerprint(100)
    grid_images: int = no_fingerprint(16)
    # fp32 on CPU: the VQGAN's and the LPIPS VGG's 3x3 convolutions by Winograd F(4x4, 3x3),
    # ~1.45x faster steps (pipeline.models.winograd); results differ from oneDNN's direct
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


def is_complete(outputs: dict[str, Any], cfg: TrainVQGANConfig) -> bool:
    """Raising ``steps`` makes a finished stage continue from its newest checkpoint."""
    return int(outputs.get("steps", 0)) >= cfg.steps


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


def micro_step(g: Any, d: Any, loss_fn: Any, x: Any, step: int) -> dict[str, float]:
    """One micro-batch: generator backward, then (from disc_start) the discriminator's."""
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
    return {k: float(v.detach()) for k, v in logs.items()}


def evaluate(model: Any, lpips: Any, storage: Storage, shards: list[str], size: int,
             limit: int, batch: int = 16) -> dict[str, float]:
    """Reconstruction metrics over (at most ``limit`` images of) ``shards``; fp32, no grad."""
    import torch

    from pipeline.data.loader import eval_batches
    from pipeline.metrics import psnr, ssim

    model.eval()
    n, sums = 0, {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}
    hist = torch.zeros(model.config.n_embed, dtype=torch.float64)
    with torch.no_grad():
        for x, _ in eval_batches(storage, shards, batch, size, limit=limit):
            recon, quant = model(x)
            sums["psnr"] += float(psnr(x, recon).sum())
            sums["ssim"] += float(ssim(x, recon).sum())
            if lpips is not None:
                sums["lpips"] += float(lpips(x, recon).sum())
            hist += torch.bincount(quant.indices.flatten(), minlength=len(hist)).double()
            n += len(x)
    if n == 0:
        raise ValueError("no validation images to evaluate")
    p = hist / hist.sum()
    entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
    out = {k: v / n for k, v in sums.items()}
    if lpips is None:
        out.pop("lpips")
    out.update({"images": n, "codebook_usage": float((hist > 0).double().mean()),
                "perplexity": math.exp(entropy)})
    return out


def save_grid(model: Any, x: Any, storage: Storage, uri: str, step: int, tracker: Any) -> str:
    import torch

    from pipeline.metrics import pairs_grid, png_bytes, upscale

    was_training = model.training
    model.eval()
    with torch.no_grad():
        recon = model(x.to(next(model.parameters()).dtype)).recon.float()
    model.train(was_training)
    image = pairs_grid(x, recon, cols=4)
    image = upscale(image, max(1, 64 // x.shape[-1]))  # cells of >= 64 px to look at
    out = join(uri, "images", f"recon-{step:08d}.png")
    storage.write_bytes(out, png_bytes(image))
    tracker.log_images({"recon": image}, step=step)
    return out


def vqgan_worker(config: dict[str, Any]) -> None:
    """Ray Train loop (one per worker)."""
    import ray.train
    import torch

    from pipeline.data.loader import StreamSpec, eval_batches, image_batches
    from pipeline.models.discriminator import NLayerDiscriminator
    from pipeline.models.loss import VQGANLoss
    from pipeline.models.vqgan import VQGAN
    from pipeline.models.winograd import enable_winograd
    from pipeline.tracking import NullTracker
    from pipeline.train import checkpoint
    from pipeline.train.engine import make_engine, set_lr
    from pipeline.train.history import MetricsLog
    from pipeline.train.schedule import lr_at, scaled_lr
    from pipeline.train.state import TrainState

    cfg: TrainVQGANConfig = config["cfg"]
    storage: Storage = config["storage"]
    uri, seed = config["uri"], config["seed"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))

    torch.manual_seed(seed)  # identical initial weights on every rank
    model, disc = VQGAN(cfg.model), NLayerDiscriminator(cfg.disc)
    lpips = build_lpips(cfg.perceptual, storage) if cfg.loss.perceptual_weight > 0 else None
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    if lpips is not None:
        lpips.to(dtype)
    if cfg.winograd and not cfg.use_gpu and cfg.precision == "fp32":
        convs = enable_winograd(model) + (enable_winograd(lpips) if lpips is not None else 0)
        if rank == 0:
            log.info("Winograd 3x3 convolutions: %d modules%s", convs,
                     "" if convs else " (kernels unavailable here: direct convolutions)")
    loss_fn = VQGANLoss(cfg.loss, lpips)
    g, d = make_engine(model, cfg, world), make_engine(disc, cfg, world)
    state = checkpoint.restore({"G": g, "D": d})
    if state is None:
        state = TrainState()
        torch.manual_seed(seed * 1000 + rank)  # per-rank randomness (dropout, code restarts)
    else:
        log.info("rank %d resumed at step %d", rank, state.step)
    tracker = config["tracker"].create() if rank == 0 and config["tracker"] else NullTracker()

    history = MetricsLog(storage, join(uri, "history.jsonl"), state.step)
    spec = StreamSpec(tuple(config["train"]), rank, world, seed, cfg.shuffle_buffer)
    batches = image_batches(storage, spec, cfg.micro_batch, cfg.model.resolution,
                            position=state.data.get("position"), train=cfg.flip)
    vis_shards = config["val"] or config["train"]
    vis = next(eval_batches(storage, vis_shards, cfg.grid_images, cfg.model.resolution))[0]
    base_lr = scaled_lr(cfg.lr, cfg.global_batch) if cfg.lr_scale_by_batch else cfg.lr
    t0, seen0 = time.perf_counter(), state.samples_seen
    while state.step < cfg.steps:
        lr = lr_at(state.step, base_lr, warmup=cfg.warmup_steps, total=cfg.steps,
                   schedule=cfg.schedule, min_ratio=cfg.min_lr_ratio)
        set_lr(g, lr)
        set_lr(d, lr)
        logs: dict[str, float] = {}
        for _ in range(cfg.grad_accum):
            x, _, position = next(batches)
            for k, v in micro_step(g, d, loss_fn, x.to(dtype), state.step).items():
                logs[k] = logs.get(k, 0.0) + v / cfg.grad_accum
        state.advance(cfg.global_batch, position)
        crash_if_asked(cfg, state.step, rank, world)
        if cfg.due(state.step, cfg.log_every):
            elapsed = time.perf_counter() - t0
            logs.update({"lr": lr, "images_per_s": (state.samples_seen - seen0) / elapsed})
            tracker.log(logs, step=state.step)
            if rank == 0:
                history.append({"step": state.step, **logs})
                history.flush()
            t0, seen0 = time.perf_counter(), state.samples_seen
        if rank == 0 and cfg.due(state.step, cfg.image_every):
            save_grid(g.module, vis, storage, uri, state.step, tracker)
        if cfg.due(state.step, cfg.checkpoint_every):
            checkpoint.save({"G": g, "D": d}, state, logs)

    if rank == 0:
        export(g.module, cfg, lpips, storage, uri, seed, config["val"] or config["train"],
               tracker, state)
    tracker.finish()


def export(module: Any, cfg: TrainVQGANConfig, lpips: Any, storage: Storage, uri: str, seed: int,
           val: list[str], tracker: Any, state: Any) -> None:
    """Write export/vqgan.{pt,json}, then eval.json (trained vs untrained), rank 0."""
    import torch

    from pipeline.models.vqgan import VQGAN

    model = VQGAN(cfg.model)
    model.load_state_dict(module.export_state_dict())
    storage.write_bytes(join(uri, "export", WEIGHTS_NAME), model.state_bytes())
    storage.write_text(join(uri, "export", CONFIG_NAME), model.config_json())
    if lpips is not None:
        lpips.float()
    trained = evaluate(model, lpips, storage, val, cfg.model.resolution, cfg.eval_images)
    torch.manual_seed(seed)
    untrained = evaluate(VQGAN(cfg.model), lpips, storage, val, cfg.model.resolution,
                         cfg.eval_images)
    result = {"step": state.step, "samples_seen": state.samples_seen, "trained": trained,
              "untrained": untrained}
    storage.write_json(join(uri, "eval.json"), result)
    tracker.summary({f"eval/{k}": v for k, v in trained.items()})


# -- driver side ----------------------------------------------------------------------------------


def run(ctx: StageContext) -> dict[str, Any]:
    from pipeline.train.launch import fit

    cfg: TrainVQGANConfig = ctx.cfg
    shard = ctx.inputs["shard"]["outputs"]
    train = [s["uri"] for s in shard["shards"] if s["split"] == "train" and s["samples"] > 0]
    val = [s["uri"] for s in shard["shards"] if s["split"] == "val" and s["samples"] > 0]
    if not train:
        raise ValueError("the shard stage produced no training samples")
    if shard.get("resolution", cfg.model.resolution) < cfg.model.resolution:
        raise ValueError(f"train_vqgan.model.resolution={cfg.model.resolution} is larger than the "
                         f"shards' images ({shard['resolution']} px)")
    if cfg.perceptual.backbone == "random" and cfg.loss.perceptual_weight > 0:
        log.warning("[train_vqgan] perceptual.backbone=random: the perceptual loss uses a RANDOM "
                    "VGG; this is not the paper's LPIPS (offline demo/test setting)")
    loop_config = {"cfg": cfg, "storage": ctx.storage, "uri": ctx.uri, "seed": ctx.root_cfg.seed,
                   "train": train, "val": val, "tracker": ctx.tracker_spec}
    result = fit(vqgan_worker, loop_config, uri=ctx.uri, storage=ctx.storage, tc=cfg,
                 name="train")
    ev = ctx.storage.read_json(join(ctx.uri, "eval.json"))
    images = [u for u in ctx.storage.walk_files(join(ctx.uri, "images")) if u.endswith(".png")]
    return {
        "steps": ev["step"],
        "samples_seen": ev["samples_seen"],
        "export": {"weights": join(ctx.uri, "export", WEIGHTS_NAME),
                   "config": join(ctx.uri, "export", CONFIG_NAME)},
        "model": cfg.model.to_dict(),
        "latent_size": cfg.model.latent_size(),
        "eval": ev["trained"],
        "eval_untrained": ev["untrained"],
        "images": images,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "perceptual_backbone": cfg.perceptual.backbone,
    }


def report(outputs: dict[str, Any]) -> dict[str, Any]:
    """The report's section: val reconstruction metrics (vs the untrained model), the last
    input | reconstruction grid."""
    ev, ev0 = outputs["eval"], outputs.get("eval_untrained", {})
    metrics: dict[str, Any] = {"steps": outputs["steps"]}
    for key, label in (("psnr", "val PSNR (dB)"), ("ssim", "val SSIM"), ("lpips", "val LPIPS")):
        if key in ev:
            metrics[label] = f"{ev[key]:.4g}" + (f" (untrained {ev0[key]:.4g})" if key in ev0
                                                 else "")
    metrics["codebook usage"] = f"{ev['codebook_usage']:.1%}"
    metrics["code perplexity"] = ev["perplexity"]
    metrics["perceptual backbone"] = outputs.get("perceptual_backbone", "-")
    recon = sorted(u for u in outputs.get("images", []) if "/recon-" in u)
    images = [(f"Input | reconstruction ({recon[-1].rsplit('/', 1)[-1]})", recon[-1])] \
        if recon else []
    return {"metrics": metrics, "images": images}


STAGE = Stage("train_vqgan", TrainVQGANConfig, run, upstream=("shard",), version=1,
              is_complete=is_complete, report=report,
              help="VQGAN + discriminator, DeepSpeed under Ray Train")
