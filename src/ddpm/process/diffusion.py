"""The diffusion process of Ho, Jain & Abbeel (2020), apart from any network.

`GaussianDiffusion` owns the fixed forward chain q, the posterior q(x_{t-1} | x_t, x_0), the
reverse chain p_θ built from a model's output, the training losses (L_simple and the true bound),
bits/dim, and the one reverse loop every sampler shares. Every method takes the model (any
callable `model(x_t [B, C, H, W], t [B] int64)`) as an argument; this module imports no network
code and draws nothing on the screen (loops take a `progress` wrapper from the caller).

Time: every `t` here is the paper's, t ∈ {0, …, T}: the number of forward steps applied, 0 the
data (docs/MATH.md § Time and indexing). The model is called with that t. The tables are
indexed by t and hold a row for t = 0 (ᾱ_0 = 1; NaN where a quantity has no meaning at t = 0).

The formulas follow the official code constant for constant; the additions from later work
(`v`, `learned_range`, `hybrid`, `cosine`) follow Salimans & Ho (2022) and Nichol & Dhariwal
(2021) and are off by default.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Protocol, Sequence

import numpy as np
import torch

from .. import threads
from ..config import MAX_TIMESTEPS, Choice, Config, check_count
from ..errors import UserError
from .likelihood import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .schedules import Schedule, make_betas


class MeanType(Choice):
    """What the network predicts (docs/MATH.md § Reverse process)."""

    EPS = "eps"  # the noise ε (the paper's choice)
    X0 = "x0"  # the data x_0
    XPREV = "xprev"  # the posterior mean itself
    V = "v"  # √ᾱ ε − √(1−ᾱ) x_0 (Salimans & Ho 2022)


class VarType(Choice):
    """The reverse process's variance σ_t² (docs/MATH.md § Reverse process)."""

    FIXEDLARGE = "fixedlarge"  # σ² = β_t (CIFAR-10)
    FIXEDSMALL = "fixedsmall"  # σ² = β̃_t (256×256)
    LEARNED = "learned"  # the network outputs log σ² in a second set of C channels
    LEARNED_RANGE = "learned_range"  # ... an interpolation between log β̃_t and log β_t (Nichol & Dhariwal)

    @property
    def learned(self) -> bool:
        return self in (VarType.LEARNED, VarType.LEARNED_RANGE)


class LossType(Choice):
    """The training objective (docs/MATH.md § Training objective)."""

    MSE = "mse"  # L_simple (Algorithm 1)
    KL = "kl"  # the true bound's term at t (eq. 5)
    HYBRID = "hybrid"  # L_simple + λ·T·L_t with the mean detached (Nichol & Dhariwal)


MEAN_TYPES = tuple(m.value for m in MeanType)
VAR_TYPES = tuple(v.value for v in VarType)
LOSS_TYPES = tuple(v.value for v in LossType)

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[torch.Size], torch.Tensor]
Progress = Callable[[Iterable[int]], Iterable[int]]  # wraps a loop, e.g. with a progress bar


@dataclass(frozen=True)
class DiffusionConfig(Config):
    """The process and its parametrisation. Defaults are the paper's CIFAR-10 choices."""

    SECTION = "diffusion"

    schedule: Schedule = Schedule.LINEAR
    T: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    mean_type: MeanType = MeanType.EPS
    var_type: VarType = VarType.FIXEDLARGE
    loss_type: LossType = LossType.MSE
    hybrid_lambda: float = 0.001  # λ of L_hybrid = L_simple + λ L_vlb (Nichol & Dhariwal)

    def validate(self):
        if isinstance(self.T, int) and self.T > MAX_TIMESTEPS:  # before the tables are made; make_betas checks the rest
            check_count(self.T, "diffusion.T", MAX_TIMESTEPS, why="the process keeps tables of T values")
        _check_combination(self.betas(), self.mean_type, self.var_type, self.loss_type)

    def betas(self) -> np.ndarray:
        return make_betas(self.schedule, self.T, self.beta_start, self.beta_end)


