"""Fault injection on real processes: SIGKILL at chosen moments, mid-write among them, and a dying rank.

Each kill lands where the test says (tests/kill_at.py kills the process from inside, at a given
step or point of a file write), so no assert depends on how fast a loaded machine runs.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.io.atomic import TEMP_PREFIX
from ddpm.io.checkpoint import latest_checkpoint, list_checkpoints
from ddpm.run.config import resolve_run_config
from ddpm.run.load import ModelSpec
from ddpm.workflows.nll import nll_run
from ddpm.workflows.sample import sample_run
from ddpm.workflows.train import train
from helpers import noise_npz

pytestmark = pytest.mark.usefixtures("one_thread")  # the references run here, like the subprocesses: 1 thread

PY = sys.executable
KILL_AT = str(Path(__file__).with_name("kill_at.py"))
SIGKILL_RC = -9


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    return noise_npz(tmp_path_factory.mktemp("data"), (16, 32, 32), seed=1)


def _args(npz, out, steps):
    return ["train", "--preset", "tiny", "--data", str(npz), "--out", str(out), "--steps", str(steps),
            "--checkpoint-every", "1", "--set", "train.keep_last=2", "--no-progress"]


ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _killed(point: str, n: int, args, env=ENV, rank=None):
    """Run `ddpm ARGS` until kill_at.py SIGKILLs it at (point, n); return the exit status."""
    extra = ["--rank", str(rank)] if rank is not None else []
    return subprocess.run([PY, KILL_AT, point, str(n), *extra, "--", *args], env=env, capture_output=True).returncode


def _temp_files(d: Path):
    return [p for p in d.glob(TEMP_PREFIX + "*")] if d.exists() else []


@pytest.mark.slow
def test_sigkills_mid_write_lose_nothing(npz, tmp_path):
    # (A kill in the middle of a step: tests/test_train.py::test_kill_9_and_resume_equals_an_uninterrupted_run.)
    steps = 6
    ref, run = tmp_path / "ref", tmp_path / "run"
    train(ref, resolve_run_config("tiny", data=str(npz), flags=dict(steps=steps, checkpoint_every=1),
                                  sets=["train.keep_last=2"]), progress=False)  # what _args asks the CLI for
    # Kills in a row, each resumed by the same command: while a checkpoint's bytes are half written,
    # and when a checkpoint is complete but not yet in place. What is on disk after each is complete
    # and verified, or not a checkpoint.
    for point, n, left_temp in [("ckpt-half", 3, True), ("ckpt-whole", 1, True)]:
        before = max((s for s, _ in list_checkpoints(run)), default=0)
        temps = set(_temp_files(run))
        assert _killed(point, n, _args(npz, run, steps)) == SIGKILL_RC, point
        assert bool(set(_temp_files(run)) - temps) == left_temp, point  # the kill landed where it was aimed
        found = latest_checkpoint(run)
        assert found is not None and found[1]["step"] >= before, point
    r = subprocess.run([PY, "-m", "ddpm", *_args(npz, run, steps)], env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = latest_checkpoint(ref)[1], latest_checkpoint(run)[1]
    assert a["step"] == b["step"] == steps
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)


@pytest.mark.slow
def test_a_dying_rank_stops_the_others_and_the_run_resumes(npz, tmp_path):
    run = tmp_path / "run"
    torchrun = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    args = ["train", "--preset", "tiny", "--data", str(npz), "--out", str(run), "--steps", "4", "--checkpoint-every", "2",
            "--no-progress"]
    env = dict(ENV, DDPM_DIST_TIMEOUT="30")
    # rank 1 dies (SIGKILL) in its 3rd step, after the checkpoint of step 2
    r = subprocess.run([*torchrun, KILL_AT, "step", "3", "--rank", "1", "--", *args], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0
    assert [s for s, _ in list_checkpoints(run)] == [2]
    # the same command resumes
    r = subprocess.run([*torchrun, "-m", "ddpm", *args], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert latest_checkpoint(run)[1]["step"] == 4


@pytest.fixture(scope="module")
def sampled_run(tmp_path_factory, npz):
    from ddpm.run.config import RunConfig
    from ddpm.workflows.train import train

    root = tmp_path_factory.mktemp("run")
    run = RunConfig.from_preset("tiny", data=str(npz))
    run = run.replace(model=run.model.replace(resolution=16), data=run.data.replace(resolution=16),
                      diffusion=run.diffusion.replace(T=50), train=run.train.replace(steps=2, checkpoint_every=2))
    train(root, run, progress=False)
    return root


@pytest.mark.slow
def test_sampling_killed_half_way_resumes_without_redoing_work(sampled_run, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "out"
    base = ["sample", "--run", str(sampled_run), "--n", "12", "--batch", "2", "--seed", "3", "--no-progress"]
    sample_run(ModelSpec(sampled_run), ref, 12, batch=2, seed=3, progress=False)  # the same, here
    assert _killed("png", 5, [*base, "--out", str(out)]) == SIGKILL_RC
    assert len(list(out.glob("0*.png"))) == 5
    r = subprocess.run([PY, "-m", "ddpm", *base, "--out", str(out)], env=ENV, capture_output=True, text=True)
    assert r.returncode == 0 and "sampled 7 images (5 already there)" in r.stdout, r.stdout + r.stderr
    assert np.array_equal(np.load(ref / "samples.npz")["x"], np.load(out / "samples.npz")["x"])


@pytest.mark.slow
def test_nll_killed_half_way_resumes_without_redoing_work(sampled_run, npz, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "out"
    base = ["nll", "--run", str(sampled_run), "--data", str(npz), "--split", "train", "--n", "8", "--batch", "2",
            "--no-progress"]
    nll_run(ModelSpec(sampled_run), str(npz), ref, split="train", n=8, batch=2, progress=False)  # the same, here
    assert _killed("part", 2, [*base, "--out", str(out)]) == SIGKILL_RC
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "parts").glob("batch-*.npz")}
    assert len(kept) == 2
    r = subprocess.run([PY, "-m", "ddpm", *base, "--out", str(out)], env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert all((out / "parts" / name).stat().st_mtime_ns == t for name, t in kept.items())  # finished batches not redone
    a = json.loads((ref / "summary.json").read_text())
    b = json.loads((out / "summary.json").read_text())
    assert a["total_bpd"] == b["total_bpd"] and a["n"] == b["n"] == 8
