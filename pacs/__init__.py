"""Operations for the PACS side of KOA-Serve: a local Orthanc with the project's configuration, and the gateway.

``make pacs`` / ``make pacs-stop`` / ``make pacs-credentials`` / ``make pacs-demo`` call this module's
command line (``python -m pacs``); the tests call the same functions with free ports and a temporary
folder. Each Orthanc and gateway lives in a working folder (default ``pacs/data/``, ignored by git):

    orthanc.json        the rendered configuration (ports, storage, the password): mode 0600
    orthanc/            Orthanc's storage and index
    credentials         ``user:password`` of Orthanc's REST API, made at the first start: mode 0600
    spool/, audit.jsonl the gateway's spool and audit log (gateway/spool.py, gateway/audit.py)
    *.pid, *.log        the processes and their logs; state.json: the ports they were started with

Orthanc 1.10 cannot bind to one address: it listens on every interface. Its REST API refuses other
hosts (RemoteAccessAllowed false) and its DICOM port accepts only the AE titles and hosts listed in
DicomModalities; docs/PACS.md says what else an operator must add.
"""

from __future__ import annotations

import io
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import requests
from pydicom import Dataset, FileMetaDataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from gateway.tls import DicomTLS
from ops.procs import free_ports, is_alive, read_pid

__all__ = [
    "ROOT",
    "DEFAULT_WORKDIR",
    "PacsError",
    "Orthanc",
    "GatewayProcess",
    "credentials",
    "PacsTLS",
    "pacs_tls",
    "render_config",
    "start_orthanc",
    "stop_orthanc",
    "start_gateway",
    "stop_gateway",
    "resubmit_failed_routing",
    "send",
    "find_orthanc",
    "free_ports",
    "radiograph",
    "read_image",
]

from ops.checkout import ROOT

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "orthanc.json"
ROUTE = HERE / "route.lua"
DEFAULT_WORKDIR = HERE / "data"
USER = "koa"
MODALITY_AE = "KOAMODALITY"  # the sender registered in pacs/orthanc.json (tests and make pacs-demo)
GATEWAY_MODALITY = "koaserve"

log = logging.getLogger(__name__)


class PacsError(RuntimeError):
    """Orthanc or the gateway did not start or stop as asked; the message says why and what to do."""


