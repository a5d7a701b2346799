"""Reconstruction errors under deterministic masks, streamed shard by shard to Parquet.

Each image is scored under ``K`` masks per mask ratio; the ``B x K`` (image, mask) pairs of a
batch run as one stacked forward. Rows go out in record batches, so memory does not grow with
the number of images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader

from mimia.data.shards import shard_dataset
from mimia.models.base import MIMModel
from mimia.models.scoring import attach_decoder, score_batch
from mimia.storage import atomic_path

# No role or membership label: an error table says how well a model reconstructs an image,
# nothing about the image's role. Labels are joined from the manifest at attack time, so that
# extraction depends on neither the shadow membership nor the target's labels.
ERROR_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("model", pa.string()),
        ("decoder", pa.string()),
        ("mask_ratio", pa.float32()),
        ("mask_index", pa.int16()),
        ("error", pa.float32()),
        ("error_all", pa.float32()),
        ("patch_error_min", pa.float32()),
        ("patch_error_median", pa.float32()),
        ("patch_error_max", pa.float32()),
    ]
)


def _collate(batch):
    ids, imgs, roles = zip(*batch, strict=True)
    return list(ids), torch.stack(imgs), list(roles)


def shard_loader(paths: Sequence[str | Path], batch_size: int, num_workers: int) -> DataLoader:
    """Batches of ``(sample_ids, uint8 images, roles)``; workers decode while the model runs."""
    return DataLoader(
        shard_dataset(paths),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )


def extract_shard(
    model: MIMModel,
    shard: str | Path,
    out_path: str | Path,
    *,
    model_name: str,
    decoder: str,
    seed: int,
    mask_ratios: Sequence[float],
    num_masks: int,
    batch_size: int = 64,
    num_workers: int = 1,
    metadata: dict[str, str] | None = None,
    precision: str = "auto",
) -> int:
    """Write one shard's long-format error table; returns the number of rows."""
    schema = ERROR_SCHEMA.with_metadata(metadata or {})
    rows = 0
    with atomic_path(out_path) as tmp, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for ids, imgs, _ in shard_loader([shard], batch_size, num_workers):
            for ratio in mask_ratios:
                res = score_batch(model, imgs, ids, seed, ratio, num_masks, precision)
                b = len(ids)
                table = {
                    "sample_id": [s for s in ids for _ in range(num_masks)],
                    "model": [model_name] * (b * num_masks),
                    "decoder": [decoder] * (b * num_masks),
                    "mask_ratio": [float(ratio)] * (b * num_masks),
                    "mask_index": list(range(num_masks)) * b,
                }
                table |= {name: v.reshape(-1).numpy() for name, v in res.items()}
                writer.write_batch(pa.RecordBatch.from_pydict(table, schema=schema))
                rows += b * num_masks
    return rows


def scoring_model(
    decoder: str, checkpoints: dict[str, str | Path], device: str = "cpu"
) -> MIMModel:
    """The model that scores images: the audited encoder with the decoder ``decoder`` names.

    ``checkpoints`` holds ``model`` (the audited model, or for ``adapted`` the adapted model)
    and, for ``shadow``, ``shadow`` (whose decoder goes on the model's encoder).
    """
    from mimia.layout import DECODER_MODES
    from mimia.models.checkpoint import load_model

    if decoder not in DECODER_MODES:
        raise ValueError(f"decoder {decoder!r} is not one of {DECODER_MODES}")
    model = load_model(checkpoints["model"])
    if decoder == "shadow":
        model = attach_decoder(model, load_model(checkpoints["shadow"]))
    return model.to(device).eval()


def collect_errors(paths: Sequence[str | Path], out_path: str | Path) -> None:
    """Concatenate per-shard error tables; all must come from the same split and seed."""
    import polars as pl

    from mimia.provenance import file_sha256, provenance, read_metadata, write_parquet

    metas = [read_metadata(p) for p in paths]
    for key in ("manifest_sha256", "seed"):
        values = {m.get(key) for m in metas}
        if len(values) != 1:
            raise ValueError(f"error tables disagree on {key}: {sorted(map(str, values))}")
    df = pl.concat([pl.read_parquet(p) for p in paths])
    meta = provenance(
        seed=int(metas[0]["seed"]),
        manifest_sha256=metas[0]["manifest_sha256"],
        inputs_sha256={str(p): file_sha256(p) for p in paths},
    )
    write_parquet(df, out_path, meta)


def augmented_views(
    imgs: torch.Tensor,
    sample_ids: Sequence[str],
    seed: int,
    num_views: int,
    scale: tuple[float, float] = (0.2, 1.0),
) -> torch.Tensor:
    """``[B, V, C, H, W]`` RandomResizedCrop + flip views, a pure function of the sample id.

    The crop parameters come from the same keyed hash as the masks, so every encoder sees the
    same views (EncoderMI's augmented copies).
    """
    from torchvision.transforms.v2 import functional as tvf

    from mimia.masking import mask_noise

    u = mask_noise(seed, sample_ids, -1.0, range(num_views), 5).numpy()
    size = imgs.shape[-1]
    out = torch.empty(imgs.shape[0], num_views, *imgs.shape[1:], dtype=imgs.dtype)
    for b in range(imgs.shape[0]):
        for v in range(num_views):
            s_u, r_u, y_u, x_u, flip_u = u[b, v]
            area = size * size * (scale[0] + (scale[1] - scale[0]) * s_u)
            ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * r_u)
            w = min(size, max(1, round(math.sqrt(area * ratio))))
            h = min(size, max(1, round(math.sqrt(area / ratio))))
            top, left = int(y_u * (size - h + 1)), int(x_u * (size - w + 1))
            view = tvf.resized_crop(imgs[b], top, left, h, w, [size, size], antialias=True)
            out[b, v] = tvf.horizontal_flip(view) if flip_u < 0.5 else view
    return out


@torch.inference_mode()
def encoder_tokens(model: MIMModel, images: torch.Tensor) -> torch.Tensor:
    """The encoder's output tokens ``[B, 1 + L, D]`` (cls first) of uint8 ``images [B, C, H,
    W]`` with every patch visible, as float32."""
    device = next(model.parameters()).device
    x = model.normalize(images.to(device).float() / 255)
    visible = torch.zeros(len(x), model.spec.num_patches, dtype=torch.bool, device=device)
    return model.encode(x, visible).float()


@torch.inference_mode()
def view_similarities(model: MIMModel, views: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarities ``[B, V(V-1)/2]`` of the encoder's cls embeddings."""
    b, v = views.shape[:2]
    tokens = encoder_tokens(model, views.reshape(b * v, *views.shape[2:]))
    emb = torch.nn.functional.normalize(tokens[:, 0], dim=-1)
    emb = emb.reshape(b, v, -1)
    sims = emb @ emb.transpose(1, 2)
    iu = torch.triu_indices(v, v, offset=1)
    return sims[:, iu[0], iu[1]].cpu()


def embed_shards(
    model: MIMModel,
    shard_files: Sequence[str | Path],
    model_name: str,
    seed: int,
    num_views: int,
    batch_size: int,
):
    """EncoderMI features of every image of the shards: ``sample_id, model, similarities``."""
    import polars as pl

    frames = []
    for ids, imgs, _ in shard_loader(shard_files, batch_size, 0):
        sims = view_similarities(model, augmented_views(imgs, ids, seed, num_views))
        frames.append(
            pl.DataFrame({"sample_id": ids, "model": model_name, "similarities": sims.numpy()})
        )
    return pl.concat(frames)
