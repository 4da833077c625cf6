"""A tiny regression task trained by the real loop (pipeline.train.loop) on real DeepSpeed.

The data of every micro-batch is a pure function of (micro-batch index, rank), and the task's
data position is that index, so an interrupted and resumed run must end with exactly the weights
of an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.train.engine import make_engine

W_TRUE = torch.tensor([[1.0, -2.0, 3.0, 0.5]])


def batch(step: int, rank: int, micro: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step * 1000 + rank * 10 + micro)
    x = torch.randn(size, 4, generator=g)
    return x, x @ W_TRUE.T


class LinearTask:
    """y = W x with MSE; ``spec.args["weights_out"]`` gets the final weights and the data
    position the run started from (rank 0)."""

    unit = "images"
    units_per_sample = 1
    progress_keys = ("loss",)

    def __init__(self, ctx: Any, spec: Any) -> None:
        self.ctx, self.spec = ctx, spec
        self.engine = make_engine(torch.nn.Linear(4, 1).to(ctx.device), spec.cfg, ctx.world)
        self.engines = {"model": self.engine}
        self.base_lr = spec.cfg.lr
        self.start_index = -1
        self.devices: set[str] = set()

    def batches(self, position: Any):
        index = position["index"] if position else 0
        self.start_index = index
        accum = self.spec.cfg.grad_accum
        while True:
            x, y = batch(index // accum, self.ctx.rank, index % accum, self.spec.cfg.micro_batch)
            index += 1
            yield (x, y), {"index": index}

    def step(self, b: Any, step: int, micro: int) -> dict[str, Any]:
        x, y = b
        self.devices.update({str(x.device), str(y.device)})
        loss = torch.nn.functional.mse_loss(self.engine(x), y)
        self.engine.backward(loss)
        self.engine.step()
        return {"loss": loss.detach()}

    def images(self, step: int, tracker: Any) -> None:
        pass

    def finish(self, state: Any, tracker: Any) -> None:
        if self.ctx.is_main and self.spec.args.get("weights_out"):
            weights = {k: v.detach().cpu().clone()
                       for k, v in self.engine.module.state_dict().items()}
            torch.save({"weights": weights, "start_index": self.start_index,
                        "step": state.step, "position": state.data.get("position"),
                        "devices": sorted(self.devices)}, self.spec.args["weights_out"])
