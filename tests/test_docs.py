"""The docs quote only what the committed results hold: generated blocks and the model card are re-rendered
and compared, so a figure typed by hand, or a result changed without its doc, fails here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import render_docs  # noqa: E402


def test_generated_blocks_match_their_results() -> None:
    stale = [p.name for p in render_docs.docs() if render_docs.render(p.read_text()) != p.read_text()]
    assert not stale, f"run `python scripts/render_docs.py`: {stale} differ from docs/results/"


def test_a_changed_result_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = "x\n<!-- generated: bench_gate -->\nthe gate costs 1%\n<!-- end generated -->\n"
    assert render_docs.render(text) != text  # what the block says is not what the result holds
    with pytest.raises(KeyError, match="no renderer"):
        render_docs.render("<!-- generated: nothing -->\n<!-- end generated -->")


def test_model_card_is_what_its_generator_writes(tmp_path: Path) -> None:
    out = tmp_path / "MODEL_CARD.md"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "model_card.py"), "--out", str(out)], check=True,
                   cwd=ROOT, capture_output=True)  # fmt: skip
    assert out.read_text() == (ROOT / "docs" / "MODEL_CARD.md").read_text(), "run `python scripts/model_card.py`"
