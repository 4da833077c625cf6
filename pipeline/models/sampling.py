"""Sampling code grids from a :class:`~pipeline.models.gpt.GPT` (paper §3.2).

Bottom-up: logit filters (top-k, top-p), classifier-free guidance, the choice of the next code,
then three samplers that share them:

- :func:`sample`: one sequence per row with a preallocated :class:`KVCache` (written in place,
  one token of forward per step, by :class:`~pipeline.models.decode.DecodeStep`; the reference
  recomputes the whole context every step).
- :func:`sample_uncached`: the same, recomputing the full context every step (tests, bench).
- :func:`sample_sliding`: an H x W grid larger than the trained h x w window. Position (i, j)
  sees the window placed around it and clamped to the grid, as in the reference's sampling
  scripts: origin (clamp(i - h//2, 0, H-h), clamp(j - w//2, 0, W-w)), the window's codes in
  raster order up to (i, j), after the condition token. A model with a condition map
  (``cond_length`` = h*w) reads, after the token, the condition grid's codes under the same
  window (the reference's ``scripts/sample_conditional.py``: the condition is cropped where the
  image window is), so a condition map larger than the trained one gives an image of its size.

Sliding-window caching. A window's keys/values depend on its raster order, so when the window
moves (even by one column) nothing cached for another placement is valid. But every placement is
only ever extended in its own raster order: the positions that use one placement come in grid
raster order, which is also the window's raster order. So each placement gets its own KV cache,
filled once from scratch when first used (a *recomputation*: one forward over its prefix, cond
token included) and afterwards only extended by the codes generated since (one token, or a
chunk of a row when the placement is revisited on the next grid row, which happens in the
clamped top and bottom bands). The window origin's row i_s never decreases, so placements of an
older i_s are dropped. Each prefix position is thus run through the model once per placement
instead of once per sampled position.

Counts for a 32x32 grid and a 16x16 window, per row of the batch (:class:`SlidingStats`): 289
recomputations and 41,616 token positions forwarded (40.6 per sampled code), against 1,024 full
forwards and 262,144 positions for the reference's full-window forward per code (256 per code).
``max_cached_windows=1`` (keep only the current placement): 544 recomputations, 72,576 positions.
In the interior of the grid every code has a placement of its own (the window follows it), so
there a code costs one prefix forward (~137 positions for 16x16) however the cache is kept.

Every sampler needs the model in eval mode and runs under ``torch.inference_mode``. One-token
steps run on one intra-op thread when they are small
(:func:`~pipeline.models.decode.decode_threads`; the caller's thread count is restored
afterwards), prefixes and chunks on the caller's. Codes come back as int64 on the model's
device. Random draws come from ``generator`` (or a new one seeded
with ``seed``, or torch's global generator): the same seed gives the same codes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .decode import decode_threads, one_token_step, step_macs
from .gpt import GPT, KVCache

__all__ = [
    "KVCache",
    "SlidingStats",
    "apply_guidance",
    "draw",
    "sample",
    "sample_logits",
    "sample_sliding",
    "sample_uncached",
    "sliding_window_origin",
    "top_k_filter",
    "top_p_filter",
]

# step index, raw logits [B', vocab_size] of that step (B' = 2n under guidance: cond rows first)
StepCallback = Callable[[int, Tensor], None]


# --- logits -> next code ------------------------------------------------------------------------


def top_k_filter(logits: Tensor, k: int | None) -> Tensor:
    """logits [..., V] -> a copy in which every entry below the k-th largest of its row is -inf
    (ties with the k-th are kept). ``None`` or ``k >= V``: unchanged. ``k < 1`` raises."""
    if k is None or k >= logits.size(-1):
        return logits
    if k < 1:
        raise ValueError(f"top_k: must be >= 1, got {k}")
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float | None) -> Tensor:
    """Nucleus filter: logits [..., V] -> a copy keeping, per row, the smallest set of most likely
    entries whose probability mass reaches ``p`` (always the most likely one); the rest -inf.
    ``None`` or ``p >= 1``: unchanged. ``p <= 0`` raises."""
    if p is None or p >= 1.0:
        return logits
    if p <= 0.0:
        raise ValueError(f"top_p: must be in (0, 1], got {p}")
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.float().softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of the strictly more likely entries
    remove_sorted = mass_before >= p  # the set before this entry already reaches p
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def apply_guidance(logits: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance: logits [2B,V], conditional rows first, then the unconditional
    (start-token) rows -> [B,V] = uncond + scale * (cond - uncond)."""
    cond, uncond = logits.chunk(2, dim=0)
    return uncond + scale * (cond - uncond)


