"""DeepSpeed engines from our TrainConfig: one source of truth for batch sizes and precision."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch

from pipeline.train.config import TrainConfig


def deepspeed_config(tc: TrainConfig, world_size: int,
                     extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The DeepSpeed JSON config. Batch keys always come from ``tc`` (they can't disagree);
    ``extra`` may add DeepSpeed options but setting a batch key differently is an error."""
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": tc.micro_batch,
        "gradient_accumulation_steps": tc.grad_accum,
        "train_batch_size": tc.micro_batch * tc.grad_accum * world_size,
        "zero_optimization": {"stage": tc.zero_stage},
        "bf16": {"enabled": tc.precision == "bf16"},
        "gradient_clipping": tc.grad_clip,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    for key, value in (extra or {}).items():
        if key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                   "train_batch_size") and value != cfg[key]:
            raise ValueError(f"deepspeed.{key}={value} disagrees with the stage config "
                             f"({cfg[key]}); set micro_batch/grad_accum instead")
        cfg[key] = value
    return cfg


def select_accelerator() -> None:
    """DeepSpeed picks its accelerator at import: say CPU explicitly where there is no GPU."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def adamw(params: Iterable[Any], tc: TrainConfig) -> torch.optim.Optimizer:
    """The client optimizer: torch's AdamW, which DeepSpeed wraps as is (DeepSpeed's own AdamW
    ops JIT-compile a C++ extension at first use, ~42 s for CPUAdam, in every new worker)."""
    return torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas),
                             weight_decay=tc.weight_decay)


def make_engine(model: torch.nn.Module, tc: TrainConfig, world_size: int,
                params: Iterable[Any] | None = None, extra: dict[str, Any] | None = None) -> Any:
    """A DeepSpeed engine over ``model`` with AdamW on ``params`` (default: all parameters).

    Must run inside an initialised torch.distributed process group (Ray Train sets it up).
    """
    select_accelerator()
    import deepspeed

    optimizer = adamw(params if params is not None else model.parameters(), tc)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      config=deepspeed_config(tc, world_size, extra),
                                      dist_init_required=False)
    return engine


def set_lr(engine: Any, lr: float) -> None:
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
