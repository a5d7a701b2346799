"""Scoring a MIM model: reconstruction errors under keyed masks, and the decoder it scores with.

Below both training (early stopping's held-out loss) and extraction (the per-shard error
tables), so neither reaches into the other.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from mimia.devices import autocast
from mimia.masking import deterministic_masks
from mimia.models.base import MIMModel


@torch.inference_mode()
def score_batch(
    model: MIMModel,
    imgs: torch.Tensor,
    sample_ids: Sequence[str],
    seed: int,
    mask_ratio: float,
    num_masks: int,
    precision: str = "auto",
) -> dict[str, torch.Tensor]:
    """Errors ``[B, K]`` of uint8 ``imgs`` under the K deterministic masks of each sample.

    ``precision`` (``mimia.devices.PRECISIONS``): the default runs the model under bf16
    autocast on CUDA and in float32 elsewhere; the errors are computed in float32 either way.
    """
    spec = model.spec
    device = next(model.parameters()).device
    masks = deterministic_masks(
        seed, sample_ids, mask_ratio, range(num_masks), spec.grid_size, spec.mask_block
    ).to(device)
    b, k = masks.shape[:2]
    x = model.normalize(imgs.to(device, non_blocking=True).float().div_(255))
    x = x.repeat_interleave(k, dim=0)
    flat_mask = masks.reshape(b * k, -1)
    with autocast(device, precision):
        pred = model.decode(model.encode(x, flat_mask), flat_mask)
    errors = model.patch_errors(x, pred.float())
    n_masked = int(flat_mask[0].sum())
    masked = errors[flat_mask].reshape(b * k, n_masked)
    q = torch.quantile(masked, torch.tensor([0.0, 0.5, 1.0], device=device), dim=1)
    out = {
        "error": masked.mean(1),
        "error_all": errors.mean(1),
        "patch_error_min": q[0],
        "patch_error_median": q[1],
        "patch_error_max": q[2],
    }
    return {name: v.reshape(b, k).float().cpu() for name, v in out.items()}


def attach_decoder(target: MIMModel, shadow: MIMModel) -> MIMModel:
    """A copy of ``target`` whose decoder is ``shadow``'s (the encoder-only threat model:
    decoder modes ``shadow`` and ``adapted``)."""
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
