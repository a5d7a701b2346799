"""Membership inference attacks on per-mask reconstruction errors.

``build_attack(name, **params)`` makes an attack from the registry ``ATTACKS``; every attack is
``fit`` on the adversary's shadow observations and ``score``s the audited model's.
"""

from mimia.attacks.base import (
    ATTACKS,
    Attack,
    Observations,
    build_attack,
    observations_from_errors,
    register,
)
from mimia.attacks.baselines import GlobalThresholdAttack, RandomGuess
from mimia.attacks.classifier import ClassifierAttack
from mimia.attacks.encodermi import EncoderMI, EncoderMISet, EncoderMIThreshold, EncoderMIVector
from mimia.attacks.lira import LiRA
from mimia.attacks.rmia import RMIA
from mimia.attacks.threshold import ThresholdAttack

__all__ = [
    "ATTACKS",
    "RMIA",
    "Attack",
    "ClassifierAttack",
    "EncoderMI",
    "EncoderMISet",
    "EncoderMIThreshold",
    "EncoderMIVector",
    "GlobalThresholdAttack",
    "LiRA",
    "Observations",
    "RandomGuess",
    "ThresholdAttack",
    "build_attack",
    "observations_from_errors",
    "register",
]


def validate_entry(name, entry, mask_ratios):
    kind = (entry or {}).get("attack", name)
    if kind not in ATTACKS:
        raise ValueError(f"attacks.{name}: unknown attack {kind!r}; known: {sorted(ATTACKS)}")
    params = {k: v for k, v in (entry or {}).items() if k != "attack"}
    return kind, params


def requires_embeddings(kind):
    return ATTACKS[kind].requires_embeddings


def needs_online_references(kind, params):
    return params.get("mode") == "online"
