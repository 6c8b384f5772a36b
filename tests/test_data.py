"""Data loading: every source against pixels written in the test by hand, per each format's spec.

Expected values come from outside the loader: the arrays the test itself encoded, the published
byte layouts (idx header, CIFAR-10 row layout, Python 2 pickles), PIL's own decoders, hashlib.
"""

import gzip
import hashlib
import io
import json
import os
import pickle
import struct
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpm.io import data
from ddpm.config import Config
from ddpm.io.data import DataConfig, ImageSet, data_fingerprint, load_images
from ddpm.process.scaling import to_model_range, to_uint8
from ddpm.errors import UserError

ASSETS = Path(data.__file__).parents[1] / "assets"


def load(source, **kw) -> ImageSet:
    return load_images(DataConfig(source=str(source), **kw))


def rng_images(n, h, w, c, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


def nchw(a):  # uint8 NHWC (or NHW) numpy -> NCHW tensor, for comparisons
    a = a[..., None] if a.ndim == 3 else a
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


def save(path, arr, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr).save(path, **kw)


# --- config ------------------------------------------------------------------------------------


def test_config_validation_and_round_trip():
    # What the defaults mean is checked by what they load, not restated here: DataConfig() is the
    # embedded set at its own size, gray kept gray (test_embedded_fashion_mnist_10k), and an
    # unreadable file stops loading (test_unreadable_file_stop_names_path_skip_counts).
    cfg = DataConfig()
    assert isinstance(cfg, Config) and DataConfig.from_dict(cfg.to_dict()) == cfg
    # Strings from the command line / JSON are coerced, including the optional resolution.
    assert DataConfig.from_dict({"resolution": "32", "random_flip": "false"}) == DataConfig(resolution=32, random_flip=False)
    for bad, field in [({"split": "val"}, "data.split"), ({"channels": "rgba"}, "data.channels"), ({"on_error": "ignore"}, "data.on_error")]:
        with pytest.raises(UserError, match=field):
            DataConfig(**bad)
    with pytest.raises(UserError, match="'stop', 'skip'"):
        DataConfig(on_error="warn")
    for r in (0, -3, 2.5, True):
        with pytest.raises(UserError, match="data.resolution"):
            DataConfig(resolution=r)
    with pytest.raises(UserError, match="data.source"):
        DataConfig(source="  ")
    with pytest.raises(UserError, match="takes no path"):
        DataConfig(source="fashion-mnist-10k:/x")


# --- image folders -----------------------------------------------------------------------------


def test_folder_png_round_trip_recursive_sorted(tmp_path):
    imgs = rng_images(5, 8, 8, 3)
    # Class subfolders and nesting; the expected order is the sorted relative path.
    rel = ["cat/b.png", "cat/a.PNG", "dog/deep/x.png", "dog/c.png", "a0.png"]
    for r, im in zip(rel, imgs):
        save(tmp_path / r, im)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "cat" / "._a.png").write_bytes(b"\0\5\7 AppleDouble")  # macOS metadata: hidden, ignored
    s = load(tmp_path)
    order = sorted(range(5), key=lambda i: rel[i])
    assert s.images.dtype == torch.uint8 and s.images.shape == (5, 3, 8, 8)
    assert torch.equal(s.images, nchw(imgs[order]))
    assert (s.channels, s.size, len(s), s.skipped) == (3, (8, 8), 5, [])
    assert str(tmp_path) in s.source_description


