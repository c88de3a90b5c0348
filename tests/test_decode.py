"""Tests of model.decode: every accepted format decodes to gray float32 in [0, 1]; all else is a DecodeError.

Test images are built in memory (OpenCV and Pillow for PNG/JPEG, hand-written chunks for palette,
sBIT and bomb PNGs, pydicom for DICOM); the real-world inputs start from the fixture knee
(tests/fixtures/knee_kl2.png). Each compressed DICOM transfer syntax is made inside its test, by
pydicom's own encoders (RLE, JPEG 2000) or by dcmtk's command-line tools (JPEG, JPEG Lossless,
JPEG-LS), which .ci/run installs; outside CI those tests skip when dcmtk is missing.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from PIL import Image, ImageOps
from pydicom.pixels import convert_color_space
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from model.contract import InputContract
from model.decode import ACCEPTED, DecodeError, UnsupportedTransferSyntax, decode_image, sniff_format
from model.preprocess import prepare
from tests.imagebytes import encode, make_dicom, png_by_hand, png_chunk

KNEE = Path(__file__).resolve().parent / "fixtures" / "knee_kl2.png"

# --- builders -------------------------------------------------------------------------------------


def luma(r: float, g: float, b: float) -> float:
    """ITU-R BT.601 luma, the weights of cv2.COLOR_BGR2GRAY."""
    return 0.299 * r + 0.587 * g + 0.114 * b


def assert_decode_error(data: object, *fragments: str, **kwargs: int) -> DecodeError:
    """Decoding ``data`` raises a DecodeError naming the accepted formats and each fragment."""
    with pytest.raises(DecodeError) as info:
        decode_image(data, **kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert ACCEPTED in message
    for fragment in fragments:
        assert fragment.lower() in message.lower(), message
    return info.value


def knee() -> np.ndarray:
    """The fixture knee, (224, 224) uint8."""
    image = cv2.imread(str(KNEE), cv2.IMREAD_UNCHANGED)
    assert image is not None and image.dtype == np.uint8, KNEE
    return image


def knee12() -> np.ndarray:
    """The fixture knee on a 12-bit scale (uint16 holding 0..4095), as a DR detector stores it."""
    return np.round(knee().astype(np.float64) * 4095 / 255).astype(np.uint16)


def with_png_chunk(png: bytes, kind: bytes, payload: bytes) -> bytes:
    """Insert a chunk right after IHDR (8-byte signature + 25-byte IHDR chunk)."""
    assert png[12:16] == b"IHDR"
    return png[:33] + png_chunk(kind, payload) + png[33:]


def compress(data: bytes, uid: str, **kwargs: object) -> bytes:
    """Re-encode a DICOM file with pydicom's own encoder for transfer syntax ``uid``."""
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.compress(uid, **kwargs)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def dcmtk(tool: str, options: list[str], data: bytes, tmp_path: Path) -> bytes:
    """Re-encode a DICOM file with a dcmtk tool (dcmcjpeg, dcmcjpls, ...); skip if dcmtk is missing.

    In CI (CI=true) a missing tool fails instead: .ci/run installs dcmtk, so its absence is a bug.
    """
    if shutil.which(tool) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} not found although .ci/run installs the Debian package dcmtk")
        pytest.skip(
            f"{tool} not installed: the Debian package dcmtk encodes this transfer syntax (apt-get install dcmtk)"
        )
    src, dst = tmp_path / "in.dcm", tmp_path / "out.dcm"
    src.write_bytes(data)
    subprocess.run([tool, *options, str(src), str(dst)], check=True, capture_output=True, timeout=60)
    return dst.read_bytes()


def transfer_syntax(data: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).file_meta.TransferSyntaxUID)


def with_transfer_syntax(data: bytes, uid: str) -> bytes:
    """A copy of a DICOM file that declares transfer syntax ``uid``, pixel data encapsulated as is."""
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(io.BytesIO(data))
    ds.file_meta.TransferSyntaxUID = uid
    ds.PixelData = encapsulate([ds.PixelData])
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, implicit_vr=False, little_endian=True)
    return buf.getvalue()


def check_output(out: np.ndarray, shape: tuple[int, int]) -> None:
    """The common output contract: 2-D float32 in [0, 1]."""
    assert out.dtype == np.float32
    assert out.shape == shape
    assert float(out.min()) >= 0.0
    assert float(out.max()) <= 1.0


# --- sniffing -------------------------------------------------------------------------------------


def test_sniff_format() -> None:
    gray = np.zeros((2, 2), np.uint8)
    assert sniff_format(encode(".png", gray)) == "png"
    assert sniff_format(encode(".jpg", gray)) == "jpeg"
    assert sniff_format(make_dicom(np.zeros((2, 2), np.uint16))) == "dicom"
    assert sniff_format(make_dicom(np.zeros((2, 2), np.uint16), preamble=False)) == "dicom"
    assert sniff_format(b"PK\x03\x04" + bytes(200)) is None
    assert sniff_format(b"") is None
    assert sniff_format(b"GIF89a") is None


