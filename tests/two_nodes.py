"""A two-node Ray cluster on this one machine, for tests of node loss (fixture module, no tests).

Two ``ray start --block`` children, each in its own process group with its own short temp dir
and every port explicit on 127.0.0.1: a head (GCS, dashboard/job server) and a second node with
a custom resource ``node2`` so work can be pinned to it. ``kill_worker_node()`` kill -9's every
process of the second node's session: its process group (``ray start``, raylet, dashboard and
runtime-env agents, log monitor) and its core workers, which the raylet puts in process groups
of their own (same session).

Never ``ray stop`` here: it would kill every Ray process on the machine. Token auth is off for
this cluster and its clients (``RAY_AUTH_MODE=disabled``), and node-death detection by the GCS
is shortened to a few seconds (``RAY_health_check_*``, set on the head).

Use it from a test through the factory fixture::

    def test_x(two_node_cluster):
        cluster = two_node_cluster(head_cpus=1)          # started, both nodes alive
        subprocess.run([sys.executable, "driver.py", cluster.address], env=cluster.env())
        cluster.kill_worker_node()
        cluster.wait_for_nodes(1)

Import the fixture into the test module (``from tests.two_nodes import two_node_cluster``)
or a conftest. The test process itself should not ``ray.init`` this cluster if it also uses
the session's embedded Ray (one Ray per process): run drivers as subprocesses with ``env()``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port, wait_for_port

RAY = str(Path(sys.executable).with_name("ray"))

# GCS node-death detection: a raylet is declared dead after about
# initial_delay + threshold x period (+ timeout) of missed health checks. Ray's defaults
# (period 3 s, threshold 5, timeout 10 s) take ~15-30 s; these take ~2-4 s. Read by the GCS
# server, so they matter on the head's environment.
FAST_HEALTH_CHECK = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "2",
}


# `ray start --address=...` (a non-head node) with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 aborts,
# on Linux too: "Multi-node Ray clusters are not supported on Windows and OSX". With it =1,
# Ray rewrites every 127.0.0.1 (the --address host and --node-ip-address) to the machine's
# network address, where our loopback-only GCS does not listen. So the joining node runs the
# ordinary `ray` CLI with =0 in its environment (everything stays on 127.0.0.1), and only the
# CLI's own multi-node check sees the flag on.
_JOIN_ON_LOOPBACK = [sys.executable, "-c", """
import sys
import ray._private.ray_constants as rc
import ray.scripts.scripts as scripts

class _Constants:
    ENABLE_RAY_CLUSTER = True
    def __getattr__(self, name):
        return getattr(rc, name)

