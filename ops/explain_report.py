"""docs/EXPLAIN.md's tables, rendered from the committed result of `ops.explain_eval`
(docs/results/explain_eval.json) by `ops.render_docs`."""

from __future__ import annotations

from typing import Any

from handler.explain import DEFAULT_METHOD
from ops.markdown import md_table

WHAT = {
    "layercam": "LayerCAM fused over the MobileNet-family branch's stride-8 and stride-16 stages",
    "gradcam": "Grad-CAM on the trunk's fusion layer (the default before)",
    "ig": "Integrated Gradients from a black image, 16 steps",
    "ig_blur": "Integrated Gradients from a blurred image, 8 steps",
    "smoothgrad": "SmoothGrad (NoiseTunnel over gradients), 8 samples",
    "occlusion": "Occlusion by blurred 48 px patches, stride 24",
    "edges": "reference, not an explanation: the image's own edges (Sobel)",
    "uniform": "reference: the same heat everywhere",
    "random": "reference: cells taken in a random order",
}


def _f(cell: dict[str, Any] | None, key: str = "mean", fmt: str = "{:.2f}") -> str:
    return fmt.format(cell[key]) if cell and key in cell else "n/a"


def label(name: str) -> str:
    """A method's name, bold and marked when it is the served default."""
    return f"**{name}** (default)" if name == DEFAULT_METHOD else name


def method_table(d: dict[str, Any]) -> str:
    """Localisation, faithfulness and time per method, the references below."""
    header = [
        "method", "n", "heat in the joint region", "rows 35-65% (16 x 16 grid)", "top 15% of rows",
        "hottest row at the top", "deletion AUC (lower is better)", "insertion AUC (higher is better)",
        "seconds per knee (median)",
    ]  # fmt: skip
    rows = []
    for name, m in d["methods"].items():
        n = max((v.get("n", 0) for v in m.values()), default=0)
        rows.append([
            label(name), n, _f(m.get("joint")), _f(m.get("band")), _f(m.get("top")),
            _f(m.get("hottest_row_in_top"), fmt="{:.0%}"), _f(m.get("deletion")), _f(m.get("insertion")),
            _f(m.get("seconds"), "median"),
        ])  # fmt: skip
    return md_table(header, rows) + "\n"


def sanity_table(d: dict[str, Any]) -> str:
    """The maps' rank correlation with the trained model's as the weights are re-initialised."""
    s = d["sanity"]
    rows = [[level, *(f"{v[i]:.2f}" for v in s["spearman"].values())] for i, level in enumerate(s["levels"])]
    return md_table(["weights randomised down to", *s["spearman"]], rows) + "\n"


def layer_table(d: dict[str, Any]) -> str:
    """Where each layer's Grad-CAM and LayerCAM maps lie."""
    header = ["layer", "stride", "Grad-CAM: joint region", "Grad-CAM: top 15%", "LayerCAM: joint region",
              "LayerCAM: top 15%"]  # fmt: skip
    rows = [
        [name, r["stride"], f"{r['gradcam_joint']:.2f}", f"{r['gradcam_top']:.2f}", f"{r['layercam_joint']:.2f}",
         f"{r['layercam_top']:.2f}"]
        for name, r in d["layers"].items()
    ]  # fmt: skip
    return md_table(header, rows) + "\n"


def explain_eval_report(d: dict[str, Any]) -> str:
    """The whole measured section of docs/EXPLAIN.md."""
    c = d["config"]
    e = d["edge_study"]
    load = d["methods"].get(DEFAULT_METHOD, {}).get("loadavg_1min", {})
    what = "\n".join(f"- `{k}`: {v}" for k, v in WHAT.items() if k in d["methods"])
    return (
        f"`python -m ops.explain_eval` (result `docs/results/explain_eval.json`), {d['model']}, "
        f"{d['knees']} {c['split']} knees ({', '.join(f'KL{g}: {n}' for g, n in enumerate(d['labels']))}; seed "
        f"{c['seed']}), each explained for the grade the answer gives; the slow methods on the first "
        f"{c['slow_knees']}. The joint region found in each image covers {d['joint_area']['mean']:.0%} of the crop "
        f"on average (what a uniform map scores there). Time: one attribution at a time in {d['torch_threads']} "
        f"torch threads, on {d['machine']['cpus']} CPUs shared with other work (1-minute load average "
        f"{_f(load, 'median', '{:.1f}')} while the default ran; {d['loadavg_start'][0]:.1f} at the start, "
        f"{d['loadavg_end'][0]:.1f} at the end). Run beside: {c.get('note') or 'not recorded'}.\n\n"
        f"{what}\n\n{method_table(d)}\n"
        f"Sanity check (Adebayo et al. 2018) on the first {d['sanity']['knees']} knees: the Spearman correlation of "
        "each map with the trained model's as the weights are re-initialised from the head down (cumulative). "
        "A map that stays near 1 shows the image, not the model.\n\n"
        f"{sanity_table(d)}\n"
        f"Where each layer's map lies (first {c['layer_knees']} knees):\n\n{layer_table(d)}\n"
        f"The crop's top edge (first {c['layer_knees']} knees): blurring away the top 15% of rows moves the "
        f"explained grade's probability by {e['dp_top']['mean']:+.3f} on average (sd {e['dp_top']['sd']:.3f}); "
        f"the same number of rows over the joint by {e['dp_joint']['mean']:+.3f} (sd {e['dp_joint']['sd']:.3f}); the "
        f"bottom rows by {e['dp_bottom']['mean']:+.3f}. Turned upside down, Grad-CAM puts "
        f"{e['gradcam_top_upside_down']['mean']:.2f} of its heat in the top 15% of rows (now the tibia) and "
        f"{e['gradcam_bottom_upside_down']['mean']:.2f} in the bottom 15% (now the femur). The trunk carries "
        f"{e['trunk_share']['mean']:.0%} of the head's |gradient x feature| (the parallel branch the rest).\n"
    )


def explain_time_report(d: dict[str, Any]) -> str:
    """The timing of `python -m ops.explain_eval --time-only` (docs/results/explain_time.json)."""
    c = d["config"]
    load = d["loadavg_1min"]
    table = md_table(
        ["method", "seconds per knee (median)", "p90", "attributions"],
        ([label(name), f"{s['median']:.2f}", f"{s['p90']:.2f}", s["n"]] for name, s in d["seconds"].items()),
    )
    return (
        f"`python -m ops.explain_eval --time-only` (result `docs/results/explain_time.json`), {d['model']}: "
        f"{c['knees']} val knees, {c['rounds']} rounds, methods interleaved, after a warm-up; one attribution "
        f"at a time in {d['torch_threads']} torch threads on {d['machine']['cpus']} CPUs, 1-minute load average "
        f"{load['min']:.1f} to {load['max']:.1f} (median {load['median']:.1f}). Run beside: "
        f"{c.get('note') or 'not recorded'}.\n\n" + table + "\n"
    )
