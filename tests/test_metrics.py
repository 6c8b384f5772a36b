"""KID, precision/recall and nearest neighbours against facts from outside the code.

KID: the population MMD² of discrete distributions in closed form, approached by the mean over
subsets within a Monte Carlo tolerance (and far from the biased V-statistic's expectation); 0 in
expectation for identical distributions, with negative values; the kernel and the estimator written
out by hand; the mean and std over subsets.
Precision/recall: identical and disjoint sets, points on a line worked out by hand, the k-th
neighbour that excludes the point itself, a point exactly at the radius, a brute-force reference.
Nearest neighbours: a brute-force sort of the full distance matrix, for block sizes that do and do
not divide N. All on small arrays; the file runs in a few seconds on one core.
"""

import itertools

import numpy as np
import pytest

from ddpm.errors import UserError
from ddpm.workflows.metrics import kid, mmd2_unbiased, nearest_neighbours, precision_recall


def _cubic(x, y):
    """k(x, y) = (xᵀy / d + 1)³ for all pairs, from the KID paper."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _on_a_line(values, dim=3):
    """1-d features padded with zeros to `dim` columns (exact small integers in float64)."""
    x = np.zeros((len(values), dim))
    x[:, 0] = values
    return x


# ---------------------------------------------------------------------------------------------
# KID
# ---------------------------------------------------------------------------------------------


def _population_and_bias(a_set, b_set, m):
    """Population MMD² of X ~ uniform(a_set), Y ~ uniform(b_set) (all pairs, with replacement),
    and the bias the V-statistic (diagonal included, / m²) would have at subset size m:
    (E k(x, x) − E k(x, x')) / m for each of the two sets."""
    kaa, kbb, kab = _cubic(a_set, a_set), _cubic(b_set, b_set), _cubic(a_set, b_set)
    population = kaa.mean() + kbb.mean() - 2 * kab.mean()
    bias = (np.diag(kaa).mean() - kaa.mean()) / m + (np.diag(kbb).mean() - kbb.mean()) / m
    return population, bias


def _kid_tolerance(result, n_rows):
    """Standard error of kid_mean around the population value. Given the samples, the subsets are
    nearly independent (two 10-subsets of 100,000 rows rarely share a row): variance std²/subsets.
    The samples' own estimate (the mean over all subsets) is a U-statistic of n_rows rows, whose
    variance is at most (m / n_rows) times that of one subset's (Hoeffding 1948: n·Var(U_n) does not
    increase with n)."""
    return result["kid_std"] * np.sqrt(1 / result["kid_subsets"] + result["kid_subset_size"] / n_rows)


def test_kid_mean_approaches_the_population_mmd2_of_two_discrete_distributions():
    rng = np.random.default_rng(1)
    a_set, b_set = rng.standard_normal((5, 4)), rng.standard_normal((5, 4)) + 0.5
    m, n = 10, 100_000
    population, bias = _population_and_bias(a_set, b_set, m)
    x, y = a_set[rng.integers(0, 5, n)], b_set[rng.integers(0, 5, n)]
    result = kid(x, y, subsets=2000, subset_size=m, seed=0)
    se = _kid_tolerance(result, n)
    assert result["kid_subsets"] == 2000 and result["kid_subset_size"] == m
    assert abs(result["kid_mean"] - population) < 5 * se, (result, population, se)
    assert bias > 10 * se  # the test's power: a biased (V-statistic) estimator would fail it


def test_kid_of_identical_distributions_is_zero_in_expectation_and_can_be_negative():
    rng = np.random.default_rng(2)
    a_set = rng.standard_normal((5, 4))
    m, n = 10, 100_000
    population, bias = _population_and_bias(a_set, a_set, m)
    assert population == pytest.approx(0.0, abs=1e-12)
    x, y = a_set[rng.integers(0, 5, n)], a_set[rng.integers(0, 5, n)]
    result = kid(x, y, subsets=2000, subset_size=m, seed=0)
    se = _kid_tolerance(result, n)
    assert abs(result["kid_mean"]) < 5 * se, (result, se)
    assert bias > 10 * se
    # The V-statistic is ‖mean embedding of X − that of Y‖² ≥ 0; the unbiased one goes below 0.
    singles = [kid(x, y, subsets=1, subset_size=m, seed=s)["kid_mean"] for s in range(50)]
    assert min(singles) < 0


def test_kid_of_two_rows_each_is_the_formula_written_out():
    # With 2 rows per set every subset is the whole set (in some order): KID is one number,
    # k(x1,x2) + k(y1,y2) − (k(x1,y1) + k(x1,y2) + k(x2,y1) + k(x2,y2)) / 2, std 0.
    x = np.array([[1.0, 2.0, 0.0], [0.0, -1.0, 3.0]])
    y = np.array([[2.0, 0.0, 1.0], [1.0, 1.0, -2.0]])
    d = 3

    def k(u, v):
        return (sum(ui * vi for ui, vi in zip(u, v)) / d + 1.0) ** 3

    expected = k(x[0], x[1]) + k(y[0], y[1]) - (k(x[0], y[0]) + k(x[0], y[1]) + k(x[1], y[0]) + k(x[1], y[1])) / 2
    result = kid(x, y, subsets=5, seed=3)
    assert result["kid_subset_size"] == 2 and result["kid_subsets"] == 5
    assert result["kid_mean"] == pytest.approx(expected, rel=1e-12)
    assert result["kid_std"] == pytest.approx(0.0, abs=1e-12)
    assert mmd2_unbiased(x, y) == pytest.approx(expected, rel=1e-12)
    # The kernel's details matter for these rows: without /d, or squared, or without +1, it differs.
    for other in (lambda u, v: (u @ v + 1) ** 3, lambda u, v: (u @ v / d + 1) ** 2, lambda u, v: (u @ v / d) ** 3):
        wrong = other(x[0], x[1]) + other(y[0], y[1]) - sum(other(p, q) for p in x for q in y) / 2
        assert abs(wrong - expected) > 0.1


@pytest.mark.parametrize("block", [1, 3, 1024])
def test_mmd2_unbiased_is_the_paper_formula_for_unequal_sizes_and_any_block(block):
    # Σ_{i≠j} k(x_i, x_j) / (m(m−1)) + Σ_{i≠j} k(y_i, y_j) / (n(n−1)) − 2 Σ_{i,j} k(x_i, y_j) / (mn),
    # the sums over i ≠ j taken with a mask on the full kernel matrices.
    rng = np.random.default_rng(10)
    x, y = rng.standard_normal((20, 5)), rng.standard_normal((13, 5)) + 0.3
    m, n = len(x), len(y)
    off_x, off_y = ~np.eye(m, dtype=bool), ~np.eye(n, dtype=bool)
    expected = (_cubic(x, x)[off_x].sum() / (m * (m - 1)) + _cubic(y, y)[off_y].sum() / (n * (n - 1))
                - 2 * _cubic(x, y).sum() / (m * n))
    assert mmd2_unbiased(x, y, block=block) == pytest.approx(expected, rel=1e-12)


def test_kid_mean_and_std_are_over_subsets_of_the_rows_drawn_without_replacement():
    # a has 3 rows and b 2, subsets of 2: each subset is one of the 3 pairs of a's rows with both
    # of b's, so its MMD²_u is one of 3 values computed here. The mean and the std (ddof 0) over 4
    # subsets must be those of some 4 of these values.
    a = np.array([[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0]])
    b = np.array([[0.5, 0.5], [2.0, -1.0]])

    def k(u, v):
        return (u @ v / 2 + 1.0) ** 3

    values = [k(a[i], a[j]) + k(b[0], b[1]) - sum(k(a[p], q) for p in (i, j) for q in b) / 2
              for i, j in itertools.combinations(range(3), 2)]
    spread = False
    for seed in range(5):
        result = kid(a, b, subsets=4, subset_size=2, seed=seed)
        assert result["kid_subset_size"] == 2 and result["kid_subsets"] == 4
        assert any(result["kid_mean"] == pytest.approx(np.mean(c), rel=1e-12)
                   and result["kid_std"] == pytest.approx(np.std(c), rel=1e-12, abs=1e-12)
                   for c in itertools.combinations_with_replacement(values, 4)), result
        spread |= result["kid_std"] > 0.1
    assert spread  # some seed drew different pairs, so ddof 0 vs 1 is told apart


def test_kid_uses_the_smaller_set_size_and_records_it():
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((7, 5)), rng.standard_normal((50, 5))
    result = kid(a, b, subsets=3, subset_size=1000)
    assert result["kid_subset_size"] == 7


def test_float32_features_give_the_float64_results_of_the_same_values():
    # Everything is computed in float64: float32 input is the float64 input of the same values.
    rng = np.random.default_rng(5)
    a32, b32 = rng.standard_normal((60, 16)).astype(np.float32), rng.standard_normal((40, 16)).astype(np.float32)
    a64, b64 = a32.astype(np.float64), b32.astype(np.float64)
    assert kid(a32, b32, subsets=4, subset_size=20) == kid(a64, b64, subsets=4, subset_size=20)
    assert precision_recall(a32, b32) == precision_recall(a64, b64)
    d32, i32 = nearest_neighbours(b32, a32, k=3)
    d64, i64 = nearest_neighbours(b64, a64, k=3)
    assert d32.dtype == np.float64 and np.array_equal(d32, d64) and np.array_equal(i32, i64)


# ---------------------------------------------------------------------------------------------
# Precision and recall
# ---------------------------------------------------------------------------------------------


def test_identical_sets_have_precision_and_recall_1():
    x = np.random.default_rng(6).standard_normal((200, 8))
    assert precision_recall(x, x.copy(), k=3) == dict(precision=1.0, recall=1.0, k=3, n_real=200, n_fake=200)


def test_disjoint_clusters_far_apart_have_precision_and_recall_0():
    rng = np.random.default_rng(7)
    real, fake = rng.standard_normal((100, 8)), rng.standard_normal((80, 8)) + 100.0
    result = precision_recall(real, fake, k=3)
    assert (result["precision"], result["recall"], result["n_real"], result["n_fake"]) == (0.0, 0.0, 100, 80)


def test_points_on_a_line_worked_out_by_hand():
    # real = 0, 1, …, 19; fake = 0, 2, 4, 6, 8 (a subset of real, every other point of the first 10).
    # precision: every fake is a real, at distance 0 from itself, inside its ball → exactly 1.
    # recall, k = 3, fake radii = distance to the 3rd nearest *other* fake:
    #   0 → others at 2, 4, 6 → 6;  2 → 2, 2, 4 → 4;  4 → 2, 2, 4 → 4;  6 → 2, 2, 4 → 4;  8 → 2, 4, 6 → 6.
    #   balls: [−6, 6] ∪ [−2, 6] ∪ [0, 8] ∪ [2, 10] ∪ [2, 14] = [−6, 14] → reals 0 … 14 covered: 15 / 20.
    # Real 14 lies exactly at fake 8's radius (≤ counts it; < would give 14 / 20); counting each
    # fake as its own neighbour would shrink the radii to 4, 2, 2, 2, 4 and cover 0 … 12 (13 / 20).
    real, fake = _on_a_line(np.arange(20)), _on_a_line(np.arange(0, 10, 2))
    result = precision_recall(real, fake, k=3)
    assert result["precision"] == 1.0
    assert result["recall"] == 15 / 20


def test_the_kth_neighbour_excludes_the_point_itself():
    # real = 0, 1, 10, 11 with k = 1: each real's nearest other real is 1 away, so the radius is 1
    # (with itself counted it would be 0, and no fake off the reals would be inside any ball).
    # fake = 0.5, 10.5: each 0.5 from a real → precision 1. Fake radii: 10 (each other) → every
    # real lies within 10 of a fake (the farthest, 11, is 0.5 from 10.5) → recall 1.
    real, fake = _on_a_line([0, 1, 10, 11]), _on_a_line([0.5, 10.5])
    result = precision_recall(real, fake, k=1)
    assert (result["precision"], result["recall"]) == (1.0, 1.0)


def test_a_point_exactly_at_the_radius_is_inside():
    # real = 0, 2 with k = 1: radii 2 and 2. fake 4 is exactly 2 from real 2 and fake −2 exactly 2
    # from real 0: both inside; fake 5 is 3 from the nearest real: outside → precision 2 / 3.
    real, fake = _on_a_line([0, 2]), _on_a_line([4, 5, -2])
    assert precision_recall(real, fake, k=1)["precision"] == 2 / 3


def _precision_recall_brute_force(real, fake, k):
    """The paper's definition on the full distance matrices (direct differences, not the ‖a‖² +
    ‖b‖² − 2aᵀb expansion): radius = k-th smallest distance to the other points of the same set."""
    def dist(p, q):
        return np.sqrt(((p[:, None, :] - q[None, :, :]) ** 2).sum(-1))

    def radii(x):
        d = dist(x, x)
        np.fill_diagonal(d, np.inf)
        return np.sort(d, axis=1)[:, k - 1]

    precision = (dist(fake, real) <= radii(real)[None, :]).any(axis=1).mean()
    recall = (dist(real, fake) <= radii(fake)[None, :]).any(axis=1).mean()
    return precision, recall


@pytest.mark.parametrize("block", [1, 7, 64, 4096])
def test_precision_recall_equals_the_definition_on_full_matrices(block):
    rng = np.random.default_rng(8)
    real = rng.standard_normal((150, 6))
    fake = 0.6 * rng.standard_normal((110, 6)) + 0.8  # overlapping, narrower: fractional values
    p, r = _precision_recall_brute_force(real, fake, k=4)
    assert 0.1 < p < 0.99 and 0.1 < r < 0.99
    result = precision_recall(real, fake, k=4, block=block)
    assert (result["precision"], result["recall"]) == (p, r)


# ---------------------------------------------------------------------------------------------
# Nearest neighbours
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [1, 7, 16, 53, 1000])
@pytest.mark.parametrize("k", [1, 5, 20, 97])
def test_nearest_neighbours_equal_a_brute_force_sort(block, k):
    rng = np.random.default_rng(9)
    queries, keys = rng.standard_normal((53, 6)), rng.standard_normal((97, 6))
    full = np.sqrt(((queries[:, None, :] - keys[None, :, :]) ** 2).sum(-1))
    order = np.argsort(full, axis=1)[:, :k]
    distances, indices = nearest_neighbours(queries, keys, k=k, block=block)
    assert distances.shape == indices.shape == (53, k)
    assert distances.dtype == np.float64 and indices.dtype == np.int64
    assert np.array_equal(indices, order)
    np.testing.assert_allclose(distances, np.take_along_axis(full, order, axis=1), rtol=1e-9, atol=1e-7)
    assert (np.diff(distances, axis=1) >= 0).all()


def test_many_neighbours_of_many_keys_come_sorted():
    # k = 100 of 5,000 keys: a partial selection leaves its k in no guaranteed order.
    rng = np.random.default_rng(11)
    queries, keys = rng.standard_normal((20, 4)), rng.standard_normal((5000, 4))
    full = np.sqrt(((queries[:, None, :] - keys[None, :, :]) ** 2).sum(-1))
    distances, indices = nearest_neighbours(queries, keys, k=100, block=8)
    assert (np.diff(distances, axis=1) >= 0).all()
    assert np.array_equal(indices, np.argsort(full, axis=1)[:, :100])


def test_all_keys_as_neighbours_is_the_full_sorted_row():
    queries, keys = _on_a_line([0.0, 10.0]), _on_a_line([3.0, -1.0, 12.0, 7.0])
    distances, indices = nearest_neighbours(queries, keys, k=4, block=1)
    assert indices.tolist() == [[1, 0, 3, 2], [2, 3, 0, 1]]
    assert distances.tolist() == [[1.0, 3.0, 7.0, 12.0], [2.0, 3.0, 7.0, 11.0]]


# ---------------------------------------------------------------------------------------------
# Bad input: one line that names the value
# ---------------------------------------------------------------------------------------------


_X = np.zeros((5, 4))


@pytest.mark.parametrize("call, match", [
    (lambda: precision_recall(_X, np.ones((9, 4)), k=5), r"k = 5 .* real features, got 5"),
    (lambda: precision_recall(np.ones((9, 4)), _X, k=6), r"k = 6 .* fake features, got 5"),
    (lambda: precision_recall(_X, _X, k=0), r"k must be a positive integer, got 0"),
    (lambda: precision_recall(_X, np.zeros((5, 3))), r"different dimensions, 4 vs 3"),
    (lambda: nearest_neighbours(_X, _X, k=6), r"k = 6 .* 5 keys"),
    (lambda: nearest_neighbours(_X, np.zeros((5, 2))), r"different dimensions, 4 vs 2"),
    (lambda: nearest_neighbours(_X, _X, block=0), r"block must be a positive integer, got 0"),
    (lambda: kid(_X[:1], _X), r"at least 2 features in each set, got 1 and 5"),
    (lambda: kid(_X, np.zeros((5, 7))), r"different dimensions, 4 vs 7"),
    (lambda: kid(_X, _X, subsets=0), r"subsets must be a positive integer, got 0"),
    (lambda: kid(np.zeros(5), _X), r"features_a: .* shape \(5,\)"),
    (lambda: kid(_X, np.full((5, 4), np.nan)), r"features_b: .* NaN"),
])
def test_bad_input_is_one_line_naming_the_value(call, match):
    with pytest.raises(UserError, match=match) as e:
        call()
    assert "\n" not in str(e.value)
