"""Getting a Ray cluster: attach to the one a job was submitted to, or start an embedded one."""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger("pipeline")


def ray_target(ray_cfg: Any, environ: dict[str, str] | None = None) -> str | None:
    """The address to attach to, or None for an embedded local Ray.

    ``ray.address`` in the config wins; else RAY_ADDRESS, which ``ray job submit`` sets for the
    driver it launches.
    """
    env = os.environ if environ is None else environ
    return ray_cfg.address or env.get("RAY_ADDRESS") or None


def ensure_ray(cfg: Any) -> None:
    """Initialise Ray once per process (no-op when already initialised, e.g. in tests)."""
    import ray

    if ray.is_initialized():
        return
    address = ray_target(cfg.ray)
    if address:
        log.info("attaching to Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        # address="local" always starts a fresh embedded Ray, never a stray local cluster.
        log.info("starting embedded Ray (num_cpus=%s)", cfg.ray.num_cpus or "all")
        ray.init(address="local", num_cpus=cfg.ray.num_cpus,
                 include_dashboard=cfg.ray.dashboard, log_to_driver=True)
    res = ray.cluster_resources()
    log.info("Ray resources: %s", {k: v for k, v in res.items() if not k.startswith("node:")})
