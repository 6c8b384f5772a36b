"""Bits/dim of the true bound on a test set, and progressive lossy compression (§4.2–4.3).

- `evaluate_nll`: bits/dim of the true bound (eq. 5) per test image, with its parts, resumable.
- `rate_distortion`: progressive lossy compression (§4.3, Fig. 5) from `evaluate_nll`'s terms.

A class-conditional model's bits/dim are those of log p(x | c), each image with its true class.
Time is the paper's t (docs/MATH.md § Time and indexing). The noise of image i comes from a
generator seeded by (seed, i), so results do not depend on the batch size or the number of
processes.
"""

from __future__ import annotations

import csv
import hashlib
import math
import zipfile
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np
import torch

from ..config import MAX_BATCH, check_count
from ..errors import UserError
from ..io.atomic import atomic_file, write_bytes, write_json, write_npz
from ..io.data import DataConfig
from ..io.prepared import open_data
from ..io.distributed import DistInfo, barrier, broadcast_object, check_seed, is_main_process, shard
from ..io.folders import check_folder, claim_folder, usable_folder
from ..io.images import CHANNEL_MODES, figure_png
from ..io.progress import loop_progress, progress_bar
from ..io.results import Provenance, check_settings
from ..process.diffusion import GaussianDiffusion
from ..network.unet import UNetConfig
from ..process.guidance import conditioned
from ..process.scaling import to_model_range
from ..process.sampling import SamplerSpec
from ..run.load import ModelSpec
from .sample import ImageNoise, num_classes_of


# ---------------------------------------------------------------------------------------------
# Bits/dim (eq. 5) on a test set
# ---------------------------------------------------------------------------------------------

NLL_META = "nll.json"
RD_RECORDS, RD_WHAT = (NLL_META,), "a rate-distortion curve"  # into an nll folder, or its own


class NLLImages(NamedTuple):
    """Images whose bits/dim `evaluate_nll` computes: uint8 [N, C, H, W] (tensor or array) in
    {0 … 255}, `batch` at a time per process (and per saved part); the noise of image i from seed
    (seed, i); for a class-conditional model their classes, int64 [N] (required there: the bound
    is then that of log p(x | c))."""

    images: Any
    batch: int
    seed: int
    labels: Optional[torch.Tensor] = None


