"""Make the embedded `fashion-mnist-10k` data set: src/ddpm/assets/fashion_mnist_10k.npz.

Selection: the first 1,000 images of each of the 10 classes of the Fashion-MNIST *train* set,
in file order (an image is kept when fewer than 1,000 of its class came before it), stored in
file order. No randomness, so the subset is the same on every machine and for every reader of
the original files. The npz holds
    images   uint8 [10000, 28, 28]
    labels   uint8 [10000]          class ids 0..9
    indices  int32 [10000]          position of each image in train-images-idx3-ubyte
written with np.savez_compressed (4.41 MB; the package must stay small, so < 5 MB is checked).
A JSON record beside it (fashion_mnist_10k.json) holds the sha256 of the source files and of the
selected pixels, and the licence goes beside it as FASHION_MNIST_LICENSE (MIT, Zalando SE).

Source: Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, https://github.com/zalandoresearch/fashion-mnist),
as installed by Debian's `apt-get install dataset-fashion-mnist` into /usr/share/datasets/fashion-mnist/.
sha256 of the files this asset was made from (Debian package 0.0~git20200523.55506a9-1; its .gz
bytes differ from the MD5s upstream publishes, the compression being redone, so the decompressed
idx data is recorded too):
    train-images-idx3-ubyte.gz  b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7
    train-labels-idx1-ubyte.gz  0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056

Usage:  python scripts/make_fashion_mnist_10k.py [--src DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing

from ddpm.io.data import read_idx  # noqa: E402

PER_CLASS = 1000
MAX_BYTES = 5 * 1024 * 1024

LICENSE = """\
The MIT License (MIT) Copyright © 2017 Zalando SE, https://tech.zalando.com

Permission is hereby granted, free of charge, to any person obtaining a copy of this software and associated documentation files (the “Software”), to deal in the Software without restriction, including without limitation the rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies of the Software, and to permit persons to whom the Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED “AS IS”, WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


def sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices, in file order, of the first `per_class` images of every class."""
    seen = np.zeros(int(labels.max()) + 1, np.int64)
    keep = []
    for i, y in enumerate(labels):
        if seen[y] < per_class:
            seen[y] += 1
            keep.append(i)
    if (seen < per_class).any():
        raise SystemExit(f"some class has fewer than {per_class} images: {seen.tolist()}")
    return np.array(keep, np.int32)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--src", type=Path, default=Path("/usr/share/datasets/fashion-mnist"), help="folder with the idx .gz files")
    ap.add_argument("--out", type=Path, default=ROOT / "src" / "ddpm" / "assets", help="where to write the asset")
    args = ap.parse_args(argv)

    files = {name: args.src / name for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")}
    for p in files.values():
        if not p.is_file():
            raise SystemExit(f"{p}: not found; run `apt-get install dataset-fashion-mnist` or pass --src DIR")
    images, labels = read_idx(files["train-images-idx3-ubyte.gz"]), read_idx(files["train-labels-idx1-ubyte.gz"])
    if images.shape != (60000, 28, 28) or labels.shape != (60000,):
        raise SystemExit(f"unexpected shapes {images.shape}, {labels.shape}: not the Fashion-MNIST train set")

    idx = first_per_class(labels, PER_CLASS)
    sub_images, sub_labels = np.ascontiguousarray(images[idx]), np.ascontiguousarray(labels[idx])
    args.out.mkdir(parents=True, exist_ok=True)
    npz = args.out / "fashion_mnist_10k.npz"
    np.savez_compressed(npz, images=sub_images, labels=sub_labels, indices=idx)
    size = npz.stat().st_size
    if size >= MAX_BYTES:
        raise SystemExit(f"{npz}: {size} bytes, over the {MAX_BYTES}-byte budget for a package asset")

    record = {
        "name": "fashion-mnist-10k",
        "source": "Fashion-MNIST train set (Xiao, Rasul & Vollgraf 2017), https://github.com/zalandoresearch/fashion-mnist",
        "license": "MIT, Copyright (c) 2017 Zalando SE (FASHION_MNIST_LICENSE)",
        "selection": f"first {PER_CLASS} images of each class in file order, kept in file order",
        "count": int(len(idx)),
        "shape": list(sub_images.shape),
        "source_files": {
            name: {"sha256_gz": sha256(p.read_bytes()), "sha256_idx": sha256(gzip.decompress(p.read_bytes()))}
            for name, p in files.items()
        },
        # sha256 of the uint8 pixels in C order, = ddpm.io.data.data_fingerprint of the loaded images.
        "images_sha256": sha256(sub_images.tobytes()),
        "labels_sha256": sha256(sub_labels.tobytes()),
    }
    (args.out / "fashion_mnist_10k.json").write_text(json.dumps(record, indent=2) + "\n")
    (args.out / "FASHION_MNIST_LICENSE").write_text(LICENSE)
    print(f"wrote {npz} ({size / 1e6:.2f} MB, {len(idx)} images, classes {np.bincount(sub_labels).tolist()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
