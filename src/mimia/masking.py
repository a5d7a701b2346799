"""Deterministic patch masks.

A mask is a pure function of ``(seed, sample_id, mask_ratio, mask_index)``: every model scores
every image under exactly the same masks, whatever the batch, shard, worker or machine. Masks
come from per-patch uniform noise (MAE's ``random_masking`` keeps the patches with the lowest
noise), so the same noise tensor can be handed to HuggingFace's ``ViTMAEForPreTraining`` as
its ``noise`` argument and both implementations see identical masks.

Noise is a counter-based hash (splitmix64) of the key and the patch index, vectorised in numpy:
no global RNG state, no per-sample generator objects.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import torch

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (x ^ (x >> np.uint64(31))) & _MASK64


def _key(seed: int, sample_id: str, mask_ratio: float, mask_index: int) -> int:
    text = f"{seed}|{sample_id}|{mask_ratio:.6f}|{mask_index}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


def mask_noise(
    seed: int,
    sample_ids: Sequence[str],
    mask_ratio: float,
    mask_indices: Sequence[int],
    num_cells: int,
) -> torch.Tensor:
    """Uniform noise in [0, 1) of shape ``[len(sample_ids), len(mask_indices), num_cells]``."""
    keys = np.array(
        [[_key(seed, sid, mask_ratio, k) for k in mask_indices] for sid in sample_ids],
        dtype=np.uint64,
    ).reshape(len(sample_ids), len(mask_indices), 1)
    cells = np.arange(num_cells, dtype=np.uint64).reshape(1, 1, -1)
    with np.errstate(over="ignore"):
        bits = _splitmix64(_splitmix64(keys) ^ (cells * np.uint64(0xD1B54A32D192ED03)))
    # 53 high bits give an exactly representable double in [0, 1).
    noise = (bits >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    return torch.from_numpy(noise.astype(np.float32))


def num_masked(num_cells: int, mask_ratio: float) -> int:
    """Masked cell count, as MAE computes it: ``L - int(L * (1 - ratio))``."""
    return num_cells - int(num_cells * (1 - mask_ratio))


def mask_from_noise(noise: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """MAE's rule: the ``int(L * (1 - ratio))`` lowest-noise cells stay visible.

    Returns a bool tensor of the noise's shape, True where the cell is masked.
    """
    num_cells = noise.shape[-1]
    len_keep = int(num_cells * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=-1)
    mask = torch.ones_like(noise, dtype=torch.bool)
    mask.scatter_(-1, ids_shuffle[..., :len_keep], False)
    return mask


def upsample_block_mask(mask: torch.Tensor, coarse_grid: int, scale: int) -> torch.Tensor:
    """SimMIM's block masks: a mask on a coarse grid repeated ``scale`` x ``scale`` per cell."""
    lead = mask.shape[:-1]
    grid = mask.reshape(*lead, coarse_grid, coarse_grid)
    grid = grid.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    return grid.reshape(*lead, (coarse_grid * scale) ** 2)


def deterministic_masks(
    seed: int,
    sample_ids: Sequence[str],
    mask_ratio: float,
    mask_indices: Sequence[int],
    grid_size: int,
    block_size: int = 1,
) -> torch.Tensor:
    """Bool masks ``[B, K, grid_size**2]`` over model patches (True = masked).

    ``block_size`` > 1 draws the mask on a coarser grid of ``grid_size / block_size`` cells per
    side and upsamples it (SimMIM's ``mask_patch_size / model_patch_size``).
    """
    if grid_size % block_size:
        raise ValueError(
            f"mask block size {block_size} patches does not divide the patch grid {grid_size}"
        )
    coarse = grid_size // block_size
    noise = mask_noise(seed, sample_ids, mask_ratio, mask_indices, coarse * coarse)
    mask = mask_from_noise(noise, mask_ratio)
    return upsample_block_mask(mask, coarse, block_size) if block_size > 1 else mask


def random_masks(
    batch: int,
    num_patches: int,
    mask_ratio: float,
    generator: torch.Generator | None = None,
    block_size: int = 1,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Fresh random masks for training, drawn from an explicit generator."""
    grid = math.isqrt(num_patches)
    coarse = grid // block_size
    noise = torch.rand(batch, coarse * coarse, generator=generator, device=device)
    mask = mask_from_noise(noise, mask_ratio)
    return upsample_block_mask(mask, coarse, block_size) if block_size > 1 else mask
