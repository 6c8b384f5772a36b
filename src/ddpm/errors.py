"""The exception types a user sees, and how an operating-system error becomes one line.

Anything a user can get wrong (a file, a field, a value) raises `UserError` with one line that
says what is wrong, where, and what to do. The CLI prints that line and exits with status 2;
no traceback reaches the user for their own mistake. It subclasses ValueError so library
callers can catch it as the ordinary Python error for a bad value. (An option that is not one of
its valid values is checked by `config.Choice.parse`, which lists them.)

`Interrupted` is a stop that a signal asked for (Ctrl-C, or SIGTERM from a scheduler), raised at
a safe point once the work is saved; it subclasses KeyboardInterrupt so code that handles Ctrl-C
handles it too. `os_error_line` turns an `OSError` at a read or write (a full disk, a read-only
folder, a permission) into the one line the CLI prints.
"""

from __future__ import annotations

import errno
import os
from typing import Optional


class UserError(ValueError):
    pass


class Interrupted(KeyboardInterrupt):
    """A signal stopped the work at a safe point; `message` says what was kept and how to go on."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum, self.message = signum, message


_ADVICE = {
    errno.ENOSPC: "free disk space and run the same command again",
    getattr(errno, "EDQUOT", errno.ENOSPC): "free disk space (you are over quota) and run the same command again",
    errno.EACCES: "check its permissions, or write somewhere else",
    errno.EPERM: "check its permissions, or write somewhere else",
    errno.EROFS: "the file system is read-only: write somewhere else",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "it is a folder: give a file",
    errno.ENAMETOOLONG: "use a shorter path",
}


def shown(name) -> str:
    """A file name as text that can be printed and written anywhere: bytes that are not UTF-8
    (which Python holds as lone surrogates, e.g. a file named b"caf\\xe9.png") become `\\xe9`."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def os_error_line(e: OSError, path: Optional[os.PathLike | str] = None, then: str = "") -> str:
    """One line for an OSError: the path, the system's reason with its code, and what to do.

    :param path: the file, when the error does not carry it (an error from `os.write` names none).
    :param then: appended after the advice, e.g. "the previous checkpoint ckpt-00000004 is intact".
    """
    where = path if path is not None else (e.filename if e.filename is not None else "")
    reason = e.strerror or str(e)
    code = errno.errorcode.get(e.errno, "") if e.errno else ""
    advice = _ADVICE.get(e.errno, "fix the cause and run the same command again")
    return f"{f'{where}: ' if where != '' else ''}{reason}{f' ({code})' if code else ''}; {advice}{f'; {then}' if then else ''}"
