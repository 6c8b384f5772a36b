"""`make demo`: train the `demo` preset on the embedded Fashion-MNIST subset, then sample it.

The preset is a class-conditional model (docs/MATH.md § Classes and guidance) at 16x16 with
T = 100, sized to finish in about five minutes on 2 CPU cores. Writes, in the run directory:
checkpoints, metrics.jsonl, `samples.png` (one row per class: N EMA samples each, Algorithm 2
over all T steps, not respaced, guided with weight w, in the precision the run trained in) and `progressive.png` (x̂_0 predicted along
the chain of the first sample of each class, Fig. 6 of the paper: coarse shapes first, details last),
then `report.html` (`ddpm report`: the curves, the pictures and the config in one page).
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch

from ..errors import UserError
from ..io.images import make_class_grid, write_png
from ..process.scaling import to_uint8
from ..run.config import RunConfig
from ..run.folder import check_run_folder
from ..run.load import load_run
from .experiments import progressive_figure, progressive_generation
from .report import write_report
from .sample import Images
from .train import train

GUIDANCE = 3.0  # classifier-free guidance weight of the demo's samples (1: plain conditional)


def progressive_times(T: int, n: int = 10) -> list[int]:
    """The paper's Fig. 6 times 1000, 800, 600, 400, 300, 200, 150, 100, 50, 1, scaled to T."""
    paper = (1000, 800, 600, 400, 300, 200, 150, 100, 50, 1)
    return sorted({max(1, round(t * T / 1000)) for t in paper[:n]}, reverse=True)


def run_demo(out="runs/demo", steps: int | None = None, n: int = 6, progress: bool = True, seed: int = 0) -> dict:
    """Train the demo, then draw `n` samples of each class and the progressive strip.
    -> dict(train_seconds, sample_seconds, samples, progressive, step, loss, run_dir)."""
    out = check_run_folder(out)  # a folder that cannot be a run is one line before anything else; train claims it
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"--n {n}: give the number of samples of each class to draw, at least 1")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    run = RunConfig.from_preset("demo")
    if steps is not None:
        run = run.replace(train=run.train.replace(steps=steps))
    t0 = time.perf_counter()
    res = train(out, run, progress=progress)
    t_train = time.perf_counter() - t0
    print(f"demo: training took {t_train / 60:.1f} min", file=sys.stderr)

    loaded = load_run(out, "ema", fast="auto", precision=run.train.precision)  # sampled as it was trained
    K, T = loaded.run.model.num_classes, loaded.diffusion.num_timesteps
    labels = torch.arange(K).repeat_interleave(n)  # class by class: image k·n + j is sample j of class k
    t1 = time.perf_counter()
    gen = progressive_generation(loaded.model, loaded.diffusion, loaded.shape, progressive_times(T),
                                 Images(seed, range(K * n), labels, GUIDANCE), device="cpu", progress=progress)
    t_sample = time.perf_counter() - t1
    samples = write_png(make_class_grid(to_uint8(gen["samples"]), labels, per_row=n), out / "samples.png")
    first = np.arange(K) * n  # the first sample of each class: one chain per row
    prog = write_png(progressive_figure(dict(gen, pred_x0=gen["pred_x0"][first])), out / "progressive.png")
    print(f"demo: sampling {K} x {n} images (Algorithm 2, all T = {T} steps, guidance {GUIDANCE:g}, "
          f"{loaded.precision.value}) took "
          f"{t_sample / 60:.1f} min; wrote {samples} and {prog}", file=sys.stderr)
    report = write_report(out)
    print(f"demo: the run's report: {report}", file=sys.stderr)
    return dict(train_seconds=t_train, sample_seconds=t_sample, samples=str(samples), progressive=str(prog),
                report=str(report), **res)
