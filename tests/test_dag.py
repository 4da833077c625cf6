"""The DAG contract with test-only stages on a local root and on the moto S3 root."""

from __future__ import annotations

import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.dag import SelectionError, StageFailed, fingerprint
from pipeline.storage import MANIFEST, Storage, join
from tests.stages_for_tests import CALLS, make_pipeline


def _cfg(root: str, endpoint: str | None, *overrides: str):
    pipe = make_pipeline()
    base = ["run=t", f"storage.root={root}", "tracking.mode=disabled"]
    if endpoint:
        base.append(f"storage.endpoint_url={endpoint}")
    return pipe, load_config(None, base + list(overrides), pipe.schema)


def _storage(endpoint: str | None) -> Storage:
    return Storage(endpoint_url=endpoint)


@pytest.fixture(autouse=True)
def _reset_calls():
    CALLS.clear()


def test_full_run_then_cached(ray_session, any_root):
    root, endpoint = any_root
    pipe, cfg = _cfg(root, endpoint)
    first = pipe.run(cfg)
    assert dict(CALLS) == {"alpha": 1, "beta": 1, "gamma": 1}
    assert first["gamma"]["outputs"] == {"sum": (1 + 2 + 3 + 4) * 2}
    storage = _storage(endpoint)
    for p in pipe.plan(cfg):
        assert p.uri.endswith(f"/t/{p.stage.name}-{p.fingerprint[:12]}")
        assert storage.read_manifest(p.uri)["fingerprint"] == p.fingerprint
    run_json = storage.read_json(join(pipe.run_uri(cfg), "run.json"))
    assert run_json["config"]["alpha"]["parts"] == 4
    assert set(run_json["stages"]) == {"alpha", "beta", "gamma"}

    second = pipe.run(cfg)
    assert dict(CALLS) == {"alpha": 1, "beta": 1, "gamma": 1}, "cached stages must not run"
    assert second == first
    assert [r.state for r in pipe.status(cfg, storage)] == ["done"] * 3


def test_resume_after_failure_halfway(ray_session, any_root):
    root, endpoint = any_root
    pipe, cfg = _cfg(root, endpoint, "alpha.fail_after=2")
    storage = _storage(endpoint)
    with pytest.raises(StageFailed, match="'alpha'"):
        pipe.run(cfg)
    alpha = pipe.plan(cfg)[0]
    assert storage.read_manifest(alpha.uri) is None
    assert not storage.exists(join(alpha.uri, MANIFEST))
    assert [r.state for r in pipe.status(cfg, storage)] == ["partial", "pending", "pending"]

    # fail_after is a test hook outside the fingerprint: the same folder is resumed.
    pipe, cfg = _cfg(root, endpoint)
    assert pipe.plan(cfg)[0].uri == alpha.uri
    out = pipe.run(cfg)
    assert out["alpha"]["outputs"]["reused"] == 2
    assert out["alpha"]["resumed"] is True
    assert out["gamma"]["outputs"]["sum"] == 20


def test_config_change_reruns_that_stage_and_downstream_only(ray_session, tmp_path):
    pipe, cfg = _cfg(str(tmp_path), None)
    before = pipe.run(cfg)
    CALLS.clear()
    pipe, cfg2 = _cfg(str(tmp_path), None, "beta.scale=3")
    after = pipe.run(cfg2)
    assert dict(CALLS) == {"beta": 1, "gamma": 1}
    assert after["alpha"] == before["alpha"]
    assert after["beta"]["uri"] != before["beta"]["uri"]
    assert after["gamma"]["uri"] != before["gamma"]["uri"]
    assert after["gamma"]["outputs"]["sum"] == 30
    # A field outside the fingerprint changes nothing.
    CALLS.clear()
    pipe, cfg3 = _cfg(str(tmp_path), None, "beta.scale=3", "beta.log_every=1")
    assert pipe.run(cfg3) == after
    assert not CALLS


