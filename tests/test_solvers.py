"""The few-step solvers against facts from outside the code.

1. An exact reference. For Gaussian data x_0 ~ N(μ, s²) per pixel, driven by the closed-form
   optimal ε (gaussian_oracle.py), the probability-flow ODE keeps the standardized coordinate
   z = (x_t − √ᾱ_t μ) / √(ᾱ_t s² + 1 − ᾱ_t) constant, so its exact solution from x at the chain's
   first time is known at every t. Each deterministic solver's error at the chain's last noisy
   time (before the final x̂_0 step that every sampler shares) falls with NFE at the solver's order:
   the log-log slope over NFE 10 → 40 is measured here.
2. Another implementation: on the same ε-network and the same x_T (and, for the SDE, the same
   noise), each solver equals diffusers' own scheduler after the whole chain, and our grids equal
   the timesteps of diffusers' matching options.
3. Properties: `steps` counts the network's evaluations, image i does not depend on the batch, a
   learned variance does not change an ODE solver's samples, the SDE variant reproduces the data.
"""

import math

import numpy as np
import pytest
import torch

from ddpm import GaussianDiffusion, UserError
from ddpm.process.grids import time_grid
from ddpm.process.sampling import SamplerSpec
from ddpm.workflows.sample import ImageNoise, Images, sample
from gaussian_oracle import MU, PAPER_BETAS, S, assert_follows_law, oracle_for

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.usefixtures("one_thread")

ABAR = np.cumprod(1 - PAPER_BETAS)  # ᾱ_t = ABAR[t - 1], computed here from the β's
DIFFUSION = GaussianDiffusion(PAPER_BETAS)
X = torch.linspace(-3, 3, 25, dtype=torch.float64).view(1, 1, 5, 5)  # x at the chain's first time


def exact_ode(x, t_from: int, t_to: int):
    """The probability-flow ODE's solution at t_to from x at t_from: z is constant."""
    a, b = ABAR[t_from - 1], ABAR[t_to - 1]
    z = (x - math.sqrt(a) * MU) / math.sqrt(a * S**2 + 1 - a)
    return math.sqrt(b) * MU + math.sqrt(b * S**2 + 1 - b) * z


def ode_error(sampler: str, nfe: int, spacing: str) -> float:
    """max |x − exact| at the chain's last noisy time, run in float64 on the oracle."""
    spec = SamplerSpec(sampler, steps=nfe, spacing=spacing, clip_denoised=False)
    times, step = spec.chain(DIFFUSION)
    times = times[:-1]  # stop before the final x̂_0 step
    x = DIFFUSION.reverse_loop(oracle_for(), X.clone(), times, step,
                               noise_fn=lambda shape: torch.zeros(shape, dtype=torch.float64))
    return (x - exact_ode(X, times[0], times[-1])).abs().max().item()


def slope(sampler: str, spacing: str) -> float:
    e10, e40 = ode_error(sampler, 10, spacing), ode_error(sampler, 40, spacing)
    return math.log(e10 / e40) / math.log(4)


# The measured slopes over NFE 10 → 40 (max error over x ∈ [-3, 3], docs/MATH.md § Few-step samplers):
#   quad:    ddim 1.00, dpm++2m 1.97, unipc 2.81, heun 2.43
#   logsnr:  ddim 0.98, dpm++2m 1.29 (2.0 from 20 → 80: not yet asymptotic at 10), unipc 2.57, heun 2.67
#   karras:  ddim 0.96, dpm++2m 0.89 (2.0 from 20 → 80), unipc 1.85, heun 2.28
@pytest.mark.parametrize("sampler, spacing, low, high", [
    ("ddim", "quad", 0.8, 1.2),
    ("ddim", "logsnr", 0.8, 1.2),
    ("dpm++2m", "quad", 1.7, 3.5),
    ("unipc", "quad", 1.7, 3.5),
    ("unipc", "logsnr", 1.7, 3.5),
    ("heun", "quad", 1.7, 3.5),
    ("heun", "karras", 1.7, 3.5),
])
def test_each_solver_converges_to_the_exact_ode_solution_at_its_order(sampler, spacing, low, high):
    k = slope(sampler, spacing)
    print(f"{sampler} {spacing}: slope {k:.2f}")
    assert low <= k <= high


def test_dpm_solver_2m_is_second_order_once_the_steps_are_small():
    # On the logsnr grid 10 NFE is before the asymptotic regime for this narrow Gaussian; from 20 on
    # each doubling divides the error by about 4.
    e = [ode_error("dpm++2m", n, "logsnr") for n in (20, 40, 80)]
    assert math.log(e[0] / e[2]) / math.log(4) >= 1.7


