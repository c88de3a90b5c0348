"""The secure front door (`ops.door`), its development PKI (`ops.pki`) and its audit trail (`ops.audit`).

The first part needs neither Java nor HAProxy's traffic: certificates made by `ops.pki`, the chain of the
audit trail, the door's HAProxy configuration checked by ``haproxy -c``.

The second part is the security battery a review would run: real certificates from `ops.pki` (a second CA,
an expired certificate, one revoked while the door runs), a real HAProxy and a real TorchServe with the real
archive, on free ports. Each refusal is checked for its status, its JSON reason and its audit line.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests

from ops import audit, cluster, door, pki
from ops.procs import free_ports, read_pid
from tests.conftest import ROOT, skip_or_fail

MODEL = "oamen"


def _require_openssl() -> None:
    if shutil.which("openssl") is None:
        skip_or_fail("the openssl command is needed to make the test certificates")


def _require_haproxy() -> None:
    try:
        cluster.haproxy_binary()
    except cluster.ClusterError as exc:
        skip_or_fail(str(exc))


# --------------------------------------------------------------------------- the PKI
@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _require_openssl()
    return pki.init(tmp_path_factory.mktemp("pki") / "certs")


def _subject(cert: Path) -> str:
    return subprocess.run(
        ["openssl", "x509", "-noout", "-subject", "-in", str(cert)], capture_output=True, text=True, check=True
    ).stdout


def _verify(ca_dir: Path, cert: Path, crl: bool = False) -> subprocess.CompletedProcess[str]:
    args = ["openssl", "verify", "-CAfile", str(ca_dir / "ca.crt")]
    if crl:
        args += ["-crl_check", "-CRLfile", str(ca_dir / "crl.pem")]
    return subprocess.run([*args, str(cert)], capture_output=True, text=True)


def test_pki_files_say_development_only_and_keys_are_private(ca: Path) -> None:
    for name in ("ca.crt", "server.pem", "server.crt", "server.key", "crl.pem", "README"):
        assert (ca / name).read_text().startswith(pki.WARNING), name
    for key in ("server.key", "server.pem", "ca/ca.key"):
        assert (ca / key).stat().st_mode & 0o077 == 0, key
    assert "NOT FOR PRODUCTION" in _subject(ca / "ca.crt")
    assert _verify(ca, ca / "server.crt").returncode == 0
    san = subprocess.run(
        ["openssl", "x509", "-noout", "-ext", "subjectAltName", "-in", str(ca / "server.crt")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "DNS:localhost" in san and "IP Address:127.0.0.1" in san


def test_pki_issues_revokes_and_refuses_bad_names(ca: Path) -> None:
    c = pki.add_client("ris-1", ca)
    assert "CN = ris-1" in _subject(c.cert) and c.key.stat().st_mode & 0o077 == 0
    assert _verify(ca, c.cert, crl=True).returncode == 0
    with pytest.raises(pki.PKIError, match="exists"):
        pki.add_client("ris-1", ca)
    old = ca / "clients" / "ris-1.crt"
    copy = ca / "ris-1-copy.crt"
    shutil.copy(old, copy)
    pki.revoke_client("ris-1", ca)
    assert not old.exists()  # renamed aside: the name can be issued again
    assert "revoked" in _verify(ca, copy, crl=True).stdout + _verify(ca, copy, crl=True).stderr
    assert [r["status"] for r in pki.issued(ca) if r["name"] == "ris-1"] == ["R"]
    for bad in ("", "a b", "../x", "x" * 65):
        with pytest.raises(ValueError):
            pki.add_client(bad, ca)


def test_pki_makes_an_expired_certificate_on_request(ca: Path) -> None:
    now = datetime.now(UTC)
    c = pki.add_client("late", ca, not_before=now - timedelta(days=3), not_after=now - timedelta(days=1))
    assert "expired" in _verify(ca, c.cert).stdout + _verify(ca, c.cert).stderr


# --------------------------------------------------------------------------- the audit trail
def test_audit_chain_verifies_and_detects_an_edit_a_removal_and_a_truncation(tmp_path: Path) -> None:
    trail = tmp_path / "audit.jsonl"
    w = audit.ChainWriter(trail, fsync=False)
    for i in range(5):
        w.append({"client": "ris", "status": 200, "grade": i % 5})
    v = audit.verify(trail)
    assert v.ok and v.lines == 5 and v.anchor == audit.GENESIS
    good = trail.read_bytes()

    lines = good.split(b"\n")
    lines[2] = lines[2].replace(b'"grade":2', b'"grade":4')  # one line edited
    trail.write_bytes(b"\n".join(lines))
    v = audit.verify(trail)
    assert not v.ok and "seq 3" in v.problem and v.lines == 3

    lines = good.split(b"\n")
    trail.write_bytes(b"\n".join(lines[:1] + lines[2:]))  # one line removed
    assert not audit.verify(trail).ok

    trail.write_bytes(b"\n".join(good.split(b"\n")[:4]) + b"\n")  # the end cut off
    v = audit.verify(trail)
    assert not v.ok and "head" in v.problem

    trail.write_bytes(good)
    assert audit.verify(trail).ok
    head = trail.with_name("audit.jsonl.head")
    kept = head.read_text()
    w.append({"client": "ris", "status": 200})
    head.write_text(kept)  # verified while a writer is between its line and its head: not a removal
    assert audit.verify(trail).ok


def test_audit_rotation_keeps_one_chain_and_a_restarted_writer_continues_it(tmp_path: Path) -> None:
    trail = tmp_path / "audit.jsonl"
    w = audit.ChainWriter(trail, max_bytes=400, fsync=False)
    for i in range(12):
        w.append({"client": "ris", "status": 200, "n": i})
    w2 = audit.ChainWriter(trail, max_bytes=400, fsync=False)  # a restarted receiver
    w2.append({"client": "pacs", "status": 200})
    files = audit.trail_files(trail)
    assert len(files) > 2
    v = audit.verify(trail)
    assert v.ok and v.lines == 13, v.problem
    assert [r["seq"] for r in audit.read_trail(trail)] == list(range(13))


def test_door_record_keeps_only_audit_fields() -> None:
    datagram = json.dumps(
        {
            "accept": "1765000000.123",
            "client": "ris",
            "endpoint": "predictions",
            "protocol": "rest",
            "status": "200",
            "grade": "3",
            "refusal": "-",
            "latency_ms": "41",
            "patient_name": "DOE^JANE",  # a format edited by mistake cannot add a field
        }
    ).encode()
    rec = audit.door_record(b"<134>" + datagram)
    assert rec is not None
    assert rec["time"].startswith("2025-12-06T05:46:40.123")
    assert rec["status"] == 200 and rec["grade"] == 3 and rec["latency_ms"] == 41 and rec["refusal"] is None
    assert "patient_name" not in rec and rec["source"] == "door"
    assert audit.door_record(b"not json") is None


# --------------------------------------------------------------------------- the configuration
def test_door_config_is_valid_modern_tls_and_serves_inference_only(ca: Path, tmp_path: Path) -> None:
    _require_haproxy()
    files = door.DoorFiles(str(ca / "server.pem"), str(ca / "ca.crt"), str(ca / "crl.pem"), str(tmp_path / "p.json"))
    replicas = [cluster.Replica("r0", "", 18080, 17070), cluster.Replica("r1", "", 18090, 17080)]
    door.write_maps(tmp_path, {"ris": door.ClientPolicy()}, {"r0": "k0", "r1": "k1"})
    (tmp_path / "502.http").write_text(cluster.ERROR_502_AS_503)
    text = door.door_config(replicas, door.DoorFront(1, 2, 3), files, tmp_path)
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(text)
    cluster.check_config(cfg)
    assert "ssl-min-ver TLSv1.2" in text and "no-tls-tickets" in text
    assert all(c.startswith("ECDHE-") and ("GCM" in c or "CHACHA" in c) for c in door.CIPHERS_TLS12.split(":"))
    assert text.count("verify optional") == 2 and text.count(f"crl-file {files.crl}") == 2
    assert "alpn h2" in text and "alpn http/1.1" in text
    assert "k0" not in text and "k1" not in text  # the keys live in keys.map (mode 600), not in the config
    assert (tmp_path / "keys.map").stat().st_mode & 0o077 == 0
    assert (tmp_path / "access.map").read_text() == "ris/predictions 1\nris/explanations 1\n"
    with pytest.raises(ValueError, match="only"):
        door.ClientPolicy(endpoints=["management"])


# --------------------------------------------------------------------------- the battery (real servers)
@dataclass
class Door:
    workdir: Path
    certs: Path
    files: door.DoorFiles
    front: door.DoorFront
    other_ca: Path

    @property
    def rest(self) -> str:
        return f"https://127.0.0.1:{self.front.rest_port}"

    def creds(self, name: str, certs: Path | None = None) -> tuple[str, str]:
        d = (certs or self.certs) / "clients"
        return str(d / f"{name}.crt"), str(d / f"{name}.key")

    def post(self, path: str, image: bytes, cert: tuple[str, str] | None, **kw: Any) -> requests.Response:
        return requests.post(
            f"{self.rest}{path}",
            data=image,
            headers={"Content-Type": "image/png", **kw.pop("headers", {})},
            verify=str(self.certs / "ca.crt"),
            cert=cert,
            timeout=120,
            **kw,
        )

    def trail(self) -> list[dict[str, Any]]:
        time.sleep(0.5)  # HAProxy logs at the end of the request; the receiver writes it a moment later
        return audit.read_trail(self.workdir / "audit.jsonl")


@pytest.fixture(scope="module")
def secure(archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Door]:
    """`make certs`, three clients, and the door with one TorchServe replica, on free ports."""
    _require_openssl()
    _require_haproxy()
    base = tmp_path_factory.mktemp("door")
    certs = pki.init(base / "certs")
    other = pki.init(base / "other")  # a CA the door does not trust, with a client of the same name
    pki.add_client("ris", other)
    files = door.DoorFiles(
        str(certs / "server.pem"), str(certs / "ca.crt"), str(certs / "crl.pem"), str(certs / "clients.json")
    )
    door.client_add("ris", files, certs)
    door.client_add("pacs", files, certs, policy=door.ClientPolicy(endpoints=["predictions"], per_minute=3))
    door.client_add("leaver", files, certs)
    now = datetime.now(UTC)
    pki.add_client("late", certs, not_before=now - timedelta(days=3), not_after=now - timedelta(days=1))
    door.client_add("late", files, certs, issue=False)  # in the policy: only its expiry refuses it
    front = door.DoorFront(*free_ports(3))
    workdir = base / "work"
    try:
        door.start(1, workdir, front, files, model_store=archive, threads=2)
        yield Door(workdir, certs, files, front, other)
    finally:
        door.stop(workdir)


@pytest.mark.server
@pytest.mark.slow
def test_plain_http_and_old_tls_are_refused(secure: Door) -> None:
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://127.0.0.1:{secure.front.rest_port}/ping", timeout=10)
    ctx = ssl.create_default_context(cafile=str(secure.certs / "ca.crt"))
    ctx.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, ConnectionError)):
        with socket.create_connection(("127.0.0.1", secure.front.rest_port), timeout=10) as raw:
            ctx.wrap_socket(raw, server_hostname="127.0.0.1")


@pytest.mark.server
@pytest.mark.slow
def test_a_valid_client_is_graded_over_rest_and_grpc_and_named_in_the_audit(secure: Door, knee_png: bytes) -> None:
    from koa_client.grpc_client import GrpcClient
    from koa_client.rest import RestClient

    cert, key = secure.creds("ris")
    tls = {"ca_file": str(secure.certs / "ca.crt"), "cert_file": cert, "cert_key_file": key}
    answer = RestClient(secure.rest, **tls).predict(knee_png)
    assert answer["kl_grade"] in range(5)
    with GrpcClient(f"grpcs://127.0.0.1:{secure.front.grpc_port}", **tls) as g:
        grpc_answer = g.predict(knee_png)
    assert grpc_answer["kl_grade"] == answer["kl_grade"]
    # The command line, as an integrator would run it: no token, the certificate is the credential.
    ca = str(secure.certs / "ca.crt")
    for proto in ([], ["--grpc", "--grpc-target", f"grpcs://127.0.0.1:{secure.front.grpc_port}"]):
        cmd = [sys.executable, "-m", "koa_client", "predict", str(ROOT / "tests" / "fixtures" / "knee_kl2.png"),
               "--url", secure.rest, "--ca", ca, "--cert", cert, "--key", key, "--json", *proto]  # fmt: skip
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0 and '"kl_grade"' in done.stdout, done.stdout + done.stderr
    # A caller's own Authorization header is dropped: the door sends the replica's key itself.
    r = secure.post(f"/predictions/{MODEL}", knee_png, (cert, key), headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 200, r.text
    served = [x for x in secure.trail() if x["client"] == "ris" and x["status"] == 200]
    assert {x["protocol"] for x in served} == {"rest", "grpc"} and len(served) >= 5
    for x in served:
        assert x["grade"] == answer["kl_grade"] and x["endpoint"] == "predictions" and x["refusal"] is None
        assert x["request_id"] and x["tls"] in ("TLSv1.2", "TLSv1.3") and isinstance(x["latency_ms"], int)


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.parametrize(
    "who, reason",
    [(None, "certificate_missing"), ("other", "certificate_unknown_ca"), ("late", "certificate_expired")],
)
def test_bad_certificates_are_refused_with_a_reason(
    secure: Door, knee_png: bytes, who: str | None, reason: str
) -> None:
    cert = None if who is None else secure.creds("ris", secure.other_ca) if who == "other" else secure.creds(who)
    r = secure.post(f"/predictions/{MODEL}", knee_png, cert)
    assert r.status_code == 401 and r.json()["type"] == reason, r.text
    line = [x for x in secure.trail() if x["refusal"] == reason]
    assert line and line[-1]["status"] == 401 and line[-1]["refusal"] == reason and line[-1]["grade"] is None


@pytest.mark.server
@pytest.mark.slow
def test_a_certificate_revoked_while_the_door_runs_is_refused_and_others_keep_their_connection(
    secure: Door, knee_png: bytes
) -> None:
    ris = requests.Session()
    ris.trust_env = False  # REQUESTS_CA_BUNDLE would override the session's CA
    ris.verify, ris.cert = str(secure.certs / "ca.crt"), secure.creds("ris")
    url = f"{secure.rest}/predictions/{MODEL}"
    assert ris.post(url, data=knee_png, timeout=120).status_code == 200
    leaver = secure.creds("leaver")
    kept = [Path(p).read_bytes() for p in leaver]
    assert secure.post(f"/predictions/{MODEL}", knee_png, leaver).status_code == 200
    door.client_revoke("leaver", secure.files, secure.certs, secure.workdir)  # CRL through the runtime API
    # The revoked certificate (kept by its holder) is refused on a new connection...
    tmp = secure.workdir / "leaver-kept"
    tmp.mkdir(exist_ok=True)
    paths = (tmp / "c.crt", tmp / "c.key")
    for p, data in zip(paths, kept):
        p.write_bytes(data)
    r = secure.post(f"/predictions/{MODEL}", knee_png, (str(paths[0]), str(paths[1])))
    assert r.status_code == 401 and r.json()["type"] == "certificate_revoked", r.text
    # ...while another client's open connection was not dropped by the reload.
    before = ris.get_adapter(url).poolmanager.connection_from_url(url).num_connections
    assert ris.post(url, data=knee_png, timeout=120).status_code == 200
    assert ris.get_adapter(url).poolmanager.connection_from_url(url).num_connections == before


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.parametrize("path", ["/models", f"/models/{MODEL}", "/metrics", "/api-description", "/v2/models"])
def test_management_and_metrics_are_refused_at_the_door(secure: Door, path: str) -> None:
    r = requests.get(f"{secure.rest}{path}", verify=str(secure.certs / "ca.crt"), cert=secure.creds("ris"), timeout=30)
    assert r.status_code == 403 and r.json()["type"] == "endpoint_forbidden", r.text


@pytest.mark.server
@pytest.mark.slow
def test_grpc_refuses_without_a_certificate_and_outside_inference(secure: Door, knee_png: bytes) -> None:
    import grpc

    from koa_client import KOAClientError
    from koa_client.grpc_client import GrpcClient

    ca_file = str(secure.certs / "ca.crt")
    with GrpcClient(f"grpcs://127.0.0.1:{secure.front.grpc_port}", ca_file=ca_file) as g:
        with pytest.raises(KOAClientError) as err:
            g.predict(knee_png)
    assert "certificate_missing" in str(err.value) or err.value.status == 401, err.value
    cert, key = secure.creds("ris")
    creds = grpc.ssl_channel_credentials(Path(ca_file).read_bytes(), Path(key).read_bytes(), Path(cert).read_bytes())
    with grpc.secure_channel(f"127.0.0.1:{secure.front.grpc_port}", creds) as ch:
        call = ch.unary_unary("/org.pytorch.serve.grpc.management.ManagementAPIsService/ListModels")
        with pytest.raises(grpc.RpcError) as rpc:
            call(b"", timeout=30)
    assert rpc.value.code() == grpc.StatusCode.PERMISSION_DENIED, rpc.value


@pytest.mark.server
@pytest.mark.slow
def test_a_client_over_its_rate_is_refused_while_another_is_served(secure: Door, knee_png: bytes) -> None:
    pacs, ris = secure.creds("pacs"), secure.creds("ris")
    codes = [secure.post(f"/predictions/{MODEL}", knee_png, pacs).status_code for _ in range(4)]
    assert codes[:3] == [200, 200, 200] and codes[3] == 429, codes
    r = secure.post(f"/predictions/{MODEL}", knee_png, pacs)
    assert r.status_code == 429 and r.json()["type"] == "rate_limited"
    assert secure.post(f"/predictions/{MODEL}", knee_png, ris).status_code == 200  # the others are served
    # pacs may not explain (its policy lists predictions only)
    assert secure.post(f"/explanations/{MODEL}", knee_png, pacs).status_code in (403, 429)


@pytest.mark.server
@pytest.mark.slow
def test_the_load_test_speaks_the_secure_mode(secure: Door, tmp_path: Path) -> None:
    door.client_add("locust", secure.files, secure.certs, secure.workdir, door.ClientPolicy(per_minute=100_000))
    cert, key = secure.creds("locust")
    out = tmp_path / "reports"
    cmd = [sys.executable, "-m", "loadtest.run", "--host", secure.rest,
           "--grpc-target", f"grpcs://127.0.0.1:{secure.front.grpc_port}", "--ca", str(secure.certs / "ca.crt"),
           "--cert", cert, "--key", key, "--users", "2", "--rate", "2", "--duration", "4s", "--warmup", "1",
           "--loglevel", "WARNING", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((out / "latest" / "summary.json").read_text())
    for protocol in ("rest", "grpc"):
        assert summary[protocol]["requests"] > 0 and summary[protocol]["failures"] == 0, summary[protocol]
    served = {x["protocol"] for x in secure.trail() if x["client"] == "locust" and x["status"] == 200}
    assert served == {"rest", "grpc"}


@pytest.mark.server
@pytest.mark.slow
def test_a_study_goes_pacs_to_gateway_to_door_and_back_over_tls_all_the_way(secure: Door, tmp_path: Path) -> None:
    import cv2

    import pacs
    from gateway.report import result_uid

    try:
        pacs.find_orthanc()
    except pacs.PacsError as exc:
        skip_or_fail(str(exc))
    door.client_add("koaserve-gateway", secure.files, secure.certs, secure.workdir)
    tls = pacs.pacs_tls(secure.certs)
    clients = secure.certs / "clients"
    creds = pacs.DoorCerts(secure.certs / "ca.crt", clients / "koaserve-gateway.crt", clients / "koaserve-gateway.key")
    http_port, dicom_port, gateway_port = free_ports(3)
    workdir = tmp_path / "pacs"
    orthanc = pacs.start_orthanc(workdir, http_port, dicom_port, gateway_port, tls=tls)
    try:
        pacs.start_gateway(workdir, gateway_port, secure.rest, None, dicom_port, tls=tls, door=creds)
        knee = cv2.imread(str(ROOT / "tests" / "fixtures" / "knee_kl2.png"), cv2.IMREAD_GRAYSCALE)
        ds = pacs.radiograph(knee, ImageLaterality="R")
        assert pacs.send([ds], dicom_port, tls_args=tls.modality_args()) == [0]
        deadline = time.monotonic() + 240
        while not orthanc.lookup(result_uid("sr", ds.SOPInstanceUID)):
            assert time.monotonic() < deadline, "no report stored back over DICOM TLS"
            time.sleep(0.5)
    finally:
        pacs.stop_gateway(workdir)
        pacs.stop_orthanc(workdir)
    graded = [x for x in secure.trail() if x["client"] == "koaserve-gateway" and x["status"] == 200]
    assert graded and graded[-1]["grade"] in range(5)
    assert audit.verify(workdir / "audit.jsonl").ok


@pytest.mark.server
@pytest.mark.slow
def test_a_restart_of_the_door_loses_no_accepted_request(secure: Door, knee_png: bytes) -> None:
    cert = secure.creds("ris")
    with cf.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(secure.post, f"/predictions/{MODEL}", knee_png, cert) for _ in range(4)]
        time.sleep(0.5)  # accepted, and being graded (one replica on two busy cores: seconds each)
        old = read_pid(secure.workdir / "haproxy.pid")
        new = door.reload(secure.workdir)
        after = secure.post(f"/predictions/{MODEL}", knee_png, cert)  # served by the new process
        codes = [f.result().status_code for f in futures]
    assert new != old and codes == [200] * 4 and after.status_code == 200, codes
    assert audit.verify(secure.workdir / "audit.jsonl").ok


@pytest.mark.server
@pytest.mark.slow
def test_the_audit_trail_of_the_battery_verifies_and_breaks_when_a_line_is_edited(secure: Door) -> None:
    trail = secure.workdir / "audit.jsonl"
    records = secure.trail()
    assert len(records) >= 5 and audit.verify(trail).ok
    assert door.dropped_logs(secure.workdir) == 0
    for rec in records:  # nothing of the image, nor any field outside the audit's own
        assert set(rec) <= {"seq", "prev", "time", "source", *audit.DOOR_FIELDS}
    copy = secure.workdir / "edited" / "audit.jsonl"
    copy.parent.mkdir(exist_ok=True)
    lines = trail.read_text().splitlines()
    lines[1] = lines[1].replace('"status":', '"status":1', 1)
    copy.write_text("\n".join(lines) + "\n")
    assert not audit.verify(copy).ok
    done = subprocess.run(
        [sys.executable, "-m", "ops.audit", "verify", str(copy)], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 1 and "BROKEN" in done.stderr


def test_the_gateway_audit_joins_the_chain_and_an_unchained_log_is_set_aside(tmp_path: Path) -> None:
    from gateway.audit import AuditLog, read_audit

    path = tmp_path / "audit.jsonl"
    path.write_text('{"time": "2026-01-01T00:00:00.000+00:00", "event": "received"}\n')  # an older gateway's log
    log = AuditLog(path)
    log.write("received", sop_instance_uid="1.2.3", calling_ae="PACS")
    log.write("result", sop_instance_uid="1.2.3", kl_grade=2)
    assert [r["event"] for r in read_audit(path)] == ["received", "result"]
    assert audit.verify(path).ok
    assert len(list(tmp_path.glob("audit.jsonl.unchained-*"))) == 1
    text = path.read_text().replace('"kl_grade":2', '"kl_grade":3')
    path.write_text(text)
    assert not audit.verify(path).ok
