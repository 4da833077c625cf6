"""Benchmark of the GPT training step alone: forward + backward + AdamW step, tokens/s.

Model: GPT 4 layers, 4 heads, 256 wide, block 256, vocab 512 (10 classes, pkeep 0.9,
cond_drop 0.1: the training-time corruption is part of the step), batch 8 sequences of 256 codes,
fp32, ``torch.set_num_threads(--threads)``. Prints one JSON object; tokens/s = batch x 256 codes /
median step time over ``--steps`` steps after ``--warmup``. ``--bf16`` also times the step under
bf16 autocast (a lever on this CPU, AVX512-BF16; fp32 is the compared figure).

Usage: python bench/gpt_model.py [--threads 2] [--batch 8] [--steps 10] [--warmup 3] [--bf16]
``bench/gpt.py`` reports this figure (:func:`measure`) beside the train_transformer stage's.
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
import contextlib  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from pipeline.models.gpt import GPT, GPTConfig  # noqa: E402


def time_steps(model: GPT, opt: torch.optim.Optimizer, codes: torch.Tensor,
               labels: torch.Tensor, steps: int, warmup: int, bf16: bool) -> list[float]:
    times = []
    for k in range(warmup + steps):
        t0 = time.perf_counter()  # wall time: a busy machine shows up as slower steps
        ctx = (torch.autocast("cpu", dtype=torch.bfloat16) if bf16
               else contextlib.nullcontext())
        with ctx:
            loss = model.loss(codes, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if k >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def model_config() -> GPTConfig:
    """The benchmarked GPT (issue #6): 4 layers, 4 heads, 256 wide, block 256, vocab 512, with
    10 classes and the training-time corruption (pkeep 0.9, cond_drop 0.1)."""
    return GPTConfig(vocab_size=512, n_classes=10, block_size=256, n_layer=4, n_head=4,
                     n_embd=256, pkeep=0.9, cond_drop=0.1)


def measure(threads: int = 2, batch: int = 8, steps: int = 10, warmup: int = 3,
            bf16: bool = False) -> dict[str, object]:
    """Time the model step on random codes; returns the JSON fields (``train_tok_s`` = batch x
    256 / median step time). Sets torch's intra-op threads of this process to ``threads``."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = model_config()
    model = GPT(cfg).train()
    opt = torch.optim.AdamW(model.configure_optimizer_groups(0.01), lr=4.5e-6,
                            betas=(0.9, 0.95))
    codes = torch.randint(0, cfg.vocab_size, (batch, 256))
    labels = torch.randint(0, cfg.n_classes, (batch,))
    tokens = batch * 256
    result: dict[str, object] = {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "batch": batch,
        "seq": 256, "params": model.num_params(),
        "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    times = time_steps(model, opt, codes, labels, steps, warmup, bf16=False)
    result["train_tok_s"] = round(tokens / statistics.median(times), 1)
    result["step_s_median"] = round(statistics.median(times), 4)
    result["step_s_min"] = round(min(times), 4)
    if bf16:
        times = time_steps(model, opt, codes, labels, steps, warmup, bf16=True)
        result["bf16_autocast_train_tok_s"] = round(tokens / statistics.median(times), 1)
    result["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--bf16", action="store_true")
    args = ap.parse_args()
    print(json.dumps(measure(args.threads, args.batch, args.steps, args.warmup, args.bf16)))


if __name__ == "__main__":
    main()
