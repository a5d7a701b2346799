"""Dataset usage inference (DUCI): agreement with ML Privacy Meter's DUCI, debiasing on
synthetic scores with a known fraction, bad input, and the usage stage on pipeline tables."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from test_attacks import make_world, write_world

from mimia.attacks.stage import attack_stage
from mimia.config import resolve_experiments, usage_attacks
from mimia.usage import (
    UsageEstimator,
    check_outside_adversary,
    collection_ids,
    usage_stage,
)

# A fixed input and what privacytrustlab/ml_privacy_meter's DUCI.pred_proportions returns on
# it (modules/duci/module_duci.py at commit e384af8fd9319b8eeb1303aa82474df1441e3c59), run
# with an MIA stand-in whose run_mia returns the model's column of SIGNALS as its scores and
# of MEMBERSHIPS as its membership: 40 records x 4 models, targets 0..3 with reference models
# [2, 3], [2, 3], [0, 1], [0, 1] (the documentation's example).
#
PRED_PROPORTIONS = [0.6806930693069306, 0.5321782178217821, 0.5783132530120481, 0.2620481927710843]
TARGETS = [0, 1, 2, 3]
REFERENCES = [[2, 3], [2, 3], [0, 1], [0, 1]]
SIGNALS = np.array(
    [
        [0.464, -0.633, -1.346, -0.545],
        [2.413, 0.852, -0.724, 2.856],
        [1.043, 0.717, 1.026, 0.112],
        [1.422, -0.371, 1.33, -0.507],
        [3.077, 0.465, 2.181, -0.081],
        [0.362, 0.726, 0.38, -1.019],
        [1.531, 0.86, -2.75, 0.142],
        [0.746, 1.232, 1.322, 1.252],
        [0.36, -1.079, 2.668, -1.152],
        [1.858, 2.016, -1.278, 1.826],
        [-0.389, -1.262, 1.99, 0.152],
        [0.391, 0.227, 1.569, 1.705],
        [1.058, 1.007, 3.16, 1.325],
        [2.369, 1.139, 2.842, 0.485],
        [1.079, 1.726, 2.029, 1.063],
        [2.364, 0.766, 0.442, 0.319],
        [1.045, -0.53, 2.16, 0.34],
        [-0.502, 1.123, 0.815, 2.568],
        [-0.364, -0.859, -0.598, 2.25],
        [0.429, 0.773, 1.592, -0.324],
        [0.031, 2.424, 2.704, 0.466],
        [0.32, -0.381, 0.344, 0.039],
        [-1.007, -0.055, -0.575, 3.383],
        [-0.18, -1.78, 0.649, -0.957],
        [0.533, -0.33, 0.675, -0.382],
        [2.088, -0.554, 1.4, -1.016],
        [0.732, 0.424, 0.694, -1.588],
        [0.975, 0.202, 1.327, 1.712],
        [-1.576, 0.192, -0.465, 0.639],
        [1.961, -1.187, -0.02, 0.009],
        [0.517, -0.009, 2.755, 1.836],
        [0.789, -1.689, 0.624, -0.293],
        [0.914, -2.096, 0.934, 0.653],
        [0.593, -0.933, 0.947, 0.813],
        [1.622, -0.185, 0.117, -0.386],
        [1.124, 0.686, 0.44, 2.832],
        [-0.876, 2.228, 0.211, 1.213],
        [1.557, -2.444, -1.242, 0.14],
        [0.073, 2.384, 1.751, 0.122],
        [-0.141, 1.111, 0.024, 2.341],
    ]
)
MEMBERSHIPS = np.array(
    [
        [0, 1, 1, 0],
        [1, 0, 1, 1],
        [1, 0, 0, 0],
        [1, 0, 1, 0],
        [1, 0, 1, 0],
        [1, 1, 1, 0],
        [1, 1, 0, 0],
        [1, 0, 1, 1],
        [0, 0, 1, 0],
        [0, 0, 1, 1],
        [0, 1, 1, 0],
        [1, 0, 1, 1],
        [1, 0, 1, 1],
        [1, 0, 1, 0],
        [1, 1, 1, 1],
        [1, 0, 0, 0],
        [1, 0, 1, 1],
        [0, 0, 1, 1],
        [0, 0, 1, 1],
        [0, 0, 1, 1],
        [0, 1, 1, 1],
        [0, 0, 0, 1],
        [0, 0, 0, 1],
        [0, 0, 1, 0],
        [0, 0, 1, 0],
        [1, 0, 1, 0],
        [0, 0, 1, 0],
        [0, 1, 1, 0],
        [0, 0, 0, 0],
        [0, 0, 1, 1],
        [0, 0, 1, 1],
        [1, 0, 1, 0],
        [1, 0, 1, 1],
        [1, 0, 1, 1],
        [1, 0, 1, 0],
        [1, 1, 0, 1],
        [0, 1, 0, 1],
        [1, 0, 0, 0],
        [0, 1, 1, 0],
        [0, 0, 0, 1],
    ],
    dtype=bool,
)


def test_estimate_equals_privacy_meter_duci():
    for target, refs, expected in zip(TARGETS, REFERENCES, PRED_PROPORTIONS, strict=True):
        estimator = UsageEstimator(n_bootstrap=0).fit(SIGNALS[:, refs].T, MEMBERSHIPS[:, refs].T)
        result = estimator.estimate(SIGNALS[:, target])
        assert result.estimate_raw == pytest.approx(expected, abs=1e-12)
        assert estimator.debias(SIGNALS[:, target]).mean() == pytest.approx(expected, abs=1e-12)


def _scores(rng, members: np.ndarray, gap: float = 1.5) -> np.ndarray:
    return rng.normal(0.0, 1.0, members.shape) + gap * members


def test_debiasing_recovers_a_known_fraction_where_the_naive_count_does_not():
    rng = np.random.default_rng(0)
    ref_in = rng.random((4, 1000)) < 0.5
    estimator = UsageEstimator(n_bootstrap=300, seed=1).fit(_scores(rng, ref_in), ref_in)
    # Gaussian scores 1.5 apart: the best TPR - FPR is 2 Phi(0.75) - 1 = 0.547 (near the
    # midpoint threshold, where the sample's maximum falls is noisy).
    assert estimator.tpr_ - estimator.fpr_ == pytest.approx(0.547, abs=0.04)
    for f in (0.0, 0.3, 0.8):
        used = np.arange(2000) < round(f * 2000)
        result = estimator.estimate(_scores(rng, used))
        assert result.estimate_raw == pytest.approx(f, abs=0.05)
        assert result.ci_low_raw <= f <= result.ci_high_raw
        assert result.ci_high_raw - result.ci_low_raw < 0.15
        # The naive count is pulled towards FPR (f = 0) and under-counts (f = 0.8).
        assert abs(result.naive - f) > 0.09
        assert result.naive == pytest.approx(
            f * estimator.tpr_ + (1 - f) * estimator.fpr_, abs=0.03
        )


def test_an_estimate_outside_0_1_is_clipped_with_the_raw_value_beside_it():
    rng = np.random.default_rng(3)
    ref_in = rng.random((2, 500)) < 0.5
    estimator = UsageEstimator(n_bootstrap=200).fit(_scores(rng, ref_in), ref_in)
    # Nothing used and scores a bit below non-members': the raw estimate is negative.
    result = estimator.estimate(rng.normal(-0.5, 1.0, 300))
    assert result.status == "estimate" and result.clipped
    assert result.estimate_raw < 0 and result.estimate == 0.0
    assert result.ci_low == max(result.ci_low_raw, 0.0) and result.ci_low_raw < 0
    assert f"{result.estimate_raw:.3f}" in result.reason and "clipped" in result.reason


def test_no_estimate_when_tpr_does_not_exceed_fpr_on_the_reference_models():
    ref_in = np.array([[True, True, False, False]])
    # Members score below every non-member: no threshold has TPR > FPR.
    estimator = UsageEstimator().fit([[0.1, 0.2, 0.8, 0.9]], ref_in)
    result = estimator.estimate(np.array([0.5, 0.6]))
    assert result.status == "no estimate" and result.estimate is None
    assert "TPR (0.000) does not exceed its FPR (0.000)" in result.reason
    with pytest.raises(ValueError, match="does not exceed"):
        estimator.debias(np.array([0.5]))


def test_an_empty_collection_and_bad_reference_data_are_refused():
    estimator = UsageEstimator().fit([[0.1, 0.9]], [[False, True]])
    with pytest.raises(ValueError, match="candidate collection is empty"):
        estimator.estimate(np.array([]))
    with pytest.raises(ValueError, match="members and non-members"):
        UsageEstimator().fit([[0.1, 0.9]], [[True, True]])
    with pytest.raises(ValueError, match="same non-empty shape"):
        UsageEstimator().fit([[0.1, 0.9]], [[True]])


def _config(usage: dict, **extra) -> dict:
    extra = {"shadow": {"count": 4}, **extra}
    return {"experiments": {"u": {"usage": {"enabled": True, **usage}, **extra}}}


@pytest.mark.parametrize(
    ("usage", "message"),
    [
        ({"collections": {"mine": {"role": "shadow_member"}}}, "adversary's own data"),
        ({"collections": {"mine": {"fraction": 0.5, "size": 0}}}, "collection is empty"),
        ({"collections": {}}, "collections is empty"),
        ({"collections": {"mine": {"fraction": 1.0, "size": 500}}}, "holds 400"),
        ({"attacks": ["encodermi_set"]}, "EncoderMI"),
        ({"attacks": ["nope"]}, "not an attack of the experiment"),
    ],
)
def test_bad_usage_configs_fail_before_any_job(usage, message):
    with pytest.raises(ValueError, match=message):
        resolve_experiments(_config(usage))


def test_encodermi_is_left_out_by_default():
    (exp,) = resolve_experiments(_config({})).values()
    # No EncoderMI features exist for the reference models, so no TPR and FPR to measure.
    assert sorted(usage_attacks(exp)) == sorted(
        {"threshold", "classifier", "classifier_mlp", "lira", "lira_reference", "rmia"}
        | {"global_threshold", "random"}
    )


def test_usage_needs_reference_models():
    with pytest.raises(ValueError, match=r"shadow\.count >= 2"):
        resolve_experiments(_config({}, shadow={"count": 1}))
    # Two models: shadow1's one reference, shadow0, trained on every shadow_member image.
    with pytest.raises(ValueError, match=r"'lira'.* needs shadow\.count >= 3 \(got 2\)"):
        resolve_experiments(_config({}, shadow={"count": 2}))
    resolve_experiments(_config({"attacks": ["threshold"]}, shadow={"count": 2}))


def test_a_candidate_image_also_in_the_adversarys_data_is_refused():
    manifest = pl.DataFrame(
        {
            "sample_id": ["a", "b", "c", "d"],
            "role": ["target_member", "target_nonmember", "shadow_member", "shadow_nonmember"],
            "content_sha256": ["h1", "h2", "h3", "h2"],  # b and d: the same image
        }
    )
    check_outside_adversary("ok", np.array(["a"]), manifest)
    with pytest.raises(ValueError, match="1 candidate images are also in the adversary's"):
        check_outside_adversary("mine", np.array(["a", "b"]), manifest)


def test_mixed_collections_hold_the_asked_fraction():
    manifest = pl.DataFrame(
        {
            "sample_id": [f"m{i}" for i in range(10)] + [f"n{i}" for i in range(10)],
            "role": ["target_member"] * 10 + ["target_nonmember"] * 10,
        }
    )
    split = {"target_member": 10, "target_nonmember": 10}
    ids = collection_ids("c", {"fraction": 0.25, "size": 8}, manifest, split, seed=0)
    assert len(ids) == 8 and sum(s.startswith("m") for s in ids) == 2
    again = collection_ids("c", {"fraction": 0.25, "size": 8}, manifest, split, seed=0)
    assert list(ids) == list(again)


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """The attack stage and the usage stage on a synthetic world's tables (4 shadow models)."""
    root = tmp_path_factory.mktemp("usage")
    paths = write_world(make_world(seed=3, n=100, num_shadow=4), root)
    pairs, scores = [], []
    for decoder in ("shadow", "released"):
        for attack in ("threshold", "lira"):
            out = root / f"{decoder}-{attack}.parquet"
            attack_stage(
                errors=paths["errors"],
                manifest=paths["manifest"],
                membership=paths["membership"],
                scores=out,
                roc=root / f"{decoder}-{attack}-roc.parquet",
                metrics=root / f"{decoder}-{attack}.json",
                decoder=decoder,
                attack=attack,
                params={},
                metrics_config={"n_bootstrap": 10},
                seed=0,
            )
            pairs.append([decoder, attack])
            scores.append(out)
    collections = {f"f{int(100 * f)}": {"fraction": f, "size": 100} for f in (0, 0.5, 1)}
    usage_stage(
        errors=paths["errors"],
        manifest=paths["manifest"],
        membership=paths["membership"],
        scores=scores,
        json=root / "usage.json",
        parquet=root / "usage.parquet",
        figure=root / "usage.png",
        pairs=pairs,
        attacks={"threshold": {}, "lira": {}},
        usage={"collections": collections, "n_bootstrap": 200, "confidence": 0.95},
        split=dict.fromkeys(("target_member", "target_nonmember"), 100),
        seed=0,
    )
    return root


