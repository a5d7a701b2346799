"""Metrics against scikit-learn and hand-computed cases; the bootstrap against a naive loop."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from mimia.metrics import (
    auc,
    balanced_accuracy,
    best_balanced_accuracy,
    best_threshold,
    bootstrap_metrics,
    evaluate,
    roc_frame,
    roc_points,
    tpr_at_fpr,
)


def tied_data(seed: int, n: int = 500):
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.4
    scores = np.round(rng.normal(size=n) + 0.8 * labels, 1)  # rounding makes many ties
    return labels, scores


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_and_auc_match_sklearn_with_ties(seed):
    labels, scores = tied_data(seed)
    assert len(np.unique(scores)) < len(scores) / 4
    fpr, tpr, thr = roc_points(labels, scores)
    ref_fpr, ref_tpr, ref_thr = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr, rtol=0, atol=1e-15)
    np.testing.assert_allclose(tpr, ref_tpr, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(thr, ref_thr)
    assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    for target in (0.0, 0.001, 0.01, 0.05, 0.1, 0.5, 1.0):
        expected = ref_tpr[ref_fpr <= target].max()
        assert tpr_at_fpr(labels, scores, target) == pytest.approx(expected, abs=1e-15)


def test_int_labels_and_int_scores_accepted():
    labels = np.array([1, 0, 1, 0, 0])
    scores = np.array([3, 1, 2, 2, 0])
    assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))


def test_hand_computed_tiny_case_with_a_tie():
    labels = np.array([1, 1, 0, 0])
    scores = np.array([0.9, 0.5, 0.5, 0.1])
    fpr, tpr, thr = roc_points(labels, scores)
    np.testing.assert_array_equal(fpr, [0, 0, 0.5, 1])
    np.testing.assert_array_equal(tpr, [0, 0.5, 1, 1])
    np.testing.assert_array_equal(thr, [np.inf, 0.9, 0.5, 0.1])
    # trapezoid: 0.5 * (0.5 + 1) / 2 + 0.5 * 1 = 0.875 (the tie counts one half)
    assert auc(labels, scores) == 0.875
    assert tpr_at_fpr(labels, scores, 0.0) == 0.5
    assert tpr_at_fpr(labels, scores, 0.49) == 0.5  # the tied group cannot be split
    assert tpr_at_fpr(labels, scores, 0.5) == 1.0
    assert best_balanced_accuracy(labels, scores) == 0.75
    # first best point is "score >= 0.9"; the threshold is halfway to the next score
    assert best_threshold(labels, scores) == pytest.approx(0.7)
    assert balanced_accuracy(labels, scores >= 0.7) == 0.75


def test_tpr_is_zero_when_no_threshold_reaches_the_fpr():
    # the top score is a non-member: every threshold catching a member has FPR >= 1/3
    labels = np.array([0, 1, 1, 0, 0])
    scores = np.array([0.9, 0.5, 0.4, 0.3, 0.2])
    assert tpr_at_fpr(labels, scores, 0.1) == 0.0
    assert tpr_at_fpr(labels, scores, 1 / 3) == 1.0
    # a member tied with a non-member at the top: the group moves together
    labels = np.array([1, 0, 1, 0])
    scores = np.array([0.8, 0.8, 0.3, 0.1])
    assert tpr_at_fpr(labels, scores, 0.4) == 0.0  # the tie reaches (0.5, 0.5) at once
    assert tpr_at_fpr(labels, scores, 0.5) == 1.0  # then "score >= 0.3" is (0.5, 1)


def test_perfect_separation():
    labels = np.array([True] * 5 + [False] * 7)
    scores = np.concatenate([np.linspace(2, 3, 5), np.linspace(0, 1, 7)])
    assert auc(labels, scores) == 1.0
    for target in (0.0, 0.001, 0.01, 0.1, 1.0):
        assert tpr_at_fpr(labels, scores, target) == 1.0
    assert best_balanced_accuracy(labels, scores) == 1.0
    assert best_threshold(labels, scores) == pytest.approx(1.5)
    # reversed scores: the best is to predict nobody member (balanced accuracy 0.5)
    assert auc(labels, -scores) == 0.0
    t = best_threshold(labels, -scores)
    assert not (-scores >= t).any()


def test_balanced_accuracy_hand_computed():
    labels = np.array([1, 1, 0, 0, 0])
    preds = np.array([1, 0, 0, 0, 1])
    assert balanced_accuracy(labels, preds) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert balanced_accuracy(labels.astype(bool), preds.astype(bool)) == pytest.approx(7 / 12)


def test_validation_errors():
    with pytest.raises(ValueError, match="differ in length"):
        auc([1, 0, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="both classes"):
        auc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="not finite"):
        auc([1, 0, 1], [0.1, np.nan, 0.3])
    with pytest.raises(ValueError, match="not finite"):
        evaluate([1, 0, 1], [0.1, np.inf, 0.3])
    with pytest.raises(ValueError, match="boolean or 0/1"):
        auc([2, 0, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="1-D"):
        auc([[1, 0]], [[0.1, 0.2]])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tpr_at_fpr([1, 0], [0.2, 0.1], 1.5)
    with pytest.raises(ValueError, match="differ in length"):
        balanced_accuracy([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="n_bootstrap"):
        evaluate([1, 0], [0.2, 0.1], n_bootstrap=-1)


def test_roc_frame_for_parquet(tmp_path):
    labels, scores = tied_data(0, 50)
    frame = roc_frame(labels, scores)
    assert frame.columns == ["fpr", "tpr", "threshold"]
    assert frame.schema["threshold"] == pl.Float64
    path = tmp_path / "roc.parquet"
    frame.write_parquet(path)
    back = pl.read_parquet(path)
    np.testing.assert_array_equal(back["fpr"].to_numpy(), roc_points(labels, scores)[0])
    assert back["threshold"][0] == np.inf


def test_bootstrap_matches_a_naive_loop():
    labels, scores = tied_data(3, 200)
    threshold = 0.35
    boot = bootstrap_metrics(labels, scores, threshold, n_bootstrap=7, seed=11)
    # replay the same draws (one chunk: members first, then non-members) with the exact code
    rng = np.random.default_rng(11)
    pos, neg = np.flatnonzero(labels), np.flatnonzero(~labels)
    i1 = rng.integers(0, len(pos), size=(7, len(pos)))
    i0 = rng.integers(0, len(neg), size=(7, len(neg)))
    for b in range(7):
        idx = np.concatenate([pos[i1[b]], neg[i0[b]]])
        y, s = labels[idx], scores[idx]
        assert boot["auc"][b] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert boot["balanced_accuracy"][b] == pytest.approx(balanced_accuracy(y, s >= threshold))
        assert boot["best_balanced_accuracy"][b] == pytest.approx(best_balanced_accuracy(y, s))
        for f in (0.001, 0.01, 0.1):
            assert boot[f"tpr_at_fpr_{f:g}"][b] == pytest.approx(tpr_at_fpr(y, s, f), abs=1e-12)


def test_evaluate_keys_cis_and_determinism():
    rng = np.random.default_rng(0)
    labels = np.arange(800) < 400
    scores = rng.normal(size=800) + 1.0 * labels
    res = evaluate(labels, scores, n_bootstrap=1000, seed=0)
    metrics = [
        "auc",
        "balanced_accuracy",
        "best_balanced_accuracy",
        "tpr_at_fpr_0.001",
        "tpr_at_fpr_0.01",
        "tpr_at_fpr_0.1",
    ]
    for key in metrics:
        assert res[f"{key}_ci_low"] <= res[key] <= res[f"{key}_ci_high"], key
        assert res[f"{key}_ci_low"] < res[f"{key}_ci_high"], key
    assert res["auc"] == pytest.approx(roc_auc_score(labels, scores))
    assert 0.74 < res["auc"] < 0.80  # Phi(1 / sqrt 2) = 0.760 in expectation
    assert res["auc_ci_high"] - res["auc_ci_low"] < 0.08
    assert res["n_members"] == 400 and res["n_nonmembers"] == 400
    assert res["threshold_source"] == "best_on_evaluated_data"
    assert res["balanced_accuracy"] == res["best_balanced_accuracy"]
    assert res["balanced_accuracy"] == balanced_accuracy(labels, scores >= res["threshold"])
    assert evaluate(labels, scores, n_bootstrap=1000, seed=0) == res
    other = evaluate(labels, scores, n_bootstrap=1000, seed=1)
    assert other["auc"] == res["auc"] and other["auc_ci_low"] != res["auc_ci_low"]
    json.dumps(res, allow_nan=False)  # plain JSON


def test_evaluate_with_given_threshold_and_without_bootstrap():
    labels = np.array([1, 1, 1, 0, 0, 0])
    scores = np.array([0.9, 0.8, 0.2, 0.7, 0.1, 0.05])
    res = evaluate(labels, scores, threshold=0.5, n_bootstrap=0)
    assert res["threshold"] == 0.5 and res["threshold_source"] == "given"
    assert res["balanced_accuracy"] == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert res["best_balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)  # t = 0.75
    assert res["auc"] == pytest.approx(8 / 9)  # 0.2 loses to 0.7 only
    assert res["tpr_at_fpr_0.001"] == pytest.approx(2 / 3)
    assert res["auc_ci_low"] is None and res["auc_ci_high"] is None


def reference_low_fpr_tpr(labels, scores, f, drop_intermediate=True):
    """The LiRA reference's reading (research/mi_lira_2021/plot.py, do_plot)."""
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=drop_intermediate)
    return tpr[np.where(fpr < f)[0][-1]]


