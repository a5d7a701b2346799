"""Per-sample likelihood-ratio attack (LiRA, Carlini et al. 2022) on reconstruction errors.

Some images are simply hard to reconstruct; a global threshold calls them non-members whatever
their membership. LiRA compares each sample's statistic with how *that sample* fares under
reference models that did (IN) or did not (OUT) train on it.

Statistic. ``stat(x) = log(mean_k error(x, k))``, averaged over the selected mask ratios
(``statistic="log_mean"``, default), or ``mean_{r,k} log error(x, r, k)`` (``"mean_log"``).
Errors are positive and roughly log-normal, so the log makes the per-sample distributions over
models close to Gaussian (as the logit of the confidence does in the original) and turns a
multiplicative change of error level into an additive offset.

Decoder calibration. Reference models are scored with their own decoder, but the audited
encoder may wear another one (the shadow decoder, an adapted decoder): its overall error level
then differs from the references' for reasons unrelated to membership, and every sample would
look like a member (or a non-member). So, by default (``calibrate=True``), each model's
statistic is centred on its own median: the audited model's over all observed samples; a
reference model's, offline, over the observed samples it did NOT train on and, online, over
all observed samples. Only per-sample *relative* difficulty is compared.

Why the reference medians differ by mode: a median over all samples depends on how many of
them the model trained on. Offline, references trained on none of the target samples but on
about half of the adversary's shadow data, so all-sample medians would shift the shadow replay
(where the threshold is fitted) against the audit by about half the membership gap; OUT-only
medians are the same in both. The audited model's own median sits halfway between its member
and non-member levels in both (50/50 sets), a constant the fitted threshold absorbs. Online,
references trained on a random half of the shadow *and* the target data, so their all-sample
median matches the audited model's 50/50 median; a mismatch would matter there, because the
online log-ratio is not invariant to a constant shift (its slope in ``stat`` differs per
sample). Offline z-scores with a shared variance are rank-invariant to a constant shift, so
calibration only moves their threshold. Caveat: the audited model's median depends on the
audited set's member fraction; fit and audit sets should have similar member fractions (the
paper's 50/50 splits) for the threshold to transfer.

Gaussians. For each sample, ``mu_out`` is the mean statistic of the OUT reference models (and
``mu_in`` of the IN ones). The variance is per sample when the sample has at least
``per_sample_variance_min`` such models, otherwise the global pooled within-sample variance
(the "fixed variance" trick, better with few reference models). With no sample having two
models of a kind there is no variance estimate: the standard deviation is then 1 (offline LiRA
degenerates to the difference ``mu_out - stat``, i.e. difficulty calibration). A sample lacking
OUT (or IN, online) reference models gets ``mu_out = mu_in + delta`` (resp. ``mu_in = mu_out -
delta``) with ``delta`` the mean OUT-IN gap over samples having both.

Scores. Offline (``mode="offline"``, references never trained on the audited samples, the
default): ``(mu_out - stat) / sigma_out``, the one-sided z-score (monotone in Carlini's
``log Phi``; 0 = "as good as an average OUT model"). Online (``mode="online"``, IN references
exist): ``log N(stat; mu_in, sigma_in) - log N(stat; mu_out, sigma_out)``.

Threshold. ``fit`` learns nothing but ``threshold_``. It receives the adversary's
observations: the errors of shadow model 0 on the adversary's own members and non-members,
with shadow models 1..M-1 as its references. Scoring those with the same recipe is a
leave-one-model-out replay of the attack where membership is known, and the threshold that
best separates them is kept (offline, over the adversary's images that have an OUT reference
model). Without shadow references (or labels) the threshold is the natural one, 0 (z = 0
offline; likelihood ratio 1 online).

The LiRA reference code's estimators (median, ``np.std``, two-sided log-density) are
``lira_reference`` (``mimia.attacks.lira_reference``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mimia.attacks.base import (
    Attack,
    check_bool,
    check_choice,
    check_int,
    check_ratios,
    register,
)
from mimia.attacks.calibration import (
    gaussian,
    log_errors,
    normal_logpdf,
    reference_levels,
    replay_subset,
)
from mimia.attacks.data import Observations
from mimia.metrics import best_threshold

MODES = ("offline", "online")
STATISTICS = ("log_mean", "mean_log")


def lira_statistic(errors: np.ndarray, statistic: str = "log_mean") -> np.ndarray:
    """Statistic over the last two axes ``[..., R, K]`` of an error array."""
    if statistic == "log_mean":
        return log_errors(errors.mean(axis=-1)).mean(axis=-1)
    if statistic == "mean_log":
        return log_errors(errors).mean(axis=(-2, -1))
    raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")


@register
class LiRA(Attack):
    """Per-sample LiRA on the log reconstruction error, offline or online (see module doc)."""

    name = "lira"
    inputs = frozenset({"errors", "references"})
    fit_inputs = frozenset({"errors"})
    needs_labels = False

    def __init__(
        self,
        mode: str = "offline",
        statistic: str = "log_mean",
        ratios: Sequence[float] | float | None = None,
        calibrate: bool = True,
        per_sample_variance_min: int = 16,
    ) -> None:
        self.mode = mode
        self.statistic = statistic
        self.ratios = ratios
        self.calibrate = calibrate
        self.per_sample_variance_min = per_sample_variance_min

    def _validate_params(self) -> None:
        check_choice(self.name, "mode", self.mode, MODES)
        check_choice(self.name, "statistic", self.statistic, STATISTICS)
        check_ratios(self.name, self.ratios)
        check_bool(self.name, "calibrate", self.calibrate)
        check_int(self.name, "per_sample_variance_min", self.per_sample_variance_min, 1)

    @property
    def calibration(self) -> str:
        return "transductive" if self.calibrate else "shadow"

    def uses_in_references(self) -> bool:
        return self.mode == "online"

    def statistics(self, X: Observations) -> tuple[np.ndarray, np.ndarray]:
        """``(stat [N], reference stats [M, N])``, median-centred per model if ``calibrate``."""
        r = X.ratio_indices(self.ratios)
        stat = lira_statistic(X.errors[:, r], self.statistic)
        ref = lira_statistic(X.reference_errors[:, :, r], self.statistic)
        if self.calibrate:
            stat = stat - np.median(stat)
            ref = ref - reference_levels(ref, X.reference_in, self.mode)
        return stat, ref

    def _score_samples(self, X: Observations) -> np.ndarray:
        stat, ref = self.statistics(X)
        member = X.reference_in
        mu_out, sd_out, n_out, pooled_out = gaussian(ref, ~member, self.per_sample_variance_min)
        mu_in, sd_in, n_in, pooled_in = gaussian(ref, member, self.per_sample_variance_min)
        both = (n_out > 0) & (n_in > 0)
        delta = float(np.mean(mu_out[both] - mu_in[both])) if both.any() else np.nan

        def impute(mu, fill, what):
            lacking = np.isnan(mu)
            if lacking.any():
                if np.isnan(delta):
                    raise ValueError(
                        f"lira ({self.mode}): {int(lacking.sum())} samples have no {what} "
                        "reference model and no sample has both IN and OUT ones to bridge the gap"
                        + (" (use mode='offline')" if what == "IN" else "")
                    )
                mu = np.where(lacking, fill, mu)
            return mu

        mu_out = impute(mu_out, mu_in + delta, "OUT")
        if self.mode == "offline":
            return (mu_out - stat) / sd_out
        # A sample without IN models falls back to pooled IN variance (or pooled OUT variance
        # when no sample has two IN models).
        if not (n_in >= 2).any():
            pooled_in = pooled_out
        sd_in = np.where(n_in >= 2, sd_in, pooled_in)
        mu_in = impute(mu_in, mu_out - delta, "IN")
        return normal_logpdf(stat, mu_in, sd_in) - normal_logpdf(stat, mu_out, sd_out)

    def _fit_threshold(self, X: Observations, y: np.ndarray | None) -> float:
        index = replay_subset(X, y, need_out=self.mode == "offline")
        if index is None:
            return 0.0
        return best_threshold(y[index], self._score_samples(X.subset(index)))
