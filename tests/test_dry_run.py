"""`--dry-run` on train, sample and eval: the plan must be what the command then does, and nothing is written.

The plan is checked against what is true outside it: the configuration that training saves, the
parameters of the model it builds, the size of the data on disk, the checkpoints in the folder and
the number of images sampling writes."""

import json
import re
from importlib import resources

import numpy as np
import pytest

from ddpm.cli import main
from ddpm.run.load import load_run

ARGS = ["train", "--preset", "tiny", "--steps", "4", "--checkpoint-every", "2", "--set", "diffusion.T=20",
        "--set", "model.num_classes=10", "--no-progress"]


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dry")
    assert main([*ARGS, "--out", str(root / "run")]) == 0
    return root / "run"


def _plan_config(out):
    return json.loads(out[out.index("{"): out.index("\nmodel:") + 1])


def test_train_dry_run_config_and_parameters_are_what_training_builds(tmp_path, run, capsys):
    capsys.readouterr()
    assert main([*ARGS, "--out", str(tmp_path / "new"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    # The parameter count is that of the network training built (as saved in its checkpoint).
    model = load_run(run, "model").model
    assert int(re.search(r"model: ([\d,]+) parameters", out).group(1).replace(",", "")) == \
        sum(p.numel() for p in model.parameters())
    # The resolved configuration is the one the same command, run for real, saved and trained with.
    saved = json.loads((run / "config.json").read_text())
    saved.pop("history")
    assert _plan_config(out) == saved


def test_train_dry_run_is_what_training_does_and_writes_nothing(tmp_path, run, capsys):
    before = _files(run)
    capsys.readouterr()
    assert main([*ARGS, "--out", str(tmp_path / "new"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert not (tmp_path / "new").exists()
    # The steps it would train are those the same command, run for real, trained (its metrics' last step).
    last = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert re.search(r"would train steps 1 … (\d+)", out).group(1) == str(last) == "4"
    # The data line counts the embedded set's images and classes, at the model's resolution.
    with resources.as_file(resources.files("ddpm") / "assets" / "fashion_mnist_10k.npz") as f, np.load(f) as z:
        n, classes = len(z["images"]), len(np.unique(z["labels"]))
    m = re.search(r"data: .*?(\d+) images (\d+)x(\d+)x(\d+), (\d+) classes", out)
    assert tuple(int(g) for g in m.groups()) == (n, 1, 32, 32, classes) == (10000, 1, 32, 32, 10)
    # Resuming names the newest checkpoint in the folder (of two) and its step.
    ckpts = sorted(run.glob("ckpt-*.safetensors"))
    assert len(ckpts) == 2
    assert main(["train", "--out", str(run), "--steps", "6", "--dry-run"]) == 0
    m = re.search(r"would resume from (\S+) \(step (\d+) of 6\)", capsys.readouterr().out)
    assert m.group(1) == ckpts[-1].name and int(m.group(2)) == int(ckpts[-1].stem.split("-")[1]) == 4
    assert _files(run) == before


def test_sample_dry_run_counts_what_sampling_writes(tmp_path, run, capsys):
    before = _files(run)
    args = ["sample", "--run", str(run), "--per-class", "1", "--out", str(tmp_path / "s")]
    assert main([*args, "--dry-run"]) == 0
    m = re.search(r"would draw (\d+) of (\d+) images", capsys.readouterr().out)
    assert not (tmp_path / "s").exists()
    assert main(args) == 0
    written = len(list((tmp_path / "s").glob("*.png"))) - 1  # less grid.png
    assert int(m.group(1)) == int(m.group(2)) == written == 10  # one for each of the 10 classes
    assert _files(run) == before


def test_eval_dry_run_writes_nothing(tmp_path, run, capsys):
    before = _files(run)
    assert main(["eval", "--run", str(run), "--n", "50", "--dry-run"]) == 0
    out = capsys.readouterr().out
    # Algorithm 2 takes T steps: the T that training saved, not the preset's.
    assert int(re.search(r"Algorithm 2, T = (\d+)", out).group(1)) == \
        json.loads((run / "config.json").read_text())["diffusion"]["T"] == 20
    assert not (run / "eval").exists() and _files(run) == before
