"""The paper's U-Net (Ho et al. 2020, Appendix B; docs/MATH.md § Network), exactly as the authors' code.

A PixelCNN++-style Wide-ResNet U-Net with GroupNorm(32, eps 1e-6), swish, a sinusoidal time
embedding added into every ResBlock, and single-head self-attention at 16x16 and in the middle.
Module names mirror the official TensorFlow variable scopes (`down.0.block.1.conv1` is
`model/down_0/block_1/conv1`), so importing the released weights is a rename plus transposes
(see interop.py); they are exactly the names of the PyTorch ports of those weights
(pesser/pytorch_diffusion, ermongroup/ddim), so their state dicts load as they are.

Class conditioning (docs/MATH.md § Classes and guidance) is off by default (`num_classes=0`, the
paper's network, parameter for parameter). With K classes, a learned embedding of K + 1 rows (the
last is "no class", for classifier-free guidance) is added to the time embedding, after its MLP,
before any residual block: improved-diffusion's placement and diffusers' `num_class_embeds`.

The network knows nothing of beta or of what it predicts. For the `learned` variance type the
diffusion needs 2C output channels (the second half a log-variance): build it with
`out_channels=2 * in_channels`, e.g. `UNetConfig(out_channels=6)` (the training loop sets it from the data).

Reads top to bottom: the config, the layers, the network, then counting helpers. The fast paths
(Winograd, channels-last, compile, CUDA graphs) are applied to it from outside (fast.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ..config import MAX_CLASSES, Config, check_count, parse_size, size_value
from ..errors import UserError

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

GROUPS = 32  # GroupNorm groups, fixed by the paper (it replaced PixelCNN++'s weight norm)
NORM_EPS = 1e-6  # tf.contrib.layers.group_norm's default, which the official code used


@dataclass(frozen=True)
class UNetConfig(Config):
    in_channels: int = 3
    out_channels: int = 3  # 2 * in_channels for the `learned` variance type
    ch: int = 128  # base width; level i has ch * ch_mult[i] channels
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)  # level sizes (the shorter side, of `resolution`'s pyramid) with attention
    dropout: float = 0.1
    resamp_with_conv: bool = True  # strided conv / conv after upsampling, rather than avg-pool / nothing
    resolution: Union[int, str] = 32  # an int for square images (the paper's), or "HxW", e.g. "64x128"
    num_classes: int = 0  # 0: unconditional (the paper's); K: conditioned on a class 0 … K-1, or K = "no class"

    def validate(self) -> None:
        object.__setattr__(self, "resolution", size_value(parse_size(self.resolution, "UNetConfig.resolution")))
        for name in ("in_channels", "out_channels", "ch", "num_res_blocks"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise UserError(f"UNetConfig.{name}={v!r} must be a positive integer")
        if not isinstance(self.num_classes, int) or isinstance(self.num_classes, bool) or self.num_classes < 0:
            raise UserError(f"UNetConfig.num_classes={self.num_classes!r} must be an integer >= 0 (0: unconditional; "
                            f"K: the number of classes of the data)")
        check_count(self.num_classes, "UNetConfig.num_classes", MAX_CLASSES, least=0)
        if not self.ch_mult or any(not isinstance(m, int) or m < 1 for m in self.ch_mult):
            raise UserError(f"UNetConfig.ch_mult={self.ch_mult!r} must be a non-empty tuple of positive integers")
        if self.ch % GROUPS:
            # Every width in the network is a multiple of ch, so this keeps GroupNorm(32) valid
            # everywhere; the paper fixes 32 groups and we do not silently change the model.
            raise UserError(f"UNetConfig.ch={self.ch} must be a multiple of {GROUPS} (GroupNorm uses {GROUPS} groups)")
        levels = len(self.ch_mult)
        if any(side % 2 ** (levels - 1) for side in self.size):
            raise UserError(
                f"UNetConfig.resolution={self.resolution} must be divisible by 2**(len(ch_mult)-1)={2 ** (levels - 1)} "
                f"(both sides) so every downsample halves an even size; change resolution or ch_mult"
            )
        sizes = self.level_resolutions()
        for r in self.attn_resolutions:
            if r not in sizes:
                raise UserError(
                    f"UNetConfig.attn_resolutions contains {r}, which is no level's size; "
                    f"the levels are {', '.join(map(str, sizes))} (or use an empty tuple)"
                )
        if not 0.0 <= float(self.dropout) < 1.0:
            raise UserError(f"UNetConfig.dropout={self.dropout!r} must be in [0, 1)")

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the images."""
        return parse_size(self.resolution, "UNetConfig.resolution")

    @property
    def null_class(self) -> int:
        """The label that means "no class" (the last row of the class embedding): K."""
        return self.num_classes

    def level_resolutions(self) -> tuple[int, ...]:
        """Spatial size at each level, the shorter side for non-square images: resolution, resolution/2, ..."""
        return tuple(min(self.size) // 2**i for i in range(len(self.ch_mult)))


def config_from_dict(d, where: str = "config") -> UNetConfig:
    """A UNetConfig from its JSON dict, or from a checkpoint config that holds it under "model"."""
    if isinstance(d.get("model"), dict):
        d = d["model"]
    return UNetConfig.from_dict(d, where=where)


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


def default_init_(layer: nn.Module, scale: float = 1.0) -> nn.Module:
    """TF variance_scaling(scale, mode='fan_avg', distribution='uniform'), zero bias.

    The official code's `default_init`; scale 0 there means 1e-10 ("start near zero" without an
    exactly-zero weight). For a conv, fan_in = k*k*C_in and fan_out = k*k*C_out, as in TF and torch;
    an embedding [rows, dim] is a dense layer from a one-hot vector, and fan_avg is the same
    either way round.
    """
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(layer.weight)
    limit = math.sqrt(3.0 * scale / ((fan_in + fan_out) / 2.0))
    nn.init.uniform_(layer.weight, -limit, limit)
    if getattr(layer, "bias", None) is not None:
        nn.init.zeros_(layer.bias)
    return layer


def conv3x3(c_in: int, c_out: int, scale: float = 1.0) -> nn.Conv2d:
    return default_init_(nn.Conv2d(c_in, c_out, 3, padding=1), scale)


def nin(c_in: int, c_out: int, scale: float = 1.0) -> nn.Conv2d:
    """The official `nn.nin`: a dense layer over channels at every pixel, i.e. a 1x1 conv."""
    return default_init_(nn.Conv2d(c_in, c_out, 1), scale)


def dense(c_in: int, c_out: int, scale: float = 1.0) -> nn.Linear:
    return default_init_(nn.Linear(c_in, c_out), scale)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels, eps=NORM_EPS)


