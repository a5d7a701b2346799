"""Usage collections given as images: a data owner's own folder or webdataset shards.

A data owner asks how much of *their* collection the target pre-trained on; the collection is
not a role of the split. It is written as one shard and an image table in the manifest's
columns (role ``usage_collection``), so every model scores it as it scores a role shard and
``mimia verify`` checks the shard against the table as it checks role shards.

A collection must lie outside the adversary's data: the reference models trained on those
images, and an image IN for a reference model is not scored the way a candidate is.
Overlap with the target roles is what the audit measures; ``true_fraction`` (the share of the
collection's images, by content, in ``target_member``) is recorded for validation runs only,
where the split is known.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from mimia.data.shards import write_tar_shard
from mimia.data.sources import ImageSource, load_source
from mimia.data.splits import MANIFEST_SCHEMA, duplicate_groups, manifest_hash, manifest_rows_sha256
from mimia.layout import SHADOW_ROLES
from mimia.provenance import provenance, read_metadata, write_parquet

COLLECTION_ROLE = "usage_collection"


def collection_rows(name: str, source_cfg: dict) -> tuple[pl.DataFrame, ImageSource]:
    """One manifest-shaped row per image of the source, in its key order, and the opened
    source (webdataset shards are read into memory once).

    Copies of one image within the collection are refused: the estimate is a fraction of
    distinct images, and a copy would count one image's membership twice."""
    source = load_source(source_cfg)
    if len(source) == 0:
        raise ValueError(f"usage.collections.{name}: source {_where(source_cfg)} holds no images")
    hashes = source.content_hashes()
    groups = duplicate_groups(hashes)
    if groups:
        examples = "; ".join(" = ".join(repr(source.keys[i]) for i in g) for g in groups[:5])
        raise ValueError(
            f"usage.collections.{name}: {len(groups)} images of {_where(source_cfg)} appear "
            f"more than once (same pixels), e.g. {examples}; keep one copy of each"
        )
    labels = source.labels if source.labels is not None else np.full(len(source), -1)
    rows = pl.DataFrame(
        {
            "sample_id": [f"usage-{name}-{i:06d}" for i in range(len(source))],
            "source_index": np.arange(len(source), dtype=np.int64),
            "key": list(source.keys),
            "content_sha256": hashes,
            "label": np.asarray(labels, dtype=np.int64),
            "role": [COLLECTION_ROLE] * len(source),
        },
        schema=MANIFEST_SCHEMA,
    )
    return rows, source


def check_outside_split(name: str, rows: pl.DataFrame, manifest: pl.DataFrame) -> None:
    """Refuse a collection holding an image of the adversary's roles (by content), or one
    whose sample ids collide with the split's."""
    adversary = manifest.filter(pl.col("role").is_in(SHADOW_ROLES))
    shared = rows.join(adversary.select("content_sha256", "key", "role"), on="content_sha256")
    if shared.height:
        examples = ", ".join(
            f"{k!r} (= {r} image {m!r})"
            for k, m, r in shared.select("key", "key_right", "role_right").head(3).iter_rows()
        )
        raise ValueError(
            f"usage.collections.{name}: {shared.height} of its {rows.height} images are the "
            f"adversary's own data (shadow roles), e.g. {examples}: the reference models "
            "trained on them, so they cannot be scored as candidates; remove them from the "
            "collection"
        )
    clash = set(rows["sample_id"]) & set(manifest["sample_id"])
    if clash:
        raise ValueError(
            f"usage.collections.{name}: sample ids {sorted(clash)[:3]} are also the split's"
        )


def true_fraction(rows: pl.DataFrame, manifest: pl.DataFrame) -> float:
    """Share of the collection's images whose content is a ``target_member`` image."""
    members = set(manifest.filter(pl.col("role") == "target_member")["content_sha256"])
    return float(np.mean([h in members for h in rows["content_sha256"]]))


def write_collection(
    *,
    name: str,
    source: dict,
    manifest: str | Path,
    img_size: int,
    table: str | Path,
    shard: str | Path,
    seed: int,
) -> pl.DataFrame:
    """Write the collection's shard (images at ``img_size``) and its image table, whose
    metadata records the collection, its source, the split it was checked against and
    ``true_fraction``. The shard is written first and removed if the table cannot be."""
    split = pl.read_parquet(manifest)
    rows, images = collection_rows(name, source)
    check_outside_split(name, rows, split)
    shard = Path(shard)
    # Each image is checked against its recorded hash again as it is written.
    write_tar_shard(rows, images, img_size, shard)
    meta = provenance(
        seed=seed,
        manifest_sha256=manifest_hash(rows),
        manifest_rows_sha256=manifest_rows_sha256(rows),
        split_manifest_sha256=read_metadata(manifest)["manifest_sha256"],
        collection=name,
        source=source,
        num_images=rows.height,
        true_fraction=true_fraction(rows, split),
    )
    try:
        write_parquet(rows, table, meta)
    except BaseException:
        shard.unlink(missing_ok=True)
        raise
    return rows


def _where(source_cfg: dict) -> str:
    return f"{source_cfg['name']} {source_cfg.get('path') or source_cfg.get('urls')}"