def evaluate_nll(model, diffusion: GaussianDiffusion, out_dir, test: NLLImages, *, dist: Optional[DistInfo] = None,
                 progress: bool = True, provenance: Provenance = Provenance(),
                 clip_denoised: bool = SamplerSpec.clip_denoised) -> dict:
    """Bits/dim of the true variational bound L_T + Σ_{t>1} L_{t-1} + L_0 (eq. 5) for each image.

    As the official code (`calc_bpd_loop`): each term with fresh noise, x̂_0 clipped to [-1, 1].
    The noise of image i comes from seed (seed, i), so results do not depend on `batch` or the
    number of processes. Each finished batch is saved to `out_dir/parts/batch-{first:06d}.npz`
    (atomically) and skipped when the function runs again; the processes of `dist` take disjoint
    batches and rank 0 merges. Writes into `out_dir`:

    - `summary.json`: means over images (bits/dim) of the total and of its parts: the prior L_T
      (`prior_bpd`), the decoder L_0 (`decoder_bpd`, from x_1) and L_1 + … + L_{T-1}
      (`diffusion_bpd`, from x_2 … x_T); total = prior + decoder + diffusion.
    - `per_image.csv`: the same four numbers per image.
    - `per_t.csv`: per t = 1 … T, the mean of the term L_{t-1} computed from x_t (bits/dim), and
      of the ε and x̂_0 squared errors there.
    - `bpd.npz`: the arrays (indices, total_bpd [N], prior_bpd [N], vb/mse/x0_mse [N, T]).

    :param test: the images, their batch, seed and labels (`NLLImages`).
    :param provenance: which model (`Provenance`), recorded with the seed in `nll.json`; a rerun
        with other settings is refused.
    :return: the summary dict (on every rank).
    """
    images, batch, seed, labels = test
    images = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise UserError(f"images must be uint8 [N, C, H, W], got {images.dtype} {list(images.shape)}")
    N, T = int(images.shape[0]), diffusion.num_timesteps
    if N < 1:
        raise UserError("no images to evaluate; give a data set with at least one image")
    if isinstance(batch, bool) or int(batch) != batch or batch < 1:
        raise UserError(f"batch={batch!r}: give a batch size of at least 1")
    check_count(int(batch), "batch", MAX_BATCH)
    K = num_classes_of(model)
    if K and labels is None:
        raise UserError("bits/dim of a class-conditional model are those of log p(x | c): they need the images' "
                        "labels; give labelled test data (the same kind of source as for training)")
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.shape != (N,):
            raise UserError(f"{tuple(labels.shape)} labels for {N} images; give one label per image")
    conditioned(model, labels, K)  # an unconditional model given labels: one line
    seed = check_seed(seed)  # before nll.json records it
    dist = dist or DistInfo()
    device = dist.device
    out_dir = usable_folder(out_dir)
    parts = out_dir / "parts"

    batches = None
    if dist.is_main:
        settings = dict(seed=int(seed), T=T, clip_denoised=bool(clip_denoised), shape=list(images.shape[1:]), model=provenance.tag)
        if labels is not None:
            settings["conditional_on"] = "each image's label: log p(x | c)"
        check_settings(out_dir / NLL_META, settings, provenance.recorded, what="bits/dim")
        parts.mkdir(exist_ok=True)
        covered = set()
        for f, part in _read_parts(parts):
            inside = part["indices"] < N  # an earlier run may have had more images
            idx = part["indices"][inside]
            if not np.array_equal(part["digest"][inside], _digests(images[torch.from_numpy(idx)])):
                raise UserError(f"{f}: was computed on other images than these; write to another --out directory")
            covered.update(int(i) for i in idx)
        todo = [i for i in range(N) if i not in covered]
        batches = [todo[k:k + int(batch)] for k in range(0, len(todo), int(batch))]
    batches = broadcast_object(batches, dist)
    mine = shard(batches, dist.rank, dist.world_size)

    bar = progress_bar(sum(len(b) for b in mine), desc="bits/dim", unit="img", enabled=progress and dist.is_main)
    for idx in mine:
        x0 = to_model_range(images[torch.tensor(idx)]).to(device)
        fn = conditioned(model, None if labels is None else labels[torch.tensor(idx)], K)
        res = diffusion.calc_bpd_loop(fn, x0, clip_denoised=clip_denoised, noise_fn=ImageNoise(seed, idx, device),
                                      progress=loop_progress("bits/dim", progress and dist.is_main))
        arrays = {k: res[k].float().cpu().numpy() for k in ("prior_bpd", "vb", "mse", "x0_mse")}
        write_npz(parts / f"batch-{idx[0]:06d}.npz", indices=np.asarray(idx, np.int64),
                         digest=_digests(images[torch.tensor(idx)]), **arrays)
        bar.update(len(idx))
    bar.close()
    barrier()

    summary = None
    if dist.is_main:
        bpd = _merge_parts(parts, N, T)
        summary = _write_nll_results(out_dir, bpd, seed=int(seed), clip_denoised=bool(clip_denoised))
    barrier()
    return broadcast_object(summary, dist)


def _read_parts(parts: Path):
    for f in sorted(parts.glob("batch-*.npz")):
        try:
            with np.load(f, allow_pickle=False) as z:
                part = {k: z[k] for k in z.files}
        except Exception:  # a part killed mid-write never has its final name; this is damage: redo it
            continue
        if not {"indices", "digest", "prior_bpd", "vb", "mse", "x0_mse"} <= set(part):
            continue
        _check_part(f, part)
        yield f, part


def _check_part(f: Path, part: dict) -> None:
    """A part's arrays have the kinds and shapes `evaluate_nll` writes: indices int [B] (>= 0,
    distinct), digest uint8 [B, 8], prior_bpd [B], vb / mse / x0_mse float [B, T]."""
    def bad(what: str):
        raise UserError(f"{f}: {what}; it is not a part that ddpm nll wrote: delete it, and the same command "
                        f"computes it again")

    idx = part["indices"]
    if idx.ndim != 1 or len(idx) < 1 or not np.issubdtype(idx.dtype, np.integer):
        bad(f"indices is {idx.dtype} {list(idx.shape)}, not integers [B]")
    if idx.min() < 0 or len(np.unique(idx)) != len(idx):
        bad("indices holds a negative or repeated index")
    B = len(idx)
    if part["digest"].dtype != np.uint8 or part["digest"].shape != (B, 8):
        bad(f"digest is {part['digest'].dtype} {list(part['digest'].shape)}, not uint8 [{B}, 8]")
    for k, ndim in (("prior_bpd", 1), ("vb", 2), ("mse", 2), ("x0_mse", 2)):
        a = part[k]
        if not np.issubdtype(a.dtype, np.floating) or a.ndim != ndim or len(a) != B or (
                ndim == 2 and a.shape[1:] != part["vb"].shape[1:]):
            bad(f"{k} is {a.dtype} {list(a.shape)}, not float [{B}{', T' if ndim == 2 else ''}]")


