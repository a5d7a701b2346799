"""Figures for the report (matplotlib, PNG)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import polars as pl
import torch

from mimia.metrics import bootstrap_mean
from mimia.models.scoring import score_batch
from mimia.storage import atomic_path


def reconstruction_grid(model, images: torch.Tensor, sample_ids, titles, seed, mask_ratio, out):
    """Rows: samples; columns: original, masked input, reconstruction of the masked patches
    pasted into the visible ones (as MAE's demo: predictions of visible patches are untrained)."""
    from mimia.masking import deterministic_masks

    spec = model.spec
    mask = deterministic_masks(seed, sample_ids, mask_ratio, [0], spec.grid_size, spec.mask_block)
    mask = mask[:, 0]
    x = images.float() / 255
    with torch.inference_mode():
        pred = model.decode(model.encode(model.normalize(x), mask), mask)
        recon = model.reconstruct(x, pred)
        errors = score_batch(model, images, sample_ids, seed, mask_ratio, 1)["error"][:, 0]
    pix = model.unpatchify(
        mask.unsqueeze(-1).float().expand(-1, -1, spec.patch_size**2 * spec.in_chans)
    )
    masked = x * (1 - pix) + 0.5 * pix
    pasted = x * (1 - pix) + recon * pix
    cols = [("original", x), ("masked", masked), ("reconstruction", pasted)]
    fig, axes = plt.subplots(
        len(x), len(cols), figsize=(1.6 * len(cols), 1.6 * len(x)), squeeze=False
    )
    for i in range(len(x)):
        for j, (name, imgs) in enumerate(cols):
            ax = axes[i, j]
            ax.imshow(imgs[i].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=8)
            if j == 0:
                ax.set_ylabel(f"{titles[i]}\nerr {errors[i]:.3f}", fontsize=7)
    _save(fig, out)


def pick_across_classes(rows: pl.DataFrame, n: int, seed: int, stream: int = 0) -> list[str]:
    """``n`` sample ids of ``rows`` (``sample_id``, ``label``) spread over the labels: the labels
    in a seeded order, one seeded draw from each in turn, so a class-sorted source does not
    give ``n`` images of its first class. ``stream`` separates draws sharing one seed."""
    if n < 1:
        raise ValueError(f"grid_samples must be at least 1, got {n}")
    if rows.height == 0:
        raise ValueError("no images to pick reconstruction samples from")
    rng = np.random.default_rng((seed, stream))
    by_label = {
        label: list(rng.permutation(sorted(group["sample_id"].to_list())))
        for (label,), group in sorted(rows.group_by("label"), key=lambda t: t[0][0])
    }
    order = rng.permutation(sorted(by_label))
    picked: list[str] = []
    while len(picked) < min(n, rows.height):
        for label in order:
            if by_label[label] and len(picked) < n:
                picked.append(str(by_label[label].pop()))
    return picked


def reconstruction_figure(
    model, manifest, member_shards, nonmember_shards, n, seed, mask_ratio, out
):
    """The reconstruction grid of ``n`` members and ``n`` non-members of the target, drawn
    across classes with the seed (:func:`pick_across_classes`)."""
    from mimia.data.shards import load_images

    rows = pl.read_parquet(manifest, columns=["sample_id", "key", "label", "role"])
    ids, imgs, titles = [], [], []
    for stream, (role, shards, title) in enumerate(
        (
            ("target_member", member_shards, "member"),
            ("target_nonmember", nonmember_shards, "non-member"),
        )
    ):
        role_rows = rows.filter(pl.col("role") == role)
        picked = pick_across_classes(role_rows, n, seed, stream)
        found, images = load_images(list(shards), set(picked))
        where = {sid: i for i, sid in enumerate(found)}
        info = {r["sample_id"]: r for r in role_rows.iter_rows(named=True)}
        for sid in picked:
            ids.append(sid)
            imgs.append(images[where[sid]])
            # The key names the image in the source (e.g. airplane/0066.jpg), for a look.
            row = info[sid]
            titles.append(f"{title}, label {row['label']}\n{row['key'][-24:]}")
    reconstruction_grid(model, torch.stack(imgs), ids, titles, seed, mask_ratio, out)


def roc_figure(rocs: dict[tuple[str, str], pl.DataFrame], aucs: dict, out, title: str = ""):
    """ROC curves of every attack, one panel per decoder, on log-log axes (Carlini et al.)."""
    decoders = sorted({d for d, _ in rocs})
    fig, axes = plt.subplots(1, len(decoders), figsize=(4.2 * len(decoders), 4), squeeze=False)
    for ax, decoder in zip(axes[0], decoders, strict=True):
        for (d, attack), roc in sorted(rocs.items()):
            if d != decoder:
                continue
            fpr, tpr = roc["fpr"].to_numpy(), roc["tpr"].to_numpy()
            label = f"{attack} (AUC {aucs[(d, attack)]:.3f})"
            ax.plot(np.clip(fpr, 1e-4, 1), np.clip(tpr, 1e-4, 1), label=label, lw=1.3)
        ax.plot([1e-4, 1], [1e-4, 1], ls="--", c="grey", lw=0.8, label="chance")
        ax.set_xscale("log"), ax.set_yscale("log")
        ax.set_xlim(1e-3, 1), ax.set_ylim(1e-3, 1)
        ax.set_xlabel("false positive rate"), ax.set_ylabel("true positive rate")
        ax.set_title(f"{title} — decoder: {decoder}", fontsize=9)
        ax.legend(fontsize=6, loc="upper left", framealpha=0.85)
        ax.grid(alpha=0.3, which="both", lw=0.4)
    _save(fig, out)


def error_histograms(errors: pl.DataFrame, out, title: str = ""):
    """Mean masked error per target image, members vs non-members: decoders x mask ratios."""
    per_sample = (
        errors.filter(pl.col("model") == "target")
        .group_by("decoder", "mask_ratio", "sample_id", "is_member")
        .agg(pl.col("error").mean())
    )
    decoders = sorted(per_sample["decoder"].unique())
    ratios = sorted(per_sample["mask_ratio"].unique())
    fig, axes = plt.subplots(
        len(decoders),
        len(ratios),
        figsize=(3.6 * len(ratios), 2.8 * len(decoders)),
        squeeze=False,
    )
    for i, decoder in enumerate(decoders):
        for j, ratio in enumerate(ratios):
            ax = axes[i, j]
            sub = per_sample.filter(
                (pl.col("decoder") == decoder) & (pl.col("mask_ratio") == ratio)
            )
            values = sub["error"].to_numpy()
            bins = np.linspace(np.quantile(values, 0.005), np.quantile(values, 0.995), 40)
            for member, colour in ((True, "tab:red"), (False, "tab:blue")):
                v = sub.filter(pl.col("is_member") == member)["error"].to_numpy()
                label = "member" if member else "non-member"
                ax.hist(v, bins=bins, alpha=0.55, color=colour, density=True, label=label)
            ax.set_title(f"decoder {decoder}, mask ratio {ratio:g}", fontsize=8)
            ax.set_xlabel("mean masked reconstruction error", fontsize=8)
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    _save(fig, out)


def mask_ratio_stats(errors: pl.DataFrame, n_bootstrap: int = 1000, seed: int = 0) -> pl.DataFrame:
    """Per (decoder, mask ratio, membership): mean masked error of the target's images with a
    bootstrap 95 % CI over images. Each image's K masks are averaged first: they are repeated
    measurements of one image, not independent samples."""
    per_image = (
        errors.filter(pl.col("model") == "target")
        .group_by("decoder", "mask_ratio", "is_member", "sample_id")
        .agg(pl.col("error").mean())
    )
    missing = per_image.filter(pl.col("is_member").is_null())
    if missing.height:
        raise ValueError(
            f"{missing.height} error rows name samples that are not target images, "
            f"e.g. {missing['sample_id'][0]!r}"
        )
    rows = []
    for (decoder, ratio, member), sub in per_image.group_by("decoder", "mask_ratio", "is_member"):
        # In sample-id order: the draws, hence the CI, must not depend on group order.
        values = sub.sort("sample_id")["error"].to_numpy()
        mean, low, high = bootstrap_mean(values, n_bootstrap, seed)
        rows.append((decoder, ratio, member, sub.height, mean, low, high))
    schema = ["decoder", "mask_ratio", "is_member", "n_images", "mean", "ci_low", "ci_high"]
    return pl.DataFrame(rows, schema=schema, orient="row").sort(
        "decoder", "mask_ratio", "is_member", descending=[False, False, True]
    )


MEMBER_STYLE = {
    True: {"color": "tab:red", "marker": "o", "ls": "-", "label": "member"},
    False: {"color": "tab:blue", "marker": "s", "ls": "--", "label": "non-member"},
}


def error_vs_mask_ratio(errors: pl.DataFrame, out, title: str = "", seed: int = 0):
    """Mean masked error of members and non-members against the mask ratio, one panel per
    decoder, with bootstrap 95 % CIs over images (:func:`mask_ratio_stats`). With one mask
    ratio the two groups are side-by-side points."""
    stats = mask_ratio_stats(errors, seed=seed)
    decoders = sorted(stats["decoder"].unique())
    ratios = sorted(stats["mask_ratio"].unique())
    step = min(np.diff(ratios)) if len(ratios) > 1 else 0.1
    fig, axes = plt.subplots(
        1, len(decoders), figsize=(max(4.4, 3.6 * len(decoders)), 3.6), squeeze=False, sharey=True
    )
    for ax, decoder in zip(axes[0], decoders, strict=True):
        for member in (True, False):
            sub = stats.filter((pl.col("decoder") == decoder) & (pl.col("is_member") == member))
            style = dict(MEMBER_STYLE[member])
            # Side by side, so that overlapping CIs stay readable.
            x = sub["mask_ratio"].to_numpy() + (-0.06 if member else 0.06) * step
            mean = sub["mean"].to_numpy()
            yerr = np.vstack([mean - sub["ci_low"].to_numpy(), sub["ci_high"].to_numpy() - mean])
            n = sub["n_images"].max()
            style["label"] = f"target {style['label']}s (n={n})"
            ax.errorbar(x, mean, yerr=yerr, ms=4, capsize=3, lw=1.2, **style)
        ax.set_xticks(ratios, [f"{r:g}" for r in ratios])
        ax.set_xlim(ratios[0] - 0.5 * step, ratios[-1] + 0.5 * step)
        ax.set_xlabel("mask ratio")
        ax.set_title(f"decoder: {decoder}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean masked reconstruction error")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.legend(
        handles,
        labels,
        loc="lower center",
        ncol=2,
        fontsize=7,
        title="mean, bootstrap 95 % CI over images",
        title_fontsize=7,
        frameon=False,
    )
    _save(fig, out, tight=False)


def ablation_figure(summary: pl.DataFrame, ablation: str, out):
    """AUC and TPR at 1 % FPR of every attack against the swept value."""
    rows = summary.filter(pl.col("ablation_name") == ablation)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for ax, metric, label in (
        (axes[0], "auc", "AUC"),
        (axes[1], "tpr_at_fpr_0.01", "TPR at 1 % FPR"),
    ):
        for (decoder, attack), sub in rows.group_by("decoder", "attack", maintain_order=True):
            sub = sub.sort("ablation_order")
            x = np.arange(sub.height)
            yerr = None
            if f"{metric}_ci_low" in sub.columns:
                yerr = np.vstack(
                    [sub[metric] - sub[f"{metric}_ci_low"], sub[f"{metric}_ci_high"] - sub[metric]]
                )
            ax.errorbar(
                x,
                sub[metric],
                yerr=yerr,
                marker="o",
                ms=3,
                capsize=2,
                label=f"{attack} ({decoder})",
            )
            ax.set_xticks(x, sub["ablation_value"].to_list(), fontsize=7)
        name = rows["ablation_parameter"][0] if rows.height else ablation
        ax.set_xlabel(textwrap.fill(name, 60), fontsize=7 if len(name) > 60 else None)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=6, loc="best")
    fig.suptitle(f"ablation: {ablation}", fontsize=9)
    _save(fig, out)


