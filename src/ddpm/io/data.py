"""Data sets: every supported source, decoded by one rule, with its labels when it has them.

`load_images(DataConfig(...))` returns an `ImageSet`: uint8 pixels [N, C, H, W] in memory. Large
sets are prepared once into shards on disk instead (io/prepared.py, `ddpm prepare`), and
read through the same interface (`len`, `shape`, `gather(indices)`, `labels`, `classes`,
`fingerprint()`). The training loop scales a batch to the model's range (process/scaling.py). Random horizontal flips (the paper's CIFAR-10 /
LSUN / CelebA-HQ augmentation) are applied by the training loop; `DataConfig.random_flip` only carries the flag.

Sources (`DataConfig.source`):
  fashion-mnist-10k        embedded in the package: the first 1,000 images of each class of the
                           Fashion-MNIST train set (10,000 x 28x28x1, MIT licence, see
                           assets/FASHION_MNIST_LICENSE and scripts/make_fashion_mnist_10k.py)
  fashion-mnist[:DIR]      the full release as idx files, from DIR or from Debian's
                           /usr/share/datasets/fashion-mnist/ (apt-get install dataset-fashion-mnist)
  cifar10:PATH             cifar-10-python.tar.gz, its cifar-10-batches-py folder, or a folder (or
                           tarball) of images with train/ and test/ subfolders
  PATH                     recognised by content: a folder of images (recursive, .png .jpg .jpeg
                           .webp; a train/ or test/ subfolder matching the split is used when
                           present), CIFAR-10 python batches, idx files, .npz / .npy, an LMDB folder
                           (data.mdb; values are encoded images, as in LSUN), a tarball of images

One preprocessing rule for every source (io/images.py): convert the pixel mode to grayscale or
RGB, centre-crop to the target's aspect ratio (a square unless `resolution` is "HxW") or pad to it
(`crop`), Lanczos-resize to `resolution`, as the official LSUN data were made. Mixed sizes are
fine once a resolution is set.

Labels (class ids 0 … K-1 with their names) come with: a folder (or tarball) whose images sit in
class subfolders (the first folder below the data root or its split folder), CIFAR-10, idx files
with their labels file beside them (Fashion-MNIST), an .npz with a `y` / `labels` array, the
embedded subset, and an LMDB (its category, from the folder name, e.g. bedroom_train_lmdb).
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import importlib.resources
import io
import os
import pickle
import re
import struct
import tarfile
import warnings
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, Optional, Union

import numpy as np
import torch

from ..config import MAX_CLASSES, Choice, Config, SizeTooLarge, parse_size, size_value
from ..errors import UserError, shown
from ..files import open_regular, regular_file
from ..version import __version__

from .folders import LOCK_NAME, is_ddpm_folder
from .images import IMAGE_EXTENSIONS, is_image_file, prepare_image, rgb_to_gray
from .progress import progress_bar

class Split(Choice):
    TRAIN = "train"
    TEST = "test"


class Channels(Choice):
    AUTO = "auto"  # gray data stay 1-channel, colour 3
    RGB = "rgb"
    GRAY = "gray"


class OnError(Choice):
    STOP = "stop"  # an unreadable image file is a UserError
    SKIP = "skip"  # ... or skipped and counted


class Crop(Choice):
    CENTER = "center"  # the largest centred region of the target's aspect ratio (the paper's LSUN rule)
    PAD = "pad"  # the whole picture, resized to fit and centred on black


SPLITS = tuple(s.value for s in Split)
# Class names in label order, as the releases define them.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")
NAMED_SOURCES = ("fashion-mnist-10k", "fashion-mnist", "cifar10")

EMBEDDED_NAME = "fashion-mnist-10k"
EMBEDDED_FILE = "fashion_mnist_10k.npz"
# Where Debian's `dataset-fashion-mnist` package installs the four idx .gz files.
FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

PROGRESS_MIN_ITEMS = 5000  # show a progress bar above this many images to decode
# PIL releases the GIL while decoding, so threads overlap; two saturate a 2-core machine and
# the pool grows with the machine (50,000 CIFAR-10 JPEGs: ~11 s on 2 cores).
DECODE_THREADS = max(2, min(8, os.cpu_count() or 2))


@dataclass(frozen=True)
class DataConfig(Config):
    source: str = EMBEDDED_NAME  # a named source (NAMED_SOURCES, some with ":PATH") or a path
    SECTION = "data"

    split: Split = Split.TRAIN
    resolution: Union[int, str, None] = None  # side of square images, or "HxW"; None = the data's own size
    channels: Channels = Channels.AUTO  # "auto" keeps gray data 1-channel and colour 3; "rgb" / "gray" force
    on_error: OnError = OnError.STOP  # an unreadable image file: "stop" (UserError) or "skip" (counted)
    random_flip: bool = True  # horizontal flips, applied by the training loop (not here)
    crop: Crop = Crop.CENTER  # fitting another aspect ratio: centre-crop (the paper's rule) or pad

    @property
    def size(self) -> Optional[tuple[int, int]]:
        """(height, width) to resize to, or None for the data's own size."""
        return None if self.resolution is None else parse_size(self.resolution, "data.resolution")

    def validate(self) -> None:
        if not isinstance(self.source, str) or not self.source.strip():
            raise UserError(
                f"data.source={self.source!r} is empty; give a named source "
                f"({', '.join(NAMED_SOURCES)}) or a path to images"
            )
        r = self.resolution
        if r is not None:
            try:
                object.__setattr__(self, "resolution", size_value(parse_size(r, "data.resolution")))
            except SizeTooLarge:
                raise
            except UserError:
                raise UserError(f"data.resolution={r!r} is not valid; give a positive integer, HxW (e.g. 64x128), "
                                "or null for the data's own size") from None
        if not isinstance(self.random_flip, bool):
            raise UserError(f"data.random_flip={self.random_flip!r} is not valid; give true or false")
        name, sep, arg = self.source.partition(":")
        if name == EMBEDDED_NAME and sep:
            raise UserError(
                f"data.source={self.source!r}: {EMBEDDED_NAME} is embedded and takes no path; "
                f"write just {EMBEDDED_NAME}"
            )


