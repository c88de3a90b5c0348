"""Site profiles: one hospital's calibration of the shipped model, as data bound to one model version.

Fitted outside the server (`train.site_check`), a profile changes only how logits become an answer and
how a joint crop is read (whole, or cut at its joint); `load_profile` refuses one whose checksum does
not match or that names other weights.
docs/MODEL.md, "Site profiles"; docs/SITES.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.contract import InputContract, PostprocessConfig
from model.localize import READINGS, WHOLE

__all__ = [
    "FITTED_FIELDS",
    "PROFILE_FORMAT",
    "ProfileError",
    "SiteProfile",
    "checksum",
    "load_profile",
]

PROFILE_FORMAT = 1
# What a profile may change of the contract's postprocess section; everything else stays the model's.
FITTED_FIELDS = ("temperature", "class_bias", "decision", "cutpoints", "uncertain_below")
NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")


class ProfileError(ValueError):
    """A site profile the server must not load: unreadable, tampered with, or for another model."""


def checksum(data: dict[str, Any]) -> str:
    """``sha256:<hex>`` of the profile's canonical JSON, its ``checksum`` field left out."""
    body = {k: v for k, v in data.items() if k != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class SiteProfile:
    """One site's calibration of one model version.

    Attributes:
        name: the site (lower case letters, digits, ``_.-``), as a request names it.
        version: the profile's own version; a new fit of the same site is a new version.
        model_name, model_version: the weights (the contract's) it was fitted for.
        postprocess: the refitted fields of the contract's postprocess section (`FITTED_FIELDS`).
        fitted: what was fitted, how it was chosen, on what (free-form record).
        sample: the labelled sample's summary (knees, grade mix, refusals).
        figures: the cross-fitted figures, shipped against this profile.
        created: when it was fitted (ISO 8601, UTC).
        reading: how the site's single-knee crops are read (`model.localize.READINGS`): ``whole``, as the
            shipped model reads them, or ``joint``, cut around the joint as a film's knee is. A profile
            written before this field reads them whole.
    """

    name: str
    version: str
    model_name: str
    model_version: str
    postprocess: dict[str, Any]
    fitted: dict[str, Any] = field(default_factory=dict)
    sample: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    created: str = ""
    format: int = PROFILE_FORMAT
    reading: str = WHOLE

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME.match(self.name):
            raise ProfileError(f"profile name must match {NAME.pattern}, got {self.name!r}")
        if self.name == "default":
            raise ProfileError("'default' names the shipped calibration: give the site another name")
        if self.reading not in READINGS:
            raise ProfileError(f"reading must be one of {list(READINGS)}, got {self.reading!r}")
        unknown = set(self.postprocess) - set(FITTED_FIELDS)
        if unknown:
            raise ProfileError(f"a profile may refit only {list(FITTED_FIELDS)}, not {sorted(unknown)}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["checksum"] = checksum(data)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def applied(self, contract: InputContract) -> PostprocessConfig:
        """The contract's postprocess section with this profile's fields (validated like the contract's)."""
        try:
            return contract.replace(postprocess=dict(self.postprocess)).postprocess
        except (TypeError, ValueError) as exc:
            raise ProfileError(f"profile {self.name!r} v{self.version}: invalid postprocess: {exc}") from exc

    def check_model(self, contract: InputContract) -> None:
        """Raise `ProfileError` unless the profile was fitted for ``contract``'s model name and version."""
        if (self.model_name, self.model_version) != (contract.model_name, contract.model_version):
            raise ProfileError(
                f"site profile {self.name!r} v{self.version} was fitted for {self.model_name} v{self.model_version}, "
                f"but the served model is {contract.model_name} v{contract.model_version}: re-run the site check "
                f"(make site-check SITE={self.name} DATA=...) against these weights"
            )

    @classmethod
    def from_dict(cls, data: Any, source: str = "profile") -> SiteProfile:
        """Parse and verify (format, checksum, fields); raises `ProfileError` naming ``source``."""
        if not isinstance(data, dict):
            raise ProfileError(f"{source}: a site profile is a JSON object, got {type(data).__name__}")
        if data.get("format") != PROFILE_FORMAT:
            raise ProfileError(f"{source}: profile format {data.get('format')!r} is not supported ({PROFILE_FORMAT})")
        if data.get("checksum") != checksum(data):
            raise ProfileError(
                f"{source}: checksum does not match its content (edited by hand, or damaged): "
                "re-run the site check to write a new profile"
            )
        kw = {k: v for k, v in data.items() if k != "checksum"}
        known = {f.name for f in dataclasses.fields(cls)}
        if set(kw) - known:
            raise ProfileError(f"{source}: unknown fields {sorted(set(kw) - known)}")
        try:
            return cls(**kw)
        except TypeError as exc:
            raise ProfileError(f"{source}: {exc}") from exc


def load_profile(path: str | Path, contract: InputContract | None = None) -> SiteProfile:
    """Read, verify and (given the served ``contract``) check the profile at ``path`` fits the model."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise ProfileError(f"cannot read site profile {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ProfileError(f"site profile {path} is not valid JSON: {exc}") from exc
    profile = SiteProfile.from_dict(data, str(path))
    if contract is not None:
        profile.check_model(contract)
        profile.applied(contract)
    return profile
