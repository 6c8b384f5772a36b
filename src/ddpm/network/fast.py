"""The fast paths: one switch each, with a default per device, applied to the network from outside.

unet.py is the paper's network and nothing else; this module changes how it runs, never what it
computes, except for float rounding (and, under compile, which dropout masks a seed draws):
Winograd by swapping its 3x3 convolutions for a subclass with the same parameters, channels-last
by moving its weights, compile and CUDA graphs by wrapping it.

Every switch takes "auto", "on" or "off"; "auto" resolves per device. The CPU defaults are measured
(BENCHMARKS.md); the CUDA defaults are the usual practice for convolutional networks on
tensor-core GPUs and have not been measured yet, because no GPU was available when they were written:

| switch          | CPU  | CUDA | what it does                                                              |
|-----------------|------|------|---------------------------------------------------------------------------|
| channels_last   | *    | on   | NHWC weights and activations: oneDNN / cuDNN's fast convolution layout;   |
|                 |      |      | the attention's q, k, v are then [B, H*W, C] views, which SDPA's fused    |
|                 |      |      | kernels take without a copy. * CPU: on for networks of width ch >= 128    |
|                 |      |      | (CIFAR-10: forward 4-11% faster, training 1-3%); off below (the demo's    |
|                 |      |      | ch=32 network on 28x28 runs 15-20% slower in NHWC)                        |
| compile         | off  | on   | torch.compile (inductor): fuses GroupNorm+SiLU, the time-embedding add    |
|                 |      |      | and the residual adds. Off on CPU: 2-5 minutes of compilation on 2 cores, |
|                 |      |      | then fp32 forward 0-3% faster and training 1-4% slower than eager, bf16   |
|                 |      |      | training 7-11% slower (Zen 4)                                             |
| cuda_graphs     | off  | on   | sampling only: one CUDA graph per batch shape replays the whole network,  |
|                 |      |      | so 1000 steps cost 1000 launches instead of ~300,000                      |
| winograd        | on   | -    | the CPU's 3x3 convolutions of >= 128 channels on >= 16x16 pixels by       |
|                 |      |      | Winograd F(4x4, 3x3) (winograd.py): 4x fewer multiplications than         |
|                 |      |      | direct convolutions, which already run at the cores' FMA peak.            |
|                 |      |      | CIFAR-10 net, 1-2 threads, forward and training step against direct:      |
|                 |      |      | Zen 3 1.2-1.6x, Zen 4 1.2x, Sapphire Rapids 1.0-1.15x (the faster the     |
|                 |      |      | direct convolution, the less is left: BENCHMARKS.md § The CPU's roof).    |
|                 |      |      | Rounds differently (about 1e-5 of the largest value,                      |
|                 |      |      | tests/test_winograd.py). A prepared model transforms its kernels once     |
|                 |      |      | and keeps them (4x those weights: 158 MB for the CIFAR-10 network), which |
|                 |      |      | makes its forward 1.12x faster on Zen 4                                   |

Precision is a setting of its own, `precision`: "fp32", "bf16" (autocast of the network; the
diffusion math stays in float32 or above), "fp16" (training adds loss scaling), or "auto". bf16
changes results within the tolerances tests/test_fastpaths.py states, so the paper's presets keep
fp32; "auto" (the demo's) chooses bf16 where the device computes it natively, decided at run time
from what the device has (`native_bf16`), and fp32 elsewhere:

| device                                   | auto | measured (BENCHMARKS.md § bf16 by what the CPU has) |
|------------------------------------------|------|------------------------------------------------------|
| CPU with AVX512-BF16 or AMX-BF16         | bf16 | Zen 4 (AVX512-BF16): CIFAR-10 net forward 1.45x,     |
| (Zen 4 and later, Sapphire Rapids and    |      | training step 1.39x the fp32 default (Winograd);     |
| later)                                   |      | demo net forward 1.68x, step 1.45x                   |
| CPU without them (AVX2, e.g. Zen 3)      | fp32 | bf16 is converted in software there                  |
| CUDA with bf16 tensor cores (Ampere on)  | bf16 | the usual mixed precision; not yet measured here     |
| other CUDA devices                       | fp32 | fp16 needs loss scaling: the user's choice           |
The training loop's other fast paths need no switch (they cost nothing and change nothing): fused
Adam (`adam`: one kernel over all parameters, on the CPU as on CUDA), a foreach EMA update, the
data set kept on the GPU as uint8 with flips done there, the step's random numbers drawn on the
device, and losses read back every `log_every` steps only (workflows/train.py).

`prepare_model` is the sampling side: it wraps a network once, and the wrapped model is what
`sample(...)`, `calc_bpd_loop(...)` and friends take (any callable `model(x_t, t)`); `load_run(...,
fast="auto")` and the CLI's sampling commands (`--fast auto`, the default) go through it.

Fail-safe. A fast path that cannot be built on the machine at hand (torch.compile failing on a
driver, a compiler or a torch version; a CUDA graph that cannot be captured) must not end a run:
its first call is its build, and if the build fails where the plain network succeeds on the same
input, a `FastPathWarning` says why and which switch turns it off, and the plain path is used
from then on. If the plain network fails too, the fault is not the fast path's and its error is
raised. Only building falls back: once built, a failure (in the middle of training, in a graph's
replay) is raised like any other.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from .. import threads
from ..config import Choice
from ..errors import UserError
from . import winograd


class FastPathWarning(UserWarning):
    """A fast path could not be built here; the plain path is used instead."""


def _reason(e: BaseException) -> str:
    """An exception as one short line: its type and first line, and those of its root cause
    (torch.compile wraps the compiler's own error)."""
    def line(x: BaseException) -> str:
        lines = [s.strip() for s in str(x).splitlines() if s.strip()]
        text = " ".join(lines[:2]) if lines and lines[0].endswith(":") else (lines[0] if lines else "")
        return f"{type(x).__name__}: {text[:200]}" if text else type(x).__name__

    root = e
    while root.__cause__ is not None and root.__cause__ is not root:
        root = root.__cause__
    return line(e) if root is e else f"{line(e)} {line(root)}"


class Switch(Choice):
    AUTO = "auto"  # the device's measured default (DEFAULTS)
    ON = "on"
    OFF = "off"


class Precision(Choice):
    FP32 = "fp32"
    BF16 = "bf16"  # autocast of the network in bfloat16; the diffusion math stays in float32
    FP16 = "fp16"  # autocast in float16, for GPUs without bf16 (training adds dynamic loss scaling)
    AUTO = "auto"  # bf16 where the device computes it natively (native_bf16), else fp32


def native_bf16(device) -> tuple[bool, str]:
    """Whether `device` computes bf16 products in hardware, and what it has (for messages).

    CPU: AVX512-BF16 (Zen 4, Cooper Lake and later) or AMX's bf16 tiles (Sapphire Rapids and
    later), as PyTorch's own CPU feature detection (cpuinfo) reports them; without them oneDNN
    converts bf16 to fp32 in software, and fp32 is the faster. CUDA: bf16 tensor cores (compute
    capability 8.0 and up). The torch.cpu probes are private functions, so their absence (another
    build, another architecture) reads as "no"; and a CPU whose oneDNN the environment holds to an
    instruction set without bf16 (ONEDNN_MAX_CPU_ISA=AVX2, say) counts as one without.
    """
    device = torch.device(device)
    if device.type == "cuda":
        ok = torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)
        return ok, "bf16 tensor cores" if ok else "no bf16 tensor cores (compute capability below 8.0)"
    if device.type != "cpu":
        return False, f"{device.type}: not measured"
    probes = (("AMX-BF16", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))
    found = [name for name, probe in probes if _cpu_probe(probe)]
    if not found:
        return False, "no AVX512-BF16 or AMX-BF16"
    cap = next((os.environ[k] for k in ONEDNN_ISA_VARIABLES if os.environ.get(k)), "")
    if cap.strip().upper() in ONEDNN_ISAS_WITHOUT_BF16:
        return False, f"{' and '.join(found)}, but oneDNN is held to {cap.strip().upper()} by the environment"
    return True, " and ".join(found)


