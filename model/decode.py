"""Decoding at the edge: turn uploaded image bytes into one grayscale float32 array.

This is the only module of KOA-Serve that knows about file formats. Everything downstream
(preprocessing, the model, explanations) receives a 2-D ``float32`` array in ``[0, 1]``
where bone is bright, whatever the client sent.

Accepted inputs are PNG (8/16-bit; gray, RGB, RGBA or palette), JPEG and DICOM. Every
failure, whatever the bytes, is raised as :class:`DecodeError` with a message that says
what was received and what is accepted, so that the handler can turn it into a 4xx reply.

Decisions:

* Colour is converted to gray with the ITU-R BT.601 luma weights (OpenCV's
  ``COLOR_BGR2GRAY``); an alpha channel is dropped, not composited.
* PNG/JPEG integers are scaled by their dtype maximum (``uint8`` / 255, ``uint16`` / 65535),
  so the values are absolute, not stretched.
* DICOM pixels go through the modality LUT (rescale slope/intercept), then the VOI LUT or
  window when present, then are min-max scaled to ``[0, 1]`` (a constant image gives all
  zeros). MONOCHROME1 is inverted so that bone is bright, as in MONOCHROME2.
* Decompression bombs are refused from the header (width x height against ``max_pixels``)
  before any pixel is decoded, and checked again after decoding.
"""

from __future__ import annotations

import io
import logging
import struct

import cv2
import numpy as np

logger = logging.getLogger(__name__)

ACCEPTED = "PNG (8/16-bit, gray/RGB/RGBA/palette), JPEG, or DICOM"

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_DICOM_MAGIC = b"DICM"
_DICOM_MAGIC_OFFSET = 128
# SOF0..SOF15 carry the frame size; 0xC4 (DHT), 0xC8 (JPG) and 0xCC (DAC) share the range.
_JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM, RST0..RST7, SOI, EOI.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8), 0xD8, 0xD9})
_DICOM_PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2", "RGB")
# Explicit-VR value representations, used to recognise a DICOM stream without preamble.
_DICOM_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)

# Corrupt images make OpenCV log warnings on stderr; our own messages say it better.
_cv_logging = getattr(getattr(cv2, "utils", None), "logging", None)
if _cv_logging is not None and hasattr(_cv_logging, "setLogLevel"):
    _cv_logging.setLogLevel(_cv_logging.LOG_LEVEL_ERROR)


class DecodeError(ValueError):
    """Bad image bytes. Message says what was received and what is accepted."""


def _fail(received: str, problem: str) -> DecodeError:
    """Build a DecodeError whose message names what was received and what is accepted."""
    return DecodeError(f"{problem} (received {received}); accepted: {ACCEPTED}")


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


