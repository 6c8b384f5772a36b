"""Typed configs: one frozen dataclass per concern, validated when built, saved as JSON.

Each concern (model, diffusion, data, training) owns a dataclass in its own module and
inherits `Config`, which gives it `to_dict`, `from_dict` (unknown keys are an error that lists
the valid ones) and `replace`. Lists in JSON become tuples so configs stay hashable and compare
equal after a round trip.

Option sets are `Choice` enums: a field annotated with one is converted from its string once,
when the config is built, and an unknown string is an error that lists the valid ones. A Choice
is a `str`, so it compares equal to its value and is written to JSON as that string.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import json
import numbers
import re
import typing
from typing import Any, Mapping

from .errors import UserError, os_error_line
from .files import open_regular


class Choice(str, enum.Enum):
    """A closed set of string options. `Kind.parse(value, "section.field")` is the one check."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def parse(cls, value, field: str):
        """`value` as a member, or a UserError naming the field, the value and every valid choice."""
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            valid = ", ".join(repr(c.value) for c in cls)
            raise UserError(f"{field}={value!r} is not valid; choose one of: {valid}") from None


class Config:
    """Mixin for frozen dataclasses. Subclasses may define `validate(self)` (called on build) and
    `SECTION`, the name their fields go by in messages (`train.lr`)."""

    SECTION = ""

    def __post_init__(self):
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, list):
                object.__setattr__(self, f.name, tuple(v))
            kind = hints.get(f.name)
            if isinstance(kind, type) and issubclass(kind, Choice):
                where = f"{self.SECTION}.{f.name}" if self.SECTION else f.name
                object.__setattr__(self, f.name, kind.parse(v, where))
        self.validate()

    def validate(self) -> None:  # overridden where there is something to check
        pass

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "config"):
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(d, Mapping):
            raise UserError(f"{where}: expected a JSON object of {cls.__name__} fields ({', '.join(names[:4])}, …), "
                            f"found {_kind_name(type(d))}")
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise UserError(
                f"{where}: unknown field(s) {', '.join(unknown)} for {cls.__name__}; "
                f"valid fields: {', '.join(names)}"
            )
        return cls(**{k: _coerce(cls, k, v, where) for k, v in d.items()})

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


_HINTS: dict[type, dict] = {}


def _hints(cls: type) -> dict:
    """The evaluated field annotations of a config class (cached: get_type_hints is slow)."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _coerce(cls, name: str, value: Any, where: str) -> Any:
    """Coerce a JSON / command-line value to the field's annotated type, or fail with one line."""
    hints = _hints(cls)
    tp = hints.get(name)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if value is None:
        return None
    try:
        if tp is bool:
            if isinstance(value, str):
                low = value.lower()
                if low not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return low in ("true", "1", "yes")
            return bool(value)
        if tp in (int, float, str):
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return tp(value)
        if origin is tuple:
            if isinstance(value, str):
                value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
            inner = args[0] if args else str
            inner = inner if inner in (int, float, str) else (lambda v: v)
            return tuple(inner(v) for v in value)
        if origin is typing.Union and type(None) in args:  # Optional[X]; a union of several is left to validate()
            inner = [a for a in args if a is not type(None)]
            if len(inner) == 1 and inner[0] in (int, float, str):
                return inner[0](value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: field {name}={value!r} is not a valid {getattr(tp, '__name__', tp)}") from None
    return value


# Limits on every number that sizes an allocation or a loop, checked where the number is read
# (a flag, a config, a checkpoint's config, a data file) before anything is allocated: far above
# any real use, far below what exhausts a machine's memory or never ends.
MAX_SIDE = 4096  # pixels, an image side: 4096x4096 RGB is 48 MiB as uint8 (a side of 100,000 would be 30 GB)
MAX_TIMESTEPS = 100_000  # diffusion.T: the process keeps a dozen tables of T float64 values (the paper's T is 1000)
MAX_CLASSES = 100_000  # class ids 0 … K-1 (ImageNet-21k has 21,841 classes)
MAX_SAMPLES = 1_000_000  # images of a sample set: what the six-digit names 000000.png … 999999.png hold
MAX_BATCH = 65_536  # images in one batch
MAX_FIGURE = 1024  # images in one row or column of a figure (chains, continuations, values of λ)


def check_count(value, field: str, most: int, least: int = 1, why: str = "") -> int:
    """`value` as an int in least … most; else one line naming `field`, the value and the range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
        raise UserError(f"{field}={value!r}: give an integer of at least {least}")
    if value > most:
        raise UserError(f"{field}={value}: more than {most:,}, the most ddpm takes{f' ({why})' if why else ''}; "
                        f"give a smaller number")
    return int(value)


def parse_size(value, field: str) -> tuple[int, int]:
    """An image size as (height, width): an int n is n x n, a string "HxW" (or "H×W") is H x W.

    One line naming `field` for anything else; both sides must be positive integers."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value >= 1:
            return _bounded(field, value, value)
    elif isinstance(value, str):
        parts = value.lower().replace("×", "x").split("x")
        if all(p.strip().isdigit() for p in parts) and len(parts) in (1, 2):
            h, w = (int(parts[0]), int(parts[-1]))
            if h >= 1 and w >= 1:
                return _bounded(field, h, w)
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
        return _bounded(field, int(value[0]), int(value[1]))
    raise UserError(f"{field}={value!r} is not a valid size; give a positive integer (square) or HxW, e.g. 64x128")


class SizeTooLarge(UserError):
    pass


def _bounded(field: str, h: int, w: int) -> tuple[int, int]:
    if max(h, w) > MAX_SIDE:
        raise SizeTooLarge(f"{field}={size_value((h, w))}: a side over {MAX_SIDE}, the most ddpm takes (one "
                           f"{h}x{w} RGB image would need {3 * h * w / 2**30:.1f} GiB as bytes, 4 times that as "
                           f"floats); give {MAX_SIDE} or less")
    return h, w


def size_value(size: tuple[int, int]):
    """The canonical config value of a size: an int for a square, "HxW" otherwise."""
    h, w = size
    return h if h == w else f"{h}x{w}"


def apply_overrides(cfg, pairs: list[str], where: str = "--set"):
    """Apply `key=value` strings (as given to --set) to a config, with the same checks as JSON."""
    changes: dict[str, Any] = {}
    for p in pairs:
        if "=" not in p:
            raise UserError(f"{where} {p!r}: expected key=value")
        k, v = p.split("=", 1)
        if v.strip() == "":  # e.g. train.init_from=$CKPT with $CKPT unset: never the default in silence
            raise UserError(f"{where} {p!r}: the value of {k.strip()} is empty; give one (is a shell variable "
                            f"unset? an empty list is written ()), or leave the --set out to keep the default")
        changes[k.strip()] = v.strip()
    d = cfg.to_dict()
    names = set(d)
    unknown = sorted(set(changes) - names)
    if unknown:
        raise UserError(f"{where}: unknown field(s) {', '.join(unknown)}; valid fields: {', '.join(sorted(names))}")
    d.update(changes)
    return type(cfg).from_dict(d, where=where)


MAX_JSON_DEPTH = 64  # far deeper than anything ddpm writes; a deeper file is damaged or hostile
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_NOT_BRACKET = re.compile(r"[^][{}]+")


def json_depth(text: str) -> int:
    """How deep arrays and objects nest in JSON `text` (brackets inside strings do not count)."""
    depth = deepest = 0
    for c in _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)):
        depth += 1 if c in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def parse_json(text: str, where, expect: type | None = None):
    """JSON `text` from the file or field `where`, nesting at most MAX_JSON_DEPTH deep (deeper
    would exhaust Python's recursion), its top level of type `expect`; one UserError line otherwise."""
    if json_depth(text) > MAX_JSON_DEPTH:
        raise UserError(f"{where}: JSON nested more than {MAX_JSON_DEPTH} levels deep; no file that ddpm reads nests "
                        f"so deep: it is damaged, or not the file meant")
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise UserError(f"{where}: not valid JSON ({e})") from None
    if expect is not None and not isinstance(d, expect):
        raise UserError(f"{where}: expected a JSON {_kind_name(expect)}, found {_kind_name(type(d))}")
    return d


