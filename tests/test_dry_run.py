"""`--dry-run` on train, sample and eval: the plan is printed and nothing is written."""

import json
import re

import pytest

from ddpm.cli import main


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dry")
    assert main(["train", "--preset", "tiny", "--out", str(root / "run"), "--steps", "2", "--checkpoint-every", "2",
                 "--set", "diffusion.T=20", "--set", "model.num_classes=10", "--no-progress"]) == 0
    return root / "run"


def test_train_dry_run_prints_the_plan_and_writes_nothing(tmp_path, run, capsys):
    before = _files(run)
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "new"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    config = json.loads(out[out.index("{"): out.index("\nmodel:") + 1])
    assert config["model"]["ch"] == 32 and "parameters" in out and "GFLOPs" in out
    assert "10000 images 1x32x32, 10 classes" in out and "new; would train steps 1 … 20" in out
    assert "\nprecision: fp32\n" in out
    assert not (tmp_path / "new").exists()
    assert main(["train", "--preset", "tiny", "--out", str(tmp_path / "new"), "--set", "train.precision=auto",
                 "--dry-run"]) == 0
    assert re.search(r"\nprecision: auto -> (bf16|fp32) \(cpu: [^)]+\)\n", capsys.readouterr().out)
    assert main(["train", "--out", str(run), "--steps", "4", "--dry-run"]) == 0
    assert "would resume from ckpt-00000002.safetensors (step 2 of 4)" in capsys.readouterr().out
    assert _files(run) == before


def test_sample_and_eval_dry_runs_write_nothing(tmp_path, run, capsys):
    before = _files(run)
    assert main(["sample", "--run", str(run), "--per-class", "2", "--guidance", "3", "--out", str(tmp_path / "s"),
                 "--precision", "bf16", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would draw 20 of 20 images" in out and "of twice the batch (guided)" in out and "guidance 3" in out
    assert "\nprecision: bf16\n" in out
    assert main(["eval", "--run", str(run), "--n", "50", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would draw 50 samples (Algorithm 2, T = 20)" in out and "eval.json" in out and "\nprecision: fp32\n" in out
    assert not (tmp_path / "s").exists() and _files(run) == before
