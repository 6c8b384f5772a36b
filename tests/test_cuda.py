"""The CUDA paths, on a CUDA device: skipped without one (CI has none; `benchmarks/gpu_check.sh`
runs this file first on a machine that has one).

What each test states, and the tolerance it allows:
- the compiled and the channels-last network equal the eager one (TF32 off for the comparison,
  so only reassociation differs): outputs and gradients within 1e-4 of the largest value;
- bf16 autocast equals fp32 within 3e-2 of the largest output value (the CPU test allows the same);
- sampling through CUDA graphs equals sampling without them for the same seeds: the same kernels
  replayed, so within 1e-6 (bitwise in practice);
- a training run killed with SIGKILL and resumed equals an uninterrupted one: with deterministic
  algorithms on, bitwise where no op reports a nondeterministic kernel; the test prints the ops
  that did (PyTorch names them in a warning) and then allows 1e-4 of each tensor's largest value;
- the per-image seeds give the same images at two batch sizes: within 2e-3 in [-1, 1] (cuDNN may
  choose other convolution algorithms for another batch size; the noise is the same).
"""

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.io.checkpoint import latest_checkpoint
from ddpm.network.fast import Precision, autocast, prepare_model, resolve_precision, to_channels_last
from ddpm.network.unet import UNet, UNetConfig
from ddpm.process.diffusion import DiffusionConfig, GaussianDiffusion
from ddpm.workflows.sample import Images, sample
from helpers import active

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; benchmarks/gpu_check.sh "
                                                                       "runs these where there is one")
CUDA = torch.device("cuda")
PY = sys.executable
KILL_AT = str(Path(__file__).with_name("kill_at.py"))


