"""Where measured results go: every benchmark and drill writes its figures as JSON, and the docs quote
only committed results (docs/results/, rendered into the docs by `ops.render_docs`).
``python -m ops.results FILE KEY`` prints one field of a result, for the Makefile.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from model.paths import KOA, ROOT

DOC_RESULTS = ROOT / "docs" / "results"  # committed: the figures of README.md and docs/ come from here
DATA_IMAGES = KOA / "val"  # request images of the benchmarks and drills


def write_result(path: Path | None, result: Any) -> None:
    """Write ``result`` as indented JSON to ``path`` (its folder made); nothing when ``path`` is None."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    """``python -m ops.results FILE KEY``: print one field of a JSON result (the Makefile reads
    the resolution floor of docs/model/resolution.json this way)."""
    p = argparse.ArgumentParser(description="print one top-level field of a JSON result")
    p.add_argument("file", type=Path)
    p.add_argument("key")
    args = p.parse_args(argv)
    try:
        print(json.loads(args.file.read_text())[args.key])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(f"{args.file}: no field {args.key!r} ({type(exc).__name__}: {exc})") from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
