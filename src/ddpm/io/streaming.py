"""Data in object storage, through LitData (the optional extra: see docs/DATA.md § Object storage).

    ddpm prepare /data/church_lmdb --resolution 256 --to litdata --out /tmp/church-litdata
    aws s3 sync /tmp/church-litdata s3://bucket/church-litdata
    ddpm train --preset lsun_church256 --data s3://bucket/church-litdata --out runs/church

LitData stores the records (uint8 [C, H, W] and the class id, per item) in its own chunked format,
fetches chunks from the bucket on first use and keeps them in a local cache. We use it for that
alone: storage, remote fetch and the local cache. The order stays ours: the training loop computes
each step's global indices from (seed, step), and each process reads its share by index
(`StreamingDataset[i]`), never through LitData's own shuffle, whose order depends on the number of
processes and workers. So every guarantee of the other placements holds here too: the same
batches on any number of processes or nodes, and an exact resume at any step with no loader state.
What it costs: the first epoch reads chunks in random order, so each process fetches a chunk when
it first needs any record in it (after that, the cache serves it).

Our metadata (count, shape, classes, labels, the pixels' sha256) rides in LitData's own
index.json under the key "ddpm", so one file describes the set wherever it is copied.

Why LitData and not MosaicML Streaming (measured, docs/DATA.md § Object storage): it installs
beside our torch and numpy (Streaming caps numpy below 2.2 and imports torchvision, which fails
with a CPU torch), and its random access by index is fast enough (20k images/s at 32x32 on one
core); Streaming's better own-shuffle guarantees are ones we do not use.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import UserError
from .atomic import temp_path, write_json
from .data import DataSet
from .folders import foreign_entries, usable_folder
from .progress import progress_bar

FORMAT = "ddpm-litdata"
FORMAT_VERSION = 1
INDEX_NAME = "index.json"  # LitData's
URL_PREFIXES = ("s3://", "gs://", "gcs://", "azure://", "hf://", "local:")
INSTALL = ("pip install --no-deps 'litdata>=0.2.76,<0.3' && pip install boto3 obstore filelock "
           "lightning-utilities requests tifffile")
WRITE_BATCH = 256


def _litdata():
    try:
        import litdata
        from litdata.streaming.writer import BinaryWriter
    except ImportError:
        raise UserError(f"streaming data (--to litdata, or a bucket URL as data) needs LitData: {INSTALL} "
                        f"(--no-deps keeps your torch; see docs/DATA.md)") from None
    return litdata, BinaryWriter


def is_url(source: str) -> bool:
    return source.startswith(URL_PREFIXES)


def is_stream_source(source: str) -> bool:
    """A bucket URL, or a local folder in LitData's format (it holds index.json)."""
    if is_url(source):
        return True
    p = Path(source).expanduser()
    return p.is_dir() and (p / INDEX_NAME).is_file()


