"""The attack stage end to end on the pipeline's files: default results pinned, output
formats, the metric conventions it states, and that target labels cannot change scores."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from test_attacks import make_world, write_world

from mimia.attacks.stage import attack_stage
from mimia.metrics import TPR_CONVENTIONS, auc, tpr_at_fpr
from mimia.provenance import read_metadata, write_parquet

DEFAULT_ATTACKS = {
    "threshold": {},
    "classifier": {"model": "logreg"},
    "classifier_mlp": {"attack": "classifier", "model": "mlp"},
    "lira": {},
    "rmia": {},
    "global_threshold": {},
    "encodermi_vector": {},
    "encodermi_threshold": {},
    "encodermi_set": {},
    "random": {},
}
ONLINE_ATTACKS = {
    "lira_online": {"attack": "lira", "mode": "online"},
    "rmia_online": {"attack": "rmia", "mode": "online", "a": 0.5},
}

# (auc, tpr_at_fpr_0.01, balanced_accuracy, threshold, auc_ci_low, first score), computed by
# the attack stage before the estimator refactoring (commit e1c5b3b: Observations with labels,
# observations_from_errors, the error table's role / is_member columns) on these worlds.
# encodermi_vector / encodermi_set score by log-odds since issue 18: same ranks (AUC, TPR,
# balanced accuracy), their threshold and scores are the logits of the former probabilities.
PINNED = {
    "offline/shadow/threshold": (
        0.5118222222222222,
        0.0,
        0.52,
        -0.02117975876899436,
        0.4436111111111111,
        -0.046412036288529634,
    ),
    "offline/shadow/classifier": (
        0.5327999999999999,
        0.013333333333333334,
        0.5133333333333333,
        0.11399964171382049,
        0.4647922222222222,
        -0.09028083511835634,
    ),
    "offline/shadow/classifier_mlp": (
        0.528888888888889,
        0.006666666666666667,
        0.5233333333333333,
        0.5001449807057086,
        0.46281666666666665,
        0.44915071320382743,
    ),
    "offline/shadow/lira": (
        0.9416444444444445,
        0.4666666666666667,
        0.8633333333333333,
        0.1974045547240154,
        0.9058188888888888,
        0.6147374479865302,
    ),
    "offline/shadow/rmia": (
        0.9179111111111111,
        0.31333333333333335,
        0.8500000000000001,
        0.5501672240802675,
        0.8779322222222222,
        0.6086956521739131,
    ),
    "offline/shadow/global_threshold": (
        0.5118222222222222,
        0.0,
        0.48,
        -0.042126174084842205,
        0.4436111111111111,
        -0.046412036288529634,
    ),
    "offline/shadow/encodermi_vector": (
        0.8183111111111111,
        0.04666666666666667,
        0.74,
        0.3544628990383012,
        0.7710244444444444,
        2.4233524567559876,
    ),
    "offline/shadow/encodermi_threshold": (
        0.8236888888888889,
        0.04,
        0.7533333333333333,
        0.6531725464993571,
        0.7737777777777778,
        0.7965551965761346,
    ),
    "offline/shadow/encodermi_set": (
        0.8208888888888889,
        0.05333333333333334,
        0.74,
        0.10017676203738032,
        0.77483,
        1.8217838675088587,
    ),
    "offline/shadow/random": (
        0.49577777777777776,
        0.013333333333333334,
        0.5033333333333333,
        0.5,
        0.42362000000000005,
        0.6369616873214543,
    ),
    "offline/released/lira": (
        0.9285333333333333,
        0.36,
        0.85,
        0.1974045547240154,
        0.8987088888888889,
        1.41572468347469,
    ),
    "offline/released/rmia": (
        0.9071111111111112,
        0.36,
        0.8500000000000001,
        0.5501672240802675,
        0.8670833333333333,
        0.8327759197324415,
    ),
    "offline/adapted/classifier": (
        0.5263111111111111,
        0.006666666666666667,
        0.5066666666666667,
        0.11399964171382049,
        0.4583744444444444,
        0.12701266270561845,
    ),
    "online/released/lira_online": (
        0.9017777777777777,
        0.46,
        0.83,
        -0.07988942204942051,
        0.8665088888888889,
        0.16656742257597212,
    ),
    "online/released/rmia_online": (
        0.8853777777777778,
        0.22666666666666666,
        0.8166666666666667,
        0.5167224080267558,
        0.8343366666666666,
        0.8394648829431438,
    ),
}
WORLDS = {"offline": {"seed": 0, "n": 150}, "online": {"seed": 2, "n": 150, "online": True}}


def run(paths, folder, attack, params, decoder="shadow", **metrics_config):
    return attack_stage(
        errors=paths["errors"],
        manifest=paths["manifest"],
        membership=paths["membership"],
        scores=folder / f"{attack}.parquet",
        roc=folder / f"{attack}-roc.parquet",
        metrics=folder / f"{attack}.json",
        decoder=decoder,
        attack=attack,
        params=params,
        metrics_config={"n_bootstrap": 50, **metrics_config},
        seed=7,
        embeddings=paths["embeddings"],
    )


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    root = tmp_path_factory.mktemp("worlds")
    worlds = {name: make_world(**kw) for name, kw in WORLDS.items()}
    return {name: (write_world(world, root / name), world) for name, world in worlds.items()}


def test_default_results_are_unchanged(worlds, tmp_path):
    for key, pinned in PINNED.items():
        world, decoder, attack = key.split("/")
        params = {**DEFAULT_ATTACKS, **ONLINE_ATTACKS}[attack]
        record = run(worlds[world][0], tmp_path, attack, params, decoder)
        got = [record[k] for k in ("auc", "tpr_at_fpr_0.01", "balanced_accuracy", "threshold")]
        got += [record["auc_ci_low"], pl.read_parquet(tmp_path / f"{attack}.parquet")["score"][0]]
        # Bit-identical on one machine; across CPUs the BLAS kernels under scikit-learn's lbfgs
        # (the classifier) and online LiRA's log-densities move the last bits (1.05e-13 seen).
        np.testing.assert_allclose(got, pinned, rtol=1e-11, atol=0, err_msg=key)


def test_outputs_and_conventions(worlds, tmp_path):
    paths, world = worlds["offline"]
    record = run(paths, tmp_path, "lira", {})
    scores = pl.read_parquet(tmp_path / "lira.parquet")
    assert scores.columns == ["sample_id", "role", "is_member", "score"]
    assert scores.height == 300 and scores["sample_id"].is_sorted()
    roles = dict(world.manifest.select("sample_id", "role").iter_rows())
    assert scores["role"].to_list() == [roles[s] for s in scores["sample_id"]]
    assert (scores["is_member"] == (scores["role"] == "target_member")).all()
    meta = read_metadata(tmp_path / "lira.parquet")
    assert meta["manifest_sha256"] == "split-a" and meta["decoder"] == "shadow"
    assert meta["attack"] == "lira" and meta["attack_kind"] == "lira"
    assert json.loads(meta["attack_params"]) == {} and "mimia_version" in meta
    roc = pl.read_parquet(tmp_path / "lira-roc.parquet")
    assert roc.columns == ["fpr", "tpr", "threshold"]
    on_disk = json.loads((tmp_path / "lira.json").read_text())
    assert on_disk == record
    assert record["decoder"] == "shadow" and record["attack"] == "lira"
    y, s = scores["is_member"].to_numpy(), scores["score"].to_numpy()
    assert record["auc"] == pytest.approx(auc(y, s))
    assert record["tpr_at_fpr_convention"] == "inclusive"
    assert record["tpr_at_fpr_rule"] == TPR_CONVENTIONS["inclusive"]
    # LiRA centres the audited model on its own median: a transductive calibration
    assert record["threshold_calibration"] == "transductive"
    assert "member fraction" in record["threshold_note"]
    assert record["audit_member_fraction"] == 0.5 and record["fit_member_fraction"] == 0.5
    assert run(paths, tmp_path, "threshold", {})["threshold_calibration"] == "shadow"
    assert run(paths, tmp_path, "random", {})["threshold_calibration"] == "fixed"
    glob = run(paths, tmp_path, "global_threshold", {})
    assert glob["threshold_calibration"] == "transductive"
    # its threshold is the median of the audited scores: half the audit set is called member
    glob_scores = pl.read_parquet(tmp_path / "global_threshold.parquet")["score"].to_numpy()
    assert (glob_scores >= glob["threshold"]).sum() == 150
    assert not list(tmp_path.glob("*.tmp"))


def test_strict_tpr_convention_is_an_option(worlds, tmp_path):
    paths, _ = worlds["offline"]
    strict = run(paths, tmp_path, "lira", {}, tpr_at_fpr="strict", n_bootstrap=0)
    assert strict["tpr_at_fpr_convention"] == "strict"
    scores = pl.read_parquet(tmp_path / "lira.parquet")
    y, s = scores["is_member"].to_numpy(), scores["score"].to_numpy()
    for f in (0.001, 0.01, 0.1):
        assert strict[f"tpr_at_fpr_{f:g}"] == tpr_at_fpr(y, s, f, convention="strict")
    # 150 non-members: 1 % FPR is 1.5 false positives, 10 % is 15 -- exactly on a ROC point
    inclusive = run(paths, tmp_path, "lira", {}, n_bootstrap=0)
    assert inclusive["tpr_at_fpr_0.1"] == pytest.approx(124 / 150)  # the 15th FP allowed
    assert strict["tpr_at_fpr_0.1"] == pytest.approx(123 / 150)
    assert inclusive["tpr_at_fpr_0.01"] == strict["tpr_at_fpr_0.01"]
    with pytest.raises(ValueError, match="convention must be one of"):
        run(paths, tmp_path, "lira", {}, tpr_at_fpr="lenient")


def test_target_labels_cannot_change_scores(worlds, tmp_path):
    """Relabel the target roles at random (the audit truth): every score stays identical."""
    paths, world = worlds["offline"]
    rng = np.random.default_rng(0)
    target = world.manifest.filter(pl.col("role").str.starts_with("target"))
    shuffled_roles = rng.permutation(target["role"].to_numpy())
    relabelled = world.manifest.update(
        target.with_columns(role=pl.Series(shuffled_roles)), on="sample_id"
    )
    other = dict(paths)
    other["manifest"] = tmp_path / "relabelled.parquet"
    relabelled.write_parquet(other["manifest"])
    for attack, params in DEFAULT_ATTACKS.items():
        (tmp_path / "a").mkdir(exist_ok=True)
        (tmp_path / "b").mkdir(exist_ok=True)
        first = run(paths, tmp_path / "a", attack, params)
        second = run(other, tmp_path / "b", attack, params)
        a = pl.read_parquet(tmp_path / "a" / f"{attack}.parquet")
        b = pl.read_parquet(tmp_path / "b" / f"{attack}.parquet")
        assert a["score"].to_list() == b["score"].to_list(), attack
        assert first["threshold"] == second["threshold"], attack
        assert (a["is_member"] != b["is_member"]).any()


def test_stage_rejects_inputs_from_another_split(worlds, tmp_path):
    paths, world = worlds["offline"]
    other = dict(paths)
    other["manifest"] = tmp_path / "manifest.parquet"
    write_parquet(world.manifest, other["manifest"], {"manifest_sha256": "split-b"})
    with pytest.raises(
        ValueError, match=r"computed on split split-a.*manifest .* is split split-b"
    ):
        run(other, tmp_path, "threshold", {})
    with pytest.raises(ValueError, match="'ratio' is not a parameter of threshold"):
        run(paths, tmp_path, "threshold", {"ratio": [0.5]})
    with pytest.raises(ValueError, match=r"ratios \[0.9\] are not among the extracted"):
        run(paths, tmp_path, "threshold", {"ratios": [0.9]})
    assert not list(tmp_path.glob("threshold*"))
