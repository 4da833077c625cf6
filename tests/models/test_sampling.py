"""Sampling: logit filters, guidance, cached == uncached, sliding window == plain on the trained
window size, window placement as in the reference, cache reuse counts."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.models.gpt import GPT, GPTConfig
from pipeline.models.sampling import (
    apply_guidance,
    draw,
    sample,
    sample_logits,
    sample_sliding,
    sample_uncached,
    sliding_window_origin,
    top_k_filter,
    top_p_filter,
)

INF = float("inf")


pytestmark = pytest.mark.usefixtures("one_thread_module")


def model_for(block_size: int = 17, **overrides) -> GPT:
    base = dict(vocab_size=16, n_classes=3, block_size=block_size, n_layer=2, n_head=2,
                n_embd=32)
    base.update(overrides)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**base)).eval()
    with torch.no_grad():  # sharper than init so that top-k / top-p / guidance matter
        model.head.weight.mul_(40.0)
    return model


# --- filters ------------------------------------------------------------------------------------


def test_top_k_filter():
    logits = torch.tensor([[1.0, 5.0, 3.0, 2.0, 4.0], [0.0, -1.0, 2.0, 1.0, -2.0]])
    out = top_k_filter(logits, 2)
    assert out.tolist() == [[-INF, 5.0, -INF, -INF, 4.0], [-INF, -INF, 2.0, 1.0, -INF]]
    assert torch.equal(top_k_filter(logits, None), logits)
    assert torch.equal(top_k_filter(logits, 5), logits)
    assert (top_k_filter(logits, 1) > -INF).sum(-1).tolist() == [1, 1]
    assert top_k_filter(torch.tensor([[1.0, 2.0, 2.0, 0.0]]), 2).isfinite().sum() == 2
    assert torch.equal(logits, torch.tensor([[1.0, 5.0, 3.0, 2.0, 4.0],
                                             [0.0, -1.0, 2.0, 1.0, -2.0]]))  # not in place
    with pytest.raises(ValueError):
        top_k_filter(logits, 0)


def test_top_p_filter():
    probs = torch.tensor([[0.1, 0.5, 0.25, 0.15], [0.97, 0.01, 0.01, 0.01]])
    logits = probs.log()
    keep = lambda p: top_p_filter(logits, p).isfinite().tolist()  # noqa: E731
    assert keep(0.5) == [[False, True, False, False], [True, False, False, False]]
    assert keep(0.6) == [[False, True, True, False], [True, False, False, False]]
    assert keep(0.75) == [[False, True, True, False], [True, False, False, False]]
    assert keep(0.8) == [[False, True, True, True], [True, False, False, False]]
    assert keep(0.985) == [[True, True, True, True], [True, True, True, False]]
    assert keep(1e-6) == [[False, True, False, False], [True, False, False, False]]
    assert torch.equal(top_p_filter(logits, 1.0), logits)
    assert torch.equal(top_p_filter(logits, None), logits)
    kept = top_p_filter(logits, 0.6)
    torch.testing.assert_close(kept[0, 1:3], logits[0, 1:3])  # kept values unchanged
    with pytest.raises(ValueError):
        top_p_filter(logits, 0.0)


def test_sample_logits_and_guidance():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    assert sample_logits(logits, temperature=0).tolist() == [1, 0]
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_logits(logits, top_k=1, generator=gen) for _ in range(20)])
    assert (draws == torch.tensor([1, 0])).all()
    wide = torch.zeros(2000, 3)
    wide[:, 0] = math.log(0.8)
    wide[:, 1:] = math.log(0.1)
    share = (sample_logits(wide, generator=gen) == 0).float().mean().item()
    assert 0.75 < share < 0.85
    hot = (sample_logits(wide, temperature=100.0, generator=gen) == 0).float().mean().item()
    assert 0.28 < hot < 0.4  # flattened towards uniform
    probs = torch.tensor([[0.0, 0.3, 0.0, 0.7, 0.0]]).repeat(4000, 1)
    drawn = draw(probs, gen)
    assert set(drawn.unique().tolist()) == {1, 3}  # never a zero-probability index
    assert 0.67 < (drawn == 3).float().mean().item() < 0.73
    assert draw(torch.tensor([[0.0, 1.0, 0.0, 0.0]]), gen).tolist() == [1]
    cond, uncond = torch.tensor([[2.0, 0.0]]), torch.tensor([[1.0, 1.0]])
    guided = apply_guidance(torch.cat([cond, uncond]), 3.0)
    assert guided.tolist() == [[4.0, -2.0]]


# --- plain sampling -----------------------------------------------------------------------------


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_cached_and_uncached_give_the_same_logits(cfg_scale):
    model = model_for()
    labels = torch.tensor([0, 2, 1])
    steps: dict[str, list[torch.Tensor]] = {"cached": [], "uncached": []}
    kw = dict(temperature=0.9, top_k=8, top_p=0.95, cfg_scale=cfg_scale, seed=5)
    a = sample(model, 3, labels, 17, callback=lambda s, x: steps["cached"].append(x.clone()), **kw)
    b = sample_uncached(model, 3, labels, 17,
                        callback=lambda s, x: steps["uncached"].append(x.clone()), **kw)
    assert len(steps["cached"]) == len(steps["uncached"]) == 17
    rows = 6 if cfg_scale != 1.0 else 3
    for x, y in zip(steps["cached"], steps["uncached"], strict=True):
        assert x.shape == (rows, 16)
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)
    assert torch.equal(a, b)
    assert a.shape == (3, 17) and a.dtype == torch.long and (a < 16).all() and (a >= 0).all()


def test_seeds_classes_and_guidance():
    model = model_for()
    labels = torch.tensor([0, 1, 2, 0])
    a = sample(model, 4, labels, 12, seed=1)
    assert torch.equal(a, sample(model, 4, labels, 12, generator=torch.Generator().manual_seed(1)))
    assert not torch.equal(a, sample(model, 4, labels, 12, seed=2))
    # the class conditions: rows with other labels see other condition tokens
    greedy = sample(model, 4, labels, 12, temperature=0)
    assert torch.equal(greedy[0], greedy[3]) and not torch.equal(greedy[0], greedy[1])
    guided = sample(model, 4, labels, 12, temperature=0, cfg_scale=4.0)
    assert not torch.equal(guided, greedy)
    # cfg_scale 0 is the unconditional (start-token) model
    uncond = sample(model, 4, None, 12, temperature=0)
    assert torch.equal(sample(model, 4, labels, 12, temperature=0, cfg_scale=0.0), uncond)
    assert sample(model, 2, None, None, seed=0).shape == (2, 17)
    with pytest.raises(ValueError, match="eval"):
        sample(model.train(), 1, None, 4)
    model.eval()
    with pytest.raises(ValueError, match="cfg_scale"):
        sample(model, 1, None, 4, cfg_scale=2.0)
    with pytest.raises(ValueError, match="length"):
        sample(model, 1, None, 18)


# --- sliding window -----------------------------------------------------------------------------


def test_window_origin_matches_reference_placement():
    """The reference (scripts/sample_conditional.py, 16x16 window): local_i = i for i <= 8,
    16 - (H - i) for H - i < 8, else 8; the crop starts at i - local_i (same for j)."""
    big = (20, 33)

    def local(i: int, size: int) -> int:
        if i <= 8:
            return i
        if size - i < 8:
            return 16 - (size - i)
        return 8

    for i in range(big[0]):
        for j in range(big[1]):
            assert sliding_window_origin(i, j, big, (16, 16)) == (i - local(i, 20),
                                                                  j - local(j, 33))
    assert sliding_window_origin(5, 5, (8, 8), (8, 8)) == (0, 0)


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_sliding_window_on_the_trained_size_equals_plain_sampling(cfg_scale):
    model = model_for(block_size=20)
    labels = torch.tensor([2, 0])
    kw = dict(temperature=1.0, top_k=10, cfg_scale=cfg_scale, seed=3)
    plain = sample(model, 2, labels, 20, **kw)
    grid, stats = sample_sliding(model, 2, labels, grid=(4, 5), window=(4, 5),
                                 return_stats=True, **kw)
    assert grid.shape == (2, 4, 5)
    assert torch.equal(grid.reshape(2, 20), plain)
    assert stats.recomputations == 1 and stats.extensions == 0 and stats.tokens_forwarded == 20


def test_sliding_window_logits_match_a_full_window_forward():
    """Every step's logits equal the reference's computation: one forward over the window's
    tokens in raster order (cond first), read at the position's place in the window."""
    model = model_for(block_size=16)
    grid, window = (6, 7), (4, 4)
    labels = torch.tensor([1, 2])
    seen: list[torch.Tensor] = []
    codes, stats = sample_sliding(model, 2, labels, grid=grid, window=window, seed=0,
                                  callback=lambda s, x: seen.append(x.clone()),
                                  return_stats=True)
    cond = model.cond_tokens(labels)
    with torch.no_grad():
        for step, logits in enumerate(seen):
            i, j = divmod(step, grid[1])
            i_s, j_s = sliding_window_origin(i, j, grid, window)
            patch = codes[:, i_s:i_s + 4, j_s:j_s + 4].reshape(2, 16)
            full, _ = model(torch.cat([cond, patch[:, :-1]], dim=1))
            torch.testing.assert_close(logits, full[:, (i - i_s) * 4 + (j - j_s)],
                                       atol=1e-4, rtol=1e-4)
    assert len(seen) == 42 and stats.positions == 42
    # placements: rows 0-2 share i_s = 0, rows 3-5 have i_s 1, 2, 2; 4 placements per row
    assert stats.recomputations == 4 * 3
    assert stats.tokens_forwarded < stats.reference_tokens / 3


