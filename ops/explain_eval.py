"""Measure every explanation method on val knees: localisation, faithfulness, a sanity check, CPU time.

``python -m ops.explain_eval [--data ../shared/data/koa] [--knees 40] [--slow-knees 16] [--sanity-knees 6]
[--layer-knees 20] [--seed 0] [--note "..."] [--copy docs/results/explain_eval.json]``: every method of
`handler.explain` on a seeded sample of val knees, with the measures of `ops.explain_metrics`; writes
``--json`` and the committed copy that docs/EXPLAIN.md is rendered from. What is measured, and how: that page.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from handler.explain import (
    METHODS,
    attribute,
    blurred,
    branch_stages,
    cam_layer,
    heat_grid,
    layer_cams,
)
from model.checkpoint import model_from_checkpoint
from model.paths import KOA
from model.postprocess import calibrated_probabilities, finish
from model.preprocess import prepare, to_model_input
from ops.explain_metrics import (
    FRACTIONS,
    auc,
    band_share,
    cascade_groups,
    cell_order,
    joint_mask,
    perturbed,
    randomise,
    sample_knees,
    share,
    spearman,
)
from ops.results import ROOT, write_result

log = logging.getLogger(__name__)
SLOW = ("ig", "occlusion")
CELL = 8  # px at 224: the deletion and insertion curves move 28 x 28 cells
SANITY_SIZE = 56  # maps are compared at this size (Spearman over 56 x 56 values)
EDGE_ROWS = 0.15  # the crop's top rows whose heat issue 34 reported


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=KOA)
    p.add_argument("--split", default="val", help="never test: its figures are measured independently")
    p.add_argument("--checkpoint", type=Path, default=ROOT / "weights" / "oamen.ckpt")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--knees", type=int, default=40, help="knees in the sample, the same number per grade")
    p.add_argument("--slow-knees", type=int, default=16, help=f"knees the slow methods {SLOW} run on")
    p.add_argument("--sanity-knees", type=int, default=6, help="knees of the cascading randomisation")
    p.add_argument("--layer-knees", type=int, default=20, help="knees of the per-layer CAM study")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default, as served")
    p.add_argument("--note", default="", help="what else ran on the machine, kept in the JSON")
    p.add_argument(
        "--time-only",
        action="store_true",
        help="only time each method on the first --knees knees (interleaved rounds, after a warm-up); "
        "writes --json and --copy (docs/results/explain_time.json)",
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds over the knees with --time-only")
    p.add_argument("--json", type=Path, default=ROOT / "reports" / "explain_eval.json")
    p.add_argument(
        "--copy",
        type=lambda text: Path(text) if text else None,
        default=ROOT / "docs" / "results" / "explain_eval.json",
        help="a second copy of the JSON, committed ('' for none)",
    )
    return p


def probabilities(net: torch.nn.Module, batch: torch.Tensor, contract) -> np.ndarray:
    """(N, C, H, W) -> (N, K) calibrated probabilities of the eager model, one pass (no mirror)."""
    with torch.no_grad():
        return calibrated_probabilities(net(batch).numpy(), contract.postprocess)


def served_grade(net: torch.nn.Module, x: torch.Tensor, contract) -> int:
    """The grade the server answers for ``x``: mirror-averaged, calibrated, decoded (`model.postprocess`)."""
    with torch.no_grad():
        out, flipped = net(x).numpy(), net(torch.flip(x, dims=[3])).numpy()
    return int(
        finish(out, contract.postprocess, contract.num_classes, flipped if contract.postprocess.flip_tta else None)[
            "grades"
        ][0]
    )


def curves(net, x, base, order, grade, contract) -> tuple[float, float]:
    """Deletion and insertion AUCs of the grade's probability for cells taken in ``order``."""
    out = []
    for mode in ("deletion", "insertion"):
        p = probabilities(net, perturbed(x, base, order, CELL, mode), contract)[:, grade]
        out.append(auc(p, FRACTIONS))
    return out[0], out[1]


