"""Every mistake a user can make on the command line gets one line, exit status 2, no traceback."""

import json
import os
import pickle

import numpy as np
import pytest

from ddpm.cli import main


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "x.npz"
    np.savez(p, x=np.zeros((4, 32, 32), np.uint8))
    return p


def _run(capsys, argv):
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


def _train(npz, out, *extra):
    return ["train", "--preset", "tiny", "--data", npz, "--out", out, "--steps", "1", "--no-progress", *extra]


@pytest.mark.parametrize("extra, needle", [
    (["--set", "train.lr=0"], "train.lr=0.0 must be a positive number"),
    (["--set", "train.lr=-1e-4"], "train.lr=-0.0001 must be a positive number"),
    (["--set", "diffusion.beta_end=1.5"], "beta_end=1.5 is not valid; β must lie in (0, 1]"),
    (["--set", "diffusion.beta_start=0"], "beta_start=0.0 is not valid"),
    (["--set", "diffusion.T=0"], "T=0 is not valid"),
    (["--set", "diffusion.var_type=large"], "'fixedlarge', 'fixedsmall', 'learned', 'learned_range'"),
    (["--set", "diffusion.schedule=linaer"], "'linear', 'quad', 'const'"),
    (["--set", "model.resolution=31"], "resolution=31 must be divisible by"),
    (["--set", "train.batch_size=0"], "train.batch_size=0 must be a positive integer"),
    (["--set", "train.nokey=1"], "unknown field(s) nokey"),
    (["--set", "nosection.x=1"], "unknown section 'nosection'"),
    (["--set", "train.lr"], "expected key=value"),
    (["--set", "train.steps=1.5"], "--set train: field steps='1.5' is not a valid int"),
    (["--set", "diffusion.mean_type=eps", "--set", "diffusion.schedule=jsd"], "ᾱ_T = 0"),
])
def test_invalid_training_settings(capsys, npz, tmp_path, extra, needle):
    rc, err = _run(capsys, _train(npz, tmp_path / "run", *extra))
    assert rc == 2 and len(err) == 1 and err[0].startswith("ddpm train: error:"), err
    assert needle in err[0]
    assert not any(p.name.startswith("ckpt-") for p in (tmp_path / "run").glob("*")) if (tmp_path / "run").exists() else True


def test_unknown_preset_lists_the_presets(capsys, npz, tmp_path):
    rc, err = _run(capsys, ["train", "--preset", "cifar100", "--data", npz, "--out", tmp_path])
    assert rc == 2 and len(err) == 1 and "'cifar10'" in err[0] and "'demo'" in err[0]


@pytest.mark.parametrize("make, needle", [
    (lambda d: d / "missing", "does not exist"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "no image files"),
])
def test_missing_or_empty_data(capsys, tmp_path, make, needle):
    rc, err = _run(capsys, ["train", "--preset", "tiny", "--data", make(tmp_path), "--out", tmp_path / "run", "--steps", "1"])
    assert rc == 2 and len(err) == 1 and needle in err[0].lower(), err


@pytest.mark.parametrize("content, needle", [("{not json", "not valid JSON"), (json.dumps({"train": {"lr": "fast"}}), "lr='fast'"),
                                             (json.dumps({"optim": {}}), "unknown section")])
def test_bad_config_files(capsys, npz, tmp_path, content, needle):
    f = tmp_path / "c.json"
    f.write_text(content)
    rc, err = _run(capsys, _train(npz, tmp_path / "run", "--config", f))
    assert rc == 2 and len(err) == 1 and needle in err[0], err


def test_missing_config_file(capsys, npz, tmp_path):
    rc, err = _run(capsys, _train(npz, tmp_path / "run", "--config", tmp_path / "nope.json"))
    assert rc == 2 and len(err) == 1 and "nope.json: file not found" in err[0]


def test_sampling_from_a_run_that_does_not_exist(capsys, tmp_path):
    rc, err = _run(capsys, ["sample", "--run", tmp_path / "nothing", "--n", "1", "--out", tmp_path / "s"])
    assert rc == 2 and len(err) == 1 and "nothing" in err[0]


def test_a_hostile_checkpoint_cannot_run_code(capsys, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "ckpt-00000001.safetensors"
    evil.write_bytes(pickle.dumps({"model": Evil()}))
    rc, err = _run(capsys, ["sample", "--checkpoint", evil, "--n", "1", "--out", tmp_path / "s"])
    assert rc == 2 and len(err) == 1 and str(evil.name) in err[0]
    rc, err = _run(capsys, ["sample", "--run", tmp_path, "--n", "1", "--out", tmp_path / "s"])
    assert rc == 2 and not marker.exists()


def test_training_writes_only_inside_the_output_directory(capsys, npz, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = tmp_path / "out"
    before = {p for p in tmp_path.rglob("*")}
    assert main([str(a) for a in _train(npz, out)]) == 0
    new = {p for p in tmp_path.rglob("*")} - before
    assert new and all(out in p.parents or p == out for p in new), sorted(new)
