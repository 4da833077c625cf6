"""Conditional codes through tokenize and train_transformer (issue #16 part 3).

One run over the digits with derived Canny edges (in this process, without Ray): train_vqgan,
train_cond_vqgan, tokenize (with mirrored copies), train_transformer. Covered: every code shard
carries the edge maps' codes, equal to the condition VQGAN's encoding of the center-cropped map
(and of its mirror); the manifest records the condition codes; the GPT reads [start ; condition
codes ; image codes], learns the image codes only, and its val loss is lower with each sample's
own map than with another sample's map (it uses the condition); the sample grid shows condition
| sample | truth rows; `use_condition: false` trains an unconditional GPT on the same codes; an
unconditional run's fingerprints are those of a pipeline without the branch. Sampling: the
sample stage draws for val maps (condition | sample | truth rows) and, from the whole 32 px maps
(4x the trained area), high-resolution samples; `sample RUN --cond MAP.png` for a user's map.
"""

from __future__ import annotations

import io
from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.dag import Pipeline
from pipeline.data import codes, loader
from pipeline.data.conditions import ConditionInput
from pipeline.manifests import TokenizeOutputs
from pipeline.models.gpt import GPT
from pipeline.models.vqgan import VQGAN
from pipeline.storage import Storage
from stages import STAGES
from stages.tokenize import CondOptions, Options, plan_tasks, reusable
from stages.train_transformer import evaluate
from tests.test_train_vqgan import TINY as TINY_VQGAN

RES = 16
TINY = [*[o for o in TINY_VQGAN if not o.startswith(("train_vqgan.num_workers",
                                                       "train_vqgan.zero_stage"))],
        "shard.condition.kind=canny", "shard.samples_per_shard=128", "shard.resolution=32",
        "train_vqgan.steps=40", "train_vqgan.checkpoint_every=40", "train_vqgan.eval_images=16",
        *[f"train_cond_vqgan.{o}" for o in (
            "model.resolution=16", "model.ch=32", "model.ch_mult=[1,2]", "model.num_res_blocks=1",
            "model.attn_resolutions=[8]", "model.z_channels=32", "model.embed_dim=16",
            "model.n_embed=32", "disc.ndf=16", "disc.n_layers=2", "lr=2e-3", "betas=[0.5,0.9]",
            "micro_batch=8", "steps=40", "checkpoint_every=40", "eval_images=16",
            "loss.disc_start=30", "loss.disc_weight=0.2")],
        "tokenize.store_flipped=true",
        "train_transformer.n_layer=2", "train_transformer.n_head=2",
        "train_transformer.n_embd=64", "train_transformer.micro_batch=16",
        "train_transformer.lr=3e-3", "train_transformer.warmup_steps=5",
        "train_transformer.schedule=constant", "train_transformer.steps=300",
        "train_transformer.checkpoint_every=300", "train_transformer.log_every=50",
        "train_transformer.image_every=300", "train_transformer.eval_samples=200",
        "train_transformer.samples_per_class=1", "train_transformer.conditional=false",
        "train_baseline_transformer.enabled=true", "train_baseline_transformer.steps=40",
        "sample.n=4", "sample.highres_n=1"]
PIPE = Pipeline(STAGES)


def _cfg(root, *extra: str):
    return load_config(None, ["run=cond", f"storage.root={root}", "tracking.mode=disabled",
                              *TINY, *extra], PIPE.schema)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cond")
    cfg = _cfg(root)
    return {"root": root, "cfg": cfg, "manifests": PIPE.run(cfg, local=True)}


def _vqgan(storage: Storage, export) -> VQGAN:
    return VQGAN.from_bytes(storage.read_text(export.config),
                            storage.read_bytes(export.weights)).eval()


