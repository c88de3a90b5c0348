"""What the grader reports to Prometheus, through TorchServe's metrics API, and its input-drift window.

`ObservedPredictor` times the request path's steps and records every knee; `Telemetry` sends a batch's
metrics to a `Sink`. Reporting never fails a prediction. docs/MODEL.md, "Metrics"; every metric and
alert: docs/MONITORING.md.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from ts.metrics.metric_type_enum import MetricTypes

from handler.service import Answer, Predictor
from model.contract import InputContract
from model.drift import FEATURES, DriftReference, DriftWindow, KneeRecord
from model.localize import Plan

log = logging.getLogger(__name__)

ANSWERS = "koa_answers_total"  # counter{grade}: knees graded
REFUSALS = "koa_refusals_total"  # counter{reason}: knees and requests refused or failed, by error type
UNCERTAIN = "koa_uncertain_total"  # counter: graded knees flagged for a reader to double-check
STEP_SECONDS = "koa_step_seconds"  # histogram{step}: seconds per batch in each step of the request path
MODEL_INFO = "koa_model_info"  # gauge = 1 {model, model_version, profile, drift_reference}
DRIFT_SCORE = "koa_drift_score"  # gauge{feature}: PSI of the window against the reference
DRIFT_KNEES = "koa_drift_window_knees"  # gauge: knees in the window (scores appear once it is full)
DRIFT_THRESHOLD = "koa_drift_threshold"  # gauge: the overall score above which KneeInputDrift fires

STEPS = ("decode", "finder", "preprocess", "grader", "explanation")
KNEE_REFUSALS = ("not_a_knee", "unsupported_view", "resolution_too_low")
# Every error type the request path answers with (handler.service, model.decode); others count as "other".
REASONS = (
    *KNEE_REFUSALS,
    "invalid_image",
    "unsupported_transfer_syntax",
    "bad_request",
    "server_error",
    "restarting",
)
DRIFT_REFERENCE = "drift_reference.json"  # beside the model in the archive (make archive)
INFO_EVERY_S = 60.0  # the info gauge is re-sent now and then: a frontend restarted alone would forget it
DRIFT_EVERY_S = 1.0  # drift scores sent at most this often (the window takes every batch); Prometheus scrapes every 5 s


def load_reference(model_dir: str | Path | None, contract: InputContract) -> DriftReference | None:
    """The drift reference packed beside the model, if it was measured for this model's name and version.

    None (and a warning) when it is missing, unreadable or bound to another model: the server then
    reports no drift scores rather than scores against the wrong reference.
    """
    path = Path(model_dir or ".") / DRIFT_REFERENCE
    if not path.is_file():
        log.warning("no %s in the archive: no input-drift scores", DRIFT_REFERENCE)
        return None
    try:
        ref = DriftReference.load(path)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("%s is unreadable (%s): no input-drift scores", path, exc)
        return None
    if (ref.model_name, ref.model_version) != (contract.model_name, contract.model_version):
        log.warning(
            "%s was measured for %s %s, not the served %s %s: no input-drift scores (make drift-reference)",
            DRIFT_REFERENCE, ref.model_name, ref.model_version, contract.model_name, contract.model_version,
        )  # fmt: skip
        return None
    return ref


class Sink(Protocol):
    def emit(self, name: str, value: float, labels: Mapping[str, str]) -> None: ...


@dataclass
class MemorySink:
    """Metrics kept in a list of (name, value, labels): tests and offline runs."""

    sent: list[tuple[str, float, dict[str, str]]] = field(default_factory=list)

    def emit(self, name: str, value: float, labels: Mapping[str, str]) -> None:
        self.sent.append((name, float(value), dict(labels)))

    def total(self, name: str, **labels: str) -> float:
        return sum(v for n, v, lab in self.sent if n == name and all(lab.get(k) == x for k, x in labels.items()))

    def last(self, name: str, **labels: str) -> float | None:
        found = [v for n, v, lab in self.sent if n == name and all(lab.get(k) == x for k, x in labels.items())]
        return found[-1] if found else None


class TorchServeSink:
    """Sends to TorchServe's backend metrics (``context.metrics``), which its frontend serves to Prometheus.

    TorchServe 0.12 serves only metrics declared in its ``metrics_config`` YAML; one that is not
    declared (an older config) is dropped with one warning instead of failing the request.
    """

    def __init__(self, cache: Any, model_name: str) -> None:
        self.cache = cache
        self.model_name = model_name
        self.missing: set[str] = set()

    def emit(self, name: str, value: float, labels: Mapping[str, str]) -> None:
        if name in self.missing:
            return
        try:
            metric = next(
                (m for m in (self._get(name, t) for t in ("counter", "gauge", "histogram")) if m is not None), None
            )
            if metric is None:
                self.missing.add(name)
                log.warning("metric %s is not declared in TorchServe's metrics_config: not reported", name)
                return
            values = {"ModelName": self.model_name, "Level": "Model", **labels}
            metric.add_or_update(value, [str(values.get(d, "")) for d in metric.dimension_names])
        except Exception:  # a metric is never worth a failed prediction
            self.missing.add(name)
            log.exception("metric %s could not be reported: it is dropped from now on", name)

    def _get(self, name: str, kind: str) -> Any:
        try:
            return self.cache.get_metric(name, MetricTypes(kind))
        except Exception:
            return None


class Telemetry:
    """A batch's step times, knees and answers -> metrics, and the rolling drift window.

    Args:
        sink: where metrics go.
        contract: the served model's contract (its name and version label the info metric).
        reference: the drift reference shipped with the model, or None (no drift scores).
        profile: the site profile served ("none" without one).
        drift_every_s: the drift scores are sent at most this often (the window takes every batch).
    """

    def __init__(
        self,
        sink: Sink,
        contract: InputContract,
        reference: DriftReference | None = None,
        profile: str = "none",
        drift_every_s: float = DRIFT_EVERY_S,
    ) -> None:
        self.sink = sink
        self.contract = contract
        self.reference = reference
        self.profile = profile
        self.window = DriftWindow(reference) if reference is not None else None
        self.marks: dict[str, float] = {}
        self.explain_s: list[float] = []
        self.knees: list[KneeRecord] = []
        self.info_sent = -INFO_EVERY_S
        self.drift_every_s = drift_every_s
        self.drift_sent = -drift_every_s

    def begin_batch(self) -> None:
        self.marks = {"start": time.perf_counter()}
        self.explain_s = []
        self.knees = []

    def mark(self, name: str) -> None:
        self.marks[name] = time.perf_counter()

    def add_knees(self, records: list[KneeRecord]) -> None:
        self.knees.extend(records)

    def end_batch(self, answers: Mapping[int, Answer]) -> None:
        """Send the batch's metrics; never raises."""
        try:
            self._send(answers)
        except Exception:
            log.exception("metrics of a batch of %d could not be sent", len(answers))

    def _send(self, answers: Mapping[int, Answer]) -> None:
        now = time.perf_counter()
        if now - self.info_sent >= INFO_EVERY_S:
            self.send_info()
            self.info_sent = now
        for step, seconds in step_seconds(self.marks).items():
            self.sink.emit(STEP_SECONDS, seconds, {"step": step})
        for seconds in self.explain_s:
            self.sink.emit(STEP_SECONDS, seconds, {"step": "explanation"})
        grades, reasons, uncertain = count_answers(answers.values())
        for grade, n in sorted(grades.items()):
            self.sink.emit(ANSWERS, n, {"grade": str(grade)})
        for reason, n in sorted(reasons.items()):
            self.sink.emit(REFUSALS, n, {"reason": reason})
        if uncertain:
            self.sink.emit(UNCERTAIN, uncertain, {})
        if self.window is not None and self.knees:
            self.window.add(self.knees)
            if now - self.drift_sent >= self.drift_every_s:
                self.drift_sent = now
                self.sink.emit(DRIFT_KNEES, len(self.window.records), {})
                for feature, score in (self.window.scores() or {}).items():
                    self.sink.emit(DRIFT_SCORE, round(score, 6), {"feature": feature})

    def start(self) -> None:
        """Announce the loaded model (the info metric) before the first request; never raises."""
        try:
            self.send_info()
            self.info_sent = time.perf_counter()
        except Exception:
            log.exception("the info metric could not be sent")

    def send_info(self) -> None:
        ref = self.reference
        labels = {
            "model": self.contract.model_name,
            "model_version": self.contract.model_version,
            "profile": self.profile,
            "drift_reference": f"{ref.measured_on}@{ref.checksum}" if ref else "none",
        }
        self.sink.emit(MODEL_INFO, 1, labels)
        if ref is not None:
            self.sink.emit(DRIFT_THRESHOLD, ref.threshold, {})