# --- PNG and JPEG ---------------------------------------------------------------------------------


def test_png_gray8_exact() -> None:
    arr = np.array([[0, 1, 2, 127], [128, 200, 254, 255]], np.uint8)
    out = decode_image(encode(".png", arr))
    check_output(out, (2, 4))
    np.testing.assert_array_equal(out, arr.astype(np.float32) / np.float32(255))
    assert out[0, 0] == 0.0 and out[1, 3] == 1.0


def test_png_gray16_min_max_without_sbit() -> None:
    arr = np.array([[1000, 1001, 1256, 2000], [1500, 3000, 4094, 5000]], np.uint16)
    out = decode_image(encode(".png", arr))
    check_output(out, (2, 4))
    np.testing.assert_allclose(out, (arr - 1000.0) / 4000.0, rtol=0, atol=1e-7)


def test_png_gray16_constant_is_zeros() -> None:
    out = decode_image(encode(".png", np.full((3, 2), 4000, np.uint16)))
    check_output(out, (3, 2))
    assert not out.any()


@pytest.mark.parametrize(
    ("sbit", "arr", "expected"),
    [
        # values within the significant bits: divided by 2**n - 1, not stretched to their min-max
        (10, [[0, 512, 1023]], [[0.0, 512 / 1023, 1.0]]),
        (12, [[100, 200, 300]], [[100 / 4095, 200 / 4095, 300 / 4095]]),
        # the PNG standard's form: 12-bit values scaled up to 16 bits (bit replication), shifted back
        (12, [[0x0000, 0x8008, 0xFFFF]], [[0.0, 0x800 / 4095, 1.0]]),
        # left-shifted without replication
        (12, [[0x0640, 0x0C80, 0x12C0]], [[100 / 4095, 200 / 4095, 300 / 4095]]),
        (16, [[0, 1000, 65535]], [[0.0, 1000 / 65535, 1.0]]),
    ],
)
def test_png_gray16_sbit_honoured(sbit: int, arr: list[list[int]], expected: list[list[float]]) -> None:
    data = with_png_chunk(encode(".png", np.array(arr, np.uint16)), b"sBIT", bytes([sbit]))
    out = decode_image(data)
    check_output(out, (1, 3))
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("payload", [b"\x00", b"\x11", b"\x0c\x0c"])
def test_png_gray16_invalid_sbit_ignored(payload: bytes) -> None:
    arr = np.array([[100, 200, 300]], np.uint16)
    out = decode_image(with_png_chunk(encode(".png", arr), b"sBIT", payload))
    np.testing.assert_allclose(out, [[0.0, 0.5, 1.0]], atol=1e-7)  # min-max, as without sBIT


def test_png_colour16_sbit_uses_the_colour_channels() -> None:
    bgr = np.array([[[0, 0, 4095], [4095, 4095, 4095]]], np.uint16)  # pure red, white
    out = decode_image(with_png_chunk(encode(".png", bgr), b"sBIT", bytes([12, 12, 12])))
    np.testing.assert_allclose(out, [[luma(1, 0, 0), 1.0]], atol=1e-6)


def test_png_twelve_bit_knee_keeps_its_grey_levels() -> None:
    """A knee stored with 12-bit values in a 16-bit PNG keeps the grey levels of the 8-bit original.

    Divided by 65535 it would have kept about a dozen of them once quantised to 8 bits. With sBIT,
    it decodes to the 8-bit original within the 12-bit rounding, and `prepare` gives the same image:
    at least 90 % of pixels identical, a mean difference under 0.1 grey level and none over 6 (a
    rounding flip before the uint8 step can move a pixel to a neighbouring bin of the equalisation,
    several levels away). Without sBIT it is min-max stretched like DICOM, which shifts the
    equalised output a little: mean difference under 1 grey level, none over 6.
    """
    original = knee()
    contract = InputContract()
    reference = prepare(decode_image(encode(".png", original)), contract).astype(int)
    png16 = encode(".png", knee12())
    levels = len(np.unique(original))
    assert len(np.unique(np.round(knee12() / 65535 * 255))) < levels / 10  # what dividing by 65535 did

    with_sbit = decode_image(with_png_chunk(png16, b"sBIT", bytes([12])))
    np.testing.assert_allclose(with_sbit, original / 255.0, atol=0.5 / 4095 + 1e-6)
    assert len(np.unique(np.round(with_sbit * 255))) == levels
    diff = np.abs(prepare(with_sbit, contract).astype(int) - reference)
    assert (diff == 0).mean() >= 0.9 and diff.mean() < 0.1 and diff.max() <= 6, (diff.mean(), diff.max())

    stretched = decode_image(png16)
    lo, hi = int(original.min()), int(original.max())
    np.testing.assert_allclose(stretched, (original - lo) / (hi - lo), atol=1e-3)
    assert len(np.unique(np.round(stretched * 255))) == levels
    diff = np.abs(prepare(stretched, contract).astype(int) - reference)
    assert diff.mean() < 1.0 and diff.max() <= 6, (diff.mean(), diff.max())


