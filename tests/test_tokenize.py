"""The tokenize stage end to end: real Ray Data actor pool, local and moto-S3 roots.

One tiny VQGAN is trained once per module (shard + train_vqgan, 10 steps, local root); each test
clones those two finished stage folders into its own root (local or S3, manifests rewritten to
the new URIs), so tokenize runs on real upstream outputs wherever the root is.

Covered: manifest contents (grid, dtype, tokens, histogram, export fingerprint), one code shard
per image shard matched by name, codes equal to the VQGAN's own on the same images (decoding
them gives its reconstruction bit for bit), flip codes, kill-and-resume byte-identical to a
clean run, damaged outputs redone on resume, corrupt or truncated code shards rejected by the
reader, resource errors instead of hangs.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from pipeline import faults
from pipeline.config import ConfigError, load_config
from pipeline.dag import Pipeline, StageFailed
from pipeline.data import codes, wds
from pipeline.data.codes import CodeShardSpec, CorruptShardError, load_code_shard, shard_specs
from pipeline.data.loader import eval_batches
from pipeline.manifests import ShardOutputs
from pipeline.models.vqgan import VQGAN
from pipeline.storage import MANIFEST, Storage, is_temporary, join
from stages.shard import STAGE as SHARD
from stages.tokenize import (
    STAGE,
    Options,
    ResourceError,
    TokenizeConfig,
    check_inputs,
    plan_actors,
    plan_tasks,
    reusable,
)
from stages.train_vqgan import STAGE as TRAIN_VQGAN

# As tests/test_train_vqgan.py, but one worker and 10 steps: tokenize needs a real export, not a
# good one.
TINY = [
    "shard.source=builtin:digits", "shard.resolution=16", "shard.samples_per_shard=256",
    "shard.val_fraction=0.1", "shard.progress=false",
    "train_vqgan.model.resolution=16", "train_vqgan.model.ch=32", "train_vqgan.model.ch_mult=[1,2]",
    "train_vqgan.model.num_res_blocks=1", "train_vqgan.model.attn_resolutions=[8]",
    "train_vqgan.model.z_channels=32", "train_vqgan.model.embed_dim=16",
    "train_vqgan.model.n_embed=64",
    "train_vqgan.disc.ndf=16", "train_vqgan.disc.n_layers=2",
    "train_vqgan.perceptual.backbone=random", "train_vqgan.loss.perceptual_weight=0.1",
    "train_vqgan.loss.disc_start=40", "train_vqgan.loss.disc_weight=0.2",
    "train_vqgan.lr=2e-3", "train_vqgan.micro_batch=8", "train_vqgan.zero_stage=2",
    "train_vqgan.num_workers=1", "train_vqgan.checkpoint_every=10", "train_vqgan.log_every=10",
    "train_vqgan.image_every=10", "train_vqgan.eval_images=16", "train_vqgan.steps=10",
    "tokenize.progress=false",
]
RUN = "tok"
BATCH = 48  # does not divide the 256-sample shards: partial minibatches are exercised


def make_cfg(root: str, endpoint: str | None, *extra: str):
    pipe = Pipeline([SHARD, TRAIN_VQGAN, STAGE])
    args = [f"run={RUN}", f"storage.root={root}", "tracking.mode=disabled", *TINY,
            "tokenize.store_flipped=true", f"tokenize.batch_size={BATCH}", *extra]
    if endpoint:
        args.append(f"storage.endpoint_url={endpoint}")
    return pipe, load_config(None, args, pipe.schema)


def stage_uri(pipe: Pipeline, cfg, name: str = "tokenize") -> str:
    return next(p.uri for p in pipe.plan(cfg) if p.stage.name == name)


def clone_stage(src_uri: str, storage: Storage, dst_uri: str, src_run: str, dst_run: str,
                only: str = "") -> None:
    """Copy a finished stage folder (its files under ``only``, and its manifest, written last),
    the run's URIs rewritten in JSON files (manifest, sidecars)."""
    src = Storage()
    for f in src.walk_files(src_uri):
        rel = f[len(src_uri) + 1:]
        if rel != MANIFEST and rel.startswith(only):
            data = src.read_bytes(f)
            if rel.endswith(".json"):
                data = data.replace(src_run.encode(), dst_run.encode())
            storage.write_bytes(join(dst_uri, rel), data)
    text = src.read_text(join(src_uri, MANIFEST)).replace(src_run, dst_run)
    storage.write_text(join(dst_uri, MANIFEST), text)


