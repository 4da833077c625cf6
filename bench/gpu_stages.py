"""GPU check of the real training stages, without Ray. Prints one JSON object.

What runs is the pipeline itself, in this process (``Pipeline.run(..., local=True)``, the same
code as ``python -m pipeline run CONFIG --no-ray``): the shard stage writes image shards of
``builtin:photos`` (256 px), train_vqgan trains the paper's f16 VQGAN (ch 128, ch_mult
[1,1,2,2,4], 2 res blocks, attention at 16, 1,024 codes; DeepSpeed ZeRO-2, bf16 autocast) on the
one training loop, tokenize encodes the shards, and train_transformer trains a GPT of ~300 M
parameters (24 layers, 16 heads, 1,024 wide) over the 16x16 codes and a class token (DeepSpeed
ZeRO-2, bf16, SDPA). Each training stage runs ``--steps`` steps, then ``--more`` steps more:
the second run must resume from the first run's checkpoint.

JSON (the same keys with ``--tiny``, which runs tiny sizes on CPU for CI; null where a figure
does not exist there, e.g. MFU without a known peak):

- ``device``, ``peak_bf16_tflops`` (dense bf16 peak of the card, from a table by name);
- per stage (``train_vqgan``, ``train_transformer``): ``params``, ``micro_batch``,
  ``images_per_s`` / ``tokens_per_s`` (median over the logged intervals of both runs, first
  interval of each run dropped), ``flops_per_step`` (counted by torch's FlopCounterMode on one
  micro-batch of the real modules, forward + backward, times the batch), ``mfu``,
  ``peak_memory_gib`` (torch.cuda.max_memory_allocated over the stage), ``loss_start`` /
  ``loss_end`` (first and last logged value), ``resumed_step_ok`` / ``resumed_position_ok``
  (what the second run restored equals the saved checkpoint's step and data position),
  ``seconds``;
- ``flash_attention``: the GPT's attention ran with only the flash SDPA kernel allowed (CUDA);
- ``checks``: each boolean; ``pass``: all of them. Exit 1 when one fails.

Usage: python bench/gpu_stages.py [--tiny] [--root DIR] [--steps N] [--more M]
Needs torch, deepspeed, webdataset, omegaconf (no Ray, W&B or s3fs).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

RESULT = sys.stdout  # where the JSON goes (stdout; see __main__)

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), by a substring of the device name.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "H800": 989.0, "GH200": 989.0, "B200": 2250.0,
                    "A100": 312.0, "A800": 312.0, "L40S": 362.0, "L40": 181.0, "L4": 121.0,
                    "A10G": 70.0, "A10": 125.0, "RTX 4090": 165.0, "RTX 3090": 71.0}


def peak_tflops(name: str) -> float | None:
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):  # "L40S" before "L40"
        if key in name:
            return PEAK_BF16_TFLOPS[key]
    return None


def overrides(tiny: bool, cuda: bool, root: str, steps: int) -> list[str]:
    """The run's config as dotted overrides (paper sizes, or tiny ones for CPU)."""
    common = [f"storage.root={root}", "run=gpu-stages", "tracking.mode=disabled",
              "shard.source=builtin:photos:" + ("64" if tiny else "512"), "shard.ext=jpg",
              "shard.resolution=" + ("32" if tiny else "256"),
              "shard.samples_per_shard=" + ("32" if tiny else "128"), "shard.val_fraction=0.1",
              "shard.progress=false", "tokenize.progress=false", "tokenize.store_flipped=false",
              f"tokenize.use_gpu={str(cuda).lower()}"]
    train = {"steps": steps, "num_workers": 1, "use_gpu": str(cuda).lower(), "zero_stage": 2,
             "precision": "bf16", "checkpoint_every": steps, "keep_checkpoints": 2,
             "log_every": 1 if tiny else 5, "image_every": 10 ** 6}
    # Tiny runs keep the VQGAN in fp32: bf16 autocast convolutions on a CPU without AVX-512
    # BF16 are ~50x slower (tests/test_train_vqgan.py covers the autocast step on CPU).
    vq = {**train, "precision": "fp32" if tiny else "bf16", "micro_batch": 4 if tiny else 8,
          "eval_images": 16 if tiny else 64, "grid_images": 4, "perceptual.backbone": "random",
          "loss.disc_start": 1, "lr": 1e-4}
    vq_model = ({"resolution": 32, "ch": 32, "ch_mult": "[1,2]", "num_res_blocks": 1,
                 "attn_resolutions": "[16]", "z_channels": 16, "embed_dim": 16, "n_embed": 64}
                if tiny else
                {"resolution": 256, "ch": 128, "ch_mult": "[1,1,2,2,4]", "num_res_blocks": 2,
                 "attn_resolutions": "[16]", "z_channels": 256, "embed_dim": 256,
                 "n_embed": 1024})
    gpt = {**train, "micro_batch": 8 if tiny else 32, "lr": 3e-4, "warmup_steps": 0,
           "eval_samples": 32 if tiny else 256, "samples_per_class": 1,
           "n_layer": 2 if tiny else 24, "n_head": 2 if tiny else 16,
           "n_embd": 64 if tiny else 1024}
    out = common
    out += [f"train_vqgan.{k}={v}" for k, v in vq.items()]
    out += [f"train_vqgan.model.{k}={v}" for k, v in vq_model.items()]
    out += [f"train_transformer.{k}={v}" for k, v in gpt.items()]
    return out


