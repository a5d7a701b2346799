"""EncoderMI (Liu, Jia, Qu, Gong, CCS 2021): membership from how well an encoder's embeddings
of V augmented views of an image agree. An encoder pre-trained on an image has seen (and, with
contrastive or masked objectives, learned invariance on) its augmentations, so members' views
embed more alike. The features are the ``P = V(V-1)/2`` pairwise cosine similarities
``Observations.embeddings_similarity``; higher score = member.

Variants (``variant``):

* ``"vector"`` (EncoderMI-V): a classifier on the similarities sorted ascending (sorting makes
  the vector independent of the arbitrary order of views), trained on the shadow encoder's
  members vs non-members; score = member probability.
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

from mimia.attacks.base import Attack, Observations, register
from mimia.attacks.classifier import CLASSIFIERS, make_classifier

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
    """EncoderMI over embedding similarities of augmented views (see module doc)."""

    name = "encodermi"
    requires_embeddings = True

    def __init__(
        self, variant: str = "vector", model: str = "logreg", bins: int = 16, seed: int = 0
    ) -> None:
        if variant not in VARIANTS:
            raise ValueError(f"EncoderMI variant must be one of {VARIANTS}, got {variant!r}")
        if model not in CLASSIFIERS:
            raise ValueError(f"classifier model must be one of {CLASSIFIERS}, got {model!r}")
        if bins < 2:
            raise ValueError(f"bins must be >= 2, got {bins}")
        super().__init__(variant=variant, model=model, bins=bins, seed=seed)
        self.variant, self.model, self.bins, self.seed = variant, model, int(bins), int(seed)
        self.pipeline = None
        self._num_pairs: int | None = None

    def _features(self, obs: Observations) -> np.ndarray:
        sim = obs.embeddings_similarity
        if self.variant == "vector":
            if self._num_pairs is not None and sim.shape[1] != self._num_pairs:
                raise ValueError(
                    f"encodermi (vector) was fitted on {self._num_pairs} similarities per "
                    f"sample but got {sim.shape[1]}; the set variant accepts any number"
                )
            return np.sort(sim, axis=1)
        return set_features(sim, self.bins)

    def _fit(self, shadow: Observations | None) -> None:
        assert shadow is not None and shadow.labels is not None
        self._check_inputs(shadow, "shadow")
        if self.variant == "threshold":
            return
        self._num_pairs = shadow.embeddings_similarity.shape[1]
        self.pipeline = make_classifier(self.model, self.seed).fit(
            self._features(shadow), shadow.labels
        )

    def _score(self, obs: Observations) -> np.ndarray:
        if self.variant == "threshold":
            return obs.embeddings_similarity.mean(axis=1)
        member_col = list(self.pipeline.classes_).index(True)
        return self.pipeline.predict_proba(self._features(obs))[:, member_col]


@register
class EncoderMIVector(EncoderMI):
    """``encodermi`` with ``variant="vector"`` (registry name for configs)."""

    name = "encodermi_vector"

    def __init__(self, model: str = "logreg", seed: int = 0) -> None:
        super().__init__(variant="vector", model=model, seed=seed)


@register
class EncoderMIThreshold(EncoderMI):
    """``encodermi`` with ``variant="threshold"``."""

    name = "encodermi_threshold"

    def __init__(self) -> None:
        super().__init__(variant="threshold")


@register
class EncoderMISet(EncoderMI):
    """``encodermi`` with ``variant="set"``."""

    name = "encodermi_set"

    def __init__(self, model: str = "logreg", bins: int = 16, seed: int = 0) -> None:
        super().__init__(variant="set", model=model, bins=bins, seed=seed)
