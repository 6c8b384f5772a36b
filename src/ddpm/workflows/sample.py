"""Sampling on top of `GaussianDiffusion.reverse_loop`: per-image seeds, samplers, classes, image files.

Image i of a run always comes from seed (S, i): its x_T and every z of Algorithm 2 are drawn
from a generator of its own, so a sample set does not depend on the batch size, the number of
processes, or which images were already written. Times are the paper's t (docs/MATH.md § Time
and indexing).

A class-conditional model samples image i with class label i of a list that depends on i alone
(`sample_labels`), and with classifier-free guidance of weight w (process/guidance.py; w = 1 is
plain conditional sampling): docs/MATH.md § Classes and guidance.
"""

from __future__ import annotations

import math
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch

from ..config import MAX_BATCH, MAX_SAMPLES, check_count
from ..errors import UserError
from ..io.atomic import write_npz_rows
from ..io.distributed import DistInfo, barrier, broadcast_object, check_seed, derive_seed, shard
from ..io.folders import usable_folder
from ..io.images import make_class_grid, make_grid, read_png, write_png
from ..io.progress import loop_progress, progress_bar
from ..io.results import Provenance, check_settings, tensor_digest
from ..process.diffusion import GaussianDiffusion
from ..process.guidance import check_weight, conditioned
from ..process.sampling import SamplerSpec
from ..process.scaling import to_uint8
from ..run.load import ModelSpec
from ..run.options import ClassChoice, GuidanceSpec


class Images(NamedTuple):
    """Which images to draw: image indices[k] from seed (seed, indices[k]) (`ImageNoise`), whatever
    the batch; for a class-conditional model of class labels[k] (int64 [len(indices)], or one int
    for all; None: no class), guided with weight `guidance` (process/guidance.py; 1: plain
    conditional sampling). An unconditional model takes no labels, and weight 1."""

    seed: int
    indices: Sequence[int]
    labels: Union[torch.Tensor, int, None] = None
    guidance: float = GuidanceSpec.weight


class Loop(NamedTuple):
    """How the reverse loop runs and reports; none of it changes a number.

    :param progress: a progress bar.
    :param callback: `callback(t, out)` after the step from each time t (out["pred_x0"] is the x̂_0
        predicted from x_t).
    :param prefetch_noise: draw the per-image noise on a background thread, ahead of the loop
        (`PrefetchNoise`), so a GPU never waits for the CPU's generators; the same numbers either
        way. None: on for CUDA, off for the CPU (where the thread would only compete with the
        network for the cores).
    """

    progress: bool = False
    callback: Optional[Callable] = None
    prefetch_noise: Optional[bool] = None


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


class PrefetchNoise:
    """`noise_fn` for the reverse loop that runs a CPU noise source ahead, on a background thread.

    Returns exactly what `noise_fn(shape)` would, in the same order, moved to `device` (through
    pinned memory, without blocking the host). The GPU then never waits for the CPU's random numbers:
    per-image generators (ImageNoise, built with device="cpu") cost about 10 µs per image
    per step, which at batch 256 is as long as a GPU step of the CIFAR-10 network.

    :param limit: how many draws will be taken (one z per step of the reverse loop: T for Algorithm 2).
        The thread never draws more, so `noise_fn`'s generators end where a direct use would leave them.
        Without it, the thread stays up to `depth` draws ahead.
    Every call must ask for the same shape (as the reverse loop does).
    """

    def __init__(self, noise_fn: Callable[[torch.Size], torch.Tensor], device, dtype=torch.float32,
                 limit: Optional[int] = None, depth: int = 4):
        self.noise_fn, self.device, self.dtype = noise_fn, torch.device(device), dtype
        self.limit, self.depth = limit, depth
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._shape: Optional[torch.Size] = None
        self._taken = 0

    def _produce(self) -> None:
        n = 0
        pin = self.device.type == "cuda"
        while not self._stop.is_set() and (self.limit is None or n < self.limit):
            try:
                z = self.noise_fn(self._shape)
                item = z.pin_memory() if pin else z
            except BaseException as e:  # handed to the consumer, raised there
                item = e
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return
            n += 1

    def __call__(self, shape) -> torch.Tensor:
        shape = torch.Size(shape)
        if self._thread is None:
            self._shape = shape
            self._thread = threading.Thread(target=self._produce, name="ddpm-noise", daemon=True)
            self._thread.start()
        if shape != self._shape:
            raise ValueError(f"PrefetchNoise draws shape {tuple(self._shape)}, asked for {tuple(shape)}")
        if self.limit is not None and self._taken >= self.limit:
            raise RuntimeError(f"PrefetchNoise(limit={self.limit}) was asked for draw {self._taken + 1}")
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        self._taken += 1
        return item.to(self.device, self.dtype, non_blocking=True)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __del__(self):
        self._stop.set()


