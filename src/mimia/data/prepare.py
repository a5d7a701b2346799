"""The data stages: the split manifest, shadow membership and role shards.

Each is its own rule, so a change to the shadow models (``write_membership``) leaves the
manifest and shards alone.
"""

from __future__ import annotations

import sys
from pathlib import Path

import polars as pl

from mimia.data.shards import write_tar_shard
from mimia.data.sources import load_source, source_fingerprint
from mimia.data.splits import (
    MANIFEST_SCHEMA,
    ROLES,
    assigned_roles,
    duplicate_groups,
    manifest_hash,
    manifest_rows_sha256,
    read_assignment,
    shadow_membership,
    split_roles,
)
from mimia.layout import shadow_index
from mimia.provenance import provenance, read_metadata, write_parquet

# Duplicate pairs listed in the manifest's metadata (all are counted).
MAX_LISTED_DUPLICATES = 100


def write_manifest(*, dataset: dict, split: dict, seed: int, manifest: str | Path) -> pl.DataFrame:
    """Draw (or read) the roles and write the manifest, one row per image with its key and
    content hash. Identical images are found by content; with ``split.dedupe`` (default) only
    the first copy in source order can be drawn, otherwise copies in different roles are
    refused."""
    # Taken before listing: a folder that changes during the split then looks changed after it.
    fingerprint = source_fingerprint(dataset)
    source = load_source(dataset)
    name = dataset["name"]
    assigned = bool(split.get("assignment"))
    dedupe = split.get("dedupe", True) and not assigned
    duplicates: list[tuple[str, str]] = []
    if assigned:
        assignment = read_assignment(split["assignment"])
        df = assigned_roles(assignment, source.keys, source.labels, name, source.content_sha256)
        # Copies within one role are allowed (the encoder saw both): reported only.
        rows = df.sort("source_index")
        keys, hashes = rows["key"].to_list(), rows["content_sha256"].to_list()
        groups = duplicate_groups(hashes)
        duplicates = [(keys[i], keys[g[0]]) for g in groups for i in g[1:]]
    else:
        hashes = source.content_hashes()
        groups = duplicate_groups(hashes)
        duplicates = [(source.keys[i], source.keys[g[0]]) for g in groups for i in g[1:]]
        exclude = {i for g in groups for i in g[1:]} if dedupe else set()
        df = split_roles(
            source.keys,
            hashes,
            source.labels,
            {role: split[role] for role in ROLES},
            seed,
            name,
            exclude=exclude,
            shadow_classes=split.get("shadow_classes"),
        )
    if duplicates:
        verb = "dropped" if dedupe else "kept (in one role)" if assigned else "kept"
        listed = ", ".join(f"{a!r} = {b!r}" for a, b in duplicates[:10])
        print(
            f"dataset {name!r}: {len(duplicates)} duplicate copies {verb}, "
            f"e.g. {listed}{' ...' if len(duplicates) > 10 else ''}",
            file=sys.stderr,
        )
    meta = provenance(
        seed=seed,
        manifest_sha256=manifest_hash(df),
        manifest_rows_sha256=manifest_rows_sha256(df),
        dataset=name,
        num_source_images=len(source),
        source_fingerprint=fingerprint,
        dedupe=dedupe,
        duplicates_found=len(duplicates),
        duplicates_dropped=len(duplicates) if dedupe else 0,
        duplicates=[list(d) for d in duplicates[:MAX_LISTED_DUPLICATES]],
    )
    write_parquet(df, manifest, meta)
    return df


def write_membership(
    *, manifest: str | Path, model: str, online: bool, seed: int, membership: str | Path
) -> pl.DataFrame:
    """Which images train shadow model ``model`` (see :func:`shadow_membership`): one file
    per model, because a model's half does not depend on how many models there are."""
    df = pl.read_parquet(manifest)
    count = shadow_index(model) + 1
    table = shadow_membership(df, count, seed, online).filter(pl.col("model") == model)
    write_parquet(table, membership, provenance(seed=seed, manifest_sha256=manifest_hash(df)))
    return table


def write_shard(
    *, dataset: dict, shard_size: int, manifest: str | Path, role: str, index: int, shard
) -> None:
    """Write shard ``index`` of ``role``: rows ``[index * shard_size, (index + 1) * shard_size)``
    of the role's manifest rows in sample-id order. Images are opened by the manifest's keys
    (an image folder is not listed) and checked against its content hashes."""
    df = pl.read_parquet(manifest)
    missing = sorted(set(MANIFEST_SCHEMA) - set(df.columns))
    if missing:
        raise ValueError(
            f"manifest {manifest} lacks columns {missing} (written by an older mimia): "
            f"rerun the split"
        )
    rows = df.filter(pl.col("role") == role).sort("sample_id").slice(index * shard_size, shard_size)
    if rows.is_empty():
        raise ValueError(f"shard {index} of role {role!r} would be empty (shard_size {shard_size})")
    recorded = read_metadata(manifest).get("dataset")
    if recorded is not None and recorded != dataset["name"]:
        raise ValueError(
            f"manifest {manifest} was drawn from dataset {recorded!r}, not {dataset['name']!r}"
        )
    source = load_source(dataset, keys=rows["key"].to_list())
    write_tar_shard(rows, source, dataset["img_size"], Path(shard))
