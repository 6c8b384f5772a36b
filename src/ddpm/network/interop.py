"""Weights in and out: diffusers' UNet2DModel and the official TensorFlow variable names.

Three layouts of the same network (unet.py's `UNet`):
- `ddpm`: our state dict. Its names mirror the TF scopes, `down.0.block.1.conv1.weight`, and
  are those of the PyTorch ports of the release (pesser/pytorch_diffusion, ermongroup/ddim).
- `diffusers`: `UNet2DModel` with the DDPM layout of google/ddpm-cifar10-32 and
  google/ddpm-{church,bedroom,cat,celebahq}-256: `down_blocks.0.resnets.1.conv1.weight`, and the
  up path numbered from the deepest level.
- `tf`: the official checkpoint's variable names, `model/down_0/block_1/conv1/W`, with TF's
  layouts: conv W [kh, kw, in, out], dense and 1x1 "nin" W [in, out], GroupNorm gamma/beta.

The layouts correspond one to one, so conversion is a rename plus transposes and outputs agree
to float rounding. A class-conditional network's K + 1 class embeddings (the last: no class) are
diffusers' `class_embedding` with `num_class_embeds = K + 1`; the official TF code had no classes,
so the `tf` layout holds unconditional networks only. Every function here works on state dicts without importing diffusers; only
`unet_to_diffusers`, which returns a diffusers model, needs it.

Reading and writing files of these layouts is io/weights.py's (`ddpm convert`).
"""

from __future__ import annotations

import re
from typing import Mapping

import torch
import torch.nn as nn

from ..config import get_field, parse_size, size_value
from ..errors import UserError
from ..network.unet import GROUPS, NORM_EPS, UNet, UNetConfig
from ..process.diffusion import DiffusionConfig
from ..process.grids import Spacing
from ..process.sampling import Sampler, SamplerSpec


# ---------------------------------------------------------------------------------------------
# diffusers config <-> UNetConfig
# ---------------------------------------------------------------------------------------------

# UNet2DModel's own defaults (diffusers 0.42) for the fields we check: a config.json leaves out
# the fields that had their default value, and diffusers fills them in when it loads.
DIFFUSERS_DEFAULTS = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896), "layers_per_block": 2, "mid_block_scale_factor": 1,
    "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv", "dropout": 0.0,
    "act_fn": "silu", "attention_head_dim": 8, "norm_num_groups": 32, "attn_norm_num_groups": None,
    "norm_eps": 1e-5, "resnet_time_scale_shift": "default", "add_attention": True,
    "class_embed_type": None, "num_class_embeds": None,
}


def diffusers_config(cfg: UNetConfig) -> dict:
    """The UNet2DModel config of the same network (the layout of google/ddpm-cifar10-32)."""
    if cfg.ch_mult[0] != 1:
        # diffusers' conv_in outputs block_out_channels[0]; the official conv_in outputs ch.
        raise UserError(f"ch_mult={cfg.ch_mult}: diffusers' UNet2DModel needs ch_mult[0] == 1 to hold this network")
    if not cfg.resamp_with_conv:
        raise UserError("resamp_with_conv=False: diffusers' UNet2DModel has no avg-pool/no-conv resampling in this layout")
    attn = [r in cfg.attn_resolutions for r in cfg.level_resolutions()]
    return {
        "sample_size": cfg.size[0] if cfg.size[0] == cfg.size[1] else list(cfg.size),
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "layers_per_block": cfg.num_res_blocks,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "mid_block_type": "UNetMidBlock2D",
        "norm_eps": NORM_EPS,
        "norm_num_groups": GROUPS,
        "downsample_padding": 0,  # diffusers then pads right/bottom by 1: TF "SAME"
        "flip_sin_to_cos": False,  # [sin, cos], as the paper's code
        "freq_shift": 1,  # divides ln(1e4) by (half - 1), as the paper's code
        "act_fn": "silu",
        "attention_head_dim": None,  # one head as wide as the block
        "resnet_time_scale_shift": "default",
        "time_embedding_type": "positional",
        "center_input_sample": False,
        "add_attention": True,
        "dropout": cfg.dropout,
        "class_embed_type": None,
        "num_class_embeds": cfg.num_classes + 1 if cfg.num_classes else None,  # the last row: no class
    }


