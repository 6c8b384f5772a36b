"""Weighting the times (docs/MATH.md § Weighting the times): min-SNR-γ and soft-min-SNR loss weights
against their closed forms from the paper's betas, the optimum they leave in place (the Gaussian
oracle), and importance sampling of t against its definition (improved-diffusion's resample.py,
re-implemented here pair by pair) and its unbiasedness."""

import collections
import math

import numpy as np
import pytest
import torch

from ddpm.errors import UserError
from ddpm.process.diffusion import GaussianDiffusion
from ddpm.process.weighting import LossSecondMomentResampler, LossWeighting, LossWeights
from gaussian_oracle import MU, PAPER_BETAS, S, Oracle

pytestmark = pytest.mark.usefixtures("one_thread")

# The paper's schedule, from numpy alone: ᾱ_t, SNR_t and the posterior mean's c1_t, c2_t (eq. 7), t = 1 … T.
ABAR = np.cumprod(1 - PAPER_BETAS)
ABAR_PREV = np.append(1.0, ABAR[:-1])
SNR = ABAR / (1 - ABAR)
C1 = PAPER_BETAS * np.sqrt(ABAR_PREV) / (1 - ABAR)
C2 = np.sqrt(1 - PAPER_BETAS) * (1 - ABAR_PREV) / (1 - ABAR)
GAMMA = 5.0
WEIGHTINGS = ["none", f"min_snr:{GAMMA:g}", f"soft_min_snr:{GAMMA:g}"]


def closed_form(kind: str, mean_type: str, gamma: float = GAMMA) -> np.ndarray:
    """The weight of the target's squared error at t = 1 … T, written out per parametrisation."""
    s = SNR
    if kind == "min_snr":  # Hang et al. 2023; ε: kohya/diffusers' --snr_gamma, v: diffusers' v-prediction form
        return dict(eps=np.minimum(s, gamma) / s, x0=np.minimum(s, gamma), v=np.minimum(s, gamma) / (s + 1),
                    xprev=np.minimum(s, gamma) / C1**2)[mean_type]
    # soft_min_snr, Crowson et al. 2024: (1/SNR + 1/γ)^{-1}
    return dict(eps=gamma / (s + gamma), x0=s * gamma / (s + gamma), v=s * gamma / ((s + gamma) * (s + 1)),
                xprev=s * gamma / (s + gamma) / C1**2)[mean_type]


@pytest.mark.parametrize("mean_type", ["eps", "x0", "v", "xprev"])
@pytest.mark.parametrize("kind", ["min_snr", "soft_min_snr"])
def test_the_weight_of_each_parametrisation_is_its_closed_form(kind, mean_type):
    diffusion = GaussianDiffusion(PAPER_BETAS, mean_type=mean_type)
    w = LossWeighting.parse(f"{kind}:{GAMMA:g}").table(diffusion.alphas_cumprod, mean_type)
    assert w.shape == (1001,) and np.isnan(w[0])  # t = 0 is never trained
    np.testing.assert_allclose(w[1:], closed_form(kind, mean_type), rtol=1e-9)
    t = torch.tensor([1, 2, 10, 100, 250, 500, 999, 1000])
    got = LossWeights(LossWeighting.parse(f"{kind}:{GAMMA:g}"), diffusion.alphas_cumprod, mean_type)(t)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), closed_form(kind, mean_type)[t.numpy() - 1], rtol=1e-6)


def test_min_snr_with_gamma_to_infinity_is_l_simple():
    # min(SNR, γ) = SNR for γ above every SNR_t (SNR_1 ≈ 1e4 here): w_ε = 1, the paper's L_simple.
    diffusion = GaussianDiffusion(PAPER_BETAS)
    assert SNR.max() < 1e12
    w = LossWeighting.parse("min_snr:1e12").table(diffusion.alphas_cumprod, "eps")
    assert (w[1:] == 1.0).all()
    torch.manual_seed(0)
    x0, noise = torch.randn(8, 1, 4, 4), torch.randn(8, 1, 4, 4)
    t = torch.tensor([1, 2, 3, 50, 400, 800, 999, 1000])
    model = lambda x, t: 0.3 * x  # noqa: E731
    weights = LossWeights(LossWeighting.parse("min_snr:1e12"), diffusion.alphas_cumprod, "eps")
    plain = diffusion.training_losses(model, x0, t, noise)["loss"]
    assert torch.equal(diffusion.training_losses(model, x0, t, noise, mse_weight=weights(t))["loss"], plain)


