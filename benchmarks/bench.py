"""ddpm against diffusers' UNet2DModel, side by side, in one process (or in processes of their own).

    python benchmarks/bench.py --device cpu  --batch 8                      # the CPU targets
    python benchmarks/bench.py --device cpu  --batch 8 --separate 3         # each in its own process, 3 rounds
    python benchmarks/bench.py --device cuda --batch 128 --precision bf16   # training, one GPU
    python benchmarks/bench.py --device cuda --batch 256 --precision bf16 --tasks forward,sample

Both networks hold the same weights (diffusers' through ddpm.network.interop.unet_to_diffusers) and run
inside the same harness: the same inputs, the same loss, optimizer, EMA and sampling loop, the
same precision; only the network's implementation and its fast-path switches differ. The
implementations are measured alternately, several repetitions in turn (the order rotates every
repetition), and each result is the median; ratios are medians over medians. Load from other
processes therefore slows both sides alike. With --separate ROUNDS each implementation runs alone in
a fresh process instead, the processes alternating: how a user runs one of them. On a 2-core Zen 4
ddpm's fp32 training step ran 1.3-1.5 s alone and 1.4-2.1 s beside diffusers' network, optimizer
and EMA in one process (BENCHMARKS.md § The CPU's roof), so for CPU ratios report both.

Tasks, per implementation:
- forward: one network evaluation at batch B, in eval mode without gradients, as sampling and
  bits/dim call it (through ddpm.network.fast.FastModel, so CUDA graphs apply where switched on).
- fwdbwd: forward + MSE + backward, train mode (dropout on), no optimizer.
- train: the training step of ddpm.workflows.train: t, ε and flips drawn on the device, q_sample,
  the network, L_simple, backward, global-norm clipping, Adam (ddpm.network.fast.adam: fused, on
  both sides; --adam foreach for torch's other multi-tensor implementation), EMA lerp (foreach).
  steps/s and images/s.
- sample: ancestral steps (Algorithm 2) from t = T down through GaussianDiffusion.reverse_loop;
  the time per step is measured over K steps and images/s at 1000 steps is B / (1000 x step).
  z is drawn on the device (torch.randn), the same for both sides.

Implementations (--impls):
- ddpm: ddpm's default path on this device (the "auto" switches of ddpm.network.fast: CPU channels_last
  from width 128 up (the CIFAR-10 preset) and Winograd 3x3 convolutions; CUDA channels_last +
  torch.compile + CUDA graphs for forward/sample).
- ddpm-direct: ddpm's defaults with Winograd off (direct convolutions only): what Winograd adds.
- ddpm-eager: ddpm with every switch off (NCHW, no compile, no graphs, no Winograd).
- ddpm-compiled: channels_last + torch.compile (+ CUDA graphs on CUDA for forward/sample).
- diffusers: UNet2DModel as it comes (eager, NCHW).
- diffusers-compiled: UNet2DModel with diffusers' own speed advice: channels_last + torch.compile
  (+ the same CUDA graphs as ddpm on CUDA for forward/sample).
Any of them with "@fp32" or "@bf16" appended runs at that precision instead of --precision, so
fp32 and bf16 are timed in one run, in turn (e.g. --impls ddpm,ddpm@bf16,diffusers,diffusers@bf16).

Memory: "peak" is the rise over one call (activations and temporaries): on CUDA from
torch.cuda.max_memory_allocated, on the CPU from the process's peak resident set (VmHWM, reset
through /proc/self/clear_refs, after malloc_trim). On CUDA "resident" is what the implementation
keeps between calls (weights, optimizer moments, EMA, CUDA-graph pools).

Output: a JSON file (--out; default benchmarks/results/<device>-<date>.json) and a Markdown table
on stdout, ready for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# OpenMP's wait policy is read when torch loads its OpenMP runtime, so --omp-wait-policy is looked
# at before torch is imported. "default" leaves libgomp's own (idle threads spin a little, then
# sleep): what a user of ddpm or diffusers gets. "passive" (threads sleep at once) is steadier on a
# CPU shared with other processes, whose spinning threads hold the cores the working ones need; but
# waking a sleeping thread costs every parallel region, more so for code of many small operations
# (BENCHMARKS.md, "Threads"). Either applies to both implementations alike.
OMP_POLICIES = ("default", "passive", "active")
_policy = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--omp-wait-policy=")), "default")
if _policy in ("passive", "active"):
    os.environ["OMP_WAIT_POLICY"] = _policy.upper()

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from ddpm.process.diffusion import DiffusionConfig, GaussianDiffusion  # noqa: E402
from ddpm.network.fast import FastModel, adam, autocast, resolve_switch, set_winograd, to_channels_last  # noqa: E402
from ddpm.network.unet import UNet, forward_flops  # noqa: E402
from ddpm.run.config import RunConfig  # noqa: E402

TASKS = ("forward", "fwdbwd", "train", "sample")
IMPLS = ("ddpm", "ddpm-direct", "ddpm-eager", "ddpm-compiled", "diffusers", "diffusers-compiled")
BASELINE = "diffusers"

# Dense peak TFLOP/s of known GPUs (bf16 tensor cores, without sparsity; fp32 is TF32 convolutions
# by PyTorch's default). The roofs (207 training steps/s, 79.5 samples/s) use H100 SXM's 989.
PEAK_TFLOPS = {"H100": {"bf16": 989.0, "fp32": 494.5}, "H200": {"bf16": 989.0, "fp32": 494.5},
               "A100": {"bf16": 312.0, "fp32": 156.0}}


# ---------------------------------------------------------------------------------------------
# The implementations
# ---------------------------------------------------------------------------------------------


class DiffusersNet(nn.Module):
    """UNet2DModel called as ddpm's networks are: net(x_t, t) -> eps, with the paper's t; diffusers
    takes the 0-based index t - 1, as the official code did (docs/MATH.md § Time and indexing)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t - 1).sample


