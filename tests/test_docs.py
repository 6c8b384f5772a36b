"""No drift between what the documents say and what the code does.

Every `ddpm …` command in the README goes through the real argument parser; every preset works
with every subcommand that takes one; every `docs/… § Section` the code and tests cite exists;
nothing cites a file outside the repository.
"""

import importlib
import re
import shlex
from pathlib import Path

import pytest

import ddpm.cli as cli
from ddpm.run.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted((ROOT / "docs").glob("*.md"))


def readme_commands():
    """The argv of every `ddpm …` line in the README's code blocks (also `torchrun … -m [--] ddpm …`)."""
    text = (ROOT / "README.md").read_text()
    found = []
    for block in re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            if not re.match(r"\s*(ddpm |torchrun .*-m (-- )?ddpm )", line):
                continue
            words = shlex.split(line, comments=True)
            if "ddpm" not in words:
                continue
            i = words.index("ddpm")
            if i == 0 or words[i - 1] in ("-m", "--"):
                found.append(words[i + 1:])
    return found


def test_the_readme_has_commands_for_every_subcommand_it_documents():
    used = {argv[0] for argv in readme_commands()}
    assert len(readme_commands()) >= 10
    assert {"train", "sample", "nll", "rate-distortion", "progressive", "interpolate", "reconstruct", "fid-ref", "fid",
            "eval"} <= used


@pytest.mark.parametrize("argv", readme_commands(), ids=lambda a: " ".join(a)[:60])
def test_every_readme_command_parses(argv):
    try:
        args = cli.build_parser().parse_args(argv)
    except SystemExit as e:  # argparse's way of refusing: the README drifted from the parser
        pytest.fail(f"`ddpm {' '.join(argv)}` does not parse (exit {e.code})")
    assert args.command == argv[0]


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_works_with_info(name, capsys):
    assert cli.main(["info", "--preset", name]) == 0
    assert "parameters:" in capsys.readouterr().out


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_works_with_train(name, tmp_path, monkeypatch, capsys):
    # The whole command up to the training call: parsing, the preset, flags and --set.
    seen = {}
    monkeypatch.setattr(cli, "train", lambda out, run, progress, **_: seen.update(run=run) or dict(step=0, loss=0.0, run_dir=out))
    assert cli.main(["train", "--preset", name, "--out", str(tmp_path), "--steps", "3", "--set", "train.lr=1e-4"]) == 0
    run = seen["run"]
    assert run.train.steps == 3 and run.train.lr == 1e-4
    assert run.model == cli.model_config(preset=name)


def test_old_model_preset_names_get_a_hint(capsys):
    assert cli.main(["info", "--preset", "lsun256"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "lsun_church256" in err


def _citations(path: Path):
    for m in re.finditer(r"docs/([\w.-]+\.md)(?:\s*§\s*([A-Z][\w ,–-]*[\w]))?", path.read_text()):
        yield m.group(1), m.group(2)


def _headings(doc: Path) -> set:
    return {line.lstrip("#").strip() for line in doc.read_text().splitlines() if line.startswith("#")}


SOURCES = sorted((ROOT / "src").rglob("*.py")) + sorted((ROOT / "tests").glob("*.py")) + [ROOT / "README.md"] + DOCS


def test_every_citation_of_the_docs_points_to_a_section_that_exists():
    seen = 0
    for path in SOURCES:
        for name, section in _citations(path):
            doc = ROOT / "docs" / name
            assert doc.is_file(), f"{path.relative_to(ROOT)} cites docs/{name}, which does not exist"
            if section:
                # a citation may run on into the sentence, or break at the end of a line
                assert any(section.startswith(h) or h.startswith(section) for h in _headings(doc)), \
                    f"{path.relative_to(ROOT)} cites docs/{name} § {section}: no such section"
                seen += 1
    assert seen >= 20


def test_code_cites_no_file_outside_the_repository_and_no_issue_number():
    for path in sorted((ROOT / "src").rglob("*.py")) + sorted((ROOT / "tests").glob("*.py")):
        text = path.read_text()
        outside = "PAPER" + ".md"  # the specification the project was written from, not in the repository
        assert outside not in text, path
        assert not re.search(r"\bissue" + r"\s*#?\d", text, flags=re.I), path


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for name in parts[i:]:
                obj = getattr(obj, name)
        except AttributeError:
            return False
        return True
    return False


def test_every_library_name_the_documents_give_exists():
    names = set()
    for doc in [ROOT / "README.md", *DOCS]:
        names |= set(re.findall(r"`(ddpm(?:\.\w+)+)", doc.read_text()))
    assert len(names) >= 5
    missing = sorted(n for n in names if not _resolves(n))
    assert not missing, f"the documents name {missing}, which do not exist"
    paths = set()
    for doc in [ROOT / "README.md", *DOCS]:
        paths |= set(re.findall(r"`((?:src/|tests/|benchmarks/)?ddpm/[\w/]+\.py|(?:tests|benchmarks|scripts)/[\w/]+\.py)", doc.read_text()))
    missing = sorted(p for p in paths if not (ROOT / p).is_file() and not (ROOT / "src" / p).is_file())
    assert not missing, f"the documents name files {missing}, which do not exist"