def step_seconds(marks: Mapping[str, float]) -> dict[str, float]:
    """Seconds per step from the marks set along the request path (a step whose marks are missing is left out):
    decode = start -> finder_start (parsing and decoding), finder, preprocess = finder_end -> grader_start
    (cropping and `prepare`), grader (the batched forward pass and postprocessing)."""
    spans = {
        "decode": ("start", "finder_start"),
        "finder": ("finder_start", "finder_end"),
        "preprocess": ("finder_end", "grader_start"),
        "grader": ("grader_start", "grader_end"),
    }
    return {s: max(marks[b] - marks[a], 0.0) for s, (a, b) in spans.items() if a in marks and b in marks}


def count_answers(answers: Any) -> tuple[Counter, Counter, int]:
    """(knees graded by grade, refusals by reason, uncertain knees) in a batch's (status, body) answers.

    A whole film counts each knee it lists; a request refused or failed as a whole counts once, under
    its error type (`REASONS`, anything else as ``other``).
    """
    grades: Counter = Counter()
    reasons: Counter = Counter()
    uncertain = 0
    for status, body in answers:
        if status != 200:
            kind = (body.get("error") or {}).get("type") if isinstance(body, dict) else None
            reasons[kind if kind in REASONS else "other"] += 1
            continue
        for knee in body.get("knees", [body]):
            if "kl_grade" in knee:
                grades[int(knee["kl_grade"])] += 1
                uncertain += bool(knee.get("uncertain"))
            elif "refused" in knee:
                kind = knee["refused"].get("type")
                reasons[kind if kind in REASONS else "other"] += 1
    return grades, reasons, uncertain


