"""The docs tell the truth: every code block in docs/*.md and README.md is code a test runs, a
marked counterexample, or shell/text; and docs/api.md is what tools/gen_api.py makes of the code.

The rule for code blocks (one implementation, for every page):

* A ```` ```python ```` block is preceded, on the line just above its fence, by one of
  ``<!-- from path/to/file.py -->`` or ``<!-- counterexample -->`` (a deliberate bug, written for
  the page, in no file).
* A "from" block must be in that file. Its non-blank lines must appear in the file in the same
  order, each line exactly, up to one indentation shift (a block quoted from inside a function may
  be dedented as a whole). Lines may be left out anywhere, so a block may skip the lines that do
  not matter to the page; a line that is just ``...`` marks a visible elision and starts a new run
  (which may be dedented differently). Leave lines out only where the reader loses nothing: an
  ``if`` dropped above its body changes what the block says, and this check cannot see that.
* The file must be one a test runs: a file under ``tests/``, or one that a test imports or names
  by path.
* Other blocks must be shell (``bash``, ``sh``, ``console``), ``text``, or have no language (a
  diagram, a layout). Any other language (``py``, ``toml``, ``rust``...) fails: tag it or
  change it.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

import fasm
import fasm.errors
import fasm.persistence
import fasm.runtime
import fasm.testing
import fasm.web

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted([*ROOT.glob("docs/*.md"), ROOT / "README.md"])
PLAIN = {"", "bash", "sh", "shell", "console", "text"}

_FENCE = re.compile(r"^```(\S*)\s*$")
_TAG = re.compile(r"^<!-- (?:from (?P<file>\S+)|(?P<counter>counterexample)) -->\s*$")


class Block:
    def __init__(self, page: Path, line: int, language: str, tag: str, code: list[str]) -> None:
        self.page, self.line, self.language, self.tag, self.code = page, line, language, tag, code

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """Every fenced block of ``page`` with its language and the line above its fence."""
    lines = page.read_text().splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if fence is None:
            i += 1
            continue
        start = i
        end = next((j for j in range(i + 1, len(lines)) if lines[j].rstrip() == "```"), None)
        assert end is not None, f"{page.relative_to(ROOT)}:{i + 1}: a code block is never closed"
        above = lines[start - 1] if start else ""
        out.append(Block(page, start + 1, fence.group(1), above, lines[start + 1:end]))
        i = end + 1
    return out


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _run_in(source: list[str], run: list[str], after: int) -> int | None:
    """Where ``run`` (non-blank lines) ends as an ordered subsequence of ``source[after:]`` with
    one indentation shift, or None."""
    first = run[0]
    for i in range(after, len(source)):
        line = source[i]
        if line.strip() != first.strip() or _indent(line) < _indent(first):
            continue
        pad = " " * (_indent(line) - _indent(first))
        j = i + 1
        for wanted in run[1:]:
            while j < len(source) and source[j].rstrip() != pad + wanted:
                j += 1
            if j == len(source):
                break
            j += 1
        else:
            return j
    return None


def quoted_from(source_text: str, code: list[str]) -> str | None:
    """None when ``code`` is quoted from ``source_text`` by the rule above; else what is not."""
    source = [line.rstrip() for line in source_text.splitlines()]
    runs: list[list[str]] = [[]]
    for line in code:
        if line.strip() == "...":
            runs.append([])
        elif line.strip():
            runs[-1].append(line.rstrip())
    after = 0
    for run in (r for r in runs if r):
        end = _run_in(source, run, after)
        if end is None:
            return "\n".join(run)
        after = end
    return None if any(runs) else "(an empty block)"


@functools.cache
def _tests_mention() -> tuple[frozenset[str], frozenset[str]]:
    """What the tests import (``a.b``, and ``a.b`` for ``from a import b``) and the strings they
    contain (paths, or their parts joined with ``/``)."""
    imported: set[str] = set()
    strings: set[str] = set()
    for test in ROOT.glob("tests/**/*.py"):
        for node in ast.walk(ast.parse(test.read_text())):
            if isinstance(node, ast.Import):
                imported.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module)
                imported.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                strings.add(node.value)
    return frozenset(imported), frozenset(strings)


def _named_by_a_test(path: str) -> bool:
    if path.startswith("tests/"):
        return True
    imported, strings = _tests_mention()
    module = path.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
    parent, _, name = path.rpartition("/")
    return (module in imported or any(path in s for s in strings)
            or (name in strings and parent.rpartition("/")[2] in strings))


def _imports_of(path: str) -> set[str]:
    """The repository files ``path`` imports (absolute and relative imports)."""
    package = path.rpartition("/")[0].replace("/", ".")
    out = set()
    for node in ast.walk(ast.parse((ROOT / path).read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            base = f"{base}.{node.module}" if node.level and node.module else (
                base if node.level else node.module or "")
            names = [base, *(f"{base}.{a.name}" for a in node.names)]
        for name in names:
            for candidate in (name.replace(".", "/") + ".py",
                              name.replace(".", "/") + "/__init__.py"):
                if (ROOT / candidate).is_file():
                    out.add(candidate)
    return out


def _run_by_a_test(path: str) -> bool:
    """A file under tests/; one a test imports, or names by its path (``"a/b.py"``, or
    ``ROOT / "a" / "b.py"``: its directory and its name); or one such a file imports (the demo
    a test runs as a subprocess imports its provider)."""
    if _named_by_a_test(path):
        return True
    siblings = (str(p.relative_to(ROOT)) for p in (ROOT / path).parent.glob("*.py"))
    return any(path in _imports_of(s) for s in siblings if s != path and _named_by_a_test(s))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_code_block_is_tested_code_a_counterexample_or_shell(page: Path) -> None:
    problems = []
    for block in blocks(page):
        tag = _TAG.match(block.tag)
        if block.language in PLAIN:
            if tag is not None:
                problems.append(f"{block.where}: a {block.language or 'plain'} block tagged as "
                                "python code")
            continue
        if block.language != "python":
            problems.append(f"{block.where}: a ```{block.language} block: use python (tagged), "
                            "bash or text")
            continue
        if tag is None:
            problems.append(f"{block.where}: a python block without <!-- from file --> or "
                            "<!-- counterexample --> on the line above it")
            continue
        if tag["counter"]:
            continue
        file = tag["file"]
        if not (ROOT / file).is_file():
            problems.append(f"{block.where}: quotes {file}, which does not exist")
            continue
        missing = quoted_from((ROOT / file).read_text(), block.code)
        if missing is not None:
            problems.append(f"{block.where}: not in {file} (in order, up to one indentation "
                            f"shift):\n{missing}")
        if not _run_by_a_test(file):
            problems.append(f"{block.where}: {file} is not run by any test")
    assert not problems, "\n\n".join(problems)


def test_the_rule_itself() -> None:
    source = "def f():\n    a = 1\n    b = 2\n\n    if a:\n        c = 3\n    return a\n"
    assert quoted_from(source, ["a = 1", "if a:", "    c = 3"]) is None  # dedented, b dropped
    assert quoted_from(source, ["    a = 1", "...", "return a"]) is None  # runs, each own shift
    assert quoted_from(source, ["b = 2", "a = 1"]) == "b = 2\na = 1"  # order matters
    assert quoted_from(source, ["a = 1", "c = 3"]) is not None  # one shift within a run
    assert quoted_from(source, ["a = 2"]) is not None
    assert quoted_from(source, [""]) == "(an empty block)"


# -- the API reference ----------------------------------------------------------------------------


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_api", ROOT / "tools" / "gen_api.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_api_reference_is_up_to_date() -> None:
    generated = _generator().render()
    current = (ROOT / "docs" / "api.md").read_text()
    assert current == generated, (
        "docs/api.md is out of date with the code: run python tools/gen_api.py")


@pytest.mark.parametrize("module", [fasm, fasm.errors, fasm.runtime, fasm.persistence,
                                    fasm.testing, fasm.web], ids=lambda m: m.__name__)
def test_api_reference_names_every_public_name(module: ModuleType) -> None:
    page = (ROOT / "docs" / "api.md").read_text()
    section = page.split(f"## `{module.__name__}`\n", 1)[1].split("\n## `", 1)[0]
    for name in module.__all__:
        assert f"### `{name}`" in section or f"- `{name}`: see " in section, (
            f"docs/api.md does not describe {module.__name__}.{name}")
