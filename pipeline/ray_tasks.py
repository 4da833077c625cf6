"""What the shard-at-a-time stages (shard, tokenize) share on the driver.

- :func:`run_calls` / :func:`run_bounded`: one Ray task per call, at most N in flight, results
  in call order (or the calls one after another in this process for a run without Ray);
- :class:`ShardProgress`: the progress bar, the tracker's running counts and the test-only fault
  hook (:mod:`pipeline.faults`), fed once per finalized shard;
- capacity checks that fail at once with the knob to turn (:class:`ResourceError`), where Ray
  would otherwise wait forever for resources that never come;
- :func:`split_counts` and :func:`images_per_s`: the per-split totals and the speed figure of a
  stage's outputs.

Ray is imported inside the functions that need it: a run without Ray never loads it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from pipeline.faults import Fault, raise_if_due
from pipeline.manifests import SplitCounts


class ResourceError(RuntimeError):
    """The cluster cannot host the work as configured (fail now instead of hanging)."""


# -- capacity -------------------------------------------------------------------------------------


def cluster_resources() -> dict[str, float]:
    """The Ray cluster's total resources (``CPU``, ``GPU``, custom ones)."""
    import ray

    return {k: float(v) for k, v in ray.cluster_resources().items()}


def require(what: str, resource: str, need: float, have: float, fix: str) -> None:
    """ResourceError ``"<what> needs <need> <resource>s but the Ray cluster has <have>: <fix>"``
    unless ``have`` covers ``need``."""
    if need > have + 1e-9:
        raise ResourceError(f"{what} needs {need:g} {resource}s but the Ray cluster has "
                            f"{have:g}: {fix}")


def worker_count(requested: int, stage: str, local: bool = False) -> int:
    """How many one-CPU tasks run at once: ``requested``, else one per cluster CPU; 1 without
    Ray. ResourceError when the cluster has no CPU at all."""
    if local:
        return 1
    cpus = int(cluster_resources().get("CPU", 0))
    require(f"{stage} (1 CPU per task)", "CPU", 1, cpus,
            "start workers, or set ray.num_cpus for an embedded Ray")
    return requested or cpus


def wait_for_room(bundle: dict[str, float], count: int, timeout_s: float, what: str,
                  fix: str) -> None:
    """Return once the cluster can place ``count`` × ``bundle`` at once; ResourceError after
    ``timeout_s`` naming ``what`` and the ``fix``.

    A placement group of the bundles is the probe: it is placed atomically or not at all, and
    removing it leaves nothing behind, whereas a pool whose actors cannot start waits forever
    (or fails while its pending actors live on and later hold the resources).
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group([bundle] * count)
    try:
        ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
    finally:
        remove_placement_group(pg)
    if not ready:
        raise ResourceError(f"{what} could not start within {timeout_s:g}s: other work holds the "
                            f"cluster's resources; wait for it, or {fix}")


def require_one_process(stage: str, command: str) -> None:
    """RuntimeError under a multi-process launch (torchrun) without Ray: these stages run in one
    process there, and N copies would write the same shards."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise RuntimeError(f"without Ray, {stage} runs in one process: run it first without "
                           f"torchrun (e.g. `{command}`)")


# -- submission -----------------------------------------------------------------------------------


def run_bounded(task: Any, calls: list[tuple[Any, ...]], workers: int,
                on_result: Callable[[int, Any], None] | None = None) -> list[Any]:
    """Run ``task.remote(*call)`` for every call, at most ``workers`` in flight; results in call
    order. ``on_result(i, result)`` runs on the driver as each one arrives; if it (or a task)
    raises, the calls still in flight are cancelled before the error propagates.
    """
    import ray

    results: dict[int, Any] = {}
    pending: dict[Any, int] = {}
    todo = list(range(len(calls)))
    todo.reverse()  # pop() from the end = submit in call order
    try:
        while todo or pending:
            while todo and len(pending) < workers:
                i = todo.pop()
                pending[task.remote(*calls[i])] = i
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                i = pending.pop(ref)
                results[i] = ray.get(ref)
                if on_result is not None:
                    on_result(i, results[i])
    finally:
        for ref in pending:  # interrupted: no task keeps writing behind our back
            ray.cancel(ref)
    return [results[i] for i in range(len(calls))]


def run_calls(fn: Callable[..., Any], calls: list[tuple[Any, ...]], workers: int,
              on_result: Callable[[int, Any], None] | None = None, local: bool = False,
              stage: str = "this stage", command: str = "python -m pipeline run CONFIG --no-ray"
              ) -> list[Any]:
    """``fn(*call)`` for every call, results in call order: as Ray tasks (1 CPU each, retried,
    at most ``workers`` in flight, see :func:`run_bounded`), or one after another in this
    process when ``local`` (a run without Ray; ``stage`` and ``command`` word the error under
    torchrun)."""
    if not local:
        import ray

        return run_bounded(ray.remote(num_cpus=1, max_retries=2)(fn), calls, workers, on_result)
    require_one_process(stage, command)
    results = []
    for i, call in enumerate(calls):
        results.append(fn(*call))
        if on_result is not None:
            on_result(i, results[-1])
    return results


# -- progress -------------------------------------------------------------------------------------


class ShardProgress:
    """Per finalized shard: the bar moves, the tracker logs ``<stage>/shards_done`` and
    ``<stage>/samples_done``, and a planned fault (:mod:`pipeline.faults`) fires once its count
    is reached with shards still to go. A context manager (closes the bar)."""

    def __init__(self, stage: str, total: int, tracker: Any, enabled: bool = True,
                 fault: Fault | None = None) -> None:
        from tqdm.auto import tqdm

        self.stage, self.total, self.tracker, self.fault = stage, total, tracker, fault
        self.shards = self.samples = 0
        self._bar = tqdm(total=total, desc=f"{stage}: shards done", unit="shard",
                         disable=not enabled, dynamic_ncols=True)

    def done(self, samples: int) -> None:
        """One more shard finalized, holding ``samples`` samples."""
        self.shards += 1
        self.samples += samples
        self._bar.update(1)
        self.tracker.log({f"{self.stage}/shards_done": self.shards,
                          f"{self.stage}/samples_done": self.samples}, step=self.shards)
        if self.shards < self.total:
            raise_if_due(self.fault, self.shards)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> ShardProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- output figures -------------------------------------------------------------------------------


def split_counts(results: Iterable[dict[str, Any]], splits: Iterable[str],
                 tokens_per_sample: int | None = None) -> dict[str, SplitCounts]:
    """Shards, samples and bytes (and tokens, for code shards) per split of per-shard
    ``results`` (dicts with ``split``, ``samples``, ``bytes``)."""
    rows = list(results)
    out = {}
    for split in splits:
        mine = [r for r in rows if r["split"] == split]
        samples = sum(r["samples"] for r in mine)
        out[split] = SplitCounts(
            shards=len(mine), samples=samples, bytes=sum(r["bytes"] for r in mine),
            tokens=samples * tokens_per_sample if tokens_per_sample is not None else None)
    return out


def images_per_s(fresh: list[dict[str, Any]], seconds: float) -> float | None:
    """Samples written per second by the shards made in this call (``fresh`` results); None when
    every shard was reused (nothing was measured)."""
    written = sum(r["samples"] for r in fresh)
    return round(written / seconds, 2) if fresh and seconds > 0 else None


__all__ = ["ResourceError", "ShardProgress", "cluster_resources", "images_per_s", "require",
           "require_one_process", "run_bounded", "run_calls", "split_counts", "wait_for_room",
           "worker_count"]
