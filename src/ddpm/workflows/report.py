"""`ddpm report RUN_DIR`: one self-contained HTML page of a run.

Everything a run folder holds, in one file that opens offline (images embedded as data URIs, no
script, no external style): the resolved config, the loss and the loss by timestep quartile over
steps (and by class for a class-conditional run), gradient norm and learning rate, throughput,
FID, KID and precision/recall during training, the sample grids written during training and by
`make demo` (with its progressive strip), and, for each `ddpm eval` of the run, its FID / KID /
precision-recall / IS table, the memorization check, the bits/dim by
timestep (the terms L_t) and the rate-distortion curve (Fig. 5). The plots are matplotlib's
(Agg, no display needed).
"""

from __future__ import annotations

import base64
import html
import json
import re
import time
from pathlib import Path
from typing import Optional

from ..errors import UserError
from ..files import read_bytes
from ..io.atomic import write_text
from ..io.escape import html_text, plot_text
from ..io.folders import claim_file
from ..io.images import figure_png
from ..io import checkpoint as ckpt
from ..run.folder import METRICS_NAME, read_metrics, read_run_record
from ..version import __version__
from .evaluate import read_eval_report
from .nll import draw_rate_distortion, load_bpd, rate_distortion

REPORT_NAME = "report.html"
GENERATOR = '<meta name="generator" content="ddpm report">'  # marks a page as ours: a rerun may replace it
_HEAD = '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}h1{font-size:1.5em}"
         "h2{font-size:1.2em;border-bottom:1px solid #ccc;margin-top:2em}img{max-width:100%;image-rendering:pixelated}"
         "pre{background:#f6f6f6;padding:1em;overflow:auto;font-size:.8em}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:right}figure{display:inline-block;margin:.5em}"
         "figcaption{font-size:.85em;color:#555}")


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure(plot, caption: str, size: tuple = (6.4, 3.6)) -> str:
    """A matplotlib figure drawn by `plot(fig)`, as an <img> with the PNG inline, and its caption."""
    return (f'<figure><img alt="{html_text(caption)}" src="{_data_uri(figure_png(plot, size))}">'
            f"<figcaption>{html_text(caption)}</figcaption></figure>")


def _image(path: Path, caption: str) -> str:
    """A PNG file inline, shown 3x (at most 520 px wide): sample grids of small images stay legible."""
    png = read_bytes(path)
    width = min(3 * int.from_bytes(png[16:20], "big"), 520)  # the IHDR width
    return (f'<figure><img alt="{html_text(caption)}" width="{width}" src="{_data_uri(png)}">'
            f"<figcaption>{html_text(caption)}</figcaption></figure>")


def _edits(run_dir: Path) -> list[str]:
    """The editing folders inside the run folder (one or two levels down), each as its compare.png
    (inputs, masks, outputs side by side) with a caption from its record."""
    out = []
    for record in sorted([*run_dir.glob("*/edit.json"), *run_dir.glob("*/*/edit.json"),
                          *run_dir.glob("*/invert.json"), *run_dir.glob("*/*/invert.json")]):
        picture = record.parent / "compare.png"
        try:
            d = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not picture.is_file() or not isinstance(d, dict):
            continue
        where = record.parent.relative_to(run_dir)
        if record.name == "invert.json":
            caption = (f"{where}: DDIM inversion, {d.get('steps')} steps; columns: input, latent x_T (±3σ shown)"
                       f"{', decoded back' if 'round_trip_rmse' in d else ''}")
        elif d.get("edit") == "inpaint":
            caption = (f"{where}: inpainting (RePaint, jump {d.get('jump')}, {d.get('resample')} resamplings, "
                       f"{d.get('sampler')}, {d.get('nfe'):,} network evaluations); columns: input, masked input, output")
        else:
            caption = (f"{where}: image-to-image (SDEdit, strength {d.get('strength')}, t0 = {d.get('t0')}, "
                       f"{d.get('sampler')}); columns: input, output")
        out.append(_image(picture, caption))
    return out


