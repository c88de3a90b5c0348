"""What the gateway does with a received instance, decided from its DICOM header alone (pure functions).

`screen` says skip (not a radiograph to grade, or no UIDs to reference: nothing is written, so the
gateway's own results never loop back), refuse (a body part other than the knee: a "not analysed"
report) or grade (everything else; the model's knee gate decides). docs/PACS.md, "Header rules".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom import Dataset

__all__ = [
    "GRADABLE_MODALITIES",
    "RESULT_SOP_CLASS_PREFIXES",
    "KNEE_BODY_PARTS",
    "Verdict",
    "screen",
    "is_valid_uid",
]

# Projection radiography: computed, digital, and "radiographic imaging" (conventional film).
GRADABLE_MODALITIES = frozenset({"CR", "DX", "RG"})
# SOP classes that are results or documents, never images to grade: Structured Reports (88), Secondary
# Capture (7, 7.x), presentation states (11), encapsulated documents (104), key objects (88.59).
RESULT_SOP_CLASS_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88.",
    "1.2.840.10008.5.1.4.1.1.7",
    "1.2.840.10008.5.1.4.1.1.11.",
    "1.2.840.10008.5.1.4.1.1.104.",
)
# BodyPartExamined values (PS3.16 Annex L, compared without spaces or underscores) that may show a knee.
KNEE_BODY_PARTS = frozenset({"KNEE", "LEG", "LOWERLIMB", "LOWEREXTREMITY", "EXTREMITY", "FEMUR", "TIBIA", "PATELLA"})
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


@dataclass(frozen=True)
class Verdict:
    """``action`` is ``grade``, ``refuse`` or ``skip``; ``kind`` and ``reason`` say why (empty for grade)."""

    action: str
    kind: str = ""
    reason: str = ""


def is_valid_uid(uid: object) -> bool:
    """A DICOM UID: dot-separated numbers without leading zeros, at most 64 characters (PS3.5 9.1)."""
    return isinstance(uid, str) and 0 < len(uid) <= 64 and _UID.match(uid) is not None


def screen(ds: Dataset) -> Verdict:
    """Decide from ``ds``'s header whether to grade, refuse or skip it (see the module docstring)."""
    missing = [k for k in ("StudyInstanceUID", "SOPClassUID", "SOPInstanceUID") if not ds.get(k)]
    if missing:
        return Verdict("skip", "invalid_header", f"no {', '.join(missing)}: results could not be filed into a study")
    sop_class = str(ds.get("SOPClassUID", "") or "")
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if sop_class.startswith(RESULT_SOP_CLASS_PREFIXES):
        return Verdict("skip", "not_an_image", f"SOP class {sop_class} is a result or document, not a radiograph")
    if modality not in GRADABLE_MODALITIES:
        allowed = ", ".join(sorted(GRADABLE_MODALITIES))
        reason = f"Modality {modality or '(none)'} is not projection radiography ({allowed})"
        return Verdict("skip", "not_an_image", reason)
    body_part = str(ds.get("BodyPartExamined", "") or "").strip().upper()
    if body_part and re.sub(r"[\s_]", "", body_part) not in KNEE_BODY_PARTS:
        return Verdict(
            "refuse",
            "not_a_knee",
            f"BodyPartExamined is {body_part}: KOA-Serve grades knee radiographs "
            f"(accepted: {', '.join(sorted(KNEE_BODY_PARTS))}, or none)",
        )
    return Verdict("grade")
