"""Node loss and driver loss on a real two-node Ray cluster, with moto S3 as the only storage.

One flow (issue #14, items 1, 2, 3, 5), on a head (1 CPU) and a second node (1 CPU, custom
resource ``node2``) from :mod:`tests.two_nodes`:

1. ``ray job submit`` of the DAG ``--until train_transformer`` (tiny digits config, train_vqgan
   on exactly 2 workers and train_transformer elastic on 1..2, a checkpoint every 5 steps, many
   small shards).
2. While it runs, the test watches the bucket and kill -9's the second node mid-shard,
   mid-train_vqgan, mid-tokenize and mid-train_transformer, restarting it right after each
   kill (a fresh raylet, a new node id).
3. Later in train_transformer it kill -9's the job's driver, waits until Ray reports the job
   FAILED, and submits the same command again: the new driver must find every finished stage
   cached and resume train_transformer from its newest checkpoint, from the bucket alone.

Then: the two train_vqgan workers ran one per node before the kill (Ray's actor table); both
training histories are steps 1..N without gaps or repeats, and steps / samples_seen are those of
an undisturbed run; shard and tokenize folders hold exactly their manifests' files (no temporary
or stray objects); the shards are byte-identical to an undisturbed run of shard alone (no Ray)
and the code shards to an undisturbed tokenize over the same inputs and VQGAN export; every kill
happened before the stage's manifest says it finished; nothing was written outside the bucket.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO
from tests.two_nodes import (  # noqa: F401 (two_node_cluster: the fixture)
    RAY,
    TwoNodeCluster,
    two_node_cluster,
)

RUN = "two"
VQ_STEPS, GPT_STEPS = 24, 40
NODE_KILL_STEP = 6  # kill node2 once a training stage logged this step (a checkpoint at 5)
DRIVER_KILL_STEP = 20  # kill the driver once train_transformer recovered and logged this
VQ_BATCH, GPT_BATCH = 8 * 2, 16 * 2  # micro_batch x grad_accum x num_workers
JOB_TIMEOUT_S = 900  # a ceiling: ~135 s on a fast 2-core machine, ~2.6x that on a slow one
POLL_S = 0.5

SHARD_CFG = ["shard.source=builtin:digits", "shard.resolution=16", "shard.samples_per_shard=32",
             "shard.val_fraction=0.1", "shard.progress=false"]
TINY = [
    *SHARD_CFG,
    "train_vqgan.model.resolution=16", "train_vqgan.model.ch=32",
    "train_vqgan.model.ch_mult=[1,2]", "train_vqgan.model.num_res_blocks=1",
    "train_vqgan.model.attn_resolutions=[8]", "train_vqgan.model.z_channels=32",
    "train_vqgan.model.embed_dim=16", "train_vqgan.model.n_embed=64",
    "train_vqgan.disc.ndf=16", "train_vqgan.disc.n_layers=2",
    "train_vqgan.perceptual.backbone=random", "train_vqgan.loss.perceptual_weight=0.1",
    "train_vqgan.loss.disc_start=40", "train_vqgan.loss.disc_weight=0.2",
    "train_vqgan.lr=2e-3", "train_vqgan.betas=[0.5,0.9]", "train_vqgan.micro_batch=8",
    "train_vqgan.zero_stage=2", f"train_vqgan.steps={VQ_STEPS}",
    # train_vqgan: exactly 2 workers (one per node, asserted; restarted on 2 once node2 is
    # back); train_transformer: elastic 1..2 (restarted on what is left).
    "train_vqgan.num_workers=2", "train_vqgan.cpus_per_worker=1",
    "train_vqgan.checkpoint_every=5", "train_vqgan.keep_checkpoints=2",
    "train_vqgan.log_every=1", "train_vqgan.image_every=1000", "train_vqgan.eval_images=16",
    "tokenize.actors=2", "tokenize.cpus_per_actor=1", "tokenize.progress=false",
    "train_transformer.n_layer=2", "train_transformer.n_head=2", "train_transformer.n_embd=64",
    "train_transformer.micro_batch=16", "train_transformer.lr=3e-3",
    "train_transformer.warmup_steps=5", "train_transformer.schedule=constant",
    "train_transformer.zero_stage=3", f"train_transformer.steps={GPT_STEPS}",
    "train_transformer.num_workers=2", "train_transformer.min_workers=1",
    "train_transformer.cpus_per_worker=1", "train_transformer.checkpoint_every=5",
    "train_transformer.keep_checkpoints=2", "train_transformer.log_every=1",
    "train_transformer.image_every=1000", "train_transformer.eval_samples=200",
    "train_transformer.samples_per_class=1",
]
EXCLUDES = [".venv", ".git", "runs", "wandb", "wandb-offline", "**/__pycache__", "*.egg-info",
            ".pytest_cache", ".ruff_cache", "build", "dist", "out"]


# -- the job server (REST, so polling costs no CLI start-up) -------------------------------------


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def job_info(cluster: TwoNodeCluster, job_id: str) -> dict[str, Any]:
    return _get(f"{cluster.dashboard_url}/api/jobs/{job_id}")


def job_logs(cluster: TwoNodeCluster, job_id: str) -> str:
    try:
        return _get(f"{cluster.dashboard_url}/api/jobs/{job_id}/logs").get("logs", "")
    except Exception as e:  # diagnostics only
        return f"<no logs: {e}>"


def submit(cluster: TwoNodeCluster, job_id: str, config: Path, overrides: list[str]) -> None:
    """``ray job submit`` of the DAG until train_transformer; the config file is read by its
    absolute path (the driver runs on the head, on this machine), so the shipped working dir is
    the repository as it is."""
    runtime_env = {"excludes": EXCLUDES}
    cmd = [RAY, "job", "submit", "--address", cluster.dashboard_url, "--submission-id", job_id,
           "--no-wait", "--working-dir", str(REPO), "--runtime-env-json",
           json.dumps(runtime_env), "--", "python", "-m", "pipeline", "run", str(config),
           "--until", "train_transformer", *overrides]
    deadline = time.time() + 120
    while True:  # the job server can answer before the head's agent is ready
        out = subprocess.run(cmd, capture_output=True, text=True, env=cluster.env(),
                             timeout=120)
        if out.returncode == 0 or "No available agent" not in out.stdout + out.stderr \
                or time.time() > deadline:
            break
        time.sleep(1)
    assert out.returncode == 0, out.stdout + out.stderr


def wait_job(cluster: TwoNodeCluster, job_id: str, until: tuple[str, ...],
             timeout: float = JOB_TIMEOUT_S) -> str:
    deadline = time.time() + timeout
    status = "PENDING"
    while time.time() < deadline:
        status = job_info(cluster, job_id)["status"]
        if status in until:
            return status
        time.sleep(POLL_S)
    return status


# -- the bucket ----------------------------------------------------------------------------------


class Bucket:
    """Reads of the moto bucket through boto3 (no pipeline code in the watcher)."""

    def __init__(self, endpoint: str, bucket_uri: str) -> None:
        import boto3

        self.name = bucket_uri.removeprefix("s3://")
        self.s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")

    def list_keys(self, prefix: str = "") -> list[str]:
        out: list[str] = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.name,
                                                                      Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return out

    def json(self, key: str) -> Any:
        try:
            return json.loads(self.s3.get_object(Bucket=self.name, Key=key)["Body"].read())
        except (self.s3.exceptions.NoSuchKey, ValueError):
            return None

    def bytes(self, key: str) -> bytes:
        return self.s3.get_object(Bucket=self.name, Key=key)["Body"].read()


def stage_folders(keys: list[str], prefix: str) -> dict[str, str]:
    """stage name → its folder key prefix (``runs/two/shard-<fp12>/``)."""
    out = {}
    for k in keys:
        part = k[len(prefix):].split("/", 1)[0]
        name, _, fp = part.rpartition("-")
        if name and len(fp) == 12 and "/" in k[len(prefix):]:
            out[name] = f"{prefix}{part}/"
    return out


def _iso(ts: str) -> float:
    return datetime.fromisoformat(ts).timestamp()


# -- Ray's view ----------------------------------------------------------------------------------


def train_workers(cluster: TwoNodeCluster) -> list[dict[str, Any]]:
    """Alive Ray Train worker actors with their node ids and pids (Ray's actor table, through
    the dashboard's State API: what ``ray list actors`` reads)."""
    query = ("detail=1&limit=1000&filter_keys=class_name&filter_predicates=%3D"
             "&filter_values=RayTrainWorker&filter_keys=state&filter_predicates=%3D"
             "&filter_values=ALIVE")
    reply = _get(f"{cluster.dashboard_url}/api/v0/actors?{query}")
    return [{k: a.get(k) for k in ("actor_id", "node_id", "pid", "state")}
            for a in reply["data"]["result"]["result"]]


def _tail(text: str, n: int = 6000) -> str:
    return text[-n:]


def _pipeline_lines(text: str, n: int = 8000) -> str:
    """The driver's own log lines (``HH:MM:SS L message``), without Ray's: the stage timeline."""
    lines = [ln for ln in text.splitlines() if re.match(r"\d\d:\d\d:\d\d [DIWE] ", ln)]
    return _tail("\n".join(lines), n)


# -- the test ------------------------------------------------------------------------------------


def test_node_and_driver_loss(two_node_cluster, s3_endpoint, s3_bucket, tmp_path):  # noqa: F811
    t_start = time.time()
    root = f"{s3_bucket}/runs"
    prefix = f"runs/{RUN}/"
    bucket = Bucket(s3_endpoint, s3_bucket)
    overrides = [f"run={RUN}", f"storage.root={root}", f"storage.endpoint_url={s3_endpoint}",
                 "tracking.mode=disabled", *TINY]
    repo_before = set(os.listdir(REPO))
    ray_results = Path.home() / "ray_results"
    results_before = set(os.listdir(ray_results)) if ray_results.exists() else set()

    cluster = two_node_cluster(env={"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "15"})
    head_id = next(n["node_id"] for n in cluster.alive_nodes() if n["is_head"])
    job1, job2 = f"two-nodes-a-{os.getpid()}", f"two-nodes-b-{os.getpid()}"
    config = tmp_path / "job.yaml"
    config.write_text(f"run: {RUN}\n")
    events: dict[str, dict[str, Any]] = {}
    diag: list[str] = []

    def fail(msg: str, job_id: str) -> None:
        logs = job_logs(cluster, job_id)
        nodes = "\n".join(f"--- {x.name}\n{x.log_tail()}" for x in (cluster.head, cluster.node2)
                          if x)
        pytest.fail(f"{msg}\nevents: {json.dumps(events, indent=1, default=str)}\n"
                    f"{chr(10).join(diag)}\n--- job {job_id}: pipeline log lines\n"
                    f"{_pipeline_lines(logs)}\n--- job {job_id} logs (tail)\n{_tail(logs, 3000)}\n"
                    f"{nodes}")

    def kill_node2(stage: str, **info: Any) -> None:
        t = cluster.kill_worker_node()
        events[stage] = {"kill": t, **info}
        cluster.start_worker_node()  # back right away: a fresh raylet with a new node id

    def progress(folder: str | None) -> dict[str, Any] | None:
        return bucket.json(f"{folder}progress.json") if folder else None

    submit(cluster, job1, config, overrides)
    deadline = time.time() + JOB_TIMEOUT_S
    status = "PENDING"
    driver_killed = False
    while time.time() < deadline:
        keys = bucket.list_keys(prefix)
        folders = stage_folders(keys, prefix)
        done = {s for s, f in folders.items() if f"{f}_manifest.json" in keys}

        for stage in ("shard", "tokenize"):
            f = folders.get(stage)
            if stage in events or f is None or stage in done:
                continue
            parts = [k for k in keys if k.startswith(f"{f}_parts/") and k.endswith(".json")
                     and "hashes" not in k]
            if len(parts) >= 2:
                kill_node2(stage, outputs_at_kill=len(parts))
        for stage in ("train_vqgan", "train_transformer"):
            f = folders.get(stage)
            rec = progress(f) if stage not in done else None
            if rec is None:
                continue
            ev = events.get(stage)
            if ev is None and rec["step"] >= NODE_KILL_STEP:
                workers = train_workers(cluster)
                # Kill once the group spans both nodes (an elastic group that started on one
                # grows at Ray's next resize check); the node2 kill then takes a worker.
                if len({w["node_id"] for w in workers}) >= 2:
                    kill_node2(stage, step_at_kill=rec["step"], workers=workers)
            elif ev is not None and "recovered" not in ev and rec.get("time", 0) > ev["kill"] \
                    and rec.get("resumed_from"):
                # The restarted loop's start (after its checkpoint restore), from the record.
                ev["recovered"] = rec["time"] - rec["elapsed_s"]
                ev["resumed_from"] = rec["resumed_from"]["step"]
                ev["recovery_s"] = round(ev["recovered"] - ev["kill"], 1)
            if (stage == "train_transformer" and ev is not None and "recovered" in ev
                    and not driver_killed and rec["step"] >= DRIVER_KILL_STEP):
                ckpts = sorted({k[len(f):].split("/")[1] for k in keys
                                if k.startswith(f"{f}train/checkpoint-")
                                and k.endswith("/complete.json")})
                info = job_info(cluster, job1)
                pid = int(info["driver_info"]["pid"])
                os.kill(pid, signal.SIGKILL)
                events["driver"] = {"kill": time.time(), "pid": pid, "step_at_kill": rec["step"],
                                    "checkpoints_at_kill": ckpts}
                driver_killed = True
        status = job_info(cluster, job1)["status"]
        if status not in ("PENDING", "RUNNING"):
            break
        time.sleep(POLL_S)
    if not driver_killed:
        fail(f"job 1 ended {status} before the driver kill", job1)
    if status not in ("FAILED", "STOPPED"):
        status = wait_job(cluster, job1, ("FAILED", "STOPPED", "SUCCEEDED"), 60)
    if status not in ("FAILED", "STOPPED"):
        fail(f"job 1 ended {status} after its driver was killed", job1)
    events["driver"]["job_status"] = status
    for stage in ("shard", "train_vqgan", "tokenize", "train_transformer"):
        if stage not in events:
            fail(f"node2 was never killed during {stage}", job1)
    cluster.wait_for_nodes(2, timeout=60)

    # A new driver: the same command again.
    t_resubmit = time.time()
    submit(cluster, job2, config, overrides)
    status = wait_job(cluster, job2, ("SUCCEEDED", "FAILED", "STOPPED"))
    logs2 = job_logs(cluster, job2)
    if status != "SUCCEEDED":
        fail(f"job 2 ended {status}", job2)
    t_end = time.time()

    keys = bucket.list_keys(prefix)
    folders = stage_folders(keys, prefix)
    manifests = {s: bucket.json(f"{f}_manifest.json") for s, f in folders.items()}
    for stage in ("shard", "train_vqgan", "tokenize"):
        assert f"[{stage}] cached" in logs2, _tail(logs2)
    assert "[train_transformer] resuming" in logs2, _tail(logs2)
    # The dead driver's elastic reservation (Ray keeps it 180 s) was released by the new one
    # (pipeline.train.launch.prepare_elastic_start), so its run did not wait for it.
    assert "elastic training reservation(s) of dead runs" in logs2, _tail(logs2)

    # Every kill came before its stage finished (so the test proves what it claims).
    for stage in ("shard", "train_vqgan", "tokenize", "train_transformer"):
        assert events[stage]["kill"] < _iso(manifests[stage]["finished_at"]) + 1, (stage, events)
    assert events["shard"]["outputs_at_kill"] < len(manifests["shard"]["outputs"]["shards"])
    assert events["tokenize"]["outputs_at_kill"] < len(manifests["tokenize"]["outputs"]["shards"])

    # (a) Before the kill, train_vqgan ran one worker on each node.
    nodes = sorted(w["node_id"] for w in events["train_vqgan"]["workers"])
    assert len(nodes) == 2 and len(set(nodes)) == 2 and head_id in nodes, events["train_vqgan"]

    # (b) Training histories: steps 1..N, no gap, no repeat; totals of an undisturbed run.
    for stage, steps, batch in (("train_vqgan", VQ_STEPS, VQ_BATCH),
                                ("train_transformer", GPT_STEPS, GPT_BATCH)):
        text = bucket.bytes(f"{folders[stage]}history.jsonl").decode()
        hist = [json.loads(line)["step"] for line in text.splitlines() if line]
        assert hist == list(range(1, steps + 1)), (stage, hist)
        out = manifests[stage]["outputs"]
        assert out["steps"] == steps and out["samples_seen"] == steps * batch, (stage, out)
        ev = events[stage]
        assert "recovered" in ev, (stage, ev)
        assert 0 < ev["resumed_from"] <= ev["step_at_kill"], (stage, ev)
    # The second driver resumed train_transformer from the newest complete checkpoint in the
    # bucket at the kill, even where Ray Train had not registered it yet (its controller does
    # so a poll or two after the upload; pipeline.train.checkpoint.RayCheckpoints).
    last = progress(folders["train_transformer"])
    resumed = (last or {}).get("resumed_from") or {}
    ckpt_steps = [int(c.rsplit("-", 1)[1]) for c in events["driver"]["checkpoints_at_kill"]]
    # (>=: one more may have been declared complete between the listing and the kill)
    assert ckpt_steps and resumed.get("step", 0) >= max(ckpt_steps), (resumed, events["driver"])
    events["driver"]["resumed_from"] = resumed["step"]
    assert manifests["train_transformer"]["resumed"] is True

    # (c) Shard and tokenize folders: exactly the manifests' files, nothing temporary.
    for stage in ("shard", "tokenize"):
        f = folders[stage]
        mine = [k[len(f):] for k in keys if k.startswith(f)]
        assert not [k for k in mine if "/." in f"/{k}" or ".tmp-" in k], mine
        tars = sorted(k for k in mine if k.endswith(".tar"))
        listed = sorted(s["name"] for s in manifests[stage]["outputs"]["shards"])
        assert tars == listed, (stage, tars, listed)
        sidecars = sorted(k for k in mine if k.startswith("_parts/") and k.endswith(".json")
                          and k != "_parts/hashes.json")
        assert sidecars == sorted(f"_parts/{n[:-4]}.json" for n in listed), (stage, sidecars)

    # (d) Byte-identical to undisturbed runs: shard alone without Ray; tokenize without Ray over
    # the same image shards and VQGAN export (their manifests copied to a fresh root).
    from pipeline.config import load_config
    from pipeline.dag import Pipeline
    from stages import STAGES

    pipe = Pipeline(STAGES)

    def ref_cfg(ref_root: str):
        return load_config(None, [f"run={RUN}", f"storage.root={ref_root}",
                                  f"storage.endpoint_url={s3_endpoint}",
                                  "tracking.mode=disabled", *TINY], pipe.schema)

    t_ref = time.time()
    ref_shard = pipe.run(ref_cfg(f"{s3_bucket}/ref-shard"), only=["shard"], local=True)["shard"]
    ref_prefix = f"ref-tok/{RUN}/"
    for stage in ("shard", "train_vqgan"):
        name = folders[stage][len(prefix):]
        bucket.s3.put_object(Bucket=bucket.name, Key=f"{ref_prefix}{name}_manifest.json",
                             Body=bucket.bytes(f"{folders[stage]}_manifest.json"))
    ref_tok = pipe.run(ref_cfg(f"{s3_bucket}/ref-tok"), only=["tokenize"],
                       local=True)["tokenize"]
    t_ref = time.time() - t_ref
    for stage, ref in (("shard", ref_shard), ("tokenize", ref_tok)):
        got = {s["name"]: s["sha256"] for s in manifests[stage]["outputs"]["shards"]}
        want = {s["name"]: s["sha256"] for s in ref["outputs"]["shards"]}
        assert got == want, stage
        ref_folder = ref["uri"].removeprefix(f"s3://{bucket.name}/").rstrip("/") + "/"
        for name in sorted(got):
            assert bucket.bytes(f"{folders[stage]}{name}") == bucket.bytes(f"{ref_folder}{name}"), \
                (stage, name)

    # Nothing outside the bucket: no run folder, W&B folder or Ray results on local disk.
    assert set(os.listdir(REPO)) - repo_before <= {".pytest_cache"}, \
        set(os.listdir(REPO)) - repo_before
    now = set(os.listdir(ray_results)) if ray_results.exists() else set()
    assert now == results_before, now - results_before
    job_dirs = list(Path(cluster.head.temp_dir).glob("session_*/runtime_resources/"
                                                     "working_dir_files/*"))
    assert job_dirs, "the job's working dir was not found"
    for d in job_dirs:
        for name in ("runs", "wandb", "wandb-offline", "report.html"):
            assert not (d / name).exists(), d / name
    outside = [k for k in bucket.list_keys()
               if not k.startswith(("runs/", "ref-shard/", "ref-tok/"))]
    assert not outside, outside

    print("\n[two-nodes] " + json.dumps({
        "recovery_s": {s: events[s].get("recovery_s") for s in ("train_vqgan",
                                                                 "train_transformer")},
        "killed_at": {s: {k: v for k, v in events[s].items() if k not in ("workers",)}
                      for s in events},
        "job1_s": round(t_resubmit - t_start, 1), "job2_s": round(t_end - t_resubmit, 1),
        "references_s": round(t_ref, 1)}, default=str))
    print(f"[two-nodes] job 1 timeline:\n{_pipeline_lines(job_logs(cluster, job1))}")

