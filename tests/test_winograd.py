"""The CPU's Winograd convolutions (ddpm.network.winograd) compute a 3x3 convolution, and the U-Net with them
computes what it computes with oneDNN's direct convolutions.

The facts checked come from outside the code: the definition of correlation (the F(4, 3) matrices
against a sliding dot product, exact in float64), PyTorch's own convolution and its autograd
(values and all three gradients, in float64 to 1e-12 and in float32 within Winograd's stated
rounding), finite differences (gradcheck), and the properties resume-equals-no-interruption and
bits/dim unchanged.
"""

import copy

import pytest
import torch
import torch.nn.functional as F

from ddpm.network import winograd
from ddpm.process.diffusion import DiffusionConfig, GaussianDiffusion
from ddpm.errors import UserError
from ddpm.network.fast import WinogradConv2d, prepare_model, resolve_switch, set_winograd, to_channels_last
from ddpm.run.config import TrainConfig
from ddpm.network.unet import UNet, UNetConfig
from helpers import active, assert_states_equal


def rel_err(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def conv_and_grads(conv, x, w, b, g):
    x, w, b = (v.detach().clone().requires_grad_() for v in (x, w, b))
    y = conv(x, w, b)
    y.backward(g)
    return y.detach(), x.grad, w.grad, b.grad


def direct(x, w, b):
    return F.conv2d(x, w, b, padding=1)


class CountWinograd:
    """Counts the calls that took the Winograd path (so no test passes with the path switched off)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = winograd.conv3x3

        def counted(*args, **kwargs):
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(winograd, "conv3x3", counted)


def test_the_f43_matrices_are_minimal_filtering_of_a_correlation():
    # y_r = sum_k d_{r+k} g_k for r = 0..3 (a "valid" correlation of a 6-sample signal with a 3-tap
    # filter) equals A^T [(G g) * (B^T d)], exactly in real arithmetic (Lavin & Gray 2016, eq. 7).
    AT, G, BT = (torch.tensor(m, dtype=torch.float64) for m in (winograd.AT, winograd.G, winograd.BT))
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        d, g = torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(3, generator=gen, dtype=torch.float64)
        want = torch.stack([(d[r:r + 3] * g).sum() for r in range(4)])
        assert torch.allclose(AT @ ((G @ g) * (BT @ d)), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["BT", "AT", "A"])
def test_each_transform_applies_its_matrix(name):
    # The tile transforms run as sums shared between rows (B^T, A^T, A) or row by row (G): applied to
    # the unit vectors along an axis, each must give the columns of the matrix it stands for.
    mat = winograd._transpose(winograd.AT) if name == "A" else getattr(winograd, name)
    want = torch.tensor(mat, dtype=torch.float64)
    got = winograd._contract(mat, torch.eye(want.shape[1], dtype=torch.float64), 0)
    assert torch.equal(got, want)
    # and along an inner axis of a strided batch of them, as the convolution applies them
    batch = torch.randn(3, want.shape[1], 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    got = winograd._contract(mat, batch.transpose(0, 2), 1)
    assert torch.allclose(got, torch.einsum("ik,bkc->cib", want, batch), rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape, layout", [
    ((2, 5, 7, 16, 16), torch.contiguous_format),
    ((1, 3, 4, 17, 22), torch.channels_last),  # sizes not divisible by the 4x4 tiles: partial tiles
    ((3, 6, 2, 5, 4), torch.contiguous_format),  # smaller than one tile row
])
def test_winograd_equals_pytorchs_convolution_in_float64(shape, layout):
    b, c_in, c_out, h, w = shape
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(b, c_in, h, w, generator=gen, dtype=torch.float64).contiguous(memory_format=layout)
    wt = torch.randn(c_out, c_in, 3, 3, generator=gen, dtype=torch.float64)
    bias = torch.randn(c_out, generator=gen, dtype=torch.float64)
    g = torch.randn(b, c_out, h, w, generator=gen, dtype=torch.float64)
    got = conv_and_grads(winograd.conv3x3, x, wt, bias, g)
    want = conv_and_grads(direct, x, wt, bias, g)
    for what, a, e in zip(("output", "grad input", "grad weight", "grad bias"), got, want):
        assert a.shape == e.shape
        assert rel_err(a, e) < 1e-12, what
    with torch.no_grad():  # the path without autograd (sampling), through the reused buffers
        assert rel_err(winograd.conv3x3(x, wt, bias), want[0]) < 1e-12


def test_winograd_backward_passes_gradcheck():
    gen = torch.Generator().manual_seed(2)
    args = [torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True)
            for s in ((1, 2, 6, 5), (3, 2, 3, 3), (3,))]
    assert torch.autograd.gradcheck(winograd.conv3x3, args)


@pytest.mark.parametrize("c_in, c_out, size", [(128, 128, 32), (256, 256, 16), (384, 256, 16)])
def test_winograd_in_float32_is_within_its_stated_rounding(one_thread, c_in, c_out, size):
    # The CIFAR-10 network's shapes. Float32 against float64 ground truth: Winograd's transforms
    # multiply by up to 8 and 1/24, so it rounds worse than a direct convolution (measured: about
    # 1e-5 of the largest value against 2e-6 for oneDNN), but far within 5e-5.
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, c_in, size, size, generator=gen).contiguous(memory_format=torch.channels_last)
    wt = torch.randn(c_out, c_in, 3, 3, generator=gen) / (9 * c_in) ** 0.5
    bias, g = torch.randn(c_out, generator=gen), torch.randn(2, c_out, size, size, generator=gen)
    got = conv_and_grads(winograd.conv3x3, x, wt, bias, g)
    exact = conv_and_grads(direct, *(v.double() for v in (x, wt, bias, g)))
    for what, a, e in zip(("output", "grad input", "grad weight", "grad bias"), got, exact):
        assert a.dtype == torch.float32
        assert rel_err(a, e) < 5e-5, what
    assert got[2].shape == wt.shape and got[0].is_contiguous(memory_format=torch.channels_last)


def test_reused_buffers_never_leak_into_returned_results():
    # Without autograd the temporaries live in per-thread buffers reused by every call; each result
    # is its own tensor, and a smaller call after a larger one reads only its own part of them.
    gen = torch.Generator().manual_seed(4)
    big = torch.randn(2, 8, 20, 20, generator=gen, dtype=torch.float64)
    small = torch.randn(1, 8, 9, 13, generator=gen, dtype=torch.float64)
    wt = torch.randn(8, 8, 3, 3, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        y_big = winograd.conv3x3(big, wt)
        y_small = winograd.conv3x3(small, wt)
        y_big2 = winograd.conv3x3(big * 2, wt)
    assert rel_err(y_big, direct(big, wt, None)) < 1e-12  # not overwritten by the two later calls
    assert rel_err(y_small, direct(small, wt, None)) < 1e-12
    assert rel_err(y_big2, 2 * direct(big, wt, None)) < 1e-12


def test_cached_kernels_give_the_same_result_and_follow_their_weights(monkeypatch):
    # Inside cached_kernels a kernel is transformed once; the result is bit for bit the uncached one,
    # and a weight changed in place or given new storage is transformed again: the convolution is
    # linear in its kernel, and scaling by a power of two is exact in floating point.
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 8, 12, 12, generator=gen)
    wt = torch.randn(8, 8, 3, 3, generator=gen)
    transforms = []
    real = winograd.transform_kernel
    monkeypatch.setattr(winograd, "transform_kernel", lambda taps: transforms.append(1) or real(taps))
    cache = winograd.KernelCache()
    with torch.no_grad():
        plain = winograd.conv3x3(x, wt)
        with winograd.cached_kernels(cache):
            first, again = winograd.conv3x3(x, wt), winograd.conv3x3(x, wt)
            assert len(transforms) == 2 and len(cache) == 1  # one for `plain`, one for the cache's entry
            wt.mul_(2)  # an optimizer's or EMA's step: in place
            doubled = winograd.conv3x3(x, wt)
            wt.data = wt.data * 2  # new storage under the same tensor (as `module.to(...)` gives)
            quadrupled = winograd.conv3x3(x, wt)
        outside = winograd.conv3x3(x, wt)  # the cache is used only inside the context
    assert torch.equal(first, plain) and torch.equal(again, plain)
    assert torch.equal(doubled, 2 * plain) and torch.equal(quadrupled, 4 * plain) and torch.equal(outside, quadrupled)
    assert len(transforms) == 5


def test_a_prepared_model_transforms_its_kernels_once(one_thread, monkeypatch):
    # Sampling calls the prepared network T times with the same weights: the Winograd kernels are
    # transformed at the first call only, and every call equals the network without the cache.
    model = prepare_model(cifar_like(ch_mult=(1,), resolution=16), "cpu", winograd="on")
    transforms = []
    real = winograd.transform_kernel
    monkeypatch.setattr(winograd, "transform_kernel", lambda taps: transforms.append(1) or real(taps))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    outs = [model(x, t) for _ in range(3)]
    assert len(transforms) == 10  # 5 ResBlocks (1 down, 2 middle, 2 up) of 2 convolutions, once
    with torch.no_grad():  # the same network called without the prepared model's cache
        plain = model.model(x.contiguous(memory_format=torch.channels_last), t)
    assert len(transforms) == 20 and all(torch.equal(o, plain) for o in outs)


def test_winograd_switch_resolves_per_device_and_refuses_bad_values():
    assert resolve_switch("winograd", "auto", "cpu") is True
    assert resolve_switch("winograd", "auto", "cuda") is False
    assert resolve_switch("winograd", "off", "cpu") is False
    with pytest.raises(UserError, match="winograd='on' is a CPU fast path"):
        resolve_switch("winograd", "on", "cuda")
    with pytest.raises(UserError, match="train.winograd"):
        TrainConfig(winograd="yes")


def cifar_like(**kw) -> UNet:
    """The paper's CIFAR-10 layout (widths 128/256, attention at 16x16) with fewer levels and blocks."""
    cfg = dict(ch=128, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), dropout=0.0, resolution=32)
    return active(UNet.from_config(UNetConfig(**{**cfg, **kw})))