def _digests(images: torch.Tensor) -> np.ndarray:
    """The first 8 bytes of each image's sha256, uint8 [B, 8]: which images a saved part belongs to."""
    a = images.cpu().numpy()
    return np.array([np.frombuffer(hashlib.sha256(np.ascontiguousarray(x).tobytes()).digest()[:8], np.uint8) for x in a],
                    np.uint8).reshape(len(a), 8)


def _merge_parts(parts: Path, N: int, T: int) -> dict:
    out = dict(prior_bpd=np.full(N, np.nan), vb=np.full((N, T), np.nan, np.float32),
               mse=np.full((N, T), np.nan, np.float32), x0_mse=np.full((N, T), np.nan, np.float32))
    seen = np.zeros(N, bool)
    for f, part in _read_parts(parts):
        idx = part["indices"]
        keep = idx < N
        if part["vb"].shape[1] != T:
            raise UserError(f"{f}: has {part['vb'].shape[1]} terms but the model has T={T}; write to another --out directory")
        for k in out:
            out[k][idx[keep]] = part[k][keep]
        seen[idx[keep]] = True
    if not seen.all():
        raise UserError(f"{parts}: results for {int((~seen).sum())} images are missing; run the same command again")
    out["prior_bpd"] = out["prior_bpd"].astype(np.float32)
    out["indices"] = np.arange(N, dtype=np.int64)
    return out


def _write_nll_results(out_dir: Path, bpd: dict, seed: int, clip_denoised: bool) -> dict:
    vb = bpd["vb"].astype(np.float64)
    prior = bpd["prior_bpd"].astype(np.float64)
    decoder, diffusion_terms = vb[:, 0], vb[:, 1:].sum(axis=1)
    total = prior + decoder + diffusion_terms  # float64: the parts add up to the total exactly
    bpd = dict(bpd, total_bpd=total)
    N, T = vb.shape
    write_npz(out_dir / "bpd.npz", **bpd)

    with atomic_file(out_dir / "per_image.csv", "w") as f:
        w = csv.writer(f)
        w.writerow(["index", "total_bpd", "prior_bpd", "decoder_bpd", "diffusion_bpd"])
        for i in range(N):
            w.writerow([i, f"{total[i]:.6f}", f"{prior[i]:.6e}", f"{decoder[i]:.6f}", f"{diffusion_terms[i]:.6f}"])
    with atomic_file(out_dir / "per_t.csv", "w") as f:
        w = csv.writer(f)
        w.writerow(["t", "vb_bpd", "eps_mse", "x0_mse"])  # vb_bpd at t is the term L_{t-1}
        vb_m, mse_m, x0_m = vb.mean(0), bpd["mse"].astype(np.float64).mean(0), bpd["x0_mse"].astype(np.float64).mean(0)
        for t in range(1, T + 1):
            w.writerow([t, f"{vb_m[t - 1]:.6e}", f"{mse_m[t - 1]:.6e}", f"{x0_m[t - 1]:.6e}"])
    summary = dict(
        n=N, T=T, seed=seed, clip_denoised=clip_denoised,
        total_bpd=float(total.mean()),
        total_bpd_stderr=float(total.std(ddof=1) / math.sqrt(N)) if N > 1 else float("nan"),
        prior_bpd=float(prior.mean()),  # L_T
        decoder_bpd=float(decoder.mean()),  # L_0
        diffusion_bpd=float(diffusion_terms.mean()),  # L_1 + … + L_{T-1}
    )
    write_json(out_dir / "summary.json", summary)
    return summary


BPD_ARRAYS = ("prior_bpd", "vb", "x0_mse")  # what rate_distortion reads


