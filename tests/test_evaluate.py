"""train.evaluate on a checkpoint and on its TorchScript export; train.compare on a reduced budget."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

import train.compare as compare
import train.evaluate as evaluate
import train.fit as fit
from train.export import export


@pytest.fixture(scope="module")
def trained(tiny_koa: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    argv = ["--data", str(tiny_koa), "--out", str(out), "--model", "oamen_lite", "--input-size", "32", "--epochs", "2",
            "--batch-size", "8", "--cache-dir", ""]  # fmt: skip
    n = torch.get_num_threads()
    fit.main(fit.get_args_parser().parse_args(argv))
    torch.set_num_threads(n)
    return out


def _evaluate(*argv: str) -> dict:
    return evaluate.main(evaluate.get_args_parser().parse_args(list(argv)))


def test_checkpoint_and_torchscript_give_the_same_numbers(trained: Path, tiny_koa: Path, tmp_path: Path):
    ts_file = export(trained / "best.pt", tmp_path / "m.pt")
    a = _evaluate("--checkpoint", str(trained / "best.pt"), "--data", str(tiny_koa), "--split", "val",
                  "--out", str(tmp_path / "a"), "--cache-dir", "")  # fmt: skip
    b = _evaluate("--torchscript", str(ts_file), "--data", str(tiny_koa), "--split", "val",
                  "--out", str(tmp_path / "b"), "--cache-dir", "")  # fmt: skip
    assert a["confusion_matrix"] == b["confusion_matrix"]
    for key in ("n", "accuracy", "qwk", "macro_auc", "mean_ovr_accuracy"):
        assert a[key] == pytest.approx(b[key], abs=1e-6), key
    assert a["evaluated"]["source"].startswith("checkpoint:") and b["evaluated"]["source"].startswith("torchscript:")
    written = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert written["n"] == 50 and written["evaluated"]["split"] == "val"
    for key in ("balanced_accuracy", "macro_f1", "mae", "per_class"):
        assert key in written
    assert set(written["per_class"]["KL1"]) >= {"precision", "recall", "f1", "ovr_accuracy", "auc"}
    for png in ("confusion_matrix.png", "roc.png"):
        assert (tmp_path / "b" / png).read_bytes()[:4] == b"\x89PNG"
    rows = list(csv.DictReader(open(tmp_path / "b" / "predictions.csv")))
    assert len(rows) == 50 and {r["grade"] for r in rows} == {"0", "1", "2", "3", "4"}


def test_unknown_split_is_explained(trained: Path, tiny_koa: Path, tmp_path: Path):
    with pytest.raises(ValueError, match="splits found"):
        _evaluate("--checkpoint", str(trained / "best.pt"), "--data", str(tiny_koa), "--split", "test",
                  "--out", str(tmp_path), "--cache-dir", "")  # fmt: skip


def test_compare_quick_flags_its_table(tiny_koa: Path, tmp_path: Path):
    args = compare.get_args_parser().parse_args(
        ["--models", "oamen_lite", "resnet18", "--data", str(tiny_koa), "--out", str(tmp_path), "--quick", "--no-speed"]
    )
    n = torch.get_num_threads()
    rows = compare.main(args)
    torch.set_num_threads(n)
    assert [r["model"] for r in rows] == ["oamen_lite", "resnet18"]
    table = (tmp_path / "compare.md").read_text()
    assert table.startswith("**REDUCED BUDGET")
    assert "| oamen_lite |" in table and "| resnet18 |" in table
    data = json.loads((tmp_path / "compare.json").read_text())
    assert data["quick"] is True and len(data["rows"]) == 2
    for model in ("oamen_lite", "resnet18"):
        assert (tmp_path / model / "eval-val" / "confusion_matrix.png").is_file()
        assert (tmp_path / model / "curves.png").is_file()
