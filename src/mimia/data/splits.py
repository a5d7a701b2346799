"""The role split: disjoint, seeded, recorded in a Parquet manifest.

Roles: ``target_member`` pre-trains the victim, ``target_nonmember`` is held out, and
``shadow_member`` / ``shadow_nonmember`` are the adversary's own data. Shadow model 0 is
trained on ``shadow_member`` (the paper's shadow); further shadow models (reference models for
calibrated attacks) each train on a seeded random half of the adversary's data, so every
adversary image is IN for some and OUT for others.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

import numpy as np
import polars as pl

from mimia.layout import ROLES, SHADOW_ROLES, TARGET_ROLES

MANIFEST_SCHEMA = {
    "sample_id": pl.String,
    "source_index": pl.Int64,
    "key": pl.String,
    "content_sha256": pl.String,
    "label": pl.Int64,
    "role": pl.String,
}


def duplicate_groups(hashes: Sequence[str]) -> list[list[int]]:
    """Indices of images with identical content, in source order; groups of two or more."""
    by_hash: dict[str, list[int]] = {}
    for i, h in enumerate(hashes):
        by_hash.setdefault(h, []).append(i)
    return sorted((g for g in by_hash.values() if len(g) > 1), key=lambda g: g[0])


def split_roles(
    keys: Sequence[str],
    hashes: Sequence[str],
    labels: np.ndarray,
    sizes: dict[str, int],
    seed: int,
    dataset: str,
    *,
    exclude: Collection[int] = (),
    shadow_classes: list[int] | None = None,
) -> pl.DataFrame:
    """Assign disjoint random subsets of the source's images to the roles.

    ``exclude`` (indices, e.g. duplicate copies) never enters a role. ``shadow_classes``
    restricts the adversary's roles to those labels: a distribution shift between the
    adversary's data and the target's (the paper's relaxed-knowledge setting). Copies of one
    image in different roles are refused.
    """
    unknown = set(sizes) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown roles {sorted(unknown)}; expected {ROLES}")
    for role in ROLES:
        if sizes.get(role, 0) < 1:
            raise ValueError(f"split size of {role!r} must be >= 1, got {sizes.get(role)}")
    pool = np.setdiff1d(np.arange(len(keys)), np.fromiter(exclude, np.int64, len(exclude)))
    total = sum(sizes[r] for r in ROLES)
    if total > len(pool):
        dropped = f" after dropping {len(exclude)} duplicate copies" if len(exclude) else ""
        raise ValueError(
            f"split asks for {total} images ({', '.join(f'{r}={sizes[r]}' for r in ROLES)}) "
            f"but dataset {dataset!r} has only {len(pool)}{dropped}"
        )
    # Without exclusions the pool is range(n): the same draw as before duplicates were handled.
    order = pool[np.random.default_rng(seed).permutation(len(pool))]
    n_target = sizes["target_member"] + sizes["target_nonmember"]
    if shadow_classes is not None:
        rest = order[n_target:]
        rest = rest[np.isin(labels[rest], shadow_classes)]
        n_shadow = sizes["shadow_member"] + sizes["shadow_nonmember"]
        if len(rest) < n_shadow:
            raise ValueError(
                f"shadow roles ask for {n_shadow} images of classes {shadow_classes} but "
                f"dataset {dataset!r} has only {len(rest)} left after the target roles"
            )
        order = np.concatenate([order[:n_target], rest])
    frames, start = [], 0
    for role in ROLES:
        idx = np.sort(order[start : start + sizes[role]])
        start += sizes[role]
        frames.append(_rows(idx, role, keys, [hashes[i] for i in idx], labels, dataset))
    manifest = pl.concat(frames)
    check_manifest(manifest, sizes)
    check_duplicates_across_roles(
        manifest,
        "the split",
        "set split.dedupe: true (keeps the first copy) or remove the copies from the dataset",
    )
    return manifest


def _rows(idx, roles, keys, hashes, labels, dataset) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "sample_id": [f"{dataset}-{i:07d}" for i in idx],
            "source_index": np.asarray(idx, dtype=np.int64),
            "key": [keys[i] for i in idx],
            "content_sha256": list(hashes),
            "label": labels[idx].astype(np.int64),
            "role": [roles] * len(idx) if isinstance(roles, str) else list(roles),
        },
        schema=MANIFEST_SCHEMA,
    )


def read_assignment(path: str | Path) -> pl.DataFrame:
    """A user's role assignment: CSV or Parquet with columns ``key`` and ``role``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"role assignment {path} does not exist")
    df = pl.read_parquet(path) if path.suffix == ".parquet" else pl.read_csv(path)
    missing = {"key", "role"} - set(df.columns)
    if missing:
        raise ValueError(
            f"role assignment {path} lacks columns {sorted(missing)}; has {df.columns}"
        )
    df = df.select(pl.col("key").cast(pl.String), pl.col("role").cast(pl.String))
    bad = sorted(set(df["role"]) - set(ROLES))
    if bad:
        raise ValueError(f"role assignment {path}: unknown roles {bad}; expected {ROLES}")
    dup = df.filter(pl.col("key").is_duplicated())["key"].unique().to_list()
    if dup:
        raise ValueError(f"role assignment {path}: keys listed twice, e.g. {dup[:3]}")
    return df


def assigned_roles(
    assignment: pl.DataFrame,
    keys: Sequence[str],
    labels: np.ndarray,
    dataset: str,
    content_sha256: Callable[[int], str],
) -> pl.DataFrame:
    """The manifest of a given assignment (the auditor knows the encoder's training images).

    Only the assigned images are hashed; identical images in different roles are refused.
    """
    index = {k: i for i, k in enumerate(keys)}
    unknown = [k for k in assignment["key"] if k not in index]
    if unknown:
        raise ValueError(
            f"{len(unknown)} keys of the role assignment are not in dataset {dataset!r}, "
            f"e.g. {unknown[:3]} (keys look like {list(keys[:2])})"
        )
    idx = np.array([index[k] for k in assignment["key"]], dtype=np.int64)
    hashes = [content_sha256(int(i)) for i in idx]
    manifest = _rows(idx, assignment["role"], keys, hashes, labels, dataset)
    manifest = manifest.sort("role", "sample_id")
    counts = dict(manifest.group_by("role").len().iter_rows())
    check_manifest(manifest, {role: counts.get(role, 0) for role in ROLES})
    empty = [role for role in ROLES if not counts.get(role)]
    if empty:
        raise ValueError(f"role assignment leaves roles {empty} empty")
    check_duplicates_across_roles(
        manifest,
        "the role assignment",
        "give every copy the same role or remove the copies from the dataset",
    )
    return manifest


def check_manifest(manifest: pl.DataFrame, sizes: dict[str, int]) -> None:
    """Fail loudly on overlapping roles or a role smaller than asked."""
    for column in ("source_index", "key"):
        dup = manifest.filter(pl.col(column).is_duplicated())
        if dup.height:
            raise ValueError(f"roles overlap on {dup.height} rows, e.g. {dup.head(3).to_dicts()}")
    counts = dict(manifest.group_by("role").len().iter_rows())
    for role in ROLES:
        if counts.get(role, 0) != sizes[role]:
            raise ValueError(f"role {role!r} has {counts.get(role, 0)} images, asked {sizes[role]}")


def check_duplicates_across_roles(manifest: pl.DataFrame, what: str, hint: str) -> None:
    """Refuse identical images (same ``content_sha256``) in different roles, naming both keys."""
    multi = (
        manifest.sort("key")
        .group_by("content_sha256", maintain_order=True)
        .agg(pl.col("role").n_unique().alias("n_roles"), pl.col("key"), pl.col("role"))
        .filter(pl.col("n_roles") > 1)
    )
    if multi.height:
        examples = "; ".join(
            " = ".join(f"{k!r} ({r})" for k, r in zip(keys, roles, strict=True))
            for keys, roles in multi.select("key", "role").head(3).iter_rows()
        )
        raise ValueError(
            f"{what} puts identical images in different roles ({multi.height} images), e.g. "
            f"{examples}: a member and a non-member would be the same picture; {hint}"
        )


def manifest_rows_sha256(manifest: pl.DataFrame) -> str:
    """SHA-256 of every manifest column, rows sorted by ``sample_id`` (the manifest's content)."""
    rows = manifest.select(*MANIFEST_SCHEMA).sort("sample_id").iter_rows()
    return hashlib.sha256("\n".join(",".join(map(str, r)) for r in rows).encode()).hexdigest()


def manifest_hash(manifest: pl.DataFrame) -> str:
    """SHA-256 of the sorted ``sample_id,role`` lines: names the split in every result."""
    rows = manifest.select("sample_id", "role").sort("sample_id").iter_rows()
    return hashlib.sha256("\n".join(f"{s},{r}" for s, r in rows).encode()).hexdigest()


def shadow_membership(
    manifest: pl.DataFrame, num_shadow_models: int, seed: int, include_targets: bool = False
) -> pl.DataFrame:
    """Which images train which shadow model: ``sample_id, model, is_in``.

    ``shadow0`` trains on ``shadow_member`` exactly. ``shadow{i>0}`` trains on a seeded random
    half of the adversary's pool: the shadow roles, plus the target roles when
    ``include_targets`` (online LiRA: the auditor may train reference models on the images it
    queries, so each queried image is IN for some reference models).
    """
    pool_roles = list(SHADOW_ROLES) + (list(TARGET_ROLES) if include_targets else [])
    pool = manifest.filter(pl.col("role").is_in(pool_roles)).sort("sample_id")
    ids = pool["sample_id"].to_numpy()
    frames = []
    for m in range(num_shadow_models):
        if m == 0:
            is_in = (pool["role"] == "shadow_member").to_numpy()
        else:
            rng = np.random.default_rng([seed, m])
            is_in = np.zeros(len(ids), dtype=bool)
            is_in[rng.permutation(len(ids))[: len(ids) // 2]] = True
        frames.append(pl.DataFrame({"sample_id": ids, "model": f"shadow{m}", "is_in": is_in}))
    return pl.concat(frames)
