"""Image bytes built in memory for the tests: OpenCV PNG/JPEG, hand-written PNG chunks, pydicom DICOM."""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
from pydicom import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def encode(ext: str, arr: np.ndarray, params: list[int] | None = None) -> bytes:
    """Encode an array with OpenCV (``ext`` like ".png")."""
    ok, buf = cv2.imencode(ext, arr, params or [])
    assert ok
    return buf.tobytes()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    """One PNG chunk with a valid CRC."""
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_by_hand(
    width: int,
    height: int,
    *,
    color_type: int,
    raw_rows: bytes,
    plte: bytes | None = None,
    trns: bytes | None = None,
) -> bytes:
    """A PNG (bit depth 8) from unfiltered row bytes, written chunk by chunk."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    out = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
    if plte is not None:
        out += png_chunk(b"PLTE", plte)
    if trns is not None:
        out += png_chunk(b"tRNS", trns)
    return out + png_chunk(b"IDAT", zlib.compress(raw_rows)) + png_chunk(b"IEND", b"")


def make_dicom(
    arr: np.ndarray | None,
    *,
    photometric: str = "MONOCHROME2",
    rows: int | None = None,
    columns: int | None = None,
    preamble: bool = True,
    **attrs: object,
) -> bytes:
    """A DICOM file (explicit VR little endian) holding ``arr`` as uncompressed pixel data."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_SOP_CLASS
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = DX_SOP_CLASS
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PhotometricInterpretation = photometric
    samples = 3 if photometric in ("RGB", "YBR_FULL") else 1
    ds.SamplesPerPixel = samples
    if samples == 3:
        ds.PlanarConfiguration = 0
    dtype = np.dtype(arr.dtype if arr is not None else np.uint16)
    ds.BitsAllocated = dtype.itemsize * 8
    ds.BitsStored = dtype.itemsize * 8
    ds.HighBit = dtype.itemsize * 8 - 1
    ds.PixelRepresentation = 1 if dtype.kind == "i" else 0
    shape = arr.shape if arr is not None else (4, 4)
    frame_shape = shape[1:] if attrs.get("NumberOfFrames", 1) != 1 else shape
    ds.Rows = rows if rows is not None else frame_shape[0]
    ds.Columns = columns if columns is not None else frame_shape[1]
    for key, value in attrs.items():
        setattr(ds, key, value)
    if arr is not None:
        ds.PixelData = np.ascontiguousarray(arr).astype(dtype.newbyteorder("<")).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    return data if preamble else data[132:]
