"""Benchmark of the tokenize stage against the bare encoder on the same images.

The issue's ``bench/tokenize.py``, renamed: a script named ``tokenize.py`` in ``bench/`` shadows
the standard library's ``tokenize`` module (imported by json, inspect, linecache…) for every
script run from this folder.

Prints one JSON object: the stage's images/s, the bare encoder's images/s on the same images in
the same process, their ``ratio`` and whether it meets the target (``TARGET_RATIO``).

Inputs: the shard stage (run for real) on ``builtin:photos:N`` crops as JPEGs at
``--resolution``; a VQGAN with random weights (throughput does not depend on them) exported the
way train_vqgan exports. Both sides encode the same images in fp32 with the same minibatch
size:

- stage: ``stages.tokenize.run`` (Ray Data actor pool: read tars, decode, crop, encode, write
  code shards, sidecars) with its default actor plan, its own images/s figure (from dataset
  start to the last shard, actor start-up and model loading included); with ``--one-actor``
  also with one actor holding every CPU (same threads as the bare encoder);
- bare encoder: this process, images already decoded into tensors in memory, ``model.encode``
  over minibatches with torch's default threads: no I/O, no decoding, no Ray.

``ratio`` = stage / bare encoder, target >= 0.9. Runs alternate, best of ``--repeats`` each
(other processes may be loading the machine; the best run is the least disturbed one;
``load_average_1m`` says how busy the machine was at the end). With few images the stage's
actor start-up and model loading weigh more: measure with the default ``--images``.

Usage: python bench/tokenize_stage.py [--images 2000] [--resolution 64] [--batch-size 64]
                                [--repeats 2] [--ch 64] [--one-actor]
"""

from __future__ import annotations

import os
import sys

# Run as a script, bench/ heads sys.path, where a script named like a stdlib module (as this one
# was: tokenize.py) would shadow it. Put the repository root there instead, before anything
# else is imported.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [os.path.dirname(_HERE)] + [p for p in sys.path
                                          if os.path.abspath(p or ".") != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.dag import Pipeline, StageContext  # noqa: E402
from pipeline.manifests import Export, VQGANOutputs  # noqa: E402
from pipeline.storage import Storage, join  # noqa: E402
from stages.shard import STAGE as SHARD  # noqa: E402
from stages.tokenize import TokenizeConfig  # noqa: E402
from stages.tokenize import run as tokenize_run  # noqa: E402
from stages.train_vqgan import STAGE as VQGAN_STAGE  # noqa: E402

TARGET_RATIO = 0.9  # the target for stage images/s over bare-encoder images/s


