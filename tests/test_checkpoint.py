"""Checkpoint files: exact round trips, atomic writes, verification, pruning, no pickle.

The facts come from outside the code: an optimizer continued in one process must match one
restored from disk bit for bit; safetensors' own reader must read what we write; real kernel
write errors (RLIMIT_FSIZE) and simulated ENOSPC must leave earlier files intact; a pickle whose
unpickling would create a file must never create it.
"""

import errno
import json
import math
import os
import pickle
import random
import signal
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

import ddpm.io.checkpoint as ckpt
from ddpm.io.checkpoint import (
    CheckpointWarning,
    CheckpointWriteError,
    CorruptCheckpointError,
    checkpoint_path,
    flatten,
    get_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    save_weights,
    set_rng_state,
    unflatten,
)
from ddpm.errors import UserError


# ---------------------------------------------------------------------------- helpers


def _train_steps(model, opt, n):
    """n Adam steps on data drawn from the global torch RNG (so the RNG state matters too)."""
    for _ in range(n):
        x = torch.randn(8, 4)
        loss = (model(x) - x[:, :3].sin()).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def _small_state(scale=1.0):
    return {"model": {"w": torch.full((2, 3), scale), "b": torch.arange(3.0)}, "step": 1, "config": {"lr": 1e-4}}


def _steps(run_dir):
    return [s for s, _ in list_checkpoints(run_dir)]


def _leftovers(run_dir):
    return sorted(p.name for p in Path(run_dir).iterdir() if p.name.startswith(".tmp"))


def _assert_tree_equal(a, b):
    """Equal values and exact types; any mapping (a state dict's OrderedDict) comes back a dict."""
    assert type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict)), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())
    elif isinstance(a, dict):
        assert list(a) == list(b) and [type(k) for k in a] == [type(k) for k in b]
        for k in a:
            _assert_tree_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_tree_equal(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


# ---------------------------------------------------------------------------- round trips


def test_adam_resume_is_bitwise_identical(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.99))
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    _train_steps(model, opt, 3)
    state = {
        "model": model.state_dict(),
        "ema": ema,
        "optimizer": opt.state_dict(),
        "rng": get_rng_state(),
        "step": 3,
        "data": {"epoch": 0, "position": 24},
        "config": {"channels": (128, 256), "dropout": 0.1, "schedule": "linear", "seed": None},
    }
    path = save_checkpoint(tmp_path, 3, state)
    assert path == tmp_path / "ckpt-00000003.safetensors"
    loaded = load_checkpoint(path)
    _assert_tree_equal(loaded, state)  # before training on: Adam updates its state in place
    _train_steps(model, opt, 3)  # the uninterrupted run

    torch.manual_seed(123)  # a different process: other init, other RNG position
    fresh = nn.Linear(4, 3)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.5)
    fresh.load_state_dict(loaded["model"])
    fresh_opt.load_state_dict(loaded["optimizer"])
    set_rng_state(loaded["rng"])
    _train_steps(fresh, fresh_opt, 3)

    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p, q)
    for s, t in zip(opt.state.values(), fresh_opt.state.values()):
        for k in s:
            assert torch.equal(s[k], t[k])
    assert fresh_opt.param_groups[0]["betas"] == (0.8, 0.99)
    assert loaded["step"] == 3 and loaded["data"] == {"epoch": 0, "position": 24}


def test_flatten_round_trips_types_exactly():
    base = torch.arange(12.0).reshape(3, 4)
    tree = {
        "t": base,
        "view": base.t(),  # non-contiguous, shares storage with "t"
        "tied": base,  # the same tensor twice
        "dtypes": [torch.tensor(True), torch.zeros(0, 3), torch.ones(2, dtype=torch.bfloat16),
                   torch.tensor(7, dtype=torch.int64), torch.tensor([1, 2], dtype=torch.uint8)],
        "ints": {0: "zero", 1: (1, 2.5, None, True), "0": "string zero"},
        "$weird": {"$tensor": "not a tensor"},
        "nested": {"a": [{}, [], (), ""], "b": -0.0, "c": 10**20, "d": float("nan")},
    }
    tensors, meta = flatten(tree)
    json.dumps(meta)  # JSON-able
    assert all(t.is_contiguous() and t.device.type == "cpu" for t in tensors.values())
    back = unflatten(tensors, json.loads(json.dumps(meta)))
    _assert_tree_equal(back, tree)
    assert math.copysign(1.0, back["nested"]["b"]) == -1.0
    assert base.is_contiguous() and torch.equal(base, torch.arange(12.0).reshape(3, 4))  # input untouched


