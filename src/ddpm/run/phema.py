"""Post-hoc EMA of a run: the averages training tracks, their snapshots, and weights made from them.

    ddpm train ... --set train.phema_every=1000          # snapshots in RUN/phema/
    ddpm phema RUN --sigma-rel 0.03,0.05,0.1             # -> RUN/phema/phema-0.030-00100000.safetensors, …
    ddpm sample --run RUN --weights phema:0.05           # any command, with any width

During training `PowerEMAs` keeps one power-function EMA of the weights per tracked relative
width (`train.phema_sigma_rels`, EDM2's 0.05 and 0.10 by default), in every checkpoint so that a
resumed run goes on exactly; every `train.phema_every` steps, and at the last step, they are
written as a snapshot, `RUN/phema/snapshot-{step:08d}.safetensors`: checksummed safetensors like
a checkpoint, never unpickled. `reconstruct` combines the snapshots up to a step into the average
of any width (process/ema.py, least squares over the profiles) and writes it as a ddpm weights
file with the run's config, which `load_run` reads for `--weights phema:WIDTH[@STEP]`.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..errors import UserError
from ..io import checkpoint as ckpt
from ..io.atomic import remove_quietly
from ..process.ema import (SIGMA_REL_DECIMALS, check_sigma_rel, phema_coefficients, power_ema_beta, profile_error,
                           sigma_rel_to_gamma)

PHEMA_DIR = "phema"
_SNAPSHOT_RE = re.compile(r"snapshot-(\d{8,})\.safetensors")
_WEIGHTS_RE = re.compile(r"phema-\d+\.\d+-(\d{8,})\.safetensors")


def snapshot_path(run_dir, step: int) -> Path:
    return Path(run_dir) / PHEMA_DIR / f"snapshot-{step:08d}.safetensors"


def weights_path(run_dir, sigma_rel: float, step: int) -> Path:
    """Where `reconstruct` writes the average of width `sigma_rel` at `step`."""
    return Path(run_dir) / PHEMA_DIR / f"phema-{sigma_rel:.{SIGMA_REL_DECIMALS}f}-{step:08d}.safetensors"


def list_snapshots(run_dir) -> list[tuple[int, Path]]:
    """(step, path) of the run's snapshots, oldest first (not verified)."""
    folder = Path(run_dir) / PHEMA_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _SNAPSHOT_RE.fullmatch(p.name))]
    return sorted(found)


class PowerEMAs:
    """The power-function EMAs of a model's weights that training tracks, one per relative width.

    `update(params, t)` after the t-th optimizer step (t = 1, 2, …) applies θ̂ ← β_t θ̂ + (1 − β_t) θ
    with β_t = (1 − 1/t)^(γ+1) (process/ema.py `power_ema_beta`), one fused kernel per width. A step
    that fp16 loss scaling skipped left θ as it was, and averaging it again is what the profile
    over time asks for, so every step updates."""

    def __init__(self, model: torch.nn.Module, sigma_rels: Sequence[float]):
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        self.names = [n for n, _ in model.named_parameters()]
        if len(self.names) != len(model.state_dict()):  # a snapshot must be a whole state dict
            raise ValueError("post-hoc EMA averages parameters; this network also has buffers")
        self.averages = [[p.detach().clone() for p in model.parameters()] for _ in self.sigma_rels]

    def update(self, params: list[torch.Tensor], t: int) -> None:
        for avg, gamma in zip(self.averages, self.gammas):
            torch._foreach_lerp_(avg, params, 1.0 - power_ema_beta(gamma, t))

    def state_dict(self) -> dict:
        """What a checkpoint keeps (and a snapshot holds): the widths and one state dict per width."""
        return dict(sigma_rels=list(self.sigma_rels), gammas=list(self.gammas),
                    averages=[dict(zip(self.names, avg)) for avg in self.averages])

    def problem(self, state) -> str:
        """Why `state` (a checkpoint's "phema") cannot be loaded into these averages, or ""."""
        if not isinstance(state, dict) or not isinstance(state.get("averages"), list):
            return "it has no post-hoc EMA state"
        if tuple(state.get("sigma_rels") or ()) != self.sigma_rels or len(state["averages"]) != len(self.averages):
            return f"its post-hoc EMA tracks widths {state.get('sigma_rels')}, this run {list(self.sigma_rels)}"
        for sd in state["averages"]:
            if not isinstance(sd, dict) or list(sd) != self.names:
                return "its post-hoc EMA averages do not fit the network"
            for avg, name in zip(self.averages[0], self.names):
                if not isinstance(sd[name], torch.Tensor) or sd[name].shape != avg.shape:
                    return f"its post-hoc EMA tensor {name} is not {list(avg.shape)}"
        return ""

    def load_state_dict(self, state: dict) -> None:
        for avg, sd in zip(self.averages, state["averages"]):
            torch._foreach_copy_(avg, [sd[n].to(a.device) for n, a in zip(self.names, avg)])

    def save_snapshot(self, run_dir, step: int, run_config: dict, classes: Optional[dict]) -> Path:
        """The averages after `step` as RUN/phema/snapshot-{step}.safetensors, with the run's config."""
        return ckpt.save_snapshot(snapshot_path(run_dir, step), step,
                                  dict(step=step, config=run_config, **({"classes": classes} if classes else {}),
                                       **self.state_dict()))


def drop_snapshots_after(run_dir, step: int) -> list[int]:
    """Remove the snapshots newer than `step`, the checkpoint a run resumes from, and the weights
    made from them: they belong to the steps about to be trained again. Returns their steps."""
    gone = [(s, p) for s, p in list_snapshots(run_dir) if s > step]
    for _, p in gone:
        remove_quietly(p, "post-hoc EMA snapshot")
    folder = Path(run_dir) / PHEMA_DIR
    for p in folder.iterdir() if folder.is_dir() else ():
        if (m := _WEIGHTS_RE.fullmatch(p.name)) and int(m.group(1)) > step:
            remove_quietly(p, "post-hoc EMA weights of a removed snapshot")
    return [s for s, _ in gone]


