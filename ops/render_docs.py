"""Every generated page and block of the docs, rendered from what is committed: one registry, `PAGES`.

A page is written by hand around generated blocks (``<!-- generated: NAME -->`` ... ``<!-- end generated
-->``), or generated whole (the model card, FILMS.md). Each block or whole page is a `Part`: ``facts(root)``
reads what it quotes from the committed files under ``root`` (docs/results/, docs/model/, weights/, the code),
``render(facts)`` turns that into Markdown. A new generated block is one entry here.

``python -m ops.render_docs`` writes every page, ``--only PAGE`` one; ``--check`` writes nothing and exits 1
naming each page that differs from what its committed files give (tests/test_docs.py runs it). A result
that is not committed renders as a line saying so.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import logging
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ops import model_card
from ops.bench import SUBCOMMANDS
from ops.bench.report import (
    door_report,
    explain_bench_report,
    formats_report,
    fusion_report,
    gate_report,
    int8_report,
    loadtest_report,
    logging_report,
    malloc_report,
    precision_report,
    sizing_section,
    sweep_report,
    tail_report,
)
from ops.drills.report import drill_table, replicas_section, soak_section
from ops.explain_report import explain_eval_report, explain_time_report
from ops.gpu_report import compare_report, throughput_report
from ops.markdown import md_table, not_kept
from ops.monitor_report import bench_metrics_report, drift_choice_report, drill_drift_report
from ops.results import DOC_RESULTS, ROOT
from ops.settings import render_settings
from ops.site_docs import site_calibration_report
from train.films_doc import render_doc as films_page

log = logging.getLogger(__name__)

RESULTS = DOC_RESULTS.relative_to(ROOT)  # docs/results, under whichever root is rendered
BLOCK = re.compile(r"(<!-- generated: (?P<name>[a-z_]+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)


@dataclass(frozen=True)
class Part:
    """A generated block or page: the facts it quotes, read under a root, and their Markdown."""

    facts: Callable[[Path], Any]
    render: Callable[[Any], str]

    def text(self, root: Path) -> str:
        return self.render(self.facts(root))


@dataclass(frozen=True)
class Page:
    """A page of the docs: hand-written around generated ``blocks``, or generated ``whole``."""

    blocks: dict[str, Part] = field(default_factory=dict)
    whole: Part | None = None

    def render(self, text: str, root: Path) -> str:
        """The page as its committed files give it; ``text``: the page as it stands (its written parts)."""
        if self.whole is not None:
            return self.whole.text(root)
        found = set()

        def block(m: re.Match) -> str:
            name = m.group("name")
            if name not in self.blocks:
                raise KeyError(f"no renderer {name!r}; this page's: {sorted(self.blocks)}")
            found.add(name)
            return m.group(1) + self.blocks[name].text(root) + m.group(4)

        new = BLOCK.sub(block, text)
        if missing := sorted(set(self.blocks) - found):
            raise KeyError(f"generated blocks missing from the page: {missing}")
        return new


def result(name: str) -> Callable[[Path], Any]:
    """The facts of a part that quotes one committed result: its JSON, or None when it is not committed."""

    def facts(root: Path) -> Any:
        path = root / RESULTS / name
        return json.loads(path.read_text()) if path.is_file() else None

    return facts


def required(render: Callable[[Any], str], name: str) -> Callable[[Any], str]:
    """``render`` for a result the page cannot do without: a clear error when it is not committed."""

    def renderer(r: Any) -> str:
        if r is None:
            raise FileNotFoundError(f"{RESULTS / name} is not committed: its page quotes it")
        return render(r)

    return renderer


def measured(name: str, what: str, command: str, render: Callable[[Any], str]) -> Part:
    """A part quoting the result ``name``, or saying that ``command`` measures ``what`` while it is not committed."""
    return Part(result(name), lambda r: not_kept(what, command, name) if r is None else render(r))


def always(name: str, render: Callable[[Any], str]) -> Part:
    """A part quoting the result ``name``, which must be committed."""
    return Part(result(name), required(render, name))


def drill(name: str, what: str, keys: list[str]) -> Part:
    """A fault drill's committed result (`ops.drills.NAME`, docs/results/drill_NAME.json) as a measure / value
    table of ``keys``."""
    module, file = f"ops.drills.{name}", f"drill_{name}.json"
    command = f"python -m {module} --publish docs/results/{file}"
    return measured(file, what, command, lambda r: drill_table(r, keys, f"python -m {module}", f"results/{file}"))


def bench_commands(root: Path) -> list[tuple[str, str, str]]:
    """The benchmarks the dispatcher (`ops.bench.SUBCOMMANDS`) runs: subcommand, module, its docstring's first
    line (read from the source, not imported)."""
    rows = []
    for name, module in SUBCOMMANDS.items():
        source = Path(importlib.util.find_spec(module).origin).read_text()
        doc = ast.get_docstring(ast.parse(source)) or ""
        rows.append((name, module, doc.split("\n")[0].replace("``", "`")))  # reStructuredText to Markdown
    return rows


def bench_commands_table(rows: list[tuple[str, str, str]]) -> str:
    return md_table(["subcommand", "what it measures", "module"], ([f"`{n}`", d, f"`{m}`"] for n, m, d in rows)) + "\n"


def films_facts(root: Path) -> dict[str, Any]:
    """What docs/FILMS.md quotes: the finder's measures, the resolution floor, the served framings (optional)."""
    model = root / "docs" / "model"
    framings = model / "framings_served.json"
    return {
        "result": json.loads((model / "finder.json").read_text()),
        "resolution": json.loads((model / "resolution.json").read_text()),
        "framings": json.loads(framings.read_text()) if framings.is_file() else None,
    }


