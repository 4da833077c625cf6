"""The loop's placement contract, the progress line, the GPU-stage bench at tiny sizes, and one
bf16-autocast VQGAN step (the GPU path) on CPU."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch

from pipeline import progress
from pipeline.storage import Storage
from pipeline.train import launch, loop
from pipeline.train.context import to_device
from tests.conftest import REPO
from tests.test_train_vqgan import TINY
from tests.train.test_launch import _spec


def test_every_batch_goes_through_to_device(tmp_path, monkeypatch):
    """The loop moves each micro-batch to the context's device in one place (to_device)."""
    calls = []

    def spy(batch, device):
        calls.append(device)
        return to_device(batch, device)

    monkeypatch.setattr(loop, "to_device", spy)
    out = tmp_path / "w.pt"
    launch.fit_local(_spec(str(tmp_path / "stage"), Storage(), out, 3, 1))
    assert calls == [torch.device("cpu")] * 6, "3 steps x 2 micro-batches"
    assert torch.load(out)["devices"] == ["cpu"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_local_loop_on_gpu(tmp_path):
    out = tmp_path / "w.pt"
    launch.fit_local(_spec(str(tmp_path / "stage"), Storage(), out, 2, 1, use_gpu=True))
    assert torch.load(out)["devices"] == ["cuda:0"]


def test_to_device_keeps_cpu_tensors_on_cpu():
    x = torch.arange(4)
    (y,) = to_device((x,), torch.device("cpu"))
    assert y.device.type == "cpu" and torch.equal(x, y)


def test_progress_line_quarters_and_tty():
    out = io.StringIO()
    line = progress.ProgressLine("train_vqgan", out, quarters=True)
    for step in range(1, 101):
        line.update(progress.record(step, 100, 20.0, "images", {"loss": 0.5}, step, 2.0))
    line.close()
    rows = out.getvalue().splitlines()
    assert len(rows) == 4 and rows[0].startswith("[train_vqgan] step 25/100 (25%) loss 0.5")
    assert "ETA 0:38" in rows[0] and "20 images/s" in rows[0] and "this run" in rows[-1]
    tty = io.StringIO()
    live = progress.ProgressLine("x", tty, quarters=False)
    live.update(progress.record(1, 10, 1.0, "tokens", {}, 1.0, 1.0))
    live.close()
    assert tty.getvalue().count("\n") == 1 and tty.getvalue().startswith("\r")


def test_vqgan_task_builds_on_context_device_and_steps_in_bf16_autocast(tmp_path):
    """VQGANTask on a one-process context: models, LPIPS and the grid batch on ctx.device; one
    bf16-autocast step (fp32 weights, fp32 codebook lookup) gives finite losses."""
    from pipeline.config import load_config
    from pipeline.dag import Pipeline
    from stages.shard import STAGE as SHARD
    from stages.train_vqgan import STAGE as TRAIN_VQGAN
    from stages.train_vqgan import VQGANTask

    pipe = Pipeline([SHARD, TRAIN_VQGAN])
    cfg = load_config(None, ["run=t", f"storage.root={tmp_path}", "tracking.mode=disabled",
                             "shard.progress=false", *TINY, "train_vqgan.precision=bf16",
                             "train_vqgan.num_workers=1", "train_vqgan.micro_batch=2",
                             "train_vqgan.loss.disc_start=0"], pipe.schema)
    shard = pipe.run(cfg, only=["shard"], local=True)["shard"]["outputs"]
    train = [s["uri"] for s in shard["shards"] if s["split"] == "train"]
    val = [s["uri"] for s in shard["shards"] if s["split"] == "val"]
    spec = loop.LoopSpec(VQGANTask, cfg.train_vqgan, Storage(), str(tmp_path / "vq"), 0,
                         {"train": train, "val": val})
    from pipeline.train.context import from_env

    ctx = from_env(False)
    task = VQGANTask(ctx, spec)
    devices = {p.device for e in task.engines.values() for p in e.module.parameters()}
    devices |= {p.device for p in task.lpips.parameters()} | {task.vis.device}
    assert devices == {ctx.device}
    assert all(p.dtype == torch.float32 for p in task.g.module.parameters())
    batch, _ = next(task.batches(None))
    logs = task.step(to_device(batch, ctx.device), step=1, micro=0)
    assert {"loss/total", "loss/d", "codebook/usage"} <= set(logs)
    assert all(torch.isfinite(v) for v in logs.values())


def test_gpu_stages_bench_tiny_on_cpu(tmp_path):
    """bench/gpu_stages.py --tiny: the real stages without Ray, resumed once each; sane JSON."""
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_stages.py"), "--tiny",
                           "--root", str(tmp_path), "--steps", "3", "--more", "2"],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["pass"] and out["device"] == "cpu" and out["tiny"]
    for stage, unit in (("train_vqgan", "images_per_s"), ("train_transformer", "tokens_per_s")):
        fig = out[stage]
        assert fig["steps_done"] == 5 and fig["resumed_step_ok"] and fig["resumed_position_ok"]
        assert fig[unit] > 0 and fig["flops_per_step"] > 0 and fig["params"] > 0
        assert fig["mfu"] is None and fig["peak_memory_gib"] is None  # no GPU, no peak
    assert out["train_transformer"]["loss_end"] < out["train_transformer"]["loss_start"]
    assert "[train_vqgan] step 5/5 (100%)" in proc.stderr
