"""Metrics tables: one per experiment (``metrics.json``/``.parquet``) and the summary."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from mimia.provenance import provenance, write_parquet

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
            ablation_parameter=pl.lit(str(ablation["parameter"])),
            ablation_value=pl.lit(_slug(ablation["value"])),
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
    Path(out_json).write_text(json.dumps(info, indent=2))
    write_parquet(
        df,
        out_parquet,
        provenance(seed=seed, experiment=experiment, manifest_sha256=info["manifest_sha256"]),
    )
    return df


def _slug(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def summary(metric_tables: Sequence[str | Path], out_parquet, out_csv, out_md) -> pl.DataFrame:
    """All experiments x decoders x attacks, one row each, as Parquet, CSV and Markdown."""
    df = pl.concat([pl.read_parquet(p) for p in metric_tables], how="diagonal_relaxed")
    df = df.sort("experiment", "decoder", "attack")
    write_parquet(df, out_parquet, provenance(experiments=sorted(set(df["experiment"]))))
    flat = df.select(pl.exclude(pl.List, pl.Struct, pl.Object))
    flat.write_csv(out_csv)
    Path(out_md).write_text(markdown_table(df))
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
