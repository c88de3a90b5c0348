"""Site calibration: what can be refitted to one hospital without touching the weights, chosen by cross-fitting.

A site profile changes only how the model's logits become an answer (`model.postprocess`):
temperature, a bias per class, and the ordinal cut-points on the expected grade; or, without labels,
the class bias that corrects for the site's grade mix by EM (Saerens, Latinne and Decaestecker 2002,
"Adjusting the outputs of a classifier to new a priori probabilities"). Each way of fitting is a
`Method`; `cross_fit` measures every method on knees its fit did not see (repeated stratified K-fold
of the labelled sample), and `choose` keeps the shipped decoding unless a method beats it there by
more than the noise. The rule is stated before the figures are read (`choose`).

A site whose single-knee crops are framed unlike the training crops may also be read another way
(`model.localize.READINGS`: ``joint`` cuts each crop around its joint); `cross_fit` then measures every
method on each reading's logits, on the same folds, as the candidates ``joint/<method>``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize

from model.contract import PostprocessConfig
from model.localize import WHOLE  # the shipped reading of a joint crop
from model.postprocess import calibrated_probabilities, confidences, decode_grades, expected_grade

__all__ = [
    "METHODS",
    "Method",
    "candidate",
    "choose",
    "cross_fit",
    "describe",
    "ece",
    "em_prior_bias",
    "fit",
    "parse",
    "probabilities",
    "rule_text",
    "score",
]


def probabilities(logits: np.ndarray, cfg: PostprocessConfig) -> np.ndarray:
    """(N, V, K) logits of V views (the image, its mirror) -> (N, K): each view calibrated, then averaged,
    as the server does (`model.postprocess.finish`)."""
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim == 2:
        x = x[:, None]
    return np.mean([calibrated_probabilities(x[:, v], cfg) for v in range(x.shape[1])], axis=0)


def qwk(labels: np.ndarray, grades: np.ndarray, k: int) -> float:
    """Quadratic weighted kappa without input checks (`train.metrics.quadratic_weighted_kappa` checks
    them): the cut-point search calls it tens of thousands of times."""
    cm = np.bincount(labels * k + grades, minlength=k * k).reshape(k, k).astype(np.float64)
    n = cm.sum()
    i = np.arange(k)
    w = (i[:, None] - i[None, :]) ** 2 / (k - 1) ** 2
    expected = np.outer(cm.sum(1), cm.sum(0)) / n
    den = (w * expected).sum()
    return 1.0 - (w * cm).sum() / den if den > 0 else 0.0


def score(labels: np.ndarray, grades: np.ndarray, k: int) -> float:
    """What cut-points are fitted to and methods chosen by: the mean of top-1 accuracy and quadratic kappa
    (the same rule as `train.calibration.decision_score`)."""
    return 0.5 * (float((grades == labels).mean()) + qwk(labels, grades, k))


def _nll(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())


def fit_temperature_bias(
    logits: np.ndarray, labels: np.ndarray, base: PostprocessConfig, bias: bool, ridge: float = 0.05
) -> PostprocessConfig:
    """Temperature (and, with ``bias``, K centred class biases) by negative log-likelihood, starting from
    ``base``. A small ridge on the change keeps a fit on 50 knees from swinging on a grade it saw twice."""
    k = np.asarray(logits).shape[-1]
    b0 = np.asarray(base.class_bias or (0.0,) * k, dtype=np.float64)
    t0 = np.log(base.temperature)

    def cfg_of(a: np.ndarray) -> PostprocessConfig:
        if not bias:
            return dataclasses.replace(base, temperature=float(np.exp(a[0])))
        b = b0 + a[1:] - a[1:].mean()
        return dataclasses.replace(base, temperature=float(np.exp(a[0])), class_bias=tuple(float(v) for v in b))

    def loss(a: np.ndarray) -> float:
        change = (a[0] - t0) ** 2 + (np.sum(a[1:] ** 2) if bias else 0.0)
        return _nll(probabilities(logits, cfg_of(a)), labels) + ridge * change

    a = minimize(loss, np.r_[t0, np.zeros(k if bias else 0)], method="L-BFGS-B").x
    cfg = cfg_of(a)
    return dataclasses.replace(
        cfg, temperature=round(cfg.temperature, 4), class_bias=tuple(round(b, 4) for b in cfg.class_bias)
    )


def _scores(labels: np.ndarray, e: np.ndarray, cuts: np.ndarray, k: int) -> np.ndarray:
    """`score` of each row of ``cuts`` (C, K-1) on the expected grades ``e``, in one pass (the cut-point searches
    try thousands of candidates)."""
    g = (e[None, :] >= cuts[:, :, None]).sum(axis=1)  # (C, N) grades, as searchsorted(side="right")
    c = len(cuts)
    idx = (np.arange(c)[:, None] * k * k + labels[None, :] * k + g).ravel()
    cm = np.bincount(idx, minlength=c * k * k).reshape(c, k, k).astype(np.float64)
    i = np.arange(k)
    w = (i[:, None] - i[None, :]) ** 2 / (k - 1) ** 2
    n = len(labels)
    expected = cm.sum(2)[:, :, None] * cm.sum(1)[:, None, :] / n
    den = (w * expected).sum(axis=(1, 2))
    kappa = np.where(den > 0, 1.0 - (w * cm).sum(axis=(1, 2)) / np.where(den > 0, den, 1.0), 0.0)
    acc = np.trace(cm, axis1=1, axis2=2) / n
    return 0.5 * (acc + kappa)


def fit_cutpoints(
    probs: np.ndarray, labels: np.ndarray, start: tuple[float, ...] = (), rounds: int = 3
) -> tuple[float, ...]:
    """K-1 increasing cut-points on the expected grade maximising `score` (coordinate search from ``start``,
    the shipped cut-points when there are any, so that ties keep them)."""
    k = probs.shape[1]
    e = expected_grade(probs)
    y = np.asarray(labels, dtype=np.int64)
    cuts = np.asarray(start if len(start) == k - 1 else np.arange(k - 1) + 0.5, dtype=np.float64)
    for _ in range(rounds):
        for j in range(k - 1):
            lo = cuts[j - 1] + 1e-3 if j > 0 else 0.0
            hi = cuts[j + 1] - 1e-3 if j < k - 2 else float(k - 1)
            trials = np.repeat(cuts[None], 82, axis=0)
            trials[1:, j] = np.linspace(lo, hi, 81)  # row 0: the current cut, which a tie keeps
            s = _scores(y, e, trials, k)
            best = int(np.argmax(s)) if s.max() > s[0] + 1e-9 else 0
            cuts = trials[best].copy()
    return tuple(round(float(c), 4) for c in cuts)


def fit_cutpoints_shift(
    probs: np.ndarray, labels: np.ndarray, start: tuple[float, ...], scales: int = 21, shifts: int = 61
) -> tuple[float, ...]:
    """The shipped cut-points moved as a whole, ``a + b * start``: two numbers instead of K-1, which a sample of
    50 knees can pin down (a grid over shift ``a`` in [-1.5, 1.5] and scale ``b`` in [0.6, 1.6])."""
    k = probs.shape[1]
    e = expected_grade(probs)
    y = np.asarray(labels, dtype=np.int64)
    base = np.asarray(start if len(start) == k - 1 else np.arange(k - 1) + 0.5, dtype=np.float64)
    a, b = np.meshgrid(np.linspace(-1.5, 1.5, shifts), np.linspace(0.6, 1.6, scales))
    trials = np.vstack([base[None], a.ravel()[:, None] + b.ravel()[:, None] * base[None]])
    s = _scores(y, e, trials, k)
    best = int(np.argmax(s)) if s.max() > s[0] + 1e-9 else 0
    return tuple(round(float(c), 4) for c in trials[best])


def em_prior_bias(
    logits: np.ndarray, cfg: PostprocessConfig, train_prior: np.ndarray, iters: int = 100, tol: float = 1e-6
) -> tuple[float, ...]:
    """Label-free: the class bias that moves the model's priors to the site's, estimated by EM on the
    site's unlabelled images (Saerens et al. 2002). Adding ``log(site / train)`` to the logits is Bayes'
    rule for a change of priors; the returned bias is the contract's plus that, centred."""
    p0 = probabilities(logits, cfg)
    train = np.asarray(train_prior, dtype=np.float64)
    train = train / train.sum()
    prior = train.copy()
    for _ in range(iters):
        w = p0 * (prior / train)
        w /= w.sum(axis=1, keepdims=True)
        new = w.mean(axis=0)
        if np.abs(new - prior).max() < tol:
            prior = new
            break
        prior = new
    shift = np.log(np.clip(prior, 1e-4, None) / train)  # added to logits / T + b: Bayes for new priors
    base = np.asarray(cfg.class_bias or (0.0,) * len(train))
    b = base + shift
    return tuple(round(float(v - b.mean()), 4) for v in b)


