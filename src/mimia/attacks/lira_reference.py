"""LiRA with the estimators of the authors' reference code (Carlini et al. 2022,
tensorflow/privacy ``research/mi_lira_2021/plot.py``, ``generate_ours`` and
``generate_ours_offline``), on reconstruction errors: to reproduce a LiRA number exactly.

What the reference does, and so this attack:

* Queries. Each sample is queried several times (the reference: augmentations; here: every
  mask of the selected mask ratios, ``statistic="per_mask"``, the statistic ``log error``), and
  a Gaussian is fitted per sample *and* query; the score averages the log-densities over the
  queries. ``"log_mean"`` / ``"mean_log"`` (as ``lira``) make one query per sample instead.
* Equal counts. Per sample, the IN (OUT) statistics are those of the first ``n_in``
  (``n_out``) reference models, in order, that did (did not) train on it, with ``n_in``
  (``n_out``) the smallest such count over the scored samples (``in_size``/``out_size``).
* Location: the **median** of those statistics (named ``mean_in`` / ``mean_out`` in the
  code). Scale: ``np.std`` (``ddof=0``) per sample and query, or with ``fix_variance`` one
  global ``np.std`` of all of them (around the global mean, so it includes the spread
  between samples); online, the fixed variance is that of the IN statistics for both
  Gaussians, as the code computes ``std_out = np.std(dat_in)``. ``1e-30`` is added to each.
* Scores (higher = member; the reference feeds ``-prediction`` to ``roc_curve``): offline
  ``-mean_q log N(s; mu_out, sd_out)``, two-sided, a sample far from its OUT distribution on
  either side is called a member; online ``mean_q [log N(s; mu_in, sd_in) - log N(s; mu_out,
  sd_out)]``.

Not from the reference: ``calibrate`` (default off) centres each model's statistic on its own
median per query, as ``lira`` does (needed when the audited encoder wears another decoder
than the reference models, see ``mimia.attacks.lira``); the threshold (``threshold_``) is the
best balanced-accuracy threshold of a shadow replay (shadow model 0 scored with shadow1..,
over the adversary's images that have the reference models the mode needs). The reference
code reports AUC and TPR at low FPR only, which do not depend on it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mimia.attacks.base import (
    Attack,
    check_bool,
    check_choice,
    check_ratios,
    register,
)
from mimia.attacks.calibration import log_errors, normal_logpdf, reference_levels, replay_subset
from mimia.attacks.data import Observations
from mimia.attacks.lira import MODES, lira_statistic
from mimia.metrics import best_threshold

STATISTICS = ("per_mask", "log_mean", "mean_log")
_EPS = 1e-30


def equal_count_stats(ref: np.ndarray, member: np.ndarray, what: str) -> np.ndarray:
    """``[N, n, Q]``: per sample the statistics ``ref [M, N, Q]`` of its first ``n`` reference
    models with ``member [M, N]`` true, ``n`` the smallest such count over samples."""
    count = member.sum(axis=0)
    n = int(count.min())
    if n == 0:
        lacking = int((count == 0).sum())
        raise ValueError(
            f"lira_reference: {lacking} samples have no {what} reference model; the reference "
            "estimator needs at least one per sample (more reference models: shadow.count"
            + (", trained with shadow.online)" if what == "IN" else ")")
        )
    # Stable sort of "not member" puts each sample's member models first, in model order.
    order = np.argsort(~member, axis=0, kind="stable")[:n]  # [n, N]
    picked = np.take_along_axis(ref, order[:, :, None], axis=0)  # [n, N, Q]
    return picked.transpose(1, 0, 2)


@register
class LiRAReference(Attack):
    """LiRA with the reference code's estimators (see module doc)."""

    name = "lira_reference"
    inputs = frozenset({"errors", "references"})

    def __init__(
        self,
        mode: str = "offline",
        fix_variance: bool = False,
        statistic: str = "per_mask",
        ratios: Sequence[float] | float | None = None,
        calibrate: bool = False,
    ) -> None:
        self.mode = mode
        self.fix_variance = fix_variance
        self.statistic = statistic
        self.ratios = ratios
        self.calibrate = calibrate

    def _validate_params(self) -> None:
        check_choice(self.name, "mode", self.mode, MODES)
        check_bool(self.name, "fix_variance", self.fix_variance)
        check_choice(self.name, "statistic", self.statistic, STATISTICS)
        check_ratios(self.name, self.ratios)
        check_bool(self.name, "calibrate", self.calibrate)

    @property
    def calibration(self) -> str:
        return "transductive" if self.calibrate else "shadow"

    def uses_in_references(self) -> bool:
        return self.mode == "online"

    def statistics(self, X: Observations) -> tuple[np.ndarray, np.ndarray]:
        """``(stat [N, Q], reference stats [M, N, Q])`` with ``Q`` queries per sample."""
        r = X.ratio_indices(self.ratios)
        errors, ref_errors = X.errors[:, r], X.reference_errors[:, :, r]
        if self.statistic == "per_mask":
            stat = log_errors(errors).reshape(len(X), -1)
            ref = log_errors(ref_errors).reshape(X.num_references, len(X), -1)
        else:
            stat = lira_statistic(errors, self.statistic)[:, None]
            ref = lira_statistic(ref_errors, self.statistic)[:, :, None]
        if self.calibrate:
            stat = stat - np.median(stat, axis=0)
            ref = ref - reference_levels(ref, X.reference_in, self.mode)
        return stat, ref

    def _score_samples(self, X: Observations) -> np.ndarray:
        stat, ref = self.statistics(X)
        dat_out = equal_count_stats(ref, ~X.reference_in, "OUT")
        mean_out = np.median(dat_out, axis=1)
        if self.mode == "offline":
            std_out = np.std(dat_out) if self.fix_variance else np.std(dat_out, axis=1)
            return -normal_logpdf(stat, mean_out, std_out + _EPS).mean(axis=1)
        dat_in = equal_count_stats(ref, X.reference_in, "IN")
        mean_in = np.median(dat_in, axis=1)
        if self.fix_variance:
            std_in = std_out = np.std(dat_in)
        else:
            std_in, std_out = np.std(dat_in, axis=1), np.std(dat_out, axis=1)
        log_in = normal_logpdf(stat, mean_in, std_in + _EPS)
        log_out = normal_logpdf(stat, mean_out, std_out + _EPS)
        return (log_in - log_out).mean(axis=1)

    def _fit_threshold(self, X: Observations, y: np.ndarray | None) -> float:
        index = replay_subset(X, y, need_out=True, need_in=self.mode == "online")
        if index is None:
            raise ValueError(
                f"{self.name}: the shadow replay that chooses the threshold needs labels, "
                "reference models of shadow model 0 (shadow.count >= 2) and adversary images "
                f"of both classes that have {'IN and ' if self.mode == 'online' else ''}OUT "
                "reference models"
            )
        return best_threshold(y[index], self._score_samples(X.subset(index)))
