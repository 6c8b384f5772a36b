"""3x3 convolutions by Winograd's minimal filtering F(4x4, 3x3) (Lavin & Gray 2016): the CPU fast path.

Why it exists: on a CPU, oneDNN's direct 3x3 convolutions already run at the cores' FMA peak, so
no rearrangement of the paper's U-Net makes them faster; only doing fewer multiplications does.
F(4x4, 3x3) computes each 4x4 output tile from a 6x6 input tile with 36 multiplications per
(input, output) channel pair instead of 4*4*9 = 144, i.e. the convolution becomes 36 independent
matrix products [P x C_in] @ [C_in x C_out] (P = batch x tiles) that MKL runs at full speed, plus
cheap linear transforms of the tiles:

    Y = A^T [ (G g G^T) * (B^T d B) ] A          (elementwise * summed over input channels)

with d a 6x6 input tile, g the 3x3 kernel and the standard matrices B^T (6x6), G (6x3), A^T (4x6)
from interpolation points 0, +-1, +-2 and infinity. The backward pass is Winograd as well: the
input gradient is the same convolution of the output gradient with the flipped, transposed kernel,
and the kernel gradient is the tile-wise product of the saved transformed input with the
transformed output gradient. So training gets the same saving as sampling. Sampling evaluates
the same weights T times: a prepared model (fast.py `FastModel`) keeps their transformed kernels
between calls (`KernelCache`), 4x the weights they come from.

It is exact in real arithmetic; in float32 it rounds differently from a direct convolution (the
transforms multiply by up to 8 and 1/24): relative errors of about 1e-5 of the output's largest
value, against about 2e-6 for oneDNN (tests/test_winograd.py states and checks the bounds, on
values, input gradients and kernel gradients, against float64).

Only stride 1, padding 1, float32/float64, at least MIN_CHANNELS channels in and out and at least
MIN_SIZE x MIN_SIZE pixels take this path (below those the tile transforms cost more than they
save; measured by benchmarks/bench_winograd.py); `ddpm.network.unet.Conv3x3` falls back to `F.conv2d`. Tensors are handled channels-last internally: input
tiles are strided views of the NHWC input whose channel vectors are contiguous, and the result
comes back channels_last.

No library offers this for PyTorch on these CPUs: PyTorch always asks oneDNN for its direct
algorithm (oneDNN's opt-in x64 Winograd kernels were written for AVX-512 only), and PyTorch's
NNPACK fails to run on these machines (`torch._nnpack_spatial_convolution` raises), so it is
written here with torch operations: the transforms as scaled adds that skip the matrices' zeros
and share the sums that rows have in common (small matrix products are the slowest shapes for a
BLAS: a [36 x 36] transform as one GEMM ran 2.4x slower than these adds), the products as one
`torch.bmm` (MKL's sgemm; oneDNN's 1x1 convolutions were not faster at these shapes,
BENCHMARKS.md § The CPU's roof).
"""

from __future__ import annotations

import contextlib
import math
import threading
import weakref

import torch
import torch.nn.functional as F

M = 4  # output tile size
R = 3  # kernel size
A = M + R - 1  # input tile size, 6
MIN_SIZE = 16  # smallest spatial size (H and W) worth transforming; see BENCHMARKS.md
MIN_CHANNELS = 128  # narrower convolutions are faster direct (the products are too small for BLAS)

# Lavin & Gray (2016), F(4x4, 3x3), interpolation points 0, 1, -1, 2, -2, inf.
BT = (
    (4, 0, -5, 0, 1, 0),
    (0, -4, -4, 1, 1, 0),
    (0, 4, -4, -1, 1, 0),
    (0, -2, -1, 2, 1, 0),
    (0, 2, -1, -2, 1, 0),
    (0, 4, 0, -5, 0, 1),
)
G = (
    (1 / 4, 0, 0),
    (-1 / 6, -1 / 6, -1 / 6),
    (-1 / 6, 1 / 6, -1 / 6),
    (1 / 24, 1 / 12, 1 / 6),
    (1 / 24, -1 / 12, 1 / 6),
    (0, 0, 1),
)
AT = (
    (1, 1, 1, 1, 1, 0),
    (0, 1, -1, 2, -2, 0),
    (0, 1, 1, 4, 4, 0),
    (0, 1, -1, 8, -8, 1),
)


