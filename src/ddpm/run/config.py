"""What a run is: the model, the process, the data and the recipe, and how a command line gets there.

    run = RunConfig.from_preset("cifar10", data="cifar10:/data/cifar-10-python.tar.gz")
    run = resolve_run_config(preset="demo", sets=["train.lr=5e-4"])   # what `ddpm train` does

`RunConfig` is saved as `config.json` in the run directory and inside every checkpoint, so a
checkpoint alone rebuilds its model. `resolve_run_config` is the one place the layers of a
command line meet: preset, then config file, then flags, then `--set` overrides, each over the
last; every value is checked when the result is built.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

from ..config import MAX_BATCH, Config, apply_overrides, check_count, load_json
from ..errors import UserError
from ..io.data import DataConfig
from ..io.distributed import Device
from ..network.fast import Precision, Switch
from ..io.inception_weights import OFFICIAL
from ..network.unet import UNetConfig
from ..process.diffusion import DiffusionConfig
from ..process.ema import check_sigma_rel
from ..process.grids import Spacing
from ..process.sampling import Sampler, SamplerSpec
from ..process.weighting import LossWeighting, TimeSampling
from .presets import PRESETS, RENAMED


LOGGERS = ("jsonl", "tensorboard", "wandb")


@dataclass(frozen=True)
class TrainConfig(Config):
    """The optimisation recipe. Defaults are the paper's CIFAR-10 values (Appendix B)."""

    SECTION = "train"

    steps: int = 800_000
    batch_size: int = 128  # the global batch, split over processes
    lr: float = 2e-4
    warmup: int = 5000  # linear learning-rate warm-up, in steps
    grad_clip: float = 1.0  # global-norm clipping
    # "batch": clip the gradient of the global batch (default); "replica:N": clip the gradient of
    # each share of N images, then average, as the official TPU code did (docs/MATH.md § Training recipe)
    clip_granularity: str = "batch"
    ema_decay: float = 0.9999
    ema_warmup: bool = False  # decay min(ema_decay, (1 + s) / (10 + s)) at step s, as many codebases do (off: the paper's)
    # Post-hoc EMA (docs/MATH.md § Averaging the weights): power-function EMAs of these relative
    # widths tracked beside the paper's EMA, written to RUN/phema/ every phema_every steps (0: off)
    # and at the last step; `ddpm phema` makes any other width from them after training.
    phema_every: int = 0
    phema_sigma_rels: tuple[float, ...] = (0.05, 0.10)
    # A class-conditional model (model.num_classes > 0) sees "no class" instead of the label at this
    # rate, so it also learns p(x) for classifier-free guidance (docs/MATH.md § Classes and guidance)
    label_dropout: float = 0.1
    adam_eps: float = 1e-8
    # The weight of L_simple at t (docs/MATH.md § Weighting the times): "none" (the paper),
    # "min_snr:γ" (Hang et al. 2023) or "soft_min_snr:γ" (Crowson et al. 2024), e.g. min_snr:5
    loss_weight: str = "none"
    # How t is drawn: "uniform" (Algorithm 1) or "importance" (Nichol & Dhariwal 2021's resampler)
    t_sampling: TimeSampling = TimeSampling.UNIFORM
    seed: int = 0
    checkpoint_every: int = 5000
    keep_last: int = 3
    milestone_every: int = 100_000  # checkpoints kept forever
    log_every: int = 100  # losses are read from the device (a host sync) only this often
    sample_every: int = 0  # EMA sample grid every N steps (0: never during training)
    sample_n: int = 64
    # "bf16": autocast the network in bfloat16; "fp16": in float16, loss-scaled; "auto": bf16 where the
    # device computes it natively (a CPU with AVX512-BF16 or AMX, a GPU with bf16 tensor cores), else fp32
    precision: Precision = Precision.FP32
    # Memory (docs/MATH.md § Fitting in memory): they change what a step holds, not what it computes.
    microbatch: int = 0  # images per forward/backward, gradients accumulated over the batch (0: all at once)
    checkpointing: bool = False  # recompute each block's activations in the backward pass (network/memory.py)
    # Fine-tuning: a new run starts from these weights (a run directory, a checkpoint, a diffusers
    # folder) with a fresh optimizer at step 0; "" starts from the paper's initialisation.
    init_from: str = ""
    device: Device = Device.AUTO
    # Fast paths (network/fast.py): "auto" is each device's default, or "on"/"off".
    channels_last: Switch = Switch.AUTO  # NHWC weights and activations (auto: on for CUDA; CPU: on from width ch=128)
    compile: Switch = Switch.AUTO  # torch.compile the network (auto: on for CUDA, off for CPU)
    winograd: Switch = Switch.AUTO  # CPU: 3x3 convolutions by Winograd F(4x4, 3x3) (auto: on for CPU; CUDA: n/a)
    tensorboard: bool = False  # the same as adding "tensorboard" to `logger`
    # Where metrics and sample grids go besides metrics.jsonl (always written): "tensorboard" and/or
    # "wandb" (Weights & Biases, `pip install wandb`; WANDB_MODE=offline works), comma-separated.
    logger: str = "jsonl"
    # FID of the EMA weights during training (docs/FID.md): fid_n samples every fid_every steps,
    # against reference statistics fid_ref (or ones computed from the training data and cached).
    fid_every: int = 0
    fid_n: int = 10_000
    fid_ref: str = ""
    fid_weights: str = ""  # Inception weights file ("" = $DDPM_INCEPTION_WEIGHTS or the cache path)
    fid_weights_sha256: str = OFFICIAL  # or a hex prefix of your own weights' sha256
    # The sampler of those FID samples (process/sampling.py): Algorithm 2 by default, or a few-step
    # one, e.g. fid_sampler=dpm++2m, fid_steps=20 (network evaluations), fid_spacing=logsnr.
    fid_sampler: str = SamplerSpec.sampler.value
    fid_steps: int = SamplerSpec.steps
    fid_spacing: str = SamplerSpec.spacing

    def validate(self):
        for name in ("steps", "batch_size", "checkpoint_every", "keep_last", "log_every", "sample_n", "fid_n"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UserError(f"train.{name}={v!r} must be a positive integer")
        for name in ("batch_size", "sample_n", "microbatch"):  # each sizes an allocation
            check_count(getattr(self, name), f"train.{name}", MAX_BATCH, least=0)
        for name in ("warmup", "sample_every", "milestone_every", "seed", "fid_every", "microbatch", "phema_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise UserError(f"train.{name}={v!r} must be an integer >= 0")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"train.lr={self.lr!r} must be a positive number (the paper uses 2e-4 for CIFAR-10)")
        if not (isinstance(self.adam_eps, (int, float)) and self.adam_eps > 0 and math.isfinite(self.adam_eps)):
            raise UserError(f"train.adam_eps={self.adam_eps!r} must be a positive number (Adam's default, 1e-8)")
        if not isinstance(self.checkpointing, bool):
            raise UserError(f"train.checkpointing={self.checkpointing!r} is not valid; give true or false")
        self.clip_share  # parses clip_granularity, or one line
        self.loss_weighting  # parses loss_weight, or one line
        if self.clip_share and self.batch_size % self.clip_share:
            raise UserError(f"train.clip_granularity={self.clip_granularity}: the batch of {self.batch_size} does not "
                            f"split into shares of {self.clip_share}; give a divisor of train.batch_size")
        if self.clip_share and self.microbatch not in (0, self.clip_share):
            raise UserError(f"train.microbatch={self.microbatch} with train.clip_granularity={self.clip_granularity}: "
                            f"each share is one micro-batch; set train.microbatch=0 (or {self.clip_share})")
        if self.clip_share and self.precision == "fp16":
            raise UserError(f"train.clip_granularity={self.clip_granularity} is not available with "
                            f"train.precision=fp16; use bf16 or fp32, or clip_granularity=batch")
        if not self.grad_clip > 0:
            raise UserError(f"train.grad_clip={self.grad_clip!r} must be positive (the paper clips at 1.0)")
        if isinstance(self.label_dropout, bool) or not isinstance(self.label_dropout, (int, float)) \
                or not 0.0 <= self.label_dropout < 1.0:
            raise UserError(f"train.label_dropout={self.label_dropout!r} must be in [0, 1) (0.1, the usual rate: one "
                            f"label in ten replaced by 'no class'; 0: no unconditional model, so no guidance)")
        self.loggers  # parses `logger`, or one line
        if not 0.0 <= self.ema_decay < 1.0:
            raise UserError(f"train.ema_decay={self.ema_decay!r} must be in [0, 1) (the paper uses 0.9999)")
        if not isinstance(self.ema_warmup, bool):
            raise UserError(f"train.ema_warmup={self.ema_warmup!r} is not valid; give true or false")
        widths = [check_sigma_rel(s, "train.phema_sigma_rels") for s in self.phema_sigma_rels]
        if not widths or len(set(widths)) != len(widths):
            raise UserError(f"train.phema_sigma_rels={list(self.phema_sigma_rels)!r}: give one or more different "
                            f"relative widths, e.g. 0.05,0.10 (EDM2's)")
        self.fid_sampler_spec  # parses the FID sampler, or one line


    @property
    def fid_sampler_spec(self) -> SamplerSpec:
        """The sampler of the FID samples, from fid_sampler, fid_steps and fid_spacing."""
        try:
            spec = SamplerSpec(self.fid_sampler, steps=self.fid_steps, spacing=self.fid_spacing)
            Spacing.parse(self.fid_spacing, "spacing")
        except UserError as e:
            raise UserError(f"train.fid_sampler/fid_steps/fid_spacing: {e}") from None
        if spec.sampler is Sampler.ANCESTRAL and (spec.steps, spec.spacing) != (SamplerSpec.steps, SamplerSpec.spacing):
            raise UserError(f"train.fid_steps={self.fid_steps}, fid_spacing={self.fid_spacing!r}: for a few-step "
                            f"train.fid_sampler only (Algorithm 2 takes T steps); set train.fid_sampler=dpm++2m (or "
                            f"another), or leave them out")
        return spec

    @property
    def loggers(self) -> tuple[str, ...]:
        """The loggers besides metrics.jsonl, from `logger` (and the older `tensorboard` switch)."""
        names = [v.strip() for v in str(self.logger).split(",") if v.strip()]
        bad = [v for v in names if v not in LOGGERS]
        if bad or not isinstance(self.tensorboard, bool):
            what = f"train.logger={self.logger!r}" if bad else f"train.tensorboard={self.tensorboard!r}"
            raise UserError(f"{what} is not valid; give a comma-separated list of {', '.join(LOGGERS)} (jsonl is "
                            f"always written), e.g. train.logger=jsonl,wandb")
        chosen = set(names) | ({"tensorboard"} if self.tensorboard else set())
        return tuple(v for v in LOGGERS if v in chosen and v != "jsonl")

    @property
    def loss_weighting(self) -> LossWeighting:
        """The weight of L_simple, from loss_weight ("none", "min_snr:5", "soft_min_snr:5")."""
        return LossWeighting.parse(self.loss_weight, "train.loss_weight")

    @property
    def clip_share(self) -> int:
        """Images per clipped share: 0 for "batch", N for "replica:N"."""
        g = self.clip_granularity
        if g == "batch":
            return 0
        kind, _, n = str(g).partition(":")
        if kind != "replica" or not n.isdigit() or int(n) < 1:
            raise UserError(f"train.clip_granularity={g!r} is not valid; give 'batch' or 'replica:N' with N images "
                            f"per share (the official code: replica:16 for CIFAR-10, replica:8 for the 256 models)")
        return int(n)


# Fields that may change when a run is resumed; any other change is refused. The learning rate and
# the warm-up are among them so that a run that diverged can go on from its last good checkpoint
# with a lower rate or a longer warm-up, and the data source so that data can move (whether they are
# the same data is decided by their fingerprint, run/folder.py); every change is recorded in
# config.json's history.
RESUMABLE_CHANGES = {"train": {"steps", "checkpoint_every", "keep_last", "milestone_every", "log_every",
                               "sample_every", "sample_n", "device", "tensorboard", "logger", "channels_last", "compile",
                               "winograd", "fid_every", "fid_n", "fid_ref", "fid_weights", "fid_weights_sha256",
                               "fid_sampler", "fid_steps", "fid_spacing", "lr", "warmup", "microbatch", "checkpointing"},
                     "data": {"source"}}  # data that moved; the checkpoint's fingerprint of them decides
# Keys of a saved config.json that are a record, not configuration (run/folder.py).
RECORD_KEYS = ("history",)

SECTIONS = {"model": UNetConfig, "diffusion": DiffusionConfig, "data": DataConfig, "train": TrainConfig}


@dataclass(frozen=True)
class RunConfig:
    """Everything a run is: the model, the process, the data, the recipe. Saved as config.json."""

    model: UNetConfig
    diffusion: DiffusionConfig
    data: DataConfig
    train: TrainConfig

    def __post_init__(self):
        # Settings of two sections that cannot work together: one line that says what would.
        if self.train.loss_weighting.active and self.diffusion.loss_type == "kl":
            raise UserError(f"train.loss_weight={self.train.loss_weight!r} weights L_simple, but diffusion.loss_type='kl' "
                            f"trains the bound, a fixed objective with no L_simple term; use loss_type='mse' (or "
                            f"'hybrid', where it weights the L_simple term), or train.loss_weight=none")

    def to_dict(self) -> dict:
        return {k: getattr(self, k).to_dict() for k in SECTIONS}

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "config") -> "RunConfig":
        """From JSON-like sections; a missing section or field takes its default."""
        if not isinstance(d, Mapping):
            raise UserError(f"{where}: expected a JSON object of sections ({', '.join(SECTIONS)}), found {type(d).__name__}")
        unknown = sorted(set(d) - set(SECTIONS) - set(RECORD_KEYS))
        if unknown:
            raise UserError(f"{where}: unknown section(s) {', '.join(unknown)}; valid sections: {', '.join(SECTIONS)}")
        return cls(**{k: kind.from_dict(d.get(k, {}), where=f"{where} [{k}]") for k, kind in SECTIONS.items()})

    @classmethod
    def from_preset(cls, name: str, data: Optional[str] = None) -> "RunConfig":
        """The run a preset names (run/presets.py), with its data source replaced by `data` if given."""
        run = cls.from_dict(preset_sections(name), where=f"preset {name}")
        return run if data is None else run.replace(data=run.data.replace(source=data))

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    def with_overrides(self, pairs: Sequence[str]) -> "RunConfig":
        """Apply `section.key=value` strings (e.g. `train.lr=1e-4`, `model.ch=64`)."""
        by_section: dict[str, list[str]] = {}
        for p in pairs:
            key = p.split("=", 1)[0]
            if "." not in key:
                raise UserError(f"--set {p!r}: write section.key=value with a section of {', '.join(SECTIONS)}")
            section, rest = p.split(".", 1)
            if section not in SECTIONS:
                raise UserError(f"--set {p!r}: unknown section {section!r}; valid sections: {', '.join(SECTIONS)}")
            by_section.setdefault(section, []).append(rest)
        changes = {s: apply_overrides(getattr(self, s), ps, where=f"--set {s}") for s, ps in by_section.items()}
        return self.replace(**changes)


def preset_sections(name: str) -> dict:
    """A preset's sections (a copy), or one line listing the presets."""
    if name not in PRESETS:
        hint = f" (it is now named {RENAMED[name]})" if name in RENAMED else ""
        valid = ", ".join(repr(n) for n in PRESETS)
        raise UserError(f"preset={name!r} is not valid{hint}; choose one of: {valid}")
    return {section: dict(fields) for section, fields in PRESETS[name].items()}


def resolve_run_config(preset: Optional[str] = None, config_file=None, *, data: Optional[str] = None,
                       flags: Optional[Mapping] = None, sets: Sequence[str] = (), base: Optional[Mapping] = None
                       ) -> RunConfig:
    """A run's configuration from its layers, each over the last: the preset (default cifar10), a
    JSON config file of sections (merged field by field), the data source, `train` fields given
    as flags (None means not given), and `section.key=value` overrides.

    :param base: the sections to start from instead of a preset: a run's own config when it is
        resumed without --preset (`run.folder.read_run_record`)."""
    if base is not None and preset is None:
        d = {section: dict(fields) for section, fields in base.items() if section in SECTIONS}
    else:
        d = preset_sections("cifar10" if preset is None else preset)  # an empty name is refused there, not defaulted
    if config_file is not None:
        for section, fields in load_json(config_file, expect=dict).items():
            if section in RECORD_KEYS:
                continue
            if not isinstance(fields, dict):
                raise UserError(f"{config_file}: section {section!r} must be an object of fields")
            d.setdefault(section, {}).update(fields)
    origin = "the run's own config" if base is not None and preset is None else f"preset {preset or 'cifar10'}"
    run = RunConfig.from_dict(d, where=str(config_file or origin))
    if data is not None:
        if not str(data).strip():
            raise UserError("--data is empty; give a data source, e.g. --data cifar10:PATH or a folder of images")
        run = run.replace(data=run.data.replace(source=data))
    given = {k: v for k, v in (flags or {}).items() if v is not None}
    if given:
        run = run.replace(train=run.train.replace(**given))
    return run.with_overrides(list(sets))


def model_config(preset: Optional[str] = None, config_file=None, sets: Sequence[str] = ()) -> UNetConfig:
    """A network's configuration (`ddpm info`): a preset's model, or a UNetConfig JSON file (or a
    run config with a "model" section), then `key=value` overrides of its fields."""
    if (preset is None) == (config_file is None):
        raise UserError("give exactly one of --preset NAME or --config JSON")
    if preset is not None:
        cfg = RunConfig.from_preset(preset).model
    else:
        d = load_json(config_file, expect=dict)
        cfg = UNetConfig.from_dict(d["model"] if isinstance(d.get("model"), dict) else d, where=str(config_file))
    return apply_overrides(cfg, list(sets))


def config_changes(saved: Mapping, new: RunConfig) -> list[tuple[str, object, object]]:
    """Every field whose value in `new` differs from the saved config's: (section.key, old, new).
    A field the saved config lacks (written by an older version) is not a change."""
    changes = []
    for section, fields in new.to_dict().items():
        old_fields = saved.get(section, {}) if isinstance(saved, Mapping) else {}
        for k, v in fields.items():
            if isinstance(old_fields, Mapping) and k in old_fields and old_fields[k] != v:
                changes.append((f"{section}.{k}", old_fields[k], v))
    return changes


def is_resumable(key: str) -> bool:
    section, field = key.split(".", 1)
    return field in RESUMABLE_CHANGES.get(section, set())


def check_resume_compatible(saved: Mapping, new: RunConfig, path: Path) -> list[tuple[str, object, object]]:
    """Refuse to resume with a changed setting that would make the run something else; return the
    changes that are allowed (RESUMABLE_CHANGES), for the run's history."""
    changes = config_changes(saved, new)
    for key, old, now in changes:
        if not is_resumable(key):
            raise UserError(
                f"{path}: this run was started with {key}={old!r}, now {now!r}; "
                f"resume with the same setting, or start a new run in another --out folder"
            )
    return changes
