"""The house's one rule, read from the source: layers import only from the layers below them.

process (the paper's equations) → network (the U-Net and how it runs) → io (files, data,
processes) → run (configurations, presets, loading a run) → workflows (train, sample, bits/dim,
the experiments, FID) → cli; `errors`, `config` and `version` sit underneath them all, and the
top-level package re-exports the library on top (docs/LAYERS.md). Every module's imports are read
with `ast`, nothing is imported or run.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "ddpm"
LAYERS = ["base", "process", "network", "io", "run", "workflows", "cli", "package"]
BASE = {"ddpm.errors", "ddpm.config", "ddpm.version", "ddpm.threads", "ddpm.files"}
# Packages that are optional (extras, or only needed by one command): importing them where they
# are used keeps `import ddpm` working without them. Nothing else is imported inside a function.
OPTIONAL = {"diffusers", "lmdb", "torch_fidelity", "tensorboard", "torch.utils.tensorboard", "litdata", "matplotlib", "wandb", "huggingface_hub"}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def layer(mod: str) -> int:
    if mod in BASE:
        return LAYERS.index("base")
    if mod == "ddpm":
        return LAYERS.index("package")
    if mod in ("ddpm.cli", "ddpm.__main__"):
        return LAYERS.index("cli")
    return LAYERS.index(mod.split(".")[1])


def imports(mod: str):
    """(target module, names taken from it, line, inside a function?) for every import of `mod`."""
    path = MODULES[mod]
    tree = ast.parse(path.read_text(), str(path))
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_function |= {id(n) for n in ast.walk(node) if n is not node}
    for node in ast.walk(tree):
        inner = id(node) in in_function
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], node.lineno, inner
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            if submodules:  # `from . import winograd`: an import of that module
                for s in submodules:
                    yield s, [], node.lineno, inner
                names = [n for n in names if f"{target}.{n}" not in MODULES]
                if not names:
                    continue
            yield target, names, node.lineno, inner


def ddpm_imports(mod: str):
    return [(t, names, line, inner) for t, names, line, inner in imports(mod) if t == "ddpm" or t.startswith("ddpm.")]


def test_every_module_has_a_layer():
    assert len(MODULES) > 30
    for mod in MODULES:
        assert 0 <= layer(mod) < len(LAYERS), mod


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_imports_go_down_only(mod):
    for target, _, line, _ in ddpm_imports(mod):
        assert layer(target) <= layer(mod), (
            f"{MODULES[mod].relative_to(SRC.parent)}:{line} imports {target} ({LAYERS[layer(target)]}) "
            f"from the {LAYERS[layer(mod)]} layer")


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_no_private_names_cross_modules(mod):
    path = MODULES[mod]
    for target, names, line, _ in ddpm_imports(mod):
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        assert not private, f"{path.relative_to(SRC.parent)}:{line} imports {private} from {target}"
    # ... nor through a module object: `ckpt._helper`
    tree = ast.parse(path.read_text())
    aliases = {a.asname or a.name.split(".")[-1] for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
               for a in n.names if (getattr(n, "level", 0) or (getattr(n, "module", None) or a.name).startswith("ddpm"))}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            assert not (node.attr.startswith("_") and not node.attr.startswith("__")), \
                f"{path.relative_to(SRC.parent)}:{node.lineno} uses {node.value.id}.{node.attr}"


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_imports_inside_functions_are_only_of_optional_packages(mod):
    for target, _, line, inner in imports(mod):
        if inner:
            assert any(target == o or target.startswith(o + ".") for o in OPTIONAL), \
                f"{MODULES[mod].relative_to(SRC.parent)}:{line} imports {target} inside a function"


def test_no_import_cycles():
    graph = {mod: {t for t, *_ in ddpm_imports(mod) if t in MODULES and t != mod} for mod in MODULES}
    # Importing `ddpm.x.y` runs `ddpm/__init__` first, but that is the package's own re-export layer
    # on top; the cycles that matter are between modules.
    graph = {m: {t for t in targets if t != "ddpm"} for m, targets in graph.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_rule_is_checked_for_real(tmp_path):
    # The checks above must be able to fail: an upward import, a private name and a cycle in a
    # made-up tree are all caught by the same functions.
    global SRC, MODULES
    saved = SRC, MODULES
    try:
        root = tmp_path / "ddpm"
        for sub in ("process", "workflows"):
            (root / sub).mkdir(parents=True)
            (root / sub / "__init__.py").write_text("")
        (root / "__init__.py").write_text("")
        (root / "process" / "a.py").write_text("from ..workflows.b import helper\n")
        (root / "workflows" / "b.py").write_text("from ..process.a import _secret\n\ndef f():\n    import numpy\n")
        SRC = root
        MODULES = {module_name(p): p for p in sorted(root.rglob("*.py"))}
        with pytest.raises(AssertionError, match="imports ddpm.workflows.b"):
            test_imports_go_down_only("ddpm.process.a")
        with pytest.raises(AssertionError, match="_secret"):
            test_no_private_names_cross_modules("ddpm.workflows.b")
        with pytest.raises(AssertionError, match="inside a function"):
            test_imports_inside_functions_are_only_of_optional_packages("ddpm.workflows.b")
        with pytest.raises(pytest.fail.Exception, match="import cycle"):
            test_no_import_cycles()
    finally:
        SRC, MODULES = saved


def test_the_layer_table_lists_every_module_in_its_layer():
    doc = (SRC.parents[1] / "docs" / "LAYERS.md").read_text()
    for mod, path in MODULES.items():
        if path.name == "__init__.py" and mod != "ddpm":
            continue
        rel = path.relative_to(SRC.parent).as_posix()
        row = next((line for line in doc.splitlines() if line.startswith(f"| `{rel}` |")), None)
        assert row is not None, f"docs/LAYERS.md has no row for {rel}"
        assert row.split("|")[2].strip() == LAYERS[layer(mod)], row


def test_no_caller_outside_io_asks_which_placement_a_data_set_has():
    """`DataSet` is complete (docs/DATA.md): every placement answers every method the callers use,
    so no module above io/ tests a data set's type. The placements are found by reading io/."""
    placements = {"DataSet"}
    for path in sorted((SRC / "io").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                placements |= {node.name} if any(getattr(b, "id", None) in placements for b in node.bases) else set()
    assert {"ImageSet", "PreparedSet", "StreamSet", "ImageFolder", "NpzImages", "Subset"} <= placements
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if path.parent.name == "io":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "issubclass") \
                    and len(node.args) == 2:
                names = {n.id if isinstance(n, ast.Name) else getattr(n, "attr", None) for n in ast.walk(node.args[1])}
                if names & placements:
                    found.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert not found, f"type tests on a data placement outside io/: {found}"