def test_folder_gray_png_and_lossless_webp_exact_jpeg_as_pil_decodes(tmp_path):
    gray = rng_images(2, 6, 6, 1, seed=1)
    save(tmp_path / "g" / "0.png", gray[0])
    save(tmp_path / "g" / "1.png", gray[1])
    s = load(tmp_path / "g")
    assert s.channels == 1 and torch.equal(s.images, nchw(gray))

    rgb = rng_images(1, 16, 16, 3, seed=2)
    save(tmp_path / "w" / "0.webp", rgb[0], lossless=True)
    assert torch.equal(load(tmp_path / "w").images, nchw(rgb))

    smooth = np.broadcast_to(np.linspace(0, 255, 16).astype(np.uint8)[None, :, None], (16, 16, 3)).copy()
    save(tmp_path / "j" / "0.JPEG", smooth, quality=95)
    s = load(tmp_path / "j")
    expected = np.asarray(Image.open(tmp_path / "j" / "0.JPEG").convert("RGB"))
    assert torch.equal(s.images, nchw(expected[None]))
    assert (s.images.float() - nchw(smooth[None]).float()).abs().mean() < 3


def _both_placements(folder, tmp_path, **kw):
    """The pixels of `folder` in memory and prepared on disk (io/prepared.py), or the error each gives."""
    from ddpm.io.prepared import prepare

    out = []
    for place in ("memory", "prepared"):
        try:
            if place == "memory":
                out.append(load(folder, **kw).images)
            else:
                cfg = DataConfig(source=str(folder), **kw)
                dest = tmp_path / f"prep-{len(list(tmp_path.iterdir()))}"
                out.append(prepare(cfg, dest, progress=False).load().images)
        except UserError as e:
            out.append(str(e))
    return out


def test_mixed_gray_and_colour_one_rule_in_memory_and_prepared(tmp_path):
    """channels=auto, the rule written once (io/data.py `conformed`): the first image decides. A set
    that starts in colour stays colour, its gray images repeated to RGB; one that starts gray
    refuses a colour image in one line naming it; forcing rgb or gray always works. Both
    placements follow it to the pixel, so memory and prepared shards cannot drift."""
    g = rng_images(1, 4, 4, 1, seed=3)
    c = rng_images(1, 4, 4, 3, seed=4)
    colour_first, gray_first = tmp_path / "cg", tmp_path / "gc"
    save(colour_first / "0.png", c[0])
    save(colour_first / "1.png", g[0])
    save(gray_first / "0.png", g[0])
    save(gray_first / "1.png", c[0])
    work = tmp_path / "work"
    work.mkdir()
    mem, prep = _both_placements(colour_first, work)
    assert torch.equal(mem, nchw(np.concatenate([c, np.repeat(g, 3, axis=3)]))) and torch.equal(prep, mem)
    mem, prep = _both_placements(gray_first, work)
    assert isinstance(mem, str) and mem == prep and "1.png: a colour image" in mem and "channels=rgb" in mem
    mem, prep = _both_placements(gray_first, work, channels="rgb")
    assert torch.equal(mem, nchw(np.concatenate([np.repeat(g, 3, axis=3), c]))) and torch.equal(prep, mem)
    mem, prep = _both_placements(gray_first, work, channels="gray")
    luma = np.array(Image.fromarray(c[0]).convert("L"))  # PIL's luma
    assert torch.equal(mem[1, 0], torch.from_numpy(luma)) and torch.equal(mem[0, 0], torch.from_numpy(g[0, ..., 0]))
    assert torch.equal(prep, mem)


def test_split_subfolders(tmp_path):
    tr, te = rng_images(2, 4, 4, 3, seed=5), rng_images(1, 4, 4, 3, seed=6)
    for i, im in enumerate(tr):
        save(tmp_path / "top" / "train" / "k" / f"{i}.png", im)
    save(tmp_path / "top" / "test" / "k" / "0.png", te[0])
    # The folder given holds only top/: it is descended into, as an archive's root would be.
    assert torch.equal(load(tmp_path).images, nchw(tr))
    assert torch.equal(load(tmp_path / "top", split="test").images, nchw(te))
    only_train = tmp_path / "only"
    save(only_train / "train" / "0.png", tr[0])
    with pytest.raises(UserError, match="no test/"):
        load(only_train, split="test")


