"""Bounded fuzzing of the request path's decoding and preprocessing (hypothesis).

Whatever bytes arrive, `decode_image` either returns a 2-D float32 image in [0, 1] or raises
`DecodeError`; never another exception, never a hang. Whatever it returns, `preprocess` turns
into a finite model input of the contract's shape.
"""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.contract import InputContract
from model.decode import DecodeError, decode_image
from model.preprocess import preprocess
from tests.imagebytes import encode, make_dicom

CONTRACT = InputContract(input_size=32)
SEEDS = {
    "png": encode(".png", (np.arange(24 * 20) % 251).astype(np.uint8).reshape(24, 20)),
    "png16": encode(".png", (np.arange(12 * 9) * 601 % 65535).astype(np.uint16).reshape(12, 9)),
    "jpeg": encode(".jpg", (np.arange(16 * 16) % 256).astype(np.uint8).reshape(16, 16)),
    "dicom": make_dicom((np.arange(8 * 6) * 97 % 4096).astype(np.uint16).reshape(8, 6)),
}
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def check(data: bytes) -> None:
    try:
        image = decode_image(data, max_pixels=4_000_000)
    except DecodeError as exc:
        assert str(exc), "a DecodeError must say what went wrong"
        return
    assert image.ndim == 2 and image.dtype == np.float32
    assert np.isfinite(image).all() and image.min() >= 0 and image.max() <= 1
    x = preprocess(image, CONTRACT)
    assert x.shape == (1, 32, 32) and np.isfinite(x).all()


@FUZZ
@given(st.binary(max_size=2048))
def test_arbitrary_bytes(data: bytes) -> None:
    check(data)


@FUZZ
@given(
    st.sampled_from(sorted(SEEDS)),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8),
    st.integers(0, 10**6),
)
def test_mutated_valid_images(kind: str, flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(SEEDS[kind])
    for pos, value in flips:
        data[pos % len(data)] = value
    check(bytes(data[: max(1, len(data) - cut % len(data))]))


@FUZZ
@given(st.sampled_from(sorted(SEEDS)), st.binary(min_size=1, max_size=64))
def test_valid_prefix_with_garbage_tail(kind: str, tail: bytes) -> None:
    check(SEEDS[kind][: len(SEEDS[kind]) // 2] + tail)