def _from_x0(mean_type: str, x0_hat, x_t, t):
    """The network output of `mean_type` that carries the estimate x̂_0 at x_t (numpy's ᾱ, eq. 4, 7, (M6))."""
    a = torch.from_numpy(ABAR)[t - 1].view(-1, 1, 1, 1)
    eps_hat = (x_t - a.sqrt() * x0_hat) / (1 - a).sqrt()
    return dict(eps=eps_hat, x0=x0_hat, v=a.sqrt() * eps_hat - (1 - a).sqrt() * x0_hat,
                xprev=torch.from_numpy(C1)[t - 1].view(-1, 1, 1, 1) * x0_hat
                + torch.from_numpy(C2)[t - 1].view(-1, 1, 1, 1) * x_t)[mean_type]


@pytest.mark.parametrize("spec", WEIGHTINGS[1:])
def test_every_parametrisation_trains_the_same_x0_objective(spec):
    """A model whose every output carries one fixed x̂_0: the weighted losses of the ε, x_0, v and
    posterior-mean targets are one number per example, x0_weight(SNR_t) · ‖x_0 − x̂_0‖²."""
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([1, 2, 10, 100, 250, 500, 750, 999, 1000])
    B = len(t)
    x0, noise, x0_hat = (torch.randn(B, 2, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    weighting = LossWeighting.parse(spec)
    found = {}
    for mean_type in ("eps", "x0", "v", "xprev"):
        diffusion = GaussianDiffusion(PAPER_BETAS, mean_type=mean_type)
        w = LossWeights(weighting, diffusion.alphas_cumprod, mean_type)(t)
        found[mean_type] = diffusion.training_losses(lambda x_t, tt: _from_x0(mean_type, x0_hat, x_t, tt), x0, t, noise,
                                                     mse_weight=w)["loss"]
    kind = spec.split(":")[0]
    x0_space = torch.from_numpy(closed_form(kind, "x0"))[t - 1] * ((x0 - x0_hat) ** 2).mean(dim=(1, 2, 3))
    for mean_type, loss in found.items():
        torch.testing.assert_close(loss, x0_space, rtol=1e-6, atol=0, msg=mean_type)


def _oracle_output(mean_type: str, oracle: Oracle, c):
    """model(x_t, t): the output of `mean_type` that carries ε̂ = c · E[ε | x_t] (c a tensor [B])."""
    def model(x_t, t):
        eps_hat = c.view(-1, 1, 1, 1) * oracle(x_t, t)
        a = torch.from_numpy(ABAR)[t - 1].view(-1, 1, 1, 1)
        return _from_x0(mean_type, (x_t - (1 - a).sqrt() * eps_hat) / a.sqrt(), x_t, t)
    return model


def _x0_space(spec: str, mean_type: str) -> np.ndarray:
    """The weight of ‖x_0 − x̂_0‖² at t = 1 … T: with no weighting, the target's own scale c_t²."""
    if spec == "none":
        return dict(eps=SNR, x0=np.ones_like(SNR), v=SNR + 1)[mean_type]
    return closed_form(spec.split(":")[0], "x0")


@pytest.mark.parametrize("mean_type", ["eps", "x0", "v"])
def test_weighting_does_not_move_the_optimum(mean_type):
    """Gaussian data, model = c · E[ε | x_t] (in the parametrisation's own output): the gradient of
    every weighted loss in c is 0 at c = 1, the best any network can do, and points back to c = 1
    from c = 0.8 and c = 1.2 with the slope of its closed form: as ‖x_0 − x̂_0‖² = ‖ε − ε̂‖² / SNR_t
    and E[ε·E[ε|x_t]] = E[E[ε|x_t]²] = (1 − ᾱ_t)/(ᾱ_t s² + 1 − ᾱ_t) per pixel,
    dL/dc = 2 (c − 1) · (1/T) Σ_t x0_weight_t / SNR_t · (1 − ᾱ_t)/(ᾱ_t s² + 1 − ᾱ_t).
    Monte Carlo over n = 20,000 (x_0, t, ε), each image 1x4x4: the mean of the per-example
    gradients must lie within 5 standard errors of that value (0 at c = 1), and more than 5 from 0,
    on the side of c = 1, at c = 1 ± 0.2."""
    n = 20_000
    g = torch.Generator().manual_seed(2)
    x0 = MU + S * torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64)
    t = torch.randint(1, 1001, (n,), generator=g)
    noise = torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64)
    diffusion, oracle = GaussianDiffusion(PAPER_BETAS, mean_type=mean_type), Oracle()
    second_moment = (1 - ABAR) / (ABAR * S**2 + 1 - ABAR)  # E[E[ε | x_t]²] per pixel
    for spec in WEIGHTINGS:
        weighting = LossWeighting.parse(spec)
        w = LossWeights(weighting, diffusion.alphas_cumprod, mean_type)(t) if weighting.active else None
        slope = 2 * np.mean(_x0_space(spec, mean_type) / SNR * second_moment)
        for c0, sign in ((1.0, 0), (0.8, -1), (1.2, 1)):
            c = torch.full((n,), c0, dtype=torch.float64, requires_grad=True)  # one c per example: per-example gradients
            diffusion.training_losses(_oracle_output(mean_type, oracle, c), x0, t, noise, mse_weight=w)["loss"].sum().backward()
            grads = c.grad
            mean, se = grads.mean().item(), grads.std().item() / math.sqrt(n)
            print(f"{mean_type} {spec} c={c0}: dL/dc = {mean:.3e} ± {se:.1e} (closed form {(c0 - 1) * slope:.3e})")
            assert abs(mean - (c0 - 1) * slope) < 5 * se, (spec, c0, mean, se)
            if sign:
                assert sign * mean > 5 * se, (spec, c0, mean, se)