def test_the_whole_chain_ends_with_the_oracles_x0_at_the_last_noisy_time():
    # With few steps the error of the full chain is the ODE's plus the shared final step x_0 = x̂_0(x_{t_1}):
    # for the exact solution at t_1 that is μ + k (x_{t_1} − √ᾱ μ), k = √ᾱ s² / (ᾱ s² + 1 − ᾱ).
    spec = SamplerSpec("unipc", steps=40, spacing="logsnr", clip_denoised=False)
    times, step = spec.chain(DIFFUSION)
    x0 = DIFFUSION.reverse_loop(oracle_for(), X.clone(), times, step,
                                noise_fn=lambda shape: torch.zeros(shape, dtype=torch.float64))
    t1 = times[-2]
    a = ABAR[t1 - 1]
    x1 = exact_ode(X, times[0], t1)
    expected = MU + math.sqrt(a) * S**2 / (a * S**2 + 1 - a) * (x1 - math.sqrt(a) * MU)
    assert (x0 - expected).abs().max().item() < 2e-3


# ------------------------------------------------------------------------------------------ diffusers


def _drive(scheduler, model, x, noises=None, heun_times=None):
    """diffusers' own loop: scale the input, call the ε-network at its (0-based) timestep, step."""
    it = iter(noises or [])
    for k in scheduler.timesteps:
        eps = model(scheduler.scale_model_input(x, k), torch.full((x.shape[0],), int(k) + 1))
        kw = dict(variance_noise=next(it)) if noises is not None else {}
        x = scheduler.step(eps, k, x, **kw).prev_sample
    return x


def _ours(spec, model, x, noises, diffusion=DIFFUSION):
    times, step = spec.chain(diffusion)
    it = iter(noises)
    return diffusion.reverse_loop(model, x.clone(), times, step, noise_fn=lambda shape: next(it)), times


def _diffusers_for(sampler: str, times, clip: bool, prediction="epsilon"):
    """The diffusers scheduler that is `sampler`, set to our grid's times (0-based in diffusers)."""
    common = dict(num_train_timesteps=1000, trained_betas=PAPER_BETAS, prediction_type=prediction)
    ks = [t - 1 for t in times[:-1]]
    clip_opts = dict(thresholding=True, dynamic_thresholding_ratio=1.0, sample_max_value=1.0) if clip else {}
    if sampler in ("dpm++2m", "dpm++2m-sde"):
        s = diffusers.DPMSolverMultistepScheduler(
            algorithm_type="dpmsolver++" if sampler == "dpm++2m" else "sde-dpmsolver++", solver_order=2,
            solver_type="midpoint", lower_order_final=True, final_sigmas_type="zero", **clip_opts, **common)
        s.set_timesteps(timesteps=ks)
    elif sampler == "unipc":
        s = diffusers.UniPCMultistepScheduler(solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True,
                                              final_sigmas_type="zero", **clip_opts, **common)
        s.set_timesteps(len(ks))  # UniPC takes no custom timesteps: set ours in its place
        s.timesteps = torch.tensor(ks)
        sig = np.sqrt((1 - s.alphas_cumprod.double().numpy()) / s.alphas_cumprod.double().numpy())
        s.sigmas = torch.tensor(np.append(sig[ks], 0.0), dtype=torch.float32)
    else:
        s = diffusers.HeunDiscreteScheduler(clip_sample=clip, clip_sample_range=1.0, **common)
        s.set_timesteps(timesteps=ks)
    return s


