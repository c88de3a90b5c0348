"""The HAProxy balancer of ops/cluster/ in front of fake replicas (no TorchServe, no model).

Two small REST servers and two gRPC servers on free loopback ports play the replicas; HAProxy runs
with the configuration `cluster.haproxy_config` writes. The tests check what the balancer itself
decides: the token at the front (401 / UNAUTHENTICATED, the token never forwarded), the paths it lets
through, balancing per request over REST and per call over gRPC, health checks on ``/ping`` taking a
replica out and back, a dropped request answered 503 (which the clients resend), and rotation.
The same balancer in front of real TorchServe replicas: tests/test_deploy_cluster.py.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ops import cluster
from ops import server as ts
from ops.procs import is_alive, read_pid
from tests.conftest import skip_or_fail

grpc = pytest.importorskip("grpc")


def _require_haproxy() -> None:
    if shutil.which("haproxy") is None and not Path("/usr/sbin/haproxy").is_file():
        skip_or_fail("HAProxy is not installed (sudo apt-get install -y haproxy; .ci/run installs it)")


class FakeReplica:
    """A REST server that answers like a TorchServe replica with token authorization off."""

    def __init__(self, name: str, port: int) -> None:
        self.name, self.healthy, self.seen = name, True, []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                outer.seen.append((self.path, self.headers.get("Authorization")))
                if self.path == "/ping":
                    self._answer(200 if outer.healthy else 500, {"status": "Healthy" if outer.healthy else "Unhealthy"})
                else:
                    self._answer(200, {"replica": outer.name, "path": self.path})

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.seen.append((self.path, self.headers.get("Authorization")))
                if self.path.endswith("/drop"):  # a replica killed mid-request: no answer at all
                    self.close_connection = True
                    self.connection.close()
                    return
                self._answer(200, {"replica": outer.name, "kl_grade": 2})

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _grpc_replica(name: str, port: int) -> grpc.Server:
    from koa_client._proto import inference_pb2, inference_pb2_grpc

    class Servicer(inference_pb2_grpc.InferenceAPIsServiceServicer):
        def Predictions(self, request, context):  # noqa: N802
            auth = dict(context.invocation_metadata()).get("authorization")
            return inference_pb2.PredictionResponse(prediction=json.dumps({"replica": name, "auth": auth}).encode())

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server(Servicer(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server


@pytest.fixture()
def balancer(tmp_path: Path) -> Iterator[dict]:
    _require_haproxy()
    pytest.importorskip("koa_client._proto.inference_pb2", reason="gRPC stubs: make proto")
    ports = ts.free_ports(7)
    front = cluster.Front(rest_port=ports[4], grpc_port=ports[5], health_port=ports[6])
    replicas = [
        cluster.Replica("r0", str(tmp_path / "r0"), rest_port=ports[0], grpc_port=ports[1]),
        cluster.Replica("r1", str(tmp_path / "r1"), rest_port=ports[2], grpc_port=ports[3]),
    ]
    fakes = [FakeReplica(r.name, r.rest_port) for r in replicas]
    grpcs = [_grpc_replica(r.name, r.grpc_port) for r in replicas]
    token = cluster.ensure_token(tmp_path)
    cluster.start_balancer(tmp_path, replicas, front)
    try:
        cluster.wait_for_states(tmp_path, {"r0": "UP", "r1": "UP"}, timeout=15)
        yield {"workdir": tmp_path, "front": front, "token": token, "fakes": fakes}
    finally:
        cluster.stop_balancer(tmp_path)
        for f in fakes:
            f.close()
        for g in grpcs:
            g.stop(0)


def _rest(front: cluster.Front, path: str, token: str | None, method: str = "POST") -> tuple[int, dict]:
    headers = {"Content-Type": "image/png"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = b"\x89PNG fake" if method == "POST" else None
    req = urllib.request.Request(f"http://127.0.0.1:{front.rest_port}{path}", data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        body = exc.read()
        return exc.code, json.loads(body) if body else {}


def _grpc_call(front: cluster.Front, token: str | None) -> dict:
    from koa_client._proto import inference_pb2, inference_pb2_grpc

    metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
    with grpc.insecure_channel(f"127.0.0.1:{front.grpc_port}") as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        request = inference_pb2.PredictionsRequest(model_name="oamen", input={"data": b"fake"})
        return json.loads(stub.Predictions(request, timeout=10, metadata=metadata).prediction)


def test_a_request_without_the_right_token_is_refused_at_the_front(balancer: dict) -> None:
    front, token, fakes = balancer["front"], balancer["token"], balancer["fakes"]
    for bad in (None, "", "wrong", token + "x", f"{token} extra"):
        status, body = _rest(front, "/predictions/oamen", bad)
        assert status == 401 and body["type"] == "Unauthorized", (bad, status, body)
        with pytest.raises(grpc.RpcError) as err:
            _grpc_call(front, bad)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, bad
    status, _ = _rest(front, "/ping", None, method="GET")  # /ping through the front needs the token too
    assert status == 401
    # Nothing refused reached a replica: they saw only the balancer's own health checks.
    assert {p for f in fakes for p, _ in f.seen} <= {"/ping"}


def test_the_client_reports_a_refused_token_as_a_key_error(balancer: dict) -> None:
    from koa_client import KOAClientError, is_key_error
    from koa_client.grpc_client import GrpcClient
    from koa_client.rest import RestClient

    front = balancer["front"]
    with pytest.raises(KOAClientError) as err:
        RestClient(f"http://127.0.0.1:{front.rest_port}", token="wrong").predict(b"\x89PNG fake")
    assert err.value.status == 401 and is_key_error(err.value)
    with pytest.raises(KOAClientError) as err, GrpcClient(f"127.0.0.1:{front.grpc_port}", token="wrong") as c:
        c.predict(b"\x89PNG fake")
    assert is_key_error(err.value)


def test_requests_with_the_token_are_balanced_and_the_token_is_not_forwarded(balancer: dict) -> None:
    front, token, fakes = balancer["front"], balancer["token"], balancer["fakes"]
    rest = Counter(_rest(front, "/predictions/oamen", token)[1]["replica"] for _ in range(20))
    assert set(rest) == {"r0", "r1"}, rest
    assert all(auth is None for f in fakes for _, auth in f.seen)
    answers = [_grpc_call(front, token) for _ in range(20)]
    # One channel or many, HAProxy balances each call (HTTP/2 stream), not each connection.
    assert {a["replica"] for a in answers} == {"r0", "r1"}
    assert all(a["auth"] is None for a in answers)
    from koa_client._proto import inference_pb2, inference_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{front.grpc_port}") as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        request = inference_pb2.PredictionsRequest(model_name="oamen", input={"data": b"fake"})
        md = (("authorization", f"Bearer {token}"),)
        one_channel = {json.loads(stub.Predictions(request, metadata=md).prediction)["replica"] for _ in range(20)}
    assert one_channel == {"r0", "r1"}


def test_only_inference_paths_pass_the_front(balancer: dict) -> None:
    front, token = balancer["front"], balancer["token"]
    assert _rest(front, "/ping", token, method="GET")[0] == 200
    assert _rest(front, "/explanations/oamen", token)[0] == 200
    for path in ("/models", "/metrics", "/api-description", "/v2/models/oamen/infer", "/pingx", "/token?type=api"):
        status, body = _rest(front, path, token, method="GET")
        assert status == 404 and body["type"] == "NotFound", path


def test_health_checks_take_a_replica_out_and_bring_it_back(balancer: dict) -> None:
    front, token, fakes, wd = balancer["front"], balancer["token"], balancer["fakes"], balancer["workdir"]

    def health(path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{front.health_port}{path}", timeout=5) as resp:
                return resp.status
        except urllib.error.HTTPError as exc:
            return exc.code

    assert health("/live") == 200 and health("/ready") == 200
    fakes[0].healthy = False
    cluster.wait_for_states(wd, {"r0": "DOWN", "r1": "UP"}, timeout=10)
    assert {_rest(front, "/predictions/oamen", token)[1]["replica"] for _ in range(10)} == {"r1"}
    assert {_grpc_call(front, token)["replica"] for _ in range(10)} == {"r1"}  # gRPC follows the REST check
    fakes[1].healthy = False
    cluster.wait_for_states(wd, {"r0": "DOWN", "r1": "DOWN"}, timeout=10)
    assert health("/ready") == 503 and health("/live") == 200
    fakes[0].healthy = fakes[1].healthy = True
    cluster.wait_for_states(wd, {"r0": "UP", "r1": "UP"}, timeout=10)
    assert health("/ready") == 200


def test_a_replica_that_goes_away_is_skipped_and_a_dropped_request_is_a_503(balancer: dict) -> None:
    front, token, fakes = balancer["front"], balancer["token"], balancer["fakes"]
    status, body = _rest(front, "/predictions/drop", token)
    assert status == 503 and body["type"] == "ReplicaLost"  # the clients send a 503 again (koa_client.retry)
    fakes[0].close()  # refuses connections now, before the health check has noticed
    t0 = time.monotonic()
    replicas = [_rest(front, "/predictions/oamen", token) for _ in range(10)]
    assert all(s == 200 and b["replica"] == "r1" for s, b in replicas), replicas
    assert time.monotonic() - t0 < 5


def test_rotation_accepts_the_new_token_and_the_previous_one_only(balancer: dict) -> None:
    wd, front, first = balancer["workdir"], balancer["front"], balancer["token"]
    second = cluster.rotate(wd)
    assert json.loads((wd / cluster.KEY_FILE).read_text())["inference"]["key"] == second
    assert (wd / cluster.TOKENS_FILE).stat().st_mode & 0o077 == 0
    assert _rest(front, "/predictions/oamen", second)[0] == 200
    assert _rest(front, "/predictions/oamen", first)[0] == 200
    third = cluster.rotate(wd)
    assert _rest(front, "/predictions/oamen", third)[0] == 200
    assert _rest(front, "/predictions/oamen", second)[0] == 200
    assert _rest(front, "/predictions/oamen", first)[0] == 401


def test_stop_returns_when_haproxy_is_gone(balancer: dict) -> None:
    wd = balancer["workdir"]
    pid = read_pid(wd / "haproxy.pid")
    assert is_alive(pid)
    assert cluster.stop_balancer(wd) is True
    assert not is_alive(pid)
    assert cluster.stop_balancer(wd) is False


def test_haproxy_config_needs_a_replica() -> None:
    with pytest.raises(ValueError, match="at least one replica"):
        cluster.haproxy_config([], cluster.Front(), "t", "e")
