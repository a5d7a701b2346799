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
    are drawn clipped and marked with an x at their raw value (when inside the axes)."""
    decoders = list(dict.fromkeys(frame["decoder"].to_list()))
    attacks = list(dict.fromkeys(frame["attack"].to_list()))
    fig, axes = plt.subplots(
        1, len(decoders), figsize=(3.6 * len(decoders), 3.6), squeeze=False, sharey=True
    )
    width = 0.02 * max(len(attacks) - 1, 1)
    for ax, decoder in zip(axes[0], decoders, strict=True):
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        for i, attack in enumerate(attacks):
            g = frame.filter(
                (pl.col("decoder") == decoder)
                & (pl.col("attack") == attack)
                & pl.col("estimate").is_not_null()
            ).sort("true_fraction")
            if g.is_empty():
                continue
            f = g["true_fraction"].to_numpy() + (i - (len(attacks) - 1) / 2) * width
            est = g["estimate"].to_numpy()
            lo = g["ci_low"].fill_null(np.nan).to_numpy()
            hi = g["ci_high"].fill_null(np.nan).to_numpy()
            color = f"C{i}"
            ax.errorbar(
                f,
                est,
                yerr=[est - lo, hi - est],
                fmt="o",
                color=color,
                ms=4,
                capsize=2,
                label=attack,
            )
            ax.plot(f, g["naive"].to_numpy(), "o", mfc="none", color=color, ms=5)
            raw = g["estimate_raw"].to_numpy()
            off = g["clipped"].to_numpy() & (raw >= -0.1) & (raw <= 1.1)
            ax.plot(f[off], raw[off], "x", color=color, ms=4)
        ax.set_title(f"decoder: {decoder}")
        ax.set_xlabel("true fraction used")
        ax.set_xlim(-0.1, 1.1)
        ax.set_ylim(-0.1, 1.1)
    axes[0][0].set_ylabel("estimated fraction (hollow: naive)")
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
