"""Dataset usage inference: what fraction of a candidate collection did the target pre-train on?

DUCI (Tong, Ye, Zarifzadeh, Shokri, ICLR 2025; ML Privacy Meter's ``modules/duci``): an
attack's membership guess ``m_i`` on each candidate image is debiased with the attack's TPR and
FPR measured on reference models whose membership is known,
``p_i = (m_i - FPR) / (TPR - FPR)``, and the ``p_i`` are averaged over the collection. The
threshold that turns scores into guesses maximises ``TPR - FPR`` on the reference models, as
the reference does. :class:`UsageEstimator` is that estimator (``fit`` on the reference models'
scores and membership, then ``estimate`` on the target's scores of the collection);
:func:`usage_stage` is the workflow's rule.

Debiasing is only as good as the match between how the reference models are scored and how
the target is. In the workflow the reference models are the adversary's shadow models 1..N-1,
and each is scored exactly as the target's collection is (:func:`calibration`):

* with the same decoder mode: its own decoder for ``released``; shadow0's decoder put on its
  encoder for ``shadow``; shadow0's decoder adapted on its frozen encoder, with images it did
  not train on, for ``adapted``;
* with the same reference models, all OUT: reference model ``k`` is scored with the other
  shadow models as references, on the adversary's images none of them trained on (a random
  half of which trained ``k``), and the target is scored once with each such set (shadow
  models other than ``k``, for every ``k``), its guesses averaged. A candidate image is OUT of
  every shadow model, so a reference model scored on images that some of its references
  trained on would see other score distributions: on CIFAR-10 that put an unused collection
  at 0.36 with a CI excluding 0 (LiRA, 4 shadow models, before this matching).

The attack itself is the attack stage's: fitted on shadow0 with shadow1..N-1 as references.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import polars as pl

from mimia.config import collection_plan
from mimia.layout import SHADOW_ROLES, TARGET, TARGET_ROLES
from mimia.metrics import roc_points

PathLike = str | os.PathLike

MEANING = (
    "The estimate is the fraction of the candidate collection that was in the target's "
    "pre-training set, inferred from the attack's membership guesses debiased by its TPR and "
    "FPR on reference models: it estimates a proportion over the whole collection and is not "
    "evidence that any single image was used (or not)."
)
NAIVE_NOTE = (
    "naive: fraction of the collection the attack calls members at the same threshold, "
    "without debiasing (biased towards the attack's FPR when little was used and below the "
    "truth when much was)"
)


@dataclass(frozen=True)
class UsageEstimate:
    """One collection's estimate. ``estimate``/``ci_*`` lie in [0, 1]; ``*_raw`` are the
    unclipped values (``clipped`` says whether clipping changed any of them). With
    ``status == "no estimate"`` the estimate and CI are None (raw values are kept where they
    were computed) and ``reason`` says why."""

    status: str
    reason: str
    n_images: int
    estimate: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    estimate_raw: float | None = None
    ci_low_raw: float | None = None
    ci_high_raw: float | None = None
    clipped: bool = False
    naive: float | None = None
    naive_ci_low: float | None = None
    naive_ci_high: float | None = None
    tpr: float | None = None
    fpr: float | None = None
    threshold: float | None = None
    confidence: float = 0.95
    n_bootstrap: int = 0
    bootstrap_no_estimate: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


class UsageEstimator:
    """DUCI's debiased proportion estimate, in scikit-learn style.

    ``fit(scores, membership)``: the attack's scores of the images of each of ``M`` reference
    models (``[M, n]``, or ``M`` arrays of their own lengths) and whether each image trained
    that model (bool, same shapes); sets ``threshold_`` (maximising ``TPR - FPR`` over the
    pooled scores, predict member iff ``score >= threshold_``), ``tpr_`` and ``fpr_``.
    ``estimate(scores)`` of the target's scores on the candidate collection (``[n]``, or
    ``[K, n]``: ``K`` scorings of each image whose guesses are averaged) returns a
    :class:`UsageEstimate` with a percentile bootstrap CI over the collection's images and the
    reference data (reference models resampled when there are several, their images within
    each), the threshold and rates re-chosen in every resample.
    """

    def __init__(self, n_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0):
        self.n_bootstrap = n_bootstrap
        self.confidence = confidence
        self.seed = seed

    def fit(self, scores, membership) -> UsageEstimator:
        s = [np.asarray(row, dtype=np.float64) for row in _rows(scores)]
        m = [np.asarray(row) for row in _rows(membership)]
        if [x.shape for x in s] != [x.shape for x in m] or not sum(x.size for x in s):
            raise ValueError(
                f"reference scores {_shapes(s)} and membership {_shapes(m)} must have the same "
                "non-empty shape [reference models, images]"
            )
        if any(x.ndim != 1 for x in s):
            raise ValueError(f"reference scores must be one row per model, got {_shapes(s)}")
        if any(x.dtype != bool for x in m):
            if not all(np.isin(x, (0, 1)).all() for x in m):
                raise ValueError("reference membership must be boolean or 0/1 (1 = member)")
            m = [x.astype(bool) for x in m]
        pooled_s, pooled_m = np.concatenate(s), np.concatenate(m)
        if not np.isfinite(pooled_s).all():
            raise ValueError(
                f"{int((~np.isfinite(pooled_s)).sum())} reference scores are not finite"
            )
        if pooled_m.all() or not pooled_m.any():
            raise ValueError(
                "reference membership needs members and non-members to measure TPR and FPR, "
                f"got {int(pooled_m.sum())} members of {pooled_m.size}"
            )
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must lie in (0, 1), got {self.confidence}")
        self.reference_scores_, self.reference_in_ = s, m
        self.threshold_, self.tpr_, self.fpr_ = _youden(pooled_m, pooled_s)
        return self

    def debias(self, scores) -> np.ndarray:
        """Per-image debiased guesses ``p_i`` (unbounded; their mean is the estimate)."""
        self._check_fitted()
        if self.tpr_ <= self.fpr_:
            raise ValueError(self._no_signal())
        guesses = self._guesses(_scorings(scores), self.threshold_)
        return (guesses - self.fpr_) / (self.tpr_ - self.fpr_)

    def estimate(self, scores) -> UsageEstimate:
        self._check_fitted()
        scores = _scorings(scores)
        guesses = self._guesses(scores, self.threshold_)
        n = len(guesses)
        rates = dict(tpr=self.tpr_, fpr=self.fpr_, threshold=self.threshold_)
        common = dict(n_images=n, confidence=self.confidence, n_bootstrap=self.n_bootstrap)
        if self.tpr_ <= self.fpr_:
            return UsageEstimate("no estimate", self._no_signal(), **common, **rates)
        raw = float((guesses.mean() - self.fpr_) / (self.tpr_ - self.fpr_))
        naive = float(guesses.mean())
        lo_raw = hi_raw = naive_lo = naive_hi = None
        failed, reason = 0, ""
        if self.n_bootstrap > 0:
            est_b, naive_b = self._bootstrap(scores)
            failed = int(np.isnan(est_b).sum())
            naive_lo, naive_hi = _percentiles(naive_b[~np.isnan(naive_b)], self.confidence)
            # A resample whose reference models show TPR - FPR = 0 has an unbounded estimate:
            # it counts as one beyond either end (half each), so failures widen the CI rather
            # than vanish from it.
            ends = np.full(failed, np.inf)
            ends[: failed // 2] = -np.inf
            lo, hi = _percentiles(np.concatenate([est_b[~np.isnan(est_b)], ends]), self.confidence)
            if np.isfinite([lo, hi]).all():
                lo_raw, hi_raw = lo, hi
            else:
                reason = (
                    f"no CI: in {failed} of {self.n_bootstrap} bootstrap resamples the "
                    "reference models' best TPR - FPR is 0 (the attack barely separates them)"
                )
        if lo_raw is not None and (hi_raw < 0 or lo_raw > 1):
            # Clipping such a CI would show [0, 0] or [1, 1]: certainty where the reference
            # models' rates are simply wrong for the target (on CIFAR-10 the threshold attack
            # under the shadow decoder, TPR - FPR 0.01, put every collection at -25).
            why = (
                f"no estimate: the raw estimate {raw:.3f} and its CI [{lo_raw:.3f}, "
                f"{hi_raw:.3f}] lie wholly outside [0, 1], so no used fraction agrees with the "
                f"reference models' rates (TPR {self.tpr_:.3f}, FPR {self.fpr_:.3f}): they do "
                "not describe how the target scores this collection"
            )
            return UsageEstimate(
                "no estimate",
                why,
                **common,
                **rates,
                estimate_raw=raw,
                ci_low_raw=lo_raw,
                ci_high_raw=hi_raw,
                naive=naive,
                naive_ci_low=naive_lo,
                naive_ci_high=naive_hi,
                bootstrap_no_estimate=failed,
            )
        bounds = [v for v in (raw, lo_raw, hi_raw) if v is not None]
        clipped = any(v < 0 or v > 1 for v in bounds)
        if clipped:
            shown = ", ".join(f"{v:.3f}" for v in bounds)
            reason = "; ".join(
                filter(None, [reason, f"raw estimate and CI ({shown}) clipped to [0, 1]"])
            )
        return UsageEstimate(
            "estimate",
            reason,
            **common,
            **rates,
            estimate=_clip(raw),
            ci_low=_clip(lo_raw),
            ci_high=_clip(hi_raw),
            estimate_raw=raw,
            ci_low_raw=lo_raw,
            ci_high_raw=hi_raw,
            clipped=clipped,
            naive=naive,
            naive_ci_low=naive_lo,
            naive_ci_high=naive_hi,
            bootstrap_no_estimate=failed,
        )

    @staticmethod
    def _guesses(scores: np.ndarray, threshold: float) -> np.ndarray:
        """Each image's guess, averaged over its scorings."""
        return (scores >= threshold).mean(axis=0)

    def _bootstrap(self, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        ref_s, ref_m = self.reference_scores_, self.reference_in_
        n_models = len(ref_s)
        est = np.full(self.n_bootstrap, np.nan)
        naive = np.empty(self.n_bootstrap)
        for b in range(self.n_bootstrap):
            models = rng.integers(0, n_models, n_models) if n_models > 1 else np.zeros(1, int)
            picks = [rng.integers(0, len(ref_s[j]), len(ref_s[j])) for j in models]
            s = np.concatenate([ref_s[j][i] for j, i in zip(models, picks, strict=True)])
            m = np.concatenate([ref_m[j][i] for j, i in zip(models, picks, strict=True)])
            images = scores[:, rng.integers(0, scores.shape[1], scores.shape[1])]
            if m.all() or not m.any():
                naive[b] = np.nan
                continue
            thr, tpr, fpr = _youden(m, s)
            naive[b] = self._guesses(images, thr).mean()
            if tpr > fpr:
                est[b] = (naive[b] - fpr) / (tpr - fpr)
        return est, naive

    def _no_signal(self) -> str:
        return (
            f"no estimate: on the reference models the attack's TPR ({self.tpr_:.3f}) does not "
            f"exceed its FPR ({self.fpr_:.3f}) at any threshold, so its guesses carry no "
            "information about membership to debias"
        )

    def _check_fitted(self) -> None:
        if not hasattr(self, "tpr_"):
            raise RuntimeError("UsageEstimator: call fit() on reference scores first")


def _rows(values) -> list:
    """One entry per reference model: the rows of a 2-D array, or a list's items."""
    if isinstance(values, np.ndarray) or not len(values) or np.isscalar(values[0]):
        return list(np.atleast_2d(np.asarray(values)))
    return list(values)


def _shapes(rows: list[np.ndarray]) -> str:
    return str([x.shape for x in rows])


def _scorings(scores) -> np.ndarray:
    """The target's scores as ``[scorings, images]``; checks them."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 1:
        s = s[None]
    if s.ndim != 2:
        raise ValueError(f"target scores must be [images] or [scorings, images], got {s.shape}")
    if s.shape[1] == 0:
        raise ValueError("the candidate collection is empty: no images to estimate over")
    if not np.isfinite(s).all():
        raise ValueError(f"{int((~np.isfinite(s)).sum())} target scores are not finite")
    return s


def _youden(y: np.ndarray, s: np.ndarray) -> tuple[float, float, float]:
    """The ROC point maximising TPR - FPR (the first one, highest threshold, on ties) and its
    threshold; threshold +inf (TPR = FPR = 0) when no point beats chance."""
    fpr, tpr, thr = roc_points(y, s)
    i = int(np.argmax(tpr - fpr))
    return float(thr[i]), float(tpr[i]), float(fpr[i])


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile-bootstrap bounds as order statistics (no interpolation, so infinite
    values at the ends stay where they are)."""
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2], method="inverted_cdf")
    return float(lo), float(hi)


