"""Gaussian KL and the discretized Gaussian decoder (docs/MATH.md § Training objective, eq. 13).

Both follow the official code to the constant: the tanh
approximation of the normal CDF, the ±0.999 edge bins that extend to ∓∞, and the 1e-12 floor
before each log. They always compute in at least float32: the CDF differences of a 2/255-wide
bin vanish in bfloat16.
"""

from __future__ import annotations

import math

import torch


def _f32(x):
    return x.float() if torch.is_tensor(x) and x.dtype in (torch.float16, torch.bfloat16) else x


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats. Arguments broadcast."""
    ref = next(a for a in (mean1, logvar1, mean2, logvar2) if torch.is_tensor(a))
    mean1, logvar1, mean2, logvar2 = (_f32(a) if torch.is_tensor(a) else torch.tensor(a).to(_f32(ref)) for a in (mean1, logvar1, mean2, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Φ(x) ≈ ½(1 + tanh(√(2/π)(x + 0.044715 x³))), the approximation the official code uses."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log p(x) of the decoder L_0 (eq. 13), elementwise, in nats.

    :param x: [B, C, H, W] data in [-1, 1] on the 256-level grid (uint8 / 127.5 − 1).
    :param means, log_scales: the Gaussian's mean and log standard deviation (½ log-variance).
    Each pixel's bin is x ± 1/255; the bins of x = −1 and x = 1 extend to −∞ and +∞.
    """
    x, means, log_scales = _f32(x), _f32(means), _f32(log_scales)
    assert x.shape == means.shape, (x.shape, means.shape)
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    log_probs = torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))
    assert log_probs.shape == x.shape
    return log_probs


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch: [B, …] -> [B]."""
    return x.mean(dim=tuple(range(1, x.ndim)))