# oneDNN, which runs the CPU's convolutions and matrix products, may be held to an older instruction
# set by an environment variable (oneDNN's documentation, "CPU Dispatcher Control"); these caps
# leave it without bf16 instructions, so bf16 would be converted in software again.
ONEDNN_ISA_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")
ONEDNN_ISAS_WITHOUT_BF16 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_MIC",
                                      "AVX512_MIC_4OPS", "AVX512_CORE", "AVX512_CORE_VNNI"})


def _cpu_probe(name: str) -> bool:
    try:
        return bool(getattr(torch.cpu, name)())
    except Exception:  # a torch without the probe, or a probe that cannot run here
        return False


def resolve_precision(value: str, device) -> "Precision":
    """"auto" | "fp32" | "bf16" | "fp16" -> the precision used on `device` (never AUTO)."""
    value = Precision.parse(value, "precision")
    if value is Precision.AUTO:
        return Precision.BF16 if native_bf16(device)[0] else Precision.FP32
    return value


SWITCH_VALUES = tuple(s.value for s in Switch)

# What "auto" means, per device type: measured on the CPU (BENCHMARKS.md), not yet on CUDA.
DEFAULTS: dict[str, dict[str, bool]] = {
    "channels_last": {"cpu": True, "cuda": True},  # CPU: only from CPU_CHANNELS_LAST_MIN_WIDTH up
    "compile": {"cpu": False, "cuda": True},
    "cuda_graphs": {"cpu": False, "cuda": True},
    "winograd": {"cpu": True, "cuda": False},
}
CPU_CHANNELS_LAST_MIN_WIDTH = 128  # oneDNN's NHWC kernels win from the paper's widths up, lose at ch=32


