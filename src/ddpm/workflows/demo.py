"""`make demo`: train the `demo` preset on the embedded Fashion-MNIST subset, then sample it.

Writes, in the run directory: checkpoints, metrics.jsonl, `samples.png` (64 EMA samples,
Algorithm 2 with T = 1000) and `progressive.png` (the predicted x̂_0 along the chains of 8 of
them, Fig. 6 of the paper: coarse shapes first, details last).
"""

from __future__ import annotations

import sys
import time

import torch

from ..errors import UserError
from ..io.images import make_grid, write_png
from ..process.scaling import to_uint8
from ..run.config import RunConfig
from ..run.folder import claim_run_folder
from ..run.load import load_run
from .experiments import progressive_figure, progressive_generation
from .train import train

PROGRESSIVE_TIMES = (1000, 800, 600, 400, 300, 200, 150, 100, 50, 1)  # the paper's t
STRIP_CHAINS = 8


def run_demo(out="runs/demo", steps: int | None = None, n: int = 64, progress: bool = True, seed: int = 0) -> dict:
    out = claim_run_folder(out)  # a folder that cannot be a run is one line before anything else
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"--n {n}: give the number of samples to draw, at least 1")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    run = RunConfig.from_preset("demo")
    if steps is not None:
        run = run.replace(train=run.train.replace(steps=steps))
    t0 = time.perf_counter()
    res = train(out, run, progress=progress)
    t_train = time.perf_counter() - t0
    print(f"demo: training took {t_train / 60:.1f} min", file=sys.stderr)

    loaded = load_run(out, "ema", fast="auto")
    t1 = time.perf_counter()
    # the n samples, keeping x̂_0 along every chain at PROGRESSIVE_TIMES (Fig. 6)
    gen = progressive_generation(loaded.model, loaded.diffusion, loaded.shape, PROGRESSIVE_TIMES, n, seed, "cpu",
                                 progress=progress)
    t_sample = time.perf_counter() - t1
    samples = write_png(make_grid(to_uint8(gen["samples"]), nrow=8), out / "samples.png")
    strip = dict(gen, pred_x0=gen["pred_x0"][:STRIP_CHAINS])  # rows: 8 chains; columns: t = 1000 … 1
    prog = write_png(progressive_figure(strip), out / "progressive.png")
    print(f"demo: sampling {n} images (T={loaded.diffusion.num_timesteps}) took {t_sample / 60:.1f} min; "
          f"wrote {samples} and {prog}", file=sys.stderr)
    return dict(train_seconds=t_train, sample_seconds=t_sample, samples=str(samples), progressive=str(prog), **res)
