"""The image sets evaluation reads, as placements of the one `DataSet` interface (io/data.py).

    open_images("runs/x/eval/samples")       # a folder of image files: `ImageFolder`
    open_images("runs/x/samples.npz")        # the uint8 array of an .npz: `NpzImages`
    Subset(images, 0, 10_000)                # images 0 … 9,999 of another set (one seed set)

FID, KID and the rest (workflows/evaluate.py) read every set the same way, `len`, `shape`,
`gather(indices)` and `fingerprint()`, whether it is training data (in memory, prepared, LitData)
or samples. Neither placement here holds a set in memory: a 50,000-image sample set is read a
batch at a time. Unlike training data they are read as they are stored, with no resize and no
channel change (FID's network takes gray or colour at any size), since what is measured must be
the pixels a user would save.
"""

from __future__ import annotations

import re
import sys
import zipfile
from pathlib import Path
from typing import Union

import numpy as np
import torch

from ..errors import UserError
from .data import DataSet
from .images import IMAGE_EXTENSIONS, open_image


def _indices(indices) -> list[int]:
    return torch.as_tensor(indices, dtype=torch.long).reshape(-1).tolist()


class ImageFolder(DataSet):
    """The image files of a folder (not recursive), in file-name order; in a folder written by
    `ddpm sample` / `ddpm eval` only the numbered samples. Gray files stay 1-channel (repeated to
    RGB by the network wrapper); anything else is converted to RGB."""

    def __init__(self, root: Path):
        self.files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if (root / "sampling.json").is_file():  # a `ddpm sample` folder: 000000.png …, not grid.png
            self.files = [p for p in self.files if re.fullmatch(r"\d+\.png", p.name)]
        if not self.files:
            raise UserError(f"{root}: no image files ({' '.join(IMAGE_EXTENSIONS)}) in this folder")
        self.source_description, self.skipped = f"{len(self.files)} image files in {root}", []
        self._shape = None
        lossy = [p for p in self.files if p.suffix.lower() in (".jpg", ".jpeg", ".webp")]
        if lossy:
            print(f"warning: {root}: {len(lossy)} images are in a lossy format ({lossy[0].name}); the FID protocol "
                  f"measures lossless PNGs", file=sys.stderr)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the first file; `gather` refuses a batch whose files differ from each other."""
        if self._shape is None:
            self._shape = tuple(self.gather([0]).shape[1:])
        return self._shape

    def gather(self, indices) -> torch.Tensor:
        out = []
        for i in _indices(indices):
            a = np.asarray(open_image(self.files[i]))
            out.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
        shapes = {a.shape for a in out}
        if len(shapes) > 1:
            raise UserError(f"{self.source_description}: images of different sizes or modes {sorted(shapes)[:2]}; "
                            f"FID statistics need one size")
        return torch.from_numpy(np.stack(out))


class NpzImages(DataSet):
    """A uint8 array in an .npz (key `x` as `ddpm sample` writes it, else `samples`, `images`,
    `arr_0`), [N, H, W, C], [N, C, H, W] or [N, H, W]; read row by row from the archive, never
    whole (training's reader, io/data.py, loads an .npz of training images whole instead: it
    keeps them in memory anyway)."""

    KEYS = ("x", "samples", "images", "arr_0")

    def __init__(self, path: Path):
        self.path = path
        try:
            with zipfile.ZipFile(path) as zf:
                names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
                key = next((k for k in self.KEYS if k in names), names[0] if len(names) == 1 else None)
                if key is None:
                    raise UserError(f"{path}: holds {', '.join(names)}; expected one array or one named "
                                    f"{', '.join(self.KEYS)}")
                with zf.open(key + ".npy") as f:
                    version = np.lib.format.read_magic(f)
                    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                        np.lib.format.read_array_header_2_0
                    shape, fortran, dtype = read_header(f)
                    self.offset = f.tell()
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"{path}: not a readable .npz ({type(e).__name__}: {e})") from None
        self.key = key
        if dtype != np.uint8:
            raise UserError(f"{path}: '{key}' holds {dtype} pixels; FID is measured on the uint8 images a user would "
                            f"save: round them ((x + 1) * 127.5, rounded, clipped to 0..255) first")
        if fortran or len(shape) not in (3, 4):
            raise UserError(f"{path}: '{key}' has shape {shape}; expected [N, H, W, C], [N, C, H, W] or [N, H, W] in C order")
        if len(shape) == 3:
            self.layout = "NHW"
        elif shape[-1] in (1, 3):
            self.layout = "NHWC"
        elif shape[1] in (1, 3):
            self.layout = "NCHW"
        else:
            raise UserError(f"{path}: '{key}' has shape {shape}: cannot tell the channel axis (1 or 3 channels)")
        self.stored_shape = tuple(int(d) for d in shape)
        self.row = int(np.prod(shape[1:]))
        self.source_description = f"{self.stored_shape[0]} images in {path} ['{key}', {self.layout}]"
        self.skipped = []

    def __len__(self) -> int:
        return self.stored_shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        s = self.stored_shape
        return (1, *s[1:]) if self.layout == "NHW" else (s[3], s[1], s[2]) if self.layout == "NHWC" else s[1:]

    def gather(self, indices) -> torch.Tensor:
        indices = _indices(indices)
        out = np.empty((len(indices), self.row), np.uint8)
        with zipfile.ZipFile(self.path) as zf, zf.open(self.key + ".npy") as f:
            pos = None
            for j, i in enumerate(indices):
                want = self.offset + i * self.row
                if pos != want:
                    f.seek(want)
                buf = f.read(self.row)
                if len(buf) != self.row:
                    raise UserError(f"{self.path}: truncated at image {i}")
                out[j] = np.frombuffer(buf, np.uint8)
                pos = want + self.row
        a = out.reshape(len(indices), *self.stored_shape[1:])
        if self.layout == "NHW":
            a = a[:, None]
        elif self.layout == "NHWC":
            a = a.transpose(0, 3, 1, 2)
        return torch.from_numpy(np.ascontiguousarray(a))


class Subset(DataSet):
    """Images start … stop − 1 of another set, as images 0 … stop − start − 1 (one seed set)."""

    def __init__(self, base: DataSet, start: int, stop: int):
        self.base, self.start, self.stop = base, int(start), int(stop)
        self.source_description = f"images {start}..{stop - 1} of {base.source_description}"
        self.skipped = []
        self.labels = None if base.labels is None else base.labels[self.start:self.stop]
        self.classes = base.classes

    def __len__(self) -> int:
        return self.stop - self.start

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.base.shape

    def gather(self, indices) -> torch.Tensor:
        return self.base.gather(torch.as_tensor(indices, dtype=torch.long).reshape(-1) + self.start)


def open_images(path: Union[str, Path]) -> DataSet:
    """A folder of image files or an .npz of uint8 pixels."""
    p = Path(path)
    if p.is_dir():
        return ImageFolder(p)
    if p.is_file() and p.suffix == ".npz":
        return NpzImages(p)
    if p.is_file() and p.suffix == ".npy":
        raise UserError(f"{p}: save the samples as .npz (np.savez(path, x=uint8 array)) or as a folder of PNGs")
    raise UserError(f"{p}: no such folder of images or .npz file")
