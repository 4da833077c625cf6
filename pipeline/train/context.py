"""Where a training process runs: rank, world size, local rank and device, from any launcher.

Three launchers give the same :class:`TrainContext`:

- Ray Train (``from_ray``): the TorchTrainer worker group; Ray has set up the process group and,
  with ``use_gpu``, one CUDA device per worker.
- torch.distributed env:// variables (``from_env``): ``torchrun`` or any launcher that sets
  ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``;
- one plain process (``from_env`` without those variables): a process group of one on
  127.0.0.1 (DeepSpeed's engines need a process group even alone).

``prepare_device`` applies the per-device settings every launcher wants (threads on CPU; the CUDA
device, TF32 matmuls on GPUs).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TrainContext:
    """One training process. ``device`` is where its models, batches and metrics live."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    launcher: str  # "ray" | "env" | "single"

    @property
    def is_main(self) -> bool:
        """World rank 0: writes exports, images, history and the tracker."""
        return self.rank == 0


def _device(use_gpu: bool, local_rank: int) -> torch.device:
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("use_gpu=true but this process sees no CUDA device (check the node's "
                           "GPUs and CUDA_VISIBLE_DEVICES, or set use_gpu=false)")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def from_ray(use_gpu: bool) -> TrainContext:
    """Inside a Ray Train worker (the process group is already up)."""
    import ray.train

    ctx = ray.train.get_context()
    device = torch.device("cpu")
    if use_gpu:
        import ray.train.torch

        device = ray.train.torch.get_device()  # the GPU Ray assigned to this worker
    return TrainContext(ctx.get_world_rank(), ctx.get_world_size(), ctx.get_local_rank(),
                        device, "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def from_env(use_gpu: bool) -> TrainContext:
    """From torch.distributed env:// variables, or one process when they are absent.

    Initialises the default process group when nobody has (NCCL on GPU, gloo on CPU). A single
    process binds a free loopback port, so two local runs never collide.
    """
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    launcher = "env" if "WORLD_SIZE" in os.environ else "single"
    device = _device(use_gpu, local_rank)
    if not dist.is_initialized():
        # One process: a private loopback store, and no MASTER_* variables left behind for
        # child processes to inherit (only LOCAL_RANK, which DeepSpeed insists on).
        init = f"tcp://127.0.0.1:{_free_port()}" if launcher == "single" else "env://"
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init,
                                rank=rank, world_size=world)
    return TrainContext(rank, world, local_rank, device, launcher)


def prepare_device(ctx: TrainContext, cpu_threads: float) -> None:
    """CPU: ``cpu_threads`` torch threads. GPU: this process's device, TF32 for fp32 matmuls and
    convolutions (Ampere and later; bit-exact fp32 is not what training needs)."""
    if ctx.device.type == "cuda":
        torch.cuda.set_device(ctx.device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(max(1, int(cpu_threads)))


def barrier() -> None:
    """All ranks meet (no-op without a process group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def to_device(batch: tuple[torch.Tensor | None, ...], device: torch.device
              ) -> tuple[torch.Tensor | None, ...]:
    """Every tensor of a batch on ``device`` (None entries, e.g. absent condition codes, stay
    None). On CUDA the host tensors go through pinned memory and are copied asynchronously (the
    copy overlaps the previous step's kernels)."""
    if device.type != "cuda":
        return tuple(t if t is None else t.to(device) for t in batch)
    return tuple(t if t is None else t.pin_memory().to(device, non_blocking=True)
                 if t.device.type == "cpu" else t.to(device) for t in batch)
