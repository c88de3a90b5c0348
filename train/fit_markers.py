"""Fit and measure the burned-in R/L marker reader (`model.markers`).

``python -m train.fit_markers --out runs/markers --weights weights/markers.pt --report docs/model/markers.json``
The training patches, the threshold and the measurement: docs/TRAINING.md (`train.fit_markers`).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from model.markers import CLASSES, MarkerConfig, MarkerNet, candidates, classify, patches, read_markers, save_reader
from train.films import film_split

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
PIL_FONTS = [
    "DejaVuSans-Bold.ttf",
    "DejaVuSans.ttf",
    "DejaVuSansCondensed-Bold.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSansMono.ttf",
]
HERSHEY = [cv2.FONT_HERSHEY_SIMPLEX, cv2.FONT_HERSHEY_DUPLEX, cv2.FONT_HERSHEY_COMPLEX, cv2.FONT_HERSHEY_TRIPLEX]
OTHERS = "ABCDEFGHIJKMNOPQSTUVWXYZ0123456789"
WORDS = ["KNEE", "ANKLE", "AP", "LAT", "STANDING", "Ankle J.B/V", "PA", "WB"]


@dataclass(frozen=True)
class Mark:
    """A burned-in side marker on a film: its letter (R or L), whether it is mirrored, its box (x0, y0, x1, y1)."""

    letter: str
    mirrored: bool
    box: tuple[int, int, int, int]


@dataclass
class MarkedFilm:
    """A film to measure the reader on: its name, its gray pixels and its annotated markers."""

    name: str
    gray: np.ndarray
    marks: list[Mark]


def read_markers_csv(path: str | Path) -> dict[str, list[Mark]]:
    """file -> its markers (`Mark`); a film annotated without marker maps to []."""
    out: dict[str, list] = {}
    lines = [line for line in Path(path).read_text().splitlines() if not line.startswith("#")]
    for row in csv.DictReader(lines):
        marks = out.setdefault(row["file"], [])
        if row["letter"]:
            box = tuple(int(row[k]) for k in ("x0", "y0", "x1", "y1"))
            marks.append(Mark(row["letter"], row["mirrored"] == "1", box))
    return out


# --- synthesis ---------------------------------------------------------------------------------


def glyph(ch: str, height: int, rng: np.random.Generator) -> np.ndarray:
    """A glyph's alpha (h, w) float32 in [0, 1], about ``height`` pixels tall, tight box."""
    big = 96
    if rng.random() < 0.6:
        font = ImageFont.truetype(str(FONT_DIR / PIL_FONTS[rng.integers(len(PIL_FONTS))]), big)
        im = Image.new("L", (big * 2, big * 2), 0)
        ImageDraw.Draw(im).text(
            (big // 2, big // 4), ch, fill=255, font=font, stroke_width=int(rng.integers(0, 4)), stroke_fill=255
        )
        a = np.asarray(im, np.float32) / 255
    else:
        a = np.zeros((big * 2, big * 2), np.uint8)
        cv2.putText(
            a,
            ch,
            (big // 2, big + big // 2),
            HERSHEY[rng.integers(len(HERSHEY))],
            3.0,
            255,
            int(rng.integers(3, 14)),
            cv2.LINE_AA,
        )
        a = a.astype(np.float32) / 255
    ys, xs = np.nonzero(a > 0.3)
    a = a[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    scale = height / a.shape[0] * rng.uniform(0.9, 1.1)
    a = cv2.resize(
        a,
        (max(2, round(a.shape[1] * scale * rng.uniform(0.85, 1.15))), max(2, round(a.shape[0] * scale))),
        interpolation=cv2.INTER_AREA,
    )
    return a


def rotate(a: np.ndarray, deg: float) -> np.ndarray:
    h, w = a.shape
    side = int(np.ceil(np.hypot(h, w))) + 2
    c = np.zeros((side, side), np.float32)
    c[(side - h) // 2 : (side - h) // 2 + h, (side - w) // 2 : (side - w) // 2 + w] = a
    m = cv2.getRotationMatrix2D((side / 2, side / 2), deg, 1.0)
    r = cv2.warpAffine(c, m, (side, side), flags=cv2.INTER_LINEAR)
    ys, xs = np.nonzero(r > 0.05)
    return r[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] if len(ys) else r


def paste(
    img: np.ndarray, a: np.ndarray, x: int, y: int, level: float, dark_label: bool
) -> tuple[int, int, int, int] | None:
    """Composite alpha ``a`` at (x, y) in place; returns the glyph's box (x1, y1 exclusive) or None off-film."""
    h, w = a.shape
    H, W = img.shape
    if x < 0 or y < 0 or x + w > W or y + h > H:
        return None
    region = img[y : y + h, x : x + w].astype(np.float32)
    if dark_label:
        pad = max(1, h // 6)
        y0, y1, x0, x1 = max(0, y - pad), min(H, y + h + pad), max(0, x - pad), min(W, x + w + pad)
        img[y0:y1, x0:x1] = (img[y0:y1, x0:x1] * 0.15).astype(np.uint8)
        region = img[y : y + h, x : x + w].astype(np.float32)
    img[y : y + h, x : x + w] = np.clip(region * (1 - a) + level * a, 0, 255).astype(np.uint8)
    ys, xs = np.nonzero(a > 0.35)
    if not len(ys):
        return None
    return (x + int(xs.min()), y + int(ys.min()), x + int(xs.max()) + 1, y + int(ys.max()) + 1)


def synth(gray: np.ndarray, rng: np.random.Generator, letters: int = 2, others: int = 3) -> tuple[np.ndarray, list]:
    """A film with letters composited on it, and their (box, class index) (0 for the other glyphs)."""
    img = gray.copy()
    if rng.random() < 0.3:  # another film's exposure
        img = np.clip(255 * (img / 255.0) ** rng.uniform(0.6, 1.6), 0, 255).astype(np.uint8)
    longer = max(img.shape)
    placed: list = []
    taken = np.zeros(img.shape, bool)
    plan = [(c, 1) for c in rng.choice(["R", "L"], letters)] + [(c, 0) for c in rng.choice(list(OTHERS), others)]
    for ch, is_letter in plan:
        height = int(np.clip(longer * np.exp(rng.uniform(np.log(0.015), np.log(0.08))), 8, None))
        a = glyph(ch, height, rng)
        mirrored = bool(rng.random() < 0.3)
        if mirrored:
            a = a[:, ::-1]
        a = rotate(a, rng.normal(0, 8) if rng.random() < 0.8 else rng.uniform(-25, 25))
        if rng.random() < 0.5:
            a = cv2.GaussianBlur(a, (0, 0), rng.uniform(0.3, 1.2))
        # Near an edge or corner most of the time, as markers are; anywhere otherwise.
        H, W = img.shape
        for _ in range(10):
            if rng.random() < 0.6:
                x = (
                    int(rng.choice([rng.uniform(0, 0.2), rng.uniform(0.8, 1.0)]) * W)
                    if rng.random() < 0.7
                    else int(rng.uniform(0, W))
                )
                y = int(rng.uniform(0, H))
            else:
                x, y = int(rng.uniform(0, W)), int(rng.uniform(0, H))
            x, y = min(x, W - a.shape[1] - 1), min(y, H - a.shape[0] - 1)
            if (
                x >= 0
                and y >= 0
                and not taken[max(0, y - 4) : y + a.shape[0] + 4, max(0, x - 4) : x + a.shape[1] + 4].any()
            ):
                break
        else:
            continue
        box = paste(img, a, x, y, rng.uniform(190, 255), bool(rng.random() < 0.25))
        if box is None:
            continue
        taken[box[1] : box[3], box[0] : box[2]] = True
        cls = 0 if not is_letter else {"R": 1, "L": 2}[ch] + (2 if mirrored else 0)
        placed.append((box, cls))
        if is_letter and rng.random() < 0.4:  # a word beneath, as the modality prints it
            word = str(rng.choice(WORDS))
            wh = max(6, int(height * rng.uniform(0.4, 0.7)))
            wa = np.zeros((wh * 2, wh * len(word) * 2), np.uint8)
            cv2.putText(
                wa,
                word,
                (0, int(wh * 1.5)),
                HERSHEY[rng.integers(len(HERSHEY))],
                wh / 22,
                255,
                max(1, wh // 8),
                cv2.LINE_AA,
            )
            wa = wa.astype(np.float32) / 255
            ys, xs = np.nonzero(wa > 0.3)
            if len(ys):
                wa = wa[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
                wx, wy = (box[0] + box[2]) // 2 - wa.shape[1] // 2, box[3] + max(2, height // 3)
                wbox = paste(img, wa, wx, wy, rng.uniform(190, 255), bool(rng.random() < 0.5))
                if wbox is not None:
                    taken[wbox[1] : wbox[3], wbox[0] : wbox[2]] = True
    if rng.random() < 0.5:
        img = np.clip(img + rng.normal(0, rng.uniform(1, 5), img.shape), 0, 255).astype(np.uint8)
    if rng.random() < 0.5:
        ok, enc = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(60, 96))])
        img = cv2.imdecode(enc, cv2.IMREAD_GRAYSCALE)
    return img, placed


def iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def labelled(gray: np.ndarray, truth: list, cfg: MarkerConfig) -> tuple[np.ndarray, np.ndarray]:
    """The film's candidate patches and their labels; a candidate that only partly covers a glyph is left out."""
    boxes, labels = [], []
    for c in candidates(gray, cfg):
        best = max(((iou(c, b), k) for b, k in truth), default=(0.0, 0))
        if best[0] >= 0.5:
            boxes.append(c)
            labels.append(best[1])
        elif best[0] < 0.1:
            boxes.append(c)
            labels.append(0)
    return patches(gray, boxes, cfg), np.array(labels, np.int64)


def load(films: Path, names: list[str]) -> dict[str, np.ndarray]:
    return {n: cv2.imread(str(films / n), cv2.IMREAD_GRAYSCALE) for n in names}


def dataset(grays: dict[str, np.ndarray], marks: dict, cfg: MarkerConfig, copies: int, seed: int, real_copies: int):
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for name, g in grays.items():
        truth = [(m.box, {"R": 1, "L": 2}[m.letter] + (2 if m.mirrored else 0)) for m in marks.get(name, [])]
        x, y = labelled(g, truth, cfg)
        reps = real_copies if truth else 1
        xs += [x] * reps
        ys += [y] * reps
        for _ in range(copies):
            img, placed = synth(g, rng)
            x, y = labelled(img, placed + truth, cfg)
            xs.append(x)
            ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


# --- fitting -----------------------------------------------------------------------------------


def train_one_epoch(
    net: nn.Module, x: np.ndarray, y: np.ndarray, opt, sched, rng: np.random.Generator, batch: int = 256
) -> float:
    net.train()
    order = rng.permutation(len(x))
    weights = torch.tensor([1.0, 2.0, 2.0, 2.0, 2.0])
    total = 0.0
    for i in range(0, len(order), batch):
        idx = order[i : i + batch]
        xb = torch.from_numpy(x[idx])
        # Contrast and brightness jitter: patches are stretched min to max, so a mild gamma is what varies.
        xb = xb.clamp(0, 1) ** torch.empty(len(idx), 1, 1, 1).uniform_(0.7, 1.4)
        loss = nn.functional.cross_entropy(net(xb), torch.from_numpy(y[idx]), weight=weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        total += float(loss) * len(idx)
    return total / len(x)


def evaluate(net: nn.Module, x: np.ndarray, y: np.ndarray) -> dict:
    net.eval()
    p = classify(net, x)
    pred = p.argmax(1)
    return {
        "patches": int(len(y)),
        "accuracy": round(float((pred == y).mean()), 4),
        "letter_recall": round(float((pred[y > 0] == y[y > 0]).mean()), 4) if (y > 0).any() else None,
    }


# --- measuring films ---------------------------------------------------------------------------


def score_film(found, truth: list[Mark]) -> dict[str, int]:
    """Claims against the annotation: a claim on a marker's box (centre inside it, grown by half) with its
    letter is right, with the other letter wrong; a claim elsewhere is a false claim; a marker without
    a right claim is missed."""
    right = wrong = false = 0
    hit = set()
    for m in found:
        cx, cy = (m.box[0] + m.box[2]) / 2, (m.box[1] + m.box[3]) / 2
        on = None
        for k, b in enumerate(t.box for t in truth):
            gx, gy = (b[2] - b[0]) / 2, (b[3] - b[1]) / 2
            if b[0] - gx <= cx <= b[2] + gx and b[1] - gy <= cy <= b[3] + gy:
                on = k
        if on is None:
            false += 1
        elif truth[on].letter == m.letter:
            right += 1
            hit.add(on)
        else:
            wrong += 1
    return {"right": right, "wrong": wrong, "missed": len(truth) - len(hit), "false_claims": false}


def measure(reader, items: list[MarkedFilm], threshold: float | None = None) -> dict:
    total = {
        "films": len(items),
        "markers": 0,
        "right": 0,
        "wrong": 0,
        "missed": 0,
        "false_claims": 0,
        "films_without_marker": 0,
        "films_without_marker_claimed": 0,
    }
    details = []
    for item in items:
        name, g, truth = item.name, item.gray, item.marks
        found = read_markers(reader, g, threshold)
        s = score_film(found, truth)
        for k, v in s.items():
            total[k] += v
        total["markers"] += len(truth)
        if not truth:
            total["films_without_marker"] += 1
            total["films_without_marker_claimed"] += bool(found)
        if any(s[k] for k in ("wrong", "missed", "false_claims")):
            details.append({"film": name, **s, "claims": [[m.letter, list(m.box), round(m.score, 4)] for m in found]})
    total["problems"] = details
    return total


def claim_scores(reader, items: list[MarkedFilm]) -> tuple[list[float], list[float]]:
    """Scores of every claim at threshold 0.5: those that are right, and those that are not (wrong or false)."""
    good, bad = [], []
    for item in items:
        for m in read_markers(reader, item.gray, 0.5):
            s = score_film([m], item.marks)
            (good if s["right"] else bad).append(m.score)
    return good, bad


def claim_rate(reader, paths: list[Path]) -> dict:
    claimed = []
    times = []
    for p in paths:
        g = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
        t = time.perf_counter()
        found = read_markers(reader, g)
        times.append(time.perf_counter() - t)
        if found:
            claimed.append(
                {
                    "image": str(p.relative_to(p.parents[2])),
                    "claims": [[m.letter, list(m.box), round(m.score, 4)] for m in found],
                }
            )
    return {
        "images": len(paths),
        "with_a_claim": len(claimed),
        "rate": round(len(claimed) / max(1, len(paths)), 4),
        "median_ms": round(1000 * float(np.median(times)), 2),
        "claimed": claimed,
    }


def fit(args, train_g, tune_g, marks, cfg) -> tuple[MarkerNet, list[dict]]:
    t0 = time.time()
    xtr, ytr = dataset(train_g, marks, cfg, args.copies, args.seed, args.real_copies)
    xtu, ytu = dataset(tune_g, marks, cfg, 2, args.seed + 1, 1)
    print(
        f"patches: train {len(xtr)} {np.bincount(ytr, minlength=5)}, tune {len(xtu)} {np.bincount(ytu, minlength=5)};",
        f"{time.time() - t0:.0f}s",
    )
    net = MarkerNet(len(CLASSES))
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * ((len(xtr) + 255) // 256)
    )
    rng = np.random.default_rng(args.seed)
    history = []
    for epoch in range(args.epochs):
        loss = train_one_epoch(net, xtr, ytr, opt, sched, rng)
        history.append({"epoch": epoch, "loss": round(loss, 4), "tune": evaluate(net, xtu, ytu)})
        print(history[-1])
    return net.eval(), history


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--films", default="../shared/data/legfilms")
    p.add_argument("--markers", default="annotations/legfilm_markers.csv")
    p.add_argument("--koa-val", default="../shared/data/koa/val")
    p.add_argument("--nonknee", default="../shared/data/nonknee")
    p.add_argument("--out", default="runs/markers")
    p.add_argument("--weights", default=None, help="also save the reader here (e.g. weights/markers.pt)")
    p.add_argument("--report", default=None, help="write the measurements here (e.g. docs/model/markers.json)")
    p.add_argument("--copies", type=int, default=24, help="synthetic views of each training film")
    p.add_argument("--tune-copies", type=int, default=6, help="synthetic views of each tune film")
    p.add_argument("--real-copies", type=int, default=20, help="repeats of a training film's real markers")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--margin", type=float, default=0.02, help="added to the highest score of a wrong tune claim")
    p.add_argument(
        "--floor",
        type=float,
        default=0.9,
        help="the threshold is at least this: 38 tune films with no real marker are a thin basis",
    )
    p.add_argument(
        "--reader", default=None, help="measure these weights (choose the threshold again) instead of fitting"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--test", action="store_true", help="measure the test films (once, at the end)")
    return p


def main(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "args.json").write_text(json.dumps(vars(args), indent=2))
    films = Path(args.films)
    marks = read_markers_csv(args.markers)
    parts = {part: sorted(n for n in marks if film_split(n) == part) for part in ("train", "tune", "test")}
    cfg = MarkerConfig()
    train_g = load(films, parts["train"])
    tune_g = load(films, parts["tune"])
    t0 = time.time()
    history: list[dict] = []
    if args.reader:
        state = torch.load(args.reader, map_location="cpu", weights_only=True)
        net = MarkerNet(len(CLASSES))
        net.load_state_dict(state["model"])
        history = (
            json.loads((Path(args.reader).parent / "history.json").read_text())
            if (Path(args.reader).parent / "history.json").is_file()
            else []
        )
    else:
        net, history = fit(args, train_g, tune_g, marks, cfg)
        (out / "history.json").write_text(json.dumps(history, indent=2))
    print(f"reader ready after {time.time() - t0:.0f}s")

    net.eval()
    reader = (net, cfg)
    # The threshold: the lowest that leaves no wrong or false claim on the tune films (real, and synthetic).
    trng = np.random.default_rng(args.seed + 2)
    tune_items = [MarkedFilm(n, g, marks[n]) for n, g in tune_g.items()]
    synth_items = []
    for n, g in tune_g.items():
        for c in range(args.tune_copies):
            img, placed = synth(g, trng)
            truth = [Mark("R" if k in (1, 3) else "L", k >= 3, b) for b, k in placed if k] + marks[n]
            synth_items.append(MarkedFilm(f"{n}#synth{c}", img, truth))
    good, bad = claim_scores(reader, tune_items + synth_items)
    worst = max(bad, default=0.5)
    threshold = float(min(0.9999, max(args.floor, worst + args.margin)))
    cfg = replace(cfg, threshold=round(threshold, 4))
    reader = (net, cfg)
    tune = {"real": measure(reader, tune_items), "synthetic": measure(reader, synth_items)}
    tune["synthetic"]["problems"] = tune["synthetic"]["problems"][:10]
    print(
        "threshold",
        cfg.threshold,
        "worst wrong tune claim",
        worst,
        "right tune claims kept",
        sum(s >= cfg.threshold for s in good),
        "of",
        len(good),
    )
    save_reader(net, cfg, out / "markers.pt")
    if args.weights:
        save_reader(net, cfg, args.weights)
    n_params = sum(p.numel() for p in net.parameters())
    report = {
        "what": "burned-in R/L marker reader (model.markers), fitted by train.fit_markers",
        "annotation": args.markers,
        "config": asdict(cfg),
        "parameters": n_params,
        "weights_bytes": (out / "markers.pt").stat().st_size,
        "split": {k: len(v) for k, v in parts.items()},
        "markers_annotated": {k: sum(len(marks[n]) for n in v) for k, v in parts.items()},
        "threshold_rule": "lowest probability above every wrong or false claim on the tune films "
        "(real and synthetic), plus the margin, and at least the floor",
        "floor": args.floor,
        "right_tune_claims_at_0.5": len(good),
        "right_tune_claims_kept": sum(s >= cfg.threshold for s in good),
        "worst_wrong_tune_score": round(worst, 4),
        "tune": tune,
        "history": history[-1:],
    }
    if args.test:
        test_g = load(films, parts["test"])
        items = [MarkedFilm(n, g, marks[n]) for n, g in test_g.items()]
        report["test"] = measure(reader, items)
        # Timed on one thread as well: a 7k-parameter net on a handful of patches gains nothing from
        # more, and on cores shared with other work the threads' synchronisation can cost 100x.
        report["ms_per_film"] = {}
        for threads in (1, args.threads):
            torch.set_num_threads(threads)
            times = []
            for item in items:
                t = time.perf_counter()
                read_markers(reader, item.gray)
                times.append(time.perf_counter() - t)
            report["ms_per_film"][f"{threads}_threads"] = {
                "median": round(1000 * float(np.median(times)), 2),
                "p95": round(1000 * float(np.percentile(times, 95)), 2),
            }
        torch.set_num_threads(1)
        report["koa_val_crops"] = claim_rate(reader, sorted(Path(args.koa_val).rglob("*.png")))
        report["nonknee"] = claim_rate(reader, sorted(Path(args.nonknee).rglob("*.jpg")))
        print(json.dumps({k: report[k] for k in ("test", "ms_per_film")}, indent=1))
        print(
            {k: {kk: report[k][kk] for kk in ("images", "with_a_claim", "rate")} for k in ("koa_val_crops", "nonknee")}
        )
    (out / "report.json").write_text(json.dumps(report, indent=2))
    if args.report:
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