@pytest.fixture(scope="module")
def upstream(ray_session, tmp_path_factory) -> dict:
    """shard + train_vqgan finished once on a local root, and one clean tokenize run there.

    Returns {"run_uri", "uris": {stage: folder}, "manifests": {stage: manifest},
    "files": {relative path: bytes} of the clean tokenize folder}.
    """
    root = str(tmp_path_factory.mktemp("upstream") / "runs")
    pipe, cfg = make_cfg(root, None)
    manifests = pipe.run(cfg)
    uris = {name: m["uri"] for name, m in manifests.items()}
    return {"run_uri": pipe.run_uri(cfg), "uris": uris, "manifests": manifests,
            "files": stage_files(Storage(), uris["tokenize"])}


def clone_upstream(upstream: dict, storage: Storage, run_uri: str,
                   with_tokenize: bool = False) -> None:
    """The finished upstream stages under ``run_uri`` (same folder names, hence the same
    fingerprints); train_vqgan contributes its export only."""
    names = ("shard", "train_vqgan", "tokenize") if with_tokenize else ("shard", "train_vqgan")
    for name in names:
        uri = upstream["uris"][name]
        clone_stage(uri, storage, join(run_uri, uri.rsplit("/", 1)[1]), upstream["run_uri"],
                    run_uri, "export/" if name == "train_vqgan" else "")


def stage_files(storage: Storage, uri: str) -> dict[str, bytes]:
    """Every file of a stage folder but its manifest, by relative path."""
    return {f[len(uri) + 1:]: storage.read_bytes(f) for f in storage.walk_files(uri)
            if not f.endswith(MANIFEST)}


def no_temporaries(storage: Storage, uri: str) -> bool:
    fs, path = storage.fs(uri)
    return not any(is_temporary(p.rsplit("/", 1)[-1]) for p in fs.find(path))


def test_manifest_and_code_shards(upstream):
    storage = Storage()
    out = upstream["manifests"]["tokenize"]["outputs"]
    shard_out = upstream["manifests"]["shard"]["outputs"]
    assert out["grid"] == [8, 8] and out["n_embed"] == 64 and out["dtype"] == "uint16"
    assert out["flip"] is True and out["resolution"] == 16
    vq = out["vqgan"]
    assert vq["train_vqgan_fingerprint"] == upstream["manifests"]["train_vqgan"]["fingerprint"]
    assert vq["weights_sha256"] == hashlib.sha256(storage.read_bytes(vq["weights"])).hexdigest()
    # One code shard per image shard: same split, name and sample count.
    assert [(s["split"], s["name"], s["samples"]) for s in out["shards"]] == \
        [(s["split"], s["name"], s["samples"]) for s in shard_out["shards"]]
    assert [s["source"] for s in out["shards"]] == [s["uri"] for s in shard_out["shards"]]
    assert all(s["uri"] == join(upstream["uris"]["tokenize"], s["name"]) for s in out["shards"])
    assert out["samples"] == shard_out["totals"]["samples"] and out["tokens"] == out["samples"] * 64
    assert out["classes"] == shard_out["classes"]
    for split, hist in out["histogram"].items():
        assert len(hist) == 64 and sum(hist) == out["splits"][split]["tokens"]
        recount = np.zeros(64, dtype=np.int64)
        for spec in shard_specs(out, split):
            recount += np.bincount(load_code_shard(storage, spec).codes.ravel(), minlength=64)
        assert recount.tolist() == hist
        usage = out["usage"][split]
        assert usage["used"] == int((recount > 0).sum()) and 1 <= usage["perplexity"] <= 64
    # Sidecars hold the same counts and hashes as the manifest.
    for s in out["shards"]:
        side = json.loads(upstream["files"]["_parts/" + s["name"][:-4] + ".json"])
        assert {k: side[k] for k in ("samples", "bytes", "sha256")} == \
            {k: s[k] for k in ("samples", "bytes", "sha256")}


