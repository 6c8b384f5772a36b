"""The one way this package writes a file: atomically, so a reader never sees half of one.

Every file goes to a temporary name beside its destination
(`.ddpm-tmp-<name>-<host>-<pid>-<random>`: a name no user picks, saying which process made it), is
flushed and fsynced, optionally checked, moved into place with `os.replace` (atomic on POSIX and
Windows within one file system), and the folder is fsynced so the rename survives a power cut.
A failure or an interrupt (also Ctrl-C) removes the temporary file and leaves whatever was at the
destination untouched; a SIGKILL can leave a temporary file, which no reader mistakes for a result
and `remove_stale_temps` cleans up later. Cleaning up removes only names of exactly that pattern
(`is_temp_name`): a user's `.tmp-notes` or `.ddpm-tmp-x` is never taken for one of ours.

    with atomic_file("out/summary.csv", "w") as f:
        csv.writer(f).writerows(rows)
    write_json("out/summary.json", summary)

Written by hand because no library in our dependencies does all of it: `tempfile` gives the
temporary name but neither the fsyncs nor the rename, and third-party packages for it (e.g.
atomicwrites) are unmaintained.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import socket
import time
import warnings
import zipfile
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Mapping, Optional

import numpy as np

TEMP_PREFIX = ".ddpm-tmp-"
STALE_TEMP_SECONDS = 3600.0  # a writer touches its temp file continuously; an hour-old one is orphaned
_TEMP_NAME = re.compile(re.escape(TEMP_PREFIX) + r".+-(?P<host>[A-Za-z0-9_]{1,16})-(?P<pid>[0-9]{1,10})-[0-9a-f]{8}")


def _host() -> str:
    """This machine's name as it goes into a temp name: letters, digits and "_" only, 16 at most."""
    return (re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname().split(".")[0]) or "host")[:16]


def temp_path(path: Path) -> Path:
    """A fresh temporary name beside `path`, unique per process and call, that says who made it:
    `.ddpm-tmp-<name>-<host>-<pid>-<8 hex digits>`."""
    return path.with_name(f"{TEMP_PREFIX}{path.name}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}")


def is_temp_name(name: str) -> bool:
    """Whether `name` is one that `temp_path` makes: the only names ddpm ever cleans up."""
    return _TEMP_NAME.fullmatch(name) is not None


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable. Not possible on every platform / file system; then skip."""
    if not hasattr(os, "O_DIRECTORY"):
        return
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_quietly(path: Path, what: str, category: type[Warning] = RuntimeWarning) -> None:
    """Delete `path`; a file already gone is fine, any other failure is a warning, never an error."""
    try:
        Path(path).unlink()
    except FileNotFoundError:
        pass
    except OSError as e:
        warnings.warn(f"could not remove {what} {path}: {e}", category, stacklevel=3)


def remove_stale_temps(directory: Path, max_age_s: float = STALE_TEMP_SECONDS) -> None:
    """Delete temporary files of writers killed more than `max_age_s` ago: only files whose names
    `temp_path` makes (`is_temp_name`), never another file, however it is named. The name says who
    wrote it: a file of a process still running on this machine is never removed (another rank or
    node may be writing it this moment), and one from another machine only after
    STALE_TEMP_SECONDS, whatever `max_age_s` says, since its writer cannot be seen from here."""
    now, host = time.time(), _host()
    for p in Path(directory).glob(f"{TEMP_PREFIX}*"):
        m = _TEMP_NAME.fullmatch(p.name)
        try:
            if m is None or not p.is_file() or p.is_symlink():
                continue
            ours = m["host"] == host
            if ours and _alive(int(m["pid"])):
                continue
            if now - p.stat().st_mtime > (max_age_s if ours else max(max_age_s, STALE_TEMP_SECONDS)):
                p.unlink()
        except OSError:
            pass  # another process's business, or already gone


def _alive(pid: int) -> bool:
    """Whether a process `pid` runs on this machine (signal 0 asks without sending anything)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # another user's process, or a pid we cannot ask about: leave its file alone
    return True


@contextlib.contextmanager
def atomic_file(path, mode: str = "wb", *, check: Optional[Callable[[Path], None]] = None) -> Iterator[IO]:
    """Open a temporary file for writing; on a clean exit it becomes `path`, atomically.

    :param mode: "wb" (binary) or "w" (text, UTF-8, no newline translation, as csv wants).
    :param check: called with the temporary file's path after it is written and fsynced, before
        it is moved into place; raising there abandons the write.
    The folder is created if needed. An OSError (a full disk, a read-only folder) is raised with
    `path` as its filename, so the one line a user sees names the file they asked for, not the
    temporary one; whatever `check` raised otherwise is raised as it is. Either way the temporary
    file is removed and `path` is untouched.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_file mode {mode!r}: use 'wb' or 'w'")
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # "x": never write through a name someone else created; permissions follow the umask.
        f = open(tmp, "xb") if mode == "wb" else open(tmp, "x", encoding="utf-8", newline="")
    except OSError as e:
        _reraise_naming(e, path, tmp)
    try:
        yield f
        f.flush()
        os.fsync(f.fileno())
        f.close()
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            f.close()  # flushes what is buffered, which fails again on a full disk
        except OSError:
            pass
        remove_quietly(tmp, "the temporary file")
        if isinstance(e, OSError):
            _reraise_naming(e, path, tmp)
        raise
    fsync_dir(path.parent)


def _reraise_naming(e: OSError, path: Path, tmp: Path):
    """Raise `e`, with the destination as its filename when it names the temporary file or nothing."""
    if e.filename is not None and str(e.filename) != str(tmp):
        raise e
    raise OSError(e.errno, e.strerror or str(e), str(path)) from e  # OSError(errno, …) picks the subclass


def write_bytes(path, data: bytes) -> Path:
    with atomic_file(path) as f:
        f.write(data)
    return Path(path)


def write_text(path, text: str) -> Path:
    with atomic_file(path, "w") as f:
        f.write(text)
    return Path(path)


def write_json(path, obj: Any) -> Path:
    """`obj` as indented JSON (a trailing newline, keys in insertion order)."""
    return write_text(path, json.dumps(obj, indent=2) + "\n")


def write_npz(path, **arrays) -> Path:
    """An uncompressed .npz as `np.savez` writes it; never pickled objects."""
    with atomic_file(path) as f:
        np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})
    return Path(path)


def write_npz_rows(path, arrays: Mapping[str, Any], x_shape, x_rows: Iterable[np.ndarray]) -> Path:
    """An .npz (a stored zip of .npy files, as `np.savez` writes) whose uint8 array "x" of shape
    `x_shape` is written one row at a time from the iterator `x_rows`, so 50,000 samples of 256x256
    never sit in memory at once; `arrays` are written whole beside it."""
    with atomic_file(path) as f:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("x.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, {"descr": "|u1", "fortran_order": False,
                                                              "shape": tuple(int(s) for s in x_shape)})
                for row in x_rows:
                    member.write(np.ascontiguousarray(row, dtype=np.uint8).tobytes())
            for name, a in arrays.items():
                with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asarray(a), allow_pickle=False)
    return Path(path)