def _clip(value: float | None) -> float | None:
    return None if value is None else float(min(max(value, 0.0), 1.0))


# -- candidate collections ----------------------------------------------------------------------
def collection_ids(name: str, spec: dict, manifest: pl.DataFrame, split: dict, seed: int):
    """Sorted sample ids of a collection; a mix is a seeded draw (seed and collection name)
    of ``members`` target_member and ``nonmembers`` target_nonmember images."""
    plan = collection_plan(name, spec, split)
    by_role = {
        r: np.sort(manifest.filter(pl.col("role") == r)["sample_id"].to_numpy().astype(str))
        for r in TARGET_ROLES
    }
    if "role" in plan:
        ids = by_role[plan["role"]]
    else:
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        ids = np.concatenate(
            [
                rng.choice(by_role["target_member"], plan["members"], replace=False),
                rng.choice(by_role["target_nonmember"], plan["nonmembers"], replace=False),
            ]
        )
    if len(ids) == 0:
        raise ValueError(f"usage.collections.{name}: the candidate collection is empty")
    return np.sort(ids)


def check_outside_adversary(name: str, ids: np.ndarray, manifest: pl.DataFrame) -> None:
    """A candidate image that is (by id or by content) also in the adversary's data would be
    a member of reference models: refused."""
    adversary = manifest.filter(pl.col("role").is_in(list(SHADOW_ROLES)))
    both = np.intersect1d(ids, adversary["sample_id"].to_numpy().astype(str))
    if "content_sha256" in manifest.columns:
        hashes = manifest.filter(pl.col("sample_id").is_in(ids.tolist()))
        same = hashes.filter(pl.col("content_sha256").is_in(adversary["content_sha256"].implode()))
        both = np.union1d(both, same["sample_id"].to_numpy().astype(str))
    if len(both):
        raise ValueError(
            f"usage.collections.{name}: {len(both)} candidate images are also in the adversary's "
            f"data (shadow roles), e.g. {', '.join(both[:3])}; the reference models trained on "
            "them, so they cannot be audited"
        )


