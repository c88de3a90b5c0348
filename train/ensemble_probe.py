"""How far averaging the models we have would go: an upper bound for the served architecture.

``python -m train.ensemble_probe --out docs/model/ensembles.json ship=weights/oamen.ckpt NAME=CHECKPOINT ...``
How each combination is decoded: docs/TRAINING.md (`train.ensemble_probe`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

from model.contract import PostprocessConfig
from model.paths import KOA
from model.postprocess import decode_grades
from train.calibration import fit_cutpoints, fit_temperature, view_probabilities
from train.metrics import quadratic_weighted_kappa, roc_auc_ovr


def logits(name: str, path: str, work: Path, data: str, tune_files: set[str]) -> dict[str, np.ndarray]:
    cached = work / f"{name}.npz"
    if cached.is_file():
        return dict(np.load(cached))
    # deliberate lazy load: torch and the models only when the logits are not cached yet
    import torch

    from model.checkpoint import model_from_checkpoint  # lazy, as above
    from train.answers import model_outputs  # lazy, as above
    from train.data import prepare_all, scan  # lazy, as above

    net, contract = model_from_checkpoint(path)
    net = net.float().to(memory_format=torch.channels_last)
    samples = scan(data)
    splits = {
        "val": [s for s in samples if s.split == "val"],
        "tune": [s for s in samples if str(s.path) in tune_files],
    }
    out = {}
    for split, chosen in splits.items():
        images = prepare_all(chosen, contract, "cache", desc=split)
        k = contract.num_classes
        out[split] = model_outputs(net, images, contract)[:, :k]
        out[f"{split}_flip"] = model_outputs(net, images, contract, True)[:, :k]
        out[f"{split}_y"] = np.array([s.grade for s in chosen])
    np.savez(cached, **out)
    return out


def probabilities(models: dict, combo: tuple[str, ...], split: str, flip: bool) -> np.ndarray:
    """The models' probabilities averaged, each calibrated on the tune fold as `train.calibrate` does."""
    suffixes = ("", "_flip") if flip else ("",)
    out = []
    for name in combo:
        logits = {s: np.stack([models[name][f"{s}{v}"] for v in suffixes], axis=1) for s in ("tune", split)}
        cfg = PostprocessConfig(temperature=fit_temperature(logits["tune"], models[name]["tune_y"]))
        out.append(view_probabilities(logits[split], cfg))
    return np.mean(out, 0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", help="NAME=CHECKPOINT")
    p.add_argument("--data", default=str(KOA))
    p.add_argument("--run", default="runs/oamen_pt", help="the run whose config.json lists the tune fold")
    p.add_argument("--work", type=Path, default=Path("reports/ensemble_probe"))
    p.add_argument("--out", type=Path, default=Path("docs/model/ensembles.json"))
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    tune_files = set(json.loads((Path(args.run) / "config.json").read_text())["tune_files"])
    specs = dict(m.split("=", 1) for m in args.models)
    models = {n: logits(n, path, args.work, args.data, tune_files) for n, path in specs.items()}
    first = models[next(iter(models))]
    y_val, y_tune = first["val_y"], first["tune_y"]
    k = first["val"].shape[1]
    rows = []
    for r in range(1, len(models) + 1):
        for combo in itertools.combinations(models, r):
            for flip in (False, True):
                tune, val = probabilities(models, combo, "tune", flip), probabilities(models, combo, "val", flip)
                rules = {
                    "argmax": PostprocessConfig(),
                    "cut-points": PostprocessConfig(decision="cutpoints", cutpoints=fit_cutpoints(tune, y_tune)),
                }
                for rule, cfg in rules.items():
                    grades = decode_grades(val, cfg)
                    rows.append(
                        {
                            "models": list(combo),
                            "mirror": flip,
                            "passes": len(combo) * (2 if flip else 1),
                            "rule": rule,
                            "val_top1": round(float((grades == y_val).mean()), 4),
                            "val_qwk": round(quadratic_weighted_kappa(y_val, grades, k), 4),
                            "val_macro_auc": round(float(np.mean(roc_auc_ovr(y_val, val))), 4),
                            "val_kl1_recall": round(float((grades[y_val == 1] == 1).mean()), 4),
                        }
                    )
    best = {key: max(rows, key=lambda row: row[key]) for key in ("val_top1", "val_qwk", "val_macro_auc")}
    result = {"models": specs, "n_val": int(len(y_val)), "n_tune": int(len(y_tune)), "best_by": best, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for key, row in best.items():
        print(f"best {key}: {row}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
