"""Tests of model.contract: JSON round trip, validation with useful messages, immutability."""

from __future__ import annotations

import dataclasses
import json

import pytest

from model.contract import CONTRACT_FORMAT, DATA_CREDIT, InputContract, PreprocessConfig

# --- round trip ------------------------------------------------------------------------------------


def test_default_round_trip() -> None:
    c = InputContract()
    text = c.to_json()
    back = InputContract.from_json(text)
    assert back == c
    assert isinstance(back.preprocess, PreprocessConfig)
    assert isinstance(back.mean, tuple) and isinstance(back.class_names, tuple)
    assert back.to_json() == text
    assert json.loads(text)["format"] == CONTRACT_FORMAT
    assert back.data_credit == DATA_CREDIT


def test_round_trip_from_bytes() -> None:
    c = InputContract(model_version="1.2.3")
    assert InputContract.from_json(c.to_json().encode("utf-8")) == c


@pytest.mark.parametrize(
    "preprocess",
    [
        {"laplacian_weight": 0.0},
        {"equalization": "clahe", "clahe_clip_limit": 3.5, "clahe_tile_grid": 4},
        {"equalization": "none", "fit": "center_crop", "pad_value": 17},
        {"gaussian_ksize": 5, "gaussian_sigma": 0.0, "laplacian_ksize": 1, "fit": "resize"},
    ],
)
def test_round_trip_with_changed_preprocess(preprocess: dict) -> None:
    c = InputContract().replace(preprocess=preprocess)
    for name, value in preprocess.items():
        assert getattr(c.preprocess, name) == value
    back = InputContract.from_json(c.to_json())
    assert back == c
    assert back != InputContract()


def test_round_trip_with_changed_top_level_fields() -> None:
    c = InputContract().replace(
        model_name="resnet18",
        input_size=256,
        channels=3,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        preprocess={"equalization": "none"},
    )
    back = InputContract.from_json(c.to_json())
    assert back == c
    assert back.mean == (0.485, 0.456, 0.406)
    assert back.preprocess.equalization == "none"
    assert back.num_classes == 5


def test_replace_keeps_other_preprocess_fields() -> None:
    base = InputContract().replace(preprocess={"pad_value": 9})
    c = base.replace(preprocess={"laplacian_weight": 0.25})
    assert c.preprocess.pad_value == 9
    assert c.preprocess.laplacian_weight == 0.25
    assert base.preprocess.laplacian_weight == 1.0  # the original is untouched


def test_from_dict_with_missing_fields_uses_defaults() -> None:
    c = InputContract.from_dict({"format": CONTRACT_FORMAT, "model_version": "9"})
    assert c == InputContract(model_version="9")


# --- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"gaussian_ksize": 4}, "gaussian_ksize must be an odd int"),
        ({"laplacian_ksize": 2}, "laplacian_ksize must be an odd int"),
        ({"gaussian_ksize": 0}, "gaussian_ksize"),
        ({"gaussian_ksize": 33}, "gaussian_ksize"),
        ({"gaussian_ksize": 3.0}, "gaussian_ksize"),
        ({"gaussian_sigma": -1.0}, "gaussian_sigma"),
        ({"laplacian_weight": -0.1}, "laplacian_weight"),
        ({"equalization": "adaptive"}, "equalization must be one of"),
        ({"fit": "stretch"}, "fit must be one of"),
        ({"pad_value": 256}, "pad_value"),
        ({"pad_value": -1}, "pad_value"),
        ({"clahe_clip_limit": 0.0}, "clahe_clip_limit"),
        ({"clahe_tile_grid": 0}, "clahe_tile_grid"),
    ],
)
def test_invalid_preprocess_config(changes: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PreprocessConfig(**changes)
    with pytest.raises(ValueError, match=match):
        InputContract().replace(preprocess=changes)


def test_error_message_names_the_bad_value() -> None:
    with pytest.raises(ValueError) as info:
        PreprocessConfig(equalization="adaptive")
    assert "'adaptive'" in str(info.value) and "global" in str(info.value)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"channels": 2, "mean": (0.5, 0.5), "std": (0.25, 0.25)}, "channels must be 1 or 3"),
        ({"channels": 3}, "mean and std need 3 values"),
        ({"mean": (0.5, 0.5)}, "mean and std need 1 values"),
        ({"std": (0.25, 0.25)}, "mean and std need 1 values"),
        ({"std": (0.0,)}, "std must be positive"),
        ({"std": (-0.25,)}, "std must be positive"),
        ({"input_size": 8}, "input_size"),
        ({"input_size": 4096}, "input_size"),
        ({"class_names": ("only",), "class_labels": ("only one",)}, "class_names"),
        ({"class_labels": ("a", "b")}, "class_label"),
        ({"max_pixels": 100}, "max_pixels"),
    ],
)
def test_invalid_contract(changes: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        InputContract(**changes)


def _default_dict() -> dict:
    return json.loads(InputContract().to_json())


@pytest.mark.parametrize("fmt", [0, 2, "1", None])
def test_wrong_format_number(fmt: object) -> None:
    data = _default_dict()
    data["format"] = fmt
    with pytest.raises(ValueError, match="format .* is not supported"):
        InputContract.from_dict(data)


def test_missing_format_is_refused() -> None:
    data = _default_dict()
    del data["format"]
    with pytest.raises(ValueError, match="format"):
        InputContract.from_json(json.dumps(data))


def test_unknown_fields_are_refused() -> None:
    data = _default_dict()
    data["colour"] = "blue"
    data["zz_extra"] = 1
    with pytest.raises(ValueError, match=r"unknown fields \['colour', 'zz_extra'\]"):
        InputContract.from_json(json.dumps(data))


def test_invalid_values_in_json_are_refused() -> None:
    data = _default_dict()
    data["preprocess"]["gaussian_ksize"] = 4
    with pytest.raises(ValueError, match="gaussian_ksize"):
        InputContract.from_json(json.dumps(data))
    data = _default_dict()
    data["std"] = [0.0]
    with pytest.raises(ValueError, match="std must be positive"):
        InputContract.from_json(json.dumps(data))


@pytest.mark.parametrize("text", ["", "{", "not json", '{"format": 1,}', b"\xff\xfe{"])
def test_invalid_json_text(text: str | bytes) -> None:
    with pytest.raises(ValueError, match="JSON|utf|decode"):
        InputContract.from_json(text)


def test_from_dict_needs_a_dict() -> None:
    with pytest.raises(ValueError, match="must be a JSON object"):
        InputContract.from_dict([1, 2])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text, match",
    [
        ('{"format": 1, "input_size": "224"}', "input_size must be int"),
        ('{"format": 1, "input_size": 224.0}', "input_size must be int"),
        ('{"format": 1, "preprocess": {"zz": 1}}', "invalid contract"),
        ('{"format": 1, "std": [NaN]}', "finite"),
        ('{"format": 1, "preprocess": {"laplacian_weight": Infinity}}', "finite"),
    ],
)
def test_untrusted_json_gets_value_errors(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        InputContract.from_json(text)


def test_format_is_checked_on_construction() -> None:
    with pytest.raises(ValueError, match="format"):
        InputContract(format=2)


# --- immutability ----------------------------------------------------------------------------------


def test_contract_is_frozen() -> None:
    c = InputContract()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.input_size = 512  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.preprocess.laplacian_weight = 1.0  # type: ignore[misc]
    assert c == InputContract()


def test_contract_is_hashable() -> None:
    assert hash(InputContract()) == hash(InputContract.from_json(InputContract().to_json()))
