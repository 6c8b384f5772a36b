"""Post-hoc EMA (Karras et al. 2024, EDM2 § 3 and App. C) and the paper's EMA with a warm-up.

The references are written here from the definitions: the power-function profile
p(τ) = (γ+1) τ^γ / t^(γ+1) on [0, t], its relative width σ_rel = √((γ+1) / ((γ+2)²(γ+3))) (EDM2
§ 3), EDM2's published pairs (σ_rel 0.05 ↔ γ 16.97, 0.10 ↔ γ 6.94), and averages computed
directly over a synthetic sequence of "weights" (a scalar random walk), never ddpm's output.
"""

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.errors import UserError
from ddpm.io.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, load_snapshot, load_weights
from ddpm.process.ema import (ema_decay_at, gamma_to_sigma_rel, phema_coefficients, power_ema_beta, profile_error,
                              sigma_rel_to_gamma)
from ddpm.run.config import RunConfig
from ddpm.run.load import load_run
from ddpm.run.phema import PowerEMAs, list_snapshots, reconstruct
from ddpm.workflows.train import train
from helpers import noise_npz

PY = sys.executable
pytestmark = pytest.mark.usefixtures("one_thread")


def width(gamma):
    """σ_rel of the profile of exponent γ: the standard deviation of τ/t when τ/t ~ Beta(γ+1, 1)."""
    a = gamma + 1.0
    return math.sqrt(a / ((a + 1) ** 2 * (a + 2)))


def direct_average(theta: np.ndarray, t: int, gamma: float) -> float:
    """The power-function average at step t of θ_1 … θ_t, θ held constant on (τ−1, τ]: each θ_τ
    weighted by ∫_{τ−1}^{τ} p(s) ds, the integral taken numerically (Simpson, 64 panels a step)."""
    total = 0.0
    for tau in range(1, t + 1):
        s = np.linspace(tau - 1, tau, 129)
        p = (gamma + 1) * (s / t) ** gamma / t
        w = (s[1] - s[0]) / 3 * (p[0] + p[-1] + 4 * p[1:-1:2].sum() + 2 * p[2:-1:2].sum())
        total += w * theta[tau - 1]
    return total


# ---------------------------------------------------------------------------------------------
# The arithmetic (process/ema.py)

def test_widths_and_exponents_are_edm2s():
    # EDM2 § 3: "σ_rel = 0.05 and 0.10, corresponding to γ = 16.97 and 6.94"
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.005)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.005)
    for g in (0.0, 0.5, 3.0, 6.94, 16.97, 50.0, 300.0):
        assert gamma_to_sigma_rel(g) == pytest.approx(width(g), rel=1e-12)
        assert sigma_rel_to_gamma(width(g)) == pytest.approx(g, rel=1e-9, abs=1e-9)
    assert sigma_rel_to_gamma(1 / math.sqrt(12)) == pytest.approx(0.0, abs=1e-9)  # the plain mean of every weight


@pytest.mark.parametrize("bad", [0.0, -0.1, 0.3, float("nan"), True])
def test_a_width_outside_the_family_is_one_line(bad):
    with pytest.raises(UserError, match=r"\(0, 0.2887\]"):
        sigma_rel_to_gamma(bad)


@pytest.mark.parametrize("gamma", [0.0, 6.94, 16.97])
def test_the_tracked_recursion_is_the_power_function_profile(gamma):
    """θ̂_t = β_t θ̂_{t−1} + (1 − β_t) θ_t with β_t = (1 − 1/t)^(γ+1), run by PowerEMAs on a one-number
    "network", equals the profile's average computed by quadrature."""
    theta = np.cumsum(np.random.default_rng(1).standard_normal(300))
    net = torch.nn.Linear(1, 1, bias=False).double()
    ema = PowerEMAs(net, [width(gamma)])
    for t, v in enumerate(theta, start=1):
        with torch.no_grad():
            net.weight.fill_(v)
        ema.update(list(net.parameters()), t)
    assert ema.averages[0][0].item() == pytest.approx(direct_average(theta, len(theta), gamma), abs=1e-9)
    assert power_ema_beta(gamma, 1) == 0.0  # the initial weights carry no weight


def _tracked(theta: np.ndarray, every: int, widths=(0.05, 0.10)):
    """Snapshots (step, γ) and their values: the tracked averages of θ every `every` steps."""
    profiles, values = [], []
    for t in range(every, len(theta) + 1, every):
        for s in widths:
            g = sigma_rel_to_gamma(s)
            profiles.append((t, g))
            values.append(direct_average(theta, t, g))
    return profiles, np.array(values)


