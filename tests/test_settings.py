"""Every KOA_* environment variable is declared once (model.settings, client.settings, loadtest.settings)
and read through its declaration; one module holds the repository's root."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import ops.checkout
from model import paths
from model.settings import Setting
from ops.settings import ALL, REGISTRIES, render_settings

ROOT = paths.ROOT
NAME = re.compile(r"\bKOA_[A-Z0-9_]+\b(?!<)")  # KOA_LITE<n>_WEIGHTS in prose names a family, not a variable
REGISTRY_FILES = {ROOT / package / "settings.py" for package in ("model", "koa_client", "loadtest")}
PACKAGES = ("model", "handler", "train", "koa_client", "loadtest", "ops", "gateway", "pacs", "tests", "scripts")


def _python_files() -> list[Path]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")]
    return [p for p in files if "_proto" not in p.parts]


def _sources() -> list[Path]:
    """What the code that reads or sets a variable lives in: Python, make, shell, the deployment, the docs."""
    other = [ROOT / "Makefile", ROOT / "config.properties", ROOT / ".ci" / "run", ROOT / "README.md"]
    other += [p for p in (ROOT / "deploy").rglob("*") if p.is_file()]
    other += list((ROOT / "scripts").glob("*.sh")) + list((ROOT / "docs").glob("*.md"))
    return _python_files() + [p for p in other if p.is_file()]


def test_every_name_in_the_code_is_declared_once() -> None:
    names = [s.name for s in ALL]
    assert len(names) == len(set(names)), f"declared twice: {sorted(n for n in names if names.count(n) > 1)}"
    undeclared = {}
    for path in _sources():
        for name in set(NAME.findall(path.read_text(errors="replace"))) - set(names):
            undeclared.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert not undeclared, f"KOA_* names read or set but declared in none of {list(REGISTRIES)}: {undeclared}"


def test_code_names_a_variable_only_through_its_declaration() -> None:
    """Outside the registries (and tests/), no string "KOA_..." and no keyword KOA_...=: use ``SETTING.name``."""
    found = []
    for path in _python_files():
        if path in REGISTRY_FILES or path.parts[len(ROOT.parts)] == "tests":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            text = None
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                text = node.value
            elif isinstance(node, ast.keyword):
                text = node.arg
            if text and re.fullmatch(r"KOA_[A-Z0-9_]+", text):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {text}")
    assert not found, found


def test_a_setting_reads_the_environment_then_its_default() -> None:
    threads = Setting("KOA_" + "TEST", "0", int, "a test")  # a name of no variable, so spelt in two parts
    assert threads.value({}) == 0 and threads.value({threads.name: "3"}) == 3
    assert threads.get({threads.name: ""}) == "0"  # an empty value counts as unset
    with pytest.raises(ValueError, match=f"{threads.name}='three': expected int"):
        threads.value({threads.name: "three"})


def test_the_docs_table_lists_every_variable_once() -> None:
    table = render_settings()
    for s in ALL:
        assert table.count(f"| `{s.name}` |") == 1, s.name
    assert len(table.strip().splitlines()) == len(ALL) + 2
    doc = (ROOT / "docs" / "OPERATIONS.md").read_text()
    assert f"<!-- generated: settings -->\n{table}<!-- end generated -->" in doc


def test_one_root() -> None:
    """ops.checkout repeats model.paths' root for the processes that never import model/; they agree."""
    assert ops.checkout.ROOT == paths.ROOT == Path(__file__).resolve().parents[1]
    tree = ast.parse((ROOT / "ops" / "checkout.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported <= {"__future__", "pathlib"}


def test_the_settings_and_paths_import_no_torch() -> None:
    """model/ registers its architectures lazily, so `make stop` and `make token` (ops.server, which reads
    handler.drain's setting) start in a fraction of a second rather than after torch's import."""
    import subprocess
    import sys

    code = "import sys, model.settings, model.paths, handler.drain, ops.server; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False"]
