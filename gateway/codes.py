"""The coded concepts of KOA-Serve's Structured Reports: standard codes where they exist, a private scheme elsewhere.

DICOM (PS3.16) and SNOMED CT have no concept for "Kellgren-Lawrence grade" nor for its five values, so
they live in the private coding scheme ``99KOA`` (a private designator starts with ``99``, PS3.3
C.12.1.1.2), declared in each SR's Coding Scheme Identification Sequence and documented in
docs/PACS.md. Everything else (the report title, the knee joint, laterality, yes/no, the observer
device, "no algorithms succeeded") is a standard code from pydicom's copy of PS3.16.
"""

from __future__ import annotations

import highdicom as hd
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

__all__ = [
    "SCHEME",
    "CODING_SCHEME",
    "KL_GRADE",
    "KL_VALUES",
    "KL_PROBABILITIES",
    "OA_PROBABILITY",
    "REVIEW_ADVISED",
    "NOT_ANALYSED",
    "REASON_NOT_ANALYSED",
    "REASONS",
    "KNEE_JOINT",
    "LATERALITY",
    "PROCEDURE",
    "UNITLESS",
    "YES",
    "NO",
    "DEVICE",
    "reason_code",
]

SCHEME = "99KOA"
CODING_SCHEME = hd.coding_schemes.CodingSchemeIdentificationItem(
    designator=SCHEME,
    name="KOA-Serve knee osteoarthritis grading",
    version="1",
    responsible_organization="KOA-Serve project (docs/PACS.md)",
)

# Code meanings are LO (at most 64 characters).
KL_GRADE = Code("KLG", SCHEME, "Kellgren-Lawrence grade")
KL_VALUES = (
    Code("KL0", SCHEME, "Kellgren-Lawrence grade 0 (none)"),
    Code("KL1", SCHEME, "Kellgren-Lawrence grade 1 (doubtful)"),
    Code("KL2", SCHEME, "Kellgren-Lawrence grade 2 (minimal)"),
    Code("KL3", SCHEME, "Kellgren-Lawrence grade 3 (moderate)"),
    Code("KL4", SCHEME, "Kellgren-Lawrence grade 4 (severe)"),
)
KL_PROBABILITIES = tuple(Code(f"KLP{g}", SCHEME, f"Probability of Kellgren-Lawrence grade {g}") for g in range(5))
OA_PROBABILITY = Code("OAP", SCHEME, "Probability of Kellgren-Lawrence grade 2 or higher")
REVIEW_ADVISED = Code("REVIEW", SCHEME, "Uncertain grade: reader review advised")
REASON_NOT_ANALYSED = Code("NOTANALYSED", SCHEME, "Reason the image was not analysed")
# Why an image got no grade: the server's 4xx error types (koa_client.schema.ERROR_TYPES) and the gateway's own.
REASONS = {
    "not_a_knee": Code("not_a_knee", SCHEME, "Not a knee radiograph (image or body part)"),
    "unsupported_view": Code("unsupported_view", SCHEME, "Lateral or oblique knee view: KL grading needs AP/PA"),
    "resolution_too_low": Code("resolution_too_low", SCHEME, "Knee joint too small in the image to grade"),
    "invalid_image": Code("invalid_image", SCHEME, "Image could not be decoded"),
    "unsupported_transfer_syntax": Code("unsupported_transfer_syntax", SCHEME, "Transfer syntax not decoded"),
    "bad_request": Code("bad_request", SCHEME, "Request refused by the grading server"),
    "too_large": Code("too_large", SCHEME, "Image larger than the grading server accepts"),
}

# Standard codes.
NOT_ANALYSED = (codes.DCM.CADProcessingAndFindingsSummary, codes.DCM.NoAlgorithmsSucceededWithoutFindings)
KNEE_JOINT = codes.SCT.KneeJoint
LATERALITY = {"R": codes.SCT.Right, "L": codes.SCT.Left}
PROCEDURE = codes.SCT.PlainRadiography
UNITLESS = codes.UCUM.NoUnits
YES, NO = codes.SCT.Yes, codes.SCT.No
DEVICE = codes.DCM.Device


def reason_code(kind: str) -> Code:
    """The coded reason for a refusal of type ``kind``; an unknown type maps to ``bad_request``."""
    return REASONS.get(kind, REASONS["bad_request"])
