"""Fine-tuning: `--init-from` starts a new run from a run's, a checkpoint's or a diffusers
folder's weights (model and EMA), with a fresh optimizer at step 0, records where they came from,
and refuses weights of another shape in one line naming the tensor."""

import json

import numpy as np
import pytest
import torch

from ddpm import cli
from ddpm.io.checkpoint import checkpoint_sha256, latest_checkpoint
from ddpm.io.weights import convert_file
from ddpm.run.config import RunConfig
from ddpm.workflows.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 16x16 run trained 2 steps (its model and EMA differ), and its data."""
    root = tmp_path_factory.mktemp("src")
    np.savez(root / "d.npz", x=np.random.default_rng(4).integers(0, 256, (8, 16, 16), dtype=np.uint8))
    train(root / "run", _run(root / "d.npz", 2), progress=False)
    return root


def _run(npz, steps, **train_fields):
    run = RunConfig.from_preset("tiny", data=str(npz))
    return run.replace(model=run.model.replace(resolution=16, attn_resolutions=(8,)), data=run.data.replace(resolution=16),
                       train=run.train.replace(steps=steps, checkpoint_every=steps, batch_size=4, **train_fields))


def _no_update(monkeypatch):
    """Adam makes no update: what a run holds after its step is what it started from (and the EMA's
    one lerp toward it)."""
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, closure=None: None)


def test_init_from_a_run_takes_its_model_and_ema(source, tmp_path, monkeypatch):
    _, a = latest_checkpoint(source / "run")
    _no_update(monkeypatch)
    train(tmp_path / "b", _run(source / "d.npz", 1, init_from=str(source / "run")), progress=False)
    _, b = latest_checkpoint(tmp_path / "b")
    d = _run(source / "d.npz", 1).train.ema_decay
    for k in a["model"]:
        assert torch.equal(b["model"][k], a["model"][k]), k
        assert torch.allclose(b["ema"][k], d * a["ema"][k] + (1 - d) * a["model"][k], atol=1e-7), k
    history = json.loads((tmp_path / "b" / "config.json").read_text())["history"]
    src = latest_checkpoint(source / "run")[0]
    assert history[0]["init_from"]["sha256"] == checkpoint_sha256(src) and history[0]["step"] == 0
    monkeypatch.undo()  # with updates: a fresh optimizer at step 0 (the source's Adam had made 2 steps)
    train(tmp_path / "c", _run(source / "d.npz", 1, init_from=str(source / "run")), progress=False)
    _, c = latest_checkpoint(tmp_path / "c")
    assert c["step"] == 1 and {int(s["step"]) for s in c["optimizer"]["state"].values()} == {1}
    assert {int(s["step"]) for s in a["optimizer"]["state"].values()} == {2}


def test_init_from_a_diffusers_folder_gives_its_weights_to_both(source, tmp_path, monkeypatch):
    ckpt, a = latest_checkpoint(source / "run")
    convert_file(ckpt, tmp_path / "unet", "ddpm", "diffusers")  # the EMA weights, as diffusers holds them
    _no_update(monkeypatch)
    train(tmp_path / "b", _run(source / "d.npz", 1, init_from=str(tmp_path / "unet")), progress=False)
    _, b = latest_checkpoint(tmp_path / "b")
    for k in a["ema"]:
        assert torch.equal(b["model"][k], a["ema"][k]), k
        assert torch.allclose(b["ema"][k], a["ema"][k], atol=1e-7), k


def test_init_from_weights_of_another_shape_is_one_line(source, tmp_path, capsys):
    argv = ["train", "--preset", "tiny", "--data", str(source / "d.npz"), "--out", str(tmp_path / "b"), "--steps", "1",
            "--set", "model.ch=64", "--set", "model.resolution=16", "--set", "model.attn_resolutions=8",
            "--set", "data.resolution=16",
            "--init-from", str(source / "run"), "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    # the first tensor in the state dict that differs: the time embedding (4 ch = 128 there, 256 here)
    assert len(err) == 1 and "temb.dense.0.weight is [128, 32]" in err[-1] and "needs [256, 64]" in err[-1], err
    assert not list((tmp_path / "b").glob("ckpt-*"))
    assert cli.main(argv[:-3] + ["--init-from", str(tmp_path / "nothing-here"), "--no-progress"]) == 2
    assert "nothing-here" in capsys.readouterr().err
