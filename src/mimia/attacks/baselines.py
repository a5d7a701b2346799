"""Reference points that need no shadow model.

* ``global_threshold``: ``score = -mean error`` (as the paper's attack) but the threshold is
  not learned from shadow data: it is a quantile of the *target's own* mean errors (default
  the median, i.e. "call the better-reconstructed half members"). It uses no labels, but it
  does assume the audited set's member fraction, so its balanced accuracy is only fair on
  balanced audit sets. AUC and TPR@FPR do not depend on the threshold at all.
* ``random``: seeded uniform scores, the floor every attack must beat (AUC ~ 0.5).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mimia.attacks.base import Attack, Observations, register, select_errors


@register
class GlobalThresholdAttack(Attack):
    """``score = -mean error``; ``threshold`` = minus the ``quantile`` of the scored
    observations' mean errors, i.e. samples with error at or below that quantile are members.

    ``threshold`` is set by ``score`` (it depends on the scored observations), not by ``fit``.
    """

    name = "global_threshold"
    requires_shadow = False

    def __init__(self, quantile: float = 0.5, ratios: Sequence[float] | float | None = None):
        if not 0.0 <= quantile <= 1.0:
            raise ValueError(f"quantile must lie in [0, 1], got {quantile}")
        super().__init__(quantile=quantile, ratios=ratios)
        self.quantile = float(quantile)
        self.ratios = ratios

    def _fit_threshold(self, shadow: Observations | None) -> float:
        return np.nan  # set when scoring: a quantile of the target's own errors

    def _score(self, obs: Observations) -> np.ndarray:
        mean_error = select_errors(obs, self.ratios).mean(axis=(1, 2))
        self.threshold = -float(np.quantile(mean_error, self.quantile))
        return -mean_error


@register
class RandomGuess(Attack):
    """Seeded uniform scores in [0, 1) (one draw per sample, in order); threshold 0.5."""

    name = "random"
    requires_shadow = False

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.seed = int(seed)

    def _fit_threshold(self, shadow: Observations | None) -> float:
        return 0.5

    def _score(self, obs: Observations) -> np.ndarray:
        return np.random.default_rng(self.seed).random(len(obs))