@pytest.mark.parametrize("kind", ["bgr8", "bgra8", "bgr16"])
def test_png_colour_to_gray(kind: str) -> None:
    bgr = np.array([[[0, 0, 255], [0, 255, 0], [255, 0, 0]], [[0, 0, 0], [255, 255, 255], [40, 120, 200]]], np.uint8)
    expected = np.array([[luma(*px[::-1] / 255.0) for px in row] for row in bgr.astype(np.float64)])
    if kind == "bgra8":
        alpha = np.array([[255, 0, 128], [10, 0, 255]], np.uint8)[..., None]
        img = np.concatenate([bgr, alpha], axis=2)  # alpha is dropped, not composited
    elif kind == "bgr16":
        img = bgr.astype(np.uint16) * 257
    else:
        img = bgr
    out = decode_image(encode(".png", img))
    check_output(out, (2, 3))
    np.testing.assert_allclose(out, expected, atol=2e-3)


@pytest.mark.parametrize("with_trns", [False, True])
def test_png_palette_to_gray(with_trns: bool) -> None:
    palette = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (10, 20, 30)]
    indices = np.array([[0, 1, 2], [3, 2, 0]], np.uint8)
    raw = b"".join(b"\x00" + row.tobytes() for row in indices)
    trns = bytes([255, 0, 128, 7]) if with_trns else None
    data = png_by_hand(3, 2, color_type=3, raw_rows=raw, plte=bytes(sum(palette, ())), trns=trns)
    out = decode_image(data)
    check_output(out, (2, 3))
    expected = np.array([[luma(*(c / 255.0 for c in palette[i])) for i in row] for row in indices])
    np.testing.assert_allclose(out, expected, atol=2e-3)


def test_jpeg_roughly_equal() -> None:
    yy, xx = np.mgrid[0:64, 0:64]
    arr = ((xx * 2 + yy) % 256).astype(np.uint8)
    out = decode_image(encode(".jpg", arr, [cv2.IMWRITE_JPEG_QUALITY, 95]))
    check_output(out, (64, 64))
    assert float(np.abs(out - arr / 255.0).mean()) < 0.02


def test_jpeg_colour_to_gray() -> None:
    bgr = np.zeros((16, 16, 3), np.uint8)
    bgr[:] = (40, 120, 200)
    out = decode_image(encode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 100]))
    check_output(out, (16, 16))
    np.testing.assert_allclose(out, luma(200 / 255, 120 / 255, 40 / 255), atol=0.02)


def jpeg_with_orientation(arr: np.ndarray, orientation: int | None) -> bytes:
    """A Pillow JPEG of ``arr`` with an EXIF block holding ``orientation`` (none if None)."""
    buf = io.BytesIO()
    options: dict[str, object] = {"quality": 95}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        options["exif"] = exif.tobytes()
    Image.fromarray(arr).save(buf, "JPEG", **options)
    return buf.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_exif_orientation_matches_pillow(orientation: int) -> None:
    rng = np.random.default_rng(orientation)
    stored = cv2.GaussianBlur(rng.integers(0, 256, size=(24, 40), dtype=np.uint8), (5, 5), 0)
    pixels = decode_image(jpeg_with_orientation(stored, None))  # the stored view, as decoded
    out = decode_image(jpeg_with_orientation(stored, orientation))
    reference = Image.fromarray(pixels)
    reference.getexif()[0x0112] = orientation
    np.testing.assert_array_equal(out, np.asarray(ImageOps.exif_transpose(reference)))


@pytest.mark.parametrize(("orientation", "corner"), [(6, (0, -1)), (8, (-1, 0)), (3, (-1, -1))])
def test_jpeg_exif_orientation_turns_a_sideways_film_upright(orientation: int, corner: tuple[int, int]) -> None:
    # A bright square stored at the top-left: orientation 6 (turn 90 degrees clockwise to view) puts
    # it at the top-right, 8 (counter-clockwise) at the bottom-left, 3 (180 degrees) at the bottom-right.
    stored = np.zeros((32, 48), np.uint8)
    stored[:8, :8] = 255
    out = decode_image(jpeg_with_orientation(stored, orientation))
    assert out.shape == ((48, 32) if orientation in (6, 8) else (32, 48))
    rows = slice(0, 8) if corner[0] == 0 else slice(-8, None)
    cols = slice(0, 8) if corner[1] == 0 else slice(-8, None)
    assert out[rows, cols].mean() > 0.9
    assert out.mean() < 0.1


