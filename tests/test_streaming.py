"""Object storage through LitData, with a local folder standing in for the bucket (`local:PATH`):
the records, labels and hash survive the round trip, training reads them in our order (equal to a
prepared folder, bit for bit, and resumed exactly), and the bad cases are one line.

LitData is installed by `make test` (without its torchvision); a missing LitData is a failure
here, not a skip.
"""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm import cli
from ddpm.errors import UserError
from ddpm.io.checkpoint import latest_checkpoint
from ddpm.io.data import DataConfig
from ddpm.io.prepared import open_data, prepare
from ddpm.io.streaming import StreamSet, write_stream
from ddpm.run.config import RunConfig
from ddpm.workflows.train import train
from helpers import assert_states_equal

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """11 gray 8x8 PNGs in three class folders, prepared (two shards)."""
    root = tmp_path_factory.mktemp("src") / "digits"
    x = np.random.default_rng(5).integers(0, 256, (11, 8, 8), dtype=np.uint8)
    for i, a in enumerate(x):
        (root / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(root / f"c{i % 3}" / f"{i:02d}.png")
    return prepare(DataConfig(source=str(root), resolution=8), tmp_path_factory.mktemp("p") / "p", shard_bytes=6 * 64,
                   progress=False)


def test_a_bucket_round_trip_keeps_pixels_labels_and_hash(prepared, tmp_path):
    bucket = write_stream(prepared, tmp_path / "bucket", chunk_bytes="1KB", progress=False)  # several chunks
    index = json.loads((bucket / "index.json").read_text())
    assert len(index["chunks"]) > 1 and index["ddpm"]["count"] == 11
    s = StreamSet(f"local:{bucket}", tmp_path / "cache")
    perm = torch.from_numpy(np.random.default_rng(0).permutation(11))
    assert torch.equal(s.gather(perm), prepared.gather(perm))
    assert torch.equal(s.labels, prepared.labels) and s.classes == ("c0", "c1", "c2")
    assert s.fingerprint() == prepared.fingerprint() and s.shape == (1, 8, 8)
    assert any((tmp_path / "cache").rglob("*.bin"))  # the chunks were fetched into the local cache
    # the folder itself is a source too, through open_data (as --data takes it)
    assert torch.equal(open_data(DataConfig(source=str(bucket))).gather(perm), prepared.gather(perm))
    # written again with the same data: left as it is; other data there: refused
    assert write_stream(prepared, bucket, progress=False) == bucket
    other = StreamSet(f"local:{bucket}", tmp_path / "cache2")
    other.meta = dict(other.meta, sha256="0" * 64)
    with pytest.raises(UserError, match="other streaming data"):
        write_stream(other, bucket, progress=False)


def _run(source, steps):
    run = RunConfig.from_preset("tiny", data=str(source))
    return run.replace(model=run.model.replace(resolution=8, ch_mult=(1, 2), attn_resolutions=()),
                       data=run.data.replace(resolution=8),
                       train=run.train.replace(steps=steps, batch_size=4, checkpoint_every=2, log_every=2))


def test_training_from_the_bucket_equals_the_prepared_folder_and_resumes_exactly(prepared, tmp_path):
    bucket = write_stream(prepared, tmp_path / "bucket", progress=False)
    train(tmp_path / "prep", _run(prepared.path, 4), progress=False)
    cut = tmp_path / "cut"
    train(cut, _run(f"local:{bucket}", 2), progress=False)
    train(cut, _run(f"local:{bucket}", 4), progress=False)
    a, b = latest_checkpoint(tmp_path / "prep")[1], latest_checkpoint(cut)[1]
    assert_states_equal(a, b)
    assert a["data"]["sha256"] == b["data"]["sha256"]


def test_cli_writes_litdata_and_bad_cases_are_one_line(prepared, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ld"
    assert cli.main(["prepare", str(prepared.path), "--to", "litdata", "--out", str(out), "--no-progress"]) == 0
    assert StreamSet(str(out), tmp_path / "c").fingerprint() == prepared.fingerprint()
    capsys.readouterr()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "index.json").write_text('{"chunks": [], "config": {}}')  # LitData's, not ours
    for argv, needle in ((["prepare", str(prepared.path), "--to", "litdata", "--out", str(tmp_path / "mine")], "mine"),
                         (["train", "--preset", "tiny", "--data", str(tmp_path / "mine"), "--out", str(tmp_path / "r")],
                          "mine")):
        assert cli.main(argv + ["--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    monkeypatch.setitem(sys.modules, "litdata", None)  # not installed
    assert cli.main(["prepare", str(prepared.path), "--to", "litdata", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install --no-deps" in err[0]
