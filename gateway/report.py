"""DICOM results of one graded radiograph: a TID 1500 Structured Report and a Secondary Capture heatmap.

Built with highdicom after the IHE AI Results profile, one `KneeFinding` per graded knee, with UIDs
derived from the source SOP Instance UID alone, so a radiograph graded twice yields the same
instances. docs/PACS.md shows the content tree and the codes (gateway/codes.py).

    sr = grade_report(source, findings_from_answer(answer, laterality_of(source)))
"""

from __future__ import annotations

import base64
import io
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset

from gateway import codes

__all__ = [
    "MANUFACTURER",
    "SR_SERIES_NUMBER",
    "SC_SERIES_NUMBER",
    "KneeFinding",
    "Refusal",
    "result_uid",
    "laterality_of",
    "source_header",
    "findings_from_answer",
    "grade_report",
    "refusal_report",
    "heatmaps",
    "content_tree",
]

MANUFACTURER = "KOA-Serve"
GATEWAY_NAME = "koa-serve-gateway"
SR_SERIES_NUMBER = 9901  # high numbers keep the results after the acquired series in a viewer
SC_SERIES_NUMBER = 9902
SR_SERIES_DESCRIPTION = "KOA-Serve KL grade (AI, unverified)"
SC_SERIES_DESCRIPTION = "KOA-Serve heatmap (AI, not for diagnosis)"
WARNING = "NOT FOR DIAGNOSIS WITHOUT A READER"
SC_SIZE = 512  # the heatmap is drawn at this width, with text bands above and below
METHOD_NAMES = {  # the server's explanation methods (docs/EXPLAIN.md), as a reader knows them
    "layercam": "LayerCAM",
    "gradcam": "Grad-CAM",
    "ig": "Integrated Gradients",
    "ig_blur": "Integrated Gradients",
    "smoothgrad": "SmoothGrad",
    "occlusion": "Occlusion",
}
FILM_SC_MAX = 2048  # a whole film's heatmap keeps its native size up to this width


@dataclass(frozen=True)
class KneeFinding:
    """The answer for one knee of a radiograph.

    Attributes:
        laterality: ``"R"``, ``"L"`` or None when the source does not say.
        answer: one answer of schema v2 or v3 (koa_client/schema.py), or one graded knee of a film's
            answer: ``kl_grade``, ``probabilities``, ``oa_probability``, ``model``, optionally
            ``uncertain``, ``explanation`` and (a film's knee) ``box``.
    """

    laterality: str | None
    answer: dict[str, Any]


@dataclass(frozen=True)
class Refusal:
    """Why a radiograph got no grade: ``kind`` (an error type of koa_client.schema, or the gateway's) and the words."""

    kind: str
    message: str


# Name-based (version 5) UUIDs in this namespace make the result UIDs: 2.25.<the UUID as an integer> is the
# UID form of a UUID (ISO/IEC 9834-8, PS3.5 B.2), so no organisation root is needed.
UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/koa-serve/dicom-results")


def result_uid(kind: str, *keys: str) -> str:
    """A UID derived from ``kind`` and ``keys`` alone: the same source always gives the same result UIDs."""
    name = "\x1f".join([kind, *(str(k) for k in keys)])
    return f"2.25.{uuid.uuid5(UID_NAMESPACE, name).int}"


# Type 2 attributes of the patient and study that highdicom copies from the source: a modality may leave
# them out of its header, and the results must still be written (empty, as type 2 allows).
_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def source_header(ds: Dataset) -> Dataset:
    """A copy of ``ds`` without pixel data, with the patient and study type 2 attributes present (maybe empty).

    Raises:
        ValueError: a type 1 UID the results need (study, SOP class, SOP instance) is missing.
    """
    missing = [k for k in ("StudyInstanceUID", "SOPClassUID", "SOPInstanceUID") if not ds.get(k)]
    if missing:
        raise ValueError(f"the source has no {', '.join(missing)}: results cannot be filed into its study")
    header = Dataset()
    for elem in ds:
        if elem.tag.group != 0x7FE0:  # pixel data
            header.add(elem)
    for keyword in _TYPE2:
        if keyword not in header:
            setattr(header, keyword, None)
    return header


def laterality_of(ds: Dataset) -> str | None:
    """``R``/``L`` from ImageLaterality (0020,0062), else Laterality (0020,0060); None when neither says."""
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(ds.get(keyword, "") or "").strip().upper()
        if value in ("R", "L"):
            return value
    return None


