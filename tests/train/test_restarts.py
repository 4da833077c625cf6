"""Dead-code restarts survive DeepSpeed's master weights (issue #12 item 5).

Real DeepSpeed engines in this process (gloo, world size 1; an opt-in test runs two ranks in
spawned processes, ``TEST_TWO_RANKS=1``). The codebook starts with one code
at the data and fifteen far away (rows 1..15 at 10 + i), so those fifteen die after
two steps (``restart_dead_codes=16``: 16 x 16 codes = 256 vectors, two batches of 128) and are
restarted from batch vectors (|v| < 1). A restarted row
must then stay at its new vector, in the module parameter and in the fp32 master, through the
following optimizer steps; without ``apply_codebook_restarts`` ZeRO pulls it back to ~10 + i.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

from pipeline.models.quantize import QuantizerConfig, VectorQuantizer
from pipeline.train.config import TrainConfig
from pipeline.train.engine import make_engine, select_accelerator
from pipeline.train.params import apply_codebook_restarts, full_fp32_master
from tests.conftest import free_port

N_EMBED, DIM = 16, 4
LR = 1e-4  # small, so a restarted row may move only a little in the steps that follow
FAR = 10.0  # where the dead codes start


@pytest.fixture(scope="module")
def process_group():
    """A world-size-1 gloo group for DeepSpeed; reuses one another test already set up."""
    if dist.is_initialized():
        yield
        return
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
                           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}.items():
            mp.setenv(key, value)
        select_accelerator()  # DS_ACCELERATOR=cpu before anything imports deepspeed
        dist.init_process_group("gloo", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


class Tiny(nn.Module):
    """Linear encoder (identity at start) -> quantizer; the loss gives the codebook gradients."""

    def __init__(self, use_ema: bool = False) -> None:
        super().__init__()
        self.proj = nn.Linear(DIM, DIM)
        self.quant = VectorQuantizer(QuantizerConfig(n_embed=N_EMBED, embed_dim=DIM,
                                                     restart_dead_codes=16, use_ema=use_ema))
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(DIM))
            self.proj.bias.zero_()
            codebook = torch.zeros(N_EMBED, DIM)
            codebook[1:] = FAR + torch.arange(1.0, N_EMBED)[:, None]
            self.quant.embedding.weight.copy_(codebook)
            if use_ema:
                self.quant.ema_embed_sum.copy_(codebook)

    def forward(self, x: Tensor) -> Tensor:
        z = self.proj(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        out = self.quant(z)
        return out.loss + out.z_q.float().square().mean()


def _engine(zero_stage: int, precision: str, grad_accum: int = 1, extra: dict | None = None,
            use_ema: bool = False):
    tc = TrainConfig(zero_stage=zero_stage, precision=precision, micro_batch=2,
                     grad_accum=grad_accum, lr=LR)
    return make_engine(Tiny(use_ema), tc, world_size=1, extra=extra)


def _train(engine, steps: int, apply: bool, seed: int = 0) -> dict[int, Tensor]:
    """``steps`` micro-steps on a fixed batch; returns {row: latest restart vector (fp32)}."""
    x = (torch.randn(2, DIM, 8, 8, generator=torch.Generator().manual_seed(seed)) * 0.3)
    x = x.to(next(engine.module.parameters()).dtype)
    quant = engine.module.quant
    latest: dict[int, Tensor] = {}
    for _ in range(steps):
        engine.backward(engine(x))
        engine.step()
        if quant.pending_restart is not None:
            rows, vectors = quant.pending_restart
            latest.update(zip(rows.tolist(), vectors.clone(), strict=True))
        if apply:
            apply_codebook_restarts(engine)
        else:
            quant.take_pending_restart()
    return latest


def _module_value(param: nn.Parameter) -> Tensor:
    """A full fp32 copy of a module parameter (gathered first under ZeRO-3)."""
    if not hasattr(param, "ds_id"):
        return param.detach().float().clone()
    import deepspeed

    with deepspeed.zero.GatheredParameters([param]):
        return param.detach().float().clone()


def _restarted_rows_hold(engine, latest: dict[int, Tensor]) -> None:
    weight = engine.module.quant.embedding.weight
    rows = torch.tensor(sorted(latest))
    new = torch.stack([latest[r] for r in rows.tolist()])
    # bf16 rounding of |v| < 1 is < 4e-3; the optimizer may have moved a row by a few lr steps.
    for name, tensor in [("module", _module_value(weight)),
                         ("fp32 master", full_fp32_master(engine, weight))]:
        torch.testing.assert_close(tensor[rows].float(), new, atol=1e-2, rtol=0, msg=name)


CONFIGS = {
    "zero2-bf16": (2, "bf16", 1, None),
    "zero2-bf16-accum3": (2, "bf16", 3, None),  # restart between accumulation boundaries
    "zero2-fp32": (2, "fp32", 1, None),
    "zero1-bf16": (1, "bf16", 1, None),
    # ZeRO-1 + bf16 with fp32 gradient accumulation is DeepSpeed's BF16_Optimizer.
    "zero1-bf16-bf16opt": (1, "bf16", 1, {"data_types": {"grad_accum_dtype": "fp32"}}),
    "zero0-bf16": (0, "bf16", 1, None),
    "zero0-fp32": (0, "fp32", 1, None),
    "zero3-bf16": (3, "bf16", 1, None),
    "zero3-fp32": (3, "fp32", 1, None),
    # Tiny parameters stay whole ("persistent") under ZeRO-3 by default; force partitioning.
    "zero3-bf16-partitioned": (3, "bf16", 1, {"zero_optimization": {
        "stage": 3, "stage3_param_persistence_threshold": 0}}),
}


@pytest.mark.usefixtures("process_group")
@pytest.mark.parametrize("name", list(CONFIGS))
def test_restart_survives_optimizer_steps(name):
    zero_stage, precision, grad_accum, extra = CONFIGS[name]
    engine = _engine(zero_stage, precision, grad_accum, extra)
    if name == "zero1-bf16-bf16opt":
        assert type(engine.optimizer).__name__ == "BF16_Optimizer"
    if name == "zero3-bf16-partitioned":
        assert engine.module.quant.embedding.weight.numel() == 0  # really partitioned away
    latest = _train(engine, steps=2 * grad_accum + 4 * grad_accum, apply=True)
    assert set(range(1, N_EMBED)) <= set(latest)  # every far code was restarted
    _restarted_rows_hold(engine, latest)
    weight = engine.module.quant.embedding.weight
    assert (_module_value(weight)[1:] - FAR).abs().amax() > 5  # nowhere near the old rows
    if zero_stage == 2 and precision == "bf16":  # the case, through the public helper
        from deepspeed.utils import safe_get_full_fp32_param

        master = safe_get_full_fp32_param(weight)
        rows = torch.tensor(sorted(latest))
        new = torch.stack([latest[r] for r in rows.tolist()])
        torch.testing.assert_close(master[rows], new, atol=1e-2, rtol=0)


@pytest.mark.usefixtures("process_group")
@pytest.mark.parametrize("zero_stage, precision",
                         [(2, "bf16"), (2, "fp32"), (0, "bf16"), (3, "bf16")])
def test_without_apply_the_restart_is_undone(zero_stage, precision):
    """Every configuration with a separate master loses the in-place restart on its own."""
    engine = _engine(zero_stage, precision)
    latest = _train(engine, steps=3, apply=False)
    assert set(range(1, N_EMBED)) <= set(latest)
    weight = _module_value(engine.module.quant.embedding.weight)
    old = FAR + torch.arange(1.0, N_EMBED)[:, None].expand(-1, DIM)
    torch.testing.assert_close(weight[1:], old, atol=0.1, rtol=0)  # back at the dead codes


@pytest.mark.usefixtures("process_group")
@pytest.mark.parametrize("zero_stage, precision",
                         [(2, "bf16"), (0, "bf16"), (0, "fp32"), (3, "bf16")])
def test_adam_moments_of_restarted_rows_are_zeroed(zero_stage, precision):
    """A code used once, then dead, still has Adam moments; its restart clears exactly them."""
    engine = _engine(zero_stage, precision)
    weight = engine.module.quant.embedding.weight
    # A batch made of the codes themselves (the encoder is the identity) uses every code once.
    codes = _module_value(weight).to(weight.dtype)
    every_code = codes.t().reshape(1, DIM, 2, N_EMBED // 2).expand(2, -1, -1, -1)
    near_zero = (torch.randn(2, DIM, 8, 8) * 0.3).to(weight.dtype)
    for x in (every_code, near_zero, near_zero):  # the far codes die in the third forward
        engine.backward(engine(x))
        engine.step()
    rows, _ = engine.module.quant.pending_restart
    assert set(range(1, N_EMBED)) <= set(rows.tolist())
    assert torch.count_nonzero(_optimizer_state(engine, weight, "exp_avg")[rows]) > 0
    assert apply_codebook_restarts(engine) == rows.numel()
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.count_nonzero(_optimizer_state(engine, weight, key)[rows]) == 0, key
    assert torch.count_nonzero(_optimizer_state(engine, engine.module.proj.weight, "exp_avg"))


@pytest.mark.usefixtures("process_group")
@pytest.mark.parametrize("zero_stage", [2, 3])
def test_frozen_ema_codebook_restarts_are_written_to_the_module(zero_stage):
    """EMA codebooks have no optimizer state or master: the restart lands in the module."""
    engine = _engine(zero_stage, "bf16", use_ema=True)
    latest = _train(engine, steps=4, apply=True)
    assert set(range(1, N_EMBED)) <= set(latest)
    rows = torch.tensor(sorted(latest))
    new = torch.stack([latest[r] for r in rows.tolist()])
    weight = _module_value(engine.module.quant.embedding.weight)
    torch.testing.assert_close(weight[rows], new, atol=0.1, rtol=0)  # EMA moves them a little


def _optimizer_state(engine, param: nn.Parameter, key: str) -> Tensor:
    from deepspeed.utils import safe_get_full_optimizer_state

    state = safe_get_full_optimizer_state(param, key)
    if state is None and engine.optimizer is engine.basic_optimizer:  # fp32 ZeRO-0: no master
        state = engine.optimizer.state[param][key]
    if state is None:  # ZeRO-0 bf16: per-parameter fp32 master in FP16_UnfusedOptimizer
        groups = zip(engine.optimizer.fp16_groups, engine.optimizer.fp32_groups, strict=True)
        master = next(hp for lp_g, hp_g in groups for lp, hp in zip(lp_g, hp_g, strict=True)
                      if lp is param)
        state = engine.optimizer.optimizer.state[master][key]
    return state


def test_pending_restart_accumulates_latest_wins():
    q = VectorQuantizer(QuantizerConfig(n_embed=4, embed_dim=2, restart_dead_codes=1))
    q._record_restart(torch.tensor([1, 2]), torch.tensor([[1.0, 1.0], [2.0, 2.0]]))
    q._record_restart(torch.tensor([2, 3]), torch.tensor([[5.0, 5.0], [3.0, 3.0]]))
    rows, vectors = q.take_pending_restart()
    assert dict(zip(rows.tolist(), vectors.tolist(), strict=True)) == {
        1: [1.0, 1.0], 2: [5.0, 5.0], 3: [3.0, 3.0]}
    assert rows.dtype == torch.int64 and vectors.dtype == torch.float32
    assert q.take_pending_restart() is None



# -- two ranks: partitioned fragments and collective helpers -----------------------------------

TWO_RANK_CONFIGS = ["zero2-bf16", "zero3-bf16-partitioned", "zero0-bf16"]


def _two_rank_worker(rank: int, port: int) -> None:
    """One rank of a 2-process gloo job: each rank trains on its own batch; the restarts
    (all-reduced usage, rank-0 vectors) must hold identically on both ranks."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for name in TWO_RANK_CONFIGS:
            zero_stage, precision, grad_accum, extra = CONFIGS[name]
            tc = TrainConfig(zero_stage=zero_stage, precision=precision, micro_batch=2,
                             grad_accum=grad_accum, lr=LR)
            engine = make_engine(Tiny(), tc, world_size=2, extra=extra)
            latest = _train(engine, steps=6, apply=True, seed=rank)
            assert set(range(1, N_EMBED)) <= set(latest), name
            _restarted_rows_hold(engine, latest)
            weight = _module_value(engine.module.quant.embedding.weight)
            gathered = [torch.empty_like(weight) for _ in range(2)]
            dist.all_gather(gathered, weight)
            assert torch.equal(gathered[0], gathered[1]), f"{name}: ranks disagree"
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(os.environ.get("TEST_TWO_RANKS") != "1",
                    reason="~45 s (two processes import torch+deepspeed); TEST_TWO_RANKS=1 runs it")
def test_two_ranks_restarts_hold_and_agree(monkeypatch):
    """World size 2: each rank owns only part of the ZeRO fragments, and every helper call is a
    collective, so a rank-dependent call sequence would hang here (and fail after 120 s)."""
    import torch.multiprocessing as mp

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # inherited by the spawned ranks
    context = mp.start_processes(_two_rank_worker, args=(free_port(),), nprocs=2, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + 120  # a rank stuck in a collective must fail, not hang
    try:
        while not context.join(timeout=1):
            assert time.monotonic() < deadline, "two-rank job hung"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
