"""GaussianDiffusion against facts from outside the code.

Reference tables are recomputed here from docs/MATH.md's formulas in numpy float64; moments come
from Monte Carlo or from composing one-step kernels; the posterior from Bayes' rule on a grid;
and the strongest check drives Algorithm 2 and the bound with the closed-form optimal
ε-predictor for Gaussian data.
"""

import math

import numpy as np
import pytest
import torch

from ddpm import DiffusionConfig, GaussianDiffusion, UserError, make_betas
from gaussian_oracle import MU, S, Oracle, bin_probabilities

T = 1000
# The paper's schedule, written out here on purpose. Arrays hold t = 1 … T: BETAS[t - 1] is β_t.
BETAS = np.linspace(1e-4, 0.02, T)
ABAR = np.cumprod(1 - BETAS)
ABAR_PREV = np.append(1.0, ABAR[:-1])


def _t(*vals):
    return torch.tensor(vals, dtype=torch.long)


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion(make_betas("linear", T))


# ---------------------------------------------------------------- forward process
def test_q_moments_compose_from_one_step_kernels(diffusion):
    # Composing q(x_t | x_{t-1}) = N(√α_t x_{t-1}, β_t) t times: mean ∏√α_s x_0, var α_t var + β_t.
    x0 = torch.tensor([[[[0.7]]]], dtype=torch.float64)
    m, v = 0.7, 0.0
    for i in range(T):
        m, v = math.sqrt(1 - BETAS[i]) * m, (1 - BETAS[i]) * v + BETAS[i]
        if i in (0, 1, 9, 99, 499, 999):  # after i + 1 steps: t = i + 1
            mean, var, logvar = diffusion.q_mean_variance(x0, _t(i + 1))
            assert mean.item() == pytest.approx(m, rel=1e-12, abs=1e-15)
            assert var.item() == pytest.approx(v, rel=1e-10)
            assert logvar.item() == pytest.approx(math.log(v), rel=1e-10)


