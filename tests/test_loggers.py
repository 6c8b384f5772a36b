"""train.logger: the scalars of metrics.jsonl and the sample grids go to TensorBoard and to Weights &
Biases too (the real packages, from the test extra; W&B offline), and a resumed run logs into the
same W&B run. What they hold is read back from their own files: TensorBoard's event files through
its EventAccumulator, W&B's offline run through its protobuf records."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddpm.errors import UserError
from ddpm.run.config import RunConfig
from ddpm.workflows.train import train


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """A tiny run logged to jsonl, TensorBoard and W&B (offline): 4 steps, then resumed to 6."""
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    root = tmp_path_factory.mktemp("loggers")
    np.savez(root / "d.npz", x=np.random.default_rng(0).integers(0, 256, (8, 32, 32), dtype=np.uint8))
    run = RunConfig.from_preset("tiny", data=str(root / "d.npz"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")  # no account, no network
        mp.setenv("WANDB_SILENT", "true")
        for steps in (4, 6):
            train(root / "run", run.replace(diffusion=run.diffusion.replace(T=20), train=run.train.replace(
                steps=steps, log_every=2, checkpoint_every=2, sample_every=2, sample_n=2,
                logger="jsonl,tensorboard,wandb")), progress=False)
    run_dir = root / "run"
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [2, 4, 6]
    return run_dir, recs


def grid(run_dir: Path, step: int) -> np.ndarray:
    return np.asarray(Image.open(run_dir / "samples" / f"step-{step:08d}.png"))


def test_tensorboard_holds_the_jsonl_scalars_and_the_grids(logged):
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    run_dir, recs = logged
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={IMAGES: 0})  # 0: keep every image
    acc.Reload()
    for k in ("loss", "lr", "grad_norm", "loss_q0", "loss_q3"):
        events = acc.Scalars(f"train/{k}")
        assert [e.step for e in events] == [2, 4, 6], k
        # TensorBoard keeps float32: the same value to float32's precision
        assert [np.float32(e.value) for e in events] == [np.float32(r[k]) for r in recs], k
    images = acc.Images("samples")
    assert [e.step for e in images] == [2, 4, 6]
    for e in images:
        pixels = np.asarray(Image.open(io.BytesIO(e.encoded_image_string)))
        want = grid(run_dir, e.step)
        assert np.array_equal(pixels[..., 0] if pixels.ndim == 3 else pixels, want)


def wandb_records(path: Path) -> list:
    """The records of a W&B run file. W&B writes them in LevelDB's log format: after its own 7-byte
    header (":W&B", a magic number, a version), 32 KiB blocks of chunks, each with a 7-byte header
    (CRC-32, length, type: 1 whole, 2 first, 3 middle, 4 last); each record is a protobuf Record of
    wandb_internal.proto. The wandb package no longer ships a reader for it."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, part, out = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        n, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        part += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(part)
            out.append(record)
            part = b""
    return out


def test_wandb_holds_the_jsonl_scalars_and_the_grids_and_a_resume_keeps_its_run(logged):
    run_dir, recs = logged
    run_id = (run_dir / "wandb-run-id").read_text()
    files = sorted((run_dir / "wandb").glob("offline-run-*/*.wandb"))
    assert len(files) == 2  # the first process and the resumed one
    history, ids = {}, []
    for f in files:
        for r in wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                ids.append(r.run.run_id)
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
                history[items["_step"]] = (f.parent, items)
    assert ids == [run_id, run_id]  # one W&B run, continued
    assert sorted(history) == [2, 4, 6]
    for r in recs:
        folder, items = history[r["step"]]
        for k, v in r.items():
            if k != "step" and v is not None:
                assert items[f"train/{k}"] == v, k  # W&B's JSON keeps the float64 exactly
        assert items["samples/_type"] == "image-file"
        pixels = np.asarray(Image.open(folder / "files" / items["samples/path"]))
        assert np.array_equal(pixels, grid(run_dir, r["step"]))


def test_unknown_loggers_are_one_line(tmp_path):
    with pytest.raises(UserError, match="jsonl, tensorboard, wandb"):
        RunConfig.from_preset("tiny").train.replace(logger="jsonl,mlflow")
