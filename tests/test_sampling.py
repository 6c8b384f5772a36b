"""Samplers and sample sets, against facts from outside the code.

The samplers are driven by the closed-form optimal ε-predictor for Gaussian data (x_0 ~ N(μ, s²)
per pixel): whatever the sampler, the samples must have the data's mean and variance. The rest
are properties: DDIM with η = 0 ignores its noise, image i depends only on (seed, i), a rerun
skips what is on disk, and torchrun's ranks split the indices exactly.
"""

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm import GaussianDiffusion, UserError, make_betas
from gaussian_oracle import MU, PAPER_BETAS, S, assert_follows_law, oracle_for
from ddpm.io.distributed import shard
from ddpm.process.diffusion import ddim_timesteps
from ddpm.process.sampling import SamplerSpec
from ddpm.workflows.sample import ImageNoise, Images, Loop, SampleSet, sample, sample_to_dir





BETAS = PAPER_BETAS
pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.fixture(scope="module")
def paper_diffusion():
    return GaussianDiffusion(make_betas("linear", 1000))


def exact_law(times, sampler, eta=0.0, var_type="fixedlarge", betas=BETAS):
    """Mean and variance of x_0 from x_T ~ N(0, 1) under the oracle, by composing each step's
    affine map in float64 (re-derived here, not read from the code). `times` is the chain of paper
    times from its first down to 0; ᾱ_t is abar[t - 1] and ᾱ_0 = 1. With y = x_t − √ᾱ_t μ and
    k = √ᾱ_t s² / v_t (v_t = ᾱ_t s² + 1 − ᾱ_t): x̂_0 = μ + k y.
    Ancestral: x_{t-1} = c1 x̂_0 + c2 x_t + σ z (eq. 7; σ² = β_t or β̃_t; no z at the last step).
    DDIM: x_next = √ᾱ_next x̂_0 + √(1 − ᾱ_next − σ²) ε̂ + σ z (Song et al. eq. 12)."""
    abar = np.append(1.0, np.cumprod(1 - betas))  # abar[t] = ᾱ_t for t = 0 … T
    beta = np.append(np.nan, betas)  # beta[t] = β_t
    m, V = 0.0, 1.0
    ts = list(times)
    for t, tn in zip(ts, ts[1:]):
        a = abar[t]
        v = a * S**2 + 1 - a
        k = math.sqrt(a) * S**2 / v
        if sampler == "ancestral":
            assert tn == t - 1
            ap = abar[t - 1]
            c1, c2 = beta[t] * math.sqrt(ap) / (1 - a), (1 - ap) * math.sqrt(1 - beta[t]) / (1 - a)
            sigma2 = 0.0 if t == 1 else (beta[t] if var_type == "fixedlarge" else beta[t] * (1 - ap) / (1 - a))
            m = c1 * MU * (1 - k * math.sqrt(a)) + (c1 * k + c2) * m
            V = (c1 * k + c2) ** 2 * V + sigma2
        else:
            ap = abar[tn]
            sigma2 = eta**2 * (1 - ap) / (1 - a) * (1 - a / ap)
            g = math.sqrt(ap) * k + math.sqrt(max(1 - ap - sigma2, 0.0)) * math.sqrt(1 - a) / v
            m = math.sqrt(ap) * MU + g * (m - math.sqrt(a) * MU)
            V = g * g * V + (sigma2 if tn > 0 else 0.0)
    return m, V


# 64 images of 64x64 iid pixels: 262,144 draws from the sampler's marginal per run.
N_IMG, SHAPE = 64, (1, 64, 64)


