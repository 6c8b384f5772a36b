"""torchrun / DDP helpers that degrade to one process.

`init()` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) and starts a process group
(NCCL on GPU, gloo on CPU); without torchrun it returns world size 1 and nothing else changes.
A rank that dies makes the others fail their next collective within `DDPM_DIST_TIMEOUT` seconds
(default 600) instead of hanging forever.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Sequence, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from ..config import Choice
from ..errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class Device(Choice):
    AUTO = "auto"  # CUDA when there is one, else the CPU
    CPU = "cpu"
    CUDA = "cuda"


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    name = Device.parse(name, "device")
    if name is Device.AUTO:
        name = Device.CUDA if torch.cuda.is_available() else Device.CPU
    if name is Device.CUDA:
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init(device: str = "auto") -> DistInfo:
    """Join torchrun's process group if there is one; otherwise the world is this process.

    :param device: "auto" (CUDA when there is one), "cpu" or "cuda" (an error without CUDA).
    """
    device = Device.parse(device, "device")
    if device is Device.CUDA and not torch.cuda.is_available():
        raise UserError("device=cuda: no CUDA device is available here; use cpu (or auto)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo(device=pick_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        timeout = datetime.timedelta(seconds=float(os.environ.get("DDPM_DIST_TIMEOUT", "600")))
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timeout,
                                device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    """Whether this process is rank 0 of torchrun's group (or the only process)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_gather_tensor(x: torch.Tensor, info: DistInfo, on_device: bool = False) -> list[torch.Tensor]:
    """Every rank's copy of a same-shaped tensor, in rank order ([x] in one process); on the CPU, or
    with `on_device` where the collective left them (the device under NCCL: no host sync)."""
    if info.world_size == 1:
        return [x]
    # NCCL only moves CUDA tensors; gloo only CPU ones.
    src = x.to(info.device) if info.device.type == "cuda" else x.cpu()
    out = [torch.empty_like(src) for _ in range(info.world_size)]
    dist.all_gather(out, src)
    return out if on_device else [o.cpu() for o in out]


def broadcast_object(obj, info: DistInfo):
    """Rank 0's value on every rank (for small JSON-able decisions such as 'stop now')."""
    if info.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Process `rank`'s share of `items`: a contiguous block; the blocks of ranks 0 … world_size-1
    cover `items` once, in order, and differ in size by at most one. Every split of work over
    processes in this package (sampling, bits/dim, Inception features) uses it."""
    items = list(items)
    n = len(items)
    return items[rank * n // world_size: (rank + 1) * n // world_size]


def check_seed(seed, flag: str = "--seed") -> int:
    """`seed` as an int >= 0, else one line; commands call it before they write anything."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"{flag} {seed!r}: a seed is an integer >= 0")
    return int(seed)


def derive_seed(*ints: int) -> int:
    """A well-mixed 63-bit seed from a tuple of integers, e.g. (seed, step) or (seed, image index).

    Every random draw of training and sampling is seeded this way, so a result depends only on
    these numbers: not on the batch size, the number of processes, or where a run was resumed.
    """
    if any(int(i) < 0 for i in ints):
        raise UserError(f"seed={ints[0]}: a seed is an integer >= 0")
    return int(np.random.SeedSequence([int(i) for i in ints]).generate_state(1, dtype=np.uint64)[0] >> 1)
