"""The CPU's 3x3 convolutions one by one: oneDNN's direct convolution (what PyTorch and diffusers run)
against ddpm.network.winograd's F(4x4, 3x3), at the CIFAR-10 network's shapes (batch 8 by default).

    python benchmarks/bench_winograd.py [--threads 1] [--batch 8] [--reps 7]

Per shape: forward without gradients (sampling), and forward + backward (input, weight and bias
gradients; training), median wall time of alternating repetitions, the ratio, and the rounding
error of each against a float64 convolution (max |error| / max |value|, output / input gradient /
weight gradient). Both sides get channels_last inputs (oneDNN's faster layout on these CPUs) and
the same tensors. Where Winograd loses (small images, few channels), ddpm keeps the direct
convolution: see winograd.MIN_SIZE and MIN_CHANNELS.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from ddpm.network import winograd

# (C_in, C_out, H = W) of the CIFAR-10 U-Net's stride-1 3x3 convolutions, and two it leaves direct
SHAPES = [(128, 128, 32), (256, 128, 32), (384, 128, 32), (256, 256, 32), (128, 256, 16), (256, 256, 16), (384, 256, 16),
          (512, 256, 16), (256, 256, 8), (64, 64, 32)]


def direct(x, w, b):
    return F.conv2d(x, w, b, padding=1)


def errors(x, w, b, g):
    """Relative max error of Winograd and of oneDNN (float32) against float64: output, dX, dW."""
    def run(conv, *args):
        x_, w_, b_ = (a.detach().clone().requires_grad_() for a in args[:3])
        y = conv(x_, w_, b_)
        y.backward(args[3])
        return y.detach(), x_.grad, w_.grad

    exact = run(direct, *(a.double() for a in (x, w, b, g)))
    out = {}
    for name, conv in (("winograd", winograd.conv3x3), ("onednn", direct)):
        got = run(conv, x, w, b, g)
        out[name] = [((a.double() - e).abs().max() / e.abs().max()).item() for a, e in zip(got, exact)]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch}, median of {args.reps}\n")
    print("| C_in -> C_out @ HxW | forward direct | forward Winograd | ratio | fwd+bwd direct | fwd+bwd Winograd "
          "| ratio | rel. error Winograd (y, dX, dW) | rel. error oneDNN |")
    print("|---|---|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for c_in, c_out, s in SHAPES:
        x = torch.randn(args.batch, c_in, s, s, generator=gen).contiguous(memory_format=torch.channels_last)
        w = torch.randn(c_out, c_in, 3, 3, generator=gen) / (9 * c_in) ** 0.5
        b = torch.randn(c_out, generator=gen)
        g = torch.randn(args.batch, c_out, s, s, generator=gen).contiguous(memory_format=torch.channels_last)
        w_cl = w.contiguous(memory_format=torch.channels_last)  # oneDNN's layout for its weights

        def fwd(conv, weight):
            def f():
                with torch.no_grad():
                    conv(x, weight, b)
            return f

        def fwdbwd(conv, weight):
            xr, wr, br = (a.clone().requires_grad_() for a in (x, weight, b))

            def f():
                xr.grad = wr.grad = br.grad = None
                conv(xr, wr, br).backward(g)
            return f

        fns = {"fd": fwd(direct, w_cl), "fw": fwd(winograd.conv3x3, w), "bd": fwdbwd(direct, w_cl),
               "bw": fwdbwd(winograd.conv3x3, w)}
        times = {k: [] for k in fns}
        for f in fns.values():
            f()
        for rep in range(args.reps):
            order = list(fns) if rep % 2 == 0 else list(fns)[::-1]
            for k in order:
                t0 = time.perf_counter()
                fns[k]()
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        err = errors(x, w, b, g)
        fmt = lambda e: ", ".join(f"{v:.1e}" for v in e)  # noqa: E731
        print(f"| {c_in} -> {c_out} @ {s}x{s} | {med['fd']:.1f} ms | {med['fw']:.1f} ms | {med['fd'] / med['fw']:.2f}x "
              f"| {med['bd']:.1f} ms | {med['bw']:.1f} ms | {med['bd'] / med['bw']:.2f}x | {fmt(err['winograd'])} "
              f"| {fmt(err['onednn'])} |", flush=True)


if __name__ == "__main__":
    main()
