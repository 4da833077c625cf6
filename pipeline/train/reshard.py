"""Loading a checkpoint written by another number of workers into this run's engines.

DeepSpeed refuses to load ZeRO-1/2/3 optimizer states on another data-parallel world size
("Automatic adjustment of ZeRO's optimizer state partitioning with a new world size is not
currently supported"). Every rank here therefore converts the downloaded checkpoint into a
world-independent form in a temporary folder and loads that:

- **ZeRO-0** (fp32, or bf16's unfused optimizer): the whole optimizer state is in
  ``mp_rank_00_model_states.pt`` and does not depend on the world size; it loads as it is.
- **ZeRO-1/2/3**: DeepSpeed's universal checkpoint (``ds_to_universal``; ``inject_missing_state``
  because a non-Megatron client writes no ``universal_checkpoint_info``), loaded with the
  engine's ``load_universal_checkpoint`` switched on for that one call. Two things the
  universal load gets wrong are repaired after it:

  - it never restores buffers or frozen parameters (it skips the module state dict): they are
    saved beside it (:data:`EXTRA`) and copied back. Our VQGAN keeps its EMA codebook and
    counters there;
  - under ZeRO-3 every parameter group shares one Adam ``step`` tensor (two groups advance it
    twice per step) and gets group 0's settings (the no-decay group would decay): each group's
    step is un-shared and its saved settings put back.

Measured on CPU (torch 2.13, DeepSpeed 0.19.8, a client AdamW, two engines with a frozen
parameter and a buffer): 2→1 and 1→2 workers for ZeRO 0–3, fp32 and bf16, end with the weights
and Adam moments of a run that never changed count (max difference 0 or 6e-8, which is the
difference between the 1- and 2-worker runs themselves). Conversion takes ~0.05 s per engine
for small models; each rank converts on its own, since ranks share no local disk.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import logging
import os
import re
import tempfile
import time
from typing import Any

import torch

log = logging.getLogger("pipeline")

EXTRA = "extra_state.pt"  # buffers and frozen parameters, beside a universal checkpoint


def _load(path: str) -> Any:
    return torch.load(path, map_location="cpu", weights_only=False)


def zero_stage_of(folder: str) -> int:
    """The ZeRO stage a DeepSpeed checkpoint folder (``<engine>/<tag>``) was written with."""
    files = sorted(glob.glob(os.path.join(folder, "*model_states.pt")))
    if not files:
        raise FileNotFoundError(f"no DeepSpeed model states (*model_states.pt) in {folder}")
    ds_config = _load(files[0]).get("ds_config", {})
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def module_extras(folder: str, stage: int) -> dict[str, torch.Tensor]:
    """The module's tensors outside the optimizer (buffers, frozen parameters), whole, from
    the checkpoint folder ``<engine>/<tag>``."""
    if stage <= 2:
        states = _load(os.path.join(folder, "mp_rank_00_model_states.pt"))
        trained = {n for group in (states.get("param_shapes") or []) for n in group}
        return {n: t.detach().clone() for n, t in states["module"].items() if n not in trained}
    # ZeRO-3: buffers are whole in every rank's file; frozen parameters are flat fragments,
    # one per rank, concatenated and trimmed to their shapes.
    def rank_of(path: str) -> int:
        return int(re.search(r"zero_pp_rank_(\d+)_", os.path.basename(path)).group(1))

    files = sorted(glob.glob(os.path.join(folder, "zero_pp_rank_*_mp_rank_00_model_states.pt")),
                   key=rank_of)
    ranks = [_load(f) for f in files]
    first = ranks[0]
    extras = {n: first["module"][n].detach().clone() for n in first.get("buffer_names", [])}
    for name, shape in (first.get("frozen_param_shapes") or {}).items():
        flat = torch.cat([r["frozen_param_fragments"][name].reshape(-1) for r in ranks])
        extras[name] = flat[:shape.numel()].view(shape).clone()
    return extras


def to_universal(src: str, dst: str) -> None:
    """DeepSpeed checkpoint folder ``src`` (``<engine>/<tag>``, ZeRO-1/2/3) → a universal one
    at ``dst``, with :data:`EXTRA` beside it. One process, no process group needed."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=src, output_folder=dst, num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()):  # it prints every tensor it writes
        ds_to_universal.main(args)
    torch.save(module_extras(src, zero_stage_of(src)), os.path.join(dst, EXTRA))


def _restore_extras(engine: Any, extras: dict[str, torch.Tensor], where: str) -> None:
    import deepspeed

    named = dict(engine.module.named_parameters())
    named.update(dict(engine.module.named_buffers()))
    missing = sorted(n for n in extras if n not in named)
    if missing:
        raise RuntimeError(f"checkpoint {where} holds tensors this model lacks: {missing}")
    for name, value in sorted(extras.items()):  # the same order on every rank (ZeRO-3 gathers)
        tensor = named[name]
        with deepspeed.zero.GatheredParameters([tensor], modifier_rank=0,
                                               enabled=hasattr(tensor, "ds_id")), torch.no_grad():
            tensor.data.copy_(value.to(tensor.dtype))


def _repair_zero3_optimizer(engine: Any, folder: str) -> None:
    saved = _load(os.path.join(folder, "zero", "optimizer_state.pt"))
    groups = (saved.get("optimizer_state_dict") or {}).get("param_groups") \
        or saved.get("param_groups")
    if groups is not None and len(groups) == len(engine.optimizer.param_groups):
        for group, settings in zip(engine.optimizer.param_groups, groups):
            group.update({k: v for k, v in settings.items() if k != "params"})
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].detach().clone()


def load_engine_resharded(engine: Any, folder: str, tag: str, where: str) -> None:
    """Load ``<folder>/<tag>`` (one engine's checkpoint, written on any world size) into
    ``engine``. Collective: every rank calls it, with its own local copy of ``folder``."""
    src = os.path.join(folder, tag)
    stage = zero_stage_of(src)
    if not glob.glob(os.path.join(src, "*_optim_states.pt")):  # ZeRO-0: world-independent
        path, _ = engine.load_checkpoint(folder, tag=tag)
    else:
        with tempfile.TemporaryDirectory(prefix="universal-") as tmp:
            dst = os.path.join(tmp, tag)
            to_universal(src, dst)
            config = engine._config  # read at load time only (DeepSpeed 0.19)
            before, config.load_universal_checkpoint = config.load_universal_checkpoint, True
            try:
                path, _ = engine.load_checkpoint(tmp, tag=tag)
            finally:
                config.load_universal_checkpoint = before
            if path is not None:
                _restore_extras(engine, _load(os.path.join(dst, EXTRA)), where)
                if stage == 3:
                    _repair_zero3_optimizer(engine, dst)
    if path is None:
        raise RuntimeError(f"no DeepSpeed checkpoint in {folder} ({where})")


def load_resharded(folder: str, engines: dict[str, Any], tag: str, written_by: int,
                   where: str) -> None:
    """Load every engine's state from local checkpoint ``folder`` (written by ``written_by``
    workers) into ``engines``, re-partitioned for this run's count."""
    started = time.perf_counter()
    for name, engine in engines.items():
        load_engine_resharded(engine, os.path.join(folder, name), tag, f"{where}/{name}")
    log.debug("re-partitioned %s (from %d workers) in %.2fs", where, written_by,
              time.perf_counter() - started)