@pytest.mark.parametrize("t", [1, 11, 301, 1000])
def test_q_sample_moments_by_monte_carlo(diffusion, t):
    g = torch.Generator().manual_seed(t)
    n = 400_000
    x0 = torch.full((n, 1, 1, 1), -0.4, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    xt = diffusion.q_sample(x0, torch.full((n,), t, dtype=torch.long), noise)
    abar = ABAR[t - 1]
    sd = math.sqrt(1 - abar)
    assert xt.mean().item() == pytest.approx(math.sqrt(abar) * -0.4, abs=5 * sd / math.sqrt(n))
    assert xt.var().item() == pytest.approx(1 - abar, rel=0.01)


def test_time_zero_is_the_data_and_undefined_quantities_are_nan(diffusion):
    # t = 0 means no forward step: q(x_0 | x_0) is the identity, exactly, whatever the noise.
    x0 = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    assert torch.equal(diffusion.q_sample(x0, _t(0, 0, 0), torch.randn_like(x0)), x0)
    # β_0 and the posterior at t = 0 have no meaning: a mistaken t = 0 shows as NaN, not a number.
    _, var, _ = diffusion.q_posterior_mean_variance(x0, x0, _t(0, 0, 0))
    assert torch.isnan(var).all() and torch.isnan(diffusion.table("betas", x0)[0])


@pytest.mark.parametrize("t", [2, 3, 51, 501, 1000])
def test_posterior_equals_bayes_rule_on_a_grid(diffusion, t):
    # q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0), integrated numerically in 1-D.
    x0 = 0.3
    abar, abar_prev, beta = ABAR[t - 1], ABAR_PREV[t - 1], BETAS[t - 1]
    xt = math.sqrt(abar) * x0 + math.sqrt(1 - abar) * 0.8  # a plausible x_t for this x_0
    mu_prior, var_prior = math.sqrt(abar_prev) * x0, 1 - abar_prev
    grid = np.linspace(mu_prior - 12 * math.sqrt(var_prior), mu_prior + 12 * math.sqrt(var_prior), 400_001)
    logp = -0.5 * (grid - mu_prior) ** 2 / var_prior - 0.5 * (xt - math.sqrt(1 - beta) * grid) ** 2 / beta
    w = np.exp(logp - logp.max())
    w /= w.sum()
    mean_num = (w * grid).sum()
    var_num = (w * (grid - mean_num) ** 2).sum()
    mean, var, logvar = diffusion.q_posterior_mean_variance(
        torch.tensor([[[[x0]]]], dtype=torch.float64), torch.tensor([[[[xt]]]], dtype=torch.float64), _t(t))
    assert mean.item() == pytest.approx(mean_num, abs=1e-6 * max(1, math.sqrt(var_num)))
    assert var.item() == pytest.approx(var_num, rel=1e-4)
    assert logvar.item() == pytest.approx(math.log(var_num), rel=1e-4)


def test_posterior_log_variance_is_clipped_at_t1(diffusion):
    # β̃_1 is 0; its log borrows β̃_2 (docs/MATH.md § Posterior). fixedlarge does the same at t = 1.
    bt2 = BETAS[1] * (1 - ABAR[0]) / (1 - ABAR[1])
    x = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    _, var, logvar = diffusion.q_posterior_mean_variance(x, x, _t(1))
    assert var.item() == 0.0 and logvar.item() == pytest.approx(math.log(bt2), rel=1e-12)
    out = diffusion.p_mean_variance(lambda x, t: torch.zeros_like(x), x, _t(1))
    assert out["log_variance"].item() == pytest.approx(math.log(bt2), rel=1e-12)
    out = diffusion.p_mean_variance(lambda x, t: torch.zeros_like(x), x, _t(6))
    assert out["log_variance"].item() == pytest.approx(math.log(BETAS[5]), rel=1e-12)
    assert out["variance"].item() == pytest.approx(BETAS[5], rel=1e-12)


def test_tables_are_cast_once_per_device_and_dtype(diffusion):
    x = torch.zeros(2, 1, 1, 1)
    assert diffusion.table("betas", x) is diffusion.table("betas", x)
    assert diffusion.table("betas", x).dtype == torch.float32
    assert diffusion.table("betas", x.double()).dtype == torch.float64
    assert diffusion.table("betas", x.bfloat16()).dtype == torch.float32  # never below float32


# ---------------------------------------------------------------- parametrisations
@pytest.mark.parametrize("mean_type", ["eps", "x0", "xprev", "v"])
def test_every_parametrisation_recovers_x0_and_the_posterior_mean(mean_type):
    d = GaussianDiffusion(make_betas("linear", T), mean_type=mean_type)
    g = torch.Generator().manual_seed(1)
    x0 = (torch.rand(4, 3, 5, 5, generator=g, dtype=torch.float64) * 2 - 1) * 0.9
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 4, 401, 1000])
    t_np = t.numpy() - 1  # rows of the numpy arrays
    sa = torch.from_numpy(np.sqrt(ABAR[t_np])).view(-1, 1, 1, 1)
    s1a = torch.from_numpy(np.sqrt(1 - ABAR[t_np])).view(-1, 1, 1, 1)
    xt = sa * x0 + s1a * eps
    c1 = torch.from_numpy(BETAS[t_np] * np.sqrt(ABAR_PREV[t_np]) / (1 - ABAR[t_np])).view(-1, 1, 1, 1)
    c2 = torch.from_numpy((1 - ABAR_PREV[t_np]) * np.sqrt(1 - BETAS[t_np]) / (1 - ABAR[t_np])).view(-1, 1, 1, 1)
    mu = c1 * x0 + c2 * xt  # eq. 7
    target = {"eps": eps, "x0": x0, "xprev": mu, "v": sa * eps - s1a * x0}[mean_type]
    out = d.p_mean_variance(lambda x, tt: target, xt, t, clip_denoised=False)
    # ε → x0 at t = 1000 amplifies float64 rounding by √(1/ᾱ) ≈ 156: still ~1e-12.
    assert torch.allclose(out["pred_x0"], x0, atol=1e-9)
    assert torch.allclose(out["mean"], mu, atol=1e-9)
    assert torch.allclose(d.predict_eps_from_x0(xt, t, x0), eps, atol=1e-9)


