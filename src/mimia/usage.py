"""Dataset usage inference: what fraction of a candidate collection did the target pre-train on?

DUCI (Tong, Ye, Zarifzadeh, Shokri, ICLR 2025; ML Privacy Meter's ``modules/duci``): an
attack's membership guess ``m_i`` on each candidate image is debiased with the attack's TPR and
FPR measured on reference models whose membership is known,
``p_i = (m_i - FPR) / (TPR - FPR)``, and the ``p_i`` are averaged over the collection. The
threshold that turns scores into guesses maximises ``TPR - FPR`` on the reference models, as
the reference does. :class:`UsageEstimator` is that estimator (``fit`` on the reference models'
scores and membership, then ``estimate`` on the target's scores of the collection);
:func:`usage_stage` is the workflow's rule.

In the workflow the reference models are the adversary's shadow models 1..N-1, each scored as if
it were the target (the attack fitted on shadow0 as in the attack stage, the other shadow models
as its references, its own decoder) on the adversary's images, whose membership in it is known.
Their rates therefore describe the target scored with its own (released) decoder. Under an
encoder-only decoder (``shadow``, ``adapted``) the target's scores shift and the rates do not
carry over: validated on digits (config/examples/usage.yaml), LiRA and RMIA then put a
collection the target never saw at 0.30 to 0.54 with a CI that excludes 0. Those rows are
computed for research but marked ``status: "uncalibrated"`` and are not an audit's answer.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import polars as pl

from mimia.config import collection_plan
from mimia.layout import OWN_DECODER, SHADOW_ROLES, TARGET_ROLES
from mimia.metrics import roc_points

PathLike = str | os.PathLike

MEANING = (
    "The estimate is the fraction of the candidate collection that was in the target's "
    "pre-training set, inferred from the attack's membership guesses debiased by its TPR and "
    "FPR on reference models: it estimates a proportion over the whole collection and is not "
    "evidence that any single image was used (or not)."
)
UNCALIBRATED_NOTE = (
    "status 'uncalibrated': the target is scored under an encoder-only decoder, while the "
    "reference models that give TPR and FPR are scored with their own decoders; the rates do "
    "not carry over (on digits such rows put a collection the target never saw at 0.30 to "
    "0.54, CI excluding 0). Shown for research: not evidence about the collection."
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
    ``status == "no estimate"`` the numbers are None and ``reason`` says why; with
    ``"uncalibrated"`` they are computed but the rates do not describe the target's scoring."""

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

    ``fit(scores, membership)``: the attack's scores ``[M, n]`` of ``n`` images under ``M``
    reference models and whether each image trained each model (bool ``[M, n]``); sets
    ``threshold_`` (maximising ``TPR - FPR`` over the pooled scores, predict member iff
    ``score >= threshold_``), ``tpr_`` and ``fpr_``. ``estimate(scores)`` of the target's
    scores on the candidate collection returns a :class:`UsageEstimate` with a percentile
    bootstrap CI over the collection's images and the reference data (reference models
    resampled when there are several, their images within each), the threshold and rates
    re-chosen in every resample.
    """

    def __init__(self, n_bootstrap: int = 1000, confidence: float = 0.95, seed: int = 0):
        self.n_bootstrap = n_bootstrap
        self.confidence = confidence
        self.seed = seed

    def fit(self, scores, membership) -> UsageEstimator:
        s = np.atleast_2d(np.asarray(scores, dtype=np.float64))
        m = np.atleast_2d(np.asarray(membership))
        if s.shape != m.shape or s.size == 0:
            raise ValueError(
                f"reference scores {s.shape} and membership {m.shape} must have the same "
                "non-empty shape [reference models, images]"
            )
        if m.dtype != bool:
            if not np.isin(m, (0, 1)).all():
                raise ValueError("reference membership must be boolean or 0/1 (1 = member)")
            m = m.astype(bool)
        if not np.isfinite(s).all():
            raise ValueError(f"{int((~np.isfinite(s)).sum())} reference scores are not finite")
        if m.all() or not m.any():
            raise ValueError(
                "reference membership needs members and non-members to measure TPR and FPR, "
                f"got {int(m.sum())} members of {m.size}"
            )
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must lie in (0, 1), got {self.confidence}")
        self.reference_scores_, self.reference_in_ = s, m
        self.threshold_, self.tpr_, self.fpr_ = _youden(m.ravel(), s.ravel())
        return self

    def debias(self, scores) -> np.ndarray:
        """Per-image debiased guesses ``p_i`` (unbounded; their mean is the estimate)."""
        self._check_fitted()
        if self.tpr_ <= self.fpr_:
            raise ValueError(self._no_signal())
        guesses = self._guesses(scores)
        return (guesses - self.fpr_) / (self.tpr_ - self.fpr_)

    def estimate(self, scores) -> UsageEstimate:
        self._check_fitted()
        guesses = self._guesses(scores)
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
            est_b, naive_b = self._bootstrap(np.asarray(scores, dtype=np.float64))
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

    def _guesses(self, scores) -> np.ndarray:
        s = np.asarray(scores, dtype=np.float64)
        if s.ndim != 1:
            raise ValueError(f"target scores must be 1-D [images], got shape {s.shape}")
        if s.size == 0:
            raise ValueError("the candidate collection is empty: no images to estimate over")
        if not np.isfinite(s).all():
            raise ValueError(f"{int((~np.isfinite(s)).sum())} target scores are not finite")
        return (s >= self.threshold_).astype(np.float64)

    def _bootstrap(self, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        ref_s, ref_m = self.reference_scores_, self.reference_in_
        n_models, n_ref = ref_s.shape
        est = np.full(self.n_bootstrap, np.nan)
        naive = np.empty(self.n_bootstrap)
        for b in range(self.n_bootstrap):
            models = rng.integers(0, n_models, n_models) if n_models > 1 else np.zeros(1, int)
            cols = rng.integers(0, n_ref, (len(models), n_ref))
            s, m = ref_s[models[:, None], cols], ref_m[models[:, None], cols]
            guesses = scores[rng.integers(0, len(scores), len(scores))]
            if m.all() or not m.any():
                naive[b] = np.nan
                continue
            thr, tpr, fpr = _youden(m.ravel(), s.ravel())
            naive[b] = (guesses >= thr).mean()
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
def reference_scores(errors: pl.DataFrame, manifest, membership, attack: str, entry, decoder):
    """The attack's scores ``[M, n]`` of the adversary's ``n`` images under shadow1..N-1, each
    scored as the target with the other shadow models as references, and their membership."""
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
    ids = data.X_fit.sample_ids
    scores, ins = [], []
    for model in (m for m in shadows if m != FIT_MODEL):
        others = [m for m in shadows if m != model]
        X = observations(errors, model, OWN_DECODER, ids, others, membership, needs)
        scores.append(estimator.score_samples(X))
        is_in = dict(
            membership.filter(pl.col("model") == model).select("sample_id", "is_in").rows()
        )
        ins.append(np.array([is_in.get(s, False) for s in ids], dtype=bool))
    return np.stack(scores), np.stack(ins), [m for m in shadows if m != FIT_MODEL]


def usage_stage(
    *,
    errors: PathLike,
    manifest: PathLike,
    membership: PathLike | Sequence[PathLike],
    scores: Sequence[PathLike],
    json: PathLike,
    parquet: PathLike,
    figure: PathLike,
    pairs: Sequence[Sequence[str]],
    attacks: dict,
    usage: dict,
    split: dict,
    seed: int,
) -> list[dict]:
    """Estimate each collection's used fraction per (decoder, attack) in ``pairs`` (aligned
    with the attack stage's ``scores`` files); write ``json``, ``parquet`` and ``figure``."""
    import mimia
    from mimia.provenance import provenance, write_parquet
    from mimia.report.usage import usage_figure
    from mimia.storage import write_json

    if len(scores) != len(pairs):
        raise ValueError(f"{len(scores)} score files for {len(pairs)} (decoder, attack) pairs")
    man = pl.read_parquet(manifest)
    member_ids = set(man.filter(pl.col("role") == "target_member")["sample_id"].to_list())
    collections = {}
    for name, spec in usage["collections"].items():
        ids = collection_ids(name, spec, man, split, seed)
        check_outside_adversary(name, ids, man)
        collections[name] = ids
    err = pl.read_parquet(errors)
    mem = pl.concat(
        [
            pl.read_parquet(p)
            for p in ([membership] if isinstance(membership, str | os.PathLike) else membership)
        ]
    )
    fitted, rows = {}, []
    for path, (decoder, attack) in zip(scores, pairs, strict=True):
        if attack not in fitted:
            ref_s, ref_in, models = reference_scores(
                err, man, mem, attack, attacks[attack], decoder
            )
            fitted[attack] = (
                UsageEstimator(usage["n_bootstrap"], usage["confidence"], seed).fit(ref_s, ref_in),
                models,
            )
        estimator, models = fitted[attack]
        table = pl.read_parquet(path).select("sample_id", "score")
        by_id = dict(table.rows())
        for name, ids in collections.items():
            missing = [s for s in ids if s not in by_id]
            if missing:
                raise ValueError(
                    f"{path} lacks scores of {len(missing)} images of collection {name!r}"
                )
            result = estimator.estimate(np.array([by_id[s] for s in ids]))
            # The reference models are scored with their own decoders: only that mode's rates
            # describe the target's scoring.
            if result.status == "estimate" and decoder != OWN_DECODER:
                result = _uncalibrated(result, decoder)
            rows.append(
                {
                    "collection": name,
                    "collection_spec": _spec_text(usage["collections"][name]),
                    "decoder": decoder,
                    "attack": attack,
                    # From the split, for validation only: a real audit does not know it.
                    "true_fraction": float(np.mean([s in member_ids for s in ids])),
                    **result.as_dict(),
                    "rates_source": _rates_source(attack, models, decoder, estimator),
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
            "uncalibrated_note": UNCALIBRATED_NOTE,
            "mimia_version": mimia.__version__,
            "validation": validation_summary(frame),
            "results": rows,
        },
    )
    usage_figure(frame, figure)
    return rows


