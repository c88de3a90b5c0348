"""What the served-format checks share (`ops.int8_trunk`, `ops.fusion_check`): every image of val, site2
(checking only), the non-knee radiographs and the leg films through the handler's request path of two
predictors, and how many answers differ between them (status, grade, refusal reason, per knee for films)
and by how much the probabilities move; and their speed side by side, in alternating rounds."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from handler.service import Predictor
from model.paths import KOA, LEGFILMS, NONKNEE, SITE2
from ops.bench.common import pipeline_rate, rate
from ops.load import image_bodies
from ops.results import DATA_IMAGES

SETS = {  # name -> (folder, file pattern)
    "val": (KOA / "val", "*/*.png"),
    "site2": (SITE2, "*/*.png"),
    "nonknee": (NONKNEE, "*/*.*"),
    "legfilms": (LEGFILMS, "*.jpg"),
}


def answer_key(answer: tuple[int, dict]) -> tuple:
    """What a reader acts on: the status, the grade and the refusal reason (per knee for a film)."""
    status, body = answer
    knees = tuple((k.get("kl_grade"), (k.get("refused") or {}).get("type")) for k in body.get("knees", []))
    return status, body.get("kl_grade"), (body.get("error") or {}).get("type"), knees


def _probabilities(body: dict) -> list[list[float]]:
    return [b["probabilities"] for b in [body, *body.get("knees", [])] if "probabilities" in b]


def compare_answers(
    predictors: dict[str, Predictor], before: Callable[[str], None] = lambda label: None, batch: int = 8
) -> dict[str, dict]:
    """Each set's images through both ``predictors`` ({label: predictor}, the reference first) in batches of
    ``batch``; ``before(label)`` runs before each of a predictor's batches (to set a process-wide switch)."""
    (ref_label, _), (new_label, _) = predictors.items()
    out = {}
    for name, (folder, pattern) in SETS.items():
        files = sorted(folder.glob(pattern))
        rows = [{"body": f.read_bytes()} for f in files]
        answers = {}
        for label, pred in predictors.items():
            got = []
            for i in tqdm(range(0, len(rows), batch), desc=f"{name} {label}", leave=False):
                before(label)
                got += pred.handle(rows[i : i + batch], [{}] * len(rows[i : i + batch]))
            answers[label] = got
        a, b = answers[ref_label], answers[new_label]
        moved = [
            float(np.abs(np.array(p) - np.array(q)).max())
            for x, y in zip(a, b, strict=True)
            for p, q in zip(_probabilities(x[1]), _probabilities(y[1]), strict=True)
        ]
        differ = [answer_key(x) != answer_key(y) for x, y in zip(a, b, strict=True)]
        out[name] = {
            "images": len(files),
            "answered_200": sum(x[0] == 200 for x in a),
            "answers_differing": sum(differ),
            "differing_files": [str(f.relative_to(folder)) for f, d in zip(files, differ, strict=True) if d],
            "max_probability_change": max(moved, default=0.0),
        }
        print(f"{name}: {out[name]['answers_differing']} of {len(files)} answers differ; "
              f"probabilities move by at most {out[name]['max_probability_change']:.4f}")  # fmt: skip
    return out


def speed_rounds(
    predictors: dict[str, Predictor],
    key: str,
    rounds: int,
    seconds: float,
    before: Callable[[str], None] = lambda label: None,
    batch: int = 8,
) -> dict:
    """Both ``predictors`` timed in alternating order, ``rounds`` times: the model alone on ``batch`` knees
    and their mirrors, the request path at ``batch`` and at 1 (images/s). Each round's rows name their
    predictor under ``key``; ``before(label)`` runs before a predictor is timed. -> rounds and medians."""
    images = image_bodies(DATA_IMAGES, 64)
    c = next(iter(predictors.values())).contract
    x = torch.randn(2 * batch, c.channels, c.input_size, c.input_size).contiguous(memory_format=torch.channels_last)
    order = list(predictors.items())
    rows = []
    for k in range(rounds):
        for label, pred in order if k % 2 == 0 else order[::-1]:
            before(label)
            with torch.inference_mode():
                model = rate(lambda p=pred: p.scripted.forward_with_gate(x), 2 * batch, seconds / 2)
            row = {"round": k + 1, key: label, f"model_ips_b{2 * batch}": model,
                   f"pipeline_ips_b{batch}": pipeline_rate(pred, images, batch, seconds),
                   "pipeline_ips_b1": pipeline_rate(pred, images, 1, seconds / 2)}  # fmt: skip
            rows.append(row)
            print(row)
    measures = [m for m in rows[0] if "ips" in m]
    median = {f: {m: statistics.median(r[m] for r in rows if r[key] == f) for m in measures} for f in predictors}
    return {"rounds": rows, "median": median}


def ratios(median: dict[str, dict[str, float]], new: str, reference: str) -> dict[str, float]:
    """Each measure's median of ``new`` over ``reference`` (`speed_rounds`)."""
    return {m: median[new][m] / median[reference][m] for m in median[reference]}
