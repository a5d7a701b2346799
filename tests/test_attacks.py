"""Attacks on synthetic reconstruction errors drawn from a known model, and the builder from
the pipeline's tables (error table, manifest, shadow membership) to the attacks' X and y.

``make_world`` is shared with the other ``test_attack_*.py`` files.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import NamedTuple

import numpy as np
import polars as pl
import pytest

from mimia.attacks import (
    RMIA,
    ClassifierAttack,
    EncoderMI,
    GlobalThresholdAttack,
    LiRA,
    Observations,
    RandomGuess,
    build_attack,
)
from mimia.attacks.classifier import sorted_error_features
from mimia.attacks.inputs import build_inputs, observations, shadow_models
from mimia.metrics import auc, balanced_accuracy, tpr_at_fpr
from mimia.provenance import write_parquet

ROLES = ("target_member", "target_nonmember", "shadow_member", "shadow_nonmember")
DECODER_OFFSET = {"released": 0.0, "shadow": 0.4, "adapted": 0.2}


class World(NamedTuple):
    errors: pl.DataFrame
    manifest: pl.DataFrame
    membership: pl.DataFrame
    embeddings: pl.DataFrame


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
    views: int = 5,
    reference_decoders: tuple[str, ...] = (),
) -> World:
    """The pipeline's tables, from a known generative model.

    ``log error(model m, sample x, ratio r, mask k) = log base_r + d_x + c_m + eta_{m,x}
    + eps_{x,r,k} + nu_{m,x,r,k} - delta * [x trained m]`` with per-sample difficulty
    ``d_x ~ N(0, difficulty)``, model offsets ``c_m`` (the target's decoder adds
    ``DECODER_OFFSET``), model-sample noise ``eta ~ N(0, model_noise)``, a per-mask effect
    ``eps`` shared by every model (same masks) and small per-model mask noise ``nu``.
    shadow0 trains on shadow_member; shadow1.. on random halves of the adversary's pool
    (plus the target samples when ``online``), as ``mimia.data.splits.shadow_membership``.
    Embedding similarities of ``views`` views are 0.1 higher for members of target/shadow0.
    ``reference_decoders``: shadow1.. are also scored under these decoder modes (the usage
    audit's calibration), with the target's decoder offsets.
    The error table has no role or label columns, as extraction writes it.
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
    shadow_offset = []
    for m in range(num_shadow):
        shadow_offset.append(rng.normal(0, 0.1))
        rows(f"shadow{m}", "released", np.ones(len(ids), dtype=bool), shadow_offset[m])
    for decoder in reference_decoders:
        for m in range(1, num_shadow):
            offset = shadow_offset[m] + DECODER_OFFSET[decoder]
            rows(f"shadow{m}", decoder, np.isin(role, ROLES[2:]), offset)
    membership = pl.concat(
        pl.DataFrame(
            {"sample_id": ids[pool], "model": f"shadow{m}", "is_in": members[f"shadow{m}"][pool]}
        )
        for m in range(num_shadow)
    )
    manifest = pl.DataFrame(
        {
            "sample_id": ids,
            "source_index": np.arange(len(ids)),
            "label": np.arange(len(ids)) % 10,
            "role": role,
        }
    )
    sims = []
    for model in ("target", "shadow0"):
        x = np.flatnonzero(target_rows if model == "target" else np.isin(role, ROLES[2:]))
        level = rng.normal(0.6, 0.08, len(x)) + 0.1 * members[model][x]
        pairs = views * (views - 1) // 2
        s = np.clip(level[:, None] + rng.normal(0, 0.1, (len(x), pairs)), -1, 1)
        sims.append(pl.DataFrame({"sample_id": ids[x], "model": model, "similarities": s}))
    return World(pl.concat(frames), manifest, membership, pl.concat(sims))


def write_world(world: World, folder: Path, manifest_sha256: str = "split-a") -> dict:
    """The world as the pipeline's files; the stage's input paths."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"manifest_sha256": manifest_sha256}
    write_parquet(world.errors, folder / "errors.parquet", meta)
    write_parquet(world.manifest, folder / "manifest.parquet", meta)
    membership = []
    for (model,), table in world.membership.group_by("model", maintain_order=True):
        membership.append(folder / f"membership-{model}.parquet")
        write_parquet(table, membership[-1], meta)
    write_parquet(world.embeddings, folder / "embeddings.parquet", meta)
    return {
        "errors": folder / "errors.parquet",
        "manifest": folder / "manifest.parquet",
        "membership": membership,
        "embeddings": [folder / "embeddings.parquet"],
    }


def inputs(world: World, decoder: str = "shadow", needs=("errors", "references", "similarities")):
    return build_inputs(
        world.errors, world.manifest, world.membership, decoder, needs, world.embeddings
    )


@pytest.fixture(scope="module")
def hard_world():
    """Strong per-sample difficulty (sd 1) next to a small membership gap (0.3)."""
    return inputs(make_world(seed=0, difficulty=1.0))


@pytest.fixture(scope="module")
def easy_world():
    """Weak per-sample difficulty (sd 0.3): a global threshold works."""
    return inputs(make_world(seed=1, difficulty=0.3))


def fitted_scores(name, data, **params):
    attack = build_attack(name, **params).fit(data.X_fit, data.y_fit)
    return attack, attack.score_samples(data.X_audit)


# ---------------------------------------------------------------- the builder


def small_tables():
    """2 target + 2 shadow samples (listed out of order), 2 ratios, 2 masks; target under two
    decoders, shadow0..2 under their own. Error = model * 1000 + decoder * 100 + sample * 10 +
    ratio * 5 + mask, so every cell says where it came from."""
    samples = {"b": "target_member", "a": "target_nonmember", "d": "shadow_member"}
    samples["c"] = "shadow_nonmember"
    rows = []
    models = [("target", "shadow"), ("target", "released")]
    models += [(f"shadow{i}", "released") for i in range(3)]
    for model, decoder in models:
        for sid, role in samples.items():
            if model == "target" and role.startswith("shadow"):
                continue
            for ratio in (0.75, 0.5):
                for k in (1, 0):
                    err = (
                        {"target": 1, "shadow0": 2, "shadow1": 3, "shadow2": 4}[model] * 1000
                        + (decoder == "released") * 100
                        + {"a": 10, "b": 20, "c": 30, "d": 40}[sid]
                        + (ratio == 0.75) * 5
                        + k
                    )
                    rows.append((sid, model, decoder, ratio, k, err))
    errors = pl.DataFrame(
        rows,
        schema={
            "sample_id": pl.String,
            "model": pl.String,
            "decoder": pl.String,
            "mask_ratio": pl.Float32,
            "mask_index": pl.Int16,
            "error": pl.Float32,
        },
        orient="row",
    )
    manifest = pl.DataFrame({"sample_id": list(samples), "role": list(samples.values())})
    membership = pl.DataFrame(
        {
            "sample_id": ["d", "c", "c", "a", "d"],
            "model": ["shadow0", "shadow0", "shadow1", "shadow1", "shadow2"],
            "is_in": [True, False, True, True, True],
        }
    )
    return errors, manifest, membership


def test_build_inputs_places_every_error():
    errors, manifest, membership = small_tables()
    data = build_inputs(errors, manifest, membership, "shadow")
    fit, audit = data.X_fit, data.X_audit
    # fit data: shadow0 on the adversary's samples, shadow1, shadow2 as references
    assert fit.sample_ids.tolist() == ["c", "d"]
    assert fit.mask_ratios == (0.5, 0.75)
    np.testing.assert_array_equal(fit.errors[1], [[2140, 2141], [2145, 2146]])
    np.testing.assert_array_equal(fit.reference_errors[:, 0, 1, 0], [3135, 4135])
    np.testing.assert_array_equal(fit.reference_in, [[True, False], [False, True]])
    np.testing.assert_array_equal(data.y_fit, [False, True])  # shadow0's membership
    # audit data: the target under the audited decoder, every shadow model as a reference,
    # read with its own decoder; a sample the membership table does not list is OUT
    assert audit.sample_ids.tolist() == ["a", "b"]
    np.testing.assert_array_equal(audit.errors[:, 1, 1], [1016, 1026])
    assert audit.reference_errors.shape == (3, 2, 2, 2)
    np.testing.assert_array_equal(audit.reference_errors[:, 1, 0, 1], [2121, 3121, 4121])
    np.testing.assert_array_equal(audit.reference_in, [[False, False], [True, False], [False] * 2])
    np.testing.assert_array_equal(data.y_audit, [False, True])  # from the manifest roles
    assert data.audit_roles.tolist() == ["target_nonmember", "target_member"]
    released = build_inputs(errors, manifest, membership, "released")
    np.testing.assert_array_equal(released.X_audit.errors - audit.errors, 100)
    # only the declared parts are built
    assert data.X_audit.parts == {"errors", "references"}
    bare = build_inputs(errors, manifest, membership, "shadow", needs=["errors"])
    assert bare.X_audit.parts == {"errors"} and bare.X_audit.reference_errors is None
    ids_only = build_inputs(None, manifest, membership, "shadow", needs=[])
    assert ids_only.X_audit.parts == frozenset() and len(ids_only.X_audit) == 2


def test_observations_carry_no_labels():
    names = {f.name for f in dataclasses.fields(Observations)}
    assert names == {
        "sample_ids",
        "errors",
        "mask_ratios",
        "reference_errors",
        "reference_in",
        "similarities",
    }
    with pytest.raises(TypeError):
        Observations(["a"], np.ones((1, 1, 1)), (0.5,), labels=[True])


def test_shadow_models_sort_numerically_and_are_checked():
    table = pl.DataFrame(
        {
            "sample_id": ["x"] * 12,
            "model": [f"shadow{i}" for i in (10, 2, 0, 1, 9, 11, 3, 4, 5, 6, 7, 8)],
        }
    ).with_columns(is_in=pl.lit(True))
    assert shadow_models(table) == [f"shadow{i}" for i in range(12)]
    with pytest.raises(ValueError, match=r"lists models \['target'\]"):
        shadow_models(pl.concat([table, table.head(1).with_columns(model=pl.lit("target"))]))
    with pytest.raises(ValueError, match="twice"):
        shadow_models(pl.concat([table, table.head(1)]))
    with pytest.raises(ValueError, match=r"1 samples not in the manifest, e.g. x"):
        shadow_models(table, {"y"})
    with pytest.raises(ValueError, match=r"lacks columns \['is_in'\]"):
        shadow_models(table.drop("is_in"))


def test_build_inputs_reads_references_in_numeric_order():
    world = make_world(seed=3, n=20, num_shadow=12)
    data = inputs(world, needs=["errors", "references"])
    # shadow10 is the 11th reference model of the audit (shadow0..11), the 10th of the fit
    for X, index, count in ((data.X_audit, 10, 12), (data.X_fit, 9, 11)):
        ids = X.sample_ids.tolist()
        rows = world.errors.filter(
            (pl.col("model") == "shadow10") & (pl.col("mask_ratio") == 0.5)
        ).filter(pl.col("mask_index") == 3)
        by_id = dict(zip(rows["sample_id"], rows["error"], strict=True))
        expected = np.array([by_id[s] for s in ids], dtype=np.float32)
        np.testing.assert_array_equal(
            X.reference_errors[index, :, 0, 3].astype(np.float32), expected
        )
        assert X.num_references == count


def test_build_inputs_failures():
    errors, manifest, membership = small_tables()

    def without(**match):
        cond = pl.lit(True)
        for col, value in match.items():
            cond = cond & (pl.col(col) == value)
        return errors.filter(~cond)

    hole = without(model="target", sample_id="b", mask_index=1, mask_ratio=0.5, decoder="shadow")
    with pytest.raises(
        ValueError, match=r"lacks 1 \(sample, mask_ratio, mask_index\).*'b', 0.5, 1"
    ):
        build_inputs(hole, manifest, membership, "shadow")
    no_ref = without(model="shadow2", sample_id="a")
    with pytest.raises(ValueError, match=r"reference model 'shadow2'.*lacks 1 samples: a"):
        build_inputs(no_ref, manifest, membership, "shadow")
    ref_hole = without(model="shadow1", mask_ratio=0.75, sample_id="d")
    with pytest.raises(ValueError, match=r"reference model 'shadow1'.*lacks 2"):
        build_inputs(ref_hole, manifest, membership, "shadow")
    with pytest.raises(ValueError, match="no rows of model 'target' under decoder 'adapted'"):
        build_inputs(errors, manifest, membership, "adapted")
    with pytest.raises(ValueError, match="duplicate"):
        build_inputs(pl.concat([errors, errors.head(1)]), manifest, membership, "shadow")
    with pytest.raises(ValueError, match=r"lacks columns \['error'\]"):
        build_inputs(errors.drop("error"), manifest, membership, "shadow")
    stranger = pl.concat([errors, errors.head(1).with_columns(sample_id=pl.lit("zz"))])
    with pytest.raises(ValueError, match=r"error table has 1 samples not in the manifest, e.g. zz"):
        build_inputs(stranger, manifest, membership, "shadow")
    with pytest.raises(ValueError, match=r"not 'shadow0'"):
        build_inputs(errors, manifest, membership.filter(pl.col("model") != "shadow0"), "shadow")
    bad_role = manifest.with_columns(role=pl.lit("target_member"))
    with pytest.raises(ValueError, match="no samples of roles"):
        build_inputs(errors, bad_role, membership, "shadow")
    typo = manifest.with_columns(pl.col("role").str.replace("shadow_member", "shadow_membr"))
    with pytest.raises(ValueError, match=r"unknown roles \['shadow_membr'\]"):
        build_inputs(errors, typo, membership, "shadow")
    with pytest.raises(ValueError, match="need the embeddings table"):
        build_inputs(errors, manifest, membership, "shadow", needs=["similarities"])
    with pytest.raises(ValueError, match="its own reference"):
        observations(errors, "shadow1", "released", ["a"], ["shadow1"], membership)
    with pytest.raises(ValueError, match="unknown input parts"):
        build_inputs(errors, manifest, membership, "shadow", needs=["labels"])


def test_online_membership_lists_target_samples():
    world = make_world(seed=2, n=60, online=True)
    data = inputs(world, needs=["errors", "references"])
    assert 0.3 < data.X_audit.reference_in.mean() < 0.7
    assert not data.X_audit.reference_in[0].any()  # shadow0 trains on shadow_member only
    # offline attacks only read the OUT references and still run
    for name in ("lira", "rmia"):
        _, scores = fitted_scores(name, data)
        assert auc(data.y_audit, scores) > 0.8, name


def test_observations_validate_shapes():
    ids = np.array(["a", "b"])
    with pytest.raises(ValueError, match="mask ratios"):
        Observations(ids, np.ones((2, 2, 3)), (0.75,))
    with pytest.raises(ValueError, match="non-finite"):
        Observations(ids, np.full((2, 1, 3), np.nan), (0.75,))
    with pytest.raises(ValueError, match="reference_errors must have shape"):
        Observations(
            ids, np.ones((2, 1, 3)), (0.75,), np.ones((4, 2, 1, 2)), np.zeros((4, 2), bool)
        )
    with pytest.raises(ValueError, match="boolean"):
        Observations(ids, np.ones((2, 1, 3)), (0.75,), np.ones((1, 2, 1, 3)), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="come together"):
        Observations(ids, np.ones((2, 1, 3)), (0.75,), reference_errors=np.ones((1, 2, 1, 3)))
    with pytest.raises(ValueError, match="similarities must have shape"):
        Observations(ids, similarities=np.ones((3, 2)))
    obs = Observations(ids, np.ones((2, 1, 3)), (0.75,))
    with pytest.raises(ValueError, match=r"mask ratio 0.5 not observed"):
        obs.ratio_indices([0.5])
    assert obs.subset([1]).sample_ids.tolist() == ["b"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        obs.errors = None


# ---------------------------------------------------------------- attacks


def test_threshold_attack_on_weak_difficulty(easy_world):
    data = easy_world
    attack, scores = fitted_scores("threshold", data)
    np.testing.assert_allclose(scores, -data.X_audit.errors.mean(axis=(1, 2)))
    assert auc(data.y_audit, scores) > 0.7
    # the shadow decoder raises every error by exp(0.4): the shadow threshold calls (almost)
    # everything a non-member; with the target's released decoder it transfers
    assert balanced_accuracy(data.y_audit, attack.predict(data.X_audit)) < 0.55
    released = inputs(make_world(seed=1, difficulty=0.3), "released", ["errors"])
    assert balanced_accuracy(released.y_audit, attack.predict(released.X_audit)) > 0.6
    _, one_ratio = fitted_scores("threshold", data, ratios=[0.75])
    np.testing.assert_allclose(one_ratio, -data.X_audit.errors[:, 1].mean(axis=1))


def test_lira_beats_threshold_at_low_fpr_under_strong_difficulty(hard_world):
    data, y = hard_world, hard_world.y_audit
    _, thr = fitted_scores("threshold", data)
    lira, lra = fitted_scores("lira", data)
    assert auc(y, thr) < 0.65
    assert tpr_at_fpr(y, thr, 0.01) < 0.06
    assert tpr_at_fpr(y, lra, 0.01) > 0.3
    assert auc(y, lra) > 0.9
    # the threshold, replayed on shadow model 0, transfers to the target despite its decoder
    # (whose errors are exp(0.4) times higher): that is what the median calibration is for
    assert balanced_accuracy(y, lra >= lira.threshold_) > 0.8
    raw = LiRA(calibrate=False).fit(data.X_fit, data.y_fit)
    raw_scores = raw.score_samples(data.X_audit)
    assert balanced_accuracy(y, raw_scores >= raw.threshold_) < 0.55
    # offline z-scores with pooled variance: calibration moves scores, not their ranking
    assert auc(y, raw_scores) == pytest.approx(auc(y, lra))
    _, mean_log = fitted_scores("lira", data, statistic="mean_log")
    assert auc(y, mean_log) > 0.9


def test_lira_online_and_variance_choices():
    data = inputs(make_world(seed=2, difficulty=1.0, online=True), needs=["errors", "references"])
    X, y = data.X_audit, data.y_audit
    all_out = dataclasses.replace(X, reference_in=np.zeros_like(X.reference_in))
    with pytest.raises(ValueError, match="use mode='offline'"):
        LiRA(mode="online").fit(data.X_fit, data.y_fit).score_samples(all_out)
    online, scores = fitted_scores("lira", data, mode="online")
    assert auc(y, scores) > 0.85
    assert balanced_accuracy(y, scores >= online.threshold_) > 0.75
    _, offline = fitted_scores("lira", data)
    assert auc(y, offline) > 0.85
    # per-sample variances (every sample has >= 2 OUT models here) still rank well
    _, per_sample = fitted_scores("lira", data, per_sample_variance_min=2)
    assert auc(y, per_sample) > 0.8


def test_lira_threshold_defaults_without_references(hard_world):
    data = hard_world
    bare = Observations(data.X_fit.sample_ids, data.X_fit.errors, data.X_fit.mask_ratios)
    lira = LiRA().fit(bare, data.y_fit)
    assert lira.threshold_ == 0.0
    assert LiRA().fit(data.X_fit).threshold_ == 0.0  # no labels: the natural threshold
    with pytest.raises(ValueError, match="needs references to score"):
        lira.score_samples(Observations(bare.sample_ids, bare.errors, bare.mask_ratios))


def test_offline_lira_fits_with_a_single_reference_model():
    rng = np.random.default_rng(0)
    n = 40
    labels = np.arange(n) < n // 2
    X = Observations(
        sample_ids=np.array([f"s{i}" for i in range(n)]),
        errors=rng.lognormal(size=(n, 1, 2)) * np.where(labels, 0.8, 1.0)[:, None, None],
        mask_ratios=(0.75,),
        reference_errors=rng.lognormal(size=(1, n, 1, 2)),
        reference_in=(np.arange(n) % 2 == 0)[None, :],
    )
    attack = build_attack("lira").fit(X, labels)
    # the replay scores only the 20 samples the single reference model left out
    assert np.isfinite(attack.threshold_) and attack.threshold_ != 0.0


def test_rmia(hard_world):
    data, X, y = hard_world, hard_world.X_audit, hard_world.y_audit
    _, thr = fitted_scores("threshold", data)
    rmia, scores = fitted_scores("rmia", data)
    assert rmia.a_ in {round(a, 1) for a in np.linspace(0, 1, 11)}
    assert scores.min() >= 0 and scores.max() <= 1
    assert auc(y, scores) > 0.85 > auc(y, thr) + 0.2
    assert tpr_at_fpr(y, scores, 0.01) > tpr_at_fpr(y, thr, 0.01)
    assert balanced_accuracy(y, scores >= rmia.threshold_) > 0.75
    # with gamma = 1 and the scored samples as population, score = rank of LR / (N - 1)
    lr = rmia.likelihood_ratio(X)
    ranks = np.argsort(np.argsort(lr))
    np.testing.assert_allclose(scores, ranks / (len(X) - 1))
    fixed = RMIA(a=0.3).fit(data.X_fit, data.y_fit)
    assert fixed.a_ == 0.3
    pop, pop_scores = fitted_scores("rmia", data, population="shadow_nonmembers")
    assert len(pop.population_lr_) == (~data.y_fit).sum()
    assert auc(y, pop_scores) == pytest.approx(auc(y, scores), abs=0.01)
    with pytest.raises(ValueError, match="tunes a on labelled shadow data"):
        RMIA().fit(data.X_fit)
    online = inputs(make_world(seed=2, online=True), needs=["errors", "references"])
    _, online_scores = fitted_scores("rmia", online, mode="online", a=0.5)
    assert auc(online.y_audit, online_scores) > 0.85


def test_classifier_attack(easy_world):
    data = easy_world
    for model in ("logreg", "mlp"):
        attack, scores = fitted_scores("classifier", data, model=model, seed=3)
        assert auc(data.y_audit, scores) > 0.7, model
        features = sorted_error_features(data.X_audit, None)
        proba = attack.pipeline_.predict_proba(features)[:, 1]
        if model == "logreg":  # log-odds of the member probability
            np.testing.assert_allclose(1 / (1 + np.exp(-scores)), proba, rtol=1e-9, atol=1e-12)
        else:
            np.testing.assert_array_equal(scores, proba)
        again = ClassifierAttack(model=model, seed=3).fit(data.X_fit, data.y_fit)
        np.testing.assert_array_equal(scores, again.score_samples(data.X_audit))
    one = data.X_audit.subset(np.arange(len(data.X_audit)))
    one = Observations(one.sample_ids, one.errors[:, :1], one.mask_ratios[:1])
    with pytest.raises(ValueError, match=r"fitted on \(2, 8\) \(ratios, masks\)"):
        attack.score_samples(one)


def test_global_threshold_and_random(easy_world):
    data, X = easy_world, easy_world.X_audit
    glob = GlobalThresholdAttack().fit(data.X_fit)
    scores = glob.score_samples(X)
    _, thr = fitted_scores("threshold", data)
    np.testing.assert_allclose(scores, thr)
    assert not hasattr(glob, "threshold_")  # transductive: the threshold depends on X
    assert glob.threshold_for(X) == pytest.approx(-np.median(X.errors.mean(axis=(1, 2))))
    assert glob.predict(X).sum() == len(X) // 2
    assert glob.threshold_for(X.subset(np.arange(10))) != glob.threshold_for(X)
    rand = RandomGuess(seed=5).fit(data.X_fit)
    scores = rand.score_samples(X)
    assert rand.threshold_ == 0.5
    assert abs(auc(data.y_audit, scores) - 0.5) < 0.07
    np.testing.assert_array_equal(scores, RandomGuess(seed=5).fit(X).score_samples(X))
    assert not np.array_equal(scores, RandomGuess(seed=6).fit(X).score_samples(X))


def encoder_data(seed: int, n: int = 300, views: int = 5):
    """Members' augmented views agree more (cosine similarity + 0.1) than non-members'."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) < n // 2
    base = rng.normal(0.6, 0.08, n) + 0.1 * labels
    sim = np.clip(base[:, None] + rng.normal(0, 0.1, (n, views * (views - 1) // 2)), -1, 1)
    return Observations(np.array([f"e{i}" for i in range(n)]), similarities=sim), labels


def test_encodermi_variants():
    (fit, y_fit), (audit, y) = encoder_data(0), encoder_data(1)
    for name in ("encodermi_vector", "encodermi_threshold", "encodermi_set"):
        attack = build_attack(name).fit(fit, y_fit)
        scores = attack.score_samples(audit)
        assert auc(y, scores) > 0.7, name
        assert balanced_accuracy(y, scores >= attack.threshold_) > 0.65, name
    mean_sim = EncoderMI(variant="threshold").fit(fit, y_fit).score_samples(audit)
    np.testing.assert_allclose(mean_sim, audit.similarities.mean(axis=1))
    # the set variant is permutation invariant and takes sets of another size
    attack = EncoderMI(variant="set").fit(fit, y_fit)
    perm = np.random.default_rng(0).permutation(audit.similarities.shape[1])
    shuffled = dataclasses.replace(audit, similarities=audit.similarities[:, perm])
    np.testing.assert_allclose(attack.score_samples(shuffled), attack.score_samples(audit))
    bigger, y_big = encoder_data(2, views=7)
    assert auc(y_big, attack.score_samples(bigger)) > 0.7
    with pytest.raises(ValueError, match="fitted on 10 similarities"):
        EncoderMI(variant="vector").fit(fit, y_fit).score_samples(bigger)
    with pytest.raises(ValueError, match="encodermi needs similarities to fit; X has errors"):
        EncoderMI().fit(Observations(["a", "b"], np.ones((2, 1, 1)), (0.5,)), [1, 0])


def similarity_sets(member: float, nonmember: float, noise: float, seed: int):
    """100 members and 100 non-members whose 10 view similarities centre on the two values."""
    rng = np.random.default_rng(seed)
    labels = np.arange(200) < 100
    base = np.where(labels, member, nonmember)
    sim = np.clip(base[:, None] + rng.normal(0, noise, (200, 10)), -1, 1)
    return Observations(np.array([f"v{i}" for i in range(200)]), similarities=sim), labels


@pytest.mark.parametrize("variant", ["vector", "set"])
def test_encodermi_ranks_by_log_odds_where_probabilities_saturate(variant):
    """The audited encoder's views agree far more than the shadow's (it is more overfit): the
    shadow-fitted logistic regression gives every audited sample probability 1.0, yet its
    log-odds still order members above non-members."""
    shadow, y_shadow = similarity_sets(0.62, 0.58, 0.005, seed=0)
    audit, y = similarity_sets(0.97, 0.93, 0.005, seed=1)
    attack = EncoderMI(variant=variant).fit(shadow, y_shadow)
    features = attack._features(audit.similarities)
    assert (attack.pipeline_.predict_proba(features)[:, 1] == 1.0).all()
    scores = attack.score_samples(audit)
    np.testing.assert_allclose(scores, attack.pipeline_.decision_function(features))
    assert len(np.unique(scores)) == 200
    assert auc(y, scores) == 1.0
    assert tpr_at_fpr(y, scores, 0.01) == 1.0


def test_encodermi_from_the_embeddings_table():
    world = make_world(seed=4, n=80)
    data = build_inputs(
        None, world.manifest, world.membership, "shadow", ["similarities"], world.embeddings
    )
    assert data.X_audit.parts == {"similarities"} and data.X_audit.similarities.shape == (160, 10)
    row = world.embeddings.filter(
        (pl.col("model") == "target") & (pl.col("sample_id") == data.X_audit.sample_ids[5])
    )
    np.testing.assert_array_equal(data.X_audit.similarities[5], row["similarities"].to_list()[0])
    _, scores = fitted_scores("encodermi_threshold", data)
    assert auc(data.y_audit, scores) > 0.75
    lacking = world.embeddings.filter(pl.col("sample_id") != data.X_fit.sample_ids[0])
    with pytest.raises(ValueError, match=r"1 samples lack 'shadow0' embeddings"):
        build_inputs(None, world.manifest, world.membership, "shadow", ["similarities"], lacking)
