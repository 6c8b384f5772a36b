"""The paper's U-Net against facts from outside the code: the published parameter counts, the
closed-form time embedding of docs/MATH.md, Glorot-uniform statistics, TF "SAME" padding, a plain
softmax attention, and FLOPs counted layer by layer."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from helpers import preset_model, preset_net
from ddpm.cli import main
from ddpm.errors import UserError
from ddpm.network.unet import UNet, UNetConfig, count_parameters, forward_flops, timestep_embedding
from ddpm.run.presets import PRESETS


def meta_count(name: str) -> int:
    with torch.device("meta"):
        return count_parameters(preset_net(name))


def test_preset_parameter_counts_match_the_paper():
    assert meta_count("cifar10") == 35_746_307  # "35.7 million" (Appendix B); google/ddpm-cifar10-32
    assert meta_count("celebahq256") == 113_673_219  # "114 million"
    assert meta_count("lsun_church256") == meta_count("lsun_bedroom256") == meta_count("lsun_cat256") == 113_673_219
    assert abs(meta_count("lsun_bedroom256_large") - 256e6) / 256e6 < 0.01  # "approximately 256 million"
    assert meta_count("tiny") < 1_000_000


def test_unknown_preset_lists_the_presets():
    with pytest.raises(UserError) as e:
        preset_net("cifar100")
    for name in PRESETS:
        assert repr(name) in str(e.value)


def test_config_is_validated():
    with pytest.raises(UserError, match="multiple of 32"):
        UNetConfig(ch=48)
    with pytest.raises(UserError, match="divisible"):
        UNetConfig(resolution=28, ch_mult=(1, 2, 2, 2))
    with pytest.raises(UserError, match="no level"):
        UNetConfig(attn_resolutions=(12,))
    with pytest.raises(UserError, match="unknown field"):
        UNetConfig.from_dict({"channels": 3})
    cfg = UNetConfig.from_dict(preset_model("cifar10").to_dict())
    assert cfg == preset_model("cifar10")


def test_time_embedding_is_the_closed_form():
    # docs/MATH.md § Network: half = ch/2 frequencies exp(-k ln(1e4) / (half - 1)), vector
    # [sin(n f), cos(n f)] of the 0-based index n = t - 1, as the official code embedded it.
    ch, ns = 128, np.array([0, 1, 500, 999])
    half = ch // 2
    f = np.exp(-np.arange(half) * np.log(10000.0) / (half - 1))
    want = np.concatenate([np.sin(ns[:, None] * f), np.cos(ns[:, None] * f)], axis=1)
    got = timestep_embedding(torch.tensor(ns), ch).double().numpy()
    # float32 arguments n*f carry ~1e-7 relative error, i.e. up to ~1e-4 at n=999
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=0)
    np.testing.assert_allclose(got[:2], want[:2], atol=1e-6, rtol=0)

    # ... and the network at the paper's t feeds its first dense layer the embedding of t - 1.
    model = preset_net("tiny").eval()
    seen = []
    model.temb.dense[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    with torch.no_grad():
        model(torch.zeros(4, 3, 32, 32), torch.tensor(ns + 1))
    torch.testing.assert_close(seen[0], timestep_embedding(torch.tensor(ns), 32))
    f32 = np.exp(-np.arange(16) * np.log(10000.0) / 15)
    want32 = np.concatenate([np.sin(ns[:, None] * f32), np.cos(ns[:, None] * f32)], axis=1)
    np.testing.assert_allclose(seen[0].double().numpy(), want32, atol=2e-4, rtol=0)


def test_init_is_glorot_uniform_with_near_zero_output_layers():
    torch.manual_seed(0)
    model = preset_net("cifar10")
    zero_init = set()
    for name, m in model.named_modules():
        if name.endswith(("conv2", "proj_out")) or name == "conv_out":
            zero_init.add(name)
    assert len(zero_init) == (8 + 12 + 2) + (2 + 3 + 1) + 1  # ResBlocks (down, up, mid), attention, conv_out

    checked = 0
    for name, m in model.named_modules():
        if isinstance(m, nn.GroupNorm):
            assert (m.weight == 1).all() and (m.bias == 0).all()
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        assert (m.bias == 0).all(), name
        w = m.weight.detach()
        receptive = w[0, 0].numel() if w.ndim == 4 else 1
        fan_in, fan_out = w.shape[1] * receptive, w.shape[0] * receptive
        if name in zero_init:
            assert w.abs().max() <= 1e-4, name
            continue
        limit = math.sqrt(6.0 / (fan_in + fan_out))  # variance 2/(fan_in+fan_out), uniform
        assert w.abs().max() <= limit, name
        if w.numel() >= 100_000:
            ratio = w.var().item() / (2.0 / (fan_in + fan_out))
            assert abs(ratio - 1) < 0.1, (name, ratio)
            checked += 1
    assert checked > 20


def test_downsample_pads_right_and_bottom_only():
    # TF "SAME" for a stride-2 3x3 conv on an even size: output (i, j) sees input rows 2i..2i+2.
    # A kernel that keeps only its top-left tap then returns x[2i, 2j]; torch's symmetric
    # padding=1 would return x[2i-1, 2j-1] (zero at the border) instead.
    model = preset_net("tiny")
    down = model.down[0].downsample
    with torch.no_grad():
        down.conv.weight.zero_()
        for c in range(down.conv.weight.shape[0]):
            down.conv.weight[c, c, 0, 0] = 1.0
        x = torch.randn(1, 32, 8, 8)
        torch.testing.assert_close(down(x), x[:, :, ::2, ::2])


def test_attention_is_a_single_head_softmax_over_positions():
    torch.manual_seed(0)
    attn = preset_net("tiny").down[1].attn[0]
    for p in attn.parameters():
        nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 64, 16, 16)
    with torch.no_grad():
        got = attn(x)
        # The official einsum form, written out here independently.
        h = attn.norm(x)
        q, k, v = (torch.einsum("bchw,oc->bohw", h, m.weight[:, :, 0, 0]) + m.bias[:, None, None]
                   for m in (attn.q, attn.k, attn.v))
        w = torch.einsum("bchw,bcHW->bhwHW", q, k) / math.sqrt(64)
        w = torch.softmax(w.reshape(2, 16, 16, 256), dim=-1).reshape(2, 16, 16, 16, 16)
        o = torch.einsum("bhwHW,bcHW->bchw", w, v)
        want = x + torch.einsum("bchw,oc->bohw", o, attn.proj_out.weight[:, :, 0, 0]) + attn.proj_out.bias[:, None, None]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_forward_flops_equal_a_layer_by_layer_count():
    cfg = preset_model("tiny")
    model = UNet.from_config(cfg).eval()
    total = []

    def conv_hook(m, inp, out):
        total.append(2 * out.numel() * m.in_channels * m.kernel_size[0] * m.kernel_size[1])

    def linear_hook(m, inp, out):
        total.append(2 * out.numel() * m.in_features)

    def attn_hook(m, inp, out):
        b, c, h, w = inp[0].shape
        total.append(2 * 2 * b * (h * w) ** 2 * c)  # q.k^T and weights.v

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(conv_hook)
        elif isinstance(m, nn.Linear):
            m.register_forward_hook(linear_hook)
        elif type(m).__name__ == "AttnBlock":
            m.register_forward_hook(attn_hook)
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32), torch.ones(1, dtype=torch.int64))
    assert forward_flops(cfg) == sum(total)


def test_cli_info_prints_parameters_and_gflops(capsys):
    assert main(["info", "--preset", "cifar10"]) == 0
    out = capsys.readouterr().out
    assert "35,746,307" in out and "GFLOPs" in out and "ch_mult: [1, 2, 2, 2]" in out
    assert main(["info", "--preset", "cifar10", "--set", "out_channels=6"]) == 0
    assert "out_channels: 6" in capsys.readouterr().out
    assert main(["info", "--preset", "nope"]) == 2
    assert "cifar10" in capsys.readouterr().err
