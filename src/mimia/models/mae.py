"""Masked autoencoder, as facebookresearch/mae ``models_mae.py``, on a timm ViT encoder."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn

from mimia.models.base import MIMModel, build_vit_encoder, init_weights_like_mae, layer_norm
from mimia.models.pos_embed import sincos_2d
from mimia.models.spec import ModelSpec


class MAEDecoder(nn.Module):
    def __init__(self, spec: ModelSpec, embed_dim: int) -> None:
        super().__init__()
        dim = spec.decoder_embed_dim
        self.decoder_embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        pos = sincos_2d(dim, spec.grid_size, cls_token=True)
        self.decoder_pos_embed = nn.Parameter(
            torch.from_numpy(pos).float().unsqueeze(0), requires_grad=False
        )
        norm = layer_norm(spec)
        self.decoder_blocks = nn.ModuleList(
            Block(dim, spec.decoder_num_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm)
            for _ in range(spec.decoder_depth)
        )
        self.decoder_norm = norm(dim)
        self.decoder_pred = nn.Linear(dim, spec.patch_size**2 * spec.in_chans)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)
        b, n_vis, d = x.shape[0], x.shape[1] - 1, x.shape[2]
        mask_tokens = self.mask_token.expand(b, ids_restore.shape[1] - n_vis, d)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, d))
        x = torch.cat([x[:, :1], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]


def shuffle_ids(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Visible patches first (stable), and the permutation that undoes it."""
    ids_shuffle = torch.argsort(mask.to(torch.int8), dim=1, stable=True)
    return ids_shuffle, torch.argsort(ids_shuffle, dim=1)


class MAE(MIMModel):
    """Visible-only encoder, light decoder with mask tokens, MSE on masked patches."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__(spec)
        self.encoder = build_vit_encoder(spec)
        self.decoder = MAEDecoder(spec, self.encoder.embed_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        w = self.encoder.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.decoder.mask_token, std=0.02)
        for name, module in self.named_modules():
            if name != "encoder.patch_embed.proj":
                init_weights_like_mae(module)

    def encode(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        enc = self.encoder
        tokens = enc.patch_embed(x) + enc.pos_embed[:, 1:]
        lo, hi = torch.aminmax((~mask).sum(dim=1))
        n_keep, hi = torch.stack([lo, hi]).tolist()
        if n_keep != hi:  # a ragged batch would silently gather masked patches as visible
            raise ValueError(
                f"MAE needs the same number of visible patches in every mask, got {n_keep}..{hi}"
            )
        ids_keep = shuffle_ids(mask)[0][:, :n_keep]
        tokens = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        tokens = enc.norm_pre(torch.cat([cls, tokens], dim=1))
        return enc.norm(enc.blocks(tokens))

    def decode(self, latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.decoder(latent, shuffle_ids(mask)[1])

    def target(self, x: torch.Tensor) -> torch.Tensor:
        target = self.patchify(x)
        if self.spec.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def patch_errors(self, x: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        return ((pred - self.target(x)) ** 2).mean(dim=-1)

    def reconstruct(self, imgs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        if self.spec.norm_pix_loss:
            patches = self.patchify(self.normalize(imgs))
            mean = patches.mean(dim=-1, keepdim=True)
            std = (patches.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5
            pred = pred * std + mean
        return super().reconstruct(imgs, pred)