def resolve_switch(name: str, value: str, device, model: Optional[nn.Module] = None) -> bool:
    """"auto" | "on" | "off" -> whether fast path `name` is used on `device` (for `model`, whose
    width decides channels_last on the CPU; without a model, "auto" keeps the CPU at NCHW)."""
    value = Switch.parse(value, name)
    kind = torch.device(device).type
    if value is Switch.AUTO:
        if name == "channels_last" and kind == "cpu":
            width = getattr(getattr(model, "config", None), "ch", None)
            return isinstance(width, int) and width >= CPU_CHANNELS_LAST_MIN_WIDTH
        return DEFAULTS[name].get(kind, False)
    if value is Switch.ON and name == "cuda_graphs" and kind != "cuda":
        raise UserError(f"cuda_graphs='on' needs a CUDA device (this one is {kind}); use 'auto' or 'off'")
    if value is Switch.ON and name == "winograd" and kind != "cpu":
        raise UserError(f"winograd='on' is a CPU fast path (this device is {kind}); use 'auto' or 'off'")
    return value is Switch.ON


def describe_precision(precision: str, device) -> str:
    """"fp32", or for "auto" what it resolves to on `device` and why: "auto -> bf16 (cpu: AVX512-BF16)"."""
    used = resolve_precision(precision, device)
    if Precision.parse(precision, "precision") is not Precision.AUTO:
        return used.value
    return f"auto -> {used.value} ({torch.device(device).type}: {native_bf16(device)[1]})"