def test_codes_are_the_vqgan_codes(upstream):
    """Stored codes == the VQGAN's own codes of the same images (center crops, batched as the
    stage batches them: per shard, in order), flipped too; decoding them gives the VQGAN's
    reconstruction exactly (equal tensors on CPU)."""
    storage = Storage()
    out = upstream["manifests"]["tokenize"]["outputs"]
    vq = out["vqgan"]
    model = VQGAN.from_bytes(storage.read_text(vq["config"]), storage.read_bytes(vq["weights"]))
    torch.manual_seed(0)
    for i, (spec, entry) in enumerate(zip(shard_specs(out), out["shards"])):
        shard = load_code_shard(storage, spec)
        assert shard.keys == [s["__key__"] for s in wds.iter_samples(storage, entry["source"])]
        start = 0
        with torch.no_grad():
            for x, labels in eval_batches(storage, [entry["source"]], BATCH, out["resolution"]):
                stop = start + len(x)
                stored = torch.from_numpy(shard.codes[start:stop].astype(np.int64))
                if i == 0:  # the reconstruction on one shard (decoding is the slow part)
                    recon, quant = model(x)
                    assert torch.equal(stored, quant.indices)
                    assert torch.equal(model.decode_indices(stored), recon)
                else:
                    assert torch.equal(stored, model.encode(x).indices)
                flipped = torch.from_numpy(shard.flip[start:stop].astype(np.int64))
                assert torch.equal(flipped, model.encode(x.flip(3)).indices)
                assert shard.labels[start:stop].tolist() == labels.tolist()
                start = stop
        assert start == len(shard.keys) == entry["samples"]


