"""Training that fits: micro-batches and activation checkpointing give the numbers of the plain
path (the reference is the same training without them), and they change only what is held."""

import copy
import json

import numpy as np
import pytest
import torch

from ddpm.io.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from ddpm.network.memory import set_checkpointing
from ddpm.network.unet import UNet, UNetConfig
from ddpm.process.diffusion import GaussianDiffusion
from ddpm.run.config import RunConfig
from ddpm.workflows.train import train
from helpers import active, assert_states_equal

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    x = np.random.default_rng(3).integers(0, 256, (12, 16, 16), dtype=np.uint8)
    p = tmp_path_factory.mktemp("data") / "d.npz"
    np.savez(p, x=x)
    return p


def _run(npz, **train_fields):
    run = RunConfig.from_preset("tiny", data=str(npz))
    model = run.model.replace(resolution=16, attn_resolutions=(8,), dropout=0.3)  # dropout: masks must replay
    return run.replace(model=model, data=run.data.replace(resolution=16),
                       train=run.train.replace(**dict(dict(steps=3, checkpoint_every=3, batch_size=4), **train_fields)))


def test_checkpointed_blocks_give_the_same_gradients_and_dropout_masks():
    cfg = UNetConfig(in_channels=1, out_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                     dropout=0.5, resolution=16)
    plain = active(UNet.from_config(cfg)).train()
    ckpt = copy.deepcopy(plain)
    # ResBlocks: 2 down + 2 x 2 up + 2 middle; attention: 1 down + 2 up at 8x8, 1 middle
    assert set_checkpointing(ckpt, True) == 2 + 4 + 2 + 3 + 1
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([1, 500, 1000])
    grads, saved = [], []
    for net in (plain, ckpt):
        torch.manual_seed(7)  # the same dropout masks on both sides, if they replay
        net.zero_grad()
        held = []  # what autograd keeps for the backward pass (parameters are held anyway: left out)
        params = {p.data_ptr() for p in net.parameters()}
        with torch.autograd.graph.saved_tensors_hooks(
                lambda a: (held.append(0 if a.data_ptr() in params else a.numel() * a.element_size()), a)[1],
                lambda a: a):
            out = net(x, t)
        out.square().mean().backward()
        grads.append({k: p.grad.clone() for k, p in net.named_parameters()})
        saved.append(sum(held))
    assert saved[1] < saved[0] / 3  # the blocks' activations are not kept, only their inputs
    for k in grads[0]:
        assert torch.equal(grads[0][k], grads[1][k]), k
    assert list(plain.state_dict()) == list(ckpt.state_dict())  # the same names, nothing wrapped
    set_checkpointing(ckpt, False)
    assert all("forward" not in m.__dict__ for m in ckpt.modules())


def test_training_with_checkpointing_equals_training_without(npz, tmp_path):
    train(tmp_path / "plain", _run(npz), progress=False)
    train(tmp_path / "ckpt", _run(npz, checkpointing=True), progress=False)
    assert_states_equal(latest_checkpoint(tmp_path / "plain")[1], latest_checkpoint(tmp_path / "ckpt")[1])


def test_micro_batches_give_the_whole_batch_gradient(npz, tmp_path, monkeypatch):
    seen = []
    real = GaussianDiffusion.training_losses

    def recording(self, net, x0, t, noise):
        seen.append(len(x0))
        return real(self, net, x0, t, noise)

    run = _run(npz)
    run = run.replace(model=run.model.replace(dropout=0.0))  # dropout masks are drawn per forward, so per micro-batch
    train(tmp_path / "whole", run, progress=False)
    monkeypatch.setattr(GaussianDiffusion, "training_losses", recording)
    train(tmp_path / "micro", run.replace(train=run.train.replace(microbatch=3)), progress=False)
    assert seen == [3, 1] * 3  # 4 images per step: 3, then the 1 left, with the same t, ε and flips
    a, b = latest_checkpoint(tmp_path / "whole")[1], latest_checkpoint(tmp_path / "micro")[1]
    worst = max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])
    assert worst < 5e-5  # float rounding of a sum in another order, amplified by Adam's sign-like first steps