def findings_from_answer(answer: dict[str, Any], laterality: str | None) -> list[KneeFinding]:
    """One finding per graded knee of ``answer``: a crop's answer grades one knee, whose side the DICOM
    header gives; a whole film's answer (``knees``, schema 3) grades each knee it found, with the
    laterality the server read (the header's, for a film with one graded knee) and the film's model."""
    if not isinstance(answer.get("knees"), list):
        return [KneeFinding(laterality, answer)]
    graded = [k for k in answer["knees"] if "kl_grade" in k]
    single = laterality if len(graded) == 1 else None
    return [KneeFinding(k.get("laterality") or single, {**k, "model": answer.get("model")}) for k in graded]


def _device(model: dict[str, Any] | None) -> hd.sr.ObservationContext:
    """The observer device: the served model (name and version), or the gateway when no model was asked."""
    name = str(model.get("name", "unknown")) if model else GATEWAY_NAME
    version = str(model.get("version", "")) if model else ""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=result_uid("device", name, version),
        name=name,
        manufacturer_name=MANUFACTURER,
        model_name=f"{name} {version}".strip(),
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=hd.sr.CodedConcept.from_code(codes.DEVICE),
            observer_identifying_attributes=device,
        )
    )


def _group(
    source: Dataset,
    index: int,
    laterality: str | None,
    *,
    model: dict[str, Any] | None,
    measurements: Sequence[hd.sr.Measurement] = (),
    evaluations: Sequence[hd.sr.QualitativeEvaluation] = (),
    knee: bool = True,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """One measurement group; ``knee`` False leaves out the finding site (an image that may be no knee)."""
    side = {"R": "right", "L": "left"}.get(laterality or "", "unknown side")
    algorithm = (
        hd.sr.AlgorithmIdentification(
            name=str(model.get("name", "unknown")), version=str(model.get("version", "")), manufacturer=MANUFACTURER
        )
        if model
        else None
    )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=result_uid("tracking", source.SOPInstanceUID, str(index)),
            identifier=f"knee {index + 1} ({side})" if knee else "image",
        ),
        finding_sites=[hd.sr.FindingSite(codes.KNEE_JOINT, laterality=codes.LATERALITY.get(laterality or ""))]
        if knee
        else None,
        algorithm_id=algorithm,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
        measurements=list(measurements) or None,
        qualitative_evaluations=list(evaluations) or None,
    )


def _grade_group(source: Dataset, index: int, finding: KneeFinding) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    answer = finding.answer
    grade = int(answer["kl_grade"])
    measurements = [
        hd.sr.Measurement(name=code, value=float(p), unit=codes.UNITLESS)
        for code, p in zip(codes.KL_PROBABILITIES, answer["probabilities"], strict=True)
    ]
    measurements.append(
        hd.sr.Measurement(name=codes.OA_PROBABILITY, value=float(answer["oa_probability"]), unit=codes.UNITLESS)
    )
    evaluations = [hd.sr.QualitativeEvaluation(codes.KL_GRADE, codes.KL_VALUES[grade])]
    if "uncertain" in answer:
        yes_no = codes.YES if answer["uncertain"] else codes.NO
        evaluations.append(hd.sr.QualitativeEvaluation(codes.REVIEW_ADVISED, yes_no))
    return _group(
        source, index, finding.laterality, model=answer.get("model"), measurements=measurements, evaluations=evaluations
    )


def _document(
    source: Dataset,
    groups: Sequence[hd.sr.MeasurementsAndQualitativeEvaluations],
    model: dict[str, Any] | None,
    *,
    complete: bool,
) -> hd.sr.Comprehensive3DSR:
    report = hd.sr.MeasurementReport(
        observation_context=_device(model),
        procedure_reported=codes.PROCEDURE,
        imaging_measurements=groups,
    )
    version = str(model.get("version", "")) if model else ""
    return hd.sr.Comprehensive3DSR(
        evidence=[source],
        content=report,
        series_instance_uid=result_uid("sr-series", source.StudyInstanceUID),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=result_uid("sr", source.SOPInstanceUID),
        instance_number=int(source.get("InstanceNumber") or 1),
        manufacturer=MANUFACTURER,
        is_complete=complete,
        is_final=False,
        is_verified=False,  # VerificationFlag UNVERIFIED until a reader signs it
        series_description=SR_SERIES_DESCRIPTION,
        manufacturer_model_name=str(model.get("name", GATEWAY_NAME)) if model else GATEWAY_NAME,
        software_versions=version or None,
        coding_schemes=[codes.CODING_SCHEME],
    )


