"""Measure the drift reference on val and choose the drift window and threshold on data.

``python -m ops.drift_reference [--data ../shared/data/koa] [--site2 ../shared/data/site2]`` (``make drift-reference``)

Every val knee, then every knee of the second hospital, through the served request path in process; the
reference (``--out``, packed into the archive) and the whole choice (``--json``). How the window and the
threshold are chosen: docs/MONITORING.md. The second hospital's knees never reach the model's training.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from handler.memory import keep_freed_memory
from handler.metrics import MemorySink, ObservedPredictor, Telemetry
from model.checkpoint import load_torchscript
from model.drift import FEATURES, OVERALL, REFUSED, DriftReference, KneeRecord, build_reference, window_scores
from model.localize import load_serving_finder
from model.paths import KOA, ROOT, SITE2
from model.precision import served_models
from ops.results import DOC_RESULTS, write_result

log = logging.getLogger(__name__)
GRADE_FEATURES = ("expected_grade", "confidence")
WINDOWS = (100, 150, 200, 300)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=KOA, help="KL-graded folders")
    p.add_argument("--site2", type=Path, default=SITE2)
    p.add_argument("--model", type=Path, default=ROOT / "build" / "oamen.pt", help="the exported model (make export)")
    p.add_argument(
        "--weights", type=Path, default=ROOT / "weights" / "oamen.ckpt", help="checksummed into the reference"
    )
    p.add_argument("--finder", type=Path, default=ROOT / "weights" / "finder.pt")
    p.add_argument("--out", type=Path, default=ROOT / "weights" / "oamen.drift.json")
    p.add_argument("--json", type=Path, default=DOC_RESULTS / "drift_choice.json")
    p.add_argument("--streams", type=int, default=200, help="random val streams per window")
    p.add_argument("--stream-knees", type=int, default=1000, help="knees per quiet stream")
    p.add_argument("--margin", type=float, default=1.5, help="threshold = margin x the largest quiet score")
    p.add_argument("--target", type=int, default=300, help="knees after the switch within which it must fire")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--records", type=Path, default=ROOT / "reports" / "drift" / "records.json",
        help="the measured knee records are kept here; --reuse reads them instead of measuring again",
    )  # fmt: skip
    p.add_argument("--reuse", action="store_true")
    return p


def images(folder: Path) -> list[Path]:
    """The PNGs under ``folder``'s grade folders 0-4, sorted."""
    found = sorted(p for g in range(5) for p in (folder / str(g)).glob("*.png"))
    if not found:
        raise ValueError(f"no PNG under {folder}/0..4: pass --data/--site2 a folder of KL-graded folders")
    return found


def measure(pred: ObservedPredictor, paths: list[Path], name: str, batch: int = 16) -> list[KneeRecord]:
    """The knee records of ``paths``, in batches of ``batch`` through the served request path."""
    out = []
    for i in tqdm(range(0, len(paths), batch), desc=f"knees of {name}", unit="batch"):
        rows = [{"body": p.read_bytes()} for p in paths[i : i + batch]]
        pred.telemetry.begin_batch()
        pred.handle(rows, [{}] * len(rows))
        out.extend(pred.telemetry.knees)
    return out


def patient(path: Path) -> str:
    """The OAI patient of a val file (``<patient id><L|R>.png``): both knees go to one half."""
    return path.stem[:-1]


