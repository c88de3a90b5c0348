"""docs/SITES.md's measured section, from the committed ``docs/results/site_calibration.json``
(`train.site_study`), rendered by `ops.render_docs`."""

from __future__ import annotations

from typing import Any

__all__ = ["site_calibration_report"]


def _cell(f: dict[str, Any] | None, key: str, pct: bool) -> str:
    if not f or key not in f:
        return "n/a"
    v = f[key]
    sd = f.get(f"{key}_sd")
    text = f"{100 * v:.1f}%" if pct else f"{v:.3f}"
    if sd is not None:
        text += f" ± {100 * sd:.1f}" if pct else f" ± {sd:.3f}"
    return text


def _ece(f: dict[str, Any]) -> str:
    return f"{f['ece']:.3f}" if "ece" in f else "n/a"


def _row(name: str, fitted: str, figs: dict[str, Any]) -> str:
    g, a = figs.get("graded"), figs.get("answered")
    return (
        f"| {name} | {fitted} | {_cell(g, 'accuracy', True)} | {_cell(g, 'qwk', False)} | {_cell(g, 'mae', False)} | "
        f"{_cell(a, 'accuracy', True)} | {_cell(a, 'qwk', False)} |"
    )


def site_calibration_report(r: dict[str, Any]) -> str:
    s = r["site"]
    cv = r["cross_fitted_all"]
    lines = [
        f"Measured {r['date']} on {s['name']}: {s['knees']} knees ({', '.join(f'KL{k} {c}' for k, c in enumerate(s['grade_counts']))}); "  # noqa: E501
        f"model {r['model']['name']} v{r['model']['version']} (weights {r['model']['weights_sha256']}, finder "
        f"{r['finder_sha256']}). Data: {s['credit']}. The served path answers {s['answered_today']} of them today "
        f"(refused: {', '.join(f'{k} {v}' for k, v in s['refusals'].items()) or 'none'}); the model graded all "
        f"{s['graded']}, which is what a calibration is fitted on. Every figure is of knees the fit did not see.",
        "",
        "Result: [results/site_calibration.json](results/site_calibration.json) (`make site-study`, "
        "`train.site_study`).",
        "",
        "| calibration | fitted on | top-1, all graded | QWK | MAE | top-1, answered today | QWK |",
        "|---|---|---|---|---|---|---|",
    ]
    all_ = {m: {"graded": f} for m, f in cv["methods"].items()}
    lines.append(_row("shipped (default)", "nothing", all_["shipped"]))
    for n in (50, 100):
        d = r[f"from_{n}"]
        chosen = ", ".join(f"{m} {c}" for m, c in sorted(d["site_check_choice"]["chosen"].items()))
        lines.append(_row("shipped, same held-out knees", f"({n}-knee draws)", d["methods"]["shipped"]))
        lines.append(_row(f"**site check's choice** ({chosen} of {d['draws']})", f"{n} random labelled knees",
                          d["site_check_choice"]))  # fmt: skip
    lines.append(_row(f"site check's choice on all ({cv['chosen']})", "all labelled knees (5-fold cross-fitted)",
                      all_[cv["chosen"]]))  # fmt: skip
    lines.append(_row("label-free: EM prior correction", "the site's images, no grades", all_.get("em-prior", {})))
    lines += [
        "",
        "Means over draws (± their standard deviation); cross-fitted rows: mean over repeats of "
        f"{cv['protocol']}. Choice rule: {r['rule']}",
        "",
        "Every method, cross-fitted on all labelled knees:",
        "",
        "| method | what it refits | top-1 | QWK | MAE | NLL | ECE | score gain over shipped, 5th percentile |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, f in cv["methods"].items():
        lines.append(f"| {m} | {r['methods'][m]} | {100 * f['accuracy']:.1f}% | {f['qwk']:.3f} | {f['mae']:.3f} | "
                     f"{f['nll']:.3f} | {_ece(f)} | {f.get('gain_low', 0.0):+.3f} |")  # fmt: skip
    v = r["val"]["from_100"]
    lines += [
        "",
        f"On val ({r['val']['knees']} val knees through the same path; fitted on 100 random ones, measured on the "
        f"others, {v['draws']} draws): shipped {_cell(v['methods']['shipped'].get('graded'), 'accuracy', True)} / "
        f"QWK {_cell(v['methods']['shipped'].get('graded'), 'qwk', False)}; the site check's choice "
        f"({', '.join(f'{m} {c}' for m, c in sorted(v['site_check_choice']['chosen'].items()))}) "
        f"{_cell(v['site_check_choice'].get('graded'), 'accuracy', True)} / QWK "
        f"{_cell(v['site_check_choice'].get('graded'), 'qwk', False)}.",
    ]
    return "\n".join(lines) + "\n"
