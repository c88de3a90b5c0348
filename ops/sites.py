"""Check site profiles before a server starts with them, and name them for ``$KOA_SITE_PROFILES``.

``python -m ops.sites check SITE[,SITE...] [--weights weights/oamen.ckpt]`` verifies each
``sites/SITE/profile.json`` (checksum, model name and version against the weights to be served,
`model.profile`) and prints the value of ``$KOA_SITE_PROFILES`` that serves them
(`handler.sites`); a bad profile exits 1 with the reason, before TorchServe is started, so
``make serve SITE=...`` stops at once instead of leaving a worker that cannot start. The worker checks
again at start (the file could change in between).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from model.checkpoint import load_checkpoint
from model.contract import InputContract
from model.profile import ProfileError, load_profile

log = logging.getLogger("ops.sites")


def profile_files(sites: str, root: Path = Path("sites")) -> list[Path]:
    """``sites/NAME/profile.json`` of each comma-separated NAME (a path to a file is taken as it is)."""
    out = []
    for name in (s.strip() for s in sites.split(",") if s.strip()):
        p = Path(name)
        out.append(p if p.suffix == ".json" else root / name / "profile.json")
    return out


def check(sites: str, weights: str | Path) -> str:
    """Verify the profiles against ``weights``' contract; returns ``$KOA_SITE_PROFILES`` (absolute paths)."""
    contract: InputContract = load_checkpoint(weights)["contract"]
    files = profile_files(sites)
    for f in files:
        if not f.is_file():
            raise ProfileError(f"no site profile at {f}: run make site-check SITE={f.parent.name} DATA=... first "
                               "(a site whose calibration did not beat the default has no profile)")  # fmt: skip
        p = load_profile(f, contract)
        log.info("%s: site %s v%s for %s v%s", f, p.name, p.version, p.model_name, p.model_version)
    return os.pathsep.join(str(f.resolve()) for f in files)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=("check",))
    p.add_argument("sites", help="comma-separated site names (sites/NAME/profile.json) or profile files")
    p.add_argument("--weights", default="weights/oamen.ckpt", help="the weights the server will serve")
    args = p.parse_args(argv)
    try:
        print(check(args.sites, args.weights))
    except (ProfileError, ValueError, OSError) as exc:
        log.error("site profile refused: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
