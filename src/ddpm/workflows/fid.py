"""FID and Inception Score from features: streaming statistics, the distance, the stats files.

EDM's split, as streams: images -> Inception features (`inception.py`) -> statistics
(`FeatureStats`, `ISStats`: float64 accumulators that merge across batches and processes) -> a
pure function of two statistics (`frechet_distance`). Nothing here needs the network.

The Fréchet distance between N(μ1, Σ1) and N(μ2, Σ2) is
    ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^½.
The trace of the square root uses the identity of the official DDPM code (its
metrics module, a NumPy port of TF-GAN's): Σ1 Σ2 = F Fᵀ Σ2 has the eigenvalues of
the symmetric positive semi-definite Fᵀ Σ2 F for any factor Σ1 = F Fᵀ, so
tr (Σ1 Σ2)^½ = Σ √eig(Fᵀ Σ2 F), an eigenvalue problem of a symmetric matrix in float64. The
official code takes F = Σ1^½ from an SVD; we take the Cholesky factor when Σ1 (or Σ2) is
positive definite and the pivoted (rank-revealing) Cholesky factor otherwise (fewer images
than features): several times faster at 2048-d, the same number to rounding. Tiny negative eigenvalues from
rounding are clipped to 0 and, as in the official code, eigenvalues below 1e-10 are not
square-rooted.
Not `scipy.linalg.sqrtm(Σ1 Σ2)` (pytorch-fid, TTUR): a general-matrix Schur method on a
non-symmetric product that can return complex parts and needs an ad-hoc diagonal offset when
the product is singular; not `eigvals(Σ1 Σ2)` (torch-fidelity, torchmetrics): a non-symmetric
eigenproblem whose eigenvalues can come out complex. No SciPy needed.

The Inception Score is exp(E_x KL(p(y|x) ‖ p(y))) per split, over 10 splits of the images in
index order, reported as mean ± std over the splits (Salimans et al.'s protocol). The official
DDPM code computed a single score over all samples (TF-GAN's `classifier_score_from_logits`);
that number is reported too, as `is_1split`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from ..config import parse_json
from ..errors import UserError
from ..files import regular_file
from ..io.atomic import write_npz

IS_SPLITS = 10
STATS_FORMAT = "ddpm-fid-stats/1"


# ---------------------------------------------------------------------------------------------
# Statistics: float64 accumulators that merge (batches, processes) in any grouping
# ---------------------------------------------------------------------------------------------


class FeatureStats:
    """Running mean and scatter matrix of feature vectors, in float64.

    Batches are merged with Chan et al.'s pairwise update (exact in exact arithmetic, and free of
    the cancellation of Σxxᵀ − n μμᵀ), so the result does not depend on the batch size.
    """

    def __init__(self, dim: int):
        self.dim, self.n = dim, 0
        self.mean = np.zeros(dim, np.float64)
        self.m2 = np.zeros((dim, dim), np.float64)  # Σ (x − mean)(x − mean)ᵀ

    def update(self, features) -> "FeatureStats":
        """:param features: [B, dim]."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features of shape {x.shape}, expected [B, {self.dim}]")
        if len(x):
            other = FeatureStats(self.dim)
            other.n, other.mean = len(x), x.mean(axis=0)
            c = x - other.mean
            other.m2 = c.T @ c
            self.merge(other)
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        if other.n == 0:
            return self
        if self.n == 0:
            self.n, self.mean, self.m2 = other.n, other.mean.copy(), other.m2.copy()
            return self
        n = self.n + other.n
        delta = other.mean - self.mean
        self.m2 = self.m2 + other.m2 + np.outer(delta, delta) * (self.n * other.n / n)
        self.mean = self.mean + delta * (other.n / n)
        self.n = n
        return self

    @property
    def mu(self) -> np.ndarray:
        return self.mean

    @property
    def sigma(self) -> np.ndarray:
        """The unbiased covariance (denominator n − 1), as np.cov and the official code."""
        if self.n < 2:
            raise UserError(f"a covariance needs at least 2 images, got {self.n}")
        return self.m2 / (self.n - 1)

    def pack(self) -> np.ndarray:
        return np.concatenate([[float(self.n)], self.mean, self.m2.ravel()])

    @classmethod
    def unpack(cls, v: np.ndarray, dim: int) -> "FeatureStats":
        s = cls(dim)
        s.n, s.mean, s.m2 = int(round(v[0])), v[1:1 + dim].copy(), v[1 + dim:].reshape(dim, dim).copy()
        return s


