"""Markdown of the benchmarks' results, as pure functions of a result's JSON.

The docs quote results only through these: `ops.render_docs` renders them into docs/BENCHMARKS.md, DEPLOY.md
(sizing) and SECURITY.md (the door) from docs/results/, so a doc and its committed result cannot disagree.
"""

from __future__ import annotations

import statistics
from typing import Any

from model.settings import PRECISION
from ops.markdown import md_table

# Planning load of one replica: the fraction of its saturated throughput at which the tail latency was
# measured (make bench-tail, docs/BENCHMARKS.md), against a queue without end at saturation.
PLANNING_FRACTION = 0.8

# column names containing one of these are shown with two decimals
TWO_DECIMALS = ("vs_in_process", "ratio", "cores_", "grpc_over", "cpu_ms", "jit_ms")


def cell(col: str, value: Any) -> str:
    if not isinstance(value, float):
        return str(value)
    return f"{value:.2f}" if any(k in col for k in TWO_DECIMALS) else f"{value:.1f}"


def table(rows: list[dict], cols: list[str]) -> str:
    """A Markdown table of the dicts ``rows`` with the columns ``cols``, each cell shown as `cell` says."""
    return md_table(cols, ([cell(c, r[c]) for c in cols] for r in rows))


def sweep_report(result: dict[str, Any]) -> str:
    """The measured sections of docs/BENCHMARKS.md from a `make bench` result (`ops.bench.sweep`)."""
    m = result["meta"]
    inproc = {int(k): v for k, v in result["in_process"].items()}
    sweep, warm, rounds, cpu_rows = (
        result["sweep"],
        result["jit_warm_up"],
        result["paired_rounds"],
        result["cpu_per_request"],
    )
    curves, idle = result["curves"], result["idle_ms"]
    b, d = result["chosen"]["batch"], result["chosen"]["delay_ms"]
    near = min(inproc, key=lambda k: abs(k - b))
    pipe = inproc[near][f"pipeline_ips_b{near}"]
    paired, paired_grpc = result["paired_ratio_median"], result["paired_grpc_over_rest_median"]
    model_b1_ms = 1000 / inproc[1]["model_ips_b1"]
    settled = warm[-1]["rest_jit_ms"] < m["jit_settled_ms"] and warm[-1]["grpc_jit_ms"] < m["jit_settled_ms"]
    round_ratios = ", ".join(f"{r['ratio']:.2f}" for r in rounds)
    best_rest = max(curves["rest"], key=lambda r: r["rps"])
    best_grpc = max(curves["grpc"], key=lambda r: r["rps"])
    lines = [
        f"Measured by `make bench` (`python -m ops.bench sweep`, result [results/bench_sweep.json]"
        f"(results/bench_sweep.json)) on {m['started']} with {m['model']}, in one run on one machine: "
        f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['torch_threads']} torch threads "
        f"in-process, worker threads `KOA_TORCH_THREADS`={m['worker_threads']}, {m['images']} knee PNGs from val, "
        f"{m['seconds']:.0f} s per point after a 3 s ramp. Load generator, Java frontend and worker share the "
        f"same {m['cores']} cores, as in CI. These machines are shared and noisy: read the ratios, not the absolute "
        "figures.",
        "",
        "These are CPU figures. The GPU ones (an H200 on 2026-11-30: the model alone and the request path, "
        "float32 and bfloat16, channels_last, CUDA graphs) are in [RESULTS.md](RESULTS.md).",
        "",
        "## In-process (no server)",
        "",
        "| batch | model only (img/s) | handler request path (img/s) | PNG decode (ms/img) | preprocessing (ms/img) "
        "| decode share | preprocessing share |\n"
        "|---|---|---|---|---|---|---|\n"
        + "\n".join(
            f"| {k} | {r[f'model_ips_b{k}']:.1f} | {r[f'pipeline_ips_b{k}']:.1f} | {r['decode_ms_per_image']:.2f} "
            f"| {r['prep_ms_per_image']:.2f} | {100 * r[f'decode_share_b{k}']:.1f}% "
            f"| {100 * r[f'prep_share_b{k}']:.1f}% |"
            for k, r in inproc.items()
        ),
        "",
        "The request path is decode + preprocess + batch + model, exactly what the handler runs. The shares are "
        "each part's time per image over the request path's time per image. Preprocessing is OA-MEN's "
        "(`model.preprocess`: Gaussian denoising, Laplacian enhancement, histogram equalisation, padding, "
        "normalisation), the target's subject (<= 10%); decoding the PNG upload, timed apart, is mostly zlib "
        "inflate and would be paid by any service that accepts PNGs.",
        "",
        "## Batching sweep (REST, clients = 2 x batch, at least 4)",
        "",
        "`vs_in_process`: served requests/s over the in-process request path at the nearest measured batch "
        "(1, 8 or 16).",
        "",
        table(
            sweep, ["batch", "delay_ms", "clients", "rps", "p50_ms", "p95_ms", "p99_ms", "failures", "vs_in_process"]
        ),
        "",
        f"Chosen for `config.properties`: batch {b}, max batch delay {d} ms: the shortest delay among the settings "
        f"within {100 * (1 - m['near_best']):.0f}% of the highest throughput, then the highest throughput. "
        "Differences that small are run-to-run noise here, while the delay is paid by every request at low load.",
        "",
        "## Frontend warm-up (JIT)",
        "",
        "TorchServe's Java frontend is compiled by the JIT while it serves: in the first minutes of load the "
        "compiler threads take CPU from the same cores as the model, and gRPC's request path (Netty HTTP/2, "
        "protobuf, the gRPC executor) takes longer to compile than REST's. Before the tables below, REST and gRPC "
        f"were driven in turn ({max(4, 2 * b)} clients, {m['seconds']:.0f} s each) until the JIT spent under "
        f"{m['jit_settled_ms']} ms of CPU per request on both (`ops.bench.serve.warm_up_jit`), so they measure "
        "the server as it runs for hours, not as it starts:",
        "",
        table(warm, ["pass", "rest_rps", "rest_jit_ms", "grpc_rps", "grpc_jit_ms"]),
        "",
        "`*_jit_ms`: CPU milliseconds of Java's compiler threads per answered request in that leg. "
        + (
            f"Settled after {len(warm)} passes "
            f"({len(warm) * 2 * (m['seconds'] + m['ramp_s']) / 60:.1f} minutes of load)."
            if settled
            else f"Not settled after {len(warm)} passes: the tables below still include some JIT work."
        ),
        "",
        "## REST and gRPC against concurrency (chosen setting)",
        "",
        f"![throughput against concurrency]({m['plot']})",
        "",
        table(
            [
                {
                    "clients": r["clients"],
                    "rest_rps": r["rps"],
                    "rest_p50_ms": r["p50_ms"],
                    "rest_p99_ms": r["p99_ms"],
                    "grpc_rps": g["rps"],
                    "grpc_p50_ms": g["p50_ms"],
                    "grpc_p99_ms": g["p99_ms"],
                    "failures": r["failures"] + g["failures"],
                }
                for r, g in zip(curves["rest"], curves["grpc"])
            ],
            ["clients", "rest_rps", "rest_p50_ms", "rest_p99_ms", "grpc_rps", "grpc_p50_ms", "grpc_p99_ms", "failures"],
        ),  # fmt: skip
        "",
        "## Ratios",
        "",
        f"- REST served / in-process request path at batch {b}, paired rounds (below), median: "
        f"**{paired:.2f}** (target >= 0.90; rounds {round_ratios})",
        f"- the same from the concurrency table and the in-process table, taken minutes apart: "
        f"{best_rest['rps']:.1f} / {pipe:.1f} = {best_rest['rps'] / pipe:.2f}",
        f"- gRPC / REST at {2 * b} clients, paired rounds, median: **{paired_grpc:.2f}** (target >= 1; rounds "
        + ", ".join(f"{r['grpc_over_rest']:.2f}" for r in rounds)
        + ")",
        f"- gRPC / REST at saturation from the concurrency table (minutes apart): {best_grpc['rps']:.1f} / "
        f"{best_rest['rps']:.1f} = {best_grpc['rps'] / best_rest['rps']:.2f}",
        f"- idle single-request latency (REST): {idle:.0f} ms against model time at batch 1 ({model_b1_ms:.0f} ms) "
        f"+ max batch delay ({d} ms) + 20 ms = {model_b1_ms + d + 20:.0f} ms",
        "",
        f"### Paired rounds (batch {b}, max delay {d} ms, {2 * b} clients)",
        "",
        f"Each round measures the in-process request path, REST and gRPC, {m['round_seconds']:.0f} s each (the "
        "served legs after a 3 s ramp), one right after the other; the rounds go through all six orders of the "
        "three, so all see the same machine and a drift favours none. The targets are judged on the median "
        "ratios. REST is driven by a minimal keep-alive `http.client` driver (`ops.load.HttpDriver`), gRPC by "
        "a `grpc.aio` driver on one channel (`ops.load.GrpcAioDriver`): the two cost the load generator about "
        "the same CPU per request (table below), so neither protocol pays more for its client on the shared "
        "cores. Every answer is validated against the answer schema.",
        "",
        table(
            rounds,
            ["round", "order", "in_process_ips", "rest_rps", "grpc_rps", "ratio", "grpc_over_rest"],
        )
        .replace("| ratio |", "| served / in-process |")
        .replace("| grpc_over_rest |", "| gRPC / REST |"),
        "",
        "### Where the CPU goes per request (same rounds)",
        "",
        "Medians over the rounds; the last two rows are one run each with the shipped clients "
        "(`koa_client.rest.RestClient` on requests, `koa_client.grpc_client.GrpcClient`, synchronous, "
        "its threads sharing one channel) at the same setting, right after the rounds.",
        "",
        table(
            cpu_rows,
            ["client", "rps", "cpu_ms_workers", "cpu_ms_java", "cpu_ms_java_jit", "cpu_ms_load_generator"]
            + ["cores_workers", "cores_java", "cores_load_generator"],
        ),
        "",
        f"`cpu_ms_*`: CPU milliseconds per answered request (`java_jit`: the part of `java` spent by the JIT "
        f"compiler); `cores_*`: CPU time over wall time ({m['cores']} cores in all). The in-process path has "
        "every core; served, the worker gets what Java and the load "
        "generator leave. The load generator shares these cores only because the benchmark runs on one machine: "
        "a clinical system calling the server from elsewhere does not take its CPU from the worker.",
    ]
    return "\n".join(lines) + "\n"