def test_tokenize_stores_the_condition_codes(run):
    storage = Storage()
    m = run["manifests"]
    tok = TokenizeOutputs.from_dict(m["tokenize"]["outputs"])
    cond = tok.condition
    assert cond is not None and cond.kind == "canny" and cond.classes == 0
    assert cond.grid == (8, 8) and cond.n_embed == 32 and cond.dtype == "uint16"
    assert cond.vqgan.weights == m["train_cond_vqgan"]["outputs"]["export"]["weights"]
    assert cond.vqgan.train_vqgan_fingerprint == m["train_cond_vqgan"]["fingerprint"]
    assert sum(cond.histogram["train"]) == tok.splits["train"].samples * 64
    assert 0 < cond.usage["train"]["fraction"] <= 1
    assert tok.format["cond"] == codes.COND and tok.format["cond_flip"] == codes.COND_FLIP

    # The stored codes are the condition VQGAN's encoding of each center-cropped map (and of
    # the mirrored map), sample for sample, in the image shard's order.
    cond_vq = _vqgan(storage, cond.vqgan)
    reader = ConditionInput("canny")
    image_shard = m["shard"]["outputs"]["shards"][0]
    spec = codes.shard_specs(tok)[0]
    assert spec.uri.endswith(image_shard["name"]) and spec.cond and spec.cond_grid == (8, 8)
    shard = codes.load_code_shard(storage, spec)
    maps, _ = next(loader.eval_batches(storage, [image_shard["uri"]], 32, RES, reader=reader))
    assert maps.shape == (32, 1, RES, RES)  # center crops of the 32 px maps
    with torch.inference_mode():
        want = cond_vq.encode(maps).indices.numpy()
        want_flip = cond_vq.encode(maps.flip(3)).indices.numpy()
    assert shard.cond is not None and shard.cond_flip is not None
    np.testing.assert_array_equal(shard.cond[:32], want)
    np.testing.assert_array_equal(shard.cond_flip[:32], want_flip)
    assert not np.array_equal(shard.cond, shard.codes)  # two encoders, two codebooks

    # A code shard is reused only when made with the same condition encoder and grid.
    task = plan_tasks(m["tokenize"]["uri"], [tok.shards[0]])[0]
    task.update(source=image_shard["uri"], source_sha256=image_shard["sha256"],
                source_samples=image_shard["samples"])
    c = CondOptions(kind="canny", classes=0, grid=(8, 8), n_embed=32, dtype="uint16",
                    vqgan_sha256=cond.vqgan.weights_sha256)
    opts = Options(resolution=RES, grid=tok.grid, n_embed=tok.n_embed, dtype=tok.dtype,
                   flip=True, batch_size=5, vqgan_sha256=tok.vqgan.weights_sha256, cond=c)
    assert reusable(storage, task, opts) is not None
    assert reusable(storage, task, replace(opts, cond=replace(c, vqgan_sha256="0" * 64))) is None
    assert reusable(storage, task, replace(opts, cond=None)) is None


def test_reader_checks_the_condition_codes(run, tmp_path):
    storage = Storage()
    tok = TokenizeOutputs.from_dict(run["manifests"]["tokenize"]["outputs"])
    spec = codes.shard_specs(tok)[0]
    with pytest.raises(codes.CorruptShardError, match="outside the codebook of 31"):
        codes.load_code_shard(storage, replace(spec, cond_n_embed=31, sha256=None))
    with pytest.raises(codes.CorruptShardError, match=r"cond.npy grid \[8, 8\] != expected"):
        codes.load_code_shard(storage, replace(spec, cond_grid=(4, 4), sha256=None))
    with pytest.raises(codes.CorruptShardError, match="has .cond.npy but the shard has none"):
        codes.load_code_shard(storage, replace(spec, cond=False, sha256=None))


def test_transformer_reads_the_condition(run):
    storage = Storage()
    m = run["manifests"]
    out = m["train_transformer"]["outputs"]
    assert out["condition"]["kind"] == "canny" and out["condition"]["length"] == 64
    exp = out["export"]
    model = GPT.from_bytes(storage.read_text(exp["config"]), storage.read_bytes(exp["weights"]))
    c = model.config
    assert (c.cond_length, c.cond_vocab_size, c.block_size) == (64, 32, 64 + 64)
    assert out["val_loss"] < out["unigram_entropy"] - 0.2, out

    # Its own map helps: the val loss is lower than with the maps of other samples.
    tok = TokenizeOutputs.from_dict(m["tokenize"]["outputs"])
    val = [codes.load_code_shard(storage, s) for s in codes.shard_specs(tok, "val")]
    grids = torch.from_numpy(np.concatenate([s.codes for s in val]).astype(np.int64))
    maps = torch.from_numpy(np.concatenate([s.cond for s in val]).astype(np.int64))
    n = len(grids)
    with torch.no_grad():
        own = float(model.loss(grids.view(n, -1), cond_codes=maps.view(n, -1)))
        other = float(model.loss(grids.view(n, -1), cond_codes=maps.roll(1, 0).view(n, -1)))
    assert own == pytest.approx(evaluate(model, storage, tok.uris("val"), 64, 10_000)["loss"],
                                rel=1e-4)
    assert own < other - 0.03, (own, other)  # 1.60 vs 1.68 on Zen4

    # condition | sample | truth rows: 3 cells of 64 px (16 px upscaled) + padding per row.
    from PIL import Image

    png = [u for u in out["images"] if u.endswith("samples-00000300.png")]
    with Image.open(storage.open(png[0], "rb")) as img:
        assert img.size[0] == 3 * (64 + 8) + 8  # pad 2 px, upscaled 4x


