"""Prepared data: the shards hold exactly the pixels the in-memory loader gives, a killed prepare
resumes without decoding again, damage is one line, training on them equals training in memory
and resumes bit for bit, a raw folder is decoded once, and non-square sizes follow their rule.

Expected values come from outside the code: the arrays the test writes, hashlib, PIL's own
resize, the in-memory placement of the same pixels, an uninterrupted run.
"""

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm import cli
from ddpm.errors import UserError
from ddpm.io import data as data_module
from ddpm.io.atomic import TEMP_PREFIX
from ddpm.io import prepared as prepared_module
from ddpm.io.data import DataConfig, load_images
from ddpm.io.loader import Prefetcher
from ddpm.io.prepared import MANIFEST_NAME, STATE_NAME, PreparedSet, cache_root, open_data, prepare
from ddpm.io.checkpoint import latest_checkpoint
from ddpm.run.config import RunConfig
from ddpm.run.load import ModelSpec
from ddpm.workflows.sample import sample_run
from ddpm.workflows.train import DataOrder, train
from helpers import assert_states_equal

pytestmark = pytest.mark.usefixtures("one_thread")
H, W = 8, 16  # a non-square set: the U-Net runs on any size divisible by 2^(levels-1)
SIZE = f"{H}x{W}"  # (without a resolution, the images' own size is centre-cropped to a square)


def _images(n, h, w, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """13 RGB PNGs of 8x16 in two class subfolders (sorted order: cat/00 … cat/06, dog/00 … dog/05)."""
    root = tmp_path_factory.mktemp("src") / "pets"
    x = _images(13, H, W, seed=1)
    for i, a in enumerate(x):
        cls, k = ("cat", i) if i < 7 else ("dog", i - 7)
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(root / cls / f"{k:02d}.png")
    return root, x


def _record(c=3):
    return c * H * W


def test_prepare_holds_the_pixels_labels_and_hash_of_the_source(folder, tmp_path):
    root, x = folder
    cfg = DataConfig(source=str(root), resolution=SIZE)
    ps = prepare(cfg, tmp_path / "p", shard_bytes=4 * _record(), progress=False)  # 4 images per shard: 4 shards
    m = json.loads((tmp_path / "p" / MANIFEST_NAME).read_text())
    assert (len(ps), ps.shape, m["count"], len(m["shards"])) == (13, (3, H, W), 13, 4)
    assert not (tmp_path / "p" / STATE_NAME).exists()
    expected = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))  # what the test wrote, NCHW
    perm = torch.from_numpy(np.random.default_rng(2).permutation(13))
    assert torch.equal(ps.gather(perm), expected[perm])  # across shards, in the asked order
    assert ps.labels.tolist() == [0] * 7 + [1] * 6 and ps.classes == ("cat", "dog")
    assert ps.fingerprint() == hashlib.sha256(expected.numpy().tobytes()).hexdigest()
    for s in m["shards"]:  # each checksum is the sha256 of its file
        assert s["sha256"] == hashlib.sha256((tmp_path / "p" / s["file"]).read_bytes()).hexdigest()
    ps.verify()
    # the other placement of the same pixels, through the same interface
    mem = ps.load()
    assert torch.equal(mem.images, expected) and torch.equal(mem.labels, ps.labels)
    assert torch.equal(load_images(cfg).gather(perm), ps.gather(perm))


def test_a_killed_prepare_resumes_at_its_first_unfinished_shard(folder, tmp_path, monkeypatch):
    root, x = folder
    cfg = DataConfig(source=str(root), resolution=SIZE)
    decoded = []
    real = data_module.prepare_image

    def counting(src, *a, **k):
        decoded.append(str(src))
        if len(decoded) == 10:  # killed in the middle of the third shard (images 8 … 11)
            raise KeyboardInterrupt
        return real(src, *a, **k)

    monkeypatch.setattr(data_module, "prepare_image", counting)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, tmp_path / "p", shard_bytes=4 * _record(), progress=False)
    state = json.loads((tmp_path / "p" / STATE_NAME).read_text())
    assert [s["count"] for s in state["shards"]] == [4, 4] and not (tmp_path / "p" / MANIFEST_NAME).exists()
    assert not [p for p in (tmp_path / "p").iterdir() if p.name.startswith(TEMP_PREFIX)]  # the half shard is gone
    decoded.clear()
    monkeypatch.setattr(data_module, "prepare_image", lambda *a, **k: (decoded.append(1), real(*a, **k))[1])
    ps = prepare(cfg, tmp_path / "p", shard_bytes=4 * _record(), progress=False)
    assert len(decoded) == 13 - 8  # only the unfinished shards were decoded again
    straight = prepare(cfg, tmp_path / "q", shard_bytes=4 * _record(), progress=False)
    assert ps.fingerprint() == straight.fingerprint()
    assert [s["sha256"] for s in ps.manifest["shards"]] == [s["sha256"] for s in straight.manifest["shards"]]
    # done: running it again opens it; other settings are refused, nothing is touched
    decoded.clear()
    assert prepare(cfg, tmp_path / "p", progress=False).fingerprint() == ps.fingerprint() and not decoded
    with pytest.raises(UserError, match="other settings.*resolution"):
        prepare(cfg.replace(resolution=4), tmp_path / "p", progress=False)