def test_odd_modes_channel_counts_and_values(tmp_path):
    rgb = rng_images(1, 4, 4, 3, seed=7)[0]
    cases = {}
    p = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    cases["p.png"] = (p, 3, np.asarray(p.convert("RGB")))
    rgba = np.concatenate([rgb, np.full((4, 4, 1), 255, np.uint8)], axis=2)
    rgba[0, 0, 3] = 0  # fully transparent: composited on white
    cases["rgba.png"] = (Image.fromarray(rgba, "RGBA"), 3, None)
    la = Image.fromarray(np.stack([rgb[..., 0], np.full((4, 4), 255, np.uint8)], axis=2), "LA")
    cases["la.png"] = (la, 1, rgb[..., 0])
    v16 = np.array([[0, 257 * 100, 65535, 257 * 7]] * 4, np.uint16)
    cases["i16.png"] = (Image.fromarray(v16), 1, np.array([[0, 100, 255, 7]] * 4, np.uint8))
    cmyk = Image.fromarray(rgb).convert("CMYK")
    cases["cmyk.jpg"] = (cmyk, 3, None)
    cases["l.png"] = (Image.fromarray(rgb[..., 1], "L"), 1, rgb[..., 1])
    cases["bw.png"] = (Image.fromarray(rgb[..., 2] > 127), 1, np.where(rgb[..., 2] > 127, 255, 0).astype(np.uint8))
    for name, (im, c, expected) in cases.items():
        d = tmp_path / name.replace(".", "_")
        d.mkdir()
        im.save(d / name)
        s = load(d)
        assert s.channels == c, name
        got = s.images[0].permute(1, 2, 0).numpy()
        if expected is not None:
            assert np.array_equal(got, expected.reshape(got.shape)), name
    got = load(tmp_path / "rgba_png").images[0].permute(1, 2, 0).numpy()
    assert got[0, 0].tolist() == [255, 255, 255] and np.array_equal(got[1:], rgb[1:])


@pytest.mark.parametrize("kind", ["zero-byte", "text", "truncated"])
def test_unreadable_file_stop_names_path_skip_counts(tmp_path, kind):
    good = rng_images(2, 8, 8, 3, seed=8)
    save(tmp_path / "0.png", good[0])
    save(tmp_path / "2.png", good[1])
    bad = tmp_path / "1.png"
    if kind == "zero-byte":
        bad.write_bytes(b"")
    elif kind == "text":
        bad.write_text("hello, I am not a PNG")
    else:
        buf = io.BytesIO()
        Image.fromarray(rng_images(1, 64, 64, 3)[0]).save(buf, format="PNG")
        bad.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(UserError, match=r"1\.png.*on_error=skip") as e:
        load(tmp_path)
    assert "\n" not in str(e.value)
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        s = load(tmp_path, on_error="skip")
    assert s.num_skipped == 1 and s.skipped == [str(bad)] and torch.equal(s.images, nchw(good))


