"""The paper's experiments on samples and latents (§4.3–4.4, Appendix D), as library functions.

(Bits/dim and progressive lossy compression, which need a test set, are nll.py's.)

- `progressive_generation`: x̂_0 predicted along sampling chains (Fig. 6).
- `shared_latent_samples`: several samples continued from one shared x_t (Fig. 7).
- `interpolate`: mix two images' x_t linearly, decode (Fig. 8 and the coarse-to-fine figure).
- `interpolate_latents`: slerp between two latents of DDIM inversion, decoded (the DDIM paper's § 5.3).
- `reconstruct`: one image noised to x_t and brought back, for several t.

Time is the paper's t everywhere (docs/MATH.md § Time and indexing): x_t ~ q(x_t | x_0) after t
forward steps, decoded by the t reverse steps t, …, 1; t = 0 is the image itself. A class-conditional
model runs each of them for a class, with a guidance weight (process/guidance.py): progressive
generation's chains take the classes `ddpm sample` would give them; the others take one class, by
default none (the unconditional model that label dropout trained). Every random
draw comes from a per-image generator seeded by (seed, image index), so results do not depend on
batch size or the number of processes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..config import MAX_FIGURE, check_count
from ..errors import UserError
from ..io.atomic import write_json, write_npz
from ..io.folders import check_folder, claim_folder
from ..io.distributed import check_seed, derive_seed
from ..io.images import make_grid, read_image, write_png
from ..io.progress import loop_progress
from ..io.latents import latent_sampler, read_latents
from ..process.diffusion import GaussianDiffusion, check_time
from ..process.editing import slerp
from ..process.guidance import conditioned
from ..process.sampling import SamplerSpec
from ..process.scaling import to_model_range, to_uint8
from ..run.load import LoadedRun, ModelSpec
from ..run.options import GuidanceSpec
from .sample import ImageNoise, Images, Loop, class_index, sample, sample_labels

# Salts that keep the seed streams of different roles apart (encoding noise vs decoding noise).
_DECODE = 0xDEC0DE
_CONTINUE = 0xC0417


# ---------------------------------------------------------------------------------------------
# Progressive generation (Fig. 6) and samples sharing an x_t (Fig. 7)
# ---------------------------------------------------------------------------------------------


def progressive_generation(model, diffusion: GaussianDiffusion, shape, times: Sequence[int], chains: Images, *,
                           device="cpu", sampler: SamplerSpec = SamplerSpec(), progress: bool = False) -> dict:
    """x̂_0 predicted from x_t along sampling chains, at chosen times t (Fig. 6).

    The chains are the images `chains` of `sample` (chain i is image i of `ddpm sample` with the
    same seed and sampler; with their labels and guidance weight for a conditional model).

    :param times: paper times t at which the sampler evaluates the network (1 … T for ancestral).
    :return: dict(times, pred_x0 [n_chains, len(times), C, H, W], samples [n_chains, C, H, W]).
    """
    n_chains = len(chains.indices)
    if n_chains < 1:
        raise UserError(f"n_chains={n_chains}: give at least one chain")
    chain_times = sampler.chain(diffusion)[0][:-1]  # the times the network is evaluated at
    times = [int(t) for t in times]
    missing = [t for t in times if t not in set(chain_times)]
    if not times or missing:
        T = diffusion.num_timesteps
        valid = f"1 … {T}" if len(chain_times) == T else ", ".join(map(str, chain_times))
        raise UserError(f"times {missing or '(none)'} are not steps of this sampler; give times t from {valid}")
    keep = {}

    def callback(t, out):
        if t in times:
            keep[t] = out["pred_x0"].float().cpu()

    x = sample(model, diffusion, tuple(shape), chains, device=device, sampler=sampler,
               loop=Loop(progress=progress, callback=callback))
    return dict(times=times, pred_x0=torch.stack([keep[t] for t in times], dim=1), samples=x.float().cpu())


def shared_latent_samples(model, diffusion: GaussianDiffusion, shape, share_t: Sequence[int], k: int, seed: int, *,
                          device="cpu", progress: bool = False) -> dict:
    """Samples that share an intermediate x_t (Fig. 7): one chain (image 0 of `seed`) is run from
    x_T down to each time t in `share_t`; from that same x_t, k chains continue to x_0 with their
    own noise (images 1 … k of seed (seed, salt)).

    :param model: `model(x_t, t)`; for a class, a conditional network `conditioned` on it
        (process/guidance.py). Algorithm 2, x̂_0 clipped as `SamplerSpec`'s default.
    :param share_t: times t in 0 … T (T: only x_T is shared; 0: the finished sample is).
    :return: dict(share_t, x_t [len(share_t), C, H, W], samples [len(share_t), k, C, H, W]).
    """
    clip_denoised = SamplerSpec.clip_denoised
    T = diffusion.num_timesteps
    share_t = [check_time(t, T, "share t") for t in share_t]
    if not share_t or k < 1:
        raise UserError("give at least one shared t and k >= 1 continuations")
    shape = tuple(shape)
    bar = loop_progress("sampling", progress)
    base_noise = ImageNoise(seed, [0], device)
    x, cur, at = base_noise(torch.Size((1, *shape))), T, {}
    for s in sorted(set(share_t), reverse=True):  # one chain, stopped at each shared t in turn
        x = diffusion.reverse_loop(model, x, range(cur, s - 1, -1), diffusion.ancestral(clip_denoised),
                                   noise_fn=base_noise, progress=bar)
        cur, at[s] = s, x
    rows = []
    for s in share_t:
        noise = ImageNoise(derive_seed(seed, _CONTINUE), range(1, k + 1), device)
        rows.append(diffusion.p_sample_loop(model, x_t=at[s].expand(k, *shape).clone(), t=s, noise_fn=noise,
                                            clip_denoised=clip_denoised, progress=bar).float().cpu())
    return dict(share_t=share_t, x_t=torch.cat([at[s] for s in share_t]).float().cpu(), samples=torch.stack(rows))


# ---------------------------------------------------------------------------------------------
# Interpolation (Fig. 8) and reconstruction
# ---------------------------------------------------------------------------------------------


def _diffuse(diffusion: GaussianDiffusion, x0: torch.Tensor, t: int, noise: torch.Tensor) -> torch.Tensor:
    """x_t ~ q(x_t | x_0) (eq. 4) for a whole batch at one time t; t = 0 gives x_0 exactly."""
    return diffusion.q_sample(x0, torch.full((x0.shape[0],), t, device=x0.device, dtype=torch.long), noise)


def interpolate(model, diffusion: GaussianDiffusion, ends: tuple[torch.Tensor, torch.Tensor], ts: Sequence[int],
                lambdas: Sequence[float], seed: int, *, clip_denoised: bool = SamplerSpec.clip_denoised,
                progress: bool = False) -> dict:
    """Interpolation in latent space (§4.4, Fig. 8): x_t ~ q(x_t | x_0) and x'_t ~ q(x'_t | x'_0),
    x̄_t = (1 − λ) x_t + λ x'_t, decoded by the reverse process; the decoding noise is the same for
    every λ. Several t give the coarse-to-fine figure: more steps, coarser and more varied.

    :param model: `model(x_t, t)`; for a class, a conditional network `conditioned` on it
        (process/guidance.py).
    :param ends: the two images x0_a, x0_b in [-1, 1], [C, H, W] (on the model's device).
    :param ts: times t, 0 … T (0: no noise and no reverse steps, a pixel-space blend).
    :return: dict(t, lambdas, images [len(ts), len(lambdas), C, H, W]) in [-1, 1].
    """
    x0_a, x0_b = ends
    T = diffusion.num_timesteps
    ts = [check_time(t, T, "t") for t in ts]
    lam = torch.tensor([float(v) for v in lambdas], dtype=x0_a.dtype, device=x0_a.device)
    if not ts or lam.numel() == 0:
        raise UserError("give at least one t and one λ")
    shape, K = tuple(x0_a.shape), lam.numel()
    rows = []
    for t in ts:
        eps = ImageNoise(seed, [0, 1], x0_a.device, x0_a.dtype)(torch.Size((2, *shape)))  # encoding noise of a and b
        x_a, x_b = _diffuse(diffusion, x0_a[None], t, eps[:1]), _diffuse(diffusion, x0_b[None], t, eps[1:])
        x_t = (1 - lam).view(-1, 1, 1, 1) * x_a + lam.view(-1, 1, 1, 1) * x_b  # [K, C, H, W]
        decode_noise = ImageNoise(derive_seed(seed, _DECODE), [0] * K, x0_a.device, x0_a.dtype)  # K equal streams
        rows.append(diffusion.p_sample_loop(model, x_t=x_t, t=t, noise_fn=decode_noise, clip_denoised=clip_denoised,
                                            progress=loop_progress("decoding", progress)).float().cpu())
    return dict(t=ts, lambdas=lam.cpu().tolist(), images=torch.stack(rows))


def interpolate_latents(model, diffusion: GaussianDiffusion, ends: tuple[torch.Tensor, torch.Tensor],
                        lambdas: Sequence[float], sampler: SamplerSpec, *, progress: bool = False) -> dict:
    """The DDIM paper's interpolation (§ 5.3): two latents x_T (`ddpm invert`'s, [C, H, W]) mixed by
    `slerp` for each λ and decoded by the deterministic chain of `sampler` (the one they were
    inverted on). -> dict(lambdas, images [1, len(lambdas), C, H, W]) in [-1, 1]."""
    z_a, z_b = ends
    lam = [float(v) for v in lambdas]
    if not lam:
        raise UserError("give at least one λ")
    z = torch.stack([slerp(z_a, z_b, v) for v in lam])
    times, step = sampler.chain(diffusion)
    x = diffusion.reverse_loop(model, z, times, step, progress=loop_progress("decoding", progress))
    return dict(lambdas=lam, images=x.float().cpu()[None])


def is_latents_path(path) -> bool:
    """Whether a path names latents of `ddpm invert` (FILE.npz or FILE.npz@K) rather than an image."""
    return re.search(r"\.npz(@\d+)?$", str(path), re.IGNORECASE) is not None


def reconstruct(model, diffusion: GaussianDiffusion, x0: torch.Tensor, ts: Sequence[int], seed: int, *,
                clip_denoised: bool = SamplerSpec.clip_denoised, progress: bool = False) -> dict:
    """One image noised to x_t ~ q(x_t | x_0) and brought back by the reverse process, for each
    time t in `ts` (0 … T): small t keeps the details, large t only the coarse layout.

    :param model: `model(x_t, t)`; for a class, a conditional network `conditioned` on it
        (process/guidance.py).
    :param x0: the image in [-1, 1], [C, H, W].
    :return: dict(t, x_t [len(ts), C, H, W], x0 [len(ts), C, H, W]) in model range.
    """
    T = diffusion.num_timesteps
    ts = [check_time(t, T, "t") for t in ts]
    if not ts:
        raise UserError("give at least one t")
    noisy, back = [], []
    for t in ts:
        eps = ImageNoise(seed, [0], x0.device, x0.dtype)(torch.Size((1, *x0.shape)))
        x_t = _diffuse(diffusion, x0[None], t, eps)
        noisy.append(x_t.float().cpu())
        decode_noise = ImageNoise(derive_seed(seed, _DECODE), [0], x0.device, x0.dtype)
        back.append(diffusion.p_sample_loop(model, x_t=x_t, t=t, noise_fn=decode_noise, clip_denoised=clip_denoised,
                                            progress=loop_progress("decoding", progress)).float().cpu())
    return dict(t=ts, x_t=torch.cat(noisy), x0=torch.cat(back))


# ---------------------------------------------------------------------------------------------
# The figures, and the commands: a trained run in, pictures and arrays out
# ---------------------------------------------------------------------------------------------


def _nhwc(x: torch.Tensor) -> np.ndarray:
    """[-1, 1] floats [..., C, H, W] -> uint8 [..., H, W, C], as the .npz files hold them."""
    return to_uint8(x).movedim(-3, -1).numpy()


def progressive_figure(res: dict) -> np.ndarray:
    """Fig. 6: one row per chain, one column per t (x̂_0 predicted from x_t, t falling to the right)."""
    return make_grid(to_uint8(res["pred_x0"].flatten(0, 1)), nrow=len(res["times"]))


def shared_figure(res: dict) -> np.ndarray:
    """Fig. 7: one row per shared t; the shared x_t, then the samples continued from it."""
    cells = torch.cat([res["x_t"][:, None], res["samples"]], dim=1)
    return make_grid(to_uint8(cells.flatten(0, 1)), nrow=cells.shape[1])


def interpolation_figure(res: dict, x0_a: torch.Tensor, x0_b: torch.Tensor) -> np.ndarray:
    """Fig. 8: one row per t; the first source, the decoded mixtures λ = 0 … 1, the second source."""
    imgs = res["images"]  # [rows t, columns λ, C, H, W]
    rows = imgs.shape[0]
    ends = [x.float().cpu().expand(rows, 1, *x.shape) for x in (x0_a, x0_b)]
    cells = torch.cat([ends[0], imgs, ends[1]], dim=1)
    return make_grid(to_uint8(cells.flatten(0, 1)), nrow=cells.shape[1])


def reconstruction_figure(res: dict) -> np.ndarray:
    """Top row x_t, bottom row its reconstruction; one column per t."""
    return make_grid(to_uint8(torch.cat([res["x_t"], res["x0"]])), nrow=len(res["t"]))


FIGURES = ("progressive", "shared", "interpolation", "reconstruct")


def _is_figures(folder: Path) -> bool:
    """Whether `folder` holds a figure's record that `_write` wrote (which checkpoint, which settings)."""
    for name in FIGURES:
        try:
            d = json.loads((Path(folder) / f"{name}.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(d, dict) and {"model", "checkpoint"} <= set(d):
            return True
    return False


def _check(out_dir) -> Path:
    """The figures' folder: new, empty, or one that holds figures written here (io/folders.py).
    Checked first, created only by `_write`, once everything else is checked and drawn."""
    return check_folder(out_dir, _is_figures, "figures")


def _write(out_dir, name: str, figure: np.ndarray, loaded, settings: dict, **arrays) -> dict:
    """OUT/NAME.png (the figure), OUT/NAME.npz (the arrays) and OUT/NAME.json (which checkpoint, by
    its content hash, and which settings made them) -> dict(png, npz, json)."""
    out = claim_folder(out_dir, _is_figures, "figures")
    record = write_json(out / f"{name}.json", dict(model=loaded.tag, checkpoint=str(loaded.checkpoint), **settings))
    return dict(png=str(write_png(figure, out / f"{name}.png")), npz=str(write_npz(out / f"{name}.npz", **arrays)),
                json=str(record))


def _one_class(loaded: LoadedRun, guidance: GuidanceSpec):
    """The model for an experiment of a conditional run, `conditioned` on the class of
    `guidance.classes.class_` (an index, a name, or None/"none": no class) with its weight, and the
    record of both for the settings; (the model, {}) for an unconditional run given no class."""
    class_, w = guidance.classes.class_, guidance.weight
    K = loaded.run.model.num_classes
    if not K:
        return conditioned(loaded.model, class_, 0, w), {}  # one line if a class or a weight was given
    label = K if class_ is None else class_index(class_, loaded.class_info[0], K)
    return conditioned(loaded.model, label, K, w), dict(label=label, guidance=w)


def _model_input(path, shape, device) -> torch.Tensor:
    """An image file as the model's data: (C, H, W) of `shape`, in [-1, 1], on `device`."""
    return to_model_range(read_image(path, shape[0], tuple(shape[1:]))).to(device)


def default_progressive_times(chain_times: Sequence[int], n: int = 10) -> list[int]:
    """n of the times a sampler evaluates the network at (descending), evenly spread from the first
    to the last: for Algorithm 2, n times from T down to 1."""
    ts = list(chain_times)
    return sorted({ts[int(round(k))] for k in np.linspace(0, len(ts) - 1, n)}, reverse=True)


def progressive_run(model: ModelSpec, out_dir, *, n_chains: int = 8, times: Optional[Sequence[int]] = None,
                    seed: int = 0, sampler: SamplerSpec = SamplerSpec(), guidance: GuidanceSpec = GuidanceSpec(),
                    progress: bool = True) -> dict:
    """`ddpm progressive`: Fig. 6 of a trained run into OUT/progressive.png and .npz.

    :param times: times t (default: 10 of the sampler's, from its first to its last; for
        Algorithm 2, from T to 1).
    :param guidance: a conditional run's class for every chain (`classes.class_`; default: the
        classes `ddpm sample` gives images 0 … n_chains-1) and the guidance weight.
    """
    if isinstance(n_chains, bool) or not isinstance(n_chains, int) or n_chains < 1:
        raise UserError(f"n_chains={n_chains}: give at least one chain")
    check_count(n_chains, "--n-chains", MAX_FIGURE, why="chains, one row each")
    _check(out_dir)
    seed = check_seed(seed)
    loaded, dist, _ = model.open()
    labels, _, record = sample_labels(guidance.classes, n_chains, loaded.run.model.num_classes, *loaded.class_info)
    times = list(times) if times else default_progressive_times(sampler.chain(loaded.diffusion)[0][:-1])
    res = progressive_generation(loaded.model, loaded.diffusion, loaded.shape, times,
                                 Images(seed, range(n_chains), labels, guidance.weight), device=dist.device,
                                 sampler=sampler, progress=progress)
    settings = dict(n_chains=n_chains, times=[int(v) for v in res["times"]], seed=seed,
                    **sampler.record(clip=False, unused=True),
                    **(dict(labels=labels.tolist(), classes=record, guidance=guidance.weight) if labels is not None else {}))
    return dict(res, **_write(out_dir, "progressive", progressive_figure(res), loaded, settings,
                              times=np.array(res["times"]), pred_x0=_nhwc(res["pred_x0"]), samples=_nhwc(res["samples"])))


def shared_run(model: ModelSpec, out_dir, share_t: Sequence[int], *, k: int = 8, seed: int = 0,
               guidance: GuidanceSpec = GuidanceSpec(), progress: bool = True) -> dict:
    """`ddpm progressive --share-t`: Fig. 7 of a trained run into OUT/shared.png and .npz."""
    check_count(k, "--k", MAX_FIGURE, why="continuations, one column each")
    _check(out_dir)
    seed = check_seed(seed)
    loaded, dist, _ = model.open()
    net, cls = _one_class(loaded, guidance)
    res = shared_latent_samples(net, loaded.diffusion, loaded.shape, share_t, k, seed, device=dist.device,
                                progress=progress)
    settings = dict(share_t=[int(v) for v in res["share_t"]], k=k, seed=seed, **cls)
    return dict(res, **_write(out_dir, "shared", shared_figure(res), loaded, settings,
                              share_t=np.array(res["share_t"]), x_t=_nhwc(res["x_t"]), samples=_nhwc(res["samples"])))


def interpolate_run(model: ModelSpec, images: tuple, out_dir, *, t: Sequence[int] = (500,), steps: int = 11,
                    seed: int = 0, guidance: GuidanceSpec = GuidanceSpec(), progress: bool = True) -> dict:
    """`ddpm interpolate`: Fig. 8 for two image files `images` (A, B), into OUT/interpolation.png and .npz;
    or, for two latents files of `ddpm invert` (`is_latents_path`), their slerps decoded by the DDIM
    chain they were inverted on (`interpolate_latents`; `t` and `seed` unused).

    :param t: times t, one row each. :param steps: values of λ from 0 to 1.
    :param guidance: a conditional run's class for the decoding (`classes.class_`, default none) and the guidance weight.
    """
    image_a, image_b = images
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise UserError(f"--steps {steps}: give at least 2 values of λ (λ = 0 and 1)")
    check_count(steps, "--steps", MAX_FIGURE, why="values of λ, one column each")
    latents = [is_latents_path(p) for p in images]
    if latents[0] != latents[1]:
        raise UserError(f"{image_a}, {image_b}: give two image files or two latents files of ddpm invert, not one of each")
    _check(out_dir)
    seed = check_seed(seed)
    loaded, dist, _ = model.open()
    net, cls = _one_class(loaded, guidance)
    if latents[0]:
        (z_a, rec_a), (z_b, rec_b) = (read_latents(p, loaded.shape) for p in images)
        sampler = latent_sampler(rec_a)
        if latent_sampler(rec_b) != sampler:
            raise UserError(f"{image_a} and {image_b} were inverted on different DDIM chains ({rec_a['steps']} and "
                            f"{rec_b['steps']} steps, {rec_a['spacing']} and {rec_b['spacing']}); invert both alike")
        res = interpolate_latents(net, loaded.diffusion, (z_a[0].to(dist.device), z_b[0].to(dist.device)),
                                  np.linspace(0, 1, steps), sampler, progress=progress)
        settings = dict(latents=[str(image_a), str(image_b)], steps=steps, **sampler.record(), **cls)
        return dict(res, t=[], **_write(out_dir, "interpolation", make_grid(to_uint8(res["images"][0]), nrow=steps),
                                        loaded, settings, lambdas=np.array(res["lambdas"]), images=_nhwc(res["images"])))
    a, b = (_model_input(p, loaded.shape, dist.device) for p in (image_a, image_b))
    res = interpolate(net, loaded.diffusion, (a, b), t, np.linspace(0, 1, steps), seed, progress=progress)
    settings = dict(images=[str(image_a), str(image_b)], t=[int(v) for v in res["t"]], steps=steps, seed=seed, **cls)
    return dict(res, **_write(out_dir, "interpolation", interpolation_figure(res, a, b), loaded, settings,
                              t=np.array(res["t"]), lambdas=np.array(res["lambdas"]), images=_nhwc(res["images"])))


def reconstruct_run(model: ModelSpec, image, out_dir, *, t: Sequence[int] = (0, 250, 500, 750, 1000), seed: int = 0,
                    guidance: GuidanceSpec = GuidanceSpec(), progress: bool = True) -> dict:
    """`ddpm reconstruct`: one image file noised to x_t and brought back, into OUT/reconstruct.png and .npz.

    :param guidance: a conditional run's class for the decoding (`classes.class_`, default none) and the guidance weight."""
    _check(out_dir)
    seed = check_seed(seed)
    loaded, dist, _ = model.open()
    net, cls = _one_class(loaded, guidance)
    x0 = _model_input(image, loaded.shape, dist.device)
    res = reconstruct(net, loaded.diffusion, x0, t, seed, progress=progress)
    settings = dict(image=str(image), t=[int(v) for v in res["t"]], seed=seed, **cls)
    return dict(res, **_write(out_dir, "reconstruct", reconstruction_figure(res), loaded, settings,
                              t=np.array(res["t"]), x_t=_nhwc(res["x_t"]), x0=_nhwc(res["x0"])))
