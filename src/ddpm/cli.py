"""`ddpm` command line: a thin layer over the library.

Each subcommand parses its arguments, builds configs and calls one library function;
everything here can be done from a notebook with the same call. A user's mistake (`UserError`)
is printed as one line on stderr with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import sys

from .errors import UserError

_COMMANDS: dict[str, tuple] = {}


def command(name: str, help: str):
    """Register `fn(args)` as subcommand `name`; `fn.add_arguments(parser)` declares its flags."""

    def wrap(fn):
        _COMMANDS[name] = (help, fn)
        return fn

    return wrap


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ddpm", description="Denoising Diffusion Probabilistic Models (Ho et al. 2020)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, fn) in _COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        getattr(fn, "add_arguments", lambda _: None)(sp)
        sp.set_defaults(_fn=fn)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_fn", None):
        parser.print_help()
        return 2
    try:
        rc = args._fn(args)
    except UserError as e:
        print(f"ddpm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ddpm {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


# ---------------------------------------------------------------------------------------------
# Subcommands. Each is a few lines over one library function.
# ---------------------------------------------------------------------------------------------


@command("info", "print a model preset's resolved config, parameter count and forward GFLOPs per image")
def _info(args):
    from .config import apply_overrides, load_json
    from .network.unet import config_from_dict, get_preset, summary

    if (args.preset is None) == (args.config is None):
        raise UserError("give exactly one of --preset NAME or --config JSON")
    if args.preset is not None:
        cfg, source = get_preset(args.preset), f"preset {args.preset}"
    else:
        cfg, source = config_from_dict(load_json(args.config), args.config), args.config
    cfg = apply_overrides(cfg, args.set or [])
    s = summary(cfg)
    print(f"UNetConfig ({source}{', with --set' if args.set else ''}):")
    for k, v in s["config"].items():
        print(f"  {k}: {v}")
    print(f"parameters: {s['parameters']:,}")
    print(f"forward: {s['gflops']:.2f} GFLOPs per image at {cfg.resolution}x{cfg.resolution} (a multiply-add counts 2)")


_info.add_arguments = lambda p: (
    p.add_argument("--preset", help="a preset name: cifar10, celebahq256, lsun256, lsun256_large, tiny, demo (unet.PRESETS)"),
    p.add_argument("--config", metavar="JSON", help="a UNetConfig JSON (or a checkpoint config with a 'model' section)"),
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)"),
)


@command("convert", "convert U-Net weights between layouts: ddpm, diffusers, tf (official TF names), pt (torch.save, read only)")
def _convert(args):
    from .io.weights import convert_file

    for path in convert_file(args.src, args.dst, args.src_format, args.dst_format, config=args.config):
        print(f"wrote {path}")


_convert.add_arguments = lambda p: (
    p.add_argument("src", help="weights to read: a .safetensors file (a ddpm weights file or training checkpoint, "
                              "or plain), a diffusers directory, or a torch.save file for --from pt"),
    p.add_argument("dst", help="where to write: NAME.safetensors, or a directory for --to diffusers"),
    p.add_argument("--from", dest="src_format", required=True, metavar="FORMAT", help="ddpm, diffusers, tf or pt"),
    p.add_argument("--to", dest="dst_format", required=True, metavar="FORMAT", help="ddpm, diffusers or tf"),
    p.add_argument("--config", metavar="JSON", help="a UNetConfig JSON, for sources that carry no config "
                                                   "(plain tf safetensors, pt); otherwise it replaces the source's"),
)


def _train_args(p):
    p.add_argument("--preset", default=None, help="a training preset (default cifar10, or the run's own when resuming)")
    p.add_argument("--data", default=None, help="data source: a named source (fashion-mnist-10k, fashion-mnist[:DIR], cifar10[:PATH]) or a path")
    p.add_argument("--out", required=True, help="run directory; run the same command again to resume")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None, help="global batch size, split over processes")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument("--config", default=None, help="a JSON file with sections model/diffusion/data/train, merged over the preset")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override one field, e.g. train.lr=1e-4")
    p.add_argument("--no-progress", action="store_true")


def resolve_train_config(args):
    """The run's configuration from preset, config file, flags and --set, in that order."""
    from .config import load_json
    from .workflows.train import RunConfig

    base = RunConfig.from_preset(args.preset or "cifar10")
    d = base.to_dict()
    if args.config:
        for section, fields in load_json(args.config).items():
            if not isinstance(fields, dict):
                raise UserError(f"{args.config}: section {section!r} must be an object of fields")
            d.setdefault(section, {}).update(fields)
    run = RunConfig.from_dict(d, where=args.config or "config")
    if args.data:
        run = run.replace(data=run.data.replace(source=args.data))
    flags = {"steps": args.steps, "batch_size": args.batch, "seed": args.seed, "checkpoint_every": args.checkpoint_every}
    flags = {k: v for k, v in flags.items() if v is not None}
    if flags:
        run = run.replace(train=run.train.replace(**flags))
    return run.with_overrides(args.set)