def _read_meta(folder: Path) -> Optional[dict]:
    """Our metadata from a LitData index.json, or None when the folder is not ours."""
    try:
        meta = json.loads((folder / INDEX_NAME).read_text(encoding="utf-8")).get("ddpm")
    except (OSError, ValueError, AttributeError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


def check_stream_out(out, flag: str = "--out") -> Path:
    """OUT as a folder `write_stream` may write: new, empty, or streaming data it wrote. Checked
    by `ddpm prepare --to litdata` before it decodes anything, and again by `write_stream`."""
    out = usable_folder(out, flag)
    entries = foreign_entries(out)
    if entries and _read_meta(out) is None:
        raise UserError(f"{flag} {out}: holds files that ddpm did not write for streaming data "
                        f"({', '.join(entries[:3])}{' …' if len(entries) > 3 else ''}); nothing was changed there; "
                        f"give a new or empty folder")
    return out


def write_stream(data: DataSet, out, *, chunk_bytes: str = "64MB", progress: bool = True,
                 flag: str = "--out") -> Path:
    """Write `data` in LitData's format into the folder OUT (then copy it to a bucket).

    OUT appears whole or not at all: it is written beside it under a temporary name and renamed
    at the end. An OUT that already holds these data (the same sha256) is left as it is."""
    _, BinaryWriter = _litdata()
    out = check_stream_out(out, flag)
    if foreign_entries(out):
        meta = _read_meta(out)
        if meta.get("sha256") == data.fingerprint():
            return out
        raise UserError(f"{flag} {out}: holds other streaming data (sha256 {str(meta.get('sha256'))[:12]}…); "
                        f"give another folder")
    tmp = temp_path(out)
    n = len(data)
    labels = data.labels
    try:
        writer = BinaryWriter(str(tmp), chunk_bytes=chunk_bytes)
        with progress_bar(n, desc="writing litdata", unit="img", enabled=progress) as bar:
            for start in range(0, n, WRITE_BATCH):
                idx = torch.arange(start, min(n, start + WRITE_BATCH))
                x = data.gather(idx).numpy()
                for k, i in enumerate(idx.tolist()):
                    writer[i] = {"x": x[k], "y": int(labels[i]) if labels is not None else -1}
                bar.update(len(idx))
        writer.done()
        writer.merge()
        index = json.loads((tmp / INDEX_NAME).read_text(encoding="utf-8"))
        index["ddpm"] = dict(
            format=FORMAT, version=FORMAT_VERSION, count=n, shape=list(data.shape), classes=list(data.classes),
            labels=None if labels is None else base64.b64encode(labels.numpy().astype("<i4").tobytes()).decode(),
            sha256=data.fingerprint(), description=data.source_description)
        write_json(tmp / INDEX_NAME, index)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


class StreamSet(DataSet):
    """Data in LitData's format, local or in a bucket, read by index through a local cache."""

    def __init__(self, source: str, cache_dir):
        litdata, _ = _litdata()
        url = source if is_url(source) else "local:" + str(Path(source).expanduser().resolve())
        try:
            self._ds = litdata.StreamingDataset(url, cache_dir=str(cache_dir), shuffle=False)
            meta = _read_meta(Path(self._ds.input_dir.path))
        except UserError:
            raise
        except Exception as e:  # a missing bucket, no credentials, not LitData's format: many types
            raise UserError(f"{source}: cannot open as LitData streaming data ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:300]}); give a folder or URL written by "
                            f"`ddpm prepare … --to litdata`") from None
        if meta is None or meta.get("version") != FORMAT_VERSION or meta.get("count") != len(self._ds):
            raise UserError(f"{source}: LitData data without ddpm's metadata (or of another version); write it "
                            f"with `ddpm prepare SOURCE --to litdata --out DIR`")
        self.meta, self.url = meta, url
        self._shape = tuple(meta["shape"])
        self._lock = threading.Lock()  # one reader at a time: LitData's dataset is not made for threads
        self.source_description = f"LitData {source}: {meta.get('description', '')}"
        self.skipped, self.classes = [], tuple(meta.get("classes") or ())
        self.labels = None if meta.get("labels") is None else torch.from_numpy(
            np.frombuffer(base64.b64decode(meta["labels"]), "<i4").astype(np.int64))

    def __len__(self) -> int:
        return int(self.meta["count"])

    @property
    def shape(self) -> tuple[int, int, int]:
        return self._shape

    def fingerprint(self) -> str:
        return self.meta["sha256"]

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        idx = torch.as_tensor(indices).reshape(-1).tolist()
        with self._lock:
            items = [self._ds[int(i)]["x"] for i in idx]
        return torch.from_numpy(np.stack(items).astype(np.uint8, copy=False).reshape(len(idx), *self._shape))


def stream_cache(source: str, root: Path) -> Path:
    """The local cache folder of a streaming source, under `root`."""
    return root / "litdata" / hashlib.sha256(source.encode()).hexdigest()[:32]