def test_an_untracked_width_is_reconstructed_from_the_snapshots():
    """A random walk of 2,000 steps, snapshots of the widths 0.05 and 0.10 every 100 steps: the
    average of an untracked width, made from the snapshots alone, equals the one computed directly
    over the walk. The error is measured against the spread of the walk over the averaging window
    (its last 3·σ_rel·t steps). Measured: 0.026%, 0.020% and 0.078% of that spread for 0.04, 0.07
    and 0.15 (profiles matched within 0.7% in L²); the tolerance is 1%. Tracked widths: exact."""
    theta = np.cumsum(np.random.default_rng(0).standard_normal(2000))
    profiles, values = _tracked(theta, 100)
    t = len(theta)
    for s in (0.05, 0.10):  # a tracked width reconstructs itself
        x = phema_coefficients(profiles, t, sigma_rel_to_gamma(s))
        assert x @ values == pytest.approx(direct_average(theta, t, sigma_rel_to_gamma(s)), abs=1e-9)
        assert profile_error(profiles, x, t, sigma_rel_to_gamma(s)) < 1e-6
    for s in (0.04, 0.07, 0.15):
        g = sigma_rel_to_gamma(s)
        x = phema_coefficients(profiles, t, g)
        exact = direct_average(theta, t, g)
        spread = theta[int(t * (1 - 3 * s)):].std()
        err = abs(x @ values - exact)
        print(f"σ_rel {s}: reconstructed {x @ values:.4f}, direct {exact:.4f}, error {err:.2e} "
              f"= {100 * err / spread:.3f}% of the window's spread {spread:.2f}; profile L2 error "
              f"{100 * profile_error(profiles, x, t, g):.2f}%")
        assert err < 0.01 * spread
        # and the tracked values alone (the nearer snapshot, no combination) are much further off
        nearest = values[-2] if abs(s - 0.05) < abs(s - 0.10) else values[-1]
        assert abs(nearest - exact) > 5 * err


def test_the_warmup_decay_is_the_usual_formula():
    assert [ema_decay_at(0.9999, s, warmup=True) for s in (0, 1, 8, 100)] == \
        [pytest.approx(v) for v in (1 / 10, 2 / 11, 9 / 18, 101 / 110)]
    assert ema_decay_at(0.99, 10_000, warmup=True) == 0.99
    assert ema_decay_at(0.9999, 0) == 0.9999  # off: the paper's


# ---------------------------------------------------------------------------------------------
# Training, snapshots, weights (run/phema.py, workflows/train.py)

@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    return noise_npz(tmp_path_factory.mktemp("data"), (16, 16, 16), seed=0)


def _run(npz, **train_fields):
    run = RunConfig.from_preset("tiny", data=str(npz)).with_overrides(
        ["model.resolution=16", "data.resolution=16", "diffusion.T=20", "model.attn_resolutions=()"])
    return run.replace(train=run.train.replace(**train_fields))


def _cmd(npz, out, *extra):
    return [PY, "-m", "ddpm", "train", "--preset", "tiny", "--data", str(npz), "--out", str(out), "--no-progress",
            "--steps", "8", "--checkpoint-every", "4", "--set", "model.resolution=16", "--set", "data.resolution=16",
            "--set", "diffusion.T=20", "--set", "model.attn_resolutions=()", "--set", "train.phema_every=1", *extra]


def test_the_paper_ema_warmup_follows_its_definition(npz, tmp_path):
    train(tmp_path, _run(npz, steps=3, checkpoint_every=1, keep_last=5, ema_warmup=True), progress=False)
    s1, s2, s3 = (load_checkpoint(p) for _, p in list_checkpoints(tmp_path))
    for prev, cur, step in ((s1, s2, 1), (s2, s3, 2)):
        d = min(0.9, (1 + step) / (10 + step))  # the tiny preset's decay is 0.9
        for k, v in cur["ema"].items():
            assert torch.allclose(v, d * prev["ema"][k] + (1 - d) * cur["model"][k], atol=1e-6), k


