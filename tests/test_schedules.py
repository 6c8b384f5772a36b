"""β schedules against their definitions in docs/MATH.md § Schedules (and Nichol & Dhariwal's cosine)."""

import math

import numpy as np
import pytest

from ddpm import SCHEDULES, UserError, make_betas


def test_linear_is_the_papers_schedule():
    b = make_betas("linear")
    assert b.dtype == np.float64 and b.shape == (1000,)
    assert b[0] == 1e-4 and b[-1] == 0.02
    assert np.allclose(np.diff(b), (0.02 - 1e-4) / 999, rtol=0, atol=1e-15)


def test_quad_const_warmup_jsd():
    T = 100
    q = make_betas("quad", T, 1e-4, 0.02)
    assert np.allclose(np.sqrt(q), np.linspace(0.01, math.sqrt(0.02), T), atol=1e-15)
    assert (make_betas("const", T, 1e-4, 0.02) == 0.02).all()
    w = make_betas("warmup10", T, 1e-4, 0.02)
    assert np.allclose(w[:10], np.linspace(1e-4, 0.02, 10)) and (w[10:] == 0.02).all()
    w = make_betas("warmup50", T, 1e-4, 0.02)
    assert np.allclose(w[:50], np.linspace(1e-4, 0.02, 50)) and (w[50:] == 0.02).all()
    j = make_betas("jsd", T)
    assert np.allclose(j, [1.0 / (T - i) for i in range(T)]) and j[-1] == 1.0


def test_cosine_matches_alpha_bar_closed_form():
    T, s = 1000, 0.008
    b = make_betas("cosine", T)
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    abar = np.cumprod(1 - b)
    # Where β was not clipped at 0.999, ᾱ_t equals f(t)/f(0) exactly.
    unclipped = np.nonzero(b < 0.999)[0]
    k = unclipped[unclipped < 990]
    assert np.allclose(abar[k], [f(i + 1) / f(0) for i in k], rtol=1e-9)
    assert b.max() <= 0.999


@pytest.mark.parametrize("kwargs, needle", [
    (dict(name="linearr"), "'linear'"),
    (dict(name="linear", T=0), "T=0"),
    (dict(name="linear", beta_start=0.0), "beta_start"),
    (dict(name="linear", beta_end=1.5), "beta_end"),
    (dict(name="quad", beta_start=-1e-4), "beta_start"),
])
def test_invalid_schedules_say_what_is_valid(kwargs, needle):
    with pytest.raises(ValueError) as e:
        make_betas(**kwargs)
    assert needle in str(e.value) and isinstance(e.value, UserError)
    if "name" in kwargs and kwargs["name"] not in SCHEDULES:
        assert all(repr(s) in str(e.value) for s in SCHEDULES)
