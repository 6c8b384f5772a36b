"""Editing the user's images with a trained model, no retraining: inpainting, image-to-image, inversion.

- `inpaint`: RePaint (Lugmayr et al. 2022): the unknown pixels of an image generated, the known
  ones (mask white = keep) imposed at every step, with RePaint's resampling.
- `img2img`: SDEdit (Meng et al. 2022): the image noised to t0 = s·T, then the sampler back to 0.
- `invert`: DDIM inversion: the latent x_T that the deterministic DDIM sampler decodes back to the
  image (`ddpm sample --from-latent`, `ddpm interpolate` with two latents).

The math is process/editing.py's (docs/MATH.md § Editing). Images come in through the package's one
preprocessing rule (io/images.py `read_image`: converted to the model's channels, the largest
centred region of its aspect ratio resized to its size). Image i of an edit draws all its noise
from seed (S, i) as sampling does (its x_T is `ddpm sample`'s image i), so a result does not depend
on the batch; the known region's noise and RePaint's jumps draw from a second per-image stream.
The results folder is `ddpm sample`'s (000000.png …, samples.npz, grid.png; resumable; the model
recorded by content hash), with `edit.json` for its settings and `compare.png`: one row per image,
the input, the mask (inpainting) and the output side by side.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch

from ..config import MAX_BATCH, MAX_SAMPLES, check_count
from ..errors import UserError
from ..files import regular_file
from ..io.atomic import write_json
from ..io.distributed import check_seed, derive_seed
from ..io.folders import claim_folder
from ..io.images import make_grid, read_image, write_png
from ..io.progress import loop_progress
from ..process.diffusion import GaussianDiffusion
from ..io.latents import latent_sampler, read_latents, write_latents
from ..io.results import Provenance, tensor_digest
from ..process.editing import (INVERT_SPACING, KnownRegion, RePaintSpec, chain_from, ddim_invert, invert_sampler,
                               repaint, repaint_nfe, sdedit_time)
from ..process.guidance import conditioned
from ..process.sampling import Sampler, SamplerSpec
from ..process.scaling import to_model_range, to_uint8
from ..run.load import ModelSpec
from ..run.options import GuidanceSpec
from .sample import (ImageFolder, ImageNoise, Images, Loop, SampleSet, draw_to_dir, num_classes_of, sample_labels,
                     sample_to_dir)

EDIT_RECORD = "edit.json"
INVERT_RECORD = "invert.json"
LATENTS_NAME = "latents.npz"
MASK_SHAPES = ("center", "half", "random-strokes")
COMPARE_ROWS = 16  # images shown in compare.png

# Salts that keep the seed streams of different roles apart.
_KNOWN = 0x4B4E4F57  # the known region's draws of q(x_t | x_0) and RePaint's jumps
_STROKES = 0x5354524B  # the random-strokes masks

# ---------------------------------------------------------------------------------------------
# Inputs and masks
# ---------------------------------------------------------------------------------------------


def load_inputs(paths: Sequence, shape) -> torch.Tensor:
    """The image files as the model's data: uint8 [n, C, H, W] by the package's preprocessing rule."""
    if not paths:
        raise UserError("give at least one image file")
    check_count(len(paths), "images", MAX_SAMPLES)
    c, h, w = shape
    return torch.stack([read_image(p, c, (h, w)) for p in paths])


def shape_mask(kind: str, size: tuple[int, int], seed: int = 0, index: int = 0) -> torch.Tensor:
    """A built-in mask, bool [1, H, W], True = keep: 'center' hides the centred square of half the
    height and width, 'half' the lower half, 'random-strokes' a few thick random brush strokes drawn
    from seed (seed, index) (about a quarter to a half of the image)."""
    h, w = size
    keep = torch.ones(1, h, w, dtype=torch.bool)
    if kind == "center":
        keep[:, h // 4: h // 4 + (h + 1) // 2, w // 4: w // 4 + (w + 1) // 2] = False
    elif kind == "half":
        keep[:, h // 2:, :] = False
    elif kind == "random-strokes":
        rng = np.random.default_rng(derive_seed(seed, _STROKES, index))
        yy, xx = np.mgrid[0:h, 0:w]
        hide = np.zeros((h, w), dtype=bool)
        radius = max(1.0, min(h, w) / 10)
        for _ in range(rng.integers(2, 5)):  # 2–4 strokes of 3–5 segments each
            p = rng.uniform([0, 0], [h, w])
            for _ in range(rng.integers(3, 6)):
                angle, length = rng.uniform(0, 2 * math.pi), rng.uniform(0.15, 0.4) * max(h, w)
                q = np.clip(p + length * np.array([math.sin(angle), math.cos(angle)]), 0, [h - 1, w - 1])
                for s in np.linspace(0, 1, int(length) + 2):
                    c = p + s * (q - p)
                    hide |= (yy - c[0]) ** 2 + (xx - c[1]) ** 2 <= radius ** 2
                p = q
        keep[0] = torch.from_numpy(~hide)
    else:
        raise UserError(f"mask {kind!r}: give PNG files (white = keep) or one of {', '.join(MASK_SHAPES)}")
    return keep


def load_masks(masks: Sequence[str], n: int, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """The masks of n images, bool [n, 1, H, W], True = keep: one built-in shape (`shape_mask`) for
    all, or PNG files (white = keep, black = inpaint; gray levels ≥ 128 count as white), one for all
    images or one each, brought to the model's size by the same rule as the images."""
    masks = [str(m) for m in masks] or ["center"]
    if len(masks) == 1 and masks[0] in MASK_SHAPES:
        return torch.stack([shape_mask(masks[0], size, seed, i) for i in range(n)])
    if len(masks) not in (1, n):
        raise UserError(f"--mask: {len(masks)} masks for {n} images; give one mask for all, one per image, or a shape "
                        f"({', '.join(MASK_SHAPES)})")
    for m in masks:
        if m in MASK_SHAPES:
            raise UserError(f"--mask {m}: a built-in shape is given alone, not among files")
        if not regular_file(Path(m)).is_file():
            raise UserError(f"--mask {m}: no such file; give PNG masks (white = keep) or one of {', '.join(MASK_SHAPES)}")
    keep = torch.stack([read_image(m, 1, size) >= 128 for m in masks])
    return keep.expand(n, -1, -1, -1).clone() if len(masks) == 1 else keep


