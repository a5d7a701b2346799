"""Webdataset tar shards: one set per role, images stored as PNG at the model's resolution."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import polars as pl
import torch
import webdataset as wds
from PIL import Image

from mimia.data.sources import ImageSource


def write_tar_shard(rows: pl.DataFrame, source: ImageSource, img_size: int, path: Path) -> None:
    """One tar shard of the manifest ``rows``, images as PNG at ``img_size``; atomic."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with wds.TarWriter(str(tmp)) as sink:
        for row in rows.iter_rows(named=True):
            buf = io.BytesIO()
            Image.fromarray(source.image(row["source_index"], img_size)).save(buf, "PNG")
            sink.write(
                {
                    "__key__": row["sample_id"],
                    "png": buf.getvalue(),
                    "cls": str(row["label"]).encode(),
                    "json": json.dumps(row).encode(),
                }
            )
    os.replace(tmp, path)


def _decode(sample: dict) -> tuple[str, torch.Tensor, str]:
    img = np.array(Image.open(io.BytesIO(sample["png"])).convert("RGB"), dtype=np.uint8)
    meta = json.loads(sample["json"])
    return sample["__key__"], torch.from_numpy(img).permute(2, 0, 1).contiguous(), meta["role"]


def shard_dataset(paths: Sequence[str | Path]) -> wds.WebDataset:
    """Samples ``(sample_id, uint8 image [3, H, W], role)`` in shard order (no shuffling).

    With a DataLoader of several workers, each worker reads whole shards.
    """
    urls = [str(p) for p in paths]
    return wds.WebDataset(urls, shardshuffle=False, empty_check=False).map(_decode)


def iter_shards(paths: Sequence[str | Path]) -> Iterator[tuple[str, torch.Tensor, str]]:
    yield from shard_dataset(paths)


def load_images(paths: Sequence[str | Path], sample_ids: set[str] | None = None):
    """Read shards into memory: sorted sample ids and a uint8 tensor ``[N, 3, H, W]``."""
    items = [
        (sid, img) for sid, img, _ in iter_shards(paths) if sample_ids is None or sid in sample_ids
    ]
    if sample_ids is not None and len(items) != len(sample_ids):
        found = {sid for sid, _ in items}
        missing = sorted(sample_ids - found)[:5]
        count = len(sample_ids) - len(found)
        raise ValueError(f"{count} requested samples are not in the shards, e.g. {missing}")
    items.sort(key=lambda t: t[0])
    return [sid for sid, _ in items], torch.stack([img for _, img in items])
