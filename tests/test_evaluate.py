"""train.evaluate on a checkpoint and on its TorchScript export; train.compare on a reduced budget."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import train.calibrate as calibrate
import train.compare as compare
import train.evaluate as evaluate
import train.fit as fit
import train.refit_gate as refit_gate
from model.checkpoint import load_checkpoint
from train.export import export


@pytest.fixture(scope="module")
def trained(tiny_koa: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    argv = ["--data", str(tiny_koa), "--out", str(out), "--model", "oamen_lite", "--input-size", "32", "--epochs", "2",
            "--batch-size", "8", "--cache-dir", "", "--tune-fraction", "0.2"]  # fmt: skip
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


@pytest.fixture(scope="module")
def calibrated(trained: Path) -> Path:
    out = trained / "calibrated.ckpt"
    args = calibrate.get_args_parser().parse_args(
        [
            "--run",
            str(trained),
            "--out",
            str(out),
            "--max-gate-fit",
            "30",
            "--cache-dir",
            "",
            "--coverage",
            "0.8",
            "--films",
            "",
            "--version",
            "0.2.0",
        ]  # fmt: skip
    )
    n = torch.get_num_threads()
    calibrate.main(args)
    torch.set_num_threads(n)
    return out


@pytest.fixture(scope="module")
def nonknee(tmp_path_factory) -> Path:
    """ROOT/<region>/*.png: two regions of images unlike the tiny knees (smooth blobs, a grid)."""
    root = tmp_path_factory.mktemp("nonknee")
    rng = np.random.default_rng(5)
    for region in ("blobs", "grid"):
        (root / region).mkdir()
        for i in range(4):
            img = np.zeros((40, 50), np.uint8)
            if region == "blobs":
                cv2.circle(img, (int(rng.integers(10, 40)), int(rng.integers(10, 30))), 9, 255, -1)
            else:
                img[::5, :] = 200
                img[:, ::5] = 200
            cv2.imwrite(str(root / region / f"{i}.png"), img)
    return root


def test_refit_gate_changes_the_gate_alone_and_lets_every_tune_knee_through(calibrated: Path, tmp_path: Path):
    out = tmp_path / "refit.ckpt"
    args = refit_gate.get_args_parser().parse_args(
        [
            "--checkpoint",
            str(calibrated),
            "--out",
            str(out),
            "--films",
            "",
            "--max-gate-fit",
            "30",
            "--version",
            "0.3.0",
        ]  # fmt: skip
    )
    n = torch.get_num_threads()
    report = refit_gate.main(args)
    torch.set_num_threads(n)
    before, after = load_checkpoint(calibrated)["contract"], load_checkpoint(out)["contract"]
    assert after.model_version == "0.3.0"
    changed = {k for k, v in after.postprocess.__dict__.items() if before.postprocess.__dict__[k] != v}
    assert changed <= {"gate_threshold"}  # the calibration and the decoding stay
    t = report["tune_scores"]
    assert report["threshold"] >= max(t["plain_max"], t["framed_max"])  # no tune knee, plain or framed, refused
    assert report["gate_fit"] == {"knees": 30, "framed_copies": 30}
    # train.calibrate (--gate-framings 1, the default) fitted the same gate from the same knees and copies
    calibrated_gate = json.loads(calibrated.with_name("calibration.json").read_text())["gate"]
    np.testing.assert_allclose(report["gate"]["loc"], calibrated_gate["loc"], rtol=1e-4)
    np.testing.assert_allclose(report["gate"]["scale"], calibrated_gate["scale"], rtol=1e-4)
    assert after.postprocess.gate_threshold == pytest.approx(before.postprocess.gate_threshold, abs=2e-3)
    assert json.loads((tmp_path / "gate.json").read_text())["version"] == "0.3.0"


def test_refit_gate_needs_a_checkpoint_with_its_run_config(tmp_path: Path):
    from model.checkpoint import save_checkpoint
    from model.contract import InputContract
    from model.registry import create_model

    bare = save_checkpoint(tmp_path / "bare.ckpt", create_model("oamen_lite"), InputContract(model_name="oamen_lite"))
    args = refit_gate.get_args_parser().parse_args(["--checkpoint", str(bare), "--out", str(tmp_path / "o.ckpt"),
                                                    "--version", "1.0.0"])  # fmt: skip
    with pytest.raises(ValueError, match="run config"):
        refit_gate.main(args)


def test_calibration_is_written_into_the_contract(trained: Path, calibrated: Path) -> None:
    c = load_checkpoint(calibrated)["contract"]
    post = c.postprocess
    assert post.gate == "mahalanobis" and post.gate_threshold > 0 and post.temperature > 0
    assert 0 < post.uncertain_below < 1
    assert post.decision in ("argmax", "cutpoints")
    assert c.model_version == "0.2.0"  # --version: a new calibration is a new version of the answer
    report = json.loads((trained / "calibration.json").read_text())
    assert report["chosen"] in report["candidates"] and report["gate_fit_images"] == 30
    cal = report["calibration"]
    # the lowest ECE, ties within 1e-6 (train.calibration.choose_fit_set): fits that read the same knees
    # can differ in the last bit
    assert cal["fit_on"] in cal["fit_sets"] and round(cal["fit_sets"][cal["fit_on"]]["ece"], 6) == min(
        round(v["ece"], 6) for v in cal["fit_sets"].values()
    )
    # both ways of reading an image were calibrated; the chosen one is the contract's
    assert cal["views"] == ("the image and its mirror, averaged" if post.flip_tta else "the image")
    assert cal["other_views"]["views"] != cal["views"] and cal["other_views"]["fit_on"] in cal["fit_sets"]
    config = json.loads((trained / "config.json").read_text())
    assert report["tune_fold"]["images"] == len(config["tune_files"]) > 0
    # the tune fold is held out of training: no tune file among the images it trained on
    assert sum(config["train_counts"]) + sum(config["tune_counts"]) == 50


def test_evaluate_reports_calibration_coverage_framing_and_gate(
    calibrated: Path, tiny_koa: Path, nonknee: Path, tmp_path: Path
) -> None:
    m = _evaluate("--checkpoint", str(calibrated), "--data", str(tiny_koa), "--split", "val", "--out",
                  str(tmp_path / "e"), "--cache-dir", "", "--framing", "--nonknee", str(nonknee))  # fmt: skip
    assert 0 <= m["ece"] <= 1
    assert 0 <= m["uncertain"]["flagged_share"] <= 1
    assert [r["framing"] for r in m["framing"]] == ["original", "joint_band_55", "zoom_85", "gamma_0.7", "gamma_1.4"]
    assert m["framing"][0]["agreement_with_original"] == 1.0 and m["framing"][0]["qwk_drop"] == 0
    sets = [r["set"] for r in m["gate"]["rows"]]
    assert sets[:3] == ["val knees", "non-knee radiographs: blobs", "non-knee radiographs: grid"]
    assert any(s.startswith("made up: ") for s in sets)
    for png in ("reliability.png", "selective.png"):
        assert (tmp_path / "e" / png).read_bytes()[:4] == b"\x89PNG"
    curve = json.loads((tmp_path / "e" / "selective.json").read_text())
    assert curve[-1]["coverage"] == 1.0 and curve[-1]["accuracy"] == pytest.approx(m["accuracy"])
    rows = list(csv.DictReader(open(tmp_path / "e" / "predictions.csv")))
    assert {"confidence", "uncertain"} <= set(rows[0])


def test_calibrated_torchscript_answers_like_its_checkpoint(calibrated: Path, tiny_koa: Path, tmp_path: Path):
    ts_file = export(calibrated, tmp_path / "m.pt")
    a = _evaluate("--checkpoint", str(calibrated), "--data", str(tiny_koa), "--split", "val",
                  "--out", str(tmp_path / "a"), "--cache-dir", "")  # fmt: skip
    b = _evaluate("--torchscript", str(ts_file), "--data", str(tiny_koa), "--split", "val",
                  "--out", str(tmp_path / "b"), "--cache-dir", "")  # fmt: skip
    assert a["confusion_matrix"] == b["confusion_matrix"]
    assert a["ece"] == pytest.approx(b["ece"], abs=1e-6)
    assert a["uncertain"] == b["uncertain"]


def test_the_gate_lets_the_tune_films_knees_through(trained: Path, tmp_path: Path) -> None:
    """train.calibrate --films: the threshold rises to the largest score of the tune films' AP knees."""
    import shutil

    from train.films import film_split

    tune_name = next(f"IMG{i:07d}.jpg" for i in range(1000) if film_split(f"IMG{i:07d}.jpg") == "tune")
    films = tmp_path / "films"
    films.mkdir()
    shutil.copy(Path(__file__).parent / "fixtures" / "films" / "ap_IMG0000653.jpg", films / tune_name)
    boxes = tmp_path / "boxes.csv"
    boxes.write_text(f"file,width,height,view,x0,y0,x1,y1,marker,note\n{tune_name},373,454,ap,144,154,221,231,,\n")
    out = tmp_path / "c.ckpt"
    args = calibrate.get_args_parser().parse_args(
        ["--run", str(trained), "--out", str(out), "--max-gate-fit", "30", "--cache-dir", "", "--films", str(films),
         "--boxes", str(boxes)]
    )  # fmt: skip
    n = torch.get_num_threads()
    report = calibrate.main(args)
    torch.set_num_threads(n)
    films_seen = report["gate_film_knees"]
    assert films_seen["knees"] == 1
    # the gate's knees and the tune fold are each joined by one framed copy a knee (--gate-framings 1)
    tune_knees = report["tune_fold"]["images"]
    assert report["gate_framings"] == {"share": 1.0, "gate_fit_copies": 30, "tune_copies": tune_knees}
    threshold = load_checkpoint(out)["contract"].postprocess.gate_threshold
    assert threshold >= round(max(films_seen["max_score"], report["gate_threshold_dataset_knees"]), 3) - 1e-3


def test_compare_without_re_evaluation_reports_what_fit_measured(tiny_koa: Path, tmp_path: Path):
    """The GPU run's settings: fit's own best-epoch metrics, no last.pt, no tune fold carved out."""
    args = compare.get_args_parser().parse_args(
        ["--models", "oamen_lite", "--data", str(tiny_koa), "--out", str(tmp_path), "--quick", "--no-speed",
         "--no-eval", "--no-save-last", "--tune-fraction", "0", "--cache-dir", str(tmp_path / "cache")]
    )  # fmt: skip
    n = torch.get_num_threads()
    rows = compare.main(args)
    torch.set_num_threads(n)
    run = tmp_path / "oamen_lite"
    fitted = json.loads((run / "best_metrics.json").read_text())
    assert rows[0]["qwk"] == fitted["qwk"] and rows[0]["accuracy"] == fitted["accuracy"]
    assert not (run / "eval-val").exists() and not (run / "last.pt").exists() and (run / "best.pt").is_file()
    config = json.loads((run / "config.json").read_text())
    assert config["tune_counts"] == [0] * 5 and list((tmp_path / "cache").glob("*.npy"))
