"""Winograd F(4x4, 3x3) convolution on CPU, fp32: 3x3 stride-1 convolutions with 4x fewer
multiplications, forward and backward (optional C kernels, AVX-512 CPUs).

Why: the VQGAN's time on CPU is its 3x3 convolutions (encoder, decoder and the LPIPS VGG; about
80% of a training step at 64 px), and oneDNN's direct convolution already runs them near this
CPU's fp32 peak. Winograd's minimal filtering computes each 4x4 output tile from a 6x6 input tile
with 36 products per input channel instead of 144: an input transform, 36 independent
[tiles, C] x [C, C_out] matrix products (AVX-512 register blocks of 6 x 32) and an output
transform, in C (``winograd.c``, next to this module). Two schedules: per chunk of tiles while
the chunk is in cache (layers whose transformed kernel fits in L2), or the whole batch at once
with each transformed kernel read once (wide layers, small maps). NCHW and channels_last
activations (the latter read with vector loads, the faster). Built at first use through
:func:`pipeline.kernels.build.build_checked` (probe, self-test, on-disk cache) and threaded with
OpenMP (the libgomp torch already loaded).

Gradients use the same pieces: d/dx is the same convolution of dy with the flipped, transposed
kernel (its transform kept with the weight's while a weight is not trained: the frozen VGG);
d/dw multiplies the input transform by the transform of dy (A dy A^T) in the Winograd
domain and maps back with G^T . G; the bias gradient is a sum. No double backward
(``once_differentiable``).

Numerics: fp32 with the transforms' constants (up to 8): results differ from the direct
convolution by ~1e-6..1e-5 relative (the direct one itself is ~1e-7 from float64), the usual
price of Winograd (cuDNN picks it for fp32 too). Not bit-identical to ``F.conv2d``.

Use: :func:`enable_winograd` turns the eligible ``nn.Conv2d`` modules of a model into
:class:`WinogradConv2d` (same parameters and state dict) and installs :func:`fused_forward` as
the ``fast_forward`` of every VQGAN ``ResnetBlock`` (the blocks keep their class). At run time a
call takes the Winograd path only for float32 CPU tensors outside CPU autocast with both sides at
least ``min_size`` pixels; anything else (bf16 engines, GPU, small maps) runs ``nn.Conv2d``'s own
forward. Without a C compiler, without AVX-512, or with ``TAMING_NATIVE_KERNELS=0``, nothing
changes.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from pipeline.models.vqgan import ResnetBlock

from .build import build_checked, read_source

logger = logging.getLogger(__name__)

# Where Winograd pays on this project's 2-core Zen4 (fp32, batch 8, channels_last, ms direct ->
# Winograd forward / weight gradient direct -> Winograd): 64 ch at 64 px 11.3 -> 4.8 / 13.3 -> 5.9;
# 128 ch at 32 px 10.9 -> 4.0 / 12.1 -> 5.4; 128 ch at 8 px 0.69 -> 0.23 / 0.86 -> 0.27;
# 256 ch at 16 px 10.5 -> 3.8 / 12.0 -> 4.4; 512 ch at 8 px 11.6 -> 5.9 / 14.9 -> 5.5; 512 ch at
# 4 px 4.5 -> 3.6 / 7.1 -> 3.1. Everywhere, given the right mode (chunked or whole, winograd.c).
DEFAULT_MIN_SIZE = 4
DEFAULT_MAX_CHANNELS = 512

SOURCE = "winograd.c"  # the kernels' C source, a file of this package

# One flag set: without -march=native there is no AVX-512 GEMM, and _wrap declines the library.
_FLAG_SETS = [["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-lm"]]

# G (6x3) of F(4x4, 3x3): U = G w G^T maps a 3x3 kernel into the 6x6 Winograd domain.
_G = torch.tensor([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                   [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
                  dtype=torch.float64)
# kron(G, G): [36, 9], row 6i+l, column 3j+k = G[i, j] G[l, k]; U_flat = KG @ w_flat.
_KG = torch.kron(_G, _G).float()

_LONG, _PTR, _INT = ctypes.c_long, ctypes.c_void_p, ctypes.c_int


def weight_transform(weight: Tensor) -> Tensor:
    """[C_out, C, 3, 3] -> U: [36, C, C_out] contiguous, U[p] = (G w G^T)[p]. The definition in
    torch (any dtype); the layers use :meth:`Kernels.weight`, its C twin."""
    co, c = weight.shape[:2]
    u = _KG.to(weight.dtype) @ weight.permute(2, 3, 1, 0).reshape(9, c * co)
    return u.view(36, c, co)


def weight_grad_from_domain(du: Tensor) -> Tensor:
    """dU: [36, C, C_out] -> dw: [C_out, C, 3, 3] (the adjoint of :func:`weight_transform`). The
    definition in torch; the layers use :meth:`Kernels.weight_from_domain`."""
    _, c, co = du.shape
    dw = _KG.t().to(du.dtype) @ du.reshape(36, c * co)  # [9, C*C_out]
    return dw.view(3, 3, c, co).permute(3, 2, 0, 1).contiguous()


def channels_last(x: Tensor) -> bool:
    """True where the kernels should read and write ``x`` as NHWC: it is channels_last and not
    also plain contiguous (a tensor can be both, e.g. with one channel)."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _format(nhwc: bool) -> torch.memory_format:
    """The memory format the kernels read and write: channels_last for NHWC, else NCHW."""
    return torch.channels_last if nhwc else torch.contiguous_format