def load_bpd(out_dir) -> dict:
    """The arrays `evaluate_nll` wrote to `out_dir/bpd.npz`."""
    path = Path(out_dir) / "bpd.npz"
    if not path.is_file():
        raise UserError(f"{path}: not found; run `ddpm nll --out {out_dir}` first")
    try:
        with np.load(path, allow_pickle=False) as z:
            bpd = {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise UserError(f"{path}: not a bits/dim file of `ddpm nll` ({e}); run `ddpm nll --out {out_dir}` again") from None
    missing = [k for k in BPD_ARRAYS if k not in bpd]
    if missing:
        raise UserError(f"{path}: lacks {', '.join(missing)}; it was not written by `ddpm nll`; run it again")
    if not (bpd["prior_bpd"].ndim == 1 and bpd["vb"].ndim == 2 and bpd["x0_mse"].shape == bpd["vb"].shape
            and len(bpd["vb"]) == len(bpd["prior_bpd"])):
        raise UserError(f"{path}: its arrays do not have the shapes `ddpm nll` writes (prior_bpd [N], vb and x0_mse "
                        f"[N, T]); run `ddpm nll --out {out_dir}` again")
    return bpd


# ---------------------------------------------------------------------------------------------
# Progressive lossy compression (§4.3, Fig. 5)
# ---------------------------------------------------------------------------------------------


def rate_distortion(bpd: dict) -> dict:
    """Rate and distortion of progressive lossy compression (§4.3, Fig. 5).

    The receiver gets x_T, x_{T-1}, …, x_t in turn (t = T … 1; docs/MATH.md § Progressive lossy
    compression). Sending x_T costs the prior term L_T; sending x_{s-1} given x_s costs L_{s-1},
    held in column s − 1 of `vb`, so

        rate(t)       = mean over images of [ prior_bpd + Σ_{k = t … T-1} vb[:, k] ]   (bits/dim)
        distortion(t) = 127.5 · sqrt( mean over images of x0_mse[:, t-1] )              (RMSE, 0–255)

    where x0_mse[:, t-1] is the squared error of x̂_0 predicted from x_t on the [-1, 1] scale.
    rate(T) is the prior term; rate(1) = total − L_0 (the paper's 1.78 bits/dim for CIFAR-10, with
    L_0 = 1.97 bits/dim the distortion in bits and RMSE 0.95).

    :param bpd: `evaluate_nll`'s arrays (`load_bpd`): prior_bpd [N], vb [N, T], x0_mse [N, T].
    :return: dict(t [T] = T … 1, steps = T − t (reverse steps taken), rate [T], distortion_rmse [T],
        and the scalars prior_bpd, decoder_bpd, total_bpd).
    """
    vb = np.asarray(bpd["vb"], np.float64)
    prior = np.asarray(bpd["prior_bpd"], np.float64)
    x0_mse = np.asarray(bpd["x0_mse"], np.float64)
    if vb.ndim != 2 or x0_mse.shape != vb.shape or prior.shape != vb.shape[:1]:
        raise UserError(f"rate_distortion needs prior_bpd [N], vb [N, T], x0_mse [N, T]; got {prior.shape}, {vb.shape}, {x0_mse.shape}")
    T = vb.shape[1]
    vb_mean = vb.mean(axis=0)
    tail = np.append(np.cumsum(vb_mean[::-1])[::-1], 0.0)  # tail[k] = Σ_{j ≥ k} vb_mean[j]; tail[T] = 0
    t = np.arange(T, 0, -1)
    rate = prior.mean() + tail[t]
    distortion = 127.5 * np.sqrt(x0_mse.mean(axis=0)[t - 1])
    return dict(t=t, steps=T - t, rate=rate, distortion_rmse=distortion, prior_bpd=float(prior.mean()),
                decoder_bpd=float(vb_mean[0]), total_bpd=float(prior.mean() + vb_mean.sum()))


def write_rate_distortion(rd: dict, out_dir) -> dict:
    """`rate_distortion.csv` and `rate_distortion.png` (Fig. 5's three panels) in `out_dir`: a
    folder that is new, empty, a `ddpm nll` output, or one this wrote before (io/folders.py)."""
    out_dir = claim_folder(out_dir, RD_RECORDS, RD_WHAT)
    csv_path, png_path = out_dir / "rate_distortion.csv", out_dir / "rate_distortion.png"
    with atomic_file(csv_path, "w") as f:
        w = csv.writer(f)
        w.writerow(["t", "reverse_steps", "rate_bpd", "distortion_rmse"])
        for t, s, r, d in zip(rd["t"], rd["steps"], rd["rate"], rd["distortion_rmse"]):
            w.writerow([int(t), int(s), f"{r:.6f}", f"{d:.6f}"])
    plot_rate_distortion(rd, png_path)
    return dict(csv=str(csv_path), png=str(png_path))


def draw_rate_distortion(fig, rd: dict) -> None:
    """Fig. 5's three panels on a matplotlib figure: distortion and rate against the reverse steps,
    and distortion against rate."""
    steps, rate, dist = rd["steps"], rd["rate"], rd["distortion_rmse"]
    for ax, xs, ys, xlabel, ylabel in zip(fig.subplots(1, 3), (steps, steps, rate), (dist, rate, dist),
                                          ("Reverse process steps (T - t)", "Reverse process steps (T - t)",
                                           "Rate (bits/dim)"),
                                          ("Distortion (RMSE, [0, 255])", "Rate (bits/dim)", "Distortion (RMSE)")):
        ax.plot(xs, ys, color="tab:blue", linewidth=2)
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)


