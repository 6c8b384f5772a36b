"""The paper's experiments: bits/dim and its parts, rate–distortion, progressive generation,
shared latents, interpolation and reconstruction; and a smoke test of every command.

Facts from outside the code: with the closed-form optimal ε-predictor for Gaussian data the
distortion of x̂_0 at every t has a closed form; a bound's total is the sum of its parts; KL terms
are non-negative, so the rate can only grow as t decreases; t = 0 means "no noise, no steps".
"""

import csv
import json
import re
import math

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm import GaussianDiffusion, UserError, make_betas
from gaussian_oracle import MU, PAPER_BETAS, S, Oracle
from ddpm.cli import main
from ddpm.process.grids import time_grid
from ddpm.run.load import load_run
from ddpm.io.images import read_image
from ddpm.workflows.experiments import interpolate, progressive_generation, reconstruct, shared_latent_samples
from ddpm.workflows.nll import NLLImages, evaluate_nll, load_bpd, plot_rate_distortion, rate_distortion
from ddpm.process.sampling import SamplerSpec
from ddpm.workflows.sample import Images, sample

BETAS = PAPER_BETAS
pytestmark = pytest.mark.usefixtures("one_thread")
ABAR = np.cumprod(1 - BETAS)






def gaussian_images(n, side, seed):
    g = torch.Generator().manual_seed(seed)
    x = MU + S * torch.randn(n, 1, side, side, generator=g, dtype=torch.float64)
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def oracle_nll(tmp_path_factory):
    out = tmp_path_factory.mktemp("nll")
    images = gaussian_images(32, 16, seed=0)
    d = GaussianDiffusion(make_betas("linear", 1000))
    summary = evaluate_nll(Oracle(), d, out, NLLImages(images, 32, 3), progress=False)
    return dict(out=out, images=images, diffusion=d, summary=summary, bpd=load_bpd(out))


# ---------------------------------------------------------------- bits/dim
def test_nll_total_is_the_sum_of_its_parts(oracle_nll):
    s, out = oracle_nll["summary"], oracle_nll["out"]
    assert s["n"] == 32 and s["T"] == 1000
    assert s["total_bpd"] == pytest.approx(s["prior_bpd"] + s["decoder_bpd"] + s["diffusion_bpd"], rel=1e-12)
    assert json.loads((out / "summary.json").read_text()) == s
    rows = list(csv.DictReader(open(out / "per_image.csv")))
    assert len(rows) == 32
    for r in rows:
        parts = float(r["prior_bpd"]) + float(r["decoder_bpd"]) + float(r["diffusion_bpd"])
        assert float(r["total_bpd"]) == pytest.approx(parts, abs=2e-6)
    per_t = list(csv.DictReader(open(out / "per_t.csv")))
    assert [int(r["t"]) for r in per_t] == list(range(1, 1001))
    vb = oracle_nll["bpd"]["vb"]
    assert float(per_t[0]["vb_bpd"]) == pytest.approx(s["decoder_bpd"], rel=1e-5)  # from x_1: L_0
    assert sum(float(r["vb_bpd"]) for r in per_t[1:]) == pytest.approx(s["diffusion_bpd"], rel=1e-5)
    assert (vb[:, 1:] >= -2e-6).all()  # KL terms (float32; see below)
    # A bound on each image's exact NLL under the rounded Gaussian, and a close one with the optimal
    # ε (test_diffusion measures a gap of ≈ 0.13 bits/dim, nearly all in L_0).
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))
    v = np.arange(256) / 127.5 - 1
    p = np.array([(1.0 if k == 255 else phi((v[k] + 1 / 255 - MU) / S)) - (0.0 if k == 0 else phi((v[k] - 1 / 255 - MU) / S))
                  for k in range(256)])
    nll = -np.log2(p[oracle_nll["images"].long().numpy()]).reshape(32, -1).mean(axis=1)
    total = np.array([float(r["total_bpd"]) for r in rows])
    gap, se = (total - nll).mean(), (total - nll).std(ddof=1) / math.sqrt(32)
    print(f"oracle: {s['total_bpd']:.4f} bits/dim = {s['prior_bpd']:.2e} + {s['diffusion_bpd']:.4f} + {s['decoder_bpd']:.4f}; "
          f"exact NLL {nll.mean():.4f}, gap {gap:.4f} ± {se:.4f}")
    assert -3 * se < gap < 0.25


