"""Shared pytest setup: the repository root on sys.path, small shared fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


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
