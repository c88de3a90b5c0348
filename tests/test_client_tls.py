"""The clients behind TLS: CA bundle, mutual TLS, certificate errors that fail fast, connect timeouts retried.

Everything runs on loopback and offline: a throwaway CA made with the ``openssl`` command line,
a TLS HTTP server (``ssl`` + ``http.server``) that answers like ``/predictions/oamen``, and a TLS
gRPC server on the stubs of ``koa_client/_proto``.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from koa_client import TLS_STATUS, KOAClientError
from koa_client.schema import validate_answer

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 64
ANSWER = {
    "kl_grade": 2,
    "class_name": "KL2",
    "label": "KL2: minimal",
    "probabilities": [0.1, 0.2, 0.4, 0.2, 0.1],
    "oa_probability": 0.7,
    "model": {"name": "oamen", "version": "1.0"},
}
# A certificate error must fail well before the retry window: it is reported, not retried.
RETRY_S = 5.0
FAST_S = 2.0


@pytest.fixture(autouse=True)
def _no_env_tls(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("KOA_TOKEN", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(name, raising=False)


# --- a throwaway PKI -------------------------------------------------------------------------


@dataclass(frozen=True)
class PKI:
    ca: Path  # the CA that signs everything below but the stranger
    key: Path  # the servers' key
    server: Path  # localhost and 127.0.0.1
    other_name: Path  # koa.invalid only: a hostname mismatch on 127.0.0.1
    expired: Path
    client: Path  # clientAuth, signed by ca
    client_key: Path
    client_combined: Path  # the client certificate and its key in one file
    stranger: Path  # a client certificate (key: client_key) from a CA the servers do not trust


def _openssl(*args: str | Path) -> None:
    done = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def _ext(path: Path, usage: str, san: str | None = None) -> Path:
    lines = [
        "basicConstraints=critical,CA:FALSE",
        "keyUsage=critical,digitalSignature",
        f"extendedKeyUsage={usage}",
        "subjectKeyIdentifier=hash",
        "authorityKeyIdentifier=keyid",
    ]
    path.write_text("\n".join(lines + ([f"subjectAltName={san}"] if san else [])) + "\n")
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make the test certificates")
    d = tmp_path_factory.mktemp("pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    ca_ext = ("-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    for ca in ("ca", "stranger_ca"):
        subj = f"/CN=KOA test {ca}"
        _openssl(
            "req",
            "-x509",
            *ec,
            "-keyout",
            d / f"{ca}.key",
            "-out",
            d / f"{ca}.pem",
            "-days",
            "2",
            "-subj",
            subj,
            *ca_ext,
        )
    for who in ("server", "client"):
        _openssl("req", *ec, "-keyout", d / f"{who}.key", "-out", d / f"{who}.csr", "-subj", f"/CN=koa {who}")

    def sign(name: str, who: str, ext: Path, days: str = "2", ca: str = "ca") -> Path:
        out = d / f"{name}.pem"
        ca_files = ("-CA", d / f"{ca}.pem", "-CAkey", d / f"{ca}.key", "-CAcreateserial")
        _openssl("x509", "-req", "-in", d / f"{who}.csr", *ca_files, "-days", days, "-extfile", ext, "-out", out)
        return out

    server_ext = _ext(d / "server.ext", "serverAuth", "DNS:localhost,IP:127.0.0.1")
    client_ext = _ext(d / "client.ext", "clientAuth")
    client = sign("client", "client", client_ext)
    combined = d / "client_combined.pem"
    combined.write_text(client.read_text() + (d / "client.key").read_text())
    return PKI(
        ca=d / "ca.pem",
        key=d / "server.key",
        server=sign("server", "server", server_ext),
        other_name=sign("other_name", "server", _ext(d / "other.ext", "serverAuth", "DNS:koa.invalid")),
        expired=sign("expired", "server", server_ext, days="-1"),  # notAfter before notBefore: expired
        client=client,
        client_key=d / "client.key",
        client_combined=combined,
        stranger=sign("stranger", "client", client_ext, ca="stranger_ca"),
    )


# --- servers ---------------------------------------------------------------------------------


def _server_context(pki: PKI, cert: Path, client_ca: Path | None) -> Any:
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, pki.key)
    if client_ca is not None:
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class _Predictions(BaseHTTPRequestHandler):
    """TorchServe's REST inference API, as far as the clients use it."""

    seen: list[str]
    page: bytes | None = None  # answer 400 with this page (a TLS proxy's error page)

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.seen.append(self.path)
        if self.page is not None:
            self.send_response(400)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(self.page)))
            self.end_headers()
            self.wfile.write(self.page)
            return
        ok = self.path == "/predictions/oamen"
        body = json.dumps(ANSWER if ok else {"code": 404, "type": "ModelNotFoundException", "message": self.path})
        self.send_response(200 if ok else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, *args: Any) -> None:  # keep pytest's output clean
        pass


