"""Render the measured sections of the docs from committed JSON results.

``python scripts/render_docs.py`` rewrites, in place, every block of the form

    <!-- generated: NAME -->
    ...
    <!-- end generated -->

in README.md and docs/*.md with what the renderer NAME makes of its committed result
(`RENDERERS`). ``--check`` rewrites nothing and exits 1 when a block differs from its result:
tests/test_docs.py runs it, so a doc cannot quote a figure its result does not hold. The model
card is generated whole by scripts/model_card.py and checked the same way there.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
BLOCK = re.compile(r"(<!-- generated: (?P<name>[a-z_]+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)


def _load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def bench_explain() -> str:
    d = _load("bench_explain.json")
    s = d["summary"]

    def legs(mode: str, key: str) -> str:
        return " / ".join(f"{v:.0f}" for v in s[mode][key]["legs"])

    rows = [
        "| plain predictions | before (two legs, ms) | after (two legs, ms) |",
        "|---|---|---|",
        *[
            f"| {k.split('_')[1]} | {legs('before', k)} | {legs('after', k)} |"
            for k in ("plain_p50_ms", "plain_p95_ms", "plain_p99_ms")
        ],  # fmt: skip
        f"| explanations p50 | {legs('before', 'explain_p50_ms')} | {legs('after', 'explain_p50_ms')} |",
    ]
    c = d["config"]
    return (
        f"`make bench-explain` (`scripts/bench_explain.py`, result `docs/results/bench_explain.json`): open-loop "
        f"REST load at {d['rate_rps']:.2f} requests/s, {100 * c['explain_share']:.0f}% of them asking for "
        f"{c['method'].upper()}, {c['rounds']} rounds of before (a batch answered at once) and after (plain "
        f"predictions answered before the batch's explanations) legs of {c['seconds']:.0f} s. Run beside: "
        f"{c.get('note', 'nothing')}.\n\n" + "\n".join(rows) + "\n"
    )


def bench_gate() -> str:
    d = _load("bench_gate.json")
    lo, hi = d["gate_share_range"]
    return (
        f"`python -m train.bench_gate` (result `docs/results/bench_gate.json`), {d['model']}, batch {d['batch']}, "
        f"{len(d['rounds'])} alternating rounds: the request path (decode, preprocess, model) takes "
        f"{d['ms_per_image_without_median']:.1f} ms per image without the knee gate and "
        f"{d['ms_per_image_with_median']:.1f} ms with it; the gate's share of the request path is "
        f"**{100 * d['gate_share_median']:.1f}%** (median; rounds {100 * lo:.1f}% to {100 * hi:.1f}%; target <= 15%"
        f"{'; a share below zero means the difference is within the run-to-run noise' if lo < 0 else ''}). "
        f"Mirror averaging (a second pass on the mirrored batch) would take {d['ms_per_image_with_flip_median']:.1f} "
        f"ms per image, {d['flip_cost_median']:.2f}x the request path; the measured model "
        f"{'uses' if d['flip_tta'] else 'does not use'} it.\n"
    )


RENDERERS: dict[str, Callable[[], str]] = {"bench_explain": bench_explain, "bench_gate": bench_gate}


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
