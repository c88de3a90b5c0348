"""Tests of model.preprocess on small hand-checkable arrays, plus a golden test on a real knee.

The golden fixture (tests/fixtures/knee_kl2_prepared.png) is `prepare` of knee_kl2.png under the
default contract; see tests/fixtures/README.md for where the knee comes from and when the
golden file may be regenerated (tests/fixtures/make_golden.py).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from model.contract import InputContract, PreprocessConfig
from model.decode import decode_image
from model.preprocess import (
    as_float_image,
    equalize,
    fit_to_square,
    gaussian_denoise,
    laplacian_enhance,
    normalize,
    pad_to_square,
    prepare,
    preprocess,
    to_model_input,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
KNEE = FIXTURES / "knee_kl2.png"
GOLDEN = FIXTURES / "knee_kl2_prepared.png"


@pytest.fixture(scope="module")
def knee() -> np.ndarray:
    """The real 224 x 224 KL2 knee, decoded to float32 [0, 1] as serving does."""
    return decode_image(KNEE.read_bytes())


@pytest.fixture(scope="module")
def golden() -> np.ndarray:
    image = cv2.imread(str(GOLDEN), cv2.IMREAD_UNCHANGED)
    assert image is not None, f"cannot read {GOLDEN}"
    return image


def cfg(**changes: object) -> PreprocessConfig:
    return PreprocessConfig(**changes)  # type: ignore[arg-type]


# --- as_float_image --------------------------------------------------------------------------------


def test_as_float_image_uint8() -> None:
    out = as_float_image(np.array([[0, 51, 255]], dtype=np.uint8))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.0, 0.2, 1.0]], atol=1e-7)


def test_as_float_image_uint16() -> None:
    out = as_float_image(np.array([[0, 257, 65535]], dtype=np.uint16))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.0, 1 / 255, 1.0]], atol=1e-7)


def test_as_float_image_float_in_range() -> None:
    x = np.array([[0.0, 0.25], [0.5, 1.0]], dtype=np.float64)
    out = as_float_image(x)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, x.astype(np.float32))


@pytest.mark.parametrize(
    ("image", "match"),
    [
        (np.array([[0.0, 1.5]], dtype=np.float32), r"\[0, 1\]"),
        (np.array([[-0.1, 0.5]], dtype=np.float32), r"\[0, 1\]"),
        (np.array([[np.nan, 0.5]], dtype=np.float32), "NaN"),
        (np.array([[np.inf, 0.5]], dtype=np.float32), "infinite"),
        (np.zeros((4, 4, 3), dtype=np.uint8), "2-D"),
        (np.zeros((4,), dtype=np.uint8), "2-D"),
        (np.zeros((0, 4), dtype=np.uint8), "non-empty"),
        (np.zeros((2, 2), dtype=np.int32), "int32"),
        (np.zeros((2, 2), dtype=bool), "bool"),
    ],
)
def test_as_float_image_rejects(image: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        as_float_image(image)


def test_as_float_image_rejects_non_array() -> None:
    with pytest.raises(TypeError, match="numpy array"):
        as_float_image([[0.0, 1.0]])  # type: ignore[arg-type]


# --- fit_to_square ---------------------------------------------------------------------------------


def test_fit_letterbox_keeps_aspect() -> None:
    out = fit_to_square(np.full((100, 50), 0.5, np.float32), 20, "letterbox")
    assert out.shape == (20, 10) and out.dtype == np.float32
    np.testing.assert_allclose(out, 0.5, atol=1e-6)
    assert fit_to_square(np.full((50, 100), 0.5, np.float32), 20, "letterbox").shape == (10, 20)


def test_fit_resize_is_square() -> None:
    out = fit_to_square(np.full((100, 50), 0.25, np.float32), 20, "resize")
    assert out.shape == (20, 20) and out.dtype == np.float32
    np.testing.assert_allclose(out, 0.25, atol=1e-6)


def test_fit_center_crop_keeps_the_centre() -> None:
    # 50 x 100: scaled by 20/50 to 20 x 40, then columns 10..29 are kept. Those are the
    # original columns 25..74, which are bright; the outer quarters are dark.
    image = np.full((50, 100), 0.2, np.float32)
    image[:, 25:75] = 0.8
    out = fit_to_square(image, 20, "center_crop")
    assert out.shape == (20, 20)
    np.testing.assert_allclose(out, 0.8, atol=1e-5)
    # and the same along the other axis
    out_t = fit_to_square(np.ascontiguousarray(image.T), 20, "center_crop")
    np.testing.assert_allclose(out_t, 0.8, atol=1e-5)


def test_fit_center_crop_of_off_centre_feature() -> None:
    image = np.full((50, 100), 0.2, np.float32)
    image[:, :25] = 0.8  # only the left quarter is bright: cropped away
    out = fit_to_square(image, 20, "center_crop")
    np.testing.assert_allclose(out, 0.2, atol=1e-5)


@pytest.mark.parametrize("fit", ["letterbox", "resize", "center_crop"])
def test_fit_same_size_square_is_unchanged(fit: str) -> None:
    rng = np.random.default_rng(0)
    image = rng.random((24, 24), dtype=np.float32)
    out = fit_to_square(image, 24, fit)
    np.testing.assert_array_equal(out, image)


def test_fit_224_letterbox_does_not_resize() -> None:
    rng = np.random.default_rng(1)
    image = rng.random((224, 224), dtype=np.float32)
    out = fit_to_square(image, 224, "letterbox")
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, image)


def test_fit_unknown_raises() -> None:
    with pytest.raises(ValueError, match="unknown fit 'stretch'"):
        fit_to_square(np.zeros((4, 4), np.float32), 4, "stretch")


# --- gaussian_denoise ------------------------------------------------------------------------------


def test_gaussian_ksize_1_is_identity() -> None:
    image = np.random.default_rng(2).random((9, 7), dtype=np.float32)
    np.testing.assert_array_equal(gaussian_denoise(image, 1, 5.0), image)


@pytest.mark.parametrize(("ksize", "sigma"), [(3, 0.8), (5, 2.0), (7, 0.0)])
def test_gaussian_constant_stays_constant(ksize: int, sigma: float) -> None:
    image = np.full((12, 10), 0.37, np.float32)
    out = gaussian_denoise(image, ksize, sigma)
    assert out.shape == image.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, 0.37, atol=1e-6)


def test_gaussian_spreads_a_point_but_keeps_its_mass() -> None:
    image = np.zeros((11, 11), np.float32)
    image[5, 5] = 1.0
    out = gaussian_denoise(image, 5, 1.0)
    assert out.sum() == pytest.approx(1.0, abs=1e-5)
    assert 0.0 < out[5, 5] < 1.0
    assert out[5, 4] > 0 and out[4, 5] > 0 and out[7, 5] > 0
    assert out[5, 5] == out.max()
    np.testing.assert_allclose(out, out.T, atol=1e-7)  # isotropic
    assert out[0, 0] == 0.0 and out[5, 8] == 0.0  # outside the 5 x 5 support


# --- laplacian_enhance -----------------------------------------------------------------------------


@pytest.mark.parametrize("ksize", [1, 3, 5])
def test_laplacian_constant_unchanged(ksize: int) -> None:
    image = np.full((9, 9), 0.42, np.float32)
    np.testing.assert_allclose(laplacian_enhance(image, ksize, 0.5), 0.42, atol=1e-5)


def test_laplacian_weight_0_is_identity() -> None:
    image = np.random.default_rng(3).random((9, 9), dtype=np.float32)
    np.testing.assert_array_equal(laplacian_enhance(image, 3, 0.0), image)


def test_laplacian_step_edge_overshoots_on_both_sides() -> None:
    # Columns 0..3 at 0.3, 4..7 at 0.7. OpenCV's ksize=3 kernel is [[2,0,2],[0,-8,0],[2,0,2]],
    # so the Laplacian is +1.6 on column 3 and -1.6 on column 4, zero elsewhere; with weight
    # 0.1 the edge becomes 0.3 - 0.16 = 0.14 | 0.7 + 0.16 = 0.86 (no clipping).
    image = np.full((6, 8), 0.3, np.float32)
    image[:, 4:] = 0.7
    out = laplacian_enhance(image, 3, 0.1)
    expected_row = np.array([0.3, 0.3, 0.3, 0.14, 0.86, 0.7, 0.7, 0.7], np.float32)
    np.testing.assert_allclose(out, np.tile(expected_row, (6, 1)), atol=1e-5)
    assert out[:, 3].max() < 0.3 and out[:, 4].min() > 0.7


def test_laplacian_step_edge_4_neighbour_kernel() -> None:
    # ksize=1 is the 4-neighbour kernel [[0,1,0],[1,-4,1],[0,1,0]]: Laplacian +-0.4 at the edge.
    image = np.full((5, 6), 0.3, np.float32)
    image[:, 3:] = 0.7
    out = laplacian_enhance(image, 1, 0.5)
    expected_row = np.array([0.3, 0.3, 0.1, 0.9, 0.7, 0.7], np.float32)
    np.testing.assert_allclose(out, np.tile(expected_row, (5, 1)), atol=1e-5)


def test_contract_default_is_the_4_neighbour_laplacian_added_back() -> None:
    # The paper's kernel, read off the impulse response of the contract's own setting:
    # out = img - weight * lap(img) with lap = [[0,1,0],[1,-4,1],[0,1,0]] and weight 1.
    cfg = InputContract().preprocess
    image = np.full((5, 5), 0.5, np.float32)
    image[2, 2] = 0.6
    out = laplacian_enhance(image, cfg.laplacian_ksize, cfg.laplacian_weight)
    expected = np.full((5, 5), 0.5, np.float32)
    expected[2, 2] = 0.6 + 4 * 0.1  # centre: -(-4 x 0.1)
    expected[1, 2] = expected[3, 2] = expected[2, 1] = expected[2, 3] = 0.5 - 0.1  # edge neighbours
    np.testing.assert_allclose(out, expected, atol=1e-6)  # diagonal neighbours untouched


def test_laplacian_output_is_clipped_to_unit_range() -> None:
    image = np.random.default_rng(4).random((16, 16), dtype=np.float32)
    out = laplacian_enhance(image, 3, 2.0)
    assert out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert out.min() == 0.0 and out.max() == 1.0  # strong sharpening of noise saturates


# --- equalize --------------------------------------------------------------------------------------


def test_equalize_global_two_levels() -> None:
    # cv2.equalizeHist maps the lowest occupied level to 0 and the highest to 255.
    image = np.full((4, 4), 0.2, np.float32)
    image[:, 1:] = 0.6
    out = equalize(image, cfg(equalization="global"))
    assert out.dtype == np.uint8 and out.shape == (4, 4)
    expected = np.full((4, 4), 255, np.uint8)
    expected[:, 0] = 0
    np.testing.assert_array_equal(out, expected)


def test_equalize_global_three_levels_by_hand() -> None:
    # 4 pixels at 50, 4 at 100, 8 at 200 (of 16). equalizeHist: lut[lowest] = 0, then
    # lut[v] = round(count(lowest < level <= v) * 255 / (16 - 4)): 100 -> 4 * 255 / 12 = 85,
    # 200 -> 12 * 255 / 12 = 255.
    u8 = np.array([[50] * 4, [100] * 4, [200] * 4, [200] * 4], np.uint8)
    out = equalize(u8.astype(np.float32) / 255.0, cfg(equalization="global"))
    expected = np.array([[0] * 4, [85] * 4, [255] * 4, [255] * 4], np.uint8)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(out, cv2.equalizeHist(u8))


def test_equalize_global_constant_image_is_unchanged() -> None:
    out = equalize(np.full((5, 5), 0.4, np.float32), cfg(equalization="global"))
    np.testing.assert_array_equal(out, np.full((5, 5), 102, np.uint8))


def test_equalize_none_quantises_with_np_round() -> None:
    # 0.5 * 255 = 127.5 rounds half to even: 128. 0.2 * 255 = 51.
    image = np.array([[0.0, 0.5, 1.0, 0.2]], np.float32)
    out = equalize(image, cfg(equalization="none"))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[0, 128, 255, 51]])


def test_equalize_none_round_trips_uint8() -> None:
    u8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
    out = equalize(as_float_image(u8), cfg(equalization="none"))
    np.testing.assert_array_equal(out, u8)


def test_equalize_clahe_shape_and_dtype() -> None:
    image = np.random.default_rng(5).random((40, 30), dtype=np.float32) * 0.3 + 0.2
    out = equalize(image, cfg(equalization="clahe", clahe_clip_limit=2.0, clahe_tile_grid=4))
    assert out.dtype == np.uint8 and out.shape == (40, 30)
    assert np.ptp(out) > np.ptp(np.round(image * 255))  # stretches the narrow range


# --- pad_to_square ---------------------------------------------------------------------------------


def test_pad_to_square_centres_a_wide_image() -> None:
    image = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.uint8)
    out = pad_to_square(image, 4, 9)
    expected = np.array(
        [
            [9, 9, 9, 9],
            [1, 2, 3, 4],
            [5, 6, 7, 8],
            [9, 9, 9, 9],
        ],
        np.uint8,
    )
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


def test_pad_to_square_odd_margin_and_tall_image() -> None:
    image = np.array([[1], [2], [3]], np.uint8)  # 3 x 1 into 4 x 4: top 0, left 1
    expected = np.array(
        [
            [0, 1, 0, 0],
            [0, 2, 0, 0],
            [0, 3, 0, 0],
            [0, 0, 0, 0],
        ],
        np.uint8,
    )
    np.testing.assert_array_equal(pad_to_square(image, 4, 0), expected)


def test_pad_to_square_same_size_unchanged() -> None:
    image = np.arange(16, dtype=np.uint8).reshape(4, 4)
    np.testing.assert_array_equal(pad_to_square(image, 4, 200), image)


@pytest.mark.parametrize("shape", [(5, 4), (4, 5), (6, 6)])
def test_pad_to_square_too_big_raises(shape: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="does not fit in 4x4"):
        pad_to_square(np.zeros(shape, np.uint8), 4, 0)


# --- normalize / to_model_input --------------------------------------------------------------------


def test_normalize_values_and_shape() -> None:
    contract = InputContract(input_size=16)
    image = np.zeros((16, 16), np.uint8)
    image[0, 0] = 255
    image[0, 1] = 128
    out = normalize(image, contract)
    assert out.shape == (1, 16, 16) and out.dtype == np.float32
    assert out[0, 0, 0] == pytest.approx(2.0)  # (1 - 0.5) / 0.25
    assert out[0, 1, 1] == pytest.approx(-2.0)  # (0 - 0.5) / 0.25
    assert out[0, 0, 1] == pytest.approx((128 / 255 - 0.5) / 0.25, abs=1e-6)
    assert out.flags.c_contiguous and out.flags.writeable  # ready for torch.from_numpy


def test_to_model_input_three_channels_repeat_the_gray() -> None:
    contract = InputContract(input_size=16, channels=3, mean=(0.0, 0.5, 1.0), std=(1.0, 0.5, 0.25))
    image = np.random.default_rng(6).integers(0, 256, (16, 16), dtype=np.uint8)
    out = to_model_input(image, contract)
    assert out.shape == (3, 16, 16) and out.dtype == np.float32
    x = image.astype(np.float32) / 255.0
    for c, (m, s) in enumerate(zip(contract.mean, contract.std, strict=True)):
        np.testing.assert_allclose(out[c], (x - m) / s, atol=1e-5)
    full = np.full((16, 16), 255, np.uint8)
    np.testing.assert_allclose(to_model_input(full, contract)[:, 0, 0], [1.0, 1.0, 0.0], atol=1e-6)


@pytest.mark.parametrize(
    "image",
    [
        np.zeros((15, 16), np.uint8),
        np.zeros((16, 16, 1), np.uint8),
        np.zeros((32, 32), np.uint8),
    ],
)
def test_to_model_input_wrong_shape_raises(image: np.ndarray) -> None:
    with pytest.raises(ValueError, match="16x16"):
        to_model_input(image, InputContract(input_size=16))


@pytest.mark.parametrize(
    "image",
    [np.zeros((16, 16), np.float32), np.zeros((16, 16, 3), np.uint8), np.zeros((16, 16), np.uint16)],
)
def test_normalize_wrong_input_raises(image: np.ndarray) -> None:
    with pytest.raises(ValueError, match="2-D uint8"):
        normalize(image, InputContract(input_size=16))


# --- prepare / preprocess --------------------------------------------------------------------------


def test_prepare_non_square_letterboxes_with_pad_value() -> None:
    rng = np.random.default_rng(7)
    image = rng.random((300, 150), dtype=np.float32)
    contract = InputContract().replace(preprocess={"pad_value": 17})
    out = prepare(image, contract)
    assert out.shape == (224, 224) and out.dtype == np.uint8
    # 300 x 150 -> 224 x 112, centred: columns 0..55 and 168..223 are padding
    assert np.all(out[:, :56] == 17) and np.all(out[:, 168:] == 17)
    content = out[:, 56:168]
    assert not np.all(content[:, 0] == 17) and not np.all(content[:, -1] == 17)
    # equalisation sees only the content, so the content alone spans the full range
    assert content.min() == 0 and content.max() == 255


def test_prepare_tall_on_wide_pads_rows() -> None:
    image = np.random.default_rng(8).random((150, 300), dtype=np.float32)
    out = prepare(image, InputContract().replace(preprocess={"pad_value": 255, "equalization": "none"}))
    assert out.shape == (224, 224)
    assert np.all(out[:56] == 255) and np.all(out[168:] == 255)


def test_prepare_accepts_uint8_uint16_and_float_alike(knee: np.ndarray) -> None:
    u8 = np.round(knee * 255).astype(np.uint8)
    contract = InputContract()
    ref = prepare(knee, contract)
    np.testing.assert_array_equal(prepare(u8, contract), ref)
    diff = np.abs(prepare(u8.astype(np.uint16) * 257, contract).astype(int) - ref)
    assert diff.max() <= 1


def test_preprocess_is_prepare_then_to_model_input() -> None:
    image = np.random.default_rng(9).random((80, 60), dtype=np.float32)
    contract = InputContract(input_size=32)
    out = preprocess(image, contract)
    assert out.shape == (1, 32, 32) and out.dtype == np.float32
    np.testing.assert_array_equal(out, to_model_input(prepare(image, contract), contract))


def test_preprocess_three_channel_contract() -> None:
    image = np.random.default_rng(10).random((40, 40), dtype=np.float32)
    contract = InputContract(input_size=32, channels=3, mean=(0.5,) * 3, std=(0.25,) * 3)
    out = preprocess(image, contract)
    assert out.shape == (3, 32, 32)
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_array_equal(out[0], out[2])


@pytest.mark.parametrize(
    ("base", "change"),
    [
        ({}, {"laplacian_weight": 0.0}),
        ({}, {"laplacian_weight": 1.5}),
        ({}, {"laplacian_ksize": 3}),
        ({}, {"gaussian_sigma": 2.0}),
        ({}, {"gaussian_ksize": 5}),
        ({}, {"gaussian_ksize": 1}),
        ({}, {"equalization": "none"}),
        ({}, {"equalization": "clahe"}),
        ({"equalization": "clahe"}, {"clahe_clip_limit": 8.0}),
        ({"equalization": "clahe"}, {"clahe_tile_grid": 2}),
        ({}, {"fit": "resize"}),
        ({}, {"fit": "center_crop"}),
        ({}, {"pad_value": 200}),
    ],
)
def test_every_preprocess_parameter_comes_from_the_contract(knee: np.ndarray, base: dict, change: dict) -> None:
    image = knee[:, 20:200]  # 224 x 180: non-square, so fit and pad_value matter
    contract = InputContract().replace(preprocess=base)
    ref = prepare(image, contract)
    out = prepare(image, contract.replace(preprocess=change))
    assert out.shape == ref.shape == (224, 224)
    assert not np.array_equal(out, ref), f"changing {change} did not change the output"


def test_input_size_and_normalisation_come_from_the_contract(knee: np.ndarray) -> None:
    base = InputContract()
    assert preprocess(knee, base.replace(input_size=128)).shape == (1, 128, 128)
    ref = preprocess(knee, base)
    out = preprocess(knee, base.replace(mean=(0.4,), std=(0.2,)))
    assert not np.allclose(out, ref)
    np.testing.assert_allclose(out, (ref * 0.25 + 0.5 - 0.4) / 0.2, atol=1e-4)


# --- golden test on a real knee --------------------------------------------------------------------


def test_fixture_is_a_224_gray_png() -> None:
    raw = cv2.imread(str(KNEE), cv2.IMREAD_UNCHANGED)
    assert raw is not None and raw.dtype == np.uint8 and raw.shape == (224, 224)


def test_golden_knee(knee: np.ndarray, golden: np.ndarray) -> None:
    out = prepare(knee, InputContract())
    assert out.shape == golden.shape == (224, 224)
    assert out.dtype == golden.dtype == np.uint8
    diff = np.abs(out.astype(np.int16) - golden.astype(np.int16))
    assert diff.max() <= 1, f"max difference {diff.max()} grey levels from the golden output"
    assert (diff == 0).mean() >= 0.995, f"only {(diff == 0).mean():.2%} of pixels identical"


def test_golden_knee_is_equalised(golden: np.ndarray) -> None:
    # global equalisation: the histogram is roughly flat, so the mean is near mid-grey and
    # each quarter of the grey range holds roughly a quarter of the pixels
    assert abs(float(golden.mean()) - 127.5) <= 15
    assert golden.min() == 0 and golden.max() == 255
    quarters = np.bincount(golden.ravel() // 64, minlength=4) / golden.size
    assert np.all((quarters > 0.15) & (quarters < 0.35)), quarters


def test_upscaled_knee_prepares_close_to_golden(knee: np.ndarray, golden: np.ndarray) -> None:
    # letterbox first: a 448 x 448 copy is shrunk back to 224 before the 3 x 3 filters, so
    # the filters see the same anatomy at the same scale
    big = np.clip(cv2.resize(knee, (448, 448), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)
    out = prepare(big, InputContract())
    assert out.shape == (224, 224)
    mad = np.abs(out.astype(np.float32) - golden.astype(np.float32)).mean()
    assert mad < 12, f"mean abs difference {mad:.2f} grey levels"
