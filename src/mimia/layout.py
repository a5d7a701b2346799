"""Names and paths every part of mimia agrees on: roles, models, decoder modes, and where each
artifact of an experiment lives.

This module imports nothing heavy (no torch, numpy or polars): the Snakemake workflow reads it
while it builds the DAG, and every stage and the report use the same names. Paths say where a
file goes; what a file holds is read from its own metadata, never parsed back from its name.
"""

from __future__ import annotations

import math

ROLES = ("target_member", "target_nonmember", "shadow_member", "shadow_nonmember")
TARGET_ROLES = ROLES[:2]
SHADOW_ROLES = ROLES[2:]

DECODER_MODES = ("released", "shadow", "adapted")
"""``released``: the target's own decoder (white-box); ``shadow``: shadow0's decoder put on
the target encoder as is (the paper); ``adapted``: shadow0's decoder fine-tuned on the frozen
target encoder with the adversary's data only."""

OWN_DECODER = "released"
"""The decoder mode of a model scored with its own decoder: the shadow and reference models
always are (only the target's scoring decoder varies)."""

TARGET = "target"
IMPORTED_TARGET = "target-imported"
"""The model folder of a released target brought into mimia's format."""
ADAPTED_SUFFIX = "-adapted"


def adapted_model(base: str) -> str:
    """The model folder (and training name) of ``base``'s encoder wearing :data:`PAPER_SHADOW`'s
    decoder fine-tuned on it: decoder mode ``adapted`` of the target, or of a reference model
    when the usage audit calibrates that mode."""
    return f"{base}{ADAPTED_SUFFIX}"


def adapted_base(model: str) -> str | None:
    """``target-adapted`` -> ``target``, ``shadow2-adapted`` -> ``shadow2``; None otherwise."""
    return model.removesuffix(ADAPTED_SUFFIX) if model.endswith(ADAPTED_SUFFIX) else None


def shadow_model(index: int) -> str:
    return f"shadow{index}"


def shadow_models(count: int) -> list[str]:
    return [shadow_model(i) for i in range(count)]


PAPER_SHADOW = "shadow0"
"""The paper's shadow model: trained on ``shadow_member`` exactly, whatever the mode; the
attacks fit on it and decoder modes ``shadow`` and ``adapted`` take its decoder."""


def shadow_index(model: str) -> int:
    """``shadow3`` -> 3; ValueError for anything else."""
    digits = model.removeprefix("shadow")
    if not model.startswith("shadow") or not digits.isdigit():
        raise ValueError(f"{model!r} is not a shadow model name (shadow0, shadow1, ...)")
    return int(digits)


def shard_count(split: dict, role: str) -> int:
    return math.ceil(split[role] / split["shard_size"])


def _index(index: int | str) -> str:
    # A string is a wildcard pattern such as "{shard}", for Snakemake's rule templates.
    return f"{index:06d}" if isinstance(index, int) else index


class Layout:
    """Paths of one experiment's artifacts under ``results/<experiment>``.

    Methods return paths as strings relative to the workflow's working directory, exactly as
    Snakemake names inputs and outputs. Model folders hold ``model.safetensors``, its sidecar
    ``model.json`` and, for trained models, ``model.train_log.parquet`` (one prefix, so the
    between-workflow cache stores them as one ``multiext`` output).
    """

    def __init__(self, results: str, experiment: str) -> None:
        self.root = f"{results}/{experiment}"

    @property
    def manifest(self) -> str:
        return f"{self.root}/data/manifest.parquet"

    def membership(self, model: str) -> str:
        return f"{self.root}/data/membership/{model}.parquet"

    def shard(self, role: str, index: int | str) -> str:
        return f"{self.root}/data/shards/{role}-{_index(index)}.tar"

    def shards(self, split: dict, roles) -> list[str]:
        return [self.shard(r, i) for r in roles for i in range(shard_count(split, r))]

    def model_dir(self, model: str) -> str:
        """``target`` (trained here), ``target-imported``, ``target-adapted``, ``shadow{i}``,
        ``shadow{i}-adapted``."""
        return f"{self.root}/models/{model}"

    def weights(self, model: str) -> str:
        return f"{self.model_dir(model)}/model.safetensors"

    def errors(self, model: str, decoder: str, role: str, index: int | str) -> str:
        return f"{self.root}/errors/{model}/{decoder}/{role}-{_index(index)}.parquet"

    @property
    def all_errors(self) -> str:
        return f"{self.root}/errors.parquet"

    def collection_table(self, name: str) -> str:
        """A usage collection given as an image source: its image table."""
        return f"{self.root}/usage/{name}/images.parquet"

    def collection_shard(self, name: str) -> str:
        return f"{self.root}/usage/{name}/images.tar"

    def collection_errors(self, name: str, model: str, decoder: str) -> str:
        return f"{self.root}/usage/{name}/errors/{model}/{decoder}.parquet"

    def embeddings(self, model: str) -> str:
        return f"{self.root}/embeddings/{model}.parquet"

    def attack(self, decoder: str, attack: str, what: str) -> str:
        """``what``: ``scores`` (Parquet), ``roc`` (Parquet) or ``metrics`` (JSON)."""
        suffix = {"scores": ".parquet", "roc": "-roc.parquet", "metrics": ".json"}[what]
        return f"{self.root}/attacks/{decoder}/{attack}{suffix}"