KILL_KEYS = [
    "clients", "requests", "in_flight_at_kill", "failed", "failed_in_flight", "failed_not_in_flight",
    "failure_statuses", "new_pid_seen_s", "ready_after_kill_s", "first_ok_after_kill_s", "requests_after_recovery",
    "failed_after_recovery", "passed",
]  # fmt: skip
RESTART_KEYS = [
    "requests", "by_protocol", "spanning_the_restart", "lost", "wrong", "connections_reset",
    "failed_attempts_by_error", "resent_then_answered", "stop_s", "start_s", "longest_request_s", "passed",
]  # fmt: skip

LOADTEST = "make loadtest USERS=32 DURATION=300s; cp reports/loadtest/latest/summary.json docs/results/loadtest.json"
GPU_RUN = "bash scripts/gpu_run.sh on the GPU machine, then python -m ops.gpu_report collect (docs/RESULTS.md)"

FORMATS_BENCH = "python -m ops.bench formats"

PAGES: dict[str, Page] = {
    "docs/BENCHMARKS.md": Page(
        blocks={
            "bench_commands": Part(bench_commands, bench_commands_table),
            "bench_sweep": always("bench_sweep.json", sweep_report),
            "loadtest": measured("loadtest.json", "the saturating Locust runs", LOADTEST, loadtest_report),
            "bench_tail": always("bench_tail.json", tail_report),
            "bench_malloc": measured("bench_malloc.json", "the malloc comparison", "make bench-malloc", malloc_report),
            "bench_logging": measured(
                "bench_logging.json", "the logging comparison", "make bench-logging", logging_report
            ),
            "bench_explain": always("bench_explain.json", explain_bench_report),
            "bench_precision": measured(
                "bench_precision.json", "float32 against bfloat16", "make bench-precision", precision_report
            ),
            "bench_gate": always("bench_gate.json", gate_report),
            "quantised_trunk": always("int8_trunk.json", int8_report),
            "onednn_fusion": always("onednn_fusion.json", fusion_report),
            "served_formats": measured(
                "bench_formats.json", "float32 against the int8 trunk, served", FORMATS_BENCH, formats_report
            ),
        }
    ),
    "docs/DEPLOY.md": Page(
        blocks={
            "replicas": Part(result("drill_replicas.json"), lambda r: replicas_section(r) + "\n"),
            "sizing": always("bench_sweep.json", lambda r: sizing_section(r) + "\n"),
        }
    ),
    "docs/EXPLAIN.md": Page(
        blocks={
            "explain_eval": measured(
                "explain_eval.json", "the explanation methods", "python -m ops.explain_eval", explain_eval_report
            ),
            "explain_time": measured(
                "explain_time.json",
                "the explanation times",
                "python -m ops.explain_eval --time-only",
                explain_time_report,
            ),
        }
    ),
    "docs/FILMS.md": Page(whole=Part(films_facts, lambda f: films_page(f["result"], f["resolution"], f["framings"]))),
    "docs/MODEL_CARD.md": Page(whole=Part(model_card.facts, model_card.render)),
    "docs/MONITORING.md": Page(
        blocks={
            "bench_metrics": measured(
                "bench_metrics.json", "the metrics cost", "make bench-metrics", bench_metrics_report
            ),
            "drift_choice": measured(
                "drift_choice.json", "the drift choice", "make drift-reference", drift_choice_report
            ),
            "drill_drift": measured("drill_drift.json", "the drift drill", "make drill-drift", drill_drift_report),
        }
    ),
    # rendered from the code (ops.settings), not from a result
    "docs/OPERATIONS.md": Page(blocks={"settings": Part(lambda root: None, lambda _: render_settings())}),
    "docs/RELIABILITY.md": Page(
        blocks={
            "kill_worker": drill("kill_worker", "the worker killed under load", KILL_KEYS),
            "restart": drill("restart", "the restart under load", RESTART_KEYS),
            "soak": always("soak.json", lambda r: soak_section(r, "results/soak.json")),
            "soak_saturation": always(
                "soak_saturation.json", lambda r: soak_section(r, "results/soak_saturation.json")
            ),
        }
    ),
    "docs/RESULTS.md": Page(
        blocks={
            "gpu_compare": measured("gpu_run.json", "the GPU comparison", GPU_RUN, compare_report),
            "gpu_throughput": measured("gpu_run.json", "the GPU throughput", GPU_RUN, throughput_report),
        }
    ),
    "docs/SECURITY.md": Page(
        blocks={
            "bench_door": measured("bench_door.json", "the cost of the TLS door", "make bench-door", door_report),
        }
    ),
    "docs/SITES.md": Page(
        blocks={
            "site_calibration": measured(
                "site_calibration.json", "the site calibration on site2", "make site-study", site_calibration_report
            ),
        }
    ),
}


