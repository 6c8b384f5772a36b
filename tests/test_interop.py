"""Interop against another implementation: diffusers' UNet2DModel with the configs of the released
DDPM models, and the official TF variable names (mapped by hand here, independently)."""

import importlib
import inspect
import json
import re

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from helpers import preset_model, preset_net
from ddpm.cli import main
from ddpm.errors import UserError
from ddpm.io.weights import convert_file, read_unet, write_unet
from ddpm.network.interop import (
    DIFFUSERS_DEFAULTS,
    config_from_diffusers,
    unet_from_diffusers,
    unet_from_tf_state_dict,
    unet_to_diffusers,
    unet_to_tf_state_dict,
)
from ddpm.network.unet import UNet, UNetConfig

# Only the tests that build diffusers' own model need the package; the rest (config mapping, TF
# names, files) run without it.
def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


needs_diffusers = pytest.mark.skipif(not _importable("diffusers"), reason="needs diffusers (pip install diffusers)")

# google/ddpm-cifar10-32's config (the DDPM layout in diffusers).
CIFAR10_DIFFUSERS = dict(
    sample_size=32, in_channels=3, out_channels=3, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    norm_eps=1e-6, norm_num_groups=32, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, act_fn="silu",
    attention_head_dim=None, resnet_time_scale_shift="default", time_embedding_type="positional",
    center_input_sample=False, add_attention=True,
)
# google/ddpm-church-256 (also bedroom, cat, celebahq): six levels, attention at the 16x16 one.
CHURCH256_DIFFUSERS = dict(
    CIFAR10_DIFFUSERS, sample_size=256, block_out_channels=(128, 128, 256, 256, 512, 512),
    down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
)


