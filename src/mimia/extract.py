"""Reconstruction errors under deterministic masks, streamed shard by shard to Parquet.

Each image is scored under ``K`` masks per mask ratio; the ``B x K`` (image, mask) pairs of a
batch run as one stacked forward. Rows go out in record batches, so memory does not grow with
the number of images.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader

from mimia.data.shards import shard_dataset
from mimia.masking import deterministic_masks
from mimia.models.base import MIMModel

ERROR_SCHEMA = pa.schema(
    [
        ("sample_id", pa.string()),
        ("role", pa.string()),
        ("is_member", pa.bool_()),
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


@torch.inference_mode()
def score_batch(
    model: MIMModel,
    imgs: torch.Tensor,
    sample_ids: Sequence[str],
    seed: int,
    mask_ratio: float,
    num_masks: int,
) -> dict[str, torch.Tensor]:
    """Errors ``[B, K]`` of uint8 ``imgs`` under the K deterministic masks of each sample."""
    spec = model.spec
    device = next(model.parameters()).device
    masks = deterministic_masks(
        seed, sample_ids, mask_ratio, range(num_masks), spec.grid_size, spec.mask_block
    ).to(device)
    b, k = masks.shape[:2]
    x = model.normalize(imgs.to(device, non_blocking=True).float().div_(255))
    x = x.repeat_interleave(k, dim=0)
    flat_mask = masks.reshape(b * k, -1)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )
    with autocast:
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


def extract_shard(
    model: MIMModel,
    shard: str | Path,
    out_path: str | Path,
    *,
    model_name: str,
    decoder: str,
    is_member: Callable[[str], bool],
    seed: int,
    mask_ratios: Sequence[float],
    num_masks: int,
    batch_size: int = 64,
    num_workers: int = 1,
    metadata: dict[str, str] | None = None,
) -> int:
    """Write one shard's long-format error table; returns the number of rows."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    schema = ERROR_SCHEMA.with_metadata(metadata or {})
    rows = 0
    with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        for ids, imgs, roles in shard_loader([shard], batch_size, num_workers):
            for ratio in mask_ratios:
                res = score_batch(model, imgs, ids, seed, ratio, num_masks)
                b = len(ids)
                table = {
                    "sample_id": [s for s in ids for _ in range(num_masks)],
                    "role": [r for r in roles for _ in range(num_masks)],
                    "is_member": [is_member(s) for s in ids for _ in range(num_masks)],
                    "model": [model_name] * (b * num_masks),
                    "decoder": [decoder] * (b * num_masks),
                    "mask_ratio": [float(ratio)] * (b * num_masks),
                    "mask_index": list(range(num_masks)) * b,
                }
                table |= {name: v.reshape(-1).numpy() for name, v in res.items()}
                writer.write_batch(pa.RecordBatch.from_pydict(table, schema=schema))
                rows += b * num_masks
    os.replace(tmp, out_path)
    return rows


def scoring_model(decoder: str, checkpoints: dict[str, str | Path], device: str = "cpu") -> MIMModel:
    """The model that scores images: the audited encoder with the decoder ``decoder`` names.

    ``checkpoints`` holds ``model`` (the audited model, or for ``adapted`` the adapted model)
    and, for ``shadow``, ``shadow`` (whose decoder goes on the model's encoder).
    """
    from mimia.decoders import DECODER_MODES, attach_decoder
    from mimia.models.checkpoint import load_model

    if decoder not in DECODER_MODES:
        raise ValueError(f"decoder {decoder!r} is not one of {DECODER_MODES}")
    model = load_model(checkpoints["model"])
    if decoder == "shadow":
        model = attach_decoder(model, load_model(checkpoints["shadow"]))
    return model.to(device).eval()


def extract_stage(
    exp: dict,
    model_name: str,
    decoder: str,
    checkpoints: dict[str, str | Path],
    shard_file: str | Path,
    manifest_path: str | Path,
    membership_path: str | Path,
    out_path: str | Path,
    num_workers: int | None = None,
) -> int:
    import polars as pl

    from mimia.data.splits import manifest_hash, membership_lookup
    from mimia.models.checkpoint import file_sha256
    from mimia.pretrain import resolve_device
    from mimia.provenance import provenance

    manifest = pl.read_parquet(manifest_path)
    members = membership_lookup(model_name, manifest, pl.read_parquet(membership_path))
    device = resolve_device(exp["pretrain"]["device"])
    model = scoring_model(decoder, checkpoints, device=str(device))
    cfg = exp["extract"]
    meta = provenance(
        seed=exp["seed"],
        manifest_sha256=manifest_hash(manifest),
        checkpoint_sha256={k: file_sha256(v) for k, v in checkpoints.items()},
        model=model_name,
        decoder=decoder,
        mask_ratios=cfg["mask_ratios"],
        num_masks=cfg["num_masks"],
    )
    return extract_shard(
        model,
        shard_file,
        out_path,
        model_name=model_name,
        decoder=decoder,
        is_member=members.__getitem__,
        seed=exp["seed"],
        mask_ratios=cfg["mask_ratios"],
        num_masks=cfg["num_masks"],
        batch_size=cfg["batch_size"],
        num_workers=cfg["num_workers"] if num_workers is None else num_workers,
        metadata=meta,
    )


def collect_errors(paths: Sequence[str | Path], out_path: str | Path) -> None:
    """Concatenate per-shard error tables; all must come from the same split and seed."""
    import polars as pl

    from mimia.provenance import provenance, read_metadata, write_parquet

    metas = [read_metadata(p) for p in paths]
    for key in ("manifest_sha256", "seed"):
        values = {m.get(key) for m in metas}
        if len(values) != 1:
            raise ValueError(f"error tables disagree on {key}: {sorted(map(str, values))}")
    df = pl.concat([pl.read_parquet(p) for p in paths])
    meta = provenance(seed=metas[0]["seed"], manifest_sha256=metas[0]["manifest_sha256"])
    write_parquet(df, out_path, meta)