@dataclass(frozen=True)
class Kernels:
    """The C kernels (module docstring); tensors float32, channel counts multiples of 16. The
    activations are NCHW contiguous or channels_last (NHWC in memory, read with vector loads:
    the faster of the two); outputs come back in the input's format."""

    lib: ctypes.CDLL
    # -1: the kernels choose chunked or whole per layer (winograd.c); 0 / 1 force one (tests)
    mode: int = -1
    # bound on the whole schedule's transform-domain buffers (tiles go in groups that fit)
    group_bytes: int = 32 << 20

    def conv(self, x: Tensor, u: Tensor, bias: Tensor | None,
             pre: tuple[Tensor, Tensor, bool] | None = None) -> Tensor:
        """x: [N, C, H, W], u: [36, C, C_out] from :func:`weight_transform` -> y: [N, C_out, H, W]
        = conv3x3(x, w) + bias, padding 1, in x's memory format.

        ``pre = (scale, shift, silu)`` (scale, shift: [N, C] float32; channels_last x only):
        convolve ``silu(x * scale + shift)`` (SiLU if ``silu``) instead of x, the prologue
        applied as tiles load, so the normalised map is never written (see
        :meth:`group_norm_terms`)."""
        nhwc = channels_last(x)
        x = x.contiguous(memory_format=_format(nhwc))
        n, c, h, w = x.shape
        if pre is not None and not (nhwc and c % 16 == 0):
            raise ValueError("pre: needs a channels_last input with channels a multiple of 16")
        y = torch.empty(n, u.shape[2], h, w, memory_format=_format(nhwc))
        bias = None if bias is None else bias.contiguous()
        scale, shift = (None, None) if pre is None else (t.float().contiguous() for t in pre[:2])
        self.lib.wino_conv(x.data_ptr(), int(nhwc), n, c, h, w, u.data_ptr(), u.shape[2],
                           None if bias is None else bias.data_ptr(), y.data_ptr(),
                           torch.get_num_threads(), self.mode, self.group_bytes,
                           None if scale is None else scale.data_ptr(),
                           None if shift is None else shift.data_ptr(),
                           int(pre is not None and pre[2]))
        return y

    def group_norm_terms(self, x: Tensor, norm: nn.GroupNorm) -> tuple[Tensor, Tensor]:
        """``norm(x) == x * scale + shift`` with per-image, per-channel scale, shift: [N, C]
        (float32), for a channels_last float32 x: one read of x (statistics in float64)."""
        x = x.contiguous(memory_format=torch.channels_last)
        n, c, h, w = x.shape
        s1 = torch.empty(n, c, dtype=torch.float64)
        s2 = torch.empty(n, c, dtype=torch.float64)
        self.lib.nhwc_channel_sums(x.data_ptr(), n, h * w, c, s1.data_ptr(), s2.data_ptr(),
                                   torch.get_num_threads())
        g = norm.num_groups
        count = h * w * (c // g)
        mean = s1.view(n, g, -1).sum(-1) / count  # [N, G]
        var = (s2.view(n, g, -1).sum(-1) / count - mean * mean).clamp_min(0)
        rstd = (var + norm.eps).rsqrt()
        scale = rstd.repeat_interleave(c // g, dim=1)  # [N, C]
        shift = -mean.repeat_interleave(c // g, dim=1) * scale
        if norm.affine:
            scale = scale * norm.weight.detach().double()
            shift = shift * norm.weight.detach().double() + norm.bias.detach().double()
        return scale.float(), shift.float()

    def weight(self, w: Tensor, back: bool = False) -> Tensor:
        """:func:`weight_transform` of w [C_out, C, 3, 3] -> [36, C, C_out]; ``back``: that of the
        flipped, transposed kernel (the input gradient's convolution) -> [36, C_out, C]."""
        w = w.detach().contiguous()
        co, c = w.shape[:2]
        u = torch.empty(36, co, c) if back else torch.empty(36, c, co)
        self.lib.wino_weight(w.data_ptr(), co, c, int(back), u.data_ptr(),
                             torch.get_num_threads())
        return u

    def weight_from_domain(self, du: Tensor) -> Tensor:
        """:func:`weight_grad_from_domain`: dU [36, C, C_out] -> dw [C_out, C, 3, 3]."""
        du = du.contiguous()
        _, c, co = du.shape
        dw = torch.empty(co, c, 3, 3)
        self.lib.wino_weight_grad(du.data_ptr(), c, co, dw.data_ptr(), torch.get_num_threads())
        return dw

    def weight_grad(self, x: Tensor, dy: Tensor) -> Tensor:
        """x: [N, C, H, W], dy: [N, C_out, H, W] (any formats) -> dU: [36, C, C_out], the weight
        gradient in the Winograd domain (:meth:`weight_from_domain` maps it back)."""
        nhwc = channels_last(x)
        x, dy = (t.contiguous(memory_format=_format(nhwc)) for t in (x, dy))
        n, c, h, w = x.shape
        threads, co = torch.get_num_threads(), dy.shape[1]
        slices = self.lib.wino_wgrad_slices(n, c, h, w, co, threads, self.mode)
        du = torch.empty(slices, 36, c, co)
        self.lib.wino_wgrad(x.data_ptr(), dy.data_ptr(), int(nhwc), n, c, h, w, co,
                            du.data_ptr(), threads, self.mode, self.group_bytes)
        return du.sum(0) if len(du) > 1 else du[0]


class WeightDomain:
    """A 3x3 weight's Winograd-domain forms, each computed on first use and then kept: ``u`` for
    the convolution, ``back`` (the flipped, transposed kernel's) for its input gradient."""

    def __init__(self, k: Kernels, weight: Tensor):
        self.kernels, self.weight = k, weight.detach()
        self._u: Tensor | None = None
        self._back: Tensor | None = None

    @property
    def u(self) -> Tensor:
        if self._u is None:
            self._u = self.kernels.weight(self.weight)
        return self._u

    @property
    def back(self) -> Tensor:
        if self._back is None:
            self._back = self.kernels.weight(self.weight, back=True)
        return self._back


class _WinogradConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None,  # type: ignore[override]
                dom: WeightDomain) -> Tensor:
        """dom: ``weight``'s :class:`WeightDomain` (passed in so that callers may cache it)."""
        x = x.contiguous(memory_format=_format(channels_last(x)))
        ctx.save_for_backward(x, weight)
        ctx.dom, ctx.has_bias = dom, bias is not None
        return dom.kernels.conv(x, dom.u, None if bias is None else bias.detach())

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        x, _ = ctx.saved_tensors  # the weight is saved for autograd's in-place version check
        dom: WeightDomain = ctx.dom
        k = dom.kernels
        dy = dy.contiguous(memory_format=_format(channels_last(x)))
        dx = dw = db = None
        if ctx.needs_input_grad[0]:  # the same convolution with the flipped, transposed kernel
            dx = k.conv(dy, dom.back, None)
        if ctx.needs_input_grad[1]:
            dw = k.weight_from_domain(k.weight_grad(x, dy))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum((0, 2, 3))
        return dx, dw, db, None


def winograd_conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None,
                    kernels: Kernels | None = None) -> Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for a 3x3 kernel by Winograd F(4x4, 3x3).

    x: [N, C, H, W] float32 on CPU; weight [C_out, C, 3, 3]. Differentiable in all three.
    Raises RuntimeError where the kernels are unavailable (see :func:`load`)."""
    k = kernels or load()
    if k is None:
        raise RuntimeError("Winograd kernels unavailable (no C compiler, or disabled)")
    if weight.shape[2:] != (3, 3) or x.dim() != 4:
        raise ValueError(f"need a 3x3 kernel and a 4-d input, got {tuple(weight.shape)}, "
                         f"{tuple(x.shape)}")
    return _WinogradConv.apply(x, weight, bias, WeightDomain(k, weight))


class WinogradConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (3x3, stride 1, padding 1) whose eligible calls run by Winograd.

    Made by :func:`enable_winograd` (class swap: parameters, buffers, hooks and state-dict keys
    are untouched). A call goes to Winograd for float32 CPU tensors outside CPU autocast whose
    height and width are at least ``winograd_min_size``; any other call is ``nn.Conv2d``'s."""

    winograd_min_size: int = DEFAULT_MIN_SIZE

    def forward(self, x: Tensor) -> Tensor:
        k = load()
        if k is None or not self._winograd_call(x):
            return super().forward(x)
        return _WinogradConv.apply(x, self.weight, self.bias, self._weight_domain(k))

    def _weight_domain(self, k: Kernels) -> WeightDomain:
        """The weight's :class:`WeightDomain`; for a weight that is not being trained (inference,
        the frozen LPIPS) kept until the weight changes in place. A trained weight changes every
        step: no cache, so nothing can go stale when an engine swaps parameter storage."""
        w = self.weight
        if torch.is_grad_enabled() and w.requires_grad:
            self.__dict__.pop("_winograd_domain", None)
            return WeightDomain(k, w)
        key = (w.data_ptr(), w._version)
        cached = self.__dict__.get("_winograd_domain")
        if cached is None or cached[0] != key:
            cached = (key, WeightDomain(k, w))
            self.__dict__["_winograd_domain"] = cached
        return cached[1]

    def _winograd_call(self, x: Tensor) -> bool:
        """True where ``self(x)`` runs by Winograd (class docstring); else nn.Conv2d's forward."""
        return (x.dim() == 4 and x.dtype == torch.float32 and x.device.type == "cpu"
                and self.weight.dtype == torch.float32
                and not torch.is_autocast_enabled("cpu")
                and min(x.shape[2], x.shape[3]) >= self.winograd_min_size)


def fusable(block: ResnetBlock, x: Tensor) -> bool:
    """True where :func:`fused_forward` takes ``block(x)``: no gradient needed (neither x nor the
    block's parameters under autograd), no active dropout, both convolutions
    :class:`WinogradConv2d` (so their channels fit) and willing to take x, and x channels_last."""
    convs = (block.conv1, block.conv2)
    return (not (torch.is_grad_enabled() and (x.requires_grad or any(
                p.requires_grad for p in block.parameters())))
            and not (block.training and block.dropout.p > 0)
            and all(isinstance(c, WinogradConv2d) for c in convs)  # channels fit
            and channels_last(x) and block.conv1._winograd_call(x)
            and block.conv2._winograd_call(x))  # same height and width


def fused_forward(block: ResnetBlock, x: Tensor) -> Tensor | None:
    """A VQGAN :class:`~pipeline.models.vqgan.ResnetBlock`'s ``fast_forward`` (installed by
    :func:`enable_winograd`): for inference calls on channels_last float32 CPU maps, ``block(x)``
    with each GroupNorm + SiLU folded into the next Winograd convolution's tile loads
    (:meth:`Kernels.conv` ``pre``), so the normalised map is never written or read back. Same
    function to ~1e-6 relative. None (the block runs its own forward) where the kernels are
    unavailable or the call is not :func:`fusable`: calls that need a gradient, or that the
    Winograd layers would not take."""
    k = load()
    if k is None or not fusable(block, x):
        return None
    h = k.conv(x, block.conv1._weight_domain(k).u, block.conv1.bias,
               (*k.group_norm_terms(x, block.norm1), True))
    h = k.conv(h, block.conv2._weight_domain(k).u, block.conv2.bias,
               (*k.group_norm_terms(h, block.norm2), True))
    if block.in_channels != block.out_channels:
        x = block.nin_shortcut(x)
    return h.add_(x)


def eligible(conv: nn.Module, max_channels: int = DEFAULT_MAX_CHANNELS) -> bool:
    """A plain 3x3, stride-1, padding-1, ungrouped, zero-padded 2-d convolution whose channel
    counts are multiples of 16 (the kernels' vector width) and at most ``max_channels``."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros"
            and all(c % 16 == 0 and c <= max_channels
                    for c in (conv.in_channels, conv.out_channels)))


def enable_winograd(model: nn.Module, min_size: int = DEFAULT_MIN_SIZE,
                    max_channels: int = DEFAULT_MAX_CHANNELS) -> int:
    """Turn every eligible ``nn.Conv2d`` in ``model`` into a :class:`WinogradConv2d`, and set
    every VQGAN ``ResnetBlock``'s ``fast_forward`` to :func:`fused_forward`; returns how many
    convolutions changed. 0 (model untouched) where the kernels cannot be built here."""
    if load() is None:
        return 0
    count = 0
    for m in model.modules():
        if eligible(m, max_channels):
            m.__class__ = WinogradConv2d
            m.winograd_min_size = min_size
            count += 1
        elif isinstance(m, ResnetBlock):
            m.fast_forward = fused_forward
    return count


def disable_winograd(model: nn.Module) -> int:
    """Undo :func:`enable_winograd`; returns how many modules went back to ``nn.Conv2d``."""
    count = 0
    for m in model.modules():
        if isinstance(m, ResnetBlock) and m.fast_forward is fused_forward:
            m.fast_forward = None
        if type(m) is WinogradConv2d:
            m.__class__ = nn.Conv2d
            m.__dict__.pop("winograd_min_size", None)
            m.__dict__.pop("_winograd_domain", None)
            count += 1
    return count


def _wrap(lib: ctypes.CDLL) -> Kernels | None:
    """The library's :class:`Kernels` with its functions' ctypes signatures set; None where it
    was built without AVX-512 (declined: see :func:`pipeline.kernels.build.build_checked`)."""
    if not lib.wino_has_avx512():
        # The portable GEMM loop is far slower than oneDNN's direct convolution.
        logger.info("no AVX-512: convolutions stay on oneDNN's direct kernels")
        return None
    lib.wino_conv.argtypes = [_PTR, _INT, _LONG, _LONG, _LONG, _LONG, _PTR, _LONG, _PTR, _PTR,
                              _INT, _INT, _LONG, _PTR, _PTR, _INT]
    lib.wino_conv.restype = None
    lib.wino_wgrad.argtypes = [_PTR, _PTR, _INT, _LONG, _LONG, _LONG, _LONG, _LONG, _PTR, _INT,
                               _INT, _LONG]
    lib.wino_wgrad_slices.argtypes = [_LONG, _LONG, _LONG, _LONG, _LONG, _INT, _INT]
    lib.wino_weight.argtypes = [_PTR, _LONG, _LONG, _INT, _PTR, _INT]
    lib.wino_weight.restype = None
    lib.wino_weight_grad.argtypes = [_PTR, _LONG, _LONG, _PTR, _INT]
    lib.wino_weight_grad.restype = None
    lib.nhwc_channel_sums.argtypes = [_PTR, _LONG, _LONG, _LONG, _PTR, _PTR, _INT]
    lib.nhwc_channel_sums.restype = None
    lib.wino_wgrad_slices.restype = _LONG
    lib.wino_wgrad.restype = None
    return Kernels(lib)


def _self_test(k: Kernels) -> bool:
    """Forward and all three gradients against F.conv2d on odd shapes (borders, channel
    remainders), in float64 for the reference, both layouts and both modes."""
    # whole with small groups: several groups per call on these shapes
    return all(_check(Kernels(k.lib, mode, group_bytes)) for mode, group_bytes in
               ((0, k.group_bytes), (1, k.group_bytes), (1, 36 * 128 * 4 * 8)))


def _check(k: Kernels) -> bool:
    """One (mode, group_bytes) setting of :func:`_self_test`: True where every result is within
    1e-4 of the float64 reference, relative to its largest magnitude."""
    gen = torch.Generator().manual_seed(0)
    for n, c, co, h, w in ((2, 16, 32, 16, 16), (1, 32, 16, 13, 10), (2, 48, 80, 7, 9)):
        x = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64, requires_grad=True)
        wt = torch.randn(co, c, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
        b = torch.randn(co, generator=gen, dtype=torch.float64, requires_grad=True)
        ref = F.conv2d(x, wt, b, padding=1)
        dy = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
        ref_grads = torch.autograd.grad(ref, (x, wt, b), dy)
        for fmt in (torch.contiguous_format, torch.channels_last):
            xf = x.detach().float().contiguous(memory_format=fmt).requires_grad_()
            wf, bf = (t.detach().float().requires_grad_() for t in (wt, b))
            y = _WinogradConv.apply(xf, wf, bf, WeightDomain(k, wf))
            grads = torch.autograd.grad(y, (xf, wf, bf), dy.float())
            for got, want in zip((y, *grads), (ref, *ref_grads), strict=True):
                scale = want.abs().max().item()
                if (got.double() - want).abs().max().item() > 1e-4 * scale:
                    return False
        # the GroupNorm + SiLU prologue (channels_last, inference)
        norm = nn.GroupNorm(c // 8, c, eps=1e-6).double()
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5, generator=gen)
            norm.bias.normal_(generator=gen)
            want = F.conv2d(F.silu(norm(x)), wt, b, padding=1)
            xl = x.detach().float().contiguous(memory_format=torch.channels_last)
            got = k.conv(xl, k.weight(wt.float()), b.float(),
                         (*k.group_norm_terms(xl, norm.float()), True))
        if (got.double() - want).abs().max().item() > 1e-4 * want.abs().max().item():
            return False
    return True


@functools.cache
def load() -> Kernels | None:
    """The compiled :class:`Kernels`, or None where unavailable (no compiler, build or self-test
    failure, ``TAMING_NATIVE_KERNELS=0``). Built once per process (~1 s)."""
    return build_checked("Winograd convolution", read_source(SOURCE), _FLAG_SETS, _wrap,
                         _self_test)