def image_statistics(batch: torch.Tensor) -> dict[str, np.ndarray]:
    """(B, C, S, S) model input -> three (B,) statistics of its first channel, in normalised units:
    brightness (mean), contrast (standard deviation) and sharpness (mean absolute difference of
    horizontally adjacent pixels, what the preprocessing's Laplacian step strengthens).

    In numpy on one contiguous copy: torch's small reductions on the channels-last batch cost four
    times as much CPU here (docs/MONITORING.md, what the metrics cost)."""
    x = batch[:, 0].float().contiguous().cpu().numpy()
    return {
        "brightness": x.mean(axis=(1, 2)),
        "contrast": x.std(axis=(1, 2), ddof=1),
        "sharpness": np.abs(np.diff(x, axis=2)).mean(axis=(1, 2)),
    }


def knee_records(arrays: Mapping[str, np.ndarray | None], stats: Mapping[str, np.ndarray]) -> list[KneeRecord]:
    """One record per graded or gate-refused crop of a batch (`model.postprocess.finish` arrays)."""
    probs = arrays["probabilities"]
    expected = probs @ np.arange(probs.shape[1], dtype=np.float64)
    gate, refused = arrays.get("gate_scores"), arrays.get("refused")
    out = []
    for j in range(len(probs)):
        values = {name: float(stats[name][j]) for name in ("brightness", "contrast", "sharpness")}
        if gate is not None:
            values["gate_score"] = float(gate[j])
        if refused is not None and bool(refused[j]):
            out.append(KneeRecord(True, "not_a_knee", values))
            continue
        values.update(expected_grade=float(expected[j]), confidence=float(arrays["confidence"][j]))
        out.append(KneeRecord(False, None, {k: values[k] for k in FEATURES if k in values}))
    return out


def plan_records(plans: list[Plan]) -> list[KneeRecord]:
    """One record per knee the finder refused: a refused image, or each skipped joint of a film."""
    out = []
    for p in plans:
        if p.kind == "refuse" and not p.skipped and p.error != "server_error":
            out.append(KneeRecord(True, p.error))
        else:  # a film's skipped joints, or a film refused because every joint was skipped
            out.extend(KneeRecord(True, reason) for _, reason in p.skipped)
    return out


class ObservedPredictor(Predictor):
    """`handler.service.Predictor` that reports its steps and knees to ``telemetry`` (same answers)."""

    def __init__(self, *args: Any, telemetry: Telemetry, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.telemetry = telemetry

    def plans(self, grays: list[np.ndarray]) -> list[Plan]:
        self.telemetry.mark("finder_start")
        out = super().plans(grays)
        self.telemetry.mark("finder_end")
        self.telemetry.add_knees(plan_records(out))
        return out

    def outputs(self, batch: torch.Tensor, sites: list[str | None] | None = None) -> dict[str, np.ndarray | None]:
        self.telemetry.mark("grader_start")
        arrays = super().outputs(batch, sites)
        self.telemetry.mark("grader_end")
        try:
            self.telemetry.add_knees(knee_records(arrays, image_statistics(batch)))
        except Exception:  # the drift window misses a batch; the answers go out
            log.exception("drift features of a batch of %d could not be computed", len(batch))
        return arrays

    def explanation(
        self, x: torch.Tensor, image: np.ndarray | None, target: int, method: str
    ) -> tuple[dict[str, Any], np.ndarray]:
        t0 = time.perf_counter()
        try:
            return super().explanation(x, image, target, method)
        finally:
            self.telemetry.explain_s.append(time.perf_counter() - t0)