def timestep_embedding(n: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of an integer n (Transformer-style, as in tensor2tensor); the U-Net
    embeds n = t − 1 (docs/MATH.md § Network).

    half = dim // 2 frequencies f_k = exp(-k ln(10^4) / (half - 1)), k = 0..half-1; the vector is
    [sin(n f), cos(n f)] (sines first). n [B] -> [B, dim], float32.
    """
    t = n
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * -(math.log(10000.0) / (half - 1)))
    args = t.to(torch.float32)[:, None] * freqs[None, :]  # [B, half]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)  # [B, 2*half]
    if dim % 2:  # unused by the paper's widths; zero pad as the official code does
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """Wide-ResNet block with the time embedding added after the first conv (official `resnet_block`)."""

    def __init__(self, c_in: int, c_out: int, temb_ch: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(c_in)
        self.conv1 = conv3x3(c_in, c_out)
        self.temb_proj = dense(temb_ch, c_out)
        self.norm2 = group_norm(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv3x3(c_out, c_out, scale=1e-10)  # near-zero: each block starts as the identity
        # A 1x1 conv only when the widths differ (the official code's default, not conv_shortcut).
        self.nin_shortcut = nin(c_in, c_out) if c_in != c_out else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # [B, c_out, H, W]
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, residual (official `attn_block`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nin(channels, channels)
        self.k = nin(channels, channels)
        self.v = nin(channels, channels)
        self.proj_out = nin(channels, channels, scale=1e-10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        # [B, C, H, W] -> [B, 1, H*W, C]: one head whose feature size is C, so SDPA's default
        # scale 1/sqrt(C) is the paper's softmax(q.k / sqrt(C)).
        q, k, v = (p(h).reshape(B, 1, C, H * W).transpose(-1, -2) for p in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # [B, 1, H*W, C]
        h = h.transpose(-1, -2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = default_init_(nn.Conv2d(channels, channels, 3, stride=2, padding=0)) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            return F.avg_pool2d(x, 2, 2)
        # TF "SAME" for a stride-2 3x3 conv on an even size pads 0 before and 1 after, unlike
        # torch's symmetric padding=1; the released weights only reproduce with TF's choice.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = conv3x3(channels, channels) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.conv is not None else x


class Level(nn.Module):
    """One resolution of the down or up path: `block.j`, `attn.j` and a resampler, named as in TF."""

    def __init__(self, blocks: list[ResBlock], attns: list[AttnBlock], resample: nn.Module | None, kind: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)  # empty, or one per block
        if resample is not None:
            setattr(self, kind, resample)  # `downsample` or `upsample`, the official scope names


class Middle(nn.Module):
    def __init__(self, channels: int, temb_ch: int, dropout: float):
        super().__init__()
        self.block_1 = ResBlock(channels, channels, temb_ch, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResBlock(channels, channels, temb_ch, dropout)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h, temb)), temb)


# ---------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------


class UNet(nn.Module):
    """ε_θ(x_t, t[, y]): x_t [B, in_channels, H, W], t [B] int64 (the paper's t, 1 … T), and for a
    class-conditional network y [B] int64 (0 … K-1, or K for "no class") -> [B, out_channels, H, W].

    Attention is placed at construction, at the levels whose size (of `resolution`'s pyramid) is
    in `attn_resolutions`; the network is convolutional and runs on other sizes divisible by
    2**(levels-1), keeping attention at those same levels.
    """

    def __init__(self, in_channels=3, out_channels=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                 attn_resolutions=(16,), dropout=0.1, resamp_with_conv=True, resolution=32, num_classes=0):
        super().__init__()
        self.config = cfg = UNetConfig(
            in_channels=in_channels, out_channels=out_channels, ch=ch, ch_mult=tuple(ch_mult),
            num_res_blocks=num_res_blocks, attn_resolutions=tuple(attn_resolutions), dropout=dropout,
            resamp_with_conv=resamp_with_conv, resolution=resolution, num_classes=num_classes)
        levels = len(cfg.ch_mult)
        temb_ch = 4 * ch
        sizes = cfg.level_resolutions()

        # Timestep embedding MLP: sinusoid(ch) -> dense(4ch) -> swish -> dense(4ch). Named
        # `temb.dense.0/1` (TF `temb/dense0/1`) as in the PyTorch ports of the release
        # (pesser/pytorch_diffusion, ermongroup/ddim), whose state dicts then load unchanged.
        self.temb = nn.Module()
        self.temb.dense = nn.ModuleList([dense(ch, temb_ch), dense(temb_ch, temb_ch)])

        # Down path. `skip_ch` tracks the width of every tensor pushed on the skip stack, in order.
        self.conv_in = conv3x3(in_channels, ch)
        skip_ch = [ch]
        c = ch
        self.down = nn.ModuleList()
        for i in range(levels):
            c_out = ch * cfg.ch_mult[i]
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(c, c_out, temb_ch, dropout))
                c = c_out
                if sizes[i] in cfg.attn_resolutions:
                    attns.append(AttnBlock(c))
                skip_ch.append(c)
            down = Downsample(c, resamp_with_conv) if i != levels - 1 else None
            if down is not None:
                skip_ch.append(c)
            self.down.append(Level(blocks, attns, down, "downsample"))

        self.mid = Middle(c, temb_ch, dropout)

        # Up path, built from the deepest level; `self.up[i]` is level i, as the official up_{i}.
        up = [None] * levels
        for i in reversed(range(levels)):
            c_out = ch * cfg.ch_mult[i]
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(c + skip_ch.pop(), c_out, temb_ch, dropout))
                c = c_out
                if sizes[i] in cfg.attn_resolutions:
                    attns.append(AttnBlock(c))
            up[i] = Level(blocks, attns, Upsample(c, resamp_with_conv) if i != 0 else None, "upsample")
        assert not skip_ch
        self.up = nn.ModuleList(up)

        self.norm_out = group_norm(c)
        self.conv_out = conv3x3(c, out_channels, scale=1e-10)

        # Class embedding, K + 1 rows (the last: no class). Built last, so the rest of a conditional
        # network draws the same initial weights as the unconditional one of the same seed.
        self.label_emb = default_init_(nn.Embedding(num_classes + 1, temb_ch)) if num_classes else None

    @classmethod
    def from_config(cls, cfg: UNetConfig) -> "UNet":
        return cls(**cfg.to_dict())

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """ε_θ(x_t, t[, y]) with the paper's t ∈ 1 … T. The official code fed the network the 0-based
        index t − 1, and every released checkpoint (and diffusers' UNet2DModel) expects that
        embedding: it is converted here, the only place it appears (docs/MATH.md § Time and indexing).

        y: the class of each image, for a conditional network; None there means "no class" (K) for
        all. An unconditional network takes no y."""
        temb = timestep_embedding(t - 1, self.config.ch)  # [B, ch]
        temb = self.temb.dense[1](F.silu(self.temb.dense[0](temb)))  # [B, 4ch]
        if self.label_emb is not None:
            if y is None:
                y = torch.full_like(t, self.config.null_class)
            temb = temb + self.label_emb(y)  # [B, 4ch]
        elif y is not None:
            raise ValueError("this network is unconditional (num_classes=0): it takes no class labels y")

        hs = [self.conv_in(x)]  # the skip stack; conv_in's output is its first entry
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(hs[-1], temb)
                if len(level.attn):
                    h = level.attn[j](h)
                hs.append(h)
            if hasattr(level, "downsample"):
                hs.append(level.downsample(hs[-1]))

        h = self.mid(hs[-1], temb)  # [B, ch*ch_mult[-1], H/2^(L-1), W/2^(L-1)]

        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = block(torch.cat([h, hs.pop()], dim=1), temb)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)

        return self.conv_out(F.silu(self.norm_out(h)))  # [B, out_channels, H, W]


# ---------------------------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------------------------


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_flops(cfg: UNetConfig) -> float:
    """FLOPs of one forward pass on one image (a multiply-add counts 2), by torch's FlopCounterMode.

    Counts convolutions, matmuls and attention; norms and activations are not counted (the usual
    convention). Runs on the meta device, so it allocates nothing and takes well under a second.
    """
    with torch.device("meta"):
        model = UNet.from_config(cfg).eval()
        x = torch.zeros(1, cfg.in_channels, *cfg.size)
        t = torch.zeros(1, dtype=torch.int64)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t)
    return float(counter.get_total_flops())


def summary(cfg: UNetConfig) -> dict:
    """The resolved config, parameter count and forward GFLOPs per image (what `ddpm info` prints)."""
    with torch.device("meta"):
        n = count_parameters(UNet.from_config(cfg))
    return {"config": cfg.to_dict(), "parameters": n, "gflops": forward_flops(cfg) / 1e9}
