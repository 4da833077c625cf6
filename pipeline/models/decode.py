"""One-token decoding step of a :class:`~pipeline.models.gpt.GPT`, built for sampling on CPU.

Why a second forward: at sampling sizes a step is tiny (bench config, GPT 4x256 wide, batch 8:
~53 MFLOP) but :meth:`GPT.forward_step` spends ~4-5 ms on it, in ~100 small ops (module calls,
permute + unbind copies, two cache writes, separate bias / GELU / residual ops) and in moving
~13 MB of weights and up to 16 MB of keys/values through memory with kernels built for larger
problems. :class:`DecodeStep` computes the same function as
``forward_step(idx[:, None], cache, pos)[:, 0]`` with no module calls, views instead of copies,
and one of three kernel sets (:data:`KERNELS`), chosen at construction:

- ``"native"``: the C kernels of :mod:`pipeline.kernels.decode` (8-row AVX-512 linears with
  bias, GELU and residual epilogues over prepacked weights; cache write + one-query attention in
  one pass over each row's keys and values). This module does not import them: they are
  installed from outside (:func:`set_native_kernels`; ``pipeline.kernels.decode.install()``)
  and must provide :class:`NativeKernels`. Single-threaded; the default where they are
  installed, load, and the step is built on one thread (:func:`decode_threads`).
- ``"onednn"``: every Linear prepacked for oneDNN (``torch.ops.mkldnn._linear_pointwise``, the
  kernels ``torch.compile`` uses for frozen CPU linears) with GELU and the residual add fused;
  cache write in one copy and ``scaled_dot_product_attention``. Multi-threaded.
- ``"aten"``: ``F.linear`` and SDPA, wherever the others are unavailable.

Bench config on one thread of the idle 2-core Zen4, a step with its sampling: ~2.7 ms native,
~3.5 ms oneDNN, ~4.5 ms aten; ``forward_step`` ~7-8 ms on 2 threads (PASSIVE), ~5 ms on one.

Packing for oneDNN is private PyTorch API, and the native kernels need a C compiler: each falls
back to the next set where it is missing or fails its check.

Threads: a decode step is far too small to share between cores. Each parallel region costs a
wake-up of the other OpenMP thread (~100 us on this VM when it sleeps, as under
``OMP_WAIT_POLICY=PASSIVE``) and, on a busy machine, a wait for a descheduled thread, against
linears of ~50-100 us. :func:`decode_threads` therefore runs small steps on one intra-op thread
and restores the caller's setting afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .gpt import GPT, GPTConfig, KVCache

# Below this many multiply-adds per step (all Linears, all rows), :func:`decode_threads` uses one
# thread. Bench config, batch 8: 26.5M. Measured (2 cores, PASSIVE) one thread won clearly there;
# the bound keeps larger steps (bigger models or batches), where splitting a matmul pays for the
# wake-up, on the caller's thread count.
SINGLE_THREAD_MACS = 1 << 26

KERNELS = ("native", "onednn", "aten")

Linear = tuple[Any, ...]  # a Linear's weights in the kernel set's form

# The native kernels' call signatures (pipeline.kernels.decode implements them):
# (qkv [B,3C], k [B,H,max_len,D], v (same strides as k), pos, n_head, out [B,C], scratch)
AttendFn = Callable[[Tensor, Tensor, Tensor, int, int, Tensor, Tensor], None]
# (x [M,K] contiguous, packed weight, n_out, bias | None, residual [M,N] | None, gelu) -> y
LinearFn = Callable[[Tensor, Tensor, int, Tensor | None, Tensor | None, bool], Tensor]


class NativeKernels(Protocol):
    """What the ``"native"`` set needs of :class:`pipeline.kernels.decode.Kernels`: ``attend``
    writes k, v at ``pos`` into the cache views and attends (into ``out``); ``linear`` (None
    without AVX-512) computes act(x W^T + b) + residual from a weight that ``pack`` laid out."""

    @property
    def attend(self) -> AttendFn: ...

    @property
    def linear(self) -> LinearFn | None: ...

    def pack(self, weight: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class _LinearKernels:
    """A kernel set's linears: ``pack`` an nn.Linear once; then ``linear(x, lin)``,
    ``linear_gelu(x, lin)`` = GELU(linear), ``linear_add(x, lin, r)`` = linear + r."""

    pack: Callable[[nn.Linear, int], Linear]
    linear: Callable[[Tensor, Linear], Tensor]
    linear_gelu: Callable[[Tensor, Linear], Tensor]
    linear_add: Callable[[Tensor, Linear, Tensor], Tensor]


def _weights(m: nn.Linear) -> tuple[Tensor, Tensor | None]:
    return m.weight.detach(), None if m.bias is None else m.bias.detach()


def _aten_kernels() -> _LinearKernels:
    return _LinearKernels(
        pack=lambda m, batch: _weights(m),
        linear=lambda x, lin: F.linear(x, *lin),
        linear_gelu=lambda x, lin: F.gelu(F.linear(x, *lin)),
        linear_add=lambda x, lin, r: F.linear(x, *lin).add_(r),
    )


def _onednn_kernels() -> _LinearKernels:
    op = torch.ops.mkldnn._linear_pointwise

    def pack(m: nn.Linear, batch: int) -> Linear:
        w, b = _weights(m)
        return torch.ops.mkldnn._reorder_linear_weight(w, batch), b  # layout for batch rows

    return _LinearKernels(
        pack=pack,
        linear=lambda x, lin: op.default(x, *lin, "none", [], ""),
        # "none": the exact (erf) GELU, as F.gelu's default
        linear_gelu=lambda x, lin: op.default(x, *lin, "gelu", [], "none"),
        linear_add=lambda x, lin, r: op.binary(x, r, *lin, "add"),
    )


def _native_kernels(kernels: NativeKernels) -> _LinearKernels:
    fn = kernels.linear
    assert fn is not None

    def pack(m: nn.Linear, batch: int) -> Linear:
        w, b = _weights(m)
        return kernels.pack(w), w.shape[0], b

    return _LinearKernels(
        pack=pack,
        linear=lambda x, lin: fn(x, *lin, None, False),
        linear_gelu=lambda x, lin: fn(x, *lin, None, True),
        linear_add=lambda x, lin, r: fn(x, *lin, r, False),
    )


def onednn_usable(weight: Tensor) -> bool:
    """True if oneDNN can run the packed linears on ``weight``'s dtype and device: float32 on
    CPU, oneDNN built in and enabled, and the private ops present and working (a tiny trial)."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return False
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(torch.ones(2, 2), 1)
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 2), packed, None, "none", [], "")
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return bool(torch.equal(y, torch.full((1, 2), 2.0)))


