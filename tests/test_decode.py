"""Tests of model.decode: every accepted format decodes to gray float32 in [0, 1]; all else is a DecodeError.

All test images are built in memory (OpenCV for PNG/JPEG, hand-written chunks for palette and
bomb PNGs, pydicom for DICOM), so the tests need no fixture files.
"""

from __future__ import annotations

import struct
import time

import cv2
import numpy as np
import pytest

from model.decode import ACCEPTED, DecodeError, decode_image, sniff_format
from tests.imagebytes import encode, make_dicom, png_by_hand

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


def test_png_gray16_scaled_by_65535() -> None:
    arr = np.array([[0, 1, 256, 1000], [32768, 40000, 65534, 65535]], np.uint16)
    out = decode_image(encode(".png", arr))
    check_output(out, (2, 4))
    np.testing.assert_allclose(out, arr / 65535.0, rtol=0, atol=1e-7)


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


@pytest.mark.parametrize("photometric", ["YBR_FULL", "PALETTE COLOR"])
def test_dicom_unsupported_photometric_rejected(photometric: str) -> None:
    arr = np.zeros((2, 2, 3), np.uint8) if photometric == "YBR_FULL" else np.zeros((2, 2), np.uint8)
    assert_decode_error(make_dicom(arr, photometric=photometric), "photometric", photometric)


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
