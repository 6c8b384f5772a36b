"""Feature-space metrics beyond FID: KID, precision/recall, nearest neighbours.

Pure functions of feature matrices [N, D] (float32 or float64 NumPy arrays, e.g. Inception pool
features from `evaluate.py`); nothing here needs the network. Distances and kernels are computed in
float64, in row blocks: a block of `block` query rows against all key rows at a time, so 50,000 ×
2048 features never build an N × N matrix (memory: the keys in float64 plus block × N_keys × 8
bytes, 400 MB at 1024 × 50,000).

Kernel Inception Distance (Bińkowski et al. 2018, "Demystifying MMD GANs"): the unbiased estimator
of the squared maximum mean discrepancy with the cubic polynomial kernel
    k(x, y) = (xᵀy / d + 1)³,   d the feature dimension,
    MMD²_u = Σ_{i≠j} k(x_i, x_j) / (m(m−1)) + Σ_{i≠j} k(y_i, y_j) / (n(n−1)) − 2 Σ_{i,j} k(x_i, y_j) / (mn),
averaged over random subsets of m = n rows drawn without replacement from each set, reported as
mean and standard deviation over the subsets. Its expectation is the population MMD², so it is 0
in expectation for identical distributions and can be negative. This is the definition of the
paper's code and of torch-fidelity's `metric_kid`; it is written here by hand because
torch-fidelity's metric modules import torchvision, which ddpm never imports.

Improved precision and recall (Kynkäänniemi et al. 2019, "Improved precision and recall metric
for assessing generative models"): each feature φ of a set Φ gets the radius r_k(φ) = ‖φ − NN_k(φ)‖,
the distance to its k-th nearest neighbour among the other members of Φ (itself excluded), and
    f(φ, Φ) = 1 if ‖φ − φ'‖ ≤ r_k(φ') for at least one φ' ∈ Φ, else 0,
    precision = mean over fake φ_g of f(φ_g, Φ_real),   recall = mean over real φ_r of f(φ_r, Φ_fake).

Squared Euclidean distances are ‖a‖² + ‖b‖² − 2 aᵀb in float64, clamped at 0 (`_squared_distances`,
the one place they are computed); comparisons are made between squared distances.
"""

from __future__ import annotations

from typing import Iterator, Tuple

import numpy as np

from ..errors import UserError

BLOCK = 1024


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def _features(x, name: str) -> np.ndarray:
    """`x` as a 2-D array of finite real numbers (its own dtype: blocks are cast to float64)."""
    a = np.asarray(x)
    if a.ndim != 2 or a.shape[1] < 1:
        raise UserError(f"{name}: features must be a matrix [N, D] with D ≥ 1, got shape {a.shape}")
    if a.dtype.kind not in "fiu":
        raise UserError(f"{name}: features must be real numbers, got dtype {a.dtype}")
    if not np.isfinite(a).all():
        raise UserError(f"{name}: features contain NaN or infinite values")
    return a


