"""Load tests of KOA-Serve: Locust users (``locustfile.py``) and a headless runner (``run.py``).

This module holds the pure parts both share, importable without Locust (and so without gevent's
monkey-patching): the answer validator (from `client.schema`), the loopback guard and the image loader.

    validate_answer(answer, explain=False)   # raises InvalidAnswer with the reason
    check_loopback("http://127.0.0.1:8080")  # raises ValueError for any other host
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

# The answer schema lives beside the client (client/schema.py); re-exported for the load tests.
from client.schema import InvalidAnswer, validate_answer

__all__ = ["InvalidAnswer", "validate_answer", "check_loopback", "Image", "load_images", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")
LOOPBACK_NAMES = ("localhost",)


def check_loopback(address: str) -> str:
    """Refuse any target that is not this machine: a load test must never hit someone else's server.

    Args:
        address: a URL (``http://127.0.0.1:8080``) or a gRPC ``host:port`` (``[::1]:7070``).

    Returns:
        The host name, when it is ``localhost``, an address in 127.0.0.0/8 or ``::1``.

    Raises:
        ValueError: any other host, or no host at all.
    """
    text = address.strip()
    host = urlsplit(text if "://" in text else f"//{text}").hostname
    if not host:
        raise ValueError(f"no host in {address!r}: give e.g. http://127.0.0.1:8080 or 127.0.0.1:7070")
    if host.lower() in LOOPBACK_NAMES:
        return host
    try:
        if ipaddress.ip_address(host).is_loopback:  # 127.0.0.0/8 and ::1
            return host
    except ValueError:
        pass
    raise ValueError(
        f"refusing to load-test {address!r}: only loopback targets are allowed "
        "(127.0.0.0/8, localhost or ::1); run the load test on the server's own machine"
    )


@dataclass(frozen=True)
class Image:
    """One request body: the file's bytes and its name (for messages)."""

    name: str
    data: bytes


def load_images(folder: str | Path) -> list[Image]:
    """Every PNG, JPEG and DICOM file directly in ``folder``, read once, sorted by name.

    Raises:
        RuntimeError: the folder does not exist or holds no such image.
    """
    root = Path(folder)
    if not root.is_dir():
        raise RuntimeError(f"image folder {root} does not exist: set KOA_IMAGES (or --images) to a folder of images")
    paths = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise RuntimeError(f"no {'/'.join(IMAGE_SUFFIXES)} files in {root}: set KOA_IMAGES (or --images)")
    return [Image(p.name, p.read_bytes()) for p in paths]