def test_use_condition_false_trains_an_unconditional_gpt(run):
    cfg = _cfg(run["root"], "train_transformer.use_condition=false", "train_transformer.steps=20",
               "train_transformer.checkpoint_every=20", "train_transformer.image_every=20")
    out = PIPE.run(cfg, local=True)
    res = out["train_transformer"]
    assert res["fingerprint"] != run["manifests"]["train_transformer"]["fingerprint"]
    assert out["tokenize"]["fingerprint"] == run["manifests"]["tokenize"]["fingerprint"]
    assert "condition" not in res["outputs"]
    exp = res["outputs"]["export"]
    storage = Storage()
    model = GPT.from_bytes(storage.read_text(exp["config"]), storage.read_bytes(exp["weights"]))
    assert model.config.cond_length == 0 and model.config.block_size == 64


def test_unconditional_runs_keep_fingerprints(tmp_path):
    """The optional upstreams (tokenize's train_cond_vqgan, sample's baseline) leave runs
    without conditions as they were: every fingerprint equals the one of a pipeline built
    without the condition branch (which runs those stages as if they had no such upstream)."""
    branch = ("train_cond_vqgan", "train_baseline_transformer")
    plain = Pipeline([s for s in STAGES if s.name not in branch])
    assert plain.stages["tokenize"].upstream == ("shard", "train_vqgan")
    assert plain.stages["sample"].upstream == ("shard", "train_transformer")
    args = ["run=p", f"storage.root={tmp_path}", "tracking.mode=disabled"]
    full = {p.stage.name: p.fingerprint for p in Pipeline(STAGES).plan(
        load_config(None, args, Pipeline(STAGES).schema)) if not p.skipped}
    assert set(full) == set(plain.stages)
    assert full == {p.stage.name: p.fingerprint
                    for p in plain.plan(load_config(None, args, plain.schema))}


def test_sample_cli_from_a_users_condition_map(run, tmp_path, capsys):
    """`sample RUN --cond MAP.png`: a map 4x the trained area gives images of its size (sliding
    window, the condition cropped under it); the map is saved beside them; a run with condition
    maps refuses to sample without one."""
    from PIL import Image

    from pipeline.cli import main
    from pipeline.data.conditions import COND
    from pipeline.data.wds import iter_samples

    storage = Storage()
    # This GPT by its folder: the run folder's latest is the use_condition=false one.
    run_uri = run["manifests"]["train_transformer"]["uri"]
    first = run["manifests"]["shard"]["outputs"]["shards"][-1]["uri"]
    big = np.asarray(Image.open(io.BytesIO(next(iter_samples(storage, first))[COND])))
    assert big.shape == (32, 32)  # a stored map: 4x the trained area
    path = tmp_path / "edges.png"
    Image.fromarray(big[:, :31], "L").save(path)  # 31 px wide: center-cropped to 30 (factor 2)
    out = tmp_path / "out"
    assert main(["sample", run_uri, "--cond", str(path), "--out", str(out), "--n", "2",
                 "--threads", "1"]) == 0
    meta = storage.read_json(str(out / "samples.json"))
    assert meta["code_grid"] == [16, 15] and meta["image_size"] == [32, 30]
    assert meta["condition"]["kind"] == "canny" and meta["condition"]["size"] == [32, 30]
    with Image.open(out / meta["files"][0]["file"]) as img:
        assert img.size == (30, 32)
    with Image.open(out / "condition.png") as img:
        assert img.size == (30, 32)

    capsys.readouterr()
    assert main(["sample", run_uri, "--out", str(out)]) == 2
    assert "give one (--cond MAP.png)" in capsys.readouterr().err
    Image.fromarray(big[:8, :8], "L").save(tmp_path / "small.png")
    assert main(["sample", run_uri, "--cond", str(tmp_path / "small.png"), "--out",
                 str(out)]) == 2
    assert "smaller than the trained size 16x16" in capsys.readouterr().err
    Image.fromarray(big, "L").convert("RGB").save(tmp_path / "rgb.png")
    assert main(["sample", run_uri, "--cond", str(tmp_path / "rgb.png"), "--out",
                 str(out)]) == 2
    assert "not a canny map" in capsys.readouterr().err


