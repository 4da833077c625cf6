"""Writing rows of a parameter so that they survive DeepSpeed's master weights.

A DeepSpeed optimizer may keep its own fp32 master copy of a parameter and copy it back into
the module parameter at every optimizer step. An in-place write into the module parameter (the
quantizer's dead-code restarts, see ``pipeline.models.quantize``) is then silently undone. Where
the master copy lives depends on the configuration (DeepSpeed 0.19, torch client optimizer):

- ZeRO-1/2 (fp32 or bf16), and ``BF16_Optimizer`` (ZeRO-1 + bf16 with fp32 gradient
  accumulation): partitioned fp32 master, reachable through the public ``deepspeed.utils``
  helpers ``safe_{get,set}_full_fp32_param`` / ``safe_{get,set}_full_optimizer_state`` (the
  parameter has ``_hp_mapping``). The getters all-reduce over the data-parallel group, so every
  rank must make the same calls. The optimizer-state helpers fail until the first optimizer step
  has linked the state (before it there are no moments to reset).
- ZeRO-0 + bf16: ``FP16_UnfusedOptimizer`` with one fp32 master per parameter. The helpers do
  not cover it (no ``_hp_mapping``: they return ``None`` and set nothing); the master is found
  through the wrapper's ``fp16_groups`` / ``fp32_groups`` pairing.
- ZeRO-0 + fp32: the client torch optimizer itself; the module parameter is the master.
- ZeRO-3: the same helpers reach the partitioned fp32 master and state (they dispatch on
  ``ds_id``); the partitioned module parameter is written through a ``GatheredParameters``
  context, which re-partitions rank 0's modification on exit.

Not supported (an error instead of a silent loss): the fused fp16 optimizer's flat master
(``FP16_Optimizer``, only with FusedAdam on GPU) and any other unknown wrapper.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from pipeline.models.quantize import VectorQuantizer


def apply_codebook_restarts(engine: Any) -> int:
    """Make the dead-code restarts of every quantizer in ``engine.module`` stick.

    Call on every rank right after every ``engine.step()`` (also between accumulation
    boundaries: cheap when nothing is pending, and correct either way, because DeepSpeed only
    copies master to module at a boundary; writing the master early just lets that boundary's
    update start from the restarted vectors, as in plain PyTorch). For each
    :class:`VectorQuantizer` with a pending restart (taken and cleared here), writes the new rows
    into the module parameter (cast to its dtype) and into the optimizer's fp32 master, and zeroes
    those rows' optimizer state (Adam moments) so the dead code's stale momentum does not drag
    the new vector away. Collective under ZeRO: relies on every rank having the same pending
    restarts, which the quantizer guarantees (all-reduced usage, rank-0 vectors). Returns the
    number of rows restarted.
    """
    restarted = 0
    for quantizer in _quantizers(engine.module):
        pending = quantizer.take_pending_restart()
        if pending is None:
            continue
        rows, vectors = pending
        set_param_rows(engine, quantizer.embedding.weight, rows, vectors)
        restarted += rows.numel()
    return restarted


def set_param_rows(engine: Any, param: nn.Parameter, rows: Tensor, values: Tensor) -> None:
    """Set ``param[rows] = values`` in the module parameter and in the optimizer's master copy,
    and zero the optimizer state of those rows.

    ``param`` is a parameter of ``engine.module``; ``rows`` [n] int64 index its first dimension,
    ``values`` [n, ...] (any float dtype; the master receives them in fp32). Every rank must
    call this with the same arguments (the ZeRO helpers are collective). Raises
    ``NotImplementedError`` where the master copy cannot be reached (see the module docstring).
    """
    optimizer = engine.optimizer
    if hasattr(param, "ds_id"):  # partitioned even when frozen: param.data is not the tensor
        _set_rows_zero3(optimizer, param, rows, values)
        return
    if param.requires_grad and optimizer is not None:
        if hasattr(param, "_hp_mapping"):
            _set_rows_partitioned(optimizer, param, rows, values)
        elif (master := _unfused_master(optimizer, param)) is not None:
            _write_rows(master, rows, values)
            _zero_state_rows(optimizer.optimizer.state.get(master, {}), master, rows)
        elif _owns(optimizer, param):
            _zero_state_rows(optimizer.state.get(param, {}), param, rows)
        else:
            raise NotImplementedError(
                f"cannot locate the master weights of a parameter in {type(optimizer).__name__}")
    # Frozen parameters (EMA codebooks) have no master: the module parameter is all there is.
    _write_rows(param, rows, values)


def full_fp32_master(engine: Any, param: nn.Parameter) -> Tensor:
    """The full fp32 master copy of ``param`` as the optimizer will next step it (a copy under
    ZeRO-1/2/3, where it is assembled from the partitions: collective, call on every rank).

    The module parameter itself where there is no separate master (fp32 ZeRO-0, frozen
    parameters). Mainly for checks and tests.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    if hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"):
        return safe_get_full_fp32_param(param)
    master = _unfused_master(engine.optimizer, param) if engine.optimizer is not None else None
    return master if master is not None else param.detach()


