"""Who may call the door: one policy entry per calling system (its certificate's CN): the endpoints it may
call and its requests per minute; kept in a JSON file and rendered into the maps HAProxy reads."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ops.cluster.tokens import write_private
from ops.door.config import DoorError

ENDPOINTS = ("predictions", "explanations")
DEFAULT_PER_MINUTE = 600


@dataclass
class ClientPolicy:
    """What one calling system may do: its endpoints and its requests per minute."""

    endpoints: list[str] = field(default_factory=lambda: list(ENDPOINTS))
    per_minute: int = DEFAULT_PER_MINUTE

    def __post_init__(self) -> None:
        bad = [e for e in self.endpoints if e not in ENDPOINTS]
        if bad:
            raise ValueError(f"endpoints {bad}: a client may be given only {list(ENDPOINTS)}")
        if not (isinstance(self.per_minute, int) and self.per_minute > 0):
            raise ValueError(f"per_minute must be a positive integer, got {self.per_minute!r}")


def read_policy(path: str | os.PathLike[str]) -> dict[str, ClientPolicy]:
    p = Path(path)
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text())
        return {name: ClientPolicy(**spec) for name, spec in data.get("clients", {}).items()}
    except (ValueError, TypeError) as exc:
        raise DoorError(f"policy {p} is not valid: {exc}") from None


def write_policy(path: str | os.PathLike[str], policy: dict[str, ClientPolicy]) -> None:
    data = {
        "_comment": "Who may call the door (ops/door/): identity (client certificate CN) -> endpoints, requests/min.",
        "clients": {name: asdict(p) for name, p in sorted(policy.items())},
    }
    write_private(Path(path), json.dumps(data, indent=2) + "\n")


def write_maps(workdir: Path, policy: dict[str, ClientPolicy], keys: dict[str, str]) -> None:
    """Write the door's maps: ``access.map`` (identity/endpoint -> 1), ``rates.map`` (identity -> per minute),
    ``keys.map`` (replica -> its inference key)."""
    lines = lambda rows: "".join(f"{k} {v}\n" for k, v in rows)  # noqa: E731
    write_private(
        workdir / "access.map", lines((f"{n}/{e}", 1) for n, p in policy.items() for e in p.endpoints)
    )
    write_private(workdir / "rates.map", lines((n, p.per_minute) for n, p in policy.items()))
    write_private(workdir / "keys.map", lines(keys.items()))

