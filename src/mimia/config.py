"""Experiments from the workflow config: merged, completed from the schema, validated,
ablations expanded, and cut into the per-rule parameters that decide what reruns.

Torch-free by design: the Snakefile resolves the config every time it is read (the DAG build,
and every cluster job), so only yaml, jsonschema and the light registries are imported here.

Merging (``defaults`` under each experiment, an ablation value over its base) follows three
rules: a mapping merges key by key; ``{}`` clears a mapping (``encoder_overrides: {}`` keeps
the named timm encoder's own sizes); any other value, lists included, replaces; ``null``
removes the key so the schema's default applies again.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from mimia.layout import ROLES

SCHEMA_DIR = Path(__file__).resolve().parents[2] / "workflow" / "schemas"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
ABLATION_SEPARATOR = "__"


def deep_merge(base: dict, override: dict) -> dict:
    """``override`` over ``base``: see the module docstring for the three rules."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and value and isinstance(out.get(key), dict):
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


def canonical(value: Any) -> Any:
    """``value`` with every mapping's keys sorted, recursively.

    Snakemake compares rule params by their ``repr``: two configs that differ only in key
    order (or in whether a default was written out) must give the same params, or every job
    reruns with "params have changed".
    """
    if isinstance(value, dict):
        return {k: canonical(value[k]) for k in sorted(value)}
    if isinstance(value, list | tuple):
        return [canonical(v) for v in value]
    return value


def _load_schema(schema_dir: Path = SCHEMA_DIR) -> dict:
    return yaml.safe_load((schema_dir / "experiment.schema.yaml").read_text())


def schema_defaults(section: str) -> dict:
    """The schema's defaults of one experiment section (e.g. ``pretrain``)."""
    props = _load_schema()["properties"][section]["properties"]
    return {k: copy.deepcopy(v["default"]) for k, v in props.items() if "default" in v}


def check_section(section: str, value: dict) -> None:
    """Validate ``value`` against experiment section ``section``'s schema as it is (no
    defaults filled in); ValueError naming the first key it refuses."""
    full = _load_schema()
    schema = {"$defs": full["$defs"], **full["properties"][section]}
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(value), key=str)
    if errors:
        where = ".".join(str(p) for p in errors[0].path)
        raise ValueError(f"{where}: {errors[0].message}")


def _validator(schema: dict):
    base = jsonschema.Draft202012Validator

    def fill_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for prop, sub in properties.items():
                if "default" in sub and prop not in instance:
                    instance[prop] = copy.deepcopy(sub["default"])
                # YAML writes 20.0 for a whole number now and then: an integer setting gets
                # the int, so it neither crashes later (range(20.0)) nor changes rule params.
                value = instance.get(prop)
                if sub.get("type") == "integer" and isinstance(value, float) and value.is_integer():
                    instance[prop] = int(value)
        yield from base.VALIDATORS["properties"](validator, properties, instance, schema)

    return jsonschema.validators.extend(base, {"properties": fill_defaults})(schema)


def resolve_experiments(config: dict, schema_dir: Path = SCHEMA_DIR) -> dict[str, dict]:
    """Every experiment (ablations included), merged, completed from the schema, validated.

    ``config["select"]``, when given, keeps only those experiments (after checking every name
    exists).
    """
    defaults = config.get("defaults") or {}
    raw = {name: deep_merge(defaults, exp or {}) for name, exp in config["experiments"].items()}
    for ablation, spec in (config.get("ablations") or {}).items():
        base = spec["base"]
        if base not in config["experiments"]:
            raise ValueError(f"ablation {ablation!r}: base experiment {base!r} is not defined")
        for order, value in enumerate(spec["values"]):
            settings, slug = _ablation_settings(ablation, spec["parameter"], value)
            name = f"{base}{ABLATION_SEPARATOR}{ablation}-{slug}"
            if name in raw:
                what = "an experiment" if name in config["experiments"] else "another ablation"
                raise ValueError(
                    f"ablation {ablation!r} value {value!r} would be experiment {name!r}, "
                    f"which {what} already defines: rename one of them"
                )
            exp = raw[base]
            for dotted, setting in settings:
                exp = set_path(exp, dotted, setting)
            exp["ablation"] = {
                "name": ablation,
                "parameter": spec["parameter"],
                "value": value,
                "order": order,
            }
            raw[name] = exp
    select = config.get("select")
    if select is not None:
        unknown = sorted(set(select) - set(raw))
        if unknown:
            raise ValueError(f"select names unknown experiments {unknown}; defined: {sorted(raw)}")
        raw = {name: raw[name] for name in raw if name in select}
    validator = _validator(_load_schema(schema_dir))
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
        try:
            _check(exp)
        except ValueError as err:
            raise ValueError(f"experiment {name!r}: {err}") from None
        resolved[name] = canonical(exp)
    return resolved