HttpsServer = Callable[..., tuple[str, list[str]]]


@pytest.fixture()
def https_server(pki: PKI) -> Iterator[HttpsServer]:
    """start(cert=pki.server, client_ca=None, tls=True, port=0, page=None) -> (base URL, paths requested)."""
    started: list[ThreadingHTTPServer] = []

    def start(
        cert: Path | None = None,
        client_ca: Path | None = None,
        tls: bool = True,
        port: int = 0,
        page: bytes | None = None,
    ):
        handler = type("Predictions", (_Predictions,), {"seen": [], "page": page})
        server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        if tls:  # the handshake runs in accept(): a failed one is dropped there, quietly
            server.socket = _server_context(pki, cert or pki.server, client_ca).wrap_socket(
                server.socket, server_side=True
            )
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        started.append(server)
        return f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}", handler.seen

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def stubs() -> Any:
    try:
        from koa_client._proto import inference_pb2, inference_pb2_grpc
    except ImportError:
        from koa_client import gen_proto

        try:
            gen_proto.generate()
        except RuntimeError as exc:
            pytest.skip(f"cannot generate the gRPC stubs here: {exc}")
        from koa_client._proto import inference_pb2, inference_pb2_grpc
    return inference_pb2, inference_pb2_grpc


GrpcServer = Callable[..., tuple[int, list[str]]]


@pytest.fixture()
def grpcs_server(pki: PKI, stubs: Any) -> Iterator[GrpcServer]:
    """start(cert=pki.server, client_ca=None, tls=True) -> (port, model names requested)."""
    import grpc

    inference_pb2, inference_pb2_grpc = stubs
    started: list[Any] = []

    def start(cert: Path | None = None, client_ca: Path | None = None, tls: bool = True):
        seen: list[str] = []

        class Servicer(inference_pb2_grpc.InferenceAPIsServiceServicer):
            def Predictions(self, request, context):  # noqa: N802 (the proto's name)
                seen.append(request.model_name)
                return inference_pb2.PredictionResponse(prediction=json.dumps(ANSWER).encode())

            def Ping(self, request, context):  # noqa: N802
                return inference_pb2.TorchServeHealthResponse(health='{"status": "Healthy"}')

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server(Servicer(), server)
        if tls:
            credentials = grpc.ssl_server_credentials(
                [((pki.key).read_bytes(), (cert or pki.server).read_bytes())],
                root_certificates=client_ca.read_bytes() if client_ca is not None else None,
                require_client_auth=client_ca is not None,
            )
            port = server.add_secure_port("127.0.0.1:0", credentials)
        else:
            port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        started.append(server)
        return port, seen

    yield start
    for server in started:
        server.stop(grace=None)


def _fails_fast(call: Callable[[], Any]) -> KOAClientError:
    """The TLS error ``call`` raises, checked to come well within RETRY_S (so it was not retried)."""
    t0 = time.monotonic()
    with pytest.raises(KOAClientError) as info:
        call()
    assert time.monotonic() - t0 < FAST_S, "a certificate error was retried"
    assert info.value.status == TLS_STATUS and info.value.kind in ("certificate", "tls"), info.value
    assert "gave up after" not in info.value.message
    return info.value


