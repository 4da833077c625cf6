"""Resuming on another worker count: a checkpoint written by 2 Ray Train workers continues on 1
process and one written by 1 process continues on 2 Ray workers, for ZeRO 0, 1, 2, 3 (fp32)
and ZeRO-1 bf16 at once (one engine each), with buffers and frozen parameters that change every
step. Both end where a run that never changed count ends: the global batch is kept (grad_accum
re-derived), the optimizer states are re-partitioned (pipeline.train.reshard), and every rank's
data position is merged."""

from __future__ import annotations

import pytest
import torch

from pipeline.storage import Storage
from pipeline.train import launch
from pipeline.train.config import TrainConfig
from pipeline.train.loop import LoopSpec
from tests.train.loops import GLOBAL_ROWS, ZOO, ZeroStagesTask


def _spec(uri: str, out, steps: int, workers: int, accum: int = 2) -> LoopSpec:
    # A fresh run's global batch is micro 2 x accum x workers: 8 here, kept on resume.
    tc = TrainConfig(steps=steps, micro_batch=2, grad_accum=accum, lr=0.02, betas=[0.9, 0.99],
                     num_workers=workers, checkpoint_every=3, keep_checkpoints=2, log_every=3,
                     image_every=100)
    return LoopSpec(task=ZeroStagesTask, cfg=tc, storage=Storage(), uri=uri, seed=0,
                    args={"weights_out": str(out)}, stage="zoo")


def _close(a: dict, b: dict, what: str) -> None:
    for name, (_, precision) in ZOO.items():
        tol = dict(rtol=2e-2, atol=2e-2) if precision == "bf16" else dict(rtol=1e-5, atol=2e-6)
        for key, value in a["weights"][name].items():
            torch.testing.assert_close(b["weights"][name][key], value, **tol,
                                       msg=lambda m, n=name, k=key: f"{what} {n}.{k}: {m}")


def test_resume_on_another_worker_count_all_zero_stages(ray_session, tmp_path):
    out = tmp_path / "w.pt"
    launch.fit(_spec(str(tmp_path / "unchanged"), out, 6, 2))
    unchanged = torch.load(out)
    assert unchanged["world"] == 2 and unchanged["grad_accum"] == 2

    # 2 → 1: three steps on two Ray workers, three more in this process.
    down = str(tmp_path / "down")
    launch.fit(_spec(down, out, 3, 2))
    launch.fit_local(_spec(down, out, 6, 1))
    two_to_one = torch.load(out)
    assert (two_to_one["world"], two_to_one["grad_accum"]) == (1, 4), "global batch kept"
    assert two_to_one["step"] == 6 and two_to_one["samples_seen"] == 6 * GLOBAL_ROWS
    _close(unchanged, two_to_one, "2→1")

    # 1 → 2: three steps in this process (accum 4), three more on two Ray workers (Ray has no
    # checkpoint of its own there: it resumes from the one fit_local wrote).
    up = str(tmp_path / "up")
    launch.fit_local(_spec(up, out, 3, 1, accum=4))
    launch.fit(_spec(up, out, 6, 2, accum=4))
    one_to_two = torch.load(out)
    assert (one_to_two["world"], one_to_two["grad_accum"]) == (2, 2)
    assert one_to_two["step"] == 6 and one_to_two["samples_seen"] == 6 * GLOBAL_ROWS
    _close(unchanged, one_to_two, "1→2")
    for name in ZOO:  # the buffer counted every step, across both count changes
        assert torch.equal(one_to_two["weights"][name]["calls"], torch.full((2,), 6.0))


def test_a_global_batch_that_cannot_be_split_is_refused(tmp_path):
    from pipeline.config import ConfigError
    from pipeline.train.context import TrainContext
    from pipeline.train.loop import resolve
    from pipeline.train.state import TrainState

    ctx = TrainContext(0, 3, 0, torch.device("cpu"), "env")
    with pytest.raises(ConfigError, match="global batch of 8 samples per step cannot be split"):
        resolve(TrainConfig(micro_batch=2), ctx, TrainState(step=3, global_batch=8))
    two = TrainContext(0, 2, 0, torch.device("cpu"), "env")
    assert resolve(TrainConfig(micro_batch=2, grad_accum=1), two,
                   TrainState(step=3, global_batch=8)).grad_accum == 2
