"""Peak memory and time of one training step with each memory option on and off.

    python benchmarks/memory_bench.py                     # the CPU table in BENCHMARKS.md
    python benchmarks/memory_bench.py --device cuda       # the same on a GPU (max_memory_allocated)

Each configuration runs in a fresh process: the preset's U-Net (fp32, eager, no fast paths, so
that only the option differs) and Adam, one warm-up step (Adam's moments are allocated there),
then steps measured one by one. "peak" is the rise of memory over one step above what the
process holds between steps (weights, gradients, Adam's moments): on the CPU the peak resident set
(VmHWM reset through /proc/self/clear_refs after malloc_trim, as benchmarks/bench.py measures), on
CUDA torch.cuda.max_memory_allocated. That rise is the step's activations and temporaries: what
checkpointing and micro-batches act on. Time is the median step.

A step is the training step of ddpm.workflows.train without its bookkeeping: L_simple on the
global batch (random images, t and ε from a fixed seed), backward (in micro-batches when asked,
gradients accumulated), clipping, Adam. Checkpointing is network/memory.set_checkpointing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import machine, peak_memory_mib  # noqa: E402  (the one peak-memory measurement)

from ddpm.network.memory import set_checkpointing  # noqa: E402
from ddpm.network.unet import UNet  # noqa: E402
from ddpm.process.diffusion import GaussianDiffusion  # noqa: E402
from ddpm.run.config import RunConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# (preset, global batch, option): the CPU set, small batches so that it runs in minutes on 2 cores.
CPU_CASES = [("cifar10", 8, "plain"), ("cifar10", 8, "checkpointing"), ("cifar10", 8, "microbatch=1"),
             ("cifar10", 1, "plain"),
             ("lsun_church256", 2, "plain"), ("lsun_church256", 2, "checkpointing"),
             ("lsun_church256", 2, "microbatch=1"), ("lsun_church256", 1, "plain")]


def child(preset: str, batch: int, option: str, device: str, steps: int) -> dict:
    dev = torch.device(device)
    run = RunConfig.from_preset(preset)
    model = UNet.from_config(run.model).to(dev).train()
    if option == "checkpointing":
        set_checkpointing(model, True)
    micro = int(option.split("=")[1]) if option.startswith("microbatch=") else batch
    diffusion = GaussianDiffusion.from_config(run.diffusion)
    opt = torch.optim.Adam(model.parameters(), lr=run.train.lr)
    c, (h, w) = run.model.in_channels, run.model.size
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(batch, c, h, w, generator=g) * 2 - 1).to(dev)
    t = (1 + torch.randint(0, diffusion.num_timesteps, (batch,), generator=g)).to(dev)
    noise = torch.randn(batch, c, h, w, generator=g).to(dev)

    def step():
        opt.zero_grad(set_to_none=True)
        for a in range(0, batch, micro):
            part = slice(a, a + micro)
            (diffusion.training_losses(model, x0[part], t[part], noise[part])["loss"].sum() / batch).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()

    step()  # warm-up: Adam's moments
    peaks, times = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        peaks.append(peak_memory_mib(step, dev))
        times.append(time.perf_counter() - t0)
    return dict(preset=preset, batch=batch, option=option, peak_mib=min(peaks), step_s=statistics.median(times),
                parameters=sum(p.numel() for p in model.parameters()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=2, help="measured steps per configuration")
    p.add_argument("--child", nargs=3, metavar=("PRESET", "BATCH", "OPTION"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.child[2], args.device, args.steps)))
        return
    rows = []
    for preset, batch, option in CPU_CASES:
        r = subprocess.run([sys.executable, __file__, "--device", args.device, "--steps", str(args.steps), "--child",
                            preset, str(batch), option], capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(r.stderr[-3000:])
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"memory-{args.device}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(dict(command=" ".join([Path(sys.executable).name] + sys.argv),
                                   machine=machine(torch.device(args.device)), rows=rows), indent=2))
    print(f"wrote {out}", file=sys.stderr)
    print("| preset | global batch | option | step's peak rise | vs plain | step time | vs plain |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        base = next(b for b in rows if (b["preset"], b["batch"], b["option"]) == (r["preset"], r["batch"], "plain"))
        print(f"| {r['preset']} | {r['batch']} | {r['option']} | {r['peak_mib']:,.0f} MiB | "
              f"{base['peak_mib'] / r['peak_mib']:.2f}x less | {r['step_s']:.2f} s | {r['step_s'] / base['step_s']:.2f}x |")


if __name__ == "__main__":
    main()