def test_jpeg_broken_exif_is_ignored() -> None:
    arr = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))
    plain = encode(".jpg", arr, [cv2.IMWRITE_JPEG_QUALITY, 95])
    app1 = b"Exif\x00\x00" + b"II*\x00\xff\xff\xff\x7f" + bytes(10)  # IFD offset far past the end
    data = plain[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + plain[2:]
    np.testing.assert_array_equal(decode_image(data), decode_image(plain))


def test_jpeg_twelve_bit_refused_with_a_hint() -> None:
    data = bytearray(encode(".jpg", np.zeros((8, 8), np.uint8)))
    sof = data.find(b"\xff\xc0")
    data[sof + 4] = 12  # sample precision
    assert_decode_error(bytes(data), "12-bit samples", "16-bit PNG")


@pytest.mark.parametrize("ext", [".png", ".jpg"])
def test_one_by_one_raster(ext: str) -> None:
    out = decode_image(encode(ext, np.full((1, 1), 200, np.uint8)))
    check_output(out, (1, 1))
    assert abs(float(out[0, 0]) - 200 / 255) < 0.02


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview])
def test_bytes_like_inputs(wrap: type) -> None:
    arr = np.array([[0, 255]], np.uint8)
    out = decode_image(wrap(encode(".png", arr)))
    np.testing.assert_array_equal(out, [[0.0, 1.0]])


# --- DICOM ----------------------------------------------------------------------------------------


def test_dicom_monochrome2_min_max() -> None:
    arr = np.array([[100, 200], [300, 500]], np.uint16)
    out = decode_image(make_dicom(arr, RescaleSlope=2, RescaleIntercept=-1024))
    check_output(out, (2, 2))
    np.testing.assert_allclose(out, [[0.0, 0.25], [0.5, 1.0]], atol=1e-6)


def test_dicom_rescale_slope_is_applied() -> None:
    # A negative slope reverses the order of values, which min-max scaling cannot undo.
    arr = np.array([[100, 200], [300, 500]], np.uint16)
    out = decode_image(make_dicom(arr, RescaleSlope=-1, RescaleIntercept=0))
    np.testing.assert_allclose(out, [[1.0, 0.75], [0.5, 0.0]], atol=1e-6)


def test_dicom_signed_pixels() -> None:
    arr = np.array([[-1000, 0], [500, 1000]], np.int16)
    out = decode_image(make_dicom(arr))
    np.testing.assert_allclose(out, [[0.0, 0.5], [0.75, 1.0]], atol=1e-6)


def test_dicom_monochrome1_inverted() -> None:
    arr = np.array([[0, 50], [100, 200]], np.uint16)
    out = decode_image(make_dicom(arr, photometric="MONOCHROME1"))
    check_output(out, (2, 2))
    np.testing.assert_allclose(out, [[1.0, 0.75], [0.5, 0.0]], atol=1e-6)


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_dicom_constant_image_is_zeros(photometric: str) -> None:
    out = decode_image(make_dicom(np.full((3, 5), 777, np.uint16), photometric=photometric))
    check_output(out, (3, 5))
    assert not out.any()


def test_dicom_window_clips_outside() -> None:
    arr = np.linspace(0, 4095, 64).astype(np.uint16).reshape(1, 64)
    out = decode_image(make_dicom(arr, WindowCenter=2048, WindowWidth=1024))
    check_output(out, (1, 64))
    values = arr[0].astype(float)
    assert np.all(out[0, values <= 1536] == 0.0)
    assert np.all(out[0, values > 2560] == 1.0)
    inside = (values > 1600) & (values < 2500)
    assert inside.any()
    assert np.all((out[0, inside] > 0.0) & (out[0, inside] < 1.0))
    np.testing.assert_allclose(out[0, inside], (values[inside] - 1535.5) / 1023, atol=2e-3)


def test_dicom_window_is_in_rescaled_units() -> None:
    # Stored 0..2047, intercept -1024 -> -1024..1023; the window [-100, 100] is in those units.
    arr = np.array([[0, 900, 1024, 1200, 2047]], np.uint16)
    out = decode_image(make_dicom(arr, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=0, WindowWidth=200))
    np.testing.assert_allclose(out[0, [0, 1, 3, 4]], [0.0, 0.0, 1.0, 1.0])
    assert 0.4 < out[0, 2] < 0.6


def test_dicom_rgb_to_gray() -> None:
    rgb = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 255, 255]]], np.uint8)
    out = decode_image(make_dicom(rgb, photometric="RGB"))
    check_output(out, (2, 2))
    grays = np.array([[luma(1, 0, 0), luma(0, 1, 0)], [luma(0, 0, 1), 1.0]])
    expected = (grays - grays.min()) / (grays.max() - grays.min())
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_dicom_ybr_full_to_gray() -> None:
    rgb = np.array([[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [255, 255, 255]]], np.uint8)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    out = decode_image(make_dicom(ybr, photometric="YBR_FULL"))
    check_output(out, (2, 2))
    # YBR_FULL holds 8-bit rounded values: within 2 grey levels of the RGB original
    np.testing.assert_allclose(out, decode_image(make_dicom(rgb, photometric="RGB")), atol=2 / 255)