def perturb_(model: nn.Module, seed: int) -> nn.Module:
    """Random weights everywhere, including the near-zero-initialised layers and the norms."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim >= 2:
                # Variance 0.25/fan_in inside (the residual stream stays small, so float32
                # rounding stays well under the 1e-5 tolerance), 1/fan_in for the output conv.
                gain = 1.0 if name.startswith("conv_out") else 0.5
                fan_in = p[0].numel()
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * gain * (3.0 / fan_in) ** 0.5)
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def assert_same_function(ours: UNet, theirs, size, channels: int = 3):
    """Our network at the paper's t equals diffusers' at its 0-based index t − 1 (the official
    code's convention, docs/MATH.md § Time and indexing). `size`: a side, or (H, W)."""
    ours.eval(), theirs.eval()
    g = torch.Generator().manual_seed(0)
    h, w = (size, size) if isinstance(size, int) else size
    for t in ([1, 2], [501, 1000]):
        x = torch.randn(2, channels, h, w, generator=g)
        t = torch.tensor(t)
        with torch.no_grad():
            a, b = ours(x, t), theirs(x, t - 1).sample
        assert b.abs().mean() > 0.1  # a meaningful output, not a near-zero one
        assert (a - b).abs().max().item() <= 1e-5


@needs_diffusers
def test_diffusers_defaults_are_current():
    from diffusers import UNet2DModel

    sig = inspect.signature(UNet2DModel.__init__).parameters
    for k, v in DIFFUSERS_DEFAULTS.items():
        assert sig[k].default == v, k


def test_released_diffusers_configs_are_the_presets():
    assert config_from_diffusers(CIFAR10_DIFFUSERS) == preset_model("cifar10", dropout=0.0)
    assert config_from_diffusers(CHURCH256_DIFFUSERS) == preset_model("lsun_church256")
    with pytest.raises(UserError, match="freq_shift"):
        config_from_diffusers(dict(CIFAR10_DIFFUSERS, freq_shift=0))
    with pytest.raises(UserError, match="flip_sin_to_cos"):
        config_from_diffusers({k: v for k, v in CIFAR10_DIFFUSERS.items() if k != "flip_sin_to_cos"})
    with pytest.raises(UserError, match="heads"):
        config_from_diffusers(dict(CIFAR10_DIFFUSERS, attention_head_dim=64))


@pytest.mark.slow
@needs_diffusers
def test_cifar10_matches_diffusers():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    theirs = perturb_(UNet2DModel(**CIFAR10_DIFFUSERS, dropout=0.1), seed=1)
    ours = unet_from_diffusers(theirs)
    assert ours.config == preset_model("cifar10")
    assert_same_function(ours, theirs, 32)


@needs_diffusers
def test_256_layout_matches_diffusers_at_small_width():
    from diffusers import UNet2DModel

    # The six-level 256x256 layout, narrower and at 64x64 so that 16x16 is the third level.
    small = dict(CHURCH256_DIFFUSERS, sample_size=64, block_out_channels=(32, 32, 64, 64, 128, 128), layers_per_block=1,
                 down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"))
    torch.manual_seed(0)
    theirs = perturb_(UNet2DModel(**small), seed=2)
    ours = unet_from_diffusers(theirs)
    assert ours.config == UNetConfig(ch=32, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=1, attn_resolutions=(16,),
                                     dropout=0.0, resolution=64)
    assert_same_function(ours, theirs, 64)
    # A bare state dict needs its config.
    with pytest.raises(UserError, match="config"):
        unet_from_diffusers(theirs.state_dict())
    again = unet_from_diffusers(theirs.state_dict(), config=small)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in ours.state_dict().items())


@needs_diffusers
def test_non_square_network_matches_diffusers():
    from diffusers import UNet2DModel

    # 32 x 64 images: attention at the level whose shorter side is 16 (the second), as diffusers
    # places it by level; its config carries the size as [H, W].
    cfg = dict(CIFAR10_DIFFUSERS, sample_size=[32, 64], block_out_channels=(32, 64, 64), layers_per_block=1,
               down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    torch.manual_seed(0)
    theirs = perturb_(UNet2DModel(**cfg), seed=5)
    ours = unet_from_diffusers(theirs)
    assert ours.config.size == (32, 64) and ours.config.attn_resolutions == (16,)
    assert_same_function(ours, theirs, (32, 64))
    assert list(unet_to_diffusers(ours).config.sample_size) == [32, 64]


@needs_diffusers
def test_gray_learned_variance_network_with_attention_at_8x8_matches_diffusers():
    from diffusers import UNet2DModel

    # The demo's gray 16x16 layout (three levels 16 -> 8 -> 4), with attention placed by diffusers
    # at the second level (8x8) and a learned-variance output: 2 channels for 1 (mean and variance).
    cfg = dict(CIFAR10_DIFFUSERS, sample_size=16, in_channels=1, out_channels=2, block_out_channels=(32, 64, 64),
               down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    torch.manual_seed(0)
    theirs = perturb_(UNet2DModel(**cfg), seed=7).eval()
    ours = unet_from_diffusers(theirs).eval()
    assert ours.config == UNetConfig(in_channels=1, out_channels=2, ch=32, ch_mult=(1, 2, 2), num_res_blocks=2,
                                     attn_resolutions=(8,), dropout=0.0, resolution=16)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 1, 16, 16, generator=g), torch.tensor([1, 1000])
    with torch.no_grad():
        a, b = ours(x, t), theirs(x, t - 1).sample
    assert a.shape == b.shape == (2, 2, 16, 16)  # no broadcasting below
    assert b.abs().mean() > 0.1 and (a - b).abs().max().item() <= 1e-5


@needs_diffusers
def test_round_trip_through_diffusers_is_identity():
    ours = perturb_(preset_net("tiny"), seed=3)
    theirs = unet_to_diffusers(ours)
    assert_same_function(ours, theirs, 32)
    back = unet_from_diffusers(theirs)
    assert back.config == ours.config
    sd, back_sd = ours.state_dict(), back.state_dict()
    assert sd.keys() == back_sd.keys() and all(torch.equal(sd[k], back_sd[k]) for k in sd)


@needs_diffusers
def test_class_conditional_network_matches_diffusers_both_ways():
    from diffusers import UNet2DModel

    # K = 10 classes are diffusers' num_class_embeds = 11: the last row is "no class".
    cfg = dict(CIFAR10_DIFFUSERS, block_out_channels=(32, 64), layers_per_block=1, num_class_embeds=11,
               down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))
    torch.manual_seed(0)
    theirs = perturb_(UNet2DModel(**cfg), seed=6).eval()
    ours = unet_from_diffusers(theirs).eval()
    assert ours.config.num_classes == 10
    back = unet_to_diffusers(ours).eval()
    assert back.config.num_class_embeds == 11 and back.config.class_embed_type is None
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(4, 3, 32, 32, generator=g), torch.tensor([1, 300, 700, 1000]), torch.tensor([0, 3, 9, 10])
    with torch.no_grad():
        a, b, c = ours(x, t, y), theirs(x, t - 1, class_labels=y).sample, back(x, t - 1, class_labels=y).sample
        other = ours(x, t, torch.tensor([1, 4, 8, 0]))
    assert b.abs().mean() > 0.1 and (a - other).abs().max() > 1e-2  # the class matters
    assert (a - b).abs().max().item() <= 1e-5 and (a - c).abs().max().item() <= 1e-5
    with pytest.raises(UserError, match="no class conditioning"):
        unet_to_tf_state_dict(ours)


def tf_state_dict_by_hand(model: UNet) -> dict:
    """The official names and layouts, written out from diffusion_tf/models/unet.py and nn.py."""
    out = {}
    for name, p in model.state_dict().items():
        module, leaf = name.rsplit(".", 1)
        scope = re.sub(r"(down|up|block|attn)\.(\d+)", r"\1_\2", module)
        scope = re.sub(r"dense\.(\d+)", r"dense\1", scope).replace(".", "/")  # temb/dense0
        is_norm = module.split(".")[-1].startswith("norm")  # norm1, norm2, norm, norm_out
        tf_leaf = {"weight": "gamma", "bias": "beta"}[leaf] if is_norm else {"weight": "W", "bias": "b"}[leaf]
        if p.ndim == 4 and p.shape[-1] == 1:  # nn.nin: W [in, out]
            p = p[:, :, 0, 0].T
        elif p.ndim == 4:  # nn.conv2d: W [kh, kw, in, out]
            p = p.permute(2, 3, 1, 0)
        elif p.ndim == 2:  # nn.dense: W [in, out]
            p = p.T
        out[f"model/{scope}/{tf_leaf}"] = p.contiguous()
    return out


def test_tf_names_import_to_the_same_function():
    ours = perturb_(preset_net("tiny"), seed=4).eval()
    tf = tf_state_dict_by_hand(ours)
    for name in ["model/temb/dense0/W", "model/conv_in/W", "model/down_0/block_0/conv1/W",
                 "model/down_1/block_0/nin_shortcut/W", "model/down_1/attn_0/q/W", "model/down_0/downsample/conv/W",
                 "model/mid/block_1/norm1/gamma", "model/mid/attn_1/proj_out/b", "model/up_1/block_1/temb_proj/W",
                 "model/up_1/upsample/conv/W", "model/norm_out/beta", "model/conv_out/W"]:
        assert name in tf, name
    assert tf["model/conv_in/W"].shape == (3, 3, 3, 32)
    assert tf["model/down_1/attn_0/q/W"].shape == (64, 64)
    loaded = unet_from_tf_state_dict(tf, ours.config).eval()
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([1, 500])
    with torch.no_grad():
        assert torch.equal(loaded(x, t), ours(x, t))
    # Without the "model/" prefix too, and back out again.
    unprefixed = {k.removeprefix("model/"): v for k, v in tf.items()}
    assert all(torch.equal(v, tf[k]) for k, v in unet_to_tf_state_dict(unet_from_tf_state_dict(unprefixed, ours.config)).items())
    with pytest.raises(UserError, match="do not fit"):
        unet_from_tf_state_dict(tf, ours.config.replace(num_res_blocks=2))

    # A dump of a whole TF checkpoint: EMA copies (taken by default), Adam slots, global_step.
    ema = perturb_(preset_net("tiny"), seed=8)
    dump = dict(tf, global_step=torch.tensor(790000))
    for k, v in tf_state_dict_by_hand(ema).items():
        dump[f"{k}/ExponentialMovingAverage"] = v
        dump[f"{k}/Adam"] = torch.zeros_like(v)
    assert same_weights(unet_from_tf_state_dict(dump, ours.config), ema.state_dict())
    assert same_weights(unet_from_tf_state_dict(dump, ours.config, ema=False), ours.state_dict())


def same_weights(model: UNet, state: dict) -> bool:
    sd = model.state_dict()
    return sd.keys() == state.keys() and all(torch.equal(sd[k], state[k]) for k in sd)


@needs_diffusers
def test_convert_files_round_trip(tmp_path):
    ours = perturb_(preset_net("tiny"), seed=5)
    write_unet(ours, tmp_path / "a.safetensors", "ddpm")
    convert_file(tmp_path / "a.safetensors", tmp_path / "hf", "ddpm", "diffusers")
    convert_file(tmp_path / "hf", tmp_path / "b.safetensors", "diffusers", "tf")
    assert main(["convert", str(tmp_path / "b.safetensors"), str(tmp_path / "c.safetensors"), "--from", "tf", "--to", "ddpm"]) == 0
    back = read_unet(tmp_path / "c.safetensors", "ddpm")
    assert back.config == ours.config and same_weights(back, ours.state_dict())
    # Any safetensors reader sees the state dict under its own names.
    assert same_weights(ours, load_file(str(tmp_path / "c.safetensors")))

    # The diffusers directory is what diffusers itself loads.
    from diffusers import UNet2DModel

    theirs = UNet2DModel.from_pretrained(str(tmp_path / "hf"))
    assert_same_function(ours, theirs, 32)


def test_convert_sources_without_a_config(tmp_path):
    ours = perturb_(preset_net("tiny"), seed=6)
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(ours.config.to_dict()))

    # Tensors pulled out of an official TF checkpoint into a plain safetensors file.
    save_file(tf_state_dict_by_hand(ours), str(tmp_path / "tf.safetensors"))
    args = ["convert", str(tmp_path / "tf.safetensors"), str(tmp_path / "x.safetensors"), "--from", "tf", "--to", "ddpm"]
    assert main(args) == 2  # no config anywhere
    assert main(args + ["--config", str(cfg)]) == 0
    assert same_weights(ours, load_file(str(tmp_path / "x.safetensors")))

    # A torch.save state dict, as the PyTorch ports of the release ship (same names as ours).
    torch.save(ours.state_dict(), tmp_path / "model-790000.ckpt")
    assert main(["convert", str(tmp_path / "model-790000.ckpt"), str(tmp_path / "y.safetensors"),
                 "--from", "pt", "--to", "ddpm", "--config", str(cfg)]) == 0
    assert same_weights(ours, load_file(str(tmp_path / "y.safetensors")))

    # A training checkpoint gives its EMA weights.
    from ddpm.io import checkpoint

    ema = perturb_(preset_net("tiny"), seed=7)
    path = checkpoint.save_checkpoint(tmp_path / "run", 10, {"step": 10, "model": ours.state_dict(),
                                                            "ema": ema.state_dict(), "config": {"model": ours.config.to_dict()}})
    convert_file(path, tmp_path / "z.safetensors", "ddpm", "ddpm")
    assert same_weights(ema, load_file(str(tmp_path / "z.safetensors")))

    with pytest.raises(UserError, match="'ddpm', 'diffusers', 'tf'"):
        convert_file(tmp_path / "x.safetensors", tmp_path / "e.safetensors", "ddpm", "onnx")
