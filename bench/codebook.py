"""Codebook health of quantizer recipes on the demo (issue #15 part 1): which recipe is default.

Runs the real shard and train_vqgan stages of ``configs/tiny.yaml`` (1,797 digits at 16 px, an
f2 VQGAN with 128 codes of dimension 16, 200 steps, global batch 16, the GAN on from step 100)
in this process, without Ray (``--no-ray``: one DeepSpeed process with 2 micro-batches of 8 per
step), once per recipe, all in one temporary storage root (the shard stage is shared). Prints
one JSON object: per recipe its overrides and the val figures train_vqgan's eval writes
(codebook usage, dead codes, perplexity, PSNR, SSIM, LPIPS) plus the last training window's
usage, and ``default``: the recipe the shipped configs get.

    .venv/bin/python bench/codebook.py [--recipes default,reference,...] [--steps 200] [--keep]

About 3-5 minutes per recipe on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.stage_run import temp_root  # noqa: E402

# Model keys of each recipe (train_vqgan.model.*). "default" is VQGANConfig's own defaults.
RECIPES: dict[str, dict[str, object]] = {
    "reference": {"l2_normalize": False, "codebook_dim": None, "restart_dead_codes": 0},
    "l2_dim8": {"l2_normalize": True, "codebook_dim": 8, "restart_dead_codes": 0},
    "restarts": {"l2_normalize": False, "codebook_dim": None, "restart_dead_codes": 40},
    "restarts_80": {"l2_normalize": False, "codebook_dim": None, "restart_dead_codes": 80},
    "ema_restarts": {"l2_normalize": False, "codebook_dim": None, "use_ema": True,
                     "restart_dead_codes": 80},
    "l2_dim8_restarts_80": {"l2_normalize": True, "codebook_dim": 8, "restart_dead_codes": 80},
    "default": {},
}


def overrides(recipe: dict[str, object]) -> list[str]:
    def value(v: object) -> str:
        return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)

    return [f"train_vqgan.model.{k}={value(v)}" for k, v in recipe.items()]


def run_recipe(root: str, name: str, steps: int) -> dict[str, object]:
    from pipeline.cli import default_pipeline
    from pipeline.config import load_config
    from pipeline.storage import Storage

    pipe = default_pipeline()
    extra = [f"storage.root={root}", "tracking.mode=disabled", f"train_vqgan.steps={steps}",
             "train_vqgan.grad_accum=2", *overrides(RECIPES[name])]
    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs/tiny.yaml"), extra,
                      pipe.schema)
    t0 = time.perf_counter()
    manifests = pipe.run(cfg, Storage.from_config(cfg.storage), until="train_vqgan", local=True)
    out = manifests["train_vqgan"]["outputs"]
    ev = out["eval"]
    keys = ("codebook_usage", "dead_codes", "perplexity", "psnr", "ssim", "lpips")
    return {"overrides": overrides(RECIPES[name]), **{k: ev.get(k) for k in keys},
            "train_window": out.get("train_codebook", {}),
            "seconds": round(time.perf_counter() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--keep", action="store_true", help="keep the temporary storage root")
    args = ap.parse_args()
    from stages.train_vqgan import TrainVQGANConfig

    model = TrainVQGANConfig().model
    default = {k: getattr(model, k) for k in ("l2_normalize", "codebook_dim", "use_ema",
                                              "restart_dead_codes")}
    results = {}
    with temp_root("codebook-bench-", args.keep) as root:
        for name in args.recipes.split(","):
            results[name] = run_recipe(root, name, args.steps)
            print(f"{name}: {results[name]}", file=sys.stderr)
    print(json.dumps({"benchmark": "codebook", "steps": args.steps, "default": default,
                      "recipes": results}))


if __name__ == "__main__":
    main()
