"""Membership-inference metrics: exact ROC, AUC, TPR at low FPR, balanced accuracy, and a
stratified, vectorised bootstrap for confidence intervals.

Conventions (shared by every function here):

* ``labels`` is 1 / ``True`` for members, ``scores`` are higher for "more likely member".
* A threshold ``t`` predicts *member* iff ``score >= t``.
* The ROC is sklearn's ``roc_curve(labels, scores, drop_intermediate=False)``: one point per
  distinct score, highest first, preceded by ``(fpr, tpr) = (0, 0)`` at threshold ``+inf``.
  Samples with tied scores move together, so a tied group of members and non-members is a
  single diagonal step, never split.
* ``tpr_at_fpr(labels, scores, f)`` is, by default (``convention="inclusive"``), the highest TPR
  among ROC points whose FPR is ``<= f``. The ``(0, 0)`` point always qualifies, so when no
  threshold reaches FPR ``<= f`` with a positive TPR (e.g. a non-member ties with or outranks
  every member) the answer is ``0.0``. ``convention="strict"`` is the LiRA reference code's
  reading (tensorflow/privacy ``research/mi_lira_2021/plot.py``:
  ``tpr[np.where(fpr < f)[0][-1]]``): points with FPR exactly ``f`` do not count. The two differ
  only when a ROC point lands on ``f`` exactly (``f * n_nonmembers`` an integer), e.g. at 1 %
  FPR with 400 non-members a 4th false positive is allowed inclusively, not strictly. The
  reference reads sklearn's ``roc_curve`` with its default ``drop_intermediate=True``, which on
  tied scores can drop the point the strict rule would pick; here every ROC point is kept, so
  the strict value is never lower than the reference's and equal to it without ties.
  No interpolation between ROC points is done: that would credit a randomised attack.
"""

from __future__ import annotations

import numpy as np
import polars as pl

FPR_TARGETS: tuple[float, ...] = (0.001, 0.01, 0.1)
"""The low-FPR operating points ``evaluate`` reports (0.1 %, 1 %, 10 %)."""

TPR_CONVENTIONS: dict[str, str] = {
    "inclusive": "highest TPR among ROC points with FPR <= f",
    "strict": "highest TPR among ROC points with FPR < f (LiRA reference code)",
}
"""``tpr_at_fpr`` conventions and the rule each states in ``metrics.json``."""


def _fpr_key(fpr: float) -> str:
    return f"tpr_at_fpr_{fpr:g}"


def _check_labels(labels, what: str = "labels") -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {y.shape}")
    if y.dtype != bool:
        if not np.issubdtype(y.dtype, np.number) or not np.isin(y, (0, 1)).all():
            raise ValueError(f"{what} must be boolean or 0/1 (1 = member)")
        y = y.astype(bool)
    return y


def _check_classes(y: np.ndarray) -> None:
    n1 = int(y.sum())
    if n1 == 0 or n1 == len(y):
        raise ValueError(f"both classes are needed, got {n1} members and {len(y) - n1} non-members")