def test_flatten_rejects_what_it_cannot_round_trip():
    with pytest.raises(TypeError, match="ndarray.*'opt'"):
        flatten({"opt": {"x": np.zeros(2)}})
    with pytest.raises(TypeError, match="complex"):
        flatten({"z": torch.zeros(2, dtype=torch.complex64)})


def test_checkpoint_round_trip_through_disk(tmp_path):
    tree = {"state": {0: {"exp_avg": torch.randn(3)}}, "groups": [{"betas": (0.9, 0.999), "params": [0]}],
            "flags": (True, False, None), "w": torch.randn(5, 5).t()}
    loaded = load_checkpoint(save_checkpoint(tmp_path, 0, tree))
    _assert_tree_equal(loaded, tree)


def test_rng_round_trip():
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    torch.randn(3), np.random.randn(3), random.random(), random.gauss(0, 1)  # leaves a cached gauss
    saved = get_rng_state()
    expected = (torch.randn(4), torch.randint(0, 10**6, (4,)), np.random.randn(4), np.random.randint(10**6),
                random.random(), random.gauss(0, 1))
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    set_rng_state(flatten_unflatten(saved))
    again = (torch.randn(4), torch.randint(0, 10**6, (4,)), np.random.randn(4), np.random.randint(10**6),
             random.random(), random.gauss(0, 1))
    assert torch.equal(expected[0], again[0]) and torch.equal(expected[1], again[1])
    assert np.array_equal(expected[2], again[2]) and expected[3:] == again[3:]


def flatten_unflatten(tree):
    tensors, meta = flatten(tree)
    return unflatten(tensors, json.loads(json.dumps(meta)))


def test_rng_states_for_absent_devices_warn():
    state = get_rng_state()
    state["cuda/63"] = torch.zeros(16, dtype=torch.uint8)
    with pytest.warns(CheckpointWarning, match="cuda/63"):
        set_rng_state(state)