def test_upstream_continued_in_place_reruns_downstream(ray_session, tmp_path):
    pipe, cfg = _cfg(str(tmp_path), None)
    before = pipe.run(cfg)
    CALLS.clear()
    pipe, more = _cfg(str(tmp_path), None, "alpha.bonus=2")  # like raising `steps`
    after = pipe.run(more)
    assert dict(CALLS) == {"alpha": 1, "beta": 1, "gamma": 1}
    assert [after[n]["uri"] for n in after] == [before[n]["uri"] for n in before], "same folders"
    assert after["alpha"]["outputs"]["reused"] == 4, "continued, not started over"
    assert after["gamma"]["outputs"]["sum"] == sum(range(1, 7)) * 2
    CALLS.clear()
    assert pipe.run(more) == after and not CALLS


def test_fingerprint_inputs():
    a = fingerprint("s", {"x": 1}, {"up": "f"}, 1)
    assert a == fingerprint("s", {"x": 1}, {"up": "f"}, 1)
    assert len({a, fingerprint("s", {"x": 2}, {"up": "f"}, 1),
                fingerprint("s", {"x": 1}, {"up": "g"}, 1),
                fingerprint("s", {"x": 1}, {"up": "f"}, 2),
                fingerprint("t", {"x": 1}, {"up": "f"}, 1),
                fingerprint("s", {"x": 1}, {"up": "f"}, 1, seed=1)}) == 6


def test_selection_flags(ray_session, tmp_path):
    pipe, cfg = _cfg(str(tmp_path), None)
    assert pipe.select(only=["beta"]) == ["beta"]
    assert pipe.select(from_="beta") == ["beta", "gamma"]
    assert pipe.select(until="beta") == ["alpha", "beta"]
    assert pipe.select(from_="beta", until="beta") == ["beta"]
    with pytest.raises(SelectionError, match="unknown stage 'nope'"):
        pipe.select(only=["nope"])

    # --only on a stage whose upstream is not complete: clear error, nothing run.
    with pytest.raises(SelectionError, match="needs 'alpha'"):
        pipe.run(cfg, only=["beta"])
    assert not CALLS

    out = pipe.run(cfg, until="beta")
    assert set(out) == {"alpha", "beta"} and dict(CALLS) == {"alpha": 1, "beta": 1}
    out = pipe.run(cfg, from_="beta")
    assert set(out) == {"beta", "gamma"} and dict(CALLS) == {"alpha": 1, "beta": 1, "gamma": 1}

    CALLS.clear()
    beta_finished = out["beta"]["finished_at"]
    out = pipe.run(cfg, force=["beta"])
    assert dict(CALLS) == {"beta": 1}, "--force reruns only the named stage"
    assert out["beta"]["started_at"] >= beta_finished
    CALLS.clear()
    pipe.run(cfg, only=["gamma"], force=["gamma"])
    assert dict(CALLS) == {"gamma": 1}


def _cli(tmp_path, command: str, *args: str) -> int:
    config = tmp_path / "test.yaml"
    config.write_text("run: cli\nalpha:\n  value: 1\n")
    return main([command, str(config), *args], pipeline_factory=make_pipeline)


def test_cli_run_status_and_bad_config(ray_session, tmp_path, capsys):
    root = tmp_path / "runs"
    common = [f"storage.root={root}", "tracking.mode=disabled", "run=cli"]
    assert _cli(tmp_path, "run", *common, "no_such.key=1") == 2
    assert "no_such.key" in capsys.readouterr().err
    assert _cli(tmp_path, "run", *common, "alpha.parts=zero") == 2
    assert "alpha.parts" in capsys.readouterr().err
    assert _cli(tmp_path, "run", *common, "alpha.parts=0") == 2
    assert "alpha.parts: must be >= 1" in capsys.readouterr().err
    assert _cli(tmp_path, "run", *common, "--only", "nope") == 2
    assert "nope" in capsys.readouterr().err
    assert not root.exists(), "a bad config or flag must write nothing"

    assert _cli(tmp_path, "status", *common) == 0
    out = capsys.readouterr().out
    assert out.count("pending") == 3 and "alpha-" in out

    assert _cli(tmp_path, "run", *common, "alpha.fail_after=1") == 1
    assert "stage 'alpha' failed" in capsys.readouterr().err
    assert _cli(tmp_path, "status", *common) == 0
    assert "partial" in capsys.readouterr().out

    # Overrides may follow flags.
    assert _cli(tmp_path, "run", "--until", "beta", *common) == 0
    capsys.readouterr()
    assert _cli(tmp_path, "status", *common) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[1] for ln in lines[1:]] == ["done", "done", "pending"]
