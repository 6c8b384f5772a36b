"""Sampling on top of `GaussianDiffusion.reverse_loop`: per-image seeds, samplers, image files.

Image i of a run always comes from seed (S, i): its x_T and every z of Algorithm 2 are drawn
from a generator of its own, so a sample set does not depend on the batch size, the number of
processes, or which images were already written.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
import math
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..io.atomic import write_json, write_npz_rows
from ..io.images import make_grid, read_png, write_png
from ..io.progress import progress_bar
from ..process.scaling import to_uint8
from ..process.diffusion import GaussianDiffusion
from ..io.distributed import derive_seed
from ..errors import UserError, check_choice
from ..network.fast import PrefetchNoise

SAMPLERS = ("ancestral", "ddim")
DDIM_SPACINGS = ("uniform", "trailing", "quad")


class ImageNoise:
    """`noise_fn` for the reverse loop: row b of every draw comes from image indices[b]'s own RNG.

    The generators are CPU generators whatever the device, so image i is the same on CPU and GPU.
    """

    def __init__(self, seed: int, indices: Sequence[int], device, dtype=torch.float32):
        self.gens = [torch.Generator().manual_seed(derive_seed(seed, int(i))) for i in indices]
        self.device, self.dtype = torch.device(device), dtype

    def __call__(self, shape) -> torch.Tensor:
        assert shape[0] == len(self.gens), (shape, len(self.gens))
        out = torch.stack([torch.randn(tuple(shape[1:]), generator=g) for g in self.gens])
        return out.to(self.device, self.dtype, non_blocking=True)


def ddim_timesteps(T: int, S: int, spacing: str = "uniform") -> list[int]:
    """S code indices for DDIM, descending.

    'uniform': 0, T/S, 2T/S, … (the DDIM paper's CIFAR-10 choice; diffusers' "leading");
    'trailing': T-1, T-1-T/S, … (starts at the last step, so x_T is the true prior's);
    'quad': quadratic spacing, denser near t = 0 (the DDIM paper's other choice).
    """
    check_choice("ddim spacing", spacing, DDIM_SPACINGS)
    if not 1 <= S <= T:
        raise UserError(f"DDIM steps={S} must be between 1 and T={T}")
    if spacing == "uniform":
        ts = np.arange(0, T, T // S)[:S]
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / S)).astype(np.int64) - 1
    else:
        ts = np.unique((np.linspace(0, math.sqrt(T * 0.8), S) ** 2).astype(np.int64))
    return sorted({int(t) for t in ts}, reverse=True)


def sample(model, diffusion: GaussianDiffusion, shape, *, seed: int, indices: Sequence[int], device,
           sampler: str = "ancestral", ddim_steps: int = 50, ddim_eta: float = 0.0, ddim_spacing: str = "uniform",
           clip_denoised: bool = True, progress: bool = False, callback: Optional[Callable] = None,
           prefetch_noise: Optional[bool] = None) -> torch.Tensor:
    """Samples for `indices` (one image each) in [-1, 1], float [len(indices), C, H, W].

    :param shape: (C, H, W) of one image.
    :param prefetch_noise: draw the per-image noise on a background thread, ahead of the loop
        (`ddpm.network.fast.PrefetchNoise`), so a GPU never waits for the CPU's generators; the same
        numbers either way. None: on for CUDA, off for the CPU (where the thread would only
        compete with the network for the cores).
    """
    check_choice("sampler", sampler, SAMPLERS)
    device = torch.device(device)
    if sampler == "ancestral":
        ts, step = range(diffusion.num_timesteps - 1, -1, -1), diffusion.ancestral_step(clip_denoised)
    else:
        ts, step = ddim_timesteps(diffusion.num_timesteps, ddim_steps, ddim_spacing), diffusion.ddim(ddim_eta, clip_denoised)
    prefetch = device.type == "cuda" if prefetch_noise is None else prefetch_noise
    noise = ImageNoise(seed, indices, "cpu" if prefetch else device)
    x_T = noise(torch.Size((len(indices), *shape))).to(device)
    if prefetch:
        noise = PrefetchNoise(noise, device, limit=len(ts))
    try:
        return diffusion.reverse_loop(model, x_T, ts, step, noise_fn=noise, progress=progress, callback=callback)
    finally:
        if prefetch:
            noise.close()


# ---------------------------------------------------------------------------------------------
# Partial chains: the forward process to x_t, and the reverse process from x_t (paper indexing)
# ---------------------------------------------------------------------------------------------


def check_paper_t(t: int, T: int, what: str = "t") -> int:
    """A paper timestep t in 0 … T (t diffusion steps; 0 = the clean image)."""
    if isinstance(t, bool) or int(t) != t or not 0 <= int(t) <= T:
        raise UserError(f"{what}={t!r} must be an integer from 0 (no noise) to T={T} (pure noise)")
    return int(t)


def diffuse(diffusion: GaussianDiffusion, x0: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
    """x_t ~ q(x_t | x_0) (eq. 4) at paper time t (code index t-1); t = 0 returns x_0 itself."""
    t = check_paper_t(t, diffusion.num_timesteps)
    if t == 0:
        return x0
    return diffusion.q_sample(x0, torch.full((x0.shape[0],), t - 1, device=x0.device, dtype=torch.long), noise)


def denoise_from(model, diffusion: GaussianDiffusion, x_t: torch.Tensor, t: int, noise_fn, *, clip_denoised: bool = True,
                 progress: bool = False, callback: Optional[Callable] = None) -> torch.Tensor:
    """Algorithm 2 started at paper time t instead of T: the t ancestral steps x_t -> x_0
    (code indices t-1 … 0) of the one reverse loop. t = 0 returns x_t (no steps)."""
    t = check_paper_t(t, diffusion.num_timesteps)
    return diffusion.reverse_loop(model, x_t, range(t - 1, -1, -1), diffusion.ancestral_step(clip_denoised),
                                  noise_fn=noise_fn, progress=progress, callback=callback)


# ---------------------------------------------------------------------------------------------
# A sample set on disk: one PNG per image, resumable, split over processes
# ---------------------------------------------------------------------------------------------

SAMPLES_META = "sampling.json"


def png_name(i: int) -> str:
    return f"{i:06d}.png"


def _read_sample(path: Path, shape) -> Optional[np.ndarray]:
    """uint8 HWC pixels of a sample PNG, or None when missing or unreadable. A readable PNG of
    another shape is an error: the directory holds another model's samples."""
    a = read_png(path)
    c, h, w = shape
    if a is not None and a.shape != (h, w, c):
        raise UserError(f"{path}: holds a {a.shape[1]}x{a.shape[0]}x{a.shape[2]} image, but this model makes "
                        f"{w}x{h}x{c}; write to another --out directory")
    return a


def _existing_indices(out_dir: Path, n: int, shape) -> set[int]:
    # PIL releases the GIL while decoding, so a few threads check 50,000 files several times faster.
    with ThreadPoolExecutor(4) as pool:
        ok = pool.map(lambda i: _read_sample(out_dir / png_name(i), shape) is not None, range(n))
        return {i for i, good in enumerate(ok) if good}


def shard(indices: Sequence[int], rank: int, world_size: int) -> list[int]:
    """This process's share of `indices`: every world_size-th one, starting at its rank. The
    shares of ranks 0 … world_size-1 cover `indices` exactly once."""
    return list(indices)[rank::world_size]


def check_settings(path, meta: dict) -> None:
    """Refuse to mix results made with other settings into one directory: compare `meta` with the
    settings recorded at `path` by an earlier run, or record them there."""
    path = Path(path)
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [k for k in [*meta, *(k for k in old if k not in meta)] if old.get(k) != meta.get(k)]
        if diff:
            k = diff[0]
            raise UserError(f"{path}: the files here were made with {k}={old.get(k)!r}, now {meta.get(k)!r}; "
                            f"rerun with the same settings to resume, or write to another --out directory")
    else:
        write_json(path, meta)


def sample_to_dir(model, diffusion: GaussianDiffusion, out_dir, n: int, batch: int, seed: int, shape, dist=None, *,
                  device=None, progress: bool = True, model_tag: str = "", grid_n: int = 64, **sampler_opts) -> dict:
    """Draw samples 0 … n-1 into `out_dir`: `000000.png` …, `samples.npz` (uint8 NHWC "x" and
    "indices") and `grid.png` (the first `grid_n`). Run it again to resume.

    Image i always comes from seed (seed, i) (see `ImageNoise`), whatever `batch` or the number of
    processes. Indices whose PNG exists and is readable are skipped; the missing ones are split
    over the processes of `dist` (`shard`: strided by rank, no gap, no duplicate), each process
    drawing `batch` images at a time; rank 0 then writes the .npz and the grid.

    :param model: any callable `model(x_t, t)` (e.g. the EMA network from `train.load_run`).
    :param shape: (C, H, W) of one image.
    :param dist: a `distributed.DistInfo` (default: one process).
    :param model_tag: recorded in `sampling.json` with the seed and sampler settings; a rerun with
        different ones is refused rather than mixed into the same directory.
    :param sampler_opts: `sample`'s options: sampler, ddim_steps, ddim_eta, ddim_spacing, clip_denoised.
    :return: dict(out_dir, n, generated (by all processes), skipped, npz, grid).
    """
    from ..io.distributed import DistInfo, barrier, broadcast_object

    if isinstance(n, bool) or int(n) != n or n < 1:
        raise UserError(f"n={n!r}: give the number of samples to draw, at least 1")
    if isinstance(batch, bool) or int(batch) != batch or batch < 1:
        raise UserError(f"batch={batch!r}: give a batch size of at least 1")
    opts = dict(sampler="ancestral", ddim_steps=50, ddim_eta=0.0, ddim_spacing="uniform", clip_denoised=True)
    unknown = sorted(set(sampler_opts) - set(opts))
    if unknown:
        raise TypeError(f"sample_to_dir: unknown sampler option(s) {unknown}; valid: {sorted(opts)}")
    opts.update(sampler_opts)
    check_choice("sampler", opts["sampler"], SAMPLERS)
    if opts["sampler"] == "ddim":
        ddim_timesteps(diffusion.num_timesteps, opts["ddim_steps"], opts["ddim_spacing"])  # validates
    dist = dist or DistInfo()
    device = torch.device(device) if device is not None else dist.device
    out_dir = Path(out_dir)
    shape = tuple(int(s) for s in shape)
    n, batch = int(n), int(batch)

    todo = None
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        meta = dict(seed=int(seed), shape=list(shape), T=diffusion.num_timesteps, model=model_tag, **opts)
        if opts["sampler"] == "ancestral":  # the DDIM settings do not matter then
            for k in ("ddim_steps", "ddim_eta", "ddim_spacing"):
                meta.pop(k)
        check_settings(out_dir / SAMPLES_META, meta)
        have = _existing_indices(out_dir, n, shape)
        todo = [i for i in range(n) if i not in have]
    todo = broadcast_object(todo, dist)
    mine = shard(todo, dist.rank, dist.world_size)

    bar = progress_bar(len(mine), desc="sampling", unit="img", enabled=progress and dist.is_main)
    for start in range(0, len(mine), batch):
        idx = mine[start:start + batch]
        x = sample(model, diffusion, shape, seed=seed, indices=idx, device=device, progress=progress and dist.is_main, **opts)
        pics = to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()
        for i, pic in zip(idx, pics):
            write_png(pic, out_dir / png_name(i))
        bar.update(len(idx))
    bar.close()
    barrier()

    npz_path, grid_path = out_dir / "samples.npz", out_dir / "grid.png"
    if dist.is_main:
        c, h, w = shape

        def rows():
            for i in range(n):
                a = _read_sample(out_dir / png_name(i), shape)
                if a is None:
                    raise UserError(f"{out_dir / png_name(i)}: missing or unreadable after sampling; run the same command again")
                yield a

        write_npz_rows(npz_path, {"indices": np.arange(n, dtype=np.int64)}, (n, h, w, c), rows())
        first = np.stack([_read_sample(out_dir / png_name(i), shape) for i in range(min(grid_n, n))])
        write_png(make_grid(torch.from_numpy(first).permute(0, 3, 1, 2), nrow=8), grid_path)
    barrier()
    return dict(out_dir=str(out_dir), n=n, generated=len(todo), skipped=n - len(todo), npz=str(npz_path), grid=str(grid_path))
