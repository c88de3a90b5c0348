"""Load tests of KOA-Serve: Locust users (``locustfile.py``) and a headless runner (``run.py``).

This module holds the pure parts both share, importable without Locust (and so without gevent's
monkey-patching): the answer validator, the loopback guard and the image loader.

    validate_answer(answer, explain=False)   # raises InvalidAnswer with the reason
    check_loopback("http://127.0.0.1:8080")  # raises ValueError for any other host
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = ["InvalidAnswer", "validate_answer", "check_loopback", "Image", "load_images", "IMAGE_SUFFIXES"]

NUM_GRADES = 5  # KL0..KL4
SUM_TOLERANCE = 1e-3  # the server rounds each probability to 6 decimals
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")
LOOPBACK_NAMES = ("localhost",)


class InvalidAnswer(ValueError):
    """A 200 answer whose body breaks KOA-Serve's answer schema; the message says how."""


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def validate_answer(answer: Any, explain: bool = False) -> None:
    """Check one prediction body against the answer schema (README "Answer").

    Args:
        answer: the decoded JSON body.
        explain: whether an explanation was asked for; then ``explanation.grid`` must be a
            non-empty 2-D grid of numbers in [0, 1], otherwise ``explanation`` must be absent.

    Raises:
        InvalidAnswer: the first problem found, saying what was received.
    """
    if not isinstance(answer, dict):
        raise InvalidAnswer(f"answer is not a JSON object but {type(answer).__name__}")
    for key in ("kl_grade", "probabilities", "oa_probability", "model"):
        if key not in answer:
            raise InvalidAnswer(f"missing field {key!r} (fields: {sorted(answer)})")
    grade = answer["kl_grade"]
    if not isinstance(grade, int) or isinstance(grade, bool) or not 0 <= grade < NUM_GRADES:
        raise InvalidAnswer(f"kl_grade must be an int 0-{NUM_GRADES - 1}, got {grade!r}")
    probs = answer["probabilities"]
    if not isinstance(probs, list) or len(probs) != NUM_GRADES:
        got = f"{len(probs)} values" if isinstance(probs, list) else type(probs).__name__
        raise InvalidAnswer(f"probabilities must be a list of {NUM_GRADES} numbers, got {got}")
    if not all(_is_number(p) and 0 <= p <= 1 for p in probs):
        raise InvalidAnswer(f"probabilities must be numbers in [0, 1], got {probs}")
    total = math.fsum(probs)
    if abs(total - 1) > SUM_TOLERANCE:
        raise InvalidAnswer(f"probabilities sum to {total:.6f}, not 1 (tolerance {SUM_TOLERANCE})")
    if probs[grade] < max(probs):
        raise InvalidAnswer(f"kl_grade {grade} is not the most probable grade in {probs}")
    oa = answer["oa_probability"]
    if not _is_number(oa) or not 0 <= oa <= 1:
        raise InvalidAnswer(f"oa_probability must be a number in [0, 1], got {oa!r}")
    model = answer["model"]
    if not isinstance(model, dict) or not isinstance(model.get("name"), str) or not model["name"]:
        raise InvalidAnswer(f"model must be an object with a non-empty name, got {model!r}")
    exp = answer.get("explanation")
    if not explain:
        if exp is not None:
            raise InvalidAnswer("explanation present although none was asked for")
        return
    if not isinstance(exp, dict):
        raise InvalidAnswer(f"explanation asked for but missing (got {type(exp).__name__})")
    grid = exp.get("grid")
    if not isinstance(grid, list) or not grid or not all(isinstance(row, list) and row for row in grid):
        raise InvalidAnswer("explanation.grid must be a non-empty list of non-empty rows")
    if len({len(row) for row in grid}) != 1:
        raise InvalidAnswer(f"explanation.grid rows differ in length: {sorted({len(row) for row in grid})}")
    if not all(_is_number(v) and 0 <= v <= 1 for row in grid for v in row):
        raise InvalidAnswer("explanation.grid values must be numbers in [0, 1]")


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
