"""GPT over codes: parameter parity with the reference, vocabulary layout, causality, training-only
corruption, a falling loss, optimizer groups, export round trip, cached forward."""

from __future__ import annotations

import io
import json

import pytest
import torch

from pipeline.models.gpt import CONFIG_NAME, GPT, WEIGHTS_NAME, GPTConfig

pytestmark = pytest.mark.usefixtures("one_thread_module")


def tiny(**overrides) -> GPTConfig:
    base = dict(vocab_size=32, n_classes=3, block_size=24, n_layer=2, n_head=2, n_embd=32)
    base.update(overrides)
    return GPTConfig(**base)


def reference_mingpt_count(vocab: int, block: int, n_layer: int, n_embd: int) -> int:
    """Parameters of the reference ``taming/modules/transformer/mingpt.py`` GPT:
    tok_emb [vocab, C] + pos_emb [1, block, C] + n_layer blocks (ln1, ln2: 2C each; key, query,
    value, proj: C*C + C each; mlp: C*4C + 4C and 4C*C + C) + ln_f (2C) + head [vocab, C]
    (no bias). The attention mask is a buffer, not counted."""
    c = n_embd
    block_params = 2 * 2 * c + 4 * (c * c + c) + (c * 4 * c + 4 * c) + (4 * c * c + c)
    return vocab * c + block * c + n_layer * block_params + 2 * c + vocab * c


def test_parameter_count_matches_reference():
    """The reference's 24-layer, 16-head, 1024-wide GPT with vocab 1,024 and block 512 has
    304,932,864 parameters. What maps onto what:

    - reference ``blocks`` (LayerNorms with bias, separate key/query/value/proj Linears with
      bias, MLP 4x with bias) = our ``blocks`` with ``bias=True`` (one fused c_attn Linear
      [3C, C] + bias [3C] = the three [C, C] + [C]); reference ``ln_f`` = ours;
      reference ``pos_emb`` [1, 512, C] Parameter = our ``pos_emb`` Embedding(512, C).
    - reference ``tok_emb`` has ``vocab`` rows shared by codes and condition tokens, and its
      ``head`` predicts all ``vocab`` ids: 1,024 + 1,024 rows of C. Ours has
      ``vocab_size + 1 + n_classes`` table rows (codes, start token, classes at an offset) and a
      head over the ``vocab_size`` codes only. Equal rows: 2 * vocab_size + 1 + n_classes = 2,048,
      e.g. vocab_size 1,023 codes and one class: table 1,025 rows, head 1,023 rows.
    - With the same number of codes (vocab_size 1,024), ours has exactly (1 + n_classes) * C
      more: the start and class rows that the reference shares with codes 0..n_classes.
    """
    expected = 304_932_864
    assert reference_mingpt_count(1024, 512, 24, 1024) == expected
    arch = dict(block_size=512, n_layer=24, n_head=16, n_embd=1024, bias=True)
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=1023, n_classes=1, **arch))
        assert model.tok_emb.weight.shape == (1025, 1024)
        assert model.head.weight.shape == (1023, 1024)
        assert model.num_params() == expected
        # everything but the token table and the head is identical, component by component
        c = 1024
        assert model.pos_emb.weight.numel() == 512 * c
        assert sum(p.numel() for p in model.ln_f.parameters()) == 2 * c
        per_block = (reference_mingpt_count(0, 0, 1, c) - 2 * c)
        assert all(sum(p.numel() for p in b.parameters()) == per_block for b in model.blocks)
        for n_classes in (0, 1000):
            same_codes = GPT(GPTConfig(vocab_size=1024, n_classes=n_classes, **arch))
            assert same_codes.num_params() == expected + (1 + n_classes) * c


def test_vocabulary_offset_and_head():
    cfg = tiny()
    model = GPT(cfg).eval()
    assert cfg.start_token == 32 and cfg.class_token(0) == 33 and cfg.class_token(2) == 35
    assert cfg.table_size == 36 == model.tok_emb.num_embeddings
    tokens = model.cond_tokens(torch.tensor([0, 2, 1]))
    assert tokens.tolist() == [[33], [35], [34]]
    assert (tokens >= cfg.vocab_size).all()
    assert model.cond_tokens(None, 2).tolist() == [[32], [32]]
    with pytest.raises(ValueError, match="labels"):
        model.cond_tokens(torch.tensor([3]))
    with pytest.raises(ValueError, match="labels"):
        model.cond_tokens(torch.tensor([-1]))
    codes = torch.randint(0, cfg.vocab_size, (3, 10))
    idx, targets = model.prepare_batch(codes, torch.tensor([0, 1, 2]))
    assert idx[:, 0].tolist() == [33, 34, 35] and torch.equal(idx[:, 1:], codes[:, :-1])
    assert torch.equal(targets, codes)
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 10, cfg.vocab_size)  # condition tokens are never predicted
    assert loss is not None and loss.dim() == 0
    # an unconditional model has just the start token
    assert GPT(tiny(n_classes=0)).tok_emb.num_embeddings == 33


