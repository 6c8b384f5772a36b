"""Checkpoints that are never half-written, never run code, and are verified when read.

Format. A checkpoint is ONE file, `<run_dir>/ckpt-{step:08d}.safetensors`, in the standard
safetensors layout (8-byte little-endian header length, JSON header, raw little-endian tensor
bytes). Every tensor of the training state is stored under a namespaced key (`model/…`, `ema/…`,
`optimizer/state/0/exp_avg`, `rng/cpu`, `rng/cuda/0`, …); everything else (step, optimizer
hyper-parameters, data position, config, and the shape of the nested state itself) is one JSON
string under the header's metadata key "ddpm". Exported model weights (`save_weights`) use the
same layout with the state-dict keys verbatim, so any safetensors reader can open them.

Checksum. The metadata key "ddpm_sha256" holds the SHA-256 of the content: the "ddpm" JSON string,
then, for every tensor in name order, `[name, dtype, shape]` as JSON and its raw bytes. It is
independent of the byte layout, so it is computed before writing and recomputed from the tensors
after reading; any change to a tensor, a name, a shape, a dtype or the metadata fails the check,
and truncation fails safetensors' own structural check (the header must cover the whole file).
Because the checksum lives inside the file, a checkpoint can be copied anywhere on its own.

Atomicity. Files are written by `io/atomic.py`'s `atomic_file` (a temporary name, fsync, then
`os.replace` and an fsync of the folder); a checkpoint's header is also read back by safetensors'
own parser before it is moved into place. A crash leaves either the old set of files or the new
one, plus at worst a temporary file that a later save removes. A failed write raises
`CheckpointWriteError` and touches no earlier checkpoint. To resume, run the same command again:
`latest_checkpoint(run_dir)` returns the newest checkpoint that passes verification, skipping (with
a warning) damaged newer ones.

Safety. Nothing here unpickles: files are read with safetensors only (no `torch.load`, no
`pickle`), so a malicious or damaged file is at worst rejected as corrupt.

Nested state. `flatten(tree)` splits any nest of dict / list / tuple / tensor / int / float / bool /
str / None into `(tensors, meta)`; `unflatten(tensors, meta)` rebuilds it exactly: int dict keys
(the optimizer's `state`), tuples (Adam's `betas`) and bools keep their types, so
`optimizer.load_state_dict` accepts the result and training continues bitwise identically.
Not stored: tensor sharing (tied tensors come back as equal copies), `requires_grad`, devices (all
tensors load on the CPU; `load_state_dict` moves them), and a state dict's `_metadata` attribute.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import struct
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import safetensors.torch
import torch
from safetensors import safe_open

from ..config import get_field, parse_json
from ..errors import UserError, os_error_line
from ..files import regular_file
from .atomic import atomic_file, remove_quietly, remove_stale_temps, write_bytes

__all__ = [
    "CheckpointWarning",
    "CheckpointWriteError",
    "CorruptCheckpointError",
    "checkpoint_path",
    "checkpoint_sha256",
    "checkpoint_step",
    "flatten",
    "is_ddpm_file",
    "get_rng_state",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_snapshot",
    "load_weights",
    "rng_state_problem",
    "save_checkpoint",
    "save_snapshot",
    "save_weights",
    "set_rng_state",
    "unflatten",
]

CHECKPOINT_FORMAT = "ddpm-checkpoint"
WEIGHTS_FORMAT = "ddpm-weights"
SNAPSHOT_FORMAT = "ddpm-phema-snapshot"  # the tracked power-function EMAs at one step (post-hoc EMA)
FORMAT_VERSION = 1
_CKPT_RE = re.compile(r"ckpt-(\d{8,})\.safetensors")
_CHUNK = 64 << 20  # bytes per os.write / hash update

# torch dtype -> safetensors dtype code (the subset a DDPM training state can contain).
_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class CheckpointWriteError(UserError):
    """A checkpoint or weights file could not be written; earlier files are untouched."""


class CorruptCheckpointError(UserError):
    """A file is truncated, damaged, not safetensors, or not a ddpm file."""

    def __init__(self, path: Path | str, reason: str, advice: str):
        self.path, self.reason, self.advice = Path(path), reason, advice
        super().__init__(f"{path}: {reason}; {advice}")

    def __reduce__(self):  # survives pickling between processes (multiprocessing, DDP spawn)
        return type(self), (self.path, self.reason, self.advice)


class UnfitCheckpointError(CorruptCheckpointError):
    """A checkpoint that verifies but cannot be resumed from in this run (see `latest_checkpoint`)."""


class CheckpointWarning(UserWarning):
    """A damaged checkpoint was skipped, or part of a saved state could not be restored."""


# --------------------------------------------------------------------------------------------
# Nested state <-> (flat tensors, JSON metadata)


def flatten(tree: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state into named CPU tensors and a JSON-able skeleton.

    :param tree: nest of dict / list / tuple / torch.Tensor / int / float / bool / str / None.
    :return: (tensors, meta). Each tensor is stored under its path joined by "/"
        (`optimizer/state/0/exp_avg`) and replaced in `meta` by {"$tensor": name}. Tuples become
        {"$tuple": [...]}; dicts whose keys are not all plain strings (int keys, or keys starting
        with "$") become {"$dict": [[key, value], ...]}; other dicts stay JSON objects.
    Tensors are detached, moved to the CPU and made contiguous (a copy only where needed); the
    caller's tensors are never modified.
    """
    tensors: dict[str, torch.Tensor] = {}

    def where(path):
        return "state" + "".join(f"[{p!r}]" for p in path)

    def encode(x, path):
        if isinstance(x, torch.Tensor):
            name = "/".join(str(p) for p in path) or "tensor"
            if name in tensors or name == "__metadata__":  # e.g. keys 0 and "0" in one dict
                n = 1
                while f"{name}~{n}" in tensors:
                    n += 1
                name = f"{name}~{n}"
            tensors[name] = _storable(x, where(path))
            return {"$tensor": name}
        if x is None or isinstance(x, (bool, str)):
            return x
        if isinstance(x, int):
            return int(x)  # an IntEnum stores as its value
        if isinstance(x, float):
            return float(x)  # np.float64 is a float subclass
        if isinstance(x, tuple):  # also namedtuple / torch.Size; they come back as tuple
            return {"$tuple": [encode(v, path + (i,)) for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [encode(v, path + (i,)) for i, v in enumerate(x)]
        if isinstance(x, Mapping):
            if all(isinstance(k, str) and not k.startswith("$") for k in x):
                return {k: encode(v, path + (k,)) for k, v in x.items()}
            pairs = []
            for k, v in x.items():
                if isinstance(k, torch.Tensor) or not isinstance(k, (str, int, float, tuple, type(None))):
                    raise TypeError(f"cannot store the dict key {k!r} ({type(k).__name__}) in {where(path)}")
                pairs.append([encode(k, path), encode(v, path + (k,))])
            return {"$dict": pairs}
        raise TypeError(
            f"cannot store {type(x).__name__} at {where(path)}: a checkpoint holds tensors, "
            f"int, float, bool, str, None and dict/list/tuple of those"
        )

    meta = encode(tree, ())
    return tensors, meta


def unflatten(tensors: Mapping[str, torch.Tensor], meta: Any) -> Any:
    """Inverse of `flatten`: rebuild the nested state from its tensors and skeleton.

    Raises KeyError if `meta` names a tensor that `tensors` lacks.
    """

    def decode(m):
        if isinstance(m, list):
            return [decode(v) for v in m]
        if isinstance(m, dict):
            if len(m) == 1:
                (tag, v), = m.items()
                if tag == "$tensor":
                    return tensors[v]
                if tag == "$tuple":
                    return tuple(decode(x) for x in v)
                if tag == "$dict":
                    return {decode(k): decode(x) for k, x in v}
            return {k: decode(v) for k, v in m.items()}
        return m

    return decode(meta)


def _tensor_names(meta: Any) -> set[str]:
    """The tensor names a `flatten` skeleton refers to."""
    if isinstance(meta, list):
        return set().union(*map(_tensor_names, meta))
    if isinstance(meta, dict):
        if meta.keys() == {"$tensor"}:
            return {meta["$tensor"]}
        return set().union(*map(_tensor_names, meta.values()))
    return set()


def _storable(t: torch.Tensor, where: str) -> torch.Tensor:
    """A dense, contiguous CPU tensor with the same values (a copy only where needed)."""
    if t.layout != torch.strided:
        raise TypeError(f"cannot store the {t.layout} tensor at {where}; call .to_dense() first")
    if t.dtype not in _DTYPES:
        raise TypeError(f"cannot store the {t.dtype} tensor at {where}; supported: {list(_DTYPES)}")
    t = t.detach().to("cpu").resolve_conj().resolve_neg()
    return t.contiguous()


def _raw_bytes(t: torch.Tensor) -> np.ndarray:
    """The tensor's bytes as a flat uint8 array sharing its memory (little-endian host)."""
    return t.reshape(-1).view(torch.uint8).numpy()


def _content_hash(meta_json: str, tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the metadata string and every tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(b"ddpm-sha256-v1\n")
    h.update(meta_json.encode("utf-8"))
    for name in sorted(tensors):
        t = tensors[name]
        h.update(b"\n" + json.dumps([name, _DTYPES.get(t.dtype, str(t.dtype)), list(t.shape)]).encode() + b"\n")
        data = _raw_bytes(t)
        for i in range(0, data.size, _CHUNK):
            h.update(data[i : i + _CHUNK])
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Writing: the safetensors layout, streamed into the one atomic writer


def _write_safetensors(fd: int, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Stream `tensors` to `fd` in the safetensors layout, without a second copy in memory.

    Written here rather than with the safetensors library's serialisers, for two reasons:
    `safetensors.torch.save` builds the whole file as one bytes object (a second copy of the
    training state: about 4 GB for the 256M model with its EMA and Adam moments), and `save_file`
    writes from Rust, whose I/O errors arrive as a message string without the errno that tells a
    user "disk full" and lets us keep the previous checkpoint. The layout is the library's own:
    tensors by decreasing element size, then name, after a header padded to 8 bytes, so every
    tensor starts at a multiple of its element size; the file is read back with `safe_open` before
    it is moved into place. Exported weights, which are small, use the library's `save` (weights.py).
    """
    if sys.byteorder != "little":
        raise NotImplementedError("safetensors stores little-endian bytes; big-endian hosts are not supported")
    names = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name in names:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-(8 + len(blob)) % 8)
    _write_all(fd, struct.pack("<Q", len(blob)) + blob)
    for name in names:
        _write_all(fd, _raw_bytes(tensors[name]))


def _write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view[:_CHUNK])
        view = view[written:]


def _write_file(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Write a safetensors file so that `path` is always either absent/old or complete and readable.

    Raises OSError (the original one) on failure; the temporary file is removed.
    """

    def readable(tmp: Path) -> None:  # a file safetensors cannot parse never lands
        with safe_open(str(tmp), framework="pt", device="cpu") as f:
            if f.metadata() != dict(metadata) or set(f.keys()) != set(tensors):
                raise OSError(errno.EIO, "the file read back differs from what was written", str(tmp))

    with atomic_file(path, check=readable) as f:
        _write_safetensors(f.fileno(), tensors, metadata)


def _write_error(path: Path, e: OSError, previous: str) -> CheckpointWriteError:
    return CheckpointWriteError(f"could not write {os_error_line(e, path, then=previous)}")


# --------------------------------------------------------------------------------------------
# Reading and verifying


def _read_verified(path: Path, expected_format: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """Open a ddpm safetensors file, check its structure, format and checksum.

    :return: (the parsed "ddpm" metadata, the tensors by name)
    """
    damaged = "delete it or restore it from a backup"
    if not regular_file(path).is_file():
        raise UserError(f"{path}: no such file; check the path")
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}; check its permissions") from e
    # A safetensors file starts with its header's length, then "{"; that length's first byte can be
    # 0x80, so the pickle signatures are only looked for in a file that is not laid out so.
    if head[8:9] != b"{" and (head[:1] == b"\x80" or head[:4] == b"PK\x03\x04"):
        raise CorruptCheckpointError(
            path,
            "this is a pickle / torch.save file, not safetensors; it was not opened, because "
            "unpickling can run arbitrary code",
            "convert trusted weights with `ddpm convert`, never rename them",
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own SafetensorError for every structural problem
        raise CorruptCheckpointError(path, f"truncated or not a safetensors file ({e})", damaged) from e
    if "ddpm" not in metadata or "ddpm_sha256" not in metadata:
        raise CorruptCheckpointError(
            path, "a safetensors file without a ddpm header (written by another tool?)",
            "convert foreign weights with `ddpm convert`",
        )
    try:
        meta = parse_json(metadata["ddpm"], "its ddpm header", expect=dict)
        fmt = get_field(meta, "format", str, "its ddpm header")
        version = get_field(meta, "version", int, "its ddpm header")
    except UserError as e:
        raise CorruptCheckpointError(path, str(e), damaged) from None
    if _content_hash(metadata["ddpm"], tensors) != metadata["ddpm_sha256"]:
        raise CorruptCheckpointError(path, "checksum mismatch: the file changed after it was written", damaged)
    if version != FORMAT_VERSION:
        raise UserError(f"{path}: format version {version!r}, this ddpm reads {FORMAT_VERSION}; upgrade ddpm")
    if fmt != expected_format:
        if fmt == CHECKPOINT_FORMAT:
            raise UserError(
                f"{path} is a training checkpoint, not a weights file; "
                f"export its weights with `ddpm convert` or use load_checkpoint()"
            )
        if fmt == WEIGHTS_FORMAT:
            raise UserError(f"{path} holds exported weights, not a training checkpoint; pass it as weights instead")
        if fmt == SNAPSHOT_FORMAT:
            raise UserError(f"{path} is a post-hoc EMA snapshot, not a model; make weights from the snapshots with "
                            f"`ddpm phema RUN --sigma-rel 0.05` (or give --weights phema:0.05)")
        raise CorruptCheckpointError(path, f"unknown ddpm format {fmt!r}", damaged)
    return meta, tensors


# --------------------------------------------------------------------------------------------
# Training checkpoints


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    """The file the checkpoint of `step` lives in: `<run_dir>/ckpt-{step:08d}.safetensors`."""
    return Path(run_dir) / f"ckpt-{step:08d}.safetensors"


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step in a checkpoint's file name, or None if the name is not a checkpoint's."""
    m = _CKPT_RE.fullmatch(Path(path).name)
    if m is None or f"{int(m.group(1)):08d}" != m.group(1):
        return None
    return int(m.group(1))


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Every checkpoint file in `run_dir` (by name only, unverified) as (step, path), oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for p in run_dir.iterdir():
        step = checkpoint_step(p)
        if step is not None and p.is_file():
            found.append((step, p))
    return sorted(found)


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    state: Mapping[str, Any],
    *,
    keep_last: int = 3,
    milestone_every: int | None = None,
) -> Path:
    """Write `state` as `<run_dir>/ckpt-{step:08d}.safetensors`, atomically, then prune old ones.

    :param state: nested dict of tensors and JSON-able values, e.g. {"model": model.state_dict(),
        "ema": ema.state_dict(), "optimizer": opt.state_dict(), "rng": get_rng_state(),
        "step": step, "config": config.to_dict()}.
    :param keep_last: how many of the newest checkpoints (this one included) to keep.
    :param milestone_every: also keep every checkpoint whose step is a multiple of this.
    Pruning only considers checkpoints with a step <= `step`: newer ones belong to a history this
    run did not continue from, and are left for the user to judge. Only files named like
    checkpoints are ever deleted. Raises CheckpointWriteError if the file cannot be written.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise UserError(f"checkpoint step={step!r} must be an integer >= 0")
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
        raise UserError(f"keep_last={keep_last!r} must be an integer >= 1 (the newest checkpoint is always kept)")
    if milestone_every is not None and (not isinstance(milestone_every, int) or milestone_every < 1):
        raise UserError(f"milestone_every={milestone_every!r} must be None or an integer >= 1")
    run_dir = Path(run_dir)
    path = checkpoint_path(run_dir, step)

    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_state(path, step, state, CHECKPOINT_FORMAT)
    except OSError as e:
        earlier = [p.name for s, p in list_checkpoints(run_dir) if s != step]
        previous = f"the previous checkpoint {earlier[-1]} is intact" if earlier else "no earlier checkpoint exists"
        raise _write_error(path, e, previous) from e

    remove_stale_temps(run_dir)
    _prune(run_dir, step, keep_last, milestone_every)
    return path


def _write_state(path: Path, step: int, state: Mapping[str, Any], fmt: str) -> None:
    """A nested state as one checksummed safetensors file of format `fmt`, atomically."""
    tensors, tree = flatten(state)
    meta_json = json.dumps({"format": fmt, "version": FORMAT_VERSION, "step": step, "tree": tree})
    _write_file(path, tensors, {"ddpm": meta_json, "ddpm_sha256": _content_hash(meta_json, tensors)})


def _read_state(path: Path, fmt: str) -> dict[str, Any]:
    """The nested state of a file `_write_state` wrote, verified (CorruptCheckpointError otherwise)."""
    meta, tensors = _read_verified(path, fmt)
    try:
        state = unflatten(tensors, get_field(meta, "tree", dict, "its ddpm header", need="a state (a JSON object)"))
        unused = set(tensors) - _tensor_names(meta["tree"])
        if unused:
            raise ValueError(f"tensors {sorted(unused)[:3]} are not part of the state")
        get_field(state, "step", int, "its state", ok=lambda v: v >= 0, need="an integer >= 0", default=0)
    except (KeyError, ValueError, TypeError) as e:  # UserError is a ValueError
        raise CorruptCheckpointError(path, f"inconsistent ddpm header ({e})", "delete it or restore it from a backup") from e
    return state


def save_snapshot(path: str | os.PathLike, step: int, state: Mapping[str, Any]) -> Path:
    """Write a post-hoc EMA snapshot (the tracked averages at `step`, run/phema.py) like a checkpoint:
    one checksummed safetensors file, atomically; CheckpointWriteError if it cannot be written."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_state(path, step, state, SNAPSHOT_FORMAT)
    except OSError as e:
        raise _write_error(path, e, "the earlier snapshots are intact") from e
    return path


def load_snapshot(path: str | os.PathLike) -> dict[str, Any]:
    """Read and verify a snapshot `save_snapshot` wrote: the state as it was passed, tensors on the CPU."""
    return _read_state(Path(path), SNAPSHOT_FORMAT)


def _prune(run_dir: Path, step: int, keep_last: int, milestone_every: int | None) -> None:
    older = [(s, p) for s, p in list_checkpoints(run_dir) if s <= step]
    keep = {s for s, _ in older[-keep_last:]} | {step}
    if milestone_every is not None:
        keep |= {s for s, _ in older if s % milestone_every == 0}
    for s, p in older:
        if s not in keep:
            remove_quietly(p, "old checkpoint", CheckpointWarning)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and verify a checkpoint; return the state exactly as passed to `save_checkpoint`.

    Tensors are on the CPU. Raises CorruptCheckpointError (naming the file) if the file is
    truncated, damaged, not safetensors (e.g. a pickle, which is never opened), or not a ddpm
    checkpoint; UserError if it does not exist or is a weights file.
    """
    path = Path(path)
    state = _read_state(path, CHECKPOINT_FORMAT)
    try:  # the parts of a training state have their kinds
        get_field(state, "config", dict, "its state", default=None)
        for part in ("model", "ema"):
            get_field(state, part, dict, "its state", need="a dict of tensors", default=None)
    except UserError as e:
        raise CorruptCheckpointError(path, f"inconsistent ddpm header ({e})", "delete it or restore it from a backup") from e
    return state


def is_ddpm_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a safetensors file with a ddpm header (a checkpoint or weights file, as
    its header says; not verified)."""
    try:
        with safe_open(str(regular_file(path)), framework="pt", device="cpu") as f:
            return "ddpm" in (f.metadata() or {})
    except Exception:  # not safetensors at all
        return False


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """The content hash a checkpoint or weights file carries (see Checksum above), from its header
    alone: what names a model in a results folder's record, wherever the file is copied to. Call
    it on a file that was verified (`load_checkpoint`); it does not verify."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return (f.metadata() or {})["ddpm_sha256"]
    except Exception as e:  # SafetensorError, OSError, KeyError: not a ddpm file (any more)
        raise CorruptCheckpointError(path, f"no readable ddpm checksum ({e})", "delete it or restore it from a backup") from e


def latest_checkpoint(run_dir: str | os.PathLike, check: Callable[[Path, dict], str] | None = None
                      ) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint in `run_dir` that passes verification, loaded: (path, state).

    :param check: `check(path, state)` returns why a verified checkpoint cannot be used here (it
        does not fit the run: another network's shapes, a step that is not its name's, an RNG or
        optimizer state that cannot be restored), or "" if it can. Such a checkpoint is treated like
        a damaged one.
    Damaged or unusable newer checkpoints are skipped with a CheckpointWarning that names them and
    the one used instead. Returns None if `run_dir` holds no checkpoint (a fresh run). Raises
    CorruptCheckpointError if it holds checkpoints but none is usable: starting over silently
    would throw a run away. Temp files of interrupted writes are ignored.
    """
    run_dir = Path(run_dir)
    skipped: list[CorruptCheckpointError] = []
    for _, path in reversed(list_checkpoints(run_dir)):
        try:
            state = load_checkpoint(path)
            problem = check(path, state) if check is not None else ""
            if problem:
                raise UnfitCheckpointError(path, f"it does not fit this run: {problem}", "")
        except CorruptCheckpointError as e:
            skipped.append(e)
            continue
        for e in skipped:
            warnings.warn(
                f"skipping {'' if isinstance(e, UnfitCheckpointError) else 'damaged '}checkpoint {e.path.name} "
                f"({e.reason}); resuming from {path.name} instead",
                CheckpointWarning,
                stacklevel=2,
            )
        return path, state
    if skipped:
        names = ", ".join(e.path.name for e in skipped)
        raise CorruptCheckpointError(
            run_dir,
            f"no usable checkpoint: {names} all failed (newest: {skipped[0].reason})",
            "restore one from a backup, or move them elsewhere to start training from scratch",
        )
    return None


# --------------------------------------------------------------------------------------------
# Exported weights


def save_weights(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> Path:
    """Write one model's weights and the config that rebuilds it to a `.safetensors` file.

    Tensors keep their state-dict names, so any safetensors reader can load them; the config is
    JSON in the header (key "ddpm"). Written atomically and checksummed like a checkpoint.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise UserError(f"{path}: weights files are safetensors; name it {path.stem}.safetensors")
    tensors = {}
    for k, v in state_dict.items():
        if not isinstance(k, str) or k == "__metadata__" or not isinstance(v, torch.Tensor):
            raise TypeError(f"save_weights takes a state dict of str -> Tensor; got {k!r}: {type(v).__name__}")
        tensors[k] = _storable(v, f"state_dict[{k!r}]")
    try:
        meta_json = json.dumps({"format": WEIGHTS_FORMAT, "version": FORMAT_VERSION, "config": config})
    except TypeError as e:
        raise TypeError(f"the config of {path} must be JSON-able (use Config.to_dict()): {e}") from e
    metadata = {"ddpm": meta_json, "ddpm_sha256": _content_hash(meta_json, tensors)}
    try:
        write_bytes(path, safetensors.torch.save(tensors, metadata))  # the library's serialiser: one model fits in memory
    except OSError as e:
        previous = f"the existing {path.name} is intact" if path.exists() else "no file was written"
        raise _write_error(path, e, previous) from e
    return path


def load_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify a file written by `save_weights`: (state_dict, config). Tensors on CPU."""
    path = Path(path)
    meta, tensors = _read_verified(path, WEIGHTS_FORMAT)
    try:
        config = get_field(meta, "config", dict, "its ddpm header", need="a config (a JSON object)")
    except UserError as e:
        raise CorruptCheckpointError(path, str(e), "delete it or restore it from a backup") from None
    return tensors, config


# --------------------------------------------------------------------------------------------
# Random number generator state


def get_rng_state() -> dict[str, torch.Tensor]:
    """Every global RNG a training process may draw from, as tensors for a checkpoint.

    Keys: "cpu" (torch), "cuda/{k}" for each CUDA device once CUDA is initialised (not before, so
    a CPU run never creates a CUDA context), "numpy" (legacy global RandomState) and "python"
    (`random`). This is the calling process's state only: in a multi-process run each rank has
    its own.
    """
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for k in range(torch.cuda.device_count()):
            state[f"cuda/{k}"] = torch.cuda.get_rng_state(k)
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    assert kind == "MT19937"
    bits = np.array([cached], dtype=np.float64).view(np.int64)
    state["numpy"] = torch.from_numpy(np.concatenate([keys.astype(np.int64), [pos, has_gauss], bits]))
    version, internal, gauss_next = random.getstate()
    gauss = np.array([0.0 if gauss_next is None else gauss_next], dtype=np.float64).view(np.int64)
    state["python"] = torch.tensor([version, *internal, gauss_next is not None, int(gauss[0])], dtype=torch.int64)
    return state


def rng_state_problem(state: Any) -> str:
    """Why `set_rng_state(state)` could not restore `state` (a damaged or foreign one), or "".
    Checked on throw-away generators, so no global state changes."""
    if not isinstance(state, Mapping):
        return f"the RNG state is {type(state).__name__}, not a mapping"
    for key, t in state.items():
        if not isinstance(t, torch.Tensor):
            return f"RNG state {key} is {type(t).__name__}, not a tensor"
        try:
            if key == "cpu" or key.startswith("cuda/"):
                if key == "cpu":
                    torch.Generator().set_state(t.to("cpu", torch.uint8))
                elif t.dtype != torch.uint8 or t.ndim != 1:
                    raise ValueError(f"{t.dtype} {list(t.shape)}")
            elif key == "numpy":
                a = t.numpy()
                np.random.RandomState().set_state(("MT19937", a[:624].astype(np.uint32), int(a[624]), int(a[625]), 0.0))
                if a.shape != (627,):
                    raise ValueError(f"shape {list(a.shape)}")
            elif key == "python":
                a = t.tolist()
                random.Random().setstate((a[0], tuple(a[1:-2]), None))
        except Exception as e:  # each library raises its own type for a state it cannot take
            return f"RNG state {key} cannot be restored ({e})"
    return ""


def set_rng_state(state: Mapping[str, torch.Tensor]) -> None:
    """Restore what `get_rng_state` returned; the next draws equal those after it was taken.

    Keys this process cannot restore (a CUDA state on a machine without that device, or an
    unknown key) are skipped with a CheckpointWarning, never silently.
    """
    skipped = []
    for key, t in state.items():
        if key == "cpu":
            torch.set_rng_state(t.to("cpu", torch.uint8))
        elif key.startswith("cuda/"):
            k = int(key.split("/", 1)[1])
            if torch.cuda.is_available() and k < torch.cuda.device_count():
                torch.cuda.set_rng_state(t.to("cpu", torch.uint8), k)
            else:
                skipped.append(key)
        elif key == "numpy":
            a = t.numpy()
            cached = a[626:627].astype(np.int64).view(np.float64)[0]
            np.random.set_state(("MT19937", a[:624].astype(np.uint32), int(a[624]), int(a[625]), float(cached)))
        elif key == "python":
            a = t.tolist()
            gauss = float(np.array([a[-1]], dtype=np.int64).view(np.float64)[0]) if a[-2] else None
            random.setstate((a[0], tuple(a[1:-2]), gauss))
        else:
            skipped.append(key)
    if skipped:
        warnings.warn(
            f"RNG states {', '.join(skipped)} cannot be restored in this process; random draws "
            f"will differ from the original run",
            CheckpointWarning,
            stacklevel=2,
        )
