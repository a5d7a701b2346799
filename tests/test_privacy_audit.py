"""The empirical privacy audit: Clopper–Pearson bounds and the epsilon lower bound of a ROC,
checked against direct computations with scipy; the audit and privacy–utility tables."""

import json
import math

import numpy as np
import polars as pl
import pytest
from scipy.stats import beta, binomtest

from mimia.metrics import clopper_pearson, epsilon_lower_bound, roc_points
from mimia.provenance import provenance, write_parquet
from mimia.report.tables import privacy_audit, privacy_utility_table


def test_clopper_pearson_equals_scipys_exact_binomial_interval():
    for k, n in [(0, 10), (1, 10), (5, 10), (10, 10), (3, 400), (397, 400)]:
        low, high = clopper_pearson(k, n, 0.95)
        ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
        assert float(low) == pytest.approx(ci.low, abs=1e-12)
        assert float(high) == pytest.approx(ci.high, abs=1e-12)
    low, high = clopper_pearson(np.array([0, 2, 4]), 4, 0.9)
    assert low[0] == 0.0 and high[2] == 1.0 and low[1] < 0.5 < high[1]
    with pytest.raises(ValueError, match="successes <= trials"):
        clopper_pearson(5, 4)


def _direct_bound(labels, scores, delta, confidence):
    """Every distinct threshold, one at a time, with scipy.stats.beta (Jagielski et al.'s
    formulas: eps >= log((1 - delta - FNR_hi) / FPR_hi) and log((1 - delta - FPR_hi) / FNR_hi))."""
    labels, scores = np.asarray(labels, bool), np.asarray(scores, float)
    n1, n0 = labels.sum(), (~labels).sum()
    a = (1 - confidence) / 2
    best = 0.0
    for t in [np.inf, *sorted(set(scores), reverse=True)]:
        predicted = scores >= t
        tp, fp = int((predicted & labels).sum()), int((predicted & ~labels).sum())
        fn = n1 - tp
        fpr_hi = 1.0 if fp == n0 else beta.ppf(1 - a, fp + 1, n0 - fp)
        fnr_hi = 1.0 if fn == n1 else beta.ppf(1 - a, fn + 1, n1 - fn)
        if 1 - delta - fnr_hi > 0:
            best = max(best, math.log((1 - delta - fnr_hi) / fpr_hi))
        if 1 - delta - fpr_hi > 0:
            best = max(best, math.log((1 - delta - fpr_hi) / fnr_hi))
    return best


def test_epsilon_lower_bound_equals_a_direct_computation_on_a_hand_made_roc():
    # 30 members, 30 non-members; members score higher on the whole, with ties across classes.
    labels = [1] * 30 + [0] * 30
    scores = [9] * 12 + [7] * 8 + [5] * 6 + [3] * 4 + [7] * 1 + [5] * 4 + [3] * 10 + [1] * 15
    for delta in (0.0, 1e-5, 0.05):
        for confidence in (0.9, 0.95):
            got = epsilon_lower_bound(labels, scores, delta=delta, confidence=confidence)
            want = _direct_bound(labels, scores, delta, confidence)
            assert got["epsilon_lower_bound"] == pytest.approx(want, rel=1e-12)
    got = epsilon_lower_bound(labels, scores, delta=0.0, confidence=0.95)
    # The best threshold is at score 7: 20 members and 1 non-member above it (12 members and
    # no non-member at score 9 give less: log(0.227 / 0.116) = 0.67 < 1.01).
    assert (got["epsilon_lb_tp"], got["epsilon_lb_fp"]) == (20, 1)
    assert got["epsilon_lb_side"] == "tpr_fpr"
    tpr_low = beta.ppf(0.025, 20, 30 - 20 + 1)
    fpr_high = beta.ppf(0.975, 1 + 1, 30 - 1)
    assert got["epsilon_lower_bound"] == pytest.approx(math.log(tpr_low / fpr_high), rel=1e-10)
    assert got["epsilon_lb_thresholds"] == len(roc_points(labels, scores)[0])


