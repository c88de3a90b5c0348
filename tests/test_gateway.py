"""The DICOM gateway without Java or Orthanc: its reports, its header rules, its spool, its audit log, and the
whole receive -> grade -> store loop against a scripted model server and a pynetdicom PACS in this process.

tests/test_gateway_pacs.py runs the same gateway between a real Orthanc and a real TorchServe.
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from prometheus_client import generate_latest
from pydicom import Dataset, dcmread
from pynetdicom import AE, AllStoragePresentationContexts, evt

import pacs
from gateway import codes
from gateway.audit import AuditLog, read_audit
from gateway.report import (
    KneeFinding,
    Refusal,
    content_tree,
    findings_from_answer,
    grade_report,
    heatmaps,
    laterality_of,
    refusal_report,
    result_uid,
)
from gateway.screen import is_valid_uid, screen
from gateway.service import Gateway, GatewayConfig
from gateway.spool import Spool
from koa_client.schema import validate_answer

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="module")
def knee() -> np.ndarray:
    return cv2.imread(str(FIXTURES / "knee_kl2.png"), cv2.IMREAD_GRAYSCALE)


def make_answer(grade: int = 2, uncertain: bool = False, explain: bool = True) -> dict[str, Any]:
    probs = [0.05, 0.1, 0.15, 0.2, 0.5]
    probs[grade], probs[4] = probs[4], probs[grade]
    answer = {
        "schema_version": 2,
        "kl_grade": grade,
        "class_name": f"KL{grade}",
        "label": f"KL{grade}",
        "probabilities": probs,
        "oa_probability": round(sum(probs[2:]), 6),
        "confidence": probs[grade],
        "uncertain": uncertain,
        "model": {"name": "oamen_pt", "version": "9.9.9"},
    }
    if explain:
        ok, png = cv2.imencode(".png", np.full((32, 32, 3), 128, np.uint8))
        answer["explanation"] = {
            "method": "gradcam",
            "target": grade,
            "grid": [[0.5]],
            "overlay_png": base64.b64encode(png.tobytes()).decode(),
        }
    validate_answer(answer, explain=explain)
    return answer


def items(ds: Dataset) -> Iterator[Dataset]:
    """Every content item of an SR, depth first."""
    for item in ds.get("ContentSequence", []):
        yield item
        yield from items(item)


def named(ds: Dataset, meaning: str) -> list[Dataset]:
    return [
        i for i in items(ds) if "ConceptNameCodeSequence" in i and i.ConceptNameCodeSequence[0].CodeMeaning == meaning
    ]


def reread(ds: Dataset) -> Dataset:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return dcmread(io.BytesIO(buf.getvalue()))


# --- reports -----------------------------------------------------------------------------------


def test_the_report_holds_the_grade_probabilities_side_model_and_source(knee):
    source = pacs.radiograph(knee, ImageLaterality="L", InstanceNumber=4)
    answer = make_answer(grade=3, uncertain=True)
    sr = reread(grade_report(source, findings_from_answer(answer, laterality_of(source))))
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "COMPLETE"
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == source.PatientID
    assert sr.SeriesInstanceUID != source.SeriesInstanceUID
    assert sr.SOPInstanceUID == result_uid("sr", source.SOPInstanceUID)
    (grade,) = named(sr, "Kellgren-Lawrence grade")
    code = grade.ConceptCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("KL3", "99KOA") and "Kellgren-Lawrence" in code.CodeMeaning
    probs = [
        float(named(sr, f"Probability of Kellgren-Lawrence grade {g}")[0].MeasuredValueSequence[0].NumericValue)
        for g in range(5)
    ]
    assert probs == pytest.approx(answer["probabilities"])
    oa = named(sr, "Probability of Kellgren-Lawrence grade 2 or higher")[0]
    assert float(oa.MeasuredValueSequence[0].NumericValue) == pytest.approx(answer["oa_probability"])
    assert named(sr, codes.REVIEW_ADVISED.meaning)[0].ConceptCodeSequence[0].CodeValue == codes.YES.value
    assert named(sr, "Laterality")[0].ConceptCodeSequence[0].CodeMeaning == "Left"
    assert named(sr, "Device Observer Name")[0].TextValue == "oamen_pt"
    assert named(sr, "Algorithm Version")[0].TextValue == "9.9.9"
    (ref,) = named(sr, "Source of Measurement")
    assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99KOA"
    tree = content_tree(sr)
    assert "Kellgren-Lawrence grade 3 (moderate) (KL3, 99KOA)" in tree and "UNVERIFIED" in tree


def test_an_answer_without_uncertain_has_no_review_item_and_a_missing_side_no_laterality(knee):
    source = pacs.radiograph(knee)
    answer = make_answer(explain=False)
    del answer["uncertain"]
    sr = grade_report(source, findings_from_answer(answer, laterality_of(source)))
    assert not named(sr, codes.REVIEW_ADVISED.meaning) and not named(sr, "Laterality")
    assert laterality_of(source) is None  # ImageLaterality U: unpaired/unknown


def test_one_group_per_knee_for_films_with_both_knees(knee):
    source = pacs.radiograph(knee)
    findings = [KneeFinding("R", make_answer(1)), KneeFinding("L", make_answer(4))]
    sr = grade_report(source, findings)
    grades = [i.ConceptCodeSequence[0].CodeValue for i in named(sr, "Kellgren-Lawrence grade")]
    sides = [i.ConceptCodeSequence[0].CodeMeaning for i in named(sr, "Laterality")]
    assert grades == ["KL1", "KL4"] and sides == ["Right", "Left"]
    assert len({im.SOPInstanceUID for im in heatmaps(source, findings)}) == 2
    with pytest.raises(ValueError, match="at least one finding"):
        grade_report(source, [])


def test_a_whole_films_answer_gives_one_finding_per_graded_knee(knee):
    source = pacs.radiograph(knee)
    left, right = make_answer(1), make_answer(3)
    film = {
        "schema_version": 3,
        "image": {"width": 400, "height": 300},
        "knees": [
            {"box": [10, 10, 90, 90], "side": "left", "laterality": None, "view": "ap", **_grades(left)},
            {"box": [150, 10, 230, 90], "side": "left", "laterality": None, "view": "other",
             "refused": {"type": "unsupported_view", "message": "lateral"}},
            {"box": [300, 10, 380, 90], "side": "right", "laterality": None, "view": "ap", **_grades(right)},
        ],
        "model": left["model"],
    }  # fmt: skip
    validate_answer(film, explain=True)
    findings = findings_from_answer(film, "R")  # two knees: the header's side names neither
    assert [f.answer["kl_grade"] for f in findings] == [1, 3] and [f.laterality for f in findings] == [None, None]
    assert all(f.answer["model"] == left["model"] for f in findings)
    sr = grade_report(source, findings)
    assert [i.ConceptCodeSequence[0].CodeValue for i in named(sr, "Kellgren-Lawrence grade")] == ["KL1", "KL3"]
    assert len(heatmaps(source, findings)) == 2
    film["knees"] = film["knees"][:2]  # one graded knee: the header's side is its side
    assert [f.laterality for f in findings_from_answer(film, "R")] == ["R"]


def _grades(answer: dict) -> dict:
    return {k: v for k, v in answer.items() if k not in ("schema_version", "model")}


def test_a_refused_image_gets_a_not_analysed_report_without_a_grade(knee):
    source = pacs.radiograph(knee, BodyPartExamined="CHEST")
    sr = reread(refusal_report(source, Refusal("not_a_knee", "BodyPartExamined is CHEST")))
    assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "PARTIAL"
    assert not named(sr, "Kellgren-Lawrence grade") and not named(sr, "Finding Site")
    summary = named(sr, "CAD Processing and Findings Summary")[0].ConceptCodeSequence[0]
    assert summary.CodeValue == "111245"  # No algorithms succeeded; without findings
    reason = named(sr, codes.REASON_NOT_ANALYSED.meaning)[0].ConceptCodeSequence[0]
    assert reason.CodeValue == "not_a_knee"
    assert sr.SOPInstanceUID == result_uid("sr", source.SOPInstanceUID)


def test_the_heatmap_is_a_secondary_capture_in_the_study_with_text_burned_in(knee):
    source = pacs.radiograph(knee, ImageLaterality="R")
    (sc,) = heatmaps(source, findings_from_answer(make_answer(), "R"))
    sc = reread(sc)
    assert sc.SOPClassUID.startswith("1.2.840.10008.5.1.4.1.1.7")
    assert sc.StudyInstanceUID == source.StudyInstanceUID and sc.BurnedInAnnotation == "YES"
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    pixels = sc.pixel_array
    assert pixels.ndim == 3 and pixels.shape[2] == 3
    assert pixels[:40].max() > 200 and pixels[-40:].max() > 200  # white grade text above, yellow warning below
    assert "not for diagnosis" in sc.ImageComments
    assert heatmaps(source, findings_from_answer(make_answer(explain=False), "R")) == []


def test_a_source_without_type2_attributes_still_gets_results(knee):
    source = pacs.radiograph(knee)
    for keyword in ("PatientBirthDate", "ReferringPhysicianName", "AccessionNumber", "StudyID", "PatientSex"):
        delattr(source, keyword)
    grade_report(source, findings_from_answer(make_answer(), None))
    del source.StudyInstanceUID
    with pytest.raises(ValueError, match="StudyInstanceUID"):
        grade_report(source, findings_from_answer(make_answer(), None))


# --- header rules --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attrs", "action"),
    [
        ({}, "grade"),
        ({"BodyPartExamined": "KNEE"}, "grade"),
        ({"BodyPartExamined": "LOWER LIMB"}, "grade"),
        ({"BodyPartExamined": ""}, "grade"),
        ({"Modality": "CR"}, "grade"),
        ({"BodyPartExamined": "CHEST"}, "refuse"),
        ({"BodyPartExamined": "HAND"}, "refuse"),
        ({"Modality": "CT"}, "skip"),
        ({"Modality": "SR", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.34"}, "skip"),
        ({"Modality": "DX", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"}, "skip"),  # a secondary capture called DX
        ({"StudyInstanceUID": ""}, "skip"),  # nowhere to file a result
    ],
)
def test_screen(knee, attrs, action):
    ds = pacs.radiograph(knee[:8, :8])
    for key, value in attrs.items():
        setattr(ds, key, value)
    verdict = screen(ds)
    assert verdict.action == action
    if action == "refuse":
        assert verdict.kind == "not_a_knee" and attrs["BodyPartExamined"] in verdict.reason


def test_uids():
    assert is_valid_uid("1.2.840.10008.5.1.4.1.1.1.1") and is_valid_uid(result_uid("sr", "1.2.3"))
    for bad in ("", "1.02.3", "../../etc/passwd", "1.2.", "1" * 65, None):
        assert not is_valid_uid(bad)
    assert (
        result_uid("sr", "1.2.3") == result_uid("sr", "1.2.3") != result_uid("sc", "1.2.3") != result_uid("sr", "1.2.4")
    )


# --- spool and audit -----------------------------------------------------------------------------


def test_spool_queue_done_duplicate_failed_and_requeue(tmp_path):
    spool = Spool(tmp_path)
    (spool.tmp / "half-written").write_bytes(b"x")
    spool = Spool(tmp_path)  # a restart clears what was never acknowledged
    assert not list(spool.tmp.iterdir())
    assert spool.put("1.2.3", b"first") and spool.put("1.2.4", b"second")
    assert [p.stem for p in spool.pending()] == ["1.2.3", "1.2.4"]
    spool.save_answer("1.2.3", {"kl_grade": 1})
    assert spool.load_answer("1.2.3") == {"kl_grade": 1}
    spool.mark_done("1.2.3", {"event": "result"})
    assert spool.is_done("1.2.3") and spool.load_answer("1.2.3") is None
    assert not spool.put("1.2.3", b"again")  # a duplicate is not queued
    assert [p.stem for p in spool.pending()] == ["1.2.4"]
    spool.park_failed("1.2.4", {"reason": "server failed"})
    assert spool.pending() == [] and (spool.failed / "1.2.4.dcm").read_bytes() == b"second"
    assert spool.requeue_failed() == 1 and [p.stem for p in spool.pending()] == ["1.2.4"]
    with pytest.raises(ValueError, match="not a DICOM UID"):
        spool.put("../escape", b"x")


def test_audit_appends_json_lines_and_skips_a_torn_last_line(tmp_path):
    audit = AuditLog(tmp_path / "a.jsonl")
    audit.write("received", sop_instance_uid="1.2")
    audit.write("result", sop_instance_uid="1.2", kl_grade=2)
    with open(tmp_path / "a.jsonl", "a") as f:
        f.write('{"event": "res')  # killed while writing
    records = read_audit(tmp_path / "a.jsonl")
    assert [r["event"] for r in records] == ["received", "result"] and records[1]["kl_grade"] == 2
    assert records[0]["time"].endswith("+00:00")


# --- the whole loop, with a scripted model server and an in-process PACS --------------------------


class ModelServer:
    """A stand-in for KOA-Serve's REST API: answers from a script, then ``default``; counts requests."""

    def __init__(self) -> None:
        self.script: list[tuple[int, dict[str, Any]]] = []
        self.default: tuple[int, dict[str, Any]] = (200, make_answer())
        self.requests: list[str] = []
        self.sites: list[str | None] = []  # the X-KOA-Site header of each request (docs/SITES.md)
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                owner.requests.append(self.path)
                owner.sites.append(self.headers.get("X-KOA-Site"))
                status, body = owner.script.pop(0) if owner.script else owner.default
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class FakePacs:
    """A storage SCP (AE ORTHANC) that keeps what it receives, like the PACS keeps results."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.stored: dict[str, Dataset] = {}
        self.server = None

    def start(self) -> None:
        ae = AE(ae_title="ORTHANC")
        ae.supported_contexts = AllStoragePresentationContexts

        def on_store(event: evt.Event) -> int:
            ds = event.dataset
            ds.file_meta = event.file_meta
            self.stored[str(ds.SOPInstanceUID)] = ds
            return 0

        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


@pytest.fixture
def loop(tmp_path) -> Iterator[tuple[Gateway, ModelServer, FakePacs]]:
    gw_port, pacs_port = pacs.free_ports(2)
    model = ModelServer()
    store = FakePacs(pacs_port)
    store.start()
    config = GatewayConfig(
        spool=tmp_path / "spool",
        port=gw_port,
        allowed_aets=("ORTHANC", pacs.MODALITY_AE),
        ts_url=model.url,
        pacs_port=pacs_port,
        retry_s=0.0,
        max_backoff_s=0.2,
        server_error_attempts=3,
        timeout=10,
    )
    gateway = Gateway(config)
    gateway.start()
    yield gateway, model, store
    gateway.stop()
    store.stop()
    model.close()


def wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def events(gateway: Gateway, uid: str) -> list[str]:
    return [r["event"] for r in read_audit(gateway.config.audit_path()) if r.get("sop_instance_uid") == uid]


def test_a_radiograph_gets_its_report_and_heatmap_once(loop, knee):
    gateway, model, store = loop
    ds = pacs.radiograph(knee, ImageLaterality="R")
    assert pacs.send([ds], gateway.config.port, called_ae="KOASERVE") == [0]
    sr_uid, sc_uid = result_uid("sr", ds.SOPInstanceUID), result_uid("sc", ds.SOPInstanceUID, "0")
    wait_for(lambda: sr_uid in store.stored and sc_uid in store.stored)
    assert model.requests == ["/explanations/oamen"]
    assert store.stored[sr_uid].StudyInstanceUID == ds.StudyInstanceUID
    wait_for(lambda: "result" in events(gateway, ds.SOPInstanceUID))
    record = next(r for r in read_audit(gateway.config.audit_path()) if r["event"] == "result")
    assert record["study_instance_uid"] == ds.StudyInstanceUID and record["kl_grade"] == 2
    assert record["model"]["version"] == "9.9.9" and record["sr_sop_instance_uid"] == sr_uid
    assert set(record["timings_s"]) >= {"model_s", "store_s", "processing", "since_received"}
    # The same instance again: acknowledged, not graded again, nothing stored again.
    before = len(store.stored)
    assert pacs.send([ds], gateway.config.port, called_ae="KOASERVE") == [0]
    wait_for(lambda: "duplicate" in events(gateway, ds.SOPInstanceUID))
    assert len(model.requests) == 1 and len(store.stored) == before
    # ... and counted (gateway/metrics.py): no label names the instance
    m = gateway.metrics
    assert (m.received._value.get(), m.duplicates._value.get(), m.stored.labels("result")._value.get()) == (1, 1, 1)
    exposed = generate_latest(m.registry).decode()
    assert m.receipt_to_sr._sum.get() > 0 and "koa_gateway_received_total 1.0" in exposed
    assert ds.SOPInstanceUID not in exposed and ds.StudyInstanceUID not in exposed


def test_a_chest_is_refused_from_its_header_without_asking_the_model(loop, knee):
    gateway, model, store = loop
    ds = pacs.radiograph(knee, BodyPartExamined="CHEST")
    pacs.send([ds], gateway.config.port, called_ae="KOASERVE")
    wait_for(lambda: "refused" in events(gateway, ds.SOPInstanceUID))
    assert result_uid("sr", ds.SOPInstanceUID) in store.stored
    assert model.requests == [] and result_uid("sc", ds.SOPInstanceUID, "0") not in store.stored
    record = next(r for r in read_audit(gateway.config.audit_path()) if r["event"] == "refused")
    assert record["by"] == "gateway" and "CHEST" in record["reason"]


def test_the_servers_refusal_becomes_a_not_analysed_report_with_its_words_in_the_audit(loop, knee):
    gateway, model, store = loop
    message = "the knee gate finds no knee joint (score 0.01 < 0.5)"
    model.script = [(422, {"error": {"status": 422, "type": "not_a_knee", "message": message}})]
    ds = pacs.radiograph(knee)
    pacs.send([ds], gateway.config.port, called_ae="KOASERVE")
    wait_for(lambda: "refused" in events(gateway, ds.SOPInstanceUID))
    sr = store.stored[result_uid("sr", ds.SOPInstanceUID)]
    assert named(sr, codes.REASON_NOT_ANALYSED.meaning)[0].ConceptCodeSequence[0].CodeValue == "not_a_knee"
    record = next(r for r in read_audit(gateway.config.audit_path()) if r["event"] == "refused")
    assert record["by"] == "server" and record["reason"] == message


def test_a_restarting_server_and_a_pacs_outage_delay_the_result_but_never_drop_it(loop, knee):
    gateway, model, store = loop
    restarting = {"error": {"status": 503, "type": "restarting", "message": "draining"}}
    model.script = [(503, restarting), (503, restarting)]
    store.stop()  # the PACS is down too
    ds = pacs.radiograph(knee)
    pacs.send([ds], gateway.config.port, called_ae="KOASERVE")
    wait_for(lambda: events(gateway, ds.SOPInstanceUID).count("retry") >= 4)
    assert gateway.spool.load_answer(ds.SOPInstanceUID) is not None  # graded once, kept for the store
    store.start()
    wait_for(lambda: result_uid("sr", ds.SOPInstanceUID) in store.stored)
    assert len(model.requests) == 3  # two 503s, one answer; the PACS retries did not ask again
    wait_for(lambda: gateway.spool.pending() == [])


def test_repeated_server_failures_park_the_instance_and_the_queue_moves_on(loop, knee):
    gateway, model, store = loop
    failure = (500, {"error": {"status": 500, "type": "server_error", "message": "boom"}})
    model.script = [failure] * 3
    bad, good = pacs.radiograph(knee), pacs.radiograph(knee)
    pacs.send([bad], gateway.config.port, called_ae="KOASERVE")
    wait_for(lambda: "failed" in events(gateway, bad.SOPInstanceUID))
    pacs.send([good], gateway.config.port, called_ae="KOASERVE")
    wait_for(lambda: result_uid("sr", good.SOPInstanceUID) in store.stored)
    assert (gateway.spool.failed / f"{bad.SOPInstanceUID}.dcm").is_file()
    assert result_uid("sr", bad.SOPInstanceUID) not in store.stored


def test_results_sent_back_to_the_gateway_are_skipped_so_nothing_loops(loop, knee):
    gateway, model, store = loop
    source = pacs.radiograph(knee)
    sr = grade_report(source, findings_from_answer(make_answer(), None))
    assert pacs.send([sr], gateway.config.port, called_ae="KOASERVE") == [0]
    wait_for(lambda: "skipped" in events(gateway, sr.SOPInstanceUID))
    assert model.requests == [] and store.stored == {}


def test_the_sending_ae_picks_the_site_profile(loop, knee):
    gateway, model, _ = loop
    gateway.config.sites = {pacs.MODALITY_AE: "north"}
    first = pacs.radiograph(knee)
    assert pacs.send([first], gateway.config.port, called_ae="KOASERVE") == [0]
    wait_for(lambda: "result" in events(gateway, first.SOPInstanceUID))
    gateway.config.sites = {"ELSEWHERE": "south"}
    second = pacs.radiograph(knee)
    assert pacs.send([second], gateway.config.port, called_ae="KOASERVE") == [0]
    wait_for(lambda: "result" in events(gateway, second.SOPInstanceUID))
    assert model.sites == ["north", None]


def test_an_unknown_calling_ae_is_refused(loop, knee):
    gateway, _, _ = loop
    with pytest.raises(pacs.PacsError, match="no association"):
        pacs.send([pacs.radiograph(knee)], gateway.config.port, called_ae="KOASERVE", calling_ae="STRANGER")
    assert gateway.spool.pending() == []


def test_resume_grades_what_a_stopped_gateway_had_queued(tmp_path, knee):
    """In process: queue with the model unreachable, stop, start a new gateway on the same spool."""
    gw_port, pacs_port, dead_port = pacs.free_ports(3)
    store = FakePacs(pacs_port)
    store.start()
    model = ModelServer()
    base = dict(spool=tmp_path / "spool", port=gw_port, allowed_aets=(pacs.MODALITY_AE,), pacs_port=pacs_port)
    first = Gateway(GatewayConfig(**base, ts_url=f"http://127.0.0.1:{dead_port}", retry_s=0.0, max_backoff_s=0.2))
    first.start()
    study = [pacs.radiograph(knee) for _ in range(3)]
    try:
        assert pacs.send(study, gw_port, called_ae="KOASERVE") == [0, 0, 0]
        assert len(first.spool.pending()) == 3
    finally:
        first.stop()
    second = Gateway(GatewayConfig(**base, ts_url=model.url, retry_s=0.0, max_backoff_s=0.2))
    second.start()
    try:
        wait_for(lambda: all(result_uid("sr", ds.SOPInstanceUID) in store.stored for ds in study))
        wait_for(lambda: second.spool.pending() == [])
    finally:
        second.stop()
        store.stop()
        model.close()


def test_the_gateway_never_imports_the_model_code():
    """DESIGN.md: the gateway talks to KOA-Serve over the wire, so it can run on a machine without torch."""
    import ast

    root = Path(__file__).resolve().parents[1]
    for folder in ("gateway", "pacs"):
        for path in (root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                assert not {n.split(".")[0] for n in names} & {"model", "handler", "train", "torch"}, path


def test_a_whole_films_heatmap_is_one_capture_of_the_film_at_its_size(knee):
    source = pacs.radiograph(knee)
    left, right = make_answer(1), make_answer(3)
    for answer in (left, right):
        answer["explanation"].pop("overlay_png")  # a film's knees keep their grid; the film holds the overlay
    png = cv2.imencode(".png", np.full((600, 1000, 3), 90, np.uint8))[1].tobytes()
    film = {
        "schema_version": 3,
        "image": {"width": 1000, "height": 600},
        "knees": [
            {"box": [100, 200, 300, 400], "side": "left", "laterality": None, "view": "ap", **_grades(left)},
            {"box": [600, 200, 800, 400], "side": "right", "laterality": None, "view": "ap", **_grades(right)},
        ],
        "explanation": {
            "method": "layercam",
            "width": 1000,
            "height": 600,
            "overlay_png": base64.b64encode(png).decode(),
        },
        "model": left["model"],
    }
    validate_answer(film, explain=True)
    findings = findings_from_answer(film, None)
    (sc,) = heatmaps(source, findings, film)
    sc = reread(sc)
    assert (sc.Columns, sc.Rows) == (1000, 600 + 80)  # the film's width; its height between two text bands
    assert "LayerCAM heatmap of KL1, KL3" in sc.ImageComments
    assert heatmaps(source, findings) == []  # without the film's answer: no knee carries an overlay
