"""Data at scale: a training process's memory against the set's size, the time to the first
step, the loader's throughput, and the wall time of `ddpm prepare`.

    python benchmarks/data_bench.py rss --sizes 20000,100000,200000        # 64x64x3 prepared sets
    python benchmarks/data_bench.py first-step --cifar ../shared/data/cifar10-jpeg.tar.gz
    python benchmarks/data_bench.py loader --cifar ../shared/data/cifar10-jpeg.tar.gz
    python benchmarks/data_bench.py prepare --cifar ../shared/data/cifar10-jpeg.tar.gz

rss: for each size, random 64x64 RGB images are written as an .npy and prepared; a fresh
  process then trains a small 64x64 U-Net for a few steps from the prepared folder while a thread
  samples /proc/self/status every 20 ms. "own" is RssAnon + RssShmem (the process's private
  memory: what grows when each rank holds its own copy); "file" is RssFile (pages of the memory map
  that sit in the OS page cache, shared by every process of the node, and dropped under pressure).
  The same is measured for today's other placement, the .npy read into memory.
first-step: on the 50k CIFAR-10 JPEG folder, in a fresh process (torch imported), the seconds
  until the data are ready (decoded into memory, today's path without a cache; a prepared folder
  opened; the folder again with its cache warm, what a resume does) and until the end of the
  first training step (which adds torch's own fixed cost: building the network, importing its
  compiler stack on the optimizer's first use, the first forward and backward).
loader: images/s delivered by io/loader.Prefetcher (2 workers) gathering random batches (the
  training order) from a prepared set, warm page cache, at 32x32 (CIFAR-10, batch 128) and
  256x256 (random images, batch 64); next to a gather from the same pixels in memory.
prepare: `ddpm prepare` of the 50k CIFAR-10 JPEGs (from the extracted folder).

diffusers has no data pipeline of its own (its examples read images with the datasets library and
torchvision transforms at every epoch), so these run ddpm alone. Results go to
benchmarks/results/data-<what>-<date>.json and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _status() -> dict:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
            out[k] = int(v.split()[0]) * 1024
    return out


class PeakRSS:
    """Samples /proc/self/status on a thread; .peak[key] is the highest value seen."""

    def __init__(self, every: float = 0.02):
        self.peak, self._stop = {}, threading.Event()
        self._t = threading.Thread(target=self._run, args=(every,), daemon=True)

    def _run(self, every):
        while not self._stop.is_set():
            s = _status()
            s["own"] = s.get("RssAnon", 0) + s.get("RssShmem", 0)
            for k, v in s.items():
                self.peak[k] = max(self.peak.get(k, 0), v)
            time.sleep(every)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def _machine() -> dict:
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
                if l.startswith("model name")), platform.processor())
    return dict(cpu=cpu, cores=os.cpu_count(), torch=torch.__version__, python=platform.python_version(),
                date=datetime.datetime.now().isoformat(timespec="seconds"))


def _save(what: str, result: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    p = RESULTS / f"data-{what}-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    p.write_text(json.dumps(dict(command=" ".join([Path(sys.executable).name] + sys.argv), machine=_machine(),
                                 **result), indent=2))
    print(f"wrote {p}", file=sys.stderr)
    return p


def _report(what: str, result: dict, header: list, lines: list) -> None:
    """Save `result` (_save) and print its Markdown table for BENCHMARKS.md."""
    _save(what, result)
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for cells in lines:
        print("| " + " | ".join(cells) + " |")


def _small_run(source: str, size: int, steps: int, batch: int):
    from ddpm.run.config import RunConfig
    run = RunConfig.from_preset("tiny", data=source)
    model = run.model.replace(resolution=size, ch_mult=(1, 2), attn_resolutions=(), num_res_blocks=1)
    return run.replace(model=model, data=run.data.replace(resolution=size),
                       train=run.train.replace(steps=steps, batch_size=batch, checkpoint_every=10**6, log_every=steps,
                                               compile="off"))


# --- child processes ------------------------------------------------------------------------------


def child_train(args) -> None:
    """One training in this process; prints a JSON line of peak memory and the time to step 1."""
    from ddpm.workflows import train as train_module
    from ddpm.io.data import DataConfig, load_images
    from ddpm.io.prepared import open_data
    t0 = time.perf_counter()
    first = {}
    real = train_module.ema_update

    def timed(*a, **k):  # called once per step, after the optimizer: the first call ends step 1
        real(*a, **k)
        first.setdefault("s", time.perf_counter() - t0)

    train_module.ema_update = timed
    run = _small_run(args.source, args.size, args.steps, args.batch)
    with PeakRSS() as rss:
        cfg = DataConfig(source=args.source, resolution=args.size)
        images = load_images(cfg) if args.in_memory else open_data(cfg, progress=False)  # what train would do
        data_s = time.perf_counter() - t0
        train_module.train(args.run_dir, run, images=images, progress=False)
    print(json.dumps(dict(data_ready_s=data_s, first_step_s=first.get("s"), total_s=time.perf_counter() - t0,
                          **rss.peak)))


def _child(*argv) -> dict:
    r = subprocess.run([sys.executable, __file__, "child-train", *map(str, argv)], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


# --- rss --------------------------------------------------------------------------------------------


def _random_npy(path: Path, n: int, size: int) -> None:
    a = np.lib.format.open_memmap(path, "w+", np.uint8, (n, size, size, 3))
    rng = np.random.default_rng(0)
    for i in range(0, n, 10000):
        a[i:i + 10000] = rng.integers(0, 256, a[i:i + 10000].shape, dtype=np.uint8)
    a.flush()
    del a


def bench_rss(args) -> None:
    from ddpm.io.data import DataConfig
    from ddpm.io.prepared import prepare
    work = Path(args.work or tempfile.mkdtemp(prefix="ddpm-rss-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        npy, prep = work / f"x{n}.npy", work / f"p{n}"
        if not npy.exists():
            _random_npy(npy, n, 64)
        t = time.perf_counter()
        prepare(DataConfig(source=str(npy)), prep, progress=False)
        prep_s = time.perf_counter() - t
        m = _child("--source", prep, "--size", 64, "--steps", args.steps, "--batch", args.batch,
                   "--run-dir", work / f"r{n}-b{args.batch}-{time.time_ns()}")
        row = dict(n=n, gb=n * 64 * 64 * 3 / 1e9, prepare_s=prep_s, prepared=m)
        if n <= args.in_memory_max:
            row["in_memory"] = _child("--source", npy, "--size", 64, "--steps", args.steps, "--batch", args.batch,
                                      "--run-dir", work / f"m{n}-b{args.batch}-{time.time_ns()}", "--in-memory")
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    _report("rss", dict(rows=rows),
            ["images (64x64x3)", "set size", "prepared: own RSS peak", "prepared: file-backed peak",
             "in memory: own RSS peak"],
            [[f"{r['n']:,}", f"{r['gb']:.2f} GB", f"{r['prepared']['own'] / 2**20:.0f} MiB",
              f"{r['prepared'].get('RssFile', 0) / 2**20:.0f} MiB",
              f"{r['in_memory']['own'] / 2**20:.0f} MiB" if "in_memory" in r else "—"] for r in rows])


# --- CIFAR-10 JPEGs -----------------------------------------------------------------------------------


def _cifar_folder(tarball: str, work: Path) -> Path:
    root = work / "cifar10-jpeg"
    if not (root / "train").is_dir():
        with tarfile.open(tarball) as tar:
            tar.extractall(work, filter="data")
    return root


def bench_prepare(args) -> dict:
    from ddpm.io.data import DataConfig
    from ddpm.io.prepared import prepare
    work = Path(args.work or tempfile.mkdtemp(prefix="ddpm-prep-"))
    folder = _cifar_folder(args.cifar, work)
    out = work / "prepared"
    t = time.perf_counter()
    ps = prepare(DataConfig(source=str(folder)), out, progress=False)
    s = time.perf_counter() - t
    res = dict(images=len(ps), seconds=s, images_per_s=len(ps) / s, threads=os.cpu_count(), out=str(out))
    _save("prepare", res)
    print(f"| ddpm prepare, 50k CIFAR-10 JPEGs | {s:.1f} s | {len(ps) / s:,.0f} img/s |")
    return res


def bench_first_step(args) -> None:
    work = Path(args.work or tempfile.mkdtemp(prefix="ddpm-first-"))
    folder = _cifar_folder(args.cifar, work)
    prep = work / "prepared"
    if not (prep / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "ddpm", "prepare", str(folder), "--out", str(prep), "--no-progress"],
                       check=True)
    cache = work / "cache"
    env_cache = dict(DDPM_CACHE_DIR=str(cache))
    rows = {}
    for rep in range(args.repeats):
        for name, argv in (("decode at start (in memory)", ["--source", folder, "--in-memory"]),
                           ("prepared folder", ["--source", prep]),
                           ("folder, cache warm (a resume)", ["--source", folder])):
            if name.startswith("folder") and not cache.exists():  # fill the cache once, outside the timing
                os.environ.update(env_cache)
                _child("--source", folder, "--size", 32, "--steps", 1, "--batch", 32, "--run-dir", work / "fill")
            os.environ.update(env_cache)
            m = _child(*argv, "--size", 32, "--steps", 1, "--batch", 32, "--run-dir", work / f"run-{time.time_ns()}")
            rows.setdefault(name, []).append(m)
            print(name, json.dumps(m), file=sys.stderr)
    med = {k: float(np.median([m["first_step_s"] for m in v])) for k, v in rows.items()}
    ready = {k: float(np.median([m["data_ready_s"] for m in v])) for k, v in rows.items()}
    base, base_ready = med["decode at start (in memory)"], ready["decode at start (in memory)"]
    _report("first-step", dict(rows=rows, median_first_step_s=med, median_data_ready_s=ready),
            ["50k CIFAR-10 JPEGs", "data ready (median)", "vs decode at start", "first step done (median)",
             "vs decode at start"],
            [[k, f"{ready[k]:.3f} s", f"{base_ready / ready[k]:,.0f}x", f"{v:.2f} s", f"{base / v:.1f}x"]
             for k, v in med.items()])


def bench_loader(args) -> None:
    from ddpm.io.data import DataConfig
    from ddpm.io.loader import Prefetcher
    from ddpm.io.prepared import prepare
    from ddpm.workflows.train import DataOrder
    work = Path(args.work or tempfile.mkdtemp(prefix="ddpm-loader-"))
    sets = []
    folder = _cifar_folder(args.cifar, work)
    sets.append(("32x32 (CIFAR-10, 50k)", prepare(DataConfig(source=str(folder)), work / "p32", progress=False), 128))
    npy = work / "x256.npy"
    if not npy.exists():
        a = np.lib.format.open_memmap(npy, "w+", np.uint8, (args.n256, 256, 256, 3))
        a[:] = np.random.default_rng(0).integers(0, 256, a.shape, dtype=np.uint8)
        a.flush()
        del a
    sets.append((f"256x256 (random, {args.n256:,})", prepare(DataConfig(source=str(npy)), work / "p256",
                                                               progress=False), 64))
    rows = []
    for name, ps, batch in sets:
        ps.gather(torch.arange(len(ps)))  # warm the page cache
        mem = ps.load()
        order = DataOrder(len(ps), batch, seed=0)
        steps = max(20, args.images // batch)
        res = dict(set=name, batch=batch, steps=steps)
        for rep in range(args.repeats):
            for label in ("prefetcher, 2 threads", "prefetcher, 1 thread", "in memory (gather)"):
                t = time.perf_counter()
                if label.startswith("prefetcher"):
                    with Prefetcher(ps, order.indices, 0, steps, workers=int(label.split(", ")[1][0])) as loader:
                        for s in range(steps):
                            loader.get(s)
                else:
                    for s in range(steps):
                        mem.gather(order.indices(s))
                res.setdefault(label, []).append(steps * batch / (time.perf_counter() - t))
        rows.append(res)
        print(json.dumps(res), file=sys.stderr)
    kinds = ("prefetcher, 2 threads", "prefetcher, 1 thread", "in memory (gather)")
    _report("loader", dict(rows=rows), ["set", "batch", *kinds],
            [[r["set"], str(r["batch"]), *(f"{np.median(r[k]):,.0f} img/s" for k in kinds)] for r in rows])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    c = sub.add_parser("child-train")
    c.add_argument("--source", required=True)
    c.add_argument("--size", type=int, required=True)
    c.add_argument("--steps", type=int, required=True)
    c.add_argument("--batch", type=int, required=True)
    c.add_argument("--run-dir", required=True)
    c.add_argument("--in-memory", action="store_true")
    for name in ("rss", "first-step", "loader", "prepare"):
        s = sub.add_parser(name)
        s.add_argument("--work", default=None, help="a folder for the data made (default: a new temporary one)")
        s.add_argument("--cifar", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))
        s.add_argument("--repeats", type=int, default=3)
        s.add_argument("--sizes", default="20000,100000,200000")
        s.add_argument("--steps", type=int, default=30)
        s.add_argument("--batch", type=int, default=4, help="rss: the training batch")
        s.add_argument("--in-memory-max", type=int, default=200000, help="largest set also measured in memory")
        s.add_argument("--n256", type=int, default=4000)
        s.add_argument("--images", type=int, default=20000, help="images per loader measurement")
    args = p.parse_args()
    dict(rss=bench_rss, prepare=bench_prepare, loader=bench_loader, **{"first-step": bench_first_step},
         **{"child-train": child_train})[args.what](args)


if __name__ == "__main__":
    main()