def test_nll_does_not_depend_on_the_batch_and_resumes(oracle_nll, tmp_path):
    images, d = oracle_nll["images"][:12], oracle_nll["diffusion"]
    m = Oracle()
    evaluate_nll(m, d, tmp_path, NLLImages(images, 5, 3), progress=False)
    assert m.images == 12 * 1000
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == ["batch-000000.npz", "batch-000005.npz", "batch-000010.npz"]
    # image i's noise comes from (seed, i): the same numbers as in the batch of 32
    torch.testing.assert_close(load_bpd(tmp_path)["vb"], oracle_nll["bpd"]["vb"][:12], rtol=1e-6, atol=1e-7)

    m = Oracle()
    evaluate_nll(m, d, tmp_path, NLLImages(images, 5, 3), progress=False)
    assert m.images == 0  # every batch was saved
    (tmp_path / "parts" / "batch-000005.npz").unlink()
    evaluate_nll(m, d, tmp_path, NLLImages(images, 4, 3), progress=False)
    assert m.images == 5 * 1000  # only the lost batch, in batches of the new size
    torch.testing.assert_close(load_bpd(tmp_path)["vb"], oracle_nll["bpd"]["vb"][:12], rtol=1e-6, atol=1e-7)

    with pytest.raises(UserError, match="seed=3"):
        evaluate_nll(m, d, tmp_path, NLLImages(images, 5, 4), progress=False)
    with pytest.raises(UserError, match="other images"):
        evaluate_nll(m, d, tmp_path, NLLImages(255 - images, 5, 3), progress=False)


# ---------------------------------------------------------------- rate–distortion
def test_rate_distortion_indexing_on_hand_made_terms():
    # T = 3; column t - 1 holds L_{t-1} and the x̂_0 error, both computed from x_t.
    bpd = dict(prior_bpd=np.array([0.1, 0.3]), vb=np.array([[2.0, 0.5, 0.25], [4.0, 1.5, 0.75]]),
               x0_mse=np.array([[1e-4, 0.01, 0.25], [3e-4, 0.03, 0.75]]))
    rd = rate_distortion(bpd)
    assert rd["t"].tolist() == [3, 2, 1] and rd["steps"].tolist() == [0, 1, 2]
    np.testing.assert_allclose(rd["rate"], [0.2, 0.2 + 0.5, 0.2 + 0.5 + 1.0])  # prior, + L_2, + L_1
    np.testing.assert_allclose(rd["distortion_rmse"], 127.5 * np.sqrt([0.5, 0.02, 2e-4]))
    assert rd["decoder_bpd"] == 3.0 and rd["total_bpd"] == pytest.approx(4.7)


