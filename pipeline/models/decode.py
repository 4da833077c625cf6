"""One-token decoding step of a :class:`~pipeline.models.gpt.GPT`, built for sampling on CPU.

Why a second forward: at sampling sizes a step is tiny (bench config, GPT 4x256 wide, batch 8:
~53 MFLOP, ~0.6 ms of matmul) but :meth:`GPT.forward_step` spends ~4-5 ms on it, in ~100 small
ops (module calls, permute + unbind copies, two cache writes, separate bias / GELU / residual
ops) and in streaming ~13 MB of weights and up to 16 MB of keys/values through the caches with
a matmul kernel (MKL) that is slow for 8-row inputs on this CPU. :class:`DecodeStep` computes the
same function as ``forward_step(idx[:, None], cache, pos)[:, 0]`` with

- every Linear prepacked once for oneDNN (``torch.ops.mkldnn._linear_pointwise``, the kernels
  ``torch.compile`` uses for frozen CPU linears), with GELU and the residual add fused into the
  matmul that precedes them: ~30% less matmul time than ``F.linear`` at 8 rows;
- a layer's key and value written into the cache with one copy, attention on views; or, on
  one thread where :func:`pipeline.models.native.load` built its C kernel, cache write and
  attention in one call that streams each row's keys and values once (~20% of a step);
- no module calls.

Packing is private PyTorch API: where it is missing or fails (no oneDNN, not float32, not CPU,
``torch.backends.mkldnn.enabled`` off) the same step runs on ``F.linear``, a bit slower.

Threads: a decode step is far too small to share between cores. Each parallel region costs a
wake-up of the other OpenMP thread (tens of microseconds when it sleeps, as it does under
``OMP_WAIT_POLICY=PASSIVE``) and, on a busy machine, a wait for a descheduled thread, against
matmuls of ~50-100 us. :func:`decode_threads` therefore runs small steps on one intra-op thread
and restores the caller's setting afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import native
from .gpt import GPT, GPTConfig, KVCache

# Below this many multiply-adds per step (all Linears, all rows), :func:`decode_threads` uses one
# thread. Bench config, batch 8: 26.5M. Measured (2 cores, PASSIVE) one thread won clearly there;
# the bound keeps larger steps (bigger models or batches), where splitting a matmul pays for the
# wake-up, on the caller's thread count.
SINGLE_THREAD_MACS = 1 << 26

LinearFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]
LinearAddFn = Callable[[Tensor, Tensor, Tensor | None, Tensor], Tensor]


# --- linear kernels -----------------------------------------------------------------------------


def _aten_linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return F.linear(x, w, b)


def _aten_linear_gelu(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return F.gelu(F.linear(x, w, b))


def _aten_linear_add(x: Tensor, w: Tensor, b: Tensor | None, residual: Tensor) -> Tensor:
    return F.linear(x, w, b).add_(residual)


def _onednn_linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise.default(x, w, b, "none", [], "")


def _onednn_linear_gelu(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    # "none": the exact (erf) GELU, as F.gelu's default
    return torch.ops.mkldnn._linear_pointwise.default(x, w, b, "gelu", [], "none")


def _onednn_linear_add(x: Tensor, w: Tensor, b: Tensor | None, residual: Tensor) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise.binary(x, residual, w, b, "add")


def _onednn_pack(weight: Tensor, batch: int) -> Tensor:
    """[out, in] weight -> oneDNN's packed layout for inputs of ``batch`` rows (any row count
    works; ``batch`` picks the layout)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, batch)


def native_load() -> native.AttendFn | None:
    """:func:`pipeline.models.native.load` (a seam for tests)."""
    return native.load()


