"""`--dry-run`: what `ddpm train`, `sample`, `eval`, `inpaint` and `img2img` would do, found without doing it.

Each function checks the inputs as the command would (configs, the run, the data), reads what it
needs (a checkpoint, a data source's listing, a cache's manifest) and writes nothing: no folder is
created, no data are prepared, no network is used. It returns the lines the command prints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from ..config import MAX_BATCH, check_count
from ..io import checkpoint as ckpt
from ..io.data import DataConfig, DataSet, load_images
from ..io.distributed import pick_device
from ..io.folders import foreign_entries, usable_folder
from ..io.prepared import CACHE, MEMORY, STREAM, PreparedSet, is_prepared, placement
from ..network.fast import describe_precision
from ..network.unet import summary
from ..process.editing import RePaintSpec, sdedit_time
from ..process.sampling import SamplerSpec
from ..run.config import RunConfig
from ..run.folder import is_run_folder
from ..run.load import ModelSpec, describe_weights, load_run
from ..run.options import GuidanceSpec
from .edit import EditSet, edit_inputs, img2img_nfe, inpaint_nfe, load_masks
from .evaluate import EvalSpec, eval_folder_name
from .sample import sample_labels
from .train import resolve_model


def describe_data(cfg: DataConfig) -> tuple[str, Optional[DataSet]]:
    """(where the data are and what they hold, the data set when it opens without preparing or
    downloading anything, else None): the placement training and evaluation would use
    (io/prepared.py `placement`, the one decision)."""
    where, path, source = placement(cfg)
    if where == STREAM:
        return f"{cfg.source}: LitData's format (object storage is not listed in a dry run)", None
    if where == CACHE and not is_prepared(path):
        raw = source.open()
        n = len(raw.items) if raw.items is not None else len(raw.array)
        classes = f", {len(raw.classes)} classes" if raw.labels is not None else ", no labels"
        desc = raw.description if f"{n} files" in raw.description else f"{raw.description}: {n} files"
        return f"{desc}{classes}; would be decoded once into the cache {path} (ddpm prepare does it ahead)", None
    data = load_images(cfg, source) if where == MEMORY else PreparedSet(path)
    where = f"prepared in the cache {path}" if where == CACHE else where
    c, h, w = data.shape
    classes = f", {len(data.classes)} classes" if data.labels is not None else ", no labels"
    size = f"{len(data)} images {c}x{h}x{w}"
    desc = data.source_description if size in data.source_description else f"{data.source_description}: {size}"
    return f"{desc}{classes}; {where}", data


def _model_lines(model) -> list[str]:
    s = summary(model)
    h, w = model.size
    return [f"model: {s['parameters']:,} parameters, {s['gflops']:.2f} GFLOPs per image forward at {h}x{w}"
            f"{f', {model.num_classes} classes' if model.num_classes else ''}"]


def plan_train(run_dir, run: RunConfig) -> list[str]:
    """`ddpm train --dry-run`."""
    p = usable_folder(run_dir)
    cfg = run.train
    data = run.data if run.data.resolution else run.data.replace(resolution=run.model.resolution)
    described, images = describe_data(data)
    # The model training builds: fitted to the data's channels and checked against its size and
    # classes, as training does (when the data are not decoded yet, the preset's, said so below).
    run = resolve_model(run, images) if images is not None else run
    lines = ["configuration: " + json.dumps(run.to_dict(), indent=2), *_model_lines(run.model),
             "precision: " + describe_precision(cfg.precision, pick_device(cfg.device)), f"data: {described}"]
    if images is None:
        lines.append("model: channels as configured; training fits them to the data once they are read")
    found = ckpt.list_checkpoints(p) if p.is_dir() else []
    if found:
        lines.append(f"run folder {p}: would resume from {found[-1][1].name} (step {found[-1][0]} of {cfg.steps})")
    elif p.is_dir() and foreign_entries(p) and not is_run_folder(p):
        lines.append(f"run folder {p}: holds files that are not a run; training would refuse it")
    else:
        lines.append(f"run folder {p}: {'new' if not p.exists() else 'empty'}; would train steps 1 … {cfg.steps:,}")
    lines.append(f"would write: config.json, metrics.jsonl, ckpt-*.safetensors every {cfg.checkpoint_every:,} steps "
                 f"(the last {cfg.keep_last}" + (f", and every {cfg.milestone_every:,}th for good" if cfg.milestone_every
                                                 else "") + ")"
                 + (f", samples/step-*.png every {cfg.sample_every:,} steps" if cfg.sample_every else "")
                 + (f", phema/snapshot-*.safetensors every {cfg.phema_every:,} steps (post-hoc EMA of widths "
                    f"{', '.join(f'{w:g}' for w in cfg.phema_sigma_rels)})" if cfg.phema_every else ""))
    return lines


def plan_sample(model: ModelSpec, out_dir, n: Optional[int], sampler: SamplerSpec = SamplerSpec(),
                guidance: GuidanceSpec = GuidanceSpec()) -> list[str]:
    """`ddpm sample --dry-run`: what `sample_run` with the same options would do."""
    loaded = load_run(model.run, model.weights, "cpu", fast="off")
    labels, n, record = sample_labels(guidance.classes, n, loaded.run.model.num_classes, *loaded.class_info)
    out = usable_folder(out_dir)
    have = _have(out, n)
    lines = [f"checkpoint: {loaded.checkpoint} ({loaded.weights} weights)", *_model_lines(loaded.run.model),
             "precision: " + describe_precision(model.precision.value, pick_device(model.device.value)),
             f"would draw {n - have} of {n} images ({have} already in {out}) with {sampler.describe(loaded.diffusion)} "
             f"each"
             + (" of twice the batch (guided)" if labels is not None and guidance.weight not in (0, 1) else "")]
    if labels is not None:
        lines.append(f"classes: {record.get('classes')}, guidance {guidance.weight:g}")
    lines.append(f"would write: {out}/000000.png …, samples.npz, grid.png, sampling.json")
    return lines


def plan_eval(model: ModelSpec, spec: EvalSpec = EvalSpec(), out_dir=None, guidance: GuidanceSpec = GuidanceSpec(),
              sampler: SamplerSpec = SamplerSpec()) -> list[str]:
    """`ddpm eval --dry-run`: what `evaluate_run` with the same options would do."""
    loaded = load_run(model.run, model.weights, "cpu", fast="off")
    run_dir = Path(model.run)
    base = run_dir if run_dir.is_dir() else run_dir.parent
    out = Path(out_dir) if out_dir is not None else base / "eval" / eval_folder_name(loaded, sampler)
    labels, _, record = sample_labels(GuidanceSpec.classes, spec.n, loaded.run.model.num_classes, *loaded.class_info)
    data = loaded.run.data
    cached = f"computed from {data.source} and cached in {base / 'eval'}"
    refs = [f"{split}: {given or cached}" for split, given in (("train", spec.ref_train), ("test", spec.ref_test))]
    bpd_n = spec.bpd_n
    return [f"checkpoint: {loaded.checkpoint} ({describe_weights(loaded.weights)} weights)", *_model_lines(loaded.run.model),
            "precision: " + describe_precision(model.precision.value, pick_device(model.device.value)),
            f"would draw {spec.n:,} samples ({sampler.describe(loaded.diffusion)})"
            + (f", classes {record.get('classes')}, guidance {guidance.weight:g}" if labels is not None else ""),
            "FID references: " + "; ".join(refs),
            "bits/dim: " + ("skipped" if bpd_n == 0 else f"the first {bpd_n} test images" if bpd_n else "all test images"),
            f"would write: {out}/eval.json, samples/, nll/"]


def _have(out: Path, n: int) -> int:
    """How many of images 0 … n−1 a results folder already holds (a rerun draws the rest)."""
    return sum(1 for i in range(n) if (out / f"{i:06d}.png").is_file()) if out.is_dir() else 0


def plan_edit(model: ModelSpec, images: EditSet, out_dir, *, masks=None, walk: RePaintSpec = RePaintSpec(),
              strength: Optional[float] = None, sampler: SamplerSpec = SamplerSpec(),
              guidance: GuidanceSpec = GuidanceSpec()) -> list[str]:
    """`ddpm inpaint --dry-run` (with `masks`) and `ddpm img2img --dry-run` (with `strength`): the
    images and masks read and checked as the command reads them, and the network evaluations it
    would spend on each image."""
    check_count(images.batch, "--batch", MAX_BATCH)
    loaded = load_run(model.run, model.weights, "cpu", fast="off")
    u8, labels, record, seed = edit_inputs(loaded, images, guidance)
    n, diffusion = len(u8), loaded.diffusion
    c, h, w = loaded.shape
    lines = [f"checkpoint: {loaded.checkpoint} ({describe_weights(loaded.weights)} weights)",
             *_model_lines(loaded.run.model),
             "precision: " + describe_precision(model.precision.value, pick_device(model.device.value)),
             f"inputs: {n} image file{'s' if n != 1 else ''}, each brought to {c}x{h}x{w}"]
    if masks is not None:
        keep = load_masks(masks, n, (h, w), seed)
        lines.append(f"masks: {', '.join(map(str, masks))}; {1 - keep.float().mean().item():.1%} of the pixels to "
                     f"inpaint")
        cost = (f"{inpaint_nfe(diffusion, sampler, walk):,} network evaluations each: RePaint (jump {walk.jump}, "
                f"resample {walk.resample}) over {sampler.describe(diffusion)}")
    else:
        t0 = sdedit_time(diffusion.num_timesteps, strength)
        cost = (f"{img2img_nfe(diffusion, sampler, t0):,} network evaluations each: SDEdit from t0 = {t0} "
                f"(strength {strength:g}) with {sampler.describe(diffusion)}")
    if labels is not None:
        lines.append(f"classes: {record.get('classes')}, guidance {guidance.weight:g}")
    out = usable_folder(out_dir)
    have = _have(out, n)
    lines += [f"would edit {n - have} of {n} images ({have} already in {out}), {cost}",
              f"would write: {out}/000000.png …, samples.npz, grid.png, edit.json, compare.png"]
    return lines