# The exact laws (variance / s²), which say how far each discretisation is from the data:
#   ancestral fixedlarge 1.0075, fixedsmall 0.970 (docs/MATH.md: σ² = β suits spread-out data);
#   DDIM η=0: 50 uniform steps 0.814, 50 trailing 0.800, 100 uniform 0.902, 1000 steps 0.988,
#   10 quad 0.676; DDIM η=1: 50 uniform 0.678, 1000 steps 0.970 (= ancestral with σ² = β̃).
# DDIM shrinks the variance of this narrow (s = 0.25) Gaussian with few steps: each deterministic
# step rotates (√ᾱ s, √(1−ᾱ)) by a finite angle and keeps only cos² of the variance. The means
# are right to 1e-3 in every case.
@pytest.mark.parametrize("sampler, steps, eta, spacing, var_type", [
    ("ancestral", None, None, None, "fixedlarge"),
    ("ancestral", None, None, None, "fixedsmall"),
    ("ddim", 50, 0.0, "uniform", "fixedlarge"),
    ("ddim", 50, 1.0, "uniform", "fixedlarge"),
    ("ddim", 50, 0.0, "trailing", "fixedlarge"),
    ("ddim", 10, 0.0, "quad", "fixedlarge"),
])
def test_samplers_with_the_oracle_follow_the_exact_law(sampler, steps, eta, spacing, var_type):
    d = GaussianDiffusion(BETAS, var_type=var_type)
    if sampler == "ancestral":
        opts, ts = dict(sampler=sampler), range(1000, -1, -1)
    else:
        opts, ts = dict(sampler=sampler, steps=steps, eta=eta, spacing=spacing), ddim_timesteps(1000, steps, spacing)
    m, V = exact_law(ts, sampler, eta, var_type)
    x = sample(oracle_for(BETAS), d, SHAPE, Images(11, range(N_IMG)), device="cpu",
               sampler=SamplerSpec(clip_denoised=False, **opts))
    assert_follows_law(x, m, V, f"{sampler} {steps} η={eta} {spacing} {var_type}")  # 0.28 % on the variance
    if (sampler, var_type) == ("ancestral", "fixedlarge"):  # the paper's sampler reproduces the data
        assert abs(V / S**2 - 1) < 0.01


def test_ddim_eta_1_on_every_step_is_ancestral_sampling_with_posterior_variance():
    # Song et al. (2021): η = 1 over all T steps is DDPM with σ_t² = β̃_t (var_type fixedsmall).
    betas = make_betas("linear", 50, 1e-3, 0.3)
    d, model = GaussianDiffusion(betas, var_type="fixedsmall"), oracle_for(betas)
    x_T = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ts = range(50, -1, -1)
    a = d.reverse_loop(model, x_T, ts, d.ddim(1.0), noise_fn=ImageNoise(5, range(3), "cpu", torch.float64))
    b = d.reverse_loop(model, x_T, ts, d.ancestral(), noise_fn=ImageNoise(5, range(3), "cpu", torch.float64))
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_ddim_eta_0_is_deterministic_given_x_T(paper_diffusion):
    model = oracle_for(BETAS)
    x_T = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ts = ddim_timesteps(1000, 20)
    outs = [paper_diffusion.reverse_loop(model, x_T, ts, paper_diffusion.ddim(0.0),
                                         noise_fn=ImageNoise(seed, range(4), "cpu")) for seed in (1, 2)]
    assert torch.equal(outs[0], outs[1])
    # ... while η = 1 uses its noise
    a, b = (paper_diffusion.reverse_loop(model, x_T, ts, paper_diffusion.ddim(1.0), noise_fn=ImageNoise(seed, range(4), "cpu"))
            for seed in (1, 2))
    assert not torch.equal(a, b)


def test_image_i_depends_only_on_seed_and_i():
    d, model = GaussianDiffusion(BETAS[::50] * 50), oracle_for(BETAS[::50] * 50)  # 20 steps will do
    whole = sample(model, d, SHAPE, Images(3, range(6)), device="cpu")
    parts = torch.cat([sample(model, d, SHAPE, Images(3, [5, 2]), device="cpu")[[1, 0]],
                       sample(model, d, SHAPE, Images(3, [0, 1, 3, 4]), device="cpu")])
    assert torch.equal(whole[[2, 5, 0, 1, 3, 4]], parts)


