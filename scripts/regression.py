"""Behaviour unchanged? Run one fixed set of CLI commands with a source tree, then compare two result folders.

    python scripts/regression.py run  --src OLD/src --out /tmp/reg/old
    python scripts/regression.py run  --src src     --out /tmp/reg/new
    python scripts/regression.py diff /tmp/reg/old /tmp/reg/new      # prints "differences: N"

For refactors that must not change a single number: every command the package has that writes
numbers (prepare, train from a folder / a prepared set / the embedded labelled set, sample with
each sampler and spacing and with guidance, progressive, interpolate, reconstruct, nll, fid-ref,
fid, eval with random Inception weights, and a 2-step demo) runs on tiny settings in a few
minutes on 2 CPU cores. `diff` compares every file: tensors of safetensors and arrays of .npz
exactly, images by their pixels, JSON and JSONL with wall-clock fields (times, dates, speeds,
versions, paths) left out, anything else byte for byte. Written here rather than in tests/: it
compares two source trees, which no test of one tree can do.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

T = "20"  # a short chain keeps every sampler's run in seconds
TRAIN = ["--steps", "6", "--checkpoint-every", "3", "--no-progress", "--set", f"diffusion.T={T}",
         "--set", "model.resolution=16", "--set", "data.resolution=16"]


def _images(folder: Path) -> None:
    """12 deterministic 16x16 RGB PNGs in two class folders."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(12):
        d = folder / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(d / f"{i:02d}.png")


def run(src: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=False)
    env = {**os.environ, "PYTHONPATH": str(src.resolve()), "OMP_NUM_THREADS": "1", "DDPM_NO_CACHE": "1",
           "XDG_CACHE_HOME": str(out / "cache")}

    def ddpm(*args: str) -> None:
        cmd = [sys.executable, "-m", "ddpm", *args]
        print("$ ddpm", " ".join(args), flush=True)
        r = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True)
        (out / "log.txt").open("a").write(f"$ ddpm {' '.join(args)}\n{r.stdout}{r.stderr}exit {r.returncode}\n")
        if r.returncode:
            sys.exit(f"regression: `ddpm {' '.join(args)}` failed with exit {r.returncode}:\n{r.stderr[-2000:]}")

    _images(out / "pngs")
    subprocess.run([sys.executable, "-c", "import sys; from ddpm.network.inception import write_random_weights; "
                    "write_random_weights(sys.argv[1])", str(out / "inception.pth")], env=env, check=True)
    import hashlib

    sha = hashlib.sha256((out / "inception.pth").read_bytes()).hexdigest()
    inc = ["--inception-weights", "inception.pth", "--inception-sha256", sha, "--inception-batch", "8", "--no-progress"]

    ddpm("prepare", "pngs", "--out", "prep", "--no-progress")
    ddpm("train", "--preset", "tiny", "--data", "pngs", "--out", "run", *TRAIN)
    ddpm("train", "--preset", "tiny", "--data", "prep", "--out", "run-prep", *TRAIN)
    ddpm("train", "--preset", "tiny", "--data", "fashion-mnist-10k", "--out", "run-cls", *TRAIN,
         "--set", "model.num_classes=10", "--set", "model.in_channels=1", "--set", "model.out_channels=1")
    common = ["--run", "run", "--n", "5", "--batch", "3", "--no-progress"]
    ddpm("sample", *common, "--out", "s-ancestral")
    ddpm("sample", *common, "--out", "s-ddim", "--sampler", "ddim", "--ddim-steps", "5", "--eta", "0.5")
    ddpm("sample", *common, "--out", "s-quad", "--sampler", "ddim", "--ddim-steps", "5", "--spacing", "quad")
    ddpm("sample", *common, "--out", "s-trailing", "--sampler", "ddim", "--ddim-steps", "5", "--spacing", "trailing")
    ddpm("sample", *common, "--out", "s-model", "--weights", "model", "--seed", "3")
    ddpm("sample", "--run", "run-prep", "--n", "4", "--no-progress", "--out", "s-prep")
    ddpm("sample", "--run", "run-cls", "--n", "6", "--batch", "4", "--no-progress", "--out", "s-guided",
         "--classes", "0,3", "--guidance", "3")
    ddpm("progressive", "--run", "run", "--out", "prog", "--n-chains", "2", "--no-progress")
    ddpm("progressive", "--run", "run", "--out", "prog-share", "--share-t", "10", "--k", "2", "--no-progress")
    ddpm("interpolate", "pngs/a/01.png", "pngs/b/00.png", "--run", "run", "--out", "interp", "--t", "10", "--steps", "3",
         "--no-progress")
    ddpm("reconstruct", "pngs/a/03.png", "--run", "run", "--out", "recon", "--t", "5,15", "--no-progress")
    ddpm("nll", "--run", "run", "--out", "nll", "--data", "pngs", "--split", "train", "--n", "4", "--no-progress")
    ddpm("fid-ref", "--data", "pngs", "--out", "ref.npz", *inc)
    ddpm("fid", "--samples", "s-ancestral", "--ref", "ref.npz", "--out", "fid.json", *inc)
    ddpm("eval", "--run", "run", "--n", "8", "--batch", "4", "--bpd-n", "2", "--out", "eval", "--ref-train",
         "ref.npz", "--ref-test", "ref.npz", *inc)
    ddpm("demo", "--out", "demo", "--steps", "2", "--n", "1", "--no-progress")


