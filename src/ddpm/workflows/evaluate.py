"""Evaluation as streams: images -> Inception features -> statistics -> distances, and the reports.

    source  = open_images("runs/x/eval/samples")            # a folder of PNGs, an .npz, or pixels
    inc     = load_inception()                               # checked weights, never downloaded
    fs, iss = measure(source, inc)                           # float64 accumulators, any #processes
    ref     = load_stats("cifar10-train.npz")                # ddpm fid-ref
    fid     = fid_from_stats(FIDStats.from_features(fs), ref)

Every image reaches the network as the uint8 pixels a user would save (samples are rounded by
`process.scaling.to_uint8`, never truncated; sample folders are read back from the PNG files).
Under torchrun each process measures a contiguous block of the images and the statistics are
merged in rank order, so every process works and the result does not depend on their number.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
import sys
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

from .. import threads
from ..config import MAX_BATCH, MAX_SAMPLES, REQUIRED, Config, check_count, get_field, load_json, parse_json, size_value
from ..errors import UserError
from ..files import read_text
from ..io.atomic import write_json
from ..io.data import DataConfig, DataSet
from ..io.prepared import open_data
from ..io.samples import Subset, open_images
from ..io.distributed import DistInfo, all_gather_tensor, barrier, broadcast_object, derive_seed, shard
from ..io.distributed import init as dist_init
from ..io.folders import check_folder, claim_file, claim_folder
from ..io.images import make_grid, write_png
from ..io.progress import progress_bar
from ..io.results import Provenance
from ..io.inception_weights import OFFICIAL, load_inception, no_inception_score
from ..network.inception import FEATURE_DIM, NUM_CLASSES, InceptionV3
from ..process.guidance import conditioned
from ..process.scaling import to_uint8
from ..process.sampling import SamplerSpec
from ..run.load import ModelSpec, LoadedRun, describe_weights, load_run
from ..run.options import GuidanceSpec, InceptionSpec
from ..version import __version__
from .fid import IS_SPLITS, FeatureStats, FIDStats, ISStats, fid_from_stats, is_stats_file, load_stats, save_stats
from .metrics import kid, nearest_neighbours, precision_recall
from .nll import NLLImages, eval_images, evaluate_nll
from .sample import ClassChoice, Images, SampleSet, proportional_labels, sample, sample_labels, sample_to_dir

PROTOCOL = ("Inception-v3 2015-12-05 weights (the TF graph of TTUR and the official DDPM code), pool-3 2048-d features, "
            "TF1 bilinear resize to 299 (no antialiasing), uint8 inputs, statistics and distance in float64; "
            "the paper: 50,000 EMA samples (Algorithm 2) against the 50,000 training images")


# ---------------------------------------------------------------------------------------------
# Measuring: a process's block of a source -> merged float64 statistics
# ---------------------------------------------------------------------------------------------


# Features kept beside the statistics, for KID, precision/recall and the memorization check: of a
# reference set up to 50,000 (float32, ~400 MB for CIFAR-10's training set: the nearest training
# image of a sample is looked for among all of them), of a sample set up to 10,000.
REF_FEATURES = 50_000
SAMPLE_FEATURES = 10_000
PR_N, PR_K = 10_000, 3  # precision/recall: up to 10,000 images a side (equal sizes), k = 3 (Kynkäänniemi et al.)
FEATURES_NOTE = "Inception-v3 (2015-12-05) pool-3, 2048-d: the FID features"


def keep_indices(n: int, keep: int) -> np.ndarray:
    """Which of n images keep their features: all when n <= keep, else `keep` evenly spaced ones
    (a data set stored class by class keeps every class)."""
    if n <= keep:
        return np.arange(n, dtype=np.int64)
    return np.unique(np.linspace(0, n - 1, keep).round().astype(np.int64))


@dataclass
class Measured:
    """What one pass of Inception over a set of images gives: float64 statistics, the Inception
    Score's sums (None for weights without the classifier), the kept features (float32, the
    images `index`, in index order), and the pixels' sha256 when one process read them in order."""

    stats: FeatureStats
    scores: Optional[ISStats]
    features: np.ndarray
    index: np.ndarray
    sha256: Optional[str]

    def inception_score(self) -> Optional[dict]:
        return self.scores.result() if self.scores is not None else None


def _merge_over_ranks(fs: FeatureStats, iss: Optional[ISStats], dist) -> tuple[FeatureStats, Optional[ISStats]]:
    if dist is None or dist.world_size == 1:
        return fs, iss
    packed = torch.from_numpy(np.concatenate([fs.pack()] + ([iss.pack()] if iss is not None else [])))
    merged_fs = FeatureStats(fs.dim)
    merged_is = ISStats(iss.n_total, iss.num_classes, iss.splits) if iss is not None else None
    k = len(fs.pack())
    for v in all_gather_tensor(packed, dist):  # rank order: the same result on every process
        v = v.numpy()
        merged_fs.merge(FeatureStats.unpack(v[:k], fs.dim))
        if merged_is is not None:
            merged_is.merge_packed(v[k:])
    return merged_fs, merged_is


