"""The time grids of the few-step samplers: which paper times a chain of N network evaluations visits.

A grid is a descending list of paper times t ∈ {0, …, T} that ends at 0, the data (ᾱ_0 = 1), as
`GaussianDiffusion.reverse_loop` walks it. The network was trained at the integer times only, so
every grid is made of them; a grid defined in a continuous quantity is mapped to the nearest
integer time, found by interpolating log σ_t linearly between the table's integers (diffusers'
`_sigma_to_t` followed by its rounding), and a time that comes out twice is kept once.

With σ_t = √((1 − ᾱ_t)/ᾱ_t) (the noise level of x_t / √ᾱ_t) and λ_t = log(ᾱ_t / (1 − ᾱ_t)) = −2 log σ_t:

- `uniform`:  1, 1 + T/N, 1 + 2T/N, … (DDIM's CIFAR-10 choice, Song et al. 2021; diffusers' "leading"
  with steps_offset 0 in its 0-based time). The chain starts below T, from x ~ N(0, I) all the same.
- `quad`:     quadratic in t, denser near the data (DDIM's other choice).
- `trailing`: T, T − T/N, …, T/N (Lin et al. 2024; diffusers' "trailing"): starts at the prior's time.
- `logsnr`:   N times uniform in λ from t = T to t = 1 (Lu et al. 2022, DPM-Solver's choice for
  discrete models; diffusers' `use_lu_lambdas`).
- `karras`:   N noise levels σ_i = (σ_max^(1/ρ) + i/(N − 1) (σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, ρ = 7, from σ_T
  to σ_1 (Karras et al. 2022, eq. 5; diffusers' `use_karras_sigmas`).

Each grid is followed by t = 0: N intervals, so N steps of the loop (the solvers' NFE accounting is
in `process.sampling`).
"""

from __future__ import annotations

import numpy as np

from ..config import Choice
from ..errors import UserError
from .diffusion import ddim_timesteps

RHO = 7.0  # Karras et al. (2022): ρ = 7 "performs well" for every model they tried


class Spacing(Choice):
    UNIFORM = "uniform"
    QUAD = "quad"
    TRAILING = "trailing"
    LOGSNR = "logsnr"
    KARRAS = "karras"


SPACINGS = tuple(s.value for s in Spacing)


def time_grid(alphas_cumprod: np.ndarray, steps: int, spacing: str = "uniform") -> list[int]:
    """The grid's paper times, descending, ending at 0 (at most `steps` + 1 of them).

    :param alphas_cumprod: ᾱ_1 … ᾱ_T, float64 [T] (`GaussianDiffusion.alphas_cumprod`).
    :param steps: N, the number of intervals (network evaluations of a one-evaluation step).
    """
    spacing = Spacing.parse(spacing, "spacing")
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    T = len(abar)
    if spacing in (Spacing.UNIFORM, Spacing.QUAD, Spacing.TRAILING):
        return ddim_timesteps(T, steps, spacing.value)  # DDIM's own grids, unchanged
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= T:
        raise UserError(f"steps={steps} must be between 1 and T={T}")
    if not abar[-1] > 0:
        raise UserError(f"the '{spacing.value}' grid needs σ_T finite, but this schedule reaches ᾱ_T = 0; "
                        f"use spacing 'uniform', 'quad' or 'trailing'")
    log_sigma = 0.5 * np.log((1 - abar) / abar)  # log σ_t at t = 1 … T, increasing
    hi, lo = log_sigma[-1], log_sigma[0]
    ramp = np.linspace(0.0, 1.0, steps) if steps > 1 else np.zeros(1)
    if spacing is Spacing.LOGSNR:
        targets = hi + ramp * (lo - hi)  # uniform in log σ, i.e. in λ
    else:
        s_max, s_min = np.exp(hi) ** (1 / RHO), np.exp(lo) ** (1 / RHO)
        targets = RHO * np.log(s_max + ramp * (s_min - s_max))
    ts = np.round(_time_of_log_sigma(targets, log_sigma)).astype(np.int64) + 1  # 0-based index -> paper t
    return sorted({int(t) for t in ts}, reverse=True) + [0]


def _time_of_log_sigma(targets: np.ndarray, log_sigma: np.ndarray) -> np.ndarray:
    """The fractional 0-based index k at which the table log σ (increasing) takes each target,
    by linear interpolation between neighbours, clamped to the table's ends."""
    return np.interp(targets, log_sigma, np.arange(len(log_sigma), dtype=np.float64))
