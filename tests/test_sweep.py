"""The bad-input sweep (tests/sweep_cases.py): every case must end with exit status != 0, no
traceback, exactly one non-empty line on stderr, and that line must name the offending thing.

argparse's usage block plus its error line counts as several lines (a failure). Python warnings
raised during the command count as stderr lines, as a user would see them. A summary of the
same cases without pytest: `.venv/bin/python tests/sweep_report.py`.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import sweep_cases as sc  # noqa: E402


@pytest.fixture(scope="session")
def sweep_env(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep-env")
    with sc.isolated_env(root):
        yield root


@pytest.fixture(scope="session")
def fixtures(sweep_env, tmp_path_factory):
    return sc.build_fixtures(tmp_path_factory.mktemp("sweep-fixtures"))


@pytest.mark.parametrize("case", sc.CASES, ids=[c.id for c in sc.CASES])
def test_bad_input_gives_one_line(case, fixtures, capsys, tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)
    argv = case.setup(tmp_path, fixtures)
    capsys.readouterr()
    rc, exc, wlines = sc.call_main(argv)
    err = capsys.readouterr().err
    if exc is not None:
        pytest.fail(f"traceback: {type(exc).__name__}: {exc}", pytrace=False)
    lines = sc.nonempty_lines(err) + wlines
    assert rc != 0, f"exit status 0: the bad input was accepted; argv={[str(a) for a in argv]}"
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n" + "\n".join(lines)
    assert sc.mentions(lines[0], case.needles()), f"the line does not name any of {case.needles()}: {lines[0]}"
