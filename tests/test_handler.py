"""The handler's request path without a server: parsing, per-request errors, batching, explanations.

Uses a small OA-MEN exported to TorchScript by the real export code and TorchServe's own
Context/RequestProcessor classes, so the handler sees what a worker would give it.
"""

from __future__ import annotations

import base64
import json
import struct
import time
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from ts.context import Context, RequestProcessor
from ts.protocol.otf_message_handler import create_predict_response

from handler.drain import BUSY_PREFIX, DRAIN_FILE, RETRY_AFTER_S, STATE_ENV, DrainGate
from handler.explain import DEFAULT_METHOD
from handler.koa_handler import EARLY_ENV, KOAHandler
from handler.service import Predictor, RequestError, parse_request
from model import create_model
from model.checkpoint import load_torchscript
from model.contract import InputContract
from model.decode import DecodeError
from model.paths import ROOT
from tests.conftest import TINY_CONTRACT_ARGS

CONTRACT = InputContract(**TINY_CONTRACT_ARGS)  # the `exported` fixture's (tests/conftest.py)


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
    assert req.image == b"abc" and req.explain and req.method == DEFAULT_METHOD and req.target is None


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
        ({"\ufffdPNG\r\n\x1a\n" + "x" * 500: b""}, "needs a Content-Type"),  # curl's default form type
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
        assert body["model"] == {"name": "oamen_lite", "version": "9.9.9", "profile": {"name": "default"}}
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
    assert (first["explanation"]["method"], first["explanation"]["target"]) == (DEFAULT_METHOD, 4)
    assert (ig["explanation"]["method"], ig["explanation"]["target"]) == ("ig", 1)
    for body in (first, ig):
        grid = np.array(body["explanation"]["grid"])
        assert grid.shape == (16, 16) and grid.min() >= 0 and grid.max() <= 1
        # Rounded as written on the wire: 0.481, never float32's 0.48100000619888306.
        assert all(len(repr(v)) <= 5 for row in body["explanation"]["grid"] for v in row), body["explanation"]["grid"]
        overlay = cv2.imdecode(np.frombuffer(base64.b64decode(body["explanation"]["overlay_png"]), np.uint8), 1)
        assert overlay.shape == (80, 120, 3)  # the crop's own size, not the model's 64 x 64 input


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


@pytest.mark.parametrize(("fused", "sizes"), [(False, (1, 2, 3)), (True, (1, 2, 4))])
def test_warm_up_runs_the_finder_and_the_mirrored_grader_twice_at_every_served_batch_size(fused, sizes):
    """Unfused at each batch size up to the largest; fused at the sizes a batch is padded to."""
    from model.localize import FinderConfig

    seen: list[tuple[str, tuple[int, ...], bool]] = []

    class Recorder(torch.nn.Module):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        def forward(self, x):
            seen.append((self.name, tuple(x.shape), x.is_contiguous(memory_format=torch.channels_last)))
            return x

    # three channels, so that channels-last memory differs from contiguous and the layout is checked
    contract = CONTRACT.replace(channels=3, mean=(0.5,) * 3, std=(0.5,) * 3, postprocess={"flip_tta": True})
    cfg = FinderConfig(input_size=32)
    pred = Predictor(Recorder("grader"), Recorder("eager"), contract, torch.device("cpu"), (Recorder("finder"), cfg))
    torch.jit.enable_onednn_fusion(fused)  # put back after the test (tests/conftest.py)
    assert pred.warm_up(3) >= 0
    shape = (contract.channels, contract.input_size, contract.input_size)
    expected = []
    for n in sizes:
        expected += [("grader", (2 * n, *shape), True)] * 2 + [("finder", (n, 1, 32, 32), True)] * 2
    assert seen == expected


def test_malloc_settings_apply_on_glibc_and_can_be_turned_off(monkeypatch):
    import platform

    from handler.memory import ENV, keep_freed_memory

    monkeypatch.setenv(ENV, "default")
    assert keep_freed_memory() is False
    monkeypatch.delenv(ENV)
    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is expected


# --- early answers: a batch's plain predictions do not wait for its explanations -----------

GRPC_EXPLAIN = {"data": {"content-type": ""}, "explain": {"content-type": ""}}  # what a gRPC call's headers hold
REST = {"explain": "False", "url_path": ""}  # TorchServe adds these to every REST request
ATTRIBUTION_S = 0.2


