"""Experiments from the workflow config: defaults merged in, validated, ablations expanded.

The top-level config is validated by the Snakefile against ``config.schema.yaml``; each
resolved experiment is validated here against ``experiment.schema.yaml`` (which fills in
defaults), before any job runs.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from mimia.data.splits import ROLES
from mimia.models.spec import ModelSpec
from mimia.pretrain import TrainConfig

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "workflow" / "schemas"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_path(d: dict, dotted: str, value: Any) -> dict:
    out = copy.deepcopy(d)
    node = out
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"ablation parameter {dotted!r}: {key!r} is not a section")
    node[leaf] = value
    return out


def _validator(schema_dir: Path):
    schema = yaml.safe_load((schema_dir / "experiment.schema.yaml").read_text())
    base = jsonschema.Draft202012Validator

    def fill_defaults(validator, properties, instance, schema):
        for prop, sub in properties.items():
            if isinstance(instance, dict) and "default" in sub and prop not in instance:
                instance[prop] = copy.deepcopy(sub["default"])
        yield from base.VALIDATORS["properties"](validator, properties, instance, schema)

    cls = jsonschema.validators.extend(base, {"properties": fill_defaults})
    return cls(schema)


def resolve_experiments(config: dict, schema_dir: Path = SCHEMA_DIR) -> dict[str, dict]:
    """Every experiment (ablations included), merged with defaults and validated."""
    defaults = config.get("defaults") or {}
    raw = {name: deep_merge(defaults, exp or {}) for name, exp in config["experiments"].items()}
    for ablation, spec in (config.get("ablations") or {}).items():
        base = spec["base"]
        if base not in raw:
            raise ValueError(f"ablation {ablation!r}: base experiment {base!r} is not defined")
        for order, value in enumerate(spec["values"]):
            name = f"{base}__{ablation}-{_slug(value)}"
            exp = raw[base]
            for dotted in _as_list(spec["parameter"]):
                exp = set_path(exp, dotted, value)
            exp["ablation"] = {
                "name": ablation,
                "parameter": spec["parameter"],
                "value": value,
                "order": order,
            }
            raw[name] = exp
    validator = _validator(schema_dir)
    resolved = {}
    for name, exp in raw.items():
        if not NAME.match(name):
            raise ValueError(f"experiment name {name!r} must match {NAME.pattern}")
        if isinstance(exp.get("decoder"), str):
            exp["decoder"] = [exp["decoder"]]
        errors = sorted(validator.iter_errors(exp), key=lambda e: list(e.path))
        if errors:
            e = errors[0]
            where = ".".join(str(p) for p in e.path) or "(top level)"
            raise ValueError(f"experiment {name!r}: {where}: {e.message}")
        _check(name, exp)
        resolved[name] = exp
    return resolved


def _as_list(x) -> list:
    return x if isinstance(x, list) else [x]


def _slug(value: Any) -> str:
    text = "_".join(map(str, value)) if isinstance(value, list) else str(value)
    return re.sub(r"[^A-Za-z0-9.+-]", "_", text)


def _check(name: str, exp: dict) -> None:
    """Cross-field checks the schema cannot express, so bad input fails before any job."""
    if exp["split"].get("assignment"):
        # Role sizes come from the assignment: shard counts are needed to build the DAG.
        from mimia.data.splits import read_assignment

        try:
            counts = dict(read_assignment(exp["split"]["assignment"]).group_by("role").len().rows())
        except (OSError, ValueError) as err:
            raise ValueError(f"experiment {name!r}: split.assignment: {err}") from None
        empty = [role for role in ROLES if not counts.get(role)]
        if empty:
            raise ValueError(f"experiment {name!r}: split.assignment leaves roles {empty} empty")
        exp["split"].update({role: counts[role] for role in ROLES})
    try:
        model_spec(exp)
    except ValueError as err:
        raise ValueError(f"experiment {name!r}: model: {err}") from None
    from mimia.attacks import ATTACKS

    target = exp["target"]
    if target["checkpoint"] and target["format"] == "timm" and "released" in exp["decoder"]:
        raise ValueError(
            f"experiment {name!r}: a timm target checkpoint is an encoder only; decoder mode "
            f"'released' needs the target's decoder (use decoder: [shadow, adapted])"
        )

    for key, params in exp["attacks"].items():
        kind = (params or {}).get("attack", key)
        if kind not in ATTACKS:
            raise ValueError(
                f"experiment {name!r}: attacks.{key}: unknown attack {kind!r}; "
                f"known: {sorted(ATTACKS)}"
            )
    for section in ("pretrain", "adapt"):
        cfg = exp[section]
        if cfg["warmup_epochs"] > cfg["epochs"]:
            raise ValueError(
                f"experiment {name!r}: {section}.warmup_epochs={cfg['warmup_epochs']} exceeds "
                f"{section}.epochs={cfg['epochs']}"
            )
        if cfg["batch_size"] > min(exp["split"][r] for r in ROLES):
            raise ValueError(
                f"experiment {name!r}: {section}.batch_size={cfg['batch_size']} is larger than "
                f"the smallest role ({min(exp['split'][r] for r in ROLES)} images)"
            )


def model_spec(exp: dict) -> ModelSpec:
    m = dict(exp["model"])
    if m.get("mean") is not None:
        m["mean"], m["std"] = tuple(m["mean"]), tuple(m["std"])
    else:
        m.pop("mean", None), m.pop("std", None)
    return ModelSpec(img_size=exp["dataset"]["img_size"], **m)


def train_config(exp: dict, section: str = "pretrain", seed_offset: int = 0) -> TrainConfig:
    cfg = dict(exp[section])
    for key in ("betas", "crop_scale"):
        if key in cfg:
            cfg[key] = tuple(cfg[key])
    return TrainConfig(seed=exp["seed"] + seed_offset, **cfg)


def shard_count(exp: dict, role: str) -> int:
    return math.ceil(exp["split"][role] / exp["split"]["shard_size"])
