"""Training (Algorithm 1 with the paper's recipe) as one function of explicit configs.

    run = RunConfig.from_preset("cifar10", data="cifar10:/data/cifar-10-python.tar.gz")
    train("runs/cifar10", run)          # killed at any moment? run the same call again.

Determinism is by construction, not by saved state alone: every random draw of step s (the data
order, t, ε, the flips, the dropped class labels, dropout) is seeded from (seed, s) and, for
dropout, the rank. A resumed run therefore equals an uninterrupted one bit for bit on the same
machine, and the inputs of a step do not depend on the number of processes (the global batch is
drawn, then sliced by rank).
The checkpoint still stores every RNG state (per rank) and the data position, for the record.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import functools
import hashlib
import math
import os
import secrets
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image

from .. import threads
from ..config import size_value
from ..errors import Interrupted, UserError
from ..io import checkpoint as ckpt
from ..io.atomic import remove_stale_temps, write_text
from ..io.data import DataSet
from ..io.distributed import DistInfo, all_gather_tensor, barrier, derive_seed
from ..io.distributed import init as dist_init
from ..io.folders import FolderLock
from ..io.images import make_class_grid, make_grid, write_png
from ..io.loader import Prefetcher
from ..io.prepared import open_data
from ..io.progress import progress_bar
from ..io.stopping import handled
from ..network.memory import set_checkpointing
from ..network.fast import (adam, autocast, compile_or_eager, describe_precision, match_layout_, resolve_switch, set_winograd,
                            to_channels_last, training_trial)
from ..network.unet import UNet
from ..network.winograd import KernelCache, cached_kernels
from ..process.diffusion import GaussianDiffusion
from ..process.ema import ema_decay_at
from ..process.scaling import to_model_range, to_uint8
from ..process.weighting import LossWeights, importance_sampler
from ..run.config import RunConfig, TrainConfig, check_resume_compatible, config_changes, is_resumable
from ..run.folder import (CONFIG_NAME, METRICS_NAME, append_metrics, check_run_folder, claim_run_folder, read_run_record, truncate_metrics,
                          write_run_record)
from ..run.load import initial_weights, state_dict_problem
from ..run.phema import PowerEMAs, drop_snapshots_after
from .evaluate import TrainingFID
from .sample import Images, Loop, sample


def resolve_model(run: RunConfig, images: DataSet) -> RunConfig:
    """Fit the model's channels to the data (and the output to the variance type); check that a
    class-conditional model's classes are the data's."""
    c = images.channels
    model = run.model.replace(in_channels=c, out_channels=GaussianDiffusion.from_config(run.diffusion).model_output_channels(c))
    if images.size != model.size:
        (h, w), (mh, mw) = images.size, model.size
        raise UserError(
            f"the data are {h}x{w} but the model is built for {mh}x{mw}; set data.resolution={model.resolution} "
            f"(to resize the data) or model.resolution={size_value(images.size)}"
        )
    K = model.num_classes
    if K and images.labels is None:
        raise UserError(
            f"model.num_classes={K} needs labelled data, and {images.source_description} has no labels; give class "
            f"subfolders (DIR/CLASS/IMAGE), cifar10, fashion-mnist, an .npz with a 'labels' array, or a prepared "
            f"folder of such data; or set model.num_classes=0 to train unconditionally")
    if K and len(images.classes) != K:
        names = ", ".join(images.classes[:5]) + (", …" if len(images.classes) > 5 else "")
        raise UserError(f"model.num_classes={K}, but {images.source_description} has {len(images.classes)} classes "
                        f"({names}); set model.num_classes={len(images.classes)}")
    return run.replace(model=model)


def class_record(images: DataSet) -> dict:
    """What a conditional run keeps of its data's classes, in every checkpoint: their names, how
    many images each has (sampling draws classes in these proportions) and the labels' sha256 (a
    resume with other labels is other data)."""
    labels = images.labels.cpu()
    return dict(names=list(images.classes), counts=torch.bincount(labels, minlength=len(images.classes)).tolist(),
                labels_sha256=hashlib.sha256(labels.numpy().astype("<i8").tobytes()).hexdigest())


def drop_labels(labels: torch.Tensor, rate: float, null_class: int, g: torch.Generator) -> torch.Tensor:
    """Each label replaced by `null_class` ("no class") with probability `rate`, by uniforms drawn
    from `g` (the step's generator): classifier-free guidance's joint training of p(x | c) and p(x)."""
    drop = torch.rand(labels.shape[0], generator=g, device=g.device) < rate
    return torch.where(drop.to(labels.device), null_class, labels)


def resident_pixels(data: DataSet, device: torch.device) -> Optional[torch.Tensor]:
    """The placement of the data for training: all of it as one uint8 tensor on `device` when that
    is faster (a set in memory; on CUDA anything under RESIDENT_GPU_BYTES, copied once), or None
    to gather each batch from the prepared shards on worker threads (io/loader.py)."""
    if resident_on_device(device, data.nbytes):
        return data.load().images.to(device)
    return data.in_memory()


def resident_on_device(device: torch.device, nbytes: int) -> bool:
    """Whether training copies the whole set to `device` once and gathers its batches there: on
    CUDA, for a set under RESIDENT_GPU_BYTES (no host work per step)."""
    return device.type == "cuda" and nbytes < RESIDENT_GPU_BYTES


RESIDENT_GPU_BYTES = 4 * 2**30
# fp16: this many overflowing steps in a row (the loss scale halved each time, 2^-25 of where it
# started) is a diverged run, not a scale still settling.
FP16_SKIPS_IN_A_ROW = 25
# Prepared data up to this size have their checksums verified on a thread while training runs;
# reading more would push the training's own pages out of the page cache (`ddpm prepare --verify`).
VERIFY_IN_BACKGROUND_BYTES = 16 * 2**30


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to `lr` over `warmup` steps (step counts updates already made), then constant."""
    return cfg.lr * min((step + 1) / cfg.warmup, 1.0) if cfg.warmup > 0 else cfg.lr


class DataOrder:
    """Which data indices form global batch s: epochs are seeded permutations laid end to end, and
    batch s is positions [sB, (s+1)B) of that sequence. A pure function of (seed, s).

    The permutation is drawn on the CPU and kept on `device` (the data's): one copy per epoch,
    not a host-to-device copy (a host sync) per step."""

    def __init__(self, n: int, batch: int, seed: int, device=None):
        self.n, self.batch, self.seed, self.device = n, batch, seed, device
        self._epoch, self._perm = -1, None

    def _perm_of(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(derive_seed(self.seed, 0xDA7A, epoch))
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g).to(self.device or "cpu")
        return self._perm

    def indices(self, step: int) -> torch.Tensor:
        start = step * self.batch
        parts, pos = [], start
        while pos < start + self.batch:
            epoch, off = divmod(pos, self.n)
            take = min(self.n - off, start + self.batch - pos)
            parts.append(self._perm_of(epoch)[off: off + take])
            pos += take
        return torch.cat(parts)


def ema_update(ema_params: list[torch.Tensor], params: list[torch.Tensor], decay: float,
               applied: Optional[torch.Tensor] = None) -> None:
    """ema ← decay·ema + (1 − decay)·θ (docs/MATH.md § Training recipe), one fused foreach kernel per
    dtype group. `applied` (a 0/1 tensor on the device): whether the step updated θ at all; a step
    that fp16 loss scaling skipped leaves the EMA as it is, without a host sync to find out."""
    torch._foreach_lerp_(ema_params, params, 1.0 - decay if applied is None else (1.0 - decay) * applied)


class TrainingDiverged(UserError):
    pass


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def train(run_dir, run: RunConfig, *, images: Optional[DataSet] = None, progress: bool = True,
          dist: Optional[DistInfo] = None, accept_new_data: bool = False) -> dict:
    """Train (or resume) the run in `run_dir`. Returns {"step", "loss", "run_dir"}.

    :param images: the data, if already opened (otherwise `run.data` is opened on every rank: see
        io/prepared.py's open_data; a source of image files is prepared into the cache once).
    :param dist: the process group (default: from torchrun's environment, or a single process).
    :param accept_new_data: resume although the data differ from those the checkpoint was trained
        on (recorded in config.json's history); otherwise that is refused.

    Before anything is written, the folder must be new, empty or this run's (run/folder.py), no
    other training may hold it, and, when a checkpoint exists, `run` may differ from the run's
    config only in resumable fields (RESUMABLE_CHANGES; each change goes into the history). A run
    that never wrote a checkpoint starts afresh with whatever `run` says. SIGTERM or Ctrl-C stops
    at the end of the current step, after writing a checkpoint of it (`Interrupted`).
    """
    cfg = run.train
    dist = dist or dist_init(cfg.device)
    if cfg.batch_size % dist.world_size:
        raise UserError(f"train.batch_size={cfg.batch_size} is not divisible by the {dist.world_size} processes; "
                        f"use a multiple of {dist.world_size} (the batch size is the global batch)")
    check_run_folder(run_dir)
    local = cfg.batch_size // dist.world_size
    if cfg.clip_share and local % cfg.clip_share:
        raise UserError(f"train.clip_granularity={cfg.clip_granularity}: each of the {dist.world_size} processes holds "
                        f"{local} images, not a multiple of {cfg.clip_share}; change the batch or the share")
    if images is None:  # opened before the run folder is created: a missing source leaves nothing behind
        images = open_data(run.data if run.data.resolution else run.data.replace(resolution=run.model.resolution),
                           progress=progress and dist.local_rank == 0, preparer=dist.local_rank == 0, barrier=barrier)
    images.check_on_read = False  # checked in the background (in _train), not shard by shard on first read
    # The main process alone claims the folder (writes its mark) and then removes every temp file
    # in it: another rank writing the mark at the same time would lose its temp file to that.
    run_dir = claim_run_folder(run_dir) if dist.is_main else Path(run_dir)
    with contextlib.ExitStack() as stack:
        if dist.is_main:
            stack.enter_context(FolderLock(run_dir, "ddpm train"))
            remove_stale_temps(run_dir, max_age_s=0)  # temp files of writers that are gone (a kill)
        barrier()
        stop = stack.enter_context(_StopSignals())
        return _train(run_dir, run, images, progress, dist, accept_new_data, stop, stack)


def _train(run_dir: Path, run: RunConfig, images: DataSet, progress: bool, dist: DistInfo,
           accept_new_data: bool, stop: "_StopSignals", stack: contextlib.ExitStack) -> dict:
    # ---- The run: the model fitted to the data, the network, its EMA and the optimizer
    cfg, device = run.train, dist.device
    record = read_run_record(run_dir)
    run = resolve_model(run, images)
    resuming = record is not None and bool(ckpt.list_checkpoints(run_dir))
    changes = check_resume_compatible(record.config, run, record.source) if resuming else []  # before anything slow
    diffusion = GaussianDiffusion.from_config(run.diffusion)
    model, ema, opt = _build(run, device, dist)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    # Weighting the times (docs/MATH.md § Weighting the times): a weight of L_simple per t, and
    # importance sampling of t from a loss history; post-hoc EMA's tracked averages (§ Averaging the weights)
    weighting = cfg.loss_weighting
    mse_weights = LossWeights(weighting, diffusion.alphas_cumprod, run.diffusion.mean_type) if weighting.active else None
    resampler = importance_sampler(cfg.t_sampling, diffusion.num_timesteps, device)
    phema = PowerEMAs(model, cfg.phema_sigma_rels) if cfg.phema_every else None
    # the options' states, in every checkpoint under these names (state_dict, load_state_dict, problem)
    extras = {name: s for name, s in (("phema", phema), ("t_sampler", resampler)) if s is not None}
    # The data's fingerprint, kept in every checkpoint; rank 0 writes and checks it (hashing once).
    classes = class_record(images) if run.model.num_classes else None
    data_print = dict(sha256=images.fingerprint(), n=len(images), source=images.source_description,
                      **(dict(labels_sha256=classes["labels_sha256"]) if classes else {})) if dist.is_main else None

    # ---- Resume: the newest checkpoint this run can use, its data checked, the history recorded
    found = _resume(run_dir, run, record, changes, (model, ema, opt, extras), dist, data_print, accept_new_data)
    start = int(found[1]["step"]) if found is not None else 0
    barrier()

    # ---- The step's shape: this rank's share of the global batch, in micro-batches
    local = cfg.batch_size // dist.world_size
    lo, hi = dist.rank * local, (dist.rank + 1) * local
    mb = cfg.clip_share or cfg.microbatch or local  # with replica:N clipping each share is one micro-batch
    chunks = [slice(a, min(a + mb, local)) for a in range(0, local, mb)]
    shares = torch._foreach_mul([p.detach() for p in params], 0.0) if cfg.clip_share else None
    net, ddp = _wrap(model, cfg, (min(mb, local), *images.shape), device, dist)

    # ---- The data: resident on the device, or gathered ahead by worker threads; checked on a thread
    feed = _Feed(images, cfg, device, lo, hi, start, stack, with_labels=bool(run.model.num_classes))
    check = _background_check(images, dist, stack)
    # On CUDA the step's draws come from a CUDA generator (no host-to-device copy waits for the GPU).
    gen_device = torch.Generator(device) if device.type == "cuda" else None
    fp16, scaler = cfg.precision == "fp16", _scaler(cfg, device, found)
    share_norms, T, K = [], diffusion.num_timesteps, run.model.num_classes

    # ---- What happens after steps: the log, its tallies, sample grids, FID
    logger = _Logger(run_dir, run, enabled=dist.is_main)
    fid = _training_fid(run, images, run_dir, dist, classes) if cfg.fid_every else None
    bar = progress_bar(cfg.steps, desc="train", unit="step", initial=start, enabled=progress and dist.is_main)
    tallies = Tallies(K, T, device, fp16)
    last_loss, saved_at = float("nan"), start
    model.train()
    stop.stepping = True
    for step in range(start, cfg.steps):
        # ---- The step's draws (Algorithm 1, lines 2-4): a function of (seed, step), for the global batch
        t_probs = resampler.probabilities() if resampler is not None else None
        whole = draw_step(cfg.seed, step, (cfg.batch_size, *images.shape), T if t_probs is None else t_probs,
                          generator=gen_device, labels=feed.labels(step, device), num_classes=K,
                          label_dropout=cfg.label_dropout)
        drawn = whole.rank_share(lo, hi, device)
        if resampler is not None:  # 1/(T p_t): the loss stays an unbiased estimate of the uniform one
            importance, step_losses = resampler.importance_weights(drawn.t, t_probs), []
        torch.manual_seed(derive_seed(cfg.seed, step, dist.rank))  # dropout
        x0 = to_model_range(feed.images(step).to(device, non_blocking=True))
        if run.data.random_flip:
            x0 = torch.where(drawn.flip.view(-1, 1, 1, 1), x0.flip(-1), x0)

        # ---- Algorithm 1, line 5: the gradient step, over micro-batches of the local batch when
        # asked (the same draws, the gradient of the whole batch's mean loss; under DDP one
        # all-reduce, after the last one)
        opt.zero_grad(set_to_none=True)
        for j, part in enumerate(chunks):
            last = j == len(chunks) - 1 and not cfg.clip_share  # replica:N all-reduces the clipped shares itself
            with ddp.no_sync() if ddp is not model and not last else contextlib.nullcontext():
                with autocast(device, cfg.precision):
                    fn = functools.partial(net, y=drawn.y[part]) if K else net
                    weight = dict(mse_weight=mse_weights(drawn.t[part])) if mse_weights is not None else {}
                    losses = diffusion.training_losses(fn, x0[part], drawn.t[part], drawn.noise[part], **weight)
                per_image = losses["loss"]
                if resampler is not None:
                    step_losses.append(per_image.detach())
                    per_image = per_image * importance[part].to(per_image.dtype)
                loss = per_image.mean() if len(chunks) == 1 or cfg.clip_share else per_image.sum() / local
                scaler.scale(loss).backward()
            tallies.add(losses["loss"], drawn.t[part], drawn.y_true[part] if K else None)
            if cfg.clip_share:
                share_norms = share_norms + [_clip_share(params, shares, cfg.grad_clip, first=j == 0)]
        scaler.unscale_(opt)
        if cfg.clip_share:  # the mean of the clipped shares of the whole global batch
            grad_norm = _average_shares(params, shares, cfg.batch_size // cfg.clip_share, share_norms, dist)
            share_norms = []
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        scaler.step(opt)  # opt.step(), unless fp16 gradients overflowed
        scaler.update()
        applied = torch.isfinite(grad_norm).float() if fp16 else None
        ema_update(ema_params, params, ema_decay_at(cfg.ema_decay, step, cfg.ema_warmup), applied)
        if phema is not None:
            phema.update(params, step + 1)
        tallies.commit(grad_norm, applied)
        if resampler is not None:  # the losses of the whole global batch, not importance-weighted, on the device
            resampler.update(whole.t, torch.cat(all_gather_tensor(torch.cat(step_losses), dist, on_device=True)))

        # ---- After the step: fewer CPU threads if other programs took cores (ddpm/threads.py), the
        # log (a host sync every log_every steps), a checkpoint, a stop asked for, sample grids and
        # FID, in that order
        threads.adapt()
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.steps:
            rec = tallies.record(done, lr_at(step, cfg), cfg.batch_size, classes, scaler, dist)
            if not math.isfinite(rec["loss"]) or tallies.stuck():
                raise TrainingDiverged(_diverged_message(run_dir, done, cfg, start))
            if check is not None:
                check.raise_if_failed()  # a damaged shard of prepared data
            logger.log(rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", img_s=f"{rec['img_per_s']:.0f}")
            last_loss = rec["loss"]
            tallies.reset()
        bar.update(1)
        stopping = stop.requested(dist, done, cfg.log_every)
        if phema is not None and dist.is_main and (done % cfg.phema_every == 0 or done == cfg.steps):
            phema.save_snapshot(run_dir, done, run.to_dict(), _class_counts(classes))  # before the checkpoint of `done`
        if done % cfg.checkpoint_every == 0 or done == cfg.steps or (stopping and saved_at != done):
            # Never write a checkpoint from a diverged state (one sync per checkpoint).
            if not (tallies.finite() and (fp16 or torch.isfinite(loss))):
                raise TrainingDiverged(_diverged_message(run_dir, done, cfg, start))
            _save(run_dir, done, model, ema, opt, run, cfg, dist, data_print, scaler, classes,
                  extra={name: part.state_dict() for name, part in extras.items()})
            saved_at = done
        if stopping:
            bar.close()
            raise stop.interrupted(run_dir, done)
        if cfg.sample_every and done % cfg.sample_every == 0 and dist.is_main:
            with cached_kernels(KernelCache()):  # the EMA's weights hold still for the T steps of its samples
                grid = write_sample_grid(ema, diffusion, run, run_dir / "samples" / f"step-{done:08d}.png",
                                         cfg.sample_n, cfg.seed, device)
            logger.log_image(grid, done)
        if fid is not None and done % cfg.fid_every == 0:
            with cached_kernels(KernelCache()):
                logger.log(dict(step=done, **fid(ema, diffusion, images.shape)))
    bar.close()
    logger.close()
    if check is not None:
        check.finish()  # a damaged shard is reported, at the latest now
    return dict(step=cfg.steps, loss=last_loss, run_dir=str(run_dir))


def _background_check(images: DataSet, dist: DistInfo, stack: contextlib.ExitStack):
    """Every stored byte of the data checked against its checksum on a thread (one process a
    node), where the placement has checksums and the set is small enough; None otherwise."""
    if dist.local_rank != 0 or images.nbytes > VERIFY_IN_BACKGROUND_BYTES:
        return None
    check = images.verify_in_background()
    if check is not None:
        stack.callback(check.close)
    return check


def _training_fid(run: RunConfig, images: DataSet, run_dir: Path, dist: DistInfo, classes: Optional[dict]):
    """FID of the EMA's samples every train.fid_every steps (workflows/evaluate.py TrainingFID)."""
    cfg = run.train
    return TrainingFID(n=cfg.fid_n, batch=cfg.batch_size, seed=cfg.seed, ref=cfg.fid_ref or None, images=images,
                       data=run.data, cache=run_dir / "fid-ref-train.npz", weights=cfg.fid_weights or None,
                       expected_sha256=cfg.fid_weights_sha256 or None, dist=dist,
                       class_counts=classes["counts"] if classes else None, sampler=cfg.fid_sampler_spec)


def _wrap(model: UNet, cfg: TrainConfig, trial_shape: tuple, device: torch.device, dist: DistInfo):
    """(the network the step calls, the module whose no_sync holds back DDP's all-reduce): DDP
    over processes, compiled where it pays (fuses norms, activations and adds; the checkpoint
    keeps `model`). A compiler that fails to build the network here warns and leaves it eager
    (network/fast.py, Fail-safe)."""
    net = ddp = model
    if dist.world_size > 1:
        net = ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if resolve_switch("compile", cfg.compile, device):
        net = compile_or_eager(net, device, training_trial(model, trial_shape, device, cfg.precision), "train.compile=off")
    return net, ddp


def _scaler(cfg: TrainConfig, device: torch.device, found) -> torch.amp.GradScaler:
    """fp16: dynamic loss scaling (docs/MATH.md § Fitting in memory), restored on a resume. A step
    whose gradients overflow is skipped by the scaler, counted, and leaves the EMA and the logged
    loss alone. Other precisions: a scaler that does nothing."""
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    if scaler.is_enabled() and found is not None and isinstance(found[1].get("scaler"), dict):
        scaler.load_state_dict(found[1]["scaler"])
    return scaler


class _Feed:
    """The data as the loop reads them: this rank's images of global batch s, in the order
    `DataOrder` gives, from pixels resident on the device (`resident_pixels`) or gathered ahead by
    worker threads (io/loader.py); and the true classes of the whole global batch."""

    def __init__(self, images: DataSet, cfg: TrainConfig, device: torch.device, lo: int, hi: int, start: int,
                 stack: contextlib.ExitStack, with_labels: bool):
        self.data = resident_pixels(images, device)  # uint8 [N, C, H, W], or None: gathered ahead by `loader`
        where = self.data.device if self.data is not None else None
        self.order = DataOrder(len(images), cfg.batch_size, cfg.seed, device=where)
        self.lo, self.hi = lo, hi
        self.classes = images.labels.to(where or "cpu") if with_labels else None  # beside the order
        self.loader = None if self.data is not None else stack.enter_context(
            Prefetcher(images, lambda s: self.order.indices(s)[lo:hi], start, cfg.steps, pin=device.type == "cuda"))

    def images(self, step: int) -> torch.Tensor:
        """uint8 [local batch, C, H, W]: this rank's images of step `step`."""
        if self.loader is not None:
            return self.loader.get(step)
        return self.data[self.order.indices(step)[self.lo:self.hi]]

    def labels(self, step: int, device: torch.device) -> Optional[torch.Tensor]:
        """int64 [global batch]: the true classes of step `step`'s images, on `device` (None: unconditional)."""
        if self.classes is None:
            return None
        return self.classes[self.order.indices(step)].to(device, non_blocking=True)


def _build(run: RunConfig, device: torch.device, dist: DistInfo):
    """(model, its EMA, the optimizer): the initial weights the same on every rank, the device's
    fast paths applied (the EMA copy, the optimizer's moments and the gradients follow them)."""
    cfg = run.train
    torch.manual_seed(derive_seed(cfg.seed, 0x1A17))  # the initial weights: same on every rank
    model = UNet.from_config(run.model).to(device)
    if resolve_switch("channels_last", cfg.channels_last, device, model):
        to_channels_last(model)
    set_winograd(model, resolve_switch("winograd", cfg.winograd, device))  # the EMA copy too
    if cfg.precision == "auto" and dist.is_main:
        _log(f"train.precision={describe_precision(cfg.precision, device)}")
    ema = copy.deepcopy(model).eval().requires_grad_(False)  # kept apart, never swapped in
    set_checkpointing(model, cfg.checkpointing)  # the training copy only: the EMA never runs a backward
    opt = adam(list(model.parameters()), lr=cfg.lr, eps=cfg.adam_eps)
    return model, ema, opt


def _resume(run_dir: Path, run: RunConfig, record, changes: list, states: tuple, dist: DistInfo,
            data_print: Optional[dict], accept_new_data: bool) -> Optional[tuple]:
    """Restore the newest checkpoint this run can use into model, EMA and optimizer (and this
    rank's RNG states), after checking that the data are those it was trained on; record in
    config.json's history what changed (data, config, initial weights); start the metrics log
    afresh from the checkpoint's step. -> latest_checkpoint's (path, state), or None for a new run.

    :param changes: check_resume_compatible's (key, old, new) of the config, when `record` is resumed.
    :param states: (model, EMA, optimizer, {name: the state of an option, e.g. post-hoc EMA's averages}),
        restored from the checkpoint."""
    cfg = run.train
    model, ema, opt, extras = states
    resuming = record is not None and bool(ckpt.list_checkpoints(run_dir))
    history = list(record.history) if resuming else []
    start = 0
    found = ckpt.latest_checkpoint(run_dir, check=lambda path, state: _unfit(path, state, run, model, opt, extras, dist))
    if found is not None:
        path, state = found
        saved_data = state.get("data")
        if dist.is_main and isinstance(saved_data, dict) and any(
                saved_data.get(k) != data_print.get(k) for k in ("sha256", "labels_sha256") if k in saved_data):
            if not accept_new_data:
                what = "data" if saved_data.get("sha256") != data_print["sha256"] else "class labels of the data"
                raise UserError(
                    f"the {what} changed since {path} was written: {saved_data.get('n')} images (sha256 "
                    f"{str(saved_data.get('sha256'))[:12]}…) then, {data_print['n']} (sha256 {data_print['sha256'][:12]}…) "
                    f"now; give the same data to resume, or add --accept-new-data to go on with these (recorded)")
            history.append(dict(step=int(state["step"]), time=_now(), data=dict(before=saved_data, after=data_print)))
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        match_layout_(opt)  # checkpoints hold the moments contiguous; give them the parameters' layout
        for name, part in extras.items():
            part.load_state_dict(state[name])
        start = int(state["step"])
        rng = state.get("rng", {}).get(f"rank{dist.rank}")
        if rng:
            ckpt.set_rng_state(rng)
    if found is None and cfg.init_from:  # a new run from given weights (fine-tuning); resumes use their checkpoint
        history.append(dict(step=0, time=_now(), init_from=_init_weights(cfg.init_from, model, ema)))
    if resuming and record.source.name != CONFIG_NAME:
        history.append(dict(step=start, time=_now(), rebuilt_from=record.source.name))  # config.json was missing
    if changes:
        history.append(dict(step=start, time=_now(), changed={k: [old, new] for k, old, new in changes}))
    if dist.is_main:
        if found is not None:
            _log(f"resuming {run_dir} from {found[0].name} (step {start})")
        for k, old, new in changes:
            _log(f"changed {k} from {old!r} to {new!r} at step {start} (recorded in {run_dir / CONFIG_NAME})")
        write_run_record(run_dir, run, history)
        truncate_metrics(run_dir / METRICS_NAME, start)
        dropped = drop_snapshots_after(run_dir, start)  # to be written again by the steps after `start`
        if dropped:
            _log(f"removed the post-hoc EMA snapshots of steps {', '.join(map(str, dropped))}, newer than step {start}")
    return found


@dataclass
class StepDraws:
    """The randomness of one training step (Algorithm 1, lines 2-4) beyond the data order: t, ε,
    the horizontal flips and, for a conditional model, the class the network sees. For the global
    batch from `draw_step`; `rank_share` cuts one process's rows."""

    t: torch.Tensor  # int64 [B], t ~ U{1 … T}
    noise: torch.Tensor  # [B, C, H, W], ε ~ N(0, I)
    flip: torch.Tensor  # bool [B]
    y: Optional[torch.Tensor] = None  # int64 [B]: the class, or K ("no class") at rate label_dropout
    y_true: Optional[torch.Tensor] = None  # int64 [B]: the true class

    def rank_share(self, lo: int, hi: int, device) -> "StepDraws":
        return StepDraws(self.t[lo:hi].to(device), self.noise[lo:hi].to(device), self.flip[lo:hi].to(device),
                         None if self.y is None else self.y[lo:hi], None if self.y_true is None else self.y_true[lo:hi])


def draw_step(seed: int, step: int, shape, T: Union[int, torch.Tensor], *, generator: Optional[torch.Generator] = None,
              labels: Optional[torch.Tensor] = None, num_classes: int = 0, label_dropout: float = 0.0) -> StepDraws:
    """The step's draws for the whole global batch of `shape` [B, C, H, W], a function of (seed,
    step) alone, so that a resumed run draws what an uninterrupted one did and each process,
    slicing its rows, sees what it would at any number of processes.

    :param T: the number of steps, t uniform on 1 … T (Algorithm 1), or p_t for t = 1 … T, a [T]
        tensor on the generator's device, to draw t ~ p (importance sampling, process/weighting.py).
    :param generator: the generator to draw from, reseeded here (a CUDA one on a GPU: the draws
        then stay on the device; CUDA and the CPU give different, equally valid streams).
    :param labels: the true classes of the step's images (a conditional model of `num_classes`
        classes), in batch order; each is replaced by "no class" (K) at rate `label_dropout`.
    """
    batch = shape[0]
    g = (generator if generator is not None else torch.Generator()).manual_seed(derive_seed(seed, step))
    if isinstance(T, int):
        t = 1 + torch.randint(0, T, (batch,), generator=g, device=g.device)  # t ~ U{1 … T}
    else:  # t ~ p (importance sampling, Nichol & Dhariwal 2021)
        t = 1 + torch.multinomial(T, batch, replacement=True, generator=g)
    noise = torch.randn(shape, generator=g, device=g.device)
    flip = torch.rand(batch, generator=g, device=g.device) < 0.5
    y = None if labels is None else drop_labels(labels, label_dropout, num_classes, g)
    return StepDraws(t, noise, flip, y, labels)


class Tallies:
    """The running sums between two log lines, kept on the device so that no step waits for the
    host: the loss and image count per quartile of t (columns 0-3) and, for a conditional model,
    per class (4 …), the gradient norm, and under fp16 the steps the scaler skipped. `add` each
    micro-batch's losses, `commit` the step, `record` a log line, `reset` after it."""

    def __init__(self, num_classes: int, T: int, device, fp16: bool):
        self.K, self.T, self.fp16 = num_classes, T, fp16
        self.sums = torch.zeros(2, 4 + num_classes, device=device)
        self.step_sums = torch.zeros(2, 4 + num_classes, device=device)  # fp16: this step's, kept if it applied
        self.gn_sum = torch.zeros((), device=device)
        self.skipped, self.in_a_row = torch.zeros((), device=device), torch.zeros((), device=device)
        self.t0, self.steps, self._open = time.perf_counter(), 0, False

    def add(self, losses: torch.Tensor, t: torch.Tensor, y_true: Optional[torch.Tensor]) -> None:
        """One micro-batch's per-image losses at times t (1 … T) of classes y_true."""
        if self.fp16 and not self._open:
            self.step_sums.zero_()
        self._open = True
        tally = self.step_sums if self.fp16 else self.sums
        q = ((t - 1) * 4) // self.T  # quartile of t: 1 … T/4 is the first
        if y_true is not None:
            q = torch.cat([q, 4 + y_true])
        tally[0].index_add_(0, q, losses.detach().float().repeat(2 if y_true is not None else 1))
        tally[1].index_add_(0, q, torch.ones_like(q, dtype=self.sums.dtype))

    def commit(self, grad_norm: torch.Tensor, applied: Optional[torch.Tensor] = None) -> None:
        """The step is done; `applied` (fp16): 1 if the scaler applied it, 0 if its gradients overflowed."""
        if applied is not None:
            self.sums.add_(torch.where(applied > 0, self.step_sums, 0.0))  # an overflowed loss may be inf: 0 x inf is nan
            self.skipped.add_(1 - applied)
            self.in_a_row.mul_(1 - applied).add_(1 - applied)
            grad_norm = torch.nan_to_num(grad_norm * applied, nan=0.0)
        self.gn_sum += grad_norm.detach().float()
        self.steps += 1
        self._open = False

    def record(self, step: int, lr: float, batch_size: int, classes: Optional[dict], scaler, dist: DistInfo) -> dict:
        """The log line of the steps since the last: the loss of the whole global batch (summed over
        processes), per quartile of t and per class, the mean gradient norm, images per second."""
        if dist.world_size > 1:  # the loss of the whole global batch, not rank 0's share
            torch.distributed.all_reduce(self.sums)
        s = self.sums.cpu()
        elapsed = time.perf_counter() - self.t0
        return dict(step=step, loss=s[0, :4].sum().item() / max(s[1, :4].sum().item(), 1), lr=lr,
                    grad_norm=self.gn_sum.item() / self.steps,
                    img_per_s=self.steps * batch_size / max(elapsed, 1e-9),
                    **{f"loss_q{i}": (s[0, i] / s[1, i]).item() if s[1, i] > 0 else None for i in range(4)},
                    **(dict(loss_by_class={name: (s[0, 4 + k] / s[1, 4 + k]).item() if s[1, 4 + k] > 0 else None
                                           for k, name in enumerate(classes["names"])}) if self.K else {}),
                    **(dict(skipped_steps=int(self.skipped.item()), loss_scale=scaler.get_scale()) if self.fp16 else {}))

    def stuck(self) -> bool:
        """fp16: so many overflowing steps in a row that the run has diverged, not a scale settling."""
        return self.fp16 and self.in_a_row.item() >= FP16_SKIPS_IN_A_ROW

    def finite(self) -> bool:
        return bool(torch.isfinite(self.sums).all() and torch.isfinite(self.gn_sum))

    def reset(self) -> None:
        self.sums.zero_()
        self.gn_sum.zero_()
        self.skipped.zero_()
        self.t0, self.steps = time.perf_counter(), 0


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _unfit(path: Path, state: dict, run: RunConfig, model, opt, extras: dict, dist: DistInfo) -> str:
    """Why a verified checkpoint cannot be resumed from in this run, or "" (see latest_checkpoint)."""
    missing = [k for k in ("step", "model", "ema", "optimizer", "config") if k not in state]
    if missing:
        return f"it lacks {', '.join(missing)}"
    step = state["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step != ckpt.checkpoint_step(path):
        return f"its step is {step!r} but its name says {ckpt.checkpoint_step(path)}"
    other = [(k, old, new) for k, old, new in config_changes(state["config"], run) if not is_resumable(k)]
    if not isinstance(state["config"], dict) or other:
        k, old, new = other[0] if other else ("config", state["config"], "a run config")
        return f"it was written by another run ({k}={old!r} there, {new!r} here)"
    for name in ("model", "ema"):
        problem = state_dict_problem(state[name], model.state_dict())
        if problem:
            return f"its {name} weights do not fit the network ({problem})"
    problem = _optimizer_problem(state["optimizer"], opt)
    if problem:
        return f"its optimizer state does not fit ({problem})"
    for name, part in extras.items():  # post-hoc EMA's averages, importance sampling's loss history
        problem = part.problem(state.get(name))
        if problem:
            return problem
    rng = state.get("rng", {})
    return ckpt.rng_state_problem(rng.get(f"rank{dist.rank}", {})) if isinstance(rng, dict) else "its RNG state is not a mapping"


def _optimizer_problem(saved, opt: torch.optim.Optimizer) -> str:
    """What keeps `opt.load_state_dict(saved)` from restoring an Adam state for these parameters."""
    if not isinstance(saved, dict) or not isinstance(saved.get("param_groups"), list) or not isinstance(saved.get("state"), dict):
        return "not an optimizer state"
    groups = saved["param_groups"]
    if len(groups) != len(opt.param_groups) or any(
            not isinstance(g, dict) or len(g.get("params", ())) != len(ours["params"]) for g, ours in zip(groups, opt.param_groups)):
        return "its parameter groups differ"
    params = [p for g in opt.param_groups for p in g["params"]]
    ids = [i for g in groups for i in g["params"]]
    for i, p in zip(ids, params):
        moments = saved["state"].get(i)
        if moments is None:
            continue
        for k in ("exp_avg", "exp_avg_sq"):
            m = moments.get(k) if isinstance(moments, dict) else None
            if not isinstance(m, torch.Tensor) or m.shape != p.shape:
                return f"moment {k} of parameter {i} is not {list(p.shape)}"
    return ""


class _StopSignals:
    """SIGTERM (what schedulers such as SLURM send before a kill) and Ctrl-C stop training at once
    while it opens the data or a checkpoint (preparing a source is resumable, nothing else is
    written yet); once steps run, they ask it to stop at
    the end of the current step, after a checkpoint of it; a second signal stops at once (the
    temporary file of a checkpoint being written is removed, the previous checkpoint is kept).
    With several processes they agree on the step every `log_every` steps (one all-reduce)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum: Optional[int] = None
        self.stepping = False  # set once the training loop runs: a stop then waits for the step's end
        self._old: dict = {}

    def _handle(self, signum, frame):
        handled()
        if not self.stepping:  # opening the data, loading a checkpoint: nothing to save yet
            raise Interrupted(signum, f"stopped by {signal.Signals(signum).name} before the first step of this "
                                      f"session; nothing new was saved; run the same command to go on")
        if self.signum is not None:
            raise Interrupted(signum, f"stopped at once by a second {signal.Signals(signum).name}, without a new "
                                      f"checkpoint; run the same command to resume from the last one")
        self.signum = signum
        _log(f"ddpm train: {signal.Signals(signum).name} received: stopping after this step, with a checkpoint "
             f"(send it again to stop at once)")

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)

    def requested(self, dist: DistInfo, done: int, every: int) -> bool:
        if dist.world_size == 1:
            return self.signum is not None
        if done % every:
            return False
        flag = torch.tensor([self.signum or 0], device=dist.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        if flag.item() and self.signum is None:
            self.signum = int(flag.item())
        return self.signum is not None

    def interrupted(self, run_dir: Path, done: int) -> Interrupted:
        """What a stop asked for raises after the checkpoint of step `done` is written."""
        return Interrupted(self.signum, f"stopped by {signal.Signals(self.signum).name} after step {done}, which "
                                        f"{ckpt.checkpoint_path(run_dir, done).name} holds; run the same command "
                                        f"to resume")


def _save(run_dir, step, model, ema, opt, run: RunConfig, cfg: TrainConfig, dist: DistInfo, data_print: dict,
          scaler: torch.amp.GradScaler, classes: Optional[dict], extra: dict) -> None:
    """The checkpoint of `step`; `extra`: the states of the options that have one (post-hoc EMA's
    averages "phema", importance sampling's loss history "t_sampler")."""
    # Every rank's RNG state goes into the one file rank 0 writes.
    mine = ckpt.get_rng_state()
    rng = {f"rank{r}": {} for r in range(dist.world_size)}
    for key, value in mine.items():
        for r, v in enumerate(all_gather_tensor(value, dist)):
            rng[f"rank{r}"][key] = v
    if dist.is_main:
        state = dict(step=step, model=model.state_dict(), ema=ema.state_dict(), optimizer=opt.state_dict(), rng=rng,
                     data_position=step * cfg.batch_size, config=run.to_dict(), data=data_print,
                     **(dict(scaler=scaler.state_dict()) if scaler.is_enabled() else {}),
                     **extra, **(dict(classes=_class_counts(classes)) if classes else {}))
        ckpt.save_checkpoint(run_dir, step, state, keep_last=cfg.keep_last, milestone_every=cfg.milestone_every or None)
    barrier()


def _class_counts(classes: Optional[dict]) -> Optional[dict]:
    """What a checkpoint (and a post-hoc EMA snapshot) keeps of a conditional run's classes."""
    return dict(names=classes["names"], counts=classes["counts"]) if classes else None


def _clip_share(params: list, shares: list, clip: float, first: bool) -> torch.Tensor:
    """Clip the gradient of one share (what `params` hold after its backward pass) to global norm
    `clip`, add it to `shares` (reset by the first share of a step) and clear the gradients for the
    next share. Returns the share's norm before clipping."""
    grads = [p.grad for p in params]
    norm = torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
    if first:
        torch._foreach_copy_(shares, grads)
    else:
        torch._foreach_add_(shares, grads)
    torch._foreach_zero_(grads)
    return norm


def _average_shares(params: list, shares: list, n_shares: int, norms: list, dist: DistInfo) -> torch.Tensor:
    """The gradient becomes the mean of every process's clipped shares; returns their mean norm."""
    if dist.world_size > 1:
        for s in shares:  # the DDP hooks were held back (no_sync): the sum over processes, here
            torch.distributed.all_reduce(s)
    torch._foreach_div_(shares, float(n_shares))
    torch._foreach_copy_([p.grad for p in params], shares)
    return torch.stack(norms).mean()


def _init_weights(path: str, model: torch.nn.Module, ema: torch.nn.Module) -> dict:
    """Load the weights at `path` (run/load.py's initial_weights) into the model and its EMA; one
    line naming the first tensor that does not fit. Returns where they came from, for the history."""
    init = initial_weights(path)
    for name, sd, net in (("model", init.model, model), ("EMA", init.ema, ema)):
        problem = state_dict_problem(sd, net.state_dict())
        if problem:
            raise UserError(f"--init-from {path}: its {name} weights do not fit this run's network ({problem}); give "
                            f"weights of the same model.* settings, or change the model to match them")
        net.load_state_dict(sd)
    _log(f"initialised the model and its EMA from {init.source['file']} (sha256 {init.source['sha256'][:12]}…)")
    return init.source


def _diverged_message(run_dir: Path, step: int, cfg: TrainConfig, start: int) -> str:
    """What to do after a divergence: resume from the last good checkpoint with a lower learning
    rate or a longer warm-up (resumable changes), or start again if there is none."""
    found = ckpt.list_checkpoints(run_dir)
    lower = min(cfg.lr / 10, 2e-4)  # a tenth, or at most the paper's rate
    change = (f"a lower learning rate (--set train.lr={lower:g}) or a longer warm-up "
              f"(--set train.warmup={max(2 * cfg.warmup, 1000)})")
    if not found:
        return (f"the loss became NaN or infinite by step {step}, before any checkpoint; run the same command with "
                f"{change} to start again")
    (last, path), before = found[-1], found[-2][1].name if len(found) > 1 else None
    if last == start and step - start <= cfg.log_every and before:
        # it diverged right after resuming: the forward pass of the newest checkpoint already overflows
        return (f"the loss became NaN or infinite by step {step}, right after resuming from {path.name}, which is "
                f"itself diverged; move it out of the folder (mkdir -p {run_dir / 'diverged'} && mv {path} "
                f"{run_dir / 'diverged'}) and run the same command with {change} to resume from {before} "
                f"(the change is recorded in config.json)")
    return (f"the loss became NaN or infinite by step {step}; the last good checkpoint {path.name} is intact; run "
            f"the same command with {change} to resume from it (the change is recorded in config.json)")


def write_sample_grid(ema: torch.nn.Module, diffusion: GaussianDiffusion, run: RunConfig, path: Path, n: int, seed: int,
                      device, progress: bool = False) -> Path:
    """n EMA samples (Algorithm 2) as one PNG grid; for a conditional model, one class per row
    (about n / K images of each class, unguided)."""
    m = run.model
    K = m.num_classes
    per = max(1, round(n / K)) if K else 0
    labels = torch.arange(K).repeat_interleave(per) if K else None
    x = sample(ema, diffusion, (m.in_channels, *m.size), Images(seed, range(per * K if K else n), labels), device=device,
               loop=Loop(progress=progress))
    return write_png(make_class_grid(to_uint8(x), labels, per_row=per) if K else make_grid(to_uint8(x)), path)


class _Logger:
    """metrics.jsonl always; TensorBoard and Weights & Biases when `train.logger` asks for them (the
    same scalars, and the sample grids). A resumed run goes on logging into the same W&B run: its
    id is kept in the run folder."""

    WANDB_ID = "wandb-run-id"

    def __init__(self, run_dir: Path, run: RunConfig, enabled: bool):
        self.enabled, self.tb, self.wandb = enabled, None, None
        if not enabled:
            return
        self.path = run_dir / METRICS_NAME
        loggers = run.train.loggers
        if "tensorboard" in loggers:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("train.logger=tensorboard needs TensorBoard: pip install 'ddpm[tensorboard]'") from None
            self.tb = SummaryWriter(str(run_dir / "tb"))
        if "wandb" in loggers:
            try:
                import wandb
            except ImportError:
                raise UserError("train.logger=wandb needs Weights & Biases: pip install 'ddpm[wandb]' (WANDB_MODE=offline "
                                "logs without an account)") from None
            id_file = run_dir / self.WANDB_ID
            run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(6)  # W&B: [a-z0-9]
            write_text(id_file, run_id)
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "ddpm"), id=run_id, resume="allow",
                                    name=run_dir.name, dir=str(run_dir), config=run.to_dict())

    @staticmethod
    def _scalars(rec: dict) -> dict:
        """A metrics record as flat scalars: train/loss, train/loss_by_class/NAME (one curve per class)."""
        out = {}
        for k, v in rec.items():
            if k == "step":
                continue
            for tag, x in ({f"train/{k}/{name}": x for name, x in v.items()} if isinstance(v, dict)
                           else {f"train/{k}": v}).items():
                if x is not None:
                    out[tag] = x
        return out

    def log(self, rec: dict) -> None:
        if not self.enabled:
            return
        append_metrics(self.path, rec)
        scalars = self._scalars(rec)
        if self.tb is not None:
            for tag, x in scalars.items():
                self.tb.add_scalar(tag, x, rec["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=rec["step"])

    def log_image(self, path: Path, step: int) -> None:
        """A sample grid written at `step` (the PNG file), to the loggers that show pictures."""
        if not self.enabled or (self.tb is None and self.wandb is None):
            return
        pixels = np.asarray(Image.open(path))
        if self.tb is not None:
            self.tb.add_image("samples", pixels if pixels.ndim == 3 else pixels[..., None], step, dataformats="HWC")
        if self.wandb is not None:
            import wandb

            self.wandb.log({"samples": wandb.Image(pixels, caption=f"EMA samples at step {step}")}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
