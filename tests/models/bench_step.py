"""Benchmark of the VQGAN model code: training-step and encode throughput (images/s), one process.

Not collected by pytest (name does not start with test_). Prints one JSON object.

    .venv/bin/python tests/models/bench_step.py [--threads 2] [--steps 6] [--bf16]
        [--channels-last] [--batch 8]

Training step = what the train_vqgan stage does per batch after disc_start: G forward, LPIPS
(random backbone), D forward on x̂, adaptive weight from the gradients at x̂ (no extra passes),
one generator backward, G optimizer step, then the D step on the same reconstruction (D forward
on real and fake, backward, D optimizer step). Encode = eval-mode ``VQGAN.encode`` under
``torch.inference_mode``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time

import torch

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

BENCH_CONFIG = VQGANConfig(
    resolution=64, ch=64, ch_mult=[1, 1, 2, 2], num_res_blocks=1, attn_resolutions=[8],
    z_channels=64, embed_dim=64, n_embed=512,
)


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
        recon, quant = model(x)
        reconstruction_loss(x, recon, loss.lpips, loss.config.perceptual_weight)
        d = loss.discriminator_loss(x, recon, disc, step)
    opt_d.zero_grad(set_to_none=True)
    d.loss.backward()
    opt_d.step()


def time_steps(fn, model, disc, loss, opt_g, opt_d, x, steps, autocast) -> float:
    t0 = time.perf_counter()
    for step in range(steps):
        fn(model, disc, loss, opt_g, opt_d, x, step, autocast)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--encode-iters", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--bf16", action="store_true", help="CPU bf16 autocast (fp32 is the figure)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--rounds", type=int, default=3,
                    help="alternating timing rounds (fast, reference-style); the best counts")
    ap.add_argument("--no-reference", action="store_true", help="skip the reference-style step")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(args.threads)

    def autocast():
        if args.bf16:
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    model, disc, loss, opt_g, opt_d = build(args.channels_last)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch, 3, 64, 64, generator=gen) * 2 - 1
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

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
    train_s = min(train_s)
    g, _ = train_step(model, disc, loss, opt_g, opt_d, x, 0, autocast)

    model.eval()
    with torch.inference_mode(), autocast():
        for _ in range(3):
            model.encode(x)
        encode_s = []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            for _ in range(args.encode_iters):
                model.encode(x)
            encode_s.append((time.perf_counter() - t0) / args.encode_iters)
        encode_s = min(encode_s)

    print(json.dumps({
        "config": {"resolution": 64, "ch": 64, "ch_mult": [1, 1, 2, 2], "num_res_blocks": 1,
                   "attn_resolutions": [8], "n_embed": 512, "batch": args.batch,
                   "threads": args.threads, "bf16": args.bf16,
                   "channels_last": args.channels_last, "lpips": "random", "disc": True},
        "train_step_s": round(train_s, 4),
        "train_images_per_s": round(args.batch / train_s, 2),
        "encode_images_per_s": round(args.batch / encode_s, 1),
        "reference_style_train_images_per_s": (
            round(args.batch / min(ref_s), 2) if ref_s else None),
        "speedup_vs_reference_style": round(min(ref_s) / train_s, 2) if ref_s else None,
        "last_d_weight": float(g.d_weight),
        "reference_train_images_per_s": 4.7,
        "reference_encode_images_per_s": 149,
        "targets": {"train_images_per_s": 9.4, "encode_images_per_s": 224},
    }))


if __name__ == "__main__":
    main()