# ---------------------------------------------------------------- losses
def _toy_model(x, t):
    # deterministic, depends on both arguments, not an oracle of anything
    return 0.3 * x + 0.001 * t.view(-1, 1, 1, 1).to(x.dtype) * torch.tanh(x)


def test_l_simple_is_the_mean_over_pixels_squared_error(diffusion):
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(3, 2, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([1, 18, 1000])
    t_np = t.numpy() - 1
    xt = (torch.from_numpy(np.sqrt(ABAR[t_np])).float().view(-1, 1, 1, 1) * x0
          + torch.from_numpy(np.sqrt(1 - ABAR[t_np])).float().view(-1, 1, 1, 1) * noise)
    expected = ((noise - _toy_model(xt, t)) ** 2).mean(dim=(1, 2, 3))
    got = diffusion.training_losses(_toy_model, x0, t, noise)["loss"]
    assert got.shape == (3,) and torch.allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_kl_loss_equals_the_matching_term_of_the_bound():
    Ts = 10
    d = GaussianDiffusion(make_betas("linear", Ts, 1e-3, 0.2), loss_type="kl")
    g = torch.Generator().manual_seed(3)
    x0 = torch.randint(0, 256, (2, 1, 4, 4), generator=g).float() / 127.5 - 1
    noises = [torch.randn(x0.shape, generator=g) for _ in range(Ts)]  # used for t = Ts … 1 in turn
    it = iter(noises)
    bpd = d.calc_bpd_loop(_toy_model, x0, clip_denoised=False, noise_fn=lambda shape: next(it))
    for t in (1, 2, 6, Ts):  # the term computed from x_t is L_{t-1}, in column t - 1
        loss = d.training_losses(_toy_model, x0, torch.full((2,), t), noise=noises[Ts - t])["loss"]
        assert torch.allclose(loss, bpd["vb"][:, t - 1], rtol=1e-5), t
    assert torch.allclose(bpd["total_bpd"], bpd["vb"].sum(1) + bpd["prior_bpd"])


def test_hybrid_loss_trains_the_mean_only_through_l_simple():
    d = GaussianDiffusion(make_betas("linear", 50, 1e-3, 0.1), var_type="learned_range", loss_type="hybrid")
    w = torch.zeros(2, requires_grad=True)  # w[0] scales the mean output, w[1] the variance output
    model = lambda x, t: torch.cat([w[0] * x, w[1] + 0 * x], dim=1)
    x0 = torch.rand(2, 1, 3, 3) * 2 - 1
    t, noise = torch.tensor([3, 20]), torch.randn(2, 1, 3, 3)
    out = d.training_losses(model, x0, t, noise)
    g_total = torch.autograd.grad(out["loss"].sum(), w)[0]
    w2 = w.detach().clone().requires_grad_(True)
    model2 = lambda x, t: torch.cat([w2[0] * x, w2[1] + 0 * x], dim=1)
    g_mse = torch.autograd.grad(d.training_losses(model2, x0, t, noise)["mse"].sum(), w2)[0]
    assert torch.allclose(g_total[0], g_mse[0])  # the bound adds nothing to the mean's gradient
    assert g_total[1].abs() > 0  # and it does train the variance


# ---------------------------------------------------------------- invalid combinations
@pytest.mark.parametrize("kwargs, needle", [
    (dict(schedule="jsd", mean_type="eps"), "ᾱ_T = 0"),
    (dict(var_type="learned", loss_type="mse"), "hybrid"),
    (dict(var_type="fixedlarge", loss_type="hybrid"), "learned"),
    (dict(mean_type="epsilon"), "'eps', 'x0', 'xprev', 'v'"),
    (dict(var_type="large"), "'fixedlarge'"),
])
def test_bad_configurations_are_refused_clearly(kwargs, needle):
    with pytest.raises(UserError) as e:
        cfg = DiffusionConfig(**kwargs)
        GaussianDiffusion.from_config(cfg)
    assert needle in str(e.value)


def test_the_ancestral_step_refuses_a_chain_it_cannot_walk(diffusion):
    # Algorithm 2's step goes from t to t - 1; given DDIM's respaced times it would silently use
    # the wrong posterior, so the loop refuses before any step is taken.
    calls = []
    model = lambda x, t: calls.append(1) or torch.zeros_like(x)
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(UserError, match="jumps from t=1000 to t=980"):
        diffusion.reverse_loop(model, x, [1000, 980, 0], diffusion.ancestral())
    with pytest.raises(UserError, match="strictly decreasing"):
        diffusion.reverse_loop(model, x, [5, 6, 4], diffusion.ddim())
    with pytest.raises(UserError, match="from 0"):
        diffusion.reverse_loop(model, x, [1001, 1000], diffusion.ancestral())
    assert not calls
    diffusion.reverse_loop(model, x, [1000, 980, 0], diffusion.ddim())  # DDIM walks any descending chain
    assert len(calls) == 2


def test_jsd_works_with_x0_prediction():
    d = GaussianDiffusion.from_config(DiffusionConfig(schedule="jsd", T=20, mean_type="x0"))
    x = d.p_sample_loop(lambda x, t: torch.zeros_like(x), (2, 1, 2, 2))
    assert torch.isfinite(x).all()


# ---------------------------------------------------------------- the Gaussian-data oracle
_oracle = Oracle()  # E[ε | x_t] for x_0 ~ N(μ, s²) in closed form (gaussian_oracle.py)


@pytest.mark.parametrize("var_type", ["fixedlarge", "fixedsmall"])
def test_algorithm_2_with_the_oracle_samples_the_data_distribution(var_type):
    d = GaussianDiffusion(make_betas("linear", T), var_type=var_type)
    g = torch.Generator().manual_seed(4)
    n = 20_000
    x = d.p_sample_loop(_oracle, (n, 1, 1, 1), noise_fn=lambda shape: torch.randn(shape, generator=g, dtype=torch.float64),
                        clip_denoised=False)
    mean, var = x.mean().item(), x.var().item()
    print(f"oracle sampling ({var_type}): mean {mean:.4f} (data {MU}), var {var:.5f} (data {S**2})")
    assert abs(mean - MU) < 4 * S / math.sqrt(n)
    assert abs(var / S**2 - 1) < 0.03


@pytest.mark.slow
def test_bits_per_dim_with_the_oracle_bounds_the_true_nll_closely():
    # σ² = β (fixedlarge) is the reverse variance that suits spread-out data (docs/MATH.md: the paper's
    # CIFAR-10 choice). Measured: a gap of about 0.13 bits/dim over the exact NLL of each image, nearly
    # all of it in the decoder L_0, where the continuous oracle does not know the data sit on a grid.
    # With fixedsmall (σ² = β̃, too small at small t for such data) the gap measures about 0.7.
    d = GaussianDiffusion(make_betas("linear", T), var_type="fixedlarge")
    g = torch.Generator().manual_seed(5)
    k = ((MU + S * torch.randn(512, 1, 4, 4, generator=g, dtype=torch.float64)) * 127.5 + 127.5).round().clamp(0, 255)
    x0 = k / 127.5 - 1
    res = d.calc_bpd_loop(_oracle, x0, clip_denoised=True,
                          noise_fn=lambda shape: torch.randn(shape, generator=g, dtype=torch.float64))
    p = bin_probabilities(MU, S)
    nll = torch.from_numpy(-np.log2(p[k.long().numpy()])).mean(dim=(1, 2, 3))  # each image's true NLL
    gap = res["total_bpd"] - nll
    g_mean, g_se = gap.mean().item(), gap.std().item() / math.sqrt(len(gap))
    print(f"oracle bits/dim {res['total_bpd'].mean():.4f}, true NLL {nll.mean():.4f} "
          f"(entropy {-(p * np.log2(p)).sum():.4f}), gap {g_mean:.4f} ± {g_se:.4f}; "
          f"prior {res['prior_bpd'].mean():.2e}, L0 {res['vb'][:, 0].mean():.4f}")
    assert g_mean >= -3 * g_se  # a bound can't beat the true NLL
    assert g_mean < 0.2  # and with the optimal ε it is close (measured 0.128 ± 0.022 at seed 5)
