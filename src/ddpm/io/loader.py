"""Batches gathered ahead of the training loop, on worker threads, in step order.

    loader = Prefetcher(data, order.indices, start=step0, stop=steps, pin=device.type == "cuda")
    x = loader.get(step).to(device, non_blocking=True)

Which images form a step's batch is decided on the calling thread (the order is a pure function
of (seed, step), see workflows/train.py); the workers only copy those records out of the data's
placement (`DataSet.gather`: prepared shards through the page cache, or memory), so the batches, and the run,
are the same with any number of workers or none. Threads, not processes: a gather is a copy in
numpy or a read with the GIL released, and threads share the open shards instead of one set per process.
Written here because torch's DataLoader draws its own order (a sampler per epoch) and would have
to be bent to take ours; this is the few lines that keep (seed, step) the only input.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch

from .data import DataSet

PREFETCH_DEPTH = 4  # batches in flight: enough to hide a slow read behind a few steps
WORKERS = 2


class Prefetcher:
    """`get(step)` returns the uint8 batch of `indices_of(step)`, gathered in the background while
    earlier steps train. Steps are asked for in order, from `start` to `stop` - 1."""

    def __init__(self, data: DataSet, indices_of: Callable[[int], torch.Tensor], start: int, stop: int, *,
                 depth: int = PREFETCH_DEPTH, workers: int = WORKERS, pin: bool = False):
        self.data, self.indices_of, self.stop, self.depth, self.pin = data, indices_of, stop, depth, pin
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="ddpm-data")
        self._pending: dict[int, Future] = {}
        self._next = start

    def _load(self, indices: torch.Tensor) -> torch.Tensor:
        x = self.data.gather(indices)
        return x.pin_memory() if self.pin else x

    def get(self, step: int) -> torch.Tensor:
        if step not in self._pending:  # the first call, or a step out of order: start from here
            self._cancel()
            self._next = step
        while self._next < min(step + self.depth, self.stop):
            self._pending[self._next] = self._pool.submit(self._load, self.indices_of(self._next).cpu())
            self._next += 1
        return self._pending.pop(step).result()

    def _cancel(self) -> None:
        for f in self._pending.values():
            f.cancel()
        self._pending.clear()

    def close(self) -> None:
        self._cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
