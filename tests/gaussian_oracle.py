"""The closed-form optimal ε-predictor for Gaussian data, shared by the tests.

For x_0 ~ N(μ, s²) per pixel, E[ε | x_t] = √(1−ᾱ_t)(x_t − √ᾱ_t μ) / (ᾱ_t s² + 1 − ᾱ_t): the best
any network could do, so samplers and the bound driven by it can be checked against the data.
ᾱ is computed here from the β's with numpy, independently of ddpm. Like the package's networks it
is called with the paper's t ∈ 1 … T (docs/MATH.md § Time and indexing): ᾱ_t is abar[t − 1].
"""

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