def test_kill_and_resume_matches_a_clean_run(upstream, any_root, monkeypatch):
    root, endpoint = any_root
    storage = Storage(endpoint_url=endpoint)
    pipe, cfg = make_cfg(root, endpoint)
    clone_upstream(upstream, storage, pipe.run_uri(cfg))
    uri = stage_uri(pipe, cfg)
    assert uri.rsplit("/", 1)[1] == upstream["uris"]["tokenize"].rsplit("/", 1)[1]

    # Killed after 2 finalized shards: no manifest, those shards stay.
    monkeypatch.setenv(faults.ENV, "tokenize:2")
    with pytest.raises(StageFailed, match=faults.ENV):
        pipe.run(cfg, only=["tokenize"])
    monkeypatch.delenv(faults.ENV)
    assert storage.read_manifest(uri) is None
    assert len([f for f in storage.walk_files(uri) if f.endswith(".tar")]) >= 2

    resumed = pipe.run(cfg, only=["tokenize"])["tokenize"]
    out = resumed["outputs"]
    assert resumed["resumed"] and out["shards_reused"] >= 2
    assert no_temporaries(storage, uri)
    assert pipe.run(cfg, only=["tokenize"])["tokenize"]["finished_at"] == resumed["finished_at"]

    # The same bytes as the clean run (sidecars name their own root's URIs).
    files = stage_files(storage, uri)
    clean = {k: v.replace(upstream["run_uri"].encode(), pipe.run_uri(cfg).encode())
             for k, v in upstream["files"].items()}
    assert files.keys() == clean.keys()
    assert all(files[k] == clean[k] for k in files), [k for k in files if files[k] != clean[k]]
    for entry in out["shards"]:
        data = files[entry["name"]]
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["bytes"]
    assert out["histogram"] == upstream["manifests"]["tokenize"]["outputs"]["histogram"]

    # A truncated copy of a code shard, where the data lives, is rejected by the reader.
    spec = shard_specs(out, "train")[0]
    data = storage.read_bytes(spec.uri)
    bad = join(root, "damaged", "shard.tar")
    storage.write_bytes(bad, data[: len(data) // 2])
    for read in (lambda s: list(codes.iter_code_samples(storage, s)),
                 lambda s: load_code_shard(storage, s)):
        with pytest.raises(CorruptShardError) as e:
            read(replace(spec, uri=bad))
        assert e.value.uri == bad


def test_resume_redoes_damaged_outputs(upstream, tmp_path):
    """A truncated tar, a corrupt sidecar and a missing sidecar are each redone with the same
    bytes; everything else is reused; stray temporaries go."""
    storage = Storage()
    pipe, cfg = make_cfg(str(tmp_path / "runs"), None, "tokenize.actors=1")
    clone_upstream(upstream, storage, pipe.run_uri(cfg), with_tokenize=True)
    uri = stage_uri(pipe, cfg)
    before = stage_files(storage, uri)
    shards = upstream["manifests"]["tokenize"]["outputs"]["shards"]
    storage.write_bytes(join(uri, shards[0]["name"]), before[shards[0]["name"]][:3000])
    part = [join(uri, "_parts", s["name"][:-4] + ".json") for s in shards]
    storage.write_text(part[1], "{not json")
    storage.rm(part[2])
    storage.write_bytes(join(uri, "train", ".shard-000009.tar.tmp-dead"), b"half")
    storage.rm(join(uri, MANIFEST))

    out = pipe.run(cfg, only=["tokenize"])["tokenize"]["outputs"]
    assert out["shards_reused"] == len(shards) - 3 and out["actors"] == 1
    assert stage_files(storage, uri) == before
    assert no_temporaries(storage, uri)


def test_reuse_needs_same_input_export_and_options(upstream):
    storage = Storage()
    m = upstream["manifests"]["tokenize"]
    shard = ShardOutputs.from_dict(upstream["manifests"]["shard"]["outputs"])
    task = plan_tasks(m["uri"], shard.shards)[0]
    opts = Options(resolution=16, grid=(8, 8), n_embed=64, dtype="uint16", flip=True,
                   batch_size=7, vqgan_sha256=m["outputs"]["vqgan"]["weights_sha256"])
    assert reusable(storage, task, opts) is not None  # batch size is not part of it
    assert reusable(storage, task, replace(opts, vqgan_sha256="0" * 64)) is None
    assert reusable(storage, task, replace(opts, flip=False)) is None
    assert reusable(storage, task, replace(opts, resolution=8, grid=(4, 4))) is None
    assert reusable(storage, {**task, "source_sha256": "f" * 64}, opts) is None


# -- the reader on hand-made shards --------------------------------------------------------------


def write_tar(path, samples: list[dict]) -> tuple[str, str]:
    buf = io.BytesIO()
    with wds.shard_writer(buf) as (tar, _):
        for s in samples:
            tar.write(s)
    path.write_bytes(buf.getvalue())
    return str(path), hashlib.sha256(buf.getvalue()).hexdigest()


def sample(key: str, grid: np.ndarray, label: bytes | None = b"3", **extra: bytes) -> dict:
    s = {"__key__": key, "codes.npy": codes.npy_bytes(grid), **extra}
    if label is not None:
        s["cls"] = label
    return s


def test_code_shard_reader_checks(tmp_path):
    storage = Storage()
    g = np.arange(16, dtype=np.uint16).reshape(4, 4)
    good, sha = write_tar(tmp_path / "good.tar", [sample(f"k{i}", g + i) for i in range(5)])
    spec = CodeShardSpec(good, samples=5, sha256=sha, grid=(4, 4), dtype="uint16", flip=False)
    shard = load_code_shard(storage, spec)
    assert shard.keys == [f"k{i}" for i in range(5)] and shard.codes.dtype == np.uint16
    assert shard.codes.shape == (5, 4, 4) and shard.labels.tolist() == [3] * 5
    assert [s.key for s in codes.iter_code_samples(storage, good)] == shard.keys  # bare URI

    def rejected(uri: str, spec_kw: dict | None = None) -> str:
        target = CodeShardSpec(uri, **(spec_kw or {}))
        with pytest.raises(CorruptShardError) as e1:
            list(codes.iter_code_samples(storage, target))
        with pytest.raises(CorruptShardError) as e2:
            load_code_shard(storage, target)
        assert e1.value.uri == uri == e2.value.uri and uri in str(e1.value)
        return e1.value.why

    data = (tmp_path / "good.tar").read_bytes()
    for cut in (0, 100, 700, 1500, 3000, len(data) - 1024):  # truncated anywhere
        path = tmp_path / f"cut{cut}.tar"
        path.write_bytes(data[:cut])
        rejected(str(path), {"samples": 5, "sha256": sha})
    for cut in (100, 700, 3000):  # damage inside a member is caught without any spec too
        assert "unreadable tar" in rejected(str(tmp_path / f"cut{cut}.tar"))
    flipped = bytearray(data)
    flipped[1024 + 512 + 130] ^= 0x01  # a code value of the first sample
    (tmp_path / "bitflip.tar").write_bytes(bytes(flipped))
    assert "sha256" in rejected(str(tmp_path / "bitflip.tar"), {"sha256": sha})
    assert "samples" in rejected(good, {"samples": 6})

    cases = {
        "dtype": ([sample("a", g.astype(np.uint32))], {"dtype": "uint16"}, "dtype"),
        "shape": ([sample("a", g[:2])], {"grid": (4, 4)}, "grid"),
        "mixed": ([sample("a", g), sample("b", g[:2])], {}, "differs"),
        "signed": ([sample("a", g.astype(np.int16))], {}, "unsigned"),
        "range": ([sample("a", g)], {"n_embed": 15}, "outside the codebook"),
        "shortnpy": ([{"__key__": "a", "codes.npy": codes.npy_bytes(g)[:-4]}], {},
                     "not a valid .npy"),
        "nocodes": ([{"__key__": "a", "cls": b"1"}], {}, "no .codes.npy"),
        "badnpy": ([{"__key__": "a", "codes.npy": b"garbage"}], {}, "not a valid .npy"),
        "badcls": ([sample("a", g, label=b"x")], {}, "not an integer"),
        "noflip": ([sample("a", g)], {"flip": True}, "flip.npy"),
        "extraflip": ([sample("a", g, **{"flip.npy": codes.npy_bytes(g)})], {"flip": False},
                      "flip"),
    }
    for name, (samples, kw, why) in cases.items():
        uri, _ = write_tar(tmp_path / f"{name}.tar", samples)
        assert why in rejected(uri, kw), name

    # Unlabelled samples and flip grids read back.
    uri, _ = write_tar(tmp_path / "flip.tar", [sample("a", g, None,
                                                      **{"flip.npy": codes.npy_bytes(g[:, ::-1])})])
    shard = load_code_shard(storage, uri)
    assert shard.labels.tolist() == [-1] and (shard.flip[0] == g[:, ::-1]).all()
    assert codes.code_dtype(64) == np.uint16 and codes.code_dtype(65536) == np.uint16
    assert codes.code_dtype(65537) == np.uint32


# -- config and resources -------------------------------------------------------------------------


def test_config_errors_name_keys():
    pipe = Pipeline([SHARD, TRAIN_VQGAN, STAGE])
    for bad, key in (("tokenize.batch_size=0", "tokenize.batch_size"),
                     ("tokenize.cpus_per_actor=0", "tokenize.cpus_per_actor"),
                     ("tokenize.actors=-1", "tokenize.actors"),
                     ("tokenize.resolution=0", "tokenize.resolution")):
        with pytest.raises(ConfigError) as e:
            load_config(None, [*TINY, bad], pipe.schema)
        assert e.value.key == key, bad
    model = {"ch_mult": [1, 2], "resolution": 16}
    assert check_inputs(TokenizeConfig(), 16, model) == (16, (8, 8))
    assert check_inputs(TokenizeConfig(resolution=32), 32, model) == (32, (16, 16))
    with pytest.raises(ConfigError, match="multiple"):
        check_inputs(TokenizeConfig(resolution=15), 16, model)
    with pytest.raises(ConfigError, match="larger than the shards"):
        check_inputs(TokenizeConfig(resolution=32), 16, model)


def test_resource_errors_instead_of_hangs(upstream, ray_session, tmp_path):
    assert plan_actors(TokenizeConfig(), 8) == (2, False)
    assert plan_actors(TokenizeConfig(), 1) == (1, False)
    assert plan_actors(TokenizeConfig(cpus_per_actor=0.5), 3) == (3, False)
    with pytest.raises(ResourceError, match="needs 3 CPUs"):
        plan_actors(TokenizeConfig(actors=3), 8)
    with pytest.raises(ResourceError, match="cpus_per_actor"):
        plan_actors(TokenizeConfig(actors=2, cpus_per_actor=1.5), 8)
    with pytest.raises(ResourceError, match="no GPU"):
        plan_actors(TokenizeConfig(use_gpu=True), 8)

    # The CPUs exist but something else holds them: a clear error after the start timeout.
    @ray_session.remote(num_cpus=1.5)
    class Holder:
        def ping(self) -> bool:
            return True

    holder = Holder.remote()
    ray_session.get(holder.ping.remote())
    try:
        root = str(tmp_path / "runs")
        pipe, cfg = make_cfg(root, None, "tokenize.actor_start_timeout_s=5",
                             "tokenize.actors=2", "tokenize.store_flipped=false")
        clone_upstream(upstream, Storage(), pipe.run_uri(cfg))
        with pytest.raises(StageFailed, match="could not start within"):
            pipe.run(cfg, only=["tokenize"])
    finally:
        ray_session.kill(holder)
    # The pool that could not start is gone: it takes no CPU once the holder leaves.
    deadline = time.time() + 30
    while ray_session.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
        time.sleep(0.2)
    assert ray_session.available_resources().get("CPU", 0) == 2
