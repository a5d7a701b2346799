"""What attacks see (``Observations``), how they are built from the extraction table, and the
``Attack`` interface every attack implements.

An attack is fitted on the adversary's *shadow* observations (errors of shadow model 0 on the
adversary's own members and non-members, with shadow models 1..M-1 as references) and then
scores the *target* observations (errors of the audited model). Fitting may use shadow labels;
scoring never sees target labels. ``Attack.threshold`` is the member / non-member decision
threshold on the attack's own scores, chosen on the shadow observations.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import polars as pl

from mimia.metrics import best_threshold

REFERENCE_DECODER = "released"
"""Reference (shadow) models are always scored with their own decoder."""


@dataclass
class Observations:
    """Per-mask reconstruction errors of one audited model, plus optional side information.

    ``errors[n, r, k]``: error of sample ``n`` under mask ``k`` at mask ratio ``r`` (lower =
    more likely member). ``reference_errors[m, n, r, k]``: the same sample and mask under
    reference model ``m`` (its own decoder). ``reference_in[m, n]``: ``n`` trained model ``m``.
    ``embeddings_similarity[n, p]``: cosine similarities of the ``V*(V-1)/2`` pairs of ``V``
    augmented views' embeddings (EncoderMI). ``labels`` are ground truth, used only to fit on
    shadow data and by the metrics.
    """

    sample_ids: np.ndarray
    errors: np.ndarray
    mask_ratios: tuple[float, ...]
    labels: np.ndarray | None = None
    reference_errors: np.ndarray | None = None
    reference_in: np.ndarray | None = None
    embeddings_similarity: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.sample_ids = np.asarray(self.sample_ids, dtype=str)
        self.errors = np.asarray(self.errors, dtype=np.float64)
        self.mask_ratios = tuple(float(r) for r in self.mask_ratios)
        n = len(self.sample_ids)
        if self.sample_ids.ndim != 1:
            raise ValueError(f"sample_ids must be 1-D, got shape {self.sample_ids.shape}")
        if self.errors.ndim != 3 or self.errors.shape[0] != n:
            raise ValueError(f"errors must have shape [N={n}, R, K], got {self.errors.shape}")
        if self.errors.shape[1] != len(self.mask_ratios):
            raise ValueError(
                f"errors has {self.errors.shape[1]} mask ratios, mask_ratios lists "
                f"{len(self.mask_ratios)}: {self.mask_ratios}"
            )
        _check_finite(self.errors, "errors")
        if self.labels is not None:
            self.labels = np.asarray(self.labels)
            if self.labels.shape != (n,):
                raise ValueError(f"labels must have shape [{n}], got {self.labels.shape}")
            self.labels = self.labels.astype(bool)
        if (self.reference_errors is None) != (self.reference_in is None):
            raise ValueError("reference_errors and reference_in come together or not at all")
        if self.reference_errors is not None:
            self.reference_errors = np.asarray(self.reference_errors, dtype=np.float64)
            self.reference_in = np.asarray(self.reference_in, dtype=bool)
            m = self.reference_errors.shape[0] if self.reference_errors.ndim == 4 else -1
            if self.reference_errors.shape != (m, *self.errors.shape):
                dims = ", ".join(map(str, self.errors.shape))
                raise ValueError(
                    f"reference_errors must have shape [M, {dims}], "
                    f"got {self.reference_errors.shape}"
                )
            if self.reference_in.shape != (m, n):
                raise ValueError(
                    f"reference_in must have shape [M={m}, N={n}], got {self.reference_in.shape}"
                )
            _check_finite(self.reference_errors, "reference_errors")
        if self.embeddings_similarity is not None:
            self.embeddings_similarity = np.asarray(self.embeddings_similarity, dtype=np.float64)
            sim = self.embeddings_similarity
            if sim.ndim != 2 or sim.shape[0] != n or sim.shape[1] < 1:
                raise ValueError(
                    f"embeddings_similarity must have shape [N={n}, P>=1], got {sim.shape}"
                )
            _check_finite(sim, "embeddings_similarity")

    def __len__(self) -> int:
        return len(self.sample_ids)

    @property
    def num_masks(self) -> int:
        return self.errors.shape[2]

    @property
    def num_references(self) -> int:
        return 0 if self.reference_errors is None else self.reference_errors.shape[0]

    def ratio_indices(self, ratios: Sequence[float] | float | None = None) -> np.ndarray:
        """Indices into ``mask_ratios`` of ``ratios`` (all when None); ValueError if absent."""
        if ratios is None:
            return np.arange(len(self.mask_ratios))
        if np.isscalar(ratios):
            ratios = [ratios]
        have = np.asarray(self.mask_ratios)
        idx = []
        for r in ratios:
            hit = np.flatnonzero(np.isclose(have, float(r), rtol=0, atol=1e-6))
            if len(hit) == 0:
                raise ValueError(f"mask ratio {r} not observed; have {self.mask_ratios}")
            idx.append(int(hit[0]))
        if not idx:
            raise ValueError("select at least one mask ratio")
        return np.asarray(idx)

    def subset(self, index) -> Observations:
        """The observations of the samples ``index`` selects (boolean mask or indices)."""
        index = np.asarray(index)
        ref = None if self.reference_errors is None else self.reference_errors[:, index]
        return Observations(
            sample_ids=self.sample_ids[index],
            errors=self.errors[index],
            mask_ratios=self.mask_ratios,
            labels=None if self.labels is None else self.labels[index],
            reference_errors=ref,
            reference_in=None if self.reference_in is None else self.reference_in[:, index],
            embeddings_similarity=(
                None if self.embeddings_similarity is None else self.embeddings_similarity[index]
            ),
        )


def _check_finite(a: np.ndarray, what: str) -> None:
    if not np.isfinite(a).all():
        raise ValueError(f"{what} has {int((~np.isfinite(a)).sum())} non-finite values")


def _fmt(values, limit: int = 3) -> str:
    values = list(values)
    more = f" (+{len(values) - limit} more)" if len(values) > limit else ""
    return ", ".join(map(str, values[:limit])) + more


def _cube(rows: pl.DataFrame, ids: np.ndarray, ratios: np.ndarray, masks: np.ndarray, what: str):
    """``error`` of ``rows`` as ``[N, R, K]`` over the given axes; ValueError on holes."""
    dup = rows.select("sample_id", "mask_ratio", "mask_index").is_duplicated()
    if dup.any():
        ex = rows.filter(dup).head(3).select("sample_id", "mask_ratio", "mask_index").rows()
        raise ValueError(f"{what}: duplicate (sample, mask_ratio, mask_index) rows, e.g. {ex}")
    missing = np.setdiff1d(ids, rows["sample_id"].unique().to_numpy().astype(str))
    if len(missing):
        raise ValueError(f"{what} lacks {len(missing)} samples: {_fmt(missing)}")
    n_idx = np.searchsorted(ids, rows["sample_id"].to_numpy().astype(str))
    r_val = rows["mask_ratio"].to_numpy()
    k_val = rows["mask_index"].to_numpy()
    r_idx = np.searchsorted(ratios, r_val).clip(0, len(ratios) - 1)
    k_idx = np.searchsorted(masks, k_val).clip(0, len(masks) - 1)
    bad_r = ratios[r_idx] != r_val
    bad_k = masks[k_idx] != k_val
    if bad_r.any() or bad_k.any():
        raise ValueError(
            f"{what} has mask ratios {_fmt(np.unique(r_val[bad_r]))} / mask indices "
            f"{_fmt(np.unique(k_val[bad_k]))} the audited model lacks"
        )
    filled = np.zeros((len(ids), len(ratios), len(masks)), dtype=bool)
    filled[n_idx, r_idx, k_idx] = True
    if not filled.all():
        n, r, k = np.nonzero(~filled)
        ex = [
            (str(ids[a]), float(ratios[b]), int(masks[c])) for a, b, c in zip(n, r, k, strict=True)
        ]
        raise ValueError(
            f"{what} lacks {len(n)} (sample, mask_ratio, mask_index) errors, e.g. {_fmt(ex)}"
        )
    cube = np.empty(filled.shape, dtype=np.float64)
    cube[n_idx, r_idx, k_idx] = rows["error"].to_numpy()
    return cube, n_idx


def observations_from_errors(
    df: pl.DataFrame,
    model: str,
    decoder: str,
    reference_models: Sequence[str] = (),
    reference_membership: pl.DataFrame | None = None,
    roles: Sequence[str] | None = None,
) -> Observations:
    """Pivot the long extraction table into the ``Observations`` of ``(model, decoder)``.

    The samples are those the audited rows (``model == model & decoder == decoder``) cover,
    sorted by ``sample_id``; the axes are their sorted mask ratios and mask indices, and every
    sample needs every (ratio, mask). ``labels`` is those rows' ``is_member``. Each reference
    model is read with decoder ``"released"`` (its own decoder) and must cover every sample
    with the same masks. ``reference_in[m, n]`` comes from ``reference_membership``
    (``sample_id, model, is_in``; a sample missing there is OUT, as target samples are for
    offline reference models) and must agree with the reference rows' ``is_member``; when
    ``reference_membership`` is None it is the reference rows' ``is_member``.

    ``roles`` keeps only the audited rows of those roles. Shadow models are scored on every
    role, so the shadow observations of ``shadow0`` need
    ``roles=("shadow_member", "shadow_nonmember")``: otherwise the target samples join them as
    extra non-members of shadow0.
    """
    need = {"sample_id", "model", "decoder", "mask_ratio", "mask_index", "error", "is_member"}
    lacking = need - set(df.columns)
    if lacking:
        raise ValueError(f"error table lacks columns {sorted(lacking)}")
    if roles is not None and "role" not in df.columns:
        raise ValueError("error table lacks the column 'role' to select roles by")
    rows = df.filter((pl.col("model") == model) & (pl.col("decoder") == decoder))
    if rows.is_empty():
        pairs = df.select("model", "decoder").unique().sort("model", "decoder").rows()
        raise ValueError(f"no rows for model={model!r}, decoder={decoder!r}; have {pairs}")
    if roles is not None:
        have = sorted(rows["role"].unique().to_list())
        rows = rows.filter(pl.col("role").is_in(list(roles)))
        if rows.is_empty():
            raise ValueError(f"model {model!r}: no rows of roles {list(roles)}; have {have}")
    ids = np.unique(rows["sample_id"].to_numpy().astype(str))
    ratios = np.unique(rows["mask_ratio"].to_numpy())
    masks = np.unique(rows["mask_index"].to_numpy())
    errors, n_idx = _cube(rows, ids, ratios, masks, f"model {model!r} decoder {decoder!r}")
    member = rows["is_member"].to_numpy().astype(bool)
    labels = np.zeros(len(ids), dtype=bool)
    labels[n_idx] = member
    if (labels[n_idx] != member).any():
        raise ValueError(f"model {model!r}: is_member differs between rows of the same sample")

    reference_errors = reference_in = None
    reference_models = list(reference_models)
    if model in reference_models:
        raise ValueError(f"the audited model {model!r} cannot be its own reference model")
    if reference_models:
        cubes, ins = [], []
        for ref in reference_models:
            ref_rows = df.filter(
                (pl.col("model") == ref)
                & (pl.col("decoder") == REFERENCE_DECODER)
                & pl.col("sample_id").is_in(ids.tolist())
            )
            what = f"reference model {ref!r} (decoder {REFERENCE_DECODER!r})"
            if ref_rows.is_empty():
                raise ValueError(f"{what} has no rows for the audited samples")
            cube, r_idx = _cube(ref_rows, ids, ratios, masks, what)
            row_in = np.zeros(len(ids), dtype=bool)
            row_in[r_idx] = ref_rows["is_member"].to_numpy().astype(bool)
            if reference_membership is not None:
                table = reference_membership.filter(pl.col("model") == ref)
                lookup = dict(
                    zip(table["sample_id"].to_list(), table["is_in"].to_list(), strict=True)
                )
                is_in = np.array([bool(lookup.get(s, False)) for s in ids])
                differ = ids[is_in != row_in]
                if len(differ):
                    raise ValueError(
                        f"{what}: reference_membership disagrees with the error table's "
                        f"is_member on {len(differ)} samples, e.g. {_fmt(differ)}"
                    )
            cubes.append(cube)
            ins.append(row_in)
        reference_errors, reference_in = np.stack(cubes), np.stack(ins)

    return Observations(
        sample_ids=ids,
        errors=errors,
        mask_ratios=tuple(round(float(r), 6) for r in ratios),
        labels=labels,
        reference_errors=reference_errors,
        reference_in=reference_in,
    )


class Attack(abc.ABC):
    """A membership inference attack: ``fit(shadow)`` then ``score(target)``.

    Scores are higher for "more likely member". After ``fit``, ``threshold`` is the threshold
    (predict member iff ``score >= threshold``) maximising balanced accuracy of the attack's
    own scores on the shadow observations; no target label is ever used. Subclasses implement
    ``_score`` and, if they learn anything, ``_fit``; they may override ``_fit_threshold``.
    """

    name: ClassVar[str] = "attack"
    requires_shadow: ClassVar[bool] = True
    """``fit`` needs labelled shadow observations."""
    requires_references: ClassVar[bool] = False
    """``score`` needs ``reference_errors`` / ``reference_in``."""
    requires_embeddings: ClassVar[bool] = False
    """``score`` needs ``embeddings_similarity``."""

    def __init__(self, **params: Any) -> None:
        self.params: dict[str, Any] = params
        self.threshold: float | None = None
        self._fitted = False

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{type(self).__name__}({args})"

    def get_params(self) -> dict[str, Any]:
        return dict(self.params)

    def fit(self, shadow: Observations | None) -> Attack:
        if self.requires_shadow:
            self._check_shadow(shadow)
        if shadow is not None:
            # References are optional when fitting: attacks that need them on shadow data
            # say so in their own ``_fit`` / ``_fit_threshold``.
            self._check_inputs(shadow, "shadow", references=False)
        self._fit(shadow)
        self._fitted = True
        self.threshold = float(self._fit_threshold(shadow))
        return self

    def score(self, target: Observations) -> np.ndarray:
        if not self._fitted:
            raise RuntimeError(f"{self.name}: call fit() before score()")
        self._check_inputs(target, "target")
        scores = np.asarray(self._score(target), dtype=np.float64)
        if scores.shape != (len(target),):
            raise RuntimeError(f"{self.name} returned scores of shape {scores.shape}")
        if not np.isfinite(scores).all():
            raise RuntimeError(
                f"{self.name} produced {int((~np.isfinite(scores)).sum())} non-finite scores"
            )
        return scores

    def predict(self, target: Observations) -> np.ndarray:
        """Boolean member predictions at ``threshold``."""
        scores = self.score(target)
        return scores >= self.threshold

    def _fit(self, shadow: Observations | None) -> None:  # noqa: B027 - optional hook
        """Learn from the shadow observations (default: nothing)."""

    def _fit_threshold(self, shadow: Observations | None) -> float:
        """Best balanced-accuracy threshold of the attack's scores on the shadow data."""
        if shadow is None or shadow.labels is None:
            raise ValueError(f"{self.name}: choosing a threshold needs labelled shadow data")
        return best_threshold(shadow.labels, self._score(shadow))

    @abc.abstractmethod
    def _score(self, obs: Observations) -> np.ndarray:
        """Scores ``[N]``, higher = more likely member."""

    def _check_shadow(self, shadow: Observations | None) -> None:
        if shadow is None:
            raise ValueError(f"{self.name} needs shadow observations to fit")
        if shadow.labels is None:
            raise ValueError(f"{self.name}: shadow observations need labels")
        n1 = int(shadow.labels.sum())
        if n1 == 0 or n1 == len(shadow):
            raise ValueError(
                f"{self.name}: shadow observations need members and non-members, got "
                f"{n1} members of {len(shadow)}"
            )

    def _check_inputs(self, obs: Observations, what: str, references: bool = True) -> None:
        if references and self.requires_references and obs.reference_errors is None:
            raise ValueError(f"{self.name}: {what} observations have no reference models")
        if self.requires_embeddings and obs.embeddings_similarity is None:
            raise ValueError(f"{self.name}: {what} observations have no embeddings_similarity")