def test_weights_round_trip_and_interop(tmp_path):
    model = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2))
    config = {"ch": 128, "ch_mult": [1, 2, 2, 2], "dropout": 0.1, "attn": None}
    path = save_weights(tmp_path / "model.safetensors", model.state_dict(), config)
    sd, cfg = load_weights(path)
    assert cfg == config
    assert set(sd) == set(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(sd[k], v)
    # Another implementation reads our writer's output: safetensors' own loader.
    plain = safetensors.torch.load_file(str(path))
    assert set(plain) == set(model.state_dict()) and all(torch.equal(plain[k], sd[k]) for k in sd)
    # A weights file is not a checkpoint and vice versa; both say so in one line.
    with pytest.raises(UserError, match="exported weights"):
        load_checkpoint(path)
    with pytest.raises(UserError, match="training checkpoint"):
        load_weights(save_checkpoint(tmp_path / "run", 1, _small_state()))
    with pytest.raises(UserError, match="name it model.safetensors"):
        save_weights(tmp_path / "model.pt", model.state_dict(), config)


def test_foreign_safetensors_is_rejected_with_a_hint(tmp_path):
    path = tmp_path / "ckpt-00000001.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CorruptCheckpointError, match="ddpm convert"):
        load_checkpoint(path)


# ---------------------------------------------------------------------------- verification


def test_file_is_plain_safetensors(tmp_path):
    path = save_checkpoint(tmp_path, 7, _small_state())
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    assert data[8:9] == b"{" and (8 + n) % 8 == 0
    assert set(header) == {"__metadata__", "model/w", "model/b"}
    end = max(v["data_offsets"][1] for k, v in header.items() if k != "__metadata__")
    assert 8 + n + end == len(data)  # nothing but header and tensor bytes
    assert json.loads(header["__metadata__"]["ddpm"])["step"] == 7
    assert not data.startswith((b"\x80", b"PK"))


def test_loading_never_unpickles(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path, 1, _small_state())

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle / torch.load used while loading a checkpoint")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2, 3))
    source = Path(ckpt.__file__).read_text()
    assert "import pickle" not in source and "torch.load(" not in source


class _Payload:
    """Unpickling this creates `self.marker`: the proof that a file was unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_crafted_pickle_is_rejected_without_running(tmp_path, writer):
    run = tmp_path / "run"
    save_checkpoint(run, 3, _small_state())
    # The payload is live: unpickling it really does create a marker file.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.exists()

    marker = tmp_path / "pwned"
    evil = checkpoint_path(run, 9)
    if writer == "pickle":
        evil.write_bytes(pickle.dumps(_Payload(marker)))
    else:
        torch.save({"model": _Payload(marker)}, evil)
    with pytest.raises(CorruptCheckpointError, match="ckpt-00000009.*pickle"):
        load_checkpoint(evil)
    with pytest.raises(CorruptCheckpointError):
        load_weights(evil)
    with pytest.warns(CheckpointWarning, match="ckpt-00000009.*ckpt-00000003"):
        found = latest_checkpoint(run)
    assert found[0].name == "ckpt-00000003.safetensors"
    assert not marker.exists()


def test_a_header_length_that_starts_like_a_pickle_still_loads(tmp_path):
    # A safetensors file begins with its header's length (8 bytes, little-endian); when that length
    # is 0x…80 the file's first byte is the pickle protocol marker 0x80. Such files are checkpoints.
    hits = 0
    for k in range(256):  # each character lengthens the header by one byte: every low byte occurs
        state = dict(_small_state(1.0), note="x" * k)
        path = save_checkpoint(tmp_path / str(k), 1, state)
        if path.read_bytes()[:1] == b"\x80":
            hits += 1
            assert load_checkpoint(path)["note"] == state["note"]
    assert hits >= 1


def test_truncation_is_detected_and_latest_falls_back(tmp_path):
    save_checkpoint(tmp_path, 1, _small_state(1.0))
    path = save_checkpoint(tmp_path, 2, _small_state(2.0))
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    for cut in (0, 5, 8, 9, 8 + n // 2, 8 + n, 8 + n + 3, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(CorruptCheckpointError, match="ckpt-00000002"):
            load_checkpoint(path)
    with pytest.warns(CheckpointWarning, match=r"skipping damaged checkpoint ckpt-00000002.*resuming from ckpt-00000001"):
        found_path, state = latest_checkpoint(tmp_path)
    assert found_path.name == "ckpt-00000001.safetensors"
    assert torch.equal(state["model"]["w"], torch.full((2, 3), 1.0))


def test_every_bit_flip_is_detected(tmp_path):
    """Every single-bit flip anywhere in the file: length, header, padding and tensor bytes."""
    path = save_checkpoint(tmp_path, 4, {"w": torch.arange(6, dtype=torch.float32), "step": 4})
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert len(data) - (8 + n) == 24  # the tensor bytes are covered below, not only the header
    for i in range(len(data)):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[i] ^= 1 << bit
            path.write_bytes(bytes(flipped))
            with pytest.raises(CorruptCheckpointError):
                load_checkpoint(path)
    path.write_bytes(data)
    assert load_checkpoint(path)["step"] == 4


def test_bit_flip_in_tensor_bytes_and_fallback(tmp_path):
    save_checkpoint(tmp_path, 10, _small_state(1.0))
    path = save_checkpoint(tmp_path, 20, _small_state(2.0))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # last byte of the last tensor: still valid safetensors, wrong value
    path.write_bytes(bytes(data))
    assert safetensors.torch.load_file(str(path))  # structurally fine: only the checksum can tell
    with pytest.raises(CorruptCheckpointError, match="ckpt-00000020.*checksum mismatch"):
        load_checkpoint(path)
    with pytest.warns(CheckpointWarning, match="ckpt-00000020"):
        assert latest_checkpoint(tmp_path)[0].name == "ckpt-00000010.safetensors"


def test_no_valid_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    assert latest_checkpoint(tmp_path / "absent") is None
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "ckpt-00000001.safetensors").write_bytes(b"garbage")
    with pytest.raises(CorruptCheckpointError, match="no usable checkpoint.*ckpt-00000001"):
        latest_checkpoint(tmp_path)


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_checkpoint(tmp_path / "ckpt-00000001.safetensors")


# ---------------------------------------------------------------------------- failed writes


def _fail_after(budget):
    real_write = os.write
    left = [budget]

    def write(fd, data):
        if left[0] <= 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real_write(fd, bytes(memoryview(data)[: left[0]]))
        left[0] -= n
        return n

    return write


@pytest.mark.parametrize("budget", [0, 100, 10_000])
def test_disk_full_leaves_previous_checkpoint_intact(tmp_path, monkeypatch, budget):
    save_checkpoint(tmp_path, 1, _small_state(1.0))
    before = (tmp_path / "ckpt-00000001.safetensors").read_bytes()
    monkeypatch.setattr(os, "write", _fail_after(budget))
    big = {"model": {"w": torch.randn(64, 64)}}  # 16 KiB: the budget runs out mid-write
    with pytest.raises(CheckpointWriteError) as info:
        save_checkpoint(tmp_path, 2, big)
    monkeypatch.undo()
    msg = str(info.value)
    assert "\n" not in msg
    assert "ckpt-00000002.safetensors" in msg and "No space left on device" in msg
    assert "free disk space and run the same command again" in msg
    assert "previous checkpoint ckpt-00000001.safetensors is intact" in msg
    assert _steps(tmp_path) == [1] and _leftovers(tmp_path) == []
    assert (tmp_path / "ckpt-00000001.safetensors").read_bytes() == before
    assert latest_checkpoint(tmp_path)[0].name == "ckpt-00000001.safetensors"


def test_replacing_a_checkpoint_that_fails_keeps_the_old_one(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path, 5, _small_state(1.0))
    monkeypatch.setattr(os, "write", _fail_after(50))
    with pytest.raises(CheckpointWriteError):
        save_checkpoint(tmp_path, 5, _small_state(2.0))
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2, 3))
    assert _leftovers(tmp_path) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE / SIGXFSZ are POSIX, checked on Linux")
def test_real_kernel_write_error_is_reported(tmp_path):
    """The kernel refuses the write (file-size limit → EFBIG), nothing is mocked."""
    import resource

    save_checkpoint(tmp_path, 1, _small_state())
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, hard))
    try:
        with pytest.raises(CheckpointWriteError, match=r"File too large.*ckpt-00000001.safetensors is intact"):
            save_checkpoint(tmp_path, 2, {"w": torch.zeros(100_000)})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert _steps(tmp_path) == [1] and _leftovers(tmp_path) == []
    load_checkpoint(tmp_path / "ckpt-00000001.safetensors")


def test_interrupted_write_removes_its_temp_file(tmp_path, monkeypatch):
    def interrupted(fd, data):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 1, _small_state())
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []


def test_leftover_temp_files_are_ignored_and_stale_ones_cleaned(tmp_path):
    save_checkpoint(tmp_path, 1, _small_state())
    stale = tmp_path / ".ddpm-tmp-ckpt-00000002.safetensors-node7-123-deadbeef"
    fresh = tmp_path / ".ddpm-tmp-ckpt-00000002.safetensors-node7-456-cafecafe"  # another writer, mid-write
    # a user's files, as old, with names close to ours: never ours to delete
    users = [tmp_path / n for n in (".tmp-ckpt-00000002.safetensors-123-deadbeef", ".tmp-notes", ".ddpm-tmp-notes",
                                    ".ddpm-tmp-x-node7-123-DEADBEEF", ".ddpm-tmp-x-node7-123-deadbeef.bak")]
    old = time.time() - 2 * 3600
    for p in (stale, fresh, *users):
        p.write_bytes(b"half a checkpoint")
        if p is not fresh:
            os.utime(p, (old, old))
    assert latest_checkpoint(tmp_path)[0].name == "ckpt-00000001.safetensors"
    save_checkpoint(tmp_path, 3, _small_state())
    assert not stale.exists() and fresh.exists()
    assert all(p.read_bytes() == b"half a checkpoint" for p in users)


# ---------------------------------------------------------------------------- pruning


def test_pruning_keeps_last_k_and_milestones(tmp_path):
    others = ["notes.txt", "ckpt-5.safetensors", "ckpt-00000001.json", "model.safetensors", "ckpt-00000001.pt"]
    for name in others:
        (tmp_path / name).write_text("keep me")
    for step in range(1, 11):
        save_checkpoint(tmp_path, step, _small_state(step), keep_last=2, milestone_every=4)
    assert _steps(tmp_path) == [4, 8, 9, 10]
    assert all((tmp_path / name).read_text() == "keep me" for name in others)
    # Resuming from step 4 and saving there again never deletes the newer history, 8-10.
    save_checkpoint(tmp_path, 5, _small_state(5), keep_last=1, milestone_every=None)
    assert _steps(tmp_path) == [5, 8, 9, 10]


def test_pruning_never_deletes_the_one_just_written(tmp_path):
    for step in (100, 200, 300):
        save_checkpoint(tmp_path, step, _small_state(), keep_last=1)
        assert _steps(tmp_path) == [step]
    big = 123_456_789  # more than 8 digits still sorts by step, not by name
    save_checkpoint(tmp_path, big, _small_state(), keep_last=2)
    assert _steps(tmp_path) == [300, big]


def test_bad_arguments_are_user_errors(tmp_path):
    for kwargs in ({"keep_last": 0}, {"milestone_every": 0}):
        with pytest.raises(UserError):
            save_checkpoint(tmp_path, 1, _small_state(), **kwargs)
    with pytest.raises(UserError, match="step"):
        save_checkpoint(tmp_path, -1, _small_state())
    assert list(tmp_path.iterdir()) == []
