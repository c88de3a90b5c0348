"""`make bench`: in-process against served throughput, a batching sweep, REST against gRPC.

``python scripts/bench_sweep.py [--seconds 15] [--out docs/BENCHMARKS.md]``

Measured in one run on one machine, so the ratios are fair even where absolute figures are
noisy: (1) in-process TorchScript at batch 1, 8 and 16, the model alone and the handler's whole
request path; (2) TorchServe over REST for a sweep of batch size x max batch delay, each at
twice the batch size in concurrent clients; (3) at the best setting, REST and gRPC at rising
concurrency, plotted. Writes the Markdown report, a JSON copy and the plot. An existing
report's sections from "## Load tests" on (Locust runs, ``scripts/bench_tail.py``) are kept.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import (  # noqa: E402
    JIT_SETTLED_MS,
    RAMP_S,
    ROOT,
    cpu_use,
    drive,
    idle_latency,
    in_process,
    jit_settled,
    load_images,
    load_predictor,
    pipeline_rate,
    server,
    warm_up_jit,
)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


KEPT_FROM = "## Load tests"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=15.0, help="measured seconds per point")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16])
    p.add_argument("--delays", type=int, nargs="+", default=[10, 50, 100])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    p.add_argument("--rounds", type=int, default=6, help="paired in-process / served rounds at the chosen setting")
    p.add_argument("--round-seconds", type=float, default=10.0, help="measured seconds of each half of a round")
    p.add_argument("--jit-passes", type=int, default=12, help="most REST + gRPC passes of the JIT warm-up")
    p.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "data" / "koa" / "val")
    p.add_argument("--model", type=Path, default=ROOT / "build" / "oamen.pt")
    p.add_argument("--store", type=Path, default=ROOT / "model_store")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "BENCHMARKS.md")
    return p


# column names containing one of these are shown with two decimals
TWO_DECIMALS = ("vs_in_process", "ratio", "cores_", "grpc_over", "cpu_ms", "jit_ms")


def cell(col: str, value) -> str:
    if not isinstance(value, float):
        return str(value)
    return f"{value:.2f}" if any(k in col for k in TWO_DECIMALS) else f"{value:.1f}"


def table(rows: list[dict], cols: list[str]) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [cell(c, r[c]) for c in cols]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


NEAR_BEST = 0.95  # settings within 5% of the best throughput count as equal (runs here differ by more)


def choose(sweep: list[dict]) -> dict:
    """The batching setting to ship: the shortest max delay among those near the best throughput."""
    top = max(r["rps"] for r in sweep)
    near = [r for r in sweep if r["rps"] >= NEAR_BEST * top]
    return min(near, key=lambda r: (r["delay_ms"], -r["rps"]))


ROUND_LEGS = ("in-process", "rest", "grpc")
ROUND_ORDERS = tuple(itertools.permutations(ROUND_LEGS))  # round k runs its legs in order k mod 6
LEG_NAMES = {
    "in-process": "in-process",
    "rest": "REST",
    "grpc": "gRPC",
    "rest-requests": "REST, shipped client",
    "grpc-sync": "gRPC, shipped client",
}
SHIPPED_CLIENTS = ("rest-requests", "grpc-sync")


def paired_rounds(srv, images: list[bytes], pred, batch: int, rounds: int, seconds: float) -> list[dict]:
    """The in-process request path, REST and gRPC (2 x ``batch`` clients), ``seconds`` each, ``rounds`` times.

    This machine's speed drifts by a quarter within minutes (shared cores), so a ratio of two figures
    taken minutes apart measures the drift as much as the server. A round's three figures are seconds
    apart and the rounds go through all six orders of the three, so a steady drift favours none. The
    server sits idle while the in-process path runs. Each served leg also records the cores used by
    the worker, Java and the load generator (`cpu_use`).
    """
    out = []
    for k in range(rounds):
        order = ROUND_ORDERS[k % len(ROUND_ORDERS)]
        row: dict = {"round": k + 1, "order": ", ".join(LEG_NAMES[leg] for leg in order)}
        for leg in order:
            if leg == "in-process":
                row["in_process_ips"] = pipeline_rate(pred, images, batch, seconds)
                continue
            with cpu_use(srv) as cores:
                r = drive(srv, images, leg, max(4, 2 * batch), seconds)
            row.update({f"{leg}_rps": r["rps"], f"{leg}_failures": r["failures"]})
            row[f"{leg}_cpu"] = cpu_per_request(leg, r["rps"], cores)
        row["ratio"] = row["rest_rps"] / row["in_process_ips"]
        row["grpc_over_rest"] = row["grpc_rps"] / row["rest_rps"]
        out.append(row)
        print(
            f"round {k + 1} ({row['order']}): in-process {row['in_process_ips']:.1f} img/s, "
            f"REST {row['rest_rps']:.1f} req/s, gRPC {row['grpc_rps']:.1f} req/s",
            flush=True,
        )
    return out


def cpu_per_request(leg: str, rps: float, cores: dict[str, float]) -> dict:
    """Milliseconds of CPU per request spent by the worker, Java and the load generator."""
    return {
        "client": LEG_NAMES[leg],
        "rps": rps,
        **{f"cpu_ms_{name}": 1000 * v / rps for name, v in cores.items()},
        **{f"cores_{name}": v for name, v in cores.items()},
    }


def cpu_table(rounds: list[dict], shipped: list[dict]) -> list[dict]:
    """Per protocol, medians over the rounds; then the one measurement with each shipped client."""
    rows = []
    for leg in ("rest", "grpc"):
        per_round = [r[f"{leg}_cpu"] for r in rounds]
        medians = {k: statistics.median(p[k] for p in per_round) for k in per_round[0] if k != "client"}
        rows.append({"client": LEG_NAMES[leg], **medians})
    return rows + shipped


def plot_curves(curves: dict, pipe: float, near: int, batch: int, delay: int, path: Path) -> Path:
    """Throughput against concurrency per protocol, with the in-process request path as a line."""
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for proto, rows in curves.items():
        ax.plot([r["clients"] for r in rows], [r["rps"] for r in rows], marker="o", label=LEG_NAMES[proto])
    ax.axhline(pipe, color="grey", ls="--", label=f"in-process request path, batch {near}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("requests / s")
    ax.set_title(f"TorchServe, batch {batch}, max delay {delay} ms")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(args: argparse.Namespace) -> dict:
    images = load_images(args.images, 64)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    inproc = {b: in_process(args.model, images, b, 5.0) for b in (1, 8, 16)}
    sweep = []
    for b in args.batches:
        for d in args.delays:
            with server(args.store, b, d) as srv:
                r = drive(srv, images, "rest", max(4, 2 * b), args.seconds)
            near = min(inproc, key=lambda k: abs(k - b))
            pipe = inproc[near][f"pipeline_ips_b{near}"]
            sweep.append({"batch": b, "delay_ms": d, "clients": max(4, 2 * b), **r, "vs_in_process": r["rps"] / pipe})
            print(f"batch {b:2d} delay {d:3d} ms: {r['rps']:.1f} req/s, p50 {r['p50_ms']:.0f} ms", flush=True)
    best = choose(sweep)
    b, d = best["batch"], best["delay_ms"]
    curves = {"rest": [], "grpc": []}
    with server(args.store, b, d) as srv:
        idle = idle_latency(srv, images)
        warm = warm_up_jit(srv, images, max(4, 2 * b), args.seconds, args.jit_passes)
        for c in args.concurrency:
            for proto in ("rest", "grpc"):
                curves[proto].append({"clients": c, **drive(srv, images, proto, c, args.seconds)})
                print(f"{proto} x{c}: {curves[proto][-1]['rps']:.1f} req/s", flush=True)
        rounds = paired_rounds(srv, images, load_predictor(args.model), b, args.rounds, args.round_seconds)
        shipped = []
        for leg in SHIPPED_CLIENTS:
            with cpu_use(srv) as cores:
                r = drive(srv, images, leg, max(4, 2 * b), args.round_seconds)
            shipped.append(cpu_per_request(leg, r["rps"], cores))
        cpu_rows = cpu_table(rounds, shipped)
    near = min(inproc, key=lambda k: abs(k - b))
    pipe = inproc[near][f"pipeline_ips_b{near}"]
    paired = statistics.median(r["ratio"] for r in rounds)
    paired_grpc = statistics.median(r["grpc_over_rest"] for r in rounds)
    model_b1_ms = 1000 / inproc[1]["model_ips_b1"]

    plot = plot_curves(curves, pipe, near, b, d, args.out.with_name("bench_concurrency.png"))

    round_ratios = ", ".join(f"{r['ratio']:.2f}" for r in rounds)
    best_rest = max(curves["rest"], key=lambda r: r["rps"])
    best_grpc = max(curves["grpc"], key=lambda r: r["rps"])
    threads = os.environ.get("KOA_TORCH_THREADS", "torch default")
    lines = [
        "# Benchmarks",
        "",
        f"Measured by `make bench` (`scripts/bench_sweep.py`) on {started}, in one run on one machine: "
        f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} torch threads "
        f"in-process, worker threads `KOA_TORCH_THREADS`={threads}, {len(images)} knee PNGs from val, "
        f"{args.seconds:.0f} s per point after a 3 s ramp. Load generator, Java frontend and worker share the "
        "same 2 cores, as in CI. These machines are shared and noisy: read the ratios, not the absolute figures.",
        "",
        "No GPU was available to the session that measured this: the GPU section of the load-test issue "
        "(mixed precision, channels_last, the handler through a mock context) is not measured yet.",
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
        f"within {100 * (1 - NEAR_BEST):.0f}% of the highest throughput, then the highest throughput. Differences that "
        "small are run-to-run noise here, while the delay is paid by every request at low load.",
        "",
        "## Frontend warm-up (JIT)",
        "",
        "TorchServe's Java frontend is compiled by the JIT while it serves: in the first minutes of load the "
        "compiler threads take CPU from the same cores as the model, and gRPC's request path (Netty HTTP/2, "
        "protobuf, the gRPC executor) takes longer to compile than REST's. Before the tables below, REST and gRPC "
        f"were driven in turn ({max(4, 2 * b)} clients, {args.seconds:.0f} s each) until the JIT spent under "
        f"{JIT_SETTLED_MS} ms of CPU per request on both (`bench_serve.warm_up_jit`), so they measure the server "
        "as it runs for hours, not as it starts:",
        "",
        table(warm, ["pass", "rest_rps", "rest_jit_ms", "grpc_rps", "grpc_jit_ms"]),
        "",
        "`*_jit_ms`: CPU milliseconds of Java's compiler threads per answered request in that leg. "
        + (
            f"Settled after {len(warm)} passes ({len(warm) * 2 * (args.seconds + RAMP_S) / 60:.1f} minutes of load)."
            if jit_settled(warm[-1])
            else f"Not settled after {len(warm)} passes: the tables below still include some JIT work."
        ),
        "",
        "## REST and gRPC against concurrency (chosen setting)",
        "",
        f"![throughput against concurrency]({plot.name})",
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
        f"Each round measures the in-process request path, REST and gRPC, {args.round_seconds:.0f} s each (the "
        "served legs after a 3 s ramp), one right after the other; the rounds go through all six orders of the "
        "three, so all see the same machine and a drift favours none. The targets are judged on the median "
        "ratios. REST is driven by a minimal keep-alive `http.client` driver (`bench_serve.HttpDriver`), gRPC by "
        "a `grpc.aio` driver on one channel (`bench_serve.GrpcAioDriver`): the two cost the load generator about "
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
        "(`client.rest.RestClient` on requests, `client.grpc_client.GrpcClient`, synchronous, its threads sharing "
        "one channel) at the same setting, right after the rounds.",
        "",
        table(
            cpu_rows,
            ["client", "rps", "cpu_ms_workers", "cpu_ms_java", "cpu_ms_java_jit", "cpu_ms_load_generator"]
            + ["cores_workers", "cores_java", "cores_load_generator"],
        ),
        "",
        f"`cpu_ms_*`: CPU milliseconds per answered request (`java_jit`: the part of `java` spent by the JIT "
        f"compiler); `cores_*`: CPU time over wall time ({os.cpu_count()} cores in all). The in-process path has "
        "every core; served, the worker gets what Java and the load "
        "generator leave. The load generator shares these cores only because the benchmark runs on one machine: "
        "a clinical system calling the server from elsewhere does not take its CPU from the worker.",
    ]
    # The load-test sections below KEPT_FROM come from other scripts (Locust, bench_tail.py): keep them.
    old = args.out.read_text() if args.out.is_file() else ""
    kept = old[old.index(KEPT_FROM) :] if KEPT_FROM in old else ""
    args.out.write_text("\n".join(lines) + "\n" + (f"\n{kept}" if kept else ""))
    result = {
        "in_process": inproc,
        "sweep": sweep,
        "chosen": {"batch": b, "delay_ms": d},
        "curves": curves,
        "idle_ms": idle,
        "jit_warm_up": warm,
        "paired_rounds": rounds,
        "paired_ratio_median": paired,
        "paired_grpc_over_rest_median": paired_grpc,
        "cpu_per_request": cpu_rows,
    }
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
