"""The attacks as scikit-learn-style estimators: parameters round-trip through get_params,
set_params and ``sklearn.base.clone``; scoring takes no labels and changes no state; config
entries are validated; a new attack is one class and a registry entry."""

from __future__ import annotations

import inspect
import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted
from test_attacks import inputs, make_world, write_world

from mimia.attacks import (
    ATTACKS,
    Attack,
    attack_class,
    build_attack,
    needs_online_references,
    register,
    requires_embeddings,
    validate_entry,
)
from mimia.attacks.inputs import build_inputs
from mimia.attacks.stage import attack_stage
from mimia.metrics import auc

# Every registered attack, with its defaults and with every parameter changed.
VARIANTS = [
    ("threshold", {}),
    ("threshold", {"ratios": [0.5]}),
    ("classifier", {"model": "logreg"}),
    ("classifier", {"model": "mlp", "seed": 2, "ratios": 0.75}),
    ("lira", {}),
    (
        "lira",
        {
            "mode": "online",
            "statistic": "mean_log",
            "calibrate": False,
            "per_sample_variance_min": 4,
        },
    ),
    ("lira_reference", {}),
    (
        "lira_reference",
        {"mode": "online", "fix_variance": True, "statistic": "log_mean", "calibrate": True},
    ),
    ("rmia", {}),
    (
        "rmia",
        {
            "a": 0.3,
            "gamma": 0.9,
            "temperature": 0.05,
            "mode": "online",
            "population": "shadow_nonmembers",
            "ratios": [0.5, 0.75],
        },
    ),
    ("global_threshold", {}),
    ("global_threshold", {"quantile": 0.3, "ratios": [0.75]}),
    ("random", {}),
    ("random", {"seed": 4}),
    ("encodermi", {}),
    ("encodermi", {"variant": "set", "model": "mlp", "bins": 8, "seed": 1}),
    ("encodermi_vector", {}),
    ("encodermi_vector", {"model": "mlp", "seed": 2}),
    ("encodermi_threshold", {}),
    ("encodermi_set", {}),
    ("encodermi_set", {"bins": 4, "seed": 3}),
]
IDS = [f"{kind}-{i}" for i, (kind, _) in enumerate(VARIANTS)]


@pytest.fixture(scope="module")
def online_data():
    """Reference models trained on halves that include the target samples: both offline and
    online attacks run on it (9 shadow models: in this draw every target sample has IN and OUT
    reference models, which the reference-code LiRA estimator needs)."""
    return inputs(make_world(seed=5, n=60, num_shadow=9, online=True))


def test_every_registered_attack_is_covered():
    assert {kind for kind, _ in VARIANTS} == set(ATTACKS)


@pytest.mark.parametrize(("kind", "params"), VARIANTS, ids=IDS)
def test_parameters_round_trip_and_clone(kind, params, online_data):
    attack = build_attack(kind, **params)
    defaults = {
        p.name: p.default
        for p in inspect.signature(type(attack).__init__).parameters.values()
        if p.name != "self"
    }
    assert attack.get_params() == {**defaults, **params}
    assert attack.get_params(deep=False) == attack.get_params()
    for key, value in params.items():
        assert getattr(attack, key) is value  # stored as given, no logic in __init__
    rebuilt = type(attack)().set_params(**attack.get_params())
    assert rebuilt.get_params() == attack.get_params()
    assert repr(rebuilt) == repr(attack)

    with pytest.raises(NotFittedError):
        check_is_fitted(attack)
    with pytest.raises(RuntimeError, match="call fit"):
        attack.score_samples(online_data.X_audit)
    attack.fit(online_data.X_fit, online_data.y_fit)
    check_is_fitted(attack)
    twin = clone(attack)
    assert type(twin) is type(attack) and twin.get_params() == attack.get_params()
    with pytest.raises(NotFittedError):
        check_is_fitted(twin)
    fitted = [k for k in vars(attack) if k not in attack.get_params()]
    assert fitted and all(k.endswith("_") for k in fitted), fitted
    # a clone fitted on the same data scores the same
    scores = attack.score_samples(online_data.X_audit)
    twin.fit(online_data.X_fit, online_data.y_fit)
    np.testing.assert_array_equal(twin.score_samples(online_data.X_audit), scores)