def test_usage_stage_writes_estimates_per_decoder_attack_and_collection(audited):
    report = json.loads((audited / "usage.json").read_text())
    assert "not evidence that any single image" in report["meaning"]
    rows = pl.read_parquet(audited / "usage.parquet")
    assert rows.height == 2 * 2 * 3
    # Only the released decoder is scored as the reference models are.
    status = dict(rows.group_by("decoder").agg(pl.col("status").unique().first()).rows())
    assert status == {"released": "estimate", "shadow": "uncalibrated"}
    assert (rows.filter(pl.col("decoder") == "shadow")["estimate"].is_not_null()).all()
    assert "uncalibrated" in report["uncalibrated_note"]
    assert rows.sort("true_fraction")["true_fraction"].unique().to_list() == [0.0, 0.5, 1.0]
    assert (audited / "usage.png").read_bytes()[:4] == b"\x89PNG"
    lira = rows.filter((pl.col("decoder") == "released") & (pl.col("attack") == "lira"))
    lira = lira.sort("true_fraction")
    # Pinned on this world: DUCI is closer to the truth than the naive count.
    assert lira["estimate_raw"].to_list() == pytest.approx([-0.155, 0.34, 0.881], abs=0.01)
    assert lira["naive"].to_list() == pytest.approx([0.07, 0.39, 0.74], abs=1e-9)
    assert lira["tpr"][0] == pytest.approx(0.817, abs=1e-3)
    assert lira["fpr"][0] == pytest.approx(0.17, abs=1e-3)
    assert lira["clipped"].to_list() == [True, False, True]
    assert "shadow1, shadow2, shadow3" in lira["rates_source"][0]
    shadow = rows.filter(pl.col("decoder") == "shadow")
    assert "'shadow' decoder" in shadow["rates_source"][0]
    assert shadow["reason"][0].startswith("uncalibrated: the target is scored under the 'shadow'")
    summary = {(v["decoder"], v["attack"]): v for v in report["validation"]}
    assert summary[("shadow", "lira")]["status"] == "uncalibrated"
    released = summary[("released", "lira")]
    assert released["mean_abs_error"] < released["naive_mean_abs_error"]
    assert released["f0_collections"] == 1 and released["f0_ci_excludes_0"] == 0
    assert 0 < released["mean_ci_width"] < 0.5