def _series(recs: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in recs if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _training_plots(recs: list[dict]) -> list[str]:
    out = []
    train = [r for r in recs if "loss" in r]
    if train:
        def losses(fig):
            ax = fig.add_subplot()
            ax.plot(*_series(train, "loss"), label="loss", color="k", linewidth=2)
            for i, name in enumerate(("1 … T/4", "T/4 … T/2", "T/2 … 3T/4", "3T/4 … T")):
                ax.plot(*_series(train, f"loss_q{i}"), label=f"t in {name}", linewidth=1)
            ax.set(xlabel="step", ylabel="loss", yscale="log", title="Training loss, and by timestep quartile")
            ax.legend(fontsize=7)
        out.append(_figure(losses, "Training loss, and by timestep quartile"))

        def optim(fig):
            a1, a2 = fig.subplots(1, 2)
            a1.plot(*_series(train, "grad_norm"))
            a1.set(xlabel="step", title="gradient norm (before clipping)")
            a2.plot(*_series(train, "lr"))
            a2.set(xlabel="step", title="learning rate")
        out.append(_figure(optim, "Gradient norm and learning rate"))

        def speed(fig):
            ax = fig.add_subplot()
            ax.plot(*_series(train, "img_per_s"))
            ax.set(xlabel="step", ylabel="images / s", title="Throughput")
        out.append(_figure(speed, "Throughput"))
    by_class = [r for r in train if isinstance(r.get("loss_by_class"), dict)]
    if by_class:
        def classes(fig):
            ax = fig.add_subplot()
            for name in by_class[-1]["loss_by_class"]:
                pts = [(r["step"], r["loss_by_class"].get(name)) for r in by_class]
                pts = [p for p in pts if isinstance(p[1], (int, float))]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=plot_text(name), linewidth=1)
            ax.set(xlabel="step", ylabel="loss", yscale="log", title="Loss by class")
            ax.legend(fontsize=6, ncol=2)
        out.append(_figure(classes, "Loss by class"))
    fid = [r for r in recs if isinstance(r.get("fid"), (int, float))]
    if fid:
        def fids(fig):
            ax = fig.add_subplot()
            ax.plot(*_series(fid, "fid"), marker="o")
            ax.set(xlabel="step", ylabel="FID", title=f"FID of the EMA weights during training ({fid[-1].get('fid_n')} samples)")
        out.append(_figure(fids, "FID during training"))
        if any(isinstance(r.get("kid"), (int, float)) for r in fid):
            def more(fig):
                a1, a2 = fig.subplots(1, 2)
                a1.plot(*_series(fid, "kid"), marker="o")
                a1.set(xlabel="step", title="KID")
                a2.plot(*_series(fid, "precision"), marker="o", label="precision")
                a2.plot(*_series(fid, "recall"), marker="o", label="recall")
                a2.set(xlabel="step", title="precision and recall (k=3)", ylim=(0, 1))
                a2.legend(fontsize=7)
            out.append(_figure(more, "KID, precision and recall during training"))
    return out


def _evaluation(reports: list[tuple[Path, dict]]) -> list[str]:
    parts = []
    for path, rep in reports:
        fid, iscore, bpd = rep.get("fid") or {}, rep.get("inception_score") or {}, rep.get("bits_per_dim") or {}
        kid, pr = rep.get("kid") or {}, rep.get("precision_recall") or {}
        rows = []
        for k, v in fid.items():
            if v is None:
                continue
            rows.append(f"<tr><th>FID, {html_text(k)} split</th><td>{v:.3f}</td></tr>")
            sets = (rep.get("fid_seed_sets") or {}).get(k)
            if sets and sets.get("std") is not None:
                rows.append(f"<tr><th>FID, {html_text(k)} split, {sets['sets']} seed sets of {sets['n_each']:,}</th>"
                            f"<td>{sets['mean']:.3f} ± {sets['std']:.3f}</td></tr>")
            if kid.get(k):
                rows.append(f"<tr><th>KID, {html_text(k)} split</th><td>{kid[k]['kid_mean']:.5f} ± "
                            f"{kid[k]['kid_std']:.5f}</td></tr>")
            if pr.get(k):
                rows.append(f"<tr><th>precision / recall (k={pr[k]['k']}), {html_text(k)} split</th>"
                            f"<td>{pr[k]['precision']:.3f} / {pr[k]['recall']:.3f}</td></tr>")
        if iscore:
            rows.append(f"<tr><th>Inception Score</th><td>{iscore['is_mean']:.3f} ± {iscore['is_std']:.3f}</td></tr>")
        else:
            rows.append("<tr><th>Inception Score</th><td>n/a (weights without the classifier)</td></tr>")
        if bpd.get("total_bpd") is not None:
            rows.append(f"<tr><th>bits/dim (test)</th><td>{bpd['total_bpd']:.4f}</td></tr>")
        refs = "; ".join(f"{html_text(k)}: {html_text(v.get('source_description') or v.get('path') or '')}"
                         for k, v in (rep.get("references") or {}).items() if isinstance(v, dict))
        chain = (rep.get("sampler") or {}).get("description")
        parts.append(f"<h3>{html_text(path.parent.name)}</h3><p>{html_text(rep.get('n_samples'))} samples"
                     + (f" ({html_text(chain)})" if chain else "") + "; "
                     f"measured against "
                     f"{refs or 'the references recorded in eval.json'}</p><table>{''.join(rows)}</table>")
        parts += _memorization(path.parent, rep.get("memorization"))
        nll = path.parent / "nll"
        if (nll / "bpd.npz").is_file():
            bits = load_bpd(nll)
            rd = rate_distortion(bits)

            def terms(fig, bits=bits):
                ax = fig.add_subplot()
                vb = bits["vb"].mean(axis=0)
                ax.plot(range(1, len(vb) + 1), vb)
                ax.set(xlabel="t", ylabel="bits/dim", yscale="log", title="The bound's terms L_(t-1), by t")

            parts += [_figure(terms, "Bits/dim by timestep: the terms of the bound"),
                      _figure(lambda fig, rd=rd: draw_rate_distortion(fig, rd), "Rate-distortion (Fig. 5)",
                              size=(11.4, 3.2))]
    return parts


