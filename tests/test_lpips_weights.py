"""pipeline.lpips_weights: the LPIPS heads from the lpips wheel, the VGG16 trunk from a URI or the
torch hub cache, and the error that names the key to set when neither can be had.

Nothing is downloaded: TORCH_HOME points at a fresh folder and ``torch.hub.download_url_to_file``
is replaced (by a stand-in that writes a synthetic vgg16 state dict, or one that fails as
offline).
"""

from __future__ import annotations

import hashlib
import io
import logging
import urllib.error

import pytest
import torch

from pipeline import lpips_weights as W
from pipeline.models import LPIPS
from pipeline.storage import Storage, join
from tests.models.test_lpips import LIN_CHANNELS, torchvision_vgg16_state_dict


@pytest.fixture(scope="module")
def vgg_sd():
    return torchvision_vgg16_state_dict(torch.Generator().manual_seed(0))


def _bytes(sd) -> bytes:
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getvalue()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache; downloads fail as they do offline unless a test says so."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, dst, hash_prefix=None, progress=True):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    return tmp_path / "torch" / "hub" / "checkpoints" / W.VGG16_FILE


def test_heads_come_from_the_lpips_wheel():
    path = W.lpips_heads_path()
    assert path is not None and path.as_posix().endswith("lpips/weights/v0.1/vgg.pth")
    assert hashlib.md5(path.read_bytes()).hexdigest() == W.LPIPS_HEADS_MD5
    heads, source = W.lpips_heads(None, Storage())
    assert "lpips 0.1.4 wheel" in source and "md5 ok" in source
    model = LPIPS("vgg16").load_weights(lin_sd=heads)
    for i, c in enumerate(LIN_CHANNELS):
        w = getattr(model, f"lin{i}").weight
        assert w.shape == (1, c, 1, 1) and torch.equal(w, heads[f"lin{i}.model.1.weight"])
        assert (w >= 0).all() and w.std() > 0  # learned non-negative weights, not the unit ones


def test_heads_without_the_package_name_the_key(monkeypatch):
    monkeypatch.setattr(W, "lpips_heads_path", lambda: None)
    with pytest.raises(W.LPIPSWeightsError) as e:
        W.lpips_heads(None, Storage())
    assert e.value.key == "perceptual.lin_weights"
    assert "pip install --no-deps lpips==0.1.4" in str(e.value)


def test_both_parts_from_uris(vgg_sd, tmp_path, s3_endpoint, s3_bucket, hub):
    """The trunk from a file:// URI, the heads from S3; the hub cache is not touched."""
    storage = Storage(endpoint_url=s3_endpoint)
    vgg_uri = f"file://{tmp_path / 'vgg16.pth'}"
    storage.write_bytes(vgg_uri, _bytes(vgg_sd))
    heads = {f"lin{i}.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(LIN_CHANNELS)}
    lin_uri = join(s3_bucket, "weights", "lpips_vgg.pth")
    storage.write_bytes(lin_uri, _bytes(heads))
    assert W.check_sources(vgg_uri, lin_uri, storage) == {W.VGG_KEY: vgg_uri, W.LIN_KEY: lin_uri}
    model = W.build_lpips("vgg16", vgg_uri, lin_uri, storage)
    assert model.weights_loaded and not hub.exists()
    assert torch.equal(model.net.features[28].weight, vgg_sd["features.28.weight"])
    assert torch.equal(model.lin2.weight, heads["lin2.weight"])
    with pytest.raises(W.LPIPSWeightsError, match="does not exist") as e:
        W.check_sources(join(s3_bucket, "missing.pth"), lin_uri, storage)
    assert e.value.key == "perceptual.vgg_weights"


def test_trunk_from_the_hub_cache(vgg_sd, hub, caplog):
    hub.parent.mkdir(parents=True)
    hub.write_bytes(_bytes(vgg_sd))
    sd, source = W.vgg16_weights(None, Storage())  # downloading would raise: the cache is used
    assert torch.equal(sd["features.0.weight"], vgg_sd["features.0.weight"])
    assert "torch hub cache" in source and str(hub) in source
    with caplog.at_level(logging.INFO, logger="pipeline.lpips_weights"):
        model = W.build_lpips("vgg16", None, None, Storage())
    assert model.weights_loaded
    line = next(r.getMessage() for r in caplog.records if "LPIPS vgg16" in r.getMessage())
    assert "trunk from torchvision ImageNet VGG16, torch hub cache" in line
    assert "heads from lpips 0.1.4 wheel" in line


def test_trunk_is_downloaded_once_when_online(vgg_sd, hub, monkeypatch):
    calls = []

    def download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix))
        with open(dst, "wb") as fh:
            fh.write(_bytes(vgg_sd))

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    sources = W.check_sources(None, None, Storage())
    assert calls == [(W.VGG16_URL, "397923af")]
    assert "download" in sources[W.VGG_KEY] and "lpips 0.1.4 wheel" in sources[W.LIN_KEY]
    _, source = W.vgg16_weights(None, Storage())
    assert len(calls) == 1 and "torch hub cache" in source


def test_offline_without_a_cached_trunk_names_the_key(hub):
    with pytest.raises(W.LPIPSWeightsError) as e:
        W.build_lpips("vgg16", None, None, Storage())
    msg = str(e.value)
    assert e.value.key == "perceptual.vgg_weights"
    assert "train_vqgan.perceptual.vgg_weights" in msg and "URI" in msg
    assert str(hub) in msg and W.VGG16_URL in msg and "URLError" in msg
    assert "perceptual.backbone=random" in msg
    assert not hub.exists()
    assert W.build_lpips("random", None, None, Storage()).weights_loaded  # the offline demo
