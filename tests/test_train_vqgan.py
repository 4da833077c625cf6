"""train_vqgan end to end on builtin:digits: 2 CPU workers, ZeRO-2, checkpoints on S3.

One training run covers: the loss falls and val PSNR clearly beats the untrained model; a worker
killed mid-run (os._exit) is recovered from the newest checkpoint; a finished stage is skipped;
raising `steps` continues from the last checkpoint, on another worker count (2 → 1); the export
loads in a fresh process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline import faults
from pipeline.config import ConfigError, load_config
from pipeline.dag import Pipeline
from pipeline.storage import Storage, join
from pipeline.train.history import read_history
from stages.shard import STAGE as SHARD
from stages.train_vqgan import STAGE as TRAIN_VQGAN
from tests.conftest import REPO

TINY = [
    "shard.source=builtin:digits", "shard.resolution=16", "shard.samples_per_shard=256",
    "shard.val_fraction=0.1",
    "train_vqgan.model.resolution=16", "train_vqgan.model.ch=32", "train_vqgan.model.ch_mult=[1,2]",
    "train_vqgan.model.num_res_blocks=1", "train_vqgan.model.attn_resolutions=[8]",
    "train_vqgan.model.z_channels=32", "train_vqgan.model.embed_dim=16",
    "train_vqgan.model.n_embed=64",
    "train_vqgan.disc.ndf=16", "train_vqgan.disc.n_layers=2",
    "train_vqgan.perceptual.backbone=random", "train_vqgan.loss.perceptual_weight=0.1",
    "train_vqgan.loss.disc_start=40", "train_vqgan.loss.disc_weight=0.2",
    "train_vqgan.lr=2e-3", "train_vqgan.betas=[0.5,0.9]", "train_vqgan.micro_batch=8",
    "train_vqgan.zero_stage=2", "train_vqgan.num_workers=2",
    "train_vqgan.checkpoint_every=10", "train_vqgan.keep_checkpoints=2",
    "train_vqgan.log_every=10", "train_vqgan.image_every=20", "train_vqgan.eval_images=128",
]


def _pipe_cfg(root: str, endpoint: str | None, *extra: str):
    pipe = Pipeline([SHARD, TRAIN_VQGAN])
    base = ["run=vq", f"storage.root={root}", "tracking.mode=offline"]
    if endpoint:
        base.append(f"storage.endpoint_url={endpoint}")
    return pipe, load_config(None, base + TINY + list(extra), pipe.schema)


def test_config_errors_name_keys():
    pipe = Pipeline([SHARD, TRAIN_VQGAN])
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train_vqgan.model.ch_mult=[1,3]", "train_vqgan.model.ch=48"],
                    pipe.schema)
    assert e.value.key.startswith("train_vqgan.model") and "ch_mult" in str(e.value)
    # vgg16 LPIPS without URIs is valid: the weights come from their standard sources
    # (tests/test_lpips_weights.py), checked when the stage runs.
    assert load_config(None, [], pipe.schema).train_vqgan.perceptual.vgg_weights is None
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train_vqgan.perceptual.backbone=vgg19"], pipe.schema)
    assert e.value.key == "train_vqgan.perceptual.backbone"
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train_vqgan.perceptual.backbone=random", "train_vqgan.zero_stage=3"],
                    pipe.schema)
    assert e.value.key == "train_vqgan.zero_stage"


def test_train_vqgan_end_to_end(ray_session, s3_endpoint, s3_bucket, tmp_path, monkeypatch):
    root = f"{s3_bucket}/runs"
    marker = tmp_path / "crashed"
    monkeypatch.setenv(faults.ENV, f"train_vqgan:25:{marker}")
    pipe, cfg = _pipe_cfg(root, s3_endpoint, "train_vqgan.steps=60",
                          f"tracking.dir={tmp_path / 'wandb'}")
    storage = Storage(endpoint_url=s3_endpoint)
    out = pipe.run(cfg)["train_vqgan"]
    res = out["outputs"]
    assert marker.exists(), "the crash hook fired"
    assert res["steps"] == 60
    stage_files = storage.walk_files(out["uri"])
    ckpts = sorted({f.split("/train/")[1].split("/")[0] for f in stage_files
                    if "/train/checkpoint-" in f})
    assert ckpts == ["checkpoint-00000050", "checkpoint-00000060"], ckpts
    assert res["eval"]["psnr"] > res["eval_untrained"]["psnr"] + 5.0, res
    assert 0 < res["eval"]["codebook_usage"] <= 1 and res["eval"]["perplexity"] >= 1
    assert any(u.endswith("recon-00000060.png") for u in res["images"])

    # The loss fell (history.jsonl, rank 0's logged scalars, replayed steps not duplicated).
    rows = read_history(storage, join(out["uri"], "history.jsonl"))
    assert [r["step"] for r in rows] == list(range(10, 61, 10))
    assert rows[-1]["loss/rec"] < 0.8 * rows[0]["loss/rec"], rows
    assert rows[-1]["lambda"] > 0 and rows[3]["lambda"] == 0, "GAN term on from disc_start=40"
    # Codebook health over each log window (both ranks' codes), and in the manifest.
    for r in rows:
        used = round(r["codebook/window_usage"] * 64)
        assert 1 <= used <= 64 and r["codebook/dead_codes"] == 64 - used, r
        assert 1 <= r["codebook/window_perplexity"] <= used + 1e-6, r
    assert res["train_codebook"] == {
        "step": 60, **{k: rows[-1][f"codebook/{k}"]
                       for k in ("window_usage", "dead_codes", "window_perplexity")}}
    assert res["eval"]["dead_codes"] == 64 - round(res["eval"]["codebook_usage"] * 64)
    assert list((tmp_path / "wandb" / "wandb").glob("offline-run-*train_vqgan*")), "W&B files"

    # Finished: a rerun is cached; raising steps continues from step 60, here on 1 worker
    # (the ZeRO-2 states re-partitioned, the global batch of 16 kept by accumulating 2
    # micro-batches): the loss carries on from where 2 workers left it.
    assert pipe.run(cfg)["train_vqgan"]["finished_at"] == out["finished_at"]
    pipe, more = _pipe_cfg(root, s3_endpoint, "train_vqgan.steps=70",
                           "train_vqgan.num_workers=1", f"tracking.dir={tmp_path / 'wandb'}")
    again = pipe.run(more)["train_vqgan"]
    assert again["uri"] == out["uri"] and again["outputs"]["steps"] == 70
    assert again["outputs"]["samples_seen"] == res["samples_seen"] + 10 * 16
    rows = read_history(storage, join(out["uri"], "history.jsonl"))
    assert [r["step"] for r in rows] == list(range(10, 71, 10))
    # Continued, not restarted: a fresh start would be back at step 10's loss and far below the
    # step-60 PSNR (one logged step's loss is noisy with the GAN on; the val PSNR is not).
    assert rows[-1]["loss/rec"] < rows[0]["loss/rec"], rows
    assert again["outputs"]["eval"]["psnr"] > res["eval"]["psnr"] - 1.0

    # The export loads in a fresh process and encodes/decodes.
    code = (
        "import io, json, sys, torch\n"
        "from pipeline.storage import Storage\n"
        "from pipeline.models.vqgan import VQGAN\n"
        "s = Storage(endpoint_url=sys.argv[1])\n"
        "m = VQGAN.from_bytes(s.read_text(sys.argv[3]), s.read_bytes(sys.argv[2]))\n"
        "torch.load(io.BytesIO(s.read_bytes(sys.argv[2])), weights_only=True)\n"
        "x = torch.rand(2, 3, 16, 16) * 2 - 1\n"
        "enc = m.encode(x)\n"
        "y = m.decode_indices(enc.indices)\n"
        "print(json.dumps({'grid': list(enc.indices.shape), 'out': list(y.shape)}))\n"
    )
    exp = again["outputs"]["export"]
    proc = subprocess.run([sys.executable, "-c", code, s3_endpoint, exp["weights"],
                           exp["config"]], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1]) == {"grid": [2, 8, 8], "out": [2, 3, 16, 16]}
    assert storage.exists(join(out["uri"], "eval.json"))