def sizing_section(bench: dict[str, Any]) -> str:
    """The per-replica figures of a `make bench` result (docs/results/bench_sweep.json) that sizing starts
    from, and the rule."""
    rest = max(bench["curves"]["rest"], key=lambda r: r["rps"])
    grpc_row = max(bench["curves"]["grpc"], key=lambda r: r["rps"])
    cpu = next(r for r in bench["cpu_per_request"] if r["client"] == "REST")
    server_ms = cpu["cpu_ms_workers"] + cpu["cpu_ms_java"]
    plan = PLANNING_FRACTION * rest["rps"]
    chosen = bench["chosen"]
    return "\n".join(
        [
            f"From [results/bench_sweep.json](results/bench_sweep.json) (`make bench` with "
            f"{bench['meta']['model']}: one replica, one worker on {bench['meta']['cores']} cores, batch "
            f"{chosen['batch']}, {chosen['delay_ms']} ms delay):",
            "",
            "| figure | value |",
            "|---|---|",
            f"| one replica saturated, REST ({rest['clients']} clients) | {rest['rps']:.1f} req/s, "
            f"p50 {rest['p50_ms']:.0f} ms, p99 {rest['p99_ms']:.0f} ms |",
            f"| one replica saturated, gRPC ({grpc_row['clients']} clients) | {grpc_row['rps']:.1f} req/s |",
            f"| server CPU per request (worker + Java) | {server_ms:.1f} ms, i.e. "
            f"{1000 / server_ms:.0f} req/s per core |",
            f"| idle single-request latency | {bench['idle_ms']:.0f} ms |",
            f"| planning capacity per replica ({PLANNING_FRACTION:.0%} of saturation) | **{plan:.0f} req/s** |",
            "",
            f"Replicas for a peak of P requests/s: **ceil(P / {plan:.0f}) + 1** (the +1 keeps the peak served while "
            "one replica restarts, is drained for an update or fails). On a machine or pod with C cores for one "
            f"worker, scale the capacity by C / 2 as a first guess ({1000 / server_ms:.0f} req/s per core), then "
            "measure it there with `make bench`.",
        ]
    )


