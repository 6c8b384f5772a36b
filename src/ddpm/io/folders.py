"""Output folders: recognised before anything is written into them, and held by one process.

Every command that writes a folder (a run, samples, bits/dim, figures, an evaluation, an export,
prepared data) first claims it: the path must be usable as a folder, and the folder must be new,
empty, or one that the same kind of command made (it holds that command's record file, or the
folder mark below). A folder holding anything else is refused in one line that names what is
there, and nothing in it is touched: `ddpm` never overwrites, adopts or deletes a file it did not
write. A refused claim creates nothing, not even the folder.

The first thing written into a claimed folder is its mark, `.ddpm-folder.json` (what the folder
is for, and the ddpm version): a name no other tool writes. It makes two things hold whatever
point a command is stopped at: a rerun of the same command accepts the folder although its own
record file may not exist yet, and a folder that ddpm wrote inside a data folder (`--data D
--out D/run`) is never read as data (`is_ddpm_folder`; io/data.py and io/prepared.py leave such
folders out of the image listing and the source's fingerprint).

`FolderLock` keeps a second process from writing the same folder at once. It is an advisory
`fcntl.flock` on a hidden file in the folder, so the kernel releases it when its process ends,
also by SIGKILL: a killed run never leaves its folder locked. (Where `fcntl` does not exist, on
Windows, there is no lock.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from ..errors import UserError, os_error_line
from ..version import __version__
from .atomic import is_temp_name, write_json

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_NAME = ".ddpm.lock"
MARK_NAME = ".ddpm-folder.json"
MARK_FORMAT = "ddpm-folder"


def folder_mark(folder: Path) -> Optional[str]:
    """What ddpm's mark in `folder` says it was claimed for (e.g. "a training run"), else None."""
    try:
        d = json.loads((Path(folder) / MARK_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return d.get("for") if isinstance(d, dict) and d.get("format") == MARK_FORMAT else None


def is_ddpm_folder(folder) -> bool:
    """Whether ddpm wrote `folder`: it holds ddpm's folder mark, or ddpm's lock (a training run or
    prepared data of a version before the mark)."""
    folder = Path(folder)
    return folder_mark(folder) is not None or (folder / LOCK_NAME).is_file()


def usable_folder(path, flag: str = "--out") -> Path:
    """`path` as a folder that exists or can be made: not empty, not a file, not under a file."""
    if path is None or str(path).strip() == "":
        raise UserError(f"{flag} is empty; give a folder, e.g. {flag} runs/NAME")
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {p}: is a file, not a folder; give a folder (a new one, or one ddpm wrote)")
    _check_parents(p, flag)
    return p


def _check_parents(p: Path, flag: str) -> None:
    """The nearest existing folder above `p` must be a folder, not a file."""
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{flag} {p}: {parent} is a file, not a folder; give a path inside a folder")
            return


def usable_file(path, flag: str = "--out", suffix: Optional[str] = None) -> Path:
    """`path` as a file that can be written: not empty, not a folder, not under a file, with
    `suffix` if given."""
    if path is None or str(path).strip() == "":
        raise UserError(f"{flag} is empty; give a file name{f' ending in {suffix}' if suffix else ''}")
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{flag} {p}: is a folder; give a file name{f' ending in {suffix}' if suffix else ''}")
    if suffix and p.suffix != suffix:
        raise UserError(f"{flag} {p}: give a file name ending in {suffix}")
    _check_parents(p, flag)
    return p


def claim_file(path, ours: Callable[[Path], bool], what: str, flag: str = "--out", suffix: Optional[str] = None) -> Path:
    """`path` as a file to write `what` into: usable (`usable_file`), and, if it exists, one that
    `ours(path)` recognises as a `what` written before (a rerun replaces it); anything else there
    is refused in one line, untouched."""
    p = usable_file(path, flag, suffix)
    if p.exists() and not ours(p):
        raise UserError(f"{flag} {p}: exists and is not {what} written by ddpm; nothing was changed; give another "
                        f"name, or move it away")
    return p


def foreign_entries(folder: Path) -> list[str]:
    """What a folder holds besides ddpm's mark, lock and temporary files, sorted."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise UserError(f"cannot read the folder {os_error_line(e, folder)}") from None
    return sorted(n for n in names if n not in (LOCK_NAME, MARK_NAME) and not is_temp_name(n))


def claim_folder(path, ours: Union[Sequence[str], Callable[[Path], bool]], what: str, flag: str = "--out") -> Path:
    """Check that `path` may receive `what` (e.g. "samples"), then create it.

    :param ours: the names of the record files the command writes (the folder is ours if it holds
        one of them), or a function that decides from the folder's path. A folder whose mark says
        it was claimed for `what` is ours too: the same command, stopped before its record.
    Raises UserError, naming up to three of the entries found, for a non-empty folder that is not
    ours; nothing is created or changed then. Otherwise the folder is created and marked.
    """
    p = check_folder(path, ours, what, flag)
    entries = foreign_entries(p)
    make_folder(p, flag)
    if folder_mark(p) is None or (not entries and folder_mark(p) != what):
        try:
            write_json(p / MARK_NAME, dict(format=MARK_FORMAT, **{"for": what}, written_by=f"ddpm {__version__}"))
        except OSError as e:
            raise UserError(f"{flag}: cannot write in the folder {os_error_line(e, p / MARK_NAME)}") from None
    return p


def check_folder(path, ours: Union[Sequence[str], Callable[[Path], bool]], what: str, flag: str = "--out") -> Path:
    """The check of `claim_folder`, writing nothing: for a command that has more to validate
    before it may create anything."""
    p = usable_folder(path, flag)
    entries = foreign_entries(p)
    if entries:
        is_ours = folder_mark(p) == what or (ours(p) if callable(ours) else any((p / name).exists() for name in ours))
        if not is_ours:
            shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
            raise UserError(f"{flag} {p}: holds files that ddpm did not write for {what} ({shown}); nothing was "
                            f"changed there; give a new or empty folder")
    return p


def make_folder(p: Path, flag: str = "--out") -> Path:
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{flag}: cannot create the folder {os_error_line(e, p)}") from None
    return p


class FolderLock:
    """Hold `folder` for this process: `with FolderLock(run_dir, "training"): …`.

    A second holder is refused with one line naming the process that holds it. The lock file is
    created in the folder (a read-only folder is one line, too) and left there; only the lock on
    it matters, and the kernel drops that when the process ends, however it ends.
    """

    def __init__(self, folder, what: str, wait: bool = False):
        """:param wait: wait for the holder to finish instead of refusing (a shared cache entry)."""
        self.path, self.what, self.wait = Path(folder) / LOCK_NAME, what, wait
        self._fd: Optional[int] = None

    def __enter__(self) -> "FolderLock":
        if fcntl is None:
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot write in {self.path.parent}: {os_error_line(e, self.path)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
        except OSError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"{self.path.parent}: is in use by {holder}; wait for it to finish or stop it, "
                            f"or write to another folder") from None
        try:  # who holds it, for the message above; the lock works without it (e.g. on a full disk)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{self.what} (pid {os.getpid()})".encode(), 0)
        except OSError:
            pass
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the lock
            self._fd = None