def grade_report(source: Dataset, findings: Sequence[KneeFinding]) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 measurement report of ``findings`` on ``source`` (its header; pixels are not needed).

    Per knee: the KL grade (coded, scheme 99KOA), the five grade probabilities and P(KL >= 2)
    (unitless numbers), "reader review advised" yes/no when the answer has ``uncertain``, the
    knee joint with its laterality, the model as algorithm (name, version) and the source image.
    The observer device is the model of the first finding.

    Raises:
        ValueError: no findings, or findings of different models.
    """
    if not findings:
        raise ValueError("grade_report needs at least one finding; a refused image gets refusal_report")
    models = {(f.answer.get("model") or {}).get("version") for f in findings}
    if len(models) != 1:
        raise ValueError(f"the findings of one report must come from one model version, got {sorted(map(str, models))}")
    source = source_header(source)
    groups = [_grade_group(source, i, f) for i, f in enumerate(findings)]
    return _document(source, groups, findings[0].answer.get("model"), complete=True)


def refusal_report(source: Dataset, refusal: Refusal, model: dict[str, Any] | None = None) -> hd.sr.Comprehensive3DSR:
    """A report that says the image was not analysed and why (coded; the words go to the audit log).

    "CAD Processing and Findings Summary" = "No algorithms succeeded; without findings" (DCM), and the
    reason (scheme 99KOA). ``model`` names the device when known; None names the gateway (a refusal,
    the server's or the gateway's own, does not say which model version looked at the image).
    """
    source = source_header(source)
    evaluations = [
        hd.sr.QualitativeEvaluation(*codes.NOT_ANALYSED),
        hd.sr.QualitativeEvaluation(codes.REASON_NOT_ANALYSED, codes.reason_code(refusal.kind)),
    ]
    group = _group(source, 0, laterality_of(source), model=model, evaluations=evaluations, knee=False)
    return _document(source, [group], model, complete=False)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def _banner(finding: KneeFinding) -> tuple[str, str]:
    answer = finding.answer
    model = answer.get("model") or {}
    side = {"R": "RIGHT", "L": "LEFT"}.get(finding.laterality or "", "")
    grade = int(answer["kl_grade"])
    confidence = float(answer["probabilities"][grade])
    top = f"KL{grade}  p={confidence:.2f}  {side}".strip()
    if answer.get("uncertain"):
        top += "  UNCERTAIN"
    return top, f"{model.get('name', '?')} {model.get('version', '')}  |  {WARNING}"


def overlay_image(finding: KneeFinding) -> np.ndarray:
    """The explanation's overlay, enlarged to `SC_SIZE`, between text bands: (H, W, 3) uint8 RGB.

    Raises:
        ValueError: the answer has no ``explanation.overlay_png``.
    """
    explanation = finding.answer.get("explanation") or {}
    if not explanation.get("overlay_png"):
        raise ValueError("the answer has no explanation.overlay_png: ask the server with explain=True")
    return _banded(explanation["overlay_png"], SC_SIZE, *_banner(finding))


def film_overlay_image(explanation: dict[str, Any], findings: Sequence[KneeFinding]) -> np.ndarray:
    """A whole film's overlay (each knee's map in its box, drawn by the server at the film's native size),
    at that size up to `FILM_SC_MAX` wide, between text bands naming every knee's grade: (H, W, 3) RGB."""
    width = int(explanation.get("width") or SC_SIZE)
    tops, bottom = zip(*(_banner(f) for f in findings), strict=True)
    return _banded(explanation["overlay_png"], max(SC_SIZE, min(width, FILM_SC_MAX)), "  |  ".join(tops), bottom[0])


def _banded(overlay_png: str, width: int, top: str, bottom: str) -> np.ndarray:
    heat = Image.open(io.BytesIO(base64.b64decode(overlay_png))).convert("RGB")
    if heat.width != width:
        heat = heat.resize((width, round(width * heat.height / heat.width)), Image.Resampling.BICUBIC)
    band = 40
    canvas = Image.new("RGB", (width, heat.height + 2 * band), "black")
    canvas.paste(heat, (0, band))
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 8), top, fill=(255, 255, 255), font=_font(22))
    draw.text((8, heat.height + band + 11), bottom, fill=(255, 220, 0), font=_font(15))
    return np.asarray(canvas, dtype=np.uint8)


def _orientation(ds: Dataset) -> tuple[str, str] | None:
    """The source's PatientOrientation when it is two valid biped values; the heatmap keeps the source's
    orientation (the server letterboxes, it does not flip), so the same directions hold."""
    value = ds.get("PatientOrientation")
    if value is None or isinstance(value, str) or len(value) != 2:
        return None
    rows, cols = (str(v).upper() for v in value)
    valid = {v.value for v in hd.enum.PatientOrientationValuesBiped}
    return (rows, cols) if {rows, cols} <= valid else None


