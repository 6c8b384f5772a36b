"""What each few-step solver costs besides the network, against diffusers' scheduler, in one run.

    python benchmarks/solver_overhead.py [--batch 64] [--size 32] [--steps 50] [--reps 7]

The network is a closed-form ε (Gaussian data, as tests/gaussian_oracle.py), a few element-wise
operations, so the time per step is the solver's own work: its updates, the x̂_0 conversion, and
for ddpm the per-image noise the loop draws. Both sides run the same grid (trailing, which
diffusers' `set_timesteps` makes too) on the same input, alternately, the order rotating every
repetition; each figure is the median. Prints one line per solver and writes nothing.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from gaussian_oracle import PAPER_BETAS, oracle_for  # noqa: E402

import diffusers  # noqa: E402

from ddpm import GaussianDiffusion  # noqa: E402
from ddpm.process.sampling import SamplerSpec  # noqa: E402
from ddpm.workflows.sample import ImageNoise  # noqa: E402

SCHEDULERS = {
    "dpm++2m": lambda: diffusers.DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", **COMMON),
    "dpm++2m-sde": lambda: diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", **COMMON),
    "unipc": lambda: diffusers.UniPCMultistepScheduler(solver_type="bh2", **COMMON),
    "heun": lambda: diffusers.HeunDiscreteScheduler(trained_betas=PAPER_BETAS, timestep_spacing="trailing"),
}
COMMON = dict(trained_betas=PAPER_BETAS, timestep_spacing="trailing", solver_order=2, final_sigmas_type="zero")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--steps", type=int, default=50, help="network evaluations")
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args()
    d, model = GaussianDiffusion(PAPER_BETAS), oracle_for()
    shape = (args.batch, 3, args.size, args.size)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, diffusers "
          f"{diffusers.__version__}, {torch.get_num_threads()} threads, batch {shape}, {args.steps} NFE, "
          f"{time.strftime('%Y-%m-%d')}")
    for name, make in SCHEDULERS.items():
        spec = SamplerSpec(name, steps=args.steps, spacing="trailing", clip_denoised=False)
        times, step = spec.chain(d)
        noise = ImageNoise(1, range(args.batch), "cpu")

        def ours():
            return d.reverse_loop(model, x_T, times, step, noise_fn=noise)

        def theirs():
            s = make()
            s.set_timesteps(len(times) - 1)
            x = x_T * s.init_noise_sigma if name == "heun" else x_T
            for k in s.timesteps:
                x = s.step(model(s.scale_model_input(x, k), torch.full((args.batch,), int(k) + 1)), k, x).prev_sample
            return x

        timed = {"ddpm": [], "diffusers": []}
        for rep in range(args.reps + 1):
            order = [("ddpm", ours), ("diffusers", theirs)][:: 1 if rep % 2 else -1]
            for label, fn in order:
                t0 = time.perf_counter()
                fn()
                if rep:  # the first repetition warms up
                    timed[label].append(time.perf_counter() - t0)
        evals = spec.nfe(times)
        a, b = (statistics.median(timed[k]) * 1000 / evals for k in ("ddpm", "diffusers"))
        print(f"{name:12s} ddpm {a:6.2f} ms/NFE   diffusers {b:6.2f} ms/NFE   ratio {b / a:.2f}x   "
              f"(spread ddpm {np.ptp(timed['ddpm']) / statistics.median(timed['ddpm']):.0%})")


if __name__ == "__main__":
    main()