PRECISIONS = ("fp32", "bf16")


def split_impl(impl: str, default_precision: str) -> tuple[str, str]:
    """"ddpm@bf16" -> ("ddpm", "bf16"); "ddpm" -> ("ddpm", default_precision)."""
    name, _, precision = impl.partition("@")
    return name, precision or default_precision


def switches(impl: str, device: torch.device, base: UNet) -> dict:
    """channels_last / compile / cuda_graphs / winograd of an implementation on `device`."""
    impl = impl.partition("@")[0]
    cuda = device.type == "cuda"
    names = ("channels_last", "compile", "cuda_graphs", "winograd")
    if impl == "ddpm":
        return {k: resolve_switch(k, "auto", device, base) for k in names}
    if impl == "ddpm-direct":  # ddpm's defaults with direct (oneDNN / cuDNN) convolutions only
        return {k: resolve_switch(k, "auto", device, base) and k != "winograd" for k in names}
    if impl in ("ddpm-eager", "diffusers"):
        return dict.fromkeys(names, False)
    return dict(channels_last=True, compile=True, cuda_graphs=cuda, winograd=False)


def build_network(impl: str, base: UNet) -> nn.Module:
    if impl.partition("@")[0].startswith("ddpm"):
        return copy.deepcopy(base)
    from ddpm.network.interop import unet_to_diffusers

    return DiffusersNet(unet_to_diffusers(base))