def test_dicom_ybr_full_422_from_jpeg_baseline(tmp_path: Path) -> None:
    # dcmcjpeg turns RGB into YBR_FULL_422 (4:2:2 chroma subsampling) for baseline JPEG.
    k = knee()
    rgb = np.stack([k, (k * 0.9).astype(np.uint8), (k * 0.8).astype(np.uint8)], axis=-1)
    source = make_dicom(rgb, photometric="RGB")
    data = dcmtk("dcmcjpeg", ["+eb"], source, tmp_path)
    header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    assert header.PhotometricInterpretation == "YBR_FULL_422"
    assert header.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    diff = np.abs(decode_image(data) - decode_image(source))
    assert diff.max() <= 0.1 and diff.mean() <= 0.015, (diff.max(), diff.mean())  # lossy JPEG at quality 90


def test_dicom_pixel_padding_value_excluded() -> None:
    # A collimator border stored as 0; the anatomy spans 1000..3000 and gets the whole [0, 1] range.
    arr = np.array([[0, 0, 0, 0], [0, 1000, 2000, 0], [0, 3000, 1500, 0]], np.uint16)
    out = decode_image(make_dicom(arr, PixelPaddingValue=0))
    check_output(out, (3, 4))
    expected = np.where(arr == 0, 0.0, (arr - 1000.0) / 2000.0)
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_dicom_pixel_padding_above_the_anatomy_is_dark() -> None:
    # Padding at the top of the range would otherwise be the brightest "bone" of the image.
    arr = np.array([[4095, 100, 300], [4095, 200, 4095]], np.uint16)
    out = decode_image(make_dicom(arr, PixelPaddingValue=4095))
    np.testing.assert_allclose(out, [[0.0, 0.0, 1.0], [0.0, 0.5, 0.0]], atol=1e-6)


def test_dicom_pixel_padding_range_limit() -> None:
    arr = np.array([[0, 20, 50, 51], [100, 151, 10, 60]], np.uint16)
    # padding is every stored value from PixelPaddingValue to PixelPaddingRangeLimit, either order
    for value, limit in [(0, 50), (50, 0)]:
        out = decode_image(make_dicom(arr, PixelPaddingValue=value, PixelPaddingRangeLimit=limit))
        expected = np.where(arr <= 50, 0.0, (arr - 51.0) / 100.0)
        np.testing.assert_allclose(out, expected, atol=1e-6)


def test_dicom_pixel_padding_signed_and_monochrome1() -> None:
    # Padding is compared in stored values, before rescale and inversion; it stays the darkest.
    arr = np.array([[-2000, 0], [100, -2000]], np.int16)
    out = decode_image(
        make_dicom(arr, photometric="MONOCHROME1", PixelPaddingValue=-2000, RescaleSlope=2, RescaleIntercept=5)
    )
    np.testing.assert_allclose(out, [[0.0, 1.0], [0.0, 0.0]], atol=1e-6)


def test_dicom_all_padding_is_zeros() -> None:
    out = decode_image(make_dicom(np.full((2, 3), 7, np.uint16), PixelPaddingValue=7))
    check_output(out, (2, 3))
    assert not out.any()


@pytest.mark.parametrize(
    ("photometric", "shape", "inverted"),
    [
        ("MONOCHROME2", "INVERSE", True),
        ("MONOCHROME2", "IDENTITY", False),
        ("MONOCHROME1", "INVERSE", True),  # INVERSE is what MONOCHROME1 means: inverted once
        ("MONOCHROME1", "IDENTITY", True),
    ],
)
def test_dicom_presentation_lut_shape(photometric: str, shape: str, inverted: bool) -> None:
    arr = np.array([[0, 50], [100, 200]], np.uint16)
    out = decode_image(make_dicom(arr, photometric=photometric, PresentationLUTShape=shape))
    plain = arr / 200.0
    np.testing.assert_allclose(out, 1.0 - plain if inverted else plain, atol=1e-6)


def test_dicom_without_file_meta() -> None:
    # A bare data set (no preamble, no group 0002, so no transfer syntax) as some senders stream it.
    arr = np.array([[0, 10], [20, 40]], np.uint16)
    ds = pydicom.dcmread(io.BytesIO(make_dicom(arr)))
    del ds.file_meta
    ds.preamble = None
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, implicit_vr=False, little_endian=True)
    data = buf.getvalue()
    assert data[:2] == b"\x08\x00"
    np.testing.assert_allclose(decode_image(data), [[0.0, 0.25], [0.5, 1.0]], atol=1e-6)


