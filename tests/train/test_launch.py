"""The one training loop under real launchers: Ray Train (2 CPU workers, ZeRO-2) and a plain
process without Ray, with checkpoints, resume, raised steps and crash recovery."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.faults import Fault
from pipeline.storage import Storage
from pipeline.train import launch
from pipeline.train.config import TrainConfig
from pipeline.train.engine import deepspeed_config
from pipeline.train.loop import LoopSpec
from pipeline.train.schedule import lr_at
from tests.train.loops import W_TRUE, LinearTask, batch


def _spec(uri: str, storage: Storage, out, steps: int, workers: int, **extra) -> LoopSpec:
    tc = TrainConfig(steps=steps, micro_batch=4, grad_accum=2, lr=0.05, zero_stage=2,
                     num_workers=workers, checkpoint_every=2, keep_checkpoints=2, max_failures=1,
                     log_every=1, **extra)
    return LoopSpec(task=LinearTask, cfg=tc, storage=storage, uri=uri, seed=0,
                    args={"weights_out": str(out)}, stage="linear")


def test_schedule_and_config():
    assert lr_at(0, 1.0, warmup=4, total=10) == 0.25
    assert lr_at(3, 1.0, warmup=4, total=10) == 1.0
    assert lr_at(10, 1.0, warmup=4, total=10, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_at(50, 1.0, warmup=4, total=10, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_at(7, 2.0, warmup=0, total=10, schedule="constant") == 2.0
    cfg = deepspeed_config(TrainConfig(micro_batch=3, grad_accum=2, zero_stage=2), 4)
    assert cfg["train_batch_size"] == 24 and cfg["zero_optimization"]["stage"] == 2
    with pytest.raises(ValueError, match="disagrees"):
        deepspeed_config(TrainConfig(micro_batch=3), 1, {"train_micro_batch_size_per_gpu": 5})


def test_lr_scale_by_batch_makes_lr_per_sample():
    from pipeline.config import ConfigError
    from stages.train_vqgan import TrainVQGANConfig

    absolute = TrainConfig(lr=3e-4, micro_batch=4, grad_accum=3, num_workers=8)
    assert absolute.base_lr == 3e-4
    per_sample = TrainConfig(lr=4.5e-6, lr_scale_by_batch=True, micro_batch=4, grad_accum=3,
                             num_workers=8)
    assert per_sample.base_lr == pytest.approx(4.5e-6 * 96)
    assert "per sample x global batch 96" in per_sample.lr_rule()
    # The footgun: an absolute rate left in place when switching the rule on. Refused, named.
    with pytest.raises(ConfigError, match="lr: with lr_scale_by_batch: true, lr is the rate per "
                       "sample.*0.002 x 16 samples would train at 0.032"):
        TrainConfig(lr=2e-3, lr_scale_by_batch=True, micro_batch=8, num_workers=2).validate()
    # The VQGAN's default is the reference's rule at any batch, whichever way the switch is set.
    for scale in (False, True):
        cfg = TrainVQGANConfig(micro_batch=3, num_workers=8, lr_scale_by_batch=scale)
        cfg.validate()
        assert cfg.base_lr == pytest.approx(4.5e-6 * 24)
        assert "reference's 4.5e-06 per sample x global batch 24" in cfg.lr_rule()
    assert TrainVQGANConfig(lr=1e-4, micro_batch=3, num_workers=8).base_lr == 1e-4


def test_training_waits_for_capacity_only_after_a_lost_node(monkeypatch):
    from pipeline.ray_tasks import ResourceError

    tc = TrainConfig(num_workers=2, cpus_per_worker=1.0)
    sizes = iter([{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 3.0}])
    monkeypatch.setattr(launch, "cluster_resources", lambda: next(sizes))
    monkeypatch.setattr(launch.time, "sleep", lambda s: None)
    monkeypatch.setattr(launch, "lost_nodes", lambda: 0)
    with pytest.raises(ResourceError, match="needs 2 CPUs but the Ray cluster has 1"):
        launch.check_resources(tc)  # nothing was lost: the cluster will not grow, fail fast
    monkeypatch.setattr(launch, "lost_nodes", lambda: 1)
    assert launch.wait_for_capacity(tc, timeout_s=60) == {"CPU": 3.0}  # the node came back
    monkeypatch.setattr(launch, "cluster_resources", lambda: {"CPU": 1.0})
    monkeypatch.setattr(launch, "LOST_NODE_WAIT_S", 0.2)
    with pytest.raises(ResourceError, match="needs 2 CPUs"):
        launch.check_resources(tc)  # never back: fails after the wait


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


def _check(out: dict, steps: int, world: int) -> None:
    for k, v in reference_weights(steps, world).items():
        torch.testing.assert_close(out["weights"][k], v, rtol=1e-5, atol=1e-6)
    assert out["step"] == steps and out["position"] == {"index": 2 * steps}


def test_ray_resume_raise_steps_and_crash_recovery(ray_session, tmp_path):
    storage = Storage()
    uri = str(tmp_path / "stage")
    out = tmp_path / "w.pt"
    first = launch.fit(_spec(uri, storage, out, 4, 2))
    w4 = torch.load(out)
    assert first.endswith("checkpoint-00000004") and w4["start_index"] == 0
    _check(w4, 4, 2)
    assert w4["devices"] == ["cpu"]

    # Raise steps to 8 on the finished run: it continues from the step-4 checkpoint. A worker
    # then dies hard at step 7; Ray restarts the group, which resumes from the newest complete
    # checkpoint in the folder: step 6, even when the crash beat its registration with Ray.
    marker = tmp_path / "crashed"
    spec = _spec(uri, storage, out, 8, 2)
    spec.fault = Fault("linear", 7, str(marker))
    launch.fit(spec)
    w8 = torch.load(out)
    assert marker.exists(), "the crash hook must have fired"
    assert w8["start_index"] == 12, "resumed at step 6 (2 micro-batches per step)"
    _check(w8, 8, 2)
    kept = sorted(p.name for p in (tmp_path / "stage" / "train").glob("checkpoint-*"))
    # keep_checkpoints=2: the newest two, and at most Ray's own older one (step 4, when step 6
    # was never registered with Ray: Ray keeps its two newest registered, 4 and 8).
    assert kept[-2:] == ["checkpoint-00000006", "checkpoint-00000008"], kept
    assert kept[:-2] in ([], ["checkpoint-00000004"]), kept
    start_err = (reference_weights(0)["weight"] - W_TRUE).norm()
    assert (w8["weights"]["weight"] - W_TRUE).norm() < 0.9 * start_err, "moved toward the truth"
    progress = json.loads((tmp_path / "stage" / "progress.json").read_text())
    assert progress["step"] == 8 and progress["total"] == 8 and "loss" in progress["scalars"]


@pytest.mark.parametrize("root", ["local", "s3"])
def test_local_loop_without_ray(root, tmp_path, request):
    """fit_local: one process, no Ray; checkpoints in the stage folder (also on S3) resume an
    interrupted run to exactly the uninterrupted weights."""
    if root == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        uri = f"{request.getfixturevalue('s3_bucket')}/stage"
        storage = Storage(endpoint_url=endpoint)
    else:
        uri, storage = str(tmp_path / "stage"), Storage()
    out = tmp_path / "w.pt"
    first = launch.fit_local(_spec(uri, storage, out, 3, 1))
    assert first.endswith("checkpoint-00000003")
    _check(torch.load(out), 3, 1)
    # A crash between checkpoints: the state.json-less folder of a half-written checkpoint is
    # not a checkpoint; the run resumes from step 3's.
    storage.write_text(f"{uri}/train/checkpoint-00000004/G/partial", "x")
    launch.fit_local(_spec(uri, storage, out, 6, 1))
    w6 = torch.load(out)
    assert w6["start_index"] == 6, "resumed at step 3"
    _check(w6, 6, 1)
    done = [u.rsplit("/", 1)[-1] for u in storage.listdir(f"{uri}/train")]
    assert "checkpoint-00000006" in done and "checkpoint-00000002" not in done
