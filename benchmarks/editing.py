"""The editing commands measured on a model trained here: RePaint inpainting, SDEdit image-to-image, DDIM inversion.

    python benchmarks/editing.py prepare --root ROOT      # the 9,000 training images, held-out PNGs
    python benchmarks/editing.py train --root ROOT        # the base recipe on them (rerun to resume)
    python benchmarks/editing.py measure --root ROOT --out benchmarks/results/editing-DATE.json
    python benchmarks/editing.py report --root ROOT                     # the tables again
    python benchmarks/editing.py figure --root ROOT --out docs/inpaint.png

The model is the 16x16 Fashion-MNIST model of benchmarks/recipes.py (`base`: T = 1000, the paper's
schedule, 1,500 steps of 64 images, seed 0) with EMA decay 0.995 (the paper's 0.9999 still holds
mostly the initial weights after 1,500 steps; 0.995 matched the best post-hoc EMA there), trained on
the first 9,000 images of the embedded set (fashion-mnist-10k: 1,000 per class, in file order);
images 9,000–9,999 are held out and every edit is of them. They are written as 28x28 PNGs and
the commands bring them to 16x16 by the package's rule.

`measure`, in one process, on the same 16 held-out images with seed 0 and batch 16:
- `ddpm.sample_run` of 16 images (Algorithm 2, 1,000 steps), timed before and after the edits;
- `ddpm.inpaint` with the `center` mask, RePaint's j = 10, r = 10 (Algorithm 2: 9,910 network
  evaluations an image) and r = 1 (no resampling: 1,000), timed; the RMSE of each image's hidden
  pixels against the original (paired between r = 10 and r = 1: same images, same x_T);
- `ddpm.img2img` at strengths 0.3, 0.5, 0.7 (Algorithm 2 from t0 = s·T), timed, with each output's
  RMSE from its input;
- `ddpm.invert(verify=True)` of 64 held-out images at 50 and 200 DDIM steps: the round-trip errors
  the command records, and the latents decoded again by `ddpm.decode_run` (what
  `ddpm sample --from-latent` does) compared with the inputs in pixel levels.
Each step's record is appended to ROOT/records.json as it finishes (rerun to resume; a step that
did not finish is redone from an empty folder, so its time is a whole run's); the results file is
written from them. `figure` draws docs/inpaint.png from the two inpainting folders.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

import ddpm
from ddpm.io.atomic import write_json
from ddpm.process.editing import repaint_nfe
from ddpm.process.sampling import SamplerSpec
from ddpm.run.config import RunConfig
from ddpm.run.load import ModelSpec
from ddpm.workflows.edit import load_inputs, shape_mask
from recipes import BASE  # benchmarks/recipes.py: the same model and recipe

SOURCE = Path(ddpm.__file__).parent / "assets" / "fashion_mnist_10k.npz"
N_TRAIN = 9000
N_EDIT, N_INVERT = 16, 64
STRENGTHS = (0.3, 0.5, 0.7)
INVERT_STEPS = (50, 200)
SEED, BATCH = 0, 16
OVERRIDES = ["train.ema_decay=0.995"]


def machine() -> dict:
    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    field = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in reversed(info))}  # the first CPU's
    flags = field.get("flags", "").split()
    return dict(cpu=field.get("model name") or platform.processor() or platform.machine(),
                cpu_flags=[f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags],
                cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
                omp_num_threads=os.environ.get("OMP_NUM_THREADS"), torch=torch.__version__,
                python=platform.python_version(), ddpm=ddpm.__version__)


def paths(root: Path) -> dict:
    return dict(data=root / "data" / f"train{N_TRAIN}.npz", held=root / "held-out", run=root / "run",
                edits=root / "edits", records=root / "records.json")


def held_out(root: Path, n: int) -> list:
    return [str(paths(root)["held"] / f"{N_TRAIN + i:05d}.png") for i in range(n)]


# ---------------------------------------------------------------------------------------------


def cmd_prepare(args) -> None:
    from PIL import Image
    p = paths(Path(args.root))
    with np.load(SOURCE) as z:
        x, y = z["images"], z["labels"]
    p["data"].parent.mkdir(parents=True, exist_ok=True)
    if not p["data"].is_file():
        np.savez(p["data"], x=x[:N_TRAIN], labels=y[:N_TRAIN])
    p["held"].mkdir(parents=True, exist_ok=True)
    for i in range(N_TRAIN, len(x)):
        f = p["held"] / f"{i:05d}.png"
        if not f.is_file():
            Image.fromarray(x[i]).save(f)
    np.save(p["held"] / "labels.npy", y[N_TRAIN:])
    print(f"{p['data']}: {N_TRAIN} images (classes {np.bincount(y[:N_TRAIN]).tolist()}); "
          f"{p['held']}: {len(x) - N_TRAIN} held-out PNGs (classes {np.bincount(y[N_TRAIN:]).tolist()})")


def cmd_train(args) -> None:
    p = paths(Path(args.root))
    run = RunConfig.from_dict(BASE).with_overrides([f"data.source={p['data']}"] + OVERRIDES)
    t0 = time.time()
    res = ddpm.train(p["run"], run, progress=False)
    print(f"{p['run']}: {res['step']} steps, last loss {res['loss']:.4f}, {time.time() - t0:.0f} s", flush=True)


# ---------------------------------------------------------------------------------------------


class Records:
    """ROOT/records.json: one record per finished step, keyed by its name."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def run(self, name: str, folder: Path, fn) -> dict:
        if name in self.data:
            print(f"{name}: recorded, skipped", flush=True)
            return self.data[name]
        if folder.exists():  # a step that did not finish: redone whole, so its time is a whole run's
            shutil.rmtree(folder)
        t0 = time.perf_counter()
        res = fn(folder)
        rec = dict(seconds=round(time.perf_counter() - t0, 2), pid=os.getpid(),
                   finished=time.strftime("%Y-%m-%d %H:%M:%S"), **res)
        self.data[name] = rec
        write_json(self.path, self.data)
        print(f"{name}: {json.dumps({k: v for k, v in rec.items() if not isinstance(v, list)})}", flush=True)
        return rec