_POSITIVE = (lambda v: v >= 1, "an integer >= 1")
_TYPE_NAMES = (lambda v: len(v) >= 1 and all(isinstance(t, str) for t in v), "a list of block type names")
_WIDTHS = (lambda v: len(v) >= 1 and all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in v),
           "a list of positive integers")
_LIST = (list, tuple)  # a diffusers `model.config` holds tuples where its config.json holds lists
_UNET_TYPES = {  # the fields read as numbers or lists below: (kind, check, what it must be)
    "block_out_channels": (_LIST,) + _WIDTHS, "down_block_types": (_LIST,) + _TYPE_NAMES,
    "up_block_types": (_LIST,) + _TYPE_NAMES, "sample_size": ((int,) + _LIST, None, "an integer or [height, width]"),
    "in_channels": (int,) + _POSITIVE, "out_channels": (int,) + _POSITIVE, "layers_per_block": (int,) + _POSITIVE,
    "attention_head_dim": ((int, type(None)), lambda v: v is None or v >= 1, "null or an integer >= 1"),
    "dropout": ((float, type(None)), None, ""), "norm_eps": (float, None, ""),
}
_SCHEDULER_TYPES = {
    "num_train_timesteps": (int,) + _POSITIVE, "beta_start": (float, None, ""), "beta_end": (float, None, ""),
    "beta_schedule": (str, None, ""), "prediction_type": (str, None, ""), "variance_type": (str, None, ""),
}


def _check_types(d: Mapping, schema: dict, where: str) -> None:
    """The fields of `schema` that `d` holds have the JSON kinds they must have: one line naming
    `where`, the field and its value otherwise (config.get_field)."""
    for key, (kind, ok, need) in schema.items():
        get_field(d, key, kind, where, ok=ok, need=need, default=None,
                  advice="fix it, or export the model again")