class DataSet:
    """What every placement of a data set offers, so that no caller needs to know which it has:
    in memory (`ImageSet`, here), prepared shards on disk (io/prepared.py), LitData's format in a
    bucket or a folder (io/streaming.py), and the image sets evaluation reads (a folder of
    samples, an .npz: io/samples.py).

    Subclasses set `source_description`, `skipped`, `labels` (int64 [N] or None), `classes` and
    implement `__len__`, `shape`, `gather` and `fingerprint`; the rest has a default that holds
    where the placement has nothing to add (no pixels in memory, nothing to check in the background)."""

    source_description: str  # one line for logs and provenance
    skipped: list[str]  # unreadable files skipped (on_error="skip")
    labels: Optional[torch.Tensor] = None  # int64 [N] class ids, or None for an unlabelled source
    classes: tuple[str, ...] = ()  # class names, by id (empty when unlabelled)
    # Whether a read checks the bytes it reads against their recorded checksum first (prepared
    # shards); training turns it off and checks in the background instead (`verify_in_background`).
    check_on_read: bool = False

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        raise NotImplementedError

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        """uint8 [B, C, H, W]: the images at `indices` (an int64 tensor), in that order."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """data_fingerprint of all the pixels, in order: here by reading them 1,000 at a time (the
        placements that record it, or hold the pixels, answer at once)."""
        h = hashlib.sha256()
        for s in range(0, len(self), 1000):
            h.update(np.ascontiguousarray(self.gather(torch.arange(s, min(s + 1000, len(self)))).numpy()).tobytes())
        return h.hexdigest()

    @property
    def channels(self) -> int:
        return self.shape[0]

    @property
    def size(self) -> tuple[int, int]:
        """(height, width)."""
        return self.shape[1], self.shape[2]

    @property
    def nbytes(self) -> int:
        c, h, w = self.shape
        return len(self) * c * h * w

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def in_memory(self) -> Optional[torch.Tensor]:
        """uint8 [N, C, H, W]: all the pixels, when this placement already holds them in memory; else None."""
        return None

    def load(self) -> "ImageSet":
        """The whole set in memory (the other placement): one gather of every index."""
        return ImageSet(images=self.gather(torch.arange(len(self))), source_description=self.source_description,
                        skipped=list(self.skipped), labels=self.labels, classes=tuple(self.classes))

    def verify_in_background(self):
        """Start checking every stored byte against its checksum on a thread, and stop checking on
        read; -> an object with `raise_if_failed()`, `finish()` and `close()`, or None when this
        placement has nothing stored to check (memory) or checks as it reads (LitData)."""
        return None


@dataclass
class ImageSet(DataSet):
    """A whole data set in memory: `images` is uint8 [N, C, H, W]."""

    images: torch.Tensor
    source_description: str
    skipped: list[str] = field(default_factory=list)
    labels: Optional[torch.Tensor] = None
    classes: tuple[str, ...] = ()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.images.shape[1:])

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        return self.images[indices.to(self.images.device)]

    def fingerprint(self) -> str:
        return data_fingerprint(self.images)

    def in_memory(self) -> torch.Tensor:
        return self.images

    def load(self) -> "ImageSet":
        return self


def data_fingerprint(images: Union[torch.Tensor, np.ndarray]) -> str:
    """sha256 hex of the uint8 pixel bytes in C order (of [N, C, H, W] for an ImageSet's images).

    The shape is not hashed: record it beside the fingerprint.
    """
    a = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if a.dtype != np.uint8:
        raise TypeError(f"data_fingerprint expects uint8 pixels, got {a.dtype}")
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def load_images(cfg: DataConfig, source: Optional["Source"] = None) -> ImageSet:
    """Load the source named by `cfg` into memory, preprocessed (see the module docstring).

    :param source: `parse_source(cfg)`, when the caller has parsed it already."""
    return _finish((source or parse_source(cfg)).open(), cfg)


# ---------------------------------------------------------------------------------------------
# Sources. Each returns a `_Raw`: either decoded pixels (uint8 NHWC) or encoded files to decode.
# ---------------------------------------------------------------------------------------------


@dataclass
class _Raw:
    description: str
    array: Optional[np.ndarray] = None  # uint8 [N, H, W, C], C in {1, 3}
    items: Optional[list] = None  # [(name for messages, path or encoded bytes)]
    labels: Optional[np.ndarray] = None  # int64 [N] (of the array or the items), or None
    classes: tuple[str, ...] = ()


def _classes_for(labels: np.ndarray, names: Optional[tuple[str, ...]] = None, where: str = "labels") -> tuple[str, ...]:
    """Class names for integer labels: `names` when they cover them, else the ids as text."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or not np.issubdtype(labels.dtype, np.integer)):
        raise UserError(f"labels must be integers >= 0 (found {labels.min()}); give class ids 0 … K-1")
    k = int(labels.max()) + 1 if labels.size else 0
    if k > MAX_CLASSES:
        raise UserError(f"{where}: class id {k - 1} found; more than {MAX_CLASSES:,} classes, the most ddpm takes; "
                        f"give class ids 0 … K-1")
    if names is not None and k <= len(names):
        return tuple(names)
    return tuple(str(i) for i in range(k))


def _path_labels(relpaths: list[PurePosixPath]) -> tuple[Optional[np.ndarray], tuple[str, ...]]:
    """Class subfolders: the first folder of each relative path, when every image has one."""
    if not relpaths or any(len(p.parts) < 2 for p in relpaths):
        return None, ()
    names = sorted({p.parts[0] for p in relpaths})
    ids = {n: i for i, n in enumerate(names)}
    return np.array([ids[p.parts[0]] for p in relpaths], np.int64), tuple(names)


@dataclass
class Source:
    """`DataConfig.source` with its split, parsed and recognised once (`parse_source`): the file
    or folder it reads (None for the embedded set), its kind (ARRAY or ENCODED) and how to open
    it. Every step of opening a set (where it is placed, its cache key, decoding it, preparing it)
    takes this one description, so none of them parses the text or looks at the path again."""

    text: str  # DataConfig.source as given
    split: str
    path: Optional[Path]
    kind: str  # ARRAY or ENCODED (_recognise)
    _load: Callable[[], "_Raw"] = field(repr=False)

    def open(self) -> "_Raw":
        """The source listed (items to decode) or read (an array), not yet preprocessed."""
        raw = self._load()
        n = len(raw.array) if raw.array is not None else len(raw.items)
        if raw.labels is not None and len(raw.labels) != n:
            raise UserError(f"{raw.description}: {len(raw.labels)} labels for {n} images; give one label per image")
        return raw

    @functools.cached_property
    def stat_fingerprint(self) -> str:
        """`stat_fingerprint` of the source's files, computed when first asked, once."""
        return stat_fingerprint(self.path)


def parse_source(cfg: DataConfig) -> Source:
    """`cfg.source` parsed: a named source, or a path recognised by its content (`_recognise`);
    one line when the path does not exist or is not a data set."""
    name, sep, arg = cfg.source.partition(":")
    split = str(cfg.split)
    if name == EMBEDDED_NAME and not sep:
        return Source(cfg.source, split, None, ARRAY, lambda: _load_embedded(split))
    if name == "fashion-mnist":
        path = Path(arg).expanduser() if arg else FASHION_MNIST_DEBIAN_DIR
        return Source(cfg.source, split, path, ARRAY, lambda: _load_fashion_mnist(arg or None, split))
    if name == "cifar10":
        if not arg:
            raise UserError(
                "data.source=cifar10 needs a path: cifar10:/path/to/cifar-10-python.tar.gz, "
                "cifar10:/path/to/cifar-10-batches-py, or cifar10:/path/to/images with train/ and test/ subfolders"
            )
        path = _existing_path(arg, cfg.source)
        kind, load = _recognise(path, split)

        def load_cifar() -> _Raw:
            raw = load()
            raw.description = f"CIFAR-10 {split} from {raw.description}"
            return raw
        return Source(cfg.source, split, path, kind, load_cifar)
    path = _existing_path(cfg.source, cfg.source)
    return Source(cfg.source, split, path, *_recognise(path, split))


def _existing_path(text: str, source: str) -> Path:
    p = Path(text).expanduser()
    if not p.exists():
        raise UserError(
            f"data.source={source!r}: {p} does not exist; give an existing folder or file, "
            f"or a named source ({', '.join(NAMED_SOURCES)})"
        )
    return p


ENCODED, ARRAY = "encoded", "array"  # the kinds of source: image files to decode, or pixels as they are


def _recognise(path: Path, split: str):
    """(kind, loader) for a path: ENCODED for image files, tarballs and LMDBs (worth preparing once,
    io/prepared.py), ARRAY for pixel arrays (read in seconds)."""
    if path.is_dir():
        if (path / "data.mdb").is_file():
            return ENCODED, lambda: _load_lmdb(path)
        batches = _cifar_batches_dir(path)
        if batches is not None:
            return ARRAY, lambda: _load_cifar_dir(batches, split)
        if (path / "cifar-10-python.tar.gz").is_file():
            return ENCODED, lambda: _load_tar(path / "cifar-10-python.tar.gz", split)
        if any("idx3" in p.name for p in path.iterdir() if p.is_file()):
            return ARRAY, lambda: _load_idx_dir(path, split)
        return ENCODED, lambda: _load_folder(path, split)
    low = path.name.lower()
    if low.endswith((".npz", ".npy")):
        return ARRAY, lambda: _load_npz(path, split)
    if low.endswith((".tar", ".tar.gz", ".tgz")):
        return ENCODED, lambda: _load_tar(path, split)
    if path.name == "data.mdb":
        return ENCODED, lambda: _load_lmdb(path.parent)
    if _CIFAR_BATCH.fullmatch(path.name):
        return ARRAY, lambda: _cifar_raw(f"CIFAR-10 batch {path}", [(_read_bytes(path), str(path))])
    if "idx" in low or "ubyte" in low:
        return ARRAY, lambda: _load_idx_file(path)
    raise UserError(
        f"{path}: not a recognised data source; give a folder of images (.png .jpg .jpeg .webp), "
        "CIFAR-10 python batches or tarball, an idx file, an .npz/.npy of uint8 images, an LMDB folder, "
        "or a folder made by `ddpm prepare`"
    )


def stat_fingerprint(path: Optional[Path]) -> str:
    """sha256 of the names, sizes and modification times of a source's files (not their bytes):
    cheap enough for millions of files, and it changes when any file is added, removed or rewritten."""
    h = hashlib.sha256()
    if path is None:
        h.update(f"embedded {__version__}".encode())
        return h.hexdigest()
    path = path.resolve()
    if path.is_file():
        st = path.stat()
        # a name's own bytes: a name that is not UTF-8 hashes too, one that is hashes as before
        h.update(f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
        return h.hexdigest()
    lines: list[str] = []
    _stat_lines(path, "", lines)
    h.update("".join(sorted(lines)).encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def _stat_lines(folder: Path, prefix: str, lines: list) -> None:
    """"relative path, size, mtime" of every file below `folder` (hidden ones and folders that ddpm
    wrote left out, as the image listing leaves them out), by
    os.scandir: its entries carry their type, so only files are stat()ed (50,000 files: ~0.3 s)."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for e in entries:
        if e.name.startswith(".") or e.name == LOCK_NAME:
            continue
        try:
            if e.is_dir(follow_symlinks=False):  # as the image listing (os.walk) does
                if is_ddpm_folder(e.path):
                    continue
                _stat_lines(Path(e.path), f"{prefix}{e.name}/", lines)
            else:
                st = e.stat()
                lines.append(f"{prefix}{e.name}\0{st.st_size}\0{st.st_mtime_ns}\n")
        except OSError:
            continue


def _read_bytes(path: Path) -> bytes:
    try:
        with open_regular(path) as f:
            return f.read()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e}); check the file's permissions") from None


# --- image folders ----------------------------------------------------------------------------


def _load_folder(root: Path, split: str) -> _Raw:
    root = _descend_single_child(root)
    subdirs = {p.name for p in root.iterdir() if p.is_dir()}
    if subdirs & set(SPLITS):
        if split not in subdirs:
            have = "/, ".join(sorted(subdirs & set(SPLITS)))
            raise UserError(
                f"{root}: has a {have}/ subfolder but no {split}/ for data.split={split}; add it or choose another split"
            )
        root = root / split
    files = _list_images(root)
    if not files:
        raise UserError(
            f"{root}: no image files ({' '.join(IMAGE_EXTENSIONS)}) found, searched recursively; "
            "point data.source at a folder of images or a supported data set file"
        )
    labels, classes = _path_labels([PurePosixPath(f.relative_to(root).as_posix()) for f in files])
    return _Raw(f"image folder {root} ({len(files)} files)", items=[(str(f), f) for f in files], labels=labels,
                classes=classes)


def _descend_single_child(root: Path) -> Path:
    """Go down folders that hold nothing but one folder (an archive's top level, e.g. cifar10-jpeg/),
    stopping above a train/ or test/ folder so the split check still sees it."""
    while True:
        entries = [p for p in root.iterdir() if not p.name.startswith(".") and not is_ddpm_folder(p)]
        if len(entries) != 1 or not entries[0].is_dir() or entries[0].name in SPLITS:
            return root
        root = entries[0]


def _list_images(root: Path) -> list[Path]:
    """Image files under root, recursively, sorted by relative path. Hidden files and folders
    (".x") are left out: macOS leaves "._name.jpg" metadata files that are not images. So are
    folders that ddpm wrote (`is_ddpm_folder`): a run's sample grids in `--out D/run` are not data."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and not is_ddpm_folder(Path(dirpath, d))]
        for f in filenames:
            if is_image_file(f):
                found.append(Path(dirpath, f))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


# --- tarballs (CIFAR-10 python release, or images) --------------------------------------------

_CIFAR_BATCH = re.compile(r"data_batch_(\d+)|test_batch")


def _load_tar(path: Path, split: str) -> _Raw:
    batches: dict[str, bytes] = {}
    images: dict[str, bytes] = {}
    has_split_dirs = False
    try:
        # One streaming pass in archive order: seeking back in a .gz restarts decompression.
        with open_regular(path) as f, tarfile.open(fileobj=f, mode="r:*") as tar:
            for m in tar:
                if not m.isfile():
                    continue
                parts = PurePosixPath(m.name).parts
                if _CIFAR_BATCH.fullmatch(parts[-1]):
                    batches[parts[-1]] = tar.extractfile(m).read()
                elif parts[-1].lower().endswith(IMAGE_EXTENSIONS) and not any(p.startswith(".") for p in parts):
                    in_split = set(parts[:-1]) & set(SPLITS)
                    has_split_dirs |= bool(in_split)
                    if not in_split or split in in_split:
                        images[m.name] = tar.extractfile(m).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        reason = " ".join(str(e).split())  # tarfile's messages can span lines
        raise UserError(f"{path}: cannot read the tar archive ({reason}); re-download or re-create it") from None
    if batches:
        names = _cifar_split_names(batches, split)
        if not names:
            raise UserError(f"{path}: holds CIFAR-10 batches but none for data.split={split} ({_cifar_expected(split)})")
        return _cifar_raw(f"CIFAR-10 python tarball {path} ({', '.join(names)})",
                          [(batches[n], f"{path}:{n}") for n in names])
    if has_split_dirs:
        images = {k: v for k, v in images.items() if split in PurePosixPath(k).parts[:-1]}
    if not images:
        raise UserError(
            f"{path}: no CIFAR-10 batches and no image files ({' '.join(IMAGE_EXTENSIONS)}) for data.split={split} "
            "in this archive; give cifar-10-python.tar.gz or a tarball of images"
        )
    names = sorted(images)
    labels, classes = _path_labels([_below_root(PurePosixPath(n)) for n in names])
    return _Raw(f"image tarball {path} ({len(names)} files)", items=[(f"{path}:{n}", images[n]) for n in names],
                labels=labels, classes=classes)


def _below_root(name: PurePosixPath) -> PurePosixPath:
    """An archive member's path below its split folder, or below its top folder when there is none."""
    parts = name.parts
    cut = max((i for i, p in enumerate(parts[:-1]) if p in SPLITS), default=0 if len(parts) > 2 else -1)
    return PurePosixPath(*parts[cut + 1:])


# --- CIFAR-10 python release (pickled batches) -----------------------------------------------


def _cifar_batches_dir(path: Path) -> Optional[Path]:
    for d in (path, path / "cifar-10-batches-py"):
        if d.is_dir() and any(_CIFAR_BATCH.fullmatch(p.name) for p in d.iterdir()):
            return d
    return None


def _cifar_expected(split: str) -> str:
    return "data_batch_1 .. data_batch_5" if split == "train" else "test_batch"


def _cifar_split_names(names, split: str) -> list[str]:
    if split == "test":
        return [n for n in names if n == "test_batch"]
    return sorted((n for n in names if n.startswith("data_batch_")), key=lambda n: int(n.rsplit("_", 1)[1]))


def _load_cifar_dir(d: Path, split: str) -> _Raw:
    names = _cifar_split_names([p.name for p in d.iterdir() if _CIFAR_BATCH.fullmatch(p.name)], split)
    if not names:
        raise UserError(f"{d}: no CIFAR-10 batch for data.split={split} (expected {_cifar_expected(split)})")
    return _cifar_raw(f"CIFAR-10 python batches {d} ({', '.join(names)})", [(_read_bytes(d / n), str(d / n)) for n in names])


def _numpy_global(name: str, module: str):
    """numpy's pickle helper `name` from `numpy._core.<module>` (numpy >= 2) or `numpy.core.<module>`."""
    for package in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{package}.{module}"), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy has no {module}.{name}")


# The only globals a CIFAR-10 batch references: a numpy array is rebuilt from ndarray + dtype by
# _reconstruct (protocols 0-4, `numpy.core` before numpy 2, `numpy._core` after) or _frombuffer
# (protocol 5). Both names map to today's objects, so the deprecated numpy.core is never imported.
_PICKLE_ALLOWED = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}
for _package in ("numpy.core", "numpy._core"):
    _PICKLE_ALLOWED[(f"{_package}.multiarray", "_reconstruct")] = _numpy_global("_reconstruct", "multiarray")
    _PICKLE_ALLOWED[(f"{_package}.numeric", "_frombuffer")] = _numpy_global("_frombuffer", "numeric")


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles plain containers (dict, list, bytes, str, int: pickle opcodes, no globals) and
    numpy arrays; any other global, such as os.system in a hostile file, is refused before it
    is looked up, so nothing in the file can run code."""

    def find_class(self, module: str, name: str):
        obj = _PICKLE_ALLOWED.get((module, name))
        if obj is None:
            raise _RefusedGlobal(f"{module}.{name}")
        return obj


def _cifar_raw(description: str, batches: list[tuple[bytes, str]]) -> _Raw:
    read = [_read_cifar_batch(b, where) for b, where in batches]
    labels = np.concatenate([y for _, y in read])
    return _Raw(description, array=np.concatenate([x for x, _ in read]), labels=labels, classes=CIFAR10_CLASSES)


def _read_cifar_batch(raw: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One batch of the python release -> (uint8 [N, 32, 32, 3], int64 labels [N]). The file is a
    pickled dict (of Python 2 str keys, read as bytes as the CIFAR-10 page advises) with b"data":
    uint8 [N, 3072], each row the 1024 red, then green, then blue values of a 32x32 image,
    row-major, and b"labels": N class ids 0 … 9 (CIFAR10_CLASSES)."""
    try:
        obj = _RestrictedUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except _RefusedGlobal as e:
        raise UserError(
            f"{where}: refused to unpickle: the file calls {e}, which a CIFAR-10 batch never does "
            "(a hostile or foreign file); use the official cifar-10-python.tar.gz"
        ) from None
    except Exception as e:  # a malformed pickle can fail in many ways; all mean "not a batch"
        raise UserError(
            f"{where}: not a readable CIFAR-10 python batch ({type(e).__name__}: {e}); "
            "re-download cifar-10-python.tar.gz"
        ) from None
    data = obj.get(b"data", obj.get("data")) if isinstance(obj, dict) else None
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072):
        raise UserError(
            f"{where}: not a CIFAR-10 python batch (expected a dict with b'data' a uint8 [N, 3072] array); "
            "re-download cifar-10-python.tar.gz"
        )
    labels = obj.get(b"labels", obj.get("labels"))
    try:
        labels = np.asarray(labels, np.int64).reshape(-1)
    except (TypeError, ValueError):
        labels = np.zeros(0, np.int64)
    if len(labels) != len(data) or (labels.size and not (0 <= labels.min() and labels.max() < 10)):
        raise UserError(f"{where}: b'labels' is not {len(data)} class ids 0 … 9; re-download cifar-10-python.tar.gz")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


# --- idx files (MNIST, Fashion-MNIST) ---------------------------------------------------------

# Type byte of the idx header -> numpy dtype (data is big-endian), per the MNIST page.
_IDX_TYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Union[str, Path]) -> np.ndarray:
    """Read an idx file (raw or gzip): 2 zero bytes, a type byte, a dimension count, the
    dimensions as big-endian uint32, then the data in C order. Returns a read-only array."""
    path = Path(path)
    raw = _read_bytes(path)
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise UserError(f"{path}: corrupt gzip data ({e}); re-download the file") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise UserError(
            f"{path}: not an idx file (starts with {raw[:4].hex() or 'nothing'}; expected 0000, a type byte "
            "08/09/0b/0c/0d/0e and a dimension count); give an idx file such as train-images-idx3-ubyte.gz"
        )
    ndim, dtype = raw[3], np.dtype(_IDX_TYPES[raw[2]])
    start = 4 + 4 * ndim
    if len(raw) < start:
        raise UserError(f"{path}: idx header is cut short ({len(raw)} bytes for {ndim} dimensions); re-download the file")
    dims = struct.unpack(f">{ndim}I", raw[4:start])
    need = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(raw) - start != need:
        raise UserError(
            f"{path}: idx header says shape {list(dims)} ({need} data bytes) but the file holds "
            f"{len(raw) - start}; the file is truncated or corrupt, re-download it"
        )
    return np.frombuffer(raw, dtype, offset=start).reshape(dims)


