"""Vector quantizer: the VQGAN's discrete bottleneck (paper §3.1, eq. 4).

Nearest-code lookup with a straight-through gradient and the loss

    L_vq = ||sg(z) - e||² + β ||z - sg(e)||²            (β = 0.25, ``legacy_beta=False``)

The reference implementation (taming ``VectorQuantizer2`` with its default ``legacy=True``, which
every published taming checkpoint was trained with) puts β on the other term:
``||z - sg(e)||² + β ||sg(z) - e||²``; ``legacy_beta=True`` reproduces that.

Beyond the paper, each behind a config switch:

- ``use_ema``: the codebook follows an exponential moving average of the encoder outputs assigned
  to it (VQ-VAE appendix / Sonnet); the codebook term leaves the loss, only β·commitment stays.
- ``l2_normalize``: encoder outputs and codes are unit-normalised before lookup, so the nearest
  code is the max-cosine code (ViT-VQGAN).
- ``codebook_dim``: factorised codes. The lookup happens in a low-dimensional space
  (``embed_dim -> codebook_dim`` by ``proj_in``, back by ``proj_out``).
- ``restart_dead_codes``: U > 0 restarts a code that went unused while the quantizer saw
  U × ``n_embed`` encoder outputs in training (over all ranks: as long as a uniformly used codebook
  takes to use each code U times): it is re-initialised from a random encoder output of the
  current batch. Counted in vectors, not steps, so the rule is the same on any worker count,
  batch size or accumulation, and a healthy large codebook is not restarted by chance (U = 8:
  P(unused) = e^-8 for a uniformly used code).

The codebook is updated in place during ``forward`` (EMA, restarts) only in training mode; in eval
mode the module is a pure, deterministic function of its input.

Distributed data parallel: when ``torch.distributed`` is initialised, the EMA statistics and the
usage counters are summed over ranks and restart vectors are broadcast from rank 0, so every
replica keeps an identical codebook (and every rank restarts the same rows in the same forward).

Master weights. Both in-place updates act on ``embedding.weight`` directly. That is all plain
PyTorch training needs, but an optimizer that keeps a separate master copy of the parameters
(DeepSpeed ZeRO >= 1; bf16 at any ZeRO stage) copies the master back into the module at its next
step and would silently undo them. EMA mode avoids this by taking the codebook out of the
gradient path (``requires_grad=False``: no optimizer owns it). Restarts also work without EMA:
each restart is recorded in :attr:`VectorQuantizer.pending_restart` so that the training loop can
write it through the optimizer's master weights (``pipeline.train.params.apply_codebook_restarts``
after every ``engine.step()``), which consumes it with
:meth:`VectorQuantizer.take_pending_restart`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# Upper bound on elements of one [rows, n_embed] distance block; larger inputs are processed in
# row chunks so that tokenizing a big batch against a 16k codebook does not allocate gigabytes.
_MAX_DISTANCE_ELEMENTS = 1 << 24


@dataclass
class QuantizerConfig:
    """Options of :class:`VectorQuantizer`. ``codebook_dim=None`` means ``embed_dim``."""

    n_embed: int = 1024
    embed_dim: int = 256
    beta: float = 0.25
    legacy_beta: bool = False
    use_ema: bool = False
    ema_decay: float = 0.99
    ema_eps: float = 1e-5
    l2_normalize: bool = False
    codebook_dim: int | None = None
    # A code unused while U x n_embed vectors went by is restarted (U = restart_dead_codes); 0 = off
    restart_dead_codes: int = 0

    @property
    def lookup_dim(self) -> int:
        """Dimension of the space in which codes live and nearest neighbours are searched."""
        return self.codebook_dim if self.codebook_dim is not None else self.embed_dim

    def validate(self) -> None:
        """Raise ``ValueError("field: why")`` for an inconsistent config."""
        if self.n_embed < 1:
            raise ValueError(f"n_embed: must be >= 1, got {self.n_embed}")
        if self.embed_dim < 1:
            raise ValueError(f"embed_dim: must be >= 1, got {self.embed_dim}")
        if self.codebook_dim is not None and self.codebook_dim < 1:
            raise ValueError(f"codebook_dim: must be >= 1 or None, got {self.codebook_dim}")
        if self.beta < 0:
            raise ValueError(f"beta: must be >= 0, got {self.beta}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay: must be in (0, 1), got {self.ema_decay}")
        if self.restart_dead_codes < 0:
            raise ValueError(f"restart_dead_codes: must be >= 0, got {self.restart_dead_codes}")


class QuantizerOutput(NamedTuple):
    """What the quantizer (and ``VQGAN.encode``) returns.

    z_q:        [B, embed_dim, h, w] quantized latents, contiguous NCHW; forward value exactly
                the code vectors (== ``embed_indices(indices)`` bit for bit), d z_q / d z = identity
    indices:    [B, h, w] int64 code indices
    loss:       scalar, the codebook + commitment loss (only β·commitment with EMA)
    perplexity: scalar, exp(entropy) of the batch's code histogram (1 .. n_embed)
    usage:      scalar, fraction of the codebook used at least once in the batch
    """

    z_q: Tensor
    indices: Tensor
    loss: Tensor
    perplexity: Tensor
    usage: Tensor


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def nearest_code(z: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest codebook row for every row of ``z`` (squared Euclidean distance).

    z: [N, D], codebook: [K, D] -> [N] int64. Uses ||z||² - 2 z·e + ||e||² without the ||z||²
    term (constant per row, so it cannot change the argmin): one matmul, no [N, K, D] broadcast,
    processed in row chunks bounded by ``_MAX_DISTANCE_ELEMENTS``.
    """
    e_sq = codebook.pow(2).sum(dim=1)  # [K]
    rows = max(1, _MAX_DISTANCE_ELEMENTS // codebook.shape[0])
    out = []
    for chunk in z.split(rows):
        d = torch.addmm(e_sq, chunk, codebook.t(), beta=1.0, alpha=-2.0)  # [n, K]
        out.append(d.argmin(dim=1))
    return torch.cat(out) if len(out) > 1 else out[0]


def code_statistics(indices: Tensor, n_embed: int) -> tuple[Tensor, Tensor, Tensor]:
    """(counts [K] float, perplexity, usage) of a batch of code indices."""
    counts = torch.bincount(indices.reshape(-1), minlength=n_embed).float()
    probs = counts / counts.sum().clamp_min(1.0)
    perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
    usage = (counts > 0).float().mean()
    return counts, perplexity, usage


class VectorQuantizer(nn.Module):
    """Maps encoder outputs [B, embed_dim, h, w] to their nearest codes; see the module docstring.

    Parameters (state-dict keys): ``embedding.weight`` [n_embed, lookup_dim] (same name and init as
    the reference), ``proj_in``/``proj_out`` (only with ``codebook_dim``), and buffers
    ``ema_cluster_size``/``ema_embed_sum`` (only with ``use_ema``) and ``unused_vectors`` (only with
    ``restart_dead_codes``).
    """

    def __init__(self, config: QuantizerConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        k, d = config.n_embed, config.lookup_dim
        self.embedding = nn.Embedding(k, d)
        nn.init.uniform_(self.embedding.weight, -1.0 / k, 1.0 / k)  # the reference's init
        if config.codebook_dim is not None:
            self.proj_in = nn.Linear(config.embed_dim, d)
            self.proj_out = nn.Linear(d, config.embed_dim)
        if config.use_ema:
            # The codebook is driven by the EMA, not by gradients. Starting the counts at one and
            # the sums at the codes themselves keeps weight == sum / count from the first step, so
            # a code that is never assigned stays where it is instead of being blown up by the
            # Laplace-smoothed division.
            self.embedding.weight.requires_grad_(False)
            self.register_buffer("ema_cluster_size", torch.ones(k))
            self.register_buffer("ema_embed_sum", self.embedding.weight.detach().clone())
        if config.restart_dead_codes > 0:
            # Training vectors (all ranks) quantized since each code was last used.
            self.register_buffer("unused_vectors", torch.zeros(k, dtype=torch.long))
        # Code counts of the training forwards since the last take_window_stats() (summed over
        # ranks): codebook health as logged during training. Not persistent: a monitoring
        # window, not model state, so state dicts stay the reference's.
        self.register_buffer("window_counts", torch.zeros(k, dtype=torch.long), persistent=False)
        # Restarts written in place but not yet taken by an owner of master weights; a plain
        # attribute, not a buffer: it is transient and stays out of the state dict.
        self.pending_restart: tuple[Tensor, Tensor] | None = None

    # -- lookup ------------------------------------------------------------------------------

    def _to_lookup_space(self, z_flat: Tensor) -> Tensor:
        """[N, embed_dim] encoder outputs -> [N, lookup_dim] vectors compared with the codes."""
        if self.config.codebook_dim is not None:
            z_flat = self.proj_in(z_flat)
        if self.config.l2_normalize:
            z_flat = F.normalize(z_flat, dim=1)
        return z_flat

    def _codes(self, indices: Tensor) -> Tensor:
        """Codebook rows for ``indices`` (any shape) in lookup space, normalised if configured.

        Gather first, then normalise: autograd then saves the gathered rows, not the full weight,
        so the in-place codebook updates later in ``forward`` cannot invalidate the graph.
        """
        e = F.embedding(indices, self.embedding.weight)
        return F.normalize(e, dim=-1) if self.config.l2_normalize else e

    def _from_lookup_space(self, e: Tensor) -> Tensor:
        return self.proj_out(e) if self.config.codebook_dim is not None else e

    @torch.no_grad()
    def lookup_codebook(self) -> Tensor:
        """The [K, lookup_dim] matrix the nearest-neighbour search runs against."""
        w = self.embedding.weight
        return F.normalize(w, dim=1) if self.config.l2_normalize else w

    def _latents(self, e_look: Tensor, b: int, h: int, w: int) -> Tensor:
        """[B*h*w, lookup_dim] rows -> [B, embed_dim, h, w] contiguous (NCHW) latents.

        The one path from looked-up codes to latents, shared by :meth:`forward` and
        :meth:`embed_indices`: same shapes through the same ops, hence bit-identical results.
        The layout is fixed rather than copied from the encoder output, whose strides vary with
        the grad mode (attention leaves channels_last activations under ``no_grad``): the decoder
        then sees the same strides on both paths, so decoding stored codes reproduces
        ``model(x)``'s reconstruction exactly.
        """
        e = self._from_lookup_space(e_look).reshape(b, h, w, self.config.embed_dim)
        return e.permute(0, 3, 1, 2).contiguous()

    def embed_indices(self, indices: Tensor) -> Tensor:
        """[B, h, w] code indices -> [B, embed_dim, h, w] quantized latents (for decoding).

        Bit-identical to ``forward(z).z_q`` for the indices ``forward(z)`` returned (same dtype).
        """
        b, h, w = indices.shape
        return self._latents(self._codes(indices.reshape(-1)), b, h, w)

    # -- forward -----------------------------------------------------------------------------

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantize ``z`` [B, embed_dim, h, w]; see :class:`QuantizerOutput` for the contract."""
        b, c, h, w = z.shape
        if c != self.config.embed_dim:
            raise ValueError(f"expected {self.config.embed_dim} channels, got {c}")
        z_flat = z.permute(0, 2, 3, 1).reshape(-1, c)  # [N, C], N = B*h*w
        z_look = self._to_lookup_space(z_flat)  # [N, D]
        with torch.no_grad():
            indices = nearest_code(z_look.detach().float(), self.lookup_codebook().float())
        e = self._codes(indices).to(z_look.dtype)  # [N, D]

        commitment = F.mse_loss(z_look, e.detach())
        cfg = self.config
        if cfg.use_ema:
            loss = (1.0 if cfg.legacy_beta else cfg.beta) * commitment
        else:
            codebook = F.mse_loss(e, z_look.detach())
            if cfg.legacy_beta:
                loss = commitment + cfg.beta * codebook
            else:
                loss = codebook + cfg.beta * commitment

        # Straight-through: gradient passed to z_look unchanged, forward value exactly e. The
        # textbook z + sg(e - z) rounds (z + (e - z) != e in floating point), so decoding stored
        # codes would not reproduce forward's reconstruction bit for bit; z - sg(z) is exactly 0.
        z_q_look = e + (z_look - z_look.detach())
        z_q = self._latents(z_q_look, b, h, w)

        counts, perplexity, usage = code_statistics(indices, cfg.n_embed)
        if self.training:
            self._update_codebook(z_look.detach(), indices, counts)
        return QuantizerOutput(
            z_q=z_q,
            indices=indices.reshape(b, h, w),
            loss=loss,
            perplexity=perplexity,
            usage=usage,
        )

    # -- codebook maintenance (training mode only) -------------------------------------------

    @torch.no_grad()
    def _update_codebook(self, z_look: Tensor, indices: Tensor, counts: Tensor) -> None:
        z_look = z_look.float()
        if _distributed():
            counts = counts.clone()
            dist.all_reduce(counts)
        self.window_counts += counts.round().long()
        if self.config.use_ema:
            self._ema_update(z_look, indices, counts)
        if self.config.restart_dead_codes > 0:
            self._restart_dead_codes(z_look, counts)

    def _ema_update(self, z_look: Tensor, indices: Tensor, counts: Tensor) -> None:
        """EMA of per-code counts and sums, then weight = Laplace-smoothed sum / count."""
        cfg = self.config
        sums = torch.zeros_like(self.ema_embed_sum).index_add_(0, indices, z_look)  # [K, D]
        if _distributed():
            dist.all_reduce(sums)
        self.ema_cluster_size.mul_(cfg.ema_decay).add_(counts, alpha=1 - cfg.ema_decay)
        self.ema_embed_sum.mul_(cfg.ema_decay).add_(sums, alpha=1 - cfg.ema_decay)
        n = self.ema_cluster_size.sum()
        size = (self.ema_cluster_size + cfg.ema_eps) / (n + cfg.n_embed * cfg.ema_eps) * n
        weight = self.ema_embed_sum / size[:, None]
        if cfg.l2_normalize:
            weight = F.normalize(weight, dim=1)
        self.embedding.weight.copy_(weight)

    def dead_code_limit(self) -> int:
        """Vectors a code may go unused before it is restarted: ``restart_dead_codes`` x
        ``n_embed``, the span in which a uniformly used codebook uses each code that often."""
        return self.config.restart_dead_codes * self.config.n_embed

    def _restart_dead_codes(self, z_look: Tensor, counts: Tensor) -> None:
        """Re-initialise codes unused for :meth:`dead_code_limit` vectors from batch vectors.
        ``counts`` are summed over ranks, so every rank restarts the same rows."""
        seen = counts.sum().round().long()
        self.unused_vectors.add_(seen).masked_fill_(counts > 0, 0)
        dead = (self.unused_vectors >= self.dead_code_limit()).nonzero().squeeze(1)
        if dead.numel() == 0:
            return
        # Sample without replacement when the batch has enough vectors.
        n = z_look.shape[0]
        if n >= dead.numel():
            pick = torch.randperm(n, device=z_look.device)[: dead.numel()]
        else:
            pick = torch.randint(n, (dead.numel(),), device=z_look.device)
        new = z_look[pick].contiguous()
        if _distributed():
            dist.broadcast(new, src=0)  # rank 0's vectors, so all replicas stay identical
        self.embedding.weight[dead] = new.to(self.embedding.weight.dtype)
        self._record_restart(dead, new)
        if self.config.use_ema:
            self.ema_cluster_size[dead] = 1.0
            self.ema_embed_sum[dead] = new
        self.unused_vectors[dead] = 0

    @torch.no_grad()
    def take_window_stats(self) -> dict[str, float]:
        """Codebook health over the training forwards since the last call, then reset.

        ``codebook/window_usage``: share of the codes used at least once; ``codebook/dead_codes``:
        how many were not used at all; ``codebook/window_perplexity``: exp(entropy) of the
        window's code histogram. Counts are summed over ranks, so every rank returns the same
        values (and must call this at the same step, as the training loop's logging does).
        Empty before any training forward.
        """
        counts = self.window_counts.double()
        self.window_counts.zero_()
        total = float(counts.sum())
        if total == 0:
            return {}
        used = int((counts > 0).sum())
        p = counts[counts > 0] / total
        return {"codebook/window_usage": used / self.config.n_embed,
                "codebook/dead_codes": float(self.config.n_embed - used),
                "codebook/window_perplexity": float(torch.exp(-(p * p.log()).sum()))}

    # -- restarts for optimizers with master weights -----------------------------------------

    def _record_restart(self, rows: Tensor, vectors: Tensor) -> None:
        """Add ``rows`` [n] / ``vectors`` [n, D] to :attr:`pending_restart`; a row restarted
        again before the pending set is taken keeps only its latest vector."""
        rows = rows.to(torch.long)
        vectors = vectors.detach().to(torch.float32)
        if self.pending_restart is not None:
            old_rows, old_vectors = self.pending_restart
            keep = ~torch.isin(old_rows, rows)
            rows = torch.cat([old_rows[keep], rows])
            vectors = torch.cat([old_vectors[keep], vectors])
        self.pending_restart = (rows, vectors)

    def take_pending_restart(self) -> tuple[Tensor, Tensor] | None:
        """Return and clear the restarts made since the last call (``None`` if there were none).

        Contract: ``(rows, vectors)`` with ``rows`` [n] int64 distinct codebook row indices and
        ``vectors`` [n, lookup_dim] float32, the exact (pre-cast) values written into those rows
        of ``embedding.weight`` by training-mode forwards, accumulated over every forward since
        the last call (a row restarted twice holds its latest vector). Under data parallelism
        the result is identical on every rank. Whoever owns master weights of
        ``embedding.weight`` must write ``vectors`` into them (and reset the rows' optimizer
        state) or the restart is lost at the next optimizer step; plain PyTorch training may
        ignore it (the in-place write already holds; the set stays bounded by ``n_embed`` rows).
        """
        pending, self.pending_restart = self.pending_restart, None
        return pending
