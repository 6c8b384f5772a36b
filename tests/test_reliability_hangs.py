"""No hang, no unbounded memory, every signal obeyed, no crash without a message.

Each command runs in a subprocess with a generous timeout: a hang is a failure (TimeoutExpired),
never a stuck test run. The one-line refusals of special files and huge sizes are in the sweep
(tests/sweep_cases.py, the `r3-` cases); here are the cases that need a signal, a second process
or a file changed while it is read.
"""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image

from ddpm.io import checkpoint as ckpt

PY = sys.executable
KILL_AT = str(Path(__file__).with_name("kill_at.py"))
SRC = str(Path(__file__).resolve().parents[1] / "src")
HANG_S = 120  # far more than any of these takes on 2 loaded cores; reaching it means a hang


def _env(tmp_path) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", DDPM_CACHE_DIR=str(tmp_path / "cache"),
                PYTHONPATH=os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]))


def _run(argv, tmp_path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, env=_env(tmp_path), capture_output=True, text=True, timeout=HANG_S, **kw)


def _lines(text: str) -> list:
    return [line for line in text.splitlines() if line.strip()]


def _pngs(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def test_a_fifo_among_the_images_is_never_opened(tmp_path):
    """A FIFO nobody writes, named like an image: refused in one line (on_error=stop) or skipped
    with one warning (skip), at once; opening it would block the decoding thread forever."""
    imgs = _pngs(tmp_path / "imgs", 3)
    os.mkfifo(imgs / "pipe.png")
    r = _run([PY, "-m", "ddpm", "prepare", str(imgs), "--out", str(tmp_path / "p"), "--no-progress"], tmp_path)
    assert r.returncode == 2 and _lines(r.stderr) == [_lines(r.stderr)[0]], r.stderr
    assert "pipe.png" in r.stderr and "FIFO" in r.stderr and "Traceback" not in r.stderr
    r = _run([PY, "-m", "ddpm", "prepare", str(imgs), "--out", str(tmp_path / "q"), "--no-progress",
              "--on-error", "skip"], tmp_path)
    assert r.returncode == 0, r.stderr
    warnings = [line for line in _lines(r.stderr) if "warning" in line]
    assert len(warnings) == 1 and "pipe.png" in warnings[0], r.stderr
    assert '"count": 3' in (tmp_path / "q" / "manifest.json").read_text()


def test_sigterm_while_training_prepares_its_data_stops_at_once_and_the_run_resumes(tmp_path):
    """SIGTERM in the middle of decoding a folder (training prepares it into the cache first):
    the process ends with status 143 and one line, before any step; nothing is checkpointed, and
    the same command then finishes the run."""
    imgs = _pngs(tmp_path / "imgs", 24)
    run_dir = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--data", str(imgs), "--out", str(run_dir), "--steps", "2", "--no-progress",
            "--set", "diffusion.T=20"]
    r = _run([PY, KILL_AT, "decode", "5", "--signal", "TERM", "--", *args], tmp_path)
    assert r.returncode == 128 + signal.SIGTERM, r.stderr
    lines = _lines(r.stderr)  # the data are opened before the run folder is claimed: the CLI's own line
    assert len(lines) == 1 and lines[0].startswith("ddpm train: stopped by SIGTERM") and "same command" in lines[0], \
        r.stderr
    assert ckpt.list_checkpoints(run_dir) == []
    r = _run([PY, "-m", "ddpm", *args], tmp_path)
    assert r.returncode == 0, r.stderr
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [2]


WATCHDOG = textwrap.dedent("""
    import os, signal, sys, time
    from ddpm.io.stopping import SignalWatchdog
    with SignalWatchdog("ddpm test", grace=float(sys.argv[1])):
        # a handler that never reports back stands for a main thread stuck in a C call, where
        # Python never gets to run the real one
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(60)
    print("not stopped")
""")


def test_a_signal_whose_handler_cannot_run_still_ends_the_process(tmp_path):
    r = _run([PY, "-c", WATCHDOG, "1"], tmp_path)
    assert r.returncode == 128 + signal.SIGTERM and "not stopped" not in r.stdout, (r.returncode, r.stderr)
    lines = _lines(r.stderr)
    assert len(lines) == 1 and "stopped by SIGTERM" in lines[0] and "run the same command again" in lines[0], lines


SHARD_CUT = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import ddpm.cli
    import ddpm.workflows.train as tr

    shard = Path(sys.argv[1]) / "shard-00000.u8"
    save = tr._save

    def save_then_cut(run_dir, done, *a, **k):
        save(run_dir, done, *a, **k)
        if done == 2:  # the shard is cut to nothing while training reads it
            os.truncate(shard, 0)

    tr._save = save_then_cut
    sys.exit(ddpm.cli.main(sys.argv[2:]))
""")


def test_a_shard_cut_short_while_training_reads_it_is_one_line_and_the_checkpoint_stands(tmp_path):
    """Through a memory map this was SIGBUS: the process died without a word."""
    from ddpm.io.data import DataConfig
    from ddpm.io.prepared import prepare

    src = tmp_path / "x.npz"
    np.savez(src, x=np.random.default_rng(1).integers(0, 256, (64, 32, 32), dtype=np.uint8))
    prepared = prepare(DataConfig(source=str(src)), tmp_path / "prep", progress=False).path
    run_dir = tmp_path / "run"
    r = _run([PY, "-c", SHARD_CUT, str(prepared), "train", "--preset", "tiny", "--data", str(prepared), "--out",
              str(run_dir), "--steps", "12", "--batch", "8", "--checkpoint-every", "2", "--no-progress",
              "--set", "diffusion.T=20", "--set", "train.log_every=100"], tmp_path)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = _lines(r.stderr)
    assert len(lines) == 1 and "shard-00000.u8" in lines[0] and "Traceback" not in r.stderr, lines
    newest = ckpt.list_checkpoints(run_dir)[-1][1]
    assert ckpt.load_checkpoint(newest)["step"] >= 2