def stream_max(ref: DriftReference, pool: list[KneeRecord], window: int, knees: int, rng: random.Random) -> float:
    """The largest overall score over a stream of ``knees`` drawn at random from ``pool``, once the window is full."""
    stream = [rng.choice(pool) for _ in range(knees)]
    step = max(window // 10, 1)  # scored every tenth of a window: what a scrape every few seconds sees
    return max(window_scores(ref, stream[i - window : i])[OVERALL] for i in range(window, knees + 1, step))


def knees_to_fire(
    ref: DriftReference, before: list[KneeRecord], after: list[KneeRecord], threshold: float
) -> int | None:
    """Knees of ``after`` sent (after the window was filled with ``before``) when the overall score first
    exceeds ``threshold``; None if it never does."""
    window = ref.window
    stream = before[-window:] + after
    for k in range(1, len(after) + 1):
        if window_scores(ref, stream[k : k + window])[OVERALL] > threshold:
            return k
    return None


def split_patients(paths: list[Path], seed: int) -> tuple[list[Path], list[Path]]:
    """Val's files in two halves by patient (both knees of one patient in one half)."""
    pats = sorted({patient(p) for p in paths})
    random.Random(seed).shuffle(pats)
    half = set(pats[: len(pats) // 2])
    return [p for p in paths if patient(p) in half], [p for p in paths if patient(p) not in half]


def choose(fold_a: list[KneeRecord], fold_b: list[KneeRecord], site_knees: list[KneeRecord], args, meta: dict) -> dict:
    rng = random.Random(args.seed)
    all_val = fold_a + fold_b
    rows = []
    for window in WINDOWS:
        # quiet: reference on one half of val's patients, streams from the other half (both ways)
        quiet = []
        for ref_pool, stream_pool in ((fold_a, fold_b), (fold_b, fold_a)):
            ref = build_reference(ref_pool, **meta, window=window)
            quiet += [stream_max(ref, stream_pool, window, args.stream_knees, rng) for _ in range(args.streams // 2)]
        threshold = float(np.ceil(args.margin * max(quiet) * 100) / 100)
        ref = build_reference(all_val, **meta, window=window, threshold=threshold)
        in_sample = [stream_max(ref, all_val, window, args.stream_knees, rng) for _ in range(args.streams // 4)]
        fire, fire_graded, fire_grades = [], [], []
        graded_only = [r for r in site_knees if not r.refused]
        # the drift the alarm exists for: grades that move while the images look normal
        grades_only = [KneeRecord(False, None, {k: r.values[k] for k in GRADE_FEATURES}) for r in graded_only]
        for _ in range(args.streams // 4):
            before = [rng.choice(all_val) for _ in range(window)]
            fire.append(knees_to_fire(ref, before, rng.sample(site_knees, len(site_knees)), threshold))
            # the same, had the finder refused none of them: the graded knees' own features must raise it
            fire_graded.append(knees_to_fire(ref, before, rng.sample(graded_only, len(graded_only)), threshold))
            # too few graded knees (fewer than a window) to stream without replacement: drawn with it
            fire_grades.append(knees_to_fire(ref, before, rng.choices(grades_only, k=2 * args.target), threshold))
        rows.append(
            {
                "window": window,
                "threshold": threshold,
                "quiet_max_held_out": round(max(quiet), 4),
                "quiet_p99_held_out": round(float(np.percentile(quiet, 99)), 4),
                "quiet_max_in_sample": round(max(in_sample), 4),
                "fired_in_sample": sum(s > threshold for s in in_sample),
                "site2_knees_to_fire": summary(fire),
                "site2_graded_only_knees_to_fire": summary(fire_graded),
                "site2_grades_only_knees_to_fire": summary(fire_grades),
            }
        )
        log.info("window %d: %s", window, rows[-1])

    def fires(r: dict, key: str) -> bool:
        return r[key]["max"] is not None and r[key]["max"] <= args.target

    ok = [r for r in rows if fires(r, "site2_knees_to_fire") and fires(r, "site2_graded_only_knees_to_fire")]
    # among those, the one that catches a pure grade shift most often, then soonest
    grades = "site2_grades_only_knees_to_fire"
    chosen = min(ok or rows, key=lambda r: (r[grades]["never"], r[grades]["median"] or float("inf"), r["window"]))
    return {"candidates": rows, "chosen": {"window": chosen["window"], "threshold": chosen["threshold"]}}


def summary(knees: list[int | None]) -> dict:
    hit = [k for k in knees if k is not None]
    return {
        "streams": len(knees),
        "never": len(knees) - len(hit),
        "median": float(np.median(hit)) if hit else None,
        "max": max(hit) if hit and len(hit) == len(knees) else None,
    }


def main(args: argparse.Namespace) -> dict:
    keep_freed_memory()
    scripted, contract = load_torchscript(args.model)
    val_a, val_b = split_patients(images(args.data / "val"), args.seed)
    site_paths = images(args.site2)
    if args.reuse and args.records.is_file():
        saved = json.loads(args.records.read_text())
        pools = {name: [KneeRecord(**r) for r in recs] for name, recs in saved.items()}
    else:
        cpu = torch.device("cpu")
        eager, fast, dtype = served_models(scripted, contract, cpu)  # as handler.koa_handler builds them
        telemetry = Telemetry(MemorySink(), contract)
        finder = load_serving_finder(args.finder, cpu, dtype)
        pred = ObservedPredictor(fast, eager, contract, cpu, finder, telemetry=telemetry)
        pools = {
            name: measure(pred, paths, name)
            for name, paths in (("val_a", val_a), ("val_b", val_b), ("site2", site_paths))
        }
        write_result(args.records, {name: [asdict(r) for r in recs] for name, recs in pools.items()})
    meta = {
        "model_name": contract.model_name,
        "model_version": contract.model_version,
        "weights_sha256": hashlib.sha256(args.weights.read_bytes()).hexdigest(),
        "measured_on": "val",
    }
    choice = choose(pools["val_a"], pools["val_b"], pools["site2"], args, meta)
    ref = build_reference(pools["val_a"] + pools["val_b"], **meta, **choice["chosen"])
    ref.save(args.out)
    site_knees = pools["site2"]
    result = {
        "reference": {k: v for k, v in asdict(ref).items() if k != "features"} | {"checksum": ref.checksum},
        "features": list(FEATURES) + [REFUSED],
        "val_knees": len(pools["val_a"]) + len(pools["val_b"]),
        "site2_knees": len(site_knees),
        "site2_refused_share": round(sum(r.refused for r in site_knees) / max(len(site_knees), 1), 4),
        "site2_refusals": {
            reason: sum(r.reason == reason for r in site_knees)
            for reason in sorted({str(r.reason) for r in site_knees if r.refused})
        },
        "site2_scores_all": {k: round(v, 4) for k, v in window_scores(ref, site_knees).items()},
        "settings": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("data", "site2")
        },
        **choice,
    }
    write_result(args.json, result)
    log.info("reference -> %s; choice -> %s: %s", args.out, args.json, choice["chosen"])
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(get_args_parser().parse_args())