# ---------------------------------------------------------------------------------------------
# The edits on tensors (a notebook's entry points)
# ---------------------------------------------------------------------------------------------


def inpaint_images(model, diffusion: GaussianDiffusion, x0: torch.Tensor, keep: torch.Tensor, images: Images, *,
                   sampler: SamplerSpec = SamplerSpec(), walk: RePaintSpec = RePaintSpec(),
                   loop: Loop = Loop()) -> torch.Tensor:
    """RePaint: images x0 (float [B, C, H, W] in [-1, 1], on the model's device) with their pixels
    where `keep` is False (bool [B, 1 or C, H, W]) generated, the others kept -> float [B, C, H, W].

    Image k's draws come from seed (images.seed, images.indices[k]) (its x_T is `sample`'s), the
    known region's and the jumps' from a second stream of the same image; labels and guidance as
    in `sample`. The sampler's chain is walked in RePaint's blocks (`walk`: jumps of `jump` steps,
    each block walked `resample` times; `process.editing.repaint_path`).
    """
    device = x0.device
    seed, indices, labels, guidance = images
    model = conditioned(model, labels, num_classes_of(model), guidance)
    times, step = sampler.chain(diffusion)
    noise = ImageNoise(seed, indices, device, x0.dtype)
    region = KnownRegion(step, diffusion, x0, keep.to(device), ImageNoise(derive_seed(seed, _KNOWN), indices, device,
                                                                            x0.dtype))
    x_T = noise(x0.shape)
    return repaint(diffusion, model, x_T, times, step, region, noise, walk.jump, walk.resample,
                   progress=loop_progress("inpainting", loop.progress), callback=loop.callback)


