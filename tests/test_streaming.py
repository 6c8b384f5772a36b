"""Object storage through LitData, with a local folder standing in for the bucket (`local:PATH`):
the records, labels and hash survive the round trip, training reads them in our order (equal to a
prepared folder, bit for bit, and resumed exactly), and the bad cases are one line.

LitData is installed by `make test` (without its torchvision); a missing LitData is a failure
here, not a skip.
"""

import base64
import json
import shutil
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


def test_training_from_the_bucket_through_the_cuda_placement_equals_the_prepared_folder(prepared, tmp_path,
                                                                                       monkeypatch):
    """What a CUDA run does with a small set (copy it whole to the device once, gather there),
    taken on the CPU by answering the one question the loop asks, `resident_on_device`, as CUDA
    would: a LitData set must load whole (it once had no `load`), and the run must equal one
    from the prepared folder gathered by the loader, step for step."""
    import ddpm.workflows.train as train_module
    from ddpm.io.loader import Prefetcher

    bucket = write_stream(prepared, tmp_path / "bucket", progress=False)
    train(tmp_path / "prep", _run(prepared.path, 4), progress=False)
    asked, loaders = [], []
    monkeypatch.setattr(train_module, "resident_on_device", lambda device, nbytes: asked.append(nbytes) or True)
    monkeypatch.setattr(train_module, "Prefetcher", lambda *a, **k: loaders.append(a) or Prefetcher(*a, **k))
    train(tmp_path / "cuda-path", _run(f"local:{bucket}", 4), progress=False)
    assert asked == [len(prepared) * prepared.nbytes // len(prepared)] and loaders == []
    a, b = latest_checkpoint(tmp_path / "prep")[1], latest_checkpoint(tmp_path / "cuda-path")[1]
    assert_states_equal(a, b)


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


# ---------------------------------------------------------------------------------------------
# Nothing executes from a data folder: LitData decodes items as index.json says, so a folder is
# read only when its index describes exactly what `write_stream` writes.
# ---------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling it creates the file `marker` (builtins.open by reference: no code of ours runs)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _hostile_folder(folder, marker, meta_from):
    """LitData's own BinaryWriter with items {"x": payload, "y": 0}: its index names the "pickle"
    serializer; our metadata copied in from a real folder, as an attacker would."""
    from litdata.streaming.writer import BinaryWriter

    writer = BinaryWriter(str(folder), chunk_bytes="1MB")
    for i in range(11):
        writer[i] = {"x": _Payload(marker), "y": 0}
    writer.done()
    writer.merge()
    index = json.loads((folder / "index.json").read_text())
    assert index["config"]["data_format"][0] == "pickle"  # the premise: LitData would unpickle these
    index["ddpm"] = json.loads((meta_from / "index.json").read_text())["ddpm"]
    (folder / "index.json").write_text(json.dumps(index))
    return folder


def test_a_folder_of_pickled_items_runs_no_code_in_any_command(prepared, tmp_path, capsys):
    real = write_stream(prepared, tmp_path / "real", progress=False)
    marker = tmp_path / "PWNED"
    evil = _hostile_folder(tmp_path / "evil", marker, real)
    run = tmp_path / "run"
    train(run, _run(prepared.path, 2), progress=False)  # a model for nll
    small = ["--set", "data.resolution=8", "--set", "model.resolution=8", "--set", "model.ch_mult=1,2",
             "--set", "model.attn_resolutions=()"]
    for source in (str(evil), f"local:{evil}"):
        for argv in (["train", "--preset", "tiny", "--data", source, "--out", tmp_path / "r", "--steps", "2", *small],
                     ["nll", "--run", run, "--data", source, "--out", tmp_path / "n"],
                     ["prepare", source, "--to", "litdata", "--out", tmp_path / "p"]):
            rc = cli.main([str(a) for a in argv] + ["--no-progress"])
            err = capsys.readouterr().err.strip().splitlines()
            assert not marker.exists(), (argv, "the payload ran")
            assert rc == 2 and len(err) == 1 and 'config.data_format=["pickle", "int"]' in err[-1], (argv, err)


def _tampered(real, tmp_path, edit):
    folder = tmp_path / "tampered"
    shutil.copytree(real, folder)
    index = json.loads((folder / "index.json").read_text())
    edit(index)
    (folder / "index.json").write_text(json.dumps(index))
    return folder


TAMPERINGS = {  # what an index may say that write_stream never writes -> the field the refusal names
    "graph-pickle": (lambda ix: ix["config"].update(data_format=["graph:pickle", "int"]), "data_format"),
    "one-pickled-leaf": (lambda ix: ix["config"].update(data_format=["numpy", "pickle"]), "data_format"),
    "jpeg-decoder": (lambda ix: ix["config"].update(data_format=["jpeg", "int"]), "data_format"),
    "compressed": (lambda ix: ix["config"].update(compression="zstd"), "compression"),
    "encrypted": (lambda ix: ix["config"].update(encryption={"algorithm": "fernet", "level": "chunk"}), "encryption"),
    "other-item-loader": (lambda ix: ix["config"].update(item_loader="TokensLoader"), "item_loader"),
    "a-setting-we-never-write": (lambda ix: ix["config"].update(format="parquet"), "format"),
    "other-spec": (lambda ix: ix["config"].update(data_spec=json.dumps([1, {"type": None, "context": None,
                                                                            "children_spec": []}])), "data_spec"),
    "no-data-format": (lambda ix: ix["config"].pop("data_format"), "data_format"),
    "chunk-outside-the-folder": (lambda ix: ix["chunks"][0].update(filename="../../outside.bin"), "filename"),
    "chunk-size-string": (lambda ix: ix["chunks"][0].update(chunk_size="11"), "chunk_size"),
    "count-not-the-chunks'": (lambda ix: ix["ddpm"].update(count=12), "count"),
    "shape-of-four": (lambda ix: ix["ddpm"].update(shape=[1, 8, 8, 1]), "shape"),
    "labels-out-of-range": (lambda ix: ix["ddpm"].update(labels=base64.b64encode(
        np.full(11, 7, "<i4").tobytes()).decode()), "labels"),
    "sha256-not-hex": (lambda ix: ix["ddpm"].update(sha256="x" * 64), "sha256"),
    "nested-100000-deep": (lambda ix: ix["config"].update(data_spec="[" * 100000 + "]" * 100000), "data_spec"),
}


@pytest.mark.parametrize("case", list(TAMPERINGS))
def test_an_index_that_is_not_what_ddpm_writes_is_refused_before_litdata_reads(prepared, tmp_path, case, monkeypatch):
    real = write_stream(prepared, tmp_path / "real", progress=False)
    edit, field = TAMPERINGS[case]
    folder = _tampered(real, tmp_path, edit)
    import litdata

    def never(*a, **k):
        raise AssertionError("LitData opened a folder that ddpm had not checked")

    with monkeypatch.context() as m:  # a local folder: refused before LitData sees it
        m.setattr(litdata, "StreamingDataset", never)
        with pytest.raises(UserError, match=field) as e:
            StreamSet(str(folder), tmp_path / "cache")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=field):  # a bucket: its index as fetched into the cache
        StreamSet(f"local:{folder}", tmp_path / "cache")


def test_items_of_another_shape_or_type_than_the_index_says_are_one_line(prepared, tmp_path):
    """The chunks are decoded with LitData's numpy serializer, which takes dtype and shape from the
    item's own bytes: an item that is not uint8 [C, H, W] as the metadata says is refused."""
    from litdata.streaming.writer import BinaryWriter

    real = write_stream(prepared, tmp_path / "real", progress=False)
    for name, x in (("small", np.zeros((1, 4, 4), np.uint8)), ("float", np.zeros((1, 8, 8), np.float32))):
        folder = tmp_path / name
        writer = BinaryWriter(str(folder), chunk_bytes="1MB")
        for i in range(11):
            writer[i] = {"x": x, "y": 0}
        writer.done()
        writer.merge()
        index = json.loads((folder / "index.json").read_text())
        index["ddpm"] = json.loads((real / "index.json").read_text())["ddpm"]
        (folder / "index.json").write_text(json.dumps(index))
        s = StreamSet(str(folder), tmp_path / f"cache-{name}")
        with pytest.raises(UserError, match="item 3 is ndarray"):
            s.gather(torch.tensor([3]))
