"""Editing with a trained model (RePaint, SDEdit, DDIM inversion), against facts from outside the code.

The edits are driven by closed-form optimal ε-predictors for Gaussian data, so what they should
return is known: for correlated pixels x_0 ~ N(μ, Σ) (`CovOracle`) the inpainted pixels should
follow the Gaussian conditional law given the known ones; for iid pixels (`Oracle`) every chain,
unclipped, is affine in its start, so SDEdit's output given its input and DDIM inversion's latent
have closed forms. Every RePaint, SDEdit and inversion step is affine-Gaussian under these
predictors, so the exact law of what the algorithm itself returns is composed here step by step in
float64 (re-derived from the papers' updates, not read from the code), and Monte Carlo runs are
held to it within their standard errors; the distance of that law from the ideal one is the
method's own error (RePaint's without and with resampling, DDIM inversion's discretisation).
RePaint's walk is compared with the schedule its authors published. The rest are properties:
known pixels exact, image i independent of the batch, strength 0 and 1, masks, the results folder.
"""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm import GaussianDiffusion, UserError, make_betas
from gaussian_oracle import MU, PAPER_BETAS, S, CovOracle, Oracle, gaussian_conditional, grid_covariance
from ddpm.process.diffusion import ddim_timesteps
from ddpm.process.editing import (RePaintSpec, chain_from, ddim_invert, invert_sampler, q_jump, repaint_nfe,
                                  repaint_path, sdedit_time, slerp)
from ddpm.process.sampling import SamplerSpec
from ddpm.process.scaling import to_model_range, to_uint8
from ddpm.run.load import ModelSpec
from ddpm.workflows.edit import (EditSet, decode_latents, decode_run, img2img, img2img_images, inpaint, inpaint_images,
                                 invert, invert_images, load_masks, shape_mask)
from ddpm.workflows.sample import Images, sample

pytestmark = pytest.mark.usefixtures("one_thread")

ABAR = np.append(1.0, np.cumprod(1 - PAPER_BETAS))  # ᾱ_t for t = 0 … 1000, from the β's written out
BETAS20 = make_betas("linear", 20, 1e-3, 0.2)  # a short chain for the properties
D20, ORACLE20 = GaussianDiffusion(BETAS20), Oracle(BETAS20)


def data_images(n, shape, seed, dtype=torch.float32):
    """n images of iid N(μ, s²) pixels (the `Oracle`'s data)."""
    return (MU + S * torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)).to(dtype)


def uint8_images(n, side, seed):
    return to_uint8(data_images(n, (1, side, side), seed))


# ------------------------------------------------------------------------------------------------
# RePaint's schedule, as published
# ------------------------------------------------------------------------------------------------
def repaint_reference_schedule(t_T, jump_length, jump_n_sample):
    """RePaint's published walk (Lugmayr et al. 2022; andreas128/RePaint, guided_diffusion/scheduler.py,
    `get_schedule_jump(t_T, n_sample=1, jump_length, jump_n_sample)` with the second and third levels
    of jumps off), restated: its 0-based times from t_T − 1 down to −1 in unit moves; each time the
    walk arrives at a time j ∈ {0, L, 2L, … < t_T − L} (L = jump_length) it climbs back up L unit
    moves, jump_n_sample − 1 times for each such j. A value v is the state at position v + 1 of the
    chain counted from its end (position 0, the final −1, is the data)."""
    left = {j: jump_n_sample - 1 for j in range(0, t_T - jump_length, jump_length)}
    t, ts = t_T, []
    while t >= 1:
        t -= 1
        ts.append(t)
        if left.get(t, 0) > 0:
            left[t] -= 1
            ts.extend(range(t + 1, t + jump_length + 1))
            t += jump_length
    ts.append(-1)
    assert all(abs(a - b) == 1 for a, b in zip(ts, ts[1:]))  # the published schedule's own check
    return ts


def unit_positions(runs, times, jump):
    """Our walk (descending runs of paper times; between runs x climbs back by the forward process)
    as positions of the chain `times` counted from its end, each climb expanded into unit moves."""
    n = len(times) - 1
    pos = {t: n - i for i, t in enumerate(times)}
    out = []
    for k, run in enumerate(runs):
        p = [pos[t] for t in run]
        assert all(a - b == 1 for a, b in zip(p, p[1:])), run  # a run walks the chain, step by step
        if k:
            assert p[0] == out[-1] + jump, (out[-1], p[0])  # every climb is one jump of `jump` positions
            out.extend(range(out[-1] + 1, p[0]))
        out.extend(p)
    return out


