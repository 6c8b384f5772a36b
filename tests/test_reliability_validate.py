"""Files read back are checked where they are parsed; nothing silent or misleading.

The one-line refusals of damaged and odd files, and of empty values, are cases of the bad-input
sweep (tests/sweep_cases.py, the `r3-` block). Here: what the sweep cannot state, namely that
odd files which are fine are read (names that are not UTF-8, grids that are not ddpm's), that a
damaged file is skipped like any other damage, that every reader of prepared data finds the same
damage, and that a refusal gives its true reason.
"""

import io
import json
import os
import shutil
import zipfile

import numpy as np
import pytest
from PIL import Image

from ddpm.cli import main
from ddpm.config import MAX_JSON_DEPTH, json_depth, parse_json
from ddpm.errors import UserError
from ddpm.io import checkpoint as ck


def _png(path, seed):
    Image.fromarray(np.random.RandomState(seed).randint(0, 256, (32, 32), dtype=np.uint8), "L").save(path)
    return path


def _cli(capsys, argv):
    """`ddpm ARGV` in this process -> (exit status, stdout, stderr lines)."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, [line for line in err.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    """The tiny preset trained 4 steps (T=20), checkpoints at 2 and 4."""
    root = tmp_path_factory.mktemp("validate")
    np.savez(root / "data.npz", x=np.random.RandomState(0).randint(0, 256, (8, 32, 32), dtype=np.uint8))
    assert main(["train", "--preset", "tiny", "--data", str(root / "data.npz"), "--out", str(root / "run"),
                 "--steps", "4", "--checkpoint-every", "2", "--set", "diffusion.T=20", "--no-progress"]) == 0
    return root / "run"


def test_json_depth_counts_nesting_and_ignores_brackets_in_strings():
    for depth in (0, 1, 5, MAX_JSON_DEPTH):
        text = json.dumps(0)
        for i in range(depth):
            text = json.dumps({"k": json.loads(text)} if i % 2 else [json.loads(text)])
        assert json_depth(text) == depth
        assert parse_json(text, "x.json") == json.loads(text)
    assert json_depth(json.dumps(["[[[{{", {"a": "]]\"[["}])) == 2
    with pytest.raises(UserError, match=r"deep\.json: JSON nested more than 64 levels"):
        parse_json("[" * 100_000 + "]" * 100_000, "deep.json")


def test_file_names_that_are_not_utf8_are_read_and_shown_escaped(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    for i in range(2):
        _png(imgs / f"{i}.png", i)
    _png(imgs / os.fsdecode(b"caf\xe9.png"), 2)  # an image: read like the others
    (imgs / os.fsdecode(b"caf\xe9.txt")).write_text("notes")  # not an image: ignored
    (imgs / os.fsdecode(b"bad\xe9.png")).write_bytes(b"not an image")  # unreadable: skipped, named
    # stdout as a pipe with a strict UTF-8 encoding (PYTHONIOENCODING=utf-8) prints such a name too
    strict = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    monkeypatch.setattr("sys.stdout", strict)
    out = os.fsdecode(b"prep\xe9")
    rc, _, err = _cli(capsys, ["prepare", imgs, "--out", out, "--no-progress", "--on-error", "skip"])
    assert rc == 0, err
    strict.flush()
    assert b"prep\\udce9" in strict.buffer.getvalue()
    manifest = (tmp_path / out / "manifest.json").read_bytes().decode("utf-8")
    m = json.loads(manifest)
    assert m["count"] == 3 and len(m["skipped"]) == 1 and m["skipped"][0].endswith("imgs/bad\\xe9.png")
    assert any("bad\\xe9.png" in line for line in err)
    rc, _, err = _cli(capsys, ["train", "--preset", "tiny", "--data", imgs, "--out", tmp_path / "run", "--steps", "1",
                               "--no-progress", "--set", "data.on_error=skip", "--set", "diffusion.T=20"])
    assert rc == 0, err


def test_an_npz_header_claiming_2_62_images_is_refused_as_damaged_not_as_pickled(capsys, tmp_path):
    member = io.BytesIO()
    np.lib.format.write_array_header_1_0(member, {"descr": "|u1", "fortran_order": False, "shape": (2**62, 32, 32)})
    with zipfile.ZipFile(tmp_path / "huge.npz", "w") as z:
        z.writestr("x.npy", member.getvalue() + bytes(16))
    rc, _, err = _cli(capsys, ["train", "--preset", "tiny", "--data", tmp_path / "huge.npz", "--out", tmp_path / "r",
                               "--steps", "1", "--no-progress"])
    assert rc == 2 and len(err) == 1, err
    assert "huge.npz" in err[0] and "damaged" in err[0] and "Python objects" not in err[0], err[0]


def test_every_reader_of_prepared_data_finds_a_swapped_shard(capsys, run, tmp_path):
    data = run.parent / "data.npz"
    prep = tmp_path / "prep"
    assert main(["prepare", str(data), "--out", str(prep), "--no-progress"]) == 0
    shard = prep / "shard-00000.u8"
    swapped = bytes(255 - b for b in shard.read_bytes())  # other bytes, the same size
    shard.write_bytes(swapped)
    lines = {}
    for name, argv in (("verify", ["prepare", prep, "--verify"]),
                       ("nll", ["nll", "--run", run, "--data", prep, "--split", "train", "--n", "2", "--batch", "2",
                                "--out", tmp_path / "nll", "--no-progress"]),
                       ("train", ["train", "--preset", "tiny", "--data", prep, "--out", tmp_path / "r", "--steps", "2",
                                  "--checkpoint-every", "2", "--no-progress", "--set", "diffusion.T=20"])):
        rc, _, err = _cli(capsys, argv)
        err = [line for line in err if ": error: " in line]  # not the progress bar of --verify
        assert rc == 2 and len(err) == 1, (name, err)
        lines[name] = err[0].split(": error: ", 1)[1]
    assert lines["nll"] == lines["verify"] == lines["train"], lines
    assert str(shard) in lines["nll"] and "sha256" in lines["nll"]
    assert shard.read_bytes() == swapped and not (tmp_path / "nll" / "bpd.npz").exists()


def test_a_verified_checkpoint_with_a_header_nested_too_deep_is_skipped_like_a_damaged_one(run, tmp_path):
    import safetensors.torch
    from safetensors import safe_open

    copy = shutil.copytree(run, tmp_path / "run")
    newest = copy / "ckpt-00000004.safetensors"
    with safe_open(str(newest), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header = "[" * 100_000 + "]" * 100_000
    safetensors.torch.save_file(tensors, str(newest), metadata={"ddpm": header,
                                                                "ddpm_sha256": ck._content_hash(header, tensors)})
    with pytest.warns(ck.CheckpointWarning, match=r"ckpt-00000004.*nested more than 64.*ckpt-00000002"):
        path, state = ck.latest_checkpoint(copy)
    assert path.name == "ckpt-00000002.safetensors" and state["step"] == 2


def test_report_leaves_out_grids_ddpm_did_not_name_and_refuses_an_odd_eval_json_before_writing(capsys, run, tmp_path):
    copy = shutil.copytree(run, tmp_path / "run")
    (copy / "samples").mkdir()
    _png(copy / "samples" / "step-00000004.png", 0)
    _png(copy / "samples" / "step-abc.png", 1)
    rc, _, err = _cli(capsys, ["report", copy])
    assert rc == 0, err
    page = (copy / "report.html").read_text()
    assert "EMA samples at step 4" in page and page.count("EMA samples at step") == page.count("EMA samples at step 4")
    (copy / "report.html").unlink()
    (copy / "eval" / "ckpt-00000004").mkdir(parents=True)
    (copy / "eval" / "ckpt-00000004" / "eval.json").write_text(json.dumps({"fid": {"train": [12.5]}}))
    rc, _, err = _cli(capsys, ["report", copy])
    assert rc == 2 and len(err) == 1 and "eval.json" in err[0] and "fid" in err[0], err
    assert not (copy / "report.html").exists()


def test_the_library_takes_no_empty_preset_or_config_path_for_the_default():
    from ddpm.run.config import resolve_run_config

    with pytest.raises(UserError, match="preset=''"):
        resolve_run_config("")
    with pytest.raises(UserError, match="the path is empty"):
        resolve_run_config("tiny", "")
    assert resolve_run_config(None).model == resolve_run_config("cifar10").model  # None: the documented default


def test_a_metrics_line_nested_too_deep_is_dropped_like_a_torn_one(capsys, run, tmp_path):
    copy = shutil.copytree(run, tmp_path / "run")
    with open(copy / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    rc, _, err = _cli(capsys, ["report", copy])
    assert rc == 0 and (copy / "report.html").is_file(), err
    rc, _, err = _cli(capsys, ["train", "--out", copy, "--steps", "5", "--no-progress"])
    assert rc == 0, err
    assert any("dropped 1 unreadable line(s)" in line for line in err), err
    steps = [json.loads(line)["step"] for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == len(set(steps)) and max(steps) == 5
