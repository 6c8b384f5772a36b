"""Nothing of the user's is overwritten or deleted, and every rerun finishes the job.

A user's file is one that ddpm did not write: a page, a diffusers folder, a file whose name
merely starts like a temporary one. Each test puts such a file where a command writes and checks,
byte for byte, that it is still there after the command (a refusal in one line); and that a
command stopped or refused at any point, run again (corrected), finishes.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddpm.cli import main
from ddpm.errors import UserError
from ddpm.io.atomic import temp_path
from ddpm.io.data import DataConfig
from ddpm.io.prepared import prepare
from ddpm.workflows import export as export_module

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--preset", "tiny", "--set", "diffusion.T=20", "--no-progress"]


def snapshot(root: Path) -> dict:
    """Every file and folder under `root` (hidden ones too), with each file's bytes."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def ddpm_temp_name(dest: str) -> str:
    """A temporary file's name as a ddpm writer killed on another node leaves it."""
    return f".ddpm-tmp-{dest}-node7-4242-0badc0de"


def _pngs(folder: Path, n: int = 8, side: int = 16) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    for i in range(n):
        Image.fromarray(rng.randint(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder


def _refused(argv, capsys, needle: str) -> None:
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    npz = root / "data.npz"
    np.savez(npz, x=np.random.RandomState(0).randint(0, 256, (8, 32, 32), dtype=np.uint8))
    assert main(["train", *TINY, "--data", str(npz), "--out", str(root / "run"), "--steps", "2",
                 "--checkpoint-every", "2"]) == 0
    return root / "run"


# ---------------------------------------------------------------------------------------------
# A user's files are never overwritten or deleted
# ---------------------------------------------------------------------------------------------


def test_only_files_named_as_ddpm_names_its_temps_are_cleaned_up(tmp_path, capsys):
    """A name that merely starts like a temp file is the user's: a folder holding one is not empty,
    and prepare refuses it untouched; a killed ddpm writer's temp file is cleaned up."""
    out = tmp_path / "p"
    out.mkdir()
    old = time.time() - 2 * 3600
    for name in (".tmp-notes", ".tmp-ckpt-00000002.safetensors-123-deadbeef"):
        (out / name).write_text("mine")
        os.utime(out / name, (old, old))
    before = snapshot(out)
    src = _pngs(tmp_path / "imgs")
    _refused(["prepare", src, "--out", out, "--no-progress"], capsys, ".tmp-ckpt-00000002.safetensors-123-deadbeef")
    assert snapshot(out) == before

    ours = tmp_path / "q"
    ours.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a writer on this machine that has ended (a kill)
    host = temp_path(Path("x")).name.split("-")[-3]  # this machine, as ddpm writes it into a temp name
    killed = ours / f".ddpm-tmp-shard-00000.u8-{host}-{dead}-0badc0de"
    running = ours / f".ddpm-tmp-shard-00001.u8-{host}-{os.getpid()}-0badc0de"  # a writer still at work here
    remote, remote_old = ours / ddpm_temp_name("shard-00002.u8"), ours / ddpm_temp_name("shard-00003.u8")
    for f in (killed, running, remote, remote_old):
        f.write_bytes(b"half a shard")
    os.utime(remote_old, (old, old))
    prepare(DataConfig(source=str(src)), ours, progress=False)
    # a writer elsewhere cannot be seen from here: its file goes only once it is an hour old
    assert not killed.exists() and running.exists() and remote.exists() and not remote_old.exists()


def test_a_refused_prepare_changes_nothing(tmp_path, capsys):
    """Refused for an empty source, and for other settings than the folder's: no lock, no mark, no
    folder created, no temp file removed."""
    empty = tmp_path / "empty"
    empty.mkdir()
    _refused(["prepare", empty, "--out", tmp_path / "new", "--no-progress"], capsys, "empty")
    assert not (tmp_path / "new").exists()

    out = tmp_path / "p"
    out.mkdir()
    (out / ddpm_temp_name("shard-00000.u8")).write_bytes(b"a killed writer's")
    before = snapshot(out)
    _refused(["prepare", empty, "--out", out, "--no-progress"], capsys, "empty")
    assert snapshot(out) == before

    src = _pngs(tmp_path / "imgs")
    assert main(["prepare", str(src), "--out", str(out), "--no-progress"]) == 0
    (out / ddpm_temp_name("manifest.json")).write_bytes(b"a killed writer's")
    before = snapshot(out)
    _refused(["prepare", src, "--out", out, "--resolution", "8", "--no-progress"], capsys, "other settings")
    assert snapshot(out) == before


def test_report_never_replaces_a_page_it_did_not_write(run, tmp_path, capsys):
    page = tmp_path / "n.html"
    page.write_text("<!DOCTYPE html><html><body>my notes</body></html>")
    _refused(["report", run, "--out", page], capsys, "n.html")
    assert page.read_text() == "<!DOCTYPE html><html><body>my notes</body></html>"
    mine = tmp_path / "r.html"
    assert main(["report", str(run), "--out", str(mine)]) == 0
    first = mine.read_bytes()
    mine.write_bytes(first.replace(b"<h2>Training</h2>", b"<h2>Old</h2>"))
    assert main(["report", str(run), "--out", str(mine)]) == 0  # ddpm's own page: replaced
    assert b"<h2>Old</h2>" not in mine.read_bytes() and b"<h2>Training</h2>" in mine.read_bytes()


def _diffusers_folder(folder: Path) -> Path:
    """A pipeline folder that diffusers wrote (save_pretrained), with the user's model card."""
    diffusers = pytest.importorskip("diffusers")
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 8), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler()).save_pretrained(folder)
    (folder / "README.md").write_text("# my model\n")
    return folder


