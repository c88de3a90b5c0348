"""Shared pytest setup: small shared fixtures (the archive, a private TorchServe), and the rule for
missing resources (Java, the TorchServe jar): a test that needs one skips on a developer's machine
and fails under ``CI=true``, where a skip would let the server tests pass without running.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import cv2
import numpy as np
import pytest

from model.paths import ROOT

FIXTURES = ROOT / "tests" / "fixtures"

JAVA_MISSING = "TorchServe needs Java 17+ (see README)"


@pytest.fixture(autouse=True)
def onednn_fusion_restored() -> Iterator[None]:
    """torch's oneDNN Graph switch is process-wide and `model.precision.served_models` sets it: each test
    leaves it as it found it, so no test runs fused because an earlier one loaded a served model."""
    import sys

    torch = sys.modules.get("torch")  # not imported yet: nothing has set it
    before = torch.jit.onednn_fusion_enabled() if torch is not None else None
    yield
    if before is not None:
        torch.jit.enable_onednn_fusion(before)


def in_ci() -> bool:
    """True on a CI runner (``CI=true``, as GitHub Actions and GitLab CI set it)."""
    return os.environ.get("CI") == "true"


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the running test because something it needs is missing; under ``CI=true`` fail it instead."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true: a missing resource fails the run instead of skipping)", pytrace=False)
    pytest.skip(reason)


def require_java() -> str:
    """The path of ``java``; skips the test without it (fails it in CI)."""
    java = shutil.which("java")
    if java is None:
        skip_or_fail(JAVA_MISSING)
    return java


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked ``server`` starts TorchServe: check Java before its fixtures build the archive."""
    if item.get_closest_marker("server") is not None:
        require_java()


@pytest.fixture(scope="session")
def archive() -> Path:
    """``make archive`` once per run: the .mar of the committed weights, built as a user builds it."""
    subprocess.run(["make", "-s", "archive"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return ROOT / "model_store"


@contextlib.contextmanager
def private_server(archive: Path, workdir: Path, drain_s: float | None = None, **options: Any) -> Iterator[Any]:
    """A TorchServe on free ports from ``workdir`` (`ops.server.start_on_free_ports` with ``options``),
    stopped at the end (after a drain of at most ``drain_s``; default `ops.server.DRAIN_S`)."""
    from ops import server as ts

    try:
        yield ts.start_on_free_ports(archive, workdir, **options)
    finally:
        ts.stop(workdir, drain_s=ts.DRAIN_S if drain_s is None else drain_s)


@pytest.fixture(scope="session")
def knee_png() -> bytes:
    """A real 224 x 224 KL2 knee radiograph shipped with the tests (credit in fixtures/README.md)."""
    return (FIXTURES / "knee_kl2.png").read_bytes()


TINY_PER_GRADE = 10  # per split: a balanced epoch is 50 images, 25 per rank under DDP


@pytest.fixture(scope="session")
def tiny_koa(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ROOT/<train|val>/<grade>/*.png, 32 x 32, stripes whose spacing shrinks with the grade."""
    root = tmp_path_factory.mktemp("koa")
    rng = np.random.default_rng(0)
    for si, split in enumerate(("train", "val")):
        for g in range(5):
            for i in range(TINY_PER_GRADE):
                img = rng.integers(0, 60, (32, 32), dtype=np.uint8)
                img[:, :: 6 - g] += 150
                path = root / split / str(g) / f"{9000000 + 1000 * si + 100 * g + i}L.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                assert cv2.imwrite(str(path), img)
    return root


# The handler's tiny model (oamen_lite at 64 px, random weights): enough to test what the handler
# does around a model without a real one.
TINY_CONTRACT_ARGS = {"model_name": "oamen_lite", "input_size": 64, "model_version": "9.9.9"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A TorchScript export of an untrained oamen_lite with the tiny contract (`TINY_CONTRACT_ARGS`)."""
    import torch

    from model import create_model
    from model.checkpoint import save_checkpoint
    from model.contract import InputContract
    from train.export import export

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("model")
    contract = InputContract(**TINY_CONTRACT_ARGS)
    ckpt = save_checkpoint(d / "m.ckpt", create_model("oamen_lite").eval(), contract)
    return str(export(ckpt, d / "oamen.pt"))