def _gather_kept(features: list, index: list, dist) -> tuple[np.ndarray, np.ndarray]:
    """Every process's kept features, on every process, in index order."""
    f = np.concatenate(features) if features else np.zeros((0, FEATURE_DIM), np.float32)
    i = np.concatenate(index) if index else np.zeros(0, np.int64)
    if dist is not None and dist.world_size > 1:
        counts = [int(c) for c in all_gather_tensor(torch.tensor([len(i)]), dist)]
        pad = max(counts)
        rows = torch.zeros(pad, FEATURE_DIM + 1, dtype=torch.float64)  # the index rides in column 0, exactly
        rows[:len(i), 0], rows[:len(i), 1:] = torch.from_numpy(i).double(), torch.from_numpy(f).double()
        parts = [r[:c].numpy() for r, c in zip(all_gather_tensor(rows, dist), counts)]
        i = np.concatenate([p[:, 0] for p in parts]).astype(np.int64)
        f = np.concatenate([p[:, 1:] for p in parts]).astype(np.float32)
    order = np.argsort(i, kind="stable")
    return f[order], i[order]


def measure_batches(batches, n_total: int, inception: InceptionV3, dist=None, splits: int = IS_SPLITS,
                    keep: int = SAMPLE_FEATURES) -> Measured:
    """One pass of Inception over an iterable of (indices, uint8 [B, C, H, W]) of this process's
    images, merged over all processes: statistics, Inception Score sums, the features of
    `keep_indices(n_total, keep)`, and the sha256 of the pixels (uint8 [N, C, H, W], C order, the
    definition of `data.data_fingerprint`) when one process saw every image in order."""
    fs = FeatureStats(FEATURE_DIM)
    iss = ISStats(n_total, NUM_CLASSES, splits) if inception.has_logits else None
    wanted = keep_indices(n_total, keep)
    kept_f, kept_i = [], []
    h, expect = hashlib.sha256(), 0
    for idx, images in batches:
        pool3, logits = inception(images)
        threads.adapt()  # fewer CPU threads while other programs use the cores
        fs.update(pool3)
        if iss is not None:
            iss.update(logits, idx)
        idx_a = np.asarray(idx, np.int64)
        sel = np.isin(idx_a, wanted)
        if sel.any():
            kept_f.append(pool3[sel].astype(np.float32))
            kept_i.append(idx_a[sel])
        if h is not None:
            if list(idx) != list(range(expect, expect + len(idx))):
                h = None
            else:
                h.update(np.ascontiguousarray(images.numpy()).tobytes())
                expect += len(idx)
    fs, iss = _merge_over_ranks(fs, iss, dist)
    if fs.n != n_total:
        raise RuntimeError(f"measured {fs.n} of {n_total} images")
    features, index = _gather_kept(kept_f, kept_i, dist)
    whole = h is not None and expect == n_total and (dist is None or dist.world_size == 1)
    return Measured(fs, iss, features, index, h.hexdigest() if whole else None)


def measure(source: DataSet, inception: InceptionV3, *, batch: int = 100, dist=None, progress: bool = False,
            splits: int = IS_SPLITS, keep: int = SAMPLE_FEATURES) -> Measured:
    """`measure_batches` over a source, each process reading its own block."""
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    mine = shard(range(len(source)), rank, world)
    bar = progress_bar(len(mine), desc="inception", unit="img", enabled=progress and rank == 0)

    def batches():
        for s in range(0, len(mine), batch):
            idx = mine[s:s + batch]
            yield idx, source.gather(torch.as_tensor(list(idx), dtype=torch.long))
            bar.update(len(idx))

    try:
        return measure_batches(batches(), len(source), inception, dist, splits, keep)
    finally:
        bar.close()


def _stats_provenance(inception: InceptionV3, **extra) -> dict:
    return dict(extra, inception=dict(inception.info), protocol=PROTOCOL, dtype="float64",
                created=time.strftime("%Y-%m-%dT%H:%M:%S%z"), ddpm_version=__version__,
                torch_version=torch.__version__, device=inception.device.type)


def _score_provenance(m: Measured, inception: InceptionV3) -> dict:
    scores = m.inception_score()
    return scores if scores is not None else dict(inception_score=None, inception_score_note=no_inception_score(inception.info))


def reference_stats(data, inception: InceptionV3, *, batch: int = 100, dist=None, progress: bool = False,
                    images=None, keep: int = REF_FEATURES) -> FIDStats:
    """FID statistics of a data set (no augmentation: the images as stored, after the package's one
    preprocessing rule), the features of up to REF_FEATURES of its images, their provenance, and
    the data's own Inception Score (when the weights have the classifier).

    :param data: a `data.DataConfig` (source, split, resolution, channels).
    :param images: the data set of `data`, if already opened.
    """
    images = images if images is not None else open_data(data, progress=progress)
    m = measure(images, inception, batch=batch, dist=dist,
                progress=progress, keep=keep)
    prov = _stats_provenance(
        inception, kind="reference", data_source=data.source, source_description=images.source_description,
        split=data.split, resolution=size_value(images.size), channels=images.channels, n_images=len(images),
        data_sha256=images.fingerprint(), data_sha256_of="uint8 [N, C, H, W] pixels, C order",
        augmentation="none (no flips)", skipped_files=images.num_skipped, features_kept=len(m.index),
        **_score_provenance(m, inception))
    return FIDStats.from_features(m.stats, prov, m.features, m.index)