def img2img_images(model, diffusion: GaussianDiffusion, x0: torch.Tensor, strength: float, images: Images, *,
                   sampler: SamplerSpec = SamplerSpec(), loop: Loop = Loop()) -> torch.Tensor:
    """SDEdit: images x0 (float [B, C, H, W] in [-1, 1], on the model's device) noised to x_{t0} ~ q(x_{t0} | x_0), t0 =
    round(strength·T), then the sampler's chain from t0 to 0 (`process.editing.chain_from`).

    Image k's noise is `sample`'s for image indices[k]: its first draw ε gives x_{t0} = √ᾱ x_0 +
    √(1 − ᾱ) ε, the rest are the chain's z. Strength 0 returns x0; strength 1 (t0 = T) starts the
    sampler's whole chain from ε itself, the prior's draw, so it is `sample`'s image exactly.
    """
    device = x0.device
    seed, indices, labels, guidance = images
    model = conditioned(model, labels, num_classes_of(model), guidance)
    times, step = sampler.chain(diffusion)
    t0 = sdedit_time(diffusion.num_timesteps, strength)
    if t0 == 0:
        return x0.clone()
    noise = ImageNoise(seed, indices, device, x0.dtype)
    eps = noise(x0.shape)
    T = diffusion.num_timesteps
    chain = times if t0 == T else chain_from(times, t0)
    x = eps if t0 == T else diffusion.q_sample(x0, torch.full((x0.shape[0],), t0, device=device, dtype=torch.long), eps)
    return diffusion.reverse_loop(model, x, chain, step, noise_fn=noise, callback=loop.callback,
                                  progress=loop_progress("editing", loop.progress))


def invert_images(model, diffusion: GaussianDiffusion, x0: torch.Tensor, sampler: SamplerSpec = invert_sampler(), *,
                  progress: bool = False) -> torch.Tensor:
    """DDIM inversion of images x0 (float [B, C, H, W] in [-1, 1]) -> latents x_T [B, C, H, W] that
    `decode_latents` with the same `sampler` (DDIM, η = 0) brings back to x0."""
    _check_invert_sampler(sampler)
    times, _ = sampler.chain(diffusion)
    return ddim_invert(diffusion, model, x0, times, progress=loop_progress("inverting", progress))


def decode_latents(model, diffusion: GaussianDiffusion, x_T: torch.Tensor, sampler: SamplerSpec = invert_sampler(), *,
                   progress: bool = False) -> torch.Tensor:
    """Latents x_T -> images, by the deterministic DDIM chain of `sampler` (what `invert_images` inverts)."""
    _check_invert_sampler(sampler)
    times, step = sampler.chain(diffusion)
    return diffusion.reverse_loop(model, x_T, times, step, progress=loop_progress("decoding", progress))


def _check_invert_sampler(sampler: SamplerSpec) -> None:
    if sampler.sampler is not Sampler.DDIM or sampler.eta != 0:
        raise UserError(f"inversion and decoding walk DDIM with η = 0, not {sampler.sampler.value} (η={sampler.eta:g}); "
                        f"use invert_sampler(steps, spacing)")


# ---------------------------------------------------------------------------------------------
# The commands: a trained run and image files in, a results folder out
# ---------------------------------------------------------------------------------------------


class EditSet(NamedTuple):
    """The images an edit takes: image files (any size: brought to the model's by `load_inputs`),
    image i's noise from seed (seed, i), edited `batch` at a time per process."""

    paths: Sequence
    seed: int = 0
    batch: int = 16

    @classmethod
    def of(cls, images) -> "EditSet":
        """An `EditSet`, or image files for one with the default seed and batch."""
        if isinstance(images, EditSet):
            return images
        if isinstance(images, (str, Path)):
            return cls([images])
        return cls(list(images))


