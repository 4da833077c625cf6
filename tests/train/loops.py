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


# -- one engine per ZeRO stage, for resuming on another worker count ----------------------------

GLOBAL_ROWS = 8  # samples per optimizer step, at any worker count


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole global batch of ``step``: rows n = 0..GLOBAL_ROWS-1."""
    g = torch.Generator().manual_seed(10_000 + step)
    x = torch.randn(GLOBAL_ROWS, 6, generator=g)
    return x, torch.tanh(x[:, :3] * 2.0 - x[:, 3:])


class Tiny(torch.nn.Module):
    """Two parameter groups (decay / no decay via LayerNorm), a frozen parameter and a buffer
    that change every step (like the VQGAN's EMA codebook and counters)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.ln, self.fc2 = torch.nn.Linear(6, 12), torch.nn.LayerNorm(12), \
            torch.nn.Linear(12, 3)
        self.frozen = torch.nn.Parameter(torch.randn(3, 3), requires_grad=False)
        self.register_buffer("calls", torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.ln(self.fc1(x)))) @ self.frozen


ZOO = {"z0": (0, "fp32"), "z1": (1, "fp32"), "z2": (2, "fp32"), "z3": (3, "fp32"),
       "z1bf16": (1, "bf16")}


class ZeroStagesTask:
    """The same regression trained by one engine per ZeRO stage (and a bf16 one), each with
    decay / no-decay groups. Rank r of W takes rows r, r+W, ... of each global batch (the
    pipeline's data rule), so a run is the same computation on any worker count."""

    unit = "images"
    units_per_sample = 1
    progress_keys = ("loss/z0",)

    def __init__(self, ctx: Any, spec: Any) -> None:
        self.ctx, self.spec, self.cfg = ctx, spec, spec.cfg
        self.engines = {}
        for name, (stage, precision) in ZOO.items():
            torch.manual_seed(0)  # the same initial weights for every engine and count
            model = Tiny().to(ctx.device)
            decay = [p for n, p in model.named_parameters() if p.requires_grad and "ln" not in n]
            no_decay = [p for n, p in model.named_parameters() if "ln" in n]
            groups = [{"params": decay, "weight_decay": 0.1},
                      {"params": no_decay, "weight_decay": 0.0}]
            self.engines[name] = make_engine(model, self.cfg, ctx.world, params=groups, extra={
                "zero_optimization": {"stage": stage}, "bf16": {"enabled": precision == "bf16"},
                "gradient_clipping": 1.0})
        self.base_lr = self.cfg.lr

    def batches(self, position: Any):
        step = position["step"] if position else 0
        cfg, ctx = self.cfg, self.ctx
        while True:
            x, y = global_batch(step)
            step += 1
            for micro in range(cfg.grad_accum):
                rows = (micro * cfg.micro_batch + torch.arange(cfg.micro_batch)) * ctx.world \
                    + ctx.rank
                yield (x[rows], y[rows]), {"step": step}

    def step(self, b: Any, step: int, micro: int) -> dict[str, Any]:
        import deepspeed

        x, y = b
        out = {}
        for name, engine in self.engines.items():
            dtype = torch.bfloat16 if ZOO[name][1] == "bf16" else torch.float32
            loss = torch.nn.functional.mse_loss(engine(x.to(dtype)).float(), y)
            engine.backward(loss)
            engine.step()
            if micro == self.cfg.grad_accum - 1:
                module = engine.module
                module.calls += 1
                frozen = module.frozen
                with deepspeed.zero.GatheredParameters([frozen], modifier_rank=0,
                                                       enabled=hasattr(frozen, "ds_id")), \
                        torch.no_grad():
                    frozen.mul_(0.9).add_(0.01 * (step + 1))
            out[f"loss/{name}"] = loss.detach()
        return out

    def images(self, step: int, tracker: Any) -> None:
        pass

    def finish(self, state: Any, tracker: Any) -> None:
        weights = {name: full_state(engine) for name, engine in self.engines.items()}
        if self.ctx.is_main and self.spec.args.get("weights_out"):
            torch.save({"weights": weights, "step": state.step,
                        "samples_seen": state.samples_seen, "world": self.ctx.world,
                        "grad_accum": self.cfg.grad_accum}, self.spec.args["weights_out"])


def full_state(engine: Any) -> dict[str, torch.Tensor]:
    """The module's whole parameters and buffers as fp32 CPU tensors, on every rank (gathered
    under ZeRO-3: a collective)."""
    import deepspeed

    module = engine.module
    params = list(module.parameters())
    with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
        return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