@pytest.mark.parametrize(("kind", "params"), VARIANTS, ids=IDS)
def test_scoring_takes_no_labels_and_changes_nothing(kind, params, online_data):
    cls = attack_class(kind)
    assert list(inspect.signature(cls.score_samples).parameters) == ["self", "X"]
    attack = build_attack(kind, **params).fit(online_data.X_fit, online_data.y_fit)
    X = online_data.X_audit
    state = pickle.dumps(attack)
    arrays = pickle.dumps(X)
    first = attack.score_samples(X)
    threshold = attack.threshold_for(X)
    attack.predict(X)
    assert pickle.dumps(attack) == state
    assert pickle.dumps(X) == arrays
    np.testing.assert_array_equal(attack.score_samples(X), first)
    assert attack.threshold_for(X) == threshold and np.isfinite(threshold)
    with pytest.raises(TypeError):
        attack.score_samples(X, online_data.y_audit)
    assert attack.calibration in ("shadow", "transductive", "fixed")


def test_refit_forgets_the_previous_fit(online_data):
    rmia = build_attack("rmia", population="shadow_nonmembers").fit(
        online_data.X_fit, online_data.y_fit
    )
    assert hasattr(rmia, "population_lr_")
    rmia.set_params(population="observations").fit(online_data.X_fit, online_data.y_fit)
    assert not hasattr(rmia, "population_lr_")


