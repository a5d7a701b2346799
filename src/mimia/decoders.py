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
from mimia.pretrain import TrainConfig, train_mim


def attach_decoder(target: MIMModel, shadow: MIMModel) -> MIMModel:
    """A copy of ``target`` whose decoder is ``shadow``'s."""
    if type(target) is not type(shadow):
        raise ValueError(
            f"shadow recipe {shadow.spec.recipe!r} differs from target {target.spec.recipe!r}"
        )
    for field in ("img_size", "patch_size", "in_chans", "norm_eps"):
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