@dataclass(frozen=True)
class Method:
    """One way of fitting a site calibration: which of temperature, class bias and cut-points it refits,
    and whether it reads the labels at all. Any method that changes the calibration also moves the
    uncertain flag's threshold so that it flags the share of the sample the shipped one does (`fit`)."""

    name: str
    temperature: bool = False
    bias: bool = False
    cutpoints: bool = False
    em_prior: bool = False
    shift: bool = False  # the cut-points moved as a whole (`fit_cutpoints_shift`) rather than one by one
    description: str = ""

    @property
    def labelled(self) -> bool:
        return self.temperature or self.bias or self.cutpoints


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("shipped", description="the shipped calibration and decoding, unchanged"),
        Method("cutpoints", cutpoints=True, description="the ordinal cut-points refitted"),
        Method("cutpoints-shift", cutpoints=True, shift=True,
               description="the shipped cut-points shifted and scaled as a whole (two numbers)"),
        Method("temperature+cutpoints", temperature=True, cutpoints=True,
               description="temperature, then the cut-points, refitted"),
        Method("bias+cutpoints", temperature=True, bias=True, cutpoints=True,
               description="temperature and a bias per class (NLL), then the cut-points, refitted"),
        Method("bias", temperature=True, bias=True,
               description="temperature and a bias per class (NLL) refitted; the shipped cut-points kept"),
        Method("em-prior", em_prior=True,
               description="label-free: class bias from the site's grade mix estimated by EM (Saerens et al. 2002)"),
        Method("em-prior+cutpoints", em_prior=True, cutpoints=True,
               description="EM prior correction on the site's images, then the cut-points refitted"),
    )
}  # fmt: skip