def _save(fig, out, tight: bool = True) -> None:
    try:
        if tight:
            fig.tight_layout()
        # The temp file's name ends in .tmp: the format comes from the final name.
        with atomic_path(out) as tmp:
            fig.savefig(tmp, dpi=120, format=Path(out).suffix.lstrip(".") or None)
    finally:
        plt.close(fig)


def target_errors(errors_path, manifest_path) -> pl.DataFrame:
    """The target's error rows with ``is_member`` from the manifest's roles; an error row
    whose sample is not in the manifest is refused (a left join would leave it null)."""
    roles = pl.read_parquet(manifest_path).select(
        "sample_id", (pl.col("role") == "target_member").alias("is_member")
    )
    # figures is a localrule: on a cluster it runs on the submit host, so read only the
    # target's rows (predicate pushdown), never every reference model's.
    rows = pl.scan_parquet(errors_path).filter(pl.col("model") == "target").collect()
    unknown = rows.join(roles, on="sample_id", how="anti")
    if unknown.height:
        raise ValueError(
            f"{errors_path}: {unknown['sample_id'].n_unique()} target sample ids are not in the "
            f"manifest {manifest_path}, e.g. {unknown['sample_id'][0]!r}; the errors and the "
            f"manifest come from different splits"
        )
    return rows.join(roles, on="sample_id", how="inner", validate="m:1")


