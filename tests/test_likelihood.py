"""normal_kl and the discretized Gaussian decoder, against closed forms and Monte Carlo."""

import math

import numpy as np
import pytest
import torch

from ddpm.process.likelihood import discretized_gaussian_log_likelihood, normal_kl


def test_normal_kl_is_zero_for_equal_gaussians():
    g = torch.Generator().manual_seed(0)
    m, lv = 3 * torch.randn(1000, generator=g), 3 * torch.randn(1000, generator=g)
    # exp(0) = 1 exactly, so only -1 + lv2 - lv1 rounds: each step at most half an ulp of a number
    # of size 1 + |lv|; the bound below leaves a factor of two over that.
    assert (normal_kl(m, lv, m, lv).abs() <= torch.finfo(torch.float32).eps * (1 + lv.abs())).all()
    assert (normal_kl(m.double(), lv.double(), m.double(), lv.double()).abs() < 1e-14).all()


@pytest.mark.parametrize("m1, lv1, m2, lv2", [(0.3, -1.0, -0.5, 0.2), (1.0, 0.5, 0.0, 0.0), (-2.0, -3.0, -1.5, -2.0)])
def test_normal_kl_equals_monte_carlo(m1, lv1, m2, lv2):
    g = torch.Generator().manual_seed(0)
    x = m1 + math.exp(0.5 * lv1) * torch.randn(2_000_000, generator=g, dtype=torch.float64)
    log_n = lambda x, m, lv: -0.5 * (math.log(2 * math.pi) + lv + (x - m) ** 2 / math.exp(lv))
    mc = (log_n(x, m1, lv1) - log_n(x, m2, lv2)).mean().item()
    kl = normal_kl(torch.tensor(m1, dtype=torch.float64), lv1, m2, lv2).item()
    assert abs(kl - mc) < 5e-3 * max(1.0, kl)


def _grid():
    return torch.arange(256, dtype=torch.float32) / 127.5 - 1.0  # the 256 pixel values in [-1, 1]


@pytest.mark.parametrize("mean, log_scale", [(0.0, -3.0), (0.7, -5.0), (-0.99, -1.0), (0.2, 0.5), (1.5, -4.5), (-0.3, -8.0)])
def test_decoder_probabilities_sum_to_one(mean, log_scale):
    x = _grid()
    lp = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, log_scale))
    assert abs(lp.double().exp().sum().item() - 1.0) < 1e-5


def test_decoder_matches_exact_gaussian_bin_mass():
    # The tanh CDF approximation is within ~2e-4 of Φ; interior and edge bins both checked with erf.
    x = _grid()
    mean, sigma = 0.1, 0.05
    lp = discretized_gaussian_log_likelihood(x, torch.full_like(x, mean), torch.full_like(x, math.log(sigma)))
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))
    exact = []
    for v in x.tolist():
        hi = 1.0 if v > 0.999 else phi((v + 1 / 255 - mean) / sigma)
        lo = 0.0 if v < -0.999 else phi((v - 1 / 255 - mean) / sigma)
        exact.append(hi - lo)
    assert np.abs(lp.exp().numpy() - np.array(exact)).max() < 5e-4


def test_decoder_floor_is_1e_minus_12():
    x = torch.tensor([0.0])
    lp = discretized_gaussian_log_likelihood(x, torch.tensor([0.9]), torch.tensor([-9.0]))
    assert lp.item() == pytest.approx(math.log(1e-12), rel=1e-6)