def fit(
    method: Method,
    base: PostprocessConfig,
    logits: np.ndarray,
    labels: np.ndarray | None,
    train_prior: np.ndarray | None = None,
    unlabelled: np.ndarray | None = None,
) -> PostprocessConfig:
    """The shipped ``base`` with what ``method`` refits fitted on (``logits`` (N, V, K), ``labels``).

    ``unlabelled`` are the site's images the EM prior correction reads (default: ``logits``);
    ``train_prior`` the training split's grade mix it corrects from.
    """
    cfg = base
    if method.em_prior:
        if train_prior is None:
            raise ValueError("the EM prior correction needs the training split's grade mix (train_prior)")
        cfg = dataclasses.replace(
            cfg, class_bias=em_prior_bias(logits if unlabelled is None else unlabelled, cfg, train_prior)
        )
    if method.temperature or method.bias:
        cfg = fit_temperature_bias(logits, labels, cfg, bias=method.bias)
    if method.cutpoints:
        fitter = fit_cutpoints_shift if method.shift else fit_cutpoints
        cuts = fitter(probabilities(logits, cfg), labels, base.cutpoints)
        cfg = dataclasses.replace(cfg, decision="cutpoints", cutpoints=cuts)
    if cfg != base and base.uncertain_below > 0:
        # The flag's threshold is a confidence, which a new temperature or decoding moves: keep the share the
        # shipped flag marks on these knees, so that a profile neither floods nor silences the flag.
        p0 = probabilities(logits, base)
        share = float((confidences(p0, decode_grades(p0, base)) < base.uncertain_below).mean())
        p = probabilities(logits, cfg)
        conf = confidences(p, decode_grades(p, cfg))
        cfg = dataclasses.replace(cfg, uncertain_below=round(float(np.quantile(conf, share)), 4) if share else 0.0)
    return cfg


def stratified_folds(labels: np.ndarray, folds: int, rng: np.random.Generator) -> np.ndarray:
    """(N,) fold of each knee: each grade dealt round-robin in a random order, so every fold holds each
    grade in about the sample's share."""
    fold = np.zeros(len(labels), dtype=np.int64)
    offset = 0
    for g in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == g))
        fold[idx] = (np.arange(len(idx)) + offset) % folds
        offset += len(idx)
    return fold


Evaluator = Callable[[np.ndarray, np.ndarray, np.ndarray], dict[str, float]]