def _transpose(mat):
    return tuple(zip(*mat))


def _contract(mat, src: torch.Tensor, dim: int, out: torch.Tensor | None = None):
    """out.select(dim, i) = sum_k mat[i][k] * src.select(dim, k): a small constant matrix
    applied along one axis, as scaled adds over whole slices that skip the matrix's zeros.

    Each operation is a pass over memory and, with several threads, a parallel region (on a CPU
    whose idle threads sleep, waking them costs more than a small operation). B^T, A^T and A, the
    transforms of every tile, go through their factored forms (`_FACTORED`: 12, 10 and 10 passes
    instead of 16, 17 and 18); any other matrix row by row, a row's first two terms sharing one
    `torch.add` where one coefficient is 1."""
    if out is None:  # the new axis outermost, so that every slice written is contiguous
        shape = list(src.shape)
        del shape[dim]
        out = src.new_empty([len(mat)] + shape).movedim(0, dim)
    d = [src.select(dim, k) for k in range(len(mat[0]))]
    o = [out.select(dim, i) for i in range(len(mat))]
    factored = _FACTORED.get(mat)
    if factored is not None:
        factored(d, o, lambda role: _empty(role, o[0].shape, o[0]))
        return out
    for i, row in enumerate(mat):
        terms = sorted(((c, d[k]) for k, c in enumerate(row) if c != 0), key=lambda cs: cs[0] != 1)
        (c0, s0), rest = terms[0], terms[1:]
        if c0 == 1 and rest:
            (c1, s1), rest = rest[0], rest[1:]
            torch.add(s0, s1, alpha=c1, out=o[i])
        elif c0 == 1:
            o[i].copy_(s0)
        else:
            torch.mul(s0, c0, out=o[i])
        for c, t in rest:
            o[i].add_(t, alpha=c)
    return out


# The factored forms share the sums that pairs of rows have in common (the rows of B^T for the
# points +-1 and +-2, of A^T for +-1 and +-2 as well); `tmp(role)` is a scratch slice. Each equals
# its matrix (tests/test_winograd.py applies it to unit vectors).

def _bt_rows(d, o, tmp):
    """o = B^T d."""
    t = tmp("cse_a")
    torch.add(d[4], d[2], alpha=-5, out=o[0]).add_(d[0], alpha=4)  # 4 d0 - 5 d2 + d4
    torch.add(d[4], d[2], alpha=-4, out=o[1])  # d4 - 4 d2
    torch.add(d[3], d[1], alpha=-4, out=t)  # d3 - 4 d1
    torch.add(o[1], t, alpha=-1, out=o[2])  # -> 4 d1 - 4 d2 - d3 + d4
    o[1].add_(t)  # -> -4 d1 - 4 d2 + d3 + d4
    torch.add(d[4], d[2], alpha=-1, out=o[3])  # d4 - d2
    torch.add(d[3], d[1], alpha=-1, out=t)  # d3 - d1
    torch.add(o[3], t, alpha=-2, out=o[4])  # -> 2 d1 - d2 - 2 d3 + d4
    o[3].add_(t, alpha=2)  # -> -2 d1 - d2 + 2 d3 + d4
    torch.add(d[5], d[3], alpha=-5, out=o[5]).add_(d[1], alpha=4)  # 4 d1 - 5 d3 + d5