def test_empty_missing_and_all_unreadable(tmp_path):
    with pytest.raises(UserError, match="no image files"):
        load(tmp_path)
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(UserError, match="no image files"):
        load(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        load(tmp_path / "nope")
    (tmp_path / "a.png").write_bytes(b"")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UserError, match="none of the 1 files"):
            load(tmp_path, on_error="skip")
    (tmp_path / "thing.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="not a recognised data source"):
        load(tmp_path / "thing.bin")


# --- centre crop and resize --------------------------------------------------------------------


def test_centre_crop_keeps_the_centre_and_resize(tmp_path):
    # 12 wide x 8 high: the centred 8x8 square is columns 2..9 (offset (12 - 8) // 2).
    wide = rng_images(1, 8, 12, 3, seed=9)[0]
    save(tmp_path / "wide" / "0.png", wide)
    s = load(tmp_path / "wide")
    assert torch.equal(s.images, nchw(wide[None, :, 2:10]))
    # 7 high x 4 wide: rows 1..4 (offset (7 - 4) // 2 = 1).
    tall = rng_images(1, 7, 4, 3, seed=10)[0]
    save(tmp_path / "tall" / "0.png", tall)
    assert torch.equal(load(tmp_path / "tall").images, nchw(tall[None, 1:5]))
    # A flat centre with loud margins: any resolution of the crop is that flat colour.
    img = np.zeros((10, 30, 3), np.uint8)
    img[:, :10] = 255
    img[:, 20:] = [0, 255, 0]
    img[:, 10:20] = [40, 90, 200]
    save(tmp_path / "flat" / "0.png", img)
    for r in (5, 10, 23):
        s = load(tmp_path / "flat", resolution=r)
        assert s.images.shape == (1, 3, r, r) and s.size == (r, r)
        assert (s.images[0].permute(1, 2, 0) == torch.tensor([40, 90, 200], dtype=torch.uint8)).all()
    assert "upsampled" in load(tmp_path / "flat", resolution=23).source_description


def test_mixed_sizes_need_a_resolution(tmp_path):
    save(tmp_path / "a.png", rng_images(1, 8, 8, 3)[0])
    save(tmp_path / "b.png", rng_images(1, 16, 20, 3)[0])
    with pytest.raises(UserError, match="set data.resolution"):
        load(tmp_path)
    s = load(tmp_path, resolution=12)
    assert s.images.shape == (2, 3, 12, 12)


# --- idx ---------------------------------------------------------------------------------------


def idx_bytes(arr: np.ndarray, type_byte=0x08) -> bytes:
    """The idx format of the MNIST page: 0, 0, type, ndim, big-endian uint32 dims, data."""
    return bytes([0, 0, type_byte, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def test_idx_round_trip_gz_and_raw(tmp_path):
    imgs = rng_images(3, 5, 7, 1, seed=11)[..., 0]
    (tmp_path / "a-idx3-ubyte").write_bytes(idx_bytes(imgs))
    (tmp_path / "b-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(imgs)))
    for name in ("a-idx3-ubyte", "b-idx3-ubyte.gz"):
        assert np.array_equal(data.read_idx(tmp_path / name), imgs)
    s = load(tmp_path / "b-idx3-ubyte.gz", resolution=5)  # 5x7 -> centre crop columns 1..5
    assert s.channels == 1 and torch.equal(s.images, nchw(imgs[:, :, 1:6]))
    floats = np.arange(6, dtype=">f4").reshape(2, 3)
    (tmp_path / "f.idx").write_bytes(idx_bytes(floats, 0x0D))
    assert np.array_equal(data.read_idx(tmp_path / "f.idx"), floats)


def test_idx_errors(tmp_path):
    imgs = rng_images(2, 4, 4, 1)[..., 0]
    good = idx_bytes(imgs)
    (tmp_path / "magic-idx3-ubyte").write_bytes(b"\x01\x00" + good[2:])
    with pytest.raises(UserError, match="not an idx file"):
        load(tmp_path / "magic-idx3-ubyte")
    (tmp_path / "short-idx3-ubyte").write_bytes(good[:-3])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load(tmp_path / "short-idx3-ubyte")
    (tmp_path / "labels-idx1-ubyte").write_bytes(idx_bytes(np.arange(4, dtype=np.uint8)))
    with pytest.raises(UserError, match="not uint8 images"):
        load(tmp_path / "labels-idx1-ubyte")
    (tmp_path / "bad-idx3-ubyte.gz").write_bytes(gzip.compress(good)[:-10])
    with pytest.raises(UserError, match="gzip"):
        load(tmp_path / "bad-idx3-ubyte.gz")


def test_fashion_mnist_named_source(tmp_path, monkeypatch):
    tr, te = rng_images(3, 28, 28, 1, seed=12)[..., 0], rng_images(2, 28, 28, 1, seed=13)[..., 0]
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(tr)))
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(te)))
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.array([9, 0, 3], np.uint8))))
    s = load(f"fashion-mnist:{tmp_path}")
    assert torch.equal(s.images, nchw(tr)) and s.labels.tolist() == [9, 0, 3]  # the labels file beside it
    assert s.classes[9] == "Ankle boot" and load(tmp_path, split="test").labels is None  # no t10k labels here
    assert torch.equal(load(f"fashion-mnist:{tmp_path}", split="test").images, nchw(te))
    assert torch.equal(load(tmp_path, split="test").images, nchw(te))  # detected by content too
    monkeypatch.setattr(data, "FASHION_MNIST_DEBIAN_DIR", tmp_path)
    assert torch.equal(load("fashion-mnist").images, nchw(tr))
    monkeypatch.setattr(data, "FASHION_MNIST_DEBIAN_DIR", tmp_path / "absent")
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        load("fashion-mnist")


