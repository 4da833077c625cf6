"""Benchmark of the VQGAN model code: training-step and encode throughput (images/s), one process.

Not collected by pytest (name does not start with test_). Prints one JSON object.

    .venv/bin/python tests/models/bench_step.py [--threads 2] [--steps 4] [--rounds 3] [--bf16]
        [--channels-last] [--no-tune-allocator] [--no-reference] [--batch 8]

Config: resolution 64, ch 64, ch_mult [1,1,2,2], 1 res block, attention at 8, z/embed 64, 512
codes, batch 8, discriminator on (disc_start 0), LPIPS with the random backbone, fp32 unless
``--bf16`` (CPU autocast).

Training step = what the train_vqgan stage does per batch after disc_start: G forward, LPIPS, D
forward on x̂, adaptive weight from the gradients at x̂ (no extra passes), one generator backward,
G optimizer step, then the D step on the same reconstruction (D on real and fake, backward, D
optimizer step). Encode = eval-mode ``VQGAN.encode`` under ``torch.inference_mode``, model and
input in channels_last (the recommended inference set-up) and, for comparison, in NCHW.

Figures that survive a shared, loaded machine:

- ``machine.fp32_matmul_gflops``: best 2048² matmul before and after, i.e. the machine's speed
  during the run (2 Zen4 cores: ~180 GFLOP/s when quiet);
- ``*.gflop`` / ``*.achieved_gflops``: work per step (counted with FlopCounterMode) and the rate
  reached, so ``efficiency_vs_matmul`` says how close to the machine's peak the code runs;
- the reference-style step (same modules, the reference's step structure: autoencoder and LPIPS
  run once per optimizer, λ by two autograd.grad calls, then the full backward) is timed
  alternately with ours, so ``speedup_vs_reference_style`` compares both under the same load.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.models import (
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
from pipeline.models.perf import tune_cpu_allocator

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


def main() -> None:
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
                    help="keep glibc's default mmap thresholds (see pipeline.models.perf)")
    args = ap.parse_args()
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
    ours_gflop, ref_gflop = step_gflop(model, disc, loss, x)

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
    with torch.inference_mode():
        encode_gflop = gflop(lambda: model.encode(x))
    encode_nchw = encode_seconds(model, x.contiguous(), args.encode_iters, args.rounds, autocast)
    model.to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    encode_cl = encode_seconds(model, x_cl, args.encode_iters, args.rounds, autocast)
    matmul_end = matmul_gflops()
    matmul = (matmul_start + matmul_end) / 2

    b = args.batch
    result = {
        "config": {"resolution": 64, "ch": 64, "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1,
                   "attn_resolutions": [8], "n_embed": 512, "batch": b,
                   "threads": args.threads, "bf16": args.bf16,
                   "channels_last_train": args.channels_last, "allocator_tuned": allocator_tuned,
                   "lpips": "random", "disc": True},
        "train_images_per_s": round(b / best_train, 2),
        "encode_images_per_s": round(b / encode_cl, 1),
        "encode_images_per_s_nchw": round(b / encode_nchw, 1),
        "machine": {"fp32_matmul_gflops": [matmul_start, matmul_end]},
        "train": {"step_s": round(best_train, 4), "gflop": round(ours_gflop, 1),
                  "achieved_gflops": round(ours_gflop / best_train, 1),
                  "efficiency_vs_matmul": round(ours_gflop / best_train / matmul, 2),
                  "last_d_weight": round(float(g.d_weight), 5)},
        "encode": {"gflop": round(encode_gflop, 2),
                   "achieved_gflops": round(encode_gflop / encode_cl, 1),
                   "efficiency_vs_matmul": round(encode_gflop / encode_cl / matmul, 2)},
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
    print(json.dumps(result))


if __name__ == "__main__":
    main()
