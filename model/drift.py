"""Input drift: a reference summary of what the model saw on val, and a score for a window of recent knees.

Every knee becomes a `KneeRecord`; `DriftWindow` scores the last ``window`` of them against the
reference (`build_reference`) with the population stability index. Pure numpy, so the offline script and
the server compute the same thing. docs/MODEL.md, "Input drift"; docs/MONITORING.md.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REFERENCE_FORMAT = 1
# The graded knee's numbers, in the order they are exported; "refused" is the share of refused knees.
FEATURES = ("expected_grade", "confidence", "gate_score", "brightness", "contrast", "sharpness")
REFUSED = "refused"
OVERALL = "overall"
BINS = 10
# Half a knee added to every bin: a bin the window has not filled yet does not make PSI infinite.
PSEUDO_COUNT = 0.5


@dataclass(frozen=True)
class KneeRecord:
    """One knee the server met: refused (with ``reason``), or graded with its feature ``values``.

    A knee the gate refused still carries its gate score and image statistics; only graded knees carry
    the expected grade and the confidence.
    """

    refused: bool
    reason: str | None = None
    values: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class FeatureReference:
    """One feature on the reference data: inner bin edges (deciles) and the share of values per bin."""

    name: str
    edges: tuple[float, ...]
    shares: tuple[float, ...]

    def counts(self, values: np.ndarray) -> np.ndarray:
        """How many of ``values`` fall in each bin, (len(shares),)."""
        bins = np.searchsorted(np.asarray(self.edges), values, side="right")
        return np.bincount(bins, minlength=len(self.edges) + 1).astype(np.float64)


@dataclass(frozen=True)
class DriftReference:
    """What the model saw on its reference data, bound to one model (name, version, weights checksum).

    ``window`` and ``threshold`` are the operating point chosen on data (docs/MONITORING.md).
    """

    model_name: str
    model_version: str
    weights_sha256: str
    measured_on: str
    knees: int
    refused_share: float
    features: tuple[FeatureReference, ...]
    window: int = 200
    threshold: float = 0.25
    format: int = REFERENCE_FORMAT

    @property
    def checksum(self) -> str:
        """sha256 of the reference itself (its canonical JSON), short enough for a label."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DriftReference:
        """Raises ValueError for a reference of another format or with malformed features."""
        if data.get("format") != REFERENCE_FORMAT:
            raise ValueError(f"drift reference format {data.get('format')!r}, expected {REFERENCE_FORMAT}")
        feats = []
        for f in data["features"]:
            edges, shares = tuple(float(e) for e in f["edges"]), tuple(float(s) for s in f["shares"])
            if len(shares) != len(edges) + 1 or abs(sum(shares) - 1.0) > 1e-6:
                raise ValueError(
                    f"feature {f.get('name')!r}: {len(edges)} edges need {len(edges) + 1} shares summing to 1"
                )
            feats.append(FeatureReference(str(f["name"]), edges, shares))
        fields = {k: data[k] for k in ("model_name", "model_version", "weights_sha256", "measured_on", "knees")}
        return cls(
            **fields,
            refused_share=float(data["refused_share"]),
            features=tuple(feats),
            window=int(data["window"]),
            threshold=float(data["threshold"]),
        )

    @classmethod
    def load(cls, path: Path) -> DriftReference:
        return cls.from_dict(json.loads(Path(path).read_text()))


def build_reference(
    records: Iterable[KneeRecord],
    model_name: str,
    model_version: str,
    weights_sha256: str,
    measured_on: str,
    bins: int = BINS,
    window: int = 200,
    threshold: float = 0.25,
) -> DriftReference:
    """Decile bins of each feature over ``records`` and their refusal share.

    Edges that coincide (a feature with few distinct values) are merged, so no bin is empty on the
    reference itself. Raises ValueError when a feature has fewer than ``bins`` values.
    """
    records = list(records)
    feats = []
    for name in FEATURES:
        values = np.asarray([r.values[name] for r in records if name in r.values], dtype=np.float64)
        if len(values) < bins:
            raise ValueError(f"feature {name!r} has {len(values)} values on {measured_on}; binning needs {bins}")
        edges = np.unique(np.quantile(values, np.arange(1, bins) / bins))
        edges = edges[edges > values.min()]  # an edge at the minimum would leave the first bin empty
        ref = FeatureReference(name, tuple(float(e) for e in edges), ())
        counts = ref.counts(values)
        feats.append(FeatureReference(name, ref.edges, tuple(float(c) for c in counts / counts.sum())))
    refused = sum(r.refused for r in records)
    return DriftReference(
        model_name,
        model_version,
        weights_sha256,
        measured_on,
        len(records),
        # the same half-knee smoothing as the window: a reference without a single refusal is not "never"
        (refused + PSEUDO_COUNT) / (len(records) + 2 * PSEUDO_COUNT),
        tuple(feats),
        window,
        threshold,
    )


def psi(expected: np.ndarray, counts: np.ndarray) -> float:
    """Population stability index of observed bin ``counts`` against ``expected`` shares (both (B,)).

    PSI = sum_b (q_b - p_b) ln(q_b / p_b), with q the observed shares after `PSEUDO_COUNT` per bin.
    0 for identical distributions; 0.1-0.25 is a moderate and above 0.25 a large shift by the usual
    rule of thumb. The threshold actually used is chosen on data (docs/MONITORING.md).
    """
    p = np.asarray(expected, dtype=np.float64)
    c = np.asarray(counts, dtype=np.float64)
    if p.shape != c.shape or p.ndim != 1:
        raise ValueError(f"expected shares and counts must be 1-D of one length, got {p.shape} and {c.shape}")
    q = (c + PSEUDO_COUNT) / (c.sum() + PSEUDO_COUNT * len(c))
    p = np.clip(p, 1e-6, None)
    return float(np.sum((q - p) * np.log(q / p)))


class DriftWindow:
    """The last ``reference.window`` knees and their drift scores against ``reference``.

    Scores are None until the window is full: a half-empty window is too noisy to alarm on.
    """

    def __init__(self, reference: DriftReference) -> None:
        self.reference = reference
        self.records: deque[KneeRecord] = deque(maxlen=reference.window)

    def add(self, records: Iterable[KneeRecord]) -> None:
        self.records.extend(records)

    @property
    def full(self) -> bool:
        return len(self.records) == self.reference.window

    def scores(self) -> dict[str, float] | None:
        """PSI per feature, for the refusal share (``refused``) and the largest (``overall``); None until full."""
        if not self.full:
            return None
        return window_scores(self.reference, list(self.records))


def window_scores(reference: DriftReference, records: list[KneeRecord]) -> dict[str, float]:
    """The drift scores of ``records`` (any number) against ``reference``: see `DriftWindow.scores`."""
    out: dict[str, float] = {}
    for feat in reference.features:
        values = np.asarray([r.values[feat.name] for r in records if feat.name in r.values], dtype=np.float64)
        # too few graded knees to bin (e.g. nearly all refused): the refusal share speaks for them
        out[feat.name] = psi(np.asarray(feat.shares), feat.counts(values)) if len(values) >= len(feat.shares) else 0.0
    p = reference.refused_share
    out[REFUSED] = psi(
        np.asarray([1 - p, p]), np.asarray([sum(not r.refused for r in records), sum(r.refused for r in records)])
    )
    out[OVERALL] = max(out.values())
    return {k: (v if math.isfinite(v) else 0.0) for k, v in out.items()}
