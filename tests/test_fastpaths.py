"""The fast paths (ddpm.network.fast, train.py's switches) compute what the plain fp32 eager network computes.

Each check compares a fast path with the reference it replaces, on the CPU, within a stated
tolerance: channels_last and torch.compile reorder float32 arithmetic only (1e-5 relative to the
output's scale); bf16 autocast rounds every network input to 8 significant bits (a few per cent
per output element), and a bits/dim computed through it stays within 0.01 of float32's (the
issue's bound) on the same model, data and noise.
"""

import copy
import os
import time

import pytest
import torch

from ddpm.io.data import DataConfig, load_images
from ddpm.process.scaling import to_model_range
from ddpm.process.diffusion import DiffusionConfig, GaussianDiffusion
from ddpm.errors import UserError
from ddpm.network.fast import (Precision, adam, match_layout_, native_bf16, prepare_model, resolve_precision, resolve_switch,
                               to_channels_last)
from ddpm.workflows.sample import PrefetchNoise
from ddpm.run.config import TrainConfig
from ddpm.workflows.train import DataOrder
from ddpm.network.unet import UNet, UNetConfig
from helpers import active, assert_states_equal, preset_net


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def fwd_bwd(model, x, t):
    model.zero_grad(set_to_none=True)
    out = model(x, t)
    ((out - 0.5) ** 2).mean().backward()
    return out.detach(), grads(model)


def assert_grads_close(g, g_ref, rtol):
    """Every gradient within rtol of the largest gradient entry of the network. (Some, like the
    biases just before a GroupNorm, are ~1e-9 by cancellation: a per-tensor scale would ask
    reassociated float32 sums to agree to 1e-13.)"""
    assert set(g) == set(g_ref)
    scale = max(v.abs().max().item() for v in g_ref.values())
    for n in g_ref:
        err = (g[n].float() - g_ref[n]).abs().max().item()
        assert err <= rtol * scale, f"{n}: max error {err:.3e} > {rtol} x {scale:.3e}"


def assert_close_scaled(got, want, rtol, what=""):
    """|got − want| ≤ rtol · max|want| elementwise: float reassociation errors scale with the tensor."""
    scale = want.abs().max().item() + 1e-30
    err = (got.float() - want.float()).abs().max().item()
    assert err <= rtol * scale, f"{what}: max error {err:.3e} > {rtol} x {scale:.3e}"


def test_switches_resolve_per_device_and_refuse_bad_values():
    with torch.device("meta"):
        wide, narrow = preset_net("cifar10"), preset_net("demo")
    assert resolve_switch("channels_last", "auto", "cpu", wide) is True  # ch=128: measured faster in NHWC
    assert resolve_switch("channels_last", "auto", "cpu", narrow) is False  # ch=32: measured slower
    assert resolve_switch("channels_last", "auto", "cuda", narrow) is True
    assert resolve_switch("compile", "auto", "cpu") is False
    assert resolve_switch("compile", "auto", "cuda") is True and resolve_switch("cuda_graphs", "auto", "cuda") is True
    assert resolve_switch("compile", "on", "cpu") is True and resolve_switch("channels_last", "off", "cuda") is False
    with pytest.raises(UserError, match="cuda_graphs='on' needs a CUDA device"):
        resolve_switch("cuda_graphs", "on", "cpu")
    with pytest.raises(UserError, match="'auto', 'on', 'off'"):
        resolve_switch("compile", "yes", "cpu")
    with pytest.raises(UserError, match="train.compile"):
        TrainConfig(compile="true")


def test_channels_last_equals_contiguous_forward_and_gradients():
    ref = active(preset_net("tiny"))
    fast = to_channels_last(copy.deepcopy(ref))
    assert fast.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    x, t = torch.randn(3, 3, 32, 32), torch.tensor([0, 500, 999])
    out_ref, g_ref = fwd_bwd(ref, x, t)
    out, g = fwd_bwd(fast, x, t)
    assert_close_scaled(out, out_ref, 1e-5, "output")
    assert_grads_close(g, g_ref, 1e-5)