def test_damage_is_one_line_naming_the_file(folder, tmp_path, capsys):
    root, _ = folder
    ps = prepare(DataConfig(source=str(root), resolution=SIZE), tmp_path / "p", shard_bytes=4 * _record(), progress=False)
    shard = tmp_path / "p" / ps.manifest["shards"][1]["file"]
    raw = bytearray(shard.read_bytes())
    raw[5] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=f"{shard.name}: damaged"):
        PreparedSet(tmp_path / "p").verify()  # opening is cheap (sizes); the checksum finds it
    assert cli.main(["prepare", str(tmp_path / "p"), "--verify", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and shard.name in err[0]
    shard.write_bytes(bytes(raw[:-3]))
    with pytest.raises(UserError, match=f"{shard.name}: {len(raw) - 3} bytes, the manifest says {len(raw)}"):
        PreparedSet(tmp_path / "p")
    (tmp_path / "p" / MANIFEST_NAME).write_text('{"format": "ddpm-prepared", "version": 1}')
    with pytest.raises(UserError, match="manifest is damaged"):
        PreparedSet(tmp_path / "p")


def test_training_reports_a_damaged_shard(folder, tmp_path):
    root, _ = folder
    ps = prepare(DataConfig(source=str(root), resolution=SIZE), tmp_path / "p", shard_bytes=4 * _record(),
                 progress=False)
    shard = tmp_path / "p" / ps.manifest["shards"][2]["file"]
    raw = bytearray(shard.read_bytes())
    raw[0] ^= 1
    shard.write_bytes(bytes(raw))
    with pytest.raises(UserError, match=f"{shard.name}: damaged"):  # the background check, joined by the end
        train(tmp_path / "run", _run(tmp_path / "p", 2), progress=False)


def test_the_prefetcher_gives_each_steps_batch(folder, tmp_path):
    root, _ = folder
    ps = prepare(DataConfig(source=str(root), resolution=SIZE), tmp_path / "p", shard_bytes=4 * _record(), progress=False)
    order = DataOrder(len(ps), 5, seed=3)
    with Prefetcher(ps, order.indices, start=2, stop=9, depth=3, workers=2) as loader:
        for step in (2, 3, 4, 7, 8):  # in order, then a jump (a restart at a later step)
            assert torch.equal(loader.get(step), ps.gather(order.indices(step)))


def _run(source, steps, **model):
    run = RunConfig.from_preset("tiny", data=str(source))
    return run.replace(model=run.model.replace(resolution=f"{H}x{W}", attn_resolutions=(4,), **model),
                       diffusion=run.diffusion.replace(T=20), data=run.data.replace(resolution=SIZE),
                       train=run.train.replace(steps=steps, checkpoint_every=2, batch_size=4, log_every=2))


def test_training_on_prepared_data_equals_memory_and_resumes_bit_for_bit(folder, tmp_path):
    root, _ = folder
    p = prepare(DataConfig(source=str(root), resolution=SIZE), tmp_path / "p", shard_bytes=4 * _record(), progress=False)
    mem = load_images(DataConfig(source=str(root), resolution=SIZE))
    train(tmp_path / "mem", _run(root, 4), images=mem, progress=False)
    train(tmp_path / "prep", _run(tmp_path / "p", 4), progress=False)  # opened by path: memory-mapped
    cut = tmp_path / "cut"
    train(cut, _run(tmp_path / "p", 2), progress=False)
    train(cut, _run(tmp_path / "p", 4), progress=False)  # resumed from step 2 (steps is resumable)
    a, b, c = (latest_checkpoint(d)[1] for d in (tmp_path / "mem", tmp_path / "prep", cut))
    assert_states_equal(a, b)
    assert_states_equal(b, c)
    assert a["data"]["sha256"] == b["data"]["sha256"] == p.fingerprint()  # the placement does not change it
    # the non-square run samples at its own size
    res = sample_run(ModelSpec(tmp_path / "prep", device="cpu"), tmp_path / "samples", 2, batch=2, progress=False)
    with np.load(res["npz"]) as z:
        assert z["x"].shape == (2, H, W, 3)  # NHWC, as image files are


def test_a_raw_folder_is_prepared_once_into_the_cache(folder, tmp_path, monkeypatch):
    root, _ = folder
    monkeypatch.setenv(prepared_module.CACHE_ENV, str(tmp_path / "cache"))
    decoded = []
    real = data_module.prepare_image
    monkeypatch.setattr(data_module, "prepare_image", lambda *a, **k: (decoded.append(1), real(*a, **k))[1])
    train(tmp_path / "run", _run(root, 2), progress=False)
    assert len(decoded) == 13 + 1  # the first image (its shape), then all, once
    (entry,) = [d for d in cache_root().iterdir() if d.is_dir()]
    assert (entry / MANIFEST_NAME).is_file() and cache_root() == tmp_path / "cache"
    decoded.clear()
    train(tmp_path / "run", _run(root, 4), progress=False)  # the resume reads the cache: no decoding
    assert decoded == []
    assert isinstance(open_data(DataConfig(source=str(root), resolution=SIZE)), PreparedSet) and decoded == []


def test_non_square_sizes_crop_or_pad_by_their_rule(tmp_path):
    a = _images(1, 20, 60, seed=4)[0]  # 20 x 60 (H x W)
    Image.fromarray(a).save(tmp_path / "x.png")

    def one(**kw):
        return load_images(DataConfig(source=str(tmp_path), **kw)).images[0].permute(1, 2, 0).numpy()

    im = Image.fromarray(a)
    # centre: the largest centred 1:2 region (20 x 40, columns 10 … 49), then Lanczos to 8 x 16
    want = np.asarray(im.crop((10, 0, 50, 20)).resize((16, 8), Image.Resampling.LANCZOS))
    assert np.array_equal(one(resolution="8x16"), want)
    # square (the paper's rule): the centred 20 x 20 square
    assert np.array_equal(one(resolution=8), np.asarray(im.crop((20, 0, 40, 20)).resize((8, 8), Image.Resampling.LANCZOS)))
    # pad: the whole picture fitted to 16 wide (16 x 5, rounded from 5.33), centred on black rows
    padded = one(resolution="16x16", crop="pad")
    fitted = np.asarray(im.resize((16, 5), Image.Resampling.LANCZOS))
    assert np.array_equal(padded[5:10], fitted) and not padded[:5].any() and not padded[10:].any()
    with pytest.raises(UserError, match="data.resolution='8x'"):
        DataConfig(resolution="8x")


def test_a_first_open_parses_recognises_lists_and_fingerprints_the_source_once(folder, tmp_path, monkeypatch):
    """The one data path: opening a folder for the first time (placement, cache key, listing,
    preparing into the cache) parses `data.source` once, recognises its format once, lists its
    images once and walks it for its fingerprint once; the pixels are those of the folder."""
    root, x = folder
    monkeypatch.setenv(prepared_module.CACHE_ENV, str(tmp_path / "cache"))
    calls = {}

    def counted(name):
        real = getattr(data_module, name)

        def wrapper(*a, **k):
            calls[name] = calls.get(name, 0) + 1
            return real(*a, **k)
        monkeypatch.setattr(data_module, name, wrapper)

    for name in ("parse_source", "_recognise", "_list_images", "_stat_lines"):
        counted(name)
    monkeypatch.setattr(prepared_module, "parse_source", data_module.parse_source)
    got = open_data(DataConfig(source=str(root), resolution=f"{H}x{W}"), progress=False)  # as stored: no resize
    assert calls == {"parse_source": 1, "_recognise": 1, "_list_images": 1, "_stat_lines": 3}  # root + 2 class folders
    assert torch.equal(got.gather(torch.arange(len(x))), torch.from_numpy(x.transpose(0, 3, 1, 2)))
