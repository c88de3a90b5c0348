"""The docs quote only what is committed: every page of `ops.render_docs.PAGES` is rendered again from its
committed files and compared, so a figure typed by hand, or a result changed without its page, fails here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ops import render_docs
from ops.bench import SUBCOMMANDS

ROOT = Path(__file__).resolve().parents[1]


def test_every_page_is_what_its_committed_files_give() -> None:
    assert not render_docs.unregistered(), "pages with generated blocks and no entry in ops.render_docs.PAGES"
    stale = render_docs.stale()
    assert not stale, f"run `python -m ops.render_docs`: {stale} differ from what their committed files give"


def _copy(root: Path) -> Path:
    """The docs and the weights they quote, under ``root``."""
    shutil.copytree(ROOT / "docs", root / "docs", ignore=shutil.ignore_patterns("*.png", "*.jpg"))
    shutil.copy(ROOT / "README.md", root / "README.md")
    (root / "weights").mkdir()
    (root / "weights" / "oamen.ckpt").symlink_to(ROOT / "weights" / "oamen.ckpt")
    return root


def test_a_changed_result_fails_the_check_until_its_pages_are_rendered(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    assert render_docs.stale(root) == []
    path = root / "docs" / "results" / "bench_gate.json"
    gate = json.loads(path.read_text())
    gate["ms_per_image_one_pass_median"] += 1.0  # quoted by the benchmarks page and by the model card
    path.write_text(json.dumps(gate))
    assert render_docs.stale(root) == ["docs/BENCHMARKS.md", "docs/MODEL_CARD.md"]
    assert render_docs.write(root) == ["docs/BENCHMARKS.md", "docs/MODEL_CARD.md"]
    assert f"Read once, an image takes {gate['ms_per_image_one_pass_median']:.1f} ms" in (
        root / "docs" / "BENCHMARKS.md"
    ).read_text()
    assert render_docs.stale(root) == []


def test_a_block_without_its_renderer_is_refused(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    page = root / "docs" / "SITES.md"
    page.write_text(page.read_text() + "\n<!-- generated: nothing -->\n<!-- end generated -->\n")
    with pytest.raises(render_docs.RenderError, match="docs/SITES.md: KeyError: .no renderer 'nothing'"):
        render_docs.stale(root, only=["docs/SITES.md"])
    (root / "docs" / "NEW.md").write_text("<!-- generated: bench_gate -->\n<!-- end generated -->\n")
    assert render_docs.unregistered(root) == ["docs/NEW.md"]


def test_a_result_that_is_not_committed_is_not_quoted(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    (root / "docs" / "results" / "drill_restart.json").unlink(missing_ok=True)
    render_docs.write(root, only=["docs/RELIABILITY.md"])
    assert "Not measured any more" in (root / "docs" / "RELIABILITY.md").read_text()
    (root / "docs" / "results" / "drill_restart.json").write_text('{"requests": 12, "lost": 0, "passed": true}')
    render_docs.write(root, only=["docs/RELIABILITY.md"])
    rendered = (root / "docs" / "RELIABILITY.md").read_text()
    assert "| requests | 12 |" in rendered and "| lost | 0 |" in rendered


def test_the_benchmark_list_is_the_dispatchers() -> None:
    text = (ROOT / "docs" / "BENCHMARKS.md").read_text()
    for name, module in SUBCOMMANDS.items():
        assert f"| `{name}` |" in text and f"`{module}`" in text, name


def test_every_committed_result_is_quoted_by_a_page() -> None:
    quoted = "".join(render_docs.rendered(page)[1] for page in render_docs.PAGES)
    unquoted = [p.name for p in sorted((ROOT / render_docs.RESULTS).glob("*.json")) if p.name not in quoted]
    assert not unquoted, f"results no page renders (add a generated block, or remove them): {unquoted}"


def test_check_names_the_pages_that_differ(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(render_docs, "stale", lambda only=None: ["docs/SITES.md"])
    assert render_docs.main(["--check", "--only", "docs/SITES.md"]) == 1
    assert "docs/SITES.md differs" in caplog.text