def layers_where_winograd_is_valid(net: UNet, x, t) -> tuple[set, set]:
    """Which convolutions of `net` compute what winograd.conv3x3 computes (a 3x3 correlation at
    the same size), found on their real inputs in float64 rather than read off their settings; and
    which do not (the stride-2 downsampling, the 1x1 projections)."""
    inputs = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: inputs.__setitem__(n, i[0].detach()))
             for n, m in net.named_modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        net(x, t)
    for h in hooks:
        h.remove()
    valid, invalid = set(), set()
    for n, xin in inputs.items():
        m = net.get_submodule(n)
        w, b = m.weight.double(), None if m.bias is None else m.bias.double()
        want = torch.nn.Conv2d.forward(copy.deepcopy(m).double(), xin.double())
        try:
            with torch.no_grad():
                got = winograd.conv3x3(xin.double(), w, b)
            ok = got.shape == want.shape and rel_err(got, want) < 1e-10
        except (RuntimeError, ValueError, AssertionError):
            ok = False
        (valid if ok else invalid).add(n)
    return valid, invalid


def test_unet_with_winograd_matches_direct_convolutions(one_thread, monkeypatch):
    ref = to_channels_last(cifar_like())
    fast = copy.deepcopy(ref)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([5, 900])
    valid, invalid = layers_where_winograd_is_valid(ref, x, t)
    assert invalid and valid  # both kinds are there, so the equality below can tell them apart
    # Winograd is given to exactly the convolutions it computes correctly.
    assert set_winograd(fast, True) == len(valid)
    assert {n for n, m in fast.named_modules() if isinstance(m, WinogradConv2d)} == valid
    count = CountWinograd(monkeypatch)
    layer_errors = {}

    def check_layer(m, inp, out, name):
        want = F.conv2d(inp[0].double(), m.weight.double(), m.bias.double(), padding=1)
        layer_errors[name] = rel_err(out.detach(), want)

    for n, m in fast.named_modules():
        if isinstance(m, WinogradConv2d):
            m.register_forward_hook(lambda m, i, o, n=n: check_layer(m, i, o, n))
    outs, grads = [], []
    for net in (ref, fast):
        net.zero_grad(set_to_none=True)
        out = net(x, t)
        ((out - 0.5) ** 2).mean().backward()
        outs.append(out.detach())
        grads.append({n: p.grad for n, p in net.named_parameters()})
    assert count.calls > 0  # the Winograd path ran (where a layer's input is wide and large enough)
    # Each such layer is F.conv2d within Winograd's float32 rounding, and so is the whole network.
    assert set(layer_errors) == valid and max(layer_errors.values()) < 5e-5, layer_errors
    assert rel_err(outs[1], outs[0]) < 1e-4
    scale = max(g.abs().max().item() for g in grads[0].values())
    for n, g in grads[0].items():
        assert (grads[1][n] - g).abs().max().item() < 1e-4 * scale, n


