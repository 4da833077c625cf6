"""Decoder-only GPT over VQGAN code indices (paper §3.2; reference ``mingpt.py`` +
``cond_transformer.py``).

Bottom-up: the key/value cache, causal self-attention (full and cached modes), the MLP, the
pre-LN block, and :class:`GPT` with its training loss, incremental forward, optimizer groups and
export. Sampling lives in :mod:`pipeline.models.sampling`.

Vocabulary (input table, ``config.table_size`` rows)::

    0 .. vocab_size-1                    image codes (the VQGAN's n_embed codes)
    vocab_size                           start / unconditional token   (config.start_token)
    vocab_size + 1 + k, k < n_classes    class k                        (config.class_token(k))
    cond_offset + j, j < cond_vocab_size condition code j               (config.cond_offset)

The head projects onto the ``vocab_size`` image codes only: a condition token is never predicted.
The reference shares one table between codes and condition tokens (class 5 and code 5 are the
same row); here they cannot collide, and the start token doubles as the "no class" token that
classifier-free guidance needs (trained by ``cond_drop``).

A sequence is ``[cond, c_0, ..., c_{L-2}]`` and its targets are ``[c_0, ..., c_{L-1}]``: the last
code is predicted but never fed back, so ``block_size`` >= L codes suffices (16x16 codes need
block_size 256, as in the reference).

Conditional synthesis (paper §4, the reference's Net2NetTransformer): a model with
``cond_length`` P > 0 reads the P codes of a condition map (its own VQGAN's, offset into their own
rows of the table) after the class / start token: ``[cond, d_0, ..., d_{P-1}, c_0, ..., c_{L-2}]``,
and is trained on the image codes only (the P prefix positions have no target), so
``block_size`` >= P + L.

Shapes for the bench config (n_layer 4, n_head 4, n_embd 256, block 256, vocab 512), batch 8:
idx [8,256] -> tok_emb + pos_emb [8,256,256] -> 4 blocks -> ln_f -> head [8,256,512].
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .export import Exportable, check_keys

WEIGHTS_NAME = "gpt.pt"
CONFIG_NAME = "gpt.json"


@dataclass
class GPTConfig:
    """Transformer config. ``vocab_size`` = the VQGAN's ``n_embed`` (image codes only); the
    condition tokens come on top (:attr:`table_size`). Dropout names as in the reference's
    ``transformer_config``. Defaults: a small model for a 16x16 code grid."""

    vocab_size: int = 1024
    n_classes: int = 0  # 0 = unconditional (only the start token)
    block_size: int = 256  # max positions fed: cond token + up to block_size-1 codes
    n_layer: int = 8
    n_head: int = 8
    n_embd: int = 512
    embd_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm (the reference has them)
    pkeep: float = 1.0  # training: probability of keeping an input code (else a random code)
    cond_drop: float = 0.0  # training: probability of replacing the class by the start token
    cond_vocab_size: int = 0  # the condition VQGAN's codebook (0: no condition map)
    cond_length: int = 0  # condition codes before the image codes (its code grid's h*w)

    @property
    def start_token(self) -> int:
        """Id of the start / unconditional token."""
        return self.vocab_size

    def class_token(self, k: int) -> int:
        """Id of class ``k``'s token."""
        return self.vocab_size + 1 + k

    @property
    def cond_offset(self) -> int:
        """Id of condition code 0 (condition code j is ``cond_offset + j``)."""
        return self.vocab_size + 1 + self.n_classes

    @property
    def table_size(self) -> int:
        """Rows of the token embedding: codes, start token, classes, condition codes."""
        return self.cond_offset + self.cond_vocab_size

    @property
    def max_codes(self) -> int:
        """Image codes a sequence can hold after its prefix (block_size - cond_length)."""
        return self.block_size - self.cond_length

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def validate(self) -> None:
        """Raise ``ValueError("field: why")`` for an inconsistent config."""
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.n_classes < 0:
            raise ValueError(f"n_classes: must be >= 0, got {self.n_classes}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd: must be divisible by n_head={self.n_head}, "
                             f"got {self.n_embd}")
        for name in ("embd_pdrop", "resid_pdrop", "attn_pdrop"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}: must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.pkeep <= 1.0:
            raise ValueError(f"pkeep: must be in [0, 1], got {self.pkeep}")
        if not 0.0 <= self.cond_drop <= 1.0:
            raise ValueError(f"cond_drop: must be in [0, 1], got {self.cond_drop}")
        if self.cond_drop > 0.0 and self.n_classes == 0:
            raise ValueError("cond_drop: needs a class-conditional model (n_classes > 0)")
        if self.cond_vocab_size < 0 or self.cond_length < 0:
            raise ValueError(f"cond_vocab_size, cond_length: must be >= 0, got "
                             f"{self.cond_vocab_size}, {self.cond_length}")
        if (self.cond_vocab_size > 0) != (self.cond_length > 0):
            raise ValueError("cond_vocab_size, cond_length: a condition map needs both (> 0), "
                             f"got {self.cond_vocab_size}, {self.cond_length}")
        if self.cond_length >= self.block_size:
            raise ValueError(f"block_size: must exceed cond_length={self.cond_length} (room for "
                             f"image codes), got {self.block_size}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GPTConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise (a typo must not pass silently)."""
        check_keys(cls, data)
        return cls(**data)


# --- key/value cache ----------------------------------------------------------------------------


class KVCache:
    """Preallocated keys and values for incremental decoding, written in place.

    ``k[l]``, ``v[l]``: [B, n_head, max_len, head_dim] views into one buffer. Positions
    ``0 .. pos-1`` are valid after a caller has fed ``pos`` tokens through
    :meth:`GPT.forward_step`; the cache itself keeps no length (the caller owns ``pos``), so one
    cache can be rewound or refilled from any position without clearing.
    """

    def __init__(
        self, n_layer: int, batch: int, n_head: int, max_len: int, head_dim: int,
        dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
    ) -> None:
        self.batch, self.max_len = batch, max_len
        # [n_layer, 2, B, nh, max_len, hd]
        self.data = torch.zeros(n_layer, 2, batch, n_head, max_len, head_dim, dtype=dtype,
                                device=device)
        self.k = [self.data[i, 0] for i in range(n_layer)]
        self.v = [self.data[i, 1] for i in range(n_layer)]

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


# --- layers -------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, q/k/v from one fused Linear (same parameter count as the
    reference's three), attention by ``scaled_dot_product_attention``.

    Full mode (:meth:`forward`): [B,T,C] -> [B,T,C], causal. Cached mode (:meth:`forward_cached`):
    the t new tokens sit at positions pos .. pos+t-1, their keys/values are written into the
    cache and they attend to positions 0 .. pos+t-1.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.n_embd = config.n_head, config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_pdrop = config.attn_pdrop
        self.resid_drop = nn.Dropout(config.resid_pdrop)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, t, c = x.shape
        # [B,T,3C] -> 3 x [B,nh,T,hd]
        qkv = self.c_attn(x).view(b, t, 3, self.n_head, c // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def _out(self, y: Tensor) -> Tensor:
        b, _, t, _ = y.shape
        y = y.transpose(1, 2).reshape(b, t, self.n_embd)  # [B,nh,T,hd] -> [B,T,C]
        return self.resid_drop(self.c_proj(y))

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self._qkv(x)
        dropout_p = self.attn_pdrop if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        return self._out(y)

    def forward_cached(
        self, x: Tensor, k_cache: Tensor, v_cache: Tensor, pos: int, last_only: bool = False
    ) -> Tensor:
        """x [B,t,C] at positions pos..pos+t-1 -> [B,t,C] ([B,1,C] for the last position only
        when ``last_only``; keys/values of all t positions are cached either way). No dropout."""
        q, k, v = self._qkv(x)  # [B,nh,t,hd]
        t = x.shape[1]
        end = pos + t
        k_cache[:, :, pos:end] = k
        v_cache[:, :, pos:end] = v
        if last_only and t > 1:
            q, t = q[:, :, -1:], 1
        if t == 1:  # one query sees every cached position: no mask
            y = F.scaled_dot_product_attention(q, k_cache[:, :, :end], v_cache[:, :, :end])
        elif pos == 0:  # a prefill from the start: plain causal attention over the new tokens
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # a chunk after a cached prefix: query pos+i sees keys 0..pos+i
            rows = torch.arange(pos, end, device=x.device).unsqueeze(1)
            mask = torch.arange(end, device=x.device).unsqueeze(0) <= rows  # [t, end]
            y = F.scaled_dot_product_attention(
                q, k_cache[:, :, :end], v_cache[:, :, :end], attn_mask=mask)
        return self._out(y)


class MLP(nn.Module):
    """[B,T,C] -> Linear 4C -> GELU -> Linear C -> dropout."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.drop = nn.Dropout(config.resid_pdrop)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))

    def forward_cached(
        self, x: Tensor, k_cache: Tensor, v_cache: Tensor, pos: int, last_only: bool = False
    ) -> Tensor:
        """Cached mode, see :meth:`CausalSelfAttention.forward_cached`."""
        h = self.attn.forward_cached(self.ln_1(x), k_cache, v_cache, pos, last_only)
        if last_only:
            x = x[:, -1:]
        x = x + h
        return x + self.mlp(self.ln_2(x))


# --- the model ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CorruptionDraws:
    """Random numbers for the training-time corruption of B sequences of L codes: uniforms
    ``keep`` [B, L-1] (a code is kept where < pkeep), replacement codes ``noise`` [B, L-1], and
    uniforms ``drop`` [B, 1] (the class token is dropped where < cond_drop)."""

    keep: Tensor
    noise: Tensor
    drop: Tensor

    def rows(self, index: Tensor) -> CorruptionDraws:
        return CorruptionDraws(self.keep[index], self.noise[index], self.drop[index])


class GPT(Exportable, nn.Module):
    """Token + learned position embeddings, ``n_layer`` pre-LN blocks, final LN, a bias-free head
    over the ``vocab_size`` image codes.

    Every parameter lives in a submodule (``pos_emb`` is an ``nn.Embedding``, not a bare
    Parameter), so hooks that gather parameters per submodule (DeepSpeed ZeRO-3) see them all.
    """

    weights_name = WEIGHTS_NAME
    config_name = CONFIG_NAME
    config_class = GPTConfig

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.tok_emb = nn.Embedding(config.table_size, config.n_embd)
        self.pos_emb = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.embd_pdrop)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer) (two per block)
        std = 0.02 / math.sqrt(2 * config.n_layer)
        for block in self.blocks:
            nn.init.normal_(block.attn.c_proj.weight, mean=0.0, std=std)
            nn.init.normal_(block.mlp.c_proj.weight, mean=0.0, std=std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        # nn.LayerNorm initialises to weight 1, bias 0 by itself

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count; ``non_embedding`` leaves out the token and position tables."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel() + self.pos_emb.weight.numel()
        return n

    # -- conditioning and the training batch -----------------------------------------------------

    def cond_tokens(self, labels: Tensor | None, batch: int | None = None) -> Tensor:
        """Condition tokens [B,1] (long): class k -> ``class_token(k)``; ``labels=None`` -> the
        start token, repeated ``batch`` times. Raises for labels outside [0, n_classes)."""
        c = self.config
        device = self.tok_emb.weight.device
        if labels is None:
            if batch is None:
                raise ValueError("cond_tokens: give labels or batch")
            return torch.full((batch, 1), c.start_token, dtype=torch.long, device=device)
        labels = labels.reshape(-1).to(device=device, dtype=torch.long)
        if batch is not None and labels.numel() != batch:
            raise ValueError(f"cond_tokens: {labels.numel()} labels for batch {batch}")
        if labels.device.type != "meta" and labels.numel() and (
            int(labels.min()) < 0 or int(labels.max()) >= c.n_classes
        ):
            raise ValueError(f"cond_tokens: labels must be in [0, {c.n_classes}), got "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        return (labels + (c.vocab_size + 1)).unsqueeze(1)

    def prefix_tokens(self, labels: Tensor | None, batch: int,
                      cond_codes: Tensor | None = None) -> Tensor:
        """What precedes the image codes, [B, 1 + cond_length] (long): the condition token
        (:meth:`cond_tokens`) and, for a model with a condition map, its codes ``cond_codes``
        [B, cond_length] (indices of the condition VQGAN) in their rows of the table. Raises when
        the condition codes are missing, of the wrong length or outside its codebook."""
        c = self.config
        tokens = self.cond_tokens(labels, batch)
        if c.cond_length == 0:
            if cond_codes is not None:
                raise ValueError("cond_codes: this model has no condition map (cond_length 0)")
            return tokens
        if cond_codes is None:
            raise ValueError(f"cond_codes: this model reads a condition map of {c.cond_length} "
                             f"codes before the image; give them")
        cond_codes = cond_codes.to(device=tokens.device, dtype=torch.long).reshape(batch, -1)
        if cond_codes.shape[1] != c.cond_length:
            raise ValueError(f"cond_codes: {cond_codes.shape[1]} codes per row, the model reads "
                             f"{c.cond_length}")
        if cond_codes.device.type != "meta" and cond_codes.numel() and (
            int(cond_codes.min()) < 0 or int(cond_codes.max()) >= c.cond_vocab_size
        ):
            raise ValueError(f"cond_codes: must be in [0, {c.cond_vocab_size}), got "
                             f"[{int(cond_codes.min())}, {int(cond_codes.max())}]")
        return torch.cat([tokens, cond_codes + c.cond_offset], dim=1)

    def corruption_draws(self, rows: int, length: int, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None) -> CorruptionDraws:
        """The random numbers :meth:`prepare_batch` uses for ``rows`` sequences of ``length``
        codes, in one fixed order on ``device`` (default: the generator's), so a caller can draw
        a whole global batch and hand each rank its rows."""
        device = device if device is not None else (generator.device if generator else None)
        shape = (rows, length - 1)
        keep = torch.rand(shape, device=device, generator=generator)
        noise = torch.randint(0, self.config.vocab_size, shape, device=device, generator=generator)
        drop = torch.rand((rows, 1), device=device, generator=generator)
        return CorruptionDraws(keep, noise, drop)

    def prepare_batch(
        self, codes: Tensor, labels: Tensor | None = None,
        generator: torch.Generator | None = None, draws: CorruptionDraws | None = None,
        cond_codes: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """(idx [B,P+L], targets [B,P+L]) for ``forward``: idx = [cond, condition codes (P =
        cond_length, see :meth:`prefix_tokens`), codes[:, :-1]], targets = [-100 x P (no
        target: the loss is over the image codes only), codes]. In training mode only: each input
        image code is kept with probability ``pkeep`` (else replaced by a uniformly random code;
        targets stay clean) and each class token is replaced by the start token with
        probability ``cond_drop``. The random numbers are ``draws`` (:meth:`corruption_draws`,
        B rows) when given, else drawn from ``generator``."""
        c = self.config
        b, length = codes.shape
        if length > c.max_codes:
            raise ValueError(f"prepare_batch: {length} codes exceed block_size {c.block_size}"
                             + (f" - cond_length {c.cond_length}" if c.cond_length else ""))
        codes = codes.long()
        cond = self.cond_tokens(labels, b).to(codes.device)
        inputs = codes[:, :-1]
        corrupt = self.training and c.pkeep < 1.0
        drop_cond = self.training and c.cond_drop > 0.0 and labels is not None
        if (corrupt or drop_cond) and draws is None:
            draws = self.corruption_draws(b, length, generator,
                                          generator.device if generator else codes.device)
        if corrupt:
            keep = draws.keep.to(codes.device) < c.pkeep
            inputs = torch.where(keep, inputs, draws.noise.to(codes.device))
        if drop_cond:
            drop = draws.drop.to(codes.device) < c.cond_drop
            cond = torch.where(drop, torch.full_like(cond, c.start_token), cond)
        # The map's codes ([B, 0] without a map; checked there) are never dropped: cond_drop
        # acts on the class token alone.
        maps = self.prefix_tokens(None, b, cond_codes)[:, 1:].to(codes.device)
        if c.cond_length:
            ignore = torch.full((b, c.cond_length), -100, dtype=torch.long, device=codes.device)
            codes = torch.cat([ignore, codes], dim=1)
        return torch.cat([cond, maps, inputs], dim=1), codes

    def loss(
        self, codes: Tensor, labels: Tensor | None = None,
        generator: torch.Generator | None = None, cond_codes: Tensor | None = None,
    ) -> Tensor:
        """Mean cross-entropy of predicting ``codes`` [B,L] (flattened code grids, raster order)
        given the class ``labels`` [B] (or the start token) and, for a model with a condition
        map, its codes ``cond_codes`` [B,P]. See :meth:`prepare_batch`."""
        idx, targets = self.prepare_batch(codes, labels, generator, cond_codes=cond_codes)
        _, loss = self(idx, targets)
        assert loss is not None
        return loss

    # -- forward ---------------------------------------------------------------------------------

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """idx [B,T] (T <= block_size, ids < table_size) -> (logits [B,T,vocab_size], loss).

        ``logits[:, t]`` is the distribution of the code after ``idx[:, :t+1]``; ``loss`` is the
        mean cross-entropy against ``targets`` [B,T] over the positions whose target is not -100
        (None without targets).
        """
        _, t = idx.shape
        if t > self.config.block_size:
            raise ValueError(f"forward: sequence of {t} exceeds block_size "
                             f"{self.config.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))  # [B,T,C]
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))  # [B,T,V]
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(),
                                   targets.reshape(-1))
        return logits, loss

    def new_cache(
        self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> KVCache:
        """An empty :class:`KVCache` for ``batch`` rows and ``max_len`` positions (default
        block_size), in the parameters' dtype and device unless given."""
        c, w = self.config, self.tok_emb.weight
        return KVCache(c.n_layer, batch, c.n_head, max_len or c.block_size, c.head_dim,
                       dtype=dtype or w.dtype, device=device or w.device)

    def forward_step(
        self, idx: Tensor, cache: KVCache, pos: int, last_only: bool = True
    ) -> Tensor:
        """Incremental forward: idx [B,t] are the tokens at positions pos..pos+t-1, positions
        0..pos-1 must already be in ``cache``; their keys/values are written into it.

        Returns logits [B,1,vocab_size] for the last position (``last_only``; the last block
        then skips attention output and MLP of the other positions, which nothing reads) or
        [B,t,vocab_size]. Equals ``forward(full_prefix)[:, pos:pos+t]`` up to float rounding.
        Dropout is not applied: meant for eval mode under ``torch.inference_mode``.
        """
        t = idx.shape[1]
        if pos + t > cache.max_len or pos + t > self.config.block_size:
            raise ValueError(f"forward_step: positions up to {pos + t} exceed the cache "
                             f"({cache.max_len}) or block_size ({self.config.block_size})")
        x = self.tok_emb(idx) + self.pos_emb.weight[pos:pos + t]  # [B,t,C]
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block.forward_cached(x, cache.k[i], cache.v[i], pos, last_only and i == last)
        return self.head(self.ln_f(x))

    # -- optimizer -------------------------------------------------------------------------------

    def configure_optimizer_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Two AdamW param groups: Linear weights (matrices) with ``weight_decay``; biases,
        LayerNorm and embedding (token and position) weights with 0. Only trainable params."""
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for module in self.modules():
            for name, p in module.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                if isinstance(module, nn.Linear) and name == "weight":
                    decay.append(p)
                else:
                    no_decay.append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
