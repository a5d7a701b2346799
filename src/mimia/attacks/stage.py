"""The attack stage: fit an attack on the adversary's data, score the target, evaluate."""

from __future__ import annotations

import os
from collections.abc import Sequence

import polars as pl

import mimia
from mimia.attacks.base import attack_class, build_attack, validate_entry
from mimia.attacks.inputs import build_inputs
from mimia.metrics import evaluate, roc_frame
from mimia.provenance import provenance, read_metadata, write_parquet
from mimia.storage import write_json

PathLike = str | os.PathLike


def attack_stage(
    *,
    errors: PathLike | Sequence[PathLike],
    manifest: PathLike,
    membership: PathLike | Sequence[PathLike],
    scores: PathLike,
    roc: PathLike,
    metrics: PathLike,
    decoder: str,
    attack: str,
    params: dict | None,
    metrics_config: dict,
    seed: int,
    embeddings: Sequence[PathLike] = (),
) -> dict:
    """Fit result ``attack`` (config entry ``params``) on shadow0, score the target under
    ``decoder``, and write the scores, the ROC and the metrics.

    ``mimia.attacks.inputs.build_inputs`` makes the data: shadow0's errors on the adversary's
    images with shadow1..N-1 as reference models to fit on, the target's errors on the target
    roles with every shadow model as a reference to score. Target labels (from the manifest)
    are used only for evaluation. ``metrics_config``: the experiment's ``metrics`` section
    (``n_bootstrap``, ``tpr_at_fpr``); ``seed`` seeds the bootstrap.
    """
    error_paths = _paths(errors)
    manifest_sha = _manifest_sha256(error_paths, manifest)
    observed = (
        pl.concat([pl.scan_parquet(p) for p in error_paths])
        .select(pl.col("mask_ratio").unique())
        .collect()["mask_ratio"]
        .to_list()
    )
    kind, kwargs = validate_entry(attack, params, sorted(round(float(r), 6) for r in observed))
    estimator = build_attack(kind, **kwargs)
    needs = attack_class(kind).inputs | (attack_class(kind).fit_inputs or frozenset())
    data = build_inputs(
        pl.concat([pl.read_parquet(p) for p in error_paths]) if needs - {"similarities"} else None,
        pl.read_parquet(manifest),
        pl.concat([pl.read_parquet(p) for p in _paths(membership)]),
        decoder,
        needs=needs,
        embeddings=pl.concat([pl.read_parquet(p) for p in embeddings]) if embeddings else None,
    )
    estimator.fit(data.X_fit, data.y_fit)
    values = estimator.score_samples(data.X_audit)
    threshold = estimator.threshold_for(data.X_audit)
    record = {
        "decoder": decoder,
        "attack": attack,
        **evaluate(
            data.y_audit,
            values,
            threshold=threshold,
            n_bootstrap=int(metrics_config.get("n_bootstrap", 1000)),
            seed=seed,
            tpr_convention=metrics_config.get("tpr_at_fpr", "inclusive"),
        ),
        **threshold_conventions(estimator.calibration, data.y_audit.mean(), data.y_fit.mean()),
        "manifest_sha256": manifest_sha,
        "mimia_version": mimia.__version__,
    }
    meta = provenance(
        seed=seed,
        manifest_sha256=manifest_sha,
        attack=attack,
        attack_kind=kind,
        attack_params=kwargs,
        decoder=decoder,
    )
    write_parquet(
        pl.DataFrame(
            {
                "sample_id": data.X_audit.sample_ids,
                "role": data.audit_roles,
                "is_member": data.y_audit,
                "score": values,
            }
        ),
        scores,
        meta,
    )
    write_parquet(roc_frame(data.y_audit, values), roc, meta)
    write_json(metrics, record)
    return record


def threshold_conventions(calibration: str, audit_fraction: float, fit_fraction: float) -> dict:
    """What the decision threshold (and so balanced accuracy) rests on, for ``metrics.json``."""
    notes = {
        "shadow": "threshold chosen on the adversary's data; scores independent of the audit set",
        "transductive": (
            "scores or threshold use statistics of the audit set itself: balanced accuracy "
            "assumes the audit set's member fraction matches the adversary's"
        ),
        "fixed": "constant threshold",
    }
    return {
        "threshold_calibration": calibration,
        "threshold_note": notes[calibration],
        "audit_member_fraction": float(audit_fraction),
        "fit_member_fraction": float(fit_fraction),
    }


def _paths(value: PathLike | Sequence[PathLike]) -> list[PathLike]:
    paths = [value] if isinstance(value, str | os.PathLike) else list(value)
    if not paths:
        raise ValueError("no input files given")
    return paths


def _manifest_sha256(error_paths: Sequence[PathLike], manifest: PathLike) -> str:
    """The split every input names; ValueError when error tables and manifest disagree."""
    shas = {read_metadata(p).get("manifest_sha256") for p in error_paths} - {None, ""}
    if len(shas) > 1:
        raise ValueError(f"error tables come from different splits: manifest_sha256 {sorted(shas)}")
    own = read_metadata(manifest).get("manifest_sha256")
    if shas and own and own not in shas:
        raise ValueError(
            f"error table {error_paths[0]} was computed on split {shas.pop()[:12]}..., but the "
            f"manifest {manifest} is split {own[:12]}..."
        )
    return next(iter(shas), own or "")
