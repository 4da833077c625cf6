"""VectorQuantizer: lookup, loss both ways, EMA, cosine lookup, factorised codes, restarts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.models import quantize as quantize_module
from pipeline.models.quantize import (
    QuantizerConfig,
    VectorQuantizer,
    code_statistics,
    nearest_code,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def make(codebook: torch.Tensor, **cfg) -> VectorQuantizer:
    k, d = codebook.shape
    q = VectorQuantizer(QuantizerConfig(n_embed=k, embed_dim=cfg.pop("embed_dim", d), **cfg))
    with torch.no_grad():
        q.embedding.weight.copy_(codebook)
        if q.config.use_ema:
            q.ema_embed_sum.copy_(codebook)
    return q


def as_map(vectors: torch.Tensor) -> torch.Tensor:
    """[N, D] -> [1, D, 1, N] (a 1 x N latent map)."""
    return vectors.t().reshape(1, vectors.shape[1], 1, vectors.shape[0])


def test_nearest_code_and_straight_through():
    codebook = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    q = make(codebook)
    z = as_map(torch.tensor([[0.9, 0.1], [0.1, 0.8], [0.1, -0.1]])).requires_grad_(True)
    out = q(z)
    assert out.indices.tolist() == [[[1, 2, 0]]]
    torch.testing.assert_close(out.z_q, as_map(codebook[[1, 2, 0]]))
    out.z_q.sum().backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))  # identity gradient to z


@pytest.mark.parametrize("legacy", [False, True])
def test_loss_formula_and_gradients(legacy):
    codebook = torch.tensor([[0.0, 0.0], [2.0, 2.0]])
    beta = 0.25
    q = make(codebook, beta=beta, legacy_beta=legacy)
    zv = torch.tensor([[0.5, -0.5], [1.0, 3.0]])
    z = as_map(zv).requires_grad_(True)
    out = q(z)
    e = codebook[[0, 1]]
    mse = ((zv - e) ** 2).mean()  # ||sg(z) - e||² and ||z - sg(e)||² share the value
    torch.testing.assert_close(out.loss, (1 + beta) * mse)
    out.loss.backward()
    # Paper: L = ||sg(z)-e||² + β||z-sg(e)||²; reference (legacy): L = β||sg(z)-e||² + ||z-sg(e)||²
    w_codebook, w_commit = (beta, 1.0) if legacy else (1.0, beta)
    n = zv.numel()
    torch.testing.assert_close(z.grad, as_map(w_commit * 2 * (zv - e) / n))
    torch.testing.assert_close(q.embedding.weight.grad, w_codebook * 2 * (e - zv) / n)


def test_ema_loss_is_commitment_only_and_codebook_has_no_grad():
    codebook = torch.tensor([[0.0, 0.0], [2.0, 2.0]])
    q = make(codebook, use_ema=True).eval()
    zv = torch.tensor([[0.5, -0.5], [1.0, 3.0]])
    out = q(as_map(zv))
    torch.testing.assert_close(out.loss, 0.25 * ((zv - codebook) ** 2).mean())
    assert not q.embedding.weight.requires_grad


def test_ema_moves_codes_toward_assigned_outputs():
    codebook = torch.tensor([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0]])
    q = make(codebook, use_ema=True, ema_decay=0.9).train()
    zv = torch.tensor([[1.0, 0.5], [1.2, 0.7], [4.0, 6.0]])  # two to code 0, one to code 1
    targets = {0: zv[:2].mean(0), 1: zv[2]}
    before = {k: (codebook[k] - t).norm() for k, t in targets.items()}
    for _ in range(5):
        q(as_map(zv))
        w = q.embedding.weight
        after = {k: (w[k] - t).norm() for k, t in targets.items()}
        assert all(after[k] < before[k] for k in targets)
        before = after
    # The unused code stays where it was (counts start at one, see VectorQuantizer).
    torch.testing.assert_close(q.embedding.weight[2], codebook[2], rtol=1e-3, atol=1e-3)
    # Many steps converge to the assigned means.
    for _ in range(200):
        q(as_map(zv))
    for k, t in targets.items():
        torch.testing.assert_close(q.embedding.weight[k], t, rtol=1e-2, atol=1e-2)


def test_l2_lookup_picks_max_cosine_code():
    # Euclidean-nearest to z = (3, 0.5) is code 0 (1, 1); max cosine is code 1 (10, 0).
    codebook = torch.tensor([[1.0, 1.0], [10.0, 0.0], [0.0, -1.0]])
    z = as_map(torch.tensor([[3.0, 0.5]]))
    assert make(codebook).eval()(z).indices.item() == 0
    out = make(codebook, l2_normalize=True).eval()(z)
    assert out.indices.item() == 1
    torch.testing.assert_close(out.z_q.flatten(), torch.tensor([1.0, 0.0]))  # unit code


def test_factorized_codes():
    q = VectorQuantizer(QuantizerConfig(n_embed=32, embed_dim=16, codebook_dim=4))
    assert q.embedding.weight.shape == (32, 4)
    z = torch.randn(2, 16, 3, 3, requires_grad=True)
    out = q(z)
    assert out.z_q.shape == z.shape and out.indices.shape == (2, 3, 3)
    # Looked up in the 4-d space, projected back up.
    low = q.proj_in(z.permute(0, 2, 3, 1).reshape(-1, 16))
    assert torch.equal(out.indices.flatten(), nearest_code(low, q.embedding.weight))
    assert torch.equal(q.embed_indices(out.indices), out.z_q)
    (out.z_q.sum() + out.loss).backward()
    assert q.proj_in.weight.grad.abs().sum() > 0 and q.proj_out.weight.grad.abs().sum() > 0
    assert z.grad.abs().sum() > 0


@pytest.mark.parametrize("options", [
    {}, {"use_ema": True}, {"l2_normalize": True}, {"codebook_dim": 4},
    {"use_ema": True, "l2_normalize": True, "codebook_dim": 4},
])
def test_z_q_is_exactly_the_codes_and_gradients_flow(options):
    """The forward value is the looked-up codes bit for bit (z + sg(e - z) would round), so
    decoding stored indices reproduces the forward pass exactly; the gradient still reaches z."""
    q = VectorQuantizer(QuantizerConfig(n_embed=32, embed_dim=16, **options)).eval()
    z = (torch.randn(2, 16, 5, 5) * 3).requires_grad_(True)
    out = q(z)
    assert torch.equal(out.z_q, q.embed_indices(out.indices))
    assert out.z_q.is_contiguous()
    out.z_q.square().sum().backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    if not options:  # identity straight-through: dL/dz = dL/dz_q
        assert torch.equal(z.grad, 2 * out.z_q.detach())


def test_dead_code_restart_replaces_unused_codes():
    codebook = torch.stack([torch.zeros(3)] + [torch.full((3,), 100.0 + i) for i in range(7)])
    q = make(codebook, restart_dead_codes=8).train()  # dead after 8 x 8 codes = 64 vectors
    zv = torch.randn(32, 3) * 0.1  # all nearest to code 0; 32 vectors a forward
    q(as_map(zv))
    assert torch.equal(q.embedding.weight, codebook)  # unused for one step: not yet dead
    q(as_map(zv))
    w = q.embedding.weight
    assert torch.equal(w[0], codebook[0])  # the used code is kept
    for k in range(1, 8):  # every dead code is now one of the batch's vectors
        assert (zv - w[k]).abs().amax(dim=1).min() == 0
    assert q.unused_vectors.tolist() == [0] * 8
    # After the restart the batch spreads over several codes.
    assert q(as_map(zv)).usage > 1 / 8


def test_dead_codes_are_counted_in_vectors_not_forwards():
    """The same vectors in one forward or in three give the same restart: the rule does not
    depend on the batch size, the worker count or accumulation."""
    codebook = torch.stack([torch.zeros(2)] + [torch.full((2,), 100.0 + i) for i in range(3)])
    zv = torch.randn(12, 2) * 0.1  # all nearest to code 0
    once = make(codebook, restart_dead_codes=3).train()  # limit 3 x 4 codes = 12 vectors
    assert once.dead_code_limit() == 12
    once(as_map(zv))
    assert once.take_pending_restart()[0].tolist() == [1, 2, 3]
    thrice = make(codebook, restart_dead_codes=3).train()
    thrice(as_map(zv[:4]))
    thrice(as_map(zv[4:8]))
    assert thrice.take_pending_restart() is None and thrice.unused_vectors.tolist() == [0, 8, 8, 8]
    thrice(as_map(zv[8:]))
    assert thrice.take_pending_restart()[0].tolist() == [1, 2, 3]


def test_restart_is_training_only():
    codebook = torch.stack([torch.zeros(2), torch.full((2,), 100.0)])
    q = make(codebook, restart_dead_codes=1).eval()
    for _ in range(3):
        q(as_map(torch.randn(4, 2) * 0.1))
    assert torch.equal(q.embedding.weight, codebook)


def test_perplexity_and_usage_on_constructed_example():
    # 8 codes; codes 0..3 used twice each: uniform over 4 -> perplexity 4, usage 1/2.
    counts, perplexity, usage = code_statistics(torch.tensor([0, 1, 2, 3, 3, 2, 1, 0]), 8)
    assert counts.tolist() == [2, 2, 2, 2, 0, 0, 0, 0]
    assert perplexity.item() == pytest.approx(4.0, rel=1e-6)
    assert usage.item() == 0.5
    # Skewed: p = (3/4, 1/4) -> exp(H).
    _, perplexity, usage = code_statistics(torch.tensor([5, 5, 5, 1]), 8)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert perplexity.item() == pytest.approx(math.exp(h), rel=1e-5)
    assert usage.item() == 0.25
    # Through the module: two maps onto two distinct codes.
    q = make(torch.tensor([[0.0], [1.0], [2.0], [3.0]])).eval()
    out = q(as_map(torch.tensor([[0.1], [0.9], [1.1], [-0.1]])))
    assert out.perplexity.item() == pytest.approx(2.0, rel=1e-6)
    assert out.usage.item() == 0.5


def test_chunked_distance_matches_full(monkeypatch):
    z, codebook = torch.randn(1000, 8), torch.randn(300, 8)
    full = torch.cdist(z, codebook).argmin(dim=1)
    monkeypatch.setattr(quantize_module, "_MAX_DISTANCE_ELEMENTS", 300 * 7)  # 7-row chunks
    assert torch.equal(nearest_code(z, codebook), full)


def test_eval_is_deterministic():
    q = VectorQuantizer(QuantizerConfig(n_embed=64, embed_dim=8)).eval()
    z = torch.randn(4, 8, 5, 5)
    a, b = q(z), q(z)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.z_q, b.z_q)
    assert torch.equal(a.loss, b.loss)


def test_l2_ema_codes_stay_unit_norm():
    q = VectorQuantizer(QuantizerConfig(n_embed=16, embed_dim=4, use_ema=True,
                                        l2_normalize=True)).train()
    for _ in range(3):
        q(torch.randn(2, 4, 4, 4))
    torch.testing.assert_close(q.embedding.weight.norm(dim=1), torch.ones(16))
    z = torch.randn(1, 4, 2, 2)
    out = q.eval()(z)
    zn = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, 4), dim=1)
    assert torch.equal(out.indices.flatten(), (zn @ q.embedding.weight.t()).argmax(dim=1))


def test_window_stats_count_training_forwards_since_the_last_take():
    q = make(torch.tensor([[0.0], [1.0], [2.0], [3.0]])).train()
    assert q.take_window_stats() == {}  # nothing yet
    q(as_map(torch.tensor([[0.1], [0.9]])))  # codes 0, 1
    q(as_map(torch.tensor([[1.1], [1.2]])))  # code 1 twice
    stats = q.take_window_stats()
    p = torch.tensor([1 / 4, 3 / 4])
    assert stats["codebook/window_usage"] == 0.5 and stats["codebook/dead_codes"] == 2
    assert stats["codebook/window_perplexity"] == pytest.approx(
        float(torch.exp(-(p * p.log()).sum())))
    q.eval()(as_map(torch.tensor([[3.0]])))  # eval forwards do not count
    assert q.take_window_stats() == {}
    q.train()(as_map(torch.tensor([[3.0]])))  # the window restarted after the take
    assert q.take_window_stats()["codebook/dead_codes"] == 3
    assert "window_counts" not in q.state_dict()  # monitoring, not model state
