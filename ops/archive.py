"""What the TorchServe archive leaves out of the model/ package it packs (``make archive``).

The worker serves OA-MEN only: the baselines registered lazily (`model.registry.LAZY_MODULES`) and the
layers only they use (model/_layers.py) stay out of the .mar.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from model.registry import LAZY_MODULES


def left_out(staging: Path) -> list[Path]:
    """The files under ``staging`` (a copy of model/ and handler/) that the archive does without."""
    return [staging / f"{module.replace('.', '/')}.py" for module in LAZY_MODULES] + [staging / "model" / "_layers.py"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("staging", type=Path, help="the archive's staging folder (build/mar)")
    args = p.parse_args(argv)
    for path in left_out(args.staging):
        path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
