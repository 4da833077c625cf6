"""The stage graph: fingerprints, content-addressed outputs, cached skip, resume, selection.

Contract (README, "Where outputs go, and how resume works"):

- fingerprint = sha256 of canonical JSON of (stage name, the stage's own config without fields
  marked ``fingerprint=False``, upstream fingerprints, the stage's output format version, the
  run's global seed);
- outputs live under ``<root>/<run>/<stage>-<fingerprint[:12]>/``;
- a stage whose ``_manifest.json`` exists and parses is complete and is skipped (cached); the
  runner writes the manifest after the stage function returns, so a stage that raised leaves
  none, and the next run calls it again in the same folder (the stage resumes from what it left);
- downstream stages read their inputs from upstream manifests only (``ctx.inputs``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

from pipeline import __version__
from pipeline.config import canonical_json, fingerprint_view, make_schema, to_dict
from pipeline.manifests import Record
from pipeline.storage import MANIFEST, Storage, is_local, join, normalize_root
from pipeline.tracking import NullTracker, Tracker, TrackerSpec, resolve_mode, wandb_run_id

log = logging.getLogger("pipeline")


@dataclass(frozen=True)
class Stage:
    """One node of the DAG.

    ``run(ctx)`` does the work in ``ctx.uri`` and returns what goes into the manifest: an
    ``outputs`` record (:mod:`pipeline.manifests`; output URIs, counts, metrics) or a JSON-able
    dict. It must be resumable: called again after a crash in the same folder, it reuses what was
    finalized there. Bump ``version`` when the output format changes, so old outputs are not
    reused. ``is_complete`` and ``report`` get the outputs as that record (``outputs``), or as
    the dict when the stage declares none.
    """

    name: str
    config: type
    run: Callable[[StageContext], Record | dict[str, Any] | None]
    upstream: tuple[str, ...] = ()
    version: int = 1
    needs_ray: bool = True
    help: str = ""
    # Optional: are these finished outputs still what the config asks for? (e.g. a training
    # stage whose `steps` was raised, which is outside the fingerprint: not complete, so it runs
    # again in the same folder and continues from its newest checkpoint.)
    is_complete: Callable[[Any, Any], bool] | None = None
    # Optional: the stage's part of the run's report.html, from its manifest's outputs:
    # {"metrics": {label: value}, "images": [(caption, uri), ...]} (pipeline/report.py).
    report: Callable[[Any], dict[str, Any]] | None = None
    # The record type of its outputs (pipeline.manifests); None: a plain dict.
    outputs: type[Record] | None = None
    # Optional: why a run with this (whole) config does not need the stage, or None when it does
    # (the condition VQGAN of a run without conditions). Such a stage is left out of the run: no
    # folder, no manifest, and no part of its downstream stages' fingerprints.
    skip_reason: Callable[[Any], str | None] | None = None
    # Upstream stages it reads when the pipeline has them (tokenize: train_cond_vqgan); a
    # pipeline built without one runs the stage as if the name were not in ``upstream``.
    optional_upstream: tuple[str, ...] = ()

    def parse_outputs(self, manifest: dict[str, Any]) -> Any:
        """A finished manifest's outputs as this stage's record (ManifestError when a field is
        missing), or the plain dict when the stage declares no record."""
        raw = manifest.get("outputs", {})
        if self.outputs is None:
            return raw
        return self.outputs.from_dict(raw, f"{self.name} outputs ({manifest.get('uri', '?')})")


def stage_folder(run_uri: str, name: str, fingerprint: str) -> str:
    """Where a stage with this fingerprint keeps its outputs: ``<run>/<name>-<fp[:12]>``. The one
    folder rule; readers that find stages by folder (``pipeline sample RUN``) use it too."""
    return join(run_uri, f"{name}-{fingerprint[:12]}")


def stage_of_folder(folder_name: str) -> str | None:
    """The stage name of a folder named by :func:`stage_folder` (its last path part), or None."""
    m = re.fullmatch(r"(.+)-[0-9a-f]{12}", folder_name)
    return m.group(1) if m else None


@dataclass
class StageContext:
    """What a stage function gets: its config section, folder, inputs, storage and tracker."""

    name: str
    fingerprint: str
    uri: str
    cfg: Any  # the stage's own config section
    root_cfg: Any  # the whole resolved config
    storage: Storage
    inputs: dict[str, dict[str, Any]]  # upstream stage name → its manifest (raw JSON)
    tracker_spec: TrackerSpec | None = None
    # True: no Ray in this run; the stage works in this process (training on the local loop,
    # shard and tokenize serially). See Pipeline.run(local=...).
    local: bool = False
    # upstream stage name → its Stage (to read its outputs as a record: ``input``)
    upstream_stages: dict[str, Stage] = field(default_factory=dict, repr=False)
    _tracker: Tracker | None = field(default=None, repr=False)

    def has_input(self, name: str) -> bool:
        """Whether upstream ``name`` is part of this run (False: its ``skip_reason`` applies)."""
        return name in self.inputs

    def input(self, name: str) -> Any:
        """Upstream stage ``name``'s outputs, typed (its ``Stage.outputs`` record)."""
        if name not in self.inputs:
            raise KeyError(f"stage {self.name!r} has no upstream {name!r} "
                           f"(upstream: {', '.join(self.inputs) or 'none'})")
        stage = self.upstream_stages.get(name)
        manifest = self.inputs[name]
        return stage.parse_outputs(manifest) if stage else manifest.get("outputs", {})

    @property
    def tracker(self) -> Tracker:
        """The stage's tracker, opened on first use (driver side)."""
        if self._tracker is None:
            self._tracker = self.tracker_spec.create() if self.tracker_spec else NullTracker()
        return self._tracker

    def close(self) -> None:
        if self._tracker is not None:
            self._tracker.finish()
            self._tracker = None


