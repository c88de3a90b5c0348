"""The benchmarks' own logic, without running a benchmark."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from ops.bench.report import table
from ops.bench.sweep import choose


def row(batch: int, delay: int, rps: float) -> dict:
    return {"batch": batch, "delay_ms": delay, "rps": rps}


def test_the_shortest_delay_wins_among_settings_near_the_best():
    sweep = [row(8, 50, 83.7), row(16, 10, 87.5), row(16, 50, 83.6), row(16, 100, 89.6)]
    assert choose(sweep) == row(16, 10, 87.5)  # 100 ms is 2% faster: noise, paid by every idle request


def test_a_clearly_faster_setting_wins_despite_a_longer_delay():
    sweep = [row(8, 10, 80.0), row(16, 50, 92.0)]
    assert choose(sweep) == row(16, 50, 92.0)


def test_ratios_keep_two_decimals():
    text = table([{"round": 1, "rest_rps": 88.04, "ratio": 0.8949}], ["round", "rest_rps", "ratio"])
    assert text.splitlines()[-1] == "| 1 | 88.0 | 0.89 |"


def test_paired_rounds_go_through_every_order_of_the_three_legs():
    from ops.bench.sweep import ROUND_LEGS, ROUND_ORDERS

    assert sorted(ROUND_ORDERS) == sorted(itertools.permutations(ROUND_LEGS))
    for position in range(len(ROUND_LEGS)):  # each leg runs first, second and third equally often
        assert Counter(order[position] for order in ROUND_ORDERS) == dict.fromkeys(ROUND_LEGS, 2)


def test_cpu_per_request_takes_each_protocols_median_over_the_rounds():
    from ops.bench.sweep import cpu_per_request, cpu_table

    def cpu(leg: str, rps: float, workers: float, java: float, gen: float) -> dict:
        return {f"{leg}_cpu": cpu_per_request(leg, rps, {"workers": workers, "java": java, "load_generator": gen})}

    rounds = [
        {**cpu("rest", 100.0, 1.8, 0.05, 0.02), **cpu("grpc", 90.0, 1.7, 0.09, 0.04)},
        {**cpu("rest", 80.0, 1.2, 0.04, 0.02), **cpu("grpc", 100.0, 1.8, 0.1, 0.04)},
        {**cpu("rest", 90.0, 1.8, 0.09, 0.03), **cpu("grpc", 80.0, 1.6, 0.08, 0.03)},
    ]
    shipped = cpu_per_request("rest-requests", 50.0, {"workers": 0.9, "java": 0.05, "load_generator": 0.05})
    rest, grpc, last = cpu_table(rounds, [shipped])
    assert [rest["client"], grpc["client"], last] == ["REST", "gRPC", shipped]
    assert rest["rps"] == 90.0 and grpc["rps"] == 90.0
    assert rest["cpu_ms_workers"] == pytest.approx(18.0)  # 18.0, 15.0, 20.0 ms: the median, not the mean
    assert rest["cpu_ms_java"] == pytest.approx(0.5)  # 0.5, 0.5, 1.0
    assert grpc["cores_java"] == pytest.approx(0.09)
    assert shipped["cpu_ms_load_generator"] == pytest.approx(1.0)


def test_the_tail_benchmark_defaults_to_the_shipped_batching(tmp_path):
    from ops.bench.tail import get_args_parser, shipped_setting

    config = tmp_path / "config.properties"
    config.write_text('job_queue_size=100\nmodels={"oamen": {"1.0": {"batchSize": 8, "maxBatchDelay": 50}}}\n')
    assert shipped_setting(config) == "8x50"
    shipped = shipped_setting()  # the repository's config.properties
    assert get_args_parser().parse_args([]).settings == shipped
    assert shipped.split("x")[0].isdigit() and shipped.split("x")[1].isdigit()
    config.write_text("job_queue_size=100\n")
    with pytest.raises(ValueError, match="no models= line"):
        shipped_setting(config)


def test_the_jit_warm_up_ends_only_when_both_protocols_have_settled():
    from ops.bench.common import JIT_SETTLED_MS, jit_settled

    low, high = JIT_SETTLED_MS / 2, JIT_SETTLED_MS * 3
    assert jit_settled({"rest_jit_ms": low, "grpc_jit_ms": low})
    assert not jit_settled({"rest_jit_ms": low, "grpc_jit_ms": high})  # gRPC's path compiles longer
    assert not jit_settled({"rest_jit_ms": high, "grpc_jit_ms": low})
    assert not jit_settled({"rest_jit_ms": low, "grpc_jit_ms": float("inf")})  # no answer at all: not warm


def test_jit_seconds_reads_the_compiler_threads_of_a_java_process(tmp_path):
    import os
    import subprocess
    import time

    from ops.bench.common import jit_seconds
    from tests.conftest import require_java

    assert jit_seconds(os.getpid()) == 0.0  # Python has no compiler threads
    assert jit_seconds(2**22 + 1) == 0.0  # no such process: 0, not an error
    java = require_java()  # skips without Java, fails in CI
    # A JVM running a hot loop for 3 s: its C1/C2 compiler threads must be found, with CPU time.
    source = tmp_path / "Hot.java"
    source.write_text(
        "class Hot { public static void main(String[] a) { long s = 0, t = System.nanoTime();"
        " while (System.nanoTime() - t < 3_000_000_000L) { for (int i = 0; i < 100000; i++) s += i * 31L ^ s; }"
        " System.out.println(s); } }"
    )
    proc = subprocess.Popen([java, str(source)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while jit_seconds(proc.pid) == 0.0 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert jit_seconds(proc.pid) > 0.0
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_the_tail_summary_counts_the_latest_named_model_at_its_setting() -> None:
    from ops.bench.report import tail_report

    def sweep(name, model, setting, ratios):
        b, d = (int(v) for v in setting.split("x"))
        proto = {"requests_per_s": 40.0, "p50_ms": 100.0, "p99_ms": 100.0 * ratios[0], "p99_over_p50": ratios[0]}
        grpc = {**proto, "p99_ms": 100.0 * ratios[1], "p99_over_p50": ratios[1]}
        row = {"run": 1, "batch": b, "delay_ms": d, "workers": 1, "capacity_rps": 50.0, "rest": proto, "grpc": grpc}
        return {"sweep": name, **({"model": model} if model else {}), "config": {"settings": setting,
                "duration": "180s"}, "rows": [row]}  # fmt: skip

    sweeps = [
        sweep("old", None, "8x10", (3.0, 3.0)),  # another model at the same setting: not counted
        sweep("a", "m 1", "16x10", (1.5, 1.5)),  # the same model at another setting: not counted
        sweep("b", "m 1", "8x10", (1.8, 2.3)),
        sweep("c", "m 1", "8x10", (1.9, 1.7)),
    ]
    text = tail_report(sweeps)
    assert "At the shipped setting (batch 8, 10 ms, one worker) with the shipped model (m 1)" in text
    assert "held in 2 of 2 runs over REST and 1 of 2 over gRPC" in text
    assert "| c | 1 | 8 | 10 | 1 | 180s | 50.0 | 40.0 | 100 / 190 | **1.9** |" in text


def test_the_bench_command_lists_its_benchmarks_on_help(capsys) -> None:
    from ops.bench import SUBCOMMANDS
    from ops.bench.__main__ import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SUBCOMMANDS), out
    assert main([]) == 2 and "usage" in capsys.readouterr().err
