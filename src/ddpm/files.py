"""Reading a file the user names: only a regular file is ever opened.

A FIFO, a socket or a device named like an image, a data set, a config or a checkpoint would
block `open` or `read` forever (a FIFO that nobody writes) or never end (`/dev/zero`), and no
signal handler written in Python runs while the main thread waits in that C call. So:

- `open_regular(path)` opens without blocking (O_NONBLOCK: opening a FIFO returns at once),
  checks with `fstat` what was opened (no race between the check and the open), then reads in
  the ordinary, blocking way. A link is followed, as `open` does, and the file it leads to must
  be regular.
- `regular_file(path)` checks by path (`os.stat`, following links too) for readers that open
  the path themselves (safetensors, numpy's memory maps, LMDB).

Anything else is `NotRegularFile`, a `UserError`: one line naming the path and what it is. A
path that does not exist is left to the reader, which says so in its own words.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from .errors import UserError

_KINDS = ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
          (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "folder"))


class NotRegularFile(UserError):
    """A path that is a FIFO, a socket, a device or a folder where a file is read."""

    def __init__(self, path, mode: int):
        self.path, self.kind = Path(path), kind_of(mode)
        super().__init__(f"{path}: is a {self.kind}, not a regular file; ddpm reads only regular files: give a "
                         f"file, or move the {self.kind} away")


def kind_of(mode: int) -> str:
    """What a file of `st_mode` is, in words ("FIFO (named pipe)", "socket", …)."""
    return next((name for test, name in _KINDS if test(mode)), "special file")


def regular_file(path) -> Path:
    """`path`, when it is a regular file (or a link to one) or does not exist; NotRegularFile else."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return Path(path)  # missing or unreadable: the reader's own error says so
    if not stat.S_ISREG(mode):
        raise NotRegularFile(path, mode)
    return Path(path)


def read_bytes(path) -> bytes:
    """`Path(path).read_bytes()`, for a regular file only (`open_regular`)."""
    with open_regular(path) as f:
        return f.read()


def read_text(path) -> str:
    """`Path(path).read_text(encoding="utf-8")`, for a regular file only (`open_regular`)."""
    return read_bytes(path).decode("utf-8")


def open_regular(path) -> BinaryIO:
    """`open(path, "rb")` for a regular file; NotRegularFile, without blocking, for anything else.
    OSError as `open` raises it (a missing file, a permission)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(path, mode)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