def _at_rows(m, o, tmp):
    """o = A^T m."""
    s, t = tmp("cse_a"), tmp("cse_b")
    torch.add(m[1], m[2], out=o[2])  # m1 + m2
    torch.add(m[1], m[2], alpha=-1, out=o[1])  # m1 - m2
    torch.add(m[3], m[4], out=s)  # m3 + m4
    torch.add(m[3], m[4], alpha=-1, out=t)  # m3 - m4
    torch.add(m[0], o[2], out=o[0]).add_(s)  # m0 + m1 + m2 + m3 + m4
    o[2].add_(s, alpha=4)  # m1 + m2 + 4 (m3 + m4)
    torch.add(o[1], t, alpha=8, out=o[3]).add_(m[5])  # m1 - m2 + 8 (m3 - m4) + m5
    o[1].add_(t, alpha=2)  # m1 - m2 + 2 (m3 - m4)


def _a_rows(g, o, tmp):
    """o = A g (the adjoint of A^T)."""
    t = tmp("cse_a")
    o[0].copy_(g[0])
    o[5].copy_(g[3])
    torch.add(g[0], g[2], out=o[1])  # g0 + g2
    torch.add(g[1], g[3], out=t)  # g1 + g3
    torch.add(o[1], t, alpha=-1, out=o[2])  # -> g0 - g1 + g2 - g3
    o[1].add_(t)  # -> g0 + g1 + g2 + g3
    torch.add(g[0], g[2], alpha=4, out=o[3])  # g0 + 4 g2
    torch.add(g[1], g[3], alpha=4, out=t)  # g1 + 4 g3
    torch.add(o[3], t, alpha=-2, out=o[4])  # -> g0 - 2 g1 + 4 g2 - 8 g3
    o[3].add_(t, alpha=2)  # -> g0 + 2 g1 + 4 g2 + 8 g3


_FACTORED = {BT: _bt_rows, AT: _at_rows, _transpose(AT): _a_rows}


