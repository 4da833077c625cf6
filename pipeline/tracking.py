"""Experiment tracking: a small Tracker protocol with a no-op and a W&B implementation.

One W&B run per stage, grouped by the pipeline run, ``job_type`` = stage name, the resolved config
attached. The run id is derived from (storage root, run, stage, fingerprint), so a resumed stage
resumes the same W&B run. ``wandb`` is imported lazily: nothing heavy at import time.

A :class:`TrackerSpec` is a plain picklable description, so a Ray Train worker (rank 0) can build
the same tracker the driver would.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Tracker(Protocol):
    def log(self, metrics: dict[str, Any], step: int | None = None) -> None: ...

    def log_images(self, images: dict[str, Any], step: int | None = None) -> None:
        """``images``: name → local PNG path or HWC uint8 array."""

    def summary(self, values: dict[str, Any]) -> None: ...

    def finish(self) -> None: ...


class NullTracker:
    """Tracks nothing (tests, ``tracking.mode=disabled``, non-zero ranks)."""

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        pass

    def log_images(self, images: dict[str, Any], step: int | None = None) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


def resolve_mode(mode: str, environ: dict[str, str] | None = None) -> str:
    """``auto`` → ``online`` when WANDB_API_KEY is set, else ``offline``."""
    env = os.environ if environ is None else environ
    if mode == "auto":
        return "online" if env.get("WANDB_API_KEY") else "offline"
    return mode


def wandb_run_id(root: str, run: str, stage: str, fingerprint: str) -> str:
    """Stable id: the same stage output resumes the same W&B run."""
    digest = hashlib.sha256(f"{root}\n{run}\n{stage}\n{fingerprint}".encode()).hexdigest()
    return f"{stage}-{digest[:16]}"


@dataclass
class TrackerSpec:
    """Everything needed to open a stage's tracker, in any process."""

    mode: str  # online | offline | disabled (already resolved)
    project: str
    entity: str | None
    dir: str
    run_id: str
    name: str
    group: str
    job_type: str
    config: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)

    def create(self) -> Tracker:
        if self.mode == "disabled":
            return NullTracker()
        return WandbTracker(self)


class WandbTracker:
    """A W&B run (resumed when the id exists). Offline files go to ``spec.dir``."""

    def __init__(self, spec: TrackerSpec) -> None:
        import wandb  # lazy: slow import, optional at runtime

        os.makedirs(spec.dir, exist_ok=True)
        self._wandb = wandb
        self.run = wandb.init(
            project=spec.project,
            entity=spec.entity,
            dir=spec.dir,
            id=spec.run_id,
            name=spec.name,
            group=spec.group,
            job_type=spec.job_type,
            config=spec.config,
            tags=spec.tags or None,
            mode=spec.mode,
            resume="allow",
            reinit="create_new",
            settings=wandb.Settings(console="off", quiet=True, silent=True),
        )
        log.info("W&B %s run %s in %s", spec.mode, spec.run_id, spec.dir)

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.run.log(metrics, step=step)

    def log_images(self, images: dict[str, Any], step: int | None = None) -> None:
        self.run.log({k: self._wandb.Image(v) for k, v in images.items()}, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        for k, v in values.items():
            self.run.summary[k] = v

    def finish(self) -> None:
        self.run.finish()
