"""The adversary's decoder on the target encoder: the encoder-only threat model.

``released``: the target's own decoder (white-box). ``shadow``: the shadow model's decoder put
on the target encoder as is (the paper's attack). ``adapted``: the shadow decoder fine-tuned
with the MIM loss on top of the frozen target encoder, on the adversary's data only.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from mimia.models.base import MIMModel
from mimia.pretrain import TrainConfig, resume_path_for, save_trained, train_mim

DECODER_MODES = ("released", "shadow", "adapted")


def attach_decoder(target: MIMModel, shadow: MIMModel) -> MIMModel:
    """A copy of ``target`` whose decoder is ``shadow``'s."""
    if type(target) is not type(shadow):
        raise ValueError(
            f"shadow recipe {shadow.spec.recipe!r} differs from target {target.spec.recipe!r}"
        )
    for field in ("img_size", "patch_size", "in_chans"):
        if getattr(target.spec, field) != getattr(shadow.spec, field):
            raise ValueError(
                f"shadow {field}={getattr(shadow.spec, field)} differs from target "
                f"{field}={getattr(target.spec, field)}: the decoder cannot be attached"
            )
    if target.encoder.embed_dim != shadow.encoder.embed_dim:
        raise ValueError(
            f"shadow encoder width {shadow.encoder.embed_dim} differs from the target's "
            f"{target.encoder.embed_dim}: configure the shadow architecture like the target's"
        )
    model = copy.deepcopy(target)
    model.decoder = copy.deepcopy(shadow.decoder)
    # The decoder's own spec fields travel with it, so the composite can be saved and rebuilt.
    model.spec = type(target.spec)(
        **{
            **target.spec.to_dict(),
            **{k: v for k, v in shadow.spec.to_dict().items() if k.startswith("decoder_")},
            "mean": target.spec.mean,
            "std": target.spec.std,
        }
    )
    return model


def adapt_decoder(
    target: MIMModel,
    shadow: MIMModel,
    adversary_images: torch.Tensor,
    cfg: TrainConfig,
    resume_path: str | Path | None = None,
    fingerprint: str = "",
) -> tuple[MIMModel, list[dict]]:
    """Fine-tune ``shadow``'s decoder on the frozen ``target`` encoder.

    Only decoder parameters receive gradients; the encoder (and SimMIM's mask token, which is
    part of what the target released) stays bit-identical.
    """
    model = attach_decoder(target, shadow)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.decoder.parameters():
        p.requires_grad_(True)
    history = train_mim(
        model,
        adversary_images,
        cfg,
        resume_path=resume_path,
        fingerprint=fingerprint,
        trainable=[(f"decoder.{n}", p) for n, p in model.decoder.named_parameters()],
    )
    return model, history


def adapt_stage(
    exp: dict,
    target_weights: str | Path,
    shadow_weights: str | Path,
    manifest_path: str | Path,
    shard_files: list[str | Path],
    weights_path: str | Path,
    log_table_path: str | Path,
) -> None:
    """Fit the ``adapted`` decoder on the adversary's shards only (shadow roles)."""
    import polars as pl

    from mimia.config import train_config
    from mimia.data.shards import load_images
    from mimia.data.splits import SHADOW_ROLES, manifest_hash
    from mimia.models.checkpoint import file_sha256, load_model

    manifest = pl.read_parquet(manifest_path)
    ids = set(manifest.filter(pl.col("role").is_in(SHADOW_ROLES))["sample_id"])
    _, images = load_images(shard_files, ids)
    cfg = train_config(exp, "adapt", seed_offset=10_000)
    resume = resume_path_for(weights_path)
    target, shadow = load_model(target_weights), load_model(shadow_weights)
    fingerprint = f"{file_sha256(target_weights)}|{file_sha256(shadow_weights)}|{cfg}|{len(ids)}"
    model, history = adapt_decoder(target, shadow, images, cfg, resume, fingerprint)
    info = {
        "model": "target-adapted",
        "adapt_config": exp["adapt"],
        "seed": cfg.seed,
        "num_train_images": len(ids),
        "manifest_sha256": manifest_hash(manifest),
        "target_sha256": file_sha256(target_weights),
        "decoder_released": False,
    }
    save_trained(model, history, info, weights_path, log_table_path)
