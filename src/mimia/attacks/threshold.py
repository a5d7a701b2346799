"""The paper's attack (Li et al. 2024): members reconstruct better, so the score is minus the
mean reconstruction error over the K masks (and over the selected mask ratios); the decision
threshold is the one that best separates the shadow model's members from its non-members."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mimia.attacks.base import Attack, check_ratios, register
from mimia.attacks.data import Observations


@register
class ThresholdAttack(Attack):
    """``score = -mean error`` over masks and the mask ratios ``ratios`` (None: all)."""

    name = "threshold"

    def __init__(self, ratios: Sequence[float] | float | None = None) -> None:
        self.ratios = ratios

    def _validate_params(self) -> None:
        check_ratios(self.name, self.ratios)

    def _score_samples(self, X: Observations) -> np.ndarray:
        return -X.errors[:, X.ratio_indices(self.ratios)].mean(axis=(1, 2))
