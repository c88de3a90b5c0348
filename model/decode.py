"""Decoding at the edge: turn uploaded image bytes into one grayscale float32 array.

The only module that knows about file formats (PNG, JPEG, DICOM): downstream code gets a 2-D
``float32`` array in ``[0, 1]`` where bone is bright. Every failure is a `DecodeError` whose ``status``
and ``kind`` give the 4xx reply. What is accepted, and each decision: docs/MODEL.md, "Decoding".
"""

from __future__ import annotations

import io
import logging
import re
import struct
import warnings

import cv2
import numpy as np

logger = logging.getLogger(__name__)

ACCEPTED = (
    "PNG (8/16-bit, gray/RGB/RGBA/palette), JPEG (8-bit), or DICOM "
    "(uncompressed, RLE, JPEG, JPEG Lossless, JPEG-LS or JPEG 2000)"
)

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_DICOM_MAGIC = b"DICM"
_DICOM_MAGIC_OFFSET = 128
# SOF0..SOF15 carry the frame size; 0xC4 (DHT), 0xC8 (JPG) and 0xCC (DAC) share the range.
_JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM, RST0..RST7, SOI, EOI.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8), 0xD8, 0xD9})
_JPEG_APP1 = 0xE1
_EXIF_HEADER = b"Exif\x00\x00"
_EXIF_ORIENTATION = 0x0112
_DICOM_PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422")
_DICOM_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422")
# The transfer syntaxes that decode, by UID; the short names go into error messages.
_DICOM_TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian",
    "1.2.840.10008.1.2.2": "Explicit VR Big Endian",
    "1.2.840.10008.1.2.5": "RLE Lossless",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline",
    "1.2.840.10008.1.2.4.51": "JPEG Extended",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Near-Lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
}
# Explicit-VR value representations, used to recognise a DICOM stream without preamble.
_DICOM_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)
# A library's error text longer than this is cut after its last whole sentence that fits.
_DETAIL_CHARS = 400

# Corrupt images make OpenCV log warnings on stderr; our own messages say it better.
_cv_logging = getattr(getattr(cv2, "utils", None), "logging", None)
if _cv_logging is not None and hasattr(_cv_logging, "setLogLevel"):
    _cv_logging.setLogLevel(_cv_logging.LOG_LEVEL_ERROR)


class DecodeError(ValueError):
    """Bad image bytes. Message says what was received and what is accepted.

    ``status`` and ``kind`` are the HTTP status and the error type a server answers with.
    """

    status: int = 400
    kind: str = "invalid_image"


class UnsupportedTransferSyntax(DecodeError):
    """A DICOM whose transfer syntax (pixel data encoding) this server does not decode.

    Attributes:
        uid: The transfer syntax UID found in the file.
        name: Its name in the DICOM standard, or ``"unknown transfer syntax"``.
    """

    status = 415
    kind = "unsupported_transfer_syntax"

    def __init__(self, message: str, uid: str = "", name: str = "") -> None:  # defaults: pickle rebuilds from message
        super().__init__(message)
        self.uid = uid
        self.name = name


class NotAKneeHeader(DecodeError):
    """A DICOM whose header names a body part other than the knee: refused before any pixel is decoded."""

    status = 422
    kind = "not_a_knee"


# BodyPartExamined values (DICOM PS3.16 Annex L, and what modalities write in practice) under which
# a knee can be imaged. An absent or empty value is not refused here: the knee gate reads the pixels.
KNEE_BODY_PARTS = frozenset({"KNEE", "LEG", "LOWER LIMB", "LOWERLIMB", "LOWER_LIMB", "EXTREMITY", "PATELLA",
                             "TIBIA", "FEMUR"})  # fmt: skip


def _fail(received: str, problem: str) -> DecodeError:
    """Build a DecodeError whose message names what was received and what is accepted."""
    return DecodeError(f"{problem} (received {received}); accepted: {ACCEPTED}")


def _detail(exc: BaseException) -> str:
    """A library exception as one line for a message: whole, or cut after a whole sentence.

    When cut, the whole text is logged, so that the message's "rest in the server log" holds.
    """
    body = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {body}" if body else type(exc).__name__
    if len(text) <= _DETAIL_CHARS:
        return text
    ends = [m.end() for m in re.finditer(r"[.;!?](?=\s)", text[: _DETAIL_CHARS + 1])]
    if not ends:
        return text  # one long sentence: quoted whole rather than cut in the middle
    logger.warning("decoding failed: %s", text)
    return f"{text[: ends[-1]]} [rest in the server log]"