def test_dicom_one_by_one() -> None:
    out = decode_image(make_dicom(np.array([[1234]], np.uint16)))
    check_output(out, (1, 1))
    assert out[0, 0] == 0.0


def test_dicom_without_preamble() -> None:
    arr = np.array([[0, 10], [20, 40]], np.uint16)
    out = decode_image(make_dicom(arr, preamble=False))
    np.testing.assert_allclose(out, [[0.0, 0.25], [0.5, 1.0]], atol=1e-6)


def test_dicom_multi_frame_rejected() -> None:
    frames = np.zeros((2, 4, 4), np.uint16)
    assert_decode_error(make_dicom(frames, NumberOfFrames=2), "multi-frame", "2 frames")


def test_dicom_missing_pixel_data_rejected() -> None:
    assert_decode_error(make_dicom(None), "no pixel data")


@pytest.mark.parametrize("photometric", ["PALETTE COLOR", "YBR_PARTIAL_420"])
def test_dicom_unsupported_photometric_rejected(photometric: str) -> None:
    assert_decode_error(make_dicom(np.zeros((2, 2), np.uint8), photometric=photometric), "photometric", photometric)


def test_dicom_too_many_pixels_rejected() -> None:
    data = make_dicom(np.zeros((2, 2), np.uint16), rows=30000, columns=30000)
    assert_decode_error(data, "too many pixels", "30000x30000")


def test_dicom_pixel_data_too_short_rejected() -> None:
    assert_decode_error(make_dicom(np.zeros((2, 2), np.uint16), rows=100, columns=100), "DICOM")


def test_dicom_zero_rows_rejected() -> None:
    assert_decode_error(make_dicom(np.zeros((2, 2), np.uint16), rows=0), "zero-sized")


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("data", [b"", bytearray(), memoryview(b""), None])
def test_empty_input(data: object) -> None:
    assert_decode_error(data, "empty")


def test_not_bytes_is_type_error() -> None:
    with pytest.raises(TypeError):
        decode_image("not bytes")  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes(seed: int) -> None:
    data = np.random.default_rng(seed).integers(0, 256, size=10 + 500 * seed, dtype=np.uint8).tobytes()
    assert_decode_error(data, "not an image", f"{len(data)} bytes")


def test_zip_rejected_as_not_an_image() -> None:
    assert_decode_error(b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + bytes(100), "not an image")


def test_other_image_formats_rejected() -> None:
    bmp = encode(".bmp", np.zeros((4, 4), np.uint8))
    assert_decode_error(bmp, "not an image")


@pytest.mark.parametrize("keep", [8, 20, 40, 0.5, 0.9])
def test_truncated_png(keep: float) -> None:
    rng = np.random.default_rng(0)
    data = encode(".png", rng.integers(0, 256, size=(32, 32), dtype=np.uint8))
    cut = data[: keep if isinstance(keep, int) else int(len(data) * keep)]
    assert_decode_error(cut, "truncated or corrupt PNG")


@pytest.mark.parametrize("keep", [0.3, 0.6, -2, -1])
def test_truncated_jpeg(keep: float) -> None:
    rng = np.random.default_rng(0)
    data = encode(".jpg", rng.integers(0, 256, size=(64, 64), dtype=np.uint8))
    cut = data[:keep] if isinstance(keep, int) else data[: int(len(data) * keep)]
    assert_decode_error(cut, "truncated or corrupt JPEG")


def test_jpeg_header_only_rejected() -> None:
    assert_decode_error(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "truncated or corrupt JPEG")


def test_png_bomb_rejected_before_decode() -> None:
    raw = b"\x00" + bytes(10)  # far too little for 20000 rows; never decompressed
    data = png_by_hand(20000, 20000, color_type=0, raw_rows=raw)
    assert len(data) < 200
    start = time.perf_counter()
    assert_decode_error(data, "too many pixels", "20000x20000", "PNG")
    assert time.perf_counter() - start < 0.1


def test_jpeg_bomb_rejected_from_sof() -> None:
    data = bytearray(encode(".jpg", np.zeros((8, 8), np.uint8)))
    sof = data.find(b"\xff\xc0")
    assert sof > 0
    data[sof + 5 : sof + 9] = struct.pack(">HH", 60000, 60000)
    assert_decode_error(bytes(data), "too many pixels", "60000x60000", "JPEG")


def test_max_pixels_argument() -> None:
    data = encode(".png", np.zeros((10, 10), np.uint8))
    assert decode_image(data, max_pixels=100).shape == (10, 10)
    assert_decode_error(data, "too many pixels", "10x10", max_pixels=99)


def test_png_zero_width_rejected() -> None:
    assert_decode_error(png_by_hand(0, 1, color_type=0, raw_rows=b"\x00"), "zero-sized")


def test_png_bad_crc_rejected() -> None:
    data = bytearray(encode(".png", np.zeros((4, 4), np.uint8)))
    data[29] ^= 0xFF  # inside the IHDR CRC
    assert_decode_error(bytes(data), "PNG")