def test_a_resumed_run_tracks_and_snapshots_as_an_uninterrupted_one(npz, tmp_path):
    """kill -9 in step 7, with checkpoints of steps 4 and snapshots of steps 1 … 6 on disk: the resumed
    run drops the snapshots after step 4 (and weights made from them), and its snapshots and
    tracked averages equal bit for bit
    those of a run that was never interrupted."""
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    env = dict(__import__("os").environ, OMP_NUM_THREADS="1")
    assert subprocess.run(_cmd(npz, ref), env=env, capture_output=True).returncode == 0
    r = subprocess.run([PY, str(Path(__file__).with_name("kill_at.py")), "step", "7", "--", *_cmd(npz, killed)[3:]],
                       env=env, capture_output=True)
    assert r.returncode == -signal.SIGKILL
    assert [s for s, _ in list_snapshots(killed)] == [1, 2, 3, 4, 5, 6]
    (made,) = reconstruct(killed, [0.07])  # weights made from snapshots that are about to be replaced
    r = subprocess.run(_cmd(npz, killed), env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "snapshots of steps 5, 6" in r.stderr and not made.path.exists()
    assert [s for s, _ in list_snapshots(ref)] == [s for s, _ in list_snapshots(killed)] == list(range(1, 9))
    for (_, a), (_, b) in zip(list_snapshots(ref), list_snapshots(killed)):
        sa, sb = load_snapshot(a), load_snapshot(b)
        for da, db in zip(sa["averages"], sb["averages"]):
            assert all(torch.equal(da[k], db[k]) for k in da)
    pa, pb = latest_checkpoint(ref)[1]["phema"], latest_checkpoint(killed)[1]["phema"]
    assert all(torch.equal(pa["averages"][i][k], pb["averages"][i][k]) for i in range(2) for k in pa["averages"][i])


def test_weights_of_any_width_every_command_takes(npz, tmp_path):
    """A run with snapshots every 2 steps: `reconstruct` of a tracked width at the last step is its
    tracked average; `load_run(--weights phema:W)` is the network with the reconstructed weights,
    named by the file's content hash; an untracked width is neither tracked average (a combination,
    not a copy)."""
    train(tmp_path, _run(npz, steps=6, checkpoint_every=3, phema_every=2, lr=1e-2), progress=False)
    assert [s for s, _ in list_snapshots(tmp_path)] == [2, 4, 6]
    last = load_snapshot(list_snapshots(tmp_path)[-1][1])
    (tracked,) = reconstruct(tmp_path, [0.10])
    sd, config = load_weights(tracked.path)
    assert config["phema"]["snapshots"] == 3 and config["model"] == last["config"]["model"]
    for k, v in sd.items():
        assert torch.allclose(v, last["averages"][1][k], atol=1e-6), k
    loaded = load_run(tmp_path, "phema:0.07")
    assert loaded.weights == "phema:0.070@6" and loaded.checkpoint.name == "phema-0.070-00000006.safetensors"
    assert loaded.tag.startswith("sha256:") and "[phema:0.070@6]" in loaded.tag
    assert load_run(tmp_path, "phema:0.07@4").checkpoint.name == "phema-0.070-00000004.safetensors"
    (near,) = reconstruct(tmp_path, [0.0704])  # a width is what its file name says, no more
    assert near.sigma_rel == 0.07 and near.path == loaded.checkpoint
    a, b = last["averages"]
    net = dict(loaded.model.named_parameters())
    for k in a:
        assert not torch.equal(net[k], a[k]) and not torch.equal(net[k], b[k])


def test_phema_problems_are_one_line(npz, tmp_path):
    train(tmp_path / "plain", _run(npz, steps=2, checkpoint_every=2), progress=False)
    with pytest.raises(UserError, match="phema_every"):
        reconstruct(tmp_path / "plain", [0.05])
    train(tmp_path / "run", _run(npz, steps=4, checkpoint_every=2, phema_every=2), progress=False)
    with pytest.raises(UserError, match=r"no snapshot at step 3.*2, 4"):
        reconstruct(tmp_path / "run", [0.05], at=3)
    with pytest.raises(UserError, match="not a run directory"):
        load_run(list_checkpoints(tmp_path / "run")[-1][1], "phema:0.05")
    with pytest.raises(UserError, match="phema:WIDTH@STEP"):
        load_run(tmp_path / "run", "phema:wide")
    with pytest.raises(UserError, match="post-hoc EMA snapshot, not a model"):
        load_checkpoint(list_snapshots(tmp_path / "run")[-1][1])


def test_the_report_draws_fid_against_the_width_once_two_widths_are_measured(npz, tmp_path):
    from ddpm.workflows.report import write_report

    train(tmp_path, _run(npz, steps=2, checkpoint_every=2, phema_every=1), progress=False)

    def evaluated(folder, weights, checkpoint, fid):
        (tmp_path / "eval" / folder).mkdir(parents=True)
        (tmp_path / "eval" / folder / "eval.json").write_text(json.dumps(
            dict(weights=weights, checkpoint=str(checkpoint), n_samples=50, fid=dict(train=fid, test=None))))

    evaluated("ckpt-00000002-dpm++2m-20", "ema", tmp_path / "ckpt-00000002.safetensors", 30.0)
    evaluated("phema-0.050-00000002-dpm++2m-20", "phema:0.050@2", tmp_path / "phema/phema-0.050-00000002.safetensors", 20.0)
    caption = "Post-hoc EMA: FID against σ_rel at step 2"
    assert caption not in write_report(tmp_path).read_text()  # one width is no curve
    evaluated("phema-0.100-00000002-dpm++2m-20", "phema:0.100@2", tmp_path / "phema/phema-0.100-00000002.safetensors", 25.0)
    assert caption in write_report(tmp_path).read_text()


def test_a_dry_run_says_where_the_snapshots_go(npz, tmp_path):
    from ddpm.workflows.plan import plan_train

    assert not any("phema/snapshot" in line for line in plan_train(tmp_path / "a", _run(npz)))
    assert any("phema/snapshot-*.safetensors every 7 steps" in line and "0.05, 0.1" in line
               for line in plan_train(tmp_path / "b", _run(npz, phema_every=7)))