def _check(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(bool labels, float scores)``; ValueError on anything unusable."""
    y = _check_labels(labels)
    s = np.asarray(scores)
    if s.ndim != 1:
        raise ValueError(f"scores must be 1-D, got shape {s.shape}")
    if len(y) != len(s):
        raise ValueError(f"labels ({len(y)}) and scores ({len(s)}) differ in length")
    if not (np.issubdtype(s.dtype, np.integer) or np.issubdtype(s.dtype, np.floating)) and (
        s.dtype != bool
    ):
        raise ValueError(f"scores must be real numbers, got dtype {s.dtype}")
    s = s.astype(np.float64)
    if not np.isfinite(s).all():
        bad = int((~np.isfinite(s)).sum())
        raise ValueError(f"{bad} scores are not finite (NaN or inf)")
    _check_classes(y)
    return y, s


def _grouped(y: np.ndarray, s: np.ndarray):
    """Distinct scores (descending), and member / non-member counts per distinct score.

    Also returns, per sample, the index of its score group, for the bootstrap.
    """
    uniq, inverse = np.unique(-s, return_inverse=True)  # ascending -s = descending s
    n_groups = len(uniq)
    pos = np.bincount(inverse, weights=y, minlength=n_groups)
    neg = np.bincount(inverse, weights=~y, minlength=n_groups)
    return -uniq, pos, neg, inverse


def roc_points(labels, scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact ROC ``(fpr, tpr, thresholds)``, equal to sklearn's
    ``roc_curve(labels, scores, drop_intermediate=False)`` (first threshold ``+inf``)."""
    y, s = _check(labels, scores)
    thr, pos, neg, _ = _grouped(y, s)
    tps = np.concatenate([[0.0], np.cumsum(pos)])
    fps = np.concatenate([[0.0], np.cumsum(neg)])
    return fps / fps[-1], tps / tps[-1], np.concatenate([[np.inf], thr])


def roc_frame(labels, scores) -> pl.DataFrame:
    """The ROC as a ``polars.DataFrame`` with columns ``fpr, tpr, threshold`` (for Parquet)."""
    fpr, tpr, thr = roc_points(labels, scores)
    return pl.DataFrame(
        {"fpr": fpr, "tpr": tpr, "threshold": thr},
        schema={"fpr": pl.Float64, "tpr": pl.Float64, "threshold": pl.Float64},
    )


def _trapezoid(fpr: np.ndarray, tpr: np.ndarray) -> np.ndarray:
    """Area under ROC curves given along the last axis (ties count one half)."""
    return np.sum(np.diff(fpr, axis=-1) * (tpr[..., 1:] + tpr[..., :-1]) / 2, axis=-1)


def auc(labels, scores) -> float:
    """Area under the ROC curve (equals sklearn's ``roc_auc_score``)."""
    fpr, tpr, _ = roc_points(labels, scores)
    return float(_trapezoid(fpr, tpr))


def _check_fpr(fpr: float) -> float:
    fpr = float(fpr)
    if not 0.0 <= fpr <= 1.0:
        raise ValueError(f"target FPR must lie in [0, 1], got {fpr}")
    return fpr


def _check_convention(convention: str) -> str:
    if convention not in TPR_CONVENTIONS:
        raise ValueError(
            f"TPR-at-FPR convention must be one of {sorted(TPR_CONVENTIONS)}, got {convention!r}"
        )
    return convention


def _tpr_at(fpr: np.ndarray, tpr: np.ndarray, target: float, convention: str) -> np.ndarray:
    # TPR never decreases along the ROC, so "highest TPR among qualifying points" is the
    # reference's "TPR of the last qualifying point". Inclusive: (0, 0) always qualifies, so the
    # maximum is over a non-empty set; the tolerance keeps k / n == f from missing by rounding.
    # Strict compares exactly, as the reference does (where it would fail, at f = 0, it is 0).
    keep = fpr <= target + 1e-12 if convention == "inclusive" else fpr < target
    return np.max(np.where(keep, tpr, 0.0), axis=-1)


def tpr_at_fpr(labels, scores, fpr: float, convention: str = "inclusive") -> float:
    """Highest TPR among ROC points with FPR <= ``fpr`` (``convention="strict"``: FPR <
    ``fpr``); 0.0 when no point but (0, 0) qualifies."""
    target = _check_fpr(fpr)
    convention = _check_convention(convention)
    f, t, _ = roc_points(labels, scores)
    return float(_tpr_at(f, t, target, convention))


def balanced_accuracy(labels, predictions) -> float:
    """``(TPR + TNR) / 2`` of boolean (or 0/1) member predictions."""
    y = _check_labels(labels)
    p = _check_labels(predictions, "predictions")
    if len(p) != len(y):
        raise ValueError(f"labels ({len(y)}) and predictions ({len(p)}) differ in length")
    _check_classes(y)
    return float((p[y].mean() + (~p[~y]).mean()) / 2)


def best_balanced_accuracy(labels, scores) -> float:
    """Balanced accuracy at the best threshold, i.e. ``max (TPR + 1 - FPR) / 2`` over the ROC.

    Optimistic when the threshold is chosen on the evaluated data itself.
    """
    fpr, tpr, _ = roc_points(labels, scores)
    return float(np.max((tpr + 1 - fpr) / 2))


def best_threshold(labels, scores) -> float:
    """A threshold reaching ``best_balanced_accuracy`` on these data.

    It lies halfway between the lowest score predicted member and the next lower distinct
    score (so it generalises better than a threshold equal to an observed score). If the best
    is to predict no member at all, it is just above the highest score; if everything should
    be predicted member, it is the lowest score.
    """
    y, s = _check(labels, scores)
    fpr, tpr, thr = roc_points(y, s)
    i = int(np.argmax((tpr + 1 - fpr) / 2))
    if i == 0:
        return float(np.nextafter(thr[1], np.inf))
    if i == len(thr) - 1:
        return float(thr[i])
    return float(thr[i] / 2 + thr[i + 1] / 2)


def _ci(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    lo, hi = np.percentile(values, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap_mean(values, n_bootstrap: int, seed: int, level: float = 0.95):
    """Mean of ``values`` and its seeded percentile-bootstrap CI (``(mean, low, high)``)."""
    values = np.asarray(values, dtype=float)
    if values.size == 0:
        raise ValueError("bootstrap of an empty sample")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, (n_bootstrap, values.size))].mean(axis=1)
    return (float(values.mean()), *_ci(means, level))


def bootstrap_metrics(
    labels,
    scores,
    threshold: float,
    n_bootstrap: int = 1000,
    seed: int = 0,
    chunk: int = 250,
    tpr_convention: str = "inclusive",
) -> dict[str, np.ndarray]:
    """Every ``evaluate`` metric on ``n_bootstrap`` stratified resamples, as arrays ``[B]``.

    Members and non-members are resampled separately (with replacement, each class keeping its
    size). All resamples are evaluated at once: samples are binned by distinct score, each
    resample becomes per-bin member / non-member counts, and the ROCs are cumulative sums.
    """
    y, s = _check(labels, scores)
    tpr_convention = _check_convention(tpr_convention)
    _, _, _, group = _grouped(y, s)
    n_groups = int(group.max()) + 1
    g1, g0 = group[y], group[~y]
    above = s >= threshold
    a1, a0 = above[y], above[~y]
    n1, n0 = len(g1), len(g0)
    rng = np.random.default_rng(seed)
    out: dict[str, list[np.ndarray]] = {}
    for start in range(0, n_bootstrap, chunk):
        b = min(chunk, n_bootstrap - start)
        i1 = rng.integers(0, n1, size=(b, n1))
        i0 = rng.integers(0, n0, size=(b, n0))
        offset = (np.arange(b) * n_groups)[:, None]
        pos = np.bincount((g1[i1] + offset).ravel(), minlength=b * n_groups)
        neg = np.bincount((g0[i0] + offset).ravel(), minlength=b * n_groups)
        zeros = np.zeros((b, 1))
        tpr = np.concatenate([zeros, np.cumsum(pos.reshape(b, n_groups), axis=1) / n1], axis=1)
        fpr = np.concatenate([zeros, np.cumsum(neg.reshape(b, n_groups), axis=1) / n0], axis=1)
        res = {
            "auc": _trapezoid(fpr, tpr),
            "balanced_accuracy": (a1[i1].mean(axis=1) + 1 - a0[i0].mean(axis=1)) / 2,
            "best_balanced_accuracy": np.max((tpr + 1 - fpr) / 2, axis=1),
        }
        for f in FPR_TARGETS:
            res[_fpr_key(f)] = _tpr_at(fpr, tpr, f, tpr_convention)
        for k, v in res.items():
            out.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in out.items()}


