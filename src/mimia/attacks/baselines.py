"""Reference points that need no shadow model.

* ``global_threshold``: ``score = -mean error`` (as the paper's attack) but the threshold is
  not learned from shadow data: it is a quantile of the *audited set's own* mean errors
  (default the median, i.e. "call the better-reconstructed half members"). It uses no labels,
  but it does assume the audited set's member fraction, so its balanced accuracy is only fair
  on balanced audit sets. AUC and TPR@FPR do not depend on the threshold at all.
* ``random``: seeded uniform scores, the floor every attack must beat (AUC ~ 0.5).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mimia.attacks.base import Attack, check_int, check_ratios, register
from mimia.attacks.data import Observations


@register
class GlobalThresholdAttack(Attack):
    """``score = -mean error``; the threshold for scoring ``X``, ``threshold_for(X)``, is minus
    the ``quantile`` of ``X``'s mean errors: samples with error at or below that quantile are
    members. ``fit`` learns nothing (no ``threshold_``: the threshold depends on ``X``)."""

    name = "global_threshold"
    needs_labels = False

    def __init__(self, quantile: float = 0.5, ratios: Sequence[float] | float | None = None):
        self.quantile = quantile
        self.ratios = ratios

    def _validate_params(self) -> None:
        q = self.quantile
        if isinstance(q, bool) or not isinstance(q, int | float) or not 0.0 <= q <= 1.0:
            raise ValueError(f"{self.name}: quantile must lie in [0, 1], got {q!r}")
        check_ratios(self.name, self.ratios)

    @property
    def calibration(self) -> str:
        return "transductive"

    def _mean_error(self, X: Observations) -> np.ndarray:
        return X.errors[:, X.ratio_indices(self.ratios)].mean(axis=(1, 2))

    def _fit_threshold(self, X: Observations, y) -> None:
        return None

    def _score_samples(self, X: Observations) -> np.ndarray:
        return -self._mean_error(X)

    def threshold_for(self, X: Observations) -> float:
        self._check_fitted()
        self._check_X(X, self.inputs, "threshold")
        return -float(np.quantile(self._mean_error(X), self.quantile))


@register
class RandomGuess(Attack):
    """Seeded uniform scores in [0, 1) (one draw per sample, in order); threshold 0.5."""

    name = "random"
    inputs = frozenset()
    needs_labels = False

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def _validate_params(self) -> None:
        check_int(self.name, "seed", self.seed, 0)

    @property
    def calibration(self) -> str:
        return "fixed"

    def _fit_threshold(self, X: Observations, y) -> float:
        return 0.5

    def _score_samples(self, X: Observations) -> np.ndarray:
        return np.random.default_rng(self.seed).random(len(X))