# ---------------------------------------------------------------------------------------------
# Classes: which label each image gets
# ---------------------------------------------------------------------------------------------

_PHI = (math.sqrt(5.0) - 1.0) / 2.0  # the golden ratio's fractional part


def num_classes_of(model) -> int:
    """K of a class-conditional network (its config's num_classes; also of a `FastModel`), else 0."""
    return int(getattr(getattr(model, "config", None), "num_classes", 0) or 0)


def proportional_labels(counts: Sequence[int], indices: Sequence[int]) -> torch.Tensor:
    """The classes of images `indices` for a sample set in the proportions `counts` (the training
    set's: the usual protocol for a conditional model's FID).

    Image i gets the class whose interval of the cumulative proportions holds u_i = frac(½ + iφ),
    φ = (√5 − 1)/2: a low-discrepancy (Weyl) sequence, so image i's class depends on i alone, not on
    how many images are drawn or how they are batched, and the first n images hold each class's
    share n·p_k to within a few images (O(log n)), which random draws would miss by about √n.
    """
    p = np.asarray(counts, dtype=np.float64)
    if p.ndim != 1 or not len(p) or (p < 0).any() or p.sum() <= 0:
        raise UserError(f"class counts {list(counts)[:8]}: need at least one class with images")
    cum = np.cumsum(p) / p.sum()
    u = np.mod(0.5 + np.asarray(list(indices), dtype=np.float64) * _PHI, 1.0)
    return torch.from_numpy(np.minimum(np.searchsorted(cum, u, side="right"), len(p) - 1)).long()


def class_index(value, names: Sequence[str], K: int) -> int:
    """A class given as an index 0 … K-1, a name of the data's classes, or "none" (K: no class)."""
    if isinstance(value, str) and value.strip().lower() == "none":
        return K
    if isinstance(value, str) and value in names:
        return list(names).index(value)
    try:
        k = int(value)
    except (TypeError, ValueError):
        k = -1
    if isinstance(value, bool) or not 0 <= k < K:
        shown = ", ".join(f"{i}={n}" for i, n in enumerate(names[:12])) + (", …" if len(names) > 12 else "")
        raise UserError(f"class {value!r} is not one of this model's {K} classes ({shown}); give an index from 0 to "
                        f"{K - 1}, a class name, or 'none' for no class")
    return k