def test_sample_stage_draws_for_val_maps(run):
    storage = Storage()
    out = run["manifests"]["sample"]["outputs"]
    cond = out["condition"]
    assert cond["kind"] == "canny" and cond["maps"] == "the first 4 val samples"
    assert out["n"] == 4 and out["image_size"] == [RES, RES] and "highres_absent" not in cond
    from PIL import Image

    with Image.open(storage.open(cond["triplets_png"], "rb")) as img:  # 4 rows of 3 cells
        assert img.size == (4 * (3 * (RES + 2) + 2), 4 * (4 * (RES + 2) + 2))
    assert cond["highres_maps"] == "the whole 32 px maps of the first 1 val samples"
    hr = out["highres"]
    assert hr["code_grid"] == [16, 16] and hr["image_size"] == [32, 32]
    with Image.open(storage.open(hr["files"][0], "rb")) as img:
        assert img.size == (32, 32)
    # Edge F1 against the maps: of the samples, of the real images (the ceiling: their edges are
    # the maps, up to the crop's border), of the unconditional baseline's samples, and chance.
    f1 = cond["edge_f1"]
    assert set(f1) == {"samples", "real_images", "other_maps", "unconditional_model", "sigma",
                       "tolerance_px"}
    assert all(0 <= f1[k]["f1"] <= 1 and f1[k]["images"] == 4
               for k in ("samples", "real_images", "other_maps", "unconditional_model"))
    assert f1["real_images"]["f1"] > max(0.8, f1["samples"]["f1"])
    base = run["manifests"]["train_baseline_transformer"]
    assert cond["baseline"] == base["uri"] and "condition" not in base["outputs"]
    assert base["outputs"]["steps"] == 40
    meta = storage.read_json(f"{run['manifests']['sample']['uri']}/samples.json")
    assert meta["files"][0] == {"file": "sample-000.png", "class": None,
                                "condition_of": "val sample 0"}


def test_baseline_is_skipped_unless_enabled_with_maps(tmp_path):
    from stages.sample import mosaics

    plan = {p.stage.name: p.skipped for p in PIPE.plan(_cfg(
        tmp_path, "train_baseline_transformer.enabled=false"))}
    assert plan["train_baseline_transformer"] == "train_baseline_transformer.enabled is false"
    plan = {p.stage.name: p.skipped for p in PIPE.plan(_cfg(tmp_path,
                                                            "shard.condition.kind=none"))}
    assert plan["train_baseline_transformer"] == "shard.condition.kind is none"
    assert plan["train_cond_vqgan"] == "shard.condition.kind is none"
    plan = {p.stage.name: p.skipped for p in PIPE.plan(_cfg(tmp_path,
                                                            "shard.condition.kind=downsample:2"))}
    assert plan["train_baseline_transformer"] is None  # the GPT reads the low-res codes
    assert plan["train_cond_vqgan"].endswith("the image VQGAN encodes those maps")
    # 2x2 mosaics (the high-resolution maps when the shards are no larger than the crops)
    maps = torch.arange(8.0).view(8, 1, 1, 1).expand(8, 1, 2, 2)
    tiles = mosaics(maps)
    assert tiles.shape == (2, 1, 4, 4)
    assert tiles[0, 0, ::2, ::2].tolist() == [[0, 1], [2, 3]]
    assert tiles[1, 0, 1::2, 1::2].tolist() == [[4, 5], [6, 7]]


@pytest.fixture(scope="module")
def lowres(tmp_path_factory):
    """A super-resolution run: digits at 16 px conditioned on their 8 px versions."""
    root = tmp_path_factory.mktemp("sr")
    extra = ["shard.condition.kind=downsample:2", "shard.resolution=16",
             "train_vqgan.steps=20", "train_vqgan.checkpoint_every=20",
             "train_transformer.steps=40", "train_transformer.checkpoint_every=40",
             "train_transformer.image_every=40", "train_baseline_transformer.enabled=false",
             "sample.highres_n=1"]
    cfg = _cfg(root, *extra)
    return {"root": root, "manifests": PIPE.run(cfg, local=True)}