def sniff_format(data: bytes) -> str | None:
    """Identify the image format by its magic bytes.

    Args:
        data: The raw file bytes.

    Returns:
        ``"png"``, ``"jpeg"``, ``"dicom"``, or ``None`` when the bytes match no accepted format.
        DICOM is recognised by ``DICM`` at offset 128, or, without the 128-byte preamble, by a
        first element of group 0x0002 or 0x0008 in explicit-VR little endian.
    """
    if not data:
        return None
    data = bytes(data[: _DICOM_MAGIC_OFFSET + 4])
    if data.startswith(_PNG_MAGIC):
        return "png"
    if data.startswith(_JPEG_MAGIC):
        return "jpeg"
    if data[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + 4] == _DICOM_MAGIC:
        return "dicom"
    if len(data) >= 8 and data[:2] in (b"\x02\x00", b"\x08\x00") and data[4:6] in _DICOM_VRS:
        return "dicom"
    return None


def decode_image(data: bytes, *, max_pixels: int = 50_000_000, knee_only: bool = False) -> np.ndarray:
    """Decode PNG, JPEG or DICOM bytes to a grayscale image.

    Args:
        data: The raw file bytes (``bytes``, ``bytearray`` or ``memoryview``).
        max_pixels: Largest accepted width x height; checked from the header before decoding.
        knee_only: refuse a DICOM whose BodyPartExamined names another body part (`KNEE_BODY_PARTS`)
            with `NotAKneeHeader`, before its pixels are decoded.

    Returns:
        A 2-D ``float32`` array with values in ``[0, 1]``.

    Raises:
        UnsupportedTransferSyntax: For a DICOM whose pixel data encoding is not accepted.
        NotAKneeHeader: With ``knee_only``, for a DICOM whose header names another body part.
        DecodeError: For any other bytes that are not an accepted, intact, reasonably sized image.
        TypeError: If ``data`` is not bytes-like.
    """
    if data is None:
        raise _fail("nothing", "empty input")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode_image expects bytes, bytearray or memoryview, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise _fail("0 bytes", "empty input")
    fmt = sniff_format(data)
    if fmt is None:
        raise _fail(f"{len(data)} bytes starting {data[:8]!r}", "not an image in an accepted format")
    try:
        if fmt == "dicom":
            image = _decode_dicom(data, max_pixels, knee_only)
        else:
            image = _decode_raster(data, fmt, max_pixels)
    except DecodeError:
        raise
    except Exception as exc:  # cv2.error, pydicom errors, numpy errors, MemoryError, ...
        logger.debug("decoding %s failed", fmt, exc_info=True)
        raise _fail(f"{fmt.upper()}, {len(data)} bytes", f"could not decode {fmt.upper()} ({_detail(exc)})") from exc
    return _finish(image, f"{fmt.upper()}, {len(data)} bytes", max_pixels)


def dicom_laterality(data: bytes) -> str | None:
    """``R`` or ``L`` from a DICOM's ImageLaterality (0020,0062), else its Laterality (0020,0060); None for
    other images, other values (``B``, ``U``) or a header that cannot be read."""
    data = bytes(data)
    if sniff_format(data) != "dicom":
        return None
    import pydicom

    try:
        force = data[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + 4] != _DICOM_MAGIC
        header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=force)
    except Exception:
        return None
    for keyword in ("ImageLaterality", "Laterality"):
        value = str(header.get(keyword, "") or "").strip().upper()
        if value in ("R", "L"):
            return value
    return None


def _check_size(width: int, height: int, received: str, max_pixels: int) -> None:
    """Refuse zero-sized images and images with more than ``max_pixels`` pixels."""
    if width <= 0 or height <= 0:
        raise _fail(f"{received}, {width}x{height}", "zero-sized image")
    if width * height > max_pixels:
        raise _fail(
            f"{received}, {width}x{height}",
            f"image has too many pixels ({width * height} > {max_pixels} allowed)",
        )