class FakeSocket:
    """The worker's socket to the frontend: keeps every message ``answer_early`` sends."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.messages.append(bytes(data))


def decode_message(msg: bytes) -> list[dict]:
    """A predict response as the frontend reads it (ts/protocol/otf_message_handler.py, the other way round)."""
    pos = 0

    def take_int() -> int:
        nonlocal pos
        (value,) = struct.unpack("!i", msg[pos : pos + 4])
        pos += 4
        return value

    def take_bytes() -> bytes:
        nonlocal pos
        n = take_int()
        pos += n
        return msg[pos - n : pos]

    assert take_int() == 200
    take_bytes()  # the message text
    predictions = []
    while True:
        n = take_int()
        if n == -1:
            break
        req_id = msg[pos : pos + n].decode()
        pos += n
        content_type = take_bytes().decode()
        status, _phrase = take_int(), take_bytes()
        headers = {take_bytes().decode(): take_bytes().decode() for _ in range(take_int())}
        predictions.append(
            {"id": req_id, "content_type": content_type, "status": status, "headers": headers, "body": take_bytes()}
        )
    assert pos == len(msg)
    return predictions


def frontend(messages: list[bytes]) -> dict[str, tuple[int, bytes]]:
    """What TorchServe 0.12's frontend makes of a batch's messages (Java ``BatchAggregator.sendResponse``,
    ``RestJob.responseInference``): the status and whole body each client gets, by request id.

    Checks the rules a second message depends on: a batch stays open only while a message holds a stream
    that goes on; a request is answered once, whole (no ``ts_stream_next``) or as one stream.
    """
    done: dict[str, tuple[int, bytes]] = {}
    streams: dict[str, tuple[int, bytes]] = {}
    for k, msg in enumerate(messages):
        goes_on = False
        for p in decode_message(msg):
            assert p["id"] not in done, f"{p['id']} answered twice"
            assert p["content_type"] == "application/json"
            nxt = p["headers"].get("ts_stream_next")
            if nxt is None:
                assert p["id"] not in streams, f"{p['id']} began a stream, then got a whole answer"
                done[p["id"]] = (p["status"], p["body"])
            elif nxt == "true":
                goes_on = True
                status, body = streams.get(p["id"], (p["status"], b""))
                streams[p["id"]] = (status, body + p["body"])
            else:
                status, body = streams.pop(p["id"])
                done[p["id"]] = (status, body + p["body"])
        last = k == len(messages) - 1
        assert goes_on != last, "only the last message may end the batch"
    assert not streams, f"streams left open: {sorted(streams)}"
    return done


def run_batch(
    handler: KOAHandler, ctx: Context, rows: list[dict], headers: list[dict], sock: FakeSocket | None = None
) -> tuple[list[str], list[bytes]]:
    """``handler.handle`` as a worker runs it (ts.service.Service.predict): request ids, socket, then the
    final message from what ``handle`` returns. Returns (handle's list, the messages)."""
    ctx.request_processor = [RequestProcessor(dict(h)) for h in headers]
    ctx.request_ids = {i: f"req-{i}" for i in range(len(rows))}
    ctx.cl_socket = sock or FakeSocket()
    out = handler.handle(rows, ctx)
    assert len(out) == len(rows)
    final = create_predict_response(out, ctx.request_ids, "Prediction success", 200, context=ctx)
    return out, [*ctx.cl_socket.messages, final]


@pytest.fixture()
def slow_attribution(monkeypatch) -> SimpleNamespace:
    """Captum stubbed by a slow, fixed heat map; ``calls`` holds (messages in ``sock`` so far, method) per call."""
    stub = SimpleNamespace(sock=FakeSocket(), calls=[])

    def attribute(net, x, target, method="gradcam", ig_steps=16):
        stub.calls.append((len(stub.sock.messages), method))
        time.sleep(ATTRIBUTION_S)
        return np.linspace(0, 1, x.shape[-1] * x.shape[-2], dtype=np.float32).reshape(x.shape[-2:])

    monkeypatch.setattr("handler.service.attribute", attribute)
    return stub


def test_a_batch_answers_its_plain_predictions_before_its_explanations(
    exported, tmp_path, monkeypatch, slow_attribution
):
    monkeypatch.delenv(STATE_ENV, raising=False)
    monkeypatch.delenv(EARLY_ENV, raising=False)
    handler, ctx = _handler(exported, tmp_path)
    rows = [
        {"body": png(seed=1)},
        {"body": png(seed=2), "explain": b"true", "method": b"ig"},
        {"body": b"not an image"},
        {"body": png(seed=3), "explain": b"true", "method": b"gradcam"},
        {"body": png(seed=4), "explain": b"true", "method": b"ig"},
        {"body": png(seed=5)},
    ]
    headers = [REST, REST, REST, REST, GRPC_EXPLAIN, REST]
    out, messages = run_batch(handler, ctx, rows, headers, slow_attribution.sock)
    # The plain answers and the bad request left before the first explanation began, request 1's
    # explanation before request 3's began; the last REST request (3) carried the batch open.
    assert slow_attribution.calls == [(1, "ig"), (2, "gradcam"), (2, "ig")]
    assert [len(decode_message(m)) for m in messages] == [4, 2, 2]
    assert {p["id"] for p in decode_message(messages[0])} == {"req-0", "req-2", "req-5", "req-3"}
    assert {p["id"] for p in decode_message(messages[1])} == {"req-1", "req-3"}
    assert {p["id"] for p in decode_message(messages[2])} == {"req-3", "req-4"}
    answers = frontend(messages)
    assert {k: s for k, (s, _) in answers.items()} == {f"req-{i}": (400 if i == 2 else 200) for i in range(6)}
    bodies = {k: json.loads(b) for k, (_, b) in answers.items()}
    assert all("explanation" not in bodies[f"req-{i}"] for i in (0, 5)) and "error" in bodies["req-2"]
    assert [bodies[f"req-{i}"]["explanation"]["method"] for i in (1, 3, 4)] == ["ig", "gradcam", "ig"]
    # The same answers as a batch answered all at once (the handler's list, which the final message reads).
    assert bodies == {f"req-{i}": json.loads(o) for i, o in enumerate(out)}


def test_the_first_explanation_starts_after_the_plain_answers_left(exported, tmp_path, monkeypatch, slow_attribution):
    monkeypatch.delenv(STATE_ENV, raising=False)
    monkeypatch.delenv(EARLY_ENV, raising=False)
    handler, ctx = _handler(exported, tmp_path)
    rows = [{"body": png(seed=1), "explain": b"true", "method": b"ig"}, {"body": png(seed=2)}, {"body": png(seed=3)}]
    sock = slow_attribution.sock
    ctx.request_processor = [RequestProcessor(dict(REST)) for _ in rows]
    ctx.request_ids = {i: f"req-{i}" for i in range(3)}
    ctx.cl_socket = sock
    handler.handle(rows, ctx)
    assert slow_attribution.calls == [(1, "ig")], "the explanation began before the plain answers were sent"
    sent = {p["id"]: p for p in decode_message(sock.messages[0])}
    assert sent["req-1"]["status"] == sent["req-2"]["status"] == 200
    assert "ts_stream_next" not in sent["req-1"]["headers"]
    assert sent["req-0"]["headers"]["ts_stream_next"] == "true" and sent["req-0"]["body"] == b""
    assert ctx.request_ids == {0: "req-0"}, "answered requests must leave the final message"


def test_early_answers_can_be_turned_off(exported, tmp_path, monkeypatch, slow_attribution):
    monkeypatch.delenv(STATE_ENV, raising=False)
    monkeypatch.setenv(EARLY_ENV, "0")
    handler, ctx = _handler(exported, tmp_path)
    rows = [{"body": png(seed=1), "explain": b"true", "method": b"ig"}, {"body": png(seed=2)}]
    _, messages = run_batch(handler, ctx, rows, [REST, REST])
    assert len(messages) == 1 and set(frontend(messages)) == {"req-0", "req-1"}


def test_without_a_rest_request_to_carry_the_batch_all_is_answered_at_once(
    exported, tmp_path, monkeypatch, slow_attribution
):
    # A gRPC call ends at its first message, so it cannot hold the batch open: answers wait, as before.
    monkeypatch.delenv(STATE_ENV, raising=False)
    monkeypatch.delenv(EARLY_ENV, raising=False)
    handler, ctx = _handler(exported, tmp_path)
    rows = [{"data": png(seed=1), "explain": b"true"}, {"body": png(seed=2)}]
    _, messages = run_batch(handler, ctx, rows, [GRPC_EXPLAIN, REST])
    assert len(messages) == 1
    answers = frontend(messages)
    assert "explanation" in json.loads(answers["req-0"][1]) and answers["req-1"][0] == 200


def test_a_failure_after_early_answers_fails_only_the_rest(exported, tmp_path, monkeypatch):
    monkeypatch.delenv(STATE_ENV, raising=False)
    monkeypatch.delenv(EARLY_ENV, raising=False)
    handler, ctx = _handler(exported, tmp_path)

    def answers(rows, headers):
        yield {0: (200, {"kl_grade": 0})}
        raise RuntimeError("boom")

    monkeypatch.setattr(handler.predictor, "answers", answers)
    out, messages = run_batch(handler, ctx, [{"body": b"x"}, {"body": b"y"}, {"body": b"z"}], [REST] * 3)
    answers_ = frontend(messages)
    assert answers_["req-0"] == (200, json.dumps({"kl_grade": 0}).encode())
    assert answers_["req-1"][0] == 500 and json.loads(answers_["req-1"][1])["error"]["status"] == 500
    # The carrier's status left with its first (empty) chunk: its failure is told in the body, as over gRPC.
    assert answers_["req-2"][0] == 200 and json.loads(answers_["req-2"][1])["error"]["status"] == 500


def test_predictor_answers_plain_requests_first_then_each_explanation(predictor, monkeypatch, slow_attribution):
    rows = [
        {"body": png(seed=1), "explain": b"true"},
        {"body": png(seed=2)},
        {"body": b"nope"},
        {"body": png(seed=3), "explain": b"true", "method": b"ig"},
    ]
    groups = list(predictor.answers(rows, [{}] * 4))
    assert [sorted(g) for g in groups] == [[1, 2], [0], [3]]
    assert groups[0][1][0] == 200 and groups[0][2][0] == 400 and groups[2][3][1]["explanation"]["method"] == "ig"


def test_a_decode_error_keeps_its_status_and_kind(predictor, monkeypatch):
    class Unsupported(DecodeError):
        status = 415
        kind = "unsupported_transfer_syntax"

    def decode(data, max_pixels=None, knee_only=False):
        raise Unsupported("JPEG 2000 DICOM is not decoded here")

    monkeypatch.setattr("handler.service.decode_image", decode)
    ((status, body),) = predictor.handle([{"body": b"DICM"}], [{}])
    assert status == 415 and body["error"] == {
        "status": 415,
        "type": "unsupported_transfer_syntax",
        "message": "JPEG 2000 DICOM is not decoded here",
    }


# --- answer schema v2: calibration, ordinal decoding, uncertain flag, the knee gate ----------------------------


def _predictor_with(exported: str, **post) -> Predictor:
    """The test model with another postprocess in its contract (as train.calibrate writes it)."""
    scripted, contract = load_torchscript(exported)
    eager = create_model(contract.model_name)
    eager.load_state_dict(scripted.state_dict())
    return Predictor(scripted, eager.eval(), contract.replace(postprocess=post), torch.device("cpu"))


def test_a_padded_batch_answers_each_knee_and_its_mirror_as_alone(exported):
    """With oneDNN Graph fusion on, a batch of 3 runs padded to 4 (model.precision.served_batch): each row's
    logits, mirror averaged, and knee gate score are those of the knee graded alone."""
    pred = _predictor_with(exported, flip_tta=True)
    torch.jit.enable_onednn_fusion(True)  # put back after the test (tests/conftest.py)
    x = torch.randn(3, CONTRACT.channels, CONTRACT.input_size, CONTRACT.input_size)
    batch = pred.outputs(x.contiguous(memory_format=torch.channels_last))
    for j in range(3):
        alone = pred.outputs(x[j : j + 1].contiguous(memory_format=torch.channels_last))
        for key in ("probabilities", "gate_scores"):
            np.testing.assert_allclose(batch[key][j], alone[key][0], rtol=1e-4, atol=1e-5)


def test_answers_follow_the_schema(predictor):
    from koa_client.schema import SCHEMA_VERSION, validate_answer

    (status, body), (_, explained) = predictor.handle(
        [{"body": png(seed=1)}, {"body": png(seed=2), "explain": b"true"}], [{}, {}]
    )
    assert status == 200 and body["schema_version"] == SCHEMA_VERSION
    assert "knees" not in body  # without a finder every image is a joint crop: one grade
    validate_answer(body)
    validate_answer(explained, explain=True)
    assert body["confidence"] == body["probabilities"][body["kl_grade"]]
    assert body["uncertain"] is False  # the test contract flags nothing (uncertain_below 0)


def test_temperature_cutpoints_and_flag_come_from_the_contract(predictor, exported):
    from model.postprocess import calibrated_probabilities, decode_grades

    rows = [{"body": png(seed=s)} for s in range(4)]
    plain = [b for _, b in predictor.handle(rows, [{}] * 4)]
    post = {"temperature": 3.0, "decision": "cutpoints", "cutpoints": [0.2, 0.4, 0.6, 3.9], "uncertain_below": 0.99}
    tuned = [b for _, b in _predictor_with(exported, **post).handle(rows, [{}] * 4)]
    cfg = _predictor_with(exported, **post).contract.postprocess
    for a, b in zip(plain, tuned, strict=True):
        logits = np.log(np.array(a["probabilities"]))[None]  # logits up to a constant
        expected = calibrated_probabilities(logits, cfg)
        np.testing.assert_allclose(b["probabilities"], expected[0], atol=2e-4)
        assert b["kl_grade"] == int(decode_grades(expected, cfg)[0])
        assert b["uncertain"] is True and b["confidence"] == b["probabilities"][b["kl_grade"]]


def test_the_knee_gate_refuses_with_422_and_keeps_the_batch(exported):
    # Threshold below any distance: everything decodable is refused; threshold above: nothing is.
    refuse_all = _predictor_with(exported, gate="mahalanobis", gate_threshold=-1.0)
    answers = refuse_all.handle([{"body": png(seed=1)}, {"body": b"junk"}, {"body": png(seed=2)}], [{}] * 3)
    assert [s for s, _ in answers] == [422, 400, 422]
    err = answers[0][1]["error"]
    assert err["type"] == "not_a_knee" and "knee radiograph" in err["message"]
    let_through = _predictor_with(exported, gate="mahalanobis", gate_threshold=1e30)
    assert [s for s, _ in let_through.handle([{"body": png(seed=1)}], [{}])] == [200]


def test_a_dicom_of_another_body_part_is_refused_before_the_model(predictor, monkeypatch):
    from tests.imagebytes import make_dicom

    chest = make_dicom(np.arange(4096, dtype=np.uint16).reshape(64, 64), BodyPartExamined="CHEST")
    knee = make_dicom(np.arange(4096, dtype=np.uint16).reshape(64, 64), BodyPartExamined="KNEE")
    answers = predictor.handle([{"body": chest}, {"body": knee}], [{}, {}])
    assert [s for s, _ in answers] == [422, 200]
    assert answers[0][1]["error"]["type"] == "not_a_knee" and "CHEST" in answers[0][1]["error"]["message"]


def test_flip_averaging_reads_the_mirrored_image(exported):
    rows = [{"body": png(seed=7)}]
    plain = _predictor_with(exported).handle(rows, [{}])[0][1]["probabilities"]
    mirrored_png = cv2.imencode(".png", cv2.imdecode(np.frombuffer(png(seed=7), np.uint8), 0)[:, ::-1])[1].tobytes()
    mirrored = _predictor_with(exported).handle([{"body": mirrored_png}], [{}])[0][1]["probabilities"]
    both = _predictor_with(exported, flip_tta=True).handle(rows, [{}])[0][1]["probabilities"]
    np.testing.assert_allclose(both, (np.array(plain) + np.array(mirrored)) / 2, atol=2e-4)


# --- whole films (model.localize): the finder's joints are given, the answer is assembled per knee ---


def _joint(x: float, y: float, w: float, view: str = "ap", score: float = 0.9):
    from model.localize import Joint

    return Joint((x - w / 2, y - w / 2, x + w / 2, y + w / 2), view, score)


def _film_predictor(exported: str, monkeypatch, joints_by_width: dict[int, list], **post) -> Predictor:
    """A predictor whose finder sees ``joints_by_width[image width]`` in each image."""
    from model.localize import FinderConfig

    pred = _predictor_with(exported, **post) if post else _predictor_with(exported)
    pred.finder = (None, FinderConfig(min_joint_px=40))

    def seen(net, cfg, grays, device):
        return [joints_by_width.get(g.shape[1], []) for g in grays]

    monkeypatch.setattr("handler.service.find_joints", seen)
    return pred


def test_a_film_is_answered_per_knee_left_to_right(exported, monkeypatch):
    from koa_client.schema import validate_answer

    film = png((300, 400), seed=3)
    pred = _film_predictor(exported, monkeypatch, {400: [_joint(300, 150, 80), _joint(100, 150, 90)]})
    [(status, body)] = pred.handle([{"body": film}], [{}])
    assert status == 200, body
    validate_answer(body)
    assert body["image"] == {"width": 400, "height": 300} and "kl_grade" not in body
    assert [k["side"] for k in body["knees"]] == ["left", "right"]
    assert body["knees"][0]["box"] == [55.0, 105.0, 145.0, 195.0]
    assert all(k["view"] == "ap" and "kl_grade" in k and k["laterality"] is None for k in body["knees"])


def test_each_knee_of_a_film_is_explained(exported, monkeypatch):
    from koa_client.schema import validate_answer

    pred = _film_predictor(exported, monkeypatch, {400: [_joint(300, 150, 80), _joint(100, 150, 90)]})
    [(status, body)] = pred.handle([{"body": png((300, 400), seed=3), "explain": b"true"}], [{}])
    assert status == 200
    validate_answer(body, explain=True)
    assert all(k["explanation"]["grid"] for k in body["knees"])
    film = body["explanation"]  # one overlay of the whole film at its native size, each knee's map in its box
    assert (film["width"], film["height"]) == (400, 300)
    overlay = cv2.imdecode(np.frombuffer(base64.b64decode(film["overlay_png"]), np.uint8), 1)
    assert overlay.shape == (300, 400, 3)
    gray = cv2.imdecode(np.frombuffer(png((300, 400), seed=3), np.uint8), 0)
    coloured = np.abs(overlay.astype(int) - gray[..., None]).sum(2) > 30
    assert coloured[105:195, 55:145].mean() > 0.5 and not coloured[:, 180:220].any()  # heat inside the boxes only


def test_a_leg_film_fixture_is_explained_on_the_film_itself(exported, monkeypatch):
    """tests/fixtures/films/ap_IMG0000653.jpg (one AP knee, README there) with the shipped knee-joint finder:
    the overlay has the film's width and height."""
    from model.localize import load_serving_finder

    film = (ROOT / "tests" / "fixtures" / "films" / "ap_IMG0000653.jpg").read_bytes()
    pred = _predictor_with(exported)
    pred.finder = load_serving_finder(ROOT / "weights" / "finder.pt")
    [(status, body)] = pred.handle([{"body": film, "explain": b"true"}], [{}])
    assert status == 200, body
    h, w = cv2.imdecode(np.frombuffer(film, np.uint8), 0).shape
    overlay = cv2.imdecode(np.frombuffer(base64.b64decode(body["explanation"]["overlay_png"]), np.uint8), 1)
    assert overlay.shape == (h, w, 3) and (body["image"]["width"], body["image"]["height"]) == (w, h)
    assert all("overlay_png" not in k.get("explanation", {}) for k in body["knees"])  # the grid stays per knee


@pytest.mark.parametrize(
    ("joints", "kind"),
    [
        ([], "not_a_knee"),
        ([_joint(200, 150, 80, "other")], "unsupported_view"),
        ([_joint(200, 150, 30)], "resolution_too_low"),
    ],
)
def test_a_film_without_a_gradable_knee_is_refused_saying_why(exported, monkeypatch, joints, kind):
    from koa_client.schema import validate_error

    pred = _film_predictor(exported, monkeypatch, {400: joints})
    [(status, body)] = pred.handle([{"body": png((300, 400), seed=3)}], [{}])
    assert status == 422 and validate_error(body, 422) == kind


def test_a_lateral_beside_an_ap_view_is_listed_not_graded(exported, monkeypatch):
    pred = _film_predictor(exported, monkeypatch, {400: [_joint(100, 150, 80), _joint(300, 150, 70, "other")]})
    [(status, body)] = pred.handle([{"body": png((300, 400), seed=3)}], [{}])
    assert status == 200
    ap, lateral = body["knees"]
    assert "kl_grade" in ap and lateral["refused"]["type"] == "unsupported_view" and "kl_grade" not in lateral


def test_crops_films_and_bad_requests_share_a_batch(exported, monkeypatch):
    # width 120: the joint fills the image (a crop); width 400: a film with one knee
    pred = _film_predictor(exported, monkeypatch, {120: [_joint(60, 45, 100)], 400: [_joint(200, 150, 80)]})
    rows = [{"body": png(seed=1)}, {"body": png((300, 400), seed=3)}, {"body": b"junk"}]
    (s0, crop), (s1, film), (s2, bad) = pred.handle(rows, [{}] * 3)
    assert (s0, s1, s2) == (200, 200, 400)
    assert "kl_grade" in crop and "knees" not in crop
    assert len(film["knees"]) == 1 and "kl_grade" in film["knees"][0]


def test_a_film_whose_knee_crops_the_gate_refuses_gets_no_grade(exported, monkeypatch):
    pred = _film_predictor(
        exported, monkeypatch, {400: [_joint(200, 150, 80)]}, gate="mahalanobis", gate_threshold=-1.0
    )
    [(status, body)] = pred.handle([{"body": png((300, 400), seed=3)}], [{}])
    assert status == 422 and body["error"]["type"] == "not_a_knee"


def test_a_dicom_laterality_names_the_only_knee(exported, monkeypatch):
    from tests.imagebytes import make_dicom

    film = make_dicom(
        np.tile(np.arange(400, dtype=np.uint16) * 10, (300, 1)), BodyPartExamined="KNEE", ImageLaterality="L"
    )
    pred = _film_predictor(exported, monkeypatch, {400: [_joint(200, 150, 80)]})
    [(status, body)] = pred.handle([{"body": film}], [{}])
    assert status == 200 and body["knees"][0]["laterality"] == "L"


def test_a_finder_failure_is_a_server_error_not_a_refusal(exported, monkeypatch):
    from model.localize import FinderConfig

    pred = _predictor_with(exported)
    pred.finder = (None, FinderConfig())

    def broken(net, cfg, grays, device):
        raise RuntimeError("boom")

    monkeypatch.setattr("handler.service.find_joints", broken)
    [(status, body)] = pred.handle([{"body": png((300, 400), seed=3)}], [{}])
    assert status == 500 and body["error"]["type"] == "server_error"


def test_mirror_averaging_in_one_pass_answers_as_evaluation_does(exported):
    """flip_tta: the handler runs each batch and its mirror in one pass; its answers equal the image's and
    its mirror's separate outputs put through `finish` (train.evaluate's way), and the knee gate's scores
    are the images' as sent."""
    from model.decode import decode_image
    from model.postprocess import finish
    from model.preprocess import prepare, to_model_input

    flip = _predictor_with(exported, flip_tta=True, temperature=1.3, gate="mahalanobis", gate_threshold=1e30)
    rows = [{"body": png(seed=s)} for s in range(3)]
    answers = [b for _, b in flip.handle(rows, [{}] * 3)]
    batch = torch.from_numpy(
        np.stack([to_model_input(prepare(decode_image(r["body"]), flip.contract), flip.contract) for r in rows])
    ).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        out = flip.scripted.forward_with_gate(batch).numpy()
        mirrored = flip.scripted.forward_with_gate(torch.flip(batch, dims=[3])).numpy()
    expected = finish(out, flip.contract.postprocess, flip.contract.num_classes, mirrored)
    np.testing.assert_allclose([a["probabilities"] for a in answers], expected["probabilities"], atol=2e-4)
    assert [a["kl_grade"] for a in answers] == expected["grades"].tolist()
    arrays = flip.outputs(batch)
    np.testing.assert_allclose(arrays["gate_scores"], out[:, -1], rtol=1e-4)
    assert arrays["gate_scores"].shape == (3,) and arrays["probabilities"].shape == (3, 5)  # the mirrors dropped
