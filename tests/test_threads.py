"""Fewer CPU threads while other programs use the cores, never over the user's own choice."""

from pathlib import Path

import pytest

from ddpm import threads
from ddpm.cli import main


def test_the_wait_policy_is_libgomps_or_the_users():
    assert threads.describe({}).startswith("libgomp's default")
    assert threads.describe({"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": " "}) == "OMP_WAIT_POLICY=PASSIVE (yours)"


def test_info_device_says_what_a_run_would_use(capsys):
    assert main(["info", "--device", "cpu", "--preset", "cifar10"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "cpu (cifar10, width 128):"
    keys = [line.strip().split(":")[0] for line in out[1:]]
    assert keys == ["threads", "wait policy", "precision", "winograd", "channels-last", "compile", "cuda-graphs"]
    assert "channels-last: on" in out[5] and "compile: off" in out[6]
    assert main(["info", "--device", "cpu", "--preset", "demo"]) == 0
    assert "channels-last: off" in capsys.readouterr().out  # the demo's width 32


# ---------------------------------------------------------------- fewer threads while others use the cores

@pytest.fixture
def two_threads():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


class FakeMachine:
    """A clock and /proc/stat readings: `others` cores busy besides this process's `own`."""

    def __init__(self):
        self.now, self.busy, self.own = 0.0, 0.0, 0.0

    def run(self, seconds: float, others: float, own: float = 1.0):
        self.now += seconds
        self.busy += seconds * (others + own)
        self.own += seconds * own

    def read(self):
        return self.busy, self.own


def test_threads_for_leaves_the_cores_others_use():
    # ⌊cores − others + 0.4⌋, at least 1, at most what torch started with
    assert [threads.threads_for(o, 2, 2) for o in (0.0, 0.5, 0.61, 1.0, 1.33, 2.0)] == [2, 1, 1, 1, 1, 1]
    assert threads.threads_for(0.3, 2, 2) == 2
    assert threads.threads_for(1.0, 16, 16) == 15 and threads.threads_for(3.0, 16, 8) == 8


def test_adapter_lowers_and_restores_the_thread_count(two_threads):
    import torch

    m = FakeMachine()
    a = threads.Adapter(environ={}, clock=lambda: m.now, read=m.read)
    cores = a.cores = 2
    assert a() is None  # the first look only starts the measurement
    m.run(threads.CHECK_EVERY_S, others=0.1, own=2)
    assert a() is None and torch.get_num_threads() == 2  # an idle machine keeps both
    m.run(threads.CHECK_EVERY_S / 2, others=1.0)
    assert a() is None  # not yet time to look
    m.run(threads.CHECK_EVERY_S, others=1.0)
    assert a() == 1 and torch.get_num_threads() == 1  # a busy program: one thread
    m.run(threads.CHECK_EVERY_S, others=1.0)
    assert a() is None and torch.get_num_threads() == 1
    m.run(threads.CHECK_EVERY_S, others=0.0)
    assert a() == cores and torch.get_num_threads() == 2  # it stopped: both again
    assert a.changes == 2


def test_adapter_gives_way_to_the_user(two_threads):
    import torch

    m = FakeMachine()
    a = threads.Adapter(environ={}, clock=lambda: m.now, read=m.read)
    a.cores = 2
    a()
    torch.set_num_threads(1)  # the user's own choice
    m.run(threads.CHECK_EVERY_S, others=0.0)
    assert a() is None and a.off and torch.get_num_threads() == 1
    for env in ({"OMP_NUM_THREADS": "2"}, {threads.OFF_VARIABLE: "off"}):
        b = threads.Adapter(environ=env, clock=lambda: m.now, read=m.read)
        m.run(threads.CHECK_EVERY_S, others=1.0)
        assert b() is None and b() is None and b.off
    c = threads.Adapter(environ={}, clock=lambda: m.now, read=lambda: None)  # no /proc/stat
    assert c() is None and c.off


def test_the_loops_look_at_the_load_between_steps(monkeypatch):
    # the one reverse loop, bits/dim, inversion and the training loop each call adapt once a step
    import torch
    from ddpm import GaussianDiffusion, make_betas
    from ddpm.process.editing import ddim_invert

    calls = []
    monkeypatch.setattr(threads, "adapt", lambda: calls.append(1))
    d = GaussianDiffusion(make_betas("linear", 10, 1e-3, 0.2))
    model = lambda x, t: 0.1 * x  # noqa: E731
    d.p_sample_loop(model, (2, 1, 4, 4))
    assert len(calls) == 10
    calls.clear()
    d.calc_bpd_loop(model, torch.zeros(2, 1, 4, 4))
    assert len(calls) == 10
    calls.clear()
    ddim_invert(d, model, torch.zeros(2, 1, 4, 4), [10, 5, 0])
    assert len(calls) == 2


def test_the_inception_pass_looks_at_the_load_between_batches(monkeypatch):
    import numpy as np
    import torch
    from ddpm.workflows.evaluate import measure_batches

    class FakeInception:  # pool3 features of 2048 and no classifier, as measure_batches reads them
        has_logits = False

        def __call__(self, images):
            return np.random.default_rng(len(images)).normal(size=(len(images), 2048)), None

    calls = []
    monkeypatch.setattr(threads, "adapt", lambda: calls.append(1))
    batches = [(list(range(s, s + 3)), torch.zeros(3, 3, 8, 8, dtype=torch.uint8)) for s in (0, 3, 6)]
    measure_batches(batches, 9, FakeInception())
    assert len(calls) == 3


def test_the_training_loop_looks_at_the_load_after_each_step(monkeypatch, tmp_path):
    from ddpm.run.config import RunConfig
    from ddpm.workflows.train import train
    from helpers import noise_npz

    calls = []
    monkeypatch.setattr(threads, "adapt", lambda: calls.append(1))
    run = RunConfig.from_preset("tiny", data=str(noise_npz(tmp_path, (8, 16, 16), seed=0)))
    run = run.replace(model=run.model.replace(resolution=16), data=run.data.replace(resolution=16),
                      diffusion=run.diffusion.replace(T=20), train=run.train.replace(steps=3, checkpoint_every=3))
    train(tmp_path / "run", run, progress=False)
    assert len(calls) == 3


def test_cpu_times_reads_this_machine():
    got = threads.cpu_times()
    if not Path("/proc/stat").is_file():
        assert got is None
        return
    busy, own = got
    assert busy > 0 and own > 0


def test_what_info_says_of_the_thread_count():
    assert threads.describe_adapting({"OMP_NUM_THREADS": "3"}) == "fixed by OMP_NUM_THREADS=3"
    assert threads.describe_adapting({threads.OFF_VARIABLE: "off"}).startswith("fixed: DDPM_THREAD_POLICY=off")
    if threads.cpu_times() is not None:
        assert threads.describe_adapting({}).startswith("fewer while other programs keep cores busy")