def test_strict_convention_is_the_lira_reference_formula():
    # 4 members, 6 non-members, distinct scores: the ROC steps through
    # (0, .25) (0, .5) (1/6, .5) (1/6, .75) (2/6, .75) (3/6, .75) (3/6, 1) ... (1, 1)
    labels = np.array([1, 1, 0, 1, 0, 0, 1, 0, 0, 0])
    scores = np.arange(10, 0, -1)
    cases = {1 / 6: (0.75, 0.5), 0.2: (0.75, 0.75), 0.5: (1.0, 0.75), 0.01: (0.5, 0.5)}
    for f, (inclusive, strict) in cases.items():
        assert tpr_at_fpr(labels, scores, f) == inclusive, f
        assert tpr_at_fpr(labels, scores, f, convention="strict") == strict, f
        assert reference_low_fpr_tpr(labels, scores, f) == strict, f
    assert tpr_at_fpr(labels, scores, 0.0, convention="strict") == 0.0  # the reference fails
    with pytest.raises(ValueError, match="convention must be one of"):
        tpr_at_fpr(labels, scores, 0.1, convention="<")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_strict_convention_matches_the_reference_on_random_roc(seed):
    rng = np.random.default_rng(seed)
    labels = np.arange(400) < 200  # 200 non-members: 1 % and 10 % FPR fall on ROC points
    scores = rng.normal(size=400) + labels
    for f in (0.005, 0.01, 0.05, 0.1, 0.3):
        assert tpr_at_fpr(labels, scores, f, "strict") == reference_low_fpr_tpr(labels, scores, f)
    # with ties the reference's roc_curve drops collinear points the strict rule would pick
    labels, scores = tied_data(seed)
    for f in (0.01, 0.05, 0.1, 0.3):
        full = reference_low_fpr_tpr(labels, scores, f, drop_intermediate=False)
        assert tpr_at_fpr(labels, scores, f, "strict") == full
        assert full >= reference_low_fpr_tpr(labels, scores, f)