@pytest.mark.parametrize("times, jump, resample", [
    (list(range(250, -1, -1)), 10, 10),  # the paper's setting (T = 250, j = r = 10)
    (list(range(1000, -1, -1)), 10, 10),
    (list(range(1000, -1, -1)), 10, 1),  # no resampling: the chain itself
    (list(range(20, -1, -1)), 3, 4),
    (list(range(11, -1, -1)), 10, 2),  # exactly one block fits
    (list(range(10, -1, -1)), 10, 3),  # none does
    (list(range(7, -1, -1)), 2, 5),
    (ddim_timesteps(1000, 50, "quad"), 5, 5),  # a respaced chain: RePaint's indices are its positions
    (ddim_timesteps(1000, 25, "uniform"), 4, 3),
])
def test_repaint_path_is_the_published_schedule(times, jump, resample):
    n = len(times) - 1
    ref = repaint_reference_schedule(n, jump, resample)
    runs = repaint_path(times, jump, resample)
    assert runs[0][0] == times[0] and runs[-1][-1] == 0
    assert unit_positions(runs, times, jump) == [v + 1 for v in ref]
    down = sum(1 for a, b in zip(ref, ref[1:]) if b < a)  # the published walk's reverse steps
    assert repaint_nfe(times, jump, resample) == down
    if resample == 1:
        assert runs == [list(times)]


def test_repaint_cost_at_the_papers_setting():
    # T = 1000, j = r = 10: 99 blocks of 10 steps walked 10 times, and the last step once.
    ref = repaint_reference_schedule(1000, 10, 10)
    down = sum(1 for a, b in zip(ref, ref[1:]) if b < a)
    assert down == 99 * 10 * 10 + 10 == 9910
    assert repaint_nfe(range(1000, -1, -1), 10, 10) == down


def test_q_jump_is_the_forward_process_over_several_steps():
    # q(x_u | x_t) = N(√(Π_{s=t+1..u} (1 − β_s)) x_t, 1 − Π(1 − β_s)) (eq. 2 composed)
    x, z = (torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in (1, 2))
    d = GaussianDiffusion(PAPER_BETAS)
    for t, u in ((0, 1), (3, 250), (500, 1000)):
        prod = np.prod(1 - PAPER_BETAS[t:u])
        torch.testing.assert_close(q_jump(d, x, t, u, z), math.sqrt(prod) * x + math.sqrt(1 - prod) * z, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError):
        q_jump(d, x, 5, 5, z)