# --- REST ------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_rest_https_with_the_ca(pki: PKI, https_server: HttpsServer, host: str) -> None:
    from koa_client.rest import RestClient

    url, seen = https_server()
    with RestClient(url.replace("127.0.0.1", host), token="t", ca_file=pki.ca, retry_s=RETRY_S) as client:
        answer = client.predict(PNG)
    validate_answer(answer)
    assert answer == ANSWER and seen == ["/predictions/oamen"]


@pytest.mark.parametrize(
    "cert, words",
    [(None, ["not signed by a CA", "--ca-file"]), ("other_name", ["does not name the host"]), ("expired", ["expired"])],
)
def test_rest_certificate_errors_fail_fast(pki: PKI, https_server: HttpsServer, cert: str | None, words) -> None:
    from koa_client.rest import RestClient

    url, seen = https_server(getattr(pki, cert) if cert else None)
    client = RestClient(url, token="t", ca_file=pki.ca if cert else None, retry_s=RETRY_S)
    err = _fails_fast(lambda: client.predict(PNG))
    assert err.kind == "certificate" and all(w in err.message for w in words), err.message
    assert seen == []


def test_rest_mutual_tls(pki: PKI, https_server: HttpsServer) -> None:
    from koa_client.rest import RestClient

    url, seen = https_server(client_ca=pki.ca)
    bare = RestClient(url, token="t", ca_file=pki.ca, retry_s=RETRY_S)
    err = _fails_fast(lambda: bare.predict(PNG))
    assert err.kind == "certificate" and "without a client certificate" in err.message and "--cert-file" in err.message
    stranger = RestClient(url, token="t", ca_file=pki.ca, cert_file=pki.stranger, cert_key_file=pki.client_key)
    err = _fails_fast(lambda: stranger.predict(PNG))
    assert "refused the client certificate" in err.message and str(pki.stranger) in err.message
    assert seen == []
    for cert, key in ((pki.client, pki.client_key), (pki.client_combined, None)):
        with RestClient(url, token="t", ca_file=pki.ca, cert_file=cert, cert_key_file=key) as client:
            assert client.predict(PNG) == ANSWER
    assert len(seen) == 2


def test_rest_tls_and_plain_text_mismatch(pki: PKI, https_server: HttpsServer) -> None:
    from koa_client.rest import RestClient

    tls_url, _ = https_server()
    err = _fails_fast(lambda: RestClient(tls_url.replace("https", "http"), token="t", retry_s=RETRY_S).predict(PNG))
    assert err.kind == "tls" and "speaks TLS" in err.message and "https://" in err.message
    plain_url, _ = https_server(tls=False)
    err = _fails_fast(lambda: RestClient(plain_url.replace("http", "https"), token="t", ca_file=pki.ca).predict(PNG))
    assert err.kind == "tls" and "does not speak TLS" in err.message


@pytest.mark.parametrize(
    "title, cert, words",
    [
        ("The plain HTTP request was sent to HTTPS port", False, ["speaks TLS", "https://"]),
        ("No required SSL certificate was sent", False, ["without a client certificate", "--cert-file"]),
        ("The SSL certificate error", True, ["refused the client certificate"]),
    ],
)
def test_rest_nginx_tls_pages(pki: PKI, https_server: HttpsServer, title: str, cert: bool, words: list[str]) -> None:
    """nginx in front of TorchServe answers TLS problems with a 400 page: reported as TLS errors, not retried."""
    from koa_client.rest import RestClient

    page = f"<html>\r\n<head><title>400 {title}</title></head>\r\n<body>\r\n<center><h1>400 Bad Request</h1>"
    url, seen = https_server(page=page.encode())
    certs = {"cert_file": pki.client, "cert_key_file": pki.client_key} if cert else {}
    client = RestClient(url, token="t", ca_file=pki.ca, retry_s=RETRY_S, **certs)
    err = _fails_fast(lambda: client.predict(PNG))
    assert all(w in err.message for w in words), err.message
    assert len(seen) == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rest_refused_is_retried_until_the_tls_server_is_up(pki: PKI, https_server: HttpsServer) -> None:
    from koa_client.rest import RestClient

    port = _free_port()
    threading.Timer(0.5, https_server, kwargs={"port": port}).start()
    client = RestClient(f"https://localhost:{port}", token="t", ca_file=pki.ca, retry_s=RETRY_S)
    assert client.predict(PNG) == ANSWER


