"""The DICOM gateway: a storage SCP that spools, grades over REST and stores the results back by C-STORE.

pynetdicom's association threads acknowledge each C-STORE once the instance is in the spool
(`gateway.spool`); one worker thread grades the queue oldest first (`koa_client.RestClient`), builds
the SR and heatmap (`gateway.report`) and stores them into the PACS. No instance is ever dropped:
docs/PACS.md ("Nothing lost") says what each failure leads to.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.sop_class import Verification

from gateway.audit import AuditLog
from gateway.metrics import GatewayMetrics
from gateway.report import (
    KneeFinding,
    Refusal,
    findings_from_answer,
    grade_report,
    heatmaps,
    laterality_of,
    refusal_report,
)
from gateway.screen import is_valid_uid, screen
from gateway.spool import Spool
from gateway.tls import DicomTLS
from koa_client import KOAClientError
from koa_client.rest import RestClient
from koa_client.schema import InvalidAnswer, validate_answer

__all__ = ["GatewayConfig", "Gateway", "Transient", "StoreRejected", "DEFAULT_AE", "DEFAULT_PORT"]

log = logging.getLogger(__name__)

DEFAULT_AE = "KOASERVE"
DEFAULT_PORT = 11112
# The transfer syntaxes the gateway accepts: the uncompressed ones and those KOA-Serve decodes
# (docs/API.md), so that a compressed radiograph reaches the server as the modality sent it.
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
]
# The server's refusals of an image (koa_client.schema.ERROR_TYPES): the image, not the server, is the problem.
REFUSAL_KINDS = frozenset(
    {"bad_request", "invalid_image", "unsupported_transfer_syntax"}
    | {"not_a_knee", "unsupported_view", "resolution_too_low"}
)
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000


def grades_of(answer: dict[str, Any], findings: list[KneeFinding]) -> dict[str, Any]:
    """The audit record's grade fields: a crop's grade, or each graded knee of a whole film."""
    keys = ("kl_grade", "probabilities", "oa_probability", "uncertain")
    if "knees" not in answer:
        return {k: answer.get(k) for k in keys}
    return {"knees": [{"box": f.answer.get("box"), **{k: f.answer.get(k) for k in keys}} for f in findings]}


class Transient(Exception):
    """A failure that waiting cures (a server or PACS down or restarting): the instance stays queued."""


class StoreRejected(Exception):
    """The PACS answered the C-STORE of a result with a failure status."""


class ServerFailure(Exception):
    """The model server failed on this image (5xx, or an answer that breaks the schema)."""


@dataclass
class GatewayConfig:
    """Where the gateway listens, where it keeps its spool, and whom it talks to.

    Attributes:
        spool: the spool folder (`gateway.spool`); the audit log defaults to ``audit.jsonl`` beside it.
        ae_title, host, port: the gateway's own DICOM address.
        allowed_aets: calling AE titles allowed to send (the PACS); empty allows any (not advised).
        ts_url, model, key_file, token: the KOA-Serve REST endpoint and its inference key.
        pacs_ae, pacs_host, pacs_port: where results are stored (the PACS's storage SCP).
        timeout: seconds to wait for the model's answer (explanations take seconds on a CPU).
        retry_s: how long the REST client itself resends a request to a server that is down or
            restarting before the gateway's own backoff takes over.
        max_backoff_s: the longest pause between two attempts at a queued instance.
        server_error_attempts: 5xx answers on one image before it is moved to ``failed/``.
        dicom_tls: DICOM over TLS both ways (`gateway.tls.DicomTLS`); None: plain DICOM (development).
        ts_ca_file, ts_cert_file, ts_cert_key_file: grading through KOA-Serve's front door (an https://
            ``ts_url``): the door's CA and the gateway's own client certificate (it needs no key then).
        sites: which site profile answers an image (docs/SITES.md): a sending AE title or an
            InstitutionName (as in the header, matched without case) -> the site's name; an image of no
            listed sender gets the server's default calibration.
        metrics_port: where the gateway serves its Prometheus metrics on ``host`` (None: not served; 0: a
            free port, then `Gateway.metrics_port`).
    """

    spool: Path
    audit: Path | None = None
    ae_title: str = DEFAULT_AE
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    allowed_aets: Sequence[str] = ("ORTHANC",)
    ts_url: str = "http://127.0.0.1:8080"
    model: str = "oamen"
    key_file: Path | None = None
    token: str | None = None
    pacs_ae: str = "ORTHANC"
    pacs_host: str = "127.0.0.1"
    pacs_port: int = 4242
    timeout: float = 120.0
    retry_s: float = 10.0
    max_backoff_s: float = 30.0
    server_error_attempts: int = 5
    dicom_tls: DicomTLS | None = None
    ts_ca_file: Path | None = None
    ts_cert_file: Path | None = None
    ts_cert_key_file: Path | None = None
    sites: dict[str, str] = field(default_factory=dict)
    metrics_port: int | None = None

    def audit_path(self) -> Path:
        return self.audit if self.audit is not None else Path(self.spool).parent / "audit.jsonl"


def with_sender(event: evt.Event, calling: str) -> bytes:
    """The received instance as a DICOM file whose meta names its sender (SourceApplicationEntityTitle, the
    calling AE title), so that the site mapping (`Gateway.site_of`) can read it from the spool."""
    meta = event.file_meta
    meta.SourceApplicationEntityTitle = str(calling).strip()[:16]
    return b"".join((b"\x00" * 128, b"DICM", encode_file_meta(meta), event.request.DataSet.getvalue()))


class Gateway:
    """The running gateway: `start`, then `stop` (or `serve_forever` until a signal sets `stopping`)."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.spool = Spool(config.spool)
        self.audit = AuditLog(config.audit_path())
        self.client = RestClient(
            config.ts_url,
            token=config.token,
            model=config.model,
            timeout=config.timeout,
            key_file=config.key_file,
            retry_s=config.retry_s,
            ca_file=config.ts_ca_file,
            cert_file=config.ts_cert_file,
            cert_key_file=config.ts_cert_key_file,
        )
        self.stopping = threading.Event()
        self._wake = threading.Event()
        self._server: Any = None
        self._worker: threading.Thread | None = None
        self._failures: dict[str, int] = {}
        self.metrics = GatewayMetrics(lambda: len(self.spool.pending()))
        self.metrics_port: int | None = None

    # --- receiving -----------------------------------------------------------------------------
    def _scp(self) -> AE:
        ae = AE(ae_title=self.config.ae_title)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.require_called_aet = True
        if self.config.allowed_aets:
            ae.require_calling_aet = list(self.config.allowed_aets)
        return ae

    def on_store(self, event: evt.Event) -> int:
        """C-STORE handler: spool the instance, then acknowledge (a failure to spool fails the C-STORE)."""
        uid = str(event.request.AffectedSOPInstanceUID or "")
        calling = event.assoc.requestor.ae_title
        if not is_valid_uid(uid):
            log.warning("refused an instance with an invalid SOP Instance UID %r from %s", uid[:80], calling)
            return STATUS_CANNOT_UNDERSTAND
        try:
            if not self.spool.put(uid, with_sender(event, calling)):
                self.audit.write("duplicate", sop_instance_uid=uid, calling_aet=calling)
                self.metrics.duplicates.inc()
                return STATUS_SUCCESS
        except OSError:
            log.exception("could not spool %s: the C-STORE fails, the sender keeps the instance", uid)
            return STATUS_OUT_OF_RESOURCES
        self.audit.write("received", sop_instance_uid=uid, calling_aet=calling)
        self.metrics.received.inc()
        self._wake.set()
        return STATUS_SUCCESS

    # --- life cycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Listen, and start the worker on what is already queued (a resumed spool first)."""
        queued = len(self.spool.pending())
        if queued:
            log.info("resuming %d spooled instance(s) from %s", queued, self.spool.incoming)
        ae = self._scp()
        tls = self.config.dicom_tls
        self._server = ae.start_server(
            (self.config.host, self.config.port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self.on_store)],
            ssl_context=tls.server_context() if tls else None,
        )
        self._worker = threading.Thread(target=self._run, name="gateway-worker", daemon=True)
        self._worker.start()
        if self.config.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.config.metrics_port, self.config.host)
            log.info("metrics on http://%s:%d/metrics", self.config.host, self.metrics_port)
        log.info(
            "gateway %s listening on %s:%d; grading on %s; results to %s@%s:%d",
            self.config.ae_title,
            self.config.host,
            self.config.port,
            self.config.ts_url,
            self.config.pacs_ae,
            self.config.pacs_host,
            self.config.pacs_port,
        )

    def stop(self, timeout: float = 10.0) -> None:
        """Stop listening and let the worker finish its step; what is queued stays in the spool."""
        self.stopping.set()
        self._wake.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        if self._worker is not None:
            self._worker.join(timeout)
        self.client.close()
        self.metrics.close()

    def serve_forever(self) -> int:
        """Run until `stopping` is set (a signal); returns 1 if the worker died, so a supervisor restarts us."""
        self.start()
        try:
            while not self.stopping.wait(1.0):
                if self._worker is not None and not self._worker.is_alive():
                    log.error("the worker thread died: exiting so that the gateway is restarted")
                    return 1
        finally:
            self.stop()
        return 0

    # --- the worker ----------------------------------------------------------------------------
    def _run(self) -> None:
        first = min(1.0, self.config.max_backoff_s)
        backoff = first
        while not self.stopping.is_set():
            queue = self.spool.pending()
            if not queue:
                self._wake.wait(1.0)
                self._wake.clear()
                continue
            try:
                self.process(queue[0])
                backoff = first
            except Transient as exc:
                self.audit.write("retry", sop_instance_uid=queue[0].stem, reason=str(exc), wait_s=backoff)
                log.warning("%s: %s; again in %.0f s", queue[0].stem, exc, backoff)
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, self.config.max_backoff_s)
            except Exception as exc:  # a bug must not stop the queue: park the instance and go on
                log.exception("unexpected failure on %s", queue[0].stem)
                try:
                    self._fail(queue[0].stem, f"unexpected gateway error: {type(exc).__name__}: {exc}", {})
                except Exception:  # e.g. the disk itself: keep the instance queued and wait
                    log.exception("could not park %s; it stays queued", queue[0].stem)
                    self.stopping.wait(backoff)
                    backoff = min(backoff * 2, self.config.max_backoff_s)

    def process(self, path: Path) -> str:
        """Finish one queued instance; returns the audit event written (result, refused, skipped, failed).

        Raises:
            Transient: the model server or the PACS is unreachable; the instance stays queued.
        """
        uid = path.stem
        if self.spool.is_done(uid):  # done before a crash, not yet removed from the queue
            self.spool.forget(uid)
            return "duplicate"
        t0 = time.monotonic()
        received = path.stat().st_mtime
        data = path.read_bytes()
        try:
            header = dcmread(io.BytesIO(data), stop_before_pixels=True)
        except (InvalidDicomError, ValueError, EOFError, OSError) as exc:  # no header: nothing to file a report in
            return self._fail(uid, f"the received instance cannot be read as DICOM: {exc}", {})
        ids = {
            "study_instance_uid": str(header.get("StudyInstanceUID", "")),
            "series_instance_uid": str(header.get("SeriesInstanceUID", "")),
            "sop_instance_uid": uid,
        }
        verdict = screen(header)
        if verdict.action == "skip":
            self.audit.write("skipped", **ids, kind=verdict.kind, reason=verdict.reason)
            self.spool.mark_done(uid, {"event": "skipped", "reason": verdict.reason})
            self.metrics.skipped.inc()
            return "skipped"
        if verdict.action == "refuse":
            return self._refuse(header, ids, Refusal(verdict.kind, verdict.reason), None, "gateway", t0, received)
        resumed = self.spool.load_answer(uid)
        model_s = 0.0
        if resumed is None:
            t_model = time.monotonic()
            try:
                answer = self._ask(data)
            except ServerFailure as exc:
                attempts = self._failures[uid] = self._failures.get(uid, 0) + 1
                if attempts >= self.config.server_error_attempts:
                    return self._fail(uid, f"the server failed {attempts} times: {exc}", ids)
                raise Transient(f"server failure {attempts}/{self.config.server_error_attempts}: {exc}") from exc
            model_s = time.monotonic() - t_model
            if isinstance(answer, Refusal):
                return self._refuse(header, ids, answer, None, "server", t0, received)
            self.spool.save_answer(uid, answer)
        else:
            answer = resumed
        t_build = time.monotonic()
        findings = findings_from_answer(answer, laterality_of(header))
        sr = grade_report(header, findings)
        images = heatmaps(header, findings, answer)
        build_s = time.monotonic() - t_build
        store_s = self._store_or_fail(uid, [sr, *images], ids)
        if store_s is None:
            return "failed"
        record = {
            **ids,
            **grades_of(answer, findings),
            "laterality": [f.laterality for f in findings],
            "model": answer.get("model"),
            "sr_sop_instance_uid": sr.SOPInstanceUID,
            "sc_sop_instance_uids": [im.SOPInstanceUID for im in images],
            "timings_s": _timings(received, t0, model_s=model_s, build_s=build_s, store_s=store_s),
        }
        if resumed is not None:
            record["resumed"] = True
        self.audit.write("result", **record)
        self.spool.mark_done(uid, {"event": "result", **record})
        self.metrics.stored.labels("result").inc()
        self.metrics.receipt_to_sr.observe(record["timings_s"]["since_received"])
        self._failures.pop(uid, None)
        return "result"

    def _refuse(
        self,
        header: Dataset,
        ids: dict[str, str],
        refusal: Refusal,
        model: dict[str, Any] | None,
        by: str,
        t0: float,
        received: float,
    ) -> str:
        sr = refusal_report(header, refusal, model)
        store_s = self._store_or_fail(ids["sop_instance_uid"], [sr], ids)
        if store_s is None:
            return "failed"
        record = {
            **ids,
            "kind": refusal.kind,
            "reason": refusal.message,
            "by": by,
            "sr_sop_instance_uid": sr.SOPInstanceUID,
            "timings_s": _timings(received, t0, store_s=store_s),
        }
        self.audit.write("refused", **record)
        self.spool.mark_done(ids["sop_instance_uid"], {"event": "refused", **record})
        self.metrics.stored.labels("refusal").inc()
        self.metrics.receipt_to_sr.observe(record["timings_s"]["since_received"])
        return "refused"

    def _fail(self, uid: str, reason: str, ids: dict[str, str]) -> str:
        self.audit.write("failed", **(ids or {"sop_instance_uid": uid}), reason=reason)
        self.spool.park_failed(uid, {"reason": reason, **ids})
        self.metrics.failed.inc()
        self._failures.pop(uid, None)
        log.error("%s moved to %s: %s", uid, self.spool.failed, reason)
        return "failed"

    # --- the model server ----------------------------------------------------------------------
    def site_of(self, data: bytes) -> str | None:
        """The site profile for an instance: by its sender's AE title (the file meta's, as received), else its
        InstitutionName, through ``config.sites``; None (the default calibration) when neither is listed."""
        if not self.config.sites:
            return None
        sites = {k.strip().lower(): v for k, v in self.config.sites.items()}
        try:
            header = dcmread(io.BytesIO(data), stop_before_pixels=True)
        except (InvalidDicomError, ValueError, EOFError, OSError):
            return None
        meta = getattr(header, "file_meta", None)
        for key in (
            str(getattr(meta, "SourceApplicationEntityTitle", "") or ""),
            str(header.get("InstitutionName", "")),
        ):
            if key.strip() and key.strip().lower() in sites:
                return sites[key.strip().lower()]
        return None

    def _ask(self, data: bytes) -> dict[str, Any] | Refusal:
        """The server's answer with its explanation, or its refusal of the image.

        Raises:
            Transient: unreachable, restarting, timed out, or the key or address is wrong (fix and wait).
            ServerFailure: a 5xx other than 503/504, or an answer that breaks the schema.
        """
        try:
            answer = self.client.predict(data, explain=True, site=self.site_of(data))
        except KOAClientError as exc:
            if 400 <= exc.status < 500 and exc.kind in REFUSAL_KINDS:
                return Refusal(exc.kind or "bad_request", exc.message)
            if exc.status == 413:
                return Refusal("too_large", exc.message)
            if exc.status in (503, 504) or exc.status < 500:
                # 4xx that is not about the image (a refused key, a wrong model name): a setting to fix, so
                # the instance waits for it rather than being reported as not analysed.
                raise Transient(f"model server: {exc}") from exc
            raise ServerFailure(str(exc)) from exc
        try:
            validate_answer(answer, explain=True)
        except InvalidAnswer as exc:
            raise ServerFailure(f"the answer breaks the schema: {exc}") from exc
        return answer

    # --- the PACS ------------------------------------------------------------------------------
    def _store_or_fail(self, uid: str, datasets: Sequence[Dataset], ids: dict[str, str]) -> float | None:
        """Seconds spent storing; None when the PACS rejected the results too often (the instance is parked)."""
        t = time.monotonic()
        try:
            self.store(datasets)
        except StoreRejected as exc:
            attempts = self._failures[uid] = self._failures.get(uid, 0) + 1
            if attempts >= self.config.server_error_attempts:
                self._fail(uid, f"the PACS rejected the results {attempts} times: {exc}", ids)
                return None
            raise Transient(str(exc)) from exc
        return time.monotonic() - t

    def store(self, datasets: Sequence[Dataset]) -> None:
        """C-STORE ``datasets`` into the PACS over one association.

        Raises:
            Transient: no association (the PACS is down or refuses us).
            StoreRejected: the PACS answered a failure status.
        """
        ae = AE(ae_title=self.config.ae_title)
        for sop_class in dict.fromkeys(str(ds.SOPClassUID) for ds in datasets):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        tls = self.config.dicom_tls
        tls_args = (tls.client_context(), self.config.pacs_host) if tls else None
        assoc = ae.associate(
            self.config.pacs_host, self.config.pacs_port, ae_title=self.config.pacs_ae, tls_args=tls_args
        )
        if not assoc.is_established:
            where = f"{self.config.pacs_ae}@{self.config.pacs_host}:{self.config.pacs_port}"
            raise Transient(f"no association with the PACS {where} (down, or it does not know {ae.ae_title})")
        try:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                code = int(status.Status) if status and "Status" in status else None
                if code is None:
                    raise Transient("the PACS did not answer the C-STORE (connection lost or timed out)")
                if code != STATUS_SUCCESS and not (0xB000 <= code <= 0xBFFF):  # warnings are a success
                    raise StoreRejected(f"the PACS answered C-STORE status 0x{code:04X} for {ds.SOPInstanceUID}")
        finally:
            if assoc.is_established:
                assoc.release()


def _timings(received: float, t0: float, **steps: float) -> dict[str, float]:
    """Seconds of each step, the processing in all, and from reception to now (the wait in the queue too)."""
    out = {k: round(v, 3) for k, v in steps.items()}
    out["processing"] = round(time.monotonic() - t0, 3)
    out["since_received"] = round(max(0.0, time.time() - received), 3)
    return out