def test_prepare_model_equals_the_network_and_returns_its_dtype_and_layout():
    net = active(preset_net("tiny")).eval()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 900])
    with torch.no_grad():
        want = net(x, t)
    fast = prepare_model(copy.deepcopy(net), "cpu", channels_last="on")  # compile and graphs: auto = off on CPU
    assert fast.channels_last and not fast.compiled and not fast.cuda_graphs
    got = fast(x, t)
    assert got.is_contiguous() and got.dtype == torch.float32 and not got.requires_grad
    assert_close_scaled(got, want, 1e-5)
    bf = prepare_model(copy.deepcopy(net), "cpu", precision="bf16")(x, t)
    assert bf.dtype == torch.float32  # the diffusion math never sees bf16
    assert_close_scaled(bf, want, 3e-2, "bf16")


def test_bf16_autocast_forward_and_gradients_are_close_to_fp32():
    net = active(preset_net("tiny"))
    x, t = torch.randn(4, 3, 32, 32), torch.tensor([0, 10, 500, 999])
    out32, g32 = fwd_bwd(net, x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16, g16 = fwd_bwd(net, x, t)
    # bf16 keeps 8 significant bits: 2^-8 = 0.4% per rounding, a few per cent after ~20 layers.
    # Measured over three seeds: output 1.2-1.6% (relative norm), gradients 0.25% of the largest.
    rel = (out16.float() - out32).norm() / out32.norm()
    assert rel < 3e-2, rel
    assert_grads_close(g16, g32, 1e-2)


def cpu_flags() -> set:
    """The CPU's feature flags as the Linux kernel reports them: a source apart from PyTorch's."""
    with open("/proc/cpuinfo") as f:
        return next(set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags"))


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="the kernel's CPU flags are read from Linux's /proc")
def test_auto_precision_is_bf16_exactly_where_the_kernel_reports_bf16_instructions(monkeypatch):
    for k in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(k, raising=False)
    native = bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
    print(f"this CPU: avx512_bf16/amx_bf16 {'present' if native else 'absent'}")
    assert native_bf16("cpu")[0] is native
    assert resolve_precision("auto", "cpu") is (Precision.BF16 if native else Precision.FP32)


def _cpu_with(monkeypatch, avx512_bf16: bool, amx: bool, cap: str = "") -> None:
    """Pretend the CPU has (or lacks) bf16 instructions, and oneDNN is held to `cap` ("" for none)."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    if cap:
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    else:
        monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)


def test_auto_precision_follows_the_instructions_and_onednns_cap(monkeypatch):
    # oneDNN's ISA order (its "CPU Dispatcher Control" page): AVX2 < AVX512_CORE < AVX512_CORE_VNNI
    # < AVX512_CORE_BF16 < ... < AVX512_CORE_AMX; a cap below AVX512_CORE_BF16 takes bf16 away.
    cases = [(True, False, "", "bf16"), (False, True, "", "bf16"), (True, True, "", "bf16"),
             (False, False, "", "fp32"), (True, False, "AVX2", "fp32"), (True, True, "avx512_core_vnni", "fp32"),
             (True, False, "AVX512_CORE_BF16", "bf16"), (False, True, "AVX512_CORE_AMX", "bf16")]
    for avx512_bf16, amx, cap, want in cases:
        _cpu_with(monkeypatch, avx512_bf16, amx, cap)
        assert resolve_precision("auto", "cpu").value == want, (avx512_bf16, amx, cap)
        for explicit in ("fp32", "bf16", "fp16"):  # what the user chose is never changed
            assert resolve_precision(explicit, "cpu").value == explicit
    with pytest.raises(UserError, match="'fp32', 'bf16', 'fp16', 'auto'"):
        resolve_precision("half", "cpu")


def test_auto_precision_runs_the_network_in_what_it_resolved_to(monkeypatch):
    # The reference is the plain eager network under PyTorch's own autocast (bfloat16), or without
    # it: not prepare_model at another setting, which would share any fault of its own.
    net = active(preset_net("tiny")).eval()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 900])
    with torch.no_grad():
        fp32 = net(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = net(x, t).float()
    want = {"fp32": fp32, "bf16": bf16}
    # bf16 is ~1e-2 from fp32 (and fp16 would be ~1e-3 from both): far outside the 1e-5 asked below
    assert (bf16 - fp32).abs().max() > 1e-3 * fp32.abs().max()
    for native, name in ((True, "bf16"), (False, "fp32")):
        _cpu_with(monkeypatch, native, False)
        fast = prepare_model(copy.deepcopy(net), "cpu", precision="auto")
        assert fast.precision is Precision(name)
        got = fast(x, t)
        assert got.dtype == torch.float32
        assert_close_scaled(got, want[name], 1e-5, f"auto on a CPU {'with' if native else 'without'} bf16")


def test_training_at_auto_precision_is_training_at_what_it_resolved_to(tmp_path, monkeypatch, capfd):
    import numpy as np

    from ddpm.io.checkpoint import latest_checkpoint
    from ddpm.run.config import RunConfig
    from ddpm.workflows.train import train

    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).integers(0, 256, (8, 32, 32), dtype=np.uint8))
    run = RunConfig.from_preset("tiny", data=str(tmp_path / "d.npz"))

    def trained(name, precision):
        train(tmp_path / name, run.replace(train=run.train.replace(steps=2, checkpoint_every=2, precision=precision)),
              progress=False)
        return latest_checkpoint(tmp_path / name)[1]

    _cpu_with(monkeypatch, True, False)
    bf16, auto = trained("bf16", "bf16"), trained("auto", "auto")
    assert "train.precision=auto -> bf16 (cpu: AVX512-BF16)" in capfd.readouterr().err
    assert_states_equal(bf16, auto)
    assert not torch.equal(trained("fp32", "fp32")["model"]["conv_out.weight"], bf16["model"]["conv_out.weight"])


def test_sampling_at_a_precision_draws_in_it_records_it_and_refuses_to_mix(tmp_path, monkeypatch, capfd):
    import json

    import numpy as np

    from ddpm.cli import main
    from ddpm.run.load import load_run

    np.savez(tmp_path / "d.npz", x=np.random.default_rng(0).integers(0, 256, (8, 32, 32), dtype=np.uint8))
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", str(tmp_path / "d.npz"), "--out", str(run), "--steps", "2",
                 "--checkpoint-every", "2", "--set", "diffusion.T=20", "--no-progress"]) == 0

    def draw(name, precision):
        out = tmp_path / name
        assert main(["sample", "--run", str(run), "--out", str(out), "--n", "2", "--precision", precision,
                     "--no-progress"]) == 0
        return np.load(out / "samples.npz")["x"], json.loads((out / "sampling.json").read_text())["model"]

    fp32, bf16 = draw("fp32", "fp32"), draw("bf16", "bf16")
    assert fp32[1].endswith("[ema]") and bf16[1].endswith("[ema, bf16]")  # the results say what made them
    _cpu_with(monkeypatch, True, False)
    auto = draw("auto-native", "auto")
    assert auto[1] == bf16[1] and np.array_equal(auto[0], bf16[0])
    _cpu_with(monkeypatch, False, False)
    auto = draw("auto-emulated", "auto")
    assert auto[1] == fp32[1] and np.array_equal(auto[0], fp32[0])
    # the network a command gets runs in that precision, with or without the other fast paths (a
    # 2-step network's output is still ~0, so its samples cannot show it: the precision is asked)
    for fast in ("auto", "off"):
        assert load_run(run, "ema", "cpu", fast, "bf16").model.precision is Precision.BF16
    assert isinstance(load_run(run, "ema", "cpu", "off", "fp32").model, UNet)  # plain: no autocast at all
    capfd.readouterr()
    assert main(["sample", "--run", str(run), "--out", str(tmp_path / "bf16"), "--n", "4", "--precision", "fp32",
                 "--no-progress"]) == 2  # a folder drawn in bf16 is not finished in fp32
    err = capfd.readouterr().err
    assert "[ema, bf16]" in err and "[ema]" in err, err


def test_bits_per_dim_in_bf16_is_within_0_01_of_fp32(one_thread):
    # The paper's T = 1000 terms on a real image (Fashion-MNIST at 8x8, with its many exactly-black
    # pixels in the decoder's edge bin) and the same noise for both precisions. The network is the
    # smallest with every layer kind: these CPUs may emulate bf16, and 2 x 1000 evaluations add up.
    images = load_images(DataConfig(source="fashion-mnist-10k", resolution=8)).images[:1]
    x0 = to_model_range(images)
    cfg = UNetConfig(in_channels=1, out_channels=1, ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(8,),
                     dropout=0.0, resolution=8)
    # The network is seeded: its random weights decide the difference. Over seeds 0-7 of this
    # untrained network (bits/dim 10.4-12.2, three times a trained model's) it was 0.0002-0.016,
    # i.e. 0.002-0.13% of the bits/dim; seed 0 gives 0.0074 (0.06%).
    torch.manual_seed(0)
    net = active(UNet.from_config(cfg))
    dtypes = []  # what the network's convolutions computed in: proof that bf16 really ran
    net.conv_in.register_forward_hook(lambda m, inp, out: dtypes.append(out.dtype))
    diffusion = GaussianDiffusion.from_config(DiffusionConfig())
    bpd, ran = {}, {}
    for precision in ("fp32", "bf16"):
        model = prepare_model(net, "cpu", precision=precision, compile="off")
        g = torch.Generator().manual_seed(1)
        dtypes.clear()
        bpd[precision] = diffusion.calc_bpd_loop(model, x0, noise_fn=lambda s: torch.randn(s, generator=g))["total_bpd"]
        ran[precision] = set(dtypes)
    diff = (bpd["bf16"] - bpd["fp32"]).abs().max().item()
    print(f"bits/dim fp32 {bpd['fp32'].tolist()}, bf16 {bpd['bf16'].tolist()}, max |diff| {diff:.4f}")
    assert ran == {"fp32": {torch.float32}, "bf16": {torch.bfloat16}}
    assert torch.isfinite(bpd["fp32"]).all() and (bpd["fp32"] > 0).all()
    assert 0 < diff < 0.01
    assert (bpd["bf16"] - bpd["fp32"]).abs().max() < 2e-3 * bpd["fp32"].min()


@pytest.mark.slow
def test_compiled_network_equals_eager_forward_and_gradients():
    # The smallest network with every layer kind (ResBlocks with and without a 1x1 shortcut,
    # attention, the time embedding); inductor compiles its forward and backward. Cold compilation
    # of ~60 C++ kernels takes 50-60 s on 2 shared cores (seconds with a warm inductor cache).
    cfg = UNetConfig(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0, resolution=8)
    ref = active(UNet.from_config(cfg))
    fast = to_channels_last(copy.deepcopy(ref))
    compiled = torch.compile(fast, dynamic=False)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    out_ref, g_ref = fwd_bwd(ref, x, t)
    start = time.perf_counter()
    fast.zero_grad(set_to_none=True)
    out = compiled(x, t)
    ((out - 0.5) ** 2).mean().backward()
    print(f"inductor compile + first step: {time.perf_counter() - start:.1f} s")
    assert_close_scaled(out.detach(), out_ref, 1e-5, "output")
    assert_grads_close(grads(fast), g_ref, 1e-5)


def test_prefetched_noise_is_the_same_stream_and_stops_at_its_limit():
    def source(seed):
        g = torch.Generator().manual_seed(seed)
        return lambda shape: torch.randn(shape, generator=g)

    direct = source(5)
    want = [direct((2, 3, 4, 4)) for _ in range(6)]
    after = direct((2, 3, 4, 4))
    wrapped_source = source(5)
    pre = PrefetchNoise(wrapped_source, "cpu", limit=6, depth=2)
    got = [pre((2, 3, 4, 4)) for _ in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    with pytest.raises(RuntimeError, match="limit=6"):
        pre((2, 3, 4, 4))
    pre.close()
    assert torch.equal(wrapped_source((2, 3, 4, 4)), after)  # the thread drew exactly `limit` times
    with pytest.raises(ValueError, match="same shape|draws shape"):
        p2 = PrefetchNoise(source(0), "cpu")
        p2((1, 2))
        p2((2, 2))


def test_optimizer_moments_follow_the_parameters_layout_after_a_load():
    model = to_channels_last(preset_net("tiny"))
    opt = torch.optim.Adam(model.parameters(), foreach=True)
    model(torch.randn(2, 3, 32, 32), torch.tensor([1, 2])).mean().backward()
    opt.step()
    saved = {k: v for k, v in opt.state_dict().items()}
    saved["state"] = {i: {k: (v.contiguous() if torch.is_tensor(v) else v) for k, v in s.items()}
                      for i, s in saved["state"].items()}  # as a checkpoint stores them
    opt2 = torch.optim.Adam(model.parameters(), foreach=True)
    opt2.load_state_dict(saved)
    match_layout_(opt2)
    conv = model.conv_in.weight
    for k in ("exp_avg", "exp_avg_sq"):
        assert opt2.state[conv][k].stride() == conv.stride()
        assert torch.equal(opt2.state[conv][k], opt.state[conv][k])


def test_the_training_optimizer_is_the_papers_adam_in_one_fused_kernel():
    # Kingma & Ba's Algorithm 1 (bias-corrected moments, β = (0.9, 0.999)) in float64 by hand: the
    # optimizer training builds follows it to float32 rounding, on channels-last parameters too,
    # and it is torch's fused kernel, the fast one on a CPU (BENCHMARKS.md § The optimizer).
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(16, 8, 3, 3).to(memory_format=torch.channels_last))
    grads = [torch.randn(16, 8, 3, 3) * 10.0 ** -k for k in range(4)]
    lr, eps, (b1, b2) = 2e-4, 1e-8, (0.9, 0.999)
    opt = adam([p], lr=lr, eps=eps)
    assert opt.param_groups[0]["fused"] and opt.param_groups[0]["betas"] == (b1, b2)
    want, m, v = p.detach().double().clone(), 0.0, 0.0
    for n, g in enumerate(grads, start=1):
        p.grad = g.to(memory_format=torch.channels_last)
        opt.step()
        g = g.double()
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        want = (want - lr * (m / (1 - b1 ** n)) / ((v / (1 - b2 ** n)).sqrt() + eps)).float().double()
    # the parameters are float32: each step's result is rounded to it, as the reference is here
    ulp = torch.finfo(torch.float32).eps * want.abs()
    assert ((p.detach().double() - want).abs() <= ulp).all()


def test_data_order_on_a_device_is_the_same_order():
    a, b = DataOrder(10, 4, 3), DataOrder(10, 4, 3, device="cpu")
    for s in range(6):
        assert torch.equal(a.indices(s), b.indices(s))


@pytest.mark.parametrize("saved_by", ["fused", "foreach"])
def test_channels_last_training_resumes_exactly(tmp_path, monkeypatch, saved_by):
    # train.py with channels_last on (the optimizer's moments are restored contiguous from the
    # checkpoint, then given the parameters' layout): 2 + 2 steps equal 4 uninterrupted, bit for bit.
    # "foreach": the run began before training's Adam was fused; resumed now, it keeps the optimizer
    # its checkpoint holds, so it still equals its uninterrupted self.
    import numpy as np

    from ddpm.io.checkpoint import latest_checkpoint
    from ddpm.run.config import RunConfig
    from ddpm.workflows import train as train_module
    from ddpm.workflows.train import train

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (16, 32, 32), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x)
    run = RunConfig.from_preset("tiny", data=str(tmp_path / "d.npz"))

    def cfg(steps):
        return run.replace(train=run.train.replace(steps=steps, checkpoint_every=2, channels_last="on", compile="off"))

    with monkeypatch.context() as m:
        if saved_by == "foreach":
            m.setattr(train_module, "adam", lambda params, lr, eps: torch.optim.Adam(params, lr=lr, eps=eps, foreach=True))
        train(tmp_path / "a", cfg(4), progress=False)
        train(tmp_path / "b", cfg(2), progress=False)
    train(tmp_path / "b", cfg(4), progress=False)
    (_, a), (_, b) = latest_checkpoint(tmp_path / "a"), latest_checkpoint(tmp_path / "b")
    assert a["step"] == 4
    assert [bool(c["optimizer"]["param_groups"][0]["fused"]) for c in (a, b)] == [saved_by == "fused"] * 2
    assert_states_equal(a, b)