def edges_map(prepared: np.ndarray) -> np.ndarray:
    """A reference that is not an explanation: the image's edge strength (Sobel), smoothed, in [0, 1]."""
    g = prepared.astype(np.float32)
    mag = cv2.magnitude(cv2.Sobel(g, cv2.CV_32F, 1, 0), cv2.Sobel(g, cv2.CV_32F, 0, 1))
    mag = cv2.GaussianBlur(mag, (0, 0), 2.0)
    return np.clip(mag / max(float(np.percentile(mag, 99.5)), 1e-6), 0, 1)


def localisation(heat: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    grid = heat_grid(heat)
    rows = np.asarray(grid).sum(1)
    return {
        "joint": share(heat, mask),
        "band": band_share(grid),
        "top": band_share(grid, 0.0, EDGE_ROWS),
        "hottest_row_in_top": float(int(np.argmax(rows)) < int(EDGE_ROWS * len(rows))),
    }


def trunk_share(net, x: torch.Tensor, grade: int) -> float | None:
    """The trunk's share of sum |gradient x feature| over the head's input (the rest: the parallel branch)."""
    width = getattr(getattr(net, "cfg", None), "fusion_channels", None)
    if width is None or getattr(net, "mobile", None) is None:
        return None
    with torch.enable_grad():
        feats = net.forward_features(x).detach().requires_grad_(True)
        (g,) = torch.autograd.grad(net.forward_head(feats)[0, grade], feats)
    contrib = (g * feats).abs()[0]
    return float(contrib[:width].sum() / contrib.sum())


def edge_study(net, x, base, mask_rows: tuple[int, int], grade: int, contract) -> dict[str, float]:
    """Probability change of the grade when bands of rows as tall as the top 15% are blurred away."""
    h = x.shape[-2]
    tall = round(EDGE_ROWS * h)
    centre = (mask_rows[0] + mask_rows[1]) // 2
    bands = {
        "top": (0, tall),
        "joint": (max(0, centre - tall // 2), max(0, centre - tall // 2) + tall),
        "bottom": (h - tall, h),
    }
    images = [x[0]]
    for lo, hi in bands.values():
        y = x[0].clone()
        y[:, lo:hi] = base[0][:, lo:hi]
        images.append(y)
    p = probabilities(net, torch.stack(images), contract)[:, grade]
    return {f"dp_{k}": float(p[i + 1] - p[0]) for i, k in enumerate(bands)}


def study_layers(net, x, grade, mask) -> dict[str, dict[str, float]]:
    """Each layer's Grad-CAM and LayerCAM: joint-region share and top-rows share."""
    named = [(f"trunk C{i + 2}", s) for i, s in enumerate(getattr(net, "stages", []))]
    named.append(("fusion", cam_layer(net)))
    named += [(f"branch stage {i}", s) for i, s in enumerate(branch_stages(net))]
    gc, lc = layer_cams(net, x, grade, [m for _, m in named])
    out = {}
    h, w = x.shape[-2:]
    for (name, _), a, b in zip(named, gc, lc, strict=True):
        row = {"stride": round(w / a.shape[-1])}
        for key, m in (("gradcam", a), ("layercam", b)):
            heat = F.interpolate(m[None, None].float(), (h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
            loc = localisation(np.clip(heat, 0, None), mask)
            row[f"{key}_joint"], row[f"{key}_top"] = loc["joint"], loc["top"]
        out[name] = row
    return out


def small(heat: np.ndarray) -> np.ndarray:
    return cv2.resize(heat, (SANITY_SIZE, SANITY_SIZE), interpolation=cv2.INTER_AREA)


def sanity(net, knees: list[dict[str, Any]], methods: list[str], seed: int) -> dict[str, Any]:
    """Cascading randomisation: per group level and method, the mean Spearman correlation with the original maps."""
    groups = cascade_groups(net)
    rand = copy.deepcopy(net)
    names = [n for n, _ in groups]
    by_name = dict(cascade_groups(rand))
    result: dict[str, list[float]] = {m: [] for m in methods}
    for level, name in enumerate(tqdm(names, desc="randomising", leave=False)):
        randomise(by_name[name], seed + level)
        for m in methods:
            rho = [spearman(k["maps"][m], small(attribute(rand, k["x"], k["grade"], m))) for k in knees]
            result[m].append(round(float(np.mean(rho)), 3))
    return {"levels": names, "spearman": result, "knees": len(knees)}


def summarise(values: list[float]) -> dict[str, float]:
    return {"mean": round(float(np.mean(values)), 4), "sd": round(float(np.std(values)), 4), "n": len(values)}


def time_methods(net, contract, knees: list[tuple[Path, int]], methods: list[str], rounds: int) -> dict[str, Any]:
    """Seconds per attribution of each method: every method warmed up once, then ``rounds`` rounds over the
    knees, the methods interleaved within each knee so that all see the same drift of a shared machine."""
    inputs = []
    for path, _ in knees:
        x = torch.from_numpy(to_model_input(prepare(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), contract), contract))
        inputs.append((x[None], served_grade(net, x[None], contract)))
    for m in methods:
        attribute(net, inputs[0][0], inputs[0][1], m)
    seconds: dict[str, list[float]] = {m: [] for m in methods}
    loads = []
    for r in range(rounds):
        for x, grade in tqdm(inputs, desc=f"timing round {r + 1}", leave=False):
            order = methods if r % 2 == 0 else list(reversed(methods))
            for m in order:
                t0 = time.perf_counter()
                attribute(net, x, grade, m)
                seconds[m].append(time.perf_counter() - t0)
            loads.append(os.getloadavg()[0])
    return {
        "seconds": {
            m: {"median": round(statistics.median(v), 3), "p90": round(float(np.percentile(v, 90)), 3), "n": len(v)}
            for m, v in seconds.items()
        },
        "loadavg_1min": {
            "min": round(min(loads), 2),
            "median": round(statistics.median(loads), 2),
            "max": round(max(loads), 2),
        },
    }


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    net, contract = model_from_checkpoint(args.checkpoint)
    knees = sample_knees(args.data, args.split, args.knees, args.seed, contract.num_classes)
    if args.time_only:
        timing = time_methods(net, contract, knees, args.methods, args.rounds)
        result = {
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "model": f"{contract.model_name} {contract.model_version}",
            "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
            "torch_threads": torch.get_num_threads(),
            **timing,
        }
        for path in (args.json, args.copy):
            write_result(path, result)
        log.info("%s", json.dumps(timing["seconds"]))
        return 0
    rng = np.random.default_rng(args.seed)
    t_start, load_start = time.monotonic(), os.getloadavg()
    per_method: dict[str, dict[str, list[float]]] = {m: {} for m in [*args.methods, "uniform", "edges", "random"]}
    layers: dict[str, dict[str, list[float]]] = {}
    edge: dict[str, list[float]] = {}
    kept: list[dict[str, Any]] = []
    rows = []
    # Captum's first attribution pays for its set-up: warm each method once before timing
    warm = torch.from_numpy(
        to_model_input(prepare(cv2.imread(str(knees[0][0]), cv2.IMREAD_GRAYSCALE), contract), contract)
    )[None]
    for m in args.methods:
        if m != "occlusion":  # forward passes only: nothing to set up
            attribute(net, warm, 0, m)

    def add(method: str, key: str, value: float | None) -> None:
        if value is not None:
            per_method[method].setdefault(key, []).append(float(value))

    for n, (path, label) in enumerate(tqdm(knees, desc="knees")):
        gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if gray is None:
            raise FileNotFoundError(f"cannot read {path}")
        prepared = prepare(gray, contract)
        x = torch.from_numpy(to_model_input(prepared, contract))[None]
        grade = served_grade(net, x, contract)
        mask = joint_mask(prepared)
        base = blurred(x)
        row: dict[str, Any] = {
            "file": path.name,
            "label": label,
            "grade": grade,
            "joint_area": round(float(mask.mean()), 4),
        }
        maps: dict[str, np.ndarray] = {}
        refs = {"uniform": np.ones(prepared.shape, np.float32), "edges": edges_map(prepared)}
        for name, heat in refs.items():
            for k, v in localisation(heat, mask).items():
                if not (name == "uniform" and k == "hottest_row_in_top"):  # a flat map has no hottest row
                    add(name, k, v)
        d, i = curves(net, x, base, cell_order(refs["edges"], CELL), grade, contract)
        add("edges", "deletion", d)
        add("edges", "insertion", i)
        d, i = curves(net, x, base, cell_order(refs["uniform"], CELL, rng), grade, contract)
        add("random", "deletion", d)
        add("random", "insertion", i)
        for m in args.methods:
            if m in SLOW and n >= args.slow_knees:
                continue
            t0 = time.perf_counter()
            heat = attribute(net, x, grade, m)
            add(m, "seconds", time.perf_counter() - t0)
            add(m, "loadavg_1min", os.getloadavg()[0])
            loc = localisation(heat, mask)
            for k, v in loc.items():
                add(m, k, v)
            d, i = curves(net, x, base, cell_order(heat, CELL), grade, contract)
            add(m, "deletion", d)
            add(m, "insertion", i)
            row[m] = {
                "joint": round(loc["joint"], 3),
                "band": round(loc["band"], 3),
                "deletion": round(d, 3),
                "insertion": round(i, 3),
            }
            maps[m] = small(heat)
        rows.append(row)
        if n < args.layer_knees:
            for name, vals in study_layers(net, x, grade, mask).items():
                for k, v in vals.items():
                    layers.setdefault(name, {}).setdefault(k, []).append(v)
            r0 = int(np.argmax(mask.any(1)))
            r1 = len(mask) - int(np.argmax(mask.any(1)[::-1]))
            for k, v in edge_study(net, x, base, (r0, r1), grade, contract).items():
                edge.setdefault(k, []).append(v)
            upside = torch.flip(x, dims=[2])
            heat = attribute(net, upside, grade, "gradcam")
            grid = heat_grid(heat)
            edge.setdefault("gradcam_top_upside_down", []).append(band_share(grid, 0.0, EDGE_ROWS))
            edge.setdefault("gradcam_bottom_upside_down", []).append(band_share(grid, 1 - EDGE_ROWS, 1.0))
            edge.setdefault("trunk_share", []).append(trunk_share(net, x, grade))
        if n < args.sanity_knees:
            kept.append({"x": x, "grade": grade, "maps": maps})
    sanity_methods = [m for m in args.methods if m not in SLOW]
    checks = sanity(net, kept, sanity_methods, args.seed)
    result = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model": f"{contract.model_name} {contract.model_version}",
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": [round(v, 2) for v in load_start],
        "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        "knees": len(knees),
        "labels": [sum(1 for _, g in knees if g == k) for k in range(contract.num_classes)],
        "grades_answered": [sum(1 for r in rows if r["grade"] == k) for k in range(contract.num_classes)],
        "joint_area": summarise([r["joint_area"] for r in rows]),
        "methods": {
            m: {
                k: (
                    {
                        "median": round(statistics.median(v), 3),
                        "p90": round(float(np.percentile(v, 90)), 3),
                        "n": len(v),
                    }
                    if k in ("seconds", "loadavg_1min")
                    else summarise(v)
                )
                for k, v in vals.items()
            }
            for m, vals in per_method.items()
        },
        "sanity": checks,
        "layers": {name: {k: round(float(np.mean(v)), 3) for k, v in vals.items()} for name, vals in layers.items()},
        "edge_study": {k: summarise([v for v in vals if v is not None]) for k, vals in edge.items()},
        "per_knee": rows,
        "took_s": round(time.monotonic() - t_start, 1),
    }
    for path in (args.json, args.copy):
        write_result(path, result)
    log.info("wrote %s", ", ".join(str(p) for p in (args.json, args.copy) if p))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
