"""The checkout's root, for the processes that must not import model/ (Locust, the PACS harness).

`model.paths` holds the repository's paths; importing it imports model/ (and torch), which loadtest/
and pacs/ never do, so their root comes from here, computed the same way. tests/test_settings.py
holds the two equal. Stdlib only.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
