"""Benchmark of GPT sampling: KV-cached, uncached and sliding-window tokens/s. Prints one JSON.

Model: GPT 4 layers, 4 heads, 256 wide, vocab 512 (random init, class-conditional with 10
classes; a batch mixes classes), fp32, eval mode, ``torch.set_num_threads(--threads)``.

Threads: the process runs with ``--threads`` intra-op threads (``threads`` in the output) and
``OMP_WAIT_POLICY`` (``omp_wait_policy``). The samplers run their one-token steps on
``decode_threads`` threads (:func:`pipeline.models.decode.decode_threads`: one for steps as small
as these, restoring the setting after), with the ``decode_kernels`` kernel set (``native``: the C
kernels of :mod:`pipeline.kernels.decode`, installed at start, built at first use with the system
compiler; ``onednn``; ``aten``); prefixes and chunks (sliding window, uncached) use all
``threads``. The pipeline's samplers do the same, so the cached figure does not depend on the
wait policy.

- ``cached``: :func:`pipeline.models.sampling.sample`, block 256, 256 new codes per row.
- ``uncached``: :func:`sample_uncached` (full context every step, as the reference's ``sample``).
- ``sliding``: :func:`sample_sliding` on a 32x32 grid with a 16x16 window (block 257).
- ``sliding_full_window``: the reference's sliding-window cost model on the same model: one
  forward over the whole window (h*w positions) per sampled code, measured on the first
  ``--reference-rows`` grid rows only (it is slow) and reported as tokens/s.
- ``--cond``: the same model reading a condition map first (issue #16: 256 condition codes of a
  512 codebook before the image's, block 512): ``cond_cached`` (one prefill of the map, then
  256 codes) and ``cond_sliding`` (32x32 grid, a 32x32 condition grid whose 16x16 crop under
  each window placement is that placement's prefix), with ``cond_sliding_stats_per_row``.
  2 Zen4 cores, batch 8 (2026-12-04): cond_cached ~2,300 tokens/s (cached ~6,000: the map
  doubles the attended positions and adds a 257-token prefill), cond_sliding ~245 (sliding
  ~625): 115,600 positions forwarded per row against 524,288 for a full-window forward per code.

tokens/s counts sampled codes of all rows of the batch (batch x codes / seconds). Each figure is
the best of ``--repeats`` runs (after a small warm-up of every path), with its wall and CPU
seconds; the load average before and after is printed too (the machine may be shared).
Reference code on this machine: ~1,480 tokens/s cached, ~25 tokens/s sliding window.
Before :class:`~pipeline.models.decode.DecodeStep` (forward_step per token on 2 threads,
PASSIVE): ~1,050-1,400 tokens/s cached; with its ``onednn`` kernels ~2,100-2,400, ``native``
~3,000-3,400 (idle machine).

Usage: python bench/sample.py [--threads 2] [--batch 8] [--repeats 2] [--reference-rows 1]
       [--skip-uncached] [--bf16] [--cond]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Sleep, don't spin, when an OpenMP thread waits: on a shared 2-core machine GNU OpenMP's default
# spinning made 2-thread steps 10-30x slower whenever other processes were busy. Must be set
# before torch loads libgomp; an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# bench/ also holds scripts named like stdlib modules (tokenize.py) that would shadow them once
# this script's folder heads sys.path: drop it before anything imports torch.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402

from pipeline.kernels import decode as native_decode  # noqa: E402
from pipeline.models.decode import (  # noqa: E402
    DecodeStep,
    decode_threads,
    step_macs,
)
from pipeline.models.gpt import GPT, GPTConfig  # noqa: E402
from pipeline.models.sampling import (  # noqa: E402
    sample,
    sample_sliding,
    sample_uncached,
    sliding_window_origin,
)


def measure(result: dict[str, object], name: str, fn: Callable[[], object], tokens: int,
            repeats: int) -> None:
    """Best of ``repeats`` runs of ``fn`` (sampling ``tokens`` codes in all): ``<name>_tok_s``,
    its wall seconds and the process CPU seconds of that run (CPU time counts both threads and
    the time they spin; on a busy machine, CPU tokens/s at one thread is the steadier figure)."""
    best = (float("inf"), 0.0)
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        best = min(best, (time.perf_counter() - t0, time.process_time() - c0))
    result[f"{name}_tok_s"] = round(tokens / best[0], 1)
    result[f"{name}_s"] = round(best[0], 3)
    result[f"{name}_cpu_s"] = round(best[1], 3)


def decode_threads_for(model: GPT, batch: int) -> int:
    """Intra-op threads the samplers' one-token steps run with for ``batch`` rows."""
    with decode_threads(step_macs(model.config, batch)) as n:
        return n


def decode_kernels_for(model: GPT, batch: int) -> str:
    """The kernel set (:data:`pipeline.models.decode.KERNELS`) of the samplers' one-token
    steps for ``batch`` rows."""
    with decode_threads(step_macs(model.config, batch)):
        return DecodeStep(model, batch).kernels


