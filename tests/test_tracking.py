"""Tracking: W&B offline runs on disk (one per stage, resumable ids), and no secret anywhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.dag import StageFailed
from pipeline.storage import Storage, normalize_root
from pipeline.tracking import NullTracker, TrackerSpec, resolve_mode, wandb_run_id
from tests.conftest import AWS_SECRET_MARKER
from tests.stages_for_tests import make_pipeline

WANDB_KEY_MARKER = "WANDB-KEY-MARKER-" + "0" * 23  # W&B wants 40 characters


def test_resolve_mode():
    assert resolve_mode("auto", {"WANDB_API_KEY": "k"}) == "online"
    assert resolve_mode("auto", {}) == "offline"
    assert resolve_mode("offline", {"WANDB_API_KEY": "k"}) == "offline"
    spec = TrackerSpec("disabled", "p", None, "/tmp", "id", "n", "g", "j")
    assert isinstance(spec.create(), NullTracker)


_RUN_DIR = re.compile(r"offline-run-\d{8}_\d{6}-(?P<id>[a-z_]+-[0-9a-f]{16})(?:-\d+)?")


def _offline_runs(wandb_dir: Path) -> dict[str, list[Path]]:
    """W&B run id → its offline-run folders (one per process that opened it).

    Folders are ``offline-run-YYYYmmdd_HHMMSS-<id>``; when a resumed run opens within the same
    second as the first, W&B appends ``-1`` to keep the folder names apart, so strip that.
    """
    runs: dict[str, list[Path]] = {}
    for d in sorted((wandb_dir / "wandb").glob("offline-run-*")):
        m = _RUN_DIR.fullmatch(d.name)
        assert m, f"unexpected W&B folder {d.name}"
        run_id = m.group("id")
        runs.setdefault(run_id, []).append(d)
    return runs


def test_wandb_offline_one_run_per_stage_and_resumed_id(ray_session, tmp_path):
    pipe = make_pipeline()
    common = ["run=wb", f"storage.root={tmp_path}", "tracking.mode=offline"]
    cfg = load_config(None, common + ["alpha.fail_after=1"], pipe.schema)
    with pytest.raises(StageFailed):
        pipe.run(cfg)
    cfg = load_config(None, common, pipe.schema)
    pipe.run(cfg)

    runs = _offline_runs(tmp_path / "wb" / "wandb")
    plan = {p.stage.name: p for p in pipe.plan(cfg)}
    expected = {wandb_run_id(normalize_root(str(tmp_path)), "wb", n, p.fingerprint): n
                for n, p in plan.items()}
    assert set(runs) == set(expected), "one W&B run per stage, id derived from its fingerprint"
    for run_id, name in expected.items():
        assert len(runs[run_id]) == (2 if name == "alpha" else 1), "resumed stage reuses its id"
        data = b"".join(f.read_bytes() for d in runs[run_id] for f in d.glob("*.wandb"))
        # The run record and the attached config travel as plain strings in the log.
        assert name.encode() in data and b"wb" in data
        assert plan[name].fingerprint.encode() in data
    alpha_log = b"".join(f.read_bytes() for d in runs[next(k for k, v in expected.items()
                                                          if v == "alpha")]
                         for f in d.glob("*.wandb"))
    assert b"reused" in alpha_log, "stage metrics are logged"


def _grep_tree(folder: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for f in folder.rglob("*"):
        if f.is_file():
            data = f.read_bytes()
            hits += [f"{f}: {n!r}" for n in needles if n in data]
    return hits


@pytest.mark.parametrize("where", ["local", "s3"])
def test_no_secret_in_any_output(ray_session, tmp_path, monkeypatch, where, request):
    monkeypatch.setenv("WANDB_API_KEY", WANDB_KEY_MARKER)
    pipe = make_pipeline()
    overrides = ["run=sec", "tracking.mode=offline", f"tracking.dir={tmp_path / 'wandb'}"]
    if where == "s3":
        endpoint = request.getfixturevalue("s3_endpoint")
        root = request.getfixturevalue("s3_bucket")
        overrides += [f"storage.root={root}", f"storage.endpoint_url={endpoint}"]
    else:
        root = str(tmp_path / "runs")
        overrides += [f"storage.root={root}"]
    cfg = load_config(None, overrides + ["alpha.fail_after=2"], pipe.schema)
    with pytest.raises(StageFailed):
        pipe.run(cfg)  # a failure path writes logs too
    pipe.run(load_config(None, overrides, pipe.schema))

    needles = [AWS_SECRET_MARKER.encode(), WANDB_KEY_MARKER.encode()]
    assert _grep_tree(tmp_path, needles) == []
    storage = Storage(endpoint_url=cfg.storage.endpoint_url)
    files = storage.walk_files(root)
    assert any(f.endswith("run.json") for f in files) and len(files) >= 8
    leaks = [f for f in files for n in needles if n in storage.read_bytes(f)]
    assert leaks == []
