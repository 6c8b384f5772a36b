"""A folder of results remembers the settings it was made with, so a rerun resumes it or refuses.

`ddpm sample`, `ddpm nll` and `ddpm eval` write their files one by one and skip, when run again,
what is already there. That is only right if the files were made the same way: the settings are
recorded in a JSON file beside them, and a rerun with other settings is one clear error instead
of a folder that silently mixes two models' samples.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from .atomic import write_json


def check_settings(path, meta: dict) -> None:
    """Compare `meta` with the settings an earlier run recorded at `path`, or record them there."""
    path = Path(path)
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError as e:
            raise UserError(f"{path}: not valid JSON ({e}); delete it only if the files beside it were made "
                            f"with the settings you give now") from None
        diff = [k for k in [*meta, *(k for k in old if k not in meta)] if old.get(k) != meta.get(k)]
        if diff:
            k = diff[0]
            raise UserError(f"{path}: the files here were made with {k}={old.get(k)!r}, now {meta.get(k)!r}; "
                            f"rerun with the same settings to resume, or write to another --out directory")
    else:
        write_json(path, meta)
