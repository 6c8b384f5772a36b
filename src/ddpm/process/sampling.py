"""Which sampler, with its settings: one typed spec that gives the reverse loop its times and its step.

    spec = SamplerSpec("dpm++2m", steps=20, spacing="logsnr")   # validated here, once
    times, step = spec.chain(diffusion)                         # for diffusion.reverse_loop

Every command that samples takes a `SamplerSpec`, and each setting's default is written here only.
`steps` counts network evaluations (NFE) for every few-step sampler: one a step for DDIM and the
multistep solvers, two a step for Heun (one on its last step), so Heun walks (steps + 1) // 2
intervals and `nfe` says what a chain really costs. Adding a sampler: a member of `Sampler`, the
fields it needs on `SamplerSpec` (with their defaults), a branch in `chain` and in `validate`, and
its keys in `record`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import Choice, Config
from ..errors import UserError
from .diffusion import GaussianDiffusion, Step
from .grids import Spacing, time_grid
from .solvers import DPMSolverPP, Heun, UniPC


class Sampler(Choice):
    ANCESTRAL = "ancestral"  # Algorithm 2
    DDIM = "ddim"  # Song et al. (2021)
    DPMPP_2M = "dpm++2m"  # DPM-Solver++(2M), Lu et al. (2022)
    DPMPP_2M_SDE = "dpm++2m-sde"  # its stochastic variant
    UNIPC = "unipc"  # UniPC bh2, order 2 (Zhao et al. 2023)
    HEUN = "heun"  # Karras et al. (2022), Algorithm 1, deterministic


SAMPLERS = tuple(s.value for s in Sampler)


@dataclass(frozen=True)
class SamplerSpec(Config):
    """A sampler and its settings. `steps` and `spacing` are ignored (and not recorded) by Algorithm 2.

    :param steps: network evaluations N, 1 … T (checked against the model's T when the chain is
        built); Heun spends two a step, so an even N leaves one unused.
    :param eta: DDIM's η: 0 deterministic, 1 as Algorithm 2's noise (DDIM only).
    :param spacing: the time grid (`process.grids`): 'uniform', 'quad', 'trailing', 'logsnr' or 'karras'.
    :param clip_denoised: clip the predicted x̂_0 to [-1, 1] in each step (the paper's sampler does).
    """

    sampler: Sampler = Sampler.ANCESTRAL
    steps: int = 50
    eta: float = 0.0
    spacing: str = "uniform"  # a Spacing, kept as given: results files record it as it was written
    clip_denoised: bool = True

    def validate(self) -> None:
        if self.sampler is not Sampler.ANCESTRAL:
            Spacing.parse(self.spacing, "spacing")
        if self.sampler not in (Sampler.ANCESTRAL, Sampler.DDIM) and (  # DDIM's grid checks its own, as always
                isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1):
            raise UserError(f"steps={self.steps!r}: the network evaluations of sampler {self.sampler.value!r} must be "
                            f"an integer of at least 1")
        if self.sampler is Sampler.DDIM:
            if not (isinstance(self.eta, (int, float)) and math.isfinite(self.eta) and self.eta >= 0):
                raise UserError(f"DDIM eta={self.eta!r} must be a finite number >= 0 (0: deterministic, 1: as "
                                f"Algorithm 2's noise)")

    def chain(self, diffusion: GaussianDiffusion) -> tuple[list[int], Step]:
        """The sampler's times (paper t, from its first down to 0) and its step, for the reverse loop."""
        T = diffusion.num_timesteps
        if self.sampler is Sampler.ANCESTRAL:
            return list(range(T, -1, -1)), diffusion.ancestral(self.clip_denoised)
        if self.sampler is not Sampler.DDIM and self.steps > T:  # DDIM's own grid checks its steps, as always
            raise UserError(f"steps={self.steps!r}: the network evaluations of --sampler {self.sampler.value} must be "
                            f"an integer from 1 to T={T}")
        intervals = (self.steps + 1) // 2 if self.sampler is Sampler.HEUN else self.steps
        times = time_grid(diffusion.alphas_cumprod, intervals, self.spacing)
        clip = self.clip_denoised
        step = {Sampler.DDIM: lambda: diffusion.ddim(self.eta, clip),
                Sampler.DPMPP_2M: lambda: DPMSolverPP(diffusion, clip),
                Sampler.DPMPP_2M_SDE: lambda: DPMSolverPP(diffusion, clip, sde=True),
                Sampler.UNIPC: lambda: UniPC(diffusion, clip),
                Sampler.HEUN: lambda: Heun(diffusion, clip)}[self.sampler]()
        return times, step

    def nfe(self, times) -> int:
        """The network evaluations a chain of `times` costs (a guided one evaluates a doubled batch)."""
        steps = len(times) - 1
        return 2 * steps - 1 if self.sampler is Sampler.HEUN else steps

    def describe(self, diffusion: GaussianDiffusion) -> str:
        """One phrase for messages, e.g. "dpm++2m, 20 network evaluations on the logsnr grid"."""
        times, _ = self.chain(diffusion)
        if self.sampler is Sampler.ANCESTRAL:
            return f"Algorithm 2, T = {self.nfe(times)} network evaluations"
        eta = f", η = {self.eta:g}" if self.sampler is Sampler.DDIM else ""
        return f"{self.sampler.value}{eta}, {self.nfe(times)} network evaluations on the {self.spacing} grid"

    @property
    def tag(self) -> str:
        """A folder-name suffix that tells sample sets of different samplers apart ("" for Algorithm 2)."""
        if self.sampler is Sampler.ANCESTRAL:
            return ""
        eta = f"-eta{self.eta:g}" if self.sampler is Sampler.DDIM and self.eta else ""
        return f"-{self.sampler.value}-{self.steps}-{self.spacing}{eta}"

    def record(self, *, clip: bool = True, unused: bool = False) -> dict:
        """The settings under the names results files have always given them: "sampler", then
        "ddim_steps", "ddim_eta", "ddim_spacing" (for DDIM, and with `unused` for Algorithm 2 too), or
        "steps" and "spacing" (the other few-step samplers), then "clip_denoised" (with `clip`)."""
        d: dict = dict(sampler=self.sampler.value)
        if self.sampler is Sampler.DDIM or (unused and self.sampler is Sampler.ANCESTRAL):
            d.update(ddim_steps=self.steps, ddim_eta=self.eta, ddim_spacing=self.spacing)
        elif self.sampler is not Sampler.ANCESTRAL:
            d.update(steps=self.steps, spacing=self.spacing)
        if clip:
            d["clip_denoised"] = self.clip_denoised
        return d