def parse_phema(value: str, where: str = "--weights") -> tuple[float, Optional[int]]:
    """`phema:WIDTH` or `phema:WIDTH@STEP` -> (width, step or None)."""
    body = str(value)[len("phema:"):]
    width, _, at = body.partition("@")
    try:
        sigma = float(width)
        step = int(at) if at else None
    except ValueError:
        sigma, step = None, -1
    if sigma is None or (step is not None and step < 1):
        raise UserError(f"{where} {value!r}: write phema:WIDTH or phema:WIDTH@STEP, e.g. phema:0.05 (the relative EMA "
                        f"width) or phema:0.05@20000 (as of the snapshot of step 20000)")
    return check_sigma_rel(sigma, f"{where} phema width"), step


def _named_width(value) -> float:
    """A width as its file names it (SIGMA_REL_DECIMALS decimals), so that a file is only reused for
    the width it holds."""
    w = round(check_sigma_rel(value, "--sigma-rel"), SIGMA_REL_DECIMALS)
    if w == 0:
        raise UserError(f"--sigma-rel {value!r} rounds to 0 at {SIGMA_REL_DECIMALS} decimals; give a wider one")
    return w


@dataclass(frozen=True)
class Reconstruction:
    """One average `reconstruct` made: its file, width, step, how many snapshots went into it, and
    how far its profile is from the one asked for (process/ema.py `profile_error`)."""

    path: Path
    sigma_rel: float
    step: int
    snapshots: int
    profile_error: float


def reconstruct(run_dir, sigma_rels: Sequence[float], at: Optional[int] = None, log=None) -> list[Reconstruction]:
    """Post-hoc EMA: the averages of relative widths `sigma_rels` as of the snapshot of step `at`
    (default: the newest), each the least-squares combination of every snapshot up to that step,
    written as RUN/phema/phema-{width}-{step}.safetensors (a ddpm weights file whose config is the
    run's, plus a "phema" record of how it was made). A file already there is reused."""
    run_dir = Path(run_dir)
    widths = [_named_width(s) for s in sigma_rels]
    found = list_snapshots(run_dir)
    if not found:
        raise UserError(f"{run_dir}: no post-hoc EMA snapshots in {run_dir / PHEMA_DIR}; train with "
                        f"--set train.phema_every=N (N steps between snapshots) to make them")
    steps = [s for s, _ in found]
    step = steps[-1] if at is None else at
    if step not in steps:
        near = sorted(steps, key=lambda s: abs(s - step))[:3]
        raise UserError(f"{run_dir}: no snapshot at step {step}; snapshots exist at steps {steps[0]} … {steps[-1]} "
                        f"(the nearest: {', '.join(map(str, sorted(near)))}); give one of those")
    todo = [w for w in dict.fromkeys(widths) if not weights_path(run_dir, w, step).is_file()]
    if todo:
        _combine(run_dir, [(s, p) for s, p in found if s <= step], todo, step, log)
    out = []
    for w in widths:
        path = weights_path(run_dir, w, step)
        _, config = ckpt.load_weights(path)
        rec = config.get("phema") if isinstance(config.get("phema"), dict) else {}
        out.append(Reconstruction(path, w, step, int(rec.get("snapshots", 0)), float(rec.get("profile_error", "nan"))))
    return out


def _combine(run_dir: Path, found: list[tuple[int, Path]], widths: list[float], step: int, log) -> None:
    """Read each snapshot once and add it, times its coefficient for each width, into float64 sums
    (the coefficients alternate in sign: float32 sums would lose digits)."""
    newest = ckpt.load_snapshot(found[-1][1])
    gammas = [float(g) for g in newest["gammas"]]
    profiles = [(s, g) for s, _ in found for g in gammas]  # (step, γ) of each averaged state dict, in order
    coefficients = {w: phema_coefficients(profiles, step, sigma_rel_to_gamma(w)) for w in widths}
    sums: dict[float, dict[str, torch.Tensor]] = {}
    for i, (s, p) in enumerate(found):
        state = newest if i == len(found) - 1 else ckpt.load_snapshot(p)
        if [float(g) for g in state["gammas"]] != gammas or state["step"] != s:
            raise UserError(f"{p}: this snapshot tracks widths {state['sigma_rels']} at step {state['step']}, the "
                            f"run's newest {newest['sigma_rels']}; move snapshots of another run out of {p.parent}")
        for k, sd in enumerate(state["averages"]):
            for w in widths:
                x = float(coefficients[w][i * len(gammas) + k])
                acc = sums.setdefault(w, {n: torch.zeros_like(v, dtype=torch.float64) for n, v in sd.items()})
                for n, v in sd.items():
                    acc[n].add_(v.double(), alpha=x)
    for w in widths:
        err = profile_error(profiles, coefficients[w], step, sigma_rel_to_gamma(w))
        record = dict(sigma_rel=w, gamma=sigma_rel_to_gamma(w), step=step, snapshots=len(found), profile_error=err,
                      tracked_sigma_rels=list(newest["sigma_rels"]), snapshot_steps=[s for s, _ in found])
        config = dict(newest["config"], phema=record, **({"classes": newest["classes"]} if "classes" in newest else {}))
        path = ckpt.save_weights(weights_path(run_dir, w, step), {n: v.float() for n, v in sums[w].items()}, config)
        (log or _log)(f"post-hoc EMA of width {w:g} at step {step}: {path} ({len(found)} snapshots, profile "
                      f"error {100 * err:.2f}%)")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
