"""Prepared data: a source decoded once into shards of fixed-size records, then read by index.

    ddpm prepare /data/church_outdoor_train_lmdb --out /data/church256 --resolution 256
    train(run_dir, run.replace(data=run.data.replace(source="/data/church256")))

The format (a folder) is made for reading any image by its index without decoding anything:

    manifest.json        what the folder holds (written last: without it the folder is unfinished)
    shard-00000.u8       fixed-size uint8 records [count, C, H, W] in C order, one per image
    shard-00000.labels   int64 little-endian class ids [count], when the source has labels
    prepare-state.json   only while `prepare` runs: the shards finished so far

The manifest records the count, the shape, the preprocessing (data.py's one rule and its
settings), the source and a cheap fingerprint of it (names, sizes and modification times), the
class names, the unreadable files skipped, each shard's count and sha256, and the sha256 of all
the pixels in order (`data_fingerprint`, the same number an in-memory set of the same pixels
has, so a checkpoint's data check does not depend on the placement).

Opening checks the manifest and every shard's size (cheap), and every label file's sha256 (they
are small). A shard's sha256 is checked before its first read (`check_on_read`: `nll`, `eval`,
`fid-ref`, anything but training), on demand (`PreparedSet.verify`, `ddpm prepare --verify DIR`),
and by training in the background instead (`verify_in_background`, for sets up to 16 GiB; above
that training checks sizes only, since hashing every shard would hold up its first steps). A
damaged shard is one line that names it.

A gather reads the records it needs with `os.preadv` straight into the batch, out of the OS page
cache, which every process of a node shares, so a process's own memory does not grow with the
data set. Not through a memory map: a shard cut short while it is read (another process, a full
network disk) is then one line naming it, where a map's page fault past the end is SIGBUS, a
death without a word that no Python code can catch.
A prepare killed at any point resumes at its first unfinished shard (each shard is written
atomically, then recorded in the state file). Shards hold about `shard_bytes` (1 GiB) each, so
even LSUN Bedroom at 256x256 (590 GB) stays under a thousand open maps.

`open_data` is the one door for the workflows: a prepared folder is opened as it is; a source of
encoded images (a folder, a tarball, an LMDB) is prepared into a cache on first use, keyed by
its fingerprint and the preprocessing, and opened from there ever after (a resume never decodes);
array sources (the embedded set, .npz / .npy, idx files, CIFAR-10 batches) are read into memory.
Written by hand: the format is a few fixed-size files that numpy maps directly; the streaming
libraries' formats (io/streaming.py) add remote storage, not random access on a local disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import warnings
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..config import get_field, load_json, parse_json, size_value
from ..errors import UserError
from ..files import open_regular, read_bytes, read_text
from ..version import __version__
from .atomic import atomic_file, remove_quietly, remove_stale_temps, write_bytes, write_json
from .data import (ARRAY, DataConfig, DataSet, Source, conformed, first_image, load_images, parse_source, resize_note,
                   source_length)
from .folders import FolderLock, check_folder, claim_folder
from .images import CHANNEL_MODES
from .progress import progress_bar
from .streaming import StreamSet, is_stream_source, stream_cache

FORMAT = "ddpm-prepared"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
STATE_NAME = "prepare-state.json"
DEFAULT_SHARD_BYTES = 1 << 30
CACHE_ENV = "DDPM_CACHE_DIR"  # where sources are prepared on first use (default ~/.cache/ddpm/prepared)
HASH_CHUNK = 8 << 20


def cache_root() -> Path:
    """The cache of prepared sources: $DDPM_CACHE_DIR, else $XDG_CACHE_HOME/ddpm/prepared, else
    ~/.cache/ddpm/prepared."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "ddpm" / "prepared"


def is_prepared(path) -> bool:
    """Whether `path` is a folder that `prepare` finished."""
    m = Path(path) / MANIFEST_NAME
    if not m.is_file():
        return False
    try:
        return parse_json(read_text(m), m, expect=dict).get("format") == FORMAT
    except (OSError, ValueError):  # UserError is a ValueError
        return False


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def prepare_settings(cfg: DataConfig, source: Source) -> dict:
    """What a prepared folder was made from and how: equal settings, equal pixels."""
    path = source.path
    return dict(source=cfg.source, path=None if path is None else str(path.resolve()),
                source_stat=source.stat_fingerprint, split=str(cfg.split), resolution=cfg.resolution,
                channels=str(cfg.channels), crop=str(cfg.crop), on_error=str(cfg.on_error))


