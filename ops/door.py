"""The secure front door: HAProxy terminating mutual TLS in front of TorchServe, one identity per calling system.

``python -m ops.door start|stop|status|reload|client-add|client-revoke|reload-crl|config [options]``
(``make serve TLS=1``, ``make cluster N=2 TLS=1``, ``make client-add NAME=x``, ``make client-revoke NAME=x``).

What the door does, in the order HAProxy applies it to every request (docs/SECURITY.md has the threat model):

1. TLS 1.2 or 1.3 only, forward-secret AEAD ciphers only, no session tickets; REST on ``--rest-port`` (8443,
   HTTP/1.1) and gRPC on ``--grpc-port`` (7443, HTTP/2 negotiated by ALPN). The server certificate, the client
   CA and the revocation list are files the operator names (``--cert``, ``--ca``, ``--crl``; ``make certs``
   makes development ones).
2. A client certificate is asked for and checked against the CA and the CRL. A request without one, or with one
   that is expired, revoked or from another CA, is answered 401 with a JSON body that names the reason (gRPC:
   UNAUTHENTICATED), and audited with the certificate's name when there is one. (The handshake is let through
   so that the refusal can say why and be audited; nothing reaches TorchServe.)
3. The certificate's CN is the caller's identity. Only identities in the policy file (``--policy``, JSON:
   ``{"clients": {"<name>": {"endpoints": ["predictions", "explanations"], "per_minute": 600}}}``) are served:
   another is 403 ``unknown_client``. Each may call the endpoints it lists (predictions, explanations; /ping for
   all); management, metrics and every other path are 403 ``endpoint_forbidden`` for everyone.
4. A per-client rate limit: a stick table keyed on the identity counts requests over 60 s; past the client's
   ``per_minute`` the answer is 429 (gRPC: RESOURCE_EXHAUSTED) while other clients are served.
5. The caller's ``Authorization`` header is dropped; the door adds TorchServe's inference key itself, per
   replica (each replica's own key, kept in a map readable by the door's user only), so callers never hold a key.
6. One audit line per request (ops/audit.py): HAProxy logs a JSON datagram (identity, endpoint, protocol,
   request id, status, grade or refusal type read from the answer, latency, TLS version) to the audit receiver,
   which chains it into ``<workdir>/audit.jsonl``.

Revocation without a restart: ``client-revoke`` renews the CRL and hands it to the running HAProxy through its
runtime API (``set ssl crl-file`` + ``commit ssl crl-file``): new handshakes see it at once, other clients'
connections stay open. ``client-add`` adds the identity to the running door's maps the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from model.paths import ROOT
from ops import cluster, pki
from ops import server as ts
from ops.procs import is_alive, read_pid

DEFAULT_WORKDIR = ROOT / "logs" / "door"
REST_PORT, GRPC_PORT, HEALTH_PORT = 8443, 7443, 8444
STATE_FILE = "door.json"
ENDPOINTS = ("predictions", "explanations")
DEFAULT_PER_MINUTE = 600
# Keys behind the door never leave the host: the door holds them, so they may live long (minutes).
REPLICA_KEY_MINUTES = 30 * 24 * 60
GRPC = cluster.GRPC_SERVICE
LUA = Path(__file__).with_name("door.lua")  # reads the grade or refusal type of an answer, for the audit line

# Modern settings (Mozilla's "intermediate" minus TLS 1.2's non-AEAD suites): forward secrecy and AEAD only.
CIPHERS_TLS12 = ":".join(
    f"ECDHE-{k}-{c}" for c in ("AES128-GCM-SHA256", "AES256-GCM-SHA384", "CHACHA20-POLY1305") for k in ("ECDSA", "RSA")
)
CIPHERSUITES_TLS13 = "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"

# OpenSSL's verify codes (X509_V_ERR_*) the refusals name.
VERIFY_REASONS = {
    "certificate_expired": (10,),
    "certificate_not_yet_valid": (9,),
    "certificate_revoked": (23,),
    "certificate_unknown_ca": (2, 18, 19, 20, 21),
}
# gRPC status codes for the refusals (a trailers-only answer: HTTP 200 with grpc-status).
GRPC_CODES = {401: 16, 403: 7, 429: 8}

# One JSON object per request; every string passes HAProxy's json converter. %Ts.%ms: accept time.
LOG_FORMAT = (
    '{"accept":"%Ts.%ms",'
    '"client":"%[var(txn.client),json(utf8s)]",'
    '"endpoint":"%[var(txn.endpoint)]",'
    '"protocol":"%[var(txn.proto)]",'
    '"model":"%[var(txn.model),json(utf8s)]",'
    '"request_id":"%ID",'
    '"status":"%ST",'
    '"grade":"%[var(txn.grade)]",'
    '"refusal":"%[var(txn.refusal),json(utf8s)]",'
    '"latency_ms":"%Ta",'
    '"tls":"%sslv"}'
)


class DoorError(RuntimeError):
    """The door did not come up, or a change could not be applied; the message says why and what to do."""


@dataclass
class DoorFiles:
    """The operator's files: the door's certificate with its key (PEM), the client CA, the CRL, the policy."""

    cert: str = str(pki.DEFAULT_DIR / "server.pem")
    ca: str = str(pki.DEFAULT_DIR / "ca.crt")
    crl: str = str(pki.DEFAULT_DIR / "crl.pem")
    policy: str = str(pki.DEFAULT_DIR / "clients.json")

    def check(self) -> None:
        for what, path in (
            ("certificate (--cert)", self.cert),
            ("client CA (--ca)", self.ca),
            ("CRL (--crl)", self.crl),
        ):
            if not Path(path).is_file():
                raise DoorError(f"the door's {what} {path} is missing: `make certs` makes development ones")


@dataclass
class DoorFront:
    """Where the door listens (TLS REST, TLS gRPC, plain health for the orchestrator)."""

    rest_port: int = REST_PORT
    grpc_port: int = GRPC_PORT
    health_port: int = HEALTH_PORT
    bind: str = "127.0.0.1"


@dataclass
class ClientPolicy:
    """What one calling system may do: its endpoints and its requests per minute."""

    endpoints: list[str] = field(default_factory=lambda: list(ENDPOINTS))
    per_minute: int = DEFAULT_PER_MINUTE

    def __post_init__(self) -> None:
        bad = [e for e in self.endpoints if e not in ENDPOINTS]
        if bad:
            raise ValueError(f"endpoints {bad}: a client may be given only {list(ENDPOINTS)}")
        if not (isinstance(self.per_minute, int) and self.per_minute > 0):
            raise ValueError(f"per_minute must be a positive integer, got {self.per_minute!r}")


# --------------------------------------------------------------------------- policy
def read_policy(path: str | os.PathLike[str]) -> dict[str, ClientPolicy]:
    p = Path(path)
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text())
        return {name: ClientPolicy(**spec) for name, spec in data.get("clients", {}).items()}
    except (ValueError, TypeError) as exc:
        raise DoorError(f"policy {p} is not valid: {exc}") from None


def write_policy(path: str | os.PathLike[str], policy: dict[str, ClientPolicy]) -> None:
    data = {
        "_comment": "Who may call the door (ops/door.py): identity (client certificate CN) -> endpoints, requests/min.",
        "clients": {name: asdict(p) for name, p in sorted(policy.items())},
    }
    cluster.write_private(Path(path), json.dumps(data, indent=2) + "\n")


def write_maps(workdir: Path, policy: dict[str, ClientPolicy], keys: dict[str, str]) -> None:
    """Write the door's maps: ``access.map`` (identity/endpoint -> 1), ``rates.map`` (identity -> per minute),
    ``keys.map`` (replica -> its inference key)."""
    lines = lambda rows: "".join(f"{k} {v}\n" for k, v in rows)  # noqa: E731
    cluster.write_private(
        workdir / "access.map", lines((f"{n}/{e}", 1) for n, p in policy.items() for e in p.endpoints)
    )
    cluster.write_private(workdir / "rates.map", lines((n, p.per_minute) for n, p in policy.items()))
    cluster.write_private(workdir / "keys.map", lines(keys.items()))


# --------------------------------------------------------------------------- configuration
def _refusal(status: int, code: str, message: str, grpc: bool) -> str:
    """An ``http-request return`` answering ``status`` with a JSON body (REST) or a gRPC status (gRPC).

    ``code`` ``%refusal`` stands for the reason the door found (``txn.refusal``: expired, revoked...).
    """
    dynamic = code == "%refusal"
    if grpc:
        msg = f"%[var(txn.refusal)]: {message}" if dynamic else f"{code}: {message}"
        return (
            f"http-request return status 200 hdr content-type application/grpc"
            f' hdr grpc-status {GRPC_CODES[status]} hdr grpc-message "{msg}"'
        )
    if dynamic:
        body = json.dumps({"code": status, "type": "@@", "message": message}).replace("@@", "%[var(txn.refusal)]")
        return f"http-request return status {status} content-type application/json lf-string '{body}'"
    body = json.dumps({"code": status, "type": code, "message": message})
    return f"http-request return status {status} content-type application/json string '{body}'"


def _frontend(name: str, port: int, front: DoorFront, files: DoorFiles, workdir: Path, grpc: bool) -> list[str]:
    wd = workdir
    alpn = "h2" if grpc else "http/1.1"
    lines = [
        f"frontend {name}",
        f"    bind {front.bind}:{port} ssl crt {files.cert} ca-file {files.ca} crl-file {files.crl}"
        f" verify optional ca-ignore-err all crt-ignore-err all alpn {alpn}",
        f"    log unix@{wd / 'audit.sock'} len 4096 format raw local0 info",
        f"    log-format '{LOG_FORMAT}'",
        "    unique-id-format %[uuid()]",
        "    http-request del-header X-Request-ID",
        "    unique-id-header X-Request-ID",
        f"    http-request set-var(txn.proto) str({'grpc' if grpc else 'rest'})",
        "    http-request set-var(txn.client) ssl_c_s_dn(CN) if { ssl_c_used }",
    ]
    # Which endpoint the request is for, before any refusal, so that every audit line names it.
    if grpc:
        lines += [
            f"    http-request set-var(txn.endpoint) str(predictions) if {{ path /{GRPC}/Predictions }}"
            f" || {{ path_beg /{GRPC}/StreamPredictions }}",
            f"    http-request set-var(txn.endpoint) str(ping) if {{ path /{GRPC}/Ping }}",
        ]
    else:
        lines += [
            "    http-request set-var(txn.endpoint) str(predictions) if { path_beg /predictions/ }",
            "    http-request set-var(txn.endpoint) str(explanations) if { path_beg /explanations/ }",
            "    http-request set-var(txn.endpoint) str(ping) if { path /ping }",
            "    http-request set-var(txn.model) path,field(3,/)"
            " if { var(txn.endpoint) -m reg ^(predictions|explanations)$ }",
        ]
    lines += [
        "    http-request set-var(txn.endpoint) str(other) unless { var(txn.endpoint) -m found }",
        # Read the body (up to one buffer) before any refusal: a client still sending its image when the door
        # answers and closes would see the connection reset instead of the refusal's reason.
        "    http-request wait-for-body time 5s",
    ]
    # 2. The certificate: present, trusted, valid, not revoked.
    lines += [
        # An ACL holds one fetch: a valid certificate is three (sent, no error on it, none on its CAs).
        "    acl cert_sent ssl_c_used",
        "    acl cert_clean ssl_c_err 0",
        "    acl ca_clean ssl_c_ca_err 0",
        "    http-request set-var(txn.refusal) str(certificate_missing) unless cert_sent",
    ]
    for code, errs in VERIFY_REASONS.items():
        # The same ACL name twice: either the leaf (depth 0) or a CA above it has the error.
        codes = " ".join(map(str, errs))
        lines += [f"    acl {code} ssl_c_err {codes}", f"    acl {code} ssl_c_ca_err {codes}"]
        lines.append(
            f"    http-request set-var(txn.refusal) str({code}) if cert_sent {code} !{{ var(txn.refusal) -m found }}"
        )
    lines += [
        "    http-request set-var(txn.refusal) str(certificate_invalid)"
        " if !{ var(txn.refusal) -m found } !cert_sent || !{ var(txn.refusal) -m found } !cert_clean"
        " || !{ var(txn.refusal) -m found } !ca_clean",
        "    "
        + _refusal(401, "%refusal", "a valid client certificate, signed by the CA of the door, is required", grpc)
        + " unless cert_sent cert_clean ca_clean",
        # 3. The identity must be in the policy (it has a rate); 4. the endpoint must be allowed for it.
        f"    http-request set-var(txn.limit) var(txn.client),map_str_int({wd / 'rates.map'})",
        "    http-request set-var(txn.refusal) str(unknown_client) unless { var(txn.limit) -m found }",
        "    "
        + _refusal(403, "unknown_client", "this client is not allowed to call the service", grpc)
        + " unless { var(txn.limit) -m found }",
        f"    http-request set-var(txn.allowed) var(txn.client),concat(/,txn.endpoint),map({wd / 'access.map'})",
        "    acl endpoint_ok var(txn.endpoint) -m str ping",
        "    acl endpoint_ok var(txn.allowed) -m found",
        "    http-request set-var(txn.refusal) str(endpoint_forbidden) unless endpoint_ok",
        "    "
        + _refusal(403, "endpoint_forbidden", "this client may not call this path", grpc)
        + " unless endpoint_ok",
        # 5. The rate limit, per identity (one table for REST and gRPC together).
        "    http-request track-sc0 var(txn.client) table door_rates",
        "    http-request set-var(txn.rate) sc_http_req_rate(0)",
        "    http-request set-var(txn.refusal) str(rate_limited) if { var(txn.rate),sub(txn.limit) gt 0 }",
        "    "
        + _refusal(429, "rate_limited", "too many requests from this client; slow down", grpc)
        + " if { var(txn.rate),sub(txn.limit) gt 0 }",
        # 6. The caller's credentials stay here; the door's own go to the replica (per replica, see backends).
        "    http-request del-header Authorization",
        "    http-request del-header X-KOA-Client",
        "    http-request set-header X-KOA-Client %[var(txn.client)]",
        # 7. The grade, or TorchServe's refusal type, for the audit line (the answer is small and JSON).
        "    http-response wait-for-body time 2s",
        # gRPC: the first 5 bytes are the frame's header (binary; the Lua converter gets the rest).
        f"    http-response set-var(txn.grade) res.body{',bytes(5)' if grpc else ''},lua.koa_grade",
        "    http-response set-var(txn.refusal) res.body,lua.koa_refusal"
        " if !{ status 200 } !{ var(txn.refusal) -m found }",
        f"    default_backend {'replicas_grpc' if grpc else 'replicas_rest'}",
        "",
    ]
    return lines


def door_config(
    replicas: list[cluster.Replica],
    front: DoorFront,
    files: DoorFiles,
    workdir: Path,
    check_inter_ms: int = 1000,
) -> str:
    """The HAProxy configuration of the door (text of ``haproxy.cfg``) for ``replicas``."""
    if not replicas:
        raise ValueError("door_config needs at least one replica")
    wd = Path(workdir).resolve()
    tag = hashlib.sha256(str(wd).encode()).hexdigest()[:10]  # abstract socket names unique to this door
    lines = [
        "# Generated by ops/door.py: KOA-Serve's secure front door (docs/SECURITY.md). Do not edit; regenerate.",
        "global",
        # 64 KiB buffers (a knee image is read whole before a refusal, see _frontend): 1024 connections at most.
        "    maxconn 1024",
        f"    lua-load {LUA}",
        # expose-fd: a reload takes the listening sockets over (-x), so connections queued on them are not lost.
        f"    stats socket {wd / 'haproxy.sock'} mode 600 level admin expose-fd listeners",
        "    ssl-default-bind-options ssl-min-ver TLSv1.2 no-tls-tickets",
        f"    ssl-default-bind-ciphers {CIPHERS_TLS12}",
        f"    ssl-default-bind-ciphersuites {CIPHERSUITES_TLS13}",
        "    tune.bufsize 65536",
        "",
        "defaults",
        "    mode http",
        "    timeout connect 2s",
        "    timeout check 3s",
        "    timeout http-request 60s",
        f"    timeout client {cluster.SERVER_TIMEOUT_S}s",
        f"    timeout server {cluster.SERVER_TIMEOUT_S}s",
        "    retries 2",
        "    option redispatch 1",
        f"    errorfile 502 {wd / '502.http'}",
        "",
        "backend door_rates",
        "    stick-table type string len 64 size 10k expire 2m store http_req_rate(60s)",
        "",
    ]
    lines += _frontend("rest", front.rest_port, front, files, wd, grpc=False)
    lines += _frontend("grpc", front.grpc_port, front, files, wd, grpc=True)
    lines += [
        "frontend health",
        f"    bind {front.bind}:{front.health_port}",
        '    http-request return status 200 content-type text/plain string "alive" if { path /live }',
        '    http-request return status 503 content-type text/plain string "no replica ready"'
        " if { path /ready } { nbsrv(replicas_rest) eq 0 }",
        '    http-request return status 200 content-type text/plain string "ready" if { path /ready }',
        "    http-request return status 404",
        "",
        "backend replicas_rest",
        "    balance leastconn",
        "    option httpchk",
        "    http-check send meth GET uri /ping",
        "    http-check expect status 200",
        f"    default-server inter {check_inter_ms} fall 2 rise 2",
    ]
    # Each replica through an inner proxy that adds that replica's own key (HAProxy picks the server after
    # the request rules ran, so the key cannot be set in the backend itself).
    lines += [f"    server {r.name} abns@koa-door-{tag}-{r.name}-rest check" for r in replicas]
    lines += ["", "backend replicas_grpc", "    balance leastconn"]
    lines += [
        f"    server {r.name} abns@koa-door-{tag}-{r.name}-grpc proto h2 track replicas_rest/{r.name}" for r in replicas
    ]
    for r in replicas:
        for kind, port, proto in (("rest", r.rest_port, ""), ("grpc", r.grpc_port, " proto h2")):
            lines += [
                "",
                f"listen {r.name}_{kind}",
                f"    bind abns@koa-door-{tag}-{r.name}-{kind}{proto}",
                f'    http-request set-header Authorization "Bearer %[str({r.name}),map({wd / "keys.map"})]"',
                f"    server ts {r.host}:{port}{proto}",
            ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- runtime API
def runtime(workdir: Path, command: str, payload: str | None = None, timeout: float = 10.0) -> str:
    """One command on the running door's stats socket (HAProxy's runtime API); returns its answer.

    ``payload`` is sent as the command's ``<<`` block (e.g. a CRL for ``set ssl crl-file``).
    """
    line = command if payload is None else f"{command} <<\n{payload.rstrip()}\n"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(Path(workdir) / "haproxy.sock"))
        sock.sendall(line.encode() + b"\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    except OSError as exc:
        raise DoorError(f"the door's runtime API ({Path(workdir) / 'haproxy.sock'}) did not answer: {exc}") from None
    finally:
        sock.close()
    return data.decode(errors="replace").strip()


def _pem_blocks(path: str | os.PathLike[str]) -> str:
    text = Path(path).read_text()
    return text[text.index("-----BEGIN") :]


def reload_crl(workdir: Path) -> str:
    """Hand the CRL file the door was started with to the running HAProxy, without a restart.

    New handshakes are checked against it at once; established connections (other clients') stay open.
    """
    state = load_state(workdir)
    if state is None or not is_alive(read_pid(Path(workdir) / "haproxy.pid")):
        raise DoorError(f"no door is running from {workdir}")
    crl = state["files"]["crl"]
    answer = runtime(workdir, f"set ssl crl-file {crl}", _pem_blocks(crl))
    if "transaction created" not in answer.lower() and "updated" not in answer.lower():
        raise DoorError(f"HAProxy refused the new CRL: {answer}")
    answer = runtime(workdir, f"commit ssl crl-file {crl}")
    if "success" not in answer.lower():
        raise DoorError(f"HAProxy did not commit the new CRL: {answer}")
    return answer


def apply_policy(workdir: Path, policy: dict[str, ClientPolicy]) -> None:
    """Make the running door's maps equal to ``policy`` (runtime API; also rewrites the map files).

    Entries are set, added and deleted one by one (never cleared first), so that a client that stays
    in the policy is never refused while the change is applied.
    """
    workdir = Path(workdir).resolve()
    keys = dict(ln.split(" ", 1) for ln in (workdir / "keys.map").read_text().splitlines() if ln)
    write_maps(workdir, policy, keys)
    for name in ("access.map", "rates.map"):
        path = workdir / name
        want = dict(ln.split(" ", 1) for ln in path.read_text().splitlines() if ln)
        # "show map" lines: <entry id> <key> <value>
        have = {ln.split()[1] for ln in runtime(workdir, f"show map {path}").splitlines() if len(ln.split()) >= 3}
        for k, v in want.items():
            runtime(workdir, f"{'set' if k in have else 'add'} map {path} {k} {v}")
        for k in have - set(want):
            runtime(workdir, f"del map {path} {k}")


# --------------------------------------------------------------------------- processes
def _state_path(workdir: Path) -> Path:
    return Path(workdir) / STATE_FILE


def load_state(workdir: Path) -> dict[str, Any] | None:
    try:
        return json.loads(_state_path(workdir).read_text())
    except (OSError, ValueError):
        return None


def start_receiver(workdir: Path) -> int:
    """The audit receiver (``python -m ops.audit serve``) on ``<workdir>/audit.sock``; returns its pid."""
    sock = workdir / "audit.sock"
    sock.unlink(missing_ok=True)
    with open(workdir / "audit-receiver.log", "a") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ops.audit", "serve", str(workdir / "audit.jsonl"), "--socket", str(sock)],
            cwd=ROOT,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + 15
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise DoorError(f"the audit receiver did not start; see {workdir / 'audit-receiver.log'}")
        time.sleep(0.05)
    (workdir / "audit-receiver.pid").write_text(f"{proc.pid}\n")
    return proc.pid


def _stop_pid(pidfile: Path, timeout: float = 10.0) -> bool:
    pid = read_pid(pidfile)
    if not is_alive(pid):
        return False
    os.kill(pid, signal.SIGTERM)  # type: ignore[arg-type]
    deadline = time.monotonic() + timeout
    while is_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if is_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # type: ignore[arg-type]
    return True


def start_replica(model_store: Path, workdir: Path, threads: int, timeout: float) -> tuple[cluster.Replica, str]:
    """One TorchServe on free loopback ports with token authorization ON; returns it and its inference key."""
    props = {"token_expiration_min": str(REPLICA_KEY_MINUTES)}
    with cluster._threads(threads):
        srv = ts.start_on_free_ports(model_store, workdir, timeout=timeout, properties=props)
    port = lambda url: int(url.rsplit(":", 1)[1])  # noqa: E731
    replica = cluster.Replica(
        name=Path(workdir).name,
        workdir=str(Path(workdir).resolve()),
        rest_port=port(srv.inference_url),
        grpc_port=srv.grpc_port,
        management_port=port(srv.management_url),
        metrics_port=port(srv.metrics_url),
    )
    return replica, ts.read_keys(workdir)["inference"]


def start_haproxy(workdir: Path, replicas: list[cluster.Replica], front: DoorFront, files: DoorFiles) -> int:
    workdir = Path(workdir).resolve()
    (workdir / "502.http").write_text(cluster.ERROR_502_AS_503)
    cfg = workdir / "haproxy.cfg"
    cluster.write_private(cfg, door_config(replicas, front, files, workdir))
    cluster.check_config(cfg)
    pidfile = workdir / "haproxy.pid"
    pidfile.unlink(missing_ok=True)
    log = workdir / "haproxy.log"
    with open(log, "w") as sink:
        proc = subprocess.run(
            [cluster.haproxy_binary(), "-D", "-f", str(cfg), "-p", str(pidfile)], stdout=sink, stderr=subprocess.STDOUT
        )
    pid = read_pid(pidfile)
    if proc.returncode != 0 or not is_alive(pid):
        raise DoorError(f"HAProxy did not start ({proc.returncode}): {log.read_text(errors='replace')[-2000:]}")
    return pid  # type: ignore[return-value]


def start(
    n: int = 1,
    workdir: Path = DEFAULT_WORKDIR,
    front: DoorFront | None = None,
    files: DoorFiles | None = None,
    model_store: Path = ROOT / "model_store",
    timeout: float = 240.0,
    threads: int | None = None,
    replicas: list[tuple[cluster.Replica, str]] | None = None,
) -> dict[str, Any]:
    """Start ``n`` TorchServe replicas, the audit receiver and HAProxy; returns the door's state.

    ``replicas``: (replica, inference key) of servers already running, used instead of starting ``n`` (tests).
    """
    workdir = Path(workdir).resolve()
    front, files = front or DoorFront(), files or DoorFiles()
    files.check()
    if running(workdir):
        raise DoorError(f"a door from {workdir} is running; `make stop TLS=1` first")
    cluster.haproxy_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(workdir, 0o700)
    policy = read_policy(files.policy)
    state: dict[str, Any] = {
        "front": asdict(front),
        "files": asdict(files),
        "replicas": [],
        "own_replicas": replicas is None,
    }
    try:
        if replicas is None:
            threads = threads or cluster.threads_per_replica(n)
            replicas = []
            for i in range(n):
                replicas.append(start_replica(model_store, workdir / f"r{i}", threads, timeout))
                state["replicas"] = [asdict(r) for r, _ in replicas]
                _state_path(workdir).write_text(json.dumps(state, indent=2))
        state["replicas"] = [asdict(r) for r, _ in replicas]
        write_maps(workdir, policy, {r.name: key for r, key in replicas})
        state["receiver_pid"] = start_receiver(workdir)
        _state_path(workdir).write_text(json.dumps(state, indent=2))
        state["haproxy_pid"] = start_haproxy(workdir, [r for r, _ in replicas], front, files)
        _state_path(workdir).write_text(json.dumps(state, indent=2))
        cluster.wait_for_states(workdir, {r.name: "UP" for r, _ in replicas}, timeout=30)
    except BaseException:
        stop(workdir)
        raise
    return state


def running(workdir: Path) -> bool:
    workdir = Path(workdir)
    state = load_state(workdir)
    if state is None:
        return False
    alive = [is_alive(read_pid(workdir / p)) for p in ("haproxy.pid", "audit-receiver.pid")]
    if state.get("own_replicas"):
        alive += [is_alive(ts.server_pid(Path(r["workdir"]))) for r in state["replicas"]]
    return any(alive)


def stop(workdir: Path = DEFAULT_WORKDIR) -> bool:
    """Stop HAProxy (it finishes the requests it holds), then the audit receiver, then the door's replicas."""
    workdir = Path(workdir).resolve()
    state = load_state(workdir)
    was = cluster.stop_balancer(workdir)
    time.sleep(0.2)  # the last log datagrams reach the receiver before it goes
    was = _stop_pid(workdir / "audit-receiver.pid") or was
    if state is not None and state.get("own_replicas"):
        for r in state["replicas"]:
            was = ts.stop(Path(r["workdir"])) or was
    _state_path(workdir).unlink(missing_ok=True)
    return was


def reload(workdir: Path = DEFAULT_WORKDIR) -> int:
    """Restart the door without losing a request: a new HAProxy on the same configuration takes the
    listening sockets over from the old one (``-x``: connections waiting in their queue stay there) and
    the old one finishes the requests it holds (``-sf``). It re-reads the certificate, CA, CRL and maps
    from their files (a new server certificate, say). The rate counters start again. Returns the new pid."""
    workdir = Path(workdir).resolve()
    old = read_pid(workdir / "haproxy.pid")
    if not is_alive(old):
        raise DoorError(f"no door is running from {workdir}")
    cfg = workdir / "haproxy.cfg"
    cluster.check_config(cfg)
    cmd = [cluster.haproxy_binary(), "-D", "-f", str(cfg), "-p", str(workdir / "haproxy.pid")]
    cmd += ["-x", str(workdir / "haproxy.sock"), "-sf", str(old)]
    with open(workdir / "haproxy.log", "a") as sink:
        proc = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT)
    pid = read_pid(workdir / "haproxy.pid")
    if proc.returncode != 0 or pid == old or not is_alive(pid):
        raise DoorError(f"the door's reload failed ({proc.returncode}); see {workdir / 'haproxy.log'}")
    return pid  # type: ignore[return-value]


