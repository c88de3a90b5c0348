"""Site profiles in the request path: which calibration answers a request, and the answer's ``model`` block.

Profiles are read once at start from ``$KOA_SITE_PROFILES``; a request picks its site by the
``X-KOA-Site`` header or a ``site`` field, else it gets the shipped calibration.
docs/MODEL.md, "Site profiles in the request path"; docs/SITES.md.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from model.contract import InputContract, PostprocessConfig
from model.localize import WHOLE
from model.postprocess import finish
from model.profile import ProfileError, SiteProfile, load_profile
from model.settings import SITE_PROFILES

__all__ = ["ENV", "FIELD", "HEADER", "Profiles"]

log = logging.getLogger(__name__)

ENV = SITE_PROFILES.name
HEADER = "x-koa-site"
FIELD = "site"


def _text(value: Any) -> str | None:
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("utf-8", "replace")
    if isinstance(value, str) and value.strip():
        return value.strip().lower()[:64]
    return None


def profile_paths(spec: str) -> list[Path]:
    """The profile files named by ``spec``: files as they are, folders searched for ``*/profile.json``
    (and ``profile.json`` itself); a path that does not exist is an error, not an empty list."""
    paths: list[Path] = []
    for part in (p for p in spec.split(os.pathsep) if p.strip()):
        path = Path(part.strip())
        if path.is_file():
            paths.append(path)
        elif path.is_dir():
            found = sorted(path.glob("*/profile.json")) + sorted(path.glob("profile.json"))
            found += sorted(p for p in path.glob("*.json") if p.name != "profile.json")  # a ConfigMap's flat files
            paths.extend(found)
        else:
            raise ProfileError(f"{ENV}: {path} does not exist (a profile file, or a folder of <site>/profile.json)")
    return paths


class Profiles:
    """The site profiles one server holds, and the default (the contract's own calibration)."""

    def __init__(self, contract: InputContract, profiles: list[SiteProfile] | None = None) -> None:
        self.contract = contract
        self.by_name: dict[str, SiteProfile] = {}
        for p in profiles or []:
            if p.name in self.by_name:
                raise ProfileError(f"two profiles for site {p.name!r} (v{self.by_name[p.name].version}, v{p.version})")
            p.check_model(contract)
            self.by_name[p.name] = p
        self.configs: dict[str | None, PostprocessConfig] = {None: contract.postprocess}
        self.configs.update({name: p.applied(contract) for name, p in self.by_name.items()})

    @classmethod
    def from_env(cls, contract: InputContract, environ: Mapping[str, str] | None = None) -> Profiles:
        """The profiles named by ``$KOA_SITE_PROFILES`` (none when unset); raises `ProfileError` for a bad one."""
        spec = SITE_PROFILES.get(environ)
        profiles = [load_profile(p, contract) for p in profile_paths(spec)] if spec.strip() else []
        out = cls(contract, profiles)
        for p in profiles:
            log.info("site profile %s v%s (%s) loaded for %s v%s", p.name, p.version, p.fitted.get("method"),
                     p.model_name, p.model_version)  # fmt: skip
        return out

    @staticmethod
    def requested(row: Any, header: Mapping[str, Any] | None) -> str | None:
        """The site a request names: its ``X-KOA-Site`` header, else its ``site`` field or JSON key."""
        for key, value in (header or {}).items():
            if isinstance(key, str) and key.lower() == HEADER:
                site = _text(value)
                if site:
                    return site
        if isinstance(row, dict):
            if FIELD in row:
                return _text(row[FIELD])
            for value in row.values():
                if isinstance(value, dict) and FIELD in value:
                    return _text(value[FIELD])
        return None

    def key(self, site: str | None) -> str | None:
        """The profile that answers a request for ``site``: its own, or None (the default) when it has none."""
        return site if site in self.by_name else None

    def reading(self, site: str | None) -> str:
        """How a joint crop sent for ``site`` is read (`model.localize.crop_view`): its profile's choice, else whole."""
        p = self.by_name.get(site) if site else None
        return p.reading if p is not None else WHOLE

    def model_block(self, site: str | None) -> dict[str, Any]:
        """The answer's ``model``: the weights, and the calibration that answered (a site's profile, or default)."""
        c = self.contract
        block: dict[str, Any] = {"name": c.model_name, "version": c.model_version}
        p = self.by_name.get(site) if site else None
        if p is not None:
            block["profile"] = {"name": p.name, "version": p.version}
            if p.reading != WHOLE:
                block["profile"]["reading"] = p.reading
        else:
            block["profile"] = {"name": "default"}
            if site:
                block["profile"]["requested"] = site
                block["profile"]["note"] = "no profile for this site on this server: the shipped calibration answered"
        return block

    def finish(
        self, outputs: np.ndarray, flipped: np.ndarray | None, sites: list[str | None] | None = None
    ) -> dict[str, Any]:
        """`model.postprocess.finish` of a batch whose rows may belong to different sites (``sites[j]`` for row
        j, None for the default); the arrays are assembled in row order."""
        keys = [self.key(s) for s in sites] if sites else [None] * len(outputs)
        n_cls = self.contract.num_classes
        if all(k is None for k in keys):
            return finish(outputs, self.configs[None], n_cls, flipped)
        parts: dict[str | None, tuple[np.ndarray, dict[str, Any]]] = {}
        for k in dict.fromkeys(keys):
            rows = np.array([j for j, key in enumerate(keys) if key == k])
            parts[k] = (rows, finish(outputs[rows], self.configs[k], n_cls, None if flipped is None else flipped[rows]))
        first = next(iter(parts.values()))[1]
        out: dict[str, Any] = {}
        for name, value in first.items():
            if value is None:
                out[name] = None
                continue
            full = np.zeros((len(keys), *value.shape[1:]), dtype=value.dtype)
            for rows, arrays in parts.values():
                full[rows] = arrays[name]
            out[name] = full
        return out