def _check_combination(betas: np.ndarray, mean_type: MeanType, var_type: VarType, loss_type: LossType) -> None:
    """Refuse settings that cannot work together, with one line that says what would."""
    if np.prod(1.0 - betas) == 0.0 and mean_type is MeanType.EPS:
        raise UserError(
            "this schedule reaches ᾱ_T = 0 (e.g. 'jsd', whose last β is 1), where x_0 cannot be recovered "
            "from ε; use mean_type='x0', 'v' or 'xprev', or another schedule"
        )
    if loss_type is LossType.MSE and var_type.learned:
        raise UserError(
            f"loss_type='mse' cannot train var_type={var_type.value!r} (L_simple has no variance term); "
            "use loss_type='hybrid' or 'kl', or a fixed variance ('fixedlarge', 'fixedsmall')"
        )
    if loss_type is LossType.HYBRID and not var_type.learned:
        raise UserError(
            f"loss_type='hybrid' only makes sense with a learned variance, not var_type={var_type.value!r}; "
            "use var_type='learned_range' or 'learned', or loss_type='mse'"
        )


def check_time(t, T: int, what: str = "t", lowest: int = 0) -> int:
    """A paper time t as an int in `lowest` … T, or a UserError that says which range is valid."""
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not lowest <= int(t) <= T:
        low = "0 (no noise)" if lowest == 0 else str(lowest)
        raise UserError(f"{what}={t!r} must be an integer from {low} to T={T} (pure noise)")
    return int(t)


class DDIMSpacing(Choice):
    UNIFORM = "uniform"
    TRAILING = "trailing"
    QUAD = "quad"