def onednn_usable(weight: Tensor) -> bool:
    """True if oneDNN can run the packed linears on ``weight``'s dtype and device: float32 on
    CPU, oneDNN built in and enabled, and the private ops present and working (a tiny trial)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return False
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    try:
        w = torch.ones(2, 2)
        y = _onednn_linear(torch.ones(1, 2), _onednn_pack(w, 1), None)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return bool(torch.equal(y, torch.full((1, 2), 2.0)))


# --- the step -----------------------------------------------------------------------------------


def step_macs(config: GPTConfig, batch: int) -> int:
    """Multiply-adds of one decoding step's Linears for ``batch`` rows (attention not counted:
    it grows with the position but stays a few percent at block sizes of a few hundred)."""
    c = config.n_embd
    return batch * (config.n_layer * 12 * c * c + c * config.vocab_size)


@contextmanager
def decode_threads(macs: int) -> Iterator[int]:
    """Run the block with one intra-op thread when a step of ``macs`` multiply-adds is below
    :data:`SINGLE_THREAD_MACS`, else with the caller's count; yields the count in use and
    restores the caller's count on exit. Process-global (``torch.set_num_threads``): do not run
    other torch work in parallel threads of the same process meanwhile."""
    threads = torch.get_num_threads()
    if threads == 1 or macs >= SINGLE_THREAD_MACS:
        yield threads
        return
    torch.set_num_threads(1)
    try:
        yield 1
    finally:
        torch.set_num_threads(threads)


StepFn = Callable[[Tensor, KVCache, int], Tensor]


def one_token_step(model: GPT, batch: int) -> StepFn:
    """``step(idx [B], cache, pos) -> logits [B, vocab_size]`` for sampling: a
    :class:`DecodeStep`, or ``model.forward_step`` where the parameters are not all
    materialised (DeepSpeed ZeRO-3 partitions hold empty placeholders that its hooks gather
    per module call, which a weight snapshot would bypass)."""
    if all(p.numel() > 0 for p in model.parameters()):
        return DecodeStep(model, batch)

    def step(idx: Tensor, cache: KVCache, pos: int) -> Tensor:
        return model.forward_step(idx[:, None], cache, pos)[:, -1]

    return step


class DecodeStep:
    """``step(idx, cache, pos)``: idx [B] (int64, one token per row at position ``pos``) ->
    logits [B, vocab_size] of the next code, keys/values of position ``pos`` written into
    ``cache`` (positions 0..pos-1 must be there). The same function as
    ``model.forward_step(idx[:, None], cache, pos)[:, 0]`` up to float rounding (the two
    write the same cache), for a model in eval mode (no dropout), under ``torch.no_grad`` or
    ``torch.inference_mode``.

    Holds a snapshot of the weights, packed at construction for ``batch`` rows (other row
    counts work): build a new one after the model's weights change. ``packed=None`` uses oneDNN
    where :func:`onednn_usable`, ``False`` forces plain ``F.linear``. ``native=None`` uses the
    C attention kernel where it loads (float32 on CPU, steps run on one thread), ``False``
    never, ``True`` requires it (ValueError where it is not available).
    """

    def __init__(self, model: GPT, batch: int, packed: bool | None = None,
                 native: bool | None = None) -> None:
        c = model.config
        self.config = c
        weight = model.tok_emb.weight
        self.packed = onednn_usable(weight) if packed is None else packed
        cpu_fp32 = weight.device.type == "cpu" and weight.dtype == torch.float32
        self._attend = native_attend = None if native is False or not cpu_fp32 else native_load()
        if native and native_attend is None:
            raise ValueError("DecodeStep: the native attention kernel is not available"
                             + ("" if cpu_fp32 else " (needs float32 on CPU)"))
        self._scratch = torch.empty(0, dtype=torch.float32)
        if self.packed:
            self._linear, self._linear_gelu, self._linear_add = (
                _onednn_linear, _onednn_linear_gelu, _onednn_linear_add)
        else:
            self._linear, self._linear_gelu, self._linear_add = (
                _aten_linear, _aten_linear_gelu, _aten_linear_add)

        def lin(m: nn.Linear) -> tuple[Tensor, Tensor | None]:
            w = m.weight.detach()
            b = None if m.bias is None else m.bias.detach()
            return (_onednn_pack(w, batch) if self.packed else w), b

        def norm(m: nn.LayerNorm) -> tuple[Tensor | None, Tensor | None, float]:
            return (None if m.weight is None else m.weight.detach(),
                    None if m.bias is None else m.bias.detach(), m.eps)

        self.tok = weight.detach()
        self.pos = model.pos_emb.weight.detach()
        self.layers = [
            (norm(blk.ln_1), lin(blk.attn.c_attn), lin(blk.attn.c_proj), norm(blk.ln_2),
             lin(blk.mlp.c_fc), lin(blk.mlp.c_proj))
            for blk in model.blocks
        ]
        self.ln_f = norm(model.ln_f)
        self.head = lin(model.head)

    def __call__(self, idx: Tensor, cache: KVCache, pos: int) -> Tensor:
        c = self.config
        if pos >= cache.max_len or pos >= c.block_size:
            raise ValueError(f"DecodeStep: position {pos} exceeds the cache ({cache.max_len}) "
                             f"or block_size ({c.block_size})")
        b, nh, width = idx.shape[0], c.n_head, (c.n_embd,)
        linear, linear_add = self._linear, self._linear_add
        # the kernel is single-threaded: with more threads SDPA's parallel loops win
        attend = self._attend if torch.get_num_threads() == 1 else None
        if attend is not None and self._scratch.numel() <= pos:
            self._scratch = torch.empty(cache.max_len, dtype=torch.float32)
        x = F.embedding(idx, self.tok) + self.pos[pos]  # [B,C]
        for i, (ln_1, attn, proj, ln_2, fc, out) in enumerate(self.layers):
            qkv = linear(F.layer_norm(x, width, *ln_1), *attn)  # [B,3C]: q, k, v
            kv = cache.data[i]  # [2,B,nh,max_len,hd]
            if attend is not None:
                y = torch.empty(b, c.n_embd, dtype=x.dtype)
                attend(qkv, kv[0], kv[1], pos, nh, y, self._scratch)
            else:
                y = self._attend_torch(qkv, kv, pos).reshape(b, c.n_embd)
            x = linear_add(y, *proj, x)
            x = linear_add(self._linear_gelu(F.layer_norm(x, width, *ln_2), *fc), *out, x)
        return linear(F.layer_norm(x, width, *self.ln_f), *self.head)

    def _attend_torch(self, qkv: Tensor, kv: Tensor, pos: int) -> Tensor:
        """k and v of ``qkv`` [B,3C] into ``kv`` [2,B,nh,max_len,hd] at ``pos`` (one copy),
        then the query's attention over positions 0..pos -> [B,nh,1,hd]."""
        c = self.config
        b, nh, hd = qkv.shape[0], c.n_head, c.head_dim
        kv.select(3, pos).copy_(qkv[:, c.n_embd:].view(b, 2, nh, hd).transpose(0, 1))
        return F.scaled_dot_product_attention(  # one query: no mask
            qkv[:, :c.n_embd].view(b, nh, 1, hd), kv[0, :, :, :pos + 1], kv[1, :, :, :pos + 1])