def dropped_logs(workdir: Path) -> int:
    """Log lines HAProxy could not send to the audit receiver since it started (``show info``: DroppedLogs)."""
    for ln in runtime(workdir, "show info").splitlines():
        if ln.startswith("DroppedLogs:"):
            return int(ln.split(":", 1)[1])
    return 0


# --------------------------------------------------------------------------- clients
def client_add(
    name: str,
    files: DoorFiles,
    certs: Path = pki.DEFAULT_DIR,
    workdir: Path | None = None,
    policy: ClientPolicy | None = None,
    issue: bool = True,
) -> pki.ClientCert | None:
    """Issue ``name`` a certificate from the development CA (unless ``issue`` is False: the hospital's PKI
    issued it) and allow it in the policy; a running door from ``workdir`` admits it at once."""
    cert = pki.add_client(name, certs) if issue else None
    pol = read_policy(files.policy)
    pol[name] = policy or ClientPolicy()
    write_policy(files.policy, pol)
    if workdir is not None and running(workdir):
        apply_policy(workdir, pol)
    return cert


def client_revoke(name: str, files: DoorFiles, certs: Path = pki.DEFAULT_DIR, workdir: Path | None = None) -> None:
    """Revoke ``name``'s certificate, renew the CRL and take the name out of the policy; a running door from
    ``workdir`` loads both at once, without dropping other clients' connections."""
    pki.revoke_client(name, certs)
    pol = read_policy(files.policy)
    pol.pop(name, None)
    write_policy(files.policy, pol)
    if workdir is not None and running(workdir):
        reload_crl(workdir)
        apply_policy(workdir, pol)


