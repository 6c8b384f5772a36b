"""β schedules of the forward process (docs/MATH.md § Schedules).

Every table is float64; callers cast only at the end. Names follow the official code's
`get_beta_schedule`; `cosine` is Nichol & Dhariwal (2021).
"""

from __future__ import annotations

import math

import numpy as np

from ..config import Choice
from ..errors import UserError


class Schedule(Choice):
    LINEAR = "linear"  # the paper's: 1e-4 -> 0.02 over T = 1000
    QUAD = "quad"
    CONST = "const"
    WARMUP10 = "warmup10"
    WARMUP50 = "warmup50"
    JSD = "jsd"  # 1/T, 1/(T-1), ..., 1: the last β is 1, so ᾱ_T = 0
    COSINE = "cosine"  # Nichol & Dhariwal (2021)


SCHEDULES = tuple(s.value for s in Schedule)


def _warmup_beta(beta_start: float, beta_end: float, T: int, frac: float) -> np.ndarray:
    # β_end everywhere except the first int(T·frac) entries, which ramp linearly from β_start.
    betas = beta_end * np.ones(T, dtype=np.float64)
    n = int(T * frac)
    betas[:n] = np.linspace(beta_start, beta_end, n, dtype=np.float64)
    return betas


def _cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    # Nichol & Dhariwal (2021) eq. 17: ᾱ(t) = f(t)/f(0), f(t) = cos²((t/T + s)/(1 + s) · π/2);
    # β_t = 1 − ᾱ(t)/ᾱ(t−1), clipped at 0.999 so the last steps are not singular.
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    return np.array([min(1 - f(i + 1) / f(i), max_beta) for i in range(T)], dtype=np.float64)


def make_betas(name: str = "linear", T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """β_1 … β_T as a float64 array [T]: `betas[t - 1]` is β_t (docs/MATH.md § Time and indexing).

    :param name: a `Schedule` (or its name); `linear` 1e-4 → 0.02 over T = 1000 is the paper's choice.
    :raises ValueError (UserError): unknown name, T < 1, or a β outside (0, 1].
    """
    name = Schedule.parse(name, "schedule")
    if not isinstance(T, (int, np.integer)) or isinstance(T, bool) or T < 1:
        raise UserError(f"T={T!r} is not valid; the number of diffusion steps must be an integer >= 1")
    if name not in (Schedule.JSD, Schedule.COSINE):
        for field, v in (("beta_start", beta_start), ("beta_end", beta_end)):
            if not (0.0 < float(v) <= 1.0):
                raise UserError(f"{field}={v!r} is not valid; β must lie in (0, 1] (the paper uses 1e-4 → 0.02)")
    if name is Schedule.LINEAR:
        betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    elif name is Schedule.QUAD:
        betas = np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
    elif name is Schedule.CONST:
        betas = beta_end * np.ones(T, dtype=np.float64)
    elif name is Schedule.WARMUP10:
        betas = _warmup_beta(beta_start, beta_end, T, 0.1)
    elif name is Schedule.WARMUP50:
        betas = _warmup_beta(beta_start, beta_end, T, 0.5)
    elif name is Schedule.JSD:  # 1/T, 1/(T-1), …, 1: the last β is 1, so ᾱ_T = 0
        betas = 1.0 / np.linspace(T, 1, T, dtype=np.float64)
    else:
        betas = _cosine_betas(T)
    assert betas.shape == (T,) and betas.dtype == np.float64
    if not ((betas > 0).all() and (betas <= 1).all()):
        raise UserError(f"schedule {name.value!r} with beta_start={beta_start}, beta_end={beta_end} gives β outside (0, 1]")
    return betas
