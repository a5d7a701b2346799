"""The ``Attack`` base class (scikit-learn conventions without importing scikit-learn) and
the registry that configs name attacks by.

An attack is ``fit(X, y)`` on the adversary's data (``X``: ``Observations`` of shadow model 0
on the adversary's own images, with shadow1..N-1 as reference models; ``y``: its membership)
and then ``score_samples(X)`` scores the audited model's observations: higher = more likely
member. ``score_samples`` takes no labels and ``Observations`` carries none, so target labels
cannot reach scoring.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from mimia.attacks.data import PARTS, Observations
from mimia.metrics import best_threshold

CALIBRATIONS = ("shadow", "transductive", "fixed")
"""Where an attack's decision threshold comes from (``Attack.calibration``)."""


class Attack:
    """Base class of every attack; scikit-learn compatible (``sklearn.base.clone`` works).

    Conventions, as scikit-learn's (without subclassing ``BaseEstimator``: importing it costs a
    second, and the workflow imports the registry to validate configs):

    * ``__init__`` stores its keyword arguments under their own names and does nothing else;
      ``get_params`` / ``set_params`` read the parameter names from its signature. Values are
      checked by ``_validate_params`` when fitting (and by ``validate_entry`` for configs).
    * ``fit(X, y)`` learns only from the adversary's data and sets attributes ending in ``_``
      (always ``n_samples_fit_``; ``threshold_`` for inductive attacks).
    * ``score_samples(X)`` returns ``[N]`` finite scores and changes no state.
    * ``threshold_for(X)`` is the decision threshold for scoring ``X`` (predict member iff
      ``score >= threshold``): ``threshold_``, the threshold of best balanced accuracy on the
      adversary's data, except for transductive attacks (``global_threshold``), whose threshold
      is a statistic of ``X`` itself.

    A subclass sets ``name`` (the registry key), ``inputs`` (the ``Observations`` parts it
    scores), implements ``_score_samples`` and, if it learns anything, ``_fit``; it may override
    ``_fit_threshold``.
    """

    name: ClassVar[str] = ""
    inputs: ClassVar[frozenset[str]] = frozenset({"errors"})
    """``Observations`` parts ``score_samples`` needs (a subset of ``PARTS``)."""
    fit_inputs: ClassVar[frozenset[str] | None] = None
    """Parts ``fit`` needs (None: ``inputs``)."""
    needs_labels: ClassVar[bool] = True
    """``fit`` needs ``y`` (otherwise ``y=None`` is allowed)."""

    # -- parameters (scikit-learn semantics) ---------------------------------------------------
    @classmethod
    def _get_param_names(cls) -> list[str]:
        init = cls.__init__
        if init is object.__init__:
            return []
        names = []
        for p in inspect.signature(init).parameters.values():
            if p.name == "self":
                continue
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise TypeError(f"{cls.__name__}.__init__ must list its parameters, not {p}")
            names.append(p.name)
        return sorted(names)

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor parameters and their values (``deep`` is accepted for sklearn)."""
        return {k: getattr(self, k) for k in self._get_param_names()}

    def set_params(self, **params: Any) -> Attack:
        valid = self._get_param_names()
        for key, value in params.items():
            if key not in valid:
                raise ValueError(_unknown_parameter(self.name, key, valid))
            setattr(self, key, value)
        return self

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    def _validate_params(self) -> None:
        """Raise ValueError naming the first bad parameter value."""

    def __sklearn_tags__(self):
        """scikit-learn's estimator tags (``check_is_fitted`` reads them); sklearn is imported
        only when sklearn itself asks."""
        from sklearn.utils import Tags, TargetTags

        return Tags(estimator_type=None, target_tags=TargetTags(required=self.needs_labels))

    # -- properties of a configured attack -----------------------------------------------------
    @property
    def calibration(self) -> str:
        """``"shadow"``: the scores of a sample do not depend on the other audited samples and
        the threshold is chosen on the adversary's data. ``"transductive"``: the scores or the
        threshold use statistics of the audited set itself (its median, its ranks), so the
        threshold transfers, and balanced accuracy means what it says, only when the audited
        set has the adversary's member fraction. ``"fixed"``: a constant threshold."""
        return "shadow"

    def uses_in_references(self) -> bool:
        """Scoring needs reference models trained on the audited samples (online attacks)."""
        return False

    def fits_on_references(self) -> bool:
        """``fit`` needs reference models: on shadow0 those are shadow1..N-1, so the workflow
        needs ``shadow.count >= 2``."""
        return "references" in (self.inputs if self.fit_inputs is None else self.fit_inputs)

    # -- fitting and scoring -------------------------------------------------------------------
    def fit(self, X: Observations, y=None) -> Attack:
        """Learn from the adversary's observations ``X`` and their membership ``y``."""
        self._validate_params()
        for key in [k for k in vars(self) if k.endswith("_") and not k.startswith("__")]:
            delattr(self, key)
        self._check_X(X, self.inputs if self.fit_inputs is None else self.fit_inputs, "fit")
        y = self._check_y(X, y)
        self._fit(X, y)
        threshold = self._fit_threshold(X, y)
        if threshold is not None:
            self.threshold_ = float(threshold)
        self.n_samples_fit_ = len(X)
        return self

    def score_samples(self, X: Observations) -> np.ndarray:
        """Membership scores ``[N]`` of ``X`` (higher = more likely member)."""
        self._check_fitted()
        self._check_X(X, self.inputs, "score")
        scores = np.asarray(self._score_samples(X), dtype=np.float64)
        if scores.shape != (len(X),):
            raise RuntimeError(f"{self.name} returned scores of shape {scores.shape}")
        if not np.isfinite(scores).all():
            raise RuntimeError(
                f"{self.name} produced {int((~np.isfinite(scores)).sum())} non-finite scores"
            )
        return scores

    def threshold_for(self, X: Observations) -> float:
        """The decision threshold for scoring ``X``: ``threshold_`` (see the class doc)."""
        self._check_fitted()
        return self.threshold_

    def predict(self, X: Observations) -> np.ndarray:
        """Boolean member predictions: ``score_samples(X) >= threshold_for(X)``."""
        return self.score_samples(X) >= self.threshold_for(X)

    def _fit(self, X: Observations, y: np.ndarray | None) -> None:
        """Learn from the adversary's data (default: nothing)."""

    def _fit_threshold(self, X: Observations, y: np.ndarray | None) -> float | None:
        """Best balanced-accuracy threshold of the attack's scores on the adversary's data."""
        if y is None:
            raise ValueError(f"{self.name}: choosing a threshold needs labels y")
        return best_threshold(y, self._score_samples(X))

    def _score_samples(self, X: Observations) -> np.ndarray:
        """Scores ``[N]``, higher = more likely member."""
        raise NotImplementedError

    # -- checks --------------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not any(k.endswith("_") and not k.startswith("__") for k in vars(self)):
            raise RuntimeError(f"{self.name}: call fit() before scoring")

    def _check_X(self, X: Observations, parts: frozenset[str], what: str) -> None:
        if not isinstance(X, Observations):
            raise TypeError(f"{self.name}.{what}: X must be Observations, got {type(X).__name__}")
        lacking = sorted(parts - X.parts)
        if lacking:
            raise ValueError(
                f"{self.name} needs {', '.join(lacking)} to {what}; X has "
                f"{', '.join(sorted(X.parts)) or 'only sample ids'}"
            )
        if "references" in parts and X.num_references == 0:
            raise ValueError(f"{self.name}: X has no reference models to {what} with")

    def _check_y(self, X: Observations, y) -> np.ndarray | None:
        if y is None:
            if self.needs_labels:
                raise ValueError(f"{self.name}: fit needs the adversary's membership labels y")
            return None
        y = np.asarray(y)
        if y.shape != (len(X),):
            raise ValueError(f"{self.name}: y must have shape [{len(X)}], got {y.shape}")
        if y.dtype != bool:
            if not np.issubdtype(y.dtype, np.number) or not np.isin(y, (0, 1)).all():
                raise ValueError(f"{self.name}: y must be boolean or 0/1 (1 = member)")
            y = y.astype(bool)
        n1 = int(y.sum())
        if self.needs_labels and (n1 == 0 or n1 == len(y)):
            raise ValueError(
                f"{self.name}: fitting needs members and non-members, got {n1} members of {len(y)}"
            )
        return y


