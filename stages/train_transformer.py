"""train_transformer: the GPT over code sequences, trained by DeepSpeed ZeRO under Ray Train.

Reads tokenize's code shards (validated against its manifest before training starts); writes Ray
Train checkpoints (``train/checkpoint-*``), a consolidated ``export/gpt.pt`` + ``export/gpt.json``
(gathered from ZeRO-3 partitions), sample grids decoded with the VQGAN (``images/``),
``history.jsonl`` and ``eval.json`` (val loss, bits per token, the codes' unigram entropy).

The vocabulary's image part comes from the VQGAN (``n_embed``), the sequence length from the
code grid (``h·w``), the classes from the shard stage: the config only holds the architecture.
In runs with conditions (issue #16) the code shards also hold each sample's condition-map codes:
the GPT then reads them before the image codes (the reference's Net2NetTransformer: [class or
start token ; condition codes ; image codes], loss on the image codes only), the sample grids
show condition | sample | truth rows, and eval is over the val samples with their maps.
Checkpoint, resume, failure recovery and "raise steps to continue" are the shared
``pipeline.train`` machinery that train_vqgan uses too.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pipeline.config import ConfigError, fingerprint_unless_default, no_fingerprint
from pipeline.dag import Stage, StageContext
from pipeline.manifests import Export, GPTOutputs, ShardOutputs, TokenizeOutputs, VQGANOutputs
from pipeline.seeds import derive
from pipeline.storage import Storage, join
from pipeline.train.config import TrainConfig

log = logging.getLogger("pipeline")


@dataclass
class TrainTransformerConfig(TrainConfig):
    """TrainConfig (steps, batch, ZeRO 0-3, workers...) plus the GPT architecture."""

    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.01  # matrices only
    warmup_steps: int = 100
    schedule: str = "cosine"
    grad_clip: float = 1.0
    zero_stage: int = 3
    n_layer: int = 8
    n_head: int = 8
    n_embd: int = 512
    dropout: float = 0.0
    bias: bool = True
    pkeep: float = 1.0  # input code corruption (the reference's pkeep)
    conditional: bool = True  # class-conditional when the shards have labels
    # Read the condition maps' codes before the image's, when tokenize stored them (runs with
    # shard.condition); false: the transformer ignores them (an unconditional baseline).
    use_condition: bool = fingerprint_unless_default(default=True)  # existing runs keep theirs
    cond_drop: float = 0.1  # class dropout: enables classifier-free guidance at sampling
    activation_checkpointing: bool = False
    RENAMED: ClassVar[dict[str, str]] = {"flip": "use_flipped"}

    # Train on each sample's mirrored-image codes half the time, when tokenize stored them
    # (tokenize.store_flipped); no effect otherwise.
    use_flipped: bool = True
    shuffle_buffer: int = 1024
    eval_samples: int = 2048
    image_every: int = no_fingerprint(200)
    samples_per_class: int = no_fingerprint(4)
    temperature: float = no_fingerprint(1.0)
    top_k: int = no_fingerprint(100)  # 0: off; 100 as the reference's sampling scripts

    def validate(self) -> None:
        super().validate()
        for name in ("n_layer", "n_head", "n_embd", "eval_samples", "image_every",
                     "samples_per_class", "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ConfigError("n_embd", f"must be divisible by n_head={self.n_head}, got "
                              f"{self.n_embd}")
        if not 0 < self.pkeep <= 1:
            raise ConfigError("pkeep", f"must be in (0, 1], got {self.pkeep}")
        if not 0 <= self.cond_drop < 1:
            raise ConfigError("cond_drop", f"must be in [0, 1), got {self.cond_drop}")
        if not 0 <= self.dropout < 1:
            raise ConfigError("dropout", f"must be in [0, 1), got {self.dropout}")


def is_complete(outputs: GPTOutputs, cfg: TrainTransformerConfig) -> bool:
    return outputs.steps >= cfg.steps


def gpt_config(cfg: TrainTransformerConfig, data: dict[str, Any]) -> Any:
    """The model config: architecture from the stage config, vocabulary and length from data."""
    from pipeline.models.gpt import GPTConfig

    cond = data.get("cond")
    cond_length = cond["length"] if cond else 0
    return GPTConfig(
        vocab_size=data["n_embed"], n_classes=data["n_classes"],
        block_size=cond_length + data["length"],
        cond_vocab_size=cond["n_embed"] if cond else 0, cond_length=cond_length,
        n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, embd_pdrop=cfg.dropout,
        resid_pdrop=cfg.dropout, attn_pdrop=cfg.dropout, bias=cfg.bias, pkeep=cfg.pkeep,
        cond_drop=cfg.cond_drop if data["n_classes"] else 0.0)


# -- worker side ----------------------------------------------------------------------------------


def checkpoint_blocks(model: Any) -> None:
    """Activation checkpointing applied from outside the model code: each transformer block
    recomputes its activations in the backward pass instead of storing them."""
    import torch.utils.checkpoint as ckpt

    for block in model.blocks:
        inner = block.forward

        def forward(x: Any, _inner: Any = inner) -> Any:
            return ckpt.checkpoint(_inner, x, use_reentrant=False)

        block.forward = forward


def evaluate(model: Any, storage: Storage, shards: list[str], length: int,
             limit: int, batch: int = 64) -> dict[str, float]:
    """Mean cross-entropy (nats) and bits per token of the codes in ``shards`` (unflipped), on
    the model's device."""
    import torch

    from pipeline.data.codes import iter_code_samples

    model.eval()
    device = next(model.parameters()).device
    with_map = model.config.cond_length > 0
    total = torch.zeros((), dtype=torch.float64, device=device)
    tokens, n = 0, 0
    codes, labels, conds = [], [], []

    def flush() -> None:
        nonlocal total, tokens, codes, labels, conds
        c = torch.stack(codes).to(device)
        lab = torch.tensor(labels, device=device) if model.config.n_classes else None
        maps = torch.stack(conds).to(device) if with_map else None
        with torch.no_grad():
            total += model.loss(c, lab, cond_codes=maps).double() * c.numel()
        tokens += c.numel()
        codes, labels, conds = [], [], []

    for uri in shards:
        for s in iter_code_samples(storage, uri):
            if n >= limit:
                break
            codes.append(torch.from_numpy(s.codes.astype("int64").reshape(-1)))
            labels.append(s.label)
            if with_map:
                if s.cond is None:
                    raise ValueError(f"sample {s.key!r} of {uri} has no condition codes")
                conds.append(torch.from_numpy(s.cond.astype("int64").reshape(-1)))
            n += 1
            if len(codes) == batch:
                flush()
    if codes:
        flush()
    if tokens == 0:
        raise ValueError("no codes to evaluate")
    loss = float(total) / tokens
    return {"loss": loss, "bits_per_token": loss / math.log(2), "samples": n, "tokens": tokens}


