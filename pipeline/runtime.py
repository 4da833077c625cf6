"""Getting a Ray cluster: attach to the one a job was submitted to, or start an embedded one.

How Ray is started matters for more than where tasks run:

- **Ray Train needs the State API.** Train V2 starts a ``PlacementGroupCleaner`` actor per run
  that asks the State API (served by the dashboard process) every second whether the train
  controller is alive, to remove the run's placement group if the controller dies. With
  ``include_dashboard=False`` nothing serves it: every check fails ("Failed to query Ray Train
  Controller actor state", once a second for the whole run) and the cleanup it exists for
  cannot happen. The embedded Ray therefore always starts the dashboard, on 127.0.0.1 only.
- **The State API client must find *this* cluster.** Inside a worker it resolves the cluster
  from RAY_API_SERVER_ADDRESS / RAY_ADDRESS, else from ``/tmp/ray/ray_current_cluster`` (the
  last ``ray start``) or by scanning for ``gcs_server`` processes. On a machine with another Ray
  (a test head, a second run) that finds the wrong one or fails ("Found multiple active Ray
  instances"), so the workers get the address explicitly (:func:`worker_env_vars`).
- **A quiet console.** ``log_to_driver=False``: workers write their output to log files in the
  run folder (:mod:`pipeline.logs`); failures still reach the driver as exceptions. Ray's own
  loggers log warnings and errors only, and the notice Ray prints when it turns on token
  authentication for a new local cluster by default is muted (auth stays on). An attached
  cluster's auth is left alone.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from typing import Any

log = logging.getLogger("pipeline")

LOOPBACK = "127.0.0.1"

# Python warning filters for every Ray worker (PYTHONWARNINGS syntax: action:message:category;
# the message is matched literally against the start of the warning text). Library warnings
# only, each one exactly:
WORKER_WARNING_FILTERS = (
    # DeepSpeed 0.19's TorchBackend (deepspeed/comm/torch.py, get_all_gather_function /
    # get_reduce_scatter_function) binds the collectives that torch 2.13 deprecated; ZeRO calls
    # them every step, and the warning reappears whenever some library changes the warning
    # filters (which resets Python's "already shown" registry): hundreds of lines per run.
    "ignore:`torch.distributed.all_gather_into_tensor` is deprecated:FutureWarning",
    "ignore:`torch.distributed.reduce_scatter_tensor` is deprecated:FutureWarning",
)

_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by `ray job submit` for its driver
_AUTH_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"


def ray_target(ray_cfg: Any, environ: dict[str, str] | None = None) -> str | None:
    """The address to attach to, or None for an embedded local Ray.

    ``ray.address`` in the config wins; else RAY_ADDRESS, which ``ray job submit`` sets for the
    driver it launches.
    """
    env = os.environ if environ is None else environ
    return ray_cfg.address or env.get("RAY_ADDRESS") or None


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _job_env_vars(environ: dict[str, str]) -> dict[str, str]:
    """env_vars of the runtime env a submitted job already has (ours must not collide)."""
    raw = environ.get(_JOB_CONFIG_ENV)
    if not raw:
        return {}
    try:
        env_vars = (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}
    except (ValueError, AttributeError):
        return {}
    return dict(env_vars) if isinstance(env_vars, dict) else {}


def worker_env_vars(environ: dict[str, str] | None = None, *, api_server: str | None = None,
                    gcs_address: str | None = None) -> dict[str, str]:
    """Environment variables for every worker of this job (the ``runtime_env`` of ray.init).

    - PYTHONWARNINGS: :data:`WORKER_WARNING_FILTERS`, then the driver's own PYTHONWARNINGS (later
      entries win, so a user's explicit setting still applies).
    - RAY_TRAIN_ENABLE_PRINT_PATCH=0 (unless the driver sets it): print() is printed once.
    - RAY_API_SERVER_ADDRESS (embedded: the dashboard URL) or RAY_ADDRESS (attached: the GCS
      address), so Ray Train's State API queries reach this cluster and no other.

    Variables the submitted job's runtime env already sets are left to it (Ray refuses to merge
    a job's and a driver's runtime env that set the same variable).
    """
    env = os.environ if environ is None else environ
    warnings = ",".join([*WORKER_WARNING_FILTERS, *filter(None, [env.get("PYTHONWARNINGS")])])
    out = {"PYTHONWARNINGS": warnings,
           # Ray Train V2 replaces print() in its workers with a root-logger call that also
           # tees to the real print whenever sys.stdout is not sys.__stdout__, which in a Ray
           # worker it never is (Ray wraps it): every print came out twice. Plain print.
           "RAY_TRAIN_ENABLE_PRINT_PATCH": env.get("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")}
    if api_server:
        out["RAY_API_SERVER_ADDRESS"] = api_server
    elif gcs_address and "://" not in gcs_address and gcs_address != "auto":
        out["RAY_ADDRESS"] = gcs_address
    taken = _job_env_vars(env)
    return {k: v for k, v in out.items() if k not in taken}


def ray_init_kwargs(cfg: Any, environ: dict[str, str] | None = None, *,
                    dashboard_port: int | None = None) -> dict[str, Any]:
    """The keyword arguments :func:`ensure_ray` passes to ``ray.init`` (pure; for tests)."""
    env = os.environ if environ is None else environ
    common: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    address = ray_target(cfg.ray, env)
    if address:
        return {"address": address, **common,
                "runtime_env": {"env_vars": worker_env_vars(env, gcs_address=address)}}
    port = dashboard_port or free_port()
    # address="local" always starts a fresh embedded Ray, never a stray local cluster. Everything
    # on loopback: nothing outside this machine needs to reach a single-node Ray.
    return {"address": "local", "num_cpus": cfg.ray.num_cpus, **common,
            "include_dashboard": True, "dashboard_host": LOOPBACK, "dashboard_port": port,
            "_node_ip_address": LOOPBACK,
            "runtime_env": {"env_vars": worker_env_vars(
                env, api_server=f"http://{LOOPBACK}:{port}")}}


def ensure_ray(cfg: Any) -> None:
    """Initialise Ray once per process (no-op when already initialised, e.g. in tests)."""
    import ray

    if ray.is_initialized():
        return
    kwargs = ray_init_kwargs(cfg)
    if kwargs["address"] != "local":
        log.info("attaching to Ray cluster at %s", kwargs["address"])
        ray.init(**kwargs)
    else:
        if not getattr(cfg.ray, "dashboard", True):
            log.debug("ray.dashboard=false ignored: Ray Train's State API needs the dashboard")
        log.info("starting embedded Ray (num_cpus=%s)", cfg.ray.num_cpus or "all")
        # A new local cluster gets token auth by default (RAY_AUTH_MODE unset) and Ray prints a
        # WARNING saying so at every start; that notice only, not auth itself, is muted here.
        notice = logging.getLogger(_AUTH_NOTICE_LOGGER)
        level = notice.level
        if "RAY_AUTH_MODE" not in os.environ:
            notice.setLevel(logging.ERROR)
        try:
            context = ray.init(**kwargs)
        finally:
            notice.setLevel(level)
        log.info("Ray dashboard: %s", context.dashboard_url and f"http://{context.dashboard_url}")
    _quiet_ray_data_console()
    res = ray.cluster_resources()
    log.info("Ray resources: %s", {k: v for k, v in res.items() if not k.startswith("node:")})


# Ray Data console records that are notices about our own settings, not problems.
_RAY_DATA_NOTICES = (
    "Progress bars disabled.",  # stages count shards themselves and turn Ray Data's bars off
)


def _not_a_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_RAY_DATA_NOTICES)


def _quiet_ray_data_console() -> None:
    """Ray Data logs every dataset execution at INFO to the console; keep warnings only there,
    minus :data:`_RAY_DATA_NOTICES`. Its file log in the Ray session folder
    (``logs/ray-data``) keeps everything.
    """
    import ray.data  # noqa: F401  (configures the "ray.data" logger on import)

    for h in logging.getLogger("ray.data").handlers:
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            h.setLevel(max(h.level, logging.WARNING))
            if _not_a_notice not in h.filters:
                h.addFilter(_not_a_notice)
