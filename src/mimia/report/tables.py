"""Metrics tables: one per experiment (``metrics.json``/``.parquet``) and the summary."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from mimia.provenance import provenance, read_metadata, write_parquet
from mimia.storage import atomic_path, write_json

HEADLINE = ["auc", "tpr_at_fpr_0.001", "tpr_at_fpr_0.01", "tpr_at_fpr_0.1", "balanced_accuracy"]


def experiment_metrics(
    experiment: str,
    seed: int,
    ablation: dict | None,
    metric_files: Sequence[str | Path],
    out_json,
    out_parquet,
) -> pl.DataFrame:
    """Gather every (decoder, attack) metrics file of an experiment into one table."""
    rows = [json.loads(Path(p).read_text()) for p in metric_files]
    df = pl.DataFrame(rows).with_columns(pl.lit(experiment).alias("experiment"))
    if ablation:
        df = df.with_columns(
            ablation_name=pl.lit(ablation["name"]),
            ablation_parameter=pl.lit(_parameter_label(ablation["parameter"], ablation["value"])),
            ablation_value=pl.lit(_value_label(ablation["parameter"], ablation["value"])),
            ablation_order=pl.lit(ablation["order"]),
        )
    df = df.select("experiment", "decoder", "attack", pl.exclude("experiment", "decoder", "attack"))
    split = {r.get("manifest_sha256") for r in rows}
    if len(split) != 1:
        raise ValueError(f"experiment {experiment!r}: attacks ran on different splits {split}")
    info = {
        "experiment": experiment,
        "seed": seed,
        "manifest_sha256": rows[0].get("manifest_sha256"),
        "mimia_version": rows[0].get("mimia_version"),
        "ablation": ablation,
        "results": rows,
    }
    write_json(out_json, info)
    write_parquet(
        df,
        out_parquet,
        provenance(seed=seed, experiment=experiment, manifest_sha256=info["manifest_sha256"]),
    )
    return df


def _value_label(parameter, value) -> str:
    """``4``, ``0.5,0.75``; a value given per parameter (``{split.target_member: 125,
    pretrain.epochs: 240, ...}``) as its distinct values in parameter order: ``125 x 240``."""
    if isinstance(value, dict):
        names = parameter if isinstance(parameter, list) else [parameter]
        return " x ".join(dict.fromkeys(str(value[n]) for n in names))
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _parameter_label(parameter, value) -> str:
    """The swept keys, those that share a value joined by ``=`` (``split.target_member =
    split.target_nonmember = ... x pretrain.epochs``), matching :func:`_value_label`."""
    if not isinstance(parameter, list):
        return str(parameter)
    if not isinstance(value, dict):
        return " = ".join(parameter)
    groups: dict[str, list[str]] = {}
    for name in parameter:
        groups.setdefault(str(value[name]), []).append(name)
    return " x ".join(" = ".join(names) for names in groups.values())


def summary(metric_tables: Sequence[str | Path], out_parquet, out_csv, out_md) -> pl.DataFrame:
    """All experiments x decoders x attacks, one row each, as Parquet, CSV and Markdown."""
    df = pl.concat([pl.read_parquet(p) for p in metric_tables], how="diagonal_relaxed")
    df = df.sort("experiment", "decoder", "attack")
    write_parquet(df, out_parquet, provenance(experiments=sorted(set(df["experiment"]))))
    flat = df.select(pl.exclude(pl.List, pl.Struct, pl.Object))
    with atomic_path(out_csv) as tmp:
        flat.write_csv(tmp)
    with atomic_path(out_md) as tmp:
        tmp.write_text(markdown_table(df))
    return df


def _fmt(row: dict, key: str) -> str:
    lo, hi = row.get(f"{key}_ci_low"), row.get(f"{key}_ci_high")
    value = row.get(key)
    if value is None:
        return "–"
    if lo is None or hi is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{lo:.3f}, {hi:.3f}]"


def markdown_table(df: pl.DataFrame) -> str:
    cols = [c for c in HEADLINE if c in df.columns]
    head = ["experiment", "decoder", "attack", *cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in df.iter_rows(named=True):
        cells = [row["experiment"], row["decoder"], row["attack"], *(_fmt(row, c) for c in cols)]
        lines.append("| " + " | ".join(cells) + " |")
    note = "\nValues: point estimate [bootstrap 95 % CI].\n"
    return "\n".join(lines) + "\n" + note


# -- defenses: the empirical privacy audit and the privacy–utility table --------------------------
def privacy_audit(
    experiment: str,
    score_files: Sequence[str | Path],
    sidecar: str | Path,
    audit: dict,
    out_parquet,
    out_json,
) -> pl.DataFrame:
    """Per (decoder, attack): the empirical epsilon lower bound of its ROC (at the DP model's
    own delta, else ``audit.delta``) next to the accountant's epsilon (inf without DP).

    ``epsilon_lower_bound`` holds at ``audit.confidence`` for that attack alone. The headline,
    the largest bound over the ``m`` (decoder, attack) pairs, is a maximum chosen on the same
    data, so it uses ``epsilon_lower_bound_corrected``: each pair's bound at confidence
    ``1 - (1 - audit.confidence) / m`` (Bonferroni), which makes the maximum hold at
    ``audit.confidence``. The record's ``best`` is that maximum, with ``m`` as ``comparisons``.
    """
    from mimia.metrics import epsilon_lower_bound

    info = json.loads(Path(sidecar).read_text())["info"]
    dp = info.get("dp")
    if dp is not None:
        accountant = math.inf if dp["epsilon"] is None else dp["epsilon"]
        delta = dp["delta"]
        note = (
            f"DP-SGD ({dp['accountant']} accountant), noise multiplier {dp['noise_multiplier']:.4g}"
        )
    elif "imported" in info:
        accountant, delta, note = None, audit["delta"], "imported target: its training is unknown"
    else:
        accountant, delta, note = math.inf, audit["delta"], "trained without DP"
    rows = []
    comparisons = len(score_files)
    corrected_confidence = 1.0 - (1.0 - audit["confidence"]) / comparisons
    for path in score_files:
        meta = read_metadata(path)
        scores = pl.read_parquet(path)
        labels, values = scores["is_member"].to_numpy(), scores["score"].to_numpy()
        bound = epsilon_lower_bound(
            labels,
            values,
            delta=delta,
            confidence=audit["confidence"],
            bonferroni=audit["bonferroni"],
        )
        corrected = epsilon_lower_bound(
            labels,
            values,
            delta=delta,
            confidence=corrected_confidence,
            bonferroni=audit["bonferroni"],
        )
        rows.append(
            {
                "experiment": experiment,
                "decoder": meta["decoder"],
                "attack": meta["attack"],
                "attack_kind": meta.get("attack_kind", meta["attack"]),
                **bound,
                "epsilon_lower_bound_corrected": corrected["epsilon_lower_bound"],
                "epsilon_lb_comparisons": comparisons,
                "epsilon_lb_corrected_confidence": corrected_confidence,
                "accountant_epsilon": accountant,
                "accountant_delta": delta,
            }
        )
    df = pl.DataFrame(rows).sort("decoder", "attack")
    best = df.sort(
        "epsilon_lower_bound_corrected", "decoder", "attack", descending=[True, False, False]
    ).row(0, named=True)
    record = {
        "experiment": experiment,
        "accountant_epsilon": _json_number(accountant),
        "accountant_delta": delta,
        "accountant_note": note,
        "dp": dp,
        "audit": audit,
        "best": {
            "decoder": best["decoder"],
            "attack": best["attack"],
            "attack_kind": best["attack_kind"],
            "epsilon_lower_bound": best["epsilon_lower_bound_corrected"],
            "confidence": audit["confidence"],
            "comparisons": comparisons,
            "per_comparison_confidence": corrected_confidence,
            "correction": (
                f"Bonferroni over the {comparisons} (decoder, attack) pairs compared: each "
                f"pair's bound at confidence {corrected_confidence:.6g}, so their maximum holds "
                f"at {audit['confidence']:g}"
            ),
            "epsilon_lower_bound_uncorrected": best["epsilon_lower_bound"],
            "epsilon_lb_delta": delta,
        },
        "results": [{k: _json_number(v) for k, v in r.items()} for r in df.iter_rows(named=True)],
    }
    write_parquet(df, out_parquet, provenance(experiment=experiment, audit=audit))
    write_json(out_json, record)
    return df


def _json_number(value):
    """inf as the string "inf" (JSON has no infinity)."""
    return "inf" if isinstance(value, float) and math.isinf(value) else value


def privacy_utility_table(
    metric_tables: Sequence[str | Path],
    privacy_tables: Sequence[str | Path],
    utility_records: Sequence[str | Path],
    settings: dict[str, dict],
    out_parquet,
    out_csv,
    out_md,
) -> pl.DataFrame:
    """Every experiment x decoder x attack with its attack metrics, epsilon lower bound and
    accountant epsilon, its encoder's utility and its defense settings (``settings``: per
    experiment, :func:`mimia.config.describe`)."""
    metrics = pl.concat([pl.read_parquet(p) for p in metric_tables], how="diagonal_relaxed")
    keep = [c for c in metrics.columns if c.split("_ci_")[0] in HEADLINE]
    metrics = metrics.select("experiment", "decoder", "attack", *keep)
    privacy = pl.concat([pl.read_parquet(p) for p in privacy_tables], how="diagonal_relaxed")
    utility = pl.DataFrame(
        [
            {
                "experiment": r["experiment"],
                **{k: v for k, v in r.items() if k.endswith("accuracy") or "_accuracy_ci_" in k},
                **{k: v for k, v in r.items() if "heldout_masked_error" in k and "note" not in k},
                "utility_n_test": r["n_test"],
            }
            for r in map(json.loads, (Path(p).read_text() for p in utility_records))
        ]
    )
    unknown = sorted(set(utility["experiment"]) - set(settings))
    if unknown:
        raise ValueError(f"utility records of experiments {unknown} have no settings")
    described = pl.DataFrame(
        [{"experiment": name, **values} for name, values in settings.items()],
        infer_schema_length=None,
    )
    df = (
        metrics.join(
            privacy.drop("n_members", "n_nonmembers"),
            on=["experiment", "decoder", "attack"],
            how="left",
        )
        .join(utility, on="experiment", how="left")
        .join(described, on="experiment", how="left")
        .sort("experiment", "decoder", "attack")
    )
    write_parquet(df, out_parquet, provenance(experiments=sorted(settings)))
    with atomic_path(out_csv) as tmp:
        df.select(pl.exclude(pl.List, pl.Struct, pl.Object)).write_csv(tmp)
    with atomic_path(out_md) as tmp:
        tmp.write_text(privacy_utility_markdown(df))
    return df


def strongest_attacks(df: pl.DataFrame, metric: str) -> pl.DataFrame:
    """Per experiment, the row of the attack (any decoder) with the highest ``metric``; the
    ``random`` baseline never counts."""
    return (
        df.filter(pl.col("attack_kind") != "random")
        .sort(metric, "attack", "decoder", descending=[True, False, False])
        .group_by("experiment", maintain_order=True)
        .first()
        .sort("experiment")
    )


def defense_label(row: dict) -> str:
    """A short description of an experiment's defense settings."""
    parts = []
    if row.get("dp_target_epsilon") is not None:
        parts.append(f"DP target ε {row['dp_target_epsilon']:g}, C {row['dp_max_grad_norm']:g}")
    elif row.get("dp_noise_multiplier") is not None:
        parts.append(f"DP σ {row['dp_noise_multiplier']:g}, C {row['dp_max_grad_norm']:g}")
    if row.get("early_stopping"):
        parts.append("early stopping")
    parts.append(f"{row['epochs']} epochs")
    if row.get("augment"):
        parts.append("augment")
    parts.append(f"wd {row['weight_decay']:g}, mask {row['mask_ratio']:g}")
    if not row.get("knows_defense", True):
        parts.append("shadows without the defense")
    return "; ".join(parts)