# Where the "native" set comes from: a loader installed by set_native_kernels (None: no set).
NativeLoader = Callable[[], "NativeKernels | None"]
_native_loader: NativeLoader | None = None


def set_native_kernels(loader: NativeLoader | None) -> NativeLoader | None:
    """Install ``loader`` as the source of the ``"native"`` kernel set for this process (None
    removes it) and return the previous one. ``loader()`` returns the kernels, or None where
    they are unavailable; it is called at each :class:`DecodeStep` construction, so it should
    cache (``pipeline.kernels.decode.install`` installs its cached ``load``)."""
    global _native_loader
    previous, _native_loader = _native_loader, loader
    return previous


def native_kernels() -> NativeKernels | None:
    """The installed native kernels (:func:`set_native_kernels`) where they load and have the
    linear kernel too; None otherwise, e.g. where none are installed (a seam for tests)."""
    loader = _native_loader
    kernels = None if loader is None else loader()
    return kernels if kernels is not None and kernels.linear is not None else None


def choose_kernels(weight: Tensor) -> str:
    """The kernel set :class:`DecodeStep` uses by default for a model with ``weight``'s dtype and
    device, built under the current thread count (module docstring)."""
    cpu_fp32 = weight.device.type == "cpu" and weight.dtype == torch.float32
    if cpu_fp32 and torch.get_num_threads() == 1 and native_kernels() is not None:
        return "native"
    return "onednn" if onednn_usable(weight) else "aten"


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
    per module call, which a weight snapshot would bypass). Build it under the thread count it
    will run with."""
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
    counts work): build a new one after the model's weights change. ``kernels``: one of
    :data:`KERNELS`, default :func:`choose_kernels`; ValueError where the requested set is not
    available. Not for concurrent calls from several threads (one scratch buffer).
    """

    def __init__(self, model: GPT, batch: int, kernels: str | None = None) -> None:
        c = model.config
        self.config = c
        weight = model.tok_emb.weight
        self.kernels = choose_kernels(weight) if kernels is None else kernels
        self._attend: AttendFn | None = None
        if self.kernels == "native":
            loaded = native_kernels()
            if loaded is None or weight.device.type != "cpu" or weight.dtype != torch.float32:
                raise ValueError("DecodeStep: the native kernels are not available (they need "
                                 "installing (pipeline.kernels.decode.install), a C compiler, "
                                 "AVX-512 and a float32 model on CPU)")
            lk, self._attend = _native_kernels(loaded), loaded.attend
        elif self.kernels == "onednn":
            if not onednn_usable(weight):
                raise ValueError("DecodeStep: oneDNN packed linears are not available")
            lk = _onednn_kernels()
        elif self.kernels == "aten":
            lk = _aten_kernels()
        else:
            raise ValueError(f"DecodeStep: kernels must be one of {KERNELS}, got {kernels!r}")
        self._linear, self._linear_gelu, self._linear_add = (
            lk.linear, lk.linear_gelu, lk.linear_add)
        self._scratch = torch.empty(0, dtype=torch.float32)

        def norm(m: nn.LayerNorm) -> tuple[Tensor | None, Tensor | None, float]:
            return (None if m.weight is None else m.weight.detach(),
                    None if m.bias is None else m.bias.detach(), m.eps)

        self.tok = weight.detach()
        self.pos = model.pos_emb.weight.detach()
        self.layers = [
            (norm(blk.ln_1), lk.pack(blk.attn.c_attn, batch), lk.pack(blk.attn.c_proj, batch),
             norm(blk.ln_2), lk.pack(blk.mlp.c_fc, batch), lk.pack(blk.mlp.c_proj, batch))
            for blk in model.blocks
        ]
        self.ln_f = norm(model.ln_f)
        self.head = lk.pack(model.head, batch)

    def __call__(self, idx: Tensor, cache: KVCache, pos: int) -> Tensor:
        c = self.config
        if pos >= cache.max_len or pos >= c.block_size:
            raise ValueError(f"DecodeStep: position {pos} exceeds the cache ({cache.max_len}) "
                             f"or block_size ({c.block_size})")
        b, width = idx.shape[0], (c.n_embd,)
        linear, linear_add, attend = self._linear, self._linear_add, self._attend
        if attend is not None and self._scratch.numel() <= pos:
            self._scratch = torch.empty(cache.max_len, dtype=torch.float32)
        x = F.embedding(idx, self.tok) + self.pos[pos]  # [B,C]
        for i, (ln_1, attn, proj, ln_2, fc, out) in enumerate(self.layers):
            qkv = linear(F.layer_norm(x, width, *ln_1), attn)  # [B,3C]: q, k, v
            if attend is not None:  # writes k, v at pos and attends, in one pass
                y = torch.empty(b, c.n_embd, dtype=torch.float32)
                attend(qkv, cache.k[i], cache.v[i], pos, c.n_head, y, self._scratch)
            else:
                y = self._attend_torch(qkv, cache.data[i], pos).reshape(b, c.n_embd)
            x = linear_add(y, proj, x)
            x = linear_add(self._linear_gelu(F.layer_norm(x, width, *ln_2), fc), out, x)
        return linear(F.layer_norm(x, width, *self.ln_f), self.head)

    def _attend_torch(self, qkv: Tensor, kv: Tensor, pos: int) -> Tensor:
        """k and v of ``qkv`` [B,3C] into ``kv`` [2,B,nh,max_len,hd] at ``pos`` (one copy),
        then the query's attention over positions 0..pos -> [B,nh,1,hd]."""
        c = self.config
        b, nh, hd = qkv.shape[0], c.n_head, c.head_dim
        kv.select(3, pos).copy_(qkv[:, c.n_embd:].view(b, 2, nh, hd).transpose(0, 1))
        return F.scaled_dot_product_attention(  # one query: no mask
            qkv[:, :c.n_embd].view(b, nh, 1, hd), kv[0, :, :, :pos + 1], kv[1, :, :, :pos + 1])
