"""Latents files: the x_T of images that `ddpm invert` found, with what decodes them back.

One uncompressed .npz (`np.savez`'s layout, written atomically, never pickled): "x_T" float32
[n, C, H, W], "indices", and "record", a JSON string: the file's format, the model that inverted
the images (by content hash), their shape, and the deterministic DDIM sampler whose chain was
inverted (steps, spacing), which is the one that decodes them (`latent_sampler`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..files import regular_file
from ..process.editing import invert_sampler
from ..process.sampling import SamplerSpec
from .atomic import write_npz

LATENTS_FORMAT = "ddpm-latents"


def write_latents(path, x_T: torch.Tensor, record: dict) -> Path:
    """`path` (.npz): the latents x_T [n, C, H, W] and their record (`record` must name "steps" and
    "spacing", the inverted DDIM chain's)."""
    record = dict(format=LATENTS_FORMAT, **record)
    return write_npz(path, x_T=x_T.float().cpu().numpy(), indices=np.arange(len(x_T)), record=np.array(json.dumps(record)))


def read_latents(path, shape=None) -> tuple[torch.Tensor, dict]:
    """A latents file (`FILE.npz`, or `FILE.npz@K` for its latent K alone) -> (x_T float32 [n, C, H,
    W], its record). With `shape` (C, H, W), latents of another shape are refused in one line."""
    path, k = str(path), None
    if "@" in path and not Path(path).exists():
        path, _, pick = path.rpartition("@")
        try:
            k = int(pick)
        except ValueError:
            raise UserError(f"{path}@{pick}: give a latent's index after @, e.g. {path}@0") from None
    p = Path(path)
    if not regular_file(p).is_file():
        raise UserError(f"{p}: no such latents file; give the latents.npz that `ddpm invert` wrote")
    try:
        with np.load(p, allow_pickle=False) as f:
            x_T, record = f["x_T"], json.loads(str(f["record"]))
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise UserError(f"{p}: not a latents file of ddpm invert ({type(e).__name__}); give the latents.npz it "
                        f"wrote") from None
    if not isinstance(record, dict) or record.get("format") != LATENTS_FORMAT or x_T.ndim != 4:
        raise UserError(f"{p}: not a latents file of ddpm invert; give the latents.npz it wrote")
    if shape is not None and tuple(x_T.shape[1:]) != tuple(shape):
        raise UserError(f"{p}: latents of shape {'x'.join(map(str, x_T.shape[1:]))}, but this model makes "
                        f"{'x'.join(map(str, shape))}; invert the images with this model")
    if k is not None:
        if not 0 <= k < len(x_T):
            raise UserError(f"{p}@{k}: the file holds latents 0 … {len(x_T) - 1}")
        x_T = x_T[k:k + 1]
    return torch.from_numpy(np.ascontiguousarray(x_T, dtype=np.float32)), record


def latent_sampler(record: dict) -> SamplerSpec:
    """The sampler that decodes a latents file: the DDIM chain (η = 0, unclipped) that was inverted."""
    try:
        return invert_sampler(int(record["steps"]), str(record["spacing"]))
    except (KeyError, TypeError, ValueError):
        raise UserError("a latents file without its sampler's steps and spacing; invert the images again") from None