scripts.ray_constants = _Constants()
sys.argv[0] = "ray"
sys.exit(scripts.main())
"""]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_range(size: int, taken: set[int]) -> tuple[int, int]:
    """A block of ``size`` currently free ports below the kernel's ephemeral range (so that
    outgoing connections never take them), away from ``taken``."""
    rng = random.Random()
    for _ in range(200):
        lo = rng.randrange(20000, 32000 - size)
        block = range(lo, lo + size)
        if not taken.intersection(block) and all(_port_free(p) for p in block):
            return lo, lo + size - 1
    raise RuntimeError(f"no free block of {size} ports in 20000-32000")


def ray_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for Ray processes and clients of this cluster (no token auth, loopback)."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env["RAY_AUTH_MODE"] = "disabled"
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra or {})
    return env


class _Node:
    """One ``ray start --block`` child in its own process group."""

    def __init__(self, name: str, args: list[str], env: dict[str, str],
                 command: list[str] | None = None):
        self.name = name
        self.temp_dir = tempfile.mkdtemp(prefix=f"ray2{name[:1]}-", dir="/tmp")  # short paths
        self.log_path = os.path.join(self.temp_dir, f"{name}.log")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [*(command or [RAY]), "start", "--block", f"--temp-dir={self.temp_dir}",
                 "--disable-usage-stats", "--node-ip-address=127.0.0.1", *args],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.pgid = self.proc.pid  # start_new_session: the child leads its own group

    def pids(self) -> list[int]:
        """Live processes of this node: its session. The ``ray start`` child leads a new
        session and process group; the raylet, agents and log monitor stay in that group, but
        the raylet puts each core worker (``ray::IDLE``, ``ray::work``, actors) in a process
        group of its own (same session). A core worker whose raylet was killed exits by itself
        within ~1-3 s; we do not wait for that. Also anything whose command line names the
        node's temp dir."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            try:
                pgid = os.getpgid(pid)
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
                with open(f"/proc/{pid}/stat") as f:
                    state, _ppid, _pgrp, sid = f.read().rsplit(")", 1)[1].split()[:4]
            except (OSError, ProcessLookupError):
                continue
            if state == "Z":
                continue
            if self.pgid in (pgid, int(sid)) or self.temp_dir in cmd:
                found.append(pid)
        return found

    def kill(self, sig: int = signal.SIGKILL) -> None:
        pids = self.pids()  # before the group goes: the core workers are found by session
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, sig)
        for pid in pids + self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the group (ray start's --block handler then stops its children), then
        SIGKILL whatever is left, and reap the child."""
        if self.pids():
            self.kill(signal.SIGTERM)
            deadline = time.time() + grace
            while time.time() < deadline and self.pids():
                time.sleep(0.2)
            self.kill(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-n:]
        except OSError:
            return ""


class TwoNodeCluster:
    """A head and a second node (custom resource ``node2``) on 127.0.0.1, own ports/temp dirs.

    ``address`` is the GCS address (``ray.init(address=...)``), ``dashboard_url`` the job
    server. ``env()`` is the environment for drivers and CLI clients of this cluster.
    """

    def __init__(self, head_cpus: int = 1, node2_cpus: int = 1,
                 node2_resources: dict[str, float] | None = None,
                 env: dict[str, str] | None = None, fast_health_check: bool = True,
                 dashboard: bool = True):
        self.head_cpus, self.node2_cpus = head_cpus, node2_cpus
        self.node2_resources = {"node2": 1} if node2_resources is None else node2_resources
        self.dashboard = dashboard
        self._extra_env = dict(FAST_HEALTH_CHECK if fast_health_check else {})
        self._extra_env.update(env or {})
        self.head: _Node | None = None
        self.node2: _Node | None = None
        taken: set[int] = set()

        def ports(n: int) -> list[int]:
            out = []
            while len(out) < n:
                p = free_port()
                if p not in taken:
                    taken.add(p)
                    out.append(p)
            return out

        (self.gcs_port, self.dashboard_port, self.client_port, *self._head_ports) = ports(9)
        self._node2_ports = ports(6)
        self._head_workers = _free_range(40, taken)
        taken.update(range(self._head_workers[0], self._head_workers[1] + 1))
        self._node2_workers = _free_range(40, taken)

    # -- addresses ---------------------------------------------------------------------------
    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """For drivers/CLIs: our env plus ``RAY_ADDRESS`` = the GCS address."""
        env = ray_env({**self._extra_env, **(extra or {})})
        env["RAY_ADDRESS"] = self.address
        return env

    # -- lifecycle ---------------------------------------------------------------------------
    @staticmethod
    def _node_args(ports: list[int], workers: tuple[int, int]) -> list[str]:
        nm, om, metrics, agent, agent_grpc, env_agent = ports
        return [f"--node-manager-port={nm}", f"--object-manager-port={om}",
                f"--metrics-export-port={metrics}", f"--dashboard-agent-listen-port={agent}",
                f"--dashboard-agent-grpc-port={agent_grpc}",
                f"--runtime-env-agent-port={env_agent}",
                f"--min-worker-port={workers[0]}", f"--max-worker-port={workers[1]}"]

    def start(self, timeout: float = 120.0) -> TwoNodeCluster:
        t0 = time.time()
        env = ray_env(self._extra_env)
        head_args = ["--head", f"--port={self.gcs_port}", f"--num-cpus={self.head_cpus}",
                     f"--ray-client-server-port={self.client_port}",
                     *self._node_args(self._head_ports, self._head_workers)]
        if self.dashboard:
            head_args += ["--include-dashboard=true", "--dashboard-host=127.0.0.1",
                          f"--dashboard-port={self.dashboard_port}"]
        else:
            head_args += ["--include-dashboard=false"]
        self.head = _Node("head", head_args, env)
        try:
            wait_for_port(self.gcs_port, timeout)
            self.start_worker_node()
            self.wait_for_nodes(2, timeout=max(10.0, timeout - (time.time() - t0)))
            if self.dashboard:
                wait_for_port(self.dashboard_port, max(10.0, timeout - (time.time() - t0)))
        except BaseException:
            self.close()
            raise
        self.start_s = time.time() - t0
        return self

    def start_worker_node(self) -> None:
        """(Re)start the second node (after ``kill_worker_node``, a fresh raylet, new node id)."""
        if self.node2 is not None:
            self.node2.stop()
            shutil.rmtree(self.node2.temp_dir, ignore_errors=True)
        args = [f"--address={self.address}", f"--num-cpus={self.node2_cpus}",
                f"--resources={json.dumps(self.node2_resources)}",
                *self._node_args(self._node2_ports, self._node2_workers)]
        self.node2 = _Node("node2", args, ray_env(self._extra_env), command=_JOIN_ON_LOOPBACK)

    def ensure_worker_node(self, timeout: float = 60.0) -> None:
        """Both nodes alive again (restarts the second node if it is gone): for a cluster
        shared by several tests."""
        alive = self.alive_nodes()
        if len(alive) == 2 and self.node2 is not None and self.node2.alive():
            return
        self.start_worker_node()
        self.wait_for_nodes(2, timeout)

    def kill_worker_node(self) -> float:
        """kill -9 the second node: raylet, agents, log monitor and its core workers. Returns
        the time of the kill (``time.time()``)."""
        assert self.node2 is not None
        t = time.time()
        self.node2.kill(signal.SIGKILL)
        deadline = time.time() + 10
        while self.node2.pids() and time.time() < deadline:
            time.sleep(0.1)
            self.node2.kill(signal.SIGKILL)
        left = self.node2.pids()
        if left:
            raise RuntimeError(f"node2 processes survived SIGKILL: {left}")
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.node2.proc.wait(5)
        return t

    def close(self) -> None:
        for node in (self.node2, self.head):
            if node is not None:
                node.stop()
        for node in (self.node2, self.head):
            if node is not None:
                shutil.rmtree(node.temp_dir, ignore_errors=True)

    def __enter__(self) -> TwoNodeCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- state -------------------------------------------------------------------------------
    def nodes(self) -> list[dict]:
        """All nodes the GCS knows (alive and dead), without ``ray.init`` in this process."""
        from ray._raylet import GcsClient
        from ray.core.generated.gcs_pb2 import GcsNodeInfo

        infos = GcsClient(address=self.address).get_all_node_info(timeout=10)
        return [{"node_id": nid.hex(), "alive": info.state == GcsNodeInfo.ALIVE,
                 "is_head": info.is_head_node, "temp_dir": info.temp_dir,
                 "resources": dict(info.resources_total),
                 "raylet_port": info.node_manager_port}
                for nid, info in infos.items()]

    def alive_nodes(self) -> list[dict]:
        return [n for n in self.nodes() if n["alive"]]

    def wait_for_nodes(self, n: int, timeout: float = 60.0) -> float:
        """Wait until exactly ``n`` nodes are alive; returns the seconds it took."""
        t0 = time.time()
        deadline = t0 + timeout
        alive: list[dict] = []
        while time.time() < deadline:
            for node in (self.head, self.node2):
                if node is not None and node is self.head and not node.alive():
                    raise RuntimeError(f"ray head exited:\n{node.log_tail()}")
            try:
                alive = self.alive_nodes()
            except Exception:  # GCS not answering yet
                alive = []
            if len(alive) == n:
                return time.time() - t0
            time.sleep(0.2)
        logs = "\n".join(f"--- {x.name}\n{x.log_tail()}" for x in (self.head, self.node2) if x)
        raise TimeoutError(f"{len(alive)} alive nodes, wanted {n}, after {timeout}s\n{logs}")


@pytest.fixture
def two_node_cluster() -> Iterator[Callable[..., TwoNodeCluster]]:
    """Factory: ``two_node_cluster(head_cpus=1, node2_cpus=1, env=..., ...)`` starts a
    cluster (both nodes alive) and closes it after the test."""
    made: list[TwoNodeCluster] = []

    def make(**kwargs) -> TwoNodeCluster:
        cluster = TwoNodeCluster(**kwargs)
        made.append(cluster)
        return cluster.start()

    try:
        yield make
    finally:
        for cluster in made:
            cluster.close()


@pytest.fixture(scope="module")
def two_node_cluster_module() -> Iterator[TwoNodeCluster]:
    """One cluster (head 1 CPU, node2 1 CPU, dashboard on) for a whole test module; each test
    should call ``cluster.ensure_worker_node()`` first, since an earlier test may have killed
    the second node (restarting it takes ~2 s)."""
    cluster = TwoNodeCluster()
    try:
        yield cluster.start()
    finally:
        cluster.close()