def config_from_diffusers(d: Mapping, where: str = "diffusers config") -> UNetConfig:
    """The UNetConfig of a UNet2DModel config (a `model.config` or a config.json dict).

    Refuses, naming the field, any config that is not the DDPM layout (a different time
    embedding, padding, norm, head count...), since its weights would load but compute another
    function.
    """
    _check_types(d, _UNET_TYPES, where)
    get = lambda k: d.get(k, DIFFUSERS_DEFAULTS.get(k))  # noqa: E731
    expect = {
        "flip_sin_to_cos": False, "freq_shift": 1, "downsample_padding": 0, "norm_num_groups": GROUPS,
        "resnet_time_scale_shift": "default", "time_embedding_type": "positional",
        "center_input_sample": False, "add_attention": True, "mid_block_type": "UNetMidBlock2D",
        "mid_block_scale_factor": 1, "downsample_type": "conv", "upsample_type": "conv",
        "class_embed_type": None,
    }
    for k, want in expect.items():
        if get(k) != want:
            raise UserError(f"diffusers config {k}={get(k)!r} is not the DDPM layout (needs {want!r})")
    if get("act_fn") not in ("silu", "swish"):
        raise UserError(f"diffusers config act_fn={get('act_fn')!r} is not the DDPM layout (needs 'silu')")
    if abs(float(get("norm_eps")) - NORM_EPS) > 1e-12:
        raise UserError(f"diffusers config norm_eps={get('norm_eps')!r} is not the DDPM layout (needs {NORM_EPS})")
    n_embeds = get("num_class_embeds")
    if n_embeds is not None and (isinstance(n_embeds, bool) or not isinstance(n_embeds, int) or n_embeds < 2):
        raise UserError(f"diffusers config num_class_embeds={n_embeds!r}: ddpm reads K classes plus a last "
                        f"'no class' embedding, so it needs None or an integer >= 2")
    if get("attn_norm_num_groups") not in (None, GROUPS):
        raise UserError(f"diffusers config attn_norm_num_groups={get('attn_norm_num_groups')!r} must be None or {GROUPS}")

    widths = [int(c) for c in get("block_out_channels")]
    ch = widths[0]
    if any(w % ch for w in widths):
        raise UserError(f"diffusers config block_out_channels={widths}: every width must be a multiple of the first")
    if get("time_embedding_dim") not in (None, 4 * ch):
        raise UserError(f"diffusers config time_embedding_dim={get('time_embedding_dim')!r} must be None or {4 * ch}")
    down, up = list(get("down_block_types")), list(get("up_block_types"))
    if len(down) != len(widths) or any(t not in ("DownBlock2D", "AttnDownBlock2D") for t in down):
        raise UserError(f"diffusers config down_block_types={down}: need one DownBlock2D/AttnDownBlock2D per width")
    mirrored = [t.replace("Down", "Up") for t in reversed(down)]
    if up != mirrored:
        raise UserError(f"diffusers config up_block_types={up}: the DDPM layout mirrors the down path: {mirrored}")

    size = get("sample_size")
    if size is None:
        raise UserError("diffusers config has no sample_size; the attention placement needs the resolution")
    hw = parse_size(list(size) if isinstance(size, (list, tuple)) else int(size), "diffusers config sample_size")
    size = min(hw)  # attention is placed by the shorter side (UNetConfig.level_resolutions)
    attn_levels = [i for i, t in enumerate(down) if t.startswith("Attn")]
    head_dim = get("attention_head_dim")
    if head_dim is not None:  # must still mean one head at every attention (and the middle)
        for w in [widths[i] for i in attn_levels] + [widths[-1]]:
            if w // int(head_dim) != 1:
                raise UserError(f"diffusers config attention_head_dim={head_dim} gives {w // int(head_dim)} heads "
                                f"at width {w}; the DDPM layout has one head (attention_head_dim=None)")
    return UNetConfig(
        in_channels=int(get("in_channels")), out_channels=int(get("out_channels")), ch=ch,
        ch_mult=tuple(w // ch for w in widths), num_res_blocks=int(get("layers_per_block")),
        attn_resolutions=tuple(size // 2**i for i in attn_levels), dropout=float(get("dropout") or 0.0),
        resamp_with_conv=True, resolution=size_value(hw), num_classes=n_embeds - 1 if n_embeds else 0,
    )


# ---------------------------------------------------------------------------------------------
# The process: DiffusionConfig -> diffusers' DDPMScheduler config
# ---------------------------------------------------------------------------------------------

_PREDICTION = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
_VARIANCE = {"fixedlarge": "fixed_large", "fixedsmall": "fixed_small", "learned": "learned",
             "learned_range": "learned_range"}


def diffusers_scheduler_config(cfg: DiffusionConfig) -> dict:
    """The DDPMScheduler config whose `step` is Algorithm 2 with this process and parametrisation.

    The β's: "linear" by name (diffusers computes the same linspace, in float32), any other
    schedule as `trained_betas`, its β's listed. x̂_0 is clipped to [-1, 1], as `ddpm sample` does.
    What diffusers cannot say: a network predicting the posterior mean ('xprev') is refused; the
    fixedlarge log-variance at t = 1 (log β̃_2, for the decoder's likelihood) has no counterpart,
    but the last step adds no noise, so samples do not depend on it.
    """
    if cfg.mean_type.value not in _PREDICTION:
        raise UserError(f"diffusion.mean_type={cfg.mean_type.value!r}: diffusers' DDPMScheduler has no prediction "
                        f"type for a network that predicts the posterior mean; it takes eps, x0 or v")
    linear = cfg.schedule.value == "linear"
    return {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": cfg.T,
        "beta_start": float(cfg.beta_start),
        "beta_end": float(cfg.beta_end),
        "beta_schedule": "linear",
        "trained_betas": None if linear else [float(b) for b in cfg.betas()],
        "variance_type": _VARIANCE[cfg.var_type.value],
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "prediction_type": _PREDICTION[cfg.mean_type.value],
        "thresholding": False,
        "timestep_spacing": "leading",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }


def diffusion_from_diffusers_scheduler(d: Mapping, where: str = "diffusers scheduler config") -> DiffusionConfig:
    """The DiffusionConfig of a DDPMScheduler config with a linear schedule (what `ddpm_config.json`
    does not already say, for a pipeline folder that ddpm did not write)."""
    _check_types(d, _SCHEDULER_TYPES, where)
    if d.get("trained_betas") is not None or d.get("beta_schedule", "linear") != "linear":
        raise UserError(f"diffusers scheduler beta_schedule={d.get('beta_schedule')!r} (trained_betas "
                        f"{'given' if d.get('trained_betas') is not None else 'none'}): ddpm reads the linear "
                        f"schedule from a scheduler config; pipelines that ddpm exported carry ddpm_config.json")
    pred = {v: k for k, v in _PREDICTION.items()}.get(d.get("prediction_type", "epsilon"))
    var = {v: k for k, v in _VARIANCE.items()}.get(d.get("variance_type", "fixed_small"))
    if pred is None or var is None or d.get("thresholding") or not d.get("clip_sample", True):
        raise UserError(f"diffusers scheduler prediction_type={d.get('prediction_type')!r}, variance_type="
                        f"{d.get('variance_type')!r}, thresholding={d.get('thresholding')!r}, clip_sample="
                        f"{d.get('clip_sample')!r}: not a process ddpm samples")
    return DiffusionConfig(T=int(d.get("num_train_timesteps", 1000)), beta_start=float(d.get("beta_start", 1e-4)),
                           beta_end=float(d.get("beta_end", 0.02)), mean_type=pred, var_type=var,
                           loss_type="hybrid" if var.startswith("learned") else "mse")


def diffusers_sampler_config(cfg: DiffusionConfig, sampler: SamplerSpec) -> tuple[dict, int]:
    """The diffusers scheduler config that samples as `sampler` does, and the `num_inference_steps`
    to call the pipeline with: (config with its "_class_name", steps).

    Algorithm 2 is `diffusers_scheduler_config`'s DDPMScheduler. The others, with the options that
    equal ours (tests/test_solvers.py drives each on our grid and compares the chains):
    ddim → DDIMScheduler (η is DDIMPipeline's `eta`); dpm++2m / dpm++2m-sde → DPMSolverMultistepScheduler,
    algorithm_type "dpmsolver++" / "sde-dpmsolver++", order 2, "midpoint", final_sigmas_type "zero".
    Clipping x̂_0 to [-1, 1] is `clip_sample` for DDIM, and for DPM-Solver dynamic thresholding at
    ratio 1 with sample_max_value 1, which clips to [-1, 1]. The grids: uniform is DDIM's "leading" (steps_offset
    0), trailing is "trailing" for all, logsnr is DPM-Solver's `use_lu_lambdas`, karras is
    `use_karras_sigmas` (there diffusers keeps the continuous σ in the update while the network sees
    the rounded time: samples differ from ours by the rounding). What diffusers cannot say is refused:
    the multistep schedulers' "leading" is T // (N + 1) apart, not our uniform grid; no scheduler has
    our quad grid; heun needs the model input scaled, which DDPMPipeline does not do, and UniPC's
    `step` takes no generator, which DDPMPipeline passes (its scheduler equals ours all the same:
    UniPCMultistepScheduler, "bh2", order 2, predict_x0, for users who drive it themselves).
    """
    base = diffusers_scheduler_config(cfg)
    if sampler.sampler is Sampler.ANCESTRAL:
        return base, cfg.T
    common = {k: base[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                                   "prediction_type")}
    spacing, name = Spacing.parse(sampler.spacing, "spacing"), sampler.sampler.value
    grids = (Spacing.UNIFORM, Spacing.TRAILING) if sampler.sampler is Sampler.DDIM else \
        (Spacing.TRAILING, Spacing.LOGSNR, Spacing.KARRAS)
    if sampler.sampler is Sampler.HEUN:
        raise UserError("--sampler heun: diffusers' DDPMPipeline does not scale the model input as HeunDiscreteScheduler "
                        "needs; export with dpm++2m, dpm++2m-sde or ddim")
    if sampler.sampler is Sampler.UNIPC:
        raise UserError("--sampler unipc: diffusers' DDPMPipeline passes a generator that UniPCMultistepScheduler.step "
                        "does not take; export with dpm++2m, dpm++2m-sde or ddim")
    if spacing not in grids:
        raise UserError(f"--spacing {spacing.value} with --sampler {name}: diffusers' scheduler has no such grid; use "
                        f"{' or '.join(g.value for g in grids)}")
    grid = {Spacing.UNIFORM: dict(timestep_spacing="leading", steps_offset=0),
            Spacing.TRAILING: dict(timestep_spacing="trailing"),
            Spacing.LOGSNR: dict(use_lu_lambdas=True), Spacing.KARRAS: dict(use_karras_sigmas=True)}[spacing]
    clip = sampler.clip_denoised
    if sampler.sampler is Sampler.DDIM:
        conf = dict(_class_name="DDIMScheduler", clip_sample=clip, clip_sample_range=1.0, set_alpha_to_one=True,
                    thresholding=False)
    else:
        conf = dict(_class_name="DPMSolverMultistepScheduler", solver_order=2, solver_type="midpoint",
                    algorithm_type="sde-dpmsolver++" if sampler.sampler is Sampler.DPMPP_2M_SDE else "dpmsolver++",
                    variance_type=cfg.var_type.value if cfg.var_type.learned else None, lower_order_final=True,
                    final_sigmas_type="zero", thresholding=clip, dynamic_thresholding_ratio=1.0, sample_max_value=1.0)
    return {**conf, **common, **grid}, sampler.steps


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------

_RES = {"norm1": "norm1", "conv1": "conv1", "temb_proj": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
        "nin_shortcut": "conv_shortcut"}
_ATT = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def _diffusers_name(name: str, levels: int) -> str:
    """Our parameter name -> UNet2DModel's. The up path is numbered from the deepest level there."""
    top = {"temb.dense.0": "time_embedding.linear_1", "temb.dense.1": "time_embedding.linear_2",
           "conv_in": "conv_in", "norm_out": "conv_norm_out", "conv_out": "conv_out", "label_emb": "class_embedding"}
    module, param = name.rsplit(".", 1)
    if module in top:
        return f"{top[module]}.{param}"
    if m := re.fullmatch(r"mid\.(block_1|attn_1|block_2)\.(\w+)", module):
        part, leaf = m.groups()
        inner = {"block_1": "resnets.0", "attn_1": "attentions.0", "block_2": "resnets.1"}[part]
        return f"mid_block.{inner}.{(_ATT if part == 'attn_1' else _RES)[leaf]}.{param}"
    if m := re.fullmatch(r"(down|up)\.(\d+)\.(block|attn)\.(\d+)\.(\w+)", module):
        path, i, kind, j, leaf = m.groups()
        i = int(i) if path == "down" else levels - 1 - int(i)
        inner = "resnets" if kind == "block" else "attentions"
        return f"{path}_blocks.{i}.{inner}.{j}.{(_RES if kind == 'block' else _ATT)[leaf]}.{param}"
    if m := re.fullmatch(r"down\.(\d+)\.downsample\.conv", module):
        return f"down_blocks.{m.group(1)}.downsamplers.0.conv.{param}"
    if m := re.fullmatch(r"up\.(\d+)\.upsample\.conv", module):
        return f"up_blocks.{levels - 1 - int(m.group(1))}.upsamplers.0.conv.{param}"
    raise AssertionError(f"no diffusers name for {name}")  # a parameter unet.py added without a mapping


def _tf_name(name: str, is_norm: bool) -> str:
    """Our parameter name -> the official TF variable name, e.g. model/down_0/block_1/conv1/W."""
    module, param = name.rsplit(".", 1)
    module = re.sub(r"\b(down|up|block|attn)\.(\d+)\b", r"\1_\2", module)
    module = re.sub(r"\bdense\.(\d+)\b", r"dense\1", module).replace(".", "/")  # temb.dense.0 -> temb/dense0
    leaf = {"weight": "gamma", "bias": "beta"}[param] if is_norm else {"weight": "W", "bias": "b"}[param]
    return f"model/{module}/{leaf}"


def meta_unet(cfg: UNetConfig) -> UNet:
    # Built on the meta device: no time spent on a random init that loading overwrites.
    with torch.device("meta"):
        return UNet.from_config(cfg)


def load_state(model: nn.Module, state: dict, where: str) -> nn.Module:
    """Assign `state` (already in `model`'s names and shapes) to a meta-device model, strictly."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise UserError(f"{where}: the weights do not fit the config: {'; '.join(parts)}; check the config")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise UserError(f"{where}: {k} has shape {tuple(state[k].shape)}, the config needs {tuple(v.shape)}; check the config")
    model.load_state_dict({k: v.contiguous().clone() for k, v in state.items()}, strict=True, assign=True)
    return model


# ---------------------------------------------------------------------------------------------
# diffusers
# ---------------------------------------------------------------------------------------------


def to_diffusers_state_dict(unet: UNet) -> dict[str, torch.Tensor]:
    """Our weights under UNet2DModel's names; attention 1x1 convs become Linear [out, in]."""
    levels = len(unet.config.ch_mult)
    diffusers_config(unet.config)  # refuses networks diffusers cannot hold
    out = {}
    for k, v in unet.state_dict().items():
        dk = _diffusers_name(k, levels)
        if ".attentions." in dk and v.ndim == 4:
            v = v[:, :, 0, 0]  # [out, in, 1, 1] -> [out, in]
        out[dk] = v.detach().clone().contiguous()
    return out


def from_diffusers_state_dict(state: Mapping[str, torch.Tensor], cfg: UNetConfig, where: str = "diffusers weights") -> UNet:
    model = meta_unet(cfg)
    levels = len(cfg.ch_mult)
    ours = {}
    for k, target in model.state_dict().items():
        dk = _diffusers_name(k, levels)
        if dk not in state:
            raise UserError(f"{where}: no tensor {dk} (for {k}); the weights do not fit the config {cfg.to_dict()}")
        v = state[dk]
        if target.ndim == 4 and v.ndim == 2:
            v = v[:, :, None, None]  # Linear [out, in] -> 1x1 conv [out, in, 1, 1]
        ours[k] = v
    extra = sorted(set(state) - {_diffusers_name(k, levels) for k in ours})
    if extra:
        raise UserError(f"{where}: {len(extra)} tensors the config has no place for (e.g. {', '.join(extra[:3])}); check the config")
    return load_state(model, ours, where)


def unet_from_diffusers(model_or_state_dict, config: UNetConfig | Mapping | None = None) -> UNet:
    """A UNet from a diffusers UNet2DModel (its config is read) or a bare diffusers state dict.

    A state dict alone does not say the image size, which places the attention, so it needs
    `config`: a UNetConfig, or the diffusers config dict (config.json) it came with.
    """
    if hasattr(model_or_state_dict, "state_dict") and hasattr(model_or_state_dict, "config"):
        state = model_or_state_dict.state_dict()
        if config is None:
            config = dict(model_or_state_dict.config)
    else:
        state = model_or_state_dict
        if config is None:
            raise UserError("unet_from_diffusers: a bare state dict needs config= (a UNetConfig or the diffusers config.json dict)")
    cfg = config if isinstance(config, UNetConfig) else config_from_diffusers(config)
    return from_diffusers_state_dict(state, cfg)


def unet_to_diffusers(unet: UNet):
    """The same network as a diffusers `UNet2DModel` (needs the `diffusers` package)."""
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise UserError("unet_to_diffusers needs the diffusers package: pip install diffusers") from None
    with torch.device("meta"):
        model = UNet2DModel(**diffusers_config(unet.config))
    load_state(model, to_diffusers_state_dict(unet), "unet_to_diffusers")
    return model.train(unet.training)


# ---------------------------------------------------------------------------------------------
# Official TensorFlow names
# ---------------------------------------------------------------------------------------------


def _norm_params(model: nn.Module) -> set[str]:
    return {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, nn.GroupNorm) for p in ("weight", "bias")}


def _unconditional_only(cfg: UNetConfig) -> None:
    if cfg.num_classes:
        raise UserError(f"num_classes={cfg.num_classes}: the official TF code has no class conditioning, so its "
                        f"layout cannot hold this network; use the ddpm or diffusers layout")


def unet_to_tf_state_dict(unet: UNet) -> dict[str, torch.Tensor]:
    """Our weights under the official TF names and layouts (the inverse of unet_from_tf_state_dict)."""
    _unconditional_only(unet.config)
    norms = _norm_params(unet)
    out = {}
    for k, v in unet.state_dict().items():
        v = v.detach()
        if v.ndim == 4 and v.shape[2:] == (1, 1):  # every 1x1 conv here is a TF `nin`
            v = v[:, :, 0, 0].t()  # [out, in, 1, 1] -> [in, out]
        elif v.ndim == 4:
            v = v.permute(2, 3, 1, 0)  # conv: [out, in, kh, kw] -> [kh, kw, in, out]
        elif v.ndim == 2:
            v = v.t()  # dense: [out, in] -> [in, out]
        out[_tf_name(k, k in norms)] = v.contiguous().clone()
    return out


_TF_SLOTS = ("/ExponentialMovingAverage", "/Adam", "/Adam_1")  # per-variable copies in a TF checkpoint


def unet_from_tf_state_dict(state: Mapping[str, torch.Tensor], config: UNetConfig, ema: bool = True,
                            where: str = "tf weights") -> UNet:
    """A UNet from tensors named as in the official checkpoints (`model/down_0/block_0/conv1/W`).

    Layouts are TF's: conv W [kh, kw, in, out] -> [out, in, kh, kw]; dense W [in, out] -> [out, in];
    nin (q, k, v, proj_out, nin_shortcut) W [in, out] -> [out, in, 1, 1]. The `model/` prefix is
    optional. A dump of a whole TF checkpoint also works: with `ema` (the weights the paper
    evaluates) each variable's `.../ExponentialMovingAverage` copy is taken where there is one;
    Adam slots and variables outside `model/` (global_step...) are ignored.
    """
    _unconditional_only(config)
    if not any(k.startswith("model/") for k in state):
        state = {f"model/{k}": v for k, v in state.items()}
    model = meta_unet(config)
    norms = _norm_params(model)
    ours, names = {}, set()
    for k, target in model.state_dict().items():
        tk = _tf_name(k, k in norms)
        names.add(tk)
        if ema and f"{tk}/ExponentialMovingAverage" in state:
            tk = f"{tk}/ExponentialMovingAverage"
        if tk not in state:
            raise UserError(f"{where}: no tensor {tk} (for {k}); the weights do not fit the config {config.to_dict()}")
        v = torch.as_tensor(state[tk])
        if target.ndim == 4 and v.ndim == 2:
            v = v.t()[:, :, None, None]  # nin [in, out] -> [out, in, 1, 1]
        elif target.ndim == 4 and v.ndim == 4:
            v = v.permute(3, 2, 0, 1)  # [kh, kw, in, out] -> [out, in, kh, kw]
        elif target.ndim == 2 and v.ndim == 2:
            v = v.t()
        ours[k] = v
    base = lambda k: next((k[: -len(x)] for x in _TF_SLOTS if k.endswith(x)), k)  # noqa: E731
    extra = sorted(k for k in state if k.startswith("model/") and base(k) not in names)
    if extra:
        raise UserError(f"{where}: {len(extra)} tensors the config has no place for (e.g. {', '.join(extra[:3])}); check the config")
    return load_state(model, ours, where)
