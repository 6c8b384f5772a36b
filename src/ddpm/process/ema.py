"""Averages of the weights over training: the paper's EMA and post-hoc EMA (docs/MATH.md § Averaging the weights).

The paper evaluates an exponential moving average of the weights, decay 0.9999, fixed before
training. Karras et al. (2024, "Analyzing and Improving the Training Dynamics of Diffusion
Models", EDM2, § 3 and App. C) track two *power-function* averages during training instead and
store snapshots of them; any other averaging length is then a least-squares combination of the
snapshots, chosen after training. This module holds the arithmetic of both, in float64 numpy:
no network, no files. Time is counted in optimizer steps: θ_t is the weights after the t-th
update, t = 1, 2, …

    gamma = sigma_rel_to_gamma(0.10)                      # 6.94: the exponent of a relative width 0.10
    x = phema_coefficients([(1000, g1), (1000, g2), (2000, g1), (2000, g2)], t=2000, gamma=gamma)
    # θ̂ = Σ_i x_i · snapshot_i approximates the power-function EMA of width 0.10 at step 2000
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..errors import UserError

# γ = 0 is the plain mean of every weight so far, the widest power-function profile: σ_rel = 1/√12.
MAX_SIGMA_REL = 1.0 / math.sqrt(12.0)
# How many decimals name a relative width in files and records (0.05 -> "0.050").
SIGMA_REL_DECIMALS = 3


def ema_decay_at(decay: float, step: int, warmup: bool = False) -> float:
    """The decay of the paper's EMA for the update after `step` earlier updates: `decay`, or with
    the warm-up many codebases use, min(decay, (1 + step) / (10 + step)) (M28), so that the
    average of a short run is not dominated by the random initial weights."""
    return min(decay, (1.0 + step) / (10.0 + step)) if warmup else decay


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative width of the power-function profile of exponent γ (EDM2 § 3; M30):
    σ_rel = √((γ + 1) / ((γ + 2)² (γ + 3))), the standard deviation of τ/t under the profile."""
    g = float(gamma)
    return math.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent γ ≥ 0 whose profile has relative width σ_rel ∈ (0, 1/√12]: the largest real root
    of γ³ + 7γ² + (16 − σ⁻²)γ + (12 − σ⁻²) = 0, which is M30 solved for γ."""
    s = check_sigma_rel(sigma_rel, "sigma_rel")
    k = s ** -2.0
    roots = np.roots([1.0, 7.0, 16.0 - k, 12.0 - k])
    real = roots[np.abs(roots.imag) <= 1e-9 * np.maximum(1.0, np.abs(roots.real))].real
    return max(float(real.max()), 0.0)


def check_sigma_rel(value, where: str) -> float:
    """A relative width as a float in (0, 1/√12], or one line that says which values are valid."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= MAX_SIGMA_REL + 1e-12 \
            or not math.isfinite(value):
        raise UserError(f"{where}={value!r} is not a relative EMA width; give a number in (0, {MAX_SIGMA_REL:.4f}] "
                        f"(0.05 and 0.10 are EDM2's tracked widths; 1/sqrt(12) = {MAX_SIGMA_REL:.4f} is the plain "
                        f"mean of all weights)")
    return float(value)


def power_ema_beta(gamma: float, t: int) -> float:
    """The decay of the power-function EMA at update t ≥ 1 (EDM2 App. C.2; M31): β_t = (1 − 1/t)^(γ+1).
    θ̂_t = β_t θ̂_{t−1} + (1 − β_t) θ_t gives θ_τ the weight (τ^(γ+1) − (τ−1)^(γ+1)) / t^(γ+1): the
    profile integrated over (τ−1, τ]. β_1 = 0, so the initial weights carry no weight."""
    return (1.0 - 1.0 / t) ** (float(gamma) + 1.0)


def profile_inner(t_a, gamma_a, t_b, gamma_b) -> np.ndarray:
    """∫₀^∞ p_a(τ) p_b(τ) dτ for power-function profiles p(τ) = (γ+1) τ^γ / t^(γ+1) on [0, t] (M32):
    (γ_a+1)(γ_b+1) / ((γ_a+γ_b+1) · max(t_a, t_b)) · (min / max)^γ of the profile that ends later.
    Broadcasts over its arguments."""
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    later = np.where(t_a <= t_b, g_b, g_a)  # the exponent of the profile that ends at max(t_a, t_b)
    ratio = np.minimum(t_a, t_b) / np.maximum(t_a, t_b)
    return (g_a + 1.0) * (g_b + 1.0) / ((g_a + g_b + 1.0) * np.maximum(t_a, t_b)) * ratio ** later


def _normal_equations(snapshots: Sequence[tuple[int, float]], t: int, gamma: float):
    """A_ij = ⟨p_i, p_j⟩, b_i = ⟨p_i, p⟩ and ⟨p, p⟩ for snapshots (t_i, γ_i) and the target profile."""
    if not snapshots:
        raise ValueError("post-hoc EMA needs at least one snapshot")
    ts, gs = (np.array(v, dtype=np.float64) for v in zip(*snapshots))
    A = profile_inner(ts[:, None], gs[:, None], ts[None, :], gs[None, :])
    return A, profile_inner(ts, gs, float(t), float(gamma)), float(profile_inner(t, gamma, t, gamma))


def phema_coefficients(snapshots: Sequence[tuple[int, float]], t: int, gamma: float) -> np.ndarray:
    """Post-hoc EMA (EDM2 App. C.3; M33): the coefficients x of the snapshots (step t_i, exponent
    γ_i) whose combination Σ_i x_i p_i is closest, in L², to the profile of exponent `gamma` at
    step `t`: the least-squares solution of A x = b, A_ij = ⟨p_i, p_j⟩, b_i = ⟨p_i, p⟩. The weights
    θ̂ = Σ_i x_i θ̂_i then approximate that profile's average. float64 [len(snapshots)]."""
    A, b, _ = _normal_equations(snapshots, t, gamma)
    return np.linalg.lstsq(A, b, rcond=None)[0]


def profile_error(snapshots: Sequence[tuple[int, float]], x: np.ndarray, t: int, gamma: float) -> float:
    """‖Σ_i x_i p_i − p‖ / ‖p‖ in L²: how far the reconstructed profile is from the one asked for
    (0 when it is one of the snapshots; it grows for widths and steps the snapshots do not cover)."""
    A, b, pp = _normal_equations(snapshots, t, gamma)
    return math.sqrt(max(float(x @ A @ x - 2.0 * x @ b + pp), 0.0) / pp)
