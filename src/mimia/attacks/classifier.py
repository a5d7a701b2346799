"""A learned attack on the whole error profile: for each mask ratio, the K per-mask errors
sorted ascending (masks are exchangeable, sorting makes the features permutation invariant),
concatenated over ratios, log-transformed and standardised, fed to a scikit-learn classifier
trained on the shadow model's members vs non-members. Score: the member log-odds (logreg) or
probability (mlp). scikit-learn is imported when fitting, not with the registry."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from mimia.attacks.base import Attack, check_choice, check_int, check_ratios, register
from mimia.attacks.calibration import log_errors
from mimia.attacks.data import Observations

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline

CLASSIFIERS = ("logreg", "mlp")


def make_classifier(model: str, seed: int, log: bool = False) -> Pipeline:
    """``[log] -> StandardScaler -> logistic regression | MLP``, seeded."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler

    if model == "logreg":
        clf = LogisticRegression(C=1.0, max_iter=2000, random_state=seed)
    elif model == "mlp":
        clf = MLPClassifier(
            hidden_layer_sizes=(64, 32),
            alpha=1e-3,
            max_iter=500,
            early_stopping=True,
            validation_fraction=0.2,
            n_iter_no_change=20,
            random_state=seed,
        )
    else:
        raise ValueError(f"classifier model must be one of {CLASSIFIERS}, got {model!r}")
    steps = [("log", FunctionTransformer(log_errors))] if log else []
    return Pipeline([*steps, ("scale", StandardScaler()), ("clf", clf)])


def member_scores(pipeline: Pipeline, x: np.ndarray, model: str) -> np.ndarray:
    """Member log-odds (logreg) or probability (mlp) of a fitted pipeline."""
    member_col = list(pipeline.classes_).index(True)
    if model == "logreg":
        # Log-odds, not probabilities: probabilities saturate at 1.0 and the resulting ties
        # at the top of the ranking cost TPR at low FPR. Same order otherwise.
        logit = pipeline.decision_function(x)
        return logit if member_col == 1 else -logit
    return pipeline.predict_proba(x)[:, member_col]


def sorted_error_features(X: Observations, ratios: Sequence[float] | float | None) -> np.ndarray:
    """``[N, R' * K]``: per ratio the K errors sorted ascending, ratios concatenated."""
    errors = np.sort(X.errors[:, X.ratio_indices(ratios)], axis=2)
    return errors.reshape(len(X), -1)


@register
class ClassifierAttack(Attack):
    """Classifier (``model``: ``"logreg"`` or ``"mlp"``) on sorted log per-mask errors.

    Fitted: ``pipeline_`` (scikit-learn), ``shape_`` (mask ratios, masks) it was fitted on.
    """

    name = "classifier"

    def __init__(
        self,
        model: str = "logreg",
        ratios: Sequence[float] | float | None = None,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.ratios = ratios
        self.seed = seed

    def _validate_params(self) -> None:
        check_choice(self.name, "model", self.model, CLASSIFIERS)
        check_ratios(self.name, self.ratios)
        check_int(self.name, "seed", self.seed, 0)

    def _fit(self, X: Observations, y: np.ndarray) -> None:
        self.shape_ = (len(X.ratio_indices(self.ratios)), X.num_masks)
        x = sorted_error_features(X, self.ratios)
        self.pipeline_ = make_classifier(self.model, self.seed, log=True).fit(x, y)

    def _score_samples(self, X: Observations) -> np.ndarray:
        shape = (len(X.ratio_indices(self.ratios)), X.num_masks)
        if shape != self.shape_:
            raise ValueError(
                f"{self.name} was fitted on {self.shape_} (ratios, masks) but scores {shape}"
            )
        return member_scores(self.pipeline_, sorted_error_features(X, self.ratios), self.model)
