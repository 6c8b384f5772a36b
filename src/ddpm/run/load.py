"""A trained model back from disk: `load_run(RUN_DIR or CHECKPOINT)`, or a `ModelSpec` opened.

    loaded = load_run("runs/cifar10", weights="ema", device="cuda", fast="auto", precision="fp32")
    loaded.model(x_t, t)      # also: loaded.run, loaded.diffusion, loaded.checkpoint, loaded.tag
    loaded, dist, tag = ModelSpec("runs/cifar10").open()   # on this process's device of torchrun's group

Every command that uses a trained model (sample, nll, the experiments, eval) starts here, from a
`ModelSpec`: which run, which weights, the device, the fast paths and the precision, each default
written once, in the spec.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional, Union

import torch

from ..config import Choice, Config, get_field, load_json
from ..errors import UserError
from ..files import open_regular
from ..io import checkpoint as ckpt
from ..io.distributed import Device, DistInfo
from ..io.weights import ddpm_format, read_unet
from ..io.distributed import init as dist_init
from ..network.fast import Precision, prepare_model, resolve_precision
from ..network.interop import diffusion_from_diffusers_scheduler
from ..network.unet import UNet
from ..process.diffusion import GaussianDiffusion
from ..process.ema import SIGMA_REL_DECIMALS
from .config import RunConfig
from .phema import parse_phema, reconstruct


class Weights(Choice):
    EMA = "ema"  # the exponential moving average: what the paper evaluates
    MODEL = "model"  # the trained weights themselves
    # and "phema:WIDTH[@STEP]": the post-hoc EMA of that relative width (run/phema.py)


def check_weights(value) -> str:
    """Which weights of a run: "ema", "model" or "phema:WIDTH[@STEP]", or one line listing them."""
    if isinstance(value, Weights):
        return value.value
    if isinstance(value, str) and value.startswith("phema:"):
        parse_phema(value)
        return value
    if value not in tuple(w.value for w in Weights):
        raise UserError(f"--weights {value!r} is not valid; choose 'ema' (the paper's EMA), 'model' (the trained "
                        f"weights) or 'phema:WIDTH' (a post-hoc EMA, e.g. phema:0.05; `ddpm phema`)")
    return value


def describe_weights(weights: str) -> str:
    """The weights in words, for logs and model cards."""
    if weights.startswith("phema:"):
        return f"post-hoc EMA ({weights})"
    return "EMA" if weights == "ema" else "trained (not EMA)"


class Fast(Choice):
    AUTO = "auto"  # the device's fast paths (network/fast.py prepare_model)
    OFF = "off"  # the plain eager network (at the precision asked for, fp32 by default)


@dataclass(frozen=True)
class ModelSpec(Config):
    """Which trained model a command runs, and how (the options `ddpm sample`, `nll`, the experiments
    and `eval` share); checked when built.

    :param run: a run directory (its newest valid checkpoint), a checkpoint file, or a diffusers
        pipeline folder.
    :param weights: "ema" (what the paper evaluates), "model" (the trained weights) or
        "phema:WIDTH[@STEP]" (a post-hoc EMA of the run's snapshots: run/phema.py).
    :param device: "auto" (CUDA when there is one), "cpu" or "cuda"; under torchrun, this process's.
    :param fast: "auto": the device's fast paths (network/fast.py `prepare_model`); "off": the plain network.
    :param precision: "fp32" (the paper's), "bf16" or "auto" (bf16 where the device computes it
        natively); recorded with the model in every results folder (`LoadedRun.tag`).
    """

    run: Union[str, os.PathLike]
    weights: str = "ema"  # or "model", or "phema:WIDTH[@STEP]" (check_weights)
    device: Device = Device.AUTO
    fast: Fast = Fast.AUTO
    precision: Precision = Precision.FP32

    def validate(self):
        object.__setattr__(self, "weights", check_weights(self.weights))

    def open(self) -> "OpenedRun":
        """The model loaded on this process's device of the process group (`open_run`)."""
        return open_run(self.run, self.weights, self.device.value, self.fast.value, self.precision.value)


class LoadedRun(NamedTuple):
    """What `load_run` returns."""

    run: RunConfig
    model: torch.nn.Module  # in eval mode, on the device asked for, without gradients
    diffusion: GaussianDiffusion
    checkpoint: Path
    sha256: str  # the checkpoint's content hash: names the model wherever the file lives
    weights: str  # "ema", "model", or "phema:WIDTH@STEP" (the post-hoc EMA's file is `checkpoint`)
    classes: Optional[dict] = None  # a conditional run's data classes: {"names": [...], "counts": [...]}
    precision: Precision = ModelSpec.precision  # what the network computes in (resolved: never "auto")

    @property
    def tag(self) -> str:
        """Which model made a result: the checkpoint's content, which of its weights, and the
        precision where it is not fp32 (bf16 computes another function, within a few per cent).
        Results folders record it and refuse a rerun with another model (io/results.py)."""
        extra = "" if self.precision is Precision.FP32 else f", {self.precision.value}"
        return f"sha256:{self.sha256} [{self.weights}{extra}]"

    @property
    def class_info(self) -> tuple[tuple[str, ...], Optional[list[int]]]:
        """(class names, images per class) of the data a conditional model was trained on; names
        are the indices as text, and counts None, where the checkpoint does not say."""
        K = self.run.model.num_classes
        c = self.classes if isinstance(self.classes, dict) else {}
        names, counts = c.get("names"), c.get("counts")
        names = tuple(str(v) for v in names) if isinstance(names, list) and len(names) == K else tuple(map(str, range(K)))
        ok = isinstance(counts, list) and len(counts) == K and all(isinstance(v, int) and v >= 0 for v in counts)
        return names, (counts if ok and sum(counts) > 0 else None)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        m = self.run.model
        return (m.in_channels, *m.size)


PIPELINE_CONFIG = "ddpm_config.json"  # beside model_index.json in a pipeline folder that `ddpm export` wrote


def load_run(path, weights: str = ModelSpec.weights, device="cpu", fast: str = "off",
             precision: str = ModelSpec.precision) -> LoadedRun:
    """A trained network from a run directory (its newest valid checkpoint), a checkpoint file, or
    a diffusers pipeline folder (`ddpm export`'s, or any DDPM-layout UNet2DModel with a linear
    DDPMScheduler).

    :param weights: "ema" (what the paper evaluates), "model" (the trained weights) or
        "phema:WIDTH[@STEP]": the post-hoc EMA of that relative width as of the snapshot of STEP
        (default the newest), made from the run's snapshots and kept beside them (run/phema.py).
    :param device, fast: a notebook's: the CPU, and the plain network ("auto": the network wrapped by
        `network.fast.prepare_model` with the device's fast paths, for sampling and bits/dim); the
        commands' are `ModelSpec`'s.
    :param precision: "fp32", "bf16" (autocast of the network; the diffusion math stays in float32)
        or "auto" (bf16 where `device` computes it natively: network/fast.py).
    """
    weights = check_weights(weights)
    fast = Fast.parse(fast, "fast")
    precision = resolve_precision(precision, device)
    path = Path(path)
    if (path / "model_index.json").is_file():
        return _load_pipeline(path, weights, device, fast, precision)
    if weights.startswith("phema:"):
        return _load_phema(path, weights, device, fast, precision)
    if path.is_dir():
        found = ckpt.latest_checkpoint(path)
        if found is None:
            raise UserError(f"{path}: no checkpoint in this run directory; train first (ddpm train --out {path})")
        file, state = found
    elif path.exists():
        file, state = path, ckpt.load_checkpoint(path)
    else:
        raise UserError(f"{path}: no such run directory or checkpoint file")
    run = RunConfig.from_dict(state.get("config", {}), where=str(file))
    net = UNet.from_config(run.model)
    problem = state_dict_problem(state.get(weights), net.state_dict())
    if problem:
        raise UserError(f"{file}: its {weights} weights do not fit the network its config describes ({problem}); "
                        f"the file is damaged or was not written by ddpm train")
    net.load_state_dict(state[weights])
    return LoadedRun(run, _ready(net, device, fast, precision), GaussianDiffusion.from_config(run.diffusion), file,
                     ckpt.checkpoint_sha256(file), weights, state.get("classes"), precision)


def _ready(net: torch.nn.Module, device, fast: Fast, precision: Precision) -> torch.nn.Module:
    """The network on `device` for evaluation: with the device's fast paths, or plain (under
    autocast where the precision is not fp32)."""
    net = net.to(device).eval().requires_grad_(False)
    if fast is Fast.AUTO:
        return prepare_model(net, device, precision)
    if precision is not Precision.FP32:
        return prepare_model(net, device, precision, compile="off", channels_last="off", cuda_graphs="off", winograd="off")
    return net


def _load_phema(path: Path, weights: str, device, fast: Fast, precision: Precision) -> LoadedRun:
    """The post-hoc EMA `weights` ("phema:WIDTH[@STEP]") of the run directory `path`, made from its
    snapshots once (`reconstruct`) and read from the weights file that keeps it."""
    if not path.is_dir():
        raise UserError(f"--weights {weights}: {path} is not a run directory; post-hoc EMA weights are made from the "
                        f"snapshots in RUN/phema/, so give the run directory")
    sigma_rel, at = parse_phema(weights)
    made = reconstruct(path, [sigma_rel], at)[0]
    sd, config = ckpt.load_weights(made.path)
    run = RunConfig.from_dict({k: v for k, v in config.items() if k not in ("phema", "classes")}, where=str(made.path))
    net = UNet.from_config(run.model)
    problem = state_dict_problem(sd, net.state_dict())
    if problem:
        raise UserError(f"{made.path}: its weights do not fit the network its config describes ({problem}); the file "
                        f"is damaged; delete it and it is made again from the snapshots")
    net.load_state_dict(sd)
    return LoadedRun(run, _ready(net, device, fast, precision), GaussianDiffusion.from_config(run.diffusion), made.path,
                     ckpt.checkpoint_sha256(made.path), f"phema:{made.sigma_rel:.{SIGMA_REL_DECIMALS}f}@{made.step}",
                     config.get("classes"), precision)


def _load_pipeline(path: Path, weights: str, device, fast: Fast, precision: Precision) -> LoadedRun:
    """A diffusers pipeline folder: its U-Net, and the run config `ddpm export` recorded beside it
    (or, for another pipeline, the process its DDPMScheduler config describes)."""
    file = path / "unet" / DIFFUSERS_WEIGHTS
    if not file.is_file():
        raise UserError(f"{path}: a diffusers pipeline without {file.relative_to(path)}; give a DDPMPipeline folder")
    net = read_unet(path / "unet", "diffusers")
    record = load_json(path / PIPELINE_CONFIG, expect=dict) if (path / PIPELINE_CONFIG).is_file() else None
    if record is not None:
        where = path / PIPELINE_CONFIG
        for key, kind in (("weights", str), ("config", dict), ("classes", (list, type(None)))):
            get_field(record, key, kind, where, default=None, advice="export the run again")
        if weights != record.get("weights", "ema"):
            raise UserError(f"{path}: this pipeline holds the {record.get('weights')} weights of its run only; use "
                            f"--weights {record.get('weights')}, or export the run again with --weights {weights}")
        run = RunConfig.from_dict(record.get("config", {}), where=str(path / PIPELINE_CONFIG))
        run = run.replace(model=net.config)  # the weights' own config decides the network
    else:
        sched = path / "scheduler" / "scheduler_config.json"
        if not sched.is_file():
            raise UserError(f"{path}: no scheduler/scheduler_config.json; give a DDPMPipeline folder")
        run = RunConfig.from_dict({}).replace(model=net.config,
                                              diffusion=diffusion_from_diffusers_scheduler(load_json(sched, expect=dict),
                                                                                                 str(sched)))
    return LoadedRun(run, _ready(net, device, fast, precision), GaussianDiffusion.from_config(run.diffusion), file,
                     _file_sha256(file), weights, record.get("classes") if record else None, precision)


class OpenedRun(NamedTuple):
    """A trained model ready for a command: loaded on the process group's device."""

    loaded: LoadedRun
    dist: DistInfo
    tag: str  # names the model in the settings record of a results folder (LoadedRun.tag)


def open_run(path, weights: str, device: str, fast: str, precision: str) -> OpenedRun:
    """`load_run` on this process's device of the process group (torchrun's, or this process), as
    every command on a trained model starts (`ModelSpec.open`)."""
    dist = dist_init(device)
    loaded = load_run(path, weights, dist.device, fast, precision)
    return OpenedRun(loaded, dist, loaded.tag)


def state_dict_problem(given, expected) -> str:
    """What keeps the state dict `given` from loading into a module whose state dict is
    `expected`: missing or unexpected keys, another shape or dtype; "" when it fits."""
    if not isinstance(given, dict):
        return f"expected a state dict, found {type(given).__name__}"
    missing = [k for k in expected if k not in given]
    if missing:
        return f"{len(missing)} missing, e.g. {missing[0]}"
    extra = [k for k in given if k not in expected]
    if extra:
        return f"{len(extra)} unexpected, e.g. {extra[0]}"
    for k, ref in expected.items():
        v = given[k]
        if not isinstance(v, torch.Tensor) or v.shape != ref.shape or v.dtype != ref.dtype:
            what = f"{list(v.shape)} {v.dtype}" if isinstance(v, torch.Tensor) else type(v).__name__
            return f"{k} is {what}, the network needs {list(ref.shape)} {ref.dtype}"
    return ""


DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


class InitialWeights(NamedTuple):
    """Weights to start a new run from (`ddpm train --init-from`): the model's and the EMA's."""

    model: dict
    ema: dict
    source: dict  # what they came from, for the run's history: path, file, sha256, kind


def initial_weights(path) -> InitialWeights:
    """The weights of a run directory (its newest valid checkpoint: model and EMA), a checkpoint
    or ddpm weights file, or a diffusers UNet2DModel folder (or a pipeline folder holding one in
    unet/): the latter two give the same weights to the model and the EMA."""
    p = Path(path)
    if (p / "unet" / DIFFUSERS_WEIGHTS).is_file():  # a diffusers pipeline: its U-Net
        p = p / "unet"
    if p.is_dir() and (p / DIFFUSERS_WEIGHTS).is_file():
        sd = read_unet(p, "diffusers").state_dict()
        return InitialWeights(sd, sd, dict(path=str(path), file=str(p / DIFFUSERS_WEIGHTS), kind="diffusers",
                                           sha256=_file_sha256(p / DIFFUSERS_WEIGHTS)))
    if p.is_dir():
        found = ckpt.latest_checkpoint(p)
        if found is None:
            raise UserError(f"--init-from {p}: no checkpoint and no diffusers weights ({DIFFUSERS_WEIGHTS}) in this "
                            f"folder; give a run directory, a checkpoint, or a diffusers model folder")
        file, state = found
    elif p.is_file():
        if ddpm_format(p) != ckpt.CHECKPOINT_FORMAT:  # a weights file (ddpm's, or plain with a config beside it)
            sd = read_unet(p, "ddpm").state_dict()
            return InitialWeights(sd, sd, dict(path=str(path), file=str(p), kind="weights", sha256=_file_sha256(p)))
        file, state = p, ckpt.load_checkpoint(p)
    else:
        raise UserError(f"--init-from {p}: no such run directory, checkpoint or diffusers model folder")
    where, advice = f"--init-from {file}", "give a checkpoint that ddpm train wrote, or its run directory"
    model = get_field(state, "model", dict, where, need="a state dict", advice=advice)
    ema = get_field(state, "ema", dict, where, need="a state dict", advice=advice)
    return InitialWeights(model, ema, dict(path=str(path), file=str(file), kind="checkpoint",
                                                             sha256=ckpt.checkpoint_sha256(file)))


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open_regular(path) as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()