def test_bits_per_dim_with_winograd_equals_direct(one_thread, monkeypatch):
    # The same model, images and noise through prepare_model with and without Winograd: the bound
    # (T = 50 terms) agrees to 1e-4 bits/dim.
    net = cifar_like(ch_mult=(1,), resolution=16)
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(T=50))
    x0 = torch.rand(2, 3, 16, 16) * 2 - 1
    count = CountWinograd(monkeypatch)
    bpd = {}
    for mode in ("off", "on"):
        model = prepare_model(copy.deepcopy(net), "cpu", winograd=mode)
        g = torch.Generator().manual_seed(1)
        bpd[mode] = diffusion.calc_bpd_loop(model, x0, noise_fn=lambda s: torch.randn(s, generator=g))["total_bpd"]
    assert count.calls == 50 * 2 * 5  # 5 ResBlocks (1 down, 2 middle, 2 up) of 2 convolutions, T times
    assert (bpd["on"] - bpd["off"]).abs().max().item() < 1e-4


def test_training_with_winograd_resumes_exactly(tmp_path, one_thread, monkeypatch):
    # train.py with the CPU default (Winograd on) on a 128-channel network: 2 + 2 steps equal 4
    # uninterrupted, bit for bit (model, EMA and Adam), and the Winograd path was the one trained.
    import numpy as np

    from ddpm.io.checkpoint import latest_checkpoint
    from ddpm.run.config import RunConfig
    from ddpm.workflows.train import train

    x = np.random.default_rng(0).integers(0, 256, (16, 32, 32), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x)
    run = RunConfig.from_preset("tiny", data=str(tmp_path / "d.npz"))
    model = run.model.replace(ch=128, ch_mult=(1,), attn_resolutions=())
    count = CountWinograd(monkeypatch)

    def cfg(steps):
        return run.replace(model=model, train=run.train.replace(steps=steps, batch_size=4, checkpoint_every=2))

    assert cfg(4).train.winograd == "auto"
    train(tmp_path / "a", cfg(4), progress=False)
    assert count.calls == 4 * 5 * 2  # per step: 5 ResBlocks (1 down, 2 middle, 2 up) of 2 convolutions
    train(tmp_path / "b", cfg(2), progress=False)
    train(tmp_path / "b", cfg(4), progress=False)
    (_, a), (_, b) = latest_checkpoint(tmp_path / "a"), latest_checkpoint(tmp_path / "b")
    assert a["step"] == 4
    assert_states_equal(a, b)