@torch.inference_mode()
def full_window_rows(model: GPT, labels: torch.Tensor, grid: tuple[int, int],
                     window: tuple[int, int], rows: int) -> None:
    """The reference's sliding-window loop (a forward over the whole window per code), greedy,
    for the first ``rows`` grid rows."""
    (big_h, big_w), (h, w) = grid, window
    codes = torch.zeros(labels.shape[0], big_h, big_w, dtype=torch.long)
    cond = model.cond_tokens(labels)
    for i in range(rows):
        for j in range(big_w):
            i_s, j_s = sliding_window_origin(i, j, grid, window)
            patch = codes[:, i_s:i_s + h, j_s:j_s + w].reshape(labels.shape[0], -1)
            logits = model(torch.cat([cond, patch[:, :-1]], dim=1))[0]  # [B, h*w, V]
            codes[:, i, j] = logits[:, (i - i_s) * w + (j - j_s)].argmax(-1)


def measure_conditional(result: dict[str, object], base: dict[str, int], b: int,
                        labels: torch.Tensor, grid: tuple[int, int], window: tuple[int, int],
                        kw: dict[str, object], repeats: int) -> None:
    """``cond_cached`` / ``cond_sliding``: the model with a 16x16 condition map in front."""
    (h, w), p = window, window[0] * window[1]
    model = GPT(GPTConfig(**base, block_size=p + h * w, cond_vocab_size=512,
                          cond_length=p)).eval()
    gen = torch.Generator().manual_seed(1)
    maps = torch.randint(0, 512, (b, *grid), generator=gen)
    small = maps[:, :h, :w].reshape(b, p)
    sample(model, b, labels, 8, cond_codes=small, **kw)  # warm-up
    measure(result, "cond_cached",
            lambda: sample(model, b, labels, h * w, cond_codes=small, **kw), b * h * w, repeats)
    stats_box: list = []

    def slide() -> None:
        stats_box[:] = [sample_sliding(model, b, labels, grid=grid, window=window,
                                       cond_grid=maps, return_stats=True, **kw)[1]]

    measure(result, "cond_sliding", slide, b * grid[0] * grid[1], 1)
    result["cond_sliding_stats_per_row"] = vars(stats_box[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--reference-rows", type=int, default=1)
    ap.add_argument("--skip-uncached", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="also time cached/sliding in bf16")
    ap.add_argument("--cond", action="store_true",
                    help="also time a GPT that reads a condition map (cached and sliding)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    native_decode.install()  # the C kernels as the samplers' "native" set
    torch.manual_seed(0)
    b = args.batch
    labels = torch.arange(b) % 10
    base = dict(vocab_size=512, n_classes=10, n_layer=4, n_head=4, n_embd=256)
    model = GPT(GPTConfig(**base, block_size=256)).eval()
    slide_model = GPT(GPTConfig(**base, block_size=257)).eval()
    grid, window = (32, 32), (16, 16)
    kw = dict(top_k=100, seed=0)
    result: dict[str, object] = {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "batch": b,
        "model": {**base, "dtype": "float32"},
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        "decode_threads": decode_threads_for(model, b),
        "decode_kernels": decode_kernels_for(model, b),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }

    n_codes = grid[0] * grid[1]
    # warm-up: every code path once, small
    sample(model, b, labels, 8, **kw)
    sample_uncached(model, b, labels, 8, **kw)
    sample_sliding(slide_model, b, labels, grid=(16, 18), window=window, **kw)

    measure(result, "cached", lambda: sample(model, b, labels, 256, **kw), b * 256, args.repeats)
    if not args.skip_uncached:
        measure(result, "uncached", lambda: sample_uncached(model, b, labels, 256, **kw),
                b * 256, 1)
    stats_box: list = []

    def slide() -> None:
        stats_box[:] = [sample_sliding(slide_model, b, labels, grid=grid, window=window,
                                       return_stats=True, **kw)[1]]

    measure(result, "sliding", slide, b * n_codes, args.repeats)
    result["sliding_stats_per_row"] = vars(stats_box[0])
    if args.reference_rows:
        rows = args.reference_rows
        measure(result, "sliding_full_window",
                lambda: full_window_rows(slide_model, labels, grid, window, rows),
                b * rows * grid[1], 1)
    if args.bf16:
        m16 = GPT(GPTConfig(**base, block_size=256)).to(torch.bfloat16).eval()
        s16 = GPT(GPTConfig(**base, block_size=257)).to(torch.bfloat16).eval()
        sample(m16, b, labels, 8, **kw)
        measure(result, "bf16_cached", lambda: sample(m16, b, labels, 256, **kw), b * 256,
                args.repeats)
        measure(result, "bf16_sliding",
                lambda: sample_sliding(s16, b, labels, grid=grid, window=window, **kw),
                b * n_codes, 1)
    if args.cond:
        measure_conditional(result, base, b, labels, grid, window, kw, args.repeats)
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
