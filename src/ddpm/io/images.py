"""Image files: which ones we read, how a picture becomes data, grids and PNGs.

One preprocessing rule for every source of pixels (data sets, the images given to `ddpm
interpolate` / `reconstruct`): convert the pixel mode to grayscale or RGB, centre-crop to the
target's aspect ratio (a square by default) or pad to it, resize to the model's size. The crop and resize are those of the official DDPM LSUN data,
made by StyleGAN2's dataset tool (`create_lsun`): crop the largest centred square (offset
(size - side) // 2), then PIL's antialiased Lanczos resize (`PIL.Image.ANTIALIAS`, today
`Image.Resampling.LANCZOS`). Images smaller than the resolution are upsampled with the same filter.

Every picture this package writes goes through `write_png` (atomic, see atomic.py).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch
from PIL import Image

from ..config import MAX_SIDE
from ..errors import UserError
from ..files import NotRegularFile, open_regular, regular_file
from .atomic import atomic_file

# Every file extension read as an image, by data sets and by FID's sample folders alike.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# PIL's names for the formats of those extensions (its JPEG opener also takes a camera's MPO), the
# only decoders PIL may try on a file. By default it identifies any of its forty-odd formats from
# the bytes, and some decoders run programs (EPS hands the file to Ghostscript), so a data file
# named .png could start one.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP")
CHANNEL_MODES = {1: "gray", 3: "rgb"}


def is_image_file(name: str) -> bool:
    """An image by its extension; hidden files (".x", e.g. macOS's "._name.jpg") are not."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def to_gray_or_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> "L" or "RGB".

    Transparency (RGBA, LA, PA, P with a transparent colour) is composited on white, as a viewer
    shows it; the colour stored under fully transparent pixels is often arbitrary. 16-bit
    grayscale (I;16*, and I, which older Pillow gives for 16-bit PNG) maps to 8 bits by
    round(v / 257), so 65535 -> 255; PIL's own convert("L") would clip above 255 instead.
    P becomes RGB (the palette is colour); CMYK, YCbCr, LAB, HSV go through PIL's RGB conversion.
    """
    mode = im.mode
    if mode in ("L", "RGB"):
        return im
    if mode == "1":
        return im.convert("L")
    if mode == "I" or mode.startswith("I;16"):
        v = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
        return Image.fromarray(((v * 255 + 32767) // 65535).astype(np.uint8), "L")
    if mode == "F":
        return Image.fromarray(np.clip(np.rint(np.asarray(im)), 0, 255).astype(np.uint8), "L")
    if mode in ("LA", "La"):
        return _on_white(im.convert("RGBA")).convert("L")  # gray -> RGB -> L is exact
    if mode in ("RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in im.info):
        return _on_white(im.convert("RGBA"))
    return im.convert("RGB")


def _on_white(rgba: Image.Image) -> Image.Image:
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def crop_resize(im: Image.Image, size: Optional[tuple[int, int]], crop: str = "center") -> Image.Image:
    """Fit a picture to `size` = (height, width) with an antialiased Lanczos resize (None: no resize).

    crop="center": the largest centred region of the target's aspect ratio (a square by default,
    offset (size - side) // 2 as in the official LSUN data), then the resize. crop="pad": the whole
    picture resized to fit inside the target, centred on black (with size None: padded to a square).
    """
    w, h = im.size
    if crop == "pad":
        th, tw = size if size is not None else (max(w, h), max(w, h))
        scale = min(tw / w, th / h) if size is not None else 1.0
        nw, nh = max(1, min(tw, round(w * scale))), max(1, min(th, round(h * scale)))
        if (nw, nh) != (w, h):
            im = im.resize((nw, nh), Image.Resampling.LANCZOS)
        if (nw, nh) == (tw, th):
            return im
        canvas = Image.new(im.mode, (tw, th), 0)
        canvas.paste(im, ((tw - nw) // 2, (th - nh) // 2))
        return canvas
    th, tw = size if size is not None else (min(w, h), min(w, h))
    if w * th > h * tw:  # wider than the target: keep the full height
        cw, ch = max(1, min(w, round(h * tw / th))), h
    else:
        cw, ch = w, max(1, min(h, round(w * th / tw)))
    if (cw, ch) != (w, h):
        left, top = (w - cw) // 2, (h - ch) // 2
        im = im.crop((left, top, left + cw, top + ch))
    if (cw, ch) != (tw, th):
        im = im.resize((tw, th), Image.Resampling.LANCZOS)
    return im


def upsampled(src_size: tuple[int, int], size: Optional[tuple[int, int]], crop: str = "center") -> bool:
    """Whether fitting a (width, height) picture to `size` = (height, width) enlarges it."""
    if size is None:
        return False
    w, h = src_size
    th, tw = size
    return (min(tw / w, th / h) if crop == "pad" else max(tw / w, th / h)) > 1


def rgb_to_gray(a: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> [..., 1] with PIL's convert("L") integer formula (ITU-R 601-2 luma)."""
    a = a.astype(np.uint32)
    y = (a[..., 0] * 19595 + a[..., 1] * 38470 + a[..., 2] * 7471 + 0x8000) >> 16
    return y.astype(np.uint8)[..., None]


def open_image(src: Union[str, Path, bytes]) -> Image.Image:
    """Decode a file (a path or its bytes) in one of IMAGE_FORMATS now, as "L" or "RGB". Raises
    whatever PIL raises (for a file of another format: cannot identify image file)."""
    with io.BytesIO(src) if isinstance(src, bytes) else open_regular(src) as fh, \
            Image.open(fh, formats=IMAGE_FORMATS) as f:
        f.load()  # decode now: open() only reads the header
        return to_gray_or_rgb(f)


def prepare_image(src, size: Optional[tuple[int, int]], channels: str = "auto", crop: str = "center"):
    """One image (path, encoded bytes, or uint8 HWC array) -> (uint8 HWC array, whether it was
    enlarged), by the module's one rule. Returns (None, reason) for an unreadable file instead of
    raising, so that a data set can apply its skip/stop policy.

    :param size: (height, width), or None to keep the (centre-cropped square or padded) own size.
    :param channels: "auto" (gray stays 1 channel, colour 3), "rgb" or "gray".
    :param crop: "center" or "pad" (crop_resize).
    """
    try:
        if isinstance(src, np.ndarray):
            im = Image.fromarray(src[..., 0] if src.shape[2] == 1 else src)
        else:
            im = open_image(src)
    except NotRegularFile as e:  # a FIFO, a socket, a device: never opened for reading
        return None, f"a {e.kind}, not a regular file"
    except Exception as e:  # PIL raises many types for broken files (OSError, SyntaxError, ...)
        return None, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    # Channel conversion before the resize, the same order as for arrays in data.py.
    if channels == "rgb" and im.mode == "L":
        im = im.convert("RGB")
    elif channels == "gray" and im.mode == "RGB":
        im = im.convert("L")
    if size is None:  # the picture's own size (cropped or padded to a square) is the size
        w, h = im.size
        side = max(w, h) if crop == "pad" else min(w, h)
        if side > MAX_SIDE:
            return None, (f"its own size {w}x{h} makes {side}x{side} images, over {MAX_SIDE}, the most ddpm takes; "
                          f"set data.resolution (--resolution)")
    up = upsampled(im.size, size, crop)
    a = np.asarray(crop_resize(im, size, crop))
    return (a[..., None] if a.ndim == 2 else a), up


def read_image(path, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """One picture file as the model sees data: converted to gray (channels=1) or RGB (3), the
    largest centred region of the model's aspect ratio Lanczos-resized to `size` = (H, W).
    -> uint8 [C, H, W]."""
    path = Path(path)
    if not regular_file(path).is_file():
        raise UserError(f"{path}: no such image file")
    a, info = prepare_image(path, size, CHANNEL_MODES[channels])
    if a is None:
        raise UserError(f"{path}: cannot read image ({info}); give a PNG, JPEG, WebP or BMP file")
    return torch.from_numpy(a.transpose(2, 0, 1).copy())


def make_grid(images: torch.Tensor, nrow: Optional[int] = None, pad: int = 2) -> np.ndarray:
    """uint8 [N, C, H, W] -> one uint8 HWC (or HW) picture with `nrow` images per row, on white."""
    n, c, h, w = images.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    rows = int(math.ceil(n / nrow))
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    arr = images.permute(0, 2, 3, 1).cpu().numpy()
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = arr[i]
    return grid[..., 0] if c == 1 else grid


def make_class_grid(images: torch.Tensor, labels, per_row: int = 8, pad: int = 2) -> np.ndarray:
    """uint8 [N, C, H, W] with a class label each -> a grid with one class per row (classes in
    increasing order), the first `per_row` images of each class in their order, on white."""
    labels = torch.as_tensor(labels).cpu()
    classes = sorted(set(labels.tolist()))
    cells = torch.full((len(classes) * per_row, *images.shape[1:]), 255, dtype=torch.uint8)
    for r, k in enumerate(classes):
        mine = images[(labels == k).nonzero().flatten()[:per_row]]
        cells[r * per_row: r * per_row + len(mine)] = mine.cpu()
    return make_grid(cells, nrow=per_row, pad=pad)


def figure_png(draw: Callable, size: tuple = (6.4, 3.6), dpi: int = 100) -> bytes:
    """A matplotlib figure drawn by `draw(fig)`, as PNG bytes (the Agg backend: no display needed;
    matplotlib is imported here only, for the plots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=size, dpi=dpi)
    try:
        draw(fig)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    return buf.getvalue()


def write_png(array: np.ndarray, path) -> Path:
    """uint8 HW, HW1 or HWC pixels as a PNG, written atomically."""
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    with atomic_file(path) as f:
        Image.fromarray(a).save(f, format="PNG")
    return Path(path)


def read_png(path: Path) -> Optional[np.ndarray]:
    """uint8 HWC pixels of a PNG, or None when it is missing or unreadable (for example a write
    killed half way by a tool that was not atomic)."""
    if not path.is_file():
        return None
    try:
        with open_regular(path) as fh, Image.open(fh, formats=("PNG",)) as im:
            im.load()
            a = np.asarray(im)
    except Exception:  # any decoding failure means "not there yet"
        return None
    return a[..., None] if a.ndim == 2 else a
