"""tests/RELIABILITY.md maps every promise of issue 8 to the tests that keep it. These checks keep that
index true: each test it names exists, is not skipped, and runs in the default pytest run."""

import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INDEX = ROOT / "tests" / "RELIABILITY.md"
REFERENCE = re.compile(r"`(tests/[\w/]+\.py)::(\w+)`")
SECTIONS = ("Faults during training", "Hostile and broken files", "Errors users see")


def _rows() -> list[tuple[str, str]]:
    """(promise, tests) of every table row of the index, headers and separators left out."""
    rows = []
    for line in INDEX.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 2 and cells[0] not in ("Promise", "---"):
            rows.append((cells[0], cells[1]))
    return rows


def _test_functions(path: Path) -> dict[str, ast.FunctionDef]:
    tree = ast.parse(path.read_text())
    return {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def _skip_marks(tree_or_function) -> list[str]:
    decorators = [ast.unparse(d) for d in getattr(tree_or_function, "decorator_list", [])]
    return [d for d in decorators if re.search(r"\b(skip|skipif|xfail)\b", d)]


def test_every_section_of_the_issue_is_there_and_every_promise_names_a_test():
    text = INDEX.read_text()
    assert all(f"## {section}" in text for section in SECTIONS)
    rows = _rows()
    assert len(rows) >= 25
    for promise, tests in rows:
        assert REFERENCE.search(tests), f"no test named for: {promise}"


def test_every_named_test_exists_and_is_not_skipped():
    references = REFERENCE.findall(INDEX.read_text())
    assert len(references) >= 60
    files: dict[str, dict[str, ast.FunctionDef]] = {}
    for file, name in references:
        path = ROOT / file
        assert path.is_file(), f"{file} (named in {INDEX.name}) does not exist"
        functions = files.setdefault(file, _test_functions(path))
        assert name in functions, f"{file}::{name} (named in {INDEX.name}) does not exist"
        assert not _skip_marks(functions[name]), f"{file}::{name} is skipped: {_skip_marks(functions[name])}"
    for file in files:  # no module-wide skip either
        module = (ROOT / file).read_text()
        assert not re.search(r"^pytestmark\s*=.*\b(skip|skipif|xfail)\b", module, re.M), file


def test_the_default_run_deselects_nothing():
    """Issue 8: the malicious-pickle and kill-and-resume tests stay in the default run."""
    options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    addopts = options.get("addopts", "")
    assert not re.search(r"(^|\s)(-m|-k|--deselect|--ignore)\b", addopts), addopts
    conftest = (ROOT / "tests" / "conftest.py").read_text()
    assert "pytest_collection_modifyitems" not in conftest and "collect_ignore" not in conftest