def explain_bench_report(d: dict[str, Any]) -> str:
    """The explanation benchmark (`make bench-explain`, `ops.bench.explain`)."""
    s = d["summary"]

    def legs(mode: str, key: str) -> str:
        return " / ".join(f"{v:.0f}" for v in s[mode][key]["legs"])

    plain = ("plain_p50_ms", "plain_p95_ms", "plain_p99_ms")
    rows = [
        *([k.split("_")[1], legs("before", k), legs("after", k)] for k in plain),
        ["explanations p50", legs("before", "explain_p50_ms"), legs("after", "explain_p50_ms")],
    ]
    table = md_table(["plain predictions", "before (two legs, ms)", "after (two legs, ms)"], rows)
    c = d["config"]
    return (
        f"`make bench-explain` (`python -m ops.bench explain`, result `docs/results/bench_explain.json`), serving "
        f"{d.get('model', 'a model it did not record')}: open-loop "
        f"REST load at {d['rate_rps']:.2f} requests/s, {100 * c['explain_share']:.0f}% of them asking for "
        f"{c['method'].upper()}, {c['rounds']} rounds of before (a batch answered at once) and after (plain "
        f"predictions answered before the batch's explanations) legs of {c['seconds']:.0f} s. Run beside: "
        f"{c.get('note') or 'nothing'}.\n\n" + table + "\n"
    )