def _as_list(x) -> list:
    return x if isinstance(x, list) else [x]


def _ablation_settings(ablation: str, parameter, value) -> tuple[list[tuple[str, Any]], str]:
    """The ``(dotted key, value)`` pairs one ablation value sets, and its name's slug.

    Several parameters take the same value, unless the value is a mapping whose keys are
    exactly the parameters: then each takes its own (a sweep along a line, such as images per
    role x epochs at a fixed number of optimiser steps), and the slug lists the distinct
    values in parameter order.
    """
    params = _as_list(parameter)
    if len(params) > 1 and isinstance(value, dict) and set(value) & set(params):
        if set(value) != set(params):
            raise ValueError(
                f"ablation {ablation!r} value {value!r}: a value given per parameter must "
                f"name exactly the parameters {params}"
            )
        slugs = dict.fromkeys(_slug(value[dotted]) for dotted in params)
        return [(d, value[d]) for d in params], "_".join(slugs)
    return [(dotted, value) for dotted in params], _slug(value)


def _slug(value: Any) -> str:
    text = "_".join(map(str, value)) if isinstance(value, list) else str(value)
    return re.sub(r"[^A-Za-z0-9.+-]", "_", text)


def _check(exp: dict) -> None:
    """Cross-field checks the schema cannot express, so bad input fails before any job."""
    from mimia.defenses import check_defenses

    if exp["split"].get("assignment"):
        # Role sizes come from the assignment: shard counts are needed to build the DAG.
        exp["split"].update(_assignment_sizes(exp["split"]["assignment"]))
    try:
        spec = model_spec(exp)
    except ValueError as err:
        raise ValueError(f"model: {err}") from None
    _check_target(exp, spec)
    _check_attacks(exp)
    check_defenses(exp)
    for section in ("pretrain", "adapt"):
        cfg = exp[section]
        if cfg["warmup_epochs"] > cfg["epochs"]:
            raise ValueError(
                f"{section}.warmup_epochs={cfg['warmup_epochs']} exceeds "
                f"{section}.epochs={cfg['epochs']}"
            )
        smallest = min(exp["split"][r] for r in ROLES)
        # Each of the `devices` processes takes batch_size images of every global batch.
        batch = cfg["batch_size"] * cfg["devices"]
        if batch > smallest:
            per_device = f" x devices={cfg['devices']}" if cfg["devices"] > 1 else ""
            raise ValueError(
                f"{section}.batch_size={cfg['batch_size']}{per_device} is larger than the "
                f"smallest role ({smallest} images)"
            )


def _assignment_sizes(path: str) -> dict[str, int]:
    import polars as pl

    from mimia.data.splits import read_assignment

    try:
        roles = read_assignment(path)
    except (OSError, ValueError, pl.exceptions.PolarsError) as err:
        raise ValueError(f"split.assignment: {err}") from None
    counts = dict(roles.group_by("role").len().rows())
    empty = [role for role in ROLES if not counts.get(role)]
    if empty:
        raise ValueError(f"split.assignment leaves roles {empty} empty")
    return {role: counts[role] for role in ROLES}


