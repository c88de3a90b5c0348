"""A local Orthanc with the project's configuration (pacs/orthanc.json, pacs/route.lua) and a small REST client.

Orthanc 1.10 cannot bind to one address; docs/PACS.md says how its REST API and DICOM port are kept
to the hosts and AE titles it knows, and what else an operator must add.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from pydicom import Dataset, dcmread

from ops.procs import is_alive
from pacs.tls import PacsTLS
from pacs.workdir import DEFAULT_WORKDIR, HERE, PacsError, save_state, spawn, stop, tail, write_private

__all__ = [
    "Orthanc",
    "credentials",
    "find_orthanc",
    "render_config",
    "start_orthanc",
    "stop_orthanc",
    "resubmit_failed_routing",
]

CONFIG = HERE / "orthanc.json"
ROUTE = HERE / "route.lua"
USER = "koa"
GATEWAY_MODALITY = "koaserve"


def find_orthanc() -> str:
    """The Orthanc executable (Debian installs it in /usr/sbin).

    Raises:
        PacsError: Orthanc is not installed.
    """
    found = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.access("/usr/sbin/Orthanc", os.X_OK) else None)
    if found is None:
        raise PacsError("Orthanc is not installed: sudo apt-get install -y orthanc (then `make pacs`)")
    return found


def credentials(workdir: Path = DEFAULT_WORKDIR) -> tuple[str, str]:
    """Orthanc's REST user and password; a random password is made at the first call (there is no default)."""
    path = Path(workdir) / "credentials"
    if path.is_file():
        user, _, password = path.read_text().strip().partition(":")
        if user and password:
            return user, password
    password = secrets.token_urlsafe(24)
    write_private(path, f"{USER}:{password}\n")
    return USER, password


def render_config(
    workdir: Path, http_port: int, dicom_port: int, gateway_port: int, tls: PacsTLS | None = None
) -> Path:
    """pacs/orthanc.json with this folder's storage, these ports, the routing script and the credentials;
    with ``tls``, Orthanc's DICOM port speaks TLS only, asks every peer for its certificate and routes to
    the gateway over TLS."""
    workdir = Path(workdir).resolve()
    config = json.loads(CONFIG.read_text())
    user, password = credentials(workdir)
    config["StorageDirectory"] = config["IndexDirectory"] = str(workdir / "orthanc")
    config["LuaScripts"] = [str(ROUTE)]
    config["HttpPort"] = http_port
    config["DicomPort"] = dicom_port
    config["RegisteredUsers"] = {user: password}
    config["DicomModalities"][GATEWAY_MODALITY]["Port"] = gateway_port
    if tls is not None:
        config.update(
            DicomTlsEnabled=True,
            DicomTlsCertificate=str(tls.orthanc.cert),
            DicomTlsPrivateKey=str(tls.orthanc.key),
            DicomTlsTrustedCertificates=str(tls.ca),
            DicomTlsRemoteCertificateRequired=True,
        )
        for modality in config["DicomModalities"].values():
            modality["UseDicomTls"] = True
    path = workdir / "orthanc.json"
    write_private(path, json.dumps(config, indent=2))
    return path


@dataclass
class Orthanc:
    """A running Orthanc: its addresses and a small authenticated REST client."""

    workdir: Path
    http_url: str
    dicom_port: int
    aet: str = "ORTHANC"

    def _auth(self) -> tuple[str, str]:
        return credentials(self.workdir)

    def get(self, path: str, timeout: float = 30) -> Any:
        resp = requests.get(f"{self.http_url}{path}", auth=self._auth(), timeout=timeout)
        resp.raise_for_status()
        return resp.json()

    def get_bytes(self, path: str, timeout: float = 30) -> bytes:
        resp = requests.get(f"{self.http_url}{path}", auth=self._auth(), timeout=timeout)
        resp.raise_for_status()
        return resp.content

    def post(self, path: str, body: Any = None, timeout: float = 30) -> Any:
        data = body if isinstance(body, bytes | str) else json.dumps(body if body is not None else {})
        resp = requests.post(f"{self.http_url}{path}", data=data, auth=self._auth(), timeout=timeout)
        resp.raise_for_status()
        return resp.json() if resp.content else None

    def lookup(self, uid: str) -> list[dict[str, Any]]:
        """Orthanc's resources with this DICOM UID (``[{"Type": "Instance", "ID": ...}]``), empty when none."""
        return self.post("/tools/lookup", uid)

    def instance(self, sop_instance_uid: str) -> Dataset | None:
        """The stored instance with this SOP Instance UID, read back as a dataset; None when not stored."""
        for hit in self.lookup(sop_instance_uid):
            if hit.get("Type") == "Instance":
                return dcmread(io.BytesIO(self.get_bytes(f"/instances/{hit['ID']}/file")))
        return None

    def study_instances(self, study_instance_uid: str) -> list[dict[str, Any]]:
        """Every instance of a study with its main tags (``MainDicomTags`` of instance and series)."""
        for hit in self.lookup(study_instance_uid):
            if hit.get("Type") == "Study":
                out = []
                for series in self.get(f"/studies/{hit['ID']}/series"):
                    for inst in self.get(f"/series/{series['ID']}/instances"):
                        out.append({"ID": inst["ID"], "Series": series["MainDicomTags"], **inst["MainDicomTags"]})
                return out
        return []


def start_orthanc(
    workdir: Path = DEFAULT_WORKDIR,
    http_port: int = 8042,
    dicom_port: int = 4242,
    gateway_port: int = 11112,
    timeout: float = 60.0,
    tls: PacsTLS | None = None,
) -> Orthanc:
    """Start Orthanc with the project's configuration and return once its REST API answers.

    Raises:
        PacsError: not installed, already running, or it exited or did not answer in time (with its log).
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(mode=0o700, parents=True, exist_ok=True)  # patient images: the owner only
    config = render_config(workdir, http_port, dicom_port, gateway_port, tls)
    pid = spawn(workdir, "orthanc", [find_orthanc(), str(config)], workdir)
    save_state(workdir, http_port=http_port, dicom_port=dicom_port, gateway_port=gateway_port)
    orthanc = Orthanc(workdir, f"http://127.0.0.1:{http_port}", dicom_port)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_alive(pid):
            raise PacsError(f"Orthanc exited during start-up. Log:\n{tail(workdir / 'orthanc.log')}")
        try:
            orthanc.get("/system", timeout=2)
            return orthanc
        except requests.RequestException:
            time.sleep(0.2)
    stop(workdir, "orthanc", 10)
    raise PacsError(
        f"Orthanc did not answer on {orthanc.http_url} within {timeout:.0f} s. Log:\n{tail(workdir / 'orthanc.log')}"
    )


def stop_orthanc(workdir: Path = DEFAULT_WORKDIR, timeout: float = 30.0) -> bool:
    """Stop Orthanc (SIGTERM; it finishes its jobs and closes its index) and wait until it is gone."""
    return stop(Path(workdir).resolve(), "orthanc", timeout)


def resubmit_failed_routing(orthanc: Orthanc) -> int:
    """Resubmit Orthanc's failed jobs that were sending to the gateway (it was down); returns how many."""
    count = 0
    for job in orthanc.get("/jobs?expand"):
        content = job.get("Content") or {}
        if job.get("State") == "Failure" and job.get("Type") == "DicomModalityStore":
            if content.get("RemoteAet") == "KOASERVE":
                orthanc.post(f"/jobs/{job['ID']}/resubmit", "")
                count += 1
    return count