def _idx_images(path: Path) -> np.ndarray:
    a = read_idx(path)
    if a.dtype != np.uint8 or a.ndim not in (3, 4) or (a.ndim == 4 and a.shape[3] not in (1, 3)):
        raise UserError(
            f"{path}: idx data is {a.dtype} of shape {list(a.shape)}, not uint8 images [N, H, W] "
            "(a labels file?); give the images file, e.g. train-images-idx3-ubyte.gz"
        )
    return a[..., None] if a.ndim == 3 else a


def _load_idx_file(path: Path, names: Optional[tuple[str, ...]] = None) -> _Raw:
    """An idx images file, with the labels file beside it when there is one (`images` -> `labels`,
    `idx3` -> `idx1` in the name, as in the MNIST and Fashion-MNIST releases)."""
    raw = _Raw(f"idx file {path}", array=_idx_images(path))
    twin = path.with_name(path.name.replace("images", "labels").replace("idx3", "idx1"))
    if twin != path and twin.is_file():
        y = read_idx(twin)
        if y.dtype != np.uint8 or y.ndim != 1 or len(y) != len(raw.array):
            raise UserError(f"{twin}: expected {len(raw.array)} uint8 labels for {path.name}, found {y.dtype} "
                            f"{list(y.shape)}; re-download it or remove it")
        raw.labels, raw.classes = y.astype(np.int64), _classes_for(y, names, str(twin))
    return raw


