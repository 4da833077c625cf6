"""A tiny regression trained through the real training helpers (Ray Train + DeepSpeed).

The data of every micro-batch is a pure function of (step, rank, micro-step), so an interrupted
and resumed run must end with exactly the weights of an uninterrupted one.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from pipeline.train import checkpoint
from pipeline.train.config import TrainConfig
from pipeline.train.engine import make_engine
from pipeline.train.state import TrainState

W_TRUE = torch.tensor([[1.0, -2.0, 3.0, 0.5]])


def batch(step: int, rank: int, micro: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step * 1000 + rank * 10 + micro)
    x = torch.randn(size, 4, generator=g)
    return x, x @ W_TRUE.T


def linear_loop(config: dict[str, Any]) -> None:
    import ray.train

    tc = TrainConfig(**config["train"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(0)
    engine = make_engine(torch.nn.Linear(4, 1), tc, world)
    state = checkpoint.restore({"model": engine})
    start = state.step if state else 0
    state = state or TrainState()
    loss = torch.tensor(0.0)
    while state.step < tc.steps:
        for micro in range(tc.grad_accum):
            x, y = batch(state.step, rank, micro, tc.micro_batch)
            loss = torch.nn.functional.mse_loss(engine(x), y)
            engine.backward(loss)
            engine.step()
        state.step += 1
        state.samples_seen += tc.global_batch
        crash = config.get("crash")
        if crash and rank == 1 and state.step == crash["step"] and not os.path.exists(
                crash["marker"]):
            open(crash["marker"], "w").close()
            os._exit(1)  # a hard worker crash, not an exception
        metrics = {"loss": float(loss), "start_step": start}
        if state.step % tc.checkpoint_every == 0 or state.step == tc.steps:
            checkpoint.save({"model": engine}, state, metrics)
        else:
            ray.train.report({**metrics, "step": state.step})
    if rank == 0 and config.get("weights_out"):
        torch.save({k: v.detach().clone() for k, v in engine.module.state_dict().items()},
                   config["weights_out"])
