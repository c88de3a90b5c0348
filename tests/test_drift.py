"""model.drift: PSI on hand-checked cases, the reference, the rolling window, and the committed reference."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from model.checkpoint import load_checkpoint
from model.drift import (
    FEATURES,
    OVERALL,
    REFUSED,
    DriftReference,
    DriftWindow,
    KneeRecord,
    build_reference,
    psi,
    window_scores,
)
from model.paths import ROOT

META = {"model_name": "m", "model_version": "1.0.0", "weights_sha256": "0" * 64, "measured_on": "val"}


def knees(n: int, shift: float = 0.0, refused: float = 0.0, seed: int = 0) -> list[KneeRecord]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if i < refused * n:
            out.append(KneeRecord(True, "not_a_knee"))
        else:
            out.append(KneeRecord(False, None, {f: float(rng.normal(shift, 1.0)) for f in FEATURES}))
    rng.shuffle(out)
    return out


def test_psi_by_hand() -> None:
    assert psi(np.array([0.5, 0.5]), np.array([50, 50])) == pytest.approx(0.0)
    # counts (3, 1) + half a knee per bin -> q = (0.7, 0.3); 0.2 ln(1.4) - 0.2 ln(0.6)
    assert psi(np.array([0.5, 0.5]), np.array([3, 1])) == pytest.approx(0.2 * math.log(1.4) - 0.2 * math.log(0.6))
    with pytest.raises(ValueError, match="one length"):
        psi(np.array([0.5, 0.5]), np.array([1, 2, 3]))


def test_reference_bins_are_deciles_and_survive_a_round_trip(tmp_path: Path) -> None:
    ref = build_reference(knees(1000, refused=0.02), **META, window=100, threshold=0.3)
    for feat in ref.features:
        assert len(feat.edges) == 9 and np.allclose(feat.shares, 0.1, atol=0.01)
    assert ref.refused_share == pytest.approx((20 + 0.5) / 1001)
    loaded = DriftReference.load(ref.save(tmp_path / "r.json"))
    assert loaded == ref and loaded.checksum == ref.checksum
    bad = json.loads((tmp_path / "r.json").read_text()) | {"format": 99}
    with pytest.raises(ValueError, match="format"):
        DriftReference.from_dict(bad)


def test_few_distinct_values_merge_bins() -> None:
    recs = [KneeRecord(False, None, dict.fromkeys(FEATURES, float(i % 3))) for i in range(300)]
    ref = build_reference(recs, **META)
    assert all(len(f.shares) == 3 and min(f.shares) > 0.3 for f in ref.features)


def test_window_is_quiet_on_the_same_data_and_loud_on_a_shift() -> None:
    ref = build_reference(knees(2000, seed=1), **META, window=200)
    window = DriftWindow(ref)
    window.add(knees(199, seed=2))
    assert window.scores() is None  # not full yet
    window.add(knees(1, seed=3))
    same = window.scores()
    assert same is not None and same[OVERALL] < 0.2
    shifted = window_scores(ref, knees(200, shift=1.0, seed=4))
    assert min(shifted[f] for f in FEATURES) > 0.3 and shifted[OVERALL] == max(shifted.values())
    refused = window_scores(ref, knees(200, refused=0.5, seed=5))
    assert refused[REFUSED] > 1.0 and refused[OVERALL] == refused[REFUSED]


def test_the_committed_reference_belongs_to_the_committed_weights() -> None:
    """make drift-reference must run again when the weights change: the reference names their checksum."""
    ref = DriftReference.load(ROOT / "weights" / "oamen.drift.json")
    assert ref.weights_sha256 == hashlib.sha256((ROOT / "weights" / "oamen.ckpt").read_bytes()).hexdigest()
    contract = load_checkpoint(ROOT / "weights" / "oamen.ckpt")["contract"]
    assert (ref.model_name, ref.model_version) == (contract.model_name, contract.model_version)
    assert ref.measured_on == "val" and {f.name for f in ref.features} == set(FEATURES)


def test_the_alert_uses_the_threshold_chosen_on_data() -> None:
    ref = DriftReference.load(ROOT / "weights" / "oamen.drift.json")
    choice = json.loads((ROOT / "docs" / "results" / "drift_choice.json").read_text())
    assert choice["chosen"] == {"window": ref.window, "threshold": ref.threshold}
    rules = yaml.safe_load((ROOT / "deploy" / "monitoring" / "alerts.yml").read_text())
    drift = next(r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "KneeInputDrift")
    assert drift["expr"].strip() == f'koa_drift_score{{feature="overall"}} > {ref.threshold}'
