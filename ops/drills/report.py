"""Markdown of the drills' results, as pure functions of a result's JSON (rendered into docs/DEPLOY.md and
docs/RELIABILITY.md by `ops.render_docs`)."""

from __future__ import annotations

from typing import Any


def _f(x: float | None, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def replicas_section(result: dict[str, Any] | None) -> str:
    """The drill's figures (docs/results/drill_replicas.json), or a line saying they are not measured yet."""
    if result is None:
        return "Not measured yet: `make drill-replicas` writes them."
    lines = [
        f"Measured by `make drill-replicas` on {result['started']}, {result['cpu_count']} cores, "
        f"from [results/drill_replicas.json](results/drill_replicas.json).",
        "",
    ]
    if result.get("throughput"):
        lines += [
            "Throughput through the balancer (closed-loop Locust users on the same cores, REST and gRPC half each, "
            "the shipped clients, every answer checked):",
            "",
            "| round | replicas | torch threads each | users | req/s | REST req/s | gRPC req/s | lost | start-up s | "
            "cores: replicas | Locust | other jobs | req/s per replica core |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in result["throughput"]:
            cpu = row.get("cpu", {})
            lines.append(
                f"| {row.get('round', 1)} | {row['replicas']} | {row.get('threads_per_replica', '-')} | "
                f"{row['users']} | {_f(row['rps'])} | "
                f"{_f(row['rps_by_protocol']['rest'])} | "
                f"{_f(row['rps_by_protocol']['grpc'])} | {row['lost']} | {row['start_s']:.0f} | "
                f"{_f(cpu.get('cluster_cores'), '.2f')} | {_f(cpu.get('load_generator_cores'), '.2f')} | "
                f"{_f(cpu.get('other_cores'), '.2f')} | "
                f"{_f(row['rps'] / cpu['cluster_cores'] if row['rps'] and cpu.get('cluster_cores') else None)} |"
            )
        lines += [
            "",
            "`other jobs`: cores used by processes outside the drill during the run (this machine is shared); "
            "a run where they are not near 0 measured the contention, not the replicas.",
            "",
        ]
    ph = result["phases"]
    lines += [
        f"The drill ({result['replicas']} replicas, {result['users']} users, {result['seconds']:.0f} s, client "
        f"`retry_s` {result['retry_s']:.0f} s): replica {result['killed']['replica']}'s Java and worker SIGKILLed "
        f"at {result['killed']['at_s']:.0f} s, started again {result['config']['down_s']:.0f} s later.",
        "",
        "| requests | failures (attempts) | resent | **lost** | wrong | marked down after | ready after | "
        "**recovery_s** | longest gap without an answer |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {result['requests']} | {result['failures']} | {result['resent']} | **{result['lost']}** | "
        f"{result['wrong']} | {result['marked_down_s']:.1f} s | {_f(result['ready_s'])} s | "
        f"**{result['recovery_s']:.1f}** | {result['longest_gap_s']:.2f} s |",
        "",
        f"Answered requests/s: {_f(ph['before_kill_rps'])} before the kill, {_f(ph['one_replica_rps'])} while one "
        f"replica served alone, {_f(ph['after_recovery_rps'])} after; the restarted replica answered "
        f"{result['answered_by_restarted_replica']} requests once back. Failed attempts by kind: "
        + (", ".join(f"{k} {v}" for k, v in sorted(result["failed_attempts_by_kind"].items())) or "none")
        + "."
        + (
            f" Other jobs used {result['cpu']['other_cores']:.2f} cores on average during the drill."
            if "cpu" in result
            else ""
        ),
    ]
    return "\n".join(lines)


def soak_section(result: dict[str, Any], link: str) -> str:
    """A soak's figures (`ops.drills.soak`): requests, failures and the memory measures."""
    c, w, j, heap = result["config"], result["worker"], result["java"], result["java_live_heap"]
    when = f" on {result['started']}" if "started" in result else ""
    lines = [
        f"`python -m ops.drills.soak --minutes {c['minutes']:g} --clients {c['clients']}`{when} "
        f"({100 * c['explain_share']:.0f}% explanations; [{link}]({link})):",
        "",
        "| measure | after warm-up | last | peak | growth | peak growth |",
        "|---|---|---|---|---|---|",
        f"| Python worker RSS | {w['baseline_mb']} MB | {w['last_mb']} MB | {w['peak_mb']} MB | "
        f"**{w['growth_pct']}%** | {w['peak_growth_pct']}% |",
        f"| Java frontend RSS | {j['baseline_mb']} MB | {j['last_mb']} MB | {j['peak_mb']} MB | "
        f"{j['growth_pct']}% | {j['peak_growth_pct']}% |",
        f"| Java live heap ({heap['collections']} collections) | {heap['first_mb']:g} MB | {heap['last_mb']:g} MB | "
        f"| **{heap['growth_pct']}%** | |",
        "",
        f"{result['requests']} requests, **{result['failures']} failures**, {result['rps']:.1f} req/s on average, "
        f"{len(result.get('worker_pids', [])) or 'one'} worker process(es) throughout; the committed Java heap went "
        f"from {heap['committed_first_mb']:g} to {heap['committed_last_mb']:g} MB. Target: growth within "
        f"{c['target']:g}%; {'met' if result['passed'] else 'missed'}.",
    ]
    return "\n".join(lines) + "\n"


def drill_table(result: dict[str, Any], keys: list[str], command: str, link: str) -> str:
    """A fault drill's figures (`ops.drills.kill_worker`, `ops.drills.restart`) as a measure / value table."""
    rows = [f"| {k} | {result.get(k)} |" for k in keys if k in result]
    when = f" on {result['finished']}" if "finished" in result else ""
    m = result.get("machine")
    where = f", {m['cores']} cores, 1-minute load average {m['loadavg_1min_at_end']} at the end" if m else ""
    head = f"`{command}`{when}{where} ([{link}]({link})):"
    return "\n".join([head, "", "| measure | value |", "|---|---|", *rows]) + "\n"
