"""Training helpers under a real Ray Train + DeepSpeed ZeRO-2 run with 2 CPU workers."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.storage import Storage
from pipeline.train import launch
from pipeline.train.config import TrainConfig
from pipeline.train.engine import deepspeed_config
from pipeline.train.schedule import lr_at, scaled_lr
from tests.train.loops import W_TRUE, batch, linear_loop


def _fit(uri: str, storage: Storage, tmp_path, steps: int, name: str, **extra):
    tc = TrainConfig(steps=steps, micro_batch=4, grad_accum=2, lr=0.05, zero_stage=2,
                     num_workers=2, checkpoint_every=2, keep_checkpoints=2, max_failures=1)
    weights = tmp_path / f"{name}-{steps}.pt"
    result = launch.fit(linear_loop, {"train": dataclasses.asdict(tc),
                                      "weights_out": str(weights), **extra},
                        uri=uri, storage=storage, tc=tc, name=name)
    return result, torch.load(weights)


def test_schedule_and_config():
    assert lr_at(0, 1.0, warmup=4, total=10) == 0.25
    assert lr_at(3, 1.0, warmup=4, total=10) == 1.0
    assert lr_at(10, 1.0, warmup=4, total=10, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_at(50, 1.0, warmup=4, total=10, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_at(7, 2.0, warmup=0, total=10, schedule="constant") == 2.0
    assert scaled_lr(4.5e-6, 96) == pytest.approx(4.32e-4)
    cfg = deepspeed_config(TrainConfig(micro_batch=3, grad_accum=2, zero_stage=2), 4)
    assert cfg["train_batch_size"] == 24 and cfg["zero_optimization"]["stage"] == 2
    with pytest.raises(ValueError, match="disagrees"):
        deepspeed_config(TrainConfig(micro_batch=3), 1, {"train_micro_batch_size_per_gpu": 5})


def reference_weights(steps: int, world: int = 2, grad_accum: int = 2, micro: int = 4,
                      lr: float = 0.05) -> dict[str, torch.Tensor]:
    """Plain single-process data parallelism: what ZeRO-2 over ``world`` ranks must compute."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    for step in range(steps):
        opt.zero_grad()
        for rank in range(world):
            for m in range(grad_accum):
                x, y = batch(step, rank, m, micro)
                loss = torch.nn.functional.mse_loss(model(x), y) / (grad_accum * world)
                loss.backward()
        opt.step()
    return model.state_dict()


def test_resume_raise_steps_and_crash_recovery(ray_session, tmp_path):
    storage = Storage()
    uri = str(tmp_path / "stage")
    first, w4 = _fit(uri, storage, tmp_path, 4, "train")
    assert first.metrics["step"] == 4 and first.metrics["start_step"] == 0
    for k, v in reference_weights(4).items():
        torch.testing.assert_close(w4[k], v, rtol=1e-5, atol=1e-6)

    # Raise steps to 8 on the finished run: it continues from the step-4 checkpoint. A worker
    # then dies hard at step 7; Ray restarts the group from the newest registered checkpoint
    # (step 6, or step 4 when the crash beat step 6's registration: NOTES.md).
    marker = tmp_path / "crashed"
    second, w8 = _fit(uri, storage, tmp_path, 8, "train",
                      crash={"step": 7, "marker": str(marker)})
    assert marker.exists(), "the crash hook must have fired"
    assert second.metrics["step"] == 8 and second.metrics["start_step"] in (4, 6)
    for k, v in reference_weights(8).items():
        torch.testing.assert_close(w8[k], v, rtol=1e-5, atol=1e-6)
    kept = sorted(p.name for p in (tmp_path / "stage" / "train").glob("checkpoint-*"))
    assert kept == ["checkpoint-00000006", "checkpoint-00000008"], "keep_checkpoints=2"
    start_err = (reference_weights(0)["weight"] - W_TRUE).norm()
    assert (w8["weight"] - W_TRUE).norm() < 0.9 * start_err, "training moved toward the truth"