@dataclass
class PlannedStage:
    stage: Stage
    fingerprint: str
    uri: str
    skipped: str | None = None  # why this run leaves the stage out (Stage.skip_reason)


@dataclass
class StageStatus:
    name: str
    state: str  # done | partial | pending | skipped
    uri: str
    fingerprint: str
    finished_at: str | None = None
    seconds: float | None = None
    reason: str | None = None  # skipped: why the run leaves the stage out


class StageFailed(RuntimeError):
    def __init__(self, stage: str, cause: BaseException) -> None:
        self.stage = stage
        self.cause = cause
        super().__init__(f"stage {stage!r} failed: {type(cause).__name__}: {cause}")


class SelectionError(ValueError):
    """Bad --only/--from/--until/--force, or a selected stage whose upstream is not complete."""


def fingerprint(name: str, section: Any, upstream: dict[str, str], version: int,
                seed: int = 0) -> str:
    """sha256 hex of the stage's identity (see module docstring). The run's global ``seed`` is
    part of it: every stage draws its randomness from it."""
    payload = {
        "stage": name,
        "config": fingerprint_view(section),
        "upstream": dict(sorted(upstream.items())),
        "version": version,
        "seed": seed,
    }
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()


def outputs_digest(manifest: dict[str, Any]) -> str:
    """Identity of a finished stage's outputs (changes when it finishes again differently)."""
    payload = {"outputs": manifest.get("outputs"), "finished_at": manifest.get("finished_at")}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:16]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Pipeline:
    """An ordered set of stages with their upstream links."""

    def __init__(self, stages: Iterable[Stage]) -> None:
        self.stages: dict[str, Stage] = {}
        for s in stages:
            if s.name in self.stages:
                raise ValueError(f"duplicate stage {s.name!r}")
            s = replace(s, upstream=tuple(u for u in s.upstream if u in self.stages
                                          or u not in s.optional_upstream))
            for up in s.upstream:
                if up not in self.stages:
                    raise ValueError(f"stage {s.name!r}: upstream {up!r} must be listed before it")
            self.stages[s.name] = s
        self.order = list(self.stages)
        self.schema = make_schema({name: s.config for name, s in self.stages.items()})

    # -- planning ------------------------------------------------------------------------------

    def run_uri(self, cfg: Any) -> str:
        return join(normalize_root(cfg.storage.root), cfg.run)

    def plan(self, cfg: Any) -> list[PlannedStage]:
        """Fingerprint and output URI of every stage, in order; a stage the run skips
        (``Stage.skip_reason``) is planned with its reason and is no upstream of any other."""
        fps: dict[str, str] = {}
        out = []
        for name in self.order:
            stage = self.stages[name]
            fp = fingerprint(name, getattr(cfg, name),
                             {u: fps[u] for u in stage.upstream if u in fps},
                             stage.version, cfg.seed)
            skipped = stage.skip_reason(cfg) if stage.skip_reason else None
            if skipped is None:
                fps[name] = fp
            out.append(PlannedStage(stage, fp, stage_folder(self.run_uri(cfg), name, fp),
                                    skipped))
        return out

    def _check_names(self, names: Iterable[str], flag: str) -> None:
        for n in names:
            if n not in self.stages:
                raise SelectionError(
                    f"{flag}: unknown stage {n!r} (stages: {', '.join(self.order)})")

    def ancestors(self, name: str) -> set[str]:
        seen: set[str] = set()
        todo = list(self.stages[name].upstream)
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.add(n)
                todo.extend(self.stages[n].upstream)
        return seen

    def descendants(self, name: str) -> set[str]:
        return {n for n in self.order if name in self.ancestors(n)}

    def select(self, only: Iterable[str] = (), from_: str | None = None,
               until: str | None = None) -> list[str]:
        """Stages to consider, in order.

        ``only``: exactly those; ``from_``: that stage and everything downstream of it;
        ``until``: that stage and everything upstream of it. ``from_`` and ``until`` combine
        (intersection); ``only`` excludes both.
        """
        only = list(only)
        self._check_names(only, "--only")
        if from_:
            self._check_names([from_], "--from")
        if until:
            self._check_names([until], "--until")
        if only and (from_ or until):
            raise SelectionError("--only cannot be combined with --from/--until")
        chosen = set(self.order)
        if only:
            chosen = set(only)
        if from_:
            chosen &= {from_} | self.descendants(from_)
        if until:
            chosen &= {until} | self.ancestors(until)
        if not chosen:
            raise SelectionError(f"--from {from_} --until {until} selects no stage")
        return [n for n in self.order if n in chosen]

    # -- status --------------------------------------------------------------------------------

    def status(self, cfg: Any, storage: Storage) -> list[StageStatus]:
        rows = []
        for p in self.plan(cfg):
            if p.skipped is not None:
                rows.append(StageStatus(p.stage.name, "skipped", p.uri, p.fingerprint,
                                        reason=p.skipped))
                continue
            manifest = storage.read_manifest(p.uri)
            if manifest is not None:
                rows.append(StageStatus(p.stage.name, "done", p.uri, p.fingerprint,
                                        manifest.get("finished_at"), manifest.get("seconds")))
            elif storage.walk_files(p.uri):
                rows.append(StageStatus(p.stage.name, "partial", p.uri, p.fingerprint))
            else:
                rows.append(StageStatus(p.stage.name, "pending", p.uri, p.fingerprint))
        return rows

    # -- running -------------------------------------------------------------------------------

    def tracker_spec(self, cfg: Any, planned: PlannedStage) -> TrackerSpec:
        mode = resolve_mode(cfg.tracking.mode)
        root = normalize_root(cfg.storage.root)
        if cfg.tracking.dir:
            wandb_dir = normalize_root(cfg.tracking.dir)
        elif is_local(root):
            wandb_dir = join(self.run_uri(cfg), "wandb")
        else:  # W&B writes local files; an object-storage root cannot hold them
            wandb_dir = normalize_root(join("./wandb-offline", cfg.run))
        return TrackerSpec(
            mode=mode,
            project=cfg.tracking.project,
            entity=cfg.tracking.entity,
            dir=wandb_dir,
            run_id=wandb_run_id(root, cfg.run, planned.stage.name, planned.fingerprint),
            name=f"{cfg.run}/{planned.stage.name}",
            group=cfg.run,
            job_type=planned.stage.name,
            config={"pipeline": to_dict(cfg), "stage": planned.stage.name,
                    "fingerprint": planned.fingerprint},
        )

    def write_run_json(self, cfg: Any, storage: Storage, plan: list[PlannedStage]) -> str:
        uri = join(self.run_uri(cfg), "run.json")
        storage.write_json(uri, {
            "run": cfg.run,
            "package_version": __version__,
            "written_at": _now(),
            "config": to_dict(cfg),
            "stages": {p.stage.name: {"fingerprint": p.fingerprint, "uri": p.uri,
                                      "upstream": list(p.stage.upstream),
                                      "version": p.stage.version,
                                      **({"skipped": p.skipped} if p.skipped else {})}
                       for p in plan},
        })
        return uri

    def run(self, cfg: Any, storage: Storage | None = None, *, only: Iterable[str] = (),
            from_: str | None = None, until: str | None = None, force: Iterable[str] = (),
            on_ray: Callable[[Any], None] | None = None,
            local: bool = False) -> dict[str, dict[str, Any]]:
        """Run the selected stages; returns every selected stage's manifest.

        Complete stages are skipped unless named in ``force`` (their folder is then removed
        first). An upstream stage that is not selected must already be complete. ``on_ray`` is
        called once with ``cfg`` before the first stage that needs Ray actually runs; with
        ``local`` there is no Ray at all: every stage runs in this process
        (``StageContext.local``).
        Raises StageFailed naming the stage when one raises; it leaves no manifest.
        """
        storage = storage or Storage.from_config(cfg.storage)
        force = list(force)
        self._check_names(force, "--force")
        selected = self.select(only, from_, until)
        plan = {p.stage.name: p for p in self.plan(cfg)}
        self.write_run_json(cfg, storage, list(plan.values()))

        manifests: dict[str, dict[str, Any]] = {}
        ray_ready = False
        for name in selected:
            p = plan[name]
            if p.skipped is not None:
                log.info("[%s] not part of this run: %s", name, p.skipped)
                continue
            inputs: dict[str, dict[str, Any]] = {}
            for up in p.stage.upstream:
                if plan[up].skipped is not None:
                    continue
                m = manifests.get(up) or storage.read_manifest(plan[up].uri)
                if m is None:
                    raise SelectionError(
                        f"stage {name!r} needs {up!r}, which is not complete at {plan[up].uri}; "
                        f"run it first (drop --only/--from)")
                inputs[up] = m
            if name in force:
                log.info("[%s] --force: removing %s", name, p.uri)
                storage.rm(p.uri, recursive=True)
            else:
                cached = storage.read_manifest(p.uri)
                if cached is not None:
                    why = self.stale_reason(p.stage, cached, getattr(cfg, name), inputs)
                    if why is None:
                        log.info("[%s] cached: %s", name, p.uri)
                        manifests[name] = cached
                        continue
                    log.info("[%s] %s", name, why)
                    if why.startswith("upstream"):  # its partial outputs are stale too
                        storage.rm(p.uri, recursive=True)
                    else:  # continue in place: only the manifest goes
                        storage.rm(join(p.uri, MANIFEST))
            if p.stage.needs_ray and not ray_ready and on_ray is not None and not local:
                on_ray(cfg)
                ray_ready = True
            manifests[name] = self._run_one(cfg, storage, p, inputs, local)
        return manifests

    @staticmethod
    def stale_reason(stage: Stage, manifest: dict[str, Any], section: Any,
                     inputs: dict[str, dict[str, Any]]) -> str | None:
        """Why a finished stage must run again although its fingerprint matches, or None.

        An upstream stage can finish again in its own folder with new outputs (a training stage
        given more steps); downstream outputs made from the old ones are then stale.
        """
        recorded = manifest.get("upstream_outputs", {})
        for up, m in inputs.items():
            if up in recorded and recorded[up] != outputs_digest(m):
                return f"upstream {up!r} changed since this stage finished: redoing it"
        if stage.is_complete is not None and not stage.is_complete(stage.parse_outputs(manifest),
                                                                   section):
            return "outputs do not meet the config any more (e.g. more steps): continuing"
        return None

    def _run_one(self, cfg: Any, storage: Storage, p: PlannedStage,
                 inputs: dict[str, dict[str, Any]], local: bool = False) -> dict[str, Any]:
        name = p.stage.name
        # Another rank of a torchrun launch without Ray: it trains, rank 0 writes the outputs.
        secondary = local and os.environ.get("RANK", "0") != "0"
        resumed = bool(storage.walk_files(p.uri))
        log.info("[%s] %s: %s", name, "resuming" if resumed else "running", p.uri)
        ctx = StageContext(name=name, fingerprint=p.fingerprint, uri=p.uri,
                           cfg=getattr(cfg, name), root_cfg=cfg, storage=storage, inputs=inputs,
                           upstream_stages={u: self.stages[u] for u in inputs},
                           tracker_spec=None if secondary else self.tracker_spec(cfg, p),
                           local=local)
        started, t0 = _now(), time.perf_counter()
        # The driver opens the stage's tracker only after the stage function returned (or when
        # the function uses ctx.tracker itself): a training stage logs from its rank-0 worker
        # with the same run id, and two live writers of one W&B run would conflict.
        try:
            outputs = p.stage.run(ctx) or {}
            if isinstance(outputs, Record):
                outputs = outputs.to_dict()
        except Exception as e:
            log.error("[%s] failed after %.1fs; no manifest written, rerun to resume\n%s",
                      name, time.perf_counter() - t0, traceback.format_exc())
            ctx.tracker.summary({"state": "failed", "error": f"{type(e).__name__}: {e}"})
            ctx.close()
            raise StageFailed(name, e) from e
        seconds = round(time.perf_counter() - t0, 3)
        ctx.tracker.summary({"state": "done", "seconds": seconds, "resumed": resumed})
        ctx.close()
        manifest = {
            "stage": name,
            "fingerprint": p.fingerprint,
            "version": p.stage.version,
            "package_version": __version__,
            "uri": p.uri,
            "upstream": {u: m["fingerprint"] for u, m in inputs.items()},
            "upstream_outputs": {u: outputs_digest(m) for u, m in inputs.items()},
            "config": to_dict(getattr(cfg, name)),
            "started_at": started,
            "finished_at": _now(),
            "seconds": seconds,
            "resumed": resumed,
            "outputs": outputs,
        }
        if not secondary:
            storage.write_manifest(p.uri, manifest)
        log.info("[%s] done in %.1fs", name, seconds)
        return manifest


__all__ = ["MANIFEST", "Pipeline", "PlannedStage", "SelectionError", "Stage", "StageContext",
           "StageFailed", "StageStatus", "fingerprint", "stage_folder",
           "stage_of_folder"]
