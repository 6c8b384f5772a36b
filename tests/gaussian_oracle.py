"""The closed-form optimal ε-predictor for Gaussian data, shared by the tests.

For x_0 ~ N(μ, s²) per pixel, E[ε | x_t] = √(1−ᾱ_t)(x_t − √ᾱ_t μ) / (ᾱ_t s² + 1 − ᾱ_t): the best
any network could do, so samplers and the bound driven by it can be checked against the data.
ᾱ is computed here from the β's with numpy, independently of ddpm. Like the package's networks it
is called with the paper's t ∈ 1 … T (docs/MATH.md § Time and indexing): ᾱ_t is abar[t − 1].
"""

import math
import types

import numpy as np
import torch

MU, S = 0.1, 0.25
PAPER_BETAS = np.linspace(1e-4, 0.02, 1000)  # the paper's schedule, written out on purpose


class Oracle:
    """model(x_t, t) = E[ε | x_t]; counts the images it is called on (to check work is not redone)."""

    def __init__(self, betas=PAPER_BETAS, mu: float = MU, s: float = S):
        self.abar = torch.from_numpy(np.cumprod(1 - np.asarray(betas, np.float64)))
        self.mu, self.s, self.images = mu, s, 0

    def __call__(self, x, t):
        self.images += x.shape[0]
        a = self.abar.to(x)[t - 1].view(-1, *([1] * (x.ndim - 1)))
        return (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.s**2 + 1 - a)


def oracle_for(betas=PAPER_BETAS):
    return Oracle(betas)


def assert_follows_law(x, m: float, V: float, label: str) -> None:
    """Samples x (any shape, iid pixels) have the law N(m, V): mean and variance within 5 standard
    errors (of the mean √(V/n), of the variance V·√(2/n)); and the law's mean is the data's μ."""
    x = x.double()
    n = x.numel()
    mean, var = x.mean().item(), x.var().item()
    print(f"{label}: mean {mean:.4f} (law {m:.4f}, data {MU}), var/s² {var / S**2:.4f} (law {V / S**2:.4f})")
    assert abs(mean - m) < 5 * math.sqrt(V / n)
    assert abs(var - V) < 5 * V * math.sqrt(2 / n)
    assert abs(m - MU) < 1e-3


def bin_probabilities(mu: float, s: float) -> np.ndarray:
    """Mass of each of the 256 grid values once x_0 ~ N(μ, s²) is rounded to the grid (edges to ±∞)."""
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    v = np.arange(256) / 127.5 - 1
    hi = np.array([1.0 if k == 255 else phi((v[k] + 1 / 255 - mu) / s) for k in range(256)])
    lo = np.array([0.0 if k == 0 else phi((v[k] - 1 / 255 - mu) / s) for k in range(256)])
    return hi - lo


# Class-conditional data: class k has prior π_k and x_0 ~ N(μ_k, s_k²) per pixel.
CLASS_PRIORS = (0.5, 0.3, 0.2)
CLASS_MU = (-0.5, 0.1, 0.6)
CLASS_S = (0.1, 0.2, 0.15)


class ClassOracle:
    """model(x_t, t, y) = E[ε | x_t, y] for the per-class Gaussian data above: for a class k the
    single-Gaussian formula with (μ_k, s_k); for y = K ("no class") the unconditional E[ε | x_t] =
    Σ_k p(k | x_t) E[ε | x_t, k], where p(k | x_t) ∝ π_k Π_pixels N(x_t; √ᾱ_t μ_k, ᾱ_t s_k² + 1 − ᾱ_t).
    Counts the images and the calls it gets."""

    def __init__(self, betas=PAPER_BETAS, priors=CLASS_PRIORS, mu=CLASS_MU, s=CLASS_S):
        self.abar = torch.from_numpy(np.cumprod(1 - np.asarray(betas, np.float64)))
        self.priors, self.mu, self.s = (torch.tensor(v, dtype=torch.float64) for v in (priors, mu, s))
        self.K = len(priors)
        self.config = types.SimpleNamespace(num_classes=self.K)  # what sampling reads of a network
        self.images = self.calls = 0

    def per_class(self, x, t):
        """E[ε | x_t, k] for every k -> [K, B, ...], and log p(x_t | k) summed over pixels -> [K, B]."""
        a = self.abar.to(x)[t - 1].view(-1, *([1] * (x.ndim - 1)))
        mu, s = (v.to(x).view(-1, *([1] * x.ndim)) for v in (self.mu, self.s))
        var = a * s**2 + 1 - a  # [K, B, 1, ...]
        eps = (1 - a).sqrt() * (x - a.sqrt() * mu) / var
        logp = (-0.5 * (x - a.sqrt() * mu) ** 2 / var - 0.5 * torch.log(2 * math.pi * var)).flatten(2).sum(-1)
        return eps, logp

    def unconditional(self, x, t):
        eps, logp = self.per_class(x, t)
        r = torch.softmax(logp + self.priors.to(x).log()[:, None], dim=0)  # p(k | x_t) [K, B]
        return (r.view(*r.shape, *([1] * (x.ndim - 1))) * eps).sum(0)

    def __call__(self, x, t, y):
        self.images += x.shape[0]
        self.calls += 1
        eps, _ = self.per_class(x, t)
        b = torch.arange(x.shape[0])
        cond = eps[y.clamp(max=self.K - 1), b]
        return torch.where((y == self.K).view(-1, *([1] * (x.ndim - 1))), self.unconditional(x, t), cond)