@pytest.fixture
def no_tf32():
    """Full fp32 convolutions and matmuls, so that only the order of the sums differs."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _net(resolution=16) -> UNet:
    """The smallest network with every layer kind: ResBlocks with and without a 1x1 shortcut,
    down- and upsampling, attention, the time embedding; trained-like output layers (helpers.active)."""
    torch.manual_seed(0)
    cfg = UNetConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0, resolution=resolution)
    return active(UNet.from_config(cfg)).to(CUDA)


def _inputs(batch=4, resolution=16):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, resolution, resolution, generator=g).to(CUDA)
    t = torch.randint(1, 1001, (batch,), generator=g).to(CUDA)
    return x, t


def _fwd_bwd(fn, params, x, t):
    for p in params:
        p.grad = None
    out = fn(x, t)
    ((out.float() - 0.5) ** 2).mean().backward()
    return out.detach().float(), [p.grad.detach().float().clone() for p in params]


def _close(got, want, rtol, what):
    scale = want.abs().max().item() + 1e-30
    err = (got - want).abs().max().item()
    assert err <= rtol * scale, f"{what}: max error {err:.3e} > {rtol} x {scale:.3e}"


@pytest.mark.parametrize("path", ["channels_last", "compiled+channels_last"])  # the CUDA default is both
def test_fast_training_paths_equal_eager(no_tf32, path):
    ref = _net()
    fast = copy.deepcopy(ref)
    if "channels_last" in path:
        to_channels_last(fast)
    fn = torch.compile(fast, dynamic=False) if "compiled" in path else fast
    x, t = _inputs()
    out_ref, g_ref = _fwd_bwd(ref, list(ref.parameters()), x, t)
    out, g = _fwd_bwd(fn, list(fast.parameters()), x, t)
    _close(out, out_ref, 1e-4, f"{path} output")
    scale = max(v.abs().max().item() for v in g_ref)  # gradients: against the largest entry of any
    for i, (a, b) in enumerate(zip(g, g_ref)):
        assert (a - b).abs().max().item() <= 1e-4 * scale, f"{path} gradient {i}"


def test_prepared_model_equals_the_network_and_bf16_is_within_its_tolerance(no_tf32):
    net = _net().eval().requires_grad_(False)
    x, t = _inputs()
    want = net(x, t).float()
    fast = prepare_model(copy.deepcopy(net), CUDA)  # the CUDA defaults: channels_last, compile, CUDA graphs
    _close(fast(x, t).float(), want, 1e-4, "prepare_model fp32")
    with autocast(CUDA, "bf16"):
        got = net(x, t).float()
    _close(got, want, 3e-2, "bf16 autocast")
    bf16 = prepare_model(copy.deepcopy(net), CUDA, precision="bf16", compile="off")  # one compile is enough here
    _close(bf16(x, t).float(), want, 3e-2, "prepare_model bf16")


def _sampler_setup():
    net = _net().eval().requires_grad_(False)
    return net, GaussianDiffusion.from_config(DiffusionConfig(T=100))


def test_auto_precision_is_bf16_on_a_gpu_with_bf16_tensor_cores():
    # NVIDIA's bf16 tensor cores came with Ampere, compute capability 8.0 (A100); an H100 / H200 is 9.0.
    major, minor = torch.cuda.get_device_capability()
    want = Precision.BF16 if (major, minor) >= (8, 0) else Precision.FP32
    print(f"{torch.cuda.get_device_name()}: compute capability {major}.{minor}, auto -> {want.value}")
    assert resolve_precision("auto", CUDA) is want
    assert prepare_model(UNet.from_config(UNetConfig(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                                                     resolution=8)), CUDA, precision="auto").precision is want


def test_cuda_graph_sampling_equals_eager_sampling():
    torch.backends.cudnn.benchmark = False  # the same algorithms in and out of the graph
    net, diffusion = _sampler_setup()
    graphs = prepare_model(copy.deepcopy(net), CUDA, compile="off", cuda_graphs="on")
    plain = prepare_model(copy.deepcopy(net), CUDA, compile="off", cuda_graphs="off")
    a = sample(graphs, diffusion, (3, 16, 16), Images(5, range(8)), device=CUDA)
    b = sample(plain, diffusion, (3, 16, 16), Images(5, range(8)), device=CUDA)
    assert graphs.cuda_graphs, "the CUDA graph was not used (its capture failed and fell back)"
    assert (a - b).abs().max().item() <= 1e-6


def test_guided_sampling_through_cuda_graphs_equals_eager_guided_sampling():
    # the class labels are a static input of the graph: each step's [c; ∅] is copied in
    torch.backends.cudnn.benchmark = False
    torch.manual_seed(0)
    net = active(UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16, dropout=0.0,
                      num_classes=4)).eval().requires_grad_(False)
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(T=100))
    graphs = prepare_model(copy.deepcopy(net), CUDA, compile="off", cuda_graphs="on")
    plain = prepare_model(copy.deepcopy(net), CUDA, compile="off", cuda_graphs="off")
    labels = torch.tensor([0, 1, 2, 3, 0, 4])
    a = sample(graphs, diffusion, (3, 16, 16), Images(5, range(6), labels, 3.0), device=CUDA)
    b = sample(plain, diffusion, (3, 16, 16), Images(5, range(6), labels, 3.0), device=CUDA)
    c = sample(plain, diffusion, (3, 16, 16), Images(5, range(6), labels.roll(1), 3.0), device=CUDA)
    assert graphs.cuda_graphs, "the CUDA graph was not used (its capture failed and fell back)"
    assert (a - b).abs().max().item() <= 1e-6 and (b - c).abs().max().item() > 1e-2


def test_per_image_seeds_give_the_same_images_at_two_batch_sizes():
    net, diffusion = _sampler_setup()
    model = prepare_model(copy.deepcopy(net), CUDA, compile="off")  # CUDA graphs on; no compile per batch size
    whole = sample(model, diffusion, (3, 16, 16), Images(3, range(6)), device=CUDA)
    parts = torch.cat([sample(model, diffusion, (3, 16, 16), Images(3, range(i, i + 2)), device=CUDA)
                       for i in range(0, 6, 2)])
    assert (whole - parts).abs().max().item() <= 2e-3


def test_training_killed_and_resumed_on_cuda_equals_an_uninterrupted_run(tmp_path):
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(0).integers(0, 256, (32, 32, 32), dtype=np.uint8))
    env = dict(os.environ, CUBLAS_WORKSPACE_CONFIG=":4096:8", PYTHONWARNINGS="always")

    def args(out):  # compile off: its own equality is tested above; here the state's round trip
        return ["train", "--preset", "tiny", "--data", str(data), "--out", str(out), "--steps", "8",
                "--checkpoint-every", "2", "--no-progress", "--set", "train.device=cuda", "--set", "train.compile=off"]

    def run(point, n, out):
        r = subprocess.run([PY, KILL_AT, point, str(n), "--deterministic", "--", *args(out)], env=env,
                           capture_output=True, text=True)
        return r.returncode, r.stderr

    rc, err_ref = run("none", 0, tmp_path / "ref")
    assert rc == 0, err_ref
    rc, err_killed = run("step", 6, tmp_path / "run")  # SIGKILL in step 6: checkpoints 2 and 4 are on disk
    assert rc == -9, err_killed
    rc, err_resumed = run("none", 0, tmp_path / "run")
    assert rc == 0, err_resumed
    ops = sorted(set(re.findall(r"(\w+) does not have a deterministic implementation", err_ref + err_resumed)))
    print(f"ops without a deterministic CUDA kernel here: {ops or 'none'}")
    a, b = latest_checkpoint(tmp_path / "ref")[1], latest_checkpoint(tmp_path / "run")[1]
    assert a["step"] == b["step"] == 8
    rtol = 0.0 if not ops else 1e-4
    for part in ("model", "ema"):
        for k in a[part]:
            want, got = a[part][k].float(), b[part][k].float()
            err = (got - want).abs().max().item()
            assert err <= rtol * (want.abs().max().item() + 1e-30), f"{part} {k}: {err:.3e} (ops: {ops})"
