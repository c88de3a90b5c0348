"""The repository's paths: its root and the default data folders (``../shared/data`` beside the checkout).

Stdlib only. The processes that must not import model/ (Locust, the PACS harness) take the root from
`ops.checkout`, which tests/test_settings.py holds equal to this one.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = ROOT.parent / "shared" / "data"
KOA = DATA_ROOT / "koa"  # the KL-graded training set: <split>/<grade>/*.png
SITE2 = DATA_ROOT / "site2"  # another hospital's knees: site checks and calibration only, never training
NONKNEE = DATA_ROOT / "nonknee"  # radiographs of other body parts, for the knee gate
LEGFILMS = DATA_ROOT / "legfilms"  # whole leg films, for the knee-joint finder