def prepare(cfg: DataConfig, out, *, shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True,
            flag: str = "--out", wait: bool = False, source: Optional[Source] = None) -> "PreparedSet":
    """Decode `cfg`'s source once into OUT (the module's format) and open it.

    Resumable: run it again after a kill and it goes on from its first unfinished shard. A folder
    already prepared with the same settings is opened as it is; other settings are refused.
    :param wait: wait for another process preparing the same folder (a shared cache) to finish.
    :param source: `parse_source(cfg)`, when the caller has parsed it (its fingerprint lists the files once).
    """
    if not isinstance(shard_bytes, int) or shard_bytes < 1:
        raise UserError(f"shard_bytes={shard_bytes!r}: give a positive number of bytes")
    out = check_folder(out, (MANIFEST_NAME, STATE_NAME), "prepared data", flag)
    source = source or parse_source(cfg)
    settings = prepare_settings(cfg, source)
    # Everything that can refuse is checked before the folder, its mark or its lock is created and
    # before a temp file is cleaned up. Not for the cache (`wait`): it is ddpm's own folder, and
    # another node may be preparing it, so the source is opened only by the one that must.
    checked = {} if wait else _check_before_writing(cfg, source, out, settings)
    out = claim_folder(out, (MANIFEST_NAME, STATE_NAME), "prepared data", flag)
    with FolderLock(out, "ddpm prepare", wait=wait):
        remove_stale_temps(out, max_age_s=0)  # temp files of writers that are gone (a kill)
        return _prepare(cfg, source, out, shard_bytes, progress, settings, **checked)


def _check_before_writing(cfg: DataConfig, source: Source, out: Path, settings: dict) -> dict:
    """The refusals of `_prepare`, writing nothing: OUT's earlier settings equal to these, the
    source opened, with an image. -> what was found, for `_prepare` (nothing when OUT is finished)."""
    if (out / MANIFEST_NAME).exists():
        _check_same(read_manifest(out).get("settings"), settings, out, "holds data prepared")
        return {}
    raw = _open_nonempty(source)
    state = _read_state(out)
    if state is not None:
        _check_same(state.get("settings"), settings, out, "holds an unfinished prepare")
        return dict(raw=raw)
    return dict(raw=raw, first=first_image(raw, cfg))


def _open_nonempty(source: Source):
    raw = source.open()
    if source_length(raw) == 0:
        raise UserError(f"{raw.description}: holds no images; give a non-empty data set")
    return raw


