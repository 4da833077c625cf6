"""Test-only stages: small, real, resumable, and counting how often they run.

``alpha`` writes ``parts`` files one by one (each through a Ray task) and can be told to raise
after some of them (``fail_after``, kept out of the fingerprint like any test hook), so a rerun
must resume from the parts already written. ``beta`` reads alpha's manifest and combines its
parts with ``scale``; ``gamma`` summarises beta. Calls are counted per process in ``CALLS``.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Any

import ray

from pipeline.config import ConfigError, no_fingerprint
from pipeline.dag import Pipeline, Stage, StageContext
from pipeline.storage import Storage, join

CALLS: collections.Counter[str] = collections.Counter()


@dataclass
class AlphaConfig:
    value: int = 1
    parts: int = 4
    fail_after: int = no_fingerprint(-1)  # test hook: raise after this many parts (-1: never)
    # Like a training stage's `steps`: outside the fingerprint, raising it continues in place.
    bonus: int = no_fingerprint(0)

    def validate(self) -> None:
        if self.parts < 1:
            raise ConfigError("parts", f"must be >= 1, got {self.parts}")


@dataclass
class BetaConfig:
    scale: int = 2
    log_every: int = no_fingerprint(10)


@dataclass
class GammaConfig:
    label: str = "sum"


@ray.remote(num_cpus=1)
def _write_part(storage: Storage, uri: str, value: int, i: int) -> int:
    """Runs on a Ray worker: proves tasks reach the stage folder (local or S3)."""
    storage.write_text(uri, f"{value * (i + 1)}\n")
    return i


def run_alpha(ctx: StageContext) -> dict[str, Any]:
    CALLS["alpha"] += 1
    parts, reused = [], 0
    for i in range(ctx.cfg.parts + ctx.cfg.bonus):
        uri = join(ctx.uri, "parts", f"part-{i:03d}.txt")
        if ctx.storage.exists(uri):
            reused += 1
        else:
            if 0 <= ctx.cfg.fail_after <= i:
                raise RuntimeError(f"injected failure after {i} parts")
            ray.get(_write_part.remote(ctx.storage, uri, ctx.cfg.value, i))
        parts.append(uri)
    ctx.tracker.log({"parts": len(parts), "reused": reused}, step=1)
    return {"parts": parts, "reused": reused}


def run_beta(ctx: StageContext) -> dict[str, Any]:
    CALLS["beta"] += 1
    values = [int(ctx.storage.read_text(u)) for u in ctx.inputs["alpha"]["outputs"]["parts"]]
    total = sum(values) * ctx.cfg.scale
    out = join(ctx.uri, "total.txt")
    ctx.storage.write_text(out, f"{total}\n")
    ctx.tracker.log({"total": total}, step=1)
    return {"total": total, "uri": out}


def run_gamma(ctx: StageContext) -> dict[str, Any]:
    CALLS["gamma"] += 1
    total = int(ctx.storage.read_text(ctx.inputs["beta"]["outputs"]["uri"]))
    ctx.storage.write_json(join(ctx.uri, "summary.json"), {ctx.cfg.label: total})
    return {ctx.cfg.label: total}


def alpha_complete(outputs: dict[str, Any], cfg: AlphaConfig) -> bool:
    return len(outputs["parts"]) >= cfg.parts + cfg.bonus


ALPHA = Stage("alpha", AlphaConfig, run_alpha, is_complete=alpha_complete)
BETA = Stage("beta", BetaConfig, run_beta, upstream=("alpha",), needs_ray=False)
GAMMA = Stage("gamma", GammaConfig, run_gamma, upstream=("beta",), needs_ray=False)


def make_pipeline() -> Pipeline:
    return Pipeline([ALPHA, BETA, GAMMA])
