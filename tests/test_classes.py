"""Class-conditional models and classifier-free guidance, against facts from outside the code.

The oracle (gaussian_oracle.ClassOracle) is the exact E[ε | x_t, c] and E[ε | x_t] of data that
are a Gaussian per class, in closed form: driven by it, conditional sampling must give each class's
mean and variance, unconditional sampling the mixture's, and the guided ε is checked against the
formula computed here with numpy. The rest are properties: guidance 1 is plain conditional
sampling bit for bit, guidance is one batched forward, label dropout happens at its rate, a
conditional run resumes exactly, and the class embedding is diffusers' `num_class_embeds`.
"""

import json
import math
import types

import numpy as np
import pytest
import torch

from gaussian_oracle import CLASS_MU, CLASS_PRIORS, CLASS_S, PAPER_BETAS, ClassOracle, bin_probabilities
from helpers import active, preset_net
from ddpm import GaussianDiffusion, UserError, make_betas
from ddpm.cli import main
from ddpm.io.checkpoint import latest_checkpoint
from ddpm.io.data import DataConfig, load_images
from ddpm.network.unet import UNet, count_parameters
from ddpm.process.guidance import Guided
from ddpm.run.config import RunConfig
from ddpm.process.sampling import SamplerSpec
from ddpm.workflows.nll import NLLImages
from ddpm.workflows.sample import ClassChoice, Images, SampleSet, proportional_labels, sample, sample_labels, sample_to_dir
from ddpm.workflows.train import drop_labels, train

pytestmark = pytest.mark.usefixtures("one_thread")
K = len(CLASS_PRIORS)


# ---------------------------------------------------------------- the oracle: sampling and the formula

def _run_chain(model, n_rows: int, seed: int) -> torch.Tensor:
    d = GaussianDiffusion(make_betas("linear", 1000), var_type="fixedlarge")
    g = torch.Generator().manual_seed(seed)
    return d.p_sample_loop(model, (n_rows, 1, 1, 1), clip_denoised=False,
                           noise_fn=lambda shape: torch.randn(shape, generator=g, dtype=torch.float64)).flatten()


def test_conditional_sampling_gives_each_class_its_mean_and_variance():
    n = 10_000
    labels = torch.arange(K).repeat_interleave(n)
    x = _run_chain(Guided(ClassOracle(), labels, 1.0, null_class=K), K * n, seed=11)
    for k in range(K):
        xs = x[labels == k]
        mean, var = xs.mean().item(), xs.var().item()
        print(f"class {k}: mean {mean:.4f} (data {CLASS_MU[k]}), var {var:.5f} (data {CLASS_S[k] ** 2:.5f})")
        assert abs(mean - CLASS_MU[k]) < 4 * CLASS_S[k] / math.sqrt(n)
        assert abs(var / CLASS_S[k] ** 2 - 1) < 4 * math.sqrt(2 / n)  # 4 standard errors of a variance estimate


def test_guidance_0_samples_the_mixture():
    n = 20_000
    x = _run_chain(Guided(ClassOracle(), torch.zeros(n, dtype=torch.long), 0.0, null_class=K), n, seed=12)
    p, mu, s = (np.array(v) for v in (CLASS_PRIORS, CLASS_MU, CLASS_S))
    mean = (p * mu).sum()
    var = (p * (s**2 + mu**2)).sum() - mean**2
    print(f"mixture: mean {x.mean():.4f} (data {mean:.4f}), var {x.var():.5f} (data {var:.5f})")
    assert abs(x.mean().item() - mean) < 4 * math.sqrt(var / n)
    assert abs(x.var().item() / var - 1) < 4 * math.sqrt(2 / n) * 1.5  # a mixture's variance estimate is noisier


def _eps_by_hand(x, abar, w, y):
    """ε̃ = ε_∅ + w (ε_c − ε_∅) for the per-class Gaussians, written out in numpy."""
    p, mu, s = (np.array(v) for v in (CLASS_PRIORS, CLASS_MU, CLASS_S))
    out = np.empty_like(x)
    for b in range(x.shape[0]):
        a, xb = abar[b], x[b]
        var = a * s**2 + 1 - a
        eps = [np.sqrt(1 - a) * (xb - np.sqrt(a) * mu[k]) / var[k] for k in range(K)]
        logw = [np.log(p[k]) + np.sum(-0.5 * (xb - np.sqrt(a) * mu[k]) ** 2 / var[k] - 0.5 * np.log(2 * np.pi * var[k]))
                for k in range(K)]
        r = np.exp(np.array(logw) - max(logw))
        r /= r.sum()
        uncond = sum(r[k] * eps[k] for k in range(K))
        cond = uncond if y[b] == K else eps[y[b]]
        out[b] = uncond + w * (cond - uncond)
    return out


