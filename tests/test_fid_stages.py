"""FID wired into the stages: train_vqgan's export writes rFID (trained and untrained) to
eval.json, the W&B summary and the report; the sample stage's FID against the training images
reaches its record and report; absent figures carry their reason; the settings stay out of the
fingerprints and are validated with their dotted keys.

A tiny TorchScript stand-in (tests.test_fid.tiny_torchscript, through ``fid.weights``) replaces
the InceptionV3 so these run in seconds; the real network is tested in tests/test_fid.py.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.config import ConfigError, fingerprint_view, load_config
from pipeline.data import wds
from pipeline.fid import ENV_OFF, FIDConfig
from pipeline.manifests import Export, SampleOutputs, VQGANOutputs
from pipeline.models.vqgan import VQGAN, VQGANConfig
from pipeline.storage import Storage, join
from pipeline.train.state import TrainState
from tests.image_fixtures import encoded, gradient
from tests.test_fid import tiny_torchscript

TINY_VQGAN = VQGANConfig(resolution=16, ch=32, ch_mult=[1, 2], num_res_blocks=1,
                         attn_resolutions=[8], z_channels=32, embed_dim=16, n_embed=64)


class SummaryTracker:
    def __init__(self) -> None:
        self.summaries: dict = {}

    def summary(self, values: dict) -> None:
        self.summaries.update(values)


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """(storage, a 12-image val shard, a stand-in Inception's URI); FID on."""
    monkeypatch.setenv(ENV_OFF, "1")
    storage = Storage()
    shard = str(tmp_path / "val-000000.tar")
    with open(shard, "wb") as fh, wds.shard_writer(fh) as (tar, _):
        for i in range(12):
            tar.write({"__key__": f"{i:04d}", "png": encoded(gradient(16, 16, seed=i), "PNG"),
                       "cls": b"0"})
    weights = str(tmp_path / "inception.pt")
    storage.write_bytes(weights, tiny_torchscript())
    return storage, shard, weights


def _export(storage, shard, uri, fid: FIDConfig):
    from stages.train_vqgan import TrainVQGANConfig, export

    cfg = TrainVQGANConfig(model=TINY_VQGAN, eval_images=10, fid=fid)
    tracker = SummaryTracker()
    torch.manual_seed(0)
    export(VQGAN(TINY_VQGAN), cfg, None, storage, uri, 0, [shard], tracker,
           TrainState(step=3, samples_seen=48))
    return storage.read_json(join(uri, "eval.json")), tracker


def _outputs(ev) -> VQGANOutputs:
    return VQGANOutputs(steps=3, samples_seen=48, export=Export("w", "c"),
                        model=TINY_VQGAN.to_dict(), latent_size=8, eval=ev["trained"],
                        eval_untrained=ev["untrained"], rfid=ev["rfid"])


def test_train_vqgan_export_records_rfid(setup, tmp_path):
    from stages.train_vqgan import report

    storage, shard, weights = setup
    ev, tracker = _export(storage, shard, str(tmp_path / "stage"),
                          FIDConfig(weights=weights, images=8, batch_size=4))
    rec = ev["rfid"]
    assert rec["status"] == "ok" and rec["weights"] == weights and rec["features"] == 16
    assert (rec["images"], rec["reference_images"], rec["reference"]) == (8, 8, "val inputs")
    assert ev["trained"]["rfid"] > 0 and ev["untrained"]["rfid"] > 0
    assert ev["trained"]["images"] == 10  # the other metrics keep eval_images
    assert tracker.summaries["eval/rfid"] == ev["trained"]["rfid"]
    label = report(_outputs(ev))["metrics"]["val rFID"]
    assert label == (f"{ev['trained']['rfid']:.4g} (untrained {ev['untrained']['rfid']:.4g}; "
                     "8 images)")


def test_train_vqgan_export_records_why_rfid_is_absent(setup, tmp_path, monkeypatch):
    from stages.train_vqgan import report

    storage, shard, _ = setup
    ev, tracker = _export(storage, shard, str(tmp_path / "off"), FIDConfig(enabled=False))
    assert ev["rfid"] == {"status": "absent", "reason": "turned off (fid.enabled=false)"}
    assert "rfid" not in ev["trained"] and "eval/rfid" not in tracker.summaries
    assert report(_outputs(ev))["metrics"]["val rFID"] == \
        "absent: turned off (fid.enabled=false)"
    ev, _ = _export(storage, shard, str(tmp_path / "gone"),
                    FIDConfig(weights=str(tmp_path / "missing.pt")))
    assert ev["rfid"]["status"] == "absent" and "cannot be read" in ev["rfid"]["reason"]
    # A manifest from before rFID: no entry at all.
    old = VQGANOutputs.from_dict({k: v for k, v in _outputs(ev).to_dict().items()
                                  if k != "rfid"})
    assert "val rFID" not in report(old)["metrics"]


def _sample_outputs(fid) -> SampleOutputs:
    return SampleOutputs(grid_png="g.png", samples_dir="s", n=4, n_per_class=None, classes=[],
                         code_grid=(8, 8), image_size=(16, 16), sampling_seconds=1.0,
                         tokens_per_s=1.0, options={}, fid=fid)


def test_sample_fid_against_the_training_images(setup):
    from stages.sample import report, sample_fid

    storage, shard, weights = setup
    samples = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    rec = sample_fid(FIDConfig(weights=weights, images=10, batch_size=4), storage, samples,
                     [shard], "cpu")
    assert rec["status"] == "ok" and rec["value"] > 0
    assert (rec["images"], rec["reference_images"], rec["reference"]) == \
        (6, 10, "training images")
    few = sample_fid(FIDConfig(weights=weights, images=3), storage, samples, [shard], "cpu")
    assert (few["images"], few["reference_images"]) == (3, 3)  # spread over the samples
    out = _sample_outputs(rec)
    assert SampleOutputs.from_dict(out.to_dict()).fid == rec
    assert report(out)["metrics"]["FID vs training images"] == \
        f"{rec['value']:.4g} (6 samples vs 10 training images)"
    absent = sample_fid(FIDConfig(enabled=False), storage, samples, [shard], "cpu")
    assert report(_sample_outputs(absent))["metrics"]["FID vs training images"] == \
        "absent: turned off (fid.enabled=false)"
    assert "FID vs training images" not in report(_sample_outputs(None))["metrics"]


def test_fid_settings_are_validated_and_outside_the_fingerprints():
    from pipeline.cli import default_pipeline
    from stages.sample import SampleConfig
    from stages.train_vqgan import TrainVQGANConfig

    schema = default_pipeline().schema
    base = ["train_vqgan.perceptual.backbone=random"]
    cfg = load_config(None, base + ["train_vqgan.fid.images=64", "sample.fid.enabled=false",
                                    "sample.fid.weights=s3://b/inception.pt"], schema)
    assert cfg.train_vqgan.fid.images == 64 and not cfg.sample.fid.enabled
    for key in ("train_vqgan.fid.images=1", "sample.fid.batch_size=0"):
        with pytest.raises(ConfigError) as e:
            load_config(None, base + [key], schema)
        assert e.value.key == key.split("=")[0]
    assert "fid" not in fingerprint_view(TrainVQGANConfig())
    assert "fid" not in fingerprint_view(SampleConfig())