def test_downsample_maps_are_encoded_by_the_image_vqgan(lowres, tmp_path):
    """downsample:N needs no condition VQGAN: tokenize encodes the low-resolution image, enlarged
    back (bicubic), with the image VQGAN, on the image's grid and codebook; the GPT reads those
    codes; `sample --cond LOW.png` enlarges a user's small image N times."""
    from PIL import Image

    from pipeline.cli import main
    from pipeline.data.conditions import COND, LowResInput
    from pipeline.data.wds import iter_samples

    storage = Storage()
    m = lowres["manifests"]
    assert "train_cond_vqgan" not in m
    tok = TokenizeOutputs.from_dict(m["tokenize"]["outputs"])
    c = tok.condition
    assert c is not None and c.kind == "downsample:2"
    assert (c.grid, c.n_embed) == (tok.grid, tok.n_embed) and c.vqgan == tok.vqgan
    vq = _vqgan(storage, tok.vqgan)
    shard = codes.load_code_shard(storage, codes.shard_specs(tok)[0])
    image_shard = m["shard"]["outputs"]["shards"][0]["uri"]
    maps, _ = next(loader.eval_batches(storage, [image_shard], 16, RES, reader=LowResInput(2)))
    assert maps.shape == (16, 3, RES, RES)
    with torch.inference_mode():
        np.testing.assert_array_equal(shard.cond[:16], vq.encode(maps).indices.numpy())
    exp = m["train_transformer"]["outputs"]["export"]
    gpt = GPT.from_bytes(storage.read_text(exp["config"]), storage.read_bytes(exp["weights"]))
    assert (gpt.config.cond_vocab_size, gpt.config.cond_length) == (tok.n_embed, 64)
    out = m["sample"]["outputs"]
    assert out["condition"]["kind"] == "downsample:2" and "edge_f1" not in out["condition"]
    assert out["highres"]["image_size"] == [32, 32]  # a 2x2 mosaic of the val maps

    small = np.asarray(Image.open(io.BytesIO(next(iter_samples(storage, image_shard))[COND])))
    assert small.shape == (8, 8, 3)
    big = np.concatenate([small, small], axis=1)  # 8x16 px: x2 gives a 16x32 image
    Image.fromarray(big, "RGB").save(tmp_path / "low.png")
    run_uri = m["train_transformer"]["uri"]
    assert main(["sample", run_uri, "--cond", str(tmp_path / "low.png"), "--out",
                 str(tmp_path / "sr"), "--n", "1", "--threads", "1"]) == 0
    meta = storage.read_json(str(tmp_path / "sr" / "samples.json"))
    assert meta["image_size"] == [16, 32] and meta["code_grid"] == [8, 16]


def test_the_default_configs_fingerprints_are_pinned():
    """The tiny demo's stage fingerprints as before the condition branch (part 3) existed: a new
    option must not make every existing run redo its stages (use fingerprint_unless_default).
    Change these only with a deliberate, noted reason."""
    from tests.conftest import REPO

    cfg = load_config(str(REPO / "configs" / "tiny.yaml"), [], PIPE.schema)
    got = {p.stage.name: p.fingerprint[:12] for p in PIPE.plan(cfg) if not p.skipped}
    assert got == {"shard": "bb74e277c49c", "train_vqgan": "c283b53558a6",
                   "tokenize": "e968193576d9", "train_transformer": "ac006b020bec",
                   "sample": "d21e5cd4e176"}


def test_tokenize_with_conditions_resumes_byte_identical(run, monkeypatch):
    """Killed after 3 code shards and rerun, tokenize ends with the same bytes (condition codes
    included) and reuses what was finalized; nothing downstream sees a change."""
    from pipeline import faults
    from pipeline.dag import StageFailed

    storage = Storage()
    m = run["manifests"]["tokenize"]
    before = {s["name"]: s["sha256"] for s in m["outputs"]["shards"]}
    monkeypatch.setenv(faults.ENV, "tokenize:3")
    with pytest.raises(StageFailed, match=faults.ENV):
        PIPE.run(run["cfg"], local=True, only=["tokenize"], force=["tokenize"])
    monkeypatch.delenv(faults.ENV)
    again = PIPE.run(run["cfg"], local=True, only=["tokenize"])["tokenize"]
    assert again["fingerprint"] == m["fingerprint"]
    assert again["outputs"]["shards_reused"] == 3
    assert {s["name"]: s["sha256"] for s in again["outputs"]["shards"]} == before
    assert again["outputs"]["condition"] == m["outputs"]["condition"]
    for s in again["outputs"]["shards"]:
        assert storage.size(s["uri"]) == s["bytes"]


def test_every_stage_record_reproduces_its_manifest(run):
    """The condition branch's records (CondVQGANOutputs, tokenize's CondCodes, the GPTs' and
    sample's condition) read back exactly what was written."""
    for stage in PIPE.stages.values():
        manifest = run["manifests"][stage.name]
        assert stage.parse_outputs(manifest).to_dict() == manifest["outputs"], stage.name
