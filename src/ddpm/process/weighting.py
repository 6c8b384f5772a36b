"""How the times t weigh in training: a weight per t on L_simple.

Off by default (the paper weighs every t alike, Algorithm 1); docs/MATH.md § Weighting the times
holds the equations.

- `LossWeighting` (train.loss_weight): min-SNR-γ (Hang et al. 2023, "Efficient Diffusion
  Training via Min-SNR Weighting Strategy") and its soft form (Crowson et al. 2024, Hourglass
  Diffusion Transformers). Each weight is defined on the x_0 error and divided by the scale c_t²
  that relates the network's target to x_0, ‖target − target̂‖² = c_t² ‖x_0 − x̂_0‖², so every
  parametrisation (eps, x0, v, xprev) trains the same objective. Tables in float64, computed
  once from ᾱ.

No network and no I/O here: the training loop calls these with the step's t.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import numpy as np
import torch

from ..config import Choice
from ..errors import UserError
from .diffusion import MeanType


class LossWeight(Choice):
    """The weight of L_simple at t (docs/MATH.md § Weighting the times)."""

    NONE = "none"  # every t alike (the paper's L_simple, eq. 14)
    MIN_SNR = "min_snr"  # x_0-space weight min(SNR_t, γ) (Hang et al. 2023)
    SOFT_MIN_SNR = "soft_min_snr"  # x_0-space weight (1/SNR_t + 1/γ)^{-1} (Crowson et al. 2024)


def snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    """SNR_t = ᾱ_t / (1 − ᾱ_t), float64, the signal-to-noise ratio of q(x_t | x_0) (eq. 4)."""
    a = np.asarray(alphas_cumprod, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return a / (1.0 - a)


def min_snr_x0_weight(snr_t: np.ndarray, gamma: float) -> np.ndarray:
    """min(SNR_t, γ): Min-SNR-γ's weight of the x_0 error (Hang et al. 2023; docs/MATH.md
    § Weighting the times)."""
    return np.minimum(snr_t, gamma)


def soft_min_snr_x0_weight(snr_t: np.ndarray, gamma: float) -> np.ndarray:
    """(1/SNR_t + 1/γ)^{-1} = SNR_t·γ / (SNR_t + γ): the soft minimum of SNR_t and γ (Crowson et al.
    2024, Hourglass Diffusion Transformers; docs/MATH.md § Weighting the times)."""
    return snr_t * gamma / (snr_t + gamma)


def target_scale(alphas_cumprod: np.ndarray, mean_type) -> np.ndarray:
    """c_t² with ‖target − target̂‖² = c_t² ‖x_0 − x̂_0‖² at fixed x_t, float64 [T] (docs/MATH.md
    § Weighting the times): SNR_t for ε (M3), 1 for x_0, SNR_t + 1 for v (M5), c1_t² for the
    posterior mean (eq. 7)."""
    mean_type = MeanType.parse(mean_type, "mean_type")
    a = np.asarray(alphas_cumprod, dtype=np.float64)
    s = snr(a)
    if mean_type is MeanType.EPS:
        return s
    if mean_type is MeanType.X0:
        return np.ones_like(a)
    if mean_type is MeanType.V:
        return s + 1.0
    a_prev = np.append(1.0, a[:-1])
    beta = 1.0 - a / a_prev
    return (beta * np.sqrt(a_prev) / (1.0 - a)) ** 2  # c1_t = β_t √ᾱ_{t−1} / (1 − ᾱ_t), eq. 7


@dataclass(frozen=True)
class LossWeighting:
    """A parsed `train.loss_weight`: kind and γ ("none", "min_snr:5", "soft_min_snr:5")."""

    kind: LossWeight = LossWeight.NONE
    gamma: float = math.inf

    @classmethod
    def parse(cls, text, field: str = "train.loss_weight") -> "LossWeighting":
        """From "none" or "KIND:γ", γ a positive finite number; else one line listing the valid forms."""
        kind, sep, value = str(text).partition(":")
        valid = "give 'none', 'min_snr:γ' or 'soft_min_snr:γ' with γ a positive number, e.g. min_snr:5 (Hang et al. 2023)"
        try:
            kind = LossWeight(kind.strip())
        except ValueError:
            raise UserError(f"{field}={text!r} is not valid; {valid}") from None
        if kind is LossWeight.NONE:
            if sep:
                raise UserError(f"{field}={text!r}: 'none' takes no γ; {valid}")
            return cls()
        try:
            gamma = float(value)
        except ValueError:
            gamma = math.nan
        if not (math.isfinite(gamma) and gamma > 0):
            raise UserError(f"{field}={text!r}: γ must be a positive finite number; {valid}")
        return cls(kind, gamma)

    @property
    def active(self) -> bool:
        return self.kind is not LossWeight.NONE

    def x0_weight(self, snr_t: np.ndarray) -> np.ndarray:
        """The weight of the x_0 error at each SNR, float64."""
        if self.kind is LossWeight.MIN_SNR:
            return min_snr_x0_weight(snr_t, self.gamma)
        if self.kind is LossWeight.SOFT_MIN_SNR:
            return soft_min_snr_x0_weight(snr_t, self.gamma)
        return np.ones_like(snr_t)

    def table(self, alphas_cumprod: np.ndarray, mean_type) -> np.ndarray:
        """w_t = x0_weight(SNR_t) / c_t², the weight of the target's squared error for `mean_type`,
        float64 [T + 1] indexed by t (row 0, where nothing is trained, NaN)."""
        a = np.asarray(alphas_cumprod, dtype=np.float64)
        if not self.active:
            w = np.ones_like(a)  # L_simple with the mean type's own target, as the paper trains it
        else:
            with np.errstate(divide="ignore", invalid="ignore"):
                w = self.x0_weight(snr(a)) / target_scale(a, mean_type)
        return np.append(np.nan, w)


class LossWeights:
    """A `LossWeighting` for one process and mean type: `weights(t)` -> float32 [B] on t's device,
    from a float64 table computed once (cast once per device)."""

    def __init__(self, weighting: LossWeighting, alphas_cumprod: np.ndarray, mean_type):
        self.weighting = weighting
        self.table64 = torch.from_numpy(weighting.table(alphas_cumprod, mean_type))
        self._cache: dict = {}

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        if t.device not in self._cache:
            self._cache[t.device] = self.table64.to(device=t.device, dtype=torch.float32)
        return self._cache[t.device][t]
