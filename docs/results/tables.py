"""The tables of docs/results.md from a finished study's results folder.

    PYTHONPATH=src python docs/results/tables.py results/cifar10-cpu-study

Per ablation: AUC (bootstrap 95 % CI) and TPR at 1 % and 0.1 % FPR of each attack in the
summary (the random baseline left out), the target's mean masked error on its members (its
training images) and non-members (held out), their gap (non-members over members, minus one:
the generalization gap the attacks exploit), and the wall time the experiment's pre-trainings
took (from their training logs).
"""

from __future__ import annotations

import sys
from pathlib import Path

import polars as pl


def _ci(row: dict, metric: str) -> str:
    return f"{row[metric]:.3f} [{row[metric + '_ci_low']:.3f}, {row[metric + '_ci_high']:.3f}]"


def target_errors(root: Path, decoder: str) -> dict[str, float]:
    """The target's mean per-image masked error per target role under ``decoder``."""
    roles = pl.read_parquet(root / "data" / "manifest.parquet").select("sample_id", "role")
    errors = pl.read_parquet(root / "errors.parquet").filter(
        (pl.col("model") == "target") & (pl.col("decoder") == decoder)
    )
    per_image = errors.group_by("sample_id").agg(pl.col("error").mean()).join(roles, on="sample_id")
    return dict(per_image.group_by("role").agg(pl.col("error").mean()).rows())


def train_minutes(root: Path) -> float:
    logs = sorted((root / "models").glob("*/model.train_log.parquet"))
    return sum(pl.read_parquet(p)["seconds"].sum() for p in logs) / 60


def table(summary: pl.DataFrame, results: Path, rows: pl.DataFrame, label: str) -> str:
    attacks = [a for a in summary["attack"].unique(maintain_order=True) if a != "random"]
    head = [label, "decoder"] + [f"{a} AUC / TPR@1% / TPR@0.1%" for a in attacks]
    head += ["member error", "non-member error", "error gap", "training (min)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for (experiment, decoder, value), _ in rows.group_by(
        "experiment", "decoder", "value", maintain_order=True
    ):
        cells = [str(value), decoder]
        for attack in attacks:
            hit = summary.filter(
                (pl.col("experiment") == experiment)
                & (pl.col("decoder") == decoder)
                & (pl.col("attack") == attack)
            )
            if hit.is_empty():
                cells.append("–")
                continue
            row = hit.row(0, named=True)
            tprs = f"{row['tpr_at_fpr_0.01']:.3f} / {row['tpr_at_fpr_0.001']:.3f}"
            cells.append(f"{_ci(row, 'auc')} / {tprs}")
        root = results / experiment
        errors = target_errors(root, decoder)
        member, nonmember = errors["target_member"], errors["target_nonmember"]
        cells += [f"{member:.3f}", f"{nonmember:.3f}", f"{100 * (nonmember / member - 1):+.1f} %"]
        cells.append(f"{train_minutes(root):.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(results: Path) -> None:
    summary = pl.read_parquet(results / "summary.parquet")
    if "ablation_name" in summary.columns:
        for name in summary["ablation_name"].drop_nulls().unique(maintain_order=True):
            rows = (
                summary.filter(pl.col("ablation_name") == name)
                .sort("ablation_order")
                .select("experiment", "decoder", pl.col("ablation_value").alias("value"))
            )
            print(f"### {name}\n\n{table(summary, results, rows, name)}\n")
    plain = (
        summary.filter(pl.col("ablation_name").is_null())
        if "ablation_name" in summary.columns
        else summary
    )
    rows = plain.select("experiment", "decoder", pl.col("experiment").alias("value")).unique(
        maintain_order=True
    )
    print(f"### experiments\n\n{table(summary, results, rows, 'experiment')}\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