def samples_stats(source: DataSet, inception: InceptionV3, *, batch: int = 100, dist=None,
                  progress: bool = False, keep: int = SAMPLE_FEATURES, **provenance) -> tuple[FIDStats, Optional[dict]]:
    """FID statistics (with the features of up to `keep` samples) and Inception Score (None
    without the classifier) of a set of samples."""
    m = measure(source, inception, batch=batch, dist=dist, progress=progress, keep=keep)
    sha = m.sha256
    if sha is None and (dist is None or dist.is_main):  # several processes each saw a block
        sha = source.fingerprint()
    is_ = m.inception_score()
    prov = _stats_provenance(inception, kind="samples", samples=source.source_description, n_images=len(source),
                             pixels_sha256=sha, **_score_provenance(m, inception), **provenance)
    return FIDStats.from_features(m.stats, prov, m.features, m.index), is_


def _n_note(n: int, ref_n: int) -> Optional[str]:
    if n < 50_000 or ref_n < 50_000:
        return (f"{n} samples against {ref_n} reference images: the paper's protocol is 50,000 against 50,000; FID from "
                f"fewer images is biased upwards and not comparable with published numbers")
    return None


def _evenly(features: np.ndarray, m: int) -> np.ndarray:
    return features[keep_indices(len(features), m)]


def compare(samples: FIDStats, ref: FIDStats, *, where: str = "reference", seed: int = 0) -> dict:
    """Samples against a reference, from the same features: FID (all images), KID (Bińkowski et
    al.: every kept feature, 100 subsets of 1,000) and precision/recall (Kynkäänniemi et al., k = 3,
    the same number of images a side, up to PR_N). KID and precision/recall are None, with the reason in `note`, when
    either side kept no features (statistics of another tool, or of an earlier ddpm)."""
    out = dict(fid=fid_from_stats(samples, ref, where=where), kid=None, precision_recall=None, note=None)
    if samples.features is None or ref.features is None or len(samples.features) < 2 or len(ref.features) < 2:
        out["note"] = (f"{where}: no KID or precision/recall: the statistics hold no features (made by another "
                       f"tool or an earlier ddpm); make them again with: ddpm fid-ref")
        return out
    out["kid"] = dict(kid(samples.features, ref.features, seed=seed), n_samples=len(samples.features),
                      n_reference=len(ref.features), features=FEATURES_NOTE)
    m = min(PR_N, len(samples.features), len(ref.features))  # the same number a side, as the paper's protocol
    fake, real = _evenly(samples.features, m), _evenly(ref.features, m)
    if min(len(fake), len(real)) > PR_K:
        out["precision_recall"] = dict(precision_recall(real, fake, k=PR_K), features=FEATURES_NOTE)
    else:
        out["note"] = f"{where}: no precision/recall: k = {PR_K} needs more than {PR_K} images a side"
    return out


def fid_report(samples: Union[str, Path], refs: Sequence[Union[str, Path]], inception: InceptionV3, *,
               batch: int = 100, dist=None, progress: bool = False) -> dict:
    """`ddpm fid`: FID, KID and precision/recall of samples (a folder of PNGs or an .npz) against
    each reference statistics file, and their Inception Score, with what was measured against what."""
    refs = [(str(r), load_stats(r)) for r in refs]
    source = open_images(samples)
    stats, is_ = samples_stats(source, inception, batch=batch, dist=dist, progress=progress)
    out = dict(samples=stats.provenance, **(is_ or dict(inception_score=None)), fid={}, kid={}, precision_recall={})
    notes = [] if is_ is not None else [no_inception_score(inception.info)]
    for path, ref in refs:
        c = compare(stats, ref, where=path)
        out["fid"][path], out["kid"][path], out["precision_recall"][path] = c["fid"], c["kid"], c["precision_recall"]
        notes.append(c["note"])
    out["references"] = {path: _ref_summary(ref) for path, ref in refs}
    notes += [_n_note(stats.n, ref.n) for _, ref in refs]
    notes += [f"{p}: no provenance (statistics from another tool); check they were made with the same protocol"
              for p, ref in refs if not ref.provenance]
    out["notes"] = sorted({x for x in notes if x})
    return out


def _ref_summary(ref: FIDStats) -> dict:
    p = ref.provenance
    keys = ("data_source", "source_description", "split", "n_images", "data_sha256", "resolution", "augmentation")
    return dict({k: p[k] for k in keys if k in p}, inception_sha256=p.get("inception", {}).get("weights_sha256"),
                n=ref.n)


# ---------------------------------------------------------------------------------------------
# ddpm eval: samples (EMA, Algorithm 2) -> FID against train and test, IS, bits/dim -> one JSON
# ---------------------------------------------------------------------------------------------


def _valid_cache(path: Path, images, inception: InceptionV3, dist=None) -> Optional[FIDStats]:
    """The statistics at `path` if they were made from these pixels with these weights, else None.
    Process 0 decides for all, so every process takes the same branch (then a collective)."""
    ok = False
    if (dist is None or dist.is_main) and Path(path).is_file():
        old = load_stats(path)
        p = old.provenance
        ok = (p.get("data_sha256") == images.fingerprint() and old.features is not None  # earlier versions kept none
              and p.get("inception", {}).get("weights_sha256") == inception.info["weights_sha256"])
    if dist is not None:
        ok = broadcast_object(ok, dist)
    return load_stats(path) if ok else None