def test_sliding_window_reuse_counts_and_independence_from_the_cache_bound():
    model = model_for(block_size=16, n_layer=1)
    kw = dict(grid=(8, 8), window=(4, 4), seed=7, return_stats=True)
    pooled, s_pool = sample_sliding(model, 1, torch.tensor([1]), **kw)
    single, s_one = sample_sliding(model, 1, torch.tensor([1]), max_cached_windows=1, **kw)
    assert torch.equal(pooled, single)  # caching never changes what is sampled
    # 5 placements per row; the window moves with i in rows 3..5 only (i_s = 0,0,0,1,2,3,4,4)
    assert s_pool.recomputations == 5 * (1 + 3 + 1) and s_pool.max_cached_windows == 5
    assert s_one.recomputations == 5 * 8 and s_one.max_cached_windows == 1
    assert s_pool.tokens_forwarded < s_one.tokens_forwarded < s_one.reference_tokens
    with pytest.raises(ValueError, match="grid"):
        sample_sliding(model, 1, None, grid=(3, 8), window=(4, 4))
    with pytest.raises(ValueError, match="window"):
        sample_sliding(model, 1, None, grid=(8, 8), window=(4, 5))


def test_unconditional_model():
    model = model_for(n_classes=0)
    codes = sample(model, 2, None, 9, top_p=0.9, seed=0)
    assert codes.shape == (2, 9)
    grid = sample_sliding(model, 2, None, grid=(5, 6), window=(4, 4), seed=0)
    assert grid.shape == (2, 5, 6) and (grid < 16).all()
    with pytest.raises(ValueError, match="labels"):
        sample(model, 1, torch.tensor([0]), 4)


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_condition_map_prefix_cached_equals_uncached(cfg_scale):
    """A model with a condition map samples after its codes (one prefill forward); the cached
    sampler gives the uncached one's logits and codes, and the map changes what is drawn."""
    model = model_for(block_size=12 + 9, cond_vocab_size=7, cond_length=9)
    maps = torch.randint(0, 7, (3, 9), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 2, 1])
    steps: dict[str, list[torch.Tensor]] = {"cached": [], "uncached": []}
    kw = dict(temperature=0.9, top_k=8, cfg_scale=cfg_scale, seed=5, cond_codes=maps)
    a = sample(model, 3, labels, 12, callback=lambda s, x: steps["cached"].append(x.clone()), **kw)
    b = sample_uncached(model, 3, labels, 12,
                        callback=lambda s, x: steps["uncached"].append(x.clone()), **kw)
    for x, y in zip(steps["cached"], steps["uncached"], strict=True):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)
    assert torch.equal(a, b) and a.shape == (3, 12)
    c = sample(model, 3, labels, 12, **{**kw, "cond_codes": (maps + 3) % 7})
    assert not torch.equal(a, c)
    with pytest.raises(ValueError, match=r"block_size - cond_length=12"):
        sample(model, 3, labels, 13, cond_codes=maps)
    with pytest.raises(ValueError, match="give them"):
        sample(model, 3, labels, 12)


