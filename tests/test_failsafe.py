"""A fast path that cannot be built here falls back to the plain path with one warning; any other
failure is raised (network/fast.py, Fail-safe).

The compiler is made to fail on purpose: `torch.compile` is given a backend that raises when it is
asked to build a graph, as a missing C++ compiler or an unsupported op would. A CUDA graph
capture is made to fail the same way. Each fallback must compute exactly what the plain path
computes: the same weights, bit for bit, after training.
"""

import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from ddpm.io.checkpoint import latest_checkpoint
from ddpm.network.fast import FastModel, FastPathWarning, prepare_model
from ddpm.network.unet import UNet, UNetConfig
from ddpm.run.config import RunConfig
from ddpm.workflows.train import train
from helpers import assert_states_equal

REAL_COMPILE = torch.compile


def _failing_backend(gm, example_inputs):
    raise RuntimeError("simulated compiler failure: no working C++ compiler")


def _backend_failing_at_call(n):
    def backend(gm, example_inputs):  # builds fine; the n-th call of the built graph fails
        calls = [0]

        def run(*args):
            calls[0] += 1
            if calls[0] == n:
                raise RuntimeError(f"simulated device failure at call {n}")
            return gm.forward(*args)
        return run
    return backend


@pytest.fixture
def compiler(monkeypatch):
    """compiler(backend): every torch.compile from now on builds with `backend`."""
    def use(backend):
        monkeypatch.setattr(torch, "compile", lambda model, **kw: REAL_COMPILE(model, backend=backend, dynamic=False))
    yield use
    torch._dynamo.reset()


def _net():
    torch.manual_seed(0)
    cfg = UNetConfig(ch=32, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0, resolution=8)
    return UNet.from_config(cfg).eval().requires_grad_(False)


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, 8, 8, generator=g), torch.tensor([3, 700])


def test_a_compiler_that_fails_warns_once_and_sampling_runs_eagerly(compiler):
    compiler(_failing_backend)
    net = _net()
    x, t = _inputs()
    want = net(x, t)
    fast = prepare_model(net, "cpu", compile="on", channels_last="off", winograd="off")
    with pytest.warns(FastPathWarning, match=r"torch.compile could not build.*simulated compiler failure.*--fast off"):
        got = fast(x, t)
    assert torch.equal(got, want) and not fast.compiled
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert torch.equal(fast(x, t), want)


class _Broken(nn.Module):
    def forward(self, x, t):
        raise ValueError("the network itself fails on this input")


def test_a_failure_of_the_network_itself_is_raised_not_hidden(compiler):
    compiler(_failing_backend)
    fast = prepare_model(_Broken(), "cpu", compile="on", channels_last="off", winograd="off")
    x, t = _inputs()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastPathWarning)
        with pytest.raises(ValueError, match="the network itself fails"):
            fast(x, t)


def test_a_capture_that_fails_warns_once_and_sampling_runs_without_graphs(monkeypatch):
    def capture(self, x, t, y):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(FastModel, "_capture", capture)
    net = _net()
    x, t = _inputs()
    want = net(x, t)
    fast = FastModel(net, torch.device("cpu"), "fp32", compile=False, channels_last=False, cuda_graphs=True)
    with pytest.warns(FastPathWarning, match=r"CUDA graph capture failed.*not permitted.*cuda_graphs='off'"):
        got = fast(x, t)
    assert torch.equal(got, want) and not fast.cuda_graphs
    broken = FastModel(_Broken(), torch.device("cpu"), "fp32", compile=False, channels_last=False, cuda_graphs=True)
    with pytest.raises(ValueError, match="the network itself fails"):
        broken(x, t)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "d.npz"
    np.savez(p, x=np.random.default_rng(0).integers(0, 256, (16, 32, 32), dtype=np.uint8))
    return p


def _run(data, compile):
    run = RunConfig.from_preset("tiny", data=str(data))
    return run.replace(train=run.train.replace(steps=4, checkpoint_every=2, compile=compile))


def test_training_with_a_compiler_that_fails_warns_and_equals_eager_training(compiler, data, tmp_path):
    train(tmp_path / "eager", _run(data, "off"), progress=False)
    compiler(_failing_backend)
    with pytest.warns(FastPathWarning, match=r"simulated compiler failure.*train.compile=off skips"):
        train(tmp_path / "fallback", _run(data, "on"), progress=False)
    assert_states_equal(latest_checkpoint(tmp_path / "fallback")[1], latest_checkpoint(tmp_path / "eager")[1])


def test_a_failure_in_the_middle_of_training_is_raised(compiler, data, tmp_path):
    # The build (the trial forward and backward) succeeds; the network's third call, the second
    # training step, fails: that is raised, not papered over by a fallback.
    compiler(_backend_failing_at_call(3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastPathWarning)
        with pytest.raises(RuntimeError, match="simulated device failure at call 3"):
            train(tmp_path / "run", _run(data, "on"), progress=False)