def _open(model: ModelSpec, inputs: EditSet, guidance: GuidanceSpec):
    check_count(inputs.batch, "--batch", MAX_BATCH)
    check_seed(inputs.seed)
    loaded, dist, _ = model.open()
    return (loaded, dist, *edit_inputs(loaded, inputs, guidance))


def edit_inputs(loaded, inputs: EditSet, guidance: GuidanceSpec):
    """(the images as uint8 [n, C, H, W] at the model's size, their class labels or None, the
    class record for edit.json, the seed), checked as every edit checks them (the dry run too)."""
    seed = check_seed(inputs.seed)
    u8 = load_inputs(inputs.paths, loaded.shape)
    K = loaded.run.model.num_classes
    if K and not guidance.classes.given():  # a conditional model edits with no class unless one is chosen
        labels, classes = torch.full((len(u8),), K, dtype=torch.long), dict(classes="none")
    else:
        labels, n, classes = sample_labels(guidance.classes, len(u8), K, *loaded.class_info)
        if n != len(u8):
            raise UserError(f"{n} classes for {len(u8)} images; give --class K for all, or --classes with one per image")
    conditioned(loaded.model, labels, num_classes_of(loaded.model), guidance.weight)  # one line for a bad class choice
    cond = dict(classes=classes, guidance=guidance.weight) if labels is not None else {}
    return u8, labels, cond, seed


def inpaint_nfe(diffusion: GaussianDiffusion, sampler: SamplerSpec, walk: RePaintSpec) -> int:
    """Network evaluations per image of `inpaint`: RePaint's walk over the sampler's chain."""
    times, _ = sampler.chain(diffusion)
    return repaint_nfe(times, walk.jump, walk.resample)


def img2img_nfe(diffusion: GaussianDiffusion, sampler: SamplerSpec, t0: int) -> int:
    """Network evaluations per image of `img2img` from t0 (`sdedit_time`): the sampler's chain from t0."""
    if not t0:
        return 0
    times, _ = sampler.chain(diffusion)
    return sampler.nfe(times if t0 == diffusion.num_timesteps else chain_from(times, t0))


def _compare(out_dir: Path, columns: Sequence[torch.Tensor]) -> str:
    """compare.png: one row per image (the first COMPARE_ROWS), the columns (uint8 [n, C, H, W]) side by side."""
    k = min(COMPARE_ROWS, len(columns[0]))
    cells = torch.stack([c[:k] for c in columns], dim=1).flatten(0, 1)
    return str(write_png(make_grid(cells, nrow=len(columns)), out_dir / "compare.png"))


def _shown(keep: torch.Tensor, u8: torch.Tensor) -> torch.Tensor:
    """The input as the model sees it: the pixels to inpaint in mid-gray."""
    return torch.where(keep.expand_as(u8), u8, torch.full_like(u8, 128))


def inpaint(model: ModelSpec, images, out_dir, *, masks: Sequence[str] = ("center",), walk: RePaintSpec = RePaintSpec(),
            sampler: SamplerSpec = SamplerSpec(), guidance: GuidanceSpec = GuidanceSpec(), progress: bool = True) -> dict:
    """`ddpm inpaint`: the images inpainted where their masks are black, into `out_dir` (`ddpm
    sample`'s folder, `edit.json`, `compare.png`: input, masked input, output). Run it again to resume.

    :param images: image files, or an `EditSet` (the files, the seed, the batch).
    :param masks: PNG files (white = keep), one for all images or one each, or one of MASK_SHAPES.
    :param walk: RePaint's jump length and resamplings (its defaults 10 and 10; resample = 1: none).
        The cost is `repaint_nfe` network evaluations, about `resample` times the sampler's.
    """
    inputs = EditSet.of(images)
    loaded, dist, u8, labels, cond, seed = _open(model, inputs, guidance)
    keep = load_masks(masks, len(u8), loaded.shape[1:], seed)
    x0 = to_model_range(u8)
    meta = dict(edit="inpaint", method="RePaint", inputs=tensor_digest(u8), masks=tensor_digest(keep.to(torch.uint8)),
                seed=seed, shape=list(loaded.shape), T=loaded.diffusion.num_timesteps, model=loaded.tag,
                **sampler.record(), jump=walk.jump, resample=walk.resample,
                nfe=inpaint_nfe(loaded.diffusion, sampler, walk), **cond)

    def draw(idx, device, show):
        return inpaint_images(loaded.model, loaded.diffusion, x0[idx].to(device), keep[idx],
                              Images(seed, idx, None if labels is None else labels[idx], guidance.weight),
                              sampler=sampler, walk=walk, loop=Loop(progress=show))

    return _edit_folder(out_dir, loaded, dist, u8, draw, meta, inputs.batch, progress, labels,
                        dict(images=[str(p) for p in inputs.paths], masks=[str(m) for m in masks]),
                        lambda out: [u8, _shown(keep, u8), out])


