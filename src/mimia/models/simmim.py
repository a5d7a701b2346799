"""SimMIM (microsoft/SimMIM) on a timm ViT: mask tokens in the encoder, linear head, L1 loss."""

from __future__ import annotations

import torch
from torch import nn

from mimia.models.base import MIMModel, build_vit_encoder, init_weights_like_mae
from mimia.models.spec import ModelSpec


class SimMIMDecoder(nn.Module):
    """1x1 convolution to ``stride**2 * C`` channels and a pixel shuffle, as SimMIM."""

    def __init__(self, spec: ModelSpec, embed_dim: int) -> None:
        super().__init__()
        stride = spec.patch_size
        self.conv = nn.Conv2d(embed_dim, stride**2 * spec.in_chans, kernel_size=1)
        self.shuffle = nn.PixelShuffle(stride)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.conv(feature_map))


class SimMIM(MIMModel):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self.encoder = build_vit_encoder(spec)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.encoder.embed_dim))
        self.decoder = SimMIMDecoder(spec, self.encoder.embed_dim)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.encoder.cls_token, std=0.02)
        self.apply(init_weights_like_mae)

    def encode(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        tokens = enc.patch_embed(x)
        w = mask.unsqueeze(-1).to(tokens.dtype)
        tokens = tokens * (1 - w) + self.mask_token.to(tokens.dtype) * w
        cls = enc.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + enc.pos_embed
        return enc.norm(enc.blocks(enc.norm_pre(tokens)))

    def decode(self, latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, h = latent.shape[0], self.spec.grid_size
        fmap = latent[:, 1:].transpose(1, 2).reshape(b, -1, h, h)
        return self.patchify(self.decoder(fmap))

    def patch_errors(self, x: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        return (pred - self.target(x)).abs().mean(dim=-1)