def _check_target(exp: dict, spec) -> None:
    """A released target must be what the ``model`` section describes: that section builds
    the shadow models, whose decoders go on the target encoder."""
    from mimia.models.spec import declared_spec, spec_differences

    target = exp["target"]
    if not target["checkpoint"]:
        return
    if target["format"] == "timm" and "released" in exp["decoder"]:
        raise ValueError(
            "a timm target checkpoint is an encoder only; decoder mode 'released' needs the "
            "target's decoder (use decoder: [shadow, adapted])"
        )
    declared = declared_spec(target["checkpoint"], target["format"])
    if declared is None:  # timm / mae: checked against the tensors' shapes at import
        return
    # A released encoder keeps its own normalisation; the decoder is the shadow's in
    # the encoder-only modes, so its fields need not match unless it is used as released.
    ignore = ["mean", "std"]
    if "released" not in exp["decoder"]:
        ignore += ["decoder_embed_dim", "decoder_depth", "decoder_num_heads"]
    diff = spec_differences(declared, spec, ignore=ignore)
    if diff:
        raise ValueError(
            f"target.checkpoint {target['checkpoint']} is not the architecture the model "
            f"section describes ({'; '.join(diff)}). The checkpoint is the audited target "
            f"and wins; describe it in the model section, which also builds the shadow models"
        )


def _check_attacks(exp: dict) -> None:
    from mimia.attacks import needs_online_references, validate_entry

    ratios = exp["extract"]["mask_ratios"]
    online = False
    for key, entry in exp["attacks"].items():
        if not NAME.match(key):
            raise ValueError(f"attack result name {key!r} must match {NAME.pattern}")
        kind, params = validate_entry(key, entry, ratios)
        online |= needs_online_references(kind, params)
    # Online attacks need reference models that trained on the queried images: one switch.
    exp["shadow"]["online"] = exp["shadow"]["online"] or online


def attack_kind(entry: dict | None, key: str) -> str:
    """The registry name of the attack behind result name ``key``."""
    return (entry or {}).get("attack", key)


def model_spec(exp: dict):
    from mimia.models.spec import ModelSpec

    m = dict(exp["model"])
    if m.get("mean") is not None:
        m["mean"], m["std"] = tuple(m["mean"]), tuple(m["std"])
    else:
        m.pop("mean", None), m.pop("std", None)
    return ModelSpec(img_size=exp["dataset"]["img_size"], **m)


def section(exp: dict, name: str, drop: Iterable[str] = ()) -> dict:
    """A config section without the keys in ``drop``, canonical (for rule params)."""
    return canonical({k: v for k, v in exp[name].items() if k not in set(drop)})


def gpu_request(gpu: int, share: int, processes: int = 1) -> dict[str, int | str]:
    """The GPU resources of a job of ``processes`` training/scoring processes: ``gpu`` (whole
    GPUs, the SLURM plugin's ``--gpus``), ``gpu_shard`` (shares of a GPU, the local counter
    capped at GPUs x ``share``) and ``gres`` (``shard:1`` on SLURM when the job takes a share).

    With ``share`` > 1 a one-process job takes one share and no whole GPU; a job of several
    processes takes ``processes`` whole GPUs, all of their shares included, so that locally it
    never runs beside a job holding a share of one of them.
    """
    if share > 1 and gpu != 1:
        raise ValueError(
            f"gpu_share: {share} splits one GPU among {share} jobs, so every job must ask for "
            f"one GPU (gpu: 1), not gpu: {gpu}"
        )
    if share > 1 and processes == 1:
        return {"gpu": 0, "gpu_shard": 1, "gres": "shard:1"}
    return {"gpu": gpu * processes, "gpu_shard": gpu * processes * share, "gres": ""}


def check_runtime_devices(experiments: dict[str, dict], gpu: int, *, local: bool) -> None:
    """``runtime.device: cuda`` fails before any job: when the config asks the scheduler for
    no GPU (``gpu: 0``: its jobs would land where there is none, or crowd one GPU unbounded)
    and, for jobs that run on this machine (``local``), when it has no CUDA device.
    ``auto`` never fails: it takes CUDA where there is one."""
    cuda = {
        name: e["runtime"]["device"]
        for name, e in experiments.items()
        if e["runtime"]["device"].startswith("cuda")
    }
    if not cuda:
        return
    name, device = next(iter(cuda.items()))
    if gpu == 0:
        raise ValueError(
            f"experiment {name!r}: runtime.device is {device!r} but the config's gpu is 0, so "
            f"its jobs ask for no GPU: set gpu: 1 (or runtime.device: auto)"
        )
    if local:
        from mimia.devices import cuda_problem  # imports torch: only when CUDA is asked for

        for name, device in cuda.items():
            problem = cuda_problem(device)
            if problem:
                raise ValueError(f"experiment {name!r}: {problem}")