_PHEMA_WEIGHTS = re.compile(r"phema:(\d*\.?\d+)@(\d+)")


def _phema_curve(reports: list[tuple[Path, dict]]) -> list[str]:
    """FID against the relative width of the post-hoc EMA, one curve per step and sampler, with the
    paper's EMA and the trained weights of the same step and sampler as horizontal lines (EDM2 Fig. 5)."""
    curves: dict[tuple[int, str], dict] = {}
    for path, rep in reports:
        fid = (rep.get("fid") or {}).get("train")
        ckpt_name = Path(str(rep.get("checkpoint") or "")).stem
        tag = path.parent.name[len(ckpt_name):] if path.parent.name.startswith(ckpt_name) else None
        if not isinstance(fid, (int, float)) or tag is None:
            continue
        weights = str(rep.get("weights") or "")
        m = _PHEMA_WEIGHTS.fullmatch(weights)
        if m:
            curves.setdefault((int(m.group(2)), tag), {}).setdefault("points", []).append((float(m.group(1)), fid))
        elif (step := ckpt.checkpoint_step(ckpt_name + ".safetensors")) is not None:
            which = "trained weights" if tag.startswith("-model") else "EMA"
            curves.setdefault((step, tag[len("-model"):] if which != "EMA" else tag), {})[which] = fid
    out = []
    for (step, tag), c in sorted(curves.items()):
        if len(c.get("points", ())) < 2:
            continue

        def draw(fig, c=c, step=step, tag=tag):
            ax = fig.add_subplot()
            pts = sorted(c["points"])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label="post-hoc EMA")
            for (name, style) in (("EMA", "--"), ("trained weights", ":")):
                if name in c:
                    ax.axhline(c[name], linestyle=style, color="gray", label=f"{name} ({c[name]:.2f})")
            ax.set(xlabel="relative EMA width σ_rel", ylabel="FID (train split)",
                   title=plot_text(f"FID against the EMA width at step {step:,}{' (' + tag.strip('-') + ')' if tag else ''}"))
            ax.legend(fontsize=7)

        out.append(_figure(draw, f"Post-hoc EMA: FID against σ_rel at step {step:,}"))
    return out