def ddim_timesteps(T: int, steps: int, spacing: str = "uniform") -> list[int]:
    """The times of a DDIM chain (Song et al. 2021), descending and ending at 0, the data.

    :param steps: how many network evaluations (S); the chain has S + 1 times.
    :param spacing: 'uniform': 1, 1 + T/S, 1 + 2T/S, … (the DDIM paper's CIFAR-10 choice;
        diffusers' "leading"); 'trailing': T, T − T/S, … (starts at T, so x_T is the prior's);
        'quad': quadratic spacing, denser near t = 0 (the DDIM paper's other choice).
    """
    spacing = DDIMSpacing.parse(spacing, "ddim spacing")
    if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= T:
        raise UserError(f"DDIM steps={steps} must be between 1 and T={T}")
    if spacing is DDIMSpacing.UNIFORM:
        ts = np.arange(0, T, T // steps)[:steps] + 1
    elif spacing is DDIMSpacing.TRAILING:
        ts = np.round(np.arange(T, 0, -T / steps)).astype(np.int64)
    else:
        ts = np.unique((np.linspace(0, np.sqrt(T * 0.8), steps) ** 2).astype(np.int64)) + 1
    return sorted({int(t) for t in ts}, reverse=True) + [0]


class GaussianDiffusion:
    """Forward process, posterior, reverse process, losses and bits/dim (docs/MATH.md).

    :param betas: β_1 … β_T, float64 array [T] (see `make_betas`).
    :param mean_type: what the network predicts: 'eps' (paper), 'x0', 'xprev', 'v'.
    :param var_type: 'fixedlarge' (σ² = β, CIFAR-10), 'fixedsmall' (σ² = β̃, 256×256),
        'learned' (log σ² output), 'learned_range' (interpolation between log β̃ and log β).
    :param loss_type: 'mse' (L_simple, Algorithm 1), 'kl' (true bound, eq. 5), 'hybrid'.
    """

    def __init__(self, betas, mean_type: str = "eps", var_type: str = "fixedlarge", loss_type: str = "mse",
                 hybrid_lambda: float = 0.001):
        self.mean_type = MeanType.parse(mean_type, "mean_type")
        self.var_type = VarType.parse(var_type, "var_type")
        self.loss_type = LossType.parse(loss_type, "loss_type")
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) < 2:
            raise UserError(f"betas must be a 1-D array of at least 2 steps (got shape {betas.shape}); "
                            "the clipped posterior log-variance at t = 1 borrows the value at t = 2")
        if not ((betas > 0).all() and (betas <= 1).all()):
            raise UserError("every β must lie in (0, 1]")
        _check_combination(betas, self.mean_type, self.var_type, self.loss_type)
        self.hybrid_lambda = float(hybrid_lambda)
        self.num_timesteps = T = len(betas)

        # All tables in float64 (docs/MATH.md § Forward process), as arrays over t = 1 … T first.
        alphas_cumprod = np.cumprod(1.0 - betas)  # ᾱ_t
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])  # ᾱ_{t-1}
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)  # β̃_t, eq. 7
        with np.errstate(divide="ignore"):
            tables = dict(
                betas=betas,
                alphas_cumprod=alphas_cumprod,
                alphas_cumprod_prev=alphas_cumprod_prev,
                sqrt_alphas_cumprod=np.sqrt(alphas_cumprod),
                sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - alphas_cumprod),
                log_one_minus_alphas_cumprod=np.log(1.0 - alphas_cumprod),
                sqrt_recip_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod),
                sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / alphas_cumprod - 1),
                posterior_variance=posterior_variance,
                # β̃_1 is 0: its log is "clipped" by borrowing the value at t = 2.
                posterior_log_variance_clipped=np.log(np.append(posterior_variance[1], posterior_variance[1:])),
                posterior_mean_coef1=betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
                posterior_mean_coef2=(1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
                # fixedlarge: σ² = β_t, but the log-variance at t = 1 is log β̃_2 for a better decoder
                # likelihood (the official code's choice for CIFAR-10).
                fixedlarge_variance=betas,
                fixedlarge_log_variance=np.log(np.append(posterior_variance[1], betas[1:])),
            )
        assert all(v.shape == (T,) for v in tables.values())
        # The row for t = 0: x_0 itself (ᾱ_0 = 1); undefined elsewhere, NaN so misuse shows.
        at_zero = dict(alphas_cumprod=1.0, sqrt_alphas_cumprod=1.0, sqrt_one_minus_alphas_cumprod=0.0,
                       log_one_minus_alphas_cumprod=-np.inf, sqrt_recip_alphas_cumprod=1.0, sqrt_recipm1_alphas_cumprod=0.0)
        self._tables64 = {k: torch.from_numpy(np.append(at_zero.get(k, np.nan), v)) for k, v in tables.items()}
        self._cache: dict[tuple, dict[str, torch.Tensor]] = {}

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> "GaussianDiffusion":
        return cls(cfg.betas(), cfg.mean_type, cfg.var_type, cfg.loss_type, cfg.hybrid_lambda)

    # ------------------------------------------------------------------ tables and broadcasting
    @property
    def alphas_cumprod(self) -> np.ndarray:
        """ᾱ_1 … ᾱ_T, float64 [T] (for the time grids of `process.grids`)."""
        return self._tables64["alphas_cumprod"][1:].numpy()

    def alpha_bar(self, t: int) -> float:
        """ᾱ_t in float64 for one paper time t ∈ 0 … T (ᾱ_0 = 1)."""
        return float(self._tables64["alphas_cumprod"][t])

    def table(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """Table `name` [T + 1], indexed by t = 0 … T, on `like`'s device, cast once and cached
        (never below float32)."""
        dtype = like.dtype if like.dtype in (torch.float32, torch.float64) else torch.float32
        key = (like.device, dtype)
        if key not in self._cache:
            self._cache[key] = {k: v.to(device=like.device, dtype=dtype) for k, v in self._tables64.items()}
        return self._cache[key][name]

    def extract(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """table[t] reshaped to [B, 1, 1, …] to broadcast against x [B, C, H, W]."""
        out = self.table(name, x)[t]
        return out.view(t.shape[0], *([1] * (x.ndim - 1)))

    # ------------------------------------------------------------------ forward process
    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor):
        """q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I) (eq. 4) -> (mean, variance, log_variance)."""
        mean = self.extract("sqrt_alphas_cumprod", t, x0) * x0
        variance = self.extract("sqrt_one_minus_alphas_cumprod", t, x0) ** 2
        log_variance = self.extract("log_one_minus_alphas_cumprod", t, x0)
        return mean, variance.expand_as(x0), log_variance.expand_as(x0)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = √ᾱ_t x_0 + √(1 − ᾱ_t) ε (eq. 4); t = 0 gives x_0 exactly."""
        if noise is None:
            noise = torch.randn_like(x0)
        return self.extract("sqrt_alphas_cumprod", t, x0) * x0 + self.extract("sqrt_one_minus_alphas_cumprod", t, x0) * noise

    def q_posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """q(x_{t-1} | x_t, x_0) = N(μ̃_t, β̃_t I) (eq. 6–7), t ≥ 1 -> (mean, variance, clipped log_variance)."""
        mean = self.extract("posterior_mean_coef1", t, x_t) * x0 + self.extract("posterior_mean_coef2", t, x_t) * x_t
        variance = self.extract("posterior_variance", t, x_t).expand_as(x_t)
        log_variance = self.extract("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
        return mean, variance, log_variance

    # ------------------------------------------------------------------ parametrisations
    def predict_x0_from_eps(self, x_t, t, eps):
        # x_0 = √(1/ᾱ_t) x_t − √(1/ᾱ_t − 1) ε  (eq. 4 solved for x_0)
        return self.extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - self.extract("sqrt_recipm1_alphas_cumprod", t, x_t) * eps

    def predict_eps_from_x0(self, x_t, t, x0):
        return (self.extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x0) / self.extract("sqrt_recipm1_alphas_cumprod", t, x_t)

    def predict_x0_from_xprev(self, x_t, t, xprev):
        # μ̃ = c1 x_0 + c2 x_t  =>  x_0 = (μ̃ − c2 x_t) / c1
        c1 = self.extract("posterior_mean_coef1", t, x_t)
        return (xprev - self.extract("posterior_mean_coef2", t, x_t) * x_t) / c1

    def predict_x0_from_v(self, x_t, t, v):
        # v = √ᾱ ε − √(1−ᾱ) x_0 (Salimans & Ho 2022)  =>  x_0 = √ᾱ x_t − √(1−ᾱ) v
        return self.extract("sqrt_alphas_cumprod", t, x_t) * x_t - self.extract("sqrt_one_minus_alphas_cumprod", t, x_t) * v

    def v_target(self, x0, t, noise):
        return self.extract("sqrt_alphas_cumprod", t, x0) * noise - self.extract("sqrt_one_minus_alphas_cumprod", t, x0) * x0

    # ------------------------------------------------------------------ reverse process
    def model_output_channels(self, data_channels: int) -> int:
        """How many channels the network must output: 2C when it also predicts a variance."""
        return 2 * data_channels if self.var_type.learned else data_channels

    def p_mean_variance(self, model: Model, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
                        model_output: Optional[torch.Tensor] = None) -> dict:
        """p_θ(x_{t-1} | x_t) = N(μ_θ(x_t, t), σ_t² I) for t ≥ 1 (docs/MATH.md § Reverse process).

        :param model_output: the network's output for (x_t, t), if already computed.
        :return: dict(mean, variance, log_variance, pred_x0, model_output), each [B, C, H, W].
        """
        if model_output is None:
            model_output = model(x_t, t)
        # A bf16 network output is brought back to x_t's dtype before any formula touches it.
        model_output = model_output.to(x_t.dtype)
        B, C = x_t.shape[:2]
        if self.var_type.learned:
            assert model_output.shape[1] == 2 * C, f"a learned variance needs {2 * C} output channels, got {model_output.shape[1]}"
            out, var_out = model_output.split(C, dim=1)
            if self.var_type is VarType.LEARNED:
                log_variance = var_out
            else:  # Nichol & Dhariwal eq. 15: interpolate between log β̃_t and log β_t
                frac = (var_out + 1) / 2
                min_log = self.extract("posterior_log_variance_clipped", t, x_t)
                max_log = self.extract("betas", t, x_t).log()
                log_variance = frac * max_log + (1 - frac) * min_log
            variance = log_variance.exp()
        else:
            assert model_output.shape[1] == C, f"a fixed variance needs {C} output channels, got {model_output.shape[1]}"
            out = model_output
            var_name, log_var_name = {
                VarType.FIXEDLARGE: ("fixedlarge_variance", "fixedlarge_log_variance"),
                VarType.FIXEDSMALL: ("posterior_variance", "posterior_log_variance_clipped"),
            }[self.var_type]
            variance = self.extract(var_name, t, x_t).expand_as(x_t)
            log_variance = self.extract(log_var_name, t, x_t).expand_as(x_t)

        maybe_clip = (lambda x: x.clamp(-1.0, 1.0)) if clip_denoised else (lambda x: x)
        if self.mean_type is MeanType.XPREV:
            pred_x0 = maybe_clip(self.predict_x0_from_xprev(x_t, t, out))
            mean = out
        else:
            if self.mean_type is MeanType.EPS:
                pred_x0 = self.predict_x0_from_eps(x_t, t, out)
            elif self.mean_type is MeanType.X0:
                pred_x0 = out
            else:
                pred_x0 = self.predict_x0_from_v(x_t, t, out)
            pred_x0 = maybe_clip(pred_x0)
            mean, _, _ = self.q_posterior_mean_variance(pred_x0, x_t, t)
        return dict(mean=mean, variance=variance, log_variance=log_variance, pred_x0=pred_x0, model_output=model_output)

    # ------------------------------------------------------------------ losses
    def vb_terms_bpd(self, model: Model, x0, x_t, t, clip_denoised: bool = True, model_output=None) -> dict:
        """The term L_{t-1} of the bound (eq. 5) in bits/dim, for t ≥ 1: KL(q(x_{t-1}|x_t,x_0) ‖
        p_θ(x_{t-1}|x_t)) for t > 1, the discretized decoder −log p_θ(x_0 | x_1) (eq. 13) at t = 1.
        -> dict(output=[B], pred_x0, out)."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised, model_output=model_output)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / np.log(2.0)
        decoder_nll = -mean_flat(discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])) / np.log(2.0)
        return dict(output=torch.where(t == 1, decoder_nll, kl), pred_x0=out["pred_x0"], out=out)

    def training_losses(self, model: Model, x0: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None,
                        mse_weight: Optional[torch.Tensor] = None) -> dict:
        """Per-example training loss at t ∈ 1 … T (Algorithm 1 for 'mse') -> dict(loss=[B], and its parts).

        'mse': L_simple = ‖target − network(x_t, t)‖², mean over pixels, target ε / x_0 / μ̃ / v.
        'kl': the term of the true bound at t in bits/dim (unclipped x̂_0, as the official code).
        'hybrid': L_simple + λ·T·L_{t-1} with the mean detached inside the bound (Nichol & Dhariwal).

        :param mse_weight: [B], a weight per example on the L_simple term only (process/weighting.py,
            docs/MATH.md § Weighting the times); not with 'kl', whose bound is a fixed objective.
        """
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.q_sample(x0, t, noise)
        if self.loss_type is LossType.KL:
            if mse_weight is not None:
                raise UserError("loss_type='kl' trains the bound, which has no L_simple term to weight; "
                                "use loss_type='mse' or 'hybrid' with a loss weight, or no weight")
            vb = self.vb_terms_bpd(model, x0, x_t, t, clip_denoised=False)["output"]
            return dict(loss=vb, vb=vb)
        model_output = model(x_t, t)
        C = x0.shape[1]
        if self.mean_type is MeanType.EPS:
            target = noise
        elif self.mean_type is MeanType.X0:
            target = x0
        elif self.mean_type is MeanType.XPREV:
            target = self.q_posterior_mean_variance(x0, x_t, t)[0]
        else:
            target = self.v_target(x0, t, noise)
        mse = mean_flat((target - model_output[:, :C].to(target.dtype)) ** 2)
        if mse_weight is not None:
            mse = mse * mse_weight.to(mse.dtype)
        if self.loss_type is LossType.MSE:
            return dict(loss=mse, mse=mse)
        # hybrid: the bound only trains the variance; the mean's gradient comes from L_simple alone.
        frozen = torch.cat([model_output[:, :C].detach(), model_output[:, C:]], dim=1)
        vb = self.vb_terms_bpd(model, x0, x_t, t, clip_denoised=False, model_output=frozen)["output"]
        return dict(loss=mse + self.hybrid_lambda * self.num_timesteps * vb, mse=mse, vb=vb)

    def prior_bpd(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x_0) ‖ N(0, I)) in bits/dim, [B]. No parameters; ≈ 0 for the paper's schedule."""
        t = torch.full((x0.shape[0],), self.num_timesteps, device=x0.device, dtype=torch.long)
        mean, _, log_variance = self.q_mean_variance(x0, t)
        return mean_flat(normal_kl(mean, log_variance, 0.0, 0.0)) / np.log(2.0)

    @torch.no_grad()
    def calc_bpd_loop(self, model: Model, x0: torch.Tensor, clip_denoised: bool = True,
                      noise_fn: Optional[NoiseFn] = None, progress: Optional[Progress] = None) -> dict:
        """Bits/dim of the full bound, L_T + Σ_{t>1} L_{t-1} + L_0 (eq. 5), with fresh noise at each t.

        t is visited from T down to 1 (the official order; `noise_fn` is called once per t, in that
        order). -> dict(total_bpd [B], prior_bpd [B], vb [B, T] (column k holds L_k, computed at
        t = k + 1), mse [B, T] (ε), x0_mse [B, T]).
        """
        B, T = x0.shape[0], self.num_timesteps
        noise_fn = noise_fn or (lambda shape: torch.randn(shape, device=x0.device, dtype=x0.dtype))
        vb, mse, x0_mse = (torch.zeros(B, T, device=x0.device, dtype=torch.float32) for _ in range(3))
        times = range(T, 0, -1)
        for t_int in (progress(times) if progress else times):
            t = torch.full((B,), t_int, device=x0.device, dtype=torch.long)
            noise = noise_fn(x0.shape)
            x_t = self.q_sample(x0, t, noise)
            terms = self.vb_terms_bpd(model, x0, x_t, t, clip_denoised=clip_denoised)
            vb[:, t_int - 1] = terms["output"]
            x0_mse[:, t_int - 1] = mean_flat((terms["pred_x0"] - x0) ** 2)
            eps = self.predict_eps_from_x0(x_t, t, terms["pred_x0"])
            mse[:, t_int - 1] = mean_flat((eps - noise) ** 2)
            threads.adapt()
        prior = self.prior_bpd(x0)
        return dict(total_bpd=vb.sum(dim=1) + prior, prior_bpd=prior, vb=vb, mse=mse, x0_mse=x0_mse)

    # ------------------------------------------------------------------ sampling
    def p_sample(self, model: Model, x_t: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
                 noise: Optional[torch.Tensor] = None) -> dict:
        """One step of Algorithm 2, x_t -> x_{t-1} = μ_θ(x_t, t) + σ_t z, with z = 0 at t = 1.
        -> dict(sample, pred_x0)."""
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised)
        if noise is None:
            noise = torch.randn_like(x_t)
        nonzero = (t > 1).to(x_t.dtype).view(-1, *([1] * (x_t.ndim - 1)))
        return dict(sample=out["mean"] + nonzero * (0.5 * out["log_variance"]).exp() * noise, pred_x0=out["pred_x0"])

    def ddim_step(self, model: Model, x_t: torch.Tensor, t: torch.Tensor, t_next: int, eta: float = 0.0,
                  clip_denoised: bool = True, noise: Optional[torch.Tensor] = None) -> dict:
        """One DDIM step from t to t_next < t (Song et al. 2021, eq. 12); η = 1 is ancestral-like,
        η = 0 deterministic. t_next = 0 goes to the data (ᾱ_0 = 1), without noise."""
        out = self.p_mean_variance(model, x_t, t, clip_denoised=clip_denoised)
        eps = self.predict_eps_from_x0(x_t, t, out["pred_x0"])
        a_t = self.extract("alphas_cumprod", t, x_t)
        a_next = self.extract("alphas_cumprod", torch.full_like(t, t_next), x_t)
        sigma = eta * ((1 - a_next) / (1 - a_t)).sqrt() * (1 - a_t / a_next).sqrt()
        mean = out["pred_x0"] * a_next.sqrt() + (1 - a_next - sigma**2).clamp(min=0).sqrt() * eps
        if noise is None:
            noise = torch.randn_like(x_t)
        nonzero = float(t_next > 0)
        return dict(sample=mean + nonzero * sigma * noise, pred_x0=out["pred_x0"])

    @torch.no_grad()
    def reverse_loop(self, model: Model, x: torch.Tensor, times: Sequence[int], step: "Step",
                     noise_fn: Optional[NoiseFn] = None, progress: Optional[Progress] = None,
                     callback: Optional[Callable[[int, dict], None]] = None) -> torch.Tensor:
        """The one reverse loop every sampler shares: x is at times[0]; each step takes it from
        times[i] to times[i + 1] (a descending chain of paper times, e.g. T, T−1, …, 0 for Algorithm
        2), and the result is x at times[-1]. `step` is an `AncestralStep`, a `DDIMStep` or a solver of
        `process.solvers`; `step.begin(times)` checks the chain first and starts its history.
        `noise_fn(shape)` supplies z, once per step, for a step that draws noise (`step.draws_noise`;
        inject a per-image RNG there); `callback(t, out)` sees each step's dict (progressive
        generation reads out["pred_x0"])."""
        ts = [check_time(t, self.num_timesteps, "time") for t in times]
        if not ts or any(a <= b for a, b in zip(ts, ts[1:])):
            raise UserError(f"a reverse chain's times must be strictly decreasing, got {ts[:5]}{'…' if len(ts) > 5 else ''}")
        step.begin(ts)
        noise_fn = noise_fn or (lambda shape: torch.randn(shape, device=x.device, dtype=x.dtype))
        pairs = range(len(ts) - 1)
        for i in (progress(pairs) if progress else pairs):
            t_int, t_next = ts[i], ts[i + 1]
            t = torch.full((x.shape[0],), t_int, device=x.device, dtype=torch.long)
            out = step(model, x, t, t_next, noise_fn(x.shape) if step.draws_noise else None)
            if callback is not None:
                callback(t_int, out)
            x = out["sample"]
            threads.adapt()  # fewer CPU threads while other programs use the cores (ddpm/threads.py)
        return x

    def ancestral(self, clip_denoised: bool = True) -> "AncestralStep":
        return AncestralStep(self, clip_denoised)

    def ddim(self, eta: float = 0.0, clip_denoised: bool = True) -> "DDIMStep":
        return DDIMStep(self, eta, clip_denoised)

    def p_sample_loop(self, model: Model, shape=None, *, x_t: Optional[torch.Tensor] = None, t: Optional[int] = None,
                      noise_fn: Optional[NoiseFn] = None, device=None, clip_denoised: bool = True,
                      progress: Optional[Progress] = None, callback=None) -> torch.Tensor:
        """Algorithm 2: x_T ~ N(0, I), then T ancestral steps down to x_0 -> [B, C, H, W].

        Started from a given x_t at time t (default T) instead, it runs the t steps t, …, 1 of the
        same chain; t = 0 returns x_t unchanged.
        """
        t = self.num_timesteps if t is None else check_time(t, self.num_timesteps)
        if x_t is None:
            x_t = noise_fn(torch.Size(shape)) if noise_fn is not None else torch.randn(*shape, device=device)
        return self.reverse_loop(model, x_t, range(t, -1, -1), self.ancestral(clip_denoised), noise_fn=noise_fn,
                                 progress=progress, callback=callback)


