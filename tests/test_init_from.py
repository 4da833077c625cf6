"""train_vqgan.init_from: starting from a published taming checkpoint or one of our exports.

The "published" checkpoint is made here: a tiny VQGAN and discriminator from another seed than
the run's, their state dicts under the taming key names (``loss.discriminator.*``, some
``loss.perceptual_loss.*``), wrapped as a Lightning ``last.ckpt`` (global_step, optimizer
states, a callbacks dict keyed by a class as PL pickles it).

Covered: loading (taming VQModel and Net2NetTransformer checkpoints, our export as a folder, a
.pt file or a stage folder; locally and on S3); the mismatch errors; the config rules (steps 0
needs init_from; init_from is in the fingerprint); pretrained mode end to end (shard ->
train_vqgan steps 0 -> tokenize -> train_transformer on Ray: the export is the checkpoint's
VQGAN, the codes are its codes); fine-tuning on 2 workers under ZeRO-2 starts from the
checkpoint on every rank, and a resume takes its own checkpoint, not init_from.
"""

from __future__ import annotations

import io
import os
import re

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.dag import Pipeline
from pipeline.data.codes import load_code_shard, shard_specs
from pipeline.data.loader import eval_batches
from pipeline.models.convert import REFERENCE_QUANTIZER
from pipeline.models.discriminator import DiscriminatorConfig, NLayerDiscriminator
from pipeline.models.vqgan import VQGAN, VQGANConfig
from pipeline.pretrained import apply_init_weights, read_init_weights
from pipeline.storage import Storage, join
from stages.shard import STAGE as SHARD
from stages.tokenize import STAGE as TOKENIZE
from stages.train_transformer import STAGE as TRAIN_TRANSFORMER
from stages.train_vqgan import STAGE as TRAIN_VQGAN
from tests.test_train_vqgan import TINY

MODEL = VQGANConfig(resolution=16, ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8],
                    z_channels=32, embed_dim=16, n_embed=64, **REFERENCE_QUANTIZER)
# The reference's quantizer in the pipeline's config (our defaults are another one).
QUANTIZER = [f"train_vqgan.model.{k}={'null' if v is None else str(v).lower()}"
             for k, v in REFERENCE_QUANTIZER.items()]
DISC = DiscriminatorConfig(ndf=16, n_layers=2)
PUBLISHED_SEED = 1234  # not the run's seed 0: the checkpoint differs from a fresh init


class ModelCheckpoint:
    """Stands for pytorch_lightning's callback class, which last.ckpt uses as a dict key."""