def test_noise_drawn_ahead_on_a_thread_gives_the_same_samples():
    # CUDA's default (the per-image generators run on a background thread, ahead of the network),
    # forced on here for the CPU: the same numbers in the same order, so the same images.
    betas = BETAS[::50] * 50
    d, model = GaussianDiffusion(betas), oracle_for(betas)
    for sampler in ("ancestral", "ddim"):
        a, b = (sample(model, d, SHAPE, Images(6, range(3)), device="cpu", sampler=SamplerSpec(sampler, steps=5, eta=1.0),
                       loop=Loop(prefetch_noise=p)) for p in (False, True))
        assert torch.equal(a, b), sampler


# ---------------------------------------------------------------- partial chains
def test_denoising_from_t0_is_the_identity(paper_diffusion):
    x0 = torch.rand(2, *SHAPE) * 2 - 1
    calls = []
    model = lambda x, t: calls.append(1) or torch.zeros_like(x)
    assert torch.equal(paper_diffusion.p_sample_loop(model, x_t=x0, t=0, noise_fn=ImageNoise(0, range(2), "cpu")), x0)
    assert not calls
    with pytest.raises(UserError, match="from 0"):
        paper_diffusion.p_sample_loop(model, x_t=x0, t=1001)


def test_denoising_from_T_is_algorithm_2():
    betas = BETAS[::50] * 50
    d, model = GaussianDiffusion(betas), oracle_for(betas)
    noise = ImageNoise(4, range(3), "cpu")
    x_T = noise(torch.Size((3, *SHAPE)))
    assert torch.equal(d.p_sample_loop(model, x_t=x_T, t=20, noise_fn=noise), sample(model, d, SHAPE, Images(4, range(3)), device="cpu"))


# ---------------------------------------------------------------- sample sets on disk
class Counting:
    """A cheap deterministic stand-in for a network, counting its calls (images seen)."""

    def __init__(self):
        self.images = 0

    def __call__(self, x, t):
        self.images += x.shape[0]
        return 0.3 * torch.tanh(x) + 0.01 * t.view(-1, 1, 1, 1).to(x)


D20 = GaussianDiffusion(make_betas("linear", 20, 1e-3, 0.2))
SMALL = (3, 8, 8)


def _pngs(d):
    return sorted(p.name for p in Path(d).glob("*.png") if p.name != "grid.png")