def test_causal_mask():
    model = GPT(tiny()).eval()
    idx = torch.randint(0, 32, (2, 20))
    changed = idx.clone()
    changed[:, 12:] = (changed[:, 12:] + 7) % 32
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_pkeep_and_cond_drop_only_in_training():
    model = GPT(tiny(pkeep=0.5, cond_drop=0.5))
    codes = torch.randint(0, 32, (64, 20))
    labels = torch.randint(0, 3, (64,))
    model.eval()
    idx, targets = model.prepare_batch(codes, labels)
    assert torch.equal(idx[:, 1:], codes[:, :-1]) and torch.equal(targets, codes)
    assert (idx[:, 0] > model.config.start_token).all()
    model.train()
    gen = torch.Generator().manual_seed(0)
    idx, targets = model.prepare_batch(codes, labels, generator=gen)
    assert torch.equal(targets, codes)  # targets stay clean
    replaced = (idx[:, 1:] != codes[:, :-1]).float().mean().item()
    assert 0.3 < replaced < 0.6  # ~ (1 - pkeep) * (1 - 1/vocab)
    assert (idx[:, 1:] < 32).all()  # random replacements are codes, never condition tokens
    dropped = (idx[:, 0] == model.config.start_token).float().mean().item()
    assert 0.25 < dropped < 0.75
    kept = idx[:, 0] != model.config.start_token
    assert torch.equal(idx[kept, 0], labels[kept] + 33)
    # without labels, the start token is all there is
    idx, _ = model.prepare_batch(codes, None, generator=gen)
    assert (idx[:, 0] == model.config.start_token).all()


def test_loss_falls_on_a_learnable_dataset():
    torch.manual_seed(0)
    model = GPT(tiny(pkeep=0.9))
    # class k: code sequence k, k+1, k+2, ... (mod 32), a deterministic pattern per class
    labels = torch.arange(48) % 3
    codes = (labels[:, None] * 5 + torch.arange(16)[None]) % 32
    opt = torch.optim.AdamW(model.configure_optimizer_groups(0.01), lr=3e-3)
    model.train()
    losses = []
    for _ in range(40):
        loss = model.loss(codes, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 3.0  # ~ln(32) at init
    assert losses[-1] < 0.5 * losses[0]


def test_optimizer_groups():
    model = GPT(tiny())
    decay, no_decay = model.configure_optimizer_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = {names[id(p)] for p in decay["params"]}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert decay_names | no_decay_names == set(names.values())
    assert not decay_names & no_decay_names
    assert decay_names == {n for n in names.values()
                           if n.endswith("weight") and ("c_" in n or n == "head.weight")}
    assert {"tok_emb.weight", "pos_emb.weight", "ln_f.weight", "ln_f.bias",
            "blocks.0.ln_1.weight", "blocks.0.attn.c_attn.bias"} <= no_decay_names
    assert all(p.dim() == 2 for p in decay["params"])


def test_init_scales_residual_projections():
    model = GPT(tiny(n_layer=8, n_embd=128, n_head=4))
    std = model.blocks[0].mlp.c_proj.weight.std().item()
    assert abs(std - 0.02 / 4) < 0.001  # 0.02 / sqrt(2 * 8)
    assert abs(model.blocks[0].mlp.c_fc.weight.std().item() - 0.02) < 0.002
    assert model.blocks[0].attn.c_attn.bias.abs().sum() == 0


def test_export_roundtrip(tmp_path):
    model = GPT(tiny())
    data, text = model.state_bytes(), model.config_json()
    state = torch.load(io.BytesIO(data), weights_only=True)
    assert set(state) == set(model.state_dict())
    assert json.loads(text)["n_classes"] == 3
    loaded = GPT.from_bytes(text, data)
    assert not loaded.training
    idx = torch.randint(0, 32, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx)[0], model.eval()(idx)[0], rtol=0, atol=0)
    model.save_pretrained(tmp_path)
    assert (tmp_path / WEIGHTS_NAME).exists() and (tmp_path / CONFIG_NAME).exists()
    again = GPT.from_pretrained(tmp_path)
    assert again.config == model.config
    with pytest.raises(ValueError, match="unknown GPTConfig keys"):
        GPTConfig.from_dict({**model.config.to_dict(), "n_embed": 3})