def test_rate_distortion_with_the_oracle(oracle_nll):
    rd, s = rate_distortion(oracle_nll["bpd"]), oracle_nll["summary"]
    assert rd["t"][0] == 1000 and rd["t"][-1] == 1
    assert rd["rate"][0] == pytest.approx(s["prior_bpd"], rel=1e-9)  # t = T: only x_T was sent
    assert rd["rate"][-1] == pytest.approx(s["total_bpd"] - s["decoder_bpd"], rel=1e-6)  # t = 1: all but L_0
    # Each KL term is >= 0, so the rate never falls as t decreases; up to float32 rounding of the
    # KL formula, whose −1 + exp(δ) − δ cancels to ~1e-7 × |log-variance| ≈ 1e-6 (measured −1.3e-7).
    assert (np.diff(rd["rate"]) >= -2e-6).all()
    assert (rd["rate"][1:] >= rd["rate"][0] - 2e-6).all() and rd["rate"][-1] > 100 * rd["rate"][0]

    # Distortion in closed form: x̂_0 = μ + k (x_t − √ᾱ μ), k = √ᾱ s² / (ᾱ s² + 1 − ᾱ), so with
    # A = (1 − k√ᾱ)(x_0 − μ) and B² = k²(1 − ᾱ): MSE = mean A² + B², each draw of variance 4A²B² + 2B⁴.
    x0 = oracle_nll["images"].double().numpy().reshape(32, -1) / 127.5 - 1
    a = ABAR[rd["t"] - 1][:, None]
    k = np.sqrt(a) * S**2 / (a * S**2 + 1 - a)
    A2 = (1 - k * np.sqrt(a)) ** 2 * ((x0.reshape(1, -1) - MU) ** 2)
    B2 = k**2 * (1 - a)
    mse = (A2 + B2).mean(axis=1)
    se = np.sqrt((4 * A2 * B2 + 2 * B2**2).sum(axis=1)) / x0.size
    got = (rd["distortion_rmse"] / 127.5) ** 2
    z = (got - mse) / se
    print(f"distortion: RMSE at t=T {rd['distortion_rmse'][0]:.2f} (closed form {127.5 * math.sqrt(mse[0]):.2f}), "
          f"at t=1 {rd['distortion_rmse'][-1]:.3f} ({127.5 * math.sqrt(mse[-1]):.3f}); max |z| {np.abs(z).max():.2f}")
    assert np.abs(z).max() < 5
    # non-increasing as t decreases, within the Monte Carlo noise of neighbouring estimates
    assert (np.diff(got) <= 5 * np.hypot(se[1:], se[:-1])).all()


def test_rate_distortion_plot(oracle_nll, tmp_path):
    path = plot_rate_distortion(rate_distortion(oracle_nll["bpd"]), tmp_path / "rd.png")
    im = np.asarray(Image.open(path).convert("RGB"))
    assert im.shape[0] >= 200 and im.shape[1] >= 600
    assert ((im[..., 2] > 150) & (im[..., 0] < 80)).sum() > 300  # the blue curves were drawn


# ---------------------------------------------------------------- chains, latents, interpolation
D20 = GaussianDiffusion(make_betas("linear", 20, 1e-3, 0.2))
ORACLE20 = Oracle(make_betas("linear", 20, 1e-3, 0.2))


def test_progressive_generation_follows_the_sampling_chains():
    res = progressive_generation(ORACLE20, D20, (1, 8, 8), [20, 11, 1], Images(5, range(3)))
    assert res["pred_x0"].shape == (3, 3, 1, 8, 8)
    assert torch.equal(res["samples"], sample(ORACLE20, D20, (1, 8, 8), Images(5, range(3)), device="cpu"))
    # at t = 1 the x̂_0 shown is the network's last prediction, which is also the sample
    # (no noise is added at the last step and the posterior mean from x_1 is x̂_0)
    torch.testing.assert_close(res["pred_x0"][:, 2], res["samples"], rtol=0, atol=1e-5)
    with pytest.raises(UserError, match="not steps of this sampler"):
        progressive_generation(ORACLE20, D20, (1, 8, 8), [20, 3], Images(5, range(2)),
                               sampler=SamplerSpec("ddim", steps=5))


def test_shared_latent_samples():
    res = shared_latent_samples(ORACLE20, D20, (1, 8, 8), [20, 7, 0], k=3, seed=5)
    assert res["samples"].shape == (3, 3, 1, 8, 8) and res["x_t"].shape == (3, 1, 8, 8)
    first = sample(ORACLE20, D20, (1, 8, 8), Images(5, [0]), device="cpu")[0]
    assert torch.equal(res["x_t"][2], first)  # the shared chain is sample 0 of the seed
    assert all(torch.equal(s, first) for s in res["samples"][2])  # t = 0: nothing left to vary
    for row in (0, 1):  # t > 0: k different continuations
        s = res["samples"][row]
        assert not torch.equal(s[0], s[1]) and not torch.equal(s[1], s[2])


def test_interpolation_and_reconstruction_at_t0_return_the_inputs():
    a, b = gaussian_images(2, 8, seed=1)
    xa, xb = (x.float() / 127.5 - 1 for x in (a, b))
    m = Oracle(make_betas("linear", 20, 1e-3, 0.2))
    res = interpolate(m, D20, (xa, xb), [0], [0.0, 0.5, 1.0], seed=1)
    assert m.images == 0
    assert torch.equal(res["images"][0, 0], xa) and torch.equal(res["images"][0, 2], xb)
    assert torch.equal(((res["images"][0, 0] + 1) * 127.5).round().to(torch.uint8), a)
    torch.testing.assert_close(res["images"][0, 1], (xa + xb) / 2)
    rec = reconstruct(m, D20, xa, [0], seed=1)
    assert torch.equal(rec["x0"][0], xa) and m.images == 0


