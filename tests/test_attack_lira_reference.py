"""``lira_reference`` against a direct re-implementation of the LiRA reference code
(tensorflow/privacy research/mi_lira_2021/plot.py: generate_ours, generate_ours_offline, and
do_plot's metrics) with scipy.stats.norm."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
from sklearn.metrics import auc as sk_auc
from sklearn.metrics import roc_curve
from test_attacks import inputs, make_world

from mimia.attacks import LiRAReference, Observations, build_attack
from mimia.metrics import auc, tpr_at_fpr


def reference_scores(keep, scores, check_scores, online, fix_variance):
    """plot.py's ``generate_ours`` (online) / ``generate_ours_offline``, for one check model;
    returns ``-prediction``, what its ``sweep`` ranks by (higher = member)."""
    dat_in, dat_out = [], []
    for j in range(scores.shape[1]):
        dat_in.append(scores[keep[:, j], j, :])
        dat_out.append(scores[~keep[:, j], j, :])
    out_size = min(min(map(len, dat_out)), 100000)
    dat_out = np.array([x[:out_size] for x in dat_out])
    mean_out = np.median(dat_out, 1)
    if not online:
        std_out = np.std(dat_out) if fix_variance else np.std(dat_out, 1)
        prediction = scipy.stats.norm.logpdf(check_scores, mean_out, std_out + 1e-30).mean(1)
        return -prediction
    in_size = min(min(map(len, dat_in)), 100000)
    dat_in = np.array([x[:in_size] for x in dat_in])
    mean_in = np.median(dat_in, 1)
    if fix_variance:
        std_in = np.std(dat_in)
        std_out = np.std(dat_in)
    else:
        std_in = np.std(dat_in, 1)
        std_out = np.std(dat_out, 1)
    pr_in = -scipy.stats.norm.logpdf(check_scores, mean_in, std_in + 1e-30)
    pr_out = -scipy.stats.norm.logpdf(check_scores, mean_out, std_out + 1e-30)
    return -(pr_in - pr_out).mean(1)


def random_observations(seed, n=200, m=24, ratios=(0.5, 0.75), k=3):
    """Log-normal errors; each reference model trains on a random ~half of the samples, so
    IN and OUT counts differ between samples (the reference truncates them to the minimum,
    here at least 3, so that median and mean, np.std and a pooled std differ)."""
    rng = np.random.default_rng(seed)
    difficulty = rng.normal(0, 0.5, (1, n, 1, 1))
    keep = rng.random((m, n)) < 0.5
    ref = np.exp(
        difficulty - 0.3 * keep[:, :, None, None] + rng.normal(0, 0.2, (m, n, len(ratios), k))
    )
    member = rng.random(n) < 0.5
    own = np.exp(
        difficulty[0] - 0.3 * member[:, None, None] + rng.normal(0, 0.2, (n, len(ratios), k))
    )
    X = Observations(
        np.array([f"x{i:04d}" for i in range(n)]),
        own,
        ratios,
        reference_errors=ref,
        reference_in=keep,
    )
    assert len(set(keep.sum(axis=0))) > 3 and len(set((~keep).sum(axis=0))) > 3
    if m >= 12:
        assert min(keep.sum(axis=0).min(), (~keep).sum(axis=0).min()) >= 3
    return X, member


@pytest.mark.parametrize("online", [False, True])
@pytest.mark.parametrize("fix_variance", [False, True])
@pytest.mark.parametrize("statistic", ["per_mask", "log_mean"])
def test_scores_equal_the_reference_code(online, fix_variance, statistic):
    X, member = random_observations(seed=int(online) + 2 * int(fix_variance))
    if statistic == "per_mask":  # one query per (mask ratio, mask), like the augmentations
        check = np.log(X.errors).reshape(len(X), -1)
        stats = np.log(X.reference_errors).reshape(X.num_references, len(X), -1)
    else:  # one query per sample: log of the mean error over masks, averaged over ratios
        check = np.log(X.errors.mean(axis=-1)).mean(axis=-1)[:, None]
        stats = np.log(X.reference_errors.mean(axis=-1)).mean(axis=-1)[:, :, None]
    expected = reference_scores(X.reference_in, stats, check, online, fix_variance)
    attack = LiRAReference(
        mode="online" if online else "offline", fix_variance=fix_variance, statistic=statistic
    ).fit(X, member)
    scores = attack.score_samples(X)
    np.testing.assert_allclose(scores, expected, rtol=1e-12, atol=1e-12)
    # ... and so do the numbers the reference prints: AUC and TPR at 0.1 % FPR ("<")
    fpr, tpr, _ = roc_curve(member, expected)  # sweep(prediction) is roc_curve(x, -prediction)
    assert auc(member, scores) == pytest.approx(sk_auc(fpr, tpr), abs=1e-12)
    for f in (0.001, 0.01, 0.1):
        low = tpr[np.where(fpr < f)[0][-1]]
        assert tpr_at_fpr(member, scores, f, convention="strict") == low


def test_truncation_to_the_smallest_count_changes_the_fit():
    """Dropping the later models of samples with more of them is what makes the numbers equal:
    with all OUT models per sample the medians differ."""
    X, member = random_observations(seed=7)
    n_out = (~X.reference_in).sum(axis=0)
    j = int(np.argmax(n_out))
    assert n_out[j] > n_out.min()
    stats = np.log(X.reference_errors.mean(axis=-1)).mean(axis=-1)
    first = np.flatnonzero(~X.reference_in[:, j])[: n_out.min()]
    ours = LiRAReference(statistic="log_mean").fit(X, member).score_samples(X)
    check = np.log(X.errors.mean(axis=-1)).mean(axis=-1)
    truncated = scipy.stats.norm.logpdf(
        check[j], np.median(stats[first, j]), np.std(stats[first, j]) + 1e-30
    )
    assert ours[j] == pytest.approx(-truncated, rel=1e-12)
    everything = np.flatnonzero(~X.reference_in[:, j])
    untruncated = scipy.stats.norm.logpdf(
        check[j], np.median(stats[everything, j]), np.std(stats[everything, j]) + 1e-30
    )
    assert abs(ours[j] + untruncated) > 1e-6


def test_calibrate_centres_each_model_and_query():
    X, member = random_observations(seed=4)
    shifted = Observations(
        X.sample_ids, X.errors * 3.0, X.mask_ratios, X.reference_errors, X.reference_in
    )
    plain = LiRAReference(calibrate=True).fit(X, member).score_samples(X)
    # a decoder that triples every error of the audited model changes nothing once calibrated
    np.testing.assert_allclose(
        LiRAReference(calibrate=True).fit(X, member).score_samples(shifted), plain, rtol=1e-9
    )
    assert not np.allclose(LiRAReference().fit(X, member).score_samples(shifted), plain)
    # and equals the reference estimator on centred statistics
    check = np.log(X.errors).reshape(len(X), -1)
    check = check - np.median(check, axis=0)
    stats = np.log(X.reference_errors).reshape(X.num_references, len(X), -1)
    for m in range(X.num_references):
        stats[m] -= np.median(stats[m, ~X.reference_in[m]], axis=0)
    expected = reference_scores(X.reference_in, stats, check, False, False)
    np.testing.assert_allclose(plain, expected, rtol=1e-10, atol=1e-10)


def test_on_the_pipeline_data():
    world = make_world(seed=0, n=200, num_shadow=9)
    data = inputs(world, "released", ["errors", "references"])
    y = data.y_audit
    for params in ({}, {"fix_variance": True}, {"statistic": "log_mean"}):
        attack = build_attack("lira_reference", **params).fit(data.X_fit, data.y_fit)
        scores = attack.score_samples(data.X_audit)
        assert auc(y, scores) > 0.85, params
        assert np.isfinite(attack.threshold_)
    # under another decoder the uncalibrated two-sided score suffers, the calibrated one not
    shadow = inputs(world, "shadow", ["errors", "references"])
    raw = build_attack("lira_reference").fit(shadow.X_fit, shadow.y_fit)
    cal = build_attack("lira_reference", calibrate=True).fit(shadow.X_fit, shadow.y_fit)
    assert (
        auc(y, cal.score_samples(shadow.X_audit)) > auc(y, raw.score_samples(shadow.X_audit)) + 0.1
    )


def test_needs_a_reference_model_of_each_kind_per_sample():
    X, member = random_observations(seed=1, m=3, n=100)
    lacking = int(X.reference_in.all(axis=0).sum())
    assert lacking > 0
    with pytest.raises(ValueError, match=f"{lacking} samples have no OUT reference model"):
        LiRAReference().fit(X, member).score_samples(X)
    none = Observations(X.sample_ids, X.errors, X.mask_ratios)
    with pytest.raises(ValueError, match="needs references to fit"):
        LiRAReference().fit(none, member)