@pytest.mark.parametrize("w", [0.0, 1.0, 2.5])
def test_guided_eps_is_the_formula_from_one_batched_forward(w):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 1, 2, 2, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 10, 200, 500, 800, 1000])
    y = torch.tensor([0, 1, 2, 0, 2, K])  # the last image: no class
    oracle = ClassOracle()
    out = Guided(oracle, y, w, null_class=K)(x, t)
    abar = np.cumprod(1 - PAPER_BETAS)[t.numpy() - 1]
    np.testing.assert_allclose(out.numpy(), _eps_by_hand(x.numpy(), abar, w, y.numpy()), rtol=1e-9, atol=1e-12)
    assert oracle.calls == 1 and oracle.images == (12 if w not in (0.0, 1.0) else 6)


def test_learned_variance_channels_are_the_conditional_ones():
    def net(x, t, y):  # mean channel depends on y, variance channel too
        return torch.cat([x + y.view(-1, 1, 1, 1), 10 * x + y.view(-1, 1, 1, 1)], dim=1)

    x, t, y = torch.zeros(2, 1, 1, 1), torch.ones(2, dtype=torch.long), torch.tensor([1, 2])
    out = Guided(net, y, 3.0, null_class=4)(x, t)
    # guided mean: 4 + 3 (y − 4); variance: the conditional's, y
    assert out[:, 0].flatten().tolist() == [4 + 3 * (1 - 4), 4 + 3 * (2 - 4)]
    assert out[:, 1].flatten().tolist() == [1, 2]


# ---------------------------------------------------------------- the network: guidance 1, batching, seeds

@pytest.fixture(scope="module")
def cond_net():
    torch.manual_seed(0)
    return active(UNet(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0, resolution=8,
                       in_channels=1, out_channels=1, num_classes=3), seed=1).eval()


D10 = GaussianDiffusion(make_betas("linear", 10, 1e-3, 0.2))


def test_guidance_1_is_plain_conditional_sampling_bitwise(cond_net):
    y = torch.tensor([2, 0, 1, 2])
    opts = dict(device="cpu")
    plain = sample(lambda x, t: cond_net(x, t, y), D10, (1, 8, 8), Images(5, range(4)), **opts)
    assert torch.equal(sample(cond_net, D10, (1, 8, 8), Images(5, range(4), y, 1.0), **opts), plain)
    unconditional = sample(lambda x, t: cond_net(x, t, torch.full_like(t, 3)), D10, (1, 8, 8), Images(5, range(4)), **opts)
    assert torch.equal(sample(cond_net, D10, (1, 8, 8), Images(5, range(4), y, 0.0), **opts), unconditional)
    assert not torch.equal(plain, unconditional)


def test_guided_sampling_is_one_forward_of_twice_the_batch_per_step(cond_net):
    seen = []

    class Spy(torch.nn.Module):
        config = cond_net.config

        def forward(self, x, t, y):
            seen.append((x.shape[0], y.tolist()))
            return cond_net(x, t, y)

    sample(Spy(), D10, (1, 8, 8), Images(0, range(3), torch.tensor([0, 1, 2]), 4.0), device="cpu",
           sampler=SamplerSpec("ddim", steps=5))
    assert len(seen) == 5 and all(b == 6 and y == [0, 1, 2, 3, 3, 3] for b, y in seen)