# --------------------------------------------------------------------------- command line
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "command", choices=("start", "stop", "status", "reload", "client-add", "client-revoke", "reload-crl", "config")
    )
    p.add_argument("name", nargs="?", help="client-add / client-revoke: the calling system's name (its CN)")
    p.add_argument("--replicas", "-n", type=int, default=1)
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    p.add_argument("--model-store", type=Path, default=ROOT / "model_store")
    p.add_argument("--rest-port", type=int, default=REST_PORT)
    p.add_argument("--grpc-port", type=int, default=GRPC_PORT)
    p.add_argument("--health-port", type=int, default=HEALTH_PORT)
    p.add_argument("--certs", type=Path, default=pki.DEFAULT_DIR, help="the development CA (client-add/-revoke)")
    p.add_argument("--cert", default=DoorFiles.cert, help="the door's certificate, chain and key (PEM)")
    p.add_argument("--ca", default=DoorFiles.ca, help="the CA(s) that sign client certificates (PEM)")
    p.add_argument("--crl", default=DoorFiles.crl, help="the revocation list (PEM)")
    p.add_argument("--policy", default=DoorFiles.policy, help="who may call what (JSON)")
    p.add_argument("--endpoints", default=",".join(ENDPOINTS), help="client-add: the endpoints it may call")
    p.add_argument("--per-minute", type=int, default=DEFAULT_PER_MINUTE, help="client-add: its rate limit")
    p.add_argument("--no-issue", action="store_true", help="client-add: only allow NAME (its certificate exists)")
    p.add_argument("--timeout", type=float, default=240.0)
    p.add_argument("--threads", type=int, default=None)
    return p