def chain_law(t, betas=PAPER_BETAS, var_type="fixedlarge"):
    """The reverse chain from x_t to x_0 under the oracle, without clipping, is affine in x_t:
    x_0 = A x_t + B + n, n ~ N(0, V). Composed here step by step in float64 from eq. 7 and the
    oracle's x̂_0 = μ + k (x_u − √ᾱ_u μ), k = √ᾱ_u s² / (ᾱ_u s² + 1 − ᾱ_u) (not read from the code)."""
    abar = np.append(1.0, np.cumprod(1 - betas))
    A, B, V = 1.0, 0.0, 0.0
    for u in range(t, 0, -1):
        a, ap, beta = abar[u], abar[u - 1], betas[u - 1]
        c1, c2 = beta * math.sqrt(ap) / (1 - a), (1 - ap) * math.sqrt(1 - beta) / (1 - a)
        k = math.sqrt(a) * S**2 / (a * S**2 + 1 - a)
        g = c1 * k + c2
        sigma2 = 0.0 if u == 1 else (beta if var_type == "fixedlarge" else beta * (1 - ap) / (1 - a))
        A, B, V = g * A, g * B + c1 * MU * (1 - k * math.sqrt(a)), g * g * V + sigma2
    return A, B, V, abar[t]


def assert_follows_the_law(out, x0, t, what):
    """out [N] against x0 [N] (iid N(μ, s²) pixels): the mean and the correlation with x0 that
    chain_law gives, within 4 standard errors. An identity would correlate perfectly."""
    A, B, V, a = chain_law(t)
    var = A * A * (a * S**2 + 1 - a) + V
    corr_law = A * math.sqrt(a) * S**2 / (S * math.sqrt(var))
    n = out.numel()
    corr = torch.corrcoef(torch.stack([out.double(), x0.double()]))[0, 1].item()
    mean_law = A * math.sqrt(a) * MU + B
    print(f"{what} t={t}: corr with x0 {corr:.4f} (law {corr_law:.4f}), mean {out.mean():.4f} (law {mean_law:.4f})")
    assert abs(corr - corr_law) < 4 * (1 - corr_law**2) / math.sqrt(n) + 1e-3
    assert abs(out.double().mean().item() - mean_law) < 4 * math.sqrt(var / n)


def test_reconstruction_and_interpolation_follow_the_exact_law():
    # Continuous Gaussian pixels, the paper's 1000 steps, the closed-form optimal ε: what comes back
    # from x_t is known in closed form. Small t keeps the image (correlation 0.71 at t = 50), t = T
    # keeps nothing of it (≈ 0). A reconstruction or interpolation that returned its input, or
    # skipped the encoding, fails.
    g = torch.Generator().manual_seed(7)
    x0_a, x0_b = (MU + S * torch.randn(1, 64, 64, generator=g) for _ in range(2))
    d, oracle = GaussianDiffusion(make_betas("linear", 1000)), Oracle()
    rec = reconstruct(oracle, d, x0_a, [50, 300, 1000], seed=3, clip_denoised=False)
    for i, t in enumerate(rec["t"]):
        assert_follows_the_law(rec["x0"][i].flatten(), x0_a.flatten(), t, "reconstruction")
    res = interpolate(oracle, d, (x0_a, x0_b), [50], [0.0, 0.5, 1.0], seed=3, clip_denoised=False)
    img = res["images"][0]  # [λ, C, H, W]
    assert torch.equal(img[0], rec["x0"][0])  # λ = 0: image a with the reconstruction's noise
    assert_follows_the_law(img[2].flatten(), x0_b.flatten(), 50, "interpolation λ=1 against b")
    # the same decoding noise for every λ and a chain affine in x_t: the midpoint decodes to the midpoint
    torch.testing.assert_close(img[1], (img[0] + img[2]) / 2, rtol=0, atol=1e-4)