def test_sample_to_dir_is_independent_of_batch_size_and_resumes(tmp_path):
    m = Counting()
    a = sample_to_dir(m, D20, tmp_path / "a", SampleSet(SMALL, 10, 7, 3), progress=False)
    assert a["generated"] == 10 and m.images == 10 * 20
    sample_to_dir(Counting(), D20, tmp_path / "b", SampleSet(SMALL, 10, 7, 4), progress=False)
    assert _pngs(tmp_path / "a") == _pngs(tmp_path / "b") == [f"{i:06d}.png" for i in range(10)]
    za, zb = np.load(tmp_path / "a" / "samples.npz"), np.load(tmp_path / "b" / "samples.npz")
    assert za["x"].dtype == np.uint8 and za["x"].shape == (10, 8, 8, 3)
    assert np.array_equal(za["x"], zb["x"]) and np.array_equal(za["indices"], np.arange(10))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / "000004.png")), za["x"][4])
    assert Image.open(tmp_path / "a" / "grid.png").size[0] > 8 * 8

    # A rerun skips what exists: remove two files, break a third; only those three are drawn again.
    (tmp_path / "a" / "000002.png").unlink()
    (tmp_path / "a" / "000009.png").unlink()
    (tmp_path / "a" / "000005.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    m = Counting()
    res = sample_to_dir(m, D20, tmp_path / "a", SampleSet(SMALL, 12, 7, 5), progress=False)
    assert res["generated"] == 5 and res["skipped"] == 7 and m.images == 5 * 20  # 2, 5, 9, 10, 11
    z = np.load(tmp_path / "a" / "samples.npz")
    assert np.array_equal(z["x"][:10], zb["x"])

    m = Counting()
    assert sample_to_dir(m, D20, tmp_path / "a", SampleSet(SMALL, 12, 7, 5), progress=False)["generated"] == 0
    assert m.images == 0


def test_sample_to_dir_refuses_to_mix_settings(tmp_path):
    sample_to_dir(Counting(), D20, tmp_path, SampleSet(SMALL, 2, 1, 2), progress=False)
    with pytest.raises(UserError, match="seed=1"):
        sample_to_dir(Counting(), D20, tmp_path, SampleSet(SMALL, 2, 2, 2), progress=False)
    with pytest.raises(UserError, match="sampler"):
        sample_to_dir(Counting(), D20, tmp_path, SampleSet(SMALL, 2, 1, 2), progress=False, sampler=SamplerSpec("ddim", steps=5))


def test_ddim_sample_set_and_bad_options(tmp_path):
    m = Counting()
    sample_to_dir(m, D20, tmp_path, SampleSet(SMALL, 3, 0, 3), progress=False, sampler=SamplerSpec("ddim", steps=5))
    assert m.images == 3 * 5
    with pytest.raises(UserError, match="between 1 and T"):
        sample_to_dir(m, D20, tmp_path / "x", SampleSet(SMALL, 3, 0, 3), progress=False, sampler=SamplerSpec("ddim", steps=50))
    with pytest.raises(UserError, match="sampler"):
        sample_to_dir(m, D20, tmp_path / "y", SampleSet(SMALL, 3, 0, 3), progress=False, sampler=SamplerSpec("euler"))
    with pytest.raises(UserError, match="n=0"):
        sample_to_dir(m, D20, tmp_path / "z", SampleSet(SMALL, 0, 0, 3), progress=False)


def test_shards_cover_every_index_once():
    todo = [0, 3, 4, 5, 9, 10, 11]
    for world in (1, 2, 3, 8):
        got = sorted(i for r in range(world) for i in shard(todo, r, world))
        assert got == todo


_RANK_SCRIPT = textwrap.dedent("""
    import sys, torch
    from ddpm import GaussianDiffusion, make_betas
    from ddpm.io.distributed import init
    from ddpm.workflows.sample import SampleSet, sample_to_dir
    calls = []
    def model(x, t):
        calls.append(x.shape[0])
        return 0.3 * torch.tanh(x) + 0.01 * t.view(-1, 1, 1, 1).to(x)
    d = GaussianDiffusion(make_betas("linear", 20, 1e-3, 0.2))
    info = init("cpu")
    sample_to_dir(model, d, sys.argv[1], SampleSet((3, 8, 8), 11, 7, 2), dist=info, progress=False)
    open(f"{sys.argv[1]}.rank{info.rank}", "w").write(str(sum(calls) // 20))  # a file each: stdout may interleave
""")


@pytest.mark.slow
def test_torchrun_ranks_split_the_missing_indices(tmp_path):
    ref = tmp_path / "ref"
    sample_to_dir(Counting(), D20, ref, SampleSet(SMALL, 11, 7, 5), progress=False)
    out = tmp_path / "two"
    sample_to_dir(Counting(), D20, out, SampleSet(SMALL, 3, 7, 3), progress=False)  # 0, 1, 2 already there
    script = tmp_path / "rank.py"
    script.write_text(_RANK_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(out)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    drew = sorted(int(Path(f"{out}.rank{r}").read_text()) for r in range(2))
    assert drew == [4, 4]  # the 8 missing indices, 4 each
    assert _pngs(out) == _pngs(ref)
    assert np.array_equal(np.load(out / "samples.npz")["x"], np.load(ref / "samples.npz")["x"])