def _png_size(data: bytes) -> tuple[int, int]:
    """Read (width, height) from the PNG IHDR chunk."""
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise _fail(f"PNG, {len(data)} bytes", "truncated or corrupt PNG: no IHDR header")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _png_check_chunks(data: bytes, received: str) -> bytes | None:
    """Walk the PNG chunks: each must fit in the data, and IDAT and IEND must be present.

    OpenCV trusts a chunk's declared length and tries to read (and allocate) all of it, so a
    few hundred bytes declaring a 2 GB chunk would cost seconds; the walk refuses them first.

    Returns:
        The payload of the ``sBIT`` chunk (significant bits per sample), or ``None``.
    """
    pos = len(_PNG_MAGIC)
    n = len(data)
    seen_idat = False
    sbit = None
    while pos + 8 <= n:
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 12 + length
        if end > n:
            raise _fail(
                received,
                f"truncated or corrupt PNG: chunk {kind!r} at byte {pos} declares {length} bytes, "
                f"{max(n - pos - 12, 0)} present",
            )
        seen_idat = seen_idat or kind == b"IDAT"
        if kind == b"sBIT" and sbit is None:
            sbit = data[pos + 8 : pos + 8 + length]
        if kind == b"IEND":
            if not seen_idat:
                raise _fail(received, "truncated or corrupt PNG: no image data (IDAT)")
            return sbit
        pos = end
    raise _fail(received, "truncated or corrupt PNG: no end chunk (IEND)")


def _png_significant_bits(sbit: bytes | None, color_type: int) -> int | None:
    """Significant bits of the colour samples from an sBIT payload; None when absent or invalid.

    The payload holds one byte per channel: gray (type 0), gray + alpha (4), R G B (2, 3) or
    R G B A (6). An invalid chunk is ignored, as libpng does, with a warning in the log.
    """
    if sbit is None:
        return None
    colour = {0: 1, 4: 1, 2: 3, 6: 3}.get(color_type)
    expected = {0: 1, 4: 2, 2: 3, 6: 4}.get(color_type)
    if colour is None or len(sbit) != expected or not all(1 <= b <= 16 for b in sbit):
        logger.warning("ignoring invalid PNG sBIT chunk %r for colour type %d", sbit, color_type)
        return None
    return max(sbit[:colour])


def _scale_png16(img: np.ndarray, bits: int | None) -> np.ndarray:
    """16-bit PNG samples (alpha already dropped) to float32 in [0, 1] by their real range.

    Args:
        img: (H, W) or (H, W, 3) uint16 samples.
        bits: Significant bits from ``sBIT``, or None for min-max scaling.
    """
    if bits is not None:
        full = (1 << bits) - 1
        if int(img.max()) > full:  # the PNG standard's form: samples scaled up to 16 bits
            img = img >> (16 - bits)
        return (img.astype(np.float64) / full).astype(np.float32)
    lo, hi = int(img.min()), int(img.max())
    if hi == lo:
        return np.zeros(img.shape, np.float32)
    return ((img.astype(np.float64) - lo) / (hi - lo)).astype(np.float32)


def _jpeg_header(data: bytes) -> tuple[int, int, int, bytes | None]:
    """Walk the JPEG marker segments up to the first SOFn.

    Returns:
        (width, height, sample precision in bits, EXIF payload after ``Exif\\0\\0`` or None).
    """
    received = f"JPEG, {len(data)} bytes"
    pos = 2
    n = len(data)
    exif = None
    while pos < n:
        if data[pos] != 0xFF:
            raise _fail(received, f"truncated or corrupt JPEG: expected a marker at byte {pos}")
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            break
        marker = data[pos]
        pos += 1
        if marker in _JPEG_STANDALONE:
            continue
        if marker == 0xDA:  # start of scan before any frame header
            break
        if pos + 2 > n:
            break
        (length,) = struct.unpack(">H", data[pos : pos + 2])
        if length < 2:
            raise _fail(received, f"truncated or corrupt JPEG: bad segment length at byte {pos}")
        if marker == _JPEG_APP1 and exif is None and data[pos + 2 : pos + 8] == _EXIF_HEADER:
            exif = data[pos + 8 : pos + length]
        if marker in _JPEG_SOF_MARKERS:
            if pos + 7 > n:
                break
            precision = data[pos + 2]
            height, width = struct.unpack(">HH", data[pos + 3 : pos + 7])
            if height == 0:
                raise _fail(f"{received}, {width}x0", "JPEG with height defined later (DNL) not supported")
            return width, height, precision, exif
        pos += length
    raise _fail(received, "truncated or corrupt JPEG: no frame header (SOF) found")


def _jpeg_is_complete(data: bytes) -> bool:
    """Whether an EOI marker follows the last start-of-scan (neither can occur inside scan data)."""
    last_sos = data.rfind(b"\xff\xda")
    return last_sos >= 0 and data.find(b"\xff\xd9", last_sos) >= 0