# -- parameter checks shared by attacks ------------------------------------------------------
def check_choice(attack: str, param: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{attack}: {param} must be one of {list(choices)}, got {value!r}")


def check_ratios(attack: str, ratios) -> None:
    """``ratios`` is None (all extracted mask ratios), one ratio or a non-empty list of them."""
    values = [ratios] if isinstance(ratios, int | float) else ratios
    if ratios is None:
        return
    if isinstance(ratios, bool) or not isinstance(values, list | tuple) or not values:
        raise ValueError(
            f"{attack}: ratios must be null, a mask ratio or a non-empty list, got {ratios!r}"
        )
    for r in values:
        if isinstance(r, bool) or not isinstance(r, int | float) or not 0 < r < 1:
            raise ValueError(f"{attack}: ratios must lie in (0, 1), got {r!r}")


def check_int(attack: str, param: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{attack}: {param} must be an integer >= {minimum}, got {value!r}")


def check_bool(attack: str, param: str, value) -> None:
    if not isinstance(value, bool | np.bool_):
        raise ValueError(f"{attack}: {param} must be true or false, got {value!r}")


def _unknown_parameter(attack: str, key: str, valid: Sequence[str]) -> str:
    takes = f"its parameters: {', '.join(valid)}" if valid else "it takes no parameters"
    return f"{key!r} is not a parameter of {attack}; {takes}"


# -- registry --------------------------------------------------------------------------------
ATTACKS: dict[str, type[Attack]] = {}
"""Registry name -> attack class; filled by ``register`` as ``mimia.attacks`` imports."""


def register(cls: type[Attack]) -> type[Attack]:
    """Class decorator adding ``cls`` to ``ATTACKS`` under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a registry name")
    if cls.name in ATTACKS and ATTACKS[cls.name] is not cls:
        raise ValueError(f"attack name {cls.name!r} registered twice")
    unknown = set(cls.inputs) - set(PARTS)
    if unknown:
        raise ValueError(f"{cls.__name__}.inputs lists unknown parts {sorted(unknown)}")
    cls._get_param_names()  # rejects **kwargs constructors early
    ATTACKS[cls.name] = cls
    return cls


def attack_class(kind: str) -> type[Attack]:
    """The registered class of ``kind``; ValueError for unknown names."""
    if kind not in ATTACKS:
        raise ValueError(f"unknown attack {kind!r}; known attacks: {', '.join(sorted(ATTACKS))}")
    return ATTACKS[kind]


def build_attack(kind: str, **params: Any) -> Attack:
    """An attack by registry name with checked parameters (ValueError naming the bad one)."""
    cls = attack_class(kind)
    valid = cls._get_param_names()
    for key in params:
        if key not in valid:
            raise ValueError(_unknown_parameter(kind, key, valid))
    attack = cls(**params)
    attack._validate_params()
    return attack


def validate_entry(name: str, entry: dict | None, mask_ratios: Sequence[float]) -> tuple[str, dict]:
    """Check the config entry ``attacks.<name>``; return ``(registry kind, parameters)``.

    The registry kind is ``entry["attack"]`` or ``name``. Unknown kinds, unknown parameters,
    bad values and ``ratios`` not among the extracted ``mask_ratios`` raise ValueError naming
    the entry.
    """
    if entry is not None and not isinstance(entry, dict):
        raise ValueError(f"attacks.{name}: expected a mapping of parameters, got {entry!r}")
    params = dict(entry or {})
    kind = params.pop("attack", name)
    try:
        build_attack(kind, **params)
    except ValueError as err:
        raise ValueError(f"attacks.{name}: {err}") from None
    ratios = params.get("ratios")
    if ratios is not None:
        have = [float(r) for r in mask_ratios]
        wanted = [ratios] if isinstance(ratios, int | float) else list(ratios)
        absent = [r for r in wanted if not np.isclose(have, float(r), rtol=0, atol=1e-6).any()]
        if absent:
            raise ValueError(
                f"attacks.{name}: ratios {absent} are not among the extracted mask ratios "
                f"{have} (extract.mask_ratios)"
            )
    return kind, params


def requires_embeddings(kind: str) -> bool:
    """The attack scores EncoderMI view similarities (the workflow must embed)."""
    return "similarities" in attack_class(kind).inputs


def needs_fit_references(kind: str, params: dict | None) -> bool:
    """The configured attack cannot be fitted on shadow0 without other reference models."""
    return build_attack(kind, **dict(params or {})).fits_on_references()


def needs_online_references(kind: str, params: dict | None) -> bool:
    """The configured attack needs reference models trained on the audited images (online
    LiRA / RMIA): the workflow then trains reference models with ``shadow.online``."""
    return build_attack(kind, **dict(params or {})).uses_in_references()
