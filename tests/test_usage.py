"""Dataset usage inference (DUCI): agreement with ML Privacy Meter's DUCI, debiasing on
synthetic scores with a known fraction, bad input, and the usage stage on pipeline tables."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from test_attacks import make_world, write_world

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


def test_no_estimate_when_no_fraction_agrees_with_the_reference_rates():
    rng = np.random.default_rng(4)
    ref_in = rng.random((3, 400)) < 0.5
    # A weak attack (members shifted by 0.1 sd) and a target whose every score lies below any
    # reference threshold: the raw estimate and its whole CI are negative.
    ref = rng.normal(0, 1, ref_in.shape) + 0.1 * ref_in
    result = UsageEstimator(n_bootstrap=200).fit(ref, ref_in).estimate(np.full(100, -10.0))
    assert result.status == "no estimate" and result.estimate is None and result.ci_low is None
    assert result.ci_high_raw < 0 and result.estimate_raw < result.ci_high_raw
    assert result.naive == 0.0
    assert "wholly outside [0, 1]" in result.reason
    assert f"{result.estimate_raw:.3f}" in result.reason


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


def test_usage_needs_reference_models_and_enough_images_to_calibrate_them():
    with pytest.raises(ValueError, match=r"shadow\.count >= 2"):
        resolve_experiments(_config({}, shadow={"count": 1}))
    # Two models: shadow1 is calibrated with shadow0 as its one reference, on the 400
    # shadow_nonmember images (shadow0 trained on none of them).
    resolve_experiments(_config({}, shadow={"count": 2}))
    # Ten: each reference model keeps 400 / 2^8 images that none of its 9 references trained on.
    with pytest.raises(ValueError, match=r"about 14 images over shadow1..9, under 40"):
        resolve_experiments(_config({}, shadow={"count": 10}))
    resolve_experiments(_config({"attacks": ["threshold"]}, shadow={"count": 10}))
    with pytest.raises(ValueError, match=r"use offline references"):
        resolve_experiments(_config({}, shadow={"count": 4, "online": True}))


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
    """The usage stage on a synthetic world's tables: 4 shadow models, shadow1..3 also scored
    under the shadow decoder (the calibration the workflow extracts for that mode)."""
    root = tmp_path_factory.mktemp("usage")
    world = make_world(seed=3, n=100, num_shadow=4, reference_decoders=("shadow",))
    paths = write_world(world, root)
    collections = {f"f{int(100 * f)}": {"fraction": f, "size": 100} for f in (0, 0.5, 1)}
    usage_stage(
        errors=paths["errors"],
        manifest=paths["manifest"],
        membership=paths["membership"],
        json=root / "usage.json",
        parquet=root / "usage.parquet",
        figure=root / "usage.png",
        pairs=[[d, a] for d in ("shadow", "released") for a in ("threshold", "lira")],
        attacks={"threshold": {}, "lira": {}},
        usage={"collections": collections, "n_bootstrap": 200, "confidence": 0.95},
        split=dict.fromkeys(("target_member", "target_nonmember"), 100),
        seed=0,
    )
    return root, world


def test_usage_stage_writes_estimates_per_decoder_attack_and_collection(audited):
    root, world = audited
    report = json.loads((root / "usage.json").read_text())
    assert "not evidence that any single image" in report["meaning"]
    rows = pl.read_parquet(root / "usage.parquet")
    assert rows.height == 2 * 2 * 3
    assert set(rows["status"]) == {"estimate"}
    assert rows.sort("true_fraction")["true_fraction"].unique().to_list() == [0.0, 0.5, 1.0]
    assert (root / "usage.png").read_bytes()[:4] == b"\x89PNG"
    summary = {(v["decoder"], v["attack"]): v for v in report["validation"]}
    for decoder in ("released", "shadow"):
        lira = rows.filter((pl.col("decoder") == decoder) & (pl.col("attack") == "lira"))
        lira = lira.sort("true_fraction")
        # The target's guesses grow with the used fraction: each collection is scored within
        # the audit set, not alone (alone, the median centring flattened them to 0.54-0.58).
        assert np.all(np.diff(lira["naive"].to_numpy()) > 0.2), decoder
        check = summary[(decoder, "lira")]
        assert check["mean_abs_error"] < check["naive_mean_abs_error"] < 0.3, decoder
        assert check["f0_collections"] == 1 and check["f0_ci_excludes_0"] == 0
        assert 0 < check["mean_ci_width"] < 0.45
    lira = rows.filter((pl.col("decoder") == "released") & (pl.col("attack") == "lira"))
    lira = lira.sort("true_fraction")
    # Pinned on this world.
    assert lira["estimate_raw"].to_list() == pytest.approx([-0.018, 0.418, 0.872], abs=0.001)
    assert lira["naive"].to_list() == pytest.approx([0.07, 0.3933, 0.73], abs=1e-4)
    assert (lira["tpr"][0], lira["fpr"][0]) == pytest.approx((0.825, 0.0833), abs=1e-4)
    assert lira["clipped"].to_list() == [True, False, True]
    # Reference model k is scored on the adversary images none of its references trained on.
    membership = world.membership
    for model, count in (("shadow1", 16), ("shadow2", 24), ("shadow3", 24)):
        assert f"{model} on {count} " in lira["rates_source"][0]
        refs = [m for m in ("shadow0", "shadow1", "shadow2", "shadow3") if m != model]
        trained = membership.filter(pl.col("model").is_in(refs) & pl.col("is_in"))
        pool = membership.filter(pl.col("model") == model)["sample_id"]
        assert (~pool.is_in(trained["sample_id"].implode())).sum() == count
    # Each model's own rates at the pooled threshold (pooled: 33 of 40 IN, 2 of 24 OUT).
    assert "shadow1 on 16 (8 IN; TPR 0.88, FPR 0.00)" in lira["rates_source"][0]
    assert "shadow2 on 24 (16 IN; TPR 0.75, FPR 0.12)" in lira["rates_source"][0]
    shadow = rows.filter(pl.col("decoder") == "shadow")
    assert "under the 'shadow' decoder mode" in shadow["rates_source"][0]


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


def _folder_collection(config: dict, folder) -> float:
    """An image folder of 8 target_member images of the tiny split and 8 digits outside the
    split (PNG, lossless: the same pixels); returns the true fraction, 0.5."""
    from PIL import Image

    from mimia.data.prepare import write_manifest
    from mimia.data.sources import load_source

    (exp,) = resolve_experiments(config).values()
    manifest = write_manifest(
        dataset=exp["dataset"], split=exp["split"], seed=exp["seed"], manifest=folder / "m.pq"
    )
    source = load_source(exp["dataset"])
    known = set(manifest["content_sha256"])
    members = manifest.filter(pl.col("role") == "target_member")["key"].to_list()[:8]
    outside = [
        k
        for i, k in enumerate(source.keys)
        if k not in set(manifest["key"]) and source.content_sha256(i) not in known
    ][:8]
    images = folder / "images"
    images.mkdir()
    for k in members + outside:
        Image.fromarray(source.native(source.keys.index(k))).save(images / f"{k}.png")
    return images


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
    folder = _folder_collection(config, tmp_path)
    collections = config["defaults"]["usage"]["collections"]
    collections["owner"] = {"source": {"name": "image_folder", "path": str(folder)}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run = _snakemake(tmp_path)
    assert run.returncode == 0, run.stderr[-5000:]
    report = json.loads((tmp_path / "results/tiny/usage.json").read_text())
    rows = report["results"]
    assert {(r["decoder"], r["attack"]) for r in rows} == {
        (d, a) for d in ("released", "adapted") for a in ("threshold", "lira")
    }
    assert {(r["collection"], r["true_fraction"]) for r in rows} == {
        ("f0", 0.0),
        ("all", 1.0),
        ("owner", 0.5),
    }
    for r in rows:
        assert r["status"] in ("estimate", "no estimate") and r["reason"] is not None
        if r["collection"] == "owner":
            assert r["n_images"] == 16 and r["collection_spec"].startswith("image_folder ")
        if r["status"] == "estimate":
            assert 0 <= r["estimate"] <= 1 and 0 <= r["naive"] <= 1
            # Shown clipped only with the raw value beside it.
            assert r["clipped"] or r["estimate"] == r["estimate_raw"]
    assert (tmp_path / "results/tiny/usage.png").read_bytes()[:4] == b"\x89PNG"