def _exif_orientation(payload: bytes | None) -> int:
    """The EXIF orientation (1-8) of a JPEG's APP1 payload; 1 when absent, invalid or unreadable."""
    if not payload:
        return 1
    from PIL import Image  # deferred: only JPEGs with EXIF pay for the import

    try:
        with warnings.catch_warnings(record=True) as caught:  # Pillow warns about corrupt EXIF
            warnings.simplefilter("always")
            exif = Image.Exif()
            exif.load(payload)
            orientation = int(exif.get(_EXIF_ORIENTATION, 1))
    except Exception:  # a broken EXIF block must not refuse intact pixels
        logger.warning("ignoring an unreadable EXIF block (%d bytes)", len(payload), exc_info=True)
        return 1
    for warning in caught:
        logger.warning("EXIF block partly unreadable (%d bytes): %s", len(payload), warning.message)
    if orientation not in range(1, 9):
        logger.warning("ignoring EXIF orientation %d (valid: 1-8)", orientation)
        return 1
    return orientation


def _apply_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """Turn a (H, W) image stored with EXIF ``orientation`` into its upright view.

    The eight values are the four rotations, each with or without a mirror: 2 mirrors left-right,
    3 turns 180 degrees, 4 mirrors top-bottom, 5 transposes, 6 turns 90 degrees clockwise,
    7 transposes across the other diagonal, 8 turns 90 degrees counter-clockwise.
    """
    views = {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1, :],
        5: lambda a: a.T,
        6: lambda a: np.rot90(a, -1),
        7: lambda a: a[::-1, ::-1].T,
        8: lambda a: np.rot90(a, 1),
    }
    return np.ascontiguousarray(views[orientation](image))


