"""Benchmark of GPT training (issue #6): the model step alone, and the train_transformer stage.

Prints one JSON object with training tokens/s for GPT 4 layers, 4 heads, 256 wide, block 256,
vocab 512 (10 classes), batch 8 sequences, fp32:

- ``model_step``: forward + backward + AdamW in this process with 2 torch threads, no Ray, no
  DeepSpeed (:func:`bench.gpt_model.measure`, the same code ``bench/gpt_model.py`` runs);
- ``stage``: the real train_transformer stage (Ray Train, DeepSpeed ZeRO at the stage's default
  stage, 2 workers × 1 CPU, micro batch 8 per worker) on real code shards: shard
  ``builtin:digits`` at 32 px → a small f2 VQGAN (few steps: its quality does not matter) with a
  512-entry codebook → tokenize (16×16 = 256 codes per image) → train_transformer.
  Its figure is the ``tokens_per_s`` the stage writes to ``history.jsonl`` every ``--log-every``
  steps (all workers' tokens per wall second), the first record left out as warm-up; reported
  as the median of the others, all records listed. Images and checkpoints are only made at the
  last step, after the last record, so they are not in the figure.

Both figures count code tokens (256 per sequence). The stage's step processes 2 × 8 sequences
(one micro batch per worker), the model step 8. ``OMP_WAIT_POLICY`` is ``PASSIVE`` unless set
(see ``bench/gpt_model.py``); the Ray workers inherit it.

Usage: python bench/gpt.py [--steps 40] [--log-every 10] [--model-steps 10] [--keep]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Run as a script, bench/ heads sys.path; import from the repository root instead (bench.* as a
# namespace package). Importing bench.gpt_model first sets OMP_WAIT_POLICY before torch loads.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from bench.gpt_model import measure  # noqa: E402, I001

import argparse  # noqa: E402
import json  # noqa: E402
from typing import Any  # noqa: E402

from bench.stage_run import history_rate, run_stages, temp_root  # noqa: E402
from pipeline.storage import join  # noqa: E402
from stages.shard import STAGE as SHARD  # noqa: E402
from stages.tokenize import STAGE as TOKENIZE  # noqa: E402
from stages.train_transformer import STAGE as TRAIN_TRANSFORMER  # noqa: E402
from stages.train_vqgan import STAGE as TRAIN_VQGAN  # noqa: E402

# Upstream of the measured stage: just enough to give it real 16×16 code shards over a
# 512-code vocabulary (f2 VQGAN at 32 px), quickly.
UPSTREAM = [
    "shard.source=builtin:digits", "shard.resolution=32", "shard.ext=png",
    "shard.samples_per_shard=256", "shard.val_fraction=0.05", "shard.progress=false",
    "train_vqgan.model.resolution=32", "train_vqgan.model.ch=32",
    "train_vqgan.model.ch_mult=[1,2]", "train_vqgan.model.num_res_blocks=1",
    "train_vqgan.model.attn_resolutions=[]", "train_vqgan.model.z_channels=32",
    "train_vqgan.model.embed_dim=16", "train_vqgan.model.n_embed=512",
    "train_vqgan.disc.ndf=16", "train_vqgan.disc.n_layers=2",
    "train_vqgan.perceptual.backbone=random", "train_vqgan.loss.disc_start=1000",
    "train_vqgan.micro_batch=8", "train_vqgan.num_workers=1", "train_vqgan.steps=5",
    "train_vqgan.checkpoint_every=5", "train_vqgan.log_every=5", "train_vqgan.image_every=5",
    "train_vqgan.eval_images=16",
    "tokenize.store_flipped=false", "tokenize.progress=false",
]

# The measured configuration (issue #6). zero_stage is left at the stage's default.
MEASURED = [
    "train_transformer.n_layer=4", "train_transformer.n_head=4", "train_transformer.n_embd=256",
    "train_transformer.pkeep=0.9", "train_transformer.cond_drop=0.1",
    "train_transformer.micro_batch=8", "train_transformer.grad_accum=1",
    "train_transformer.num_workers=2", "train_transformer.cpus_per_worker=1",
    "train_transformer.precision=fp32", "train_transformer.eval_samples=64",
    "train_transformer.samples_per_class=1",
]


def overrides(root: str, steps: int, log_every: int) -> list[str]:
    """The full override list of the benchmark run under ``root``."""
    return ["run=bench-gpt", f"storage.root={root}", "tracking.mode=disabled",
            *UPSTREAM, *MEASURED, f"train_transformer.steps={steps}",
            f"train_transformer.log_every={log_every}",
            # Only at the last step (after the last history record): not in the timed interval.
            f"train_transformer.checkpoint_every={steps}",
            f"train_transformer.image_every={steps}"]


def run_stage(root: str, steps: int, log_every: int) -> dict[str, Any]:
    """Run shard → train_vqgan → tokenize → train_transformer under ``root``; returns the
    stage's figure, its records and its setup."""
    manifests, cfg, seconds = run_stages([SHARD, TRAIN_VQGAN, TOKENIZE, TRAIN_TRANSFORMER],
                                         overrides(root, steps, log_every))
    median, rates = history_rate(manifests["train_transformer"], "tokens_per_s")
    tok = manifests["tokenize"]["outputs"]
    t = cfg.train_transformer
    return {
        "train_tok_s": round(median, 1),
        "records_tok_s": [round(r, 1) for r in rates],
        "steps": steps, "log_every": log_every, "workers": t.num_workers,
        "cpus_per_worker": t.cpus_per_worker, "micro_batch": t.micro_batch,
        "zero_stage": t.zero_stage, "precision": t.precision,
        "grid": tok["grid"], "n_embed": tok["n_embed"], "classes": tok["num_classes"],
        "pipeline_seconds": round(seconds, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40, help="train_transformer steps")
    ap.add_argument("--log-every", type=int, default=10, help="steps per tokens/s record")
    ap.add_argument("--model-steps", type=int, default=10, help="timed model steps")
    ap.add_argument("--keep", action="store_true", help="keep the temporary storage root")
    args = ap.parse_args()

    model = measure(threads=2, batch=8, steps=args.model_steps, warmup=3)
    with temp_root("bench-gpt-", args.keep) as root:
        stage = run_stage(join(root, "runs"), args.steps, args.log_every)
    print(json.dumps({
        "model_step": model,
        "stage": stage,
        "model_step_train_tok_s": model["train_tok_s"],
        "stage_train_tok_s": stage["train_tok_s"],
        "stage_over_model_step": round(stage["train_tok_s"] / model["train_tok_s"], 3),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "root": root if args.keep else None,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
