"""ddpm: Denoising Diffusion Probabilistic Models (Ho, Jain & Abbeel 2020), faithful to the paper.

Everything the command line does is one call from here:

    import ddpm
    ddpm.train("runs/demo", ddpm.RunConfig.from_preset("demo"))           # resumable
    loaded = ddpm.load_run("runs/demo", weights="ema")
    x = ddpm.sample(loaded.model, loaded.diffusion, loaded.shape, ddpm.Images(seed=0, indices=range(16)), device="cpu")
    # a class-conditional run: ddpm.Images(0, range(16), labels=torch.tensor([3] * 16), guidance=3.0);
    # DDIM: ddpm.sample(..., sampler=ddpm.SamplerSpec("ddim", steps=50))
    ddpm.sample_run(ddpm.ModelSpec("runs/demo"), "samples/", 64)            # what `ddpm sample` does
    ddpm.inpaint(ddpm.ModelSpec("runs/demo"), ["a.png"], "edits/a", masks=["center"])   # `ddpm inpaint`
    ddpm.img2img(ddpm.ModelSpec("runs/demo"), ["a.png"], "edits/b", strength=0.5)       # `ddpm img2img`
    ddpm.invert(ddpm.ModelSpec("runs/demo"), ["a.png"], "edits/c", steps=50)            # `ddpm invert`

The options that travel together are typed, frozen configs, checked when built: `ModelSpec`
(which run, weights, device, fast paths, precision), `SamplerSpec` (sampler, steps, η, spacing,
clipping), `GuidanceSpec` (classes, weight), `InceptionSpec`, `EvalSpec`.

The package is built in layers, each importing only from the ones below it (docs/LAYERS.md):
process (the paper's equations) → network (the U-Net and how it runs) → io (files, data,
processes) → run (configurations, presets, loading a run) → workflows (train, sample, bits/dim,
the paper's experiments, FID) → cli.
"""

from .errors import UserError
from .io.checkpoint import latest_checkpoint, load_checkpoint, load_weights, save_weights
from .io.data import DataConfig, ImageSet, load_images
from .io.inception_weights import load_inception
from .io.results import Provenance
from .io.weights import convert_file, read_unet, write_unet
from .network.fast import prepare_model
from .network.interop import unet_from_diffusers, unet_to_diffusers
from .network.unet import UNet, UNetConfig
from .process.diffusion import DiffusionConfig, GaussianDiffusion, LossType, MeanType, VarType, ddim_timesteps
from .process.editing import RePaintSpec
from .process.guidance import Guided
from .process.scaling import to_model_range, to_uint8
from .process.sampling import Sampler, SamplerSpec
from .process.schedules import SCHEDULES, Schedule, make_betas
from .run.config import RunConfig, TrainConfig, model_config, resolve_run_config
from .run.load import LoadedRun, ModelSpec, load_run
from .run.options import ClassChoice, GuidanceSpec, InceptionSpec
from .run.presets import PRESETS
from .version import __version__
from .workflows.demo import run_demo
from .workflows.edit import (EditSet, decode_latents, decode_run, img2img, img2img_images, inpaint, inpaint_images, invert,
                             invert_images, load_masks)
from .workflows.evaluate import EvalSpec, compare, evaluate_run, fid_report, memorization_check
from .workflows.experiments import (interpolate, interpolate_run, progressive_generation, progressive_run, reconstruct,
                                    reconstruct_run, shared_latent_samples, shared_run)
from .workflows.fid import FIDStats, frechet_distance, inception_score, load_stats, save_stats
from .workflows.metrics import kid, nearest_neighbours, precision_recall
from .workflows.nll import NLLImages, evaluate_nll, load_bpd, nll_run, rate_distortion, rate_distortion_run
from .workflows.sample import (ImageNoise, Images, Loop, SampleSet, proportional_labels, sample, sample_labels, sample_run,
                               sample_to_dir)
from .workflows.train import train

__all__ = [
    "UserError", "latest_checkpoint", "load_checkpoint", "load_weights", "save_weights", "DataConfig", "ImageSet",
    "load_images", "convert_file", "read_unet", "write_unet", "prepare_model", "unet_from_diffusers",
    "unet_to_diffusers", "UNet", "UNetConfig", "DiffusionConfig", "GaussianDiffusion", "LossType", "MeanType", "VarType",
    "ddim_timesteps", "Guided", "to_model_range", "to_uint8", "SCHEDULES", "Schedule", "make_betas", "RunConfig", "TrainConfig",
    "model_config", "resolve_run_config", "LoadedRun", "load_run", "PRESETS", "__version__", "run_demo",
    "load_inception", "evaluate_run", "fid_report", "compare", "memorization_check", "kid", "nearest_neighbours",
    "precision_recall", "interpolate", "interpolate_run", "progressive_generation", "progressive_run",
    "reconstruct", "reconstruct_run", "shared_latent_samples", "shared_run", "FIDStats", "frechet_distance",
    "inception_score", "load_stats", "save_stats", "evaluate_nll", "load_bpd", "nll_run", "rate_distortion",
    "rate_distortion_run", "ClassChoice", "ImageNoise", "proportional_labels", "sample", "sample_labels", "sample_run",
    "sample_to_dir", "train", "Sampler", "SamplerSpec", "ModelSpec", "GuidanceSpec", "InceptionSpec", "EvalSpec",
    "Images", "Loop", "SampleSet", "NLLImages", "Provenance", "inpaint", "img2img", "invert", "inpaint_images",
    "img2img_images", "invert_images", "decode_latents", "load_masks", "decode_run", "EditSet", "RePaintSpec",
]