def published() -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(taming last.ckpt dict, its VQGAN state dict, its discriminator state dict)."""
    torch.manual_seed(PUBLISHED_SEED)
    vq, disc = VQGAN(MODEL).state_dict(), NLayerDiscriminator(DISC).state_dict()
    gen = torch.Generator().manual_seed(1)
    lpips = {"scaling_layer.shift": torch.zeros(1, 3, 1, 1),
             "net.slice1.0.weight": torch.randn(64, 3, 3, 3, generator=gen),
             "lin0.model.1.weight": torch.rand(1, 64, 1, 1, generator=gen)}
    state = {**vq, **{f"loss.discriminator.{k}": v for k, v in disc.items()},
             **{f"loss.perceptual_loss.{k}": v for k, v in lpips.items()}}
    ckpt = {"epoch": 3, "global_step": 5000, "pytorch-lightning_version": "1.0.8",
            "state_dict": state, "optimizer_states": [{"state": {}, "param_groups": []}],
            "callbacks": {ModelCheckpoint: {"best_model_score": torch.tensor(0.5)}}}
    return ckpt, vq, disc


def save(obj: object, path) -> str:
    torch.save(obj, str(path))
    return str(path)


def load_into(uri: str, model_cfg: VQGANConfig = MODEL, disc_cfg: DiscriminatorConfig = DISC):
    model, disc = VQGAN(model_cfg), NLayerDiscriminator(disc_cfg)
    weights = read_init_weights(Storage(), uri)
    apply_init_weights(weights, model, disc)
    return weights, model, disc


def assert_state_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_taming_checkpoint_loads_generator_and_discriminator(tmp_path):
    ckpt, vq, disc = published()
    weights, model, d = load_into(save(ckpt, tmp_path / "last.ckpt"))
    assert (weights.kind, weights.step) == ("taming", 5000)
    assert_state_equal(model.state_dict(), vq)
    assert_state_equal(d.state_dict(), disc)


def test_net2net_checkpoint_gives_its_first_stage(tmp_path):
    _, vq, _ = published()
    state = {**{f"first_stage_model.{k}": v for k, v in vq.items()},
             "transformer.tok_emb.weight": torch.zeros(65, 8)}
    weights, model, _ = load_into(save({"state_dict": state}, tmp_path / "gpt.ckpt"))
    assert weights.disc == {}  # the discriminator keeps its fresh init
    assert_state_equal(model.state_dict(), vq)


def test_our_export_round_trips(tmp_path):
    ckpt, vq, _ = published()
    _, model, _ = load_into(save(ckpt, tmp_path / "last.ckpt"))
    model.save_pretrained(tmp_path / "stage" / "export")
    for uri in (tmp_path / "stage" / "export", tmp_path / "stage" / "export" / "vqgan.pt",
                tmp_path / "stage"):
        weights, again, _ = load_into(str(uri))
        assert weights.kind == "export" and weights.disc == {}
        assert_state_equal(again.state_dict(), vq)
    with pytest.raises(FileNotFoundError, match="train_vqgan.init_from=.*nothing"):
        load_into(str(tmp_path / "nothing"))


def test_reads_through_storage_on_s3(s3_endpoint, s3_bucket):
    """init_from on object storage: a taming checkpoint, and our export's folder."""
    ckpt, vq, disc = published()
    storage = Storage(endpoint_url=s3_endpoint)
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    storage.write_bytes(f"{s3_bucket}/weights/last.ckpt", buf.getvalue())
    weights = read_init_weights(storage, f"{s3_bucket}/weights/last.ckpt")
    assert_state_equal(weights.vqgan, vq)
    assert_state_equal(weights.disc, disc)
    model = VQGAN(MODEL)
    model.load_state_dict(vq)
    storage.write_bytes(f"{s3_bucket}/run/train_vqgan-x/export/vqgan.pt", model.state_bytes())
    storage.write_text(f"{s3_bucket}/run/train_vqgan-x/export/vqgan.json", model.config_json())
    for uri in (f"{s3_bucket}/run/train_vqgan-x", f"{s3_bucket}/run/train_vqgan-x/export/"):
        assert_state_equal(read_init_weights(storage, uri).vqgan, vq)


@pytest.mark.parametrize("model_cfg, disc_cfg, message", [
    (VQGANConfig(**{**MODEL.to_dict(), "n_embed": 32}), DISC,
     r"does not match train_vqgan.model: quantize.embedding.weight has shape \[64, 16\] in the "
     r"checkpoint, \[32, 16\] configured \(n_embed 64 in the checkpoint vs 32 configured\)"),
    (VQGANConfig(**{**MODEL.to_dict(), "attn_resolutions": []}), DISC,
     r"does not match train_vqgan.model: encoder.down.1.attn.0.norm.weight is in the checkpoint "
     r"but not in the configured model"),
    (VQGANConfig(**{**MODEL.to_dict(), "use_ema": True}), DISC,
     r"does not match train_vqgan.model: quantize.ema_cluster_size is configured but not in the "
     r"checkpoint"),
    (MODEL, DiscriminatorConfig(ndf=16, n_layers=3),
     r"does not match train_vqgan.disc: loss.discriminator.main.8.weight has shape"),
    (VQGANConfig(**{**MODEL.to_dict(), "l2_normalize": True, "codebook_dim": 8}), DISC,
     r"its codebook was trained with l2_normalize=False, codebook_dim=None; set "
     r"train_vqgan.model.l2_normalize=false train_vqgan.model.codebook_dim=null$"),
])
def test_mismatch_names_init_from_and_the_first_key(tmp_path, model_cfg, disc_cfg, message):
    uri = save(published()[0], tmp_path / "last.ckpt")
    with pytest.raises(ValueError, match=rf"^train_vqgan.init_from={re.escape(uri)}:? .*{message}"):
        load_into(uri, model_cfg, disc_cfg)