def decode_image(data: bytes, *, max_pixels: int = 50_000_000) -> np.ndarray:
    """Decode PNG, JPEG or DICOM bytes to a grayscale image.

    Args:
        data: The raw file bytes (``bytes``, ``bytearray`` or ``memoryview``).
        max_pixels: Largest accepted width x height; checked from the header before decoding.

    Returns:
        A 2-D ``float32`` array with values in ``[0, 1]``.

    Raises:
        DecodeError: For any bytes that are not an accepted, intact, reasonably sized image.
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
            image = _decode_dicom(data, max_pixels)
        else:
            image = _decode_raster(data, fmt, max_pixels)
    except DecodeError:
        raise
    except Exception as exc:  # cv2.error, pydicom errors, numpy errors, MemoryError, ...
        logger.debug("decoding %s failed", fmt, exc_info=True)
        detail = f"{type(exc).__name__}: {exc}"[:200]
        raise _fail(f"{fmt.upper()}, {len(data)} bytes", f"could not decode {fmt.upper()} ({detail})") from exc
    return _finish(image, f"{fmt.upper()}, {len(data)} bytes", max_pixels)


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


def _png_check_chunks(data: bytes, received: str) -> None:
    """Walk the PNG chunks: each must fit in the data, and IDAT and IEND must be present.

    OpenCV trusts a chunk's declared length and tries to read (and allocate) all of it, so a
    few hundred bytes declaring a 2 GB chunk would cost seconds; the walk refuses them first.
    """
    pos = len(_PNG_MAGIC)
    n = len(data)
    seen_idat = False
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
        if kind == b"IEND":
            if not seen_idat:
                raise _fail(received, "truncated or corrupt PNG: no image data (IDAT)")
            return
        pos = end
    raise _fail(received, "truncated or corrupt PNG: no end chunk (IEND)")


def _jpeg_size(data: bytes) -> tuple[int, int]:
    """Read (width, height) from the first JPEG SOFn segment, walking the marker segments."""
    received = f"JPEG, {len(data)} bytes"
    pos = 2
    n = len(data)
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
        if marker in _JPEG_SOF_MARKERS:
            if pos + 7 > n:
                break
            height, width = struct.unpack(">HH", data[pos + 3 : pos + 7])
            if height == 0:
                raise _fail(f"{received}, {width}x0", "JPEG with height defined later (DNL) not supported")
            return width, height
        pos += length
    raise _fail(received, "truncated or corrupt JPEG: no frame header (SOF) found")


def _jpeg_is_complete(data: bytes) -> bool:
    """Whether an EOI marker follows the last start-of-scan (neither can occur inside scan data)."""
    last_sos = data.rfind(b"\xff\xda")
    return last_sos >= 0 and data.find(b"\xff\xd9", last_sos) >= 0


def _decode_raster(data: bytes, fmt: str, max_pixels: int) -> np.ndarray:
    """Decode PNG or JPEG with OpenCV; gray float32 scaled by the integer dtype maximum."""
    received = f"{fmt.upper()}, {len(data)} bytes"
    if fmt == "png":
        width, height = _png_size(data)
    else:
        width, height = _jpeg_size(data)
    _check_size(width, height, received, max_pixels)
    if fmt == "png":
        _png_check_chunks(data, f"{received}, {width}x{height}")
    if fmt == "jpeg" and not _jpeg_is_complete(data):
        raise _fail(f"{received}, {width}x{height}", "truncated or corrupt JPEG: no end-of-image marker")
    img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise _fail(f"{received}, header {width}x{height}", f"truncated or corrupt {fmt.upper()}")
    if img.dtype == np.uint8 or img.dtype == np.uint16:
        img = img.astype(np.float32) / np.float32(np.iinfo(img.dtype).max)
    else:
        raise _fail(f"{received}, pixel type {img.dtype}", "unsupported pixel type")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    elif img.ndim == 3 and img.shape[2] in (3, 4):
        img = cv2.cvtColor(np.ascontiguousarray(img[:, :, :3]), cv2.COLOR_BGR2GRAY)
    return img


def _decode_dicom(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode a single-frame DICOM image; modality LUT, VOI LUT/window, min-max, MONOCHROME1 inverted."""
    import pydicom  # deferred: only DICOM uploads pay for the import
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    received = f"DICOM, {len(data)} bytes"
    force = data[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + 4] != _DICOM_MAGIC
    header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=force)
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
    if samples != (3 if photometric == "RGB" else 1):
        raise _fail(f"{received}, {photometric} with SamplesPerPixel {samples}", "inconsistent DICOM samples")

    ds = pydicom.dcmread(io.BytesIO(data), force=force)
    if "PixelData" not in ds:
        raise _fail(received, "DICOM has no pixel data (PixelData element missing)")
    arr = ds.pixel_array
    if photometric == "RGB":
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise _fail(f"{received}, pixel array {arr.shape}", "RGB DICOM with unexpected shape")
        gray = cv2.cvtColor(np.ascontiguousarray(arr, dtype=np.float32), cv2.COLOR_RGB2GRAY)
        values = gray.astype(np.float64)
    else:
        values = apply_modality_lut(arr, ds)
        values = apply_voi_lut(values, ds)
        values = np.asarray(values, dtype=np.float64)
        if photometric == "MONOCHROME1":
            values = -values  # negate before min-max: bone bright, constant image still zeros
    if not np.all(np.isfinite(values)):
        raise _fail(received, "DICOM pixel values are not finite after rescale/windowing")
    if values.size == 0:
        raise _fail(received, "DICOM pixel data is empty")
    lo, hi = float(values.min()), float(values.max())
    if hi > lo:
        values = (values - lo) / (hi - lo)
    else:
        values = np.zeros_like(values)
    return values.astype(np.float32)


def _finish(image: np.ndarray, received: str, max_pixels: int) -> np.ndarray:
    """Check the decoded array (2-D, non-empty, size) and return it as float32 in [0, 1]."""
    if image.ndim != 2 or image.size == 0:
        raise _fail(f"{received}, decoded shape {image.shape}", "decoded image is not a non-empty 2-D image")
    height, width = image.shape
    _check_size(width, height, received, max_pixels)
    return np.clip(image.astype(np.float32, copy=False), 0.0, 1.0)
