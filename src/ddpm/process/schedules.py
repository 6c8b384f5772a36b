"""β schedules of the forward process (PAPER.md § "Forward process").

Every table is float64; callers cast only at the end. Names follow the official code's
`get_beta_schedule` (diffusion_tf/diffusion_utils_2.py); `cosine` is Nichol & Dhariwal (2021).
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import UserError, check_choice

SCHEDULES = ("linear", "quad", "const", "warmup10", "warmup50", "jsd", "cosine")


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
    """β_1 … β_T as a float64 array [T] (index i is the paper's t = i + 1).

    :param name: one of SCHEDULES; `linear` 1e-4 → 0.02 over T = 1000 is the paper's choice.
    :raises ValueError (UserError): unknown name, T < 1, or a β outside (0, 1].
    """
    check_choice("schedule", name, SCHEDULES)
    if not isinstance(T, (int, np.integer)) or isinstance(T, bool) or T < 1:
        raise UserError(f"T={T!r} is not valid; the number of diffusion steps must be an integer >= 1")
    if name not in ("jsd", "cosine"):
        for field, v in (("beta_start", beta_start), ("beta_end", beta_end)):
            if not (0.0 < float(v) <= 1.0):
                raise UserError(f"{field}={v!r} is not valid; β must lie in (0, 1] (the paper uses 1e-4 → 0.02)")
    if name == "linear":
        betas = np.linspace(beta_start, beta_end, T, dtype=np.float64)
    elif name == "quad":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, T, dtype=np.float64) ** 2
    elif name == "const":
        betas = beta_end * np.ones(T, dtype=np.float64)
    elif name == "warmup10":
        betas = _warmup_beta(beta_start, beta_end, T, 0.1)
    elif name == "warmup50":
        betas = _warmup_beta(beta_start, beta_end, T, 0.5)
    elif name == "jsd":  # 1/T, 1/(T-1), …, 1: the last β is 1, so ᾱ_T = 0
        betas = 1.0 / np.linspace(T, 1, T, dtype=np.float64)
    else:
        betas = _cosine_betas(T)
    assert betas.shape == (T,) and betas.dtype == np.float64
    if not ((betas > 0).all() and (betas <= 1).all()):
        raise UserError(f"schedule {name!r} with beta_start={beta_start}, beta_end={beta_end} gives β outside (0, 1]")
    return betas
