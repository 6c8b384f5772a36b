"""A run directory on disk: recognised before anything is written, and its records read tolerantly.

A run directory holds, all written by `ddpm train`:

    config.json            the run's RunConfig, and its history: every resumable change (a lower
                           learning rate after a divergence, more steps, new data accepted), with
                           the step it took effect at
    ckpt-*.safetensors     checkpoints (io/checkpoint.py); each also holds the config and the
                           fingerprint of the data it was trained on
    metrics.jsonl          one JSON line per logged step
    samples/, tb/, eval/, fid-ref-train.npz, .ddpm.lock

`claim_run_folder` accepts a new or empty folder, or one that is a run (a ddpm `config.json`, or
checkpoints); anything else is refused before a byte is written. `read_run_record` reads
`config.json`, or rebuilds it from the newest checkpoint that verifies when it is missing. The
metrics log is a record, never a reason to stop: a torn last line (a full disk, a kill) or bytes
that are not UTF-8 are dropped with a warning when the run resumes, and an append that fails
leaves the file as it was.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import NamedTuple, Optional

from ..config import get_field, parse_json
from ..errors import UserError
from ..files import read_bytes
from ..io import checkpoint as ckpt
from ..io.atomic import write_json, write_text
from ..io.folders import check_folder, claim_folder
from .config import RECORD_KEYS, SECTIONS, RunConfig

CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.jsonl"


class RunRecordWarning(UserWarning):
    """A run's record was repaired: a torn metrics line dropped, config.json rebuilt."""


class RunRecord(NamedTuple):
    config: dict  # the sections, as saved
    history: list  # the resumable changes so far
    source: Path  # config.json, or the checkpoint it was rebuilt from


def _config_json(run_dir: Path) -> Optional[dict]:
    """config.json's content if it is a ddpm run config; None if absent; UserError if it is not ours."""
    path = run_dir / CONFIG_NAME
    if not path.exists():
        return None
    try:
        d = parse_json(read_bytes(path).decode("utf-8"), path)
    except UserError as e:
        raise UserError(f"{e}; move it away if it is yours, or give a new --out folder") from None
    except (UnicodeDecodeError, OSError) as e:
        raise UserError(f"{path}: not a ddpm run config ({e}); move it away if it is yours, or give a new --out "
                        f"folder") from None
    if not isinstance(d, dict) or "model" not in d or not set(d) <= set(SECTIONS) | set(RECORD_KEYS):
        keys = ", ".join(sorted(d)[:4]) if isinstance(d, dict) else type(d).__name__
        raise UserError(f"{path}: not a ddpm run config (it holds {keys}); nothing was changed there; give a new "
                        f"or empty --out folder")
    advice = "restore it, or move it away and let ddpm rebuild it from the newest checkpoint"
    for section in SECTIONS:
        get_field(d, section, dict, path, need="a JSON object of settings", default=None, advice=advice)
    get_field(d, "history", list, path, ok=lambda h: all(isinstance(e, dict) for e in h),
              need="a list of JSON objects (the resumable changes)", default=None, advice=advice)
    return d


def is_run_folder(run_dir: Path) -> bool:
    """Whether `run_dir` is a ddpm run: a ddpm config.json, or checkpoints."""
    return bool(ckpt.list_checkpoints(run_dir)) or _config_json(run_dir) is not None


def check_run_folder(run_dir) -> Path:
    """`claim_run_folder`'s check, creating nothing."""
    return check_folder(run_dir, is_run_folder, "a training run")


def claim_run_folder(run_dir) -> Path:
    """`run_dir`, created if needed, after checking it is new, empty or a run (io/folders.py)."""
    return claim_folder(run_dir, is_run_folder, "a training run")


def read_run_record(run_dir) -> Optional[RunRecord]:
    """What a run was started with: config.json, or, when it is missing, the config of the newest
    checkpoint that verifies (with a warning). None for a folder that is not a run yet."""
    run_dir = Path(run_dir)
    d = _config_json(run_dir)
    if d is not None:
        return RunRecord({k: v for k, v in d.items() if k in SECTIONS}, list(d.get("history", [])),
                         run_dir / CONFIG_NAME)
    if not ckpt.list_checkpoints(run_dir):
        return None
    found = ckpt.latest_checkpoint(run_dir)
    path, state = found
    config = state.get("config")
    if not isinstance(config, dict):
        raise UserError(f"{path}: holds no run config, and {run_dir / CONFIG_NAME} is missing; restore config.json")
    warnings.warn(f"{run_dir / CONFIG_NAME} is missing; using the config saved in {path.name} (it will be written "
                  f"back)", RunRecordWarning)  # attributed here, so the CLI's read and train's show it once
    return RunRecord(config, [], path)


def write_run_record(run_dir, run: RunConfig, history: list) -> Path:
    """config.json: the run's config and its history, atomically."""
    return write_json(Path(run_dir) / CONFIG_NAME, {**run.to_dict(), "history": history})


def truncate_metrics(path, step: int) -> None:
    """Keep the log lines of steps up to `step` (the checkpoint a run resumes from; 0 for a fresh
    start): later ones will be written again. Lines that do not parse (a torn last line, bytes
    that are not UTF-8) are dropped with one warning naming the file and the lines."""
    path = Path(path)
    if not path.exists():
        return
    lines, bad = _parse_metrics(path)
    keep = [line for rec, line in lines if rec["step"] <= step]
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (" …" if len(bad) > 5 else "")
        warnings.warn(f"{path}: dropped {len(bad)} unreadable line(s) (line {shown}; e.g. torn by a full disk "
                      f"or a kill); the log goes on from step {step}", RunRecordWarning, stacklevel=2)
    write_text(path, "".join(line + "\n" for line in keep))


def _parse_metrics(path: Path) -> tuple[list[tuple[dict, str]], list[int]]:
    """The log's records with their lines, and the numbers of the lines that do not parse."""
    lines, bad = [], []
    for i, raw in enumerate(read_bytes(path).split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
            rec = parse_json(line, path)  # UserError (a ValueError) for a line nested too deep
            if not isinstance(rec["step"], (int, float)):
                raise TypeError(f"step {rec['step']!r}")
        except (ValueError, UnicodeDecodeError, KeyError, TypeError):
            bad.append(i)
            continue
        lines.append((rec, line))
    return lines, bad


def read_metrics(path) -> list[dict]:
    """The records of a metrics log, in order; lines that do not parse are skipped (a report reads
    what there is)."""
    path = Path(path)
    return [rec for rec, _ in _parse_metrics(path)[0]] if path.is_file() else []


def append_metrics(path, rec: dict) -> None:
    """One line at the end of the log. If the write fails (a full disk), the file is cut back to
    what it was, so no torn line is left, and the OSError is raised naming it."""
    data = (json.dumps(rec) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError as e:
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            raise OSError(e.errno, e.strerror, str(path)) from e
    finally:
        os.close(fd)
