"""The handler's request path without a server: parsing, per-request errors, batching, explanations.

Uses a small OA-MEN exported to TorchScript by the real export code and TorchServe's own
Context/RequestProcessor classes, so the handler sees what a worker would give it.
"""

from __future__ import annotations

import base64
import json

import cv2
import numpy as np
import pytest
import torch
from ts.context import Context, RequestProcessor

from handler.drain import BUSY_PREFIX, DRAIN_FILE, RETRY_AFTER_S, STATE_ENV, DrainGate
from handler.koa_handler import KOAHandler
from handler.service import Predictor, RequestError, parse_request
from model import create_model
from model.checkpoint import load_torchscript, save_checkpoint
from model.contract import InputContract
from train.export import export

CONTRACT = InputContract(model_name="oamen_lite", input_size=64, model_version="9.9.9")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> str:
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("model")
    ckpt = save_checkpoint(d / "m.ckpt", create_model("oamen_lite").eval(), CONTRACT)
    return str(export(ckpt, d / "oamen.pt"))


@pytest.fixture(scope="module")
def predictor(exported) -> Predictor:
    scripted, contract = load_torchscript(exported)
    eager = create_model(contract.model_name)
    eager.load_state_dict(scripted.state_dict())
    return Predictor(scripted, eager.eval(), contract, torch.device("cpu"))


def png(shape=(80, 120), seed=0) -> bytes:
    img = np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)
    return cv2.imencode(".png", img)[1].tobytes()


# --- parsing -------------------------------------------------------------------------------


def test_raw_body_and_explain_header():
    req = parse_request({"body": b"abc"}, {"explain": "True"}, CONTRACT)
    assert req.image == b"abc" and req.explain and req.method == "gradcam" and req.target is None


def test_multipart_fields_override_header():
    req = parse_request(
        {"data": b"abc", "explain": b"false", "target": b"KL3", "method": b"ig"}, {"explain": "True"}, CONTRACT
    )
    assert (req.explain, req.target, req.method) == (False, 3, "ig")


def test_json_with_base64_image():
    body = {"image": base64.b64encode(b"\x89PNG...").decode(), "explain": True, "target": 4}
    req = parse_request({"body": body}, {}, CONTRACT)
    assert req.image == b"\x89PNG..." and req.explain and req.target == 4


@pytest.mark.parametrize(
    "row, match",
    [
        ({}, "empty request"),
        ({"foo": b"x"}, "no image found"),
        ({"body": {"image": "not base64!!"}}, "not valid base64"),
        ({"body": {"picture": "AAAA"}}, "base64 string"),
        ({"body": "some text"}, "arrived as text"),
        ({"body": b""}, "empty image"),
        ({"body": b"x", "target": b"7"}, "target must be"),
        ({"body": b"x", "target": b"KL9"}, "target must be"),
        ({"body": b"x", "method": b"lime"}, "method must be"),
        ({"body": b"x", "explain": b"maybe"}, "explain must be"),
    ],
)
def test_bad_requests_raise_request_error(row, match):
    with pytest.raises(RequestError, match=match):
        parse_request(row, {}, CONTRACT)


def test_invalid_json_body_is_named():
    with pytest.raises(RequestError, match="not valid JSON"):
        parse_request({"body": b"{broken"}, {"body": {"content-type": "application/json"}}, CONTRACT)


# --- batches -------------------------------------------------------------------------------


def test_batch_with_a_bad_image_answers_the_others(predictor):
    rows = [{"body": png(seed=1)}, {"body": b"not an image"}, {"body": png((300, 200), seed=2)}]
    answers = predictor.handle(rows, [{}, {}, {}])
    statuses = [s for s, _ in answers]
    assert statuses == [200, 400, 200]
    bad = answers[1][1]["error"]
    assert bad["status"] == 400 and "accepted" in bad["message"]
    for _, body in (answers[0], answers[2]):
        p = np.array(body["probabilities"])
        assert p.shape == (5,) and abs(p.sum() - 1) < 1e-4
        assert body["kl_grade"] == int(p.argmax())
        assert body["oa_probability"] == pytest.approx(p[2:].sum(), abs=1e-5)
        assert body["model"] == {"name": "oamen_lite", "version": "9.9.9"}
        assert body["label"].startswith(body["class_name"])


def test_batched_equals_single(predictor):
    rows = [{"body": png(seed=s)} for s in range(3)]
    batched = [b["probabilities"] for _, b in predictor.handle(rows, [{}] * 3)]
    single = [predictor.handle([r], [{}])[0][1]["probabilities"] for r in rows]
    np.testing.assert_allclose(batched, single, atol=1e-5)


