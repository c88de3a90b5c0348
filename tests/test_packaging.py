"""pyproject.toml: `pip install .` installs the client alone (koa-client), which imports only what it declares."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "koa_client"  # the one import package of the koa-client distribution
# Import name -> distribution name in pyproject.toml, for the client's third-party imports.
DISTRIBUTION = {"requests": "requests", "urllib3": "urllib3", "grpc": "grpcio", "google": "protobuf"}
BUILD_TIME = {"grpc_tools"}  # koa_client/gen_proto.py only, deferred; in the dev group
# What the server side needs and the client must run without: importing any of these fails in the test below.
SERVER_SIDE = ("torch", "torchvision", "timm", "ts", "model", "handler", "train", "ops", "gateway", "pacs")


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
    imported = set().union(*(_top_level_imports(p) for p in (ROOT / PACKAGE).rglob("*.py")))
    third_party = imported - set(sys.stdlib_module_names) - {PACKAGE, "__future__"} - BUILD_TIME
    assert third_party <= set(DISTRIBUTION), f"{PACKAGE}/ imports {sorted(third_party - set(DISTRIBUTION))}"
    declared = {re.split(r"[<>=!~; \[]", d, maxsplit=1)[0].lower() for d in _pyproject()["project"]["dependencies"]}
    assert {DISTRIBUTION[name] for name in third_party} <= declared


def test_the_distribution_is_the_client_alone() -> None:
    project = _pyproject()
    assert project["project"]["name"] == "koa-client"
    assert project["tool"]["setuptools"]["packages"]["find"]["include"] == [PACKAGE, f"{PACKAGE}.*"]
    assert project["project"]["scripts"] == {"koa-client": f"{PACKAGE}.__main__:main"}
    assert "optional-dependencies" not in project["project"], "the server side is not installed: dependency-groups"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `pip install .` builds from a fresh clone (what is committed, HEAD, not the working tree:
    ignored stubs here would hide their absence there); offline, with this environment's setuptools."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tmp = tmp_path_factory.mktemp("wheel")
    clone = tmp / "clone"
    subprocess.run(["git", "clone", "-q", "--no-local", str(ROOT), str(clone)], check=True)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-index", "--no-build-isolation",
         "-w", str(tmp), "."],
        cwd=clone, capture_output=True, text=True,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-2000:]
    (found,) = tmp.glob("koa_client-*.whl")
    return found


def test_the_wheel_holds_the_client_and_its_grpc_stubs_only(wheel: Path) -> None:
    """`pip install .` from a fresh checkout gives a client that speaks gRPC too (no `make proto`), and nothing else."""
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"{PACKAGE}/_proto/inference_pb2.py", f"{PACKAGE}/_proto/inference_pb2_grpc.py",
            f"{PACKAGE}/_proto/google/rpc/status_pb2.py", f"{PACKAGE}/__main__.py"} <= names  # fmt: skip
    tops = {n.split("/")[0] for n in names}
    assert tops == {PACKAGE, f"{PACKAGE}-0.1.0.dist-info"}, sorted(tops)


def test_installing_it_installs_the_client_and_its_command_which_runs_without_torch(
    wheel: Path, tmp_path: Path
) -> None:
    target = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    installed = sorted(p.name for p in target.iterdir())
    assert installed == ["bin", PACKAGE, f"{PACKAGE}-0.1.0.dist-info"], installed
    assert sorted(p.name for p in (target / "bin").iterdir()) == ["koa-client"]
    # The server side cannot be imported: a folder first on the path whose packages of those names fail.
    blocked = tmp_path / "blocked"
    for name in SERVER_SIDE:
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is not for the client')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocked), str(target)])}
    # The console script, run as a user would, from a folder outside the checkout.
    cli = subprocess.run(
        [sys.executable, str(target / "bin" / "koa-client"), "predict", "--help"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert "--grpc" in cli.stdout and "--cert-file" in cli.stdout
    # The installed copy answers, not the checkout's; REST and gRPC both import.
    code = (
        "import koa_client, koa_client.rest, koa_client.grpc_client; "
        "from koa_client.grpc_client import load_stubs; load_stubs(); print(koa_client.__file__)"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert found.returncode == 0, found.stderr[-2000:]
    assert Path(found.stdout.strip()).is_relative_to(target)
