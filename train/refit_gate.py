"""Refit the knee gate of a calibrated grader on its knees as other sites frame them.

``python -m train.refit_gate --checkpoint weights/oamen.ckpt --out runs/gate/oamen.ckpt --version 1.2.0``
Only the gate changes; writes the checkpoint and ``gate.json`` beside it. Why, and how: docs/TRAINING.md
(`train.refit_gate`).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from model.paths import LEGFILMS
from train.data import scan
from train.knee_gate import fit_framed_gate, gate_features, gate_fit_knees, gate_scores, gate_threshold, tune_film_knees

log = logging.getLogger("train.refit_gate")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default="weights/oamen.ckpt", help="a calibrated OA-MEN checkpoint")
    p.add_argument("--data", default=None, help="dataset root (default: the run's)")
    p.add_argument("--out", required=True, help="where to write the checkpoint with the refitted gate")
    p.add_argument("--framed-share", type=float, default=1.0, help="framed copies per knee, as a share of the knees")
    p.add_argument("--max-gate-fit", type=int, default=3000, help="training knees used to fit the gate (calibrate's)")
    p.add_argument("--films", default=str(LEGFILMS), help="leg films whose tune AP knees must pass")
    p.add_argument("--boxes", default="annotations/legfilms.csv", help="the knee boxes of --films")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="calibrate's seed: the same training knees")
    p.add_argument("--version", required=True, help="model_version of the new weights (a new gate is a new version)")
    return p


def main(args: argparse.Namespace) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    state = load_checkpoint(args.checkpoint)
    config = json.loads(state["config"]) if isinstance(state.get("config"), str) else state.get("config") or {}
    if "tune_files" not in config:
        raise ValueError(f"{args.checkpoint} carries no run config with its tune fold: refit the gate of a trained run")
    net, contract = model_from_checkpoint(args.checkpoint)
    net = net.eval().to(memory_format=torch.channels_last)
    if not hasattr(net, "knee_gate"):
        raise ValueError(f"{contract.model_name} has no knee gate")
    k = contract.num_classes
    samples = scan(args.data or config["data"], k)
    by_path = {str(s.path): s for s in samples}
    missing = [f for f in config["tune_files"] if f not in by_path]
    if missing:
        raise FileNotFoundError(f"{len(missing)} tune files are not under the dataset, e.g. {missing[0]}: pass --data")
    tune = [by_path[f] for f in config["tune_files"]]
    gate_fit = gate_fit_knees(samples, tune, args.max_gate_fit, args.seed)  # the knees train.calibrate draws
    log.info("%d training knees and %d tune knees, each set joined by framed copies", len(gate_fit), len(tune))

    def layers(_name: str, images: np.ndarray) -> list[np.ndarray]:
        return gate_features(net, images, contract, args.batch_size)[1]

    framed = fit_framed_gate(net, contract, gate_fit, tune, args.framed_share, args.seed, layers)
    s_ref, n_plain = framed.tune_scores, framed.tune_knees
    film_knees = tune_film_knees(args.films, args.boxes, contract)
    s_films = gate_scores(net, layers("tunefilms", film_knees)) if len(film_knees) else np.zeros(0)
    _, threshold = gate_threshold(s_ref, s_films, 1.0)  # the largest score, plain, framed or a film's
    post = contract.postprocess.__dict__ | {"gate_threshold": round(threshold, 3)}
    new = contract.replace(postprocess=post, model_version=args.version)
    extra = {key: v for key, v in state.items() if key in ("epoch", "metrics", "config")}
    out = save_checkpoint(args.out, net.to(memory_format=torch.contiguous_format), new, **extra)
    report = {
        "checkpoint": str(args.checkpoint),
        "out": str(out),
        "version": args.version,
        "gate_fit": {"knees": len(gate_fit), "framed_copies": framed.fit_copies},
        "tune": {"knees": n_plain, "framed_copies": framed.tune_copies},
        "threshold": threshold,
        "threshold_from": "tune films" if len(s_films) and s_films.max() >= s_ref.max() else "tune fold",
        "tune_scores": {
            "plain_p50": float(np.median(s_ref[:n_plain])),
            "plain_max": float(s_ref[:n_plain].max()),
            "framed_p50": float(np.median(s_ref[n_plain:])),
            "framed_max": float(s_ref[n_plain:].max()),
        },
        "tune_film_knees": {"knees": len(s_films), "max_score": float(s_films.max()) if len(s_films) else None},
        "gate": {
            "layers": list(net.cfg.gate_layers),
            "loc": net.knee_gate.loc.tolist(),
            "scale": net.knee_gate.scale.tolist(),
        },
    }
    (Path(out).parent / "gate.json").write_text(json.dumps(report, indent=2))
    log.info("gate threshold %.3f (%s); wrote %s", threshold, report["threshold_from"], out)
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
