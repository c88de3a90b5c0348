"""Every registered model: output shape, finite outputs, gradients everywhere, export round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import model
from model.checkpoint import load_torchscript, model_from_checkpoint, save_checkpoint
from model.contract import InputContract
from train.export import export

HEAVY = {"nasnet", "xception", "densenet121", "resnet50", "mobilenet_v2"}
SIZE = 32  # small inputs keep the suite fast; every family downsamples 32 px to >= 1x1


def _params(names):
    return [pytest.param(n, marks=pytest.mark.slow) if n in HEAVY else n for n in names]


ALL = _params(model.list_models())


def test_registry_lists_the_paper_models():
    names = set(model.list_models())
    assert {
        "oamen",
        "resnet18",
        "resnet34",
        "resnet50",
        "mobilenet_v2",
        "mobilenet_v3",
        "densenet121",
        "xception",
        "nasnet",
    } <= names


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match="valid names: .*oamen"):
        model.create_model("oamen_xxl")


@pytest.mark.parametrize("name", ALL)
def test_forward_backward(name):
    torch.manual_seed(0)
    net = model.create_model(name, num_classes=5, in_chans=1)
    # Zero-initialised BN scales (a training trick) would legitimately block some gradients at
    # step 0; set them to 1 so that "every parameter gets a gradient" is a real check.
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
    x = torch.randn(2, 1, SIZE, SIZE)
    y = net(x)  # training mode: batch statistics
    assert y.shape == (2, 5)
    assert torch.isfinite(y).all()
    # In training mode a BN bias followed by another BN legitimately gets no gradient (the
    # next batch mean removes any constant shift), so check gradient flow in eval mode.
    net.eval()
    net(x).square().sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert not missing, f"no gradient reaches {missing[:5]}"


@pytest.mark.parametrize("name", ALL)
def test_export_round_trip(name, tmp_path):
    torch.manual_seed(0)
    contract = InputContract(model_name=name, input_size=SIZE)
    net = model.create_model(name).eval()
    ckpt = save_checkpoint(tmp_path / "m.ckpt", net, contract)
    rebuilt, c2 = model_from_checkpoint(ckpt)
    assert c2 == contract
    out = export(ckpt, tmp_path / "m.pt")
    scripted, c3 = load_torchscript(out)
    assert c3 == contract
    x = torch.randn(3, 1, SIZE, SIZE)
    with torch.inference_mode():
        torch.testing.assert_close(scripted(x), net(x), atol=1e-4, rtol=0)
        torch.testing.assert_close(rebuilt(x), net(x), atol=0, rtol=0)


def test_oamen_exposes_features_head_and_fusion_layer():
    net = model.create_model("oamen").eval()
    x = torch.randn(1, 1, 64, 64)
    seen = {}
    net.fusion.register_forward_hook(lambda m, i, o: seen.update(fused=o.shape))
    with torch.inference_mode():
        feats = net.forward_features(x)
        assert feats.shape == (1, net.num_features)
        torch.testing.assert_close(net.forward_head(feats), net(x))
    assert seen["fused"][1] == net.cfg.fusion_channels
    assert seen["fused"][-1] == 64 // 8  # the fused map sits at stride 8: fine enough for Grad-CAM


def test_oamen_budget():
    n = sum(p.numel() for p in model.create_model("oamen").parameters())
    assert n <= 15_000_000, f"default OA-MEN has {n / 1e6:.1f} M parameters (budget 15 M)"


def test_ablations_drop_their_branch():
    full = model.create_model("oamen")
    nomobile = model.create_model("oamen_nomobile")
    nofusion = model.create_model("oamen_nofusion")
    assert full.mobile is not None and nomobile.mobile is None
    assert not any("lateral" in n for n, _ in nofusion.named_parameters())


def test_variant_overrides_and_bad_config():
    net = model.create_model("oamen", num_classes=3, in_chans=3).eval()
    assert net(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(ValueError):
        model.create_model("oamen", mobile_widths=(8, 16), mobile_strides=(1,))


def test_checkpoint_without_contract_is_rejected(tmp_path):
    path = tmp_path / "bare.pt"
    torch.save({"model": model.create_model("oamen_lite").state_dict()}, path)
    with pytest.raises(ValueError, match="no input contract"):
        model_from_checkpoint(path)


def test_baselines_register_lazily_and_as_listed():
    import importlib
    import subprocess
    import sys

    from model.registry import _MODELS, LAZY_MODULES

    code = "import sys, model; print('timm' in sys.modules, 'torchvision.models' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"], "importing model must not import timm or torchvision's model zoo"
    for module, names in LAZY_MODULES.items():
        before = set(_MODELS)
        importlib.import_module(module)
        registered = {n for n in _MODELS if _MODELS[n].__module__ == module}
        assert registered == set(names), f"{module} registers {sorted(registered)}, listed {sorted(names)}"
        assert set(names) <= before | set(_MODELS)