def count_flops(fn: Any) -> int:
    """Floating-point operations of ``fn()`` (torch's FlopCounterMode: matmuls, convolutions,
    attention; elementwise work is not counted, as in the usual MFU convention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def vqgan_flops_per_image(cfg: Any, device: torch.device) -> int:
    """One image through a training step: G forward + backward (with LPIPS and D on the
    reconstruction), then D forward + backward on a real and a fake image."""
    from pipeline.models.discriminator import NLayerDiscriminator
    from pipeline.models.lpips import LPIPS
    from pipeline.models.vqgan import VQGAN

    g, d = VQGAN(cfg.model).to(device), NLayerDiscriminator(cfg.disc).to(device)
    lpips = LPIPS("random").to(device)
    x = torch.randn(1, 3, cfg.model.resolution, cfg.model.resolution, device=device)

    def step() -> None:
        recon, quant = g(x)
        loss = (x - recon).abs().mean() + lpips(x, recon).mean() - d(recon).mean() + quant.loss
        loss.backward()
        (d(x).mean() - d(recon.detach()).mean()).backward()

    return count_flops(step)


def gpt_flops_per_sample(model_cfg: Any, device: torch.device) -> int:
    from pipeline.models.gpt import GPT

    model = GPT(model_cfg).to(device)
    codes = torch.randint(0, model_cfg.vocab_size, (1, model_cfg.block_size), device=device)
    labels = torch.zeros(1, dtype=torch.long, device=device) if model_cfg.n_classes else None
    return count_flops(lambda: model.loss(codes, labels).backward())


def flash_only(model_cfg: Any, device: torch.device) -> bool | None:
    """Whether the GPT's forward runs with only the flash SDPA kernel allowed (None on CPU)."""
    if device.type != "cuda":
        return None
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pipeline.models.gpt import GPT

    model = GPT(model_cfg).to(device, torch.bfloat16)
    codes = torch.randint(0, model_cfg.vocab_size, (2, model_cfg.block_size), device=device)
    labels = torch.zeros(2, dtype=torch.long, device=device) if model_cfg.n_classes else None
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            model.loss(codes, labels).backward()
        return True
    except RuntimeError:
        return False


def history(storage: Any, uri: str) -> list[dict[str, Any]]:
    from pipeline.train.history import read_history

    return read_history(storage, f"{uri}/history.jsonl")


def rate(rows: list[dict[str, Any]], key: str, first_new: int) -> float | None:
    """Median logged rate, without the first interval of each run (start-up, compilation)."""
    values = [r[key] for i, r in enumerate(rows) if key in r and i not in (0, first_new)]
    return statistics.median(values) if values else None