def _find_idx_images(d: Path, split: str) -> Optional[Path]:
    """`train-images-idx3-ubyte[.gz]` or `t10k-...` (also the `train-images.idx3-ubyte` spelling)."""
    prefix = "train" if split == "train" else "t10k"
    found = sorted(
        p for p in d.iterdir() if p.is_file() and p.name.startswith(prefix) and "images" in p.name and "idx3" in p.name
    )
    return found[0] if found else None


def _load_idx_dir(d: Path, split: str, names: Optional[tuple[str, ...]] = None) -> _Raw:
    f = _find_idx_images(d, split)
    if f is None:
        prefix = "train" if split == "train" else "t10k"
        raise UserError(f"{d}: no {prefix}-images-idx3-ubyte[.gz] for data.split={split}; add it or choose another split")
    return _load_idx_file(f, names)


def _load_fashion_mnist(arg: Optional[str], split: str) -> _Raw:
    d = Path(arg).expanduser() if arg else FASHION_MNIST_DEBIAN_DIR
    if not d.is_dir():
        if arg:
            raise UserError(
                f"data.source=fashion-mnist:{arg}: {d} is not a folder; "
                "give the folder holding train-images-idx3-ubyte.gz and t10k-images-idx3-ubyte.gz"
            )
        raise UserError(
            f"data.source=fashion-mnist: {d} not found; install it with `apt-get install dataset-fashion-mnist` "
            "or give its folder as fashion-mnist:/path/to/dir"
        )
    raw = _load_idx_dir(d, split, FASHION_MNIST_CLASSES)
    raw.description = f"Fashion-MNIST {split} from {raw.description}"
    return raw