def heatmaps(
    source: Dataset, findings: Sequence[KneeFinding], answer: dict[str, Any] | None = None
) -> list[hd.sc.SCImage]:
    """One Secondary Capture (RGB, text burned in) per finding that carries an explanation; for a whole
    film's ``answer`` that carries the film's overlay (``explanation.overlay_png``, each knee's map in its
    box on the film), one capture of the whole film instead."""
    source = source_header(source)
    orientation = _orientation(source)
    film = (answer or {}).get("explanation") or {}
    if findings and isinstance((answer or {}).get("knees"), list) and film.get("overlay_png"):
        side = findings[0].laterality if len(findings) == 1 else None
        grades = ", ".join(f"KL{f.answer['kl_grade']}" for f in findings)
        pixels = film_overlay_image(film, findings)
        return [_capture(source, orientation, pixels, 0, findings[0], side, f"{_method(film)} heatmap of {grades}")]
    images = []
    for i, finding in enumerate(findings):
        if not (finding.answer.get("explanation") or {}).get("overlay_png"):
            continue
        what = f"{_method(finding.answer['explanation'])} heatmap of KL{finding.answer['kl_grade']}"
        images.append(_capture(source, orientation, overlay_image(finding), i, finding, finding.laterality, what))
    return images


def _method(explanation: dict[str, Any]) -> str:
    return METHOD_NAMES.get(str(explanation.get("method", "")), "Attribution")


def _capture(
    source: Dataset,
    orientation: tuple[str, str] | None,
    pixels: np.ndarray,
    i: int,
    finding: KneeFinding,
    laterality: str | None,
    what: str,
) -> hd.sc.SCImage:
    """The Secondary Capture of one heatmap image (``pixels``, RGB) of the source; ``what`` it shows goes
    into its comments."""
    model = finding.answer.get("model") or {}
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=result_uid("sc-series", source.StudyInstanceUID),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=result_uid("sc", source.SOPInstanceUID, str(i)),
        instance_number=int(source.get("InstanceNumber") or 1),
        manufacturer=MANUFACTURER,
        laterality=laterality,
        patient_orientation=orientation or ("L", "F"),
        series_description=SC_SERIES_DESCRIPTION,
        manufacturer_model_name=str(model.get("name", GATEWAY_NAME)),
        software_versions=str(model.get("version", "")) or None,
    )
    if orientation is None:
        sc.PatientOrientation = None  # unknown: type 2, empty, rather than a guess (highdicom wants one)
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = f"{what}; {WARNING.lower()}"
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    return sc


def content_tree(sr: Dataset) -> str:
    """The SR's content tree as indented text: relationship, concept name and value of each item."""
    flags = f"{sr.get('VerificationFlag', '?')}, {sr.get('CompletionFlag', '?')}"
    lines = [f"{sr.get('SeriesDescription', 'SR')}  [{flags}]"]
    title = sr.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in sr else "(no title)"
    lines.append(f"CONTAINER {title}")

    def walk(items: Sequence[Dataset], depth: int) -> None:
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
            lines.append(f"{'  ' * depth}{item.RelationshipType} {item.ValueType} {name}: {_value(item)}".rstrip(": "))
            if "ContentSequence" in item:
                walk(item.ContentSequence, depth + 1)

    walk(sr.get("ContentSequence", []), 1)
    return "\n".join(lines)


def _value(item: Dataset) -> str:
    kind = item.ValueType
    if kind == "CODE":
        code = item.ConceptCodeSequence[0]
        return f"{code.CodeMeaning} ({code.CodeValue}, {code.CodingSchemeDesignator})"
    if kind == "NUM":
        if "MeasuredValueSequence" not in item or not item.MeasuredValueSequence:
            return "(no value)"
        mv = item.MeasuredValueSequence[0]
        return f"{mv.NumericValue} {mv.MeasurementUnitsCodeSequence[0].CodeValue}"
    if kind in ("TEXT", "UIDREF", "DATETIME", "DATE", "TIME", "PNAME"):
        for keyword in ("TextValue", "UID", "DateTime", "Date", "Time", "PersonName"):
            if keyword in item:
                return str(item.get(keyword))
    if kind in ("IMAGE", "COMPOSITE") and "ReferencedSOPSequence" in item:
        return str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
    return ""