def _prepare(cfg: DataConfig, source: Source, out: Path, shard_bytes: int, progress: bool, settings: dict, raw=None,
             first=None) -> "PreparedSet":
    if (out / MANIFEST_NAME).exists():
        _check_same(read_manifest(out).get("settings"), settings, out, "holds data prepared")
        return PreparedSet(out)
    raw = raw if raw is not None else _open_nonempty(source)
    n = source_length(raw)
    state = _read_state(out)
    if state is not None:
        _check_same(state.get("settings"), settings, out, "holds an unfinished prepare")
    else:
        first, shape = first or first_image(raw, cfg)
        record = int(np.prod(shape))
        state = dict(settings=settings, shape=list(shape), first=first, per_shard=max(1, shard_bytes // record),
                     shards=[], skipped=[], enlarged=0)
        write_json(out / STATE_NAME, state)  # first: a folder with a shard but no state is not recognised as ours
    shape, per = tuple(state["shape"]), int(state["per_shard"])
    state["shards"], full = _keep_intact(out, state["shards"])  # full: data_fingerprint of all, in order
    k = len(state["shards"])
    bar = progress_bar(n, desc="preparing", unit="img", initial=min(n, k * per), enabled=progress)
    with bar:
        while k * per < n:
            entry, skipped, enlarged = _write_shard(raw, cfg, out, k, k * per, min(n, (k + 1) * per), shape,
                                                    state["first"], full, bar)
            state["shards"].append(entry)
            state["skipped"] += skipped
            state["enlarged"] += enlarged
            write_json(out / STATE_NAME, state)
            k += 1
    count = sum(s["count"] for s in state["shards"])
    if count == 0:
        raise UserError(f"{raw.description}: none of the {n} files is a readable image (first: "
                        f"{state['skipped'][0]}); check the files")
    c, h, w = shape
    description = (f"{raw.description}{resize_note(cfg, state['enlarged'], n)}; {count} images {c}x{h}x{w}"
                   + (f", {len(state['skipped'])} unreadable skipped" if state["skipped"] else ""))
    manifest = dict(format=FORMAT, version=FORMAT_VERSION, count=count, shape=list(shape), dtype="uint8",
                    layout="NCHW", channels=CHANNEL_MODES[c], resolution=size_value((h, w)), settings=settings,
                    description=description, classes=list(raw.classes), labelled=raw.labels is not None,
                    shards=state["shards"], skipped=state["skipped"], sha256=full.hexdigest(),
                    sha256_of="uint8 [N, C, H, W] pixels, C order", created_by=f"ddpm {__version__}")
    write_json(out / MANIFEST_NAME, manifest)
    remove_quietly(out / STATE_NAME, "the prepare state file")
    if state["skipped"]:
        warnings.warn(f"data: skipped {len(state['skipped'])} unreadable image(s) of {n} in {raw.description} "
                      f"(data.on_error=skip); first: {state['skipped'][0]}", stacklevel=3)
    return PreparedSet(out)


def _check_same(found, settings: dict, out: Path, what: str) -> None:
    if found == settings:
        return
    found = found if isinstance(found, dict) else {}
    diff = [f"{k}={found.get(k)!r} (now {v!r})" for k, v in settings.items() if found.get(k) != v]
    raise UserError(f"{out}: {what} from other settings ({'; '.join(diff[:3])}); give another folder, or delete "
                    f"this one to prepare it again")


def _read_state(out: Path) -> Optional[dict]:
    if not (out / STATE_NAME).exists():
        return None
    state = load_json(out / STATE_NAME, expect=dict)
    if not isinstance(state.get("shards"), list) or not isinstance(state.get("shape"), list):
        raise UserError(f"{out / STATE_NAME}: not a ddpm prepare state; delete {out} to prepare it again")
    advice = f"delete {out} to prepare it again"
    where = out / STATE_NAME
    get_field(state, "shape", list, where, ok=lambda v: len(v) == 3 and all(isinstance(d, int) and d > 0 for d in v),
              need="[C, H, W] of positive integers", advice=advice)
    get_field(state, "per_shard", int, where, ok=lambda v: v >= 1, need="an integer >= 1", advice=advice)
    get_field(state, "enlarged", int, where, ok=lambda v: v >= 0, need="an integer >= 0", advice=advice)
    get_field(state, "first", str, where, advice=advice)
    get_field(state, "skipped", list, where, advice=advice)
    for entry in state["shards"]:  # what a resume reads of each finished shard
        for key, kind in (("file", str), ("sha256", str), ("count", int)):
            get_field(entry, key, kind, f"{where} [shards]", advice=advice)
        if "/" in entry["file"] or entry["count"] < 0:
            raise UserError(f"{out / STATE_NAME}: a shard {entry['file']!r} of {entry['count']} images is not one "
                            f"that prepare writes; {advice}")
    return state


def _keep_intact(out: Path, shards: list):
    """(the finished shards whose files still match their checksums, the hash of their pixels in
    order); the first damaged or missing shard and all after it are written again."""
    full, kept = hashlib.sha256(), []
    for entry in shards:
        trial = full.copy()
        try:
            ok = _sha256_file(out / entry["file"], trial) == entry["sha256"]
        except OSError:
            ok = False
        if not ok:
            break
        full = trial
        kept.append(entry)
    return kept, full


def _write_shard(raw, cfg: DataConfig, out: Path, k: int, lo: int, hi: int, shape, first: str, full, bar):
    name = f"shard-{k:05d}.u8"
    h = hashlib.sha256()
    count, labels, skipped, enlarged = 0, [], [], 0
    with atomic_file(out / name) as f, \
            contextlib.closing(conformed(raw, cfg, skipped, (first, tuple(shape)), lo, hi, bar)) as results:
        for i, a, info in results:
            b = np.ascontiguousarray(a.transpose(2, 0, 1)).tobytes()
            f.write(b)
            h.update(b)
            full.update(b)
            count += 1
            enlarged += bool(info)
            if raw.labels is not None:
                labels.append(raw.labels[i])
    entry = dict(file=name, count=count, sha256=h.hexdigest(), items=[lo, hi])
    if raw.labels is not None:
        data = np.asarray(labels, "<i8").tobytes()
        write_bytes(out / f"shard-{k:05d}.labels", data)
        entry.update(labels=f"shard-{k:05d}.labels", labels_sha256=hashlib.sha256(data).hexdigest())
    return entry, skipped, enlarged


def _sha256_file(path: Path, *also) -> str:
    """sha256 hex of a file, read in chunks; each hashlib object in `also` is fed the same bytes."""
    h = hashlib.sha256()
    with open_regular(path) as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
            for o in also:
                o.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def read_manifest(path: Path) -> dict:
    """The manifest of a prepared folder, its fields checked; one line naming it otherwise."""
    f = Path(path) / MANIFEST_NAME
    m = load_json(f, expect=dict)
    if m.get("format") != FORMAT:
        raise UserError(f"{f}: not a ddpm prepared data manifest (format {m.get('format')!r}); prepare the data "
                        f"with `ddpm prepare`")
    if m.get("version") != FORMAT_VERSION:
        raise UserError(f"{f}: prepared data format version {m.get('version')!r}, this ddpm reads "
                        f"{FORMAT_VERSION}; prepare the data again with this version")
    shape, shards = m.get("shape"), m.get("shards")
    ok = (isinstance(shape, list) and len(shape) == 3 and all(isinstance(d, int) and d > 0 for d in shape)
          and isinstance(shards, list) and isinstance(m.get("count"), int)
          and all(isinstance(s, dict) and isinstance(s.get("file"), str) and "/" not in s["file"]
                  and isinstance(s.get("count"), int) and s["count"] >= 0 for s in shards)
          and sum(s["count"] for s in shards) == m["count"] and m["count"] > 0)
    if not ok:
        raise UserError(f"{f}: the manifest is damaged (shape, count or shards); prepare the data again")
    advice = "prepare the data again"
    get_field(m, "sha256", str, f, advice=advice)
    get_field(m, "classes", list, f, ok=lambda c: all(isinstance(x, str) for x in c), need="a list of class names",
              default=None, advice=advice)
    get_field(m, "skipped", list, f, default=None, advice=advice)
    get_field(m, "description", str, f, default=None, advice=advice)
    if get_field(m, "labelled", bool, f, default=False, advice=advice):
        for s in shards:
            get_field(s, "labels", str, f"{f} [shards]", ok=lambda n: "/" not in n, need="a file name", advice=advice)
    return m


class PreparedSet(DataSet):
    """A prepared folder: the `DataSet` interface, records read on `gather`."""

    def __init__(self, path):
        self.path = Path(path)
        m = self.manifest = read_manifest(self.path)
        self._shape = tuple(m["shape"])
        record = int(np.prod(self._shape))
        self._shards = [s for s in m["shards"] if s["count"] > 0]  # a shard whose images were all skipped is empty
        for s in self._shards:
            _check_size(self.path / s["file"], s["count"] * record)
        self._offsets = np.cumsum([0] + [s["count"] for s in self._shards])
        self._record = record
        # Each shard's sha256 is checked before its first read, so that no reader uses a shard
        # whose bytes were replaced (same size, other bytes); training turns this off and checks
        # the whole set in the background instead (`verify_in_background`).
        self.check_on_read = True
        self._checked = [False] * len(self._shards)
        self._check_lock = threading.Lock()
        self.source_description = f"prepared {self.path}: {m.get('description', '')}"
        self.skipped = list(m.get("skipped") or [])
        self.classes = tuple(m.get("classes") or ())
        self.labels = self._read_labels() if m.get("labelled") else None

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def shape(self) -> tuple[int, int, int]:
        return self._shape

    def fingerprint(self) -> str:
        return self.manifest["sha256"]

    def _check_shard(self, k: int) -> None:
        """Shard k against its sha256, once, before its first read (when `check_on_read`)."""
        if self.check_on_read and not self._checked[k]:
            with self._check_lock:
                if not self._checked[k]:
                    s = self._shards[k]
                    self._verify_file(s["file"], s.get("sha256"))
                    self._checked[k] = True

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        """The records of `indices`, read with `os.preadv` straight into the batch: a shard cut
        short while it is read is one line naming it (through a memory map it would be SIGBUS).
        Each shard the batch touches is opened for the gather and closed after it, so a set of a
        thousand shards never holds a thousand file descriptors."""
        idx = torch.as_tensor(indices).cpu().numpy().astype(np.int64, copy=False).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"index out of range for {len(self)} images")
        which = np.searchsorted(self._offsets, idx, side="right") - 1
        local = idx - self._offsets[which]
        out = np.empty((len(idx), self._record), np.uint8)
        for k in np.unique(which).tolist():
            self._check_shard(k)
            path = self.path / self._shards[k]["file"]
            try:
                f = open_regular(path)
            except OSError as e:
                raise _unreadable(path, e) from None
            with f:
                for j in np.flatnonzero(which == k).tolist():
                    if _read_into(f.fileno(), out[j], int(local[j]) * self._record) != self._record:
                        raise _cut_short(path, self._shards[k]["count"] * self._record, os.fstat(f.fileno()).st_size)
        return torch.from_numpy(out.reshape(len(idx), *self._shape))

    def _read_labels(self) -> torch.Tensor:
        """The class ids of every image, each label file checked against the manifest's sha256 (it
        is small, so always, whoever reads it) and every id against the classes."""
        parts, K = [], len(self.classes)
        for s in self._shards:
            f = self.path / s["labels"]
            _check_size(f, 8 * s["count"])
            try:
                data = read_bytes(f)
            except OSError as e:
                raise _unreadable(f, e) from None
            if hashlib.sha256(data).hexdigest() != s.get("labels_sha256"):
                raise _damaged(f)
            a = np.frombuffer(data, "<i8")
            if a.size and (a.min() < 0 or (K and a.max() >= K)):
                bad = int(a.min()) if a.min() < 0 else int(a.max())
                raise UserError(f"{f}: holds the label {bad}, outside 0 … {K - 1} (the manifest's {K} classes); "
                                f"prepare the data again")
            parts.append(a)
        return torch.from_numpy(np.concatenate(parts).astype(np.int64))

    def verify(self, progress: bool = False, stop: Optional[threading.Event] = None) -> None:
        """Check every shard (and label file) against the manifest's sha256; one line naming the
        first damaged one. `stop` ends a background check early."""
        bar = progress_bar(len(self._shards), desc="verifying", unit="shard", enabled=progress)
        with bar:
            for s in self._shards:
                for name, want in ((s["file"], s.get("sha256")), (s.get("labels"), s.get("labels_sha256"))):
                    if name is None or (stop is not None and stop.is_set()):
                        continue
                    self._verify_file(name, want)
                bar.update()

    def _verify_file(self, name: str, want) -> None:
        """One file of the folder against the sha256 the manifest records for it; one line if not."""
        try:
            got = _sha256_file(self.path / name)
        except OSError as e:
            raise _unreadable(self.path / name, e) from None
        if got != want:
            raise _damaged(self.path / name)

    def verify_in_background(self) -> "BackgroundCheck":
        """Check every shard on a thread (training's check); reads no longer check shards first."""
        self.check_on_read = False
        return BackgroundCheck(self.verify)