def _tiles(h: int, w: int) -> tuple[int, int]:
    return -(-h // M), -(-w // M)


class _Scratch(threading.local):
    """Per-thread reusable buffers for the temporaries, one per role, grown to the largest size asked.

    A convolution needs several times its input in temporaries, and on these machines a fresh
    multi-megabyte allocation costs a page fault for every 4 KiB it first writes: measured, as much
    time as the transforms themselves. Only what outlives a call is allocated anew: the result, and
    the transformed input kept for the backward pass."""

    def __init__(self):
        self.bufs: dict[tuple, torch.Tensor] = {}

    def empty(self, role: str, shape, like: torch.Tensor) -> torch.Tensor:
        n = math.prod(shape)
        key = (role, like.dtype, like.device)
        buf = self.bufs.get(key)
        if buf is None or buf.numel() < n:
            buf = self.bufs[key] = like.new_empty(n)
        return buf[:n].view(shape)


_scratch = _Scratch()


def _empty(role: str | None, shape, like: torch.Tensor) -> torch.Tensor:
    """A temporary for `role` (this thread's buffer, valid until the next use of the role), or with
    role None a tensor of its own."""
    return like.new_empty(shape) if role is None else _scratch.empty(role, shape, like)


def kernel_taps(weight: torch.Tensor, role: str | None = None) -> torch.Tensor:
    """[C_out, C_in, 3, 3] -> [3, 3, C_out, C_in], contiguous (one transposing copy)."""
    c_out, c_in = weight.shape[:2]
    taps = _empty(role, (R, R, c_out, c_in), weight)
    taps.view(R * R, c_out * c_in).copy_(weight.reshape(c_out * c_in, R * R).t())
    return taps


def transform_kernel(taps: torch.Tensor) -> torch.Tensor:
    """U = G g G^T for every channel pair: taps [3, 3, O, I] -> [36, O, I] (a temporary)."""
    half = _empty("u_half", (A, R, *taps.shape[2:]), taps)
    u = _empty("u", (A, A, *taps.shape[2:]), taps)
    _contract(G, _contract(G, taps, 0, out=half), 1, out=u)  # G along kh, then along kw
    return u.view(A * A, *taps.shape[2:])


def transform_input(x: torch.Tensor, keep: bool = False) -> torch.Tensor:
    """V = B^T d B for every 6x6 tile (stride 4, zero padding 1): x [B, C, H, W] -> [36, P, C],
    P = B * ceil(H/4) * ceil(W/4) tiles in (batch, tile row, tile column) order; a temporary unless
    `keep` (the backward pass needs it)."""
    b, c, h, w = x.shape
    nh, nw = _tiles(h, w)
    xp = F.pad(x, (1, nw * M + 1 - w, 1, nh * M + 1 - h)).permute(0, 2, 3, 1)  # [B, Hp, Wp, C]
    rows = xp.unfold(1, A, M)  # [B, nh, Wp, C, 6]: row k of every tile row (a view)
    t = _empty("t", (A, b, nh, xp.shape[2], c), x)
    _contract(BT, rows, 4, out=t.permute(1, 2, 3, 4, 0))  # B^T along H: [6(i), B, nh, Wp, C]
    cols = t.unfold(3, A, M)  # [6, B, nh, nw, C, 6]
    v = _empty(None if keep else "v", (A, A, b, nh, nw, c), x)
    _contract(BT, cols, 5, out=v.permute(0, 2, 3, 4, 5, 1))  # B along W: [6(i), 6(j), B, nh, nw, C]
    return v.view(A * A, b * nh * nw, c)


def transform_output(m: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
    """Y = A^T m A back into an image: m [36, P, C_out] -> [B, C_out, H, W] (channels_last)."""
    c = m.shape[-1]
    nh, nw = _tiles(h, w)
    m = m.view(A, A, b, nh, nw, c)
    half = _empty("y_half", (M, A, b, nh, nw, c), m)
    _contract(AT, m, 1, out=half.transpose(0, 1))  # A^T along W: [6(i), 4(s), B, nh, nw, C]
    y = m.new_empty(b, nh, M, nw, M, c)
    _contract(AT, half.transpose(0, 1), 0, out=y.permute(2, 4, 0, 1, 3, 5))  # [4(r), 4(s), ...]
    y = y.view(b, nh * M, nw * M, c).permute(0, 3, 1, 2)  # [B, C, H', W'], channels_last
    if (nh * M, nw * M) != (h, w):
        y = y[:, :, :h, :w].contiguous(memory_format=torch.channels_last)
    return y


def transform_output_grad(grad: torch.Tensor) -> torch.Tensor:
    """The adjoint of `transform_output`: dY [B, C, H, W] -> A dY A^T, [36, P, C] (a temporary)."""
    b, c, h, w = grad.shape
    nh, nw = _tiles(h, w)
    g = grad.permute(0, 2, 3, 1)  # [B, H, W, C]
    if (nh * M, nw * M) != (h, w):
        g = F.pad(g, (0, 0, 0, nw * M - w, 0, nh * M - h))
    g = g.reshape(b, nh, M, nw, M, c).permute(2, 4, 0, 1, 3, 5)  # [4(r), 4(s), B, nh, nw, C]
    a = _transpose(AT)
    half = _empty("dm_half", (A, M, b, nh, nw, c), grad)
    dm = _empty("dm", (A, A, b, nh, nw, c), grad)
    _contract(a, _contract(a, g, 0, out=half), 1, out=dm)
    return dm.view(A * A, b * nh * nw, c)


def _conv(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, keep: bool = False):
    """The convolution of x [B, I, H, W] with transformed kernels u [36, O, I]: y [B, O, H, W] and V."""
    b, _, h, w = x.shape
    v = transform_input(x, keep)
    m = _empty("m", (A * A, v.shape[1], u.shape[1]), x)
    torch.bmm(v, u.transpose(1, 2), out=m)  # [36, P, O]: the 36 products, summed over input channels
    if bias is not None:  # column 1 of A^T is all ones: a bias on tile element (1, 1) reaches every output
        m[A + 1].add_(bias)
    return transform_output(m, b, h, w), v


class _Winograd3x3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        taps = kernel_taps(weight)
        y, v = _conv(x, transform_kernel(taps), bias, keep=True)
        ctx.save_for_backward(v, taps)
        channels_last = weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
        ctx.weight_format = torch.channels_last if channels_last else torch.contiguous_format
        return y

    @staticmethod
    def backward(ctx, grad):
        v, taps = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # the same convolution of dY with the flipped kernel, [C_in, C_out, 3, 3]
            flipped = _empty("taps_flip", (R, R, taps.shape[3], taps.shape[2]), taps)
            flipped.copy_(taps.flip(0, 1).transpose(2, 3))  # transformed 1.4-2x faster contiguous than as a view
            grad_x, _ = _conv(grad, transform_kernel(flipped), None)
        if ctx.needs_input_grad[1]:
            dm = transform_output_grad(grad)
            du = _empty("du", (A * A, dm.shape[2], v.shape[2]), grad)
            torch.bmm(dm.transpose(1, 2), v, out=du)  # [36, C_out, C_in]
            c_out, c_in = du.shape[1:]
            gt = _transpose(G)
            half = _empty("dw_half", (R, A, c_out, c_in), grad)
            g = _empty("dw", (R, R, c_out, c_in), grad)
            _contract(gt, _contract(gt, du.view(A, A, c_out, c_in), 0, out=half), 1, out=g)  # G^T dU G
            grad_w = g.view(R * R, c_out * c_in).t().view(c_out, c_in, R, R)
            grad_w = grad_w.contiguous(memory_format=ctx.weight_format)  # in the weight's own layout
        if ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b


def applies(x: torch.Tensor, conv: torch.nn.Conv2d) -> bool:
    """Whether `conv(x)` can take the Winograd path: 3x3, stride 1, padding 1, no dilation or groups,
    float32/64 on the CPU, at least MIN_CHANNELS in and out, and at least MIN_SIZE x MIN_SIZE pixels."""
    return (conv.kernel_size == (R, R) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and min(conv.in_channels, conv.out_channels) >= MIN_CHANNELS
            and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and x.dim() == 4 and min(x.shape[-2:]) >= MIN_SIZE)


class KernelCache:
    """The transformed kernels U = G g G^T of weights that do not change between calls: sampling
    evaluates the same network a thousand times, and transforming its kernels anew each time costs
    10% of a 32x32 convolution and 40% of a 16x16 one (BENCHMARKS.md § The CPU's roof). It holds
    4x the weights it has seen (36 values per 9); an entry is used only while its weight is the same
    tensor with the same storage and version counter, so a weight changed in place (an optimizer or
    EMA step, `load_state_dict`) is transformed again. Use it through `cached_kernels`."""

    def __init__(self):
        self._u: dict[int, tuple] = {}

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        key = id(weight)
        stamp = (weight.data_ptr(), weight._version, weight.shape, weight.stride())
        hit = self._u.get(key)
        if hit is not None and hit[0]() is weight and hit[1] == stamp:
            return hit[2]
        u = transform_kernel(kernel_taps(weight, role="taps")).clone()
        self._u[key] = (weakref.ref(weight), stamp, u)
        return u

    def __len__(self) -> int:
        return len(self._u)


_cache = threading.local()  # .active: the KernelCache that this thread's inference calls use, if any


@contextlib.contextmanager
def cached_kernels(cache: KernelCache):
    """Within it, this thread's convolutions without gradients take their transformed kernels from
    `cache` (the owner of the cache, e.g. a prepared model, keeps it between calls)."""
    before = getattr(_cache, "active", None)
    _cache.active = cache
    try:
        yield cache
    finally:
        _cache.active = before


def conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=1) for a [C_out, C_in, 3, 3] kernel, by F(4x4, 3x3) Winograd;
    differentiable in all three. The result is channels_last. Without gradients, inside
    `cached_kernels`, the kernel's transform comes from the cache."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return _Winograd3x3.apply(x, weight, bias)
    cache = getattr(_cache, "active", None)
    u = cache.get(weight) if cache is not None else transform_kernel(kernel_taps(weight, role="taps"))
    return _conv(x, u, bias)[0]