def _same_dim(a: np.ndarray, b: np.ndarray, names: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise UserError(f"{names}: features of different dimensions, {a.shape[1]} vs {b.shape[1]}")


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UserError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


# ---------------------------------------------------------------------------------------------
# Distances, in row blocks
# ---------------------------------------------------------------------------------------------


def _squared_distances(queries: np.ndarray, keys: np.ndarray,
                       block: int) -> Iterator[Tuple[int, np.ndarray]]:
    """(start, D²) for each block of query rows: D²[i, j] = ‖q_{start+i} − k_j‖², float64, ≥ 0.

    ‖q‖² + ‖k‖² − 2 qᵀk; the block is [≤ block, len(keys)].
    """
    k64 = np.asarray(keys, np.float64)
    k_norms = np.einsum("ij,ij->i", k64, k64)
    for start in range(0, len(queries), block):
        q = np.asarray(queries[start:start + block], np.float64)
        d2 = np.einsum("ij,ij->i", q, q)[:, None] + k_norms[None, :] - 2.0 * (q @ k64.T)
        yield start, np.maximum(d2, 0.0, out=d2)


def _knn_squared(queries: np.ndarray, keys: np.ndarray, k: int, block: int,
                 exclude_self: bool = False) -> Tuple[np.ndarray, np.ndarray]:
    """Squared distances [Nq, k] ascending and indices [Nq, k] of each query's k nearest keys.

    With `exclude_self` (queries are the keys), query i never counts key i as a neighbour.
    Equal distances come in no particular order.
    """
    d2_out = np.empty((len(queries), k), np.float64)
    idx_out = np.empty((len(queries), k), np.int64)
    for start, d2 in _squared_distances(queries, keys, block):
        rows = np.arange(len(d2))
        if exclude_self:
            d2[rows, start + rows] = np.inf
        idx = np.argpartition(d2, k - 1, axis=1)[:, :k]
        part = np.take_along_axis(d2, idx, axis=1)
        order = np.argsort(part, axis=1, kind="stable")
        d2_out[start:start + len(d2)] = np.take_along_axis(part, order, axis=1)
        idx_out[start:start + len(d2)] = np.take_along_axis(idx, order, axis=1)
    return d2_out, idx_out


def nearest_neighbours(queries, keys, *, k: int = 1, block: int = BLOCK) -> Tuple[np.ndarray, np.ndarray]:
    """The k nearest keys of each query, exact, by Euclidean distance.

    :return: distances [Nq, k] float64, ascending along each row, and the keys' row indices
        [Nq, k] int64. Equal distances come in no particular order.
    """
    q, c = _features(queries, "queries"), _features(keys, "keys")
    _same_dim(q, c, "queries and keys")
    k, block = _positive_int(k, "k"), _positive_int(block, "block")
    if k > len(c):
        raise UserError(f"k = {k} nearest neighbours asked of {len(c)} keys; k must be at most the number of keys")
    d2, idx = _knn_squared(q, c, k, block)
    return np.sqrt(d2), idx


# ---------------------------------------------------------------------------------------------
# Improved precision and recall
# ---------------------------------------------------------------------------------------------


def _radii_squared(x: np.ndarray, k: int, block: int) -> np.ndarray:
    """r_k(φ)² for each row φ of x: its squared distance to its k-th nearest other row."""
    return _knn_squared(x, x, k, block, exclude_self=True)[0][:, k - 1]


def _coverage(points: np.ndarray, centres: np.ndarray, radii2: np.ndarray, block: int) -> float:
    """The fraction of points within (≤) the radius of at least one centre."""
    inside = 0
    for _, d2 in _squared_distances(points, centres, block):
        inside += int(np.count_nonzero((d2 <= radii2[None, :]).any(axis=1)))
    return inside / len(points)


def precision_recall(real, fake, *, k: int = 3, block: int = BLOCK) -> dict:
    """Kynkäänniemi et al.'s improved precision and recall (see the module docstring).

    precision: the fraction of fake features inside the k-NN ball of some real feature;
    recall: the fraction of real features inside the k-NN ball of some fake feature.
    :return: dict(precision, recall, k, n_real, n_fake).
    """
    r, f = _features(real, "real"), _features(fake, "fake")
    _same_dim(r, f, "real and fake")
    k, block = _positive_int(k, "k"), _positive_int(block, "block")
    for name, x in (("real", r), ("fake", f)):
        if k >= len(x):
            raise UserError(f"k = {k} needs more than k {name} features, got {len(x)}; "
                            f"use a smaller k or more features")
    precision = _coverage(f, r, _radii_squared(r, k, block), block)
    recall = _coverage(r, f, _radii_squared(f, k, block), block)
    return dict(precision=precision, recall=recall, k=k, n_real=len(r), n_fake=len(f))


# ---------------------------------------------------------------------------------------------
# Kernel Inception Distance
# ---------------------------------------------------------------------------------------------


def _kernel_sum(x: np.ndarray, y: np.ndarray, block: int, skip_diagonal: bool = False) -> float:
    """Σ_{i,j} (x_iᵀy_j / d + 1)³ in float64, without the terms i = j when `skip_diagonal`."""
    d = x.shape[1]
    total = 0.0
    for start in range(0, len(x), block):
        kb = (x[start:start + block] @ y.T / d + 1.0) ** 3
        if skip_diagonal:
            rows = np.arange(len(kb))
            kb[rows, start + rows] = 0.0
        total += float(kb.sum())
    return total


def mmd2_unbiased(x, y, *, block: int = BLOCK) -> float:
    """The unbiased estimator of MMD² with the cubic polynomial kernel (see the module docstring):
    Σ_{i≠j} k(x_i, x_j) / (m(m−1)) + Σ_{i≠j} k(y_i, y_j) / (n(n−1)) − 2 Σ_{i,j} k(x_i, y_j) / (mn)."""
    x, y = _features(x, "x"), _features(y, "y")
    _same_dim(x, y, "x and y")
    block = _positive_int(block, "block")
    m, n = len(x), len(y)
    if m < 2 or n < 2:
        raise UserError(f"the unbiased MMD² needs at least 2 features in each set, got {m} and {n}")
    x, y = x.astype(np.float64), y.astype(np.float64)
    return (_kernel_sum(x, x, block, skip_diagonal=True) / (m * (m - 1))
            + _kernel_sum(y, y, block, skip_diagonal=True) / (n * (n - 1))
            - 2.0 * _kernel_sum(x, y, block) / (m * n))


def kid(features_a, features_b, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0,
        block: int = BLOCK) -> dict:
    """Kernel Inception Distance: MMD²_u on `subsets` pairs of random subsets, each of
    `subset_size` rows drawn without replacement (numpy `default_rng(seed)`).

    A set with fewer rows than `subset_size` makes every subset min(len(a), len(b)) rows, recorded
    as `kid_subset_size`. :return: dict(kid_mean, kid_std, kid_subsets, kid_subset_size); the std
    is over the subsets (ddof 0).
    """
    a, b = _features(features_a, "features_a"), _features(features_b, "features_b")
    _same_dim(a, b, "features_a and features_b")
    subsets, subset_size = _positive_int(subsets, "subsets"), _positive_int(subset_size, "subset_size")
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise UserError(f"KID needs at least 2 features in each set, got {len(a)} and {len(b)} "
                        f"(subset_size = {subset_size})")
    rng = np.random.default_rng(seed)
    values = np.empty(subsets, np.float64)
    for s in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        values[s] = mmd2_unbiased(x, y, block=block)
    return dict(kid_mean=float(values.mean()), kid_std=float(values.std()), kid_subsets=subsets,
                kid_subset_size=m)