def test_training_samples_transform_the_emas_kernels_once_a_grid(tmp_path, one_thread, monkeypatch):
    # The sample grid during training: T network calls with the EMA's weights unchanged, so each
    # Winograd kernel is transformed once for it (and once each in a step's forward and backward).
    import numpy as np

    from ddpm.run.config import RunConfig
    from ddpm.workflows.train import train

    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).integers(0, 256, (8, 16, 16), dtype=np.uint8))
    run = RunConfig.from_preset("tiny", data=str(tmp_path / "d.npz"))
    run = run.replace(model=run.model.replace(ch=128, ch_mult=(1,), attn_resolutions=(), resolution=16),
                      data=run.data.replace(resolution=16),
                      diffusion=run.diffusion.replace(T=10),
                      train=run.train.replace(steps=1, batch_size=2, sample_every=1, sample_n=2, checkpoint_every=1))
    transforms = []
    real = winograd.transform_kernel
    monkeypatch.setattr(winograd, "transform_kernel", lambda taps: transforms.append(1) or real(taps))
    train(tmp_path / "r", run, progress=False)
    assert (tmp_path / "r" / "samples" / "step-00000001.png").is_file()
    assert len(transforms) == 10 * 3  # 5 ResBlocks of 2 convolutions: forward, backward, the grid's T = 10 calls
