"""Attacks on synthetic reconstruction errors drawn from a known model, and the pivot from the
long extraction table."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from mimia.attacks import (
    ATTACKS,
    RMIA,
    ClassifierAttack,
    EncoderMI,
    GlobalThresholdAttack,
    LiRA,
    Observations,
    RandomGuess,
    ThresholdAttack,
    build_attack,
    observations_from_errors,
)
from mimia.attacks.classifier import sorted_error_features
from mimia.metrics import auc, balanced_accuracy, tpr_at_fpr

ROLES = ("target_member", "target_nonmember", "shadow_member", "shadow_nonmember")
DECODER_OFFSET = {"released": 0.0, "shadow": 0.4, "adapted": 0.2}


def make_world(
    seed: int = 0,
    n: int = 300,
    num_shadow: int = 5,
    ratios: tuple[float, ...] = (0.5, 0.75),
    num_masks: int = 8,
    difficulty: float = 1.0,
    delta: float = 0.3,
    model_noise: float = 0.12,
    online: bool = False,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """A long error table and the shadow membership table, from a known generative model.

    ``log error(model m, sample x, ratio r, mask k) = log base_r + d_x + c_m + eta_{m,x}
    + eps_{x,r,k} + nu_{m,x,r,k} - delta * [x trained m]`` with per-sample difficulty
    ``d_x ~ N(0, difficulty)``, model offsets ``c_m`` (the target's decoder adds
    ``DECODER_OFFSET``), model-sample noise ``eta ~ N(0, model_noise)``, a per-mask effect
    ``eps`` shared by every model (same masks) and small per-model mask noise ``nu``.
    shadow0 trains on shadow_member; shadow1.. on random halves of the adversary's pool
    (plus the target samples when ``online``), as ``mimia.data.splits.shadow_membership``.
    """
    rng = np.random.default_rng(seed)
    ids = np.array([f"s{i:05d}" for i in range(4 * n)])
    role = np.repeat(ROLES, n)
    d = rng.normal(0, difficulty, len(ids))
    eps = rng.normal(0, 0.2, (len(ids), len(ratios), num_masks))
    base = np.log(0.02 + 0.02 * np.asarray(ratios))[None, :, None]
    pool = np.isin(role, ROLES[2:] if not online else ROLES)
    members = {"target": role == "target_member", "shadow0": role == "shadow_member"}
    for m in range(1, num_shadow):
        is_in = np.zeros(len(ids), dtype=bool)
        where = np.flatnonzero(pool)
        is_in[rng.permutation(where)[: len(where) // 2]] = True
        members[f"shadow{m}"] = is_in
    frames = []

    def rows(model, decoder, keep, offset):
        x = np.flatnonzero(keep)
        eta = rng.normal(0, model_noise, len(x))[:, None, None]
        nu = rng.normal(0, 0.05, (len(x), len(ratios), num_masks))
        member = members[model][x]
        log_e = base + d[x, None, None] + offset + eta + eps[x] + nu
        log_e = log_e - delta * member[:, None, None]
        shape = log_e.shape
        frames.append(
            pl.DataFrame(
                {
                    "sample_id": np.repeat(ids[x], shape[1] * shape[2]),
                    "role": np.repeat(role[x], shape[1] * shape[2]),
                    "is_member": np.repeat(member, shape[1] * shape[2]),
                    "model": model,
                    "decoder": decoder,
                    "mask_ratio": np.tile(np.repeat(ratios, shape[2]), len(x)),
                    "mask_index": np.tile(np.arange(shape[2]), len(x) * shape[1]),
                    "error": np.exp(log_e).ravel(),
                },
                schema_overrides={
                    "mask_ratio": pl.Float32,
                    "mask_index": pl.Int16,
                    "error": pl.Float32,
                },
            )
        )

    target_rows = np.isin(role, ROLES[:2])
    target_offset = rng.normal(0, 0.1)
    for decoder, off in DECODER_OFFSET.items():
        rows("target", decoder, target_rows, target_offset + off)
    for m in range(num_shadow):
        rows(f"shadow{m}", "released", np.ones(len(ids), dtype=bool), rng.normal(0, 0.1))
    membership = pl.concat(
        pl.DataFrame(
            {"sample_id": ids[pool], "model": f"shadow{m}", "is_in": members[f"shadow{m}"][pool]}
        )
        for m in range(num_shadow)
    )
    return pl.concat(frames), membership


def split_world(df, membership, decoder="shadow", num_shadow=5):
    """(shadow, target) observations as the pipeline builds them."""
    refs = [f"shadow{m}" for m in range(1, num_shadow)]
    shadow = observations_from_errors(
        df, "shadow0", "released", refs, membership, roles=("shadow_member", "shadow_nonmember")
    )
    target = observations_from_errors(df, "target", decoder, refs, membership)
    return shadow, target


@pytest.fixture(scope="module")
def hard_world():
    """Strong per-sample difficulty (sd 1) next to a small membership gap (0.3)."""
    return split_world(*make_world(seed=0, difficulty=1.0))


@pytest.fixture(scope="module")
def easy_world():
    """Weak per-sample difficulty (sd 0.3): a global threshold works."""
    return split_world(*make_world(seed=1, difficulty=0.3))


def fitted_scores(name, shadow, target, **params):
    attack = build_attack(name, **params).fit(shadow)
    return attack, attack.score(target)


# ---------------------------------------------------------------- observations_from_errors


def small_table():
    """3 samples (listed out of order), 2 ratios, 2 masks; target + 2 reference models."""
    rows = []
    for model, decoder, member in [
        ("target", "shadow", {"b": True, "a": False, "c": True}),
        ("target", "released", {"b": True, "a": False, "c": True}),
        ("shadow1", "released", {"b": False, "a": True, "c": False}),
        ("shadow2", "released", {"b": False, "a": False, "c": True}),
    ]:
        for sid in ("b", "a", "c"):
            for ratio in (0.75, 0.5):
                for k in (1, 0):
                    err = (
                        {"target": 1, "shadow1": 2, "shadow2": 3}[model] * 1000
                        + (decoder == "released") * 100
                        + {"a": 10, "b": 20, "c": 30}[sid]
                        + (ratio == 0.75) * 5
                        + k
                    )
                    rows.append((sid, f"r{sid}", member[sid], model, decoder, ratio, k, err))
    return pl.DataFrame(
        rows,
        schema={
            "sample_id": pl.String,
            "role": pl.String,
            "is_member": pl.Boolean,
            "model": pl.String,
            "decoder": pl.String,
            "mask_ratio": pl.Float32,
            "mask_index": pl.Int16,
            "error": pl.Float32,
        },
        orient="row",
    )


def test_observations_from_errors_round_trip():
    df = small_table()
    membership = pl.DataFrame(
        {
            "sample_id": ["a", "b", "c", "c", "zzz"],
            "model": ["shadow1", "shadow1", "shadow1", "shadow2", "shadow2"],
            "is_in": [True, False, False, True, True],
        }
    )
    obs = observations_from_errors(df, "target", "shadow", ["shadow1", "shadow2"], membership)
    assert obs.sample_ids.tolist() == ["a", "b", "c"]
    assert obs.mask_ratios == (0.5, 0.75)
    assert obs.errors.shape == (3, 2, 2)
    np.testing.assert_array_equal(obs.errors[0], [[1010, 1011], [1015, 1016]])
    np.testing.assert_array_equal(obs.errors[:, 1, 1], [1016, 1026, 1036])
    np.testing.assert_array_equal(obs.labels, [False, True, True])
    assert obs.reference_errors.shape == (2, 3, 2, 2)
    # reference models are read with their own ("released") decoder
    np.testing.assert_array_equal(obs.reference_errors[:, 2, 0, 1], [2131, 3131])
    np.testing.assert_array_equal(obs.reference_in, [[True, False, False], [False, False, True]])
    # without a membership table, reference_in is the reference rows' is_member
    same = observations_from_errors(df, "target", "shadow", ["shadow1", "shadow2"])
    np.testing.assert_array_equal(same.reference_in, obs.reference_in)
    # roles select the audited rows (and so the samples)
    sub = observations_from_errors(df, "target", "shadow", ["shadow1"], roles=["rb", "rc"])
    assert sub.sample_ids.tolist() == ["b", "c"]
    np.testing.assert_array_equal(sub.errors, obs.errors[1:])
    np.testing.assert_array_equal(sub.reference_errors[0], obs.reference_errors[0, 1:])
    released = observations_from_errors(df, "target", "released")
    np.testing.assert_array_equal(released.errors - obs.errors, 100)
    assert released.reference_errors is None and released.reference_in is None


def test_observations_from_errors_failures():
    df = small_table()
    hole = df.filter(
        ~(
            (pl.col("model") == "target")
            & (pl.col("sample_id") == "b")
            & (pl.col("mask_index") == 1)
            & (pl.col("mask_ratio") == 0.5)
            & (pl.col("decoder") == "shadow")
        )
    )
    with pytest.raises(
        ValueError, match=r"lacks 1 \(sample, mask_ratio, mask_index\).*'b', 0.5, 1"
    ):
        observations_from_errors(hole, "target", "shadow")
    no_ref_sample = df.filter(~((pl.col("model") == "shadow2") & (pl.col("sample_id") == "c")))
    with pytest.raises(ValueError, match=r"reference model 'shadow2'.*lacks 1 samples: c"):
        observations_from_errors(no_ref_sample, "target", "shadow", ["shadow1", "shadow2"])
    ref_hole = df.filter(
        ~(
            (pl.col("model") == "shadow1")
            & (pl.col("mask_ratio") == 0.75)
            & (pl.col("sample_id") == "a")
        )
    )
    with pytest.raises(ValueError, match=r"reference model 'shadow1'.*lacks 2"):
        observations_from_errors(ref_hole, "target", "shadow", ["shadow1"])
    with pytest.raises(ValueError, match="no rows for model='target', decoder='adapted'"):
        observations_from_errors(df, "target", "adapted")
    with pytest.raises(ValueError, match=r"'shadow9'.*no rows"):
        observations_from_errors(df, "target", "shadow", ["shadow9"])
    with pytest.raises(ValueError, match=r"no rows of roles \['x'\]; have \['ra', 'rb', 'rc'\]"):
        observations_from_errors(df, "target", "shadow", roles=["x"])
    with pytest.raises(ValueError, match="duplicate"):
        observations_from_errors(pl.concat([df, df.head(1)]), "target", "shadow")
    wrong = pl.DataFrame({"sample_id": ["a"], "model": ["shadow1"], "is_in": [False]})
    with pytest.raises(ValueError, match=r"disagrees.*e.g. a"):
        observations_from_errors(df, "target", "shadow", ["shadow1"], wrong)
    with pytest.raises(ValueError, match="its own reference"):
        observations_from_errors(df, "shadow1", "released", ["shadow1"])


def test_observations_validate_shapes():
    ids = np.array(["a", "b"])
    with pytest.raises(ValueError, match="mask ratios"):
        Observations(ids, np.ones((2, 2, 3)), (0.75,))
    with pytest.raises(ValueError, match="non-finite"):
        Observations(ids, np.full((2, 1, 3), np.nan), (0.75,))
    with pytest.raises(ValueError, match="reference_errors must have shape"):
        Observations(
            ids, np.ones((2, 1, 3)), (0.75,), None, np.ones((4, 2, 1, 2)), np.zeros((4, 2), bool)
        )
    with pytest.raises(ValueError, match="come together"):
        Observations(ids, np.ones((2, 1, 3)), (0.75,), reference_errors=np.ones((1, 2, 1, 3)))
    obs = Observations(ids, np.ones((2, 1, 3)), (0.75,), labels=[1, 0])
    with pytest.raises(ValueError, match=r"mask ratio 0.5 not observed"):
        obs.ratio_indices([0.5])
    assert obs.subset([1]).sample_ids.tolist() == ["b"]


# ---------------------------------------------------------------- registry


def test_registry_and_build_attack():
    assert {"threshold", "classifier", "lira", "rmia", "global_threshold", "random"} <= set(ATTACKS)
    assert {"encodermi", "encodermi_vector", "encodermi_threshold", "encodermi_set"} <= set(ATTACKS)
    assert isinstance(build_attack("lira", mode="online"), LiRA)
    with pytest.raises(ValueError, match=r"unknown attack 'nope'; known attacks: classifier, "):
        build_attack("nope")
    with pytest.raises(ValueError, match="bad parameters"):
        build_attack("threshold", foo=1)
    with pytest.raises(ValueError, match="logreg"):
        build_attack("classifier", model="svm")
    with pytest.raises(RuntimeError, match="fit"):
        ThresholdAttack().score(Observations(["a"], np.ones((1, 1, 1)), (0.5,)))


# ---------------------------------------------------------------- attacks


def test_threshold_attack_on_weak_difficulty(easy_world):
    shadow, target = easy_world
    attack, scores = fitted_scores("threshold", shadow, target)
    np.testing.assert_allclose(scores, -target.errors.mean(axis=(1, 2)))
    assert auc(target.labels, scores) > 0.7
    # the shadow decoder raises every error by exp(0.4): the shadow threshold calls (almost)
    # everything a non-member; with the target's released decoder it transfers
    assert balanced_accuracy(target.labels, attack.predict(target)) < 0.55
    df, membership = make_world(seed=1, difficulty=0.3)
    _, released = split_world(df, membership, decoder="released")
    assert balanced_accuracy(released.labels, attack.predict(released)) > 0.6
    _, one_ratio = fitted_scores("threshold", shadow, target, ratios=[0.75])
    np.testing.assert_allclose(one_ratio, -target.errors[:, 1].mean(axis=1))


def test_lira_beats_threshold_at_low_fpr_under_strong_difficulty(hard_world):
    shadow, target = hard_world
    _, thr = fitted_scores("threshold", shadow, target)
    lira, lra = fitted_scores("lira", shadow, target)
    assert auc(target.labels, thr) < 0.65
    assert tpr_at_fpr(target.labels, thr, 0.01) < 0.06
    assert tpr_at_fpr(target.labels, lra, 0.01) > 0.3
    assert auc(target.labels, lra) > 0.9
    # the threshold, replayed on shadow model 0, transfers to the target despite its decoder
    # (whose errors are exp(0.4) times higher): that is what the median calibration is for
    assert balanced_accuracy(target.labels, lra >= lira.threshold) > 0.8
    raw = LiRA(calibrate=False).fit(shadow)
    raw_scores = raw.score(target)
    assert balanced_accuracy(target.labels, raw_scores >= raw.threshold) < 0.55
    # offline z-scores with pooled variance: calibration moves scores, not their ranking
    assert auc(target.labels, raw_scores) == pytest.approx(auc(target.labels, lra))
    _, mean_log = fitted_scores("lira", shadow, target, statistic="mean_log")
    assert auc(target.labels, mean_log) > 0.9


def test_lira_online_and_variance_choices():
    shadow, target = split_world(*make_world(seed=2, difficulty=1.0, online=True))
    assert 0.3 < target.reference_in.mean() < 0.7
    all_out = Observations(
        target.sample_ids,
        target.errors,
        target.mask_ratios,
        reference_errors=target.reference_errors,
        reference_in=np.zeros_like(target.reference_in),
    )
    with pytest.raises(ValueError, match="use mode='offline'"):
        LiRA(mode="online").fit(shadow).score(all_out)
    online, scores = fitted_scores("lira", shadow, target, mode="online")
    assert auc(target.labels, scores) > 0.85
    assert balanced_accuracy(target.labels, scores >= online.threshold) > 0.75
    _, offline = fitted_scores("lira", shadow, target)
    assert auc(target.labels, offline) > 0.85
    # per-sample variances (every sample has >= 1 OUT model here) still rank well
    _, per_sample = fitted_scores("lira", shadow, target, per_sample_variance_min=2)
    assert auc(target.labels, per_sample) > 0.8


def test_lira_needs_references_and_defaults_threshold_without_them(hard_world):
    shadow, target = hard_world
    bare = Observations(shadow.sample_ids, shadow.errors, shadow.mask_ratios, shadow.labels)
    lira = LiRA().fit(bare)
    assert lira.threshold == 0.0
    with pytest.raises(ValueError, match="no reference models"):
        lira.score(Observations(target.sample_ids, target.errors, target.mask_ratios))


def test_rmia(hard_world):
    shadow, target = hard_world
    _, thr = fitted_scores("threshold", shadow, target)
    rmia, scores = fitted_scores("rmia", shadow, target)
    assert rmia.a_ in {round(a, 1) for a in np.linspace(0, 1, 11)}
    assert scores.min() >= 0 and scores.max() <= 1
    assert auc(target.labels, scores) > 0.85 > auc(target.labels, thr) + 0.2
    assert tpr_at_fpr(target.labels, scores, 0.01) > tpr_at_fpr(target.labels, thr, 0.01)
    assert balanced_accuracy(target.labels, scores >= rmia.threshold) > 0.75
    # with gamma = 1 and the scored samples as population, score = rank of LR / (N - 1)
    lr = rmia.likelihood_ratio(target)
    ranks = np.argsort(np.argsort(lr))
    np.testing.assert_allclose(scores, ranks / (len(target) - 1))
    fixed = RMIA(a=0.3).fit(shadow)
    assert fixed.a_ == 0.3
    pop, pop_scores = fitted_scores("rmia", shadow, target, population="shadow_nonmembers")
    assert len(pop.population_lr) == (~shadow.labels).sum()
    assert auc(target.labels, pop_scores) == pytest.approx(auc(target.labels, scores), abs=0.01)
    _, online = fitted_scores("rmia", shadow, target, mode="online", a=0.5)
    assert auc(target.labels, online) > 0.85


def test_classifier_attack(easy_world):
    shadow, target = easy_world
    for model in ("logreg", "mlp"):
        attack, scores = fitted_scores("classifier", shadow, target, model=model, seed=3)
        assert auc(target.labels, scores) > 0.7, model
        proba = attack.pipeline.predict_proba(sorted_error_features(target, None))[:, 1]
        if model == "logreg":  # log-odds of the member probability
            np.testing.assert_allclose(1 / (1 + np.exp(-scores)), proba, rtol=1e-9, atol=1e-12)
        else:
            np.testing.assert_array_equal(scores, proba)
        again = ClassifierAttack(model=model, seed=3).fit(shadow).score(target)
        np.testing.assert_array_equal(scores, again)
    one = Observations(target.sample_ids, target.errors[:, :1], target.mask_ratios[:1])
    with pytest.raises(ValueError, match=r"fitted on \(2, 8\) \(ratios, masks\)"):
        attack.score(one)


def test_global_threshold_and_random(easy_world):
    shadow, target = easy_world
    glob = GlobalThresholdAttack().fit(None)
    scores = glob.score(target)
    _, thr = fitted_scores("threshold", shadow, target)
    np.testing.assert_allclose(scores, thr)
    assert glob.threshold == pytest.approx(-np.median(target.errors.mean(axis=(1, 2))))
    assert glob.predict(target).sum() == len(target) // 2
    rand = RandomGuess(seed=5).fit(None)
    scores = rand.score(target)
    assert rand.threshold == 0.5
    assert abs(auc(target.labels, scores) - 0.5) < 0.07
    np.testing.assert_array_equal(scores, RandomGuess(seed=5).fit(shadow).score(target))
    assert not np.array_equal(scores, RandomGuess(seed=6).fit(None).score(target))


def encoder_world(seed: int, n: int = 300, views: int = 5):
    """Members' augmented views agree more (cosine similarity + 0.1) than non-members'."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) < n // 2
    base = rng.normal(0.6, 0.08, n) + 0.1 * labels
    sim = np.clip(base[:, None] + rng.normal(0, 0.1, (n, views * (views - 1) // 2)), -1, 1)
    return Observations(
        np.array([f"e{i}" for i in range(n)]),
        np.ones((n, 1, 1)),
        (0.75,),
        labels=labels,
        embeddings_similarity=sim,
    )


def test_encodermi_variants():
    shadow, target = encoder_world(0), encoder_world(1)
    for name in ("encodermi_vector", "encodermi_threshold", "encodermi_set"):
        attack, scores = fitted_scores(name, shadow, target)
        assert auc(target.labels, scores) > 0.7, name
        assert balanced_accuracy(target.labels, scores >= attack.threshold) > 0.65, name
    _, mean_sim = fitted_scores("encodermi", shadow, target, variant="threshold")
    np.testing.assert_allclose(mean_sim, target.embeddings_similarity.mean(axis=1))
    # the set variant is permutation invariant and takes sets of another size
    attack = EncoderMI(variant="set").fit(shadow)
    perm = np.random.default_rng(0).permutation(target.embeddings_similarity.shape[1])
    shuffled = target.subset(np.arange(len(target)))
    shuffled.embeddings_similarity = target.embeddings_similarity[:, perm]
    np.testing.assert_allclose(attack.score(shuffled), attack.score(target))
    bigger = encoder_world(2, views=7)
    assert auc(bigger.labels, attack.score(bigger)) > 0.7
    with pytest.raises(ValueError, match="fitted on 10 similarities"):
        EncoderMI(variant="vector").fit(shadow).score(bigger)
    with pytest.raises(ValueError, match="embeddings_similarity"):
        EncoderMI().fit(Observations(["a", "b"], np.ones((2, 1, 1)), (0.5,), labels=[1, 0]))


def test_offline_lira_fits_with_a_single_reference_model():
    from mimia.attacks import Observations, build_attack

    rng = np.random.default_rng(0)
    n = 40
    labels = np.arange(n) < n // 2
    errors = rng.lognormal(size=(n, 1, 2)) * np.where(labels, 0.8, 1.0)[:, None, None]
    ref_in = (np.arange(n) % 2 == 0)[None, :]
    shadow = Observations(
        sample_ids=np.array([f"s{i}" for i in range(n)]),
        errors=errors,
        mask_ratios=(0.75,),
        labels=labels,
        reference_errors=rng.lognormal(size=(1, n, 1, 2)),
        reference_in=ref_in,
    )
    attack = build_attack("lira").fit(shadow)
    assert np.isfinite(attack.threshold)