def load_json(path, where: str | None = None, expect: type | None = None):
    """A JSON file's content; any way it can be unreadable is one line naming it (`parse_json`).

    :param expect: the type the top level must have (e.g. dict), checked here.
    """
    if str(path).strip() == "":
        raise UserError(f"{where or 'a JSON file'}: the path is empty; give a JSON file")
    try:
        with io.TextIOWrapper(open_regular(path), encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise UserError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a folder; give a JSON file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}); give a JSON file") from None
    except OSError as e:
        raise UserError(f"cannot read {os_error_line(e, path)}") from None
    return parse_json(text, where or path, expect)


_KIND_NAMES = {dict: "object", list: "list", str: "string", int: "integer", float: "number", bool: "true/false",
               type(None): "null"}


def _kind_name(kind) -> str:
    if isinstance(kind, tuple):
        return " or ".join(_kind_name(k) for k in kind)
    return _KIND_NAMES.get(kind, getattr(kind, "__name__", str(kind)))


def _is_kind(value, kind) -> bool:
    """isinstance for JSON values: a bool is not a number, an integer is a number (float)."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool):
        return bool in kinds
    return any(isinstance(value, k) or (k is float and isinstance(value, int)) for k in kinds)


REQUIRED = object()  # get_field: the key must be there


def get_field(record, key: str, kind, where, *, ok=None, need: str = "", default=REQUIRED, advice: str = ""):
    """`record[key]`, checked against a schema: the JSON kind `kind` (a type or a tuple of them)
    and, if given, the predicate `ok` (described by `need`, e.g. "an integer >= 0").

    Every reader of a file ddpm wrote (a checkpoint's header, config.json, eval.json, a prepared
    manifest, an exported config) takes its fields through here, so that a damaged or foreign
    file is one line naming the file (`where`), the field and the value, with `advice` (what to
    do), never a TypeError deep inside. A missing key returns `default`, or is that line too.
    """
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object holding {key!r}, found {_kind_name(type(record))}"
                        f"{f'; {advice}' if advice else ''}")
    if key not in record:
        if default is not REQUIRED:
            return default
        raise UserError(f"{where}: field {key!r} is missing{f'; {advice}' if advice else ''}")
    value = record[key]
    if not _is_kind(value, kind) or (ok is not None and not ok(value)):
        shown = repr(value) if len(repr(value)) <= 60 else f"{repr(value)[:57]}..."
        what = need or f"a JSON {_kind_name(kind)}"
        raise UserError(f"{where}: field {key}={shown} is not {what}{f'; {advice}' if advice else ''}")
    return value
