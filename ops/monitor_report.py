"""The monitoring figures of docs/MONITORING.md, rendered from their committed results (`ops.render_docs`):
the choice of drift window and threshold (docs/results/drift_choice.json), the drift drill
(docs/results/drill_drift.json) and the cost of the metrics (docs/results/bench_metrics.json).
"""

from __future__ import annotations

from typing import Any

__all__ = ["drift_choice_report", "drill_drift_report", "bench_metrics_report"]


def _knees(s: dict[str, Any]) -> str:
    if s["median"] is None:
        return "never"
    worst = "not in every stream" if s["max"] is None else f"at most {s['max']}"
    never = f", never in {s['never']} of {s['streams']}" if s["never"] else ""
    return f"median {s['median']:.0f}, {worst}{never}"


def drift_choice_report(r: dict[str, Any]) -> str:
    ref, chosen, st = r["reference"], r["chosen"], r["settings"]
    lines = [
        f"`make drift-reference` (`python -m ops.drift_reference`, result `docs/results/drift_choice.json`), "
        f"{ref['model_name']} {ref['model_version']}: {r['val_knees']} val knees, {r['site2_knees']} knees of the "
        f"second hospital ({r['site2_refused_share']:.0%} of them refused today: "
        + ", ".join(f"{k} {v}" for k, v in r["site2_refusals"].items())
        + f"). Quiet streams: {st['streams']} random streams of {st['stream_knees']} val knees per window, the "
        f"reference measured on the other half of val's patients; threshold = {st['margin']} x the largest "
        f"score they reached. Second hospital: {st['streams'] // 4} random orders after a window of val knees.",
        "",
        "| window (knees) | threshold (PSI) | largest quiet score, held-out half | largest quiet score, all val "
        "| in-sample streams over it | second hospital: knees to cross | its graded knees only "
        "| its grades only (with replacement) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in r["candidates"]:
        mark = "**" if (c["window"], c["threshold"]) == (chosen["window"], chosen["threshold"]) else ""
        lines.append(
            f"| {mark}{c['window']}{mark} | {mark}{c['threshold']}{mark} | {c['quiet_max_held_out']} "
            f"| {c['quiet_max_in_sample']} | {c['fired_in_sample']} | {_knees(c['site2_knees_to_fire'])} "
            f"| {_knees(c['site2_graded_only_knees_to_fire'])} | {_knees(c['site2_grades_only_knees_to_fire'])} |"
        )
    lines += [
        "",
        f"Chosen: a window of **{chosen['window']} knees** and an overall threshold of **{chosen['threshold']}** "
        f"(of the windows where all the second hospital's knees, and its graded knees alone, crossed within "
        f"{st['target']} knees in every order, the one that caught its grades alone most often, then soonest). "
        "The whole second hospital against the reference scores: "
        + ", ".join(f"{k} {v}" for k, v in r["site2_scores_all"].items())
        + ".",
    ]
    return "\n".join(lines) + "\n"


def drill_drift_report(r: dict[str, Any]) -> str:
    def when(x: dict[str, Any] | None) -> str:
        if not x:
            return "never"
        knees, seconds = x["site2_knees_answered"], x["seconds_after_switch"]
        return f"after {knees} knees of the second hospital, {seconds:.0f} s after the switch"

    hooks = sorted({f"{a['alertname']} {a['status']}" for a in r.get("webhook_alerts", [])})
    quiet = (
        "quiet (never pending, never firing)"
        if r["quiet_before_switch"]
        else "NOT quiet: " + ", ".join(r["states_before_switch"])
    )
    before = [v for t, v in r["overall_score"] if t < r["switch_at_s"]]
    if before:
        quiet += f"; the overall score peaked at {max(before)} (threshold {r['threshold']})"
    ok_val = ", ".join(f"{n} x {code}" for code, n in sorted(r["answers"]["val"].items()))
    ok_site = ", ".join(f"{n} x {code}" for code, n in sorted(r["answers"]["site2"].items()))
    return (
        f"`make drill-drift` (`python -m ops.drills.drift`, result `docs/results/drill_drift.json`): "
        f"{r['val_knees']} val knees in {r['seconds_val']:.0f} s, then {r['site2_knees']} knees of the second "
        f"hospital (of {r['site2_knees_available']}; none once the alert fired) in {r['seconds_site2']:.0f} s, "
        "through TorchServe with Prometheus scraping it every 5 s "
        f"(answers by HTTP status: val {ok_val}, second hospital {ok_site}).\n\n"
        f"- During the val knees: {quiet}.\n"
        f"- `{r['alert']}` pending {when(r['pending'])}; firing {when(r['firing'])} "
        f"(threshold {r['threshold']}).\n"
        f"- The webhook received: {', '.join(hooks) if hooks else 'nothing'}.\n"
        f"- The knees of the second hospital refused: {r['answers']['site2'].get('422', 0)} of {r['site2_knees']}.\n"
    )


def bench_metrics_report(r: dict[str, Any]) -> str:
    rounds = r["rounds"]
    return (
        f"`make bench-metrics` (`python -m ops.bench metrics`, result `docs/results/bench_metrics.json`), "
        f"{r['model']}, batches of {r['batch']} val knees in process. The telemetry alone (timers, drift "
        f"features, the window's scores, TorchServe's metric lines) takes **{r['telemetry_cpu_ms_per_batch']} ms "
        f"of CPU per batch**, {r['telemetry_cpu_share']:.1%} of the {r['plain_cpu_ms_per_batch']:.0f} ms the "
        f"plain request path took per batch in the same run. Throughput in {len(rounds)} alternating rounds of "
        f"{r['images_per_leg']} images per leg: observed / plain {r['median_ratio']:.3f}x (median; rounds "
        f"{r['min_ratio']:.3f}x to {r['max_ratio']:.3f}x; plain {min(x['plain'] for x in rounds)}-"
        f"{max(x['plain'] for x in rounds)} images/s). These legs cannot resolve a cost this small here: the "
        f"machine ran four other jobs (load average {r['load_average_at_end'][0]} at the end), a batch took "
        "seconds of CPU instead of a fraction of one, and rounds scattered by a third. A served `make bench` "
        "before and after, on a quiet machine, is still to be run.\n"
    )
