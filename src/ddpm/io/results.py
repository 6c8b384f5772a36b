"""A folder of results remembers the settings it was made with, so a rerun resumes it or refuses.

`ddpm sample`, `ddpm nll` and `ddpm eval` write their files one by one and skip, when run again,
what is already there. That is only right if the files were made the same way: the settings,
among them the checkpoint by its content hash (not its path, which another model can take), are
recorded in a JSON file beside them, and a rerun with other settings is one clear error instead
of a folder that silently mixes two models' samples. The record is written first, into a folder
that `folders.claim_folder` accepted: new, empty, or holding this record already.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Mapping, NamedTuple, Optional

import torch

from ..config import parse_json
from ..errors import UserError
from ..files import read_text
from .atomic import write_json
from .folders import claim_folder


class Provenance(NamedTuple):
    """Which model made a results folder: `tag` (`LoadedRun.tag`: the checkpoint's content hash)
    is compared when it is run again, and a rerun with another model is refused; `recorded` (e.g.
    the checkpoint's path) is written beside it, not compared."""

    tag: str = ""
    recorded: Optional[dict] = None

    @classmethod
    def of(cls, loaded) -> "Provenance":
        """A `LoadedRun`'s: its tag and its checkpoint's path."""
        return cls(loaded.tag, dict(checkpoint=str(loaded.checkpoint)))


def check_settings(path, meta: dict, info: Optional[Mapping] = None, what: str = "these results") -> None:
    """Compare `meta` with the settings an earlier run recorded at `path`, or record them there.

    :param info: recorded beside `meta`, under "recorded", but not compared (e.g. the checkpoint's path).
    :param what: names the results in the refusal of a folder that holds other files.
    """
    path = Path(path)
    claim_folder(path.parent, [path.name], what)
    if path.is_file():
        try:
            old = parse_json(read_text(path), "its content", expect=dict)
        except (ValueError, UnicodeDecodeError) as e:  # UserError is a ValueError
            raise UserError(f"{path}: not a settings record ({e}); delete it only if the files beside it were made "
                            f"with the settings you give now") from None
        old = {k: v for k, v in old.items() if k != "recorded"}
        diff = [k for k in [*meta, *(k for k in old if k not in meta)] if old.get(k) != meta.get(k)]
        if diff:
            k = diff[0]
            raise UserError(f"{path}: the files here were made with {k}={old.get(k)!r}, now {meta.get(k)!r}; "
                            f"rerun with the same settings to resume, or write to a new --out folder")
    else:
        write_json(path, {**meta, **({"recorded": dict(info)} if info else {})})


def tensor_digest(*tensors: torch.Tensor) -> str:
    """The content hash of tensors (their shapes and values), as a results record names the inputs
    it was made from: "sha256:…"."""
    h = hashlib.sha256()
    for x in tensors:
        a = x.detach().cpu().contiguous().numpy()
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return "sha256:" + h.hexdigest()
