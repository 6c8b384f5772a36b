"""Small helpers shared by the tests of the network and of training."""

import numpy as np
import torch

from ddpm.network.unet import UNet, default_init_
from ddpm.run.config import RunConfig


def active(model: UNet, seed: int = 0) -> UNet:
    """Re-initialise the near-zero output layers (conv2, proj_out, conv_out) so that every path of the
    network carries signal, as after training; at initialisation the output is ~1e-5 and any two
    paths would trivially agree."""
    torch.manual_seed(seed)
    for name, m in model.named_modules():
        if name.endswith(("conv2", "proj_out")) or name == "conv_out":
            default_init_(m)
    return model


def assert_states_equal(a: dict, b: dict) -> None:
    """Two training checkpoints hold bitwise the same step, model, EMA and Adam state."""
    assert a["step"] == b["step"]
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for i, s in a["optimizer"]["state"].items():
        for k, v in s.items():
            assert torch.equal(v, b["optimizer"]["state"][i][k]), ("optimizer", i, k)


def preset_model(name: str, **overrides):
    """The UNetConfig of a preset (the one table, ddpm.run.presets), with fields replaced."""
    return RunConfig.from_preset(name).model.replace(**overrides)


def preset_net(name: str, **overrides) -> UNet:
    return UNet.from_config(preset_model(name, **overrides))


def noise_npz(folder, shape, seed: int):
    """`folder`/noise.npz: uniform random uint8 gray images of `shape` [N, H, W], from `seed`."""
    p = folder / "noise.npz"
    np.savez(p, x=np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8))
    return p
