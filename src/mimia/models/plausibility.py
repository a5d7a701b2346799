"""Do the stated attention heads and LayerNorm epsilon fit a released MAE decoder?

A MAE checkpoint's weights fix every shape but two facts of the function: the head count
(``qkv`` is ``[3d, d]`` whatever count divides ``d``) and every LayerNorm's epsilon. So the
user writes them, and a wrong value that divides the width still builds, loads, and gives the
audit wrong latents. Where the checkpoint carries its decoder, its own objective tells: the
released weights were trained to reconstruct masked patches under the true architecture, so
the masked reconstruction loss on a few audit images is lowest there.
:func:`check_heads_and_eps` scores the stated setting against every head count that divides
the width (and the decoder's, where the user stated that too) and the usual epsilons, and
refuses a setting that another candidate clearly beats (:data:`RULE`).

Candidates move one field at a time away from the stated setting, so their number is the sum,
not the product, of the fields' options (29 for a ViT-B). Every candidate is screened on a few
images under one mask; the stated setting and the best screened ones are then scored on all
images under :data:`NUM_MASKS` masks, and only that decides. Each scores the same images under
the same fixed masks (:mod:`mimia.masking`), through the model's own forward and loss. (A ViT-B
on one CPU core: about 0.3 s per image and mask, so a few minutes in all.)
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Any

import torch

from mimia.masking import mask_from_noise, mask_noise
from mimia.models import build_model
from mimia.models.base import MIMModel
from mimia.models.spec import ModelSpec, architecture, config_key

__all__ = [
    "CHECKED_FIELDS",
    "EPS_CANDIDATES",
    "RULE",
    "ImplausibleArchitectureError",
    "candidate_settings",
    "check_heads_and_eps",
    "check_import",
]

CHECKED_FIELDS = ("num_heads", "decoder_num_heads", "norm_eps")
# The epsilons released MAEs use: HF ViTMAEConfig's layer_norm_eps, the official MAE's and
# timm ViT's partial(nn.LayerNorm, eps=1e-6), and torch's nn.LayerNorm default.
EPS_CANDIDATES = (1e-12, 1e-6, 1e-5)
MASK_RATIO = 0.75  # MAE's training ratio: the loss the decoder was trained on
NUM_MASKS = 2
MASK_SEED = 0
MAX_IMAGES = 32
MIN_IMAGES = 8  # fewer give no usable spread of the paired differences
SCREEN_IMAGES = 8  # the first images, under the first mask, rank every candidate
FINALISTS = 2  # the best screened candidates scored in full beside the stated setting
# "Clearly beats": a wrong setting is refused only when the best finalist's mean loss is below
# the stated one's by more than RELATIVE_MARGIN of it AND by more than MIN_Z standard errors of
# the per-image paired differences (same images, same masks). In tests/test_plausibility.py a
# wrong head count misses the true one's loss by 54 % or more (of the wrong one's), while
# weights with no head layout (an untrained model) let some candidate beat any stated setting
# by up to 8 %, with a paired z near 20: such differences are systematic, so the z-test alone
# cannot tell them from a real gap, and the margin stays 3x above them. Epsilons are a near
# tie (0.1 %): a wrong one is not caught, and not refused.
RELATIVE_MARGIN = 0.25
MIN_Z = 5.0
RULE = (
    f"refused if the best candidate's mean masked loss is lower than the stated setting's by "
    f"more than {RELATIVE_MARGIN:.0%} of it and by more than {MIN_Z:g} standard errors of the "
    f"per-image paired differences"
)


class ImplausibleArchitectureError(ValueError):
    """The stated heads or epsilon reconstruct clearly worse than another candidate."""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _setting(spec: ModelSpec) -> dict[str, Any]:
    arch = architecture(spec)
    return {k: arch[k] for k in CHECKED_FIELDS}


def _with(spec: ModelSpec, setting: dict[str, Any]) -> ModelSpec:
    overrides = {**spec.encoder_overrides, "num_heads": setting["num_heads"]}
    return replace(
        spec,
        encoder_overrides=overrides,
        decoder_num_heads=setting["decoder_num_heads"],
        norm_eps=setting["norm_eps"],
    )


def candidate_settings(spec: ModelSpec, vary: Iterable[str]) -> list[dict[str, Any]]:
    """The stated setting first, then each one-field change of it that ``vary`` allows."""
    stated = _setting(spec)
    arch = architecture(spec)
    options = {
        "num_heads": _divisors(arch["embed_dim"]),
        "decoder_num_heads": _divisors(arch["decoder_embed_dim"]),
        "norm_eps": sorted({*EPS_CANDIDATES, stated["norm_eps"]}),
    }
    out = [stated]
    for field in CHECKED_FIELDS:
        if field in set(vary):
            out += [stated | {field: v} for v in options[field] if v != stated[field]]
    return out


def _per_image_losses(
    model: MIMModel, images: torch.Tensor, masks: torch.Tensor, batch: int = 32
) -> torch.Tensor:
    """Mean masked loss of each image over its masks: ``[N]`` from ``masks`` ``[N, K, L]``."""
    n, k = masks.shape[:2]
    imgs = images.repeat_interleave(k, dim=0)
    flat = masks.reshape(n * k, -1)
    with torch.inference_mode():
        losses = torch.cat(
            [model(imgs[i : i + batch], flat[i : i + batch])[0] for i in range(0, n * k, batch)]
        )
    return losses.double().reshape(n, k).mean(dim=1)


def _candidate(model: MIMModel, setting: dict[str, Any]) -> MIMModel:
    """The imported model's weights in a model built from the candidate's spec: the forward
    and loss are exactly those the audit would run under that setting."""
    # Built on the meta device: a ViT-B's throwaway initialisation takes seconds per
    # candidate, and every weight is overwritten anyway. Buffers outside the state dict (the
    # pixel mean and std) are the imported model's.
    state = model.state_dict()
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        candidate = build_model(_with(model.spec, setting))
    candidate = candidate.to_empty(device=device)
    candidate.load_state_dict(state, strict=True)
    for name, buf in model.named_buffers():
        if name not in state:
            candidate.get_buffer(name).copy_(buf)
    return candidate.eval()


def _describe(setting: dict[str, Any]) -> str:
    return ", ".join(f"{config_key(k)}={setting[k]!r}" for k in CHECKED_FIELDS)


def check_heads_and_eps(
    model: MIMModel,
    images: torch.Tensor,
    sample_ids: Sequence[str],
    vary: Iterable[str],
    what: str = "the target checkpoint",
) -> dict[str, Any]:
    """Refuse a stated head count or epsilon that another candidate clearly beats.

    ``model``: the imported MAE, built with the stated spec and carrying its released decoder;
    ``images``: ``[N, C, H, W]`` in [0, 1] (the first :data:`MAX_IMAGES` are used), named by
    ``sample_ids`` (each image's masks are a function of its id); ``vary``: the fields of
    :data:`CHECKED_FIELDS` that the user stated rather than the checkpoint recorded.

    Prints every candidate's loss to stderr (the job's log) and returns a JSON-serialisable
    record for the import's info; raises :class:`ImplausibleArchitectureError` naming both
    settings, both losses and the config keys to change.
    """
    if len(images) != len(sample_ids):
        raise ValueError(f"{len(images)} images but {len(sample_ids)} sample ids")
    vary = [f for f in CHECKED_FIELDS if f in set(vary)]
    spec = model.spec
    record: dict[str, Any] = {"ran": False, "rule": RULE, "varied": vary}
    skip = None
    if spec.recipe != "mae":
        skip = f"recipe {spec.recipe!r} has no MAE decoder to score"
    elif not vary:
        skip = "the checkpoint records heads and LayerNorm eps: nothing stated to check"
    elif len(images) < MIN_IMAGES:
        skip = f"{len(images)} images given, at least {MIN_IMAGES} are needed"
    if skip:
        print(f"plausibility check of {what} did not run: {skip}", file=sys.stderr, flush=True)
        return record | {"outcome": "skipped", "reason": skip}

    device = next(model.parameters()).device
    ids = list(sample_ids[:MAX_IMAGES])
    images = images[: len(ids)].float().to(device)
    noise = mask_noise(MASK_SEED, ids, MASK_RATIO, range(NUM_MASKS), spec.num_patches)
    masks = mask_from_noise(noise, MASK_RATIO).to(device)
    screen = (images[:SCREEN_IMAGES], masks[:SCREEN_IMAGES, :1])
    settings = candidate_settings(spec, vary)
    screened = [_per_image_losses(_candidate(model, s), *screen).mean().item() for s in settings]
    order = sorted(range(1, len(settings)), key=screened.__getitem__)
    final = {
        i: _per_image_losses(_candidate(model, settings[i]), images, masks)
        for i in [0, *order[:FINALISTS]]
    }

    stated, stated_losses = settings[0], final[0]
    b = min(final, key=lambda i: final[i].mean().item())  # the stated setting wins ties
    best, best_losses = settings[b], final[b]
    diff = stated_losses - best_losses
    n = len(diff)
    gap = diff.mean().item()
    se = diff.std(unbiased=True).item() / math.sqrt(n)
    z = gap / se if se > 0 else (math.inf if gap > 0 else 0.0)
    relative = gap / stated_losses.mean().item()
    refused = b != 0 and relative > RELATIVE_MARGIN and z > MIN_Z

    lines = [
        f"plausibility check of {what}: masked loss (ratio {MASK_RATIO}) on "
        f"{min(SCREEN_IMAGES, n)} audit images under 1 fixed mask, for each candidate:"
    ]
    for i in [0, *order]:
        mark = "  <- stated" if i == 0 else ""
        lines.append(f"  {screened[i]:.6f}  {_describe(settings[i])}{mark}")
    lines.append(f"on all {n} images under {NUM_MASKS} fixed masks each:")
    for i in sorted(final, key=lambda i: final[i].mean().item()):
        mark = "  <- stated" if i == 0 else ""
        lines.append(f"  {final[i].mean().item():.6f}  {_describe(settings[i])}{mark}")
    lines.append(
        f"best vs stated: {relative:+.1%} of the stated loss, paired z {z:.1f}; {RULE}: "
        f"{'REFUSED' if refused else 'passed'}"
    )
    print("\n".join(lines), file=sys.stderr, flush=True)

    record |= {
        "ran": True,
        "outcome": "refused" if refused else "passed",
        "images": n,
        "masks_per_image": NUM_MASKS,
        "mask_ratio": MASK_RATIO,
        "mask_seed": MASK_SEED,
        "screen_images": min(SCREEN_IMAGES, n),
        "stated": stated,
        "stated_loss": stated_losses.mean().item(),
        "best": best,
        "best_loss": best_losses.mean().item(),
        "relative_gap": relative,
        "paired_z": z,
        "candidates": [{**s, "screen_loss": x} for s, x in zip(settings, screened, strict=True)],
        "finalists": [{**settings[i], "loss": losses.mean().item()} for i, losses in final.items()],
    }
    if refused:
        changed = [config_key(k) for k in CHECKED_FIELDS if best[k] != stated[k]]
        raise ImplausibleArchitectureError(
            f"{what}: the stated {_describe(stated)} reconstructs masked patches of {n} audit "
            f"images with mean loss {stated_losses.mean().item():.6g}, but "
            f"{_describe(best)} gives {best_losses.mean().item():.6g} ({relative:.0%} lower, "
            f"paired z {z:.1f}; {RULE}). Its released decoder was trained under the true "
            f"architecture, so the stated one is very likely wrong: check {', '.join(changed)} "
            f"in the experiment's model section against the checkpoint's source"
        )
    return record


def check_import(
    model: MIMModel,
    info: dict[str, Any],
    images: torch.Tensor | None,
    sample_ids: Sequence[str] = (),
    what: str = "the target checkpoint",
) -> dict[str, Any]:
    """:func:`check_heads_and_eps` as an import runs it, from the importer's ``info``: on the
    released decoder only, varying only the fields the checkpoint does not record. Where it
    cannot run it logs why and records that."""
    vary = [f for f in CHECKED_FIELDS if f in set(info.get("unrecorded", ()))]
    skip = None
    if not vary:
        skip = "the checkpoint records heads and LayerNorm eps: nothing stated to check"
    elif info.get("decoder_ignored"):
        skip = (
            "the checkpoint's decoder is not used in this run's decoder modes (encoder only), "
            "so its heads and norm_pix_loss are not stated"
        )
    elif not info.get("decoder_released"):
        skip = "the checkpoint carries no decoder to reconstruct with"
    elif images is None:
        skip = "no audit images were given (the import job reads them for decoder 'released')"
    if skip:
        print(f"plausibility check of {what} did not run: {skip}", file=sys.stderr, flush=True)
        return {"ran": False, "outcome": "skipped", "reason": skip, "rule": RULE}
    return check_heads_and_eps(model, images, sample_ids, vary, what)