def test_fp16_skips_an_overflowing_step_counts_it_and_resumes_exactly(npz, tmp_path, monkeypatch):
    calls = []
    real = GaussianDiffusion.training_losses

    def overflow_at_step_2(self, net, x0, t, noise):  # the loss (so every gradient) of step 2 is infinite
        calls.append(1)
        out = real(self, net, x0, t, noise)
        return dict(out, loss=out["loss"] * float("inf")) if len(calls) == 2 else out

    monkeypatch.setattr(GaussianDiffusion, "training_losses", overflow_at_step_2)
    run = _run(npz, precision="fp16", checkpoint_every=1, keep_last=10, log_every=1)
    run = run.replace(train=run.train.replace(steps=4))
    train(tmp_path / "straight", run, progress=False)
    ck = {s: load_checkpoint(p) for s, p in list_checkpoints(tmp_path / "straight")}
    for part in ("model", "ema"):  # step 2 changed nothing: not the weights, not their average
        assert all(torch.equal(ck[1][part][k], ck[2][part][k]) for k in ck[1][part]), part
        assert not all(torch.equal(ck[2][part][k], ck[3][part][k]) for k in ck[2][part]), part
    assert (ck[1]["scaler"]["scale"], ck[2]["scaler"]["scale"]) == (65536.0, 32768.0)  # backed off by half
    logged = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in logged] == [0, 1, 0, 0] and all(np.isfinite(r["loss"]) for r in logged[2:])
    calls.clear()
    train(tmp_path / "cut", run.replace(train=run.train.replace(steps=2)), progress=False)
    train(tmp_path / "cut", run, progress=False)  # resumed at step 2, with the scaler's state
    assert_states_equal(latest_checkpoint(tmp_path / "cut")[1], ck[4])


def test_replica_clipping_averages_the_clipped_gradients_of_each_share(npz, tmp_path, monkeypatch):
    """The official TPU recipe, by its definition: the gradient each share of N images would have
    alone (the mean loss over its images), clipped to norm c, averaged over the shares."""
    shares, used = [], []
    real = GaussianDiffusion.training_losses

    def recording(self, net, x0, t, noise):
        shares.append(({k: v.clone() for k, v in net.state_dict().items()}, x0.clone(), t.clone(), noise.clone()))
        return real(self, net, x0, t, noise)

    def recording_step(self, closure=None):
        used.append([p.grad.clone() for g in self.param_groups for p in g["params"]])

    monkeypatch.setattr(GaussianDiffusion, "training_losses", recording)
    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    c = 0.05  # small enough that every share is clipped
    run = _run(npz, steps=1, clip_granularity="replica:2", grad_clip=c)
    run = run.replace(model=run.model.replace(dropout=0.0))
    train(tmp_path / "replica", run, progress=False)
    monkeypatch.undo()
    diffusion = GaussianDiffusion.from_config(run.diffusion)
    expected = None
    for state, x0, t, noise in shares:  # the network as it was before the step (no update was made)
        net = UNet.from_config(run.model.replace(in_channels=1, out_channels=1))
        net.load_state_dict(state)
        diffusion.training_losses(net, x0, t, noise)["loss"].mean().backward()
        g = [p.grad for p in net.parameters()]
        norm = torch.sqrt(sum((x.double() ** 2).sum() for x in g))
        assert norm > c  # really clipped
        g = [x * (c / norm).float() for x in g]
        expected = g if expected is None else [a + b for a, b in zip(expected, g)]
    assert len(shares) == 2 and [len(x0) for _, x0, _, _ in shares] == [2, 2]
    for got, want in zip(used[0], expected):
        assert torch.allclose(got, want / 2, rtol=1e-4, atol=1e-9)
    # one share of the whole batch is the default's clipping of the batch, bit for bit
    one = _run(npz, clip_granularity="replica:4")
    train(tmp_path / "one-share", one, progress=False)
    train(tmp_path / "batch", _run(npz), progress=False)
    assert_states_equal(latest_checkpoint(tmp_path / "one-share")[1], latest_checkpoint(tmp_path / "batch")[1])
