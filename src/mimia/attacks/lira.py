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

Threshold. ``fit`` learns nothing but the threshold. It receives the adversary's shadow
observations: the errors of reference model 0 on the adversary's own members and non-members,
with reference models 1..M-1 as its references. Scoring those with the same recipe is a
leave-one-model-out replay of the attack where membership is known, and the threshold that
best separates them is kept. Without shadow references (or labels) the threshold is the
natural one, 0 (z = 0 offline; likelihood ratio 1 online).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mimia.attacks.base import Attack, Observations, log_errors, register
from mimia.metrics import best_threshold

MODES = ("offline", "online")
STATISTICS = ("log_mean", "mean_log")
_MIN_SIGMA = 1e-6


def lira_statistic(errors: np.ndarray, statistic: str = "log_mean") -> np.ndarray:
    """Statistic over the last two axes ``[..., R, K]`` of an error array."""
    if statistic == "log_mean":
        return log_errors(errors.mean(axis=-1)).mean(axis=-1)
    if statistic == "mean_log":
        return log_errors(errors).mean(axis=(-2, -1))
    raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")


def out_medians(values: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Per reference model (rows of ``values [M, N, ...]``), the median over the samples it
    did not train on (``out [M, N]``), over all samples for a model with no OUT sample."""
    med = np.empty((values.shape[0], *values.shape[2:]))
    for m in range(values.shape[0]):
        keep = out[m] if out[m].any() else np.ones(values.shape[1], dtype=bool)
        med[m] = np.median(values[m, keep], axis=0)
    return med


def _gaussian(stats: np.ndarray, member: np.ndarray, min_models: int):
    """Per-sample mean, std (per sample or pooled) and model count of ``stats[member]``.

    ``stats``, ``member``: ``[M, N]``. Means are NaN for samples with no such model; the std
    is always finite (per-sample where ``count >= min_models``, else pooled, else 1).
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
    sigma = np.maximum(np.where(use, per_sample, pooled), _MIN_SIGMA)
    return mu, sigma, count, max(float(pooled), _MIN_SIGMA)


def _log_normal_pdf(x, mu, sigma):
    return -0.5 * ((x - mu) / sigma) ** 2 - np.log(sigma) - 0.5 * np.log(2 * np.pi)


@register
class LiRA(Attack):
    """Per-sample LiRA on the log reconstruction error, offline or online (see module doc)."""

    name = "lira"
    requires_shadow = False
    requires_references = True

    def __init__(
        self,
        mode: str = "offline",
        statistic: str = "log_mean",
        ratios: Sequence[float] | float | None = None,
        calibrate: bool = True,
        per_sample_variance_min: int = 16,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"LiRA mode must be one of {MODES}, got {mode!r}")
        if statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
        super().__init__(
            mode=mode,
            statistic=statistic,
            ratios=ratios,
            calibrate=calibrate,
            per_sample_variance_min=per_sample_variance_min,
        )
        self.mode, self.statistic, self.ratios = mode, statistic, ratios
        self.calibrate = bool(calibrate)
        self.per_sample_variance_min = int(per_sample_variance_min)

    def statistics(self, obs: Observations) -> tuple[np.ndarray, np.ndarray]:
        """``(stat [N], reference stats [M, N])``, median-centred per model if ``calibrate``."""
        r = obs.ratio_indices(self.ratios)
        stat = lira_statistic(obs.errors[:, r], self.statistic)
        ref = lira_statistic(obs.reference_errors[:, :, r], self.statistic)
        if self.calibrate:
            stat = stat - np.median(stat)
            if self.mode == "offline":
                ref = ref - out_medians(ref, ~obs.reference_in)[:, None]
            else:
                ref = ref - np.median(ref, axis=1, keepdims=True)
        return stat, ref

    def _score(self, obs: Observations) -> np.ndarray:
        stat, ref = self.statistics(obs)
        member = obs.reference_in
        mu_out, sd_out, n_out, pooled_out = _gaussian(ref, ~member, self.per_sample_variance_min)
        mu_in, sd_in, n_in, pooled_in = _gaussian(ref, member, self.per_sample_variance_min)
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
        return _log_normal_pdf(stat, mu_in, sd_in) - _log_normal_pdf(stat, mu_out, sd_out)

    def _fit_threshold(self, shadow: Observations | None) -> float:
        usable = (
            shadow is not None
            and shadow.labels is not None
            and shadow.reference_errors is not None
            and 0 < shadow.labels.sum() < len(shadow)
        )
        if usable and self.mode == "offline":
            # With few reference models some adversary images were IN for all of them; the
            # offline replay can only score the images that have an OUT reference.
            shadow = shadow.subset(np.flatnonzero((~shadow.reference_in).any(axis=0)))
            usable = 0 < shadow.labels.sum() < len(shadow)
        if not usable:
            return 0.0
        return best_threshold(shadow.labels, self._score(shadow))