def gate_report(d: dict[str, Any]) -> str:
    """What the knee gate costs (`python -m train.bench_gate`)."""
    lo, hi = d["gate_share_range"]
    return (
        f"`python -m train.bench_gate` (result `docs/results/bench_gate.json`), {d['model']}, batch {d['batch']}, "
        f"{len(d['rounds'])} alternating rounds: the request path (decode, "
        f"{'the knee-joint finder, ' if d.get('finder') else ''}preprocess, model"
        f"{' in ' + d['dtype'] if d.get('dtype') else ''}) takes "
        f"{d['ms_per_image_without_median']:.1f} ms per image without the knee gate and "
        f"{d['ms_per_image_with_median']:.1f} ms with it; the gate's share of the request path is "
        f"**{100 * d['gate_share_median']:.1f}%** (median; rounds {100 * lo:.1f}% to {100 * hi:.1f}%; target <= 15%"
        f"{'; a share below zero means the difference is within the run-to-run noise' if lo < 0 else ''}). "
        + flip_sentence(d)
        + "\n"
    )


def flip_sentence(d: dict[str, Any]) -> str:
    """What mirror averaging (the images and their mirrors in one pass) costs the request path of `gate_report`."""
    served = "averages the mirror (the figures above include it)" if d["flip_tta"] else "reads each image once"
    return (
        f"Read once, an image takes {d['ms_per_image_one_pass_median']:.1f} ms; with mirror averaging (each image and "
        f"its mirror in one batch) {d['ms_per_image_with_flip_median']:.1f} ms, {d['flip_cost_median']:.2f}x. The "
        f"measured model {served}."
    )