@command("train", "train a DDPM (Algorithm 1, the paper's recipe); rerun the same command to resume")
def cmd_train(args):
    import json

    from .workflows.train import train

    run = resolve_train_config(args)
    print(json.dumps(run.to_dict(), indent=2))  # stdout: stderr is kept for progress and errors
    res = train(args.out, run, progress=not args.no_progress)
    print(f"trained {res['step']} steps; last logged loss {res['loss']:.5f}; run directory {res['run_dir']}", file=sys.stderr)


cmd_train.add_arguments = _train_args


def _demo_args(p):
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo preset's)")
    p.add_argument("--n", type=int, default=64, help="samples to draw at the end")
    p.add_argument("--no-progress", action="store_true")


@command("demo", "train the demo model on the embedded Fashion-MNIST subset, then sample it (make demo)")
def cmd_demo(args):
    from .workflows.demo import run_demo

    run_demo(args.out, steps=args.steps, n=args.n, progress=not args.no_progress)


cmd_demo.add_arguments = _demo_args


# ---- sampling and the paper's experiments: sample, nll, rate-distortion, progressive, interpolate, reconstruct


def _exp_model_args(p, seed=True):
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", metavar="RUN_DIR", help="a run directory (its newest valid checkpoint is used)")
    src.add_argument("--checkpoint", metavar="FILE", help="a checkpoint file (ckpt-*.safetensors)")
    p.add_argument("--weights", default="ema", choices=("ema", "model"), help="EMA weights (the paper's, default) or the trained ones")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    _fast_arg(p)
    p.add_argument("--out", required=True, metavar="DIR", help="where the results are written")
    if seed:
        p.add_argument("--seed", type=int, default=0, help="image i always comes from seed (SEED, i)")
    p.add_argument("--no-progress", action="store_true")


def _fast_arg(p):
    p.add_argument("--fast", default="auto", choices=("auto", "off"),
                   help="the device's fast paths for the network (ddpm.network.fast: CPU Winograd and channels_last; CUDA "
                        "channels_last, torch.compile and CUDA graphs), or off: fp32 eager (default auto)")


def _exp_sampler_args(p):
    p.add_argument("--sampler", default="ancestral", help="ancestral (Algorithm 2, default) or ddim")
    p.add_argument("--ddim-steps", type=int, default=50, metavar="K")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM's η: 0 deterministic, 1 ancestral-like")
    p.add_argument("--spacing", default="uniform", help="DDIM timestep spacing: uniform, trailing or quad")


def _exp_sampler_opts(args) -> dict:
    return dict(sampler=args.sampler, ddim_steps=args.ddim_steps, ddim_eta=args.eta, ddim_spacing=args.spacing)


def _exp_dist(args):
    """The process group (torchrun) or this process, on the asked device."""
    import torch

    from .io.distributed import init

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here; use --device cpu (or auto)")
    return init(args.device)


