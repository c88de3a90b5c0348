"""The answer schema of KOA-Serve, checked the same way by the clients' tests, Locust and the benchmarks.

docs/API.md documents it: version 2 added ``confidence`` and ``uncertain``, version 3 the whole film's
``knees``; an answer without ``schema_version`` is a version 1 answer and still passes, so a newer
client can read an older server. Refusals are errors, not answers (``ERROR_TYPES``).

    validate_answer(answer, explain=False)   # raises InvalidAnswer with the reason
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["SCHEMA_VERSION", "NUM_GRADES", "ERROR_TYPES", "InvalidAnswer", "validate_answer", "validate_error"]

SCHEMA_VERSION = 3
NUM_GRADES = 5  # KL0..KL4
SUM_TOLERANCE = 1e-3  # the server rounds each probability to 6 decimals
# Every error type the server answers with (docs/API.md); 4xx is the client's to fix, 5xx the server's.
ERROR_TYPES = {
    "bad_request": "the request itself is malformed (fields, options, encoding)",
    "invalid_image": "the bytes are not an image KOA-Serve can read",
    "unsupported_transfer_syntax": "a DICOM compressed with a transfer syntax that is not decoded",
    "not_a_knee": "the image is not a knee radiograph (or its DICOM header names another body part)",
    "unsupported_view": "the knee is shown in a lateral or oblique view; KL grading is defined on AP/PA views",
    "resolution_too_low": "the knee joint spans too few pixels to be graded; send the film at full resolution",
    "restarting": "the server is draining for a restart: send the request again",
    "server_error": "the server failed on this request",
}


class InvalidAnswer(ValueError):
    """A 200 answer whose body breaks KOA-Serve's answer schema; the message says how."""


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def validate_answer(answer: Any, explain: bool = False) -> None:
    """Check one prediction body against the answer schema.

    Args:
        answer: the decoded JSON body.
        explain: whether an explanation was asked for; then every grade (of a crop, or of each
            graded knee of a film) carries ``explanation.grid``, a non-empty 2-D grid of numbers in
            [0, 1]; otherwise ``explanation`` must be absent.

    Raises:
        InvalidAnswer: the first problem found, saying what was received.
    """
    if not isinstance(answer, dict):
        raise InvalidAnswer(f"answer is not a JSON object but {type(answer).__name__}")
    version = answer.get("schema_version", 1)
    if version not in (1, 2, SCHEMA_VERSION):
        raise InvalidAnswer(f"schema_version must be 1 to {SCHEMA_VERSION}, got {version!r}")
    model = answer.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("name"), str) or not model["name"]:
        raise InvalidAnswer(f"model must be an object with a non-empty name, got {model!r}")
    if version >= 3 and "knees" in answer:
        _check_film(answer, explain)
    else:
        _check_grade(answer, version, explain)


def _check_film(answer: dict[str, Any], explain: bool) -> None:
    image = answer.get("image")
    if not isinstance(image, dict) or not all(isinstance(image.get(k), int) for k in ("width", "height")):
        raise InvalidAnswer(f"image must be an object with integer width and height, got {image!r}")
    knees = answer["knees"]
    if not isinstance(knees, list) or not knees:
        raise InvalidAnswer(f"knees must be a non-empty list, got {knees!r}"[:300])
    for n, knee in enumerate(knees):
        where = f"knees[{n}]"
        if not isinstance(knee, dict):
            raise InvalidAnswer(f"{where} is not an object")
        box = knee.get("box")
        if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
            raise InvalidAnswer(f"{where}.box must be [x0, y0, x1, y1], got {box!r}")
        if box[2] <= box[0] or box[3] <= box[1]:
            raise InvalidAnswer(f"{where}.box must have x1 > x0 and y1 > y0, got {box}")
        if knee.get("side") not in ("left", "right"):
            raise InvalidAnswer(f"{where}.side must be 'left' or 'right', got {knee.get('side')!r}")
        if knee.get("laterality") not in (None, "R", "L"):
            raise InvalidAnswer(f"{where}.laterality must be 'R', 'L' or null, got {knee.get('laterality')!r}")
        # Added within version 3 (absent from older servers' answers): where the laterality came from.
        if "laterality_source" in knee:
            source = knee["laterality_source"]
            if source not in (None, "dicom", "marker"):
                raise InvalidAnswer(f"{where}.laterality_source must be 'dicom', 'marker' or null, got {source!r}")
            if (source is None) != (knee.get("laterality") is None):
                raise InvalidAnswer(
                    f"{where}.laterality_source is {source!r} but laterality is {knee.get('laterality')!r}: "
                    "both are null or neither"
                )
        if "refused" in knee:
            refused = knee["refused"]
            if not isinstance(refused, dict) or refused.get("type") not in ERROR_TYPES:
                raise InvalidAnswer(f"{where}.refused must name a known error type, got {refused!r}")
            if "kl_grade" in knee:
                raise InvalidAnswer(f"{where} is both refused and graded")
            continue
        try:
            _check_grade(knee, SCHEMA_VERSION, explain)
        except InvalidAnswer as exc:
            raise InvalidAnswer(f"{where}: {exc}") from None
    if not any("kl_grade" in knee for knee in knees):
        raise InvalidAnswer("a film answer grades at least one knee (otherwise it is a refusal)")


def _check_grade(answer: dict[str, Any], version: int, explain: bool) -> None:
    """The grade fields of a crop's answer, or of one graded knee of a film."""
    required = ["kl_grade", "probabilities", "oa_probability"]
    if version >= 2:
        required += ["confidence", "uncertain"]
    for key in required:
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
    if version == 1 and probs[grade] < max(probs):
        raise InvalidAnswer(f"kl_grade {grade} is not the most probable grade in {probs}")
    if version >= 2:
        conf = answer["confidence"]
        if not _is_number(conf) or abs(conf - probs[grade]) > 1e-5:
            raise InvalidAnswer(f"confidence must equal probabilities[kl_grade] = {probs[grade]}, got {conf!r}")
        if not isinstance(answer["uncertain"], bool):
            raise InvalidAnswer(f"uncertain must be true or false, got {answer['uncertain']!r}")
    oa = answer["oa_probability"]
    if not _is_number(oa) or not 0 <= oa <= 1:
        raise InvalidAnswer(f"oa_probability must be a number in [0, 1], got {oa!r}")
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


def validate_error(body: Any, status: int) -> str:
    """Check an error body ``{"error": {"status", "type", "message"}}``; returns its type.

    Raises:
        InvalidAnswer: the body is not a KOA-Serve error of that status with a known type.
    """
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        raise InvalidAnswer(f"error body must be {{'error': {{...}}}}, got {body!r}"[:300])
    if err.get("status") != status:
        raise InvalidAnswer(f"error status {err.get('status')!r} differs from the HTTP status {status}")
    if err.get("type") not in ERROR_TYPES:
        raise InvalidAnswer(f"unknown error type {err.get('type')!r}; known: {sorted(ERROR_TYPES)}")
    if not isinstance(err.get("message"), str) or not err["message"]:
        raise InvalidAnswer("error message must be a non-empty string")
    return err["type"]
