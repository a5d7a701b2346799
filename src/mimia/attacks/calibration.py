"""Calibration maths shared by the reference-model attacks (LiRA, RMIA): log errors, each
model's median level, Gaussian fits with pooled variance, and which adversary samples a
shadow replay can score.
"""

from __future__ import annotations

import numpy as np

from mimia.attacks.data import Observations

MIN_SIGMA = 1e-6
"""Floor of fitted standard deviations, so a constant statistic cannot divide by zero."""


def log_errors(errors: np.ndarray) -> np.ndarray:
    """``log`` of errors, floored at 1e-12 so a perfect reconstruction stays finite."""
    return np.log(np.maximum(errors, 1e-12))


def out_medians(values: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Per reference model (rows of ``values [M, N, ...]``), the median over the samples it
    did not train on (``out [M, N]``), over all samples for a model with no OUT sample."""
    med = np.empty((values.shape[0], *values.shape[2:]))
    for m in range(values.shape[0]):
        keep = out[m] if out[m].any() else np.ones(values.shape[1], dtype=bool)
        med[m] = np.median(values[m, keep], axis=0)
    return med


def reference_levels(values: np.ndarray, reference_in: np.ndarray, mode: str) -> np.ndarray:
    """Each reference model's median level ``[M, 1, ...]`` of ``values [M, N, ...]``.

    Offline over the samples it did not train on (references trained on about half of the
    adversary's data and on none of the audited samples: an all-sample median would differ
    between the shadow replay and the audit by about half the membership gap); online over all
    samples (references trained on about half of everything, as the audited model on its
    50/50 audit set). See ``mimia.attacks.lira``.
    """
    if mode == "offline":
        return out_medians(values, ~reference_in)[:, None]
    return np.median(values, axis=1, keepdims=True)


def gaussian(stats: np.ndarray, member: np.ndarray, min_models: int):
    """Per-sample mean, std, model count of ``stats[member]`` and the pooled std.

    ``stats``, ``member``: ``[M, N]``. Means are NaN for samples with no such model; the std
    is per sample where ``count >= min_models`` (and >= 2), else the pooled within-sample std
    (LiRA's "fixed variance"), else 1 when no sample has two such models.
    """
    count = member.sum(axis=0)
    total = np.where(member, stats, 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mu = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    resid = np.where(member, stats - np.nan_to_num(mu), 0.0)
    ss = (resid**2).sum(axis=0)
    dof = np.maximum(count - 1, 0)
    pooled = np.sqrt(ss.sum() / dof.sum()) if dof.sum() > 0 else 1.0
    per_sample = np.sqrt(ss / np.maximum(dof, 1))
    use = (count >= max(min_models, 2)) & (dof > 0)
    sigma = np.maximum(np.where(use, per_sample, pooled), MIN_SIGMA)
    return mu, sigma, count, max(float(pooled), MIN_SIGMA)


def normal_logpdf(x, mu, sigma):
    """``log N(x; mu, sigma)``, as ``scipy.stats.norm.logpdf`` (kept scipy-free to import)."""
    z = (x - mu) / sigma
    return -(z**2) / 2.0 - np.log(np.sqrt(2 * np.pi)) - np.log(sigma)


def replay_subset(
    X: Observations, y: np.ndarray | None, need_out: bool = False, need_in: bool = False
) -> np.ndarray | None:
    """Indices of the adversary's samples a shadow replay can score, or None if it cannot.

    The replay scores shadow model 0 with its reference models (shadow1..) where membership is
    known, to choose a threshold. It needs labels, at least one reference model and both
    classes; ``need_out`` / ``need_in`` keep only samples with at least one OUT / IN
    reference model (with few reference models some adversary images are IN, or OUT, for all
    of them).
    """
    if y is None or X.num_references == 0:
        return None
    keep = np.ones(len(X), dtype=bool)
    if need_out:
        keep &= (~X.reference_in).any(axis=0)
    if need_in:
        keep &= X.reference_in.any(axis=0)
    index = np.flatnonzero(keep)
    n1 = int(y[index].sum())
    if n1 == 0 or n1 == len(index):
        return None
    return index