def sample_labels(choice: ClassChoice, n: Optional[int], num_classes: int, names: Sequence[str] = (),
                  counts: Optional[Sequence[int]] = None) -> tuple[Optional[torch.Tensor], int, dict]:
    """The class of every image of a sample set -> (labels int64 [n] or None for an unconditional
    model, n, a record of the choice for the folder's settings).

    :param n: how many images (None with `per_class`, which decides it).
    :param names, counts: the training data's class names and images per class (from the checkpoint).
    """
    K = num_classes
    if K == 0:
        if choice.given():
            raise UserError("this model is unconditional (model.num_classes=0): --class, --classes and --per-class "
                            "need a class-conditional model (train one with model.num_classes=K on labelled data)")
        return None, _count(n), {}
    names = list(names) or [str(k) for k in range(K)]
    if choice.class_ is not None and (choice.classes is not None or choice.per_class is not None):
        raise UserError("--class K draws every image of one class; --classes and --per-class choose several: give one")
    if choice.per_class is not None:
        per = choice.per_class
        if isinstance(per, bool) or not isinstance(per, int) or per < 1:
            raise UserError(f"--per-class {per!r}: give the number of images of each class, at least 1")
        ks = [class_index(c, names, K) for c in choice.classes] if choice.classes is not None else list(range(K))
        check_count(per, "--per-class", max(1, MAX_SAMPLES // max(1, len(ks))), why=f"{len(ks)} classes, {SAMPLE_NAMES}")
        if n is not None and n != per * len(ks):
            raise UserError(f"--per-class {per} with {len(ks)} classes makes {per * len(ks)} images, not --n {n}; leave "
                            f"--n out")
        labels = torch.tensor(ks, dtype=torch.long).repeat_interleave(per)
        return labels, len(labels), dict(classes=ks, per_class=per)
    n = _count(n)
    if choice.class_ is not None:
        k = class_index(choice.class_, names, K)
        return torch.full((n,), k, dtype=torch.long), n, dict(classes=[k])
    if choice.classes is not None:
        ks = [class_index(c, names, K) for c in choice.classes]
        if not ks:
            raise UserError("--classes is empty; give class indices or names, e.g. --classes 0,3,7")
        return torch.tensor(ks, dtype=torch.long)[torch.arange(n) % len(ks)], n, dict(classes=ks, cycled=True)
    if counts is None or len(counts) != K:
        counts = [1] * K  # a model without its data's counts: every class equally often
    return proportional_labels(counts, range(n)), n, dict(classes="in the training set's proportions", counts=list(counts))


def _count(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise UserError(f"n={n!r}: give the number of samples to draw, at least 1")
    return check_count(n, "n", MAX_SAMPLES, why=SAMPLE_NAMES)


def sample(model, diffusion: GaussianDiffusion, shape, images: Images, *, device, sampler: SamplerSpec = SamplerSpec(),
           loop: Loop = Loop(), x_T: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Samples for `images` (one per index) in [-1, 1], float [len(images.indices), C, H, W].

    :param shape: (C, H, W) of one image.
    :param images: their seed, indices and (a class-conditional model's) labels and guidance weight.
    :param x_T: the images' start [len(indices), C, H, W] instead of their seeds' first draw (a
        latent that `ddpm invert` found; the chain's noise, if it draws any, is still the seeds').
    """
    device = torch.device(device)
    seed, indices, labels, guidance = images
    model = conditioned(model, labels, num_classes_of(model), guidance)
    times, step = sampler.chain(diffusion)
    prefetch = device.type == "cuda" if loop.prefetch_noise is None else loop.prefetch_noise
    noise = ImageNoise(seed, indices, "cpu" if prefetch else device)
    first = noise(torch.Size((len(indices), *shape))).to(device)
    x_T = first if x_T is None else x_T.to(device, first.dtype)
    if prefetch:
        noise = PrefetchNoise(noise, device, limit=len(times) - 1)
    try:
        return diffusion.reverse_loop(model, x_T, times, step, noise_fn=noise, callback=loop.callback,
                                      progress=loop_progress("sampling", loop.progress))
    finally:
        if prefetch:
            noise.close()


# ---------------------------------------------------------------------------------------------
# A sample set on disk: one PNG per image, resumable, split over processes
# ---------------------------------------------------------------------------------------------

SAMPLES_META = "sampling.json"


SAMPLE_NAMES = "the six-digit names 000000.png … 999999.png"


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
    pool = ThreadPoolExecutor(4)
    try:
        ok = pool.map(lambda i: _read_sample(out_dir / png_name(i), shape) is not None, range(n))
        return {i for i, good in enumerate(ok) if good}
    finally:  # a signal or an error: the checks not yet started are dropped, none is waited for
        pool.shutdown(wait=False, cancel_futures=True)


class SampleSet(NamedTuple):
    """A sample set on disk: images 0 … n-1 of seed `seed`, of shape (C, H, W), drawn `batch` at a
    time per process; for a class-conditional model, of classes `labels` (int64 [n],
    `sample_labels`, chosen as `classes` records) with guidance weight `guidance`; a grid of the
    first `grid_n` (one class per row, its first 8 images, for a conditional model)."""

    shape: Sequence[int]
    n: int
    seed: int
    batch: int
    labels: Optional[torch.Tensor] = None
    classes: Optional[dict] = None
    guidance: float = GuidanceSpec.weight
    grid_n: int = 64
    latents: Optional[torch.Tensor] = None  # [n, C, H, W]: image i starts from latents[i] (`sample`'s x_T)


def sample_to_dir(model, diffusion: GaussianDiffusion, out_dir, images: SampleSet, *, sampler: SamplerSpec = SamplerSpec(),
                  dist=None, progress: bool = True, provenance: Provenance = Provenance()) -> dict:
    """Draw samples 0 … n-1 into `out_dir`: `000000.png` …, `samples.npz` (uint8 NHWC "x",
    "indices", and "labels" for a conditional model) and `grid.png` (the first `grid_n`; for a
    conditional model one class per row, its first 8 images). Run it again to resume.

    Image i always comes from seed (seed, i) (see `ImageNoise`), whatever `batch` or the number of
    processes. Indices whose PNG exists and is readable are skipped; the missing ones are split
    over the processes of `dist` (`distributed.shard`: contiguous blocks), each process
    drawing `batch` images at a time on its device; rank 0 then writes the .npz and the grid.

    :param model: any callable `model(x_t, t)` (e.g. the EMA network from `load_run`).
    :param images: the set (`SampleSet`).
    :param dist: a `distributed.DistInfo` (default: one process).
    :param provenance: which model (`Provenance`), recorded in `sampling.json` with the seed and
        the sampler's settings; a rerun with different ones is refused rather than mixed into the
        same directory. The labels, the guidance weight and `classes` (how the labels were chosen)
        are recorded there too, and compared.
    A folder that holds files but no `sampling.json` is refused (io/folders.py): a user's
    `000000.png` is never taken for a sample.
    :return: dict(out_dir, n, generated (by all processes), skipped, npz, grid).
    """
    shape, n, seed, batch, labels, classes, guidance, grid_n, latents = images
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise UserError(f"n={n!r}: give the number of samples to draw, at least 1")
    if isinstance(batch, bool) or int(batch) != batch or batch < 1:
        raise UserError(f"batch={batch!r}: give a batch size of at least 1")
    seed = check_seed(seed)  # before sampling.json records it
    check_count(int(n), "n", MAX_SAMPLES, why=SAMPLE_NAMES)
    check_count(int(batch), "batch", MAX_BATCH)
    sampler.chain(diffusion)  # validates the DDIM steps against T before anything is written
    if labels is not None:
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.shape != (int(n),):
            raise ValueError(f"sample_to_dir: {tuple(labels.shape)} labels for n={n} images")
    conditioned(model, labels, num_classes_of(model), guidance)  # an unconditional model given classes: one line
    meta = dict(seed=int(seed), shape=[int(v) for v in shape], T=diffusion.num_timesteps, model=provenance.tag,
                **sampler.record())
    if labels is not None:
        meta.update(classes=classes or {}, guidance=check_weight(guidance))
    if latents is not None:
        if tuple(latents.shape) != (n, *map(int, shape)):
            raise ValueError(f"sample_to_dir: latents of shape {tuple(latents.shape)} for n={n} images of {tuple(shape)}")
        meta["latents"] = tensor_digest(latents.float())

    def draw(idx, device, show):
        return sample(model, diffusion, shape, Images(seed, idx, None if labels is None else labels[idx], guidance),
                      device=device, sampler=sampler, loop=Loop(progress=show),
                      x_T=None if latents is None else latents[idx])

    res = draw_to_dir(ImageFolder(out_dir, shape, n, labels=labels, grid_n=grid_n), draw, meta, batch=batch, dist=dist,
                      progress=progress, provenance=provenance)
    return dict(res, **(dict(classes=classes or {}, guidance=float(guidance)) if labels is not None else {}))


class ImageFolder(NamedTuple):
    """A results folder of images 0 … n-1 of shape (C, H, W): one PNG each, `samples.npz`,
    `grid.png` (the first `grid_n`; with `labels` one class per row, its first 8 images) and the
    settings record `record`; `what` names its images in messages."""

    path: Union[str, Path]
    shape: Sequence[int]
    n: int
    record: str = SAMPLES_META
    what: str = "samples"
    labels: Optional[torch.Tensor] = None
    grid_n: int = 64


def draw_to_dir(folder: ImageFolder, draw: Callable, meta: dict, *, batch: int, dist=None, progress: bool = True,
                provenance: Provenance = Provenance()) -> dict:
    """Images 0 … n-1 into `folder`, one PNG each, then `samples.npz` and `grid.png`: the folder
    of `ddpm sample` and of the editing commands. Run it again to resume.

    `draw(indices, device, show_progress)` makes images `indices` (float [len, C, H, W] in [-1, 1]);
    it must depend on the indices alone, not on which others share its batch. The settings `meta`
    are recorded in the folder's record (with `provenance`) and compared on a rerun
    (`check_settings`), which is refused if they differ. Indices whose PNG exists and is readable
    are skipped; the missing ones are split over the processes of `dist` (contiguous blocks),
    `batch` at a time; rank 0 then writes the .npz (uint8 NHWC "x", "indices", and "labels" when
    given) and the grid.
    :return: dict(out_dir, n, generated (by all processes), skipped, npz, grid).
    """
    out_dir, shape, n, record, what, labels, grid_n = folder
    dist = dist or DistInfo()
    device = dist.device
    out_dir = usable_folder(out_dir)
    shape = tuple(int(s) for s in shape)
    n, batch = int(n), int(batch)

    todo = None
    if dist.is_main:
        check_settings(out_dir / record, meta, provenance.recorded, what=what)
        have = _existing_indices(out_dir, n, shape)
        todo = [i for i in range(n) if i not in have]
    todo = broadcast_object(todo, dist)
    mine = shard(todo, dist.rank, dist.world_size)

    bar = progress_bar(len(mine), desc=what, unit="img", enabled=progress and dist.is_main)
    for start in range(0, len(mine), batch):
        idx = mine[start:start + batch]
        x = draw(idx, device, progress and dist.is_main)
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

        extra = {} if labels is None else {"labels": labels.numpy()}
        write_npz_rows(npz_path, {"indices": np.arange(n, dtype=np.int64), **extra}, (n, h, w, c), rows())
        if labels is None:
            shown = list(range(min(grid_n, n)))
        else:  # the first 8 images of each class
            shown = sorted(i for k in labels.unique().tolist() for i in (labels == k).nonzero().flatten()[:8].tolist())
        first = torch.from_numpy(np.stack([_read_sample(out_dir / png_name(i), shape) for i in shown])).permute(0, 3, 1, 2)
        per_row = 8 if labels is None else min(8, int(torch.bincount(labels[shown]).max()))
        grid = make_grid(first, nrow=8) if labels is None else make_class_grid(first, labels[shown], per_row=per_row)
        write_png(grid, grid_path)
    barrier()
    return dict(out_dir=str(out_dir), n=n, generated=len(todo), skipped=n - len(todo), npz=str(npz_path), grid=str(grid_path))


def sample_run(model: ModelSpec, out_dir, n: Optional[int], *, batch: int = 64, seed: int = 0,
               sampler: SamplerSpec = SamplerSpec(), guidance: GuidanceSpec = GuidanceSpec(), progress: bool = True) -> dict:
    """`ddpm sample`: images 0 … n-1 of a trained run into `out_dir`, split over torchrun's
    processes; run it again to resume (see `sample_to_dir`).

    A class-conditional run samples the classes `guidance.classes` chooses (`sample_labels`; by
    default in its training set's proportions) with guidance weight `guidance.weight`."""
    if n is not None:
        check_count(n, "--n", MAX_SAMPLES, why=SAMPLE_NAMES)
    check_count(batch, "--batch", MAX_BATCH)
    loaded, dist, _ = model.open()
    labels, n, record = sample_labels(guidance.classes, n, loaded.run.model.num_classes, *loaded.class_info)
    return sample_to_dir(loaded.model, loaded.diffusion, out_dir,
                         SampleSet(loaded.shape, n, seed, batch, labels, record, guidance.weight), sampler=sampler,
                         dist=dist, progress=progress, provenance=Provenance.of(loaded))
