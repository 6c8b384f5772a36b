"""Fault injection on real processes: SIGKILL at random moments and mid-write, a dying rank."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.io.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint

PY = sys.executable


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (16, 32, 32), dtype=np.uint8)
    p = tmp_path_factory.mktemp("data") / "noise.npz"
    np.savez(p, x=x)
    return p


def _cmd(npz, out, steps):
    return [PY, "-m", "ddpm", "train", "--preset", "tiny", "--data", str(npz), "--out", str(out), "--steps", str(steps),
            "--checkpoint-every", "1", "--set", "train.keep_last=2", "--no-progress"]


ENV = dict(os.environ, OMP_NUM_THREADS="1")


def _temp_files(d: Path):
    return [p for p in d.glob(".tmp-*")] if d.exists() else []


@pytest.mark.slow
def test_ten_sigkills_in_a_row_including_mid_write_lose_nothing(npz, tmp_path):
    steps = 14
    ref, run = tmp_path / "ref", tmp_path / "run"
    subprocess.run(_cmd(npz, ref, steps), check=True, env=ENV, capture_output=True)
    rnd = random.Random(0)
    mid_write_kills = 0
    for i in range(10):
        before = max((s for s, _ in list_checkpoints(run)), default=0)
        proc = subprocess.Popen(_cmd(npz, run, steps), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if i % 2 == 0:
            # aim at a checkpoint being written: kill the moment a temp file appears
            deadline = time.time() + 60
            while time.time() < deadline and proc.poll() is None and not _temp_files(run):
                time.sleep(0.0005)
            mid_write_kills += bool(_temp_files(run))
        else:
            time.sleep(rnd.uniform(0.5, 4.0))
        proc.kill()
        proc.wait()
        # whatever is on disk now is either complete and verified, or not a checkpoint at all
        found = latest_checkpoint(run)
        if found:
            assert found[1]["step"] >= before
    assert mid_write_kills >= 1, "no kill landed during a checkpoint write"
    r = subprocess.run(_cmd(npz, run, steps), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = latest_checkpoint(ref)[1], latest_checkpoint(run)[1]
    assert a["step"] == b["step"] == steps
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    print(f"10 kills ({mid_write_kills} during a checkpoint write): final weights bitwise equal")


@pytest.mark.slow
def test_a_dying_rank_stops_the_others_and_the_run_resumes(npz, tmp_path):
    run = tmp_path / "run"
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ddpm", "train", "--preset",
           "tiny", "--data", str(npz), "--out", str(run), "--steps", "400", "--checkpoint-every", "2", "--no-progress"]
    env = dict(ENV, DDPM_DIST_TIMEOUT="30")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list_checkpoints(run):
        time.sleep(0.1)
    assert list_checkpoints(run), "training never wrote a checkpoint"
    # find rank 1 (a child of the torchrun agent whose environment says RANK=1) and kill it
    victim = None
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"RANK=1" in environ and f"TORCHELASTIC_RUN_ID".encode() in b"".join(environ) and str(run).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                victim = int(pid)
    assert victim is not None
    t0 = time.time()
    os.kill(victim, signal.SIGKILL)
    try:
        rc = proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the surviving rank did not exit within 90 s")
    took = time.time() - t0
    print(f"torchrun exited {rc} {took:.1f} s after rank 1 was killed")
    assert rc != 0
    # the same command resumes (a shorter run: the test only needs to see it continue)
    done = max(s for s, _ in list_checkpoints(run))
    cmd[cmd.index("400")] = str(done + 2)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert latest_checkpoint(run)[1]["step"] == done + 2


@pytest.fixture(scope="module")
def sampled_run(tmp_path_factory, npz):
    from ddpm.run.config import RunConfig
    from ddpm.workflows.train import train

    root = tmp_path_factory.mktemp("run")
    run = RunConfig.from_preset("tiny", data=str(npz))
    run = run.replace(model=run.model.replace(resolution=16), data=run.data.replace(resolution=16),
                      diffusion=run.diffusion.replace(T=200), train=run.train.replace(steps=2, checkpoint_every=2))
    train(root, run, progress=False)
    return root


def _kill_when(proc, ready, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.01)
    proc.kill()
    proc.wait()


@pytest.mark.slow
def test_sampling_killed_half_way_resumes_without_redoing_work(sampled_run, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "out"
    base = [PY, "-m", "ddpm", "sample", "--run", str(sampled_run), "--n", "12", "--batch", "2", "--seed", "3", "--no-progress"]
    subprocess.run(base + ["--out", str(ref)], check=True, env=ENV, capture_output=True)
    proc = subprocess.Popen(base + ["--out", str(out)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_when(proc, lambda: len(list(out.glob("0*.png"))) >= 4)
    done = len(list(out.glob("0*.png")))
    assert 4 <= done < 12, done
    r = subprocess.run(base + ["--out", str(out)], env=ENV, capture_output=True, text=True)
    assert r.returncode == 0 and f"sampled {12 - done} images ({done} already there)" in r.stdout, r.stdout + r.stderr
    assert np.array_equal(np.load(ref / "samples.npz")["x"], np.load(out / "samples.npz")["x"])


@pytest.mark.slow
def test_nll_killed_half_way_resumes_without_redoing_work(sampled_run, npz, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "out"
    base = [PY, "-m", "ddpm", "nll", "--run", str(sampled_run), "--data", str(npz), "--split", "train", "--n", "8",
            "--batch", "2", "--no-progress"]
    subprocess.run(base + ["--out", str(ref)], check=True, env=ENV, capture_output=True)
    proc = subprocess.Popen(base + ["--out", str(out)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_when(proc, lambda: len(list((out / "parts").glob("batch-*.npz"))) >= 1 if (out / "parts").exists() else False)
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "parts").glob("batch-*.npz")}
    assert 1 <= len(kept) < 4, kept
    r = subprocess.run(base + ["--out", str(out)], env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert all((out / "parts" / name).stat().st_mtime_ns == t for name, t in kept.items())  # finished batches not redone
    a = json.loads((ref / "summary.json").read_text())
    b = json.loads((out / "summary.json").read_text())
    assert a["total_bpd"] == b["total_bpd"] and a["n"] == b["n"] == 8
