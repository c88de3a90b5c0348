"""pyproject.toml: the bare install is the client alone, so client/ may import only what it declares."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import pytest

from model.paths import ROOT

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


def test_a_wheel_built_from_a_clean_clone_carries_the_grpc_stubs(tmp_path: Path) -> None:
    """`pip install .` from a fresh checkout gives a client that speaks gRPC too: no `make proto` needed."""
    import subprocess
    import zipfile

    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--no-local", str(ROOT), str(clone)], check=True)
    # What is committed (HEAD), not the working tree: ignored stubs here would hide their absence there.
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."],
        cwd=clone, capture_output=True, text=True,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("koa_serve-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"client/_proto/inference_pb2.py", "client/_proto/inference_pb2_grpc.py",
            "client/_proto/google/rpc/status_pb2.py"} <= names  # fmt: skip
    assert not any(n.startswith(("weights/", "tests/")) for n in names)
