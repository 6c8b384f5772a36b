"""The data's scale (docs/MATH.md § Data scaling): pixels {0 … 255} ↔ the model's [-1, 1].

The paper scales images linearly to [-1, 1] (x / 127.5 − 1); the decoder L_0 then puts one bin of
width 2/255 around each of the 256 values. Going back, samples are rounded to the nearest pixel
value (never truncated) and clamped: what a user's saved PNG holds, and what FID measures.
"""

from __future__ import annotations

import torch


def to_model_range(x: torch.Tensor) -> torch.Tensor:
    """uint8 {0 … 255} -> float32 [-1, 1] by x / 127.5 − 1."""
    if x.dtype != torch.uint8:
        raise TypeError(f"to_model_range expects a uint8 tensor, got {x.dtype}")
    return x.to(torch.float32) / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] (any float dtype) -> uint8, rounded to nearest, clamped to 0 … 255."""
    return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