def privacy_utility_markdown(df: pl.DataFrame) -> str:
    best = strongest_attacks(df, "tpr_at_fpr_0.01")
    head = [
        "experiment",
        "defense",
        "accountant ε",
        "linear probe",
        "k-NN",
        "held-out masked error",
        "strongest attack (decoder)",
        "AUC",
        "TPR at 1 % FPR",
        "ε lower bound",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in best.iter_rows(named=True):
        eps = row["accountant_epsilon"]
        strongest_lb = df.filter(pl.col("experiment") == row["experiment"])[
            "epsilon_lower_bound_corrected"
        ].max()
        cells = [
            row["experiment"],
            defense_label(row),
            "–" if eps is None else ("∞" if math.isinf(eps) else f"{eps:.2f}"),
            _fmt(row, "linear_probe_accuracy"),
            f"{row['knn_accuracy']:.3f}",
            _fmt(row, "heldout_masked_error"),
            f"{row['attack']} ({row['decoder']})",
            _fmt(row, "auc"),
            _fmt(row, "tpr_at_fpr_0.01"),
            f"{strongest_lb:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    conf = df["epsilon_lb_confidence"][0]
    compared = "/".join(map(str, sorted(set(df["epsilon_lb_comparisons"].drop_nulls()))))
    note = (
        f"\nStrongest attack: highest TPR at 1 % FPR among the attacks and decoders (chosen on "
        f"the audit data). Linear probe: accuracy [Clopper–Pearson 95 % CI] on the utility "
        f"test half (random-init encoder: "
        f"{df['random_init_linear_probe_accuracy'][0]:.3f}). Held-out masked error: the "
        f"target's masked reconstruction error on the utility pool (images no model trained "
        f"on) [bootstrap 95 % CI over images]. ε lower bound: the largest over the "
        f"experiment's {compared} attacks and decoders, Bonferroni-corrected for that number "
        f"of comparisons, so the largest holds at confidence {conf:g} for its threshold "
        f"(Clopper–Pearson). Other values: point estimate [bootstrap 95 % CI].\n"
    )
    return "\n".join(lines) + "\n" + note