def tail_report(sweeps: list[dict[str, Any]]) -> str:
    """Every `make bench-tail` sweep kept (docs/results/bench_tail.json): capacity, rates, p50 / p99 and
    their ratio per protocol; the ratio is bold where it meets the target (p99 <= 2 x p50)."""

    def proto(s: dict[str, Any] | None) -> str:
        if not s:
            return "- | - | -"
        ratio = s.get("p99_over_p50")
        mark = f"**{ratio}**" if ratio is not None and ratio <= 2 else str(ratio)
        return f"{s['requests_per_s']:.1f} | {s['p50_ms']:.0f} / {s['p99_ms']:.0f} | {mark}"

    lines = [
        "| sweep | run | batch | delay ms | workers | per protocol | capacity req/s | REST req/s | REST p50 / p99 ms "
        "| REST p99/p50 | gRPC req/s | gRPC p50 / p99 ms | gRPC p99/p50 | failures |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    # The setting and model of the latest sweep that names its model: the runs counted below are the
    # ones at that setting with that model (earlier sweeps measured other models and settings).
    latest = next((sw for sw in reversed(sweeps) if sw.get("model")), None)
    if latest:
        model = latest["model"]
        b, d = (int(v) for v in str(latest["config"]["settings"]).split(",")[0].split("x")[:2])
        key = (b, d, 1)
    else:
        model, key = None, (16, 10, 1)
    met = {"rest": [0, 0], "grpc": [0, 0]}
    for sweep in sweeps:
        duration = sweep["config"]["duration"]
        for row in sweep["rows"]:
            rest, grpc = row.get("rest"), row.get("grpc")
            failures = sum((s or {}).get("failures") or 0 for s in (rest, grpc))
            lines.append(
                f"| {sweep['sweep']} | {row.get('run', 1)} | {row['batch']} | {row['delay_ms']} | "
                f"{row.get('workers') or 1} | {duration} | {row['capacity_rps']:.1f} | {proto(rest)} | {proto(grpc)} "
                f"| {failures} |"
            )
            shipped = (row["batch"], row["delay_ms"], row.get("workers") or 1) == key and sweep.get("model") == model
            for name, s in (("rest", rest), ("grpc", grpc)):
                if shipped and s and s.get("p99_over_p50") is not None:
                    met[name][0] += s["p99_over_p50"] <= 2
                    met[name][1] += 1
    return (
        "\n".join(lines)
        + f"\n\nAt the shipped setting (batch {key[0]}, {key[1]} ms, one worker)"
        + (f" with the shipped model ({model})" if model else "")
        + f", p99 <= 2 x p50 held in {met['rest'][0]} of {met['rest'][1]} runs over REST and "
        + f"{met['grpc'][0]} of {met['grpc'][1]} over gRPC."
        + (" Sweeps that do not name their model measured the model shipped before it (`oamen_lite`)." if model else "")
        + "\n"
    )


def malloc_report(result: dict[str, Any]) -> str:
    """The worker's malloc setting against glibc's defaults (`make bench-malloc`, `ops.bench.malloc`)."""
    rows, c = result["rows"], result["config"]
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    med = {s: statistics.median(r["ips"] for r in rows if r["setting"] == s) for s in settings}
    rss = {s: statistics.median(r["rss_mb"] for r in rows if r["setting"] == s) for s in settings}
    lines = [
        f"Measured on {result['started']}: {c['runs']} runs of {c['seconds']:g} s per setting, fresh processes.",
        "",
        md_table(
            ["run", "setting", f"request path, batch {c['batch']} (img/s)", "resident memory (MB)"],
            ([r["run"], r["setting"], f"{r['ips']:.1f}", f"{r['rss_mb']:.0f}"] for r in rows),
        ),
        "",
        f"Median {med[settings[0]]:.1f} -> {med[settings[-1]]:.1f} img/s "
        f"(x{med[settings[-1]] / med[settings[0]]:.2f}), resident memory {rss[settings[0]]:.0f} -> "
        f"{rss[settings[-1]]:.0f} MB ({settings[0]} -> {settings[-1]}).",
    ]
    return "\n".join(lines) + "\n"


def logging_report(result: dict[str, Any]) -> str:
    """TorchServe's built-in log setting against log4j2.xml (`make bench-logging`, `ops.bench.logsetting`)."""
    runs, c = result["runs"], result["config"]
    lines = [
        f"Measured on {result['started']}: {c['rounds']} rounds, fresh private servers, {c['clients']} REST clients, "
        f"{c['seconds']:g} s each.",
        "",
        table(runs, list(runs[0])),
        "",
    ]
    for label in dict.fromkeys(r["logging"] for r in runs):
        mine = [r for r in runs if r["logging"] == label]
        lines.append(
            f"- {label}: median {statistics.median(r['rps'] for r in mine):.1f} req/s, "
            f"Java {statistics.median(r['cores_java'] for r in mine):.2f} cores, "
            f"{statistics.median(r['log_lines_per_s'] for r in mine):.0f} log lines/s"
        )
    return "\n".join(lines) + "\n"


def loadtest_report(summary: dict[str, Any]) -> str:
    """A `make loadtest` run (`loadtest.run`'s summary.json)."""
    c = summary["config"]
    lines = [
        f"`make loadtest` on {c['started_at']}: {c['users']} users, {c['duration_per_protocol']} per protocol, "
        f"explain share {c['explain_share']:g}, user rate {c['user_rate']:g} req/s (0: closed loop).",
        "",
        md_table(
            ["protocol", "requests", "failures", "req/s", "p50 ms", "p95 ms", "p99 ms", "percentiles"],
            (
                [p, s["requests"], s["failures"], f"{s['requests_per_s']:.1f}", f"{s['p50_ms']:.0f}",
                 f"{s['p95_ms']:.0f}", f"{s['p99_ms']:.0f}", s.get("percentiles", "locust")]
                for p, s in ((p, summary[p]) for p in c["protocols"])
            ),
        ),  # fmt: skip
    ]
    return "\n".join(lines) + "\n"


def precision_report(r: dict[str, Any]) -> str:
    """docs/BENCHMARKS.md's float32-against-bfloat16 section (`ops.bench.precision`)."""
    ips = r["images_per_s"]
    lines = [
        f"Measured by `make bench-precision` (`python -m ops.bench precision`, result "
        f"[results/bench_precision.json](results/bench_precision.json)) on {r['cpu']} "
        f"(native bfloat16: {'yes' if r['native_bf16'] else 'no'}), torch {r['torch']}, {r['threads']} threads, "
        f"median of {r['rounds']} interleaved rounds.",
        "",
        "| network, form | batch 1 (img/s) | batch 8 (img/s) |",
        "|---|---|---|",
    ]
    for name in dict.fromkeys(k.rsplit(" b", 1)[0] for k in ips):
        lines.append(f"| {name} | {ips[f'{name} b1']:.1f} | {ips[f'{name} b8']:.1f} |")
    v = r["val"]
    lines += [
        "",
        f"The answers on val ({v['n']} knees, committed weights and contract), float32 against bfloat16; "
        f"{v['grades_differ']} grades differ:",
        "",
        "| format | top-1 | QWK | macro AUC | ECE | KL1 recall | flagged uncertain | refused by the gate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ("fp32", "bf16"):
        m = v[name]
        lines.append(
            f"| {name} | {m['accuracy']:.1%} | {m['qwk']:.3f} | {m['macro_auc']:.3f} | {m['ece']:.3f} | "
            f"{m['kl1_recall']:.3f} | {m['uncertain_share']:.1%} | {m['refused_share']:.1%} |"
        )
    lines += ["", "The knee-joint finder in bfloat16 against float32:", "",
              "| images | n | decisions that differ | largest box shift of any joint found (share of its width) |",
              "|---|---|---|---|"]  # fmt: skip
    for name, f in r["finder_bf16_vs_fp32"].items():
        lines.append(f"| {name} | {f['n']} | {f['decisions_differ']} | {f['worst_box_shift_of_width']:.3f} |")
    return "\n".join(lines) + "\n"


IPS_COLUMNS = ("model_ips_b16", "pipeline_ips_b8", "pipeline_ips_b1")  # ops.int8_trunk's speed rounds


def answers_table(answers: dict[str, dict]) -> str:
    """The served-format checks' answers, per set of images (`ops.served_check.compare_answers`)."""
    return md_table(
        ["images", "n", "answered (200)", "answers that differ", "largest probability change"],
        [
            (name, a["images"], a["answered_200"], a["answers_differing"], f"{a['max_probability_change']:.4f}")
            for name, a in answers.items()
        ],
    )


def speed_rounds_table(rounds: list[dict], label: str) -> str:
    """In-process speed rounds of `ops.int8_trunk` and `ops.fusion_check` (images/s; ``label``: the column
    that names what alternates)."""
    return md_table(
        ["round", label, "model alone, batch 16", "request path, batch 8", "request path, batch 1"],
        [(x["round"], x[label], *(f"{x[k]:.1f}" for k in IPS_COLUMNS)) for x in rounds],
    )


def int8_report(r: dict[str, Any]) -> str:
    """docs/BENCHMARKS.md's int8-trunk section (`ops.int8_trunk`, `make int8-trunk`)."""
    t, g = r["table"], r["val_gate_scores"]
    lines = [
        "Measured by `make int8-trunk` (`python -m ops.int8_trunk`, result "
        f"[results/int8_trunk.json](results/int8_trunk.json)) on {r['date']} with {r['model']['name']} "
        f"{r['model']['version']}, torch {r['torch']}, {r['torch_threads']} threads; ranges of "
        f"{t['activations']} activations measured on {t['images']} training knees (seed {t['seed']}).",
        "",
        "Every image through the handler's request path (finder, knee gate, grader, decoding), float32 "
        "against the int8 trunk:",
        "",
        answers_table(r["answers"]),
    ]
    sh, q = g["shift"], g["score_quantiles"]
    lines += [
        "",
        f"The knee gate's score on the {g['knees']} val knees moves by {sh['mean']:.2f} on average "
        f"({sh['min']:.2f} to {sh['max']:.2f}) against a threshold of {g['threshold']:.1f}; its median goes "
        f"from {q['float32'][0]:.2f} to {q['int8'][0]:.2f}, its top centile from {q['float32'][1]:.2f} to "
        f"{q['int8'][1]:.2f}, its largest from {q['float32'][2]:.2f} to {q['int8'][2]:.2f}.",
        "",
        "Speed in-process, alternating rounds (images/s; the request path includes the finder and each knee's "
        "mirror):",
        "",
        speed_rounds_table(r["speed"]["rounds"], "format"),
    ]
    ratio = r["speed"]["ratio_int8_over_float32"]
    lines += [
        "",
        f"Medians, int8 trunk over float32: model alone x{ratio['model_ips_b16']:.2f}, request path at batch 8 "
        f"x{ratio['pipeline_ips_b8']:.2f}, at batch 1 x{ratio['pipeline_ips_b1']:.2f}.",
    ]
    return "\n".join(lines) + "\n"


def formats_report(r: dict[str, Any]) -> str:
    """docs/BENCHMARKS.md's served float32-against-int8-trunk table (`ops.bench.formats`)."""
    lines = [
        "Measured by `python -m ops.bench formats` (result [results/bench_formats.json](results/bench_formats.json)) "
        f"on {r['date']}, torch {r['torch']}: a private TorchServe per format and round, shipped batching, "
        f"{r['concurrency']} REST clients for {r['seconds']:.0f} s after a JIT warm-up; formats alternating.",
        "",
        md_table(
            ["round", PRECISION.name, "requests/s", "p50 (ms)", "failures", "idle latency (ms)"],
            [
                (x["round"], x["format"], f"{x['rps']:.1f}", f"{x['p50_ms']:.0f}", x["failures"], f"{x['idle_ms']:.0f}")
                for x in r["rounds"]
            ],
        ),
    ]
    rps, idle = r["rps_ratio_int8_over_fp32"], r["idle_ratio_int8_over_fp32"]
    lines += [
        "",
        f"int8 trunk over float32, per round: requests/s {', '.join(f'{v:.2f}' for v in rps)} (median "
        f"{statistics.median(rps):.2f}); idle latency {', '.join(f'{v:.2f}' for v in idle)} (median "
        f"{statistics.median(idle):.2f}).",
    ]
    return "\n".join(lines) + "\n"


def door_report(result: dict[str, Any]) -> str:
    """The Markdown of docs/SECURITY.md's measured cost (rendered by `ops.render_docs` from bench_door.json)."""
    c = result["config"]
    rows = [
        "| round | path | req/s | p50 ms | p95 ms | failures | CPU ms/request: door | TorchServe |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        rows.append(
            f"| {r['round']} | {r['path']} | {r['rps']:.2f} | {r['p50_ms']} | {r['p95_ms']} | {r['failures']} "
            f"| {r.get('cpu_ms_per_request_door', '')} | {r.get('cpu_ms_per_request_torchserve', '')} |"
        )
    med, cost = result["median_rps"], result["door_cost"]
    verdict = "within" if cost is not None and cost <= result["limit"] else "OVER"
    m = result["machine"]
    cpu = result.get("cpu_ms_per_request", {})
    return (
        f"Measured {result['started']} by `make bench-door` (results/bench_door.json; {c['rounds']} rounds, "
        f"{c['clients']} closed-loop REST "
        f"clients for {c['seconds']:.0f} s per path, one replica, {c['images']} request images; "
        f"{m['cpus']} CPUs, load average {m['loadavg_before'][0]} before the run"
        + (f"; {m['note']}" if m.get("note") else "")
        + "):\n\n"
        + "\n".join(rows)
        + f"\n\nMedian: plain {med['plain']:.2f} req/s, door {med['door']:.2f} req/s: through the door "
        f"{100 * (1 - cost):.1f}% of plain (a cost of {100 * cost:.1f}%; negative: within this machine's noise), "
        f"{verdict} the {100 * result['limit']:.0f}% limit; "
        f"audit lines dropped: {result['audit_lines_dropped']}.\n"
        + (
            f"\nCPU per request (medians): the door (HAProxy + audit receiver) {cpu['door']} ms,"
            f" TorchServe {cpu['torchserve']:.0f} ms: the door's share of a request's CPU is "
            f"**{100 * result['door_cpu_share']:.1f}%**, the throughput it can cost when the CPU is the bottleneck, "
            "whatever else shares the machine (the client's own TLS work is left out: it runs elsewhere in a "
            "deployment).\n"
            if result.get("door_cpu_share") is not None
            else ""
        )
    )


def fusion_report(r: dict[str, Any]) -> str:
    """docs/BENCHMARKS.md's oneDNN Graph fusion section (`ops.fusion_check`, `make fusion-check`)."""
    w, ratio = r["warm_up"], r["speed"]["ratio_fused_over_not"]
    lines = [
        "Measured by `make fusion-check` (`python -m ops.fusion_check`, result "
        f"[results/onednn_fusion.json](results/onednn_fusion.json)) on {r['date']} with {r['model']['name']} "
        f"{r['model']['version']} on {r['cpu']}, torch {r['torch']}, {r['torch_threads']} threads.",
        "",
        "Every image through the handler's request path as served on this CPU (float32, the trunk in int8, "
        "fused) against float32 not fused (as evaluation computes it):",
        "",
        answers_table(r["answers"]),
        "",
        f"The worker's warm-up at batch {r['batch']} (`Predictor.warm_up`): {w['fused']['seconds']:.1f} s and "
        f"{w['fused']['rss_added_mb']:.0f} MB of memory fused, {w['not fused']['seconds']:.1f} s and "
        f"{w['not fused']['rss_added_mb']:.0f} MB not.",
        "",
        "Speed in-process, alternating rounds, both with the int8 trunk (images/s; the request path includes "
        "the finder and each knee's mirror):",
        "",
        speed_rounds_table(r["speed"]["rounds"], "fusion"),
        "",
        f"Medians, fused over not: model alone x{ratio['model_ips_b16']:.2f}, request path at batch 8 "
        f"x{ratio['pipeline_ips_b8']:.2f}, at batch 1 x{ratio['pipeline_ips_b1']:.2f}.",
    ]
    return "\n".join(lines) + "\n"
