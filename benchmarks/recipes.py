"""What the training options change, measured on runs trained here: post-hoc EMA, min-SNR-γ, importance sampling of t.

    python benchmarks/recipes.py train --root RUNS [--runs base min_snr5 hybrid hybrid_importance]
    python benchmarks/recipes.py fid --root RUNS --ref STATS.npz --out benchmarks/results/recipes-fid.json
    python benchmarks/recipes.py bpd --root RUNS --out benchmarks/results/recipes-bpd.json
    python benchmarks/recipes.py report benchmarks/results/recipes-fid.json benchmarks/results/recipes-bpd.json \
        --plot docs/phema-fid.png

Every run is the 16x16 Fashion-MNIST model of benchmarks/fid_nfe.py (the embedded 10k subset,
T = 1000, the paper's schedule and EMA decay 0.9999, 1,500 steps of 64 images), trained with the
same seed, so two runs differ only in the option named:

- base: the paper's recipe (uniform t, L_simple), with post-hoc EMA tracked (σ_rel 0.05, 0.10,
  a snapshot every 50 steps);
- min_snr5: the same with train.loss_weight=min_snr:5;
- hybrid, hybrid_importance: learned_range variances trained with L_hybrid, t uniform or
  importance-sampled (Nichol & Dhariwal's resampler).

`fid` measures FID (train split, `--n` samples a set, `--seed-sets` disjoint sets; image i of
every set comes from seed (0, i), so the weights compared start from the same x_T and their
per-set differences are paired) of the base run's raw weights, its EMA and post-hoc EMAs of
several widths, and of the min_snr5 run's raw and post-hoc weights, with DPM-Solver++(2M) SDE at
20 network evaluations (logsnr grid): on this model it matches Algorithm 2's FID with the least
spread between seed sets (BENCHMARKS.md § Few-step samplers). `bpd` measures bits/dim of the
first `--n` images of the Fashion-MNIST test split (Debian's dataset-fashion-mnist, at 16x16) for
the two hybrid runs (`--weights`, post-hoc EMA 0.10 by default: the EMA of 0.9999 is noise after
1,500 steps), with the standard error over images, and their per-image difference (the same
images with the same noise: paired). Both append records as they go (rerun to resume); `report`
prints the tables and draws FID against σ_rel.
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
from ddpm.process.sampling import SamplerSpec
from ddpm.run.config import RunConfig
from ddpm.run.load import ModelSpec
from ddpm.workflows.fid import load_stats
from ddpm.workflows.nll import nll_run
from ddpm.workflows.train import train
from fid_nfe import add_fid_args, sample_fid, save_plot  # benchmarks/fid_nfe.py: the same measurement and figure

BASE = dict(
    model=dict(in_channels=1, out_channels=1, ch=32, ch_mult=[1, 2, 2], num_res_blocks=2, attn_resolutions=[],
               dropout=0.1, resolution=16, num_classes=0),
    diffusion=dict(),  # the paper's: linear 1e-4 … 0.02, T = 1000, eps, fixedlarge, L_simple
    data=dict(source="fashion-mnist-10k", resolution=16),
    train=dict(steps=1500, batch_size=64, lr=2e-3, warmup=50, checkpoint_every=250, milestone_every=0, log_every=50,
               device="cpu", precision="auto", phema_every=50))
RUNS = {
    "base": [],
    "min_snr5": ["train.loss_weight=min_snr:5"],
    "hybrid": ["diffusion.var_type=learned_range", "diffusion.loss_type=hybrid"],
    "hybrid_importance": ["diffusion.var_type=learned_range", "diffusion.loss_type=hybrid", "train.t_sampling=importance"],
}
WIDTHS = [0.02, 0.04, 0.07, 0.10, 0.15, 0.25]
# (run, weights) measured by `fid`: the base run's raw weights, EMA and post-hoc widths; min-SNR's
# raw weights and post-hoc EMA of width 0.10, against the base run's, paired
FID_ROWS = ([("base", "model"), ("base", "ema")] + [("base", f"phema:{w}") for w in WIDTHS]
            + [("min_snr5", "model"), ("min_snr5", "phema:0.1")])
SAMPLER = SamplerSpec("dpm++2m-sde", steps=20, spacing="logsnr")


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def _save(out: Path, records: list) -> None:
    write_json(out, dict(command=" ".join(sys.argv), machine=machine(), date=time.strftime("%Y-%m-%d"),
                         records=records))


def cmd_train(args) -> None:
    for name in args.runs:
        run = RunConfig.from_dict(BASE).with_overrides(RUNS[name])
        t0 = time.time()
        res = train(Path(args.root) / name, run, progress=False)
        print(f"{name}: {res['step']} steps, last loss {res['loss']:.4f}, {time.time() - t0:.0f} s", flush=True)


def cmd_fid(args) -> None:
    out = Path(args.out)
    records = json.loads(out.read_text())["records"] if out.is_file() else []
    done = {(r["run"], r["weights"], r["set"]) for r in records}
    inception = load_inception(args.inception_weights, device=torch.device("cpu"))
    ref = load_stats(args.ref)
    for run, weights in FID_ROWS:
        if all((run, weights, k) in done for k in range(args.seed_sets)):
            continue
        loaded, _, _ = ModelSpec(str(Path(args.root) / run), weights=weights, device="cpu",
                                 precision=args.precision).open()
        for k in range(args.seed_sets):
            if (run, weights, k) in done:
                continue
            t0 = time.time()
            fid = sample_fid(loaded, SAMPLER, 0, range(k * args.n, (k + 1) * args.n), args.batch, inception, ref,
                             args.ref)
            rec = dict(run=run, weights=weights, resolved=loaded.weights, set=k, n=args.n, fid=fid,
                       sampler=SAMPLER.describe(loaded.diffusion), seconds=round(time.time() - t0, 1))
            records.append(rec)
            print(json.dumps(rec), flush=True)
            _save(out, records)


def cmd_bpd(args) -> None:
    out = Path(args.out)
    records = json.loads(out.read_text())["records"] if out.is_file() else []
    for run in ("hybrid", "hybrid_importance"):
        if any(r["run"] == run and r["weights"] == args.weights for r in records):
            continue
        t0 = time.time()
        folder = Path(args.root) / run / f"nll-{args.weights.replace(':', '')}"
        res = nll_run(ModelSpec(str(Path(args.root) / run), weights=args.weights, device="cpu", precision="fp32"),
                      "fashion-mnist", folder, split="test", n=args.n, batch=args.batch, progress=False)
        with np.load(folder / "bpd.npz") as z:
            total = z["total_bpd"]
        records.append(dict(run=run, weights=args.weights, n=int(len(total)), bpd=float(total.mean()),
                            sem=float(total.std(ddof=1) / np.sqrt(len(total))), summary=res,
                            seconds=round(time.time() - t0, 1)))
        print(json.dumps(records[-1]), flush=True)
        _save(out, records)
    # the same images with the same noise at every t: the per-image difference is paired
    folders = [Path(args.root) / run / f"nll-{args.weights.replace(':', '')}" for run in ("hybrid", "hybrid_importance")]
    if all((f / "bpd.npz").is_file() for f in folders) and not any(r["run"] == "paired" for r in records):
        a, b = (np.load(f / "bpd.npz")["total_bpd"] for f in folders)
        d = b - a
        records.append(dict(run="paired", weights=args.weights, n=int(len(d)), bpd=float(d.mean()),
                            sem=float(d.std(ddof=1) / np.sqrt(len(d))), what="hybrid_importance − hybrid, per image"))
        print(json.dumps(records[-1]), flush=True)
        _save(out, records)


def cmd_report(args) -> None:
    fid = json.loads(Path(args.fid).read_text())
    by: dict = {}
    for r in fid["records"]:
        by.setdefault((r["run"], r["weights"]), {})[r["set"]] = r["fid"]
    print(f"{fid['command']}\n{fid['machine']}, {fid['date']}\n")
    print("| run | weights | FID (mean ± std over seed sets) | per set |\n|---|---|---|---|")
    for (run, w), sets in by.items():
        v = [sets[k] for k in sorted(sets)]
        print(f"| {run} | {w} | {np.mean(v):.2f}" + (f" ± {np.std(v, ddof=1):.2f}" if len(v) > 1 else "")
              + f" | {', '.join(f'{x:.2f}' for x in v)} |")
    for a, b in ((("min_snr5", "model"), ("base", "model")), (("min_snr5", "phema:0.1"), ("base", "phema:0.1"))):
        if a in by and b in by:
            d = [by[a][k] - by[b][k] for k in sorted(by[a]) if k in by[b]]
            print(f"paired per seed set: FID {a} − FID {b}: {', '.join(f'{x:+.2f}' for x in d)}; mean {np.mean(d):+.2f}")
    if args.bpd:
        bpd = json.loads(Path(args.bpd).read_text())
        print(f"\n{bpd['command']}\n{bpd['machine']}, {bpd['date']}\n\n| run | weights | test images | bits/dim ± s.e. |\n|---|---|---|---|")
        for r in bpd["records"]:
            print(f"| {r['run']} | {r['weights']} | {r['n']} | {r['bpd']:.4f} ± {r['sem']:.4f} |")
    if args.plot:
        save_plot(args.plot, lambda ax: _draw_widths(ax, by, args.line or ()))


def _draw_widths(ax, by: dict, extra_lines) -> None:
    """FID against σ_rel of the base run, with its EMA, its raw weights and `extra_lines` ("LABEL=FID",
    measured elsewhere on the same weights and seeds) as horizontal lines; a line far above the
    curve is drawn at the top edge, its value in the legend."""
    pts = sorted((float(w.split(":")[1]), [s[k] for k in sorted(s)]) for (run, w), s in by.items()
                 if run == "base" and w.startswith("phema:"))
    ax.errorbar([p[0] for p in pts], [np.mean(p[1]) for p in pts],
                yerr=[np.std(p[1], ddof=1) if len(p[1]) > 1 else 0 for p in pts], marker="o", capsize=3,
                label="post-hoc EMA (one run, reconstructed)")
    top = max(np.mean(p[1]) for p in pts)
    lines = [(f"{'the paper' + chr(39) + 's EMA (0.9999)' if w == 'ema' else 'raw weights'}",
              float(np.mean(list(by[("base", w)].values()))), style)
             for w, style in (("ema", "--"), ("model", ":")) if ("base", w) in by]
    lines += [(label, float(value), "-.") for label, value in (x.rsplit("=", 1) for x in extra_lines)]
    top = max([top] + [v for _, v, _ in lines if v < 2 * top])
    for label, value, style in lines:
        above = value > 1.1 * top
        ax.axhline(min(value, 1.1 * top), linestyle=style, color="gray", alpha=0.4 if above else 1.0,
                   label=f"{label}: {value:.1f}" + (" (above the plot)" if above else ""))
    ax.set_ylim(top=1.12 * top)
    ax.set(xlabel="relative EMA width σ_rel", ylabel="FID (train split)",
           title="FID against the EMA width, 1,500 steps, 16x16 Fashion-MNIST")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--root", required=True)
    t.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    f = sub.add_parser("fid")
    f.add_argument("--root", required=True)
    add_fid_args(f, seed_sets=2)
    f.add_argument("--out", required=True)
    b = sub.add_parser("bpd")
    b.add_argument("--root", required=True)
    b.add_argument("--n", type=int, default=200)
    b.add_argument("--batch", type=int, default=100)
    b.add_argument("--weights", default="phema:0.1", help="which weights of each run (the EMA of 0.9999 is not "
                                                          "yet meaningful after 1,500 steps)")
    b.add_argument("--out", required=True)
    r = sub.add_parser("report")
    r.add_argument("fid")
    r.add_argument("bpd", nargs="?")
    r.add_argument("--plot", default=None)
    r.add_argument("--line", action="append", metavar="LABEL=FID",
                   help="a horizontal line for a FID measured elsewhere on the same weights and seeds")
    args = p.parse_args()
    dict(train=cmd_train, fid=cmd_fid, bpd=cmd_bpd, report=cmd_report)[args.cmd](args)


if __name__ == "__main__":
    main()
