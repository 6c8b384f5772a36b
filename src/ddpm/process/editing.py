"""Editing an image with a trained unconditional model: the math of inpainting, SDEdit and inversion.

No network is trained or changed; each method only walks the reverse process differently
(docs/MATH.md § Editing). Times are the paper's t (docs/MATH.md § Time and indexing).

- **RePaint** (Lugmayr et al. 2022): the reverse chain of any sampler, where after every step the
  known pixels are replaced by a fresh draw of q(x_{t_next} | x_0) of the image (`KnownRegion`, a
  `Step` wrapper), and the chain is walked in blocks of `jump` steps, each block `resample` times:
  after a block, x goes back up `jump` steps by the forward process (`q_jump`), so that the
  unknown pixels are denoised again from a state in which the known ones had time to act on
  them (`repaint_path`). resample = 1 is plain replacement (no resampling).
- **SDEdit** (Meng et al. 2022): x_{t0} ~ q(x_{t0} | x_0) with t0 = s·T, then the sampler's chain
  from t0 to 0 (`sdedit_time`, `chain_from`).
- **DDIM inversion** (Song et al. 2021, § 5.4): the deterministic DDIM update (η = 0) run from the
  data towards noise, x_0 → x_{t_1} → … → x_{t_N}, on the same times as the decoder walks down
  (`ddim_invert`); and `slerp`, the DDIM paper's interpolation between two such latents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .. import threads
from ..config import Config
from ..errors import UserError
from .diffusion import GaussianDiffusion, Model, NoiseFn, Progress, Step, check_time
from .sampling import Sampler, SamplerSpec


# RePaint's published settings (Lugmayr et al. 2022, § 4 and App. B): jumps of j = 10 steps,
# each block walked r = 10 times.
REPAINT_JUMP = 10
REPAINT_RESAMPLE = 10


def q_jump(diffusion: GaussianDiffusion, x: torch.Tensor, t_from: int, t_to: int, noise: torch.Tensor) -> torch.Tensor:
    """x_{t_to} ~ q(x_{t_to} | x_{t_from}) for t_to > t_from: the forward process (eq. 2) run for
    t_to − t_from steps at once, N(√(ᾱ_{t_to}/ᾱ_{t_from}) x, (1 − ᾱ_{t_to}/ᾱ_{t_from}) I) (M35)."""
    if not 0 <= t_from < t_to <= diffusion.num_timesteps:
        raise ValueError(f"q_jump goes up, from t={t_from} to t={t_to} in 0 … T={diffusion.num_timesteps}")
    ratio = diffusion.alpha_bar(t_to) / diffusion.alpha_bar(t_from)  # float64 on the host
    return math.sqrt(ratio) * x + math.sqrt(1.0 - ratio) * noise


def check_repaint(jump, resample) -> tuple[int, int]:
    for name, v in (("jump length", jump), ("resamplings", resample)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise UserError(f"RePaint's {name} {v!r} must be an integer of at least 1 (RePaint's defaults: jump length "
                            f"{REPAINT_JUMP}, {REPAINT_RESAMPLE} resamplings; --resample 1 is no resampling)")
    return jump, resample


@dataclass(frozen=True)
class RePaintSpec(Config):
    """RePaint's walk (`repaint_path`): blocks of `jump` steps, each walked `resample` times
    (RePaint's published 10 and 10; resample = 1 is replacement alone)."""

    jump: int = REPAINT_JUMP
    resample: int = REPAINT_RESAMPLE

    def validate(self) -> None:
        check_repaint(self.jump, self.resample)


def repaint_path(times: Sequence[int], jump: int = REPAINT_JUMP, resample: int = REPAINT_RESAMPLE) -> list[list[int]]:
    """RePaint's walk over a sampler's descending chain `times` (its first time down to 0), as the
    descending runs of times the reverse loop walks; between two runs, x goes back up by the forward
    process from the end of one to the start of the next (`q_jump`).

    Counting the chain's positions from its end (position 0 is t = 0), the walk jumps back `jump`
    positions from each position p = 1, 1 + jump, 1 + 2·jump, … with p + jump within the chain,
    `resample` − 1 times, so that every block of `jump` steps above such a p is walked `resample`
    times; the last step, to t = 0, is walked once (as RePaint's published schedule, `jump_length`
    and `jump_n_sample`, does on its own times). resample = 1 is one run: the chain itself.
    """
    jump, resample = check_repaint(jump, resample)
    times = [int(t) for t in times]
    n = len(times) - 1  # the chain's steps
    left = {p: resample - 1 for p in range(1, n - jump + 1, jump)}
    runs, run, p = [], [times[0]], n
    while p > 0:
        p -= 1
        run.append(times[n - p])
        if left.get(p, 0) > 0:
            left[p] -= 1
            runs.append(run)
            p += jump
            run = [times[n - p]]
    runs.append(run)
    return runs


def repaint_nfe(times: Sequence[int], jump: int = REPAINT_JUMP, resample: int = REPAINT_RESAMPLE) -> int:
    """The reverse steps RePaint's walk takes (network evaluations for a one-evaluation step): about
    `resample` times the chain's own."""
    return sum(len(run) - 1 for run in repaint_path(times, jump, resample))


class KnownRegion:
    """A `Step` that inpaints: `step`'s move to t_next, after which the known pixels (`keep`, True or
    1 = keep) take a fresh draw of q(x_{t_next} | x_0) of the image `x0` (RePaint, eq. 8–9 of
    Lugmayr et al.; M34); at t_next = 0 they are x_0 itself, so the result holds the image's known
    pixels exactly.

    :param keep: bool, broadcastable to x (e.g. [B, 1, H, W]).
    :param noise_fn: `noise_fn(shape)`, the known region's noise (a per-image stream apart from the
        step's own).
    """

    def __init__(self, step: Step, diffusion: GaussianDiffusion, x0: torch.Tensor, keep: torch.Tensor, noise_fn: NoiseFn):
        self.step, self.diffusion, self.x0, self.noise_fn = step, diffusion, x0, noise_fn
        self.keep = keep.to(device=x0.device, dtype=torch.bool)
        self.draws_noise = step.draws_noise

    def begin(self, times: Sequence[int]) -> None:
        self.step.begin(times)

    def __call__(self, model, x, t, t_next, noise):
        out = self.step(model, x, t, t_next, noise)
        known = self.known(t_next, x.shape)
        return dict(out, sample=torch.where(self.keep, known, out["sample"]))

    def known(self, t: int, shape) -> torch.Tensor:
        """A draw of q(x_t | x_0) of the image (x_0 itself at t = 0)."""
        noise = self.noise_fn(torch.Size(shape))
        if t == 0:
            return self.x0.expand(shape)
        return self.diffusion.q_sample(self.x0.expand(shape), torch.full((shape[0],), t, device=self.x0.device,
                                                                         dtype=torch.long), noise)


def repaint(diffusion: GaussianDiffusion, model: Model, x_T: torch.Tensor, times: Sequence[int], step: Step,
            inpaint: KnownRegion, noise_fn: NoiseFn, jump: int = REPAINT_JUMP, resample: int = REPAINT_RESAMPLE,
            progress: Optional[Progress] = None, callback: Optional[Callable] = None) -> torch.Tensor:
    """RePaint from x_T at times[0] down to x_0 (`repaint_path`): each descending run walks the one
    reverse loop with `inpaint` (a `KnownRegion` around `step`), and x goes back up between runs by
    `q_jump` with the noise of `inpaint.noise_fn`. `noise_fn` is the reverse steps' z.

    :param progress: a bar over all the reverse steps (not restarted for each run).
    """
    runs = repaint_path(times, jump, resample)
    bar = iter(progress(range(sum(len(run) - 1 for run in runs)))) if progress else None

    def advancing(pairs):  # each run's steps move the one bar
        for pair in pairs:
            next(bar, None)
            yield pair

    x = x_T
    for k, run in enumerate(runs):
        if k:  # back up from where the last run ended
            x = q_jump(diffusion, x, runs[k - 1][-1], run[0], inpaint.noise_fn(x.shape))
        if len(run) > 1:
            x = diffusion.reverse_loop(model, x, run, inpaint, noise_fn=noise_fn, progress=advancing if bar else None,
                                       callback=callback)
    for _ in bar or ():  # finish the bar
        pass
    return x


def sdedit_time(T: int, strength) -> int:
    """SDEdit's start t0 = round(s·T) for a strength s in [0, 1]: 0 returns the image, 1 starts
    from the prior (it ignores the image)."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 <= strength <= 1:
        raise UserError(f"strength {strength!r} must be a number from 0 (return the image) to 1 (ignore it)")
    return int(round(float(strength) * T))


def chain_from(times: Sequence[int], t0: int) -> list[int]:
    """A sampler's descending chain started at t0 instead of its first time: t0, then the chain's
    times below t0 (for Algorithm 2: t0, t0 − 1, …, 0; for a DDIM grid whose first time is 901, t0 =
    950 gives 950, 901, 801, …)."""
    return [int(t0)] + [int(t) for t in times if t < t0]


def ddim_invert(diffusion: GaussianDiffusion, model: Model, x0: torch.Tensor, times: Sequence[int],
                progress: Optional[Progress] = None) -> torch.Tensor:
    """DDIM inversion: the deterministic DDIM update (η = 0, eq. 12 of Song et al. 2021) run up the
    chain `times` (descending, ending at 0: the times the decoder walks down), x_0 → x_{times[0]}.

    From t to the next time u > t: x_u = √ᾱ_u x̂_0 + √(1 − ᾱ_u) ε̂ with ε̂ the network's ε at
    (x_t, u) and x̂_0 = (x_t − √(1 − ᾱ_t) ε̂)/√ᾱ_t (M36): the decoder's step from u back to t, with
    ε̂ read at x_t instead of the x_u it does not know yet (the approximation every DDIM inversion
    makes; its error falls with the step). x̂_0 is not clipped: clipping is not invertible.
    """
    ts = [check_time(t, diffusion.num_timesteps, "time") for t in times]
    if len(ts) < 2 or ts[-1] != 0 or any(a <= b for a, b in zip(ts, ts[1:])):
        raise UserError(f"DDIM inversion needs a strictly decreasing chain of times ending at 0, got {ts[:5]}")
    up = ts[::-1]
    x = x0
    pairs = list(zip(up, up[1:]))
    with torch.no_grad():
        for t, u in (progress(pairs) if progress else pairs):
            tu = torch.full((x.shape[0],), u, device=x.device, dtype=torch.long)
            pred_x0 = diffusion.p_mean_variance(model, x, tu, clip_denoised=False)["pred_x0"]
            eps = diffusion.predict_eps_from_x0(x, tu, pred_x0)  # the network's ε̂ at (x_t, u), any parametrisation
            a_t, a_u = diffusion.alpha_bar(t), diffusion.alpha_bar(u)
            x0_hat = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
            x = math.sqrt(a_u) * x0_hat + math.sqrt(1 - a_u) * eps
            threads.adapt()
    return x


# The deterministic sampler that inversion inverts and decoding walks: DDIM, η = 0, x̂_0 unclipped
# (clipping is not invertible), on the samplers' default grid.
INVERT_SPACING = SamplerSpec.spacing


def invert_sampler(steps: int = SamplerSpec.steps, spacing: str = INVERT_SPACING) -> SamplerSpec:
    """The sampler of a DDIM inversion and of its decoding: DDIM with η = 0 and x̂_0 unclipped."""
    return SamplerSpec(Sampler.DDIM, steps=steps, eta=0.0, spacing=spacing, clip_denoised=False)


def slerp(a: torch.Tensor, b: torch.Tensor, lam: float) -> torch.Tensor:
    """Spherical interpolation between two latents (the DDIM paper's, § 5.3; M37): sin((1−λ)θ)/sin θ
    · a + sin(λθ)/sin θ · b, θ the angle between them; linear where θ is near 0. One pair: θ is
    taken over the whole tensors (a batch of pairs needs one call each)."""
    cos = torch.sum(a.double() * b.double()) / (a.double().norm() * b.double().norm())
    theta = float(torch.arccos(cos.clamp(-1.0, 1.0)))
    if theta < 1e-6:
        return (1 - lam) * a + lam * b
    return (math.sin((1 - lam) * theta) * a + math.sin(lam * theta) * b) / math.sin(theta)