# --- .npz / .npy ------------------------------------------------------------------------------


def _load_npz(path: Path, split: str) -> _Raw:
    regular_file(path)
    try:
        z = np.load(path, allow_pickle=False)
    except ValueError as e:  # a .npy of Python objects, or a header numpy refuses
        if "allow_pickle" not in str(e):
            raise UserError(f"{path}: has a header that cannot be read ({e}); the file is damaged: "
                            f"re-create it") from None
        raise UserError(f"{path}: cannot load ({e}); pickled objects are refused, save the images as a uint8 array") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise UserError(f"{path}: not a readable .npz/.npy file ({e}); re-create it with np.savez(path, x=images)") from None
    if isinstance(z, np.ndarray):
        key, arr = None, z
    else:
        with z:
            keys = list(z.files)
            only = keys[0] if len(keys) == 1 else None
            key = next((k for k in (f"x_{split}", "x", "images", "arr_0") if k in keys), only)
            if key is None:
                raise UserError(
                    f"{path}: cannot tell which array holds the images (arrays: {', '.join(keys) or 'none'}); "
                    "name it 'x' or 'images', or save only one array"
                )
            try:
                arr = z[key]
            except ValueError as e:
                if "allow_pickle" not in str(e):  # a header numpy refuses: a size past what exists, a bad shape
                    raise UserError(f"{path}: array {key!r} has a header that cannot be read ({e}); the file is "
                                    f"damaged: re-create it") from None
                raise UserError(
                    f"{path}: array {key!r} holds Python objects, refused because loading them runs pickle; "
                    "save the images as a uint8 array, e.g. np.savez(path, x=images.astype(np.uint8))"
                ) from None
            except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
                raise UserError(f"{path}: array {key!r} is corrupt ({e}); re-create the file") from None
    where = f"{path}" + (f" array {key!r}" if key else "")
    labels = None
    if not isinstance(z, np.ndarray):
        ykey = next((k for k in (f"y_{split}", "y", "labels") if k in keys), None)
        if ykey is not None:
            with np.load(path, allow_pickle=False) as z2:
                try:
                    labels = np.asarray(z2[ykey]).reshape(-1)
                except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
                    raise UserError(f"{path}: labels array {ykey!r} is unreadable ({e}); re-create the file") from None
            if not np.issubdtype(labels.dtype, np.integer) or len(labels) != len(arr):
                raise UserError(f"{path}: labels array {ykey!r} is {labels.dtype} [{len(labels)}], expected {len(arr)} "
                                f"integer class ids; fix it or save the images alone")
    if arr.dtype != np.uint8:
        raise UserError(
            f"{where}: dtype {arr.dtype}, expected uint8 pixels 0..255; convert first, "
            "e.g. (x * 255).round().astype(np.uint8) for floats in [0, 1]"
        )
    if arr.ndim == 3:
        arr = arr[..., None]
    elif arr.ndim != 4 or arr.shape[3] not in (1, 3):
        hint = "; it looks like NCHW, transpose it to NHWC" if arr.ndim == 4 and arr.shape[1] in (1, 3) else ""
        raise UserError(
            f"{where}: shape {list(arr.shape)}, expected uint8 images [N, H, W] or [N, H, W, C] with C = 1 or 3{hint}"
        )
    if 0 in arr.shape[1:]:
        raise UserError(f"{where}: shape {list(arr.shape)}: images of {arr.shape[1]}x{arr.shape[2]} pixels with "
                        f"{arr.shape[3]} channel(s) hold no pixels; save images of at least 1x1")
    return _Raw(f"array file {where}", array=arr, labels=None if labels is None else labels.astype(np.int64),
                classes=() if labels is None else _classes_for(labels, where=f"{path} array {ykey!r}"))


