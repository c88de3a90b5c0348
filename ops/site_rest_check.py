"""The site calibration's target end to end: a profile from a site's sample, served, graded over REST.

``python -m ops.site_rest_check --site-data ../shared/data/site2 --seeds 7 11 23``
(result ``docs/results/site_rest_check.json``). For each seed it does
what docs/SITES.md tells a hospital to do, with the same commands: draw ``--knees`` random labelled
knees into a ``file,grade`` CSV, ``make site-check SITE=... DATA=<csv>``, ``make serve SITE=...``, then
grades every other knee of the site over REST, once for the site (its profile answers) and once without
(the shipped calibration), and stops the server. A file holding both knees of a patient, graded once by
the site's reader, is scored by the mean of its knees' probabilities decoded by the calibration that
answered (as `train.site_path` scores it from their logits). ``make serve`` must not be running already.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from koa_client.errors import KOAClientError
from koa_client.rest import RestClient
from model.checkpoint import load_checkpoint
from model.contract import InputContract, PostprocessConfig
from model.paths import ROOT, SITE2
from model.postprocess import decode_grades
from model.profile import load_profile
from ops.results import write_result
from train.metrics import quadratic_weighted_kappa
from train.site_sample import read_sample

log = logging.getLogger("ops.site_rest_check")

KEY_FILE = ROOT / "logs" / "serve" / "key_file.json"
PARTS = ("profile", "shipped")  # the site's profile answering, and the shipped calibration


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--site-data", default=str(SITE2), help="the site's labelled knees (<grade>/<image>)")
    p.add_argument("--name", default="restcheck", help="sites/<name>-s<seed>/ is written for each seed")
    p.add_argument("--knees", type=int, default=100, help="the labelled sample a profile is fitted on")
    p.add_argument("--seeds", type=int, nargs="+", default=[7, 11, 23])
    p.add_argument("--work", default=str(ROOT / "cache" / "site_rest_check"), help="where the samples' CSVs go")
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "site_rest_check.json"))
    return p


def make(*targets: str) -> float:
    """Run ``make`` with ``targets`` in the repository; returns its seconds; raises when it fails."""
    t0 = time.perf_counter()
    subprocess.run(["make", *targets], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def graded(answer: dict[str, Any], cfg: PostprocessConfig) -> tuple[str, int | None]:
    """(crop or film, the grade scored against the file's one label) of a served answer."""
    if "knees" not in answer:
        return "crop", int(answer["kl_grade"])
    knees = [k for k in answer["knees"] if "kl_grade" in k]
    if not knees:
        return "film, no knee graded", None
    probs = np.mean([k["probabilities"] for k in knees], axis=0)
    return "film", int(decode_grades(probs[None], cfg)[0])


def grade_over_rest(files: list[Path], labels: list[int], site: str | None, cfg: PostprocessConfig) -> dict[str, Any]:
    """Top-1 and QWK of the answered files over REST (``site``'s profile, or the default), and every outcome."""
    client = RestClient(key_file=KEY_FILE, timeout=120, retry_s=30)
    y, g, outcomes = [], [], Counter()
    for f, label in zip(files, labels, strict=True):
        try:
            kind, grade = graded(client.predict(f.read_bytes(), site=site), cfg)
        except KOAClientError as exc:
            kind, grade = f"refused: {getattr(exc, 'kind', None) or exc}", None
        outcomes[kind] += 1
        if grade is not None:
            y.append(label)
            g.append(grade)
    ya, ga = np.asarray(y), np.asarray(g)
    return {
        "answered": len(ya),
        "outcomes": dict(outcomes),
        "top1": round(float(np.mean(ya == ga)), 4),
        "qwk": round(float(quadratic_weighted_kappa(ya, ga, 5)), 4),
    }


def one_seed(
    seed: int, args: argparse.Namespace, files: list[Path], labels: list[int], contract: InputContract
) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    pick = set(rng.choice(len(files), args.knees, replace=False).tolist())
    csv = Path(args.work) / f"{args.name}-s{seed}.csv"
    csv.parent.mkdir(parents=True, exist_ok=True)
    csv.write_text("file,grade\n" + "".join(f"{files[i].resolve()},{labels[i]}\n" for i in sorted(pick)))
    site = f"{args.name}-s{seed}"
    log.info("seed %d: make site-check SITE=%s on %d knees", seed, site, args.knees)
    check_s = make("site-check", f"SITE={site}", f"DATA={csv}")
    folder = ROOT / "sites" / site
    report = json.loads((folder / "report.json").read_text())
    row: dict[str, Any] = {
        "seed": seed,
        "site_check_seconds": round(check_s, 1),
        "chosen": report.get("calibration", {}).get("chosen"),
        "decision": report["decision"]["decision"],
    }
    others = [i for i in range(len(files)) if i not in pick]
    rest_files, rest_labels = [files[i] for i in others], [labels[i] for i in others]
    if not (folder / "profile.json").is_file():
        row["note"] = "no profile written: the shipped calibration kept"
        return row
    profile = load_profile(folder / "profile.json", contract)
    row["reading"] = profile.reading
    log.info("seed %d: make serve SITE=%s, then %d knees over REST twice", seed, site, len(others))
    make("serve", f"SITE={site}")
    try:
        row["profile"] = grade_over_rest(rest_files, rest_labels, site, profile.applied(contract))
        row["shipped"] = grade_over_rest(rest_files, rest_labels, None, contract.postprocess)
    finally:
        make("stop")
    log.info("seed %d: %s", seed, json.dumps(row))
    return row


def main(args: argparse.Namespace) -> dict[str, Any]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    sample = read_sample(args.site_data)
    if sample.grades is None:
        raise SystemExit(f"{args.site_data}: the check needs grades (<grade>/<image> folders or a CSV)")
    contract = load_checkpoint(ROOT / "weights" / "oamen.ckpt")["contract"]
    rows = [one_seed(s, args, sample.files, sample.grades, contract) for s in args.seeds]
    served = [r for r in rows if "profile" in r]
    mean = {p: {k: round(float(np.mean([r[p][k] for r in served])), 4) for k in ("top1", "qwk")} for p in PARTS}
    if not served:
        mean = None
    result = {
        "what": f"a profile fitted by make site-check on {args.knees} random labelled knees of {args.site_data}, "
        "served by make serve SITE=..., every other knee graded over REST with the profile and without it",
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": {"name": contract.model_name, "version": contract.model_version},
        "seeds": rows,
        "mean": mean,
    }
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main(get_args_parser().parse_args())