def find_orthanc() -> str:
    """The Orthanc executable (Debian installs it in /usr/sbin).

    Raises:
        PacsError: Orthanc is not installed.
    """
    found = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.access("/usr/sbin/Orthanc", os.X_OK) else None)
    if found is None:
        raise PacsError("Orthanc is not installed: sudo apt-get install -y orthanc (then `make pacs`)")
    return found


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` readable by its owner only (it holds a password)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def credentials(workdir: Path = DEFAULT_WORKDIR) -> tuple[str, str]:
    """Orthanc's REST user and password; a random password is made at the first call (there is no default)."""
    path = Path(workdir) / "credentials"
    if path.is_file():
        user, _, password = path.read_text().strip().partition(":")
        if user and password:
            return user, password
    password = secrets.token_urlsafe(24)
    _write_private(path, f"{USER}:{password}\n")
    return USER, password


@dataclass(frozen=True)
class PacsTLS:
    """DICOM over TLS between Orthanc, the gateway and the test modality: each its certificate, one CA."""

    ca: Path
    orthanc: tuple[Path, Path]  # (certificate, key)
    gateway: tuple[Path, Path]
    modality: tuple[Path, Path]

    def gateway_tls(self) -> DicomTLS:
        return DicomTLS(str(self.gateway[0]), str(self.gateway[1]), str(self.ca))

    def modality_args(self, host: str = "127.0.0.1") -> tuple[ssl.SSLContext, str]:
        """pynetdicom's ``tls_args`` for the test modality sending to Orthanc (`send`)."""
        tls = DicomTLS(str(self.modality[0]), str(self.modality[1]), str(self.ca))
        return tls.client_context(), host


def pacs_tls(certs: Path) -> PacsTLS:
    """Development certificates for DICOM TLS from the CA of ``make certs`` (made when missing): ``orthanc``,
    ``koaserve-gateway`` and ``modality`` in ``<certs>/peers/`` (development and tests only)."""
    from ops import pki

    certs = pki.init(Path(certs))
    pairs = {}
    for name in ("orthanc", "koaserve-gateway", "modality"):
        cert, key = certs / "peers" / f"{name}.crt", certs / "peers" / f"{name}.key"
        if not (cert.is_file() and key.is_file()):  # kept once issued: a running Orthanc holds them
            issued = pki.add_peer(name, certs)
            cert, key = issued.cert, issued.key
        pairs[name] = (cert, key)
    return PacsTLS(certs / "ca.crt", pairs["orthanc"], pairs["koaserve-gateway"], pairs["modality"])


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
            DicomTlsCertificate=str(tls.orthanc[0]),
            DicomTlsPrivateKey=str(tls.orthanc[1]),
            DicomTlsTrustedCertificates=str(tls.ca),
            DicomTlsRemoteCertificateRequired=True,
        )
        for modality in config["DicomModalities"].values():
            modality["UseDicomTls"] = True
    path = workdir / "orthanc.json"
    _write_private(path, json.dumps(config, indent=2))
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


def _state(workdir: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(workdir) / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def _save_state(workdir: Path, **values: Any) -> None:
    state = _state(workdir) | values
    (Path(workdir) / "state.json").write_text(json.dumps(state, indent=2))


def _spawn(workdir: Path, name: str, cmd: Sequence[str], cwd: Path) -> int:
    pidfile = workdir / f"{name}.pid"
    if is_alive(read_pid(pidfile)):
        raise PacsError(f"{name} from {workdir} is already running (pid {read_pid(pidfile)}): `make pacs-stop` first")
    with open(workdir / f"{name}.log", "ab") as sink:
        # Output goes to a file, not a pipe: nothing reads a pipe once the starting command has returned.
        proc = subprocess.Popen(
            list(cmd), cwd=cwd, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    pidfile.write_text(f"{proc.pid}\n")
    return proc.pid


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def _stop(workdir: Path, name: str, timeout: float, kill: bool = False) -> bool:
    """Signal the process of ``name`` and return once it is gone; False when it was not running."""
    pidfile = Path(workdir) / f"{name}.pid"
    pid = read_pid(pidfile)
    if not is_alive(pid):
        pidfile.unlink(missing_ok=True)
        return False
    assert pid is not None
    os.kill(pid, signal.SIGKILL if kill else signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while is_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if is_alive(pid):
        log.warning("%s (pid %d) did not stop within %.0f s: killed", name, pid, timeout)
        os.kill(pid, signal.SIGKILL)
        while is_alive(pid):
            time.sleep(0.05)
    pidfile.unlink(missing_ok=True)
    return True


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
    pid = _spawn(workdir, "orthanc", [find_orthanc(), str(config)], workdir)
    _save_state(workdir, http_port=http_port, dicom_port=dicom_port, gateway_port=gateway_port)
    orthanc = Orthanc(workdir, f"http://127.0.0.1:{http_port}", dicom_port)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_alive(pid):
            raise PacsError(f"Orthanc exited during start-up. Log:\n{_tail(workdir / 'orthanc.log')}")
        try:
            orthanc.get("/system", timeout=2)
            return orthanc
        except requests.RequestException:
            time.sleep(0.2)
    _stop(workdir, "orthanc", 10)
    raise PacsError(
        f"Orthanc did not answer on {orthanc.http_url} within {timeout:.0f} s. Log:\n{_tail(workdir / 'orthanc.log')}"
    )


def stop_orthanc(workdir: Path = DEFAULT_WORKDIR, timeout: float = 30.0) -> bool:
    """Stop Orthanc (SIGTERM; it finishes its jobs and closes its index) and wait until it is gone."""
    return _stop(Path(workdir).resolve(), "orthanc", timeout)


@dataclass
class GatewayProcess:
    workdir: Path
    pid: int
    port: int

    @property
    def spool(self) -> Path:
        return self.workdir / "spool"

    @property
    def audit(self) -> Path:
        return self.workdir / "audit.jsonl"


def start_gateway(
    workdir: Path = DEFAULT_WORKDIR,
    port: int = 11112,
    ts_url: str = "http://127.0.0.1:8080",
    key_file: Path | None = None,
    pacs_port: int = 4242,
    allow: Iterable[str] = ("ORTHANC",),
    max_backoff_s: float = 5.0,
    timeout: float = 60.0,
    tls: PacsTLS | None = None,
    door: tuple[Path, Path, Path] | None = None,
    metrics_port: int | None = None,
) -> GatewayProcess:
    """Start ``python -m gateway serve`` in the background; return once it accepts connections.

    Raises:
        PacsError: already running, or it exited or did not listen in time (with its log).
    """
    workdir = Path(workdir).resolve()
    workdir.mkdir(mode=0o700, parents=True, exist_ok=True)  # patient images: the owner only
    cmd = [
        sys.executable, "-m", "gateway", "serve",
        "--spool", str(workdir / "spool"),
        "--audit", str(workdir / "audit.jsonl"),
        "--port", str(port),
        "--ts-url", ts_url,
        "--pacs", f"ORTHANC@127.0.0.1:{pacs_port}",
        "--max-backoff", str(max_backoff_s),
    ]  # fmt: skip
    if key_file is not None:
        cmd += ["--key-file", str(Path(key_file).resolve())]
    if tls is not None:
        cmd += ["--dicom-tls-cert", str(tls.gateway[0]), "--dicom-tls-key", str(tls.gateway[1])]
        cmd += ["--dicom-tls-ca", str(tls.ca)]
    if door is not None:  # (CA, certificate, key): grading through the front door (ops/door.py)
        cmd += ["--ts-ca", str(door[0]), "--ts-cert", str(door[1]), "--ts-key", str(door[2])]
    if metrics_port is not None:  # Prometheus scrapes it (make monitor, docs/MONITORING.md)
        cmd += ["--metrics-port", str(metrics_port)]
    for ae in allow:
        cmd += ["--allow", ae]
    pid = _spawn(workdir, "gateway", cmd, ROOT)
    _save_state(workdir, gateway_port=port, ts_url=ts_url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_alive(pid):
            raise PacsError(f"the gateway exited during start-up. Log:\n{_tail(workdir / 'gateway.log')}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return GatewayProcess(workdir, pid, port)
        except OSError:
            time.sleep(0.1)
    _stop(workdir, "gateway", 10)
    raise PacsError(
        f"the gateway did not listen on {port} within {timeout:.0f} s. Log:\n{_tail(workdir / 'gateway.log')}"
    )


def stop_gateway(workdir: Path = DEFAULT_WORKDIR, timeout: float = 30.0, kill: bool = False) -> bool:
    """Stop the gateway (SIGTERM, or SIGKILL with ``kill``: the drill) and wait until it is gone.

    What it had queued stays in its spool for the next start.
    """
    return _stop(Path(workdir).resolve(), "gateway", timeout, kill=kill)


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


def send(
    datasets: Iterable[Dataset | bytes | Path],
    port: int,
    host: str = "127.0.0.1",
    called_ae: str = "ORTHANC",
    calling_ae: str = MODALITY_AE,
    tls_args: tuple[ssl.SSLContext, str] | None = None,
) -> list[int]:
    """C-STORE ``datasets`` (datasets, Part 10 bytes or files) over one association, as a modality would.

    Returns the status of each C-STORE (0 is success).

    Raises:
        PacsError: no association (the peer is down, or does not know ``calling_ae``).
    """
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE

    items = []
    for item in datasets:
        if isinstance(item, Path):
            item = dcmread(item)
        elif isinstance(item, bytes | bytearray):
            item = dcmread(io.BytesIO(bytes(item)))
        items.append(item)
    ae = AE(ae_title=calling_ae)
    for sop_class, syntax in dict.fromkeys((str(d.SOPClassUID), str(d.file_meta.TransferSyntaxUID)) for d in items):
        ae.add_requested_context(
            sop_class, list(dict.fromkeys([syntax, ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
        )
    assoc = ae.associate(host, port, ae_title=called_ae, tls_args=tls_args)
    if not assoc.is_established:
        raise PacsError(f"no association with {called_ae}@{host}:{port} as {calling_ae}")
    try:
        statuses = []
        for ds in items:
            status = assoc.send_c_store(ds)
            statuses.append(int(status.Status) if status and "Status" in status else -1)
        return statuses
    finally:
        assoc.release()


DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


def radiograph(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    **attrs: Any,
) -> Dataset:
    """A DX radiograph (For Presentation, explicit VR little endian) of a 2-D uint8 or uint16 array.

    ``pixels`` are stored as given: for MONOCHROME1 pass them already inverted (bone dark). The
    patient and study attributes a modality writes are filled with demo values; ``attrs`` (DICOM
    keywords) override or add any, e.g. ``ImageLaterality="L"``, ``BodyPartExamined="CHEST"``.

    Raises:
        ValueError: not a 2-D uint8/uint16 array, or another photometric interpretation.
    """
    if pixels.ndim != 2 or pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"pixels must be a 2-D uint8 or uint16 array, got {pixels.dtype} {pixels.shape}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_instance_uid or generate_uid()
    ds.SeriesInstanceUID = series_instance_uid or generate_uid()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Demo^Knee", "KOA-DEMO", "", "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = time.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = time.strftime("%H%M%S")
    ds.AccessionNumber, ds.StudyID, ds.ReferringPhysicianName = "", "1", ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "DX", 1, 1
    ds.Manufacturer = "KOA-Serve demo"
    ds.BodyPartExamined = "KNEE"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PatientOrientation = ""
    ds.ImageLaterality = "U"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels).astype(pixels.dtype.newbyteorder("<")).tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def read_image(path: Path) -> Dataset:
    """A DICOM file as it is, or a PNG/JPEG (gray, 8 or 16 bit) wrapped into a new DX radiograph."""
    path = Path(path)
    if path.read_bytes()[128:132] == b"DICM":
        return dcmread(path)
    from PIL import Image

    with Image.open(path) as im:
        pixels = np.asarray(im.convert("I;16") if im.mode in ("I", "I;16") else im.convert("L"))
    return radiograph(pixels.astype(np.uint16) if pixels.dtype != np.uint8 else pixels)