class ISStats:
    """Per-split sums for the Inception Score: image i of n belongs to split i·splits // n, so the
    score depends only on the images' order, never on batches or processes.

    Per split k with m_k images: Σ p(y|x), and Σ_x Σ_y p log p. Then
    IS_k = exp( (1/m_k) Σ_x Σ_y p log p − Σ_y q log q ),  q = (1/m_k) Σ_x p(y|x),
    which equals exp of the mean KL(p(y|x) ‖ q).
    """

    def __init__(self, n_total: int, num_classes: int, splits: int = IS_SPLITS):
        if n_total < 1:
            raise UserError("the Inception Score needs at least 1 image")
        # Fewer images than splits (smoke runs only): one image per split; `is_splits` records it.
        splits = min(int(splits), int(n_total))
        self.n_total, self.splits, self.num_classes = int(n_total), splits, int(num_classes)
        self.count = np.zeros(splits, np.float64)
        self.p_sum = np.zeros((splits, num_classes), np.float64)
        self.plogp_sum = np.zeros(splits, np.float64)

    def update(self, logits, indices: Sequence[int]) -> "ISStats":
        """:param logits: [B, classes]; :param indices: each row's image index in 0 … n_total − 1."""
        z = np.asarray(logits, dtype=np.float64)
        idx = np.asarray(indices, dtype=np.int64)
        if z.shape != (len(idx), self.num_classes):
            raise ValueError(f"logits of shape {z.shape} for {len(idx)} indices and {self.num_classes} classes")
        if len(idx) and (idx.min() < 0 or idx.max() >= self.n_total):
            raise ValueError(f"image indices must lie in 0 … {self.n_total - 1}")
        log_p = z - z.max(axis=1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
        p = np.exp(log_p)
        k = idx * self.splits // self.n_total
        np.add.at(self.count, k, 1.0)
        np.add.at(self.p_sum, k, p)
        np.add.at(self.plogp_sum, k, (p * log_p).sum(axis=1))
        return self

    def merge(self, other: "ISStats") -> "ISStats":
        self.count += other.count
        self.p_sum += other.p_sum
        self.plogp_sum += other.plogp_sum
        return self

    @staticmethod
    def _score(count, p_sum, plogp_sum) -> float:
        q = p_sum / count
        with np.errstate(divide="ignore", invalid="ignore"):
            qlogq = np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0).sum()
        return float(math.exp(plogp_sum / count - qlogq))

    def result(self) -> dict:
        if self.count.sum() != self.n_total:
            raise ValueError(f"the Inception Score saw {int(self.count.sum())} of {self.n_total} images")
        scores = [self._score(self.count[k], self.p_sum[k], self.plogp_sum[k]) for k in range(self.splits)]
        one = self._score(self.count.sum(), self.p_sum.sum(axis=0), self.plogp_sum.sum())
        return dict(is_mean=float(np.mean(scores)), is_std=float(np.std(scores)), is_splits=self.splits,
                    is_1split=one)

    def pack(self) -> np.ndarray:
        return np.concatenate([self.count, self.p_sum.ravel(), self.plogp_sum])

    def merge_packed(self, v: np.ndarray) -> "ISStats":
        s, c = self.splits, self.num_classes
        self.count += v[:s]
        self.p_sum += v[s:s + s * c].reshape(s, c)
        self.plogp_sum += v[s + s * c:]
        return self


def inception_score(logits, splits: int = IS_SPLITS) -> dict:
    """IS of logits [N, classes] in index order: dict(is_mean, is_std, is_splits, is_1split)."""
    z = np.asarray(logits, dtype=np.float64)
    return ISStats(len(z), z.shape[1], splits).update(z, np.arange(len(z))).result()


# ---------------------------------------------------------------------------------------------
# The distance
# ---------------------------------------------------------------------------------------------


# As the official code: eigenvalues below this are not square-rooted (√ would blow rounding noise
# of a zero eigenvalue, ~1e-16·‖M‖, up to ~1e-8·√‖M‖ per direction of a singular Σ).
_EPS = 1e-10


def _sqrt_eigenvalues(w: np.ndarray) -> np.ndarray:
    w = np.clip(w, 0.0, None)
    return np.where(w < _EPS, w, np.sqrt(w))


def _pivoted_cholesky(a: np.ndarray) -> np.ndarray:
    """F [d, r] with F Fᵀ = a for a PSD matrix of numerical rank r (LAPACK dpstrf's rule: stop
    when every remaining pivot is below d · ulp · max diag). O(d r²): cheap for few images."""
    d = a.shape[0]
    diag = np.diag(a).astype(np.float64).copy()
    tol = d * np.finfo(np.float64).eps * max(float(diag.max()), 0.0)
    f = np.zeros((d, d), np.float64)
    r = 0
    while r < d:
        j = int(np.argmax(diag))
        if diag[j] <= tol:
            break
        col = a[:, j] - f[:, :r] @ f[j, :r]
        f[:, r] = col / math.sqrt(diag[j])
        diag -= f[:, r] ** 2
        diag[j] = 0.0
        r += 1
    return f[:, :r]


