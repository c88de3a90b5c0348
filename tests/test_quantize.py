"""model.quantize: the grader's trunk in int8 from a committed table of ranges, and when the server uses it."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from handler.service import Predictor
from model import create_model
from model.checkpoint import model_from_checkpoint
from model.decode import decode_image
from model.paths import ROOT
from model.precision import ENV, compiled, int8_trunk_wanted, native_bf16, served_models
from model.preprocess import preprocess
from model.quantize import (
    COMMITTED,
    TableError,
    _prepare,
    calibrate,
    load_table,
    supported,
    trunk_digest,
    with_int8_trunk,
)

CPU = torch.device("cpu")
FIXTURE = ROOT / "tests" / "fixtures" / "knee_kl2.png"
needs_engine = pytest.mark.skipif(not supported(), reason="this torch build has no x86 int8 engine")


@pytest.fixture(scope="module")
def shipped():
    net, contract = model_from_checkpoint(ROOT / "weights" / "oamen.ckpt")
    return net.eval(), contract


@pytest.fixture(scope="module")
def knees(shipped) -> torch.Tensor:
    """The fixture knee, its mirror and two crops of it resized back: four model inputs."""
    _, contract = shipped
    gray = decode_image(FIXTURE.read_bytes())
    h, w = gray.shape
    views = [gray, gray[:, ::-1], gray[h // 8 :, : w - w // 8], gray[: h - h // 10, w // 10 :]]
    return torch.from_numpy(np.stack([preprocess(np.ascontiguousarray(v), contract) for v in views]))


def test_the_committed_table_fits_the_committed_weights(shipped) -> None:
    """A retrained model without a new table (make int8-trunk) fails here, not silently in the server."""
    net, _ = shipped
    table = json.loads((ROOT / COMMITTED).read_text())
    assert table["trunk_sha256"] == trunk_digest(net)
    assert table["images"] >= 100 and len(table["ranges"]) > 10


@needs_engine
def test_a_table_rebuilds_exactly_the_calibrated_trunk(shipped, knees) -> None:
    """The min/max written to the table give back the histogram observers' own scales and zero points."""
    from torch.ao.quantization.quantize_fx import convert_fx

    net, _ = shipped
    prepared = _prepare(net, True, knees[:1])
    with torch.inference_mode():
        prepared(knees)
    direct = convert_fx(prepared)
    rebuilt = with_int8_trunk(net, calibrate(net, [knees])).int8_trunk
    with torch.inference_mode():
        for a, b in zip(direct(knees), rebuilt(knees), strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


@needs_engine
def test_the_int8_trunk_answers_as_float32(shipped, knees) -> None:
    net, contract = shipped
    table = load_table(ROOT / COMMITTED)
    int8 = compiled(with_int8_trunk(net, table), knees[:1])
    fp32 = compiled(net, knees[:1])
    x = knees.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        a, b = fp32.forward_with_gate(x), int8.forward_with_gate(x)
    assert not torch.equal(a, b)  # it did run in int8
    pa, pb = a[:, :5].softmax(1), b[:, :5].softmax(1)
    assert float((pa - pb).abs().max()) < 0.02
    assert torch.equal(pa.argmax(1), pb.argmax(1))
    # the knee gate's score moves little against its threshold (on val: by 2.6 at most, docs/results/int8_trunk.json)
    assert float((a[:, -1] - b[:, -1]).abs().max()) < 0.15 * contract.postprocess.gate_threshold
    assert net.int8_trunk is None  # the model it was made from is left as it was


@needs_engine
def test_the_served_answer_is_the_same_through_the_request_path(shipped, monkeypatch) -> None:
    net, contract = shipped
    monkeypatch.setenv(ENV, "int8")
    scripted = torch.jit.trace(net, torch.zeros(1, 1, contract.input_size, contract.input_size))
    answers = {}
    for name, table in (("fp32", None), ("int8", load_table(ROOT / COMMITTED))):
        eager, fast, _ = served_models(scripted, contract, CPU, table)
        pred = Predictor(fast, eager, contract, CPU)
        answers[name] = pred.handle([{"body": FIXTURE.read_bytes()}], [{}])[0]
    (s0, a), (s1, b) = answers["fp32"], answers["int8"]
    assert s0 == s1 == 200 and a["kl_grade"] == b["kl_grade"]
    assert max(abs(p - q) for p, q in zip(a["probabilities"], b["probabilities"], strict=True)) < 0.02


def test_a_table_for_other_weights_or_another_model_is_refused(shipped, caplog) -> None:
    net, contract = shipped
    table = load_table(ROOT / COMMITTED)
    other = create_model("oamen_pt").eval()
    with pytest.raises(TableError, match="other trunk weights"):
        with_int8_trunk(other, table)
    with pytest.raises(TableError, match="only OA-MEN"):
        with_int8_trunk(create_model("resnet18").eval(), table)
    with pytest.raises(TableError, match="not an int8-trunk-v1 table"):
        with_int8_trunk(net, {**table, "format": "int4"})
    # the server logs it and serves float32: the same logits as without a table
    scripted = torch.jit.trace(other, torch.zeros(1, 1, contract.input_size, contract.input_size))
    x = torch.randn(2, 1, contract.input_size, contract.input_size).contiguous(memory_format=torch.channels_last)
    with caplog.at_level(logging.WARNING, logger="model.precision"):
        _, fast, _ = served_models(scripted, contract, CPU, table)
    if int8_trunk_wanted(CPU):
        assert "float32 served" in caplog.text
    _, plain, _ = served_models(scripted, contract, CPU, None)
    with torch.inference_mode():
        torch.testing.assert_close(fast.forward_with_gate(x), plain.forward_with_gate(x))


def test_a_missing_or_unreadable_table_means_float32(tmp_path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="model.quantize"):
        assert load_table(tmp_path / "absent.json") is None
        bad = tmp_path / "bad.json"
        bad.write_text("{not json")
        assert load_table(bad) is None
    assert "stays in float32" in caplog.text


def test_when_the_trunk_runs_in_int8(monkeypatch) -> None:
    monkeypatch.setenv(ENV, "fp32")
    assert not int8_trunk_wanted(CPU)
    monkeypatch.setenv(ENV, "bf16")
    assert not int8_trunk_wanted(CPU)
    monkeypatch.setenv(ENV, "int8")
    assert int8_trunk_wanted(CPU) and not int8_trunk_wanted(torch.device("cuda"))
    monkeypatch.setenv(ENV, "auto")
    assert int8_trunk_wanted(CPU) == (not native_bf16(CPU) and supported())
    assert not int8_trunk_wanted(torch.device("cuda"))
