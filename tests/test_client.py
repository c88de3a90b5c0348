"""Tests of the KOA-Serve client (`koa_client/`) without TorchServe.

The REST client talks to a tiny ``http.server`` in a thread, the gRPC client to an in-process
``grpc.server`` built from the generated stubs; both record what they received and answer with
canned bodies shaped like the handler's (see ``handler/service.py``). Real-server tests live elsewhere.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from koa_client import TOKEN_ENV, KOAClientError, load_token
from tests.conftest import skip_or_fail

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 64
ANSWER = {
    "kl_grade": 2,
    "class_name": "KL2",
    "label": "KL2: minimal",
    "probabilities": [0.1, 0.2, 0.4, 0.2, 0.1],
    "oa_probability": 0.7,
    "model": {"name": "oamen", "version": "1.0"},
}
ERROR = {"error": {"status": 400, "type": "invalid_image", "message": "not an image in an accepted format"}}


@pytest.fixture(autouse=True)
def _no_env_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)


# --- generated stubs -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stubs() -> Any:
    """koa_client._proto, generated first when `make proto` has not run."""
    try:
        from koa_client._proto import inference_pb2, inference_pb2_grpc
    except ImportError:
        from koa_client import gen_proto

        try:
            gen_proto.generate()
        except RuntimeError as exc:
            skip_or_fail(f"cannot generate the gRPC stubs here: {exc}")
        from koa_client._proto import inference_pb2, inference_pb2_grpc
    return inference_pb2, inference_pb2_grpc


def test_the_committed_stubs_are_what_the_installed_torchserve_generates(tmp_path: Path) -> None:
    from koa_client import gen_proto

    try:
        fresh = gen_proto.generate(tmp_path / "_proto")
    except RuntimeError as exc:
        skip_or_fail(f"no TorchServe jar here: {exc}")
    committed = ROOT / "koa_client" / "_proto"
    names = sorted(p.relative_to(fresh) for p in fresh.rglob("*.py"))
    assert names == sorted(p.relative_to(committed) for p in committed.rglob("*.py")), "make proto, then commit"
    for name in names:
        assert (fresh / name).read_text() == (committed / name).read_text(), f"{name} is stale: make proto, commit"
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "koa_client/_proto"], capture_output=True, text=True)
    assert tracked.returncode != 0 or len(tracked.stdout.split()) == len(names), "git add koa_client/_proto"


def test_gen_proto_writes_importable_package(tmp_path: Path) -> None:
    from koa_client import gen_proto

    try:
        out = gen_proto.generate(tmp_path / "koa_stubs")
    except RuntimeError as exc:
        skip_or_fail(f"no TorchServe jar here: {exc}")
    assert {p.name for p in out.iterdir()} >= {"__init__.py", "inference_pb2.py", "inference_pb2_grpc.py", "google"}
    assert (out / "google" / "rpc" / "status_pb2.py").is_file()
    # A fresh interpreter: the stubs must import as a package, with no sys.path entry for their folder.
    code = (
        "import koa_stubs.inference_pb2 as p, koa_stubs.inference_pb2_grpc as g; "
        "f = p.PredictionsRequest.DESCRIPTOR.fields_by_name['input']; "
        "assert f.message_type.GetOptions().map_entry; assert g.InferenceAPIsServiceStub; print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_stubs_have_input_map(stubs: Any) -> None:
    inference_pb2, _ = stubs
    req = inference_pb2.PredictionsRequest(model_name="oamen", input={"data": b"x", "explain": b"true"})
    assert dict(req.input) == {"data": b"x", "explain": b"true"}
    assert inference_pb2.PredictionResponse(prediction=b"{}").prediction == b"{}"


# --- load_token ------------------------------------------------------------------------------


def _key_file(tmp_path: Path, key: str = "from-file") -> Path:
    path = tmp_path / "key_file.json"
    path.write_text(json.dumps({"inference": {"key": key}, "management": {"key": "m"}, "API": {"key": "a"}}))
    return path


def test_load_token_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = _key_file(tmp_path)
    assert load_token(key_file=keys) == "from-file"
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert load_token(key_file=keys) == "from-env"
    assert load_token("explicit", key_file=keys) == "explicit"


def test_load_token_errors(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=TOKEN_ENV):
        load_token()
    with pytest.raises(RuntimeError, match="not found"):
        load_token(key_file=tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"management": {"key": "m"}}')
    with pytest.raises(RuntimeError, match="no inference key"):
        load_token(key_file=bad)
    bad.write_text("not json")
    with pytest.raises(RuntimeError, match="cannot read"):
        load_token(key_file=bad)


# --- REST ------------------------------------------------------------------------------------


class _Recorder(BaseHTTPRequestHandler):
    requests: list[dict[str, Any]]
    replies: list[tuple[int, bytes]]

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.requests.append(
            {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": self.rfile.read(length)}
        )
        status, body = self.replies.pop(0) if self.replies else (200, json.dumps(ANSWER).encode())
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _answer

    def log_message(self, *args: Any) -> None:  # keep pytest's output clean
        pass


@pytest.fixture()
def http_server() -> Iterator[tuple[str, type[_Recorder]]]:
    handler = type("Recorder", (_Recorder,), {"requests": [], "replies": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def _form(req: dict[str, Any]) -> dict[str, tuple[bytes, str]]:
    """{field name: (payload, content type)} of a recorded multipart request."""
    raw = f"Content-Type: {req['headers']['Content-Type']}\r\n\r\n".encode() + req["body"]
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(raw)
    assert msg.is_multipart()
    return {
        p.get_param("name", header="content-disposition"): (p.get_content(), p.get_content_type())
        for p in msg.iter_parts()
    }


def test_rest_predict_sends_raw_image_with_token(http_server: tuple[str, type[_Recorder]]) -> None:
    from koa_client.rest import RestClient

    url, rec = http_server
    assert RestClient(url, token="sekrit").predict(PNG) == ANSWER
    (req,) = rec.requests
    assert req["method"] == "POST" and req["path"] == "/predictions/oamen"
    assert req["headers"]["Authorization"] == "Bearer sekrit"
    assert req["headers"]["Content-Type"] == "image/png"
    assert req["body"] == PNG


def test_rest_explain_path_and_env_token(http_server: tuple[str, type[_Recorder]], monkeypatch) -> None:
    from koa_client.rest import RestClient

    url, rec = http_server
    monkeypatch.setenv(TOKEN_ENV, "env-key")
    RestClient(url, model="other").predict(b"\xff\xd8\xff\xe0jpeg", explain=True)
    (req,) = rec.requests
    assert req["path"] == "/explanations/other"
    assert req["headers"]["Authorization"] == "Bearer env-key"
    assert req["headers"]["Content-Type"] == "image/jpeg"


def test_rest_options_go_as_multipart(http_server: tuple[str, type[_Recorder]]) -> None:
    from koa_client.rest import RestClient

    url, rec = http_server
    RestClient(url, token="t").predict(PNG, explain=True, target=3, method="ig")
    (req,) = rec.requests
    assert req["path"] == "/explanations/oamen"
    assert req["headers"]["Content-Type"].startswith("multipart/form-data")
    form = _form(req)
    assert form["data"] == (PNG, "image/png")
    assert form["target"][0] == "3" and form["method"][0] == "ig" and form["explain"][0] == "true"


@pytest.mark.parametrize(
    ("status", "body", "kind", "message"),
    [
        (400, json.dumps(ERROR).encode(), "invalid_image", "not an image in an accepted format"),
        (404, b'{"code": 404, "type": "ModelNotFoundException", "message": "Model not found: x"}', None, "Model not"),
        (400, b'{"code": 400, "type": "InvalidKeyException", "message": "Token Authorization failed"}', None, "expire"),
        (503, b"Service Unavailable", None, "Service Unavailable"),
        (413, b"", None, "max_request_size"),
    ],
)
def test_rest_errors(http_server: tuple[str, type[_Recorder]], status: int, body: bytes, kind, message: str) -> None:
    from koa_client.rest import RestClient

    url, rec = http_server
    rec.replies.append((status, body))
    with pytest.raises(KOAClientError) as info:
        RestClient(url, token="t").predict(PNG)
    assert info.value.status == status
    assert message in info.value.message
    if kind:
        assert info.value.kind == kind


def test_rest_ping_and_unreachable(http_server: tuple[str, type[_Recorder]]) -> None:
    from koa_client.rest import RestClient

    url, rec = http_server
    rec.replies.append((200, b'{"status": "Healthy"}'))
    assert RestClient(url, token="t").ping() == {"status": "Healthy"}
    assert rec.requests[0]["method"] == "GET" and rec.requests[0]["path"] == "/ping"
    with pytest.raises(KOAClientError) as info:
        RestClient("http://127.0.0.1:9", token="t", timeout=2).ping()
    assert info.value.status == 503


INVALID_KEY = b'{"code": 400, "type": "InvalidKeyException", "message": "Token Authorization failed"}'


def test_rest_retries_503_until_an_answer(http_server: tuple[str, type[_Recorder]]) -> None:
    from koa_client.rest import RestClient

    url, rec = http_server
    rec.replies += [(503, b'{"code": 503, "message": "Model oamen has no worker"}')] * 2
    assert RestClient(url, token="t", retry_s=10).predict(PNG) == ANSWER
    assert len(rec.requests) == 3 and all(r["body"] == PNG for r in rec.requests)


def test_rest_without_retry_fails_at_once_and_never_retries_client_errors(http_server) -> None:
    from koa_client.rest import RestClient

    url, rec = http_server
    rec.replies.append((503, b"busy"))
    with pytest.raises(KOAClientError):
        RestClient(url, token="t").predict(PNG)
    rec.replies.append((400, json.dumps(ERROR).encode()))
    with pytest.raises(KOAClientError) as info:
        RestClient(url, token="t", retry_s=10).predict(PNG)
    assert info.value.kind == "invalid_image" and len(rec.requests) == 2


def test_rest_rereads_the_key_file_when_the_key_is_refused(http_server, tmp_path: Path) -> None:
    from koa_client.rest import RestClient

    url, rec = http_server
    keys = _key_file(tmp_path, "old")
    client = RestClient(url, key_file=keys)
    _key_file(tmp_path, "new")  # the server restarted and wrote new keys
    rec.replies.append((400, INVALID_KEY))
    assert client.predict(PNG) == ANSWER
    assert [r["headers"]["Authorization"] for r in rec.requests] == ["Bearer old", "Bearer new"]
    rec.replies.append((400, INVALID_KEY))  # the same key refused again: no loop, a clear error
    with pytest.raises(KOAClientError, match="expire"):
        client.predict(PNG)
    assert len(rec.requests) == 3


def test_rest_retries_while_the_server_is_down(tmp_path: Path) -> None:
    """Nothing listens for 1 s, then a server comes up on that port: the request gets its answer."""
    import socket

    from koa_client.rest import RestClient

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    handler = type("Recorder", (_Recorder,), {"requests": [], "replies": []})
    started: list[ThreadingHTTPServer] = []

    def later() -> None:
        threading.Event().wait(1.0)
        server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        started.append(server)
        server.serve_forever(poll_interval=0.02)

    threading.Thread(target=later, daemon=True).start()
    try:
        assert RestClient(f"http://127.0.0.1:{port}", token="t", retry_s=30).predict(PNG) == ANSWER
    finally:
        for server in started:
            server.shutdown()
            server.server_close()
    assert len(handler.requests) == 1


def test_retry_gives_up_at_the_deadline_with_the_attempt_count() -> None:
    from koa_client import call_with_retry

    now = [0.0]
    pauses: list[float] = []

    def sleep(s: float) -> None:
        pauses.append(s)
        now[0] += s

    def send() -> None:
        raise KOAClientError(503, "cannot reach the server", "unreachable")

    with pytest.raises(KOAClientError, match="gave up after") as info:
        call_with_retry(send, 5.0, sleep=sleep, clock=lambda: now[0])
    assert info.value.status == 503
    assert sum(pauses) == pytest.approx(5.0) and max(pauses) <= 2.0
    assert pauses[:4] == pytest.approx([0.1, 0.2, 0.4, 0.8])


def test_rest_rejects_text_image() -> None:
    from koa_client.rest import RestClient

    with pytest.raises(TypeError, match="bytes"):
        RestClient(token="t").predict("knee.png")  # type: ignore[arg-type]


# --- gRPC ------------------------------------------------------------------------------------


@pytest.fixture()
def grpc_server(stubs: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    import grpc

    inference_pb2, inference_pb2_grpc = stubs
    state: dict[str, Any] = {"requests": [], "metadata": [], "reply": json.dumps(ANSWER).encode(), "abort": None}

    class Servicer(inference_pb2_grpc.InferenceAPIsServiceServicer):
        def Predictions(self, request, context):  # noqa: N802 (the proto's name)
            state["requests"].append(request)
            state["metadata"].append(dict(context.invocation_metadata()))
            abort = state["abort"]
            if callable(abort):  # decides from the call's metadata
                abort = abort(state["metadata"][-1])
            if abort:
                context.abort(*abort)
            return inference_pb2.PredictionResponse(prediction=state["reply"])

        def Ping(self, request, context):  # noqa: N802
            state["metadata"].append(dict(context.invocation_metadata()))
            return inference_pb2.TorchServeHealthResponse(health='{\n  "status": "Healthy"\n}')

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", state
    finally:
        server.stop(grace=None)


def test_grpc_predict_sends_input_map_and_token(grpc_server: tuple[str, dict[str, Any]]) -> None:
    from koa_client.grpc_client import GrpcClient

    target, state = grpc_server
    with GrpcClient(target, token="sekrit", timeout=5) as client:
        assert client.predict(PNG) == ANSWER
        assert client.predict(PNG, explain=True, target="KL3", method="ig") == ANSWER
    plain, explained = state["requests"]
    assert plain.model_name == "oamen"
    assert dict(plain.input) == {"data": PNG}
    assert dict(explained.input) == {"data": PNG, "explain": b"true", "target": b"KL3", "method": b"ig"}
    assert state["metadata"][0]["authorization"] == "Bearer sekrit"


def test_grpc_error_body_raises(grpc_server: tuple[str, dict[str, Any]]) -> None:
    from koa_client.grpc_client import GrpcClient

    target, state = grpc_server
    state["reply"] = json.dumps(ERROR).encode()
    with pytest.raises(KOAClientError) as info:
        GrpcClient(target, token="t", timeout=5).predict(PNG)
    assert info.value.status == 400
    assert info.value.kind == "invalid_image"
    assert info.value.message == ERROR["error"]["message"]


def test_grpc_status_maps_to_http(grpc_server: tuple[str, dict[str, Any]]) -> None:
    import grpc

    from koa_client.grpc_client import GrpcClient

    target, state = grpc_server
    state["abort"] = (grpc.StatusCode.PERMISSION_DENIED, "Token Authorization failed")
    with pytest.raises(KOAClientError) as info:
        GrpcClient(target, token="bad", timeout=5).predict(PNG)
    assert info.value.status == 403
    assert "PERMISSION_DENIED" in info.value.message and "Token Authorization failed" in info.value.message
    state["abort"] = (grpc.StatusCode.INTERNAL, "Model not found: x\norg.pytorch.serve.ModelNotFoundException")
    with pytest.raises(KOAClientError) as info:
        GrpcClient(target, token="t", timeout=5).predict(PNG)
    assert info.value.status == 404


def test_grpc_retries_unavailable_and_rereads_the_key(grpc_server, tmp_path: Path) -> None:
    import grpc

    from koa_client.grpc_client import GrpcClient

    target, state = grpc_server
    keys = _key_file(tmp_path, "old")
    t0 = time.monotonic()

    def restarting_server(metadata: dict[str, str]) -> tuple[Any, str] | None:
        if time.monotonic() - t0 < 0.5:
            return grpc.StatusCode.UNAVAILABLE, "restarting"
        return None if metadata["authorization"] == "Bearer new" else (grpc.StatusCode.PERMISSION_DENIED, "bad key")

    with GrpcClient(target, key_file=keys, timeout=5, retry_s=10) as client:
        _key_file(tmp_path, "new")  # the restarted server's keys
        state["abort"] = restarting_server
        assert client.predict(PNG) == ANSWER
    tokens = [m["authorization"] for m in state["metadata"]]
    assert tokens[0] == "Bearer old" and tokens[-2:] == ["Bearer old", "Bearer new"] and len(tokens) >= 3


def test_grpc_ping(grpc_server: tuple[str, dict[str, Any]]) -> None:
    from koa_client.grpc_client import GrpcClient

    target, state = grpc_server
    assert GrpcClient(target, token="t", timeout=5).ping() == {"status": "Healthy"}
    assert state["metadata"][0]["authorization"] == "Bearer t"


# --- CLI -------------------------------------------------------------------------------------


class FakeClient:
    """Stands in for RestClient/GrpcClient: answers from a table keyed by the image bytes."""

    def __init__(self, answers: dict[bytes, dict[str, Any] | KOAClientError]) -> None:
        self.answers = answers
        self.calls: list[dict[str, Any]] = []

    def predict(self, image: bytes, **options: Any) -> dict[str, Any]:
        self.calls.append(options)
        answer = self.answers[image]
        if isinstance(answer, KOAClientError):
            raise answer
        return answer


@pytest.fixture()
def images(tmp_path: Path) -> tuple[Path, Path]:
    good, bad = tmp_path / "knee_a.png", tmp_path / "knee_b.png"
    good.write_bytes(PNG + b"good")
    bad.write_bytes(PNG + b"bad")
    return good, bad


def _patch_client(monkeypatch: pytest.MonkeyPatch, fake: FakeClient) -> list[Any]:
    import koa_client.__main__ as cli

    made: list[Any] = []
    monkeypatch.setattr(cli, "make_client", lambda args, token: made.append((args, token)) or fake)
    return made


def test_cli_exit_1_when_an_image_fails(images, monkeypatch, capsys) -> None:
    from koa_client.__main__ import main

    good, bad = images
    fake = FakeClient({good.read_bytes(): ANSWER, bad.read_bytes(): KOAClientError(400, "not an image", "bad")})
    made = _patch_client(monkeypatch, fake)
    assert main(["predict", str(good), str(bad), "--token", "t"]) == 1
    out, err = capsys.readouterr()
    assert "knee_a.png: KL2 (KL2: minimal)" in out and "KL4 0.100" in out and "0.700" in out
    assert "knee_b.png" in err and "not an image" in err
    assert made[0][1] == "t"
    assert main(["predict", str(good), "--token", "t", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == ANSWER


def test_cli_explain_writes_overlay(images, tmp_path, monkeypatch, capsys) -> None:
    from koa_client.__main__ import main

    good, _ = images
    overlay = b"\x89PNG overlay"
    explained = {**ANSWER, "explanation": {"method": "ig", "target": 3, "target_class": "KL3", "grid": [[0.0]]}}
    explained["explanation"]["overlay_png"] = base64.b64encode(overlay).decode()
    fake = FakeClient({good.read_bytes(): explained})
    _patch_client(monkeypatch, fake)
    out_dir = tmp_path / "overlays"
    code = main(
        ["predict", str(good), "--target", "3", "--method", "ig", "--overlay-dir", str(out_dir), "--token", "t"]
    )
    assert code == 0
    assert fake.calls == [{"explain": True, "target": 3, "method": "ig"}]
    path = out_dir / "knee_a_ig_KL3.png"
    assert path.read_bytes() == overlay
    assert str(path) in capsys.readouterr().out


def test_cli_usage_errors(images, monkeypatch, capsys, tmp_path) -> None:
    from koa_client.__main__ import main

    good, _ = images
    monkeypatch.chdir(tmp_path)  # no logs/serve/key_file.json of a local server here
    monkeypatch.delenv("KOA_TOKEN", raising=False)
    _patch_client(monkeypatch, FakeClient({}))
    assert main(["predict"]) == 2
    assert main(["predict", str(good), "--method", "lime", "--token", "t"]) == 2
    assert main(["predict", str(good), "--target", "-1", "--token", "t"]) == 2
    assert main(["predict", str(good)]) == 2  # no token anywhere
    assert "no inference token" in capsys.readouterr().err


def test_client_needs_no_model_code(stubs: Any) -> None:
    code = (
        "import sys, koa_client; "
        "assert 'grpc' not in sys.modules and 'requests' not in sys.modules; "
        "import koa_client.rest, koa_client.grpc_client, koa_client.__main__; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('model', 'train', 'handler', 'torch', 'ts')]; "
        "assert not bad, bad"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_cli_reads_the_local_servers_key_and_says_so(images, monkeypatch, capsys, tmp_path) -> None:
    from koa_client.__main__ import main

    good, _ = images
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KOA_TOKEN", raising=False)
    keys = tmp_path / "logs" / "serve" / "key_file.json"
    keys.parent.mkdir(parents=True)
    keys.write_text(json.dumps({"inference": {"key": "local-key"}, "management": {"key": "m"}}))
    made = _patch_client(monkeypatch, FakeClient({good.read_bytes(): ANSWER}))
    assert main(["predict", str(good)]) == 0
    assert made[0][1] == "local-key"
    assert "using the local server's key from logs/serve/key_file.json" in capsys.readouterr().err
    assert main(["predict", str(good), "--token", "given"]) == 0  # an explicit token wins, silently
    assert made[1][1] == "given" and "local server" not in capsys.readouterr().err


def test_cli_prints_confidence_the_flag_and_refusals(images, monkeypatch, capsys) -> None:
    from koa_client.__main__ import main

    good, bad = images
    v2 = {**ANSWER, "schema_version": 2, "confidence": ANSWER["probabilities"][ANSWER["kl_grade"]], "uncertain": True}
    refusal = KOAClientError(422, "this image does not look like a knee-joint radiograph", "not_a_knee")
    _patch_client(monkeypatch, FakeClient({good.read_bytes(): v2, bad.read_bytes(): refusal}))
    assert main(["predict", str(good), str(bad), "--token", "t"]) == 1
    out, err = capsys.readouterr()
    assert "confidence" in out and "UNCERTAIN" in out
    assert "knee_b.png: not graded (not_a_knee): this image does not look like" in err


def test_a_film_is_printed_per_knee_with_where_its_laterality_came_from() -> None:
    from koa_client.__main__ import format_answer

    grades = {"kl_grade": 2, "label": "KL2: minimal", "confidence": 0.6, "uncertain": False,
              "probabilities": [0.1, 0.1, 0.6, 0.1, 0.1], "oa_probability": 0.8}  # fmt: skip
    film = {"knees": [
        {"box": [10, 20, 90, 100], "side": "left", "laterality": "R", "laterality_source": "marker", "view": "ap",
         **grades},
        {"box": [200, 20, 280, 100], "side": "right", "laterality": None, "laterality_source": None, "view": "other",
         "refused": {"type": "unsupported_view", "message": "a lateral view"}},
    ]}  # fmt: skip
    lines = format_answer("film.jpg", film).splitlines()
    assert lines[0] == "film.jpg: whole film, 2 knee joint(s) found"
    assert lines[1].startswith("  knee 1 (left of the image, laterality R from the burned-in marker) box [10, 20, 90")
    assert lines[-1].startswith("  knee 2 (right of the image) box [200, 20, 280, 100]: not graded (unsupported_view)")


def test_load_token_waits_for_the_key_file_of_a_restarting_server(tmp_path: Path) -> None:
    keys = tmp_path / "key_file.json"
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:  # the server writes its key file 2 s into the wait
        slept.append(s)
        now[0] += s
        if now[0] >= 2.0 and not keys.exists():
            keys.write_text(json.dumps({"inference": {"key": "new-key"}}))

    assert load_token(key_file=keys, wait_s=10, sleep=sleep, clock=lambda: now[0]) == "new-key"
    assert 2.0 <= now[0] < 3.0 and max(slept) <= 0.5
    keys.unlink()
    now[0], slept[:] = 0.0, []
    with pytest.raises(RuntimeError, match=r"not found.*waited 1 s"):
        load_token(key_file=keys, wait_s=1, sleep=lambda s: slept.append(s) or now.__setitem__(0, now[0] + s),
                   clock=lambda: now[0])  # fmt: skip
    assert sum(slept) == pytest.approx(1.0)
    with pytest.raises(RuntimeError, match="not found") as info:  # without a wait: at once
        load_token(key_file=keys)
    assert "waited" not in str(info.value)


def test_cli_with_retry_waits_for_the_local_servers_new_key(images, monkeypatch, capsys, tmp_path) -> None:
    from koa_client.__main__ import main

    good, _ = images
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KOA_TOKEN", raising=False)
    keys = tmp_path / "logs" / "serve" / "key_file.json"
    keys.parent.mkdir(parents=True)  # the server of `make serve` is restarting: its key file is gone
    made = _patch_client(monkeypatch, FakeClient({good.read_bytes(): ANSWER}))
    assert main(["predict", str(good)]) == 2  # no --retry-s: fails at once, as before
    assert "no inference token" in capsys.readouterr().err
    writer = threading.Timer(0.6, lambda: keys.write_text(json.dumps({"inference": {"key": "after-restart"}})))
    writer.start()
    try:
        assert main(["predict", str(good), "--retry-s", "10"]) == 0
    finally:
        writer.cancel()
    assert made[-1][1] == "after-restart"


def test_cli_explain_writes_a_films_overlay_not_one_per_knee(tmp_path) -> None:
    from koa_client.__main__ import write_overlays

    png = b"\x89PNG the film"
    knee = {"kl_grade": 2, "explanation": {"method": "layercam", "target": 2, "grid": [[0.5]]}}
    film = {
        "knees": [knee, {"refused": {"type": "unsupported_view", "message": "lateral"}}],
        "explanation": {
            "method": "layercam",
            "width": 400,
            "height": 300,
            "overlay_png": base64.b64encode(png).decode(),
        },
    }
    (path,) = write_overlays(film, tmp_path / "leg.png", tmp_path / "out")
    assert path.name == "leg_layercam_film.png" and path.read_bytes() == png
