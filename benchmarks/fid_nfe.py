"""FID against the number of network evaluations (NFE), for every sampler, on one trained run.

    python benchmarks/fid_nfe.py run --run RUN --ref STATS.npz --n 500 --out benchmarks/results/fid-nfe.json
    python benchmarks/fid_nfe.py report benchmarks/results/fid-nfe.json --plot docs/fid-nfe.png

`run` samples each (sampler, grid, NFE) of the table, `--seed-sets` disjoint sets of `--n` images
(set k is images k·n … (k+1)·n − 1, each image from its own seed, so every sampler starts from the
same x_T), measures their FID against the reference statistics with the package's Inception, and
appends one record per set to the JSON file as it goes: rerun the same command to resume. Images
stay in memory; nothing but the JSON is written. `report` prints the markdown table (FID mean ±
the std over seed sets) and draws FID against NFE.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ddpm.io.atomic import write_json
from ddpm.io.inception_weights import load_inception
from ddpm.process.scaling import to_uint8
from ddpm.process.sampling import SamplerSpec
from ddpm.run.load import ModelSpec
from ddpm.workflows.evaluate import compare, measure_batches
from ddpm.workflows.fid import FIDStats, load_stats
from ddpm.workflows.sample import Images, sample

# (sampler, grid) rows of the table: each solver on the grid its authors use for few steps; DDIM on
# the quadratic grid of the DDIM paper's CIFAR-10 table.
ROWS = [("ddim", "quad"), ("dpm++2m", "logsnr"), ("dpm++2m-sde", "logsnr"), ("unipc", "logsnr"), ("heun", "karras")]
NFES = [10, 20, 50, 100]


def sample_fid(loaded, sampler: SamplerSpec, seed: int, images: range, batch: int, inception, ref: FIDStats,
               where: str) -> float:
    """FID against `ref` of the images `images` (image i from seed (seed, i)) that `loaded` draws with
    `sampler`, `batch` at a time; the images stay in memory."""
    idx = list(images)

    def batches():
        for s in range(0, len(idx), batch):
            part = idx[s:s + batch]
            yield part, to_uint8(sample(loaded.model, loaded.diffusion, loaded.shape, Images(seed, part), device="cpu",
                                        sampler=sampler))

    m = measure_batches(batches(), len(idx), inception)
    stats = FIDStats.from_features(m.stats, {"inception": inception.info}, m.features, m.index)
    return compare(stats, ref, where=where)["fid"]


def run(args) -> None:
    torch.manual_seed(0)
    out = Path(args.out)
    records = json.loads(out.read_text())["records"] if out.is_file() else []
    done = {(r["sampler"], r["spacing"], r["steps"], r["set"]) for r in records}
    loaded, dist, _ = ModelSpec(args.run, device="cpu", precision=args.precision).open()
    inception = load_inception(args.inception_weights, device=torch.device("cpu"))
    ref = load_stats(args.ref)
    configs = [("ancestral", "uniform", loaded.diffusion.num_timesteps)] if args.ancestral else []
    configs = [(s, g, n) for n in args.nfe for s, g in ROWS if s in args.samplers] + configs
    for name, grid, nfe in configs:
        spec = SamplerSpec(name) if name == "ancestral" else SamplerSpec(name, steps=nfe, spacing=grid)
        times, _ = spec.chain(loaded.diffusion)
        for k in range(args.seed_sets):
            if (name, grid, nfe, k) in done:
                continue
            t0 = time.time()
            fid = sample_fid(loaded, spec, args.seed, range(k * args.n, (k + 1) * args.n), args.batch, inception, ref,
                             args.ref)
            rec = dict(sampler=name, spacing=grid, steps=nfe, nfe=spec.nfe(times), set=k, n=args.n, fid=fid,
                       seconds=round(time.time() - t0, 1))
            records.append(rec)
            print(json.dumps(rec), flush=True)
            write_json(out, dict(command=" ".join(sys.argv), precision=args.precision, machine=f"{platform.processor() or platform.machine()}, "
                                 f"{os.cpu_count()} cores, torch {torch.__version__}", run=str(args.run),
                                 ref=str(args.ref), date=time.strftime("%Y-%m-%d"), records=records))


def table(records: list) -> tuple[list[str], dict]:
    """The markdown rows (one per sampler and grid, one column per NFE) and {(sampler, spacing): {nfe: (mean, std, k)}}."""
    cells: dict = {}
    for r in records:
        # columns by the NFE asked for: heun uses one fewer for an even N (two a step, one on the last)
        cells.setdefault((r["sampler"], r["spacing"]), {}).setdefault(r["steps"], []).append(r["fid"])
    summary = {row: {nfe: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else None, len(v))
                     for nfe, v in sorted(by.items())} for row, by in cells.items()}
    nfes = sorted({nfe for by in summary.values() for nfe in by})
    lines = ["| sampler (grid) | " + " | ".join(str(n) for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
    for (s, g), by in summary.items():
        fmt = lambda c: "" if c is None else f"{c[0]:.2f}" + (f" ± {c[1]:.2f}" if c[1] is not None else "")  # noqa: E731
        label = f"{s} ({g}; N − 1 for even N)" if s == "heun" else f"{s} ({g})"
        lines.append(f"| {label} | " + " | ".join(fmt(by.get(n)) for n in nfes) + " |")
    return lines, summary


def report(args) -> None:
    doc = json.loads(Path(args.results).read_text())
    lines, summary = table(doc["records"])
    print(f"{doc['command']}\n{doc['machine']}, {doc['date']}\n")
    print("\n".join(lines))
    for pair in args.pair or ():
        # Every sampler starts image i from the same x_T, so two rows of one seed set are paired:
        # their per-set difference is far less noisy than either FID.
        (a, na), (b, nb) = (p.split("@") for p in pair.split(","))
        by_set = {}
        for r in doc["records"]:
            for key, name, n in (("a", a, na), ("b", b, nb)):
                if r["sampler"] == name and r["steps"] == int(n):
                    by_set.setdefault(r["set"], {})[key] = r["fid"]
        diffs = [v["a"] - v["b"] for _, v in sorted(by_set.items()) if len(v) == 2]
        print(f"paired: FID {a} at {na} − {b} at {nb}, per seed set: " + ", ".join(f"{x:+.2f}" for x in diffs)
              + (f"; mean {np.mean(diffs):+.2f}" if diffs else ""))
    if args.plot:
        def draw(ax):
            for (s, g), by in summary.items():
                nfes = sorted(by)
                ax.errorbar(nfes, [by[n][0] for n in nfes], yerr=[by[n][1] or 0 for n in nfes], marker="o",
                            capsize=3, label=f"{s} ({g})")
            ax.set(xscale="log", xlabel="network evaluations (NFE)", ylabel="FID")

        save_plot(args.plot, draw)


def save_plot(path, draw) -> None:
    """One 6x4 figure: `draw(ax)` fills it, then a legend and a light grid, written as a PNG at `path`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    draw(ax)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def add_fid_args(p, seed_sets: int) -> None:
    """The flags of a FID measurement by `sample_fid`, shared by this script and recipes.py: the
    reference, `--seed-sets` disjoint sets of `--n` images, the batch, the network's precision and
    the Inception weights."""
    p.add_argument("--ref", required=True, help="reference statistics (ddpm fid-ref) of the model's training data")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--seed-sets", type=int, default=seed_sets)
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--precision", default="auto", choices=("fp32", "bf16", "auto"),
                   help="the network's (auto: bf16 where the CPU computes it natively); the solvers stay fp32")
    p.add_argument("--inception-weights", default=None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--run", required=True)
    add_fid_args(r, seed_sets=1)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--nfe", type=int, nargs="+", default=NFES)
    r.add_argument("--samplers", nargs="+", default=[s for s, _ in ROWS])
    r.add_argument("--ancestral", action="store_true", help="also Algorithm 2 with its T evaluations")
    r.add_argument("--out", required=True)
    q = sub.add_parser("report")
    q.add_argument("results")
    q.add_argument("--plot", default=None)
    q.add_argument("--pair", action="append", metavar="A@N,B@M",
                   help="also the per-seed-set difference FID(A at N) − FID(B at M), e.g. dpm++2m@20,ddim@100")
    args = p.parse_args()
    run(args) if args.cmd == "run" else report(args)


if __name__ == "__main__":
    main()
