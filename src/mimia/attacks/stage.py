"""The attack stage: fit an attack on the shadow model, score the target, evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl

from mimia.attacks import build_attack
from mimia.attacks.base import observations_from_errors
from mimia.data.splits import SHADOW_ROLES, TARGET_ROLES
from mimia.metrics import evaluate, roc_frame
from mimia.provenance import provenance, read_metadata, write_parquet


def attack_stage(
    *,
    errors,
    manifest,
    membership,
    scores,
    roc,
    metrics,
    decoder,
    attack,
    params,
    metrics_config,
    seed,
    embeddings=(),
) -> dict:
    errors_path, out_scores, out_roc, out_metrics, attack_name = (
        errors,
        scores,
        roc,
        metrics,
        attack,
    )
    roles = pl.read_parquet(manifest).select("sample_id", "role")
    mem = pl.concat([pl.read_parquet(p) for p in membership])
    shadow_count = mem["model"].n_unique()
    exp = {
        "shadow": {"count": shadow_count},
        "attacks": {attack: params},
        "seed": seed,
        "metrics": metrics_config,
    }
    table = pl.read_parquet(errors).join(roles, on="sample_id")
    table = table.join(mem.rename({"is_in": "_in"}), on=["sample_id", "model"], how="left")
    table = table.with_columns(
        is_member=pl.when(pl.col("model") == "target")
        .then(pl.col("role") == "target_member")
        .otherwise(pl.col("_in").fill_null(False))
    ).drop("_in")
    """Fit ``attack_name`` on shadow0 (adversary data), score the target under ``decoder``.

    The shadow observations are shadow0's errors on the adversary's images with shadow1..N-1
    as reference models; the target observations are the target's errors on the target roles
    with every shadow model as a reference. Target labels are used only for evaluation.
    """
    errors = table
    membership = mem
    shadows = [f"shadow{i}" for i in range(exp["shadow"]["count"])]
    shadow_obs = observations_from_errors(
        errors.filter(pl.col("role").is_in(SHADOW_ROLES)),
        "shadow0",
        "released",
        shadows[1:],
        membership,
    )
    target_obs = observations_from_errors(
        errors.filter(pl.col("role").is_in(TARGET_ROLES)), "target", decoder, shadows, membership
    )
    if embeddings:
        sims = pl.concat([pl.read_parquet(p) for p in embeddings])
        for obs, model in ((shadow_obs, "shadow0"), (target_obs, "target")):
            obs.embeddings_similarity = _similarities(sims, model, obs.sample_ids)
    # A config entry names its attack, or is one: `classifier_mlp: {attack: classifier, ...}`.
    params = dict(exp["attacks"][attack_name] or {})
    attack = build_attack(params.pop("attack", attack_name), **params).fit(shadow_obs)
    scores = attack.score(target_obs)
    metrics = evaluate(
        target_obs.labels,
        scores,
        threshold=attack.threshold,
        n_bootstrap=exp["metrics"]["n_bootstrap"],
        seed=exp["seed"],
    )
    meta = provenance(
        seed=exp["seed"],
        manifest_sha256=read_metadata(errors_path).get("manifest_sha256", ""),
        attack=attack_name,
        attack_params=params,
        decoder=decoder,
    )
    roles = dict(errors.select("sample_id", "role").unique().iter_rows())
    write_parquet(
        pl.DataFrame(
            {
                "sample_id": target_obs.sample_ids,
                "role": [roles[s] for s in target_obs.sample_ids],
                "is_member": target_obs.labels,
                "score": scores,
            }
        ),
        out_scores,
        meta,
    )
    write_parquet(roc_frame(target_obs.labels, scores), out_roc, meta)
    record = {"decoder": decoder, "attack": attack_name, **metrics}
    Path(out_metrics).write_text(json.dumps(record, indent=2))
    return record


def _similarities(sims: pl.DataFrame, model: str, sample_ids) -> np.ndarray:
    rows = sims.filter(pl.col("model") == model)
    by_id = dict(zip(rows["sample_id"], rows["similarities"].to_list(), strict=True))
    missing = [s for s in sample_ids if s not in by_id]
    if missing:
        raise ValueError(f"{len(missing)} samples lack {model} embeddings, e.g. {missing[:3]}")
    return np.asarray([by_id[s] for s in sample_ids], dtype=np.float64)