@pytest.mark.parametrize("spec", WEIGHTINGS)
def test_a_model_that_returns_the_noise_drawn_has_zero_loss(spec):
    diffusion = GaussianDiffusion(PAPER_BETAS)
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(6, 1, 4, 4, generator=g), torch.randn(6, 1, 4, 4, generator=g)
    t = torch.tensor([1, 2, 100, 500, 999, 1000])
    weighting = LossWeighting.parse(spec)
    w = LossWeights(weighting, diffusion.alphas_cumprod, "eps")(t) if weighting.active else None
    assert (diffusion.training_losses(lambda x, tt: noise, x0, t, noise, mse_weight=w)["loss"] == 0).all()


def test_hybrid_weights_only_the_l_simple_term():
    diffusion = GaussianDiffusion(PAPER_BETAS, var_type="learned_range", loss_type="hybrid")
    g = torch.Generator().manual_seed(4)
    x0, noise, out = torch.randn(4, 1, 4, 4, generator=g), torch.randn(4, 1, 4, 4, generator=g), torch.randn(4, 2, 4, 4, generator=g)
    t = torch.tensor([1, 10, 500, 1000])
    w = torch.tensor([0.5, 2.0, 3.0, 0.25])
    plain = diffusion.training_losses(lambda x, tt: out, x0, t, noise)
    weighted = diffusion.training_losses(lambda x, tt: out, x0, t, noise, mse_weight=w)
    torch.testing.assert_close(weighted["vb"], plain["vb"], rtol=0, atol=0)
    torch.testing.assert_close(weighted["loss"], w * plain["mse"] + 0.001 * 1000 * plain["vb"])
    with pytest.raises(UserError, match="kl"):
        GaussianDiffusion(PAPER_BETAS, loss_type="kl").training_losses(lambda x, tt: out[:, :1], x0, t, noise, mse_weight=w)


@pytest.mark.parametrize("text, needle", [("min_snr:0", "positive"), ("min_snr:-1", "positive"), ("min_snr:inf", "finite"),
                                          ("min_snr:nan", "positive"), ("min_snr", "positive"), ("max_snr:5", "min_snr"),
                                          ("none:5", "none"), ("", "min_snr")])
def test_a_bad_loss_weight_is_one_line_listing_the_valid_ones(text, needle):
    with pytest.raises(UserError, match=needle) as e:
        LossWeighting.parse(text)
    assert "\n" not in str(e.value) and "soft_min_snr" in str(e.value)


# ------------------------------------------------------------------ importance sampling of t
def _filled(T: int, rows: np.ndarray) -> LossSecondMomentResampler:
    """A resampler whose history at t = 1 … T is rows[t - 1] (10 losses each), fed through `update`."""
    r = LossSecondMomentResampler(T)
    t = torch.arange(1, T + 1).repeat(10)
    r.update(t, torch.from_numpy(rows.T.reshape(-1)))
    return r