def experiment_figures(
    experiment,
    errors_path,
    manifest_path,
    metrics_path,
    roc_paths,
    out_roc,
    out_hist,
    out_ratio,
    seed: int = 0,
):
    from mimia.provenance import read_metadata

    metrics = pl.read_parquet(metrics_path)
    aucs = {(r["decoder"], r["attack"]): r["auc"] for r in metrics.iter_rows(named=True)}
    rocs = {}
    for path in roc_paths:
        meta = read_metadata(path)
        rocs[(meta["decoder"], meta["attack"])] = pl.read_parquet(path)
    roc_figure(rocs, aucs, out_roc, title=experiment)
    errors = target_errors(errors_path, manifest_path)
    error_histograms(errors, out_hist, title=experiment)
    error_vs_mask_ratio(errors, out_ratio, title=experiment, seed=seed)


def privacy_utility_figure(table: pl.DataFrame, out):
    """Linear-probe accuracy (x) against the strongest attack's TPR at 1 % FPR and AUC (y),
    one point per experiment, with the probes' Clopper–Pearson and the attacks' bootstrap 95 %
    CIs as error bars; chance levels dashed, the random-init encoder's accuracy dotted."""
    from mimia.report.tables import strongest_attacks

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    panels = (
        (axes[0], "tpr_at_fpr_0.01", "TPR at 1 % FPR (strongest attack)", 0.01),
        (axes[1], "auc", "AUC (strongest attack)", 0.5),
    )
    for ax, metric, label, chance in panels:
        rows = strongest_attacks(table, metric)
        colours = plt.cm.tab10.colors
        for i, row in enumerate(rows.iter_rows(named=True)):
            x, y = row["linear_probe_accuracy"], row[metric]
            xerr = [
                [x - row["linear_probe_accuracy_ci_low"]],
                [row["linear_probe_accuracy_ci_high"] - x],
            ]
            yerr = None
            if row.get(f"{metric}_ci_low") is not None:
                yerr = [[y - row[f"{metric}_ci_low"]], [row[f"{metric}_ci_high"] - y]]
            eps = row["accountant_epsilon"]
            eps_text = "" if eps is None else (", ε=∞" if np.isinf(eps) else f", ε={eps:.1f}")
            ax.errorbar(
                x,
                y,
                xerr=xerr,
                yerr=yerr,
                marker="o",
                ms=5,
                capsize=2,
                color=colours[i % len(colours)],
                label=f"{row['experiment']}{eps_text} ({row['attack']}, {row['decoder']})",
            )
        ax.axhline(chance, ls="--", c="grey", lw=0.8)
        baseline = table["random_init_linear_probe_accuracy"].drop_nulls()
        if baseline.len():
            ax.axvline(float(baseline[0]), ls=":", c="grey", lw=0.8)
        ax.set_xlabel("linear-probe accuracy of the frozen encoder")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, lw=0.4)
        ax.legend(fontsize=6, loc="best", framealpha=0.85)  # each panel's strongest attack
    fig.suptitle(
        "privacy–utility trade-off: grey dashed = chance, dotted = random-init encoder", fontsize=9
    )
    _save(fig, out)