def _decode_raster(data: bytes, fmt: str, max_pixels: int) -> np.ndarray:
    """Decode PNG or JPEG with OpenCV to gray float32: 8 bits / 255, 16-bit PNG by its real range."""
    received = f"{fmt.upper()}, {len(data)} bytes"
    exif = None
    if fmt == "png":
        width, height = _png_size(data)
    else:
        width, height, precision, exif = _jpeg_header(data)
    _check_size(width, height, received, max_pixels)
    received = f"{received}, {width}x{height}"
    bits = None
    if fmt == "png":
        bits = _png_significant_bits(_png_check_chunks(data, received), data[25])
    elif precision != 8:
        raise _fail(
            f"{received}, {precision}-bit samples",
            "a JPEG file must have 8-bit samples; send deeper images as 16-bit PNG or as DICOM",
        )
    if fmt == "jpeg" and not _jpeg_is_complete(data):
        raise _fail(received, "truncated or corrupt JPEG: no end-of-image marker")
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise _fail(received, f"truncated or corrupt {fmt.upper()}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    elif img.ndim == 3 and img.shape[2] in (3, 4):
        img = np.ascontiguousarray(img[:, :, :3])  # alpha dropped, not composited
    elif img.ndim != 2:
        raise _fail(f"{received}, decoded shape {img.shape}", "unsupported number of channels")
    if img.dtype == np.uint8:
        img = img.astype(np.float32) / np.float32(255)
    elif img.dtype == np.uint16:
        img = _scale_png16(img, bits)
    else:
        raise _fail(f"{received}, pixel type {img.dtype}", "unsupported pixel type")
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    if fmt == "jpeg":
        img = _apply_orientation(img, _exif_orientation(exif))
    return img


def _transfer_syntax(header: object, received: str) -> str:
    """The transfer syntax UID of a DICOM header, refused unless this module decodes it.

    A stream without file meta information has no transfer syntax element; pydicom has then
    recognised one of the uncompressed encodings, which is returned.
    """
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(header, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if uid is None:
        implicit, little = getattr(header, "original_encoding", None) or (False, True)
        if implicit:
            return ImplicitVRLittleEndian
        return ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    uid = UID(str(uid).strip().rstrip("\x00"))
    name = uid.name if uid.name != str(uid) else "unknown transfer syntax"
    supported = ", ".join(_DICOM_TRANSFER_SYNTAXES.values())
    if str(uid) not in _DICOM_TRANSFER_SYNTAXES:
        raise UnsupportedTransferSyntax(
            f"DICOM transfer syntax {uid} ({name}) is not supported: its pixel data cannot be decoded "
            f"(received {received}); supported transfer syntaxes: {supported}; accepted: {ACCEPTED}",
            str(uid),
            name,
        )
    decoder = get_decoder(uid)
    if not decoder.is_available:
        # The server's installation is incomplete; the client can still be told which syntax failed.
        logger.error(
            "no decoder installed for %s (%s): %s; install requirements.txt",
            uid,
            name,
            "; ".join(decoder.missing_dependencies),
        )
        raise UnsupportedTransferSyntax(
            f"DICOM transfer syntax {uid} ({name}) cannot be decoded by this server: its decoder is not "
            f"installed (received {received}); accepted: {ACCEPTED}",
            str(uid),
            name,
        )
    return uid


def _padding_mask(stored: np.ndarray, ds: object) -> np.ndarray | None:
    """Pixels whose stored value is PixelPaddingValue, or within it and PixelPaddingRangeLimit."""
    value = getattr(ds, "PixelPaddingValue", None)
    if value is None:
        return None
    limit = getattr(ds, "PixelPaddingRangeLimit", None)
    lo, hi = (int(value), int(value)) if limit is None else sorted((int(value), int(limit)))
    mask = (stored >= lo) & (stored <= hi)
    return mask if mask.any() else None


def _decode_dicom(data: bytes, max_pixels: int, knee_only: bool = False) -> np.ndarray:
    """Decode a single-frame DICOM image to gray in [0, 1]; see the module docstring for the steps."""
    import pydicom  # deferred: only DICOM uploads pay for the import
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    received = f"DICOM, {len(data)} bytes"
    force = data[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + 4] != _DICOM_MAGIC
    header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=force)
    part = " ".join(str(header.get("BodyPartExamined", "") or "").upper().split())
    if knee_only and part and part not in KNEE_BODY_PARTS:
        raise NotAKneeHeader(
            f"the DICOM header says BodyPartExamined {part}: KOA-Serve grades knee radiographs only "
            f"(accepted body parts: {', '.join(sorted(KNEE_BODY_PARTS))}, or none given)"
        )
    uid = _transfer_syntax(header, received)
    rows = header.get("Rows")
    columns = header.get("Columns")
    if rows is None or columns is None:
        raise _fail(received, "DICOM without Rows/Columns: not an image")
    _check_size(int(columns), int(rows), received, max_pixels)
    received = f"{received}, {int(columns)}x{int(rows)}"
    frames = header.get("NumberOfFrames")
    if frames is not None and int(frames) > 1:
        raise _fail(f"{received}, {int(frames)} frames", "multi-frame DICOM not supported; send one frame")
    photometric = str(header.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in _DICOM_PHOTOMETRICS:
        raise _fail(
            f"{received}, PhotometricInterpretation {photometric or 'missing'}",
            f"DICOM photometric interpretation must be one of {', '.join(_DICOM_PHOTOMETRICS)}",
        )
    samples = int(header.get("SamplesPerPixel", 1))
    if samples != (3 if photometric in _DICOM_COLOUR else 1):
        raise _fail(f"{received}, {photometric} with SamplesPerPixel {samples}", "inconsistent DICOM samples")

    ds = pydicom.dcmread(io.BytesIO(data), force=force)
    if "PixelData" not in ds:
        raise _fail(received, "DICOM has no pixel data (PixelData element missing)")
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = uid
    arr = ds.pixel_array  # YBR_FULL and YBR_FULL_422 come out as RGB
    padding = None
    if photometric in _DICOM_COLOUR:
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise _fail(f"{received}, pixel array {arr.shape}", f"{photometric} DICOM with unexpected shape")
        gray = cv2.cvtColor(np.ascontiguousarray(arr, dtype=np.float32), cv2.COLOR_RGB2GRAY)
        values = gray.astype(np.float64)
    else:
        padding = _padding_mask(arr, ds)
        values = apply_modality_lut(arr, ds)
        values = apply_voi_lut(values, ds)
        values = np.asarray(values, dtype=np.float64)
        shape = str(ds.get("PresentationLUTShape", "")).strip().upper()
        if photometric == "MONOCHROME1" or shape == "INVERSE":
            values = -values  # negate before min-max: bone bright, constant image still zeros
    if not np.all(np.isfinite(values)):
        raise _fail(received, "DICOM pixel values are not finite after rescale/windowing")
    if values.size == 0:
        raise _fail(received, "DICOM pixel data is empty")
    anatomy = values if padding is None else values[~padding]
    if anatomy.size == 0:
        return np.zeros(values.shape, np.float32)
    lo, hi = float(anatomy.min()), float(anatomy.max())
    if hi > lo:
        values = (values - lo) / (hi - lo)
    else:
        values = np.zeros_like(values)
    if padding is not None:
        values[padding] = 0.0
    return values.astype(np.float32)


def _finish(image: np.ndarray, received: str, max_pixels: int) -> np.ndarray:
    """Check the decoded array (2-D, non-empty, size) and return it as float32 in [0, 1]."""
    if image.ndim != 2 or image.size == 0:
        raise _fail(f"{received}, decoded shape {image.shape}", "decoded image is not a non-empty 2-D image")
    height, width = image.shape
    _check_size(width, height, received, max_pixels)
    return np.clip(image.astype(np.float32, copy=False), 0.0, 1.0)
