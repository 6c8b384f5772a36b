"""Few-step solvers of the probability-flow ODE (and its SDE), as steps of the one reverse loop.

Each class here is a `Step` for `GaussianDiffusion.reverse_loop`: called once per interval of a
descending chain of paper times (`process.grids`), it evaluates the network at (x, t) and moves x
to t_next. A multistep solver keeps the history it needs (its last x̂_0 and λ) in the step object;
`begin(times)` starts a chain with an empty history. The network's output is turned into the
data prediction x̂_0 = D(x_t, t) by `p_mean_variance`, so every parametrisation (ε, x_0, v, the
posterior mean), fixed or learned variance (ignored: these solvers choose their own noise), and
classifier-free guidance (applied to the network's output, process/guidance.py) work unchanged;
with `clip_denoised` x̂_0 is clipped to [-1, 1] as in Algorithm 2 (diffusers: `thresholding=True`
with ratio 1 and `sample_max_value=1`, or `clip_sample` for Heun).

Notation (docs/MATH.md § Few-step samplers): α_t = √ᾱ_t, σ_t = √(1 − ᾱ_t), λ_t = log(α_t / σ_t)
(half the log-SNR; its grid `logsnr` is uniform in either), h = λ_{t_next} − λ_t > 0. At t = 0
(ᾱ_0 = 1, σ_0 = 0, λ = ∞) every first-order update below reduces to x_0 = x̂_0, which is how each
chain ends (the solvers' authors' "first-order final step", and diffusers' `final_sigmas_type="zero"`).
The scalar coefficients are computed in float64 on the host from the float64 tables.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .diffusion import GaussianDiffusion


class _Solver:
    """What the solvers share: the table lookups and the data prediction D(x, t)."""

    draws_noise = False  # the ODE solvers; the SDE variant draws a z every step

    def __init__(self, diffusion: GaussianDiffusion, clip_denoised: bool = True):
        self.diffusion, self.clip_denoised = diffusion, clip_denoised

    def begin(self, times: Sequence[int]) -> None:
        self.history: list = []  # any descending chain; a multistep solver's history starts empty

    def coefficients(self, t: int) -> tuple[float, float, float]:
        """(α_t, σ_t, λ_t) in float64; λ_0 = ∞."""
        abar = self.diffusion.alpha_bar(t)
        alpha, sigma = math.sqrt(abar), math.sqrt(1.0 - abar)
        return alpha, sigma, (math.log(alpha / sigma) if sigma > 0 else math.inf)

    def denoise(self, model, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x̂_0 = D(x_t, t): one network evaluation."""
        return self.diffusion.p_mean_variance(model, x, t, clip_denoised=self.clip_denoised)["pred_x0"]

    def __call__(self, model, x, t, t_next, noise):
        """x̂_0 at (x, t), then x at t_next: x̂_0 itself when t_next = 0 (σ = 0), else `advance`."""
        s = int(t[0])
        d0 = self.denoise(model, x, t)
        x = self.correct(x, s, d0)
        return dict(sample=d0 if t_next == 0 else self.advance(model, x, s, t_next, d0, noise), pred_x0=d0)

    def correct(self, x, s: int, d0):
        """x at s, once x̂_0 there is known (UniPC's corrector); x itself for the others."""
        return x

    def advance(self, model, x, s: int, t_next: int, d0, noise):
        raise NotImplementedError


