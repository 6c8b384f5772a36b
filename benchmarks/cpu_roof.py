"""What bounds the CIFAR-10 network's training step on this CPU: the rates of the two kernels that
hold most of its time, and what Winograd would cost in bf16.

    python benchmarks/cpu_roof.py [--threads N] [--batch 8] [--reps 7]

Per 3x3 convolution of the CIFAR-10 U-Net that ddpm runs by Winograd (C_in -> C_out at HxW,
channels_last, batch 8):
- direct: oneDNN's 3x3 convolution (what PyTorch and diffusers run), forward, in GFLOP/s of the
  direct algorithm's work, fp32 and bf16;
- products: the 36 matrix products [P x C_in] @ [C_in x C_out] of Winograd F(4x4, 3x3) as one
  torch.bmm (MKL's sgemm in fp32, oneDNN in bf16), P = batch x tiles, in GFLOP/s of their own work
  (a quarter of the direct algorithm's);
- gain: the direct convolution's time over the products' (what Winograd could at most save, before
  its tile transforms);
- the same fp32 products by oneDNN instead of MKL: 36 1x1 convolutions, or one grouped one;
- the direct convolution's backward kernels (input gradient, weight gradient), which are two thirds
  of a training step's convolution work, in GFLOP/s, fp32 and bf16.
Then one large GEMM (2048 x 512 x 512) for the BLAS's best rate here, and the rounding error, against
float64, of a bf16 convolution done directly and by Winograd F(4x4, 3x3) and F(2x2, 3x3) with bf16
products: the reason ddpm's bf16 path has no Winograd. Timings alternate, medians of --reps.
Writes benchmarks/results/cpu-roof-<date>.json and prints Markdown.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ddpm.network import winograd
from threads_bench import cpu_name  # benchmarks/ is this script's directory, so on sys.path

ROOT = Path(__file__).resolve().parent.parent
# (C_in, C_out, H = W): the CIFAR-10 U-Net's convolutions that take the Winograd path (bench_winograd.py's)
SHAPES = [(128, 128, 32), (256, 128, 32), (384, 128, 32), (256, 256, 32), (128, 256, 16), (256, 256, 16),
          (384, 256, 16), (512, 256, 16)]
F23 = {  # Lavin & Gray's F(2x2, 3x3): interpolation points 0, 1, -1, inf
    "BT": ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
    "G": ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1)),
    "AT": ((1, 1, 1, 0), (0, 1, -1, -1)),
}


def alternate(fns: list, reps: int) -> list[float]:
    """Median seconds of each of `fns`, called in turn `reps` times after two warm-up rounds."""
    for _ in range(2):
        for f in fns:
            f()
    times = [[] for _ in fns]
    for _ in range(reps):
        for i, f in enumerate(fns):
            t = time.perf_counter()
            f()
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def winograd_bf16(x: torch.Tensor, w: torch.Tensor, m: int) -> torch.Tensor:
    """A 3x3 convolution (padding 1) by Winograd F(m x m, 3x3), transforms in float64 and the products
    rounded to bf16 (bf16 inputs, float32 sums, a bf16 result: what a bf16 GEMM does)."""
    if m == 4:
        bt, g, at = (torch.tensor(t, dtype=torch.float64) for t in (winograd.BT, winograd.G, winograd.AT))
    else:
        bt, g, at = (torch.tensor(F23[k], dtype=torch.float64) for k in ("BT", "G", "AT"))
    a = m + 2
    b, c, h, wd = x.shape
    tiles = F.pad(x, (1, 1, 1, 1)).unfold(2, a, m).unfold(3, a, m)  # [B, C, nh, nw, a, a]
    v = torch.einsum("ik,bcxykl,jl->ijbxyc", bt, tiles, bt).reshape(a * a, -1, c)
    u = torch.einsum("ik,ockl,jl->ijoc", g, w, g).reshape(a * a, w.shape[0], c)
    prod = torch.bmm(v.bfloat16(), u.transpose(1, 2).bfloat16()).double()  # [a*a, P, O]
    prod = prod.view(a, a, b, h // m, wd // m, -1)
    y = torch.einsum("ri,ijbxyo,sj->bxryso", at, prod, at)
    return y.reshape(b, h, wd, -1).permute(0, 3, 1, 2)


def backward(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, which: int):
    """One of a 3x3 convolution's (padding 1) backward kernels: 0 the input's gradient, 1 the weight's."""
    return torch.ops.aten.convolution_backward(grad, x, w, None, (1, 1), (1, 1), (1, 1), False, (0, 0), 1,
                                               (which == 0, which == 1, False))


