"""pipeline.logs (worker output into <run>/logs/*.log) and pipeline.runtime's worker settings.

capture_output redirects file descriptors 1 and 2, and pytest captures at that level too, so
every check that enters it runs in a fresh interpreter (``sys.executable -c ...``).
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from pipeline import runtime
from pipeline.logs import stage_log_uri, with_stage_log
from pipeline.storage import Storage
from tests.conftest import REPO

PRELUDE = """
import logging, os, sys, time, warnings
from pipeline.logs import capture_output
from pipeline.storage import Storage
logging.basicConfig(level=logging.INFO, format="LOG %(levelname)s %(message)s")
"""


def run_py(code: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    full = textwrap.dedent(PRELUDE) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", full], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **env})


def test_stage_log_uri():
    assert stage_log_uri("runs/tiny", "train_vqgan") == "runs/tiny/logs/train_vqgan.log"
    assert stage_log_uri("s3://b/runs/x/", "tokenize", 0) == "s3://b/runs/x/logs/tokenize.log"
    assert stage_log_uri("s3://b/r", "train_vqgan", 3) == "s3://b/r/logs/train_vqgan.rank-3.log"
    with pytest.raises(ValueError):
        stage_log_uri("runs/x", "shard", -1)


def test_print_logging_warnings_and_c_writes_land_in_the_log(tmp_path):
    uri = str(tmp_path / "run" / "logs" / "stage.log")
    res = run_py(f"""
        import ctypes
        def ident(fd):
            st = os.fstat(fd)
            return (st.st_dev, st.st_ino)
        before = (ident(1), ident(2))
        print("before the block", flush=True)
        with capture_output(Storage(), {uri!r}) as local:
            print("from print")
            print("from print to stderr", file=sys.stderr)
            logging.getLogger("some.module").warning("from logging")
            warnings.warn("from warnings", UserWarning)
            os.write(1, b"C-level fd 1\\n")
            os.write(2, b"C-level fd 2\\n")
            ctypes.CDLL(None).printf(b"libc printf (stdio-buffered)\\n")
            inside = (ident(1), ident(2))
        after = (ident(1), ident(2))
        print("after the block")
        logging.getLogger("x").warning("logging after")
        assert not os.path.exists(local), "temporary file left behind"
        print("IDENT", before == after, inside != before)
    """)
    assert res.returncode == 0, res.stderr
    text = Path(uri).read_text()
    for line in ("from print\n", "from print to stderr\n", "LOG WARNING from logging\n",
                 "UserWarning: from warnings", "C-level fd 1\n", "C-level fd 2\n",
                 "libc printf (stdio-buffered)\n"):
        assert line in text, f"{line!r} not in log:\n{text}"
    for outside in ("before the block", "after the block", "logging after"):
        assert outside not in text
    # the fds are restored: output after the block goes to the process's own stdout/stderr
    assert "before the block" in res.stdout and "after the block" in res.stdout
    assert "IDENT True True" in res.stdout
    assert "LOG WARNING logging after" in res.stderr
    assert "from print" not in res.stdout and "from logging" not in res.stderr


def test_exception_inside_is_uploaded_and_propagates(tmp_path):
    uri = str(tmp_path / "logs" / "boom.log")
    res = run_py(f"""
        try:
            with capture_output(Storage(), {uri!r}, every_s=60):
                print("working...")
                os.write(2, b"native stderr\\n")
                raise RuntimeError("boom in the body")
        except RuntimeError as e:
            print("CAUGHT", e)
        print("stdout works again")
    """)
    assert res.returncode == 0, res.stderr
    assert "CAUGHT boom in the body" in res.stdout and "stdout works again" in res.stdout
    text = Path(uri).read_text()
    assert "working...\n" in text and "native stderr\n" in text
    assert "Traceback" in text and "RuntimeError: boom in the body" in text


def test_uploads_while_running_and_restores_swapped_streams(tmp_path):
    """Periodic uploads; sys.stdout/sys.stderr objects not on fds 1/2 (and the logging
    handlers holding them) are redirected too and put back afterwards."""
    uri = str(tmp_path / "logs" / "live.log")
    probe = str(tmp_path / "probe.json")
    res = run_py(f"""
        import io, json
        other_out, other_err = io.StringIO(), io.StringIO()
        sys.stdout, sys.stderr = other_out, other_err
        handler = logging.StreamHandler(other_err)
        logging.getLogger().addHandler(handler)
        with capture_output(Storage(), {uri!r}, every_s=0.2):
            print("early line")
            logging.getLogger("a").warning("handler on a swapped stream")
            seen = ""
            for _ in range(50):  # the uploader runs in the background
                time.sleep(0.1)
                if os.path.exists({uri!r}):
                    seen = open({uri!r}).read()
                    if "early line" in seen:
                        break
            print("late line")
            inside = sys.stdout is not other_out and handler.stream is not other_err
        restored = sys.stdout is other_out and handler.stream is other_err
        json.dump({{"seen": seen, "inside": inside, "restored": restored}}, open({probe!r}, "w"))
    """)
    assert res.returncode == 0, res.stderr
    got = json.loads(Path(probe).read_text())
    assert "early line" in got["seen"] and "late line" not in got["seen"]
    assert got["inside"] and got["restored"]
    text = Path(uri).read_text()
    assert "early line\n" in text and "late line\n" in text
    assert "handler on a swapped stream" in text


def test_log_on_s3(s3_endpoint, s3_bucket):
    uri = f"{s3_bucket}/runs/exp/logs/train_vqgan.rank-1.log"
    assert uri == stage_log_uri(f"{s3_bucket}/runs/exp", "train_vqgan", 1)
    res = run_py(f"""
        with capture_output(Storage(endpoint_url={s3_endpoint!r}), {uri!r}, every_s=0.3):
            print("to s3")
            os.write(2, b"native to s3\\n")
            time.sleep(0.8)
    """)
    assert res.returncode == 0, res.stderr
    text = Storage(endpoint_url=s3_endpoint).read_text(uri)
    assert "to s3\n" in text and "native to s3\n" in text


def test_with_stage_log_keeps_the_signature_and_logs_rank_0(tmp_path):
    def loop(config):
        """doc"""

    wrapped = with_stage_log(loop, Storage(), str(tmp_path), "train_x")
    # Ray Train calls a loop with its config only if the loop takes one argument
    assert str(inspect.signature(wrapped)) == "(config)" and wrapped.__doc__ == "doc"
    res = run_py(f"""
        from pipeline.logs import with_stage_log
        def loop(config):
            print("loop got", config)
            return 7
        run = with_stage_log(loop, Storage(), {str(tmp_path)!r}, "train_x")
        print("RESULT", run({{"lr": 1}}))
    """)
    assert res.returncode == 0, res.stderr
    assert "RESULT 7" in res.stdout
    assert (tmp_path / "logs" / "train_x.log").read_text() == "loop got {'lr': 1}\n"


# -- how pipeline.runtime starts Ray -------------------------------------------------------------


def _cfg(address=None, num_cpus=2):
    return SimpleNamespace(ray=SimpleNamespace(address=address, num_cpus=num_cpus,
                                               dashboard=False))


def test_embedded_ray_serves_the_state_api_on_loopback():
    kw = runtime.ray_init_kwargs(_cfg(), environ={}, dashboard_port=43210)
    assert kw["address"] == "local" and kw["num_cpus"] == 2
    # Ray Train's PlacementGroupCleaner polls the State API, which the dashboard serves
    assert kw["include_dashboard"] is True
    assert kw["dashboard_host"] == kw["_node_ip_address"] == "127.0.0.1"
    assert kw["log_to_driver"] is False and kw["logging_level"] == 30
    env = kw["runtime_env"]["env_vars"]
    assert env["RAY_API_SERVER_ADDRESS"] == "http://127.0.0.1:43210"
    assert env["RAY_TRAIN_ENABLE_PRINT_PATCH"] == "0"
    assert env["PYTHONWARNINGS"] == ",".join(runtime.WORKER_WARNING_FILTERS)


def test_attached_ray_keeps_its_settings_and_the_jobs_env():
    job = {"runtime_env": {"env_vars": {"PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}}}
    environ = {"RAY_ADDRESS": "10.0.0.5:6379", "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(job)}
    kw = runtime.ray_init_kwargs(_cfg(), environ=environ)
    assert kw["address"] == "10.0.0.5:6379" and "include_dashboard" not in kw
    assert "num_cpus" not in kw and kw["log_to_driver"] is False
    env = kw["runtime_env"]["env_vars"]
    assert "PYTHONWARNINGS" not in env  # the job sets it: Ray would refuse to merge a clash
    assert env["RAY_ADDRESS"] == "10.0.0.5:6379"
    # a user's own filters come last, so they win over ours
    env = runtime.worker_env_vars({"PYTHONWARNINGS": "error::FutureWarning"})
    assert env["PYTHONWARNINGS"].endswith(",error::FutureWarning")
    assert "RAY_ADDRESS" not in runtime.worker_env_vars({}, gcs_address="ray://head:10001")


@pytest.mark.parametrize("filtered", [False, True], ids=["unfiltered", "worker-filters"])
def test_worker_filters_silence_exactly_the_deepspeed_collective_warnings(filtered, tmp_path):
    """The filters must match torch's current message (else this fails unfiltered-vs-filtered)."""
    code = f"""
        import torch, torch.distributed as dist
        dist.init_process_group("gloo", init_method="file://{tmp_path}/store", rank=0,
                                world_size=1)
        t = torch.ones(2)
        for _ in range(2):
            dist.all_gather_into_tensor(torch.zeros(2), t)
            dist.reduce_scatter_tensor(torch.zeros(2), t)
            with warnings.catch_warnings():  # what resets the once-per-place registry
                pass
        warnings.warn("an unrelated FutureWarning", FutureWarning)
        dist.destroy_process_group()
    """
    env = {"PYTHONWARNINGS": ",".join(runtime.WORKER_WARNING_FILTERS)} if filtered else {}
    res = run_py(code, **env)
    assert res.returncode == 0, res.stderr
    assert "an unrelated FutureWarning" in res.stderr
    deprecated = res.stderr.count("is deprecated")
    assert deprecated == 0 if filtered else deprecated >= 4, res.stderr


def test_ray_data_console_keeps_warnings_but_not_notices():
    res = run_py("""
        import ray.data
        from pipeline.runtime import _quiet_ray_data_console
        _quiet_ray_data_console()
        _quiet_ray_data_console()  # idempotent
        lg = logging.getLogger("ray.data._internal.progress")
        lg.info("Starting execution of Dataset dataset_1")
        lg.warning("Progress bars disabled. To enable, set ...")
        lg.warning("a real Ray Data warning")
    """)
    assert res.returncode == 0, res.stderr
    assert "a real Ray Data warning" in res.stderr
    assert "Starting execution" not in res.stderr and "Progress bars" not in res.stderr
