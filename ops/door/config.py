"""The HAProxy configuration of the secure front door: mutual TLS, identity, policy, rate limit, the door's
own key per replica and one audit line per request, in the order docs/SECURITY.md describes."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from model.paths import ROOT
from ops import pki
from ops.cluster.config import GRPC_SERVICE, SERVER_TIMEOUT_S, Front, Replica, health_and_checks

DEFAULT_WORKDIR = ROOT / "logs" / "door"
REST_PORT, GRPC_PORT, HEALTH_PORT = 8443, 7443, 8444
STATE_FILE = "door.json"
GRPC = GRPC_SERVICE
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
class DoorFront(Front):
    """Where the door listens (TLS REST, TLS gRPC, plain health for the orchestrator)."""

    rest_port: int = REST_PORT
    grpc_port: int = GRPC_PORT
    health_port: int = HEALTH_PORT



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
    replicas: list[Replica],
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
        "# Generated by ops/door/config.py: KOA-Serve's secure front door (docs/SECURITY.md). Do not edit; regenerate.",
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
        f"    timeout client {SERVER_TIMEOUT_S}s",
        f"    timeout server {SERVER_TIMEOUT_S}s",
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
    lines += health_and_checks(front, check_inter_ms, exporter=False)
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