def test_interpolation_decodes_each_lambda_with_the_same_noise():
    a, b = (x.float() / 127.5 - 1 for x in gaussian_images(2, 8, seed=1))
    res = interpolate(ORACLE20, D20, (a, b), [5, 20], [0.0, 0.25, 1.0], seed=2)
    assert res["images"].shape == (2, 3, 1, 8, 8)
    rec = reconstruct(ORACLE20, D20, a, [5, 20], seed=2)
    # λ = 0 is image a alone: the same x_t and the same decoding noise as its reconstruction
    assert torch.equal(res["images"][:, 0], rec["x0"])
    with pytest.raises(UserError, match="T=20"):
        interpolate(ORACLE20, D20, (a, b), [21], [0.0], seed=2)


def test_load_image_crops_resizes_and_converts(tmp_path):
    arr = np.zeros((30, 50, 3), np.uint8)
    arr[:, 10:40] = 200  # the centred 30x30 square is uniform
    Image.fromarray(arr).save(tmp_path / "x.png")
    x = read_image(tmp_path / "x.png", 1, (16, 16))
    assert x.dtype == torch.uint8 and x.shape == (1, 16, 16) and (x == 200).all()
    assert read_image(tmp_path / "x.png", 3, (8, 8)).shape == (3, 8, 8)
    with pytest.raises(UserError, match="no such image"):
        read_image(tmp_path / "missing.png", 1, (16, 16))


# ---------------------------------------------------------------- the commands, on a tiny model
def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_sample(tiny_run, tmp_path, capsys):
    rc, out, _ = _run(capsys, "sample", "--run", tiny_run / "run", "--n", 5, "--batch", 2, "--seed", 1, "--out", tmp_path,
                      "--device", "cpu", "--no-progress")
    assert rc == 0 and "sampled 5 images" in out
    assert sorted(p.name for p in tmp_path.glob("0*.png")) == [f"{i:06d}.png" for i in range(5)]
    assert np.load(tmp_path / "samples.npz")["x"].shape == (5, 16, 16, 1)
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "sampling.json").is_file()
    rc, out, _ = _run(capsys, "sample", "--checkpoint", next((tiny_run / "run").glob("ckpt-*.safetensors")), "--n", 5,
                      "--batch", 3, "--seed", 1, "--out", tmp_path, "--no-progress")
    assert rc == 0 and "sampled 0 images (5 already there)" in out
    rc, out, _ = _run(capsys, "sample", "--run", tiny_run / "run", "--n", 5, "--seed", 1, "--out", tmp_path / "d",
                      "--sampler", "ddim", "--ddim-steps", 4, "--eta", 0.5, "--no-progress")
    assert rc == 0 and np.load(tmp_path / "d" / "samples.npz")["x"].shape == (5, 16, 16, 1)


def test_cli_few_step_samplers(tiny_run, tmp_path, capsys):
    for sampler, spacing in (("heun", "karras"), ("dpm++2m-sde", "logsnr"), ("unipc", "trailing")):
        out = tmp_path / sampler
        rc, said, _ = _run(capsys, "sample", "--run", tiny_run / "run", "--n", 3, "--out", out, "--sampler", sampler,
                           "--steps", 5, "--spacing", spacing, "--no-progress")
        assert rc == 0 and np.load(out / "samples.npz")["x"].shape == (3, 16, 16, 1)
        meta = json.loads((out / "sampling.json").read_text())
        assert (meta["sampler"], meta["steps"], meta["spacing"]) == (sampler, 5, spacing)
    # a dry run says what a chain costs: heun with 6 evaluations uses 5 (three steps, one evaluation on the last)
    rc, said, _ = _run(capsys, "sample", "--run", tiny_run / "run", "--n", 3, "--out", tmp_path / "x", "--sampler", "heun",
                       "--steps", 6, "--dry-run")
    assert rc == 0 and "heun, 5 network evaluations on the uniform grid" in said
    # eval of a few-step sampler goes to its own folder, beside Algorithm 2's
    rc, said, _ = _run(capsys, "eval", "--run", tiny_run / "run", "--sampler", "dpm++2m", "--steps", 10, "--spacing",
                       "logsnr", "--dry-run")
    assert rc == 0 and "eval/ckpt-00000002-dpm++2m-10-logsnr/eval.json" in said
    # T = 20 here: ten log-SNR-uniform times round to fewer distinct integer times, and the count says so
    nfe = int(re.search(r"dpm\+\+2m, (\d+) network evaluations on the logsnr grid", said).group(1))
    assert nfe == len(time_grid(load_run(tiny_run / "run").diffusion.alphas_cumprod, 10, "logsnr")) - 1 < 10
    # progressive: x̂_0 at the times a solver visits (heun, 5 evaluations on the trailing grid: 20, 13, 7)
    rc, said, _ = _run(capsys, "progressive", "--run", tiny_run / "run", "--n-chains", 2, "--sampler", "heun", "--steps",
                       5, "--spacing", "trailing", "--out", tmp_path / "prog", "--no-progress")
    assert rc == 0 and np.load(tmp_path / "prog" / "progressive.npz")["pred_x0"].shape[:2] == (2, 3)


