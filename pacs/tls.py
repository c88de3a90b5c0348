"""DICOM over TLS between Orthanc, the gateway and the test modality: each its certificate, one CA.

Development and tests only: the certificates come from the CA of ``make certs`` (ops/pki.py); a
hospital's come from its PKI (docs/PACS.md).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from gateway.tls import DicomTLS
from ops import pki

__all__ = ["PacsTLS", "pacs_tls"]


@dataclass(frozen=True)
class PacsTLS:
    """DICOM over TLS between Orthanc, the gateway and the test modality: each its certificate, one CA."""

    ca: Path
    orthanc: pki.ClientCert
    gateway: pki.ClientCert
    modality: pki.ClientCert

    def gateway_tls(self) -> DicomTLS:
        return DicomTLS(str(self.gateway.cert), str(self.gateway.key), str(self.ca))

    def modality_args(self, host: str = "127.0.0.1") -> tuple[ssl.SSLContext, str]:
        """pynetdicom's ``tls_args`` for the test modality sending to Orthanc (`send`)."""
        tls = DicomTLS(str(self.modality.cert), str(self.modality.key), str(self.ca))
        return tls.client_context(), host


def pacs_tls(certs: Path) -> PacsTLS:
    """Development certificates for DICOM TLS from the CA of ``make certs`` (made when missing): ``orthanc``,
    ``koaserve-gateway`` and ``modality`` in ``<certs>/peers/`` (development and tests only)."""
    certs = pki.init(Path(certs))
    pairs = {}
    for name in ("orthanc", "koaserve-gateway", "modality"):
        cert, key = certs / "peers" / f"{name}.crt", certs / "peers" / f"{name}.key"
        if not (cert.is_file() and key.is_file()):  # kept once issued: a running Orthanc holds them
            pairs[name] = pki.add_peer(name, certs)
        else:
            pairs[name] = pki.ClientCert(name, cert, key)
    return PacsTLS(certs / "ca.crt", pairs["orthanc"], pairs["koaserve-gateway"], pairs["modality"])