def test_the_other_side_counts_when_no_member_scores_low():
    # Half the non-members score below every member, the rest mix with the members: the
    # TNR/FNR inequality (1 - FPR <= e^eps FNR + delta) gives the bound, at FNR = 0.
    rng = np.random.default_rng(3)
    labels = [1] * 60 + [0] * 60
    scores = list(rng.uniform(50, 100, 60)) + list(rng.uniform(0, 10, 30))
    scores += list(rng.uniform(50, 100, 30))
    got = epsilon_lower_bound(labels, scores)
    assert got["epsilon_lb_side"] == "tnr_fnr" and got["epsilon_lb_tp"] == 60
    assert got["epsilon_lower_bound"] == pytest.approx(_direct_bound(labels, scores, 0, 0.95))
    fnr_high = 1 - 0.025 ** (1 / 60)  # no false negative among 60 members
    fpr_high = beta.ppf(0.975, 30 + 1, 60 - 30)  # 30 of 60 non-members above the threshold
    assert got["epsilon_lower_bound"] == pytest.approx(math.log((1 - fpr_high) / fnr_high))
    # Members all below non-members: the attack as given is worse than chance, no evidence.
    reversed_scores = list(range(60)) + list(range(100, 160))
    assert epsilon_lower_bound(labels, reversed_scores)["epsilon_lower_bound"] == 0.0


def test_chance_scores_give_no_evidence_and_bonferroni_is_more_conservative():
    rng = np.random.default_rng(0)
    labels = np.repeat([1, 0], 500)
    scores = rng.normal(size=1000)
    assert epsilon_lower_bound(labels, scores, delta=1e-5)["epsilon_lower_bound"] < 0.3
    separated = scores + 1.5 * labels
    plain = epsilon_lower_bound(labels, separated, delta=1e-5)["epsilon_lower_bound"]
    corrected = epsilon_lower_bound(labels, separated, delta=1e-5, bonferroni=True)
    assert 0 < corrected["epsilon_lower_bound"] < plain
    assert corrected["epsilon_lb_bonferroni"] is True


def _scores_file(path, labels, scores, decoder, attack):
    df = pl.DataFrame({"is_member": np.asarray(labels, bool), "score": np.asarray(scores, float)})
    write_parquet(df, path, provenance(decoder=decoder, attack=attack, attack_kind=attack))
    return path


def test_privacy_audit_reports_the_bound_next_to_the_accountants_epsilon(tmp_path):
    rng = np.random.default_rng(1)
    labels = np.repeat([1, 0], 200)
    files = [
        _scores_file(
            tmp_path / "a.parquet", labels, rng.normal(size=400) + labels, "released", "lira"
        ),
        _scores_file(tmp_path / "b.parquet", labels, rng.normal(size=400), "released", "random"),
    ]
    audit = {"confidence": 0.95, "delta": 1e-5, "bonferroni": False}
    dp_sidecar = tmp_path / "dp.json"
    dp = {"epsilon": 7.9, "delta": 1e-4, "accountant": "rdp", "noise_multiplier": 0.8}
    dp_sidecar.write_text(json.dumps({"spec": {}, "info": {"dp": dp}}))
    table = privacy_audit(
        "e", files, dp_sidecar, audit, tmp_path / "p.parquet", tmp_path / "p.json"
    )
    assert table["attack"].to_list() == ["lira", "random"]
    assert table["accountant_epsilon"].to_list() == [7.9, 7.9]
    assert table["epsilon_lb_delta"].to_list() == [1e-4, 1e-4]  # the model's own delta
    lira = table.filter(pl.col("attack") == "lira").row(0, named=True)
    direct = _direct_bound(labels, pl.read_parquet(files[0])["score"].to_numpy(), 1e-4, 0.95)
    assert lira["epsilon_lower_bound"] == pytest.approx(direct)
    record = json.loads((tmp_path / "p.json").read_text())
    assert record["best"]["attack"] == "lira" and record["accountant_epsilon"] == 7.9

    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"spec": {}, "info": {"model": "target"}}))
    table = privacy_audit("e", files, plain, audit, tmp_path / "q.parquet", tmp_path / "q.json")
    assert math.isinf(table["accountant_epsilon"][0]) and table["epsilon_lb_delta"][0] == 1e-5
    assert json.loads((tmp_path / "q.json").read_text())["accountant_epsilon"] == "inf"


