"""Shared by the stage benchmarks (``bench/gpt.py``, ``bench/vqgan.py``): run real pipeline
stages in a temporary storage root and read a training stage's throughput from its history.

Not a benchmark itself. Import as ``bench.stage_run`` after putting the repository root on
``sys.path``.
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from pipeline.config import load_config
from pipeline.dag import Pipeline, Stage
from pipeline.storage import Storage, join
from pipeline.train.history import read_history


@contextlib.contextmanager
def temp_root(prefix: str, keep: bool) -> Iterator[str]:
    """A fresh local folder for a benchmark's ``storage.root``; removed afterwards unless
    ``keep``."""
    root = tempfile.mkdtemp(prefix=prefix)
    try:
        yield root
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def run_stages(stages: list[Stage], overrides: list[str], num_cpus: int = 2
               ) -> tuple[dict[str, dict[str, Any]], Any, float]:
    """Run ``stages`` (a whole DAG prefix) with ``overrides`` on a fresh embedded Ray of
    ``num_cpus`` CPUs; returns (manifests by stage, the resolved config, wall seconds).

    Workers' output does not reach this process (``log_to_driver=False``), so a benchmark's
    stdout holds only its JSON. Ray is shut down afterwards.
    """
    import ray

    pipe = Pipeline(stages)
    cfg = load_config(None, overrides, pipe.schema)
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        t0 = time.perf_counter()
        manifests = pipe.run(cfg)
        return manifests, cfg, time.perf_counter() - t0
    finally:
        ray.shutdown()


def history_rate(manifest: dict[str, Any], key: str) -> tuple[float, list[float]]:
    """(median of ``key`` over the stage's ``history.jsonl`` records but the first, every
    record's value). The first record is warm-up (start-up, allocator, kernel caches); raises
    when fewer than two records have ``key``."""
    rows = read_history(Storage(), join(manifest["uri"], "history.jsonl"))
    rates = [float(r[key]) for r in rows if key in r]
    if len(rates) < 2:
        raise RuntimeError(f"{manifest['uri']}/history.jsonl has {len(rates)} {key} records; "
                           f"need >= 2 (more steps or a shorter log_every)")
    return statistics.median(rates[1:]), rates