def _summary(v) -> dict:
    v = np.asarray(v, dtype=np.float64)
    return dict(median=float(np.median(v)), max=float(v.max()), mean=float(v.mean()))


def _mean_se(v) -> dict:
    v = np.asarray(v, dtype=np.float64)
    return dict(mean=float(v.mean()), se=float(v.std(ddof=1) / np.sqrt(len(v))), n=int(len(v)))


def _outputs(folder: Path) -> torch.Tensor:
    """A results folder's images, uint8 [n, C, H, W] (samples.npz "x" is NHWC)."""
    with np.load(folder / "samples.npz") as z:
        return torch.from_numpy(z["x"]).permute(0, 3, 1, 2)


def _rmse(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor | None = None) -> list:
    """Per-image RMSE in [-1, 1] units between uint8 images a and b, over the pixels `where` is True."""
    d = (a.double() - b.double()) / 127.5
    if where is None:
        return d.flatten(1).pow(2).mean(1).sqrt().tolist()
    w = where.expand_as(d).double()
    return ((d.pow(2) * w).flatten(1).sum(1) / w.flatten(1).sum(1)).sqrt().tolist()


def cmd_measure(args) -> None:
    root = Path(args.root)
    p = paths(root)
    rec = Records(p["records"])
    spec = ModelSpec(str(p["run"]), weights=args.weights, device="cpu", precision="fp32")
    loaded, _, _ = spec.open()
    shape = loaded.shape
    edit_imgs, inv_imgs = held_out(root, N_EDIT), held_out(root, N_INVERT)
    u8 = load_inputs(edit_imgs, shape)
    hidden = ~shape_mask("center", tuple(shape[1:]))  # [1, H, W], True = inpainted
    sampler = SamplerSpec()  # Algorithm 2, every t
    times, _ = sampler.chain(loaded.diffusion)
    e = p["edits"]

    # warm-up (first-call costs: the fast paths, allocator), untimed and not recorded
    ddpm.sample_run(spec, e / "warmup", BATCH, batch=BATCH, seed=SEED, sampler=SamplerSpec("ddim", steps=20),
                    progress=False)

    def sample(folder):
        res = ddpm.sample_run(spec, folder, N_EDIT, batch=BATCH, seed=SEED, sampler=sampler, progress=False)
        return dict(n=res["n"], nfe=sampler.nfe(times))

    rec.run("sample_before", e / "sample-before", sample)

    for r in (10, 1):
        def inpaint(folder, r=r):
            res = ddpm.inpaint(spec, ddpm.EditSet(edit_imgs, SEED, BATCH), folder, masks=["center"],
                               walk=ddpm.RePaintSpec(10, r), sampler=sampler, progress=False)
            out = _outputs(folder)
            assert torch.equal(out[..., ~hidden[0]], u8[..., ~hidden[0]]), "the known pixels changed"
            return dict(n=res["n"], nfe=res["nfe"], nfe_check=repaint_nfe(times, 10, r), jump=10, resample=r,
                        hidden_rmse=_rmse(out, u8, hidden), hidden_pixels=int(hidden.sum()))
        rec.run(f"inpaint_r{r}", e / f"inpaint-r{r}", inpaint)

    for s in STRENGTHS:
        def img2img(folder, s=s):
            res = ddpm.img2img(spec, ddpm.EditSet(edit_imgs, SEED, BATCH), folder, strength=s, sampler=sampler,
                               progress=False)
            return dict(n=res["n"], nfe=res["nfe"], strength=s, rmse_from_input=_rmse(_outputs(folder), u8))
        rec.run(f"img2img_{s}", e / f"img2img-{s}", img2img)

    rec.run("sample_after", e / "sample-after", sample)

    for steps in INVERT_STEPS:
        def invert(folder, steps=steps):
            res = ddpm.invert(spec, inv_imgs, folder, steps=steps, batch=BATCH, verify=True, progress=False)
            return {k: res[k] for k in ("n", "nfe", "steps", "spacing", "latent_mean", "latent_std", "round_trip_rmse",
                                        "round_trip_max", "round_trip_pixel_levels_max")}
        inv = rec.run(f"invert_{steps}", e / f"invert-{steps}", invert)

        def decode(folder, steps=steps):  # `ddpm sample --from-latent` of the saved latents, against the inputs
            res = ddpm.decode_run(spec, str(e / f"invert-{steps}" / "latents.npz"), folder, batch=BATCH, progress=False)
            out, x = _outputs(folder), load_inputs(inv_imgs, shape)
            d = (out.int() - x.int()).abs().flatten(1)
            return dict(n=res["n"], pixel_rmse=d.double().pow(2).mean(1).sqrt().tolist(),
                        pixel_max=d.max(1).values.tolist(), rmse=_rmse(out, x),
                        identical_to_invert_max=bool(d.max(1).values.tolist() == inv["round_trip_pixel_levels_max"]))
        rec.run(f"decode_{steps}", e / f"decode-{steps}", decode)

    abar = {s: loaded.diffusion.alpha_bar(round(s * loaded.diffusion.num_timesteps)) for s in STRENGTHS}
    write_json(Path(args.out), results(rec.data, args, abar))
    print(f"wrote {args.out}")
    report(rec.data)


