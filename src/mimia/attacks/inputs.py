"""From the pipeline's tables to the attacks' ``X`` and ``y``: the one builder the attack
stage and the tests share.

Tables: the long error table (``sample_id, model, decoder, mask_ratio, mask_index, error``),
the manifest (``sample_id, role, ...``) and the shadow membership (``sample_id, model, is_in``;
the shadow models are the models it lists, ``shadow0, shadow1, ...``), plus, for EncoderMI,
embeddings (``sample_id, model, similarities``).

* Fit data (the adversary's): shadow model 0 under its own decoder (``"released"``) on the
  adversary's roles (``shadow_member``, ``shadow_nonmember``), shadow1..N-1 as its reference
  models; ``y_fit`` is shadow0's membership.
* Audit data: model ``"target"`` under the audited decoder on the target roles, every shadow
  model as a reference model; ``y_audit`` (from the manifest roles) is returned apart, for
  evaluation only.

Samples are sorted by ``sample_id``; the mask axes are the audited model's sorted mask ratios
and mask indices, and every sample needs every (ratio, mask) under every model. Reference
models are always read with their own decoder. ``reference_in`` comes from the membership
table; a sample absent there is OUT (target samples, for offline reference models).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from mimia.attacks.data import PARTS, Observations
from mimia.layout import OWN_DECODER, PAPER_SHADOW, ROLES, SHADOW_ROLES, TARGET, TARGET_ROLES

FIT_MODEL = PAPER_SHADOW
AUDIT_MODEL = TARGET
ERROR_COLUMNS = ("sample_id", "model", "decoder", "mask_ratio", "mask_index", "error")
_SHADOW = re.compile(r"shadow(\d+)")


@dataclass(frozen=True, eq=False)
class AttackData:
    """The adversary's ``X_fit, y_fit`` and the audited ``X_audit``; ``y_audit`` and
    ``audit_roles`` (manifest roles of ``X_audit``'s samples) are for evaluation only."""

    X_fit: Observations
    y_fit: np.ndarray
    X_audit: Observations
    y_audit: np.ndarray
    audit_roles: np.ndarray


def build_inputs(
    errors: pl.DataFrame | None,
    manifest: pl.DataFrame,
    membership: pl.DataFrame,
    decoder: str,
    needs: Collection[str] = ("errors", "references"),
    embeddings: pl.DataFrame | None = None,
) -> AttackData:
    """Fit and audit data of the audited ``decoder`` (see module doc), holding only the
    ``needs`` parts (an attack's ``inputs``); ValueError naming what is missing or wrong."""
    needs = frozenset(needs)
    unknown = needs - set(PARTS)
    if unknown:
        raise ValueError(f"unknown input parts {sorted(unknown)}; known: {list(PARTS)}")
    roles = _check_manifest(manifest)
    shadows = shadow_models(membership, set(roles))
    if FIT_MODEL not in shadows:
        raise ValueError(
            f"the shadow membership table lists {shadows}, not {FIT_MODEL!r} (the adversary's "
            "shadow model the attacks are fitted on)"
        )
    if needs & {"errors", "references"}:
        if errors is None:
            raise ValueError(f"attack inputs {sorted(needs)} need the error table")
        _check_errors(errors, set(roles))
    if "similarities" in needs and embeddings is None:
        raise ValueError("attack inputs 'similarities' need the embeddings table")

    fit_ids = _ids_of(roles, SHADOW_ROLES)
    audit_ids = _ids_of(roles, TARGET_ROLES)
    member = _lookup(membership.filter(pl.col("model") == FIT_MODEL), "is_in")
    y_fit = np.array([member.get(s, False) for s in fit_ids], dtype=bool)
    y_audit = np.array([roles[s] == "target_member" for s in audit_ids], dtype=bool)
    audit_roles = np.array([roles[s] for s in audit_ids])
    refs_fit = [m for m in shadows if m != FIT_MODEL]
    return AttackData(
        X_fit=observations(
            errors, FIT_MODEL, OWN_DECODER, fit_ids, refs_fit, membership, needs, embeddings
        ),
        y_fit=y_fit,
        X_audit=observations(
            errors, AUDIT_MODEL, decoder, audit_ids, shadows, membership, needs, embeddings
        ),
        y_audit=y_audit,
        audit_roles=audit_roles,
    )


def observations(
    errors: pl.DataFrame | None,
    model: str,
    decoder: str,
    sample_ids: Sequence[str],
    reference_models: Sequence[str] = (),
    membership: pl.DataFrame | None = None,
    needs: Collection[str] = ("errors", "references"),
    embeddings: pl.DataFrame | None = None,
) -> Observations:
    """``Observations`` of ``(model, decoder)`` on ``sample_ids`` (sorted), with the parts in
    ``needs``; reference models are read with decoder ``"released"``."""
    needs = frozenset(needs)
    ids = np.unique(np.asarray(sample_ids, dtype=str))
    if len(ids) != len(sample_ids):
        raise ValueError(f"{len(sample_ids) - len(ids)} sample ids are listed twice")
    parts: dict = {}
    if needs & {"errors", "references"}:
        rows = _rows(errors, model, decoder, ids)
        ratios = np.unique(rows["mask_ratio"].to_numpy())
        masks = np.unique(rows["mask_index"].to_numpy())
        parts["errors"] = _cube(rows, ids, ratios, masks, f"model {model!r} decoder {decoder!r}")
        parts["mask_ratios"] = tuple(round(float(r), 6) for r in ratios)
    if "references" in needs:
        if model in reference_models:
            raise ValueError(f"the audited model {model!r} cannot be its own reference model")
        table = membership if membership is not None else _EMPTY_MEMBERSHIP
        cubes, ins = [], []
        for ref in reference_models:
            what = f"reference model {ref!r} (decoder {OWN_DECODER!r})"
            cubes.append(_cube(_rows(errors, ref, OWN_DECODER, ids), ids, ratios, masks, what))
            is_in = _lookup(table.filter(pl.col("model") == ref), "is_in")
            ins.append(np.array([is_in.get(s, False) for s in ids], dtype=bool))
        shape = (0, *parts["errors"].shape)
        parts["reference_errors"] = np.stack(cubes) if cubes else np.empty(shape)
        parts["reference_in"] = np.stack(ins) if ins else np.empty((0, len(ids)), dtype=bool)
    if "similarities" in needs:
        parts["similarities"] = _similarities(embeddings, model, ids)
    return Observations(sample_ids=ids, **parts)


def shadow_models(membership: pl.DataFrame, manifest_ids: Collection[str] | None = None):
    """The shadow models the membership table lists, in numeric order (shadow10 after
    shadow9); checks its columns, names, duplicates and, given the manifest's sample ids,
    that it lists no sample outside the manifest."""
    lacking = {"sample_id", "model", "is_in"} - set(membership.columns)
    if lacking:
        raise ValueError(f"shadow membership table lacks columns {sorted(lacking)}")
    if membership["is_in"].null_count():
        raise ValueError("shadow membership table has null is_in values")
    names = membership["model"].unique().to_list()
    bad = sorted(str(m) for m in names if m is None or not _SHADOW.fullmatch(m))
    if bad:
        raise ValueError(
            f"shadow membership table lists models {bad}; expected shadow0, shadow1, ..."
        )
    dup = membership.select("sample_id", "model").is_duplicated()
    if dup.any():
        ex = membership.filter(dup).head(3).select("model", "sample_id").rows()
        raise ValueError(f"shadow membership table lists (model, sample) twice, e.g. {ex}")
    if manifest_ids is not None:
        unknown = sorted(set(membership["sample_id"].unique().to_list()) - set(manifest_ids))
        if unknown:
            raise ValueError(
                f"shadow membership table lists {len(unknown)} samples not in the manifest, "
                f"e.g. {_fmt(unknown)} (is it from another split?)"
            )
    return sorted(names, key=lambda m: int(_SHADOW.fullmatch(m).group(1)))


_EMPTY_MEMBERSHIP = pl.DataFrame(
    schema={"sample_id": pl.String, "model": pl.String, "is_in": pl.Boolean}
)


def _check_manifest(manifest: pl.DataFrame) -> dict[str, str]:
    lacking = {"sample_id", "role"} - set(manifest.columns)
    if lacking:
        raise ValueError(f"manifest lacks columns {sorted(lacking)}")
    dup = manifest.filter(pl.col("sample_id").is_duplicated())["sample_id"].unique().to_list()
    if dup:
        raise ValueError(f"manifest lists {len(dup)} sample ids twice, e.g. {_fmt(sorted(dup))}")
    roles = dict(manifest.select("sample_id", "role").iter_rows())
    unknown = sorted(set(roles.values()) - set(ROLES), key=str)
    if unknown:
        raise ValueError(f"manifest has unknown roles {unknown}; expected {list(ROLES)}")
    empty = [r for r in ROLES if r not in set(roles.values())]
    if empty:
        raise ValueError(f"manifest has no samples of roles {empty}")
    return roles


def _check_errors(errors: pl.DataFrame, manifest_ids: set[str]) -> None:
    lacking = set(ERROR_COLUMNS) - set(errors.columns)
    if lacking:
        raise ValueError(f"error table lacks columns {sorted(lacking)}")
    unknown = sorted(set(errors["sample_id"].unique().to_list()) - manifest_ids)
    if unknown:
        raise ValueError(
            f"error table has {len(unknown)} samples not in the manifest, e.g. {_fmt(unknown)} "
            "(is it from another split?)"
        )


def _ids_of(roles: dict[str, str], wanted: Sequence[str]) -> np.ndarray:
    return np.sort(np.array([s for s, r in roles.items() if r in wanted], dtype=str))


def _lookup(table: pl.DataFrame, column: str) -> dict:
    return dict(zip(table["sample_id"].to_list(), table[column].to_list(), strict=True))


def _rows(errors: pl.DataFrame, model: str, decoder: str, ids: np.ndarray) -> pl.DataFrame:
    rows = errors.filter(
        (pl.col("model") == model)
        & (pl.col("decoder") == decoder)
        & pl.col("sample_id").is_in(ids.tolist())
    )
    if rows.is_empty():
        pairs = errors.select("model", "decoder").unique().sort("model", "decoder").rows()
        raise ValueError(
            f"error table has no rows of model {model!r} under decoder {decoder!r} for the "
            f"{len(ids)} samples it is read on; it has (model, decoder) {pairs}"
        )
    return rows


def _fmt(values, limit: int = 3) -> str:
    values = list(values)
    more = f" (+{len(values) - limit} more)" if len(values) > limit else ""
    return ", ".join(map(str, values[:limit])) + more


def _cube(rows: pl.DataFrame, ids: np.ndarray, ratios: np.ndarray, masks: np.ndarray, what: str):
    """``error`` of ``rows`` (all of samples ``ids``) as ``[N, R, K]``; ValueError on holes."""
    dup = rows.select("sample_id", "mask_ratio", "mask_index").is_duplicated()
    if dup.any():
        ex = rows.filter(dup).head(3).select("sample_id", "mask_ratio", "mask_index").rows()
        raise ValueError(f"{what}: duplicate (sample, mask_ratio, mask_index) rows, e.g. {ex}")
    missing = np.setdiff1d(ids, rows["sample_id"].unique().to_numpy().astype(str))
    if len(missing):
        raise ValueError(f"{what} lacks {len(missing)} samples: {_fmt(missing)}")
    n_idx = np.searchsorted(ids, rows["sample_id"].to_numpy().astype(str))
    r_val = rows["mask_ratio"].to_numpy()
    k_val = rows["mask_index"].to_numpy()
    r_idx = np.searchsorted(ratios, r_val).clip(0, len(ratios) - 1)
    k_idx = np.searchsorted(masks, k_val).clip(0, len(masks) - 1)
    bad_r = ratios[r_idx] != r_val
    bad_k = masks[k_idx] != k_val
    if bad_r.any() or bad_k.any():
        raise ValueError(
            f"{what} has mask ratios {_fmt(np.unique(r_val[bad_r]))} / mask indices "
            f"{_fmt(np.unique(k_val[bad_k]))} the audited model lacks"
        )
    filled = np.zeros((len(ids), len(ratios), len(masks)), dtype=bool)
    filled[n_idx, r_idx, k_idx] = True
    if not filled.all():
        n, r, k = np.nonzero(~filled)
        ex = [
            (str(ids[a]), float(ratios[b]), int(masks[c])) for a, b, c in zip(n, r, k, strict=True)
        ]
        raise ValueError(
            f"{what} lacks {len(n)} (sample, mask_ratio, mask_index) errors, e.g. {_fmt(ex)}"
        )
    cube = np.empty(filled.shape, dtype=np.float64)
    cube[n_idx, r_idx, k_idx] = rows["error"].to_numpy()
    return cube


def _similarities(embeddings: pl.DataFrame | None, model: str, ids: np.ndarray) -> np.ndarray:
    if embeddings is None:
        raise ValueError("no embeddings table for the similarities")
    lacking = {"sample_id", "model", "similarities"} - set(embeddings.columns)
    if lacking:
        raise ValueError(f"embeddings table lacks columns {sorted(lacking)}")
    rows = embeddings.filter((pl.col("model") == model) & pl.col("sample_id").is_in(ids.tolist()))
    dup = rows.filter(pl.col("sample_id").is_duplicated())["sample_id"].unique().to_list()
    if dup:
        raise ValueError(f"embeddings of {model!r} list samples twice, e.g. {_fmt(sorted(dup))}")
    by_id = dict(zip(rows["sample_id"].to_list(), rows["similarities"].to_list(), strict=True))
    missing = [s for s in ids if s not in by_id]
    if missing:
        raise ValueError(f"{len(missing)} samples lack {model!r} embeddings, e.g. {_fmt(missing)}")
    sizes = {len(by_id[s]) for s in ids}
    if len(sizes) != 1:
        raise ValueError(
            f"embeddings of {model!r} have different numbers of similarities {sorted(sizes)}"
        )
    return np.asarray([by_id[s] for s in ids], dtype=np.float64)
