"""`ray job submit` against a real local head: the driver attaches to the cluster and runs the DAG.

The head is a child process in its own process group with its own temp dir, ended by killing
that group (never `ray stop`, which would kill the test session's own Ray too). Token auth is
switched off for this head and its clients, so the test does not depend on ~/.ray/auth_token.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port, wait_for_port
from tests.stages_for_tests import make_pipeline

RAY = str(Path(sys.executable).with_name("ray"))


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["RAY_AUTH_MODE"] = "disabled"
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # The job's `python` is this interpreter (the venv may not be activated).
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture
def ray_head():
    """A real Ray head with a dashboard (job server) on 127.0.0.1; yields its job address."""
    temp_dir = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")  # short: socket paths are capped
    # Every port explicit: the test session's own Ray already holds the defaults (e.g. the
    # dashboard agent's 52365), and a head whose agent cannot bind accepts no jobs.
    port, dash, agent, agent_grpc, env_agent, metrics = (free_port() for _ in range(6))
    with open(os.path.join(temp_dir, "head.log"), "wb") as log:
        proc = subprocess.Popen(
            [RAY, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
             f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
             f"--runtime-env-agent-port={env_agent}", f"--metrics-export-port={metrics}",
             "--num-cpus=1", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
            stdout=log, stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
    try:
        wait_for_port(dash, timeout=120)
        yield f"http://127.0.0.1:{dash}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _job_status(address: str, job_id: str) -> str:
    out = subprocess.run([RAY, "job", "status", "--address", address, job_id],
                         capture_output=True, text=True, env=_env(), timeout=120)
    for status in ("SUCCEEDED", "FAILED", "STOPPED", "RUNNING", "PENDING"):
        if f"'{job_id}' {status.lower()}" in out.stdout.lower() or status in out.stdout:
            return status
    return "UNKNOWN:" + out.stdout + out.stderr


def test_ray_job_submit_runs_the_dag(ray_head, tmp_path):
    root = tmp_path / "runs"
    job_id = f"pipeline-test-{os.getpid()}"
    runtime_env = {"excludes": [".venv", ".git", "runs", "wandb", "wandb-offline",
                                "**/__pycache__", "*.egg-info"]}
    config = tmp_path / "job.yaml"
    config.write_text("run: job\nalpha:\n  parts: 3\n")
    cmd = [RAY, "job", "submit", "--address", ray_head, "--submission-id", job_id, "--no-wait",
           "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--",
           "python", "-m", "tests.job_driver", "run", str(config), f"storage.root={root}",
           "tracking.mode=disabled"]
    # The job server answers before the head's agent is ready ("No available agent"): retry.
    deadline = time.time() + 180
    while True:
        submit = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=120)
        if submit.returncode == 0 or "No available agent" not in submit.stderr + submit.stdout \
                or time.time() > deadline:
            break
        time.sleep(2)
    assert submit.returncode == 0, submit.stdout + submit.stderr

    deadline, status = time.time() + 300, "PENDING"
    while time.time() < deadline and status in ("PENDING", "RUNNING"):
        time.sleep(2)
        status = _job_status(ray_head, job_id)
    logs = subprocess.run([RAY, "job", "logs", "--address", ray_head, job_id],
                          capture_output=True, text=True, env=_env(), timeout=120).stdout
    assert status == "SUCCEEDED", f"job ended {status}:\n{logs}"
    assert "RAY_ADDRESS = " in logs and "attaching to Ray cluster" in logs, logs

    # The outputs are where the driver's DAG put them, complete.
    from pipeline.config import load_config
    from pipeline.storage import Storage

    pipe = make_pipeline()
    cfg = load_config(str(config), [f"storage.root={root}", "tracking.mode=disabled"],
                      pipe.schema)
    rows = pipe.status(cfg, Storage())
    assert [r.state for r in rows] == ["done", "done", "done"]
    summary = json.loads(Path(rows[2].uri, "summary.json").read_text())
    assert summary == {"sum": (1 + 2 + 3) * 2}
