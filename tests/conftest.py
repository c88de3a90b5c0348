"""Shared pytest setup: the repository root on sys.path, small shared fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def knee_png() -> bytes:
    """A real 224 x 224 KL2 knee radiograph shipped with the tests (credit in fixtures/README.md)."""
    return (FIXTURES / "knee_kl2.png").read_bytes()