def _damaged(path: Path) -> UserError:
    """The one line for a file of a prepared folder whose bytes are not those the manifest records."""
    return UserError(f"{path}: damaged (its sha256 differs from the manifest's); restore it, or prepare the data "
                     f"again into a new folder")


def _unreadable(path: Path, e: OSError) -> UserError:
    """The one line for a file of a prepared folder that is missing or cannot be read."""
    return UserError(f"{path}: cannot read ({e.strerror or e}); the prepared folder is incomplete or damaged, "
                     f"restore the file or prepare the data again")


def _read_into(fd: int, buf: np.ndarray, offset: int) -> int:
    """Read len(buf) bytes at `offset` into `buf`; the number read (fewer at the end of the file)."""
    done, view = 0, memoryview(buf).cast("B")
    while done < len(view):
        if hasattr(os, "preadv"):
            got = os.preadv(fd, [view[done:]], offset + done)
        else:  # Windows, macOS before 11: a copy more
            chunk = os.pread(fd, len(view) - done, offset + done)
            view[done:done + len(chunk)] = chunk
            got = len(chunk)
        if got == 0:
            break
        done += got
    return done


def _cut_short(path, size: int, got: int) -> UserError:
    return UserError(f"{path}: {got} bytes, the manifest says {size} (cut short or replaced); restore the file "
                     f"or prepare the data again")