def _trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """tr (Σ1 Σ2)^½ for symmetric positive semi-definite Σ1, Σ2, through a symmetric matrix.

    Σ1 Σ2 = F Fᵀ Σ2 has the eigenvalues of Fᵀ Σ2 F for any factor Σ1 = F Fᵀ. The official code
    takes F = Σ1^½ (two SVDs of d×d). We take the Cholesky factor of Σ1 (or of Σ2: the trace is
    symmetric) when it is positive definite, else the rank-revealing pivoted Cholesky factor of
    Σ1 (d×r when fewer than d+1 images made it): one factorisation and one eigenvalue-only eigh,
    several times faster at 2048-d and the same number to rounding (tests/test_fid.py).
    """
    for a, b in ((s1, s2), (s2, s1)):
        try:
            f = np.linalg.cholesky(a)
        except np.linalg.LinAlgError:
            continue
        break
    else:
        f, b = _pivoted_cholesky((s1 + s1.T) / 2), s2
    m = f.T @ b @ f
    return float(_sqrt_eigenvalues(np.linalg.eigvalsh((m + m.T) / 2)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr (Σ1 Σ2)^½ in float64 (see the module docstring)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise UserError(f"statistics of different shapes: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * _trace_sqrt_product(s1, s2))


# ---------------------------------------------------------------------------------------------
# Reference statistics on disk, with their provenance
# ---------------------------------------------------------------------------------------------


@dataclass
class FIDStats:
    """μ [D], Σ [D, D] (float64) of n images, where they came from, and the features of some of the
    images themselves (float32 [m, D] of the images `feature_index`, in index order; None in
    statistics of other tools and of earlier versions) for KID, precision/recall and the
    memorization check."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    provenance: dict = field(default_factory=dict)
    features: Optional[np.ndarray] = None
    feature_index: Optional[np.ndarray] = None

    @classmethod
    def from_features(cls, fs: FeatureStats, provenance: Optional[dict] = None, features=None,
                      feature_index=None) -> "FIDStats":
        return cls(mu=fs.mu.copy(), sigma=fs.sigma, n=fs.n, provenance=dict(provenance or {}),
                   features=features, feature_index=feature_index)


def save_stats(path: Union[str, Path], stats: FIDStats) -> Path:
    """An .npz with `mu`, `sigma` (the keys pytorch-fid, TTUR and EDM read), `n`, `provenance` (a
    JSON string) and, when there are any, `features` (float32) and `feature_index`, written atomically."""
    path = Path(path)
    if path.suffix != ".npz":
        raise UserError(f"{path}: reference statistics are written as .npz; give a path ending in .npz")
    prov = dict(stats.provenance, format=STATS_FORMAT, n_images=int(stats.n))
    kept = {} if stats.features is None else dict(features=np.asarray(stats.features, np.float32),
                                                  feature_index=np.asarray(stats.feature_index, np.int64))
    return write_npz(path, mu=np.asarray(stats.mu, np.float64), sigma=np.asarray(stats.sigma, np.float64),
                     n=np.int64(stats.n), provenance=np.array(json.dumps(prov, sort_keys=True)), **kept)


def load_stats(path: Union[str, Path]) -> FIDStats:
    """Statistics written by `save_stats`; also plain `mu`/`sigma` .npz files of other tools, whose
    provenance is then unknown (`provenance == {}`)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such statistics file; make one with: ddpm fid-ref --data SOURCE --out {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            keys = set(f.files)
            if not {"mu", "sigma"} <= keys:
                raise UserError(f"{path}: has no 'mu' and 'sigma' arrays (it holds {', '.join(sorted(keys)) or 'nothing'}); "
                                f"make statistics with: ddpm fid-ref")
            mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
            prov = parse_json(str(f["provenance"]), f"{path} [provenance]", expect=dict) if "provenance" in keys else {}
            n = int(f["n"]) if "n" in keys else int(prov.get("n_images", 0))
            features = index = None
            if {"features", "feature_index"} <= keys:
                features, index = np.asarray(f["features"], np.float32), np.asarray(f["feature_index"], np.int64)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}: not a readable .npz of statistics ({type(e).__name__}: {e})") from None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise UserError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together")
    if features is not None and (features.ndim != 2 or features.shape[1] != mu.shape[0]
                                 or index.shape != (features.shape[0],) or not np.isfinite(features).all()
                                 or (len(index) and (index.min() < 0 or index.max() >= max(n, 1)))):
        raise UserError(f"{path}: its features {features.shape} and feature_index {index.shape} do not fit mu "
                        f"{mu.shape} and n = {n}; make the statistics again with: ddpm fid-ref")
    return FIDStats(mu=mu, sigma=sigma, n=n, provenance=prov, features=features, feature_index=index)


def is_stats_file(path: Union[str, Path]) -> bool:
    """Whether `path` holds statistics written by `save_stats` (its provenance says so)."""
    try:
        with np.load(regular_file(path), allow_pickle=False) as f:
            return "provenance" in f.files and json.loads(str(f["provenance"])).get("format") == STATS_FORMAT
    except Exception:  # not an .npz, or not ours
        return False


def fid_from_stats(samples: FIDStats, reference: FIDStats, *, where: str = "reference") -> float:
    """FID between two statistics, refusing ones measured with different Inception weights."""
    a = samples.provenance.get("inception", {}).get("weights_sha256")
    b = reference.provenance.get("inception", {}).get("weights_sha256")
    if a and b and a != b:
        raise UserError(f"{where}: its statistics were measured with Inception weights sha256 {b[:8]}…, the samples "
                        f"with {a[:8]}…; recompute them with the same weights (ddpm fid-ref)")
    return frechet_distance(samples.mu, samples.sigma, reference.mu, reference.sigma)