def ece(y: np.ndarray, p: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE over 15 equal-width bins: `train.metrics.expected_calibration_error`, without its checks."""
    conf = p.max(axis=1)
    hit = (p.argmax(axis=1) == y).astype(np.float64)
    b = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    count = np.bincount(b, minlength=n_bins)
    gap = np.abs(np.bincount(b, hit, n_bins) - np.bincount(b, conf, n_bins))
    return float(gap.sum() / max(count.sum(), 1))


def held_out_figures(labels: np.ndarray, probs: np.ndarray, grades: np.ndarray, k: int) -> dict[str, float]:
    """Top-1, QWK, MAE, NLL, ECE and the selection score of held-out answers."""
    return {
        "accuracy": float((grades == labels).mean()),
        "qwk": qwk(labels, grades, k),
        "mae": float(np.abs(grades - labels).mean()),
        "nll": _nll(probs, labels),
        "ece": ece(labels, probs),
        "score": score(labels, grades, k),
    }


def candidate(reading: str, method: str) -> str:
    """A candidate's name: the method's for the shipped reading (``whole``), else ``<reading>/<method>``."""
    return method if reading == WHOLE else f"{reading}/{method}"


def parse(name: str) -> tuple[str, Method]:
    """A candidate's reading and method (`candidate`); raises KeyError for an unknown method."""
    reading, _, method = name.rpartition("/")
    return reading or WHOLE, METHODS[method]


def describe(name: str) -> str:
    """A candidate in words."""
    reading, m = parse(name)
    return m.description if reading == WHOLE else f"{m.description}; single-knee crops read at the joint"


def cross_fit(
    logits: np.ndarray | dict[str, np.ndarray],
    labels: np.ndarray,
    base: PostprocessConfig,
    methods: list[str],
    *,
    train_prior: np.ndarray | None = None,
    folds: int = 5,
    repeats: int = 10,
    seed: int = 0,
    boot: int = 200,
) -> dict[str, dict[str, float]]:
    """Each method fitted on K-1 folds of the labelled sample and measured on the K-th, over ``repeats``
    random stratified splits. Returns per candidate the mean and sd (over repeats) of each held-out figure,
    and ``gain_low``: the 5th percentile, over ``boot`` resamples of the knees, of its `score` less the
    shipped decoding's on the same held-out answers (paired; needs ``shipped`` among ``methods``).
    ``logits`` of several readings (``{reading: (N, V, K)}``, the same knees in the same order) make one
    candidate per reading and method (`candidate`), all on the same folds; the gain is over the shipped
    decoding of the ``whole`` reading. The label-free methods read the held-out fold's own images (not
    its labels), as a site would."""
    views = logits if isinstance(logits, dict) else {WHOLE: logits}
    names = {candidate(r, m): (r, METHODS[m]) for r in views for m in methods}
    k = next(iter(views.values())).shape[-1]
    out: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    oof: dict[str, list[np.ndarray]] = {n: [] for n in names}
    rng = np.random.default_rng(seed)
    for _ in range(repeats):
        fid = stratified_folds(labels, folds, rng)
        for name, (reading, m) in names.items():
            lg = views[reading]
            probs = np.zeros((len(labels), k))
            grades = np.zeros(len(labels), dtype=np.int64)
            for f in range(folds):
                tr, te = fid != f, fid == f
                cfg = fit(m, base, lg[tr], labels[tr], train_prior, unlabelled=lg[te] if m.em_prior else None)
                probs[te] = probabilities(lg[te], cfg)
                grades[te] = decode_grades(probs[te], cfg)
            oof[name].append(grades)
            for key, v in held_out_figures(labels, probs, grades, k).items():
                out[name].setdefault(key, []).append(v)
    result = {
        m: {
            **{key: float(np.mean(v)) for key, v in figs.items()},
            **{f"{key}_sd": float(np.std(v)) for key, v in figs.items()},
        }
        for m, figs in out.items()
    }
    if "shipped" in oof:
        picks = np.random.default_rng(seed + 1).integers(0, len(labels), (boot, len(labels)))
        for m in names:
            gains = [
                np.mean([score(labels[i], g[i], k) - score(labels[i], s[i], k)
                         for g, s in zip(oof[m], oof["shipped"], strict=True)])
                for i in picks
            ] if m != "shipped" else [0.0]  # fmt: skip
            result[m]["gain_low"] = float(np.percentile(gains, 5))
    return result


def choose(cv: dict[str, dict[str, float]]) -> str:
    """The rule, stated before measuring: among the methods whose gain over the shipped decoding is above zero
    at the 5th percentile of a paired bootstrap over the held-out knees (``gain_low``), and whose held-out
    NLL is no worse than the shipped one's by more than 0.05, the one with the best cross-fitted `score`;
    when there is none, ``shipped`` (keep the default)."""
    ship = cv["shipped"]
    ok = [m for m in cv if m != "shipped" and cv[m].get("gain_low", 0.0) > 0 and cv[m]["nll"] <= ship["nll"] + 0.05]
    return max(ok, key=lambda m: cv[m]["score"]) if ok else "shipped"


def rule_text() -> str:
    """The choice rule, as `choose` states it (quoted in reports and docs)."""
    return " ".join(choose.__doc__.split("The rule, stated before measuring: ")[1].split())
