"""GPU check of the model code: CUDA results against the CPU's, then throughput. One JSON object.

The pipeline's stages take ``use_gpu``; CI has no GPU, so this script is how the model code is
checked on one (it needs torch and numpy only: no Ray, DeepSpeed or storage). Models are the
benchmark configs of issues #4 and #6 (bench/vqgan.py, bench/gpt_model.py), random init.

Checks (``checks``, each with its number and a ``pass`` boolean):

- ``vqgan_recon_rel_err``: VQGAN forward, fp32 (TF32 off), CUDA against CPU on the same weights
  and batch: max |difference| / max |CPU output|, < 1e-3;
- ``vqgan_codes_agree``: the fraction of equal codes from ``encode`` (near-ties may flip), > 0.99;
- ``winograd_swap_falls_back_on_cuda``: a model with the CPU Winograd layers swapped in gives on
  CUDA exactly the plain model's result (the layers must step aside off the CPU);
- ``vqgan_bf16_l1_falls``: 60 training steps (the stage's step: generator with the adaptive
  weight, then the discriminator on the same reconstruction; perceptual weight 0.1 and GAN weight
  0.1, since the random LPIPS backbone would drown the signal) under bf16 autocast on a fixed
  batch: the eval-mode L1 reconstruction error after, over before, < 0.85 (~0.76 on CPU);
- ``gpt_logits_rel_err``: GPT forward, fp32, CUDA against CPU, < 1e-3;
- ``gpt_cached_equals_uncached``: greedy sampling (top_k 1) with the KV cache against the full
  forward every step: the fraction of equal codes, > 0.99.

Throughput (``speed``, CUDA, after warm-up, synchronised): VQGAN training images/s (fp32 with
TF32, and bf16 autocast) and encode images/s; GPT training tokens/s (bf16 autocast) and cached /
sliding-window sampling codes/s.

Usage: python bench/gpu.py [--quick]    (exits 2 where torch sees no CUDA device)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402

from bench.gpt_model import model_config as gpt_config  # noqa: E402
from bench.vqgan import build, train_step  # noqa: E402
from pipeline.kernels.winograd import enable_winograd  # noqa: E402
from pipeline.models import VQGANLoss, VQGANLossConfig  # noqa: E402
from pipeline.models.gpt import GPT, GPTConfig  # noqa: E402
from pipeline.models.sampling import sample, sample_sliding, sample_uncached  # noqa: E402

CUDA = torch.device("cuda")


def seconds(fn: Callable[[], object], iters: int) -> float:
    """Best-of-3 mean seconds per call of ``fn`` on the GPU (synchronised)."""
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / iters)
    return best


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return float((got - want).abs().max() / want.abs().max())


def check(result: dict, name: str, value: float, ok: bool) -> None:
    result["checks"][name] = {"value": round(value, 6), "pass": bool(ok)}


def smooth_images(n: int, gen: torch.Generator) -> torch.Tensor:
    """[n, 3, 64, 64] in [-1, 1]: low-frequency colour fields, something an autoencoder can
    learn in a few dozen steps (unlike white noise)."""
    coarse = torch.rand(n, 3, 8, 8, generator=gen) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=64, mode="bilinear", align_corners=False)


def vqgan_checks(result: dict, quick: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    model, disc, loss, opt_g, opt_d = build(channels_last=False)
    x = smooth_images(8, gen)
    model.eval()
    with torch.inference_mode():
        ref = model(x).recon
        ref_codes = model.encode(x).indices
    swapped = copy.deepcopy(model)
    enable_winograd(swapped)  # CPU layers; must not change anything on CUDA
    model.to(CUDA)
    swapped.to(CUDA)
    xc = x.to(CUDA)
    with torch.inference_mode():
        out = model(xc).recon
        codes = model.encode(xc).indices
        same = torch.equal(swapped(xc).recon, out)
    check(result, "vqgan_recon_rel_err", rel_err(out, ref), rel_err(out, ref) < 1e-3)
    agree = float((codes.cpu() == ref_codes).float().mean())
    check(result, "vqgan_codes_agree", agree, agree > 0.99)
    check(result, "winograd_swap_falls_back_on_cuda", float(same), same)
    del swapped

    # Training on CUDA: fresh optimizers over the CUDA parameters.
    disc.to(CUDA)
    loss = VQGANLoss(VQGANLossConfig(disc_start=0, perceptual_weight=0.1, disc_weight=0.1),
                     loss.lpips).to(CUDA)
    opt_g = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(disc.parameters(), lr=1e-3, betas=(0.5, 0.9))

    def bf16():
        return torch.autocast("cuda", dtype=torch.bfloat16)

    def l1() -> float:
        model.eval()
        with torch.inference_mode():
            err = float((model(xc).recon - xc).abs().mean())
        model.train()
        return err

    before = l1()
    for step in range(60):
        train_step(model, disc, loss, opt_g, opt_d, xc, step, bf16)
    ratio = l1() / before
    check(result, "vqgan_bf16_l1_falls", ratio, ratio < 0.85)

    speed = result["speed"]
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    for batch in (8,) if quick else (8, 64):
        xb = smooth_images(batch, gen).to(CUDA)
        for name, ctx in (("tf32", contextlib.nullcontext), ("bf16", bf16)):
            s = seconds(lambda xb=xb, ctx=ctx: train_step(model, disc, loss, opt_g, opt_d,
                                                          xb, 1, ctx), 5)
            speed[f"vqgan_train_{name}_batch{batch}_images_per_s"] = round(batch / s, 1)
    model.eval()
    xb = smooth_images(256, gen).to(CUDA)
    with torch.inference_mode():
        for name, ctx in (("tf32", contextlib.nullcontext), ("bf16", bf16)):
            with ctx():
                s = seconds(lambda: model.encode(xb), 5)
            speed[f"vqgan_encode_{name}_batch256_images_per_s"] = round(256 / s, 1)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False


def gpt_checks(result: dict, quick: bool) -> None:
    torch.manual_seed(0)
    cfg = gpt_config()
    model = GPT(cfg).eval()
    codes = torch.randint(0, cfg.vocab_size, (4, 255))
    labels = torch.arange(4)
    with torch.inference_mode():
        ref = model(torch.cat([model.cond_tokens(labels, 4), codes], 1))[0]
    model.to(CUDA)
    with torch.inference_mode():
        out = model(torch.cat([model.cond_tokens(labels.to(CUDA), 4), codes.to(CUDA)], 1))[0]
    check(result, "gpt_logits_rel_err", rel_err(out, ref), rel_err(out, ref) < 1e-3)
    lab = torch.arange(8, device=CUDA) % cfg.n_classes
    cached = sample(model, 8, lab, 256, top_k=1, seed=0)
    full = sample_uncached(model, 8, lab, 256, top_k=1, seed=0)
    agree = float((cached == full).float().mean())
    check(result, "gpt_cached_equals_uncached", agree, agree > 0.99)

    speed = result["speed"]
    train = GPT(cfg).to(CUDA).train()
    opt = torch.optim.AdamW(train.configure_optimizer_groups(0.01), lr=1e-4)
    batch = 64
    x = torch.randint(0, cfg.vocab_size, (batch, 256), device=CUDA)
    y = torch.randint(0, cfg.n_classes, (batch,), device=CUDA)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = train.loss(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    speed["gpt_train_bf16_batch64_tokens_per_s"] = round(batch * 256 / seconds(step, 10))
    for n in (8,) if quick else (8, 64):
        lab = torch.arange(n, device=CUDA) % cfg.n_classes
        s = seconds(lambda n=n, lab=lab: sample(model, n, lab, 256, top_k=100, seed=0), 1)
        speed[f"gpt_sample_cached_batch{n}_codes_per_s"] = round(n * 256 / s)
    slide = GPT(GPTConfig(**{**vars(cfg), "block_size": 257})).to(CUDA).eval()
    lab = torch.arange(8, device=CUDA) % cfg.n_classes
    s = seconds(lambda: sample_sliding(slide, 8, lab, grid=(32, 32), window=(16, 16), top_k=100,
                                       seed=0), 1)
    speed["gpt_sample_sliding_32x32_batch8_codes_per_s"] = round(8 * 1024 / s)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one batch size per figure")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA device"}))
        sys.exit(2)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    result: dict = {"torch": torch.__version__, "device": torch.cuda.get_device_name(),
                    "checks": {}, "speed": {}}
    t0 = time.perf_counter()
    vqgan_checks(result, args.quick)
    gpt_checks(result, args.quick)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["pass"] = all(c["pass"] for c in result["checks"].values())
    print(json.dumps(result))
    sys.exit(0 if result["pass"] else 1)


if __name__ == "__main__":
    main()