def results(data: dict, args, abar: dict) -> dict:
    sample_s = [data[k]["seconds"] for k in ("sample_before", "sample_after")]
    finished = sorted(r["finished"] for r in data.values() if "finished" in r)
    metrics = paths(Path(args.root))["run"] / "metrics.jsonl"
    last = json.loads(metrics.read_text().splitlines()[-1]) if metrics.is_file() else {}
    out = dict(command=shlex.join(["python"] + sys.argv), machine=machine(),
               date=f"{finished[0]} – {finished[-1]}" if finished else time.strftime("%Y-%m-%d %H:%M"),
               model=dict(recipe="benchmarks/recipes.py base", overrides=OVERRIDES, trained_on=f"fashion-mnist-10k "
                          f"images 0–{N_TRAIN - 1}", held_out=f"images {N_TRAIN}–9999", weights=args.weights,
                          resolution=16, T=1000, steps=last.get("step"), last_loss=last.get("loss")),
               timing=dict(images=N_EDIT, batch=BATCH, seed=SEED, sample_seconds=sample_s,
                           sample_seconds_mean=float(np.mean(sample_s)), pids=sorted({r["pid"] for r in data.values()})),
               note=args.note, records=data)
    t = out["timing"]
    for r in (10, 1):
        d = data[f"inpaint_r{r}"]
        t[f"inpaint_r{r}"] = dict(seconds=d["seconds"], nfe=d["nfe"], nfe_ratio=d["nfe"] / data["sample_before"]["nfe"],
                                  time_ratio=d["seconds"] / float(np.mean(sample_s)),
                                  time_ratio_to_r1=d["seconds"] / data["inpaint_r1"]["seconds"],
                                  hidden_rmse=_mean_se(d["hidden_rmse"]))
    for s in STRENGTHS:
        d = data[f"img2img_{s}"]
        t[f"img2img_{s}"] = dict(seconds=d["seconds"], nfe=d["nfe"], time_ratio=d["seconds"] / float(np.mean(sample_s)),
                                 alpha_bar_t0=abar[s], signal_to_noise_t0=abar[s] / (1 - abar[s]),
                                 rmse_from_input=_mean_se(d["rmse_from_input"]))
    a, b = np.array(data["inpaint_r10"]["hidden_rmse"]), np.array(data["inpaint_r1"]["hidden_rmse"])
    out["inpaint_paired"] = dict(what="hidden-pixel RMSE (centre 8x8, [-1, 1] units), r=10 minus r=1, per image",
                                 **_mean_se(a - b), r10_lower=int((a < b).sum()))
    inv = {}
    for steps in INVERT_STEPS:
        i, d = data[f"invert_{steps}"], data[f"decode_{steps}"]
        inv[steps] = dict(nfe=i["nfe"], seconds=i["seconds"], rmse=_summary(i["round_trip_rmse"]),
                          max_abs=_summary(i["round_trip_max"]),
                          pixel_rmse=_summary(d["pixel_rmse"]), pixel_max=_summary(d["pixel_max"]),
                          library_pixel_max=_summary(i["round_trip_pixel_levels_max"]),
                          decode_matches_invert=d["identical_to_invert_max"], latent_std=i["latent_std"])
    out["invert"] = inv
    return out