# -- the rule -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Calibration:
    """An attack fitted as the attack stage fits it, and its scores of the reference models
    (shadow1..N-1) scored as the target is under one decoder mode (see the module doc)."""

    attack: object
    needs: frozenset
    shadows: list[str]
    models: list[str]
    scores: list[np.ndarray]
    membership: list[np.ndarray]

    def reference_sets(self) -> list[list[str]]:
        return reference_sets(self.needs, self.shadows, self.models)


def reference_sets(needs, shadows: list[str], models: list[str]) -> list[list[str]]:
    """The references of each scoring: the shadow models other than reference model k, for
    every k in ``models`` (none for an attack without reference models)."""
    if "references" not in needs:
        return [[] for _ in models]
    return [[m for m in shadows if m != k] for k in models]


def calibration(errors: pl.DataFrame, manifest, membership, attack: str, entry, decoder):
    """The attack fitted on shadow0 (as in the attack stage) and each reference model k's
    scores under ``decoder`` on the adversary's images that none of k's references trained on,
    with k's membership of them. k is scored on all of the adversary's images (the pool it
    took a random half of), the target on its audit set (:func:`target_scores`), so that
    statistics the attacks take over the scored set see the same member share."""
    from mimia.attacks.base import attack_class, build_attack
    from mimia.attacks.inputs import FIT_MODEL, build_inputs, observations
    from mimia.attacks.inputs import shadow_models as listed_models
    from mimia.config import attack_kind

    kind = attack_kind(entry, attack)
    params = {k: v for k, v in dict(entry or {}).items() if k != "attack"}
    needs = attack_class(kind).inputs | (attack_class(kind).fit_inputs or frozenset())
    data = build_inputs(errors, manifest, membership, decoder, needs=needs)
    estimator = build_attack(kind, **params).fit(data.X_fit, data.y_fit)
    shadows = listed_models(membership)
    trained = {
        m: set(g.filter(pl.col("is_in"))["sample_id"].to_list())
        for (m,), g in membership.group_by("model")
    }
    models = [m for m in shadows if m != FIT_MODEL]
    pool = data.X_fit.sample_ids
    scores, ins = [], []
    for model, refs in zip(models, reference_sets(needs, shadows, models), strict=True):
        keep = np.array([not any(s in trained[r] for r in refs) for s in pool], dtype=bool)
        if not keep.any():
            raise ValueError(
                f"reference model {model!r}: every adversary image trained one of its references "
                f"{refs}, so none is scored as the target's collection is (all references OUT)"
            )
        # Scored within the whole pool (half of it the model's members, as the target's audit
        # set is half its members): the attacks centre a model on the set they score.
        X = observations(errors, model, decoder, pool, refs, membership, needs)
        scores.append(estimator.score_samples(X)[keep])
        ins.append(np.isin(pool[keep], list(trained[model])))
    return Calibration(estimator, needs, shadows, models, scores, ins)