# Fields that hold the wall clock, the machine or the folder, not the numbers under test.
VOLATILE = re.compile(r"(source_stat|time|second|date|elapsed|wall|duration|_s$|per_s|host|version|torch|python|path|dir|"
                      r"created|started|finished|machine|platform|cpu|threads|pid|out$|command|cwd|loadavg)", re.I)


# A checkpoint saves the process's Python and NumPy generator states so a resume restores them; ddpm
# never seeds them (every draw of its own comes from torch generators seeded from (seed, step)), so
# they differ between two runs of the same code, and so does the checkpoint file's sha256 that
# results files record. A checkpoint whose other tensors are equal counts as the same file.
UNSEEDED = re.compile(r"rng/rank\d+/(numpy|python)")
SAME_FILE: dict[str, str] = {}  # sha256 of a new checkpoint -> that of the old one it equals


def _strip(x):
    if isinstance(x, str):
        for new, old in SAME_FILE.items():
            x = x.replace(new, old)
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if not VOLATILE.search(k)}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    if isinstance(x, str) and ("/tmp/" in x or "/work/" in x):
        return "<path>"
    return x


def _same(a: Path, b: Path) -> str | None:
    """None when the two files hold the same numbers, else what differs."""
    if a.read_bytes() == b.read_bytes():
        return None
    suffix = a.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.numpy import load_file

        x, y = load_file(a), load_file(b)
        if x.keys() != y.keys():
            return f"tensor names differ: {sorted(x.keys() ^ y.keys())[:5]}"
        bad = [k for k in x if not UNSEEDED.fullmatch(k) and (x[k].dtype != y[k].dtype or x[k].shape != y[k].shape
                                                               or x[k].tobytes() != y[k].tobytes())]
        if bad:
            return f"tensors differ: {bad[:5]}"
        from ddpm.io.checkpoint import checkpoint_sha256  # the content hash that names a model

        SAME_FILE[hashlib.sha256(b.read_bytes()).hexdigest()] = hashlib.sha256(a.read_bytes()).hexdigest()
        SAME_FILE[checkpoint_sha256(b)] = checkpoint_sha256(a)
        return None  # the header's metadata may name times
    if suffix == ".npz":
        x, y = np.load(a, allow_pickle=False), np.load(b, allow_pickle=False)
        if set(x.files) != set(y.files):
            return f"arrays differ: {sorted(set(x.files) ^ set(y.files))}"
        bad = [k for k in x.files if not np.array_equal(x[k], y[k]) and not (x[k].dtype.kind == "U")]
        return f"arrays differ: {bad}" if bad else None
    if suffix in (".png", ".jpg"):
        from PIL import Image

        return None if np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))) else "pixels differ"
    if suffix in (".json", ".jsonl"):
        def load(p):
            return [_strip(json.loads(line)) for line in p.read_text().splitlines() if line.strip()] \
                if suffix == ".jsonl" else _strip(json.loads(p.read_text()))
        return None if load(a) == load(b) else "JSON differs"
    if suffix in (".txt", ".html", ".md", ".csv", ".log", ".lock"):
        return None  # logs and pages carry times; their numbers are in the JSON beside them
    return "bytes differ"


def diff(old: Path, new: Path) -> int:
    skip = {"log.txt"}
    files = lambda root: {p.relative_to(root) for p in root.rglob("*") if p.is_file() and p.name not in skip
                          and "cache" not in p.relative_to(root).parts[:1]}
    a, b = files(old), files(new)
    problems = [f"only in {old}: {p}" for p in sorted(a - b)] + [f"only in {new}: {p}" for p in sorted(b - a)]
    both = sorted(a & b, key=lambda rel: rel.suffix != ".safetensors")  # checkpoints first: SAME_FILE
    for rel in both:
        why = _same(old / rel, new / rel)
        if why:
            problems.append(f"{rel}: {why}")
    for p in problems:
        print(p)
    print(f"files compared: {len(a & b)} differences: {len(problems)}")
    return 1 if problems else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--src", type=Path, required=True, help="the source tree's src/ folder")
    r.add_argument("--out", type=Path, required=True)
    d = sub.add_parser("diff")
    d.add_argument("old", type=Path)
    d.add_argument("new", type=Path)
    args = p.parse_args()
    if args.cmd == "run":
        run(args.src, args.out)
        return 0
    return diff(args.old, args.new)


if __name__ == "__main__":
    sys.exit(main())
