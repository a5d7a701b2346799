"""Figures for the report (matplotlib, PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def reconstruction_grid(model, images: torch.Tensor, sample_ids, titles, seed, mask_ratio, out):
    """Rows: samples; columns: original, masked input, reconstruction of the masked patches
    pasted into the visible ones (as MAE's demo: predictions of visible patches are untrained)."""
    from mimia.extract import score_batch
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
    fig, axes = plt.subplots(len(x), len(cols), figsize=(1.6 * len(cols), 1.6 * len(x)), squeeze=False)
    for i in range(len(x)):
        for j, (name, imgs) in enumerate(cols):
            ax = axes[i, j]
            ax.imshow(imgs[i].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=8)
            if j == 0:
                ax.set_ylabel(f"{titles[i]}\nerr {errors[i]:.3f}", fontsize=7)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def reconstruction_stage(exp, decoder, checkpoints, member_shard, nonmember_shard, out):
    from mimia.data.shards import iter_shards
    from mimia.extract import scoring_model

    n = exp["extract"]["grid_samples"]
    model = scoring_model(decoder, checkpoints)
    picked = []
    for shard, title in ((member_shard, "member"), (nonmember_shard, "non-member")):
        for k, (sid, img, _) in enumerate(iter_shards([shard])):
            if k >= n:
                break
            picked.append((sid, img, title))
    ids, imgs, titles = zip(*picked, strict=True)
    reconstruction_grid(
        model, torch.stack(imgs), list(ids), titles, exp["seed"],
        exp["extract"]["mask_ratios"][0], out,
    )