def validation_summary(frame: pl.DataFrame) -> list[dict]:
    """Per (decoder, attack) over the collections: mean |f_hat - f| of DUCI and of the naive
    estimate, the mean CI width (what a decoder mode costs), how often the CI holds the truth;
    for collections with f = 0, how often the CI excludes 0 (a false accusation). Uncalibrated
    rows are validated too (``status`` says which): that is how they were found wanting."""
    ok = frame.filter(pl.col("estimate").is_not_null())
    out = []
    groups = ok.group_by(["decoder", "attack", "status"], maintain_order=True)
    for (decoder, attack, status), g in groups:
        f = g["true_fraction"].to_numpy()
        has_ci = g["ci_low"].is_not_null().to_numpy()
        lo, hi = g["ci_low"].fill_null(np.nan).to_numpy(), g["ci_high"].fill_null(np.nan).to_numpy()
        zero = (f == 0) & has_ci
        out.append(
            {
                "decoder": decoder,
                "attack": attack,
                "status": status,
                "collections": len(g),
                "mean_abs_error": float(np.mean(np.abs(g["estimate"].to_numpy() - f))),
                "naive_mean_abs_error": float(np.mean(np.abs(g["naive"].to_numpy() - f))),
                "mean_ci_width": float(np.mean((hi - lo)[has_ci])) if has_ci.any() else None,
                "ci_covers_truth": int(((lo <= f) & (f <= hi))[has_ci].sum()),
                "collections_with_ci": int(has_ci.sum()),
                "f0_ci_excludes_0": int((lo[zero] > 0).sum()),
                "f0_collections": int(zero.sum()),
            }
        )
    return out


def _uncalibrated(result: UsageEstimate, decoder: str) -> UsageEstimate:
    reason = (
        f"uncalibrated: the target is scored under the {decoder!r} decoder and the rates come "
        "from reference models scored with their own decoders, so they need not hold; see "
        "uncalibrated_note"
    )
    reason = "; ".join(filter(None, [reason, result.reason]))
    return replace(result, status="uncalibrated", reason=reason)


def _rates_source(attack: str, models, decoder: str, estimator: UsageEstimator) -> str:
    text = (
        f"attack {attack!r} scoring each of {', '.join(models)} as the target (fitted on "
        "shadow0, the other shadow models as references) with its own decoder on the "
        f"adversary's {estimator.reference_scores_.shape[1]} images of known membership; "
        "threshold maximising TPR - FPR"
    )
    if decoder != OWN_DECODER:
        text += (
            f"; the target is scored under the {decoder!r} decoder, so these rates need not "
            "hold for it (status 'uncalibrated')"
        )
    return text


def _spec_text(spec: dict) -> str:
    if "role" in spec:
        return f"role {spec['role']}"
    return f"{spec['size']} images, fraction {spec['fraction']} from target_member"
