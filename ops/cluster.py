"""N TorchServe replicas on one machine behind HAProxy, with one bearer token checked at the front.

``python -m ops.cluster start|stop|status|token|rotate|reload|k8s-configmap [--replicas N] [--workdir DIR]``

``start`` starts N replicas (`ops.server.start_on_free_ports`: each its own free ports, work folder
``<workdir>/r<i>`` and worker socket, every address on 127.0.0.1) and then HAProxy (Debian package
``haproxy``) in front of them: REST on ``--rest-port`` (8180), gRPC on ``--grpc-port`` (7170, HTTP/2
cleartext, balanced per call, not per connection) and an unauthenticated health endpoint on
``--health-port`` (8190: ``/live``, ``/ready``). HAProxy checks ``GET /ping`` on every replica each
second; gRPC follows the REST check of the same replica. It returns when a graded request passes
through the balancer. ``stop`` stops HAProxy and every replica and returns when all are gone.

Authentication (docs/DEPLOY.md): TorchServe writes new keys of its own at every start, so N replicas
never share one. Here the balancer owns authentication instead: it accepts the bearer tokens listed
in ``<workdir>/tokens.lst`` (made at the first start, mode 600) and answers anything else with 401
before it reaches a replica; the replicas run with ``disable_token_authorization=true`` and listen on
127.0.0.1 only. ``<workdir>/key_file.json`` holds the current token in TorchServe's key-file format,
so every tool that takes ``--key-file`` works unchanged. ``rotate`` makes a new token, keeps the
previous one accepted until the next rotation, and reloads HAProxy without dropping connections.

The same HAProxy configuration, for one replica in the same pod, is the Kubernetes sidecar's:
``k8s-configmap`` writes it into deploy/k8s/configmap.yaml (tests/test_deploy.py checks it is current).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from model.paths import ROOT
from model.settings import TORCH_THREADS
from ops import server as ts
from ops.procs import is_alive, read_pid

DEFAULT_WORKDIR = ROOT / "logs" / "cluster"
REST_PORT, GRPC_PORT, HEALTH_PORT = 8180, 7170, 8190
STATE_FILE = "cluster.json"
TOKENS_FILE = "tokens.lst"
KEY_FILE = "key_file.json"
# TorchServe's responseTimeout for the model is 120 s (config.properties): the balancer waits longer,
# so that a slow answer is the replica's to give, not a 504 of the balancer's.
SERVER_TIMEOUT_S = 150
GRPC_SERVICE = "org.pytorch.serve.grpc.inference.InferenceAPIsService"
# What the front lets through: /ping and inference only. Management, metrics, the API description and
# TorchServe's KServe-style /v1 and /v2 paths stay on the replicas' loopback ports.
REST_PREFIXES = ("/predictions/", "/explanations/")
# Body of the 401 the balancer gives for a missing or wrong token: the shape of TorchServe's own
# error bodies ({code, type, message}), which the clients read (koa_client.error_from_answer).
UNAUTHORIZED = '{"code": 401, "type": "Unauthorized", "message": "missing or invalid bearer token"}'


class ClusterError(RuntimeError):
    """The cluster did not come up (or go down) as asked; the message says why and what to do."""


@dataclass
class Replica:
    """One TorchServe behind the balancer: its name, work folder and loopback ports."""

    name: str
    workdir: str
    rest_port: int
    grpc_port: int
    management_port: int = 0
    metrics_port: int = 0
    host: str = "127.0.0.1"


@dataclass
class Front:
    """Where the balancer listens: REST, gRPC (HTTP/2 cleartext) and the unauthenticated health endpoint."""

    rest_port: int = REST_PORT
    grpc_port: int = GRPC_PORT
    health_port: int = HEALTH_PORT
    bind: str = "127.0.0.1"


# --------------------------------------------------------------------------- HAProxy configuration
def haproxy_config(
    replicas: list[Replica],
    front: Front,
    token_file: str,
    errorfile_502: str,
    stats_socket: str | None = None,
    check_inter_ms: int = 1000,
) -> str:
    """The HAProxy configuration of the balancer (text of ``haproxy.cfg``).

    - Every request on the REST and gRPC fronts needs ``Authorization: Bearer <token>`` with a token
      listed in ``token_file``; otherwise 401 (gRPC clients see UNAUTHENTICATED). Only the inference
      paths pass (``/ping``, ``REST_PREFIXES``, the gRPC inference service); anything else gets 404.
    - Replicas are checked with ``GET /ping`` every ``check_inter_ms``; 2 failures take one out,
      2 successes bring it back. gRPC servers follow the REST check of the same replica.
    - A replica that refuses the connection is skipped (``retries`` with ``redispatch``); one that
      drops a request it had taken (killed mid-request) makes HAProxy answer 502, which
      ``errorfile_502`` turns into a 503 that the KOA clients send again (grading is a pure function
      of the image, so a resent request cannot do harm).
    """
    if not replicas:
        raise ValueError("haproxy_config needs at least one replica")
    b = front.bind
    rest_prefixes = " ".join(REST_PREFIXES)
    lines = [
        "# Generated by ops/cluster.py: KOA-Serve's balancer in front of TorchServe replicas (docs/DEPLOY.md).",
        "global",
        "    maxconn 4096",
    ]
    if stats_socket:
        lines.append(f"    stats socket {stats_socket} mode 600 level admin")
    lines += [
        "",
        "defaults",
        "    mode http",
        "    timeout connect 2s",
        "    # A /ping answers in milliseconds; on a saturated machine it may wait behind the grading.",
        "    timeout check 3s",
        "    timeout http-request 60s",
        f"    timeout client {SERVER_TIMEOUT_S}s",
        f"    timeout server {SERVER_TIMEOUT_S}s",
        "    # A refused connection (replica down, not yet marked DOWN) is sent to another replica.",
        "    retries 2",
        "    option redispatch 1",
        f"    errorfile 502 {errorfile_502}",
        "",
        "frontend rest",
        f"    bind {b}:{front.rest_port}",
        f"    acl token_ok http_auth_bearer -m str -f {token_file}",
        f"    http-request return status 401 content-type application/json string '{UNAUTHORIZED}'"
        ' hdr WWW-Authenticate "Bearer" unless token_ok',
        f"    http-request return status 404 content-type application/json string"
        f' \'{{"code": 404, "type": "NotFound", "message": "not served here"}}\''
        f" unless {{ path /ping }} || {{ path_beg {rest_prefixes} }}",
        "    # The token stays at the front: replicas and their logs never see it.",
        "    http-request del-header Authorization",
        "    default_backend replicas_rest",
        "",
        "frontend grpc",
        f"    bind {b}:{front.grpc_port} proto h2",
        f"    acl token_ok http_auth_bearer -m str -f {token_file}",
        "    http-request return status 401 unless token_ok",
        f"    http-request return status 404 unless {{ path_beg /{GRPC_SERVICE}/ }}",
        "    http-request del-header Authorization",
        "    default_backend replicas_grpc",
        "",
        "frontend health",
        f"    bind {b}:{front.health_port}",
        '    http-request return status 200 content-type text/plain string "alive" if { path /live }',
        '    http-request return status 503 content-type text/plain string "no replica ready"'
        " if { path /ready } { nbsrv(replicas_rest) eq 0 }",
        '    http-request return status 200 content-type text/plain string "ready" if { path /ready }',
        "    # HAProxy's own Prometheus exporter: requests, errors and replica states (docs/MONITORING.md)",
        "    http-request use-service prometheus-exporter if { path /metrics }",
        "    http-request return status 404",
        "",
        "backend replicas_rest",
        "    balance leastconn",
        "    option httpchk",
        "    http-check send meth GET uri /ping",
        "    http-check expect status 200",
        f"    default-server inter {check_inter_ms} fall 2 rise 2",
    ]
    lines += [f"    server {r.name} {r.host}:{r.rest_port} check" for r in replicas]
    lines += [
        "",
        "backend replicas_grpc",
        "    balance leastconn",
    ]
    lines += [f"    server {r.name} {r.host}:{r.grpc_port} proto h2 track replicas_rest/{r.name}" for r in replicas]
    return "\n".join(lines) + "\n"


ERROR_502_AS_503 = (
    "HTTP/1.1 503 Service Unavailable\r\n"
    "Content-Type: application/json\r\n"
    "Cache-Control: no-cache\r\n"
    "Connection: close\r\n"
    "\r\n"
    '{"code": 503, "type": "ReplicaLost", "message": "the replica closed the connection without answering;'
    ' send the request again"}\n'
)


K8S_DIR = ROOT / "deploy" / "k8s"
K8S_TOKEN_FILE = "/etc/koa-serve/tokens/tokens.lst"  # the Secret koa-serve-tokens, mounted (deployment.yaml)
K8S_HAPROXY_DIR = "/usr/local/etc/haproxy"  # where the official haproxy image reads haproxy.cfg


def k8s_sidecar_config() -> str:
    """The sidecar's haproxy.cfg in a Kubernetes pod: one TorchServe on the pod's loopback (deploy/k8s/)."""
    props = ts.parse_properties((ROOT / "deploy" / "config.properties").read_text())
    replica = Replica(
        "torchserve",
        "",
        rest_port=int(props["inference_address"].rsplit(":", 1)[1]),
        grpc_port=int(props["grpc_inference_port"]),
    )
    front = Front(rest_port=8080, grpc_port=7070, health_port=8090, bind="0.0.0.0")
    return haproxy_config([replica], front, K8S_TOKEN_FILE, f"{K8S_HAPROXY_DIR}/502.http")


def k8s_configmap() -> str:
    """deploy/k8s/configmap.yaml: TorchServe's config.properties and the sidecar's files, from their sources."""

    def block(text: str) -> str:
        return "\n".join(f"    {ln}" if ln else "" for ln in text.rstrip("\n").split("\n"))

    props = (ROOT / "deploy" / "config.properties").read_text()
    return f"""# The pod's configuration (deploy/k8s/deployment.yaml mounts each key where its container reads it):
