"""The load test: its answer validator and loopback guard (pure), and a short run against a real server."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loadtest import run as loadtest_run
from ops import server as ts
from ops.load import InvalidAnswer, check_loopback, load_images, validate_answer

ROOT = Path(__file__).resolve().parents[1]

GOOD: dict[str, Any] = {
    "kl_grade": 2,
    "class_name": "KL2",
    "label": "KL2: minimal",
    "probabilities": [0.08, 0.21, 0.44, 0.22, 0.05],
    "oa_probability": 0.71,
    "model": {"name": "oamen_lite", "version": "1.0.0"},
}
EXPLANATION = {"method": "gradcam", "target": 2, "grid": [[0.0, 0.5], [1.0, 0.25]], "overlay_png": "iVBOR"}


def changed(**fields: Any) -> dict[str, Any]:
    answer = copy.deepcopy(GOOD)
    for key, value in fields.items():
        if value is None:
            answer.pop(key)
        else:
            answer[key] = value
    return answer


# --- answer validator -------------------------------------------------------------------------------------------


GOOD_V2: dict[str, Any] = {**GOOD, "schema_version": 2, "confidence": 0.44, "uncertain": False}


def test_good_answers_pass() -> None:
    validate_answer(GOOD)  # a version 1 answer (an older server) still passes
    validate_answer({**GOOD, "explanation": EXPLANATION}, explain=True)
    validate_answer(GOOD_V2)
    # version 2: an ordinal decoding may give a grade that is not the most probable one
    validate_answer({**GOOD_V2, "kl_grade": 1, "class_name": "KL1", "confidence": 0.21, "uncertain": True})


@pytest.mark.parametrize(
    "fields, reason",
    [
        ({"confidence": None}, "missing field 'confidence'"),
        ({"uncertain": None}, "missing field 'uncertain'"),
        ({"confidence": 0.5}, r"confidence must equal probabilities\[kl_grade\]"),
        ({"uncertain": "no"}, "uncertain must be true or false"),
        ({"schema_version": 99}, "schema_version must be 1 to"),
    ],
)
def test_bad_v2_answers_fail_with_a_reason(fields: dict[str, Any], reason: str) -> None:
    answer = {**GOOD_V2, **fields}
    for key in [k for k, v in fields.items() if v is None]:
        answer.pop(key)
    with pytest.raises(InvalidAnswer, match=reason):
        validate_answer(answer)


def test_error_bodies_are_checked() -> None:
    from koa_client.schema import validate_error

    assert validate_error({"error": {"status": 422, "type": "not_a_knee", "message": "a hand"}}, 422) == "not_a_knee"
    with pytest.raises(InvalidAnswer, match="unknown error type"):
        validate_error({"error": {"status": 422, "type": "nope", "message": "x"}}, 422)
    with pytest.raises(InvalidAnswer, match="differs from the HTTP status"):
        validate_error({"error": {"status": 400, "type": "not_a_knee", "message": "x"}}, 422)


@pytest.mark.parametrize(
    "answer, explain, reason",
    [
        (changed(probabilities=[0.1, 0.2, 0.7]), False, "list of 5 numbers, got 3 values"),
        (changed(probabilities=[0.08, 0.21, 0.44, 0.22, 0.5]), False, "sum to 1.45"),
        (changed(probabilities=[0.08, 0.21, 0.44, "x", 0.05]), False, r"numbers in \[0, 1\]"),
        (changed(kl_grade=None), False, "missing field 'kl_grade'"),
        (changed(model=None), False, "model must be an object with a non-empty name"),
        (changed(kl_grade=7), False, "kl_grade must be an int 0-4, got 7"),
        (changed(kl_grade="2"), False, "kl_grade must be an int"),
        (changed(kl_grade=0), False, "not the most probable"),
        (changed(oa_probability=1.5), False, "oa_probability"),
        (changed(model={"version": "1.0.0"}), False, "non-empty name"),
        (GOOD, True, "explanation asked for but missing"),
        ({**GOOD, "explanation": {"method": "gradcam"}}, True, "grid"),
        ({**GOOD, "explanation": {"grid": [[0.1, 0.2], [0.3]]}}, True, "rows differ"),
        ({**GOOD, "explanation": {"grid": [[0.1, 2.0]]}}, True, r"\[0, 1\]"),
        ({**GOOD, "explanation": EXPLANATION}, False, "none was asked for"),
        ([GOOD], False, "not a JSON object"),
    ],
)
def test_bad_answers_fail_with_a_reason(answer: Any, explain: bool, reason: str) -> None:
    with pytest.raises(InvalidAnswer, match=reason):
        validate_answer(answer, explain=explain)


# --- loopback guard ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    ["http://127.0.0.1:8080", "http://127.4.5.6:1", "http://localhost:8080", "http://[::1]:8080", "127.0.0.1:7070",
     "localhost:7070", "[::1]:7070"],
)  # fmt: skip
def test_loopback_guard_accepts_this_machine(address: str) -> None:
    check_loopback(address)


@pytest.mark.parametrize(
    "address",
    ["http://10.0.0.1:8080", "http://example.com", "https://example.com:8080/x", "http://0.0.0.0:8080",
     "http://[::2]:8080", "10.0.0.1:7070", "example.com:7070", "http://128.0.0.1", ""],
)  # fmt: skip
def test_loopback_guard_refuses_other_hosts(address: str) -> None:
    with pytest.raises(ValueError, match="loopback|no host"):
        check_loopback(address)


@pytest.mark.parametrize(
    "flags",
    [["--host", "http://10.0.0.1:8080"], ["--host", "http://127.0.0.1:8080", "--grpc-target", "example.com:70"]],
)
def test_runner_refuses_remote_targets_before_anything_runs(
    flags: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = loadtest_run.get_args_parser().parse_args([*flags, "--out", str(tmp_path / "out")])
    assert loadtest_run.main(args) == 2
    assert "only loopback targets" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_runner_validates_the_open_loop_rate() -> None:
    args = loadtest_run.get_args_parser().parse_args(["--user-rate", "-1"])
    with pytest.raises(ValueError, match="--user-rate"):
        loadtest_run.check_args(args)
    ok = loadtest_run.get_args_parser().parse_args(["--user-rate", "4.5"])
    loadtest_run.check_args(ok)
    assert (
        loadtest_run.locust_env("rest", {"grpc_target": "127.0.0.1:7070", "started": True, "key_file": "k"}, ok)[
            "KOA_USER_RATE"
        ]
        == "4.5"
    )


def test_runner_passes_the_door_credentials_to_locust(tmp_path: Path) -> None:
    flags = ["--host", "https://127.0.0.1:8443", "--ca", "ca.crt", "--cert", "c.crt", "--key", "c.key"]
    args = loadtest_run.get_args_parser().parse_args(flags)
    env = loadtest_run.locust_env(
        "rest", {"grpc_target": "grpcs://127.0.0.1:7443", "started": False, "key_file": "k"}, args
    )
    assert env["KOA_CA_FILE"].endswith("ca.crt") and env["KOA_CERT_FILE"].endswith("c.crt")
    assert env["KOA_CERT_KEY_FILE"].endswith("c.key") and env["KOA_GRPC_TARGET"] == "grpcs://127.0.0.1:7443"


def test_images_are_read_once_from_the_folder(tmp_path: Path) -> None:
    assert [i.name for i in load_images(ROOT / "tests" / "fixtures")] == ["knee_kl2.png", "knee_kl2_prepared.png"]
    with pytest.raises(RuntimeError, match="no .png"):
        load_images(tmp_path)


# --- a short run against a real TorchServe ------------------------------------------------------------------------


@pytest.mark.server  # needs Java: skipped without it, failed under CI=true (tests/conftest.py)
@pytest.mark.slow
def test_loadtest_run_against_a_private_server(archive: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "ts"
    out = tmp_path / "reports"
    ts.start_on_free_ports(archive, workdir)
    try:
        # --workdir: run.py finds the running server there (its config and key file), as with `make serve`.
        cmd = [sys.executable, "-m", "loadtest.run", "--workdir", str(workdir), "--users", "2",
               "--rate", "2", "--duration", "4s", "--explain-share", "0.2", "--loglevel", "WARNING",
               "--out", str(out)]  # fmt: skip
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180)
    finally:
        ts.stop(workdir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = [p for p in out.iterdir() if p.is_dir() and not p.is_symlink()]
    assert len(runs) == 1
    run = runs[0]
    assert (out / "latest").is_symlink() and (out / "latest").resolve() == run.resolve()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["config"]["private_server"] is False and summary["config"]["users"] == 2
    for protocol in ("rest", "grpc"):
        s = summary[protocol]
        assert s["requests"] > 0 and s["failures"] == 0, s
        assert s["requests_per_s"] > 0 and 0 < s["p50_ms"] <= s["p95_ms"] <= s["p99_ms"], s
        for name in (f"{protocol}_stats.csv", f"{protocol}_failures.csv", f"{protocol}.html"):
            assert (run / name).stat().st_size > 0, name
        # Percentiles from every request's time, not Locust's rounded ones.
        times = (run / f"{protocol}_latencies.txt").read_text().split()
        assert s["percentiles"] == "exact" and len(times) == s["requests"], (len(times), s)


def test_exact_percentiles_are_nearest_rank() -> None:
    times = [float(t) for t in range(100, 0, -1)]  # 1..100 ms, in any order
    assert loadtest_run.exact_percentiles(times) == {"p50_ms": 50.0, "p95_ms": 95.0, "p99_ms": 99.0}
    assert loadtest_run.exact_percentiles([231.4, 118.2]) == {"p50_ms": 118.2, "p95_ms": 231.4, "p99_ms": 231.4}


def test_summary_takes_percentiles_from_the_request_times_when_there_are_any(tmp_path: Path) -> None:
    header = "Type,Name,Request Count,Failure Count,Average Response Time,Max Response Time,Requests/s,50%,95%,99%"
    (tmp_path / "rest_stats.csv").write_text(f"{header}\nPOST,rest predict,3,0,160,243,1.5,120,240,240\n"
                                             f",Aggregated,3,0,160,243,1.5,120,240,240\n")  # fmt: skip
    rounded = loadtest_run.protocol_summary(tmp_path, "rest")
    assert rounded["percentiles"] == "locust" and (rounded["p50_ms"], rounded["p99_ms"]) == (120.0, 240.0)
    (tmp_path / "rest_latencies.txt").write_text("118.2\n243.0\n124.9\n")
    exact = loadtest_run.protocol_summary(tmp_path, "rest")
    assert exact["percentiles"] == "exact" and (exact["p50_ms"], exact["p99_ms"]) == (124.9, 243.0)
    assert exact["requests"] == 3 and exact["requests_per_s"] == 1.5