# --- npz ---------------------------------------------------------------------------------------


def test_npz_nhwc_nhw_and_keys(tmp_path):
    nhwc = rng_images(3, 6, 6, 3, seed=14)
    np.savez(tmp_path / "a.npz", x=nhwc, labels=np.array([2, 0, 2]))
    s = load(tmp_path / "a.npz")
    assert torch.equal(s.images, nchw(nhwc)) and s.labels.tolist() == [2, 0, 2] and s.classes == ("0", "1", "2")
    nhw = nhwc[..., 0]
    np.savez_compressed(tmp_path / "b.npz", nhw)  # arr_0
    s = load(tmp_path / "b.npz")
    assert s.channels == 1 and torch.equal(s.images, nchw(nhw))
    np.savez(tmp_path / "keras.npz", x_train=nhwc, x_test=nhwc[:1], y_train=np.arange(3), y_test=np.arange(1))
    assert len(load(tmp_path / "keras.npz", split="test")) == 1
    np.save(tmp_path / "c.npy", nhwc)
    assert torch.equal(load(tmp_path / "c.npy").images, nchw(nhwc))
    # gray conversion of arrays follows PIL's convert("L") exactly
    s = load(tmp_path / "a.npz", channels="gray")
    expected = np.stack([np.asarray(Image.fromarray(im).convert("L")) for im in nhwc])
    assert torch.equal(s.images, nchw(expected))


def test_npz_refusals(tmp_path):
    obj = np.empty(2, dtype=object)
    obj[:] = [np.zeros((2, 2), np.uint8), "x"]
    np.savez(tmp_path / "obj.npz", x=obj)  # np.savez pickles object arrays
    with pytest.raises(UserError, match="Python objects"):
        load(tmp_path / "obj.npz")
    np.savez(tmp_path / "f.npz", x=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(UserError, match="dtype float32"):
        load(tmp_path / "f.npz")
    np.savez(tmp_path / "chw.npz", x=np.zeros((2, 3, 4, 4), np.uint8))
    with pytest.raises(UserError, match="NCHW"):
        load(tmp_path / "chw.npz")
    np.savez(tmp_path / "flat.npz", x=np.zeros((2, 16), np.uint8))
    with pytest.raises(UserError, match=r"shape \[2, 16\]"):
        load(tmp_path / "flat.npz")
    np.savez(tmp_path / "amb.npz", a=np.zeros((1, 2, 2), np.uint8), b=np.zeros((1, 2, 2), np.uint8))
    with pytest.raises(UserError, match="which array"):
        load(tmp_path / "amb.npz")
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 2, 2), np.uint8))
    with pytest.raises(UserError, match="no images"):
        load(tmp_path / "empty.npz")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(UserError, match="junk.npz"):
        load(tmp_path / "junk.npz")


# --- CIFAR-10 python release -------------------------------------------------------------------


def cifar_rows(hwc: np.ndarray) -> np.ndarray:
    """The official layout, built element by element: row = 1024 R, 1024 G, 1024 B, row-major."""
    n = hwc.shape[0]
    rows = np.empty((n, 3072), np.uint8)
    for k in range(3):
        for r in range(32):
            for c in range(32):
                rows[:, k * 1024 + r * 32 + c] = hwc[:, r, c, k]
    return rows