def describe_device(device, width: Optional[int] = None) -> list[str]:
    """What the network would run with on `device` ("cpu" or "cuda"), one line each with the reason:
    threads, their wait policy, precision ("auto"), and the fast paths' "auto" (`ddpm info --device`).

    :param width: the network's base width ch (decides channels_last on the CPU); None: not known.
    """
    device = torch.device(device)
    kind = device.type
    lines = []
    if kind == "cpu":
        n = torch.get_num_threads()
        why = (f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}" if os.environ.get("OMP_NUM_THREADS", "").strip()
               else f"torch's default for the {os.cpu_count()} CPUs this process may use")
        lines += [f"threads: {n} ({why}); {threads.describe_adapting()}", f"wait policy: {threads.describe()}"]
    else:
        lines.append(f"device: {torch.cuda.get_device_name(device) if torch.cuda.is_available() else 'no CUDA device'}")
    lines.append(f"precision: {describe_precision('auto', device)} (--precision auto; the default is fp32, the paper's)")
    reasons = {
        "winograd": ("3x3 convolutions of >= 128 channels on >= 16x16 pixels by Winograd F(4x4, 3x3), measured "
                     "faster than direct ones on the CPU" if kind == "cpu" else "a CPU path"),
        "channels_last": ("NHWC, measured faster for wide networks and slower for narrow ones" if kind == "cpu" else
                          "cuDNN's fast convolution layout"),
        "compile": ("off on the CPU: minutes of compilation, measured not to pay back" if kind == "cpu" else
                    "fuses GroupNorm + SiLU and the adds; falls back to eager if it fails"),
        "cuda_graphs": "sampling replays one graph per batch shape" if kind == "cuda" else "CUDA only",
    }
    for name, why in reasons.items():
        if name == "channels_last" and kind == "cpu" and width is None:
            state = f"on from width {CPU_CHANNELS_LAST_MIN_WIDTH} up"
        else:
            model = None if width is None else type("M", (), {"config": type("C", (), {"ch": width})})()
            state = "on" if resolve_switch(name, "auto", device, model) else "off"
        lines.append(f"{name.replace('_', '-')}: {state} ({why})")
    return lines


def autocast(device, precision: str):
    """The network's autocast context: bf16 or fp16 for those precisions, a no-op for "fp32"
    ("auto" as `resolve_precision` decides it on `device`)."""
    precision = resolve_precision(precision, device)
    dtype = torch.float16 if precision is Precision.FP16 else torch.bfloat16
    return torch.autocast(torch.device(device).type, dtype=dtype, enabled=precision is not Precision.FP32)


def to_channels_last(model: nn.Module) -> nn.Module:
    """Convolution weights in NHWC (in place; the Parameter objects stay the same, so an optimizer
    built before still holds them). Convolutions then also compute in NHWC whatever the input layout."""
    return model.to(memory_format=torch.channels_last)


