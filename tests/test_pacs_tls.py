"""DICOM over TLS between a real Orthanc and the gateway, both ways, each checking the other's certificate.

Development certificates from `ops.pki` (`pacs.pacs_tls`); Orthanc's DICOM port speaks TLS only. No
TorchServe here: the way in (modality -> Orthanc -> gateway, routed by Orthanc) is shown by the gateway's
``received`` audit line, the way back by the gateway's own C-STORE into Orthanc (`Gateway.store`). The
grading between them is the same as in plain DICOM (tests/test_gateway_pacs.py).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import pytest

import pacs
from gateway.audit import read_audit
from gateway.service import Gateway, GatewayConfig, Transient
from model.paths import ROOT
from ops import audit, pki
from ops.procs import free_ports
from tests.conftest import skip_or_fail


@dataclass
class TlsSite:
    workdir: Path
    orthanc: pacs.Orthanc
    tls: pacs.PacsTLS
    gateway_port: int
    base: Path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsSite]:
    try:
        pacs.find_orthanc()
    except pacs.PacsError as exc:
        skip_or_fail(str(exc))
    if shutil.which("openssl") is None:
        skip_or_fail("the openssl command is needed to make the test certificates")
    base = tmp_path_factory.mktemp("dicomtls")
    tls = pacs.pacs_tls(base / "certs")
    http_port, dicom_port, gateway_port = free_ports(3)
    workdir = base / "pacs"
    orthanc = pacs.start_orthanc(workdir, http_port, dicom_port, gateway_port, tls=tls)
    try:
        # The gateway grades nothing here (no model server): what is tested is the DICOM between them.
        pacs.start_gateway(workdir, gateway_port, "http://127.0.0.1:9", None, dicom_port, tls=tls)
        yield TlsSite(workdir, orthanc, tls, gateway_port, base)
    finally:
        pacs.stop_gateway(workdir)
        pacs.stop_orthanc(workdir)


def _knee(**attrs: object) -> object:
    img = cv2.imread(str(ROOT / "tests" / "fixtures" / "knee_kl2.png"), cv2.IMREAD_GRAYSCALE)
    return pacs.radiograph(img, ImageLaterality="R", **attrs)


def test_a_modality_reaches_the_gateway_through_orthanc_over_tls_only(site: TlsSite) -> None:
    ds = _knee()
    with pytest.raises(pacs.PacsError):  # plain DICOM to Orthanc's TLS port
        pacs.send([ds], site.orthanc.dicom_port)
    assert pacs.send([ds], site.orthanc.dicom_port, tls_args=site.tls.modality_args()) == [0]
    uid = str(ds.SOPInstanceUID)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(
            r.get("sop_instance_uid") == uid and r["event"] == "received"
            for r in read_audit(site.workdir / "audit.jsonl")
        ):
            break
        time.sleep(0.25)
    else:
        raise AssertionError(f"Orthanc did not route {uid} to the gateway over TLS")
    assert audit.verify(site.workdir / "audit.jsonl").ok  # the gateway's trail is chained


def test_the_gateway_refuses_plain_dicom_and_a_certificate_from_another_ca(site: TlsSite) -> None:
    ds = _knee()
    with pytest.raises(pacs.PacsError):
        pacs.send([ds], site.gateway_port, called_ae="KOASERVE", calling_ae="ORTHANC")
    stranger = pacs.pacs_tls(site.base / "stranger")  # another CA, a certificate for the same names
    with pytest.raises(pacs.PacsError):
        pacs.send(
            [ds], site.gateway_port, called_ae="KOASERVE", calling_ae="ORTHANC", tls_args=stranger.modality_args()
        )


def test_the_gateway_stores_into_orthanc_over_tls_and_not_in_plain(site: TlsSite, tmp_path: Path) -> None:
    ds = _knee()
    config = GatewayConfig(
        spool=tmp_path / "spool", pacs_port=site.orthanc.dicom_port, dicom_tls=site.tls.gateway_tls()
    )
    Gateway(config).store([ds])
    assert site.orthanc.lookup(str(ds.SOPInstanceUID))
    plain = GatewayConfig(spool=tmp_path / "spool2", pacs_port=site.orthanc.dicom_port)
    with pytest.raises(Transient):
        Gateway(plain).store([_knee()])
    assert pki.issued(site.base / "certs")  # the certificates came from the development CA