@pytest.fixture()
def silent_port() -> Iterator[int]:
    """A port whose accept queue is full: a new connection hangs in SYN-SENT, a connect timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    time.sleep(0.05)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            pytest.skip("this kernel accepts connections past a full backlog: no connect timeout to test")
    except TimeoutError:
        pass
    except OSError as exc:  # refused: also "nothing sent", but not what this fixture is for
        pytest.skip(f"this kernel refuses past a full backlog ({exc})")
    try:
        yield port
    finally:
        for s in fillers:
            s.close()
        listener.close()


def _retried_until_deadline(call: Callable[[], Any], retry_s: float) -> KOAClientError:
    t0 = time.monotonic()
    with pytest.raises(KOAClientError) as info:
        call()
    elapsed = time.monotonic() - t0
    assert info.value.status == 503 and info.value.kind == "unreachable", info.value
    assert "gave up after" in info.value.message
    assert retry_s <= elapsed < retry_s + 1.5, elapsed
    return info.value


def test_rest_connect_timeout_is_retried(pki: PKI, silent_port: int) -> None:
    from koa_client.rest import RestClient

    client = RestClient(f"https://127.0.0.1:{silent_port}", token="t", ca_file=pki.ca, timeout=0.3, retry_s=1.0)
    err = _retried_until_deadline(lambda: client.predict(PNG), 1.0)
    assert "no connection" in err.message


def test_rest_tls_options_are_checked_before_sending(pki: PKI, tmp_path: Path) -> None:
    from koa_client.rest import RestClient

    with pytest.raises(ValueError, match="https://"):
        RestClient("http://127.0.0.1:8080", ca_file=pki.ca)
    with pytest.raises(ValueError, match="cert_file"):
        RestClient("https://127.0.0.1:8443", cert_key_file=pki.client_key)
    with pytest.raises(RuntimeError, match="not found"):
        RestClient("https://127.0.0.1:8443", ca_file=tmp_path / "missing.pem")
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(RuntimeError, match="no usable PEM"):
        RestClient("https://127.0.0.1:8443", ca_file=tmp_path / "junk.pem")
    with pytest.raises(RuntimeError, match="cannot be used"):
        RestClient("https://127.0.0.1:8443", cert_file=pki.client, cert_key_file=pki.key)  # not its key


# --- gRPC ------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_grpc_tls_with_the_ca(pki: PKI, grpcs_server: GrpcServer, host: str) -> None:
    from koa_client.grpc_client import GrpcClient

    port, seen = grpcs_server()
    with GrpcClient(f"grpcs://{host}:{port}", token="t", ca_file=pki.ca, timeout=5, retry_s=RETRY_S) as client:
        answer = client.predict(PNG)
        assert client.ping() == {"status": "Healthy"}
    validate_answer(answer)
    assert answer == ANSWER and seen == ["oamen"]
    with GrpcClient(f"{host}:{port}", token="t", tls=True, ca_file=pki.ca, timeout=5) as client:
        assert client.predict(PNG) == ANSWER


@pytest.mark.parametrize(
    "cert, words",
    [(None, ["not signed by a CA", "--ca-file"]), ("other_name", ["does not name the host"]), ("expired", ["expired"])],
)
def test_grpc_certificate_errors_fail_fast(pki: PKI, grpcs_server: GrpcServer, cert: str | None, words) -> None:
    from koa_client.grpc_client import GrpcClient

    port, seen = grpcs_server(getattr(pki, cert) if cert else None)
    client = GrpcClient(
        f"grpcs://127.0.0.1:{port}", token="t", ca_file=pki.ca if cert else None, timeout=5, retry_s=RETRY_S
    )
    err = _fails_fast(lambda: client.predict(PNG))
    assert err.kind == "certificate" and all(w in err.message for w in words), err.message
    assert seen == []


def test_grpc_mutual_tls(pki: PKI, grpcs_server: GrpcServer) -> None:
    from koa_client.grpc_client import GrpcClient

    port, seen = grpcs_server(client_ca=pki.ca)
    target = f"grpcs://localhost:{port}"
    bare = GrpcClient(target, token="t", ca_file=pki.ca, timeout=5, retry_s=RETRY_S)
    err = _fails_fast(lambda: bare.predict(PNG))
    assert "without a client certificate" in err.message and "--cert-file" in err.message
    stranger = GrpcClient(
        target, token="t", ca_file=pki.ca, cert_file=pki.stranger, cert_key_file=pki.client_key, retry_s=RETRY_S
    )
    err = _fails_fast(lambda: stranger.predict(PNG))
    assert "refused the client certificate" in err.message
    assert seen == []
    for cert, key in ((pki.client, pki.client_key), (pki.client_combined, None)):
        with GrpcClient(target, token="t", ca_file=pki.ca, cert_file=cert, cert_key_file=key, timeout=5) as client:
            assert client.predict(PNG) == ANSWER
    assert len(seen) == 2


def test_grpc_tls_and_plain_text_mismatch(pki: PKI, grpcs_server: GrpcServer) -> None:
    from koa_client.grpc_client import GrpcClient

    port, _ = grpcs_server()
    err = _fails_fast(lambda: GrpcClient(f"127.0.0.1:{port}", token="t", timeout=5, retry_s=RETRY_S).predict(PNG))
    assert err.kind == "tls" and f"grpcs://127.0.0.1:{port}" in err.message
    plain, _ = grpcs_server(tls=False)
    err = _fails_fast(lambda: GrpcClient(f"grpcs://127.0.0.1:{plain}", ca_file=pki.ca, timeout=5).predict(PNG))
    assert err.kind == "tls" and "does not speak TLS" in err.message


def test_grpc_connect_timeout_is_retried(pki: PKI, stubs: Any, silent_port: int) -> None:
    from koa_client.grpc_client import GrpcClient

    client = GrpcClient(f"grpcs://127.0.0.1:{silent_port}", token="t", ca_file=pki.ca, timeout=0.3, retry_s=1.0)
    err = _retried_until_deadline(lambda: client.predict(PNG), 1.0)
    assert "nothing was sent" in err.message


def test_grpc_target_forms(pki: PKI, stubs: Any) -> None:
    from koa_client.grpc_client import split_target

    assert split_target("127.0.0.1:7070") == ("127.0.0.1:7070", False)
    assert split_target("grpc://127.0.0.1:7070") == ("127.0.0.1:7070", False)
    assert split_target("grpcs://koa.example:443") == ("koa.example:443", True)
    assert split_target("koa.example:443", tls_files=True) == ("koa.example:443", True)
    assert split_target("dns:///koa.example:443", tls=True) == ("dns:///koa.example:443", True)
    with pytest.raises(ValueError, match="grpcs://"):
        split_target("grpc://127.0.0.1:7070", tls_files=True)
    with pytest.raises(ValueError, match="contradicts"):
        split_target("grpcs://127.0.0.1:7070", tls=False)


# --- CLI -------------------------------------------------------------------------------------


def test_cli_tls_options(pki: PKI, https_server: HttpsServer, tmp_path: Path, capsys) -> None:
    from koa_client.__main__ import main

    images = [tmp_path / f"knee_{i}.png" for i in range(3)]
    for image in images:
        image.write_bytes(PNG)
    url, seen = https_server(client_ca=pki.ca)
    tls = ["--ca-file", str(pki.ca), "--cert-file", str(pki.client), "--cert-key-file", str(pki.client_key)]
    assert main(["predict", str(images[0]), "--url", url, "--token", "t", *tls]) == 0
    assert "KL2" in capsys.readouterr().out
    t0 = time.monotonic()
    assert main(["predict", *map(str, images), "--url", url, "--token", "t", "--retry-s", str(RETRY_S)]) == 1
    assert time.monotonic() - t0 < FAST_S
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "--ca-file" in err  # said once, not once per image
    assert (
        main(["predict", str(images[0]), "--url", "http://127.0.0.1:1", "--ca-file", str(pki.ca), "--token", "t"]) == 2
    )
    assert "https://" in capsys.readouterr().err
    assert len(seen) == 1
