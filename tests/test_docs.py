"""The docs quote only what the committed results hold: generated blocks and the model card are re-rendered
and compared, so a figure typed by hand, or a result changed without its doc, fails here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from model.paths import ROOT
from ops import render_docs


def test_generated_blocks_match_their_results() -> None:
    stale = [p.name for p in render_docs.docs() if render_docs.render(p.read_text()) != p.read_text()]
    assert not stale, f"run `python -m ops.render_docs`: {stale} differ from docs/results/"


def test_a_changed_result_is_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = "x\n<!-- generated: bench_gate -->\nthe gate costs 1%\n<!-- end generated -->\n"
    assert render_docs.render(text) != text  # what the block says is not what the result holds
    with pytest.raises(KeyError, match="no renderer"):
        render_docs.render("<!-- generated: nothing -->\n<!-- end generated -->")


def test_model_card_is_what_its_generator_writes(tmp_path: Path) -> None:
    out = tmp_path / "MODEL_CARD.md"
    subprocess.run([sys.executable, "-m", "ops.model_card", "--out", str(out)], check=True,
                   cwd=ROOT, capture_output=True)  # fmt: skip
    assert out.read_text() == (ROOT / "docs" / "MODEL_CARD.md").read_text(), "run `python -m ops.model_card`"


def test_a_result_that_is_not_committed_is_not_quoted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(render_docs, "RESULTS", tmp_path)
    text = "<!-- generated: restart -->\n<!-- end generated -->\n"
    assert "Not measured any more" in render_docs.render(text)
    (tmp_path / "drill_restart.json").write_text('{"requests": 12, "lost": 0, "wrong": 0, "passed": true}')
    rendered = render_docs.render(text)
    assert "| requests | 12 |" in rendered and "| lost | 0 |" in rendered


def test_every_committed_result_is_quoted_by_a_doc() -> None:
    quoted = "".join(render_docs.render(p.read_text()) for p in render_docs.docs())
    unquoted = [p.name for p in sorted(render_docs.RESULTS.glob("*.json")) if p.name not in quoted]
    assert not unquoted, f"results no doc renders (add a generated block, or remove them): {unquoted}"
