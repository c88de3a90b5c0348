"""Where measured results go: every benchmark and drill writes its figures as JSON, and the docs quote
only committed results (docs/results/, rendered into the docs by `ops.render_docs`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOC_RESULTS = ROOT / "docs" / "results"  # committed: the figures of README.md and docs/ come from here
DATA_IMAGES = ROOT.parent / "shared" / "data" / "koa" / "val"  # request images of the benchmarks and drills


def write_result(path: Path | None, result: Any) -> None:
    """Write ``result`` as indented JSON to ``path`` (its folder made); nothing when ``path`` is None."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