# ---------------------------------------------------------------------------------------------
# Measurement helpers
# ---------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _trim_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap back, so the next peak is this call's
    except (OSError, AttributeError):
        pass


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def peak_memory_mib(fn, device: torch.device):
    """Peak memory of one call of fn (see the module docstring), in MiB; None where unmeasurable."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    _trim_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return None
    before = _vm("VmRSS")
    fn()
    return (_vm("VmHWM") - before) / 2**20


def _category(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("conv", "fprop", "dgrad", "wgrad", "winograd", "implicit_gemm")):
        return "convolution"
    if any(k in n for k in ("attention", "flash", "fmha", "softmax", "sdpa")):
        return "attention"
    if any(k in n for k in ("gemm", "addmm", "aten::mm", "bmm", "matmul", "cutlass", "linear")):
        return "matmul"
    if "norm" in n:
        return "group norm"
    if any(k in n for k in ("adam", "foreach", "lerp", "clip")):
        return "optimizer / EMA"
    if any(k in n for k in ("triton", "cpp_fused", "kernel_cpp")):
        return "compiled (fused) kernels"
    return "other (elementwise, copies, launches)"


def profile_ops(fn, device: torch.device, top: int = 15) -> dict:
    """Where one call spends its time: the top ops (CPU) or kernels (CUDA) by self time, and shares
    by category. Leaf events only, so nothing is counted twice."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        fn()
        sync(device)
    rows = []
    for e in prof.key_averages():
        if cuda:
            us = getattr(e, "self_device_time_total", None)
            us = getattr(e, "self_cuda_time_total", 0) if us is None else us
        else:
            us = e.self_cpu_time_total
        if us > 0:
            rows.append((e.key, us / 1e3, e.count))
    total = sum(r[1] for r in rows) or 1.0
    cats: dict[str, float] = {}
    for name, ms, _ in rows:
        c = _category(name)
        cats[c] = cats.get(c, 0.0) + ms
    rows.sort(key=lambda r: -r[1])
    return dict(total_ms=total, clock="GPU kernel time" if cuda else "CPU op self time",
                categories={k: v / total for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
                top=[dict(op=n[:120], self_ms=ms, share=ms / total, calls=c) for n, ms, c in rows[:top]])


# ---------------------------------------------------------------------------------------------
# The tasks: each returns a callable doing one unit of work, and how many images a unit is
# ---------------------------------------------------------------------------------------------


class Workload:
    def __init__(self, args, device: torch.device, base: UNet, diffusion: GaussianDiffusion):
        self.args, self.device, self.base, self.diffusion = args, device, base, diffusion
        cfg = base.config
        self.shape = (cfg.in_channels, cfg.resolution, cfg.resolution)
        g = torch.Generator().manual_seed(1)
        B = args.batch
        self.x = torch.randn(B, *self.shape, generator=g).to(device)
        self.t = 1 + torch.randint(0, diffusion.num_timesteps, (B,), generator=g).to(device)  # paper t in 1 … T
        self.target = torch.randn(B, *self.shape, generator=g).to(device)
        # A stand-in data set of uint8 images kept on the device, as train.py keeps CIFAR-10.
        self.data = torch.randint(0, 256, (max(4 * B, 1024), *self.shape), dtype=torch.uint8, generator=g).to(device)

    def eval_model(self, impl: str) -> FastModel:
        s = switches(impl, self.device, self.base)
        net = build_network(impl, self.base).to(self.device).eval().requires_grad_(False)
        if s["channels_last"]:
            to_channels_last(net)
        set_winograd(net, s["winograd"])
        return FastModel(net, self.device, self.precision(impl), s["compile"], s["channels_last"], s["cuda_graphs"])

    def precision(self, impl: str) -> str:
        return split_impl(impl, self.args.precision)[1]

    def train_model(self, impl: str):
        s = switches(impl, self.device, self.base)
        net = build_network(impl, self.base).to(self.device).train()
        if s["channels_last"]:
            to_channels_last(net)
        set_winograd(net, s["winograd"])
        call = torch.compile(net, dynamic=False) if s["compile"] else net
        return net, call

    def forward(self, impl: str):
        model = self.eval_model(impl)
        return lambda: model(self.x, self.t), self.args.batch

    def fwdbwd(self, impl: str):
        net, call = self.train_model(impl)
        ac = self.precision(impl)

        def run():
            net.zero_grad(set_to_none=True)
            with autocast(self.device, ac):
                out = call(self.x, self.t)
            ((out.float() - self.target) ** 2).mean().backward()
        return run, self.args.batch

    def train(self, impl: str):
        net, call = self.train_model(impl)
        params = list(net.parameters())
        ema = [p.detach().clone() for p in params]
        opt = (adam(params, lr=2e-4, eps=1e-8) if self.args.adam == "fused" else
               torch.optim.Adam(params, lr=2e-4, eps=1e-8, foreach=True))
        gen = torch.Generator(self.device).manual_seed(0)
        B, T, diffusion, data, dev = self.args.batch, self.diffusion.num_timesteps, self.diffusion, self.data, self.device
        precision = self.precision(impl)

        def step():
            # the order of operations of ddpm.workflows.train's loop, with its randomness drawn on the device
            idx = torch.randint(0, data.shape[0], (B,), generator=gen, device=dev)
            t = 1 + torch.randint(0, T, (B,), generator=gen, device=dev)
            noise = torch.randn((B, *self.shape), generator=gen, device=dev)
            flip = torch.rand(B, generator=gen, device=dev) < 0.5
            x0 = data[idx].float() / 127.5 - 1
            x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(-1), x0)
            with autocast(dev, precision):
                losses = diffusion.training_losses(call, x0, t, noise)
            loss = losses["loss"].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            opt.step()
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1e-4)
        return step, B

    def sample(self, impl: str):
        model = self.eval_model(impl)
        T, K = self.diffusion.num_timesteps, self.args.sample_steps
        gen = torch.Generator(self.device).manual_seed(0)
        dev = self.device
        step = self.diffusion.ancestral(clip_denoised=True)
        noise_fn = lambda shape: torch.randn(shape, generator=gen, device=dev)  # noqa: E731

        def run():
            self.diffusion.reverse_loop(model, self.x, range(T, T - K - 1, -1), step, noise_fn=noise_fn)
        return run, self.args.batch


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def measure(task: str, work: Workload, impls: list[str], args, device: torch.device) -> dict:
    """Build and warm up each implementation, then time them in turn, rotating the order every
    repetition. On CUDA also the memory each holds (weights, optimizer state, graphs: "resident")."""
    fns, iters, warm_s, resident = {}, {}, {}, {}
    for impl in impls:
        a0 = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        fns[impl] = fn, _ = getattr(work, task)(impl)
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            fn()
        sync(device)
        warm_s[impl] = time.perf_counter() - t0
        if device.type == "cuda":
            resident[impl] = (torch.cuda.memory_allocated(device) - a0) / 2**20
        t0 = time.perf_counter()
        fn()
        sync(device)
        one = time.perf_counter() - t0
        iters[impl] = max(1, int(args.min_rep_s / max(one, 1e-6))) if device.type == "cuda" else 1
        print(f"  {task:8s} {impl:19s} warm-up {warm_s[impl]:7.1f}s, {iters[impl]} call(s) per repetition",
              file=sys.stderr, flush=True)
    times = {impl: [] for impl in impls}
    cpu_times = {impl: [] for impl in impls}
    for rep in range(args.reps):
        k = rep % len(impls)
        for impl in impls[k:] + impls[:k]:
            fn = fns[impl][0]
            sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(iters[impl]):
                fn()
            sync(device)
            times[impl].append((time.perf_counter() - t0) / iters[impl])
            cpu_times[impl].append((time.process_time() - c0) / iters[impl])
    mem = {impl: peak_memory_mib(fns[impl][0], device) for impl in impls} if args.memory else {}
    prof = {impl: profile_ops(fns[impl][0], device) for impl in impls} if args.profile else {}
    images = {impl: fns[impl][1] for impl in impls}
    return dict(times=times, cpu_times=cpu_times, warmup_s=warm_s, iters=iters, mem=mem, resident=resident, images=images,
                profile=prof)


