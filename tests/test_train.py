"""Training: resume equals no interruption, DDP equals one process, the recipe's definitions."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.io.prepared import cache_root
from ddpm.io.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from ddpm.io.distributed import DistInfo
from ddpm.errors import UserError
from ddpm.run.config import RunConfig, TrainConfig
from ddpm.workflows.train import DataOrder, TrainingDiverged, lr_at, train
from helpers import assert_states_equal

PY = sys.executable
pytestmark = pytest.mark.usefixtures("one_thread")  # in-process references run like the subprocesses: 1 thread


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    # 24 small grayscale images: a bright square at a random place on a dark background.
    rng = np.random.default_rng(0)
    x = np.full((24, 32, 32), 20, np.uint8)
    for i in range(24):
        r, c = rng.integers(0, 24, 2)
        x[i, r:r + 8, c:c + 8] = 230
    p = tmp_path_factory.mktemp("data") / "squares.npz"
    np.savez(p, x=x)
    return p


def _cmd(npz, out, steps, *extra):
    return [PY, "-m", "ddpm", "train", "--preset", "tiny", "--data", str(npz), "--out", str(out),
            "--steps", str(steps), "--checkpoint-every", "2", "--no-progress", *extra]


def _env():
    # one thread per process: bitwise reproducibility across processes needs the same reduction order
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _final_state(run_dir):
    path, state = latest_checkpoint(run_dir)
    return state


@pytest.mark.slow
def test_kill_9_and_resume_equals_an_uninterrupted_run(npz, tmp_path):
    steps = 8
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    train(ref, _tiny(npz, steps=steps, checkpoint_every=2), progress=False)  # what _cmd asks the CLI for, here
    # SIGKILL in the middle of step 6 (tests/kill_at.py: the process kills itself there), with the
    # checkpoints of steps 2 and 4 on disk
    args = _cmd(npz, killed, steps)[3:]  # what follows `python -m ddpm`
    r = subprocess.run([PY, str(Path(__file__).with_name("kill_at.py")), "step", "6", "--", *args], env=_env(),
                       capture_output=True)
    assert r.returncode == -signal.SIGKILL
    assert [s for s, _ in list_checkpoints(killed)] == [2, 4]
    r = subprocess.run(_cmd(npz, killed, steps), env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "resuming" in r.stderr and "ckpt-00000004" in r.stderr
    assert_states_equal(_final_state(ref), _final_state(killed))
    # the metrics log holds each logged step once, as if nothing happened
    steps_logged = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged == sorted(set(steps_logged))


@pytest.mark.slow
def test_two_nodes_on_a_shared_folder_equal_one_process(npz, tmp_path):
    """torchrun on two "nodes" (one process each, a local rendezvous) training from a folder of PNG
    files on a shared file system: each node's first process prepares it into the shared cache
    (one waits for the other), and the run equals one process trained on the same pixels in memory.
    The nodes also split their share of 4 images into micro-batches of 3 and 1 (one all-reduce)."""
    one, two, pngs = tmp_path / "one", tmp_path / "two", tmp_path / "pngs"
    with np.load(npz) as z:
        for i, a in enumerate(z["x"]):
            (pngs / f"{i % 2}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(a).save(pngs / f"{i % 2}" / f"{i:02d}.png")
    order = sorted(range(24), key=lambda i: (i % 2, i))  # the folder's order: 0/00, 0/02, …, 1/01, …
    with np.load(npz) as z:
        np.savez(tmp_path / "same.npz", x=z["x"][order])
    steps = 3
    train(one, _tiny(tmp_path / "same.npz", steps=steps, checkpoint_every=2), progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [subprocess.Popen([PY, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               f"--node_rank={r}", "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "ddpm",
                               "train", "--preset", "tiny", "--data", str(pngs), "--out", str(two), "--steps",
                               str(steps), "--checkpoint-every", "2", "--no-progress", "--set", "train.microbatch=3"],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
    a, b = _final_state(one), _final_state(two)
    worst = max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])
    print(f"max |θ_1proc − θ_2nodes| after {steps} steps: {worst:.3e}")
    assert worst < 5e-5  # measured 5.0e-6: Adam's first steps are sign-like and amplify rounding
    assert any(not torch.equal(a["model"][k], load_checkpoint(list_checkpoints(one)[0][1])["model"][k]) for k in a["model"])
    assert set(b["rng"]) == {"rank0", "rank1"}  # every rank's RNG state is in the checkpoint
    assert a["data"]["sha256"] == b["data"]["sha256"]  # the same pixels, memory-mapped from the cache
    assert len([d for d in cache_root().iterdir() if (d / "manifest.json").is_file()]) >= 1


def _tiny(npz, **train):
    run = RunConfig.from_preset("tiny", data=str(npz))
    return run.replace(train=run.train.replace(**train))


def test_resume_with_importance_sampling_and_min_snr_equals_an_uninterrupted_run(npz, tmp_path):
    """t_sampling=importance and loss_weight=min_snr:5 (T = 8, batch 8): stopped at step 20, after
    importance sampling has begun (every t has 10 losses), and resumed to 28, the run ends bitwise
    where one that was never stopped does; the loss history comes back from the checkpoint."""
    sets = ["diffusion.T=8", "train.t_sampling=importance", "train.loss_weight=min_snr:5"]
    ref, stopped = tmp_path / "ref", tmp_path / "stopped"
    train(ref, _tiny(npz, steps=28, checkpoint_every=4).with_overrides(sets), progress=False)
    train(stopped, _tiny(npz, steps=20, checkpoint_every=4).with_overrides(sets), progress=False)
    assert (_final_state(stopped)["t_sampler"]["counts"][1:] >= 10).all()  # the resume draws t by importance
    train(stopped, _tiny(npz, steps=28, checkpoint_every=4).with_overrides(sets), progress=False)
    a, b = _final_state(ref), _final_state(stopped)
    assert_states_equal(a, b)
    for k in ("history", "counts"):
        assert torch.equal(a["t_sampler"][k], b["t_sampler"][k]), k
    with pytest.raises(UserError, match="train.t_sampling='importance', now 'uniform'"):  # another run, not a resume
        train(stopped, _tiny(npz, steps=32).with_overrides(sets[:1] + ["train.loss_weight=min_snr:5"]), progress=False)


def test_ema_follows_its_definition_and_is_never_swapped_in(npz, tmp_path):
    d = 0.7
    train(tmp_path, _tiny(npz, steps=3, checkpoint_every=1, keep_last=5, ema_decay=d), progress=False)
    (_, p2), (_, p3) = list_checkpoints(tmp_path)[1:3]
    s2, s3 = load_checkpoint(p2), load_checkpoint(p3)
    for k, v in s3["ema"].items():
        if v.is_floating_point():
            # ema_3 = d · ema_2 + (1 − d) · θ_3
            assert torch.allclose(v, d * s2["ema"][k] + (1 - d) * s3["model"][k], atol=1e-6), k
    assert any(not torch.equal(s3["ema"][k], s3["model"][k]) for k in s3["model"])


def test_warmup_is_linear_then_constant():
    cfg = TrainConfig(lr=2e-4, warmup=5000)
    assert lr_at(0, cfg) == pytest.approx(2e-4 / 5000)
    assert lr_at(2499, cfg) == pytest.approx(1e-4)
    assert lr_at(4999, cfg) == pytest.approx(2e-4) and lr_at(10**6, cfg) == 2e-4


def test_every_epoch_visits_every_image_once():
    order = DataOrder(n=10, batch=4, seed=3)
    seq = torch.cat([order.indices(s) for s in range(10)])  # 40 positions = 4 epochs
    for e in range(4):
        assert sorted(seq[10 * e: 10 * e + 10].tolist()) == list(range(10))
    assert not torch.equal(seq[:10], seq[10:20])  # epochs are reshuffled
    assert torch.equal(DataOrder(10, 4, 3).indices(7), order.indices(7))  # a pure function of the step


def test_divergence_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(npz, tmp_path):
    # An absurd learning rate blows the weights up within a few steps of Adam.
    run = _tiny(npz, steps=8, checkpoint_every=2, log_every=1, lr=1e30, warmup=0)
    with pytest.raises(TrainingDiverged) as e:
        train(tmp_path, run, progress=False)
    assert "NaN or infinite" in str(e.value) and "lower learning rate (--set train.lr=" in str(e.value)
    for _, p in list_checkpoints(tmp_path):  # whatever was written before is finite and loads
        assert all(torch.isfinite(t).all() for t in load_checkpoint(p)["model"].values())


def test_the_divergence_advice_can_be_followed(npz, tmp_path):
    # A good run to step 8, then a learning rate that blows it up: the advice is to resume from the
    # last good checkpoint with a lower rate, and doing exactly that finishes the run.
    train(tmp_path, _tiny(npz, steps=8, checkpoint_every=2, log_every=1), progress=False)
    with pytest.raises(TrainingDiverged) as e:
        train(tmp_path, _tiny(npz, steps=12, checkpoint_every=2, log_every=1, lr=1e30), progress=False)
    assert "ckpt-00000008.safetensors is intact" in str(e.value)
    advised = float(re.search(r"--set train.lr=([^)\s]+)", str(e.value)).group(1))
    assert advised < 1e30
    res = train(tmp_path, _tiny(npz, steps=12, checkpoint_every=2, log_every=1, lr=advised), progress=False)
    assert res["step"] == 12 and np.isfinite(res["loss"])
    history = json.loads((tmp_path / "config.json").read_text())["history"]
    lrs = [h["changed"]["train.lr"] for h in history if "train.lr" in h.get("changed", {})]
    assert lrs == [[1e-3, 1e30], [1e30, advised]] and history[-1]["step"] == 8


def test_the_advice_after_a_learning_rate_of_1_leads_to_a_finished_run(npz, tmp_path):
    # lr = 1 from step 0: here the newest checkpoint before the NaN already overflows, so the first
    # advice (resume with a lower rate) diverges again at once, and the second says to set that
    # checkpoint aside (how many rounds it takes can differ between CPUs). Following each message
    # as written finishes the run.
    lr, messages, res = 1.0, [], None
    for _ in range(4):
        try:
            res = train(tmp_path, _tiny(npz, steps=20, checkpoint_every=2, log_every=1, lr=lr), progress=False)
            break
        except TrainingDiverged as e:
            messages.append(str(e))
            aside = re.search(r"mkdir -p (\S+) && mv (\S+) (\S+)\)", str(e))
            if aside:
                Path(aside.group(1)).mkdir(parents=True, exist_ok=True)
                shutil.move(aside.group(2), aside.group(3))
            lr = float(re.search(r"--set train.lr=([^)\s]+)", str(e)).group(1))
    assert messages and "is intact" in messages[0], messages
    assert res is not None and res["step"] == 20, messages


def test_a_run_that_never_wrote_a_checkpoint_starts_again_with_other_values(npz, tmp_path):
    run_dir, ref = tmp_path / "run", tmp_path / "ref"
    with pytest.raises(TrainingDiverged, match="before any checkpoint"):
        train(run_dir, _tiny(npz, steps=6, checkpoint_every=100, log_every=1, lr=1e30, warmup=0), progress=False)
    train(run_dir, _tiny(npz, steps=6, seed=3), progress=False)  # another seed too: nothing to resume
    train(ref, _tiny(npz, steps=6, seed=3), progress=False)
    assert_states_equal(_final_state(run_dir), _final_state(ref))
    assert json.loads((run_dir / "config.json").read_text())["train"]["seed"] == 3


def test_a_changed_setting_is_refused_on_resume(npz, tmp_path):
    train(tmp_path, _tiny(npz, steps=2), progress=False)
    with pytest.raises(UserError, match=r"train.seed=0, now 1"):
        train(tmp_path, _tiny(npz, steps=4, seed=1), progress=False)
    train(tmp_path, _tiny(npz, steps=4), progress=False)  # more steps is fine
    assert latest_checkpoint(tmp_path)[1]["step"] == 4


def test_batch_must_divide_over_processes(npz, tmp_path):
    with pytest.raises(UserError, match="not divisible by the 3 processes"):
        train(tmp_path, _tiny(npz, batch_size=8), progress=False, dist=DistInfo(world_size=3))


def test_cli_prints_one_line_for_a_bad_setting(npz, tmp_path):
    r = subprocess.run(_cmd(npz, tmp_path, 2, "--set", "train.lr=-1"), env=_env(), capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("ddpm train: error: train.lr=-1.0 must be a positive number")
    assert "Traceback" not in r.stderr


def test_the_step_draws_are_the_same_at_any_world_size_and_follow_their_laws():
    """Algorithm 1's draws of a step (t, ε, the flips, the dropped labels) are those of the global
    batch, a function of (seed, step): the rows each of 2 or 4 processes takes, laid end to end,
    are world size 1's draws; and over many steps they follow their laws (t ~ U{1 … T}, a flip
    and a dropped label with probability 1/2, ε standard normal)."""
    from ddpm.workflows.train import draw_step

    B, shape, T, K, rate = 8, (1, 4, 4), 1000, 3, 0.5
    labels = torch.arange(B) % K
    one = draw_step(7, 11, (B, *shape), T, labels=labels, num_classes=K, label_dropout=rate)
    for world in (2, 4):
        local = B // world
        rows = [draw_step(7, 11, (B, *shape), T, labels=labels, num_classes=K, label_dropout=rate)
                .rank_share(r * local, (r + 1) * local, "cpu") for r in range(world)]
        for name in ("t", "noise", "flip", "y", "y_true"):
            assert torch.equal(torch.cat([getattr(p, name) for p in rows]), getattr(one, name)), (world, name)
    again = draw_step(7, 11, (B, *shape), T, labels=labels, num_classes=K, label_dropout=rate)
    assert torch.equal(again.noise, one.noise) and not torch.equal(draw_step(7, 12, (B, *shape), T).noise, one.noise)
    steps = [draw_step(0, s, (B, *shape), T, labels=labels, num_classes=K, label_dropout=rate) for s in range(500)]
    t = torch.cat([d.t for d in steps]).double()
    n = len(t)  # 4,000 draws: each mean within 4 standard errors of its law's
    assert t.min() >= 1 and t.max() <= T and abs(t.mean() - (T + 1) / 2) < 4 * ((T * T - 1) / 12 / n) ** 0.5
    for share in (torch.cat([d.flip for d in steps]).double().mean(), torch.cat([d.y == K for d in steps]).double().mean()):
        assert abs(share - 0.5) < 4 * (0.25 / n) ** 0.5
    kept = torch.cat([d.y[d.y != K] == d.y_true[d.y != K] for d in steps])
    assert kept.all()  # a label not dropped is the true one
    eps = torch.cat([d.noise.flatten() for d in steps]).double()
    assert abs(eps.mean()) < 4 / len(eps) ** 0.5 and abs(eps.var() - 1) < 4 * (2 / len(eps)) ** 0.5
