"""EncoderMI (Liu, Jia, Qu, Gong, CCS 2021): membership from how well an encoder's embeddings
of V augmented views of an image agree. An encoder pre-trained on an image has seen (and, with
contrastive or masked objectives, learned invariance on) its augmentations, so members' views
embed more alike. The features are the ``P = V(V-1)/2`` pairwise cosine similarities
``Observations.similarities``; higher score = member.

Variants (``variant``):

* ``"vector"`` (EncoderMI-V): a classifier on the similarities sorted ascending (sorting makes
  the vector independent of the arbitrary order of views), trained on the shadow encoder's
  members vs non-members; score = member log-odds (logreg) or probability (mlp), as in
  ``classifier``.
* ``"threshold"`` (EncoderMI-T): score = mean similarity; the threshold is the one that best
  separates shadow members from non-members.
* ``"set"`` (EncoderMI-S): the paper feeds the similarities as a *set* to a permutation
  invariant (DeepSets-style) classifier ``rho(sum_i phi(s_i))``. Without a deep-learning stack
  here, ``phi`` is fixed rather than learned: a soft histogram (``bins`` Gaussian kernels on
  [-1, 1]) plus the first four moments, mean-pooled over the set; ``rho`` is the scikit-learn
  classifier. It is exactly permutation invariant and accepts sets of any size (V may differ
  between shadow and target), unlike the vector variant; it is a faithful instance of the
  architecture class with a non-learned ``phi``, not a reproduction of the paper's network.
"""

from __future__ import annotations

import numpy as np

from mimia.attacks.base import Attack, check_choice, check_int, register
from mimia.attacks.classifier import CLASSIFIERS, make_classifier, member_scores
from mimia.attacks.data import Observations

VARIANTS = ("vector", "threshold", "set")


def set_features(similarities: np.ndarray, bins: int = 16) -> np.ndarray:
    """Mean-pooled fixed ``phi`` of each similarity set: soft histogram + moments ``[N, F]``."""
    s = np.clip(similarities, -1.0, 1.0)
    centres = np.linspace(-1.0, 1.0, bins)
    width = 2.0 / (bins - 1)
    hist = np.exp(-0.5 * ((s[:, :, None] - centres) / width) ** 2).mean(axis=1)
    mean = s.mean(axis=1, keepdims=True)
    centred = s - mean
    moments = [mean] + [(centred**p).mean(axis=1, keepdims=True) for p in (2, 3, 4)]
    return np.concatenate([hist, *moments], axis=1)


@register
class EncoderMI(Attack):
    """EncoderMI over embedding similarities of augmented views (see module doc).

    Fitted: ``pipeline_`` (vector and set variants) and ``num_pairs_`` (similarities per
    sample of the fit data).
    """

    name = "encodermi"
    inputs = frozenset({"similarities"})

    def __init__(
        self, variant: str = "vector", model: str = "logreg", bins: int = 16, seed: int = 0
    ) -> None:
        self.variant = variant
        self.model = model
        self.bins = bins
        self.seed = seed

    def _validate_params(self) -> None:
        check_choice(self.name, "variant", self.variant, VARIANTS)
        check_choice(self.name, "model", self.model, CLASSIFIERS)
        check_int(self.name, "bins", self.bins, 2)
        check_int(self.name, "seed", self.seed, 0)

    def _features(self, sim: np.ndarray) -> np.ndarray:
        if self.variant == "vector":
            return np.sort(sim, axis=1)
        return set_features(sim, self.bins)

    def _fit(self, X: Observations, y: np.ndarray) -> None:
        self.num_pairs_ = X.similarities.shape[1]
        if self.variant != "threshold":
            self.pipeline_ = make_classifier(self.model, self.seed).fit(
                self._features(X.similarities), y
            )

    def _score_samples(self, X: Observations) -> np.ndarray:
        sim = X.similarities
        if self.variant == "threshold":
            return sim.mean(axis=1)
        if self.variant == "vector" and sim.shape[1] != self.num_pairs_:
            raise ValueError(
                f"{self.name} (vector) was fitted on {self.num_pairs_} similarities per "
                f"sample but got {sim.shape[1]}; the set variant accepts any number"
            )
        return member_scores(self.pipeline_, self._features(sim), self.model)


# The fixed-variant names configs use. Their constructors take only the parameters that
# variant uses; ``variant`` (and unused ones) are class attributes, so get_params / clone
# rebuild them exactly.
@register
class EncoderMIVector(EncoderMI):
    """``encodermi`` with ``variant="vector"``."""

    name = "encodermi_vector"
    variant = "vector"
    bins = 16

    def __init__(self, model: str = "logreg", seed: int = 0) -> None:
        self.model = model
        self.seed = seed


@register
class EncoderMIThreshold(EncoderMI):
    """``encodermi`` with ``variant="threshold"``."""

    name = "encodermi_threshold"
    variant = "threshold"
    model = "logreg"
    bins = 16
    seed = 0

    def __init__(self) -> None:
        pass


@register
class EncoderMISet(EncoderMI):
    """``encodermi`` with ``variant="set"``."""

    name = "encodermi_set"
    variant = "set"

    def __init__(self, model: str = "logreg", bins: int = 16, seed: int = 0) -> None:
        self.model = model
        self.bins = bins
        self.seed = seed
