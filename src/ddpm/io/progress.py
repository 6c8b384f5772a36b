"""The one progress bar: tqdm on stderr (stdout is kept for results), or nothing.

    with progress_bar(total=n, desc="sampling", unit="img", enabled=show) as bar:
        bar.update(k)
    for t in progress(range(T, 0, -1), desc="bits/dim", enabled=show): ...

A disabled bar is tqdm's own no-op (`disable=True`), so callers never branch on it.
"""

from __future__ import annotations

import sys
from typing import Callable, Iterable, Optional, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_bar(total: Optional[int] = None, *, desc: str, unit: str = "it", enabled: bool = True,
                 initial: int = 0, leave: bool = True) -> tqdm:
    """A bar to `update` by hand, with rate and ETA; `set_postfix` shows live numbers (loss, img/s)."""
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, leave=leave,
                file=sys.stderr, dynamic_ncols=True)


def progress(iterable: Iterable[T], *, desc: str, enabled: bool = True, total: Optional[int] = None) -> Iterable[T]:
    """`iterable` with a bar that disappears when done (inner loops: the steps of one batch)."""
    if not enabled:
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)


def loop_progress(desc: str, enabled: bool = True) -> Optional[Callable[[Iterable[T]], Iterable[T]]]:
    """The `progress` argument of the diffusion's loops (reverse_loop, calc_bpd_loop), which draw
    nothing themselves: a wrapper that adds a bar, or None."""
    return (lambda steps: progress(steps, desc=desc)) if enabled else None