def img2img(model: ModelSpec, images, out_dir, *, strength: float = 0.5, sampler: SamplerSpec = SamplerSpec(),
            guidance: GuidanceSpec = GuidanceSpec(), progress: bool = True) -> dict:
    """`ddpm img2img`: SDEdit of the images (files, or an `EditSet`) at `strength` (0: the image, 1:
    a sample that ignores it) into `out_dir` (`ddpm sample`'s folder, `edit.json`, `compare.png`:
    input, output). Run it again to resume."""
    inputs = EditSet.of(images)
    loaded, dist, u8, labels, cond, seed = _open(model, inputs, guidance)
    t0 = sdedit_time(loaded.diffusion.num_timesteps, strength)
    x0 = to_model_range(u8)
    meta = dict(edit="img2img", method="SDEdit", inputs=tensor_digest(u8), strength=float(strength), t0=t0, seed=seed,
                shape=list(loaded.shape), T=loaded.diffusion.num_timesteps, model=loaded.tag, **sampler.record(),
                nfe=img2img_nfe(loaded.diffusion, sampler, t0), **cond)

    def draw(idx, device, show):
        return img2img_images(loaded.model, loaded.diffusion, x0[idx].to(device), strength,
                              Images(seed, idx, None if labels is None else labels[idx], guidance.weight),
                              sampler=sampler, loop=Loop(progress=show))

    return _edit_folder(out_dir, loaded, dist, u8, draw, meta, inputs.batch, progress, labels,
                        dict(images=[str(p) for p in inputs.paths]), lambda out: [u8, out])


def _edit_folder(out_dir, loaded, dist, u8, draw, meta: dict, batch: int, progress: bool, labels, recorded: dict,
                 columns) -> dict:
    folder = ImageFolder(out_dir, loaded.shape, len(u8), record=EDIT_RECORD, what=f"{meta['edit']} results", labels=labels)
    res = draw_to_dir(folder, draw, meta, batch=batch, dist=dist, progress=progress,
                      provenance=Provenance(loaded.tag, dict(checkpoint=str(loaded.checkpoint), **recorded)))
    if dist.is_main:
        out = torch.from_numpy(np.load(res["npz"])["x"]).permute(0, 3, 1, 2)
        res["compare"] = _compare(Path(res["out_dir"]), columns(out))
    return dict(res, nfe=meta["nfe"])