class WinogradConv2d(nn.Conv2d):
    """A 3x3, stride-1, padding-1 nn.Conv2d that computes by Winograd F(4x4, 3x3) (winograd.py) when
    its input qualifies (`winograd.applies`: CPU, float32/64, enough channels and pixels), and as
    nn.Conv2d otherwise: the same function, rounded differently (tests/test_winograd.py states by
    how much). It has no state of its own, so swapping a module's class to it and back keeps its
    parameters, its state dict and every reference to them (the optimizer's, the EMA copy's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if winograd.applies(x, self):
            return winograd.conv3x3(x, self.weight, self.bias)
        return super().forward(x)


def _is_conv3x3(m: nn.Module) -> bool:
    return (type(m) in (nn.Conv2d, WinogradConv2d) and m.kernel_size == (3, 3) and m.stride == (1, 1)
            and m.padding == (1, 1) and m.dilation == (1, 1) and m.groups == 1 and m.padding_mode == "zeros")


def set_winograd(model: nn.Module, on: bool) -> int:
    """Swap every 3x3 stride-1 convolution of `model` to `WinogradConv2d` (on) or back to
    nn.Conv2d (off), in place; returns how many there are."""
    convs = [m for m in model.modules() if _is_conv3x3(m)]
    for m in convs:
        m.__class__ = WinogradConv2d if on else nn.Conv2d
    return len(convs)


def match_layout_(optimizer: torch.optim.Optimizer) -> None:
    """Give each per-parameter optimizer state (Adam's moments) its parameter's memory layout.

    `Optimizer.load_state_dict` restores them contiguous (as checkpoints store them); a channels_last
    parameter with contiguous moments still steps correctly, but off foreach/fused's fast path.
    Values are unchanged (a copy), so an exactly resumed run stays exact.
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for k, v in state.items():
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    state[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def adam(params, lr: float, eps: float) -> torch.optim.Adam:
    """The paper's optimizer, torch's Adam, in its fused implementation: one kernel over all the
    parameters, on the CPU as on CUDA. On a 2-core CPU it steps the 35.7M parameters of the CIFAR-10
    network in a third of foreach's time (BENCHMARKS.md § The optimizer), the same update to within
    float32 rounding. A checkpoint keeps its optimizer's implementation: a run saved by the foreach
    one resumes with it, so its continuation stays bit for bit."""
    return torch.optim.Adam(params, lr=lr, eps=eps, fused=True)


def compile_model(model: nn.Module, device) -> Callable:
    """torch.compile with inductor's default mode (max-autotune's conv/matmul search costs minutes for
    little here: convolutions go to cuDNN / oneDNN either way). One graph, static shapes. Nothing
    is compiled until the first call: see `compile_or_eager`."""
    return torch.compile(model, dynamic=False)


def compile_or_eager(model: nn.Module, device, trial: Callable[[Callable], None], turn_off: str) -> Callable:
    """`compile_model(model)` if its build succeeds, else `model` itself (see Fail-safe above).

    :param trial: `trial(fn)` makes the calls that build `fn` (for training: a forward and a
        backward at the training shapes, leaving no trace); it is run on the compiled model, and,
        if that fails, on `model` to tell whose fault it is.
    :param turn_off: the setting that skips the attempt, for the warning (e.g. "train.compile=off").
    """
    try:
        compiled = compile_model(model, device)
        trial(compiled)
        return compiled
    except Exception as e:  # torch.compile raises many types (BackendCompilerFailed, InductorError, …)
        failed = e
    trial(model)  # the plain network on the same input: if this fails too, that error is raised
    warnings.warn(f"torch.compile could not build the network here ({_reason(failed)}); running it eagerly "
                  f"instead, the same computation ({turn_off} skips the attempt)", FastPathWarning, stacklevel=2)
    return model


def training_trial(model: nn.Module, shape: Sequence[int], device, precision: str) -> Callable[[Callable], None]:
    """A `compile_or_eager` trial for training: forward and backward of `fn` on zeros of `shape`
    (the local batch) at t = 1 (with class 0 for a conditional network, as training calls it),
    in `precision`, then every gradient cleared, with the random number generators restored: the
    run's state is as if it never happened."""
    device = torch.device(device)
    x = torch.zeros(tuple(shape), device=device)
    t = torch.ones(shape[0], dtype=torch.long, device=device)
    conditional = getattr(getattr(model, "config", None), "num_classes", 0) > 0
    args = (x, t, torch.zeros_like(t)) if conditional else (x, t)

    def trial(fn: Callable) -> None:
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                with autocast(device, precision):
                    out = fn(*args)
                out.float().sum().backward()
        finally:
            for p in model.parameters():
                p.grad = None
    return trial


class FastModel(nn.Module):
    """A network prepared for inference (sampling, bits/dim): `FastModel(x_t, t[, y])` equals
    `model(x_t, t[, y])` within the tolerances of tests/test_fastpaths.py, in x_t's dtype and
    contiguous layout (y: the class labels of a conditional network).

    Build it with `prepare_model`. With CUDA graphs, each new input shape is captured once (after
    warm-up iterations, which also trigger compilation) and then replayed; the output is a copy of
    the graph's static output, so callers may keep it.
    """

    def __init__(self, model: nn.Module, device: torch.device, precision: str, compile: bool,
                 channels_last: bool, cuda_graphs: bool):
        super().__init__()
        self.model = model
        self.device, self.precision = device, precision
        self.channels_last, self.compiled, self.cuda_graphs = channels_last, compile, cuda_graphs
        self._fn = compile_model(model, device) if compile else model
        self._built: set = set()  # input signatures the compiled function was built for
        self._graphs: dict[tuple, tuple] = {}
        self._pool = None
        self._kernels = winograd.KernelCache()  # Winograd's transformed kernels, kept between calls

    @property
    def config(self):
        return getattr(self.model, "config", None)

    def _run(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.precision), winograd.cached_kernels(self._kernels):
            out = self._call(x, t, y)
        return out.to(dtype=x.dtype, memory_format=torch.contiguous_format)

    def _call(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        """The network, compiled where that builds (the first call of each input signature is its
        build; see Fail-safe at the top of this module)."""
        args = (x, t) if y is None else (x, t, y)  # an unconditional network takes no y
        key = (tuple(x.shape), x.dtype, x.stride(), tuple(t.shape), t.dtype, y is None)
        if self._fn is self.model or key in self._built:
            return self._fn(*args)
        try:
            out = self._fn(*args)
        except Exception as e:
            out = self.model(*args)  # if the plain network fails too, that error is raised
            warnings.warn(f"torch.compile could not build the network here ({_reason(e)}); running it eagerly "
                          f"instead, the same computation (--fast off, or prepare_model(compile='off'), skips the "
                          f"attempt)", FastPathWarning, stacklevel=4)
            self._fn, self.compiled = self.model, False
            return out
        self._built.add(key)
        return out

    @torch.no_grad()
    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        if not self.cuda_graphs:
            return self._run(x, t, y)
        key = (tuple(x.shape), x.dtype, tuple(t.shape), t.dtype, y is None)
        if key not in self._graphs:
            try:
                self._graphs[key] = self._capture(x, t, y)
            except Exception as e:  # e.g. a network that syncs with the host cannot be captured
                if x.is_cuda:
                    torch.cuda.synchronize(x.device)
                out = self._run(x, t, y)  # if the network itself fails, that error is raised
                warnings.warn(f"CUDA graph capture failed here ({_reason(e)}); sampling without CUDA graphs, the "
                              f"same computation (--fast off, or prepare_model(cuda_graphs='off'), skips the "
                              f"attempt)", FastPathWarning, stacklevel=2)
                self.cuda_graphs = False
                return out
        static_x, static_t, static_y, static_out, graph = self._graphs[key]
        static_x.copy_(x)
        static_t.copy_(t)
        if y is not None:
            static_y.copy_(y)
        graph.replay()
        return static_out.clone()

    def _capture(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor]):
        static_x, static_t = x.clone(), t.clone()
        static_y = None if y is None else y.clone()
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up outside the graph: compilation, cuDNN's algorithm choice, workspaces
                self._run(static_x, static_t, static_y)
        torch.cuda.current_stream(x.device).wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()  # one memory pool for every shape's graph
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static_out = self._run(static_x, static_t, static_y)
        return static_x, static_t, static_y, static_out, graph


def prepare_model(model: nn.Module, device, precision: str = "fp32", compile: str = "auto",
                  channels_last: str = "auto", cuda_graphs: str = "auto", winograd: str = "auto") -> FastModel:
    """`model` on `device`, in eval mode without gradients, with the fast paths the switches select.

    :param precision: "fp32", "bf16" (autocast of the network; its output returns in x_t's dtype) or
        "auto" (bf16 where `device` computes it natively, else fp32: see the top of this module).
    :param compile, channels_last, cuda_graphs, winograd: "auto" (the device's default, see the table
        at the top of this module), "on" or "off".
    The model is changed in place (moved, eval, channels_last); keep a copy if you still train it.
    Compilation and graph capture happen at the first call of each input shape.
    """
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    cl = resolve_switch("channels_last", channels_last, device, model)
    comp = resolve_switch("compile", compile, device)
    graphs = resolve_switch("cuda_graphs", cuda_graphs, device)
    wino = resolve_switch("winograd", winograd, device)
    model = model.to(device).eval().requires_grad_(False)
    if cl:
        to_channels_last(model)
    set_winograd(model, wino)
    return FastModel(model, device, precision, comp, cl, graphs)
