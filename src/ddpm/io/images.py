"""Image files: which ones we read, how a picture becomes data, grids and PNGs.

One preprocessing rule for every source of pixels (data sets, the images given to `ddpm
interpolate` / `reconstruct`): convert the pixel mode to grayscale or RGB, centre-crop to a square,
resize to the model's resolution. The crop and resize are those of the official DDPM LSUN data,
made by StyleGAN2's dataset tool (`create_lsun`): crop the largest centred square (offset
(size - side) // 2), then PIL's antialiased Lanczos resize (`PIL.Image.ANTIALIAS`, today
`Image.Resampling.LANCZOS`). Images smaller than the resolution are upsampled with the same filter.

Every picture this package writes goes through `write_png` (atomic, see atomic.py).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from PIL import Image

from ..errors import UserError
from .atomic import atomic_file

# Every file extension read as an image, by data sets and by FID's sample folders alike.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
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


def crop_resize(im: Image.Image, resolution: Optional[int]) -> Image.Image:
    """Largest centred square, then Lanczos (antialiased) to `resolution` (None: no resize)."""
    w, h = im.size
    s = min(w, h)
    if w != h:
        left, top = (w - s) // 2, (h - s) // 2
        im = im.crop((left, top, left + s, top + s))
    if resolution is not None and s != resolution:
        im = im.resize((resolution, resolution), Image.Resampling.LANCZOS)
    return im


def rgb_to_gray(a: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> [..., 1] with PIL's convert("L") integer formula (ITU-R 601-2 luma)."""
    a = a.astype(np.uint32)
    y = (a[..., 0] * 19595 + a[..., 1] * 38470 + a[..., 2] * 7471 + 0x8000) >> 16
    return y.astype(np.uint8)[..., None]


def open_image(src: Union[str, Path, bytes]) -> Image.Image:
    """Decode a file (a path or its bytes) now, as "L" or "RGB". Raises whatever PIL raises."""
    with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as f:
        f.load()  # decode now: open() only reads the header
        return to_gray_or_rgb(f)


def prepare_image(src, resolution: Optional[int], channels: str = "auto"):
    """One image (path, encoded bytes, or uint8 HWC array) -> (uint8 HWC array, native square side),
    by the module's one rule. Returns (None, reason) for an unreadable file instead of raising, so
    that a data set can apply its skip/stop policy.

    :param channels: "auto" (gray stays 1 channel, colour 3), "rgb" or "gray".
    """
    try:
        if isinstance(src, np.ndarray):
            im = Image.fromarray(src[..., 0] if src.shape[2] == 1 else src)
        else:
            im = open_image(src)
    except Exception as e:  # PIL raises many types for broken files (OSError, SyntaxError, ...)
        return None, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    # Channel conversion before the resize, the same order as for arrays in data.py.
    if channels == "rgb" and im.mode == "L":
        im = im.convert("RGB")
    elif channels == "gray" and im.mode == "RGB":
        im = im.convert("L")
    side = min(im.size)
    a = np.asarray(crop_resize(im, resolution))
    return (a[..., None] if a.ndim == 2 else a), side


def read_image(path, channels: int, resolution: int) -> torch.Tensor:
    """One picture file as the model sees data: converted to gray (channels=1) or RGB (3), the
    largest centred square Lanczos-resized to `resolution`. -> uint8 [C, H, W]."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such image file")
    a, info = prepare_image(path, resolution, CHANNEL_MODES[channels])
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
        with Image.open(path) as im:
            im.load()
            a = np.asarray(im)
    except Exception:  # any decoding failure means "not there yet"
        return None
    return a[..., None] if a.ndim == 2 else a