def written_pages(root: Path = ROOT) -> list[str]:
    """The pages a generated block could hide in: README.md and docs/*.md."""
    return [p.relative_to(root).as_posix() for p in [root / "README.md", *sorted((root / "docs").glob("*.md"))]]


def unregistered(root: Path = ROOT) -> list[str]:
    """Pages holding a generated block that no entry of `PAGES` renders."""
    return [p for p in written_pages(root) if p not in PAGES and BLOCK.search((root / p).read_text())]


class RenderError(Exception):
    """A page its committed files cannot render: a result missing or malformed, a block without its renderer."""


def rendered(page: str, root: Path = ROOT) -> tuple[str, str]:
    """The page as it stands under ``root`` ("" when missing) and as its committed files give it."""
    path = root / page
    text = path.read_text() if path.is_file() else ""
    try:
        return text, PAGES[page].render(text, root)
    except (KeyError, OSError, TypeError, ValueError) as exc:
        raise RenderError(f"{page}: {type(exc).__name__}: {exc}") from exc


def stale(root: Path = ROOT, only: list[str] | None = None) -> list[str]:
    """The pages (all, or ``only``) that differ from what their committed files give."""
    return [page for page in only or PAGES if len(set(rendered(page, root))) > 1]


def write(root: Path = ROOT, only: list[str] | None = None) -> list[str]:
    """Rewrite the pages (all, or ``only``) that differ from what their committed files give; returns them."""
    changed = []
    for page in only or PAGES:
        old, new = rendered(page, root)
        if new != old:
            (root / page).write_text(new)
            changed.append(page)
    return changed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 naming each page that differs")
    p.add_argument("--only", action="append", choices=sorted(PAGES), metavar="PAGE", help="this page only")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for page in (orphans := unregistered()):
        log.error("%s has generated blocks but no entry in ops.render_docs.PAGES", page)
    try:
        pages = stale(only=args.only) if args.check else write(only=args.only)
    except RenderError as exc:
        log.error("%s", exc)
        return 1
    for page in pages:
        if args.check:
            log.error("%s differs from what its committed files give: run python -m ops.render_docs", page)
        else:
            log.info("%s rewritten", page)
    return 1 if orphans or (args.check and pages) else 0


if __name__ == "__main__":
    sys.exit(main())
