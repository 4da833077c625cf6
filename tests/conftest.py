"""Shared fixtures: one local Ray per test session, a moto S3 server on 127.0.0.1, secrets markers.

Credentials for the S3 server are fake and set before Ray starts, so Ray workers inherit them the
way a real cluster's workers inherit instance-role or environment credentials. The secret value is
a marker string that tests grep for in every file the pipeline writes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

AWS_SECRET_MARKER = "AWS-SECRET-MARKER-6f1d0c"
REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing-key-id")
os.environ["AWS_SECRET_ACCESS_KEY"] = AWS_SECRET_MARKER
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_PROFILE", None)
os.environ.pop("WANDB_API_KEY", None)
os.environ["WANDB_SILENT"] = "true"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# FID's InceptionV3 runs at a few images/s on 2 CPU cores: off for the stages the suite runs
# (recorded there as absent); tests/test_fid*.py turn it on where they measure it.
os.environ["TAMING_FID"] = "0"
# Ray Train's controller acts once per health-check interval (default 2 s): starting, finishing,
# noticing a dead worker and shutting down each wait for it, ~5 s per fit. Missed checks are
# tolerated for RAY_TRAIN_WORKER_HEALTH_CHECK_TIMEOUT_S (10 min), so polling faster is safe.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
# One actor process less per fit (~1 s of a 2-core machine): it watches for spot-instance
# preemption notices, which a test machine never gets.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.pop("RAY_ADDRESS", None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray for the whole test session (2 CPUs, loopback only)."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False,
                 _node_ip_address="127.0.0.1", log_to_driver=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A real S3-compatible HTTP server (moto_server) on 127.0.0.1:<free port>."""
    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    with open(tmp_path_factory.mktemp("moto") / "moto.log", "wb") as log:
        proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_port(port)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A new empty bucket; returns its s3:// URI."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(params=["local", "s3"])
def any_root(request, tmp_path):
    """(storage root URI, endpoint_url) on a local folder and on the moto S3 server."""
    if request.param == "local":
        return str(tmp_path / "runs"), None
    endpoint = request.getfixturevalue("s3_endpoint")
    bucket = request.getfixturevalue("s3_bucket")
    return f"{bucket}/runs", endpoint
