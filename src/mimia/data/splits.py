"""The role split: disjoint, seeded, recorded in a Parquet manifest.

Roles: ``target_member`` pre-trains the victim, ``target_nonmember`` is held out, and
``shadow_member`` / ``shadow_nonmember`` are the adversary's own data. Shadow model 0 is
trained on ``shadow_member`` (the paper's shadow); further shadow models (reference models for
calibrated attacks) each train on a seeded random half of the adversary's data, so every
adversary image is IN for some and OUT for others.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import polars as pl

ROLES = ("target_member", "target_nonmember", "shadow_member", "shadow_nonmember")
TARGET_ROLES = ROLES[:2]
SHADOW_ROLES = ROLES[2:]

MANIFEST_SCHEMA = {
    "sample_id": pl.String,
    "source_index": pl.Int64,
    "label": pl.Int64,
    "role": pl.String,
}


def split_roles(
    num_available: int,
    sizes: dict[str, int],
    seed: int,
    dataset: str,
    labels: np.ndarray,
    shadow_classes: list[int] | None = None,
) -> pl.DataFrame:
    """Assign disjoint random subsets of ``range(num_available)`` to the roles.

    ``shadow_classes`` restricts the adversary's roles to those labels: a distribution shift
    between the adversary's data and the target's (the paper's relaxed-knowledge setting).
    """
    unknown = set(sizes) - set(ROLES)
    if unknown:
        raise ValueError(f"unknown roles {sorted(unknown)}; expected {ROLES}")
    for role in ROLES:
        if sizes.get(role, 0) < 1:
            raise ValueError(f"split size of {role!r} must be >= 1, got {sizes.get(role)}")
    total = sum(sizes[r] for r in ROLES)
    if total > num_available:
        raise ValueError(
            f"split asks for {total} images ({', '.join(f'{r}={sizes[r]}' for r in ROLES)}) "
            f"but dataset {dataset!r} has only {num_available}"
        )
    order = np.random.default_rng(seed).permutation(num_available)
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
        frames.append(
            pl.DataFrame(
                {
                    "sample_id": [f"{dataset}-{i:07d}" for i in idx],
                    "source_index": idx.astype(np.int64),
                    "label": labels[idx].astype(np.int64),
                    "role": [role] * len(idx),
                },
                schema=MANIFEST_SCHEMA,
            )
        )
    manifest = pl.concat(frames)
    check_manifest(manifest, sizes)
    return manifest


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
    assignment: pl.DataFrame, keys: list[str], dataset: str, labels: np.ndarray
) -> pl.DataFrame:
    """The manifest of a given assignment (the auditor knows the encoder's training images)."""
    index = {k: i for i, k in enumerate(keys)}
    unknown = [k for k in assignment["key"] if k not in index]
    if unknown:
        raise ValueError(
            f"{len(unknown)} keys of the role assignment are not in dataset {dataset!r}, "
            f"e.g. {unknown[:3]} (keys look like {keys[:2]})"
        )
    idx = np.array([index[k] for k in assignment["key"]], dtype=np.int64)
    manifest = pl.DataFrame(
        {
            "sample_id": [f"{dataset}-{i:07d}" for i in idx],
            "source_index": idx,
            "label": labels[idx].astype(np.int64),
            "role": assignment["role"],
        },
        schema=MANIFEST_SCHEMA,
    ).sort("role", "sample_id")
    counts = dict(manifest.group_by("role").len().iter_rows())
    check_manifest(manifest, {role: counts.get(role, 0) for role in ROLES})
    empty = [role for role in ROLES if not counts.get(role)]
    if empty:
        raise ValueError(f"role assignment leaves roles {empty} empty")
    return manifest


def check_manifest(manifest: pl.DataFrame, sizes: dict[str, int]) -> None:
    """Fail loudly on overlapping roles or a role smaller than asked."""
    dup = manifest.filter(pl.col("source_index").is_duplicated())
    if dup.height:
        raise ValueError(f"roles overlap on {dup.height} rows, e.g. {dup.head(3).to_dicts()}")
    counts = dict(manifest.group_by("role").len().iter_rows())
    for role in ROLES:
        if counts.get(role, 0) != sizes[role]:
            raise ValueError(f"role {role!r} has {counts.get(role, 0)} images, asked {sizes[role]}")


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


def training_ids(model: str, manifest: pl.DataFrame, membership: pl.DataFrame) -> set[str]:
    """The sample ids a model trains on: ``target_member`` for the target, else the shadow's."""
    if model == "target":
        return set(manifest.filter(pl.col("role") == "target_member")["sample_id"])
    rows = membership.filter((pl.col("model") == model) & pl.col("is_in"))
    if rows.is_empty():
        raise ValueError(f"model {model!r} has no training samples in the shadow membership table")
    return set(rows["sample_id"])


def membership_lookup(
    model: str, manifest: pl.DataFrame, membership: pl.DataFrame
) -> dict[str, bool]:
    """``sample_id -> is_member`` of every manifest sample with respect to ``model``."""
    ids = training_ids(model, manifest, membership)
    return {sid: sid in ids for sid in manifest["sample_id"]}
