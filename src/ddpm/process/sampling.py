"""Which sampler, with its settings: one typed spec that gives the reverse loop its times and its step.

    spec = SamplerSpec("ddim", steps=50, eta=0.0, spacing="uniform")   # validated here, once
    times, step = spec.chain(diffusion)                                  # for diffusion.reverse_loop

Every command that samples takes a `SamplerSpec`, and each setting's default is written here only.
Adding a sampler (a later DPM-Solver++, UniPC or Heun with its time grid): a member of `Sampler`,
the fields it needs on `SamplerSpec` (with their defaults), a branch in `chain` and in `validate`,
and its keys in `record`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import Choice, Config
from ..errors import UserError
from .diffusion import DDIMSpacing, GaussianDiffusion, Step, ddim_timesteps


class Sampler(Choice):
    ANCESTRAL = "ancestral"  # Algorithm 2
    DDIM = "ddim"  # Song et al. (2021)


SAMPLERS = tuple(s.value for s in Sampler)


@dataclass(frozen=True)
class SamplerSpec(Config):
    """A sampler and its settings. The DDIM settings are ignored (and not recorded) by Algorithm 2.

    :param steps: DDIM: network evaluations S (the chain has S + 1 times; 1 … T, checked against
        the model's T when the chain is built).
    :param eta: DDIM's η: 0 deterministic, 1 as Algorithm 2's noise.
    :param spacing: DDIM's times: 'uniform', 'trailing' or 'quad' (`process.diffusion.ddim_timesteps`).
    :param clip_denoised: clip the predicted x̂_0 to [-1, 1] in each step (the paper's sampler does).
    """

    sampler: Sampler = Sampler.ANCESTRAL
    steps: int = 50
    eta: float = 0.0
    spacing: str = "uniform"  # a DDIMSpacing, kept as given: results files record it as it was written
    clip_denoised: bool = True

    def validate(self) -> None:
        if self.sampler is Sampler.DDIM:
            DDIMSpacing.parse(self.spacing, "ddim spacing")
            if not (isinstance(self.eta, (int, float)) and math.isfinite(self.eta) and self.eta >= 0):
                raise UserError(f"DDIM eta={self.eta!r} must be a finite number >= 0 (0: deterministic, 1: as "
                                f"Algorithm 2's noise)")

    def chain(self, diffusion: GaussianDiffusion) -> tuple[list[int], Step]:
        """The sampler's times (paper t, from its first down to 0) and its step, for the reverse loop."""
        T = diffusion.num_timesteps
        if self.sampler is Sampler.ANCESTRAL:
            return list(range(T, -1, -1)), diffusion.ancestral(self.clip_denoised)
        return ddim_timesteps(T, self.steps, self.spacing), diffusion.ddim(self.eta, self.clip_denoised)

    def record(self, *, clip: bool = True, unused: bool = False) -> dict:
        """The settings under the names results files have always given them: "sampler", then
        "ddim_steps", "ddim_eta", "ddim_spacing" (for DDIM, or always with `unused`), then
        "clip_denoised" (with `clip`)."""
        d: dict = dict(sampler=self.sampler.value)
        if unused or self.sampler is Sampler.DDIM:
            d.update(ddim_steps=self.steps, ddim_eta=self.eta, ddim_spacing=self.spacing)
        if clip:
            d["clip_denoised"] = self.clip_denoised
        return d