def _memorization(folder: Path, mem: Optional[dict]) -> list[str]:
    """The memorization check of `ddpm eval`: the samples closest to a training image beside their
    nearest training images, and nearest-neighbour distances of samples against held-out images."""
    if not isinstance(mem, dict) or not mem.get("histogram"):
        return []
    out = ["<h4>Memorization check</h4>"]
    frac = mem.get("closer_than_heldout_p01")
    out.append(f"<p>Distances in {html_text(mem.get('features', 'feature space'))} from each of "
               f"{html_text(mem.get('n_samples'))} samples to its nearest of {html_text(mem.get('n_train_searched'))} "
               f"training images" + (f", and from each of {html_text(mem.get('n_heldout'))} held-out (test) images: "
               f"{100 * frac:.2f}% of samples are closer to a training image than 99% of held-out images are "
               f"(about 1% for a model that does not copy its training images)." if frac is not None else ".") + "</p>")
    picture = folder / str(mem.get("figure") or "")
    if mem.get("figure") and picture.is_file():
        out.append(_image(picture, "each row: one of the samples closest to a training image, then its nearest "
                                   "training images, nearest first"))
    hist = mem["histogram"]

    def draw(fig):
        ax = fig.add_subplot()
        edges = hist["edges"]
        width = [b - a for a, b in zip(edges[:-1], edges[1:])]
        total = max(sum(hist["samples"]), 1)
        ax.bar(edges[:-1], [c / total for c in hist["samples"]], width=width, align="edge", alpha=0.6, label="samples")
        if hist.get("heldout"):
            held = max(sum(hist["heldout"]), 1)
            ax.bar(edges[:-1], [c / held for c in hist["heldout"]], width=width, align="edge", alpha=0.6,
                   label="held-out images")
        ax.set(xlabel="distance to the nearest training image (Inception pool-3)", ylabel="fraction")
        ax.legend(fontsize=7)

    out.append(_figure(draw, "Nearest-training-image distances: samples against held-out images"))
    return out


def is_report(path: Path) -> bool:
    """Whether the file at `path` is a page that `write_report` wrote (it carries GENERATOR in its
    head; a page of a version before it begins with the head and title it wrote)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1024).decode("utf-8", "replace")
    except OSError:
        return False
    return head.startswith(_HEAD) and (GENERATOR in head or head.startswith(_HEAD + "<title>ddpm run "))


def write_report(run_dir, out: Optional[Path] = None) -> Path:
    """RUN_DIR/report.html (or `out`): the run's config, curves, pictures and evaluations in one page.
    An existing file there is replaced only if it is a report that ddpm wrote (`is_report`)."""
    run_dir = Path(run_dir)
    record = read_run_record(run_dir) if run_dir.is_dir() else None
    if record is None:
        raise UserError(f"{run_dir}: not a run directory (no config.json and no checkpoint); give the --out folder "
                        f"of a ddpm train")
    out = claim_file(out if out is not None else run_dir / REPORT_NAME, is_report, "a report")
    reports = [(path, read_eval_report(path)) for path in sorted(run_dir.glob("eval/*/eval.json"))]  # checked first
    recs = read_metrics(run_dir / METRICS_NAME)
    found = ckpt.list_checkpoints(run_dir)
    last = f"{found[-1][1].name} (step {found[-1][0]:,})" if found else "none yet"
    body = [f"<h1>ddpm run {html_text(run_dir)}</h1>",
            f"<p>Newest checkpoint: {html_text(last)}. Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} "
            f"by ddpm {__version__}.</p>"]
    pictures = [_image(run_dir / name, caption) for name, caption in
                (("samples.png", "samples: one row per class (make demo)"),
                 ("progressive.png", "x̂_0 predicted along sampling chains, t falling to the right (Fig. 6)"))
                if (run_dir / name).is_file()]
    grids = sorted((int(m.group(1)), p) for p in run_dir.glob("samples/step-*.png")  # the grids training wrote
                   if (m := re.fullmatch(r"step-(\d+)\.png", p.name)))
    pictures += [_image(p, f"EMA samples at step {step:,}") for step, p in grids[-6:]]
    if pictures:
        body += ["<h2>Samples</h2>", *pictures]
    edits = _edits(run_dir)
    if edits:
        body += ["<h2>Editing (ddpm inpaint, img2img, invert)</h2>", *edits]
    body += ["<h2>Training</h2>", *(_training_plots(recs) or ["<p>No metrics logged yet.</p>"])]
    evaluation = _phema_curve(reports) + _evaluation(reports)
    if evaluation:
        body += ["<h2>Evaluation (ddpm eval)</h2>", *evaluation]
    body += ["<h2>Configuration</h2>", f"<pre>{html.escape(json.dumps(record.config, indent=2))}</pre>"]
    page = (f"{_HEAD}{GENERATOR}<title>ddpm run {html_text(run_dir.name)}"
            f"</title><style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n")
    return write_text(out, page)
