"""The files around the checkpoints: nothing blocks a resume, nothing of the user's is overwritten.

Each test is one of docs/RELIABILITY.md's cases: a torn metrics log, a user's folder given as
--out, a run without its config.json, a checkpoint that verifies but does not fit, a sample
folder resumed with another model, changed data, a full disk and a read-only folder, SIGTERM,
two trainings in one folder. Where a run goes on, the test checks that it ends where an
uninterrupted run ends, bit for bit.
"""

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpm.cli import main
from ddpm.io.checkpoint import CheckpointWarning, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from ddpm.io.atomic import TEMP_PREFIX
from ddpm.io.folders import FolderLock
from ddpm.network.unet import UNet
from ddpm.run.config import RunConfig
from ddpm.run.folder import RunRecordWarning
from ddpm.workflows.train import train
from helpers import assert_states_equal

pytestmark = pytest.mark.usefixtures("one_thread")  # in-process references run like the subprocesses: 1 thread

PY = sys.executable
KILL_AT = str(Path(__file__).with_name("kill_at.py"))
ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    p = tmp_path_factory.mktemp("data") / "noise.npz"
    np.savez(p, x=np.random.default_rng(2).integers(0, 256, (16, 32, 32), dtype=np.uint8))
    return p


def _tiny(npz, **train_fields):
    run = RunConfig.from_preset("tiny", data=str(npz))
    return run.replace(train=run.train.replace(**{"checkpoint_every": 2, **train_fields}))


def _args(npz, out, steps, *extra):
    return ["train", "--preset", "tiny", "--data", str(npz), "--out", str(out), "--steps", str(steps),
            "--checkpoint-every", "2", "--no-progress", *extra]


def _cli(capsys, argv):
    """`ddpm ARGV` in this process -> (exit status, stderr lines)."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # refused by the argument parser, before the command runs
        rc = e.code
    return rc, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _one_error(capsys, argv, *needles):
    rc, err = _cli(capsys, argv)
    errors = [line for line in err if ": error: " in line]
    assert rc == 2 and len(errors) == 1 and "Traceback" not in "\n".join(err), err
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _final(run_dir):
    return latest_checkpoint(run_dir)[1]


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(npz, tmp_path_factory):
    """An uninterrupted run of 8 steps, logging every step."""
    out = tmp_path_factory.mktemp("ref") / "run"
    train(out, _tiny(npz, steps=8, log_every=1), progress=False)
    return out


@pytest.fixture(scope="module")
def half(npz, tmp_path_factory):
    """The same run stopped after step 4 (checkpoints 2 and 4); tests work on copies."""
    out = tmp_path_factory.mktemp("half") / "run"
    train(out, _tiny(npz, steps=4, log_every=1), progress=False)
    return out


@pytest.fixture(scope="module")
def good6(npz, half, tmp_path_factory):
    """The same run's checkpoint of step 6, as a state."""
    out = tmp_path_factory.mktemp("six") / "run"
    shutil.copytree(half, out)
    train(out, _tiny(npz, steps=6, log_every=1), progress=False)
    return load_checkpoint(out / "ckpt-00000006.safetensors")


