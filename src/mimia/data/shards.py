"""Webdataset tar shards: one set per role, images stored as PNG at the model's resolution.

Shards are written with :mod:`tarfile` (webdataset imports torch, which the data stages do not
need) with fixed member metadata, so the same rows and images give the same bytes.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl
from PIL import Image

from mimia.data.sources import ImageDecodeError, ImageSource, pixel_sha256, resize
from mimia.storage import atomic_path

if TYPE_CHECKING:
    import torch
    import webdataset as wds


def write_tar_shard(rows: pl.DataFrame, source: ImageSource, img_size: int, path: Path) -> None:
    """One tar shard of the manifest ``rows``, images as PNG at ``img_size``; atomic.

    Each image is found by the row's ``key`` and must still hash to its ``content_sha256``:
    every image is checked before anything is written, so a dataset that changed since the
    split leaves no shard behind.
    """
    position = {k: i for i, k in enumerate(source.keys)}
    encoded, problems = [], []
    for row in rows.iter_rows(named=True):
        i = position.get(row["key"])
        if i is None:
            problems.append((row, f"dataset {source.name!r}", "has no image of this key"))
            continue
        where = source.where(i)
        try:
            pixels = source.native(i)
        except FileNotFoundError:
            problems.append((row, where, "does not exist"))
            continue
        except ImageDecodeError as err:
            raise ImageDecodeError(f"shard {path}: sample {row['sample_id']!r}: {err}") from err
        found = pixel_sha256(pixels)
        if found != row["content_sha256"]:
            problems.append(
                (
                    row,
                    where,
                    f"holds another image (sha256 {found}, manifest has {row['content_sha256']})",
                )
            )
            continue
        buf = io.BytesIO()
        Image.fromarray(resize(pixels, img_size)).save(buf, "PNG")
        encoded.append((row, buf.getvalue()))
    if problems:
        examples = "\n".join(
            f"  sample {row['sample_id']!r}, key {row['key']!r}: {where} {what}"
            for row, where, what in problems[:5]
        )
        raise ValueError(
            f"cannot write shard {path}: {len(problems)} of its {rows.height} images differ "
            f"from the manifest (the dataset changed after the split):\n{examples}\n"
            f"Rerun the split so the manifest describes the dataset as it is now."
        )
    with atomic_path(path) as tmp, tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for row, png in encoded:
            files = {"cls": str(row["label"]).encode(), "json": json.dumps(row).encode()}
            for ext, data in sorted({**files, "png": png}.items()):
                info = tarfile.TarInfo(f"{row['sample_id']}.{ext}")
                info.size, info.mode = len(data), 0o444
                tar.addfile(info, io.BytesIO(data))


def _decode(sample: dict) -> tuple[str, torch.Tensor, str]:
    import torch

    img = np.array(Image.open(io.BytesIO(sample["png"])).convert("RGB"), dtype=np.uint8)
    meta = json.loads(sample["json"])
    return sample["__key__"], torch.from_numpy(img).permute(2, 0, 1).contiguous(), meta["role"]


def shard_dataset(paths: Sequence[str | Path]) -> wds.WebDataset:
    """Samples ``(sample_id, uint8 image [3, H, W], role)`` in shard order (no shuffling).

    With a DataLoader of several workers, each worker reads whole shards.
    """
    import webdataset as wds

    urls = [str(p) for p in paths]
    return wds.WebDataset(urls, shardshuffle=False, empty_check=False).map(_decode)


def load_images(paths: Sequence[str | Path], sample_ids: set[str] | None = None):
    """Read shards into memory: sorted sample ids and a uint8 tensor ``[N, 3, H, W]``."""
    items = [
        (sid, img)
        for sid, img, _ in shard_dataset(paths)
        if sample_ids is None or sid in sample_ids
    ]
    if sample_ids is not None and len(items) != len(sample_ids):
        found = {sid for sid, _ in items}
        missing = sorted(sample_ids - found)[:5]
        count = len(sample_ids) - len(found)
        raise ValueError(f"{count} requested samples are not in the shards, e.g. {missing}")
    import torch

    items.sort(key=lambda t: t[0])
    return [sid for sid, _ in items], torch.stack([img for _, img in items])