def model_config(args: argparse.Namespace) -> dict:
    """The paper's f16 layout (5 levels, 2 res blocks, attention at the 16x-down level), scaled
    to CPU: width ``--ch`` and ``--resolution`` px inputs."""
    from pipeline.models.vqgan import VQGANConfig

    return VQGANConfig(ch=args.ch, ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2,
                       attn_resolutions=[args.resolution // 16], z_channels=64, embed_dim=64,
                       n_embed=1024, resolution=args.resolution).to_dict()


def make_shards(root: str, args: argparse.Namespace) -> dict:
    pipe = Pipeline([SHARD])
    cfg = load_config(None, [
        "run=bench", f"storage.root={root}", "tracking.mode=disabled",
        f"shard.source=builtin:photos:{args.images}", f"shard.resolution={args.resolution}",
        "shard.ext=jpg", "shard.samples_per_shard=250", "shard.val_fraction=0",
        "shard.progress=false"], pipe.schema)
    return pipe.run(cfg)["shard"]


def write_export(storage: Storage, root: str, config: dict) -> dict:
    """A train_vqgan manifest stand-in: random weights, exported as train_vqgan does."""
    import torch

    from pipeline.models.vqgan import VQGAN, VQGANConfig

    torch.manual_seed(0)
    model = VQGAN(VQGANConfig.from_dict(config))
    folder = join(root, "bench", "train_vqgan-random", "export")
    storage.write_bytes(join(folder, "vqgan.pt"), model.state_bytes())
    storage.write_text(join(folder, "vqgan.json"), model.config_json())
    outputs = VQGANOutputs(steps=0, samples_seen=0,
                           export=Export(join(folder, "vqgan.pt"), join(folder, "vqgan.json")),
                           model=config,
                           latent_size=VQGANConfig.from_dict(config).latent_size(), eval={})
    return {"fingerprint": "random-init", "outputs": outputs.to_dict()}


def stage_run(storage: Storage, root: str, name: str, shard: dict, train_vqgan: dict,
              cfg: TokenizeConfig) -> dict:
    ctx = StageContext(name="tokenize", fingerprint=name, uri=join(root, "bench", name),
                       cfg=cfg, root_cfg=None, storage=storage,
                       inputs={"shard": shard, "train_vqgan": train_vqgan},
                       upstream_stages={"shard": SHARD, "train_vqgan": VQGAN_STAGE})
    return tokenize_run(ctx).to_dict()


def bare_encoder(storage: Storage, shard: dict, config: dict, weights: str,
                 batch_size: int) -> tuple[float, int]:
    """(images/s, images) of model.encode alone on the shards' images, decoded beforehand."""
    import torch

    from pipeline.data.loader import eval_batches
    from pipeline.models.vqgan import VQGAN

    model = VQGAN.from_bytes(config, storage.read_bytes(weights))
    model.decoder = None
    uris = [s["uri"] for s in shard["outputs"]["shards"]]
    batches = [x for x, _ in eval_batches(storage, uris, batch_size, config["resolution"])]
    n = sum(len(x) for x in batches)
    with torch.inference_mode():
        model.encode(batches[0])  # warm-up (allocator, kernel selection)
        t0 = time.perf_counter()
        for x in batches:
            model.encode(x)
        seconds = time.perf_counter() - t0
    return n / seconds, n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--ch", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--one-actor", action="store_true",
                   help="also run the stage with one actor holding every CPU")
    args = p.parse_args()

    import ray
    import torch

    storage = Storage()
    config = model_config(args)
    with tempfile.TemporaryDirectory(prefix="bench-tokenize-") as root:
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False,
                 log_to_driver=False)
        try:
            shard = make_shards(root, args)
            train_vqgan = write_export(storage, root, config)
            weights = train_vqgan["outputs"]["export"]["weights"]
            default = TokenizeConfig(batch_size=args.batch_size, progress=False)
            single = TokenizeConfig(batch_size=args.batch_size, progress=False, actors=1,
                                    cpus_per_actor=float(os.cpu_count() or 1))
            bare, stage, one = [], [], []
            for r in range(args.repeats):
                ips, n = bare_encoder(storage, shard, config, weights, args.batch_size)
                bare.append(ips)
                stage.append(stage_run(storage, root, f"default-{r}", shard, train_vqgan,
                                       default))
                if args.one_actor:
                    one.append(stage_run(storage, root, f"one-{r}", shard, train_vqgan, single))
        finally:
            ray.shutdown()

    for out in stage + one:
        assert out["samples"] == n, (out["samples"], n)
    assert len({tuple(s["sha256"] for s in o["shards"]) for o in stage + one}) == 1, \
        "every run wrote the same code shards"
    best = max(o["images_per_s"] for o in stage)
    bare_ips = max(bare)
    extra = {}
    if one:
        best_one = max(o["images_per_s"] for o in one)
        extra = {"one_actor_images_per_s": best_one,
                 "ratio_one_actor": round(best_one / bare_ips, 3)}
    print(json.dumps({
        "images": n,
        "resolution": args.resolution,
        "grid": stage[0]["grid"],
        "n_embed": stage[0]["n_embed"],
        "model": {k: config[k] for k in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions",
                                          "z_channels", "embed_dim")},
        "batch_size": args.batch_size,
        "shards": len(stage[0]["shards"]),
        "cpus": os.cpu_count(),
        "torch_threads_bare": torch.get_num_threads(),
        "stage_actors": stage[0]["actors"],
        "stage_images_per_s": best,
        "bare_encoder_images_per_s": round(bare_ips, 2),
        "ratio": round(best / bare_ips, 3),
        "target_ratio": TARGET_RATIO,
        "meets_target": best / bare_ips >= TARGET_RATIO,
        **extra,
        "runs": {"bare": [round(v, 1) for v in bare],
                 "stage": [o["images_per_s"] for o in stage],
                 **({"one_actor": [o["images_per_s"] for o in one]} if one else {})},
        "load_average_1m": round(os.getloadavg()[0], 2),
    }))


if __name__ == "__main__":
    main()
