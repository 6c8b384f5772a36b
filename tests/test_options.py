"""The options that travel together are objects, and each default is written once (read from the source).

Two facts, checked with `ast` (nothing is imported or run):

1. No public workflow function (src/ddpm/workflows/*.py without a leading underscore, and what
   `ddpm` exports from there) takes more than MAX_PARAMS parameters: what travels together is a
   spec (`ModelSpec`, `SamplerSpec`, `GuidanceSpec`, …), not a loose keyword list.
2. Each option's default is *written* in exactly one place: a parameter default, a field of a
   dataclass or NamedTuple, an argparse `default=`, or an entry of a dict literal (a table of
   defaults). Written means a literal (`"fp32"`) or an enum member (`Precision.FP32`); a default
   that refers to a spec's (`precision: str = ModelSpec.precision`) is a reference, not another copy.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "ddpm"
MAX_PARAMS = 8

ELSEWHERE: set = set()  # public workflow functions allowed more parameters: none

# Where option defaults may be written: the layers that carry options to the user. The paper's
# equations below them (process/diffusion.py, process/guidance.py) keep their own keyword defaults.
SCOPE = ["process/sampling.py", "run/*.py", "workflows/*.py", "cli.py", "__init__.py"]
SCOPE_SKIP: set = set()
# Classes whose fields are another setting that happens to share a value: the training recipe's
# own train.precision (what training computes in) is not the precision a trained model runs at.
OTHER_SETTINGS = {"TrainConfig"}

# (the names an option goes by, its default): each must be written exactly once.
DEFAULTS = [
    ({"precision"}, "fp32"),
    ({"weights"}, "ema"),
    ({"guidance", "weight"}, 1.0),
    ({"sampler"}, "ancestral"),
    ({"steps", "ddim_steps"}, 50),
    ({"eta", "ddim_eta"}, 0.0),
    ({"spacing", "ddim_spacing"}, "uniform"),
    ({"clip_denoised"}, True),
    ({"fast"}, "auto"),
]


def _files(patterns, skip=()):
    out = []
    for pattern in patterns:
        out += [p for p in sorted(SRC.glob(pattern)) if str(p.relative_to(SRC)) not in skip]
    return out


def _n_params(fn: ast.FunctionDef) -> int:
    a = fn.args
    return len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)


def _exported_names() -> set[str]:
    """Names `ddpm/__init__.py` imports from the workflows."""
    tree = ast.parse((SRC / "__init__.py").read_text())
    return {a.asname or a.name for node in tree.body if isinstance(node, ast.ImportFrom)
            and (node.module or "").startswith("workflows") for a in node.names}


def public_workflow_functions(root: Path = SRC) -> dict[str, int]:
    """{"file:function": parameter count} of every public workflow function."""
    exported = _exported_names() if root == SRC else set()
    found = {}
    for path in sorted((root / "workflows").glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and (not node.name.startswith("_") or node.name in exported):
                found[f"{path.name}:{node.name}"] = _n_params(node)
    return found


def _written(node) -> tuple[bool, object]:
    """(is this default written here, its value): a literal, or an enum member `Kind.MEMBER`."""
    if isinstance(node, ast.Constant) and node.value is not None:
        return True, node.value
    if isinstance(node, ast.Attribute) and node.attr.isupper():
        return True, node.attr.lower()
    return False, None


def _flag_dest(call: ast.Call):
    """The argparse dest of an add_argument call: dest=, else its first --long flag."""
    for k in call.keywords:
        if k.arg == "dest" and isinstance(k.value, ast.Constant):
            return k.value.value
    for a in call.args:
        if isinstance(a, ast.Constant) and isinstance(a.value, str) and a.value.startswith("--"):
            return a.value[2:].replace("-", "_")
    return None


def written_defaults(files) -> list[tuple[str, str, object]]:
    """(where, option name, value) of every default written in `files`."""
    out = []
    for path in files:
        tree = ast.parse(path.read_text())
        where = "/".join(path.parts[-2:])
        skip = {id(n) for c in ast.walk(tree) if isinstance(c, ast.ClassDef) and c.name in OTHER_SETTINGS
                for n in ast.walk(c)}
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            pairs = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                pos = a.posonlyargs + a.args
                pairs += list(zip([p.arg for p in pos[len(pos) - len(a.defaults):]], a.defaults))
                pairs += [(p.arg, d) for p, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None]
            elif isinstance(node, ast.ClassDef):
                pairs += [(s.target.id, s.value) for s in node.body
                          if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name) and s.value is not None]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
                dest = _flag_dest(node)
                pairs += [(dest, k.value) for k in node.keywords if k.arg == "default" and dest]
            elif isinstance(node, ast.Dict):
                pairs += [(k.value, v) for k, v in zip(node.keys, node.values)
                          if isinstance(k, ast.Constant) and isinstance(k.value, str)]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
                pairs += [(k.arg, k.value) for k in node.keywords if k.arg]
            for name, value_node in pairs:
                is_written, value = _written(value_node)
                if is_written:
                    out.append((f"{where}:{getattr(node, 'lineno', '?')}", name, value))
    return out


def _same(value, expected) -> bool:
    return isinstance(value, bool) == isinstance(expected, bool) and value == expected


def count_defaults(root: Path = SRC) -> dict[str, list[str]]:
    """{"names=default": [where it is written, …]} for each option of DEFAULTS."""
    files = []
    for pattern in SCOPE:
        files += [p for p in sorted(root.glob(pattern)) if str(p.relative_to(root)) not in SCOPE_SKIP]
    found = written_defaults(files)
    return {f"{'/'.join(sorted(names))}={default!r}": [w for w, n, v in found if n in names and _same(v, default)]
            for names, default in DEFAULTS}


def test_no_public_workflow_function_takes_more_than_eight_parameters():
    over = {k: n for k, n in public_workflow_functions().items() if n > MAX_PARAMS and k.split(":")[1] not in ELSEWHERE}
    assert not over, f"public workflow functions over {MAX_PARAMS} parameters (group them into a spec): {over}"


@pytest.mark.parametrize("key", [f"{'/'.join(sorted(n))}={d!r}" for n, d in DEFAULTS])
def test_each_option_default_is_written_once(key):
    places = count_defaults()[key]
    assert len(places) == 1, f"{key} written in {len(places)} places (write it once, refer to it elsewhere): {places}"


def test_the_scan_counts_what_is_written_and_not_what_refers(tmp_path):
    # the counting itself, on a source of known content: a literal, an enum member, an argparse
    # default and a table each count; a reference to a spec's default and None do not
    f = tmp_path / "example.py"
    f.write_text('import argparse\n'
                 'def f(precision="fp32", *, guidance: float = Spec.weight, weights=None): pass\n'
                 'class S:\n    precision: P = P.FP32\n'
                 'p = argparse.ArgumentParser()\n'
                 'p.add_argument("--precision", default="fp32")\n'
                 'p.add_argument("--guidance", default=Spec.weight)\n'
                 'TABLE = dict(ddim_steps=50)\n'
                 'OTHER = {"eta": 0.0}\n')
    found = sorted((name, value) for _, name, value in written_defaults([f]))
    assert found == [("ddim_steps", 50), ("eta", 0.0), ("precision", "fp32"), ("precision", "fp32"),
                     ("precision", "fp32")]