def test_dropped_collinear_points_are_the_only_difference():
    # four tied (member, non-member) pairs: ROC points (k/4, k/4); roc_curve keeps the first
    # and last only, dropping (2/4, 2/4) and (3/4, 3/4)
    labels = np.array([1, 0] * 4)
    scores = np.repeat([4, 3, 2, 1], 2)
    assert tpr_at_fpr(labels, scores, 0.6, "strict") == 0.5
    assert reference_low_fpr_tpr(labels, scores, 0.6, drop_intermediate=False) == 0.5
    assert reference_low_fpr_tpr(labels, scores, 0.6) == 0.25


def test_bootstrap_and_evaluate_follow_the_convention():
    labels, scores = tied_data(4, 300)
    boot = bootstrap_metrics(labels, scores, 0.3, n_bootstrap=5, seed=2, tpr_convention="strict")
    rng = np.random.default_rng(2)
    pos, neg = np.flatnonzero(labels), np.flatnonzero(~labels)
    i1 = rng.integers(0, len(pos), size=(5, len(pos)))
    i0 = rng.integers(0, len(neg), size=(5, len(neg)))
    for b in range(5):
        idx = np.concatenate([pos[i1[b]], neg[i0[b]]])
        for f in (0.001, 0.01, 0.1):
            expected = tpr_at_fpr(labels[idx], scores[idx], f, "strict")
            assert boot[f"tpr_at_fpr_{f:g}"][b] == pytest.approx(expected, abs=1e-12)
    strict = evaluate(labels, scores, n_bootstrap=0, tpr_convention="strict")
    inclusive = evaluate(labels, scores, n_bootstrap=0)
    assert strict["tpr_at_fpr_convention"] == "strict"
    assert (
        strict["tpr_at_fpr_rule"]
        == "highest TPR among ROC points with FPR < f (LiRA reference code)"
    )
    assert inclusive["tpr_at_fpr_convention"] == "inclusive"
    for f in (0.001, 0.01, 0.1):
        key = f"tpr_at_fpr_{f:g}"
        assert strict[key] == tpr_at_fpr(labels, scores, f, "strict")
        assert inclusive[key] >= strict[key]
    assert strict["auc"] == inclusive["auc"]