def machine(device: torch.device) -> dict:
    info = {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") or "default"}
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        info["diffusers"] = None
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version())
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                            cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except OSError:
        info["git_commit"] = None
    return info


def conv_roof_tflops(device: torch.device, precision: str, reps: int = 5) -> float:
    """What this machine's convolution kernels reach at best: the network's largest 3x3 convolution
    (256 -> 256 channels at 32x32, batch 8, channels_last), best of `reps`. On a CPU this is the
    practical FLOP roof (no published peak applies to a shared virtual machine)."""
    conv = nn.Conv2d(256, 256, 3, padding=1).to(device, memory_format=torch.channels_last)
    x = torch.randn(8, 256, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    best = float("inf")
    with torch.no_grad(), autocast(device, precision):
        conv(x)
        for _ in range(reps):
            sync(device)
            t0 = time.perf_counter()
            conv(x)
            sync(device)
            best = min(best, time.perf_counter() - t0)
    return 2 * 8 * 256 * 32 * 32 * 256 * 9 / best / 1e12


def peak_tflops(device: torch.device, precision: str):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_properties(device).name
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks[precision]
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--preset", default="cifar10", help="a preset of ddpm.run.presets (default cifar10, the paper's 35.7M model)")
    p.add_argument("--batch", type=int, default=None, help="default: 8 on CPU, 128 on CUDA")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS, help="of implementations named without @fp32 / @bf16")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
    p.add_argument("--impls", default="ddpm,diffusers,ddpm-compiled,diffusers-compiled",
                   help=f"comma-separated, of {', '.join(IMPLS)}, each optionally @fp32 or @bf16; ratios are against {BASELINE!r}")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per implementation (default: 7 CPU, 10 CUDA)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first (compilation, graph capture, autotuning)")
    p.add_argument("--min-rep-s", type=float, default=1.0, help="CUDA: calls per repetition so that one lasts about this long")
    p.add_argument("--sample-steps", type=int, default=None, help="reverse steps timed per call of 'sample' (default 2 CPU, 50 CUDA)")
    p.add_argument("--adam", default="fused", choices=("fused", "foreach"),
                   help="the train task's Adam, for both sides (default fused, what ddpm's training uses)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory pass")
    p.add_argument("--profile", action="store_true", help="also profile one call of each (top ops, shares by category)")
    p.add_argument("--omp-wait-policy", default="default", choices=OMP_POLICIES,
                   help="OpenMP's wait policy, written --omp-wait-policy=X (default: libgomp's own; see the top of this file)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--separate", type=int, default=0, metavar="ROUNDS",
                   help="instead of one process: each implementation in a fresh process of its own, ROUNDS times, "
                        "the order rotating, its repetitions pooled (what a user running one of them sees)")
    p.add_argument("--out", default=None, help="JSON file (default benchmarks/results/<device>-<precision>-<date>.json)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    cuda = device.type == "cuda"
    args.batch = args.batch or (128 if cuda else 8)
    args.reps = args.reps or (10 if cuda else 7)
    args.sample_steps = args.sample_steps or (50 if cuda else 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda:
        torch.backends.cudnn.benchmark = True  # the same for both sides
    tasks = [t for t in args.tasks.split(",") if t]
    impls = [i for i in args.impls.split(",") if i]
    for t in tasks:
        if t not in TASKS:
            p.error(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
    for i in impls:
        name, precision = split_impl(i, args.precision)
        if name not in IMPLS:
            p.error(f"unknown implementation {name!r}; choose from {', '.join(IMPLS)}")
        if precision not in PRECISIONS:
            p.error(f"unknown precision {precision!r} in {i!r}; choose from {', '.join(PRECISIONS)}")

    if args.separate:
        return run_separately(args, impls, argv)

    torch.manual_seed(args.seed)
    cfg = RunConfig.from_preset(args.preset).model
    base = UNet.from_config(cfg)
    diffusion = GaussianDiffusion.from_config(DiffusionConfig())
    work = Workload(args, device, base, diffusion)
    fwd_gflop = forward_flops(cfg) / 1e9  # per image
    flop_per_image = {"forward": fwd_gflop, "fwdbwd": 3 * fwd_gflop, "train": 3 * fwd_gflop, "sample": fwd_gflop}
    peak = peak_tflops(device, args.precision)
    meta = machine(device)
    meta["conv_roof_tflops"] = conv_roof_tflops(device, args.precision)
    started = datetime.datetime.now(datetime.timezone.utc)
    print(f"# {args.preset} on {meta.get('gpu', meta['cpu'])}, {args.precision}, batch {args.batch}, "
          f"{meta['threads']} threads, torch {meta['torch']}, diffusers {meta['diffusers']}", file=sys.stderr)

    results = []
    for task in tasks:
        m = measure(task, work, impls, args, device)
        base_med = statistics.median(m["times"][BASELINE]) if BASELINE in m["times"] else None
        for impl in impls:
            ts = m["times"][impl]
            med = statistics.median(ts)
            unit_images = m["images"][impl]
            r = dict(task=task, impl=impl, switches=switches(impl, device, base), precision=split_impl(impl, args.precision)[1], batch=args.batch,
                     times_s=ts, median_s=med, cpu_times_s=m["cpu_times"][impl],
                     median_cpu_s=statistics.median(m["cpu_times"][impl]), warmup_s=m["warmup_s"][impl], calls_per_rep=m["iters"][impl],
                     peak_mem_mib=m["mem"].get(impl), resident_mem_mib=m["resident"].get(impl))
            if task == "sample":
                step_s = med / args.sample_steps
                r.update(step_s=step_s, img_per_s_1000_steps=unit_images / (1000 * step_s), sample_steps_timed=args.sample_steps)
                tflops = fwd_gflop * unit_images / step_s / 1e3
            else:
                r.update(img_per_s=unit_images / med)
                if task == "train":
                    r["steps_per_s"] = 1.0 / med
                tflops = flop_per_image[task] * unit_images / med / 1e3
            r["tflops"] = tflops
            if peak:
                r["fraction_of_peak"] = tflops / peak
            if base_med is not None:
                r["speedup_vs_diffusers"] = base_med / med
                r["speedup_cpu_time_vs_diffusers"] = statistics.median(m["cpu_times"][BASELINE]) / r["median_cpu_s"]
            if impl in m["profile"]:
                r["profile"] = m["profile"][impl]
            results.append(r)
        del m
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    meta["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    out = dict(command="python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
               date=started.isoformat(timespec="seconds"), machine=meta, preset=args.preset, batch=args.batch,
               precision=args.precision, reps=args.reps, gflop_per_image_forward=fwd_gflop, peak_tflops=peak,
               results=results)
    write(out, args, device.type, started)
    return 0


def write(out: dict, args, device_type: str, started: datetime.datetime) -> None:
    """The JSON file (--out, or benchmarks/results/<device>-<precision>-b<batch>-<date>.json) and the Markdown."""
    path = Path(args.out or Path(__file__).resolve().parent / "results" /
                f"{device_type}-{args.precision}-b{args.batch}-{started.strftime('%Y%m%d-%H%M%S')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(markdown(out))
    print(f"\nwritten: {path}", file=sys.stderr)


def run_separately(args, impls: list[str], argv) -> int:
    """--separate: each implementation alone in a fresh process (this script with --impls X), args.separate
    rounds with the order rotating; each (task, implementation)'s repetitions are pooled over the rounds,
    its rates rescaled to the pooled median, and the ratios taken between pooled medians. Measured this
    way, nothing of one implementation (its heap, its caches) is left in the process the other runs in."""
    child = ["--device", args.device, "--preset", args.preset, "--batch", str(args.batch), "--precision", args.precision,
             "--tasks", args.tasks, "--reps", str(args.reps), "--warmup", str(args.warmup), "--min-rep-s", str(args.min_rep_s),
             "--sample-steps", str(args.sample_steps), f"--omp-wait-policy={args.omp_wait_policy}", "--seed", str(args.seed),
             "--adam", args.adam]
    child += (["--threads", str(args.threads)] if args.threads else []) + ([] if args.memory else ["--no-memory"])
    child += ["--profile"] if args.profile else []
    started = datetime.datetime.now(datetime.timezone.utc)
    runs: dict[tuple, list] = {}
    meta = None
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(args.separate):
            for impl in impls[k % len(impls):] + impls[:k % len(impls)]:
                path = Path(tmp) / f"{k}-{impl}.json"
                subprocess.run([sys.executable, __file__, *child, "--impls", impl, "--out", str(path)], check=True,
                               stdout=subprocess.DEVNULL)
                child_out = json.loads(path.read_text())
                meta = meta or child_out["machine"]
                for r in child_out["results"]:
                    runs.setdefault((r["task"], r["impl"]), []).append(r)
    results = []
    for (task, impl), rs in runs.items():
        r = dict(rs[0], times_s=[t for x in rs for t in x["times_s"]], cpu_times_s=[t for x in rs for t in x["cpu_times_s"]])
        r["median_s"], r["median_cpu_s"] = statistics.median(r["times_s"]), statistics.median(r["cpu_times_s"])
        scale = rs[0]["median_s"] / r["median_s"]  # the rates of the first round, at the pooled median
        for key in ("img_per_s", "img_per_s_1000_steps", "tflops", "fraction_of_peak"):
            if key in r:
                r[key] *= scale
        if "steps_per_s" in r:
            r["steps_per_s"] = 1.0 / r["median_s"]
        if "step_s" in r:
            r["step_s"] = r["median_s"] / r["sample_steps_timed"]
        r["processes"] = len(rs)
        results.append(r)
    tasks = args.tasks.split(",")
    results.sort(key=lambda r: (tasks.index(r["task"]), impls.index(r["impl"])))
    for r in results:
        base = next((b for b in results if b["task"] == r["task"] and b["impl"] == BASELINE), None)
        if base is not None:
            r["speedup_vs_diffusers"] = base["median_s"] / r["median_s"]
            r["speedup_cpu_time_vs_diffusers"] = base["median_cpu_s"] / r["median_cpu_s"]
    meta = dict(meta, separate_processes=args.separate, loadavg_end=os.getloadavg() if hasattr(os, "getloadavg") else None)
    out = dict(command="python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
               date=started.isoformat(timespec="seconds"), machine=meta, preset=args.preset, batch=args.batch,
               precision=args.precision, reps=args.reps * args.separate, results=results)
    write(out, args, args.device, started)
    return 0


def markdown(out: dict) -> str:
    rows = ["| task | implementation | median wall | images/s | steps/s | TFLOP/s | vs diffusers eager (wall) "
            "| process CPU time, vs diffusers | peak (/ resident) MiB | wall times (s) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["results"]:
        if r["task"] == "sample":
            med = f"{r['step_s'] * 1e3:.1f} ms/step"
            ips = f"{r['img_per_s_1000_steps']:.3g} (1000 steps)"
        else:
            med = f"{r['median_s'] * 1e3:.1f} ms"
            ips = f"{r['img_per_s']:.3g}"
        sps = f"{r['steps_per_s']:.3g}" if "steps_per_s" in r else ""
        tf = f"{r['tflops']:.3g}" + (f" ({100 * r['fraction_of_peak']:.0f}%)" if "fraction_of_peak" in r else "")
        ratio = f"{r['speedup_vs_diffusers']:.2f}x" if "speedup_vs_diffusers" in r else ""
        cpu = f"{r['median_cpu_s'] * 1e3:.0f} ms" + (f", {r['speedup_cpu_time_vs_diffusers']:.2f}x" if "speedup_vs_diffusers" in r else "")
        mem = f"{r['peak_mem_mib']:.0f}" if r.get("peak_mem_mib") is not None else ""
        if r.get("resident_mem_mib") is not None:
            mem += f" / {r['resident_mem_mib']:.0f}"
        ts = ", ".join(f"{t:.3g}" for t in r["times_s"])
        rows.append(f"| {r['task']} | {r['impl']} | {med} | {ips} | {sps} | {tf} | {ratio} | {cpu} | {mem} | {ts} |")
    m = out["machine"]
    head = (f"{out['date']} · `{out['command']}` · {m.get('gpu', m['cpu'])} "
            f"({m['threads']} threads, OpenMP wait policy {m.get('omp_wait_policy')}) · torch {m['torch']} · "
            f"diffusers {m['diffusers']} · {out['preset']}, batch {out['batch']}, {out['precision']} · "
            f"load average {m.get('loadavg_start')} → {m.get('loadavg_end')} · best 3x3 conv "
            f"{m.get('conv_roof_tflops', float('nan')):.3g} TFLOP/s")
    text = head + "\n\n" + "\n".join(rows)
    profiled = [r for r in out["results"] if "profile" in r]
    if profiled:
        text += "\n\nProfile of one call (" + profiled[0]["profile"]["clock"] + "), share by category:\n\n"
        text += "| task | implementation | total ms | " + " | ".join(["categories"]) + " |\n|---|---|---|---|\n"
        for r in profiled:
            cats = ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["profile"]["categories"].items() if v >= 0.01)
            text += f"| {r['task']} | {r['impl']} | {r['profile']['total_ms']:.0f} | {cats} |\n"
    return text


if __name__ == "__main__":
    sys.exit(main())
