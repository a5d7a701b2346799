"""RMIA (Zarifzadeh et al., ICML 2024) adapted to reconstruction errors.

Likelihood. A model's "probability" of a sample is ``p(x | theta) = exp(-e(x) / tau)`` with
``e(x)`` the mean error over the K masks. ``tau`` is, by default, the median of that model's
per-sample mean errors, separately per model and mask ratio (``p = exp(-mean_r e_r / tau_r)``):
for the audited model over all observed samples, for a reference model offline over the
observed samples it did not train on and online over all of them (as LiRA's calibration, see
``mimia.attacks.lira``: so that ``tau`` does not depend on how many observed samples a
reference trained on). Dividing by each model's own median makes ``e / tau``
dimensionless and removes the global error level of the decoder a model is scored with (the
audited encoder may wear a different decoder than the reference models). A fixed
``temperature`` replaces it by one global ``tau`` for all models (no decoder calibration).

Pr(x). Offline (default; references did not train on x): ``p(x) = ((1 + a) p_OUT(x) + 1 - a)
/ 2`` with ``p_OUT`` the mean over OUT reference models, the paper's linear approximation of
the missing IN models. A sample with no OUT reference model falls back to the mean over its
(IN) reference models. Online: ``p(x)`` is the mean over all reference models. By default
(``a=None``) ``fit`` tunes ``a`` on the shadow observations (grid 0, 0.1, ..., 1, best shadow
AUC; ``a_``), as the paper tunes it on reference models: ``exp(-e / tau)`` is not a calibrated
probability, so the paper's values of ``a`` for softmax confidences do not carry over (on
synthetic data with strong per-sample difficulty the best ``a`` is near 1, where
``p(x) = p_OUT(x)``; at ``a = 0.3`` RMIA is barely better than the global threshold). Give a
number to fix it.

Score. ``LR(x) = p(x | theta) / p(x)``; ``score(x)`` is the fraction of population samples
``z`` with ``LR(x) / LR(z) > gamma``. The population is, by default
(``population="observations"``), every *other* sample of the scored observations (the paper
draws z from population data scored by the same audited model; here the audit set itself is
the only data the audited model scored, and it contains members, which only shifts the
fraction). ``population="shadow_nonmembers"`` uses the LRs of the shadow non-members computed
in ``fit`` (``population_lr_``, under shadow model 0 and its references), i.e. a fixed
reference distribution, at the price of comparing LRs across models. For a fixed population
the score is a monotone function of ``LR(x)``: AUC and TPR@FPR are those of LR, the population
and ``gamma`` only change ties and the threshold.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mimia.attacks.base import Attack, check_choice, check_ratios, register
from mimia.attacks.calibration import reference_levels, replay_subset
from mimia.attacks.data import Observations
from mimia.metrics import auc, best_threshold

MODES = ("offline", "online")
POPULATIONS = ("observations", "shadow_nonmembers")
A_GRID = tuple(np.round(np.linspace(0, 1, 11), 2))


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@register
class RMIA(Attack):
    """Relative membership inference attack on ``exp(-error / tau)`` (see module doc).

    Fitted: ``a_`` (the ``a`` in use), ``population_lr_`` (with
    ``population="shadow_nonmembers"``), ``threshold_``.
    """

    name = "rmia"
    inputs = frozenset({"errors", "references"})
    fit_inputs = frozenset({"errors"})
    needs_labels = False

    def __init__(
        self,
        a: float | None = None,
        gamma: float = 1.0,
        temperature: float | None = None,
        mode: str = "offline",
        population: str = "observations",
        ratios: Sequence[float] | float | None = None,
    ) -> None:
        self.a = a
        self.gamma = gamma
        self.temperature = temperature
        self.mode = mode
        self.population = population
        self.ratios = ratios

    def _validate_params(self) -> None:
        check_choice(self.name, "mode", self.mode, MODES)
        check_choice(self.name, "population", self.population, POPULATIONS)
        if self.a is not None and not (_number(self.a) and 0.0 <= self.a <= 1.0):
            raise ValueError(
                f"{self.name}: a must lie in [0, 1] (or be null to tune it), got {self.a!r}"
            )
        if not (_number(self.gamma) and self.gamma > 0):
            raise ValueError(f"{self.name}: gamma must be > 0, got {self.gamma!r}")
        if self.temperature is not None and not (
            _number(self.temperature) and self.temperature > 0
        ):
            raise ValueError(
                f"{self.name}: temperature must be > 0 (or null), got {self.temperature!r}"
            )
        check_ratios(self.name, self.ratios)

    @property
    def calibration(self) -> str:
        # The audited model's median error and a population of audited samples are both
        # statistics of the audited set.
        own = self.temperature is None or self.population == "observations"
        return "transductive" if own else "shadow"

    def uses_in_references(self) -> bool:
        return self.mode == "online"

    def fits_on_references(self) -> bool:
        # Tuning ``a`` and the threshold both rank likelihood ratios, which need references.
        return True

    def _probabilities(self, e: np.ndarray, tau: np.ndarray) -> np.ndarray:
        """``p(x | theta)`` from mean errors ``[..., N, R]`` and temperatures ``[..., 1, R]``."""
        if self.temperature is not None:
            tau = np.float64(self.temperature)
        return np.exp(-(e / np.maximum(tau, 1e-12)).mean(axis=-1))

    def likelihood_ratio(self, X: Observations, a: float | None = None) -> np.ndarray:
        """``LR(x) = p(x | theta) / p(x)`` for every sample (``a``: default ``a_``)."""
        if X.num_references == 0:
            raise ValueError(f"{self.name}: X has no reference models")
        if a is None:
            self._check_fitted()
            a = self.a_
        r = X.ratio_indices(self.ratios)
        e_target = X.errors[:, r].mean(axis=-1)  # [N, R]
        e_ref = X.reference_errors[:, :, r].mean(axis=-1)  # [M, N, R]
        p_target = self._probabilities(e_target, np.median(e_target, axis=0, keepdims=True))
        p_ref = self._probabilities(e_ref, reference_levels(e_ref, X.reference_in, self.mode))
        if self.mode == "online":
            p_x = p_ref.mean(axis=0)
        else:
            out = ~X.reference_in
            n_out = out.sum(axis=0)
            p_out = np.where(out, p_ref, 0.0).sum(axis=0) / np.maximum(n_out, 1)
            p_x = ((1 + a) * p_out + (1 - a)) / 2
            # A sample no reference model left out falls back to the mean over all of them.
            p_x = np.where(n_out == 0, p_ref.mean(axis=0), p_x)
        return p_target / np.maximum(p_x, 1e-300)

    def _fit(self, X: Observations, y: np.ndarray | None) -> None:
        if self.a is None:
            if y is None or X.num_references == 0:
                raise ValueError(
                    f"{self.name}: a=null tunes a on labelled shadow data with reference models"
                )
            aucs = [auc(y, self.likelihood_ratio(X, a)) for a in A_GRID]
            self.a_ = float(A_GRID[int(np.argmax(aucs))])
        else:
            self.a_ = float(self.a)
        if self.population == "shadow_nonmembers":
            if y is None or X.num_references == 0:
                raise ValueError(
                    f"{self.name}: population='shadow_nonmembers' needs labelled shadow "
                    "observations with reference models"
                )
            self.population_lr_ = self.likelihood_ratio(X, self.a_)[~y]

    def _scores_from_lr(self, lr: np.ndarray, population: np.ndarray | None) -> np.ndarray:
        # LR(x)/LR(z) > gamma  <=>  LR(z) < LR(x)/gamma (all LRs are positive).
        if population is None:  # population = the scored samples themselves
            pop = lr
            self_counted = np.full(len(lr), self.gamma < 1.0)
        else:
            pop = population
            self_counted = np.zeros(len(lr), dtype=bool)
        below = np.searchsorted(np.sort(pop), lr / self.gamma, side="left").astype(np.float64)
        size = len(pop) - (1 if population is None else 0)
        return (below - self_counted) / max(size, 1)

    def _population(self) -> np.ndarray | None:
        return self.population_lr_ if self.population == "shadow_nonmembers" else None

    def _score_samples(self, X: Observations) -> np.ndarray:
        return self._scores_from_lr(self.likelihood_ratio(X, self.a_), self._population())

    def _fit_threshold(self, X: Observations, y: np.ndarray | None) -> float:
        if replay_subset(X, y) is None:
            return 0.5
        scores = self._scores_from_lr(self.likelihood_ratio(X, self.a_), self._population())
        if self.population == "shadow_nonmembers":
            # Shadow non-members are in the population: leave each one out of its own score.
            own = ~y & (self.gamma < 1.0)
            n_pop = len(self.population_lr_)
            scores = np.where(~y, (scores * n_pop - own) / max(n_pop - 1, 1), scores)
        return best_threshold(y, scores)
