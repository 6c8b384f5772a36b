"""Weights files in every layout interop.py maps: read, write, convert (`ddpm convert`).

Nothing here is unpickled with code execution:
- ddpm: one `.safetensors` file as `checkpoint.save_weights` writes it (config `{"model": ...}`
  in its header, checksummed). Also read: a training checkpoint (its EMA weights, which the
  paper evaluates), or a plain safetensors state dict with its UNetConfig at NAME.json or --config.
- tf: the same, with the official names and layouts. Also read: a plain safetensors file of
  tensors dumped from an official checkpoint (names with or without `model/`; where a
  variable has an `/ExponentialMovingAverage` copy, that EMA copy is taken), plus --config
  (TF checkpoints carry no config).
- diffusers: a directory as `UNet2DModel.save_pretrained` writes it (`config.json` +
  `diffusion_pytorch_model.safetensors`, loadable with `from_pretrained`), or NAME.safetensors
  with the diffusers config at NAME.json.
- pt (read only): a `torch.save` state dict in our names, which are those of the PyTorch ports
  of the release (pesser/pytorch_diffusion, ermongroup/ddim `model-790000.ckpt`), read with
  `torch.load(weights_only=True)`; needs --config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import safetensors.torch
import torch
from safetensors import safe_open

from ..config import Choice, load_json, parse_json
from ..errors import UserError
from ..files import regular_file
from ..network.interop import (config_from_diffusers, diffusers_config, from_diffusers_state_dict, load_state,
                               meta_unet, to_diffusers_state_dict, unet_from_tf_state_dict, unet_to_tf_state_dict)
from ..network.unet import UNet, UNetConfig, config_from_dict
from ..version import __version__
from . import checkpoint
from .atomic import write_bytes, write_json
from .folders import claim_file

class ReadFormat(Choice):
    DDPM = "ddpm"
    DIFFUSERS = "diffusers"
    TF = "tf"
    PT = "pt"  # a torch.save state dict: read only


class WriteFormat(Choice):
    DDPM = "ddpm"
    DIFFUSERS = "diffusers"
    TF = "tf"


READ_FORMATS = tuple(f.value for f in ReadFormat)
WRITE_FORMATS = tuple(f.value for f in WriteFormat)
WRITTEN_BY = "_ddpm_written_by"  # in a diffusers config.json that ddpm wrote


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _config_arg(config) -> UNetConfig | None:
    if config is None or isinstance(config, UNetConfig):
        return config
    if isinstance(config, (str, Path)):
        return config_from_dict(load_json(config, expect=dict), str(config))
    return config_from_dict(dict(config), "config")


def ddpm_format(path: Path) -> str | None:
    """The `format` in a ddpm safetensors header (weights or training checkpoint), else None."""
    try:
        with safe_open(str(regular_file(path)), framework="pt") as f:
            return json.loads((f.metadata() or {})["ddpm"])["format"]
    except Exception:  # not safetensors, or no ddpm header: the plain readers say which
        return None


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    regular_file(path)
    try:
        return safetensors.torch.load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise UserError(f"{path}: not a readable safetensors file ({e}); a torch.save file is read with --from pt") from None


def _read_torch_save(path: Path) -> dict[str, torch.Tensor]:
    # weights_only=True: torch's restricted unpickler, which builds tensors and containers and
    # refuses anything that would run code. Still: only convert files you trust.
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # torch's long message suggests weights_only=False, which we never do
        raise UserError(f"{path}: not a torch.save file that loads with weights_only=True ({type(e).__name__}); "
                        f"it holds more than tensors and plain containers, so it is not read") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: expected a state dict (name -> tensor), found {type(obj).__name__}")
    return dict(obj)


def _plain_config(src: Path, cfg: UNetConfig | None) -> UNetConfig:
    if cfg is not None:
        return cfg
    if not _sidecar(src).is_file():
        raise UserError(f"{src} carries no config and there is no {_sidecar(src)}; pass --config with a UNetConfig JSON")
    return config_from_dict(load_json(_sidecar(src), expect=dict), str(_sidecar(src)))


def read_unet(src, fmt: str, config=None) -> UNet:
    """Read a network stored in `fmt` (see the module docstring for the layouts it accepts).

    `config` (a UNetConfig, a dict or a JSON path) replaces the config the source carries.
    """
    fmt = ReadFormat.parse(fmt, "format")
    src, cfg = Path(src), _config_arg(config)
    if not src.exists():
        raise UserError(f"{src}: not found; give a .safetensors file" + (" or a diffusers model directory" if fmt == "diffusers" else ""))
    if fmt == "diffusers":
        weights, cfg_path = (src / "diffusion_pytorch_model.safetensors", src / "config.json") if src.is_dir() \
            else (src, _sidecar(src))
        if cfg is None:
            if not cfg_path.is_file():
                raise UserError(f"{src}: no diffusers config at {cfg_path}; pass --config with a UNetConfig JSON")
            cfg = config_from_diffusers(load_json(cfg_path, expect=dict), str(cfg_path))
        return from_diffusers_state_dict(_read_safetensors(weights), cfg, where=str(weights))
    if fmt == "pt":
        return load_state(meta_unet(_plain_config(src, cfg)), _read_torch_save(src), str(src))

    header = ddpm_format(src)
    if header == checkpoint.CHECKPOINT_FORMAT:  # a training checkpoint: its EMA weights, as the paper evaluates
        state = checkpoint.load_checkpoint(src)
        tensors, stored = state["ema"], state.get("config")
    elif header == checkpoint.WEIGHTS_FORMAT:
        tensors, stored = checkpoint.load_weights(src)
    else:  # a plain safetensors file, e.g. tensors pulled out of an official TF checkpoint
        tensors, stored = _read_safetensors(src), None
    if cfg is None:
        cfg = config_from_dict(stored, str(src)) if stored else _plain_config(src, None)
    if fmt == "tf":
        return unet_from_tf_state_dict(tensors, cfg, where=str(src))
    return load_state(meta_unet(cfg), tensors, str(src))


def write_unet(unet: UNet, dst, fmt: str) -> list[Path]:
    """Write `unet` in `fmt`; returns the files written.

    ddpm and tf: one `.safetensors` file written by checkpoint.save_weights (atomic, checksummed),
    the config `{"model": UNetConfig}` in its header. diffusers: a directory as save_pretrained
    writes it, or NAME.safetensors with the diffusers config at NAME.json.
    """
    fmt = WriteFormat.parse(fmt, "format")
    dst = Path(dst)
    if fmt == "diffusers":
        state = to_diffusers_state_dict(unet)
        # WRITTEN_BY marks the config as ddpm's (diffusers drops keys that start with "_"), so a
        # rerun replaces it and a UNet2DModel that diffusers or a user saved is never replaced.
        config = {"_class_name": "UNet2DModel", WRITTEN_BY: f"ddpm {__version__}", **diffusers_config(unet.config)}
        weights, cfg_path = (dst, _sidecar(dst)) if dst.suffix == ".safetensors" else \
            (dst / "diffusion_pytorch_model.safetensors", dst / "config.json")
        # files already there are replaced only if they are a UNet2DModel's that ddpm wrote
        unet2d = lambda p: _is_unet2d_config(cfg_path)  # noqa: E731
        claim_file(cfg_path, unet2d, "a UNet2DModel config", "DST")
        claim_file(weights, unet2d, "a UNet2DModel's weights (with its config beside it)", "DST")
        write_bytes(weights, safetensors.torch.save(state, metadata={"format": "pt"}))
        write_json(cfg_path, config)
        return [weights, cfg_path]

    state = unet_to_tf_state_dict(unet) if fmt == "tf" else {k: v.detach() for k, v in unet.state_dict().items()}
    claim_file(dst, checkpoint.is_ddpm_file, "a weights file", "DST")  # a file of ours is replaced, no other
    return [checkpoint.save_weights(dst, state, {"model": unet.config.to_dict()})]


def _is_unet2d_config(path: Path) -> bool:
    try:
        d = parse_json(path.read_text(encoding="utf-8"), path, expect=dict)
        return d.get("_class_name") == "UNet2DModel" and str(d.get(WRITTEN_BY, "")).startswith("ddpm ")
    except (OSError, ValueError):  # UserError is a ValueError
        return False


def convert_file(src, dst, src_format: str, dst_format: str, config=None) -> list[Path]:
    """`ddpm convert`: read weights in one layout, write them in another. Returns the files written.

    `config` (a UNetConfig, a dict, or a JSON path) replaces the config the source carries; it is
    needed for files that carry none (a plain TF-named safetensors file, a torch.save state dict).
    """
    src_format, dst_format = ReadFormat.parse(src_format, "--from"), WriteFormat.parse(dst_format, "--to")
    for name, path in (("SRC", src), ("DST", dst)):
        if not str(path).strip():
            raise UserError(f"convert: {name} is empty; give a file or folder path")
    return write_unet(read_unet(src, src_format, config), dst, dst_format)