def _check_size(path: Path, size: int) -> None:
    try:
        got = path.stat().st_size
    except OSError as e:
        raise _unreadable(path, e) from None
    if got != size:
        raise _cut_short(path, size, got)


class BackgroundCheck:
    """Runs `check(stop=event)` on a daemon thread; `raise_if_failed()` re-raises its UserError."""

    def __init__(self, check: Callable):
        self._stop, self.error = threading.Event(), None
        self._thread = threading.Thread(target=self._run, args=(check,), daemon=True, name="ddpm-verify")
        self._thread.start()

    def _run(self, check) -> None:
        try:
            check(stop=self._stop)
        except UserError as e:
            self.error = e

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def finish(self) -> None:
        """Wait for the check to end, then raise what it found."""
        self._thread.join()
        self.raise_if_failed()

    def close(self) -> None:
        self._stop.set()


# ---------------------------------------------------------------------------------------------
# The one door
# ---------------------------------------------------------------------------------------------


# Where a source's data live once opened, decided by `placement` alone: training, evaluation and
# `--dry-run` all ask it, so they cannot disagree.
STREAM = "LitData's format, read through its local cache"
PREPARED = "a prepared folder, read by offset"
MEMORY = "read into memory"
CACHE = "prepared into the cache on first use, then read by offset"