def test_library_exceptions_are_wrapped(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(".png", np.zeros((4, 4), np.uint8))

    def boom(*_args: object) -> None:
        raise cv2.error("simulated OpenCV failure")

    monkeypatch.setattr(cv2, "imdecode", boom)
    error = assert_decode_error(data, "could not decode PNG", "simulated OpenCV failure")
    assert isinstance(error.__cause__, cv2.error)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("fmt", ["png", "jpeg", "dicom"])
def test_corrupted_bytes_never_raise_anything_else(fmt: str) -> None:
    rng = np.random.default_rng(42)
    arr = rng.integers(0, 256, size=(16, 16), dtype=np.uint8)
    if fmt == "png":
        good = encode(".png", arr)
    elif fmt == "jpeg":
        good = encode(".jpg", arr)
    else:
        good = make_dicom(arr.astype(np.uint16))
    for _ in range(60):
        data = bytearray(good)
        for pos in rng.integers(0, len(data), size=int(rng.integers(1, 6))):
            data[pos] = int(rng.integers(0, 256))
        if rng.random() < 0.3:
            data = data[: int(rng.integers(1, len(data)))]
        try:
            out = decode_image(bytes(data))
        except DecodeError as exc:
            assert ACCEPTED in str(exc)
        else:
            assert out.ndim == 2 and out.dtype == np.float32
            assert np.all((out >= 0.0) & (out <= 1.0))


# --- DICOM transfer syntaxes ----------------------------------------------------------------------
#
# Each case re-encodes the fixture knee and checks that it decodes to what the uncompressed file
# decodes to. Lossless: identical. Lossy, as a maximum and a mean absolute difference on the
# [0, 1] output: JPEG baseline at dcmtk's default quality 90, 8-bit: 0.1 and 0.015 (the JPEG
# quantisation of a textured 8-bit image); JPEG extended 12-bit at quality 90 and JPEG 2000 at a
# PSNR of 60 dB: 0.01 and 0.002; JPEG-LS near-lossless with a maximum deviation of 2 stored
# values: 3 * 2 / the stored range (2 per pixel, and 2 on each end of the min-max range).

NEAR = 2


def knee_dicom(bits: int) -> bytes:
    if bits == 8:
        return make_dicom(knee())
    return make_dicom(knee12(), BitsStored=12, HighBit=11)


def pydicom_encoded(uid: str, **kwargs: object):  # noqa: ANN201 - a builder for the table below
    return lambda data, _tmp: compress(data, uid, **kwargs)


def dcmtk_encoded(tool: str, *options: str):  # noqa: ANN201
    return lambda data, tmp: dcmtk(tool, list(options), data, tmp)


def uncompressed(uid: str):  # noqa: ANN201
    def build(data: bytes, _tmp: Path) -> bytes:
        ds = pydicom.dcmread(io.BytesIO(data))
        if uid == ExplicitVRBigEndian:  # the writer swaps the header's bytes, not the pixels'
            ds.PixelData = ds.pixel_array.astype(">u2").tobytes()
        ds.file_meta.TransferSyntaxUID = uid
        buf = io.BytesIO()
        pydicom.dcmwrite(
            buf,
            ds,
            implicit_vr=uid == ImplicitVRLittleEndian,
            little_endian=uid != ExplicitVRBigEndian,
            enforce_file_format=True,
        )
        return buf.getvalue()

    return build


TRANSFER_SYNTAXES = {
    # uid: (source bits, encoder, tolerance: None for lossless, else (max, mean) absolute difference)
    ImplicitVRLittleEndian: (12, uncompressed(ImplicitVRLittleEndian), None),
    DeflatedExplicitVRLittleEndian: (12, uncompressed(DeflatedExplicitVRLittleEndian), None),
    ExplicitVRBigEndian: (12, uncompressed(ExplicitVRBigEndian), None),
    RLELossless: (12, pydicom_encoded(RLELossless), None),
    "1.2.840.10008.1.2.4.50": (8, dcmtk_encoded("dcmcjpeg", "+eb"), (0.1, 0.015)),
    "1.2.840.10008.1.2.4.51": (12, dcmtk_encoded("dcmcjpeg", "+ee"), (0.01, 0.002)),
    "1.2.840.10008.1.2.4.57": (12, dcmtk_encoded("dcmcjpeg", "+el"), None),
    "1.2.840.10008.1.2.4.70": (12, dcmtk_encoded("dcmcjpeg", "+e1"), None),
    "1.2.840.10008.1.2.4.80": (12, dcmtk_encoded("dcmcjpls", "+el"), None),
    "1.2.840.10008.1.2.4.81": (12, dcmtk_encoded("dcmcjpls", "+en", "+md", str(NEAR)), "near"),
    JPEG2000Lossless: (12, pydicom_encoded(JPEG2000Lossless), None),
    JPEG2000: (12, pydicom_encoded(JPEG2000, j2k_psnr=[60]), (0.01, 0.002)),
}


@pytest.mark.parametrize("uid", list(TRANSFER_SYNTAXES), ids=lambda uid: pydicom.uid.UID(uid).name)
def test_dicom_transfer_syntax_decodes_like_uncompressed(uid: str, tmp_path: Path) -> None:
    bits, encoder, tolerance = TRANSFER_SYNTAXES[uid]
    source = knee_dicom(bits)
    data = encoder(source, tmp_path)
    assert transfer_syntax(data) == uid  # the encoder really produced this syntax
    out, reference = decode_image(data), decode_image(source)
    check_output(out, reference.shape)
    if tolerance is None:
        np.testing.assert_array_equal(out, reference)
        return
    if tolerance == "near":
        stored = knee12()
        tolerance = (3 * NEAR / (int(stored.max()) - int(stored.min())),) * 2
    diff = np.abs(out - reference)
    assert diff.max() <= tolerance[0] and diff.mean() <= tolerance[1], (diff.max(), diff.mean())


@pytest.mark.parametrize(
    ("uid", "name"),
    [
        ("1.2.840.10008.1.2.4.100", "MPEG2 Main Profile / Main Level"),
        ("1.2.840.10008.1.2.4.201", "High-Throughput JPEG 2000 Image Compression (Lossless Only)"),
        ("1.2.3.4.5.6.7", "unknown transfer syntax"),
    ],
)
def test_dicom_unsupported_transfer_syntax(uid: str, name: str) -> None:
    data = with_transfer_syntax(make_dicom(np.zeros((4, 4), np.uint16)), uid)
    error = assert_decode_error(data, uid, name, "not supported", "JPEG-LS Lossless", "RLE Lossless")
    assert isinstance(error, UnsupportedTransferSyntax)
    assert (error.status, error.kind, error.uid, error.name) == (415, "unsupported_transfer_syntax", uid, name)


def test_decode_error_carries_its_http_answer() -> None:
    error = assert_decode_error(b"GIF89a", "not an image")
    assert (error.status, error.kind) == (400, "invalid_image")
    assert issubclass(UnsupportedTransferSyntax, DecodeError)


def test_dicom_missing_decoder_is_unsupported(monkeypatch: pytest.MonkeyPatch) -> None:
    import pydicom.pixels

    class Missing:
        is_available = False
        missing_dependencies = ["pylibjpeg-rle - not installed"]

    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda uid: Missing())
    data = compress(knee_dicom(12), RLELossless)
    error = assert_decode_error(data, RLELossless, "RLE Lossless", "not installed")
    assert isinstance(error, UnsupportedTransferSyntax)