def draw(probs: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One index per row of probs [B,V] (rows sum to 1, zeros allowed) -> [B] (int64), drawn by
    inverse CDF from one uniform number per row: the first index whose cumulative probability
    exceeds u. (``torch.multinomial`` draws B x V exponentials per call, ~5x slower here.) An
    index of probability 0 is never drawn."""
    cdf = probs.cumsum(dim=-1)  # [B,V]
    total = cdf[:, -1:]
    u = torch.rand(total.shape, generator=generator, device=probs.device, dtype=probs.dtype)
    # u * total < total, also after rounding: the search then ends on a positive-mass index
    u = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True).squeeze(1)


def sample_logits(
    logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
    top_p: float | None = None, generator: torch.Generator | None = None,
) -> Tensor:
    """Draw one code per row: logits [B,V] -> [B] (int64). logits / temperature, then top-k,
    then top-p, softmax, :func:`draw`. ``temperature == 0``: greedy (argmax, no draw)."""
    if temperature < 0:
        raise ValueError(f"temperature: must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    logits = top_p_filter(top_k_filter(logits, top_k), top_p)
    return draw(torch.softmax(logits, dim=-1), generator)


# --- shared set-up ------------------------------------------------------------------------------


@dataclass
class _Setup:
    # [B',1+P] condition token (+ the P condition-map codes of a model with cond_length P);
    # B' = 2n under guidance (cond rows, then uncond: the start token, the same map codes)
    tokens: Tensor
    guided: bool
    generator: torch.Generator | None


def _setup(
    model: GPT, n: int, cond: Tensor | None, cfg_scale: float,
    generator: torch.Generator | None, seed: int | None, cond_codes: Tensor | None = None,
) -> _Setup:
    if model.training:
        raise ValueError("sampling needs the model in eval mode (call model.eval())")
    if n < 1:
        raise ValueError(f"n: must be >= 1, got {n}")
    guided = cfg_scale != 1.0
    if guided and cond is None:
        raise ValueError("cfg_scale: guidance (!= 1) needs class labels (cond)")
    tokens = model.prefix_tokens(cond, n, cond_codes)
    if guided:
        tokens = torch.cat([tokens, model.prefix_tokens(None, n, cond_codes)])
    if generator is None and seed is not None:
        generator = torch.Generator(device=tokens.device).manual_seed(seed)
    return _Setup(tokens, guided, generator)


def _next(
    logits: Tensor, s: _Setup, cfg_scale: float, temperature: float, top_k: int | None,
    top_p: float | None,
) -> Tensor:
    """[B',V] raw logits -> [B] codes."""
    if s.guided:
        logits = apply_guidance(logits, cfg_scale)
    return sample_logits(logits, temperature, top_k, top_p, s.generator)


def _check_length(model: GPT, length: int | None) -> int:
    block = model.config.max_codes
    length = block if length is None else length
    if not 1 <= length <= block:
        raise ValueError(f"length: must be in [1, block_size - cond_length={block}], got "
                         f"{length}")
    return length


# --- plain sampling -----------------------------------------------------------------------------


@torch.inference_mode()
def sample(
    model: GPT, n: int, cond: Tensor | None = None, length: int | None = None, *,
    temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
    cfg_scale: float = 1.0, generator: torch.Generator | None = None, seed: int | None = None,
    callback: StepCallback | None = None, cond_codes: Tensor | None = None,
) -> Tensor:
    """Sample ``n`` code sequences [n, length] (int64) with a KV cache.

    ``cond``: class labels [n] (rows may differ) or None for the start token. ``cond_codes``
    [n, P]: the condition map's codes, for a model with a condition map (``cond_length`` P; the
    prefix is run in one forward). ``length``: codes per row, at most (default)
    ``block_size - cond_length``. ``cfg_scale != 1``: classifier-free guidance (over the class;
    both halves see the map), the unconditional rows run in the same batch.
    ``callback(step, logits)`` sees each step's raw logits [B',V] (before guidance and
    filtering).
    """
    length = _check_length(model, length)
    s = _setup(model, n, cond, cfg_scale, generator, seed, cond_codes)
    batch, prefix = s.tokens.shape
    cache = model.new_cache(batch, max_len=prefix - 1 + length)
    out = torch.empty(n, length, dtype=torch.long, device=s.tokens.device)
    x = s.tokens[:, 0]  # [B'] tokens to feed next
    with decode_threads(step_macs(model.config, batch)):
        decode = one_token_step(model, batch)  # kernels for the thread count it runs with
        for step in range(length):
            if step == 0 and prefix > 1:  # the condition map's codes: one prefill forward
                logits = model.forward_step(s.tokens, cache, 0)[:, -1]
            else:
                logits = decode(x, cache, prefix - 1 + step)  # [B',V]
            if callback is not None:
                callback(step, logits)
            code = _next(logits, s, cfg_scale, temperature, top_k, top_p)  # [n]
            out[:, step] = code
            x = torch.cat([code, code]) if s.guided else code
    return out


@torch.inference_mode()
def sample_uncached(
    model: GPT, n: int, cond: Tensor | None = None, length: int | None = None, *,
    temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
    cfg_scale: float = 1.0, generator: torch.Generator | None = None, seed: int | None = None,
    callback: StepCallback | None = None, cond_codes: Tensor | None = None,
) -> Tensor:
    """:func:`sample` without a cache: every step runs ``model.forward`` over the whole context
    (what the reference does). Same arguments, same draws, same result up to float rounding."""
    length = _check_length(model, length)
    s = _setup(model, n, cond, cfg_scale, generator, seed, cond_codes)
    seq = s.tokens  # [B',1+P+step]
    out = torch.empty(n, length, dtype=torch.long, device=seq.device)
    for step in range(length):
        logits = model(seq)[0][:, -1]  # [B',V]
        if callback is not None:
            callback(step, logits)
        code = _next(logits, s, cfg_scale, temperature, top_k, top_p)
        out[:, step] = code
        col = code.unsqueeze(1)
        seq = torch.cat([seq, torch.cat([col, col]) if s.guided else col], dim=1)
    return out


# --- sliding window -----------------------------------------------------------------------------


def sliding_window_origin(
    i: int, j: int, grid: tuple[int, int], window: tuple[int, int]
) -> tuple[int, int]:
    """Top-left corner (i_s, j_s) of the h x w window around position (i, j) of an H x W grid,
    clamped to the grid: (clamp(i - h//2, 0, H-h), clamp(j - w//2, 0, W-w)). (i, j) sits at
    (i - i_s, j - j_s) inside it: (h//2, w//2) away from the borders, as in the reference."""
    (big_h, big_w), (h, w) = grid, window
    return min(max(i - h // 2, 0), big_h - h), min(max(j - w // 2, 0), big_w - w)


@dataclass
class SlidingStats:
    """What :func:`sample_sliding` ran, per row of the batch.

    ``recomputations``: window placements computed from scratch (one prefix forward each);
    ``extensions``: multi-token forwards extending a placement's cache (revisits);
    ``tokens_forwarded``: token positions run through the model in total;
    ``reference_tokens``: positions a full-window forward per sampled code runs (the reference:
    positions x h*w); ``max_cached_windows``: most placements held at once.
    """

    positions: int = 0
    recomputations: int = 0
    extensions: int = 0
    tokens_forwarded: int = 0
    reference_tokens: int = 0
    max_cached_windows: int = 0


@dataclass
class _Placement:
    """A window placement's KV cache; window sequence positions 0..filled-1 are in it."""

    cache: KVCache
    filled: int = 0


@torch.inference_mode()
def sample_sliding(
    model: GPT, n: int, cond: Tensor | None = None, *,
    grid: tuple[int, int], window: tuple[int, int],
    temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
    cfg_scale: float = 1.0, generator: torch.Generator | None = None, seed: int | None = None,
    callback: StepCallback | None = None, max_cached_windows: int | None = None,
    return_stats: bool = False, cond_grid: Tensor | None = None,
) -> Tensor | tuple[Tensor, SlidingStats]:
    """Sample ``n`` code grids [n, H, W] (int64) of ``grid`` = (H, W) with a model trained on
    ``window`` = (h, w) code grids (h*w <= block_size, H >= h, W >= w), in raster order, each
    position conditioned on the clamped window around it (module docstring).

    ``cond_grid`` [n, H, W]: for a model with a condition map of the window's size
    (``cond_length`` = h*w), the codes of a condition map of the grid's size; every placement
    reads the h x w crop of it under its window before its image codes (the placement's prefix).

    Other arguments as :func:`sample`. ``max_cached_windows`` bounds the placements whose KV
    caches are kept (least recently used dropped first; default: all of the current window row,
    at most W-w+1 caches of [2 x n_layer x B' x n_embd x h*w] each); 1 keeps only the current
    placement. Codes do not depend on it. ``return_stats``: also return :class:`SlidingStats`.
    A grid equal to the window gives exactly :func:`sample`'s codes for the same seed.
    """
    (big_h, big_w), (h, w) = grid, window
    if h < 1 or w < 1 or h * w > model.config.max_codes:
        raise ValueError(f"window: h*w must be in [1, block_size - cond_length="
                         f"{model.config.max_codes}], got {window}")
    if big_h < h or big_w < w:
        raise ValueError(f"grid: must be at least the window {window}, got {grid}")
    if max_cached_windows is not None and max_cached_windows < 1:
        raise ValueError(f"max_cached_windows: must be >= 1, got {max_cached_windows}")
    p = model.config.cond_length
    if p and p != h * w:
        raise ValueError(f"window: a condition map of {p} codes needs a window of as many codes "
                         f"(the condition is cropped under it), got {window}")
    if p and (cond_grid is None or tuple(cond_grid.shape) != (n, big_h, big_w)):
        raise ValueError(f"cond_grid: the model reads a condition map; give its codes as "
                         f"[n={n}, {big_h}, {big_w}], got "
                         f"{None if cond_grid is None else list(cond_grid.shape)}")
    if not p and cond_grid is not None:
        raise ValueError("cond_grid: this model has no condition map (cond_length 0)")

    def crop(i_s: int, j_s: int) -> Tensor | None:
        """The condition codes under the window at (i_s, j_s), [n, h*w] raster order."""
        if cond_grid is None:
            return None
        return cond_grid[:, i_s:i_s + h, j_s:j_s + w].reshape(n, h * w)

    s = _setup(model, n, cond, cfg_scale, generator, seed, crop(0, 0))
    batch = s.tokens.shape[0]
    tokens_of = {(0, 0): s.tokens}  # per placement: [B', 1+P] prefix (one when P == 0)
    macs = step_macs(model.config, batch)
    with decode_threads(macs):  # kernels for the thread count the one-token steps run with
        decode = one_token_step(model, batch)
    codes = torch.zeros(n, big_h * big_w, dtype=torch.long, device=s.tokens.device)
    stats = SlidingStats(positions=big_h * big_w, reference_tokens=big_h * big_w * (p + h * w))
    pool: dict[tuple[int, int], _Placement] = {}  # by window origin, least recent first
    spare: list[KVCache] = []  # caches of dropped placements, reused

    def prefix(i_s: int, j_s: int) -> Tensor:
        """[B', 1+P]: the condition token, then (P > 0) the condition crop under the window."""
        if p == 0:
            return s.tokens
        key = (i_s, j_s)
        if key not in tokens_of:
            base = s.tokens[:, :1]
            crop_tokens = model.prefix_tokens(None, n, crop(i_s, j_s))[:, 1:]
            if s.guided:
                crop_tokens = torch.cat([crop_tokens, crop_tokens])
            tokens_of[key] = torch.cat([base, crop_tokens], dim=1)
        return tokens_of[key]

    def feed(i_s: int, j_s: int, start: int, stop: int) -> Tensor:
        """Window sequence positions start..stop-1 -> [B', stop-start] tokens. Positions
        0..P are the prefix (condition token, condition crop), position k > P the window's
        (k-P-1)-th image code in raster order."""
        pre = prefix(i_s, j_s)
        ks = range(max(start, p + 1), stop)
        if len(ks) == 1:
            f = (i_s + (ks[0] - p - 1) // w) * big_w + j_s + (ks[0] - p - 1) % w
            part = codes[:, f:f + 1]
        else:
            flat = [(i_s + (k - p - 1) // w) * big_w + j_s + (k - p - 1) % w for k in ks]
            part = codes[:, torch.tensor(flat, dtype=torch.long, device=codes.device)]
        if s.guided:
            part = torch.cat([part, part])
        return torch.cat([pre[:, start:], part], dim=1) if start <= p else part

    step = 0
    for i in range(big_h):
        i_s, _ = sliding_window_origin(i, 0, grid, window)
        for key in [key for key in pool if key[0] != i_s]:  # i_s never comes back
            spare.append(pool.pop(key).cache)
        for j in range(big_w):
            _, j_s = sliding_window_origin(i, j, grid, window)
            key = (i_s, j_s)
            need = (i - i_s) * w + (j - j_s) + 1 + p  # prefix + codes before (i, j)
            placement = pool.pop(key, None)
            if placement is None:
                if max_cached_windows is not None and len(pool) >= max_cached_windows:
                    spare.append(pool.pop(next(iter(pool))).cache)
                cache = spare.pop() if spare else model.new_cache(batch, max_len=p + h * w)
                placement = _Placement(cache)
                stats.recomputations += 1
            elif need - placement.filled > 1:
                stats.extensions += 1
            pool[key] = placement  # most recently used last
            stats.max_cached_windows = max(stats.max_cached_windows, len(pool))
            filled = placement.filled
            tokens = feed(i_s, j_s, filled, need)
            if need - filled == 1:  # one token: the decoding step, on its thread count
                with decode_threads(macs):
                    logits = decode(tokens[:, 0], placement.cache, filled)  # [B',V]
            else:  # a prefix or a chunk: the full forward, on the caller's threads
                logits = model.forward_step(tokens, placement.cache, filled)[:, -1]
            stats.tokens_forwarded += need - filled
            placement.filled = need
            if callback is not None:
                callback(step, logits)
            codes[:, i * big_w + j] = _next(logits, s, cfg_scale, temperature, top_k, top_p)
            step += 1
    out = codes.view(n, big_h, big_w)
    return (out, stats) if return_stats else out