def test_image_i_of_class_c_does_not_depend_on_the_batch(cond_net, tmp_path):
    labels, n, record = sample_labels(ClassChoice(per_class=3), None, 3)
    assert n == 9 and labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    a = sample_to_dir(cond_net, D10, tmp_path / "a", SampleSet((1, 8, 8), n, 7, 2, labels, record, 2.0), progress=False)
    sample_to_dir(cond_net, D10, tmp_path / "b", SampleSet((1, 8, 8), n, 7, 5, labels, guidance=2.0), progress=False)
    za, zb = np.load(a["npz"]), np.load(tmp_path / "b" / "samples.npz")
    assert np.abs(za["x"].astype(int) - zb["x"].astype(int)).max() <= 1  # float rounding of other batch shapes
    assert za["labels"].tolist() == labels.tolist()
    # the grid: one class per row, its three images in order, 2-pixel white gaps
    from PIL import Image
    grid = np.asarray(Image.open(a["grid"]))
    assert grid.shape == (3 * 10 + 2, 3 * 10 + 2)
    for k in range(3):
        for j in range(3):
            cell = grid[2 + k * 10: 2 + k * 10 + 8, 2 + j * 10: 2 + j * 10 + 8]
            assert np.array_equal(cell, za["x"][3 * k + j, :, :, 0]), (k, j)
    # classes of unequal counts: short rows are padded with white
    from ddpm.io.images import make_class_grid
    imgs = torch.arange(1, 4, dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 1, 8, 8)
    g = make_class_grid(imgs, [5, 2, 5], per_row=2)  # rows: class 2 (image 1), class 5 (images 0, 2)
    assert g.shape == (22, 22) and g[2, 2] == 2 and g[2, 12] == 255 and g[12, 2] == 1 and g[12, 12] == 3
    meta = json.loads((tmp_path / "a" / "sampling.json").read_text())
    assert meta["guidance"] == 2.0 and meta["classes"] == {"classes": [0, 1, 2], "per_class": 3}
    with pytest.raises(UserError, match="guidance"):  # another weight is another sample set
        sample_to_dir(cond_net, D10, tmp_path / "a", SampleSet((1, 8, 8), n, 7, 2, labels, record, 3.0), progress=False)


def test_class_choices():
    names = ("cat", "dog", "eel")
    assert sample_labels(ClassChoice(class_="dog"), 3, 3, names)[0].tolist() == [1, 1, 1]
    assert sample_labels(ClassChoice(class_="none"), 2, 3, names)[0].tolist() == [3, 3]
    assert sample_labels(ClassChoice(classes=["eel", 0]), 5, 3, names)[0].tolist() == [2, 0, 2, 0, 2]
    assert sample_labels(ClassChoice(classes=[2, 0], per_class=2), None, 3, names)[0].tolist() == [2, 2, 0, 0]
    with pytest.raises(UserError, match="0=cat, 1=dog, 2=eel"):
        sample_labels(ClassChoice(class_="emu"), 3, 3, names)
    with pytest.raises(UserError, match="unconditional"):
        sample_labels(ClassChoice(class_=1), 3, 0)
    with pytest.raises(UserError, match="not --n 5"):
        sample_labels(ClassChoice(per_class=2), 5, 3, names)


@pytest.mark.parametrize("counts", [[5000] * 10, [6000, 3000, 1000], [10, 0, 990, 5]])
def test_proportional_labels_hold_each_share_of_any_prefix(counts):
    p = np.array(counts) / sum(counts)
    labels = proportional_labels(counts, range(50_000)).numpy()
    for n in (100, 1000, 10_000, 50_000):
        dev = np.abs(np.bincount(labels[:n], minlength=len(counts)) - n * p).max()
        assert dev <= 2 + math.log2(n), (n, dev)  # a low-discrepancy sequence; i.i.d. draws miss by ~√n
    assert (np.bincount(labels, minlength=len(counts))[p == 0] == 0).all()
    assert torch.equal(proportional_labels(counts, range(7, 19)), torch.from_numpy(labels[7:19]))


# ---------------------------------------------------------------- the network and its weights

def test_unconditional_network_is_the_papers_and_the_embedding_adds_k_plus_1_rows():
    torch.manual_seed(0)
    with torch.device("meta"):
        assert count_parameters(UNet()) == 35_746_307
        assert count_parameters(UNet(num_classes=10)) == 35_746_307 + 11 * 512  # (K + 1) x 4ch
    torch.manual_seed(4)
    plain = preset_net("tiny")
    torch.manual_seed(4)
    cond = preset_net("tiny", num_classes=5)
    assert "label_emb.weight" not in plain.state_dict()
    sd = cond.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in plain.state_dict().items())  # built last: the same draws
    w = sd["label_emb.weight"]
    limit = math.sqrt(6 / (6 + 128))  # TF variance_scaling fan_avg uniform, as every other layer
    assert w.abs().max() <= limit and abs(w.std().item() / (limit / math.sqrt(3)) - 1) < 0.1


