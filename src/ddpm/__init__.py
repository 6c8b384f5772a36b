"""ddpm: Denoising Diffusion Probabilistic Models (Ho, Jain & Abbeel 2020), faithful to the paper."""

from .process.diffusion import DiffusionConfig, GaussianDiffusion
from .errors import UserError
from .process.schedules import SCHEDULES, make_betas
from .network.unet import UNet, UNetConfig

__version__ = "0.1.0"
__all__ = ["DiffusionConfig", "GaussianDiffusion", "UserError", "SCHEDULES", "make_betas", "UNet", "UNetConfig"]