def target_scores(cal: Calibration, errors: pl.DataFrame, membership, decoder, audit, ids):
    """The target's scores ``[scorings, images]`` of ``ids`` under ``decoder``, once with each
    of the calibration's reference sets (once for an attack without reference models).

    Most attacks centre a model's statistics on the set they score (a median, RMIA's
    population), so a collection scored alone would be judged against itself: one the target
    trained on throughout would look like an average one. The target is therefore scored on
    the ``audit`` images (the split's target roles, half members, as a reference model's
    calibration images are half its members); an image outside them is scored appended to
    them in chunks of at most 1 % of their number, which moves their medians by at most half
    a percentile."""
    from mimia.attacks.inputs import observations

    audit = np.asarray(audit, dtype=str)
    outside = np.setdiff1d(ids, audit)
    chunk = max(1, len(audit) // 100)
    sets = cal.reference_sets() if "references" in cal.needs else [[]]
    out = []
    for refs in sets:

        def score(batch, refs=refs):
            X = observations(errors, TARGET, decoder, batch, refs, membership, cal.needs)
            return dict(zip(X.sample_ids, cal.attack.score_samples(X), strict=True))

        found = score(audit)
        for i in range(0, len(outside), chunk):
            part = outside[i : i + chunk]
            scored = score(np.concatenate([audit, part]))
            found.update({s: scored[s] for s in part})
        out.append([found[s] for s in ids])
    return np.array(out, dtype=np.float64)


def usage_stage(
    *,
    errors: PathLike,
    manifest: PathLike,
    membership: PathLike | Sequence[PathLike],
    json: PathLike,
    parquet: PathLike,
    figure: PathLike,
    pairs: Sequence[Sequence[str]],
    attacks: dict,
    usage: dict,
    split: dict,
    seed: int,
    calibration_errors: PathLike | Sequence[PathLike] = (),
    collection_tables: PathLike | Sequence[PathLike] = (),
    collection_errors: PathLike | Sequence[PathLike] = (),
) -> list[dict]:
    """Estimate each collection's used fraction per (decoder, attack) in ``pairs``; write
    ``json``, ``parquet`` and ``figure``.

    ``errors``: the experiment's error table. ``calibration_errors``: the reference models
    under the encoder-only decoder modes the pairs use, on the adversary's images.
    ``collection_tables`` and ``collection_errors``: the image tables of the collections given
    as image sources (:mod:`mimia.data.collections`) and every model's errors on them."""
    import mimia
    from mimia.provenance import provenance, read_metadata, write_parquet
    from mimia.report.usage import usage_figure
    from mimia.storage import write_json

    man = pl.read_parquet(manifest)
    member_ids = set(man.filter(pl.col("role") == "target_member")["sample_id"].to_list())
    audit = np.sort(man.filter(pl.col("role").is_in(TARGET_ROLES))["sample_id"].to_numpy())
    external = {}
    for path in _paths(collection_tables):
        meta = read_metadata(path)
        external[meta["collection"]] = (pl.read_parquet(path), meta)
    collections, truth = {}, {}
    for name, spec in usage["collections"].items():
        if "source" in spec:
            if name not in external:
                raise ValueError(f"usage.collections.{name}: no image table was given for it")
            table, meta = external[name]
            collections[name] = np.sort(table["sample_id"].to_numpy().astype(str))
            truth[name] = float(meta["true_fraction"])
            continue
        ids = collection_ids(name, spec, man, split, seed)
        check_outside_adversary(name, ids, man)
        collections[name] = ids
        truth[name] = float(np.mean([s in member_ids for s in ids]))
    split_err = pl.concat(
        [pl.read_parquet(p) for p in [errors, *_paths(calibration_errors)]],
        how="vertical_relaxed",
    )
    # The collections' errors serve the target's scoring only: calibration reads the split's.
    err = pl.concat(
        [split_err, *(pl.read_parquet(p) for p in _paths(collection_errors))],
        how="vertical_relaxed",
    )
    mem = pl.concat([pl.read_parquet(p) for p in _paths(membership)])
    rows = []
    for decoder, attack in pairs:
        cal = calibration(split_err, man, mem, attack, attacks[attack], decoder)
        estimator = UsageEstimator(usage["n_bootstrap"], usage["confidence"], seed).fit(
            cal.scores, cal.membership
        )
        for name, ids in collections.items():
            scores = target_scores(cal, err, mem, decoder, audit, ids)
            result = estimator.estimate(scores)
            rows.append(
                {
                    "collection": name,
                    "collection_spec": _spec_text(usage["collections"][name]),
                    "decoder": decoder,
                    "attack": attack,
                    # From the split, for validation only: a real audit does not know it.
                    "true_fraction": truth[name],
                    **result.as_dict(),
                    "rates_source": _rates_source(attack, cal, decoder, estimator.threshold_),
                }
            )
    frame = pl.DataFrame(rows, infer_schema_length=None)
    meta = provenance(seed=seed, usage=usage)
    write_parquet(frame, parquet, meta)
    write_json(
        json,
        {
            "meaning": MEANING,
            "naive_note": NAIVE_NOTE,
            "mimia_version": mimia.__version__,
            "validation": validation_summary(frame),
            "results": rows,
        },
    )
    usage_figure(frame, figure)
    return rows


def _paths(value) -> list:
    if isinstance(value, str | os.PathLike):
        return [value]
    return list(value or [])


def validation_summary(frame: pl.DataFrame) -> list[dict]:
    """Per (decoder, attack) over the collections: mean |f_hat - f| of DUCI and of the naive
    estimate, the mean CI width (what a decoder mode costs), how often the CI holds the truth;
    for collections with f = 0, how often the CI excludes 0 (a false accusation). Collections
    with no estimate are counted, not scored."""
    out = []
    for (decoder, attack), every in frame.group_by(["decoder", "attack"], maintain_order=True):
        g = every.filter(pl.col("estimate").is_not_null())
        f = g["true_fraction"].to_numpy()
        has_ci = g["ci_low"].is_not_null().to_numpy()
        lo, hi = g["ci_low"].fill_null(np.nan).to_numpy(), g["ci_high"].fill_null(np.nan).to_numpy()
        zero = (f == 0) & has_ci

        def mean(values, where=None):
            values = values if where is None else values[where]
            return float(np.mean(values)) if len(values) else None

        out.append(
            {
                "decoder": decoder,
                "attack": attack,
                "collections": every.height,
                "no_estimate": every.height - g.height,
                "mean_abs_error": mean(np.abs(g["estimate"].to_numpy() - f)),
                "naive_mean_abs_error": mean(np.abs(g["naive"].to_numpy() - f)),
                "mean_ci_width": mean(hi - lo, has_ci),
                "ci_covers_truth": int(((lo <= f) & (f <= hi))[has_ci].sum()),
                "collections_with_ci": int(has_ci.sum()),
                "f0_ci_excludes_0": int((lo[zero] > 0).sum()),
                "f0_collections": int(zero.sum()),
            }
        )
    return out


def _rates_source(attack: str, cal: Calibration, decoder: str, threshold: float) -> str:
    # Each model's own rates at the pooled threshold: their spread is the between-model
    # variation a target may also show, which few reference models bound poorly.
    sizes = ", ".join(
        f"{m} on {len(x)} ({int(y.sum())} IN; TPR {np.mean(x[y] >= threshold):.2f}, "
        f"FPR {np.mean(x[~y] >= threshold):.2f})"
        for m, x, y in zip(cal.models, cal.scores, cal.membership, strict=True)
    )
    refs = (
        "the other shadow models as references, all OUT on these images"
        if "references" in cal.needs
        else "no reference models"
    )
    return (
        f"attack {attack!r} (fitted on shadow0) scoring each reference model as the target is "
        f"scored, under the {decoder!r} decoder mode with {refs}: {sizes} adversary images of "
        "known membership; threshold maximising TPR - FPR"
    )


def _spec_text(spec: dict) -> str:
    if "source" in spec:
        src = spec["source"]
        return f"{src['name']} {src.get('path') or src.get('urls')}"
    if "role" in spec:
        return f"role {spec['role']}"
    return f"{spec['size']} images, fraction {spec['fraction']} from target_member"
