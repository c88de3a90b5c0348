"""A test modality: DX radiographs made from arrays or image files, sent to a DICOM peer by C-STORE."""

from __future__ import annotations

import io
import ssl
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset, FileMetaDataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pacs.workdir import PacsError

__all__ = ["MODALITY_AE", "send", "radiograph", "read_image"]

MODALITY_AE = "KOAMODALITY"  # the sender registered in pacs/orthanc.json (tests and make pacs-demo)


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