def plot_rate_distortion(rd: dict, path) -> Path:
    """Fig. 5 as a PNG (matplotlib), written atomically."""
    return write_bytes(path, figure_png(lambda fig: draw_rate_distortion(fig, rd), size=(11.4, 3.2)))


# ---------------------------------------------------------------------------------------------
# The commands: a trained run and a test set in, result files out
# ---------------------------------------------------------------------------------------------


def load_test_images(model: UNetConfig, source: str, split: str = "test", n: Optional[int] = None
                     ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The first `n` images (default all) of a data source's split, at the model's resolution and
    channels: uint8 [N, C, H, W], and for a class-conditional model their labels int64 [N]."""
    cfg = DataConfig(source=source, split=split, resolution=model.resolution, channels=CHANNEL_MODES[model.in_channels])
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise UserError(f"--n {n}: give at least 1 image")
    data = open_data(cfg)
    return eval_images(data, model, None if n is None else min(n, len(data)))


def eval_images(data, model: UNetConfig, n: Optional[int] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The first `n` images (default all) of an opened data set and, for a conditional model, their
    labels (a set without labels, or with another number of classes, is one line)."""
    idx = torch.arange(len(data) if n is None else n)
    if not model.num_classes:
        return data.gather(idx), None
    if data.labels is None or len(data.classes) != model.num_classes:
        has = "no labels" if data.labels is None else f"{len(data.classes)} classes"
        raise UserError(f"{data.source_description} has {has}, and this class-conditional model needs the labels of "
                        f"its {model.num_classes} classes for log p(x | c); give the test split of its training data")
    return data.gather(idx), data.labels[idx]


def nll_run(model: ModelSpec, data: str, out_dir, *, split: str = "test", n: Optional[int] = None, batch: int = 64,
            seed: int = 0, progress: bool = True) -> dict:
    """`ddpm nll`: bits/dim of a trained run on the first `n` images of `data`'s split, into
    `out_dir` (see `evaluate_nll`); resumable. -> the summary dict."""
    loaded, dist, _ = model.open()
    images, labels = load_test_images(loaded.run.model, data, split, n)
    return evaluate_nll(loaded.model, loaded.diffusion, out_dir, NLLImages(images, batch, seed, labels), dist=dist,
                        progress=progress, provenance=Provenance.of(loaded))


def rate_distortion_run(out_dir, *, from_nll=None, model: Optional[ModelSpec] = None, data: Optional[str] = None,
                        nll: Optional[dict] = None, progress: bool = True) -> Optional[dict]:
    """`ddpm rate-distortion`: Fig. 5 into `out_dir`, from the bits/dim a `ddpm nll` wrote to
    `from_nll`, or evaluated here first (into `out_dir`, resumable) for `model` on `data`.

    :param nll: `nll_run`'s options for that evaluation (split, n, batch, seed).
    -> the `rate_distortion` dict with the files written (None on processes other than the first)."""
    check_folder(out_dir, RD_RECORDS, RD_WHAT)  # before the bits/dim are read or computed
    if from_nll is None:
        if model is None or not data:
            raise UserError("give --data SOURCE (the test images), or --from-nll DIR with the output of `ddpm nll`")
        nll_run(model, data, out_dir, **(nll or {}), progress=progress)
        from_nll = out_dir
    if not is_main_process():
        return None
    rd = rate_distortion(load_bpd(from_nll))
    return dict(rd, **write_rate_distortion(rd, out_dir))