def py2_pickle(data: np.ndarray, labels: list) -> bytes:
    """A batch as Python 2's cPickle wrote it (protocol 2, str keys, numpy.core globals)."""

    def s(b):  # a Python 2 str
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    def i(v):
        return b"K" + bytes([v]) if v < 256 else b"M" + struct.pack("<H", v)

    n, d = data.shape
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + i(0) + b"\x85" + s(b"b") + b"\x87R"
             + b"(" + i(1) + i(n) + i(d) + b"\x86" + b"cnumpy\ndtype\n" + s(b"u1") + i(0) + i(1) + b"\x87R"
             + b"(" + i(3) + s(b"|") + b"NNN" + b"J\xff\xff\xff\xffJ\xff\xff\xff\xff" + i(0) + b"tb"
             + b"\x89" + s(data.tobytes()) + b"tb")
    lab = b"](" + b"".join(i(v) for v in labels) + b"e"
    return (b"\x80\x02}(" + s(b"batch_label") + s(b"training batch 1 of 5") + s(b"labels") + lab
            + s(b"data") + array + b"u.")


def py3_pickle(data, labels):
    return pickle.dumps({b"batch_label": b"x", b"labels": labels, b"data": data, b"filenames": [b"a.png"] * len(labels)}, protocol=4)


@pytest.fixture
def cifar_batches():
    hwc = rng_images(12, 32, 32, 3, seed=15)
    return hwc, {f"data_batch_{k}": hwc[2 * (k - 1): 2 * k] for k in range(1, 6)} | {"test_batch": hwc[10:]}


def test_cifar_batches_dir_py2_and_py3_pickles(tmp_path, cifar_batches):
    hwc, parts = cifar_batches
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for name, part in parts.items():
        maker = py2_pickle if name in ("data_batch_1", "test_batch") else py3_pickle
        (d / name).write_bytes(maker(cifar_rows(part), [int(name[-1]) if name[-1].isdigit() else 9] * len(part)))
    (d / "batches.meta").write_bytes(b"ignored")
    s = load(tmp_path)  # finds cifar-10-batches-py/ inside
    assert s.images.shape == (10, 3, 32, 32) and torch.equal(s.images, nchw(hwc[:10]))
    assert s.labels.tolist() == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5] and s.classes[:2] == ("airplane", "automobile")
    assert torch.equal(load(f"cifar10:{d}", split="test").images, nchw(hwc[10:]))
    assert torch.equal(load(d / "data_batch_1").images, nchw(hwc[:2]))


def test_cifar_tarball(tmp_path, cifar_batches):
    hwc, parts = cifar_batches
    tgz = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        for name in ["test_batch", "data_batch_3", "data_batch_1", "data_batch_2", "data_batch_5", "data_batch_4"]:
            b = py2_pickle(cifar_rows(parts[name]), [0] * 2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(b)
            tar.addfile(info, io.BytesIO(b))
    assert torch.equal(load(f"cifar10:{tgz}").images, nchw(hwc[:10]))
    assert torch.equal(load(tgz, split="test").images, nchw(hwc[10:]))
    assert torch.equal(load(tmp_path).images, nchw(hwc[:10]))  # a folder holding the tarball


class _Evil:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    d = tmp_path / "batches"
    d.mkdir()
    (d / "data_batch_1").write_bytes(pickle.dumps({b"data": _Evil(f"touch {marker}"), b"labels": [0]}, protocol=4))
    with pytest.raises(UserError, match=r"data_batch_1: refused to unpickle.*system"):
        load(d)
    assert not marker.exists()
    (d / "data_batch_1").write_bytes(pickle.dumps(eval, protocol=4))
    with pytest.raises(UserError, match="builtins.eval"):
        load(d)
    (d / "data_batch_1").write_bytes(b"\x80\x04garbage")
    with pytest.raises(UserError, match="not a readable CIFAR-10"):
        load(d)
    (d / "data_batch_1").write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8)}))
    with pytest.raises(UserError, match=r"uint8 \[N, 3072\]"):
        load(d)


