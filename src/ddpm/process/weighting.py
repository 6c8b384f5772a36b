"""How the times t weigh in training: a weight per t on L_simple, and importance sampling of t.

Both are off by default (the paper weighs every t alike and draws t uniformly, Algorithm 1);
docs/MATH.md § Weighting the times holds the equations.

- `LossWeighting` (train.loss_weight): min-SNR-γ (Hang et al. 2023, "Efficient Diffusion
  Training via Min-SNR Weighting Strategy") and its soft form (Crowson et al. 2024, Hourglass
  Diffusion Transformers). Each weight is defined on the x_0 error and divided by the scale c_t²
  that relates the network's target to x_0, ‖target − target̂‖² = c_t² ‖x_0 − x̂_0‖², so every
  parametrisation (eps, x0, v, xprev) trains the same objective. Tables in float64, computed
  once from ᾱ.
- `LossSecondMomentResampler` (train.t_sampling=importance): Nichol & Dhariwal (2021)'s
  importance sampling of t by the root mean square of the last 10 losses at each t (improved-
  diffusion's resample.py), kept on the device: no host sync per step.

No network and no I/O here: the training loop calls these with the step's t and losses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

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


class TimeSampling(Choice):
    """How training draws t (docs/MATH.md § Weighting the times)."""

    UNIFORM = "uniform"  # t ~ U{1 … T} (Algorithm 1)
    IMPORTANCE = "importance"  # t ~ p_t ∝ √E[L_t²], loss × 1/(T p_t) (Nichol & Dhariwal 2021)


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


class LossSecondMomentResampler:
    """Nichol & Dhariwal (2021) § 3.3, improved-diffusion's `LossSecondMomentResampler`: the last
    `HISTORY` losses at each t; until every t has that many, t is uniform; then
    p_t ∝ √mean(history_t²), mixed with `UNIFORM_PROB` of the uniform law (docs/MATH.md § Weighting
    the times). The loss of an example at t is multiplied by 1/(T p_t), so the objective stays an
    unbiased estimate of the uniform one.

    State on the device, never read by the host: `history` [T + 1, HISTORY] float64, a ring per t
    (row 0 unused: the sink of non-finite losses), and `counts` [T + 1] int64, the losses seen per t.
    """

    HISTORY = 10  # improved-diffusion's history_per_term
    UNIFORM_PROB = 0.001  # improved-diffusion's uniform_prob

    def __init__(self, T: int, device=None):
        self.T = T
        self.history = torch.zeros(T + 1, self.HISTORY, dtype=torch.float64, device=device)
        self.counts = torch.zeros(T + 1, dtype=torch.int64, device=device)

    def probabilities(self) -> torch.Tensor:
        """p_t for t = 1 … T, float64 [T] on the device: uniform until every t has a full history,
        then √mean(h²) normalised and mixed with the uniform law (no host sync either way)."""
        h = self.history[1:]
        rms = h.pow(2).mean(dim=1).sqrt()
        total = rms.sum()
        p = rms / total * (1 - self.UNIFORM_PROB) + self.UNIFORM_PROB / self.T
        uniform = torch.full_like(p, 1.0 / self.T)
        ready = (self.counts[1:] >= self.HISTORY).all() & (total > 0) & torch.isfinite(total)
        return torch.where(ready, p, uniform)

    def importance_weights(self, t: torch.Tensor, probabilities: torch.Tensor) -> torch.Tensor:
        """1/(T p_t) for each example's t (1 … T), float64 [B]: exactly 1 where p is uniform."""
        return (1.0 / self.T) / probabilities[t - 1]

    @torch.no_grad()
    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Add the losses [N] of examples at times t [N] (the whole global batch, in batch order), as
        improved-diffusion's update_with_all_losses feeds them pair by pair into a deque of
        maxlen HISTORY per t: of a t that occurs n times, only its last min(n, HISTORY) losses can
        survive, and they go to slots (count + r) % HISTORY for occurrence r, then count += n.
        Vectorised, deterministic (no two writes hit one slot), no host sync; non-finite losses
        (an fp16 overflow) go to row 0 and are forgotten."""
        H = self.HISTORY
        losses = losses.detach().to(self.history.dtype).view(-1)
        t = torch.where(torch.isfinite(losses), t.view(-1).to(self.counts.device), 0)
        n = t.shape[0]
        order = torch.argsort(t, stable=True)
        sorted_t = t[order]
        first = torch.searchsorted(sorted_t, sorted_t, right=False)  # where each t's run starts
        past = torch.searchsorted(sorted_t, sorted_t, right=True)  # ... and ends
        occ = torch.empty_like(t)
        occ[order] = torch.arange(n, device=t.device) - first  # r: the occurrence's index among its t
        many = torch.empty_like(t)
        many[order] = past - first  # n_t: how often its t occurs in the batch
        keep = occ >= many - H
        row = torch.where(keep, t, 0)  # older occurrences that would be overwritten go to the sink
        slot = (self.counts[t] + occ) % H
        self.history.index_put_((row, slot), torch.where(keep, losses, 0.0))
        self.counts.index_add_(0, t, torch.ones_like(t))
        self.history[0].zero_()
        self.counts[0] = 0

    def state_dict(self) -> dict:
        return dict(history=self.history.detach().cpu().clone(), counts=self.counts.detach().cpu().clone())

    def problem(self, state) -> str:
        """Why `state` cannot be loaded here, or ""."""
        if not isinstance(state, dict):
            return "its t_sampler state is not a mapping"
        for name, like in (("history", self.history), ("counts", self.counts)):
            v = state.get(name)
            if not isinstance(v, torch.Tensor) or v.shape != like.shape or v.dtype != like.dtype:
                return f"its t_sampler {name} is not {like.dtype} {list(like.shape)}"
        return ""

    def load_state_dict(self, state: dict) -> None:
        self.history.copy_(state["history"])
        self.counts.copy_(state["counts"])


def importance_sampler(kind, T: int, device=None) -> Optional[LossSecondMomentResampler]:
    """The resampler `train.t_sampling` asks for, or None for uniform t."""
    return LossSecondMomentResampler(T, device) if TimeSampling.parse(kind, "train.t_sampling") is TimeSampling.IMPORTANCE else None
