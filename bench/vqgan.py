"""Benchmark of VQGAN training and encoding (issue #4): the model step alone, and the stage.

Prints one JSON object. Config (the issue's): resolution 64, ch 64, ch_mult [1,1,2,2], 1 res
block, attention at 8, z/embed 64, 512 codes, batch 8, discriminator on (disc_start 0), LPIPS
with the random backbone (same compute as VGG16 LPIPS), fp32 unless ``--bf16`` (CPU autocast).
3x3 stride-1 convolutions by Winograd F(4x4, 3x3) (all of them), as the stage does in fp32
(:mod:`pipeline.kernels.winograd`; ``--winograd 0`` for oneDNN's direct convolutions only).

    .venv/bin/python bench/vqgan.py [--threads 2] [--steps 4] [--rounds 3] [--bf16]
        [--winograd 4] [--channels-last] [--no-tune-allocator] [--no-reference] [--batch 8]
        [--stage-steps 30] [--stage-log-every 5] [--stage-source builtin:digits] [--no-stage]
        [--keep]

Figures, with the reference implementation's on this machine (4.7 training and 149 encode
images/s) and the issue's targets (2× and 1.5× those: 9.4 and 224) and ``pass`` booleans:

- ``train_images_per_s``: the model step alone, this process, ``--threads`` torch threads, no
  Ray, no DeepSpeed;
- ``encode_images_per_s``: eval-mode ``VQGAN.encode`` under ``torch.inference_mode``, the faster
  of NCHW and channels_last (both reported beside it; channels_last wins: the Winograd
  kernels read it with vector loads);
- ``stage_images_per_s``: the real train_vqgan stage (Ray Train, two DeepSpeed engines per
  worker, ZeRO at the stage's default) with 2 workers × 1 CPU and micro batch 8 per worker, on
  ``--stage-source`` sharded at 64 px: the ``images_per_s`` the stage writes to
  ``history.jsonl`` every ``--stage-log-every`` steps (all workers' images per wall second),
  median of the records after the first (warm-up). Images, evaluation and checkpoints happen
  only at the last step, after the last record. ``--no-stage`` skips it (as the
  ``tests/models/bench_step.py`` shim does).

Training step = what the train_vqgan stage does per batch after disc_start: G forward, LPIPS, D
forward on x̂, adaptive weight from the gradients at x̂ (no extra passes), one generator backward,
G optimizer step, then the D step on the same reconstruction (D on real and fake, backward, D
optimizer step).

Figures that survive a shared, loaded machine:

- ``machine.fp32_matmul_gflops``: best 2048² matmul before and after, i.e. the machine's speed
  during the run (2 Zen4 cores: ~180 GFLOP/s when quiet);
- ``*.gflop`` / ``*.achieved_gflops``: work per step as direct convolutions do it (counted with
  FlopCounterMode) and the rate reached, so ``efficiency_vs_matmul`` says how close to the
  machine's peak the code runs; Winograd does fewer multiplications than counted, so with it
  (the default, ``--winograd 0`` turns it off) the ratio can pass 1;
- the reference-style step (same modules, the reference's step structure: autoencoder and LPIPS
  run once per optimizer, λ by two autograd.grad calls, then the full backward) is timed
  alternately with ours, so ``speedup_vs_reference_style`` compares both under the same load.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Run as a script, bench/ heads sys.path; import from the repository root instead (bench.* as a
# namespace package for bench.stage_run).
ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from pipeline.kernels.perf import tune_cpu_allocator  # noqa: E402
from pipeline.kernels.winograd import DEFAULT_MIN_SIZE, enable_winograd  # noqa: E402
from pipeline.models import (  # noqa: E402
    LPIPS,
    VQGAN,
    DiscriminatorConfig,
    NLayerDiscriminator,
    VQGANConfig,
    VQGANLoss,
    VQGANLossConfig,
    reconstruction_loss,
    set_requires_grad,
)

BENCH_CONFIG = VQGANConfig(
    resolution=64, ch=64, ch_mult=[1, 1, 2, 2], num_res_blocks=1, attn_resolutions=[8],
    z_channels=64, embed_dim=64, n_embed=512,
)
REFERENCE = {"train_images_per_s": 4.7, "encode_images_per_s": 149}
TARGETS = {"train_images_per_s": 9.4, "encode_images_per_s": 224}


def build(channels_last: bool):
    torch.manual_seed(0)
    model = VQGAN(BENCH_CONFIG)
    disc = NLayerDiscriminator(DiscriminatorConfig())
    lpips = LPIPS("random")
    if channels_last:
        for m in (model, disc, lpips):
            m.to(memory_format=torch.channels_last)
    loss = VQGANLoss(VQGANLossConfig(disc_start=0), lpips)
    opt_g = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-4, betas=(0.5, 0.9))
    return model, disc, loss, opt_g, opt_d


def train_step(model, disc, loss, opt_g, opt_d, x, step, autocast):
    """Ours: one generator backward (adaptive weight from the gradients at x̂), D step reusing
    the reconstruction."""
    with autocast():
        out = model(x, return_last_input=True)
        set_requires_grad(disc, False)
        g = loss.generator_loss(x, out.recon, out.last_input, model.last_layer,
                                out.quant.loss, disc, step)
    opt_g.zero_grad(set_to_none=True)
    g.backward_loss.backward()
    opt_g.step()
    set_requires_grad(disc, True)
    with autocast():
        d = loss.discriminator_loss(x, out.recon, disc, step)
    opt_d.zero_grad(set_to_none=True)
    d.loss.backward()
    opt_d.step()
    return g, d


def reference_style_step(model, disc, loss, opt_g, opt_d, x, step, autocast):
    """The reference's step structure on the same modules, as a same-machine baseline: the
    Lightning loop runs the autoencoder once per optimizer, computes the reconstruction loss
    (LPIPS included) in both, and gets λ from two autograd.grad calls before the full backward."""
    with autocast():
        recon, quant = model(x)
        total, _ = loss.generator_loss_reference(x, recon, model.last_layer, quant.loss, disc, step)
    opt_g.zero_grad(set_to_none=True)
    total.backward()
    opt_g.step()
    with autocast():
        with torch.no_grad():  # Lightning freezes the other optimizer's parameters
            recon, quant = model(x)
        reconstruction_loss(x, recon, loss.lpips, loss.config.perceptual_weight)
        d = loss.discriminator_loss(x, recon, disc, step)
    opt_d.zero_grad(set_to_none=True)
    d.loss.backward()
    opt_d.step()


def gflop(fn: Callable[[], object]) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def step_gflop(model, disc, loss, x) -> tuple[float, float]:
    """(ours, reference-style) GFLOP per training step, from per-component counts.

    FlopCounterMode cannot follow ``autograd.grad`` to a leaf, so each component is counted
    with an equivalent ``backward()`` (same kernels, same shapes)."""
    lpips = loss.lpips

    def g_fwd_bwd():
        model(x).recon.sum().backward()

    def g_fwd():
        with torch.no_grad():
            model(x)

    def lpips_fwd_bwd():  # real features without grad, x̂'s with grad, backward to x̂ only
        r = x.clone().requires_grad_(True)
        lpips(x, r).sum().backward()

    def lpips_fwd():
        with torch.no_grad():
            lpips(x, x.clone())

    def d_input_grad():  # frozen D: forward and backward to x̂ only
        r = x.clone().requires_grad_(True)
        disc(r).sum().backward()

    def d_fwd():
        with torch.no_grad():
            disc(x)

    def d_step():
        (disc(x).mean() + disc(x.clone()).mean()).backward()

    g, gf, lp, lpf, ds, df = (gflop(f) for f in (g_fwd_bwd, g_fwd, lpips_fwd_bwd, lpips_fwd,
                                                   d_step, d_fwd))
    set_requires_grad(disc, False)
    dg = gflop(d_input_grad)
    set_requires_grad(disc, True)
    model.zero_grad(set_to_none=True)
    disc.zero_grad(set_to_none=True)
    ours = g + lp + dg + ds
    # + LPIPS and D backward again (autograd.grad, then the full backward), + the second
    # autoencoder and LPIPS forwards of the discriminator's step
    reference = ours + (lp - lpf) + (dg - df) + gf + lpf
    return ours, reference


def matmul_gflops() -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return round(2 * 2048**3 / best / 1e9, 1)


def time_steps(fn, model, disc, loss, opt_g, opt_d, x, steps, autocast) -> float:
    t0 = time.perf_counter()
    for step in range(steps):
        fn(model, disc, loss, opt_g, opt_d, x, step, autocast)
    return (time.perf_counter() - t0) / steps


def encode_seconds(model, x, iters: int, rounds: int, autocast) -> float:
    with torch.inference_mode(), autocast():
        for _ in range(3):
            model.encode(x)
        best = float("inf")
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(iters):
                model.encode(x)
            best = min(best, (time.perf_counter() - t0) / iters)
    return best


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--encode-iters", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--bf16", action="store_true", help="CPU bf16 autocast (fp32 is the figure)")
    ap.add_argument("--channels-last", action="store_true", help="channels_last for training too")
    ap.add_argument("--rounds", type=int, default=3,
                    help="alternating timing rounds (ours, reference-style); the best counts")
    ap.add_argument("--no-reference", action="store_true", help="skip the reference-style step")
    ap.add_argument("--no-tune-allocator", action="store_true",
                    help="keep glibc's default mmap thresholds (see pipeline.kernels.perf)")
    ap.add_argument("--stage-steps", type=int, default=30, help="train_vqgan stage steps")
    ap.add_argument("--stage-log-every", type=int, default=5,
                    help="stage steps per images/s record in history.jsonl")
    ap.add_argument("--stage-source", default="builtin:digits",
                    help="shard source of the stage run (sharded at 64 px)")
    ap.add_argument("--no-stage", action="store_true", help="skip the stage figure")
    ap.add_argument("--winograd", type=int, default=DEFAULT_MIN_SIZE, metavar="MIN_SIZE",
                    help="Winograd 3x3 convolutions on maps of at least MIN_SIZE px, as the "
                    "stage does in fp32 (0: oneDNN's direct convolutions only)")
    ap.add_argument("--keep", action="store_true", help="keep the stage's temporary root")
    return ap.parse_args(argv)


def measure_model(args: argparse.Namespace) -> dict[str, Any]:
    """The model-step and encode figures (one process, ``args.threads`` torch threads)."""
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(args.threads)
    allocator_tuned = False if args.no_tune_allocator else tune_cpu_allocator()
    matmul_start = matmul_gflops()

    def autocast():
        if args.bf16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    model, disc, loss, opt_g, opt_d = build(args.channels_last)
    x = torch.rand(args.batch, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    # Work as oneDNN's direct convolutions do it (FlopCounterMode cannot see the Winograd
    # kernels): with Winograd on, "achieved" rates are direct-equivalent and may pass the peak.
    ours_gflop, ref_gflop = step_gflop(model, disc, loss, x)
    model.eval()
    with torch.inference_mode():
        encode_gflop = gflop(lambda: model.encode(x))
    winograd_convs = 0
    if args.winograd and not args.bf16:
        winograd_convs = sum(enable_winograd(m, args.winograd) for m in (model, disc, loss))

    model.train()
    disc.train()
    for step in range(2):  # warm-up (allocator, oneDNN primitive caches)
        train_step(model, disc, loss, opt_g, opt_d, x, step, autocast)
        if not args.no_reference:
            reference_style_step(model, disc, loss, opt_g, opt_d, x, step, autocast)
    # Alternate the two step kinds and keep each one's best round: on a shared machine the
    # load changes over time, and the ratio of the two is the robust figure.
    train_s, ref_s = [], []
    for _ in range(args.rounds):
        train_s.append(time_steps(train_step, model, disc, loss, opt_g, opt_d, x, args.steps,
                                  autocast))
        if not args.no_reference:
            ref_s.append(time_steps(reference_style_step, model, disc, loss, opt_g, opt_d, x,
                                    args.steps, autocast))
    best_train = min(train_s)
    g, _ = train_step(model, disc, loss, opt_g, opt_d, x, 0, autocast)

    model.eval()
    encode_nchw = encode_seconds(model, x.contiguous(), args.encode_iters, args.rounds, autocast)
    model.to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    encode_cl = encode_seconds(model, x_cl, args.encode_iters, args.rounds, autocast)
    encode_best = min(encode_nchw, encode_cl)
    matmul_end = matmul_gflops()
    matmul = (matmul_start + matmul_end) / 2

    b = args.batch
    result = {
        "config": {"resolution": 64, "ch": 64, "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1,
                   "attn_resolutions": [8], "n_embed": 512, "batch": b,
                   "threads": args.threads, "bf16": args.bf16,
                   "channels_last_train": args.channels_last, "allocator_tuned": allocator_tuned,
                   "winograd_min_size": args.winograd, "winograd_convs": winograd_convs,
                   "lpips": "random", "disc": True},
        "train_images_per_s": round(b / best_train, 2),
        "encode_images_per_s": round(b / encode_best, 1),
        "encode_images_per_s_nchw": round(b / encode_nchw, 1),
        "encode_images_per_s_channels_last": round(b / encode_cl, 1),
        "machine": {"fp32_matmul_gflops": [matmul_start, matmul_end]},
        "train": {"step_s": round(best_train, 4), "gflop": round(ours_gflop, 1),
                  "achieved_gflops": round(ours_gflop / best_train, 1),
                  "efficiency_vs_matmul": round(ours_gflop / best_train / matmul, 2),
                  "last_d_weight": round(float(g.d_weight), 5)},
        "encode": {"gflop": round(encode_gflop, 2),
                   "achieved_gflops": round(encode_gflop / encode_best, 1),
                   "efficiency_vs_matmul": round(encode_gflop / encode_best / matmul, 2)},
        "reference_style": None,
        "reference_measured": REFERENCE,
        "targets": TARGETS,
    }
    if ref_s:
        best_ref = min(ref_s)
        result["reference_style"] = {
            "images_per_s": round(b / best_ref, 2), "gflop": round(ref_gflop, 1),
            "speedup_of_ours": round(best_ref / best_train, 2),
        }
    return result


# The stage run: the benchmark's model config and loss, 2 workers × 1 CPU, micro batch 8 each.
# Images, evaluation and checkpoints only at the last step (after the last history record).
STAGE_OVERRIDES = [
    "shard.resolution=64", "shard.ext=png", "shard.samples_per_shard=500",
    "shard.val_fraction=0.05", "shard.progress=false",
    "train_vqgan.model.resolution=64", "train_vqgan.model.ch=64",
    "train_vqgan.model.ch_mult=[1,1,2,2]", "train_vqgan.model.num_res_blocks=1",
    "train_vqgan.model.attn_resolutions=[8]", "train_vqgan.model.z_channels=64",
    "train_vqgan.model.embed_dim=64", "train_vqgan.model.n_embed=512",
    "train_vqgan.disc.ndf=64", "train_vqgan.disc.n_layers=3",
    "train_vqgan.perceptual.backbone=random", "train_vqgan.loss.disc_start=0",
    "train_vqgan.loss.perceptual_weight=1.0", "train_vqgan.loss.disc_weight=1.0",
    "train_vqgan.micro_batch=8", "train_vqgan.grad_accum=1", "train_vqgan.num_workers=2",
    "train_vqgan.cpus_per_worker=1", "train_vqgan.precision=fp32",
    "train_vqgan.eval_images=16", "train_vqgan.grid_images=4",
]


def stage_overrides(root: str, source: str, steps: int, log_every: int) -> list[str]:
    """The full override list of the stage run under ``root``."""
    return ["run=bench-vqgan", f"storage.root={root}", "tracking.mode=disabled",
            f"shard.source={source}", *STAGE_OVERRIDES, f"train_vqgan.steps={steps}",
            f"train_vqgan.log_every={log_every}", f"train_vqgan.checkpoint_every={steps}",
            f"train_vqgan.image_every={steps}"]


def measure_stage(root: str, source: str, steps: int, log_every: int) -> dict[str, Any]:
    """shard → train_vqgan under ``root``; the stage's images/s (median of the history records
    after the first), every record, and its setup."""
    # Imported here: the model figures (and bench/gpu.py, which imports this module on a GPU
    # machine without the pipeline's dependencies) need torch and pipeline.models only.
    from bench.stage_run import history_rate, run_stages
    from stages.shard import STAGE as SHARD
    from stages.train_vqgan import STAGE as TRAIN_VQGAN

    manifests, cfg, seconds = run_stages([SHARD, TRAIN_VQGAN],
                                         stage_overrides(root, source, steps, log_every))
    median, rates = history_rate(manifests["train_vqgan"], "images_per_s")
    t = cfg.train_vqgan
    return {"images_per_s": round(median, 2), "records_images_per_s": [round(r, 2) for r in rates],
            "source": source, "steps": steps, "log_every": log_every,
            "workers": t.num_workers, "cpus_per_worker": t.cpus_per_worker,
            "micro_batch": t.micro_batch, "zero_stage": t.zero_stage, "precision": t.precision,
            "pipeline_seconds": round(seconds, 1)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = measure_model(args)
    stage = None
    if not args.no_stage:
        from bench.stage_run import temp_root
        from pipeline.storage import join

        with temp_root("bench-vqgan-", args.keep) as root:
            stage = measure_stage(join(root, "runs"), args.stage_source, args.stage_steps,
                                  args.stage_log_every)
            if args.keep:
                stage["root"] = root
    result["stage"] = stage
    result["stage_images_per_s"] = stage["images_per_s"] if stage else None
    result["pass"] = {k: result[k] >= v for k, v in TARGETS.items()}
    result["load_average_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