def _exp_load(args, device):
    """(run config, network, diffusion, image shape (C, H, W), a tag naming the weights)."""
    from pathlib import Path

    from .workflows.train import load_run

    run, model, diffusion, ckpt = load_run(args.run or args.checkpoint, args.weights, device, fast=args.fast)
    m = run.model
    return run, model, diffusion, (m.in_channels, m.resolution, m.resolution), f"{Path(ckpt).resolve()} [{args.weights}]"


def _exp_ints(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: give comma-separated integers, e.g. {flag} 1000,750,500,250") from None


def _exp_images(args, run):
    """The first --n images of --data/--split, at the model's resolution and channels."""
    from .io.data import DataConfig, load_images

    cfg = DataConfig(source=args.data, split=args.split, resolution=run.model.resolution,
                     channels={1: "gray", 3: "rgb"}[run.model.in_channels])
    images = load_images(cfg).images
    if args.n is not None:
        if args.n < 1:
            raise UserError(f"--n {args.n}: give at least 1 image")
        images = images[:args.n]
    return images


def _exp_nhwc(x):
    """[-1, 1] floats [..., C, H, W] -> uint8 numpy [..., H, W, C], as saved in the .npz files."""
    from .process.scaling import to_uint8

    return to_uint8(x).movedim(-3, -1).numpy()


def _exp_data_args(p):
    p.add_argument("--data", required=True, help="data source, as for train (e.g. cifar10:/path/cifar-10-python.tar.gz)")
    p.add_argument("--split", default="test", help="train or test (default test)")
    p.add_argument("--n", type=int, default=None, help="evaluate the first N images (default all)")
    p.add_argument("--batch", type=int, default=64, help="images per forward pass, per process")


@command("sample", "draw samples into a folder: 000000.png …, samples.npz, grid.png; run again to resume")
def cmd_sample(args):
    from .workflows.sample import sample_to_dir

    dist = _exp_dist(args)
    run, model, diffusion, shape, tag = _exp_load(args, dist.device)
    res = sample_to_dir(model, diffusion, args.out, args.n, args.batch, args.seed, shape, dist, progress=not args.no_progress,
                        model_tag=tag, **_exp_sampler_opts(args))
    if dist.is_main:
        print(f"sampled {res['generated']} images ({res['skipped']} already there) with {args.sampler}, seed {args.seed}: "
              f"{res['n']} PNGs in {res['out_dir']}, {res['npz']}, {res['grid']}")


def _sample_args(p):
    _exp_model_args(p)
    p.add_argument("--n", type=int, required=True, help="number of samples (indices 0 … N-1)")
    p.add_argument("--batch", type=int, default=64, help="images per forward pass, per process")
    _exp_sampler_args(p)


cmd_sample.add_arguments = _sample_args


@command("nll", "bits/dim of the true bound (eq. 5) on test images, with its parts L_T, Σ L_t, L_0; run again to resume")
def cmd_nll(args):
    from .workflows.experiments import evaluate_nll

    dist = _exp_dist(args)
    run, model, diffusion, shape, tag = _exp_load(args, dist.device)
    images = _exp_images(args, run)
    s = evaluate_nll(model, diffusion, images, args.batch, args.seed, args.out, dist, progress=not args.no_progress, model_tag=tag)
    if dist.is_main:
        print(f"NLL on {s['n']} images: {s['total_bpd']:.4f} ± {s['total_bpd_stderr']:.4f} bits/dim = prior L_T {s['prior_bpd']:.3e} "
              f"+ Σ L_t (t≥1) {s['diffusion_bpd']:.4f} + decoder L_0 {s['decoder_bpd']:.4f}")
        print(f"wrote summary.json, per_image.csv, per_t.csv, bpd.npz in {args.out}")


def _nll_args(p):
    _exp_model_args(p)
    _exp_data_args(p)


cmd_nll.add_arguments = _nll_args


@command("rate-distortion", "progressive lossy compression (Fig. 5): rate and distortion at every t, CSV and plot; "
                            "evaluates bits/dim into --out first (resumable), or reuses --from-nll DIR")
def cmd_rate_distortion(args):
    from .workflows.experiments import evaluate_nll, load_bpd, rate_distortion, write_rate_distortion

    dist = _exp_dist(args)
    if args.from_nll:
        bpd_dir = args.from_nll
    else:
        if not args.data:
            raise UserError("give --data SOURCE (the test images), or --from-nll DIR with the output of `ddpm nll`")
        run, model, diffusion, shape, tag = _exp_load(args, dist.device)
        evaluate_nll(model, diffusion, _exp_images(args, run), args.batch, args.seed, args.out, dist,
                     progress=not args.no_progress, model_tag=tag)
        bpd_dir = args.out
    if not dist.is_main:
        return
    rd = rate_distortion(load_bpd(bpd_dir))
    files = write_rate_distortion(rd, args.out)
    T = len(rd["t"])
    print(f"rate at t={T} (prior L_T): {rd['rate'][0]:.4g} bits/dim, distortion RMSE {rd['distortion_rmse'][0]:.3f}")
    print(f"rate at t=1 (total - L_0): {rd['rate'][-1]:.4f} bits/dim, distortion RMSE {rd['distortion_rmse'][-1]:.3f} "
          f"(L_0 {rd['decoder_bpd']:.4f} bits/dim; total {rd['total_bpd']:.4f})")
    print(f"wrote {files['csv']} and {files['png']}")


def _rd_args(p):
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", metavar="RUN_DIR")
    src.add_argument("--checkpoint", metavar="FILE")
    src.add_argument("--from-nll", metavar="DIR", help="reuse the bpd.npz that `ddpm nll --out DIR` wrote")
    p.add_argument("--weights", default="ema", choices=("ema", "model"))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    _fast_arg(p)
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--data", default=None, help="data source, as for train")
    p.add_argument("--split", default="test")
    p.add_argument("--n", type=int, default=None, help="evaluate the first N images (default all)")
    p.add_argument("--batch", type=int, default=64)


cmd_rate_distortion.add_arguments = _rd_args


@command("progressive", "x̂_0 along sampling chains (Fig. 6), or samples sharing one x_t with --share-t (Fig. 7)")
def cmd_progressive(args):
    from pathlib import Path

    import numpy as np
    import torch

    from .workflows.experiments import progressive_generation, shared_latent_samples
    from .io.atomic import write_npz
    from .io.images import make_grid, write_png
    from .process.scaling import to_uint8

    dist = _exp_dist(args)
    run, model, diffusion, shape, tag = _exp_load(args, dist.device)
    T = diffusion.num_timesteps
    out = Path(args.out)
    if args.share_t is not None:
        res = shared_latent_samples(model, diffusion, shape, _exp_ints(args.share_t, "--share-t"), args.k, args.seed,
                                    dist.device, progress=not args.no_progress)
        # rows: the shared t; columns: x_t, then the k samples continued from it
        cells = torch.cat([res["x_t"][:, None], res["samples"]], dim=1)
        grid = write_png(make_grid(to_uint8(cells.flatten(0, 1)), nrow=args.k + 1), out / "shared.png")
        write_npz(out / "shared.npz", share_t=np.array(res["share_t"]), x_t=_exp_nhwc(res["x_t"]), samples=_exp_nhwc(res["samples"]))
        print(f"{args.k} samples from each shared x_t, t = {', '.join(map(str, res['share_t']))} (rows; first column x_t): "
              f"wrote {grid} and {out / 'shared.npz'}")
        return
    times = _exp_ints(args.times, "--times") if args.times else sorted({int(round(v)) for v in np.linspace(T, 1, 10)}, reverse=True)
    res = progressive_generation(model, diffusion, shape, times, args.n_chains, args.seed, dist.device,
                                 progress=not args.no_progress, **_exp_sampler_opts(args))
    grid = write_png(make_grid(to_uint8(res["pred_x0"].flatten(0, 1)), nrow=len(times)), out / "progressive.png")
    write_npz(out / "progressive.npz", times=np.array(times), pred_x0=_exp_nhwc(res["pred_x0"]), samples=_exp_nhwc(res["samples"]))
    print(f"x̂_0 of {args.n_chains} chains (rows) predicted from x_t at t = {', '.join(map(str, times))} (columns): "
          f"wrote {grid} and {out / 'progressive.npz'}")


def _progressive_args(p):
    _exp_model_args(p)
    p.add_argument("--n-chains", type=int, default=8, metavar="K", help="chains (rows), samples 0 … K-1 of --seed")
    p.add_argument("--times", default=None, help="times t (1 … T) at which x̂_0 predicted from x_t is shown, e.g. 1000,900,…,1 "
                                                 "(default: 10 evenly spaced)")
    _exp_sampler_args(p)
    p.add_argument("--share-t", default=None, metavar="T_SHARE", help="instead: paper t (0 … T, comma-separated for "
                                                                        "several rows) of the shared x_t (Fig. 7)")
    p.add_argument("--k", type=int, default=8, help="with --share-t: samples continued from each shared x_t")


cmd_progressive.add_arguments = _progressive_args


@command("interpolate", "interpolate two images in x_t and decode (Fig. 8); several --t give the coarse-to-fine figure")
def cmd_interpolate(args):
    from pathlib import Path

    import numpy as np
    import torch

    from .process.scaling import to_model_range
    from .io.images import read_image as load_image
    from .workflows.experiments import interpolate
    from .io.atomic import write_npz
    from .io.images import make_grid, write_png
    from .process.scaling import to_uint8

    dist = _exp_dist(args)
    run, model, diffusion, shape, tag = _exp_load(args, dist.device)
    if args.steps < 2:
        raise UserError(f"--steps {args.steps}: give at least 2 values of λ (λ = 0 and 1)")
    a, b = (to_model_range(load_image(p, shape[0], shape[1])).to(dist.device) for p in (args.a, args.b))
    res = interpolate(model, diffusion, a, b, _exp_ints(args.t, "--t"), np.linspace(0, 1, args.steps), args.seed,
                      progress=not args.no_progress)
    imgs = res["images"]  # [rows t, columns λ, C, H, W]
    R = imgs.shape[0]
    # each row: source image, the decoded interpolations λ = 0 … 1, the other source (as Fig. 8)
    cells = torch.cat([a.cpu().expand(R, 1, *shape), imgs, b.cpu().expand(R, 1, *shape)], dim=1)
    out = Path(args.out)
    grid = write_png(make_grid(to_uint8(cells.flatten(0, 1)), nrow=args.steps + 2), out / "interpolation.png")
    write_npz(out / "interpolation.npz", t=np.array(res["t"]), lambdas=np.array(res["lambdas"]), images=_exp_nhwc(imgs))
    print(f"interpolated at t = {', '.join(map(str, res['t']))} (rows) over λ = 0 … 1 in {args.steps} steps "
          f"(columns, between the two inputs): wrote {grid} and {out / 'interpolation.npz'}")


def _interpolate_args(p):
    p.add_argument("a", metavar="A.png")
    p.add_argument("b", metavar="B.png")
    _exp_model_args(p)
    p.add_argument("--t", default="500", help="paper t, diffusion steps before mixing (0 … T); comma-separated for rows")
    p.add_argument("--steps", type=int, default=11, metavar="K", help="values of λ from 0 to 1 (default 11)")


cmd_interpolate.add_arguments = _interpolate_args


@command("reconstruct", "noise one image to x_t and bring it back, for several t")
def cmd_reconstruct(args):
    from pathlib import Path

    import numpy as np
    import torch

    from .process.scaling import to_model_range
    from .io.images import read_image as load_image
    from .workflows.experiments import reconstruct
    from .io.atomic import write_npz
    from .io.images import make_grid, write_png
    from .process.scaling import to_uint8

    dist = _exp_dist(args)
    run, model, diffusion, shape, tag = _exp_load(args, dist.device)
    x0 = to_model_range(load_image(args.image, shape[0], shape[1])).to(dist.device)
    res = reconstruct(model, diffusion, x0, _exp_ints(args.t, "--t"), args.seed, progress=not args.no_progress)
    out = Path(args.out)
    # top row: x_t; bottom row: the reconstruction from it; columns: t
    grid = write_png(make_grid(to_uint8(torch.cat([res["x_t"], res["x0"]])), nrow=len(res["t"])), out / "reconstruct.png")
    write_npz(out / "reconstruct.npz", t=np.array(res["t"]), x_t=_exp_nhwc(res["x_t"]), x0=_exp_nhwc(res["x0"]))
    print(f"reconstructed from t = {', '.join(map(str, res['t']))} (columns; top x_t, bottom reconstruction): "
          f"wrote {grid} and {out / 'reconstruct.npz'}")


def _reconstruct_args(p):
    p.add_argument("image", metavar="IMG")
    _exp_model_args(p)
    p.add_argument("--t", default="0,250,500,750,1000", help="paper t (0 … T), comma-separated")


cmd_reconstruct.add_arguments = _reconstruct_args


# ---------------------------------------------------------------------------------------------
# FID and Inception Score (docs/FID.md): fid-ref, fid, eval
# ---------------------------------------------------------------------------------------------


def _fid_inception_args(p):
    p.add_argument("--inception-weights", metavar="PATH", default=None,
                   help="pt_inception-2015-12-05-6726825d.pth (default: $DDPM_INCEPTION_WEIGHTS, then "
                        "~/.cache/ddpm/pt_inception-2015-12-05-6726825d.pth); never downloaded")
    p.add_argument("--inception-sha256", metavar="HEX", default="6726825d",
                   help="the weights file's sha256 must start with HEX (default: the official file's 6726825d); "
                        "give your own file's hash for other weights, or 'none' to skip the check (recorded)")
    p.add_argument("--inception-batch", type=int, default=100, metavar="B", help="images per Inception forward, per process")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--no-progress", action="store_true")


def _fid_inception(args, dist):
    from .network.inception import load_inception

    sha = None if str(args.inception_sha256).lower() == "none" else args.inception_sha256
    return load_inception(args.inception_weights, expected_sha256=sha, device=dist.device)


def _fid_dist(args):
    import torch

    from .io.distributed import init

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here; use --device cpu (or auto)")
    return init(args.device)


@command("fid-ref", "reference statistics for FID (μ, Σ of Inception pool-3 features) of a data set, with provenance")
def cmd_fid_ref(args):
    from .io.data import DataConfig
    from .workflows.evaluate import reference_stats
    from .workflows.fid import save_stats

    dist = _fid_dist(args)
    data = DataConfig(source=args.data, split=args.split, resolution=args.resolution, channels=args.channels)
    inc = _fid_inception(args, dist)
    stats = reference_stats(data, inc, batch=args.inception_batch, dist=dist, progress=not args.no_progress)
    if dist.is_main:
        save_stats(args.out, stats)
        p = stats.provenance
        print(f"wrote {args.out}: {p['n_images']} images of {p['source_description']} (sha256 {p['data_sha256'][:12]}…), "
              f"Inception weights sha256 {p['inception']['weights_sha256'][:12]}…; the data's own IS {p['is_mean']:.3f} "
              f"± {p['is_std']:.3f}")


def _fid_ref_args(p):
    p.add_argument("--data", required=True, help="data source, as for train (e.g. cifar10:/path/cifar-10-python.tar.gz)")
    p.add_argument("--split", default="train", choices=("train", "test"), help="default train (the paper's FID reference)")
    p.add_argument("--out", required=True, metavar="STATS.npz")
    p.add_argument("--resolution", type=int, default=None, help="resize as for training (default: the data's own size)")
    p.add_argument("--channels", default="auto", choices=("auto", "rgb", "gray"))
    _fid_inception_args(p)


cmd_fid_ref.add_arguments = _fid_ref_args


@command("fid", "FID of samples (a folder of PNGs or an .npz of uint8) against reference statistics, and their IS")
def cmd_fid(args):
    import json

    from .workflows.evaluate import fid_report

    dist = _fid_dist(args)
    inc = _fid_inception(args, dist)
    rep = fid_report(args.samples, args.ref, inc, batch=args.inception_batch, dist=dist, progress=not args.no_progress)
    if dist.is_main:
        if args.out:
            from .io.atomic import write_json

            write_json(args.out, rep)
        for ref, v in rep["fid"].items():
            print(f"FID {v:.4f}  ({rep['samples']['n_images']} samples against {ref})")
        print(f"IS  {rep['is_mean']:.4f} ± {rep['is_std']:.4f} ({rep['is_splits']} splits; {rep['is_1split']:.4f} over all)")
        for note in rep["notes"]:
            print(f"note: {note}", file=sys.stderr)
        if args.out:
            print(f"wrote {args.out}")
        elif args.json:
            print(json.dumps(rep, indent=2))


def _fid_args(p):
    p.add_argument("--samples", required=True, metavar="DIR|NPZ", help="a folder of image files or an .npz of uint8 images")
    p.add_argument("--ref", required=True, action="append", metavar="STATS.npz", help="reference statistics (repeatable)")
    p.add_argument("--out", default=None, metavar="REPORT.json", help="write the full report here")
    p.add_argument("--json", action="store_true", help="print the full report")
    _fid_inception_args(p)


cmd_fid.add_arguments = _fid_args


@command("eval", "the paper's evaluation of a run: EMA samples, FID (train and test), IS and bits/dim into one JSON")
def cmd_eval(args):
    from .workflows.evaluate import evaluate_run

    dist = _fid_dist(args)
    sha = None if str(args.inception_sha256).lower() == "none" else args.inception_sha256
    rep = evaluate_run(args.run, args.n, out_dir=args.out, batch=args.batch, seed=args.seed, ref_train=args.ref_train,
                       ref_test=args.ref_test, bpd_n=args.bpd_n, bpd_batch=args.bpd_batch,
                       inception_batch=args.inception_batch, weights=args.inception_weights, expected_sha256=sha,
                       dist=dist, progress=not args.no_progress, fast=args.fast)
    if dist.is_main:
        fid = rep["fid"]
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"
        bpd = rep["bits_per_dim"]
        print(f"FID train {fmt(fid.get('train'))}, test {fmt(fid.get('test'))}; IS {rep['inception_score']['is_mean']:.4f} "
              f"± {rep['inception_score']['is_std']:.4f}; bits/dim {fmt(bpd['total_bpd'] if bpd else None)} "
              f"({rep['n_samples']} samples, {rep['checkpoint']})")
        for note in rep["notes"]:
            print(f"note: {note}", file=sys.stderr)


def _eval_args(p):
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="a run directory (its newest checkpoint) or a checkpoint file")
    p.add_argument("--n", type=int, default=50_000, help="samples (default 50,000, the paper's protocol)")
    p.add_argument("--batch", type=int, default=256, help="samples per forward pass, per process")
    p.add_argument("--seed", type=int, default=0, help="sample i always comes from seed (SEED, i)")
    p.add_argument("--out", default=None, metavar="DIR", help="default RUN_DIR/eval/<checkpoint name>")
    p.add_argument("--ref-train", default=None, metavar="STATS.npz", help="default: computed from the run's data, cached in RUN_DIR/eval")
    p.add_argument("--ref-test", default=None, metavar="STATS.npz", help="default: computed from the run's data, cached in RUN_DIR/eval")
    p.add_argument("--bpd-n", type=int, default=None, help="bits/dim of the first N test images (default all; 0 skips)")
    p.add_argument("--bpd-batch", type=int, default=64)
    _fast_arg(p)
    _fid_inception_args(p)


cmd_eval.add_arguments = _eval_args