def report(data: dict) -> None:
    s = np.mean([data[k]["seconds"] for k in ("sample_before", "sample_after")])
    print(f"\nsampling 16 images (1,000 steps): {data['sample_before']['seconds']:.1f} s before, "
          f"{data['sample_after']['seconds']:.1f} s after")
    print("| edit | network evaluations an image | NFE ratio | seconds (16 images) | time ratio | RMSE |\n|---|---|---|---|---|---|")
    for r in (10, 1):
        d = data[f"inpaint_r{r}"]
        m = _mean_se(d["hidden_rmse"])
        print(f"| inpaint r={r} | {d['nfe']} | {d['nfe'] / 1000:.2f} | {d['seconds']:.1f} | {d['seconds'] / s:.2f} | "
              f"hidden {m['mean']:.3f} ± {m['se']:.3f} |")
    for st in STRENGTHS:
        d = data[f"img2img_{st}"]
        m = _mean_se(d["rmse_from_input"])
        print(f"| img2img {st} | {d['nfe']} | {d['nfe'] / 1000:.2f} | {d['seconds']:.1f} | {d['seconds'] / s:.2f} | "
              f"from input {m['mean']:.3f} ± {m['se']:.3f} |")
    a, b = np.array(data["inpaint_r10"]["hidden_rmse"]), np.array(data["inpaint_r1"]["hidden_rmse"])
    m = _mean_se(a - b)
    print(f"paired r=10 − r=1 hidden RMSE: {m['mean']:+.3f} ± {m['se']:.3f} (r=10 lower on {(a < b).sum()}/{len(a)})")
    print("\n| DDIM steps | NFE (invert + decode) | seconds (64) | RMSE median / max | max abs median / max | "
          "pixel RMSE median / max | pixel max median / max |\n|---|---|---|---|---|---|---|")
    for steps in INVERT_STEPS:
        i, d = data[f"invert_{steps}"], data[f"decode_{steps}"]
        f = [_summary(i["round_trip_rmse"]), _summary(i["round_trip_max"]), _summary(d["pixel_rmse"]),
             _summary(d["pixel_max"])]
        print(f"| {steps} | {i['nfe']} | {i['seconds']:.1f} | {f[0]['median']:.4f} / {f[0]['max']:.4f} | "
              f"{f[1]['median']:.4f} / {f[1]['max']:.4f} | {f[2]['median']:.2f} / {f[2]['max']:.2f} | "
              f"{f[3]['median']:.0f} / {f[3]['max']:.0f} |")