def test_cli_nll_and_rate_distortion(tiny_run, tmp_path, capsys):
    data = tiny_run / "squares.npz"
    rc, out, _ = _run(capsys, "nll", "--run", tiny_run / "run", "--data", data, "--split", "train", "--n", 3, "--batch", 2,
                      "--out", tmp_path / "nll", "--no-progress")
    assert rc == 0 and "bits/dim" in out
    s = json.loads((tmp_path / "nll" / "summary.json").read_text())
    assert s["n"] == 3 and s["T"] == 20 and math.isfinite(s["total_bpd"])
    assert len(list(csv.reader(open(tmp_path / "nll" / "per_t.csv")))) == 21
    assert sorted(p.name for p in (tmp_path / "nll" / "parts").iterdir()) == ["batch-000000.npz", "batch-000002.npz"]

    rc, out, _ = _run(capsys, "rate-distortion", "--from-nll", tmp_path / "nll", "--out", tmp_path / "rd")
    assert rc == 0 and "rate at t=20" in out
    rows = list(csv.DictReader(open(tmp_path / "rd" / "rate_distortion.csv")))
    assert len(rows) == 20 and float(rows[0]["rate_bpd"]) == pytest.approx(s["prior_bpd"], rel=1e-5)
    assert float(rows[-1]["rate_bpd"]) == pytest.approx(s["total_bpd"] - s["decoder_bpd"], rel=1e-5)
    assert Image.open(tmp_path / "rd" / "rate_distortion.png").size[0] > 600

    rc, out, _ = _run(capsys, "rate-distortion", "--run", tiny_run / "run", "--data", data, "--split", "train", "--n", 2,
                      "--out", tmp_path / "rd2", "--no-progress")
    assert rc == 0 and (tmp_path / "rd2" / "rate_distortion.csv").is_file() and (tmp_path / "rd2" / "summary.json").is_file()


def test_cli_progressive_and_shared(tiny_run, tmp_path, capsys):
    rc, out, _ = _run(capsys, "progressive", "--run", tiny_run / "run", "--n-chains", 2, "--times", "20,11,1", "--out", tmp_path,
                      "--no-progress")
    assert rc == 0
    assert Image.open(tmp_path / "progressive.png").size == (3 * 18 + 2, 2 * 18 + 2)  # 16px cells, 2px gaps
    assert np.load(tmp_path / "progressive.npz")["pred_x0"].shape == (2, 3, 16, 16, 1)
    rc, out, _ = _run(capsys, "progressive", "--run", tiny_run / "run", "--share-t", "20,10,0", "--k", 3, "--out", tmp_path,
                      "--no-progress")
    assert rc == 0 and Image.open(tmp_path / "shared.png").size == (4 * 18 + 2, 3 * 18 + 2)
    assert np.load(tmp_path / "shared.npz")["samples"].shape == (3, 3, 16, 16, 1)