# Correlated data: x_0 ~ N(μ, Σ) over the D = C·H·W pixels of an image, with a dense Σ.
def grid_covariance(h: int, w: int, s: float, rho: float) -> np.ndarray:
    """Σ_ij = s² ρ^(|Δrow| + |Δcol|) over the pixels of an h×w image (row-major): the product of two
    one-dimensional exponential kernels, so positive definite for |ρ| < 1; neighbours correlate by ρ."""
    r, c = np.divmod(np.arange(h * w), w)
    return s**2 * rho ** (np.abs(r[:, None] - r[None]) + np.abs(c[:, None] - c[None])).astype(np.float64)


def gaussian_conditional(mu, cov, known, x_known):
    """The law of the unknown pixels given the known ones, x_u | x_k ~ N(μ_u + Σ_uk Σ_kk⁻¹ (x_k − μ_k),
    Σ_uu − Σ_uk Σ_kk⁻¹ Σ_ku) (float64; `known` a bool mask over the D pixels) -> (mean, cov)."""
    mu, cov, k = np.asarray(mu, np.float64), np.asarray(cov, np.float64), np.asarray(known, bool)
    u = ~k
    gain = np.linalg.solve(cov[np.ix_(k, k)], cov[np.ix_(k, u)]).T  # Σ_uk Σ_kk⁻¹
    return mu[u] + gain @ (np.asarray(x_known, np.float64) - mu[k]), cov[np.ix_(u, u)] - gain @ cov[np.ix_(k, u)]


class CovOracle:
    """model(x_t, t) = E[ε | x_t] for x_0 ~ N(μ, Σ) over the pixels of an image (any dense Σ):
    x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε is jointly Gaussian with ε, so E[ε | x_t] = √(1−ᾱ_t) (ᾱ_t Σ + (1−ᾱ_t) I)⁻¹
    (x_t − √ᾱ_t μ). The matrices are formed in float64 with numpy for every t ∈ 1 … T (ᾱ from the
    β's, as `Oracle`); called with the paper's t, on x [B, C, H, W] with C·H·W = D. Counts images."""

    def __init__(self, mu, cov, betas=PAPER_BETAS):
        self.abar = np.cumprod(1 - np.asarray(betas, np.float64))
        self.mu = np.asarray(mu, np.float64).ravel()
        self.cov = np.asarray(cov, np.float64)
        D = len(self.mu)
        assert self.cov.shape == (D, D)
        self.gain = torch.from_numpy(np.stack([math.sqrt(1 - a) * np.linalg.inv(a * self.cov + (1 - a) * np.eye(D))
                                               for a in self.abar]))  # [T, D, D]
        self.images = 0

    def __call__(self, x, t):
        self.images += x.shape[0]
        a = torch.from_numpy(self.abar).to(x.device)[t - 1]  # [B] float64
        y = x.flatten(1).double() - a.sqrt()[:, None] * torch.from_numpy(self.mu).to(x.device)
        if bool((t == t[0]).all()):  # one time for the batch, as in sampling: one matrix
            eps = y @ self.gain[int(t[0]) - 1].to(x.device).T
        else:
            eps = torch.einsum("bij,bj->bi", self.gain.to(x.device)[t - 1], y)
        return eps.view_as(x).to(x.dtype)