def cached_reference(path: Path, data, inception: InceptionV3, *, batch: int, dist=None, progress: bool = False) -> FIDStats:
    """Reference statistics of `data`, reused from `path` when they were made from the same pixels
    (sha256) with the same Inception weights, else computed and written there."""
    images = open_data(data, progress=progress)
    old = _valid_cache(path, images, inception, dist)
    if old is not None:
        return old
    stats = reference_stats(data, inception, batch=batch, dist=dist, progress=progress, images=images)
    if dist is None or dist.is_main:
        save_stats(path, stats)
    barrier()
    return stats


def seed_set_summary(fids: Sequence[float], n_each: int) -> dict:
    """FIDs of K disjoint sample sets of n_each images (image i has its own seed, so the sets are
    independent draws): mean ± std (sample standard deviation, ddof = 1) over the sets."""
    f = np.asarray(fids, np.float64)
    return dict(sets=len(f), n_each=int(n_each), fid=[float(x) for x in f], mean=float(f.mean()),
                std=float(f.std(ddof=1)) if len(f) > 1 else None,
                indices=[f"{k * n_each}..{(k + 1) * n_each - 1}" for k in range(len(f))])


MEMORIZATION_PNG = "memorization.png"
_QUANTILES = (0.001, 0.01, 0.05, 0.25, 0.5)


def memorization_check(samples: FIDStats, train: FIDStats, heldout: Optional[FIDStats] = None, *, k: int = 3,
                       show: int = 8, bins: int = 40) -> Optional[dict]:
    """Are samples copies of training images? In the FID feature space, each sample's distance to
    its nearest training image, beside the same distance for held-out real images (the test split),
    which the model never saw: a model that memorizes puts a mass of samples closer to the training
    set than held-out images are.

    -> quantiles of both distributions, the fraction of samples closer to a training image than 99%
    of held-out images are (`closer_than_heldout_p01`; about 0.01 for a model that does not copy),
    their histograms (common bins), and the `show` samples closest to a training image with their
    k nearest training images (indices into the training split, and distances). None when a side
    kept no features."""
    if samples.features is None or train.features is None or len(train.features) < k or not len(samples.features):
        return None
    d_s, i_s = nearest_neighbours(samples.features, train.features, k=k)
    s_nn = d_s[:, 0]
    out = dict(features=FEATURES_NOTE, n_samples=len(s_nn), n_train=int(train.n), n_train_searched=len(train.features),
               samples_nn=dict(zip(map(str, _QUANTILES), np.quantile(s_nn, _QUANTILES).tolist())),
               heldout_nn=None, closer_than_heldout_p01=None)
    edges_from = [s_nn]
    if heldout is not None and heldout.features is not None and len(heldout.features):
        h_nn = nearest_neighbours(heldout.features, train.features, k=1)[0][:, 0]
        out["heldout_nn"] = dict(zip(map(str, _QUANTILES), np.quantile(h_nn, _QUANTILES).tolist()))
        out["n_heldout"] = len(h_nn)
        out["closer_than_heldout_p01"] = float(np.mean(s_nn < np.quantile(h_nn, 0.01)))
        edges_from.append(h_nn)
    edges = np.histogram_bin_edges(np.concatenate(edges_from), bins=bins)
    out["histogram"] = dict(edges=edges.tolist(), samples=np.histogram(s_nn, edges)[0].tolist(),
                            heldout=np.histogram(edges_from[1], edges)[0].tolist() if len(edges_from) > 1 else None)
    order = np.argsort(s_nn, kind="stable")[:show]
    out["closest"] = [dict(sample=int(samples.feature_index[j]), distance=float(s_nn[j]),
                           train=[int(train.feature_index[t]) for t in i_s[j]], train_distances=d_s[j].tolist())
                      for j in order]
    return out


def draw_memorization(check: dict, samples: DataSet, train_images, path: Path) -> Path:
    """A grid: each row one of the samples closest to a training image, then its nearest training
    images, nearest first."""
    rows = []
    for c in check["closest"]:
        rows.append(samples.gather(torch.as_tensor([c["sample"]])))
        rows.append(train_images.gather(torch.as_tensor(c["train"], dtype=torch.long)))
    images = torch.cat(rows)
    return write_png(make_grid(images, nrow=1 + len(check["closest"][0]["train"])), path)


def _is_evaluation(folder: Path) -> bool:
    """Whether `folder` holds an eval.json that `evaluate_run` wrote (a folder it claimed but had not
    finished carries the folder mark instead: io/folders.py)."""
    try:
        d = parse_json(read_text(Path(folder) / "eval.json"), "eval.json")
    except (OSError, ValueError):  # UserError is a ValueError
        return False
    return isinstance(d, dict) and {"protocol", "n_samples", "fid", "checkpoint_sha256"} <= set(d)


