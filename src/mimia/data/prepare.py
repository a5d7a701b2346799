"""The data stage: the split manifest, shadow membership and role shards, from a config."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from mimia.data.shards import write_tar_shard
from mimia.data.sources import load_source
from mimia.data.splits import (
    ROLES,
    assigned_roles,
    manifest_hash,
    read_assignment,
    shadow_membership,
    split_roles,
)
from mimia.provenance import provenance, write_parquet


def write_split(exp: dict, manifest_path: str | Path, membership_path: str | Path) -> pl.DataFrame:
    source = load_source(exp["dataset"])
    sizes = {role: exp["split"][role] for role in ROLES}
    if exp["split"].get("assignment"):
        assignment = read_assignment(exp["split"]["assignment"])
        manifest = assigned_roles(assignment, source.keys, exp["dataset"]["name"], source.labels)
    else:
        manifest = split_roles(
            len(source),
            sizes,
            exp["seed"],
            exp["dataset"]["name"],
            source.labels,
            shadow_classes=exp["split"].get("shadow_classes"),
        )
    meta = provenance(
        seed=exp["seed"], manifest_sha256=manifest_hash(manifest), dataset=exp["dataset"]["name"]
    )
    write_parquet(manifest, manifest_path, meta)
    membership = shadow_membership(
        manifest, exp["shadow"]["count"], exp["seed"], exp["shadow"]["online"]
    )
    write_parquet(membership, membership_path, meta)
    return manifest


def write_shard(
    exp: dict, manifest_path: str | Path, role: str, index: int, out: str | Path
) -> None:
    """Write shard ``index`` of ``role``: rows ``[index * shard_size, (index + 1) * shard_size)``
    of the role's manifest rows in sample-id order."""
    size = exp["split"]["shard_size"]
    rows = (
        pl.read_parquet(manifest_path)
        .filter(pl.col("role") == role)
        .sort("sample_id")
        .slice(index * size, size)
    )
    if rows.is_empty():
        raise ValueError(f"shard {index} of role {role!r} would be empty (shard_size {size})")
    write_tar_shard(rows, load_source(exp["dataset"]), exp["dataset"]["img_size"], Path(out))
