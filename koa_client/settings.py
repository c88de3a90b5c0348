"""The client's environment variables, declared once each (`model.settings` has the server's).

The client installs alone, without torch, and model/ imports nothing of ours, so the two sides
cannot share one module: `Setting` is the same small record in both. tests/test_settings.py fails
on a ``KOA_*`` name read but declared nowhere, or declared twice. Stdlib only.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Setting:
    """One environment variable. ``default`` is the value as the environment would spell it ("": none)."""

    name: str
    default: str
    type: type
    help: str
    internal: bool = False  # passed from one of our processes to another, not set by hand

    def get(self, environ: Mapping[str, str] | None = None) -> str:
        """The raw value: the environment's when set and not empty, else the default."""
        return (os.environ if environ is None else environ).get(self.name) or self.default

    def value(self, environ: Mapping[str, str] | None = None) -> Any:
        """The value converted to ``type``; a clear error naming the variable when it does not convert."""
        raw = self.get(environ)
        try:
            return self.type(raw)
        except ValueError:
            raise ValueError(f"{self.name}={raw!r}: expected {self.type.__name__}") from None


TOKEN = Setting("KOA_TOKEN", "", str, "the inference key, when --token is not given (before --key-file)")

SETTINGS = (TOKEN,)