def test_importing_the_registry_imports_neither_torch_nor_sklearn():
    code = (
        "import sys, mimia.attacks; "
        "print(sorted(m for m in ('torch', 'sklearn', 'scipy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---------------------------------------------------------------- config entries


def test_validate_entry_accepts_and_resolves():
    assert validate_entry("lira", None, [0.75]) == ("lira", {})
    assert validate_entry("classifier_mlp", {"attack": "classifier", "model": "mlp"}, [0.75]) == (
        "classifier",
        {"model": "mlp"},
    )
    entry = {"attack": "threshold", "ratios": [0.5]}
    assert validate_entry("threshold_r50", entry, [0.5, 0.75]) == ("threshold", {"ratios": [0.5]})
    assert entry == {"attack": "threshold", "ratios": [0.5]}  # the config is not modified
    assert (
        validate_entry("t", {"attack": "threshold", "ratios": 0.75}, [0.75000001])[0] == "threshold"
    )


@pytest.mark.parametrize(
    ("name", "entry", "message"),
    [
        (
            "threshold",
            {"ratio": [0.5]},
            r"attacks.threshold: 'ratio' is not a parameter of threshold; its parameters: ratios$",
        ),
        (
            "encodermi_threshold",
            {"bins": 8},
            "'bins' is not a parameter of encodermi_threshold; it takes no parameters",
        ),
        ("lira2", None, r"attacks.lira2: unknown attack 'lira2'; known attacks: classifier, "),
        ("x", {"attack": "LiRA"}, "attacks.x: unknown attack 'LiRA'"),
        (
            "classifier_svm",
            {"attack": "classifier", "model": "svm"},
            r"attacks.classifier_svm: classifier: model must be one of \['logreg', 'mlp'\], "
            r"got 'svm'",
        ),
        ("lira", {"mode": "onlin"}, r"lira: mode must be one of \['offline', 'online'\]"),
        ("lira", {"statistic": "mean"}, "lira: statistic must be one of"),
        ("lira", {"calibrate": "yes"}, "lira: calibrate must be true or false"),
        ("lira_reference", {"statistic": "logit"}, "lira_reference: statistic must be one of"),
        ("rmia", {"a": 2}, r"rmia: a must lie in \[0, 1\]"),
        ("rmia", {"population": "all"}, "rmia: population must be one of"),
        ("global_threshold", {"quantile": 1.5}, r"quantile must lie in \[0, 1\]"),
        ("encodermi", {"variant": "graph"}, "encodermi: variant must be one of"),
        ("random", {"seed": "x"}, "random: seed must be an integer >= 0"),
        ("threshold", {"ratios": []}, "ratios must be null, a mask ratio or a non-empty list"),
        ("threshold", {"ratios": [1.5]}, r"ratios must lie in \(0, 1\)"),
        (
            "threshold",
            {"ratios": [0.5, 0.75]},
            r"attacks.threshold: ratios \[0.5\] are not among the extracted mask ratios \[0.75\]",
        ),
        ("threshold", [0.5], "attacks.threshold: expected a mapping"),
    ],
)
def test_validate_entry_rejects(name, entry, message):
    with pytest.raises(ValueError, match=message):
        validate_entry(name, entry, [0.75])


def test_what_the_workflow_asks_of_the_registry():
    assert [k for k in sorted(ATTACKS) if requires_embeddings(k)] == [
        "encodermi",
        "encodermi_set",
        "encodermi_threshold",
        "encodermi_vector",
    ]
    with pytest.raises(ValueError, match="unknown attack 'nope'"):
        requires_embeddings("nope")
    online = [
        ("lira", {"mode": "online"}),
        ("rmia", {"mode": "online", "a": 0.5}),
        ("lira_reference", {"mode": "online"}),
    ]
    for kind, params in online:
        assert needs_online_references(kind, params)
    for kind in sorted(ATTACKS):
        assert not needs_online_references(kind, {}), kind
    assert not needs_online_references("lira", None)


# ---------------------------------------------------------------- a new attack


class ReferenceGap(Attack):
    """A new attack in a few lines: log error below the reference models' mean log error."""

    name = "reference_gap"
    inputs = frozenset({"errors", "references"})

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def _validate_params(self) -> None:
        if not self.scale > 0:
            raise ValueError(f"{self.name}: scale must be > 0, got {self.scale!r}")

    def _score_samples(self, X):
        own = np.log(X.errors.mean(axis=(1, 2)))
        return self.scale * (np.log(X.reference_errors.mean(axis=(2, 3))).mean(axis=0) - own)


@pytest.fixture
def reference_gap():
    register(ReferenceGap)
    yield ReferenceGap
    del ATTACKS["reference_gap"]


def test_a_new_attack_is_a_class_and_a_registry_entry(reference_gap, tmp_path):
    world = make_world(seed=0, n=100)
    entry = {"attack": "reference_gap", "scale": 2.0}
    kind, params = validate_entry("gap", entry, [0.5, 0.75])
    with pytest.raises(ValueError, match=r"attacks.gap: reference_gap: scale must be > 0"):
        validate_entry("gap", {"attack": "reference_gap", "scale": -1}, [0.5])
    attack = build_attack(kind, **params)
    data = build_inputs(
        world.errors, world.manifest, world.membership, "shadow", attack_class(kind).inputs
    )
    scores = attack.fit(data.X_fit, data.y_fit).score_samples(data.X_audit)
    assert auc(data.y_audit, scores) > 0.85  # per-sample calibration beats difficulty
    assert clone(attack).get_params() == {"scale": 2.0}
    # and the stage runs it from the config entry alone
    paths = write_world(world, tmp_path)
    record = attack_stage(
        errors=paths["errors"],
        manifest=paths["manifest"],
        membership=paths["membership"],
        scores=tmp_path / "gap.parquet",
        roc=tmp_path / "gap-roc.parquet",
        metrics=tmp_path / "gap.json",
        decoder="shadow",
        attack="gap",
        params=entry,
        metrics_config={"n_bootstrap": 0},
        seed=0,
    )
    assert record["auc"] == pytest.approx(auc(data.y_audit, scores))
    assert json.loads((tmp_path / "gap.json").read_text())["attack"] == "gap"
