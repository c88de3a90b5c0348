"""Tests of train.fit on a tiny 32 px dataset: outputs, resume, early stopping, time limit, DDP.

Runs go through ``main(get_args_parser().parse_args([...]))`` in-process (the DDP test through
``torchrun``), with ``oamen_lite`` on 32 x 32 images so that an epoch takes a fraction of a second.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train.fit as fit
from model.checkpoint import load_checkpoint, model_from_checkpoint
from model.paths import ROOT
from tests.conftest import TINY_PER_GRADE


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """``--threads`` sets a process-wide torch setting; give it back to the other tests."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "--data",
        str(data),
        "--out",
        str(out),
        "--model",
        "oamen_lite",
        "--input-size",
        "32",
        "--batch-size",
        "8",
        "--threads",
        "1",
        "--cache-dir",
        "",
        "--tune-fraction",
        "0",
        *extra,
    ]


def _run(*argv: str) -> dict:
    return fit.main(fit.get_args_parser().parse_args(list(argv)))


def _history(out: Path) -> list[dict]:
    return json.loads((out / "history.json").read_text())


# --------------------------------------------------------------------------- outputs and resume
def test_fit_writes_outputs_then_resumes(tiny_koa: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out, cache = tmp_path / "run", tmp_path / "cache"
    best = _run(*_args(tiny_koa, out, "--epochs", "2", "--cache-dir", str(cache)))

    for name in ("config.json", "last.pt", "best.pt", "history.json", "history.csv", "curves.png", "best_metrics.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert {p.name.split("-")[0] for p in cache.glob("*.npy")} == {"train", "val"}
    config = json.loads((out / "config.json").read_text())
    assert config["protocol"] == "official" and config["world_size"] == 1
    assert config["contract"]["input_size"] == 32 and config["contract"]["model_name"] == "oamen_lite"
    assert config["train_counts"] == config["val_counts"] == [TINY_PER_GRADE] * 5

    history = _history(out)
    assert [r["epoch"] for r in history] == [0, 1]
    assert all(r["train_images"] == 5 * TINY_PER_GRADE for r in history)  # balanced; 50 % 8 leaves a batch of 2
    with open(out / "history.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert json.loads((out / "best_metrics.json").read_text()) == best
    assert best["qwk"] == max(r["val_qwk"] for r in history)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    net, contract = model_from_checkpoint(out / "best.pt")
    assert contract.input_size == 32 and contract.model_name == "oamen_lite"
    assert net(torch.zeros(2, 1, 32, 32)).shape == (2, 5)
    best_epoch = max(history, key=lambda r: r["val_qwk"])["epoch"]  # the first of equal maxima
    assert load_checkpoint(out / "best.pt")["epoch"] == best_epoch

    # --resume to a longer run: only the new epoch trains, starting from last.pt's weights.
    last = load_checkpoint(out / "last.pt")
    assert last["epoch"] == 1
    real, calls = fit.train_one_epoch, []

    def spy(model, loader, optimizer, scheduler, device, args, epoch, show, deadline, ema=None):
        calls.append(epoch)
        for k, v in model.state_dict().items():
            assert torch.equal(v, last["model"][k]), f"{k} was not restored from last.pt"
        assert scheduler.last_epoch == 2 * config["steps_per_epoch"]
        return real(model, loader, optimizer, scheduler, device, args, epoch, show, deadline, ema)

    monkeypatch.setattr(fit, "train_one_epoch", spy)
    _run(*_args(tiny_koa, out, "--epochs", "3", "--cache-dir", str(cache), "--resume"))
    assert calls == [2]
    resumed = _history(out)
    assert [r["epoch"] for r in resumed] == [0, 1, 2]
    assert resumed[:2] == history
    assert load_checkpoint(out / "last.pt")["epoch"] == 2


def test_resume_continues_the_time_budget_and_schedule(tiny_koa: Path, tmp_path: Path) -> None:
    # A first sitting that used the whole 60-minute budget (the clock says 61): the resumed run
    # must not restart the clock, so it stops after its first step, at the schedule's floor.
    out = tmp_path / "run"
    _run(*_args(tiny_koa, out, "--epochs", "1", "--time-limit", "60"))
    state = torch.load(out / "last.pt", weights_only=True)
    assert 0 < state["elapsed_s"] < 600
    state["elapsed_s"] = 61.0 * 60
    torch.save(state, out / "last.pt")
    _run(*_args(tiny_koa, out, "--epochs", "5", "--time-limit", "60", "--resume"))
    history = _history(out)
    assert [r["epoch"] for r in history] == [0, 1]
    assert history[1]["train_images"] == 8  # one step, then the budget's end
    assert history[1]["lr"] == pytest.approx(0.01 * 2e-3, rel=1e-3)  # the schedule's floor: 1% of the peak
    assert torch.load(out / "last.pt", weights_only=True)["elapsed_s"] >= 61.0 * 60


def test_tune_fold_is_held_out_of_training(tiny_koa: Path, tmp_path: Path) -> None:
    _run(*_args(tiny_koa, tmp_path, "--epochs", "1", "--tune-fraction", "0.2", "--max-val", "10"))
    config = json.loads((tmp_path / "config.json").read_text())
    assert sum(config["tune_counts"]) == len(config["tune_files"]) == 10
    assert sum(config["train_counts"]) == 5 * TINY_PER_GRADE - 10
    assert all("/train/" in f for f in config["tune_files"])


def test_last_batch_of_one_image_is_dropped(tiny_koa: Path, tmp_path: Path) -> None:
    # 9 images in batches of 8: the lone ninth would reach BatchNorm on a 1x1 map and fail.
    _run(*_args(tiny_koa, tmp_path, "--epochs", "1", "--max-train-per-epoch", "9", "--max-val", "10"))
    assert [r["train_images"] for r in _history(tmp_path)] == [8]


# --------------------------------------------------------------------------- stopping
def _constant_qwk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation QWK that never improves after the first epoch, whatever the weights do."""
    real = fit.evaluate

    def evaluate(*a, **k):
        return {**real(*a, **k), "qwk": 0.5}

    monkeypatch.setattr(fit, "evaluate", evaluate)


def test_early_stopping(tiny_koa: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _constant_qwk(monkeypatch)
    quick = ("--max-train-per-epoch", "8", "--max-val", "10")
    _run(*_args(tiny_koa, tmp_path / "p1", "--epochs", "5", "--patience", "1", *quick))
    assert [r["epoch"] for r in _history(tmp_path / "p1")] == [0, 1]  # epoch 1 is stale -> stop
    assert load_checkpoint(tmp_path / "p1" / "best.pt")["epoch"] == 0

    _run(*_args(tiny_koa, tmp_path / "p0", "--epochs", "3", "--patience", "0", *quick))
    assert len(_history(tmp_path / "p0")) == 3  # patience 0: never stops early


def test_time_limit_stops_within_the_epoch(tiny_koa: Path, tmp_path: Path) -> None:
    best = _run(*_args(tiny_koa, tmp_path, "--epochs", "3", "--time-limit", "1e-5"))
    history = _history(tmp_path)
    assert len(history) == 1
    assert history[0]["train_images"] == 8  # one step of the 7 in a full epoch
    assert (tmp_path / "best.pt").is_file() and best


# --------------------------------------------------------------------------- ordinal loss
def test_ordinal_loss_is_cross_entropy_at_weight_zero() -> None:
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3, 4, 2])
    ce = F.cross_entropy(logits, y, label_smoothing=0.1)
    assert torch.equal(fit.ordinal_loss(logits, y, 0.1, 0.0), ce)
    assert fit.ordinal_loss(logits, y, 0.1, 0.5) > ce


def test_ordinal_loss_by_hand() -> None:
    # Uniform p = 1/5 and y = 0: CE = ln 5; distance term = (0+1+4+9+16) / 16 / 5 = 0.375.
    loss = fit.ordinal_loss(torch.zeros(1, 5), torch.tensor([0]), 0.0, 2.0)
    assert loss.item() == pytest.approx(np.log(5) + 2.0 * 0.375, abs=1e-6)


def test_ordinal_loss_punishes_far_misses_more() -> None:
    y = torch.tensor([0])
    near = torch.tensor([[2.0, 3.0, 0.0, 0.0, 0.0]])  # the wrong mass on KL1
    far = torch.tensor([[2.0, 0.0, 0.0, 0.0, 3.0]])  # the same mass on KL4
    assert F.cross_entropy(near, y).item() == pytest.approx(F.cross_entropy(far, y).item())
    assert fit.ordinal_loss(far, y, 0.0, 0.5) > fit.ordinal_loss(near, y, 0.0, 0.5) + 0.1


# --------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_ddp_two_cpu_processes(tiny_koa: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "train.fit"]
    # --time-limit only to run the ranks' per-step agreement on the deadline; it is never reached.
    cmd += _args(tiny_koa, out, "--epochs", "1", "--device", "cpu", "--time-limit", "10")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "best.pt").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2
    # 50 balanced images over 2 ranks: 25 each, in batches of 8 with the lone 25th dropped.
    assert [r["train_images"] for r in _history(out)] == [24]
    _, contract = model_from_checkpoint(out / "best.pt")
    assert contract.input_size == 32


# --------------------------------------------------------------------------- --init and --ema
def test_init_fine_tunes_a_finished_run_and_ema_is_what_is_saved(tiny_koa: Path, tmp_path: Path) -> None:
    """--init starts from a finished run's weights (and refuses another input contract); with --ema
    the averaged weights are validated and saved, and last.pt carries them for --resume."""
    first = tmp_path / "first"
    _run(*_args(tiny_koa, first, "--epochs", "1"))
    start = load_checkpoint(first / "best.pt")["model"]
    second = tmp_path / "second"
    _run(*_args(tiny_koa, second, "--epochs", "1", "--init", str(first / "best.pt"), "--ema", "0.9", "--lr", "0"))
    # lr 0: the weights never move, so the average of them is them (BatchNorm statistics still do)
    saved = load_checkpoint(second / "best.pt")["model"]
    conv = next(k for k, v in start.items() if v.ndim == 4)
    torch.testing.assert_close(saved[conv], start[conv])
    assert "ema" in load_checkpoint(second / "last.pt")
    # with a learning rate the average lags the trained weights
    third = tmp_path / "third"
    _run(*_args(tiny_koa, third, "--epochs", "1", "--init", str(first / "best.pt"), "--ema", "0.9"))
    last = load_checkpoint(third / "last.pt")
    assert not torch.equal(load_checkpoint(third / "best.pt")["model"][conv], last["model"][conv])
    with pytest.raises(SystemExit, match="input_size"):
        _run(*_args(tiny_koa, tmp_path / "x", "--epochs", "1", "--init", str(first / "best.pt"), "--input-size", "40"))
