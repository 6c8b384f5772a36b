"""How many CPU threads ddpm runs on a machine that other programs share.

torch's CPU builds run their parallel loops on libgomp, one thread per core. When another program
keeps a core busy, every parallel region waits for the thread that the scheduler has descheduled
(while its partner spins on the core it needs): on 2 cores with one other busy process ddpm's
steps became 3–6x slower (BENCHMARKS.md § Threads on a shared CPU). A shorter spin
(GOMP_SPINCOUNT) or OMP_WAIT_POLICY=PASSIVE, measured there, did not bound that, and PASSIVE costs
a third of the idle speed; one thread fewer did. So:

`adapt()`, called between the steps of ddpm's loops (training, the one reverse loop, bits/dim,
inversion, Inception features), looks at the machine every CHECK_EVERY_S seconds: the cores other
programs used since the last look (the machine's busy time from /proc/stat less this process's own
CPU time). While they use more than about 0.6 of a core it runs fewer threads (`threads_for`); it
restores torch's count when they stop. On 2 cores with one busy program the demo's training step
then takes 1.6x its idle time instead of 4.2x.

The user's choice wins: `OMP_NUM_THREADS` or `torch.set_num_threads` fixes the count (adapt then
never changes it), and DDPM_THREAD_POLICY=off turns adapting off. The wait policy stays libgomp's
own, or the user's OMP_WAIT_POLICY / GOMP_SPINCOUNT. Float sums may round differently with 1 and
2 threads: for bit-identical reruns on a shared machine, fix the count. `describe()`,
`describe_adapting()` and `ddpm info --device` say what is in force and why.
"""

from __future__ import annotations

import os
import time
from typing import Optional

import torch

WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
OFF_VARIABLE = "DDPM_THREAD_POLICY"


def describe(environ=None) -> str:
    """One line: the OpenMP wait policy in force and why."""
    env = os.environ if environ is None else environ
    own = [f"{k}={env[k]}" for k in WAIT_VARIABLES if env.get(k, "").strip()]
    if own:
        return f"{', '.join(own)} (yours)"
    return ("libgomp's default (a waiting thread spins about 300,000 times, then sleeps): the fastest when the "
            "machine is idle; a shorter spin or OMP_WAIT_POLICY=PASSIVE did not keep a busy machine from slowing "
            "the steps, fewer threads did (BENCHMARKS.md § Threads on a shared CPU)")


# ---------------------------------------------------------------------------------------------
# Fewer threads while other programs use the cores
# ---------------------------------------------------------------------------------------------

CHECK_EVERY_S = 2.0  # how often `adapt` looks at the machine's load (reading /proc/stat costs ~50 µs)
_HEADROOM = 0.4  # threads = ⌊cores − cores used by others + 0.4⌋: one busy program on 2 cores leaves 1


def cpu_times() -> Optional[tuple[float, float]]:
    """(core-seconds every CPU of the machine has been busy, this process's CPU seconds), or None
    where /proc/stat cannot be read (not Linux)."""
    try:
        with open("/proc/stat", "rb") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    t = os.times()
    return (sum(fields[:8]) - idle) / tick, t.user + t.system


def threads_for(others: float, cores: int, most: int) -> int:
    """The threads to run while other programs use `others` cores (an average) of `cores`: what
    they leave, rounded up from 0.6 of a core, at least 1 and at most `most`."""
    return max(1, min(most, int(cores - others + _HEADROOM)))


class Adapter:
    """`adapt()`'s state: lowers torch's thread count while other programs keep cores busy and
    restores it when they stop. Called between the steps of ddpm's loops (on the thread that runs
    them: OpenMP's thread count is per thread); every CHECK_EVERY_S it measures how many cores the
    other programs used since the last look (the machine's busy time from /proc/stat, less this
    process's own CPU time) and sets `threads_for` of it.

    It stays out of the way of a user who chose: with OMP_NUM_THREADS set, with
    DDPM_THREAD_POLICY=off, where /proc/stat cannot be read, and for good once torch's thread count
    is not the one it last set (the user called torch.set_num_threads)."""

    def __init__(self, environ=None, clock=None, read=cpu_times):
        env = os.environ if environ is None else environ
        self.clock = clock or time.monotonic
        self.read = read
        self.off = bool(env.get("OMP_NUM_THREADS", "").strip()) or \
            env.get(OFF_VARIABLE, "").strip().lower() in ("off", "0", "false", "no")
        self.most = self.last_set = None
        self.cores = os.cpu_count() or 1
        self.t0 = self.sample = None
        self.changes = 0

    def __call__(self) -> Optional[int]:
        """Look at the load if it is time; -> the thread count set now, or None (no change)."""
        if self.off:
            return None
        now = self.clock()
        if self.t0 is not None and now - self.t0 < CHECK_EVERY_S:
            return None
        current = torch.get_num_threads()
        if self.most is None:
            self.most = self.last_set = current
        elif current != self.last_set:  # the user set another count: theirs wins from now on
            self.off = True
            return None
        sample = self.read()
        if sample is None:
            self.off = True
            return None
        if self.sample is not None:
            busy, own = (b - a for a, b in zip(self.sample, sample))
            others = max(0.0, busy - own) / max(now - self.t0, 1e-9)
            want = threads_for(others, self.cores, self.most)
            if want != current:
                torch.set_num_threads(want)
                self.last_set, self.changes = want, self.changes + 1
                self.t0, self.sample = now, self.read()  # measure the next interval at the new count
                return want
        self.t0, self.sample = now, sample
        return None


_adapter: Optional[Adapter] = None


def adapt() -> Optional[int]:
    """Between two steps of a loop: fewer CPU threads while other programs use the cores (`Adapter`)."""
    global _adapter
    if _adapter is None:
        _adapter = Adapter()
    return _adapter()


def describe_adapting(environ=None) -> str:
    """One phrase: whether `adapt` changes the thread count here, and why."""
    env = os.environ if environ is None else environ
    if env.get("OMP_NUM_THREADS", "").strip():
        return f"fixed by OMP_NUM_THREADS={env['OMP_NUM_THREADS']}"
    if env.get(OFF_VARIABLE, "").strip().lower() in ("off", "0", "false", "no"):
        return f"fixed: {OFF_VARIABLE}={env[OFF_VARIABLE]}"
    if cpu_times() is None:
        return "fixed: this system has no /proc/stat to read the load from"
    return (f"fewer while other programs keep cores busy, looked at every {CHECK_EVERY_S:g} s between steps "
            "(fix it with OMP_NUM_THREADS or torch.set_num_threads)")