@dataclass(frozen=True)
class EvalSpec(Config):
    """What `ddpm eval` measures; checked when built. The defaults are the paper's protocol.

    :param n: samples per set (50,000, the paper's). :param seed_sets: K sets of n (FID mean ± std).
    :param batch: samples per forward pass, per process. :param bpd_n: bits/dim of the first N test
        images (None: all; 0: skip), `bpd_batch` at a time.
    :param ref_train, ref_test: reference statistics (default: computed from the run's data and
        cached in RUN_DIR/eval).
    """

    n: int = 50_000
    seed: int = 0
    seed_sets: int = 1
    batch: int = 256
    bpd_n: Optional[int] = None
    bpd_batch: int = 64
    ref_train: Union[str, Path, None] = None
    ref_test: Union[str, Path, None] = None

    def validate(self) -> None:
        n, seed_sets, bpd_n = self.n, self.seed_sets, self.bpd_n
        for flag, value, least in (("--n", n, 1), ("--batch", self.batch, 1), ("--bpd-batch", self.bpd_batch, 1),
                                   ("--seed", self.seed, 0), ("--bpd-n", 0 if bpd_n is None else bpd_n, 0),
                                   ("--seed-sets", seed_sets, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise UserError(f"{flag} {value}: give an integer >= {least}")
        check_count(n, "--n", MAX_SAMPLES, why="the six-digit sample names 000000.png … 999999.png")
        check_count(n * seed_sets, "--n times --seed-sets", MAX_SAMPLES,
                    why="the six-digit sample names 000000.png … 999999.png")
        check_count(bpd_n or 1, "--bpd-n", MAX_SAMPLES)
        for flag, value in (("--batch", self.batch), ("--bpd-batch", self.bpd_batch)):
            check_count(value, flag, MAX_BATCH)


EMA_RECORD = "ema (the paper evaluates the EMA weights)"  # eval.json's "weights" for the paper's EMA


def eval_folder_name(loaded: LoadedRun, sampler: SamplerSpec) -> str:
    """RUN/eval/<this>: the checkpoint's name (a post-hoc EMA's file name: phema-WIDTH-STEP), "-model"
    for the trained weights, and the sampler's tag."""
    return loaded.checkpoint.stem + ("-model" if loaded.weights == "model" else "") + sampler.tag


def evaluate_run(model: ModelSpec, spec: EvalSpec = EvalSpec(), *, out_dir=None, sampler: SamplerSpec = SamplerSpec(),
                 guidance: GuidanceSpec = GuidanceSpec(), inception: InceptionSpec = InceptionSpec(), dist=None,
                 progress: bool = True) -> dict:
    """`ddpm eval`: the paper's evaluation of a run's EMA weights, into one JSON report.

    1. n samples with `sampler` (default Algorithm 2) from the EMA weights, saved as PNGs (+
       samples.npz) under OUT/samples (OUT: RUN_DIR/eval/<checkpoint>, with the sampler's `tag`
       for a few-step one; resumable; image i from seed (seed, i); split over processes);
    2. their FID against the training split and the test split of the run's data (reference
       statistics from `ref_train` / `ref_test`, else computed once and cached in RUN_DIR/eval/),
       KID and precision/recall from the same features, and their Inception Score (10 splits, and
       over all samples as the official code; None for weights without the classifier);
       with `seed_sets` K > 1, K·n samples are drawn and sample set k is images k·n … (k+1)·n − 1
       (independent: image i has its own seed): FID mean ± std over the K sets;
       the memorization check: each sample's nearest training images in feature space, against
       the held-out (test) images' (`memorization_check`; OUT/memorization.png);
    3. bits/dim of the test split (the first `bpd_n` images; None: all; 0: skip), by
       `nll.evaluate_nll` into OUT/nll (resumable);
    4. OUT/eval.json with every number and what it was measured against.

    A class-conditional run samples its classes in the training set's proportions (the usual
    protocol for conditional FID; `sample.proportional_labels`) with guidance weight `guidance`,
    both recorded, and its bits/dim are those of log p(x | c) with the test images' true labels.

    :param model: the run (its EMA weights: the paper's protocol), the device, the fast paths and
        the precision, recorded with the model in every settings record of the evaluation.
    :param spec: n, seed, seed_sets, the batches and the references (`EvalSpec`).
    :param out_dir: default RUN_DIR/eval/<checkpoint name>.
    :param guidance: the guidance weight (the classes are the training set's proportions).
    """
    t0 = time.time()
    # every input is checked before the Inception weights are loaded and sampling starts (the
    # specs when they were built)
    n, seed, seed_sets, batch = spec.n, spec.seed, spec.seed_sets, spec.batch
    bpd_n, bpd_batch, ref_train, ref_test = spec.bpd_n, spec.bpd_batch, spec.ref_train, spec.ref_test
    _check_batch(inception.batch)
    if guidance.classes.given():
        raise UserError("ddpm eval samples a conditional model's classes in the training set's proportions; give "
                        "the guidance weight only")
    for ref in (ref_train, ref_test):
        if ref is not None:
            load_stats(ref)
    dist = dist or dist_init(model.device.value)
    run_dir = Path(model.run)
    loaded = load_run(run_dir, weights=model.weights, device=dist.device, fast=model.fast.value,
                      precision=model.precision.value)
    run, ema, diffusion, ckpt_file = loaded.run, loaded.model, loaded.diffusion, loaded.checkpoint
    base = run_dir if run_dir.is_dir() else run_dir.parent
    out_dir = Path(out_dir) if out_dir is not None else base / "eval" / eval_folder_name(loaded, sampler)
    check_folder(out_dir, _is_evaluation, "an evaluation")  # created below, once the rest is checked
    m = run.model
    shape = (m.in_channels, *m.size)
    inception_batch = inception.batch
    inception = load_inception(inception.file, expected_sha256=inception.sha256, device=dist.device)
    log = _log if dist.is_main else (lambda *_: None)

    # 1. samples, as the files a user would save
    total = n * seed_sets
    labels, _, classes = sample_labels(ClassChoice(), total, m.num_classes, *loaded.class_info)
    guidance = guidance.weight
    if labels is None:
        conditioned(ema, None, 0, guidance)  # a weight for an unconditional model: one line
    claim_folder(out_dir, _is_evaluation, "an evaluation")
    chain = sampler.describe(diffusion)
    log(f"eval: {total} samples of the {describe_weights(loaded.weights)} weights ({chain}) of {ckpt_file} into {out_dir / 'samples'}"
        + (f", {seed_sets} sets of {n}" if seed_sets > 1 else ""))
    res = sample_to_dir(ema, diffusion, out_dir / "samples", SampleSet(shape, total, seed, batch, labels, classes, guidance),
                        sampler=sampler, dist=dist, progress=progress, provenance=Provenance.of(loaded))
    every = open_images(Path(res["npz"]))  # the PNGs' pixels, read back from the files
    sets = [every if seed_sets == 1 else Subset(every, k * n, (k + 1) * n) for k in range(seed_sets)]
    stats, is_ = samples_stats(sets[0], inception, batch=inception_batch, dist=dist, progress=progress,
                               run=str(base), checkpoint=str(ckpt_file), weights=loaded.weights, seed=seed,
                               sampler={**sampler.record(clip=False), "T": diffusion.num_timesteps})
    report = dict(run=str(base), checkpoint=str(ckpt_file), checkpoint_sha256=loaded.sha256, weights=EMA_RECORD if loaded.weights == "ema" else loaded.weights,
                  precision=loaded.precision.value, n_samples=n, seed=seed, samples_dir=str(out_dir / "samples"), protocol=PROTOCOL,
                  sampler={**sampler.record(), "T": diffusion.num_timesteps, "description": chain},
                  inception=dict(inception.info), inception_score=is_, samples_pixels_sha256=stats.provenance["pixels_sha256"])
    notes = [] if is_ is not None else [no_inception_score(inception.info)]
    if labels is not None:
        report["conditional"] = dict(guidance=guidance, classes=classes,
                                     samples_per_class=torch.bincount(labels[:n], minlength=m.num_classes).tolist())

    # 2. FID, KID and precision/recall against the training and test splits
    data = run.data if run.data.resolution else run.data.replace(resolution=m.resolution)
    report["fid"], report["kid"], report["precision_recall"], report["references"] = {}, {}, {}, {}
    refs = {}
    for split, given in (("train", ref_train), ("test", ref_test)):
        if given is not None:
            ref = load_stats(given)
        else:
            try:
                ref = cached_reference(base / "eval" / f"ref-{split}.npz", data.replace(split=split), inception,
                                       batch=inception_batch, dist=dist, progress=progress)
            except UserError as e:
                if split == "train":  # the paper's number: no report without it
                    raise UserError(f"FID against the training split: {e} (or pass --ref-train STATS.npz)") from None
                report["fid"][split] = report["kid"][split] = report["precision_recall"][split] = None
                notes.append(f"no FID against the {split} split: {e}")
                log(f"eval: warning: no FID against the {split} split: {e}")
                continue
        c = compare(stats, ref, where=str(given or f"the {split} reference"), seed=seed)
        report["fid"][split], report["kid"][split], report["precision_recall"][split] = \
            c["fid"], c["kid"], c["precision_recall"]
        report["references"][split] = _ref_summary(ref)
        refs[split] = ref
        notes += [c["note"], _n_note(n, ref.n)]
    if seed_sets > 1:
        others = [samples_stats(src, inception, batch=inception_batch, dist=dist, progress=progress, keep=0)[0]
                  for src in sets[1:]]
        report["fid_seed_sets"] = {
            split: seed_set_summary([fid_from_stats(st, ref) for st in [stats] + others], n)
            for split, ref in refs.items()}
    if "train" in refs and dist.is_main:
        try:
            train_images = open_data(data.replace(split="train"), progress=False) if ref_train is None else None
            report["memorization"] = memorization_check(stats, refs["train"], refs.get("test"))
            if train_images is not None and report["memorization"]:
                draw_memorization(report["memorization"], sets[0], train_images, out_dir / MEMORIZATION_PNG)
                report["memorization"]["figure"] = MEMORIZATION_PNG
        except UserError as e:
            report["memorization"] = None
            notes.append(f"no memorization check: {e}")

    # 3. bits/dim on the test split
    report["bits_per_dim"] = None
    if bpd_n != 0:
        try:
            test = open_data(data.replace(split="test"), progress=progress)
        except UserError as e:
            notes.append(f"no bits/dim: {e}")
            log(f"eval: warning: no bits/dim: {e}")
        else:
            imgs, test_labels = eval_images(test, m, min(bpd_n, len(test)) if bpd_n else None)
            log(f"eval: bits/dim of {len(imgs)} test images ({diffusion.num_timesteps} terms each) into {out_dir / 'nll'}")
            nll = evaluate_nll(ema, diffusion, out_dir / "nll", NLLImages(imgs, bpd_batch, seed, test_labels), dist=dist,
                               progress=progress, provenance=Provenance.of(loaded))
            report["bits_per_dim"] = dict(nll, split="test", data=test.source_description)
    report["notes"] = sorted({x for x in notes if x})
    report["seconds"] = round(time.time() - t0, 1)
    if dist.is_main:
        write_json(out_dir / "eval.json", report)
        log(f"eval: wrote {out_dir / 'eval.json'}")
    return report


# ---------------------------------------------------------------------------------------------
# FID during training
# ---------------------------------------------------------------------------------------------


class TrainingFID:
    """FID (and IS) of the EMA weights every N steps of `train`, on every process at once.

    Each process draws its contiguous block of the n samples (image i from seed (seed, i), the
    same images at every evaluation, so the curve is not noisier than it must be), rounds them to
    uint8, runs Inception on them, and the float64 statistics are merged over processes; process 0
    computes the distance and shares it. No process waits for another's sampling.

    :param ref: reference statistics (a path or `FIDStats`); None: computed from `images` (the
        training set, no flips) on all processes and cached at `cache`.
    """

    def __init__(self, *, n: int = 10_000, batch: int = 250, seed: int = 0, ref=None, images=None, data=None,
                 cache: Optional[Path] = None, weights=None, expected_sha256=OFFICIAL, dist=None,
                 inception_batch: int = 100, class_counts: Optional[Sequence[int]] = None,
                 sampler: SamplerSpec = SamplerSpec()):
        self.dist = dist or DistInfo()
        self.sampler = sampler
        # a conditional model: samples in the training set's class proportions, unguided (w = 1)
        self.class_counts = class_counts
        self.n, self.batch, self.inception_batch = int(n), int(batch), int(inception_batch)
        self.seed = derive_seed(seed, 0xF1D)
        self.inception = load_inception(weights, expected_sha256=expected_sha256, device=self.dist.device)
        if isinstance(ref, FIDStats):
            self.ref = ref
        elif ref is not None:
            self.ref = load_stats(ref)
        else:
            if images is None or data is None or cache is None:
                raise ValueError("TrainingFID needs ref, or images + data + cache to compute it")
            old = _valid_cache(Path(cache), images, self.inception, self.dist)
            if old is not None:
                self.ref = old
                return
            self.ref = reference_stats(data, self.inception, batch=inception_batch, dist=self.dist, images=images,
                                       keep=SAMPLE_FEATURES)
            if self.dist.is_main:
                save_stats(cache, self.ref)

    @torch.no_grad()
    def __call__(self, ema, diffusion, shape) -> dict:
        """:param shape: (C, H, W) of one sample. -> dict(fid, kid, precision, recall, is_mean, is_std,
        fid_n, fid_seconds) on every process (None for what these weights or references cannot give)."""
        t0 = time.time()
        mine = shard(range(self.n), self.dist.rank, self.dist.world_size)

        def batches():
            for s in range(0, len(mine), self.batch):
                idx = mine[s:s + self.batch]
                labels = proportional_labels(self.class_counts, idx) if self.class_counts else None
                x = to_uint8(sample(ema, diffusion, shape, Images(self.seed, idx, labels), device=self.dist.device,
                                    sampler=self.sampler))
                for j in range(0, len(idx), self.inception_batch):
                    yield idx[j:j + self.inception_batch], x[j:j + self.inception_batch].cpu()

        m = measure_batches(batches(), self.n, self.inception, self.dist)
        rec = None
        if self.dist.is_main:
            r = m.inception_score() or {}
            c = compare(FIDStats.from_features(m.stats, {"inception": self.inception.info}, m.features, m.index),
                        self.ref, where="the FID reference")
            pr = c["precision_recall"] or {}
            rec = dict(fid=c["fid"], kid=(c["kid"] or {}).get("kid_mean"), precision=pr.get("precision"),
                       recall=pr.get("recall"), is_mean=r.get("is_mean"), is_std=r.get("is_std"), fid_n=self.n,
                       fid_seconds=round(time.time() - t0, 1))
        return broadcast_object(rec, self.dist)


# ---------------------------------------------------------------------------------------------


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The commands
# ---------------------------------------------------------------------------------------------


def _number_or_null(v) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def read_eval_report(path) -> dict:
    """An `eval.json` that `ddpm eval` wrote, its fields checked where they are read (by `ddpm
    report` and the model card of `ddpm export`): one line naming the file and the field otherwise."""
    path = Path(path)
    advice = "run `ddpm eval` again, or move the file away"
    rep = load_json(path, expect=dict)
    get_field(rep, "checkpoint_sha256", str, path, default=None, advice=advice)
    get_field(rep, "n_samples", int, path, ok=lambda v: v >= 0, need="an integer >= 0", default=None, advice=advice)
    get_field(rep, "fid", (dict, type(None)), path, ok=lambda d: d is None or all(map(_number_or_null, d.values())),
              need="an object of numbers by split", default=None, advice=advice)
    for key, numbers in (("inception_score", ("is_mean", "is_std")), ("bits_per_dim", ("total_bpd",))):
        part = get_field(rep, key, (dict, type(None)), path, default=None, advice=advice)
        if part:
            for k in numbers:
                get_field(part, k, float, f"{path} [{key}]", ok=_number_or_null, need="a number",
                          default=None if key == "bits_per_dim" else REQUIRED, advice=advice)
    get_field(rep, "references", (dict, type(None)), path, default=None, advice=advice)
    sampler = get_field(rep, "sampler", (dict, type(None)), path, default=None, advice=advice)  # none before it was recorded
    if sampler:
        get_field(sampler, "description", str, f"{path} [sampler]", default=None, advice=advice)
    for key, numbers in (("kid", ("kid_mean", "kid_std")), ("precision_recall", ("precision", "recall", "k"))):
        by_split = get_field(rep, key, (dict, type(None)), path, default=None, advice=advice) or {}
        for split, part in by_split.items():
            where = f"{path} [{key}.{split}]"
            if part is not None and not isinstance(part, dict):
                raise UserError(f"{where}: {part!r} is not an object of numbers; {advice}")
            for k in numbers if part else ():
                get_field(part, k, float, where, need="a number", advice=advice)
    for split, sets in (get_field(rep, "fid_seed_sets", (dict, type(None)), path, default=None, advice=advice) or {}).items():
        where = f"{path} [fid_seed_sets.{split}]"
        if not isinstance(sets, dict):
            raise UserError(f"{where}: {sets!r} is not an object; {advice}")
        for k, kind in (("sets", int), ("n_each", int), ("mean", float)):
            get_field(sets, k, kind, where, need="a number", advice=advice)
        get_field(sets, "std", float, where, ok=_number_or_null, need="a number or null", default=None, advice=advice)
    mem = get_field(rep, "memorization", (dict, type(None)), path, default=None, advice=advice)
    if mem:
        where = f"{path} [memorization]"
        get_field(mem, "closer_than_heldout_p01", float, where, ok=_number_or_null, need="a number or null",
                  default=None, advice=advice)
        get_field(mem, "figure", str, where, ok=lambda v: v == MEMORIZATION_PNG, need=f"'{MEMORIZATION_PNG}'",
                  default=None, advice=advice)
        hist = get_field(mem, "histogram", dict, where, advice=advice)
        numbers = lambda v: isinstance(v, list) and all(_number_or_null(x) and x is not None for x in v)  # noqa: E731
        get_field(hist, "edges", list, f"{where} [histogram]", ok=numbers, need="a list of numbers", advice=advice)
        get_field(hist, "samples", list, f"{where} [histogram]", ok=numbers, need="a list of numbers", advice=advice)
        get_field(hist, "heldout", (list, type(None)), f"{where} [histogram]", ok=lambda v: v is None or numbers(v),
                  need="a list of numbers or null", default=None, advice=advice)
    return rep


def _is_fid_report(path: Path) -> bool:
    try:
        d = parse_json(read_text(path), path)
    except (OSError, ValueError):  # UserError is a ValueError
        return False
    return isinstance(d, dict) and {"fid", "samples"} <= set(d)


def _check_batch(batch) -> None:
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise UserError(f"--inception-batch {batch}: give an integer >= 1")
    check_count(batch, "--inception-batch", MAX_BATCH)


def fid_ref_run(data: DataConfig, out, *, n: Optional[int] = None, inception: InceptionSpec = InceptionSpec(),
                device: str = "auto", progress: bool = True) -> FIDStats:
    """`ddpm fid-ref`: the FID reference statistics of a data set, written to `out` (.npz), with the
    Inception `inception`.

    :param n: the first n images of the set only (None: all of them), e.g. a 10,000-image reference
        for quick FIDs on a CPU; the statistics record which images they are.
    """
    batch = inception.batch
    # every input is checked before the Inception weights are loaded; an existing file is replaced
    # only if it is reference statistics of ours
    if n is not None:
        check_count(n, "--n", MAX_SAMPLES)
    out = claim_file(out, is_stats_file, "reference statistics", "--out", ".npz")
    _check_batch(batch)
    images = open_data(data, progress=progress)
    if n is not None:
        if n > len(images):
            raise UserError(f"--n {n}: the {data.split} split of {data.source} holds {len(images):,} images; give at "
                            f"most that, or leave --n out for all of them")
        first = Subset(images, 0, n)
        first.skipped = images.skipped  # the files the set itself skipped, recorded with the statistics
        images = first
    dist = dist_init(device)
    net = load_inception(inception.file, expected_sha256=inception.sha256, device=dist.device)
    stats = reference_stats(data, net, batch=batch, dist=dist, progress=progress, images=images)
    if dist.is_main:
        save_stats(out, stats)
    return stats


def fid_run(samples, refs: Sequence, *, out=None, inception: InceptionSpec = InceptionSpec(), device: str = "auto",
            progress: bool = True) -> dict:
    """`ddpm fid`: `fid_report` with the Inception `inception` loaded here; the report is also
    written to `out` (JSON) when given."""
    batch = inception.batch
    for ref in refs:  # every input is checked before the Inception weights are loaded
        load_stats(ref)
    open_images(samples)
    if out is not None:
        claim_file(out, _is_fid_report, "an FID report", "--out", ".json")
    _check_batch(batch)
    dist = dist_init(device)
    net = load_inception(inception.file, expected_sha256=inception.sha256, device=dist.device)
    report = fid_report(samples, refs, net, batch=batch, dist=dist, progress=progress)
    if out is not None and dist.is_main:
        write_json(out, report)
    return report