def sample_grid(model: Any, vqgan: Any, data: dict[str, Any], cfg: TrainTransformerConfig,
                step: int, seed: int, cond_vqgan: Any = None) -> Any:
    """Codes sampled per class (or unconditionally) on the model's device, decoded with
    ``vqgan`` (same device) to one uint8 grid image. A model with a condition map samples for
    the maps of ``data["cond"]["examples"]`` instead: one row per example, condition (decoded by
    ``cond_vqgan``) | sample | truth."""
    import torch

    from pipeline.kernels import decode as native_decode
    from pipeline.metrics import grid, to_uint8, upscale
    from pipeline.models.sampling import sample

    native_decode.install()  # the C one-token kernels as the samplers' "native" set, where built
    device = next(model.parameters()).device
    n_classes, per = data["n_classes"], cfg.samples_per_class
    cond_codes = examples = None
    if data.get("cond"):
        examples = data["cond"]["examples"]
        n = len(examples["codes"])
        cond_codes = torch.tensor(examples["cond"], device=device)
        cond = torch.tensor(examples["labels"], device=device) if n_classes else None
    else:
        cond = torch.arange(n_classes, device=device).repeat_interleave(per) if n_classes else None
        n = n_classes * per if n_classes else 4 * per
    was_training = model.training
    model.eval()
    codes = sample(model, n, cond, data["length"], temperature=cfg.temperature,
                   top_k=cfg.top_k or None, seed=derive(seed, "preview-samples", step),
                   cond_codes=cond_codes)
    model.train(was_training)
    h, w = data["grid"]
    with torch.no_grad():
        images = vqgan.decode_indices(codes.view(n, h, w).long().to(device)).float().cpu()
        if examples is not None:
            truth = torch.tensor(examples["codes"], device=device).view(n, h, w)
            maps = condition_preview(cond_vqgan, data["cond"], cond_codes, images.shape[-2:])
            images = torch.stack([maps, images, vqgan.decode_indices(truth).float().cpu()], 1)
            images, per = images.flatten(0, 1), 3
    image = grid(to_uint8(images), cols=per)
    return upscale(image, max(1, 64 // images.shape[-1]))  # cells of >= 64 px to look at


def condition_preview(cond_vqgan: Any, cond: dict[str, Any], codes: Any, size: Any) -> Any:
    """Condition codes [n, hc*wc] decoded by the condition VQGAN and drawn as RGB [n, 3, H, W]
    in [-1, 1] (label maps in their palette colours), at the images' ``size``."""
    import torch

    from pipeline.data.conditions import condition_input

    hc, wc = cond["grid"]
    with torch.no_grad():
        maps = cond_vqgan.decode_indices(codes.view(-1, hc, wc).long()).float()
    rgb = condition_input(cond["kind"], cond["classes"]).preview(maps).cpu()
    if tuple(rgb.shape[-2:]) != tuple(size):
        rgb = torch.nn.functional.interpolate(rgb, size=tuple(size), mode="nearest")
    return rgb


class GPTTask:
    """train_transformer's part of the training loop (pipeline.train.loop): the GPT engine,
    code batches, sample grids decoded by the VQGAN (rank 0), export + eval."""

    unit = "tokens"
    progress_keys = ("loss/train",)

    def __init__(self, ctx: Any, spec: Any) -> None:
        import torch

        from pipeline.models.gpt import GPT
        from pipeline.train.engine import make_engine

        cfg: TrainTransformerConfig = spec.cfg
        data = spec.args["data"]
        self.cfg, self.ctx, self.spec, self.data = cfg, ctx, spec, data
        self.units_per_sample = data["length"]
        self.base_lr = cfg.base_lr
        model = GPT(gpt_config(cfg, data)).to(ctx.device)
        if cfg.activation_checkpointing:
            checkpoint_blocks(model)
        groups = model.configure_optimizer_groups(cfg.weight_decay)
        self.engine = make_engine(model, cfg, ctx.world, params=groups)
        self.engines = {"GPT": self.engine}
        self.vqgan = self.cond_vqgan = None
        if ctx.is_main:
            self.vqgan = load_vqgan(spec.storage, data["vqgan"], ctx.device)
            if data.get("cond"):
                self.cond_vqgan = load_vqgan(spec.storage, data["cond"]["vqgan"], ctx.device)
        self.gen = torch.Generator(device=ctx.device)
        self.draws: Any = None  # this step's corruption noise (step)

    def batches(self, position: Any) -> Any:
        from pipeline.data.loader import code_batches, stream_spec

        cfg, spec, data = self.cfg, self.spec, self.data
        stream = stream_spec(data["train"], self.ctx.rank, self.ctx.world, spec.seed,
                             cfg.shuffle_buffer, cfg.data_streams, position)
        for codes, labels, cond, pos in code_batches(spec.storage, stream, cfg.micro_batch,
                                                     data["length"], position=position,
                                                     flip=cfg.use_flipped,
                                                     with_cond=bool(data.get("cond"))):
            yield (codes, labels, cond), pos

    def step(self, batch: Any, step: int, micro: int) -> dict[str, Any]:
        import torch

        cfg, ctx = self.cfg, self.ctx
        if micro == 0:
            # The corruption noise of the whole global batch is a function of (seed, step);
            # each rank takes its samples' rows, so a resumed run, on any worker count, draws
            # what an unchanged one would.
            self.gen.manual_seed(derive(self.spec.seed, "code-corruption", step))
            self.draws = self.engine.module.corruption_draws(cfg.global_batch,
                                                             self.data["length"], self.gen)
        codes, labels, cond = batch
        # The stream gives rank r the global samples r, r+W, r+2W, ... (pipeline.data.loader).
        slots = (micro * cfg.micro_batch + torch.arange(len(codes))) * ctx.world + ctx.rank
        loss = _loss(self.engine, codes, labels, self.data["n_classes"],
                     self.draws.rows(slots.to(self.gen.device)), cond)
        self.engine.backward(loss)
        self.engine.step()
        return {"loss/train": loss.detach()}

    def images(self, step: int, tracker: Any) -> None:
        from pipeline.metrics import png_bytes

        plain = consolidated(self.engine, self.cfg, self.ctx)  # collective under ZeRO-3
        if plain is not None:
            image = sample_grid(plain, self.vqgan, self.data, self.cfg, step, self.spec.seed,
                                self.cond_vqgan)
            self.spec.storage.write_bytes(join(self.spec.uri, "images",
                                               f"samples-{step:08d}.png"), png_bytes(image))
            tracker.log_images({"samples": image}, step=step)

    def finish(self, state: Any, tracker: Any) -> None:
        plain = consolidated(self.engine, self.cfg, self.ctx)  # fp32, even from ZeRO-3 shards
        if plain is not None:
            spec = self.spec
            export(plain, spec.storage, spec.uri, self.data, self.cfg, state, tracker)


def load_vqgan(storage: Storage, export: dict[str, Any], device: Any) -> Any:
    """A VQGAN export (``{weights, config}`` URIs) in eval mode on ``device``."""
    from pipeline.models.vqgan import VQGAN

    model = VQGAN.from_bytes(storage.read_text(export["config"]),
                             storage.read_bytes(export["weights"]))
    return model.to(device).eval()


def _loss(engine: Any, codes: Any, labels: Any, n_classes: int, draws: Any,
          cond: Any = None) -> Any:
    """Next-code cross-entropy through the engine (so ZeRO-3 gathers the weights it needs);
    ``draws``: the batch's corruption noise (GPT.corruption_draws); ``cond``: the condition
    maps' codes [B, P] (models with a condition map)."""
    idx, targets = engine.module.prepare_batch(codes, labels if n_classes else None,
                                               draws=draws, cond_codes=cond)
    _, loss = engine(idx, targets)
    return loss


def consolidated(engine: Any, cfg: TrainTransformerConfig, ctx: Any) -> Any:
    """A plain fp32 copy of the model on rank 0, on its device (None elsewhere). Every rank must
    call it: under ZeRO-3 the partitions are gathered collectively. The copy has no DeepSpeed
    hooks, so rank 0 can sample and evaluate with it alone (a ZeRO-3 module's forward is itself
    collective)."""
    import contextlib

    from pipeline.models.gpt import GPT

    context: Any = contextlib.nullcontext()
    if cfg.zero_stage == 3:
        import deepspeed

        context = deepspeed.zero.GatheredParameters(list(engine.module.parameters()),
                                                    modifier_rank=None)
    with context:
        if not ctx.is_main:
            return None
        model = GPT(engine.module.config)
        model.load_state_dict(engine.module.export_state_dict())
    return model.to(ctx.device).eval()


def export(model: Any, storage: Storage, uri: str, data: dict[str, Any],
           cfg: TrainTransformerConfig, state: Any, tracker: Any) -> None:
    """export/gpt.{pt,json} (fp32) and eval.json, from the consolidated fp32 model."""
    storage.write_bytes(join(uri, "export", "gpt.pt"), model.state_bytes())
    storage.write_text(join(uri, "export", "gpt.json"), model.config_json())
    ev = evaluate(model, storage, data["val"] or data["train"], data["length"],
                  cfg.eval_samples)
    result = {"step": state.step, "samples_seen": state.samples_seen, "val": ev,
              "unigram_entropy": data["unigram_entropy"]}
    storage.write_json(join(uri, "eval.json"), result)
    tracker.summary({"eval/loss": ev["loss"], "eval/bits_per_token": ev["bits_per_token"]})


# -- driver side ----------------------------------------------------------------------------------


def unigram_entropy(histogram: list[int]) -> float:
    """Entropy (nats) of the code frequencies: the loss of a model that ignores context."""
    total = sum(histogram)
    return -sum(c / total * math.log(c / total) for c in histogram if c)


def data_spec(ctx: StageContext, cfg: TrainTransformerConfig | None = None) -> dict[str, Any]:
    """What the workers need, from upstream manifests only; code shards are validated here.
    ``cfg``: the stage's training config (default: its section)."""
    cfg = cfg or ctx.cfg
    from pipeline.data.codes import iter_code_samples, shard_specs

    tok: TokenizeOutputs = ctx.input("tokenize")
    vq: VQGANOutputs = ctx.input("train_vqgan")
    shard: ShardOutputs = ctx.input("shard")
    for spec in shard_specs(tok):  # a corrupt or truncated shard fails now, with its name
        for _ in iter_code_samples(ctx.storage, spec):
            pass
    h, w = tok.grid
    n_classes = shard.num_classes if cfg.conditional else 0
    data = {
        "train": tok.uris("train"), "val": tok.uris("val"),
        "n_embed": tok.n_embed, "grid": [h, w], "length": h * w,
        "n_classes": n_classes, "classes": shard.classes,
        "vqgan": vq.export.to_dict(), "unigram_entropy": unigram_entropy(tok.histogram["train"]),
        "cond": None,
    }
    c = tok.condition
    if c is not None and cfg.use_condition:
        hc, wc = c.grid
        data["cond"] = {
            "kind": c.kind, "classes": c.classes, "n_embed": c.n_embed, "grid": [hc, wc],
            "length": hc * wc, "vqgan": {"weights": c.vqgan.weights, "config": c.vqgan.config},
            "examples": preview_examples(ctx.storage, tok, cfg.samples_per_class * 2,
                                         n_classes)}
    return data


def preview_examples(storage: Storage, tok: TokenizeOutputs, n: int, n_classes: int
                     ) -> dict[str, list[Any]]:
    """The first ``n`` val samples (train without val) with their condition codes: the maps the
    sample grids are drawn for, beside their truth (``codes``, ``cond`` flat lists, ``labels``:
    the class, or 0 for a model without classes)."""
    from pipeline.data.codes import iter_code_samples, shard_specs

    out: dict[str, list[Any]] = {"codes": [], "cond": [], "labels": []}
    split = "val" if tok.uris("val") else "train"
    for spec in shard_specs(tok, split):
        for s in iter_code_samples(storage, spec):
            if len(out["codes"]) == n:
                return out
            out["codes"].append(s.codes.astype(int).reshape(-1).tolist())
            out["cond"].append(s.cond.astype(int).reshape(-1).tolist())
            out["labels"].append(max(s.label, 0) if n_classes else 0)
    return out


def run(ctx: StageContext) -> GPTOutputs:
    return train_and_record(ctx, ctx.cfg)


def train_and_record(ctx: StageContext, cfg: TrainTransformerConfig) -> GPTOutputs:
    """Train (or continue) the GPT of config ``cfg`` in the stage folder; its outputs record."""
    from pipeline.train.launch import launch

    data = data_spec(ctx, cfg)
    if not data["train"]:
        raise ValueError("tokenize produced no training codes")
    checkpoint = launch(ctx, GPTTask, {"data": data}, cfg=cfg)
    ev = ctx.storage.read_json(join(ctx.uri, "eval.json"))
    images = [u for u in ctx.storage.walk_files(join(ctx.uri, "images")) if u.endswith(".png")]
    return GPTOutputs(
        steps=ev["step"],
        samples_seen=ev["samples_seen"],
        export=Export(weights=join(ctx.uri, "export", "gpt.pt"),
                      config=join(ctx.uri, "export", "gpt.json")),
        val_loss=ev["val"]["loss"],
        bits_per_token=ev["val"]["bits_per_token"],
        unigram_entropy=ev["unigram_entropy"],
        grid=tuple(data["grid"]), n_classes=data["n_classes"], classes=data["classes"],
        images=images,
        checkpoint=checkpoint,
        vqgan=Export.from_dict(data["vqgan"]),
        condition=cond_record(data["cond"]),
    )


def cond_record(cond: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the manifest records of the condition map the GPT reads (None: it reads none)."""
    if cond is None:
        return None
    return {k: cond[k] for k in ("kind", "classes", "n_embed", "grid", "length", "vqgan")}


def report(outputs: GPTOutputs) -> dict[str, Any]:
    """The report's section: val loss against the context-free baseline, the last samples."""
    images = sorted(outputs.images)
    cond = outputs.condition
    return {"metrics": {
        **({"condition": f"{cond['kind']} maps, {cond['length']} codes before the image's"}
           if cond else {}),
        "steps": outputs.steps, "val loss (nats/code)": outputs.val_loss,
        "bits per code": outputs.bits_per_token,
        "unigram entropy of the codes (nats)": outputs.unigram_entropy},
        "images": [(f"Samples during training ({images[-1].rsplit('/', 1)[-1]})", images[-1])]
        if images else []}


STAGE = Stage("train_transformer", TrainTransformerConfig, run,
              upstream=("shard", "train_vqgan", "tokenize"), version=1, is_complete=is_complete,
              report=report, outputs=GPTOutputs,
              help="GPT over code sequences, DeepSpeed ZeRO under Ray Train")


# -- train_baseline_transformer: the same GPT without the condition maps --------------------------
#
# A run with condition maps judges its samples by how well they follow their maps (the sample
# stage's edge F1); the figure means something beside the same figure for an unconditional model
# of the same data (issue #16 part 5). This stage trains it: train_transformer's section with
# `use_condition: false` and its own `steps`, on the same code shards (which it reads without
# their condition codes). Off unless `train_baseline_transformer.enabled`; skipped in runs without
# conditions. Its fingerprint has train_transformer's (so its whole section) as upstream.

BASELINE_NAME = "train_baseline_transformer"


@dataclass
class BaselineTransformerConfig:
    """Config section ``train_baseline_transformer`` (README, "Conditional synthesis")."""

    enabled: bool = False
    steps: int = 300

    def validate(self) -> None:
        if self.steps < 1:
            raise ConfigError("steps", f"must be >= 1, got {self.steps}")


def baseline_skip_reason(root_cfg: Any) -> str | None:
    """Why the run trains no baseline: not asked for, no condition maps at all (every kind but
    none gives the GPT condition codes: downsample:N through the image VQGAN), or the GPT is
    unconditional itself."""
    from pipeline.data.conditions import NONE

    if not root_cfg.train_baseline_transformer.enabled:
        return "train_baseline_transformer.enabled is false"
    if not root_cfg.train_transformer.use_condition:
        return "train_transformer.use_condition is false: that GPT is the baseline already"
    if root_cfg.shard.condition.kind == NONE:
        return "shard.condition.kind is none"
    return None


def baseline_config(root_cfg: Any) -> TrainTransformerConfig:
    """train_transformer's config without the condition maps and with the baseline's steps."""
    from dataclasses import replace

    cfg = replace(root_cfg.train_transformer, use_condition=False,
                  steps=root_cfg.train_baseline_transformer.steps)
    cfg.validate()
    return cfg


def run_baseline(ctx: StageContext) -> GPTOutputs:
    return train_and_record(ctx, baseline_config(ctx.root_cfg))


def baseline_is_complete(outputs: GPTOutputs, cfg: BaselineTransformerConfig) -> bool:
    return outputs.steps >= cfg.steps


BASELINE_STAGE = Stage(
    BASELINE_NAME, BaselineTransformerConfig, run_baseline,
    upstream=("shard", "train_vqgan", "tokenize", "train_transformer"), version=1,
    is_complete=baseline_is_complete, report=report, outputs=GPTOutputs,
    skip_reason=baseline_skip_reason,
    help="the GPT without condition maps (a baseline for the conditional one's samples)")
