"""train.logger: the scalars of metrics.jsonl and the sample grids go to Weights & Biases too (a
stand-in module records the calls: the real package is an optional extra), and a resumed run logs
into the same W&B run."""

import json
import sys
import types

import numpy as np
import pytest

from ddpm.errors import UserError
from ddpm.run.config import RunConfig
from ddpm.workflows.train import train

DATA = ""  # a small data set, written by the test that uses it


class FakeWandb(types.ModuleType):
    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0
        outer = self

        class Run:
            def log(self, data, step):
                outer.logged.append((step, data))

            def finish(self):
                outer.finished += 1

        self._run = Run

        class Image:
            def __init__(self, pixels, caption=""):
                self.pixels, self.caption = np.asarray(pixels), caption

        self.Image = Image

    def init(self, **kw):
        self.inits.append(kw)
        return self._run()


def _run(steps, **train):
    run = RunConfig.from_preset("tiny", data=DATA)
    return run.replace(diffusion=run.diffusion.replace(T=20),
                       train=run.train.replace(steps=steps, log_every=2, checkpoint_every=2, sample_every=2, sample_n=2,
                                               logger="jsonl,wandb", **train))


def test_wandb_gets_the_jsonl_scalars_and_the_grids_and_a_resume_continues_its_run(tmp_path, monkeypatch):
    global DATA
    DATA = str(tmp_path / "d.npz")
    np.savez(DATA, x=np.random.default_rng(0).integers(0, 256, (8, 32, 32), dtype=np.uint8))
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    train(tmp_path / "run", _run(4), progress=False)
    assert len(fake.inits) == 1 and fake.finished == 1
    init = fake.inits[0]
    assert init["resume"] == "allow" and init["dir"] == str(tmp_path / "run") and init["config"]["train"]["steps"] == 4
    recs = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    scalars = [(s, d) for s, d in fake.logged if "samples" not in d]
    assert [s for s, _ in scalars] == [r["step"] for r in recs] == [2, 4]
    for (_, d), r in zip(scalars, recs):
        assert d == {f"train/{k}": v for k, v in r.items() if k != "step" and v is not None}
    images = [(s, d["samples"]) for s, d in fake.logged if "samples" in d]
    assert [s for s, _ in images] == [2, 4] and images[0][1].pixels.ndim == 2  # grayscale grids
    train(tmp_path / "run", _run(6), progress=False)  # resumed
    assert fake.inits[1]["id"] == fake.inits[0]["id"] == (tmp_path / "run" / "wandb-run-id").read_text()
    assert [s for s, d in fake.logged if "samples" not in d][-1] == 6


def test_unknown_loggers_are_one_line(tmp_path):
    with pytest.raises(UserError, match="jsonl, tensorboard, wandb"):
        RunConfig.from_preset("tiny").train.replace(logger="jsonl,mlflow")