def invert(model: ModelSpec, images: Sequence, out_dir, *, steps: int = SamplerSpec.steps, spacing: str = INVERT_SPACING,
           batch: int = 16, verify: bool = False, progress: bool = True) -> dict:
    """`ddpm invert`: the DDIM latents x_T of the image files `images` into OUT/latents.npz ("x_T"
    float32 [n, C, H, W], "indices", and "record": the model and the sampler that decodes them), with
    OUT/invert.json and OUT/compare.png (input, latent, and with `verify` the latent decoded back).

    :param verify: decode the latents back (twice the cost) and record each image's error.
    """
    sampler = invert_sampler(steps, spacing)
    check_count(batch, "--batch", MAX_BATCH)
    out_dir = claim_folder(out_dir, [INVERT_RECORD], "inverted latents")
    loaded, dist, _ = model.open()
    if dist.world_size > 1:
        raise UserError("ddpm invert runs in one process; start it without torchrun")
    if loaded.run.model.num_classes:
        raise UserError("ddpm invert inverts an unconditional model's DDIM chain; this model is class-conditional")
    u8 = load_inputs(images, loaded.shape)
    x0 = to_model_range(u8)
    times, _ = sampler.chain(loaded.diffusion)
    latents, back = [], []
    for s in range(0, len(x0), batch):
        z = invert_images(loaded.model, loaded.diffusion, x0[s:s + batch].to(dist.device), sampler, progress=progress)
        latents.append(z.float().cpu())
        if verify:
            back.append(decode_latents(loaded.model, loaded.diffusion, z, sampler, progress=progress).float().cpu())
    x_T = torch.cat(latents)
    record = dict(model=loaded.tag, checkpoint=str(loaded.checkpoint), shape=list(loaded.shape),
                  T=loaded.diffusion.num_timesteps, inputs=tensor_digest(u8), images=[str(p) for p in images],
                  steps=steps, spacing=spacing, **sampler.record())
    settings = dict(record, nfe=sampler.nfe(times) * (2 if verify else 1),
                    latent_mean=float(x_T.mean()), latent_std=float(x_T.std()))
    columns = [u8, to_uint8((x_T / 3).clamp(-1, 1))]  # the latent shown at ±3σ
    if verify:
        y = torch.cat(back)
        err = (y - x0).flatten(1)
        settings.update(round_trip_rmse=err.pow(2).mean(1).sqrt().tolist(), round_trip_max=err.abs().max(1).values.tolist(),
                        round_trip_pixel_levels_max=(to_uint8(y).int() - u8.int()).abs().flatten(1).max(1).values.tolist(),
                        round_trip_pixel_levels_rmse=(to_uint8(y).float() - u8.float()).flatten(1).pow(2).mean(1).sqrt()
                        .tolist())
        columns.append(to_uint8(y))
    npz = write_latents(out_dir / LATENTS_NAME, x_T, record)
    res = dict(out_dir=str(out_dir), n=len(x_T), npz=str(npz), compare=_compare(out_dir, columns), **settings)
    write_json(out_dir / INVERT_RECORD, settings)
    return res


def decode_run(model: ModelSpec, latents, out_dir, *, n: Optional[int] = None, batch: int = 16,
               progress: bool = True) -> dict:
    """`ddpm sample --from-latent`: the latents of `ddpm invert` (`FILE.npz`, or `FILE.npz@K` for
    latent K alone; the first `n`) decoded by the deterministic DDIM chain they record, into
    `out_dir` (`ddpm sample`'s folder, its record naming the latents by content hash). A model other
    than the one that inverted them is warned about: only the same model brings them back."""
    check_count(batch, "--batch", MAX_BATCH)
    loaded, dist, _ = model.open()
    x_T, record = read_latents(latents, loaded.shape)
    if record.get("model") != loaded.tag:
        warnings.warn(f"{latents}: these latents were inverted by {record.get('model')} and are decoded by "
                      f"{loaded.tag}; only the same model brings them back to their images")
    if n is not None and not 1 <= n <= len(x_T):
        raise UserError(f"--n {n}: {latents} holds {len(x_T)} latents; give 1 to {len(x_T)}, or leave --n out")
    x_T = x_T[:n]
    if loaded.run.model.num_classes:
        raise UserError("ddpm invert's latents decode with an unconditional model; this one is class-conditional")
    return sample_to_dir(loaded.model, loaded.diffusion, out_dir,
                         SampleSet(loaded.shape, len(x_T), 0, batch, latents=x_T), sampler=latent_sampler(record),
                         dist=dist, progress=progress, provenance=Provenance.of(loaded))