def main(args: argparse.Namespace) -> int:
    files = DoorFiles(args.cert, args.ca, args.crl, args.policy)
    front = DoorFront(args.rest_port, args.grpc_port, args.health_port)
    try:
        if args.command == "start":
            t0 = time.monotonic()
            a = args
            state = start(a.replicas, a.workdir, front, files, a.model_store, a.timeout, a.threads)
            up = f"{len(state['replicas'])} TorchServe replica(s) behind TLS"
            print(f"the door is up: {up} ({time.monotonic() - t0:.0f} s)")
            print(f"  REST   https://127.0.0.1:{front.rest_port}/predictions/{ts.MODEL_NAME}  (client certificate)")
            print(f"  gRPC   grpcs://127.0.0.1:{front.grpc_port}")
            print(f"  health http://127.0.0.1:{front.health_port}/ready")
            print(f"  audit  {Path(args.workdir) / 'audit.jsonl'} (python -m ops.audit verify)")
            if not read_policy(files.policy):
                print(f"  no client is allowed yet: make client-add NAME=<system> (policy {files.policy})")
        elif args.command == "stop":
            print("stopped" if stop(args.workdir) else "not running")
        elif args.command == "status":
            if not running(args.workdir):
                print("not running")
                return 1
            for name, status in cluster.server_states(args.workdir).items():
                print(f"{name}: {status}")
            print(
                f"audit receiver: {'alive' if is_alive(read_pid(args.workdir / 'audit-receiver.pid')) else 'DEAD'};"
                f" log lines dropped: {dropped_logs(args.workdir)}"
            )
        elif args.command == "config":
            print(door_config([cluster.Replica("r0", "", 8080, 7070)], front, files, args.workdir), end="")
        elif args.command == "reload":
            print(f"the door reloaded (HAProxy pid {reload(args.workdir)})")
        elif args.command == "reload-crl":
            print(reload_crl(args.workdir))
        else:
            if not args.name:
                raise ValueError(f"{args.command} needs the client's name (make {args.command} NAME=<system>)")
            if args.command == "client-add":
                pol = ClientPolicy([e for e in args.endpoints.split(",") if e], args.per_minute)
                c = client_add(args.name, files, args.certs, args.workdir, pol, issue=not args.no_issue)
                if c is not None:
                    print(f"issued {c.cert} and {c.key} (CN={c.name}; development CA)")
                print(f"{args.name} may call {pol.endpoints}, {pol.per_minute}/min (policy {files.policy})")
            else:
                client_revoke(args.name, files, args.certs, args.workdir)
                print(f"revoked {args.name}: new CRL {files.crl}; out of the policy")
    except (DoorError, cluster.ClusterError, ts.ServeError, pki.PKIError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
