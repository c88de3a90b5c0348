"""The request path of the KOA-Serve handler, free of TorchServe so it can be tested directly.

decode (`model.decode`) -> preprocess (`model.preprocess`, from the contract) -> batch ->
TorchScript model -> one JSON answer per request, explained on request (`handler.explain`).

Each request in a batch succeeds or fails on its own: a bad request gets a 4xx answer with
a JSON error body while the rest of its batch is answered normally. Nothing here raises for
bad input. `Predictor.answers` gives a batch's answers in steps (the plain predictions, then
each explanation) so that the server can send them as they are ready; `Predictor.handle`
gives them all at once.

Accepted request forms (TorchServe hands each request over as a dict of named fields):
- raw image bytes as the body (``data`` or ``body``): PNG, JPEG or DICOM;
- multipart form fields: the image in ``data``, ``image`` or ``file``; optional fields
  ``explain`` (true/false), ``target`` (grade 0-4 or a class name) and ``method``
  (``gradcam`` or ``ig``);
- JSON: ``{"image": "<base64>", "explain": true, "target": 3, "method": "gradcam"}``;
- gRPC: the same keys in the request's ``input`` map (``data`` holds the image bytes).
``POST /explanations/<model>`` explains every request without the ``explain`` field.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from handler.explain import METHODS, attribute, heat_grid, overlay_png
from model.contract import InputContract
from model.decode import DecodeError, decode_image
from model.postprocess import finish
from model.preprocess import prepare, to_model_input

log = logging.getLogger(__name__)

IMAGE_FIELDS = ("data", "body", "image", "file")
JSON_IMAGE_KEYS = ("image", "data", "b64")
TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off", ""}


Answer = tuple[int, dict[str, Any]]  # (HTTP status, JSON body) of one request


class RequestError(ValueError):
    """A request the service cannot answer with a prediction; ``status`` is its HTTP code."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ParsedRequest:
    image: bytes
    explain: bool
    method: str
    target: int | None


