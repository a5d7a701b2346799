"""The data stage: the split manifest, shadow membership and role shards, from a config."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from mimia.data.sources import load_source
from mimia.data.splits import (
    ROLES,
    assigned_roles,
    manifest_hash,
    read_assignment,
    shadow_membership,
    split_roles,
)
from mimia.layout import shadow_index
from mimia.provenance import provenance, read_metadata, write_parquet


def write_manifest(*, dataset: dict, split: dict, seed: int, manifest) -> pl.DataFrame:
    """The seeded (or given) role split of ``dataset``, as a Parquet manifest."""
    source = load_source(dataset)
    sizes = {role: split[role] for role in ROLES}
    if split.get("assignment"):
        assignment = read_assignment(split["assignment"])
        rows = assigned_roles(assignment, source.keys, dataset["name"], source.labels)
    else:
        rows = split_roles(
            len(source),
            sizes,
            seed,
            dataset["name"],
            source.labels,
            shadow_classes=split.get("shadow_classes"),
        )
    meta = provenance(seed=seed, manifest_sha256=manifest_hash(rows), dataset=dataset["name"])
    write_parquet(rows, manifest, meta)
    return rows


def write_membership(*, manifest, model: str, online: bool, seed: int, membership) -> pl.DataFrame:
    """Which adversary images train shadow model ``model``: ``sample_id, model, is_in``."""
    rows = pl.read_parquet(manifest)
    index = shadow_index(model)
    table = shadow_membership(rows, index + 1, seed, online).filter(pl.col("model") == model)
    meta = provenance(seed=seed, manifest_sha256=read_metadata(manifest)["manifest_sha256"])
    write_parquet(table, membership, meta)
    return table


def write_shard(*, dataset: dict, shard_size: int, manifest, role: str, index: int, shard) -> None:
    """Write shard ``index`` of ``role``: rows ``[index * shard_size, (index + 1) * shard_size)``
    of the role's manifest rows in sample-id order."""
    size = shard_size
    rows = (
        pl.read_parquet(manifest)
        .filter(pl.col("role") == role)
        .sort("sample_id")
        .slice(index * size, size)
    )
    from mimia.data.shards import write_tar_shard

    if rows.is_empty():
        raise ValueError(f"shard {index} of role {role!r} would be empty (shard_size {size})")
    write_tar_shard(rows, load_source(dataset), dataset["img_size"], Path(shard))