def run_stage(pipe: Any, cfg_for: Any, name: str, steps: int, more: int, device: torch.device,
              storage: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Two runs of one training stage (``steps``, then ``steps + more``); (figures, manifest)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    first = pipe.run(cfg_for(steps), storage, only=[name], local=True)[name]
    saved = json.loads(storage.read_text(f"{first['uri']}/train/checkpoint-{steps:08d}/"
                                         "state.json"))
    n_first = len(history(storage, first["uri"]))
    second = pipe.run(cfg_for(steps + more), storage, only=[name], local=True)[name]
    seconds = time.perf_counter() - t0
    progress = json.loads(storage.read_text(f"{second['uri']}/progress.json"))
    resumed = progress.get("resumed_from") or {}
    rows = history(storage, second["uri"])
    loss_key = "loss/rec" if name == "train_vqgan" else "loss/train"
    unit = "images_per_s" if name == "train_vqgan" else "tokens_per_s"
    figures = {
        unit: rate(rows, unit, n_first),
        "loss_start": rows[0].get(loss_key) if rows else None,
        "loss_end": rows[-1].get(loss_key) if rows else None,
        "resumed_step_ok": resumed.get("step") == saved["step"] == steps,
        "resumed_position_ok": resumed.get("data") == saved["data"] and bool(saved["data"]),
        "steps_done": second["outputs"]["steps"],
        "peak_memory_gib": (torch.cuda.max_memory_allocated(device) / 2 ** 30
                            if device.type == "cuda" else None),
        "seconds": round(seconds, 1),
    }
    return figures, second


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (CPU is fine): for CI")
    ap.add_argument("--root", default=None, help="storage root (default: a temporary folder)")
    ap.add_argument("--steps", type=int, default=None, help="steps of each first run")
    ap.add_argument("--more", type=int, default=None, help="steps of each resumed run")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    steps = args.steps or (4 if args.tiny else 40)
    more = args.more or (3 if args.tiny else 20)

    from pipeline.cli import default_pipeline
    from pipeline.config import load_config
    from pipeline.storage import Storage
    from stages.train_transformer import gpt_config

    pipe = default_pipeline()
    root = args.root or tempfile.mkdtemp(prefix="gpu-stages-")
    storage = Storage()

    def cfg_for(n: int) -> Any:
        return load_config(None, overrides(args.tiny, cuda, root, n), pipe.schema)

    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    peak = peak_tflops(name) if cuda else None
    t0 = time.perf_counter()
    pipe.run(cfg_for(steps), storage, until="shard", local=True)
    shard_s = time.perf_counter() - t0
    cfg = cfg_for(steps)
    out: dict[str, Any] = {"device": name, "peak_bf16_tflops": peak, "tiny": args.tiny,
                           "root": root, "shard_seconds": round(shard_s, 1)}

    vq, vq_manifest = run_stage(pipe, cfg_for, "train_vqgan", steps, more, device, storage)
    vq_cfg = cfg.train_vqgan
    from pipeline.models.vqgan import VQGAN

    vq["params"] = sum(p.numel() for p in VQGAN(vq_cfg.model).parameters())
    vq["micro_batch"] = vq_cfg.micro_batch
    vq["flops_per_step"] = vqgan_flops_per_image(vq_cfg, device) * vq_cfg.global_batch
    vq["eval"] = vq_manifest["outputs"]["eval"]

    t0 = time.perf_counter()
    pipe.run(cfg_for(steps + more), storage, only=["tokenize"], local=True)
    tokenize_s = time.perf_counter() - t0
    gpt, gpt_manifest = run_stage(pipe, cfg_for, "train_transformer", steps, more, device,
                                  storage)
    g_cfg = cfg.train_transformer
    tok = pipe.run(cfg_for(steps + more), storage, only=["tokenize"], local=True)["tokenize"]
    length = tok["outputs"]["grid"][0] * tok["outputs"]["grid"][1]
    model_cfg = gpt_config(g_cfg, {"n_embed": tok["outputs"]["n_embed"], "length": length,
                                   "n_classes": gpt_manifest["outputs"]["n_classes"]})
    from pipeline.models.gpt import GPT

    gpt["params"] = sum(p.numel() for p in GPT(model_cfg).parameters())
    gpt["micro_batch"] = g_cfg.micro_batch
    gpt["sequence"] = length + 1
    gpt["flops_per_step"] = gpt_flops_per_sample(model_cfg, device) * g_cfg.global_batch
    gpt["val_loss"] = gpt_manifest["outputs"]["val_loss"]
    out["tokenize_seconds"] = round(tokenize_s, 1)
    out["flash_attention"] = flash_only(model_cfg, device)

    for fig, unit, per in ((vq, "images_per_s", 1), (gpt, "tokens_per_s", length)):
        step_rate = fig[unit] / (per * (vq_cfg if fig is vq else g_cfg).global_batch) \
            if fig[unit] else None
        fig["mfu"] = (fig["flops_per_step"] * step_rate / (peak * 1e12)
                      if peak and step_rate else None)
    out["train_vqgan"], out["train_transformer"] = vq, gpt

    checks = {
        "vqgan_resumed": vq["resumed_step_ok"] and vq["resumed_position_ok"],
        "gpt_resumed": gpt["resumed_step_ok"] and gpt["resumed_position_ok"],
        "vqgan_steps_done": vq["steps_done"] == steps + more,
        "gpt_steps_done": gpt["steps_done"] == steps + more,
        "vqgan_loss_finite": all(isinstance(v, float) and v == v
                                 for v in (vq["loss_start"], vq["loss_end"])),
        "gpt_loss_falls": gpt["loss_end"] is not None and gpt["loss_end"] < gpt["loss_start"],
        "rates_positive": bool(vq["images_per_s"]) and bool(gpt["tokens_per_s"]),
        "gpt_params_300m": gpt["params"] >= 300e6 if not args.tiny else True,
    }
    if cuda:
        checks["flash_attention"] = out["flash_attention"] is True
    out["checks"] = checks
    out["pass"] = all(checks.values())
    print(json.dumps(out, indent=1, sort_keys=True, default=str), file=RESULT)
    return 0 if out["pass"] else 1


if __name__ == "__main__":
    import contextlib

    # Stdout carries only the JSON object: what the libraries print goes to stderr.
    RESULT = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):
        code = main()
    raise SystemExit(code)