# --- LMDB (LSUN) ------------------------------------------------------------------------------


def _load_lmdb(path: Path) -> _Raw:
    try:
        import lmdb
    except ImportError:
        raise UserError(
            f"{path}: reading an LMDB data set needs the lmdb package; run `pip install lmdb` (or pip install 'ddpm[lmdb]')"
        ) from None
    regular_file(path / "data.mdb")
    try:
        env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, subdir=True)
    except lmdb.Error as e:
        raise UserError(f"{path}: cannot open as LMDB ({e}); give the folder holding data.mdb") from None
    try:
        with env.begin(write=False) as txn:
            # Keys in LMDB's sorted order; a key may be any bytes (LSUN uses hex ids).
            items = [(f"{path} key {k.decode('utf-8', 'backslashreplace')}", bytes(v)) for k, v in txn.cursor()]
    except lmdb.Error as e:
        raise UserError(f"{path}: LMDB read failed ({e}); the database may be corrupt") from None
    finally:
        env.close()
    if not items:
        raise UserError(f"{path}: the LMDB holds no entries; give an LMDB of encoded images (such as LSUN's)")
    category = re.sub(r"_(train|val|test)?_?lmdb$", "", path.name) or path.name  # LSUN: bedroom_train_lmdb
    return _Raw(f"LMDB {path} ({len(items)} entries)", items=items, labels=np.zeros(len(items), np.int64),
                classes=(category,))


