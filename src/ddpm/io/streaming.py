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

Nothing executes from a data folder. LitData decodes each item with the serializers that
index.json names, and some of them unpickle ("pickle", "graph:pickle"), so a folder of pickled
objects with a copied "ddpm" key would run code on the first read. `check_index` therefore reads
index.json as data and admits only what `write_stream` writes: the serializers "numpy" and "int",
our pytree spec, LitData's PyTreeLoader, no compression, no encryption, chunk files named
chunk-<rank>-<n>.bin inside the folder, and complete metadata; anything else is refused in one
line before LitData reads a single item. A local folder is checked before LitData opens it, a
bucket's index as LitData fetched it into the cache (the copy it reads), and each item is checked
for its dtype and shape as it is read.

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
import re
import shutil
import threading
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import UserError, os_error_line
from ..files import read_text
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
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


# What `write_stream` writes into index.json's "config", and so all that a reader admits. Keys
# whose value is None here, and keys LitData may add, must be absent or None; "chunk_bytes" and
# "chunk_size" are sizes; "types" is a description LitData never decodes by (any value).
ITEM_FORMATS = ["numpy", "int"]  # LitData's serializers of our record {"x": uint8 array, "y": int}
ITEM_KEYS = ["x", "y"]
_CONFIG = dict(data_format=ITEM_FORMATS, item_loader="PyTreeLoader", compression=None, compression_batch_size=None,
               compression_level=None, encryption=None, ipc_compression=None)
_CHUNK_NAME = re.compile(r"chunk-[0-9]{1,9}-[0-9]{1,12}\.bin")
_MAX_SIDE = 1 << 16


def _leaf(spec) -> bool:
    return spec == {"type": None, "context": None, "children_spec": []}


def _our_spec(text) -> bool:
    """Whether LitData's "data_spec" (torch's pytree spec as JSON) is that of {"x": leaf, "y": leaf}."""
    try:
        spec = json.loads(text)
        return (isinstance(spec, list) and len(spec) == 2 and spec[0] == 1 and isinstance(spec[1], dict)
                and spec[1].get("type") == "builtins.dict" and json.loads(spec[1].get("context")) == ITEM_KEYS
                and isinstance(spec[1].get("children_spec"), list) and len(spec[1]["children_spec"]) == 2
                and all(_leaf(c) for c in spec[1]["children_spec"]))
    except (TypeError, ValueError, RecursionError):
        return False


def check_index(index_file: Path, where: str) -> dict:
    """Our metadata from `index_file`, once the whole index is what `write_stream` writes.

    Raises UserError (one line naming `where` and the field) for anything else: an index that
    names another serializer (pickle among them), compression, encryption, another item loader or
    spec, chunk files outside the folder, or metadata that is missing, of the wrong type or out of
    range. Reads the file as JSON data only."""
    advice = "ddpm reads only folders that `ddpm prepare SOURCE --to litdata --out DIR` wrote; write it again that way"

    def refuse(what: str) -> UserError:
        return UserError(f"{where}: {what}; refused before reading any item, since LitData decodes items as "
                         f"index.json says (some of its formats unpickle, which runs code); {advice}")

    try:
        index = json.loads(read_text(index_file))  # a FIFO named index.json is refused, not waited on
    except OSError as e:
        raise UserError(f"{where}: cannot read {INDEX_NAME} ({os_error_line(e, index_file)})") from None
    except UserError:
        raise
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise refuse(f"{INDEX_NAME} is not valid JSON ({type(e).__name__})") from None
    if not isinstance(index, dict) or not isinstance(index.get("config"), dict):
        raise refuse(f"{INDEX_NAME} has no LitData \"config\" object")
    config = index["config"]
    if not isinstance(index.get("ddpm"), dict) or index["ddpm"].get("format") != FORMAT:
        raise UserError(f"{where}: LitData data without ddpm's metadata; {advice}")
    for key, value in config.items():
        if key in ("chunk_bytes", "chunk_size"):
            if value is not None and not (type(value) is int and value > 0):
                raise refuse(f"config.{key}={value!r} is not a positive size")
        elif key == "types":
            continue
        elif key == "data_spec":
            if not _our_spec(value):
                raise refuse("config.data_spec describes other items than ddpm's {x, y}")
        elif key not in _CONFIG:
            if value is not None:
                raise refuse(f"config.{key}={_short(value)} is not a setting ddpm writes")
        elif value != _CONFIG[key]:
            raise refuse(f"config.{key}={_short(value)}, but ddpm writes {_short(_CONFIG[key])}")
    for key in ("data_format", "data_spec", "item_loader"):
        if key not in config:
            raise refuse(f"config.{key} is missing")
    chunks = index.get("chunks")
    if not isinstance(chunks, list) or not chunks:
        raise refuse("\"chunks\" is not a list of chunk files")
    total = 0
    for i, c in enumerate(chunks):
        if not (isinstance(c, dict) and isinstance(c.get("filename"), str) and _CHUNK_NAME.fullmatch(c["filename"])):
            raise refuse(f"chunks[{i}].filename={_short(c.get('filename') if isinstance(c, dict) else c)} is not a "
                         f"chunk file name ddpm writes (chunk-R-N.bin, inside the folder)")
        for key in ("chunk_bytes", "chunk_size"):
            if not (type(c.get(key)) is int and c[key] > 0):
                raise refuse(f"chunks[{i}].{key}={_short(c.get(key))} is not a positive size")
        if c.get("dim") is not None:
            raise refuse(f"chunks[{i}].dim={_short(c.get('dim'))}, but ddpm writes null")
        total += c["chunk_size"]
    return _check_meta(index["ddpm"], total, refuse)