def test_cifar10_jpeg_layout_folder_and_tarball(tmp_path):
    tr, te = rng_images(3, 32, 32, 3, seed=16), rng_images(2, 32, 32, 3, seed=17)
    root = tmp_path / "x" / "cifar10-jpeg"
    files = [(f"train/{c}/{i:04d}.png", im) for (c, i), im in zip([("cat", 1), ("cat", 0), ("dog", 0)], tr)]
    files += [(f"test/cat/{i:04d}.png", im) for i, im in enumerate(te)]
    for rel, im in files:
        save(root / rel, im)
    expected_train = nchw(tr[[1, 0, 2]])  # cat/0000, cat/0001, dog/0000
    assert torch.equal(load(f"cifar10:{tmp_path / 'x'}").images, expected_train)
    assert torch.equal(load(f"cifar10:{root}", split="test").images, nchw(te))
    tgz = tmp_path / "cifar10-png.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(root, arcname="cifar10-jpeg")
    assert torch.equal(load(tgz).images, expected_train)
    assert torch.equal(load(tgz, split="test").images, nchw(te))
    for s in (load(tgz), load(f"cifar10:{tmp_path / 'x'}")):  # class folders below the split folder
        assert s.labels.tolist() == [0, 0, 1] and s.classes == ("cat", "dog")
    with pytest.raises(UserError, match="needs a path"):
        load("cifar10")


# --- LMDB --------------------------------------------------------------------------------------


def encode(arr, fmt="PNG"):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def test_lmdb_round_trip_and_skip(tmp_path):
    import lmdb  # in the `test` extra: a missing lmdb fails here rather than skipping
    imgs = rng_images(3, 10, 14, 3, seed=18)
    db = tmp_path / "bedroom_train_lmdb"
    env = lmdb.open(str(db), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for key, im in zip([b"b1", b"a0", b"c2"], imgs):  # values: encoded images, keys: anything
            txn.put(key, encode(im))
    env.close()
    s = load(db, resolution=10)
    assert torch.equal(s.images, nchw(imgs[[1, 0, 2]][:, :, 2:12]))
    assert s.classes == ("bedroom",) and s.labels.tolist() == [0, 0, 0]  # LSUN: the category, from the name
    assert torch.equal(load(db / "data.mdb", resolution=10).images, s.images)
    env = lmdb.open(str(db), map_size=1 << 24)
    with env.begin(write=True) as txn:
        txn.put(b"bb", b"not an image")
    env.close()
    with pytest.raises(UserError, match="key bb"):
        load(db, resolution=10)
    with pytest.warns(UserWarning):
        assert load(db, resolution=10, on_error="skip").num_skipped == 1


def test_lmdb_missing_package_is_one_clear_line(tmp_path, monkeypatch):
    (tmp_path / "data.mdb").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "lmdb", None)  # import lmdb -> ImportError
    with pytest.raises(UserError, match="pip install lmdb"):
        load(tmp_path)


# --- embedded Fashion-MNIST subset ---------------------------------------------------------------


def test_embedded_fashion_mnist_10k():
    npz = ASSETS / "fashion_mnist_10k.npz"
    assert npz.stat().st_size < 5 * 1024 * 1024
    assert "Zalando SE" in (ASSETS / "FASHION_MNIST_LICENSE").read_text()
    s = load_images(DataConfig())
    assert s.images.shape == (10000, 1, 28, 28) and s.images.dtype == torch.uint8
    assert (s.channels, s.size) == (1, (28, 28))
    with np.load(npz) as z:
        labels = z["labels"]
    assert np.bincount(labels, minlength=10).tolist() == [1000] * 10
    assert s.labels.tolist() == labels.tolist() and s.classes[0] == "T-shirt/top"
    record = json.loads((ASSETS / "fashion_mnist_10k.json").read_text())
    assert data_fingerprint(s.images) == record["images_sha256"]
    assert s.images.float().mean() / 255 == pytest.approx(0.286, abs=0.01)  # Fashion-MNIST's mean
    with pytest.raises(UserError, match="no test split"):
        load_images(DataConfig(split="test"))
    assert load_images(DataConfig(resolution=32, channels="rgb")).images.shape == (10000, 3, 32, 32)