class DPMSolverPP(_Solver):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2), or with `sde` its stochastic
    variant SDE-DPM-Solver++(2M) (same paper, § 5; diffusers' "sde-dpmsolver++", "midpoint").

    With D_0 the x̂_0 at t and, from the previous step, r = h_prev / h and D_1 = (D_0 − x̂_0,prev) / r:
        ODE:  x_next = (σ_next/σ_t) x − α_next (e^{−h} − 1) (D_0 + ½ D_1)
        SDE:  x_next = (σ_next/σ_t) e^{−h} x + α_next (1 − e^{−2h}) (D_0 + ½ D_1) + σ_next √(1 − e^{−2h}) z
    The first step has no history and drops D_1 (first order); the last, to t = 0, is x̂_0.
    """

    def __init__(self, diffusion: GaussianDiffusion, clip_denoised: bool = True, sde: bool = False):
        super().__init__(diffusion, clip_denoised)
        self.sde = self.draws_noise = sde

    def advance(self, model, x, s, t_next, d0, noise):
        _, sigma_s, lam_s = self.coefficients(s)
        alpha_n, sigma_n, lam_n = self.coefficients(t_next)
        h = lam_n - lam_s
        d = d0
        if self.history:
            d_prev, h_prev = self.history[-1]
            r = h_prev / h
            d = d0 + (d0 - d_prev) / (2 * r)
        self.history = [(d0, h)]
        if self.sde:
            e = math.exp(-h)
            return (sigma_n / sigma_s * e) * x + (alpha_n * (1 - e * e)) * d + (sigma_n * math.sqrt(1 - e * e)) * noise
        return (sigma_n / sigma_s) * x - (alpha_n * math.expm1(-h)) * d


class UniPC(_Solver):
    """UniPC (Zhao et al. 2023) with data prediction, B(h) = e^{−h} − 1 ("bh2"), order 2.

    Each step evaluates the network at the predicted x_t, then (from the second step on) corrects
    x_t with UniC using that same evaluation (no extra one: the corrector is free), and predicts
    x_next with UniP. UniP-2 with bh2 is DPM-Solver++(2M)'s update; its order is 1 on the first
    step (no history) and on the last. UniC's order is that of the predictor it corrects, plus one.
    With φ_1 = e^{−h} − 1 = B(h), h the last interval and x, m the previous step's corrected x and x̂_0:
        x_t^c = (σ_t/σ_s) x − α_t φ_1 m − α_t B(h) (ρ_0 D_1 + ρ_1 (x̂_0(x_t) − m))
    where UniC-1 has ρ_1 = ½ (no D_1) and UniC-2 solves R ρ = b with R = [[1, 1], [r, 1]], r the
    previous interval over h (negative), D_1 = (m_prev − m) / r, and b = (φ_2 / B(h), 2 φ_3 / B(h))
    for φ_2 = φ_1/(−h) − 1, φ_3 = φ_2/(−h) − ½.
    """

    def begin(self, times):
        super().begin(times)
        self.previous: Optional[tuple] = None  # (x it predicted from, at time s, the time t it predicted, order)

    def correct(self, x, s, m):
        if self.previous is not None:  # UniC: the predicted x corrected with its own x̂_0
            x = self._update(*self.previous, m_t=m)
        self.history = (self.history + [(s, m)])[-2:]
        return x

    def advance(self, model, x, s, t_next, m, noise):
        order = 1 if len(self.history) == 1 else 2
        self.previous = (x, s, t_next, order)
        return self._update(x, s, t_next, order)

    def _update(self, x, s, t, order, m_t=None):
        """UniP of `order` from (x, s) to t, or with m_t = x̂_0(x_t) UniC of `order` + 1. The
        history's last entry is (s, x̂_0 at s), the one before it the step before (a corrector runs
        before the new x̂_0 joins the history)."""
        s_hist, m = self.history[-1]
        assert s_hist == s
        alpha_t, sigma_t, lam_t = self.coefficients(t)
        _, sigma_s, lam_s = self.coefficients(s)
        h = lam_t - lam_s
        phi1 = math.expm1(-h)  # = B(h) in bh2
        out = (sigma_t / sigma_s) * x - (alpha_t * phi1) * m
        if order == 2:
            s_prev, m_prev = self.history[-2]
            r = (self.coefficients(s_prev)[2] - lam_s) / h
            d1 = (m_prev - m) / r
        if m_t is None:  # UniP: ρ = ½ for order 2
            return out - (alpha_t * phi1 * 0.5) * d1 if order == 2 else out
        if order == 1:  # UniC-1: ρ_1 = ½
            return out - (alpha_t * phi1 * 0.5) * (m_t - m)
        phi2 = phi1 / (-h) - 1
        phi3 = phi2 / (-h) - 0.5
        b1, b2 = phi2 / phi1, 2 * phi3 / phi1
        rho0 = (b1 - b2) / (1 - r)  # R ρ = b, R = [[1, 1], [r, 1]]
        return out - (alpha_t * phi1) * (rho0 * d1 + (b1 - rho0) * (m_t - m))


class Heun(_Solver):
    """Heun's second-order method on the probability-flow ODE in σ (Karras et al. 2022, Algorithm 1
    with S_churn = 0, deterministic), in the variable x̃ = x_t / α_t whose noise level is
    σ̃_t = σ_t / α_t:  d = (x̃ − x̂_0) / σ̃_t,  x̃' = x̃ + (σ̃_next − σ̃_t) d, and unless σ̃_next = 0,
    x̃_next = x̃ + (σ̃_next − σ̃_t) (d + d')/2 with d' = (x̃' − x̂_0(x̃', t_next)) / σ̃_next: two network
    evaluations a step, one on the last (an Euler step to the data)."""

    def advance(self, model, x, s, t_next, d0, noise):
        alpha_s, sigma_s, _ = self.coefficients(s)
        alpha_n, sigma_n, _ = self.coefficients(t_next)
        vs, vn = sigma_s / alpha_s, sigma_n / alpha_n  # σ̃
        xs = x / alpha_s
        slope = (xs - d0) / vs
        euler = xs + (vn - vs) * slope
        d1 = self.denoise(model, euler * alpha_n, torch.full((x.shape[0],), t_next, device=x.device, dtype=torch.long))
        return (xs + (vn - vs) * 0.5 * (slope + (euler - d1) / vn)) * alpha_n