def test_unconditional_initial_weights_are_those_of_the_version_before_classes():
    # The sha256 of every initial weight (names and bytes, in name order) of the tiny and the CIFAR-10
    # networks at seed 0, as the code computed them before class conditioning existed (commit
    # 6ccca69). Initialisation draws from torch's CPU generator element by element, so the bytes
    # are the same on any CPU. A training run and its samples, compared bit for bit with that version
    # on one machine, are in the change's notes; this keeps the part that any machine can check.
    import hashlib

    h = hashlib.sha256()
    for preset in ("tiny", "cifar10"):
        torch.manual_seed(0)
        with torch.no_grad():
            sd = preset_net(preset).state_dict()
        for k in sorted(sd):
            h.update(k.encode())
            h.update(sd[k].numpy().tobytes())
    assert h.hexdigest() == "932b40fafc24e9587694a9b767e6563a70a8f05dfaf7c56d116020a9d48f8399"


def test_no_label_is_no_class_and_labels_change_the_output():
    torch.manual_seed(0)
    net = active(preset_net("tiny", num_classes=4), seed=2).eval()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 700])
    with torch.no_grad():
        assert torch.equal(net(x, t), net(x, t, torch.tensor([4, 4])))
        assert (net(x, t, torch.tensor([0, 0])) - net(x, t, torch.tensor([1, 1]))).abs().max() > 1e-3
        with pytest.raises(ValueError, match="unconditional"):
            preset_net("tiny")(x, t, torch.tensor([0, 0]))


# ---------------------------------------------------------------- training

