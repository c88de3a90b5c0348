"""pyproject.toml: the bare install is the client alone, so client/ may import only what it declares."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Import name -> distribution name in pyproject.toml, for the client's third-party imports.
DISTRIBUTION = {"requests": "requests", "urllib3": "urllib3", "grpc": "grpcio", "google": "protobuf"}
BUILD_TIME = {"grpc_tools"}  # client/gen_proto.py only, deferred; in the dev extra


def _top_level_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_client_imports_only_its_declared_dependencies() -> None:
    imported = set().union(*(_top_level_imports(p) for p in (ROOT / "client").rglob("*.py")))
    third_party = imported - set(sys.stdlib_module_names) - {"client", "__future__"} - BUILD_TIME
    assert third_party <= set(DISTRIBUTION), f"client/ imports {sorted(third_party - set(DISTRIBUTION))}"
    declared = {re.split(r"[<>=!~; \[]", d, maxsplit=1)[0].lower() for d in _pyproject()["project"]["dependencies"]}
    assert {DISTRIBUTION[name] for name in third_party} <= declared


def test_every_package_is_in_the_wheel() -> None:
    include = _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    for name in ("client", "model", "train", "handler", "loadtest"):
        assert (ROOT / name / "__init__.py").is_file()
        assert name in include and f"{name}.*" in include
