"""train_cond_vqgan (issue #16 part 2): the condition maps' VQGAN, trained by train_vqgan's loop.

Covered: label maps (the reference's segmentation VQGAN: one-hot in, logits out, binary
cross-entropy, no GAN) of digits paired from a sibling folder, in this process, whose crops and
flips are their images'; derived Canny edges of the digits on Ray workers; the scores
(pixel accuracy / mean IoU, PSNR) beat the untrained model; the exports load with the
condition's channels; a run without conditions skips the stage (no folder, no change to any
other stage's fingerprint) and `status` says why; the config refuses LPIPS and rFID.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import ConfigError, load_config
from pipeline.dag import Pipeline
from pipeline.data import builtin, loader
from pipeline.data.conditions import ConditionInput, palette
from pipeline.manifests import ShardOutputs
from pipeline.models.vqgan import VQGAN
from pipeline.storage import Storage
from stages import STAGES
from stages.shard import STAGE as SHARD
from stages.train_vqgan import COND_STAGE as TRAIN_COND_VQGAN
from stages.train_vqgan import STAGE as TRAIN_VQGAN
from stages.train_vqgan import recon_scores
from tests.condition_fixtures import CLASSES, label_ids, png_of
from tests.image_fixtures import encoded, write_tree

RES = 16
MODEL = [
    "model.resolution=16", "model.ch=32", "model.ch_mult=[1,2]", "model.num_res_blocks=1",
    "model.attn_resolutions=[8]", "model.z_channels=32", "model.embed_dim=16",
    "model.n_embed=32", "disc.ndf=16", "disc.n_layers=2", "lr=2e-3", "betas=[0.5,0.9]",
    "micro_batch=8", "checkpoint_every=40", "log_every=10", "image_every=40",
    "eval_images=64", "loss.disc_start=20", "loss.disc_weight=0.2",
]


def _cond(*extra: str) -> list[str]:
    return [f"train_cond_vqgan.{o}" for o in (*MODEL, *extra)]


def _run(root, shard: list[str], *extra: str, local: bool = False) -> dict:
    pipe = Pipeline([SHARD, TRAIN_COND_VQGAN])
    cfg = load_config(None, ["run=c", f"storage.root={root}", "tracking.mode=disabled",
                             f"shard.resolution={RES}", "shard.samples_per_shard=64",
                             "shard.val_fraction=0.1", "shard.progress=false", *shard,
                             *_cond(*extra)], pipe.schema)
    return pipe.run(cfg, local=local)


def _digit_tree(root, n: int = 320) -> tuple[str, str]:
    """``n`` digits as 16 px PNGs below root/images and their 3-class label maps (by luma)
    below root/labels, paired by path."""
    images, _ = builtin._digits()
    files, labels = {}, {}
    for i, d in enumerate(images[:n]):
        img = Image.fromarray(d, "L").resize((RES, RES), Image.Resampling.BICUBIC).convert("RGB")
        files[f"d{i // 100}/{i:04d}.png"] = encoded(img, "PNG")
        labels[f"d{i // 100}/{i:04d}.png"] = png_of(label_ids(img))
    write_tree(root / "images", files)
    write_tree(root / "labels", labels)
    return str(root / "images"), str(root / "labels")


def _export(storage: Storage, out: dict) -> VQGAN:
    exp = out["export"]
    return VQGAN.from_bytes(storage.read_text(exp["config"]), storage.read_bytes(exp["weights"]))


def test_segmentation_maps_of_a_sibling_folder(tmp_path):
    images, labels = _digit_tree(tmp_path / "data")
    shard = [f"shard.source={images}", "shard.ext=png", "shard.condition.kind=segmentation",
             f"shard.condition.source={labels}", f"shard.condition.classes={CLASSES}"]
    out = _run(tmp_path / "runs", shard, "steps=150", "num_workers=1", local=True)
    res = out["train_cond_vqgan"]["outputs"]
    assert TRAIN_COND_VQGAN.parse_outputs(out["train_cond_vqgan"]).to_dict() == res
    assert res["condition"] == {"kind": "segmentation", "classes": CLASSES, "channels": CLASSES}
    assert res["model"]["in_channels"] == res["model"]["out_ch"] == CLASSES
    ev, ev0 = res["eval"], res["eval_untrained"]
    assert {"pixel_accuracy", "miou"} <= ev.keys() and "psnr" not in ev and "lpips" not in ev
    assert ev["pixel_accuracy"] > max(0.9, ev0["pixel_accuracy"] + 0.2), (ev, ev0)
    assert ev["miou"] > ev0["miou"] + 0.2, (ev, ev0)
    # The export encodes one-hot maps; its logits' argmax gives the classes back.
    storage = Storage()
    model = _export(storage, res).eval()
    reader = ConditionInput("segmentation", CLASSES)
    shards = ShardOutputs.from_dict(out["shard"]["outputs"])
    x, _ = next(loader.eval_batches(storage, shards.uris("val"), 8, RES, reader=reader))
    with torch.no_grad():
        recon = model(x).recon
    assert recon.shape == (8, CLASSES, RES, RES)
    assert (recon.argmax(1) == x.argmax(1)).double().mean() > 0.85
    # A sample's map gets its image's random crop and flip (the same per-sample draws): the
    # label map of each cropped image (lossless PNGs here) is the cropped label map.
    spec = loader.stream_spec(shards.uris("train"), 0, 1, 3, 8, 0, None)
    kw = dict(random_flip=True, random_crop=True)
    imgs, _, _ = next(loader.image_batches(storage, spec, 32, 11, **kw))
    maps, _, _ = next(loader.image_batches(storage, spec, 32, 11, reader=reader, **kw))
    assert maps.shape == (32, CLASSES, 11, 11)
    for img, m in zip(imgs, maps):
        rgb = ((img + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        assert np.array_equal(label_ids(Image.fromarray(rgb, "RGB")), m.argmax(0).numpy())
    # The grid shows maps in the palette's colours: RGB, both halves only palette colours.
    grid = np.asarray(Image.open(io.BytesIO(storage.read_bytes(res["images"][-1]))))
    colours = {tuple(c) for c in ((palette(CLASSES) + 1) * 127.5).round().byte().tolist()}
    assert grid.shape[-1] == 3 and {tuple(p) for p in grid.reshape(-1, 3)} <= colours | {
        (0, 0, 0), (255, 255, 255)}


def test_canny_edges_on_ray(ray_session, tmp_path):
    shard = ["shard.source=builtin:digits", "shard.condition.kind=canny"]
    out = _run(tmp_path / "runs", shard, "steps=40", "num_workers=2")
    res = out["train_cond_vqgan"]["outputs"]
    assert res["condition"] == {"kind": "canny", "classes": None, "channels": 1}
    ev, ev0 = res["eval"], res["eval_untrained"]
    assert ev["psnr"] > ev0["psnr"] + 3.0 and ev["ssim"] > ev0["ssim"], (ev, ev0)
    assert 0 < ev["codebook_usage"] <= 1
    model = _export(Storage(), res)
    assert model.config.in_channels == model.config.out_ch == 1
    assert model(torch.zeros(2, 1, RES, RES)).recon.shape == (2, 1, RES, RES)


def test_a_run_without_conditions_skips_the_stage(tmp_path):
    pipe = Pipeline(STAGES)
    without = Pipeline([s for s in STAGES if s.name != "train_cond_vqgan"])
    cfg = load_config(None, ["run=s", f"storage.root={tmp_path}"], pipe.schema)
    plan = {p.stage.name: p for p in pipe.plan(cfg)}
    assert plan["train_cond_vqgan"].skipped == "shard.condition.kind is none"
    others = {p.stage.name: p.fingerprint for p in without.plan(
        load_config(None, ["run=s", f"storage.root={tmp_path}"], without.schema))}
    assert {n: p.fingerprint for n, p in plan.items() if n != "train_cond_vqgan"} == others
    status = {r.name: r for r in pipe.status(cfg, Storage())}
    assert status["train_cond_vqgan"].state == "skipped"
    assert status["train_cond_vqgan"].reason == "shard.condition.kind is none"
    # downsample maps are images: the image VQGAN encodes them.
    down = load_config(None, ["shard.condition.kind=downsample:4"], pipe.schema)
    assert "image VQGAN" in TRAIN_COND_VQGAN.skip_reason(down)
    assert TRAIN_COND_VQGAN.skip_reason(load_config(
        None, ["shard.condition.kind=canny"], pipe.schema)) is None


def test_a_skipped_stage_runs_nothing(tmp_path):
    pipe = Pipeline([SHARD, TRAIN_COND_VQGAN])
    cfg = load_config(None, ["run=n", f"storage.root={tmp_path}", "tracking.mode=disabled",
                             "shard.source=builtin:digits:64", "shard.resolution=8",
                             "shard.progress=false"], pipe.schema)
    out = pipe.run(cfg, local=True)
    assert set(out) == {"shard"}
    assert not list((tmp_path / "n").glob("train_cond_vqgan-*"))


@pytest.mark.parametrize("override, key", [
    ("train_cond_vqgan.loss.perceptual_weight=1.0", "train_cond_vqgan.loss.perceptual_weight"),
    ("train_cond_vqgan.fid.enabled=true", "train_cond_vqgan.fid.enabled"),
])
def test_config_refuses_rgb_only_parts(override, key):
    pipe = Pipeline([SHARD, TRAIN_VQGAN, TRAIN_COND_VQGAN])
    with pytest.raises(ConfigError) as e:
        load_config(None, [override], pipe.schema)
    assert e.value.key == key


def test_segmentation_scores_and_reader():
    reader = ConditionInput("segmentation", 3)
    ids = np.array([[0, 1], [2, 2]], dtype=np.int64)
    x = reader.tensor(ids[..., None])
    assert x.shape == (3, 2, 2) and torch.equal(x.argmax(0), torch.from_numpy(ids))
    perfect = recon_scores(x[None], x[None] * 10 - 5, segmentation=True)
    assert perfect["pixel_accuracy"].item() == 1.0 and perfect["miou"].item() == 1.0
    wrong = torch.zeros(1, 3, 2, 2)
    wrong[:, 0] = 1.0  # everything class 0: accuracy 1/4; IoU 1/4 for class 0, 0 for 1 and 2
    s = recon_scores(x[None], wrong, segmentation=True)
    assert s["pixel_accuracy"].item() == 0.25
    assert s["miou"].item() == pytest.approx((0.25 + 0 + 0) / 3)
    with pytest.raises(ValueError, match="class 3"):
        reader.tensor(np.full((2, 2, 1), 3, np.int64))
    with pytest.raises(ValueError, match="image VQGAN|no condition VQGAN"):
        ConditionInput("downsample")
    gray = ConditionInput("depth").preview(torch.tensor([[[[-1.0, 1.0]]]]))
    assert gray.shape == (1, 3, 1, 2) and torch.equal(gray[0, :, 0, 1], torch.ones(3))
