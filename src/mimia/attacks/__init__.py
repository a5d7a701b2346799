"""Membership inference attacks on per-mask reconstruction errors (and EncoderMI on view
similarities), as scikit-learn-style estimators.

``build_attack(kind, **params)`` makes an attack from the registry ``ATTACKS``; it is
``fit(X, y)`` on the adversary's data and ``score_samples(X)`` scores the audited model's
``Observations``. ``mimia.attacks.inputs.build_inputs`` makes both from the pipeline's tables.
Importing this package imports neither torch nor scikit-learn (the workflow validates configs
with ``validate_entry`` when it builds the DAG).
"""

from mimia.attacks.base import (
    ATTACKS,
    Attack,
    attack_class,
    build_attack,
    needs_fit_references,
    needs_online_references,
    register,
    requires_embeddings,
    validate_entry,
)
from mimia.attacks.baselines import GlobalThresholdAttack, RandomGuess
from mimia.attacks.classifier import ClassifierAttack
from mimia.attacks.data import PARTS, Observations
from mimia.attacks.encodermi import EncoderMI, EncoderMISet, EncoderMIThreshold, EncoderMIVector
from mimia.attacks.lira import LiRA
from mimia.attacks.lira_reference import LiRAReference
from mimia.attacks.rmia import RMIA
from mimia.attacks.threshold import ThresholdAttack

__all__ = [
    "ATTACKS",
    "PARTS",
    "RMIA",
    "Attack",
    "ClassifierAttack",
    "EncoderMI",
    "EncoderMISet",
    "EncoderMIThreshold",
    "EncoderMIVector",
    "GlobalThresholdAttack",
    "LiRA",
    "LiRAReference",
    "Observations",
    "RandomGuess",
    "ThresholdAttack",
    "attack_class",
    "build_attack",
    "needs_fit_references",
    "needs_online_references",
    "register",
    "requires_embeddings",
    "validate_entry",
]