def test_the_headline_bound_is_corrected_for_the_attacks_compared(tmp_path):
    """The best of m (decoder, attack) bounds is a maximum chosen on the audit data: each
    pair's bound is taken at 1 - (1 - confidence) / m, so the maximum holds at confidence."""
    rng = np.random.default_rng(5)
    labels = np.repeat([1, 0], 200)
    shifts = {"lira": 1.0, "rmia": 0.8, "threshold": 0.4, "random": 0.0}
    scores = {a: rng.normal(size=400) + shift * labels for a, shift in shifts.items()}
    files = [
        _scores_file(tmp_path / f"{a}.parquet", labels, s, "released", a) for a, s in scores.items()
    ]
    sidecar = tmp_path / "plain.json"
    sidecar.write_text(json.dumps({"spec": {}, "info": {"model": "target"}}))
    audit = {"confidence": 0.95, "delta": 1e-5, "bonferroni": False}
    table = privacy_audit("e", files, sidecar, audit, tmp_path / "p.parquet", tmp_path / "p.json")
    # epsilon_lower_bound itself is checked against scipy above
    per_attack, corrected = (
        {
            a: epsilon_lower_bound(labels, s, 1e-5, level)["epsilon_lower_bound"]
            for a, s in scores.items()
        }
        for level in (0.95, 1 - 0.05 / 4)
    )
    rows = {r["attack"]: r for r in table.iter_rows(named=True)}
    for attack in scores:
        assert rows[attack]["epsilon_lower_bound"] == pytest.approx(per_attack[attack])
        assert rows[attack]["epsilon_lower_bound_corrected"] == pytest.approx(corrected[attack])
        assert rows[attack]["epsilon_lb_comparisons"] == 4
    best = json.loads((tmp_path / "p.json").read_text())["best"]
    strongest = max(corrected, key=corrected.get)
    assert best["attack"] == strongest
    assert best["epsilon_lower_bound"] == pytest.approx(corrected[strongest])
    assert 0 < best["epsilon_lower_bound"] < max(per_attack.values())
    assert best["comparisons"] == 4 and best["confidence"] == 0.95
    assert best["per_comparison_confidence"] == pytest.approx(0.9875)
    assert best["correction"].startswith("Bonferroni over the 4 (decoder, attack) pairs")
    # one attack alone needs no correction
    alone = privacy_audit(
        "e", files[:1], sidecar, audit, tmp_path / "q.parquet", tmp_path / "q.json"
    ).row(0, named=True)
    assert alone["epsilon_lower_bound_corrected"] == alone["epsilon_lower_bound"]