def cmd_report(args) -> None:
    report(Records(paths(Path(args.root))["records"]).data)


# ---------------------------------------------------------------------------------------------


def cmd_figure(args) -> None:
    """Rows: held-out images; columns: input, masked input, RePaint r = 10, r = 1 (two blocks of rows
    side by side), each 16x16 image upscaled by nearest neighbour."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    root = Path(args.root)
    e = paths(root)["edits"]
    spec = ModelSpec(str(paths(root)["run"]), weights=args.weights, device="cpu")
    shape = spec.open()[0].shape
    u8 = load_inputs(held_out(root, args.rows), shape)
    keep = shape_mask("center", tuple(shape[1:]))
    shown = torch.where(keep, u8, torch.full_like(u8, 128))
    cols = [u8, shown, _outputs(e / "inpaint-r10")[:args.rows], _outputs(e / "inpaint-r1")[:args.rows]]
    names = ["input", "masked", "RePaint\nr = 10", "r = 1"]
    blocks, nc = args.blocks, len(cols)
    per = -(-args.rows // blocks)
    ratios = sum(([1.0] * nc + [0.3] for _ in range(blocks)), [])[:-1]  # a narrow gap between the blocks
    cell, head = 0.62, 0.42
    fig, axes = plt.subplots(per, len(ratios), figsize=(cell * sum(ratios), cell * per + head),
                             gridspec_kw=dict(width_ratios=ratios, wspace=0.06, hspace=0.06), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for b in range(blocks):
        for r in range(per):
            k = b * per + r
            for c, col in enumerate(cols):
                ax = axes[r, b * (nc + 1) + c]
                if k < args.rows:
                    ax.imshow(col[k, 0].numpy(), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
                if r == 0:
                    ax.set_title(names[c], fontsize=7)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - head / (cell * per + head))
    fig.savefig(args.out, dpi=args.dpi)
    plt.close(fig)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1024:.0f} KB)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("prepare", "train", "measure", "report", "figure"):
        s = sub.add_parser(name)
        s.add_argument("--root", required=True, help="the data, the run and the edits' folders")
        if name in ("measure", "figure"):
            s.add_argument("--weights", default="ema", help="which weights of the run (ema: decay 0.995)")
        if name == "measure":
            s.add_argument("--out", required=True, help="the results JSON")
            s.add_argument("--note", default="", help="recorded with the results (e.g. what else ran on the machine)")
        if name == "figure":
            s.add_argument("--out", default="docs/inpaint.png")
            s.add_argument("--rows", type=int, default=N_EDIT)
            s.add_argument("--blocks", type=int, default=2, help="blocks of rows side by side")
            s.add_argument("--dpi", type=int, default=150)
    args = p.parse_args()
    dict(prepare=cmd_prepare, train=cmd_train, measure=cmd_measure, report=cmd_report, figure=cmd_figure)[args.cmd](args)


if __name__ == "__main__":
    main()