def _check_meta(meta: dict, items: int, refuse) -> dict:
    """ddpm's metadata: types and ranges, and the count that the chunks hold."""
    if meta.get("version") != FORMAT_VERSION:
        raise refuse(f"ddpm.version={_short(meta.get('version'))}; this ddpm reads version {FORMAT_VERSION}")
    count, shape = meta.get("count"), meta.get("shape")
    if not (type(count) is int and count == items):
        raise refuse(f"ddpm.count={_short(count)}, but the chunks hold {items} items")
    if not (isinstance(shape, list) and len(shape) == 3 and all(type(v) is int for v in shape)
            and shape[0] in (1, 3) and 0 < shape[1] <= _MAX_SIDE and 0 < shape[2] <= _MAX_SIDE):
        raise refuse(f"ddpm.shape={_short(shape)} is not [1 or 3, height, width]")
    classes = meta.get("classes", [])
    if not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise refuse("ddpm.classes is not a list of names")
    if not (isinstance(meta.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", meta["sha256"])):
        raise refuse(f"ddpm.sha256={_short(meta.get('sha256'))} is not a sha256")
    if not isinstance(meta.get("description", ""), str):
        raise refuse("ddpm.description is not text")
    if meta.get("labels") is not None:
        try:
            raw = base64.b64decode(meta["labels"], validate=True)
        except (TypeError, ValueError):
            raise refuse("ddpm.labels is not base64") from None
        labels = np.frombuffer(raw, "<i4") if len(raw) == 4 * count else None
        if labels is None or labels.min(initial=0) < 0 or labels.max(initial=0) >= max(len(classes), 1):
            raise refuse(f"ddpm.labels are not {count} class ids below {len(classes)}")
    return meta


def _short(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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
        local = not is_url(source)
        url = "local:" + str(Path(source).expanduser().resolve()) if local else source
        if local:  # checked before LitData opens it at all
            check_index(Path(source).expanduser() / INDEX_NAME, source)
        try:
            self._ds = litdata.StreamingDataset(url, cache_dir=str(cache_dir), shuffle=False)
            # the index LitData fetched into its cache and decodes items by: checked before any read
            meta = check_index(Path(self._ds.input_dir.path) / INDEX_NAME, source)
            n = len(self._ds)
        except UserError:
            raise
        except Exception as e:  # a missing bucket, no credentials, not LitData's format: many types
            raise UserError(f"{source}: cannot open as LitData streaming data ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:300]}); give a folder or URL written by "
                            f"`ddpm prepare … --to litdata`") from None
        if n != meta["count"]:
            raise UserError(f"{source}: LitData counts {n} items, ddpm's metadata {meta['count']}; write it again "
                            f"with `ddpm prepare SOURCE --to litdata --out DIR`")
        self.source = source
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
        for i, x in zip(idx, items):
            if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.shape == self._shape):
                raise UserError(f"{self.source}: item {i} is {type(x).__name__} "
                                f"{getattr(x, 'dtype', '')}{list(getattr(x, 'shape', []))}, not uint8 "
                                f"{list(self._shape)} as its index says; the chunks are damaged or not ddpm's: "
                                f"write the folder again with `ddpm prepare SOURCE --to litdata --out DIR`")
        return torch.from_numpy(np.stack(items))


def stream_cache(source: str, root: Path) -> Path:
    """The local cache folder of a streaming source, under `root`."""
    return root / "litdata" / hashlib.sha256(source.encode()).hexdigest()[:32]