def test_the_digits_example_schedules_one_usage_job_over_one_target(tmp_path):
    import yaml
    from test_workflow import ROOT, _snakemake

    config = yaml.safe_load((ROOT / "config/examples/usage.yaml").read_text())
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run = _snakemake(tmp_path, "--dry-run", "--quiet", "rules")
    assert run.returncode == 0, run.stderr[-3000:]
    jobs = {
        parts[0]: int(parts[1])
        for parts in map(str.split, run.stdout.splitlines())
        if len(parts) == 2 and parts[1].isdigit()
    }
    # Every fraction f is a collection of the same experiment: one target, four shadow models.
    assert jobs["usage"] == 1 and jobs["pretrain"] == 5 and jobs["attack"] == 9


@pytest.mark.slow
def test_the_workflow_writes_the_usage_audit(tmp_path):
    import copy

    import yaml
    from test_workflow import TINY, _snakemake

    config = copy.deepcopy(TINY)
    config["experiments"] = {"tiny": {}}
    config["defaults"].update(
        decoder=["released", "adapted"],
        shadow={**config["defaults"].get("shadow", {}), "count": 3},
        attacks={"threshold": {}, "lira": {}},
        extract={"mask_ratios": [0.75], "num_masks": 2, "grid_samples": 2},
        usage={
            "enabled": True,
            "collections": {"f0": {"fraction": 0, "size": 20}, "all": {"role": "target_member"}},
            "n_bootstrap": 50,
        },
    )
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run = _snakemake(tmp_path)
    assert run.returncode == 0, run.stderr[-5000:]
    report = json.loads((tmp_path / "results/tiny/usage.json").read_text())
    rows = report["results"]
    assert {(r["decoder"], r["attack"]) for r in rows} == {
        (d, a) for d in ("released", "adapted") for a in ("threshold", "lira")
    }
    assert {(r["collection"], r["true_fraction"]) for r in rows} == {("f0", 0.0), ("all", 1.0)}
    for r in rows:
        assert (
            r["status"] in ("estimate", "no estimate", "uncalibrated") and r["reason"] is not None
        )
        assert r["status"] != "estimate" or r["decoder"] == "released"
        assert r["status"] != "uncalibrated" or r["decoder"] == "adapted"
        if r["status"] != "no estimate":
            assert 0 <= r["estimate"] <= 1 and 0 <= r["naive"] <= 1
            # Shown clipped only with the raw value beside it.
            assert r["clipped"] or r["estimate"] == r["estimate_raw"]
    assert (tmp_path / "results/tiny/usage.png").read_bytes()[:4] == b"\x89PNG"
