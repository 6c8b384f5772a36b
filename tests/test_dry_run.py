"""`--dry-run` on train, sample, eval, inpaint and img2img: the plan must be what the command then does, and nothing is written.

The plan is checked against what is true outside it: the configuration that training saves, the
parameters of the model it builds, the size of the data on disk, the checkpoints in the folder, the
number of images sampling writes and the network evaluations an edit spends (RePaint's and SDEdit's
counts in closed form)."""

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


def test_edit_dry_runs_say_what_the_edits_spend_and_write_nothing(tmp_path, run, capsys):
    from PIL import Image

    img = tmp_path / "a.png"  # another size than the model's 32x32: brought to it as the edit does
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24), dtype=np.uint8)).save(img)
    before = _files(run)
    T = json.loads((run / "config.json").read_text())["diffusion"]["T"]
    inpaint = ["inpaint", str(img), str(img), "--run", str(run), "--out", str(tmp_path / "in"), "--jumps", "2",
               "--resample", "3", "--mask", "half", "--no-progress"]
    img2img = ["img2img", str(img), "--run", str(run), "--out", str(tmp_path / "i2i"), "--strength", "0.5",
               "--no-progress"]
    plans = {}
    for args in (inpaint, img2img):
        capsys.readouterr()
        assert main([*args, "--dry-run"]) == 0
        plans[args[0]] = capsys.readouterr().out
    assert not (tmp_path / "in").exists() and not (tmp_path / "i2i").exists() and _files(run) == before
    cost = {k: re.search(r"would edit (\d+) of (\d+) images .*?([\d,]+) network evaluations each", v).groups()
            for k, v in plans.items()}
    # RePaint over Algorithm 2's T = 20 steps walks each block of 2 steps above positions 1, 3, …, 17 (9
    # blocks) 3 times: T + 9·2·(3 − 1) evaluations. SDEdit at strength 0.5 starts Algorithm 2 at t0 = T/2.
    assert tuple(map(int, cost["inpaint"])) == (2, 2, T + 9 * 2 * (3 - 1)) == (2, 2, 56)
    assert tuple(map(int, cost["img2img"])) == (1, 1, T // 2) == (1, 1, 10)
    assert "50.0% of the pixels to inpaint" in plans["inpaint"]  # the "half" mask
    # what the edits then do: the images written and the evaluations their records count
    for args, out in ((inpaint, "in"), (img2img, "i2i")):
        assert main(args) == 0
        rec = json.loads((tmp_path / out / "edit.json").read_text())
        assert rec["nfe"] == int(cost[args[0]][2])
        assert len(list((tmp_path / out).glob("0*.png"))) == int(cost[args[0]][1])
