"""What the GPU run is made of, checked on the CPU: the staged copy, the weights it carries, the
request-path benchmark and the script itself (scripts/gpu_run.sh, docs/RESULTS.md)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import ops.bench.gpu as bench_gpu
import ops.stage_gpu_data as stage
from model.efficientnet_lite import WEIGHTS_ENV, create_lite0
from model.paths import ROOT
from train.data import make_splits, scan, split_tune


def test_the_staged_copy_leaves_the_tune_fold_here_and_carries_the_weights(
    tiny_koa: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "stage"
    assert stage.main(["--data", str(tiny_koa), "--out", str(out), "--tune-fraction", "0.2"]) == 0
    samples = scan(tiny_koa)
    _, tune = split_tune(make_splits(samples)["train"], 0.2, 0)
    staged = {p.stem for p in out.rglob("*.jpg")}
    assert staged == {s.path.stem for s in samples} - {s.path.stem for s in tune} and tune
    # The model code reads the float16 copy when pointed at it, and starts from the same network.
    monkeypatch.setenv(WEIGHTS_ENV, str(out / stage.LITE0_FILE))
    from_copy = create_lite0(num_classes=1000, in_chans=3, pretrained=True).state_dict()
    monkeypatch.delenv(WEIGHTS_ENV)
    from_wheel = create_lite0(num_classes=1000, in_chans=3, pretrained=True).state_dict()
    floats = [k for k in from_wheel if from_wheel[k].is_floating_point()]
    assert all(torch.allclose(from_copy[k], from_wheel[k], rtol=1e-3, atol=1e-4) for k in floats)  # float16 rounding
    assert any(not torch.equal(from_copy[k], from_wheel[k]) for k in floats)  # and it was the copy that was read


def test_the_request_path_benchmark_runs_on_a_cpu(knee_png: bytes, tmp_path: Path) -> None:
    images = tmp_path / "val"
    images.mkdir()
    gray = cv2.imdecode(np.frombuffer(knee_png, np.uint8), cv2.IMREAD_GRAYSCALE)
    for i in range(2):
        cv2.imwrite(str(images / f"{i}.png"), np.ascontiguousarray(gray if i == 0 else gray[:, ::-1]))
    n = torch.get_num_threads()
    args = bench_gpu.get_args_parser().parse_args(
        ["--images", str(images), "--batches", "1", "2", "--dtypes", "fp32", "--seconds", "0.01",
         "--path-images", "4", "--workers", "2", "--drivers", "2", "--driver-batches", "2",
         "--json", str(tmp_path / "out.json")]
    )  # fmt: skip
    result = bench_gpu.main(args)
    torch.set_num_threads(n)
    measured = [(r["batch"], r["cuda_graph"]) for r in result["models_alone"]]
    assert measured == [(1, False), (2, False), (1, True), (2, True)]
    assert all(r["grader_images_per_s"] > 0 and r["finder_images_per_s"] > 0 for r in result["models_alone"])
    assert set(result["cpu_steps"]) == {"decode", "finder_input", "preprocess"}
    # Both real knee crops are taken as crops by the shipped finder and graded.
    assert [r["graded_as_crops"] for r in result["whole_path"]] == [1.0, 1.0]
    # Two drivers at once, each with one of the two workers and its own models: both crops graded by each.
    (multi,) = result["whole_path_drivers"]
    assert (multi["drivers"], multi["batch"], multi["workers_per_driver"]) == (2, 2, [1, 1])
    assert multi["graded_as_crops"] == 1.0 and multi["images_per_s"] > 0
    assert len(multi["per_driver_images_per_s"]) == 2
    assert (tmp_path / "out.json").is_file()


def test_the_gpu_script_parses() -> None:
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_run.sh")]).returncode == 0


def test_the_travel_check_counts_what_a_device_run_sends(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (repo / ".gitignore").write_text("ignored/\n")
    (repo / "kept.bin").write_bytes(b"k" * 1000)
    (repo / "aside.bin").write_bytes(b"a" * 5000)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    (repo / "new.txt").write_bytes(b"n" * 300)  # untracked, not ignored: travels
    (repo / "ignored").mkdir()
    (repo / "ignored" / "big.bin").write_bytes(b"i" * 7000)  # ignored: stays unless carried
    base = len("ignored/\n")
    total, tracked = stage.travel_size(repo, [])
    assert total == base + 1000 + 5000 + 300
    assert [f for _, f in tracked] == ["aside.bin", "kept.bin", ".gitignore"]
    assert stage.travel_size(repo, [Path("ignored")])[0] == total + 7000
    (repo / "aside.bin").unlink()  # a tracked file moved out of the checkout does not travel
    assert stage.travel_size(repo, [])[0] == total - 5000
    # Over the limit, the report names the largest tracked files and fails.
    (repo / "ignored" / "big.bin").write_bytes(b"i" * (stage.TRAVEL_LIMIT + 1))
    assert stage.report_travel(repo, [Path("ignored")]) == 1
    assert "kept.bin" in capsys.readouterr().out
    assert stage.report_travel(repo, []) == 0
