"""Run `ddpm ARGS` in this process and SIGKILL it at a chosen moment: a kill -9 that lands where
a test says, not where a loaded machine's timing happens to put it.

    python tests/kill_at.py POINT N [--rank R] [--signal TERM [--twice]] -- ARGS...
                                                                   (ARGS as for `python -m ddpm`)

POINT (N counts from 1, in this process):
  step         just before the N-th optimizer step (earlier checkpoints are on disk)
  ckpt-half    while the N-th checkpoint is being written: its header and half of its first tensor
               are on disk, under the temporary name
  ckpt-whole   when the N-th checkpoint is complete under its temporary name, before it is moved
               into place
  png          right after the N-th sample PNG is in place
  part         right after the N-th bits/dim part is in place
  decode       right after the N-th image of a data set is decoded (on a decoding thread)
  none         no kill (with --deterministic: a reference run under the same settings)
--rank R: only the process whose RANK (torchrun) is R arms the kill; the others run normally.
--deterministic: torch.use_deterministic_algorithms(True, warn_only=True) first; PyTorch then warns,
  naming each op that has no deterministic kernel (tests/test_cuda.py reads those warnings).
--signal TERM: send SIGTERM instead (what a scheduler sends before a kill): the process is asked
  to stop, and its handlers run. With `step`, --twice sends a second SIGTERM once the checkpoint
  that follows is being written.

The process kills itself with SIGKILL (no handler, no clean-up runs), exactly as `kill -9` would.
"""

import os
import re
import signal
import sys
from pathlib import Path

import torch

import ddpm.cli
from ddpm.io.atomic import TEMP_PREFIX


SIGNAL = [signal.SIGKILL]


def die():
    os.kill(os.getpid(), SIGNAL[0])


def arm(point: str, n: int, twice: bool = False) -> None:
    count = [0]

    def hit() -> bool:
        count[0] += 1
        return count[0] == n

    if point == "step":
        step = torch.optim.Adam.step

        write = os.write

        def second(fd, data):  # --twice: during the first write of the checkpoint that follows
            if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(TEMP_PREFIX + "ckpt-"):
                os.write = write
                die()
            return write(fd, data)

        def counted_step(self, *a, **k):
            if hit():
                die()
                if twice:
                    os.write = second
            return step(self, *a, **k)

        torch.optim.Adam.step = counted_step
    elif point == "none":
        pass
    elif point == "decode":
        import ddpm.io.data

        prepare_image = ddpm.io.data.prepare_image

        def counted_decode(*a, **k):  # on a decoding thread; the signal goes to the process
            result = prepare_image(*a, **k)
            if hit():
                die()
            return result

        ddpm.io.data.prepare_image = counted_decode
    elif point in ("ckpt-half", "ckpt-whole"):
        write, replace, writes = os.write, os.replace, {}

        def temp_checkpoint(fd: int) -> str:
            name = Path(os.readlink(f"/proc/self/fd/{fd}")).name
            return name if name.startswith(TEMP_PREFIX + "ckpt-") else ""

        def half_write(fd, data):
            name = temp_checkpoint(fd)
            if name:
                writes[name] = writes.get(name, 0) + 1
                # the header is the first write, the first tensor the second: half of it, then die
                if writes[name] == 2 and hit():
                    write(fd, bytes(memoryview(data).cast("B")[: max(1, len(data) // 2)]))
                    os.fsync(fd)
                    die()
            return write(fd, data)

        def stop_before_rename(src, dst, *a, **k):
            if Path(src).name.startswith(TEMP_PREFIX + "ckpt-") and hit():
                die()
            return replace(src, dst, *a, **k)

        if point == "ckpt-half":
            os.write = half_write
        else:
            os.replace = stop_before_rename
    elif point in ("png", "part"):
        replace = os.replace
        pattern = re.compile(r"\d{6}\.png" if point == "png" else r"batch-\d{6}\.npz")

        def after(src, dst, *a, **k):
            result = replace(src, dst, *a, **k)
            if pattern.fullmatch(Path(dst).name) and hit():
                die()
            return result

        os.replace = after
    else:
        raise SystemExit(f"kill_at.py: unknown point {point!r}")


def main(argv: list[str]) -> int:
    split = argv.index("--")
    opts, args = argv[:split], argv[split + 1:]
    point, n = opts[0], int(opts[1])
    rank = opts[opts.index("--rank") + 1] if "--rank" in opts else None
    if "--deterministic" in opts:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if "--signal" in opts:
        SIGNAL[0] = signal.Signals["SIG" + opts[opts.index("--signal") + 1]]
    if rank is None or os.environ.get("RANK", "0") == rank:
        arm(point, n, twice="--twice" in opts)
    return ddpm.cli.main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