def test_cli_interpolate_and_reconstruct(tiny_run, tmp_path, capsys):
    a, b = tiny_run / "img0.png", tiny_run / "img1.png"
    rc, out, _ = _run(capsys, "interpolate", a, b, "--run", tiny_run / "run", "--t", "0,10", "--steps", 3, "--out", tmp_path,
                      "--no-progress")
    assert rc == 0 and Image.open(tmp_path / "interpolation.png").size == (5 * 18 + 2, 2 * 18 + 2)
    z = np.load(tmp_path / "interpolation.npz")
    assert z["images"].shape == (2, 3, 16, 16, 1)
    src = np.asarray(Image.open(a))[..., None]
    assert np.array_equal(z["images"][0, 0], src) and np.array_equal(z["images"][0, 2], np.asarray(Image.open(b))[..., None])
    rc, out, _ = _run(capsys, "reconstruct", a, "--run", tiny_run / "run", "--t", "0,5,20", "--out", tmp_path, "--no-progress")
    assert rc == 0
    z = np.load(tmp_path / "reconstruct.npz")
    assert z["x0"].shape == (3, 16, 16, 1) and np.array_equal(z["x0"][0], src)


def test_cli_inpaint_keeps_the_known_pixels_and_resumes(tiny_run, tmp_path, capsys):
    """`ddpm inpaint` with a PNG mask (white = keep): the kept pixels are the input's, to the pixel;
    the folder is sample's, with compare.png; a rerun draws nothing, other settings are refused."""
    a, b = tiny_run / "img0.png", tiny_run / "img1.png"
    mask = np.full((16, 16), 255, np.uint8)
    mask[4:12, 6:14] = 0
    Image.fromarray(mask).save(tmp_path / "mask.png")
    argv = ["inpaint", a, b, "--mask", tmp_path / "mask.png", "--run", tiny_run / "run", "--out", tmp_path / "o",
            "--jumps", 3, "--resample", 2, "--no-progress"]
    rc, out, err = _run(capsys, *argv)
    assert rc == 0, err
    x = np.load(tmp_path / "o" / "samples.npz")["x"][..., 0]
    for k, src in enumerate((a, b)):
        pixels = np.asarray(Image.open(src))
        assert np.array_equal(x[k][mask == 255], pixels[mask == 255])
        assert not np.array_equal(x[k][mask == 0], pixels[mask == 0])
    # 20 steps, blocks of 3 above positions 1, 4, …, 16 walked twice: 20 + 6·3 = 38 evaluations
    assert "38 network evaluations" in out
    assert Image.open(tmp_path / "o" / "compare.png").size == (3 * 18 + 2, 2 * 18 + 2)  # input, masked, output
    rc, out, _ = _run(capsys, *argv)
    assert rc == 0 and "inpainted 0 images (2 already there)" in out
    rc, _, err = _run(capsys, *argv[:-2], 3, "--no-progress")
    assert rc == 2 and "resample=2, now 3" in err


def test_report_shows_the_edits_inside_the_run(tiny_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run / "run", run)
    for cmd, extra in (("inpaint", ["--jumps", 5, "--resample", 1]), ("img2img", ["--strength", 0.5])):
        rc, _, err = _run(capsys, cmd, tiny_run / "img0.png", "--run", run, "--out", run / "edits" / cmd, *extra,
                          "--no-progress")
        assert rc == 0, err
    assert _run(capsys, "report", run)[0] == 0
    page = (run / "report.html").read_text()
    assert "<h2>Editing (ddpm inpaint, img2img, invert)</h2>" in page
    assert "edits/inpaint: inpainting (RePaint, jump 5, 1 resamplings" in page and "edits/img2img: image-to-image" in page
    section = page.split("<h2>Editing")[1].split("<h2>")[0]
    assert section.count("data:image/png;base64,") == 2


def test_cli_img2img_strength_zero_returns_the_images(tiny_run, tmp_path, capsys):
    a, b = tiny_run / "img0.png", tiny_run / "img1.png"
    rc, out, err = _run(capsys, "img2img", a, b, "--strength", 0, "--run", tiny_run / "run", "--out", tmp_path, "--no-progress")
    assert rc == 0, err
    x = np.load(tmp_path / "samples.npz")["x"][..., 0]
    assert np.array_equal(x, np.stack([np.asarray(Image.open(p)) for p in (a, b)]))


