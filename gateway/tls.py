"""DICOM over TLS for the gateway: both ways, each side checking the other's certificate.

The gateway accepts C-STORE from the PACS (it is the TLS server) and stores its results back into the PACS
(it is the TLS client); with `DicomTLS` both associations run over TLS 1.2+, and each side presents a
certificate signed by the CA the other trusts (``make pacs TLS=1`` makes development ones, docs/PACS.md).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DicomTLS"]


@dataclass(frozen=True)
class DicomTLS:
    """The gateway's certificate and key (PEM) and the CA that signs the PACS's certificate."""

    cert: str
    key: str
    ca: str

    def __post_init__(self) -> None:
        for what, path in (("certificate", self.cert), ("key", self.key), ("CA", self.ca)):
            if not Path(path).is_file():
                raise ValueError(f"DICOM TLS {what} {path} is not a file")

    def _context(self, purpose: int) -> ssl.SSLContext:
        ctx = ssl.SSLContext(purpose)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert, self.key)
        ctx.load_verify_locations(cafile=self.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED  # the peer must show a certificate from our CA, both ways
        return ctx

    def server_context(self) -> ssl.SSLContext:
        """For the gateway's SCP: the PACS must present a client certificate signed by ``ca``."""
        return self._context(ssl.PROTOCOL_TLS_SERVER)

    def client_context(self) -> ssl.SSLContext:
        """For the gateway's SCU: the PACS's certificate must be signed by ``ca`` and name the host dialled."""
        ctx = self._context(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = True
        return ctx