def _text(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode("utf-8").strip()
        except UnicodeDecodeError:
            raise RequestError("option fields must be UTF-8 text") from None
    return str(value).strip()


def _flag(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = _text(value).lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise RequestError(f"{name} must be true or false, got {text[:40]!r}")


def _target(value: Any, contract: InputContract) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise RequestError(f"target must be a grade 0-{contract.num_classes - 1} or a class name, got {value!r}")
    if isinstance(value, int):
        grade = value
    else:
        text = _text(value)
        if text == "":
            return None
        if text in contract.class_names:
            return contract.class_names.index(text)
        try:
            grade = int(text)
        except ValueError:
            grade = -1
    if not 0 <= grade < contract.num_classes:
        raise RequestError(
            f"target must be a grade 0-{contract.num_classes - 1} or one of {list(contract.class_names)}, got {value!r}"
        )
    return grade


def parse_request(row: dict[str, Any], headers: dict[str, Any], contract: InputContract) -> ParsedRequest:
    """Turn one TorchServe request (its named fields and headers) into what to do.

    Raises:
        RequestError: missing or malformed image field or options.
    """
    if not isinstance(row, dict) or not row:
        raise RequestError("empty request: send an image (PNG, JPEG or DICOM) as the body, a form field or JSON")
    options: dict[str, Any] = {k: row[k] for k in ("explain", "target", "method") if k in row}
    field = next((k for k in IMAGE_FIELDS if k in row), None)
    if field is None:
        raise RequestError(f"no image found: expected one of the fields {list(IMAGE_FIELDS)}, got {sorted(row)}")
    value = row[field]
    if isinstance(value, dict):  # a JSON body, already parsed by TorchServe
        options = {**{k: value[k] for k in ("explain", "target", "method") if k in value}, **options}
        key = next((k for k in JSON_IMAGE_KEYS if k in value), None)
        if key is None or not isinstance(value[key], str):
            raise RequestError(f"JSON body needs a base64 string in one of {list(JSON_IMAGE_KEYS)}")
        try:
            image = base64.b64decode(value[key], validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(f"JSON field {key!r} is not valid base64") from None
    elif isinstance(value, bytes | bytearray):
        image = bytes(value)
        ctype = str((headers.get(field) or {}).get("content-type", "")) if isinstance(headers.get(field), dict) else ""
        if ctype.startswith("application/json"):
            raise RequestError("body was sent as application/json but is not valid JSON")
    elif isinstance(value, str):
        raise RequestError(
            "the image arrived as text: send raw bytes with an image content type (e.g. image/png, application/dicom), "
            "a multipart file field, or JSON with a base64 image"
        )
    else:
        raise RequestError(f"unsupported body type {type(value).__name__}")
    if not image:
        raise RequestError("empty image: the request body has no bytes")
    explain = _flag(options["explain"], "explain") if "explain" in options else headers.get("explain") == "True"
    method = _text(options.get("method", "gradcam")).lower() or "gradcam"
    if method not in METHODS:
        raise RequestError(f"method must be one of {list(METHODS)}, got {method!r}")
    return ParsedRequest(image, explain, method, _target(options.get("target"), contract))


# Answer schema version (client/schema.py, docs/API.md): 2 added confidence and uncertain.
SCHEMA_VERSION = 2
NOT_A_KNEE = (
    "this image does not look like a knee-joint radiograph: KOA-Serve grades one knee joint on an AP/PA "
    "radiograph, framed like a knee-joint crop (femur and tibia ends, the joint space in the middle). "
    "Other body parts, photographs, documents and whole leg films are refused; crop a whole film to one knee"
)


def error_body(status: int, message: str, kind: str = "bad_request") -> dict[str, Any]:
    return {"error": {"status": status, "type": kind, "message": message}}


class Predictor:
    """Answers a batch of requests; one (status, JSON body) per request, in order.

    Args:
        scripted: the exported TorchScript model (predictions).
        eager: the same weights as an eager module (explanations; Captum needs hooks).
        contract: the input contract both were saved with.
        device: where the models live.
    """

    def __init__(self, scripted: nn.Module, eager: nn.Module, contract: InputContract, device: torch.device) -> None:
        self.scripted = scripted
        self.eager = eager
        self.contract = contract
        self.device = device
        # An OA-MEN export has a second method that also returns the knee gate's score.
        self.gated = hasattr(scripted, "forward_with_gate")

    def outputs(self, batch: torch.Tensor) -> dict[str, np.ndarray | None]:
        """(B, C, S, S) batch -> the answer's arrays (`model.postprocess.finish`), as evaluation computes them."""
        run = self.scripted.forward_with_gate if self.gated else self.scripted
        with torch.inference_mode():
            out = run(batch).float().cpu().numpy()
            flipped = (
                run(torch.flip(batch, dims=[3])).float().cpu().numpy() if self.contract.postprocess.flip_tta else None
            )
        return finish(out, self.contract.postprocess, self.contract.num_classes, flipped)

    def answer(self, arrays: dict[str, np.ndarray | None], j: int) -> dict[str, Any]:
        """The prediction body (answer schema v2, docs/API.md) for request ``j`` of the batch's arrays."""
        probs = arrays["probabilities"][j]
        grade = int(arrays["grades"][j])
        c = self.contract
        rounded = [round(float(p), 6) for p in probs]
        return {
            "schema_version": SCHEMA_VERSION,
            "kl_grade": grade,
            "class_name": c.class_names[grade],
            "label": c.class_labels[grade],
            "probabilities": rounded,
            "oa_probability": round(float(probs[2:].sum()), 6),
            "confidence": rounded[grade],
            "uncertain": bool(arrays["uncertain"][j]),
            "model": {"name": c.model_name, "version": c.model_version},
        }

    def explanation(self, x: torch.Tensor, prepared: np.ndarray, target: int, method: str) -> dict[str, Any]:
        heat = attribute(self.eager, x, target, method)
        return {
            "method": method,
            "target": target,
            "target_class": self.contract.class_names[target],
            "grid": heat_grid(heat),
            "overlay_png": base64.b64encode(overlay_png(prepared, heat)).decode("ascii"),
        }

    def answers(self, rows: list[dict[str, Any]], headers: list[dict[str, Any]]) -> Iterator[dict[int, Answer]]:
        """Answer a batch in steps, each as soon as it is known; never raises for bad input.

        Yields ``{request index: (HTTP status, JSON body)}`` groups that together hold every request
        once: first everything one batched forward pass settles (bad requests, plain predictions, and
        explain requests whose inference failed), then each explanation on its own, in request order.
        An explanation costs one (Grad-CAM) or ``ig_steps`` (Integrated Gradients) forward and
        backward passes, so a server that sends each group as it comes (`handler.koa_handler`) answers
        a batch's plain predictions without waiting for its explanations.
        """
        first: dict[int, Answer] = {}
        parsed: list[tuple[int, ParsedRequest, np.ndarray]] = []
        for i, row in enumerate(rows):
            try:
                req = parse_request(row, headers[i] if i < len(headers) else {}, self.contract)
                gray = decode_image(req.image, max_pixels=self.contract.max_pixels, knee_only=True)
                parsed.append((i, req, prepare(gray, self.contract)))
            except RequestError as exc:
                first[i] = (exc.status, error_body(exc.status, str(exc)))
            except DecodeError as exc:
                # The status and type travel with the error: e.g. 415 for a DICOM transfer syntax
                # this server cannot decode; a plain DecodeError is a 400 invalid_image.
                status = getattr(exc, "status", 400)
                first[i] = (status, error_body(status, str(exc), getattr(exc, "kind", "invalid_image")))
            except Exception as exc:  # an input we did not foresee: answer it, keep the batch alive
                log.exception("request %d could not be prepared", i)
                first[i] = (400, error_body(400, f"could not read the request: {type(exc).__name__}: {exc}"))
        explain: list[tuple[int, ParsedRequest, np.ndarray, torch.Tensor, dict[str, Any]]] = []
        if parsed:
            batch = torch.from_numpy(np.stack([to_model_input(p, self.contract) for _, _, p in parsed]))
            # channels_last, as the model was exported: its convolutions run faster in that layout on a CPU.
            batch = batch.to(self.device).contiguous(memory_format=torch.channels_last)
            try:
                arrays = self.outputs(batch)
            except Exception as exc:
                log.exception("inference failed for a batch of %d", len(parsed))
                for i, _, _ in parsed:
                    first[i] = (500, error_body(500, f"inference failed: {exc}", "server_error"))
                parsed = []
            refused = arrays["refused"] if parsed else None
            for j, (i, req, prepared) in enumerate(parsed):
                if refused is not None and refused[j]:
                    first[i] = (422, error_body(422, NOT_A_KNEE, "not_a_knee"))
                    continue
                body = self.answer(arrays, j)
                if req.explain:
                    explain.append((i, req, prepared, batch[j : j + 1].clone(), body))
                else:
                    first[i] = (200, body)
        yield first
        for i, req, prepared, x, body in explain:
            target = body["kl_grade"] if req.target is None else req.target
            try:
                body["explanation"] = self.explanation(x, prepared, target, req.method)
            except Exception as exc:
                log.exception("explanation failed for request %d", i)
                yield {i: (500, error_body(500, f"explanation failed: {exc}", "server_error"))}
                continue
            yield {i: (200, body)}

    def handle(self, rows: list[dict[str, Any]], headers: list[dict[str, Any]]) -> list[Answer]:
        """Answer every request of a batch at once: (HTTP status, JSON body) each, in order (see `answers`)."""
        results: dict[int, Answer] = {}
        for group in self.answers(rows, headers):
            results.update(group)
        return [results.get(i, (500, error_body(500, "no answer", "server_error"))) for i in range(len(rows))]