@pytest.mark.skipif(not (data.FASHION_MNIST_DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file(),
                    reason="needs apt-get install dataset-fashion-mnist")
def test_embedded_subset_equals_the_original_files():
    full = load("fashion-mnist")
    with np.load(ASSETS / "fashion_mnist_10k.npz") as z:
        idx, labels = z["indices"], z["labels"]
    orig_labels = data.read_idx(data.FASHION_MNIST_DEBIAN_DIR / "train-labels-idx1-ubyte.gz")
    assert full.images.shape == (60000, 1, 28, 28)
    assert torch.equal(load_images(DataConfig()).images, full.images[torch.from_numpy(idx.astype(np.int64))])
    assert np.array_equal(orig_labels[idx], labels)
    # The first 1,000 of each class: no skipped earlier image of a class.
    for k in range(10):
        assert np.flatnonzero(orig_labels == k)[:1000].tolist() == idx[labels == k].tolist()


# --- value range and fingerprints ----------------------------------------------------------------


def test_model_range_round_trip_and_endpoints():
    v = torch.arange(256, dtype=torch.uint8)
    x = to_model_range(v)
    assert x.dtype == torch.float32
    assert x[0] == -1.0 and x[255] == 1.0 and torch.allclose(x.double(), v.double() / 127.5 - 1, rtol=0, atol=1e-7)
    assert torch.equal(to_uint8(x), v)
    # Rounding, not truncation; out of range clamps.
    k = torch.tensor([0.49, 0.51, 254.6, -30.0, 300.0]) / 127.5 - 1
    assert to_uint8(k).tolist() == [0, 1, 255, 0, 255]
    with pytest.raises(TypeError):
        to_model_range(v.float())


def test_data_fingerprint_is_sha256_of_bytes():
    a = rng_images(2, 3, 3, 3, seed=19)
    t = nchw(a)
    assert data_fingerprint(t) == hashlib.sha256(t.numpy().tobytes()).hexdigest()
    assert data_fingerprint(t.numpy()) == data_fingerprint(t)
    assert data_fingerprint(t) != data_fingerprint(t.flip(-1))


def test_an_image_file_of_a_format_that_runs_a_program_is_not_decoded(tmp_path, monkeypatch):
    """PIL identifies a file's format from its bytes, and its EPS decoder hands the file to
    Ghostscript: a data file named .png holding PostScript would start that program. A stand-in
    `gs` on PATH records whether it ran; ddpm lets PIL try only the formats of its extensions."""
    from PIL import EpsImagePlugin

    bin_dir, marker = tmp_path / "bin", tmp_path / "gs-ran"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(f"#!/bin/sh\ntouch {marker}\nexit 0\n")
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # looked up again, finding the stand-in
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(rng_images(1, 8, 8, 1, seed=3)[0][..., 0]).save(folder / "a.png")
    (folder / "b.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\n"
                                   b"showpage\n%%EOF\n")
    with pytest.raises(UserError, match="b.png"):  # data.on_error=stop names the file
        load_images(DataConfig(source=str(folder), resolution=8))
    assert not marker.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        images = load_images(DataConfig(source=str(folder), resolution=8, on_error="skip"))
    assert len(images) == 1 and not marker.exists()
    with Image.open(folder / "b.png") as im:  # the premise: PIL alone takes it for EPS and runs "gs"
        assert im.format == "EPS"
        with pytest.raises(Exception):
            im.load()
    assert marker.exists()