def evaluate(
    labels,
    scores,
    threshold: float | None = None,
    n_bootstrap: int = 1000,
    seed: int = 0,
    tpr_convention: str = "inclusive",
) -> dict[str, float | int | str | None]:
    """Point estimates and stratified percentile-bootstrap 95 % CIs of every metric.

    Keys: ``auc``, ``balanced_accuracy``, ``best_balanced_accuracy``, ``tpr_at_fpr_0.001``,
    ``tpr_at_fpr_0.01``, ``tpr_at_fpr_0.1``, each with ``<key>_ci_low`` / ``<key>_ci_high``
    (``None`` when ``n_bootstrap == 0``); ``threshold`` and ``threshold_source``
    (``"given"``, or ``"best_on_evaluated_data"`` when ``threshold`` is None: then
    ``balanced_accuracy`` equals ``best_balanced_accuracy`` and is optimistic; its CI keeps that
    threshold fixed while ``best_balanced_accuracy``'s CI re-optimises it in every resample);
    ``n_members``, ``n_nonmembers``, ``n_bootstrap``, ``seed``; ``tpr_at_fpr_convention``
    (``tpr_convention``) and ``tpr_at_fpr_rule``, the rule it stands for.
    """
    y, s = _check(labels, scores)
    tpr_convention = _check_convention(tpr_convention)
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}")
    source = "given"
    if threshold is None:
        threshold, source = best_threshold(y, s), "best_on_evaluated_data"
    threshold = float(threshold)
    if np.isnan(threshold):
        raise ValueError("threshold is NaN")
    fpr, tpr, _ = roc_points(y, s)
    point = {
        "auc": float(_trapezoid(fpr, tpr)),
        "balanced_accuracy": balanced_accuracy(y, s >= threshold),
        "best_balanced_accuracy": float(np.max((tpr + 1 - fpr) / 2)),
    }
    for f in FPR_TARGETS:
        point[_fpr_key(f)] = float(_tpr_at(fpr, tpr, f, tpr_convention))
    boot = (
        bootstrap_metrics(y, s, threshold, n_bootstrap, seed, tpr_convention=tpr_convention)
        if n_bootstrap
        else {}
    )
    result: dict[str, float | int | str | None] = {}
    for key, value in point.items():
        result[key] = value
        lo, hi = _ci(boot[key]) if boot else (None, None)
        result[f"{key}_ci_low"] = lo
        result[f"{key}_ci_high"] = hi
    result |= {
        "threshold": threshold,
        "threshold_source": source,
        "n_members": int(y.sum()),
        "n_nonmembers": int((~y).sum()),
        "n_bootstrap": int(n_bootstrap),
        "seed": int(seed),
        "tpr_at_fpr_convention": tpr_convention,
        "tpr_at_fpr_rule": TPR_CONVENTIONS[tpr_convention],
    }
    return result