def test_conditional_sliding_window_crops_the_condition_under_the_window():
    """A model with a condition map on a larger grid: each step's logits equal one forward over
    [class ; the condition crop under the window ; the window's codes], the reference's
    sample_conditional.py rule; on the trained size it is plain sampling with that map."""
    model = model_for(block_size=16 + 16, cond_vocab_size=5, cond_length=16)
    grid, window = (6, 7), (4, 4)
    labels = torch.tensor([1, 2])
    maps = torch.randint(0, 5, (2, 6, 7), generator=torch.Generator().manual_seed(2))
    seen: list[torch.Tensor] = []
    codes, stats = sample_sliding(model, 2, labels, grid=grid, window=window, seed=0,
                                  cond_grid=maps, callback=lambda s, x: seen.append(x.clone()),
                                  return_stats=True)
    with torch.no_grad():
        for step, logits in enumerate(seen):
            i, j = divmod(step, grid[1])
            i_s, j_s = sliding_window_origin(i, j, grid, window)
            patch = codes[:, i_s:i_s + 4, j_s:j_s + 4].reshape(2, 16)
            crop = maps[:, i_s:i_s + 4, j_s:j_s + 4].reshape(2, 16)
            full, _ = model(torch.cat([model.prefix_tokens(labels, 2, crop), patch[:, :-1]], 1))
            torch.testing.assert_close(logits, full[:, 16 + (i - i_s) * 4 + (j - j_s)],
                                       atol=1e-4, rtol=1e-4)
    assert len(seen) == 42 and stats.recomputations == 4 * 3
    assert stats.tokens_forwarded < stats.reference_tokens / 3
    # The trained size: exactly sample() with the map's codes.
    kw = dict(temperature=1.0, top_k=4, seed=3)
    small = maps[:, :4, :4]
    plain = sample(model, 2, labels, 16, cond_codes=small.reshape(2, 16), **kw)
    same = sample_sliding(model, 2, labels, grid=(4, 4), window=(4, 4), cond_grid=small, **kw)
    assert torch.equal(same.reshape(2, 16), plain)
    with pytest.raises(ValueError, match=r"cond_grid: .*\[n=2, 6, 7\]"):
        sample_sliding(model, 2, labels, grid=grid, window=window)
    with pytest.raises(ValueError, match="needs a window of as many codes"):
        sample_sliding(model, 2, labels, grid=grid, window=(2, 2), cond_grid=maps)