# ------------------------------------------------------------------------------------------------
# The correlated Gaussian oracle, and RePaint's law under it
# ------------------------------------------------------------------------------------------------
def test_cov_oracle_is_the_posterior_mean_of_the_noise():
    # With Σ = s² I it is the iid oracle; for a dense Σ the residual ε − E[ε | x_t] is uncorrelated
    # with x_t (the orthogonality that defines a conditional mean of jointly Gaussian variables).
    x = torch.randn(5, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in (1, 300, 1000):
        tt = torch.full((5,), t)
        torch.testing.assert_close(CovOracle(np.full(16, MU), S**2 * np.eye(16))(x, tt), Oracle()(x, tt), rtol=1e-10, atol=1e-12)
    mu, cov = np.linspace(-0.3, 0.3, 16), grid_covariance(4, 4, 0.5, 0.85)
    oracle, n, g = CovOracle(mu, cov), 20000, np.random.default_rng(1)
    for t in (50, 300):
        a = ABAR[t]
        x0 = mu + g.standard_normal((n, 16)) @ np.linalg.cholesky(cov).T
        eps = g.standard_normal((n, 16))
        xt = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
        pred = oracle(torch.from_numpy(xt).view(n, 1, 4, 4), torch.full((n,), t)).flatten(1).numpy()
        res = eps - pred
        cross = (res - res.mean(0)).T @ (xt - xt.mean(0)) / n  # [16, 16], each entry ≈ N(0, ~var/n)
        se = np.sqrt(np.outer(res.var(0), xt.var(0)) / n)
        assert np.abs(cross / se).max() < 5
        assert np.abs(res.mean(0)).max() < 5 / math.sqrt(n)


def repaint_exact_law(times, mu, cov, known, x0, jump, resample, eta=1.0):
    """Mean and covariance of the unknown pixels RePaint returns under `CovOracle(mu, cov)` with the
    paper's β's and DDIM steps of η (unclipped), composed in float64. The walk is the published
    schedule (`repaint_reference_schedule`) on the chain's positions. Each step is affine-Gaussian:
    ε̂ = G (x − √ᾱ_t μ), G = √(1−ᾱ_t)(ᾱ_t Σ + (1−ᾱ_t) I)⁻¹; x̂_0 = (x − √(1−ᾱ_t) ε̂)/√ᾱ_t;
    x' = √ᾱ' x̂_0 + √(1 − ᾱ' − σ²) ε̂ + σ z, σ² = η² (1−ᾱ')/(1−ᾱ_t) (1 − ᾱ_t/ᾱ') (Song et al. eq. 12; no z
    into t = 0); then the known pixels become √ᾱ' x_0 + √(1−ᾱ') ε, independent of the rest (RePaint
    eq. 8); a climb of one position from t to u is x ← √(ᾱ_u/ᾱ_t) x + √(1 − ᾱ_u/ᾱ_t) ε."""
    D, k = len(mu), np.asarray(known, bool)
    I = np.eye(D)
    n = len(times) - 1
    seq = [times[n - (v + 1)] for v in repaint_reference_schedule(n, jump, resample)]
    m, P = np.zeros(D), np.eye(D)  # x at times[0]: the prior's N(0, I)
    for t, tn in zip(seq, seq[1:]):
        if tn > t:
            r = ABAR[tn] / ABAR[t]
            m, P = math.sqrt(r) * m, r * P + (1 - r) * I
            continue
        a, an = ABAR[t], ABAR[tn]
        G = math.sqrt(1 - a) * np.linalg.inv(a * cov + (1 - a) * I)
        s2 = eta**2 * (1 - an) / (1 - a) * (1 - a / an)
        c = math.sqrt(max(1 - an - s2, 0.0))
        # x' = A x + b + σ z, as x̂_0 = (I − √(1−a) G) x / √a + √(1−a) G μ and ε̂ = G x − √a G μ
        A = math.sqrt(an) * (I - math.sqrt(1 - a) * G) / math.sqrt(a) + c * G
        b = (math.sqrt(an) * math.sqrt(1 - a) - c * math.sqrt(a)) * (G @ mu)
        m, P = A @ m + b, A @ P @ A.T + (s2 if tn > 0 else 0.0) * I
        m[k] = math.sqrt(an) * x0[k]
        P[k, :], P[:, k] = 0.0, 0.0
        P[np.ix_(k, k)] = (1 - an) * np.eye(int(k.sum()))
    return m[~k], P[np.ix_(~k, ~k)]


def law_errors(m, C, m_ref, C_ref):
    """How far N(m, C) is from N(m_ref, C_ref), in the reference's own units: with C_ref = L Lᵀ, the
    largest |L⁻¹(m − m_ref)| (the mean's error in conditional standard deviations) and the largest
    entry of |L⁻¹ C L⁻ᵀ − I| (the covariance's, e.g. 0.3: a variance 30 % off)."""
    L = np.linalg.cholesky(C_ref)
    z = np.linalg.solve(L, m - m_ref)
    W = np.linalg.solve(L, np.linalg.solve(L, C).T)
    return float(np.abs(z).max()), float(np.abs(W - np.eye(len(m))).max())


def test_repaint_follows_the_exact_conditional_law():
    # Data: 4x4 images, x_0 ~ N(0.1, Σ), Σ_ij = 0.5² · 0.85^(Manhattan distance). The centre 2x2 is
    # hidden; the known ring is the data mean + 1.5 s, a bright image, so the centre's conditional
    # law N(μ_u + Σ_uk Σ_kk⁻¹(x_k − μ_k), Σ_uu − Σ_uk Σ_kk⁻¹ Σ_ku) is far from its prior: mean 0.85 vs
    # 0.1, std 0.106 vs 0.5. Sampler: DDIM η = 1 on the paper's T = 1000 β's, 50 steps on the quad
    # grid (49 steps, dense near t = 0), unclipped; RePaint with j = 5 and r = 5 (229
    # network evaluations) vs r = 1 (plain replacement, 49). 2,000 copies of the one image.
    # The exact laws of both walks (`repaint_exact_law`) put the method's own error, with r = 5, at
    # 0.013 std in the mean and 14 % in the covariance; with r = 1 at 0.70 std and 152 %.
    N, s, jump = 2000, 0.5, 5
    mu, cov = np.full(16, 0.1), grid_covariance(4, 4, s, 0.85)
    oracle = CovOracle(mu, cov)
    d = GaussianDiffusion(PAPER_BETAS)
    keep = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    keep[..., 1:3, 1:3] = False
    k = keep.flatten().numpy()
    x0 = mu + 1.5 * s
    m_true, C_true = gaussian_conditional(mu, cov, k, x0[k])
    sampler = SamplerSpec("ddim", steps=50, eta=1.0, spacing="quad", clip_denoised=False)
    times, _ = sampler.chain(d)
    figures = {}
    for r in (5, 1):
        out = inpaint_images(oracle, d, torch.from_numpy(x0).view(1, 1, 4, 4).expand(N, -1, -1, -1),
                             keep.expand(N, -1, -1, -1), Images(2, range(N)), sampler=sampler,
                             walk=RePaintSpec(jump, r))
        xu = out.flatten(1).double().numpy()[:, ~k]
        m_hat, C_hat = xu.mean(0), np.cov(xu.T)
        m_law, C_law = repaint_exact_law(times, mu, cov, k, x0, jump, r)
        # Monte Carlo against the walk's exact law: whitened, the mean's entries have standard error
        # 1/√N, the covariance's at most √(2/N); 5 of them, with no allowance.
        se_m, se_c = 1 / math.sqrt(N), math.sqrt(2 / N)
        mc = law_errors(m_hat, C_hat, m_law, C_law)
        figures[r] = law_errors(m_hat, C_hat, m_true, C_true), law_errors(m_law, C_law, m_true, C_true)
        (em, ec), (lm, lc) = figures[r]
        print(f"RePaint j={jump} r={r}: against the conditional law, mean error {em:.3f} std (exact law of the walk "
              f"{lm:.3f}), covariance error {ec:.3f} ({lc:.3f}); Monte Carlo vs the walk's law {mc[0]:.3f}, "
              f"{mc[1]:.3f} (SE {se_m:.3f}, {se_c:.3f})")
        assert mc[0] < 5 * se_m and mc[1] < 5 * se_c
    (em5, ec5), (lm5, lc5) = figures[5]
    (em1, ec1), (lm1, lc1) = figures[1]
    # With resampling: within Monte Carlo (5 SE) plus the walk's own bias, stated as 0.05 std for the
    # mean and 0.15 for the covariance (exactly 0.013 and 0.143).
    assert lm5 < 0.05 and lc5 < 0.15
    assert em5 < 5 * se_m + 0.05 and ec5 < 5 * se_c + 0.15
    # Without: measurably worse, in both, and outside the same tolerance.
    assert em1 > 5 * se_m + 0.05 and ec1 > 5 * se_c + 0.15
    assert em1 > 4 * em5 and ec1 > 4 * ec5
    assert lm1 > 10 * lm5 and lc1 > 5 * lc5


# ------------------------------------------------------------------------------------------------
# RePaint: properties
# ------------------------------------------------------------------------------------------------
def test_known_pixels_are_the_input_exactly():
    u8 = uint8_images(6, 16, seed=3)
    x0 = to_model_range(u8)
    keep = load_masks(["random-strokes"], 6, (16, 16), seed=4)
    assert 0 < (~keep).sum() < keep.numel()
    for sampler in (SamplerSpec(), SamplerSpec("ddim", steps=7, eta=1.0)):
        out = inpaint_images(ORACLE20, D20, x0, keep, Images(1, range(6)), sampler=sampler, walk=RePaintSpec(2, 3))
        k = keep.expand_as(x0)
        assert torch.equal(out[k], x0[k])
        assert torch.equal(to_uint8(out)[k], u8[k])
        assert (out[~k] != x0[~k]).float().mean() > 0.9  # the rest was generated


def test_keeping_nothing_without_resampling_is_sampling():
    x0 = data_images(4, (1, 8, 8), seed=1)
    nothing = torch.zeros(4, 1, 8, 8, dtype=torch.bool)
    for sampler in (SamplerSpec(), SamplerSpec("ddim", steps=7, eta=1.0), SamplerSpec("ddim", steps=5)):
        got = inpaint_images(ORACLE20, D20, x0, nothing, Images(9, [3, 0, 7, 1]), sampler=sampler,
                             walk=RePaintSpec(resample=1))
        assert torch.equal(got, sample(ORACLE20, D20, (1, 8, 8), Images(9, [3, 0, 7, 1]), device="cpu", sampler=sampler))


def test_inpainting_does_not_depend_on_the_batch():
    x0 = data_images(8, (1, 8, 8), seed=2)
    keep = load_masks(["random-strokes"], 8, (8, 8), seed=5)
    opts = dict(sampler=SamplerSpec("ddim", steps=10, eta=1.0), walk=RePaintSpec(3, 3))
    whole = inpaint_images(ORACLE20, D20, x0, keep, Images(5, range(8)), **opts)
    parts = torch.cat([inpaint_images(ORACLE20, D20, x0[idx], keep[idx], Images(5, idx), **opts)
                       for idx in ([0, 1, 2, 3], [4, 5, 6, 7])])
    assert torch.equal(whole, parts)
    one = inpaint_images(ORACLE20, D20, x0[[6]], keep[[6]], Images(5, [6]), **opts)
    assert torch.equal(one[0], whole[6])


# ------------------------------------------------------------------------------------------------
# SDEdit
# ------------------------------------------------------------------------------------------------
def iid_chain_law(times, sampler, eta=0.0, var_type="fixedlarge", betas=PAPER_BETAS):
    """Under the iid `Oracle`, unclipped, the chain from x at times[0] to x at times[-1] is
    x_end = A x_start + B + N(0, V), composed in float64: x̂_0 = μ + k (x_t − √ᾱ_t μ), k = √ᾱ_t s²/v_t,
    v_t = ᾱ_t s² + 1 − ᾱ_t, ε̂ = √(1−ᾱ_t)(x_t − √ᾱ_t μ)/v_t; ancestral: x_{t−1} = c1 x̂_0 + c2 x_t + σ z (eq. 7,
    σ² = β_t, none into t = 0); DDIM: x' = √ᾱ' x̂_0 + √(1−ᾱ'−σ²) ε̂ + σ z (Song et al. eq. 12)."""
    abar = np.append(1.0, np.cumprod(1 - betas))
    beta = np.append(np.nan, betas)
    A, B, V = 1.0, 0.0, 0.0
    for t, tn in zip(times, times[1:]):
        a, an = abar[t], abar[tn]
        v = a * S**2 + 1 - a
        k = math.sqrt(a) * S**2 / v
        x0_g, x0_h = k, MU * (1 - k * math.sqrt(a))  # x̂_0 = x0_g x + x0_h
        e_g, e_h = math.sqrt(1 - a) / v, -math.sqrt(1 - a) * math.sqrt(a) * MU / v  # ε̂ = e_g x + e_h
        if sampler == "ancestral":
            assert tn == t - 1
            c1, c2 = beta[t] * math.sqrt(an) / (1 - a), (1 - an) * math.sqrt(1 - beta[t]) / (1 - a)
            g, h = c1 * x0_g + c2, c1 * x0_h
            s2 = 0.0 if t == 1 else (beta[t] if var_type == "fixedlarge" else beta[t] * (1 - an) / (1 - a))
        else:
            s2 = eta**2 * (1 - an) / (1 - a) * (1 - a / an)
            c = math.sqrt(max(1 - an - s2, 0.0))
            g, h = math.sqrt(an) * x0_g + c * e_g, math.sqrt(an) * x0_h + c * e_h
            s2 = s2 if tn > 0 else 0.0
        A, B, V = g * A, g * B + h, g * g * V + s2
    return A, B, V


@pytest.mark.parametrize("strength, sampler", [
    (0.3, SamplerSpec(clip_denoised=False)),  # Algorithm 2 from t0 = 300
    (0.5, SamplerSpec("ddim", steps=50, eta=1.0, clip_denoised=False)),  # 500, then DDIM's 481, 461, …
    (0.2, SamplerSpec("ddim", steps=50, eta=0.0, clip_denoised=False)),  # 200, 181, …: random only through x_t0
])
def test_sdedit_follows_the_law_of_the_chain_from_t0(strength, sampler):
    # SDEdit: x_t0 = √ᾱ x_0 + √(1−ᾱ) ε, then the chain; given x_0 the output is
    # N(A √ᾱ x_0 + B, A²(1 − ᾱ) + V) per pixel (`iid_chain_law` of the chain from t0). The
    # standardised residual is then N(0, 1) and uncorrelated with x_0: checked to 5 standard errors
    # over 32 images of 32x32 pixels (32,768 draws). An edit that ignored the image (t0 = T), kept it
    # (t0 = 0) or started from the wrong time fails.
    d = GaussianDiffusion(PAPER_BETAS)
    x0 = data_images(32, (1, 32, 32), seed=11, dtype=torch.float64)
    out = img2img_images(Oracle(), d, x0, strength, Images(4, range(32)), sampler=sampler)
    times, _ = sampler.chain(d)
    t0 = round(strength * 1000)
    chain = [t0] + [t for t in times if t < t0]
    A, B, V = iid_chain_law(chain, sampler.sampler.value, sampler.eta)
    a = ABAR[t0]
    sd = math.sqrt(A * A * (1 - a) + V)
    res = ((out.double() - A * math.sqrt(a) * x0 - B) / sd).flatten()
    n = res.numel()
    corr = torch.corrcoef(torch.stack([res, x0.flatten()]))[0, 1].item()
    law_corr = A * math.sqrt(a) * S / math.sqrt(A * A * a * S**2 + sd**2)  # corr(out, x_0) over the data
    name = f"DDIM η={sampler.eta:g}" if sampler.sampler.value == "ddim" else "Algorithm 2"
    print(f"SDEdit s={strength} ({name}, {len(chain) - 1} steps from t0={t0}): "
          f"out = {A * math.sqrt(a):.4f} x_0 + {B:.4f} + N(0, {sd:.4f}²), corr(out, x_0) over the data {law_corr:.3f}; "
          f"standardised residual mean {res.mean():.4f}, var {res.var():.4f}, corr with x_0 {corr:.4f} "
          f"(SE {1 / math.sqrt(n):.4f}, {math.sqrt(2 / n):.4f})")
    assert abs(res.mean().item()) < 5 / math.sqrt(n)
    assert abs(res.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs(corr) < 5 / math.sqrt(n)


def test_sdedit_near_1_still_starts_from_the_image():
    # DDIM with 5 steps on T = 20 walks 17, 13, …: a strength of 0.95 (t0 = 19) lies above its first
    # time, and still starts from q(x_19 | x_0), not from the prior: under the oracle the
    # deterministic chain is affine per pixel with one slope, so two inputs of the same seed give
    # outputs that differ by c·(a − b), c > 0 the same for every pixel (0 if the image were ignored).
    sampler = SamplerSpec("ddim", steps=5, eta=0.0, clip_denoised=False)
    assert sampler.chain(D20)[0][0] < 19
    a, b = data_images(2, (1, 8, 8), seed=5, dtype=torch.float64).split(1)
    out = [img2img_images(ORACLE20, D20, x, 0.95, Images(0, [0]), sampler=sampler) for x in (a, b)]
    c = (out[0] - out[1]) / (a - b)
    assert c.min() > 0.05 and c.max() - c.min() < 1e-9


def test_sdedit_strength_0_and_1_and_the_batch():
    x0 = data_images(6, (1, 8, 8), seed=3)
    for sampler in (SamplerSpec(), SamplerSpec("ddim", steps=7, eta=1.0), SamplerSpec("ddim", steps=5, spacing="trailing")):
        m = Oracle(BETAS20)
        assert torch.equal(img2img_images(m, D20, x0, 0.0, Images(2, range(6)), sampler=sampler), x0)
        assert m.images == 0  # nothing to do
        got = img2img_images(ORACLE20, D20, x0, 1.0, Images(2, range(6)), sampler=sampler)
        assert torch.equal(got, sample(ORACLE20, D20, (1, 8, 8), Images(2, range(6)), device="cpu", sampler=sampler))
        whole = img2img_images(ORACLE20, D20, x0, 0.45, Images(2, range(6)), sampler=sampler)
        parts = torch.cat([img2img_images(ORACLE20, D20, x0[i:i + 3], 0.45, Images(2, range(i, i + 3)),
                                          sampler=sampler) for i in (0, 3)])
        assert torch.equal(whole, parts)
        assert not torch.equal(whole, got)
    assert sdedit_time(1000, 0.3) == 300 and sdedit_time(20, 0.45) == 9 and sdedit_time(20, 1) == 20
    assert chain_from([20, 15, 10, 5, 0], 12) == [12, 10, 5, 0] and chain_from([20, 15, 0], 20) == [20, 15, 0]
    for bad in (-0.1, 1.5, True, "0.5"):
        with pytest.raises(UserError, match="strength"):
            sdedit_time(1000, bad)


# ------------------------------------------------------------------------------------------------
# DDIM inversion
# ------------------------------------------------------------------------------------------------
def inversion_map(times):
    """DDIM inversion under the iid `Oracle`: up the chain from t to the next time u, ε̂ = the oracle's
    ε at (x_t, u) = √(1−ᾱ_u)(x_t − √ᾱ_u μ)/v_u, x̂_0 = (x_t − √(1−ᾱ_t) ε̂)/√ᾱ_t, x_u = √ᾱ_u x̂_0 +
    √(1−ᾱ_u) ε̂: affine, so x_{times[0]} = G x_0 + H (float64)."""
    G, H = 1.0, 0.0
    up = list(times)[::-1]
    for t, u in zip(up, up[1:]):
        a, au = ABAR[t], ABAR[u]
        v = au * S**2 + 1 - au
        e_g, e_h = math.sqrt(1 - au) / v, -math.sqrt(1 - au) * math.sqrt(au) * MU / v
        x0_g, x0_h = (1 - math.sqrt(1 - a) * e_g) / math.sqrt(a), -math.sqrt(1 - a) * e_h / math.sqrt(a)
        g, h = math.sqrt(au) * x0_g + math.sqrt(1 - au) * e_g, math.sqrt(au) * x0_h + math.sqrt(1 - au) * e_h
        G, H = g * G, g * H + h
    return G, H


@pytest.mark.parametrize("steps, allow_mean, allow_var", [(50, 0.02, 0.12), (200, 0.005, 0.03)])
def test_ddim_inversion_round_trip_and_the_latents_law(steps, allow_mean, allow_var):
    # x_0 ~ N(μ, s²) per pixel. The probability-flow ODE is linear here and keeps the marginals, so
    # it maps x_0 to x_T' = √ᾱ μ + √(v/s²)(x_0 − μ), v = ᾱ s² + 1 − ᾱ at the chain's first time T'
    # (981 for 50 uniform DDIM steps, 996 for 200): the latents are N(√ᾱ μ, v). DDIM's inversion is a
    # first-order discretisation of that ODE: its exact map (`inversion_map`, which the latents must
    # follow to float64 rounding) puts their variance 10.5 % below v at 50 steps and 2.5 % at 200, and
    # their mean 0.014 and 0.0037 above (at t0 = 300: 6.5 % and 1.4 %; 0.0055 and 0.0015): the
    # allowances (mean; variance, relative) are stated just above these.
    d, oracle = GaussianDiffusion(PAPER_BETAS), Oracle()
    x0 = data_images(64, (1, 32, 32), seed=21, dtype=torch.float64)
    sampler = invert_sampler(steps)
    times, _ = sampler.chain(d)
    z = invert_images(oracle, d, x0, sampler)
    back = decode_latents(oracle, d, z, sampler)
    err = back - x0
    # the exact maps of both directions (decoding: DDIM η = 0, `iid_chain_law`)
    G, H = inversion_map(times)
    A, B, V = iid_chain_law(times, "ddim", 0.0)
    torch.testing.assert_close(z, G * x0 + H, rtol=0, atol=1e-9)
    torch.testing.assert_close(back, A * (G * x0 + H) + B, rtol=0, atol=1e-9)
    assert V == 0
    print(f"DDIM inversion, {steps} steps (T'={times[0]}): round trip max |error| {err.abs().max():.2e}, RMSE "
          f"{err.pow(2).mean().sqrt():.2e} (data std {S}; in pixel levels max {127.5 * err.abs().max():.1f})")
    for t0 in (times[0], 300):
        ch = chain_from(times, t0)
        lat = z if t0 == times[0] else ddim_invert(d, oracle, x0, ch)
        a = ABAR[ch[0]]
        m_ode, v_ode = math.sqrt(a) * MU, a * S**2 + 1 - a
        G, H = inversion_map(ch)
        m_law, v_law = G * MU + H, G * G * S**2
        n = lat.numel()
        mean, var = lat.mean().item(), lat.var().item()
        print(f"  latents at t={ch[0]}: mean {mean:.4f}, var {var:.4f}; ODE N({m_ode:.4f}, {v_ode:.4f}); the "
              f"discrete map's law N({m_law:.4f}, {v_law:.4f}) (var {100 * (v_law / v_ode - 1):+.1f} %); SE "
              f"{math.sqrt(v_ode / n):.4f}, {v_ode * math.sqrt(2 / n):.4f}")
        assert abs(mean - m_ode) < 5 * math.sqrt(v_ode / n) + allow_mean
        assert abs(var - v_ode) < 5 * v_ode * math.sqrt(2 / n) + allow_var * v_ode
        assert abs(m_law - m_ode) < allow_mean and abs(v_law / v_ode - 1) < allow_var
    # the round trip: a few hundredths at 50 steps, four times less at 200
    assert err.pow(2).mean().sqrt() < {50: 0.05, 200: 0.0125}[steps]
    assert err.abs().max() < {50: 0.25, 200: 0.06}[steps]


def test_inversion_refuses_other_samplers_and_slerp():
    x = torch.zeros(1, 1, 4, 4)
    for bad in (SamplerSpec(), SamplerSpec("ddim", steps=5, eta=1.0)):
        with pytest.raises(UserError, match="η = 0"):
            invert_images(ORACLE20, D20, x, bad)
        with pytest.raises(UserError, match="η = 0"):
            decode_latents(ORACLE20, D20, x, bad)
    with pytest.raises(UserError, match="ending at 0"):
        ddim_invert(D20, ORACLE20, x, [20, 10, 5])
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 8, 8, generator=g), torch.randn(3, 8, 8, generator=g)
    torch.testing.assert_close(slerp(a, b, 0.0), a, rtol=0, atol=1e-6)
    torch.testing.assert_close(slerp(a, b, 1.0), b, rtol=0, atol=1e-6)
    u = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    w = torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    mid = slerp(u, w, 0.5)
    assert abs(mid.norm().item() - 1) < 1e-12  # a linear midpoint would have norm 1/√2
    torch.testing.assert_close(mid, (u + w) / math.sqrt(2), rtol=0, atol=1e-12)
    quarter = slerp(u, w, 0.25)  # a quarter of the 90° arc
    torch.testing.assert_close(quarter, torch.tensor([math.cos(math.pi / 8), math.sin(math.pi / 8), 0, 0],
                                                     dtype=torch.float64), rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Masks
# ------------------------------------------------------------------------------------------------
def test_shape_masks():
    for h, w in ((16, 16), (32, 32), (8, 12)):
        keep = shape_mask("center", (h, w))
        assert keep.shape == (1, h, w) and keep.dtype == torch.bool
        hidden = (~keep[0]).nonzero()
        assert len(hidden) == (h // 2) * (w // 2)  # the centred half-size square (rectangle for 8x12)
        rows, cols = hidden[:, 0], hidden[:, 1]
        assert rows.min() == h // 4 and rows.max() == h // 4 + h // 2 - 1
        assert cols.min() == w // 4 and cols.max() == w // 4 + w // 2 - 1
        half = shape_mask("half", (h, w))
        assert (~half[0, h // 2:]).all() and half[0, :h // 2].all()
    strokes = [shape_mask("random-strokes", (32, 32), 7, i) for i in range(4)]
    assert torch.equal(strokes[1], shape_mask("random-strokes", (32, 32), 7, 1))  # reproducible per (seed, index)
    assert not torch.equal(strokes[0], strokes[1]) and not torch.equal(strokes[1], shape_mask("random-strokes", (32, 32), 8, 1))
    for m in strokes:
        assert 0.05 < (~m).float().mean() < 0.8
    batch = load_masks(["random-strokes"], 4, (32, 32), seed=7)
    assert torch.equal(batch, torch.stack(strokes))


def test_png_masks(tmp_path):
    a = np.zeros((16, 16), np.uint8)
    a[:, :10] = 255  # white = keep
    a[0, 15] = 200  # light gray counts as white
    Image.fromarray(a).save(tmp_path / "a.png")
    b = np.full((16, 16), 255, np.uint8)
    b[4:8, 4:8] = 0
    Image.fromarray(b).save(tmp_path / "b.png")
    keep = load_masks([str(tmp_path / "a.png")], 3, (16, 16))
    assert keep.shape == (3, 1, 16, 16)
    assert torch.equal(keep[2, 0], torch.from_numpy(a >= 128)) and keep[0, 0, :, :10].all() and not keep[0, 0, 1:, 10:].any()
    two = load_masks([str(tmp_path / "a.png"), str(tmp_path / "b.png")], 2, (16, 16))
    assert torch.equal(two[1, 0], torch.from_numpy(b == 255)) and (~two[1]).sum() == 16


@pytest.mark.parametrize("masks, n, needle", [
    (["{a}", "{a}"], 3, "2 masks for 3 images"),
    (["circle"], 2, "--mask circle: no such file; give PNG masks (white = keep) or one of center, half, random-strokes"),
    (["{a}", "center"], 2, "built-in shape"),
    (["{d}/missing.png"], 2, "no such file"),
], ids=["count", "unknown-shape", "shape-among-files", "missing-file"])
def test_bad_masks_are_one_line(tmp_path, masks, n, needle):
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "a.png")
    masks = [m.format(a=tmp_path / "a.png", d=tmp_path) for m in masks]
    with pytest.raises(UserError) as e:
        load_masks(masks, n, (8, 8))
    assert needle in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"^mask 'circle': give PNG files \(white = keep\) or one of center, half, "
                                        r"random-strokes$"):
        shape_mask("circle", (8, 8))


# ------------------------------------------------------------------------------------------------
# The commands on a tiny trained run: results folder, resume, refusal, latents
# ------------------------------------------------------------------------------------------------
def test_inpaint_and_img2img_folders(tiny_run, tmp_path):
    spec = ModelSpec(str(tiny_run / "run"), device="cpu")
    paths = [tiny_run / f"img{i}.png" for i in range(3)]
    inputs = np.stack([np.asarray(Image.open(p)) for p in paths])[..., None]  # [3, 16, 16, 1]
    inputs3 = EditSet(paths, seed=3, batch=2)
    opts = dict(masks=("center",), sampler=SamplerSpec("ddim", steps=10, eta=1.0), walk=RePaintSpec(2, 2), progress=False)
    out = tmp_path / "inpaint"
    res = inpaint(spec, inputs3, out, **opts)
    assert res["generated"] == 3
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["000000.png", "000001.png", "000002.png", "compare.png", "edit.json",
                                                     "grid.png", "samples.npz"]
    x = np.load(out / "samples.npz")["x"]
    keep = shape_mask("center", (16, 16))[0].numpy()
    assert x.shape == (3, 16, 16, 1) and np.array_equal(x[:, keep], inputs[:, keep])
    assert not np.array_equal(x[:, ~keep], inputs[:, ~keep])
    meta = json.loads((out / "edit.json").read_text())
    assert meta["edit"] == "inpaint" and (meta["jump"], meta["resample"]) == (2, 2)
    assert meta["nfe"] == repaint_nfe(ddim_timesteps(20, 10), 2, 2) == res["nfe"]
    assert Image.open(out / "compare.png").size == (3 * 18 + 2, 3 * 18 + 2)  # input, masked input, output
    again = inpaint(spec, inputs3, out, **opts)
    assert again["generated"] == 0 and np.array_equal(np.load(out / "samples.npz")["x"], x)
    for change in (dict(masks=("half",)), dict(walk=RePaintSpec(2, 3))):
        with pytest.raises(UserError, match="rerun with the same settings"):
            inpaint(spec, inputs3, out, **{**opts, **change})
    with pytest.raises(UserError, match="rerun with the same settings"):
        inpaint(spec, inputs3._replace(seed=4), out, **opts)
    with pytest.raises(UserError, match="rerun with the same settings"):
        inpaint(spec, inputs3._replace(paths=paths[:2] + [tiny_run / "img0.png"]), out, **opts)  # other images

    out = tmp_path / "img2img"
    opts = dict(strength=0.5, sampler=SamplerSpec("ddim", steps=10, eta=1.0), progress=False)
    res = img2img(spec, EditSet(paths, seed=1, batch=3), out, **opts)
    assert res["generated"] == 3 and (out / "compare.png").is_file()
    assert json.loads((out / "edit.json").read_text())["t0"] == 10
    assert img2img(spec, EditSet(paths, seed=1, batch=3), out, **opts)["generated"] == 0
    with pytest.raises(UserError, match="strength=0.5, now 0.6"):
        img2img(spec, EditSet(paths, seed=1), out, **{**opts, "strength": 0.6})


def test_invert_then_decode_the_latents(tiny_run, tmp_path):
    spec = ModelSpec(str(tiny_run / "run"), device="cpu")
    paths = [tiny_run / f"img{i}.png" for i in range(3)]
    inputs = np.stack([np.asarray(Image.open(p)) for p in paths])[..., None]
    res = invert(spec, paths, tmp_path / "inv", steps=10, batch=2, verify=True, progress=False)
    assert (tmp_path / "inv" / "latents.npz").is_file() and (tmp_path / "inv" / "invert.json").is_file()
    dec = decode_run(spec, str(tmp_path / "inv" / "latents.npz"), tmp_path / "dec", batch=2, progress=False)
    assert dec["n"] == 3
    x = np.load(tmp_path / "dec" / "samples.npz")["x"]
    levels = np.abs(x.astype(int) - inputs.astype(int))
    print(f"tiny model (2 training steps), 10 DDIM steps: round trip max {max(res['round_trip_max']):.2e}, RMSE "
          f"{max(res['round_trip_rmse']):.2e} (model range); decoded PNGs off by at most {levels.max()} levels, "
          f"{levels.mean():.3f} on average")
    # A near-untrained network (its ε under 0.008 here) inverts as if ε were 0, when DDIM's steps up
    # and down are x ← √(ᾱ_u/ᾱ_t) x and undo each other: the latents are √ᾱ_T' x_0, T' = 19, with ᾱ
    # from the run's β's (linear 1e-4 … 0.02 over T = 20), and what comes back is the input to a level.
    betas = np.linspace(1e-4, 0.02, 20)
    z = np.load(tmp_path / "inv" / "latents.npz")["x_T"]
    x0 = inputs.transpose(0, 3, 1, 2) / 127.5 - 1
    gap = np.abs(z - math.sqrt(np.prod(1 - betas[:19])) * x0).max()
    print(f"  latents vs √ᾱ_19 x_0: max |difference| {gap:.2e}")
    assert z.shape == (3, 1, 16, 16) and gap < 0.02
    assert max(res["round_trip_max"]) < 1e-3
    assert res["round_trip_pixel_levels_max"] == levels.reshape(3, -1).max(1).tolist()  # the same decoding
    assert levels.max() <= 1