def _copy(run_dir, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    return out


# ---- 1. the metrics log is a record, never a reason to stop


def test_a_torn_or_undecodable_metrics_line_is_dropped_and_the_run_resumes(npz, reference, half, tmp_path):
    run_dir = _copy(half, tmp_path)
    with open(run_dir / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 5, "loss": 0.7\n\xff\xfe not text\n{"step": 15, "loss": 0.7')  # torn, binary, torn
    with pytest.warns(RunRecordWarning, match=r"dropped 3 unreadable line"):
        train(run_dir, _tiny(npz, steps=8, log_every=1), progress=False)
    got = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in got] == list(range(1, 9))
    assert [r["loss"] for r in got] == [r["loss"] for r in want]  # the same run, logged once per step
    assert_states_equal(_final(run_dir), _final(reference))


# ---- 2. a folder that is not ours is refused, nothing touched


def test_a_users_folder_is_refused_and_left_as_it_was(capsys, npz, tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "config.json").write_text('{"name": "my app"}')
    (proj / "notes.txt").write_text("mine")
    before = _snapshot(proj)
    _one_error(capsys, _args(npz, proj, 2), "proj/config.json", "not a ddpm run config")
    assert _snapshot(proj) == before and sorted(os.listdir(proj)) == ["config.json", "notes.txt"]
    (proj / "config.json").unlink()
    _one_error(capsys, _args(npz, proj, 2), "holds files that ddpm did not write", "notes.txt")
    assert sorted(os.listdir(proj)) == ["notes.txt"]


@pytest.mark.parametrize("out, needle", [("", "--out: empty value"), ("afile", "is a file, not a folder"),
                                         ("afile/run", "afile is a file, not a folder")])
def test_an_output_path_that_is_not_a_usable_folder_is_one_line(capsys, npz, tmp_path, monkeypatch, out, needle):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    before = sorted(os.listdir(tmp_path))
    _one_error(capsys, _args(npz, out, 2), needle)
    assert sorted(os.listdir(tmp_path)) == before


def test_samples_never_adopt_a_users_png(capsys, npz, tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "pictures"
    train(run_dir, _tiny(npz, steps=2), progress=False)
    out.mkdir()
    (out / "000000.png").write_bytes(b"my picture")
    _one_error(capsys, ["sample", "--run", run_dir, "--n", "2", "--out", out, "--no-progress"],
               "holds files that ddpm did not write for samples", "000000.png")
    assert sorted(os.listdir(out)) == ["000000.png"] and (out / "000000.png").read_bytes() == b"my picture"


def test_named_output_files_of_the_user_are_never_replaced(capsys, half, tmp_path):
    ckpt = half / "ckpt-00000004.safetensors"
    mine = tmp_path / "mine.safetensors"
    mine.write_text("my notes")
    _one_error(capsys, ["convert", ckpt, mine, "--from", "ddpm", "--to", "ddpm"], "mine.safetensors", "not a weights file")
    pipeline = tmp_path / "pipeline"
    pipeline.mkdir()
    (pipeline / "config.json").write_text('{"name": "my pipeline"}')
    _one_error(capsys, ["convert", ckpt, pipeline, "--from", "ddpm", "--to", "diffusers"], "pipeline/config.json")
    np.savez(tmp_path / "stats.npz", x=np.zeros(3))
    _one_error(capsys, ["fid-ref", "--data", tmp_path / "x.npz", "--out", tmp_path / "stats.npz"], "stats.npz")
    np.savez(tmp_path / "ref.npz", mu=np.zeros(4), sigma=np.eye(4))
    np.savez(tmp_path / "s.npz", x=np.zeros((2, 32, 32, 3), np.uint8))
    (tmp_path / "report.json").write_text('{"mine": true}')
    _one_error(capsys, ["fid", "--samples", tmp_path / "s.npz", "--ref", tmp_path / "ref.npz", "--out",
                        tmp_path / "report.json"], "report.json", "not an FID report")
    assert mine.read_text() == "my notes" and (pipeline / "config.json").read_text() == '{"name": "my pipeline"}'
    assert np.load(tmp_path / "stats.npz").files == ["x"] and (tmp_path / "report.json").read_text() == '{"mine": true}'
    # files that ddpm wrote are replaced by a rerun
    for to, dst in (("ddpm", tmp_path / "w.safetensors"), ("diffusers", tmp_path / "unet")):
        for _ in range(2):
            assert main(["convert", str(ckpt), str(dst), "--from", "ddpm", "--to", to]) == 0


# ---- 3. a run without its config.json resumes with its own config, and refuses a change


def test_a_missing_config_json_is_rebuilt_from_the_checkpoint(capsys, npz, reference, half, tmp_path):
    run_dir = _copy(half, tmp_path)
    saved = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").unlink()
    _one_error(capsys, ["train", "--out", run_dir, "--steps", "8", "--set", "model.ch=64"],
               "model.ch=32, now 64")
    assert not (run_dir / "config.json").exists()  # nothing was written by the refused command
    _one_error(capsys, ["train", "--out", run_dir, "--steps", "8", "--set", "train.seed=5"], "train.seed=0, now 5")
    # no --preset, no --data: the run's own config (not cifar10's), rebuilt from its checkpoint
    rc, err = _cli(capsys, ["train", "--out", run_dir, "--steps", "8", "--no-progress"])
    assert rc == 0 and any("config.json is missing" in line for line in err), err
    rebuilt = json.loads((run_dir / "config.json").read_text())
    assert rebuilt["history"][0]["rebuilt_from"] == "ckpt-00000004.safetensors"
    assert {k: v for k, v in rebuilt.items() if k != "history"} == {
        **{k: v for k, v in saved.items() if k != "history"}, "train": {**saved["train"], "steps": 8}}
    assert_states_equal(_final(run_dir), _final(reference))


# ---- 5. a checkpoint that verifies but does not fit is skipped like a damaged one


def _other_width(state):
    """The checkpoint of step 6 of a run like this one but twice as wide: its config, weights and
    optimizer all of width 64."""
    run = RunConfig.from_dict(state["config"]).with_overrides(["model.ch=64"])
    net = UNet.from_config(run.model)
    opt = torch.optim.Adam(net.parameters())
    return dict(state, config=run.to_dict(), model=net.state_dict(), ema=net.state_dict(), optimizer=opt.state_dict())


def _bad_step(state):
    return dict(state, step=7)


def _bad_rng(state):
    return dict(state, rng={"rank0": {"cpu": torch.zeros(3, dtype=torch.uint8)}})


def _bad_optimizer(state):
    opt = dict(state["optimizer"], param_groups=state["optimizer"]["param_groups"] * 2)
    return dict(state, optimizer=opt)


def _no_ema(state):
    return {k: v for k, v in state.items() if k != "ema"}


def _bad_moments(state):
    moments = {i: dict(m, exp_avg=m["exp_avg"][..., :1]) for i, m in state["optimizer"]["state"].items()}
    return dict(state, optimizer=dict(state["optimizer"], state=moments))


@pytest.mark.parametrize("make, reason", [
    (_other_width, "written by another run (model.ch=64 there, 32 here)"),
    (_bad_step, "its step is 7 but its name says 6"),
    (_bad_rng, "RNG state cpu cannot be restored"),
    (_bad_optimizer, "parameter groups differ"),
    (_bad_moments, "moment exp_avg of parameter 0"),
    (_no_ema, "it lacks ema"),
])
def test_a_checkpoint_that_verifies_but_does_not_fit_is_skipped(npz, reference, half, good6, tmp_path, make, reason):
    run_dir = _copy(half, tmp_path)
    state = make(good6)  # another run's checkpoint, or a well-formed one of this run at step 6, spoiled
    save_checkpoint(run_dir, 6, state, keep_last=10)  # checksummed: it passes verification
    with pytest.warns(CheckpointWarning, match=r"skipping checkpoint ckpt-00000006.*" + reason.replace("(", r"\(")
                      .replace(")", r"\)") + r".*resuming from ckpt-00000004"):
        train(run_dir, _tiny(npz, steps=8, log_every=1), progress=False)
    assert_states_equal(_final(run_dir), _final(reference))


# ---- 6. a sample folder knows its model by content, not by path


def test_sample_resume_with_another_model_at_the_same_path_is_refused(capsys, npz, tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "samples"
    short = ["diffusion.T=20"]  # a short chain: sampling takes a moment
    train(run_dir, _tiny(npz, steps=2).with_overrides(short), progress=False)
    assert main(["sample", "--run", str(run_dir), "--n", "2", "--out", str(out), "--no-progress"]) == 0
    record = json.loads((out / "sampling.json").read_text())
    assert record["model"].startswith("sha256:") and record["recorded"]["checkpoint"].endswith("ckpt-00000002.safetensors")
    before = _snapshot(out)
    shutil.rmtree(run_dir)
    train(run_dir, _tiny(npz, steps=2, seed=1).with_overrides(short), progress=False)  # another model, same path
    capsys.readouterr()
    _one_error(capsys, ["sample", "--run", run_dir, "--n", "4", "--out", out, "--no-progress"],
               "sampling.json: the files here were made with model='sha256:", "new --out folder")
    assert _snapshot(out) == before


# ---- 7. changed data stop a resume, unless accepted (and recorded)


def test_changed_data_on_resume_are_refused_unless_accepted(capsys, npz, tmp_path):
    run_dir, more = tmp_path / "run", tmp_path / "more.npz"
    x = np.load(npz)["x"]
    np.savez(more, x=np.concatenate([x, x[:10]]))
    assert main([str(a) for a in _args(npz, run_dir, 4)]) == 0
    capsys.readouterr()
    _one_error(capsys, _args(more, run_dir, 6), "the data changed since", "16 images", "26", "--accept-new-data")
    assert latest_checkpoint(run_dir)[1]["step"] == 4
    assert main([str(a) for a in _args(more, run_dir, 6, "--accept-new-data")]) == 0
    history = json.loads((run_dir / "config.json").read_text())["history"]
    change = [h for h in history if "data" in h][0]
    assert change["step"] == 4 and change["data"]["before"]["n"] == 16 and change["data"]["after"]["n"] == 26


# ---- 8. a write that fails is one line naming the file, and nothing written is lost


def _limited(limit_bytes):
    def preexec():  # a real kernel write error (EFBIG) once a file would pass limit_bytes
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return preexec


def test_a_failed_write_of_config_or_metrics_is_one_line_and_loses_nothing(npz, tmp_path):
    run_dir = tmp_path / "run"
    # config.json (about 2 KB) cannot be written at all
    r = subprocess.run([PY, "-m", "ddpm", *_args(npz, run_dir, 2)], env=ENV, capture_output=True, text=True,
                       preexec_fn=_limited(1000))
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(err) == 1, r.stderr
    assert "config.json: File too large (EFBIG)" in err[0]
    assert not (run_dir / "config.json").exists() and not list(run_dir.glob(TEMP_PREFIX + "*"))
    # the metrics log passes the limit after about 13 lines; checkpoints would be larger, so none is due
    r = subprocess.run([PY, "-m", "ddpm", *_args(npz, run_dir, 40, "--set", "train.log_every=1", "--checkpoint-every",
                                               "1000")], env=ENV, capture_output=True, text=True,
                       preexec_fn=_limited(3000))
    err = [line for line in r.stderr.splitlines() if line.strip() and "trained" not in line]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(err) == 1, r.stderr
    assert "metrics.jsonl: File too large (EFBIG)" in err[0]
    lines = (run_dir / "metrics.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b"" and [json.loads(x)["step"] for x in lines[:-1]] == list(range(1, len(lines)))


def test_a_read_only_run_folder_is_one_line(capsys, npz, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    train(run_dir, _tiny(npz, steps=2), progress=False)
    before = _snapshot(run_dir)
    real_open = os.open

    def read_only(path, flags, *a, **k):  # what a read-only mount answers to any write
        if Path(path).parent == run_dir and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", read_only)
    _one_error(capsys, _args(npz, run_dir, 4), str(run_dir), "Read-only file system (EROFS)")
    monkeypatch.undo()
    assert _snapshot(run_dir) == before


# ---- 10. SIGTERM stops at a safe point with a checkpoint; one training per folder


def _temps(d: Path):
    return sorted(p.name for p in d.rglob(TEMP_PREFIX + "*"))


@pytest.mark.slow
@pytest.mark.parametrize("twice", [False, True])
def test_sigterm_stops_after_the_step_with_a_checkpoint_and_the_run_resumes(npz, reference, tmp_path, twice):
    run_dir = tmp_path / "run"
    args = _args(npz, run_dir, 8, "--set", "train.log_every=1")
    # SIGTERM just before the optimizer step of step 3 (kill_at.py); checkpoints every 2 steps
    r = subprocess.run([PY, KILL_AT, "step", "3", "--signal", "TERM", *(["--twice"] if twice else []), "--", *args],
                       env=ENV, capture_output=True, text=True)
    assert r.returncode == 128 + signal.SIGTERM and "Traceback" not in r.stderr, r.stderr
    steps = [s for s, _ in list_checkpoints(run_dir)]
    if twice:  # the second SIGTERM lands while the checkpoint of step 3 is written: abandoned, cleaned
        assert "stopped at once by a second SIGTERM" in r.stderr and steps == [2]
    else:
        assert "stopped by SIGTERM after step 3, which ckpt-00000003.safetensors holds" in r.stderr and steps == [2, 3]
    assert _temps(run_dir) == []
    assert main(args) == 0  # the same command again, here
    assert_states_equal(_final(run_dir), _final(reference))


@pytest.mark.slow
def test_sigterm_stops_sampling_cleanly_and_a_rerun_finishes(npz, tmp_path):
    run_dir, out, ref = tmp_path / "run", tmp_path / "samples", tmp_path / "ref"
    train(run_dir, _tiny(npz, steps=2).with_overrides(["diffusion.T=20"]), progress=False)
    args = ["sample", "--run", str(run_dir), "--n", "6", "--batch", "2", "--no-progress", "--out", str(out)]
    r = subprocess.run([PY, KILL_AT, "png", "3", "--signal", "TERM", "--", *args], env=ENV, capture_output=True, text=True)
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 128 + signal.SIGTERM and err == ["ddpm sample: stopped by SIGTERM; run the same command "
                                                            "again to go on where it stopped"], r.stderr
    assert _temps(out) == [] and not (out / "samples.npz").exists()
    assert main(args) == 0 and main([*args[:-1], str(ref)]) == 0  # the rerun, and an uninterrupted run
    assert np.array_equal(np.load(out / "samples.npz")["x"], np.load(ref / "samples.npz")["x"])


def test_a_second_training_into_a_folder_in_use_is_refused(capsys, npz, tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir, _tiny(npz, steps=2), progress=False)
    with FolderLock(run_dir, "ddpm train"):
        _one_error(capsys, _args(npz, run_dir, 4), f"{run_dir}: is in use by ddpm train (pid {os.getpid()})")
    # a holder killed with SIGKILL leaves no lock behind
    holder = ("import os, signal, sys; from ddpm.io.folders import FolderLock; "
              "FolderLock(sys.argv[1], 'ddpm train').__enter__(); os.kill(os.getpid(), signal.SIGKILL)")
    assert subprocess.run([PY, "-c", holder, str(run_dir)], env=ENV).returncode == -signal.SIGKILL
    assert main([str(a) for a in _args(npz, run_dir, 4)]) == 0