def test_the_importance_weighted_loss_is_an_unbiased_estimate_of_the_uniform_mean():
    """E_{t~p}[L_t / (T p_t)] = (1/T) Σ_t L_t, for a fixed table L_t and p from a skewed history:
    n = 200,000 draws, the mean within 5 standard errors."""
    T, n = 50, 200_000
    rng = np.random.default_rng(5)
    rows = rng.gamma(0.5, 1.0, (T, 1)) * rng.uniform(0.5, 1.5, (T, 10))
    r = _filled(T, rows)
    L = torch.from_numpy(rows.mean(axis=1) * rng.uniform(0.5, 1.5, T))  # losses like those of the history
    p = r.probabilities()
    assert p.max() / p.min() > 10  # far from uniform: the weights matter
    t = 1 + torch.multinomial(p, n, replacement=True, generator=torch.Generator().manual_seed(6))
    est = L[t - 1] * r.importance_weights(t, p)
    mean, se = est.mean().item(), est.std().item() / math.sqrt(n)
    print(f"E[L_t/(T p_t)] = {mean:.4f} ± {se:.4f}, (1/T) Σ L_t = {L.mean().item():.4f}")
    assert abs(mean - L.mean().item()) < 5 * se
    plain = L[t - 1].mean().item()  # without the weights: the mean under p, visibly not the uniform one
    assert abs(plain - L.mean().item()) > 5 * se


def test_with_a_full_history_the_probabilities_are_the_rms_mixed_with_the_uniform_law():
    T = 20
    rows = np.random.default_rng(7).uniform(0.0, 3.0, (T, 10))
    p = _filled(T, rows).probabilities().numpy()
    rms = np.sqrt((rows**2).mean(axis=1))
    expected = rms / rms.sum() * (1 - 0.001) + 0.001 / T  # improved-diffusion's weights()
    np.testing.assert_allclose(p, expected, rtol=1e-12)
    assert abs(p.sum() - 1) < 1e-12


def test_until_every_t_has_ten_losses_t_is_uniform():
    T = 6
    r = LossSecondMomentResampler(T)
    assert torch.equal(r.probabilities(), torch.full((T,), 1 / T, dtype=torch.float64))
    t = torch.tensor([t for t in range(1, T + 1) for _ in range(10)])[:-1]  # t = 6 has 9
    r.update(t, torch.arange(1.0, len(t) + 1))
    assert torch.equal(r.probabilities(), torch.full((T,), 1 / T, dtype=torch.float64))
    assert torch.equal(r.importance_weights(t, r.probabilities()), torch.ones(len(t), dtype=torch.float64))
    r.update(torch.tensor([6]), torch.tensor([1.0]))
    assert not torch.equal(r.probabilities(), torch.full((T,), 1 / T, dtype=torch.float64))


def test_the_ring_buffer_keeps_what_a_deque_fed_pair_by_pair_keeps():
    """improved-diffusion's update_with_all_losses, written out: a deque of maxlen 10 per t, fed
    (t, loss) pair by pair in batch order. Batches of 40 over T = 6 repeat each t many times (more
    than 10 in one batch too); a non-finite loss (an fp16 overflow) is not recorded."""
    T, rng = 6, np.random.default_rng(8)
    r = LossSecondMomentResampler(T)
    ref = {t: collections.deque(maxlen=10) for t in range(1, T + 1)}
    seen = collections.Counter()
    for step in range(12):
        t = rng.integers(1, T + 1 if step % 3 else 3, 40)  # every third batch: only t = 1, 2 (20 each)
        losses = rng.uniform(0, 2, 40)
        if step == 5:
            losses[[3, 17]] = [np.inf, np.nan]
        r.update(torch.from_numpy(t), torch.from_numpy(losses))
        for ti, li in zip(t.tolist(), losses.tolist()):
            if math.isfinite(li):
                ref[ti].append(li)
                seen[ti] += 1
        for ti in range(1, T + 1):
            k = min(seen[ti], 10)
            ring = r.history[ti].numpy()
            assert r.counts[ti].item() == seen[ti], (step, ti)
            assert sorted(ring[:k].tolist()) == sorted(ref[ti]), (step, ti)
            assert (ring[k:] == 0).all()
            np.testing.assert_allclose((ring[:k] ** 2).mean() if k else 0.0, np.mean(np.square(ref[ti])) if k else 0.0,
                                       rtol=1e-15)
    assert (r.history[0] == 0).all() and r.counts[0] == 0  # the sink holds nothing