def rms_rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt()).item()


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in have]
    except OSError:
        pass
    return []


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = datetime.datetime.now(datetime.timezone.utc)
    gen = torch.Generator().manual_seed(0)
    rows, lines = [], []
    lines.append("| C_in -> C_out @ HxW | direct fp32 | products fp32 (bmm) | gain fp32 | direct bf16 | products bf16 (bmm) "
                 "| gain bf16 |")
    lines.append("|---|---|---|---|---|---|---|")
    for c_in, c_out, s in SHAPES:
        x = torch.randn(args.batch, c_in, s, s, generator=gen).contiguous(memory_format=torch.channels_last)
        w = (torch.randn(c_out, c_in, 3, 3, generator=gen) / (9 * c_in) ** 0.5).contiguous(memory_format=torch.channels_last)
        p_tiles = args.batch * (s // winograd.M) ** 2
        v = torch.randn(winograd.A ** 2, p_tiles, c_in, generator=gen)
        u = torch.randn(winograd.A ** 2, c_in, c_out, generator=gen)
        xb, wb, vb, ub = (t.bfloat16() for t in (x, w, v, u))
        with torch.no_grad():
            t = alternate([lambda: F.conv2d(x, w, padding=1), lambda: torch.bmm(v, u),
                           lambda: F.conv2d(xb, wb, padding=1), lambda: torch.bmm(vb, ub)], args.reps)
        direct_flop = 2 * args.batch * s * s * c_in * c_out * 9
        product_flop = 2 * winograd.A ** 2 * p_tiles * c_in * c_out
        r = dict(shape=[c_in, c_out, s], seconds=dict(zip(("direct_fp32", "products_fp32", "direct_bf16", "products_bf16"), t)),
                 gflops=dict(direct_fp32=direct_flop / t[0] / 1e9, products_fp32=product_flop / t[1] / 1e9,
                             direct_bf16=direct_flop / t[2] / 1e9, products_bf16=product_flop / t[3] / 1e9))
        # the products by oneDNN instead of MKL: 36 1x1 convolutions ([P x C_in] is a 1 x P image of
        # C_in channels in channels_last), or one grouped 1x1 convolution of 36 groups
        xs = [v[k].view(1, p_tiles, 1, c_in).permute(0, 3, 1, 2) for k in range(winograd.A ** 2)]
        ws = [u[k].t().contiguous().view(c_out, c_in, 1, 1) for k in range(winograd.A ** 2)]
        xg = v.transpose(0, 1).contiguous().view(1, p_tiles, 1, -1).permute(0, 3, 1, 2)
        wg = torch.cat(ws)
        with torch.no_grad():
            t_alt = alternate([lambda: torch.bmm(v, u), lambda: [F.conv2d(a, b) for a, b in zip(xs, ws)],
                               lambda: F.conv2d(xg, wg, groups=winograd.A ** 2)], args.reps)
        r["gflops"].update(products_fp32_bmm_again=product_flop / t_alt[0] / 1e9,
                           products_fp32_onednn_1x1=product_flop / t_alt[1] / 1e9,
                           products_fp32_onednn_grouped=product_flop / t_alt[2] / 1e9)
        # the backward kernels of the direct convolution (each the forward's work)
        gy = torch.randn(args.batch, c_out, s, s, generator=gen).contiguous(memory_format=torch.channels_last)
        gyb = gy.bfloat16()
        with torch.no_grad():
            t_bwd = alternate([lambda: backward(gy, x, w, 0), lambda: backward(gy, x, w, 1),
                               lambda: backward(gyb, xb, wb, 0), lambda: backward(gyb, xb, wb, 1)], args.reps)
        r["gflops"].update(zip(("input_grad_fp32", "weight_grad_fp32", "input_grad_bf16", "weight_grad_bf16"),
                               (direct_flop / t / 1e9 for t in t_bwd)))
        rows.append(r)
        g = r["gflops"]
        lines.append(f"| {c_in} -> {c_out} @ {s}x{s} | {t[0] * 1e3:.2f} ms, {g['direct_fp32']:.0f} GFLOP/s | "
                     f"{t[1] * 1e3:.2f} ms, {g['products_fp32']:.0f} GFLOP/s | {t[0] / t[1]:.2f}x | "
                     f"{t[2] * 1e3:.2f} ms, {g['direct_bf16']:.0f} GFLOP/s | {t[3] * 1e3:.2f} ms, "
                     f"{g['products_bf16']:.0f} GFLOP/s | {t[2] / t[3]:.2f}x |")
    lines += ["", "The fp32 products by other kernels (GFLOP/s, alternating with `bmm` again):", "",
              "| C_in -> C_out @ HxW | bmm (MKL) | 36 1x1 convolutions (oneDNN) | one grouped 1x1 convolution (oneDNN) |",
              "|---|---|---|---|"]
    for r in rows:
        g = r["gflops"]
        lines.append(f"| {r['shape'][0]} -> {r['shape'][1]} @ {r['shape'][2]}x{r['shape'][2]} | {g['products_fp32_bmm_again']:.0f} | "
                     f"{g['products_fp32_onednn_1x1']:.0f} | {g['products_fp32_onednn_grouped']:.0f} |")
    lines += ["", "The direct convolution's backward kernels (oneDNN, channels_last; GFLOP/s of the direct algorithm's "
              "work, the same as the forward's), beside its forward from the first table:", "",
              "| C_in -> C_out @ HxW | forward fp32 | input grad fp32 | weight grad fp32 | forward bf16 | input grad bf16 "
              "| weight grad bf16 |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        g = r["gflops"]
        lines.append(f"| {r['shape'][0]} -> {r['shape'][1]} @ {r['shape'][2]}x{r['shape'][2]} | " + " | ".join(
            f"{g[k]:.0f}" for k in ("direct_fp32", "input_grad_fp32", "weight_grad_fp32", "direct_bf16",
                                     "input_grad_bf16", "weight_grad_bf16")) + " |")
    a, b = torch.randn(2048, 512, generator=gen), torch.randn(512, 512, generator=gen)
    big = alternate([lambda: torch.mm(a, b), lambda: torch.mm(a.bfloat16(), b.bfloat16())], args.reps)
    big_gflops = [2 * 2048 * 512 * 512 / t / 1e9 for t in big]

    # bf16 rounding: a bf16 input and kernel, the exact (float64) convolution of them as reference
    x = torch.randn(args.batch, 128, 32, 32, generator=gen).bfloat16().double()
    w = (torch.randn(128, 128, 3, 3, generator=gen) / (9 * 128) ** 0.5).bfloat16().double()
    exact = F.conv2d(x, w, padding=1)
    errors = dict(direct_bf16=rms_rel(F.conv2d(x.bfloat16(), w.bfloat16(), padding=1), exact),
                  winograd_f43_bf16=rms_rel(winograd_bf16(x, w, 4), exact),
                  winograd_f23_bf16=rms_rel(winograd_bf16(x, w, 2), exact),
                  winograd_f43_fp32=rms_rel(winograd.conv3x3(x.float(), w.float()), exact))
    text = "\n".join(lines) + (
        f"\n\nOne large GEMM (2048 x 512 x 512): fp32 {big_gflops[0]:.0f} GFLOP/s, bf16 {big_gflops[1]:.0f} GFLOP/s.\n\n"
        f"RMS error of a 128 -> 128 convolution at 32x32 against float64, relative to the output's RMS: direct bf16 "
        f"{errors['direct_bf16']:.2e}; Winograd F(4x4, 3x3) with bf16 products {errors['winograd_f43_bf16']:.2e} "
        f"({errors['winograd_f43_bf16'] / errors['direct_bf16']:.0f}x); F(2x2, 3x3) with bf16 products "
        f"{errors['winograd_f23_bf16']:.2e} ({errors['winograd_f23_bf16'] / errors['direct_bf16']:.1f}x); ddpm's fp32 "
        f"F(4x4, 3x3) {errors['winograd_f43_fp32']:.2e}.")
    record = dict(command=" ".join(["python benchmarks/cpu_roof.py", *(argv if argv is not None else sys.argv[1:])]),
                  date=started.isoformat(timespec="seconds"),
                  machine=dict(cpu=cpu_name(), flags=cpu_flags(), cpus=os.cpu_count(), threads=torch.get_num_threads(),
                               torch=torch.__version__, capability=torch.backends.cpu.get_cpu_capability()),
                  batch=args.batch, reps=args.reps, shapes=rows, big_gemm_gflops=dict(fp32=big_gflops[0], bf16=big_gflops[1]),
                  bf16_errors=errors, markdown=text)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"cpu-roof-{started:%Y%m%d-%H%M}.json"
    out.write_text(json.dumps(record, indent=1))
    m = record["machine"]
    print(f"{started:%Y-%m-%d %H:%M} UTC · `{record['command']}` · {m['cpu']} ({', '.join(m['flags'])}), "
          f"{m['threads']} threads · torch {m['torch']} ({m['capability']})\n\n{text}\n\nwritten: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
