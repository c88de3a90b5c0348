"""The request path of the KOA-Serve handler, free of TorchServe so it can be tested directly.

decode (`model.decode`) -> preprocess (`model.preprocess`, from the contract) -> batch ->
TorchScript model -> one JSON answer per request, explained on request (`handler.explain`).
Each request succeeds or fails on its own; nothing here raises for bad input. The request forms,
and a batch answered in steps: docs/MODEL.md, "The request path".
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from handler.explain import DEFAULT_METHOD, METHODS, attribute, film_overlay_png, heat_grid, overlay_png, unletterbox
from handler.sites import Profiles
from model.contract import InputContract
from model.decode import DecodeError, decode_image, dicom_laterality
from model.localize import FinderConfig, Joint, Plan, crop_box, crop_joint, crop_view, find_joints, plan
from model.markers import Marker, MarkerReader, assign, read_markers
from model.precision import padded, served_batch
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


@dataclass(frozen=True)
class Unit:
    """One image of the batch to grade: request ``request``'s image (``knee`` None: a joint crop) or one
    knee cut out of its film, prepared for the model (`model.preprocess.prepare`)."""

    request: int
    knee: int | None
    prepared: np.ndarray


@dataclass(frozen=True)
class Film:
    """A whole film of the batch: the finder's plan, the film's (height, width), the laterality its DICOM
    header gives (None: none) and the burned-in R/L markers read when the header gives none."""

    plan: Plan
    shape: tuple[int, int]
    laterality: str | None
    markers: list[Marker]


@dataclass(frozen=True)
class Pending:
    """An explanation still to make: request ``request`` (its knee ``knee``, None: a joint crop), its model
    input ``x`` (1, C, S, S) and its answer body, which the explanation joins."""

    request: int
    knee: int | None
    x: torch.Tensor
    body: dict[str, Any]


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
        got = [str(k)[:24] for k in sorted(row)[:5]]  # a mis-typed body arrives as one long junk field name
        raise RequestError(
            f"no image found: expected one of the fields {list(IMAGE_FIELDS)}, got {got}; a raw body "
            "needs a Content-Type such as image/png, image/jpeg or application/dicom (curl --data-binary sends "
            "application/x-www-form-urlencoded, which TorchServe splits into fields)"
        )
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
    method = _text(options.get("method", DEFAULT_METHOD)).lower() or DEFAULT_METHOD
    if method not in METHODS:
        raise RequestError(f"method must be one of {list(METHODS)}, got {method!r}")
    return ParsedRequest(image, explain, method, _target(options.get("target"), contract))


# Answer schema version (koa_client/schema.py, docs/API.md): 2 added confidence and uncertain; 3 added the
# per-knee answer of a whole film (``knees``).
SCHEMA_VERSION = 3
NOT_A_KNEE = (
    "this image does not look like a knee radiograph: KOA-Serve grades knee joints on AP/PA radiographs, "
    "either a knee-joint crop or a film showing one or two knees. Other body parts, photographs and "
    "documents are refused"
)
KNEE_FIELDS = ("kl_grade", "class_name", "label", "probabilities", "oa_probability", "confidence", "uncertain")


def error_body(status: int, message: str, kind: str = "bad_request") -> dict[str, Any]:
    return {"error": {"status": status, "type": kind, "message": message}}


class Predictor:
    """Answers a batch of requests; one (status, JSON body) per request, in order.

    Args:
        scripted: the exported TorchScript model (predictions).
        eager: the same weights as an eager module (explanations; Captum needs hooks).
        contract: the input contract both were saved with.
        device: where the models live.
        finder: the knee-joint finder and its settings (`model.localize`); whole films are then cut
            into one crop per knee and answered per knee (``knees``).
        markers: the burned-in R/L marker reader (`model.markers`); without it a knee's laterality
            comes from the DICOM header only.
        profiles: the site profiles this server holds (`handler.sites`); a request picks one by its site.
    """

    def __init__(
        self,
        scripted: nn.Module,
        eager: nn.Module,
        contract: InputContract,
        device: torch.device,
        finder: tuple[nn.Module, FinderConfig] | None = None,
        markers: MarkerReader | None = None,
        profiles: Profiles | None = None,
    ) -> None:
        self.scripted = scripted
        self.eager = eager
        self.contract = contract
        self.device = device
        # The knee-joint finder (model.localize): without it every image is graded as a joint crop.
        self.finder = finder
        self.markers = markers
        self.profiles = profiles or Profiles(contract)
        # An OA-MEN export has a second method that also returns the knee gate's score.
        self.gated = hasattr(scripted, "forward_with_gate")

    def outputs(self, batch: torch.Tensor, sites: list[str | None] | None = None) -> dict[str, np.ndarray | None]:
        """(B, C, S, S) batch -> the answer's arrays (`model.postprocess.finish`), as evaluation computes them,
        each row calibrated by its site's profile (``sites``, `handler.sites.Profiles.finish`)."""
        run = self.scripted.forward_with_gate if self.gated else self.scripted
        n = len(batch)
        batch = padded(batch)  # a batch size the fused kernels are compiled for (model.precision)
        m = len(batch)
        with torch.inference_mode():
            if self.contract.postprocess.flip_tta:
                # the images and their mirrors in one pass: on these CPUs a quarter faster than two passes
                # for one image and never slower for eight (docs/BENCHMARKS.md, what the knee gate costs).
                # The knee gate reads the image as sent: the mirrors' gate scores are dropped (finish).
                both = torch.cat([batch, torch.flip(batch, dims=[3])]).contiguous(memory_format=torch.channels_last)
                outputs = run(both).float().cpu().numpy()
                out, flipped = outputs[:n], outputs[m : m + n]
            else:
                out, flipped = run(batch).float().cpu().numpy()[:n], None
        arrays = self.profiles.finish(out, flipped, sites)
        arrays["sites"] = sites
        return arrays

    def warm_up(self, max_batch: int, calls: int = 2) -> float:
        """Run the finder and the grader ``calls`` times at each batch size they run at (`served_batch`) for
        1 to ``max_batch`` requests, in the shapes and memory layout the request path gives them (the grader
        with the mirrors); the seconds.

        TorchScript's executor optimises a graph on its first calls with a new shape, and with oneDNN Graph
        fusion (`model.precision.onednn_fusion`) compiles its kernels then: without this the first requests
        of each batch size after a (re)start pay for it (on 2 CPU cores, batch 1: 243 ms instead of 32).
        The networks are called directly, so the warm-up is in no metric or drift window."""
        c = self.contract
        run = self.scripted.forward_with_gate if self.gated else self.scripted
        mirrors = 2 if c.postprocess.flip_tta else 1
        layout = torch.channels_last
        t0 = time.perf_counter()
        with torch.inference_mode():
            for n in sorted({served_batch(k) for k in range(1, max(max_batch, 1) + 1)}):
                x = torch.zeros(n * mirrors, c.channels, c.input_size, c.input_size, device=self.device)
                x = x.contiguous(memory_format=layout)
                for _ in range(calls):
                    run(x)
                if self.finder is not None:
                    net, cfg = self.finder
                    films = torch.zeros(n, 1, cfg.input_size, cfg.input_size, device=self.device)
                    for _ in range(calls):
                        net(films.contiguous(memory_format=layout))
        return time.perf_counter() - t0

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
            "model": self.profiles.model_block(arrays["sites"][j] if arrays.get("sites") else None),
        }

    def explanation(
        self, x: torch.Tensor, image: np.ndarray | None, target: int, method: str
    ) -> tuple[dict[str, Any], np.ndarray]:
        """The explanation of ``target`` for model input ``x`` and its heat map at the model's input size.
        A crop's (``image``: the crop as sent) carries its overlay at the crop's own size; a film's knee
        (``image`` None) only its grid: the film's overlay holds its map (`film_explanation`)."""
        heat = attribute(self.eager, x, target, method)
        body = {
            "method": method,
            "target": target,
            "target_class": self.contract.class_names[target],
            "grid": heat_grid(heat),
        }
        if image is not None:
            shown = unletterbox(heat, image.shape, self.contract.preprocess.fit)
            body["overlay_png"] = base64.b64encode(overlay_png(image, shown)).decode("ascii")
        return body, heat

    def film_explanation(
        self, gray: np.ndarray, joints: list[Joint], heats: dict[int, tuple[np.ndarray, int]], method: str
    ) -> dict[str, Any]:
        """The film's overlay at its native size: each explained knee's map in the square it was cut from,
        its box drawn and labelled with the grade explained."""
        names = self.contract.class_names
        knees = [(crop_box(joints[k]), joints[k].box, heat, names[t]) for k, (heat, t) in sorted(heats.items())]
        png = film_overlay_png(gray, knees)
        h, w = gray.shape
        return {"method": method, "width": w, "height": h, "overlay_png": base64.b64encode(png).decode("ascii")}

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
        decoded: list[tuple[int, ParsedRequest, np.ndarray]] = []
        sites = {i: Profiles.requested(row, headers[i] if i < len(headers) else {}) for i, row in enumerate(rows)}
        grays: dict[int, np.ndarray] = {}  # the decoded images, for overlays at their own size
        for i, row in enumerate(rows):
            try:
                req = parse_request(row, headers[i] if i < len(headers) else {}, self.contract)
                gray = decode_image(req.image, max_pixels=self.contract.max_pixels, knee_only=True)
                decoded.append((i, req, gray))
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
        plans = self.plans([gray for _, _, gray in decoded])
        # One unit per image to grade: the image itself (a joint crop), or each knee cut out of a film.
        units: list[Unit] = []
        films: dict[int, Film] = {}
        requests: dict[int, ParsedRequest] = {}
        for (i, req, gray), pl in zip(decoded, plans, strict=True):
            try:
                if pl.kind == "refuse":
                    message = NOT_A_KNEE if pl.error == "not_a_knee" else pl.message
                    status = 500 if pl.error == "server_error" else 422
                    first[i] = (status, error_body(status, message, pl.error or "not_a_knee"))
                elif pl.kind == "crop":
                    # read whole, or cut at its joint where the site's profile says so (explained as graded)
                    seen = crop_view(gray, pl, self.profiles.reading(sites[i]))
                    units.append(Unit(i, None, prepare(seen, self.contract)))
                    grays[i] = seen
                else:
                    knees = [Unit(i, k, prepare(crop_joint(gray, j), self.contract)) for k, j in enumerate(pl.joints)]
                    dicom = dicom_laterality(req.image)
                    films[i] = Film(pl, gray.shape, dicom, self.read_markers(gray) if dicom is None else [])
                    units.extend(knees)
                    grays[i] = gray
                requests[i] = req
            except Exception as exc:
                log.exception("request %d could not be prepared", i)
                first[i] = (400, error_body(400, f"could not prepare the image: {type(exc).__name__}: {exc}"))
        explain: list[Pending] = []
        knee_bodies: dict[int, dict[int, dict[str, Any]]] = {}
        if units:
            batch = torch.from_numpy(np.stack([to_model_input(u.prepared, self.contract) for u in units]))
            # channels_last, as the model was exported: its convolutions run faster in that layout on a CPU.
            batch = batch.to(self.device).contiguous(memory_format=torch.channels_last)
            try:
                arrays = self.outputs(batch, [sites[u.request] for u in units])
            except Exception as exc:
                log.exception("inference failed for a batch of %d", len(units))
                for i in {u.request for u in units}:
                    first[i] = (500, error_body(500, f"inference failed: {exc}", "server_error"))
                units, films = [], {}
            refused = arrays["refused"] if units else None
            for j, unit in enumerate(units):
                i, k = unit.request, unit.knee
                gate_refused = refused is not None and bool(refused[j])
                if k is None:  # a joint crop: today's answer
                    if gate_refused:
                        first[i] = (422, error_body(422, NOT_A_KNEE, "not_a_knee"))
                        continue
                    body = self.answer(arrays, j)
                else:
                    body = self.answer(arrays, j) if not gate_refused else {}
                    knee_bodies.setdefault(i, {})[k] = body
                if body and requests[i].explain:
                    explain.append(Pending(i, k, batch[j : j + 1].clone(), body))
                elif k is None:
                    first[i] = (200, body)
        film_answers: dict[int, Answer] = {}
        film_entries: dict[int, dict[int, dict[str, Any]]] = {}
        for i, film in films.items():
            film_answers[i], film_entries[i] = self.film_answer(film, knee_bodies.get(i, {}), sites[i])
        explain = [e for e in explain if e.knee is None or film_answers[e.request][0] == 200]
        explained = {e.request for e in explain}
        first.update({i: answer for i, answer in film_answers.items() if i not in explained})
        yield first
        failed: set[int] = set()
        heats: dict[int, dict[int, tuple[np.ndarray, int]]] = {}  # a film's knees' maps, for its overlay
        for n, pending in enumerate(explain):
            i, k, x, body = pending.request, pending.knee, pending.x, pending.body
            if i in failed:
                continue
            target = body["kl_grade"] if requests[i].target is None else requests[i].target
            try:
                explanation, heat = self.explanation(x, grays[i] if k is None else None, target, requests[i].method)
                if k is not None:
                    heats.setdefault(i, {})[k] = (heat, target)
                    if all(e.request != i for e in explain[n + 1 :]):  # the film's last knee: draw the film
                        pl = films[i].plan
                        film_body = film_answers[i][1]
                        film_body["explanation"] = self.film_explanation(
                            grays[i], pl.joints, heats[i], requests[i].method
                        )
            except Exception as exc:
                log.exception("explanation failed for request %d", i)
                failed.add(i)
                yield {i: (500, error_body(500, f"explanation failed: {exc}", "server_error"))}
                continue
            if k is None:
                body["explanation"] = explanation
                yield {i: (200, body)}
                continue
            film_entries[i][k]["explanation"] = explanation
            if all(e.request != i for e in explain[n + 1 :]):  # the film's last knee: its answer is complete
                yield {i: film_answers[i]}

    def plans(self, grays: list[np.ndarray]) -> list[Plan]:
        """What to do with each decoded image: grade it whole, per knee, or refuse it (`model.localize.plan`)."""
        if self.finder is None:
            return [Plan("crop") for _ in grays]
        net, cfg = self.finder
        try:
            found = find_joints(net, cfg, grays, self.device)
        except Exception:
            log.exception("the knee-joint finder failed on a batch of %d", len(grays))
            return [Plan("refuse", error="server_error", message="the knee-joint finder failed") for _ in grays]
        return [plan(joints, g.shape, cfg) for joints, g in zip(found, grays, strict=True)]

    def read_markers(self, gray: np.ndarray) -> list[Marker]:
        """The burned-in R/L markers the reader claims on a whole film; none without a reader, or when it fails."""
        if self.markers is None:
            return []
        try:
            return read_markers(self.markers, gray)
        except Exception:  # a laterality is a nicety: the grades still go out
            log.exception("the marker reader failed on a film of shape %s", gray.shape)
            return []

    def film_answer(
        self,
        film: Film,
        bodies: dict[int, dict[str, Any]],
        site: str | None = None,
    ) -> tuple[Answer, dict[int, dict[str, Any]]]:
        """The answer for a whole film: one entry per knee found (graded, or refused with the reason),
        left to right; a 422 when no knee could be graded. ``bodies`` maps the plan's knee index to its
        answer (empty when the knee gate refused the crop). Also returns the graded entries by knee
        index: an explanation added to one later is part of the answer.

        Laterality: the DICOM header's, for the only graded knee; without one, the burned-in markers'
        for a graded knee that is the only knee found, or alone in the half of the film its marker is
        in (`model.markers.assign`). ``laterality_source`` says which."""
        pl, (h, w), laterality, markers = film.plan, film.shape, film.laterality, film.markers
        entries: list[tuple[float, dict[str, Any]]] = []
        by_knee: dict[int, dict[str, Any]] = {}
        for k, joint in enumerate(pl.joints):
            body = bodies.get(k)
            if body:
                entry = self.knee_entry(joint, w)
                entry.update({key: body[key] for key in KNEE_FIELDS})
                by_knee[k] = entry
            else:
                entry = self.knee_entry(joint, w, ("not_a_knee", "the knee gate did not accept this crop"))
            entries.append((joint.centre[0], entry))
        for joint, reason in pl.skipped:
            why = {
                "resolution_too_low": f"this joint spans {joint.width:.0f} pixels; grading needs "
                f"{self.finder[1].min_joint_px if self.finder else 0}",
                "unsupported_view": "a lateral or oblique view: KL grading is defined on AP/PA views",
            }.get(reason, reason)
            entries.append((joint.centre[0], self.knee_entry(joint, w, (reason, why))))
        knees = [e for _, e in sorted(entries, key=lambda t: t[0])]
        graded = [e for e in knees if "kl_grade" in e]
        if len(graded) == 1 and laterality:
            graded[0].update(laterality=laterality, laterality_source="dicom")
        elif markers and graded:
            centres = [(e["box"][0] + e["box"][2]) / 2 for e in knees]
            for entry, letter in zip(knees, assign(markers, centres, w), strict=True):
                if letter and "kl_grade" in entry:
                    entry.update(laterality=letter, laterality_source="marker")
        if not graded:
            return (422, error_body(422, NOT_A_KNEE, "not_a_knee")), {}
        body = {
            "schema_version": SCHEMA_VERSION,
            "image": {"width": w, "height": h},
            "knees": knees,
            "model": self.profiles.model_block(site),
        }
        return (200, body), by_knee

    @staticmethod
    def knee_entry(joint: Joint, image_width: int, refusal: tuple[str, str] | None = None) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "box": [round(v, 1) for v in joint.box],
            "side": joint.side(image_width),
            "laterality": None,
            "laterality_source": None,
            "view": joint.view,
        }
        if refusal:
            entry["refused"] = {"type": refusal[0], "message": refusal[1]}
        return entry

    def handle(self, rows: list[dict[str, Any]], headers: list[dict[str, Any]]) -> list[Answer]:
        """Answer every request of a batch at once: (HTTP status, JSON body) each, in order (see `answers`)."""
        results: dict[int, Answer] = {}
        for group in self.answers(rows, headers):
            results.update(group)
        return [results.get(i, (500, error_body(500, "no answer", "server_error"))) for i in range(len(rows))]