def placement(cfg: DataConfig) -> tuple[str, Optional[Path], Optional[Source]]:
    """(STREAM | PREPARED | MEMORY | CACHE, the folder read, the parsed source), found without
    opening, preparing or downloading anything. The source comes with the answer so that opening
    it (`load_images`, `prepare`) does not parse and recognise it again."""
    if is_stream_source(cfg.source):
        return STREAM, None, None
    source = parse_source(cfg)
    path = source.path
    if path is not None and path.is_dir() and (path / MANIFEST_NAME).exists():
        return PREPARED, path, source
    if source.kind == ARRAY:
        return MEMORY, None, source
    return CACHE, cache_entry(prepare_settings(cfg, source)), source


def open_data(cfg: DataConfig, *, progress: bool = True, preparer: bool = True,
              barrier: Optional[Callable[[], None]] = None) -> DataSet:
    """The data of `cfg` in their `placement`: a prepared folder read by offset; LitData's format (a
    bucket URL or a folder, io/streaming.py) read through its local cache; an encoded source
    prepared into the cache (cache_root()) on first use, then read from there; an array source in memory.

    :param preparer: whether this process may prepare (under torchrun: local rank 0 of each node;
        the others wait at `barrier`). Processes sharing a cache folder take turns (a file lock).
    """
    where, path, source = placement(cfg)
    if where == STREAM:
        data = StreamSet(cfg.source, stream_cache(cfg.source, cache_root()))
        _check_fits(data, cfg, cfg.source)
        return data
    if where == PREPARED:
        data = PreparedSet(path)
        _check_fits(data, cfg, data.path)
        return data
    if where == MEMORY:
        return load_images(cfg, source)
    if preparer and not is_prepared(path):
        prepare(cfg, path, progress=progress, flag=f"cache {CACHE_ENV}", wait=True, source=source)
    if barrier is not None:
        barrier()
    return PreparedSet(path)


def cache_entry(settings: dict) -> Path:
    """The cache folder of a source and its preprocessing (`prepare_settings`)."""
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    return cache_root() / key[:32]


def _check_fits(data: DataSet, cfg: DataConfig, where) -> None:
    """Prepared data are used as prepared: a different size or channel mode is one line."""
    c, h, w = data.shape
    if cfg.size not in (None, (h, w)):
        raise UserError(f"{where}: prepared at {h}x{w}, but data.resolution={cfg.resolution}; prepare it again "
                        f"with --resolution {cfg.resolution}, or set data.resolution={size_value((h, w))}")
    if cfg.channels != "auto" and CHANNEL_MODES[c] != cfg.channels:
        raise UserError(f"{where}: prepared as {CHANNEL_MODES[c]}, but data.channels={cfg.channels}; prepare it "
                        f"again with --channels {cfg.channels}")
