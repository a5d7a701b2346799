"""A learned attack on the whole error profile: for each mask ratio, the K per-mask errors
sorted ascending (masks are exchangeable, sorting makes the features permutation invariant),
concatenated over ratios, log-transformed and standardised, fed to a scikit-learn classifier
trained on the shadow model's members vs non-members. Score: the member log-odds (logreg) or
probability (mlp)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

from mimia.attacks.base import Attack, Observations, log_errors, register, select_errors

CLASSIFIERS = ("logreg", "mlp")


def make_classifier(model: str, seed: int, log: bool = False) -> Pipeline:
    """``[log] -> StandardScaler -> logistic regression | MLP``, seeded."""
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


def sorted_error_features(obs: Observations, ratios: Sequence[float] | float | None) -> np.ndarray:
    """``[N, R' * K]``: per ratio the K errors sorted ascending, ratios concatenated."""
    errors = np.sort(select_errors(obs, ratios), axis=2)
    return errors.reshape(len(obs), -1)


@register
class ClassifierAttack(Attack):
    """Classifier (``model``: ``"logreg"`` or ``"mlp"``) on sorted log per-mask errors."""

    name = "classifier"

    def __init__(
        self,
        model: str = "logreg",
        ratios: Sequence[float] | float | None = None,
        seed: int = 0,
    ) -> None:
        if model not in CLASSIFIERS:
            raise ValueError(f"classifier model must be one of {CLASSIFIERS}, got {model!r}")
        super().__init__(model=model, ratios=ratios, seed=seed)
        self.model, self.ratios, self.seed = model, ratios, int(seed)
        self.pipeline: Pipeline | None = None
        self._shape: tuple[int, int] | None = None

    def _fit(self, shadow: Observations | None) -> None:
        assert shadow is not None and shadow.labels is not None
        x = sorted_error_features(shadow, self.ratios)
        self._shape = (len(shadow.ratio_indices(self.ratios)), shadow.num_masks)
        self.pipeline = make_classifier(self.model, self.seed, log=True).fit(x, shadow.labels)

    def _score(self, obs: Observations) -> np.ndarray:
        assert self.pipeline is not None
        shape = (len(obs.ratio_indices(self.ratios)), obs.num_masks)
        if shape != self._shape:
            raise ValueError(
                f"{self.name} was fitted on {self._shape} (ratios, masks) but scores {shape}"
            )
        x = sorted_error_features(obs, self.ratios)
        member_col = list(self.pipeline.classes_).index(True)
        if self.model == "logreg":
            # Log-odds, not probabilities: probabilities saturate at 1.0 and the resulting ties
            # at the top of the ranking cost TPR at low FPR. Same order otherwise.
            logit = self.pipeline.decision_function(x)
            return logit if member_col == 1 else -logit
        return self.pipeline.predict_proba(x)[:, member_col]