def test_dead_code_counters_start_at_zero(tmp_path):
    """Dead-code restarts on a checkpoint trained without them: the counters are training
    state, not weights, and start at zero."""
    ckpt, vq, _ = published()
    _, model, _ = load_into(save(ckpt, tmp_path / "last.ckpt"),
                            VQGANConfig(**{**MODEL.to_dict(), "restart_dead_codes": 10}))
    state = model.state_dict()
    assert torch.equal(state.pop("quantize.unused_vectors"), torch.zeros(64, dtype=torch.long))
    assert_state_equal(state, vq)


def test_unsupported_checkpoints_name_init_from(tmp_path):
    uri = save({"state_dict": {"quantize.embedding.weight": torch.zeros(4, 2),
                               "quantize.used": torch.zeros(4)}}, tmp_path / "remap.ckpt")
    with pytest.raises(ValueError, match=r"train_vqgan.init_from=.*remap.ckpt: .*remapping"):
        read_init_weights(Storage(), uri)


def _pipe(*stages):
    return Pipeline(list(stages) or [SHARD, TRAIN_VQGAN])


def test_steps_zero_needs_init_from_and_init_from_is_fingerprinted():
    pipe = _pipe()
    base = ["tracking.mode=disabled", *TINY]
    with pytest.raises(ConfigError) as e:
        load_config(None, [*base, "train_vqgan.steps=0"], pipe.schema)
    assert e.value.key == "train_vqgan.steps" and "init_from" in e.value.message
    # Pretrained mode still validates the rest as a training run would.
    with pytest.raises(ConfigError) as e:
        load_config(None, [*base, "train_vqgan.steps=0", "train_vqgan.init_from=x.ckpt",
                           "train_vqgan.zero_stage=3"], pipe.schema)
    assert e.value.key == "train_vqgan.zero_stage"

    def fingerprints(*extra):
        cfg = load_config(None, [*base, *extra], pipe.schema)
        return {p.stage.name: p.fingerprint for p in pipe.plan(cfg)}

    plain, a, b = (fingerprints(), fingerprints("train_vqgan.init_from=a.ckpt"),
                   fingerprints("train_vqgan.init_from=b.ckpt"))
    assert plain["shard"] == a["shard"] == b["shard"]
    assert len({plain["train_vqgan"], a["train_vqgan"], b["train_vqgan"]}) == 3
    # steps is out of the fingerprint: pretrained mode and a later fine-tune share the folder.
    assert fingerprints("train_vqgan.init_from=a.ckpt", "train_vqgan.steps=0") == a


# -- on Ray ---------------------------------------------------------------------------------------

GPT = ["tokenize.actors=1", "tokenize.progress=false",
       "train_transformer.n_layer=1", "train_transformer.n_head=2", "train_transformer.n_embd=32",
       "train_transformer.micro_batch=16", "train_transformer.num_workers=1",
       "train_transformer.zero_stage=0", "train_transformer.steps=4",
       "train_transformer.warmup_steps=0", "train_transformer.checkpoint_every=4",
       "train_transformer.log_every=2", "train_transformer.image_every=4",
       "train_transformer.eval_samples=64", "train_transformer.samples_per_class=1"]


@pytest.fixture(scope="module")
def published_run(tmp_path_factory):
    """A local root and a taming checkpoint file in it."""
    root = tmp_path_factory.mktemp("init_from")
    ckpt, vq, disc = published()
    return {"root": str(root / "runs"), "ckpt": save(ckpt, root / "last.ckpt"), "vq": vq,
            "disc": disc}