# -- empirical privacy audit ----------------------------------------------------------------------
def clopper_pearson(successes, trials, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided Clopper–Pearson interval ``(low, high)`` of a binomial proportion, elementwise.

    Each bound holds one-sided with probability ``1 - (1 - confidence) / 2``; ``low`` is 0 at 0
    successes and ``high`` is 1 at ``trials`` successes.
    """
    from scipy.stats import beta

    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    k = np.asarray(successes, dtype=np.float64)
    n = np.broadcast_to(np.asarray(trials, dtype=np.float64), k.shape)
    if (n <= 0).any() or (k < 0).any() or (k > n).any():
        raise ValueError("Clopper–Pearson needs 0 <= successes <= trials and trials > 0")
    tail = (1.0 - confidence) / 2
    with np.errstate(invalid="ignore"):
        low = np.where(k > 0, beta.ppf(tail, k, n - k + 1), 0.0)
        high = np.where(k < n, beta.ppf(1 - tail, k + 1, n - k), 1.0)
    return low, high


def epsilon_lower_bound(
    labels, scores, delta: float = 0.0, confidence: float = 0.95, bonferroni: bool = False
) -> dict[str, float | int | str | bool | None]:
    """An empirical lower bound on the epsilon of (epsilon, delta)-DP from a membership ROC.

    An (epsilon, delta)-DP training algorithm bounds every membership test:
    ``TPR <= e^eps FPR + delta`` and ``1 - FPR <= e^eps (1 - TPR) + delta``. At each ROC
    threshold, Clopper–Pearson bounds (two-sided at ``confidence``, as Jagielski et al. 2020's
    code: each side at ``1 - (1 - confidence) / 2``, so both hold together with probability
    >= ``confidence``) give ``TPR_low`` and ``FPR_high``, and

        eps_lb = max over thresholds of max(log((TPR_low - delta) / FPR_high),
                                            log((1 - FPR_high - delta) / (1 - TPR_low)))

    (0 when no threshold gives a positive value). The maximum is taken over thresholds
    chosen on the same data: the confidence holds for each threshold, not for the maximum,
    unless ``bonferroni`` divides ``1 - confidence`` by the number of thresholds. The audited
    images are the trials, from one trained model: the bound is meaningful when members and
    non-members were drawn at random from one population, as mimia's split does.
    """
    y, s = _check(labels, scores)
    if not 0.0 <= delta < 1.0:
        raise ValueError(f"delta must lie in [0, 1), got {delta}")
    _, pos, neg, _ = _grouped(y, s)
    tp = np.concatenate([[0.0], np.cumsum(pos)])
    fp = np.concatenate([[0.0], np.cumsum(neg)])
    n1, n0 = tp[-1], fp[-1]
    level = confidence
    if bonferroni:
        level = 1.0 - (1.0 - confidence) / len(tp)
    tpr_low, _ = clopper_pearson(tp, n1, level)
    _, fpr_high = clopper_pearson(fp, n0, level)
    # Clopper–Pearson keeps FPR_high > 0 and TPR_low < 1 for finite counts: no division by 0.
    with np.errstate(divide="ignore"):
        positive = np.log(np.clip(tpr_low - delta, 0.0, None) / fpr_high)
        negative = np.log(np.clip(1.0 - fpr_high - delta, 0.0, None) / (1.0 - tpr_low))
    both = np.stack([positive, negative])
    side, i = np.unravel_index(int(np.argmax(both)), both.shape)
    best = float(both[side, i])
    return {
        "epsilon_lower_bound": max(best, 0.0),
        "epsilon_lb_side": "tpr_fpr" if side == 0 else "tnr_fnr",
        "epsilon_lb_tp": int(tp[i]),
        "epsilon_lb_fp": int(fp[i]),
        "epsilon_lb_tpr_low": float(tpr_low[i]),
        "epsilon_lb_fpr_high": float(fpr_high[i]),
        "epsilon_lb_delta": float(delta),
        "epsilon_lb_confidence": float(confidence),
        "epsilon_lb_bonferroni": bool(bonferroni),
        "epsilon_lb_thresholds": len(tp),
        "n_members": int(n1),
        "n_nonmembers": int(n0),
    }
