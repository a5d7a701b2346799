"""What every MIM model offers the rest of mimia, whichever recipe trained it.

Images enter in [0, 1] as ``[B, C, H, W]``; masks are explicit bool tensors ``[B, L]`` over
patches (True = masked), never drawn from hidden global RNG. ``encoder`` is a timm
VisionTransformer and ``decoder`` a separate module, so a decoder can be swapped onto
another model's encoder (the encoder-only threat model).
"""

from __future__ import annotations

from functools import partial

import timm
import torch
from torch import nn

from mimia.models.pos_embed import sincos_2d
from mimia.models.spec import ModelSpec


def build_vit_encoder(spec: ModelSpec) -> nn.Module:
    """A timm ViT with a cls token and a fixed sin-cos position embedding, no head."""
    vit = timm.create_model(
        spec.encoder,
        pretrained=False,
        img_size=spec.img_size,
        patch_size=spec.patch_size,
        in_chans=spec.in_chans,
        num_classes=0,
        global_pool="token",
        class_token=True,
        norm_layer=layer_norm(spec),
        **spec.encoder_overrides,
    )
    if not hasattr(vit, "blocks") or vit.cls_token is None:
        raise ValueError(f"encoder {spec.encoder!r} is not a timm VisionTransformer with cls token")
    pos = sincos_2d(vit.embed_dim, spec.grid_size, cls_token=True)
    vit.pos_embed = nn.Parameter(torch.from_numpy(pos).float().unsqueeze(0), requires_grad=False)
    return vit


def layer_norm(spec: ModelSpec) -> partial[nn.LayerNorm]:
    """Every LayerNorm of a model: the epsilon is part of the function, not of the weights."""
    return partial(nn.LayerNorm, eps=spec.norm_eps)


def init_weights_like_mae(module: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform linears, unit layer norms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class MIMModel(nn.Module):
    spec: ModelSpec
    encoder: nn.Module
    decoder: nn.Module

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        shape = (1, spec.in_chans, 1, 1)
        self.register_buffer("pixel_mean", torch.tensor(spec.mean).view(shape), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(spec.std).view(shape), persistent=False)

    # -- pixels and patches ---------------------------------------------------------------
    def normalize(self, imgs: torch.Tensor) -> torch.Tensor:
        return (imgs - self.pixel_mean) / self.pixel_std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.pixel_std + self.pixel_mean

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, L, p*p*C]`` in MAE's (p, q, c) order."""
        p, h = self.spec.patch_size, self.spec.grid_size
        x = x.reshape(x.shape[0], self.spec.in_chans, h, p, h, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(x.shape[0], h * h, p * p * x.shape[1])

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        p, h, c = self.spec.patch_size, self.spec.grid_size, self.spec.in_chans
        x = x.reshape(x.shape[0], h, h, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, h * p)

    # -- the recipe -----------------------------------------------------------------------
    def encode(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Latent tokens of normalised images under ``mask``."""
        raise NotImplementedError

    def decode(self, latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Per-patch pixel predictions ``[B, L, p*p*C]`` in the loss's target space."""
        raise NotImplementedError

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """What the decoder is trained to predict, patchified."""
        return self.patchify(x)

    def patch_errors(self, x: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """The recipe's per-patch reconstruction loss ``[B, L]``."""
        raise NotImplementedError

    def forward(self, imgs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample masked loss ``[B]`` and predictions, for images in [0, 1]."""
        x = self.normalize(imgs)
        pred = self.decode(self.encode(x, mask), mask)
        errors = self.patch_errors(x, pred)
        m = mask.to(errors.dtype)
        return (errors * m).sum(-1) / m.sum(-1), pred

    def reconstruct(self, imgs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Predictions back in [0, 1] pixel space (per-patch statistics undone if needed)."""
        return self.denormalize(self.unpatchify(pred)).clamp(0, 1)
