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
* **The weights file.** torch-fidelity downloads its weights when given no path and unpickles a
  given file with `torch.load(weights_only=False)`. We never download (a missing file is a
  one-line error naming the file and where to get it), check the file's sha256 against the
  prefix in its name (torch.hub's convention: `...-6726825d.pth`), load it with
  `weights_only=True`, check every key and shape, and only then load it into the network.
* **TF32 off.** On Ampere and later GPUs PyTorch runs float32 convolutions in TF32 by default
  (10-bit mantissa); the reference ran them in float32. It is switched off while features are
  computed and restored afterwards.
* **Grayscale** images are repeated to 3 channels (what TF-GAN and PIL's `convert("RGB")` do);
  the network only takes RGB.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import io
import os
import sys
import types
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from ..errors import UserError
from ..files import open_regular

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
# torch.hub's convention: the part of the file name after the last "-" is a prefix of its sha256.
WEIGHTS_SHA256_PREFIX = "6726825d"
# The file as pytorch-fid publishes it; torch-fidelity publishes the same Inception weights as
# weights-inception-2015-12-05-6726825d.pth (TORCH_FIDELITY_URL). Named in errors, never fetched.
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
TORCH_FIDELITY_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_ENV = "DDPM_INCEPTION_WEIGHTS"
# Names under torch.hub's checkpoint folder where pytorch-fid and torch-fidelity cache the file.
HUB_NAMES = (WEIGHTS_NAME, "weights-inception-2015-12-05-6726825d.pth")

INPUT_SIZE = 299
FEATURE_DIM = 2048  # pool-3
NUM_CLASSES = 1008  # the 2015-12-05 graph's classifier: 1000 ImageNet classes + 8 unused
_FEATURES = ["2048", "logits_unbiased"]


def default_weights_path() -> Path:
    """`$XDG_CACHE_HOME/ddpm/pt_inception-2015-12-05-6726825d.pth` (~/.cache/ddpm/… by default)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddpm" / WEIGHTS_NAME


def _how_to_get() -> str:
    return (f"get {WEIGHTS_NAME} (the 2015-12-05 TF Inception-v3 in PyTorch, ~91 MB; ddpm never downloads it) "
            f"from {WEIGHTS_URL} and put it at {default_weights_path()}, or pass --inception-weights PATH "
            f"(or set {WEIGHTS_ENV})")


def resolve_weights_path(path: Union[str, Path, None] = None) -> Path:
    """Where the weights are: `path`, else $DDPM_INCEPTION_WEIGHTS, else the default cache path,
    else pytorch-fid's or torch-fidelity's copy in torch.hub's cache. A missing file is a one-line
    `UserError` naming it and where it can be obtained."""
    if path is None and os.environ.get(WEIGHTS_ENV):
        path, origin = os.environ[WEIGHTS_ENV], f" (from ${WEIGHTS_ENV})"
    else:
        origin = ""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise UserError(f"Inception weights {p}{origin} do not exist; {_how_to_get()}")
        return p
    candidates = [default_weights_path()] + [Path(torch.hub.get_dir()) / "checkpoints" / n for n in HUB_NAMES]
    for p in candidates:
        if p.is_file():
            return p
    raise UserError(f"Inception weights not found at {candidates[0]}; {_how_to_get()}")


_SHA_CACHE: dict = {}


def file_sha256(path: Union[str, Path]) -> str:
    """sha256 hex of a file (cached per path, size and modification time)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open_regular(p) as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


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


def build_network() -> torch.nn.Module:
    """The network with PyTorch's default initialisation (no weights read)."""
    cls = _network_class()
    return cls("inception-v3-compat", list(_FEATURES), feature_extractor_weights_path=_empty_state())


def write_random_weights(path: Union[str, Path], seed: int = 0) -> Path:
    """Random weights in exactly the format of pt_inception-2015-12-05-6726825d.pth (the same
    state-dict keys and shapes), for tests and smoke runs. FIDs measured with them mean nothing and
    their sha256 is not the official one, so loading them needs `expected_sha256=file_sha256(path)`
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


def _check_state(state, expected: dict, path: Path) -> None:
    if not isinstance(state, dict):
        raise UserError(f"{path}: holds a {type(state).__name__}, not a state dict of Inception-v3 weights; {_how_to_get()}")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        ex = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected
              else f"{wrong[0]} has shape {list(state[wrong[0]].shape)}, expected {list(expected[wrong[0]].shape)}")
        raise UserError(f"{path}: not the FID Inception-v3 weights ({len(missing)} keys missing, {len(unexpected)} "
                        f"unexpected, {len(wrong)} of the wrong shape; e.g. {ex}); {_how_to_get()}")


class InceptionV3:
    """Images in, (pool-3 features [B, 2048], logits [B, 1008]) out, both float64 numpy.

    Made by `load_inception`; `info` says which weights these are, for every result's provenance.
    """

    def __init__(self, net: torch.nn.Module, info: dict, device: torch.device):
        self.net, self.info, self.device = net, info, device

    @torch.no_grad()
    def __call__(self, images) -> tuple[np.ndarray, np.ndarray]:
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
            pool3, logits = self.net(x.to(self.device))
        return pool3.double().cpu().numpy(), logits.double().cpu().numpy()


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


_CACHE: dict = {}


def load_inception(weights: Union[str, Path, None] = None, *, expected_sha256: Optional[str] = WEIGHTS_SHA256_PREFIX,
                   device: Union[str, torch.device] = "cpu") -> InceptionV3:
    """The FID Inception-v3 on `device`, with checked weights.

    :param weights: the weights file; default: `resolve_weights_path()` ($DDPM_INCEPTION_WEIGHTS,
        ~/.cache/ddpm/pt_inception-2015-12-05-6726825d.pth, torch.hub's cache).
    :param expected_sha256: the file's sha256 must start with this hex string. The default is the
        official file's prefix. For other weights (your own conversion, the random weights of the
        tests) pass their hash; pass None to skip the check (recorded as `verified: false`).
    """
    path = resolve_weights_path(weights)
    device = torch.device(device)
    sha = file_sha256(path)
    if expected_sha256 is not None:
        want = str(expected_sha256).lower()
        if len(want) < 8 or any(c not in "0123456789abcdef" for c in want):
            raise UserError(f"expected sha256 {expected_sha256!r} must be at least 8 hex digits")
        if not sha.startswith(want):
            extra = "" if want == WEIGHTS_SHA256_PREFIX else f" (asked for {want})"
            raise UserError(f"{path}: sha256 {sha[:16]}… does not match {want[:16]}{extra}: this is not "
                            f"{WEIGHTS_NAME if want == WEIGHTS_SHA256_PREFIX else 'the expected file'}; {_how_to_get()}")
    key = (sha, str(device))
    if key not in _CACHE:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{path}: cannot be read as PyTorch weights with torch.load(weights_only=True) "
                            f"({first[:160]}); {_how_to_get()}") from None
        net = build_network()
        _check_state(state, net.state_dict(), path)
        net.load_state_dict(state)
        net = net.to(device).eval().requires_grad_(False)
        _CACHE.clear()  # one network at a time: ~100 MB each
        _CACHE[key] = net
    info = dict(weights_file=str(path), weights_sha256=sha, official=sha.startswith(WEIGHTS_SHA256_PREFIX),
                verified=expected_sha256 is not None,
                engine=f"torch-fidelity {torch_fidelity_version()} FeatureExtractorInceptionV3",
                features="pool3 (2048)", is_logits="logits_unbiased (1008)",
                resize=f"TF1 bilinear to {INPUT_SIZE}x{INPUT_SIZE}, align_corners=False, no antialiasing")
    if not info["official"]:
        print(f"warning: Inception weights {path} are not {WEIGHTS_NAME} (sha256 {sha[:8]}…): FID and IS measured "
              f"with them are not comparable with published numbers", file=sys.stderr)
    return InceptionV3(_CACHE[key], info, device)
