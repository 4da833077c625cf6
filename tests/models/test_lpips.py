"""LPIPS: metric properties, frozen eval module, and loading torchvision / reference weights.

No weights can be downloaded here, so the loaders are tested with synthetic state dicts whose key
names and shapes follow torchvision's ``vgg16()`` and the reference's LPIPS module structure.
"""

from __future__ import annotations

import logging

import pytest
import torch

from pipeline.models import LPIPS
from pipeline.models.lpips import convert_reference_lpips_state_dict, normalize_tensor

pytestmark = pytest.mark.usefixtures("single_thread")

# torchvision vgg16().features: conv layers at these indices (ReLU after each, pools at 4, 9,
# 16, 23, 30), with these output widths; classifier: Linear 25088->4096->4096->1000 at 0, 3, 6.
TV_CONVS = {0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128), 10: (128, 256),
            12: (256, 256), 14: (256, 256), 17: (256, 512), 19: (512, 512), 21: (512, 512),
            24: (512, 512), 26: (512, 512), 28: (512, 512)}
# The reference's vgg16 wrapper: slice s holds torchvision's modules [start, stop) under their
# global index (add_module(str(x), features[x])).
REF_SLICES = {1: (0, 4), 2: (4, 9), 3: (9, 16), 4: (16, 23), 5: (23, 30)}
LIN_CHANNELS = [64, 128, 256, 512, 512]


def torchvision_vgg16_state_dict(gen: torch.Generator) -> dict[str, torch.Tensor]:
    sd = {}
    for i, (cin, cout) in TV_CONVS.items():
        sd[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=gen) * 0.05
        sd[f"features.{i}.bias"] = torch.randn(cout, generator=gen) * 0.05
    for i, (cin, cout) in {0: (25088, 8), 3: (8, 8), 6: (8, 4)}.items():  # shrunk classifier
        sd[f"classifier.{i}.weight"] = torch.zeros(cout, cin)
        sd[f"classifier.{i}.bias"] = torch.zeros(cout)
    return sd


def reference_lpips_state_dict(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Keys of taming's LPIPS module (what ``vgg.pth`` / ``loss.perceptual_loss.*`` hold)."""
    sd = {
        "scaling_layer.shift": torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1),
        "scaling_layer.scale": torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1),
    }
    for s, (start, stop) in REF_SLICES.items():
        for i in range(start, stop):
            if i in TV_CONVS:
                cin, cout = TV_CONVS[i]
                sd[f"net.slice{s}.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=gen) * 0.05
                sd[f"net.slice{s}.{i}.bias"] = torch.randn(cout, generator=gen) * 0.05
    for k, c in enumerate(LIN_CHANNELS):  # NetLinLayer: Sequential(Dropout, Conv2d(c, 1, 1))
        sd[f"lin{k}.model.1.weight"] = torch.rand(1, c, 1, 1, generator=gen)
    return sd


@pytest.fixture(scope="module")
def random_lpips():
    return LPIPS("random")


def test_random_backbone_warns_loudly(caplog):
    with caplog.at_level(logging.WARNING):
        LPIPS("random")
    assert any("NOT the paper's LPIPS" in r.getMessage() for r in caplog.records)


def test_metric_properties(random_lpips):
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    y = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.equal(random_lpips(x, x), torch.zeros(2, 1, 1, 1))
    d = random_lpips(x, y)
    assert d.shape == (2, 1, 1, 1) and (d > 0).all()
    torch.testing.assert_close(d, random_lpips(y, x))


def test_frozen_eval_and_differentiable_in_input(random_lpips):
    assert not any(p.requires_grad for p in random_lpips.parameters())
    random_lpips.train()
    assert not random_lpips.training
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    y = (torch.rand(1, 3, 32, 32) * 2 - 1).requires_grad_(True)
    random_lpips(x, y).sum().backward()
    assert y.grad.abs().sum() > 0


def test_vgg16_backbone_needs_weights():
    model = LPIPS("vgg16")
    with pytest.raises(RuntimeError, match="no weights"):
        model(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32))
    with pytest.raises(ValueError, match="backbone"):
        LPIPS("resnet")


def test_torchvision_vgg16_state_dict_loads():
    gen = torch.Generator().manual_seed(0)
    tv = torchvision_vgg16_state_dict(gen)
    model = LPIPS("vgg16").load_weights(vgg_sd=tv)
    assert not model.weights_loaded  # heads still missing
    lin = {f"lin{k}.weight": torch.rand(1, c, 1, 1, generator=gen)
           for k, c in enumerate(LIN_CHANNELS)}
    model.load_weights(lin_sd=lin)
    assert model.weights_loaded
    for i in TV_CONVS:
        assert torch.equal(model.net.features[i].weight, tv[f"features.{i}.weight"])
    assert torch.equal(model.lin3.weight, lin["lin3.weight"])
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert model(x, x).item() == 0.0


def test_reference_checkpoint_key_mapping():
    gen = torch.Generator().manual_seed(1)
    ref = reference_lpips_state_dict(gen)
    mapped = convert_reference_lpips_state_dict(ref)
    ours = LPIPS("vgg16").state_dict()
    assert set(mapped) == set(ours)
    assert all(mapped[k].shape == ours[k].shape for k in ours)

    model = LPIPS.from_state_dict(ref)
    assert model.weights_loaded and not any(p.requires_grad for p in model.parameters())
    for s, (start, stop) in REF_SLICES.items():
        for i in set(range(start, stop)) & set(TV_CONVS):
            assert torch.equal(model.net.features[i].weight, ref[f"net.slice{s}.{i}.weight"])
            assert torch.equal(model.net.features[i].bias, ref[f"net.slice{s}.{i}.bias"])
    for k in range(5):
        assert torch.equal(getattr(model, f"lin{k}").weight, ref[f"lin{k}.model.1.weight"])
    # The same weights through load_weights (heads in reference format) give the same distance.
    tv = {f"features.{i}.{p}": ref[f"net.slice{s}.{i}.{p}"]
          for s, (a, b) in REF_SLICES.items() for i in set(range(a, b)) & set(TV_CONVS)
          for p in ("weight", "bias")}
    other = LPIPS("vgg16").load_weights(vgg_sd=tv, lin_sd=ref)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(model(x, y), other(x, y))
    # Inside a taming VQGAN checkpoint the same weights sit under loss.perceptual_loss.
    nested = {f"loss.perceptual_loss.{k}": v for k, v in ref.items()}
    assert set(convert_reference_lpips_state_dict(nested)) == set(ours)


def test_distance_matches_reference_formula():
    """sum_l spatial_mean(lin_l((n(f_l x) - n(f_l y))²)) computed the long way."""
    model = LPIPS.from_state_dict(reference_lpips_state_dict(torch.Generator().manual_seed(2)))
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    fx = model.net((x - model.shift) / model.scale)
    fy = model.net((y - model.shift) / model.scale)
    expected = sum(
        lin((normalize_tensor(a) - normalize_tensor(b)) ** 2).mean(dim=(2, 3), keepdim=True)
        for a, b, lin in zip(fx, fy, model.lins)
    )
    torch.testing.assert_close(model(x, y), expected)