# --- embedded Fashion-MNIST subset ------------------------------------------------------------


def _load_embedded(split: str) -> _Raw:
    if split != "train":
        raise UserError(
            f"data.source={EMBEDDED_NAME} is a subset of the Fashion-MNIST train split and has no {split} split; "
            "use data.source=fashion-mnist (apt-get install dataset-fashion-mnist) for the test split"
        )
    res = importlib.resources.files("ddpm").joinpath("assets", EMBEDDED_FILE)
    with importlib.resources.as_file(res) as p:
        if not Path(p).is_file():
            raise UserError(
                f"{p}: the embedded {EMBEDDED_NAME} file is missing; reinstall ddpm or run scripts/make_fashion_mnist_10k.py"
            )
        raw = _load_npz(Path(p), split)
    raw.classes = FASHION_MNIST_CLASSES
    raw.description = f"{EMBEDDED_NAME} (embedded: first 1,000 per class of the Fashion-MNIST train set)"
    return raw


# ---------------------------------------------------------------------------------------------
# Preprocessing (io/images.py) on a thread pool, in order: the same for memory and for prepare.
# ---------------------------------------------------------------------------------------------


def source_length(raw: _Raw) -> int:
    return len(raw.array) if raw.array is not None else len(raw.items)


def item_name(raw: _Raw, i: int) -> str:
    return shown(raw.items[i][0]) if raw.items is not None else f"{raw.description} image {i}"


def decode(raw: _Raw, cfg: DataConfig, start: int = 0, stop: Optional[int] = None, bar=None):
    """Yield (i, uint8 HWC array or None, enlarged-or-reason) for images start … stop-1 of `raw`,
    in order, each by the one rule (io/images.py). An array needing no resize is converted whole."""
    stop = source_length(raw) if stop is None else stop
    if raw.array is not None and _needs_no_resize(raw.array, cfg):
        a = _convert_channels(raw.array[start:stop], cfg.channels)
        for k in range(len(a)):
            yield start + k, a[k], False
        if bar is not None:
            bar.update(len(a))
        return
    sources = [raw.array[i] for i in range(start, stop)] if raw.array is not None else \
        [raw.items[i][1] for i in range(start, stop)]
    pool = ThreadPoolExecutor(DECODE_THREADS)
    try:
        for k, (a, info) in enumerate(pool.map(lambda x: prepare_image(x, cfg.size, cfg.channels, cfg.crop),
                                               sources)):
            if bar is not None:
                bar.update()
            yield start + k, a, info
    finally:
        # A UserError, Ctrl-C or SIGTERM mid-way cancels the rest and returns at once: the images
        # being decoded are dropped when done (each is bounded: prepare_image's size checks).
        pool.shutdown(wait=False, cancel_futures=True)


def _decode_readable(raw: _Raw, cfg: DataConfig, skipped: list, start: int = 0, stop: Optional[int] = None,
                     bar=None):
    """`decode`, with the policy for unreadable files applied: stop with one line naming the file
    (data.on_error=stop), or append its name to `skipped` and go on (skip)."""
    with contextlib.closing(decode(raw, cfg, start, stop, bar)) as results:
        for i, a, info in results:
            if a is None:
                if cfg.on_error == "stop":
                    raise _unreadable(item_name(raw, i), info)
                skipped.append(item_name(raw, i))
                continue
            yield i, a, info


