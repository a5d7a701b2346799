"""The usage audit's figure: estimated vs true fraction of the candidate collection."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import polars as pl

from mimia.storage import atomic_path


def usage_figure(frame: pl.DataFrame, out) -> None:
    """One panel per decoder: DUCI's estimate (filled, with its CI) and the naive estimate
    (hollow) against the collection's true fraction, one colour per attack. Clipped estimates
    are drawn clipped and marked with an x at their raw value (when inside the axes); a
    collection with no estimate keeps its naive point and is counted in the panel's corner."""
    decoders = list(dict.fromkeys(frame["decoder"].to_list()))
    attacks = list(dict.fromkeys(frame["attack"].to_list()))
    fig, axes = plt.subplots(
        1, len(decoders), figsize=(3.6 * len(decoders), 3.9), squeeze=False, sharey=True
    )
    width = 0.02 * max(len(attacks) - 1, 1)
    for ax, decoder in zip(axes[0], decoders, strict=True):
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        missing = []
        for i, attack in enumerate(attacks):
            every = frame.filter(
                (pl.col("decoder") == decoder) & (pl.col("attack") == attack)
            ).sort("true_fraction")
            shift = (i - (len(attacks) - 1) / 2) * width
            color = f"C{i}"
            naive = every.filter(pl.col("naive").is_not_null())
            ax.plot(
                naive["true_fraction"].to_numpy() + shift,
                naive["naive"].to_numpy(),
                "o",
                mfc="none",
                color=color,
                ms=5,
            )
            g = every.filter(pl.col("estimate").is_not_null())
            if g.height < every.height:
                missing.append(f"{attack}: no estimate for {every.height - g.height}")
            if g.is_empty():
                continue
            f = g["true_fraction"].to_numpy() + shift
            est = g["estimate"].to_numpy()
            lo = g["ci_low"].fill_null(np.nan).to_numpy()
            hi = g["ci_high"].fill_null(np.nan).to_numpy()
            ax.errorbar(f, est, yerr=[est - lo, hi - est], fmt="o", color=color, ms=4, capsize=2)
            raw = g["estimate_raw"].to_numpy()
            off = g["clipped"].to_numpy() & (raw >= -0.1) & (raw <= 1.1)
            ax.plot(f[off], raw[off], "x", color=color, ms=4)
        if missing:
            ax.text(0.98, 0.02, "\n".join(missing), transform=ax.transAxes, ha="right",
                    va="bottom", fontsize=7)  # fmt: skip
        ax.set_title(f"decoder: {decoder}")
        ax.set_xlabel("true fraction used")
        ax.set_xlim(-0.1, 1.1)
        ax.set_ylim(-0.1, 1.1)
    axes[0][0].set_ylabel("estimated fraction (hollow: naive)")
    # One legend for every attack, outside the panels so it hides no point.
    handles = [plt.Line2D([], [], color=f"C{i}", marker="o", ls="") for i in range(len(attacks))]
    fig.legend(handles, attacks, loc="lower center", ncol=len(attacks), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