def select_errors(obs: Observations, ratios: Sequence[float] | float | None) -> np.ndarray:
    """``errors[:, ratios, :]`` as ``[N, R', K]``."""
    return obs.errors[:, obs.ratio_indices(ratios), :]


def log_errors(errors: np.ndarray) -> np.ndarray:
    """``log`` of errors, floored at 1e-12 so a perfect reconstruction stays finite."""
    return np.log(np.maximum(errors, 1e-12))


ATTACKS: dict[str, type[Attack]] = {}
"""Attack name -> class; filled by ``register`` as ``mimia.attacks`` imports its modules."""


def register(cls: type[Attack]) -> type[Attack]:
    """Class decorator adding ``cls`` to ``ATTACKS`` under ``cls.name``."""
    if cls.name in ATTACKS and ATTACKS[cls.name] is not cls:
        raise ValueError(f"attack name {cls.name!r} registered twice")
    ATTACKS[cls.name] = cls
    return cls


def build_attack(name: str, **params: Any) -> Attack:
    """An attack by registry name with its parameters; ValueError for unknown names."""
    import mimia.attacks  # noqa: F401 - registers every attack

    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; known attacks: {', '.join(sorted(ATTACKS))}")
    try:
        return ATTACKS[name](**params)
    except TypeError as err:  # unexpected keyword
        raise ValueError(f"attack {name!r}: bad parameters {params}: {err}") from err