# ------------------------------------------------------------------ in the training loop
def test_the_training_step_weights_each_loss_and_draws_t_from_the_history(tmp_path, monkeypatch):
    """`ddpm train` with loss_weight=min_snr:5 and t_sampling=importance (T = 8, batch 8, 24 steps,
    past the 10 losses per t that importance sampling waits for): each step hands training_losses
    the closed-form weight of its t; the loss it differentiates is the mean of L_i / (T p_{t_i}),
    p computed here from the history the step started with; and the history in the last checkpoint
    is what a deque per t fed with every step's (t, loss) pairs keeps."""
    from ddpm.io.checkpoint import latest_checkpoint
    from ddpm.run.config import RunConfig
    from ddpm.workflows.train import train

    T, B, steps = 8, 8, 24
    rng = np.random.default_rng(9)
    np.savez(tmp_path / "data.npz", x=rng.integers(0, 256, (16, 32, 32), dtype=np.uint8))
    run = RunConfig.from_preset("tiny", data=str(tmp_path / "data.npz")).with_overrides(
        [f"diffusion.T={T}", f"train.batch_size={B}", f"train.steps={steps}", "train.checkpoint_every=100",
         "train.loss_weight=min_snr:5", "train.t_sampling=importance"])
    calls, starts, differentiated = [], [], []
    plain_losses, plain_probabilities = GaussianDiffusion.training_losses, LossSecondMomentResampler.probabilities
    plain_scale = torch.amp.GradScaler.scale

    def losses(self, model, x0, t, noise=None, mse_weight=None):
        out = plain_losses(self, model, x0, t, noise, mse_weight=mse_weight)
        calls.append((t.clone(), None if mse_weight is None else mse_weight.clone(), out["loss"].detach().clone()))
        return out

    def probabilities(self):
        starts.append((self.history.clone(), self.counts.clone()))
        return plain_probabilities(self)

    def scale(self, loss):
        differentiated.append(loss.detach().clone())
        return plain_scale(self, loss)

    monkeypatch.setattr(GaussianDiffusion, "training_losses", losses)
    monkeypatch.setattr(LossSecondMomentResampler, "probabilities", probabilities)
    monkeypatch.setattr(torch.amp.GradScaler, "scale", scale)
    train(tmp_path / "run", run, progress=False)
    assert len(calls) == len(starts) == len(differentiated) == steps

    betas = np.linspace(1e-4, 0.02, T)  # the linear schedule at T = 8
    snr = np.cumprod(1 - betas) / (1 - np.cumprod(1 - betas))
    w_eps = np.minimum(snr, 5.0) / snr
    history = {t: collections.deque(maxlen=10) for t in range(1, T + 1)}
    skewed = 0
    for (t, w, L), (h, counts), loss in zip(calls, starts, differentiated):
        assert w is not None
        np.testing.assert_allclose(w.numpy(), w_eps[t.numpy() - 1], rtol=1e-6)
        h, counts = h.numpy()[1:], counts.numpy()[1:]
        if (counts >= 10).all():
            rms = np.sqrt((h**2).mean(axis=1))
            p = rms / rms.sum() * (1 - 0.001) + 0.001 / T
            skewed += 1
        else:
            p = np.full(T, 1 / T)
        expected = np.mean(L.double().numpy() / (T * p[t.numpy() - 1]))
        np.testing.assert_allclose(loss.item(), expected, rtol=1e-5)
        for ti, li in zip(t.tolist(), L.tolist()):
            history[ti].append(li)
    assert skewed >= 4  # the last steps drew t by importance
    saved = latest_checkpoint(tmp_path / "run")[1]["t_sampler"]
    for ti in range(1, T + 1):
        assert sorted(saved["history"][ti].tolist()) == sorted(history[ti]), ti


def test_the_step_draws_t_from_the_probabilities_it_is_given():
    """draw_step with p: over 500 steps of 8 (n = 4,000 draws) each t's share lies within 5 standard
    errors √(p(1−p)/n) of p_t; a t of probability 0 is never drawn; and the draw is a function of
    (seed, step, p)."""
    from ddpm.workflows.train import draw_step

    T, B = 6, 8
    p = torch.tensor([0.5, 0.0, 0.1, 0.2, 0.05, 0.15], dtype=torch.float64)
    t = torch.cat([draw_step(0, s, (B, 1, 2, 2), p).t for s in range(500)])
    n = len(t)
    share = torch.bincount(t, minlength=T + 1)[1:].double() / n
    assert (share[p == 0] == 0).all()
    assert ((share - p).abs() <= 5 * (p * (1 - p) / n).sqrt()).all(), share
    assert torch.equal(draw_step(0, 3, (B, 1, 2, 2), p).t, draw_step(0, 3, (B, 1, 2, 2), p).t)