def test_export_and_convert_never_replace_a_diffusers_folder_they_did_not_write(run, tmp_path, capsys):
    pipe = _diffusers_folder(tmp_path / "pipe")
    before = snapshot(pipe)
    _refused(["export", run, pipe], capsys, "pipe")
    _refused(["convert", run / "ckpt-00000002.safetensors", pipe / "unet", "--from", "ddpm", "--to", "diffusers"],
             capsys, "config.json")
    assert snapshot(pipe) == before
    # their own output, written again: replaced
    for _ in range(2):
        assert main(["export", str(run), str(tmp_path / "mine")]) == 0
        assert main(["convert", str(run / "ckpt-00000002.safetensors"), str(tmp_path / "unet"), "--from", "ddpm",
                     "--to", "diffusers"]) == 0


def test_rate_distortion_never_writes_into_a_users_folder(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "rate_distortion.csv").write_text("t,rate\n1,2\n")
    before = snapshot(mine)
    _refused(["rate-distortion", "--from-nll", tmp_path / "nll", "--out", mine],
             capsys, "rate_distortion.csv")
    assert snapshot(mine) == before


def test_eval_never_takes_a_users_folder_for_an_evaluation(run, tmp_path):
    """A folder with an eval.json and a samples/ folder of the user's is not an evaluation of ddpm's."""
    from ddpm.run.load import ModelSpec
    from ddpm.workflows.evaluate import EvalSpec, evaluate_run
    mine = tmp_path / "ev"
    (mine / "samples").mkdir(parents=True)
    (mine / "samples" / "0.png").write_bytes(b"my picture")
    (mine / "eval.json").write_text('{"fid": 1.0}')
    before = snapshot(mine)
    with pytest.raises(UserError, match="eval.json"):
        evaluate_run(ModelSpec(run), EvalSpec(n=2, batch=2, bpd_n=0), out_dir=mine, progress=False)
    assert snapshot(mine) == before


# ---------------------------------------------------------------------------------------------
# Every rerun after an interruption or a refusal finishes the job
# ---------------------------------------------------------------------------------------------


def test_an_export_interrupted_after_its_unet_is_written_finishes_when_run_again(run, tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    out = tmp_path / "pipe"
    real = export_module.write_json

    def interrupted(path, obj):
        if Path(path).name == "model_index.json":
            raise KeyboardInterrupt
        return real(path, obj)

    monkeypatch.setattr(export_module, "write_json", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_module.export_run(run, out)
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file() and not (out / "model_index.json").exists()
    monkeypatch.undo()
    export_module.export_run(run, out)
    import diffusers
    diffusers.DDPMPipeline.from_pretrained(out)


def test_prepare_into_a_folder_inside_its_source_runs_again(tmp_path):
    src = _pngs(tmp_path / "d")
    first = prepare(DataConfig(source=str(src)), src / "prep", progress=False)
    again = prepare(DataConfig(source=str(src)), src / "prep", progress=False)
    assert len(again) == len(first) == 8 and again.fingerprint() == first.fingerprint()


def test_training_into_a_folder_inside_its_data_resumes(tmp_path, monkeypatch):
    """The run's own sample grids (PNGs in D/run/samples) are not read as training images."""
    monkeypatch.setenv("DDPM_CACHE_DIR", str(tmp_path / "cache"))
    data = _pngs(tmp_path / "d", side=32)
    args = ["train", *TINY, "--data", str(data), "--out", str(data / "run"), "--checkpoint-every", "2",
            "--set", "train.sample_every=2", "--set", "train.sample_n=2"]
    assert main(args + ["--steps", "2"]) == 0
    assert list((data / "run").rglob("*.png"))  # the grids the listing must leave out
    monkeypatch.setenv("DDPM_CACHE_DIR", str(tmp_path / "cache2"))  # listed and prepared again, not found cached
    assert main(args + ["--steps", "4"]) == 0
    assert (data / "run" / "ckpt-00000004.safetensors").is_file()


def test_a_refused_command_creates_nothing_and_the_corrected_rerun_finishes(run, tmp_path, capsys):
    """Each refusal comes before anything is written (the output folder is not even created);
    then the same command with the argument corrected finishes."""
    ckpt = run / "ckpt-00000002.safetensors"
    npz = tmp_path / "test.npz"
    np.savez(npz, x=np.random.RandomState(1).randint(0, 256, (2, 32, 32), dtype=np.uint8))
    cases = [  # (argv with {out}, the bad part, its correction)
        (["sample", "--checkpoint", ckpt, "--n", "2", "--out", "{out}", "--no-progress"], ["--seed", "-1"], ["--seed", "0"]),
        (["nll", "--checkpoint", ckpt, "--data", npz, "--out", "{out}", "--no-progress"], ["--seed", "-1"], []),
        (["progressive", "--checkpoint", ckpt, "--n-chains", "1", "--times", "20,1", "--out", "{out}", "--no-progress"],
         ["--seed", "-1"], []),
        (["reconstruct", tmp_path / "a.png", "--checkpoint", ckpt, "--t", "0,5", "--out", "{out}", "--no-progress"],
         ["--seed", "-1"], []),
        (["train", *TINY, "--steps", "2", "--out", "{out}"], ["--data", tmp_path / "missing.npz"], ["--data", npz]),
        (["demo", "--steps", "1", "--out", "{out}", "--no-progress"], ["--n", "0"], None),  # the rerun: make demo
    ]
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "a.png")
    for k, (argv, bad, good) in enumerate(cases):
        out = tmp_path / f"out{k}"
        line = [out if a == "{out}" else a for a in argv]
        capsys.readouterr()
        assert main([str(a) for a in line + bad]) == 2, argv
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
        assert not out.exists(), f"{argv[0]} created {out} before refusing"
        if good is not None:
            assert main([str(a) for a in line + good]) == 0, argv
