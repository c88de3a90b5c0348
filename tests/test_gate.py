"""model.gate (the knee gate) and its fitting in train.calibrate, on small hand-checkable cases.

The shipped gate on real images is tested in tests/test_shipped_model.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.checkpoint import model_from_checkpoint, save_checkpoint
from model.contract import InputContract
from model.gate import KneeGate, MahalanobisScore
from model.registry import create_model
from train.knee_gate import fit_gate, fit_knee_gate


def test_a_layer_scores_the_distance_to_the_nearest_class() -> None:
    layer = MahalanobisScore(num_features=2, num_classes=2)
    layer.set_statistics(torch.tensor([[0.0, 0.0], [10.0, 0.0]]), torch.eye(2) * 0.25)
    scores = layer(torch.tensor([[1.0, 0.0], [9.0, 2.0], [5.0, 0.0]]))
    torch.testing.assert_close(scores, torch.tensor([0.25, 1.25, 6.25]))
    with pytest.raises(ValueError, match="do not fit"):
        layer.set_statistics(torch.zeros(3, 2), torch.eye(2))


def test_the_gate_takes_the_largest_standardised_layer_score() -> None:
    gate = KneeGate([2, 1], num_classes=1)
    assert not bool(gate.fitted)
    gate.set_statistics(0, torch.zeros(1, 2), torch.eye(2))
    gate.set_statistics(1, torch.zeros(1, 1), torch.eye(1))
    gate.set_standardisation(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0]))
    assert bool(gate.fitted)
    a = torch.tensor([[3.0, 0.0], [0.0, 1.0]])  # raw 9 and 1 -> z 8 and 0
    b = torch.tensor([[2.0], [6.0]])  # raw 4 and 36 -> z 0.5 and 8.5
    torch.testing.assert_close(gate.layer_scores([a, b]), torch.tensor([[9.0, 4.0], [1.0, 36.0]]))
    torch.testing.assert_close(gate([a, b]), torch.tensor([8.0, 8.5]))
    with pytest.raises(ValueError, match="2 feature layers"):
        gate([a])
    with pytest.raises(ValueError, match="positive"):
        gate.set_standardisation(torch.zeros(2), torch.zeros(2))


def test_fitted_gate_separates_what_it_was_fitted_on_from_the_rest() -> None:
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, 900)
    centres = rng.normal(0, 3, (3, 16))
    knees = centres[labels] + rng.normal(0, 1, (900, 16))
    others = rng.normal(0, 1, (200, 16)) + 8.0
    means, precision = fit_gate(knees, labels, 3)
    gate = KneeGate([16], 3)
    gate.set_statistics(0, torch.from_numpy(means), torch.from_numpy(precision))
    gate.set_standardisation(torch.zeros(1), torch.ones(1))
    s_knee = gate([torch.from_numpy(knees).float()]).numpy()
    s_other = gate([torch.from_numpy(others).float()]).numpy()
    threshold = np.quantile(s_knee, 0.99)
    assert (s_other > threshold).mean() > 0.99


def test_fit_knee_gate_standardises_on_the_reference_knees() -> None:
    rng = np.random.default_rng(5)
    net = create_model("oamen_nomobile", num_classes=3)  # gate layers c5 (512) and fused (128)
    dims = net.knee_gate.layer_dims
    labels = rng.integers(0, 3, 1500)
    fit = [rng.normal(0, 1, (1500, d)) + labels[:, None] for d in dims]
    ref = [rng.normal(0, 1, (300, d)) + 1.0 for d in dims]
    scores = fit_knee_gate(net, [f.astype(np.float32) for f in fit], labels, [r.astype(np.float32) for r in ref], 3)
    assert bool(net.knee_gate.fitted) and scores.shape == (300,)
    raw = net.knee_gate.layer_scores([torch.from_numpy(r).float() for r in ref]).numpy()
    z = (raw - raw.mean(0)) / raw.std(0)
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(scores, z.max(1), rtol=1e-4, atol=1e-4)


def test_forward_with_gate_is_the_logits_then_the_gate_score() -> None:
    net = create_model("oamen_pt").eval()
    assert net.cfg.gate_layers == ("c5", "fused", "mobile_s4", "mobile")
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        out = net.forward_with_gate(x)
        pooled, taps = net.forward_gate_features(x)
    assert out.shape == (2, 6)
    torch.testing.assert_close(out[:, :5], net(x))
    torch.testing.assert_close(pooled, net.forward_features(x))
    assert [t.shape[1] for t in taps] == list(net.knee_gate.layer_dims) == [256, 64, 112, 1280]
    torch.testing.assert_close(taps[3], pooled[:, -1280:])  # the branch's pooled output
    torch.testing.assert_close(out[:, 5], torch.zeros(2))  # unfitted: scores 0, refuses nothing


def test_a_variant_without_the_layer_is_refused() -> None:
    with pytest.raises(ValueError, match="does not exist"):
        create_model("oamen_nomobile", gate_layers=("c5", "mobile"))


def test_an_old_single_layer_gate_is_not_loaded_silently(tmp_path) -> None:
    net = create_model("oamen_nomobile", num_classes=5)
    contract = InputContract(model_name="oamen_nomobile")
    state = net.state_dict()
    old = {k: v for k, v in state.items() if not k.startswith("knee_gate.")}
    old |= {"knee_gate.means": torch.zeros(5, 640), "knee_gate.precision": torch.eye(640)}

    class Holder(torch.nn.Module):
        def __init__(self, sd):
            super().__init__()
            self.sd = sd

        def state_dict(self, *a, **k):
            return self.sd

    no = {"knee_gate.fitted": torch.tensor(False)}
    unfitted = save_checkpoint(tmp_path / "unfitted.pt", Holder(old | no), contract)
    loaded, _ = model_from_checkpoint(unfitted)  # an old checkpoint before calibration: loads, gate unfitted
    assert not bool(loaded.knee_gate.fitted)
    fitted = save_checkpoint(tmp_path / "fitted.pt", Holder(old | {"knee_gate.fitted": torch.tensor(True)}), contract)
    with pytest.raises(RuntimeError, match="train.calibrate"):
        model_from_checkpoint(fitted)
