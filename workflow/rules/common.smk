# Experiments, paths and input functions shared by every stage.
import re
from pathlib import Path

from mimia.attacks import ATTACKS
from mimia.config import resolve_experiments, shard_count
from mimia.data.splits import ROLES, SHADOW_ROLES, TARGET_ROLES

EXPERIMENTS = resolve_experiments(
    config, Path(workflow.basedir) / "workflow" / "schemas"
)
RESULTS = config["results"]
EXP = f"{RESULTS}/{{experiment}}"
LOGS = f"{RESULTS}/logs/{{experiment}}"
BENCH = f"{RESULTS}/benchmarks/{{experiment}}"


wildcard_constraints:
    experiment="|".join(map(re.escape, EXPERIMENTS)),
    role="|".join(ROLES),
    shard=r"\d{6}",
    model=r"target|shadow\d+",
    decoder="released|shadow|adapted",


def exp(wildcards):
    return EXPERIMENTS[wildcards.experiment]


def exp_sections(*sections):
    """Params holding only the config sections a rule reads, so that changing one section
    reruns only the rules that depend on it."""

    def params(wildcards):
        e = EXPERIMENTS[wildcards.experiment]
        return {key: e[key] for key in ("seed", *sections) if key in e}

    return params


def split_assignment(wildcards):
    path = EXPERIMENTS[wildcards.experiment]["split"]["assignment"]
    return [path] if path else []


def shadow_models(experiment):
    return [f"shadow{i}" for i in range(EXPERIMENTS[experiment]["shadow"]["count"])]


def shard_files(experiment, role):
    e = EXPERIMENTS[experiment]
    return [
        f"{RESULTS}/{experiment}/data/shards/{role}-{i:06d}.tar"
        for i in range(shard_count(e, role))
    ]


def target_weights(experiment):
    sub = (
        "target-imported"
        if EXPERIMENTS[experiment]["target"]["checkpoint"]
        else "target"
    )
    return f"{RESULTS}/{experiment}/models/{sub}/model.safetensors"


def model_weights(experiment, model):
    if model == "target":
        return target_weights(experiment)
    return f"{RESULTS}/{experiment}/models/{model}/model.safetensors"


def training_roles(experiment, model):
    if model == "target":
        return ["target_member"]
    online = EXPERIMENTS[experiment]["shadow"]["online"]
    return list(SHADOW_ROLES) + (list(TARGET_ROLES) if online else [])


def pretrain_shards(wildcards):
    return [
        f
        for role in training_roles(wildcards.experiment, wildcards.model)
        for f in shard_files(wildcards.experiment, role)
    ]


def adapt_inputs(wildcards):
    e = wildcards.experiment
    return {
        "target": target_weights(e),
        "shadow": model_weights(e, "shadow0"),
        "manifest": f"{RESULTS}/{e}/data/manifest.parquet",
        "shards": [f for role in SHADOW_ROLES for f in shard_files(e, role)],
    }


def scoring_checkpoints(wildcards):
    """Checkpoints that make up the scoring model of (model, decoder)."""
    e, decoder = wildcards.experiment, wildcards.decoder
    model = getattr(wildcards, "model", "target")
    if model != "target":
        if decoder != "released":
            raise ValueError(
                f"shadow models are scored with their own decoder, not {decoder!r}"
            )
        return {"model": model_weights(e, model)}
    if decoder == "adapted":
        return {"model": f"{RESULTS}/{e}/models/target-adapted/model.safetensors"}
    if decoder == "shadow":
        return {"model": target_weights(e), "shadow": model_weights(e, "shadow0")}
    return {"model": target_weights(e)}


def error_files(experiment):
    """Every per-shard error table an experiment's attacks read."""
    e = EXPERIMENTS[experiment]
    files = [
        f"{RESULTS}/{experiment}/errors/target/{decoder}/{role}-{i:06d}.parquet"
        for decoder in e["decoder"]
        for role in TARGET_ROLES
        for i in range(shard_count(e, role))
    ]
    files += [
        f"{RESULTS}/{experiment}/errors/{model}/released/{role}-{i:06d}.parquet"
        for model in shadow_models(experiment)
        for role in ROLES
        for i in range(shard_count(e, role))
    ]
    return files


def attack_inputs(wildcards):
    inputs = {
        "errors": f"{RESULTS}/{wildcards.experiment}/errors.parquet",
        "membership": f"{RESULTS}/{wildcards.experiment}/data/shadow_membership.parquet",
    }
    e = EXPERIMENTS[wildcards.experiment]
    kind = (e["attacks"][wildcards.attack] or {}).get("attack", wildcards.attack)
    if ATTACKS[kind].requires_embeddings:
        inputs["embeddings"] = [
            f"{RESULTS}/{wildcards.experiment}/embeddings/{model}.parquet"
            for model in ("target", "shadow0")
        ]
    return inputs


def attack_metrics(experiment):
    e = EXPERIMENTS[experiment]
    return [
        f"{RESULTS}/{experiment}/attacks/{decoder}/{attack}.json"
        for decoder in e["decoder"]
        for attack in e["attacks"]
    ]


def final_outputs():
    outputs = [f"{RESULTS}/summary.parquet"]
    outputs += [f"{RESULTS}/ablations/{name}.png" for name in config["ablations"]]
    for experiment, e in EXPERIMENTS.items():
        outputs += [
            f"{RESULTS}/{experiment}/metrics.json",
            f"{RESULTS}/{experiment}/roc.png",
        ]
        outputs += [
            f"{RESULTS}/{experiment}/figures/reconstructions-{decoder}.png"
            for decoder in e["decoder"]
        ]
    return outputs
