"""A stop that a signal asks for always ends the process, also when the main thread is stuck.

Python runs a signal handler in the main thread, between two bytecodes. While that thread waits
in a long C call (an allocation that pages in gigabytes, a decoder, a read that does not return
on EINTR) the handler does not run, and SIGTERM or Ctrl-C seem ignored. `SignalWatchdog` closes
that gap: the C-level handler writes each signal's number to a wakeup socket
(`signal.set_wakeup_fd`), a daemon thread reads it, and if no Python-level handler has said it
ran (`handled()`) within `grace` seconds, the thread prints one line and ends the process with
status 128 + the signal, as a kill would. Everything ddpm writes is atomic and every command
resumes after a kill (docs/RELIABILITY.md), so what is on disk stays usable; a temporary file
left behind is removed by the next run.

Every handler that ddpm installs for SIGTERM or SIGINT calls `handled()` first.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from typing import Optional

GRACE_S = 5.0  # how long a handler may take to start before the process is ended from outside it
WATCHED = (signal.SIGTERM, signal.SIGINT)

_lock = threading.Lock()
_handled = [0]


def handled() -> None:
    """Say that a Python-level handler of SIGTERM or SIGINT ran (the main thread is not stuck)."""
    with _lock:
        _handled[0] += 1


class SignalWatchdog:
    """`with SignalWatchdog("ddpm train"):` the body; only in the main thread (elsewhere it does nothing)."""

    def __init__(self, name: str, grace: float = GRACE_S):
        self.name, self.grace = name, grace
        self._old_fd: Optional[int] = None
        self._base = 0
        self._socks: Optional[tuple] = None

    def __enter__(self) -> "SignalWatchdog":
        if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "set_wakeup_fd"):
            return self
        r, w = socket.socketpair()
        w.setblocking(False)
        try:
            self._old_fd = signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False)
        except ValueError:
            r.close()
            w.close()
            return self
        self._socks = (r, w)
        with _lock:
            self._base = _handled[0]
        threading.Thread(target=self._watch, args=(r,), daemon=True, name="ddpm-signal-watchdog").start()
        return self

    def _watch(self, r: socket.socket) -> None:
        seen = 0  # signals received here; each must be matched by a handler run
        with r:
            while data := r.recv(64):  # b"" once __exit__ closes the other end
                for signum in data:
                    if signum not in WATCHED:
                        continue
                    seen += 1
                    if not self._answered(seen):
                        os.write(2, f"{self.name}: stopped by {signal.Signals(signum).name}; the work in progress "
                                    f"did not stop within {self.grace:g} s, so the process ended (what was saved is "
                                    f"kept); run the same command again to go on\n".encode())
                        os._exit(128 + signum)

    def _answered(self, seen: int) -> bool:
        """Whether handlers ran `seen` times since __enter__, waiting up to `grace` seconds."""
        wait = threading.Event()
        for _ in range(max(1, int(self.grace / 0.05))):
            with _lock:
                if _handled[0] - self._base >= seen:
                    return True
            wait.wait(0.05)
        return False

    def __exit__(self, *exc) -> None:
        if self._socks is None:
            return
        try:
            signal.set_wakeup_fd(self._old_fd if self._old_fd is not None else -1)
        except ValueError:
            pass
        self._socks[1].close()  # the thread reads the end of the stream and closes its side
        self._socks = None