def test_each_request_is_explained_on_its_own(predictor):
    rows = [
        {"body": png(seed=3), "explain": b"true", "target": b"4"},
        {"body": png(seed=3)},
        {"body": png(seed=3), "explain": b"true", "method": b"ig", "target": b"1"},
    ]
    answers = predictor.handle(rows, [{}] * 3)
    assert [s for s, _ in answers] == [200, 200, 200]
    first, plain, ig = (b for _, b in answers)
    assert "explanation" not in plain
    assert (first["explanation"]["method"], first["explanation"]["target"]) == ("gradcam", 4)
    assert (ig["explanation"]["method"], ig["explanation"]["target"]) == ("ig", 1)
    for body in (first, ig):
        grid = np.array(body["explanation"]["grid"])
        assert grid.shape == (16, 16) and grid.min() >= 0 and grid.max() <= 1
        overlay = cv2.imdecode(np.frombuffer(base64.b64decode(body["explanation"]["overlay_png"]), np.uint8), 1)
        assert overlay.shape == (64, 64, 3)


def test_explanation_defaults_to_the_predicted_grade(predictor):
    ((_, body),) = predictor.handle([{"body": png(seed=5)}], [{"explain": "True"}])
    assert body["explanation"]["target"] == body["kl_grade"]


# --- the TorchServe entry point ------------------------------------------------------------


def _handler(exported: str, model_dir) -> tuple[KOAHandler, Context]:
    import shutil

    shutil.copy(exported, model_dir / "oamen.pt")
    manifest = {"model": {"modelName": "oamen", "serializedFile": "oamen.pt", "handler": "koa_handler.py"}}
    ctx = Context("oamen", str(model_dir), manifest, 4, None, "0.12.0")
    handler = KOAHandler()
    handler.initialize(ctx)
    return handler, ctx


def test_handler_through_a_torchserve_context(exported, tmp_path, monkeypatch):
    monkeypatch.delenv(STATE_ENV, raising=False)
    handler, ctx = _handler(exported, tmp_path)
    assert handler.predictor.contract == CONTRACT and handler.device.type == "cpu"
    ctx.request_processor = [RequestProcessor({}), RequestProcessor({"explain": "True"}), RequestProcessor({})]
    out = handler.handle([{"body": png(seed=1)}, {"body": png(seed=2)}, {"body": b"\x89PNG\r\n\x1a\ntruncated"}], ctx)
    assert len(out) == 3
    bodies = [json.loads(o) for o in out]
    assert ctx.get_response_status(0)[0] == 200 and ctx.get_response_status(2)[0] == 400
    assert "explanation" in bodies[1] and "explanation" not in bodies[0]
    assert "error" in bodies[2]
    assert ctx.get_response_content_type(0) == "application/json"


def test_a_draining_handler_answers_503_with_retry_after(exported, tmp_path, monkeypatch):
    state = tmp_path / "state"
    state.mkdir()
    monkeypatch.setenv(STATE_ENV, str(state))
    handler, ctx = _handler(exported, tmp_path)
    ctx.request_processor = [RequestProcessor({}), RequestProcessor({})]
    batch = [{"body": png(seed=1)}, {"body": png(seed=2)}]
    handler.handle(batch, ctx)
    assert [ctx.get_response_status(i)[0] for i in range(2)] == [200, 200]
    (state / DRAIN_FILE).touch()
    bodies = [json.loads(o) for o in handler.handle(batch, ctx)]
    assert [ctx.get_response_status(i)[0] for i in range(2)] == [503, 503]
    assert all(b["error"]["type"] == "restarting" and "again" in b["error"]["message"] for b in bodies)
    assert ctx.get_response_headers(1)["Retry-After"] == str(RETRY_AFTER_S)
    assert not list(state.glob(f"{BUSY_PREFIX}*")), "the busy file outlived the batch"


def test_drain_gate_holds_busy_only_during_a_batch(tmp_path, monkeypatch):
    monkeypatch.delenv(STATE_ENV, raising=False)
    with DrainGate().batch() as draining:  # no state folder: a no-op
        assert draining is False
    gate = DrainGate(tmp_path)
    with gate.batch() as draining:
        assert draining is False and gate.busy.is_file()
    assert not gate.busy.exists()
    (tmp_path / DRAIN_FILE).touch()
    with pytest.raises(RuntimeError), gate.batch() as draining:
        assert draining is True
        raise RuntimeError("a failing batch still releases busy")
    assert not gate.busy.exists()


def test_warm_up_runs_every_power_of_two_batch_and_the_largest_twice():
    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x):
            seen.append(tuple(x.shape))
            return x

    handler = KOAHandler()
    handler.device = torch.device("cpu")
    assert handler.warm_up(Recorder(), CONTRACT, 12) >= 0
    shape = (CONTRACT.channels, CONTRACT.input_size, CONTRACT.input_size)
    assert seen == [(b, *shape) for b in (1, 1, 2, 2, 4, 4, 8, 8, 12, 12)]


def test_malloc_settings_apply_on_glibc_and_can_be_turned_off(monkeypatch):
    import platform

    from handler.memory import ENV, keep_freed_memory

    monkeypatch.setenv(ENV, "default")
    assert keep_freed_memory() is False
    monkeypatch.delenv(ENV)
    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is expected