# - config.properties: TorchServe's, identical to deploy/config.properties (baked into the image);
# - haproxy.cfg and 502.http: the auth sidecar's, the same balancer as `make cluster`.
# Generated by `python -m ops.cluster k8s-configmap` (tests/test_deploy.py checks it is current):
# edit the sources and regenerate rather than edit here.
apiVersion: v1
kind: ConfigMap
metadata:
  name: koa-serve
  labels:
    app.kubernetes.io/name: koa-serve
data:
  config.properties: |
{block(props)}
  haproxy.cfg: |
{block(k8s_sidecar_config())}
  502.http: {json.dumps(ERROR_502_AS_503)}
"""


# --------------------------------------------------------------------------- tokens
def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (created with mode 600, never wider)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def new_token() -> str:
    """A fresh bearer token: 256 random bits, URL-safe (HAProxy's pattern file takes it as one word)."""
    return secrets.token_urlsafe(32)


def read_tokens(workdir: Path) -> list[str]:
    """The tokens the balancer accepts, newest last."""
    path = Path(workdir) / TOKENS_FILE
    if not path.is_file():
        return []
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def write_tokens(workdir: Path, tokens: list[str]) -> None:
    """``tokens.lst`` (accepted by the balancer) and ``key_file.json`` (the newest, for the clients)."""
    header = "# Bearer tokens the balancer accepts, one per line (ops/cluster.py; docs/DEPLOY.md)\n"
    write_private(Path(workdir) / TOKENS_FILE, header + "".join(f"{t}\n" for t in tokens))
    # TorchServe's key-file shape, so that --key-file / KOA_KEY_FILE work as against one server.
    key = {"inference": {"key": tokens[-1]}, "management": {"key": ""}, "API": {"key": ""}}
    write_private(Path(workdir) / KEY_FILE, json.dumps(key, indent=2) + "\n")


def ensure_token(workdir: Path) -> str:
    """The current token; one is made at the first start and kept across restarts of the cluster."""
    tokens = read_tokens(workdir)
    if not tokens:
        tokens = [new_token()]
        write_tokens(workdir, tokens)
    return tokens[-1]


# --------------------------------------------------------------------------- HAProxy process
def haproxy_binary() -> str:
    exe = shutil.which("haproxy") or next((p for p in ("/usr/sbin/haproxy",) if Path(p).is_file()), None)
    if exe is None:
        raise ClusterError("HAProxy is not installed: sudo apt-get install -y haproxy")
    return exe


def check_config(cfg: Path) -> None:
    """``haproxy -c``: raises ClusterError with HAProxy's own words when the file is not valid."""
    proc = subprocess.run([haproxy_binary(), "-c", "-q", "-f", str(cfg)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ClusterError(f"HAProxy refuses {cfg}:\n{(proc.stdout + proc.stderr).strip()[-3000:]}")


def start_balancer(workdir: Path, replicas: list[Replica], front: Front) -> int:
    """Write ``haproxy.cfg`` for ``replicas`` and start HAProxy in the background; returns its pid."""
    workdir = Path(workdir).resolve()
    errorfile = workdir / "502.http"
    errorfile.write_text(ERROR_502_AS_503)
    cfg = workdir / "haproxy.cfg"
    cfg.write_text(
        haproxy_config(replicas, front, str(workdir / TOKENS_FILE), str(errorfile), str(workdir / "haproxy.sock"))
    )
    check_config(cfg)
    pidfile = workdir / "haproxy.pid"
    pidfile.unlink(missing_ok=True)
    log = workdir / "haproxy.log"
    with open(log, "w") as sink:
        proc = subprocess.run(
            [haproxy_binary(), "-D", "-f", str(cfg), "-p", str(pidfile)], stdout=sink, stderr=subprocess.STDOUT
        )
    pid = read_pid(pidfile)
    if proc.returncode != 0 or not is_alive(pid):
        raise ClusterError(f"HAProxy did not start ({proc.returncode}): {log.read_text(errors='replace')[-2000:]}")
    return pid  # type: ignore[return-value]


def reload_balancer(workdir: Path) -> int:
    """Start a new HAProxy on the same configuration and hand over (``-sf``): re-reads ``tokens.lst``.

    The old process stops listening, finishes the requests it holds and exits; no connection is refused.
    """
    workdir = Path(workdir).resolve()
    pidfile = workdir / "haproxy.pid"
    old = read_pid(pidfile)
    cfg = workdir / "haproxy.cfg"
    check_config(cfg)
    cmd = [haproxy_binary(), "-D", "-f", str(cfg), "-p", str(pidfile)]
    if is_alive(old):
        cmd += ["-sf", str(old)]
    with open(workdir / "haproxy.log", "a") as sink:
        proc = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT)
    pid = read_pid(pidfile)
    if proc.returncode != 0 or pid == old or not is_alive(pid):
        raise ClusterError(f"HAProxy reload failed ({proc.returncode}); see {workdir / 'haproxy.log'}")
    return pid  # type: ignore[return-value]


def stop_balancer(workdir: Path, timeout: float = 10.0) -> bool:
    """SIGTERM HAProxy and wait until it is gone (SIGKILL after ``timeout``). False if it was not running."""
    pid = read_pid(Path(workdir) / "haproxy.pid")
    if not is_alive(pid):
        return False
    os.kill(pid, signal.SIGTERM)  # type: ignore[arg-type]
    deadline = time.monotonic() + timeout
    while is_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if is_alive(pid):
        os.kill(pid, signal.SIGKILL)  # type: ignore[arg-type]
        while is_alive(pid):
            time.sleep(0.05)
    return True


def server_stats(workdir: Path) -> dict[tuple[str, str], dict[str, str]]:
    """HAProxy's ``show stat`` from the stats socket: {(backend, server): its row (status, hrsp_2xx...)}."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    try:
        sock.connect(str(Path(workdir) / "haproxy.sock"))
        sock.sendall(b"show stat\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    finally:
        sock.close()
    lines = data.decode().splitlines()
    header = lines[0].lstrip("# ").split(",")
    rows = {}
    for line in lines[1:]:
        row = dict(zip(header, line.split(",")))
        if row.get("svname") not in ("BACKEND", "FRONTEND", None):
            rows[(row["pxname"], row["svname"])] = row
    return rows


def server_states(workdir: Path) -> dict[str, str]:
    """{replica name: HAProxy's status (UP, DOWN, 'UP 1/2', MAINT...)} of the REST backend."""
    return {sv: row.get("status", "") for (px, sv), row in server_stats(workdir).items() if px == "replicas_rest"}


def answered(workdir: Path, replica: str) -> int:
    """Requests ``replica`` has answered with a 2xx through the balancer so far, REST and gRPC."""
    stats = server_stats(workdir)
    return sum(int(stats[(px, replica)].get("hrsp_2xx") or 0) for px in ("replicas_rest", "replicas_grpc"))


def wait_for_states(workdir: Path, want: dict[str, str], timeout: float = 30.0) -> dict[str, str]:
    """Poll `server_states` until every named replica has the wanted status (UP, DOWN)."""
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        states = server_states(workdir)
        # Exact: "UP 1/2" is a server going down, "DOWN 1/2" one coming up.
        if all(states.get(k, "") == v for k, v in want.items()):
            return states
        time.sleep(0.1)
    raise ClusterError(f"HAProxy's replicas are {states}, not {want} within {timeout:.0f} s")


# --------------------------------------------------------------------------- the cluster
def _state_path(workdir: Path) -> Path:
    return Path(workdir) / STATE_FILE


def load_state(workdir: Path) -> dict[str, Any] | None:
    try:
        return json.loads(_state_path(workdir).read_text())
    except (OSError, ValueError):
        return None


def replicas_of(state: dict[str, Any]) -> list[Replica]:
    return [Replica(**r) for r in state["replicas"]]


def replica_keys(workdir: Path) -> dict[str, str]:
    """The keys `ops.server.start` polls a replica with: none, when its config turns token authorization off.

    TorchServe 0.12 writes no key file when token authorization is off, so such a replica (its own config
    says so) is polled without a key; any other server still needs its key file.
    """
    try:
        return ts.read_keys(workdir)
    except ts.ServeError:
        config = Path(workdir) / "config.properties"
        if config.is_file() and ts.parse_properties(config.read_text()).get("disable_token_authorization") == "true":
            return {"inference": "", "management": "", "api": ""}
        raise


@contextlib.contextmanager
def _threads(threads: int) -> Iterator[None]:
    """A replica's share of the cores: N workers share the machine's cores, so each gets ``threads``
    (``KOA_TORCH_THREADS``, inherited through Java), or they would fight over every core."""
    saved = os.environ.get(TORCH_THREADS.name)
    os.environ[TORCH_THREADS.name] = str(threads)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(TORCH_THREADS.name, None)
        else:
            os.environ[TORCH_THREADS.name] = saved


def start_replica(model_store: Path, workdir: Path, threads: int, timeout: float = 240.0) -> Replica:
    """One TorchServe on free loopback ports, token authorization off (the balancer checks the token)."""
    with _threads(threads):
        srv = ts.start_on_free_ports(
            model_store,
            workdir,
            timeout=timeout,
            properties={"disable_token_authorization": "true"},
            keys=replica_keys,
        )
    port = lambda url: int(url.rsplit(":", 1)[1])  # noqa: E731
    return Replica(
        name=Path(workdir).name,
        workdir=str(Path(workdir).resolve()),
        rest_port=port(srv.inference_url),
        grpc_port=srv.grpc_port,
        management_port=port(srv.management_url),
        metrics_port=port(srv.metrics_url),
    )


def restart_replica(replica: Replica, model_store: Path, threads: int, timeout: float = 240.0) -> None:
    """Start a stopped (or killed) replica again on its own ports, from its rendered configuration."""
    wd = Path(replica.workdir)
    with _threads(threads):
        ts.start(model_store, wd / "config.properties", wd, timeout=timeout, keys=replica_keys)


def kill_replica(replica: Replica) -> list[int]:
    """SIGKILL a replica's Java frontend and its workers at once (a crashed server); returns their pids."""
    java = ts.server_pid(Path(replica.workdir))
    if not is_alive(java):
        raise ClusterError(f"replica {replica.name} is not running")
    pids = [java, *ts.descendants(java)]  # type: ignore[list-item]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    while any(is_alive(p) for p in pids):
        time.sleep(0.02)
    return pids


def threads_per_replica(n: int) -> int:
    return max(1, (os.cpu_count() or 1) // n)


def probe(front: Front, token: str, image: bytes, timeout: float = 60.0) -> dict[str, Any]:
    """One graded request through the balancer (REST), sent until it answers 200 or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        req = urllib.request.Request(
            f"http://127.0.0.1:{front.rest_port}/predictions/{ts.MODEL_NAME}",
            data=image,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "image/png"},
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            last = f"{exc.code} {exc.read()[:200]!r}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.5)
    raise ClusterError(f"no graded answer through the balancer within {timeout:.0f} s (last: {last})")


def start(
    n: int,
    workdir: Path = DEFAULT_WORKDIR,
    front: Front | None = None,
    model_store: Path = ROOT / "model_store",
    timeout: float = 240.0,
    threads: int | None = None,
) -> dict[str, Any]:
    """Start ``n`` replicas and the balancer; returns the cluster's state (also in ``<workdir>/cluster.json``).

    ``threads``: torch threads per replica's worker; default: the machine's cores shared out evenly.
    """
    if n < 1:
        raise ValueError(f"the cluster needs at least 1 replica, got {n}")
    workdir = Path(workdir).resolve()
    front = front or Front()
    if running(workdir):
        raise ClusterError(f"a cluster from {workdir} is running; `make cluster-stop` first")
    haproxy_binary()  # fail before minutes of start-up
    workdir.mkdir(parents=True, exist_ok=True)
    token = ensure_token(workdir)
    threads = threads or threads_per_replica(n)
    replicas: list[Replica] = []
    state: dict[str, Any] = {"front": asdict(front), "replicas": [], "threads_per_replica": threads}
    try:
        for i in range(n):
            replicas.append(start_replica(model_store, workdir / f"r{i}", threads, timeout))
            state["replicas"] = [asdict(r) for r in replicas]
            _state_path(workdir).write_text(json.dumps(state, indent=2))
        state["haproxy_pid"] = start_balancer(workdir, replicas, front)
        _state_path(workdir).write_text(json.dumps(state, indent=2))
        wait_for_states(workdir, {r.name: "UP" for r in replicas}, timeout=30)
        probe(front, token, (ROOT / "tests" / "fixtures" / "knee_kl2.png").read_bytes())
    except BaseException:
        stop(workdir)
        raise
    return state


def running(workdir: Path) -> bool:
    """Whether HAProxy or any replica of the cluster in ``workdir`` is alive."""
    state = load_state(workdir)
    if state is None:
        return False
    alive = [is_alive(read_pid(Path(workdir) / "haproxy.pid"))]
    alive += [is_alive(ts.server_pid(Path(r.workdir))) for r in replicas_of(state)]
    return any(alive)


def stop(workdir: Path = DEFAULT_WORKDIR) -> bool:
    """Stop the balancer, then every replica (in parallel, each drained); returns when all are gone."""
    workdir = Path(workdir).resolve()
    state = load_state(workdir)
    was = stop_balancer(workdir)
    if state is None:
        return was
    results: list[bool] = []
    threads = [
        threading.Thread(target=lambda r=r: results.append(ts.stop(Path(r.workdir)))) for r in replicas_of(state)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _state_path(workdir).unlink(missing_ok=True)
    return was or any(results)


def rotate(workdir: Path = DEFAULT_WORKDIR) -> str:
    """A new token: accepted from now on, beside the previous one (until the next rotation)."""
    workdir = Path(workdir).resolve()
    tokens = read_tokens(workdir)
    token = new_token()
    write_tokens(workdir, [*tokens[-1:], token])
    if is_alive(read_pid(workdir / "haproxy.pid")):
        reload_balancer(workdir)
    return token


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("command", choices=("start", "stop", "status", "token", "rotate", "reload", "k8s-configmap"))
    p.add_argument("--replicas", "-n", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    p.add_argument("--model-store", type=Path, default=ROOT / "model_store")
    p.add_argument("--rest-port", type=int, default=REST_PORT)
    p.add_argument("--grpc-port", type=int, default=GRPC_PORT)
    p.add_argument("--health-port", type=int, default=HEALTH_PORT)
    p.add_argument("--timeout", type=float, default=240.0, help="seconds for each replica to become READY")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: cores / replicas)")
    args = p.parse_args(argv)
    try:
        if args.command == "start":
            front = Front(args.rest_port, args.grpc_port, args.health_port)
            t0 = time.monotonic()
            state = start(args.replicas, args.workdir, front, args.model_store, args.timeout, args.threads)
            print(f"{len(state['replicas'])} TorchServe replicas behind HAProxy ({time.monotonic() - t0:.0f} s)")
            print(f"  REST    http://127.0.0.1:{front.rest_port}/predictions/{ts.MODEL_NAME}")
            print(f"  gRPC    127.0.0.1:{front.grpc_port}")
            print(f"  health  http://127.0.0.1:{front.health_port}/ready (no token)")
            print(f"  token   {Path(args.workdir) / KEY_FILE} (--key-file), or: python -m ops.cluster token")
        elif args.command == "stop":
            t0 = time.monotonic()
            print("stopped" if stop(args.workdir) else "not running", f"({time.monotonic() - t0:.1f} s)")
        elif args.command == "status":
            if not running(args.workdir):
                print("not running")
                return 1
            for name, status in server_states(args.workdir).items():
                print(f"{name}: {status}")
        elif args.command == "token":
            tokens = read_tokens(args.workdir)
            if not tokens:
                raise ClusterError(f"no token in {args.workdir}: `make cluster` makes one")
            print(tokens[-1])
        elif args.command == "rotate":
            print(rotate(args.workdir))
        elif args.command == "reload":
            print(f"HAProxy reloaded (pid {reload_balancer(args.workdir)})")
        else:
            path = K8S_DIR / "configmap.yaml"
            path.write_text(k8s_configmap())
            print(f"wrote {path}")
    except (ClusterError, ts.ServeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