def _cfg(pipe: Pipeline, run: dict, *extra: str):
    return load_config(None, ["run=init", f"storage.root={run['root']}", "tracking.mode=disabled",
                              "shard.progress=false", *TINY, *QUANTIZER,
                              "train_vqgan.eval_images=16",
                              f"train_vqgan.init_from={run['ckpt']}", *extra], pipe.schema)


def _export(out: dict) -> dict[str, torch.Tensor]:
    data = Storage().read_bytes(out["outputs"]["export"]["weights"])
    return torch.load(io.BytesIO(data), weights_only=True)


def test_pretrained_mode_end_to_end(ray_session, published_run):
    pipe = _pipe(SHARD, TRAIN_VQGAN, TOKENIZE, TRAIN_TRANSFORMER)
    done = pipe.run(_cfg(pipe, published_run, "train_vqgan.steps=0", *GPT))
    vq = done["train_vqgan"]["outputs"]
    assert (vq["steps"], vq["samples_seen"], vq["checkpoint"]) == (0, 0, None)
    assert vq["eval"]["images"] == vq["eval_untrained"]["images"] == 16
    assert vq["eval"] != vq["eval_untrained"]  # the imported model, and a fresh one
    assert [u.rsplit("/", 1)[1] for u in vq["images"]] == ["recon-00000000.png"]
    storage = Storage()
    assert not storage.walk_files(join(done["train_vqgan"]["uri"], "train")), "no training run"
    assert_state_equal(_export(done["train_vqgan"]), published_run["vq"])

    # tokenize's codes are the imported model's codes of the same center crops.
    model = VQGAN(MODEL).eval()
    model.load_state_dict(published_run["vq"])
    tok = done["tokenize"]["outputs"]
    with torch.no_grad():
        for spec, entry in zip(shard_specs(tok), tok["shards"]):
            stored = load_code_shard(storage, spec).codes.astype(np.int64)
            ours = torch.cat([model.encode(x).indices
                              for x, _ in eval_batches(storage, [entry["source"]], 64, 16)])
            assert torch.equal(torch.from_numpy(stored), ours), entry["name"]
    gpt = done["train_transformer"]["outputs"]
    assert gpt["steps"] == 4 and gpt["vqgan"] == vq["export"]


def test_fine_tune_starts_from_the_checkpoint_on_every_rank(ray_session, published_run):
    """2 workers, ZeRO-2: each rank's optimizer owns half of the fp32 master weights, so a rank
    that had not loaded init_from would leave its half at the random init after the first
    step. At a tiny learning rate the export after one step is the checkpoint's model; the
    discriminator (no step before disc_start) is the checkpoint's exactly."""
    pipe = _pipe()
    tune = ("train_vqgan.lr=1e-9", "train_vqgan.checkpoint_every=1")
    out = pipe.run(_cfg(pipe, published_run, "train_vqgan.steps=1", *tune))["train_vqgan"]
    assert out["outputs"]["steps"] == 1
    exported, want = _export(out), published_run["vq"]
    torch.manual_seed(0)
    fresh = VQGAN(MODEL).state_dict()
    for k, v in want.items():
        torch.testing.assert_close(exported[k], v, rtol=0, atol=1e-6, msg=k)
    assert max((exported[k] - fresh[k]).abs().max().item() for k in want
               if want[k].is_floating_point()) > 0.05, "not the random init"
    d_states = join(out["uri"], "train", "checkpoint-00000001", "D", "ckpt",
                    "mp_rank_00_model_states.pt")
    d = torch.load(io.BytesIO(Storage().read_bytes(d_states)), weights_only=False)["module"]
    assert_state_equal({k: v.cpu() for k, v in d.items()}, published_run["disc"])

    # A resume takes its own checkpoint: init_from is not read again (here: it is gone).
    os.rename(published_run["ckpt"], published_run["ckpt"] + ".moved")
    try:
        again = pipe.run(_cfg(pipe, published_run, "train_vqgan.steps=2", *tune),
                         local=True)["train_vqgan"]
    finally:
        os.rename(published_run["ckpt"] + ".moved", published_run["ckpt"])
    assert again["uri"] == out["uri"] and again["outputs"]["steps"] == 2