def test_config_validation():
    with pytest.raises(ValueError, match="n_embd"):
        GPT(tiny(n_embd=30, n_head=4))
    with pytest.raises(ValueError, match="cond_drop"):
        GPT(tiny(n_classes=0, cond_drop=0.1))
    with pytest.raises(ValueError, match="pkeep"):
        GPT(tiny(pkeep=1.5))
    with pytest.raises(ValueError, match="block_size"):
        GPT(tiny()).prepare_batch(torch.zeros(1, 25, dtype=torch.long))


def test_forward_step_matches_forward():
    """Cached mode: a prefill, a chunk after a cached prefix, single tokens, last-only logits."""
    model = GPT(tiny()).eval()
    idx = torch.randint(0, 32, (3, 24))
    idx[:, 0] = model.config.class_token(1)
    with torch.inference_mode():
        full, _ = model(idx)
        cache = model.new_cache(3)
        parts = [model.forward_step(idx[:, :9], cache, 0, last_only=False),
                 model.forward_step(idx[:, 9:17], cache, 9, last_only=False)]
        parts += [model.forward_step(idx[:, p:p + 1], cache, p) for p in range(17, 20)]
        last = model.forward_step(idx[:, 20:24], cache, 20)  # chunk, last position only
    torch.testing.assert_close(torch.cat(parts, dim=1), full[:, :20], atol=1e-5, rtol=1e-5)
    assert last.shape == (3, 1, 32)
    torch.testing.assert_close(last[:, 0], full[:, 23], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="exceed"):
        model.forward_step(idx[:, :2], cache, 23)


def test_condition_map_prefix_and_loss_on_image_codes_only():
    """A model with a condition map (the reference's Net2NetTransformer): [cond token ;
    condition codes in their own table rows ; image codes], no target on the prefix."""
    torch.manual_seed(0)
    model = GPT(tiny(block_size=14, cond_vocab_size=5, cond_length=4))
    c = model.config
    assert c.cond_offset == 32 + 1 + 3 and model.tok_emb.weight.shape[0] == 32 + 1 + 3 + 5
    assert c.max_codes == 10
    codes = torch.randint(0, 32, (2, 10))
    maps = torch.tensor([[0, 1, 2, 4], [4, 3, 2, 1]])
    idx, targets = model.eval().prepare_batch(codes, torch.tensor([1, 2]), cond_codes=maps)
    assert idx[:, 0].tolist() == [c.class_token(1), c.class_token(2)]
    assert idx[:, 1:5].tolist() == (maps + c.cond_offset).tolist()
    assert torch.equal(idx[:, 5:], codes[:, :-1])
    assert (targets[:, :4] == -100).all() and torch.equal(targets[:, 4:], codes)
    # The loss is the mean over the image codes: the logits at positions 4.. against the codes.
    logits, loss = model(idx, targets)
    want = torch.nn.functional.cross_entropy(logits[:, 4:].reshape(-1, 32), codes.reshape(-1))
    torch.testing.assert_close(loss, want)
    assert torch.isclose(model.loss(codes, torch.tensor([1, 2]), cond_codes=maps), want)
    # The map matters: another map gives other logits for the image codes.
    other, _ = model(model.prepare_batch(codes, torch.tensor([1, 2]), cond_codes=maps.flip(1))[0])
    assert not torch.allclose(other[:, 4:], logits[:, 4:])
    with pytest.raises(ValueError, match="give them"):
        model.prepare_batch(codes, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"must be in \[0, 5\)"):
        model.prepare_batch(codes, torch.tensor([1, 2]), cond_codes=maps + 1)
    with pytest.raises(ValueError, match="3 codes per row, the model reads 4"):
        model.prepare_batch(codes, torch.tensor([1, 2]), cond_codes=maps[:, :3])
    with pytest.raises(ValueError, match="exceed block_size 14 - cond_length 4"):
        model.prepare_batch(torch.zeros(2, 11, dtype=torch.long), cond_codes=maps)
    with pytest.raises(ValueError, match="no condition map"):
        GPT(tiny()).prepare_batch(codes, torch.tensor([1, 2]), cond_codes=maps)
    for bad in (dict(cond_vocab_size=5), dict(cond_length=4), dict(cond_length=24,
                                                                      cond_vocab_size=5)):
        with pytest.raises(ValueError, match="cond_"):
            GPT(tiny(**bad))