def test_cli_invert_then_decode_and_interpolate(tiny_run, tmp_path, capsys):
    """`ddpm invert` writes latents that `ddpm sample --from-latent` decodes back to the images
    (within the round trip `--verify` records) and `ddpm interpolate` slerps."""
    a, b = tiny_run / "img0.png", tiny_run / "img1.png"
    rc, out, err = _run(capsys, "invert", a, b, "--run", tiny_run / "run", "--steps", 10, "--verify", "--out",
                        tmp_path / "inv", "--no-progress")
    assert rc == 0, err
    record = json.loads((tmp_path / "inv" / "invert.json").read_text())
    rc, out, err = _run(capsys, "sample", "--run", tiny_run / "run", "--from-latent", tmp_path / "inv" / "latents.npz",
                        "--out", tmp_path / "dec", "--no-progress")
    assert rc == 0 and "decoded 2 latents" in out, err
    x = np.load(tmp_path / "dec" / "samples.npz")["x"][..., 0].astype(int)
    src = np.stack([np.asarray(Image.open(p)) for p in (a, b)]).astype(int)
    assert np.abs(x - src).max() <= max(record["round_trip_pixel_levels_max"]) + 1
    assert np.abs(x - src).max() <= 2  # DDIM's chain inverted, on this tiny model: at most 2 levels off
    rc, out, err = _run(capsys, "interpolate", f"{tmp_path}/inv/latents.npz@0", f"{tmp_path}/inv/latents.npz@1",
                        "--run", tiny_run / "run", "--steps", 3, "--out", tmp_path / "mix", "--no-progress")
    assert rc == 0, err
    mix = np.load(tmp_path / "mix" / "interpolation.npz")["images"][0, ..., 0].astype(int)
    assert np.abs(mix[0] - x[0]).max() <= 1 and np.abs(mix[2] - x[1]).max() <= 1  # λ = 0 and 1: the two latents
    rc, _, err = _run(capsys, "sample", "--run", tiny_run / "run", "--from-latent", tmp_path / "inv" / "latents.npz",
                      "--sampler", "ddim", "--out", tmp_path / "dec2", "--no-progress")
    assert rc == 2 and "leave --sampler" in err


@pytest.mark.parametrize("argv, needle", [
    (["inpaint", "{img}", "--mask", "star", "--run", "{run}", "--out", "{out}"], "center, half, random-strokes"),
    (["inpaint", "{img}", "--mask", "{img}", "{img}", "--run", "{run}", "--out", "{out}"], "2 masks for 1 images"),
    (["inpaint", "{img}", "--resample", "0", "--run", "{run}", "--out", "{out}"], "at least 1"),
    (["img2img", "{img}", "--strength", "1.5", "--run", "{run}", "--out", "{out}"], "from 0 (return the image) to 1"),
    (["invert", "{img}", "--steps", "0", "--run", "{run}", "--out", "{out}"], "DDIM steps=0"),
    (["sample", "--run", "{run}", "--from-latent", "{img}", "--out", "{out}"], "not a latents file"),
    (["reconstruct", "{img}", "--run", "{run}", "--t", "21", "--out", "{out}"], "from 0 (no noise) to T=20"),
    (["reconstruct", "{img}", "--run", "{run}", "--t", "5,x", "--out", "{out}"], "comma-separated integers"),
    (["interpolate", "{img}", "{out}/nope.png", "--run", "{run}", "--out", "{out}"], "no such image"),
    (["sample", "--run", "{out}/nowhere", "--n", "2", "--out", "{out}"], "no such run directory"),
    (["sample", "--run", "{run}", "--n", "2", "--out", "{out}", "--sampler", "euler"], "sampler='euler'"),
    (["progressive", "--run", "{run}", "--times", "25", "--out", "{out}"], "not steps of this sampler"),
    (["rate-distortion", "--run", "{run}", "--out", "{out}"], "give --data"),
])
def test_cli_bad_input_is_one_line(tiny_run, tmp_path, capsys, argv, needle):
    fill = dict(img=tiny_run / "img0.png", run=tiny_run / "run", out=tmp_path)
    rc, out, err = _run(capsys, *[a.format(**fill) for a in argv], "--no-progress")
    assert rc == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], err