def _experiment(tmp_path, name, shift, epsilon, rng, audit):
    """One audited experiment's inputs: metrics, privacy audit and utility record."""
    labels = np.repeat([1, 0], 100)
    rows, files = [], []
    for attack in ("lira", "random"):
        s = rng.normal(size=200) + (shift * labels if attack == "lira" else 0)
        path = tmp_path / f"{name}-{attack}.parquet"
        files.append(_scores_file(path, labels, s, "released", attack))
        rows.append(
            {
                "experiment": name,
                "decoder": "released",
                "attack": attack,
                "auc": 0.5 + 0.2 * shift,
                "auc_ci_low": 0.4,
                "auc_ci_high": 0.99,
                "tpr_at_fpr_0.01": 0.1 * shift,
                "tpr_at_fpr_0.01_ci_low": 0.0,
                "tpr_at_fpr_0.01_ci_high": 0.5,
            }
        )
    metrics = tmp_path / f"{name}-metrics.parquet"
    write_parquet(pl.DataFrame(rows), metrics, {})
    info = {}
    if epsilon is not None:
        info["dp"] = {"epsilon": epsilon, "delta": 1e-5, "accountant": "rdp", "noise_multiplier": 1}
    sidecar = tmp_path / f"{name}.json"
    sidecar.write_text(json.dumps({"spec": {}, "info": info}))
    privacy = tmp_path / f"{name}-privacy.parquet"
    privacy_audit(name, files, sidecar, audit, privacy, tmp_path / f"{name}-privacy.json")
    utility = tmp_path / f"{name}-utility.json"
    accuracy = 0.9 - 0.2 * (epsilon or 0) / 3
    record = {
        "experiment": name,
        "n_test": 98,
        "linear_probe_accuracy": accuracy,
        "linear_probe_accuracy_ci_low": accuracy - 0.1,
        "linear_probe_accuracy_ci_high": accuracy + 0.05,
        "knn_accuracy": 0.8,
        "random_init_linear_probe_accuracy": 0.6,
        "random_init_knn_accuracy": 0.5,
        "heldout_masked_error": 1.0 + (epsilon or 0),
        "heldout_masked_error_ci_low": 0.9 + (epsilon or 0),
        "heldout_masked_error_ci_high": 1.1 + (epsilon or 0),
        "heldout_masked_error_note": "not a table column",
    }
    utility.write_text(json.dumps(record))
    settings = {
        "dp_noise_multiplier": None,
        "dp_target_epsilon": epsilon,
        "dp_max_grad_norm": None if epsilon is None else 1.0,
        "epochs": 10,
        "augment": False,
        "weight_decay": 0.05,
        "mask_ratio": 0.75,
        "early_stopping": False,
        "knows_defense": True,
    }
    return metrics, privacy, utility, settings


def test_privacy_utility_table_joins_attacks_bounds_utility_and_settings(tmp_path):
    rng = np.random.default_rng(2)
    audit = {"confidence": 0.95, "delta": 1e-5, "bonferroni": False}
    inputs = {
        name: _experiment(tmp_path, name, shift, eps, rng, audit)
        for name, shift, eps in (("none", 2.0, None), ("dp", 0.0, 3.0))
    }
    metrics, privacy, utility, _ = map(list, zip(*inputs.values(), strict=True))
    settings = {name: v[3] for name, v in inputs.items()}
    out = {k: tmp_path / f"summary.{k}" for k in ("parquet", "csv", "md")}
    df = privacy_utility_table(metrics, privacy, utility, settings, *out.values())
    assert df.height == 4
    dp = df.filter((pl.col("experiment") == "dp") & (pl.col("attack") == "lira")).row(0, named=True)
    assert dp["accountant_epsilon"] == 3.0 and dp["linear_probe_accuracy"] == pytest.approx(0.7)
    assert dp["dp_target_epsilon"] == 3.0 and dp["epochs"] == 10
    assert dp["heldout_masked_error"] == 4.0 and "heldout_masked_error_note" not in df.columns
    none = df.filter((pl.col("experiment") == "none") & (pl.col("attack") == "lira"))
    assert math.isinf(none["accountant_epsilon"][0]) and none["epsilon_lower_bound"][0] > 1.0
    md = out["md"].read_text()
    headline = df.filter(pl.col("experiment") == "none")["epsilon_lower_bound_corrected"].max()
    assert f"| {headline:.2f} |" in md and "the experiment's 2 attacks and decoders" in md
    assert "| none |" in md and "| dp |" in md and "∞" in md and "lira (released)" in md
    assert "| 4.000 [3.900, 4.100] |" in md  # dp's held-out masked error and its CI
    assert "random (released)" not in md  # the random baseline is never the strongest attack

    from mimia.report.figures import privacy_utility_figure

    privacy_utility_figure(df, tmp_path / "fig.png")
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"