# -- where the master copies live --------------------------------------------------------------

def _set_rows_partitioned(optimizer: Any, param: nn.Parameter, rows: Tensor,
                          values: Tensor) -> None:
    """ZeRO-1/2 and BF16_Optimizer: through DeepSpeed's public fragment helpers."""
    # The state fragments exist only once the first optimizer step has linked them (before, the
    # getter raises on the ranks owning a fragment). The flag is the same on every rank, unlike
    # the per-rank fragment, so testing it keeps the collective getters in step across ranks.
    linked = getattr(optimizer, "_hp_optimizer_states_linked", False)
    keys = _elementwise_state_keys(optimizer.optimizer) if linked else []
    _write_through_helpers(param, rows, values, keys)


def _set_rows_zero3(optimizer: Any, param: nn.Parameter, rows: Tensor, values: Tensor) -> None:
    """ZeRO-3: fp32 master and state through the helpers, then the partitioned module parameter
    through a gather whose rank-0 modification is re-partitioned on exit (every rank writes the
    same values, so rank 0's are everyone's)."""
    import deepspeed

    if param.requires_grad and optimizer is not None:
        # Adam's state appears at the first step, on every rank at once: no keys before it.
        _write_through_helpers(param, rows, values, _elementwise_state_keys(optimizer.optimizer))
    with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
        _write_rows(param, rows, values)


def _write_through_helpers(param: nn.Parameter, rows: Tensor, values: Tensor,
                           state_keys: list[str]) -> None:
    """Master rows := ``values`` and the ``state_keys`` state rows := 0, with DeepSpeed's
    ``safe_*`` helpers. Each getter assembles the full fp32 tensor on every rank (collective);
    each setter copies back only this rank's own fragment."""
    from deepspeed.utils import (
        safe_get_full_fp32_param,
        safe_get_full_optimizer_state,
        safe_set_full_fp32_param,
        safe_set_full_optimizer_state,
    )

    master = safe_get_full_fp32_param(param)
    _write_rows(master, rows, values)
    safe_set_full_fp32_param(param, master)
    for key in state_keys:
        state = safe_get_full_optimizer_state(param, key)
        _write_rows(state, rows, torch.zeros((), dtype=state.dtype))
        safe_set_full_optimizer_state(param, state, key)


def _unfused_master(optimizer: Any, param: nn.Parameter) -> Tensor | None:
    """The fp32 master of ``param`` in an optimizer pairing ``fp16_groups`` with per-parameter
    ``fp32_groups`` (DeepSpeed's FP16_UnfusedOptimizer, used for bf16 and fp16 at ZeRO-0)."""
    lp_groups = getattr(optimizer, "fp16_groups", None)
    hp_groups = getattr(optimizer, "fp32_groups", None)
    if lp_groups is None or hp_groups is None:
        return None
    for lp_group, hp_group in zip(lp_groups, hp_groups, strict=True):
        for lp, hp in zip(lp_group, hp_group, strict=True):
            if lp is param:
                return hp
    return None


def _owns(optimizer: Any, param: nn.Parameter) -> bool:
    """Whether ``optimizer`` updates ``param`` itself (no separate master copy)."""
    return any(p is param for group in optimizer.param_groups for p in group["params"])


# -- small tensor helpers ----------------------------------------------------------------------

@torch.no_grad()
def _write_rows(target: Tensor, rows: Tensor, values: Tensor) -> None:
    """``target[rows] = values`` in place, cast to ``target``'s dtype and device."""
    target.data[rows.to(target.device)] = values.to(device=target.device, dtype=target.dtype)


def _zero_state_rows(state: dict[str, Any], param: Tensor, rows: Tensor) -> None:
    """Zero ``rows`` of every per-element state tensor (Adam's exp_avg, exp_avg_sq, ...)."""
    for value in state.values():
        if torch.is_tensor(value) and value.shape == param.shape:
            _write_rows(value, rows, torch.zeros((), dtype=value.dtype))


def _elementwise_state_keys(basic_optimizer: torch.optim.Optimizer) -> list[str]:
    """Keys of the per-element state tensors of an optimizer over flat partitions, sorted so
    every rank iterates them in the same order. Scalars such as Adam's ``step`` are left out
    (DeepSpeed links only tensors shaped like the partition)."""
    keys: set[str] = set()
    for flat, state in basic_optimizer.state.items():
        keys.update(k for k, v in state.items() if torch.is_tensor(v) and v.shape == flat.shape)
    return sorted(keys)


def _quantizers(module: nn.Module) -> list[VectorQuantizer]:
    """Every VectorQuantizer in ``module``, in the (rank-independent) module order."""
    return [m for m in module.modules() if isinstance(m, VectorQuantizer)]
