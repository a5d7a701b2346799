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
AUC), as the paper tunes it on reference models: ``exp(-e / tau)`` is not a calibrated
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
in ``fit`` (under shadow model 0 and its references), i.e. a fixed reference distribution, at
the price of comparing LRs across models. For a fixed population the score is a monotone
function of ``LR(x)``: AUC and TPR@FPR are those of LR, the population and ``gamma`` only
change ties and the threshold.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mimia.attacks.base import Attack, Observations, register
from mimia.attacks.lira import out_medians
from mimia.metrics import auc, best_threshold

MODES = ("offline", "online")
POPULATIONS = ("observations", "shadow_nonmembers")
A_GRID = tuple(np.round(np.linspace(0, 1, 11), 2))


@register
class RMIA(Attack):
    """Relative membership inference attack on ``exp(-error / tau)`` (see module doc)."""

    name = "rmia"
    requires_shadow = False
    requires_references = True

    def __init__(
        self,
        a: float | None = None,
        gamma: float = 1.0,
        temperature: float | None = None,
        mode: str = "offline",
        population: str = "observations",
        ratios: Sequence[float] | float | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"RMIA mode must be one of {MODES}, got {mode!r}")
        if population not in POPULATIONS:
            raise ValueError(f"population must be one of {POPULATIONS}, got {population!r}")
        if a is not None and not 0.0 <= a <= 1.0:
            raise ValueError(f"a must lie in [0, 1] (or be None to tune it), got {a}")
        if gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        if temperature is not None and temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        super().__init__(
            a=a,
            gamma=gamma,
            temperature=temperature,
            mode=mode,
            population=population,
            ratios=ratios,
        )
        self.a = a
        self.gamma = float(gamma)
        self.temperature = temperature
        self.mode, self.population, self.ratios = mode, population, ratios
        self.a_: float | None = None if a is None else float(a)
        """The ``a`` in use (tuned by ``fit`` when ``a`` is None)."""
        self.population_lr: np.ndarray | None = None
        self.n_fallback = 0
        """Samples of the last scored observations that had no OUT reference model."""

    def _probabilities(self, e: np.ndarray, tau: np.ndarray) -> np.ndarray:
        """``p(x | theta)`` from mean errors ``[..., N, R]`` and temperatures ``[..., 1, R]``."""
        if self.temperature is not None:
            tau = np.float64(self.temperature)
        return np.exp(-(e / np.maximum(tau, 1e-12)).mean(axis=-1))

    def likelihood_ratio(self, obs: Observations, a: float | None = None) -> np.ndarray:
        """``LR(x) = p(x | theta) / p(x)`` for every sample."""
        if obs.reference_errors is None:
            raise ValueError("rmia: observations have no reference models")
        a = self.a_ if a is None else a
        if a is None:
            raise RuntimeError("rmia: a is tuned by fit(); call fit() first")
        r = obs.ratio_indices(self.ratios)
        e_target = obs.errors[:, r].mean(axis=-1)  # [N, R]
        e_ref = obs.reference_errors[:, :, r].mean(axis=-1)  # [M, N, R]
        p_target = self._probabilities(e_target, np.median(e_target, axis=0, keepdims=True))
        if self.mode == "offline":
            tau_ref = out_medians(e_ref, ~obs.reference_in)[:, None, :]
        else:  # references trained on about half of the samples, as the audited model
            tau_ref = np.median(e_ref, axis=1, keepdims=True)
        p_ref = self._probabilities(e_ref, tau_ref)  # [M, N]
        if self.mode == "online":
            p_x = p_ref.mean(axis=0)
        else:
            out = ~obs.reference_in
            n_out = out.sum(axis=0)
            p_out = np.where(out, p_ref, 0.0).sum(axis=0) / np.maximum(n_out, 1)
            p_x = ((1 + a) * p_out + (1 - a)) / 2
            fallback = n_out == 0
            self.n_fallback = int(fallback.sum())
            p_x = np.where(fallback, p_ref.mean(axis=0), p_x)
        return p_target / np.maximum(p_x, 1e-300)

    def _fit(self, shadow: Observations | None) -> None:
        if self.a is None:
            if shadow is None or shadow.labels is None or shadow.reference_errors is None:
                raise ValueError("rmia: a=None tunes a on labelled shadow data with references")
            aucs = [auc(shadow.labels, self.likelihood_ratio(shadow, a)) for a in A_GRID]
            self.a_ = float(A_GRID[int(np.argmax(aucs))])
        else:
            self.a_ = float(self.a)
        if self.population == "shadow_nonmembers":
            if shadow is None or shadow.labels is None or shadow.reference_errors is None:
                raise ValueError(
                    "rmia: population='shadow_nonmembers' needs labelled shadow observations "
                    "with reference models"
                )
            self.population_lr = self.likelihood_ratio(shadow, self.a_)[~shadow.labels]

    def _scores_from_lr(self, lr: np.ndarray, own_population: np.ndarray | None) -> np.ndarray:
        # LR(x)/LR(z) > gamma  <=>  LR(z) < LR(x)/gamma (all LRs are positive).
        if own_population is None:  # population = the scored samples themselves
            pop = lr
            self_counted = np.full(len(lr), self.gamma < 1.0)
        else:
            pop = own_population
            self_counted = np.zeros(len(lr), dtype=bool)
        below = np.searchsorted(np.sort(pop), lr / self.gamma, side="left").astype(np.float64)
        size = len(pop) - (1 if own_population is None else 0)
        return (below - self_counted) / max(size, 1)

    def _score(self, obs: Observations) -> np.ndarray:
        lr = self.likelihood_ratio(obs, self.a_)
        if self.population == "observations":
            return self._scores_from_lr(lr, None)
        return self._scores_from_lr(lr, self.population_lr)

    def _fit_threshold(self, shadow: Observations | None) -> float:
        usable = (
            shadow is not None
            and shadow.labels is not None
            and shadow.reference_errors is not None
            and 0 < shadow.labels.sum() < len(shadow)
        )
        if not usable:
            return 0.5
        lr = self.likelihood_ratio(shadow, self.a_)
        if self.population == "observations":
            scores = self._scores_from_lr(lr, None)
        else:
            # Shadow non-members are in the population: leave each one out of its own score.
            scores = self._scores_from_lr(lr, self.population_lr)
            own = ~shadow.labels & (self.gamma < 1.0)
            n_pop = len(self.population_lr)
            scores = np.where(~shadow.labels, (scores * n_pop - own) / max(n_pop - 1, 1), scores)
        return best_threshold(shadow.labels, scores)
