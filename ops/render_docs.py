"""Render the measured sections of the docs from committed JSON results.

``python -m ops.render_docs`` rewrites, in place, every block of the form

    <!-- generated: NAME -->
    ...
    <!-- end generated -->

in README.md and docs/*.md with what the renderer NAME makes of its committed result in docs/results/
(`RENDERERS`). ``--check`` rewrites nothing and exits 1 when a block differs from its result:
tests/test_docs.py runs it, so a doc cannot quote a figure its result does not hold. A result that is
not committed renders as a line saying so. The model card is generated whole by `ops.model_card` and
checked the same way there.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ops.bench.door import door_report
from ops.bench.report import (
    explain_report,
    gate_report,
    loadtest_report,
    logging_report,
    malloc_report,
    precision_report,
    sizing_section,
    sweep_report,
    tail_report,
)
from ops.drills.report import drill_table, not_kept, replicas_section, soak_section
from ops.explain_report import explain_eval_report, explain_time_report
from ops.gpu_report import compare_report, throughput_report
from ops.monitor_report import bench_metrics_report, drift_choice_report, drill_drift_report
from ops.results import DOC_RESULTS, ROOT
from ops.settings import render_settings
from ops.site_docs import site_calibration_report

RESULTS = DOC_RESULTS
BLOCK = re.compile(r"(<!-- generated: (?P<name>[a-z_]+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)


def _load(name: str) -> Any:
    return json.loads((RESULTS / name).read_text())


def _maybe(name: str) -> Any | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def _or_not_kept(name: str, what: str, command: str, render: Callable[[Any], str]) -> Callable[[], str]:
    def renderer() -> str:
        result = _maybe(name)
        return not_kept(what, command, name) if result is None else render(result)

    return renderer


KILL_KEYS = [
    "clients", "requests", "in_flight_at_kill", "failed", "failed_in_flight", "failed_not_in_flight",
    "failure_statuses", "new_pid_seen_s", "ready_after_kill_s", "first_ok_after_kill_s", "requests_after_recovery",
    "failed_after_recovery", "passed",
]  # fmt: skip
RESTART_KEYS = [
    "requests", "by_protocol", "spanning_the_restart", "lost", "wrong", "connections_reset",
    "failed_attempts_by_error", "resent_then_answered", "stop_s", "start_s", "longest_request_s", "passed",
]  # fmt: skip

GPU_RUN = "bash scripts/gpu_run.sh on the GPU machine, then python -m ops.gpu_report collect (docs/RESULTS.md)"

RENDERERS: dict[str, Callable[[], str]] = {
    "site_calibration": _or_not_kept(
        "site_calibration.json", "the site calibration on site2", "make site-study", site_calibration_report
    ),
    "gpu_compare": _or_not_kept("gpu_run.json", "the GPU comparison", GPU_RUN, compare_report),
    "gpu_throughput": _or_not_kept("gpu_run.json", "the GPU throughput", GPU_RUN, throughput_report),
    "bench_sweep": lambda: sweep_report(_load("bench_sweep.json")),
    "bench_tail": lambda: tail_report(_load("bench_tail.json")),
    "bench_explain": lambda: explain_report(_load("bench_explain.json")),
    "bench_gate": lambda: gate_report(_load("bench_gate.json")),
    "explain_eval": _or_not_kept(
        "explain_eval.json", "the explanation methods", "python -m ops.explain_eval", explain_eval_report
    ),
    "explain_time": _or_not_kept(
        "explain_time.json", "the explanation times", "python -m ops.explain_eval --time-only", explain_time_report
    ),
    "bench_precision": _or_not_kept(
        "bench_precision.json", "float32 against bfloat16", "make bench-precision", precision_report
    ),
    "sizing": lambda: sizing_section(_load("bench_sweep.json")) + "\n",
    "replicas": lambda: replicas_section(_maybe("drill_replicas.json")) + "\n",
    "soak": lambda: soak_section(_load("soak.json"), "results/soak.json"),
    "soak_saturation": lambda: soak_section(_load("soak_saturation.json"), "results/soak_saturation.json"),
    "loadtest": _or_not_kept(
        "loadtest.json",
        "the saturating Locust runs",
        "make loadtest USERS=32 DURATION=300s; cp reports/loadtest/latest/summary.json docs/results/loadtest.json",
        loadtest_report,
    ),
    "bench_door": _or_not_kept("bench_door.json", "the cost of the TLS door", "make bench-door", door_report),
    "bench_malloc": _or_not_kept("bench_malloc.json", "the malloc comparison", "make bench-malloc", malloc_report),
    "bench_logging": _or_not_kept("bench_logging.json", "the logging comparison", "make bench-logging", logging_report),
    "kill_worker": _or_not_kept(
        "drill_kill_worker.json",
        "the worker killed under load",
        "python -m ops.drills.kill_worker --publish docs/results/drill_kill_worker.json",
        lambda r: drill_table(r, KILL_KEYS, "python -m ops.drills.kill_worker", "results/drill_kill_worker.json"),
    ),
    "restart": _or_not_kept(
        "drill_restart.json",
        "the restart under load",
        "python -m ops.drills.restart --publish docs/results/drill_restart.json",
        lambda r: drill_table(r, RESTART_KEYS, "python -m ops.drills.restart", "results/drill_restart.json"),
    ),
    # docs/MONITORING.md
    "drift_choice": _or_not_kept("drift_choice.json", "the drift choice", "make drift-reference", drift_choice_report),
    "drill_drift": _or_not_kept("drill_drift.json", "the drift drill", "make drill-drift", drill_drift_report),
    "bench_metrics": _or_not_kept("bench_metrics.json", "the metrics cost", "make bench-metrics", bench_metrics_report),
    # docs/OPERATIONS.md: rendered from the code (ops.settings), not from a result
    "settings": render_settings,
}


def render(text: str) -> str:
    def block(m: re.Match) -> str:
        name = m.group("name")
        if name not in RENDERERS:
            raise KeyError(f"no renderer {name!r}; known: {sorted(RENDERERS)}")
        return m.group(1) + RENDERERS[name]() + m.group(4)

    return BLOCK.sub(block, text)


def docs() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 when a generated block differs from its result")
    args = p.parse_args(argv)
    stale = []
    for path in docs():
        text = path.read_text()
        new = render(text)
        if new != text:
            stale.append(path)
            if not args.check:
                path.write_text(new)
    verb = "differ from their results" if args.check else "rewritten"
    for path in stale:
        print(f"{path.relative_to(ROOT)}: generated blocks {verb}")
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