def test_library_error_messages_are_never_cut_mid_sentence(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(".png", np.zeros((4, 4), np.uint8))
    sentences = [f"Sentence number {i} explains one more thing about the failure." for i in range(20)]

    def boom(*_args: object) -> None:
        raise cv2.error(" ".join(sentences))

    monkeypatch.setattr(cv2, "imdecode", boom)
    message = str(assert_decode_error(data, sentences[0], "rest in the server log"))
    quoted = message.split("(error: ", 1)[1].split(" [rest in the server log]")[0]
    assert quoted in [" ".join(sentences[:n]) for n in range(1, len(sentences))], quoted  # whole sentences

    long_sentence = "x" * 900

    def boom_once(*_args: object) -> None:
        raise cv2.error(long_sentence)

    monkeypatch.setattr(cv2, "imdecode", boom_once)
    assert_decode_error(data, long_sentence)  # one sentence: quoted whole


# --- BodyPartExamined: a DICOM of another body part is refused before decoding (knee_only) -------------------


@pytest.mark.parametrize("part", ["CHEST", "HAND", "hip", "SHOULDER"])
def test_knee_only_refuses_another_body_part(part: str) -> None:
    from model.decode import NotAKneeHeader

    data = make_dicom(np.arange(64, dtype=np.uint16).reshape(8, 8), BodyPartExamined=part)
    with pytest.raises(NotAKneeHeader, match=f"BodyPartExamined {part.upper()}") as info:
        decode_image(data, knee_only=True)
    assert info.value.status == 422 and info.value.kind == "not_a_knee"
    assert decode_image(data).shape == (8, 8)  # without knee_only (training data, tools) it still decodes


@pytest.mark.parametrize("part", ["KNEE", "knee", "LEG", "LOWER LIMB", "", None])
def test_knee_only_lets_knees_and_unnamed_parts_through(part: str | None) -> None:
    attrs = {} if part is None else {"BodyPartExamined": part}
    data = make_dicom(np.arange(64, dtype=np.uint16).reshape(8, 8), **attrs)
    assert decode_image(data, knee_only=True).shape == (8, 8)