class Step(Protocol):
    """One move of the reverse loop, from time t to t_next < t."""

    draws_noise: bool  # whether it uses the z it is given (else it gets None, and nothing is drawn)

    def begin(self, times: Sequence[int]) -> None:
        """Refuse (UserError) a chain of times this step cannot walk; start a new chain (a multistep
        solver forgets its history)."""

    def __call__(self, model: Model, x: torch.Tensor, t: torch.Tensor, t_next: int, noise: torch.Tensor) -> dict:
        """-> dict(sample=x at t_next, pred_x0=the x̂_0 predicted from x at t)."""


class AncestralStep:
    """Algorithm 2's step: x_t -> x_{t-1}. It only walks consecutive times."""

    draws_noise = True

    def __init__(self, diffusion: GaussianDiffusion, clip_denoised: bool = True):
        self.diffusion, self.clip_denoised = diffusion, clip_denoised

    def begin(self, times: Sequence[int]) -> None:
        gaps = [(a, b) for a, b in zip(times, times[1:]) if a - b != 1]
        if gaps:
            a, b = gaps[0]
            raise UserError(f"Algorithm 2's ancestral step goes from t to t - 1, but this chain jumps from t={a} to "
                            f"t={b}; respaced chains need the DDIM step (sampler='ddim')")

    def __call__(self, model, x, t, t_next, noise):
        return self.diffusion.p_sample(model, x, t, clip_denoised=self.clip_denoised, noise=noise)


class DDIMStep:
    """DDIM's step (Song et al. 2021, eq. 12) from t to any t_next < t; η scales its noise."""

    def __init__(self, diffusion: GaussianDiffusion, eta: float = 0.0, clip_denoised: bool = True):
        if not (isinstance(eta, (int, float)) and math.isfinite(eta) and eta >= 0):
            raise UserError(f"DDIM eta={eta!r} must be a finite number >= 0 (0: deterministic, 1: as Algorithm 2's noise)")
        self.diffusion, self.eta, self.clip_denoised = diffusion, float(eta), clip_denoised
        self.draws_noise = self.eta > 0  # η = 0 adds σ z with σ = 0: no z is drawn

    def begin(self, times: Sequence[int]) -> None:
        pass  # any descending chain

    def __call__(self, model, x, t, t_next, noise):
        if noise is None:  # η = 0: σ = 0, so any z adds nothing; a zero keeps the global generator untouched
            noise = x.new_zeros(())
        return self.diffusion.ddim_step(model, x, t, t_next, eta=self.eta, clip_denoised=self.clip_denoised, noise=noise)
