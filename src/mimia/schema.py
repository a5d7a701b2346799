"""The experiment schema (``mimia/schemas``, package data): defaults and per-section checks.

The one home of every setting's default. A leaf module (yaml and jsonschema only), so both the
config layer and the training recipe read it without importing each other.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import yaml

# Package data, so that an installed (not editable) mimia resolves configs; the Snakefile
# validates against the same files.
SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"


def load_schema(schema_dir: Path = SCHEMA_DIR) -> dict:
    return yaml.safe_load((schema_dir / "experiment.schema.yaml").read_text())


def schema_defaults(section: str) -> dict:
    """The schema's defaults of one experiment section (e.g. ``pretrain``)."""
    props = load_schema()["properties"][section]["properties"]
    return {k: copy.deepcopy(v["default"]) for k, v in props.items() if "default" in v}


def check_section(section: str, value: dict) -> None:
    """Validate ``value`` against experiment section ``section``'s schema as it is (no
    defaults filled in); ValueError naming the first key it refuses."""
    full = load_schema()
    schema = {"$defs": full["$defs"], **full["properties"][section]}
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(value), key=str)
    if errors:
        where = ".".join(str(p) for p in errors[0].path)
        raise ValueError(f"{where}: {errors[0].message}")


def canonical(value: Any) -> Any:
    """``value`` with every mapping's keys sorted, recursively.

    Snakemake compares rule params by their ``repr``: two configs that differ only in key
    order (or in whether a default was written out) must give the same params, or every job
    reruns with "params have changed". Training fingerprints rely on it for the same reason.
    """
    if isinstance(value, dict):
        return {k: canonical(value[k]) for k in sorted(value)}
    if isinstance(value, list | tuple):
        return [canonical(v) for v in value]
    return value