def first_image(raw: _Raw, cfg: DataConfig) -> tuple[str, tuple[int, int, int]]:
    """The first readable image's name and (C, H, W), decoded one at a time: it fixes the size of
    the set (when data.resolution is unset) and, for channels=auto, its channel count (`conformed`)."""
    n = source_length(raw)
    for i in range(n):
        _, a, info = next(iter(decode(raw, cfg, i, i + 1)))
        if a is not None:
            return item_name(raw, i), (a.shape[2], a.shape[0], a.shape[1])
        if cfg.on_error == "stop":
            raise _unreadable(item_name(raw, i), info)
    raise UserError(f"{raw.description}: none of the {n} files is a readable image; check the files")


def conformed(raw: _Raw, cfg: DataConfig, skipped: list, first: tuple[str, tuple[int, int, int]],
              start: int = 0, stop: Optional[int] = None, bar=None):
    """Yield (i, uint8 HWC array, whether it was enlarged) for the readable images start … stop-1
    of `raw`, each decoded by the one rule (io/images.py) and made to fit the set that `first`
    (the first readable image's name and (C, H, W), `first_image`) starts. Both placements are
    filled from here, in memory (`load_images`) and prepared on disk (io/prepared.py), so the two
    cannot differ.

    The rule for the size: every image must come out at the first one's size (a resolution set in
    the config makes them so). The rule for channels under data.channels=auto, written only here:
    the first image decides. A set that starts in colour stays colour, and a gray image in it is
    repeated to RGB (lossless). A set that starts gray stays gray, and a colour image in it is one
    line naming it: turning it gray would lose colour without a word, so the user chooses
    (data.channels=rgb or gray)."""
    name0, (c, h, w) = first
    with contextlib.closing(_decode_readable(raw, cfg, skipped, start, stop, bar)) as results:
        for i, a, info in results:
            if a.shape[:2] != (h, w):
                raise UserError(
                    f"{raw.description}: images differ in size after the crop ({h}x{w} in {name0}, "
                    f"{a.shape[0]}x{a.shape[1]} in {item_name(raw, i)}); set data.resolution to resize them all")
            if a.shape[2] != c:
                if c == 1:
                    raise UserError(f"{item_name(raw, i)}: a colour image, but the first image {name0} is gray "
                                    f"(data.channels=auto); set data.channels=rgb (--channels rgb) to keep colour, "
                                    f"or gray")
                a = np.broadcast_to(a, (h, w, c))  # gray among colour: repeated, lossless
            yield i, a, info


def _needs_no_resize(a: np.ndarray, cfg: DataConfig) -> bool:
    h, w = a.shape[1:3]
    return cfg.size in (None, (h, w)) and (h == w or cfg.size == (h, w))


def _convert_channels(a: np.ndarray, channels: str) -> np.ndarray:
    if channels == "rgb" and a.shape[-1] == 1:
        return np.repeat(a, 3, axis=-1)
    if channels == "gray" and a.shape[-1] == 3:
        return rgb_to_gray(a)
    return a


def _unreadable(name: str, info: str) -> UserError:
    return UserError(f"{name}: cannot read image ({info}); fix or delete the file, or set data.on_error=skip")


def _finish(raw: _Raw, cfg: DataConfig) -> ImageSet:
    n = source_length(raw)
    if n == 0:
        raise UserError(f"{raw.description}: holds no images; give a non-empty data set")
    if raw.array is not None and _needs_no_resize(raw.array, cfg):  # no resampling: stay vectorised, no copy
        labels = None if raw.labels is None else torch.from_numpy(raw.labels)
        return _image_set(_convert_channels(raw.array, cfg.channels), raw.description, [], labels, raw.classes)
    first = first_image(raw, cfg)
    c, h, w = first[1]
    out = np.empty((n, h, w, c), np.uint8)
    kept, skipped, up = [], [], 0
    bar = progress_bar(n, desc="decoding images", unit="img", enabled=raw.items is not None and n > PROGRESS_MIN_ITEMS)
    with bar, contextlib.closing(conformed(raw, cfg, skipped, first, bar=bar)) as results:
        for i, a, info in results:
            out[len(kept)] = a
            kept.append(i)
            up += bool(info)
    if skipped:
        warnings.warn(
            f"data: skipped {len(skipped)} unreadable image(s) of {n} in {raw.description} "
            f"(data.on_error=skip); first: {skipped[0]}",
            stacklevel=3,
        )
    labels = None if raw.labels is None else torch.from_numpy(raw.labels[kept])
    return _image_set(out[:len(kept)], raw.description + resize_note(cfg, up, n), skipped, labels, raw.classes)


def resize_note(cfg: DataConfig, enlarged: int, n: int) -> str:
    if cfg.size is None:
        return ""
    how = "padded" if cfg.crop == "pad" else "centre-cropped"
    note = f", {how} and Lanczos-resized to {cfg.size[0]}x{cfg.size[1]}"
    return note + (f" ({enlarged} of {n} upsampled)" if enlarged else "")


def _image_set(nhwc: np.ndarray, description: str, skipped: list[str], labels, classes) -> ImageSet:
    nchw = np.ascontiguousarray(nhwc.transpose(0, 3, 1, 2))
    if not nchw.flags.writeable:  # a view of a read-only buffer (e.g. an idx file's bytes)
        nchw = nchw.copy()
    images = torch.from_numpy(nchw)
    n, c, h, w = images.shape
    desc = f"{description}; {n} images {c}x{h}x{w}" + (f", {len(skipped)} unreadable skipped" if skipped else "")
    return ImageSet(images=images, source_description=desc, skipped=skipped, labels=labels, classes=tuple(classes))