NOISES = [torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(100 + i)) for i in range(60)]
X_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("spacing", ["uniform", "quad", "trailing", "logsnr", "karras"])
@pytest.mark.parametrize("sampler", ["dpm++2m", "dpm++2m-sde", "unipc", "heun"])
def test_each_solver_equals_diffusers_on_the_same_grid(sampler, spacing):
    model = oracle_for()
    ours, times = _ours(SamplerSpec(sampler, steps=10, spacing=spacing, clip_denoised=False), model, X_T, NOISES)
    s = _diffusers_for(sampler, times, clip=False)
    # Heun's state in diffusers is x_t / √ᾱ_t (its init_noise_sigma approximates 1/√ᾱ by σ; we start both exactly)
    x = X_T / math.sqrt(ABAR[times[0] - 1]) if sampler == "heun" else X_T
    theirs = _drive(s, model, x.clone(), NOISES if sampler == "dpm++2m-sde" else None)
    diff = (ours - theirs).abs().max().item()
    print(f"{sampler} {spacing}: max |ours − diffusers| = {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.parametrize("sampler", ["dpm++2m", "unipc", "heun"])
def test_clipping_and_v_prediction_equal_diffusers_too(sampler):
    # x̂_0 clipped to [-1, 1] (diffusers: thresholding with ratio 1 and max 1, or Heun's clip_sample),
    # wide data so that clipping acts, and a network that predicts v = √ᾱ ε − √(1−ᾱ) x_0.
    eps = oracle_for()
    eps.mu, eps.s = 0.3, 0.9
    abar = torch.from_numpy(ABAR)

    def v_net(x, t):
        a = abar.to(x)[t - 1].view(-1, 1, 1, 1)
        e = eps(x, t)
        return a.sqrt() * e - (1 - a).sqrt() * (x - (1 - a).sqrt() * e) / a.sqrt()

    d = GaussianDiffusion(PAPER_BETAS, mean_type="v")
    spec = SamplerSpec(sampler, steps=12, spacing="logsnr" if sampler != "heun" else "karras", clip_denoised=True)
    ours, times = _ours(spec, v_net, X_T * 1.5, NOISES, diffusion=d)
    s = _diffusers_for(sampler, times, clip=True, prediction="v_prediction")
    x = X_T * 1.5 / math.sqrt(ABAR[times[0] - 1]) if sampler == "heun" else X_T * 1.5
    unclipped, _ = _ours(SamplerSpec(sampler, steps=12, spacing=spec.spacing, clip_denoised=False), v_net, X_T * 1.5,
                         NOISES, diffusion=d)
    assert (ours - unclipped).abs().max() > 1e-2  # clipping acted
    assert (ours - _drive(s, v_net, x.clone())).abs().max().item() <= 1e-4


@pytest.mark.parametrize("steps", [10, 20, 50, 100])
def test_the_grids_are_diffusers_timesteps(steps):
    # diffusers counts time from 0: its timestep k is our t = k + 1. It keeps a time that rounding
    # gives twice (a step of length 0); we keep it once. Its σ table is float32, so a continuous
    # grid point that falls within ~1e-4 of a half-integer time may round the other way there.
    def timesteps(cls=diffusers.DPMSolverMultistepScheduler, **kw):
        s = cls(num_train_timesteps=1000, trained_betas=PAPER_BETAS, **kw)
        s.set_timesteps(steps)
        return sorted({int(k) + 1 for k in s.timesteps}, reverse=True) + [0]

    assert time_grid(ABAR, steps, "trailing") == timesteps(timestep_spacing="trailing")
    assert time_grid(ABAR, steps, "uniform") == timesteps(diffusers.DDIMScheduler, timestep_spacing="leading")
    for spacing, option in (("logsnr", "use_lu_lambdas"), ("karras", "use_karras_sigmas")):
        ours, theirs = time_grid(ABAR, steps, spacing), timesteps(**{option: True})
        assert len(ours) == len(theirs)
        off = [(a, b) for a, b in zip(ours, theirs) if a != b]
        assert len(off) <= 1 and all(abs(a - b) == 1 for a, b in off), off


def test_the_continuous_grids_are_what_their_papers_define():
    # logsnr: uniform in λ = log(ᾱ/(1−ᾱ)); karras: σ^(1/7) uniform, σ = √((1−ᾱ)/ᾱ); both from t = T to 1.
    lam = lambda t: math.log(ABAR[t - 1] / (1 - ABAR[t - 1]))  # noqa: E731
    ts = time_grid(ABAR, 8, "logsnr")[:-1]
    want = np.linspace(lam(1000), lam(1), 8)
    assert ts[0] == 1000 and ts[-1] == 1
    for t, w in zip(ts, want):  # the nearest integer time: λ within a step of the table
        assert min(abs(lam(u) - w) for u in (t - 1, t, t + 1) if 1 <= u <= 1000) == pytest.approx(abs(lam(t) - w))
    sig = lambda t: math.sqrt((1 - ABAR[t - 1]) / ABAR[t - 1])  # noqa: E731
    ks = time_grid(ABAR, 8, "karras")[:-1]
    r = np.array([sig(t) ** (1 / 7) for t in ks])
    assert ks[0] == 1000 and ks[-1] == 1
    assert np.ptp(np.diff(r)) < 0.2 * abs(np.diff(r).mean())  # equal steps in σ^(1/7), up to the rounding to t


# ------------------------------------------------------------------------------------------ properties


@pytest.mark.parametrize("sampler, steps, nfe", [("ddim", 10, 10), ("dpm++2m", 10, 10), ("dpm++2m-sde", 7, 7),
                                                 ("unipc", 10, 10), ("heun", 10, 9), ("heun", 9, 9), ("heun", 1, 1)])
def test_steps_counts_the_network_evaluations(sampler, steps, nfe):
    model = oracle_for()
    spec = SamplerSpec(sampler, steps=steps, spacing="trailing")
    sample(model, DIFFUSION, (1, 4, 4), Images(0, range(3)), device="cpu", sampler=spec)
    assert model.images == 3 * nfe
    assert spec.nfe(spec.chain(DIFFUSION)[0]) == nfe


@pytest.mark.parametrize("sampler", ["dpm++2m-sde", "unipc", "heun"])
def test_image_i_is_the_same_at_any_batch_size(sampler):
    spec = SamplerSpec(sampler, steps=6, spacing="logsnr")
    whole = sample(oracle_for(), DIFFUSION, (1, 8, 8), Images(3, range(5)), device="cpu", sampler=spec)
    parts = torch.cat([sample(oracle_for(), DIFFUSION, (1, 8, 8), Images(3, idx), device="cpu", sampler=spec)
                       for idx in (range(0, 2), range(2, 5))])
    assert torch.equal(whole, parts)


@pytest.mark.parametrize("sampler", ["dpm++2m", "unipc", "heun"])
def test_an_ode_solver_ignores_a_learned_variance_and_its_noise(sampler):
    eps = oracle_for()
    learned = lambda x, t: torch.cat([eps(x, t), torch.full_like(x, 0.7)], dim=1)  # noqa: E731
    spec = SamplerSpec(sampler, steps=8, spacing="karras")
    a = sample(eps, DIFFUSION, (1, 8, 8), Images(1, range(3)), device="cpu", sampler=spec)
    # the same ε with a variance channel (any values): the same samples
    b = sample(learned, GaussianDiffusion(PAPER_BETAS, var_type="learned_range", loss_type="hybrid"), (1, 8, 8),
               Images(1, range(3)), device="cpu", sampler=spec)
    assert torch.equal(a, b)
    # the same x_T with other per-step noise: the same samples
    x_T = ImageNoise(1, range(3), "cpu")(torch.Size((3, 1, 8, 8)))
    times, step = spec.chain(DIFFUSION)
    c = DIFFUSION.reverse_loop(eps, x_T, times, step, noise_fn=ImageNoise(9, range(3), "cpu"))
    assert torch.equal(a, c)
    # ... while the SDE variant uses it
    sde = SamplerSpec("dpm++2m-sde", steps=8, spacing="karras")
    times, step = sde.chain(DIFFUSION)
    d = DIFFUSION.reverse_loop(eps, x_T, times, step, noise_fn=ImageNoise(9, range(3), "cpu"))
    assert not torch.equal(d, sample(eps, DIFFUSION, (1, 8, 8), Images(1, range(3)), device="cpu", sampler=sde))


def sde_law(times):
    """Mean and variance of x_0 under SDE-DPM-Solver++(2M) with the oracle, composed exactly in
    float64: each x is (mean, coefficients on the independent standard normals x_T, z_1, z_2, …)."""
    n = len(times)
    one = lambda j: np.eye(n)[j]  # noqa: E731
    x, prev = (0.0, one(0)), None  # x_T ~ N(0, 1)
    lam = lambda t: 0.5 * math.log(ABAR[t - 1] / (1 - ABAR[t - 1]))  # noqa: E731

    def denoised(x, t):  # x̂_0 = μ + k (x − √ᾱ μ), affine in x
        a = ABAR[t - 1]
        k = math.sqrt(a) * S**2 / (a * S**2 + 1 - a)
        return MU + k * (x[0] - math.sqrt(a) * MU), k * x[1]

    for i, (t, tn) in enumerate(zip(times, times[1:])):
        d0 = denoised(x, t)
        if tn == 0:
            x = d0
            break
        h = lam(tn) - lam(t)
        d = d0
        if prev is not None:
            d_prev, h_prev = prev
            r = h_prev / h
            d = (d0[0] + (d0[0] - d_prev[0]) / (2 * r), d0[1] + (d0[1] - d_prev[1]) / (2 * r))
        prev = (d0, h)
        sn, ss, an = math.sqrt(1 - ABAR[tn - 1]), math.sqrt(1 - ABAR[t - 1]), math.sqrt(ABAR[tn - 1])
        e = math.exp(-h)
        x = (sn / ss * e * x[0] + an * (1 - e * e) * d[0],
             sn / ss * e * x[1] + an * (1 - e * e) * d[1] + sn * math.sqrt(1 - e * e) * one(i + 1))
    return x[0], float(x[1] @ x[1])


def test_the_sde_variant_follows_its_exact_law_and_reproduces_the_data():
    for steps in (20, 100):
        spec = SamplerSpec("dpm++2m-sde", steps=steps, spacing="logsnr", clip_denoised=False)
        m, V = sde_law(spec.chain(DIFFUSION)[0])
        x = sample(oracle_for(), DIFFUSION, (1, 64, 64), Images(11, range(64)), device="cpu", sampler=spec)
        assert_follows_law(x, m, V, f"dpm++2m-sde {steps}")
    assert abs(V / S**2 - 1) < 0.01  # with 100 evaluations the data's variance, within 1 %


def test_bad_sampler_settings_get_one_line():
    with pytest.raises(UserError, match="'karras'"):
        SamplerSpec("dpm++2m", spacing="karas")
    with pytest.raises(UserError, match="steps=0"):
        SamplerSpec("unipc", steps=0)
    with pytest.raises(UserError, match="T=1000"):
        SamplerSpec("heun", steps=5000).chain(DIFFUSION)
    with pytest.raises(UserError, match="'heun'"):
        SamplerSpec("huen")


@pytest.mark.parametrize("mean_type", ["x0", "v", "xprev"])
def test_every_parametrisation_gives_the_same_chain(mean_type):
    # A network that predicts x_0, v or the posterior mean exactly as the oracle's ε implies: the
    # solvers see the same x̂_0, so the same samples (to float rounding).
    eps, abar = oracle_for(), torch.from_numpy(np.append(1.0, ABAR))
    betas = torch.from_numpy(np.append(np.nan, PAPER_BETAS))

    def net(x, t):
        a, b = (v.to(x)[t].view(-1, 1, 1, 1) for v in (abar, betas))
        e = eps(x, t)
        x0 = (x - (1 - a).sqrt() * e) / a.sqrt()
        if mean_type == "x0":
            return x0
        if mean_type == "v":
            return a.sqrt() * e - (1 - a).sqrt() * x0
        a_prev = a / (1 - b)  # ᾱ_{t−1}
        return (b * a_prev.sqrt() * x0 + (1 - a_prev) * (1 - b).sqrt() * x) / (1 - a)

    # float64: near t = T, x_0 from ε (or from the posterior mean) amplifies rounding by 1/√ᾱ_T (and 1/β_T)
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    other = GaussianDiffusion(PAPER_BETAS, mean_type=mean_type)
    for sampler in ("dpm++2m", "unipc", "heun", "dpm++2m-sde"):
        spec = SamplerSpec(sampler, steps=8, spacing="logsnr", clip_denoised=False)
        want, got = (d.reverse_loop(m, x_T, spec.chain(d)[0], spec.chain(d)[1],
                                    noise_fn=ImageNoise(5, range(3), "cpu", torch.float64))
                     for d, m in ((DIFFUSION, eps), (other, net)))
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_guidance_is_one_batched_evaluation_per_network_evaluation():
    from gaussian_oracle import ClassOracle

    for sampler, steps, nfe in (("heun", 7, 7), ("unipc", 6, 6), ("dpm++2m-sde", 5, 5)):
        net = ClassOracle()
        spec = SamplerSpec(sampler, steps=steps, spacing="karras")
        x = sample(net, DIFFUSION, (1, 4, 4), Images(0, range(4), torch.tensor([0, 1, 2, 0]), 3.0), device="cpu",
                   sampler=spec)
        assert net.calls == nfe and net.images == 2 * 4 * nfe  # [x; x] with [c; ∅], once per evaluation
        assert torch.isfinite(x).all()


@pytest.mark.parametrize("sampler, draws", [("dpm++2m", 0), ("unipc", 0), ("heun", 0), ("dpm++2m-sde", 6), ("ddim", 0),
                                            ("ancestral", 1000)])
def test_noise_is_drawn_only_by_the_steps_that_use_it(sampler, draws):
    calls = []

    def noise_fn(shape):
        calls.append(shape)
        return torch.randn(shape)

    spec = SamplerSpec(sampler, steps=6, spacing="trailing")
    times, step = spec.chain(DIFFUSION)
    DIFFUSION.reverse_loop(oracle_for(), torch.randn(2, 1, 4, 4), times, step, noise_fn=noise_fn)
    assert len(calls) == draws
