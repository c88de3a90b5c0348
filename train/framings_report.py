"""The FILMS.md section on other sites' framings, rendered from `train.eval_framings`'s result."""

from __future__ import annotations

from typing import Any

FORMATS = {"fp32": "float32", "bf16": "bfloat16"}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "n/a" if x is None else format(x, fmt)


def framings_section(result: dict[str, Any]) -> list[str]:
    """Markdown lines: refusals and grades per framing, before (first run) and after (last run);
    the second site's knees and the non-knee radiographs the same way."""
    runs = result.get("runs") or []
    if not runs:
        return []
    first, last = runs[0], runs[-1]
    lines = [
        "",
        "## Knees framed as other sites frame them (finder, knee gate and grader, as served)",
        "",
        f"`python -m train.eval_framings`: the first {last['val_knees'] // 5} val knees of each grade, framed as",
        "`train.framings.FRAMINGS` says, sent as PNG through the served path (`train.served_path`) in",
        f"{FORMATS.get(last['precision'], last['precision'])}. Refused: the share of images answered `not_a_knee`,",
        "`unsupported_view` or `resolution_too_low`. Top-1 and QWK are over the knees graded; agreement is how",
        f"often a knee's grade is the one it gets unframed. Before: {first['label']}; after: {last['label']}.",
        "",
        "| framing | what | refused before | refused after | top-1 after | QWK after | agreement after |",
        "|---|---|---|---|---|---|---|",
    ]
    before = {r["framing"]: r for r in first["framings"]}
    for r in last["framings"]:
        b = before.get(r["framing"], {})
        lines.append(
            f"| {r['framing']} | {r['what']} | {_pct(b.get('refused'))} | {_pct(r['refused'])} | "
            f"{_pct(r['accuracy'])} | {_num(r['qwk'])} | {_pct(r.get('agreement_with_original'))} |"
        )
    sites = [(run["label"], run["site"]) for run in (first, last) if run.get("site")]
    if sites:
        lines += [
            "",
            "A second hospital's labelled knees (`../shared/data/site2`, 329 knees of Gornale & Patravali 2020,",
            '"Digital Knee X-ray Images", Mendeley Data, doi:10.17632/t9ndx37v5h.1, CC BY 4.0; another X-ray',
            "machine and reader). They were only measured here: nothing was fitted or chosen on them. Grades",
            "are the general model's; a site calibrates them to its reader with its own sample (docs/SITES.md).",
            "",
            "| measured with | images | refused: single-knee crops | refused: both-knee bands | knees graded | "
            "top-1 | QWK | MAE | mean grade - site's grade |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for label, s in sites if first is not last else sites[:1]:
            a, one, two = s["all"], s["single_knee_crops"], s["both_knee_bands"]
            lines.append(
                f"| {label} | {a['n']} | {_pct(one['refused'])} of {one['n']} | {_pct(two['refused'])} of {two['n']} | "
                f"{a['knees_graded']} | {_pct(a['accuracy'])} | {_num(a['qwk'])} | {_num(a['mae'], '.2f')} | "
                f"{_num(a['mean_grade_minus_label'], '+.2f')} |"
            )
    held = [(run["label"], run["nonknee_heldout"]) for run in (first, last) if run.get("nonknee_heldout")]
    if held:
        lines += ["", "Held-out non-knee radiographs (hand, hip, shoulder) graded:", ""] + [
            f"- {label}: {h['graded']} of {h['n']}." for label, h in (held if first is not last else held[:1])
        ]
    return lines