def test_label_dropout_happens_at_its_rate():
    labels = torch.randint(0, 7, (200_000,), generator=torch.Generator().manual_seed(0))
    out = drop_labels(labels, 0.1, 7, torch.Generator().manual_seed(1))
    rate = (out == 7).float().mean().item()
    print(f"dropped {rate:.4f} of the labels at rate 0.1")
    assert abs(rate - 0.1) < 4 * math.sqrt(0.1 * 0.9 / len(labels))
    assert torch.equal(out[out != 7], labels[out != 7])
    assert torch.equal(drop_labels(labels, 0.0, 7, torch.Generator().manual_seed(1)), labels)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """40 random 32x32 images with labels 0 … 9 in unequal numbers (an .npz with a labels array)."""
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("labelled") / "d.npz"
    np.savez(path, x=rng.integers(0, 256, (40, 32, 32), dtype=np.uint8), labels=np.minimum(np.arange(40) // 3, 9))
    return path


def _tiny(steps, data, **train):
    run = RunConfig.from_preset("tiny", data=str(data))
    return run.replace(model=run.model.replace(num_classes=10), train=run.train.replace(steps=steps, **train))


def test_training_feeds_true_labels_and_drops_them_at_the_rate(tmp_path, monkeypatch, labelled):
    data = load_images(DataConfig(source=str(labelled), resolution=32))
    seen, forward = [], UNet.forward

    def spy(self, x, t, y=None):
        if self.training:
            seen.append(y.clone())
        return forward(self, x, t, y)

    monkeypatch.setattr(UNet, "forward", spy)
    train(tmp_path / "run", _tiny(12, labelled, label_dropout=0.5, checkpoint_every=100, log_every=4), progress=False)
    y = torch.cat(seen)
    rate = (y == 10).float().mean().item()
    assert len(y) == 96 and abs(rate - 0.5) < 4 * math.sqrt(0.25 / 96), rate
    kept = y[y != 10]
    assert ((kept >= 0) & (kept < 10)).all()
    state = latest_checkpoint(tmp_path / "run")[1]
    assert state["classes"]["names"] == [str(k) for k in range(10)]
    assert state["classes"]["counts"] == [3] * 9 + [13] == torch.bincount(data.labels, minlength=10).tolist()
    rec = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert set(rec[-1]["loss_by_class"]) == {str(k) for k in range(10)}


def test_a_conditional_run_resumes_exactly(tmp_path, labelled):
    from helpers import assert_states_equal

    train(tmp_path / "whole", _tiny(6, labelled, checkpoint_every=3), progress=False)
    train(tmp_path / "parts", _tiny(3, labelled, checkpoint_every=3), progress=False)
    train(tmp_path / "parts", _tiny(6, labelled, checkpoint_every=3), progress=False)
    assert_states_equal(latest_checkpoint(tmp_path / "whole")[1], latest_checkpoint(tmp_path / "parts")[1])


def test_a_conditional_model_needs_labelled_data_with_its_classes(tmp_path, capsys):
    from PIL import Image
    folder = tmp_path / "flat"
    folder.mkdir()
    for i in range(4):
        Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(folder / f"{i}.png")
    for data, k, message in ((str(folder), 3, "has no labels"), ("fashion-mnist-10k", 3, "set model.num_classes=10")):
        rc = main(["train", "--preset", "tiny", "--data", data, "--out", str(tmp_path / f"run{k}{len(message)}"),
                   "--set", f"model.num_classes={k}", "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and message in err[0], err


# ---------------------------------------------------------------- bits/dim of log p(x | c)

@pytest.mark.slow
def test_bits_per_dim_given_the_class_bound_the_true_conditional_nll(tmp_path):
    from ddpm.workflows.nll import evaluate_nll

    g = torch.Generator().manual_seed(6)
    labels = torch.arange(K).repeat(64)
    mu, s = torch.tensor(CLASS_MU)[labels], torch.tensor(CLASS_S)[labels]
    x = mu.view(-1, 1, 1, 1) + s.view(-1, 1, 1, 1) * torch.randn(len(labels), 1, 4, 4, generator=g, dtype=torch.float64)
    k = (x * 127.5 + 127.5).round().clamp(0, 255)
    d = GaussianDiffusion(make_betas("linear", 1000), var_type="fixedlarge")
    summary = evaluate_nll(ClassOracle(), d, tmp_path, NLLImages(k.to(torch.uint8), 96, 0, labels), progress=False)
    per = np.genfromtxt(tmp_path / "per_image.csv", delimiter=",", names=True)
    nll = np.array([-np.log2(bin_probabilities(CLASS_MU[c], CLASS_S[c])[k[i].long().numpy()]).mean() for i, c in enumerate(labels)])
    gap = per["total_bpd"] - nll
    print(f"bits/dim of log p(x | c) {summary['total_bpd']:.4f}, true {nll.mean():.4f}, gap {gap.mean():.4f}")
    assert gap.mean() >= -3 * gap.std() / math.sqrt(len(gap)) and gap.mean() < 0.25
    # With "no class" the same images give the bound of log p(x) = log p(x | c) + log π_c − log p(c | x);
    # these classes are far apart (p(c | x) ≈ 1), so it costs each image −log2 π_c bits more, over 16 dims.
    evaluate_nll(ClassOracle(), d, tmp_path / "u", NLLImages(k.to(torch.uint8), 96, 0, torch.full_like(labels, K)),
                 progress=False)
    extra = np.genfromtxt(tmp_path / "u" / "per_image.csv", delimiter=",", names=True)["total_bpd"] - per["total_bpd"]
    info = -np.log2(np.array(CLASS_PRIORS))[labels.numpy()] / 16
    print(f"log p(x) costs {extra.mean():.4f} bits/dim more than log p(x | c); −log2 π_c / D = {info.mean():.4f}")
    assert abs(extra.mean() - info.mean()) < 0.01
    with pytest.raises(UserError, match="labels"):
        evaluate_nll(ClassOracle(), d, tmp_path / "x", NLLImages(k.to(torch.uint8), 96, 0), progress=False)


# ---------------------------------------------------------------- commands on a conditional run

@pytest.fixture(scope="module")
def cond_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cond")
    rng = np.random.default_rng(0)
    data = root / "two-classes.npz"
    np.savez(data, x=rng.integers(0, 256, (6, 32, 32), dtype=np.uint8), labels=np.array([0, 0, 0, 0, 1, 1]))
    run = RunConfig.from_preset("tiny", data=str(data))
    run = run.replace(model=run.model.replace(num_classes=2), diffusion=run.diffusion.replace(T=20),
                      train=run.train.replace(steps=2, batch_size=2, checkpoint_every=2))
    train(root / "run", run, progress=False)
    return root / "run"


def test_a_progressive_chain_is_the_sample_of_its_class(cond_run, tmp_path):
    # Chain i of `ddpm progressive --class K` is image i of `ddpm sample --class K` (same seed, sampler, weight).
    common = ["--run", str(cond_run), "--seed", "3", "--class", "1", "--guidance", "2.5", "--no-progress"]
    assert main(["sample", "--n", "2", "--out", str(tmp_path / "s"), *common]) == 0
    assert main(["progressive", "--n-chains", "2", "--times", "20,1", "--out", str(tmp_path / "p"), *common]) == 0
    assert np.array_equal(np.load(tmp_path / "p" / "progressive.npz")["samples"], np.load(tmp_path / "s" / "samples.npz")["x"])
    rec = json.loads((tmp_path / "p" / "progressive.json").read_text())
    assert rec["labels"] == [1, 1] and rec["guidance"] == 2.5
    assert np.load(tmp_path / "s" / "samples.npz")["labels"].tolist() == [1, 1]


def test_experiments_take_a_class(cond_run, tmp_path):
    from PIL import Image
    img = tmp_path / "a.png"
    Image.fromarray(np.full((32, 32), 128, np.uint8)).save(img)
    outs = {}
    for cls in ("none", "0", "1"):
        out = tmp_path / f"r{cls}"
        assert main(["reconstruct", str(img), "--run", str(cond_run), "--t", "20", "--class", cls, "--guidance", "3",
                     "--out", str(out), "--no-progress"]) == 0
        outs[cls] = np.load(out / "reconstruct.npz")["x0"]
        assert json.loads((out / "reconstruct.json").read_text())["label"] == {"none": 2, "0": 0, "1": 1}[cls]
    out = tmp_path / "i"
    assert main(["interpolate", str(img), str(img), "--run", str(cond_run), "--t", "5", "--steps", "2", "--class", "1",
                 "--out", str(out), "--no-progress"]) == 0
    assert json.loads((out / "interpolation.json").read_text())["label"] == 1


def test_edits_take_a_class_and_default_to_none(cond_run, tmp_path):
    # img2img at strength 1 is the sample of the same class, seed and weight; inpainting records the class
    from PIL import Image
    img = tmp_path / "a.png"
    Image.fromarray(np.full((32, 32), 128, np.uint8)).save(img)
    common = ["--run", str(cond_run), "--seed", "3", "--guidance", "2.5", "--no-progress"]
    assert main(["sample", "--n", "1", "--class", "1", "--out", str(tmp_path / "s"), *common]) == 0
    assert main(["img2img", str(img), "--strength", "1", "--class", "1", "--out", str(tmp_path / "e"), *common]) == 0
    assert np.array_equal(np.load(tmp_path / "e" / "samples.npz")["x"], np.load(tmp_path / "s" / "samples.npz")["x"])
    assert main(["inpaint", str(img), "--resample", "1", "--out", str(tmp_path / "n"), *common]) == 0
    rec = json.loads((tmp_path / "n" / "edit.json").read_text())
    assert rec["classes"] == {"classes": "none"} and rec["guidance"] == 2.5
    assert np.load(tmp_path / "n" / "samples.npz")["labels"].tolist() == [2]  # K = 2: "no class"


def test_each_experiment_runs_its_network_with_the_class_and_the_weight():
    # the experiments take any model(x_t, t); a conditional network conditioned on class 1 with
    # weight 2 is run once per step on the class and "no class" together
    from ddpm.process.guidance import conditioned
    from ddpm.workflows.experiments import interpolate, reconstruct, shared_latent_samples

    seen = []

    class Spy(torch.nn.Module):
        config = types.SimpleNamespace(num_classes=3)

        def forward(self, x, t, y):
            seen.append(sorted(set(y.tolist())))
            return 0.1 * x

    x0 = torch.zeros(1, 4, 4)
    net = conditioned(Spy(), 1, 3, 2.0)
    for run in (lambda: reconstruct(net, D10, x0, [2], 0),
                lambda: interpolate(net, D10, (x0, x0), [2], [0.0, 1.0], 0),
                lambda: shared_latent_samples(net, D10, (1, 4, 4), [5], 2, 0)):
        seen.clear()
        run()
        assert seen and all(y == [1, 3] for y in seen)  # class 1 and "no class", in one forward


def test_default_sample_set_of_a_conditional_run_follows_the_training_proportions(cond_run, tmp_path):
    state = latest_checkpoint(cond_run)[1]
    assert state["classes"] == {"names": ["0", "1"], "counts": [4, 2]}
    assert main(["sample", "--run", str(cond_run), "--n", "30", "--batch", "30", "--sampler", "ddim", "--ddim-steps", "1",
                 "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    labels = np.load(tmp_path / "s" / "samples.npz")["labels"]
    assert abs(np.bincount(labels, minlength=2)[0] - 20) <= 2 + math.log2(30)  # 2/3 of 30
    assert json.loads((tmp_path / "s" / "sampling.json").read_text())["classes"]["counts"] == [4, 2]
